"""add adapter dora: whether a registered adapter is a DoRA adapter (PEFT use_dora), which `show`/`list` say

Every adapter registered before is plain LoRA (earlier versions refused DoRA), so the default false is true of them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ALTER TABLE ADD COLUMN (SQLite has it): a batch operation would copy the table and drop its AUTOINCREMENT
    op.add_column("adapters", sa.Column("dora", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    # SQLite recreates the table to drop a column: keep its AUTOINCREMENT (revision 0003)
    with op.batch_alter_table("adapters", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_column("dora")
