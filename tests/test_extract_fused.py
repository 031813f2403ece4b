"""extract on single-file SD 2.x / SDXL / FLUX checkpoints: fused tensors (ldm.FUSED).

OpenCLIP (SD 2.x's text encoder, SDXL's second) stores q, k and v as the three row blocks of one
``attn.in_proj_weight``: extract makes one module per changed third, named as kohya's extract_lora_from_models.py
names the transformers modules it loads (``lora_te2_text_model_encoder_layers_N_self_attn_q_proj``; ``lora_te_…`` for
SD 2.x), and ``loraops merge`` of the result puts each back into its rows. FLUX's qkv stays one module, as sd-scripts'
flux_extract_lora.py makes it. kohya is such checkpoints' default; PEFT output holding OpenCLIP's q/k/v is refused.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraops
from test_cli_sweep_old import run as cli
from test_extract import run
from test_ldm import FLUX, SDXL_TEXT
from loraops.registry import Registry
from loraops.st import read_header

TE2 = "conditioner.embedders.1.model.transformer.resblocks.0.attn"
IN_PROJ = f"{TE2}.in_proj_weight"
D = 16  # OpenCLIP width of SDXL_TEXT: in_proj_weight is 3·16 × 16


def low_rank(rows, cols, rank, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)


def pair(tmp_path, shapes, changes, prefix=None):
    """A float32 single-file base of ``shapes`` and a fine-tune with ``changes`` ({tensor: (first row, delta)})
    added; ``prefix`` renames SDXL's second text encoder (SD 2.x: ``cond_stage_model.model.``)."""
    g = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
    tuned = {name: tensor.clone() for name, tensor in base.items()}
    for name, (first, delta) in changes.items():
        tuned[name][first:first + delta.shape[0]] += delta
    if prefix is not None:
        base, tuned = ({k.replace("conditioner.embedders.1.model.", prefix): v for k, v in state.items()
                        if not k.startswith(("conditioner.embedders.0.", "model."))} for state in (base, tuned))
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


def kohya_modules(path):
    return sorted({k.rsplit(".", 2)[0] for k in load_file(path) if k.endswith(".lora_down.weight")})


K_AND_V = {IN_PROJ: (D, torch.cat([low_rank(D, D, 2, 1), low_rank(D, D, 3, 2)])),  # k rank 2, v rank 3; q unchanged
           f"{TE2}.out_proj.weight": (0, low_rank(D, D, 2, 3))}


def test_sdxl_in_proj_thirds_become_q_k_v_modules_that_merge_back(tmp_path):
    """End to end (python -m loraops): only the changed thirds (k, v) become modules, each of its own rows, under
    kohya's names; out_proj beside them stays a plain module; merged back, the tuned tensors at full rank, q's rows
    untouched. The in_proj bias that changed is reported, not extracted."""
    changes = {**K_AND_V, f"{TE2}.in_proj_bias": (0, torch.full((48,), 0.01))}
    base, tuned = pair(tmp_path, SDXL_TEXT, changes)
    done = cli("extract", "--base", base, "--tuned", tuned, "--rank", str(D), "-o", tmp_path / "x.safetensors", "--json")
    report = json.loads(done.stdout)["report"]
    assert [(m["name"], m["shape"], m["rank"]) for m in report["modules"]] == [
        (f"{TE2}.k_proj", [D, D], D), (f"{TE2}.v_proj", [D, D], D), (f"{TE2}.out_proj", [D, D], D)]
    assert max(m["error"] for m in report["modules"]) < 1e-5
    assert [(s["name"], s["reason"]) for s in report["skipped"]] == [(f"{TE2}.in_proj_bias", "norm or bias")]
    assert kohya_modules(tmp_path / "x.safetensors") == [
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj", "lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
        "lora_te2_text_model_encoder_layers_0_self_attn_v_proj"]
    cli("merge", tmp_path / "x.safetensors", "--into", base, "-o", tmp_path / "merged.safetensors", "--no-record")
    merged, want, before = (load_file(p) for p in (tmp_path / "merged.safetensors", tuned, base))
    torch.testing.assert_close(merged[IN_PROJ], want[IN_PROJ], rtol=0, atol=2e-6)
    torch.testing.assert_close(merged[f"{TE2}.out_proj.weight"], want[f"{TE2}.out_proj.weight"], rtol=0, atol=2e-6)
    assert torch.equal(merged[IN_PROJ][:D], before[IN_PROJ][:D])  # no q module: its rows are not touched


