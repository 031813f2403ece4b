"""LoRAs on a FLUX.1 / SD3 single-file checkpoint's modules (sd-scripts' ``lora_unet_double_blocks_0_img_attn_qkv``,
BFL's ``diffusion_model.double_blocks.0.img_attn.qkv``) against a diffusers pipeline folder, whose transformer holds
qkv and linear1 in parts (to_q, to_k, to_v, proj_mlp): they bind, and merge to the float64 reference computed here
by splitting B's rows as diffusers' kohya FLUX converter does. They did not fit ("0/5 modules match")."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import loraops_run

D, R = 32, 4


def flux_pipeline(root):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    return root


def sd3_pipeline(root):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    return root


def lora(names: dict[str, tuple[int, int, float]], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (rows, cols, alpha) in names.items():
        out[f"{name}.lora_down.weight"] = torch.randn(R, cols, generator=g).half()
        out[f"{name}.lora_up.weight"] = (torch.randn(rows, R, generator=g) * 0.1).half()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def expected(base: dict, factors: dict, targets: dict[str, list[tuple[str, int, int]]]) -> dict[str, torch.Tensor]:
    """base + Σ (alpha/r)·B[rows]·A in float64, each kohya module's B rows going to the diffusers tensors listed."""
    out = {k: v.double() for k, v in base.items()}
    for name, parts in targets.items():
        A, B = factors[f"{name}.lora_down.weight"].double(), factors[f"{name}.lora_up.weight"].double()
        B = B * float(factors[f"{name}.alpha"]) / R
        for tensor, first, rows in parts:
            out[tensor] = out[tensor] + B[first:first + rows] @ A
    return out


FLUX_KOHYA = {  # kohya name: (rows, columns, alpha), and the diffusers tensors its rows go to
    "lora_unet_double_blocks_0_img_attn_qkv": ((3 * D, D, 2.0), [
        (f"transformer_blocks.0.attn.to_{p}.weight", i * D, D) for i, p in enumerate("qkv")]),
    "lora_unet_double_blocks_0_txt_attn_qkv": ((3 * D, D, 4.0), [
        (f"transformer_blocks.0.attn.add_{p}_proj.weight", i * D, D) for i, p in enumerate("qkv")]),
    "lora_unet_double_blocks_0_txt_attn_proj": ((D, D, 8.0), [("transformer_blocks.0.attn.to_add_out.weight", 0, D)]),
    "lora_unet_double_blocks_0_img_mlp_0": ((4 * D, D, 4.0), [("transformer_blocks.0.ff.net.0.proj.weight", 0, 4 * D)]),
    "lora_unet_single_blocks_0_linear1": ((7 * D, D, 1.0), [
        *((f"single_transformer_blocks.0.attn.to_{p}.weight", i * D, D) for i, p in enumerate("qkv")),
        ("single_transformer_blocks.0.proj_mlp.weight", 3 * D, 4 * D)]),
    "lora_unet_single_blocks_0_linear2": ((D, 5 * D, 4.0), [("single_transformer_blocks.0.proj_out.weight", 0, D)]),
}


def check_merged(out_file, want):
    merged = load_file(str(out_file))
    assert merged.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.allclose(merged[name].double(), tensor, atol=1e-6, rtol=0), name
    return merged


