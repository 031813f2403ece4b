"""BART and its kin (mBART, PLBart, Pegasus, Marian, Blenderbot, Blenderbot-small, M2M-100, LED, BigBird-Pegasus) and
mT5: a LoRA on the output head tied to the shared embeddings was refused as an encoder-decoder model's. transformers
5 ties BART's lm_head and each side's embed_tokens to model.shared only while tie_word_embeddings is true, so an
untied merge writes the head (its LoRA in) and each side's embed_tokens (copies of shared). Each is compared with
PEFT's adapted model, loaded back by transformers with nothing missing or unexpected."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraops import check, engine, formats
from loraops.basemodel import BaseModel
from loraops.errors import InvalidInputError, MismatchError

SMALL = dict(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)
T5_SMALL = dict(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8)
MODELS = {
    "bart": ("BartConfig", "BartForConditionalGeneration", SMALL),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", SMALL),
    "plbart": ("PLBartConfig", "PLBartForConditionalGeneration", SMALL),
    "pegasus": ("PegasusConfig", "PegasusForConditionalGeneration", SMALL),
    "marian": ("MarianConfig", "MarianMTModel", dict(SMALL, decoder_vocab_size=64, pad_token_id=63)),
    "marian, unshared": ("MarianConfig", "MarianMTModel", dict(SMALL, decoder_vocab_size=64, pad_token_id=63,
                                                               share_encoder_decoder_embeddings=False)),
    "blenderbot": ("BlenderbotConfig", "BlenderbotForConditionalGeneration", SMALL),
    "blenderbot-small": ("BlenderbotSmallConfig", "BlenderbotSmallForConditionalGeneration", SMALL),
    "m2m_100": ("M2M100Config", "M2M100ForConditionalGeneration", SMALL),
    "led": ("LEDConfig", "LEDForConditionalGeneration", dict(SMALL, max_encoder_position_embeddings=32,
                                                             max_decoder_position_embeddings=32, attention_window=[4])),
    "bigbird_pegasus": ("BigBirdPegasusConfig", "BigBirdPegasusForConditionalGeneration",
                        dict(SMALL, attention_type="original_full")),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", T5_SMALL),
    "t5": ("T5Config", "T5ForConditionalGeneration", T5_SMALL),
    "pop2piano": ("Pop2PianoConfig", "Pop2PianoForConditionalGeneration", T5_SMALL),
}
INPUT, DECODER_INPUT = torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([[0, 3, 4, 11]])


def tiny(path, kind, head=None):
    """A tiny model of ``kind`` saved by transformers 5 (the head not stored), or storing ``head``: "twice" (a copy
    byte-identical to the shared embeddings, as older exporters wrote it); its class."""
    import transformers

    config_name, class_name, config = MODELS[kind]
    cls = getattr(transformers, class_name)
    torch.manual_seed(0)
    cls(getattr(transformers, config_name)(**config, decoder_start_token_id=0)).save_pretrained(path)
    if head == "twice":
        state = load_file(path / "model.safetensors")
        state["lm_head.weight"] = state[next(n for n in state if n.endswith("shared.weight"))].clone()
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return cls


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=INPUT, decoder_input_ids=DECODER_INPUT).logits


def lora(cls, base, out, targets, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(cls.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                 **{"init_lora_weights": False, **config})).eval()
    model.save_pretrained(out)
    return model


def merged_as_adapted(tmp_path, cls, adapted, moved=1e-2, head="lm_head"):
    """Merge the adapter saved at tmp_path/a into tmp_path/base: check says the head is untied, the merge unties it,
    and the merged model loads with nothing missing and computes the adapted model's logits (``moved``: at least
    that far from the base's). Its tensors."""
    adapter, base = formats.read_adapter(tmp_path / "a"), BaseModel.open(tmp_path / "base")
    found = check.check(adapter, base.tensors, config=base.config)
    assert found.ok and found.tied_heads == [head], check.misfits(found)
    report = engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == [f"{head}.weight"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    merged, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(merged), logits(adapted), atol=1e-5, rtol=1e-5)
    assert (logits(adapted) - logits(cls.from_pretrained(tmp_path / "base"))).abs().max() > moved
    return load_file(tmp_path / "out" / "model.safetensors")


@pytest.mark.parametrize("kind", [kind for kind in MODELS if kind != "pop2piano"])  # (Pop2Piano stores its head)
def test_a_lora_on_the_tied_head_unties_it(tmp_path, kind):
    """A LoRA on lm_head (and the queries): written untied, each side's embed_tokens stored as shared's copy where
    the untied config no longer ties them to it (mT5's config forces the tie: its head loads untied by its values)."""
    cls = tiny(tmp_path / "base", kind)
    adapted = lora(cls, tmp_path / "base", tmp_path / "a", ["q" if kind.endswith("t5") else "q_proj", "lm_head"])
    merged = merged_as_adapted(tmp_path, cls, adapted)
    shared = next((n for n in merged if n.endswith("shared.weight")), None)
    if not kind.endswith("t5") and shared is not None:
        for side in ("encoder", "decoder"):
            assert torch.equal(merged[shared.replace("shared", f"{side}.embed_tokens")], merged[shared])


@pytest.mark.parametrize("kind", ["bart", "mt5", "t5"])
def test_a_head_stored_twice_is_untied_and_listed(tmp_path, kind):
    """The head stored byte-identical to the shared embeddings (the tie, as older exporters save it): merged untied
    as where it is not stored, and check lists it among the tied heads as there."""
    cls = tiny(tmp_path / "base", kind, head="twice")
    adapted = lora(cls, tmp_path / "base", tmp_path / "a", ["q" if kind.endswith("t5") else "q_proj", "lm_head"])
    merged_as_adapted(tmp_path, cls, adapted)
    base = BaseModel.open(tmp_path / "base")
    assert check.check(formats.read_adapter(tmp_path / "a"), base.tensors, config=base.config).tied_heads == ["lm_head"]


