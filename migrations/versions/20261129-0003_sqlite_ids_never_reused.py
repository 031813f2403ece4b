"""sqlite ids never reused: adapters, bases and lineage rebuilt with AUTOINCREMENT on SQLite

Without it SQLite hands the id of a removed last row to the next insert, so `show 7` could name another adapter
after `rm 7`; PostgreSQL's sequences never go back, and are left alone. Ids removed before this migration ran
above the highest remaining one can still come back once (SQLite starts its counter at the highest id it finds).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""
from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ("lineage", "bases", "adapters")


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        # recreate: SQLite cannot add AUTOINCREMENT to a table, Alembic copies it into a new one (the rows keep
        # their ids; db._migrating keeps the foreign keys pointing at them intact)
        with op.batch_alter_table(table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}):
            pass


def upgrade() -> None:
    _rebuild(True)


def downgrade() -> None:
    _rebuild(False)
