"""Randomized differential test of merge and subtract against PEFT: tiny Llama and GPT-2 (Conv1D) bases, float32 or
bf16, tied or sharded, with one to three PEFT LoRA adapters drawn from PEFT's options together — r and lora_alpha,
rsLoRA, DoRA, rank_pattern/alpha_pattern (plain, per layer, regex, overlapping keys), layers_to_transform,
exclude_modules, modules_to_save, lora_bias, targets on the embeddings and the head, `all-linear` and regex targets,
bf16 factors — merged at weights that may be negative or 0.

A session's sweep ran 1,650 such cases without a disagreement; these seeds meet every pair of those features that
PEFT takes together (316 pairs; a greedy cover over the seeds 1000–3999, those PEFT refuses left out). Each one's merge must come out as PEFT's
merge_and_unload saves it (the same tensors, shapes and dtypes) and within rounding of the float64 merge: half a
unit in the last place of a bf16 output (PEFT itself is up to hundreds of ulps off where it rounds after each
adapter: README, "one rounding, not two"), 1e-5 of a float32 one; and subtract must give the base back within
the rounding of the round trip.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SEEDS = [1207, 1038, 2305, 1664, 1825, 3023, 1490, 1707, 2070, 1880, 1049]
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj", "c_fc"]
COMBINED = [2248, 3657, 3082, 2280, 1446, 3289, 1640, 1338, 1269, 1706, 1422, 1053, 1316, 1895, 2099, 2779, 2814]
"""Cases combine takes (float32, no DoRA, no modules_to_save: combinable) that meet every pair of features among
them (245 of 246: not lora_bias beside a LoRA on the head, which has no bias, which combine refuses as documented),
chosen the same way."""


def drawn(seed: int) -> tuple[dict, list[dict], list[float]]:
    """(base config, each adapter's LoraConfig arguments, weights) for ``seed`` (random.Random: the same on every
    run and platform)."""
    rng = random.Random(seed)
    arch = rng.choice(["llama", "llama", "gpt2"])
    base = dict(seed=seed, arch=arch, hidden=rng.choice([32, 64]), layers=rng.choice([1, 2]),
                tie=rng.random() < 0.25, attn_bias=arch == "llama" and rng.random() < 0.4,
                dtype=rng.choice([torch.float32, torch.float32, torch.bfloat16]), shard=rng.random() < 0.2)
    linear = LLAMA if arch == "llama" else GPT2
    embeddings = "embed_tokens" if arch == "llama" else "wte"
    adapters, weights, saves_modules = [], [], False
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        targets = rng.sample(linear, rng.randint(1, min(3, len(linear))))
        if not base["tie"]:
            targets += [name for name in (embeddings, "lm_head") if rng.random() < 0.3]
        r = rng.choice([1, 2, 4, 8])
        u = rng.random()
        if u < 0.1:
            targets = "all-linear"
        elif u < 0.2:
            a, b = rng.sample(linear, 2)
            targets = rf".*\.({a}|{b})" if rng.random() < 0.5 else rf".*\.[01]\..*({a}|{b})"
        config = dict(r=r, lora_alpha=rng.choice([1, 4, 8, 16, 3.5, 32]), target_modules=targets,
                      use_rslora=rng.random() < 0.3, use_dora=rng.random() < 0.2)
        if arch == "gpt2":
            config["fan_in_fan_out"] = True
        named = targets if isinstance(targets, list) else linear
        if rng.random() < 0.3:
            t = rng.choice(named)
            if rng.random() < 0.2:
                key = rng.choice([rf"layers\.\d+\.\w+\.{t}", rf"h\.\d\.(attn|mlp)\.{t}"])
            else:
                block = "self_attn" if arch == "llama" and t in LLAMA[:4] else "mlp" if arch == "llama" else "attn"
                key = rng.choice([t, f"0.{block}.{t}", f"layers.0.self_attn.{t}" if arch == "llama" else f"h.0.attn.{t}"])
            config["rank_pattern"] = {key: rng.choice([1, 2, 3, 6])}
        if rng.random() < 0.3:
            t = rng.choice(named)
            config["alpha_pattern"] = {rng.choice([t, f"1.mlp.{t}", f"h.1.mlp.{t}"]): rng.choice([2, 7.5, 64])}
        if rng.random() < 0.15 and isinstance(targets, list):  # two keys, one inside the other
            t = rng.choice(targets)
            keys = [t, f"layers.1.self_attn.{t}" if arch == "llama" else f"h.1.attn.{t}"]
            if rng.random() < 0.5:
                keys.reverse()
            config[rng.choice(["rank_pattern", "alpha_pattern"])] = {keys[0]: rng.choice([2, 3]),
                                                                     keys[1]: rng.choice([5, 6])}
        if rng.random() < 0.1 and isinstance(targets, list):
            targets[0] = {"q_proj": "self_attn.q_proj", "up_proj": "mlp.up_proj", "c_attn": "attn.c_attn",
                          "c_fc": "mlp.c_fc", "c_proj": "mlp.c_proj"}.get(targets[0], targets[0])
        if rng.random() < 0.1:
            config["exclude_modules"] = rng.choice([["layers.0.self_attn.v_proj", "h.0.attn.c_attn"], r".*\.1\..*"])
        if rng.random() < 0.25:
            config["layers_to_transform"] = rng.choice([[0], [1], [0, 1]])
        if rng.random() < 0.15 and (arch == "gpt2" or base["attn_bias"]):
            config["lora_bias"] = True
        if rng.random() < 0.2 and not saves_modules:
            choices = (["norm", "input_layernorm"] if arch == "llama" else ["ln_f", "ln_1"]) + (
                [] if base["tie"] else ["lm_head"])
            saved = rng.choice(choices)
            if saved not in named:
                config["modules_to_save"], saves_modules = [saved], True
        if rng.random() < 0.1:
            config["adapter_dtype"] = torch.bfloat16
        adapters.append(config)
        weight = rng.choice([1.0, 1.0, 0.5, -0.7, 1.3, -1.0, 0.25, 2.0, 0.0])
        weights.append(1.0 if config.get("modules_to_save") else weight)  # (a replacement merges at 1 only)
    return base, adapters, weights


def build_base(base: dict, path: Path) -> Path:
    """The base, its biases made nonzero (so a lora_bias merge changes something real)."""
    torch.manual_seed(base["seed"])
    if base["arch"] == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=base["hidden"], intermediate_size=2 * base["hidden"], num_hidden_layers=base["layers"],
            num_attention_heads=4, num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
            tie_word_embeddings=base["tie"], attention_bias=base["attn_bias"]))
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_embd=base["hidden"], n_layer=base["layers"], n_head=4, vocab_size=96,
                                           n_positions=32, tie_word_embeddings=base["tie"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.to(base["dtype"]).save_pretrained(path, **({"max_shard_size": "20KB"} if base["shard"] else {}))
    return path


def load_model(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def peft_adapter(base: Path, out: Path, config: dict, seed: int) -> Path:
    """PEFT's adapter, every trained part nonzero and away from its initial value."""
    from peft import LoraConfig, get_peft_model

    config = dict(config)
    stored = config.pop("adapter_dtype", None)
    model = load_model(base, torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
            if "lora_B" in name and name.endswith("bias"):
                parameter.copy_(0.1 * torch.randn_like(parameter))
            if "lora_magnitude_vector" in name:
                parameter.mul_(torch.exp(0.3 * torch.randn_like(parameter)))
            if stored is not None and "lora_" in name:
                parameter.data = parameter.data.to(stored)
    model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapters: list[Path], weights: list[float], dtype: torch.dtype,
                saved: Path | None = None) -> dict[str, torch.Tensor]:
    """PEFT's merge of the adapters at their weights (each one's scaling multiplied by its weight), as its
    save_pretrained writes it (``saved``) or as its state dict."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(load_model(base, dtype), adapters[0], adapter_name=names[0])
    for adapter, name in zip(adapters[1:], names[1:], strict=True):
        model.load_adapter(adapter, adapter_name=name)
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        for name, weight in zip(names, weights, strict=True):
            if name in layer.scaling:
                layer.scaling[name] *= weight
    # (the one adapter with modules_to_save is the active one: its copies are what PEFT merges)
    model.set_adapter(next((name for adapter, name in zip(adapters, names, strict=True)
                            if json.loads((adapter / "adapter_config.json").read_text()).get("modules_to_save")),
                           names[0]))
    merged = model.merge_and_unload(adapter_names=names)
    if saved is None:
        return {k: v.detach().clone() for k, v in merged.state_dict().items()}
    merged.save_pretrained(saved)
    return folder_tensors(saved)


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(file).items()}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of |x| (float64) in ``dtype``."""
    mantissa = {torch.float32: 23, torch.bfloat16: 7}[dtype]
    return torch.pow(2.0, torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(dtype).tiny))) - mantissa)


