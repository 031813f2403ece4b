"""A team setup: two users (two loraops homes) sharing one registry database and one blob folder (LORAOPS_BLOBS).
Records store blob keys relative to the store, so each user may mount the shared folder at their own path."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from factories import kohya_file
from loraops.cli import main
from test_concurrency import MODULES

pytestmark = pytest.mark.registry_backend  # the registry's own code: run on PostgreSQL too (conftest.py)


def test_two_homes_one_registry_one_blob_store(tmp_path):
    shared = tmp_path / "shared-blobs"
    db = os.environ.get("LORAOPS_DB") or f"sqlite:///{tmp_path / 'team.db'}"
    alice = {"LORAOPS_HOME": str(tmp_path / "alice"), "LORAOPS_BLOBS": str(shared), "LORAOPS_DB": db}
    # Bob mounts the same store through another path (a symlink here, an NFS mount point in real life).
    (tmp_path / "mnt").mkdir()
    (tmp_path / "mnt" / "blobs").symlink_to(shared, target_is_directory=True)
    bob = {**alice, "LORAOPS_HOME": str(tmp_path / "bob"), "LORAOPS_BLOBS": str(tmp_path / "mnt" / "blobs")}

    def run(who, *args):
        result = CliRunner().invoke(main, list(args), env=who)
        assert result.exit_code == 0, result.output + (result.stderr or "")
        return result.stdout

    style = kohya_file(tmp_path / "style.safetensors", MODULES, rank=4)
    record = json.loads(run(alice, "register", str(style), "--json"))["adapter"]
    assert Path(record["path"]).is_relative_to(shared)
    seen = json.loads(run(bob, "show", "style", "--json"))
    assert seen["sha256"] == record["sha256"] and Path(seen["path"]).is_relative_to(tmp_path / "mnt" / "blobs")
    assert Path(seen["path"]).read_bytes() == style.read_bytes()
    assert "already registered as style@1" in run(bob, "register", str(style))
    assert "all stored files of 1 adapter(s) match" in run(bob, "verify")
    run(bob, "export", "style", "--format", "kohya", "-o", str(tmp_path / "copy.safetensors"))
    assert "removed 0 item(s)" in run(alice, "gc", "--grace", "0")
    assert not (tmp_path / "alice" / "blobs").exists() and not (tmp_path / "bob" / "blobs").exists()
    run(bob, "rm", "style")
    assert json.loads(run(alice, "list", "--json")) == []
    assert not Path(record["path"]).exists()


@pytest.mark.parametrize("command", [["list"], ["show", "style"], ["register", "style.safetensors"]])
def test_a_server_that_does_not_answer_is_one_line_after_the_timeout(tmp_path, monkeypatch, command):
    """A PostgreSQL host that accepts the connection and never answers (a hung server; a firewall dropping packets
    waits the same way): libpq waits forever, so `loraops list` hung with no output until killed."""
    import socket
    import threading
    import time

    from loraops.registry import reads

    monkeypatch.setattr(reads, "CONNECT_TIMEOUT_S", 2, raising=False)  # (libpq: at least 2)
    monkeypatch.setenv("LORAOPS_BLOBS", str(tmp_path / "blobs"))
    monkeypatch.chdir(tmp_path)
    kohya_file(tmp_path / "style.safetensors", MODULES, rank=4)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # (the kernel completes the handshake; nothing ever answers)
        url = f"postgresql+psycopg://someone:secret@127.0.0.1:{listener.getsockname()[1]}/loraops"
        done = []
        start = time.monotonic()
        worker = threading.Thread(target=lambda: done.append(CliRunner().invoke(main, ["--db", url, *command])),
                                  daemon=True)
        worker.start()
        worker.join(15)
    assert done, "still waiting for the server after 15 s"
    assert time.monotonic() - start < 8
    result = done[0]
    assert result.exit_code != 0 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: cannot open the registry at postgresql+psycopg://someone:***@127.0.0.1:")
    assert "timeout" in result.output and "secret" not in result.output


@pytest.mark.parametrize("command", [["list"], ["show", "style"], ["register", "style.safetensors"], ["gc"]])
def test_a_server_registry_without_a_shared_blob_folder_is_refused(tmp_path, monkeypatch, command):
    """Without LORAOPS_BLOBS each home kept a shared registry's adapters in its own <home>/blobs: Bob's `show` of
    Alice's adapter named a file in his home that was not there, and his `export` and `verify` failed. Refused in one
    line before connecting (a server that cannot be reached says the same), nothing stored and no record made."""
    url = os.environ.get("LORAOPS_DB") or "postgresql+psycopg://someone@127.0.0.1:1/loraops"  # (nothing listens)
    monkeypatch.setenv("LORAOPS_DB", url)
    monkeypatch.delenv("LORAOPS_BLOBS", raising=False)
    monkeypatch.chdir(tmp_path)
    kohya_file(tmp_path / "style.safetensors", MODULES, rank=4)
    result = CliRunner().invoke(main, command)
    assert result.exit_code != 0 and result.output.count("\n") == 1, result.output
    assert "a server (postgresql), shared by every loraops home that names it, but LORAOPS_BLOBS is not set" in (
        result.output)
    home = Path(os.environ["LORAOPS_HOME"])
    assert f"`export LORAOPS_BLOBS={home / 'blobs'}`" in result.output and not (home / "blobs").exists()
    if os.environ.get("LORAOPS_TEST_DB"):
        monkeypatch.setenv("LORAOPS_BLOBS", str(tmp_path / "shared"))
        assert CliRunner().invoke(main, ["list", "--json"]).output == "[]\n"


@pytest.mark.sqlite_only  # (the URL is its own: the PostgreSQL pass adds nothing)
def test_the_blob_folder_refusal_reads_for_any_dialect(monkeypatch):
    """The dialect was put after "a": "the registry is a oracle server"."""
    from loraops.errors import RegistryError
    from loraops.registry import Registry

    monkeypatch.delenv("LORAOPS_BLOBS", raising=False)
    with pytest.raises(RegistryError, match=r"^the registry is on a server \(oracle\), shared by every loraops home"):
        Registry.open("oracle://me@127.0.0.1:1/x")


@pytest.mark.sqlite_only  # (the URL is its own: the PostgreSQL pass adds nothing)
def test_the_connect_timeout_is_only_for_libpq_drivers(tmp_path, monkeypatch):
    """connect_timeout is libpq's (psycopg, psycopg2); pg8000's connect() takes no such argument, so a pg8000 URL
    failed on every command with "unexpected keyword argument 'connect_timeout'" instead of reaching its server."""
    import sys
    import types

    pg8000 = types.ModuleType("pg8000")
    pg8000.__version__, pg8000.paramstyle = "1.31.2", "format"
    for name in ("Error", "InterfaceError", "DatabaseError", "OperationalError", "ProgrammingError"):
        setattr(pg8000, name, type(name, (Exception,), {}))

    def connect(user, host="localhost", database=None, port=5432, password=None, timeout=None):  # (pg8000's, cut)
        raise pg8000.InterfaceError("no server here")

    pg8000.connect = connect
    monkeypatch.setitem(sys.modules, "pg8000", pg8000)
    monkeypatch.setenv("LORAOPS_BLOBS", str(tmp_path / "blobs"))
    result = CliRunner().invoke(main, ["--db", "postgresql+pg8000://me:secret@127.0.0.1:1/x", "list"])
    assert result.exit_code == 6 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: cannot open the registry at postgresql+pg8000://me:***@127.0.0.1:1/x")
    assert "no server here" in result.output, result.output


@pytest.mark.sqlite_only  # (the URLs are its own: the PostgreSQL pass adds nothing)
@pytest.mark.parametrize("url", ["garbage", "foo://", "postgresql+nosuch://me:secret@db.example/loraops"])
def test_a_malformed_url_is_refused_as_such_without_a_blob_folder(tmp_path, monkeypatch, url):
    """Without LORAOPS_BLOBS, `garbage` was refused as "the registry is a garbage server … LORAOPS_BLOBS is not set":
    its URL is wrong, whatever the blob folder. It says what it says with LORAOPS_BLOBS set, from Python too."""
    from loraops.errors import RegistryError
    from loraops.registry import Registry

    monkeypatch.setenv("LORAOPS_DB", url)
    without = CliRunner().invoke(main, ["list"])
    with pytest.raises(RegistryError) as raised:
        Registry.open(url)
    monkeypatch.setenv("LORAOPS_BLOBS", str(tmp_path / "blobs"))
    with_blobs = CliRunner().invoke(main, ["list"])
    assert without.exit_code == with_blobs.exit_code == 6 and without.output.count("\n") == 1, without.output
    assert without.output == with_blobs.output == f"error: {raised.value}\n"
    assert "LORAOPS_BLOBS" not in without.output and "secret" not in without.output


@pytest.mark.sqlite_only  # (the URL is its own: the PostgreSQL pass adds nothing)
def test_a_password_with_an_at_sign_is_never_shown(tmp_path, monkeypatch):
    """SQLAlchemy (as libpq) ends a URL's password at its first '@': `me:sec@re@t@host` was shown as
    `me:***@re@t@host`, and the driver's error named the host 're@t@127.0.0.1'. Refused as a malformed URL, before
    the blob folder is asked for, the whole password masked."""
    url = "postgresql+psycopg://me:sec@re@t@127.0.0.1:1/loraops"
    monkeypatch.setenv("LORAOPS_DB", url)
    for blobs in (None, str(tmp_path / "blobs")):
        if blobs is None:
            monkeypatch.delenv("LORAOPS_BLOBS", raising=False)
        else:
            monkeypatch.setenv("LORAOPS_BLOBS", blobs)
        result = CliRunner().invoke(main, ["list"])
        assert result.exit_code == 6 and result.output == (
            "error: the registry URL postgresql+psycopg://me:***@127.0.0.1:1/loraops has '@' in its password, which "
            "a URL writes as %40 (read as it is, the password ends at the first '@' and the rest is taken for the "
            "host)\n"), result.output


def test_registry_open_takes_the_blob_folder(tmp_path, monkeypatch):
    """A Python user opening a server registry without LORAOPS_BLOBS could only set os.environ; blobs= gives the
    folder (before LORAOPS_BLOBS, as an argument goes before the environment), and the refusal names it."""
    from loraops.errors import RegistryError
    from loraops.registry import Registry

    monkeypatch.delenv("LORAOPS_BLOBS", raising=False)
    nowhere = "postgresql+psycopg://someone@127.0.0.1:1/loraops"  # (nothing listens)
    with pytest.raises(RegistryError, match=r"from Python: Registry\.open\(url, blobs=PATH\)"):
        Registry.open(nowhere)
    with pytest.raises(RegistryError, match="cannot open the registry at"):  # (past the blob folder: to the server)
        Registry.open(nowhere, blobs=tmp_path / "shared")
    url = os.environ.get("LORAOPS_DB") or f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("LORAOPS_BLOBS", str(tmp_path / "elsewhere"))
    style = kohya_file(tmp_path / "style.safetensors", MODULES, rank=4)
    with Registry.open(url, blobs=tmp_path / "shared") as registry:
        record = registry.add_adapter(style)
        assert Path(record.path).is_relative_to(tmp_path / "shared")
        assert registry.intact_path("style").read_bytes() == style.read_bytes()
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.skipif(not os.environ.get("LORAOPS_TEST_DB"), reason="a server registry: the PostgreSQL pass")
def test_a_server_registry_finds_what_this_home_stored_before_blobs_were_shared(tmp_path, monkeypatch):
    """Before LORAOPS_BLOBS was required, a PostgreSQL registry's adapters were stored in each home's <home>/blobs;
    a member who then pointed LORAOPS_BLOBS at the team's new folder found none of them ("stored copy … is missing").
    They are copied from <home>/blobs on first use, byte for byte, as an SQLite registry's earlier store is."""
    home = Path(os.environ["LORAOPS_HOME"])
    monkeypatch.chdir(tmp_path)
    style = kohya_file(tmp_path / "style.safetensors", MODULES, rank=4)
    monkeypatch.setenv("LORAOPS_BLOBS", str(home / "blobs"))  # (where blobs_dir put them without LORAOPS_BLOBS)
    assert CliRunner().invoke(main, ["register", str(style)]).exit_code == 0
    shared = tmp_path / "shared"
    monkeypatch.setenv("LORAOPS_BLOBS", str(shared))
    shown = json.loads(CliRunner().invoke(main, ["show", "style", "--json"]).output)["path"]  # (where it is: not
    assert Path(shown).is_relative_to(home / "blobs") and Path(shown).is_file()  # copied until first used)
    result = CliRunner().invoke(main, ["export", "style", "--format", "kohya", "-o", "copy.safetensors"])
    assert result.exit_code == 0, result.output
    stored = json.loads(CliRunner().invoke(main, ["show", "style", "--json"]).output)["path"]
    assert Path(stored).is_relative_to(shared) and Path(stored).read_bytes() == style.read_bytes()
    assert "all stored files of 1 adapter(s) match" in CliRunner().invoke(main, ["verify"]).output
    assert (home / "blobs").is_dir()  # (copied, not moved: the home's own SQLite registry may use them)


