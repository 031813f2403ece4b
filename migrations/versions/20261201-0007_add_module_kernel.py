"""add adapter_modules kernel: a convolution's kernel size, which `list --json` and `show` give, kept when the base is
removed (an AdaLoRA conv's A is stored flattened and a kohya file names its modules its own way: the file alone no
longer gives a bound conv row its kernel)

Rows recorded before: a conv row of an adapter bound to a base gets its base weight's kernel (the manifest's shape
after out and in), as revision 0006 reads AdaLoRA convs; the others stay NULL, and `show` reads theirs from the
stored file as before. Reading every stored copy here would make opening a registry as slow as `verify`, and fail
where the blob store is not mounted (revision 0005).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""
from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ALTER TABLE ADD COLUMN (SQLite has it): no need for a batch operation's copy of the table
    op.add_column("adapter_modules", sa.Column("kernel", sa.JSON(), nullable=True))
    conn = op.get_bind()
    shapes = conn.execute(sa.text(
        "SELECT m.id, t.shape FROM adapter_modules m JOIN adapters a ON a.id = m.adapter_id "
        "JOIN base_tensors t ON t.base_id = a.base_id AND t.name = m.name || '.weight' WHERE m.kind = 'conv'"
    )).all()
    kernels = [{"id": id_, "kernel": shape[2:]} for id_, shape in
               ((id_, json.loads(shape) if isinstance(shape, str) else shape) for id_, shape in shapes) if len(shape) > 2]
    if kernels:
        conn.execute(sa.text("UPDATE adapter_modules SET kernel = :kernel WHERE id = :id")
                     .bindparams(sa.bindparam("kernel", type_=sa.JSON())), kernels)


def downgrade() -> None:
    # SQLite recreates the table to drop a column (adapter_modules has no AUTOINCREMENT to lose: revision 0003 gave
    # it to adapters, bases and lineage only)
    with op.batch_alter_table("adapter_modules") as batch:
        batch.drop_column("kernel")