def test_a_lora_on_shared_and_the_head_gives_each_its_own(tmp_path):
    """A LoRA on shared as PEFT trains it (its A starts at zero and gets no gradient: shared's forward is never
    called) with one on lm_head: the adapted model's logits. A nonzero one on shared (extract --modules shared) goes
    into shared and each side's embed_tokens, as where nothing is untied (tests/test_encoder_decoder_shared.py); the
    head gets its own LoRA alone, on the base's values."""
    cls = tiny(tmp_path / "base", "bart")
    adapted = lora(cls, tmp_path / "base", tmp_path / "a", ["shared", "lm_head"], init_lora_weights=True)
    with torch.no_grad():  # (PEFT's default init leaves the head's LoRA zero too: give it a trained-like B)
        adapted.base_model.model.lm_head.lora_B["default"].weight.normal_()
    adapted.save_pretrained(tmp_path / "a")
    merged_as_adapted(tmp_path, cls, adapted)

    adapted = lora(cls, tmp_path / "base", tmp_path / "nonzero", ["shared", "lm_head"])
    engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "nonzero"), 1.0)], tmp_path / "out2",
                 progress=False)
    base, merged = load_file(tmp_path / "base" / "model.safetensors"), load_file(tmp_path / "out2" / "model.safetensors")
    model = adapted.base_model.model
    shared = base["model.shared.weight"] + model.model.shared.get_delta_weight("default")
    torch.testing.assert_close(merged["model.shared.weight"], shared, atol=1e-6, rtol=0)
    for side in ("encoder", "decoder"):
        assert torch.equal(merged[f"model.{side}.embed_tokens.weight"], merged["model.shared.weight"])
    torch.testing.assert_close(merged["lm_head.weight"],
                               base["model.shared.weight"] + model.lm_head.get_delta_weight("default"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", ["prophetnet", "switch_transformers", "udop"])
def test_other_encoder_decoder_models_stay_refused(tmp_path, model_type):
    """An encoder-decoder model not checked against transformers untied (ProphetNet; Switch Transformers and
    UDOP scale their decoder's output when tied): a LoRA on its tied head is refused, by check too, naming the
    families loraops unties."""
    from loraops.adapter import Adapter, LoraModule

    tiny(tmp_path / "base", "bart")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    head = LoraModule(name="lm_head", A=torch.randn(4, 32), B=torch.randn(64, 4), alpha=4.0, scale=1.0)
    adapter = Adapter(modules={"lm_head": head}, format="peft")
    why = "in an encoder-decoder model loraops does not untie: it unties only T5's"
    with pytest.raises(MismatchError, match=why):
        engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False)
    base = BaseModel.open(tmp_path / "base")
    assert why in check.misfits(check.check(adapter, base.tensors, config=base.config))[0]


def test_bart_and_mt5_are_untied_at_the_top_level_only():
    """A BART or mT5 as a composite model's text model (BLIP-2 with a BART) is not untied: its side embeddings would
    have to be written under the text model (untied_side_embeddings reads the top level), which is not checked."""
    for model_type in ("bart", "mt5", "t5"):
        assert check.can_untie({"is_encoder_decoder": True, "model_type": model_type})
        assert check.can_untie({"is_encoder_decoder": True, "model_type": "blip-2",
                                "text_config": {"model_type": model_type}}) is (model_type == "t5")
    assert check.untied_side_embeddings("model.shared.weight", {"model_type": "bart"}) == [
        "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"]
    assert check.untied_side_embeddings("language_model.model.shared.weight", {"model_type": "blip-2"}) == []


def test_a_sharded_bart_lists_its_side_embeddings_in_the_index(tmp_path):
    """Sharded: each side's embed_tokens is written in shared's shard, and the index names it there (else
    transformers would not find it)."""
    cls = tiny(tmp_path / "one", "bart")
    cls.from_pretrained(tmp_path / "one").save_pretrained(tmp_path / "base", max_shard_size="20KB")
    assert len(list((tmp_path / "base").glob("*.safetensors"))) > 1
    adapted = lora(cls, tmp_path / "base", tmp_path / "a", ["q_proj", "lm_head"])
    engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert {index[f"model.{side}.embed_tokens.weight"] for side in ("encoder", "decoder")} == {
        index["model.shared.weight"]}
    merged, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"]
    torch.testing.assert_close(logits(merged), logits(adapted), atol=1e-5, rtol=1e-5)


def test_a_second_merge_into_the_untied_model_changes_each_side_alone(tmp_path):
    """The untied merge stores BART's shared and each side's embed_tokens as byte-identical copies, which its config
    (tie_word_embeddings: false) makes three parameters: a LoRA on each side's embed_tokens merged into that model
    changes that side alone, as in PEFT's adapted model (it was summed into all three, as if they were one)."""
    cls = tiny(tmp_path / "base", "bart")
    lora(cls, tmp_path / "base", tmp_path / "a", ["q_proj", "lm_head"])
    engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "untied", progress=False)
    adapted = lora(cls, tmp_path / "untied", tmp_path / "sides", ["embed_tokens"])
    engine.merge(tmp_path / "untied", [(formats.read_adapter(tmp_path / "sides"), 1.0)], tmp_path / "out",
                 progress=False)
    merged, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(merged), logits(adapted), atol=1e-5, rtol=1e-5)
    untied, out = load_file(tmp_path / "untied" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["model.shared.weight"], untied["model.shared.weight"])


def test_the_untied_merge_is_subtracted_against_its_pristine_base(tmp_path):
    """merge + subtract of an untied BART, compared with the pristine base (as `subtract` does for a recorded merge
    taken off whole): the head and each side's embed_tokens, which that base does not store, are compared with the
    shared embeddings they were tied to (it was refused: "cannot serve as the pristine base ('lm_head.weight'
    differs)")."""
    cls = tiny(tmp_path / "base", "bart")
    lora(cls, tmp_path / "base", tmp_path / "a", ["shared", "q_proj", "lm_head"])
    adapter = formats.read_adapter(tmp_path / "a")
    engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "merged", progress=False)
    report = engine.subtract(tmp_path / "merged", [(adapter, 1.0)], tmp_path / "back", progress=False,
                             reference=tmp_path / "base")
    assert report.residual.compared_to == str(tmp_path / "base")
    assert report.residual.max_abs_diff < 1e-5
    back, base = load_file(tmp_path / "back" / "model.safetensors"), load_file(tmp_path / "base" / "model.safetensors")
    for name in ("lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
        torch.testing.assert_close(back[name], base["model.shared.weight"], atol=1e-5, rtol=0)


def test_a_head_stored_twice_that_is_not_untied_is_not_listed(tmp_path):
    """A head stored byte-identical to the shared embeddings of an encoder-decoder model loraops does not untie: the
    merge changes both copies alike (one tied parameter) and check does not list it as a head the merge unties."""
    tiny(tmp_path / "base", "bart", head="twice")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "model_type": "switch_transformers"}))
    lora(tiny(tmp_path / "bart", "bart"), tmp_path / "bart", tmp_path / "a", ["lm_head"])
    adapter, base = formats.read_adapter(tmp_path / "a"), BaseModel.open(tmp_path / "base")
    assert check.check(adapter, base.tensors, config=base.config).tied_heads == []
    assert engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False).heads_untied == []
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(merged["lm_head.weight"], merged["model.shared.weight"])


