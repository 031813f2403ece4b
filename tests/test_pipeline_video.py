"""Video/image DiT LoRAs in their original checkpoint's names (Wan's ``blocks.0.self_attn.q``, bare, behind
``diffusion_model.`` or ``model.diffusion_model.``, musubi-tuner's ``lora_unet_blocks_0_self_attn_q``) against a
diffusers pipeline folder, whose transformer names those modules otherwise (``blocks.0.attn1.to_q``): they bind, by
the transformer's config.json class, and merge as diffusers' own converters
(diffusers.loaders.lora_conversion_utils) + base + B·A in float64. They listed every module ``(not in base)``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import loraops_run
from test_formats_wild import merged_as_diffusers
from test_json_schema import CHECK, pinned
from test_pipeline_dit import R, assert_round_trip, check_merged

WAN_WIDTH, WAN_FFN, WAN_TEXT, WAN_IMAGE = 16, 32, 12, 10


def wan_pipeline(root, *, i2v: bool = False, experts: bool = False):
    """A tiny Wan pipeline; ``experts``: Wan 2.2's, with a second transformer (transformer_2/, other weights)."""
    from diffusers import WanTransformer3DModel

    components = ("transformer", "transformer_2") if experts else ("transformer",)
    for seed, component in enumerate(components):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                      out_channels=4, text_dim=WAN_TEXT, freq_dim=8, ffn_dim=WAN_FFN, num_layers=2,
                                      cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                      image_dim=WAN_IMAGE if i2v else None,
                                      added_kv_proj_dim=WAN_WIDTH if i2v else None)
        model.save_pretrained(root / component)
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanImageToVideoPipeline" if i2v else "WanPipeline",
         **{component: ["diffusers", "WanTransformer3DModel"] for component in components}}))
    return root


def wan_modules(i2v: bool) -> dict[str, tuple[int, int]]:
    """Wan's LoRA-trained modules (original names): (rows, columns) in the tiny pipeline."""
    w = WAN_WIDTH
    out = {}
    for n in range(2):
        for attn in ("self_attn", "cross_attn"):
            out.update({f"blocks.{n}.{attn}.{p}": (w, w) for p in "qkvo"})
        if i2v:
            out.update({f"blocks.{n}.cross_attn.{p}_img": (w, w) for p in "kv"})
        out[f"blocks.{n}.ffn.0"], out[f"blocks.{n}.ffn.2"] = (WAN_FFN, w), (w, WAN_FFN)
    return out


WAN_TOP = {"text_embedding.0": (WAN_WIDTH, WAN_TEXT), "time_embedding.2": (WAN_WIDTH, WAN_WIDTH),
           "time_projection.1": (6 * WAN_WIDTH, WAN_WIDTH), "head.head": (16, WAN_WIDTH)}


def factors(modules: dict[str, tuple], key, *, seed: int = 1) -> dict:
    """lora_A/lora_B (``key(name, "A")``) of each module (rows, columns; a convolution's columns its in channels and
    kernel), with an ``.alpha`` (2, 4 or 8) beside each block's (diffusers'
    Wan converter refuses one elsewhere; loraops gives a module without one α = r, its scale 1 as there)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, (rows, cols)) in enumerate(modules.items()):
        cols = cols if isinstance(cols, tuple) else (cols,)  # (a convolution's: in channels, kernel)
        out[key(name, "A")] = torch.randn(R, *cols, generator=g)
        out[key(name, "B")] = torch.randn(rows, R, *(1,) * (len(cols) - 1), generator=g) * 0.1
        if name.startswith("blocks."):
            out[key(name, "alpha")] = torch.tensor(float(2 ** (1 + i % 3)))
    return out


def peft_key(prefix: str):
    return lambda name, which: f"{prefix}{name}." + ("alpha" if which == "alpha" else f"lora_{which}.weight")


def musubi_key(name: str, which: str) -> str:
    return f"lora_unet_{name.replace('.', '_')}." + {"A": "lora_down.weight", "B": "lora_up.weight",
                                                     "alpha": "alpha"}[which]


def merge_and_compare(tmp_path, pipe, lora, converted, count, want=None):
    """``lora`` fits ``pipe`` (``count`` modules) and merges into it as ``converted`` (diffusers' converter's output)
    or ``want`` (the merged transformer) says."""
    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    run = loraops_run("check", lora, "--base", pipe)
    assert run.returncode == 0 and f"{count}/{count} modules match" in run.stdout, run.stdout + run.stderr
    run = loraops_run("merge", lora, "--into", pipe, "-o", tmp_path / "m", "--precise", "--no-record", "--force")
    assert run.returncode == 0, run.stderr
    merged = check_merged(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors",
                          merged_as_diffusers(base, converted) if want is None else want)
    assert sum(not torch.equal(merged[k], base[k]) for k in base) == count


@pytest.mark.parametrize("prefix", ["diffusion_model.", "", "model.diffusion_model."])
def test_wan_lora_merges_into_a_diffusers_pipeline_as_diffusers_converts_it(tmp_path, prefix):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    i2v = prefix == "diffusion_model."  # (image-to-video: cross_attn.k_img/v_img, once)
    pipe = wan_pipeline(tmp_path / "pipe", i2v=i2v)
    modules = {**wan_modules(i2v), **WAN_TOP}
    if i2v:
        modules["img_emb.proj.1"], modules["img_emb.proj.3"] = (WAN_IMAGE, WAN_IMAGE), (WAN_WIDTH, WAN_IMAGE)
    tensors = factors(modules, peft_key(prefix))
    save_file(tensors, str(tmp_path / "w.safetensors"))
    # (diffusers' converter reads them behind diffusion_model. alone)
    converted = _convert_non_diffusers_wan_lora_to_diffusers(
        {"diffusion_model." + k.removeprefix(prefix): v.double() for k, v in tensors.items()})
    assert len(converted) == 2 * len(modules)
    merge_and_compare(tmp_path, pipe, tmp_path / "w.safetensors", converted, len(modules))


def dotted_kohya_key(name: str, which: str) -> str:
    return f"diffusion_model.{name}." + {"A": "lora_down.weight", "B": "lora_up.weight", "alpha": "alpha"}[which]


def test_wan_lora_with_kohya_factor_names_merges_as_diffusers_converts_it(tmp_path):
    """Wan 2.2's distilled LoRAs (Wan-AI/Wan2.2-Distill-Loras) name their factors as kohya does on Wan's dotted
    paths (``diffusion_model.blocks.0.self_attn.q.lora_down.weight``, ``.alpha``), which diffusers' Wan converter
    reads: they are the lora_A/lora_B file they spell otherwise, α = r where no ``.alpha`` says (the converter's
    scale 1). They were refused (`unknown keys in a kohya LoRA file`)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    from loraops import formats

    pipe = wan_pipeline(tmp_path / "pipe")
    modules = {**wan_modules(False), **WAN_TOP}
    tensors = factors(modules, dotted_kohya_key, seed=3)
    save_file(tensors, str(tmp_path / "w.safetensors"))
    save_file({k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in tensors.items()},
              str(tmp_path / "p.safetensors"))
    ours, peft_named = formats.read_adapter(tmp_path / "w.safetensors"), formats.read_adapter(tmp_path / "p.safetensors")
    assert ours.format == "peft" and ours.modules.keys() == peft_named.modules.keys()
    assert all(module.scale == peft_named.modules[name].scale for name, module in ours.modules.items())
    converted = _convert_non_diffusers_wan_lora_to_diffusers({k: v.double() for k, v in tensors.items()})
    assert len(converted) == 2 * len(modules)
    merge_and_compare(tmp_path, pipe, tmp_path / "w.safetensors", converted, len(modules))
    save_file({"lora_unet.blocks.0.self_attn.q.lora_down.weight": torch.zeros(R, WAN_WIDTH),
               "lora_unet.blocks.0.self_attn.q.lora_up.weight": torch.zeros(WAN_WIDTH, R)}, str(tmp_path / "k.safetensors"))
    run = loraops_run("inspect", tmp_path / "k.safetensors")  # (behind kohya's own prefix: kohya's, refused so)
    assert run.returncode == 2 and "unknown keys in a kohya LoRA file" in run.stderr, run.stderr


