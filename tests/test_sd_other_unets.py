"""SD-family UNets that are none of SD 1.x/2.x/XL (ldm.OTHER_UNETS): the SD x4 upscaler's, AudioLDM's and Stable Video
Diffusion's, in their single-file (LDM/SGM) layout. Each was read as SDXL (the x4 upscaler's and AudioLDM's first
output level attends, as SDXL's; SVD's image encoder sits under conditioner.embedders.) or, beside a
cond_stage_model., as SD 2.x: sd-scripts' header and names of a model it has none for.

The reference for the x4 upscaler's and AudioLDM's diffusers names is diffusers' single-file converter
(convert_ldm_unet_checkpoint, which maps the upscaler's label_emb.weight to class_embedding.weight) and AudioLDM's
conversion script (scripts/convert_original_audioldm_to_diffusers.py: SD's table, film_emb → class_embedding).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from loraops import ldm
from test_extract import run
from test_ldm import reference_checkpoint_name, reference_table

# four levels, attention in the last three (the x4 upscaler's attention_resolutions [2, 4, 8]; AudioLDM's [8, 4, 2])
LAYOUT = dict(down=4, attention_down=lambda i: i > 0, attention_up=lambda i: i < 3, upsampler_slot=lambda i: 2)
OWN = {"x4": ("label_emb", {"num_class_embeds": 5}),
       "audioldm": ("film_emb", {"class_embed_type": "simple_projection", "projection_class_embeddings_input_dim": 6})}


def tiny_unet(kind):
    """A tiny diffusers UNet of the x4 upscaler's or AudioLDM's kind, and its state under the original names."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    own, config = OWN[kind]
    unet = UNet2DConditionModel(sample_size=8, in_channels=7 if kind == "x4" else 8, out_channels=4, layers_per_block=2,
                                cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4,
                                block_out_channels=(8, 16, 16, 24), **config,
                                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                                up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",))
    table = reference_table(**LAYOUT)
    original = {}
    for key, value in unet.state_dict().items():
        module, leaf = key.rsplit(".", 1)
        name = own if module == "class_embedding" else reference_checkpoint_name(module, table)
        original[f"model.diffusion_model.{name}.{leaf}"] = (key, value.detach().clone())
    return original


@pytest.mark.parametrize("kind", ["x4", "audioldm"])
def test_the_x4_upscaler_and_audioldm_are_no_sd_or_sdxl_and_keep_their_diffusers_names(kind):
    """diffusers names each module as loraops does (the converter on tensors valued by their source's number), but
    neither UNet is SDXL's or SD 1.x/2.x's: no version is recorded (it was sdxl_base_v1-0), the UNet is named in
    the header instead."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    original = tiny_unet(kind)
    own = f"model.diffusion_model.{OWN[kind][0]}"
    ids = {name: i for i, name in enumerate(original)}
    # AudioLDM's film_emb is its conversion script's addition to the converter's table (class_embedding)
    converted = convert_ldm_unet_checkpoint(
        {n: torch.full(t.shape, float(ids[n])) for n, (_, t) in original.items() if kind == "x4" or not n.startswith(own)},
        {"layers_per_block": 2, "num_class_embeds": 5 if kind == "x4" else None})
    assert set(converted) | ({"class_embedding.weight", "class_embedding.bias"} if kind == "audioldm" else set()) == {
        key for key, _ in original.values()}
    names = {i: n for n, i in ids.items()}
    sources = {key: names[int(t.flatten()[0])] for key, t in converted.items() if key.endswith(".weight")}
    sources["class_embedding.weight"] = f"{own}.weight"
    ours = ldm.diffusers_names(original)
    assert {key: ours[f"unet.{key.removesuffix('.weight')}"] for key in sources} == {
        key: source.removesuffix(".weight") for key, source in sources.items()}

    assert ldm.other_unet(original).name == {"x4": "SD x4 upscaler", "audioldm": "AudioLDM"}[kind]
    assert ldm.is_sdxl(original) is None
    assert ldm.sd_scripts_metadata(original) == {ldm.OTHER_UNET_KEY: ldm.other_unet(original).name}
    # beside a cond_stage_model. (the upscaler's OpenCLIP-H, AudioLDM's CLAP) it was SD 2.x's sd_v2_v
    encoder = {"x4": "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight",
               "audioldm": "cond_stage_model.model.text_branch.encoder.layer.0.attention.self.query.weight"}[kind]
    assert ldm.sd_scripts_metadata({**original, encoder: None}) == ldm.sd_scripts_metadata(original)


# Stable Video Diffusion's UNet (sgm's VideoUNet): VideoResBlocks and SpatialVideoTransformers, each with a time_stack
# and a time_mixer; its image encoder under conditioner.embedders.
SVD = {f"model.diffusion_model.{name}": shape for name, shape in {
    "input_blocks.0.0.weight": (8, 8, 3, 3), "input_blocks.1.0.in_layers.2.weight": (8, 8, 3, 3),
    "input_blocks.1.0.time_stack.in_layers.2.weight": (8, 8, 3, 1, 1), "input_blocks.1.0.time_mixer.mix_factor": (1,),
    "input_blocks.1.1.proj_in.weight": (8, 8), "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
    "input_blocks.1.1.time_stack.0.attn1.to_q.weight": (8, 8), "input_blocks.1.1.time_mixer.mix_factor": (1,),
    "output_blocks.0.1.transformer_blocks.0.attn2.to_k.weight": (8, 16), "label_emb.0.0.weight": (32, 12),
}.items()} | {"conditioner.embedders.0.open_clip.model.visual.transformer.resblocks.0.mlp.c_fc.weight": (16, 8)}


def test_stable_video_diffusion_is_no_sdxl_and_gets_no_diffusers_names(tmp_path):
    """SVD was SDXL by its conditioner.embedders. (sdxl_base_v1-0, SDXL's names), and its modules got SD's diffusers
    names, which diffusers' UNetSpatioTemporalConditionModel does not have (its resnets are spatial_res_block /
    temporal_res_block, its time_stack temporal_transformer_blocks). No version, no diffusers names; extract writes
    kohya under the checkpoint's paths (what ComfyUI applies), and the diffusers writer refuses it in one line."""
    from loraops.st import read_header

    assert ldm.is_sdxl(SVD) is None
    assert ldm.sd_scripts_metadata(SVD) == {ldm.OTHER_UNET_KEY: "Stable Video Diffusion"}
    assert not any(name.startswith("unet.") for name in ldm.diffusers_names(SVD))

    g = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=g) for name, shape in SVD.items()}
    changed = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.time_stack.0.attn1.to_q"]
    tuned = {k: v.clone() for k, v in base.items()}
    for module in changed:
        tuned[f"model.diffusion_model.{module}.weight"] += torch.outer(torch.randn(8, generator=g), torch.randn(8, generator=g))
    save_file(base, str(tmp_path / "svd.safetensors"))
    save_file(tuned, str(tmp_path / "svd-ft.safetensors"))
    code, out = run("extract", "--base", tmp_path / "svd.safetensors", "--tuned", tmp_path / "svd-ft.safetensors",
                    "--rank", "1", "-o", tmp_path / "x.safetensors")
    assert code == 0, out
    header = read_header(tmp_path / "x.safetensors")
    assert sorted(k.removesuffix(".lora_up.weight") for k in header.tensors if k.endswith(".lora_up.weight")) == [
        f"lora_unet_{m.replace('.', '_')}" for m in sorted(changed)]
    assert header.metadata["ss_base_model_version"] == ""

    assert run("base", "add", tmp_path / "svd.safetensors", "--name", "svd")[0] == 0
    written = tmp_path / "d.safetensors"
    code, out = run("export", tmp_path / "x.safetensors", "--base", "svd", "--format", "diffusers", "-o", written)
    assert (code, out.splitlines()[-1:]) == (2, [
        f"error: {tmp_path / 'x.safetensors'}: model.diffusion_model.{changed[1]}, model.diffusion_model.{changed[0]}: "
        "modules of Stable Video Diffusion's UNet, whose diffusers names are not SD's (loraops translates no other): "
        "write it as kohya or peft (its checkpoint's own names)"]), out
    assert not written.exists()


