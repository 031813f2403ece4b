"""A LoRA on the input embeddings of a tied model (tie_word_embeddings) whose head is not trained: PEFT's adapted
model changes the embedding lookup only, its head reads the one shared base weight. The merge writes the head untied,
as the base's values, so the merged model computes what the adapted model computes (PEFT's merge_and_unload changes
the shared tensor, the head included)."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import LLAMA_TARGETS, TINY_BERT, load_model, peft_adapter, tiny_llama, tiny_transformers
from test_engine import merged_tensors as tensors
from loraops import check, engine, formats
from loraops.check import INPUT_EMBEDDINGS, TIED_HEAD_OF_CLASS, is_head
from loraops.errors import FormatError, InvalidInputError, MismatchError

EMBED = "model.embed_tokens.weight"
TOKENS = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model.eval()(TOKENS).logits


def embedding_lora(base, out, **kwargs):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=kwargs.pop("targets", ["embed_tokens"]),
                                                        init_lora_weights=False, **kwargs))
    if kwargs.get("use_dora"):  # magnitudes off their initial norms
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1.5)
    model.save_pretrained(out, save_embedding_layers=False)
    return out


def adapted(base, adapter, scale=1.0):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base), adapter)
    if scale != 1.0:
        for module in model.modules():
            if hasattr(module, "set_scale"):
                module.set_scale("default", scale)
    return model


@pytest.fixture
def tied(tmp_path):
    return tiny_llama(tmp_path / "tied", tie=True)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_embeddings_lora_merges_as_the_adapted_model(tmp_path, tied, weight):
    adapter_path = embedding_lora(tied, tmp_path / "a")
    expected = logits(adapted(tied, adapter_path, weight))
    if weight == 1.0:  # why the head is not merged into the shared tensor
        assert (logits(adapted(tied, adapter_path).merge_and_unload()) - expected).abs().max() > 1e-2
    adapter = formats.read_adapter(adapter_path)
    report = engine.merge(tied, [(adapter, weight)], tmp_path / "out", progress=False)
    assert report.heads_untied == ["lm_head.weight"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    ours, base = tensors(tmp_path / "out"), tensors(tied)
    assert torch.equal(ours["lm_head.weight"], base[EMBED]) and not torch.equal(ours[EMBED], base[EMBED])
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), expected, atol=1e-5, rtol=1e-5)
    from loraops.basemodel import BaseModel

    assert report.fingerprint == BaseModel.open(tmp_path / "out").fingerprint()

    # subtract from the untied model takes the delta off the embeddings; the head is already the base's
    back = engine.subtract(tmp_path / "out", [(adapter, weight)], tmp_path / "back", progress=False)
    assert back.heads_untied == []
    restored = tensors(tmp_path / "back")
    assert torch.equal(restored["lm_head.weight"], base[EMBED])
    torch.testing.assert_close(restored[EMBED], base[EMBED], atol=1e-6, rtol=0)


def test_weight_zero_unties_nothing(tmp_path, tied):
    adapter = formats.read_adapter(embedding_lora(tied, tmp_path / "a"))
    report = engine.merge(tied, [(adapter, 0.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == [] and "lm_head.weight" not in tensors(tmp_path / "out")


def test_subtract_from_a_tied_model_changes_the_shared_tensor(tmp_path, tied):
    """The inverse of PEFT's merge_and_unload (which wrote the delta into the shared tensor): nothing to untie."""
    adapter_path = embedding_lora(tied, tmp_path / "a")
    adapted(tied, adapter_path).merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    report = engine.subtract(tmp_path / "peft-merged", [(formats.read_adapter(adapter_path), 1.0)], tmp_path / "back",
                             progress=False)
    assert report.heads_untied == [] and "lm_head.weight" not in tensors(tmp_path / "back")
    torch.testing.assert_close(tensors(tmp_path / "back")[EMBED], tensors(tied)[EMBED], atol=1e-6, rtol=0)


def test_head_stored_twice_keeps_its_base_values(tmp_path, tied):
    """A tied model an exporter saved with lm_head.weight too (byte-identical): the embeddings take the delta, the
    head copy keeps the base's values, the config unties them."""
    adapter_path = embedding_lora(tied, tmp_path / "a")
    state = load_file(tied / "model.safetensors")
    save_file({**state, "lm_head.weight": state[EMBED].clone()}, str(tied / "model.safetensors"), metadata={"format": "pt"})
    report = engine.merge(tied, [(formats.read_adapter(adapter_path), 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == ["lm_head.weight"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(tensors(tmp_path / "out")["lm_head.weight"], state[EMBED])
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), logits(adapted(tied, adapter_path)), atol=1e-5, rtol=1e-5)


def test_lora_on_embeddings_and_head(tmp_path, tied):
    adapter_path = embedding_lora(tied, tmp_path / "a", targets=["embed_tokens", "lm_head"])
    report = engine.merge(tied, [(formats.read_adapter(adapter_path), 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == ["lm_head.weight"]
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), logits(adapted(tied, adapter_path)), atol=1e-5, rtol=1e-5)


def test_dora_on_the_embeddings(tmp_path, tied):
    adapter_path = embedding_lora(tied, tmp_path / "a", use_dora=True)
    report = engine.merge(tied, [(formats.read_adapter(adapter_path), 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == ["lm_head.weight"]
    assert torch.equal(tensors(tmp_path / "out")["lm_head.weight"], tensors(tied)[EMBED])
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), logits(adapted(tied, adapter_path)), atol=1e-5, rtol=1e-5)


def test_a_model_without_a_head_is_merged_in_place(tmp_path, tied):
    """A config naming a class without an output head (here: a classifier's): nothing to untie."""
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    adapter = formats.read_adapter(embedding_lora(tied, tmp_path / "a"))
    report = engine.merge(tied, [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == [] and "lm_head.weight" not in tensors(tmp_path / "out")


def head_loaded(path, gpu_path: bool):
    """lm_head.weight as transformers loads the model at ``path``: on a CPU it dequantizes every FP8 weight that has
    a scale; ``gpu_path`` takes the load path it takes on a GPU (no dequantizing: FP8Linear where it converts)."""
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    check = FineGrainedFP8HfQuantizer.validate_environment
    if gpu_path:  # (on a CPU it switches to dequantizing; the rest of the load path is the GPU's)
        FineGrainedFP8HfQuantizer.validate_environment = lambda self, *args, **kwargs: None
    try:
        model = load_model(path, torch.bfloat16)
    finally:
        FineGrainedFP8HfQuantizer.validate_environment = check
    return type(model.lm_head).__name__, model.lm_head.weight.detach()


@pytest.mark.parametrize("case", ["fp8", "fp8-head-converted", "bf16"])
def test_fp8_embeddings(tmp_path, case):
    """FP8 embeddings: the untied head is their decoded values in the model's dtype, since transformers does not
    convert the output head to FP8 (a plain Linear took the FP8 bytes as values and dropped the scale on its GPU
    load path); where the config's modules_to_not_convert leaves it converted, their stored bytes under its own name
    with its own scale. --dtype: their decoded values. transformers loads each as those values."""
    from factories import fp8_model
    from loraops.basemodel import BaseModel

    source = tiny_llama(tmp_path / "bf16", dtype=torch.bfloat16, tie=True)
    base = fp8_model(source, tmp_path / "fp8", modules=("embed_tokens", "q_proj"), block=(16, 16))
    if case == "fp8-head-converted":
        config = json.loads((base / "config.json").read_text())
        config["quantization_config"]["modules_to_not_convert"] = ["k_proj", "v_proj", "o_proj", "mlp"]
        (base / "config.json").write_text(json.dumps(config))
    adapter = formats.read_adapter(embedding_lora(source, tmp_path / "a"))
    dtype = "bf16" if case == "bf16" else None
    report = engine.merge(base, [(adapter, 1.0)], tmp_path / "out", dtype=dtype, progress=False)
    assert report.heads_untied == ["lm_head.weight"]
    assert report.fingerprint == BaseModel.open(tmp_path / "out").fingerprint()
    ours, stored = tensors(tmp_path / "out"), tensors(base)
    engine.merge(base, [], tmp_path / "plain", dtype="bf16", progress=False)
    decoded = tensors(tmp_path / "plain")[EMBED]  # the embeddings decoded, rounded to bf16
    if case == "fp8-head-converted":
        assert torch.equal(ours["lm_head.weight"].view(torch.uint8), stored[EMBED].view(torch.uint8))
        assert torch.equal(ours["lm_head.weight_scale_inv"], stored[f"{EMBED}_scale_inv"])
    else:
        assert torch.equal(ours["lm_head.weight"], decoded) and "lm_head.weight_scale_inv" not in ours
    if case != "bf16":
        assert not torch.equal(ours[f"{EMBED}_scale_inv"], stored[f"{EMBED}_scale_inv"])  # the embeddings re-encoded
    for gpu_path in (False, True):
        kind, head = head_loaded(tmp_path / "out", gpu_path)
        if kind == "Linear":  # FP8Linear keeps the FP8 bytes and the scale, checked above
            assert torch.equal(head, decoded), (case, gpu_path)
        else:
            assert case == "fp8-head-converted" and gpu_path and kind == "FP8Linear"


def test_a_saved_embedding_layer_reaches_the_untied_head(tmp_path, tied):
    """PEFT's saved layer under the embeddings' LoRA (save_embedding_layers), here not the base's values: PEFT loads
    it into the one weight the head reads, so the untied head is that layer (without the embeddings' delta)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(load_model(tied), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"],
                                                        init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.base_layer.weight.add_(0.1)
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    report = engine.merge(tied, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == ["lm_head.weight"]
    torch.testing.assert_close(tensors(tmp_path / "out")["lm_head.weight"], tensors(tied)[EMBED] + 0.1)
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), logits(adapted(tied, tmp_path / "a")),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stored_twice", [False, True])
def test_modules_to_save_with_ensure_weight_tying(tmp_path, tied, stored_twice):
    """modules_to_save=["embed_tokens"] with PEFT's ensure_weight_tying: PEFT wraps the head too and ties the two
    copies, saving the trained values under both names (lm_head.weight has no modules_to_save entry of its own).
    Both are read as replacements, and the merged model computes PEFT's adapted model (and PEFT's merge)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(load_model(tied), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                        modules_to_save=["embed_tokens"], init_lora_weights=False,
                                                        ensure_weight_tying=True))
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.modules_to_save["default"].weight.add_(0.05)
    model.save_pretrained(tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    assert sorted(adapter.full_tensors) == ["lm_head.weight", EMBED]
    expected = logits(adapted(tied, tmp_path / "a"))
    trained = tensors(tied)[EMBED] + 0.05
    if stored_twice:
        state = load_file(tied / "model.safetensors")
        save_file({**state, "lm_head.weight": state[EMBED].clone()}, str(tied / "model.safetensors"),
                  metadata={"format": "pt"})
    engine.merge(tied, [(adapter, 1.0)], tmp_path / "out", progress=False)
    merged = tensors(tmp_path / "out")
    torch.testing.assert_close(merged["lm_head.weight"], trained)
    torch.testing.assert_close(merged[EMBED], trained)
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(load_model(tied)), expected, atol=1e-2)


def saved_embeddings_adapter(base, folder):
    """PEFT's LoRA on q_proj with modules_to_save=["embed_tokens"] and ensure_weight_tying, saved to ``folder``; its
    weights file's tensors."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                modules_to_save=["embed_tokens"], init_lora_weights=False,
                                                ensure_weight_tying=True)).save_pretrained(folder)
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("targets", [["q_proj"], ["q_proj", "lm_head"]])
def test_a_lora_on_the_head_ensure_weight_tying_saves_whole_is_refused(tmp_path, tied, targets):
    """modules_to_save=["embed_tokens"] with ensure_weight_tying: PEFT saves the tied head whole too (lm_head.weight,
    its modules_to_tie, with no modules_to_save entry), so it loads no LoRA on it: one target_modules leaves out is
    left out (ensure_weight_tying made loraops skip that check), and one it lists fails PEFT's load (a TypeError: a
    ModulesToSaveWrapper around the LoRA layer). loraops read and merged the head's factors; refused in one line."""
    from peft import PeftModel

    state = saved_embeddings_adapter(tied, tmp_path / "a")
    weights, config = tmp_path / "a" / "adapter_model.safetensors", tmp_path / "a" / "adapter_config.json"
    assert "base_model.model.lm_head.weight" in state
    save_file({**state, "base_model.model.lm_head.lora_A.weight": torch.randn(4, 64),
               "base_model.model.lm_head.lora_B.weight": torch.randn(128, 4)}, str(weights))
    config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": targets}))
    if "lm_head" in targets:
        with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type .*lora"):
            PeftModel.from_pretrained(load_model(tied), tmp_path / "a")
    else:
        model = PeftModel.from_pretrained(load_model(tied), tmp_path / "a")
        assert not any("lm_head" in name and "lora_" in name for name, _ in model.named_parameters())
    with pytest.raises(InvalidInputError, match=r"module 'lm_head' has LoRA weights, but the config's "
                                                r"ensure_weight_tying saves it whole \(tied to a module "
                                                r"modules_to_save saves, its weight 'lm_head.weight' is in the file\) "
                                                r"and PEFT loads no LoRA on a module it saves whole"):
        formats.read_adapter(tmp_path / "a")


@pytest.mark.parametrize("stored_twice", [False, True])
def test_modules_to_save_on_the_embeddings(tmp_path, tied, stored_twice):
    """modules_to_save=["embed_tokens"]: PEFT wraps a copy of the embeddings and its head keeps reading the shared
    base weight, so the merge unties the head (the base's values) as for a LoRA on the embeddings alone."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(load_model(tied), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                        modules_to_save=["embed_tokens"], init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.modules_to_save["default"].weight.add_(0.05)
    model.save_pretrained(tmp_path / "a")
    expected = logits(adapted(tied, tmp_path / "a"))
    base = tensors(tied)[EMBED]
    if stored_twice:
        state = load_file(tied / "model.safetensors")
        save_file({**state, "lm_head.weight": base.clone()}, str(tied / "model.safetensors"), metadata={"format": "pt"})
    report = engine.merge(tied, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == ["lm_head.weight"]
    assert torch.equal(tensors(tmp_path / "out")["lm_head.weight"], base)
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), expected, atol=1e-5, rtol=1e-5)
    from loraops.basemodel import BaseModel
    from loraops.check import check

    model = BaseModel.open(tied)
    # (stored twice, the head the merge unties was not listed: check.untied_stored_head)
    assert check(formats.read_adapter(tmp_path / "a"), model.tensors, config=model.config).tied_heads == ["lm_head"]


def test_check_lists_a_saved_copy_of_a_tied_head_the_merge_unties(tmp_path, tied):
    """modules_to_save=["lm_head"] on a tied base: PEFT wraps a copy of the head (the embeddings keep the base
    weight), which the merge writes untied; check lists that head among its tied_heads, as merge's heads_untied does
    (it listed only heads changed by a LoRA or through their embeddings)."""
    from loraops.basemodel import BaseModel

    adapter = formats.read_adapter(peft_adapter(tied, tmp_path / "a", r=4, target_modules=["q_proj"],
                                                modules_to_save=["lm_head"]))
    model = BaseModel.open(tied)
    assert check.check(adapter, model.tensors, config=model.config).tied_heads == ["lm_head"]
    assert engine.merge(tied, [(adapter, 1.0)], tmp_path / "out", progress=False).heads_untied == ["lm_head.weight"]


@pytest.mark.parametrize("targets", [["c_attn"], ["wte"]])
def test_a_checkpoint_saved_from_the_bare_model(tmp_path, targets):
    """GPT-2's own checkpoint (and BLOOM's) is saved from the bare model: wte.weight, h.0.…, no transformer. prefix,
    which transformers adds on load. A PEFT LoRA (transformer.h.0.attn.c_attn, transformer.wte) binds to it, and one
    on the embeddings alone unties the head as lm_head.weight beside them."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    from factories import tiny_gpt2

    source = tiny_gpt2(tmp_path / "source")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((source / "config.json").read_bytes())
    save_file({n.removeprefix("transformer."): t for n, t in load_file(source / "model.safetensors").items()},
              str(bare / "model.safetensors"), metadata={"format": "pt"})
    torch.manual_seed(1)
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(source), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True, init_lora_weights=False))
    model.save_pretrained(tmp_path / "a")
    report = engine.merge(bare, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == (["lm_head.weight"] if targets == ["wte"] else [])
    torch.testing.assert_close(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "out")), logits(model),
                               atol=1e-5, rtol=1e-5)


