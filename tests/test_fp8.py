"""Merging into fine-grained FP8 checkpoints (transformers' quant_method "fp8", DeepSeek-V3's layout): against
transformers' own quantizer and dequantization, float64 references and PEFT; chunking, untouched bytes, --dtype,
subtract, and one-line errors for broken or other quantized layouts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from engine_helpers import dora_reference64, reference64
from factories import (fp8_dequantize, fp8_model, fp8_quantize, load_model, peft_adapter, perturb_magnitudes,
                       tiny_llama, tiny_transformers)
from loraops import engine, formats
from loraops.basemodel import BaseModel, fingerprint_of
from loraops.cli import main
from loraops.fp8 import BlockScaled
from loraops.errors import FormatError, InvalidInputError
from loraops.st import TensorInfo, read_header
from test_engine import unit_of_rounding

BLOCK = (16, 24)  # partial blocks: 64 columns, and the 72 rows of gate/up
TOUCHED = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    base = tiny_llama(root / "bf16", dtype=torch.bfloat16, intermediate=72)
    fp8 = fp8_model(base, root / "fp8", block=BLOCK)
    adapter = peft_adapter(base, root / "lora", r=4, target_modules=TOUCHED)
    q_only = peft_adapter(base, root / "q-lora", r=2, target_modules=["q_proj"])
    return SimpleNamespace(root=root, base=base, fp8=fp8, adapter=adapter, q_only=q_only)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def merged_three_ways(tmp_path: Path, adapter, block) -> tuple[dict, dict, dict]:
    """``adapter`` merged into tmp_path/decoded (the reference) and into tmp_path/fp8, once its config says it is
    block-quantized by ``block``: dequantized (--dtype fp32) and kept FP8. Their tensors, in that order."""
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block)}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    for source, out, dtype in (("decoded", "reference", None), ("fp8", "fp32", "fp32"), ("fp8", "kept", None)):
        engine.merge(tmp_path / source, [(adapter, 1.0)], tmp_path / out, dtype=dtype, device="cpu", fingerprint=False)
    return tuple(tensors(tmp_path / out) for out in ("reference", "fp32", "kept"))


def terms_of(adapter_path: Path, fp8: Path, weight: float = 1.0) -> dict[str, list]:
    adapter = engine.fit(formats.read_adapter(adapter_path), BaseModel.open(fp8))
    return {m.weight_name: [(m, weight)] for m in adapter.modules.values()}


def dequantized64(state: dict, name: str, block=BLOCK) -> torch.Tensor:
    return fp8_dequantize(state[name], state[f"{name}_scale_inv"], block)


def fp8_unit(value: torch.Tensor) -> torch.Tensor:
    """The spacing of float8_e4m3fn values at each |value| (subnormals below 2^-6 are 2^-9 apart)."""
    _, exponent = torch.frexp(value.abs().clamp_min(2.0 ** -6))
    return torch.ldexp(torch.ones_like(value), exponent - 4)


def cli(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def test_dtype_bf16_is_transformers_dequantization_plus_the_delta(tmp_path, models):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    report = engine.merge(models.fp8, [(formats.read_adapter(models.adapter), 1.0)], tmp_path / "out", dtype="bf16",
                          device="cpu")
    ours, fp8 = tensors(tmp_path / "out"), tensors(models.fp8)
    terms = terms_of(models.adapter, models.fp8)
    assert report.tensors_merged == len(terms) == 8 and report.tensors_converted == 6
    for name in [n for n in fp8 if n.endswith("_proj.weight")]:
        q, inverse = fp8[name], fp8[f"{name}_scale_inv"]
        assert ours[name].dtype == torch.bfloat16 and f"{name}_scale_inv" not in ours
        if name in terms:
            exact = reference64(_dequantize_fp8_weight(q, inverse, list(BLOCK), torch.float64), terms[name])
            assert bool(((ours[name].double() - exact).abs() <= unit_of_rounding(exact.abs(), torch.bfloat16)).all())
        else:  # converted alone: transformers' float32 product, rounded once (DeepSeek's fp8_cast_bf16 as well)
            assert torch.equal(ours[name], _dequantize_fp8_weight(q, inverse, list(BLOCK), torch.float32).bfloat16())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
    model = load_model(tmp_path / "out")  # a plain bf16 model transformers loads as it is
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("precise", [True, False])
def test_fp8_output_is_requantized_with_fresh_block_scales(tmp_path, models, precise):
    report = engine.merge(models.fp8, [(formats.read_adapter(models.adapter), 0.8)], tmp_path / "out", device="cpu",
                          precise=precise)
    ours, fp8 = tensors(tmp_path / "out"), tensors(models.fp8)
    terms = terms_of(models.adapter, models.fp8, 0.8)
    assert report.tensors_merged == len(terms) and report.dtype == "float8_e4m3fn"
    for name, module_terms in terms.items():
        exact = reference64(dequantized64(fp8, name), module_terms)
        q, inverse = ours[name], ours[f"{name}_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and inverse.dtype == torch.float32 and inverse.shape == fp8[
            f"{name}_scale_inv"].shape
        _, expected = fp8_quantize(exact, BLOCK)  # the quantizer's scales of the float64 result
        if precise:
            assert torch.equal(inverse, expected), name
        else:  # float32 accumulation moves a block's max |W| by float32 rounding at most
            torch.testing.assert_close(inverse, expected, rtol=2 ** -22, atol=0)
        spread = fp8_dequantize(torch.ones_like(q, dtype=torch.float32), inverse, BLOCK)
        error = (dequantized64(ours, name) - exact).abs()
        assert bool((error <= fp8_unit(exact / spread) * spread / 2 * (1 + 1e-6) + 1e-12).all()), name
    # (c) everything the adapter does not touch, scales included, byte for byte
    untouched = [n for n in fp8 if n not in terms and n.removesuffix("_scale_inv") not in terms]
    assert len(untouched) == len(fp8) - 2 * len(terms)
    for name in untouched:
        assert torch.equal(ours[name].view(torch.uint8), fp8[name].view(torch.uint8)), name
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((models.fp8 / "config.json").read_text())
    # each new scale is written after its weight, in the weight's file (the base keeps them in the other shard)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    for name in terms:
        assert index[f"{name}_scale_inv"] == index[name]
        header = read_header(tmp_path / "out" / index[name]).tensors
        assert header[f"{name}_scale_inv"].start == header[name].end
    if precise:
        fresh = {t: (info.dtype, info.shape) for t, info in BaseModel.open(tmp_path / "out").tensors.items()}
        assert report.fingerprint == fingerprint_of(
            (t, *fresh[t], _sha(ours[t])) for t in ours)


def _sha(tensor: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def test_new_scales_are_not_kept_once_written(tmp_path, models, monkeypatch):
    """Each re-encoded weight's new scales are held only until its scale tensor is written: kept for the whole run,
    they would grow with the model (DeepSeek-V3, every Linear touched: 164 MB), past the engine's bounded memory."""
    planned = []
    plan = engine._plan
    monkeypatch.setattr(engine, "_plan", lambda *a, **k: planned.append(plan(*a, **k)) or planned[-1])
    engine.merge(models.fp8, [(formats.read_adapter(models.adapter), 1.0)], tmp_path / "out", device="cpu")
    encoded = [t for f in planned[-1] for t in f.tensors if t.encoded]
    assert len(encoded) == 8 and all(t.new_scales is None for t in encoded)