def test_list_orders_names_by_code_point_on_every_backend(tmp_path, icu_database):
    """`list` ordered by the database's collation: `Style, Zeta, alpha, style` on SQLite, `alpha, style, Style, Zeta`
    on a PostgreSQL database with an ICU (or en_US) collation, as a team's server often has. Code point order on both,
    in the plain reader (`list`) and the SQLAlchemy one (Registry.list_adapters), for bases too."""
    from factories import tiny_llama
    from loraops.registry import Registry

    names = ["style", "Zeta", "alpha", "Style"]
    for seed, name in enumerate(names):
        path = kohya_file(tmp_path / f"{name}.{seed}.safetensors", MODULES, rank=4, seed=seed)
        assert CliRunner().invoke(main, ["register", str(path), "--name", name]).exit_code == 0
    for seed, name in enumerate(["alpha", "Zeta"]):
        result = CliRunner().invoke(main, ["base", "add", str(tiny_llama(tmp_path / name, seed=seed)), "--name", name])
        assert result.exit_code == 0, result.output
    expected = ["Style", "Zeta", "alpha", "style"]
    assert [r["name"] for r in json.loads(CliRunner().invoke(main, ["list", "--json"]).output)] == expected
    assert [line.split()[1] for line in CliRunner().invoke(main, ["list"]).output.splitlines()[2:]] == \
        [f"{name}@1" for name in expected]
    with Registry.open() as registry:
        assert [r.name for r in registry.list_adapters()] == expected
        assert [b.name for b in registry.list_bases()] == ["Zeta", "alpha"]
    assert [b["name"] for b in json.loads(CliRunner().invoke(main, ["base", "list", "--json"]).output)] == \
        ["Zeta", "alpha"]


