"""Every test runs with its own loraops home and Hugging Face cache in a tmp dir: no test touches the
user's files or the network.

Backends (tests/run.sh): the SQLite pass runs every test; the PostgreSQL pass runs only the tests marked
``registry_backend`` (``-m "registry_backend and not sqlite_only and not no_registry"``). The rule for the mark: a
test gets it when what it checks goes through the registry's own code (loraops/registry and the CLI's recording of
results): reads and writes, migrations, transactions and locks, concurrency, lineage records, references resolved by
the registry, registered bases and outputs guarded by them, pull and push. Whole files carry it (test_registry*.py,
test_migrations, test_concurrency, test_team, test_crash, test_hub_registry, test_algebra_cli, test_malformed,
test_output_guard); in the other files, the tests that record a command's output do, at least one for each command
that records (merge, subtract, combine, combine --recipe, resize, extract, pull) and one registration of each adapter
family whose record differs (LyCORIS, MoE, tied heads, trainable tokens, kohya SD/Flux names, AdaLoRA/VeRA). A test
whose point is math or a file format does not get it even when it records its output on the way: that SQL is the
same as in the marked tests, and the math does not depend on the backend. ``no_registry`` stays the promise never
to open a registry, checked in the SQLite pass.

pytest-xdist: each worker gets its own PostgreSQL database (``<name>_<worker>``, created on first use, dropped at the
session's end); tmp dirs,
homes and the local Hub's port (0: the kernel picks) are already per test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# huggingface_hub >= 1 uploads through Xet unless HF_HUB_DISABLE_XET is set before it is imported; the local test Hub
# (tests/hubserver.py), like self-hosted endpoints, does not speak Xet. loraops.hub sets it too, but in this process
# huggingface_hub may be imported earlier (by peft/transformers in other tests). test_hub_cli checks loraops's own way.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")


def _real_home() -> tuple[Path, list | None]:
    """The user's loraops home (as without LORAOPS_HOME) and what is in it: each path with its mtime, or None."""
    from loraops import settings

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LORAOPS_HOME", raising=False)
        home = settings.home()
    return home, sorted((str(p), p.stat().st_mtime_ns) for p in home.rglob("*")) if home.exists() else None


@pytest.fixture(scope="session", autouse=True)
def real_home_untouched():
    """Fails the run when any test wrote into the user's real home: a test that lost its isolated home (a
    monkeypatch.undo() undoes isolated_home's too) once opened and migrated ~/.local/share/loraops."""
    home, before = _real_home()
    yield
    if _real_home()[1] != before:
        pytest.fail(f"the tests wrote into the real loraops home {home}: a test lost its isolated LORAOPS_HOME")


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_is_a_keyboard_interrupt():
    """SIGINT handled as Python does in a foreground shell (KeyboardInterrupt), whoever started the suite: a shell
    without job control starts a background job (`pytest ... &`, `nohup pytest ... &`) with SIGINT ignored, Python
    then keeps it ignored, and so do the processes it starts (the fork server's children, subprocesses). The tests
    that send a Ctrl-C (test_crash, test_registry) then saw nothing happen: "DID NOT RAISE KeyboardInterrupt", and
    every interrupted merge finishing ("no run was interrupted"). (exec resets a handled signal to its default, so
    the processes started from here get Python's own handler.)"""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("loraops-home")
    hf_home = tmp_path_factory.mktemp("hf-home")
    monkeypatch.setenv("LORAOPS_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # A hub endpoint that cannot be reached: a test that forgot to start the local Hub fails fast, offline.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("LORAOPS_DB", raising=False)
    monkeypatch.delenv("LORAOPS_BLOBS", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("LORAOPS_QUIET", "1")
    return home


_PG_ENGINE = []


def _worker_database(url: str, create: bool) -> str:
    """Under pytest-xdist, this worker's own database on LORAOPS_TEST_DB's server (``<name>_gw0``…), so that workers
    never truncate each other's tables: created when missing (``create``), else dropped (at the session's end, so a
    developer's own server does not collect them; a server already gone is left alone)."""
    import sqlalchemy as sa

    given = sa.engine.make_url(url)
    name = f"{given.database}_{os.environ['PYTEST_XDIST_WORKER']}"
    admin = sa.create_engine(given, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            present = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).scalar()
            if create and present is None:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            elif not create and present is not None:
                conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    except sa.exc.OperationalError:
        if create:
            raise
    finally:
        admin.dispose()
    return given.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def _pg_url():
    url = os.environ.get("LORAOPS_TEST_DB")
    if not url or not os.environ.get("PYTEST_XDIST_WORKER"):
        yield url
        return
    yield _worker_database(url, create=True)
    if _PG_ENGINE:
        _PG_ENGINE.pop().dispose()
    _worker_database(url, create=False)


def _pg_engine(url: str):
    """One engine for the whole session's resets (connecting costs more than the reset itself)."""
    import sqlalchemy as sa

    if not _PG_ENGINE:
        _PG_ENGINE.append(sa.create_engine(url, connect_args={"options": "-c lock_timeout=20s"}))
    return _PG_ENGINE[0]


def _reset_postgres(url: str, empty: bool) -> None:
    """Give the test an empty registry. Cheap path: the schema is already at head, so TRUNCATE every table (a few
    ms). A test marked ``empty_db`` (migration tests), or a schema a test left elsewhere, gets DROP SCHEMA instead."""
    import sqlalchemy as sa

    from loraops.registry import db
    from loraops.registry.models import Base

    engine = _pg_engine(url)
    tables = [t.name for t in Base.metadata.sorted_tables]
    with engine.begin() as conn:
        present = set(sa.inspect(conn).get_table_names())
        at_head = "alembic_version" in present and db.current_revision(conn) == db.HEAD
        if not empty and at_head and present == {*tables, "alembic_version"}:
            conn.execute(sa.text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
            return
        conn.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    if not empty:
        db.ensure_schema(engine)


@pytest.fixture(autouse=True)
def registry_backend(request, isolated_home, monkeypatch, _pg_url):
    """With LORAOPS_TEST_DB set (tests/run.sh sets it for its PostgreSQL pass), every test uses that server with an
    empty registry; otherwise the default SQLite file in the tmp home.

    A test (or module) marked ``no_registry`` promises not to open a registry, and the SQLite pass checks the
    promise; the PostgreSQL pass runs only tests marked ``registry_backend`` (the module docstring says which)."""
    url = _pg_url
    if not url:
        yield "sqlite"
        if request.node.get_closest_marker("no_registry") is not None and (isolated_home / "registry.db").exists():
            pytest.fail("marked no_registry, but it created a registry: remove the marker")
        return
    _reset_postgres(url, empty=request.node.get_closest_marker("empty_db") is not None)
    monkeypatch.setenv("LORAOPS_DB", url)
    monkeypatch.setenv("LORAOPS_BLOBS", str(isolated_home / "blobs"))  # (a server registry needs a shared store)
    yield "postgresql"


@pytest.fixture
def three_threads():
    """Torch at 3 threads inside the test (more than this machine's cores: torch obeys the count it is set)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_hub(tmp_path_factory, monkeypatch):
    """A local Hugging Face Hub over real HTTP (tests/hubserver.py); HF_ENDPOINT points at it."""
    from hubserver import FakeHub

    with FakeHub(tmp_path_factory.mktemp("hub-store")) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server
