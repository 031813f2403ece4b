"""combine/resize write their result as it is computed, one module at a time (loraops.algebra.Derivation →
formats.write → st.TensorWriter), and register it from the hashes taken while writing: files byte for byte what
the writer wrote before, the identity the file's sha256, nothing left behind by a failure or a SIGKILL midway, and
never the whole result in memory."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from factories import kohya_file, lora_adapter
from loraops import derive, formats, st
from loraops.adapter import Adapter, LoraModule
from loraops.errors import InvalidInputError
from loraops.fsutil import TMP_MARK
from loraops.registry import Registry

MODULES = {f"lora_unet_{i}_proj": ((32,), (32,)) for i in range(6)}


def two_inputs(folder: Path, fmt: str) -> tuple[Path, Path]:
    """Two adapters of six 32×32 modules (ranks 4 and 2): kohya files (names unbound), or PEFT folders."""
    if fmt == "kohya":
        return (kohya_file(folder / "a.safetensors", MODULES, rank=4),
                kohya_file(folder / "b.safetensors", MODULES, rank=2, seed=1))
    shapes = {f"m.{i}.proj": (32, 32) for i in range(6)}
    return (formats.write_adapter(lora_adapter(shapes, rank=4), folder / "a"),
            formats.write_adapter(lora_adapter(shapes, rank=2, seed=1), folder / "b"))


def fourth(fmt: str) -> str:
    """The fourth module computed (in name order)."""
    return "lora_unet_3_proj" if fmt == "kohya" else "m.3.proj"


def fixed_adapter(fmt: str) -> Adapter:
    """A small adapter of exact values (no random numbers: its files' bytes are the same with any torch): bfloat16
    factors, several ranks and alphas, a 3×3 conv for kohya, two pipeline components for diffusers."""
    shapes = {  # name: (rank, out, in, kernel)
        "peft": {"model.layers.0.self_attn.q_proj": (4, 16, 12, None), "model.layers.0.mlp.down_proj": (2, 12, 20, None),
                 "model.layers.1.self_attn.q_proj": (4, 16, 12, None)},
        "kohya": {"lora_unet_down_blocks_0_resnets_0_conv1": (4, 8, 6, 3), "lora_unet_mid_block_attn_proj": (2, 10, 8, None),
                  "lora_te_text_model_encoder_layers_0_mlp_fc1": (4, 12, 8, None)},
        "diffusers": {"unet.down_blocks.0.attentions.0.proj_in": (4, 8, 8, None),
                      "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (2, 8, 8, None)},
    }[fmt]
    modules = {}
    for i, (name, (r, out, inp, kernel)) in enumerate(shapes.items()):
        a_shape, b_shape = ((r, inp, kernel, kernel), (out, r, 1, 1)) if kernel else ((r, inp), (out, r))
        A = ((torch.arange(torch.Size(a_shape).numel()) % 7 - 3).reshape(a_shape) / 4).to(torch.bfloat16)
        B = ((torch.arange(torch.Size(b_shape).numel()) % 5 - 2 + i).reshape(b_shape) / 8).to(torch.bfloat16)
        alpha = float(2 * r + i)
        modules[name] = LoraModule(name, A=A, B=B, alpha=alpha, scale=alpha / r, kind="conv" if kernel else "linear")
    return Adapter(modules=modules, format=fmt, base_model="base", names_resolved=fmt != "kohya",
                   metadata={"ss_base_model_version": "sd_v1"} if fmt == "kohya" else {})


# sha256 of each file fixed_adapter(fmt) is written as, by the writer before it streamed (main at 0449d05)
BEFORE = {
    "peft": {"adapter_config.json": "8d2134515602b69b557599ee70555ac613e12b2e2f926cb62ed3cd8ce9940b5f",
             "adapter_model.safetensors": "a98e90aa00304d3a7fdd74c9225b47d63c3427e44604d0a0d668e90daf7ec767"},
    # (its header's conv_alpha since written "8.0", as sd-scripts does; the same bytes after the header,
    # sshs_model_hash f930299f…)
    "kohya": {"out.safetensors": "01c7a2a5e0f6f44354ed4c207cd80fb1a612542e6c6579cb609c7026d6e9015f"},
    # (its header's text-encoder targets since written without text_model. (formats.diffusers.config_path); the same
    # tensors)
    "diffusers": {"out.safetensors": "041b59546a23e7555fcb7bda26ded25bcb07577a20e7bf028740f733d674c4b2"},
}
# identities of fixed_adapter combined by cat as below, registered before this change (main at 0449d05); the kohya
# one's header since keeps its inputs' ss_base_model_version (sd_v1; the same bytes after the header, sshs_model_hash
# 5bb83805…), and its alphas are written as floats ("8.0", as sd-scripts does)
CAT_PEFT_BEFORE = "43f4c173b35053af5284dc3aa9a48496df6ffb9b0f06e28f829a7c9f5335f39e"
CAT_KOHYA_BEFORE = "855a08f4017d106e6c447990bdd11a6903befb598d5b78394f01e1fb5ee7fa22"


def previous_write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                               hash_key: str | None = None) -> None:
    """st.write_safetensors as it was before tensors could be streamed (buffered writes instead of direct ones)."""
    metadata = dict(sorted(metadata.items()))
    if hash_key:
        metadata[hash_key] = "0" * 64
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    ordered = sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0]))
    for name, tensor in ordered:
        nbytes = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": st.st_dtype(tensor.dtype), "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data = b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for _, t in ordered)
    if hash_key:
        raw = raw.replace(b"0" * 64, hashlib.sha256(data).hexdigest().encode(), 1)
    Path(path).write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stand_ins(adapter: Adapter) -> Adapter:
    return replace(adapter, modules={name: m.stand_in() for name, m in adapter.modules.items()})


@pytest.mark.no_registry
@pytest.mark.parametrize("fmt", ["peft", "kohya", "diffusers"])
def test_streamed_files_are_byte_for_byte_the_previous_writers(fmt, tmp_path):
    adapter = fixed_adapter(fmt)
    dest = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    written = formats.write(stand_ins(adapter), dest, fmt, modules=iter(list(adapter.modules.values())))
    files = sorted(dest.iterdir()) if fmt == "peft" else [dest]
    assert {f.name: sha256(f) for f in files} == BEFORE[fmt] == written.sha256
    weights = files[-1] if fmt == "peft" else dest
    header = st.read_header(weights)
    again = tmp_path / "again.safetensors"
    previous_write_safetensors(again, st.load_tensors(header), header.metadata)
    assert again.read_bytes() == weights.read_bytes()
    # the same through st.write_safetensors, tensors kept rather than spilled
    st.write_safetensors(again, st.load_tensors(header), header.metadata)
    assert again.read_bytes() == weights.read_bytes()


@pytest.mark.no_registry
def test_tensor_writer_in_any_order_is_the_previous_layout(tmp_path):
    """Widest element first, then by name, whatever order tensors come in; the data hash in the header as kohya
    wants it; the file's sha256 as returned."""
    tensors = {"b.weight": torch.arange(6, dtype=torch.float16).reshape(2, 3), "a.alpha": torch.tensor(3.0),
               "c": torch.arange(5, dtype=torch.float64), "a.weight": torch.ones(3, 2, dtype=torch.bfloat16),
               "empty": torch.zeros(0, 4), "ü-key": torch.tensor([1, 2], dtype=torch.int8)}
    metadata = {"z": "1", "ss_name": "é", "a": "2"}
    for hash_key in (None, "sshs_model_hash"):
        writer = st.TensorWriter(tmp_path / "streamed.safetensors")
        for name in ["ü-key", "c", "a.weight", "empty", "b.weight", "a.alpha"]:
            writer.add(name, tensors[name])
        digest = writer.close(metadata, hash_key=hash_key)
        previous_write_safetensors(tmp_path / "before.safetensors", tensors, metadata, hash_key)
        streamed = (tmp_path / "streamed.safetensors").read_bytes()
        assert streamed == (tmp_path / "before.safetensors").read_bytes()
        assert digest == hashlib.sha256(streamed).hexdigest()


@pytest.mark.registry_backend
def test_a_derived_adapter_is_the_same_and_recorded_from_the_hashes_taken_while_writing(tmp_path):
    """cat of fixed adapters gives the files (identities) it gave before; registering them neither hashes nor reads
    the written weights again (the values were checked as they were computed), and the identity recorded is the
    written file's sha256 (kohya) or PEFT's identity of the written folder."""
    from loraops import fsutil
    from loraops.registry import blobs, store

    peft_in = formats.write_adapter(fixed_adapter("peft"), tmp_path / "p")
    kohya_in = formats.write_adapter(fixed_adapter("kohya"), tmp_path / "k.safetensors", "kohya")
    with Registry.open() as reg:  # the inputs registered first: their own registration hashes and checks them
        reg.register_adapter(peft_in)
        reg.register_adapter(kohya_in)
    checked = []

    def written_here(path) -> bool:
        path = Path(path)
        return path.name in ("cat", "out.safetensors") or path.parent.name == "cat"

    def not_the_outputs(path, *args, **kwargs):
        assert not written_here(path), path
        return fsutil.sha256_file(path, *args, **kwargs)

    # its own MonkeyPatch: undoing the test's would also undo conftest's, and point LORAOPS_HOME at the real home
    with pytest.MonkeyPatch.context() as spy:
        for module in (store, blobs, formats):
            spy.setattr(module, "sha256_file", not_the_outputs)
        real_check = formats.check_values
        spy.setattr(formats, "check_values", lambda path, **kw: checked.append(path) or real_check(path, **kw))

        kept = derive.combine([(str(peft_in), 1.0), (str(peft_in), -0.5)], "cat", device="cpu", name="cat")
        out = tmp_path / "out.safetensors"
        wrote = derive.combine([(str(kohya_in), 1.0), (str(kohya_in), 0.5)], "cat", device="cpu", output=str(out))
    assert checked and not [path for path in checked if written_here(path)]
    assert (kept.adapter.sha256, wrote.adapter.sha256) == (CAT_PEFT_BEFORE, CAT_KOHYA_BEFORE)
    assert wrote.adapter.sha256 == sha256(out) == sha256(Path(wrote.adapter.path))
    assert formats.identity(kept.adapter.path) == CAT_PEFT_BEFORE  # the stored folder, read again
    with Registry.open() as reg:
        assert reg.verify() == []


def registry_state() -> tuple[list[str], list[str]]:
    """(registered adapter names, every path under the blob store except lock files and stamps)."""
    with Registry.open() as reg:
        names = sorted(a.name for a in reg.list_adapters())
        root = reg.blobs.root
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                       if ".locks" not in p.parts and ".stamps" not in p.parts)
    return names, files


