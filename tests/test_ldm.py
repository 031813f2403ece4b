"""Single-file SD / FLUX checkpoints under diffusers names (loraops.ldm), and kohya / diffusers LoRAs bound to them.

The references are diffusers' own single-file converters (diffusers.loaders.single_file_utils:
convert_ldm_unet_checkpoint, convert_open_clip_checkpoint, convert_flux_transformer_checkpoint_to_diffusers), run on
checkpoints whose tensors carry their own name and row numbers as values, so every converted tensor says where it
came from; loraops reads the block structure off the path instead, and the two must agree on every module.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import factories
from loraops import check, formats, ldm
from test_merge_cli import run

SD15 = dict(down=4, attention_down=lambda i: i < 3, attention_up=lambda i: i > 0, upsampler_slot=lambda i: 1 if i == 0 else 2)
SDXL = dict(down=3, attention_down=lambda i: i > 0, attention_up=lambda i: i < 2, upsampler_slot=lambda i: 2)
# the SDXL refiner's UNet: four levels, attention (4 deep) in the middle two only
REFINER = dict(down=4, attention_down=lambda i: i in (1, 2), attention_up=lambda i: i in (1, 2),
               upsampler_slot=lambda i: 2 if i in (1, 2) else 1)
UNCLIP = dict(SD15)  # SD 2.x unCLIP: SD's blocks, and a label_emb (the image embedding's class embedding)


def reference_table(down, attention_down, attention_up, upsampler_slot):
    """(checkpoint prefix, diffusers prefix) pairs, generated the way diffusers' conversion scripts generate them: they
    give the tiny diffusers UNets their original names, which diffusers' single-file converter then reads back."""
    table = []
    for i in range(down):
        for j in range(2):
            table.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if attention_down(i):
                table.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            table.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if attention_up(i):
                table.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < down - 1:
            table.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            table.append((f"output_blocks.{3 * i + 2}.{upsampler_slot(i)}.", f"up_blocks.{i}.upsamplers.0."))
    table.append(("middle_block.1.", "mid_block.attentions.0."))
    table += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return table


def reference_checkpoint_name(diffusers: str, table) -> str:
    """diffusers → checkpoint module path, as the conversion script does it (on tensor names, so on path + ".")."""
    top = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
           "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
           "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"}
    if diffusers in top:
        return top[diffusers]
    name = diffusers + "."
    if "resnets" in name:
        for sd, hf in [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
                       ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]:
            name = name.replace(f".{hf}.", f".{sd}.")
    for sd, hf in table:
        name = name.replace(hf, sd)
    return name[:-1]


