"""`loraops db upgrade | current | stamp`: the registry schema (every other command upgrades an SQLite registry by
itself, too; a server's only through `db upgrade`)."""
from __future__ import annotations

import click

from loraops.cli import one_line
from loraops.cli.render import echo_json, json_option
from loraops.landing import interrupts_deferred, tell


@click.group()
def db() -> None:
    """The registry database's schema revision (Alembic)."""


def _engine(create: bool = True):
    from .. import settings
    from ..registry import db as regdb

    return regdb, regdb.make_engine(settings.db_url(), create=create)


def _changed(engine, before: str | None, head: str, as_json: bool, text: str) -> None:
    """What `db upgrade` or `db stamp` did: the revision ``before`` and after (``head``) as a DbChange, or ``text``
    after the registry's URL."""
    from ..records import DbChange

    if as_json:
        echo_json(DbChange(url=_url(engine), before=before, after=head))
    else:
        click.echo(f"{_url(engine)}: {text}")


@db.command()
@json_option("the DbChange (revision before and after)")
def upgrade(as_json: bool) -> None:
    """Bring the registry schema to this loraops' revision."""
    regdb, engine = _engine()
    if regdb.unwritable(engine):  # (at head too it failed "attempt to write a readonly database", as db current did)
        _read_only_upgrade(regdb, engine)
        before = regdb.HEAD
    else:
        before = _upgraded(regdb, engine)
    _changed(engine, before, regdb.HEAD, as_json, f"already at revision {regdb.HEAD} (head)" if before == regdb.HEAD
             else f"upgraded from {before or 'empty'} to {regdb.HEAD} (head)")


def _upgraded(regdb, engine) -> str | None:
    """The revision a writable registry had, now upgraded to head."""
    try:
        with regdb.connected(engine) as connection:
            before = regdb.current_revision(connection)
        with interrupts_deferred():  # (as every other command's open migrates): the commit and its line as one
            regdb.ensure_schema(engine, explicit=True)
            if before != regdb.HEAD:
                tell(f"interrupted after the registry was upgraded to revision {regdb.HEAD}")
    finally:
        engine.dispose()
    return before


def _read_only_upgrade(regdb, engine) -> None:
    """`db upgrade` of an SQLite registry this process may only read: at head, nothing to do (the caller says so);
    else refused."""
    from ..errors import RegistryError

    reading = regdb.read_only_fallback(engine) or engine  # (None: the file went since unwritable() saw it)
    try:
        with regdb.connected(reading) as connection:
            revision = regdb.current_revision(connection)
    finally:
        reading.dispose()
        engine.dispose()
    if revision != regdb.HEAD:
        raise RegistryError(f"{regdb.read_only_here(regdb.sqlite_file(engine))}: it cannot be upgraded from revision "
                            f"{revision or 'none'} to {regdb.HEAD} (head)")


@db.command()
@json_option("the DbRevision")
def current(as_json: bool) -> None:
    """Print the registry's schema revision (without changing it)."""
    from ..records import DbRevision

    regdb, engine = _engine(create=False)
    if regdb.missing_sqlite_file(engine):
        if as_json:
            echo_json(DbRevision(url=_url(engine), revision=None, head=regdb.HEAD, state="missing"))
        else:
            click.echo(f"{_url(engine)}: no registry there yet ({regdb.CREATED_BY})")
        return
    # a registry in a folder this process cannot write is read over a read-only connection, as `list` reads it
    # (SQLite's WAL needs the folder writable even to read): it failed "attempt to write a readonly database"
    reading = (regdb.read_only_fallback(engine) if regdb.unwritable(engine) else None) or engine
    try:
        regdb.refuse_foreign(reading)
        with regdb.connected(reading) as connection:
            revision = regdb.current_revision(connection)
            tables = regdb.unversioned_tables(connection) if revision is None else []
    finally:
        reading.dispose()
        engine.dispose()
    state = ("head" if revision == regdb.HEAD else "unversioned" if tables else "empty" if revision is None
             else "newer" if not regdb.known_revision(revision) else "behind")
    if as_json:
        echo_json(DbRevision(url=_url(engine), revision=revision, head=regdb.HEAD, state=state))
        return
    said = {"head": "(head)", "unversioned": f"(it {regdb.unversioned(tables)})",
            "empty": f"(empty; head is {regdb.HEAD}: any command creates it, or `loraops db upgrade`)",
            "newer": f"(written by a newer loraops; this one's head is {regdb.HEAD}: upgrade loraops)",
            "behind": f"(head is {regdb.HEAD}: run `loraops db upgrade`)"}[state]
    click.echo(f"{_url(engine)}: revision {revision or 'none'} {said}")


@db.command()
@json_option("the DbChange (revision before and after)")
def stamp(as_json: bool) -> None:
    """Record this loraops' schema revision in a registry whose tables are there but whose revision record was lost
    (checked: its tables must be exactly this revision's)."""
    regdb, engine = _engine(create=False)
    try:
        regdb.refuse_missing(engine)
        regdb.refuse_foreign(engine)
        with interrupts_deferred():  # (a Ctrl-C as it committed said "nothing was written")
            recorded = regdb.stamp(engine)
            if recorded:
                tell(f"interrupted after revision {regdb.HEAD} was recorded")
    finally:
        engine.dispose()
    # (stamp records a revision only where none was recorded)
    _changed(engine, None if recorded else regdb.HEAD, regdb.HEAD, as_json,
             f"recorded revision {regdb.HEAD} (head); its tables are that revision's" if recorded
             else f"already at revision {regdb.HEAD} (head): nothing to stamp")


def _url(engine) -> str:
    try:
        return engine.url.render_as_string(hide_password=True)
    except UnicodeEncodeError:  # an SQLite path whose name is not UTF-8 (surrogates), which SQLAlchemy cannot quote
        return one_line(f"{engine.url.drivername}:///{engine.url.database}")