def test_musubi_wan_lora_merges_into_a_diffusers_pipeline_as_diffusers_converts_it(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_musubi_wan_lora_to_diffusers

    pipe = wan_pipeline(tmp_path / "pipe", i2v=True)
    modules = wan_modules(True)
    tensors = factors(modules, musubi_key, seed=2)
    save_file(tensors, str(tmp_path / "w.safetensors"), {"ss_network_module": "networks.lora_wan"})
    converted = _convert_musubi_wan_lora_to_diffusers({k: v.double() for k, v in tensors.items()})
    merge_and_compare(tmp_path, pipe, tmp_path / "w.safetensors", converted, len(modules))


@pytest.mark.parametrize("key", [peft_key("diffusion_model."), musubi_key], ids=["comfyui", "musubi"])
def test_wan22_lora_binds_to_the_second_transformer_given_as_the_base(tmp_path, key):
    """Wan 2.2's low-noise expert (transformer_2/, which diffusers loads a LoRA into with load_into_transformer_2):
    given as the base, the folder binds original names (it listed every module (not in base); diffusers' names bound
    already) and the merge is diffusers' converter + that transformer in float64. Against the pipeline folder the
    LoRA goes to transformer/ alone, as diffusers loads it by default."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    pipe = wan_pipeline(tmp_path / "pipe", experts=True)
    modules = wan_modules(False)
    tensors = factors(modules, key, seed=5)
    save_file(tensors, str(tmp_path / "w.safetensors"))
    converted = _convert_non_diffusers_wan_lora_to_diffusers(
        {k if k.startswith("diffusion_model.") else "diffusion_model." + k: v.double()
         for k, v in factors(modules, peft_key("diffusion_model."), seed=5).items()})
    weights = "diffusion_pytorch_model.safetensors"
    expert = load_file(str(pipe / "transformer_2" / weights))
    run = loraops_run("check", tmp_path / "w.safetensors", "--base", pipe / "transformer_2")
    assert run.returncode == 0 and f"{len(modules)}/{len(modules)} modules match" in run.stdout, run.stdout + run.stderr
    run = loraops_run("merge", tmp_path / "w.safetensors", "--into", pipe / "transformer_2", "-o", tmp_path / "m2",
                      "--precise", "--no-record")
    assert run.returncode == 0, run.stderr
    merged = check_merged(tmp_path / "m2" / weights, merged_as_diffusers(expert, converted))
    assert sum(not torch.equal(merged[k], expert[k]) for k in expert) == len(modules)
    run = loraops_run("merge", tmp_path / "w.safetensors", "--into", pipe, "-o", tmp_path / "m", "--precise",
                      "--no-record")
    assert run.returncode == 0, run.stderr
    assert load_file(str(tmp_path / "m" / "transformer_2" / weights)).keys() == expert.keys()
    assert all(torch.equal(t, expert[k]) for k, t in load_file(str(tmp_path / "m" / "transformer_2" / weights)).items())


@pytest.mark.parametrize("experts", [False, True], ids=["pipeline", "transformer_2"])
def test_wan_loras_bound_to_a_pipeline_combined_and_written_as_kohya(tmp_path, experts):
    """A musubi-tuner Wan LoRA and the diffusers one (transformer.blocks.0.attn1.to_q) diffusers' converter makes of
    it, bound to the pipeline or to Wan 2.2's transformer_2/ (its modules named without transformer.), are written as
    kohya under musubi-tuner's names: the musubi file comes back as it was, the diffusers one was refused as a
    "FLUX/SD3 transformer" (against transformer_2/: written as lora_unet_blocks_0_attn1_to_q), and a combination of
    the two kept no trace of the pipeline (lora_unet_transformer_blocks_0_attn1_to_q, loaded nowhere)."""
    from diffusers.loaders.lora_conversion_utils import _convert_musubi_wan_lora_to_diffusers

    pipe = wan_pipeline(tmp_path / "pipe", experts=experts)
    musubi = factors(wan_modules(False), musubi_key, seed=6)
    save_file(musubi, str(tmp_path / "w.safetensors"))
    save_file({k: v.contiguous() for k, v in _convert_musubi_wan_lora_to_diffusers(dict(musubi)).items()},
              str(tmp_path / "d.safetensors"))
    assert loraops_run("base", "add", pipe / "transformer_2" if experts else pipe, "--name", "wan").returncode == 0
    for ref in ("w", "d"):
        run = loraops_run("register", tmp_path / f"{ref}.safetensors", "--name", ref, "--base", "wan")
        assert run.returncode == 0, run.stderr
    assert_round_trip(tmp_path, "w", musubi)
    run = loraops_run("export", "d", "--format", "kohya", "-o", tmp_path / "dk.safetensors")
    assert run.returncode == 0, run.stderr
    assert sorted(load_file(str(tmp_path / "dk.safetensors"))) == sorted(musubi)
    run = loraops_run("combine", "w", "d", "--method", "cat", "--base", "wan", "--format", "kohya",
                      "-o", tmp_path / "c.safetensors")
    assert run.returncode == 0, run.stderr
    assert sorted(load_file(str(tmp_path / "c.safetensors"))) == sorted(musubi)


@pytest.mark.parametrize("key", [musubi_key, peft_key("diffusion_model."), peft_key("")],
                         ids=["musubi", "comfyui", "bare"])
def test_wan_lora_module_the_pipeline_lacks_is_reported_alone(tmp_path, key):
    """A text-to-video pipeline has no image cross-attention: the i2v LoRA's k_img/v_img are listed, nothing else, and
    merge refuses it with that list (in the original names, every module was listed)."""
    pipe = wan_pipeline(tmp_path / "pipe")
    save_file(factors(wan_modules(True), key), str(tmp_path / "w.safetensors"))
    lacked = key("blocks.0.cross_attn.k_img", "A").removesuffix(".lora_down.weight").removesuffix(".lora_A.weight")
    run = loraops_run("check", tmp_path / "w.safetensors", "--base", pipe)
    assert run.returncode != 0, run.stdout
    assert f"{lacked} (not in base)" in run.stdout, run.stdout
    assert run.stdout.count("(not in base)") == 4, run.stdout
    assert "self_attn" not in run.stdout and "20/24 modules match" in run.stdout, run.stdout
    run = loraops_run("merge", tmp_path / "w.safetensors", "--into", pipe, "-o", tmp_path / "m", "--no-record")
    assert run.returncode != 0 and lacked in run.stderr and "self_attn" not in run.stderr, run.stderr
    assert not (tmp_path / "m").exists()


def test_wan_names_bind_by_the_transformer_class(tmp_path):
    """The table is the class's: the same folder whose config.json names another transformer class binds nothing."""
    pipe = wan_pipeline(tmp_path / "pipe")
    config = pipe / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "SomeOtherTransformer"}))
    save_file(factors({"blocks.0.self_attn.q": (WAN_WIDTH, WAN_WIDTH)}, peft_key("diffusion_model.")),
              str(tmp_path / "w.safetensors"))
    run = loraops_run("check", tmp_path / "w.safetensors", "--base", pipe)
    assert run.returncode != 0 and "(not in base)" in run.stdout, run.stdout + run.stderr


@pytest.mark.parametrize("lora_prefix, checkpoint_prefix", [("", "model.diffusion_model."),
                                                            ("model.diffusion_model.", "")])
def test_bare_wan_names_bind_to_a_prefixed_single_file_checkpoint(tmp_path, lora_prefix, checkpoint_prefix):
    """``blocks.0.self_attn.q`` against a ``model.diffusion_model.`` checkpoint (ComfyUI's), and the other way round:
    it said (not in base)."""
    g = torch.Generator().manual_seed(4)
    base = {f"{checkpoint_prefix}blocks.0.self_attn.{p}.weight": torch.randn(8, 8, generator=g) for p in "qk"}
    save_file(base, str(tmp_path / "wan.safetensors"))
    tensors = factors({"blocks.0.self_attn.q": (8, 8)}, peft_key(lora_prefix))
    save_file(tensors, str(tmp_path / "w.safetensors"))
    run = loraops_run("merge", tmp_path / "w.safetensors", "--into", tmp_path / "wan.safetensors",
                      "-o", tmp_path / "m.safetensors", "--precise", "--no-record")
    assert run.returncode == 0, run.stderr
    merged = load_file(str(tmp_path / "m.safetensors"))
    key = peft_key(lora_prefix)
    A, B = tensors[key("blocks.0.self_attn.q", "A")].double(), tensors[key("blocks.0.self_attn.q", "B")].double()
    tensor = f"{checkpoint_prefix}blocks.0.self_attn.q.weight"
    assert torch.allclose(merged[tensor].double(), base[tensor].double() + B @ A * 2 / R, atol=1e-6)


