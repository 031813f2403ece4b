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
# the upscaler's attention reads one text context (1024 wide in the real one) at every level; AudioLDM's its own
# level's features (its conversion script's cross_attention_dim = block_out_channels), and its FiLM embedding is
# concatenated to the time embedding (extra_film_use_concat)
OWN = {"x4": ("label_emb", {"num_class_embeds": 5, "cross_attention_dim": 16}),
       "audioldm": ("film_emb", {"class_embed_type": "simple_projection", "projection_class_embeddings_input_dim": 6,
                                 "cross_attention_dim": (8, 16, 16, 24), "class_embeddings_concat": True})}


def tiny_unet(kind):
    """A tiny diffusers UNet of the x4 upscaler's or AudioLDM's kind, and its state under the original names."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    own, config = OWN[kind]
    unet = UNet2DConditionModel(sample_size=8, in_channels=7 if kind == "x4" else 8, out_channels=4, layers_per_block=2,
                                norm_num_groups=8, attention_head_dim=4,
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
    # told by its own module alone (an adapter bound to it), and its pipeline's UNet the same (AudioLDM's by its
    # class_embedding's bias: its fourth level widens as the upscaler's does)
    assert ldm.other_unet([own]) == ldm.other_unet([f"unet.{key}" for key, _ in original.values()]) == \
        ldm.other_unet(original)
    # its class_embedding is the upscaler's label_emb or AudioLDM's film_emb: no checkpoint path by the name alone
    modules = {f"unet.{key.rsplit('.', 1)[0]}" for key, _ in original.values()}
    assert set(ldm.checkpoint_paths(modules)) == modules - {"unet.class_embedding"}
    assert ldm.is_sdxl(original) is None
    assert ldm.sd_scripts_metadata(original) == {ldm.OTHER_UNET_KEY: ldm.other_unet(original).name}
    # beside a cond_stage_model. (the upscaler's OpenCLIP-H, AudioLDM's CLAP) it was SD 2.x's sd_v2_v
    encoder = {"x4": "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight",
               "audioldm": "cond_stage_model.model.text_branch.encoder.layer.0.attention.self.query.weight"}[kind]
    assert ldm.sd_scripts_metadata({**original, encoder: None}) == ldm.sd_scripts_metadata(original)


def test_a_diffusers_adapter_of_audioldm_or_the_x4_upscaler_is_told_by_what_differs(tmp_path):
    """A diffusers adapter on AudioLDM's fourth level's widening (down_blocks.3.resnets.0.conv_shortcut) was the x4
    upscaler's (diffusers' single-file loader tells the upscaler by it, but AudioLDM's widens too), so messages named
    the wrong model. What differs tells them: the class embedding (AudioLDM's a Linear, the upscaler's an Embedding)
    and what cross-attention reads (AudioLDM's key/value map each level's width to itself; the upscaler's read one
    context: a projection from another width, even where a level is as wide as the context). Where nothing does, the
    messages name both."""
    from loraops import formats

    shapes = {kind: {f"unet.{key.removesuffix('.weight')}": tuple(value.shape) for key, value in tiny_unet(kind).values()
                     if key.endswith(".weight") and value.dim() >= 2} for kind in OWN}
    widening, level1, level3 = ("unet.down_blocks.3.resnets.0.conv_shortcut",
                                "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                                "unet.down_blocks.3.attentions.0.transformer_blocks.0.attn2.to_k")

    def told(kind, *modules):
        lora = diffusers_lora(tmp_path / f"{kind}-{len(modules)}.safetensors",
                              {m: shapes[kind][m][:2] for m in modules})
        return ldm.other_unet(formats.read_adapter(lora).modules).name

    assert told("audioldm", widening, level1, level3) == "AudioLDM"  # (it was the upscaler)
    assert told("x4", widening, level1, level3) == "SD x4 upscaler"
    assert told("x4", widening, level1) == "SD x4 upscaler or AudioLDM"  # (level 1 is as wide as the context)
    assert told("audioldm", widening) == told("x4", widening) == "SD x4 upscaler or AudioLDM"
    assert told("audioldm", widening, "unet.class_embedding") == "AudioLDM"

    # the message of a module the kohya writer cannot place names it
    lora = diffusers_lora(tmp_path / "film.safetensors", {m: shapes["audioldm"][m][:2] for m in (widening, level1, level3)}
                          | {"unet.up_blocks.1.upsamplers.0.conv": (16, 16)})
    code, out = run("export", lora, "--format", "kohya", "-o", tmp_path / "k.safetensors")
    assert (code, out) == (2, f"error: {lora}: unet.up_blocks.1.upsamplers.0.conv: diffusers UNet modules whose "
                              "checkpoint path, by which sd-scripts names the AudioLDM UNet, the adapter's modules do not "
                              "say (an up level's upsampler: behind its attention or not; a class_embedding): bind it to "
                              "its single-file checkpoint (--base), or write it as diffusers\n")


# Stable Video Diffusion's UNet (sgm's VideoUNet): VideoResBlocks and SpatialVideoTransformers, each with a time_stack
# and a time_mixer; its image encoder under conditioner.embedders.
SVD = {f"model.diffusion_model.{name}": shape for name, shape in {
    "input_blocks.0.0.weight": (8, 8, 3, 3), "input_blocks.1.0.in_layers.2.weight": (8, 8, 3, 3),
    "input_blocks.1.0.time_stack.in_layers.2.weight": (8, 8, 3, 1, 1), "input_blocks.1.0.time_mixer.mix_factor": (1,),
    "input_blocks.1.1.proj_in.weight": (8, 8), "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
    "input_blocks.1.1.time_stack.0.attn1.to_q.weight": (8, 8), "input_blocks.1.1.time_mixer.mix_factor": (1,),
    "output_blocks.0.1.transformer_blocks.0.attn2.to_k.weight": (8, 16), "label_emb.0.0.weight": (32, 12),
}.items()} | {"conditioner.embedders.0.open_clip.model.visual.transformer.resblocks.0.mlp.c_fc.weight": (16, 8)}


def test_stable_video_diffusion_is_no_sdxl_and_keeps_its_own_names_in_kohya(tmp_path):
    """SVD was SDXL by its conditioner.embedders. (sdxl_base_v1-0, SDXL's names). No version; extract writes kohya
    under the checkpoint's paths (what ComfyUI applies), and the diffusers writer names them as diffusers'
    UNetSpatioTemporalConditionModel does (test_svd_modules_bind_under_diffusers_names checks that translation)."""
    from loraops.st import read_header

    assert ldm.is_sdxl(SVD) is None
    assert ldm.sd_scripts_metadata(SVD) == {ldm.OTHER_UNET_KEY: "Stable Video Diffusion"}

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
    assert code == 0, out
    assert {k.rsplit(".", 2)[0] for k in read_header(written).tensors} == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q"}


# diffusers' scripts/convert_svd_to_diffusers.py on top of SD's conversion: the renames it makes inside a resnet
# (its spatial part: the ResBlock's own layers; its temporal part: time_stack) and inside an attention
SVD_SCRIPT_RENAMES = ((".spatial_res_block.", "."), (".temporal_res_block.", ".time_stack."),
                      (".temporal_transformer_blocks.", ".time_stack."), (".time_pos_embed.linear_1", ".time_pos_embed.0"),
                      (".time_pos_embed.linear_2", ".time_pos_embed.2"))
# the tiny SVD UNet's layout: attention in the first down level and the last up level; so the first up level's
# upsampler sits without it (output_blocks.2.1.conv)
SVD_LAYOUT = dict(down=2, attention_down=lambda i: i == 0, attention_up=lambda i: i == 1,
                  upsampler_slot=lambda i: 2 if i == 1 else 1)


def tiny_svd_unet():
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        cross_attention_dim=16, num_attention_heads=(2, 2), projection_class_embeddings_input_dim=12,
        addition_time_embed_dim=4, down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"))


def svd_checkpoint_name(module):
    """The checkpoint module path of a diffusers SVD UNet module, as diffusers' conversion script relates them."""
    for diffusers, original in SVD_SCRIPT_RENAMES:
        module = module.replace(diffusers, original)
    return "model.diffusion_model." + reference_checkpoint_name(module, reference_table(**SVD_LAYOUT))


def svd_checkpoint():
    """(the tiny diffusers SVD UNet, {its diffusers module: checkpoint path}, its single-file checkpoint's tensors)."""
    unet = tiny_svd_unet()
    modules = {f"unet.{k.removesuffix('.weight')}": svd_checkpoint_name(k.removesuffix(".weight"))
               for k in unet.state_dict() if k.endswith(".weight")}
    checkpoint = {}
    for key, value in unet.state_dict().items():
        module, leaf = key.rsplit(".", 1)
        if f"unet.{module}" in modules:  # (time_mixer.mix_factor, a parameter, is no module)
            checkpoint[f"{modules[f'unet.{module}']}.{leaf}"] = value.detach().clone()
    checkpoint["model.diffusion_model.input_blocks.1.0.time_mixer.mix_factor"] = torch.ones(1)  # (sgm's, no module)
    return unet, modules, checkpoint


def test_svd_modules_bind_under_diffusers_names(tmp_path):
    """A diffusers-named SVD LoRA (unet.…spatial_res_block…, …temporal_transformer_blocks…) bound to no module of an
    SVD single-file checkpoint: every module of diffusers' UNetSpatioTemporalConditionModel now has the checkpoint
    path diffusers' conversion script gives it, and back; a LoRA on them binds, merges into the tensors of those paths
    (compared with W + scale·B·A), and goes to kohya under the checkpoint's paths, bound or not, and back to diffusers
    under its own names."""
    from safetensors.torch import load_file

    from loraops import check, engine, formats
    from loraops.st import read_header

    unet, modules, checkpoint = svd_checkpoint()
    assert ldm.other_unet(checkpoint).name == "Stable Video Diffusion"
    assert {name: path for name, path in ldm.diffusers_names(checkpoint).items() if name.startswith("unet.")} == modules
    assert ldm.checkpoint_paths(modules, whole=True) == modules

    base = tmp_path / "svd.safetensors"
    save_file(checkpoint, str(base))
    shapes = {name: tuple(unet.state_dict()[f"{name[5:]}.weight"].shape) for name in (
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q",
        "unet.mid_block.attentions.0.time_pos_embed.linear_1",
        "unet.down_blocks.0.resnets.1.temporal_res_block.time_emb_proj",
        "unet.mid_block.resnets.0.spatial_res_block.time_emb_proj",
        "unet.up_blocks.1.attentions.2.temporal_transformer_blocks.0.ff_in.net.2")}
    lora = diffusers_lora(tmp_path / "d.safetensors", shapes)
    adapter = formats.read_adapter(lora)
    bound = check.bind(adapter, load_file(base))
    assert sorted(bound.modules) == sorted(modules[name] for name in shapes)

    engine.merge(base, [(adapter, 1.0)], tmp_path / "merged.safetensors", device="cpu")
    merged = load_file(tmp_path / "merged.safetensors")
    for name, module in adapter.modules.items():
        tensor = f"{modules[name]}.weight"
        expected = checkpoint[tensor].double() + module.scale * module.B.double() @ module.A.double()
        assert torch.allclose(merged[tensor].double(), expected, atol=1e-5), name
    assert sum(not torch.equal(merged[k], checkpoint[k]) for k in checkpoint) == len(shapes)

    kohya_names = {f"lora_unet_{modules[name].removeprefix('model.diffusion_model.').replace('.', '_')}"
                   for name in shapes}
    for source, out in ((bound, "bound.safetensors"), (adapter, "unbound.safetensors")):
        written = formats.write_adapter(source, tmp_path / out, "kohya")
        assert {k.rsplit(".", 2)[0] for k in read_header(written).tensors if k.endswith("weight")} == kohya_names
    back = formats.write_adapter(check.bind(formats.read_adapter(tmp_path / "bound.safetensors"), load_file(base)),
                                 tmp_path / "back.safetensors", "diffusers")
    assert {k.rsplit(".", 2)[0] for k in read_header(back).tensors} == set(shapes)


def test_svd_convolutions_and_embeddings_merge_at_their_checkpoint_tensors(tmp_path):
    """The layers test_svd_modules_bind_under_diffusers_names merges none of: a temporal resnet's Conv3d (kernel
    3×1×1), a spatial resnet's 3×3 and 1×1 convolutions, conv_in, conv_out, the down- and upsampler (the first up
    level's, without attention: output_blocks.2.1.conv), the time and added-condition embeddings. Each merges into
    the checkpoint tensor diffusers' conversion script puts it at, as W + w·scale·B·A in float64, and goes to kohya
    under that tensor's path."""
    from safetensors.torch import load_file

    from loraops import check, engine, formats
    from loraops.st import read_header

    unet, modules, checkpoint = svd_checkpoint()
    base = tmp_path / "svd.safetensors"
    save_file(checkpoint, str(base))
    names = ["unet.down_blocks.0.resnets.0.temporal_res_block.conv1", "unet.up_blocks.0.resnets.0.temporal_res_block.conv2",
             "unet.down_blocks.0.resnets.0.spatial_res_block.conv1", "unet.up_blocks.0.resnets.0.spatial_res_block.conv_shortcut",
             "unet.conv_in", "unet.conv_out", "unet.down_blocks.0.downsamplers.0.conv", "unet.up_blocks.0.upsamplers.0.conv",
             "unet.time_embedding.linear_1", "unet.add_embedding.linear_2"]
    shapes = {name: tuple(unet.state_dict()[f"{name[5:]}.weight"].shape) for name in names}
    assert shapes["unet.down_blocks.0.resnets.0.temporal_res_block.conv1"][2:] == (3, 1, 1)
    adapter = formats.read_adapter(diffusers_lora(tmp_path / "d.safetensors", shapes))
    engine.merge(base, [(adapter, 0.5)], tmp_path / "merged.safetensors", device="cpu")
    merged = load_file(tmp_path / "merged.safetensors")
    for name, module in adapter.modules.items():
        tensor = f"{modules[name]}.weight"
        B, A = module.B.double().flatten(1), module.A.double().flatten(1)
        expected = checkpoint[tensor].double() + 0.5 * module.scale * (B @ A).reshape(checkpoint[tensor].shape)
        assert torch.allclose(merged[tensor].double(), expected, atol=1e-5), name
    assert sum(not torch.equal(merged[k], checkpoint[k]) for k in checkpoint) == len(names)
    assert modules["unet.up_blocks.0.upsamplers.0.conv"] == "model.diffusion_model.output_blocks.2.1.conv"

    written = formats.write_adapter(check.bind(adapter, load_file(base)), tmp_path / "k.safetensors", "kohya")
    assert {k.removesuffix(".lora_up.weight") for k in read_header(written).tensors if k.endswith(".lora_up.weight")} \
        == {f"lora_unet_{modules[name].removeprefix('model.diffusion_model.').replace('.', '_')}" for name in names}


def test_an_svd_pipeline_bound_upsampler_without_its_levels_attention_is_written_where_the_pipeline_has_it(tmp_path):
    """An SVD pipeline's UNet holds parameters of no module (time_mixer.mix_factor), so it was not taken for an
    SD-family diffusers UNet when binding recorded which up levels attend (ldm.UP_ATTENTION_KEY): a LoRA on the
    first up level's upsampler (no attention there) bound to the pipeline was refused for kohya; it goes under the
    checkpoint path the pipeline gives it (output_blocks.2.1.conv) and binds back."""
    from loraops import check, formats
    from loraops.st import read_header

    pipeline = {f"unet.{k}": v for k, v in tiny_svd_unet().state_dict().items()}
    assert any(k.endswith(".time_mixer.mix_factor") for k in pipeline)
    upsampler = "unet.up_blocks.0.upsamplers.0.conv"
    lora = diffusers_lora(tmp_path / "d.safetensors", {upsampler: tuple(pipeline[f"{upsampler}.weight"].shape)})
    bound = check.bind(formats.read_adapter(lora), pipeline)
    written = formats.write_adapter(bound, tmp_path / "k.safetensors", "kohya")
    assert [k for k in read_header(written).tensors if k.endswith(".lora_up.weight")] == [
        "lora_unet_output_blocks_2_1_conv.lora_up.weight"]
    assert sorted(check.bind(formats.read_adapter(written), pipeline).modules) == [upsampler]


@pytest.mark.parametrize("kind", ["svd", "x4"])
def test_a_pipeline_of_svd_or_the_x4_upscaler_is_extracted_as_any_pipeline_is(tmp_path, kind):
    """A diffusers pipeline of one of OTHER_UNETS is no single-file checkpoint: extract writes PEFT by default under
    its own names, as for any pipeline (an SVD pipeline was refused: its diffusers UNet modules have no checkpoint
    path for the kohya names extract then defaulted to; the x4 upscaler's was written as kohya)."""
    import json

    from diffusers import UNetSpatioTemporalConditionModel

    if kind == "svd":
        torch.manual_seed(0)
        state = UNetSpatioTemporalConditionModel(
            sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
            cross_attention_dim=16, num_attention_heads=(2, 2), projection_class_embeddings_input_dim=12,
            addition_time_embed_dim=4, down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")).state_dict()
    else:
        state = dict(tiny_unet("x4").values())
    module = f"down_blocks.{0 if kind == 'svd' else 1}.attentions.0.transformer_blocks.0.attn1.to_q"
    assert f"{module}.weight" in state
    for name, bump in (("base", 0.0), ("tuned", 0.1)):
        (tmp_path / name / "unet").mkdir(parents=True)
        save_file({k: v + bump if k == f"{module}.weight" else v for k, v in state.items()},
                  str(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors"))
        (tmp_path / name / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet"]}))
    assert ldm.other_unet(f"unet.{k}" for k in state) is not None  # (its UNet is told)
    code, out = run("extract", "--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--rank", "1",
                    "-o", tmp_path / "x")
    assert code == 0, out
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["peft_type"] == "LORA"


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


# --- diffusers-named SD UNets at their checkpoint paths (ldm.checkpoint_paths): SDXL's kohya names without --base


@pytest.mark.parametrize("layout", ["sd15", "sdxl", "sdxl-refiner", "sd2-unclip"])
def test_diffusers_unet_names_go_back_to_the_paths_of_diffusers_conversion_table(layout):
    """Each module of a tiny diffusers UNet of each layout goes back to the checkpoint path diffusers' conversion
    script gives it (test_ldm's reference table), unet_path's inverse; an adapter's upsampler only where its level's
    attention says where it sits. Whose UNet the diffusers names are is told as the checkpoint's."""
    from test_ldm import REFINER, SD15, SDXL, UNCLIP, diffusers_unet

    layout = {"sd15": SD15, "sdxl": SDXL, "sdxl-refiner": REFINER, "sd2-unclip": UNCLIP}[layout]
    unet, _ = diffusers_unet(layout)
    table = reference_table(**layout)
    modules = [f"unet.{k.removesuffix('.weight')}" for k in unet.state_dict() if k.endswith(".weight")]
    expected = {m: f"model.diffusion_model.{reference_checkpoint_name(m[5:], table)}" for m in modules
                if not m.startswith("unet.class_embedding")}  # (SDXL's add_embedding alone goes back: label_emb)
    assert ldm.checkpoint_paths(modules, whole=True) == expected
    attending = {m for m in modules if ".upsamplers." not in m or m.replace("upsamplers.0.conv", "attentions.0.proj_in")
                 .rsplit(".", 1)[0] + ".proj_in" in modules}
    adapter = ldm.checkpoint_paths(modules)
    assert adapter == {m: p for m, p in expected.items() if m in attending}
    assert ldm.is_sdxl(modules) is (layout is SDXL or layout is REFINER)


def diffusers_lora(path, modules, metadata=None):
    """A diffusers LoRA file of rank 1 on {module: (out, in)}, or a convolution's weight shape (out, in, *kernel)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (out, in_, *kernel) in modules.items():
        tensors[f"{module}.lora_A.weight"] = torch.randn(1, in_, *kernel, generator=g)
        tensors[f"{module}.lora_B.weight"] = torch.randn(out, 1, *[1] * len(kernel), generator=g)
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_a_diffusers_sdxl_lora_is_written_to_kohya_under_sdxl_names_or_refused(tmp_path):
    """A diffusers SDXL LoRA exported to kohya without --base kept diffusers block names
    (lora_unet_down_blocks_1_attentions_0_…), which sd-scripts does not load for SDXL: its structure (a transformer
    block past the first; the second text encoder beside the UNet) says SDXL, so it gets the checkpoint's paths
    (lora_unet_input_blocks_4_1_…) and SDXL's header, and binds back to an SDXL checkpoint as the same modules. One
    whose modules do not say is refused asking for --base; an SD 1.x one keeps diffusers block names."""
    from test_extract_sd_names import unet_checkpoint
    from test_ldm import SDXL

    from loraops.st import read_header

    def kohya(source, out):
        code, text = run("export", source, "--format", "kohya", "-o", out)
        assert code == 0, text
        header = read_header(out)
        return (sorted(k.removesuffix(".lora_up.weight") for k in header.tensors if k.endswith(".lora_up.weight")),
                header.metadata["ss_base_model_version"])

    deep, to_k = (f"unet.down_blocks.1.attentions.0.transformer_blocks.{n}.{leaf}" for n, leaf in ((1, "attn1.to_q"),
                                                                                                  (0, "attn2.to_k")))
    lora = diffusers_lora(tmp_path / "sdxl.safetensors", {deep: (16, 16), to_k: (16, 16)})
    assert kohya(lora, tmp_path / "k.safetensors") == (
        ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
         "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"], "sdxl_base_v1-0")
    save_file(unet_checkpoint(SDXL), str(tmp_path / "base.safetensors"))
    assert run("base", "add", tmp_path / "base.safetensors", "--name", "sdxl-unet")[0] == 0
    code, text = run("export", tmp_path / "k.safetensors", "--base", "sdxl-unet", "--format", "diffusers", "-o",
                     tmp_path / "back.safetensors")
    assert code == 0, text
    assert sorted(k.rsplit(".", 2)[0] for k in read_header(tmp_path / "back.safetensors").tensors) == sorted(
        [deep, to_k] * 2)

    encoders = diffusers_lora(tmp_path / "te2.safetensors", {
        "unet.mid_block.attentions.0.proj_in": (16, 16),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": (8, 8)})
    assert kohya(encoders, tmp_path / "k2.safetensors") == (
        ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_middle_block_1_proj_in"], "sdxl_base_v1-0")

    unplaced = diffusers_lora(tmp_path / "mid.safetensors", {"unet.mid_block.attentions.0.proj_in": (16, 16)})
    code, text = run("export", unplaced, "--format", "kohya", "-o", tmp_path / "k3.safetensors")
    assert (code, text) == (2, f"error: {unplaced}: unet.mid_block.attentions.0.proj_in: modules of an SD UNet, which "
                               "sd-scripts names one way for SDXL (lora_unet_input_blocks_…) and another for SD 1.x/2.x "
                               "(lora_unet_down_blocks_…), and neither these modules nor the adapter's header say which "
                               "it is: give its checkpoint as --base (or register it with --base)\n")
    assert not (tmp_path / "k3.safetensors").exists()

    sd15 = diffusers_lora(tmp_path / "sd15.safetensors", {"unet.down_blocks.0.attentions.0.proj_in": (8, 8),
                                                          "unet.mid_block.attentions.0.proj_in": (16, 16)})
    assert kohya(sd15, tmp_path / "k4.safetensors") == (
        ["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_mid_block_attentions_0_proj_in"], "")


def test_a_diffusers_sdxl_loras_first_text_encoder_alone_is_lora_te1_as_bound_to_its_checkpoint(tmp_path):
    """A diffusers SDXL LoRA (its UNet says SDXL) on the first text encoder but not the second was written to kohya
    under SDXL's UNet names and header beside SD 1.x's lora_te_, where sd-scripts (and loraops bound to the SDXL
    checkpoint) name SDXL's first encoder lora_te1_."""
    from loraops.st import read_header

    lora = diffusers_lora(tmp_path / "sdxl.safetensors", {
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": (16, 16),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (12, 12)})
    code, text = run("export", lora, "--format", "kohya", "-o", tmp_path / "k.safetensors")
    assert code == 0, text
    header = read_header(tmp_path / "k.safetensors")
    assert sorted(k.removesuffix(".lora_up.weight") for k in header.tensors if k.endswith(".lora_up.weight")) == [
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"]
    assert header.metadata["ss_base_model_version"] == "sdxl_base_v1-0"


@pytest.mark.parametrize("layout,width,version", [("sd15", 768, "sd_v1"), ("sd15", 1024, "sd_v2_v"),
                                                  ("sdxl", 16, "sdxl_base_v1-0"), ("x4", 16, "")])
def test_a_pipelines_unet_says_its_version_as_the_checkpoints_does(layout, width, version):
    """A diffusers pipeline's UNet (unet.…) is read as its single-file checkpoint is: SDXL's by its structure, SD 2.x's
    by its cross-attention's 1024-wide context; the x4 upscaler's (its widening fourth level) is none of them. A
    pipeline said no version before, so an SDXL adapter bound to one was written to kohya under SD 1.x's names."""
    from types import SimpleNamespace

    from test_ldm import SD15, SDXL, diffusers_unet

    if layout == "x4":
        state = {key: value for key, value in tiny_unet("x4").values()}
    else:
        state = diffusers_unet({"sd15": SD15, "sdxl": SDXL}[layout])[0].state_dict()
    manifest = {f"unet.{k}": SimpleNamespace(shape=tuple(v.shape)) for k, v in state.items()}
    context = "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"
    if context in manifest:
        manifest[context] = SimpleNamespace(shape=(8, width))
    assert ldm.sd_scripts_metadata(manifest).get("ss_base_model_version", "") == version


def test_sd_scripts_sdxl_names_bind_to_an_sdxl_pipeline_and_are_written_back(tmp_path):
    """sd-scripts' SDXL names (lora_unet_input_blocks_4_1_…, the checkpoint's paths) bind to an SDXL pipeline's
    unet.down_blocks.1.attentions.0.… (they bound to no module of it) and are written back as they were; a diffusers
    block name of it (as ComfyUI and diffusers' converter also take) binds too and is written under sd-scripts'."""
    from types import SimpleNamespace

    from test_ldm import SDXL, diffusers_unet, kohya_round_trip

    from loraops import check, formats
    import factories

    manifest = {f"unet.{k}": SimpleNamespace(shape=tuple(v.shape))
                for k, v in diffusers_unet(SDXL)[0].state_dict().items()}
    sd_scripts = {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": ((16,), (16,)),
                  "lora_unet_output_blocks_2_1_proj_in": ((16, 1, 1), (16, 1, 1)),
                  "lora_unet_output_blocks_2_2_conv": ((16, 3, 3), (16, 1, 1))}
    assert kohya_round_trip(tmp_path, sd_scripts, manifest) == set(sd_scripts)
    bound = check.bind(formats.read_adapter(factories.kohya_file(tmp_path / "k.safetensors", sd_scripts)), manifest)
    assert sorted(bound.modules) == ["unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
                                     "unet.up_blocks.0.attentions.2.proj_in", "unet.up_blocks.0.upsamplers.0.conv"]
    # the first up level's upsampler alone: behind attention (SDXL base: output_blocks.2.2) or not (the refiner's
    # output_blocks.2.1), which the bound modules do not say but the bound pipeline does (its header records it)
    upsampler = {k: v for k, v in sd_scripts.items() if k.endswith("_conv") or "input_blocks" in k}
    assert kohya_round_trip(tmp_path, upsampler, manifest) == set(upsampler)
    diffusers_named = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q": ((16,), (16,))}
    assert kohya_round_trip(tmp_path, diffusers_named, manifest) == {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"}


def test_an_sdxl_pipeline_bound_upsampler_without_its_levels_attention_is_written_where_the_base_has_it(tmp_path):
    """A diffusers LoRA on the first up level's upsampler (and nothing of that level's attention) bound to an SDXL base
    or refiner pipeline was refused for kohya: its modules do not say whether the upsampler sits behind attention
    (the base's output_blocks.2.2.conv) or not (the refiner's output_blocks.2.1.conv). The bound pipeline says: it
    goes under the checkpoint path of that base (binding records it: ldm.UP_ATTENTION_KEY), which binds back to the
    same module."""
    from types import SimpleNamespace

    from test_ldm import REFINER, SDXL, diffusers_unet

    from loraops import check, formats
    from loraops.st import read_header

    # (the refiner's second up level attends: its upsampler sits behind attention, as in SD's table)
    for layout, level, path in ((SDXL, 0, "output_blocks_2_2_conv"), (REFINER, 0, "output_blocks_2_1_conv"),
                                (REFINER, 1, "output_blocks_5_2_conv")):
        manifest = {f"unet.{k}": SimpleNamespace(shape=tuple(v.shape))
                    for k, v in diffusers_unet(layout)[0].state_dict().items()}
        upsampler = f"unet.up_blocks.{level}.upsamplers.0.conv"
        lora = diffusers_lora(tmp_path / f"{path}.safetensors", {
            upsampler: manifest[f"{upsampler}.weight"].shape,
            "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": (16, 16)})
        bound = check.bind(formats.read_adapter(lora), manifest)
        out = formats.write_adapter(bound, tmp_path / f"k-{path}.safetensors", "kohya")
        assert sorted(k.removesuffix(".lora_up.weight") for k in read_header(out).tensors if k.endswith("lora_up.weight")) \
            == ["lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", f"lora_unet_{path}"]
        back = check.bind(formats.read_adapter(out), manifest)
        assert sorted(back.modules) == sorted(bound.modules)


def test_an_up_attention_record_in_a_files_header_that_binding_would_not_write_is_no_record(tmp_path):
    """ldm.UP_ATTENTION_KEY is binding's record, which no writer writes; a file whose header has it malformed ("x")
    made the kohya export end in a ValueError traceback. It is read as no record: the upsampler whose place the
    adapter does not say is refused in one line, as without it."""
    modules = {"unet.up_blocks.0.upsamplers.0.conv": (16, 16 * 9),
               "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": (16, 16)}
    plain = diffusers_lora(tmp_path / "plain.safetensors", modules)
    code, refused = run("export", plain, "--format", "kohya", "-o", tmp_path / "k.safetensors")
    assert code == 2 and refused.startswith(f"error: {plain}: unet.up_blocks.0.upsamplers.0.conv: diffusers UNet "), refused
    for value in ("x", "0,", "1;2"):
        lora = diffusers_lora(tmp_path / "plain.safetensors", modules, {ldm.UP_ATTENTION_KEY: value})
        assert run("export", lora, "--format", "kohya", "-o", tmp_path / "k.safetensors") == (code, refused), value
    assert not (tmp_path / "k.safetensors").exists()



def test_lcms_guidance_projection_keeps_its_diffusers_path_in_a_checkpoint(tmp_path):
    """An LCM UNet's time_embedding.cond_proj (diffusers' TimestepEmbedding cond_proj: the guidance-scale embedding)
    has no entry in diffusers' conversion table (scripts/convert_diffusers_to_original_stable_diffusion.py keeps an
    unmapped key as it is, as test_ldm's reference does), so a single-file LCM checkpoint holds it at
    model.diffusion_model.time_embedding.cond_proj; sd-scripts has no module of it. A diffusers LoRA on it did not
    bind to such a checkpoint; it does, and goes to kohya and back under that one path."""
    from diffusers import UNet2DConditionModel
    from test_ldm import SD15

    from loraops.st import read_header

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=16,
                                norm_num_groups=8, attention_head_dim=4, block_out_channels=(8, 16, 16, 16),
                                time_cond_proj_dim=6, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    table = reference_table(**SD15)
    checkpoint = {}
    for key, value in unet.state_dict().items():
        module, leaf = key.rsplit(".", 1)
        checkpoint[f"model.diffusion_model.{reference_checkpoint_name(module, table)}.{leaf}"] = value.detach().clone()
    cond_proj = "model.diffusion_model.time_embedding.cond_proj"
    assert f"{cond_proj}.weight" in checkpoint
    assert ldm.diffusers_names(checkpoint)["unet.time_embedding.cond_proj"] == cond_proj
    assert ldm.checkpoint_paths(["unet.time_embedding.cond_proj"]) == {"unet.time_embedding.cond_proj": cond_proj}

    save_file(checkpoint, str(tmp_path / "lcm.safetensors"))
    assert run("base", "add", tmp_path / "lcm.safetensors", "--name", "lcm")[0] == 0
    lora = diffusers_lora(tmp_path / "d.safetensors", {"unet.time_embedding.cond_proj": (8, 6),
                                                       "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (8, 16)})
    code, out = run("export", lora, "--base", "lcm", "--format", "kohya", "-o", tmp_path / "k.safetensors")
    assert code == 0, out
    assert sorted(k for k in read_header(tmp_path / "k.safetensors").tensors if k.endswith("lora_up.weight")) == [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight",
        "lora_unet_time_embedding_cond_proj.lora_up.weight"]
    code, out = run("export", tmp_path / "k.safetensors", "--base", "lcm", "--format", "diffusers", "-o",
                    tmp_path / "back.safetensors")
    assert code == 0, out
    assert {k.rsplit(".", 2)[0] for k in read_header(tmp_path / "back.safetensors").tensors} == {
        "unet.time_embedding.cond_proj", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"}


def test_a_peft_flux_transformer_adapter_binds_to_a_bfl_checkpoint_as_its_diffusers_file_does(tmp_path):
    """A PEFT adapter of diffusers' FluxTransformer2DModel alone names its modules without the pipeline's
    transformer. (transformer_blocks.0.attn.to_q: what PEFT and diffusers' load_lora_adapter(prefix=None) take on
    that model). It did not bind to a Black Forest Labs checkpoint; it binds as the same LoRA in a diffusers file does
    (transformer.…), q/k/v to rows of the fused qkv, and merges to the same tensors."""
    from safetensors.torch import load_file
    from test_ldm import FLUX, FLUX_LORA, checkpoint

    import factories
    from loraops import check, engine, formats

    base = checkpoint(tmp_path / "flux.safetensors", FLUX)
    manifest = load_file(base)
    diffusers_file = formats.read_adapter(formats.write_adapter(factories.lora_adapter(FLUX_LORA, fmt="diffusers"),
                                                                tmp_path / "d.safetensors", "diffusers"))
    bare = {name.removeprefix("transformer."): shape for name, shape in FLUX_LORA.items()}
    peft_folder = formats.read_adapter(formats.write_adapter(factories.lora_adapter(bare, fmt="peft"),
                                                             tmp_path / "peft", "peft"))
    bound, reference = check.bind(peft_folder, manifest), check.bind(diffusers_file, manifest)
    assert {n: m.fused for n, m in bound.modules.items()} == {n: m.fused for n, m in reference.modules.items()}
    assert bound.modules["double_blocks.0.img_attn.qkv.to_v"].fused == ("double_blocks.0.img_attn.qkv.weight", 32, 16, 48)
    engine.merge(base, [(peft_folder, 0.5)], tmp_path / "peft.safetensors", device="cpu")
    engine.merge(base, [(diffusers_file, 0.5)], tmp_path / "diffusers.safetensors", device="cpu")
    merged, expected = load_file(tmp_path / "peft.safetensors"), load_file(tmp_path / "diffusers.safetensors")
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    assert not torch.equal(merged["img_in.weight"], manifest["img_in.weight"])


def test_a_diffusers_unet_of_other_blocks_is_judged_by_none_of_sds_rules(tmp_path):
    """A diffusers UNet whose blocks are not SD's (DeepFloyd IF's and Kandinsky's: three resnets per level, attention
    processors without a Transformer2DModel) is no SD UNet: its first up level's attention does not make it SDXL, a
    pipeline of it says no version, and a diffusers LoRA of it keeps diffusers block names in kohya, unrefused."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from loraops.st import read_header

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=3, norm_num_groups=8,
                                cross_attention_dim=16, attention_head_dim=4, block_out_channels=(8, 16),
                                down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                                mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                                up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"))
    manifest = {f"unet.{k}": SimpleNamespace(shape=tuple(v.shape)) for k, v in unet.state_dict().items()}
    attention = "unet.up_blocks.0.attentions.0.to_q"
    assert f"{attention}.weight" in manifest
    assert ldm.checkpoint_paths(manifest, whole=True) == {}
    # its resnets alone (a conv LoRA of it) neither: a third resnet in a down level, a fourth in an up level
    resnets = [name for name in manifest if ".resnets." in name]
    assert {".resnets.2.", ".resnets.3."} <= {name[name.index(".resnets."):][:11] for name in resnets}
    for level in ("unet.down_blocks.", "unet.up_blocks."):
        assert ldm.checkpoint_paths(name for name in resnets if name.startswith(level)) == {}
    assert ldm.is_sdxl(manifest) is None and ldm.sd_scripts_metadata(manifest) == {}
    lora = diffusers_lora(tmp_path / "if.safetensors", {attention: (16, 16)})
    code, out = run("export", lora, "--format", "kohya", "-o", tmp_path / "k.safetensors")
    assert code == 0, out
    assert [k for k in read_header(tmp_path / "k.safetensors").tensors if k.endswith("lora_up.weight")] == [
        "lora_unet_up_blocks_0_attentions_0_to_q.lora_up.weight"]


def test_the_unet_recorded_in_a_header_is_the_bound_bases_alone():
    """OTHER_UNET_KEY says which base an adapter was bound to: bound to another base, the record goes (it kept saying
    x4 upscaler, and an SDXL adapter was written with no version and no refusal where its modules did not say)."""
    from test_extract_sd_names import unet_checkpoint
    from test_ldm import SDXL

    recorded = {ldm.OTHER_UNET_KEY: "SD x4 upscaler", "ss_network_dim": "4"}
    assert ldm.versioned(recorded, unet_checkpoint(SDXL)) == {
        "ss_network_dim": "4", "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}
    assert ldm.versioned({}, {name: value for name, (_, value) in tiny_unet("x4").items()}) == {
        ldm.OTHER_UNET_KEY: "SD x4 upscaler"}
