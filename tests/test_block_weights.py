"""Stable Diffusion LoRA block weights (sd-scripts' --lbws): the block of a module under every naming (kohya, diffusers,
the original checkpoint's), and combine weighing each block's ΔW against a float64 reference."""
import re

import pytest
import torch

from factories import kohya_file, loraops_run
from loraops import ldm
from loraops.blocks import LAYOUTS, block_of, parse_block_weights
from loraops.derive import combine
from loraops.errors import InvalidInputError
from loraops.formats import read_adapter

# (name, block) as sd-scripts' own files name SD 1.x modules (diffusers paths) and SDXL ones (LDM paths)
KOHYA = [
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "BASE"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "IN01"),
    ("lora_unet_down_blocks_0_resnets_1_conv1", "IN02"),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", "IN03"),
    ("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k", "IN05"),
    ("lora_unet_down_blocks_2_downsamplers_0_conv", "IN09"),
    ("lora_unet_down_blocks_3_resnets_1_conv2", "IN11"),
    ("lora_unet_mid_block_attentions_0_proj_out", "MID"),
    ("lora_unet_up_blocks_0_resnets_0_conv1", "OUT00"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "OUT02"),
    ("lora_unet_up_blocks_1_attentions_2_proj_in", "OUT05"),
    ("lora_unet_up_blocks_1_upsamplers_0_conv", "OUT05"),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2", "OUT11"),
    ("lora_te1_text_model_encoder_layers_3_mlp_fc1", "BASE"),
    ("lora_te2_text_model_encoder_layers_3_mlp_fc1", "BASE"),
    ("lora_unet_time_embed_0", "IN00"),
    ("lora_unet_label_emb_0_2", "IN00"),
    ("lora_unet_input_blocks_0_0", "IN00"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", "IN04"),
    ("lora_unet_input_blocks_8_1_proj_out", "IN08"),
    ("lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0", "MID"),
    ("lora_unet_output_blocks_0_1_proj_in", "OUT00"),
    ("lora_unet_output_blocks_8_0_skip_connection", "OUT08"),
    ("lora_unet_out_2", None),
    # diffusers' and the checkpoints' own (dotted) paths
    ("unet.down_blocks.1.attentions.0.proj_in", "IN04"),
    ("down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_v", "IN08"),
    ("text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj", "BASE"),
    ("text_model.encoder.layers.0.self_attn.k_proj", "BASE"),
    ("model.diffusion_model.output_blocks.11.1.proj_out", "OUT11"),
    ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc2", "BASE"),
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj", "BASE"),
    ("unet.conv_out", None),
]


@pytest.mark.parametrize("name, block", KOHYA)
def test_block_of_each_naming(name, block):
    assert block_of(name) == block


# every LDM module of each U-Net's blocks (SD 1.x: 12 input/output blocks, attention in input 1-2, 4-5, 7-8 and
# output 3-11; SDXL: 9, attention from input 4 and output up to 5), and the diffusers path loraops' own checkpoint
# translation gives it: both in the same block
SD_LDM = (["input_blocks.0.0"] + [f"input_blocks.{n}.0.in_layers.2" for n in (1, 2, 4, 5, 7, 8, 10, 11)]
          + [f"input_blocks.{n}.1.proj_in" for n in (1, 2, 4, 5, 7, 8)] + [f"input_blocks.{n}.0.op" for n in (3, 6, 9)]
          + ["middle_block.0.in_layers.2", "middle_block.1.proj_out"]
          + [f"output_blocks.{n}.0.in_layers.2" for n in range(12)] + [f"output_blocks.{n}.1.proj_in" for n in range(3, 12)]
          + ["output_blocks.2.1.conv", "output_blocks.5.2.conv", "output_blocks.8.2.conv"])
SDXL_LDM = (["input_blocks.0.0"] + [f"input_blocks.{n}.0.in_layers.2" for n in (1, 2, 4, 5, 7, 8)]
            + [f"input_blocks.{n}.1.proj_in" for n in (4, 5, 7, 8)] + ["input_blocks.3.0.op", "input_blocks.6.0.op"]
            + [f"output_blocks.{n}.0.in_layers.2" for n in range(9)] + [f"output_blocks.{n}.1.proj_in" for n in range(6)]
            + ["output_blocks.2.2.conv", "output_blocks.5.2.conv"])


@pytest.mark.parametrize("sdxl, paths", [(False, SD_LDM), (True, SDXL_LDM)])
def test_diffusers_and_checkpoint_names_share_blocks(sdxl, paths):
    for path in paths:
        block = f"{'IN' if path.startswith('input') else 'OUT' if path.startswith('output') else 'MID'}"
        if block != "MID":
            block += f"{int(path.split('.')[1]):02d}"
        diffusers = ldm.unet_path(path, sdxl)
        for name in (path, "model.diffusion_model." + path, "lora_unet_" + path.replace(".", "_"), diffusers,
                     "unet." + diffusers, "lora_unet_" + diffusers.replace(".", "_")):
            assert block_of(name) == block, name