def test_musubi_wan_lora_registers_against_a_pipeline_base(tmp_path):
    """A registered base's recorded manifest names no files: the transformer's class is read in its folder."""
    pipe = wan_pipeline(tmp_path / "pipe")
    modules = wan_modules(False)
    tensors = factors(modules, musubi_key, seed=3)
    save_file(tensors, str(tmp_path / "w.safetensors"))
    assert loraops_run("base", "add", pipe, "--name", "wan").returncode == 0
    run = loraops_run("register", tmp_path / "w.safetensors", "--name", "w", "--base", "wan")
    assert run.returncode == 0 and "base wan" in run.stdout, run.stdout + run.stderr
    run = loraops_run("export", "w", "--format", "diffusers", "-o", tmp_path / "d.safetensors")
    assert run.returncode == 0, run.stderr
    assert "transformer.blocks.1.ffn.net.2.lora_A.weight" in load_file(str(tmp_path / "d.safetensors"))
    run = loraops_run("merge", "w", "--into", pipe, "-o", tmp_path / "m", "--precise", "--no-record")
    assert run.returncode == 0, run.stderr
    # written as kohya: musubi-tuner's names again (they were the diffusers paths, lora_unet_transformer_blocks_0_…)
    assert_round_trip(tmp_path, "w", tensors)


HY = 16  # HunyuanVideo's tiny hidden size (2 heads of 8)


def hunyuan_pipeline(root):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
                                           patch_size=1, patch_size_t=1, text_embed_dim=12, pooled_projection_dim=10,
                                           rope_axes_dim=(2, 2, 4), guidance_embeds=True)
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "HunyuanVideoPipeline", "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"]}))
    return root


REFINER = "txt_in.individual_token_refiner.blocks.0"
HUNYUAN = {  # original module: (rows, columns) in the tiny pipeline
    "double_blocks.0.img_attn_qkv": (3 * HY, HY), "double_blocks.0.txt_attn_qkv": (3 * HY, HY),
    "double_blocks.0.img_attn_proj": (HY, HY), "double_blocks.0.txt_attn_proj": (HY, HY),
    "double_blocks.0.img_mlp.fc1": (2 * HY, HY), "double_blocks.0.img_mlp.fc2": (HY, 2 * HY),
    "double_blocks.0.txt_mlp.fc1": (2 * HY, HY), "double_blocks.0.txt_mlp.fc2": (HY, 2 * HY),
    "double_blocks.0.img_mod.linear": (6 * HY, HY), "double_blocks.0.txt_mod.linear": (6 * HY, HY),
    "single_blocks.0.linear1": (5 * HY, HY), "single_blocks.0.linear2": (HY, 3 * HY),
    "single_blocks.0.modulation.linear": (3 * HY, HY),
    f"{REFINER}.self_attn_qkv": (3 * HY, HY), f"{REFINER}.self_attn_proj": (HY, HY),
    f"{REFINER}.mlp.fc1": (4 * HY, HY), f"{REFINER}.mlp.fc2": (HY, 4 * HY),
    f"{REFINER}.adaLN_modulation.1": (2 * HY, HY),
    "final_layer.linear": (4, HY), "final_layer.adaLN_modulation.1": (2 * HY, HY),
    "time_in.mlp.0": (HY, 256), "guidance_in.mlp.2": (HY, HY), "vector_in.in_layer": (HY, 10),
    "txt_in.input_embedder": (HY, 12), "txt_in.c_embedder.linear_1": (HY, 12), "txt_in.t_embedder.mlp.2": (HY, HY),
}
# what diffusers' _convert_hunyuan_video_lora_to_diffusers gets wrong: linear1 split as if 3072 wide (hard-wired),
# the refiner's qkv and the final adaLN with A's rank rows split or swapped too (B·A is then another delta): by hand
BY_HAND = {  # module: [(pipeline tensor, first row of B, rows, first row in the tensor)]
    "single_blocks.0.linear1": [*((f"single_transformer_blocks.0.attn.to_{p}.weight", i * HY, HY, 0)
                                  for i, p in enumerate("qkv")),
                                ("single_transformer_blocks.0.proj_mlp.weight", 3 * HY, 2 * HY, 0)],
    f"{REFINER}.self_attn_qkv": [(f"context_embedder.token_refiner.refiner_blocks.0.attn.to_{p}.weight", i * HY, HY, 0)
                                 for i, p in enumerate("qkv")],
    # (shift, scale) in the checkpoint, (scale, shift) in the pipeline
    "final_layer.adaLN_modulation.1": [("norm_out.linear.weight", 0, HY, HY), ("norm_out.linear.weight", HY, HY, 0)],
}


def hunyuan_reference(base, tensors, key, modules):
    """base + (α/r)·B·A as diffusers' converter places it, BY_HAND's modules as their rows of B go, in float64."""
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    scaled = {}
    for name in modules:
        scale = float(tensors[key(name, "alpha")]) / R
        scaled[name] = (tensors[key(name, "A")].double(), tensors[key(name, "B")].double() * scale)
    want = merged_as_diffusers(base, _convert_hunyuan_video_lora_to_diffusers(
        {f"diffusion_model.{name}.lora_{w}.weight": f for name, (A, B) in scaled.items() if name not in BY_HAND
         for w, f in (("A", A), ("B", B))}))
    for name, places in BY_HAND.items():
        A, B = scaled[name]
        for tensor, first, rows, at in places:
            want[tensor][at:at + rows] += B[first:first + rows] @ A
    return want


def lora_with_alphas(path, modules, key, seed):
    """A LoRA file of ``modules`` under ``key``'s names with an .alpha each (2, 4, 8 in turn): (its tensors, and
    name → (A, B·α/r) in float64, the factors as diffusers' converters scale them)."""
    tensors = factors(modules, key, seed=seed)
    tensors.update({key(name, "alpha"): torch.tensor(2.0 ** (i % 3 + 1)) for i, name in enumerate(modules)})
    save_file(tensors, str(path))

    def scaled(name):
        alpha = float(tensors[key(name, "alpha")])
        return tensors[key(name, "A")].double(), tensors[key(name, "B")].double() * alpha / R

    return tensors, scaled


@pytest.mark.parametrize("key", [peft_key("diffusion_model."), musubi_key], ids=["comfyui", "musubi"])
def test_hunyuan_video_lora_merges_into_a_diffusers_pipeline(tmp_path, key):
    """Its fused qkv (double blocks, the token refiner) and linear1 split into the pipeline's parts, the final adaLN's
    halves swapped; chosen by HunyuanVideoTransformer3DModel, not FLUX.1's table, whose diffusers names are the same."""
    pipe = hunyuan_pipeline(tmp_path / "pipe")
    tensors, scaled = lora_with_alphas(tmp_path / "h.safetensors", HUNYUAN, key, seed=6)
    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    want = hunyuan_reference(base, tensors, key, HUNYUAN)
    parts = len(HUNYUAN) + 2 + 2 + 3 + 2  # the qkv ×3 and linear1 in parts
    run = loraops_run("check", tmp_path / "h.safetensors", "--base", pipe)
    assert run.returncode == 0 and f"{parts}/{parts} modules match" in run.stdout, run.stdout + run.stderr
    run = loraops_run("merge", tmp_path / "h.safetensors", "--into", pipe, "-o", tmp_path / "m", "--precise",
                      "--no-record")
    assert run.returncode == 0, run.stderr
    merged = check_merged(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors", want)
    assert sum(not torch.equal(merged[k], base[k]) for k in base) == parts


def test_a_flux_lora_does_not_bind_to_a_hunyuan_video_pipeline(tmp_path):
    """FLUX.1's names (img_attn.qkv, final_layer.linear) map onto the diffusers names HunyuanVideo's pipeline has too:
    the table is the pipeline's transformer class's, so a FLUX LoRA is not merged into HunyuanVideo. (sd-scripts'
    underscored names, lora_unet_double_blocks_0_img_attn_qkv, are the same for both: they bind as HunyuanVideo's.)"""
    pipe = hunyuan_pipeline(tmp_path / "pipe")
    save_file(factors({"double_blocks.0.img_attn.qkv": (3 * HY, HY), "final_layer.linear": (4, HY)},
                      peft_key("diffusion_model.")), str(tmp_path / "f.safetensors"))
    run = loraops_run("check", tmp_path / "f.safetensors", "--base", pipe, "--alpha", "4")
    assert run.returncode != 0 and "diffusion_model.double_blocks.0.img_attn.qkv (not in base)" in run.stdout, \
        run.stdout + run.stderr


def ltx_pipeline(root):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                       cross_attention_dim=16, num_layers=1, caption_channels=12)
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "LTXPipeline", "transformer": ["diffusers", "LTXVideoTransformer3DModel"]}))
    return root