def test_a_head_in_an_adapter_that_says_fan_in_fan_out(tmp_path):
    """PEFT saves one fan_in_fan_out per adapter, and loraops writes true for a GPT-2 LoRA on its Conv1D c_attn and
    its nn.Linear lm_head (`export --base`). Read back, lm_head's module says transposed (in×out) until bound; bound to
    the tied base, which does not store the head, it is found by its embeddings as an out×in Linear (as PEFT, which
    sets fan_in_fan_out false for an nn.Linear), not refused as "not in base"."""
    from click.testing import CliRunner
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2LMHeadModel

    from factories import tiny_gpt2
    from loraops.cli import main

    base = tiny_gpt2(tmp_path / "base")
    torch.manual_seed(1)
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True, init_lora_weights=False))
    model.save_pretrained(tmp_path / "a")
    for args in (["base", "add", base, "--name", "gpt2"],
                 ["export", tmp_path / "a", "--format", "peft", "-o", tmp_path / "exported", "--base", "gpt2"]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "exported" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    expected = logits(model)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base),
                                                                tmp_path / "exported")), expected)
    report = engine.merge(base, [(formats.read_adapter(tmp_path / "exported"), 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == ["lm_head.weight"]
    torch.testing.assert_close(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "out")), expected,
                               atol=1e-5, rtol=1e-5)


def test_sharded_index_counts_the_untied_head(tmp_path):
    """A sharded tied model: the head goes into its embeddings' shard and the index lists it; the index's
    total_parameters (transformers' count) grows by it, as transformers counts the merged model."""
    from safetensors import safe_open

    base = tiny_llama(tmp_path / "tied", tie=True, shard_size="40KB")
    adapter = formats.read_adapter(embedding_lora(base, tmp_path / "a"))
    engine.merge(base, [(adapter, 1.0)], tmp_path / "out", progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["lm_head.weight"]
    assert shard == index["weight_map"][EMBED]
    with safe_open(str(tmp_path / "out" / shard), "pt") as f:
        assert "lm_head.weight" in f.keys()
    assert index["metadata"]["total_parameters"] == load_model(tmp_path / "out").num_parameters()


# a tiny config for every class of TIED_HEAD_OF_CLASS: these sizes where the family's config has the attribute
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=128,
            max_position_embeddings=64, embedding_size=16, d_model=32, n_layer=1, n_head=4, n_layers=1, n_heads=4,
            emb_dim=32, d_inner=64, n_embd=32, num_heads=4, head_dim=8, num_key_value_heads=4, block_sizes=[1],
            attention_window=[4], dim=32, hidden_dim=64, context_length=64, attention_hidden_size=32)
TINY_FAMILY = {"esm": dict(pad_token_id=1, mask_token_id=2), "eurobert": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
               "modernbert": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                                  global_attn_every_n_layers=1, local_attention=8),
               "modernbert-decoder": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, local_attention=8),
               "funnel": dict(num_hidden_layers=None), "squeezebert": dict(embedding_size=32),
               "rwkv": dict(num_hidden_layers=2), "xlnet": dict(max_position_embeddings=None),
               "whisper": dict(encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                               encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
                               max_target_positions=16, pad_token_id=1, bos_token_id=2, eos_token_id=3,
                               decoder_start_token_id=2)}
# the multimodal wrappers' towers, as tiny
_TEXT = {k: TINY[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                              "max_position_embeddings")}
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
               patch_size=16)
TINY_FAMILY.update({
    "blip": dict(text_config=dict(_TEXT, encoder_hidden_size=32, bos_token_id=1, eos_token_id=2, sep_token_id=3),
                 vision_config=_VISION, projection_dim=32, image_text_hidden_size=32),
    "bridgetower": dict(text_config=_TEXT, vision_config=dict(hidden_size=64, num_hidden_layers=1, image_size=32,
                                                              patch_size=16)),
    "ctrl": dict(dff=64, n_positions=64),
    "idefics": dict(vision_config=dict(embed_dim=32, image_size=28, patch_size=14, num_hidden_layers=1,
                                       num_attention_heads=4, intermediate_size=64),
                    perceiver_config=dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=4,
                                          resampler_head_dim=8)),
    "luke": dict(entity_vocab_size=64, entity_emb_size=16),
    "csm": dict(num_codebooks=4, text_vocab_size=64, pad_token_id=0, codebook_pad_token_id=127, codebook_eos_token_id=0,
                bos_token_id=1, audio_token_id=2, audio_eos_token_id=3,
                depth_decoder_config=dict(num_codebooks=4, backbone_hidden_size=32, max_position_embeddings=8,
                                          **{k: TINY[k] for k in ("hidden_size", "intermediate_size", "vocab_size",
                                                                  "num_hidden_layers", "num_attention_heads",
                                                                  "num_key_value_heads", "head_dim")}),
                codec_config=dict(model_type="mimi", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=4, head_dim=8, codebook_size=32,
                                  codebook_dim=32, num_filters=4, upsampling_ratios=[2, 2], num_residual_layers=1,
                                  num_quantizers=4, num_semantic_quantizers=1, upsample_groups=32, sliding_window=8,
                                  max_position_embeddings=64)),
    "modernvbert": dict(text_config=dict(_TEXT, **TINY_FAMILY["modernbert"]), vision_config=_VISION,
                        pixel_shuffle_factor=2, image_token_id=120),
    "ultravbert": dict(text_config=dict(_TEXT, num_key_value_heads=4, head_dim=8, layer_types=["full_attention"],
                                        prediction_head_size=32, sliding_window=8),
                       vision_config=_VISION, pixel_shuffle_factor=2, image_token_id=120),
})
_PIXELS = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
MORE_INPUTS = {"BlipForConditionalGeneration": dict(pixel_values=_PIXELS),
               "BridgeTowerForMaskedLM": dict(pixel_values=_PIXELS),
               "IdeficsForVisionText2Text": dict(pixel_values=_PIXELS[:, None, :, :28, :28],
                                                 image_attention_mask=torch.ones(1, 8, 1, dtype=torch.long)),
               "LukeForMaskedLM": dict(entity_ids=torch.tensor([[5, 9, 17]]), entity_position_ids=torch.tensor([[[1, -1], [2, 3], [5, -1]]]))}
NO_LORA_ON_EMBEDDINGS = {"IBertForMaskedLM"}  # (PEFT cannot wrap its QuantEmbedding, nor its QuantLinears)
NEEDS_MORE_INPUTS = {"LxmertForPreTraining", "ViltForMaskedLM", "VisualBertForRegionToPhraseAlignment",
                     "BlipForQuestionAnswering",  # visual features: checked by their weights alone
                     "CsmForConditionalGeneration",  # audio frames: test_csm_ties_its_backbone_audio_embeddings_…
                     "WhisperForConditionalGeneration"}  # and tests/test_untied_whisper.py


def tiny(cls):
    family = cls.config_class.model_type
    defaults = cls.config_class()
    sizes = {k: v for k, v in {**TINY, **TINY_FAMILY.get(family, {})}.items()
             if (hasattr(defaults, k) or k in TINY_FAMILY.get(family, {})) and v is not None}
    torch.manual_seed(0)
    return cls._from_config(cls.config_class(**sizes, tie_word_embeddings=True))


def saved_with_biases(cls, path):
    """A tiny ``cls`` saved to ``path``, its biases random (not zeros: a lost or stale bias shows)."""
    model = tiny(cls)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()
    model.save_pretrained(path)


# (FSMT's keys are its FSMTModel's, and it ties its encoder's lookup too: test_tied_encoder_decoder.py)
@pytest.mark.parametrize("cls_name", sorted(set(TIED_HEAD_OF_CLASS) - {"FSMTForConditionalGeneration"}))
def test_a_tied_head_named_by_its_class_is_untied(tmp_path, cls_name):
    """A LoRA on the word embeddings alone of a model whose head TIED_HEAD_OF_CLASS names (masked LMs, BERT-style
    causal LMs, GPT-1, XLNet, RWKV, …): the head, named as transformers ties it, is written as the base's embeddings,
    with its decoder's bias where transformers ties that too; the merged model loads without missing or unexpected
    keys and computes what PEFT's adapted model computes (which differs from the base's)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    cls = getattr(transformers, cls_name)
    tied = TIED_HEAD_OF_CLASS[cls_name]
    keys = cls._tied_weights_keys
    assert keys[tied.head].removesuffix("$") == tied.embeddings  # (a regex: IBert's ends with $)
    assert {k: v for k, v in keys.items() if k.endswith(".bias")} == dict([tied.tied_bias()] if tied.bias else [])
    saved_with_biases(cls, tmp_path / "base")
    torch.manual_seed(1)
    target = tied.embeddings.removesuffix(".weight")  # (LUKE's entity_embeddings.entity_embeddings: the whole path)
    if cls_name in NO_LORA_ON_EMBEDDINGS:  # a copy of them trained instead, which the head does not read either
        adapted_model = get_peft_model(cls.from_pretrained(tmp_path / "base"), LoraConfig(
            r=4, lora_alpha=8, target_modules=["lm_head.dense"], modules_to_save=[target], init_lora_weights=False)).eval()
        with torch.no_grad():
            adapted_model.get_submodule(target).modules_to_save["default"].weight.add_(0.05)
    else:
        adapted_model = get_peft_model(cls.from_pretrained(tmp_path / "base"), LoraConfig(
            r=4, lora_alpha=8, target_modules=[target], init_lora_weights=False)).eval()
    adapted_model.save_pretrained(tmp_path / "a")
    report = engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out",
                          progress=False)
    assert report.heads_untied == [tied.head]
    merged, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    base = cls.from_pretrained(tmp_path / "base")
    weights = merged.state_dict()
    assert torch.equal(weights[tied.head], base.state_dict()[tied.embeddings])
    assert not torch.equal(weights[tied.embeddings], base.state_dict()[tied.embeddings])
    merged.tie_weights()  # as its config says: untied (ViLT's config cannot say so: docs/architectures.md)
    assert torch.equal(merged.state_dict()[tied.head], weights[tied.head]) is (cls_name != "ViltForMaskedLM")
    if cls_name in NEEDS_MORE_INPUTS:
        return
    expected = class_logits(cls_name, adapted_model)
    torch.testing.assert_close(class_logits(cls_name, merged), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(class_logits(cls_name, base), expected, atol=1e-3)


def class_logits(cls_name, model):
    """The logits of a model of a TIED_HEAD_OF_CLASS class (or PEFT's model of one) on TOKENS, with the inputs it
    needs besides (MORE_INPUTS); LUKE's of its entity head."""
    model = model.eval()
    if hasattr(model.base_model, "set_default_language"):  # X-MOD's adapters
        model.base_model.set_default_language("en_XX")
    with torch.no_grad():
        found = model(input_ids=TOKENS[:, :8] % 100 + 3, **MORE_INPUTS.get(cls_name, {}))
    return found.entity_logits if cls_name == "LukeForMaskedLM" else \
        found.logits if hasattr(found, "logits") else found.prediction_logits


@pytest.mark.parametrize("cls_name", ["OpenAIGPTLMHeadModel", "BertForMaskedLM"])
def test_a_class_checkpoint_saved_from_the_bare_model(tmp_path, cls_name):
    """GPT-1's own checkpoint is saved from the bare model (tokens_embed.weight, h.0.…: no transformer. prefix, which
    transformers adds on load): a LoRA on its embeddings alone unties the head TIED_HEAD_OF_CLASS names, beside them
    (and BERT's decoder bias beside its parent's)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    cls = getattr(transformers, cls_name)
    tied = TIED_HEAD_OF_CLASS[cls_name]
    prefix = tied.embeddings.partition(".")[0] + "."
    tiny(cls).save_pretrained(tmp_path / "source")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((tmp_path / "source" / "config.json").read_bytes())
    save_file({n.removeprefix(prefix): t for n, t in load_file(tmp_path / "source" / "model.safetensors").items()},
              str(bare / "model.safetensors"), metadata={"format": "pt"})
    torch.manual_seed(1)
    target = tied.embeddings.removesuffix(".weight").rpartition(".")[2]
    adapted_model = get_peft_model(cls.from_pretrained(tmp_path / "source"), LoraConfig(
        r=4, lora_alpha=8, target_modules=[target], init_lora_weights=False)).eval()
    adapted_model.save_pretrained(tmp_path / "a")
    merged_as_adapted(cls, bare, formats.read_adapter(tmp_path / "a"), adapted_model, tied.head, tmp_path / "out")


def merged_as_adapted(cls, base, adapter, adapted_model, head, out):
    """Merge ``adapter`` into ``base``: ``head`` comes out untied, the merged model loads with no missing or unexpected
    keys and computes what PEFT's ``adapted_model`` computes, also once tied again as its config says (transformers
    leaves a head stored apart with other values untied on load, whatever the config, but ties it by the config in
    tie_weights(): after resize_token_embeddings, …)."""
    assert engine.merge(base, [(adapter, 1.0)], out, progress=False).heads_untied == [head]
    merged, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = class_logits(cls.__name__, adapted_model)
    torch.testing.assert_close(class_logits(cls.__name__, merged), expected, atol=1e-5, rtol=1e-5)
    merged.tie_weights()
    torch.testing.assert_close(class_logits(cls.__name__, merged), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls_name", ["DebertaForMaskedLM", "DebertaV2ForMaskedLM"])
def test_deberta_without_its_legacy_head_has_no_head_to_untie(tmp_path, cls_name):
    """DeBERTa's masked LM with legacy: false (the head of its original checkpoints, lm_predictions) has no decoder
    weight: it multiplies by the embeddings' own. No head is written (transformers would call it unexpected and
    still read the embeddings); the embeddings take the delta, as PEFT's merge does."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    cls = getattr(transformers, cls_name)
    model = tiny(cls)
    model.config.legacy = False
    cls._from_config(model.config).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    get_peft_model(cls.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["word_embeddings"], init_lora_weights=False)).save_pretrained(tmp_path / "a")
    report = engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out",
                          progress=False)
    assert report.heads_untied == []
    merged, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    peft_merged = PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "base"), tmp_path / "a").merge_and_unload()
    tokens = TOKENS[:, :8] % 100 + 3
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(tokens).logits, peft_merged.eval()(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls_name, targets", [("ModernBertForMaskedLM", ["decoder"]), ("XLNetLMHeadModel", ["lm_loss"]),
                                               ("OpenAIGPTLMHeadModel", ["lm_head", "tokens_embed"])])