def open_files() -> list[str]:
    return sorted(os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}"))


def fail_after(monkeypatch, method: str, module: str, make) -> list[int]:
    """Replace a combine method by one that does ``make(result)`` on ``module``; returns a counter of the tensors
    the writer is given (modules may be computed ahead of the writer, on threads: so keyed by name, not by call)."""
    from loraops.ops import combine as ops

    spec, added = ops.METHODS[method], [0]
    real_add = st.TensorWriter.add

    def add(self, name, tensor, **kwargs):
        added[0] += 1
        return real_add(self, name, tensor, **kwargs)

    def run(*args):
        result = spec.run(*args)
        return make(result) if args[-1].module == module else result

    monkeypatch.setattr(st.TensorWriter, "add", add)
    monkeypatch.setitem(ops.METHODS, method, replace(spec, run=run))
    return added


def boom(result):
    raise KeyboardInterrupt  # as a Ctrl-C midway would


def nan(result):
    result.B[0, 0] = float("nan")
    return result


@pytest.mark.parametrize("make, error", [(boom, KeyboardInterrupt), (nan, InvalidInputError)])
@pytest.mark.parametrize("fmt, output", [("kohya", "out.safetensors"), ("peft", "out"), ("kohya", None)])
def test_a_failure_midway_leaves_nothing(tmp_path, monkeypatch, make, error, fmt, output):
    """A module that fails (an interrupt) or comes out with NaN after others were written: no output, no temp or
    scratch file (beside the output or in the blob store), no registry row, not even for the inputs the command
    registered, and no file left open."""
    a, b = two_inputs(tmp_path, fmt)
    out = tmp_path / "outputs"
    out.mkdir()
    before, files = registry_state(), open_files()
    added = fail_after(monkeypatch, "linear", fourth(fmt), make)
    with pytest.raises(error) as raised:
        derive.combine([(str(a), 1.0), (str(b), 0.5)], "linear", device="cpu",
                       output=None if output is None else str(out / output))
    assert added == [3 * (3 if fmt == "kohya" else 2)]  # three modules written (kohya: down, up, alpha), no more
    if error is InvalidInputError:
        assert f"module {fourth(fmt)!r} comes out with NaN or Inf" in str(raised.value)
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.name, b.name, "outputs"])
    assert registry_state() == before
    assert open_files() == files


