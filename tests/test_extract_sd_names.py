"""sd-scripts' names and header of what extract makes of single-file SD3 / SDXL / SD 2.x / FLUX checkpoints.

The reference for names is sd-scripts' own rule, run here on the transformers models it loads the text encoders
into (networks/lora_sd3.py, lora_flux.py: every nn.Linear inside a CLIPAttention, CLIPMLP, T5Attention or
T5DenseGatedActDense, named ``<prefix>_<path in the model with _>``, prefix lora_te1 CLIP-L, lora_te2 CLIP-G,
lora_te3 T5-XXL); the checkpoints hold those models' own tensors behind SD3's prefixes
(``text_encoders.clip_l.transformer.``…), as sd-scripts' sd3_utils.py and diffusers' single-file loader read them.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_extract import run
from test_ldm import sd3_heights

TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "T5Attention", "T5DenseGatedActDense")  # lora_sd3.py


def sd_scripts_names(prefix, model):
    """{kohya name: the Linear's path in ``model``}, as sd-scripts' LoRANetwork.create_modules names them."""
    names = {}
    for name, module in model.named_modules():
        if type(module).__name__ in TARGETS:
            for child, linear in module.named_modules():
                if type(linear).__name__ == "Linear":
                    names[f"{prefix}.{name}.{child}".replace(".", "_")] = f"{name}.{child}"
    return names


def sd3_text_encoders():
    """SD3's three text encoders, tiny and seeded: {checkpoint prefix: (sd-scripts prefix, model)}."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = dict(intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, vocab_size=32,
                max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return {
        "text_encoders.clip_l.transformer.": ("lora_te1", CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=8, projection_dim=8, **clip))),
        "text_encoders.clip_g.transformer.": ("lora_te2", CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=12, projection_dim=12, **clip))),
        "text_encoders.t5xxl.transformer.": ("lora_te3", T5EncoderModel(T5Config(
            d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2, vocab_size=32, feed_forward_proj="gated-gelu"))),
    }


def test_sd3_text_encoders_get_sd_scripts_names_and_merge_back(tmp_path):
    """An SD3 checkpoint (ComfyUI's layout: MMDiT behind model.diffusion_model.) whose text encoders and one joint
    block changed: every text-encoder Linear is one module named as sd-scripts names it (lora_te1_/lora_te2_/
    lora_te3_, not lora_unet_text_encoders_…), its up·down the change of the tensor sd-scripts' name says; T5's
    relative_attention_bias, an nn.Embedding, is left out as embeddings are; merged back (the kohya file bound to
    the checkpoint again), the tuned tensors."""
    encoders = sd3_text_encoders()
    base = {f"model.diffusion_model.{m}.weight": torch.randn(h, 8) for m, h in sd3_heights().items()}
    reference = {}  # kohya name → checkpoint tensor
    for prefix, (kohya, model) in encoders.items():
        base.update({prefix + k: v.detach().clone() for k, v in model.state_dict().items()})
        reference.update({name: f"{prefix}{path}.weight" for name, path in sd_scripts_names(kohya, model).items()})
    del base["text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"]  # saved once, as shared.weight
    g = torch.Generator().manual_seed(1)
    qkv = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
    bias = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    tuned = {k: v.clone() for k, v in base.items()}
    for name in [*reference.values(), qkv, bias]:
        tuned[name] += 0.1 * torch.randn(tuned[name].shape, generator=g)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))

    code, out = run("extract", "--base", tmp_path / "base.safetensors", "--tuned", tmp_path / "tuned.safetensors",
                    "--rank", "16", "-o", tmp_path / "x.safetensors", "--json")
    assert code == 0, out
    assert [(s["name"], s["reason"]) for s in json.loads(out)["report"]["skipped"]] == [(bias, "embedding")]
    lora = load_file(tmp_path / "x.safetensors")
    written = {k.removesuffix(".lora_up.weight") for k in lora if k.endswith(".lora_up.weight")}
    assert written == {*reference, "lora_unet_joint_blocks_0_x_block_attn_qkv"}
    for name, tensor in reference.items():
        delta = lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"]  # alpha = rank: scale 1
        torch.testing.assert_close(delta, tuned[tensor] - base[tensor], rtol=0, atol=2e-6, msg=name)

    code, out = run("merge", tmp_path / "x.safetensors", "--into", tmp_path / "base.safetensors",
                    "-o", tmp_path / "m.safetensors", "--no-record")
    assert code == 0 and f"{len(reference) + 1} tensors merged" in out, out
    merged = load_file(tmp_path / "m.safetensors")
    for name in [*reference.values(), qkv]:
        torch.testing.assert_close(merged[name], tuned[name], rtol=0, atol=2e-6, msg=name)


def test_the_sdxl_refiners_openclip_is_split_and_named_as_text_encoder_2(tmp_path):
    """The SDXL refiner keeps its only text encoder, OpenCLIP bigG, under conditioner.embedders.0.model.: its
    in_proj_weight is q, k, v as SDXL's second encoder's is (a module each), named lora_te2_ (its diffusers pipeline
    calls it text_encoder_2, which diffusers' kohya loader gives lora_te2_), and merged back into its rows. Its
    header says sdxl_base_v1-0, deliberately (see ldm.SDXL: sd-scripts has no other SDXL version, A1111 reads the
    "sdxl_" prefix alone)."""
    from test_extract_fused import K_AND_V, kohya_modules, pair
    from test_ldm import SDXL_TEXT

    from loraops.st import read_header

    refiner = "conditioner.embedders.0.model."
    base, tuned = pair(tmp_path, SDXL_TEXT, K_AND_V, prefix=refiner)
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "16", "-o", tmp_path / "x.safetensors")
    assert code == 0, out
    assert kohya_modules(tmp_path / "x.safetensors") == [
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj", "lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
        "lora_te2_text_model_encoder_layers_0_self_attn_v_proj"]
    assert read_header(tmp_path / "x.safetensors").metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    code, out = run("merge", tmp_path / "x.safetensors", "--into", base, "-o", tmp_path / "m.safetensors", "--no-record")
    assert code == 0, out
    merged, want = load_file(tmp_path / "m.safetensors"), load_file(tuned)
    for name in want:
        torch.testing.assert_close(merged[name], want[name], rtol=0, atol=2e-6, msg=name)


