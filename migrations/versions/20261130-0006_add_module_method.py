"""add adapter_modules method: the PEFT method (adalora, vera) a module was read from as the plain LoRA it equals,
which the module's kind held before; the kind is now always the layer's (linear, conv, …), as for a LoRA

Rows recorded before: a VeRA module's layer is a Linear (PEFT's VeRA wraps Linear and Conv1D layers only); an AdaLoRA
module's is a convolution where the adapter's base stores the module's weight with more than two dimensions, else a
Linear (unbound, loraops reads a Conv2d's flattened A as a Linear's, as `inspect` shows it).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""
from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ALTER TABLE ADD COLUMN (SQLite has it): no need for a batch operation's copy of the table
    op.add_column("adapter_modules", sa.Column("method", sa.String(16), nullable=True))
    op.execute("UPDATE adapter_modules SET method = kind, kind = 'linear' WHERE kind IN ('adalora', 'vera')")
    conn = op.get_bind()
    shapes = conn.execute(sa.text(
        "SELECT m.id, t.shape FROM adapter_modules m JOIN adapters a ON a.id = m.adapter_id "
        "JOIN base_tensors t ON t.base_id = a.base_id AND t.name = m.name || '.weight' WHERE m.method = 'adalora'"
    )).all()
    convs = [id_ for id_, shape in shapes if len(json.loads(shape) if isinstance(shape, str) else shape) > 2]
    for id_ in convs:
        conn.execute(sa.text("UPDATE adapter_modules SET kind = 'conv' WHERE id = :id"), {"id": id_})


def downgrade() -> None:
    op.execute("UPDATE adapter_modules SET kind = method WHERE method IS NOT NULL")
    # SQLite recreates the table to drop a column (adapter_modules has no AUTOINCREMENT to lose: revision 0003 gave
    # it to adapters, bases and lineage only)
    with op.batch_alter_table("adapter_modules") as batch:
        batch.drop_column("method")