def test_a_fused_weights_parts_are_made_together_and_weights_side_by_side(tmp_path, monkeypatch, three_threads):
    """extract runs its weights ahead on torch's threads (settings.in_order), each SVD on one: the k and v thirds of
    in_proj are made in one thread (its delta read once), out_proj may be in another; the result is the same bytes
    as at one thread."""
    import threading

    from loraops.ops import resize

    base, tuned = pair(tmp_path, SDXL_TEXT, K_AND_V)
    seen, factorize = [], resize.factorize_dense

    deltas = {"k": K_AND_V[IN_PROJ][1][:D], "v": K_AND_V[IN_PROJ][1][D:], "out": K_AND_V[f"{TE2}.out_proj.weight"][1]}

    def spy(M, *args, **kwargs):
        part = next(p for p, delta in deltas.items() if torch.allclose(M, delta, rtol=0, atol=1e-5))
        seen.append((part, threading.current_thread().name, torch.get_num_threads()))
        return factorize(M, *args, **kwargs)

    monkeypatch.setattr(resize, "factorize_dense", spy)
    ahead, _ = loraops.extract(base, tuned, rank=D, device="cpu")
    threads = {part: (name, count) for part, name, count in seen}
    assert len(seen) == 3 and threads["k"] == threads["v"]  # in_proj's item
    assert threads["k"][0].startswith("loraops-ahead") and {count for _, count in threads.values()} == {1}
    torch.set_num_threads(1)
    alone, _ = loraops.extract(base, tuned, rank=D, device="cpu")
    assert {name for _, name, _ in seen[3:]} == {threading.current_thread().name}
    for name, module in ahead.modules.items():
        assert torch.equal(module.A, alone.modules[name].A) and torch.equal(module.B, alone.modules[name].B)


def test_sd2_names_and_a_lower_rank_merges_back_within_its_error(tmp_path):
    """SD 2.x's OpenCLIP (cond_stage_model.model.) is lora_te_; at rank 1 each third's merge is off by the error
    extract reports for it (relative Frobenius, of that third's delta alone)."""
    base, tuned = pair(tmp_path, SDXL_TEXT, K_AND_V, prefix="cond_stage_model.model.")
    attn = TE2.replace("conditioner.embedders.1.model.", "cond_stage_model.model.")
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "1", "--format", "kohya",
                    "-o", tmp_path / "x.safetensors", "--json")
    assert code == 0, out
    errors = {m["name"]: m["error"] for m in json.loads(out)["report"]["modules"]}
    assert kohya_modules(tmp_path / "x.safetensors") == [
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj", "lora_te_text_model_encoder_layers_0_self_attn_out_proj",
        "lora_te_text_model_encoder_layers_0_self_attn_v_proj"]
    code, out = run("merge", tmp_path / "x.safetensors", "--into", base, "-o", tmp_path / "m.safetensors", "--no-record")
    assert code == 0, out
    merged, want, before = (load_file(p) for p in (tmp_path / "m.safetensors", tuned, base))
    in_proj = f"{attn}.in_proj_weight"
    for part, rows in (("k_proj", slice(D, 2 * D)), ("v_proj", slice(2 * D, 3 * D))):
        delta = want[in_proj][rows].double() - before[in_proj][rows].double()
        off = (merged[in_proj][rows].double() - want[in_proj][rows].double()).norm() / delta.norm()
        assert errors[f"{attn}.{part}"] > 0.1 and off == pytest.approx(errors[f"{attn}.{part}"], rel=1e-4)


def test_modules_selects_parts_and_dynamic_ranks_are_per_third(tmp_path):
    changes = {IN_PROJ: (0, torch.cat([low_rank(D, D, 1, 4), low_rank(D, D, 2, 1), low_rank(D, D, 4, 2)]))}
    base, tuned = pair(tmp_path, SDXL_TEXT, {**changes, **{k: v for k, v in K_AND_V.items() if k != IN_PROJ}})
    adapter, report = loraops.extract(base, tuned, dynamic="sv_ratio", param=1000, modules=["q_proj", "v_proj"])
    assert adapter.format == "kohya"
    assert [(m.name, m.rank) for m in report.modules] == [(f"{TE2}.q_proj", 1), (f"{TE2}.v_proj", 4)]
    assert adapter.modules[f"{TE2}.v_proj"].fused == (IN_PROJ, 2 * D, D, 3 * D)
    assert [(s.name, s.reason) for s in report.skipped] == [(f"{TE2}.out_proj.weight", "not in --modules")]
    # the tensor's own name takes every part, the out_proj its own module
    _, report = loraops.extract(base, tuned, rank=4, modules=["in_proj_weight", "out_proj"])
    assert [m.name.rpartition(".")[2] for m in report.modules] == ["q_proj", "k_proj", "v_proj", "out_proj"]


