"""A team setup: two users (two loraops homes) sharing one registry database and one blob folder (LORAOPS_BLOBS).
Records store blob keys relative to the store, so each user may mount the shared folder at their own path."""
from __future__ import annotations

import json
import os
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
    record = json.loads(run(alice, "register", str(style), "--json"))
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
    assert "server, shared by every loraops home that names it, but LORAOPS_BLOBS is not set" in result.output
    home = Path(os.environ["LORAOPS_HOME"])
    assert f"`export LORAOPS_BLOBS={home / 'blobs'}`" in result.output and not (home / "blobs").exists()
    if os.environ.get("LORAOPS_TEST_DB"):
        monkeypatch.setenv("LORAOPS_BLOBS", str(tmp_path / "shared"))
        assert CliRunner().invoke(main, ["list", "--json"]).output == "[]\n"


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
