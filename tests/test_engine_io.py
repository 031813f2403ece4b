"""Merge output layout (sharding, index, other files, dtype changes, byte-compatible headers) and safety."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import load_model, peft_adapter, tiny_llama
from engine_helpers import torch_threads_everywhere
from loraops import engine, formats
from loraops.adapter import Adapter, LoraModule
from loraops.errors import ConflictError, DiskSpaceError, FormatError, InvalidInputError, MismatchError, NotFoundError
from loraops.fsutil import TMP_MARK


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    base = tiny_llama(root / "base", shard_size="60KB")
    (base / "tokenizer.json").write_text('{"fake": true}')
    return base, peft_adapter(base, root / "adapter", r=4)


def merged(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def nothing_left(output):
    return not output.exists() and not list(output.parent.glob(f"{TMP_MARK}{output.name}*"))


def test_sharded_output_keeps_layout_and_loads_with_transformers(tmp_path, sharded):
    base, adapter_dir = sharded
    adapter = formats.read_adapter(adapter_dir)
    report = engine.merge(base, [(adapter, 1.0)], tmp_path / "out", device="cpu")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    assert len(list(out.glob("*.safetensors"))) > 1
    assert (out / "model.safetensors.index.json").read_bytes() == (base / "model.safetensors.index.json").read_bytes()
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    assert report.tensors_merged == len(adapter.modules) and report.tensors_copied > 0
    model_state = load_model(out).state_dict()
    ours = merged(out)
    for name, tensor in ours.items():
        assert torch.equal(model_state[name], tensor), name
    # untouched tensors are the base's bytes
    base_state = merged(base)
    assert torch.equal(ours["model.norm.weight"], base_state["model.norm.weight"])


def test_no_adapters_gives_byte_identical_files(tmp_path, sharded):
    """The streaming writer's headers are the safetensors library's, byte for byte."""
    base, _ = sharded
    engine.merge(base, [], tmp_path / "copy", device="cpu")
    for f in base.glob("*.safetensors"):
        assert (tmp_path / "copy" / f.name).read_bytes() == f.read_bytes()


def test_direct_io_and_page_cache_writes_give_the_same_files(tmp_path, sharded, monkeypatch):
    base, adapter_dir = sharded
    adapter = formats.read_adapter(adapter_dir)
    direct = engine.merge(base, [(adapter, 0.7)], tmp_path / "direct", device="cpu")
    monkeypatch.setenv("LORAOPS_DIRECT_IO", "0")
    buffered = engine.merge(base, [(adapter, 0.7)], tmp_path / "buffered", device="cpu")
    assert direct.fingerprint == buffered.fingerprint
    for f in (tmp_path / "direct").iterdir():
        assert (tmp_path / "buffered" / f.name).read_bytes() == f.read_bytes(), f.name


def test_dtype_change_updates_index_and_config(tmp_path, sharded):
    base, adapter_dir = sharded
    report = engine.merge(base, [(formats.read_adapter(adapter_dir), 0.5)], tmp_path / "bf16", dtype="bf16", device="cpu")
    out = tmp_path / "bf16"
    assert report.dtype == "bfloat16" and report.tensors_converted > 0
    tensors = merged(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    assert json.loads((out / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    assert load_model(out).dtype == torch.bfloat16


def test_single_file_keeps_integer_tensors_and_replaces_full_tensors(tmp_path):
    base = tmp_path / "m.safetensors"
    torch.manual_seed(0)
    save_file({"lin.weight": torch.randn(6, 4), "head.weight": torch.randn(3, 4), "steps": torch.arange(5)}, str(base))
    module = LoraModule("lin", torch.randn(2, 4), torch.randn(6, 2), alpha=2.0, scale=1.0)
    head = torch.randn(3, 4)
    adapter = Adapter({"lin": module}, "peft", full_tensors={"head.weight": head})
    report = engine.merge(base, [(adapter, 1.0)], tmp_path / "o.safetensors", dtype="fp16", device="cpu")
    out = load_file(tmp_path / "o.safetensors")
    assert out["steps"].dtype == torch.int64 and torch.equal(out["steps"], torch.arange(5))
    assert torch.equal(out["head.weight"], head.half())
    assert report.tensors_replaced == 1 and report.tensors_merged == 1
    with pytest.raises(InvalidInputError, match="modules_to_save.*weight 0.5"):
        engine.merge(base, [(adapter, 0.5)], tmp_path / "w.safetensors", device="cpu")
    # said as a subtract (it said "cannot be applied with weight -1" of `subtract x`), pointing at --exact
    with pytest.raises(InvalidInputError, match=r"modules_to_save\) cannot be subtracted: .*exact=True restores"):
        engine.subtract(base, [(adapter, 1.0)], tmp_path / "s.safetensors", device="cpu")
    assert nothing_left(tmp_path / "w.safetensors") and nothing_left(tmp_path / "s.safetensors")


@pytest.mark.parametrize("how", ["merged", "converted", "replaced"])
def test_a_float16_output_that_overflows_is_refused(how, tmp_path):
    """float16 holds ±65504: a merged, converted or replacing value beyond it would be written as inf (as torch and
    PEFT do), a model that computes inf/NaN; the merge stops instead, with nothing written."""
    base = tmp_path / "m.safetensors"
    weight = torch.full((6, 4), 60000.0 if how == "merged" else 1.0)
    if how == "converted":
        weight[2, 1] = 70000.0
    save_file({"lin.weight": weight}, str(base))
    module = LoraModule("lin", torch.ones(1, 4), torch.full((6, 1), 10000.0), alpha=1.0, scale=1.0)
    adapter = Adapter({"lin": module} if how == "merged" else {}, "peft",
                      full_tensors={"lin.weight": torch.full((6, 4), 1e5)} if how == "replaced" else {})
    with pytest.raises(InvalidInputError, match=r"'lin.weight' comes out with values beyond float16's range "
                                                r"\(±65504\); merge with dtype bf16 or fp32$"):
        engine.merge(base, [(adapter, 1.0)], tmp_path / "o.safetensors", dtype="fp16", device="cpu")
    assert nothing_left(tmp_path / "o.safetensors")
    if how != "replaced":  # (subtract refuses a full tensor); its hint names subtract, which has a --dtype of its own
        with pytest.raises(InvalidInputError, match=r"float16's range \(±65504\); subtract with dtype bf16 or fp32$"):
            engine.subtract(base, [(replace(adapter, modules={n: replace(m, B=-m.B) for n, m in adapter.modules.items()}),
                                    1.0)], tmp_path / "s.safetensors", dtype="fp16", device="cpu")
        assert nothing_left(tmp_path / "s.safetensors")
    engine.merge(base, [(adapter, 1.0)], tmp_path / "b.safetensors", dtype="bf16", device="cpu")  # bf16 holds it
    assert torch.isfinite(load_file(tmp_path / "b.safetensors")["lin.weight"].float()).all()


@pytest.mark.parametrize("dtype, precise", [(None, False), (None, True), ("bf16", False)])
def test_a_float32_or_bfloat16_output_that_overflows_is_refused(dtype, precise, tmp_path):
    """An alpha float32 holds (3.4e38, as `register --alpha` takes it) times factors above 1 merges to values beyond
    float32's range: they were written as inf with exit 0 (only float16 outputs were checked), a model that computes
    inf/NaN. The merge stops instead, with nothing written, as for float16."""
    base = tmp_path / "m.safetensors"
    save_file({"lin.weight": torch.ones(6, 4)}, str(base))
    module = LoraModule("lin", torch.full((1, 4), 10.0), torch.full((6, 1), 10.0), alpha=3.4e38, scale=3.4e38)
    with pytest.raises(InvalidInputError, match=r"'lin.weight' comes out with values beyond (float32|bfloat16)'s range"):
        engine.merge(base, [(Adapter({"lin": module}, "peft"), 1.0)], tmp_path / "o.safetensors", dtype=dtype,
                     precise=precise, device="cpu")
    assert nothing_left(tmp_path / "o.safetensors")


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_deltas_that_overflow_and_cancel_are_refused(dtype, tmp_path):
    """Finite float32 factors whose products go beyond float32 (1e20 · 1e20) and cancel in the matmul's sum: inf −
    inf is NaN, not inf, so the scan for inf let it through and the merged weight was written as NaN with exit 0.
    Refused; --precise (float64) holds the products."""
    base = tmp_path / "m.safetensors"
    save_file({"lin.weight": torch.ones(6, 4)}, str(base))
    module = LoraModule("lin", torch.full((2, 4), 1e20), torch.tensor([[1e20, -1e20]] * 6), alpha=1.0, scale=1.0)
    adapter = Adapter({"lin": module}, "peft")
    with pytest.raises(InvalidInputError, match=r"'lin.weight' comes out with inf or NaN values that the exact merge "
                                               r"does not make: its deltas go beyond what "
                                               r"float32 holds as they are merged .*; precise=True computes "
                                               r"in float64$"):
        engine.merge(base, [(adapter, 1.0)], tmp_path / "o.safetensors", dtype=dtype, device="cpu")
    assert nothing_left(tmp_path / "o.safetensors")
    engine.merge(base, [(adapter, 1.0)], tmp_path / "p.safetensors", dtype=dtype, precise=True, device="cpu")
    assert torch.isfinite(load_file(tmp_path / "p.safetensors")["lin.weight"].float()).all()
    huge = LoraModule("lin", torch.full((2, 4), 1e200, dtype=torch.float64),
                      torch.tensor([[1e200, -1e200]] * 6, dtype=torch.float64), alpha=1.0, scale=1.0)
    with pytest.raises(InvalidInputError, match=r"beyond what float64 holds as they are merged; the adapters' "
                                               r"weights × scales are too large$"):  # (no --precise hint: it is on)
        engine.merge(base, [(Adapter({"lin": huge}, "peft"), 1.0)], tmp_path / "q.safetensors", dtype=dtype,
                     precise=True, device="cpu")
    assert nothing_left(tmp_path / "q.safetensors")


@pytest.mark.parametrize("kernel", ["unfused", "fused"])
def test_deltas_beyond_float32_are_told_alike_whatever_the_kernel_makes_of_them(kernel, monkeypatch, tmp_path):
    """1e40 − 1e40 in float32 is NaN in a kernel that rounds each product (inf − inf), and inf in one that fuses the
    multiply-add (AVX-512: the second product added unrounded to inf), so the merge refused as 'deltas that cancel'
    on one machine was refused as 'beyond float32's range' on the other, where --precise mends it. The float64 merge
    of the chunk tells: one message, with --precise's hint; the output alone cannot."""
    base = tmp_path / "m.safetensors"
    save_file({"lin.weight": torch.ones(6, 4)}, str(base))
    module = LoraModule("lin", torch.full((2, 4), 1e20), torch.tensor([[1e20, -1e20]] * 6), alpha=1.0, scale=1.0)
    real = engine.add_delta

    def as_the_kernel_makes_it(acc2, *args):
        real(acc2, *args)
        if acc2.dtype == torch.float32:  # (the float64 merge is exact here)
            made = acc2.isnan() if kernel == "fused" else acc2.isinf()
            acc2.masked_fill_(made, INF if kernel == "fused" else NAN)

    monkeypatch.setattr(engine, "add_delta", as_the_kernel_makes_it)
    with pytest.raises(InvalidInputError, match=r"^'lin.weight' comes out with inf or NaN values that the exact merge "
                                               r"does not make: its deltas go beyond what float32 holds as they are "
                                               r"merged \(products or sums past ±3.40282e\+38\); precise=True computes "
                                               r"in float64$"):
        engine.merge(base, [(Adapter({"lin": module}, "peft"), 1.0)], tmp_path / "o.safetensors", device="cpu")
    assert nothing_left(tmp_path / "o.safetensors")


