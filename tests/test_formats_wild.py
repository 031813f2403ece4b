"""LoRA layouts other trainers write, as users download them: each read, checked and merged as diffusers' own
converter (lora_conversion_utils) reads it, the merge compared with base + s·B·A computed here in float64."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import loraops_run
from test_pipeline_dit import D, R, check_merged, flux_pipeline

XLABS = {  # x-flux processor LoRA: (rows of up, columns of down)
    "double_blocks.0.processor.qkv_lora1": (3 * D, D), "double_blocks.0.processor.proj_lora1": (D, D),
    "double_blocks.0.processor.qkv_lora2": (3 * D, D), "double_blocks.0.processor.proj_lora2": (D, D),
    "single_blocks.0.processor.qkv_lora": (3 * D, D), "single_blocks.0.processor.proj_lora": (D, 5 * D),
}


def xlabs_file(path, prefix=""):
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for name, (rows, cols) in XLABS.items():
        tensors[f"{prefix}{name}.down.weight"] = torch.randn(R, cols, generator=g).half()
        tensors[f"{prefix}{name}.up.weight"] = (torch.randn(rows, R, generator=g) * 0.1).half()
    save_file(tensors, str(path))
    return tensors


def merged_as_diffusers(base, converted):
    """base + B·A (scale 1) of every module of diffusers' converted state dict, in float64."""
    want = {k: v.double() for k, v in base.items()}
    for key, A in converted.items():
        if key.endswith(".lora_A.weight"):
            tensor = key.removeprefix("transformer.").replace(".lora_A.weight", ".weight")
            want[tensor] = want[tensor] + converted[key.replace(".lora_A.", ".lora_B.")].double() @ A.double()
    return want


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_flux_lora_merges_as_diffusers_converts_it(tmp_path, prefix):
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    pipe = flux_pipeline(tmp_path / "pipe")
    tensors = xlabs_file(tmp_path / "x.safetensors", prefix)
    converted = _convert_xlabs_flux_lora_to_diffusers(dict(tensors))
    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))

    run = loraops_run("check", tmp_path / "x.safetensors", "--base", pipe)
    assert run.returncode == 0, run.stderr
    assert "12/12 modules match" in run.stdout  # the three qkv LoRAs as their q, k and v
    run = loraops_run("merge", tmp_path / "x.safetensors", "--into", pipe, "-o", tmp_path / "m", "--precise",
                      "--no-record")
    assert run.returncode == 0, run.stderr
    merged = check_merged(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors",
                          merged_as_diffusers(base, converted))
    assert sum(not torch.equal(merged[k], base[k]) for k in base) == 12

    # registered, it is the diffusers LoRA diffusers' converter makes of it
    run = loraops_run("register", tmp_path / "x.safetensors", "--name", "x")
    assert run.returncode == 0, run.stderr
    run = loraops_run("export", "x", "--format", "diffusers", "-o", tmp_path / "d.safetensors")
    assert run.returncode == 0, run.stderr
    written = load_file(str(tmp_path / "d.safetensors"))
    assert written.keys() == converted.keys()
    for key, tensor in converted.items():
        assert torch.equal(written[key], tensor), key


def test_xlabs_file_with_a_broken_module_is_refused_in_one_line(tmp_path):
    tensors = xlabs_file(tmp_path / "x.safetensors")
    del tensors["single_blocks.0.processor.proj_lora.up.weight"]
    save_file(tensors, str(tmp_path / "x.safetensors"))
    run = loraops_run("inspect", tmp_path / "x.safetensors")
    assert run.returncode == 2 and "has no matching up tensor" in run.stderr and "Traceback" not in run.stderr
    tensors = xlabs_file(tmp_path / "x.safetensors")
    tensors["single_blocks.0.processor.qkv_lora.up.weight"] = tensors["single_blocks.0.processor.qkv_lora.up.weight"][1:]
    save_file(tensors, str(tmp_path / "x.safetensors"))
    run = loraops_run("inspect", tmp_path / "x.safetensors")
    assert run.returncode == 2 and "three equal parts" in run.stderr and "Traceback" not in run.stderr
    tensors = xlabs_file(tmp_path / "x.safetensors")
    tensors["diffusion_model.single_blocks.0.processor.proj_lora.down.weight"] = tensors[
        "single_blocks.0.processor.proj_lora.down.weight"] * 2
    save_file(tensors, str(tmp_path / "x.safetensors"))
    run = loraops_run("inspect", tmp_path / "x.safetensors")
    assert run.returncode == 2 and "duplicate factor" in run.stderr and "Traceback" not in run.stderr