def test_layouts_name_the_blocks_of_their_unet():
    assert {n: len(blocks) for n, (_, blocks) in LAYOUTS.items()} == {26: 26, 17: 17, 20: 20, 12: 12}
    # sd-scripts' 17 and 12 are the blocks its default LoRA (attention only) trains, and the text encoders
    attention = {"BASE", "MID"} | {block_of("lora_unet_" + p.replace(".", "_")) for p in SD_LDM if ".1.proj_in" in p}
    assert set(LAYOUTS[17][1]) == attention
    sdxl = {"BASE", "MID"} | {block_of(p) for p in SDXL_LDM if ".1.proj_in" in p}
    assert set(LAYOUTS[12][1]) == sdxl


@pytest.mark.parametrize("text", ["1,2,3", "[1, 1]", "1,x," + "1," * 15 + "1", ""])
def test_bad_lists_are_refused(text):
    with pytest.raises(InvalidInputError):
        parse_block_weights(text)


@pytest.mark.parametrize("weight", ["1e-40", "-1e-400", 1e-40])
def test_a_subnormal_block_weight_is_refused_as_a_weight_is(weight):
    """A :WEIGHT that is not 0 but below float32's smallest normal number is refused (it merged as no adapter); the
    same value as a block weight was taken, and the merge said its tensors were merged while none changed. A weight
    written as 0 (0, 0.0, 0e5) is a weight."""
    from loraops.blocks import checked

    with pytest.raises(InvalidInputError, match="not 0 but below float32's smallest normal number"):
        checked(f"{weight},{'1,' * 15}1" if isinstance(weight, str) else [weight, *[1.0] * 16])
    assert parse_block_weights("0,0.0,0e5," + "1," * 13 + "1")[:3] == (0.0, 0.0, 0.0)


def test_parse_sd_scripts_spelling():
    assert parse_block_weights("[" + ", ".join(["0.5"] * 17) + "]") == (0.5,) * 17
    assert parse_block_weights(",".join(["-1"] * 20)) == (-1.0,) * 20


# The LoRA Block Weight extension's default presets, as its DEF_WEIGHT_PRESET holds them (hako-mikan/
# sd-webui-lora-block-weight, scripts/lora_block_weight.py; the same at commits 11f1d4d2 and 04b986c2, which adds
# FLUXALL, 61 weights, not read here)
EXTENSION_PRESETS = """\
NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"""
EXTENSION = dict(line.split(":") for line in EXTENSION_PRESETS.splitlines())


@pytest.mark.parametrize("name", EXTENSION)
def test_a_preset_name_is_the_extensions_list(name):
    assert parse_block_weights(name) == tuple(float(w) for w in EXTENSION[name].split(",")) == parse_block_weights(
        f" {EXTENSION[name]} ")
    assert len(parse_block_weights(name)) == 17  # the SD 1.x/2.x layout: BASE, IN01 … OUT11


@pytest.mark.parametrize("text", ["outall", "Outall", "FLUXALL", "XYZ", "ROUT", "ALL1"])
def test_an_unknown_preset_name_is_refused_naming_the_known_ones(tmp_path, text):
    with pytest.raises(InvalidInputError, match="not a preset name of the LoRA Block Weight extension "
                                                f"\\({', '.join(EXTENSION)}: 17 weights"):
        parse_block_weights(text)
    a = kohya_file(tmp_path / "a.safetensors", SD_MODULES, rank=4, seed=1)
    run = loraops_run("combine", a, "--block-weights", text, "-o", tmp_path / "o.safetensors")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "OUTALL, ALL0.5" in run.stderr, (
        run.stderr)


@pytest.mark.parametrize("entry", ["R", "U", "X", "X+0.5"])
def test_the_extensions_random_and_prompt_entries_are_refused(entry):
    message = f"{entry!r} is the LoRA Block Weight extension's random (R, U) or prompt's (X) weight, which a merge"
    with pytest.raises(InvalidInputError, match=re.escape(message + " cannot reproduce: give numbers")):
        parse_block_weights("1,0,0,0,0,0,0,0," + ",".join([entry] * 9))


