"""extract's PEFT output names modules as transformers 5 holds them in memory (check.memory_names), for the families
whose checkpoints it renames on load: PEFT then finds every module (none skipped), and loraops' own merge of the
same adapter still lands on the saved tensors. Each case: a tiny random model saved by save_pretrained, a tuned copy
with random rank-2 deltas on some weights, extract at rank 2."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from factories import tiny_transformers
from loraops.check import SAVED_LAYOUTS, memory_names
from loraops.cli import main

LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=128, max_position_embeddings=64)
CLIP_VISION = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, image_size=16, patch_size=8)
VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8,
              intermediate_size=64, num_labels=3)
NEOX = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=128,
            max_position_embeddings=64)


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def tensors(folder):
    return load_file(str(folder / "model.safetensors"))


def tuned_copy(base, dest, changed):
    """base with a random rank-2 delta on each weight whose name contains one of ``changed``."""
    shutil.copytree(base, dest)
    weights = tensors(base)
    g = torch.Generator().manual_seed(1)
    for name, w in weights.items():
        if name.endswith(".weight") and w.dim() == 2 and any(c in name for c in changed):
            weights[name] = w + 0.05 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def peft_modules(model):
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")
            and "default" in m.lora_A}


def extract_and_check(tmp_path, model_type, cls, config, changed, inputs, *, base=None):
    """extract → PEFT: every module of the file becomes a LoRA layer and the logits are the tuned model's; loraops
    merge of the same adapter gives the tuned weights. Returns the adapter config."""
    import transformers
    from peft import PeftModel

    base = base or tiny_transformers(tmp_path / "base", model_type, cls, **config)
    tuned = tuned_copy(base, tmp_path / "tuned", changed)
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "--name", "ex", "-o", tmp_path / "lora")
    assert code == 0 and "warning" not in out, out
    adapter_config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    targets = {*adapter_config["target_modules"],
               *(p.removesuffix(".weight") for p in adapter_config.get("target_parameters") or ())}
    model_cls = getattr(transformers, cls)
    model = PeftModel.from_pretrained(model_cls.from_pretrained(base), tmp_path / "lora").eval()
    assert peft_modules(model) == targets
    expected = model_cls.from_pretrained(tuned).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected(**inputs).logits, rtol=0, atol=1e-5)
    code, out = run("merge", "ex", "--into", base, "-o", tmp_path / "merged", "--no-record")
    assert code == 0, out
    merged, expected = tensors(tmp_path / "merged"), tensors(tuned)
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-5)
    return adapter_config


TOKENS = {"input_ids": torch.arange(3, 11).reshape(1, 8)}


def test_gpt_neox_head_is_written_as_lm_head_and_peft_loads_it(tmp_path):
    config = extract_and_check(tmp_path, "gpt_neox", "GPTNeoXForCausalLM", NEOX, ["embed_out", "dense_4h_to_h"],
                               TOKENS)
    assert sorted(config["target_modules"]) == ["gpt_neox.layers.0.mlp.dense_4h_to_h", "lm_head"]


def test_gpt_neox_save_module_head_is_modules_to_save_lm_head(tmp_path):
    from peft import PeftModel
    from transformers import GPTNeoXForCausalLM

    base = tiny_transformers(tmp_path / "base", "gpt_neox", "GPTNeoXForCausalLM", **NEOX)
    tuned = tuned_copy(base, tmp_path / "tuned", ["embed_out", "dense_4h_to_h"])
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "--save-module", "embed_out",
                    "-o", tmp_path / "lora")
    assert code == 0, out
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    model = PeftModel.from_pretrained(GPTNeoXForCausalLM.from_pretrained(base), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**TOKENS).logits,
                                   GPTNeoXForCausalLM.from_pretrained(tuned).eval()(**TOKENS).logits, rtol=0, atol=1e-5)


def test_kohya_output_keeps_saved_names_and_loraops_reads_it_back(tmp_path):
    base = tiny_transformers(tmp_path / "base", "gpt_neox", "GPTNeoXForCausalLM", **NEOX)
    tuned = tuned_copy(base, tmp_path / "tuned", ["embed_out"])
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "--format", "kohya", "--name", "k",
                    "-o", tmp_path / "k.safetensors")
    assert code == 0 and "1 module," in out, out
    assert {k.rpartition(".lora")[0] for k in load_file(str(tmp_path / "k.safetensors")) if ".lora_" in k} == {
        "lora_unet_embed_out"}
    code, out = run("merge", "k", "--into", base, "-o", tmp_path / "merged", "--no-record")
    assert code == 0, out
    torch.testing.assert_close(tensors(tmp_path / "merged")["embed_out.weight"], tensors(tuned)["embed_out.weight"],
                               rtol=0, atol=1e-5)


LLAVA = dict(text_config=dict(model_type="llama", **LM), vision_config=CLIP_VISION, image_token_index=120)


def test_llava_transformers_save_gets_in_memory_names(tmp_path):
    config = extract_and_check(tmp_path, "llava", "LlavaForConditionalGeneration", LLAVA,
                               ["q_proj", "linear_1", "lm_head"], TOKENS)
    assert sorted(config["target_modules"]) == [
        "lm_head", "model.language_model.layers.0.self_attn.q_proj", "model.multi_modal_projector.linear_1",
        "model.vision_tower.encoder.layers.0.self_attn.q_proj"]


def test_llava_checkpoint_already_in_memory_layout_keeps_its_names(tmp_path):
    from transformers import LlavaForConditionalGeneration

    saved = tiny_transformers(tmp_path / "saved", "llava", "LlavaForConditionalGeneration", **LLAVA)
    model = LlavaForConditionalGeneration.from_pretrained(saved)
    (tmp_path / "new").mkdir()
    shutil.copy(saved / "config.json", tmp_path / "new" / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "new" / "model.safetensors"),
              metadata={"format": "pt"})
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in tensors(tmp_path / "new")
    names, warning = memory_names(tensors(tmp_path / "new"), json.loads((saved / "config.json").read_text()))
    assert names == {} and warning is None
    config = extract_and_check(tmp_path, "llava", "LlavaForConditionalGeneration", LLAVA, ["q_proj", "lm_head"],
                               TOKENS, base=tmp_path / "new")
    assert sorted(config["target_modules"]) == ["lm_head", "model.language_model.layers.0.self_attn.q_proj",
                                                "model.vision_tower.encoder.layers.0.self_attn.q_proj"]


MIXTRAL = dict(LM, num_local_experts=2, num_experts_per_tok=1)


def test_mixtral_names_and_a_warning_for_its_experts(tmp_path):
    # transformers 5 fuses the experts in memory: PEFT has no module by an expert's name and skips it, so extract
    # warns; the names follow the Mixtral rules and loraops' merge lands them on w1
    base = tiny_transformers(tmp_path / "base", "mixtral", "MixtralForCausalLM", **MIXTRAL)
    tuned = tuned_copy(base, tmp_path / "tuned", ["q_proj", "experts.1.w1"])
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "--name", "ex", "-o", tmp_path / "lora")
    assert code == 0, out
    assert out.count("warning: ") == 1 and ("warning: 1 per-expert module (model.layers.0.mlp.experts.1.gate_proj): "
                                           "transformers 5 holds a MoE layer's experts as fused parameters") in out
    assert sorted(json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["target_modules"]) == [
        "model.layers.0.mlp.experts.1.gate_proj", "model.layers.0.self_attn.q_proj"]
    code, out = run("merge", "ex", "--into", base, "-o", tmp_path / "merged", "--no-record")
    assert code == 0, out
    for name, tensor in tensors(tuned).items():
        torch.testing.assert_close(tensors(tmp_path / "merged")[name], tensor, rtol=0, atol=1e-5)


def test_mixtral_attention_loads_in_peft(tmp_path):
    extract_and_check(tmp_path, "mixtral", "MixtralForCausalLM", MIXTRAL, ["q_proj", "o_proj"], TOKENS)


def test_vit_gets_in_memory_names(tmp_path):
    pixels = {"pixel_values": torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    config = extract_and_check(tmp_path, "vit", "ViTForImageClassification", VISION,
                               ["attention.query", "output.dense", "classifier"], pixels)
    assert sorted(config["target_modules"]) == ["classifier", "vit.layers.0.attention.o_proj",
                                                "vit.layers.0.attention.q_proj", "vit.layers.0.mlp.fc2"]


def test_no_config_and_a_renamed_looking_checkpoint_warns(tmp_path):
    base = tiny_transformers(tmp_path / "base", "gpt_neox", "GPTNeoXForCausalLM", **NEOX)
    tuned = tuned_copy(base, tmp_path / "tuned", ["embed_out"])
    code, out = run("extract", "--base", base / "model.safetensors", "--tuned", tuned / "model.safetensors",
                    "--rank", "2", "-o", tmp_path / "lora")
    assert code == 0, out
    assert out.count("warning: no config.json to tell the model family") == 1 and "GPT-NeoX" in out, out
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["target_modules"] == ["embed_out"]


def test_no_config_and_a_plain_llama_gets_no_warning(tmp_path):
    """A Llama's names are what Qwen2-VL saves its language model as, so the warning named Qwen2-VL for every
    config-less Llama (and Whisper); a family is suspected only on names only its checkpoints have (Layout.marks)."""
    from factories import tiny_llama

    base = tiny_llama(tmp_path / "base", layers=1)
    tuned = tuned_copy(base, tmp_path / "tuned", ["q_proj"])
    code, out = run("extract", "--base", base / "model.safetensors", "--tuned", tuned / "model.safetensors",
                    "--rank", "2")
    assert code == 0 and "warning" not in out, out


NO_CONFIG = {
    "llama": (["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"], None),
    "whisper": (["model.encoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.0.fc1.weight",
                 "proj_out.weight"], None),
    "bert": (["bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.output.dense.weight",
              "bert.encoder.layer.0.intermediate.dense.weight", "bert.encoder.layer.0.output.dense.weight"], None),
    "t5": (["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"], None),
    "clip": (["text_model.encoder.layers.0.self_attn.q_proj.weight", "vision_model.encoder.layers.0.mlp.fc1.weight"],
             None),
    "qwen2_vl": (["model.layers.0.self_attn.q_proj.weight", "visual.blocks.0.attn.qkv.weight"], "Qwen2-VL"),
    "vit": (["vit.encoder.layer.0.attention.attention.query.weight", "vit.encoder.layer.0.output.dense.weight"],
            "ViT-style, DINOv2"),
    "mixtral": (["model.layers.0.block_sparse_moe.experts.0.w1.weight", "model.layers.0.self_attn.q_proj.weight"],
                "Mixtral's block_sparse_moe, PhiMoE's block_sparse_moe"),
    "llava": (["language_model.model.layers.0.self_attn.q_proj.weight", "vision_tower.vision_model.encoder.layers.0."
               "mlp.fc1.weight", "multi_modal_projector.linear_1.weight"], "LLaVA-style"),
    "qwen2_5_omni": (["thinker.model.layers.0.self_attn.q_proj.weight", "thinker.audio_tower.layers.0.fc1.weight",
                      "thinker.lm_head.weight"], "Qwen2.5-Omni"),
}


@pytest.mark.parametrize("family", NO_CONFIG)
def test_no_config_suspects_a_family_by_names_only_it_has(family):
    names, suspects = NO_CONFIG[family]
    renames, warning = memory_names(names, {})
    assert renames == {}
    assert (warning is None) if suspects is None else f"under other names ({suspects}), PEFT skips" in warning, warning


def test_every_layout_inverse_undoes_its_rules():
    names = ["language_model.model.layers.0.self_attn.q_proj.weight", "language_model.lm_head.weight",
             "vision_tower.encoder.layers.0.mlp.fc1.weight", "model.layers.0.mlp.down_proj.weight", "embed_out.weight",
             "visual.blocks.0.attn.qkv.weight", "vit.encoder.layer.0.attention.attention.query.weight",
             "vit.encoder.layer.0.attention.output.dense.weight", "vit.encoder.layer.0.output.dense.weight",
             "swin.encoder.layers.0.blocks.0.attention.self.key.weight", "layer.0.attention.o_proj.weight",
             "segformer.encoder.block.0.0.mlp.dense1.weight", "segformer.encoder.block.1.0.attention.self.sr.weight",
             "model.layers.0.block_sparse_moe.experts.1.w3.weight", "encoder.layers.0.attn.weight",
             "decode_head.linear_c.0.proj.weight", "segformer.encoder.patch_embeddings.1.proj.weight",
             "thinker.model.layers.0.self_attn.q_proj.weight", "thinker.audio_tower.layers.0.fc1.weight",
             "thinker.visual.blocks.0.attn.q.weight", "thinker.lm_head.weight",
             "audio_tower.layers.0.fc1.weight", "visual.blocks.0.attn.q.weight"]
    for layout in SAVED_LAYOUTS:
        for name in names:
            if layout.saved(name) == name:  # a name in this layout's saved form
                assert layout.saved(layout.in_memory(name)) == name, (layout.name, name)


QWEN2_VL = dict(text_config=dict(**LM, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
                vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                                   spatial_merge_size=2, temporal_patch_size=2),
                image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)


def test_qwen2_vl_gets_in_memory_names(tmp_path):
    # text only: the tower's LoRA is checked by PEFT creating it and by loraops' merge
    config = extract_and_check(tmp_path, "qwen2_vl", "Qwen2VLForConditionalGeneration", QWEN2_VL,
                               ["q_proj", "qkv", "lm_head"], TOKENS)
    assert sorted(config["target_modules"]) == ["lm_head", "model.language_model.layers.0.self_attn.q_proj",
                                                "model.visual.blocks.0.attn.qkv"]


QWEN2_MOE = dict(LM, num_experts=2, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)


@pytest.mark.parametrize("model_type, cls, config", [
    ("mixtral", "MixtralForCausalLM", dict(MIXTRAL, num_experts_per_tok=2)),
    ("qwen2_moe", "Qwen2MoeForCausalLM", QWEN2_MOE),
    ("phimoe", "PhimoeForCausalLM", dict(MIXTRAL, num_experts_per_tok=2)),
])
def test_a_moe_router_is_a_lora_on_its_weight_parameter(tmp_path, model_type, cls, config):
    """transformers 5 holds a MoE layer's router (mlp.gate; Mixtral saves block_sparse_moe.gate) as a router class
    PEFT cannot wrap as a module: Qwen2-MoE's target_modules entry made PEFT refuse the whole adapter ('Target module
    Qwen2MoeTopKRouter() is not supported'). Written as target_parameters <router>.weight, PEFT's adapted model gives
    the tuned logits (top-2 of 2 experts: the routing weights follow the router). Qwen2-MoE's shared_expert_gate is
    an nn.Linear and stays a module; kohya (no target_parameters) gets a plain module that loraops merges."""
    adapter_config = extract_and_check(tmp_path, model_type, cls, config, ["gate.weight", "q_proj"], TOKENS)
    router = "router" if model_type == "phimoe" else "gate"  # (PhiMoE's block_sparse_moe.gate is mlp.router in memory)
    assert adapter_config["target_parameters"] == [f"model.layers.0.mlp.{router}.weight"]
    assert sorted(adapter_config["target_modules"]) == (
        ["model.layers.0.mlp.shared_expert_gate"] if model_type == "qwen2_moe" else []) + [
        "model.layers.0.self_attn.q_proj"]
    code, out = run("extract", "--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--rank", "2",
                    "--format", "kohya", "-o", tmp_path / "kohya.safetensors")
    assert code == 0, out
    code, out = run("merge", tmp_path / "kohya.safetensors", "--into", tmp_path / "base", "-o", tmp_path / "m2",
                    "--no-record")
    assert code == 0, out
    for name, tensor in tensors(tmp_path / "tuned").items():
        torch.testing.assert_close(tensors(tmp_path / "m2")[name], tensor, rtol=0, atol=1e-5)


DINOV2_SWIGLU = dict(VISION, mlp_ratio=2, use_swiglu_ffn=True)


def test_dinov2_swiglu_weights_in_is_its_two_modules(tmp_path):
    """DINOv2 saves its SwiGLU MLP's gate_proj and up_proj as the two halves of one mlp.weights_in; transformers 5
    splits it on load, so an extracted weights_in module made PEFT refuse the adapter (no module by that name). Each
    half is a module of its own; --modules can name one."""
    pixels = {"pixel_values": torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    config = extract_and_check(tmp_path, "dinov2", "Dinov2ForImageClassification", DINOV2_SWIGLU,
                               ["weights_in", "weights_out"], pixels)
    assert sorted(config["target_modules"]) == ["dinov2.encoder.layer.0.mlp.down_proj",
                                                "dinov2.encoder.layer.0.mlp.gate_proj",
                                                "dinov2.encoder.layer.0.mlp.up_proj"]
    code, out = run("extract", "--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--rank", "2",
                    "--modules", "up_proj", "--json")
    assert code == 0, out
    assert [(m["name"], m["shape"]) for m in json.loads(out)["report"]["modules"]] == [
        ("dinov2.encoder.layer.0.mlp.up_proj", [48, 32])]


def test_dinov2_a_half_named_alone_that_did_not_change_is_named(tmp_path):
    """--modules gate_proj where only weights_in's up_proj rows changed: the gate half's delta is zero, which was
    reported as 'hold the same values in every tensor' (the weight differs: its other rows)."""
    base = tiny_transformers(tmp_path / "base", "dinov2", "Dinov2Model", **DINOV2_SWIGLU)
    weights = tensors(base)
    name = "encoder.layer.0.mlp.weights_in.weight"
    half = weights[name].shape[0] // 2
    weights[name] = torch.cat([weights[name][:half], weights[name][half:] + 0.05])
    shutil.copytree(base, tmp_path / "tuned")
    save_file(weights, str(tmp_path / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    code, out = run("extract", "--base", base, "--tuned", tmp_path / "tuned", "--rank", "2", "--modules", "gate_proj",
                    "-o", tmp_path / "lora")
    assert (code, out) == (2, f"error: --modules: encoder.layer.0.mlp.gate_proj (rows 0–{half} of {name}): the same "
                              "in both models (other rows of the weight differ): nothing to extract\n")
    assert not (tmp_path / "lora").exists() and run("list")[1].count("\n") == 2, run("list")  # (a header only)


def test_a_zero_delta_beside_renamed_modules_is_left_out(tmp_path):
    """A weight that differs only in a signed zero is a target whose delta is zero, dropped as it is computed; the
    PEFT writer renames the modules to the in-memory names and lost the names dropped: 'module
    'vit.layers.0.attention.q_proj' was announced and never came'."""
    base = tiny_transformers(tmp_path / "base", "vit", "ViTForImageClassification", **VISION)
    weights = tensors(base)
    query, key = (f"vit.encoder.layer.0.attention.attention.{p}.weight" for p in ("query", "key"))
    weights[query][0, 0] = 0.0
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(base, tmp_path / "tuned")
    weights[query][0, 0] = -0.0
    weights[key] = weights[key] + 0.05
    save_file(weights, str(tmp_path / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    code, out = run("extract", "--base", base, "--tuned", tmp_path / "tuned", "--rank", "2", "-o", tmp_path / "lora")
    assert code == 0, out
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["vit.layers.0.attention.k_proj"]
    assert sorted(load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))) == [
        f"base_model.model.vit.layers.0.attention.k_proj.lora_{f}.weight" for f in "AB"]
