"""An adapter given by path is merged from a private copy of its weights file beside the output (st.private_copy),
mapped: its saved whole tensors (a modules_to_save lm_head) are page cache, not anonymous memory. What a user sees is
as when the file was read into memory (LORAOPS_MMAP=0 still reads it so): the same output bytes, NaN/Inf in a saved
head refused with the same one line naming their file, nothing of the copy left behind."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import kohya_file, loraops_run, peft_adapter, tiny_llama
from test_mapped_inputs import mapped_file, spy
from test_registry import KOHYA_MODULES
from loraops import engine, formats, merging
from loraops.errors import InvalidInputError
from loraops.formats import common

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved-stream")
    base = tiny_llama(root / "base")
    return {"base": base, "saved": peft_adapter(base, root / "saved", r=4, target_modules=["q_proj"],
                                                modules_to_save=["lm_head"])}


def outputs(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_a_saved_head_is_mapped_from_a_private_copy_with_the_same_output_bytes(art, tmp_path, monkeypatch):
    seen = []
    spy(monkeypatch, engine, "merge", seen)
    merging.merge(art["base"], [str(art["saved"])], tmp_path / "copied", record=False, device="cpu")
    (head,) = seen[-1]["adapters"][0][0].full_tensors.values()
    where = mapped_file(head)
    assert where is not None and where.startswith(f"{tmp_path}/") and where.endswith(" (deleted)")
    monkeypatch.setenv("LORAOPS_MMAP", "0")  # read into memory, as before the copies
    merging.merge(art["base"], [str(art["saved"])], tmp_path / "read", record=False, device="cpu")
    assert mapped_file(seen[-1]["adapters"][0][0].full_tensors["lm_head.weight"]) is None
    assert outputs(tmp_path / "copied") == outputs(tmp_path / "read")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copied", "read"]  # (the copy had no name)


@pytest.mark.parametrize("at", [0, -1])
def test_nan_in_a_saved_head_is_refused_in_one_line_naming_the_users_file(art, tmp_path, monkeypatch, at):
    bad = tmp_path / "bad"
    shutil.copytree(art["saved"], bad)
    tensors = load_file(bad / WEIGHTS)
    key = next(k for k in tensors if "lm_head" in k)
    tensors[key].view(-1)[at] = float("nan")
    save_file(tensors, bad / WEIGHTS, metadata={"format": "pt"})
    errors = []
    for mmap in ("1", "0"):
        monkeypatch.setenv("LORAOPS_MMAP", mmap)
        done = loraops_run("merge", bad, "--into", art["base"], "-o", tmp_path / "out", "--no-record")
        assert done.returncode != 0 and not (tmp_path / "out").exists()
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert f"{bad / WEIGHTS}: tensor {key!r} contains NaN or Inf" in done.stderr
        errors.append(done.stderr)
    assert errors[0] == errors[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_a_path_merged_unregistered_has_the_identity_of_its_file(art, tmp_path):
    kohya = kohya_file(tmp_path / "kohya.safetensors", KOHYA_MODULES)
    for path in (art["saved"], kohya):
        found = merging.resolve_adapter(None, str(path), 1.0, tmp_path)
        assert found.sha256 == formats.identity(path) and found.registry_id is None
        assert mapped_file(next(iter(found.adapter.modules.values())).A) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("at", [0, 4, 5, 9, 22])
def test_the_nan_check_looks_at_every_block(monkeypatch, dtype, at):
    monkeypatch.setattr(common, "FINITE_BLOCK", 5)
    values = torch.ones(23, dtype=torch.float32)
    common.check_finite(Path("f"), "k", values.to(dtype))
    values[at] = float("nan")
    with pytest.raises(InvalidInputError, match="tensor 'k' contains NaN or Inf"):
        common.check_finite(Path("f"), "k", values.to(dtype))


@pytest.mark.parametrize("spare", [-1, 0])
def test_no_copy_takes_the_room_the_output_needs(art, tmp_path, monkeypatch, spare):
    """Where the output's filesystem has room for the output but not for it and the copy together, the file is read
    as it is (no copy), so the merge that fits without one still runs; with room for both it is copied."""
    needed = []
    real_check = engine.ensure_free_space
    monkeypatch.setattr(engine, "ensure_free_space", lambda folder, size, what: (needed.append(size),
                                                                                real_check(folder, size, what))[1])
    merging.merge(art["base"], [str(art["saved"])], tmp_path / "roomy", record=False, device="cpu")
    real_usage = shutil.disk_usage
    free = max(needed) + (art["saved"] / WEIGHTS).stat().st_size + spare

    def usage(folder):  # the output's filesystem has ``free`` bytes free
        return real_usage(folder)._replace(free=free) if Path(folder) == tmp_path else real_usage(folder)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    seen = []
    spy(monkeypatch, engine, "merge", seen)
    merging.merge(art["base"], [str(art["saved"])], tmp_path / "tight", record=False, device="cpu")
    copied = mapped_file(seen[-1]["adapters"][0][0].full_tensors["lm_head.weight"]) is not None
    assert copied == (spare >= 0)
    assert outputs(tmp_path / "tight") == outputs(tmp_path / "roomy")


def test_a_folder_whose_file_system_cannot_map_files_gets_no_copy(art, tmp_path, monkeypatch):
    """Some FUSE and network file systems refuse mmap: the merge then reads the user's file as it is (it failed with
    'cannot be mapped' where reading it worked)."""
    import mmap

    real = mmap.mmap

    def refusing(fd, *args, **kwargs):
        if fd >= 0 and str(tmp_path) in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(19, "No such device")
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(mmap, "mmap", refusing)
    seen = []
    spy(monkeypatch, engine, "merge", seen)
    merging.merge(art["base"], [str(art["saved"])], tmp_path / "out", record=False, device="cpu")
    assert mapped_file(seen[-1]["adapters"][0][0].full_tensors["lm_head.weight"]) is None
    monkeypatch.setattr(mmap, "mmap", real)
    merging.merge(art["base"], [str(art["saved"])], tmp_path / "mapped", record=False, device="cpu")
    assert outputs(tmp_path / "out") == outputs(tmp_path / "mapped")