def test_a_preset_weighs_as_its_numbers_and_is_recorded_and_shown_as_them(tmp_path):
    """OUTALL is its 17 numbers: the same ΔW, the same lineage and the same [blocks …] text; blocks a 17-list does
    not name (a LoCon's IN03, conv_in) keep weight 1 as for any 17-list, not 0 as the extension's to26 makes them."""
    import json

    from loraops.blocks import block_weighted

    a = kohya_file(tmp_path / "a.safetensors", SD_MODULES, rank=4, seed=1)
    adapter = read_adapter(a)
    none = block_weighted(adapter, "NONE", "a")
    for name, module in none.modules.items():
        kept = block_of(name) not in LAYOUTS[17][1]  # IN03, IN00
        assert module.scale == (adapter.modules[name].scale if kept else 0), name
    assert sum(block_of(name) not in LAYOUTS[17][1] for name in SD_MODULES) == 2
    outall = EXTENSION["OUTALL"]
    runs = [loraops_run("combine", a, "--block-weights", weights, "--name", name, "--json",
                        "-o", tmp_path / f"{name}.safetensors") for name, weights in (("p", "OUTALL"), ("n", outall))]
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    reports = [json.loads(run.stdout) for run in runs]
    assert reports[0]["report"]["inputs"][0]["block_weights"] == [float(w) for w in outall.split(",")]
    assert reports[0]["report"]["inputs"][0]["block_weights"] == reports[1]["report"]["inputs"][0]["block_weights"]
    p, n = read_adapter(tmp_path / "p.safetensors"), read_adapter(tmp_path / "n.safetensors")
    for name in SD_MODULES:
        torch.testing.assert_close(p.modules[name].delta(), n.modules[name].delta(), rtol=0, atol=0)
    run = loraops_run("combine", a, "--block-weights", "OUTALL", "--name", "t", "-o", tmp_path / "t.safetensors")
    assert run.returncode == 0 and run.stdout.startswith(f"cat of a@1×1 [blocks {outall}]"), run.stdout
    run = loraops_run("combine", a, "--block-weights", "ALL", "--name", "o", "-o", tmp_path / "o.safetensors")
    assert run.returncode == 0 and run.stdout.startswith("cat of a@1×1\n"), run.stdout  # all 1s: as none


def test_an_sdxl_adapter_refuses_the_extensions_sd_presets(tmp_path):
    """The extension's presets are SD 1.x/2.x lists (it has none for SDXL, whose main attention blocks a 17-list
    would leave out): an adapter told SDXL refuses them, naming the preset, as it refuses any 17-list."""
    sdxl = kohya_file(tmp_path / "x.safetensors", {"lora_te1_text_model_encoder_layers_0_mlp_fc1": ((8,), (8,)),
                                                   "lora_unet_input_blocks_4_1_proj_in": ((8,), (8,))}, seed=1)
    message = ("SDXL adapter: give it 12 or 20 block weights, not 17 (OUTALL is the LoRA Block Weight extension's "
               "SD 1.x/2.x preset: it has none for SDXL)")
    for weights in ("OUTALL", EXTENSION["OUTALL"]):
        with pytest.raises(InvalidInputError, match=re.escape(message)):
            combine([str(sdxl)], "cat", block_weights=[weights], name="x")
    run = loraops_run("combine", sdxl, "--block-weights", "ALL", "-o", tmp_path / "o.safetensors")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "not 17 (ALL is the LoRA Block Weight extension's SD 1.x/2.x preset" in run.stderr, run.stderr
    with pytest.raises(InvalidInputError, match="not 17$"):  # a list that is no preset: no note
        combine([str(sdxl)], "cat", block_weights=[[0.5] * 16 + [1.0]], name="y")


SD_MODULES = {  # kohya name → (down shape, up shape) without the rank
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((16,), (16,)),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ((8,), (8,)),
    "lora_unet_down_blocks_0_downsamplers_0_conv": ((8, 3, 3), (8, 1, 1)),  # IN03: not in a 17-list
    "lora_unet_down_blocks_1_attentions_1_proj_out": ((12,), (12,)),
    "lora_unet_mid_block_attentions_0_proj_in": ((12,), (12,)),
    "lora_unet_up_blocks_1_resnets_2_conv1": ((12, 3, 3), (12, 1, 1)),
    "lora_unet_up_blocks_3_attentions_2_proj_out": ((8,), (8,)),
    "lora_unet_conv_in": ((4, 3, 3), (8, 1, 1)),
}


