"""The registry's tables (SQLAlchemy 2 typed models). Rows never leave loraops.registry.store: it converts
them to the pydantic records of loraops.records.

Portable on purpose (SQLite and PostgreSQL): generic types only, JSON columns, named constraints (so Alembic
can alter them on both), ids of adapters, bases and lineage never reused (SQLite: AUTOINCREMENT, as PostgreSQL's
sequences), and the uniqueness rules that make concurrent registration safe live in the schema:
one adapter per identity sha, one (name, version), one base per name and per fingerprint.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import JSON, false, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, MetaData, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class SqlLineage(Base):
    """One operation that produced an adapter or a base (merge, combine, resize, pull, ...)."""

    __tablename__ = "lineage"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    op: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    inputs: Mapped[list["SqlLineageInput"]] = relationship(
        back_populates="lineage", cascade="all, delete-orphan", order_by="SqlLineageInput.position"
    )


class SqlLineageInput(Base):
    """An input of a lineage step. ``label`` and ``sha256`` are snapshots, so the history stays readable after the
    input itself is removed (its id is then set to NULL)."""

    __tablename__ = "lineage_inputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    lineage_id: Mapped[int] = mapped_column(ForeignKey("lineage.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # "adapter" | "base"
    adapter_id: Mapped[Optional[int]] = mapped_column(ForeignKey("adapters.id", ondelete="SET NULL"), index=True)
    base_id: Mapped[Optional[int]] = mapped_column(ForeignKey("bases.id", ondelete="SET NULL"), index=True)
    label: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[Optional[str]] = mapped_column(String(64))
    weight: Mapped[Optional[float]] = mapped_column(Float)
    role: Mapped[Optional[str]] = mapped_column(String(64))

    lineage: Mapped[SqlLineage] = relationship(back_populates="inputs")


class SqlBase(Base):
    """A base model on local disk (never copied: bases are large). ``path`` is where its files were last seen."""

    __tablename__ = "bases"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(1024))
    path: Mapped[Optional[str]] = mapped_column(String(4096))
    num_tensors: Mapped[int] = mapped_column(Integer)
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    dtype: Mapped[str] = mapped_column(String(16))
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    derived: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """True for a model loraops produced (a merge): its lineage says from what."""
    lineage_id: Mapped[Optional[int]] = mapped_column(ForeignKey("lineage.id", ondelete="SET NULL"))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    tensors: Mapped[list["SqlBaseTensor"]] = relationship(
        back_populates="base", cascade="all, delete-orphan", passive_deletes=True
    )
    lineage: Mapped[Optional[SqlLineage]] = relationship()


class SqlBaseTensor(Base):
    """The manifest: one row per tensor (name, dtype, shape)."""

    __tablename__ = "base_tensors"
    __table_args__ = (UniqueConstraint("base_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_id: Mapped[int] = mapped_column(ForeignKey("bases.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(1024))
    dtype: Mapped[str] = mapped_column(String(16))
    shape: Mapped[list[int]] = mapped_column(JSON)

    base: Mapped[SqlBase] = relationship(back_populates="tensors")


class SqlAdapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("name", "version"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    """Identity: the weights bytes plus the config fields that change the math (see loraops.formats.identity)."""
    weights_sha256: Mapped[str] = mapped_column(String(64), index=True)
    """sha256 of the weights file's bytes: what the Hub and Civitai show."""
    name: Mapped[str] = mapped_column(String(255), index=True)
    version: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(32))
    dtype: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(BigInteger)
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    rank: Mapped[Optional[int]] = mapped_column(Integer, index=True)
    alpha: Mapped[Optional[float]] = mapped_column(Float)
    alpha_override: Mapped[Optional[float]] = mapped_column(Float)
    """--alpha given at registration for a file that does not carry one; needed to read the blob again."""
    scale_mode: Mapped[str] = mapped_column(String(16))
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    dora: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """A DoRA adapter (PEFT use_dora)."""
    token_rows: Mapped[Optional[dict[str, int]]] = mapped_column(JSON)
    """PEFT trainable tokens: {base tensor: number of rows it replaces}, {} for none; NULL: not recorded (a PEFT
    adapter registered before revision 0005, until `verify` or registering it again records it)."""
    base_id: Mapped[Optional[int]] = mapped_column(ForeignKey("bases.id", ondelete="SET NULL"), index=True)
    base_hint: Mapped[Optional[str]] = mapped_column(String(1024))
    """PEFT's base_model_name_or_path, as written in the adapter."""
    source: Mapped[Optional[str]] = mapped_column(String(4096))
    blob: Mapped[str] = mapped_column(String(512))
    """Path of the adapter inside the blob store (a file or a folder), relative to blobs_dir()."""
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    """[{"name", "size", "sha256"}] of every file stored in the blob folder (what `verify` re-hashes)."""
    lineage_id: Mapped[Optional[int]] = mapped_column(ForeignKey("lineage.id", ondelete="SET NULL"))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    modules: Mapped[list["SqlAdapterModule"]] = relationship(
        back_populates="adapter", cascade="all, delete-orphan", passive_deletes=True, order_by="SqlAdapterModule.id"
    )
    tags: Mapped[list["SqlTag"]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="SqlTag.tag"
    )
    base: Mapped[Optional[SqlBase]] = relationship()
    lineage: Mapped[Optional[SqlLineage]] = relationship()


class SqlAdapterName(Base):
    """The last version number given to each name, so a removed version's number is never reused."""

    __tablename__ = "adapter_names"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer)


class SqlAdapterModule(Base):
    __tablename__ = "adapter_modules"
    __table_args__ = (UniqueConstraint("adapter_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(1024))
    target: Mapped[str] = mapped_column(String(255), index=True)
    """Last component of the module path (q_proj, c_attn, ...): what `list --target` matches."""
    kind: Mapped[str] = mapped_column(String(16))
    """The layer's (linear, conv, embedding), or loha/lokr for those (LoraModule.shown_kind)."""
    method: Mapped[Optional[str]] = mapped_column(String(16))
    """adalora/vera: the PEFT method the module was read from as the plain LoRA it equals (LoraModule.method)."""
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    scale: Mapped[float] = mapped_column(Float)
    in_features: Mapped[int] = mapped_column(Integer)
    out_features: Mapped[int] = mapped_column(Integer)
    kernel: Mapped[Optional[list[int]]] = mapped_column(JSON(none_as_null=True))
    """A convolution's kernel size ([3, 3]), as bound at registration (an AdaLoRA conv's only its base says); NULL for
    other layers, and for a conv row revision 0007 could not fill from its base's manifest (show reads the file)."""

    adapter: Mapped[SqlAdapter] = relationship(back_populates="modules")


class SqlTag(Base):
    __tablename__ = "adapter_tags"

    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(255), primary_key=True, index=True)