def test_comfyui_style_flux_lora_reads_its_alpha_keys(tmp_path):
    """``diffusion_model.<BFL path>.lora_A.weight`` with ``<module>.alpha`` beside it (ComfyUI reads alpha/r; a module
    without one: scale 1): it was refused as an unknown layout; --alpha still replaces every module's alpha."""
    pipe = flux_pipeline(tmp_path / "pipe")
    g = torch.Generator().manual_seed(7)
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv"
    proj = "diffusion_model.double_blocks.0.txt_attn.proj"
    A1, B1 = torch.randn(R, D, generator=g), torch.randn(3 * D, R, generator=g) * 0.1
    A2, B2 = torch.randn(R, D, generator=g), torch.randn(D, R, generator=g) * 0.1
    save_file({f"{qkv}.lora_A.weight": A1, f"{qkv}.lora_B.weight": B1, f"{qkv}.alpha": torch.tensor(2.0, dtype=torch.bfloat16),
               f"{proj}.lora_A.weight": A2, f"{proj}.lora_B.weight": B2}, str(tmp_path / "c.safetensors"))
    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))

    def want(qkv_scale, proj_scale):
        out = {k: v.double() for k, v in base.items()}
        delta = B1.double() @ A1.double() * qkv_scale
        for i, p in enumerate("qkv"):
            out[f"transformer_blocks.0.attn.to_{p}.weight"] += delta[i * D:(i + 1) * D]
        out["transformer_blocks.0.attn.to_add_out.weight"] += B2.double() @ A2.double() * proj_scale
        return out

    run = loraops_run("inspect", tmp_path / "c.safetensors")
    assert run.returncode == 0, run.stderr
    assert loraops_run("register", tmp_path / "c.safetensors", "--name", "c8", "--alpha", "8").returncode == 0
    for source, scales in [(tmp_path / "c.safetensors", (2 / R, 1.0)), ("c8", (8 / R, 8 / R))]:
        run = loraops_run("merge", source, "--into", pipe, "-o", tmp_path / "m", "--precise", "--no-record", "--force")
        assert run.returncode == 0, run.stderr
        check_merged(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors", want(*scales))


ONETRAINER = {  # OneTrainer's names of a diffusers FLUX transformer: (rows, columns, alpha)
    "lora_transformer_transformer_blocks_0_attn_to_q": (D, D, 2.0),
    "lora_transformer_transformer_blocks_0_attn_add_k_proj": (D, D, 8.0),
    "lora_transformer_transformer_blocks_0_attn_to_out_0": (D, D, 1.0),
    "lora_transformer_transformer_blocks_0_attn_to_add_out": (D, D, 4.0),
    "lora_transformer_single_transformer_blocks_0_attn_to_v": (D, D, 2.0),
    "lora_transformer_proj_out": (16, D, 4.0), "lora_transformer_x_embedder": (D, 16, 2.0),
    "lora_transformer_context_embedder": (D, 32, 8.0),
}


def test_onetrainer_flux_lora_merges_as_diffusers_converts_it(tmp_path):
    """OneTrainer's lora_transformer_ names (a FLUX transformer's diffusers paths) matched nothing in a pipeline."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from test_ldm import FLUX, checkpoint
    from test_pipeline_dit import lora

    pipe = flux_pipeline(tmp_path / "pipe")
    factors = lora(ONETRAINER, seed=9)
    save_file(factors, str(tmp_path / "o.safetensors"))
    converted = _convert_kohya_flux_lora_to_diffusers({k: v.double() for k, v in factors.items()})
    assert len(converted) == 2 * len(ONETRAINER)
    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    run = loraops_run("merge", tmp_path / "o.safetensors", "--into", pipe, "-o", tmp_path / "m", "--precise",
                      "--no-record")
    assert run.returncode == 0, run.stderr
    merged = check_merged(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors",
                          merged_as_diffusers(base, converted))
    assert sum(not torch.equal(merged[k], base[k]) for k in base) == len(ONETRAINER)

    # a BFL single-file checkpoint: q, add_k and single v bind to rows of the fused qkv/linear1
    flux = checkpoint(tmp_path / "flux.safetensors", FLUX)
    save_file(lora({"lora_transformer_transformer_blocks_0_attn_to_q": (16, 16, 2.0),
                    "lora_transformer_transformer_blocks_0_attn_add_k_proj": (16, 16, 2.0),
                    "lora_transformer_single_transformer_blocks_0_attn_to_v": (16, 16, 2.0)}), str(tmp_path / "s.safetensors"))
    run = loraops_run("check", tmp_path / "s.safetensors", "--base", flux)
    assert run.returncode == 0 and "3/3 modules match" in run.stdout, run.stdout + run.stderr


def test_kohya_factor_names_behind_a_pipeline_component(tmp_path):
    """``transformer.<path>.lora_down.weight`` / ``.lora_up.weight`` (+ ``.alpha``), as some Civitai FLUX files hold
    them (diffusers renames them lora_A/lora_B), and ``unet.``/``text_encoder.`` the same: read as the diffusers file
    with PEFT's names; they were refused (unknown keys in a kohya LoRA file)."""
    from loraops import formats

    pipe = flux_pipeline(tmp_path / "pipe")
    g = torch.Generator().manual_seed(11)
    q, mlp = "transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.proj_mlp"
    tensors = {f"{q}.lora_down.weight": torch.randn(R, D, generator=g), f"{q}.lora_up.weight": torch.randn(D, R, generator=g),
               f"{q}.alpha": torch.tensor(2.0), f"{mlp}.lora_down.weight": torch.randn(R, D, generator=g),
               f"{mlp}.lora_up.weight": torch.randn(4 * D, R, generator=g)}
    save_file(tensors, str(tmp_path / "k.safetensors"))
    save_file({k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in tensors.items()},
              str(tmp_path / "p.safetensors"))
    ours, peft_named = formats.read_adapter(tmp_path / "k.safetensors"), formats.read_adapter(tmp_path / "p.safetensors")
    assert ours.format == "diffusers" and ours.modules.keys() == peft_named.modules.keys() == {q, mlp}
    for name, module in ours.modules.items():
        assert torch.equal(module.delta(), peft_named.modules[name].delta()) and module.scale == peft_named.modules[name].scale

    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    want = {k: v.double() for k, v in base.items()}
    want["transformer_blocks.0.attn.to_q.weight"] += tensors[f"{q}.lora_up.weight"].double() @ tensors[f"{q}.lora_down.weight"].double() * 2 / R
    want["single_transformer_blocks.0.proj_mlp.weight"] += (tensors[f"{mlp}.lora_up.weight"].double()
                                                           @ tensors[f"{mlp}.lora_down.weight"].double())
    run = loraops_run("merge", tmp_path / "k.safetensors", "--into", pipe, "-o", tmp_path / "m", "--precise", "--no-record")
    assert run.returncode == 0, run.stderr
    check_merged(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors", want)

    both = {**tensors, f"{q}.lora_A.weight": tensors[f"{q}.lora_down.weight"].clone()}
    save_file(both, str(tmp_path / "b.safetensors"))
    run = loraops_run("inspect", tmp_path / "b.safetensors")
    assert run.returncode == 2 and "both lora_A/lora_B and lora_down/lora_up" in run.stderr, run.stderr


def test_xlabs_lora_pushed_as_diffusers_is_written_in_diffusers_layout(tmp_path, fake_hub):
    """A registered XLabs file reads as a diffusers adapter; pushed as diffusers it is the file diffusers' converter
    makes of it, not the stored XLabs bytes under a diffusers model card."""
    from loraops import formats, hub
    from loraops.registry import Registry

    xlabs_file(tmp_path / "x.safetensors")
    with Registry.open() as reg:
        reg.add_adapter(tmp_path / "x.safetensors", name="xl")
        for fmt in (None, "diffusers"):
            done = hub.push(reg, "xl", "me/xl", fmt=fmt, token="hf_owner")
            assert done.format == "diffusers"
            [name] = [f for f in done.files if f.endswith(".safetensors")]
            pushed = tmp_path / f"pushed-{fmt}.safetensors"
            pushed.write_bytes(fake_hub.files("me/xl")[name])
            assert formats.detect(pushed) == "diffusers"
            assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in load_file(str(pushed))


def test_inspect_and_check_note_a_missing_alpha_the_metadata_gives_otherwise(tmp_path):
    """A kohya file whose modules lack .alpha while ss_network_alpha says 1: read at alpha = rank as sd-scripts
    reads it (test_formats_kohya), and inspect and check say so on stderr."""
    import factories

    base = factories.save_state_dict(factories.conv_embedding_model(), tmp_path / "base.safetensors")
    path = factories.kohya_file(tmp_path / "k.safetensors", {"lora_unet_proj": ((16,), (24,))}, rank=4, alpha=None,
                                metadata={"ss_network_alpha": "1"})
    note = (f"note: {path}: no .alpha tensor in 1 of 1 modules (lora_unet_proj, rank 4): they are read at alpha = "
            "rank (scale 1), as kohya's sd-scripts reads them, not at the metadata's ss_network_alpha 1\n")
    inspected = loraops_run("inspect", path)
    assert (inspected.returncode, inspected.stderr) == (0, note) and "\nalpha       4\n" in inspected.stdout
    checked = loraops_run("check", path, "--base", base)
    assert (checked.returncode, checked.stderr) == (0, note)