def weights_of(layout: int, seed: int) -> list[float]:
    return torch.empty(layout, dtype=torch.float64).uniform_(-1, 2, generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("layout", [17, 26])
def test_combine_weighs_each_block(tmp_path, layout):
    a = kohya_file(tmp_path / "a.safetensors", SD_MODULES, rank=4, alpha=2.0, seed=1)
    b = kohya_file(tmp_path / "b.safetensors", SD_MODULES, rank=3, alpha=3.0, seed=2)
    lists = [weights_of(layout, 1), weights_of(layout, 2)]
    combine([(str(a), 0.7), (str(b), -0.4)], "cat", block_weights=lists, output=str(tmp_path / "out.safetensors"))
    result = read_adapter(tmp_path / "out.safetensors")
    assert result.modules.keys() == SD_MODULES.keys()
    blocks = LAYOUTS[layout][1]
    for name, module in result.modules.items():
        expected = 0
        for path, ratio, weights in ((a, 0.7, lists[0]), (b, -0.4, lists[1])):
            one = read_adapter(path).modules[name]
            block = dict(zip(blocks, weights)).get(block_of(name), 1.0)  # unnamed blocks keep 1, as sd-scripts'
            expected = expected + ratio * block * one.delta(dtype=torch.float64)
        torch.testing.assert_close(module.delta(dtype=torch.float64), expected, rtol=1e-5, atol=1e-6)
    # the 17-list leaves IN03 and conv_in as they were; the 26-list weighs IN03 too (conv_in is IN00 there)
    assert (block_of("lora_unet_down_blocks_0_downsamplers_0_conv") in blocks) == (layout == 26)


def test_combine_cli_and_lineage(tmp_path):
    a = kohya_file(tmp_path / "a.safetensors", SD_MODULES, rank=4, seed=1)
    ones, halves = ",".join(["1"] * 17), "[" + ",".join(["0.5"] * 17) + "]"
    run = loraops_run("combine", a, a, "--block-weights", ones, "--block-weights", halves, "--name", "ab",
                      "-o", tmp_path / "ab.safetensors", "--json")
    assert run.returncode == 0, run.stderr
    assert '"block_weights": [' in run.stdout
    result, one = read_adapter(tmp_path / "ab.safetensors"), read_adapter(a)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"  # IN01: 1 + 0.5
    torch.testing.assert_close(result.modules[name].delta(), 1.5 * one.modules[name].delta(), rtol=1e-5, atol=1e-6)
    name = "lora_unet_conv_in"  # in no block of a 17-list: 1 + 1
    torch.testing.assert_close(result.modules[name].delta(), 2 * one.modules[name].delta(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--block-weights", ",".join(["1"] * 17)], "1 lists of block weights for 2 adapters"),
    (["--block-weights", ",".join(["1"] * 18), "--block-weights", ",".join(["1"] * 18)], "18 numbers"),
    (["--block-weights", ",".join(["1"] * 20)] * 2, "SD 1.x/2.x adapter"),
    # (it named the adapter's weight 1 and a "scale" of 5e+38, not the block weight typed)
    (["--block-weights", "1," + "1e39," * 15 + "1"] * 2, "block weight 1e+39 of block IN01 × scale 0.5 of module"),
])
def test_cli_refusals(tmp_path, args, message):
    a = kohya_file(tmp_path / "a.safetensors", SD_MODULES, rank=4, seed=1)
    run = loraops_run("combine", a, a, *args)
    assert run.returncode != 0 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_sdxl_and_other_adapters_refused(tmp_path):
    sdxl = kohya_file(tmp_path / "x.safetensors", {"lora_te1_text_model_encoder_layers_0_mlp_fc1": ((8,), (8,)),
                                                   "lora_unet_input_blocks_4_1_proj_in": ((8,), (8,))}, seed=1)
    with pytest.raises(InvalidInputError, match="SDXL adapter: give it 12 or 20"):
        combine([str(sdxl)], "cat", block_weights=[[1.0] * 26], name="x1")
    combine([str(sdxl)], "cat", block_weights=[[0.5] * 12], name="x2")  # accepted
    flux = kohya_file(tmp_path / "f.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": ((8,), (24,))}, seed=1)
    with pytest.raises(InvalidInputError, match="in none of their blocks"):
        combine([str(flux)], "cat", block_weights=[[1.0] * 20], name="f")


MERGED = {  # layout → modules (original checkpoint paths) of a LoRA merged with block weights
    "sd15": ["input_blocks.1.1.proj_in", "input_blocks.3.0.op", "middle_block.1.proj_out",
             "output_blocks.5.2.conv", "output_blocks.11.1.transformer_blocks.0.attn2.to_k"],
    "sdxl": ["label_emb.0.0", "input_blocks.4.1.proj_in", "middle_block.1.proj_in", "output_blocks.2.2.conv",
             "out.2"],
}


@pytest.mark.parametrize("layout, count", [("sd15", 26), ("sd15", 17), ("sdxl", 20), ("sdxl", 12)])
def test_merge_weighs_each_block(tmp_path, layout, count):
    """sd-scripts' names (diffusers paths for SD 1.x, the checkpoint's for SDXL) merged into a tiny single-file UNet:
    each tensor moves by ratio · block weight · ΔW (float64 reference); the lineage records the weights."""
    import json

    from safetensors.torch import load_file, save_file
    from test_extract_sd_names import unet_checkpoint
    from test_ldm import SD15, SDXL

    from loraops.registry import Registry

    sdxl = layout == "sdxl"
    base = unet_checkpoint(SDXL if sdxl else SD15)
    save_file(base, str(tmp_path / "base.safetensors"))
    modules = {}
    for path in MERGED[layout]:
        shape = base[f"model.diffusion_model.{path}.weight"].shape
        name = path if sdxl else ldm.unet_path(path, False)
        modules["lora_unet_" + name.replace(".", "_")] = ((shape[1], *shape[2:]), (shape[0], *[1] * len(shape[2:])))
    lora = kohya_file(tmp_path / "a.safetensors", modules, rank=2, alpha=1.0, seed=3,
                      metadata={"ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1"})
    weights = weights_of(count, 5)
    run = loraops_run("merge", f"{lora}:0.6", "--into", tmp_path / "base.safetensors", "--device", "cpu",
                      "--block-weights", ",".join(map(repr, weights)), "-o", tmp_path / "m.safetensors", "--name", "m")
    assert run.returncode == 0, run.stderr
    merged, adapter = load_file(str(tmp_path / "m.safetensors")), read_adapter(lora)
    by_block = dict(zip(LAYOUTS[count][1], weights))
    for path, name in zip(MERGED[layout], modules):
        tensor = f"model.diffusion_model.{path}.weight"
        delta = adapter.modules[name].delta(dtype=torch.float64).reshape(base[tensor].shape)
        expected = base[tensor].double() + 0.6 * by_block.get(block_of(name), 1.0) * delta
        torch.testing.assert_close(merged[tensor].double(), expected, rtol=1e-5, atol=1e-5, msg=path)
    with Registry.open() as reg:
        lineage = reg.get_base("m").lineage
    assert json.loads(json.dumps(lineage.params))["adapters"][0]["block_weights"] == weights


