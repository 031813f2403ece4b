"""--dtype of combine, resize and export: every floating tensor written is the float64 reference rounded once to the
dtype (kohya's alpha scalars stay float32); a value beyond float16's range is refused with nothing written; without
--dtype nothing changes."""
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from factories import peft_adapter, perturb_magnitudes, tiny_llama
from loraops import algebra, derive
from loraops.cli import main
from loraops.errors import InvalidInputError
from loraops.formats import read_adapter
from loraops.registry import Registry

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved-dtype")
    base = tiny_llama(root / "base")
    return {
        "base": base,
        # bf16 inputs: a conversion that went through the inputs' dtype would keep 8 of float16's 11 bits
        "a": peft_adapter(base, root / "a", seed=1, r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                          dtype=torch.bfloat16),
        "b": peft_adapter(base, root / "b", seed=2, r=6, alpha=3, target_modules=["q_proj", "o_proj"],
                          dtype=torch.bfloat16, lora_bias=True),
        "f32": peft_adapter(base, root / "f32", seed=3, r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        "dora": perturb_magnitudes(peft_adapter(base, root / "dora", seed=4, r=6, alpha=6, use_dora=True,
                                                target_modules=["q_proj", "v_proj"])),
        "saved": peft_adapter(base, root / "saved", seed=5, r=4, alpha=8, target_modules=["q_proj"],
                              modules_to_save=["lm_head"]),
    }


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS)


def test_combine_dtype_rounds_the_computed_values_once(files, tmp_path):
    code, out = run("combine", f"{files['a']}:0.7", f"{files['b']}:-0.5", "--precise", "--dtype", "fp16",
                    "-o", tmp_path / "ab")
    assert code == 0, out
    a, b = tensors(files["a"]), tensors(files["b"])
    sa, sb = 8 / 4, 3 / 6
    written = tensors(tmp_path / "ab")
    prefix = "base_model.model.model.layers.0.self_attn."
    for layer in range(2):
        p = prefix.replace("layers.0", f"layers.{layer}")
        # the float64 reference of cat: B = [w₁s₁B₁ | w₂s₂B₂], A = [A₁; A₂], lora_bias = Σ wᵢsᵢ·biasᵢ
        B = torch.cat([0.7 * sa * a[p + "q_proj.lora_B.weight"].double(),
                       -0.5 * sb * b[p + "q_proj.lora_B.weight"].double()], dim=1)
        A = torch.cat([a[p + "q_proj.lora_A.weight"].double(), b[p + "q_proj.lora_A.weight"].double()])
        bias = -0.5 * sb * b[p + "q_proj.lora_B.bias"].double()
        for key, reference in (("lora_B.weight", B), ("lora_A.weight", A), ("lora_B.bias", bias)):
            got = written[p + "q_proj." + key]
            assert got.dtype == torch.float16 and torch.equal(got, reference.to(torch.float16)), key
        assert written[p + "v_proj.lora_B.bias"].eq(0).all()  # a's modules: no bias of their own
    with Registry.open() as reg:
        record = reg.get_adapter("a+b-cat")
        assert record.dtype == "float16"
        assert record.lineage.params == {"method": "cat", "params": {}, "rank": None, "dtype": "float16"}


def test_resize_dtype_of_a_dora_adapter(files, tmp_path):
    code, out = run("resize", files["dora"], "--rank", "3", "--precise", "--dtype", "bf16", "-o", tmp_path / "r3")
    assert code == 0, out
    written, stored = tensors(tmp_path / "r3"), tensors(files["dora"])
    source = read_adapter(files["dora"])
    exact = algebra.resize_lazily(source, rank=3, precise=True, out_dtype=torch.float64).collect()[0]
    for name, module in exact.modules.items():
        original = source.modules[name]
        delta = original.scale * (original.B.double() @ original.A.double())
        U, S, Vh = torch.linalg.svd(delta)  # the float64 reference: the best rank-3 approximation
        reference = (U[:, :3] * S[:3]) @ Vh[:3]
        assert torch.allclose(module.scale * (module.B @ module.A), reference, atol=1e-12)
        key = f"base_model.model.{name}."
        assert torch.equal(written[key + "lora_B.weight"], module.B.to(torch.bfloat16))
        assert torch.equal(written[key + "lora_A.weight"], module.A.to(torch.bfloat16))
        magnitude = stored[key + "lora_magnitude_vector"]  # kept as it is, rounded once
        assert torch.equal(written[key + "lora_magnitude_vector"], magnitude.to(torch.bfloat16))
    with Registry.open() as reg:
        record = reg.get_adapter("dora-r3")
        assert record.dtype == "bfloat16" and record.lineage.params == {"rank": 3, "dtype": "bfloat16"}