def nan_of_base_at_1_2(w, kind):
    """Where a merge is NaN for a base NaN at [1, 2]: there, or its whole channel for DoRA, whose norm is NaN there
    (a row; a transposed module's column)."""
    nan = torch.zeros_like(w, dtype=torch.bool)
    if kind == "dora":
        nan[1, :] = True
    elif kind == "dora-transposed":
        nan[:, 2] = True
    else:
        nan[1, 2] = True
    return nan


@pytest.mark.parametrize("kind", ["lora-to-bf16", "loha", "dora", "dora-transposed"])
def test_a_nan_the_base_holds_stays_nan_where_deltas_may_overflow(kind, tmp_path):
    """A NaN in the base stays NaN, unsaid (README; PEFT's merge), also on the tensors whose outputs are scanned
    (a float32 base going out as bf16, LoHa/LoKr, DoRA): numerics8's NaN scan refused them, saying the adapters'
    deltas cancelled as inf − inf and that --precise would help, neither true. The NaNs are the base's (the whole
    output channel for DoRA, whose norm is NaN there, as PEFT's m/‖W + ΔW‖); the rest is merged."""
    from loraops.formats.lycoris import Product

    transposed = kind == "dora-transposed"
    w = torch.ones(3, 4) if transposed else torch.ones(4, 3)
    w[1, 2] = float("nan")
    base = tmp_path / "m.safetensors"
    save_file({"lin.weight": w}, str(base))
    B, A = torch.full((4, 1), 0.5), torch.full((1, 3), 0.5)
    product = Product("loha", {"w1a": B, "w1b": A, "w2a": B, "w2b": A}, 1) if kind == "loha" else None
    module = LoraModule("lin", A, B, alpha=1.0, scale=1.0, product=product, fan_in_fan_out=transposed,
                        magnitude=torch.full((4,), 2.0) if kind.startswith("dora") else None)
    engine.merge(base, [(Adapter({"lin": module}, "peft"), 1.0)], tmp_path / "o.safetensors", device="cpu",
                 dtype="bf16" if kind == "lora-to-bf16" else None)
    merged = load_file(tmp_path / "o.safetensors")["lin.weight"].float()
    nan = nan_of_base_at_1_2(w, kind)
    assert torch.equal(torch.isnan(merged), nan)
    expected = {"lora-to-bf16": 1.25, "loha": 1.0625, "dora": 2 / 3**0.5, "dora-transposed": 2 / 3**0.5}[kind]
    assert torch.allclose(merged[~nan], torch.full_like(merged[~nan], expected), rtol=1e-2)