LTX = {  # LTX-Video's original names (its blocks' are diffusers'): (rows, columns)
    **{f"transformer_blocks.0.attn{a}.{p}": (16, 16) for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")},
    "transformer_blocks.0.ff.net.0.proj": (64, 16), "transformer_blocks.0.ff.net.2": (16, 64),
    "proj_out": (4, 16), "caption_projection.linear_1": (16, 12),
}
# renamed in the checkpoint: diffusers' LoRA converter keeps these names, which its pipeline does not have
LTX_RENAMED = {"patchify_proj": ("proj_in", (16, 4)), "adaln_single.linear": ("time_embed.linear", (96, 16))}


@pytest.mark.parametrize("prefix", ["diffusion_model.", ""])
def test_ltx_video_lora_merges_into_a_diffusers_pipeline(tmp_path, prefix):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ltxv_lora_to_diffusers

    pipe = ltx_pipeline(tmp_path / "pipe")
    modules = {**LTX, **{name: shape for name, (_, shape) in LTX_RENAMED.items()}}
    key = peft_key(prefix)
    tensors, scaled = lora_with_alphas(tmp_path / "l.safetensors", modules, key, seed=7)

    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    want = merged_as_diffusers(base, _convert_non_diffusers_ltxv_lora_to_diffusers(
        {f"diffusion_model.{name}.lora_{w}.weight": f for name in LTX for w, f in zip("AB", scaled(name))}))
    for name, (tensor, _) in LTX_RENAMED.items():
        A, B = scaled(name)
        want[f"{tensor}.weight"] += B @ A
    merge_and_compare(tmp_path, pipe, tmp_path / "l.safetensors", None, len(modules), want=want)


@pytest.mark.parametrize("key", [peft_key("transformer."), musubi_key,
                                 lambda name, which: "lora_transformer_" + musubi_key(name, which)[len("lora_unet_"):]],
                         ids=["diffusers", "kohya", "onetrainer"])
def test_ltx_video_lora_in_the_pipeline_names_still_binds(tmp_path, key):
    """Names that fit the pipeline as they are (diffusers', kohya's of its paths, OneTrainer's) are not taken for the
    original checkpoint's (the same paths, without the component)."""
    pipe = ltx_pipeline(tmp_path / "pipe")
    save_file(factors(LTX, key), str(tmp_path / "l.safetensors"))
    run = loraops_run("check", tmp_path / "l.safetensors", "--base", pipe, "--alpha", "4")
    assert run.returncode == 0 and f"{len(LTX)}/{len(LTX)} modules match" in run.stdout, run.stdout + run.stderr


def qwen_pipeline(root):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                        axes_dims_rope=(2, 2, 4))
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "QwenImagePipeline", "transformer": ["diffusers", "QwenImageTransformer2DModel"]}))
    return root


QWEN = {  # Qwen-Image's names (diffusers' too): (rows, columns)
    **{f"transformer_blocks.0.attn.{p}": (16, 16) for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                           "add_k_proj", "add_v_proj", "to_add_out")},
    "transformer_blocks.0.img_mlp.net.0.proj": (64, 16), "transformer_blocks.0.txt_mlp.net.2": (16, 64),
    "transformer_blocks.0.img_mod.1": (96, 16), "transformer_blocks.0.txt_mod.1": (96, 16),
    "img_in": (16, 16), "txt_in": (16, 12), "proj_out": (16, 16), "norm_out.linear": (32, 16),
}


@pytest.mark.parametrize("prefix", ["diffusion_model.", ""])
def test_qwen_image_lora_merges_into_a_diffusers_pipeline(tmp_path, prefix):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    pipe = qwen_pipeline(tmp_path / "pipe")
    key = peft_key(prefix)
    tensors, scaled = lora_with_alphas(tmp_path / "q.safetensors", QWEN, key, seed=8)
    converted = _convert_non_diffusers_qwen_lora_to_diffusers({k: v.double() for k, v in tensors.items()})
    assert len(converted) == 2 * len(QWEN)
    merge_and_compare(tmp_path, pipe, tmp_path / "q.safetensors", converted, len(QWEN))


def test_pipeline_bound_dit_loras_written_as_kohya(tmp_path):
    """Registered against the pipeline, an LTX-Video LoRA is written as kohya under its checkpoint paths (as ComfyUI
    maps lora_unet_ names), which bind back; a musubi-tuner HunyuanVideo one comes back as it was, its qkv and linear1
    parts joined and the final adaLN's halves swapped back (it was refused as a "FLUX/SD3 transformer")."""
    for name, make, modules, key in (("ltx", ltx_pipeline, LTX, peft_key("diffusion_model.")),
                                     ("hy", hunyuan_pipeline, HUNYUAN, musubi_key)):
        pipe = make(tmp_path / name)
        tensors = factors(modules, key)
        tensors.update({key(module, "alpha"): torch.tensor(2.0) for module in modules})
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        assert loraops_run("base", "add", pipe, "--name", name).returncode == 0
        run = loraops_run("register", tmp_path / f"{name}.safetensors", "--name", f"a{name}", "--base", name)
        assert run.returncode == 0, run.stderr
        if name == "hy":
            assert_round_trip(tmp_path, f"a{name}", tensors)
            continue
        run = loraops_run("export", f"a{name}", "--format", "kohya", "-o", tmp_path / f"k{name}.safetensors")
        assert run.returncode == 0, run.stderr
        written = load_file(str(tmp_path / f"k{name}.safetensors"))
        assert "lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight" in written
        run = loraops_run("check", tmp_path / f"k{name}.safetensors", "--base", pipe)
        assert run.returncode == 0 and f"{len(modules)}/{len(modules)} modules match" in run.stdout, run.stdout


LU, LU_KV = 32, 16  # Lumina2's tiny hidden size (4 heads of 8) and its k/v rows (2 grouped-query heads)


def lumina2_pipeline(root):
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    model = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=LU, num_layers=1,
                                      num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2, multiple_of=16,
                                      axes_dim_rope=(2, 2, 4), cap_feat_dim=12)
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "Lumina2Pipeline", "transformer": ["diffusers", "Lumina2Transformer2DModel"]}))
    return root


LUMINA2_BLOCK = {"attention.qkv": (LU + 2 * LU_KV, LU), "attention.out": (LU, LU), "feed_forward.w1": (4 * LU, LU),
                 "feed_forward.w2": (LU, 4 * LU), "feed_forward.w3": (4 * LU, LU)}
LUMINA2 = {  # Lumina-Image 2.0's original names: (rows, columns) in the tiny pipeline
    **{f"{block}.0.{path}": shape for block in ("layers", "noise_refiner", "context_refiner")
       for path, shape in LUMINA2_BLOCK.items()},
    **{f"{block}.0.adaLN_modulation.1": (4 * LU, LU) for block in ("layers", "noise_refiner")},
}
# outside the blocks, which diffusers' LoRA converter refuses: renamed as its single-file converter renames the weights
LUMINA2_TOP = {"x_embedder": ("x_embedder", (LU, 16)), "cap_embedder.1": ("time_caption_embed.caption_embedder.1",
                                                                           (LU, 12)),
               "t_embedder.mlp.0": ("time_caption_embed.timestep_embedder.linear_1", (LU, 256)),
               "final_layer.adaLN_modulation.1": ("norm_out.linear_1", (LU, LU)),
               "final_layer.linear": ("norm_out.linear_2", (16, LU))}


