"""Randomized (seeded) differential test of what loraops WRITES, read back by the software that reads each format.

A PEFT adapter exported as peft must give PEFT's merge_and_unload of the source; as kohya, kohya's formula
W + (alpha/r)·up@down; kohya → peft (--base) again PEFT's; a kohya or diffusers SD LoRA exported as diffusers must fuse
in diffusers (load_lora_weights + fuse_lora) to the float64 W + (alpha/r)·B·A. Built locally (tiny Llama, GPT-2 and
SD 1.x pipeline), no network; ~20 s on two cores. From an export sweep (session 35) of 70 random sources, every
format and round trip: these are configurations it met, and the one it found diffusers refusing (an unbound diffusers
export of `text_encoder.text_model.` keys wrote target_modules transformers 5's CLIPTextModel does not have)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from factories import loraops_run, tiny_gpt2, tiny_llama


def run(*args):
    proc = loraops_run(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        out.update(load_file(str(f)))
    return out


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def kohya_merged(base_sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """kohya's formula on the base's tensors, names by sd-scripts' underscore rule (no ecosystem reader for LLMs)."""
    t = state(path)
    by_name = {k[: -len(".weight")].replace(".", "_"): k for k in base_sd if k.endswith(".weight")}
    out = {k: v.double().clone() for k, v in base_sd.items()}
    for m in {k.rsplit(".lora_down", 1)[0] for k in t if ".lora_down" in k}:
        down, up = t[f"{m}.lora_down.weight"].double(), t[f"{m}.lora_up.weight"].double()
        alpha = float(t[f"{m}.alpha"]) if f"{m}.alpha" in t else down.shape[0]
        key = next(by_name[m[len(p):]] for p in ("lora_unet_", "lora_te_", "lora_") if m[len(p):] in by_name)
        delta = alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1))
        out[key] = out[key] + delta.reshape(out[key].shape)
    return out


def assert_same_deltas(ref, got, base, keys, rel=1e-5):
    for k in keys:
        r, g, b = ref[k].double(), got[k].double(), base[k].double()
        scale = max(float((r - b).abs().max()), 1e-12)
        assert float((r - g).abs().max()) <= rel * scale, (k, float((r - g).abs().max()), scale)


def llm_config(seed: int, kind: str) -> dict:
    rng = random.Random(seed)
    pool = ["c_attn", "c_proj", "c_fc"] if kind == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"]
    targets = rng.sample(pool, rng.randint(1, len(pool)))
    r = rng.choice([1, 2, 4, 8])
    cfg = dict(target_modules=targets, r=r, lora_alpha=rng.choice([r, 2 * r, 3.5, 7.25]),
               use_rslora=rng.random() < 0.5, init_lora_weights=False)
    if rng.random() < 0.5:
        cfg["rank_pattern"] = {rng.choice(targets): rng.choice([1, 3, 5])}
    if rng.random() < 0.5:
        cfg["alpha_pattern"] = {rng.choice(targets): rng.choice([2, 9, 0.5])}
    if kind == "gpt2":
        cfg["fan_in_fan_out"] = True
    return cfg


@pytest.mark.parametrize("seed,kind", [(1, "llama"), (3, "llama"), (8, "llama"), (2, "gpt2"), (5, "gpt2")])
def test_peft_source_exports_load_as_the_source(seed, kind, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_gpt2(tmp_path / "base") if kind == "gpt2" else tiny_llama(tmp_path / "base")
    run("base", "add", base, "--name", "b")
    torch.manual_seed(seed)
    config = llm_config(seed, kind)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**config))
    model.save_pretrained(tmp_path / "src")
    base_sd = state(base)
    keys = [k for k in base_sd if k.endswith(".weight")]
    ref = peft_merged(base, tmp_path / "src")

    run("export", tmp_path / "src", "--format", "peft", "-o", tmp_path / "p")
    assert_same_deltas(ref, peft_merged(base, tmp_path / "p"), base_sd, keys)
    run("export", tmp_path / "src", "--format", "kohya", "-o", tmp_path / "k.safetensors")
    assert_same_deltas(ref, kohya_merged(base_sd, tmp_path / "k.safetensors"), base_sd, keys)
    run("export", tmp_path / "k.safetensors", "--format", "peft", "--base", "b", "-o", tmp_path / "kp")
    assert_same_deltas(ref, peft_merged(base, tmp_path / "kp"), base_sd, keys)
    # a lossless derivation keeps ΔW: resize to the full rank, and cat of 0.25 + 0.75
    top = max([config["r"], *config.get("rank_pattern", {}).values()])
    run("resize", tmp_path / "src", "--rank", top, "--base", "b", "--format", "peft", "-o", tmp_path / "rs", "--name", "rs")
    assert_same_deltas(ref, peft_merged(base, tmp_path / "rs"), base_sd, keys, rel=1e-4)
    run("combine", f"{tmp_path / 'src'}:0.25", f"{tmp_path / 'src'}:0.75", "--method", "cat", "--base", "b",
        "--format", "kohya", "-o", tmp_path / "cat.safetensors", "--name", "cat")
    assert_same_deltas(ref, kohya_merged(base_sd, tmp_path / "cat.safetensors"), base_sd, keys)


