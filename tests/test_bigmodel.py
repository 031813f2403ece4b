"""Memory bounds on wide tensors (a 70B's MLP weights are 8192×28672): measured in a child process's peak RSS."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

ROWS, COLS = 4096, 16384  # 128 MiB in bf16; its float32 delta is 256 MiB
NAME = "model.layers.0.mlp.down_proj.weight"


def _model(path, weight):
    path.mkdir()
    save_file({NAME: weight, "model.norm.weight": torch.ones(ROWS, dtype=torch.bfloat16)},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return path


def _extract_growth(tmp_path, rows_per_block: str) -> tuple[int, int]:
    """(how far extract's peak RSS grew, the float32 delta's bytes) on one ROWS×COLS bf16 weight, in a child process
    whose st.rows_per_block is the lambda ``rows_per_block``."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(ROWS, COLS, generator=g).mul_(0.02)
    tuned = w + torch.randn(ROWS, 1, generator=g) * 0.01 * torch.randn(1, COLS, generator=g)
    base, tuned = _model(tmp_path / "base", w.bfloat16()), _model(tmp_path / "tuned", tuned.bfloat16())
    del w
    script = textwrap.dedent(f"""
        import torch
        import loraops.st
        from loraops.extraction import extract
        loraops.st.rows_per_block = {rows_per_block}
        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
        before = rss()
        adapter, report = extract({str(base)!r}, {str(tuned)!r}, rank=1)
        assert len(adapter.modules) == 1 and report.modules[0].error < 0.01, report
        # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's (pytest's, holding the weights)
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(int(hwm.split()[1]) * 1024 - before)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]), ROWS * COLS * 4


def test_extract_forms_a_wide_delta_by_row_blocks(tmp_path):
    grown, delta = _extract_growth(tmp_path, "lambda info: 256")  # 8 MiB blocks: small beside the delta
    # the delta plus a few row blocks; reading each side whole (and a float32 copy of it) took 2.8× the delta here (1.5× now)
    assert grown < 2 * delta, f"peak RSS grew {grown / 2**20:.0f} MiB for a {delta / 2**20:.0f} MiB delta"


def test_extract_forms_a_delta_without_block_sized_temporaries(tmp_path):
    """Each side read whole (one block) and the delta: ~2.1× the delta at the peak. The base's block converted to
    float32 whole before it was subtracted, and torch.isfinite's temporaries of a whole block, each added ~1× more."""
    grown, delta = _extract_growth(tmp_path, "lambda info: info.shape[0] if info.shape else 1")  # each side whole
    # the delta and both bf16 sides (half of it each); a float32 copy of the base and isfinite's |values| and masks of
    # a whole block made it 3.3× (849 MiB)
    assert grown < 2.6 * delta, f"peak RSS grew {grown / 2**20:.0f} MiB for a {delta / 2**20:.0f} MiB delta"


def test_an_unavailable_device_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    import pytest

    from loraops import merging
    from loraops.errors import InvalidInputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing = tmp_path / "no-such-base"  # was opened (and a real one hashed: ~10 s for 2.6 GiB) before the refusal
    for run in (lambda: merging.merge(missing, [str(tmp_path / "a")], tmp_path / "out", device="cuda"),
                lambda: merging.subtract(missing, [str(tmp_path / "a")], tmp_path / "out", device="cuda")):
        with pytest.raises(InvalidInputError, match="no CUDA device is available"):
            run()
    assert not (tmp_path / "out").exists()


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


@pytest.mark.parametrize("precise", [False, True])
@pytest.mark.parametrize("base_dtype,tuned_dtype", [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"),
                                                    ("fp64", "fp64"), ("bf16", "fp32"), ("fp64", "fp32")])
def test_the_delta_formed_by_row_blocks_is_the_whole_tensors_difference(tmp_path, monkeypatch, base_dtype,
                                                                         tuned_dtype, precise):
    """The delta extract factorizes is bit for bit tuned.to(c) − base.to(c) in the compute dtype c, whatever the
    stored dtypes, with blocks (3 rows) that do not divide the rows (10). A float64 base was subtracted in float64
    and only then rounded to float32: another delta than main's. Where either side is stored in float64, c is
    float64 (session 25: its changes below float32's precision were rounding noise)."""
    import loraops.st
    from loraops.extraction import extract
    from loraops.ops import resize

    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 16, generator=g, dtype=torch.float64)
    t = w + 1e-3 * torch.randn(10, 1, generator=g, dtype=torch.float64) * torch.randn(1, 16, generator=g,
                                                                                      dtype=torch.float64)
    w, t = w.to(DTYPES[base_dtype]), t.to(DTYPES[tuned_dtype])
    folders = []
    for side, weight in (("base", w), ("tuned", t)):
        folder = tmp_path / side
        folder.mkdir()
        save_file({NAME: weight}, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
        folders.append(folder)
    seen, factorize = [], resize.factorize_dense
    monkeypatch.setattr(resize, "factorize_dense", lambda D, *a, **k: (seen.append(D.clone()), factorize(D, *a, **k))[1])
    monkeypatch.setattr(loraops.st, "rows_per_block", lambda info: 3)
    extract(*folders, rank=1, precise=precise, keep_rounding=True)
    c = torch.float64 if precise or "fp64" in (base_dtype, tuned_dtype) else torch.float32
    assert len(seen) == 1 and seen[0].dtype == c
    assert torch.equal(seen[0], t.to(c) - w.to(c))


def test_paired_row_blocks_hold_no_block_while_the_next_is_read(tmp_path, monkeypatch):
    """A caller that drops its blocks before asking for the next leaves none alive while the next are read: the
    generator's own names for the last pair kept two blocks more than the caller's (2 × 64 MiB on a 70B's weights)."""
    import weakref

    from loraops import st

    save_file({"a": torch.ones(8, 4), "b": torch.ones(8, 4, dtype=torch.bfloat16)}, str(tmp_path / "m.safetensors"))
    header = st.read_header(tmp_path / "m.safetensors")
    alive: list[weakref.ref] = []
    held = []

    def spy(size):
        held.append(sum(r() is not None for r in alive))
        return bytearray(size)

    monkeypatch.setattr(st, "bytearray", spy, raising=False)
    monkeypatch.setattr(st, "rows_per_block", lambda info: 2)
    blocks = st.read_paired_row_blocks(header.tensors["a"], header.tensors["b"])
    for a, b in blocks:
        alive += [weakref.ref(a), weakref.ref(b)]
        del a, b
    assert len(held) == 8 and held == [0] * 8


def test_a_restore_that_computes_nothing_takes_any_device(tmp_path, monkeypatch):
    """subtract --exact of every merged adapter copies the recorded base: it never used --device, and the early
    device check refused it on a machine without CUDA (the engine still checks a re-merge's)."""
    from click.testing import CliRunner

    from factories import peft_adapter, tiny_llama
    from loraops.cli import main

    base = tiny_llama(tmp_path / "base", dtype=torch.bfloat16)
    adapter = peft_adapter(base, tmp_path / "a", r=2)
    merged = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(base), "-o", str(tmp_path / "m"),
                                       "--device", "cpu"])
    assert merged.exit_code == 0, merged.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    restored = CliRunner().invoke(main, ["subtract", str(adapter), "--from", str(tmp_path / "m"), "-o",
                                         str(tmp_path / "r"), "--exact", "--device", "cuda"])
    assert restored.exit_code == 0 and "bit for bit" in restored.output, restored.output
