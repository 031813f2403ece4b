"""The registry's plain-SQL reads (loraops.registry.reads): the same records through the Registry's SQLAlchemy
connection and straight over the driver, both checked against the ORM rows; the driver path falls back to
Registry.open (create, migrate, refuse) whenever the schema is not at head."""
from __future__ import annotations

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from loraops import settings
from loraops.st import torch_name
from loraops.errors import NotFoundError, RegistryError
from loraops.records import LineageInput, LineageSpec
from loraops.registry import Registry, db, reads
from loraops.registry.models import SqlAdapter, SqlBase
from test_registry_cli import art  # noqa: F401 - the same models and adapters (a module fixture)

pytestmark = pytest.mark.registry_backend  # the registry's own code: run on PostgreSQL too (conftest.py)

ADAPTER_COLUMNS = ("id", "name", "version", "sha256", "weights_sha256", "format", "dtype", "size", "num_parameters",
                   "rank", "alpha", "scale_mode", "target_modules", "base_hint", "source")
BASE_COLUMNS = ("id", "name", "fingerprint", "source", "path", "num_tensors", "num_parameters", "dtype", "total_bytes",
                "derived")
FILTERS = [{}, {"rank": 4}, {"rank": 8}, {"target": "v_proj"}, {"tag": "sd"}, {"base": "llama-tiny"}, {"name": "combo"}]


@pytest.fixture
def filled(art):  # noqa: F811 - art is the imported module fixture
    """Adapters with and without a base, tags, lineage; a derived base with lineage."""
    with Registry.open() as reg:
        reg.add_adapter(art["ad1"], name="unbound", alpha=2)  # before any base: no base link
        b = reg.add_base(art["base"], name="llama-tiny")
        reg.add_base(art["other"], name="merged", lineage=LineageSpec(
            op="merge", params={"weights": [1.0, 0.5]}, inputs=[LineageInput(kind="base", id=b.id, role="base")]))
        a = reg.add_adapter(art["ad1"], tags=["b", "a"])
        k = reg.add_adapter(art["kohya"], name="style", base="llama-tiny", tags=["sd"])
        reg.add_adapter(art["ad1"], name="combo", alpha=3, lineage=LineageSpec(
            op="combine", params={"method": "cat", "nested": {"x": [1, 2]}},
            inputs=[LineageInput(kind="adapter", id=a.id, weight=0.5), LineageInput(kind="adapter", id=k.id)]))
    return settings.db_url()


@pytest.fixture
def opens(monkeypatch) -> list:
    """The URLs Registry.open is called with (the driver path never calls it)."""
    opened = []
    real_open = Registry.open.__func__
    monkeypatch.setattr(Registry, "open",
                        classmethod(lambda cls, url=None, **kw: opened.append(url) or real_open(cls, url, **kw)))
    return opened


def everything(r) -> list:
    """Every read a Reader (or a Registry) offers, as the JSON the CLI prints."""
    found = [r.list_adapters(**f) for f in FILTERS] + [r.list_bases(), r.get_adapter("combo"), r.get_adapter("ad1@1"),
                                                       r.get_base("merged"), r.find_base(r.get_base("llama-tiny").fingerprint)]
    return [x.model_dump(mode="json") if hasattr(x, "model_dump") else [y.model_dump(mode="json") for y in x] for x in found]


def test_driver_and_registry_paths_give_identical_records(filled, opens):
    with Registry.open() as reg:
        via_sqlalchemy = everything(reg)
    opens.clear()
    with reads.reader() as r:
        direct = everything(r)
        with pytest.raises(NotFoundError, match="^no adapter with id 999 in the registry$"):
            r.adapter(999)  # e.g. removed between resolving a reference and reading it
    assert opens == []  # straight over the driver
    assert direct == via_sqlalchemy
    everyone = ["ad1", "combo", "style", "unbound"]
    assert [[a["name"] for a in found] for found in direct[:len(FILTERS)]] == [
        everyone, everyone, [], ["ad1", "combo", "unbound"], ["style"], ["ad1", "combo", "style"], ["combo"]]