def diffusers_unet(layout):
    from diffusers import UNet2DConditionModel

    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=16,
                  norm_num_groups=8, attention_head_dim=4)
    size_embedding = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                          projection_class_embeddings_input_dim=16 + 6 * 4)
    if layout is SD15 or layout is UNCLIP:
        unclip = dict(class_embed_type="projection", projection_class_embeddings_input_dim=12) if layout is UNCLIP else {}
        return UNet2DConditionModel(**common, block_out_channels=(8, 16, 16, 16), **unclip,
                                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3), \
            {"layers_per_block": 2, "class_embed_type": unclip.get("class_embed_type")}
    if layout is REFINER:
        return UNet2DConditionModel(**common, **size_embedding, block_out_channels=(8, 16, 16, 16),
                                    transformer_layers_per_block=(1, 2, 2, 1),
                                    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",)), \
            {"layers_per_block": 2, "addition_embed_type": "text_time"}
    return UNet2DConditionModel(**common, **size_embedding, block_out_channels=(8, 16, 16),
                                transformer_layers_per_block=(1, 2, 2),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")), \
        {"layers_per_block": 2, "addition_embed_type": "text_time"}


@pytest.mark.parametrize("layout", [SD15, SDXL, REFINER, UNCLIP], ids=["sd15", "sdxl", "sdxl-refiner", "sd2-unclip"])
def test_unet_paths_agree_with_diffusers_single_file_converter(layout):
    """A tiny diffusers UNet of each layout, its tensors renamed to the original layout, converted back by diffusers'
    single-file loader: the converter must rebuild exactly the model's keys (so the checkpoint is complete and
    rightly named), and each converted weight's source must be what loraops.ldm.diffusers_names names — label_emb
    too, which the converter makes SDXL's add_embedding or unCLIP's class_embedding (it was add_embedding for both).
    Which UNet it is (ldm.is_sdxl) is read off its structure, and no module of one says the other."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    torch.manual_seed(0)
    unet, config = diffusers_unet(layout)
    state = unet.state_dict()
    table = reference_table(**layout)
    original = {}
    for key in state:
        module, leaf = key.rsplit(".", 1)
        original[f"model.diffusion_model.{reference_checkpoint_name(module, table)}.{leaf}"] = key
    ids = {name: i for i, name in enumerate(original)}
    converted = convert_ldm_unet_checkpoint({n: torch.full(state[k].shape, float(ids[n])) for n, k in original.items()},
                                            config)
    assert set(converted) == set(state)
    names = {i: n for n, i in ids.items()}
    weights = [key for key in converted if key.endswith(".weight")]
    assert len(weights) > 300
    ours = ldm.diffusers_names(original)
    for key in weights:
        source = names[int(converted[key].flatten()[0])]
        assert ours[f"unet.{key.removesuffix('.weight')}"] == source.removesuffix(".weight"), (source, key)
    sdxl = layout is SDXL or layout is REFINER
    assert ldm.is_sdxl(original) is sdxl
    assert {ldm.is_sdxl([name]) for name in original} == {None, sdxl}
    # each rule, read off the diffusers model rather than the checkpoint's paths: a transformer block past the first
    # and the first up level's attentions (and its upsampler behind them) say SDXL; the first down level's and the
    # last up level's attentions say SD 1.x/2.x; no other module says anything
    last_up = f"up_blocks.{len(unet.up_blocks) - 1}.attentions."
    first_up_attends = hasattr(unet.up_blocks[0], "attentions")

    def says(key):
        if re.search(r"\.transformer_blocks\.[1-9]", key) or key.startswith("up_blocks.0.attentions.") or (
                first_up_attends and key.startswith("up_blocks.0.upsamplers.")):
            return True
        return False if key.startswith(("down_blocks.0.attentions.", last_up)) else None

    assert {key: ldm.is_sdxl([names[int(converted[key].flatten()[0])]]) for key in weights} == {
        key: says(key) for key in weights}


def labelled(shapes):
    """{name: tensor} whose values are (name's index · 10⁶ + row), and a decoder value → (name, row)."""
    names = list(shapes)
    tensors = {n: (i * 10**6 + torch.arange(shapes[n][0], dtype=torch.float64)).reshape(-1, *[1] * (len(shapes[n]) - 1))
               .expand(*shapes[n]).contiguous() for i, n in enumerate(names)}
    return tensors, lambda value: (names[int(value) // 10**6], int(value) % 10**6)


class Lenient(dict):
    """A checkpoint for diffusers' converters, which pop every tensor of a full one (norm scales, pos_embed…): the
    ones a test does not build come back as None."""

    def pop(self, key, *default):
        return super().pop(key, None)


def source_rows(tensor, decode):
    """(source tensor, first row, rows) of a converted tensor of labelled values."""
    name, first = decode(tensor.flatten()[0])
    return name, first, tensor.shape[0]


def loraops_rows(diffusers_names, manifest):
    """{diffusers module: (checkpoint tensor, first row, rows)} as loraops binds them."""
    out = {}
    for name, module in diffusers_names.items():
        fused = ldm.fused_target(module, manifest)
        out[name] = fused[:3] if fused else (f"{module}.weight", 0, manifest[f"{module}.weight"].shape[0])
    return out


@pytest.mark.parametrize("prefix", ["cond_stage_model.model.", "conditioner.embedders.1.model.",
                                    "conditioner.embedders.0.model."], ids=["sd2", "sdxl", "sdxl-refiner"])
def test_openclip_names_agree_with_diffusers_converter(prefix):
    """diffusers' convert_open_clip_checkpoint (create_diffusers_clip_model_from_ldm calls it with each of these
    prefixes; the refiner's bigG is its pipeline's text_encoder_2)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    d = 8
    shapes = {}
    for layer in range(2):
        block = f"{prefix}transformer.resblocks.{layer}."
        shapes.update({f"{block}attn.in_proj_weight": (3 * d, d), f"{block}attn.out_proj.weight": (d, d),
                       f"{block}mlp.c_fc.weight": (4 * d, d), f"{block}mlp.c_proj.weight": (d, 4 * d)})
    tensors, decode = labelled(shapes)
    text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=d))
    converted = convert_open_clip_checkpoint(text_model, tensors, prefix=prefix)
    component = "text_encoder_2" if prefix.startswith("conditioner") else "text_encoder"
    reference = {f"{component}.{key.removesuffix('.weight')}": source_rows(t, decode)
                 for key, t in converted.items() if key.endswith(".weight")}
    manifest = {name: SimpleNamespace(shape=shape) for name, shape in shapes.items()}
    assert loraops_rows(ldm.diffusers_names(manifest), manifest) == reference


@pytest.mark.parametrize("width", [768, 1024, 16])
def test_an_sd_unet_alones_version_is_told_by_its_context_width_as_diffusers_tells_it(width):
    """An SD 1.x/2.x UNet saved without its text encoder says its version by its cross-attention's context width
    (OpenCLIP-H's 1024 for SD 2.x): as diffusers' single-file loader tells v1 from v2 (infer_diffusers_model_type),
    so an extract of it records sd_v1 or sd_v2_v as sd-scripts' extract does (it wrote no version)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    unet = {f"model.diffusion_model.{n}.weight": torch.empty(shape, device="meta") for n, shape in [
        ("input_blocks.1.1.proj_in", (320, 320, 1, 1)), ("input_blocks.2.1.transformer_blocks.0.attn2.to_k", (320, width)),
        ("output_blocks.11.0.skip_connection", (320, 640, 1, 1))]}
    header = ldm.sd_scripts_metadata(unet)
    assert {"v1": ("sd_v1", "False"), "v2": ("sd_v2_v", "True")}[infer_diffusers_model_type(unet)] == (
        header["ss_base_model_version"], header["ss_v2"])


def test_paths_outside_the_known_blocks_are_not_translated():
    for path in ["input_blocks.0.1.proj_in", "input_blocks.3.1.proj_in", "input_blocks.1.2.conv", "output_blocks.0.3.conv",
                 "input_blocks.1.0.in_layers.1", "middle_block.0.in_layers.1", "something.else", "input_blocks.1"]:
        assert ldm.unet_path(path) is None, path
    assert ldm.unet_path("label_emb.0.0") == "add_embedding.linear_1"  # SDXL's size/crop embedding


def test_diffusers_names_of_a_checkpoint():
    names = ldm.diffusers_names([
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.some_future_block.0.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",  # OpenCLIP: q, k, v fused
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight",
        "first_stage_model.decoder.conv_in.weight",
    ])
    assert names == {
        "unet.down_blocks.0.attentions.0.proj_in": "model.diffusion_model.input_blocks.1.1.proj_in",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj":
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj",
        **{f"text_encoder_2.text_model.encoder.layers.0.self_attn.{p}_proj":
           f"conditioner.embedders.1.model.transformer.resblocks.0.attn.{p}_proj" for p in "qkv"},
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1": "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc",
    }
    assert ldm.diffusers_names(["model.layers.0.self_attn.q_proj.weight", "unet.conv_in.weight"]) == {}


def checkpoint(path, shapes, seed=3):
    g = torch.Generator().manual_seed(seed)
    save_file({name: torch.randn(shape, generator=g).to(torch.float16) for name, shape in shapes.items()}, str(path))
    return path


def assert_rounded_once(merged, exact):
    """fp16 result of a float64 reference: equal to its rounding, or one fp16 unit off where float32 accumulation
    lands on the other side of a rounding boundary."""
    ulp = torch.finfo(torch.float16).eps * exact.abs().clamp_min(2**-14)
    assert bool(((merged.double() - exact).abs() <= ulp).all())


def sd15_checkpoint(path):
    """A tiny single-file SD 1.x checkpoint: a few UNet modules under LDM names (one 3×3 conv), a text encoder."""
    return checkpoint(path, {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (8, 8, 1, 1),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (8, 12),
        "model.diffusion_model.middle_block.1.proj_out.weight": (16, 16, 1, 1),
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (8, 8, 3, 3),
        "model.diffusion_model.input_blocks.1.0.in_layers.2.bias": (8,),
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (12, 12),
        "first_stage_model.decoder.conv_in.weight": (4, 4, 3, 3),
    })


KOHYA_SD15 = {  # sd-scripts' names for SD 1.x: diffusers blocks, transformers' CLIP
    "lora_unet_down_blocks_0_attentions_0_proj_in": ((8, 1, 1), (8, 1, 1)),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((8,), (8,)),
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k": ((12,), (8,)),
    "lora_unet_mid_block_attentions_0_proj_out": ((16, 1, 1), (16, 1, 1)),
    "lora_unet_down_blocks_0_resnets_0_conv1": ((8, 3, 3), (8, 1, 1)),  # LoCon
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((12,), (12,)),
}


def test_kohya_sd15_lora_binds_to_a_single_file_checkpoint(tmp_path):
    base = sd15_checkpoint(tmp_path / "sd15.safetensors")
    manifest = load_file(base)
    bound = check.bind(formats.read_adapter(factories.kohya_file(tmp_path / "k.safetensors", KOHYA_SD15)), manifest)
    assert sorted(bound.modules) == sorted(
        n[: -len(".weight")] for n in manifest if n.endswith(".weight") and not n.startswith("first_stage")
    )
    assert bound.modules["model.diffusion_model.input_blocks.1.0.in_layers.2"].delta().shape == (8, 8, 3, 3)


def test_diffusers_lora_binds_to_a_single_file_checkpoint(tmp_path):
    info = SimpleNamespace
    manifest = {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": info(shape=(8, 8)),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": info(shape=(8, 8, 1, 1)),
        "model.diffusion_model.input_blocks.4.1.proj_in.bias": info(shape=(8,)),
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": info(shape=(12, 12)),
    }
    written = formats.write_adapter(factories.lora_adapter({
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (12, 12),
    }, fmt="diffusers"), tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    adapter = formats.read_adapter(written)
    assert adapter.format == "diffusers"
    assert check.check(adapter, manifest).ok
    assert sorted(check.bind(adapter, manifest).modules) == [
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    ]


def test_clip_text_encoders_saved_by_transformers_5_bind_both_name_styles(tmp_path):
    """transformers 5 saves CLIPTextModel without its text_model. level (encoder.layers.0.…); sd-scripts' kohya names,
    hub pipelines and diffusers-trained LoRAs have it. Either style binds to either layout, a T5 path (no such
    level) is left alone, and kohya files are written back under sd-scripts' names."""
    info = SimpleNamespace
    new_layout = {  # a pipeline saved by transformers 5
        "unet.down_blocks.0.attentions.0.proj_in.weight": info(shape=(8, 16)),
        "text_encoder.encoder.layers.0.self_attn.q_proj.weight": info(shape=(12, 12)),
        "text_encoder_2.encoder.layers.0.mlp.fc1.weight": info(shape=(40, 20)),
        "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.weight": info(shape=(16, 16)),
    }
    kohya_names = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": ((16,), (8,)),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ((12,), (12,)),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": ((20,), (40,)),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q": ((16,), (16,)),
    }
    assert kohya_round_trip(tmp_path, kohya_names, new_layout) == set(kohya_names)
    bound = check.bind(formats.read_adapter(factories.kohya_file(tmp_path / "k.safetensors", kohya_names)), new_layout)
    assert sorted(bound.modules) == sorted(name.removesuffix(".weight") for name in new_layout)

    old_style = factories.lora_adapter({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (12, 12),
                                        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1": (20, 40)}, fmt="diffusers")
    assert sorted(check.bind(old_style, new_layout).modules) == ["text_encoder.encoder.layers.0.self_attn.q_proj",
                                                                 "text_encoder_2.encoder.layers.0.mlp.fc1"]
    new_style = factories.lora_adapter({"text_encoder.encoder.layers.0.self_attn.q_proj": (12, 12)}, fmt="diffusers")
    hub_layout = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight": info(shape=(12, 12))}
    assert list(check.bind(new_style, hub_layout).modules) == ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    checkpoint = {"cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": info(shape=(12, 12))}
    assert list(check.bind(new_style, checkpoint).modules) == [
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj"]


def test_sdxl_text_encoders_each_bind_in_their_own_clip_layout(tmp_path):
    """transformers 5 saves CLIPTextModel (SDXL's text_encoder) without text_model. but CLIPTextModelWithProjection
    (its text_encoder_2) with it: one pipeline holds both layouts, so a LoRA on both encoders binds only when each
    component is renamed to the layout that component is stored in (one flip for all left text_encoder_2 unbound)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            vocab_size=50, max_position_embeddings=20, projection_dim=8, bos_token_id=0, eos_token_id=1)
    info = SimpleNamespace
    pipeline = {f"{component}.{name}": info(shape=tuple(tensor.shape))
                for component, model in (("text_encoder", CLIPTextModel(config)),
                                         ("text_encoder_2", CLIPTextModelWithProjection(config)))
                for name, tensor in model.state_dict().items()}
    pipeline["unet.down_blocks.0.attentions.0.proj_in.weight"] = info(shape=(8, 16))
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.weight" in pipeline  # the layouts being tested
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight" in pipeline
    q_proj = "encoder.layers.0.self_attn.q_proj"
    transformers_4_names = factories.lora_adapter({f"text_encoder.text_model.{q_proj}": (16, 16),
                                                   f"text_encoder_2.text_model.{q_proj}": (16, 16),
                                                   "unet.down_blocks.0.attentions.0.proj_in": (16, 8)}, fmt="diffusers")
    assert sorted(check.bind(transformers_4_names, pipeline).modules) == [
        f"text_encoder.{q_proj}", f"text_encoder_2.text_model.{q_proj}", "unet.down_blocks.0.attentions.0.proj_in"]
    # the reverse: a LoRA trained on a transformers 5 pipeline, bound to a hub (transformers 4) pipeline
    transformers_5_names = factories.lora_adapter({f"text_encoder.{q_proj}": (16, 16),
                                                   f"text_encoder_2.text_model.{q_proj}": (16, 16)}, fmt="diffusers")
    hub = {f"{component}.text_model.{q_proj}.weight": info(shape=(16, 16))
           for component in ("text_encoder", "text_encoder_2")}
    assert sorted(check.bind(transformers_5_names, hub).modules) == [
        f"text_encoder.text_model.{q_proj}", f"text_encoder_2.text_model.{q_proj}"]


def test_a_diffusers_sdxl_lora_merges_into_a_transformers_5_pipeline_as_diffusers_loads_it(tmp_path):
    """End to end on the mixed layouts above: a diffusers LoRA on both SDXL text encoders (text_model. names), merged
    into a pipeline saved by transformers 5, gives each encoder the outputs diffusers' load_lora_into_text_encoder
    gives it."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loraops import engine
    config = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            vocab_size=50, max_position_embeddings=20, projection_dim=8, bos_token_id=0, eos_token_id=1)
    encoders = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    torch.manual_seed(0)
    for component, cls in encoders.items():
        cls(config).save_pretrained(tmp_path / "pipe" / component)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    lora = {f"{component}.text_model.encoder.layers.0.{module}.{factor}.weight":
            torch.randn(shape) * 0.3
            for component in encoders for module in ("self_attn.q_proj", "mlp.fc1")
            for factor, shape in (("lora_A", (4, 16)), ("lora_B", (32 if module == "mlp.fc1" else 16, 4)))}
    save_file(lora, str(tmp_path / "pytorch_lora_weights.safetensors"))
    engine.merge(tmp_path / "pipe", [(formats.read_adapter(tmp_path / "pytorch_lora_weights.safetensors"), 1.0)],
                 tmp_path / "out", progress=False)
    tokens = torch.tensor([[0, 5, 7, 9, 1]])
    for component, cls in encoders.items():
        adapted = cls.from_pretrained(tmp_path / "pipe" / component)
        StableDiffusionXLPipeline.load_lora_into_text_encoder(
            {k: v for k, v in lora.items() if k.startswith(f"{component}.")}, network_alphas=None,
            text_encoder=adapted, prefix=component)
        merged = cls.from_pretrained(tmp_path / "out" / component)
        with torch.no_grad():
            expected, actual = adapted(tokens)[0], merged(tokens)[0]
            assert not torch.allclose(expected, cls.from_pretrained(tmp_path / "pipe" / component)(tokens)[0])
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_merge_kohya_sd15_lora_into_single_file_checkpoint(tmp_path):
    base = sd15_checkpoint(tmp_path / "sd15.safetensors")
    lora = factories.kohya_file(tmp_path / "k.safetensors", KOHYA_SD15, rank=4, alpha=2.0)
    out = tmp_path / "merged.safetensors"
    run("check", lora, "--base", base)
    assert "6 tensors merged" in run("merge", lora, "--into", base, "-o", out, "--no-record").output
    original, merged = load_file(base), load_file(out)
    adapter = formats.read_adapter(lora)
    pairs = {  # kohya name → checkpoint tensor, written out by hand
        "lora_unet_down_blocks_0_attentions_0_proj_in": "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k":
            "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
        "lora_unet_mid_block_attentions_0_proj_out": "model.diffusion_model.middle_block.1.proj_out.weight",
        "lora_unet_down_blocks_0_resnets_0_conv1": "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    }
    for kohya_name, tensor in pairs.items():
        module = adapter.modules[kohya_name]
        down, up = module.A.double(), module.B.double()
        if down.dim() == 4 and down.shape[2:] != (1, 1):  # k×k LoCon: the composition of the two convolutions
            delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        else:
            delta = (up.flatten(1) @ down.flatten(1)).reshape(original[tensor].shape)
        assert_rounded_once(merged[tensor], original[tensor].double() + 0.5 * delta), tensor
    for untouched in ["model.diffusion_model.input_blocks.1.0.in_layers.2.bias", "first_stage_model.decoder.conv_in.weight"]:
        assert torch.equal(merged[untouched], original[untouched])


def kohya_round_trip(tmp_path, modules, manifest, metadata=None):
    """The kohya names a bound adapter is written back with."""
    from loraops.st import read_header

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    source = factories.kohya_file(folder / "in.safetensors", modules, metadata=metadata)
    bound = check.bind(formats.read_adapter(source), manifest)
    out = formats.write_adapter(bound, folder / "out.safetensors", "kohya")
    return {key.rsplit(".", 2)[0] if key.endswith("weight") else key.rsplit(".", 1)[0] for key in read_header(out).tensors}


def test_kohya_lora_bound_to_a_checkpoint_is_written_back_under_sd_scripts_names(tmp_path):
    """A kohya LoRA registered against a single-file base (so loaded bound to it) and then resized or exported must
    come out under the names sd-scripts, A1111 and ComfyUI load: diffusers blocks for SD 1.x, original ones for
    SDXL, lora_te / lora_te1 for the text encoders."""
    sd15 = load_file(sd15_checkpoint(tmp_path / "sd15.safetensors"))
    assert kohya_round_trip(tmp_path, KOHYA_SD15, sd15) == set(KOHYA_SD15)

    info = SimpleNamespace
    sdxl = {
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": info(shape=(8, 8)),
        "model.diffusion_model.output_blocks.2.2.conv.weight": info(shape=(8, 8, 3, 3)),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": info(shape=(12, 12)),
    }
    kohya_sdxl = {
        "lora_unet_input_blocks_4_1_proj_in": ((8,), (8,)),
        "lora_unet_output_blocks_2_2_conv": ((8, 3, 3), (8, 1, 1)),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": ((12,), (12,)),
    }
    assert kohya_round_trip(tmp_path, kohya_sdxl, sdxl) == set(kohya_sdxl)
    unet_only = {k: v for k, v in kohya_sdxl.items() if k.startswith("lora_unet")}  # SDXL known from the metadata only
    assert kohya_round_trip(tmp_path, unet_only, sdxl, {"ss_base_model_version": "sdxl_base_v1-0"}) == set(unet_only)

    pipeline = {
        "unet.down_blocks.0.attentions.0.proj_in.weight": info(shape=(8, 16)),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight": info(shape=(12, 12)),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight": info(shape=(20, 20)),
    }
    kohya_pipeline = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": ((16,), (8,)),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ((12,), (12,)),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": ((20,), (20,)),
    }
    assert kohya_round_trip(tmp_path, kohya_pipeline, pipeline) == set(kohya_pipeline)


SDXL_TEXT = {  # SDXL's text encoders: CLIP ViT-L under transformers' names, OpenCLIP bigG with q, k, v fused
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight": (12, 12),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (48, 16),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias": (48,),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight": (16, 16),
    "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (40, 16),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (8, 8),
}
KOHYA_SDXL_TEXT = {
    "lora_te1_text_model_encoder_layers_0_self_attn_v_proj": ((12,), (12,)),
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": ((16,), (16,)),
    "lora_te2_text_model_encoder_layers_0_self_attn_v_proj": ((16,), (16,)),  # no k: its rows stay as they are
    "lora_te2_text_model_encoder_layers_0_self_attn_out_proj": ((16,), (16,)),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1": ((16,), (40,)),
    "lora_unet_input_blocks_4_1_proj_in": ((8,), (8,)),
}


def test_openclip_q_k_v_bind_to_rows_of_the_fused_in_proj(tmp_path):
    manifest = load_file(checkpoint(tmp_path / "sdxl.safetensors", SDXL_TEXT))
    bound = check.bind(formats.read_adapter(factories.kohya_file(tmp_path / "k.safetensors", KOHYA_SDXL_TEXT)), manifest)
    attn = "conditioner.embedders.1.model.transformer.resblocks.0.attn"
    assert bound.modules[f"{attn}.q_proj"].fused == (f"{attn}.in_proj_weight", 0, 16, 48)
    assert bound.modules[f"{attn}.v_proj"].fused == (f"{attn}.in_proj_weight", 32, 16, 48)
    assert bound.modules[f"{attn}.out_proj"].fused is None
    assert check.check(formats.read_adapter(tmp_path / "k.safetensors"), manifest).ok

    wrong = factories.kohya_file(tmp_path / "wrong.safetensors",
                                 {"lora_te2_text_model_encoder_layers_0_self_attn_k_proj": ((16,), (48,))})
    report = check.check(formats.read_adapter(wrong), manifest)
    assert not report.ok and report.shape_mismatches[0].expected == [16, 16]
    assert report.shape_mismatches[0].tensor == f"{attn}.in_proj_weight"


@pytest.mark.parametrize("chunk_elements", [None, 5 * 16], ids=["one-chunk", "chunks-across-q-k-v"])
def test_merge_into_the_fused_in_proj_equals_the_float64_reference(tmp_path, monkeypatch, chunk_elements):
    from loraops import engine

    if chunk_elements:  # 5-row chunks: boundaries fall inside the q, k and v row blocks
        monkeypatch.setattr(engine, "CHUNK_ELEMENTS", chunk_elements)
    base = checkpoint(tmp_path / "sdxl.safetensors", SDXL_TEXT)
    lora = factories.kohya_file(tmp_path / "k.safetensors", KOHYA_SDXL_TEXT, rank=4, alpha=2.0)
    adapter = formats.read_adapter(lora)
    report = engine.merge(base, [(adapter, 0.75)], tmp_path / "out.safetensors", device="cpu")
    assert report.tensors_merged == 5
    original, merged = load_file(base), load_file(tmp_path / "out.safetensors")

    def delta(kohya_name):
        module = adapter.modules[kohya_name]
        return 0.75 * module.scale * (module.B.double() @ module.A.double())

    te2 = "lora_te2_text_model_encoder_layers_0_"
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    fused = torch.cat([delta(f"{te2}self_attn_q_proj"), torch.zeros(16, 16, dtype=torch.float64),
                       delta(f"{te2}self_attn_v_proj")])
    assert_rounded_once(merged[in_proj], original[in_proj].double() + fused)
    fc1 = "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight"
    assert_rounded_once(merged[fc1], original[fc1].double() + delta(f"{te2}mlp_fc1"))
    bias = in_proj.replace("weight", "bias")
    assert torch.equal(merged[bias], original[bias])


def test_openclip_modules_are_written_back_under_sd_scripts_names(tmp_path):
    manifest = load_file(checkpoint(tmp_path / "sdxl.safetensors", SDXL_TEXT))
    assert kohya_round_trip(tmp_path, KOHYA_SDXL_TEXT, manifest) == set(KOHYA_SDXL_TEXT)
    sd2 = {k.replace("conditioner.embedders.1.model.", "cond_stage_model.model."): info
           for k, info in manifest.items() if k.startswith("conditioner.embedders.1.")}
    kohya_sd2 = {k.replace("lora_te2_", "lora_te_"): v for k, v in KOHYA_SDXL_TEXT.items() if k.startswith("lora_te2_")}
    assert kohya_round_trip(tmp_path, kohya_sd2, sd2) == set(kohya_sd2)


def test_a_diffusers_lora_on_the_second_text_encoder_binds_to_the_fused_in_proj(tmp_path):
    manifest = load_file(checkpoint(tmp_path / "sdxl.safetensors", SDXL_TEXT))
    written = formats.write_adapter(factories.lora_adapter({
        "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj": (16, 16),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj": (16, 16),
    }, fmt="diffusers"), tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    bound = check.bind(formats.read_adapter(written), manifest)
    k_proj = bound.modules["conditioner.embedders.1.model.transformer.resblocks.0.attn.k_proj"]
    assert k_proj.fused[1:] == (16, 16, 48) and check.check(formats.read_adapter(written), manifest).ok


def test_adapters_bound_to_a_checkpoint_are_written_as_diffusers_under_pipeline_names(tmp_path):
    """export --format diffusers of a LoRA registered against a single-file checkpoint: diffusers names, the same
    deltas once bound back to the checkpoint."""
    manifest = {**load_file(sd15_checkpoint(tmp_path / "sd15.safetensors"))}
    bound = check.bind(formats.read_adapter(factories.kohya_file(tmp_path / "k.safetensors", KOHYA_SD15)), manifest)
    out = formats.write_adapter(bound, tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    back = formats.read_adapter(out)
    assert "unet.down_blocks.0.resnets.0.conv1" in back.modules
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in back.modules
    rebound = check.bind(back, manifest)
    assert sorted(rebound.modules) == sorted(bound.modules)
    for name, module in bound.modules.items():
        assert torch.allclose(rebound.modules[name].delta(), module.delta())

    sdxl = load_file(checkpoint(tmp_path / "sdxl.safetensors", SDXL_TEXT))
    bound = check.bind(formats.read_adapter(factories.kohya_file(tmp_path / "x.safetensors", KOHYA_SDXL_TEXT)), sdxl)
    back = formats.read_adapter(formats.write_adapter(bound, tmp_path / "x-diffusers.safetensors", "diffusers"))
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj" in back.modules
    assert "text_encoder.text_model.encoder.layers.0.self_attn.v_proj" in back.modules
    assert "unet.down_blocks.1.attentions.0.proj_in" in back.modules
    assert check.bind(back, sdxl).modules.keys() == bound.modules.keys()


@pytest.mark.registry_backend
def test_registered_against_a_checkpoint_then_resized_and_exported_keeps_sd_scripts_names(tmp_path):
    """The registry path: a kohya SDXL LoRA registered against a single-file base is loaded bound to it; resize and
    export write it back under sd-scripts' names (A1111/ComfyUI would silently ignore any other)."""
    from loraops.st import read_header

    base = checkpoint(tmp_path / "sdxl.safetensors", SDXL_TEXT)
    lora = factories.kohya_file(tmp_path / "k.safetensors", KOHYA_SDXL_TEXT, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    run("base", "add", base, "--name", "sdxl")
    run("register", lora, "--name", "style", "--base", "sdxl")
    run("resize", "style", "--rank", "2", "--name", "small", "-o", tmp_path / "small.safetensors", "--format", "kohya")
    run("export", "style", "--format", "kohya", "-o", tmp_path / "exported.safetensors")
    for written in ["small.safetensors", "exported.safetensors"]:
        names = {k.rsplit(".", 2)[0] for k in read_header(tmp_path / written).tensors if k.endswith("lora_up.weight")}
        assert names == set(KOHYA_SDXL_TEXT), written
    assert "6/6 modules match" in run("check", tmp_path / "small.safetensors", "--base", "sdxl").output


def test_an_sdxl_unet_lora_without_sd_scripts_metadata_is_written_with_sdxl_names(tmp_path):
    """SDXL's UNet has sd-scripts names of its own (lora_unet_input_blocks_4_1_…), which the kohya writer picks when
    the adapter says SDXL. A diffusers SDXL LoRA on the UNet alone (no ss_* header, no text-encoder module) exported
    to kohya against an SDXL checkpoint, and a combine of two SDXL UNet LoRAs (whose header combine does not keep),
    were written with SD 1.x names (lora_unet_down_blocks_1_attentions_0_proj_in): binding takes the version from the
    base, as extract does (ldm.sd_scripts_metadata), and combine keeps what its inputs agree on."""
    from loraops.st import read_header

    def written(path):
        header = read_header(path)
        names = {k.rsplit(".", 2)[0] for k in header.tensors if k.endswith("lora_up.weight")}
        return names, header.metadata["ss_base_model_version"]

    base = checkpoint(tmp_path / "sdxl.safetensors", SDXL_TEXT)
    run("base", "add", base, "--name", "sdxl")
    diffusers_lora = formats.write_adapter(factories.lora_adapter(
        {"unet.down_blocks.1.attentions.0.proj_in": (8, 8)}, fmt="diffusers"), tmp_path / "d.safetensors", "diffusers")
    run("export", diffusers_lora, "--format", "kohya", "-o", tmp_path / "k.safetensors", "--base", "sdxl")
    assert written(tmp_path / "k.safetensors") == ({"lora_unet_input_blocks_4_1_proj_in"}, "sdxl_base_v1-0")
    for name, seed in (("a", 1), ("b", 2)):
        run("register", factories.kohya_file(tmp_path / f"{name}.safetensors", {"lora_unet_input_blocks_4_1_proj_in":
                                                                                 ((8,), (8,))}, seed=seed),
            "--name", name, "--base", "sdxl")
    run("combine", "a", "b", "--method", "cat", "-o", tmp_path / "ab.safetensors")
    assert written(tmp_path / "ab.safetensors") == ({"lora_unet_input_blocks_4_1_proj_in"}, "sdxl_base_v1-0")


def test_an_sd_unet_adapter_whose_modules_do_not_say_is_placed_by_the_version_its_header_records(tmp_path):
    """An adapter of UNet modules every SD-family UNet has (proj_in of input_blocks.4.1) is SDXL's or SD 1.x/2.x's
    as its header records (ldm.is_sdxl): sd-scripts' ss_base_model_version, else the SAI model spec's
    modelspec.architecture (stable-diffusion-xl-v1-base, stable-diffusion-v1, stable-diffusion-v2-768-v), which
    sd-scripts writes beside it and other trainers alone. A header of SD 1.x's model spec was refused with "neither
    these modules nor the adapter's header say which it is"."""
    from dataclasses import replace

    from loraops.st import read_header

    xl, sd = "lora_unet_input_blocks_4_1_proj_in", "lora_unet_down_blocks_1_attentions_0_proj_in"
    for metadata, name in [({"ss_base_model_version": "sdxl_base_v1-0"}, xl), ({"ss_base_model_version": "sd_v1"}, sd),
                           ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, xl),
                           ({"modelspec.architecture": "stable-diffusion-v1/lora"}, sd),
                           ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, sd)]:
        adapter = replace(factories.lora_adapter({"model.diffusion_model.input_blocks.4.1.proj_in": (8, 8)}),
                          metadata=metadata)
        written = formats.write_adapter(adapter, tmp_path / "k.safetensors", "kohya", force=True)
        assert {k.rsplit(".", 2)[0] for k in read_header(written).tensors} == {name}, metadata


# FLUX.1 in Black Forest Labs' layout, tiny: hidden 16, MLP 64, one double and one single block.
FLUX = {
    "img_in.weight": (16, 8), "txt_in.weight": (16, 12), "final_layer.linear.weight": (8, 16),
    "time_in.in_layer.weight": (16, 4), "vector_in.in_layer.weight": (16, 6),
    "double_blocks.0.img_attn.qkv.weight": (48, 16), "double_blocks.0.img_attn.qkv.bias": (48,),
    "double_blocks.0.txt_attn.qkv.weight": (48, 16), "double_blocks.0.img_attn.proj.weight": (16, 16),
    "double_blocks.0.txt_attn.proj.weight": (16, 16), "double_blocks.0.img_mlp.0.weight": (64, 16),
    "double_blocks.0.img_mlp.2.weight": (16, 64), "double_blocks.0.txt_mlp.0.weight": (64, 16),
    "double_blocks.0.txt_mlp.2.weight": (16, 64), "double_blocks.0.img_mod.lin.weight": (96, 16),
    "double_blocks.0.txt_mod.lin.weight": (96, 16), "double_blocks.0.img_attn.norm.query_norm.scale": (8,),
    "single_blocks.0.linear1.weight": (3 * 16 + 64, 16), "single_blocks.0.linear2.weight": (16, 16 + 64),
    "single_blocks.0.modulation.lin.weight": (48, 16),
    "final_layer.adaLN_modulation.1.weight": (32, 16),
}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "comfyui"])
def test_flux_names_agree_with_diffusers_converter(prefix):
    """diffusers' converter hard-codes FLUX.1's sizes (hidden 3072, MLP 12288) and only splits rows, so a checkpoint of
    one-column tensors of those heights stands for the real one (loraops reads the hidden size from the columns, so
    its manifest says 3072)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    hidden, mlp = 3072, 12288
    heights = {name: 4 for name in ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                                    "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
                                    "final_layer.linear", "final_layer.adaLN_modulation.1"]}
    for i in range(2):
        heights.update({f"double_blocks.{i}.{m}": 4 for m in ["img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                                                              "txt_mlp.0", "txt_mlp.2", "img_mod.lin", "txt_mod.lin"]})
        heights.update({f"double_blocks.{i}.img_attn.qkv": 3 * hidden, f"double_blocks.{i}.txt_attn.qkv": 3 * hidden,
                        f"single_blocks.{i}.linear1": 3 * hidden + mlp, f"single_blocks.{i}.linear2": 4,
                        f"single_blocks.{i}.modulation.lin": 4})
    tensors, decode = labelled({f"{prefix}{m}.weight": (h, 1) for m, h in heights.items()})
    tensors.update({f"{prefix}{m}.bias": torch.zeros(h, dtype=torch.float64) for m, h in heights.items()})

    converted = convert_flux_transformer_checkpoint_to_diffusers(Lenient(tensors))
    reference = {f"transformer.{key.removesuffix('.weight')}": source_rows(t, decode)
                 for key, t in converted.items() if key.endswith(".weight") and t is not None}
    reference = {k: (prefix + name.removeprefix(prefix), first, rows) for k, (name, first, rows) in reference.items()}
    manifest = {f"{prefix}{m}.weight": SimpleNamespace(shape=(h, hidden)) for m, h in heights.items()}
    ours = loraops_rows(ldm.diffusers_names(manifest), manifest)
    # norm_out.linear is diffusers' final_layer.adaLN_modulation.1 with its two halves swapped: no row-for-row name
    assert set(reference) - set(ours) == {"transformer.norm_out.linear"}
    assert ours == {k: v for k, v in reference.items() if k != "transformer.norm_out.linear"}
    assert ldm.diffusers_names(["img_in.weight", "model.layers.0.mlp.up_proj.weight"]) == {}  # FLUX only when FLUX


FLUX_LORA = {  # a diffusers-format FLUX LoRA (ai-toolkit, diffusers' trainers): split q/k/v, proj_mlp
    "transformer.transformer_blocks.0.attn.to_q": (16, 16), "transformer.transformer_blocks.0.attn.to_v": (16, 16),
    "transformer.transformer_blocks.0.attn.add_k_proj": (16, 16),
    "transformer.transformer_blocks.0.attn.to_out.0": (16, 16), "transformer.transformer_blocks.0.ff.net.0.proj": (64, 16),
    "transformer.single_transformer_blocks.0.attn.to_k": (16, 16),
    "transformer.single_transformer_blocks.0.proj_mlp": (64, 16), "transformer.single_transformer_blocks.0.proj_out": (16, 80),
    "transformer.x_embedder": (16, 8),
}


@pytest.mark.parametrize("chunk_elements", [None, 5 * 16], ids=["one-chunk", "chunks-across-parts"])
def test_merge_a_diffusers_flux_lora_into_a_bfl_checkpoint(tmp_path, monkeypatch, chunk_elements):
    from loraops import engine

    if chunk_elements:
        monkeypatch.setattr(engine, "CHUNK_ELEMENTS", chunk_elements)
    base = checkpoint(tmp_path / "flux.safetensors", FLUX)
    lora = formats.write_adapter(factories.lora_adapter(FLUX_LORA, fmt="diffusers"),
                                 tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    adapter = formats.read_adapter(lora)
    report = engine.merge(base, [(adapter, 0.5)], tmp_path / "out.safetensors", device="cpu")
    assert report.tensors_merged == 7
    original, merged = load_file(base), load_file(tmp_path / "out.safetensors")

    def part(name, rows=16):
        """0.5·s·B·A of the LoRA's module (diffusers name), zeros for a part it does not train."""
        module = adapter.modules.get(f"transformer.{name}")
        if module is None:
            return torch.zeros(rows, 16, dtype=torch.float64)
        return 0.5 * module.scale * (module.B.double() @ module.A.double())

    expected = {
        "double_blocks.0.img_attn.qkv.weight": torch.cat([part(f"transformer_blocks.0.attn.to_{p}") for p in "qkv"]),
        "double_blocks.0.txt_attn.qkv.weight": torch.cat([part(f"transformer_blocks.0.attn.add_{p}_proj") for p in "qkv"]),
        "single_blocks.0.linear1.weight": torch.cat([part(f"single_transformer_blocks.0.attn.to_{p}") for p in "qkv"]
                                                    + [part("single_transformer_blocks.0.proj_mlp", 64)]),
        "double_blocks.0.img_attn.proj.weight": part("transformer_blocks.0.attn.to_out.0"),
        "double_blocks.0.img_mlp.0.weight": part("transformer_blocks.0.ff.net.0.proj"),
        "single_blocks.0.linear2.weight": part("single_transformer_blocks.0.proj_out"),
        "img_in.weight": part("x_embedder"),
    }
    for tensor, change in expected.items():
        assert_rounded_once(merged[tensor], original[tensor].double() + change)
    for untouched in ["double_blocks.0.img_attn.qkv.bias", "txt_in.weight", "final_layer.adaLN_modulation.1.weight"]:
        assert torch.equal(merged[untouched], original[untouched])


def test_flux_loras_round_trip_through_kohya_and_diffusers(tmp_path):
    """kohya FLUX names (Black Forest Labs' paths, as sd-scripts writes them) bind directly and are written back the
    same; a diffusers LoRA on split q/k/v goes to kohya as one module per fused tensor, and back to diffusers as it
    was."""
    manifest = load_file(checkpoint(tmp_path / "flux.safetensors", FLUX))
    kohya_flux = {"lora_unet_double_blocks_0_img_attn_qkv": ((16,), (48,)), "lora_unet_single_blocks_0_linear1": ((16,), (112,)),
                  "lora_unet_single_blocks_0_linear2": ((80,), (16,))}
    assert kohya_round_trip(tmp_path, kohya_flux, manifest) == set(kohya_flux)

    bound = check.bind(formats.read_adapter(formats.write_adapter(
        factories.lora_adapter(FLUX_LORA, fmt="diffusers"), tmp_path / "d.safetensors", "diffusers")), manifest)
    assert bound.modules["single_blocks.0.linear1.proj_mlp"].fused == ("single_blocks.0.linear1.weight", 48, 64, 112)
    assert {"to_q", "add_k_proj", "proj_mlp"} <= set(bound.target_modules)  # the targets read as the LoRA's own

    # as kohya: the parts of each fused tensor joined into one module on it (sd-scripts has no names for parts), the
    # same delta: the parts' deltas in their rows, zeros where the LoRA trains nothing
    as_kohya = formats.read_adapter(formats.write_adapter(bound, tmp_path / "k-out.safetensors", "kohya"))
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
            "lora_unet_single_blocks_0_linear1", "lora_unet_img_in"} <= set(as_kohya.modules)
    assert not any(name.endswith(("_to_q", "_proj_mlp")) for name in as_kohya.modules)
    rebound = check.bind(as_kohya, manifest)
    for tensor in ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1"]:
        expected = torch.zeros(manifest[f"{tensor}.weight"].shape, dtype=torch.float64)
        for part in bound.modules.values():
            if part.fused and part.fused[0] == f"{tensor}.weight":
                expected[part.first_row : part.first_row + part.weight_shape[0]] = part.delta(dtype=torch.float64)
        assert torch.allclose(rebound.modules[tensor].delta(dtype=torch.float64), expected, rtol=1e-12, atol=0)
    as_diffusers = formats.read_adapter(formats.write_adapter(bound, tmp_path / "d-out.safetensors", "diffusers"))
    assert sorted(as_diffusers.modules) == sorted(FLUX_LORA)


def test_kohya_flux_names_are_written_back_the_same_behind_comfyuis_prefix(tmp_path):
    """sd-scripts names a FLUX module by its Black Forest Labs path (lora_unet_img_in), which a checkpoint saved by
    ComfyUI keeps behind model.diffusion_model.: the modules outside the blocks (img_in, final_layer.linear, …) were
    written back as lora_unet_model_diffusion_model_img_in, a name no FLUX loader knows (extract's too)."""
    manifest = load_file(checkpoint(tmp_path / "flux.safetensors", {f"model.diffusion_model.{k}": v for k, v in FLUX.items()}))
    kohya_flux = {"lora_unet_img_in": ((8,), (16,)), "lora_unet_final_layer_linear": ((16,), (8,)),
                  "lora_unet_double_blocks_0_img_attn_qkv": ((16,), (48,))}
    assert kohya_round_trip(tmp_path, kohya_flux, manifest) == set(kohya_flux)


def test_a_kohya_flux_lora_on_whole_fused_tensors_is_written_as_diffusers_parts(tmp_path):
    """sd-scripts trains FLUX's qkv and linear1 as one Linear each (lora_unet_double_blocks_0_img_attn_qkv), which
    diffusers names only in parts (to_q, to_k, to_v, proj_mlp). Written as diffusers, such a module was refused ("no
    pipeline component prefix"), so neither an sd-scripts FLUX LoRA nor loraops' own kohya export of a diffusers one
    could be written as diffusers. Each part is A and its rows of B, as diffusers' own converter splits it: the same
    delta on every tensor, and a diffusers LoRA through kohya comes back as it was (its parts, ranks and deltas)."""
    from dataclasses import replace

    from loraops import engine
    from loraops.errors import FormatError

    base = checkpoint(tmp_path / "flux.safetensors", FLUX)
    manifest = load_file(base)
    kohya_flux = {"lora_unet_double_blocks_0_img_attn_qkv": ((16,), (48,)), "lora_unet_single_blocks_0_linear1": ((16,), (112,)),
                  "lora_unet_single_blocks_0_linear2": ((80,), (16,))}
    kohya = formats.read_adapter(factories.kohya_file(tmp_path / "k.safetensors", kohya_flux, alpha=3.0))
    as_diffusers = formats.read_adapter(formats.write_adapter(check.bind(kohya, manifest), tmp_path / "d.safetensors",
                                                              "diffusers"))
    blocks = "transformer.transformer_blocks.0.attn", "transformer.single_transformer_blocks.0"
    assert sorted(as_diffusers.modules) == sorted([*(f"{blocks[0]}.to_{p}" for p in "qkv"),
                                                   *(f"{blocks[1]}.attn.to_{p}" for p in "qkv"),
                                                   f"{blocks[1]}.proj_mlp", f"{blocks[1]}.proj_out"])
    for out, adapter in (("from-kohya", kohya), ("from-diffusers", as_diffusers)):
        engine.merge(base, [(adapter, 1.0)], tmp_path / f"{out}.safetensors", device="cpu")
    from_kohya, from_diffusers = (load_file(tmp_path / f"{out}.safetensors") for out in ("from-kohya", "from-diffusers"))
    for tensor, merged in from_kohya.items():  # (fp16: an ulp apart where float32 sums land on both sides of one)
        torch.testing.assert_close(from_diffusers[tensor], merged, rtol=1e-3, atol=1e-3, msg=tensor)

    original = formats.read_adapter(formats.write_adapter(factories.lora_adapter(FLUX_LORA, fmt="diffusers"),
                                                          tmp_path / "o.safetensors", "diffusers"))
    through_kohya = formats.read_adapter(formats.write_adapter(check.bind(original, manifest), tmp_path / "ok.safetensors",
                                                               "kohya"))
    back = formats.read_adapter(formats.write_adapter(check.bind(through_kohya, manifest), tmp_path / "okd.safetensors",
                                                      "diffusers"))
    assert {n: m.rank for n, m in back.modules.items()} == {n: m.rank for n, m in original.modules.items()}
    for name, module in original.modules.items():
        torch.testing.assert_close(back.modules[name].delta(), module.delta(), rtol=1e-6, atol=1e-7)
    # a LoRA on the whole qkv beside one on its to_q (a combine of the two): refused, as the kohya writer refuses it
    whole, to_q = check.bind(through_kohya, manifest), "double_blocks.0.img_attn.qkv.to_q"
    mixed = replace(whole, modules={**whole.modules, to_q: check.bind(original, manifest).modules[to_q]})
    with pytest.raises(FormatError, match="two modules are both the pipeline's 'transformer.transformer_blocks.0.attn"
                                          ".to_q'; merge them first"):
        formats.write_adapter(mixed, tmp_path / "mixed.safetensors", "diffusers")


def test_merge_into_a_single_file_checkpoint_equals_diffusers_fuse_lora(tmp_path):
    """End to end against an independent implementation: a LoRA made by PEFT on a tiny diffusers UNet and saved by
    diffusers, merged by loraops into the same UNet saved as a single-file checkpoint (original names), equals what
    diffusers' fuse_lora makes of the diffusers UNet — every changed tensor, 3×3 resnet convs included."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from loraops import engine

    torch.manual_seed(0)
    unet, _ = diffusers_unet(SD15)
    table = reference_table(**SD15)

    def original_name(key):
        module, leaf = key.rsplit(".", 1)
        return f"model.diffusion_model.{reference_checkpoint_name(module, table)}.{leaf}"

    base = {key: value.clone() for key, value in unet.state_dict().items()}
    save_file({original_name(k): v.contiguous() for k, v in base.items()}, str(tmp_path / "sd.safetensors"))
    config = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj"])
    unet.add_adapter(config)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=config.to_dict())
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    fused = unet.state_dict()

    report = engine.merge(tmp_path / "sd.safetensors", [(formats.read_adapter(tmp_path / "lora"), 1.0)],
                          tmp_path / "merged.safetensors", device="cpu")
    merged = load_file(tmp_path / "merged.safetensors")
    changed = [key for key in fused if not torch.equal(fused[key], base[key])]
    assert report.tensors_merged == len(changed) > 150
    assert any("in_layers.2" in original_name(key) for key in changed)  # 3×3 convs of the resnets
    for key, value in fused.items():
        assert torch.allclose(merged[original_name(key)], value, rtol=0, atol=1e-6), key


def sd3_heights(hidden=8, layers=2, dual=(0,)):
    """{module: rows} of an SD3.5-style MMDiT: joint blocks (attn2 in the dual-attention ones, a last context block
    with no output projection or MLP, as SD3's is), embedders, final layer."""
    heights = {"x_embedder.proj": hidden, "context_embedder": hidden, "t_embedder.mlp.0": hidden,
               "t_embedder.mlp.2": hidden, "y_embedder.mlp.0": hidden, "y_embedder.mlp.2": hidden,
               "final_layer.linear": 4, "final_layer.adaLN_modulation.1": 2 * hidden}
    for i in range(layers):
        block = f"joint_blocks.{i}."
        heights.update({block + "x_block.attn.qkv": 3 * hidden, block + "context_block.attn.qkv": 3 * hidden,
                        block + "x_block.attn.proj": hidden, block + "x_block.mlp.fc1": 4 * hidden,
                        block + "x_block.mlp.fc2": hidden, block + "x_block.adaLN_modulation.1": 6 * hidden,
                        block + "context_block.adaLN_modulation.1": 6 * hidden})
        if i < layers - 1:
            heights.update({block + "context_block.attn.proj": hidden, block + "context_block.mlp.fc1": 4 * hidden,
                            block + "context_block.mlp.fc2": hidden})
        if i in dual:
            heights.update({block + "x_block.attn2.qkv": 3 * hidden, block + "x_block.attn2.proj": hidden})
    return heights


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bare", "comfyui"])
def test_sd3_names_agree_with_diffusers_converter(prefix):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    heights = sd3_heights()
    tensors, decode = labelled({f"{prefix}{m}.weight": (h, 1) for m, h in heights.items()})
    tensors.update({f"{prefix}{m}.bias": torch.zeros(h, dtype=torch.float64) for m, h in heights.items()})

    converted = convert_sd3_transformer_checkpoint_to_diffusers(Lenient(tensors))
    reference = {}
    for key, t in converted.items():
        if key.endswith(".weight") and t is not None:
            name, first, rows = source_rows(t, decode)
            reference[f"transformer.{key.removesuffix('.weight')}"] = (prefix + name.removeprefix(prefix), first, rows)
    manifest = {f"{prefix}{m}.weight": SimpleNamespace(shape=(h, 8)) for m, h in heights.items()}
    ours = loraops_rows(ldm.diffusers_names(manifest), manifest)
    # adaLN projections diffusers reorders (final layer, last context block) and, since which context block is last
    # is not in its path, every context block's adaLN: no row-for-row names
    left_out = {"transformer.norm_out.linear", "transformer.transformer_blocks.0.norm1_context.linear",
                "transformer.transformer_blocks.1.norm1_context.linear"}
    assert set(reference) - set(ours) == left_out
    assert ours == {k: v for k, v in reference.items() if k not in left_out}


def test_merge_a_diffusers_sd3_lora_into_an_mmdit_checkpoint(tmp_path, monkeypatch):
    from loraops import engine

    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 5 * 8)  # chunk boundaries inside the q/k/v blocks
    heights = sd3_heights()
    base = checkpoint(tmp_path / "sd3.safetensors", {f"{m}.weight": (h, 8) for m, h in heights.items()})
    lora = formats.write_adapter(factories.lora_adapter({
        "transformer.transformer_blocks.0.attn.to_k": (8, 8), "transformer.transformer_blocks.0.attn2.to_q": (8, 8),
        "transformer.transformer_blocks.1.attn.add_v_proj": (8, 8), "transformer.transformer_blocks.0.ff.net.0.proj": (32, 8),
    }, fmt="diffusers"), tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    adapter = formats.read_adapter(lora)
    engine.merge(base, [(adapter, 1.0)], tmp_path / "out.safetensors", device="cpu")
    original, merged = load_file(base), load_file(tmp_path / "out.safetensors")

    def delta(name):
        module = adapter.modules[f"transformer.{name}"]
        return module.scale * (module.B.double() @ module.A.double())

    zero = torch.zeros(8, 8, dtype=torch.float64)
    expected = {
        "joint_blocks.0.x_block.attn.qkv.weight": torch.cat([zero, delta("transformer_blocks.0.attn.to_k"), zero]),
        "joint_blocks.0.x_block.attn2.qkv.weight": torch.cat([delta("transformer_blocks.0.attn2.to_q"), zero, zero]),
        "joint_blocks.1.context_block.attn.qkv.weight": torch.cat([zero, zero, delta("transformer_blocks.1.attn.add_v_proj")]),
        "joint_blocks.0.x_block.mlp.fc1.weight": delta("transformer_blocks.0.ff.net.0.proj"),
    }
    for tensor, change in expected.items():
        assert_rounded_once(merged[tensor], original[tensor].double() + change)
    assert torch.equal(merged["joint_blocks.1.x_block.attn.qkv.weight"], original["joint_blocks.1.x_block.attn.qkv.weight"])


def test_parts_with_different_scales_join_into_one_kohya_module_exactly(tmp_path):
    from dataclasses import replace

    manifest = load_file(checkpoint(tmp_path / "flux.safetensors", FLUX))
    bound = check.bind(formats.read_adapter(formats.write_adapter(
        factories.lora_adapter(FLUX_LORA, fmt="diffusers"), tmp_path / "d.safetensors", "diffusers")), manifest)
    to_k = "single_blocks.0.linear1.to_k"
    modules = {**bound.modules, to_k: replace(bound.modules[to_k], alpha=12.0, scale=3.0)}  # proj_mlp keeps 2.0
    bound = replace(bound, modules=modules)
    rebound = check.bind(formats.read_adapter(formats.write_adapter(bound, tmp_path / "k.safetensors", "kohya")), manifest)
    joined = rebound.modules["single_blocks.0.linear1"]
    assert joined.rank == 8 and joined.scale == 1.0
    expected = torch.zeros(112, 16, dtype=torch.float64)
    for name in [to_k, "single_blocks.0.linear1.proj_mlp"]:
        part = modules[name]
        expected[part.first_row : part.first_row + part.weight_shape[0]] = part.delta(dtype=torch.float64)
    assert torch.allclose(joined.delta(dtype=torch.float64), expected, rtol=1e-6, atol=0)


def test_diffusers_file_with_network_alphas_scales_like_diffusers(tmp_path):
    """Some FLUX trainers add kohya-style "<module>.alpha" keys to diffusers-format files; diffusers reads them as the
    modules' alphas. Reference: diffusers loading the file into a tiny FluxTransformer2DModel and fusing it."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    modules = {"transformer.single_transformer_blocks.0.attn.to_k": 2.0, "transformer.transformer_blocks.0.attn.to_q": 8.0}
    tensors = {}
    for name, alpha in modules.items():
        tensors[f"{name}.lora_A.weight"] = torch.randn(4, 32, generator=g)
        tensors[f"{name}.lora_B.weight"] = torch.randn(32, 4, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    path = tmp_path / "flux.safetensors"
    save_file(tensors, str(path))
    adapter = formats.read_adapter(path)
    assert {n: m.scale for n, m in adapter.modules.items()} == {
        "transformer.single_transformer_blocks.0.attn.to_k": 0.5, "transformer.transformer_blocks.0.attn.to_q": 2.0}
    state, alphas = FluxLoraLoaderMixin.lora_state_dict(path, return_alphas=True)
    FluxLoraLoaderMixin.load_lora_into_transformer(state, network_alphas=alphas, transformer=transformer)
    transformer.fuse_lora()
    fused = transformer.state_dict()
    for name, module in adapter.modules.items():
        weight = name.removeprefix("transformer.") + ".weight"
        delta = fused[weight.replace(".weight", ".base_layer.weight")] - before[weight]
        torch.testing.assert_close(delta, module.delta(), rtol=0, atol=1e-5)
    tensors["transformer.transformer_blocks.0.attn.to_q.alpha"] = torch.tensor(0.0)  # 0 means r, as in kohya files
    save_file(tensors, str(path))
    assert formats.read_adapter(path).modules["transformer.transformer_blocks.0.attn.to_q"].scale == 1.0


def test_a_combine_of_diffusers_and_kohya_flux_loras_is_written_as_diffusers(tmp_path):
    """The diffusers writer names modules from the checkpoint names they are bound to: a combine mixing a diffusers
    FLUX LoRA with a kohya one (only on img_in) is written under diffusers' pipeline names, every module."""
    from loraops import algebra

    manifest = load_file(checkpoint(tmp_path / "flux.safetensors", FLUX))
    blocks_only = {name: shape for name, shape in FLUX_LORA.items() if name != "transformer.x_embedder"}
    diffusers_lora = check.bind(formats.read_adapter(formats.write_adapter(
        factories.lora_adapter(blocks_only, fmt="diffusers"), tmp_path / "d.safetensors", "diffusers")), manifest)
    kohya = check.bind(formats.read_adapter(factories.kohya_file(tmp_path / "k.safetensors",
                                                                 {"lora_unet_img_in": ((8,), (16,))})), manifest)
    combined, _ = algebra.combine([(diffusers_lora, 1.0), (kohya, 1.0)], "cat", device="cpu")
    back = formats.read_adapter(formats.write_adapter(combined, tmp_path / "c.safetensors", "diffusers"))
    assert sorted(back.modules) == sorted(FLUX_LORA)  # img_in, from the kohya input alone, as transformer.x_embedder


def test_a_distilled_unet_of_one_resnet_a_level_is_not_named_by_ldm_checkpoint_paths(tmp_path):
    """Checkpoint paths number two resnets per down level and three per up level (input_blocks.3·level + slot + 1).
    A pipeline's UNet of one resnet a level (a distilled SDXL) was taken for that layout: the sgm name of its up level
    1's second resnet (output_blocks.3.0, in its own checkpoint) bound to the first (up_blocks.1.resnets.0), silently
    where their shapes agree (conv2), and an adapter bound to it was written `--format kohya` under such names. The
    names do not bind now ("not in base"), and the kohya writer refuses; diffusers names still work."""
    import json

    from diffusers import UNet2DConditionModel
    from loraops.basemodel import BaseModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=64, norm_num_groups=8,
        attention_head_dim=(2, 4), block_out_channels=(16, 32), use_linear_projection=True,
        transformer_layers_per_block=(1, 1), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4)
    pipe = tmp_path / "pipe"
    unet.save_pretrained(pipe / "unet")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    conv2 = dict(unet.named_modules())["up_blocks.1.resnets.1.conv2"].weight.shape
    assert conv2 == dict(unet.named_modules())["up_blocks.1.resnets.0.conv2"].weight.shape  # (the silent case)
    g = torch.Generator().manual_seed(1)
    key = "lora_unet_output_blocks_3_0_out_layers_3"
    save_file({f"{key}.lora_down.weight": torch.randn(2, conv2[1], 3, 3, generator=g),
               f"{key}.lora_up.weight": torch.randn(conv2[0], 2, 1, 1, generator=g), f"{key}.alpha": torch.tensor(2.0)},
              str(tmp_path / "sgm.safetensors"), {"ss_network_module": "networks.lora",
                                                  "ss_base_model_version": "sdxl_base_v1-0"})
    report = check.check(formats.read_adapter(tmp_path / "sgm.safetensors"), BaseModel.open(pipe))
    assert not report.ok and report.matched == 0 and report.missing == [key]

    save_file({"unet.up_blocks.1.resnets.0.conv2.lora_A.weight": torch.randn(2, conv2[1], 3, 3, generator=g),
               "unet.up_blocks.1.resnets.0.conv2.lora_B.weight": torch.randn(conv2[0], 2, 1, 1, generator=g)},
              str(tmp_path / "diffusers.safetensors"))
    run("base", "add", pipe, "--name", "distilled")
    refused = run("export", tmp_path / "diffusers.safetensors", "--format", "kohya", "--base", "distilled", "-o",
                  tmp_path / "k.safetensors", code=2)
    assert refused.output == (
        f"error: {tmp_path / 'diffusers.safetensors'}: sd-scripts names the SDXL UNet by checkpoint paths, which "
        "number two resnets per down level and three per up level; the bound pipeline's UNet has other levels (a "
        "distilled one), so those names would be other modules': write it as diffusers or peft\n")
    assert not (tmp_path / "k.safetensors").exists()
    run("export", tmp_path / "diffusers.safetensors", "--format", "diffusers", "--base", "distilled", "-o",
        tmp_path / "d.safetensors")