def test_a_lora_on_a_head_named_by_its_class(tmp_path, cls_name, targets):
    """A LoRA on a tied head that TIED_HEAD_OF_CLASS names (not lm_head beside embed_tokens): the head is found
    by its class's embeddings, written untied with its delta, and the merged model computes PEFT's adapted model."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from loraops.basemodel import BaseModel
    from loraops.check import check

    cls = getattr(transformers, cls_name)
    tied = TIED_HEAD_OF_CLASS[cls_name]
    tiny(cls).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    adapted_model = get_peft_model(cls.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)).eval()
    adapted_model.save_pretrained(tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    base = BaseModel.open(tmp_path / "base")
    assert check(adapter, base.tensors, config=base.config).tied_heads == [tied.head.removesuffix(".weight")]
    merged_as_adapted(cls, tmp_path / "base", adapter, adapted_model, tied.head, tmp_path / "out")


def test_ensure_weight_tying_on_a_head_named_by_its_class(tmp_path):
    """BioGPT's embed_tokens in modules_to_save with ensure_weight_tying: PEFT saves the tied copy as
    output_projection.weight (the head its class names), read as the head's replacement."""
    from peft import LoraConfig, get_peft_model
    from transformers import BioGptForCausalLM

    tiny(BioGptForCausalLM).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    model = get_peft_model(BioGptForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"], init_lora_weights=False,
        ensure_weight_tying=True)).eval()
    with torch.no_grad():
        model.base_model.model.biogpt.embed_tokens.modules_to_save["default"].weight.add_(0.05)
    model.save_pretrained(tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    assert sorted(adapter.full_tensors) == ["biogpt.embed_tokens.weight", "output_projection.weight"]
    merged_as_adapted(BioGptForCausalLM, tmp_path / "base", adapter, model, "output_projection.weight", tmp_path / "out")


@pytest.mark.parametrize("bias", ["none", "all"])
def test_a_decoder_stored_twice_is_untied_with_its_bias(tmp_path, bias):
    """A masked LM whose exporter saved the tied decoder too (byte-identical) but its bias only under the parent
    (cls.predictions.bias): untying the decoder unties its bias as well, else transformers loads the untied model
    with a newly initialized decoder bias; trained (bias="all"), with the trained values."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForMaskedLM

    model = tiny(BertForMaskedLM)
    with torch.no_grad():
        model.cls.predictions.bias.normal_()
    model.save_pretrained(tmp_path / "base")
    state = load_file(tmp_path / "base" / "model.safetensors")
    assert "cls.predictions.decoder.bias" not in state
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    save_file(state, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    torch.manual_seed(1)
    adapted_model = get_peft_model(BertForMaskedLM.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["word_embeddings"], init_lora_weights=False, bias=bias)).eval()
    with torch.no_grad():
        adapted_model.cls.predictions.bias.add_(0.5 if bias == "all" else 0)  # trained: saved under both names
    adapted_model.save_pretrained(tmp_path / "a")
    merged_as_adapted(BertForMaskedLM, tmp_path / "base", formats.read_adapter(tmp_path / "a"), adapted_model,
                      "cls.predictions.decoder.weight", tmp_path / "out")


@pytest.mark.parametrize("cls_name, bias, targets", [
    ("BertForMaskedLM", "all", ["query", "value"]), ("RobertaForMaskedLM", "all", ["query"]),
    ("BertForMaskedLM", "all", ["word_embeddings"]), ("BertForMaskedLM", "lora_only", ["decoder"]),
    ("RobertaForMaskedLM", "lora_only", ["decoder", "query"])])
def test_a_trained_tied_decoder_bias(tmp_path, cls_name, bias, targets):
    """PEFT's bias="all" saves a masked LM's tied decoder bias under both names (cls.predictions.bias and
    cls.predictions.decoder.bias: one parameter), bias="lora_only" on the decoder under the decoder's; the base stores
    only the parent. Both bind to it: a tied merge matches PEFT's merge, and an untied head (a LoRA on the decoder or
    on the embeddings alone) takes the trained bias, so the merged model computes PEFT's adapted model."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    cls = getattr(transformers, cls_name)
    tied = TIED_HEAD_OF_CLASS[cls_name]
    parent = tied.head.removesuffix(".decoder.weight") + ".bias"
    saved_with_biases(cls, tmp_path / "base")
    torch.manual_seed(1)
    adapted_model = get_peft_model(cls.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, bias=bias, init_lora_weights=False)).eval()
    with torch.no_grad():
        for name, param in adapted_model.named_parameters():
            if param.requires_grad and name.endswith("bias"):
                param.add_(0.5)  # trained: each key PEFT saves holds it
    adapted_model.save_pretrained(tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    head_untied = targets != ["query", "value"] and targets != ["query"]
    report = engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == ([tied.head] if head_untied else [])
    merged, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    trained = adapted_model.get_output_embeddings().bias if bias == "all" else \
        adapted_model.get_output_embeddings().base_layer.bias
    torch.testing.assert_close(merged.get_output_embeddings().bias, trained, atol=0, rtol=0)
    tokens = TOKENS[:, :8] % 100 + 3
    with torch.no_grad():
        expected = adapted_model(input_ids=tokens).logits
        torch.testing.assert_close(merged.eval()(input_ids=tokens).logits, expected, atol=1e-5, rtol=1e-5)
        if not head_untied:
            peft_merged = PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "base"), tmp_path / "a").merge_and_unload()
            torch.testing.assert_close(load_file(tmp_path / "out" / "model.safetensors")[parent],
                                       peft_merged.state_dict()[parent], atol=0, rtol=0)
    # written back as PEFT (bound to the base or not), PEFT loads it to the same model: the trained biases of layers
    # without a LoRA go as bias="all" keys, not as modules_to_save (whose weights PEFT would look for)
    from loraops.basemodel import BaseModel
    from loraops.check import bind

    for label, written in (("unbound", adapter), ("bound", bind(adapter, BaseModel.open(tmp_path / "base").tensors))):
        again = PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "base"),
                                          formats.write_adapter(written, tmp_path / label)).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=tokens).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_tied_decoder_bias_bound_is_written_back_as_peft_saved_it(tmp_path):
    """Bound to the base's parent bias, a lora_only decoder bias is written back under the decoder's wrapped layer
    (the key PEFT loads), and two keys of the one parameter with different values are refused."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForMaskedLM

    from loraops.basemodel import BaseModel
    from loraops.check import bind
    from loraops.errors import MismatchError

    tiny(BertForMaskedLM).save_pretrained(tmp_path / "base")
    manifest = BaseModel.open(tmp_path / "base").tensors
    get_peft_model(BertForMaskedLM.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["decoder"], bias="lora_only")).save_pretrained(tmp_path / "a")
    bound = bind(formats.read_adapter(tmp_path / "a"), manifest)
    assert list(bound.full_tensors) == ["cls.predictions.bias"]
    formats.write(bound, tmp_path / "again", "peft")
    assert "base_model.model.cls.predictions.decoder.base_layer.bias" in load_file(tmp_path / "again" / "adapter_model.safetensors")

    get_peft_model(BertForMaskedLM.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["query"], bias="all")).save_pretrained(tmp_path / "b")
    weights = load_file(tmp_path / "b" / "adapter_model.safetensors")
    weights["base_model.model.cls.predictions.decoder.bias"] += 1
    save_file(weights, str(tmp_path / "b" / "adapter_model.safetensors"))
    with pytest.raises(MismatchError, match="'cls.predictions.decoder.bias' and 'cls.predictions.bias' are one tensor "
                                            "of the base"):
        bind(formats.read_adapter(tmp_path / "b"), manifest)


@pytest.mark.registry_backend
def test_a_tied_decoder_bias_registers_with_its_base(tmp_path):
    """`register --base` reads the adapter's headers only (values=False, meta tensors): a bias="all" masked-LM
    adapter, which saves the tied decoder bias under both names, is recorded against its base (it was a traceback:
    the two keys' values compared on the meta device); `show` lists it linked."""
    from click.testing import CliRunner
    from peft import LoraConfig, get_peft_model
    from transformers import BertForMaskedLM

    from loraops.basemodel import BaseModel
    from loraops.check import bind
    from loraops.cli import main

    saved_with_biases(BertForMaskedLM, tmp_path / "base")
    get_peft_model(BertForMaskedLM.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["query"], bias="all")).save_pretrained(tmp_path / "a")
    headers = bind(formats.read_adapter(tmp_path / "a", values=False), BaseModel.open(tmp_path / "base").tensors)
    assert "cls.predictions.bias" in headers.full_tensors and "cls.predictions.decoder.bias" not in headers.full_tensors
    for args in (["base", "add", tmp_path / "base", "--name", "bert"],
                 ["register", tmp_path / "a", "--name", "a", "--base", "bert"]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    shown = json.loads(CliRunner().invoke(main, ["show", "a", "--json"]).output)
    assert shown["base"]["name"] == "bert"


@pytest.mark.parametrize("cls_name", sorted(c for c, t in TIED_HEAD_OF_CLASS.items() if c not in NEEDS_MORE_INPUTS and (
    not is_head(t.head) or not t.embeddings.endswith(INPUT_EMBEDDINGS)) and c != "FSMTForConditionalGeneration"))
def test_a_head_only_its_class_names_stored_twice(tmp_path, cls_name):
    """A tied model saved with its head too (byte-identical), a head or embeddings only TIED_HEAD_OF_CLASS names
    (XLNet's lm_loss and word_embedding, ModernBERT's decoder and tok_embeddings, RWKV's head, …): a LoRA on the
    embeddings alone unties them as for lm_head — the head copy keeps the base's values and config.json says
    tie_word_embeddings: false, so transformers computes PEFT's adapted model, also after tie_weights()."""
    import transformers
    from peft import LoraConfig, get_peft_model

    cls = getattr(transformers, cls_name)
    tied = TIED_HEAD_OF_CLASS[cls_name]
    tiny(cls).save_pretrained(tmp_path / "base")
    state = load_file(tmp_path / "base" / "model.safetensors")
    assert tied.head not in state
    state[tied.head] = state[tied.embeddings].clone()
    save_file(state, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    torch.manual_seed(1)
    adapted_model = get_peft_model(cls.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=[tied.embeddings.removesuffix(".weight")], init_lora_weights=False)).eval()
    adapted_model.save_pretrained(tmp_path / "a")
    merged_as_adapted(cls, tmp_path / "base", formats.read_adapter(tmp_path / "a"), adapted_model, tied.head,
                      tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")[tied.head], state[tied.embeddings])


_LLAVA = dict(text_config=dict(_TEXT, model_type="llama", num_key_value_heads=4), image_token_index=120,
              vision_config=dict(_VISION, model_type="clip_vision_model", projection_dim=32))


@pytest.mark.parametrize("cls_name, top, text, head, target", [
    ("BlipForConditionalGeneration", False, True, "text_decoder.cls.predictions.decoder.weight",
     "text_decoder.bert.embeddings.word_embeddings"),
    ("BlipForConditionalGeneration", True, False, "text_decoder.cls.predictions.decoder.weight",
     "text_decoder.bert.embeddings.word_embeddings"),
    ("LlavaForConditionalGeneration", False, True, "language_model.lm_head.weight", "embed_tokens")])
def test_a_composite_model_tied_by_its_text_config(tmp_path, cls_name, top, text, head, target):
    """A composite model's config.json says tie_word_embeddings at its top level and in its text config, and
    transformers ties the head when either says so: BLIP's text decoder is a model of its own that ties by its
    text_config (the wrapper by its top level); LLaVA's config takes a text_config's true up (a save from before
    transformers 5 kept it there). A LoRA on the word embeddings alone unties the head whichever level says it is
    tied; the merged config says false at both."""
    import transformers
    from peft import LoraConfig, get_peft_model

    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    sizes = TINY_FAMILY["blip"] if cls_name.startswith("Blip") else _LLAVA
    cls._from_config(cls.config_class(**sizes, tie_word_embeddings=True)).save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["tie_word_embeddings"], config["text_config"]["tie_word_embeddings"] = top, text
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    assert head not in load_file(tmp_path / "base" / "model.safetensors")
    torch.manual_seed(1)
    adapted_model = get_peft_model(cls.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=[target], init_lora_weights=False)).eval()
    adapted_model.save_pretrained(tmp_path / "a")
    merged_as_adapted(cls, tmp_path / "base", formats.read_adapter(tmp_path / "a"), adapted_model, head,
                      tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False


def test_an_encoder_decoder_tied_by_its_decoder_config(tmp_path):
    """A VisionEncoderDecoderModel is saved with tie_word_embeddings false at its top level (its __init__ sets it) and
    its GPT-2 decoder's own config true: transformers ties the decoder's head by that sub-config (the decoder is a
    PreTrainedModel of its own). With the head stored twice, a LoRA on the decoder's embeddings reaches both copies,
    as in PEFT's merge_and_unload (an encoder-decoder model is not untied), so the merged model loads tied; changing
    one copy left the head the base's (transformers does not tie copies that differ)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, ViTConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    torch.manual_seed(0)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=16,
                  patch_size=8),
        GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32, add_cross_attention=True,
                   is_decoder=True), decoder_start_token_id=0, pad_token_id=0)
    VisionEncoderDecoderModel(config).save_pretrained(tmp_path / "base")
    saved = json.loads((tmp_path / "base" / "config.json").read_text())
    assert (saved["tie_word_embeddings"], saved["decoder"]["tie_word_embeddings"]) == (False, True)
    state = load_file(tmp_path / "base" / "model.safetensors")
    save_file({**state, "decoder.lm_head.weight": state["decoder.transformer.wte.weight"].clone()},
              str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    torch.manual_seed(1)
    get_peft_model(VisionEncoderDecoderModel.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["wte"], init_lora_weights=False)).save_pretrained(tmp_path / "a")

    def outputs(model):
        with torch.no_grad():
            return model.eval()(pixel_values=_PIXELS[:, :, :16, :16], decoder_input_ids=TOKENS[:, :6] % 64).logits

    expected = outputs(PeftModel.from_pretrained(VisionEncoderDecoderModel.from_pretrained(tmp_path / "base"),
                                                 tmp_path / "a").merge_and_unload())
    engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    merged = tensors(tmp_path / "out")
    assert torch.equal(merged["decoder.lm_head.weight"], merged["decoder.transformer.wte.weight"])
    torch.testing.assert_close(outputs(VisionEncoderDecoderModel.from_pretrained(tmp_path / "out")), expected,
                               atol=1e-5, rtol=1e-5)


def csm_logits(model):
    """The backbone's logits on audio frames (which read the backbone's audio embeddings) and the depth decoder's on
    codebook tokens (which read its own embeddings)."""
    frames = torch.randint(0, 32, (1, 5, 4), generator=torch.Generator().manual_seed(0))
    model = model.eval()
    with torch.no_grad():
        backbone = model(input_ids=frames).logits
        depth = model.get_submodule("depth_decoder")(input_ids=frames[:, 0], backbone_last_hidden_state=torch.ones(1, 32)).logits
    return backbone, depth


@pytest.mark.parametrize("target", ["depth_decoder.model.embed_tokens", "backbone_model.embed_tokens.embed_audio_tokens"])
def test_csm_ties_its_backbone_audio_embeddings_to_the_depth_decoder(tmp_path, target):
    """CSM ties no output head: its _tied_weights_keys tie the backbone's audio embeddings to the depth decoder's
    embeddings (its lm_head is its own, the depth decoder's head a codebooks_head parameter), by
    tie_codebooks_embeddings (its config ignores tie_word_embeddings, which CSM's own checkpoints save false). A LoRA
    on either changes that one's lookup only in PEFT's model, so the merge writes the backbone's audio embeddings
    untied (not a depth_decoder.lm_head the model does not have) and says tie_codebooks_embeddings: false."""
    from peft import LoraConfig, get_peft_model
    from transformers import CsmForConditionalGeneration

    head = "backbone_model.embed_tokens.embed_audio_tokens.weight"
    assert CsmForConditionalGeneration._tied_weights_keys == {head: "depth_decoder.model.embed_tokens.weight"}
    tiny(CsmForConditionalGeneration).save_pretrained(tmp_path / "base")
    assert head not in load_file(tmp_path / "base" / "model.safetensors")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["tie_codebooks_embeddings"] is True
    (tmp_path / "base" / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=False)))
    torch.manual_seed(1)
    adapted_model = get_peft_model(CsmForConditionalGeneration.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=[target], init_lora_weights=False)).eval()
    adapted_model.save_pretrained(tmp_path / "a")
    report = engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out",
                          progress=False)
    assert report.heads_untied == [head]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_codebooks_embeddings"] is False
    merged, info = CsmForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = csm_logits(adapted_model)
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(csm_logits(
        CsmForConditionalGeneration.from_pretrained(tmp_path / "base")), expected))
    for got, want in zip(csm_logits(merged), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    merged.tie_weights()
    for got, want in zip(csm_logits(merged), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


_INSTRUCTBLIP_T5 = dict(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                       patch_size=8),
    qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                        vocab_size=128, encoder_hidden_size=32),
    text_config=dict(model_type="t5", d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8, vocab_size=128),
    num_query_tokens=4, image_token_index=120)


def instructblip_logits(model):
    # (BLIP-2 has no Q-Former text input)
    qformer = {"qformer_input_ids": TOKENS[:, :6] % 100 + 3} if model.config.model_type == "instructblip" else {}
    with torch.no_grad():
        return model.eval()(pixel_values=_PIXELS[:, :, :16, :16], **qformer,
                            input_ids=torch.cat([torch.full((1, 4), 120), TOKENS[:, :6] % 100 + 3], 1),
                            decoder_input_ids=TOKENS[:, 6:11] % 100 + 3).logits


@pytest.mark.parametrize("model", ["instructblip", "blip-2"])
@pytest.mark.parametrize("scaling", ["saved", "derived", "saved off"])
def test_a_t5_text_config_untied_keeps_its_output_scaling(tmp_path, scaling, model):
    """InstructBLIP or BLIP-2 with a T5 language model, its head tied to language_model.shared: T5's config scales the
    decoder's output by d_model**-0.5 when tied, read from tie_word_embeddings where the config does not say
    scale_decoder_outputs (saved before transformers 5). A LoRA on the head unties it; the merged config says the
    scaling as the base's config read it, so the merged model computes what PEFT's merge_and_unload of the head
    untied in memory computes, and what PEFT's adapted model computes. ("saved off": a T5 made with
    tie_word_embeddings false, as T5 v1.1 and FLAN-T5 are, which transformers 5 saves tied, its scaling off.)
    BLIP-2's config copies the T5's is_encoder_decoder: true to its top level; it was refused as an encoder-decoder
    model (which check did not say)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, InstructBlipConfig,
                              InstructBlipForConditionalGeneration)

    from loraops.basemodel import BaseModel

    cls, config_cls = ((InstructBlipForConditionalGeneration, InstructBlipConfig) if model == "instructblip"
                       else (Blip2ForConditionalGeneration, Blip2Config))
    torch.manual_seed(0)
    text_config = {**_INSTRUCTBLIP_T5["text_config"], **({"tie_word_embeddings": False} if scaling == "saved off" else {})}
    cls._from_config(config_cls(**{**_INSTRUCTBLIP_T5, "text_config": text_config})).save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config.get("is_encoder_decoder", False) is (model == "blip-2")
    scales = scaling != "saved off"
    assert (config["text_config"]["tie_word_embeddings"], config["text_config"]["scale_decoder_outputs"]) == (True, scales)
    if scaling == "derived":
        del config["text_config"]["scale_decoder_outputs"]
        (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    adapted_model = get_peft_model(cls.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q", "language_model.lm_head"], init_lora_weights=False)).eval()
    adapted_model.save_pretrained(tmp_path / "a")
    untied_in_memory = cls.from_pretrained(tmp_path / "base")
    head = untied_in_memory.language_model.lm_head
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    expected = instructblip_logits(PeftModel.from_pretrained(untied_in_memory, tmp_path / "a").merge_and_unload())
    torch.testing.assert_close(instructblip_logits(adapted_model), expected, atol=1e-5, rtol=1e-5)

    base = BaseModel.open(tmp_path / "base")
    found = check.check(formats.read_adapter(tmp_path / "a"), base.tensors, config=base.config)
    assert found.ok and found.tied_heads == ["language_model.lm_head"]
    report = engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out",
                          progress=False)
    assert report.heads_untied == ["language_model.lm_head.weight"]
    merged, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(instructblip_logits(merged), expected, atol=1e-5, rtol=1e-5)
    text = json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]
    assert (text["tie_word_embeddings"], text["scale_decoder_outputs"]) == (False, scales)


def t5_logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS[:, :6] % 100 + 3, decoder_input_ids=TOKENS[:, 6:11] % 100 + 3).logits