def with_side_copies(path, prefix="model.", head=False):
    """Store each side's embed_tokens (and ``head``: lm_head) in the checkpoint at ``path`` byte-identical to shared
    (``prefix``: "model." for BART's family, "" for a T5), as checkpoints saved before transformers 5 hold them; its
    tensors as they were."""
    base = load_file(path / "model.safetensors")
    copies = [f"{prefix}{side}.embed_tokens.weight" for side in ("encoder", "decoder")] + ["lm_head.weight"] * head
    save_file({**base, **{name: base[f"{prefix}shared.weight"].clone() for name in copies}},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    return base


@pytest.mark.parametrize("kind, side, copies", [("bart", "encoder", False), ("bart", "decoder", False),
                                               ("m2m_100", "encoder", False), ("bart", "decoder", True),
                                               ("bart", "encoder", "head"), ("marian", "encoder", True),
                                               ("marian", "decoder", True)])
def test_a_lora_on_one_sides_embed_tokens_changes_that_side_alone(tmp_path, kind, side, copies):
    """A LoRA on one side's embed_tokens, which transformers ties to model.shared (the base stores shared alone): PEFT
    applies it to that side's lookup only. It was refused ("stored once as shared"); merged untied, that side's
    embed_tokens is shared's copy with the LoRA in, the other side's and the head shared's copies as they were.
    (``copies``: a checkpoint storing each side's embed_tokens too, byte-identical to shared: the LoRA went into
    every copy; "head": one storing the head so, which check did not list while merge said it untied it. A Marian
    storing them wrote no head: the rule did not take MarianMTModel for a class with one, newly initialized.)"""
    cls = tiny(tmp_path / "base", kind, head="twice" if copies == "head" else None)
    base = with_side_copies(tmp_path / "base") if copies is True else load_file(tmp_path / "base" / "model.safetensors")
    adapted = lora(cls, tmp_path / "base", tmp_path / "a", ["q_proj", f"{side}.embed_tokens"])
    assert f"model.{side}.embed_tokens" in formats.read_adapter(tmp_path / "a").modules
    # (the encoder reaches the tiny model's logits through one cross-attention alone: 2e-3)
    merged = merged_as_adapted(tmp_path, cls, adapted, moved=1e-2 if side == "decoder" else 1e-3)
    delta = adapted.base_model.model.get_submodule(f"model.{side}.embed_tokens").get_delta_weight("default")
    other = "decoder" if side == "encoder" else "encoder"
    torch.testing.assert_close(merged[f"model.{side}.embed_tokens.weight"], base["model.shared.weight"] + delta,
                               atol=1e-6, rtol=0)
    for name in ("model.shared.weight", f"model.{other}.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(merged[name], base["model.shared.weight"]), name


@pytest.mark.parametrize("architectures", [["BartModel"], None])
def test_a_lora_on_one_sides_embed_tokens_of_a_bare_models_checkpoint_keeps_its_head(tmp_path, architectures):
    """That LoRA on a checkpoint whose config names the bare model (facebook/bart-base's and bart-large's say
    BartModel) or no class, loaded for generation as BartForConditionalGeneration: the untied merge must store the
    head as shared's copy. It wrote none (the class named has no head), and transformers loaded the untied model with
    a newly initialized lm_head."""
    cls = tiny(tmp_path / "base", "bart")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config.pop("architectures")
    (tmp_path / "base" / "config.json").write_text(json.dumps(
        config if architectures is None else {**config, "architectures": architectures}))
    adapted = lora(cls, tmp_path / "base", tmp_path / "a", ["q_proj", "encoder.embed_tokens"])
    merged = merged_as_adapted(tmp_path, cls, adapted, moved=1e-3)
    assert torch.equal(merged["lm_head.weight"], load_file(tmp_path / "base" / "model.safetensors")["model.shared.weight"])


@pytest.mark.parametrize("side", ["decoder", "encoder"])
def test_a_lora_on_unshared_marians_embed_tokens_leaves_its_head(tmp_path, side):
    """Marian with share_encoder_decoder_embeddings: false stores each side's embed_tokens and ties its head to the
    decoder's (MarianMTModel's _tied_weights_keys). A LoRA on the decoder's changes its lookup alone in PEFT's adapted
    model: the merge unties the head as the decoder's base copy (it went into the tied head too, logits hundreds off:
    the rule did not take MarianMTModel for a class with a head). One on the encoder's leaves the head tied."""
    cls = tiny(tmp_path / "base", "marian, unshared")
    adapted = lora(cls, tmp_path / "base", tmp_path / "a", ["q_proj", f"{side}.embed_tokens"])
    adapter, base = formats.read_adapter(tmp_path / "a"), BaseModel.open(tmp_path / "base")
    heads = ["lm_head"] if side == "decoder" else []
    assert check.check(adapter, base.tensors, config=base.config).tied_heads == heads
    report = engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == [f"{head}.weight" for head in heads]
    merged, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(merged), logits(adapted), atol=1e-5, rtol=1e-5)
    if side == "decoder":
        assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["lm_head.weight"],
                           load_file(tmp_path / "base" / "model.safetensors")["model.decoder.embed_tokens.weight"])


def test_a_lora_on_one_sides_embed_tokens_is_not_taken_off_a_tied_base(tmp_path):
    """subtract of that LoRA from a base that ties the side to shared (not the untied merge): there is no lookup of
    that side's own to take it off, refused in one line (as a head the base does not store is)."""
    cls = tiny(tmp_path / "base", "bart")
    lora(cls, tmp_path / "base", tmp_path / "a", ["q_proj", "decoder.embed_tokens"])
    with pytest.raises(InvalidInputError, match="'model.decoder.embed_tokens.weight' is not in the model, which ties "
                                                "it to 'model.shared.weight'"):
        engine.subtract(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out",
                        progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.registry_backend
def test_a_lora_on_one_sides_embed_tokens_registers_with_its_base(tmp_path):
    """register --base of that LoRA against a registered BART whose files are at hand: it fits, as check and merge
    say (the registry went by its recorded manifest alone, which does not say the model is BART's: refused)."""
    from test_extract import run

    cls = tiny(tmp_path / "base", "bart")
    lora(cls, tmp_path / "base", tmp_path / "a", ["q_proj", "encoder.embed_tokens"])
    assert run("base", "add", tmp_path / "base", "--name", "bart")[0] == 0
    code, out = run("register", tmp_path / "a", "--base", "bart")
    assert code == 0, out
    # and with no --base, by the base its adapter_config.json names (base_model_name_or_path: the base's folder)
    lora(cls, tmp_path / "base", tmp_path / "b", ["q_proj", "decoder.embed_tokens"])
    code, out = run("register", tmp_path / "b")
    assert code == 0 and "base bart" in out, out


def saved_embeddings(cls, base, out, changes, also=()):
    """PEFT's adapter of the queries (and ``also``) with modules_to_save=["embed_tokens"]: it wraps each side's
    embed_tokens apart (shared and the head read the base's weight), each copy changed as ``changes`` says (side → a
    seed, to simulate training; the same seed, byte-identical copies); the adapted model, checked to load back as it
    was."""
    from peft import PeftModel

    model = lora(cls, base, out, ["q" if "T5" in cls.__name__ else "q_proj", *also], modules_to_save=["embed_tokens"])
    prefix = "" if "T5" in cls.__name__ else "model."
    with torch.no_grad():
        for side, seed in changes.items():
            copy = model.base_model.model.get_submodule(f"{prefix}{side}.embed_tokens").modules_to_save["default"]
            copy.weight.add_(torch.randn(copy.weight.shape, generator=torch.Generator().manual_seed(seed)) / 10)
    model.save_pretrained(out)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(cls.from_pretrained(base), out)), logits(model),
                               atol=0, rtol=0)
    return model


