"""create registry: bases with their tensor manifests, adapters with their modules and tags

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=1024), nullable=False),
        sa.Column("path", sa.String(length=4096), nullable=True),
        sa.Column("num_tensors", sa.Integer(), nullable=False),
        sa.Column("num_parameters", sa.BigInteger(), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bases")),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_bases_fingerprint")),
        sa.UniqueConstraint("name", name=op.f("uq_bases_name")),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("num_parameters", sa.BigInteger(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=True),
        sa.Column("alpha", sa.Float(), nullable=True),
        sa.Column("alpha_override", sa.Float(), nullable=True),
        sa.Column("scale_mode", sa.String(length=16), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("base_id", sa.Integer(), nullable=True),
        sa.Column("base_hint", sa.String(length=1024), nullable=True),
        sa.Column("source", sa.String(length=4096), nullable=True),
        sa.Column("blob", sa.String(length=512), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["base_id"], ["bases.id"], name=op.f("fk_adapters_base_id_bases"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_adapters_name_version")),
        sa.UniqueConstraint("sha256", name=op.f("uq_adapters_sha256")),
    )
    op.create_index(op.f("ix_adapters_base_id"), "adapters", ["base_id"])
    op.create_index(op.f("ix_adapters_name"), "adapters", ["name"])
    op.create_index(op.f("ix_adapters_rank"), "adapters", ["rank"])
    op.create_index(op.f("ix_adapters_weights_sha256"), "adapters", ["weights_sha256"])
    op.create_table(
        "base_tensors",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("base_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=1024), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("shape", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["base_id"], ["bases.id"], name=op.f("fk_base_tensors_base_id_bases"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_base_tensors")),
        sa.UniqueConstraint("base_id", "name", name=op.f("uq_base_tensors_base_id_name")),
    )
    op.create_table(
        "adapter_modules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=1024), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("scale", sa.Float(), nullable=False),
        sa.Column("in_features", sa.Integer(), nullable=False),
        sa.Column("out_features", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], name=op.f("fk_adapter_modules_adapter_id_adapters"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_modules")),
        sa.UniqueConstraint("adapter_id", "name", name=op.f("uq_adapter_modules_adapter_id_name")),
    )
    op.create_index(op.f("ix_adapter_modules_target"), "adapter_modules", ["target"])
    op.create_table(
        "adapter_tags",
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("tag", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], name=op.f("fk_adapter_tags_adapter_id_adapters"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("adapter_id", "tag", name=op.f("pk_adapter_tags")),
    )
    op.create_index(op.f("ix_adapter_tags_tag"), "adapter_tags", ["tag"])
    op.create_table(
        "adapter_names",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_adapter_names")),
    )


def downgrade() -> None:
    op.drop_table("adapter_names")
    op.drop_table("adapter_tags")
    op.drop_table("adapter_modules")
    op.drop_table("base_tensors")
    op.drop_table("adapters")
    op.drop_table("bases")
