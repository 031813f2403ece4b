"""PEFT target_parameters LoRAs on MoE bases that store each layer's experts fused on disk: gpt-oss (E×H×2I, in×out,
gate and up interleaved; its down_proj square here as in gpt-oss-20b), Qwen3-VL-MoE as transformers saves it (E×2I×H)
and as published (E×H×2I, transposed on load), Aria (experts.fc1/fc2.weight, in×out), GraniteMoE (input_linear /
output_linear.weight). The experts bind to their parts of the fused tensor; merged, the tensors are PEFT's
merge_and_unload and the logits PEFT's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import tiny_transformers
from loraops import algebra, engine, formats
from loraops.basemodel import BaseModel
from loraops.check import check, require_fit
from loraops.errors import MismatchError
from test_moe import edit_config, run, tensors

LM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
          vocab_size=128, max_position_embeddings=64)
FAMILIES = {
    # intermediate = hidden, as in gpt-oss-20b: down_proj is square, its layout read off gate_up_proj's
    "gpt_oss": ("gpt_oss", "GptOssForCausalLM", dict(LM, intermediate_size=32, num_local_experts=4,
                                                     num_experts_per_tok=2, sliding_window=8)),
    "qwen3_vl_moe": ("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", dict(
        text_config=dict(LM, intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32,
                           deepstack_visual_indexes=[0]))),
    "aria": ("aria_text", "AriaTextForCausalLM", dict(LM, intermediate_size=24, moe_num_experts=4, moe_topk=2,
                                                      moe_num_shared_experts=1)),
    # block_sparse_moe.experts.gate_up_proj saved as block_sparse_moe.input_linear.weight (E×2I×H)
    "granitemoe": ("granitemoe", "GraniteMoeForCausalLM", dict(LM, intermediate_size=24, num_local_experts=4,
                                                               num_experts_per_tok=2)),
}
PUBLISHED = "qwen3_vl_moe_published"  # the same model with its experts stored transposed, as Qwen's checkpoints
TARGETS = dict(target_modules=["q_proj", "v_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"])
IDS = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))


def model_class(family):
    import transformers

    return getattr(transformers, FAMILIES[family.removesuffix("_published")][1])


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    out = {family: tiny_transformers(root / family, model_type, cls, **config)
           for family, (model_type, cls, config) in FAMILIES.items()}
    out[PUBLISHED] = root / PUBLISHED
    out[PUBLISHED].mkdir()
    for file in out["qwen3_vl_moe"].iterdir():
        if file.suffix == ".safetensors":
            stored = load_file(file)
            save_file({k: t.transpose(1, 2).contiguous() if ".experts." in k else t for k, t in stored.items()},
                      out[PUBLISHED] / file.name, {"format": "pt"})
        else:
            (out[PUBLISHED] / file.name).write_bytes(file.read_bytes())
    return out


def peft_model(base, family, dtype=torch.float32, **lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **TARGETS, **lora})
    return get_peft_model(model_class(family).from_pretrained(base, dtype=dtype).eval(), config).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def run_module(*args):
    """``python -m loraops …``: (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "loraops", *map(str, args)], capture_output=True, text=True,
                          env=os.environ, timeout=120, check=False)
    return done.returncode, done.stdout, done.stderr


def within_one_unit(ours, theirs, base, name):
    """Element-wise within one rounding unit of the dtype at the size of the weight, its delta or the sum: PEFT's
    ParamWrapper computes and rounds the delta in the adapter's dtype (bf16 einsum) before adding it, loraops adds
    in float32 and rounds once."""
    a, b, w = ours.float(), theirs.float(), base.float()
    size = torch.stack([w.abs(), (a - w).abs(), a.abs(), b.abs()]).amax(0)
    assert ((a - b).abs() <= torch.finfo(base.dtype).eps * size).all(), name


@pytest.mark.parametrize("family,dtype", [("gpt_oss", torch.float32), ("gpt_oss", torch.bfloat16),
                                          ("qwen3_vl_moe", torch.float32), ("qwen3_vl_moe", torch.bfloat16),
                                          (PUBLISHED, torch.float32), ("aria", torch.float32),
                                          ("granitemoe", torch.float32)])