def test_export_dtype_kohya_keeps_alpha_float32(files, tmp_path):
    code, out = run("export", files["f32"], "--format", "kohya", "--dtype", "fp16", "-o", tmp_path / "k.safetensors")
    assert code == 0, out
    written = load_file(tmp_path / "k.safetensors")
    source = read_adapter(files["f32"])
    alphas = [t for k, t in written.items() if k.endswith(".alpha")]
    assert len(alphas) == len(source.modules) and all(t.dtype == torch.float32 and t.item() == 8 for t in alphas)
    factors = sorted((k, t) for k, t in written.items() if not k.endswith(".alpha"))
    assert {t.dtype for _, t in factors} == {torch.float16}
    expected = [t.double().to(torch.float16) for m in source.modules.values() for t in (m.A, m.B)]
    got = sorted(tuple(t.flatten().tolist()) for _, t in factors)
    assert got == sorted(tuple(t.flatten().tolist()) for t in expected)


def test_export_dtype_converts_saved_whole_tensors(files, tmp_path):
    code, out = run("export", files["saved"], "--format", "peft", "--dtype", "bf16", "-o", tmp_path / "p")
    assert code == 0, out
    written, stored = tensors(tmp_path / "p"), tensors(files["saved"])
    assert written.keys() == stored.keys() and any("lm_head" in k for k in written)
    for key, tensor in stored.items():
        assert torch.equal(written[key], tensor.double().to(torch.bfloat16)), key


def test_default_is_unchanged_and_fp32_is_the_same_bytes(files, tmp_path):
    code, out = run("combine", files["f32"], "-o", tmp_path / "default")
    assert code == 0, out
    with Registry.open() as reg:
        record = reg.get_adapter("f32-cat")
        assert record.dtype == "float32" and record.lineage.params == {"method": "cat", "params": {}, "rank": None}
    code, out = run("combine", files["f32"], "--dtype", "fp32", "-o", tmp_path / "fp32")
    assert code == 0, out
    assert "already registered as f32-cat@1" in out  # the same bytes: a conversion to the computed dtype is none
    assert (tmp_path / "fp32" / WEIGHTS).read_bytes() == (tmp_path / "default" / WEIGHTS).read_bytes()