@pytest.mark.parametrize("kind, changes, copies", [("bart", {"encoder": 2, "decoder": 3}, False),
                                                   ("bart", {"encoder": 2, "decoder": 2}, False),
                                                   ("bart", {"decoder": 3}, True), ("m2m_100", {"encoder": 2}, False)])
def test_each_sides_embed_tokens_saved_whole_is_that_sides_alone(tmp_path, kind, changes, copies):
    """modules_to_save=["embed_tokens"] on a BART the base stores shared alone of: PEFT saves each side's copy, which
    check called 'not in base' and merge refused. Merged untied, each side's embed_tokens is its saved copy, shared
    and the head the base's values (``copies``: a checkpoint storing each side's embed_tokens byte-identical to
    shared)."""
    cls = tiny(tmp_path / "base", kind)
    base = with_side_copies(tmp_path / "base") if copies else load_file(tmp_path / "base" / "model.safetensors")
    adapted = saved_embeddings(cls, tmp_path / "base", tmp_path / "a", changes)
    merged = merged_as_adapted(tmp_path, cls, adapted, moved=1e-3)
    for side in ("encoder", "decoder"):
        saved = adapted.base_model.model.get_submodule(f"model.{side}.embed_tokens").modules_to_save["default"]
        assert torch.equal(merged[f"model.{side}.embed_tokens.weight"], saved.weight), side
    for name in ("model.shared.weight", "lm_head.weight"):
        assert torch.equal(merged[name], base["model.shared.weight"]), name


@pytest.mark.parametrize("copies", [False, True])
def test_each_sides_saved_embed_tokens_take_nothing_from_a_lora_on_shared(tmp_path, copies):
    """A LoRA on shared beside the saved side copies (nonzero, as extract writes it): PEFT's model reads each side's
    copy (its merge_and_unload too), never shared's LoRA. The merge added shared's delta on each saved copy (written
    as shared's copy, or stored as one: the LoRA on shared is each side's lookup's where a side is not replaced)."""
    cls = tiny(tmp_path / "base", "bart")
    base = with_side_copies(tmp_path / "base") if copies else load_file(tmp_path / "base" / "model.safetensors")
    adapted = saved_embeddings(cls, tmp_path / "base", tmp_path / "a", {"encoder": 2, "decoder": 3}, also=["shared"])
    assert adapted.base_model.model.model.shared.get_delta_weight("default").abs().max() > 1
    merged = merged_as_adapted(tmp_path, cls, adapted, moved=1e-3)
    for side in ("encoder", "decoder"):
        saved = adapted.base_model.model.get_submodule(f"model.{side}.embed_tokens").modules_to_save["default"]
        assert torch.equal(merged[f"model.{side}.embed_tokens.weight"], saved.weight), side
    assert torch.equal(merged["lm_head.weight"], base["model.shared.weight"])


@pytest.mark.parametrize("kind, side, copies", [("t5", "encoder", False), ("t5", "decoder", False),
                                                ("mt5", "encoder", False), ("t5", "encoder", True),
                                                ("t5", "decoder", "head"), ("mt5", "decoder", True),
                                                ("pop2piano", "encoder", False)])
def test_a_lora_on_one_sides_embed_tokens_of_t5_changes_that_side_alone(tmp_path, kind, side, copies):
    """transformers 5 forces a T5's config to tie and ties by values: a side's embed_tokens not stored, or stored
    byte-identical to shared (``copies``: as T5 checkpoints saved before transformers 5 hold them; "head": lm_head
    too), is shared; one stored with values of its own loads apart (with a warning). PEFT's LoRA on one side's
    embed_tokens changes that side's lookup alone. The merge refused it where shared is stored alone, and put it into
    every copy where not (PEFT's merge_and_unload does too: logits 30 off the adapted model); it writes that side
    with its LoRA, the rest as stored and the config as it was, and the merged model computes the adapted model's
    logits."""
    cls = tiny(tmp_path / "base", kind)
    head = copies == "head"
    base = with_side_copies(tmp_path / "base", "", head) if copies else load_file(tmp_path / "base" / "model.safetensors")
    adapted = lora(cls, tmp_path / "base", tmp_path / "a", ["q", f"{side}.embed_tokens"])
    report = engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out",
                          progress=False)
    assert report.heads_untied == []
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == config
    merged, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(merged), logits(adapted), atol=1e-5, rtol=1e-5)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    delta = adapted.base_model.model.get_submodule(f"{side}.embed_tokens").get_delta_weight("default")
    torch.testing.assert_close(tensors[f"{side}.embed_tokens.weight"], base["shared.weight"] + delta, atol=1e-6, rtol=0)
    other = "decoder" if side == "encoder" else "encoder"
    for name in ("shared.weight", *[f"{other}.embed_tokens.weight"] * bool(copies), *["lm_head.weight"] * head):
        assert torch.equal(tensors[name], base["shared.weight"]), name
    assert tensors.keys() == load_file(tmp_path / "base" / "model.safetensors").keys() | {f"{side}.embed_tokens.weight"}