def test_an_x4_upscaler_unet_alone_is_extracted_under_its_paths_with_no_version(tmp_path):
    """The x4 upscaler's UNet alone was SDXL's by its structure (attention in the first output level): header
    sdxl_base_v1-0. Its kohya names are its checkpoint paths, what ComfyUI applies to it; no version, and an adapter of
    it exported bound keeps them (the header marks the UNet: its few modules look like SDXL's)."""
    from loraops.st import read_header

    base = {name: value for name, (_, value) in tiny_unet("x4").items()}
    tuned = {k: v.clone() for k, v in base.items()}
    module = "output_blocks.0.1.proj_in"
    tuned[f"model.diffusion_model.{module}.weight"] += 0.1
    save_file(base, str(tmp_path / "x4.safetensors"))
    save_file(tuned, str(tmp_path / "x4-ft.safetensors"))
    code, out = run("extract", "--base", tmp_path / "x4.safetensors", "--tuned", tmp_path / "x4-ft.safetensors",
                    "--rank", "1", "--format", "peft", "-o", tmp_path / "peft")
    assert code == 0, out
    assert run("base", "add", tmp_path / "x4.safetensors", "--name", "x4")[0] == 0
    code, out = run("export", tmp_path / "peft", "--base", "x4", "--format", "kohya", "-o", tmp_path / "k.safetensors")
    assert code == 0, out
    header = read_header(tmp_path / "k.safetensors")
    assert [k for k in header.tensors if k.endswith(".lora_up.weight")] == ["lora_unet_output_blocks_0_1_proj_in.lora_up.weight"]
    assert header.metadata["ss_base_model_version"] == ""