def test_chunk_boundaries_do_not_change_a_byte(tmp_path, models, monkeypatch):
    adapter = formats.read_adapter(models.adapter)
    for dtype in (None, "bf16"):
        engine.merge(models.fp8, [(adapter, 1.0)], tmp_path / f"whole-{dtype}", dtype=dtype, device="cpu",
                     fingerprint=False)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 24 * 64)  # 24 rows: not a block row (16), rounded down to one
    for dtype in (None, "bf16"):
        engine.merge(models.fp8, [(adapter, 1.0)], tmp_path / f"chunked-{dtype}", dtype=dtype, device="cpu",
                     fingerprint=False)
        for f in (tmp_path / f"whole-{dtype}").glob("*.safetensors"):
            assert (tmp_path / f"chunked-{dtype}" / f.name).read_bytes() == f.read_bytes()


def test_fused_experts_decode_and_encode_by_chunks(tmp_path, monkeypatch):
    """E×X×Y expert tensors whose X is no multiple of the block height: chunks are whole experts, each expert's
    blocks restart at its first row; the math by chunks equals the whole tensor's, through the engine too."""
    w = torch.randn(4, 40, 48, generator=torch.Generator().manual_seed(3))
    q, inverse = fp8_quantize(w, (16, 24))
    model = tmp_path / "moe"
    model.mkdir()
    save_file({"mlp.experts.gate_up_proj": q, "mlp.experts.gate_up_proj_scale_inv": inverse,
               "norm.weight": torch.ones(48, dtype=torch.bfloat16)}, str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "fp8", "weight_block_size": [16, 24], "activation_scheme": "dynamic"}}))
    base = BaseModel.open(model)
    found = BlockScaled("mlp.experts.gate_up_proj", (4, 40, 48), base.tensors["mlp.experts.gate_up_proj_scale_inv"],
                        "mlp.experts.gate_up_proj_scale_inv", (16, 24), ue8m0=False)
    assert found.row_unit == 40
    scales = found.read_scales()
    rows = q.reshape(160, 48)
    for row0, row1 in [(0, 40), (40, 120), (120, 160)]:
        acc, scratch = torch.empty(row1 - row0, 48), torch.empty((row1 - row0) * 48)
        found.decode(acc, rows[row0:row1], found.rows_of(scales, row0, row1), scratch)
        assert torch.equal(acc, fp8_dequantize(q, inverse, (16, 24)).float().reshape(160, 48)[row0:row1])
        exact = w.reshape(160, 48)[row0:row1].clone()
        new = found.encode(exact, scratch)
        assert torch.equal(new, found.rows_of(inverse, row0, row1))
        assert torch.equal(exact.to(torch.float8_e4m3fn).view(torch.uint8), rows[row0:row1].view(torch.uint8))
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 50 * 48)
    engine.merge(base, [], tmp_path / "bf16", dtype="bf16", device="cpu")
    out = load_file(tmp_path / "bf16" / "model.safetensors")
    assert set(out) == {"mlp.experts.gate_up_proj", "norm.weight"}
    assert torch.equal(out["mlp.experts.gate_up_proj"], fp8_dequantize(q, inverse, (16, 24)).float().bfloat16())