def test_a_t5_merge_with_one_side_written_apart_is_extracted_against_its_base(tmp_path):
    """The merged T5 stores one side's embed_tokens its base ties to shared (not stored): extract refused the pair
    ("not a fine-tune of … architecture: only in …"); it compares that side with shared, as a merge wrote it, and
    the extracted adapter merged into the base gives the merged model back."""
    from loraops import extraction

    cls = tiny(tmp_path / "base", "t5")
    lora(cls, tmp_path / "base", tmp_path / "a", ["q", "decoder.embed_tokens"])
    engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "merged", progress=False)
    adapter, _ = extraction.extract(tmp_path / "base", tmp_path / "merged", rank=32, modules=["q", "embed_tokens"],
                                    device="cpu")
    assert "decoder.embed_tokens" in adapter.modules
    engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "back", progress=False)
    merged, back = (load_file(tmp_path / name / "model.safetensors") for name in ("merged", "back"))
    assert back.keys() == merged.keys()
    for name in merged:
        torch.testing.assert_close(back[name], merged[name], atol=1e-4, rtol=0)


@pytest.mark.parametrize("copies", [False, True])
def test_a_t5_sides_merge_beside_a_lora_on_shared_is_subtracted_against_its_pristine_base(tmp_path, copies):
    """merge + subtract of LoRAs on shared and one side's embed_tokens of a T5 (nonzero, as extract writes them),
    compared with the pristine base: the side written apart takes its own LoRA alone, shared's goes into shared (and
    what is tied to it), so the subtract takes each off where it was put. Where the side took shared's LoRA too, as an
    untied BART's does, nothing in the merged T5 (its config still says tied) told the subtract so: 22 off."""
    cls = tiny(tmp_path / "base", "t5")
    if copies:
        with_side_copies(tmp_path / "base", "")
    lora(cls, tmp_path / "base", tmp_path / "a", ["q", "decoder.embed_tokens", "shared"])
    adapter = formats.read_adapter(tmp_path / "a")
    engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "merged", progress=False)
    report = engine.subtract(tmp_path / "merged", [(adapter, 1.0)], tmp_path / "back", progress=False,
                             reference=tmp_path / "base")
    assert report.residual.max_abs_diff < 1e-5


@pytest.mark.parametrize("kind, changes, copies", [("t5", {"encoder": 2, "decoder": 3}, False),
                                                   ("t5", {"encoder": 2, "decoder": 2}, False), ("t5", {}, False),
                                                   ("mt5", {"decoder": 3}, False), ("t5", {"encoder": 2, "decoder": 3}, True),
                                                   ("t5", {}, True), ("mt5", {"decoder": 3}, True)])
def test_each_sides_embed_tokens_saved_whole_on_t5_is_that_sides_alone(tmp_path, kind, changes, copies):
    """modules_to_save=["embed_tokens"] on T5 and mT5 (``copies``: a checkpoint storing each side's embed_tokens as
    shared's copies): PEFT's model reads each side's saved copy apart from shared and the head. It was refused where
    the base stores shared alone ("stored once as shared.weight … cannot be merged"), an untrained one too; where it
    stores the copies, every copy took the first saved one. Each side is written as its saved copy, shared and the
    head (tied to shared) as stored, and the merged model computes the adapted model's logits. By the manifest alone
    (no config) it is still refused, saying that the config decides."""
    cls = tiny(tmp_path / "base", kind)
    base = with_side_copies(tmp_path / "base", "") if copies else load_file(tmp_path / "base" / "model.safetensors")
    adapted = saved_embeddings(cls, tmp_path / "base", tmp_path / "a", changes)
    adapter, model = formats.read_adapter(tmp_path / "a"), BaseModel.open(tmp_path / "base")
    assert check.check(adapter, model.tensors, config=model.config).ok
    if not copies:
        assert check.misfits(check.check(adapter, model.tensors)) == [
            "decoder.embed_tokens.weight and 1 more (stored once as shared.weight, which the encoder and the decoder "
            "share: whether one side's lookup saved whole (modules_to_save) can be merged (that side written apart) "
            "is for the base's config.json to say, and none is at hand (check it against the base's files))"]
    engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False)
    merged, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(merged), logits(adapted), atol=1e-5, rtol=1e-5)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    for side in ("encoder", "decoder"):
        saved = adapted.base_model.model.get_submodule(f"{side}.embed_tokens").modules_to_save["default"]
        assert torch.equal(tensors[f"{side}.embed_tokens.weight"], saved.weight), side
    assert torch.equal(tensors["shared.weight"], base["shared.weight"])


def trained_tokens(adapted, out):
    """``adapted`` (a PEFT model with trainable tokens) with its token deltas trained (random), saved at ``out``."""
    with torch.no_grad():
        for name, delta in adapted.named_parameters():
            if "trainable_tokens_delta" in name:
                delta.add_(torch.randn_like(delta))
    adapted.eval().save_pretrained(out)
    return adapted


