"""add lineage: how derived adapters and bases (merges, combinations, resizes, pulls) were made

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lineage",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("op", sa.String(length=64), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lineage")),
    )
    op.create_table(
        "lineage_inputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("lineage_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=True),
        sa.Column("base_id", sa.Integer(), nullable=True),
        sa.Column("label", sa.String(length=512), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("weight", sa.Float(), nullable=True),
        sa.Column("role", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], name=op.f("fk_lineage_inputs_adapter_id_adapters"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(["base_id"], ["bases.id"], name=op.f("fk_lineage_inputs_base_id_bases"), ondelete="SET NULL"),
        sa.ForeignKeyConstraint(
            ["lineage_id"], ["lineage.id"], name=op.f("fk_lineage_inputs_lineage_id_lineage"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lineage_inputs")),
    )
    op.create_index(op.f("ix_lineage_inputs_adapter_id"), "lineage_inputs", ["adapter_id"])
    op.create_index(op.f("ix_lineage_inputs_base_id"), "lineage_inputs", ["base_id"])
    op.create_index(op.f("ix_lineage_inputs_lineage_id"), "lineage_inputs", ["lineage_id"])
    # batch mode: SQLite cannot add a foreign key to an existing table, so Alembic rebuilds it there.
    with op.batch_alter_table("bases") as batch:
        batch.add_column(sa.Column("derived", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column("lineage_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            batch.f("fk_bases_lineage_id_lineage"), "lineage", ["lineage_id"], ["id"], ondelete="SET NULL"
        )
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("lineage_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            batch.f("fk_adapters_lineage_id_lineage"), "lineage", ["lineage_id"], ["id"], ondelete="SET NULL"
        )


def downgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.drop_constraint(batch.f("fk_adapters_lineage_id_lineage"), type_="foreignkey")
        batch.drop_column("lineage_id")
    with op.batch_alter_table("bases") as batch:
        batch.drop_constraint(batch.f("fk_bases_lineage_id_lineage"), type_="foreignkey")
        batch.drop_column("lineage_id")
        batch.drop_column("derived")
    op.drop_table("lineage_inputs")
    op.drop_table("lineage")
