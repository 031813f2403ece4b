"""Registered adapters are loaded as views of their stored files mapped into memory (st.map_file), not read into the
process's anonymous memory; the user's own files are still read. Checked against the kernel's own account of the
process's memory (/proc/self/maps, /proc/self/smaps), so Linux only."""
from __future__ import annotations

import gc
import hashlib
import json
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from factories import kohya_file, peft_adapter, tiny_llama
from test_registry import KOHYA_MODULES
from loraops import algebra, derive, engine, formats, merging, st
from loraops.registry import Registry

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")



@pytest.fixture(scope="module")
def art(tmp_path_factory):
    d = tmp_path_factory.mktemp("mapped")
    base = tiny_llama(d / "llama")
    return {
        "base": base,
        "peft-bf16": peft_adapter(base, d / "peft-bf16", r=4, dtype=torch.bfloat16),
        "peft-fp16": peft_adapter(base, d / "peft-fp16", r=4, dtype=torch.float16, seed=2),
        # modules_to_save: full tensors are mapped too
        "peft-fp32": peft_adapter(base, d / "peft-fp32", r=4, seed=3, modules_to_save=["lm_head"]),
        "kohya-bf16": kohya_file(d / "kohya-bf16.safetensors", KOHYA_MODULES, dtype=torch.bfloat16),
        "kohya-fp32": kohya_file(d / "kohya-fp32.safetensors", KOHYA_MODULES, seed=4),
    }


@pytest.fixture
def reg():
    with Registry.open() as registry:
        yield registry


def regions() -> list[tuple[int, int, str]]:
    """(start, end, file or '') of every mapping of this process."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, fields[5].strip() if len(fields) == 6 else ""))
    return out


def mapped_file(tensor: torch.Tensor, maps=None) -> str | None:
    """The file whose mapping holds the tensor's data, None for anonymous memory."""
    ptr = tensor.data_ptr()
    for start, end, name in maps if maps is not None else regions():
        if start <= ptr < end:
            return name if name.startswith("/") else None
    raise AssertionError("the tensor's data is in no mapping")


def private_dirty_kb(path: Path) -> int | None:
    """kB of the file's mappings that were written to (copied into anonymous memory); None when it is not mapped."""
    total, found, current = 0, False, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=5)
            if "-" in first[0] and len(first) >= 5 and ":" not in first[0]:
                current = len(first) == 6 and first[5].strip() == str(path)
                found |= current
            elif current and line.startswith("Private_Dirty:"):
                total += int(line.split()[1])
    return total if found else None


def factors(adapter):
    for module in adapter.modules.values():
        yield f"{module.name}.A", module.A
        yield f"{module.name}.B", module.B
    yield from adapter.full_tensors.items()


def weights_file(reg: Registry, adapter_id: int) -> Path:
    return formats.adapter_files(reg.adapter_path(adapter_id))[0].resolve()


def digests(reg: Registry) -> dict[str, str]:
    root = reg.blobs.root
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".locks" not in p.parts}


@pytest.mark.parametrize("name", ["peft-bf16", "peft-fp16", "peft-fp32", "kohya-bf16", "kohya-fp32"])
def test_stored_factors_are_views_of_the_stored_file_bit_for_bit(reg, art, name):
    record = reg.add_adapter(art[name])
    stored = reg.load_adapter(record.id)
    read = formats.read_adapter(art[name])
    blob = str(weights_file(reg, record.id))
    maps = regions()
    assert dict(factors(stored)).keys() == dict(factors(read)).keys()
    assert stored.full_tensors or name != "peft-fp32"
    for (key, mine), (_, theirs) in zip(factors(stored), factors(read)):
        assert mapped_file(mine, maps) == blob, key
        assert mapped_file(theirs, maps) is None, key  # the user's file is read, as before
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, key
        assert torch.equal(mine.reshape(-1).view(torch.uint8), theirs.reshape(-1).view(torch.uint8)), key