def _encoded(w: torch.Tensor, scale_dtype: str, block=BLOCK):
    """(BlockScaled, FP8 values, stored inverse scales as float32) of w encoded as a weight whose scales are stored
    as ``scale_dtype``."""
    grid = [-(-n // b) for n, b in zip(w.shape, block)]
    found = BlockScaled("w", tuple(w.shape), TensorInfo("w_scale_inv", scale_dtype, tuple(grid), 0, 0, Path("x")),
                        "w_scale_inv", block, ue8m0=scale_dtype in ("F8_E8M0", "U8"))
    acc = w.clone()
    stored = found.encode(acc, torch.empty(w.numel()))
    return found, acc.to(torch.float8_e4m3fn), found.scale_values(stored)


@pytest.mark.parametrize("scale_dtype", ["F32", "BF16", "F8_E8M0"])
def test_a_block_of_tiny_values_gets_a_finite_scale(scale_dtype):
    """A block whose max |W'| is under 448 / float32 max (≈ 1.3e-36): 448 / amax overflows to an infinite scale, the
    inverse stored is 0, and the block's zeros become NaN (0 · inf; transformers' Fp8Quantize does that too). Capped
    at the float32 max, the block encodes: no NaN, each value within half an FP8 unit at its block's stored scale."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    w[16:, 24:48] *= 1e-38
    w[16:20, 24:48] = 0.0
    found, q, inverse = _encoded(w, scale_dtype)
    decoded = fp8_dequantize(q, inverse, BLOCK)
    assert not decoded.isnan().any() and bool((inverse > 0).all())
    spread = fp8_dequantize(torch.ones_like(q, dtype=torch.float32), inverse, BLOCK)
    exact = w.double()
    assert bool(((decoded - exact).abs() <= fp8_unit(exact / spread) * spread / 2 * (1 + 1e-6)).all())


def test_bf16_stored_scales_quantize_with_the_reciprocal_of_what_is_stored():
    """A scale tensor stored as bf16 rounds the inverse scale: the values are divided by exactly the inverse kept
    (their decoding multiplies by it), not by transformers' 448 / amax."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    _, q, kept = _encoded(w, "BF16")
    _, inverse = fp8_quantize(w, BLOCK)
    assert torch.equal(kept, inverse.bfloat16().float()) and not torch.equal(kept, inverse)
    by = fp8_dequantize(torch.ones_like(q, dtype=torch.float32), 1 / kept, BLOCK).float()
    assert torch.equal(q.view(torch.uint8), (w * by).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))


def static_activation_scales(fp8: Path, out: Path) -> Path:
    """A copy of the FP8 model with activation_scheme "static": each FP8 Linear has an activation_scale."""
    def static(state):
        for name in [n for n in state if n.endswith(".weight_scale_inv")]:
            state[name.removesuffix("weight_scale_inv") + "activation_scale"] = torch.tensor(0.25)

    return _rewrite(fp8, out, static, lambda c: c["quantization_config"].update(activation_scheme="static"))


def test_static_activation_scales_go_with_the_weight_scales(tmp_path, models):
    """activation_scheme "static": each FP8 Linear has an activation_scale. --dtype leaves it out with the weight's
    scale; an FP8 output keeps it byte for byte."""
    base = static_activation_scales(models.fp8, tmp_path / "static")
    engine.merge(base, [], tmp_path / "bf16", dtype="bf16", device="cpu")
    assert not [n for n in tensors(tmp_path / "bf16") if "scale" in n]
    engine.merge(base, [(formats.read_adapter(models.q_only), 1.0)], tmp_path / "fp8", device="cpu")
    ours, stored = tensors(tmp_path / "fp8"), tensors(base)
    assert all(torch.equal(ours[n], t) for n, t in stored.items() if n.endswith("activation_scale"))


def test_inverse_scales_a_scale_dtype_cannot_hold_are_refused():
    """Scales stored as F16 (a dtype loraops reads): a block whose inverse scale (max |W'| / 448) is past F16's
    range, or so far among its subnormals that rounding it down would saturate the block's largest values by more
    than half an FP8 unit, is one error line, not a scale of inf or 0 that decodes to NaN."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5)) * 0.02
    _, q, inverse = _encoded(w, "F16")  # ordinary weights: F16 holds their scales
    assert torch.isfinite(fp8_dequantize(q, inverse, BLOCK)).all()
    for factor in (1e9, 1e-5):
        with pytest.raises(FormatError, match=r"'w': a block's max \|W \+ ΔW\| is .* whose inverse scale .* F16 "
                                              r"cannot hold"):
            _encoded(w * factor, "F16")


@pytest.mark.parametrize("family, block", [("granitemoe", (20, 12)), ("gpt_oss", (16, 24))])
def test_lora_on_fused_fp8_experts(tmp_path, family, block):
    """A target_parameters LoRA on fused MoE experts stored FP8 (E×X×Y with E×⌈X/bo⌉×⌈Y/bi⌉ scales, as transformers'
    FP8Experts saves them): GraniteMoE's E×2I×H, whose 48 rows are no multiple of 20 (chunks of whole experts), and
    gpt-oss's E×H×2I, stored in×out. The merge equals merging into the float32 model holding the decoded values:
    --dtype fp32 bit for bit, and the FP8 output is that result quantized."""
    from test_moe_fused import FAMILIES, peft_model

    model_type, cls, config = FAMILIES[family]
    base = tiny_transformers(tmp_path / "base", model_type, cls, **config)
    peft_model(base, family).save_pretrained(tmp_path / "lora")
    adapter = formats.read_adapter(tmp_path / "lora")
    for name in ("fp8", "decoded"):
        shutil.copytree(base, tmp_path / name)
    state, fp8, decoded = tensors(base), {}, {}
    for name, t in state.items():
        if t.dim() == 3:  # (gpt-oss: experts.gate_up_proj; GraniteMoE: block_sparse_moe.input_linear.weight)
            fp8[name], fp8[f"{name}_scale_inv"] = fp8_quantize(t, block)
            decoded[name] = fp8_dequantize(fp8[name], fp8[f"{name}_scale_inv"], block).float()
        else:
            fp8[name] = decoded[name] = t
    save_file(fp8, str(tmp_path / "fp8" / "model.safetensors"), metadata={"format": "pt"})
    save_file(decoded, str(tmp_path / "decoded" / "model.safetensors"), metadata={"format": "pt"})
    reference, fp32, kept = merged_three_ways(tmp_path, adapter, block)
    experts = [n for n in state if f"{n}_scale_inv" in fp8]
    assert len(experts) == 4 and all(not torch.equal(reference[n], decoded[n]) for n in experts)
    for name in experts:
        assert torch.equal(fp32[name], reference[name]), name
        q, inverse = fp8_quantize(reference[name], block)
        assert torch.equal(kept[f"{name}_scale_inv"], inverse), name
        assert torch.equal(kept[name].view(torch.uint8), q.view(torch.uint8)), name


@pytest.mark.parametrize("variant", ["transformers", "ue8m0", "ue8m0-bytes", "per-tensor"])
def test_scale_variants(tmp_path, models, variant):
    """Blocks that divide every weight, where transformers' own Fp8Quantize applies; UE8M0 scales (powers of two,
    one byte each: F8_E8M0, or U8 exponents as MXFP8 exports store them); one scale per matrix (weight_block_size
    null)."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    block = {"transformers": (8, 8), "per-tensor": None}.get(variant, BLOCK)
    ue8m0 = variant.startswith("ue8m0")
    scale_dtype = {"ue8m0": torch.float8_e8m0fnu, "ue8m0-bytes": torch.uint8}.get(variant, torch.float32)
    fp8 = fp8_model(models.base, tmp_path / "fp8", block=block, scale_fmt="ue8m0" if ue8m0 else None,
                    scale_dtype=scale_dtype)
    engine.merge(fp8, [(formats.read_adapter(models.adapter), 1.0)], tmp_path / "out", device="cpu", precise=True)
    ours, base = tensors(tmp_path / "out"), tensors(fp8)
    # transformers loads the output as it is (on a CPU, dequantized to bf16), where its loader applies
    loaded = load_model(tmp_path / "out").state_dict() if variant == "transformers" else None

    def scales(state, name):
        stored = state[f"{name}_scale_inv"]
        return (stored.view(torch.float8_e8m0fnu) if stored.dtype == torch.uint8 else stored).float()

    for name, module_terms in terms_of(models.adapter, fp8).items():
        exact = reference64(fp8_dequantize(base[name], scales(base, name), block), module_terms)
        _, expected = fp8_quantize(exact, block, ue8m0=ue8m0)
        if variant == "transformers":  # (the tests' quantizer, which also covers partial blocks, is transformers')
            quantizer = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=block)))
            assert torch.equal(quantizer._quantize_one(name, exact.float())[f"{name}_scale_inv"], expected)
        inverse = scales(ours, name)
        assert ours[f"{name}_scale_inv"].dtype == base[f"{name}_scale_inv"].dtype and torch.equal(inverse, expected)
        if loaded is not None:
            assert torch.equal(loaded[name], fp8_dequantize(ours[name], inverse, block).float().bfloat16())
        spread = fp8_dequantize(torch.ones_like(ours[name], dtype=torch.float32), inverse, block)
        error = (fp8_dequantize(ours[name], inverse, block) - exact).abs()
        assert bool((error <= fp8_unit(exact / spread) * spread / 2 * (1 + 1e-6) + 1e-12).all()), name


