"""The base fingerprint: its definition, its per-tensor digest cache, and the value a merge computes while writing
(which must equal the value computed from the written files)."""
from __future__ import annotations

import hashlib
import os
import time

import pytest
import torch
from safetensors.torch import save_file

from factories import peft_adapter, tiny_llama
from loraops import engine, formats, merging
from loraops.adapter import Adapter, LoraModule
from loraops.basemodel import BaseModel
from loraops.fsutil import DirectFileWriter


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp")
    base = tiny_llama(root / "base", dtype=torch.bfloat16, shard_size="60KB")
    return base, peft_adapter(base, root / "adapter", r=4)


def from_files(path, monkeypatch, tmp_path) -> str:
    """The fingerprint read from the files alone (a fresh, empty digest cache)."""
    with monkeypatch.context() as m:
        m.setenv("LORAOPS_HOME", str(tmp_path / "fresh-home"))
        return BaseModel.open(path).fingerprint()


def forbid(monkeypatch, name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} was called")

    monkeypatch.setattr(name, refuse)


def test_definition_is_sha256_over_sorted_name_dtype_shape_tensor_digest(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16),
               "e": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    expected = hashlib.sha256()
    for name, dtype in (("a", "BF16"), ("b", "F32"), ("e", "F32")):
        t = tensors[name]
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        expected.update(f"{name}\0{dtype}\0{list(t.shape)}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    assert BaseModel.open(tmp_path / "m.safetensors").fingerprint() == expected.hexdigest()


def test_a_changed_file_is_rehashed(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(4)}, str(path))
    first = BaseModel.open(path).fingerprint()
    save_file({"w": torch.ones(4)}, str(path))
    os.utime(path, ns=(1, 1))  # a new stat even on a coarse clock
    assert BaseModel.open(path).fingerprint() != first


def test_a_file_rewritten_with_its_mtime_put_back_is_rehashed(tmp_path):
    """Same size, same mtime, other bytes: the cache keyed by size and mtime alone kept the old digests (and
    `subtract --exact` copied such a base as the pristine one); its ctime says it changed."""
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(4)}, str(path))
    first, before = BaseModel.open(path).fingerprint(), path.stat()
    time.sleep(0.05)  # past a coarse file system clock's tick (a jiffy), which ctime moves by
    save_file({"w": torch.ones(4)}, str(path))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and BaseModel.open(path).fingerprint() != first


@pytest.mark.parametrize("cached", [True, False], ids=["base-cached", "base-uncached"])
def test_streaming_fingerprint_equals_the_one_from_files(tmp_path, sharded, monkeypatch, cached):
    base, adapter_dir = sharded
    if cached:
        BaseModel.open(base).fingerprint()
    hashed_while_copied = []
    copy_from = DirectFileWriter.copy_from

    def watched(self, fd, offset, nbytes, on_data=None, **kwargs):
        hashed_while_copied.append(on_data is not None)
        return copy_from(self, fd, offset, nbytes, on_data, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(DirectFileWriter, "copy_from", watched)
        report = engine.merge(base, [(formats.read_adapter(adapter_dir), 0.5)], tmp_path / "out", device="cpu")
    # untouched tensors take the base's cached digests, or are hashed while copied
    assert hashed_while_copied and set(hashed_while_copied) == {not cached}
    assert report.tensors_copied > 0 and report.tensors_merged > 0
    assert report.fingerprint == from_files(tmp_path / "out", monkeypatch, tmp_path)
    base_value = from_files(base, monkeypatch, tmp_path)
    forbid(monkeypatch, "loraops.basemodel._hash_file")  # the merge cached the output's digests, and the base's
    assert BaseModel.open(tmp_path / "out").fingerprint() == report.fingerprint
    assert BaseModel.open(base).fingerprint() == base_value


def test_streaming_fingerprint_with_dtype_change_replacement_and_empty_tensors(tmp_path, monkeypatch):
    base = tmp_path / "m.safetensors"
    torch.manual_seed(0)
    save_file({"lin.weight": torch.randn(6, 4), "head.weight": torch.randn(3, 4), "steps": torch.arange(5),
               "empty.weight": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}, str(base))
    module = LoraModule("lin", torch.randn(2, 4), torch.randn(6, 2), alpha=2.0, scale=1.0)
    adapter = Adapter({"lin": module}, "peft", full_tensors={"head.weight": torch.randn(3, 4)})
    report = engine.merge(base, [(adapter, 1.0)], tmp_path / "o.safetensors", dtype="bf16", device="cpu")
    assert report.fingerprint == from_files(tmp_path / "o.safetensors", monkeypatch, tmp_path)


def test_a_copy_has_the_base_fingerprint_whatever_the_sharding(tmp_path, monkeypatch):
    one = tiny_llama(tmp_path / "one")
    sharded = tiny_llama(tmp_path / "sharded", shard_size="60KB")
    assert engine.merge(one, [], tmp_path / "copy1", device="cpu").fingerprint == BaseModel.open(one).fingerprint()
    assert engine.merge(sharded, [], tmp_path / "copy2", device="cpu").fingerprint == BaseModel.open(one).fingerprint()


def test_pipeline_component_names_are_prefixed_in_the_streamed_fingerprint(tmp_path, monkeypatch):
    pipe = tmp_path / "pipe"
    for component, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        (pipe / component).mkdir(parents=True)
        save_file({"w.weight": torch.randn(4, 4)}, str(pipe / component / f"{name}.safetensors"))
    (pipe / "model_index.json").write_text("{}")
    module = LoraModule("unet.w", torch.randn(2, 4), torch.randn(4, 2), alpha=2.0, scale=1.0)
    report = engine.merge(pipe, [(Adapter({"unet.w": module}, "peft"), 1.0)], tmp_path / "out", device="cpu")
    assert report.fingerprint == from_files(tmp_path / "out", monkeypatch, tmp_path)


def test_no_fingerprint_when_not_asked(tmp_path, sharded, monkeypatch):
    base, _ = sharded
    forbid(monkeypatch, "loraops.engine.store_digests")
    assert engine.merge(base, [], tmp_path / "out", device="cpu", fingerprint=False).fingerprint is None


def test_recording_a_merge_does_not_reread_the_output(tmp_path, sharded, monkeypatch):
    base, adapter_dir = sharded
    out = tmp_path / "out"
    real = __import__("loraops.basemodel", fromlist=["_hash_file"])._hash_file

    def hash_file(header, bar):
        assert out not in header.path.parents, f"re-read {header.path}"
        return real(header, bar)

    with monkeypatch.context() as m:
        m.setattr("loraops.basemodel._hash_file", hash_file)
        report = merging.merge(str(base), [str(adapter_dir)], out, device="cpu")
        restored = merging.subtract(str(out), [str(adapter_dir)], tmp_path / "restored", exact=True, device="cpu")
    assert report.name == "out" and report.fingerprint == from_files(out, monkeypatch, tmp_path)
    assert restored.fingerprint == BaseModel.open(base).fingerprint()  # the same model: recorded as the base