def assert_rounded_from(ours: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """``ours`` is ``exact`` (float64) rounded to ``dtype``: within half an ulp for bf16, 1e-5 (of the element, or
    of 5 % of the tensor's largest) for float32, whose merge accumulates in float32."""
    ours, exact = ours.double(), exact.double()
    error = (ours - exact).abs()
    if dtype == torch.bfloat16:
        bound = 0.5001 * ulp(exact, dtype) + 1e-6 * exact.abs().max()
    else:
        scale = exact.abs().max().clamp_min(1e-30)
        bound = 1e-5 * torch.maximum(exact.abs(), 0.05 * scale) + 1e-7 * scale
    assert (error <= bound).all(), (name, float(error.max()), float((error / bound).max()))


@pytest.mark.parametrize("seed", SEEDS)
def test_merge_and_subtract_agree_with_peft(tmp_path, seed):
    from loraops import engine
    from loraops.basemodel import BaseModel
    from loraops.check import check
    from loraops.formats import read_adapter

    config, adapter_configs, weights = drawn(seed)
    base = build_base(config, tmp_path / "base")
    folders = [peft_adapter(base, tmp_path / f"a{i}", c, seed * 10 + i) for i, c in enumerate(adapter_configs)]
    dtype = config["dtype"]
    theirs = peft_merged(base, folders, weights, dtype, saved=tmp_path / "peft")
    exact = peft_merged(base, folders, weights, torch.float64)
    model = BaseModel.open(base)
    adapters = [read_adapter(folder) for folder in folders]
    for adapter in adapters:
        assert check(adapter, model).ok
    engine.merge(model, list(zip(adapters, weights, strict=True)), tmp_path / "ours", device="cpu",
                 fingerprint=False, progress=False)
    ours = folder_tensors(tmp_path / "ours")
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    for name, tensor in ours.items():
        if tensor.is_floating_point():
            assert_rounded_from(tensor, exact[name], dtype, name)
        else:
            assert torch.equal(tensor, theirs[name]), name
    if any(c.get("use_dora") or c.get("modules_to_save") for c in adapter_configs):
        return  # (neither is a difference that subtracts: README)
    engine.subtract(str(tmp_path / "ours"), list(zip(adapters, weights, strict=True)), tmp_path / "restored",
                    device="cpu", fingerprint=False, progress=False)
    restored, original = folder_tensors(tmp_path / "restored"), folder_tensors(base)
    assert restored.keys() == original.keys()
    for name, was in original.items():
        back, merged = restored[name].double(), ours[name].double()
        error = (back - was.double()).abs()
        if dtype == torch.bfloat16:  # the merge's rounding and the subtract's
            bound = 1.0001 * (ulp(merged, dtype) + ulp(torch.maximum(was.double().abs(), back.abs()), dtype)) / 2
        else:
            delta = (merged - was.double()).abs()
            bound = 4e-7 * (was.double().abs() + delta + delta.max()) + 1e-9
        assert (error <= bound + 1e-12).all(), (name, float(error.max()))


def combinable(seed: int) -> bool:
    """A float32 case whose adapters combine (no DoRA, no modules_to_save: combine refuses both)."""
    config, adapter_configs, _ = drawn(seed)
    return config["dtype"] == torch.float32 and not any(c.get("use_dora") or c.get("modules_to_save")
                                                        for c in adapter_configs)


@pytest.mark.parametrize("method", ["cat", "linear"])
@pytest.mark.parametrize("seed", COMBINED)
def test_a_cat_or_linear_combination_merges_as_its_inputs(tmp_path, seed, method):
    """The same cases combined as the CLI combines them (by path, against their registered base: PEFT's saved
    embedding layers that hold the base's values left out) — cat: exactly Σ wᵢ·ΔWᵢ; linear: re-factorized, lossless
    at the default rank — and written as PEFT: it fits the base, PEFT loads it, and merged it is the float64 merge of
    the inputs (within float32's rounding of the factors, and linear's re-factorization: 1e-5 of the largest
    change)."""
    from loraops import derive, engine
    from loraops.basemodel import BaseModel
    from loraops.check import check
    from loraops.formats import read_adapter
    from loraops.registry import Registry

    assert combinable(seed)
    config, adapter_configs, weights = drawn(seed)
    base = build_base(config, tmp_path / "base")
    folders = [peft_adapter(base, tmp_path / f"a{i}", c, seed * 10 + i) for i, c in enumerate(adapter_configs)]
    exact = peft_merged(base, folders, weights, torch.float64)
    model = BaseModel.open(base)
    with Registry.open() as reg:
        reg.add_base(base, name="base")
    derive.combine([(str(f), w) for f, w in zip(folders, weights, strict=True)], method, base="base",
                   output=str(tmp_path / "combined"), fmt="peft", dtype="fp32", device="cpu")
    adapter = read_adapter(tmp_path / "combined")
    assert check(adapter, model).ok
    engine.merge(model, [(adapter, 1.0)], tmp_path / "merged", device="cpu", fingerprint=False, progress=False)
    ours, original = folder_tensors(tmp_path / "merged"), folder_tensors(base)
    loaded = peft_merged(base, [tmp_path / "combined"], [1.0], torch.float64)  # (PEFT loads what was written)
    for name, tensor in ours.items():
        if not tensor.is_floating_point():
            continue
        change = (exact[name].double() - original[name].double()).abs().max()
        for merged in (tensor.double(), loaded[name].double()):
            error = (merged - exact[name].double()).abs()
            scale = exact[name].double().abs().max()
            assert (error <= 1e-5 * torch.maximum(exact[name].double().abs(), 0.05 * scale) + 1e-7 * scale
                    + 1e-5 * change).all(), (name, float(error.max()), float(change))