def test_a_part_asked_for_whose_rows_are_unchanged_is_an_error(tmp_path):
    base, tuned = pair(tmp_path, SDXL_TEXT, K_AND_V)
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "--modules", "q_proj")
    assert (code, out) == (2, f"error: --modules: {TE2}.q_proj (rows 0–{D} of {IN_PROJ}): the same in both models "
                              "(other rows of the weight differ): nothing to extract\n")
    with Registry.open() as reg:
        assert reg.list_adapters() == [] and reg.list_bases() == []


def test_peft_output_of_openclip_parts_and_whole_tensors_as_kohya_are_refused(tmp_path):
    """OpenCLIP's q/k/v are rows of one in_proj_weight: a PEFT adapter would name modules no model PEFT wraps has.
    Refused in one line naming those whose rows changed (k, v: q's were named too, before its rows were compared),
    before any module is computed, nothing registered or written; so is --save-module with the kohya default (a
    kohya file holds no whole tensors)."""
    base, tuned = pair(tmp_path, SDXL_TEXT, K_AND_V)
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "--format", "peft", "-o", tmp_path / "p")
    assert (code, out) == (2, f"error: extract of {tuned} − {base}: {TE2}.k_proj, {TE2}.v_proj: rows of a "
                              f"fused tensor "
                              f"({IN_PROJ}) that no model PEFT wraps holds as a module, so it cannot be written as "
                              "peft: use --format kohya\n")
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "--save-module", "out_proj")
    assert (code, out) == (2, f"error: kohya files cannot hold whole tensors (--save-module): {base} is a single-file "
                              "SD/FLUX checkpoint, whose adapters are kohya files by default: use --format peft\n")
    # following that advice met PEFT's refusal, which sent the user back to kohya: say the way out that keeps both
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "--save-module", "out_proj",
                    "--format", "peft", "-o", tmp_path / "p")
    assert (code, out) == (2, f"error: extract of {tuned} − {base}: {TE2}.k_proj, {TE2}.v_proj: rows of a "
                              f"fused tensor ({IN_PROJ}) that no model PEFT wraps holds as a module, and a kohya file "
                              "holds no whole tensors (--save-module): leave those modules out with --modules, or leave "
                              "--save-module out and write kohya\n")
    assert not (tmp_path / "p").exists()
    with Registry.open() as reg:
        assert reg.list_adapters() == [] and reg.list_bases() == []


def test_peft_output_is_written_when_openclips_in_proj_differs_only_in_signed_zeros(tmp_path):
    """An in_proj_weight whose bytes differ only in the sign of a zero has no changed part (each one's delta is
    zero, and the compute drops it): PEFT output of the rest is written, where every part was named and refused."""
    base, tuned = pair(tmp_path, SDXL_TEXT, {f"{TE2}.out_proj.weight": (0, low_rank(D, D, 2, 3))})
    for path, zero in ((base, 0.0), (tuned, -0.0)):
        state = load_file(path)
        state[IN_PROJ][D, 0] = zero
        save_file(state, str(path))
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "--format", "peft", "-o", tmp_path / "p")
    assert code == 0, out
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["target_modules"] == [f"{TE2}.out_proj"]


def test_flux_qkv_stays_one_module_as_sd_scripts_extracts_it(tmp_path):
    """FLUX's img_attn.qkv and linear1 are Linear weights of Black Forest Labs' model; sd-scripts'
    flux_extract_lora.py factorizes each whole (lora_unet_double_blocks_0_img_attn_qkv), and so does extract. As
    PEFT too (a Linear of Black Forest Labs' model: no part, which PEFT would refuse)."""
    changes = {"double_blocks.0.img_attn.qkv.weight": (0, low_rank(48, 16, 2, 5)),
               "single_blocks.0.linear1.weight": (0, low_rank(112, 16, 2, 6))}
    base, tuned = pair(tmp_path, FLUX, changes)
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "-o", tmp_path / "f.safetensors",
                    "--json")
    assert code == 0, out
    assert [(m["name"], m["shape"]) for m in json.loads(out)["report"]["modules"]] == [
        ("double_blocks.0.img_attn.qkv", [48, 16]), ("single_blocks.0.linear1", [112, 16])]
    assert kohya_modules(tmp_path / "f.safetensors") == ["lora_unet_double_blocks_0_img_attn_qkv",
                                                         "lora_unet_single_blocks_0_linear1"]
    assert read_header(tmp_path / "f.safetensors").metadata["ss_base_model_version"] == "flux1"  # as sd-scripts'
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "--format", "peft", "-o", tmp_path / "p")
    assert code == 0, out
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["target_modules"] == [
        "double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"]
    want = load_file(tuned)
    for adapter in (tmp_path / "f.safetensors", tmp_path / "p"):
        code, out = run("merge", adapter, "--into", base, "-o", tmp_path / f"m-{adapter.stem}.safetensors", "--no-record")
        assert code == 0, out
        merged = load_file(tmp_path / f"m-{adapter.stem}.safetensors")
        for name in changes:
            torch.testing.assert_close(merged[name], want[name], rtol=0, atol=2e-6)