def test_records_match_the_orm_rows(filled):
    """An oracle independent of the SQL: the ORM's own typed values (JSON, booleans, times, relationships)."""
    with Registry.open() as reg, Session(reg.engine) as s:
        adapters = {a.id: a for a in reg.list_adapters()}
        rows = s.scalars(select(SqlAdapter)).all()
        assert sorted(adapters) == sorted(row.id for row in rows)
        for row in rows:
            record = adapters[row.id]
            assert {c: getattr(record, c) for c in ADAPTER_COLUMNS} == {c: getattr(row, c) for c in ADAPTER_COLUMNS}
            assert record.created == reads.utc(row.created) and record.path == str(reg.blobs.path(row.blob))
            assert record.tags == sorted(t.tag for t in row.tags)
            assert (record.base and record.base.model_dump()) == (
                row.base and dict(id=row.base.id, name=row.base.name, fingerprint=row.base.fingerprint))
            assert [m.model_dump() for m in record.modules] == [
                dict(name=m.name, kind=m.kind, rank=m.rank, alpha=m.alpha, scale=m.scale, in_features=m.in_features,
                     out_features=m.out_features, kernel=m.kernel and tuple(m.kernel)) for m in row.modules]
            assert_lineage(record.lineage, row.lineage)
        bases = {b.id: b for b in reg.list_bases()}
        for row in s.scalars(select(SqlBase)):
            record = bases[row.id]
            # (the column keeps the manifest's safetensors name, BF16; a record says torch's, as every --json)
            assert {c: getattr(record, c) for c in BASE_COLUMNS} == {
                **{c: getattr(row, c) for c in BASE_COLUMNS}, "dtype": torch_name(row.dtype)}
            assert record.created == reads.utc(row.created)
            assert_lineage(record.lineage, row.lineage)
        assert sum(a.lineage is not None for a in adapters.values()) == sum(b.lineage is not None for b in bases.values()) == 1


def assert_lineage(record, row) -> None:
    assert (record is None) == (row is None)
    if row is not None:
        assert (record.id, record.op, record.params, record.created) == (row.id, row.op, row.params, reads.utc(row.created))
        assert [(i.kind, i.id, i.ref, i.sha256, i.weight, i.role) for i in record.inputs] == [
            (i.kind, i.adapter_id if i.kind == "adapter" else i.base_id, i.label, i.sha256, i.weight, i.role)
            for i in row.inputs]


@pytest.mark.empty_db
def test_driver_path_falls_back_unless_at_head(art, opens):  # noqa: F811
    url = settings.db_url()

    with reads.reader() as r:  # no database yet (SQLite) or an empty schema: created through Registry.open
        assert r.list_adapters() == []
    assert opens == [url]
    with Registry.open() as reg:
        reg.add_adapter(art["ad1"])
    opens.clear()
    with reads.reader() as r:
        assert [a.name for a in r.list_adapters()] == ["ad1"]
    assert opens == []  # at head: straight over the driver

    engine = db.make_engine(url)
    db.downgrade(engine, "0001")
    if engine.dialect.name != "sqlite":  # a server registry is upgraded only when asked (test_migrations)
        with pytest.raises(RegistryError, match=r"older than this loraops.*`loraops db upgrade`"):
            with reads.reader():
                pass
        db.ensure_schema(engine, explicit=True)
    with reads.reader() as r:  # an old schema is upgraded first, rows kept
        assert [a.name for a in r.list_adapters()] == ["ad1"]
    assert opens == [url]
    with engine.begin() as c:
        assert db.current_revision(c) == db.HEAD
        c.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    with pytest.raises(RegistryError, match=r"^this registry was written by a newer loraops \(revision f00d\)"):
        with reads.reader():
            pass
    engine.dispose()


def test_list_table_counts_modules_without_loading_them(monkeypatch, tmp_path):
    """`list`'s table shows how many modules each adapter has: counted in SQL, not built as records (1,000 adapters
    of 224 modules took 1.6 s and 354 MB); `--json` still lists them, with the same count."""
    import json as json_module

    from click.testing import CliRunner

    from factories import peft_adapter, tiny_llama
    from loraops.cli import main
    from loraops.records import ModuleRecord

    base = tiny_llama(tmp_path / "base")
    runner = CliRunner()
    assert runner.invoke(main, ["register", str(peft_adapter(base, tmp_path / "a", r=4))]).exit_code == 0
    listed = json_module.loads(runner.invoke(main, ["list", "--json"]).output)
    assert listed[0]["num_modules"] == len(listed[0]["modules"]) > 0

    def no_module_records(*args, **kwargs):
        raise AssertionError("a module record was built")

    monkeypatch.setattr(ModuleRecord, "__init__", no_module_records)
    table = runner.invoke(main, ["list"]).output.splitlines()
    assert table[2].split()[5] == str(listed[0]["num_modules"])


