"""A GPU that runs out of memory (`--device cuda`): one line naming the device, what was being done and what to do,
exit 1, nothing written and nothing recorded; from Python, a DeviceMemoryError. Without a GPU here: CUDA is made to
look available and every allocation on it fails as a full GPU's does (torch.cuda.OutOfMemoryError, which a CPU
build of torch constructs too)."""
from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

from factories import peft_adapter, tiny_llama
from loraops import DeviceMemoryError, LoraopsError, derive, engine, merging
from loraops.cli import main
from loraops.registry import Registry
from loraops.settings import out_of_memory

TORCH_SAYS = ("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.10 GiB of which "
              "3.19 MiB is free. Process 4242 has 79.09 GiB memory in use. Of the allocated memory 78.50 GiB is "
              "allocated by PyTorch, and 12.00 MiB is reserved by PyTorch but unallocated. If reserved but unallocated "
              "memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")
ADVICE = "(tried to allocate 20.00 MiB, 3.19 MiB free): run with --device cpu or free memory on cuda"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("device-memory")
    base = tiny_llama(root / "base")
    return {"base": base, "tuned": tiny_llama(root / "tuned", seed=5),
            "a": peft_adapter(base, root / "a", seed=1, r=4), "b": peft_adapter(base, root / "b", seed=2, r=2)}


def _on_cuda(args, kwargs) -> bool:
    return any(isinstance(d, (torch.device, str)) and str(d).startswith("cuda")
               for d in (*args, kwargs.get("device")))


@pytest.fixture
def full_gpu(monkeypatch):
    """CUDA available, and full: moving a tensor onto it raises torch's OutOfMemoryError. An empty buffer "on" it is
    made on the CPU, so a merge gets as far as its first factors, as one on a GPU with a few MiB free does."""
    empty, to = torch.empty, torch.Tensor.to

    def fake_empty(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        if _on_cuda((), kwargs):
            kwargs["device"] = "cpu"
        return empty(*args, **kwargs)

    def fake_to(self, *args, **kwargs):
        if _on_cuda(args, kwargs):
            raise torch.cuda.OutOfMemoryError(TORCH_SAYS)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch, "empty", fake_empty)
    monkeypatch.setattr(torch.Tensor, "to", fake_to)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def registry_state():
    with Registry.open() as reg:
        return sorted(a.ref for a in reg.list_adapters()), sorted(b.name for b in reg.list_bases())


def assert_one_line(result, message):
    assert result.exit_code == 1, result.output
    assert result.stderr == f"error: {message}\n", result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_merge_out_of_gpu_memory_is_one_line_and_leaves_nothing(files, tmp_path, full_gpu):
    """The merge's compute stage (the calling thread, beside the reader and writer threads, handing its error on
    through _Pipeline._guard) runs out of GPU memory moving its first factors up: it was torch's traceback."""
    folder = tmp_path / "outputs"
    folder.mkdir()
    state = registry_state()
    result = run("merge", files["a"], "--into", files["base"], "-o", folder / "merged", "--device", "cuda")
    assert_one_line(result, f"out of memory on cuda while merging into {files['base']} {ADVICE}")
    assert list(folder.iterdir()) == []  # neither the output nor its temporary sibling
    assert registry_state() == state


def test_merge_precise_names_it_too(files, tmp_path, full_gpu):
    result = run("merge", files["a"], "--into", files["base"], "-o", tmp_path / "merged", "--device", "cuda",
                 "--precise", "--no-record")
    assert result.exit_code == 1, result.output
    assert result.stderr.endswith(", free memory on cuda or leave out --precise (float64 takes twice the memory)\n")


@pytest.mark.parametrize("command, args, what", [
    ("combine", lambda f: [f"{f['a']}:0.7", f"{f['b']}:0.3", "--method", "ties", "--density", "0.5"],
     "ties of a@1, b@1"),
    ("resize", lambda f: [f["a"], "--rank", "2"], "resize of a@1"),
    ("extract", lambda f: ["--base", f["base"], "--tuned", f["tuned"], "--rank", "2"], "extract of {tuned} − {base}"),
])
def test_derived_out_of_gpu_memory_is_one_line_and_leaves_nothing(files, tmp_path, full_gpu, command, args, what):
    folder = tmp_path / "outputs"
    folder.mkdir()
    state = registry_state()
    result = run(command, *args(files), "-o", folder / "out", "--device", "cuda")
    assert result.exit_code == 1, result.output
    line = result.stderr
    assert line.startswith("error: out of memory on cuda while computing module '") and line.count("\n") == 1, line
    assert line.endswith(f"' of the {what.format(**files)} {ADVICE}\n"), line
    assert list(folder.iterdir()) == []
    assert registry_state() == state  # (the inputs given by path are not left registered)


def test_the_library_raises_a_loraops_error_with_torchs_as_its_cause(files, tmp_path, full_gpu):
    with pytest.raises(DeviceMemoryError) as caught:
        merging.merge(files["base"], [str(files["a"])], tmp_path / "merged", device="cuda", record=False)
    assert isinstance(caught.value, LoraopsError) and isinstance(caught.value, MemoryError)
    assert isinstance(caught.value.__cause__, torch.cuda.OutOfMemoryError)
    assert not os.path.lexists(tmp_path / "merged") and list(tmp_path.iterdir()) == []
    with pytest.raises(DeviceMemoryError, match="^out of memory on cuda while computing module ") as caught:
        derive.combine([(str(files["a"]), 0.5), (str(files["b"]), 0.5)], "linear", device="cuda",
                       output=str(tmp_path / "combined"))
    assert isinstance(caught.value.__cause__, torch.cuda.OutOfMemoryError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("said, device, line", [
    ("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity; 75.00 GiB already allocated; "
     "1.20 GiB free; 76.00 GiB reserved in total by PyTorch)", "cuda:0",
     "out of memory on cuda:0 while doing it (tried to allocate 2.00 GiB, 1.20 GiB free): run with --device cpu or "
     "free memory on cuda:0"),
    ("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call",
     "cuda", "out of memory on cuda while doing it: run with --device cpu or free memory on cuda"),
    ("cusolver error: CUSOLVER_STATUS_ALLOC_FAILED, when calling `cusolverDnCreate(handle)`", "cuda:1",
     "out of memory on cuda:1 while doing it: run with --device cpu or free memory on cuda:1"),
    ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
     "allocate 3221225472 bytes. Error code 12 (Cannot allocate memory)", "cuda",
     "out of memory on cpu while doing it (tried to allocate 3.00 GiB): free memory"),
    ("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)", "cuda", None),
])
def test_torchs_ways_of_running_out(said, device, line):
    error = out_of_memory(RuntimeError(said), torch.device(device), "doing it")
    assert (str(error) if error is not None else None) == line


def test_an_out_of_memory_the_library_does_not_name_is_still_one_line(files, tmp_path, monkeypatch):
    """The CLI's last resort, for a path device_memory does not cover: no traceback, exit 1."""
    def check(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(TORCH_SAYS)

    monkeypatch.setattr(engine, "_plan", check)
    result = run("merge", files["a"], "--into", files["base"], "-o", tmp_path / "merged", "--no-record")
    assert_one_line(result, f"out of memory on cuda {ADVICE}")