@pytest.mark.parametrize("key", [peft_key("diffusion_model."), musubi_key], ids=["comfyui", "sd-scripts"])
def test_lumina2_lora_merges_into_a_diffusers_pipeline(tmp_path, key):
    """Its fused qkv holds grouped-query heads (q 32 rows, k and v 16 each here): B's rows are split by those sizes,
    which the pipeline's config gives, not in thirds. diffusers' converter splits them [2304, 768, 768] whatever the
    model (Lumina-Image 2.0's sizes): it is used for the rest, the qkv placed by hand by the config's sizes."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers

    pipe = lumina2_pipeline(tmp_path / "pipe")
    modules = {**LUMINA2, **{name: shape for name, (_, shape) in LUMINA2_TOP.items()}}
    tensors, scaled = lora_with_alphas(tmp_path / "l.safetensors", modules, key, seed=9)

    placeholder = torch.zeros(2304 + 2 * 768, R, dtype=torch.float64)  # (its qkv split, replaced below)
    converted = _convert_non_diffusers_lumina2_lora_to_diffusers(
        {f"diffusion_model.{name}.lora_{w}.weight": placeholder if name.endswith(".qkv") and w == "B" else f
         for name in LUMINA2 for w, f in zip("AB", scaled(name))})
    converted = {k: v for k, v in converted.items() if ".attn.to_q." not in k and ".attn.to_k." not in k
                 and ".attn.to_v." not in k}
    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    want = merged_as_diffusers(base, converted)
    config = json.loads((pipe / "transformer" / "config.json").read_text())
    head = config["hidden_size"] // config["num_attention_heads"]
    sizes = [config["num_attention_heads"] * head] + [config["num_kv_heads"] * head] * 2
    for name in (name for name in LUMINA2 if name.endswith(".qkv")):
        A, B = scaled(name)
        block = name.removesuffix(".attention.qkv")
        for part, rows in zip(("to_q", "to_k", "to_v"), B.split(sizes)):
            want[f"{block}.attn.{part}.weight"] += rows @ A
    for name, (tensor, _) in LUMINA2_TOP.items():
        A, B = scaled(name)
        want[f"{tensor}.weight"] += B @ A
    merge_and_compare(tmp_path, pipe, tmp_path / "l.safetensors", None, len(modules) + 2 * 3, want=want)


def test_sd_scripts_lumina2_lora_registered_against_a_pipeline_written_back_as_kohya(tmp_path):
    """Bound to the pipeline (its qkv in three parts of grouped-query sizes), written as kohya it is sd-scripts' file
    again: the parts joined back into lora_unet_layers_0_attention_qkv."""
    pipe = lumina2_pipeline(tmp_path / "pipe")
    tensors = factors(LUMINA2, musubi_key, seed=10)
    tensors.update({musubi_key(name, "alpha"): torch.tensor(4.0) for name in LUMINA2})
    save_file(tensors, str(tmp_path / "l.safetensors"), {"ss_network_module": "networks.lora_lumina"})
    assert loraops_run("base", "add", pipe, "--name", "lumina").returncode == 0
    run = loraops_run("register", tmp_path / "l.safetensors", "--name", "l", "--base", "lumina")
    assert run.returncode == 0, run.stdout + run.stderr
    assert_round_trip(tmp_path, "l", tensors)


@pytest.mark.parametrize("trained", [("to_q", "to_k"), ("to_q",)], ids=["q-k", "q"])
def test_diffusers_lumina2_lora_on_some_qkv_parts_written_as_kohya(tmp_path, trained):
    """A diffusers LoRA on some of to_q/to_k/to_v, written as kohya on the checkpoint's qkv: a missing v has k's rows
    (grouped-query: fewer than q's); it was given q's, and the file fit no Lumina2 (to_v 32×32, base 16×32). Without
    k or v their rows are unknown: refused in one line."""
    pipe = lumina2_pipeline(tmp_path / "pipe")
    sizes = {"to_q": LU, "to_k": LU_KV}
    tensors = factors({f"transformer.layers.0.attn.{p}": (sizes[p], LU) for p in trained}, peft_key(""))
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    save_file(tensors, str(tmp_path / "d.safetensors"))
    assert loraops_run("base", "add", pipe, "--name", "lumina").returncode == 0
    assert loraops_run("register", tmp_path / "d.safetensors", "--name", "d", "--base", "lumina").returncode == 0
    run = loraops_run("export", "d", "--format", "kohya", "-o", tmp_path / "k.safetensors")
    if len(trained) == 1:
        assert run.returncode != 0 and run.stderr.count("\n") == 1, run.stderr
        assert "'layers.0.attention.qkv' whose to_k and to_v the adapter lacks" in run.stderr, run.stderr
        return
    assert run.returncode == 0, run.stderr
    assert load_file(str(tmp_path / "k.safetensors"))[
        "lora_unet_layers_0_attention_qkv.lora_up.weight"].shape[0] == LU + 2 * LU_KV
    run = loraops_run("check", tmp_path / "k.safetensors", "--base", pipe)
    assert run.returncode == 0 and "3/3 modules match" in run.stdout, run.stdout + run.stderr


def hidream_pipeline(root):
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    model = HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                           num_single_layers=1, attention_head_dim=8, num_attention_heads=4,
                                           caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
                                           num_activated_experts=1, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32),
                                           llama_layers=(0, 1))
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "HiDreamImagePipeline", "transformer": ["diffusers", "HiDreamImageTransformer2DModel"]}))
    return root


HI = 32  # HiDream's tiny hidden size (4 heads of 8)
HIDREAM = {  # HiDream-I1's names (diffusers' too), its MoE experts' Linears included: (rows, columns)
    **{f"double_stream_blocks.0.block.attn1.{p}": (HI, HI) for p in ("to_q", "to_k", "to_v", "to_out", "to_q_t",
                                                                     "to_out_t")},
    "double_stream_blocks.0.block.ff_i.experts.1.w1": (8 * HI, HI),
    "double_stream_blocks.0.block.ff_i.shared_experts.w2": (HI, 8 * HI),
    "double_stream_blocks.0.block.ff_t.w3": (8 * HI, HI),
    "double_stream_blocks.0.block.adaLN_modulation.1": (12 * HI, HI),
    "single_stream_blocks.0.block.attn1.to_v": (HI, HI), "single_stream_blocks.0.block.ff_i.experts.0.w2": (HI, 8 * HI),
    "x_embedder.proj": (HI, 16), "final_layer.linear": (16, HI), "caption_projection.2.linear": (HI, 8),
}


@pytest.mark.parametrize("prefix", ["diffusion_model.", "", "model.diffusion_model."])
def test_hidream_lora_merges_into_a_diffusers_pipeline(tmp_path, prefix):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_hidream_lora_to_diffusers

    pipe = hidream_pipeline(tmp_path / "pipe")
    key = peft_key(prefix)
    tensors, scaled = lora_with_alphas(tmp_path / "h.safetensors", HIDREAM, key, seed=11)

    converted = _convert_non_diffusers_hidream_lora_to_diffusers(
        {f"diffusion_model.{name}.lora_{w}.weight": f for name in HIDREAM for w, f in zip("AB", scaled(name))})
    merge_and_compare(tmp_path, pipe, tmp_path / "h.safetensors", converted, len(HIDREAM))


@pytest.mark.parametrize("key", [peft_key("transformer."), musubi_key], ids=["diffusers", "kohya"])
def test_hidream_lora_in_the_pipeline_names_still_binds(tmp_path, key):
    pipe = hidream_pipeline(tmp_path / "pipe")
    save_file(factors(HIDREAM, key), str(tmp_path / "h.safetensors"))
    run = loraops_run("check", tmp_path / "h.safetensors", "--base", pipe, "--alpha", "4")
    assert run.returncode == 0 and f"{len(HIDREAM)}/{len(HIDREAM)} modules match" in run.stdout, \
        run.stdout + run.stderr


def test_lumina2_lora_merges_into_the_transformer_folder_as_into_the_pipeline(tmp_path):
    """The transformer's own folder as the base (as Wan 2.2's transformer_2/): the fused qkv split there too, the
    merged weights those of the pipeline's merge."""
    pipe = lumina2_pipeline(tmp_path / "pipe")
    save_file(factors(LUMINA2, musubi_key, seed=12), str(tmp_path / "l.safetensors"))
    weights = "diffusion_pytorch_model.safetensors"
    for base, out in ((pipe, tmp_path / "m"), (pipe / "transformer", tmp_path / "t")):
        run = loraops_run("merge", tmp_path / "l.safetensors", "--into", base, "-o", out, "--precise", "--no-record")
        assert run.returncode == 0, run.stderr
    merged, folder = load_file(str(tmp_path / "m" / "transformer" / weights)), load_file(str(tmp_path / "t" / weights))
    assert merged.keys() == folder.keys() and all(torch.equal(merged[k], folder[k]) for k in merged)
    base = load_file(str(pipe / "transformer" / weights))
    assert not torch.equal(folder["layers.0.attn.to_k.weight"], base["layers.0.attn.to_k.weight"])


LT, LT_AUDIO = 16, 8  # LTX-2's tiny video and audio hidden sizes


def ltx2_pipeline(root, *, prompt_adaln: bool = True):
    """A tiny LTX-2 pipeline (its transformer and text connectors); ``prompt_adaln``: LTX-2.3's (cross_attn_mod:
    prompt_adaln, audio_prompt_adaln)."""
    from diffusers import LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    torch.manual_seed(0)
    model = LTX2VideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                        cross_attention_dim=LT, audio_in_channels=4, audio_out_channels=4,
                                        audio_num_attention_heads=2, audio_attention_head_dim=4,
                                        audio_cross_attention_dim=LT_AUDIO, num_layers=1, caption_channels=12,
                                        cross_attn_mod=prompt_adaln, audio_cross_attn_mod=prompt_adaln)
    model.save_pretrained(root / "transformer")
    LTX2TextConnectors(caption_channels=12, text_proj_in_factor=2, video_connector_num_attention_heads=2,
                       video_connector_attention_head_dim=4, video_connector_num_layers=1,
                       video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
                       audio_connector_attention_head_dim=4, audio_connector_num_layers=1,
                       audio_connector_num_learnable_registers=None).save_pretrained(root / "connectors")
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "LTX2Pipeline", "transformer": ["diffusers", "LTX2VideoTransformer3DModel"],
         "connectors": ["ltx2", "LTX2TextConnectors"]}))
    return root