@pytest.mark.parametrize("rows_per_chunk", [None, 1])
@pytest.mark.parametrize("kind", ["lora", "dora", "dora-transposed"])
def test_deltas_that_cancel_beside_a_nan_of_the_base_are_refused(kind, rows_per_chunk, monkeypatch, tmp_path):
    """A base NaN in one output channel and deltas that cancel as inf − inf in another: the check asked whether the
    base held any NaN, so the deltas' NaN went out with it, unsaid. Refused; the base's NaN alone still passes, and
    --precise (float64) holds the products: only the base's channel is NaN then (also a row at a time: each chunk's
    NaNs are compared with the base's in its own rows)."""
    if rows_per_chunk:
        monkeypatch.setattr(engine, "CHUNK_ELEMENTS", rows_per_chunk * (4 if kind == "dora-transposed" else 3))
    transposed = kind == "dora-transposed"
    w = torch.ones(3, 4) if transposed else torch.ones(4, 3)
    w[1, 2] = float("nan")
    base = tmp_path / "m.safetensors"
    save_file({"lin.weight": w}, str(base))
    B = torch.zeros(4, 2)
    B[3] = torch.tensor([1e20, -1e20])  # output channel 3: 1e40 − 1e40, inf − inf in float32
    module = LoraModule("lin", torch.full((2, 3), 1e20), B, alpha=1.0, scale=1.0, fan_in_fan_out=transposed,
                        magnitude=torch.full((4,), 2.0) if kind.startswith("dora") else None)
    adapter = Adapter({"lin": module}, "peft")
    with pytest.raises(InvalidInputError, match=r"'lin.weight' comes out with inf or NaN values that the exact merge "
                                               r"does not make: its deltas go beyond what "
                                               r"float32 holds as they are merged"):
        engine.merge(base, [(adapter, 1.0)], tmp_path / "o.safetensors", device="cpu")
    assert nothing_left(tmp_path / "o.safetensors")
    engine.merge(base, [(adapter, 1.0)], tmp_path / "p.safetensors", precise=True, device="cpu")
    assert torch.equal(torch.isnan(load_file(tmp_path / "p.safetensors")["lin.weight"]), nan_of_base_at_1_2(w, kind))