def test_kohya_flux_lora_merges_into_a_diffusers_pipeline(tmp_path):
    pipe = flux_pipeline(tmp_path / "pipe")
    factors = lora({name: shape for name, (shape, _) in FLUX_KOHYA.items()})
    save_file(factors, str(tmp_path / "k.safetensors"), {"ss_network_module": "networks.lora_flux"})
    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    want = expected(base, factors, {name: parts for name, (_, parts) in FLUX_KOHYA.items()})

    run = loraops_run("check", tmp_path / "k.safetensors", "--base", pipe)
    assert run.returncode == 0, run.stderr
    assert "13/13 modules match" in run.stdout  # the two qkv and linear1 as their 3, 3 and 4 parts
    run = loraops_run("merge", tmp_path / "k.safetensors", "--into", pipe, "-o", tmp_path / "m", "--precise",
                      "--no-record")
    assert run.returncode == 0, run.stderr
    merged = check_merged(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors", want)
    assert sum(not torch.equal(merged[k], base[k]) for k in base) == 13

    # registered against the pipeline: bound to its parts; written as diffusers, the parts; as kohya, the parts
    # joined back into the file's own modules (they were refused: "no kohya names of its own")
    assert loraops_run("base", "add", pipe, "--name", "flux").returncode == 0
    run = loraops_run("register", tmp_path / "k.safetensors", "--name", "k", "--base", "flux")
    assert run.returncode == 0, run.stderr
    run = loraops_run("export", "k", "--format", "diffusers", "-o", tmp_path / "d.safetensors")
    assert run.returncode == 0, run.stderr
    written = load_file(str(tmp_path / "d.safetensors"))
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in written
    assert_round_trip(tmp_path, "k", factors)


def assert_round_trip(tmp_path, ref, factors):
    """``ref`` (registered against a pipeline) written as kohya is the kohya file it was read from: names, values,
    alphas."""
    run = loraops_run("export", ref, "--format", "kohya", "-o", tmp_path / "back.safetensors")
    assert run.returncode == 0, run.stderr
    written = load_file(str(tmp_path / "back.safetensors"))
    assert sorted(written) == sorted(factors)
    for key, tensor in factors.items():
        assert torch.equal(written[key].to(tensor.dtype), tensor), key


def test_bfl_named_flux_lora_merges_into_a_diffusers_pipeline(tmp_path):
    """BFL's layout (PEFT keys behind diffusion_model., as ComfyUI-trained FLUX LoRAs), alpha given."""
    pipe = flux_pipeline(tmp_path / "pipe")
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(R, D, generator=g), torch.randn(7 * D, R, generator=g) * 0.1
    save_file({"diffusion_model.single_blocks.0.linear1.lora_A.weight": A,
               "diffusion_model.single_blocks.0.linear1.lora_B.weight": B}, str(tmp_path / "b.safetensors"))
    assert loraops_run("base", "add", pipe, "--name", "flux").returncode == 0
    run = loraops_run("register", tmp_path / "b.safetensors", "--name", "b", "--alpha", "2", "--base", "flux")
    assert run.returncode == 0, run.stderr
    run = loraops_run("merge", "b", "--into", pipe, "-o", tmp_path / "m", "--precise", "--no-record")
    assert run.returncode == 0, run.stderr
    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    want = {k: v.double() for k, v in base.items()}
    delta = B.double() @ A.double() * 2 / R
    for i, part in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
        want[f"single_transformer_blocks.0.{part}.weight"] += delta[i * D:(i + 1) * D]
    want["single_transformer_blocks.0.proj_mlp.weight"] += delta[3 * D:]
    check_merged(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors", want)


def test_kohya_sd3_lora_merges_into_a_diffusers_pipeline(tmp_path):
    pipe = sd3_pipeline(tmp_path / "pipe")
    width = 32
    modules = {
        "lora_unet_joint_blocks_0_x_block_attn_qkv": ((3 * width, width, 2.0), [
            (f"transformer_blocks.0.attn.to_{p}.weight", i * width, width) for i, p in enumerate("qkv")]),
        "lora_unet_joint_blocks_0_context_block_attn_qkv": ((3 * width, width, 4.0), [
            (f"transformer_blocks.0.attn.add_{p}_proj.weight", i * width, width) for i, p in enumerate("qkv")]),
        "lora_unet_joint_blocks_1_x_block_mlp_fc1": ((4 * width, width, 4.0), [
            ("transformer_blocks.1.ff.net.0.proj.weight", 0, 4 * width)]),
        # sd-scripts' lora_sd3 trains the adaLN too; a context block's (but the last's) is norm1_context row for row
        "lora_unet_joint_blocks_0_context_block_adaLN_modulation_1": ((6 * width, width, 2.0), [
            ("transformer_blocks.0.norm1_context.linear.weight", 0, 6 * width)]),
        "lora_unet_joint_blocks_0_x_block_adaLN_modulation_1": ((6 * width, width, 8.0), [
            ("transformer_blocks.0.norm1.linear.weight", 0, 6 * width)]),
    }
    factors = lora({name: shape for name, (shape, _) in modules.items()}, seed=5)
    save_file(factors, str(tmp_path / "k.safetensors"), {"ss_network_module": "networks.lora_sd3"})
    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    want = expected(base, factors, {name: parts for name, (_, parts) in modules.items()})
    run = loraops_run("merge", tmp_path / "k.safetensors", "--into", pipe, "-o", tmp_path / "m", "--precise",
                      "--no-record")
    assert run.returncode == 0, run.stderr
    check_merged(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors", want)


@pytest.mark.parametrize("name", ["lora_unet_double_blocks_7_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_nope"])
def test_a_module_the_pipeline_lacks_is_still_reported_missing(tmp_path, name):
    pipe = flux_pipeline(tmp_path / "pipe")
    save_file(lora({name: (3 * D, D, 2.0)}), str(tmp_path / "k.safetensors"))
    run = loraops_run("check", tmp_path / "k.safetensors", "--base", pipe)
    assert run.returncode != 0 and f"{name} (not in base)" in run.stdout, run.stdout + run.stderr


def test_text_encoder_modules_beside_the_transformer(tmp_path):
    """sd-scripts' lora_flux names FluxPipeline's CLIP lora_te1 and its T5 (the pipeline's text_encoder_2) lora_te3;
    both bind beside the transformer's modules (lora_te3 matched nothing). A module the base lacks is the only one
    reported."""
    pipe = flux_pipeline(tmp_path / "pipe")
    g = torch.Generator().manual_seed(9)
    encoders = {"text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(D, D, generator=g)},
                "text_encoder_2": {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(D, D, generator=g),
                                   "shared.weight": torch.randn(10, D, generator=g)}}
    for component, tensors in encoders.items():
        (pipe / component).mkdir()
        save_file(tensors, str(pipe / component / "model.safetensors"))
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"]}))
    modules = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (D, D, 2.0),
               "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (D, D, 8.0),
               "lora_unet_double_blocks_0_img_attn_qkv": (3 * D, D, 4.0)}
    factors = lora(modules, seed=11)
    save_file(factors, str(tmp_path / "k.safetensors"), {"ss_network_module": "networks.lora_flux"})
    run = loraops_run("merge", tmp_path / "k.safetensors", "--into", pipe, "-o", tmp_path / "m", "--precise",
                      "--no-record")
    assert run.returncode == 0, run.stderr
    want = expected(encoders["text_encoder_2"], factors,
                    {"lora_te3_encoder_block_0_layer_0_SelfAttention_q": [
                        ("encoder.block.0.layer.0.SelfAttention.q.weight", 0, D)]})
    check_merged(tmp_path / "m" / "text_encoder_2" / "model.safetensors", want)
    want = expected(encoders["text_encoder"], factors,
                    {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": [
                        ("text_model.encoder.layers.0.self_attn.q_proj.weight", 0, D)]})
    check_merged(tmp_path / "m" / "text_encoder" / "model.safetensors", want)
    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    want = expected(base, factors, {"lora_unet_double_blocks_0_img_attn_qkv": [
        (f"transformer_blocks.0.attn.to_{p}.weight", i * D, D) for i, p in enumerate("qkv")]})
    check_merged(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors", want)

    save_file(lora({**modules, "lora_te1_text_model_encoder_layers_5_mlp_fc1": (D, D, 1.0)}, seed=11),
              str(tmp_path / "k2.safetensors"))
    run = loraops_run("check", tmp_path / "k2.safetensors", "--base", pipe)
    assert run.returncode != 0 and "5/6 modules match" in run.stdout, run.stdout  # (qkv as its 3 parts)
    assert "lora_te1_text_model_encoder_layers_5_mlp_fc1 (not in base)" in run.stdout


def test_flux_t5_modules_are_written_back_as_lora_te3(tmp_path):
    """A lora_te3_ (FLUX T5) module bound to FluxPipeline's text_encoder_2 was written as kohya lora_te2_…, which
    sd-scripts' lora_flux (lora_te1 CLIP, lora_te3 T5) does not load: it round-trips under its own prefix now."""
    pipe = tmp_path / "pipe"
    (pipe / "text_encoder_2").mkdir(parents=True)
    g = torch.Generator().manual_seed(2)
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(D, D, generator=g)},
              str(pipe / "text_encoder_2" / "model.safetensors"))
    (pipe / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "text_encoder_2": ["transformers", "T5EncoderModel"]}))
    name = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    factors = lora({name: (D, D, 2.0)})
    save_file(factors, str(tmp_path / "k.safetensors"), {"ss_network_module": "networks.lora_flux"})
    assert loraops_run("base", "add", pipe, "--name", "p").returncode == 0
    run = loraops_run("export", tmp_path / "k.safetensors", "--base", "p", "--format", "kohya",
                      "-o", tmp_path / "o.safetensors")
    assert run.returncode == 0, run.stderr
    written = load_file(str(tmp_path / "o.safetensors"))
    assert sorted(written) == sorted(factors)
    assert all(torch.equal(written[k].to(factors[k].dtype), factors[k]) for k in factors)


