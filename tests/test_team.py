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
