"""A PEFT LoRA on the ``shared`` embeddings of T5 and BART (target_modules=["shared", …]). transformers 5 ties
shared.weight to the encoder's and decoder's embed_tokens and to lm_head, but they are modules of their own: PEFT's
wrapper of ``shared`` is never called by the forward, so the adapted model computes as if the LoRA were not there,
and training leaves it at its zero init (it gets no gradient). loraops merges it into shared.weight, the tensor it
names, as PEFT's merge_and_unload does: a trained one changes nothing, so the merged model computes what the adapted
model computes; a nonzero one (loraops extract --modules shared of a fine-tune that changed shared.weight) changes the
lookups and the head, as the fine-tune did."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_extract import run
from loraops import engine, formats

INPUT = torch.tensor([[5, 6, 7, 8, 9, 10]])
DECODER_INPUT = torch.tensor([[0, 3, 4, 11]])


def tiny(kind):
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if kind == "t5":
        return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                   num_heads=4, decoder_start_token_id=0)), ["shared", "q"]
    return BartForConditionalGeneration(BartConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)), ["shared", "q_proj"]


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=INPUT, decoder_input_ids=DECODER_INPUT).logits


def adapted(tmp_path, kind, **lora):
    """The base saved, and PEFT's adapted model of a LoRA on shared and the queries, saved."""
    from peft import LoraConfig, get_peft_model

    base, targets = tiny(kind)
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **lora))
    return model


@pytest.mark.parametrize("kind", ["t5", "bart", "t5, three copies"])
def test_a_nonzero_lora_on_shared_merges_into_the_tied_tensor(tmp_path, kind):
    """A nonzero LoRA on shared (init_lora_weights=False): the adapted model's forward does not apply it, PEFT's
    merge_and_unload adds it to the tied tensor; loraops' merged checkpoint, loaded by transformers, computes what
    PEFT's merge computes (not the adapted model: documented in docs/architectures.md). ("three copies": a T5
    checkpoint from before transformers 5, shared.weight stored also as each side's embed_tokens: every copy gets the
    change, the T5 being one that may be untied.)"""
    copies, kind = kind.endswith("three copies"), kind.partition(",")[0]
    model = adapted(tmp_path, kind, init_lora_weights=False)
    model.save_pretrained(tmp_path / "a")
    if copies:
        state = load_file(tmp_path / "base" / "model.safetensors")
        state.update({f"{side}.embed_tokens.weight": state["shared.weight"].clone() for side in ("encoder", "decoder")})
        save_file(state, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    shared = "shared" if kind == "t5" else "model.shared"
    with_shared = logits(model)
    peft_merged = logits(copy.deepcopy(model).merge_and_unload())
    with torch.no_grad():
        model.base_model.model.get_submodule(shared).lora_embedding_B["default"].zero_()
    assert torch.equal(with_shared, logits(model))  # the adapted model's forward never reads it
    assert (peft_merged - with_shared).abs().max() > 1
    engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", device="cpu")
    merged = type(model.base_model.model).from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(merged), peft_merged, rtol=0, atol=1e-4)


def test_extract_of_shared_merges_back_to_the_fine_tune(tmp_path):
    """extract --modules shared of a T5 fine-tune that changed its tied embeddings, merged back into the base: the
    fine-tune's output (the reason a nonzero LoRA on shared is merged into the tied tensor, not refused)."""
    base, _ = tiny("t5")
    base.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        base.shared.weight += 0.1 * torch.randn_like(base.shared.weight)
    base.save_pretrained(tmp_path / "tuned")
    code, out = run("extract", "--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--modules", "shared",
                    "--rank", "32", "-o", tmp_path / "x")
    assert code == 0, out
    code, out = run("merge", tmp_path / "x", "--into", tmp_path / "base", "-o", tmp_path / "out")
    assert code == 0, out
    merged = type(base).from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(merged), logits(base), rtol=0, atol=1e-5)
    assert (logits(merged) - logits(type(base).from_pretrained(tmp_path / "base"))).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_a_trained_lora_on_shared_merges_as_the_adapted_model(tmp_path, kind):
    """Trained as PEFT trains it (PEFT zeroes an embedding LoRA's A, a linear one's B; an AdamW step with weight decay), the LoRA on shared stays zero and
    the queries' do not: the merged checkpoint, loaded by transformers, computes what the adapted model computes."""
    model = adapted(tmp_path, kind)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    for _ in range(2):
        model(input_ids=INPUT, decoder_input_ids=DECODER_INPUT, labels=DECODER_INPUT).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    expected = logits(model)
    model.save_pretrained(tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    shared = "shared" if kind == "t5" else "model.shared"
    changed = {name for name, m in adapter.modules.items() if m.A.any() and m.B.any()}
    assert shared not in changed and changed
    engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", device="cpu")
    merged = type(model.base_model.model).from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)
    assert (expected - logits(tiny(kind)[0])).abs().max() > 1e-3  # (the queries' LoRA changed something)