@pytest.mark.parametrize("pipeline", ["StableDiffusionXLPipeline", "StableDiffusion3Pipeline"])
def test_clip_g_text_projection_stays_lora_te2(tmp_path, pipeline):
    """SDXL's and SD3's text_encoder_2 is CLIP-G (CLIPTextModelWithProjection): its text_projection is no CLIP layer
    path, yet no T5 module either; it was written lora_te3_text_projection (the T5's prefix), which ComfyUI (it maps
    lora_te2_text_projection) does not load."""
    pipe = tmp_path / "pipe"
    g = torch.Generator().manual_seed(4)
    index = {"_class_name": pipeline}
    for component in ("text_encoder", "text_encoder_2"):
        (pipe / component).mkdir(parents=True)
        save_file({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(D, D, generator=g),
                   "text_projection.weight": torch.randn(D, D, generator=g)}, str(pipe / component / "model.safetensors"))
        index[component] = ["transformers", "CLIPTextModelWithProjection"]
    (pipe / "model_index.json").write_text(json.dumps(index))
    factors = lora({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (D, D, 2.0),
                    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (D, D, 2.0),
                    "lora_te2_text_projection": (D, D, 4.0)})
    save_file(factors, str(tmp_path / "k.safetensors"))
    assert loraops_run("base", "add", pipe, "--name", "p").returncode == 0
    run = loraops_run("export", tmp_path / "k.safetensors", "--base", "p", "--format", "kohya",
                      "-o", tmp_path / "o.safetensors")
    assert run.returncode == 0, run.stderr
    assert sorted(load_file(str(tmp_path / "o.safetensors"))) == sorted(factors)