LTX2 = {  # LTX-2's original names: (rows, columns) in the tiny pipeline
    **{f"transformer_blocks.0.attn1.{p}": (LT, LT) for p in ("to_q", "to_k", "to_v", "to_out.0")},
    **{f"transformer_blocks.0.audio_attn2.{p}": (LT_AUDIO, LT_AUDIO) for p in ("to_q", "to_out.0")},
    "transformer_blocks.0.audio_to_video_attn.to_q": (LT_AUDIO, LT),
    "transformer_blocks.0.audio_to_video_attn.to_out.0": (LT, LT_AUDIO),
    "transformer_blocks.0.video_to_audio_attn.to_k": (LT_AUDIO, LT),
    "transformer_blocks.0.ff.net.0.proj": (4 * LT, LT), "transformer_blocks.0.audio_ff.net.2": (LT_AUDIO, 4 * LT_AUDIO),
    "proj_out": (4, LT), "audio_proj_out": (4, LT_AUDIO), "caption_projection.linear_1": (LT, 12),
    # renamed in diffusers (the converter's renames)
    "patchify_proj": (LT, 4), "audio_patchify_proj": (LT_AUDIO, 4), "adaln_single.linear": (9 * LT, LT),
    "audio_adaln_single.emb.timestep_embedder.linear_1": (LT_AUDIO, 256),
    "av_ca_video_scale_shift_adaln_single.linear": (4 * LT, LT), "av_ca_v2a_gate_adaln_single.linear": (LT_AUDIO,
                                                                                                      LT_AUDIO),
    "prompt_adaln_single.linear": (2 * LT, LT), "audio_prompt_adaln_single.linear": (2 * LT_AUDIO, LT_AUDIO),
}


@pytest.mark.parametrize("key", [peft_key("diffusion_model."), peft_key(""), peft_key("model.diffusion_model."),
                                 musubi_key], ids=["comfyui", "bare", "checkpoint", "kohya"])
def test_ltx2_lora_merges_into_a_diffusers_pipeline(tmp_path, key):
    """Video, audio and cross-modal attentions, both feed-forwards, the projections and every adaLN (renamed:
    adaln_single → time_embed, av_ca_*_adaln_single → av_cross_attn_*, LTX-2.3's prompt_adaln_single →
    prompt_adaln) as diffusers' converter + α/r·B·A (it reads only names behind diffusion_model.)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ltx2_lora_to_diffusers

    pipe = ltx2_pipeline(tmp_path / "pipe")
    tensors, scaled = lora_with_alphas(tmp_path / "l.safetensors", LTX2, key, seed=13)
    converted = _convert_non_diffusers_ltx2_lora_to_diffusers(
        {f"diffusion_model.{name}.lora_{w}.weight": f for name in LTX2 for w, f in zip("AB", scaled(name))})
    assert len(converted) == 2 * len(LTX2)
    merge_and_compare(tmp_path, pipe, tmp_path / "l.safetensors", converted, len(LTX2))


CONNECTOR = "text_embedding_projection.aggregate_embed"  # LTX-2's text projection, in the pipeline's connectors


def test_ltx2_lora_on_the_text_projection_merges_into_the_connectors(tmp_path):
    """``text_embedding_projection.aggregate_embed`` (no diffusion_model. before it), which diffusers' LTX-2 loader
    converts apart into the connectors component (``connectors.text_proj_in``), merges there, beside the
    transformer's modules; written as kohya it comes back (lora_unet_text_embedding_projection_aggregate_embed) and
    binds again. It was (not in base)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ltx2_lora_to_diffusers

    pipe = ltx2_pipeline(tmp_path / "pipe")
    modules = {"diffusion_model.transformer_blocks.0.attn1.to_q": (LT, LT), "diffusion_model.patchify_proj": (LT, 4),
               CONNECTOR: (12, 24)}
    tensors, scaled = lora_with_alphas(tmp_path / "l.safetensors", modules, peft_key(""), seed=19)
    lora = {f"{name}.lora_{w}.weight": f for name in modules for w, f in zip("AB", scaled(name))}
    converted = {**_convert_non_diffusers_ltx2_lora_to_diffusers(lora),  # (as LTX2LoraLoaderMixin.lora_state_dict)
                 **_convert_non_diffusers_ltx2_lora_to_diffusers(lora, "text_embedding_projection")}
    run = loraops_run("check", tmp_path / "l.safetensors", "--base", pipe)
    assert run.returncode == 0 and "3/3 modules match" in run.stdout, run.stdout + run.stderr
    run = loraops_run("merge", tmp_path / "l.safetensors", "--into", pipe, "-o", tmp_path / "m", "--precise",
                      "--no-record")
    assert run.returncode == 0, run.stderr
    weights = "diffusion_pytorch_model.safetensors"
    for component in ("transformer", "connectors"):
        base = load_file(str(pipe / component / weights))
        want = merged_as_diffusers(base, {k.replace("connectors.", "transformer.", 1): v for k, v in converted.items()
                                          if k.startswith(f"{component}.")})  # (it strips transformer.)
        merged = check_merged(tmp_path / "m" / component / weights, want)
        assert sum(not torch.equal(merged[k], base[k]) for k in base) == (2 if component == "transformer" else 1)
    assert loraops_run("base", "add", pipe, "--name", "ltx2").returncode == 0
    assert loraops_run("register", tmp_path / "l.safetensors", "--name", "l", "--base", "ltx2").returncode == 0
    run = loraops_run("export", "l", "--format", "kohya", "-o", tmp_path / "k.safetensors")
    assert run.returncode == 0, run.stderr
    written = load_file(str(tmp_path / "k.safetensors"))
    assert "lora_unet_text_embedding_projection_aggregate_embed.lora_up.weight" in written, sorted(written)
    run = loraops_run("check", tmp_path / "k.safetensors", "--base", pipe)
    assert run.returncode == 0 and "3/3 modules match" in run.stdout, run.stdout + run.stderr


@pytest.mark.parametrize("key", [musubi_key, peft_key("diffusion_model."), peft_key("model.diffusion_model.")],
                         ids=["kohya", "comfyui", "checkpoint"])
def test_ltx23_lora_modules_an_ltx2_pipeline_lacks_are_reported_alone(tmp_path, key):
    """LTX-2.3's prompt adaLNs against an LTX-2.0 pipeline (no cross_attn_mod): listed (not in base), nothing else,
    whatever the LoRA's names (in the original ones, every module was listed)."""
    pipe = ltx2_pipeline(tmp_path / "pipe", prompt_adaln=False)
    modules = {name: shape for name, shape in LTX2.items() if name != "adaln_single.linear"}  # (fewer rows there)
    save_file(factors(modules, key), str(tmp_path / "l.safetensors"))
    run = loraops_run("check", tmp_path / "l.safetensors", "--base", pipe, "--alpha", "4")
    assert run.returncode != 0, run.stdout
    for lacked in ("prompt_adaln_single.linear", "audio_prompt_adaln_single.linear"):
        name = key(lacked, "A").removesuffix(".lora_down.weight").removesuffix(".lora_A.weight")
        assert f"\n  {name} (not in base)" in run.stdout, run.stdout
    assert run.stdout.count("(not in base)") == 2, run.stdout
    assert f"{len(modules) - 2}/{len(modules)} modules match" in run.stdout, run.stdout


def test_ltx2_lora_registered_against_a_pipeline_written_back_as_kohya(tmp_path):
    """Bound to the pipeline, a kohya LoRA on LTX-2's checkpoint paths (lora_unet_patchify_proj,
    lora_unet_adaln_single_linear) is written as kohya as it was; one in the original PEFT names is written under those
    paths too, and binds back."""
    pipe = ltx2_pipeline(tmp_path / "pipe")
    tensors = factors(LTX2, musubi_key, seed=14)
    tensors.update({musubi_key(name, "alpha"): torch.tensor(4.0) for name in LTX2})
    save_file(tensors, str(tmp_path / "k.safetensors"))
    lora_with_alphas(tmp_path / "p.safetensors", LTX2, peft_key("diffusion_model."), seed=15)
    assert loraops_run("base", "add", pipe, "--name", "ltx2").returncode == 0
    for ref in ("k", "p"):
        run = loraops_run("register", tmp_path / f"{ref}.safetensors", "--name", ref, "--base", "ltx2")
        assert run.returncode == 0, run.stdout + run.stderr
    assert_round_trip(tmp_path, "k", tensors)
    run = loraops_run("export", "p", "--format", "kohya", "-o", tmp_path / "pk.safetensors")
    assert run.returncode == 0, run.stderr
    assert sorted(k for k in load_file(str(tmp_path / "pk.safetensors")) if not k.endswith(".alpha")) == \
        sorted(k for k in tensors if not k.endswith(".alpha"))
    run = loraops_run("check", tmp_path / "pk.safetensors", "--base", pipe)
    assert run.returncode == 0 and f"{len(LTX2)}/{len(LTX2)} modules match" in run.stdout, run.stdout + run.stderr