def test_an_sdxl_unet_alone_gets_sd_scripts_sdxl_names(tmp_path):
    """sd-scripts names SDXL's UNet by the checkpoint's own paths (lora_unet_input_blocks_4_1_proj_in), SD 1.x/2.x's
    by diffusers blocks. The kohya writer knew SDXL from text-encoder modules only, so a fine-tune that changed the
    UNet alone got SD 1.x names (lora_unet_down_blocks_1_attentions_0_proj_in); extract now records the base's
    version as sd-scripts' extract does (ss_base_model_version sdxl_base_v1-0)."""
    proj_in = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    base, tuned = pair(tmp_path, SDXL_TEXT, {proj_in: (0, low_rank(8, 8, 2, 7))})
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "-o", tmp_path / "u.safetensors")
    assert code == 0, out
    assert kohya_modules(tmp_path / "u.safetensors") == ["lora_unet_input_blocks_4_1_proj_in"]
    code, out = run("merge", tmp_path / "u.safetensors", "--into", base, "-o", tmp_path / "m.safetensors", "--no-record")
    assert code == 0, out
    torch.testing.assert_close(load_file(tmp_path / "m.safetensors")[proj_in], load_file(tuned)[proj_in], rtol=0,
                               atol=2e-6)


def test_diffusers_reads_the_sdxl_extract_as_the_tuned_text_encoder(tmp_path):
    """An independent reference for names and rows together: diffusers converts the checkpoints' OpenCLIP
    encoder to transformers' CLIPTextModel (convert_open_clip_checkpoint) and the kohya file to PEFT keys on it (as
    load_lora_weights does for an SDXL pipeline); base + scale·B·A is the tuned encoder on every weight."""
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    changes = {**K_AND_V, f"{TE2}.in_proj_bias": (0, torch.full((48,), 0.01)),
               "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (0, low_rank(40, D, 2, 8))}
    base, tuned = pair(tmp_path, SDXL_TEXT, changes)
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", str(D), "-o", tmp_path / "x.safetensors")
    assert code == 0, out
    lora, alphas = _convert_non_diffusers_lora_to_diffusers(load_file(tmp_path / "x.safetensors"))
    lora = convert_state_dict_to_peft(convert_state_dict_to_diffusers(
        {k.removeprefix("text_encoder_2."): v for k, v in lora.items() if k.startswith("text_encoder_2.")}))
    assert set(alphas.values()) == {float(D)}  # alpha = rank: scale 1
    text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=D))
    before, after = (convert_open_clip_checkpoint(text_model, load_file(p), prefix="conditioner.embedders.1.model.")
                     for p in (base, tuned))
    modules = {k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")}
    assert modules == {f"text_model.encoder.layers.0.{m}" for m in ("self_attn.k_proj", "self_attn.v_proj",
                                                                     "self_attn.out_proj", "mlp.fc1")}
    for key, weight in before.items():
        if not key.endswith(".weight"):
            continue
        module = key.removesuffix(".weight")
        if module in modules:
            B, A = lora[f"{module}.lora_B.weight"], lora[f"{module}.lora_A.weight"]
            weight = weight + B @ A
        torch.testing.assert_close(weight, after[key], rtol=0, atol=2e-6, msg=key)


def test_a_checkpoints_vae_is_left_out_unless_named(tmp_path):
    """A checkpoint with another VAE baked in (first_stage_model.…): no LoRA loader applies a LoRA to the VAE and
    kohya's extract leaves it out, so extract does too, naming it; --modules can still ask for it."""
    vae = "first_stage_model.decoder.conv_in.weight"
    shapes = {**SDXL_TEXT, vae: (4, 4, 3, 3)}
    changes = {**K_AND_V, vae: (0, torch.full((4, 4, 3, 3), 0.1))}
    base, tuned = pair(tmp_path, shapes, changes)
    _, report = loraops.extract(base, tuned, rank=4)
    assert [m.name.rpartition(".")[2] for m in report.modules] == ["k_proj", "v_proj", "out_proj"]
    assert [(s.name, s.reason) for s in report.skipped] == [
        (vae, "VAE: no LoRA loader applies it; --modules extracts it")]
    _, report = loraops.extract(base, tuned, rank=4, modules=["conv_in"])
    assert [m.name for m in report.modules] == ["first_stage_model.decoder.conv_in"]