def big_adapter(source: Path, out: Path) -> Path:
    out.mkdir()
    tensors = load_file(source / WEIGHTS)
    key = next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = 70000.0  # beyond float16's ±65504
    save_file(tensors, out / WEIGHTS, metadata={"format": "pt"})
    (out / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    return out


def test_overflow_is_refused_and_nothing_written(files, tmp_path):
    big = big_adapter(files["f32"], tmp_path / "big")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    code, out = run("export", big, "--format", "peft", "--dtype", "fp16", "-o", tmp_path / "out")
    assert code != 0
    assert out == (f"error: {key!r} comes out with values beyond float16's range (±65504); write it with --dtype bf16 "
                   "or fp32\n")
    assert not (tmp_path / "out").exists()
    code, out = run("combine", big, "--dtype", "fp16", "-o", tmp_path / "c")
    assert code != 0 and len(out.splitlines()) == 1 and "beyond float16's range" in out, out
    assert not (tmp_path / "c").exists()
    with Registry.open() as reg:
        assert reg.list_adapters() == []  # the input it registered taken back too
    assert run("export", big, "--format", "peft", "--dtype", "bf16", "-o", tmp_path / "out")[0] == 0


def test_python_api_refuses_an_unknown_dtype_before_any_work(files, tmp_path):
    with pytest.raises(InvalidInputError, match="unknown dtype 'int8'"):
        derive.resize(str(files["f32"]), rank=2, dtype="int8")
    with pytest.raises(InvalidInputError, match="unknown dtype 'int8'"):
        derive.export(str(files["f32"]), "peft", str(tmp_path / "x"), dtype="int8")
    with Registry.open() as reg:
        assert reg.list_adapters() == []


def test_kohya_join_of_parts_with_different_scales_rounds_once(tmp_path):
    """A FLUX fused tensor's parts (to_k, proj_mlp of linear1) with different scales are written as one kohya module
    whose B holds each part's B × its scale: with --dtype, folded from the stored values and rounded once. A bfloat16
    B × 3 has up to 10 significant bits, which float16 holds: rounding it to bfloat16 first would lose them."""
    from dataclasses import replace

    from factories import lora_adapter
    from test_ldm import FLUX, FLUX_LORA, checkpoint

    from loraops import check, formats

    manifest = load_file(checkpoint(tmp_path / "flux.safetensors", FLUX))
    bound = check.bind(formats.read_adapter(formats.write_adapter(
        lora_adapter(FLUX_LORA, fmt="diffusers", dtype=torch.bfloat16), tmp_path / "d.safetensors", "diffusers")),
        manifest)
    to_k, proj_mlp = "single_blocks.0.linear1.to_k", "single_blocks.0.linear1.proj_mlp"
    modules = {**bound.modules, to_k: replace(bound.modules[to_k], alpha=12.0, scale=3.0)}  # proj_mlp keeps 2.0
    written = load_file(formats.write_adapter(replace(bound, modules=modules), tmp_path / "k.safetensors", "kohya",
                                              dtype="fp16"))
    up = written["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert up.dtype == torch.float16 and written["lora_unet_single_blocks_0_linear1.alpha"].item() == 8  # scale 1
    column = 0
    for name in (to_k, proj_mlp):
        part = modules[name]
        reference = (part.B.double() * part.scale).to(torch.float16)
        got = up[part.first_row:part.first_row + part.weight_shape[0], column:column + part.rank]
        assert torch.equal(got, reference), name
        column += part.rank


def test_kohya_join_of_float8_parts(tmp_path):
    """A float8 FLUX LoRA's fused parts (to_k, proj_mlp of linear1, each its own A) joined into one kohya module: B's
    blocks multiplied by the scale ratio in float8 was torch's NotImplementedError (no float8 arithmetic on the CPU), a
    traceback for `export --format kohya` and a combine written as kohya. Now copied where the scales agree, folded in
    float32 and rounded once where they differ, and refused where the fold passes float8's range."""
    from dataclasses import replace

    from factories import lora_adapter
    from test_ldm import FLUX, FLUX_LORA, checkpoint

    from loraops import check, formats

    fp8 = torch.float8_e4m3fn
    manifest = load_file(checkpoint(tmp_path / "flux.safetensors", FLUX))
    bound = check.bind(formats.read_adapter(formats.write_adapter(
        lora_adapter(FLUX_LORA, fmt="diffusers", dtype=fp8), tmp_path / "d.safetensors", "diffusers")), manifest)
    to_k, proj_mlp = "single_blocks.0.linear1.to_k", "single_blocks.0.linear1.proj_mlp"
    up_key = "lora_unet_single_blocks_0_linear1.lora_up.weight"
    for scale, path in ((2.0, "same.safetensors"), (3.0, "folded.safetensors")):  # proj_mlp's scale is 2.0
        modules = {**bound.modules, to_k: replace(bound.modules[to_k], alpha=4 * scale, scale=scale)}
        up = load_file(formats.write_adapter(replace(bound, modules=modules), tmp_path / path, "kohya"))[up_key]
        assert up.dtype == fp8
        column = 0
        for name in (to_k, proj_mlp):
            part = modules[name]
            joined_scale = 2.0 if scale == 2.0 else 1.0  # (one scale: kept; else 1, each B × its own)
            reference = (part.B.float() * (part.scale / joined_scale)).to(fp8)
            got = up[part.first_row:part.first_row + part.weight_shape[0], column:column + part.rank]
            assert torch.equal(got.view(torch.uint8), reference.view(torch.uint8)), (scale, name)
            column += part.rank
    modules = {**bound.modules, to_k: replace(bound.modules[to_k], alpha=4e4, scale=1e4)}
    with pytest.raises(InvalidInputError, match=r"values beyond float8_e4m3fn's range \(±448\); write it with "
                                                r"dtype bf16 or fp32"):
        formats.write_adapter(replace(bound, modules=modules), tmp_path / "beyond.safetensors", "kohya")


@pytest.mark.parametrize(("weight", "dtype", "hint"), [
    (1e37, "fp16", "write it with --dtype bf16 or fp32"),
    (None, "bf16", "write it with --dtype fp32"),  # a peak between bfloat16's and float32's max
    (1e39, "bf16", "no dtype it can be written in holds them"),
    (1e39, "fp32", "no dtype it can be written in holds them"),
])
def test_the_overflow_hint_names_only_dtypes_that_hold_the_values(files, tmp_path, weight, dtype, hint):
    """--precise keeps float64 values past float32's range: the hint names a wider dtype only where one holds them."""
    if weight is None:  # cat's B is weight × scale (8/4) × B: its peak at 3.397e38
        weight = 3.397e38 / (2 * max(float(t.abs().amax()) for k, t in tensors(files["f32"]).items() if "lora_B" in k))
    code, out = run("combine", f"{files['f32']}:{weight!r}", "--precise", "--dtype", dtype, "-o", tmp_path / "c")
    assert code != 0 and len(out.splitlines()) == 1 and out.rstrip().endswith(f"; {hint}"), out
    assert not (tmp_path / "c").exists()