@pytest.fixture
def icu_database(registry_backend, monkeypatch):
    """On the PostgreSQL pass, LORAOPS_DB set to a new database on its server whose default collation is ICU's en-US
    (dropped after the test); the test is skipped when the server has none (before PostgreSQL 15, or without ICU)."""
    if registry_backend != "postgresql":
        yield
        return
    import sqlalchemy as sa

    given = sa.engine.make_url(os.environ["LORAOPS_DB"])
    name = f"{given.database}_icu"
    admin = sa.create_engine(given, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            try:
                conn.execute(sa.text(f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu "
                                     "ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"))
            except sa.exc.DBAPIError as exc:
                pytest.skip(f"this PostgreSQL cannot make an ICU database: {str(exc).splitlines()[0]}")
        monkeypatch.setenv("LORAOPS_DB", given.set(database=name).render_as_string(hide_password=False))
        yield
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.mark.parametrize("meanwhile", ["rewritten", "removed"])
def test_an_earlier_store_file_changing_during_its_recovery_leaves_nothing_in_the_shared_folder(tmp_path, monkeypatch,
                                                                                               meanwhile):
    """The recovery hashed the earlier store's files, then copied them, and did not look at what the copy hashed:
    a file rewritten between the two (in place, by hand) landed in the shared folder as other bytes than the record's,
    for everyone; one removed between the two (the home's own `gc` or `rm` of its SQLite registry, which shares
    <home>/blobs) was an OSError where the adapter is simply not there to recover."""
    from loraops.errors import RegistryError
    from loraops.registry import Registry, blobs

    home = Path(os.environ["LORAOPS_HOME"])
    style = kohya_file(tmp_path / "style.safetensors", MODULES, rank=4)
    monkeypatch.setenv("LORAOPS_BLOBS", str(home / "blobs"))  # (where it was stored before the shared folder)
    assert CliRunner().invoke(main, ["register", str(style)]).exit_code == 0
    monkeypatch.delenv("LORAOPS_BLOBS")
    real = blobs.copy_file

    def racing(src, dst, seen):
        if Path(src).is_relative_to(home / "blobs"):
            if meanwhile == "rewritten":
                Path(src).write_bytes(bytes(len(Path(src).read_bytes())))
            else:
                Path(src).unlink()
        return real(src, dst, seen)

    monkeypatch.setattr(blobs, "copy_file", racing)
    url = os.environ.get("LORAOPS_DB") or None  # (SQLite: the home's registry, whose earlier store is <home>/blobs)
    with Registry.open(url, blobs=tmp_path / "shared") as registry:
        with pytest.raises(RegistryError, match="is missing"):
            registry.intact_path("style")
    assert not [p for p in (tmp_path / "shared").rglob("*") if p.is_file() and ".locks" not in p.parts]


@pytest.mark.sqlite_only  # (refused before any database is asked)
def test_an_empty_blobs_argument_is_refused_not_the_working_folder(tmp_path, monkeypatch):
    """Registry.open(url, blobs="") (an unset variable passed along) stored adapters in the working folder (Path("")
    is "."), where `gc` removes the folders inside any two-letter folder that no record uses."""
    from loraops.errors import InvalidInputError
    from loraops.registry import Registry

    monkeypatch.chdir(tmp_path)
    for empty in ["", " "]:
        with pytest.raises(InvalidInputError, match="blobs= is empty"):
            Registry.open(f"sqlite:///{tmp_path / 'r.db'}", blobs=empty)
    assert not (tmp_path / "r.db").exists()


@pytest.mark.sqlite_only  # (the home's own SQLite registry)
def test_the_homes_own_registry_keeps_its_own_store_whatever_loraops_blobs_says(tmp_path, monkeypatch):
    """LORAOPS_BLOBS (the team's folder, exported in a member's shell) applied to the home's own registry.db too: its
    `gc` removed the team's adapters, which no record of its own used. The home's registry keeps <home>/blobs; what it
    stored in LORAOPS_BLOBS before is copied over on first use (verify), not moved."""
    from loraops.registry import Registry

    home = Path(os.environ["LORAOPS_HOME"])
    shared = tmp_path / "shared"
    team = shared / "ab" / ("ab" + "0" * 62)  # a team member's stored adapter
    team.mkdir(parents=True)
    (team / "adapter.safetensors").write_bytes(b"team")
    os.utime(team, (0, 0))
    monkeypatch.delenv("LORAOPS_DB", raising=False)
    monkeypatch.setenv("LORAOPS_BLOBS", str(shared))
    earlier = kohya_file(tmp_path / "earlier.safetensors", MODULES, rank=4)
    with Registry.open(blobs=shared) as reg:  # (where the home's registry stored it while LORAOPS_BLOBS applied)
        reg.add_adapter(earlier)
    style = kohya_file(tmp_path / "style.safetensors", MODULES, rank=2)
    result = CliRunner().invoke(main, ["register", str(style), "--json"])
    assert result.exit_code == 0, result.output
    assert Path(json.loads(result.output)["adapter"]["path"]).is_relative_to(home / "blobs")
    for name, store in (("earlier", shared), ("style", home / "blobs")):  # (earlier: not copied until first used)
        shown = Path(json.loads(CliRunner().invoke(main, ["show", name, "--json"]).output)["path"])
        assert shown.is_relative_to(store) and shown.is_file(), shown
    assert "all stored files of 2 adapter(s) match" in CliRunner().invoke(main, ["verify"]).output
    shown = Path(json.loads(CliRunner().invoke(main, ["show", "earlier", "--json"]).output)["path"])
    assert shown.is_relative_to(home / "blobs") and shown.read_bytes() == earlier.read_bytes()
    result = CliRunner().invoke(main, ["gc", "--grace", "0"])
    assert result.exit_code == 0 and "removed 0 item(s)" in result.output, result.output
    assert (team / "adapter.safetensors").read_bytes() == b"team"
    assert len([p for p in shared.glob("[!.]*/*") if p.is_dir()]) == 2  # (the team's and the copied-from one)


@pytest.mark.sqlite_only  # (paths only: no database is asked)
def test_a_relative_blob_folder_is_made_absolute_where_it_is_read(tmp_path, monkeypatch):
    """A relative LORAOPS_BLOBS or blobs= was kept relative: a chdir later in the same process (a library caller's)
    moved the store to another folder."""
    from loraops import settings
    from loraops.registry import Registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAOPS_BLOBS", "team-blobs")
    assert settings.registry_blobs_dir("postgresql+psycopg://me@db.example/loraops") == tmp_path / "team-blobs"
    style = kohya_file(tmp_path / "style.safetensors", MODULES, rank=4)
    with Registry.open(f"sqlite:///{tmp_path / 'r.db'}", blobs="mine") as reg:
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
        record = reg.add_adapter(style)
    assert Path(record.path).is_relative_to(tmp_path / "mine") and not (tmp_path / "elsewhere" / "mine").exists()


@pytest.mark.sqlite_only  # (paths only)
def test_a_blob_folder_under_no_users_home_is_one_line(tmp_path, monkeypatch):
    """LORAOPS_BLOBS or blobs= starting with ~name of no user here ended in Path.expanduser's traceback ("Could not
    determine home directory")."""
    from loraops.errors import RegistryError
    from loraops.registry import Registry

    message = ("error: the blob folder ~nosuchuser-loraops/b starts with ~nosuchuser-loraops, which names no user's "
               "home folder here; give the full path\n")
    monkeypatch.setenv("LORAOPS_BLOBS", "~nosuchuser-loraops/b")
    result = CliRunner().invoke(main, ["--db", str(tmp_path / "r.db"), "list"])
    assert result.exit_code == 6 and result.output == message, result.output
    with pytest.raises(RegistryError, match="^" + re.escape(message[len("error: "):-1]) + "$"):
        Registry.open(f"sqlite:///{tmp_path / 'r.db'}", blobs="~nosuchuser-loraops/b")


@pytest.mark.sqlite_only  # (the URL is its own: the PostgreSQL pass adds nothing)
@pytest.mark.parametrize("credentials", ["me@corp", "me:p/ss"])
def test_list_reads_a_urls_user_and_password_as_the_other_commands_do(tmp_path, monkeypatch, credentials):
    """`list` and `show` connect over the driver alone, and libpq ends a URL's user and password at the first '@' or
    '/' where SQLAlchemy (every other command) ends a user at the last '@': `list` of me@corp@host looked for the host
    corp@host, of me:p/ss@host for the host me."""
    monkeypatch.setenv("LORAOPS_BLOBS", str(tmp_path / "blobs"))
    monkeypatch.setenv("LORAOPS_DB", f"postgresql+psycopg://{credentials}@127.0.0.1:1/loraops")
    outputs = [CliRunner().invoke(main, command).output for command in (["list"], ["register", "x"])]
    assert all('connection to server at "127.0.0.1", port 1 failed' in out for out in outputs), outputs