def _foreign_wal_database(path) -> None:
    """Another application's SQLite file in WAL mode whose last commit is still in its -wal (not checkpointed: the
    application is running, or was killed)."""
    import shutil
    import sqlite3

    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA wal_autocheckpoint=0")
    connection.execute("CREATE TABLE notes (body TEXT)")
    connection.execute("INSERT INTO notes VALUES ('keep me')")
    connection.commit()
    for suffix in ("", "-wal"):  # copied while open: closing the last connection would checkpoint
        shutil.copy(f"{path}{suffix}", f"{path}.copy{suffix}")
    connection.close()
    for suffix in ("", "-wal"):
        shutil.move(f"{path}.copy{suffix}", f"{path}{suffix}")


@pytest.mark.sqlite_only
@pytest.mark.parametrize("form", ["plain", "file: URI"])
def test_a_foreign_wal_database_is_refused_with_its_bytes_and_wal_untouched(tmp_path, form):
    """`list` of another application's WAL database: the fast read's read-write connection, closing, folded the
    -wal into the file before Registry.open refused it ('nothing was changed in it' was not so); given as a `file:`
    URI (sqlite:///file:PATH?mode=rw&uri=true) it was not checked at all and got loraops' tables. Both forms are
    refused in one line, the file and its -wal byte for byte as they were."""
    from test_registry_cli import cli

    database = tmp_path / "notes.db"
    _foreign_wal_database(database)
    wal = tmp_path / "notes.db-wal"
    before = database.read_bytes(), wal.read_bytes()
    assert before[1]
    url = f"sqlite:///{database}" if form == "plain" else f"sqlite:///file:{database}?mode=rw&uri=true"
    for args in (["list"], ["base", "list"], ["show", "x"]):
        result = cli("--db", url, *args, code=6)
        assert result.output.count("\n") == 1 and "is not a loraops registry (it holds other tables: notes)" in \
            result.output, result.output
        assert (database.read_bytes(), wal.read_bytes()) == before, args


@pytest.mark.sqlite_only
def test_a_foreign_wal_database_is_refused_with_its_folder_as_it_was(tmp_path):
    """`list` of another application's WAL database that was closed cleanly (no -wal, no -shm): refused, but the
    read-only connections of the fast read and of the foreign-database check made an empty -wal and a -shm beside it
    and left them there. They go; a -wal that holds another application's commits is left as it is (theirs to fold
    into the file, not ours), and so is the file."""
    import sqlite3

    from test_registry_cli import cli

    database = tmp_path / "notes.db"
    connection = sqlite3.connect(database)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE notes (body TEXT)")
    connection.commit()
    connection.close()
    before = database.read_bytes()
    for args in (["list"], ["base", "list"], ["show", "x"]):
        result = cli("--db", f"sqlite:///{database}", *args, code=6)
        assert "is not a loraops registry" in result.output
        assert [p.name for p in tmp_path.iterdir()] == ["notes.db"] and database.read_bytes() == before, args
    database.unlink()
    _foreign_wal_database(database)
    wal = tmp_path / "notes.db-wal"
    before = database.read_bytes(), wal.read_bytes()
    reads._close_wal(database, empty_only=True)
    assert (database.read_bytes(), wal.read_bytes()) == before


def test_a_reference_that_is_not_utf8_is_invalid_input_on_either_path(filled):
    """The driver's UnicodeEncodeError (a traceback in `show $'b\\xff'`): over the driver and the Registry's own
    connection alike, a reference with bytes that are not UTF-8 is refused in one line."""
    from loraops.errors import InvalidInputError

    with reads.reader() as fast, Registry.open() as registry:
        for lookup in (fast.get_adapter, fast.get_base, registry.get_adapter, registry.get_base):
            with pytest.raises(InvalidInputError, match=r"^'b\\udcff' is not UTF-8 text, as every name and path "):
                lookup("b\udcff")


