"""add adapter token_rows: the PEFT trainable tokens a registered adapter carries ({base tensor: number of rows it
replaces}), which `show`/`list` say

Adapters registered before: a kohya or diffusers one cannot carry trainable tokens (loraops refuses them in those
layouts), so it gets {}; a PEFT one may, and only its stored copy says, so it gets NULL ("not recorded") rather than
a guess. Reading every stored copy here would make opening a registry as slow as `verify`, and fail where the blob
store is not mounted; `verify` (which reads them anyway) and registering the adapter again record them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ALTER TABLE ADD COLUMN (SQLite has it): a batch operation would copy the table and drop its AUTOINCREMENT
    op.add_column("adapters", sa.Column("token_rows", sa.JSON(), nullable=True))
    op.execute("UPDATE adapters SET token_rows = '{}' WHERE format <> 'peft'")


def downgrade() -> None:
    # SQLite recreates the table to drop a column: keep its AUTOINCREMENT (revision 0003)
    with op.batch_alter_table("adapters", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_column("token_rows")