def unaligned_kohya(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A kohya file as another writer might leave it: the header not padded, so the data starts 2 bytes past a
    multiple of 4 (float32 tensors misaligned, bfloat16 ones aligned)."""
    entries, offset = {}, 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        entries[key] = {"dtype": st.st_dtype(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(entries).encode()
    raw += b" " * ((2 - len(raw)) % 4)  # 8 + len(raw) ≡ 2 (mod 4)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return path


def test_unaligned_tensors_are_read_and_still_load_right(reg, art, tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "lora_unet_model_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 64, generator=g),
        "lora_unet_model_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(64, 4, generator=g),
        "lora_unet_model_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0),
        "lora_unet_model_layers_1_mlp_down_proj.lora_down.weight": torch.randn(4, 128, generator=g).bfloat16(),
        "lora_unet_model_layers_1_mlp_down_proj.lora_up.weight": torch.randn(64, 4, generator=g).bfloat16(),
    }
    path = unaligned_kohya(tmp_path / "unaligned.safetensors", tensors)
    header = st.read_header(path)
    assert header.data_offset % 4 == 2
    loaded = st.load_tensors(header, mapped=True)
    maps = regions()
    for key, expected in tensors.items():
        assert torch.equal(loaded[key], expected), key
        aligned = header.tensors[key].start % expected.element_size() == 0
        assert aligned == (expected.dtype == torch.bfloat16), key
        assert mapped_file(loaded[key], maps) == (str(path.resolve()) if aligned else None), key

    record = reg.add_adapter(path)  # the stored copy is byte for byte the same file: the same tensors are read
    stored = reg.load_adapter(record.id)
    read = formats.read_adapter(path)
    maps = regions()
    for (key, mine), (_, theirs) in zip(factors(stored), factors(read)):
        assert torch.equal(mine, theirs), key
        assert (mapped_file(mine, maps) is not None) == (mine.dtype == torch.bfloat16), key


def spy(monkeypatch, owner, name: str, seen: list) -> None:
    """Record the arguments of every call of owner.name by parameter name, however they were passed (which keeps
    the adapters passed alive, mapped)."""
    import inspect

    real = getattr(owner, name)

    def recorded(*args, **kwargs):
        seen.append(inspect.signature(real).bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)


def assert_mapped_untouched(adapters, blobs: set[str]) -> None:
    """Every factor is a view of a stored file, and none of those files' mapped pages was written to."""
    maps = regions()
    assert {mapped_file(t, maps) for a in adapters for _, t in factors(a)} == blobs
    for blob in blobs:
        assert private_dirty_kb(Path(blob)) == 0, blob


def test_merge_combine_resize_never_write_into_the_stored_files(reg, art, tmp_path, monkeypatch):
    """Nothing writes in place into loaded factors: a write would copy a mapped page into anonymous memory (or, with
    a shared mapping, change the store). Every operation on registered inputs, then the store hashed again."""
    blobs = {n: str(weights_file(reg, reg.add_adapter(art[n], name=n).id)) for n in ("peft-bf16", "peft-fp16", "peft-fp32")}
    reg.add_base(art["base"], name="llama")
    before = digests(reg)
    merged, combined, resized = [], [], []
    spy(monkeypatch, engine, "merge", merged)
    spy(monkeypatch, algebra, "combine_lazily", combined)
    spy(monkeypatch, algebra, "resize_lazily", resized)

    report = merging.merge("llama", ["peft-bf16:0.5", "peft-fp32"], tmp_path / "merged", record=False, device="cpu")
    assert report.tensors_merged and report.tensors_replaced  # the fp32 adapter's lm_head replaces the base's
    assert_mapped_untouched([a for a, _ in merged[0]["adapters"]], {blobs["peft-bf16"], blobs["peft-fp32"]})
    for method, params, rank in (("cat", None, None), ("svd", None, 4), ("ties", {"density": 0.5}, 4)):
        derive.combine([("peft-bf16", 0.7), ("peft-fp16", 0.3)], method, params, rank=rank, device="cpu",
                       name=f"mix-{method}")
    assert_mapped_untouched([a for call in combined for a, _ in call["inputs"]], {blobs["peft-bf16"], blobs["peft-fp16"]})
    derive.resize("peft-bf16", rank=2, device="cpu")
    derive.resize("peft-fp32", dynamic="sv_fro", param=0.9, device="cpu")
    assert_mapped_untouched([call["adapter"] for call in resized], {blobs["peft-bf16"], blobs["peft-fp32"]})
    after = digests(reg)
    assert {k: after[k] for k in before} == before


def test_loading_leaks_no_descriptor_warns_nothing_and_unmaps_with_the_last_view(reg, art):
    record = reg.add_adapter(art["peft-bf16"])
    blob = weights_file(reg, record.id)
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = [reg.load_adapter(record.id) for _ in range(5)]
    assert caught == []
    assert len(os.listdir("/proc/self/fd")) == fds  # mapped, and no file left open for it
    assert all(mapped_file(t) == str(blob) for a in loaded for _, t in factors(a))

    kept = next(factors(loaded[0]))[1][1:]  # a view of a view keeps the mapping
    del loaded
    gc.collect()
    assert mapped_file(kept) == str(blob)
    del kept
    gc.collect()
    assert private_dirty_kb(blob) is None  # unmapped: nothing of it stays in this process


def test_merge_of_a_registered_path_loads_its_stored_copy(reg, art, tmp_path, monkeypatch):
    """A path whose identity is registered is merged from the stored copy (mapped); one that is not, or whose
    stored copy is damaged, from a private copy of the file beside the output (mapped; a file with no name: the
    mapping shows it deleted). The three merges are the same bytes."""
    path = art["peft-fp16"]
    seen = []
    spy(monkeypatch, engine, "merge", seen)

    def merge(out: str) -> tuple[str | None, dict[str, str]]:
        report = merging.merge(art["base"], [str(path)], tmp_path / out, record=False, device="cpu")
        adapter = seen[-1]["adapters"][0][0]
        assert adapter.label == str(path) and report.adapters[0].ref == str(path)
        where = {mapped_file(t) for _, t in factors(adapter)}
        assert len(where) == 1
        written = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (tmp_path / out).glob("*.safetensors")}
        assert written
        return where.pop(), written

    def private(where: str | None) -> bool:  # a file with no name beside the outputs
        return where is not None and where.startswith(f"{tmp_path}/") and where.endswith(" (deleted)")

    # --no-record without a registry reference opens no registry: the file is copied, the copy mapped
    unregistered = merge("read")
    assert private(unregistered[0])
    record = reg.add_adapter(path)
    blob = weights_file(reg, record.id)
    monkeypatch.setattr(merging, "_references", lambda *_: True)  # as when the base is given by reference
    stored = merge("stored")
    assert stored == (str(blob), unregistered[1])
    with open(blob, "ab") as f:  # damaged: not used; the user's file is copied instead
        f.write(b"\0")
    damaged = merge("damaged")
    assert damaged[1] == unregistered[1] and private(damaged[0])


def test_mapping_can_be_turned_off(reg, art, monkeypatch):
    record = reg.add_adapter(art["kohya-fp32"])
    blob = str(weights_file(reg, record.id))
    assert {mapped_file(t) for _, t in factors(reg.load_adapter(record.id))} == {blob}
    monkeypatch.setenv("LORAOPS_MMAP", "0")
    assert {mapped_file(t) for _, t in factors(reg.load_adapter(record.id))} == {None}


SIGBUS_SCRIPT = """
import os, sys
from loraops import st
path = sys.argv[1]
whole = st.map_file(st.read_header(path))
os.truncate(path, 8)
print("after", float(whole[-4096:].float().sum()), flush=True)
"""


def test_a_mapped_file_that_shrinks_kills_the_process(art, tmp_path):
    """Why only the registry's own files are mapped: a file truncated while mapped kills the process at the next
    touch of a page past its end (SIGBUS: no exception, no message, no cleanup)."""
    path = tmp_path / "victim.safetensors"
    st.write_safetensors(path, {"x": torch.zeros(1 << 16)})
    done = subprocess.run([sys.executable, "-c", SIGBUS_SCRIPT, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -7 and "after" not in done.stdout, (done.returncode, done.stderr[-500:])  # SIGBUS