def test_sd3_text_encoder_files_written_before_still_bind(tmp_path):
    """A kohya file extract wrote before (text encoders as lora_unet_text_encoders_clip_l_transformer_…) still binds
    to the SD3 checkpoint, beside sd-scripts' lora_te1_ names for the same module."""
    import factories
    from loraops import check, formats

    encoders = sd3_text_encoders()
    prefix, (_, model) = next(iter(encoders.items()))
    manifest = {prefix + k: v for k, v in model.state_dict().items()}
    path = "text_model_encoder_layers_0_self_attn_q_proj"
    for name in (f"lora_te1_{path}", f"lora_unet_text_encoders_clip_l_transformer_{path}"):
        lora = factories.kohya_file(tmp_path / f"{name}.safetensors", {name: ((8,), (8,))})
        bound = check.bind(formats.read_adapter(lora), manifest)
        assert list(bound.modules) == [f"{prefix}text_model.encoder.layers.0.self_attn.q_proj"], name


def unet_checkpoint(layout):
    """A tiny diffusers UNet of ``layout`` (test_ldm.SD15 / SDXL) as a single-file checkpoint holding the UNet alone,
    under the original names diffusers' conversion table gives it."""
    from test_ldm import diffusers_unet, reference_checkpoint_name, reference_table

    torch.manual_seed(0)
    unet, _ = diffusers_unet(layout)
    table = reference_table(**layout)
    out = {}
    for key, value in unet.state_dict().items():
        module, leaf = key.rsplit(".", 1)
        out[f"model.diffusion_model.{reference_checkpoint_name(module, table)}.{leaf}"] = value.detach().clone()
    return out


def test_an_sdxl_checkpoint_of_the_unet_alone_gets_sdxl_names_and_header(tmp_path):
    """SDXL is known by its UNet's structure (label_emb: the size/crop embedding SD 1.x/2.x lack), not by its text
    encoders: a checkpoint of the UNet alone got SD 1.x names (lora_unet_down_blocks_1_attentions_0_proj_in) and no
    ss_base_model_version; sd-scripts names SDXL's UNet by the checkpoint's own paths. An SD 1.x UNet alone keeps
    diffusers block names."""
    from test_ldm import SD15, SDXL

    from loraops.st import read_header

    changed = {"sdxl": ["input_blocks.4.1.proj_in", "label_emb.0.0", "output_blocks.2.2.conv"],
               "sd15": ["input_blocks.1.1.proj_in", "output_blocks.11.1.transformer_blocks.0.attn2.to_k"]}
    for layout, id_ in ((SDXL, "sdxl"), (SD15, "sd15")):
        base = unet_checkpoint(layout)
        tuned = {k: v.clone() for k, v in base.items()}
        g = torch.Generator().manual_seed(2)
        for module in changed[id_]:
            tensor = f"model.diffusion_model.{module}.weight"
            tuned[tensor] += 0.1 * torch.randn(tuned[tensor].shape, generator=g)
        save_file(base, str(tmp_path / f"{id_}.safetensors"))
        save_file(tuned, str(tmp_path / f"{id_}-ft.safetensors"))
        code, out = run("extract", "--base", tmp_path / f"{id_}.safetensors", "--tuned", tmp_path / f"{id_}-ft.safetensors",
                        "--rank", "2", "-o", tmp_path / f"{id_}-x.safetensors")
        assert code == 0, out
        header = read_header(tmp_path / f"{id_}-x.safetensors")
        names = sorted(k.removesuffix(".lora_up.weight") for k in header.tensors if k.endswith(".lora_up.weight"))
        if id_ == "sdxl":
            assert names == sorted(f"lora_unet_{m.replace('.', '_')}" for m in changed[id_])
            assert header.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
        else:
            assert names == ["lora_unet_down_blocks_0_attentions_0_proj_in",
                             "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k"]
            # SD 1.x by its cross-attention's context width (not SD 2.x's 1024), as diffusers' single-file loader
            # tells an SD UNet's version; sd-scripts' extract writes sd_v1 too, unless told --v2 (it wrote "")
            assert header.metadata["ss_base_model_version"] == "sd_v1"


def test_a_model_with_a_conditioner_of_its_own_is_no_sdxl(tmp_path):
    """Whose UNet a checkpoint holds is told by SDXL's text encoders (conditioner.embedders.), not by any
    "conditioner.": Stable Audio's (stable-audio-tools: conditioner.conditioners.prompt.model.… its T5, the DiT under
    model.model.) extract was recorded as sdxl_base_v1-0, where it recorded no version."""
    from test_extract_fused import low_rank, pair

    from loraops.st import read_header

    t5 = "conditioner.conditioners.prompt.model.encoder.block.0.layer.0.SelfAttention.q.weight"
    dit = "model.model.transformer.layers.0.self_attn.to_qkv.weight"
    base, tuned = pair(tmp_path, {t5: (8, 8), dit: (24, 8)}, {t5: (0, low_rank(8, 8, 2, 1)), dit: (0, low_rank(24, 8, 2, 2))})
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "--format", "kohya", "-o",
                    tmp_path / "x.safetensors")
    assert code == 0, out
    assert read_header(tmp_path / "x.safetensors").metadata["ss_base_model_version"] == ""