def test_merge_and_subtract_equal_peft(tmp_path, bases, family, dtype):
    base = bases[family]
    if dtype != torch.float32:
        base = tmp_path / "base"
        model_class(family).from_pretrained(bases[family], dtype=dtype).save_pretrained(base)
    model = peft_model(base, family, dtype)
    model.save_pretrained(tmp_path / "a")
    expected = logits(model)

    adapter = formats.read_adapter(tmp_path / "a")
    report = check(adapter, BaseModel.open(base).tensors)
    assert report.ok and report.matched == len(adapter.modules) == 2 * (2 + 4 * 3), report
    engine.merge(base, [(adapter, 1.0)], tmp_path / "out", device="cpu")
    ours = logits(model_class(family).from_pretrained(tmp_path / "out", dtype=dtype).eval())
    original = logits(model_class(family).from_pretrained(base, dtype=dtype).eval())
    assert (original - expected).abs().max() > 0.1  # the LoRA does something
    if dtype == torch.float32:
        assert (ours - expected).abs().max() < 1e-5
    else:  # bf16 forwards differ by their own roundings: PEFT's merged model is as far from its unmerged one
        model.merge_and_unload().save_pretrained(tmp_path / "peft-merged")
        peft_merged = logits(model_class(family).from_pretrained(tmp_path / "peft-merged", dtype=dtype).eval())
        assert (ours - expected).abs().max() <= 2 * max((peft_merged - expected).abs().max(), 0.01)

    if not (tmp_path / "peft-merged").exists():
        model.merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    merged, peft, stored = tensors(tmp_path / "out"), tensors(tmp_path / "peft-merged"), tensors(base)
    assert merged.keys() == stored.keys()
    assert sum(not torch.equal(merged[n], stored[n]) for n in stored) == 2 * (2 + 2)  # q, v, gate_up, down per layer
    for name, tensor in merged.items():
        # transformers saves the published Qwen3-VL-MoE's experts as it holds them: transposed back
        theirs = peft[name].transpose(1, 2) if family == PUBLISHED and ".experts." in name else peft[name]
        within_one_unit(tensor, theirs, stored[name], name)

    engine.subtract(tmp_path / "out", [(adapter, 1.0)], tmp_path / "restored", device="cpu")
    restored = tensors(tmp_path / "restored")
    for name, tensor in stored.items():
        tolerance = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * tensor.float().abs().max()
        torch.testing.assert_close(restored[name].float(), tensor.float(), rtol=0, atol=tolerance, msg=name)


def test_full_aria_binds_under_its_saved_names(tmp_path):
    """AriaForConditionalGeneration holds model.language_model.…experts.gate_up_proj and saves
    language_model.model.…experts.fc1.weight (LLaVA's and aria_text's mappings together)."""
    _, _, text = FAMILIES["aria"]
    base = tiny_transformers(tmp_path / "aria", "aria", "AriaForConditionalGeneration",
                             text_config=dict(text, model_type="aria_text"), projector_patch_to_query_dict={"4": 4},
                             vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                num_attention_heads=4, image_size=28, patch_size=14))
    from peft import LoraConfig, get_peft_model
    from transformers import AriaForConditionalGeneration

    torch.manual_seed(1)
    model = get_peft_model(AriaForConditionalGeneration.from_pretrained(base).eval(), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=[], target_parameters=TARGETS["target_parameters"]))
    model.save_pretrained(tmp_path / "a")
    run("merge", tmp_path / "a", "--into", base, "-o", tmp_path / "out", "--no-record")
    merged = AriaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert (logits(merged) - logits(model.eval())).abs().max() < 1e-5
    assert "language_model.model.layers.1.mlp.experts.fc1.weight" in tensors(tmp_path / "out")