def test_a_base_nan_in_a_transposed_dora_channel_is_read_once(monkeypatch, tmp_path):
    """A base NaN in a transposed DoRA module's channel (a column) makes that column NaN in every chunk: the base's
    columns were read again, whole, for each of them (a vocabulary's embedding read once per chunk: quadratic).
    Read once per tensor; the output holds the base's column as NaN, nothing else."""
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 4)  # a row per chunk
    w = torch.ones(16, 4)
    w[1, 2] = float("nan")
    save_file({"lin.weight": w}, str(tmp_path / "m.safetensors"))
    module = LoraModule("lin", torch.full((2, 16), 0.01), torch.full((4, 2), 0.01), alpha=1.0, scale=1.0,
                        fan_in_fan_out=True, magnitude=torch.full((4,), 2.0))
    rows_read = []
    base_rows, row_blocks = engine._base_rows, engine.read_row_blocks
    monkeypatch.setattr(engine, "_base_rows", lambda t, row0, row1: (rows_read.append(row1 - row0),
                                                                     base_rows(t, row0, row1))[1])
    monkeypatch.setattr(engine, "read_row_blocks", lambda info: ((rows_read.append(b[1] - b[0]), b)[1]
                                                                 for b in row_blocks(info)))
    engine.merge(tmp_path / "m.safetensors", [(Adapter({"lin": module}, "peft"), 1.0)], tmp_path / "o.safetensors",
                 device="cpu")
    nan = torch.zeros_like(w, dtype=torch.bool)
    nan[:, 2] = True
    assert torch.equal(torch.isnan(load_file(tmp_path / "o.safetensors")["lin.weight"]), nan)
    assert sum(rows_read) <= 3 * 16  # the norms' pass, each chunk's own rows, the NaN columns' pass


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("kind, dtype, stored", [
    ("lora", None, torch.float16), ("lora", "bf16", torch.float32), ("lora", None, torch.bfloat16),
    ("loha", None, torch.bfloat16), ("lora", "fp16", torch.float32), ("converted", "fp16", torch.float32)])
def test_an_inf_the_base_holds_stays_inf(kind, dtype, stored, tmp_path):
    """A ±inf in the base stays ±inf (W + Δ with Δ finite, as in PEFT's merge and in float64), as a NaN of the base
    does: it was refused as values beyond the output's range, blamed on the adapters ("merge with --dtype bf16" or
    "the adapters' weights × scales are too large"), wherever the output is scanned (a float16 output, a float32 base
    going out as bf16 or fp16, LoHa/LoKr; a float32 base converted to fp16 by --dtype, no adapter on it)."""
    from loraops.formats.lycoris import Product

    w = torch.ones(4, 3)
    w[1, 2], w[3, 0] = INF, -INF
    base = tmp_path / "m.safetensors"
    state = {"lin.weight": w.to(stored)}
    if kind == "converted":
        state["other.weight"] = torch.ones(4, 3, dtype=stored)
    save_file(state, str(base))
    B, A = torch.full((4, 1), 0.5), torch.full((1, 3), 0.5)
    product = Product("loha", {"w1a": B, "w1b": A, "w2a": B, "w2b": A}, 1) if kind == "loha" else None
    module = LoraModule("other" if kind == "converted" else "lin", A, B, alpha=1.0, scale=1.0, product=product)
    engine.merge(base, [(Adapter({module.name: module}, "peft"), 1.0)], tmp_path / "o.safetensors", dtype=dtype,
                 device="cpu")
    merged = load_file(tmp_path / "o.safetensors")["lin.weight"].double()
    exact = w.double() if kind == "converted" else w.double() + module.delta(dtype=torch.float64)
    finite = torch.isfinite(exact)
    assert torch.equal(merged[~finite], exact[~finite])
    assert torch.allclose(merged[finite], exact[finite], rtol=1e-2)


@pytest.mark.parametrize("dtype, stored", [(None, torch.float16), ("bf16", torch.float32)])
def test_an_overflow_beside_an_inf_of_the_base_is_refused(dtype, stored, tmp_path):
    """The base's inf passes; a finite base value the deltas carry past the output's range beside it is still
    refused, with the range message."""
    w = torch.ones(4, 3)
    w[1, 2] = INF
    big = 60000.0 if stored == torch.float16 else 3e38
    w[3, 0] = big
    base = tmp_path / "m.safetensors"
    save_file({"lin.weight": w.to(stored)}, str(base))
    B = torch.zeros(4, 1)
    B[3] = big / 2
    module = LoraModule("lin", torch.ones(1, 3), B, alpha=1.0, scale=1.0)
    out_dtype = "float16" if stored == torch.float16 else "bfloat16"
    with pytest.raises(InvalidInputError, match=rf"'lin.weight' comes out with values beyond {out_dtype}'s range"):
        engine.merge(base, [(Adapter({"lin": module}, "peft"), 1.0)], tmp_path / "o.safetensors", dtype=dtype,
                     device="cpu")
    assert nothing_left(tmp_path / "o.safetensors")


