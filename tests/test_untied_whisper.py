"""Whisper ties its output head (proj_out) to the decoder's embed_tokens while tie_word_embeddings is true, and stores
it only then. A LoRA on decoder.embed_tokens changes PEFT's decoder lookup alone (proj_out reads the base weight), a
LoRA on proj_out the head alone; both were refused (Whisper was not untied). The merge now writes proj_out as a
tensor of its own and says tie_word_embeddings: false, as for BART; each is compared with PEFT's adapted model,
loaded back by transformers with nothing missing or unexpected. Trainable tokens on decoder.embed_tokens (Whisper's
input embeddings: PEFT ties them to the head) stay tied."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_tied_encoder_decoder import trained_tokens
from loraops import check, engine, formats
from loraops.basemodel import BaseModel

FEATURES, DECODER_INPUT = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(5)), torch.tensor([[2, 3, 4, 11]])


def tiny(path, cls_name="WhisperForConditionalGeneration", head=None):
    """A tiny Whisper saved by transformers 5 (proj_out not stored), or storing it byte-identical to the decoder's
    embeddings (``head`` "twice"); its class."""
    import transformers

    config = transformers.WhisperConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=16,
        max_target_positions=16, pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    cls(config).save_pretrained(path)
    if head == "twice":
        state = load_file(path / "model.safetensors")
        state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"].clone()
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return cls


def logits(model):
    with torch.no_grad():
        model = model.eval()
        if not model.config.is_encoder_decoder:  # (WhisperForCausalLM)
            return model(input_ids=DECODER_INPUT).logits
        return model(input_features=FEATURES, decoder_input_ids=DECODER_INPUT).logits


def adapted_model(tmp_path, cls, targets=None, tokens=False):
    """PEFT's adapted model of a LoRA on ``targets`` (init_lora_weights=False) and/or trained tokens (rows 4, 5, 11)
    on decoder.embed_tokens, saved at tmp_path/a."""
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    indices = {"decoder.embed_tokens": [4, 5, 11]} if tokens else None
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                        trainable_token_indices=indices) if targets \
        else TrainableTokensConfig(target_modules=["decoder.embed_tokens"], token_indices=[4, 5, 11])
    torch.manual_seed(1)
    return trained_tokens(get_peft_model(cls.from_pretrained(tmp_path / "base"), config), tmp_path / "a")


def merged(tmp_path, cls, adapted, untied):
    """Check and merge tmp_path/a into tmp_path/base: the head untied (or not), the merged model loaded with nothing
    missing or unexpected, computing the adapted model's logits (which the adapter moved off the base's)."""
    adapter, base = formats.read_adapter(tmp_path / "a"), BaseModel.open(tmp_path / "base")
    found = check.check(adapter, base.tensors, config=base.config)
    assert found.ok and found.tied_heads == ["proj_out"] * untied, check.misfits(found)
    report = engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == ["proj_out.weight"] * untied
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is not untied
    model, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (logits(adapted) - logits(cls.from_pretrained(tmp_path / "base"))).abs().max() > 0.1
    torch.testing.assert_close(logits(model), logits(adapted), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [["q_proj", "decoder.embed_tokens"], ["proj_out"], ["embed_tokens", "proj_out"]])
def test_a_lora_on_whispers_embeddings_or_head_unties_proj_out(tmp_path, targets):
    """Untied: proj_out written as the decoder's base embeddings (plus its own LoRA), the embeddings with theirs.
    (Merged into the one stored tensor, a LoRA on the embeddings put logits ~220 off the adapted model.)"""
    cls = tiny(tmp_path / "base")
    merged(tmp_path, cls, adapted_model(tmp_path, cls, targets), untied=True)
    head = load_file(tmp_path / "out" / "model.safetensors")["proj_out.weight"]
    if "proj_out" not in targets:
        assert torch.equal(head, load_file(tmp_path / "base" / "model.safetensors")["model.decoder.embed_tokens.weight"])


@pytest.mark.parametrize("head", [None, "twice"])
def test_a_lora_on_the_decoder_of_whisper_storing_its_head_twice_or_not(tmp_path, head):
    """proj_out stored byte-identical to the decoder's embeddings (as older exporters write the tie): untied as where
    it is not stored; the causal LM (WhisperForCausalLM) too."""
    cls = tiny(tmp_path / "base", head=head)
    merged(tmp_path, cls, adapted_model(tmp_path, cls, ["decoder.embed_tokens"]), untied=True)


def test_whispers_causal_lm_unties_proj_out(tmp_path):
    """WhisperForCausalLM (not an encoder-decoder model by its config, so it was untied) ties proj_out too, not the
    lm_head.weight beside model.decoder that the merge wrote (unexpected to transformers; proj_out kept the LoRA)."""
    cls = tiny(tmp_path / "base", "WhisperForCausalLM")
    merged(tmp_path, cls, adapted_model(tmp_path, cls, ["decoder.embed_tokens"]), untied=True)


@pytest.mark.parametrize("targets", [None, ["q_proj", "proj_out"]])
def test_trainable_tokens_on_whispers_decoder_embeddings(tmp_path, targets):
    """Trainable tokens on decoder.embed_tokens, Whisper's input embeddings: PEFT ties them to proj_out, so the merge
    keeps it tied (they were refused); beside a LoRA on proj_out, the head is untied with the tokens' rows in too."""
    cls = tiny(tmp_path / "base")
    merged(tmp_path, cls, adapted_model(tmp_path, cls, targets, tokens=True), untied=targets is not None)


@pytest.mark.parametrize("targets", [["q_proj"], ["q_proj", "proj_out"]])
def test_a_saved_copy_of_whispers_decoder_embeddings_unties_proj_out(tmp_path, targets):
    """modules_to_save=["embed_tokens"] (a trained full copy of the decoder's lookup): PEFT's head reads the base
    weight, so proj_out is written as the base's embeddings (plus its own LoRA), untied (was refused)."""
    from peft import LoraConfig, get_peft_model

    cls = tiny(tmp_path / "base")
    torch.manual_seed(1)
    adapted = get_peft_model(cls.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, modules_to_save=["embed_tokens"]))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter))
    adapted.eval().save_pretrained(tmp_path / "a")
    merged(tmp_path, cls, adapted, untied=True)


def test_subtracting_an_untied_whisper_merge_gives_the_base_back(tmp_path):
    """The untied merge's proj_out is the base's (or carries its own LoRA): subtracting the adapter leaves a model that
    computes the base's logits (untied: tie_word_embeddings stays false)."""
    cls = tiny(tmp_path / "base")
    merged(tmp_path, cls, adapted_model(tmp_path, cls, ["q_proj", "decoder.embed_tokens", "proj_out"]), untied=True)
    engine.subtract(tmp_path / "out", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "back", progress=False)
    torch.testing.assert_close(logits(cls.from_pretrained(tmp_path / "back")),
                               logits(cls.from_pretrained(tmp_path / "base")), atol=1e-5, rtol=1e-5)