def test_subtract_exact_re_merges_what_stays_with_its_block_weights(tmp_path):
    """subtract --exact re-merges the adapters that stay merged onto the recorded base: one merged with block weights
    comes back with them (bit-identical to merging it alone); taken off without them, it is not the one merged."""
    from safetensors.torch import load_file, save_file
    from test_extract_sd_names import unet_checkpoint
    from test_ldm import SD15

    base = unet_checkpoint(SD15)
    save_file(base, str(tmp_path / "base.safetensors"))
    modules = {}
    for path in ("input_blocks.1.1.proj_in", "middle_block.1.proj_out"):
        shape = base[f"model.diffusion_model.{path}.weight"].shape
        modules["lora_unet_" + ldm.unet_path(path, False).replace(".", "_")] = ((shape[1], 1, 1), (shape[0], 1, 1))
    a = kohya_file(tmp_path / "a.safetensors", modules, rank=2, seed=1)
    b = kohya_file(tmp_path / "b.safetensors", modules, rank=2, seed=2)
    weights = ",".join(map(repr, weights_of(17, 7)))
    ones = ",".join(["1"] * 17)
    into = ["--into", tmp_path / "base.safetensors", "--device", "cpu"]
    assert loraops_run("merge", a, b, *into, "--block-weights", weights, "--block-weights", ones,
                       "-o", tmp_path / "ab.safetensors").returncode == 0
    assert loraops_run("merge", a, *into, "--block-weights", weights, "-o", tmp_path / "a-only.safetensors",
                       "--no-record").returncode == 0
    run = loraops_run("subtract", b, "--from", tmp_path / "ab.safetensors", "--exact", "-o", tmp_path / "r.safetensors")
    assert run.returncode == 0, run.stderr
    restored, alone = load_file(str(tmp_path / "r.safetensors")), load_file(str(tmp_path / "a-only.safetensors"))
    assert all(torch.equal(restored[k], alone[k]) for k in alone)
    run = loraops_run("subtract", a, b, "--from", tmp_path / "ab.safetensors", "--exact", "-o", tmp_path / "r2.safetensors")
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.parametrize("item", [None, 0.5, 17])
def test_python_api_refuses_an_item_that_is_no_list(tmp_path, item):
    """One list per adapter: a None or a bare number in its place is refused (InvalidInputError), not a TypeError."""
    a = kohya_file(tmp_path / "a.safetensors", SD_MODULES, rank=4, seed=1)
    with pytest.raises(InvalidInputError, match="list of numbers"):
        combine([str(a)], "cat", block_weights=[item], output=str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()


def test_sd_adapter_by_its_metadata_refuses_an_sdxl_list(tmp_path):
    """An SD 1.x LoRA whose modules are all in blocks SDXL has too is still told by sd-scripts' metadata (sd_v1): an
    SDXL list (which would weigh other blocks than the user meant, sd-scripts' SDXL layout) is refused."""
    modules = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((16,), (16,)),
               "lora_unet_down_blocks_1_attentions_0_proj_in": ((8,), (8,))}
    sd = kohya_file(tmp_path / "a.safetensors", modules, rank=4, seed=1, metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(InvalidInputError, match="is an SD 1.x/2.x adapter: give it 17 or 26 block weights, not 12"):
        combine([str(sd)], "cat", block_weights=[[0.5] * 12], output=str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()
    combine([str(sd)], "cat", block_weights=[[0.5] * 17], output=str(tmp_path / "out.safetensors"))  # accepted


@pytest.mark.parametrize("weights", [[1.0] * 5, "1,2", [None] * 17])
def test_block_weighted_checks_its_list(tmp_path, weights):
    """The public block_weighted checks the list it is given (InvalidInputError), as the commands do."""
    from loraops.blocks import block_weighted

    adapter = read_adapter(kohya_file(tmp_path / "a.safetensors", SD_MODULES, rank=4, seed=1))
    with pytest.raises(InvalidInputError, match="block weights"):
        block_weighted(adapter, weights, "a")
    halved = block_weighted(adapter, "[" + ",".join(["0.5"] * 17) + "]", "a")  # sd-scripts' spelling, as documented
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert halved.modules[name].scale == 0.5 * adapter.modules[name].scale


def sd15_lora(tmp_path, paths, seed: int, name: str = "a"):
    """A tiny SD 1.5 single-file UNet (base.safetensors, made once) and a kohya LoRA of ``paths`` (its checkpoint
    paths) under sd-scripts' SD 1.x names: (the base's tensors, the LoRA's path)."""
    from safetensors.torch import save_file
    from test_extract_sd_names import unet_checkpoint
    from test_ldm import SD15

    base = unet_checkpoint(SD15)
    if not (tmp_path / "base.safetensors").exists():
        save_file(base, str(tmp_path / "base.safetensors"))
    modules = {}
    for path in paths:
        shape = base[f"model.diffusion_model.{path}.weight"].shape
        modules["lora_unet_" + ldm.unet_path(path, False).replace(".", "_")] = (
            (shape[1], *shape[2:]), (shape[0], *[1] * len(shape[2:])))
    return base, kohya_file(tmp_path / f"{name}.safetensors", modules, rank=2, alpha=1.0, seed=seed,
                            metadata={"ss_base_model_version": "sd_v1"})


def test_subtract_takes_off_a_merge_with_block_weights(tmp_path):
    """`subtract x:0.7 --block-weights L` takes off what `merge x:0.7 --block-weights L` put on: the plain subtract
    leaves only rounding (measured against the recorded base, as every merged adapter comes off), --exact gives the
    base's bytes back; without the list, --exact says the adapter merged had block weights."""
    from safetensors.torch import load_file

    base, x = sd15_lora(tmp_path, MERGED["sd15"], seed=4, name="x")
    weights = ",".join(map(repr, weights_of(17, 9)))
    merged = tmp_path / "m.safetensors"
    run = loraops_run("merge", f"{x}:0.7", "--into", tmp_path / "base.safetensors", "--device", "cpu",
                      "--block-weights", weights, "-o", merged)
    assert run.returncode == 0, run.stderr
    run = loraops_run("subtract", f"{x}:0.7", "--from", merged, "--device", "cpu", "--block-weights", weights,
                      "-o", tmp_path / "s.safetensors")
    assert run.returncode == 0, run.stderr
    assert "residual vs" in run.stdout, run.stdout  # matched to the recorded merge: compared with its base
    got = load_file(str(tmp_path / "s.safetensors"))
    for key in base:
        # rounding only: the merge moved these tensors by up to ~1 (a plain ΔW's subtract would leave that)
        torch.testing.assert_close(got[key], base[key], rtol=0, atol=1e-6, msg=key)
    plain = loraops_run("subtract", f"{x}:0.7", "--from", merged, "--device", "cpu", "-o", tmp_path / "p.safetensors",
                        "--no-record")
    assert plain.returncode == 0, plain.stderr
    left = load_file(str(tmp_path / "p.safetensors"))
    assert max(float((left[k] - base[k]).abs().max()) for k in base) > 1e-3  # the list matters
    run = loraops_run("subtract", f"{x}:0.7", "--from", merged, "--exact", "--block-weights", weights,
                      "-o", tmp_path / "e.safetensors")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "e.safetensors").read_bytes() == (tmp_path / "base.safetensors").read_bytes()
    run = loraops_run("subtract", f"{x}:0.7", "--from", merged, "--exact", "-o", tmp_path / "e2.safetensors")
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert f"{x}:0.7 is not one of the adapters" in run.stderr and f"({x}:0.7 [blocks {weights}])" in run.stderr
    run = loraops_run("subtract", x, x, "--from", merged, "--block-weights", weights, "-o", tmp_path / "n.safetensors")
    assert run.returncode != 0 and "1 lists of block weights for 2 adapters" in run.stderr, run.stderr


def test_a_list_of_ones_is_recorded_as_none_by_combine_and_merge(tmp_path):
    """A list of 1s is the same ΔW: combine's lineage, as merge's, records it as none (null for that input; no
    block_weights at all when every input's is)."""
    from loraops.registry import Registry

    a = kohya_file(tmp_path / "a.safetensors", SD_MODULES, rank=4, seed=1)
    ones, halves = [1.0] * 17, [0.5] * 17
    combine([str(a), str(a)], "cat", block_weights=[ones, halves], name="one-half")
    combine([str(a)], "cat", block_weights=[ones], name="ones")
    _, x = sd15_lora(tmp_path, MERGED["sd15"][:2], seed=4, name="x")
    assert loraops_run("merge", x, "--into", tmp_path / "base.safetensors", "--device", "cpu", "--block-weights",
                       ",".join(["1"] * 17), "-o", tmp_path / "m.safetensors", "--name", "m").returncode == 0
    with Registry.open() as reg:
        assert reg.get_adapter("one-half").lineage.params["block_weights"] == [None, halves]
        assert "block_weights" not in reg.get_adapter("ones").lineage.params
        assert "block_weights" not in reg.get_base("m").lineage.params["adapters"][0]


def test_output_shows_block_weights(tmp_path):
    """merge's, subtract's and combine's text name each adapter's block weights after it, and merge's --json report
    has them (block_weights, as the lineage); a list of 1s, the same ΔW, is not shown."""
    import json

    _, x = sd15_lora(tmp_path, MERGED["sd15"][:2], seed=4, name="x")
    weights = "1,0,0.5" + ",1" * 14
    shown = "[blocks 1,0,0.5" + ",1" * 14 + "]"
    into = ["--into", tmp_path / "base.safetensors", "--device", "cpu", "--block-weights", weights]
    run = loraops_run("merge", f"{x}:0.8", *into, "-o", tmp_path / "m.safetensors")
    assert run.returncode == 0 and run.stdout.startswith(f"merged {x}:0.8 {shown} → "), run.stdout
    run = loraops_run("subtract", f"{x}:0.8", "--from", tmp_path / "m.safetensors", "--block-weights", weights,
                      "-o", tmp_path / "s.safetensors", "--no-record")
    assert run.returncode == 0 and run.stdout.startswith(f"subtracted {x}:-0.8 {shown} → "), run.stdout
    run = loraops_run("merge", x, *into, "-o", tmp_path / "j.safetensors", "--no-record", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["adapters"][0]["block_weights"] == [1, 0, 0.5] + [1] * 14
    a = kohya_file(tmp_path / "a.safetensors", SD_MODULES, rank=4, seed=1)
    run = loraops_run("combine", f"{a}:0.5", a, "--block-weights", weights, "--block-weights", ",".join(["1"] * 17),
                      "--name", "c")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == f"cat of a@1×0.5 {shown}, a@1×1", run.stdout


def test_exact_matches_block_weights_by_the_deltas_they_give(tmp_path):
    """--exact matches a taken-off adapter by the ΔW its block weights give, not by the list's spelling: a 26-list
    equal to the merge's 17-list on the adapter's blocks (IN01, IN03: the 17-list leaves IN03 at 1), and no list for
    a merge whose list is 1 on every block the adapter has, restore the base; another weight on one of its blocks is
    refused, the lists named."""
    _, x = sd15_lora(tmp_path, MERGED["sd15"][:2], seed=4, name="x")  # IN01, IN03
    seventeen = [0.5] * 17  # BASE, IN01, …: IN01 at 0.5
    merged = tmp_path / "m.safetensors"
    run = loraops_run("merge", f"{x}:0.7", "--into", tmp_path / "base.safetensors", "--device", "cpu",
                      "--block-weights", ",".join(map(str, seventeen)), "-o", merged)
    assert run.returncode == 0, run.stderr
    twenty_six = [0.25] * 26
    twenty_six[2], twenty_six[4] = 0.5, 1.0  # IN01, IN03 as the merge weighed them; every other block elsewhere
    run = loraops_run("subtract", f"{x}:0.7", "--from", merged, "--exact", "--block-weights",
                      ",".join(map(str, twenty_six)), "-o", tmp_path / "e.safetensors")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "e.safetensors").read_bytes() == (tmp_path / "base.safetensors").read_bytes()
    ones_here = [0.5] * 17
    ones_here[1] = 1.0  # 1 on IN01, and IN03 is not in a 17-list: the adapter's ΔW unchanged
    run = loraops_run("merge", f"{x}:0.7", "--into", tmp_path / "base.safetensors", "--device", "cpu",
                      "--block-weights", ",".join(map(str, ones_here)), "-o", tmp_path / "m1.safetensors")
    assert run.returncode == 0, run.stderr
    run = loraops_run("subtract", f"{x}:0.7", "--from", tmp_path / "m1.safetensors", "--exact",
                      "-o", tmp_path / "e1.safetensors")
    assert run.returncode == 0, run.stderr
    other = list(seventeen)
    other[1] = 0.1
    run = loraops_run("subtract", f"{x}:0.7", "--from", merged, "--exact", "--block-weights",
                      ",".join(map(str, other)), "-o", tmp_path / "e2.safetensors")
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "[blocks 0.5,0.1,0.5" in run.stderr and f"({x}:0.7 [blocks 0.5,0.5," in run.stderr, run.stderr


def test_a_list_of_ones_leaves_a_dora_adapter_beside_a_block_weighted_one(tmp_path):
    """The error for a missing list says a list of 1s leaves an adapter as it is: a DoRA adapter (or one with
    modules_to_save) takes it, so it can be merged beside a block-weighted LoRA; a DoRA module's own block weighed by
    other than 1 is still refused, and any other weight on an adapter with whole tensors."""
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from loraops.blocks import block_weighted

    base, x = sd15_lora(tmp_path, MERGED["sd15"][:2], seed=4, name="x")  # IN01, IN03
    weight = base["model.diffusion_model.input_blocks.1.1.proj_in.weight"]
    m = "unet." + ldm.unet_path("input_blocks.1.1.proj_in", False)
    g = torch.Generator().manual_seed(0)
    save_file({f"{m}.lora_A.weight": torch.randn(2, 8, 1, 1, generator=g),
               f"{m}.lora_B.weight": torch.randn(8, 2, 1, 1, generator=g) * 0.1,
               f"{m}.lora_magnitude_vector": torch.rand(1, 8, 1, 1, generator=g) + 1},
              str(tmp_path / "dora.safetensors"))
    assert weight.shape == (8, 8, 1, 1)
    dora, half = tmp_path / "dora.safetensors", ",".join(["0.5"] * 17)
    into = ["--into", tmp_path / "base.safetensors", "--device", "cpu", "--no-record"]
    run = loraops_run("merge", dora, x, *into, "--block-weights", ",".join(["1"] * 17),
                      "--block-weights", ",".join(["0.5"] * 26), "-o", tmp_path / "m.safetensors")
    assert run.returncode == 0, run.stderr
    assert loraops_run("merge", dora, f"{x}:0.5", *into, "-o", tmp_path / "r.safetensors").returncode == 0
    got, expected = load_file(str(tmp_path / "m.safetensors")), load_file(str(tmp_path / "r.safetensors"))
    for key in expected:  # all 0.5 on x's blocks = x at 0.5
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)
    on_other_blocks = ["0.5"] * 17
    on_other_blocks[1] = "1"  # IN01, the DoRA module's block
    run = loraops_run("merge", dora, *into, "--block-weights", ",".join(on_other_blocks),
                      "-o", tmp_path / "d.safetensors")
    assert run.returncode == 0, run.stderr
    run = loraops_run("merge", dora, *into, "--block-weights", half, "-o", tmp_path / "e.safetensors")
    assert run.returncode != 0 and "is DoRA" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    adapter = read_adapter(x)
    whole = replace(adapter, full_tensors={"unet.conv_out.weight": torch.zeros(4, 8, 3, 3)})
    assert block_weighted(whole, [1.0] * 17, "w").modules.keys() == adapter.modules.keys()
    with pytest.raises(InvalidInputError, match="replaces whole tensors"):
        block_weighted(whole, [0.5] * 17, "w")