def tokens_merged_as_adapted(tmp_path, cls, adapted):
    """Merge tmp_path/a into tmp_path/base: check says it fits (the config read),
    and the merged model loads with nothing missing and computes the adapted model's logits. Its tensors."""
    adapter, model = formats.read_adapter(tmp_path / "a"), BaseModel.open(tmp_path / "base")
    assert check.check(adapter, model.tensors, config=model.config).ok
    engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False)
    merged, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (logits(adapted) - logits(cls.from_pretrained(tmp_path / "base"))).abs().max() > 0.1
    torch.testing.assert_close(logits(merged), logits(adapted), atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == config
    return load_file(tmp_path / "out" / "model.safetensors")


@pytest.mark.parametrize("kind, target, stored", [("t5", "encoder.embed_tokens", "sides"),
                                                  ("mt5", "decoder.embed_tokens", "head"),
                                                  ("t5", "embed_tokens", "head"), ("t5", "shared", "head"),
                                                  ("t5", "encoder.embed_tokens", None),
                                                  ("mt5", "decoder.embed_tokens", None), ("t5", "embed_tokens", None)])
def test_trainable_tokens_on_one_t5_side_change_that_side_alone(tmp_path, kind, target, stored):
    """PEFT's trainable tokens on one side's embed_tokens of a T5 change that side's lookup alone; on shared, PEFT
    saves them for each side and the head too. Where the base stores each side (and, "head", lm_head) as shared's
    byte-identical copies, the merge put one side's into every copy (shared, the other side, the head: logits 1 to 10
    off the adapted model); it writes each side with its own rows, which load apart from shared, or tied where they
    are shared's. Where it stores shared alone (``stored`` None) they were "not in base": that side is written as
    shared's values with its rows, a tensor the base does not store, the rest as stored."""
    from peft import TrainableTokensConfig, get_peft_model

    cls = tiny(tmp_path / "base", kind)
    base = with_side_copies(tmp_path / "base", "", stored == "head") if stored \
        else load_file(tmp_path / "base" / "model.safetensors")
    torch.manual_seed(1)
    adapted = trained_tokens(get_peft_model(cls.from_pretrained(tmp_path / "base"),
                                            TrainableTokensConfig(target_modules=[target], token_indices=[4, 5, 11])),
                             tmp_path / "a")
    tensors = tokens_merged_as_adapted(tmp_path, cls, adapted)
    if target == "shared":
        return
    sides = {f"{side}.embed_tokens.weight" for side in ("encoder", "decoder") if target in f"{side}.embed_tokens"}
    for name in tensors:  # each side with tokens its own (its rows replaced), the rest as stored
        assert torch.equal(tensors[name], base.get(name, base["shared.weight"])) != (name in sides), name
    assert tensors.keys() == load_file(tmp_path / "base" / "model.safetensors").keys() | sides


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_loras_trainable_tokens_on_one_side_of_t5_storing_shared_alone(tmp_path, side):
    """LoRA's trainable_token_indices on one side's embed_tokens (beside a LoRA on the queries) of a T5 storing shared
    alone: "not in base"; that side is written as shared's values with its rows, shared and the rest as stored."""
    cls = tiny(tmp_path / "base", "t5")
    base = load_file(tmp_path / "base" / "model.safetensors")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q"], init_lora_weights=False,
                        trainable_token_indices={f"{side}.embed_tokens": [4, 5, 11]})
    adapted = trained_tokens(get_peft_model(cls.from_pretrained(tmp_path / "base"), config), tmp_path / "a")
    tensors = tokens_merged_as_adapted(tmp_path, cls, adapted)
    rows = next(p for n, p in adapted.named_parameters() if f"{side}.embed_tokens" in n and "tokens_delta" in n)
    expected = base["shared.weight"].clone()
    expected[[4, 5, 11]] = rows.detach()
    assert torch.equal(tensors[f"{side}.embed_tokens.weight"], expected)
    assert torch.equal(tensors["shared.weight"], base["shared.weight"])
    assert tensors.keys() == base.keys() | {f"{side}.embed_tokens.weight"}


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["q_proj", "encoder.embed_tokens"]])
def test_a_checkpoint_of_the_bare_bart_binds_an_adapter_of_its_generation_class(tmp_path, targets):
    """A checkpoint saved by BartModel (encoder.layers.0…, shared.weight: no base_model_prefix) loads as
    BartForConditionalGeneration (transformers adds model., the head tied to model.shared), and PEFT's adapter of that
    model names model.encoder… beside lm_head. A LoRA on the head or one side's embed_tokens (neither stored) beside
    the others bound nothing ("not in base": model. was taken off only where every name has it); the merge writes the
    checkpoint's names, and the merged model computes the adapted model's logits."""
    import transformers

    torch.manual_seed(0)
    transformers.BartModel(transformers.BartConfig(**SMALL, decoder_start_token_id=0)).save_pretrained(tmp_path / "base")
    cls = transformers.BartForConditionalGeneration
    adapted = lora(cls, tmp_path / "base", tmp_path / "a", targets)
    stored = load_file(tmp_path / "base" / "model.safetensors")
    merged = merged_as_adapted(tmp_path, cls, adapted, moved=1e-3)
    assert not any(name.startswith("model.") for name in merged) and stored.keys() < merged.keys()


def tokens_checked(tmp_path, cls, target, lora_targets=None):
    """Trainable tokens (rows 4, 5, 11, trained) on ``target`` of the base at tmp_path/base, saved at tmp_path/a: by
    TrainableTokensConfig, or LoRA's trainable_token_indices beside a LoRA on ``lora_targets``. The adapted model,
    the adapter read back, and check's finding against the base (its config read)."""
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets, init_lora_weights=False,
                        trainable_token_indices={target: [4, 5, 11]}) if lora_targets \
        else TrainableTokensConfig(target_modules=[target], token_indices=[4, 5, 11])
    torch.manual_seed(1)
    adapted = trained_tokens(get_peft_model(cls.from_pretrained(tmp_path / "base"), config), tmp_path / "a")
    adapter, model = formats.read_adapter(tmp_path / "a"), BaseModel.open(tmp_path / "base")
    return adapted, adapter, check.check(adapter, model.tensors, config=model.config)


@pytest.mark.parametrize("target, stored", [("encoder.embed_tokens", None), ("decoder.embed_tokens", None),
                                            ("embed_tokens", "sides"), ("encoder.embed_tokens", "head"),
                                            ("shared", None), ("shared", "sides"), ("lora: encoder.embed_tokens", None)])