@pytest.mark.sqlite_only
def test_a_registry_at_a_path_that_is_not_utf8_is_read(tmp_path):
    """A registry in a folder whose name is not UTF-8 (os.fsdecode makes its bytes surrogates): its file: URI quoted
    the name as text, a UnicodeEncodeError traceback: opening it (the foreign-database check) failed so, and `list`
    too once its fast read went over that URI. The URI now says the name's bytes (%FF)."""
    import os

    from test_registry_cli import cli

    from loraops.registry.store import Registry

    folder = tmp_path / os.fsdecode(b"reg-\xff")
    folder.mkdir()
    url = f"sqlite:///{folder / 'reg.db'}"
    Registry.open(url).close()
    assert cli("--db", url, "list").output.splitlines()[0].split()[:2] == ["id", "name"]
    # the `db` commands print the URL: shown escaped (the name's byte as \udcff), as errors show paths
    for command in ("current", "upgrade", "stamp"):
        result = cli("--db", url, "db", command)
        assert result.exit_code == 0 and "reg-\\udcff" in result.output, result.output


def wal_files() -> set[str]:
    database = settings.sqlite_database()
    return {p.name for p in database.parent.iterdir() if p.name.startswith(database.name + "-")}


@pytest.mark.sqlite_only  # SQLite's own -wal/-shm files
def test_a_read_leaves_no_wal_files_it_made(filled, opens):  # noqa: F811
    """A read over the driver's read-only connection made an empty -wal and -shm beside the registry and could not
    remove them (every `list` left them): they go as it ends, by SQLite's own close."""
    assert wal_files() == set()
    with reads.reader() as r:
        assert r.list_adapters() and wal_files() == {"registry.db-wal", "registry.db-shm"}
    assert opens == [] and wal_files() == set()


@pytest.mark.sqlite_only  # SQLite's own -wal/-shm files
def test_a_read_leaves_the_wal_of_an_open_writer_and_what_it_committed(filled):  # noqa: F811
    """-wal and -shm that were there before the read (a writer's, open now) are none of its business: kept, and
    the writer's commit with them."""
    import sqlite3

    writer = sqlite3.connect(settings.sqlite_database(), isolation_level=None)
    try:
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.execute("UPDATE adapters SET name = 'renamed' WHERE name = 'style'")
        with reads.reader() as r:
            assert {a.name for a in r.list_adapters()} >= {"renamed"}
        assert wal_files() == {"registry.db-wal", "registry.db-shm"}
    finally:
        writer.close()
    with reads.reader() as r:
        assert {a.name for a in r.list_adapters()} >= {"renamed"}


@pytest.mark.sqlite_only  # SQLite's own -wal/-shm files
def test_a_read_through_a_symlink_leaves_the_wal_a_crashed_writer_left(filled, tmp_path):  # noqa: F811
    """A registry.db that is a symlink: SQLite keeps the -wal and -shm beside the file it names. Those a killed
    writer left there (commits not yet in the file) are kept by a read through the link, and the file is not
    rewritten: the read's own clean-up folded that -wal into the file and removed it, looking for it beside the link."""
    import subprocess
    import sys

    database = settings.sqlite_database()
    subprocess.run([sys.executable, "-c", "import os, sqlite3, sys\n"
                    "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                    "c.execute('PRAGMA wal_autocheckpoint=0')\n"
                    "c.execute(\"UPDATE adapters SET name = 'renamed' WHERE name = 'style'\")\n"
                    "os._exit(0)", str(database)], check=True)
    assert wal_files() == {"registry.db-wal", "registry.db-shm"}
    before = database.read_bytes()
    link = tmp_path / "elsewhere" / "registry.db"
    link.parent.mkdir()
    link.symlink_to(database)
    with reads.reader(f"sqlite:///{link}") as r:
        assert "renamed" in {a.name for a in r.list_adapters()}
    assert wal_files() == {"registry.db-wal", "registry.db-shm"} and database.read_bytes() == before