def test_a_cat_of_one_block_weighted_adapter_is_not_said_to_keep_its_delta(tmp_path):
    """`combine a` (cat, weight 1) notes that the result has a's ΔW; with block weights other than 1 it does not."""
    a = kohya_file(tmp_path / "a.safetensors", SD_MODULES, rank=4, seed=1)
    run = loraops_run("combine", a, "--block-weights", ",".join(["0"] * 26), "-o", tmp_path / "z.safetensors")
    assert run.returncode == 0 and "[blocks 0,0," in run.stdout and "same ΔW" not in run.stdout, run.stdout
    run = loraops_run("combine", a, "--block-weights", ",".join(["1"] * 17), "-o", tmp_path / "o.safetensors")
    assert run.returncode == 0 and "note: the result has the same ΔW as a@1" in run.stdout, run.stdout


@pytest.mark.parametrize("modules, family, refused, accepted", [
    # diffusers' SDXL: attention in up_blocks.0 (OUT00–OUT02), which SD 1.x/2.x's up_blocks.0 lacks
    (["unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
      "unet.up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_k"], "SDXL adapter: give it 12 or 20", 17, 12),
    (["lora_unet_output_blocks_1_1_proj_in", "lora_unet_input_blocks_4_1_proj_in"], "SDXL adapter: give it 12 or 20",
     26, 20),
    # SD 1.x/2.x: attention in down_blocks.0 (IN01, IN02), which SDXL's lacks, and no module in a block SDXL lacks
    (["lora_unet_down_blocks_0_attentions_1_proj_in", "lora_unet_up_blocks_1_attentions_0_proj_out"],
     "SD 1.x/2.x adapter: give it 17 or 26", 20, 26),
])
def test_the_family_is_told_by_where_the_attention_is(tmp_path, modules, family, refused, accepted):
    """A file without sd-scripts' metadata or a second text encoder (diffusers-trained, U-Net only) is told SDXL or
    SD 1.x/2.x by its attention blocks: the other family's list (which would weigh other blocks than meant, e.g. a
    17-list leaves SDXL's main attention blocks OUT00–OUT02 at 1) is refused; its own family's list is taken."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m in modules:
        down, up = ("lora_down", "lora_up") if m.startswith("lora_unet_") else ("lora_A", "lora_B")
        tensors |= {f"{m}.{down}.weight": torch.randn(2, 8, generator=g), f"{m}.{up}.weight": torch.randn(8, 2)}
    save_file(tensors, str(tmp_path / "a.safetensors"))
    with pytest.raises(InvalidInputError, match=f"is an {family} block weights, not {refused}"):
        combine([str(tmp_path / "a.safetensors")], "cat", block_weights=[[0.5] * refused], name="r")
    combine([str(tmp_path / "a.safetensors")], "cat", block_weights=[[0.5] * accepted], name="a")


@pytest.mark.parametrize("sdxl, paths", [(False, SD_LDM), (True, SDXL_LDM)])
def test_no_module_of_one_family_tells_the_other(sdxl, paths):
    """Every module of each U-Net, under each naming, alone in an adapter without metadata: told its own family or
    none (an upsampler's conv, output_blocks.2.1.conv in SD 1.x, is no attention), never the other."""
    from types import SimpleNamespace

    from loraops.blocks import SD, SDXL, told_unet

    for path in paths:
        diffusers = ldm.unet_path(path, sdxl)
        for name in (path, "model.diffusion_model." + path, "lora_unet_" + path.replace(".", "_"), "unet." + diffusers,
                     "lora_unet_" + diffusers.replace(".", "_")):
            assert told_unet(SimpleNamespace(metadata={}, modules={name: None})) in (None, SDXL if sdxl else SD), name