def test_trainable_tokens_on_one_side_of_bart(tmp_path, target, stored):
    """PEFT (0.21) ties trainable tokens on one side's embed_tokens of a BART to nothing (only tokens on the input
    embeddings, model.shared, to each side and the head, all one set of rows): its adapted model reads them in that
    side's lookup alone, while its merge_and_unload writes them into the one weight transformers ties all four to
    (logits about 27 off the adapted model). They were "not in base"; merged as the adapted model computes: untied,
    that side shared's values with its rows, the other side and the head shared's copies (``stored``: a checkpoint
    storing each side, and the head, as shared's byte-identical copies). Tokens on shared stay tied."""
    cls = tiny(tmp_path / "base", "bart")
    if stored:
        with_side_copies(tmp_path / "base", "model.", stored == "head")
    base = load_file(tmp_path / "base" / "model.safetensors")
    lora_target = target.startswith("lora: ")
    target = target.removeprefix("lora: ")
    adapted, adapter, found = tokens_checked(tmp_path, cls, target, ["q_proj"] if lora_target else None)
    assert found.ok, check.misfits(found)
    own = target != "shared"  # (tokens on one side, or each side's own)
    assert found.tied_heads == ["lm_head"] * own
    peft_merged = logits(copy.deepcopy(adapted).merge_and_unload())
    assert ((peft_merged - logits(adapted)).abs().max() > 1) == own
    report = engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == ["lm_head.weight"] * own
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is not own
    merged, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(logits(merged), logits(adapted), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        encoded = [m.get_encoder()(input_ids=INPUT).last_hidden_state for m in (merged, adapted.base_model.model)]
    torch.testing.assert_close(*encoded, atol=1e-5, rtol=1e-5)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    for side in ("encoder", "decoder"):
        name = f"model.{side}.embed_tokens.weight"
        if own and target in name:
            rows = next(p for n, p in adapted.named_parameters() if f"{side}.embed_tokens" in n and "tokens_delta" in n)
            expected = base["model.shared.weight"].clone()
            expected[[4, 5, 11]] = rows.detach()
            assert torch.equal(tensors[name], expected), side
        elif own:
            assert torch.equal(tensors[name], base["model.shared.weight"]), side
    if own:
        assert torch.equal(tensors["model.shared.weight"], base["model.shared.weight"])
        assert torch.equal(tensors["lm_head.weight"], base["model.shared.weight"])


@pytest.mark.parametrize("side, tokens", [("encoder", False), ("decoder", False), ("encoder", True)])
def test_a_change_to_one_side_of_udop_changes_that_side_alone(tmp_path, side, tokens):
    """UDOP's config is forced tied in transformers 5 (its decoder's output always scaled) and ties by values, as a
    T5's (check.TIED_BY_VALUE): a LoRA (or trainable tokens) on one side's embed_tokens changes that side's lookup
    alone in PEFT's adapted model, while PEFT's merge_and_unload puts it into shared.weight (logits about 35 off). It
    was refused ("stored once as shared.weight …"); that side is written apart (shared's values with its change), the
    rest and the config as they were, and the merged model computes the adapted model's logits."""
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model
    from transformers import UdopConfig, UdopForConditionalGeneration

    torch.manual_seed(0)
    UdopForConditionalGeneration(UdopConfig(**T5_SMALL, decoder_start_token_id=0, image_size=32,
                                            max_2d_position_embeddings=64)).save_pretrained(tmp_path / "base")
    bbox = torch.tensor([[[0.1, 0.1, 0.2, 0.2]] * INPUT.shape[1]])

    def udop_logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=INPUT, bbox=bbox, decoder_input_ids=DECODER_INPUT).logits

    torch.manual_seed(1)
    config = TrainableTokensConfig(target_modules=[f"{side}.embed_tokens"], token_indices=[5, 6, 11]) if tokens \
        else LoraConfig(r=4, lora_alpha=8, target_modules=["q", f"{side}.embed_tokens"], init_lora_weights=False)
    adapted = get_peft_model(UdopForConditionalGeneration.from_pretrained(tmp_path / "base"), config)
    adapted = trained_tokens(adapted, tmp_path / "a") if tokens else adapted.eval()
    adapted.save_pretrained(tmp_path / "a")
    assert (udop_logits(copy.deepcopy(adapted).merge_and_unload()) - udop_logits(adapted)).abs().max() > 1
    adapter, model = formats.read_adapter(tmp_path / "a"), BaseModel.open(tmp_path / "base")
    found = check.check(adapter, model.tensors, config=model.config)
    assert found.ok and not found.tied_heads, check.misfits(found)
    report = engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == []
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (tmp_path / "base" / "config.json").read_text())
    merged, info = UdopForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(udop_logits(merged), udop_logits(adapted), atol=1e-5, rtol=1e-5)
    base = udop_logits(UdopForConditionalGeneration.from_pretrained(tmp_path / "base"))
    assert (udop_logits(adapted) - base).abs().max() > 0.1
    stored = load_file(tmp_path / "base" / "model.safetensors")
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == stored.keys() | {f"{side}.embed_tokens.weight"}


@pytest.mark.registry_backend
@pytest.mark.parametrize("kind", ["lora", "tokens"])
def test_one_t5_side_against_a_registered_base_whose_files_are_gone(tmp_path, kind):
    """`check` of a change to one side's embed_tokens of a T5 against a registered base: with its files, it fits (as
    merge merges it); with them gone, the recorded manifest (tensor names and shapes, no config.json) cannot tell a
    T5, whose side is written apart, from a model whose is not: refused, saying so in one line (it said "cannot be
    merged", or "not in base" for trainable tokens)."""
    import shutil

    from peft import TrainableTokensConfig, get_peft_model

    from test_extract import run

    cls = tiny(tmp_path / "base", "t5")
    if kind == "lora":
        lora(cls, tmp_path / "base", tmp_path / "a", ["q", "encoder.embed_tokens"])
    else:
        torch.manual_seed(1)
        trained_tokens(get_peft_model(cls.from_pretrained(tmp_path / "base"), TrainableTokensConfig(
            target_modules=["encoder.embed_tokens"], token_indices=[4, 5])), tmp_path / "a")
    assert run("base", "add", tmp_path / "base", "--name", "t5")[0] == 0
    code, out = run("check", tmp_path / "a", "--base", "t5")
    assert code == 0, out
    shutil.rmtree(tmp_path / "base")
    code, out = run("check", tmp_path / "a", "--base", "t5")
    assert code != 0 and "encoder.embed_tokens" in out and "stored once as shared.weight" in out \
        and "is for the base's config.json to say, and none is at hand" in out, out