def test_every_sd_scripts_flux_module_merges_as_diffusers_converts_it(tmp_path):
    """Independent of the row table here: diffusers' own kohya FLUX converter (its linear1 split is hard-wired to
    FLUX.1-dev's 3072 width, so linear1 is left to the test above) gives the reference for every other module
    sd-scripts' lora_flux trains — the modulations (img_mod.lin → norm1.linear, no shift/scale swap; the final
    layer's adaLN → norm_out.linear with its shift and scale halves swapped), linear2 → proj_out whole, the embedders.
    The final layer's alphas are r: diffusers' converter drops their alpha."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    pipe = flux_pipeline(tmp_path / "pipe")
    block = {"img_attn_qkv": 3 * D, "txt_attn_qkv": 3 * D, "img_attn_proj": D, "txt_attn_proj": D, "img_mlp_0": 4 * D,
             "txt_mlp_0": 4 * D, "img_mod_lin": 6 * D, "txt_mod_lin": 6 * D}
    modules = {**{f"lora_unet_double_blocks_0_{n}": (rows, D, 2.0 + i) for i, (n, rows) in enumerate(block.items())},
               "lora_unet_double_blocks_0_img_mlp_2": (D, 4 * D, 4.0), "lora_unet_double_blocks_0_txt_mlp_2": (D, 4 * D, 1.0),
               "lora_unet_single_blocks_0_linear2": (D, 5 * D, 8.0), "lora_unet_single_blocks_0_modulation_lin": (3 * D, D, 2.0),
               "lora_unet_img_in": (D, 16, 2.0), "lora_unet_txt_in": (D, 32, 1.0), "lora_unet_time_in_in_layer": (D, 256, 2.0),
               "lora_unet_time_in_out_layer": (D, D, 2.0), "lora_unet_vector_in_in_layer": (D, 32, 8.0),
               "lora_unet_vector_in_out_layer": (D, D, 2.0), "lora_unet_final_layer_linear": (16, D, float(R)),
               "lora_unet_final_layer_adaLN_modulation_1": (2 * D, D, float(R))}
    factors = lora(modules, seed=4)
    save_file(factors, str(tmp_path / "k.safetensors"), {"ss_network_module": "networks.lora_flux"})
    converted = _convert_kohya_flux_lora_to_diffusers({k: v.double() for k, v in factors.items()})
    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    want = {k: v.double() for k, v in base.items()}
    for key, A in converted.items():
        if key.endswith(".lora_A.weight"):
            tensor = key.removeprefix("transformer.").replace(".lora_A.weight", ".weight")
            want[tensor] = want[tensor] + converted[key.replace(".lora_A.", ".lora_B.")] @ A
    run = loraops_run("merge", tmp_path / "k.safetensors", "--into", pipe, "-o", tmp_path / "m", "--precise",
                      "--no-record")
    assert run.returncode == 0, run.stderr
    merged = check_merged(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors", want)
    assert sum(not torch.equal(merged[k], base[k]) for k in base) == len(modules) + 4  # (the qkv as 3 parts each)


def test_sd3_swapped_adalns_merge_as_diffusers_converts_them(tmp_path):
    """The last joint block's context adaLN and the final layer's, whose shift and scale halves diffusers' single-file
    converter swaps (swap_scale_shift), bind to the pipeline with B's halves swapped: the merged weights are the
    converter's swap of the checkpoint's merged ones. They were not bound, and every other module with them."""
    from diffusers.loaders.single_file_utils import swap_scale_shift

    pipe = sd3_pipeline(tmp_path / "pipe")
    width = 32
    modules = {"lora_unet_joint_blocks_1_context_block_adaLN_modulation_1": (2 * width, width, 2.0),
               "lora_unet_final_layer_adaLN_modulation_1": (2 * width, width, 8.0),
               "lora_unet_joint_blocks_0_context_block_adaLN_modulation_1": (6 * width, width, 4.0)}
    targets = {"lora_unet_joint_blocks_1_context_block_adaLN_modulation_1": "transformer_blocks.1.norm1_context.linear",
               "lora_unet_final_layer_adaLN_modulation_1": "norm_out.linear",
               "lora_unet_joint_blocks_0_context_block_adaLN_modulation_1": "transformer_blocks.0.norm1_context.linear"}
    factors = lora(modules, seed=6)
    save_file(factors, str(tmp_path / "k.safetensors"), {"ss_network_module": "networks.lora_sd3"})
    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    want = {k: v.double() for k, v in base.items()}
    for name, target in targets.items():
        delta = factors[f"{name}.lora_up.weight"].double() @ factors[f"{name}.lora_down.weight"].double()
        delta = delta * float(factors[f"{name}.alpha"]) / R
        swapped = "blocks_0" not in name
        # what the checkpoint's weight + delta converts to, less what its weight converts to
        want[f"{target}.weight"] += swap_scale_shift(delta, dim=width) if swapped else delta
    run = loraops_run("check", tmp_path / "k.safetensors", "--base", pipe)
    assert run.returncode == 0 and "3/3 modules match" in run.stdout, run.stdout + run.stderr
    run = loraops_run("merge", tmp_path / "k.safetensors", "--into", pipe, "-o", tmp_path / "m", "--precise",
                      "--no-record")
    assert run.returncode == 0, run.stderr
    check_merged(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors", want)
    # written back as kohya: the halves swapped back, qkv joined (A shared, B's rows stacked: the rank kept)
    factors.update(lora({"lora_unet_joint_blocks_1_x_block_attn_qkv": (3 * width, width, 2.0)}, seed=7))
    save_file(factors, str(tmp_path / "k.safetensors"), {"ss_network_module": "networks.lora_sd3"})
    assert loraops_run("base", "add", pipe, "--name", "sd3").returncode == 0
    run = loraops_run("register", tmp_path / "k.safetensors", "--name", "k", "--base", "sd3")
    assert run.returncode == 0, run.stderr
    assert_round_trip(tmp_path, "k", factors)


def test_swapped_adaln_lora_bias_and_magnitude_rows_swap_too(tmp_path):
    """BFL-layout PEFT keys on FLUX's final adaLN with lora_B's bias and a DoRA magnitude: both are per output row,
    so they swap with B (PEFT's merge of the checkpoint's layer, then diffusers' swap of weight and bias)."""
    from diffusers.loaders.single_file_utils import swap_scale_shift

    pipe = flux_pipeline(tmp_path / "pipe")
    g = torch.Generator().manual_seed(8)
    A, B = torch.randn(R, D, generator=g).double(), torch.randn(2 * D, R, generator=g).double() * 0.1
    bias = torch.randn(2 * D, generator=g).double()
    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    W = swap_scale_shift(base["norm_out.linear.weight"].double(), dim=D)  # the checkpoint's weight
    magnitude = (W + B @ A).norm(dim=1) * (1 + 0.1 * torch.rand(2 * D, generator=g).double())
    key = "diffusion_model.final_layer.adaLN_modulation.1"
    assert loraops_run("base", "add", pipe, "--name", "flux").returncode == 0
    # (with a block's module beside it: an adapter of top-level modules alone is not taken for FLUX's, DIT_NAMED)
    block = {"diffusion_model.single_blocks.0.linear2.lora_A.weight": torch.zeros(R, 5 * D, dtype=torch.float64),
             "diffusion_model.single_blocks.0.linear2.lora_B.weight": torch.zeros(D, R, dtype=torch.float64)}
    for dora in (False, True):
        tensors = {**block, f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B, f"{key}.lora_B.bias": bias}
        if dora:
            tensors = {**block, f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B,
                       f"{key}.lora_magnitude_vector": magnitude,
                       "diffusion_model.single_blocks.0.linear2.lora_magnitude_vector":  # (its weight's norms: unchanged)
                           base["single_transformer_blocks.0.proj_out.weight"].double().norm(dim=1)}
        save_file(tensors, str(tmp_path / f"b{dora}.safetensors"))
        run = loraops_run("register", tmp_path / f"b{dora}.safetensors", "--name", f"b{dora}", "--alpha", str(R),
                          "--base", "flux")
        assert run.returncode == 0, run.stderr
        run = loraops_run("merge", f"b{dora}", "--into", pipe, "-o", tmp_path / f"m{dora}", "--precise", "--no-record")
        assert run.returncode == 0, run.stderr
        want = {k: v.double() for k, v in base.items()}
        merged = W + B @ A
        if dora:
            merged = merged * (magnitude / merged.norm(dim=1))[:, None]
        else:
            want["norm_out.linear.bias"] += swap_scale_shift(bias, dim=D)
        want["norm_out.linear.weight"] = swap_scale_shift(merged, dim=D)
        check_merged(tmp_path / f"m{dora}" / "transformer" / "diffusion_pytorch_model.safetensors", want)


def test_one_block_module_the_pipeline_lacks_is_reported_alone(tmp_path):
    """A block module the pipeline has no tensor for is the one module reported; the others bind (all were reported
    "not in base" with it), and merge names that one alone."""
    pipe = sd3_pipeline(tmp_path / "pipe")
    wrong = "lora_unet_joint_blocks_0_x_block_attn_nope"
    save_file(lora({"lora_unet_joint_blocks_0_x_block_attn_qkv": (96, 32, 2.0), wrong: (64, 32, 1.0)}),
              str(tmp_path / "k.safetensors"))
    run = loraops_run("check", tmp_path / "k.safetensors", "--base", pipe)
    assert run.returncode != 0 and "3/4 modules match" in run.stdout, run.stdout  # (qkv as its 3 parts)
    assert run.stdout.count("(not in base)") == 1 and f"{wrong} (not in base)" in run.stdout, run.stdout
    run = loraops_run("merge", tmp_path / "k.safetensors", "--into", pipe, "-o", tmp_path / "m", "--no-record")
    assert run.returncode != 0 and f"1 module does not fit base {pipe}: {wrong} (not in base)" in run.stderr
    assert not (tmp_path / "m").exists()


def test_a_pipeline_bound_adapter_computed_without_some_modules_is_written_as_kohya(tmp_path):
    """A computation that drops modules it finds empty (algebra.Derivation.dropped, as extract's zero deltas) while
    a pipeline-bound adapter is written as kohya: the write renames each module to the checkpoint's, and it read no
    ``dropped`` from the renaming ('… was announced and never came'); a qkv one of whose parts is dropped is written
    from the others (it waited for all three, and was silently left out)."""
    from loraops import formats
    from loraops.algebra import Derivation
    from loraops.basemodel import BaseModel
    from loraops.check import bind

    pipe = flux_pipeline(tmp_path / "pipe")
    factors = lora({name: shape for name, (shape, _) in FLUX_KOHYA.items()})
    save_file(factors, str(tmp_path / "k.safetensors"), {"ss_network_module": "networks.lora_flux"})
    bound = bind(formats.read_adapter(tmp_path / "k.safetensors"), BaseModel.open(pipe))
    dropped = {"transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_add_out"}
    stand_ins = replace(bound, modules={n: m.stand_in() for n, m in bound.modules.items()})
    kept = (m for n, m in bound.modules.items() if n not in dropped)
    formats.write(stand_ins, tmp_path / "out.safetensors", "kohya",
                  modules=Derivation(stand_ins, kept, lambda *_: None, dropped=dropped))
    written = load_file(str(tmp_path / "out.safetensors"))
    want = {k: v for k, v in factors.items() if not k.startswith("lora_unet_double_blocks_0_txt_attn_proj")}
    assert sorted(written) == sorted(want)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    delta = factors[f"{qkv}.lora_up.weight"].double() @ factors[f"{qkv}.lora_down.weight"].double() * 2 / R
    delta[:D] = 0  # (to_q's rows)
    got = written[f"{qkv}.lora_up.weight"].double() @ written[f"{qkv}.lora_down.weight"].double() \
        * float(written[f"{qkv}.alpha"]) / written[f"{qkv}.lora_down.weight"].shape[0]
    assert torch.allclose(got, delta, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name, rows, tensor, how", [
    ("lora_unet_final_layer_adaLN_modulation_1", 2 * D, "final_layer.adaLN_modulation.1.weight",
     "with its halves swapped"),
    ("lora_unet_double_blocks_0_img_attn_qkv", 3 * D, "double_blocks.0.img_attn.qkv.weight", "in parts")])
