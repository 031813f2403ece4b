"""Every test runs with its own loraops home and Hugging Face cache in a tmp dir: no test touches the
user's files or the network."""
from __future__ import annotations

import os

import pytest

# huggingface_hub >= 1 uploads through Xet unless HF_HUB_DISABLE_XET is set before it is imported; the local test Hub
# (tests/hubserver.py), like self-hosted endpoints, does not speak Xet. loraops.hub sets it too, but in this process
# huggingface_hub may be imported earlier (by peft/transformers in other tests). test_hub_cli checks loraops's own way.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")


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


@pytest.fixture(autouse=True)
def registry_backend(isolated_home, monkeypatch):
    """With LORAOPS_TEST_DB set (tests/run.sh sets it for its PostgreSQL pass), every test uses that server with an
    empty schema; otherwise the default SQLite file in the tmp home."""
    import os

    url = os.environ.get("LORAOPS_TEST_DB")
    if not url:
        yield "sqlite"
        return
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    engine.dispose()
    monkeypatch.setenv("LORAOPS_DB", url)
    yield "postgresql"


@pytest.fixture
def fake_hub(tmp_path_factory, monkeypatch):
    """A local Hugging Face Hub over real HTTP (tests/hubserver.py); HF_ENDPOINT points at it."""
    from hubserver import FakeHub

    with FakeHub(tmp_path_factory.mktemp("hub-store")) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server