@pytest.mark.parametrize("layout", ["saved", "derived", "three copies"])
def test_a_t5_at_the_top_level_unties_its_head_as_blip_2s(tmp_path, layout):
    """A T5ForConditionalGeneration, its head tied to shared: a LoRA on lm_head was refused as an encoder-decoder
    model's, where the same T5 inside BLIP-2 or InstructBLIP is untied (its scaling written). Untied as there, it
    computes what PEFT's adapted model computes, loaded by transformers with nothing missing. ("derived": a config
    from before transformers 5, without scale_decoder_outputs; "three copies": a checkpoint from before transformers
    5, shared.weight stored also as the encoder's and decoder's embed_tokens.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    from loraops.basemodel import BaseModel

    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(**_INSTRUCTBLIP_T5["text_config"])).save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert (config["is_encoder_decoder"], config["tie_word_embeddings"], config["scale_decoder_outputs"]) == (True, True, True)
    if layout == "derived":
        del config["scale_decoder_outputs"]
        (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    if layout == "three copies":
        state = load_file(tmp_path / "base" / "model.safetensors")
        assert "lm_head.weight" not in state
        state.update({f"{side}.embed_tokens.weight": state["shared.weight"].clone() for side in ("encoder", "decoder")})
        save_file(state, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    torch.manual_seed(1)
    adapted_model = get_peft_model(T5ForConditionalGeneration.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q", "lm_head"], init_lora_weights=False)).eval()
    adapted_model.save_pretrained(tmp_path / "a")
    expected = t5_logits(adapted_model)

    adapter, base = formats.read_adapter(tmp_path / "a"), BaseModel.open(tmp_path / "base")
    found = check.check(adapter, base.tensors, config=base.config)
    assert found.ok and found.tied_heads == ["lm_head"]
    report = engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == ["lm_head.weight"]
    merged, info = T5ForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(t5_logits(merged), expected, atol=1e-5, rtol=1e-5)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["tie_word_embeddings"], written["scale_decoder_outputs"]) == (False, True)
    assert (t5_logits(merged) - t5_logits(T5ForConditionalGeneration.from_pretrained(tmp_path / "base"))).abs().max() > 1e-3


_T5_FAMILY = {"t5": ("T5Config", "T5ForConditionalGeneration"), "umt5": ("UMT5Config", "UMT5ForConditionalGeneration"),
              "longt5": ("LongT5Config", "LongT5ForConditionalGeneration")}


def t5_family_base(path, kind="t5", stored=()):
    """A tiny T5-family model (transformers 5's save: shared.weight, the head tied to it), also storing ``stored``
    as byte-identical copies of shared.weight (as older checkpoints and some exporters write them); its class."""
    import transformers

    config_class, model_class = (getattr(transformers, name) for name in _T5_FAMILY[kind])
    torch.manual_seed(0)
    model_class(config_class(**_INSTRUCTBLIP_T5["text_config"])).save_pretrained(path)
    if stored:
        state = load_file(path / "model.safetensors")
        state.update({name: state["shared.weight"].clone() for name in stored})
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return model_class


def t5_lora(model_class, base, out, targets):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(model_class.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)).eval()
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("kind", ["umt5", "longt5"])
def test_every_t5_family_model_at_the_top_level_unties_its_head(tmp_path, kind):
    """UMT5 and LongT5 (their configs derive the output scaling from tie_word_embeddings, as T5's): a LoRA on the
    tied lm_head merges untied, its scaling written, to PEFT's adapted model's logits."""
    model_class = t5_family_base(tmp_path / "base", kind)
    expected = t5_logits(t5_lora(model_class, tmp_path / "base", tmp_path / "a", ["q", "lm_head"]))
    report = engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out",
                          progress=False)
    assert report.heads_untied == ["lm_head.weight"]
    merged, info = model_class.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and merged.config.scale_decoder_outputs is True
    torch.testing.assert_close(t5_logits(merged), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [["q", "shared"], ["q", "shared", "lm_head"], ["q", "lm_head"]])
def test_a_t5_storing_its_head_among_copies_of_shared_merges_as_one_storing_shared_once(tmp_path, targets):
    """A T5 checkpoint storing shared.weight also as each side's embed_tokens and as lm_head (byte-identical, the
    config tied) is the model saved with shared.weight alone: a merge of one adapter gives both the same model.
    shared and each side's embed_tokens are one parameter (transformers ties them whatever the config says): a LoRA
    on shared goes into every copy; and, as where the head is not stored, it does not untie the head (the rule
    names no head of shared: PEFT's merge_and_unload's). Each copy kept its own changes: the LoRA on shared went
    into shared.weight alone, which the loaded model does not read (its embed_tokens no longer equal to it)."""
    model_class = t5_family_base(tmp_path / "once")
    t5_family_base(tmp_path / "copies", stored=["encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                                                 "lm_head.weight"])
    t5_lora(model_class, tmp_path / "once", tmp_path / "a", targets)
    for layout in ("once", "copies"):
        engine.merge(tmp_path / layout, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / f"out-{layout}",
                     progress=False)
    once, copies = tensors(tmp_path / "out-once"), tensors(tmp_path / "out-copies")
    for side in ("encoder", "decoder"):
        assert torch.equal(copies[f"{side}.embed_tokens.weight"], copies["shared.weight"])
    assert torch.equal(copies["lm_head.weight"], once.get("lm_head.weight", once["shared.weight"]))
    assert all(torch.equal(copies[name], value) for name, value in once.items())
    merged = model_class.from_pretrained(tmp_path / "out-copies")
    torch.testing.assert_close(t5_logits(merged), t5_logits(model_class.from_pretrained(tmp_path / "out-once")),
                               atol=1e-5, rtol=1e-5)


def test_untied_keeps_the_output_scaling_each_config_reads():
    """untied writes scale_decoder_outputs where transformers derives it from tie_word_embeddings (the T5 family,
    SCALES_BY_TIE: every config class of the installed transformers that has the attribute), as that config read it:
    a level saying it keeps it, one saying false (T5 v1.1, FLAN-T5, a T5 saved by transformers 5 from one) keeps
    false, and no other model type gets the key."""
    from transformers import CONFIG_MAPPING

    from loraops.check import SCALES_BY_TIE, untied

    def scales(model_type):
        try:
            return hasattr(CONFIG_MAPPING[model_type](), "scale_decoder_outputs")
        except Exception:  # (a few configs have no valid defaults: none of the T5 family)
            return False

    scaling = {mt for mt in CONFIG_MAPPING if scales(mt)}
    assert scaling == set(SCALES_BY_TIE)
    absent = object()
    for model_type in [*SCALES_BY_TIE, "mt5", "switch_transformers", "llama"]:
        for tie in (absent, True, False):
            for scale in (absent, True, False):
                level = {"model_type": model_type, **({} if tie is absent else {"tie_word_embeddings": tie}),
                         **({} if scale is absent else {"scale_decoder_outputs": scale})}
                written = untied({"text_config": level})["text_config"]
                assert written["tie_word_embeddings"] is False
                if model_type not in scaling:
                    assert written == {**level, "tie_word_embeddings": False}
                    continue
                cls = CONFIG_MAPPING[model_type]
                assert (cls.from_dict(written).scale_decoder_outputs == cls.from_dict(level).scale_decoder_outputs), \
                    (level, written)


_OMNI_THINKER = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=160,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}),
    vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                       fullatt_block_indexes=[0], patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
    audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=32,
                      num_mel_bins=8, max_source_positions=16, n_window=4),
    audio_token_index=150, image_token_index=151, video_token_index=152, tie_word_embeddings=True)


def test_qwen_omni_ties_by_its_thinker_config(tmp_path):
    """Qwen2.5-Omni's thinker is a sub-model that ties its lm_head by thinker_config's tie_word_embeddings (the top
    level says nothing). A LoRA on the thinker's head unties it and the merged thinker_config says false, so the
    merged model computes what PEFT's adapted model computes also once tied again by its config (tie_weights(), as
    after resize_token_embeddings), where a thinker_config still saying true tied the base's embeddings back in."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration as cls

    from loraops.check import ties_word_embeddings, untied

    assert ties_word_embeddings({"thinker_config": {"tie_word_embeddings": False}}) is False
    assert untied({"thinker_config": {"tie_word_embeddings": True}})["thinker_config"]["tie_word_embeddings"] is False
    torch.manual_seed(0)
    cls._from_config(Qwen2_5OmniConfig(thinker_config=_OMNI_THINKER, enable_audio_output=False)).save_pretrained(
        tmp_path / "base")
    torch.save({}, tmp_path / "base" / "spk_dict.pt")  # (the talker's voices, which from_pretrained loads)
    assert "thinker.lm_head.weight" not in load_file(tmp_path / "base" / "model.safetensors")
    torch.manual_seed(1)
    adapted_model = get_peft_model(cls.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["thinker.lm_head"], init_lora_weights=False)).eval()
    adapted_model.save_pretrained(tmp_path / "a")

    def thinker_logits(model):
        with torch.no_grad():
            return model.eval().thinker(input_ids=TOKENS[:, :8] % 100 + 3).logits

    expected = thinker_logits(adapted_model.base_model.model)
    report = engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out",
                          progress=False)
    assert report.heads_untied == ["thinker.lm_head.weight"]
    merged = cls.from_pretrained(tmp_path / "out")  # (its from_pretrained cannot give loading info)
    torch.testing.assert_close(thinker_logits(merged), expected, atol=1e-5, rtol=1e-5)
    merged.tie_weights()
    torch.testing.assert_close(thinker_logits(merged), expected, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["thinker_config"]["tie_word_embeddings"] is False


@pytest.mark.parametrize("thinker", ["thinker.", ""])
def test_qwen_omni_adapters_bind_to_its_saved_thinker_names(tmp_path, thinker):
    """transformers 5 holds Qwen2.5-Omni's thinker as thinker.model.language_model.…, thinker.model.audio_tower.…
    and thinker.model.visual.…, which PEFT saves, but stores thinker.model.…, thinker.audio_tower.…,
    thinker.visual.… (its conversion_mapping; the thinker saved alone, Qwen2_5OmniThinkerForConditionalGeneration,
    the same without thinker.): a LoRA on all three binds (it did not: "modules do not fit"), and the merged model
    equals PEFT's merge_and_unload on every tensor and in its thinker's logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import (Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerConfig,
                              Qwen2_5OmniThinkerForConditionalGeneration)

    torch.manual_seed(0)
    if thinker:
        cls = Qwen2_5OmniForConditionalGeneration
        cls._from_config(Qwen2_5OmniConfig(thinker_config=_OMNI_THINKER, enable_audio_output=False)).save_pretrained(
            tmp_path / "base")
        torch.save({}, tmp_path / "base" / "spk_dict.pt")  # (the talker's voices, which from_pretrained loads)
    else:
        cls = Qwen2_5OmniThinkerForConditionalGeneration
        cls._from_config(Qwen2_5OmniThinkerConfig(**_OMNI_THINKER)).save_pretrained(tmp_path / "base")
    assert f"{thinker}audio_tower.layers.0.fc1.weight" in load_file(tmp_path / "base" / "model.safetensors")
    torch.manual_seed(1)
    adapted_model = get_peft_model(cls.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=re.escape(thinker) + r"model\.(language_model\.layers\.0\.self_attn\.q_proj|"
                       r"audio_tower\.layers\.0\.fc1|visual\.blocks\.0\.attn\.q|visual\.blocks\.0\.mlp\.up_proj)")).eval()
    adapted_model.save_pretrained(tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    assert len(adapter.modules) == 4 and any("language_model" in name for name in adapter.modules)

    def thinker_logits(model):
        with torch.no_grad():
            model = model.eval().thinker if thinker else model.eval()
            return model(input_ids=TOKENS[:, :8] % 100 + 3).logits

    expected = thinker_logits(adapted_model.base_model.model)
    reference = adapted_model.merge_and_unload().state_dict()
    engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False)
    merged = cls.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(thinker_logits(merged), expected, atol=1e-5, rtol=1e-5)
    state = merged.state_dict()
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor, atol=1e-6, rtol=1e-6, msg=name)
    # extract's inverse: the names PEFT sees, from the saved ones
    saved = list(load_file(tmp_path / "base" / "model.safetensors"))
    in_memory, warning = check.memory_names(saved, json.loads((tmp_path / "base" / "config.json").read_text()))
    assert warning is None and {in_memory.get(name, name) for name in saved} <= set(state)


# transformers classes with an output head, not in TIED_HEAD_OF_CLASS, whose tied pair the causal-LM rule does not
# name, and why that is harmless
RULE_EXCEPTIONS = {
    "BltForCausalLM": "ties its embeddings to its head (the head is what a tied checkpoint stores)",
    "Qwen3OmniMoeTalkerForConditionalGeneration": "its codec_head and codec_embedding: names no rule reads",
}


def test_the_causal_lm_rule_names_the_head_transformers_ties():
    """For a class TIED_HEAD_OF_CLASS does not list, unstored_head_of names the head tied to the embeddings by rule
    (lm_head beside the decoder's wrapper). transformers says which head a class ties by its class attribute
    _tied_weights_keys (in memory names, no model built): for each of its classes with an output head that declares
    tied keys the rule names that head (GPT-NeoX's by its checkpoint name, embed_out), but for encoder-decoder
    configs (never untied) and RULE_EXCEPTIONS. (Classes whose sub-model ties declare nothing at the top level:
    BLIP-2, Mllama, Qwen2.5-Omni, …; remote code is refused: test_a_remote_code_model_whose_head_the_rule_cannot_name.)"""
    import transformers

    from loraops.check import LM_HEAD_CLASSES, unstored_head_of

    agreed = 0
    for name in sorted(n for n in dir(transformers) if n.endswith(LM_HEAD_CLASSES) and n not in TIED_HEAD_OF_CLASS):
        cls = getattr(transformers, name)
        for head, embeddings in (getattr(cls, "_tied_weights_keys", None) or {}).items():
            if not head.endswith(".weight"):
                continue
            named = unstored_head_of(embeddings, {}, {"architectures": [name]})
            if named in {head, "embed_out.weight" if embeddings.endswith("embed_in.weight") else head}:
                agreed += 1
            else:
                assert name in RULE_EXCEPTIONS or cls.config_class().is_encoder_decoder, (name, head, embeddings, named)
    assert agreed >= 220


@pytest.mark.parametrize("case", ["remote", "remote head stored", "transformers class"])
def test_a_remote_code_model_whose_head_the_rule_cannot_name(tmp_path, tied, case):
    """A tied model's config.json whose auto_map loads its class from the model's own code (ChatGLM's output head is
    transformer.output_layer, InternLM2's output): the causal-LM rule's lm_head may be no module of it, a tensor the
    model never reads. A LoRA on its embeddings is refused by merge in one line, a misfit with that reason to check,
    unless the base stores the head the rule names (then it is that model's head); the same config without auto_map
    is untied by rule. A base given as registered is refused alike."""
    from factories import loraops_run
    from loraops.basemodel import BaseModel
    from loraops.check import check, misfits
    from loraops.errors import MismatchError

    adapter_path = embedding_lora(tied, tmp_path / "a")
    config = json.loads((tied / "config.json").read_text())
    if case != "transformers class":
        config["architectures"] = ["ChatGLMForConditionalGeneration"]
        config["auto_map"] = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                              "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
    (tied / "config.json").write_text(json.dumps(config))
    if case == "remote head stored":
        state = load_file(tied / "model.safetensors")
        save_file({**state, "lm_head.weight": state[EMBED].clone()}, str(tied / "model.safetensors"),
                  metadata={"format": "pt"})
    adapter, base = formats.read_adapter(adapter_path), BaseModel.open(tied)
    if case == "remote":
        with pytest.raises(MismatchError, match="ChatGLMForConditionalGeneration is remote code"):
            engine.merge(tied, [(adapter, 1.0)], tmp_path / "out", progress=False)
        report = check(adapter, base.tensors, config=base.config)  # (a misfit, with merge's reason: never raised)
        assert not report.ok and report.missing == ["model.embed_tokens"] and report.tied_heads == []
        assert "cannot tell which head" in misfits(report)[0]
        assert loraops_run("base", "add", tied, "--name", "registered").returncode == 0
        # a registered base as its path: check reads the config.json merge reads (from the base's recorded folder)
        for args in (["merge", adapter_path, "--into", tied, "-o", tmp_path / "cli"], ["check", adapter_path, "--base", tied],
                     ["merge", adapter_path, "--into", "registered", "-o", tmp_path / "cli"],
                     ["check", adapter_path, "--base", "registered"]):
            result = loraops_run(*args)
            assert result.returncode != 0 and result.stderr.startswith("error: ")
            assert "remote code" in (result.stdout if args[0] == "check" else result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()
        return
    report = engine.merge(tied, [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert check(adapter, base.tensors, config=base.config).ok
    merged = tensors(tmp_path / "out")
    assert torch.equal(merged["lm_head.weight"], load_file(tied / "model.safetensors")[EMBED])
    assert report.heads_untied == ["lm_head.weight"]  # (one stored twice is untied too: written as its own tensor)


def test_check_against_a_registered_base_whose_files_cannot_be_read(tmp_path, tied, monkeypatch):
    """A registered base whose files are where they were recorded but cannot be read now (an OSError: a permission,
    a failing disk) is checked by its recorded manifest, that base alone, as one whose files are gone: the error
    ended `check ADAPTER` against every registered base. (The read is made to fail: the tests run as root, whom
    file permissions do not stop.)"""
    from pathlib import Path

    from loraops import basemodel
    from loraops.registry import Registry

    other = tiny_llama(tmp_path / "other", seed=5)
    adapter_path = embedding_lora(tied, tmp_path / "a", targets=["q_proj"])
    read_json = basemodel.read_json

    def unreadable(path, *args, **kwargs):
        if Path(path).resolve().parent == tied.resolve():
            raise PermissionError(13, "Permission denied", str(path))
        return read_json(path, *args, **kwargs)

    with Registry.open() as registry:
        registry.add_base(tied, name="tied")
        registry.add_base(other, name="other")
        monkeypatch.setattr(basemodel, "read_json", unreadable)
        every = registry.check_adapter(adapter_path)
        named = registry.check_adapter(adapter_path, "tied")
    assert sorted(report.base_ref for report in every.reports) == ["other", "tied"]
    assert sorted(every.fits) == ["other", "tied"]
    assert named.fits == ["tied"]


@pytest.mark.parametrize("saved", [False, True])
def test_check_against_every_registered_base_reports_a_remote_code_refusal_as_a_misfit(tmp_path, tied, saved):
    """`check ADAPTER` with no base (none recorded) reports each registered base. A tied remote-code base whose
    embeddings an adapter's LoRA (or modules_to_save copy) changes is one merge refuses: check, reading its
    config.json, ended with that error (naming no base) instead of saying which bases the adapter fits."""
    from factories import loraops_run

    remote = tiny_llama(tmp_path / "remote", tie=True, seed=5)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "architectures": ["ChatGLMForConditionalGeneration"],
                                                    "auto_map": {"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}}))
    targets = dict(targets=["q_proj"], modules_to_save=["embed_tokens"]) if saved else {}
    adapter_path = embedding_lora(tied, tmp_path / "a", **targets)
    for path, name in ((tied, "plain"), (remote, "remote")):
        assert loraops_run("base", "add", path, "--name", name).returncode == 0
    result = loraops_run("check", adapter_path)
    assert result.returncode == 0, result.stderr
    assert f"{adapter_path} fits plain" in result.stdout
    refused = result.stdout.split(f"{adapter_path} does not fit remote", 1)[1]
    assert "model.embed_tokens" in refused and "ChatGLMForConditionalGeneration is remote code" in refused


@pytest.mark.parametrize("case", ["moved", "bad config.json"])
def test_check_goes_by_the_recorded_manifest_of_a_base_whose_files_it_cannot_read(tmp_path, tied, case):
    """check reads a registered base's config.json from its recorded folder; where the folder is gone, or its
    config.json is no JSON, it goes by the recorded manifest (the tied head untied by rule is then not listed). A bad
    config.json, read only when check asked for it, ended `check ADAPTER` against every registered base in its error."""
    import shutil

    from factories import loraops_run

    adapter_path = embedding_lora(tied, tmp_path / "a")
    other = tiny_llama(tmp_path / "other", tie=True, seed=5)
    for path, name in ((tied, "tied"), (other, "other")):
        assert loraops_run("base", "add", path, "--name", name).returncode == 0
    if case == "moved":
        shutil.move(tied, tmp_path / "elsewhere")
    else:
        (tied / "config.json").write_text("{not JSON")
    for args in ([], ["--base", "tied"]):
        result = loraops_run("check", adapter_path, *args)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert f"{adapter_path} fits tied: 1/1 modules match\n" in result.stdout
    assert f"{adapter_path} fits other" in loraops_run("check", adapter_path).stdout


@pytest.mark.parametrize("case", ["tied", "tied, unsaid", "tied, no vocabulary", "head stored"])
def test_a_remote_code_model_whose_embeddings_the_rule_does_not_name(tmp_path, tied, case):
    """InternLM2's remote code names its input embeddings model.tok_embeddings and its head output: names the
    causal-LM rule does not read, so a LoRA on those embeddings of a tied base (no head stored; tie_word_embeddings
    true, or unsaid: its config class's default is then the model's own) was merged into the one tensor its head
    reads too, where PEFT's adapted model changes the lookup only. Refused by merge in one line (check: a misfit,
    with that reason), as where the rule names a head the model may not have (ChatGLM's); the base storing its head
    merges. ("no vocabulary": a config.json that does not say vocab_size, its remote config class's default then the
    model's: the embeddings are told by their name alone, and were merged.)"""
    from factories import loraops_run
    from loraops.basemodel import BaseModel
    from loraops.errors import MismatchError

    embeddings = "model.tok_embeddings.weight"
    state = {name.replace("embed_tokens", "tok_embeddings"): t for name, t in load_file(tied / "model.safetensors").items()}
    if case == "head stored":
        state["output.weight"] = torch.randn_like(state[embeddings])
    save_file(state, str(tied / "model.safetensors"), metadata={"format": "pt"})
    config = {**json.loads((tied / "config.json").read_text()), "architectures": ["InternLM2ForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                           "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
              "tie_word_embeddings": case != "head stored"}
    if case == "tied, unsaid":
        del config["tie_word_embeddings"]
    if case == "tied, no vocabulary":
        del config["vocab_size"]
    (tied / "config.json").write_text(json.dumps(config))
    adapter_path = embedding_lora(tiny_llama(tmp_path / "llama", tie=True), tmp_path / "a")
    lora = load_file(adapter_path / "adapter_model.safetensors")
    save_file({name.replace("embed_tokens", "tok_embeddings"): t for name, t in lora.items()},
              str(adapter_path / "adapter_model.safetensors"))
    adapter_config = adapter_path / "adapter_config.json"
    adapter_config.write_text(adapter_config.read_text().replace("embed_tokens", "tok_embeddings"))
    adapter, base = formats.read_adapter(adapter_path), BaseModel.open(tied)
    if case != "head stored":
        with pytest.raises(MismatchError, match="InternLM2ForCausalLM is remote code"):
            engine.merge(tied, [(adapter, 1.0)], tmp_path / "out", progress=False)
        report = check.check(adapter, base.tensors, config=base.config)
        assert not report.ok and report.missing == ["model.tok_embeddings"]
        assert f"{embeddings!r} may be tied to an output head" in check.misfits(report)[0]
        for args in (["merge", adapter_path, "--into", tied, "-o", tmp_path / "cli"], ["check", adapter_path, "--base", tied]):
            result = loraops_run(*args)
            assert result.returncode != 0 and result.stderr.startswith("error: ")
            assert "remote code" in (result.stdout if args[0] == "check" else result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()
        assert check.check(adapter, base.tensors).ok  # (the manifest alone cannot tell)
        return
    assert check.check(adapter, base.tensors, config=base.config).ok
    report = engine.merge(tied, [(adapter, 1.0)], tmp_path / "out", progress=False)
    merged = tensors(tmp_path / "out")
    assert report.heads_untied == [] and torch.equal(merged["output.weight"], state["output.weight"])
    assert not torch.equal(merged[embeddings], state[embeddings])


@pytest.mark.parametrize("vocabulary", ["one", "padded"])
def test_a_remote_code_tied_model_merges_loras_off_its_embeddings(tmp_path, vocabulary):
    """The refusal of a remote-code model's possible tied embeddings (InternLM2's) reads only a table of embeddings,
    by its name and a row per token: LoRAs on every other layer of such a tied base (its MLP's up_proj as tall as the
    vocabulary) fit and merge, untying nothing. ("padded": the embeddings have a row per token of
    padded_vocab_size, as ChatGLM's, the MLP one per token of vocab_size: no tensor of the MLP's shape beside it,
    the MLP was refused as the embeddings.)"""
    from loraops.basemodel import BaseModel

    tied = tiny_llama(tmp_path / "tied", tie=True, vocab=136 if vocabulary == "padded" else 128)
    adapter = formats.read_adapter(embedding_lora(tied, tmp_path / "a", targets=LLAMA_TARGETS))
    config = json.loads((tied / "config.json").read_text())
    if vocabulary == "padded":
        config.update(vocab_size=128, padded_vocab_size=136)
    (tied / "config.json").write_text(json.dumps({**config, "architectures": ["InternLM2ForCausalLM"],
                                                  "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}}))
    base = BaseModel.open(tied)
    assert base.tensors["model.layers.0.mlp.up_proj.weight"].shape[0] == 128
    found = check.check(adapter, base.tensors, config=base.config)
    assert found.ok and found.tied_heads == []
    assert engine.merge(tied, [(adapter, 1.0)], tmp_path / "out", progress=False).heads_untied == []


def test_a_remote_code_tied_model_without_a_vocabulary_merges_a_lora_on_its_positions(tmp_path):
    """Told by name alone (a remote-code config that does not say vocab_size), the possible tied embeddings are a
    table named for input embeddings, not for positions: a LoRA on an OPT-style model's embed_positions (a table
    of its own shape, which no head reads) fits and merges, untying nothing."""
    from peft import LoraConfig, get_peft_model
    from transformers import OPTConfig, OPTForCausalLM

    from loraops.basemodel import BaseModel

    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=128,
                             max_position_embeddings=64, word_embed_proj_dim=32)).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    get_peft_model(OPTForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "embed_positions"], init_lora_weights=False)).save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    del config["vocab_size"]
    (tmp_path / "base" / "config.json").write_text(json.dumps({
        **config, "architectures": ["MyOPTForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_my.MyOPTForCausalLM"}}))
    adapter, base = formats.read_adapter(tmp_path / "a"), BaseModel.open(tmp_path / "base")
    found = check.check(adapter, base.tensors, config=base.config)
    assert found.ok and found.tied_heads == [], found
    assert engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False).heads_untied == []


@pytest.mark.parametrize("model, method", [("llama", "lora"), ("gpt2", "lora"), ("llama", "vera")])
def test_a_kohya_export_of_an_unstored_tied_head_reads_back(tmp_path, model, method):
    """`export --format kohya` names a LoRA on a head the base does not store (tied) by its path, lora_unet_lm_head;
    check, merge and export read such a name back only from the tensors the base stores ("not in base"). Now it binds
    to the head as the PEFT name does: PEFT → kohya → merge equals PEFT → merge and PEFT's adapted model (a VeRA one
    too, exported as the LoRA it equals)."""
    from click.testing import CliRunner
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from factories import tiny_gpt2
    from loraops.basemodel import BaseModel
    from loraops.check import check
    from loraops.cli import main
    from test_adalora_vera import vera_adapter

    base = tiny_llama(tmp_path / "base", tie=True) if model == "llama" else tiny_gpt2(tmp_path / "base")
    assert "lm_head.weight" not in load_file(base / "model.safetensors")
    targets = ["q_proj", "down_proj", "lm_head"] if model == "llama" else ["c_attn", "lm_head"]
    if method == "vera":  # (vera_A as wide as down_proj's inputs, wider than the head's)
        peft_path = vera_adapter(None, tmp_path / "peft", model=AutoModelForCausalLM.from_pretrained(base),
                                 targets=targets)
    else:
        torch.manual_seed(1)
        get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, fan_in_fan_out=model == "gpt2")
        ).save_pretrained(tmp_path / "peft")
        peft_path = tmp_path / "peft"
    for args in (["base", "add", base, "--name", "base"],
                 ["export", peft_path, "--format", "kohya", "-o", tmp_path / "k.safetensors", "--base", "base"]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    assert "lora_unet_lm_head.lora_down.weight" in load_file(tmp_path / "k.safetensors")
    kohya = formats.read_adapter(tmp_path / "k.safetensors")
    manifest = BaseModel.open(base)
    assert check(kohya, manifest.tensors, config=manifest.config).ok

    merged = {}
    for name, adapter in (("peft", formats.read_adapter(peft_path)), ("kohya", kohya)):
        report = engine.merge(base, [(adapter, 1.0)], tmp_path / name / "out", progress=False)
        assert report.heads_untied == ["lm_head.weight"]
        merged[name] = tensors(tmp_path / name / "out")
    assert merged["peft"].keys() == merged["kohya"].keys()
    for name, tensor in merged["peft"].items():
        torch.testing.assert_close(merged["kohya"][name], tensor, atol=1e-6, rtol=0)
    expected = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), peft_path))
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "kohya" / "out")), expected,
                               atol=1e-5, rtol=1e-5)
    # and back to PEFT, bound to the base: the head under its own name again
    result = CliRunner().invoke(main, ["export", str(tmp_path / "k.safetensors"), "--format", "peft",
                                       "-o", str(tmp_path / "back"), "--base", "base"])
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                                                tmp_path / "back")), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base_name", ["tied", "untied"])
def test_a_lora_on_the_head_beside_saved_embeddings_without_their_tied_copy_is_refused(tmp_path, tied, base_name):
    """modules_to_save=["embed_tokens"] with ensure_weight_tying, a LoRA on lm_head that target_modules leaves out, and
    no lm_head.weight in the file (PEFT saves it only on a tied model): ensure_weight_tying made loraops skip the
    targeting check, so the head's factors were read and merged. PEFT adds tied LoRA layers only for targeted
    embeddings (not saved ones), so the targeting decides: on a tied base PEFT fails to load the file (a KeyError on
    the head's weight), on an untied one it loads it without the head's LoRA. Refused in one line either way."""
    from peft import PeftModel

    base = tied if base_name == "tied" else tiny_llama(tmp_path / "untied")
    state = saved_embeddings_adapter(base, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state.pop("base_model.model.lm_head.weight", None)
    save_file({**state, "base_model.model.lm_head.lora_A.weight": torch.randn(4, 64),
               "base_model.model.lm_head.lora_B.weight": torch.randn(128, 4)}, str(weights))
    if base_name == "tied":
        with pytest.raises(KeyError, match="base_model.model.lm_head.weight"):
            PeftModel.from_pretrained(load_model(base), tmp_path / "a")
    else:
        model = PeftModel.from_pretrained(load_model(base), tmp_path / "a")
        assert not any("lm_head" in name and "lora_" in name for name, _ in model.named_parameters())
    with pytest.raises(InvalidInputError, match=r"module 'lm_head' has LoRA weights that the config's target_modules "
                                                r"leaves out"):
        formats.read_adapter(tmp_path / "a")


def targeted_head_beside_saved_embeddings(base, folder):
    """saved_embeddings_adapter's folder with a LoRA on lm_head that target_modules lists, without lm_head.weight."""
    state = saved_embeddings_adapter(base, folder)
    state.pop("base_model.model.lm_head.weight", None)
    save_file({**state, "base_model.model.lm_head.lora_A.weight": torch.randn(4, 64),
               "base_model.model.lm_head.lora_B.weight": torch.randn(128, 4)}, str(folder / "adapter_model.safetensors"))
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": ["q_proj", "lm_head"]}))


@pytest.mark.parametrize("base_name", ["tied", "untied"])
def test_a_targeted_head_beside_saved_embeddings_is_refused_where_the_base_ties_it(tmp_path, tied, base_name):
    """modules_to_save=["embed_tokens"] with ensure_weight_tying and a LoRA on lm_head that target_modules lists, the
    file without lm_head.weight (PEFT saves that copy only on a tied model): on an untied base PEFT loads the head's
    LoRA, on a tied one it wraps the head whole (its modules_to_tie) and fails (a TypeError). Only the base tells
    them apart: check (with the base's config) and merge refuse it on the tied base, and merge the untied one."""
    from peft import PeftModel

    from loraops.basemodel import BaseModel
    from loraops.errors import MismatchError

    base = tied if base_name == "tied" else tiny_llama(tmp_path / "untied")
    targeted_head_beside_saved_embeddings(base, tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    model = BaseModel.open(base)
    report = check.check(adapter, model.tensors, config=model.config)
    if base_name == "untied":
        assert report.ok
        peft_model = PeftModel.from_pretrained(load_model(base), tmp_path / "a")
        assert any("lm_head.lora_A" in name for name, _ in peft_model.named_parameters())
        engine.merge(base, [(adapter, 1.0)], tmp_path / "out", progress=False)
        return
    with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type .*lora"):
        PeftModel.from_pretrained(load_model(base), tmp_path / "a")
    why = ("the head this base ties to 'model.embed_tokens.weight', which the adapter's ensure_weight_tying saves whole "
           "(modules_to_save): PEFT saves the head whole too and loads no LoRA on it (this file lacks the head's copy: "
           "PEFT fails to load it on this base)")
    assert not report.ok and report.missing == ["lm_head"] and report.why_missing["lm_head"] == why
    with pytest.raises(MismatchError, match=re.escape(why)):  # (by the manifest, the head being unstored)
        engine.merge(base, [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_gpt2_head_ensure_weight_tying_saves_with_wte_merges_as_peft_loads_it(tmp_path):
    """GPT-2's modules_to_save=["lm_head"] with ensure_weight_tying: PEFT ties the head to the input embeddings and
    writes the embeddings' own path into the config (modules_to_save=["transformer.wte"], whose last name is none of
    EMBEDDING_LAYER_NAMES), saving the head whole beside them (lm_head.weight). PEFT loads that folder (the head's copy
    by its non-strict load) as trained; loraops refused the head's copy (only names ending embed_tokens/lm_head
    counted as saved embeddings). It merges as PEFT's adapted model."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from factories import tiny_gpt2

    base = tiny_gpt2(tmp_path / "gpt2")
    torch.manual_seed(1)
    model = get_peft_model(load_model(base), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                        modules_to_save=["lm_head"], ensure_weight_tying=True,
                                                        init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.transformer.wte.modules_to_save["default"].weight.add_(torch.randn(128, 64) * 0.1)
    trained = logits(model)
    model.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["modules_to_save"] == ["transformer.wte"]
    state = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert sorted(k for k in state if "lora_" not in k) == ["base_model.model.lm_head.weight",
                                                              "base_model.model.transformer.wte.weight"]
    expected = logits(PeftModel.from_pretrained(load_model(base), tmp_path / "a"))
    torch.testing.assert_close(expected, trained)
    engine.merge(base, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), expected,
                               atol=1e-5, rtol=1e-5)


def test_a_gpt2_head_lora_ensure_weight_tying_saves_beside_wte_targets_is_refused_as_peft_loads_none(tmp_path):
    """GPT-2's target_modules=["c_attn", "lm_head"] with ensure_weight_tying: PEFT swaps lm_head for the input
    embeddings' path in the config it saves (["c_attn", "transformer.wte"]) and saves the head's tied LoRA. Loading
    that config, PEFT takes "wte" for no embeddings (EMBEDDING_LAYER_NAMES), so it adds no tied layer and leaves the
    head's factors out. ensure_weight_tying skips the targeting check only for targets named as those layers; here
    the head's factors are refused as any a config leaves out (they were merged: not PEFT's model)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from factories import tiny_gpt2

    base = tiny_gpt2(tmp_path / "gpt2")
    torch.manual_seed(1)
    get_peft_model(load_model(base), LoraConfig(r=4, target_modules=["c_attn", "lm_head"], fan_in_fan_out=True,
                                                ensure_weight_tying=True, init_lora_weights=False)
                   ).save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["c_attn", "transformer.wte"]
    assert "base_model.model.lm_head.lora_A.weight" in load_file(tmp_path / "a" / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(load_model(base), tmp_path / "a")
    assert not any("lm_head" in name and "lora_" in name for name, _ in model.named_parameters())
    with pytest.raises(InvalidInputError, match=r"module 'lm_head' has LoRA weights that the config's target_modules "
                                                r"leaves out"):
        formats.read_adapter(tmp_path / "a")


def test_ensure_weight_tying_with_a_regex_follows_whether_peft_matches_the_embeddings_by_name(tmp_path, tied):
    """A regex target_modules with ensure_weight_tying: PEFT ties a LoRA on the head to targeted embeddings only where
    the regex matches "embed_tokens" or "lm_head" themselves (r".*(q_proj|embed_tokens)" does, r".*\\.(…)" does not).
    Tied, the head's LoRA outside the regex merges as PEFT's adapted model; untied, one added by hand is refused as
    one the config leaves out (PEFT loads none)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    def saved(targets, folder):
        torch.manual_seed(1)
        get_peft_model(load_model(tied), LoraConfig(r=4, target_modules=targets, ensure_weight_tying=True,
                                                    init_lora_weights=False)).save_pretrained(folder)
        return load_file(folder / "adapter_model.safetensors")

    assert "base_model.model.lm_head.lora_A.weight" in saved(r".*(q_proj|embed_tokens)", tmp_path / "a")
    expected = logits(PeftModel.from_pretrained(load_model(tied), tmp_path / "a"))
    engine.merge(tied, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), expected,
                               atol=1e-4, rtol=1e-4)

    state = saved(r".*\.(q_proj|embed_tokens)", tmp_path / "b")
    assert not any(key.startswith("base_model.model.lm_head.lora_") for key in state)
    save_file({**state, "base_model.model.lm_head.lora_A.weight": torch.randn(4, 64),
               "base_model.model.lm_head.lora_B.weight": torch.randn(128, 4)},
              str(tmp_path / "b" / "adapter_model.safetensors"))
    model = PeftModel.from_pretrained(load_model(tied), tmp_path / "b")
    assert not any("lm_head" in name and "lora_" in name for name, _ in model.named_parameters())
    with pytest.raises(InvalidInputError, match=r"module 'lm_head' has LoRA weights that the config's target_modules "
                                                r"leaves out"):
        formats.read_adapter(tmp_path / "b")


@pytest.mark.parametrize("files", ["kept", "gone"])
def test_a_targeted_head_beside_saved_embeddings_is_refused_by_the_registered_base(tmp_path, tied, files):
    """The adapter of the test above against a registered tied base: `check` with the base's files gone (the recorded
    manifest alone), `register --base` and `export --base` refuse it as `check` with the files and merge do (they went
    by the manifest, without the base's config.json, and said it fits). The manifest says the head is tied where it
    does not store it."""
    import shutil

    from click.testing import CliRunner

    from loraops.cli import main

    targeted_head_beside_saved_embeddings(tied, tmp_path / "a")
    base = tmp_path / "base"
    shutil.copytree(tied, base)

    def run(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    assert run("base", "add", base, "--name", "tied").exit_code == 0
    if files == "gone":
        shutil.rmtree(base)
    why = "the head this base ties to 'model.embed_tokens.weight', which the adapter's ensure_weight_tying saves whole"
    for args in (["check", tmp_path / "a", "--base", "tied"],
                 ["register", tmp_path / "a", "--name", "a", "--base", "tied"],
                 ["export", tmp_path / "a", "--base", "tied", "--format", "peft", "-o", tmp_path / "out"]):
        result = run(*args)
        assert result.exit_code != 0 and why in result.output, (args, result.output)
    assert not (tmp_path / "out").exists()
    assert json.loads(run("list", "--json").output) == []


def test_a_targeted_head_tied_to_embeddings_saved_under_a_name_peft_does_not_take_is_refused(tmp_path):
    """GPT-2 by hand: modules_to_save=["wte"] (no name of PEFT's embeddings, so ensure_weight_tying saves no head) and
    target_modules naming lm_head beside a LoRA on it. PEFT then ties the head's LoRA to one it adds on the input
    embeddings, which it does not add to wte, saved whole, and fails (an AttributeError); check said it fits, and a
    merge applied the head's LoRA. Refused against the tied base, by its config and by its manifest alone."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from factories import tiny_gpt2

    base = tiny_gpt2(tmp_path / "gpt2")
    torch.manual_seed(1)
    get_peft_model(load_model(base), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                modules_to_save=["wte"], ensure_weight_tying=True,
                                                init_lora_weights=False)).save_pretrained(tmp_path / "a")
    weights, config = tmp_path / "a" / "adapter_model.safetensors", tmp_path / "a" / "adapter_config.json"
    save_file({**load_file(weights), "base_model.model.lm_head.lora_A.weight": torch.randn(4, 64),
               "base_model.model.lm_head.lora_B.weight": torch.randn(128, 4)}, str(weights))
    config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": ["c_attn", "lm_head"]}))
    with pytest.raises(AttributeError, match="'Embedding' object has no attribute 'lora_embedding_A'"):
        PeftModel.from_pretrained(load_model(base), tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    why = ("the head this base ties to 'transformer.wte.weight', which the adapter's modules_to_save saves whole: its "
           "ensure_weight_tying ties a LoRA on the head to one PEFT adds on those embeddings, which it does not add to "
           "a module it saves whole: PEFT fails to load the adapter on this base")
    assert_misfit_by_config_and_manifest(adapter, base, "lm_head", why, tmp_path / "out")


def test_saved_embeddings_without_their_tied_heads_copy_do_not_fit_a_tied_base(tmp_path, tied):
    """modules_to_save=["embed_tokens"] with ensure_weight_tying, the file without the head's copy (saved on the
    untied base, where PEFT ties nothing): on the tied base PEFT wraps the tied head too (its modules_to_tie) and takes
    its weight from the file, a KeyError. check said it fits and merge wrote it; now the head is missing, with the base's
    config.json and by its manifest alone. The untied base it was saved on loads it, and so does loraops."""
    from peft import PeftModel

    from loraops.basemodel import BaseModel

    untied = tiny_llama(tmp_path / "untied")
    state = saved_embeddings_adapter(untied, tmp_path / "a")
    assert "base_model.model.lm_head.weight" not in state
    with pytest.raises(KeyError, match="base_model.model.lm_head.weight"):
        PeftModel.from_pretrained(load_model(tied), tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    why = ("the head this base ties to 'model.embed_tokens.weight', which the adapter's ensure_weight_tying saves whole "
           "(modules_to_save): PEFT saves the head whole too, and fails to load the adapter without it (a KeyError)")
    assert_misfit_by_config_and_manifest(adapter, tied, "lm_head.weight", why, tmp_path / "out")
    PeftModel.from_pretrained(load_model(untied), tmp_path / "a")
    untied_model = BaseModel.open(untied)
    assert check.check(adapter, untied_model.tensors, config=untied_model.config).ok


def assert_misfit_by_config_and_manifest(adapter, base, name, why, out):
    """``name`` is missing from ``adapter``'s fit to ``base`` for ``why``, by check with the base's config.json and by
    its manifest alone, and merge refuses it, writing nothing at ``out``."""
    from loraops.basemodel import BaseModel
    from loraops.errors import MismatchError

    model = BaseModel.open(base)
    for report in (check.check(adapter, model.tensors, config=model.config), check.check(adapter, model.tensors)):
        assert not report.ok and report.missing == [name] and report.why_missing[name] == why
    with pytest.raises(MismatchError, match=re.escape(why)):
        engine.merge(base, [(adapter, 1.0)], out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("edited", [(), (EMBED,), (EMBED, "lm_head.weight")])
@pytest.mark.parametrize("saves", [[], ["norm"]])
def test_embedding_layers_saved_without_a_lora_on_them(tmp_path, tie, edited, saves):
    """save_embedding_layers=True with a LoRA elsewhere (q_proj), beside no modules_to_save or one naming other
    modules (["norm"]: the norms, trained, saved whole): PEFT saves the input embeddings and the head whole (both
    names on a tied model) and loads them over the model's own. Equal to the base they replace nothing; edited, they
    replace the base's as PEFT's load does (one edited on a tied base: refused, by check too)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_llama(tmp_path / "base", tie=tie, hidden=16, layers=1, intermediate=32, vocab=128)
    torch.manual_seed(1)
    model = get_peft_model(load_model(base), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                                         modules_to_save=saves))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    saved = load_file(weights)
    assert {f"base_model.model.{EMBED}", "base_model.model.lm_head.weight"} <= saved.keys()
    for name in edited:
        saved[f"base_model.model.{name}"] = saved[f"base_model.model.{name}"] + 0.25
    save_file(saved, weights, metadata={"format": "pt"})
    if tie and len(edited) == 1:  # PEFT's load puts both into the one tied weight, the head's (read last) winning
        from loraops.basemodel import BaseModel

        model = BaseModel.open(base)
        report = check.check(formats.read_adapter(tmp_path / "a"), model.tensors, config=model.config)
        assert not report.ok and "PEFT's load keeps tied" in report.why_missing["lm_head.weight"]
        with pytest.raises(Exception, match="which this base ties it to and PEFT's load keeps tied"):
            engine.merge(base, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
        return
    engine.merge(base, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    reference = PeftModel.from_pretrained(load_model(base), tmp_path / "a").merge_and_unload()
    merged = tensors(tmp_path / "out")
    for name, tensor in reference.state_dict().items():
        if name in merged:
            torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=1e-6, msg=name)
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), logits(reference), atol=1e-5, rtol=1e-5)


def edited_tied_copy(tmp_path):
    """(a tied Llama base, its adapter saved with save_embedding_layers=True, the embeddings edited, the head's copy
    not): a misfit only the values show."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(tmp_path / "base", tie=True, hidden=16, layers=1, intermediate=32, vocab=128)
    torch.manual_seed(1)
    model = get_peft_model(load_model(base), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    saved = load_file(weights)
    saved[f"base_model.model.{EMBED}"] = saved[f"base_model.model.{EMBED}"] + 0.25
    save_file(saved, weights, metadata={"format": "pt"})
    return base, tmp_path / "a"


def test_check_and_register_see_an_edited_tied_copy(tmp_path):
    """check and register --base read headers only, but the values of a file's whole tensors: a tied Llama's
    adapter saved with save_embedding_layers=True, its embeddings edited (the head's copy not), does not fit, with
    the merge's reason (PEFT's load keeps one tied weight, whichever it reads last), against a base folder or a
    registered base, and is not registered to it."""
    from click.testing import CliRunner

    from loraops.cli import main

    base, _ = edited_tied_copy(tmp_path)
    why = "lm_head.weight (saved whole beside 'model.embed_tokens.weight', which this base ties it to and PEFT's load"
    assert CliRunner().invoke(main, ["base", "add", str(base), "--name", "tied"]).exit_code == 0
    for args in (["check", tmp_path / "a", "--base", base], ["check", tmp_path / "a", "--base", "tied"],
                 ["register", tmp_path / "a", "--base", "tied"]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code not in (0, None) and why in result.output, (args, result.output)


def test_check_of_an_edited_tied_copy_says_the_refusal_alone(tmp_path):
    """check's output for an edited tied copy: the two whole tensors counted once each (1/2 match, was 2/3: the
    refused head counted as a tensor and as a misfit), and no line saying a merge writes the head untied beside the
    refusal to merge it."""
    from click.testing import CliRunner

    from loraops.cli import main

    base, adapter = edited_tied_copy(tmp_path)
    result = CliRunner().invoke(main, ["check", str(adapter), "--base", str(base)])
    assert result.exit_code == 2
    assert result.output == (
        f"{adapter} does not fit {base}: 1/1 modules and 1/2 whole tensors match\n"
        "  lm_head.weight (saved whole beside 'model.embed_tokens.weight', which this base ties it to and PEFT's load "
        "keeps tied (one tensor), with different values: PEFT's load keeps whichever it reads last; make the two "
        f"equal)\nerror: {adapter} does not fit base {base}\n")


def test_register_reads_values_only_where_a_base_is_checked(tmp_path, monkeypatch):
    """register reads the values of a file saving whole tensors (formats.read_for_fit) only to check it against a
    base: not where no base is given or hinted (the file's base_model_name_or_path names none registered), once
    where the hinted base is registered (the edited tied copy does not fit it: registered, not linked). Its NaN/Inf check covers wrapper state whatever is read for a fit: a NaN in
    lm_head.original_module.weight (modules_to_save=["lm_head"] with save_embedding_layers) is refused."""
    from peft import LoraConfig, get_peft_model

    from loraops.registry import Registry

    base, adapter = edited_tied_copy(tmp_path)
    reads = []
    read_for_fit = formats.read_for_fit
    monkeypatch.setattr(formats, "read_for_fit", lambda *a, **k: reads.append(a) or read_for_fit(*a, **k))
    with Registry.open() as reg:
        record = reg.register_adapter(adapter, name="edited").record
        assert reads == [] and record.base is None
        reg.add_base(str(base), name="tied")
        again = reg.register_adapter(adapter, name="edited")
        assert len(reads) == 1 and again.record.id == record.id and again.record.base is None
        with pytest.raises(MismatchError, match="PEFT's load keeps tied"):
            reg.register_adapter(adapter, base="tied")
        assert len(reads) == 2
    model = get_peft_model(load_model(base), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model.save_pretrained(tmp_path / "w", save_embedding_layers=True)
    weights = tmp_path / "w" / "adapter_model.safetensors"
    saved = load_file(weights)
    saved["base_model.model.lm_head.original_module.weight"][3, 1] = float("nan")
    save_file(saved, weights, metadata={"format": "pt"})
    with Registry.open() as reg:
        for given in (None, "tied"):
            with pytest.raises(InvalidInputError, match="lm_head.original_module.weight' contains NaN or Inf"):
                reg.register_adapter(tmp_path / "w", base=given)


@pytest.mark.parametrize("saves", [[], ["norm"]])
def test_a_peft_rewrite_keeps_saved_embedding_layers_tied(tmp_path, saves):
    """A tied Llama's adapter saved with save_embedding_layers=True (the embeddings and head edited alike) written
    back as PEFT: the layers stay plain keys, not modules_to_save entries, so PEFT loads the rewrite with the head
    still tied to the embeddings (listed, it wrapped two untied copies) and computes what the original computes."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_llama(tmp_path / "base", tie=True, hidden=16, layers=1, intermediate=32, vocab=128)
    torch.manual_seed(1)
    model = get_peft_model(load_model(base), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                                         modules_to_save=saves))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    saved = load_file(weights)
    for name in (EMBED, "lm_head.weight"):
        saved[f"base_model.model.{name}"] = saved[f"base_model.model.{name}"] + 0.25
    save_file(saved, weights, metadata={"format": "pt"})
    formats.write_adapter(formats.read_adapter(tmp_path / "a"), tmp_path / "b", "peft")
    entries = json.loads((tmp_path / "b" / "adapter_config.json").read_text())["modules_to_save"] or []
    assert not any(entry.endswith(("embed_tokens", "lm_head")) for entry in entries)
    outputs = []
    for folder in ("a", "b"):
        inner = (loaded := PeftModel.from_pretrained(load_model(base), tmp_path / folder)).base_model.model
        assert inner.get_output_embeddings().weight is inner.get_input_embeddings().weight
        outputs.append(logits(loaded))
    torch.testing.assert_close(outputs[1], outputs[0], atol=0, rtol=0)


SAVED_LAYER_FAMILIES = {  # (model_type, class, config, LoRA targets): the tied bases whose head merge's causal-LM rule misses
    "bert": ("bert", "BertForMaskedLM", TINY_BERT, ["query"]),
    "t5": ("t5", "T5ForConditionalGeneration", {"d_model": 32, "d_ff": 64, "num_layers": 1, "num_heads": 4, "d_kv": 8,
                                                 "vocab_size": 100}, ["q"]),
    "bart": ("bart", "BartForConditionalGeneration", {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
                                                       "encoder_attention_heads": 4, "decoder_attention_heads": 4,
                                                       "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": 100,
                                                       "max_position_embeddings": 64}, ["q_proj"]),
}


@pytest.mark.parametrize("family", sorted(SAVED_LAYER_FAMILIES))
@pytest.mark.parametrize("edited", ["embeddings", "head", "both"])
def test_embedding_layers_saved_on_a_tied_base_of_any_family(tmp_path, family, edited):
    """save_embedding_layers=True on BERT, T5, BART (tied): PEFT saves the input embeddings and the head, one tied
    weight under two names. Both edited alike: merged as PEFT merges. One edited: refused (PEFT's load keeps the last
    read), not merged with the embeddings and head untied (merge passes no config, only sides)."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    model_type, cls_name, config, targets = SAVED_LAYER_FAMILIES[family]
    base = tiny_transformers(tmp_path / "base", model_type, cls_name, **config)
    cls = getattr(transformers, cls_name)
    torch.manual_seed(1)
    model = get_peft_model(cls.from_pretrained(base), LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    saved = load_file(weights)
    whole = [key for key in saved if "lora_" not in key and key.endswith(".weight")]
    heads = [key for key in whole if is_head(key.removeprefix("base_model.model."))]
    assert len(heads) == 1 and len(whole) == 2
    for key in {"head": heads, "embeddings": sorted(set(whole) - set(heads)), "both": whole}[edited]:
        saved[key] = saved[key] + 0.25
    save_file(saved, weights, metadata={"format": "pt"})
    if edited != "both":
        with pytest.raises(MismatchError, match="which this base ties it to and PEFT's load keeps tied"):
            engine.merge(base, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
        return
    engine.merge(base, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    reference = PeftModel.from_pretrained(cls.from_pretrained(base), tmp_path / "a").merge_and_unload()
    merged = tensors(tmp_path / "out")
    for name, tensor in reference.state_dict().items():
        if name in merged:
            torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=1e-6, msg=name)


def test_a_plain_head_weight_beside_a_lora_on_the_head_is_refused(tmp_path):
    """save_embedding_layers saves a head under a LoRA as lm_head.base_layer.weight; a plain lm_head.weight there
    (an edited file) is a key PEFT's load does not place (the wrapped layer has none): refused, not read as the
    head's replacement."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(tmp_path / "base", tie=False, hidden=16, layers=1, intermediate=32, vocab=128)
    torch.manual_seed(1)
    model = get_peft_model(load_model(base), LoraConfig(r=2, target_modules=["q_proj", "lm_head"],
                                                         init_lora_weights=False))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    saved = load_file(weights)
    saved["base_model.model.lm_head.weight"] = saved.pop("base_model.model.lm_head.base_layer.weight") + 0.25
    save_file(saved, weights, metadata={"format": "pt"})
    with pytest.raises(FormatError, match=r"unknown adapter key layout: 'base_model.model.lm_head.weight'"):
        formats.read_adapter(tmp_path / "a")


def test_a_saved_layer_head_the_base_has_none_of_is_refused(tmp_path):
    """A BERT adapter saved with save_embedding_layers=True, edited to hold an lm_head.weight too: BertForMaskedLM's
    head is cls.predictions.decoder, so PEFT never writes lm_head.weight and its load puts it nowhere. Refused, not
    written into the merged model as a head the base has none of."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model_type, cls_name, config, targets = SAVED_LAYER_FAMILIES["bert"]
    base = tiny_transformers(tmp_path / "base", model_type, cls_name, **config)
    torch.manual_seed(1)
    model = get_peft_model(getattr(transformers, cls_name).from_pretrained(base),
                           LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    saved = load_file(weights)
    saved["base_model.model.lm_head.weight"] = torch.randn(100, 32)
    save_file(saved, weights, metadata={"format": "pt"})
    with pytest.raises(MismatchError, match=r"lm_head.weight \(not this base's head \('cls.predictions.decoder.weight'"):
        engine.merge(base, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama", "roberta"])
def test_tokens_tied_to_a_head_modules_to_save_saves_whole_are_refused_as_peft_cannot_run_them(tmp_path, family):
    """Trainable tokens on a tied model's embeddings beside modules_to_save on the tied head (a Llama's ["lm_head"],
    RoBERTa's ["decoder"]): PEFT ties the tokens to the head, wrapping the ModulesToSaveWrapper, and its model with
    the adapter cannot run (a ValueError in forward). Refused by the reader with that reason, not as tensors missing
    from the base."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    if family == "llama":
        base, cls = tiny_llama(tmp_path / "base", tie=True, hidden=16, layers=1, intermediate=32, vocab=128), None
        config = dict(target_modules=["q_proj"], modules_to_save=["lm_head"], trainable_token_indices=[3, 5])
    else:
        base = tiny_transformers(tmp_path / "base", "roberta", "RobertaForMaskedLM", **TINY_BERT)
        cls = transformers.RobertaForMaskedLM
        config = dict(target_modules=["query"], modules_to_save=["decoder"],
                      trainable_token_indices={"word_embeddings": [3, 5]})
    load = (lambda: cls.from_pretrained(base)) if cls else (lambda: load_model(base))
    get_peft_model(load(), LoraConfig(r=2, init_lora_weights=False, **config)).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="TrainableTokensLayer wraps an unknown layer type"):
        PeftModel.from_pretrained(load(), tmp_path / "a")(torch.tensor([[3, 5, 7]]))
    with pytest.raises(FormatError, match="trainable tokens tied to a module modules_to_save saves whole: PEFT's model "
                                          "with this adapter cannot run"):
        formats.read_adapter(tmp_path / "a")


def test_a_roberta_head_ensure_weight_tying_saves_with_save_embedding_layers_merges_as_peft_loads_it(tmp_path):
    """RoBERTa with modules_to_save=["lm_head"], ensure_weight_tying and save_embedding_layers=True: PEFT wraps the
    output embeddings (lm_head.decoder) and the tied word embeddings, and saves the decoder's wrapper state with its
    base layer's bias (tied to lm_head.bias) as lm_head.decoder.original_module.bias alone. That key goes into the
    wrapped base layer, which PEFT's adapted model does not use: read as wrapper state, not refused as a tensor the
    base lacks, and merged to PEFT's adapted model's logits."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_transformers(tmp_path / "base", "roberta", "RobertaForMaskedLM", **TINY_BERT)
    cls = transformers.RobertaForMaskedLM
    torch.manual_seed(1)
    model = get_peft_model(cls.from_pretrained(base), LoraConfig(r=2, target_modules=["query"], init_lora_weights=False,
                                                                  modules_to_save=["lm_head"], ensure_weight_tying=True))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    assert "base_model.model.lm_head.decoder.original_module.bias" in load_file(tmp_path / "a" / "adapter_model.safetensors")
    engine.merge(base, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    ids = torch.tensor([[0, 3, 5, 7, 2]])
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(cls.from_pretrained(base), tmp_path / "a")(ids).logits
        ours = cls.from_pretrained(tmp_path / "out")(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stored_twice", [False, True])
@pytest.mark.parametrize("targets", [["decoder", "query"], ["word_embeddings", "query"], ["word_embeddings", "decoder"]])
def test_an_edited_decoder_bias_saved_with_the_layers_reaches_the_tied_bias_as_peft_loads_it(tmp_path, targets,
                                                                                              stored_twice):
    """RoBERTa (tied) with a LoRA on lm_head.decoder or the word embeddings, saved with save_embedding_layers=True:
    PEFT saves the decoder's bias (lm_head.decoder.base_layer.bias under its LoRA, lm_head.decoder.bias beside the
    embeddings') and loads it into the one parameter lm_head.bias is. Edited, it is the merged model's decoder bias
    and the merge computes PEFT's loaded model's logits, on a base that stores lm_head.bias alone (the bias bound to
    it) or lm_head.decoder.bias too (an older checkpoint: stored twice)."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_transformers(tmp_path / "base", "roberta", "RobertaForMaskedLM", **TINY_BERT)
    if stored_twice:
        state = load_file(base / "model.safetensors")
        save_file({**state, "lm_head.decoder.bias": state["lm_head.bias"].clone()}, str(base / "model.safetensors"),
                  metadata={"format": "pt"})
    cls = transformers.RobertaForMaskedLM
    torch.manual_seed(1)
    model = get_peft_model(cls.from_pretrained(base), LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    saved = load_file(weights)
    key = next(key for key in saved if key.startswith("base_model.model.lm_head.decoder.") and key.endswith(".bias"))
    assert key.endswith("base_layer.bias") == ("decoder" in targets)
    saved[key] = saved[key] + 0.25
    save_file(saved, weights, metadata={"format": "pt"})
    reference = PeftModel.from_pretrained(cls.from_pretrained(base), tmp_path / "a")
    torch.testing.assert_close(reference.base_model.model.lm_head.bias, saved[key], atol=0, rtol=0)
    engine.merge(base, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    merged = cls.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(merged.lm_head.decoder.bias, saved[key], atol=0, rtol=0)
    ids = torch.tensor([[0, 3, 5, 7, 2]])
    with torch.no_grad():
        theirs, ours = reference(ids).logits, merged(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def saved_layers_edited(base, folder, targets, edited):
    """A LoRA on ``targets`` saved with save_embedding_layers=True, the saved layers under the LoRAs of ``edited``
    (tensor names) moved by 0.25: the file's tensors."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(load_model(base), LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(folder, save_embedding_layers=True)
    saved = load_file(folder / "adapter_model.safetensors")
    for name in edited:
        key = f"base_model.model.{name.removesuffix('.weight')}.base_layer.weight"
        saved[key] = saved[key] + 0.25
    save_file(saved, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return saved


@pytest.mark.parametrize("stored_twice", [False, True])
def test_an_edited_saved_layer_under_the_heads_lora_reaches_the_tied_embeddings(tmp_path, stored_twice):
    """A tied Llama with a LoRA on lm_head saved with save_embedding_layers=True: PEFT saves the head's layer
    (lm_head.base_layer.weight) and loads it into the one weight the head and the embeddings share, so an edited one
    changes the embeddings too (the head read last). Merged so (was: the head alone, the logits far off)."""
    from peft import PeftModel

    base = tiny_llama(tmp_path / "base", tie=True, hidden=16, layers=1, intermediate=32, vocab=128)
    if stored_twice:
        state = load_file(base / "model.safetensors")
        save_file({**state, "lm_head.weight": state[EMBED].clone()}, str(base / "model.safetensors"),
                  metadata={"format": "pt"})
    saved = saved_layers_edited(base, tmp_path / "a", ["q_proj", "lm_head"], ["lm_head.weight"])
    key = "base_model.model.lm_head.base_layer.weight"
    reference = PeftModel.from_pretrained(load_model(base), tmp_path / "a")
    inner = reference.base_model.model
    torch.testing.assert_close(inner.model.embed_tokens.weight, saved[key], atol=0, rtol=0)
    engine.merge(base, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    torch.testing.assert_close(tensors(tmp_path / "out")[EMBED], saved[key], atol=0, rtol=0)
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), logits(reference), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("edited", [(EMBED,), ("lm_head.weight",)])
def test_edited_saved_layers_under_loras_on_tied_embeddings_and_head_are_refused(tmp_path, edited):
    """A tied Llama with LoRAs on embed_tokens and lm_head saved with save_embedding_layers=True: PEFT saves both
    layers (one tied weight) and its load keeps whichever it reads last. One edited: refused by check and merge, as
    beside no LoRA (was: check fitted it and the merge wrote the two apart, its logits off PEFT's)."""
    from loraops.basemodel import BaseModel

    base = tiny_llama(tmp_path / "base", tie=True, hidden=16, layers=1, intermediate=32, vocab=128)
    saved_layers_edited(base, tmp_path / "a", ["q_proj", "embed_tokens", "lm_head"], edited)
    model = BaseModel.open(base)
    report = check.check(formats.read_for_fit(tmp_path / "a"), model.tensors, config=model.config)
    assert not report.ok and "PEFT's load keeps tied" in report.why_missing["lm_head.weight"]
    with pytest.raises(MismatchError, match="which this base ties it to and PEFT's load keeps tied"):
        engine.merge(base, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