def test_peft_parity_on_the_dequantized_model(tmp_path, models):
    """A PEFT adapter made on the bf16-dequantized model and merged there by PEFT, against loraops' --dtype bf16 merge
    of the same adapter into the FP8 base: within one bf16 unit."""
    from peft import PeftModel

    dequantized = tmp_path / "dequantized"
    shutil.copytree(models.base, dequantized)
    state = tensors(models.fp8)
    values = {n: (dequantized64(state, n).float().bfloat16() if f"{n}_scale_inv" in state else t)
              for n, t in state.items() if not n.endswith("_scale_inv")}
    save_file(values, str(dequantized / "model.safetensors"), metadata={"format": "pt"})
    adapter = peft_adapter(dequantized, tmp_path / "lora", r=8, alpha=16)
    peft_state = PeftModel.from_pretrained(load_model(dequantized), adapter).merge_and_unload().state_dict()
    engine.merge(models.fp8, [(formats.read_adapter(adapter), 1.0)], tmp_path / "out", dtype="bf16", device="cpu")
    ours = tensors(tmp_path / "out")
    terms = terms_of(adapter, models.fp8)
    assert len(terms) == 14
    for name, module_terms in terms.items():
        # the unit at the operands' magnitude (as test_engine's parity): PEFT rounds ΔW to bf16 before adding it
        exact = reference64(values[name], module_terms)
        magnitude = torch.stack([values[name].double().abs(), (exact - values[name].double()).abs(),
                                 ours[name].double().abs(), peft_state[name].double().abs()]).amax(0)
        gap = (ours[name].double() - peft_state[name].double()).abs()
        assert bool((gap <= unit_of_rounding(magnitude, torch.bfloat16)).all()), name


def test_dora_on_the_decoded_weight(tmp_path, models):
    """A DoRA adapter's norms are those of the decoded FP8 weight plus its delta (the dequantize-before step comes
    first): --dtype bf16 within one bf16 unit of the float64 formula on transformers' dequantization."""
    adapter = perturb_magnitudes(peft_adapter(models.base, tmp_path / "dora", r=4, target_modules=TOUCHED,
                                              use_dora=True))
    engine.merge(models.fp8, [(formats.read_adapter(adapter), 1.0)], tmp_path / "out", dtype="bf16", device="cpu")
    ours, fp8 = tensors(tmp_path / "out"), tensors(models.fp8)
    for name, module_terms in terms_of(adapter, models.fp8).items():
        exact = dora_reference64(dequantized64(fp8, name), module_terms)
        assert bool(((ours[name].double() - exact).abs() <= unit_of_rounding(exact.abs(), torch.bfloat16)).all()), name