def test_a_resize_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    from loraops.ops import resize as ops

    a = kohya_file(tmp_path / "a.safetensors", MODULES, rank=4)
    real, seen = ops.resize_module, []

    def resize_module(*args, **kwargs):
        seen.append(1)
        module, record = real(*args, **kwargs)
        if len(seen) == 3:
            module.B[1, 0] = float("inf")
        return module, record

    monkeypatch.setattr(ops, "resize_module", resize_module)
    with pytest.raises(InvalidInputError, match=r"resize of a@1: module 'lora_unet_2_proj' comes out with "
                                                r"NaN or Inf values \(beyond what float32 holds\?\)"):
        derive.resize(str(a), rank=2, device="cpu", output=str(tmp_path / "r.safetensors"))
    assert len(seen) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    assert registry_state() == ([], [])


def test_the_result_is_never_whole_in_memory(tmp_path, monkeypatch):
    """Each module the algebra makes is written and dropped before the next is made: the writer never sees more
    than the module it is writing alive (the whole result held again would be every module)."""
    made: list[weakref.ref] = []
    real_with_factors = LoraModule.with_factors

    def with_factors(self, *args, **kwargs):
        module = real_with_factors(self, *args, **kwargs)
        made.append(weakref.ref(module.B))
        return module

    most = [0]
    real_add = st.TensorWriter.add

    def add(self, name, tensor, **kwargs):
        most[0] = max(most[0], sum(ref() is not None for ref in made))
        return real_add(self, name, tensor, **kwargs)

    monkeypatch.setattr(LoraModule, "with_factors", with_factors)
    monkeypatch.setattr(st.TensorWriter, "add", add)
    a = kohya_file(tmp_path / "a.safetensors", MODULES, rank=4)
    b = kohya_file(tmp_path / "b.safetensors", MODULES, rank=2, seed=1)
    derive.combine([(str(a), 1.0), (str(b), 0.5)], "linear", device="cpu", output=str(tmp_path / "c.safetensors"))
    derive.combine([(str(a), 1.0), (str(b), 1.0)], "ties", {"density": 0.5}, device="cpu", fmt="kohya")
    derive.resize(str(a), rank=2, device="cpu", output=str(tmp_path / "r.safetensors"))
    assert len(made) == 3 * len(MODULES)
    assert most[0] == 1