@pytest.mark.parametrize("kind, dtype", [("converted", "fp16"), ("lora", "fp16"), ("lora", "bf16"), ("lora", "fp32")])
def test_a_float64_value_beyond_the_outputs_range_is_not_an_inf_of_the_base(kind, dtype, tmp_path):
    """A float64 base's 1e300 comes out inf in a narrower dtype: an overflow the merge makes, refused. The base's
    non-finite values were read as float32, where 1e300 is inf too, and the merge wrote inf with exit 0."""
    w = torch.ones(4, 3, dtype=torch.float64)
    w[1, 2] = 1e300
    base = tmp_path / "m.safetensors"
    save_file({"lin.weight": w, "other.weight": torch.ones(4, 3, dtype=torch.float64)}, str(base))
    module = LoraModule("other" if kind == "converted" else "lin", torch.full((1, 3), 0.5), torch.full((4, 1), 0.5),
                        alpha=1.0, scale=1.0)
    out_dtype = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype]
    with pytest.raises(InvalidInputError, match=rf"'lin.weight' comes out with values beyond {out_dtype}'s range"):
        engine.merge(base, [(Adapter({module.name: module}, "peft"), 1.0)], tmp_path / "o.safetensors", dtype=dtype,
                     device="cpu")
    assert nothing_left(tmp_path / "o.safetensors")


@pytest.mark.parametrize("stored, value, dtype", [(torch.float64, 1e300, "fp32"), (torch.float64, 1e300, "bf16"),
                                                   (torch.float32, 3.4e38, "bf16")])
def test_a_conversion_alone_beyond_the_outputs_range_is_refused(stored, value, dtype, tmp_path):
    """A tensor --dtype only converts (no adapter on it) was scanned only going out as float16: a float64 1e300 as
    fp32 or bf16, or float32's top 0.4 % as bf16 (beyond bfloat16's max 3.3895e38), came out inf with exit 0."""
    w = torch.ones(4, 3, dtype=stored)
    w[1, 2] = value
    base = tmp_path / "m.safetensors"
    save_file({"lin.weight": w, "other.weight": torch.ones(4, 3, dtype=stored)}, str(base))
    module = LoraModule("other", torch.full((1, 3), 0.5), torch.full((4, 1), 0.5), alpha=1.0, scale=1.0)
    out_dtype = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    with pytest.raises(InvalidInputError, match=rf"'lin.weight' comes out with values beyond {out_dtype}'s range "
                                                r"\(±[0-9.e+]+\); it holds values .* cannot; keep a wider dtype"):
        engine.merge(base, [(Adapter({module.name: module}, "peft"), 1.0)], tmp_path / "o.safetensors", dtype=dtype,
                     device="cpu")
    assert nothing_left(tmp_path / "o.safetensors")


def test_deltas_beyond_float32_on_an_inf_of_the_base_are_refused(tmp_path):
    """W = inf and a delta of −1e40 there, which float32 makes −inf: inf − inf is NaN where float64 keeps inf. Refused
    as deltas beyond float32; --precise (float64) holds the delta, and the output keeps the base's inf. A kernel with
    fused multiply-adds (AVX-512) adds the product to inf unrounded, inf as float64's: that merge passes, with the
    base's inf."""
    w = torch.ones(4, 3)
    w[1, 2] = INF
    base = tmp_path / "m.safetensors"
    save_file({"lin.weight": w}, str(base))
    A, B = torch.tensor([[0.0, 0.0, 1e20]]), torch.zeros(4, 1)
    B[1] = -1e20
    adapter = Adapter({"lin": LoraModule("lin", A, B, alpha=1.0, scale=1.0)}, "peft")
    unfused = bool(torch.isnan(torch.full((1, 3), INF).addmm_(B[1:2], A)).any())
    with pytest.raises(InvalidInputError, match=r"'lin.weight' comes out with inf or NaN values that the exact merge "
                                               r"does not make: its deltas go beyond what "
                                               r"float32 holds") if unfused else contextlib.nullcontext():
        engine.merge(base, [(adapter, 1.0)], tmp_path / "o.safetensors", device="cpu")
    if unfused:
        assert nothing_left(tmp_path / "o.safetensors")
    else:
        assert torch.equal(load_file(tmp_path / "o.safetensors")["lin.weight"], w)
    engine.merge(base, [(adapter, 1.0)], tmp_path / "p.safetensors", precise=True, device="cpu")
    assert torch.equal(load_file(tmp_path / "p.safetensors")["lin.weight"], w)


def test_a_scanned_output_that_is_finite_costs_one_reduction(monkeypatch, tmp_path):
    """The scan of a tensor whose deltas may overflow (a float32 base going out as bf16: every tensor) is one
    aminmax, which NaN and ±inf both reach: isfinite().all() (numerics8) or isinf().any() write a bool per value and
    took 10-20× longer on CPU. The elementwise tests run only once a value is not finite."""
    base = tmp_path / "m.safetensors"
    save_file({"lin.weight": torch.ones(6, 4)}, str(base))
    module = LoraModule("lin", torch.full((2, 4), 0.5), torch.full((6, 2), 0.5), alpha=1.0, scale=1.0)

    def elementwise(*args, **kwargs):
        raise AssertionError("an elementwise scan of a finite output")

    monkeypatch.setattr(torch, "isfinite", elementwise)
    monkeypatch.setattr(torch, "isinf", elementwise)
    engine.merge(base, [(Adapter({"lin": module}, "peft"), 1.0)], tmp_path / "o.safetensors", dtype="bf16",
                 device="cpu")
    monkeypatch.undo()
    assert torch.equal(load_file(tmp_path / "o.safetensors")["lin.weight"].float(), torch.full((6, 4), 1.5))