def test_a_loha_where_the_pipeline_moves_rows_is_refused(tmp_path, name, rows, tensor, how):
    """A LoHa's ΔW is no B·A whose rows can be cut or swapped: on a tensor the pipeline holds in parts or with its
    shift and scale halves swapped, it is refused in one line (bound to the single-file checkpoint, it merges)."""
    pipe = flux_pipeline(tmp_path / "pipe")
    g = torch.Generator().manual_seed(5)
    loha = {f"{name}.hada_w{i}_a": torch.randn(rows, 2, generator=g) for i in (1, 2)}
    loha.update({f"{name}.hada_w{i}_b": torch.randn(2, D, generator=g) for i in (1, 2)})
    loha[f"{name}.alpha"] = torch.tensor(2.0)
    loha.update(lora({"lora_unet_double_blocks_0_txt_attn_proj": (D, D, 8.0)}))
    save_file(loha, str(tmp_path / "h.safetensors"), {"ss_network_module": "lycoris.kohya"})
    want = (f"error: {tmp_path / 'h.safetensors'}: module {name!r} is a LoHa/LoKr on "
            f"'{tensor}', which the pipeline stores {how}: bind it to the single-file checkpoint\n")
    for args in (("check", tmp_path / "h.safetensors", "--base", pipe),
                 ("merge", tmp_path / "h.safetensors", "--into", pipe, "-o", tmp_path / "m", "--no-record")):
        run = loraops_run(*args)
        assert (run.returncode, run.stdout, run.stderr) == (2, "", want)
        assert not (tmp_path / "m").exists()
