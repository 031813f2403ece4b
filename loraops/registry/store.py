"""The registry: adapters, base models and lineage in SQL, adapter files in a content-addressed blob store.

Every public method returns pydantic records (loraops.records), never ORM rows. Writes are one transaction
each, run by Registry.write: the schema's unique constraints (identity sha, (name, version), base name and
fingerprint) make concurrent registration safe, and a writer that loses a race (IntegrityError, SQLite busy,
PostgreSQL serialization failure or deadlock) rolls back and runs its transaction again. Blob files are put and
removed under the blob store's per-shard file lock, so `rm` never deletes the files a concurrent `register` of the
same bytes is about to record.

Reads (resolving references, listings, the records) are plain SQL in reads.py, run on the session's connection.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import random
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple, Sequence, TypeVar

from sqlalchemy import delete, exists, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from .. import settings
from ..lazy import LazyModule
from ..fp8 import model_parameters
from ..fsutil import existing_path, path_exists, refuse_unrecordable, remove, resolved, sha256_file
from ..errors import (ConflictError, FormatError, InvalidInputError, LoraopsError, MismatchError, NotFoundError,
                      ParameterError, RegistryError, reworded)
from ..landing import interrupts_deferred, tell
from ..references import PATH, argument, flags_checked, is_finite
from ..records import AdapterRecord, BaseRecord, BaseRef, CheckResult, LineageSpec, StoredFileProblem, TensorRecord
from ..st import dtype_name, without_torch
from . import db, reads
from .blobs import BlobStore, folder_of
from .models import SqlAdapter, SqlAdapterModule, SqlAdapterName, SqlBase, SqlBaseTensor, SqlLineage, SqlLineageInput, SqlTag

from ..adapter import Adapter

if TYPE_CHECKING:
    from .. import formats
    from ..basemodel import BaseModel
    from ..records import CheckReport
else:
    formats = LazyModule("loraops.formats")  # what annotations name resolves when they are read: lazy.py

RETRIES = 10
RETRY_BACKOFF_S = 0.02
# SQLSTATEs of a PostgreSQL transaction that lost to another one and is worth running again.
PG_RETRYABLE = {"40001", "40P01"}  # serialization_failure, deadlock_detected
T = TypeVar("T")
TOLD = "loraops_told"  # Session.info: what is told once the transaction committed (Registry.session)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+/-]*$")


class Registration(NamedTuple):
    """What register_adapter did."""

    record: AdapterRecord
    created: bool
    """False: that adapter (identity) was already registered; its record is returned, under its own name@version."""
    linked: bool = False
    """An adapter already registered that this call linked to the ``base`` asked for (it had none, or another)."""
    previous_base: BaseRef | None = None
    """The base it was linked to before this call re-linked it."""


UNRECORDED = "not recorded: no record holds it (remove it)"
"""StoredFileProblem.problem of a file in a stored adapter's folder that is none of its recorded files."""


def refuse_bad_grace(grace_s: object, option: str = "grace_s") -> None:
    """gc's grace, a number of seconds ≥ 0 (``option``: as the caller names it, `--grace` for the CLI): a negative one
    kept nothing from removal either, NaN compared as "old" to everything."""
    if not is_finite(grace_s) or not grace_s >= 0:
        shown = f"{grace_s:g}" if is_finite(grace_s) else repr(grace_s)
        raise InvalidInputError(f"{option} {shown}: give a number of seconds ≥ 0")


@contextlib.contextmanager
def opened(registry: "Registry | None", *, create: bool = True) -> Iterator["Registry"]:
    """The registry a library call (merging.*, derive.*) reads and records in: the caller's ``registry``, left open
    (it is theirs), else the default one (LORAOPS_DB / LORAOPS_HOME), opened for the call (``create``: as
    Registry.open's) and closed after."""
    if registry is None:
        with Registry.open(create=create) as reg:
            yield reg
    else:
        yield given(registry)


def given(registry: object) -> "Registry":
    """A caller's ``registry=``, refused unless it is a Registry (a URL string is not: the caller opens it, and
    closes it, as hub.pull's and hub.push's)."""
    if not isinstance(registry, Registry):
        raise InvalidInputError(f"registry= takes a Registry (loraops.registry.Registry.open(url)), not {registry!r}")
    return registry


