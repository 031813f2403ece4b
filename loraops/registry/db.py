"""Database connection and schema migrations.

Every open brings the schema to the code's head: an empty database is created, an old one upgraded (Alembic) —
on SQLite; a server database's is refused with "run `loraops db upgrade`" (ensure_schema) —, one stamped with a revision this code does not know (written by a newer loraops) is refused. The common case —
already at head — costs one small query and does not import Alembic at all (HEAD, in reads.py, is kept equal to
the scripts' head by a test).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, SAWarning

from .. import settings
from ..errors import RegistryError
from ..fsutil import file_lock, refuse_existing, resolved
# (HEAD is part of this module's API: cli/db.py)
from .reads import HEAD, SQLITE_BUSY_TIMEOUT_MS, pg_connect_args, read_only_connection, sqlite_uri_of  # noqa: F401

OPEN_ATTEMPTS = 7  # reading the schema revision: about 3 s of back-off in all before "database is locked" is reported
MIGRATION_LOCK_KEY = 0x6C6F72616F7073  # "loraops": the PostgreSQL advisory lock migrations hold
_MIGRATING = threading.Lock()
LIBPQ_DRIVERS = ("psycopg", "psycopg2", "psycopg2cffi", "psycopg_async")  # (a plain postgresql:// is one of them)


def script_location() -> str:
    """Alembic scripts: those beside the loraops package that is running (the wheel's loraops/migrations, a
    checkout's migrations/), else wherever loraops.migrations imports from. In that order: an editable install of one
    checkout maps loraops.migrations there even for the loraops of another checkout (a git worktree) put first on
    the path, whose code expects its own revisions."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "migrations", package.parent / "migrations"):
        if (folder / "env.py").exists():
            return str(folder)
    spec = importlib.util.find_spec("loraops.migrations")
    if spec is not None and spec.submodule_search_locations:
        return str(Path(next(iter(spec.submodule_search_locations))))
    raise RegistryError("cannot find loraops' migration scripts (a broken install?); reinstall loraops")


def make_engine(url: str, *, create: bool = True, read_only: bool = False) -> Engine:
    """An engine for any SQLAlchemy URL; SQLite gets WAL, a busy timeout, enforced foreign keys and transactions
    that start when asked (so writers take the lock up front instead of failing on upgrade), and its folder made
    unless ``create`` is false. ``read_only`` (SQLite): open the file immutable and read-only, for a registry in a
    folder this process cannot write (WAL needs its -shm file beside the database even to read)."""
    parsed = parse_url(url)
    file = settings.sqlite_file(parsed.database, parsed.query) if parsed.get_backend_name() == "sqlite" else None
    if parsed.get_backend_name() == "sqlite" and file is None:
        # What it recorded was gone when the command ended, and with no file to keep a store beside, its blob store
        # was the home's: `gc` on it removed every stored adapter of the home's registry.
        raise RegistryError(f"{url}: an in-memory SQLite database cannot hold a registry (it is gone "
                            "when the command ends); give a file, e.g. sqlite:////path/registry.db")
    try:
        # (without a timeout, `list` hung on a server not answering; connect_timeout is libpq's: pg8000's connect()
        # refuses the argument)
        if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in LIBPQ_DRIVERS:
            return _create_engine(parsed, pool_pre_ping=True, connect_args=pg_connect_args(url))
        if parsed.get_backend_name() != "sqlite":
            return _create_engine(parsed, pool_pre_ping=True)
        if read_only:
            database = resolved(file)
            # immutable: SQLite then needs no -shm beside the file, but also ignores a -wal, whose commits a
            # reader must see: plain read-only while one exists (a writer is running, or crashed)
            query = {"mode": "ro", "uri": "true"}
            if not database.with_name(database.name + "-wal").exists():
                query["immutable"] = "1"
            parsed = parsed.set(database=sqlite_uri_of(database), query=query)
            create = False
        elif file.is_absolute():  # the file settings.sqlite_file names (a leading ~ expanded), the store's neighbour
            # (a relative path stays as written: str(Path('./~/reg.db')) is '~/reg.db', which reads as a home)
            uri = settings.sqlite_uri(parsed.database, parsed.query)
            parsed = parsed.set(database=sqlite_uri_of(file) if uri else str(file))
        engine = _create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    except ImportError as exc:
        raise RegistryError(f"cannot use the registry at {_safe_url(parsed)}: its database driver is not installed "
                            f"({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - an unknown dialect, a bad option: one line naming the database
        raise RegistryError(f"cannot use the registry at {_safe_url(parsed)}: {_first_line(exc)}") from None
    if create and file is not None:
        refuse_existing(file, force=True)  # a file in the way of its folder: named (mkdir said "File exists")
        file.parent.mkdir(parents=True, exist_ok=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cursor = dbapi_connection.cursor()
        if not read_only:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        # Writers take the write lock when their transaction starts: a deferred transaction that later needs to
        # write can fail at once with "database is locked" instead of waiting for the busy timeout.
        mode = "IMMEDIATE" if connection.get_execution_options().get("loraops_write") else "DEFERRED"
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def parse_url(url) -> "URL":
    """A registry URL (a string or a SQLAlchemy URL) parsed, or one RegistryError line that does not echo it."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - never echo a string that may hold a password
        raise RegistryError("the registry URL is not a SQLAlchemy database URL (dialect[+driver]://user@host/name, "
                            "e.g. postgresql+psycopg://me@db.example/loraops or sqlite:////path/registry.db)") from None
    if parsed.password is not None and "@" in (parsed.host or ""):
        # SQLAlchemy (as libpq) ends the password at its first '@': the rest of it was shown as the host, masked
        # URL and driver error alike ("failed to resolve host 'ss@db.example'")
        shown = _safe_url(parsed.set(host=parsed.host.rpartition("@")[2]))
        raise RegistryError(f"the registry URL {shown} has '@' in its password, which a URL writes as %40 (read "
                            "as it is, the password ends at the first '@' and the rest is taken for the host)")
    return parsed


def refuse_bad_url(url: str) -> None:
    """One RegistryError line for a registry URL that is not one, or whose dialect SQLAlchemy does not know, in the
    words make_engine would use: checked before anything else is asked of the registry (its blob store)."""
    parsed = parse_url(url)
    try:
        parsed.get_dialect()
    except Exception as exc:  # noqa: BLE001 - an unknown dialect or driver: one line naming the database
        raise RegistryError(f"cannot use the registry at {_safe_url(parsed)}: {_first_line(exc)}") from None


def _create_engine(url, **options) -> Engine:
    """create_engine, with SQLAlchemy's warnings about the URL raised as errors: an SQLite query argument the driver
    ignores (`?mode=ro`) was printed as three lines of warning, and the URL used as if it had not been given."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SAWarning)
        return create_engine(url, **options)


def writer_lock(engine: Engine):
    """Held around a whole write transaction. SQLite admits one writer at a time and makes the others poll,
    sleeping up to 100 ms between tries, so with many writers most of the time goes to sleeping; writers of a
    SQLite file queue on a file lock next to it instead (<file>.writer-lock), woken the moment it is free.
    Server databases need none."""
    path = sqlite_file(engine)
    if path is None:
        return contextlib.nullcontext()
    return file_lock(path.with_name(path.name + settings.WRITER_LOCK))


def sqlite_file(engine: Engine) -> Path | None:
    """The file of an SQLite registry (a read-only one's URL names it file:PATH), else None."""
    if engine.url.get_backend_name() != "sqlite":
        return None
    return settings.sqlite_file(engine.url.database, engine.url.query)


def writer(engine: Engine) -> Engine:
    """The same engine, for transactions that write (SQLite: BEGIN IMMEDIATE)."""
    return engine.execution_options(loraops_write=True)


def current_revision(connection: Connection) -> str | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def unversioned_tables(connection: Connection) -> list[str]:
    """loraops' tables in a database that records no schema revision (call it when current_revision is None): its
    alembic_version table was dropped or emptied. [] for a database that is empty of them."""
    from .models import Base

    return sorted(set(inspect(connection).get_table_names()) & set(Base.metadata.tables))


def unversioned(tables: list[str]) -> str:
    """What a database with loraops' tables but no recorded revision is, and what to do about it."""
    shown = ", ".join(tables[:4]) + (", …" if len(tables) > 4 else "")
    return (f"holds loraops' tables ({shown}) but records no schema revision (its alembic_version table was dropped "
            f"or emptied), so no command migrates it; `loraops db stamp` records revision {HEAD} once it has checked "
            "that the tables are exactly that revision's, else restore alembic_version from a backup")


def stamp(engine: Engine) -> bool:
    """Record revision HEAD in a database that holds loraops' tables but no revision (see unversioned), after
    checking that its tables are exactly HEAD's (Alembic's autogenerate comparison, as `alembic check` makes it): an
    older schema stamped as HEAD would never get the migrations it lacks. False when it records HEAD already."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from .models import Base

    config = alembic_config()
    with _migration(engine, "stamp") as connection:
        current = current_revision(connection)
        if current is not None:
            if current == HEAD:
                return False
            if not known_revision(current):  # (`db upgrade` refuses it too)
                raise RegistryError(f"the registry at {_safe(engine)} already records revision {current}, written by "
                                    "a newer loraops; upgrade loraops")
            raise RegistryError(f"the registry at {_safe(engine)} already records revision {current}; "
                                "`loraops db upgrade` migrates it")
        if not unversioned_tables(connection):
            raise RegistryError(f"the registry at {_safe(engine)} holds no loraops tables; `loraops db upgrade` creates "
                                "them")
        # only loraops' own tables: a database shared with other software holds tables the models lack
        ours = {"compare_type": True, "include_name": lambda name, kind, _parents: kind != "table"
                or name in Base.metadata.tables}
        differences = compare_metadata(MigrationContext.configure(connection, opts=ours), Base.metadata)
        if differences:
            raise RegistryError(f"the registry at {_safe(engine)}: its tables are not those of revision {HEAD} "
                                f"({len(differences)} difference(s), the first: {str(differences[0])[:200]}); "
                                "restore its alembic_version table from a backup")
        config.attributes["connection"] = connection
        command.stamp(config, "head")
    return True


def ensure_schema(engine: Engine, *, explicit: bool = False) -> None:
    """Bring the database to HEAD (see the module docstring). A server database (PostgreSQL) at an older revision is
    refused unless ``explicit`` (`loraops db upgrade`): it is shared, and upgrading it makes every teammate's older
    loraops refuse it, so a member's first command after upgrading loraops (even `list`) must not do that silently.
    An empty one is still created: no one uses it yet."""
    for attempt in range(OPEN_ATTEMPTS):
        try:
            with engine.connect() as connection:
                current = current_revision(connection)
            break
        except Exception as exc:  # noqa: BLE001 - any driver error becomes one line naming the database
            # SQLite can answer a reader "database is locked" without waiting (a connection setting up the WAL, or
            # recovering it, while others write: seen under load with threads registering into a new registry)
            if attempt + 1 < OPEN_ATTEMPTS and "database is locked" in str(exc).lower():
                time.sleep(0.05 * 2 ** attempt)
                continue
            raise cannot_open(engine.url, exc) from None
    if current != HEAD:
        upgrade(engine, only_empty=not explicit and engine.dialect.name != "sqlite")


def upgrade(engine: Engine, revision: str = "head", *, only_empty: bool = False) -> None:
    """Migrate to ``revision``. Concurrent openers are serialised (SQLite: the write lock; PostgreSQL: an advisory
    lock), and each re-reads the revision once it holds the lock, so only the first one migrates. ``only_empty``:
    refuse a database at an older revision (what it holds once the lock is ours: another loraops may have created
    it at its own revision since the caller read none)."""
    from alembic import command
    from alembic.script import ScriptDirectory

    config = alembic_config()
    script = ScriptDirectory.from_config(config)
    with _migration(engine, "migrate") as connection:
        current = current_revision(connection)
        if revision == "head" and current == HEAD:
            return
        tables = unversioned_tables(connection) if current is None else []
        if tables:  # Alembic would create its first revision's tables over them (a driver error, at best)
            raise RegistryError(f"the registry at {_safe(engine)} {unversioned(tables)}")
        if current is not None and not _known(script, current):
            raise RegistryError(
                f"this registry was written by a newer loraops (revision {current}); upgrade loraops"
            )
        if current is not None and only_empty:
            raise RegistryError(f"the registry at {_safe(engine)} is at schema revision {current}, older than this "
                                f"loraops' {HEAD}; it is shared, so it is not upgraded implicitly (older loraops "
                                "installs would then refuse it): run `loraops db upgrade` once its users are ready")
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


@contextlib.contextmanager
def _migration(engine: Engine, verb: str) -> Iterator[Connection]:
    """_migrating, one at a time in this process too (Alembic's migration context is process-global), with any
    driver or Alembic error one line naming the database ("cannot {verb} the registry at …")."""
    try:
        with _MIGRATING, _migrating(engine) as connection:
            yield connection
    except RegistryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any driver/alembic error becomes one line naming the database
        raise RegistryError(f"cannot {verb} the registry at {_safe(engine)}: {_first_line(exc)}") from None


def known_revision(revision: str) -> bool:
    """Is this a schema revision this loraops has a migration script for (else a newer loraops wrote it)?"""
    from alembic.script import ScriptDirectory

    return _known(ScriptDirectory.from_config(alembic_config()), revision)


def _known(script, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except Exception:  # noqa: BLE001 - alembic raises several types for an unknown revision
        return False


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    config = alembic_config()
    with _MIGRATING, _migrating(engine) as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


@contextlib.contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    """A write transaction for a migration, holding the migration lock. On SQLite, foreign-key enforcement is off inside it: Alembic alters an
    SQLite table by copying it, dropping the original and renaming the copy, and with enforcement on, dropping
    `adapters` deletes every module and tag row (ON DELETE CASCADE) and dropping `bases` unlinks every adapter
    (SET NULL). The pragma only takes effect outside a transaction, so it is set before BEGIN; the keys are checked
    before the commit instead, and enforcement is back on before the connection returns to the pool."""
    connection = writer(engine).connect()
    sqlite = connection.dialect.name == "sqlite"
    try:
        if sqlite:
            connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        with connection.begin():
            if connection.dialect.name == "postgresql":  # (SQLite: the write lock BEGIN IMMEDIATE took)
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            # rows that were already broken (a hand edit with the sqlite3 shell, whose keys are off) are not ours
            before = set(connection.exec_driver_sql("PRAGMA foreign_key_check").all()) if sqlite else set()
            yield connection
            if sqlite:
                broken = set(connection.exec_driver_sql("PRAGMA foreign_key_check").all()) - before
                if broken:
                    table, rowid, *_ = min(broken, key=str)
                    raise RegistryError(f"the migration would break a reference from table {table!r} (row {rowid}); "
                                        "the registry was left as it was")
    finally:
        if sqlite:
            connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")
        connection.close()


def alembic_config():
    from alembic.config import Config

    import sys

    # (alembic's default stdout is the sys.stdout of the moment alembic.config was first imported: under a redirect,
    # such as click's CliRunner, a stream that is closed later)
    config = Config(stdout=sys.stdout)
    config.set_main_option("script_location", script_location())
    return config


def read_only_fallback(engine: Engine) -> Engine | None:
    """A read-only engine on the same SQLite file, when it exists (None for other databases): what a registry in a
    folder this process may not write falls back to."""
    path = sqlite_file(engine)
    if path is None or engine.url.database.startswith("file:") or not path.is_file():
        return None
    return make_engine(engine.url.render_as_string(hide_password=False), read_only=True)


def unwritable(engine: Engine) -> bool:
    """An SQLite file this process may read but not write, or in a folder it may not write (where SQLite makes its
    -wal and -shm and loraops its writer lock). With the -wal and -shm already there it opens and reads as if
    writable, and the first write failed after the work (a merge's output written, then not recorded)."""
    path = sqlite_file(engine)
    if path is None or engine.url.database.startswith("file:") or not path.is_file():
        return False
    return not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))


def read_only_here(database: Path) -> str:
    """How messages say that the SQLite registry ``database`` is read-only for this process, and why."""
    why = ("this process cannot write the file" if os.access(database.parent, os.W_OK)
           else "it is in a folder this process cannot write")
    return f"the registry {database} is read-only here ({why})"


def missing_sqlite_file(engine: Engine) -> bool:
    """An SQLite registry whose file does not exist yet (connecting would create it), or is empty (what SQLite opens
    as an empty database: a mistyped path to an empty file, which opening the registry filled with its tables)."""
    path = sqlite_file(engine)
    return path is not None and (not path.exists() or (path.is_file() and path.stat().st_size == 0))


CREATED_BY = "a command that records creates it, as does `loraops db upgrade`"


def refuse_missing(engine: Engine) -> None:
    """One RegistryError line naming the file, for an SQLite registry that does not exist, where creating it would
    only hide a mistyped URL (commands that add no record)."""
    if missing_sqlite_file(engine):
        why = "is empty" if sqlite_file(engine).exists() else "does not exist"
        raise RegistryError(f"no registry at {sqlite_file(engine)}: the file {why} (a mistyped --db or "
                            f"LORAOPS_DB? {CREATED_BY})")


def refuse_foreign(engine: Engine) -> None:
    """One RegistryError line for a database that holds tables, none of them loraops' (another application's file
    given to --db or LORAOPS_DB): opening it as a registry wrote loraops' tables into it (and, SQLite, switched it to
    WAL, which rewrites its header), even for a command that only reads. Checked before the engine first connects;
    SQLite's file is read over a read-only connection of its own, which changes nothing. A database shared with other
    software, once it holds loraops' tables, is no foreign one; `loraops db upgrade` (which does not check) creates
    them beside the others when that is meant."""
    from .models import Base

    tables = set(_table_names(engine)) - {"alembic_version"}
    if tables and not tables & set(Base.metadata.tables):
        shown = ", ".join(sorted(tables)[:4]) + (", …" if len(tables) > 4 else "")
        raise RegistryError(f"the database at {_safe(engine)} is not a loraops registry (it holds other tables: "
                            f"{shown}); nothing was changed in it: give --db a loraops registry or a new file, or run "
                            f"`loraops --db URL db upgrade` to add loraops' tables beside its own")


def _table_names(engine: Engine) -> list[str]:
    path = sqlite_file(engine)
    if path is None:
        with connected(engine) as connection:
            return inspect(connection).get_table_names()
    if missing_sqlite_file(engine) or not path.is_file():
        return []  # (nothing there yet: the engine's own connection says what is wrong)
    import sqlite3

    try:
        with read_only_connection(path) as connection:  # (also of a file: URI's file, which may say mode=rw)
            return [name for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    except sqlite3.Error:
        return []  # (not a database, unreadable: the engine's own connection says so in its words)


def _safe(engine: Engine) -> str:
    return _safe_url(engine.url)


def _safe_url(url) -> str:
    return url.render_as_string(hide_password=True)


@contextlib.contextmanager
def connected(engine: Engine) -> Iterator[Connection]:
    """A connection, or one RegistryError line naming the database (unreachable server, unreadable file, …)."""
    try:
        connection = engine.connect()
    except Exception as exc:  # noqa: BLE001 - any driver error becomes one line naming the database
        raise cannot_open(engine.url, exc) from None
    with connection:
        yield connection


def cannot_open(url, exc: BaseException) -> RegistryError:
    """The one line for a registry that cannot be reached or opened (its URL, a string or a SQLAlchemy URL, shown
    without its password)."""
    return RegistryError(f"cannot open the registry at {_safe_url(parse_url(url))}: {_first_line(exc)}")


def failed(exc: BaseException, url: str) -> RegistryError | None:
    """The one line for a database error that escaped a read (a page damaged by a crash or a bad disk, a table gone):
    the driver's own (sqlite3, psycopg) or SQLAlchemy's wrapping of it, which opening the registry did not meet; None
    for any other exception. It was a traceback from `list`, `show`, `verify`, `gc` (writes say what they could not
    do: Registry.write)."""
    drivers = tuple(getattr(sys.modules.get(name), "DatabaseError", None) for name in ("sqlite3", "psycopg"))
    if not isinstance(exc, (DBAPIError, *(d for d in drivers if d is not None))):
        return None
    return RegistryError(f"the registry at {_safe_url(parse_url(url))} failed: {_first_line(exc)} (is its database "
                         "damaged? restore it from a backup)")


def _first_line(exc: BaseException) -> str:
    """The driver's own first line: SQLAlchemy's wrapper prefixes it with the driver's class ("(psycopg.Operational
    Error) connection failed: …"), which the plain reads (reads.reader, over the driver) did not say."""
    exc = getattr(exc, "orig", None) or exc
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