def test_cli_merge_check_subtract_and_exact(tmp_path, models):
    check = cli("check", models.adapter, "--base", models.fp8).output
    assert "fits" in check and "8/8 modules match" in check  # the scale tensors are no modules
    out = cli("merge", models.adapter, "--into", models.fp8, "-o", tmp_path / "merged", "--device", "cpu").output
    assert "8 tensors merged" in out and "float8_e4m3fn" in out
    report = json.loads(cli("subtract", models.adapter, "--from", tmp_path / "merged", "-o", tmp_path / "back",
                            "--json").output)
    residual = report["residual"]  # lossy: FP8 rounds twice; by value, each side decoded with its own scales
    assert Path(residual["compared_to"]).resolve() == models.fp8.resolve()
    # (nearly every element: a block whose max |W| moved gets another scale, so another grid of values)
    assert 0 < residual["elements_differing"] <= residual["elements"] and 0 < residual["max_abs_diff"] < 0.05
    cli("subtract", models.adapter, "--from", tmp_path / "merged", "-o", tmp_path / "exact", "--exact")
    for f in models.fp8.glob("*.safetensors"):
        assert (tmp_path / "exact" / f.name).read_bytes() == f.read_bytes()
    # no adapter: --dtype alone converts the FP8 model; without it there is nothing to do
    cli("merge", "--into", models.fp8, "-o", tmp_path / "plain", "--dtype", "bf16", "--no-record")
    assert {t.dtype for t in BaseModel.open(tmp_path / "plain").tensors.values()} == {"BF16"}
    assert cli("merge", "--into", models.fp8, "-o", tmp_path / "none", code=2).output.startswith(
        "error: no adapter to merge")


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_exact_restore_of_one_of_two_adapters_re_merges_as_the_merge_did(tmp_path, models, dtype):
    """subtract --exact of one adapter re-merges the other onto the recorded FP8 base the way the merge did: FP8
    stays FP8 without --dtype (F8_E4M3, the output's dtype the registry shows, is no --dtype), and comes out bf16
    with it. Also for an FP8 model whose bytes are mostly bf16 (a large vocabulary), whose dtype reads BF16."""
    fp8 = models.fp8
    if dtype is None:
        fp8 = fp8_model(tiny_llama(tmp_path / "bf16", dtype=torch.bfloat16, intermediate=72, vocab=1024),
                        tmp_path / "fp8", block=BLOCK)
        assert BaseModel.open(fp8).dtype == "BF16"
    flag = [] if dtype is None else ["--dtype", dtype]
    for i, base in enumerate(dict.fromkeys([models.fp8, fp8])):
        out = tmp_path / f"out{i}"
        cli("merge", models.adapter, f"{models.q_only}:0.5", "--into", base, "-o", out / "two", *flag)
        cli("subtract", models.adapter, "--from", out / "two", "-o", out / "only-q", "--exact")
        cli("merge", f"{models.q_only}:0.5", "--into", base, "-o", out / "q-alone", "--no-record", *flag)
        for f in (out / "q-alone").glob("*.safetensors"):
            assert (out / "only-q" / f.name).read_bytes() == f.read_bytes(), (base, f.name)


def test_a_shard_left_with_no_tensor_is_not_written(tmp_path, models):
    """A shard that holds only the scales of the weights a merge re-encodes (moved to their weight's file) or that
    --dtype leaves out: the output has no such empty shard, which its index could not list (loraops refuses a folder
    with a shard its index does not list), and the output is a model loraops reads, records and merges into again."""
    state = tensors(models.fp8)
    touched = {f"{n}_scale_inv" for n in terms_of(models.adapter, models.fp8)}
    base = tmp_path / "scales-apart"
    base.mkdir()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({n: state[n] for n in touched}, str(base / names[0]), metadata={"format": "pt"})
    save_file({n: t for n, t in state.items() if n not in touched}, str(base / names[1]), metadata={"format": "pt"})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        n: names[n not in touched] for n in sorted(state)}}))
    shutil.copy2(models.fp8 / "config.json", base / "config.json")
    for flag in ([], ["--dtype", "bf16"]):
        out = tmp_path / f"out{len(flag)}"
        cli("merge", models.adapter, "--into", base, "-o", out, *flag)  # recorded: its files are read back
        assert sorted(f.name for f in out.glob("*.safetensors")) == names[1:]
        assert set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()) == {names[1]}
        cli("check", models.adapter, "--base", out)
        cli("merge", models.q_only, "--into", out, "-o", tmp_path / f"again{len(flag)}", "--no-record")
    assert load_model(out) is not None  # (the FP8 output's partial blocks transformers' CPU dequantization refuses)


def test_residual_against_the_fp8_base_by_chunks_that_split_its_blocks(tmp_path, models, monkeypatch):
    """subtract from a --dtype bf16 merge compares with the pristine FP8 base, decoded by its whole block rows, which
    a chunk of the bf16 model need not hold (24 rows here, blocks of 16): the residual counts what differs by value."""
    adapter = formats.read_adapter(models.adapter)
    engine.merge(models.fp8, [(adapter, 1.0)], tmp_path / "bf16", dtype="bf16", device="cpu", fingerprint=False)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 24 * 64)
    residual = engine.subtract(tmp_path / "bf16", [(adapter, 1.0)], tmp_path / "back", reference=models.fp8,
                               device="cpu", fingerprint=False).residual
    ours, fp8 = tensors(tmp_path / "back"), tensors(models.fp8)
    base = {name: dequantized64(fp8, name).float().double() for name in terms_of(models.adapter, models.fp8)}
    assert residual.elements_differing == sum(int((ours[n].double() != b).sum()) for n, b in base.items())
    assert residual.max_abs_diff == max(float((ours[n].double() - b).abs().max()) for n, b in base.items())