@pytest.mark.parametrize("dtype", [None, "fp32"])
def test_one_side_of_an_fp8_t5_is_written_apart(tmp_path, dtype):
    """A fine-grained FP8 T5 (its Linear weights FP8, the embeddings float) with a LoRA on the queries and on one
    side's embed_tokens, which the base does not store: check's FP8 step skips that side (no weight of its own), and
    the merge writes it apart as on a float T5, a float tensor (shared's values with the LoRA), the queries FP8 with
    fresh scales (or, --dtype fp32, everything dequantized). Against PEFT's adapted model on the dequantized base."""
    from factories import fp8_dequantize, fp8_model
    from peft import PeftModel

    cls = tiny(tmp_path / "float", "t5")
    block = (16, 16)
    fp8 = fp8_model(tmp_path / "float", tmp_path / "fp8", block=block, modules=("q", "k", "v", "o", "wi", "wo"))
    state = {}
    for file in sorted(fp8.glob("*.safetensors")):
        state.update(load_file(file))
    dequantized = {n: fp8_dequantize(t, state[f"{n}_scale_inv"], block).float() if f"{n}_scale_inv" in state else t
                   for n, t in state.items() if not n.endswith("_scale_inv")}
    (tmp_path / "dequantized").mkdir()
    save_file(dequantized, str(tmp_path / "dequantized" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "dequantized" / "config.json").write_text((tmp_path / "float" / "config.json").read_text())
    lora(cls, tmp_path / "dequantized", tmp_path / "a", ["q", "encoder.embed_tokens"])
    adapted = PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "dequantized"), tmp_path / "a").eval()
    adapter, model = formats.read_adapter(tmp_path / "a"), BaseModel.open(fp8)
    found = check.check(adapter, model.tensors, quantization=model.quantization_config, config=model.config)
    assert found.ok and not found.tied_heads, check.misfits(found)
    engine.merge(fp8, [(adapter, 1.0)], tmp_path / "out", dtype=dtype, device="cpu", progress=False)
    out = {}
    for file in sorted((tmp_path / "out").glob("*.safetensors")):
        out.update(load_file(file))
    assert out.keys() == (state.keys() if dtype is None else dequantized.keys()) | {"encoder.embed_tokens.weight"}
    delta = adapted.base_model.model.get_submodule("encoder.embed_tokens").get_delta_weight("default")
    torch.testing.assert_close(out["encoder.embed_tokens.weight"], state["shared.weight"] + delta, atol=1e-6, rtol=0)
    assert torch.equal(out["shared.weight"], state["shared.weight"])
    if dtype is None:
        assert out["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == torch.float8_e4m3fn
        out = {n: fp8_dequantize(t, out[f"{n}_scale_inv"], block).float() if f"{n}_scale_inv" in out else t
               for n, t in out.items() if not n.endswith("_scale_inv")}
    (tmp_path / "merged").mkdir()  # (loaded by transformers, which ties by value: not load_state_dict)
    save_file(out, str(tmp_path / "merged" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "merged" / "config.json").write_text((tmp_path / "float" / "config.json").read_text())
    merged, info = cls.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # (FP8 output: each query requantized, one FP8 unit of its largest entries off PEFT's)
    tolerance = 1e-5 if dtype else 0.05
    torch.testing.assert_close(logits(merged), logits(adapted), atol=tolerance, rtol=tolerance)
    assert (logits(adapted) - logits(cls.from_pretrained(tmp_path / "dequantized"))).abs().max() > 0.1


@pytest.mark.parametrize("target, head_lora", [("decoder.embed_tokens", False), ("embed_tokens", False),
                                               ("decoder.embed_tokens", True), ("encoder.embed_tokens", False)])
def test_trainable_tokens_on_unshared_marians_decoder_leave_its_head(tmp_path, target, head_lora):
    """An unshared Marian (share_encoder_decoder_embeddings: false) ties its head to the decoder's embed_tokens, but
    PEFT ties trainable tokens only to the input embeddings (the encoder's): tokens on the decoder's change its lookup
    alone, the head reads the base's weight (with ``head_lora``: that plus its LoRA). The merge kept the head tied, or
    untied it with the decoder's rows in (logits about 30 off the adapted model); it is untied as the decoder's base
    copy. Tokens on the encoder's leave the head tied."""
    cls = tiny(tmp_path / "base", "marian, unshared")
    adapted, adapter, found = tokens_checked(tmp_path, cls, target, ["q_proj", "lm_head"] if head_lora else None)
    untied = target != "encoder.embed_tokens"
    assert found.ok and found.tied_heads == ["lm_head"] * untied, check.misfits(found)
    report = engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == ["lm_head.weight"] * untied
    merged, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (logits(adapted) - logits(cls.from_pretrained(tmp_path / "base"))).abs().max() > 0.1 or not untied
    torch.testing.assert_close(logits(merged), logits(adapted), atol=1e-5, rtol=1e-5)
    if untied and not head_lora:
        assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["lm_head.weight"],
                           load_file(tmp_path / "base" / "model.safetensors")["model.decoder.embed_tokens.weight"])


@pytest.mark.parametrize("targets", [["decoder.embed_tokens"], ["output_projection"], None,
                                     ["q_proj", "decoder.embed_tokens", "output_projection"]])
def test_fsmt_tied_by_tie_word_embeddings_is_untied(tmp_path, targets):
    """FSMT with tie_word_embeddings: true ties its encoder's embed_tokens and its output head
    (decoder.output_projection) to decoder.embed_tokens and stores neither. A LoRA or trainable tokens (``targets``
    None) there change PEFT's decoder lookup alone (FSMT's input embeddings are the encoder's); the merge put them
    into the one stored tensor (logits about 230, or 34, off the adapted model), then refused them. Now untied: the
    encoder's lookup and the head (with its own LoRA, if any) written as the decoder's base values, and
    tie_word_embeddings: false, which transformers loads with nothing missing."""
    import transformers

    config = transformers.FSMTConfig(langs=["en", "de"], src_vocab_size=64, tgt_vocab_size=64, tie_word_embeddings=True,
                                     decoder_start_token_id=0, **{k: v for k, v in SMALL.items() if k != "vocab_size"})
    cls = transformers.FSMTForConditionalGeneration
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "base")
    if targets is None:
        adapted = tokens_checked(tmp_path, cls, "decoder.embed_tokens")[0]
    else:
        adapted = lora(cls, tmp_path / "base", tmp_path / "a", targets)
    written = merged_as_adapted(tmp_path, cls, adapted, moved=0.1, head="model.decoder.output_projection")
    stored = load_file(tmp_path / "base" / "model.safetensors")
    assert torch.equal(written["model.encoder.embed_tokens.weight"], stored["model.decoder.embed_tokens.weight"])


@pytest.mark.parametrize("kind", ["lora", "tokens", "lora tokens"])
def test_a_lora_on_a_tied_fsmts_encoder_lookup_is_refused_as_tied(tmp_path, kind):
    """A LoRA on the encoder's embed_tokens of FSMT tied by tie_word_embeddings: true (stored once, as the decoder's)
    is refused, by check and merge, saying they are tied to the decoder's embeddings, not "not in base". So are
    trainable tokens there (TrainableTokensConfig, or LoRA's trainable_token_indices): PEFT wraps the encoder's lookup
    alone, and its merge_and_unload writes the rows into the one weight all three read (logits about 27 off its
    adapted model); they were "not in base" too."""
    import copy

    import transformers

    config = transformers.FSMTConfig(langs=["en", "de"], src_vocab_size=64, tgt_vocab_size=64, tie_word_embeddings=True,
                                     decoder_start_token_id=0, **{k: v for k, v in SMALL.items() if k != "vocab_size"})
    cls = transformers.FSMTForConditionalGeneration
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path / "base")
    if kind == "lora":
        lora(cls, tmp_path / "base", tmp_path / "a", ["encoder.embed_tokens"])
        why = ("model.encoder.embed_tokens (stored once as model.decoder.embed_tokens.weight, which the encoder and the "
               "decoder share: a LoRA on one side's lookup cannot be merged)")
    else:
        adapted = tokens_checked(tmp_path, cls, "encoder.embed_tokens", ["q_proj"] if kind == "lora tokens" else None)[0]
        assert (logits(copy.deepcopy(adapted).merge_and_unload()) - logits(adapted)).abs().max() > 1
        why = ("model.encoder.embed_tokens.weight (stored once as model.decoder.embed_tokens.weight, which the encoder "
               "and the decoder share: trainable tokens on one side's lookup cannot be merged)")
    adapter, model = formats.read_adapter(tmp_path / "a"), BaseModel.open(tmp_path / "base")
    assert check.misfits(check.check(adapter, model.tensors, config=model.config)) == [why]
    with pytest.raises(MismatchError, match=re.escape(why)):
        engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