@pytest.mark.registry_backend
def test_registered_gpt_oss_inspect_check_export_resize_combine(tmp_path, bases):
    """The TRL recipe's adapter (experts of chosen layers: target_parameters "1.mlp.experts.gate_up_proj"), registered
    with --base, is bound to its parts of the fused tensors; export writes PEFT's bytes back, and resize/combine (gate
    and up joined per expert, as for per-expert bases) load into PEFT with its logits. A bound expert keeps its own
    part through the join and split."""
    base = bases["gpt_oss"]
    model = peft_model(base, "gpt_oss", target_parameters=["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj"])
    model.save_pretrained(tmp_path / "a")
    run("base", "add", base, "--name", "oss")
    assert run("register", tmp_path / "a", "--name", "moe", "--base", "oss").output.startswith("registered moe@1")
    assert "model.layers.1.mlp.experts.3.up_proj" in run("inspect", tmp_path / "a").output
    assert run("check", "moe", "--base", "oss").output.startswith("moe@1 fits oss: 16/16 modules match")
    run("merge", "moe", "--into", "oss", "-o", tmp_path / "merged", "--no-record")
    assert (logits(model_class("gpt_oss").from_pretrained(tmp_path / "merged")) - logits(model)).abs().max() < 1e-5

    run("export", "moe", "--format", "peft", "-o", tmp_path / "back")
    original = tensors(tmp_path / "a")
    assert all(torch.equal(t, original[k]) for k, t in tensors(tmp_path / "back").items())
    assert tensors(tmp_path / "back").keys() == original.keys()
    run("resize", "moe", "--rank", "4", "-o", tmp_path / "same")
    run("combine", "moe:0.5", "moe:0.5", "--method", "linear", "-o", tmp_path / "half")
    from peft import PeftModel

    for folder in ("same", "half"):
        loaded = PeftModel.from_pretrained(model_class("gpt_oss").from_pretrained(base).eval(), tmp_path / folder)
        torch.testing.assert_close(logits(loaded.eval()), logits(model), rtol=0, atol=1e-5)

    bound = require_fit(formats.read_adapter(tmp_path / "a"), BaseModel.open(base).tensors)
    up = bound.modules["model.layers.1.mlp.experts.2.up_proj"]
    assert up.fused == ("model.layers.1.mlp.experts.gate_up_proj", 64, 32, 128) and up.fused_columns == (32, 32)
    assert up.transposed  # stored in×out
    down = bound.modules["model.layers.1.mlp.experts.2.down_proj"]
    assert down.fused == ("model.layers.1.mlp.experts.down_proj", 64, 32, 128) and down.transposed  # square
    resized, _ = algebra.resize(bound, rank=2)
    assert {n: (m.fused, m.fused_columns) for n, m in resized.modules.items()} == {
        n: (m.fused, m.fused_columns) for n, m in bound.modules.items()}