def wan_variant_pipeline(root, cls: str, pipeline: str, **config):
    """A tiny Wan VACE or Wan Animate pipeline (diffusers' class ``cls``), Wan's sizes (two blocks)."""
    import diffusers

    torch.manual_seed(0)
    model = getattr(diffusers, cls)(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                    out_channels=4, text_dim=WAN_TEXT, freq_dim=8, ffn_dim=WAN_FFN, num_layers=2,
                                    **config)
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "transformer": ["diffusers", cls]}))
    return root


def wan_vace_pipeline(root):
    return wan_variant_pipeline(root, "WanVACETransformer3DModel", "WanVACEPipeline", in_channels=4,
                                vace_layers=[0, 1], vace_in_channels=6)


def wan_animate_pipeline(root):
    return wan_variant_pipeline(root, "WanAnimateTransformer3DModel", "WanAnimatePipeline", in_channels=12,
                                latent_channels=4, image_dim=WAN_IMAGE, added_kv_proj_dim=WAN_WIDTH,
                                motion_encoder_size=16, motion_style_dim=8, motion_dim=4, motion_encoder_dim=8,
                                motion_encoder_channel_sizes={str(2 ** i): 8 for i in range(2, 10)},
                                face_encoder_hidden_dim=8, face_encoder_num_heads=2, inject_face_latents_blocks=1)


WAN_VACE = {  # VACE's context blocks and input (original names): (rows, columns)
    **{f"vace_blocks.{n}.{attn}.{p}": (WAN_WIDTH, WAN_WIDTH) for n in range(2) for attn in ("self_attn", "cross_attn")
       for p in "qkvo"},
    **{f"vace_blocks.{n}.ffn.0": (WAN_FFN, WAN_WIDTH) for n in range(2)},
    **{f"vace_blocks.{n}.ffn.2": (WAN_WIDTH, WAN_FFN) for n in range(2)},
    **{f"vace_blocks.{n}.after_proj": (WAN_WIDTH, WAN_WIDTH) for n in range(2)},
    "vace_blocks.0.before_proj": (WAN_WIDTH, WAN_WIDTH), "vace_patch_embedding": (WAN_WIDTH, (6, 1, 2, 2)),
}
WAN_ANIMATE = {  # Animate's face adapter (linear1_kv: k and v), face encoder's output, pose input
    **{f"face_adapter.fuser_blocks.{n}.{p}": (WAN_WIDTH, WAN_WIDTH) for n in range(2) for p in ("linear1_q",
                                                                                                  "linear2")},
    **{f"face_adapter.fuser_blocks.{n}.linear1_kv": (2 * WAN_WIDTH, WAN_WIDTH) for n in range(2)},
    "face_encoder.out_proj": (WAN_WIDTH, 8), "pose_patch_embedding": (WAN_WIDTH, (4, 1, 2, 2)),
}


def wan_variant_reference(base, tensors, key, wan, extra):
    """base + α/r·B·A as diffusers would place it: Wan's modules (``wan``) by its Wan LoRA converter, which refuses
    the others (``extra``): those by its single-file converter (convert_wan_transformer_to_diffusers) of the deltas
    named as the checkpoint's weights, which renames and splits them as it does the weights."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    def scaled(name):
        alpha = float(tensors[key(name, "alpha")]) if key(name, "alpha") in tensors else R
        return tensors[key(name, "A")].double(), tensors[key(name, "B")].double() * alpha / R

    lora = {f"diffusion_model.{name}.lora_{w}.weight": f for name in wan for w, f in zip("AB", scaled(name))}
    with pytest.raises(ValueError):
        _convert_non_diffusers_wan_lora_to_diffusers({**lora, **{
            f"diffusion_model.{name}.lora_{w}.weight": f for name in extra for w, f in zip("AB", scaled(name))}})
    want = merged_as_diffusers(base, _convert_non_diffusers_wan_lora_to_diffusers(lora))
    deltas = convert_wan_transformer_to_diffusers({  # (B·A of a convolution: over its in channels and kernel)
        f"{name}.weight": (B.flatten(1) @ A.flatten(1)).view(-1, *A.shape[1:]) for name in extra
        for A, B in [scaled(name)]})
    for tensor, delta in deltas.items():
        want[tensor] = want[tensor] + delta
    return want


def alphas_beside(tensors, modules, key):
    """``tensors`` with an .alpha (2, 4, 8 in turn) for each of ``modules``."""
    return {**tensors, **{key(name, "alpha"): torch.tensor(2.0 ** (i % 3 + 1)) for i, name in enumerate(modules)}}


@pytest.mark.parametrize("make, extra, parts", [(wan_vace_pipeline, WAN_VACE, 0),
                                                (wan_animate_pipeline, WAN_ANIMATE, 2)], ids=["vace", "animate"])
@pytest.mark.parametrize("key", [peft_key("diffusion_model."), musubi_key], ids=["comfyui", "musubi"])
def test_wan_vace_and_animate_loras_merge_into_a_diffusers_pipeline(tmp_path, make, extra, parts, key):
    """Wan's blocks (Animate's with image-to-video's k_img/v_img) and the variant's own modules: VACE's context blocks
    (vace_blocks: attentions, ffn, before_proj → proj_in, after_proj → proj_out) and vace_patch_embedding; Animate's
    face adapter, its linear1_kv split into to_k and to_v (B's halves, A whole: ``parts`` more), its face encoder's
    out_proj and pose_patch_embedding. diffusers' Wan LoRA converter (which WanVACEPipeline and WanAnimatePipeline
    load with) refuses those; they merge as its single-file converter renames (and splits) the weights."""
    pipe = make(tmp_path / "pipe")
    wan = {**wan_modules(make is wan_animate_pipeline), **WAN_TOP}
    tensors = alphas_beside(factors({**wan, **extra}, key, seed=16), extra, key)
    save_file(tensors, str(tmp_path / "w.safetensors"))
    base = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    want = wan_variant_reference(base, tensors, key, wan, extra)
    merge_and_compare(tmp_path, pipe, tmp_path / "w.safetensors", None, len(wan) + len(extra) + parts, want=want)


@pytest.mark.parametrize("make, extra", [(wan_vace_pipeline, WAN_VACE), (wan_animate_pipeline, WAN_ANIMATE)],
                         ids=["vace", "animate"])
def test_musubi_wan_vace_and_animate_loras_written_back_as_kohya(tmp_path, make, extra):
    """Registered against the pipeline, written as kohya: musubi-tuner's names again (Animate's linear1_kv joined
    back from its to_k and to_v)."""
    pipe = make(tmp_path / "pipe")
    tensors = alphas_beside(factors({**wan_modules(make is wan_animate_pipeline), **extra}, musubi_key, seed=18),
                            extra, musubi_key)
    save_file(tensors, str(tmp_path / "w.safetensors"))
    assert loraops_run("base", "add", pipe, "--name", "wan").returncode == 0
    run = loraops_run("register", tmp_path / "w.safetensors", "--name", "w", "--base", "wan")
    assert run.returncode == 0, run.stdout + run.stderr
    assert_round_trip(tmp_path, "w", tensors)


def test_wan_vace_lora_modules_a_wan_pipeline_lacks_are_reported_alone(tmp_path):
    """A VACE LoRA on a plain Wan (text-to-video) pipeline: its vace_blocks are listed (not in base), nothing else."""
    pipe = wan_pipeline(tmp_path / "pipe")
    modules = {**wan_modules(False), "vace_blocks.0.before_proj": (WAN_WIDTH, WAN_WIDTH),
               "vace_blocks.1.self_attn.q": (WAN_WIDTH, WAN_WIDTH)}
    save_file(factors(modules, musubi_key), str(tmp_path / "v.safetensors"))
    run = loraops_run("check", tmp_path / "v.safetensors", "--base", pipe)
    assert run.returncode != 0, run.stdout
    assert "lora_unet_vace_blocks_0_before_proj (not in base)" in run.stdout, run.stdout
    assert "lora_unet_vace_blocks_1_self_attn_q (not in base)" in run.stdout, run.stdout
    assert run.stdout.count("(not in base)") == 2, run.stdout
    assert f"{len(modules) - 2}/{len(modules)} modules match" in run.stdout, run.stdout
def wan22_loras(tmp_path, key):
    """A high-noise and a low-noise Wan LoRA (h.safetensors, l.safetensors: other factors each), in ``key``'s names
    ("diffusers": the file diffusers' converter makes, transformer.blocks.0.attn1.to_q, as diffusers saves a
    transformer_2 LoRA too), and diffusers' conversion of each."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    modules, converted = wan_modules(False), {}
    for ref, seed in (("h", 5), ("l", 7)):
        converted[ref] = _convert_non_diffusers_wan_lora_to_diffusers(
            {k: v.double() for k, v in factors(modules, peft_key("diffusion_model."), seed=seed).items()})
        tensors = ({k: v.float().contiguous() for k, v in converted[ref].items()} if key == "diffusers"
                   else factors(modules, key, seed=seed))
        save_file(tensors, str(tmp_path / f"{ref}.safetensors"))
    return tmp_path / "h.safetensors", tmp_path / "l.safetensors", converted


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("key", [peft_key("diffusion_model."), musubi_key, "diffusers"],
                         ids=["comfyui", "musubi", "diffusers"])