def test_base_digests_cached_after_a_dequantizing_merge(tmp_path, models):
    """The scales a --dtype merge leaves out unread are hashed too, so recording the FP8 base reads nothing again."""
    copy = tmp_path / "fp8"
    shutil.copytree(models.fp8, copy)  # never fingerprinted
    engine.merge(copy, [(formats.read_adapter(models.adapter), 1.0)], tmp_path / "out", dtype="bf16", device="cpu")
    base = BaseModel.open(copy)
    cached = base.cached_digests()
    assert set(cached) == set(base.tensors)
    assert cached == {name: _sha(t) for name, t in tensors(copy).items()}


def _rewrite(fp8: Path, out: Path, state_edit, config_edit=None) -> Path:
    """A single-file copy of the FP8 model with its tensors (and config) edited."""
    out.mkdir()
    state = tensors(fp8)
    state_edit(state)
    save_file(state, str(out / "model.safetensors"))
    config = json.loads((fp8 / "config.json").read_text())
    if config_edit is not None:
        config_edit(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


Q = "model.layers.0.self_attn.q_proj"


def _compressed_tensors(state):  # per-channel float scale under weight_scale, as compressed-tensors and FBGEMM store
    state[f"{Q}.weight_scale"] = state.pop(f"{Q}.weight_scale_inv")[:, :1].repeat_interleave(16, 0)


def _bnb_int8(state):
    state[f"{Q}.weight"] = state[f"{Q}.weight"].view(torch.int8)
    state[f"{Q}.SCB"] = torch.ones(64)
    del state[f"{Q}.weight_scale_inv"]


def _gptq(state):
    del state[f"{Q}.weight"], state[f"{Q}.weight_scale_inv"]
    state[f"{Q}.qweight"] = torch.zeros(8, 64, dtype=torch.int32)
    state[f"{Q}.scales"] = torch.ones(1, 64, dtype=torch.float16)


UNSUPPORTED = "loraops merges only into float weights and fine-grained FP8 ones"


@pytest.mark.parametrize("case, state_edit, config_edit, message, dtype_message", [
    ("missing", lambda s: s.pop(f"{Q}.weight_scale_inv"), None,
     f"'{Q}.weight' is stored as F8_E4M3 but its scale '{Q}.weight_scale_inv' is missing", None),
    ("wrong-shape", lambda s: s.update({f"{Q}.weight_scale_inv": s[f"{Q}.weight_scale_inv"].T.contiguous()}), None,
     f"'{Q}.weight_scale_inv' has shape [3, 4]; '{Q}.weight' [64, 64] in blocks of 16×24 needs [4, 3]", None),
    # the other modules of these bases keep the fine-grained layout their config.json no longer says: with --dtype,
    # which would convert every one, the first is refused
    # quant_method fp8 but a weight_scale beside the weight (transformers' FP8Embedding): named, not "missing"
    ("fp8-weight_scale", _compressed_tensors, None,
     f"'{Q}.weight' is stored as F8_E4M3 with {Q}.weight_scale F32[64, 1] (config.json quant_method 'fp8'); "
     f"{UNSUPPORTED}", None),
    ("compressed-tensors", _compressed_tensors, lambda c: c.update(
        {"quantization_config": {"quant_method": "compressed-tensors"}}),
     f"'{Q}.weight' is stored as F8_E4M3 with {Q}.weight_scale F32[64, 1] (config.json quant_method "
     f"'compressed-tensors'); {UNSUPPORTED}", f"(config.json quant_method 'compressed-tensors'); {UNSUPPORTED}"),
    ("bitsandbytes", _bnb_int8, lambda c: c.update({"quantization_config": {"quant_method": "bitsandbytes"}}),
     f"'{Q}.weight' is stored as I8 with {Q}.SCB F32[64] (config.json quant_method 'bitsandbytes'); {UNSUPPORTED}",
     f"(config.json quant_method 'bitsandbytes'); {UNSUPPORTED}"),
    ("gptq", _gptq, lambda c: c.update({"quantization_config": {"quant_method": "gptq"}}),
     f"{Q} (quantized, stored as {Q}.qweight I32[8, 64], {Q}.scales F16[1, 64])",
     f"(config.json quant_method 'gptq'); {UNSUPPORTED}"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, models, case, state_edit, config_edit, message,
                                                 dtype_message):
    bad = _rewrite(models.fp8, tmp_path / case, state_edit, config_edit)
    for args, wanted in ((["merge", models.q_only, "--into", bad, "-o", tmp_path / "out"], message),
                         (["merge", models.q_only, "--into", bad, "-o", tmp_path / "out", "--dtype", "bf16"],
                          dtype_message or message),
                         (["check", models.q_only, "--base", bad], message)):
        output = cli(*args, code=2).output
        assert wanted in output, output
        if args[0] == "merge":
            assert output.startswith("error: ") and output.count("\n") == 1, output
        assert not (tmp_path / "out").exists()


def test_check_of_a_registered_quantized_base_reads_its_files(tmp_path, models):
    """check --base NAME of a registered base whose files are at hand checks the quantized layout merge reads from
    them, as check --base PATH does (the recorded manifest holds no file headers: it said "fits" where merge
    refuses); and checked against every registered base, one base merge would refuse does not fit, the others are
    still checked."""
    bad = _rewrite(models.fp8, tmp_path / "bnb", _bnb_int8, lambda c: c.update({"quantization_config": {"quant_method": "bitsandbytes"}}))
    message = f"'{Q}.weight' is stored as I8 with {Q}.SCB F32[64] (config.json quant_method 'bitsandbytes'); {UNSUPPORTED}"
    cli("base", "add", bad, "--name", "bnb")
    cli("base", "add", models.fp8, "--name", "fp8")
    by_name = cli("check", models.q_only, "--base", "bnb", code=2).output
    assert message in by_name and "does not fit bnb: 0/2 modules match" in by_name
    assert "0/2 modules match" in cli("check", models.q_only, "--base", bad, code=2).output
    assert "fits fp8: 2/2 modules match" in cli("check", models.q_only, "--base", "fp8").output
    every = cli("check", models.q_only).output
    assert "fits fp8: 2/2 modules match" in every and "does not fit bnb" in every and message in every


@pytest.mark.parametrize("case", ["modules_to_save", "tied head"])
def test_check_says_what_merge_refuses_of_a_tensor_no_lora_module_names(tmp_path, models, case):
    """check reads the quantized layout of every tensor merge writes, as merge does: a modules_to_save copy of a
    weight stored as bitsandbytes' I8, and a LoRA on a tied head the base does not store, whose embeddings (what the
    untied head is written from) are I8. check said "fits" (it read only the weights a LoRA module or trainable
    tokens name, and a head's only where stored), merge refused."""
    if case == "modules_to_save":
        base, adapter = _rewrite(models.fp8, tmp_path / "base", _bnb_int8), peft_adapter(
            models.base, tmp_path / "a", r=2, target_modules=["k_proj"], modules_to_save=["q_proj"])
        message = f"'{Q}.weight' is stored as I8 with {Q}.SCB F32[64] (config.json quant_method 'fp8'); {UNSUPPORTED}"
    else:
        tied = tiny_llama(tmp_path / "tied", tie=True)
        adapter = peft_adapter(tied, tmp_path / "a", r=2, target_modules=["q_proj", "lm_head"])
        base = _rewrite(tied, tmp_path / "base", lambda s: s.update(
            {"model.embed_tokens.weight": s["model.embed_tokens.weight"].to(torch.int8)}),
            lambda c: c.update({"quantization_config": {"quant_method": "bitsandbytes"}}))
        message = f"'model.embed_tokens.weight' is stored as I8 (config.json quant_method 'bitsandbytes'); {UNSUPPORTED}"
    assert message in cli("merge", adapter, "--into", base, "-o", tmp_path / "out", "--no-record", code=2).output
    checked = cli("check", adapter, "--base", base, code=2).output
    assert message in checked and "does not fit" in checked, checked


def test_dtype_refuses_fp8_weights_it_cannot_read_even_untouched(tmp_path, models):
    bad = _rewrite(models.fp8, tmp_path / "bad", lambda s: s.pop("model.layers.1.mlp.gate_proj.weight_scale_inv"))
    cli("merge", models.adapter, "--into", bad, "-o", tmp_path / "out", "--no-record")  # gate_proj: untouched, copied
    output = cli("merge", models.adapter, "--into", bad, "-o", tmp_path / "bf16", "--dtype", "bf16", code=2).output
    assert "'model.layers.1.mlp.gate_proj.weight_scale_inv' is missing" in output
    assert not (tmp_path / "bf16").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merge_matches_cpu(tmp_path, models):
    adapter = formats.read_adapter(models.adapter)
    for device in ("cpu", "cuda"):
        engine.merge(models.fp8, [(adapter, 1.0)], tmp_path / device, device=device, precise=True)
    cpu, gpu = tensors(tmp_path / "cpu"), tensors(tmp_path / "cuda")
    for name in terms_of(models.adapter, models.fp8):
        torch.testing.assert_close(gpu[f"{name}_scale_inv"], cpu[f"{name}_scale_inv"], rtol=2 ** -22, atol=0)
        gap = (dequantized64(gpu, name) - dequantized64(cpu, name)).abs()
        spread = fp8_dequantize(torch.ones_like(cpu[name], dtype=torch.float32), cpu[f"{name}_scale_inv"], BLOCK)
        assert bool((gap <= fp8_unit(dequantized64(cpu, name) / spread) * spread * 1.01).all()), name


@pytest.mark.parametrize("value", [1.0, 448.0])
def test_weights_decoded_beyond_bf16s_range_are_refused_with_dtype_bf16(value, tmp_path, models):
    """FP8 blocks × their scales can exceed bf16's range while the LoRA's delta is tiny: the inf scan may not be
    skipped on the delta's bound alone (the FP8 dtype's own range says nothing of the decoded weight's), or the
    merge wrote inf with exit 0. Also beyond float32's (448 × 3.4e38): the base's finite values decoded in float32 were
    inf there too, and passed for an inf the base holds."""
    def huge(state):
        state[f"{Q}.weight"] = torch.full_like(state[f"{Q}.weight"].float(), value).to(torch.float8_e4m3fn)
        state[f"{Q}.weight_scale_inv"] = torch.full(state[f"{Q}.weight_scale_inv"].shape, 3.4e38)

    fp8 = _rewrite(models.fp8, tmp_path / "huge", huge)
    with pytest.raises(InvalidInputError, match=f"'{Q}.weight' comes out with values beyond bfloat16's range"):
        engine.merge(fp8, [(formats.read_adapter(models.q_only), 1.0)], tmp_path / "out", dtype="bf16", device="cpu")


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_a_nan_or_inf_scale_of_the_base_stays_where_deltas_may_overflow(scale, tmp_path, models):
    """A block whose stored inverse scale is NaN dequantizes to NaN, one whose scale is inf to ±inf (NaN where its
    FP8 value is 0), as transformers' dequantization: the base's, which stay as they are (W + Δ with Δ finite),
    unsaid, as any NaN or inf of the base. Its FP8 bytes hold none: read undecoded, the check took the NaN for deltas
    that cancel as inf − inf (every FP8 weight's output is scanned), and the inf for values beyond bfloat16's range
    that the adapters' weights × scales made, and refused the merge."""
    fp8 = shutil.copytree(models.fp8, tmp_path / "fp8")
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = next(f for f in fp8.glob("*.safetensors") if f"{name}_scale_inv" in load_file(f))
    state = load_file(shard)
    state[f"{name}_scale_inv"][0, 1] = scale
    save_file(state, shard, metadata={"format": "pt"})
    engine.merge(fp8, [(formats.read_adapter(models.q_only), 1.0)], tmp_path / "out", dtype="bf16", device="cpu")
    ours, stored = tensors(tmp_path / "out")[name].double(), tensors(fp8)
    exact = reference64(dequantized64(stored, name), terms_of(models.q_only, fp8)[name])
    inf, nan = torch.isinf(exact), torch.isnan(exact)
    assert bool((inf if scale == float("inf") else nan).any())
    assert torch.equal(torch.isnan(ours), nan) and torch.equal(ours[inf], exact[inf])
    finite = ~(inf | nan)
    assert bool(((ours - exact).abs()[finite] <= unit_of_rounding(exact.abs(), torch.bfloat16)[finite]).all())


def test_lora_on_experts_and_router_of_a_per_expert_fp8_checkpoint(tmp_path):
    """The published FP8 MoE layout (DeepSeek-V3, Qwen3-MoE: each expert its own FP8 Linear with its block scales)
    under PEFT's target_parameters LoRA on the fused experts and the router (gate.weight, quantized here too): --dtype
    fp32 equals the merge into the float32 model holding the decoded values bit for bit, the FP8 output is that result
    quantized, every expert and the router changed."""
    from test_moe import FAMILIES, peft_model

    model_type, cls, config = FAMILIES["deepseek_v3"]
    base = tiny_transformers(tmp_path / "base", model_type, cls, **config)
    peft_model(base, "deepseek_v3").save_pretrained(tmp_path / "lora")
    adapter = formats.read_adapter(tmp_path / "lora")
    state, fp8, decoded = tensors(base), {}, {}
    for name, t in state.items():
        if t.dim() == 2 and name.endswith("proj.weight") or name.endswith("mlp.gate.weight"):
            fp8[name], fp8[f"{name}_scale_inv"] = fp8_quantize(t, BLOCK)
            decoded[name] = fp8_dequantize(fp8[name], fp8[f"{name}_scale_inv"], BLOCK).float()
        else:
            fp8[name] = decoded[name] = t
    for name, files in (("fp8", fp8), ("decoded", decoded)):
        (tmp_path / name).mkdir()
        shutil.copy(base / "config.json", tmp_path / name)
        save_file(files, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    reference, fp32, kept = merged_three_ways(tmp_path, adapter, BLOCK)
    touched = [n for n in fp8 if f"{n}_scale_inv" in fp8 and not torch.equal(reference[n], decoded[n])]
    assert sum(".experts." in n for n in touched) == 2 * 4 * 3  # 2 layers × 4 experts × (gate, up, down)
    assert sum(n.endswith("mlp.gate.weight") for n in touched) == 2  # each layer's router
    for name in (n for n in fp8 if f"{n}_scale_inv" in fp8):
        assert torch.equal(fp32[name], reference[name]), name
        q, inverse = fp8_quantize(reference[name], BLOCK) if name in touched else (fp8[name], fp8[f"{name}_scale_inv"])
        assert torch.equal(kept[f"{name}_scale_inv"], inverse), name
        assert torch.equal(kept[name].view(torch.uint8), q.view(torch.uint8)), name


def test_an_fp8_base_counts_the_parameters_of_its_bf16_copy(tmp_path, models):
    """base add / base show counted each FP8 weight's weight_scale_inv (and static activation_scale) as parameters:
    the count is the model's, the same as its bf16 copy's (merge --dtype bf16); its tensors still count them."""
    from loraops.registry import Registry

    base = static_activation_scales(models.fp8, tmp_path / "static")
    engine.merge(base, [], tmp_path / "bf16", dtype="bf16", device="cpu")
    fp8, bf16 = BaseModel.open(base), BaseModel.open(tmp_path / "bf16")
    assert fp8.num_parameters == bf16.num_parameters == BaseModel.open(models.base).num_parameters
    assert len(fp8.tensors) == len(bf16.tensors) + 2 * 7 * 2  # a scale and an activation scale per FP8 Linear
    assert f"{len(fp8.tensors)} tensors, {bf16.num_parameters:,} parameters" in cli("base", "add", base).output
    with Registry.open() as reg:  # a base recorded from its manifest alone (base add hub:…) counts them the same way
        record, _ = reg.register_manifest_base(name="remote", source="hf://someone/fp8", tensors={
            name: (t.dtype, tuple(t.shape)) for name, t in fp8.tensors.items()}, dtype="F8_E4M3", total_bytes=1)
        assert record.num_parameters == bf16.num_parameters