@pytest.mark.parametrize("dtype, top_exponent", [(torch.float32, 127 - 23), (torch.bfloat16, 127 - 7)])
def test_the_overflow_scan_is_skipped_only_where_no_delta_can_overflow(dtype, top_exponent, tmp_path):
    """The scan for inf runs only where the deltas' bound (Σ|wᵢsᵢ|·max‖Bᵢ‖·max‖Aⱼ‖) reaches a quarter of the dtype's
    last step below its max (a scan of every merged byte made a bfloat16 merge 1.5× slower): at the top of the
    range, a delta of a quarter step rounds to the max, and one of a whole step overflows and is refused. Rank 1,
    so the bound is the delta itself."""
    base = tmp_path / "m.safetensors"
    save_file({"lin.weight": torch.full((6, 4), torch.finfo(dtype).max, dtype=dtype)}, str(base))

    def lora(exponent):
        half = 2.0 ** (exponent / 2)
        return Adapter({"lin": LoraModule("lin", torch.full((1, 4), half), torch.full((6, 1), half), alpha=1.0,
                                          scale=1.0)}, "peft")

    engine.merge(base, [(lora(top_exponent - 2), 1.0)], tmp_path / "o.safetensors", device="cpu")
    assert torch.equal(load_file(tmp_path / "o.safetensors")["lin.weight"], torch.full((6, 4), torch.finfo(dtype).max,
                                                                                        dtype=dtype))
    with pytest.raises(InvalidInputError, match="comes out with values beyond"):
        engine.merge(base, [(lora(top_exponent), 1.0)], tmp_path / "x.safetensors", device="cpu")
    assert nothing_left(tmp_path / "x.safetensors")


@pytest.mark.parametrize("base_dtype, dtype, precise, a, b", [
    # bf16 out of a float32 sum: max + (2¹¹⁹ − 2¹⁰⁰) rounds in float32 to max + 2¹¹⁹, which bf16 rounds (a tie, to even) to inf
    (torch.bfloat16, None, False, 2.0 ** 60, 2.0 ** 59 - 2.0 ** 40),
    # float32 out of a float64 sum (--precise): max + (2¹⁰³ − 2⁷³) rounds in float64 to max + 2¹⁰³, a tie again
    (torch.float32, None, True, 32767 * 2.0 ** 36, 32769 * 2.0 ** 37),
    # a float32 weight beyond bf16's range merged with --dtype bf16: a tiny delta, the weight itself overflows
    (torch.float32, "bf16", False, 1.0, 1.0),
])
def test_the_overflow_scan_is_not_skipped_where_rounding_or_the_base_can_overflow(base_dtype, dtype, precise, a, b,
                                                                                  tmp_path):
    """Where the inf scan is skipped (the deltas' bound below half the output's last step below its max), nothing may
    overflow: a delta just below that half step still overflowed when the sum was rounded twice (float32, then bf16;
    float64 with --precise, then float32), and a weight of the base's dtype need not fit the output's (--dtype). Each
    was written as inf with exit 0."""
    base = tmp_path / "m.safetensors"
    save_file({"lin.weight": torch.full((6, 4), torch.finfo(base_dtype).max, dtype=base_dtype)}, str(base))
    module = LoraModule("lin", torch.full((1, 4), a), torch.full((6, 1), b), alpha=1.0, scale=1.0)
    with pytest.raises(InvalidInputError, match="comes out with values beyond"):
        engine.merge(base, [(Adapter({"lin": module}, "peft"), 1.0)], tmp_path / "o.safetensors", dtype=dtype,
                     precise=precise, device="cpu")
    assert nothing_left(tmp_path / "o.safetensors")


def test_existing_output_is_refused_unless_force(tmp_path, sharded):
    base, _ = sharded
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ConflictError, match="already exists.*--force"):
        engine.merge(base, [], out, device="cpu")
    assert (out / "keep").exists()
    engine.merge(base, [], out, device="cpu", force=True)
    assert not (out / "keep").exists() and (out / "config.json").exists()


def test_not_enough_disk_is_refused_up_front(tmp_path, sharded, monkeypatch):
    base, _ = sharded
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    # (in the unit that fits: a small need was "0.00 GiB needed, 0.00 GiB free")
    with pytest.raises(DiskSpaceError, match=r"not enough free disk for .* \(\d+\.\d\d KiB needed, 1000 B free\)$"):
        engine.merge(base, [], tmp_path / "out", device="cpu")
    assert nothing_left(tmp_path / "out")


def test_mismatched_adapter_is_refused_before_writing(tmp_path, sharded):
    base, _ = sharded
    bad = LoraModule("model.layers.0.self_attn.q_proj", torch.randn(2, 32), torch.randn(64, 2), alpha=2, scale=1)
    with pytest.raises(MismatchError, match="q_proj") as err:
        engine.merge(base, [(Adapter({bad.name: bad}, "peft"), 1.0)], tmp_path / "out", device="cpu")
    assert "\n" not in str(err.value)
    assert nothing_left(tmp_path / "out")


def test_missing_and_corrupt_shards(tmp_path, sharded):
    base, _ = sharded
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    shard = sorted(copy.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match=f"{shard.name}.*truncated"):
        engine.merge(copy, [], tmp_path / "out", device="cpu")
    shard.unlink()
    with pytest.raises(NotFoundError, match=f"{shard.name}.*missing"):
        engine.merge(copy, [], tmp_path / "out", device="cpu")
    assert nothing_left(tmp_path / "out")