class Registry:
    def __init__(self, engine, blobs: BlobStore, earlier: BlobStore | None = None, read_only: bool = False) -> None:
        self.engine = engine
        self.blobs = blobs
        self.read_only = read_only
        self.earlier = earlier
        """The store loraops used for this registry before it had its own (see _stores), for _recover."""

    @classmethod
    @flags_checked
    def open(cls, url: str | None = None, *, create: bool = True,
             blobs: str | os.PathLike | None = None) -> "Registry":
        """Connect to ``url`` (default: settings.db_url()) and bring its schema to this code's head.

        ``create`` false, for what adds no record (reads; rm, gc, push of records that must exist): an SQLite file
        that does not exist is an error naming it (a mistyped --db), not a new empty registry — except the home's
        own registry.db, which any command creates on first use. ``blobs``: the folder of its stored adapters, in
        place of $LORAOPS_BLOBS (settings.registry_blobs_dir); a server registry needs one of them."""
        if url is not None and not isinstance(url, str):  # (a Path was a raw AttributeError)
            raise InvalidInputError(f"Registry.open takes a database URL (sqlite:////path/registry.db, "
                                    f"postgresql+psycopg://…), not {url!r}")
        blobs = argument(blobs, "blobs", *PATH, type(None))
        registry = None
        try:
            with interrupts_deferred():
                registry = cls._open(url, create, blobs)
        except BaseException:  # the Ctrl-C deferred to the block's end: raised with a registry no caller gets
            if registry is not None:
                registry.close()
            raise
        return registry

    @classmethod
    def _open(cls, url: str | None, create: bool, blobs: str | os.PathLike | None = None) -> "Registry":
        url = url or settings.db_url()
        stores = cls._stores(url, blobs)  # (refuses a server registry without a shared store before connecting)
        must_exist = not create and url != settings.home_db_url()
        engine = db.make_engine(url, create=not must_exist)
        if must_exist:
            db.refuse_missing(engine)
        try:
            db.refuse_foreign(engine)
        except BaseException:
            engine.dispose()
            raise
        first = None
        if not db.unwritable(engine):
            try:
                db.ensure_schema(engine)
                return cls(engine, *stores, False)
            except RegistryError as exc:
                # a registry in a folder we may not write: readable, if its schema needs nothing
                if not any(s in str(exc) for s in ("unable to open database file", "readonly database")):
                    raise
                first = exc
        fallback = db.read_only_fallback(engine)
        if fallback is None:  # (unwritable() saw the file, which a race may have removed since)
            raise first or RegistryError(f"cannot open the registry at {db.sqlite_file(engine)}")
        engine.dispose()
        try:
            db.ensure_schema(fallback)
        except RegistryError:
            fallback.dispose()
            if first is None:
                raise
            raise first from None
        return cls(fallback, *stores, True)

    @staticmethod
    def _stores(url: str, blobs: str | os.PathLike | None = None) -> "tuple[BlobStore, BlobStore | None]":
        """The registry's blob store, and the one loraops used for it before (settings.earlier_blobs_dir)."""
        own = settings.registry_blobs_dir(url, blobs)
        before = settings.earlier_blobs_dir(url, own)
        return BlobStore(own), (BlobStore(before) if before is not None else None)

    def close(self) -> None:
        """Close the registry's database connections (what leaving a ``with Registry.open()`` block does)."""
        self.engine.dispose()

    def refuse_output_inside(self, output: str | Path) -> None:
        """An output over the registry's own files (its blob store, its database: see BlobStore.refuse_output_inside),
        or over what a record describes (reads.refuse_output_over_registered)."""
        self.blobs.refuse_output_inside(output, db.sqlite_file(self.engine))
        with self.reader() as found:
            reads.refuse_output_over_registered(output, found)

    def refuse_writes(self, hint: str = "") -> None:
        """Raise, before anything is copied or computed, when this registry is read-only here."""
        if self.read_only:  # (only an SQLite file is opened read-only)
            raise RegistryError(f"{db.read_only_here(db.sqlite_file(self.engine))}: nothing can be recorded{hint}")

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    @flags_checked
    def session(self, write: bool = False) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back when it raises. A write's ``(told, result)``
        in ``session.info[TOLD]`` (see write) is called once it committed, a Ctrl-C deferred across both: one that
        landed as the commit returned said "nothing was written" of a change committed."""
        if write:
            self.refuse_writes()
        engine = db.writer(self.engine) if write else self.engine
        with db.writer_lock(self.engine) if write else contextlib.nullcontext(), \
                Session(engine, expire_on_commit=False, autoflush=False) as session:
            try:
                yield session
                with interrupts_deferred() if write else contextlib.nullcontext():
                    session.commit()
                    told, result = session.info.get(TOLD, (None, None))
                    if told is not None and (line := told(result)) is not None:
                        tell(line)
            except BaseException:
                session.rollback()
                raise

    def write(self, what: str, work: Callable[[Session], T], told: Callable[[T], str | None] | None = None) -> T:
        """Run ``work`` in one write transaction; when it loses a race with another writer (see retryable) run it
        again in a fresh transaction after a short random back-off. LoraopsErrors from ``work`` pass through; any
        other database error becomes one RegistryError line naming ``what``. ``told``: called with what ``work``
        returned once its transaction committed, before a Ctrl-C can land; the line it returns ("interrupted after
        …"; None: none) is what an interruption from then on says (landing.tell)."""
        for attempt in range(RETRIES):
            try:
                with self.session(write=True) as s:
                    done = work(s)
                    s.info[TOLD] = told, done
                    return done
            except DBAPIError as exc:
                if not retryable(exc):
                    raise RegistryError(f"could not {what}: {_first_line(exc.orig or exc)}") from None
            except UnicodeEncodeError as exc:  # text from a path whose name is not UTF-8 (a source, a base hint)
                raise InvalidInputError(f"could not {what}: it holds text that is not UTF-8 "
                                        f"({exc.object[max(0, exc.start - 40):exc.end + 40]!r}), which the registry "
                                        "cannot record (a path with other bytes in its name? rename it)") from None
            time.sleep(random.uniform(0, min(1.0, RETRY_BACKOFF_S * 2 ** attempt)))
        raise RegistryError(f"could not {what}: the registry kept changing under it ({RETRIES} tries; concurrent writers?)")

    def revision(self) -> str | None:
        """The database's schema revision (Alembic's), None when it records none."""
        with self.engine.connect() as connection:
            return db.current_revision(connection)

    @contextlib.contextmanager
    def reader(self) -> Iterator[reads.Reader]:
        """The registry's read queries (reads.Reader) in one read transaction."""
        with self.session() as s:
            yield self._reader(s)

    def _reader(self, s: Session) -> reads.Reader:
        s.flush()  # what this transaction changed is then visible to plain SQL on its connection
        connection = s.connection()
        return reads.Reader(lambda sql, params: connection.exec_driver_sql(sql, params).all(),
                            self.engine.dialect.dbapi.paramstyle, self.blobs, self.earlier)

    # ---------------------------------------------------------------- bases

    @flags_checked
    def add_base(self, path: str | Path, *, name: str | None = None, source: str | None = None,
                 lineage: LineageSpec | None = None, progress: bool | None = None) -> BaseRecord:
        """See register_base (this returns only the record)."""
        return self.register_base(path, name=name, source=source, lineage=lineage, progress=progress)[0]

    @flags_checked
    def register_base(self, path: str | Path, *, name: str | None = None, source: str | None = None,
                      lineage: LineageSpec | None = None, progress: bool | None = None,
                      told: Callable[[tuple[BaseRecord, bool]], str | None] | None = None) -> tuple[BaseRecord, bool]:
        """Record the base model at ``path`` (its manifest and fingerprint; the files stay where they are).

        The same tensors added again (by fingerprint) return the existing record, whatever the name; its path is
        updated when the old one is gone. A name used by another model is refused. ``lineage`` marks a derived
        base (a merge) and says how it was made. Returns (record, whether it is new). ``told``: see write; where it
        says nothing of a record that moved to ``path``, the move is told."""
        from ..basemodel import AdapterAsBase, BaseModel

        self.refuse_writes()
        path = argument(path, "path", *PATH)
        refuse_unrecordable(resolved(path))
        try:
            model = BaseModel.open(path)
        except AdapterAsBase as exc:
            raise InvalidInputError(f"{exc}; register it with `loraops register {path}`") from None
        for tensor in {info.file: name for name, info in model.tensors.items()}.values():
            model.config(tensor)  # (a config.json every command that reads it refuses is refused here too)
        fingerprint = model.fingerprint(progress=progress)
        name = check_name(default_name(Path(path)) if name is None else name, "base")
        where = str(resolved(path))
        moved: list[str] = []  # where its files were recorded, when they were gone from there

        def work(s: Session) -> tuple[BaseRecord, bool]:
            moved.clear()
            existing = s.scalar(select(SqlBase).where(SqlBase.fingerprint == fingerprint))
            if existing is not None:
                if existing.path != where and not Path(existing.path or "").exists():
                    moved.append(existing.path)
                    existing.path = where
                return self._base_record(s, existing), False
            taken = s.scalar(select(SqlBase).where(SqlBase.name == name))
            if taken is not None:
                raise ConflictError(
                    f"base name {name!r} is already used by another model (fingerprint {taken.fingerprint[:12]}); "
                    "choose another `name`", ["name"]
                )
            row = SqlBase(
                name=name, fingerprint=fingerprint, source=source or where, path=where,
                num_tensors=len(model.tensors), num_parameters=model.num_parameters, dtype=model.dtype,
                total_bytes=model.total_bytes, derived=lineage is not None,
                lineage=self._lineage(s, lineage),
            )
            s.add(row)
            s.flush()
            s.execute(insert(SqlBaseTensor), [
                {"base_id": row.id, "name": t, "dtype": info.dtype, "shape": list(info.shape)}
                for t, info in model.tensors.items()
            ])
            return self._base_record(s, row), True

        def said(done: tuple[BaseRecord, bool]) -> str | None:  # (a record moved is a change: "nothing was written")
            line = told(done)
            return line if line is not None or not moved else (
                f"interrupted after base {done[0].name} was recorded at {where} (its files were no longer at {moved[0]})")

        # (told only for a caller that tells: a merge recording its output says what landed itself, landing.Landing)
        done = self.write(f"record base {name!r}", work, None if told is None else said)
        if moved:  # (said: "already registered" alone hid that the record now points elsewhere)
            logging.getLogger("loraops").info(f"base {done[0].name}: its files were no longer at {moved[0]}; "
                                              f"recorded at {where} now")
        return done

    def register_manifest_base(self, *, name: str, source: str, tensors: dict[str, tuple[str, tuple[int, ...]]],
                               dtype: str, total_bytes: int,
                               told: Callable[[tuple[BaseRecord, bool]], str | None] | None = None,
                               ) -> tuple[BaseRecord, bool]:
        """Record a base known only by its manifest (name → (dtype, shape), read remotely: loraops.hub reads it from
        the safetensors headers on the Hub). It has no files yet (path None) and its fingerprint is a placeholder,
        sha256 over the source and the manifest, until attach_base_files gives it its files. The same source again
        returns the existing record. Returns (record, whether it is new). ``told``: see write."""
        import json

        name = check_name(name, "base")
        manifest = sorted((t, dtype_, list(shape)) for t, (dtype_, shape) in tensors.items())
        placeholder = hashlib.sha256(json.dumps(["manifest-only", source, manifest]).encode()).hexdigest()

        def work(s: Session) -> tuple[BaseRecord, bool]:
            existing = s.scalar(select(SqlBase).where(SqlBase.source == source))
            if existing is not None:
                return self._base_record(s, existing), False
            taken = s.scalar(select(SqlBase).where(SqlBase.name == name))
            if taken is not None:
                raise ConflictError(f"base name {name!r} is already used by another model "
                                    f"(fingerprint {taken.fingerprint[:12]}); choose another `name`", ["name"])
            row = SqlBase(name=name, fingerprint=placeholder, source=source, path=None,
                          num_tensors=len(manifest), num_parameters=model_parameters(tensors),
                          dtype=dtype, total_bytes=total_bytes, derived=False)
            s.add(row)
            s.flush()
            s.execute(insert(SqlBaseTensor), [
                {"base_id": row.id, "name": t, "dtype": d, "shape": sh} for t, d, sh in manifest])
            return self._base_record(s, row), True

        return self.write(f"record base {name!r}", work, told)

    @flags_checked
    def attach_base_files(self, ref: str | int, path: str | Path, progress: bool | None = None) -> BaseRecord:
        """Give a base its files (e.g. a manifest-only base once downloaded): the manifest must be the recorded one;
        the record gets the path and the real fingerprint."""
        from ..basemodel import BaseModel

        model = BaseModel.open(path)
        with self.session() as s:
            row = self._find_base(s, ref)
            recorded, name, base_id = self._manifest(s, row.id), row.name, row.id
        found = {t: (i.dtype, tuple(i.shape)) for t, i in model.tensors.items()}
        if found != {t: (r.dtype, tuple(r.shape)) for t, r in recorded.items()}:
            raise MismatchError(f"{path}: its tensors are not those recorded for base {name!r}")
        fingerprint = model.fingerprint(progress=progress)

        def work(s: Session) -> BaseRecord:
            twin = s.scalar(select(SqlBase).where(SqlBase.fingerprint == fingerprint, SqlBase.id != base_id))
            if twin is not None:
                raise ConflictError(f"base {name!r}: the files at {path} are already registered as base {twin.name!r}")
            row = s.get(SqlBase, base_id)
            if row is None:
                raise NotFoundError(f"base {name!r} was removed meanwhile")
            row.fingerprint, row.path, row.total_bytes = fingerprint, str(resolved(path)), model.total_bytes
            return self._base_record(s, row)

        return self.write(f"attach files to base {name!r}", work)

    def get_base(self, ref: str | int) -> BaseRecord:
        """The base named, or with that id or fingerprint prefix; NotFoundError (AmbiguousError) otherwise."""
        with self.reader() as r:
            return r.get_base(ref)

    def list_bases(self) -> list[BaseRecord]:
        """Every registered base, by name."""
        with self.reader() as r:
            return r.list_bases()

    def base_manifest(self, ref: str | int) -> dict[str, TensorRecord]:
        """Tensor name → (name, dtype, shape) of a registered base (what loraops.check accepts as a manifest)."""
        with self.session() as s:
            return self._manifest(s, self._find_base(s, ref).id)

    def base_path(self, ref: str | int, *, token: str | None = None) -> Path:
        """Where the base's files are on disk (refused when they are gone). A base recorded from the Hub without
        its files (source hf://repo@commit) is downloaded into the Hub cache and attached here, on first use, with
        ``token``, else HF_TOKEN's or the saved login's: the token given to `base add hub: --token` is not kept."""
        base = self.get_base(ref)
        if _downloads(base):
            from .. import hub

            try:
                files = hub.download_base(base.source, token=token)
            except LoraopsError as exc:  # (no --token where this runs: a merge)
                if token is not None:
                    raise
                raise reworded(exc, hub.LOGIN, f"set HF_TOKEN or log in with `hf auth login`: base {base.name}'s "
                               "weights download on first use, and the token given to `base add --token` was not "
                               "kept") from None
            try:
                return Path(self.attach_base_files(base.id, files).path)
            except ConflictError:  # the same weights are registered as another base too: these files serve as they are
                return Path(files)
        if not base.path or not Path(base.path).exists():
            raise NotFoundError(f"base {base.name!r}: its files are no longer at {base.path}; `loraops base add` them again")
        return Path(base.path)

    def base_is_single_file(self, ref: str | int) -> bool | None:
        """Whether base_path gives one file (True) or a folder (False), known from the record alone: nothing is read
        or downloaded (a base from the Hub comes down as its snapshot folder). None when its files are gone."""
        base = self.get_base(ref)
        if _downloads(base):
            return False
        return Path(base.path).is_file() if base.path and Path(base.path).exists() else None

    def find_base(self, fingerprint: str) -> BaseRecord | None:
        """The registered base with exactly this fingerprint, if any (e.g. the pristine base of a merged model)."""
        with self.reader() as r:
            return r.find_base(fingerprint)

    @flags_checked
    def remove_base(self, ref: str | int, *, force: bool = False,
                    told: Callable[[BaseRecord], str | None] | None = None) -> BaseRecord:
        """Remove a base record (a derived base's lineage with it). Refused while adapters or lineage refer to it,
        unless ``force`` (they then keep their records with no base link). ``told``: see write."""

        def work(s: Session) -> BaseRecord:
            row = self._find_base(s, ref)
            users = s.scalars(select(SqlAdapter).where(SqlAdapter.base_id == row.id).order_by(SqlAdapter.id)).all()
            inputs = s.scalar(select(func.count()).where(SqlLineageInput.base_id == row.id))
            if (users or inputs) and not force:
                parts = []
                if users:
                    parts.append(f"{len(users)} adapter(s) ({reads.shown(f'{a.name}@{a.version}' for a in users)})")
                if inputs:
                    parts.append(f"{inputs} lineage record(s)")
                raise ConflictError(
                    f"base {row.name!r} is still used by {' and '.join(parts)}; use `force=True` to remove it anyway",
                    ["force"]
                )
            record = self._base_record(s, row)
            s.execute(update(SqlAdapter).where(SqlAdapter.base_id == row.id).values(base_id=None))
            s.execute(update(SqlLineageInput).where(SqlLineageInput.base_id == row.id).values(base_id=None))
            s.execute(delete(SqlBaseTensor).where(SqlBaseTensor.base_id == row.id))
            s.delete(row)
            self._drop_lineage(s, [row.lineage_id])
            return record

        return self.write(f"remove base {ref!r}", work, told)

    # ---------------------------------------------------------------- adapters

    @flags_checked
    def add_adapter(self, path: str | Path, *, name: str | None = None, base: str | int | None = None,
                    tags: Iterable[str] = (), alpha: float | None = None, source: str | None = None,
                    lineage: LineageSpec | None = None, progress: bool | None = None) -> AdapterRecord:
        """See register_adapter (this returns only the record)."""
        return self.register_adapter(path, name=name, base=base, tags=tags, alpha=alpha, source=source,
                                     lineage=lineage, progress=progress)[0]

    @flags_checked
    def register_adapter(self, path: str | Path, *, name: str | None = None, base: str | int | None = None,
                         tags: Iterable[str] = (), alpha: float | None = None, source: str | None = None,
                         lineage: LineageSpec | None = None, progress: bool | None = None,
                         scratch: bool = False, written: "formats.Written | None" = None,
                         told: Callable[[Registration], str | None] | None = None) -> Registration:
        """Register the adapter at ``path`` (any supported layout), copying its files into the blob store
        (``scratch``: loraops wrote them into ``blobs.scratch()``, and they are moved there instead).

        ``written``: what formats.write returned for ``path`` in this process: its hashes stand for the files' bytes,
        and when it wrote values loraops computed and checked as it did (loraops.algebra's, ``written.checked``) the
        values are not read again (a 70B derived adapter is 1.6 GB or more, and each pass over it seconds).

        The same name with another identity becomes the next version. ``base``: a registered base the adapter must
        fit; without it, PEFT's base_model_name_or_path is matched to a registered base's name or source (linked
        only if the adapter fits it). ``alpha`` replaces/supplies the LoRA alpha and is part of the identity.

        Identical identity registered again returns the existing record, keeping its name@version whatever
        ``name`` says (one record per adapter), with new ``tags`` added; an explicit ``base`` links it to that
        base after the same fit check, in the same transaction (re-links it when it had another: ``linked``,
        ``previous_base``), so an adapter registered before its base can be linked later.

        ``told``: called with the Registration once it committed (Registry.write): the line an interruption then
        says (landing.registered)."""
        from .. import formats

        path = existing_path(argument(path, "path", *PATH))
        if written is not None and resolved(written.path) != resolved(path):
            raise InvalidInputError(f"{path}: not what was written ({written.path}), so its hashes are not this "
                                    "adapter's; register it without `written`")
        formats.common.given_alpha(alpha, path)
        refuse_unrecordable(source or resolved(path))
        tags = clean_tags(tags)  # what the arguments alone refuse, before the adapter is read or hashed
        formats.read_adapter(path, alpha=alpha, values=False)  # headers only: what is no adapter is refused unhashed
        files = formats.adapter_files(path)
        known = {} if written is None else written.sha256
        weights_sha256 = known.get(files[0].name)
        # shapes and alphas are all a record needs: the values are only checked, block by block (a 70B rank-64
        # adapter would otherwise sit in memory whole, 1.6 GB, while it is hashed and copied), and read where a base
        # is checked and the file saves whole tensors, for that fit alone (_bind_base). Checked apart from that read:
        # it keeps what it reads whole, and leaves wrapper state (original_module, PEFT's second modules_to_save copy)
        # unchecked, which check_values covers as every tensor of the file. The weights are hashed in the same read
        # (one pass, not two), so the identity is of the bytes checked; what is read below was read after, and the
        # stored copy must hash the same (see _store_and_insert): a file changed at any point after that read is
        # refused rather than stored unchecked.
        if written is None or not written.checked:
            digest = formats.check_values(path, hash_weights=weights_sha256 is None)
            weights_sha256 = weights_sha256 or digest
        identity = adapter_identity(path, alpha, weights_sha256)
        adapter = formats.read_adapter(path, alpha=alpha, values=False)
        name = check_name(default_name(path) if name is None else name, "adapter")

        adapter, base_id = self._bind_base(adapter, base,
                                           lambda: formats.read_for_fit(path, alpha=alpha, headers=adapter))
        self.refuse_writes()  # before the copy into the store
        key = self.blobs.key(identity, None if path.is_dir() else path.name)
        # Under the shard lock: a concurrent `rm` of the same bytes cannot delete the blob between put and insert.
        with self.blobs.lock(identity):
            with self.session() as s:
                row = s.scalar(select(SqlAdapter).where(SqlAdapter.sha256 == identity))
                existing = None if row is None else (row.id, row.blob, row.files)
            if existing is not None:
                self._repair(identity, existing[1], existing[2], files)
                return self._update(existing[0], tags, adapter, base_id if base is not None else None, told)
            return self._store_and_insert(path, name, identity, key, files, adapter, base_id, alpha, source, tags,
                                          lineage, progress, scratch, known, told)

    def _store_and_insert(self, path: Path, name: str, identity: str, key: str, files: list[Path], adapter: "Adapter",
                          base_id: int | None, alpha: float | None, source: str | None, tags: list[str],
                          lineage: LineageSpec | None, progress: bool | None, scratch: bool,
                          known: dict[str, str], told: Callable[[Registration], str | None] | None) -> Registration:
        bar = settings.progress_bar(sum(f.stat().st_size for f in files), f"store {path.name}", progress)
        try:
            try:
                stored = self.blobs.put(identity, files, bar, move=scratch, known=known)
            finally:
                bar.close()
            weights = files[0].name  # adapter_files lists the weights file first
            weights_sha256 = next(f.sha256 for f in stored if f.name == weights)
            try:
                unchanged = adapter_identity(self.blobs.path(key), alpha, weights_sha256) == identity
            except FormatError:  # e.g. truncated between the hashing and the copy
                unchanged = False
            if not unchanged:
                raise ConflictError(f"{path}: its files changed while they were being registered; register it again")
            fields = dict(
                sha256=identity, weights_sha256=weights_sha256,
                format=adapter.format, dtype=dtype_name(adapter.dtype),
                size=sum(f.size for f in stored), num_parameters=adapter.num_parameters, rank=adapter.rank,
                alpha=adapter.alpha, alpha_override=alpha, scale_mode=adapter.scale_mode,
                target_modules=adapter.target_modules, dora=adapter.dora,
                token_rows=token_counts(adapter), base_id=base_id, base_hint=adapter.base_model,
                source=source or str(resolved(path)), blob=key, files=[f.as_dict() for f in stored],
            )
            return self._insert_adapter(name, fields, adapter, tags, lineage, told)
        except BaseException:
            # Nothing half-done: the copied blob goes unless a record (e.g. a concurrent twin) now uses it.
            self._drop_blob_if_unused(key)
            raise

    def _drop_blob_if_unused(self, key: str) -> None:
        """Remove a stored adapter's folder when no record uses it. Call with self.blobs.lock(key) held."""
        if not self._blob_used(key):
            self.blobs.remove(key)

    def _insert_adapter(self, name: str, fields: dict, adapter: "Adapter", tags: list[str],
                        lineage: LineageSpec | None, told: Callable[[Registration], str | None] | None) -> Registration:

        def work(s: Session) -> Registration:
            existing = s.scalar(select(SqlAdapter).where(SqlAdapter.sha256 == fields["sha256"]))
            if existing is not None:  # registered meanwhile by someone else
                return self._registered_again(s, existing, tags, adapter, fields["base_id"])
            version = self._next_version(s, name)
            row = SqlAdapter(name=name, version=version, lineage=self._lineage(s, lineage), **fields)
            row.tags = [SqlTag(tag=t) for t in tags]
            s.add(row)
            s.flush()
            _insert_modules(s, row.id, adapter)
            return Registration(self._adapter_record(s, row), True)

        return self.write(f"register {name!r}", work, told)

    def _next_version(self, s: Session, name: str) -> int:
        """Versions count up per name and are never reused (a removed name@2 stays gone). One atomic UPDATE …
        RETURNING: concurrent writers of one name queue on its row instead of reading the same number; two first
        versions of a new name collide on its primary key and the loser runs again (Registry.write)."""
        version = s.execute(
            update(SqlAdapterName).where(SqlAdapterName.name == name)
            .values(last_version=SqlAdapterName.last_version + 1).returning(SqlAdapterName.last_version)
            .execution_options(synchronize_session=False)
        ).scalar()
        if version is None:
            s.add(SqlAdapterName(name=name, last_version=1))
            s.flush()
            version = 1
        return version

    def _bind_base(self, adapter: "Adapter", base: str | int | None,
                   for_fit: Callable[[], "Adapter"]) -> tuple["Adapter", int | None]:
        """(the adapter bound to its base, the base id) — see add_adapter. ``adapter``: read headers only, all the
        record needs; ``for_fit``: the adapter with the values a fit needs (formats.read_for_fit: ``adapter`` itself
        where it needs none), read only where a base is checked and dropped once the fit is decided. The names the
        fit resolves bind ``adapter`` (one resolution per base checked)."""
        from .. import check

        with self.session() as s:
            rows = [self._find_base(s, base, "base")] if base is not None else self._hinted_bases(s, adapter.base_model)
            bases = [(row.id, row.name, row.path) for row in rows]
        fit = None
        for base_id, base_name, path in bases:  # each manifest loaded only once the bases before it do not fit
            with self.session() as s:
                manifest = self._manifest(s, base_id)
            fit = for_fit() if fit is None else fit
            if base is not None:
                return check.require_fit(fit, manifest, base_name=base_name, sides=_configs_at(path),
                                         record=adapter), base_id
            report, bind_read = check.fitting(fit, manifest, sides=_configs_at(path))
            if report.ok:
                return bind_read(adapter), base_id
        return adapter, None

    def _hinted_bases(self, s: Session, hint: str | None) -> list[SqlBase]:
        if not hint:
            return []
        clauses = [SqlBase.name == hint, SqlBase.source == hint, SqlBase.source.startswith(f"hf://{hint}@")]
        with contextlib.suppress(OSError, ValueError):
            clauses.append(SqlBase.path == str(resolved(Path(hint).expanduser())))
        return list(s.scalars(select(SqlBase).where(or_(*clauses)).order_by(SqlBase.id)))

    def get_adapter(self, ref: str | int) -> AdapterRecord:
        """The adapter at ``ref`` (name — its latest version —, name@version, id or sha256 prefix of 6+ hex digits);
        NotFoundError (AmbiguousError) otherwise."""
        with self.reader() as r:
            return r.get_adapter(ref)

    @flags_checked
    def list_adapters(self, *, base: str | int | None = None, rank: int | None = None, target: str | None = None,
                      tag: str | None = None, name: str | None = None, modules: bool = True) -> list[AdapterRecord]:
        """Every version of every adapter (by name, then version), filtered in SQL: ``rank`` matches adapters with
        any module of that rank, ``target`` any module whose last path component is that (q_proj, ...)."""
        with self.reader() as r:
            return r.list_adapters(base=base, rank=rank, target=target, tag=tag, name=name, modules=modules)

    def adapter_path(self, ref: str | int) -> Path:
        """The stored copy of the adapter on disk (a file or a PEFT folder inside the blob store)."""
        return Path(self.get_adapter(ref).path)

    @flags_checked
    def load_adapter(self, ref: str | int, *, bind: bool = True) -> "Adapter":
        """The adapter from its stored copy, with its registration alpha, bound to its base when known (``bind``
        False: named as its file names its modules, as formats.read_adapter of the original gives it).

        Its factors are views of the stored file mapped into memory (st.map_file), not copies in the process's
        memory: page cache the kernel can reclaim, so adapters larger than the free memory still merge. Safe because
        the store's files are loraops' own and never rewritten in place; the user's files are read instead (one
        truncated while mapped would kill the process with SIGBUS). The stored bytes are hashed against the record
        first, so what is mapped is exactly what register checked (NaN/Inf included); a file whose stat is as it was
        when it last hashed right is not read again for that (BlobStore.unchanged; `verify` always reads), nor for its
        NaN/Inf check once a load has checked it under that stamp (BlobStore.mark_checked)."""
        from .. import check, formats

        with self.session() as s:
            row = self._find_adapter(s, ref)
            path, alpha, base_id = self.blobs.path(row.blob), row.alpha_override, row.base_id
            manifest = self._manifest(s, base_id) if base_id is not None else None
        self._refuse_damaged(row, stamped=True)
        files = {f["name"]: f["sha256"] for f in row.files}
        held = self.blobs.holding(row.blob, files) if settings.trust_stamps() else {}
        checked = self.blobs.checked(held, files)
        adapter = replace(formats.read_adapter(path, alpha=alpha, mapped=settings.map_stored(), checked=checked),
                          ref=f"{row.name}@{row.version}")
        if held and not checked:
            self.blobs.mark_checked(row.blob, held)
        return check.bind(adapter, manifest) if manifest is not None and bind else adapter

    def module_kernels(self, ref: str | int) -> dict[str, tuple[int, ...]]:
        """The kernel sizes of a registered adapter's convolution modules (reads.Reader.module_kernels)."""
        with self.reader() as r:
            return r.module_kernels(ref)

    def add_tags(self, ref: str | int, tags: Iterable[str]) -> AdapterRecord:
        """Add ``tags`` (a list: one word each, no comma) to the adapter at ``ref``; tags it has already are kept once."""
        with self.session() as s:
            adapter_id = self._find_adapter(s, ref).id
        return self._update(adapter_id, clean_tags(tags)).record

    def _update(self, adapter_id: int, tags: list[str], adapter: "Adapter | None" = None,
                base_id: int | None = None, told: Callable[[Registration], str | None] | None = None) -> Registration:
        """Tag a registered adapter and, with ``base_id``, link it to that base (see _registered_again)."""
        def work(s: Session) -> Registration:
            row = s.get(SqlAdapter, adapter_id)
            if row is None:
                raise NotFoundError(f"adapter id {adapter_id} was removed meanwhile")
            return self._registered_again(s, row, tags, adapter, base_id)

        if not tags and base_id is None:
            with self.session() as s:
                row = s.get(SqlAdapter, adapter_id)
                # nothing to record: answered in a read transaction; else (token rows not recorded yet) a write
                done = work(s) if row is None or adapter is None or row.token_rows is not None else None
            if done is not None:
                if told is not None:
                    told(done)  # (what it says of a change that was none: nothing)
                return done
        return self.write(f"update adapter id {adapter_id}", work, told)

    def _registered_again(self, s: Session, row: SqlAdapter, tags: list[str], adapter: "Adapter | None",
                          base_id: int | None) -> Registration:
        """An adapter registered again: new tags added, and linked to base ``base_id`` when given and it is not
        linked there yet. Its modules are then stored as a fresh registration with that base stores them
        (``adapter`` bound to it: kohya names resolved, Conv1D layouts decided by the base)."""
        linked = base_id is not None and row.base_id != base_id
        previous = self._adapter_record(s, row).base if linked else None
        if linked:
            if s.get(SqlBase, base_id) is None:
                raise NotFoundError(f"base id {base_id} was removed meanwhile")
            _set_base(s, row, base_id, adapter)
        if row.token_rows is None and adapter is not None:  # registered before they were recorded (revision 0005)
            row.token_rows = token_counts(adapter)
        self._tag(s, row, tags)
        return Registration(self._adapter_record(s, row), False, linked, previous)

    def restore_base_link(self, adapter_id: int, base_id: int | None, *, linked_to: int) -> None:
        """Give a registered adapter back the base link it had (``base_id``; None: none) before a failing command
        linked it to base ``linked_to`` (loraops.derive.inputs_of: a refused `combine a.safetensors --base B` left a
        linked to B), its modules recorded as that link records them. Only while it is still linked to
        ``linked_to``: a link another process set meanwhile (`register a.safetensors --base C`) is that one's."""
        from .. import check, formats

        with self.session() as s:
            row = s.get(SqlAdapter, adapter_id)
            if row is None:
                return
            path, alpha = self.blobs.path(row.blob), row.alpha_override
            if base_id is not None and s.get(SqlBase, base_id) is None:
                base_id = None  # removed meanwhile: no link to give back (its empty manifest binds nothing)
            manifest = self._manifest(s, base_id) if base_id is not None else None
        adapter = formats.read_adapter(path, alpha=alpha, values=False)
        adapter = check.bind(adapter, manifest) if manifest is not None else adapter

        def work(s: Session) -> None:
            row = s.get(SqlAdapter, adapter_id, with_for_update=True)
            if row is not None and row.base_id == linked_to:
                _set_base(s, row, base_id if base_id is None or s.get(SqlBase, base_id) is not None else None, adapter)

        self.write(f"restore the base link of adapter id {adapter_id}", work)

    @flags_checked
    def remove_adapter(self, ref: str | int, *, all_versions: bool = False, undo: bool = False) -> list[AdapterRecord]:
        """Remove one adapter version (``name`` alone: the latest), or every version of its name with
        ``all_versions`` (``ref`` then the name itself: a version, id or sha256 prefix is refused). Stored files go
        with the last record using them, its own lineage (how it was made) with it; lineage that used it keeps a
        label. ``undo``: a registration that the failing command which made it takes back
        (loraops.derive.inputs_of): its version number is given back to the name too, unless a later one was given
        meanwhile; else a refused `combine a.safetensors …` made the next real registration a@2. Unless another
        record's lineage used it meanwhile (another process derived from it): then it is that record's input, and
        stays (removed, its number would later name other bytes under that lineage's label); returns []."""

        def work(s: Session) -> tuple[list[AdapterRecord], list[str]]:
            row = self._find_adapter(s, ref)
            if all_versions and str(ref).strip() != row.name:  # (`rm a@2 --all` removed a@1 too)
                raise InvalidInputError(f"{ref!r} names one version ({row.name}@{row.version}), and "
                                        "`all_versions=True` removes every version of a name: give the name "
                                        f"{row.name!r}, or drop `all_versions=True`", ["all_versions"])
            if undo:
                # the row locked first (PostgreSQL): a lineage row being inserted that refers to it is committed
                # before this looks, or waits until the row is gone
                s.execute(select(SqlAdapter.id).where(SqlAdapter.id == row.id).with_for_update())
                used = select(SqlLineageInput.id).where(SqlLineageInput.adapter_id == row.id).limit(1)
                if s.scalar(used) is not None:
                    return [], []
            rows = [row]
            if all_versions:
                rows = list(s.scalars(select(SqlAdapter).where(SqlAdapter.name == row.name).order_by(SqlAdapter.version)))
            ids = [r.id for r in rows]
            records = [self._adapter_record(s, r) for r in rows]  # read back before the rows go
            s.execute(update(SqlLineageInput).where(SqlLineageInput.adapter_id.in_(ids)).values(adapter_id=None))
            for r in rows:
                s.delete(r)
                if undo:
                    s.execute(update(SqlAdapterName).where(SqlAdapterName.name == r.name,
                                                           SqlAdapterName.last_version == r.version)
                              .values(last_version=r.version - 1).execution_options(synchronize_session=False))
            self._drop_lineage(s, [r.lineage_id for r in rows])
            return records, [r.blob for r in rows]

        # (undo is a failing command's taking back: it says what it did itself)
        records, keys = self.write(f"remove {ref!r}", work,
                                   None if undo else lambda done: removed_line(done[0], stored_left=True))
        for key in keys:
            with self.blobs.lock(key):
                self._drop_blob_if_unused(key)
        if records and not undo:
            tell(removed_line(records))
        return records

    # ---------------------------------------------------------------- checks and maintenance

    @flags_checked
    def check_adapter(self, ref_or_path: str | Path, base: str | Path | None = None, *,
                      alpha: float | None = None, transformer_2: bool = False) -> CheckResult:
        """How an adapter (a registry reference, or a path on disk when one exists) fits a base.

        ``base``: a registered base reference or a base model path. Without it: the adapter's recorded base; when
        there is none, one report per registered base (``fits`` names those it fits). ``transformer_2``: against the
        second transformer of ``base``, a Wan 2.2 pipeline (check.SECOND_TRANSFORMER), as merge's ``transformer_2``
        adapters bind.
        """
        from .. import check, formats
        from ..basemodel import BaseModel

        ref_or_path, base = argument(ref_or_path, "ref_or_path", *PATH), argument(base, "base", *PATH, type(None))
        formats.common.given_alpha(alpha, ref_or_path)
        if transformer_2 and base is None:
            raise ParameterError("`transformer_2=True` checks against a Wan 2.2 pipeline's second transformer: give "
                                 "that pipeline as `base`", ["transformer_2", "base"])
        component = check.SECOND_TRANSFORMER if transformer_2 else None

        def fit() -> CheckResult:
            if path_exists(ref_or_path):
                adapter, label, base_id = formats.read_for_fit(ref_or_path, alpha=alpha), str(ref_or_path), None
            else:
                with self.session() as s:
                    row = self._find_adapter(s, ref_or_path)
                    label, base_id = f"{row.name}@{row.version}", row.base_id
                    blob, override = row.blob, row.alpha_override
                if alpha is not None:  # (it was silently left unused)
                    raise InvalidInputError(f"{label}: `alpha` applies to an adapter given by path; a registered "
                                            "adapter is read with the alpha it was registered with (register it "
                                            "again with `alpha` to change that)", ["alpha"])
                self._refuse_damaged(row, contents=False)  # headers only: not hashed
                try:
                    adapter = formats.read_for_fit(self.blobs.path(blob), alpha=override, mapped=True)
                except FormatError:  # (register read it: a stored copy changed since says so, as a load does)
                    self._refuse_damaged(row)
                    raise
            if base is not None and path_exists(base):
                return CheckResult.of(label, [_check_files(adapter, BaseModel.open(base), str(base), component)],
                                      adapter.base_model)
            with self.session() as s:
                if base is not None:
                    rows = [self._find_base(s, base, "base")]
                elif base_id is not None:
                    rows = [s.get(SqlBase, base_id)]
                else:
                    # (reads.by_name: not the collation)
                    rows = sorted(s.scalars(select(SqlBase)), key=lambda r: r.name)
                manifests = [(r.name, self._manifest(s, r.id), r.path) for r in rows]
            reports = []
            for name, manifest, path in manifests:
                model = _files_at(path)
                reports.append(check.check(adapter, manifest, base_name=name, component=component) if model is None
                               else _check_files(adapter, model, name, component))
            return CheckResult.of(label, reports, adapter.base_model)

        return without_torch(fit)  # headers and records: torch only where the adapter's values are needed

    @flags_checked
    def verify(self, progress: bool | None = None) -> list[StoredFileProblem]:
        """Re-hash every stored file against its record; return what is missing or changed, and what a stored
        adapter's folder holds besides its recorded files (UNRECORDED). The trainable tokens of an adapter registered
        before they were recorded (revision 0005) are read from its intact stored copy and recorded."""
        from .. import formats

        with self.session() as s:
            rows = [(r.id, f"{r.name}@{r.version}", r.sha256, r.blob, r.files, r.token_rows is None, r.alpha_override,
                     r.source)
                    for r in s.scalars(select(SqlAdapter).order_by(SqlAdapter.id))]
        recorded: dict[str, set[str]] = {}  # stored folder → the files its records hold
        for *_, key, files, _, _, _ in rows:
            recorded.setdefault(folder_of(key), set()).update(f["name"] for f in files)
        total = sum(f["size"] for *_, files, _, _, _ in rows for f in files)
        bar = settings.progress_bar(total, "verify", progress)
        problems, tokens = [], {}
        try:
            for adapter_id, label, identity, key, files, unknown, alpha, source in rows:
                found = self._stored_problems(key, files, bar)
                if found and self._recover(identity, key, files):
                    found = self._stored_problems(key, files)
                problems += [StoredFileProblem(ref=label, file=path, problem=problem, pull_again=_pull_again(source))
                             for path, problem in found]
                if folder_of(key) in recorded:  # (once for a folder of several records)
                    problems += [StoredFileProblem(ref=label, file=str(path), problem=UNRECORDED)
                                 for path in self.blobs.unrecorded(key, recorded.pop(folder_of(key)))]
                if unknown and not found:  # headers and config only: the counts, not the values
                    try:
                        adapter = formats.read_adapter(self.blobs.path(key), alpha=alpha, values=False)
                    except LoraopsError:  # intact but refused by this version's reader: left unrecorded, not verify's
                        continue          # business (its bytes are what was registered)
                    tokens[adapter_id] = token_counts(adapter)
        finally:
            bar.close()
        if tokens and not self.read_only:
            def work(s: Session) -> None:
                for adapter_id, counts in tokens.items():
                    if (row := s.get(SqlAdapter, adapter_id)) is not None and row.token_rows is None:
                        row.token_rows = counts

            self.write("record trainable tokens", work)
        return problems

    def intact_path(self, ref: str | int) -> Path:
        """The stored copy of a registered adapter, refused when a file of it is missing or no longer its recorded
        bytes (push uploaded a damaged copy as it was); a file whose stat is as it was when it last hashed right is not
        read again for that (BlobStore.unchanged, as for a load)."""
        with self.session() as s:
            row = self._find_adapter(s, ref)
        self._refuse_damaged(row, stamped=True)
        return self.blobs.path(row.blob)

    def _refuse_damaged(self, row: SqlAdapter, contents: bool = True, stamped: bool = False) -> None:
        """One RegistryError line when a stored file of ``row`` is missing or changed (``contents`` False: missing
        or of another size, known without reading it; ``stamped``: a file whose stat is as it was when it last hashed
        to its recorded sha256 is not read again, see BlobStore.unchanged)."""
        problems = self._stored_problems(row.blob, row.files, contents=contents, stamped=stamped)
        if problems and self._recover(row.sha256, row.blob, row.files):
            problems = self._stored_problems(row.blob, row.files, contents=contents, stamped=stamped)
        if not problems:
            self._refuse_unrecorded_reads(row)
        if problems:
            where, what = problems[0]
            state = what if what == "missing" else f"changed ({what})"
            again = _pull_again(row.source)
            repair = f"`{again}` downloads it again" if again else "`loraops register` its original again"
            raise RegistryError(f"adapter {row.name}@{row.version}: its stored copy {where} is {state}, so it is not "
                                f"used; {repair} to repair it (`loraops verify` checks all)")

    def _refuse_unrecorded_reads(self, row: SqlAdapter) -> None:
        """One RegistryError line when reading the stored copy of ``row`` would take a file no record holds: an
        adapter_config.json put beside a one-file PEFT adapter's weights is read with them (its alpha, rsLoRA …),
        and the load gave other deltas than the ones registered."""
        from .. import formats

        path = self.blobs.path(row.blob)
        if not path.is_file():  # (a stored folder's files are all recorded: a PEFT folder's two, a diffusers one's)
            return
        recorded = {f["name"] for f in row.files}
        stray = [f.name for f in formats.adapter_files(path) if f.name not in recorded]
        if stray:
            raise RegistryError(f"adapter {row.name}@{row.version}: its stored folder {path.parent} holds "
                                f"{', '.join(stray)}, which no record holds and which reading it would take with its "
                                "weights, so it is not used; remove it (`loraops verify` lists what no record holds)")

    def _recover(self, identity: str, key: str, files: list[dict]) -> bool:
        """Copy a stored adapter that is not in this registry's store from the store loraops kept it in before
        (Registry.earlier), when it is there byte for byte: an adapter registered through Registry.open(url) by an
        older loraops is still found. False when it is not there (or not intact)."""
        if self.earlier is None or self.read_only:
            return False
        sources = [self.earlier.root / folder_of(key) / f["name"] for f in files]
        if not all(p.is_file() for p in sources):
            return False
        with self.blobs.lock(identity):
            try:
                self._repair(identity, key, files, sources)
            except (ConflictError, FileNotFoundError):  # (not byte for byte there; or gone meanwhile: the home's gc)
                return False
        return True

    def _stored_problems(self, key: str, files: list[dict], progress=None, contents: bool = True,
                         stamped: bool = False) -> list[tuple[str, str]]:
        """(path, what is wrong) for each stored file of a record that is missing or no longer its recorded bytes
        (``contents`` False: only its size is compared; ``stamped``: see _refuse_damaged)."""
        folder = self.blobs.root / folder_of(key)
        problems = []
        for f in files:
            path = folder / f["name"]
            if not path.is_file():
                problems.append((str(path), "missing"))
                continue
            if not contents:
                if path.stat().st_size != f["size"]:
                    problems.append((str(path), f"{path.stat().st_size:,} bytes ≠ recorded {f['size']:,}"))
                continue
            if stamped and settings.trust_stamps() and self.blobs.unchanged(key, f["name"], f["sha256"]):
                continue
            actual, remember = (self.blobs.hash(key, f["name"]) if stamped
                                else (sha256_file(path, progress=progress), None))
            if actual != f["sha256"]:
                problems.append((str(path), f"sha256 {actual[:12]}… ≠ recorded {f['sha256'][:12]}…"))
                self.blobs.forget(key)  # (loads went by its stamp; they hash it, and refuse it, from now on)
            elif remember is not None:
                remember()
        return problems

    def _repair(self, identity: str, key: str, recorded: list[dict], sources: list[Path]) -> None:
        """Registering an adapter again repairs its stored copy when that went missing or changed (what `verify`
        advises), from sources whose bytes are exactly the recorded ones. Call with the shard lock held."""
        if not self._stored_problems(key, recorded):
            return
        self.refuse_writes()
        # Copied into scratch and compared as hashed while copying, then renamed in: hashing the sources first and
        # copying them after let a source rewritten in between land in the store as other bytes than the record's.
        with self.blobs.scratch() as tmp:
            staging = BlobStore(tmp)
            copied = {f.name: f.sha256 for f in staging.put(identity, sources)}
            if copied != {f["name"]: f["sha256"] for f in recorded}:
                raise ConflictError(f"the stored copy of this adapter is damaged and {sources[0]} is not byte for "
                                    "byte what was registered, so it cannot repair it; `loraops rm` the record and "
                                    "register again")
            self.blobs.put(identity, [staging.folder(identity) / name for name in copied], move=True, known=copied)

    @flags_checked
    def gc(self, *, grace_s: float = 3600, dry_run: bool = False) -> list[tuple[Path, int]]:
        """Remove stored adapter folders no record uses, temp files of interrupted copies, stamps whose folder is
        gone (BlobStore.stray_stamps) and empty stamp folders; returns each with its size in bytes. Anything younger
        than ``grace_s`` is kept: it may belong to a registration in progress. The shard folders this empties go too
        (under the shard's lock, see BlobStore.prune). A file a stored folder holds besides its recorded ones is no
        leftover of loraops' (put there by hand): kept, and reported by verify."""
        refuse_bad_grace(grace_s)
        with self.session() as s:
            used = {folder_of(key) for key in s.scalars(select(SqlAdapter.blob))}
        cutoff = time.time() - grace_s
        root = self.blobs.root
        unused = [f for f in self.blobs.folders() if str(f.relative_to(root).as_posix()) not in used]
        removed = []

        def told() -> None:  # each item once it is gone: a Ctrl-C midway said "nothing was written"
            tell(f"interrupted after {len(removed)} item(s) were removed")
        for path in [*unused, *self.blobs.temp_files()]:
            key = path.relative_to(root).as_posix()
            with self.blobs.lock(key):
                # Re-checked under the lock: a registration of the same bytes may have started using it since.
                if not path.exists() or path.stat().st_mtime > cutoff or (path in unused and self._blob_used(key)) \
                        or self.blobs.in_use(path) or (path not in unused and self._recorded_file(path)):
                    continue
                removed.append((path, _size(path)))
                if dry_run:
                    continue
                if path in unused:
                    self.blobs.remove(key)  # (with its stamps)
                else:
                    remove(path)
                    self.blobs.prune(path)
                told()
        for path in self.blobs.stray_stamps():
            with self.blobs.lock(path.parent.name):
                if not path.exists() or path.stat().st_mtime > cutoff:
                    continue
                removed.append((path, _size(path)))
                if not dry_run:
                    self.blobs.forget(f"{path.parent.name}/{path.stem}")  # (with its folder, once empty)
                    told()
        for folder in self.blobs.empty_stamp_folders():
            with contextlib.suppress(OSError):  # (gone meanwhile)
                if folder.stat().st_mtime > cutoff:
                    continue
                if dry_run or self.blobs.drop_empty(folder):
                    removed.append((folder, 0))
                    if not dry_run:
                        told()
        return removed

    # ---------------------------------------------------------------- lookups

    def _find_adapter(self, s: Session, ref: str | int) -> SqlAdapter:
        return s.get(SqlAdapter, self._reader(s).adapter_id(ref))

    def _find_base(self, s: Session, ref: str | int, what: str = "ref") -> SqlBase:
        return s.get(SqlBase, self._reader(s).base_id(ref, what))

    def _manifest(self, s: Session, base_id: int) -> dict[str, TensorRecord]:
        return self._reader(s).manifest(base_id)

    def _recorded_file(self, path: Path) -> bool:
        """Whether ``path`` is a stored file a record names: one registered under a name that starts with the temp
        mark (`register .loraops-tmp-a.safetensors`) looks like an interrupted copy's leftover, and is not one."""
        parts = path.relative_to(self.blobs.root).parts
        if len(parts) != 3:
            return False
        folder = "/".join(parts[:2])
        with self.session() as s:
            rows = s.scalars(select(SqlAdapter.files).where(
                or_(SqlAdapter.blob == folder, SqlAdapter.blob.startswith(f"{folder}/"))))
            return any(f["name"] == parts[2] for files in rows for f in files or ())

    def _blob_used(self, key: str) -> bool:
        folder = folder_of(key)
        with self.session() as s:
            return s.scalar(select(exists().where(or_(SqlAdapter.blob == folder, SqlAdapter.blob.startswith(f"{folder}/")))))

    def _drop_lineage(self, s: Session, ids: Iterable[int | None]) -> None:
        """Remove the lineage records ``ids`` (with their inputs) that no adapter or base points at any more: what a
        removed derived adapter or base was made from goes with it; the history of what is still registered stays."""
        ids = {i for i in ids if i is not None}
        if not ids:
            return
        s.flush()
        for model in (SqlAdapter, SqlBase):
            ids -= set(s.scalars(select(model.lineage_id).where(model.lineage_id.in_(ids))))
        if ids:
            s.execute(delete(SqlLineageInput).where(SqlLineageInput.lineage_id.in_(ids)))
            s.execute(delete(SqlLineage).where(SqlLineage.id.in_(ids)))

    def _tag(self, s: Session, row: SqlAdapter, tags: Sequence[str]) -> None:
        have = {t.tag for t in row.tags}
        row.tags.extend(SqlTag(tag=t) for t in tags if t not in have)
        s.flush()

    def _lineage(self, s: Session, spec: LineageSpec | None) -> SqlLineage | None:
        if spec is None:
            return None
        lineage = SqlLineage(op=spec.op, params=dict(spec.params))
        for position, item in enumerate(spec.inputs):
            found = s.get(SqlAdapter if item.kind == "adapter" else SqlBase, item.id)
            if found is None:
                if item.ref is None:
                    raise NotFoundError(f"lineage input: no {item.kind} with id {item.id} in the registry")
                raise NotFoundError(f"{item.kind} {item.ref} was removed from the registry while this ran (by another "
                                    "process?): nothing was recorded")
            if item.kind == "adapter":
                row = SqlLineageInput(adapter_id=found.id, label=f"{found.name}@{found.version}", sha256=found.sha256)
            else:
                row = SqlLineageInput(base_id=found.id, label=found.name, sha256=found.fingerprint)
            row.position, row.kind, row.weight, row.role = position, item.kind, item.weight, item.role
            lineage.inputs.append(row)
        return lineage

    # ---------------------------------------------------------------- rows → records

    # Records are read back with SQL (reads.py) after a flush: build a row's record before deleting it.

    def _adapter_record(self, s: Session, row: SqlAdapter) -> AdapterRecord:
        return self._reader(s).adapter(row.id)

    def _base_record(self, s: Session, row: SqlBase) -> BaseRecord:
        return self._reader(s).base(row.id)


def removed_line(records: list[AdapterRecord], stored_left: bool = False) -> str:
    """What an interrupted `rm` says once its records were removed; ``stored_left``: before their stored files were
    (an orphan folder, which gc removes)."""
    one = len(records) == 1
    line = f"interrupted after {', '.join(r.ref for r in records)} {'was' if one else 'were'} removed"
    return line + (f"; `loraops gc` removes what is left of {'its' if one else 'their'} stored files" if stored_left
                   else "")


def retryable(exc: DBAPIError) -> bool:
    """A transaction that lost a race and may simply run again: a unique/foreign-key collision with a concurrent
    writer, SQLite's "database is locked"/"busy" (past the busy timeout), a PostgreSQL serialization failure or
    deadlock."""
    if isinstance(exc, IntegrityError):
        return True
    if getattr(exc.orig, "sqlstate", None) in PG_RETRYABLE:
        return True
    text = str(exc.orig).lower()
    return "database is locked" in text or "database is busy" in text or "database table is locked" in text


def _pull_again(source: str | None) -> str | None:
    from ..hub import pull_again

    return pull_again(source)


def _files_at(path: str | None) -> "BaseModel | None":
    """A registered base's files, read where they still are (with every config.json: a bad one is said here), for
    check to read what merge reads: their tensors' headers (a quantized layout merge cannot write does not fit) and
    config.json (a tied head it would refuse is refused by check too). None where they are gone or unreadable (a base
    from the Hub not downloaded yet, a file now unreadable or damaged): check then goes by the recorded manifest
    alone, for that base only."""
    from ..basemodel import BaseModel

    if not path or not Path(path).exists():
        return None
    try:
        model = BaseModel.open(path)
        for tensor in model.tensors:  # read now (BaseModel.config reads one when asked)
            model.config(tensor)
    except (LoraopsError, OSError):  # what merge would say of them; check reports what the recorded manifest says
        return None
    return model


def _configs_at(path: str | None) -> Callable[[str], dict]:
    """A registered base's config.json reader (tensor → its model's): what says that a LoRA or a saved copy on one
    side's embed_tokens fits as merge merges it (check.untied_side_source). Its files are opened (_files_at) on the
    first call, which only such an adapter makes: not on every registration; {} where they are gone, which unties
    nothing."""
    model = functools.cache(lambda: _files_at(path))
    return lambda tensor: {} if model() is None else model().config(tensor)


def _check_files(adapter: "Adapter", model: "BaseModel", name: str, component: str | None = None) -> "CheckReport":
    """check.check against a base's files (or one pipeline ``component``'s), as merge reads them: its headers,
    config.json and quantization."""
    from .. import check

    return check.check(adapter, model, base_name=name, component=component)


def _downloads(base: BaseRecord) -> bool:
    """Is this a base recorded from the Hub whose files base_path downloads (none are attached, or they are gone)?"""
    return (not base.path or not Path(base.path).exists()) and base.source.startswith("hf://")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def adapter_identity(path: Path, alpha: float | None, weights_sha256: str | None = None) -> str:
    """The registry's identity of an adapter: formats.identity, made another one by an ``alpha`` override."""
    from .. import formats

    identity = formats.identity(path, weights_sha256=weights_sha256)
    return identity if alpha is None else hashlib.sha256(f"{identity}\nalpha={float(alpha)!r}".encode()).hexdigest()


def token_counts(adapter: "Adapter") -> dict[str, int]:
    """What the registry keeps of an adapter's PEFT trainable tokens: base tensor → number of rows replaced."""
    return {name: len(rows.indices) for name, rows in adapter.token_rows.items()}


def module_target(name: str, names_resolved: bool) -> str:
    """What `list --target` matches: the last path component (kohya names before binding: the whole name)."""
    return name.rsplit(".", 1)[-1] if names_resolved else name


def _set_base(s: Session, row: SqlAdapter, base_id: int | None, adapter: "Adapter") -> None:
    """Link ``row`` to base ``base_id`` (None: to none), its modules recorded as ``adapter`` (bound to that base, or
    not bound) names them."""
    row.base_id, row.target_modules = base_id, adapter.target_modules
    s.execute(delete(SqlAdapterModule).where(SqlAdapterModule.adapter_id == row.id))
    _insert_modules(s, row.id, adapter)


def _insert_modules(s: Session, adapter_id: int, adapter: "Adapter") -> None:
    # one executemany, not an ORM object per module (an MoE adapter has tens of thousands)
    rows = [{"adapter_id": adapter_id, **m} for m in module_fields(adapter)]
    if rows:  # (none: an empty executemany is one INSERT of no values; an adapter of trainable tokens alone has none)
        s.execute(insert(SqlAdapterModule), rows)


def module_fields(adapter: "Adapter") -> list[dict]:
    """The adapter_modules rows of an adapter, as bound (a kohya file bound to a base: under the base's names)."""
    return [
        # (rank 0: a LoKr whose factors are stored whole has none; the column predates it and is NOT NULL)
        dict(name=m.name, target=module_target(m.name, adapter.names_resolved), kind=m.shown_kind, method=m.method,
             rank=m.rank or 0, alpha=m.alpha, scale=m.scale, in_features=m.in_features, out_features=m.out_features,
             kernel=None if m.shown_kernel is None else list(m.shown_kernel))
        for m in adapter.modules.values()
    ]


def default_name(path: Path) -> str:
    """A registry name from a path: the folder name, or the file name without .safetensors."""
    cleaned = name_part(path.name.removesuffix(".safetensors") if path.is_file() else resolved(path).name)
    return cleaned if not cleaned.isdigit() else f"n{cleaned}"


def name_part(text: str) -> str:
    """``text`` (a file or folder name) as one '/'-separated part of a name: each run of characters a name
    cannot hold becomes '-', and it starts with a letter or digit (a folder `_lora` gave '_lora', which check_name
    refuses: an error for a name never given)."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "-", text)
    return re.sub(r"^[^A-Za-z0-9]+", "", cleaned).rstrip("-.") or "unnamed"


def check_name(name: str, what: str) -> str:
    """Names are what people type: no '@' (it starts a version), not all digits (that is an id), and '/'-separated
    parts that are never '.', '..' or empty (names end up in file and Hub repo names). An empty name given is an
    error wherever it is given, never the default name (callers use the default only for None)."""
    if not isinstance(name, str):  # (name=1 was a raw AttributeError)
        raise InvalidInputError(f"bad {what} name {name!r}: a name is a string")
    if not name:
        raise InvalidInputError(f"empty {what} name: give a name, or leave `name` out for the default", ["name"])
    parts = name.split("/")
    if not NAME_RE.match(name) or name.isdigit() or len(name) > 255 or any(p in ("", ".", "..") for p in parts):
        raise InvalidInputError(
            f"bad {what} name {name!r}: use letters, digits and . _ + - / (not only digits, no '@', no '..' "
            "or empty parts, at most 255)"
        )
    return name


def clean_tags(tags: Iterable[str]) -> list[str]:
    """Tags as given, stripped, without repeats. A tag is one word with no comma: `list` shows an adapter's tags
    comma-joined and `list --tag` matches one whole tag, so 'a,b' was listed as two tags that neither --tag a nor
    --tag b found."""
    if isinstance(tags, str):  # iterating it tagged 'chat' as c, h, a, t
        raise InvalidInputError(f"tags is a list of tags: give [{tags!r}], not the string {tags!r}")
    if not isinstance(tags, Iterable) or isinstance(tags, (dict, bytes)):  # (a dict's keys were taken for the tags)
        raise InvalidInputError(f"tags is a list of tags, not {tags!r}")
    out = []
    for given in tags:
        tag = given.strip() if isinstance(given, str) else ""  # (a tag 1 was a raw AttributeError)
        if not tag or len(tag) > 255 or not tag.isprintable() or any(c.isspace() for c in tag):  # (a DEL was taken)
            raise InvalidInputError(f"bad tag {given!r}: a tag is one word of at most 255 characters")
        if "," in tag:
            raise InvalidInputError(f"bad tag {given!r}: a tag holds no comma (`list` joins tags with commas); give "
                                    "each tag its own --tag")
        if tag not in out:
            out.append(tag)
    return out


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