def test_sd2_header_is_sd_scripts_extracts_default_sd_v2_v(tmp_path):
    """sd-scripts' extract_lora_from_models.py --v2 writes ss_base_model_version from
    model_util.get_model_version_str_for_sd1_sd2(v2, v_parameterization), v_parameterization defaulting to v2:
    ``sd_v2_v`` with ss_v2 True (was empty)."""
    from test_extract_fused import K_AND_V, pair
    from test_ldm import SDXL_TEXT

    from loraops.st import read_header

    base, tuned = pair(tmp_path, SDXL_TEXT, K_AND_V, prefix="cond_stage_model.model.")
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "-o", tmp_path / "x.safetensors")
    assert code == 0, out
    metadata = read_header(tmp_path / "x.safetensors").metadata
    assert (metadata["ss_base_model_version"], metadata["ss_v2"], metadata["ss_network_module"]) == (
        "sd_v2_v", "True", "networks.lora")


@pytest.mark.registry_backend
def test_flux_and_sd3_files_name_sd_scripts_network_module(tmp_path):
    """sd-scripts writes ss_network_module networks.lora_flux for FLUX (flux_extract_lora.py, lora_flux.py) and
    networks.lora_sd3 for SD3 (lora_sd3.py), not networks.lora: extract does, and so does every kohya file of an
    adapter bound to such a base — one whose header says networks.lora (as loraops wrote FLUX files before) or
    LyCORIS' network, exported, and a combine of the two."""
    from test_extract_fused import low_rank, pair
    from test_ldm import FLUX

    import factories
    from loraops.st import read_header

    sd3 = {f"model.diffusion_model.{m}.weight": (h, 8) for m, h in sd3_heights().items()}
    for name, shapes, tensor, network in (
            ("flux", FLUX, "double_blocks.0.img_attn.qkv.weight", "networks.lora_flux"),
            ("sd3", sd3, "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "networks.lora_sd3")):
        folder = tmp_path / name
        folder.mkdir()
        base, tuned = pair(folder, shapes, {tensor: (0, low_rank(shapes[tensor][0], shapes[tensor][1], 2, 5))})
        assert run("base", "add", base, "--name", name)[0] == 0
        code, out = run("extract", "--base", name, "--tuned", tuned, "--rank", "2", "-o", folder / "x.safetensors")
        assert code == 0, out
        assert read_header(folder / "x.safetensors").metadata["ss_network_module"] == network, name

    for name, module in (("old", "networks.lora"), ("lyco", "lycoris.kohya")):
        factories.kohya_file(tmp_path / f"{name}.safetensors", {"lora_unet_double_blocks_0_img_attn_proj": ((16,), (16,))},
                             metadata={"ss_network_module": module, "ss_base_model_version": "flux1"})
        code, out = run("register", tmp_path / f"{name}.safetensors", "--name", name, "--base", "flux")
        assert code == 0, out
        assert run("export", name, "--format", "kohya", "-o", tmp_path / f"{name}-k.safetensors")[0] == 0
        assert read_header(tmp_path / f"{name}-k.safetensors").metadata["ss_network_module"] == "networks.lora_flux"
    assert run("combine", "old", "lyco", "--method", "cat", "-o", tmp_path / "c.safetensors")[0] == 0
    assert read_header(tmp_path / "c.safetensors").metadata["ss_network_module"] == "networks.lora_flux"
    # read unbound, a file keeps the sd-scripts network it names (LyCORIS' is none: a plain LoRA is written)
    for name, network in (("x", "networks.lora_flux"), ("lyco", "networks.lora")):
        source = tmp_path / "flux" / "x.safetensors" if name == "x" else tmp_path / "lyco.safetensors"
        assert run("export", source, "--format", "kohya", "-o", tmp_path / f"{name}-unbound.safetensors")[0] == 0
        assert read_header(tmp_path / f"{name}-unbound.safetensors").metadata["ss_network_module"] == network


def test_peft_is_refused_for_openclip_parts_alone_and_by_every_command_that_writes(tmp_path):
    """PEFT names modules, and OpenCLIP's q/k/v are rows of one in_proj_weight, a module of no model PEFT wraps: an
    adapter holding them is refused as PEFT by export, resize, combine and extract alike, in one line naming them
    (before, extract refused PEFT for every single-file checkpoint and the others wrote it). Anything else of such a
    checkpoint (LDM UNet paths, CLIP's own modules, OpenCLIP's out_proj and MLP) is written as PEFT, and reads back
    bound to the checkpoint as the same deltas. A combine of kohya inputs stays kohya without --format."""
    import factories
    from test_extract_fused import low_rank, pair
    from test_ldm import KOHYA_SDXL_TEXT, SDXL_TEXT, checkpoint

    from loraops import check, formats
    from loraops.registry import Registry

    base = checkpoint(tmp_path / "sdxl.safetensors", SDXL_TEXT)
    assert run("base", "add", base, "--name", "sdxl")[0] == 0
    parts = {k: v for k, v in KOHYA_SDXL_TEXT.items() if k.endswith(("_q_proj", "_v_proj")) and "lora_te2" in k}
    plain = {k: v for k, v in KOHYA_SDXL_TEXT.items() if k not in parts}
    for name, modules in (("parts", KOHYA_SDXL_TEXT), ("parts2", KOHYA_SDXL_TEXT), ("plain", plain)):
        lora = factories.kohya_file(tmp_path / f"{name}.safetensors", modules, seed=len(name))
        assert run("register", lora, "--name", name, "--base", "sdxl")[0] == 0
    te2 = "conditioner.embedders.1.model.transformer.resblocks.0.attn"
    refused = (f"{te2}.q_proj, {te2}.v_proj: rows of a fused tensor ({te2}.in_proj_weight) that no model PEFT wraps "
               "holds as a module, so it cannot be written as peft: use --format kohya or diffusers\n")
    commands = {"export": ["export", "{}", "--format", "peft", "-o", tmp_path / "{}-export"],
                "resize": ["resize", "{}", "--rank", "2", "--format", "peft", "-o", tmp_path / "{}-resize"],
                "combine": ["combine", "{}", "{}", "--method", "cat", "--format", "peft", "-o", tmp_path / "{}-combine"]}
    with Registry.open() as reg:
        before = len(reg.list_adapters())
    for command, args in commands.items():
        code, out = run(*(str(a).replace("{}", "parts") for a in args))
        assert (code, out) == (2, f"error: parts@1: {refused}"), command
        assert not (tmp_path / f"parts-{command}").exists()
        code, out = run(*(str(a).replace("{}", "plain") for a in args))
        assert code == 0, (command, out)
        written = formats.read_adapter(tmp_path / f"plain-{command}")
        assert written.format == "peft" and all(not n.startswith("lora_") for n in written.modules), command
    with Registry.open() as reg:
        assert len(reg.list_adapters()) == before + 2  # plain's resize and combine
    manifest = load_file(base)
    exported = check.bind(formats.read_adapter(tmp_path / "plain-export"), manifest)
    source = check.bind(formats.read_adapter(tmp_path / "plain.safetensors"), manifest)
    assert sorted(exported.modules) == sorted(source.modules)
    for name, module in source.modules.items():
        torch.testing.assert_close(exported.modules[name].delta(), module.delta(), rtol=0, atol=1e-6, msg=name)
    code, out = run("combine", "parts", "parts2", "--method", "cat", "-o", tmp_path / "kohya.safetensors")
    assert code == 0 and formats.detect(tmp_path / "kohya.safetensors") == "kohya", out

    proj_in = "model.diffusion_model.input_blocks.4.1.proj_in.weight"  # extract: a UNet change, as PEFT
    folder = tmp_path / "extract"
    folder.mkdir()
    base, tuned = pair(folder, SDXL_TEXT, {proj_in: (0, low_rank(8, 8, 2, 7))})
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "--format", "peft", "-o", folder / "p")
    assert code == 0, out
    config = json.loads((folder / "p" / "adapter_config.json").read_text())
    assert config["target_modules"] == [proj_in.removesuffix(".weight")]
    code, out = run("merge", folder / "p", "--into", base, "-o", folder / "m.safetensors", "--no-record")
    assert code == 0, out
    torch.testing.assert_close(load_file(folder / "m.safetensors")[proj_in], load_file(tuned)[proj_in], rtol=0,
                               atol=2e-6)


def test_an_sd2_header_says_v2_wherever_it_says_sd_v2_v(tmp_path):
    """sd-scripts reads SD 2.x from ss_v2 alone (svd_merge_lora.py: ``v2 == "True"`` picks the modelspec
    architecture; A1111 likewise), and writes ss_base_model_version and ss_v2 together. A kohya file with no version
    and ss_v2 "False" — what loraops writes for an adapter it cannot place (here: a diffusers SD 2.x LoRA exported
    unbound) — bound to an SD 2.x checkpoint took sd_v2_v from the base but kept its ss_v2 "False": a header that says
    SD 2.x and SD 1.x at once. The base decides both when the file names no version; a version the file names is
    kept with its own ss_v2."""
    import factories
    from test_extract_fused import pair
    from test_ldm import SDXL_TEXT

    from loraops import formats
    from loraops.st import read_header

    base, _ = pair(tmp_path, SDXL_TEXT, {}, prefix="cond_stage_model.model.")
    assert run("base", "add", base, "--name", "sd2")[0] == 0
    diffusers_lora = formats.write_adapter(factories.lora_adapter(
        {"text_encoder.text_model.encoder.layers.0.mlp.fc1": (40, 16)}, fmt="diffusers"), tmp_path / "d.safetensors",
        "diffusers")
    assert run("export", diffusers_lora, "--format", "kohya", "-o", tmp_path / "unplaced.safetensors")[0] == 0
    unplaced = read_header(tmp_path / "unplaced.safetensors").metadata
    assert (unplaced["ss_base_model_version"], unplaced["ss_v2"]) == ("", "False")
    named = factories.kohya_file(tmp_path / "named.safetensors", {"lora_te_text_model_encoder_layers_0_mlp_fc1": (
        (16,), (40,))}, metadata={"ss_base_model_version": "sd_v2", "ss_v2": "True"})
    for source, want in ((tmp_path / "unplaced.safetensors", ("sd_v2_v", "True")), (named, ("sd_v2", "True"))):
        out = tmp_path / f"{source.stem}-bound.safetensors"
        code, text = run("export", source, "--format", "kohya", "--base", "sd2", "-o", out)
        assert code == 0, text
        metadata = read_header(out).metadata
        assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == want, source.stem


def pipeline_component(pipeline, cls):
    """The component of a diffusers pipeline that holds a model of class ``cls`` (by its __init__ annotation)."""
    import inspect

    (name,) = [p.name for p in inspect.signature(pipeline.__init__).parameters.values() if p.annotation is cls]
    return name


def test_a_flux_checkpoints_t5_is_its_pipelines_text_encoder_2(tmp_path):
    """diffusers' FluxPipeline holds CLIP-L as text_encoder and T5-XXL as text_encoder_2 (SD3's pipeline: T5 is
    text_encoder_3), and its single-file loader fills them from text_encoders.clip_l./t5xxl.transformer. of a
    ComfyUI FLUX checkpoint. The T5 of such a checkpoint was named text_encoder_3 as SD3's is: a diffusers file of
    it held keys no FLUX pipeline has, and a diffusers FLUX LoRA on text_encoder_2 did not bind. Written as diffusers
    (also a T5-only adapter, which holds no FLUX module to tell the family by) and bound back, the same kohya file."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from transformers import CLIPTextModel, T5EncoderModel

    from loraops import check, formats
    from test_ldm import FLUX

    t5 = pipeline_component(FluxPipeline, T5EncoderModel)
    assert (pipeline_component(FluxPipeline, CLIPTextModel), t5) == ("text_encoder", "text_encoder_2")
    assert pipeline_component(StableDiffusion3Pipeline, T5EncoderModel) == "text_encoder_3"
    encoders = {k: v for k, v in sd3_text_encoders().items() if "clip_g" not in k}
    base = {f"model.diffusion_model.{k}": torch.randn(s, generator=torch.Generator().manual_seed(3))
            for k, s in FLUX.items()}
    for prefix, (_, model) in encoders.items():
        base.update({prefix + k: v.detach().clone() for k, v in model.state_dict().items()})
    del base["text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"]
    save_file(base, str(tmp_path / "flux.safetensors"))
    assert run("base", "add", tmp_path / "flux.safetensors", "--name", "flux")[0] == 0
    clip = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    t5_q = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"
    for name, changed in (("both", [clip, t5_q]), ("t5", [t5_q])):
        tuned = {k: v.clone() for k, v in base.items()}
        for module in changed:
            tuned[f"{module}.weight"] += 0.1
        save_file(tuned, str(tmp_path / f"{name}.safetensors"))
        kohya = tmp_path / f"{name}-x.safetensors"
        code, out = run("extract", "--base", "flux", "--tuned", tmp_path / f"{name}.safetensors", "--rank", "1",
                        "-o", kohya, "--name", name)
        assert code == 0, out
        code, out = run("export", name, "--format", "diffusers", "-o", tmp_path / f"{name}-d.safetensors")
        assert code == 0, out
        written = {k.rsplit(".", 2)[0] for k in load_file(tmp_path / f"{name}-d.safetensors")}
        want = {f"{t5}.encoder.block.0.layer.0.SelfAttention.q"}
        if clip in changed:
            want.add("text_encoder.text_model.encoder.layers.0.self_attn.q_proj")
        assert written == want, name
        back = check.bind(formats.read_adapter(tmp_path / f"{name}-d.safetensors"), load_file(tmp_path / "flux.safetensors"))
        assert sorted(back.modules) == sorted(changed), name
        code, out = run("export", tmp_path / f"{name}-d.safetensors", "--format", "kohya", "--base", "flux",
                        "-o", tmp_path / f"{name}-k.safetensors")
        assert code == 0, out
        assert sorted(load_file(tmp_path / f"{name}-k.safetensors")) == sorted(load_file(kohya)), name


def test_an_sd2_unclip_checkpoint_keeps_sd2_names_beside_its_label_emb(tmp_path):
    """SD 2.x unCLIP's UNet has a label_emb too (its image-embedding class embedding), as SDXL's UNet has (the
    size/crop embedding): its OpenCLIP text encoder decides, so it stays SD 2.x — diffusers block names (sd-scripts'
    for SD 2.x) and sd_v2_v, not SDXL's checkpoint paths and sdxl_base_v1-0 — and its label_emb is diffusers'
    class_embedding, as diffusers' convert_ldm_unet_checkpoint names an unCLIP UNet's (it was SDXL's add_embedding):
    the kohya file's lora_unet_class_embedding_linear_1, a diffusers export's unet.class_embedding.linear_1, both
    bound back to the label_emb."""
    from test_extract_fused import low_rank, pair
    from test_ldm import SDXL_TEXT

    from loraops import check, formats
    from loraops.st import read_header

    label_emb = "model.diffusion_model.label_emb.0.0.weight"
    shapes = {**SDXL_TEXT, label_emb: (8, 4)}
    proj_in = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    base, tuned = pair(tmp_path, shapes, {proj_in: (0, low_rank(8, 8, 2, 5)), label_emb: (0, low_rank(8, 4, 2, 6))})
    sd2 = {}
    for path in (base, tuned):  # SD 2.x's layout: OpenCLIP under cond_stage_model.model., no CLIP-L
        sd2[path] = {k.replace("conditioner.embedders.1.model.", "cond_stage_model.model."): v
                     for k, v in load_file(path).items() if not k.startswith("conditioner.embedders.0.")}
        save_file(sd2[path], str(path))
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "-o", tmp_path / "x.safetensors")
    assert code == 0, out
    header = read_header(tmp_path / "x.safetensors")
    assert {k.rsplit(".", 2)[0] for k in header.tensors if k.endswith(".lora_up.weight")} == {
        "lora_unet_down_blocks_1_attentions_0_proj_in", "lora_unet_class_embedding_linear_1"}
    assert (header.metadata["ss_base_model_version"], header.metadata["ss_v2"]) == ("sd_v2_v", "True")
    bound = check.bind(formats.read_adapter(tmp_path / "x.safetensors"), sd2[base])
    diffusers = formats.read_adapter(formats.write_adapter(bound, tmp_path / "d.safetensors", "diffusers"))
    assert sorted(diffusers.modules) == ["unet.class_embedding.linear_1", "unet.down_blocks.1.attentions.0.proj_in"]
    assert sorted(check.bind(diffusers, sd2[base]).modules) == sorted(bound.modules) == sorted(
        t.removesuffix(".weight") for t in (label_emb, proj_in))


def test_unclips_label_emb_under_the_sdxl_name_loraops_wrote_before_still_binds(tmp_path):
    """loraops wrote SD 2.x unCLIP's label_emb under SDXL's add_embedding (lora_unet_add_embedding_linear_1,
    unet.add_embedding.linear_1) until it named it class_embedding, as diffusers does. Such files, and adapters
    registered from them, no longer bound to their checkpoint ("match no base module"): read, the old name is still
    the label_emb (an SD 1.x/2.x UNet has no add_embedding, so it names no other module), and written again it is
    class_embedding."""
    import factories
    from test_ldm import SDXL_TEXT, checkpoint

    from loraops import check, formats
    from loraops.st import read_header

    label_emb, proj_in = "model.diffusion_model.label_emb.0.0", "model.diffusion_model.input_blocks.4.1.proj_in"
    unclip = {k.replace("conditioner.embedders.1.model.", "cond_stage_model.model."): v for k, v in SDXL_TEXT.items()
              if not k.startswith("conditioner.embedders.0.")}
    base = checkpoint(tmp_path / "unclip.safetensors", {**unclip, f"{label_emb}.weight": (8, 4)})
    manifest = load_file(base)
    assert run("base", "add", base, "--name", "unclip")[0] == 0
    kohya = factories.kohya_file(tmp_path / "k.safetensors", {"lora_unet_add_embedding_linear_1": ((4,), (8,)),
                                                              "lora_unet_down_blocks_1_attentions_0_proj_in": ((8,), (8,))})
    diffusers = formats.write_adapter(factories.lora_adapter({"unet.add_embedding.linear_1": (8, 4),
                                                              "unet.down_blocks.1.attentions.0.proj_in": (8, 8)},
                                                             fmt="diffusers"), tmp_path / "d.safetensors", "diffusers")
    for name, lora, old in (("k", kohya, "lora_unet_add_embedding_linear_1"), ("d", diffusers, "unet.add_embedding.linear_1")):
        source = formats.read_adapter(lora)
        bound = check.bind(source, manifest)
        assert sorted(bound.modules) == [proj_in, label_emb]
        torch.testing.assert_close(bound.modules[label_emb].delta(), source.modules[old].delta(), rtol=0, atol=0)
        assert run("register", lora, "--name", name, "--base", "unclip")[0] == 0
        code, out = run("export", name, "--format", "kohya", "-o", tmp_path / f"{name}-again.safetensors")
        assert code == 0, out
        assert {k.rsplit(".", 2)[0] for k in read_header(tmp_path / f"{name}-again.safetensors").tensors} == {
            "lora_unet_class_embedding_linear_1", "lora_unet_down_blocks_1_attentions_0_proj_in"}


def test_peft_refuses_fused_parts_only_under_the_checkpoints_part_names(tmp_path):
    """PEFT names modules. A LoRA on FLUX's split q/k/v bound to a Black Forest Labs checkpoint is written as PEFT
    under the adapter's own names — a diffusers LoRA's (transformer.transformer_blocks.0.attn.to_q), byte for byte
    what its unbound export writes — but one whose own names are the checkpoint's part paths (a PEFT file of
    double_blocks.0.img_attn.qkv.to_q, as loraops wrote a bound diffusers FLUX LoRA before it kept own names) was
    written so again: names of no module of any model PEFT wraps (BFL's qkv and linear1 are one Linear each). It is
    refused in one line naming the ways out, which both work: kohya joins the parts into the fused tensor, diffusers
    names them as the pipeline does. By the same rule a diffusers LoRA on OpenCLIP's q/k/v, refused once bound to
    an SDXL checkpoint (while its unbound export wrote it), is written under its own names too."""
    import factories
    from test_ldm import FLUX, FLUX_LORA, SDXL_TEXT, checkpoint

    from loraops import check, formats
    from loraops.st import read_header

    flux = checkpoint(tmp_path / "flux.safetensors", FLUX)
    assert run("base", "add", flux, "--name", "flux")[0] == 0
    old = formats.write_adapter(factories.lora_adapter({
        "double_blocks.0.img_attn.qkv.to_q": (16, 16), "single_blocks.0.linear1.proj_mlp": (64, 16),
        "double_blocks.0.img_attn.proj": (16, 16)}), tmp_path / "old", "peft")
    code, out = run("export", old, "--base", "flux", "--format", "peft", "-o", tmp_path / "old-peft")
    assert (code, out) == (2, f"error: {old}: double_blocks.0.img_attn.qkv.to_q, single_blocks.0.linear1.proj_mlp: "
                              "rows of a fused tensor (double_blocks.0.img_attn.qkv.weight) that no model PEFT wraps "
                              "holds as a module, so it cannot be written as peft: use --format kohya or diffusers\n")
    assert not (tmp_path / "old-peft").exists()
    manifest = load_file(flux)
    source = check.bind(formats.read_adapter(old), manifest)
    for fmt, want in (("diffusers", {"transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_out.0",
                                     "transformer.single_transformer_blocks.0.proj_mlp"}),
                      ("kohya", {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1",
                                 "lora_unet_double_blocks_0_img_attn_proj"})):
        out = tmp_path / f"old.{fmt}.safetensors"
        assert run("export", old, "--base", "flux", "--format", fmt, "-o", out)[0] == 0
        assert {k.rsplit(".", 2)[0] for k in load_file(out) if k.endswith(("lora_A.weight", "lora_down.weight"))} == want
        back = check.bind(formats.read_adapter(out), manifest)
        for name, module in source.modules.items():  # (kohya: the parts joined into their tensor)
            tensor = module.fused[0].removesuffix(".weight") if module.fused else name
            delta = back.modules[name].delta() if name in back.modules else \
                back.modules[tensor].delta()[module.first_row:module.first_row + module.weight_shape[0]]
            torch.testing.assert_close(delta, module.delta(), rtol=0, atol=1e-6, msg=(fmt, name))

    sdxl = checkpoint(tmp_path / "sdxl.safetensors", SDXL_TEXT)
    assert run("base", "add", sdxl, "--name", "sdxl")[0] == 0
    openclip = {"text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj": (16, 16),
                "text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj": (16, 16)}
    for name, (modules, base) in {"flux": (FLUX_LORA, "flux"), "openclip": (openclip, "sdxl")}.items():
        lora = formats.write_adapter(factories.lora_adapter(modules, fmt="diffusers"),
                                     tmp_path / f"{name}-lora.safetensors", "diffusers")
        for bound, extra in ((True, ["--base", base]), (False, [])):
            code, out = run("export", lora, "--format", "peft", "-o", tmp_path / f"{name}-{bound}", *extra)
            assert code == 0, out
        written = [(json.loads((tmp_path / f"{name}-{bound}" / "adapter_config.json").read_text()),
                    load_file(tmp_path / f"{name}-{bound}" / "adapter_model.safetensors")) for bound in (True, False)]
        assert written[0][0] == written[1][0] and written[0][0]["target_modules"] == sorted(modules), name
        assert written[0][1].keys() == written[1][1].keys()
        assert all(torch.equal(written[0][1][k], written[1][1][k]) for k in written[0][1]), name
        assert read_header(tmp_path / f"{name}-True" / "adapter_model.safetensors").metadata == {"format": "pt"}


def test_peft_refuses_a_part_of_every_flux_and_sd3_fused_tensor_under_its_checkpoint_path():
    """Each FLUX and SD3 fused tensor is one Linear of the model its checkpoint is of (ldm.Fused.peft False): bound,
    an adapter named by the checkpoint path of a part of any of them — FLUX's img_attn and txt_attn qkv and linear1,
    SD3's x blocks' attn and attn2 qkv and context blocks' qkv — holds modules PEFT cannot (only img_attn's and
    linear1's were tested)."""
    import factories
    from test_ldm import FLUX

    from loraops import check, formats

    sd3 = {f"{module}.weight": SimpleNamespace(shape=(rows, 8)) for module, rows in sd3_heights().items()}
    flux = {name: SimpleNamespace(shape=shape) for name, shape in FLUX.items()}
    for manifest, parts in ((flux, {"double_blocks.0.img_attn.qkv.to_q": (16, 16), "single_blocks.0.linear1.proj_mlp": (64, 16),
                                    "double_blocks.0.txt_attn.qkv.add_k_proj": (16, 16)}),
                            (sd3, {"joint_blocks.0.x_block.attn.qkv.to_q": (8, 8), "joint_blocks.0.x_block.attn2.qkv.to_v": (8, 8),
                                   "joint_blocks.0.context_block.attn.qkv.add_k_proj": (8, 8)})):
        bound = check.bind(factories.lora_adapter(parts), manifest)
        assert all(module.fused is not None for module in bound.modules.values())
        assert sorted(module.name for module in formats.peft_unwritable_parts(bound)) == sorted(parts)


def test_resize_and_combine_write_a_bound_diffusers_loras_parts_as_peft_under_its_own_names(tmp_path):
    """resize and combine ask PEFT's question of their bound inputs before computing (formats.refuse_unwritable):
    a diffusers FLUX LoRA's parts, bound to the checkpoint's double_blocks.0.img_attn.qkv.to_q, are its own
    transformer.transformer_blocks.0.attn.to_q, and the PEFT output holds them so, as its export does."""
    import factories
    from test_ldm import FLUX, FLUX_LORA, checkpoint

    from loraops import formats

    assert run("base", "add", checkpoint(tmp_path / "flux.safetensors", FLUX), "--name", "flux")[0] == 0
    for name, seed in (("a", 1), ("b", 2)):
        lora = formats.write_adapter(factories.lora_adapter(FLUX_LORA, fmt="diffusers", seed=seed),
                                     tmp_path / f"{name}.safetensors", "diffusers")
        assert run("register", lora, "--name", name, "--base", "flux")[0] == 0
    for command in (["resize", "a", "--rank", "2"], ["combine", "a", "b", "--method", "cat"]):
        code, out = run(*command, "--format", "peft", "-o", tmp_path / command[0])
        assert code == 0, out
        assert json.loads((tmp_path / command[0] / "adapter_config.json").read_text())["target_modules"] == sorted(FLUX_LORA)


def test_sd3_headers_name_the_mmdit_model_type_as_sd_scripts_does(tmp_path):
    """sd-scripts writes an SD3 LoRA's ss_base_model_version as the MMDiT's model type (sd3_train_network.py returns
    mmdit.model_type as the model version, which train_network.py records), read off the checkpoint by
    sd3_utils.analyze_state_dict_state: "medium" without q/k RMS norms (SD3 Medium), "5-large" with them
    (joint_blocks.0.context_block.attn.ln_k), "5-medium" when x blocks also have a second attention
    (x_block.attn2.ln_k: SD3.5 Medium). It was empty. extract records it, and a diffusers SD3 LoRA exported to kohya
    against the checkpoint takes it from there."""
    from test_extract_fused import low_rank, pair

    import factories
    from loraops import formats
    from loraops.st import read_header

    norms = {"medium": {}, "5-large": {"joint_blocks.0.context_block.attn.ln_k.weight": (4,)},
             "5-medium": {"joint_blocks.0.context_block.attn.ln_k.weight": (4,), "joint_blocks.0.x_block.attn2.ln_k.weight": (4,)}}
    qkv = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
    lora = formats.write_adapter(factories.lora_adapter({"transformer.transformer_blocks.0.attn.to_k": (8, 8)},
                                                        fmt="diffusers"), tmp_path / "d.safetensors", "diffusers")
    for version, extra in norms.items():
        folder = tmp_path / version
        folder.mkdir()
        shapes = {f"model.diffusion_model.{m}.weight": (h, 8) for m, h in sd3_heights(dual=(0,) if "attn2" in str(extra)
                                                                                        else ()).items()}
        shapes.update({f"model.diffusion_model.{k}": v for k, v in extra.items()})
        base, tuned = pair(folder, shapes, {qkv: (0, low_rank(24, 8, 2, 5))})
        assert run("base", "add", base, "--name", f"sd3-{version}")[0] == 0
        code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "-o", folder / "x.safetensors")
        assert code == 0, out
        code, out = run("export", lora, "--format", "kohya", "--base", f"sd3-{version}", "-o", folder / "k.safetensors")
        assert code == 0, out
        for written in ("x", "k"):
            metadata = read_header(folder / f"{written}.safetensors").metadata
            assert (metadata["ss_base_model_version"], metadata["ss_v2"], metadata["ss_network_module"]) == (
                version, "False", "networks.lora_sd3"), (version, written)


def test_a_peft_adapter_of_an_sd_unet_is_named_for_its_family_by_its_structure_or_refused(tmp_path):
    """A PEFT adapter of a single-file SDXL checkpoint's UNet alone (extract --format peft: the checkpoint's own
    names, no header) exported to kohya without --base got SD 1.x names (lora_unet_down_blocks_1_attentions_0_proj_in)
    and an empty version: sd-scripts names SDXL's UNet by the checkpoint's paths. Its SDXL-ness is read off what it
    holds (ldm.is_sdxl: here output_blocks.2.2.conv, the upsampler behind attention in the first output level, which
    no SD 1.x/2.x UNet has), and the header says sdxl_base_v1-0. One of modules every SD-family UNet has (proj_in of
    input_blocks.4.1, label_emb) cannot be placed without its checkpoint: refused in one line, nothing written, and
    written with --base; as diffusers too, whose label_emb is SDXL's add_embedding or unCLIP's class_embedding (it
    was written add_embedding). An SD 1.x adapter's attention in the first input level says SD 1.x/2.x: diffusers blocks."""
    from test_ldm import SD15, SDXL

    from loraops.st import read_header

    def extracted(layout, name, changed, unet):
        folder = tmp_path / name
        folder.mkdir()
        base = unet_checkpoint(layout)
        tuned = {k: v.clone() for k, v in base.items()}
        for module in changed:
            tuned[f"model.diffusion_model.{module}.weight"] += 0.1
        save_file(base, str(folder / "base.safetensors"))
        save_file(tuned, str(folder / "tuned.safetensors"))
        assert run("base", "add", folder / "base.safetensors", "--name", unet)[0] == 0  # (or already there)
        code, out = run("extract", "--base", unet, "--tuned", folder / "tuned.safetensors",
                        "--rank", "1", "--format", "peft", "-o", folder / "peft", "--name", name)
        assert code == 0, out
        return folder

    def kohya(path):
        header = read_header(path)
        return (sorted(k.removesuffix(".lora_up.weight") for k in header.tensors if k.endswith(".lora_up.weight")),
                header.metadata["ss_base_model_version"])

    sdxl = extracted(SDXL, "sdxl", ["input_blocks.4.1.proj_in", "label_emb.0.0", "output_blocks.2.2.conv"], "sdxl-unet")
    code, out = run("export", sdxl / "peft", "--format", "kohya", "-o", sdxl / "k.safetensors")
    assert code == 0, out
    assert kohya(sdxl / "k.safetensors") == (["lora_unet_input_blocks_4_1_proj_in", "lora_unet_label_emb_0_0",
                                              "lora_unet_output_blocks_2_2_conv"], "sdxl_base_v1-0")

    unplaced = extracted(SDXL, "unplaced", ["input_blocks.4.1.proj_in", "label_emb.0.0"], "sdxl-unet")
    unet = "model.diffusion_model."
    # diffusers names label_emb by the family too (SDXL's add_embedding, unCLIP's class_embedding): the same refusal
    # for it alone, where SDXL's name was written as a guess; proj_in has one diffusers name in every SD UNet
    refused = {"kohya": (f"{unet}input_blocks.4.1.proj_in, {unet}label_emb.0.0", "sd-scripts names one way for SDXL "
                         "(lora_unet_input_blocks_…) and another for SD 1.x/2.x (lora_unet_down_blocks_…)"),
               "diffusers": (f"{unet}label_emb.0.0", "diffusers names one way for SDXL (unet.add_embedding) and another "
                             "for SD 2.x unCLIP (unet.class_embedding)")}
    for fmt, (modules, naming) in refused.items():
        written = unplaced / f"{fmt}.safetensors"
        code, out = run("export", unplaced / "peft", "--format", fmt, "-o", written)
        assert (code, out) == (2, f"error: {unplaced / 'peft'}: {modules}: modules of an SD UNet, which {naming}, and "
                                  "neither these modules nor the adapter's header say which it is: give its checkpoint "
                                  "as --base (or register it with --base)\n")
        assert not written.exists()
        code, out = run("export", unplaced / "peft", "--format", fmt, "--base", "sdxl-unet", "-o", written)
        assert code == 0, out
    assert kohya(unplaced / "kohya.safetensors") == (["lora_unet_input_blocks_4_1_proj_in", "lora_unet_label_emb_0_0"],
                                                     "sdxl_base_v1-0")
    assert {k.rsplit(".", 2)[0] for k in read_header(unplaced / "diffusers.safetensors").tensors} == {
        "unet.add_embedding.linear_1", "unet.down_blocks.1.attentions.0.proj_in"}

    sd15 = extracted(SD15, "sd15", ["input_blocks.1.1.proj_in", "input_blocks.4.0.in_layers.2"], "sd15-unet")
    code, out = run("export", sd15 / "peft", "--format", "kohya", "-o", sd15 / "k.safetensors")
    assert code == 0, out
    assert kohya(sd15 / "k.safetensors") == (["lora_unet_down_blocks_0_attentions_0_proj_in",
                                              "lora_unet_down_blocks_1_resnets_0_conv1"], "")