def test_a_shard_truncated_while_merging(tmp_path, sharded, monkeypatch):
    """Headers checked, then a shard shrinks under the merge (another process rewriting the base): the one-line
    error names the tensor, and nothing is left."""
    from loraops import fsutil

    base, _ = sharded
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    real_copy_from = fsutil.DirectFileWriter.copy_from

    def shrinking(self, fd, offset, nbytes, *args, **kwargs):
        os.truncate(os.readlink(f"/proc/self/fd/{fd}"), offset + nbytes // 2)
        return real_copy_from(self, fd, offset, nbytes, *args, **kwargs)

    monkeypatch.setattr(fsutil.DirectFileWriter, "copy_from", shrinking)
    with pytest.raises(FormatError, match="truncated while reading tensor"):
        engine.merge(copy, [], tmp_path / "out", device="cpu")
    assert nothing_left(tmp_path / "out")


def test_a_failure_midway_removes_the_temp_output(tmp_path, sharded, monkeypatch):
    base, adapter_dir = sharded
    calls, original = [], engine._Pipeline._compute_chunk

    def boom(self, chunk):
        calls.append(chunk)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        original(self, chunk)

    monkeypatch.setattr(engine._Pipeline, "_compute_chunk", boom)
    with pytest.raises(DiskSpaceError, match="disk full"):
        engine.merge(base, [(formats.read_adapter(adapter_dir), 1.0)], tmp_path / "out", device="cpu")
    assert nothing_left(tmp_path / "out")



def test_merges_in_two_threads_at_once_leave_the_torch_thread_count_as_it_was(tmp_path, sharded, monkeypatch):
    """Each merge lowered torch's thread count for its compute stage and restored the count it had found: the second
    of two overlapping merges found the first's lowered count and restored that, so the process kept 1 thread."""
    base, adapter_dir = sharded
    adapter = formats.read_adapter(adapter_dir)
    monkeypatch.setattr(engine, "compute_threads", lambda other_stages, default: 1)
    first_in, second_in, first_done = threading.Event(), threading.Event(), threading.Event()
    original = engine._Pipeline._compute

    def ordered(self):  # the first merge lowers the count, the second starts, the first ends, then the second
        if threading.current_thread().name == "first":
            first_in.set()
            assert second_in.wait(60)
        else:
            second_in.set()
            assert first_done.wait(60)
        original(self)

    monkeypatch.setattr(engine._Pipeline, "_compute", ordered)
    failures = []

    def merge(name: str, done: threading.Event) -> None:
        try:
            engine.merge(base, [(adapter, 1.0)], tmp_path / name, device="cpu")
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = threading.Thread(target=merge, args=("first", first_done), name="first")
        first.start()
        assert first_in.wait(60)
        second = threading.Thread(target=merge, args=("second", threading.Event()), name="second")
        second.start()
        first.join()
        second.join()
        assert not failures
        assert torch_threads_everywhere() == (2, 2)
    finally:
        torch.set_num_threads(before)


def test_a_stage_thread_that_cannot_start_stops_the_ones_that_did(tmp_path, sharded, monkeypatch):
    """When the writer's thread could not start (RuntimeError: can't start new thread), the reader already started
    was neither aborted nor joined: it kept running after merge raised, holding the base open, and the torch thread
    count stayed lowered."""
    base, adapter_dir = sharded
    started, real_start = [], threading.Thread.start

    def second_fails(self):
        if self.name in ("loraops-read", "loraops-write", "loraops-hash"):  # the pipeline's stages
            started.append(self)
            if len(started) == 2:
                raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", second_fails)
    threads = torch_threads_everywhere()
    with pytest.raises(RuntimeError, match="can't start new thread"):
        engine.merge(base, [(formats.read_adapter(adapter_dir), 1.0)], tmp_path / "out", device="cpu")
    monkeypatch.undo()
    assert [t.name for t in started] == ["loraops-read", "loraops-write"]
    assert not started[0].is_alive()
    assert nothing_left(tmp_path / "out")
    assert torch_threads_everywhere() == threads


KILLED_RUN = """
import sys, time
from loraops import engine, merging
original = engine._Pipeline._compute_chunk
def slow(self, chunk):
    original(self, chunk)
    open(sys.argv[4], "w").close()
    time.sleep(60)
engine._Pipeline._compute_chunk = slow
merging.merge(sys.argv[1], [sys.argv[2]], sys.argv[3], device="cpu")
"""


def test_sigkill_midway_leaves_no_output_and_no_registry_row(tmp_path, sharded):
    from loraops.registry import Registry

    base, adapter_dir = sharded
    out, marker = tmp_path / "out", tmp_path / "started"
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(base), str(adapter_dir), str(out), str(marker)],
                             env=os.environ.copy())
    deadline = time.time() + 60
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the child never reached the pipeline"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not out.exists()
    leftovers = list(tmp_path.glob(f"{TMP_MARK}out.*"))
    assert len(leftovers) == 1  # only the temp sibling; the next run to this output removes it once idle
    with Registry.open() as reg:
        assert not [b for b in reg.list_bases() if b.path and b.path.endswith("/out")]
    old = time.time() - 3600
    for p in [leftovers[0], *leftovers[0].rglob("*")]:
        os.utime(p, (old, old))
    engine.merge(base, [], out, device="cpu")
    assert out.exists() and not list(tmp_path.glob(f"{TMP_MARK}out.*"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_merge_matches_cpu(tmp_path, sharded):
    base, adapter_dir = sharded
    adapter = formats.read_adapter(adapter_dir)
    engine.merge(base, [(adapter, 0.7)], tmp_path / "cpu", device="cpu", dtype="bf16")
    report = engine.merge(base, [(adapter, 0.7)], tmp_path / "gpu", device="cuda", dtype="bf16")
    assert report.device.startswith("cuda")
    cpu, gpu = merged(tmp_path / "cpu"), merged(tmp_path / "gpu")
    for name in cpu:
        # float32 matmuls on the GPU may round differently: at most one unit of bf16
        diff = (cpu[name].float() - gpu[name].float()).abs()
        assert bool((diff <= cpu[name].float().abs() * 2**-7 + 1e-30).all()), name


def test_every_byte_the_merge_reads_was_asked_for_ahead(tmp_path, sharded, monkeypatch):
    """The reader (merged tensors) and the writer (raw copies) keep the kernel reading ahead of them: the
    WILLNEED ranges cover every tensor byte of every shard, each asked for before it was read."""
    base, adapter_dir = sharded
    shards = {os.stat(f).st_ino: f for f in base.glob("*.safetensors")}
    asked = {ino: [] for ino in shards}
    uncovered_reads = []
    fadvise, preadv = os.posix_fadvise, os.preadv

    def record_fadvise(fd, offset, length, advice):
        ino = os.fstat(fd).st_ino
        if advice == os.POSIX_FADV_WILLNEED and ino in asked:
            asked[ino].append((offset, offset + length))
        return fadvise(fd, offset, length, advice)

    def check_preadv(fd, buffers, offset):
        ino = os.fstat(fd).st_ino
        if ino in asked and not any(lo <= offset < hi for lo, hi in asked[ino]):
            uncovered_reads.append((shards[ino].name, offset))
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "posix_fadvise", record_fadvise)
    monkeypatch.setattr(os, "preadv", check_preadv)
    engine.merge(base, [(formats.read_adapter(adapter_dir), 1.0)], tmp_path / "out", device="cpu")
    assert uncovered_reads == []
    from loraops.st import read_header

    for ino, shard in shards.items():
        start, size = read_header(shard).data_offset, shard.stat().st_size
        covered = sorted(asked[ino])
        reach = start
        for lo, hi in covered:
            if lo <= reach:
                reach = max(reach, hi)
        assert reach >= size, f"{shard.name}: asked for up to {reach} of {size}"


@pytest.mark.parametrize("dtype", [None, "fp32"])
def test_a_subtract_reports_its_residual_beside_a_base_inf_or_nan(dtype, tmp_path):
    """A subtract's residual is a max over each chunk: a base inf or NaN made that max NaN (inf − inf), which
    Python's max() then dropped, so the chunk's rounding and its difference from the pristine base went unreported
    (0.0: "bit-exact"-looking numbers for a round trip that rounded). The non-finite values the base holds and the
    output keeps count as equal; the rest is reported. Compared by value (--dtype), a NaN kept counted as differing."""
    torch.manual_seed(0)
    w = torch.randn(8, 16).to(torch.bfloat16)
    w[1, 2], w[3, 4], w[5, 6] = INF, -INF, float("nan")
    save_file({"lin.weight": w}, str(tmp_path / "base.safetensors"))
    adapter = Adapter({"lin": LoraModule("lin", torch.randn(2, 16), torch.randn(8, 2), alpha=1.0, scale=0.3)}, "peft")
    engine.merge(tmp_path / "base.safetensors", [(adapter, 1.0)], tmp_path / "m.safetensors", device="cpu")
    residual = engine.subtract(tmp_path / "m.safetensors", [(adapter, 1.0)], tmp_path / "s.safetensors", dtype=dtype,
                               device="cpu", reference=tmp_path / "base.safetensors").residual
    back, merged = load_file(tmp_path / "s.safetensors")["lin.weight"], load_file(tmp_path / "m.safetensors")["lin.weight"]
    finite = torch.isfinite(w)
    assert torch.equal(back[~finite].isnan(), w[~finite].isnan()) and torch.equal(back[w.isinf()], w[w.isinf()])
    assert residual.max_abs_diff == float((back.double() - w.double())[finite].abs().max()) > 0
    if dtype == "fp32":  # no rounding after the float32 sum; compared by value
        assert residual.rounding_max_abs == 0.0
        assert residual.elements_differing == int((back.double() != w.double())[finite].sum())
        return
    exact = merged.double() - adapter.modules["lin"].delta(dtype=torch.float64)
    rounding = float((back.double() - exact)[finite].abs().max())
    assert rounding > 0 and residual.rounding_max_abs == pytest.approx(rounding, rel=0.05)
    assert residual.elements_differing == int((back.view(torch.int16) != w.view(torch.int16)).sum())  # NaNs by bits


def test_the_base_blocks_of_fused_experts_are_their_rows(tmp_path, monkeypatch):
    """_base_blocks (the pass a transposed DoRA module's column norms and the NaN columns are taken over) viewed each
    block read by the stored tensor's first dimension as that many rows: fused experts E×X×Y are E·X rows of Y, and
    the view of an expert's X·Y values as one row failed. Each block is its rows, numbered as the chunks number them."""
    from loraops.st import read_header

    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 3 * 5)  # 3 rows a block: blocks straddle the experts
    experts = torch.arange(3 * 4 * 5, dtype=torch.float32).view(3, 4, 5)
    save_file({"experts.weight": experts}, str(tmp_path / "m.safetensors"))
    info = read_header(tmp_path / "m.safetensors").tensors["experts.weight"]
    module = LoraModule("experts.0", torch.ones(1, 5), torch.ones(4, 1), alpha=1.0, scale=1.0,
                        fused=("experts.weight", 0, 4, 12))
    tensor = engine._Tensor("experts.weight", info, "F32", terms=[(module, 1.0)])
    blocks = list(engine._base_blocks(tensor))
    assert [row0 for row0, _ in blocks] == list(range(0, 12, 3))
    assert torch.equal(torch.cat([block for _, block in blocks]), experts.view(12, 5))