# ------------------------------------------------------------------------------------------- SD 1.x pipeline
def sd15(tmp_path: Path):
    from test_parity_diffusers_random import build_components, save_pipeline

    case = dict(seed=3, family="sd15", dtype="fp32", layers=1, adapters=[], weights=[1.0])
    comps = build_components(case)
    save_pipeline(case, comps, tmp_path / "pipe")
    return case, comps


def fused(case, path: Path):
    from test_parity_diffusers_random import build_components, diffusers_fuse

    return diffusers_fuse(case, build_components(case), [path], [1.0])


def sd_adapter(case, comps, tmp_path: Path, layout: str, seed: int):
    from test_parity_diffusers_random import make_adapter

    case["adapters"] = [dict(seed=seed, layout=layout, n=6, ranks=[2, 4], alpha=4.0, mixed_alpha=False, fdtype="fp32",
                             alpha_key=True, alpha_dtype_factor=False, alpha_mode="metadata", sgm=False,
                             flat_te=True, te_out=True, linear1=False)]
    return make_adapter(case, 0, comps, tmp_path)


def assert_fuses_to(case, comps, mods, got):
    from test_parity_diffusers_random import reference

    base = {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in comps.items()}
    ref = reference(base, [mods], [1.0])
    touched = 0
    for c in ref:
        for k, exact in ref[c].items():
            b = base[c][k].double()
            assert torch.equal(exact, b) == torch.equal(got[c][k], base[c][k]), (c, k)
            if not torch.equal(exact, b):
                touched += 1
                scale = float((exact - b).abs().max())
                assert float((got[c][k].double() - exact).abs().max()) <= 1e-5 * scale, (c, k)
    assert touched


@pytest.mark.parametrize("layout,seed", [("kohya", 11), ("diffusers", 12)])
def test_sd_lora_exported_as_diffusers_fuses_in_diffusers(layout, seed, tmp_path):
    case, comps = sd15(tmp_path)
    run("base", "add", tmp_path / "pipe", "--name", "pipe")
    src, mods = sd_adapter(case, comps, tmp_path, layout, seed)
    run("export", src, "--format", "diffusers", "--base", "pipe", "-o", tmp_path / "d.safetensors")
    assert_fuses_to(case, comps, mods, fused(case, tmp_path / "d.safetensors"))
    run("export", tmp_path / "d.safetensors", "--format", "kohya", "--base", "pipe", "-o", tmp_path / "k.safetensors")
    run("export", tmp_path / "k.safetensors", "--format", "diffusers", "--base", "pipe", "-o", tmp_path / "dd.safetensors")
    assert_fuses_to(case, comps, mods, fused(case, tmp_path / "dd.safetensors"))


def test_unbound_diffusers_export_of_text_model_keys_loads_in_diffusers(tmp_path):
    """A diffusers SD LoRA trained on transformers 4 (text_encoder.text_model.… keys) exported as diffusers without a
    base: its text encoder's LoraConfig targets are written without text_model. (formats.diffusers.config_path), so
    diffusers on transformers 5 (no text_model. level in memory) loads it; with it, PEFT refused the whole file."""
    case, comps = sd15(tmp_path)
    src, mods = sd_adapter(case, comps, tmp_path, "diffusers", 13)
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    # the keys diffusers LoRAs trained on transformers 4 carry: text_encoder.text_model.encoder…
    tensors = {k.replace("text_encoder.", "text_encoder.text_model.", 1) if k.startswith("text_encoder.") else k: v
               for k, v in load_file(str(src)).items()}
    assert any(k.startswith("text_encoder.text_model.") for k in tensors)
    save_file(tensors, str(tmp_path / "tm.safetensors"), safe_open(str(src), "pt").metadata())
    assert_fuses_to(case, comps, mods, fused(case, tmp_path / "tm.safetensors"))  # diffusers loads the source
    run("export", tmp_path / "tm.safetensors", "--format", "diffusers", "-o", tmp_path / "d.safetensors")
    assert_fuses_to(case, comps, mods, fused(case, tmp_path / "d.safetensors"))