def other_tiny(kind):
    """A tiny NLLB-MoE, PegasusX, Switch Transformers or ProphetNet (saved tied: the head and each side's lookup not
    stored); the path of the embeddings it stores."""
    import transformers

    small = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64, max_position_embeddings=32,
                 decoder_start_token_id=0)
    torch.manual_seed(0)
    if kind == "nllb_moe":
        return transformers.NllbMoeForConditionalGeneration(transformers.NllbMoeConfig(
            **small, num_experts=2, expert_capacity=4)), "model.shared"
    if kind == "pegasus_x":
        return transformers.PegasusXForConditionalGeneration(transformers.PegasusXConfig(
            **small, num_global_tokens=2, block_size=4)), "model.shared"
    if kind == "switch":
        return transformers.SwitchTransformersForConditionalGeneration(transformers.SwitchTransformersConfig(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            num_experts=2, expert_capacity=4, decoder_start_token_id=0)), "shared"
    return transformers.ProphetNetForConditionalGeneration(transformers.ProphetNetConfig(
        vocab_size=64, hidden_size=32, encoder_ffn_dim=64, decoder_ffn_dim=64, num_encoder_layers=1,
        num_decoder_layers=1, num_encoder_attention_heads=4, num_decoder_attention_heads=4, max_position_embeddings=32,
        ngram=2, num_buckets=8, relative_max_distance=16, decoder_start_token_id=0)), "prophetnet.word_embeddings"


@pytest.mark.parametrize("kind", ["nllb_moe", "pegasus_x", "switch", "prophetnet"])
def test_other_tied_encoder_decoder_models_merge_their_stored_embeddings_or_refuse(tmp_path, kind):
    """Models loraops does not untie, each checked against transformers 5.24 and PEFT 0.21: a nonzero LoRA on the
    embeddings they store (which their forward never calls: each side has its own lookup module) merges as PEFT's
    merge_and_unload, into the one tied tensor, as T5's shared does; a LoRA on the tied head (and ProphetNet's, on
    one side's lookup: not stored) is refused in one line, by check too."""
    from peft import LoraConfig, get_peft_model

    from loraops import check
    from loraops.basemodel import BaseModel
    from loraops.errors import MismatchError

    model, stored = other_tiny(kind)
    model.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=rf"^{re.escape(stored)}$",
                                               init_lora_weights=False)).eval()
    adapted.save_pretrained(tmp_path / "a")
    peft_merged = logits(copy.deepcopy(adapted).merge_and_unload())
    assert (peft_merged - logits(adapted)).abs().max() > 1
    engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", device="cpu")
    merged = type(model).from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(merged), peft_merged, rtol=0, atol=1e-4)

    base = BaseModel.open(tmp_path / "base")
    for targets in (["lm_head"], ["decoder.word_embeddings" if kind == "prophetnet" else "decoder.embed_tokens"]):
        torch.manual_seed(1)
        get_peft_model(type(model).from_pretrained(tmp_path / "base"), LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)).save_pretrained(tmp_path / "b")
        adapter = formats.read_adapter(tmp_path / "b")
        found = check.check(adapter, base.tensors, config=base.config)
        assert not found.ok and len(check.misfits(found)) == 1
        with pytest.raises(MismatchError):
            engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "refused", device="cpu")
        assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("kind, edited", [("nllb_moe", None), ("pegasus_x", None), ("prophetnet", None),
                                          ("nllb_moe", "lm_head.weight"),
                                          ("pegasus_x", "model.decoder.embed_tokens.weight"),
                                          ("prophetnet", "prophetnet.encoder.word_embeddings.weight")])
def test_trainable_tokens_on_the_stored_embeddings_of_other_tied_models_merge_tied(tmp_path, kind, edited):
    """PEFT's trainable tokens on the embeddings NLLB-MoE, PegasusX and ProphetNet store (TrainableTokensConfig): the
    adapter saves PEFT's tied copies (the same rows and values) under lm_head and each side's lookup too, which were
    refused twice (a tied head loraops does not untie; one side's tokens). Copies of the stored embeddings' tokens,
    they are left out: merged into the stored tensor, the model tied, the merged model computes the adapted model's
    logits. A copy that differs from its source (``edited``) stays refused, by check and merge."""
    from peft import TrainableTokensConfig, get_peft_model

    from loraops import check
    from loraops.basemodel import BaseModel
    from loraops.errors import MismatchError

    model, stored = other_tiny(kind)
    model.save_pretrained(tmp_path / "base")
    cls = type(model)
    torch.manual_seed(1)
    adapted = get_peft_model(cls.from_pretrained(tmp_path / "base"),
                             TrainableTokensConfig(target_modules=[stored], token_indices=[4, 5, 11])).eval()
    with torch.no_grad():
        next(d for n, d in adapted.named_parameters() if "trainable_tokens_delta" in n).add_(torch.randn(3, 32))
    adapted.save_pretrained(tmp_path / "a")
    saved = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(saved)
    assert len([n for n in tensors if "trainable_tokens_delta" in n]) == 4  # shared's, each side's, the head's
    if edited:
        key = next(n for n in tensors if n.startswith(f"base_model.model.{edited.removesuffix('.weight')}."))
        tensors[key] = tensors[key] + 1
        save_file(tensors, str(saved), metadata={"format": "pt"})
    adapter, base = formats.read_adapter(tmp_path / "a"), BaseModel.open(tmp_path / "base")
    found = check.check(adapter, base.tensors, config=base.config)
    if edited:
        assert not found.ok and [edited] == [m.partition(" ")[0] for m in check.misfits(found)]
        with pytest.raises(MismatchError):
            engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "refused", device="cpu")
        assert not (tmp_path / "refused").exists()
        return
    assert found.ok and not found.tied_heads, check.misfits(found)
    report = engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", device="cpu")
    assert not report.heads_untied
    merged, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (logits(adapted) - logits(cls.from_pretrained(tmp_path / "base"))).abs().max() > 0.1
    torch.testing.assert_close(logits(merged), logits(adapted), atol=1e-5, rtol=0)
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == load_file(
        tmp_path / "base" / "model.safetensors").keys()