def test_wan22_loras_merge_into_both_experts_in_one_run(tmp_path, key):
    """`merge high --transformer-2 low --into pipe`: high into transformer/, low into transformer_2/ (diffusers'
    load_into_transformer_2), one output pipeline: byte for byte the two merges it took before (the pipeline with
    high, and transformer_2/ given as the base with low), and diffusers' converter + each expert in float64. `check`
    reports both bindings; engine.merge's transformer_2 gives the same bytes."""
    from loraops import engine
    from loraops.formats import read_adapter

    pipe = wan_pipeline(tmp_path / "pipe", experts=True)
    high, low, converted = wan22_loras(tmp_path, key)
    count = len(wan_modules(False))
    run = loraops_run("check", high, "--transformer-2", low, "--base", pipe)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines() == [f"{high} fits {pipe}: {count}/{count} modules match",
                                       f"{low} fits {pipe}/transformer_2: {count}/{count} modules match"]
    run = loraops_run("check", high, "--transformer-2", low, "--base", pipe, "--json")
    assert [(r["ref"], r["fits"]) for r in json.loads(run.stdout)] == [(str(high), [str(pipe)]),
                                                                     (str(low), [f"{pipe}/transformer_2"])]
    for result in json.loads(run.stdout):  # one CheckResult per adapter, each as `check --json` prints alone
        pinned(result, CHECK)
    run = loraops_run("merge", high, "--transformer-2", f"{low}:0.5", "--into", pipe, "-o", tmp_path / "one",
                      "--precise", "--no-record")
    assert run.returncode == 0, run.stderr
    assert f"merged {high}:1 (transformer), {low}:0.5 (transformer_2) → " in run.stdout, run.stdout
    for args in ([high, "--into", pipe, "-o", tmp_path / "a"],
                 [f"{low}:0.5", "--into", pipe / "transformer_2", "-o", tmp_path / "b"]):
        assert loraops_run("merge", *args, "--precise", "--no-record").returncode == 0
    one, two = files_of(tmp_path / "one"), files_of(tmp_path / "a")
    two.update({Path("transformer_2") / name: data for name, data in files_of(tmp_path / "b").items()})
    assert one.keys() == two.keys() and all(one[name] == two[name] for name in one)
    weights = "diffusion_pytorch_model.safetensors"
    for component, ref, weight in (("transformer", "h", 1.0), ("transformer_2", "l", 0.5)):
        expert = load_file(str(pipe / component / weights))
        halved = {k: v * weight if ".lora_B." in k else v for k, v in converted[ref].items()}
        check_merged(tmp_path / "one" / component / weights, merged_as_diffusers(expert, halved))
    engine.merge(pipe, [(read_adapter(high), 1.0)], tmp_path / "lib", precise=True,
                 transformer_2=[(read_adapter(low), 0.5)])
    assert files_of(tmp_path / "lib") == one


@pytest.mark.registry_backend
def test_wan22_merge_per_expert_is_recorded_and_subtracts(tmp_path):
    """The registry records which adapter went to which expert (`base show`), `subtract --exact` restores the
    pipeline or re-merges the adapter that stays into its own expert, bit for bit, and a plain subtract takes both
    off; the second expert's adapter given plainly is not one of the merge's."""
    pipe = wan_pipeline(tmp_path / "pipe", experts=True)
    high, low, _ = wan22_loras(tmp_path, musubi_key)
    assert loraops_run("base", "add", pipe, "--name", "wan22").returncode == 0
    run = loraops_run("merge", high, "--transformer-2", low, "--into", "wan22", "-o", tmp_path / "m")
    assert run.returncode == 0, run.stderr
    run = loraops_run("base", "show", "m")
    assert "lineage      merge(wan22, h@1×1 (transformer), l@1×1 (transformer_2))" in run.stdout, run.stdout
    run = loraops_run("base", "show", "m", "--json")
    assert [(i["ref"], i["role"]) for i in json.loads(run.stdout)["lineage"]["inputs"]] == [
        ("wan22", "base"), ("h@1", "adapter"), ("l@1", "transformer_2")]
    run = loraops_run("subtract", "--from", "m", low, "--exact", "-o", tmp_path / "wrong")
    assert run.returncode == 2 and run.stderr.splitlines() == [
        f"error: --exact: {low}:1 is not one of the adapters m was merged with ({high}:1, {low}:1 (transformer_2))"]
    assert not (tmp_path / "wrong").exists()
    run = loraops_run("subtract", "--from", "m", "--transformer-2", low, "--exact", "-o", tmp_path / "high-only")
    assert run.returncode == 0, run.stderr
    assert loraops_run("merge", high, "--into", pipe, "-o", tmp_path / "h", "--no-record").returncode == 0
    assert files_of(tmp_path / "high-only") == files_of(tmp_path / "h")
    run = loraops_run("subtract", "--from", "m", high, "--transformer-2", low, "--exact", "-o", tmp_path / "r")
    assert run.returncode == 0 and "restored bit for bit" in run.stdout, run.stderr
    assert files_of(tmp_path / "r") == files_of(pipe)
    run = loraops_run("subtract", "--from", "m", high, "--transformer-2", low, "-o", tmp_path / "s", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert [a["component"] for a in report["adapters"]] == [None, "transformer_2"]
    assert report["residual"]["compared_to"] == str(pipe) and report["residual"]["max_abs_diff"] < 1e-6
    weights = "diffusion_pytorch_model.safetensors"
    for component in ("transformer", "transformer_2"):
        back, base = load_file(str(tmp_path / "s" / component / weights)), load_file(str(pipe / component / weights))
        assert all(torch.allclose(back[k], base[k], atol=1e-6) for k in base)


def test_wan22_second_expert_errors_leave_the_output_alone(tmp_path):
    """--transformer-2 for a pipeline with one transformer: one line naming the option, nothing written (an
    existing output kept, --force or not); an adapter that does not fit transformer_2/ says so, naming it."""
    high, low, _ = wan22_loras(tmp_path, musubi_key)
    single = wan_pipeline(tmp_path / "single")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    line = (f"error: --transformer-2: base {single} has no transformer_2/ (a Wan 2.2 A14B pipeline folder's second "
            "transformer, the low-noise expert): give its adapters as the others")
    for run in (loraops_run("merge", high, "--transformer-2", low, "--into", single, "-o", out, "--force"),
                loraops_run("subtract", "--from", single, "--transformer-2", low, "-o", out, "--force"),
                loraops_run("check", "--transformer-2", low, "--base", single)):
        assert run.returncode == 2 and run.stderr.splitlines() == [line], run.stderr
    assert files_of(out) == {Path("keep"): b"mine"}
    run = loraops_run("check", "--transformer-2", low)
    assert run.returncode == 2 and run.stderr.splitlines() == [
        "error: --transformer-2 checks against a Wan 2.2 pipeline's second transformer: give that pipeline as "
        "--base"], run.stderr
    pipe = wan_pipeline(tmp_path / "pipe", experts=True)
    save_file(factors(wan_modules(True), musubi_key), str(tmp_path / "i2v.safetensors"))
    run = loraops_run("merge", high, "--transformer-2", tmp_path / "i2v.safetensors", "--into", pipe, "-o", out,
                      "--force")
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1, run.stderr
    assert f"do not fit base {pipe}/transformer_2: lora_unet_blocks_0_cross_attn_k_img (not in base)" in run.stderr
    assert files_of(out) == {Path("keep"): b"mine"}


def test_wan22_second_expert_in_the_library(tmp_path):
    """engine.merge's transformer_2 for a pipeline without one: the same refusal, the parameter named as Python
    names it, nothing written; merging.merge's transformer_2 given as one string is refused as adapters' is."""
    from loraops import engine, merging
    from loraops.errors import InvalidInputError, ParameterError
    from loraops.formats import read_adapter

    _, low, _ = wan22_loras(tmp_path, musubi_key)
    single = wan_pipeline(tmp_path / "single")
    with pytest.raises(ParameterError, match=r"^transformer_2: base .*single has no transformer_2/ \(a Wan 2\.2"):
        engine.merge(single, [], tmp_path / "out", transformer_2=[(read_adapter(low), 1.0)])
    assert not (tmp_path / "out").exists()
    with pytest.raises(InvalidInputError, match=r"^transformer_2 is a list: give \["):
        merging.merge(single, [], tmp_path / "out", transformer_2=str(low), record=False)