def test_another_number_of_experts_does_not_fit(tmp_path, bases):
    """The factors split into experts by the config's r: an r twice too large reads as 2 experts, each with a part of
    the 4-expert tensor that fits; the count is checked against the tensor's. One line, nothing written."""
    base = bases["gpt_oss"]
    peft_model(base, "gpt_oss").save_pretrained(tmp_path / "a")
    good = formats.read_adapter(tmp_path / "a")
    edit_config(tmp_path / "a", r=8, lora_alpha=16)
    report = check(formats.read_adapter(tmp_path / "a"), BaseModel.open(base).tensors)
    assert [m.name for m in report.shape_mismatches] == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in (
        "down_proj (down_proj)", "gate_up_proj (gate_proj)")]  # one line per fused parameter
    # the shares fit their parts of the tensors only by accident: not counted as matching (q/v only are)
    assert report.matched == sum(1 for m in formats.read_adapter(tmp_path / "a").modules.values() if not m.raw_parameter)
    code, out, err = run_module("merge", tmp_path / "a", "--into", base, "-o", tmp_path / "out", "--no-record")
    # (the one error line follows the reader's note that the config's r is not the q/v tensors' rank)
    *notes, error = err.strip().splitlines()
    assert code == MismatchError.exit_code and not out and error.startswith("error: "), err
    assert [n.partition(": its r/rank_pattern")[1] for n in notes] == [": its r/rank_pattern"], err
    assert ("does not fit base" in err or "do not fit base" in err) and (
        "model.layers.0.mlp.experts.down_proj (down_proj) (adapter 2×32×32, base 4×32×32)" in err), err
    assert not (tmp_path / "out").exists()

    manifest = dict(BaseModel.open(base).tensors)  # the same adapter on an 8-expert model
    for name in [n for n in manifest if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        manifest[name] = SimpleNamespace(shape=(8, *manifest[name].shape[1:]))
    report = check(good, manifest)
    assert not report.ok and {(m.expected[0], m.actual[0]) for m in report.shape_mismatches} == {(8, 4)}, report


def test_a_quantized_base_is_refused_with_the_reason(tmp_path, bases):
    """The published gpt-oss checkpoints store the experts MXFP4-quantized (…gate_up_proj_blocks, _scales)."""
    base = bases["gpt_oss"]
    peft_model(base, "gpt_oss").save_pretrained(tmp_path / "a")
    quantized = tmp_path / "mxfp4"
    quantized.mkdir()
    for file in base.iterdir():
        if file.suffix != ".safetensors":
            (quantized / file.name).write_bytes(file.read_bytes())
            continue
        out = {}
        for name, t in load_file(file).items():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                out[f"{name}_blocks"] = torch.zeros(*t.shape[:2], 1, 16, dtype=torch.uint8)
                out[f"{name}_scales"] = torch.zeros(*t.shape[:2], 1, dtype=torch.uint8)
            else:
                out[name] = t
        save_file(out, quantized / file.name, {"format": "pt"})
    code, out, err = run_module("merge", tmp_path / "a", "--into", quantized, "-o", tmp_path / "out", "--no-record")
    assert code == MismatchError.exit_code and len(err.strip().splitlines()) == 1, err
    # one phrase per quantized fused tensor, not one per expert module it would hold
    assert ("model.layers.0.mlp.experts.0.gate_proj and 7 more (quantized: stored as "
            "model.layers.0.mlp.experts.gate_up_proj_blocks and _scales (MXFP4); merge into a bf16 copy of the base)") in err
    assert err.count("(quantized: stored as") == 4, err  # gate_up_proj and down_proj of each of the 2 layers
    assert ": 24 modules do not fit base" in err  # 2 layers × 4 experts × (gate, up, down)
    assert not (tmp_path / "out").exists()


def test_a_square_tensor_without_its_sibling_is_refused(tmp_path, bases):
    """gpt-oss's down_proj alone (square) says nothing of its layout; with gate_up_proj beside it, it does."""
    peft_model(bases["gpt_oss"], "gpt_oss", target_parameters=["experts.down_proj"]).save_pretrained(tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    manifest = {n: t for n, t in BaseModel.open(bases["gpt_oss"]).tensors.items() if not n.endswith("gate_up_proj")}
    with pytest.raises(MismatchError, match=r"^model.layers.0.mlp.experts.down_proj is square and its layer has no "
                                            r"other fused experts tensor to tell whether it is stored out×in or "
                                            r"in×out$"):
        check(adapter, manifest)
    assert check(adapter, BaseModel.open(bases["gpt_oss"]).tensors).ok


def test_a_bound_adapter_written_back_keeps_its_linear_modules_untransposed(tmp_path, bases):
    """An expert's share bound to a base that stores the experts in×out is transposed (fan_in_fan_out) only as a
    binding: what is written from it (resize, combine of a registered adapter) must not say fan_in_fan_out, which
    PEFT refuses on a ParamWrapper and ignores on an nn.Linear, but loraops would apply to the square q_proj/v_proj."""
    base = bases["gpt_oss"]
    peft_model(base, "gpt_oss").save_pretrained(tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    bound = require_fit(adapter, BaseModel.open(base).tensors)
    assert bound.modules["model.layers.0.mlp.experts.1.gate_proj"].transposed
    resized, _ = algebra.resize(bound, rank=4)
    formats.write_adapter(resized, tmp_path / "same", "peft")
    assert json.loads((tmp_path / "same" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    engine.merge(base, [(adapter, 1.0)], tmp_path / "want", device="cpu")
    engine.merge(base, [(formats.read_adapter(tmp_path / "same"), 1.0)], tmp_path / "got", device="cpu")
    want, got = tensors(tmp_path / "want"), tensors(tmp_path / "got")
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_a_nan_or_inf_the_fused_experts_hold_stays_where_deltas_may_overflow(tmp_path, bases):
    """The scan of a float32 base going out as bf16 reads the base's non-finite values again by the chunk's rows:
    of fused experts (E×X×Y, E·X rows of Y) as their chunks see them, not by the first dimension (experts). A NaN
    and an inf in one expert's share stay where PEFT's merge keeps them; nothing else is NaN or inf. (The inf was
    refused as values beyond bfloat16's range that the adapter made.)"""
    base = tmp_path / "base"
    model = model_class("gpt_oss").from_pretrained(bases["gpt_oss"]).eval()
    experts = model.model.layers[1].mlp.experts.gate_up_proj
    with torch.no_grad():
        experts[2, 5, 7], experts[3, 1, 0] = float("nan"), float("-inf")
    model.save_pretrained(base)
    peft = peft_model(base, "gpt_oss")
    peft.save_pretrained(tmp_path / "a")
    peft.merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    engine.merge(base, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", dtype="bf16", device="cpu")
    merged, theirs, stored = tensors(tmp_path / "out"), tensors(tmp_path / "peft-merged"), tensors(base)
    name = next(n for n in stored if n.endswith("layers.1.mlp.experts.gate_up_proj"))
    ours, peft_merged = merged[name].float(), theirs[name]
    assert torch.equal(torch.isnan(ours), torch.isnan(stored[name])) and int(torch.isnan(ours).sum()) == 1
    inf = torch.isinf(stored[name])
    assert torch.equal(torch.isinf(ours), inf) and torch.equal(ours[inf], peft_merged[inf])
    finite = torch.isfinite(stored[name])
    within_one_unit(ours[finite], peft_merged[finite].to(torch.bfloat16), stored[name][finite].to(torch.bfloat16), name)
