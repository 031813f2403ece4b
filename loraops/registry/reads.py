"""The registry's reads, in plain portable SQL over a DB-API connection: resolving references, listing with
filters, and building AdapterRecord / BaseRecord (modules, tags, base, lineage).

Written once, used two ways: Registry runs them on its session's connection (exec_driver_sql, inside the ORM
transaction, after a flush), and ``reader()`` runs them straight over the driver (sqlite3, or psycopg for
PostgreSQL) when the database is already at this code's schema revision, so `loraops list` / `show` import neither SQLAlchemy nor Alembic
(docs/registry.md, "Timing of `loraops list`"). Writes and migrations stay with the ORM (store.py, db.py).

References to adapters: ``name`` (latest version; ``name@latest`` too), ``name@version``, an integer id, or a prefix
of 6+ hex digits of the identity sha256 or the weights-file sha256. Bases: ``name``, id, or a fingerprint prefix.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import numbers
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import quote

from ..errors import AmbiguousError, InvalidInputError, NotFoundError, RegistryError
from ..fsutil import refuse_overlaps, resolved
from ..references import PATH, WEIGHT, argument, is_integer
from ..records import (AdapterRecord, BaseRecord, BaseRef, LineageInputRecord, LineageRecord, ModuleRecord,
                       TensorRecord)
from ..ldm import Tensors, transformer_class
from .blobs import BlobStore

REF = (*PATH, numbers.Integral)
"""What a registry reference is: a name, name@version or sha256 prefix (or the path the name is read from), or an id."""

HEAD = "0007"
"""The schema revision this code reads and writes: the newest under migrations/versions (a test checks it)."""

SQLITE_BUSY_TIMEOUT_MS = 30_000
CONNECT_TIMEOUT_S = 10  # a PostgreSQL server that does not answer (packets dropped, a hung host): libpq waits forever
MIN_PREFIX = 6
SHOWN = 5
HEX_RE = re.compile(r"^[0-9a-fA-F]+$")
MAX_INTEGER = 2**63 - 1
"""The largest id, version or rank a query may compare with: SQLite's (and PostgreSQL's BIGINT) largest integer;
the driver refuses a larger Python int with OverflowError."""


def _integer(text: str) -> int | None:
    """``text`` as an id or version: ASCII digits only (str.isdigit() also takes '²', which int() refuses) that a
    query can hold; else None."""
    return int(text) if text.isascii() and text.isdigit() and int(text) <= MAX_INTEGER else None

_ADAPTER_COLUMNS = (
    "a.id, a.name, a.version, a.sha256, a.weights_sha256, a.format, a.dtype, a.size, a.num_parameters, a.rank, "
    "a.alpha, a.scale_mode, a.target_modules, a.base_id, b.name, b.fingerprint, a.base_hint, a.source, a.blob, "
    "a.lineage_id, a.created, a.dora, a.token_rows"
)
_BASE_COLUMNS = (
    "b.id, b.name, b.fingerprint, b.source, b.path, b.num_tensors, b.num_parameters, b.dtype, b.total_bytes, "
    "b.derived, b.lineage_id, b.created"
)


Execute = Callable[[str, tuple], Sequence[tuple]]
"""Runs one statement in the driver's own parameter style and returns its rows (the transaction is the caller's)."""


def by_name(rows: Sequence[tuple], *columns: int) -> list[tuple]:
    """``rows`` ordered by these columns, names compared by code point: ORDER BY name followed the database's
    collation, so `list` ordered `Style, Zeta, alpha, style` on SQLite and `alpha, style, Style, Zeta` on a PostgreSQL
    database with an ICU or en_US one (a code point order is what SQLite's BINARY collation gives)."""
    return sorted(rows, key=lambda row: tuple(row[c] for c in columns))


_LATEST = "SELECT id FROM adapters WHERE name = ? ORDER BY version DESC LIMIT 1"
"""The latest version of a name: what ``name`` and ``name@latest`` reference."""


class Reader:
    """The registry's read queries over one connection: ``execute`` runs SQL as the DB-API driver takes it."""

    def __init__(self, execute: Execute, paramstyle: str, blobs: BlobStore, earlier: BlobStore | None = None) -> None:
        if paramstyle not in ("qmark", "format", "pyformat"):
            raise RegistryError(f"the registry's database driver takes parameters in the {paramstyle!r} style, "
                                "which loraops does not support (use SQLite or PostgreSQL)")
        self.execute = execute
        self.blobs = blobs
        self.earlier = earlier
        """The store loraops kept the registry's adapters in before (settings.earlier_blobs_dir), for stored()."""
        self._percent = paramstyle != "qmark"

    @classmethod
    def over(cls, connection, blobs: BlobStore, earlier: BlobStore | None = None) -> "Reader":
        """A Reader on a plain DB-API connection."""

        def execute(sql: str, params: tuple) -> list[tuple]:
            cursor = connection.cursor()
            try:
                cursor.execute(sql, params)
                return cursor.fetchall()
            finally:
                cursor.close()

        driver = sys.modules[type(connection).__module__.partition(".")[0]]  # sqlite3, psycopg
        return cls(execute, driver.paramstyle, blobs, earlier)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> Sequence[tuple]:
        """Run ``sql`` written with ``?`` placeholders (and no literal ? or %) in the driver's own style."""
        try:
            return self.execute(sql.replace("?", "%s") if self._percent else sql, tuple(params))
        except UnicodeEncodeError as exc:  # `show $'b\xff'`: the driver cannot send it (a traceback)
            raise InvalidInputError(f"{exc.object!r} is not UTF-8 text, as every name and path the registry records "
                                    "is, so it names nothing there (a name typed in another encoding?)") from None

    def registered_paths(self) -> list[tuple[str, str]]:
        """(path, what) of every registered base's files, in one query: what an output must not overwrite
        (refuse_output_over_registered). A base is recorded by its path, not copied, so replacing its files leaves
        its record describing other values; an adapter's recorded source is only provenance (the registry reads its
        stored copy), so it is not here."""
        rows = self.rows("SELECT name, path FROM bases WHERE path IS NOT NULL")
        return [(path, f"registered base {name}") for name, path in rows if os.path.isabs(path)]

    # ---------------------------------------------------------------- adapters

    def get_adapter(self, ref: str | int) -> AdapterRecord:
        return self.adapter(self.adapter_id(ref))

    def adapter(self, adapter_id: int) -> AdapterRecord:
        found = self._adapters("a.id = ?", [adapter_id])
        if not found:  # removed since its reference was resolved (or, in a write, already deleted)
            raise NotFoundError(f"no adapter with id {adapter_id} in the registry")
        return found[0]

    def list_adapters(self, *, base: str | int | None = None, rank: int | None = None, target: str | None = None,
                      tag: str | None = None, name: str | None = None, modules: bool = True) -> list[AdapterRecord]:
        """Every version of every adapter (by name, then version), filtered: ``rank`` matches adapters with any
        module of that rank, ``target`` any module whose last path component is that (q_proj, ...). ``modules``
        False: their modules counted, not listed (1,000 adapters of 224 modules: 1.6 s and 354 MB to list)."""
        where, params = ["1 = 1"], []
        # (no module has a rank below 1: the 0 stored for a LoKr module of whole factors means it has none)
        if rank is not None and not is_integer(rank):
            raise InvalidInputError(f"rank must be an integer (got {rank!r})")
        for key, value in (("target", target), ("tag", tag), ("name", name)):  # (a list: sqlite3's raw error)
            argument(value, key, str, type(None))
        rank = int(rank) if rank is not None else None  # (a numpy int: sqlite3 bound its bytes, matching nothing)
        if rank is not None and not 1 <= rank <= MAX_INTEGER:
            return []
        if base is not None:
            where.append("a.base_id = ?")
            params.append(self.base_id(base, "base"))
        for what, value in (("name", name), ("tag", tag), ("target", target)):  # (each listed nothing)
            if value is not None and not value.strip():
                raise InvalidInputError(f"empty {what}: give one, or leave that filter out")
        if name is not None and "@" in name:  # (a name has none: it listed nothing, as if no such adapter)
            raise InvalidInputError(f"{name!r} is a reference, not a name: list --name takes the name alone "
                                    f"(`loraops show {name}` shows that version)")
        if name is not None:
            where.append("a.name = ?")
            params.append(name)
        # uncorrelated subqueries, run once: SQLite ran a correlated EXISTS per adapter through the target index,
        # reading every module of that target each time (3.5 s for `list --target q_proj` over 766 adapters; 14 ms)
        for column, value in (("rank", rank), ("target", target)):
            if value is not None:
                where.append(f"a.id IN (SELECT adapter_id FROM adapter_modules WHERE {column} = ?)")
                params.append(value)
        if tag is not None:
            where.append("a.id IN (SELECT adapter_id FROM adapter_tags WHERE tag = ?)")
            params.append(tag)
        return self._adapters(" AND ".join(where), params, modules)

    def spans(self, ids: Sequence[int]) -> dict[int, tuple[tuple[int, int], tuple[float, float]]]:
        """(smallest, largest) rank and alpha of the modules of each adapter in ``ids``, in SQL (`list` gives the
        range of an adapter whose modules differ without reading them; a LoKr module of whole factors, rank 0, has
        none)."""
        found = {}
        for start in range(0, len(ids), 500):  # (SQLite before 3.32 takes at most 999 parameters)
            chunk = list(ids[start:start + 500])
            for adapter_id, *low_high in self.rows(
                    "SELECT adapter_id, MIN(NULLIF(rank, 0)), MAX(NULLIF(rank, 0)), MIN(alpha), MAX(alpha) FROM "
                    f"adapter_modules WHERE adapter_id IN ({', '.join('?' * len(chunk))}) GROUP BY adapter_id", chunk):
                found[adapter_id] = (tuple(low_high[:2]), tuple(low_high[2:]))
        return found

    def module_kernels(self, ref: str | int) -> dict[str, tuple[int, ...]]:
        """The kernel sizes of a registered adapter's convolution modules, named as its record names them (bound: by
        the base's names), from the stored file's headers: for the conv rows that do not record theirs (registered
        before revision 0007 without a base, or whose base was removed before it)."""
        from .. import check, formats

        (blob, alpha, base_id), = self.rows("SELECT blob, alpha_override, base_id FROM adapters WHERE id = ?",
                                            [self.adapter_id(ref)])
        adapter = formats.read_adapter(self.stored(blob), alpha=alpha, values=False)
        adapter = check.bind(adapter, self.manifest(base_id)) if base_id is not None else adapter
        return {m.name: m.kernel for m in adapter.modules.values() if m.kernel is not None and m.product is None}

    def stored(self, blob: str) -> Path:
        """Where a record's stored adapter is: in the registry's store, or in the earlier one where only that has it
        yet (a read copies nothing: the first load or verify does, Registry._recover); `show` named the registry's
        store's path before the copy, where there was no file."""
        path = self.blobs.path(blob)
        if self.earlier is not None and not os.path.lexists(path) and os.path.lexists(self.earlier.path(blob)):
            return self.earlier.path(blob)
        return path

    def adapter_id(self, ref: str | int, what: str = "ref") -> int:
        """The id of the adapter ``ref`` names (see the module docstring), or a one-line NotFound/Ambiguous error;
        ``what``: the parameter it was given as."""
        ref = str(argument(ref, what, *REF)).strip()  # (None looked up an adapter named 'None')
        if "@" in ref:
            name, _, version = ref.rpartition("@")
            if version != "latest" and not (version.isascii() and version.isdigit()):
                raise InvalidInputError(f"bad adapter reference {ref!r}: the part after @ must be a version number "
                                        "or latest")
            if version == "latest":  # what the bare name means
                found = self.rows(_LATEST, [name])
            else:
                number = _integer(version)
                found = [] if number is None else self.rows("SELECT id FROM adapters WHERE name = ? AND version = ?",
                                                            [name, number])
            if found:
                return found[0][0]
            versions = [v for v, in self.rows("SELECT version FROM adapters WHERE name = ? ORDER BY version", [name])]
            if versions:
                raise NotFoundError(f"adapter {name!r} has no version {version} (versions: {', '.join(map(str, versions))})")
            close = self._meant("adapters", name)
            raise NotFoundError(f"no adapter named {name!r} in the registry" + (f" ({close})" if close else ""))
        found = self.rows(_LATEST, [ref])
        if found:
            return found[0][0]
        rows = self._by_id_or_prefix("id, name, version, sha256 FROM adapters", ref, ("sha256", "weights_sha256"))
        if len(rows) == 1:
            return rows[0][0]
        if rows:
            raise AmbiguousError(
                f"adapter reference {ref!r} matches several adapters ({shown(f'{n}@{v} {sha[:12]}' for _, n, v, sha in rows)}); "
                "give more of the sha256, or name@version"
            )
        raise _missing("adapter", ref, self._meant("adapters", ref)
                       or f"give a name, name@version, id or sha256 prefix of {MIN_PREFIX}+ hex digits")

    def _meant(self, table: str, ref: str) -> str:
        """For a ``ref`` that named nothing, what was meant: where a weight was (`style=0.7`, `style 0.7`, `style :0.7`,
        `style: 0.7`), how one is written; else 'did you mean …?' naming the registered name closest to it (a typo);
        '' when neither fits."""
        head, sep, tail = ref.rpartition("=") if "=" in ref else ref.rpartition(":")
        if table == "adapters" and not head and WEIGHT.fullmatch(tail) and not tail.isdigit():  # (an id is digits)
            return "a weight is written right after its adapter, with no space: NAME:0.7"
        if table == "adapters" and sep and (WEIGHT.fullmatch(tail) or not tail) and self.rows(_LATEST, [head]):
            return f"a weight is written after ':', with no space: {head}:{tail or '0.7'}"
        parts = [part.partition(":")[0] for part in ref.split(",")]
        if table == "adapters" and len(parts) > 1 and any(self.rows(_LATEST, [part]) for part in parts):
            return f"adapters are separate arguments, not joined by commas: {' '.join(parts)} (each with its :WEIGHT)"
        names = [name for name, in self.rows(f"SELECT DISTINCT name FROM {table}", [])]
        close = difflib.get_close_matches(ref, names, n=1)
        return f"did you mean {close[0]!r}?" if close else ""

    def _adapters(self, where: str, params: list, with_modules: bool = True) -> list[AdapterRecord]:
        rows = by_name(self.rows(f"SELECT {_ADAPTER_COLUMNS} FROM adapters a LEFT JOIN bases b ON b.id = a.base_id "
                                 f"WHERE {where}", params), 1, 2)
        if not rows:
            return []
        chosen = f"SELECT a.id FROM adapters a WHERE {where}"
        modules: dict[int, list[ModuleRecord]] = {}
        counts: dict[int, int] = {}
        if with_modules:
            for adapter_id, name, kind, rank, alpha, scale, in_features, out_features, kernel in self.rows(
                "SELECT adapter_id, name, kind, rank, alpha, scale, in_features, out_features, kernel FROM "
                f"adapter_modules WHERE adapter_id IN ({chosen}) ORDER BY id", params
            ):
                modules.setdefault(adapter_id, []).append(ModuleRecord(
                    name=name, kind=kind, rank=rank or None, alpha=alpha, scale=scale, in_features=in_features,
                    out_features=out_features, kernel=None if kernel is None else tuple(_json(kernel)),
                ))
            counts = {adapter_id: len(listed) for adapter_id, listed in modules.items()}
        else:
            counts = dict(self.rows(f"SELECT adapter_id, count(*) FROM adapter_modules WHERE adapter_id IN ({chosen}) "
                                    "GROUP BY adapter_id", params))
        products: dict[int, list[str]] = {}  # LoHa/LoKr modules, as their kind says
        for adapter_id, kind in self.rows(f"SELECT DISTINCT adapter_id, kind FROM adapter_modules WHERE adapter_id IN "
                                          f"({chosen}) AND kind IN ('loha', 'lokr') ORDER BY adapter_id, kind", params):
            products.setdefault(adapter_id, []).append(kind)
        methods: dict[int, list[str]] = {}  # AdaLoRA/VeRA modules read as plain LoRA, as their method says
        for adapter_id, method in self.rows(f"SELECT DISTINCT adapter_id, method FROM adapter_modules WHERE adapter_id "
                                            f"IN ({chosen}) AND method IS NOT NULL ORDER BY adapter_id, method", params):
            methods.setdefault(adapter_id, []).append(method)
        tags: dict[int, list[str]] = {}
        for adapter_id, tag in self.rows(f"SELECT adapter_id, tag FROM adapter_tags WHERE adapter_id IN ({chosen})", params):
            tags.setdefault(adapter_id, []).append(tag)
        lineages = self._lineages(f"SELECT a.lineage_id FROM adapters a WHERE {where}", params, any(r[19] is not None for r in rows))
        records = []
        for (id_, name, version, sha256, weights_sha256, format_, dtype, size, num_parameters, rank, alpha, scale_mode,
             target_modules, base_id, base_name, fingerprint, base_hint, source, blob, lineage_id, created, dora,
             token_rows) in rows:
            records.append(AdapterRecord(
                id=id_, name=name, version=version, sha256=sha256, weights_sha256=weights_sha256, format=format_,
                dtype=dtype, size=size, num_parameters=num_parameters, rank=rank, alpha=alpha, scale_mode=scale_mode,
                target_modules=list(_json(target_modules)), dora=bool(dora), products=products.get(id_, []),
                methods=methods.get(id_, []),
                token_rows=_json(token_rows),  # None: not recorded
                base=None if base_id is None else BaseRef(id=base_id, name=base_name, fingerprint=fingerprint),
                base_hint=base_hint, tags=sorted(tags.get(id_, [])), source=source, path=str(self.stored(blob)),
                created=_time(created), num_modules=counts.get(id_, 0), modules=modules.get(id_, []),
                lineage=lineages.get(lineage_id),
            ))
        return records

    # ---------------------------------------------------------------- bases

    def get_base(self, ref: str | int) -> BaseRecord:
        return self.base(self.base_id(ref))

    def base(self, base_id: int) -> BaseRecord:
        found = self._bases("b.id = ?", [base_id])
        if not found:
            raise NotFoundError(f"no base with id {base_id} in the registry")
        return found[0]

    def list_bases(self) -> list[BaseRecord]:
        return self._bases("1 = 1", [])

    def find_base(self, fingerprint: str) -> BaseRecord | None:
        """The registered base with exactly this fingerprint, if any (e.g. the pristine base of a merged model)."""
        found = self._bases("b.fingerprint = ?", [argument(fingerprint, "fingerprint", str)])
        return found[0] if found else None

    def manifest(self, base_id: int) -> dict[str, TensorRecord]:
        """A registered base's tensors (name, dtype, shape) by name, with its pipeline's transformer class where its
        files say it (ldm.Tensors: what binds a LoRA in a DiT's original names to that transformer)."""
        tensors = Tensors((name, TensorRecord(name=name, dtype=dtype, shape=tuple(_json(shape)))) for name, dtype, shape
                          in self.rows("SELECT name, dtype, shape FROM base_tensors WHERE base_id = ?", [base_id]))
        path = self.rows("SELECT path FROM bases WHERE id = ?", [base_id])
        tensors.transformer_class = transformer_class(Path(path[0][0])) if path and path[0][0] else None
        return tensors

    def base_id(self, ref: str | int, what: str = "ref") -> int:
        """The id of the base ``ref`` names (name, id, or fingerprint prefix), or a one-line error; ``what``: the
        parameter it was given as."""
        ref = str(argument(ref, what, *REF)).strip()
        found = self.rows("SELECT id FROM bases WHERE name = ?", [ref])
        if found:
            return found[0][0]
        rows = self._by_id_or_prefix("id, name FROM bases", ref, ("fingerprint",))
        if len(rows) == 1:
            return rows[0][0]
        if rows:
            raise AmbiguousError(
                f"base reference {ref!r} matches several bases ({shown(n for _, n in rows)}); give more of the fingerprint"
            )
        if os.path.exists(ref):  # a registered base's own files: it said `base add` them
            where = os.path.realpath(ref)
            named = [n for n, path in self.rows("SELECT name, path FROM bases WHERE path IS NOT NULL", [])
                     if os.path.realpath(path) == where]
            if named:
                raise NotFoundError(f"{ref}: a path is not taken here, only a registered base: the base there is "
                                    f"registered as {named[0]!r}, give that")
        raise _missing("base", ref, self._meant("bases", ref) or "see `loraops base list`")

    def _bases(self, where: str, params: list) -> list[BaseRecord]:
        rows = by_name(self.rows(f"SELECT {_BASE_COLUMNS} FROM bases b WHERE {where}", params), 1)
        lineages = self._lineages(f"SELECT b.lineage_id FROM bases b WHERE {where}", params, any(r[10] is not None for r in rows))
        return [
            BaseRecord(id=id_, name=name, fingerprint=fingerprint, source=source, path=path, num_tensors=num_tensors,
                       num_parameters=num_parameters, dtype=dtype, total_bytes=total_bytes, derived=bool(derived),
                       lineage=lineages.get(lineage_id), created=_time(created))
            for (id_, name, fingerprint, source, path, num_tensors, num_parameters, dtype, total_bytes, derived,
                 lineage_id, created) in rows
        ]

    # ---------------------------------------------------------------- shared

    def _by_id_or_prefix(self, what: str, ref: str, hash_columns: Sequence[str]) -> list[tuple]:
        """Up to SHOWN + 1 rows (enough to list an ambiguous reference) whose id is ``ref``, or whose
        ``hash_columns`` start with it when it is 6+ hex digits."""
        clauses, params = [], []
        if _integer(ref) is not None:
            clauses.append("id = ?")
            params.append(_integer(ref))
        if len(ref) >= MIN_PREFIX and HEX_RE.match(ref):
            clauses += [f"{column} LIKE ?" for column in hash_columns]
            params += [f"{ref.lower()}%"] * len(hash_columns)
        if not clauses:
            return []
        return self.rows(f"SELECT {what} WHERE {' OR '.join(clauses)} ORDER BY id LIMIT {SHOWN + 1}", params)

    def _lineages(self, ids_sql: str, params: list, needed: bool) -> dict[int, LineageRecord]:
        """Lineage id → record, for the lineage ids ``ids_sql`` selects (no query unless ``needed``)."""
        if not needed:
            return {}
        inputs: dict[int, list[LineageInputRecord]] = {}
        for lineage_id, kind, adapter_id, base_id, label, sha256, weight, role in self.rows(
            "SELECT lineage_id, kind, adapter_id, base_id, label, sha256, weight, role FROM lineage_inputs "
            f"WHERE lineage_id IN ({ids_sql}) ORDER BY lineage_id, position", params
        ):
            inputs.setdefault(lineage_id, []).append(LineageInputRecord(
                kind=kind, id=adapter_id if kind == "adapter" else base_id, ref=label, sha256=sha256, weight=weight,
                role=role,
            ))
        return {
            id_: LineageRecord(id=id_, op=op, params=_params(op, _json(params_)), created=_time(created),
                               inputs=inputs.get(id_, []))
            for id_, op, params_, created in self.rows(
                f"SELECT id, op, params, created FROM lineage WHERE id IN ({ids_sql})", params)
        }


@contextlib.contextmanager
def reader(url: str | None = None, *, records_only: bool = False) -> Iterator[Reader]:
    """A Reader on the registry at ``url`` (default: settings.db_url()), in one read transaction.

    When the database exists at this code's schema revision it is read straight over the driver; otherwise (no
    database yet, an old or newer revision, a URL only SQLAlchemy understands) through Registry.open, which
    migrates or refuses as it always does; an SQLite file that does not exist is refused, unless it is the home's
    own (Registry.open's ``create``). ``records_only``: a caller that reads no stored file, for which a server
    registry without LORAOPS_BLOBS (settings.registry_blobs_dir) is no reason to refuse."""
    from .. import settings

    url = url or settings.db_url()
    blobs = settings.blobs_dir(url) if records_only else settings.registry_blobs_dir(url)
    earlier = settings.earlier_blobs_dir(url, blobs)
    connection, made_wal = _connect(url)
    if connection is None:
        from .store import Registry

        with Registry.open(url, create=False) as registry, registry.reader() as found:
            yield found
        return
    try:
        yield Reader.over(connection, BlobStore(blobs), BlobStore(earlier) if earlier is not None else None)
    finally:
        connection.close()
        if made_wal is not None:
            _close_wal(made_wal)


def refuse_output_over_registered(output: str | Path, found: Reader | None = None) -> None:
    """Refuse, even with --force, an output that is, holds or lies inside a registered base's files
    (Reader.registered_paths): `merge -o <base> --force` rewrote the files a base's record describes, and check,
    subtract --exact and later merges then read other values under that record. Paths that no longer exist are no
    obstacle (nothing is there to overwrite). Without ``found`` (a command that does not open the registry, merge
    --no-record) the registry is read when there is one and it can be reached: a registry server that is down does
    not stop a merge that records nothing."""
    from .. import settings

    if found is None:
        database = settings.sqlite_database()
        if database is not None and not database.is_file():
            return
        try:
            with reader(records_only=True) as found:  # (bases' paths: no blob store needed)
                return refuse_output_over_registered(output, found)
        except RegistryError:
            return
    refuse_overlaps(output, ((path, what) for path, what in found.registered_paths() if os.path.lexists(path)),
                    hint="write the output elsewhere, or forget the base first with `loraops base rm`")


def _connect(url: str) -> tuple[Any, Path | None]:
    """A driver connection in a read transaction when ``url`` is SQLite or PostgreSQL and its schema is at HEAD,
    else None (then Registry.open creates, migrates, refuses, or reports the error in its own words); and the SQLite
    file when neither its -wal nor its -shm was there before this connection (see _close_wal)."""
    from .. import settings

    scheme, _, rest = url.partition("://")
    dialect, _, driver = scheme.partition("+")
    connection = made_wal = unreachable = None
    try:
        if dialect == "sqlite" and driver in ("", "pysqlite"):
            path = settings.plain_sqlite_file(url)  # (the rarer forms of SQLite URLs go through SQLAlchemy)
            if path is None or not path.is_file():
                return None, None
            path = resolved(path)  # (SQLite keeps its -wal and -shm beside the file a symlink names, not the link)
            if not _has_wal_files(path):
                made_wal = path
            connection = connect_read_only(path)
            connection.execute("BEGIN")  # one snapshot for every query of the command
        elif dialect == "postgresql" and driver in ("", "psycopg", "psycopg2") and (
                rest.count("@") < 2 and "/" not in rest.partition("@")[0]):
            # (else libpq reads the user and password otherwise than SQLAlchemy: it ends them at the first '@' or
            # '/', SQLAlchemy a user at the last '@' and a password at the first: `list` of me@corp@host looked for
            # the host corp@host, and of me:p/ss@host for the host me, which every other command found)
            import psycopg

            try:
                connection = psycopg.connect(f"postgresql://{rest}", **pg_connect_args(rest))
            except psycopg.OperationalError as exc:  # (the full path would wait for the server a second time)
                unreachable = exc
        else:
            return None, None
        # (adapters named too, in the same round trip: another application's Alembic revision can read as HEAD; with
        # no loraops table, Registry.open refuses its database as foreign)
        revision = connection.execute("SELECT version_num FROM alembic_version "
                                      "WHERE NOT EXISTS (SELECT 1 FROM adapters WHERE 1 = 0)").fetchone()
    except Exception:  # noqa: BLE001 - no driver, no such table: the full path knows what to do
        revision = None
    if unreachable is not None:
        from .db import cannot_open

        raise cannot_open(url, unreachable)
    if revision is None or revision[0] != HEAD:
        if connection is not None:
            connection.close()
            if made_wal is not None:  # (another application's database, refused next, keeps its folder as it was)
                _close_wal(made_wal, empty_only=True)
        return None, None
    return connection, made_wal


def pg_connect_args(url: str) -> dict[str, int]:
    """The driver's connect arguments for a PostgreSQL URL: a connect timeout, unless the URL sets its own."""
    return {} if "connect_timeout=" in url.partition("?")[2] else {"connect_timeout": CONNECT_TIMEOUT_S}


def _has_wal_files(database: Path) -> bool:
    return any(database.with_name(database.name + s).exists() for s in ("-wal", "-shm"))


def _close_wal(database: Path, *, empty_only: bool = False) -> None:
    """Remove the -wal and -shm files that reading a WAL registry over a read-only connection made beside it (such
    a connection cannot remove them, and every `list` and `show` left them), by SQLite's own rule: a read-write
    connection that reads and closes removes them only when it is the last one open (after folding into the
    database what a writer that came meanwhile committed), never under another. Only where this process may write
    the file and its folder (else it could not make them either: see db.make_engine's read_only). ``empty_only``:
    only while the -wal is empty, for a database that may be another application's: what its writers committed
    meanwhile is theirs to fold into its file."""
    import sqlite3

    if not (os.access(database, os.W_OK) and os.access(database.parent, os.W_OK)):
        return
    wal = database.with_name(database.name + "-wal")
    if empty_only and (not wal.exists() or wal.stat().st_size):
        return
    with contextlib.suppress(sqlite3.Error):
        connection = sqlite3.connect(f"{sqlite_uri_of(database)}?mode=rw", uri=True, isolation_level=None,
                                     timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
        try:
            connection.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        finally:
            connection.close()


def sqlite_uri_of(file: Path) -> str:
    """The SQLite `file:` URI naming ``file``, by its bytes (a name that is not UTF-8, which os.fsdecode holds as
    surrogates, is %-escaped as the bytes it is: as text it did not encode)."""
    return f"file:{quote(os.fsencode(file))}"


@contextlib.contextmanager
def read_only_connection(file: Path):
    """connect_read_only's connection, closed at the end, with the -wal and -shm it made beside the file (when
    neither was there) removed while no one has written to them (_close_wal's ``empty_only``)."""
    file = resolved(file)
    made_wal = not _has_wal_files(file)
    connection = connect_read_only(file)
    try:
        yield connection
    finally:
        connection.close()
        if made_wal:
            _close_wal(file, empty_only=True)


def connect_read_only(file: Path):
    """A sqlite3 connection (autocommit) that reads the SQLite ``file`` and cannot change it: a read-write
    connection, closing last, folds the -wal into the file (checkpoint), which rewrote another application's database
    given to --db before it was refused as no registry."""
    import sqlite3

    return sqlite3.connect(f"{sqlite_uri_of(resolved(file))}?mode=ro", uri=True, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
                           isolation_level=None)


def _missing(kind: str, ref: str, hint: str) -> NotFoundError:
    # (a bare name too: `show chat` beside the folder chat it was never registered from)
    if os.path.exists(ref):  # the commands that take paths never ask the registry for an existing one
        how = "loraops base add" if kind == "base" else "loraops register"
        return NotFoundError(f"{ref}: no {kind} of that name in the registry, and a path is not taken here, only "
                             f"a registered {kind}: `{how} {ref}` records it")
    if looks_like_path(ref):
        return NotFoundError(f"{ref}: no such file or folder, and no {kind} of that name in the registry")
    return NotFoundError(f"no {kind} {ref!r} in the registry ({hint})")


def _json(value: Any) -> Any:
    """JSON columns: SQLite hands back the text, PostgreSQL drivers the decoded value."""
    return json.loads(value) if isinstance(value, str) else value


def _params(op: str, stored: dict | None) -> dict:
    """A lineage's params as records name them: a merge (or subtract) recorded before named each adapter's reference
    `label`, which is `ref` in every record now; the row keeps what was written."""
    params = dict(stored or {})
    if op in ("merge", "subtract") and isinstance(params.get("adapters"), list):
        params["adapters"] = [{("ref" if key == "label" else key): value for key, value in entry.items()}
                              for entry in params["adapters"]]
    return params


def _time(value: datetime | str) -> datetime:
    """Stored times are UTC: SQLite hands back naive text, PostgreSQL an aware datetime."""
    return utc(datetime.fromisoformat(value) if isinstance(value, str) else value)


def utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def shown(items: Iterable[str]) -> str:
    items = list(items)
    return ", ".join(items[:SHOWN]) + (", …" if len(items) > SHOWN else "")


def looks_like_path(ref: str | int) -> bool:
    """Commands take a registry reference or a path; a reference that can only be a path (absolute, ./, ~/, or a
    file suffix) that matched nothing is reported as a missing path, which is what the user meant."""
    text = str(ref)
    return text.startswith(("/", "./", "../", "~")) or text.endswith((".safetensors", ".json", ".bin", ".pt"))