@pytest.mark.no_registry
def test_the_result_is_never_whole_in_memory_where_the_records_are_first_built(tmp_path):
    """The test above, alone in a fresh interpreter, where the combine is the first to make a record: pydantic's
    deferred build of its schema took names from the frames of its caller, and what it kept of them held the
    previous module alive while the next was written (it passed after any test that had built the records)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "--basetemp", str(tmp_path / "t"), f"{__file__}::test_the_result_is_never_whole_in_memory"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]

CHILD = """
import os, sys, time
from dataclasses import replace
from loraops.cli import exit_status
from loraops.ops import combine as ops

spec, calls = ops.METHODS["linear"], [0]

def run(*args):
    calls[0] += 1
    if calls[0] == 4:  # three modules written: say so, and wait to be killed
        open(sys.argv[1], "w").close()
        time.sleep(120)
    return spec.run(*args)

ops.METHODS["linear"] = replace(spec, run=run)
sys.exit(exit_status(sys.argv[2:]))
"""


@pytest.mark.parametrize("fmt, name", [("kohya", "c.safetensors"), ("peft", "c")])
def test_killed_while_writing_leaves_no_output(tmp_path, fmt, name):
    """SIGKILL while the result is being written (its first modules already in the scratch file, inside the blob
    store's scratch folder, which `gc` removes: it is copied to the output only once whole): nothing beside the
    output; the scratch file had no name to leave behind."""
    from loraops import settings

    a, b = two_inputs(tmp_path, fmt)
    out, marker = tmp_path / "outputs", tmp_path / "marker"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), "combine", str(a), str(b), "--method", "linear",
                              "--device", "cpu", "-o", str(out / name)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the combine ended before it was killed"
            time.sleep(0.05)
        links = [os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")]
        scratch = [link for link in links if link.startswith(str(settings.blobs_dir())) and link.endswith("(deleted)")]
        assert len(scratch) == 1, links  # the modules written so far, in a file with no name
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert list(out.iterdir()) == []
    with Registry.open() as reg:
        assert [p.name.startswith(f"{TMP_MARK}scratch-") for p, _ in reg.gc(grace_s=0)] == [True]


@pytest.mark.parametrize("fmt, name", [("kohya", "c.safetensors"), ("peft", "c")])
@pytest.mark.registry_backend
def test_an_output_is_stored_as_written_not_read_back(tmp_path, monkeypatch, fmt, name):
    """`combine -o`: the result is written once, into the store's scratch folder (hashed as it is written), copied to
    the output and moved into the store: the stored copy is not a copy of the output, read back and hashed."""
    from loraops import derive
    from loraops.registry import blobs

    a, b = two_inputs(tmp_path, fmt)
    with Registry.open() as reg:
        reg.register_adapter(a), reg.register_adapter(b)

    def read_back(*args):
        raise AssertionError("the output was read back to be stored")

    monkeypatch.setattr(blobs, "_hash_copy", read_back)
    output = tmp_path / "out" / name
    result = derive.combine([(str(a), 1.0), (str(b), 0.5)], "linear", name="c", output=str(output), device="cpu")
    assert result.output == str(output) and formats.identity(output) == result.adapter.sha256
    with Registry.open() as reg:
        assert reg.verify() == []
    stored = Path(result.adapter.path)
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in stored.iterdir()) if fmt == "peft" \
        else output.read_bytes() == stored.read_bytes()


@pytest.mark.parametrize("full", ["store", "output"])
def test_a_full_disk_names_the_file_system_that_filled(tmp_path, monkeypatch, full):
    """`combine -o` on a full disk: the result is written into the store's scratch, then copied to the output; a
    write's ENOSPC names no file ('No space left on device' alone), so the error says which file system filled, with
    the exit code of a full disk, and nothing is left: no output, no record."""
    import errno

    from loraops.errors import DiskSpaceError

    a, b = two_inputs(tmp_path, "kohya")
    with Registry.open() as reg:
        reg.register_adapter(a), reg.register_adapter(b)
        store = reg.blobs.root

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(*(("loraops.formats.write", no_space) if full == "store" else (derive, "copy_file", no_space)))
    output = tmp_path / "out" / "c.safetensors"
    with pytest.raises(DiskSpaceError, match=f"^{store if full == 'store' else output.parent}: not enough free disk "
                                             "for the result \\(No space left on device\\)$") as caught:
        derive.combine([(str(a), 1.0), (str(b), 0.5)], "linear", name="c", output=str(output), device="cpu")
    assert caught.value.exit_code == 5
    assert not output.parent.exists() or list(output.parent.iterdir()) == []
    with Registry.open() as reg:
        assert "c" not in {r.name for r in reg.list_adapters()}


def test_export_on_a_full_disk_names_where_it_was_writing(tmp_path, monkeypatch):
    """export's write on a full disk said only 'No space left on device', where every other writer names the
    folder (fsutil.disk_named)."""
    import errno

    from loraops.errors import DiskSpaceError

    a, _ = two_inputs(tmp_path, "kohya")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("loraops.formats.write", no_space)
    output = tmp_path / "out" / "e.safetensors"
    with pytest.raises(DiskSpaceError, match=f"^{output.parent}: not enough free disk for the result \\(No space "
                                             "left on device\\)$") as caught:
        derive.export(str(a), "kohya", str(output))
    assert caught.value.exit_code == 5 and not output.exists()


@pytest.mark.registry_backend
def test_register_trusts_written_only_for_checked_values_of_that_path(tmp_path):
    """``register_adapter(written=...)`` skips the NaN check and the re-hash only for what it vouches for: a Written of
    another path is refused (its hashes are not this file's), and one of values nobody checked (formats.write of an
    adapter in memory) has them checked as any registration does."""
    good = lora_adapter({"m.0.proj": (8, 8)})
    bad = replace(good, modules={n: replace(m, B=m.B.clone().fill_(float("nan"))) for n, m in good.modules.items()})
    other = formats.write(good, tmp_path / "good")
    written = formats.write(bad, tmp_path / "bad")
    with Registry.open() as reg:
        with pytest.raises(InvalidInputError, match="NaN or Inf"):
            reg.register_adapter(written.path, written=written)
        with pytest.raises(InvalidInputError, match="not what was written"):
            reg.register_adapter(written.path, written=other)
        assert reg.list_adapters() == []


def test_two_modules_with_one_pipeline_name_are_refused_not_dropped(tmp_path):
    """A single-file checkpoint's name and the diffusers name it translates to are one pipeline module: the diffusers
    writer refuses them (it used to keep one and drop the other), and nothing is written."""
    from loraops.errors import FormatError

    names = ["model.diffusion_model.input_blocks.1.1.proj_in", "unet.down_blocks.0.attentions.0.proj_in"]
    modules = {n: LoraModule(n, torch.randn(2, 8), torch.randn(8, 2), alpha=2.0, scale=1.0) for n in names}
    with pytest.raises(FormatError, match=r"two modules are both the pipeline's 'unet\.down_blocks\.0\.attentions\.0\.proj_in'"):
        formats.write_adapter(Adapter(modules, "kohya", names_resolved=True), tmp_path / "out.safetensors", "diffusers")
    assert list(tmp_path.iterdir()) == []
