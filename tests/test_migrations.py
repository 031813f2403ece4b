"""Alembic migrations: from empty, every step up and down, no drift against the models, old schemas upgraded on
open, newer ones refused, and an installed wheel (not the checkout) migrating by itself."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from loraops import settings
from loraops.errors import RegistryError
from loraops.registry import Registry, db

pytestmark = pytest.mark.registry_backend  # the registry's own code: run on PostgreSQL too (conftest.py)

ROOT = Path(__file__).resolve().parents[1]


def engine():
    return db.make_engine(settings.db_url())


def revisions() -> list[str]:
    script = ScriptDirectory.from_config(db.alembic_config())
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def revision_of(eng) -> str | None:
    with eng.connect() as c:
        return db.current_revision(c)


def test_head_constant_and_file_names():
    assert revisions()[-1] == db.HEAD
    names = sorted(p.name for p in (ROOT / "migrations" / "versions").glob("2*.py"))
    assert len(names) == len(revisions()) >= 2
    for name, rev in zip(names, revisions()):
        date, rest = name.split("-", 1)
        assert len(date) == 8 and date.isdigit() and rest.startswith(f"{rev}_") and rest.count("_") >= 2


@pytest.mark.empty_db
def test_walk_every_revision_up_and_down():
    eng = engine()
    for rev in revisions():
        db.upgrade(eng, rev)
        assert revision_of(eng) == rev
    for rev in reversed(["base", *revisions()[:-1]]):
        db.downgrade(eng, rev)
        assert revision_of(eng) == (None if rev == "base" else rev)
    db.upgrade(eng)
    assert revision_of(eng) == db.HEAD


def test_no_drift_between_models_and_migrations():
    eng = engine()
    db.ensure_schema(eng)
    config = db.alembic_config()
    with eng.connect() as connection:
        config.attributes["connection"] = connection
        command.check(config)  # raises when autogenerate finds a difference


@pytest.mark.empty_db
def test_empty_database_is_created_on_open():
    with Registry.open() as reg:
        assert reg.revision() == db.HEAD
        assert {"adapters", "bases", "lineage", "adapter_modules"} <= set(inspect(reg.engine).get_table_names())


@pytest.mark.empty_db
def test_old_revision_is_upgraded_on_open_keeping_rows():
    """SQLite alters a table by copying and dropping it; with foreign keys enforced, dropping `adapters` deleted
    every module and tag (ON DELETE CASCADE) and dropping `bases` unlinked every adapter (SET NULL)."""
    eng = engine()
    db.upgrade(eng, "0001")
    with eng.begin() as c:
        c.execute(text(
            "INSERT INTO bases (name, fingerprint, source, path, num_tensors, num_parameters, dtype, total_bytes, created)"
            " VALUES ('old', 'ab12cd34', 'src', NULL, 1, 4, 'F32', 16, CURRENT_TIMESTAMP)"
        ))
        c.execute(text(
            "INSERT INTO adapters (sha256, weights_sha256, name, version, format, dtype, size, num_parameters, rank,"
            " alpha, scale_mode, target_modules, base_id, blob, files, created) SELECT 'id1', 'w1', 'style', 1,"
            " 'peft', 'F32', 1, 8, 4, 8, 'standard', '[\"q_proj\"]', id, 'ab/cd', '[]', CURRENT_TIMESTAMP FROM bases"
        ))
        c.execute(text(
            "INSERT INTO adapter_modules (adapter_id, name, target, kind, rank, alpha, scale, in_features,"
            " out_features) SELECT id, 'layers.0.q_proj', 'q_proj', 'linear', 4, 8, 2, 4, 4 FROM adapters"
        ))
        c.execute(text("INSERT INTO adapter_tags (adapter_id, tag) SELECT id, 'kept' FROM adapters"))

    def rows():
        with eng.connect() as c:
            return c.execute(text(
                "SELECT a.name, b.name, m.target, t.tag FROM adapters a JOIN bases b ON a.base_id = b.id"
                " JOIN adapter_modules m ON m.adapter_id = a.id JOIN adapter_tags t ON t.adapter_id = a.id"
            )).all()

    assert rows() == [("style", "old", "q_proj", "kept")]
    if eng.dialect.name != "sqlite":  # a shared registry is upgraded only when asked (the test below)
        db.ensure_schema(eng, explicit=True)
    with Registry.open() as reg:
        assert reg.revision() == db.HEAD
        base = reg.get_base("old")
        assert base.fingerprint == "ab12cd34" and base.derived is False and base.lineage is None
    assert rows() == [("style", "old", "q_proj", "kept")]
    db.downgrade(eng, "0001")
    assert rows() == [("style", "old", "q_proj", "kept")]
    if eng.dialect.name == "sqlite":
        with eng.connect() as c:
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # enforcement back on after migrating


@pytest.mark.empty_db
def test_an_older_server_registry_is_upgraded_only_by_db_upgrade(tmp_path):
    """A shared (PostgreSQL) registry at an older revision: `list`, `show` and `register` refuse it in one line and
    change nothing, since upgrading it makes every teammate's older loraops refuse it; `loraops db upgrade` upgrades
    it. An SQLite registry (one user's) is still upgraded by any command, `list` included."""
    from click.testing import CliRunner

    from factories import kohya_file
    from loraops.cli import main
    from test_concurrency import MODULES

    eng = engine()
    older = revisions()[-2]
    db.upgrade(eng, older)
    style = kohya_file(tmp_path / "style.safetensors", MODULES, rank=4)
    for args in (["list"], ["show", "style"], ["register", str(style)]):
        result = CliRunner().invoke(main, args)
        if eng.dialect.name == "sqlite":
            assert revision_of(eng) == db.HEAD
            return
        assert result.exit_code != 0 and result.output.count("\n") == 1, result.output
        assert f"schema revision {older}, older than" in result.output and "`loraops db upgrade`" in result.output
        assert revision_of(eng) == older
    upgraded = CliRunner().invoke(main, ["db", "upgrade"])
    assert upgraded.exit_code == 0 and revision_of(eng) == db.HEAD, upgraded.output
    assert CliRunner().invoke(main, ["register", str(style)]).exit_code == 0


@pytest.mark.empty_db
def test_team_md_shows_the_refusal_as_this_loraops_says_it():
    """docs/team.md's example of an older server registry's refusal named revisions 0005 and 0006, after 0007."""
    import re

    eng = engine()
    db.upgrade(eng, revisions()[-2])
    with pytest.raises(RegistryError) as refused:
        db.upgrade(eng, only_empty=True)  # what every command but `db upgrade` does with a server registry
    shown = re.search(r"^```\n(error: the registry at .*?)\n```", (ROOT / "docs" / "team.md").read_text(), re.M | re.S)
    url = re.match(r"error: the registry at (\S+) ", shown.group(1)).group(1)
    said = str(refused.value).replace(f" at {db._safe(eng)} ", f" at {url} ", 1)
    assert shown.group(1).replace("\n", " ") == f"error: {said}"


@pytest.mark.empty_db
def test_a_server_registry_created_at_an_older_revision_meanwhile_is_not_upgraded(monkeypatch):
    """The revision is read before the migration lock is taken: a database that was empty then, and that a teammate's
    older loraops created (at its own revision) before the lock was ours, was upgraded by the command that found it
    empty. What the lock's holder reads decides."""
    eng = engine()
    if eng.dialect.name == "sqlite":
        pytest.skip("an SQLite registry is upgraded by any command")
    older = revisions()[-2]
    db.upgrade(eng, older)
    read, reads = db.current_revision, []

    def first_read_finds_it_empty(connection):
        reads.append(connection)
        return None if len(reads) == 1 else read(connection)

    monkeypatch.setattr(db, "current_revision", first_read_finds_it_empty)
    with pytest.raises(RegistryError, match=f"schema revision {older}, older than .*`loraops db upgrade`"):
        Registry.open()
    assert revision_of(eng) == older


@pytest.mark.empty_db
@pytest.mark.sqlite_only
def test_a_row_broken_before_the_migration_does_not_block_it(tmp_path):
    """The migration checks the foreign keys it could break; an orphan row a hand edit left (the sqlite3 shell runs
    with keys off) is not one of them, and must not make the registry impossible to open."""
    import sqlite3

    eng = engine()
    db.upgrade(eng, "0002")
    with sqlite3.connect(db.sqlite_file(eng)) as c:
        c.execute("INSERT INTO adapter_tags (adapter_id, tag) VALUES (99, 'orphan')")
    with Registry.open() as reg:
        assert reg.revision() == db.HEAD


def test_newer_revision_is_refused():
    eng = engine()
    db.ensure_schema(eng)
    with eng.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    with pytest.raises(RegistryError, match=r"^this registry was written by a newer loraops \(revision f00d\); upgrade loraops$"):
        Registry.open()
    from click.testing import CliRunner

    from loraops.cli import main

    shown = CliRunner().invoke(main, ["db", "current"]).output  # not "run `loraops db upgrade`", which refuses
    assert shown.endswith(f"revision f00d (written by a newer loraops; this one's head is {db.HEAD}: upgrade loraops)\n")
    # `db stamp` said "`loraops db upgrade` migrates it", which refuses it as newer
    stamped = CliRunner().invoke(main, ["db", "stamp"])
    assert (stamped.exit_code, stamped.stderr) == (6, f"error: the registry at {eng.url.render_as_string()} already "
                                                      "records revision f00d, written by a newer loraops; upgrade "
                                                      "loraops\n")


def _schema(eng) -> dict:
    insp = inspect(eng)
    return {t: sorted(c["name"] for c in insp.get_columns(t)) for t in insp.get_table_names()}


@pytest.mark.empty_db
@pytest.mark.parametrize("lose", ["DROP TABLE alembic_version", "DELETE FROM alembic_version"])
def test_tables_without_a_recorded_revision_are_said_so_and_stamped_after_a_check(lose):
    """`db current` called a registry "empty" when its tables were there and only alembic_version was lost, and every
    open (`db upgrade` too) ran the first migration over them: "cannot migrate …: table bases already exists". It
    says what it is; nothing migrates it; `db stamp` records the head revision once the tables are checked to be
    exactly head's, and refuses an older schema."""
    from click.testing import CliRunner

    from loraops.cli import main

    def cli(*args, code=0):
        result = CliRunner().invoke(main, list(args))
        assert result.exit_code == code, (result.output, result.exception)
        return result

    eng = engine()
    url = eng.url.render_as_string(hide_password=True)
    cli("db", "upgrade")
    with eng.begin() as c:
        c.execute(text(lose))
    before = _schema(eng)
    said = (f"holds loraops' tables (adapter_modules, adapter_names, adapter_tags, adapters, …) but records no schema "
            f"revision (its alembic_version table was dropped or emptied), so no command migrates it; `loraops db "
            f"stamp` records revision {db.HEAD} once it has checked that the tables are exactly that revision's, else "
            f"restore alembic_version from a backup")
    assert cli("db", "current").output == f"{url}: revision none (it {said})\n"
    for args in (["db", "upgrade"], ["list"], ["gc"]):
        assert cli(*args, code=6).stderr == f"error: the registry at {url} {said}\n"
    assert _schema(eng) == before
    assert cli("db", "stamp").output == f"{url}: recorded revision {db.HEAD} (head); its tables are that revision's\n"
    assert revision_of(eng) == db.HEAD and cli("list").exit_code == 0
    # at head already: nothing to do, as `db upgrade` at head (it said `loraops db upgrade` migrates it, exit 6)
    assert cli("db", "stamp").output == f"{url}: already at revision {db.HEAD} (head): nothing to stamp\n"

    db.downgrade(eng, revisions()[-2])  # an older schema, its revision lost: stamping it head would skip a migration
    assert cli("db", "stamp", code=6).stderr == (f"error: the registry at {url} already records revision "
                                                 f"{revisions()[-2]}; `loraops db upgrade` migrates it\n")
    with eng.begin() as c:
        c.execute(text(lose))
    refused = cli("db", "stamp", code=6).stderr
    assert refused.startswith(f"error: the registry at {url}: its tables are not those of revision {db.HEAD} (1 "
                              "difference(s), the first: ('add_column', ") and refused.endswith(
        "restore its alembic_version table from a backup\n")
    assert revision_of(eng) is None


@pytest.mark.empty_db
def test_stamp_of_an_empty_registry_says_to_upgrade():
    from click.testing import CliRunner

    from loraops.cli import main

    db.ensure_schema(engine())
    db.downgrade(engine(), "base")  # every table gone (alembic_version emptied)
    result = CliRunner().invoke(main, ["db", "stamp"])
    assert result.exit_code == 6 and result.stderr.endswith("holds no loraops tables; `loraops db upgrade` creates them\n")
    assert CliRunner().invoke(main, ["db", "upgrade"]).exit_code == 0 and revision_of(engine()) == db.HEAD



@pytest.mark.empty_db
def test_stamp_judges_loraops_tables_only():
    """A registry in a database that also holds another application's tables (a PostgreSQL database shared with
    other software) was refused by `db stamp` as "not those of revision …" (Alembic's comparison lists every table
    the models lack as one to remove), telling the user to restore alembic_version from a backup. Only loraops'
    own tables are compared; a difference in them is still refused."""
    from click.testing import CliRunner

    from loraops.cli import main

    eng = engine()
    db.ensure_schema(eng)
    with eng.begin() as c:
        c.execute(text("CREATE TABLE other_app (id INTEGER PRIMARY KEY, note VARCHAR(20))"))
        c.execute(text("INSERT INTO other_app VALUES (1, 'kept')"))
        c.execute(text("DROP TABLE alembic_version"))
    result = CliRunner().invoke(main, ["db", "stamp"])
    assert result.exit_code == 0, result.output
    assert revision_of(eng) == db.HEAD
    with eng.connect() as c:
        assert c.execute(text("SELECT note FROM other_app")).scalar() == "kept"

    with eng.begin() as c:  # one of loraops' own indexes gone: still refused, despite the foreign table beside it
        c.execute(text("DROP TABLE alembic_version"))
        c.execute(text("DROP INDEX ix_adapters_rank"))
    refused = CliRunner().invoke(main, ["db", "stamp"])
    assert refused.exit_code == 6 and "the first: ('add_index', Index('ix_adapters_rank'" in refused.stderr
    assert revision_of(eng) is None


@pytest.mark.sqlite_only
def test_stamp_of_a_file_that_is_no_database_is_one_line(tmp_path):
    """`db stamp` let the driver's error out as a traceback (exit 1) where `db upgrade` and `db current` say one
    line: a file that is no SQLite database, an unreachable server, a locked or read-only file."""
    from click.testing import CliRunner

    from loraops.cli import main

    bad = tmp_path / "reg.db"
    bad.write_bytes(b"not a database, only text " * 8)
    url = f"sqlite:///{bad}"
    result = CliRunner().invoke(main, ["--db", url, "db", "stamp"])
    assert result.exit_code == 6, result.exception
    assert result.stderr == f"error: cannot stamp the registry at {url}: file is not a database\n"
    assert bad.read_bytes() == b"not a database, only text " * 8

@pytest.mark.sqlite_only
def test_sqlite_pragmas():
    with Registry.open() as reg, reg.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


@pytest.mark.sqlite_only
def test_installed_wheel_migrates(tmp_path):
    """Build the wheel, install it (no deps) into a throwaway venv that sees the system's packages, and run
    `python -m loraops db upgrade` from outside the checkout: the migrations must come from the wheel."""
    dist, venv = tmp_path / "dist", tmp_path / "venv"

    def run(*args, **kw):
        done = subprocess.run(args, capture_output=True, text=True, **kw)
        assert done.returncode == 0, f"{args}: {done.stderr}"
        return done

    src = tmp_path / "src"  # build from a copy: an in-tree build leaves build/ and *.egg-info in the checkout
    for name in ("loraops", "migrations"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src), env=env)
    wheel = next(dist.glob("loraops-*.whl"))
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    # When the tests themselves run in a venv, "system" packages are that venv's: let the new one see them too
    # (after its own site-packages, where the wheel's loraops is).
    site_dir = run(str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip()
    Path(site_dir, "_outer_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel), env=env)
    env["LORAOPS_HOME"] = str(tmp_path / "home")
    out = run(str(python), "-m", "loraops", "db", "upgrade", env=env, cwd=tmp_path).stdout
    assert out.strip().endswith(f"upgraded from empty to {db.HEAD} (head)")
    where = run(str(python), "-c", "import loraops.registry.db as d; print(d.script_location())", env=env, cwd=tmp_path)
    assert str(venv) in where.stdout and "migrations" in where.stdout


def test_alembic_writes_to_the_stdout_of_the_moment():
    """alembic's Config takes as its default stdout the sys.stdout of when alembic.config was first imported: imported
    under a redirect (click's CliRunner, a `db upgrade` run in a test), every later check printed to a closed stream
    (ValueError: I/O operation on closed file). A fresh interpreter, so alembic is imported under the redirect."""
    script = ("import io, sys\n"
              "buf = io.TextIOWrapper(io.BytesIO(), encoding='utf-8'); real, sys.stdout = sys.stdout, buf\n"
              "import alembic.config\n"
              "sys.stdout = real; buf.close()\n"
              "from loraops.registry import db\n"
              "db.alembic_config().print_stdout('printed')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "printed\n", done.stderr


@pytest.mark.parametrize("command", ["upgrade", "stamp"])
def test_a_ctrl_c_as_db_upgrade_or_stamp_commits_says_it_landed(command, monkeypatch):
    """`db upgrade` and `db stamp` told what they changed only after the migration's commit returned: a Ctrl-C in
    between said "nothing was written" of a registry upgraded (stamped). The commit and its line are one step now, as
    every other command's open migrates under deferred interrupts."""
    import signal

    from click.testing import CliRunner

    from loraops.cli import main

    eng = engine()
    db.ensure_schema(eng)
    if command == "upgrade":
        db.downgrade(eng, revisions()[-2])
    else:
        with eng.begin() as c:
            c.execute(text("DELETE FROM alembic_version"))
    real = getattr(db, command)

    def then_ctrl_c(*args, **kwargs):
        done = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return done

    monkeypatch.setattr(db, command, then_ctrl_c)
    result = CliRunner().invoke(main, ["db", command])
    said = {"upgrade": f"the registry was upgraded to revision {db.HEAD}", "stamp": f"revision {db.HEAD} was recorded"}
    assert (result.exit_code, result.stderr) == (130, f"error: interrupted after {said[command]}\n")
    assert revision_of(eng) == db.HEAD


@pytest.mark.sqlite_only  # a database file in a folder
def test_db_upgrade_of_a_registry_in_a_folder_that_cannot_be_written(tmp_path):
    """`db upgrade` of a registry this process may only read failed "attempt to write a readonly database" (exit 6)
    at head too: it says it is at head, as `db current` reads it; one at an older revision is refused in one line."""
    from click.testing import CliRunner

    from loraops.cli import main

    folder = tmp_path / "shared"
    at_head, older = db.make_engine(f"sqlite:///{folder / 'head.db'}"), db.make_engine(f"sqlite:///{folder / 'old.db'}")
    db.ensure_schema(at_head)
    db.upgrade(older, revisions()[-2])
    for eng in (at_head, older):
        eng.dispose()
    if os.geteuid() == 0:  # root ignores permission bits; the immutable attribute stops it
        if subprocess.run(["chattr", "+i", folder], capture_output=True).returncode != 0:
            pytest.skip("needs chattr (running as root)")
        undo = ["chattr", "-i", folder]
    else:
        folder.chmod(0o555)
        undo = ["chmod", "755", folder]
    try:
        head = CliRunner().invoke(main, ["--db", f"sqlite:///{folder / 'head.db'}", "db", "upgrade"])
        old = CliRunner().invoke(main, ["--db", f"sqlite:///{folder / 'old.db'}", "db", "upgrade"])
    finally:
        subprocess.run(undo, check=True)
    assert (head.exit_code, head.output) == (0, f"sqlite:///{folder / 'head.db'}: already at revision {db.HEAD} "
                                                "(head)\n")
    assert (old.exit_code, old.stderr) == (6, f"error: the registry {folder / 'old.db'} is read-only here (it is in a "
                                              f"folder this process cannot write): it cannot be upgraded from revision "
                                              f"{revisions()[-2]} to {db.HEAD} (head)\n")
    assert sorted(p.name for p in folder.iterdir()) == ["head.db", "old.db"]  # no -wal or -shm left either
