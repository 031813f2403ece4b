"""Does an adapter fit a base? Name resolution (kohya names, a leading ``model.``, diffusers names on a single-file SD
checkpoint, see loraops.ldm) and shape checks against a base manifest: ``{tensor name: TensorInfo}`` (anything with a
``.shape``), read from headers without loading weights.

    bind(adapter, manifest) -> Adapter          module names resolved to base module paths (raises when it cannot)
    check(adapter, manifest) -> CheckReport     never raises for a misfit: it reports every one
    require_fit(adapter, manifest) -> Adapter   check + bind, raising one MismatchError line that lists the misfits

kohya names are resolved by building the kohya form of every base module (its weight's name without ``.weight``,
dots as underscores, behind the kohya prefix of its part of the model) and looking the adapter's names up; a name
that no base module or several base modules produce is an error, never a silent skip.
"""
from __future__ import annotations

import copy
import itertools
import math
import re
import reprlib
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Collection, Iterable, Mapping, NamedTuple

from . import fp8, ldm
from .adapter import Adapter, LazyTensors, LoraModule, TokenRows, adapter_argument
from .basemodel import BaseModel
from .errors import AmbiguousError, FormatError, InvalidInputError, MismatchError, ParameterError
from .formats import lowrank, params, peft
from .formats.common import conv1d_named, fmt_shape, names_module
from .formats.kohya import embedding_names, kohya_prefix
from .records import CheckReport, CheckResult, ShapeMismatch
from .references import flags_checked, is_integer
from .st import TensorInfo, read_row_blocks, without_torch

# Base tensor-name prefix → the kohya prefixes that name modules under it. Diffusers pipeline folders (tensor names
# "<component>."), single-file SD/SDXL/SD3/FLUX checkpoints (original names; their text encoders as sd-scripts names
# them, ldm.TEXT_ENCODERS), and any plain model ("": the whole model is "the network", lora_unet_, as sd-scripts
# names the denoiser of every architecture).
KOHYA_BASE_PREFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # LyCORIS' own network (create_lycoris: SimpleTuner's LoKr/LoHa) names the model it wraps lycoris_, a diffusers
    # UNet's or transformer's modules by their paths there (ComfyUI's "simpletuner lycoris format")
    ("unet.", ("lora_unet", "lycoris")),
    # OneTrainer names a diffusers transformer's modules lora_transformer_ (as diffusers' FLUX converter reads them)
    ("transformer.", ("lora_unet", "lora_transformer", "lycoris")),
    ("prior.", ("lora_unet",)),
    ("text_encoder.", ("lora_te", "lora_te1")),
    # FluxPipeline's T5 is its text_encoder_2, which sd-scripts' lora_flux names lora_te3 (SD3's): a T5's paths are
    # no CLIP's, so the two forms never meet
    ("text_encoder_2.", ("lora_te2", "lora_te3")),
    ("text_encoder_3.", ("lora_te3",)),
    # (here and on a bare checkpoint below, lycoris_: SimpleTuner's DiT LoRAs, which ComfyUI applies to a checkpoint
    # it saved too; lora_unet__: VideoX-Fun's Wan LoRAs, read as lora_unet_ by ComfyUI's convert_lora_wan_fun)
    ("model.diffusion_model.", ("lora_unet", "lycoris", "lora_unet_")),
    *((encoder.prefix, (kohya_prefix(encoder.sd_scripts),)) for encoder in ldm.TEXT_ENCODERS),
    ("", ("lora_unet", "lycoris", "lora_unet_")),
)
SHOWN = 5

# A tied model (tie_word_embeddings) shares one tensor between its input embeddings and its output head; it stores
# it once, as the embeddings (some exporters under both names, T5 even under three). Heads by module path suffix:
# causal LMs, GPT-NeoX, BERT (cls.predictions.decoder), RoBERTa (lm_head.decoder), DistilBERT, ELECTRA's generator;
# Whisper's proj_out only at the top level (diffusers models have a proj_out in every transformer block, and none is a
# head).
TIED_HEADS = ("lm_head", "embed_out", "predictions.decoder", "lm_head.decoder", "vocab_projector", "generator_lm_head")
TOP_LEVEL_HEADS = ("proj_out",)
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "shared.weight",
                    "backbone.embeddings.weight")  # the last: Mamba's
EMBEDDINGS = INPUT_EMBEDDINGS + ("wpe.weight", "embed_positions.weight", "position_embeddings.weight",
                                 "token_type_embeddings.weight", "token_embedding.weight", "position_embedding.weight",
                                 "relative_attention_bias.weight")
"""Weights of nn.Embedding layers, by name (a safetensors file does not say which 2-D weight is a lookup table):
the input embeddings loraops knows, and the position/token-type tables of GPT-2, BERT, CLIP, OPT and T5 (its
relative position buckets: SD3's and FLUX's T5-XXL)."""


def is_embedding(weight_name: str) -> bool:
    return any(names_module(weight_name, e) for e in EMBEDDINGS)


def is_head(name: str) -> bool:
    """Is this module path (or its weight's name) an output head that models tie to their input embeddings?"""
    module = name.removesuffix(".weight")
    return module in TOP_LEVEL_HEADS or any(names_module(module, head) for head in TIED_HEADS)


SIDE_EMBEDDINGS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
"""An encoder-decoder model's per-side input embeddings, which transformers ties to its shared.weight beside them."""


def is_side_embeddings(name: str) -> bool:
    return any(names_module(name, side) for side in SIDE_EMBEDDINGS)


def shared_embeddings_of(weight_name: str, shape, manifest: Mapping[str, object]) -> str | None:
    """T5's and BART's encoder.embed_tokens / decoder.embed_tokens, not stored: the shared embeddings of their shape
    that the base stores instead (encoder-decoder models save them once, as shared.weight), or None."""
    if not is_side_embeddings(weight_name):
        return None
    return next((t for t, info in manifest.items() if t.endswith("shared.weight") and tuple(info.shape) == tuple(shape)),
                None)


def tied_head_source(weight_name: str, shape, manifest: Mapping[str, object]) -> str | None:
    """The input embeddings a base shares with the output head ``weight_name`` that it does not store (a tied model),
    or None. Several of the head's shape (T5 stores its shared embeddings three times): the head's own sub-model's
    first, then the shallowest. A head a class names (TIED_HEAD_OF_CLASS: ModernBERT's decoder, XLNet's lm_loss,
    BioGPT's output_projection, GPT-1's lm_head, …): that class's embeddings, beside it or saved bare."""
    if weight_name in manifest or not weight_name.endswith(".weight"):
        return None
    if is_head(weight_name):
        owner = weight_name.removesuffix(".weight").rpartition(".")[0]
        candidates = [t for t, info in manifest.items()
                      if t.endswith(INPUT_EMBEDDINGS) and tuple(info.shape) == tuple(shape)]
        if candidates:
            return min(candidates, key=lambda t: (not t.startswith(owner), t.count("."), t))
    named = [(weight_name.removesuffix(tied.head), tied.embeddings) for tied in TIED_HEAD_OF_CLASS.values()
             if weight_name == tied.head or weight_name.endswith("." + tied.head)]
    return next((source for prefix, embeddings in named
                 for source in (prefix + embeddings, *([embeddings.partition(".")[2]] if not prefix else []))
                 if source in manifest and tuple(manifest[source].shape) == tuple(shape)), None)


class TiedHead(NamedTuple):
    """The output head a model class ties to its input embeddings, as transformers names them (its
    _tied_weights_keys)."""

    head: str
    embeddings: str
    bias: bool | tuple[str, str] = False
    """The bias the class ties too, only while the head is tied: True for the head's own, to its parent's
    (X.decoder.bias → X.bias); or (that bias, the one it is tied to) for another's (LUKE's word head: lm_head.bias →
    lm_head.decoder.bias)."""
    flag: str | None = None
    """A config.json switch (true when absent) that, false, builds the class without this head: DeBERTa's legacy
    (false: the head of its original checkpoints, lm_predictions, multiplies by the embeddings' own weight)."""
    switch: str = "tie_word_embeddings"
    """The config.json key transformers ties it by (true when absent): CSM's tie_codebooks_embeddings, which its
    config reads in place of a tie_word_embeddings it ignores."""

    def tied_bias(self) -> tuple[str, str] | None:
        """(the bias the class ties while the head is tied, the bias it ties it to), or None."""
        return _decoder_bias(self.head) if self.bias is True else self.bias or None


def _decoder_bias(head: str) -> tuple[str, str] | None:
    """A head X.decoder's bias and its parent's (X.decoder.bias, X.bias), or None for a head of another name."""
    owner = head.removesuffix(".decoder.weight")
    return (f"{owner}.decoder.bias", f"{owner}.bias") if owner != head else None


# The heads of the classes the causal-LM rule (unstored_head_of) does not name: masked LMs, BERT-style encoders built
# as causal LMs, causal LMs with their own names, multimodal wrappers (BLIP, BridgeTower, ModernVBERT, IDEFICS), LUKE's
# entity head. By the config.json class, as transformers 5.24 names them; the
# embeddings may sit under a wrapping model's prefix. Each is checked against transformers' _tied_weights_keys, loaded
# back, and compared with PEFT's adapted model (tests/test_tied_embeddings.py).
TIED_HEAD_OF_CLASS: dict[str, TiedHead] = {
    "AlbertForMaskedLM": TiedHead("predictions.decoder.weight", "albert.embeddings.word_embeddings.weight", bias=True),
    "AlbertForPreTraining": TiedHead("predictions.decoder.weight", "albert.embeddings.word_embeddings.weight", bias=True),
    "BertForMaskedLM": TiedHead("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight", bias=True),
    "BertForPreTraining": TiedHead("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight", bias=True),
    "BertGenerationDecoder": TiedHead("lm_head.decoder.weight", "bert.embeddings.word_embeddings.weight", bias=True),
    "BertLMHeadModel": TiedHead("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight", bias=True),
    "BigBirdForCausalLM": TiedHead("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight", bias=True),
    "BigBirdForMaskedLM": TiedHead("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight", bias=True),
    "BigBirdForPreTraining": TiedHead("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight", bias=True),
    "BioGptForCausalLM": TiedHead("output_projection.weight", "biogpt.embed_tokens.weight"),
    "BlipForConditionalGeneration": TiedHead("text_decoder.cls.predictions.decoder.weight", "text_decoder.bert.embeddings.word_embeddings.weight", bias=True),
    "BlipForQuestionAnswering": TiedHead("text_decoder.cls.predictions.decoder.weight", "text_decoder.bert.embeddings.word_embeddings.weight", bias=True),
    "BlipTextLMHeadModel": TiedHead("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight", bias=True),
    "BridgeTowerForMaskedLM": TiedHead("mlm_score.decoder.weight", "bridgetower.text_model.embeddings.word_embeddings.weight"),
    "CTRLLMHeadModel": TiedHead("lm_head.weight", "transformer.w.weight"),
    # no output head: the backbone's audio embeddings read the depth decoder's (its lm_head is its own, the depth
    # decoder's head a codebooks_head parameter)
    "CsmForConditionalGeneration": TiedHead("backbone_model.embed_tokens.embed_audio_tokens.weight",
                                            "depth_decoder.model.embed_tokens.weight", switch="tie_codebooks_embeddings"),
    "CamembertForCausalLM": TiedHead("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight", bias=True),
    "CamembertForMaskedLM": TiedHead("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight", bias=True),
    "ConvBertForMaskedLM": TiedHead("generator_lm_head.weight", "convbert.embeddings.word_embeddings.weight"),
    "Data2VecTextForCausalLM": TiedHead("lm_head.decoder.weight", "data2vec_text.embeddings.word_embeddings.weight", bias=True),
    "Data2VecTextForMaskedLM": TiedHead("lm_head.decoder.weight", "data2vec_text.embeddings.word_embeddings.weight", bias=True),
    "DebertaForMaskedLM": TiedHead("cls.predictions.decoder.weight", "deberta.embeddings.word_embeddings.weight", bias=True, flag="legacy"),
    "DebertaV2ForMaskedLM": TiedHead("cls.predictions.decoder.weight", "deberta.embeddings.word_embeddings.weight", bias=True, flag="legacy"),
    "DistilBertForMaskedLM": TiedHead("vocab_projector.weight", "distilbert.embeddings.word_embeddings.weight"),
    "ElectraForCausalLM": TiedHead("generator_lm_head.weight", "electra.embeddings.word_embeddings.weight"),
    "ElectraForMaskedLM": TiedHead("generator_lm_head.weight", "electra.embeddings.word_embeddings.weight"),
    "ErnieForCausalLM": TiedHead("cls.predictions.decoder.weight", "ernie.embeddings.word_embeddings.weight", bias=True),
    "ErnieForMaskedLM": TiedHead("cls.predictions.decoder.weight", "ernie.embeddings.word_embeddings.weight", bias=True),
    "ErnieForPreTraining": TiedHead("cls.predictions.decoder.weight", "ernie.embeddings.word_embeddings.weight", bias=True),
    "EsmForMaskedLM": TiedHead("lm_head.decoder.weight", "esm.embeddings.word_embeddings.weight"),
    "EuroBertForMaskedLM": TiedHead("lm_head.weight", "model.embed_tokens.weight"),
    "FNetForMaskedLM": TiedHead("cls.predictions.decoder.weight", "fnet.embeddings.word_embeddings.weight", bias=True),
    "FNetForPreTraining": TiedHead("cls.predictions.decoder.weight", "fnet.embeddings.word_embeddings.weight", bias=True),
    "FlaubertWithLMHeadModel": TiedHead("pred_layer.proj.weight", "transformer.embeddings.weight"),
    "FunnelForMaskedLM": TiedHead("lm_head.weight", "funnel.embeddings.word_embeddings.weight"),
    "GPT2DoubleHeadsModel": TiedHead("lm_head.weight", "transformer.wte.weight"),
    "GPTNeoXJapaneseForCausalLM": TiedHead("embed_out.weight", "gpt_neox_japanese.embed_in.weight"),
    "GitForCausalLM": TiedHead("output.weight", "git.embeddings.word_embeddings.weight"),
    "GteForMaskedLM": TiedHead("lm_head.decoder.weight", "gte.embeddings.word_embeddings.weight"),
    "IdeficsForVisionText2Text": TiedHead("lm_head.weight", "model.embed_tokens.weight"),
    "IBertForMaskedLM": TiedHead("lm_head.decoder.weight", "ibert.embeddings.word_embeddings.weight", bias=True),
    "JinaEmbeddingsV3ForMaskedLM": TiedHead("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight", bias=True),
    "LayoutLMForMaskedLM": TiedHead("cls.predictions.decoder.weight", "layoutlm.embeddings.word_embeddings.weight", bias=True),
    "LongformerForMaskedLM": TiedHead("lm_head.decoder.weight", "longformer.embeddings.word_embeddings.weight", bias=True),
    "LukeForMaskedLM": TiedHead("entity_predictions.decoder.weight", "luke.entity_embeddings.entity_embeddings.weight",
                                bias=("lm_head.bias", "lm_head.decoder.bias")),
    "LxmertForPreTraining": TiedHead("cls.predictions.decoder.weight", "lxmert.embeddings.word_embeddings.weight"),
    "MPNetForMaskedLM": TiedHead("lm_head.decoder.weight", "mpnet.embeddings.word_embeddings.weight", bias=True),
    "MegatronBertForCausalLM": TiedHead("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight", bias=True),
    "MegatronBertForMaskedLM": TiedHead("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight", bias=True),
    "MegatronBertForPreTraining": TiedHead("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight", bias=True),
    "MobileBertForMaskedLM": TiedHead("cls.predictions.decoder.weight", "mobilebert.embeddings.word_embeddings.weight", bias=True),
    "MobileBertForPreTraining": TiedHead("cls.predictions.decoder.weight", "mobilebert.embeddings.word_embeddings.weight", bias=True),
    "ModernBertDecoderForCausalLM": TiedHead("decoder.weight", "model.embeddings.tok_embeddings.weight"),
    "ModernBertForMaskedLM": TiedHead("decoder.weight", "model.embeddings.tok_embeddings.weight"),
    "ModernVBertForMaskedLM": TiedHead("lm_head.weight", "model.text_model.embeddings.tok_embeddings.weight"),
    "MraForMaskedLM": TiedHead("cls.predictions.decoder.weight", "mra.embeddings.word_embeddings.weight", bias=True),
    "NomicBertForMaskedLM": TiedHead("cls.predictions.decoder.weight", "nomic_bert.embeddings.word_embeddings.weight", bias=True),
    "NystromformerForMaskedLM": TiedHead("cls.predictions.decoder.weight", "nystromformer.embeddings.word_embeddings.weight", bias=True),
    "OpenAIGPTLMHeadModel": TiedHead("lm_head.weight", "transformer.tokens_embed.weight"),
    "RoCBertForCausalLM": TiedHead("cls.predictions.decoder.weight", "roc_bert.embeddings.word_embeddings.weight", bias=True),
    "RoCBertForMaskedLM": TiedHead("cls.predictions.decoder.weight", "roc_bert.embeddings.word_embeddings.weight", bias=True),
    "RoCBertForPreTraining": TiedHead("cls.predictions.decoder.weight", "roc_bert.embeddings.word_embeddings.weight", bias=True),
    "RoFormerForCausalLM": TiedHead("cls.predictions.decoder.weight", "roformer.embeddings.word_embeddings.weight", bias=True),
    "RoFormerForMaskedLM": TiedHead("cls.predictions.decoder.weight", "roformer.embeddings.word_embeddings.weight", bias=True),
    "RobertaForCausalLM": TiedHead("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight", bias=True),
    "RobertaForMaskedLM": TiedHead("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight", bias=True),
    "RobertaPreLayerNormForCausalLM": TiedHead("lm_head.decoder.weight", "roberta_prelayernorm.embeddings.word_embeddings.weight", bias=True),
    "RobertaPreLayerNormForMaskedLM": TiedHead("lm_head.decoder.weight", "roberta_prelayernorm.embeddings.word_embeddings.weight", bias=True),
    "RwkvForCausalLM": TiedHead("head.weight", "rwkv.embeddings.weight"),
    "SqueezeBertForMaskedLM": TiedHead("cls.predictions.decoder.weight", "transformer.embeddings.word_embeddings.weight", bias=True),
    "TapasForMaskedLM": TiedHead("cls.predictions.decoder.weight", "tapas.embeddings.word_embeddings.weight", bias=True),
    "TrOCRForCausalLM": TiedHead("output_projection.weight", "model.decoder.embed_tokens.weight"),
    "UltraVBertForMaskedLM": TiedHead("lm_head.weight", "model.text_model.embed_tokens.weight"),
    "ViltForMaskedLM": TiedHead("mlm_score.decoder.weight", "vilt.embeddings.text_embeddings.word_embeddings.weight"),
    "VisualBertForPreTraining": TiedHead("cls.predictions.decoder.weight", "visual_bert.embeddings.word_embeddings.weight", bias=True),
    "VisualBertForRegionToPhraseAlignment": TiedHead("cls.predictions.decoder.weight", "visual_bert.embeddings.word_embeddings.weight", bias=True),
    "XLMRobertaForCausalLM": TiedHead("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight", bias=True),
    "XLMRobertaForMaskedLM": TiedHead("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight", bias=True),
    "XLMRobertaXLForCausalLM": TiedHead("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight", bias=True),
    "XLMRobertaXLForMaskedLM": TiedHead("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight", bias=True),
    "FSMTForConditionalGeneration": TiedHead("model.decoder.output_projection.weight", "model.decoder.embed_tokens.weight"),
    "WhisperForCausalLM": TiedHead("proj_out.weight", "model.decoder.embed_tokens.weight"),
    "WhisperForConditionalGeneration": TiedHead("proj_out.weight", "model.decoder.embed_tokens.weight"),
    "XLMWithLMHeadModel": TiedHead("pred_layer.proj.weight", "transformer.embeddings.weight"),
    "XLNetLMHeadModel": TiedHead("lm_loss.weight", "transformer.word_embedding.weight"),
    "XmodForCausalLM": TiedHead("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight", bias=True),
    "XmodForMaskedLM": TiedHead("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight", bias=True),
    "YosoForMaskedLM": TiedHead("cls.predictions.decoder.weight", "yoso.embeddings.word_embeddings.weight", bias=True),
}
# config.json "architectures" of the models with an output head (a causal LM, a multimodal model's language model)
LM_HEAD_CLASSES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
# the module a causal LM wraps its decoder in, whose embeddings its head is tied to: the head sits beside it (at the
# top level of a checkpoint saved from the bare model, which stores the embeddings there too: GPT-2's own wte)
_LM_WRAPPER = re.compile(r"^(?:(?P<owner>(?:.+\.)?)(?:model|transformer|backbone|gpt_neox)\.(?:.+\.)?)?"
                         r"(?P<leaf>embed_tokens|wte|word_embeddings|embeddings|embed_in)\.weight$")


# the sub-configs of a composite model's text model (transformers' PreTrainedConfig.get_text_config names them), and
# Qwen-Omni's thinker: a sub-model that ties its lm_head by its own config's flag (transformers reads that flag, not
# its text_config's, which ties nothing)
TEXT_CONFIGS = ("text_config", "decoder", "generator", "text_encoder", "thinker_config")
# model types whose config derives the decoder's output scaling (d_model**-0.5 before the head) from
# tie_word_embeddings when it does not say scale_decoder_outputs (configs saved before transformers 5): a T5 as
# InstructBLIP's text_config (BLIP-2's config says is_encoder_decoder at the top: not untied)
SCALES_BY_TIE = ("t5", "umt5", "longt5", "pop2piano")
# encoder-decoder model types whose shared embeddings transformers ties to each side's embed_tokens only while
# tie_word_embeddings is true (transformers 5 ties nothing of a config saying false): untied, their checkpoint stores
# those too (untied_side_embeddings). Each checked against PEFT's adapted model (tests/test_tied_embeddings.py);
# no config of theirs reads tie_word_embeddings for anything but tying (Marian's: resizing).
UNTIES_SIDE_EMBEDDINGS = ("bart", "mbart", "plbart", "pegasus", "marian", "blenderbot", "blenderbot-small", "m2m_100",
                          "led", "bigbird_pegasus")
# encoder-decoder model types a merge may untie at a config's top level only (BLIP-2 with a BART would need its
# side embeddings written under its text model, which is not checked): those above, mT5 (whose config forces
# tie_word_embeddings true in transformers 5 and scales nothing: its head loads untied by its own values), Whisper
# (its proj_out, tied to the decoder's embed_tokens while the flag is true: tests/test_untied_whisper.py), and FSMT
# (its output_projection and encoder's embed_tokens, tied to the decoder's: tests/test_tied_encoder_decoder.py)
UNTIED_AT_THE_TOP = ("mt5", "whisper", "fsmt", *UNTIES_SIDE_EMBEDDINGS)
# model types whose config transformers 5 forces to say tie_word_embeddings: true, so that the checkpoint decides
# what is tied: a tied tensor stored with values of its own (not byte-identical to shared's) loads as a parameter of
# its own, with a warning that they are "present in the checkpoints with different values, so we will NOT tie them"
TIED_BY_VALUE = ("mt5", "udop", *SCALES_BY_TIE)  # (UDOP's scales its decoder's output by that forced flag: always)


def side_stored_apart(name: str, config: dict) -> bool:
    """May ``name``, one side's embed_tokens a base ties to its shared embeddings (not stored, or stored as their
    byte-identical copy), be written with values of its own? Where the model (at the config's top level) is one of
    TIED_BY_VALUE: transformers loads it apart from shared then, as PEFT's adapted model reads a LoRA or a saved copy
    on that side (its lookup alone). BLIP-2's T5 (a text config) is not checked."""
    return config.get("model_type") in TIED_BY_VALUE and is_side_embeddings(name)


def side_tokens_apart(name: str, config: dict) -> bool:
    """Do trainable tokens on ``name`` (stored) change one side's lookup alone in PEFT's adapted model, where PEFT ties
    tokens on the model's input embeddings alone to its head: one side's embed_tokens (a BART's stored as shared's
    copy, an unshared Marian's decoder, FSMT's decoder: its encoder's are its input embeddings), not a T5's
    (side_stored_apart), nor those the class ties its head to where no other side reads them (TIED_HEAD_OF_CLASS:
    Whisper's decoder.embed_tokens, its input embeddings)."""
    tied = _tied_head_of_class(config)
    return is_side_embeddings(name) and not side_stored_apart(name, config) \
        and (tied is None or _class_head(tied, name) is None or bool(untied_side_embeddings(name, config)))


def _tie_flags(config: dict) -> list[dict]:
    """The levels of a config.json that may say tie_word_embeddings: its top and its text model's sub-configs."""
    return [config, *(sub for key in TEXT_CONFIGS if isinstance(sub := config.get(key), dict))]


def model_type_of(config: Mapping) -> str | None:
    """config.json's model_type, where it is a string: anything else names no model type (transformers' AutoConfig
    fails on it, a class's from_pretrained takes its own), as an absent one does."""
    value = config.get("model_type")
    return value if isinstance(value, str) else None


def architectures_of(config: Mapping) -> list[str]:
    """config.json's architectures: the class names (strings) of its list, or the one it names; none where it holds
    neither (transformers keeps any value there, and builds no model by it)."""
    value = config.get("architectures")
    return [value] if isinstance(value, str) else [a for a in value if isinstance(a, str)] if isinstance(value, list) \
        else []


def refuse_unread_tie_flag(config: dict, path) -> None:
    """Refuse a config.json (at ``path``) whose tie_word_embeddings, at a level ties_word_embeddings reads, is neither
    true, false nor null: transformers 5's strict config refuses to load it ("expected bool"), and transformers 4 read
    it by truthiness ("false" tied). null stays said-as-false: some composite configs (Gemma 3's top) take it."""
    for level in _tie_flags(config):
        said = level.get("tie_word_embeddings")
        if said is not None and not isinstance(said, bool):
            raise FormatError(f"{path}: tie_word_embeddings is {said!r}, not true or false (transformers 5 refuses to "
                              "load such a config); write true or false")


def ties_word_embeddings(config: dict) -> bool | None:
    """What a model's config.json says of tying: true when its top level or a text model's sub-config says so, as
    transformers ties (each sub-model by its own config: BLIP's text decoder by its text_config; LLaVA's and
    Qwen2-VL's configs take a text_config's true up); false when they say only false; None when they say nothing.
    A class TIED_HEAD_OF_CLASS ties by another key (CSM): that key's value."""
    tied = _tied_head_of_class(config)
    if tied is not None and tied.switch != "tie_word_embeddings":
        return config.get(tied.switch)
    said = [level["tie_word_embeddings"] for level in _tie_flags(config) if "tie_word_embeddings" in level]
    return any(said) if said else None


def untied(config: dict) -> dict:
    """``config`` (a config.json) saying that nothing is tied, at every level and by every key ties_word_embeddings
    reads, and computing what it did: a T5-family level that scaled its decoder's output because it was tied says
    so (scale_decoder_outputs), as its config read it."""
    config = copy.deepcopy(config)
    for level in _tie_flags(config):
        if level.get("model_type") in SCALES_BY_TIE and "scale_decoder_outputs" not in level:
            level["scale_decoder_outputs"] = level.get("tie_word_embeddings") is not False
        level["tie_word_embeddings"] = False
    if (tied := _tied_head_of_class(config)) is not None:
        config[tied.switch] = False
    return config


def can_untie(config: dict) -> bool:
    """May a model of this config.json come out with its output head untied? Not an encoder-decoder model: some
    (Switch Transformers, UDOP) scale their decoder's output when tied, others (ProphetNet) are not checked
    against transformers untied. But a T5-family one (SCALES_BY_TIE) is: untied writes its scaling, at the top level
    (T5ForConditionalGeneration) or in a composite model's text config (BLIP-2 with a T5 copies the T5's
    is_encoder_decoder to its top); and one of UNTIED_AT_THE_TOP at the top level: mT5, Whisper, BART and its kin
    (untied, the merge writes each side's embed_tokens: untied_side_embeddings)."""
    if config.get("is_encoder_decoder") is not True or config.get("model_type") in UNTIED_AT_THE_TOP:
        return True
    return any(level.get("model_type") in SCALES_BY_TIE for level in _tie_flags(config))


def untied_side_embeddings(shared: str, config: dict) -> list[str]:
    """The tensors an untied model of this config.json (one of UNTIES_SIDE_EMBEDDINGS at its top level) reads as
    each side's input embeddings that transformers tied to ``shared`` (X.shared.weight) while it was tied: X.encoder.
    and X.decoder.embed_tokens.weight, which its checkpoint must then store (as ``shared``'s values); FSMT's encoder
    embed_tokens, tied to its decoder's (its ``shared``); none for another model, or another tensor."""
    if config.get("model_type") == "fsmt" and names_module(shared, "decoder.embed_tokens.weight"):
        return [shared.removesuffix("decoder.embed_tokens.weight") + "encoder.embed_tokens.weight"]
    if config.get("model_type") not in UNTIES_SIDE_EMBEDDINGS or not names_module(shared, "shared.weight"):
        return []
    return [shared.removesuffix("shared.weight") + side for side in SIDE_EMBEDDINGS]


def untied_side_source(weight_name: str, shape, manifest: Mapping[str, object],
                       config: Callable[[str], dict]) -> str | None:
    """The shared embeddings a tied base stores for one side's embed_tokens ``weight_name`` that it does not store,
    where a merge may write that side apart from them: a model of UNTIES_SIDE_EMBEDDINGS at its top level (BART's
    model.encoder.embed_tokens → model.shared.weight). PEFT's LoRA on that side changes its lookup only; the merge
    writes it untied, as shared's copy with its changes (each other side and the head as shared's copies:
    untied_side_embeddings, side_tied_head). And a T5's (side_stored_apart; whatever its config says): written as
    shared's copy with its changes, it loads apart from shared, the rest tied as it was. None for another tensor or
    model, or a config that unties nothing (untie_refusal)."""
    shared = shared_embeddings_of(weight_name, shape, manifest)
    if shared is None or weight_name in manifest:
        return None
    if side_stored_apart(weight_name, config(shared)):
        return shared if weight_name in (shared.removesuffix("shared.weight") + side for side in SIDE_EMBEDDINGS) \
            else None
    if weight_name not in untied_side_embeddings(shared, config(shared)) or untie_refusal(shared, config(shared)):
        return None
    return shared


def side_lookup_refusal(shared: str, change: str, config: dict | None) -> str:
    """Why ``change`` on one side's embed_tokens, which the base does not store, is not merged into ``shared``: PEFT's
    model reads that side's lookup apart from shared (and the head), and this model is not one a merge writes with
    that side untied (untied_side_source: known by the base's ``config`` alone, a T5 in a composite model's text
    config not checked). Without one (a registered base whose files are gone: its recorded manifest names tensors,
    not the model type), that is said: its files decide."""
    if not config:
        return (f"stored once as {shared}, which the encoder and the decoder share: whether {change} can be merged "
                "(that side written apart) is for the base's config.json to say, and none is at hand (check it "
                "against the base's files)")
    return f"stored once as {shared}, which the encoder and the decoder share: {change} cannot be merged"


def side_tied_head(shared: str, manifest: Mapping[str, object], config: dict) -> str | None:
    """The output head a model of UNTIES_SIDE_EMBEDDINGS at its top level ties to its ``shared`` embeddings
    (lm_head.weight: BART's and its kin's generation classes, Marian's MarianMTModel), which a merge untying the model
    for a change to one side alone writes untied: as shared's copy where the base does not store it, else as stored
    (a byte-identical copy); None for a class with another head (BartForSequenceClassification). A config naming the
    bare model (BartModel: facebook/bart-base's and bart-large's) or no class gets it too: such a checkpoint is loaded
    for generation as BartForConditionalGeneration, which finds no head in an untied model that lacks it (newly
    initialized), where the bare model only reports it unexpected."""
    if config.get("model_type") in TIED_BY_VALUE:  # a T5's side written apart unties nothing else
        return None
    architectures = architectures_of(config)
    heads = not architectures or any(a.endswith(LM_HEAD_CLASSES) or ("For" not in a and a.endswith("Model"))
                                     for a in architectures)  # (MarianMTModel, the bare model)
    head = "lm_head.weight"
    return head if heads and (head in manifest or tied_head_source(head, manifest[shared].shape,
                                                                   manifest) == shared) else None


UNTIED_FAMILIES = ("T5's, UMT5's, LongT5's, Pop2Piano's, mT5's, BART's, mBART's, PLBart's, Pegasus's, Marian's, "
                   "Blenderbot's, Blenderbot-small's, M2M-100's, LED's, BigBird-Pegasus's, Whisper's and FSMT's")


def saved_tie_refusal(adapter: Adapter, module: LoraModule, manifest: Mapping[str, object],
                      config: Callable[[str], dict] | None) -> str | None:
    """Why PEFT loads no LoRA ``module`` of a PEFT ``adapter`` on this base (``config``: tensor → its model's
    config.json), phrased to follow "'<module>' is ", or None: it is on the head the base ties to embeddings the
    adapter saves whole (modules_to_save) under ensure_weight_tying. Where an entry names them as PEFT's embeddings
    (peft.ties_saved_embeddings), PEFT saves that head whole too (its modules_to_tie); the reader refuses a LoRA beside
    the head's saved copy, and a file without that copy (an untied base's, or edited) is refused here, where the base
    says the head is tied: PEFT fails to load it (a TypeError where the targeting selects the head, a KeyError on its
    weight where not). Where the targeting names the head instead (peft.ties_targeted_embeddings: GPT-2's
    modules_to_save=["wte"] is no name of PEFT's embeddings), PEFT ties the head's LoRA to one it adds on the
    embeddings, which it does not add to a module it saves whole, and fails (an AttributeError). Without ``config``
    (a registered base's recorded manifest alone: `check` where its files are gone, `register --base`,
    `export --base`) the manifest says it: a head it does not store, tied to those embeddings (tied_head_source)."""
    if adapter.format != "peft":
        return None
    if peft.ties_saved_embeddings(adapter.config):
        saver = "the adapter's ensure_weight_tying saves whole (modules_to_save)"
        how = "PEFT saves the head whole too and loads no LoRA on it (this file lacks the head's copy: PEFT fails to "\
              "load it on this base)"
    elif peft.ties_targeted_embeddings(adapter.config):
        saver = "the adapter's modules_to_save saves whole"
        how = "its ensure_weight_tying ties a LoRA on the head to one PEFT adds on those embeddings, which it does "\
              "not add to a module it saves whole: PEFT fails to load the adapter on this base"
    else:
        return None
    saved = saved_whole(adapter)
    if config is None:
        source = tied_head_source(module.weight_name, module.weight_shape, manifest)
        tied = [source] if source in saved else []
    else:
        tied = [embeddings for embeddings in saved & manifest.keys() if ties_word_embeddings(config(embeddings))
                is not False and head_tied_to(embeddings, config(embeddings)) == module.weight_name]
    if not tied:
        return None
    return f"the head this base ties to {tied[0]!r}, which {saver}: {how}"


def saved_whole(adapter: Adapter) -> set[str]:
    """The tensors an adapter saves whole, not a LoRA layer's weight saved beside it (save_embedding_layers)."""
    return {name for name in adapter.full_tensors if name.removesuffix(".weight") not in adapter.modules}


def unsaved_tied_head(adapter: Adapter, manifest: Mapping[str, object],
                      config: Callable[[str], dict] | None) -> dict[str, str]:
    """The head a base ties to embeddings a PEFT ``adapter``'s ensure_weight_tying saves whole (modules_to_save), where
    its file lacks the head's copy and has no LoRA on it (saved_tie_refusal says why that one fails): PEFT wraps the
    tied head too (its modules_to_tie) and takes its weight from the file, a KeyError. A file saved on an untied base
    has none. Without ``config`` the manifest says it by a causal LM's rule: an lm_head it does not store, tied to
    those embeddings (tied_head_source)."""
    if adapter.format != "peft" or not peft.ties_saved_embeddings(adapter.config):
        return {}
    out = {}
    for embeddings in saved_whole(adapter) & manifest.keys():
        if config is None:
            head = _causal_lm_head(embeddings)
            shape = manifest[embeddings].shape
            head = head if head and tied_head_source(head, shape, manifest) == embeddings else None
        else:
            head = head_tied_to(embeddings, config(embeddings)) \
                if ties_word_embeddings(config(embeddings)) is not False else None
        if head is not None and head not in adapter.full_tensors \
                and head.removesuffix(".weight") not in adapter.modules:
            out[head] = (f"the head this base ties to {embeddings!r}, which the adapter's ensure_weight_tying saves "
                         f"whole (modules_to_save): PEFT saves the head whole too, and fails to load the adapter "
                         f"without it (a KeyError)")
        elif head in adapter.full_tensors and not (copy := adapter.full_tensors[head]).is_meta \
                and not copy.equal(adapter.full_tensors[embeddings]):
            # (an edited file: PEFT's ensure_weight_tying loads both keys into its one tied copy, the last one read
            # winning, where loraops would write two tensors untied)
            out[head] = differing_tied_copy(embeddings, "the adapter's ensure_weight_tying keeps tied")
    return out


def differing_tied_copy(embeddings: str, keeps: str) -> str:
    return (f"saved whole beside {embeddings!r}, which this base ties it to and {keeps} (one tensor), with different "
            f"values: PEFT's load keeps whichever it reads last; make the two equal")


def differing_tied_layers(adapter: Adapter, manifest: Mapping[str, object],
                          config: Callable[[str], dict] | None) -> dict[str, str]:
    """The head a PEFT ``adapter``'s save_embedding_layers (beside no modules_to_save) saves whole with other values
    than the input embeddings it saves beside, where the base ties the two (an edited file): PEFT's load puts both
    into the one tied weight, the last one read winning, where loraops would write two tensors untied. Tied: the base
    stores no head of its own (transformers saves a tied head once), or its config (``config``) ties them. The layers
    under a LoRA too (saved_layer_tensors: LoRAs on both, each layer saved under base_layer)."""
    layers = peft.saved_layer_tensors(adapter) & adapter.full_tensors.keys() if adapter.format == "peft" else set()
    inputs = [name for name in layers if any(names_module(name, e) for e in INPUT_EMBEDDINGS)]
    out = {}
    for head in sorted(name for name in layers if name.endswith(".weight") and is_head(name)):
        source = tied_head_source(head, tuple(adapter.full_tensors[head].shape), manifest)
        own = head_tied_to(source, config(source)) if source is not None and config is not None else None
        if own is not None and own != head:  # (a head this base has none of: PEFT saves its get_output_embeddings())
            out[head] = (f"not this base's head ({own!r} is, tied to {source!r}): PEFT's save_embedding_layers "
                         f"saves no such tensor and its load puts it nowhere; remove it")
            continue
        for embeddings in inputs:
            copy, own = adapter.full_tensors[head], adapter.full_tensors[embeddings]
            if copy.is_meta or own.is_meta or copy.shape != own.shape or copy.equal(own):
                continue
            if head not in manifest or (config is not None and ties_word_embeddings(config(embeddings)) is not False):
                out[head] = differing_tied_copy(embeddings, "PEFT's load keeps tied")
    return out


def unsaved_tensors(adapter: Adapter, manifest: Mapping[str, object], config: Callable[[str], dict] | None = None,
                    saved: Collection[str] | None = None, sides: Callable[[str], dict] | None = None) -> dict[str, str]:
    """The base tensors a PEFT ``adapter``'s modules_to_save has PEFT save whole on this base that its file lacks
    (tensor → why, for check's why_missing). PEFT wraps every module of the base whose
    name ends with an entry (peft.wrapping_entry; a task model's own entries too: peft.saved_entries) and its load
    takes each wrapped module's weight and bias from the file: one missing fails it (a KeyError), where loraops would
    merge the base's own (a SEQ_CLS adapter without its classifier's tensors, untrained on the base). The head tied to
    saved embeddings too (unsaved_tied_head; ``config``: tensor → its model's config.json, or None). ``saved``: the
    base tensors the file saves under their own keys (file_tensor_names), where the bound adapter's full tensors
    also hold a tied bias bound to the one the base stores (RoBERTa's lm_head.decoder.bias as lm_head.bias), which
    PEFT's load does not take for it. The tied tensors the base does not store, in a module saved whole, by
    ``config`` or else ``sides`` (the same, merge's; unstored_tied_tensors)."""
    entries = peft.saved_entries(adapter.config) if adapter.format == "peft" else []
    if not entries or not peft.module_names(entries):
        return differing_tied_layers(adapter, manifest, config or sides)
    task = set(peft.task_saved(adapter.config.get("task_type"))) - set(adapter.config.get("modules_to_save") or [])
    out = {}
    # (weights and biases only, what PEFT saves of a plain layer: a quantized layer's other tensors, bitsandbytes' SCB
    # or FP8 scales, are not asked for; a bias beside its weight, or one of a vector's shape, a module's parameter of
    # its own (RoBERTa's lm_head.bias, its weights its submodules'), not GPT-2's checkpoints' 4-D attn.bias, each
    # attention's causal mask, a buffer the model no longer has, of which PEFT saves no copy)
    paths = model_paths(adapter, manifest)
    for tensor in (t for t in paths if t.endswith(".weight") or t.endswith(".bias") and (
            f"{t.removesuffix('.bias')}.weight" in manifest or len(manifest[t].shape) == 1)):
        entry = peft.wrapping_entry(entries, paths[tensor].rpartition(".")[0])
        if (twice := peft.wrapped_twice(entries, paths[tensor].rpartition(".")[0])) is not None:
            out[tensor] = (f"in {twice[1]!r}, which modules_to_save wraps inside {twice[0]!r} (an entry ends both "
                           f"names): PEFT saves both copies under one key, the unused inner one's last, so the file "
                           f"lacks the trained values its adapted model uses, and PEFT fails to load it (a KeyError); "
                           f"name the modules to save so that none lies in another")
        elif entry is not None and tensor not in (adapter.full_tensors if saved is None else saved):
            by = f"the model of task_type {adapter.config['task_type']}'s {entry!r}" if entry in task else \
                f"modules_to_save entry {entry!r}"
            out[tensor] = (f"saved whole by PEFT on this base ({by}), but not in the adapter's file: PEFT fails to "
                           f"load the adapter without it (a KeyError)")
    for tensor in unstored_tied_tensors(manifest, config or sides):
        entry = peft.wrapping_entry(entries, tensor.rpartition(".")[0])
        if entry is not None and tensor not in (adapter.full_tensors if saved is None else saved):
            out[tensor] = (f"the tied head's {tensor!r}, which the base does not store, lies in a module PEFT saves "
                           f"whole (modules_to_save entry {entry!r}): PEFT saves its copy untied from the embeddings, "
                           f"and fails to load the adapter without it (a KeyError)")
    return out | unsaved_tied_head(adapter, manifest, config) | differing_tied_layers(adapter, manifest, config or sides)


def unstored_tied_tensors(manifest: Mapping[str, object], config: Callable[[str], dict] | None) -> list[str]:
    """The tensors a tied base holds that it does not store: the output head tied to its input embeddings (by
    ``config``, tensor → its model's config.json, where given: head_tied_to; else by rule, unstored_tied_heads) and
    the bias the class ties while the head is (RoBERTa's lm_head.decoder.bias, lm_head.bias stored). A module saved
    whole holds them as parameters of its own (PEFT's copy is untied), which PEFT's load takes from the file."""
    if config is None:  # (by rule: a head whose owner the base stores nothing of is another class's, not this one's)
        owners = {name.rpartition(".")[0] for name in manifest}
        heads = {f"{head}.weight": {} for head in unstored_tied_heads(manifest)
                 if (owner := head.rpartition(".")[0]) == ""
                 or any(o == owner or o.startswith(f"{owner}.") for o in owners)}
    else:
        heads = {head: config(name) for name in manifest if ties_word_embeddings(config(name)) is not False
                 and (head := head_tied_to(name, config(name))) is not None and head not in manifest}
    biases = [pair[0] for head, own in heads.items() if (pair := tied_decoder_bias(head, own)) is not None
              and pair[0] not in manifest and pair[1] in manifest]
    return sorted({*heads, *biases})


def edited_originals(adapter: Adapter, bound: Adapter, manifest: Mapping[str, object]) -> dict[str, str]:
    """The tied heads whose ``original_module`` copy (Adapter.originals; save_embedding_layers without
    ensure_weight_tying) differs from the embeddings the head is tied to, as the file saves them beside (``bound``'s)
    or else the base stores them (tensor → why). PEFT's load puts original_module's values into the tied parameter
    after the embeddings' own key (module order: the head last), so its embeddings are those; PEFT writes them equal,
    and loraops does not take the base's copy, by its name, for trained values of a file edited so: refused."""
    if not adapter.originals or peft.ties_saved_embeddings(adapter.config):
        return {}
    rename = renaming(adapter, manifest) if adapter.names_resolved else (lambda name: name)
    entries, paths = peft.saved_entries(adapter.config), model_paths(bound, manifest)
    out = {}
    for name, original in adapter.originals.items():
        head = rename(name)
        if original.is_meta or (source := tied_head_source(head, original.shape, manifest)) is None:
            continue
        if peft.wrapping_entry(entries, paths.get(source, source).rpartition(".")[0]) is not None:
            continue  # (embeddings saved whole too: nothing of PEFT's adapted model uses the original_module values)
        saved = bound.full_tensors.get(source)
        if saved is None and not isinstance(manifest[source], TensorInfo):
            continue  # (a registered base's manifest alone: its values are not at hand, nothing to compare)
        same = original.equal(saved) if saved is not None else all(  # (the blocks come flat)
            original[start:end].equal(block.view(-1, *original.shape[1:]).to(original.dtype))
            for start, end, block in read_row_blocks(manifest[source]))
        if not same:
            out[head] = (f"its original_module copy differs from {source!r}, which this base ties it to: PEFT's load "
                         f"puts the original_module values into those embeddings, loraops does not take them as "
                         f"trained; make the two equal")
    return out


def model_paths(adapter: Adapter, manifest: Mapping[str, object]) -> dict[str, str]:
    """The base's tensors → their paths in the model PEFT wrapped, which its modules_to_save entries are matched
    against: their own names, but a single-file SD, FLUX.1 or SD3 checkpoint's (ldm.diffusers_names) under the
    diffusers paths of the component the ``adapter`` (bound) lies in, without the component (PEFT wraps the
    transformer or unet alone: BFL's final_layer.linear is proj_out there, no "linear"); a tensor of no diffusers
    module (a fused qkv, the VAE's) is none PEFT's entries name."""
    aliases = ldm.diffusers_names(manifest)
    if not aliases:
        return {tensor: tensor for tensor in manifest}
    path_of = {module: path for path, module in aliases.items()}
    touched = [*adapter.modules, *(name.rpartition(".")[0] for name in adapter.full_tensors)]
    components = {path_of[module].partition(".")[0] for module in touched if module in path_of}
    return {f"{module}.{leaf}": f"{path.partition('.')[2]}.{leaf}" for module, path in path_of.items()
            if path.partition(".")[0] in components for leaf in ("weight", "bias") if f"{module}.{leaf}" in manifest}


def untie_refusal(embeddings: str, config: dict) -> str | None:
    """Why a merge does not write an output head tied to ``embeddings`` (not stored) untied, phrased to follow
    "'<head>' is ", or None: the config (``config``, of the model holding them) says the head is untied, or the
    model may not be untied (can_untie)."""
    if ties_word_embeddings(config) is False:
        return "not in the base, and its config.json says tie_word_embeddings: false"
    if not can_untie(config):
        return (f"tied to {embeddings!r} in an encoder-decoder model loraops does not untie: it unties only "
                f"{UNTIED_FAMILIES}, and does not merge into tied heads")
    return None


def _tied_head_of_class(config: dict) -> TiedHead | None:
    tied = next((TIED_HEAD_OF_CLASS[a] for a in architectures_of(config) if a in TIED_HEAD_OF_CLASS), None)
    return None if tied is not None and tied.flag is not None and config.get(tied.flag, True) is False else tied


def is_tied_head(name: str, config: dict) -> bool:
    """Is this module path (or its weight's name) an output head tied to the input embeddings: the head the model's
    class ties where TIED_HEAD_OF_CLASS lists it (XLNet's lm_loss, ModernBERT's decoder, LUKE's entity head — not its
    word head, which LUKE does not tie), else by path (is_head)?"""
    tied = _tied_head_of_class(config)
    if tied is None:
        return is_head(name)
    return names_module(name.removesuffix(".weight"), tied.head.removesuffix(".weight"))


def is_tied_embeddings(name: str, config: dict) -> bool:
    """Are these input embeddings a head may be tied to: those the model's class ties its head to where
    TIED_HEAD_OF_CLASS lists it (XLNet's word_embedding, ModernBERT's tok_embeddings; in a checkpoint of the bare
    model too), else by name (INPUT_EMBEDDINGS)?"""
    tied = _tied_head_of_class(config)
    if tied is None:
        return name.endswith(INPUT_EMBEDDINGS)
    return _class_head(tied, name) is not None


def _class_head(tied: TiedHead, embeddings: str) -> str | None:
    """The head ``tied``'s class ties to ``embeddings``: beside them, or the class's own path where they are a
    checkpoint saved from the bare model (GPT-1's own: tokens_embed.weight, h.0.…, which transformers loads with its
    prefix added, the head beside it); None where they are not the class's embeddings."""
    if names_module(embeddings, tied.embeddings):
        return embeddings.removesuffix(tied.embeddings) + tied.head
    return tied.head if embeddings == tied.embeddings.partition(".")[2] else None


def unstored_head_of(embeddings: str, manifest: Mapping[str, object], config: dict) -> str | None:
    """The output head a model ties to its input embeddings ``embeddings`` and does not store, named as transformers
    saves it: by its class where TIED_HEAD_OF_CLASS lists it (bert.embeddings.word_embeddings →
    cls.predictions.decoder; a checkpoint of the bare model's embeddings.word_embeddings → the same), else a causal LM's lm_head.weight beside the decoder's wrapper (model.embed_tokens →
    lm_head, language_model.model.embed_tokens → language_model.lm_head, GPT-NeoX's embed_in → embed_out, a
    checkpoint of the bare model's wte → lm_head); or None: the config.json names no class with an output head (a
    bare model, a classifier, or no config at all), unties it, or the head is stored. An encoder-decoder model
    loraops does not untie (can_untie) with such an unstored head raises: merged, a change of the embeddings would
    reach the head too (FSMT's output_projection in a checkpoint naming no FSMTForConditionalGeneration)."""
    if config.get("model_type") == "fsmt" and config.get("tie_word_embeddings") is True \
            and names_module(embeddings, "decoder.embed_tokens.weight") and _tied_head_of_class(config) is None:
        # (a checkpoint of FSMTForConditionalGeneration is untied: TIED_HEAD_OF_CLASS, untied_side_embeddings)
        # FSMTModel ties its encoder's embed_tokens and decoder.output_projection to these, neither stored; untied,
        # it would load them as newly initialized weights (a merge writing them untied is not checked)
        raise MismatchError(
            f"{embeddings!r} is tied to FSMT's encoder.embed_tokens and output head (decoder.output_projection) by "
            f"tie_word_embeddings: true, and loraops does not untie FSMT: merge into a copy of the base saved with "
            f"tie_word_embeddings: false")
    if ties_word_embeddings(config) is False or not _names_heads(config):
        return None
    head = head_tied_to(embeddings, config)
    if not can_untie(config):
        if head is None or head in manifest:
            return None
        # (Whisper's proj_out, before it was untied: merged into the embeddings, the change reached the head too,
        # where PEFT's adapted model changes the lookup alone: logits ~170 off, unsaid)
        raise MismatchError(
            f"{embeddings!r} is tied to an output head the base does not store, in an "
            f"encoder-decoder model loraops does not untie (only {UNTIED_FAMILIES}): merged, the change would reach "
            f"the head too, where PEFT's adapted model changes the lookup alone; merge into a copy of the base that "
            f"stores its head (tie_word_embeddings: false)")
    remote = _remote_code_class(config) if _tied_head_of_class(config) is None else None
    if head is None and remote is not None and _may_be_tied_embeddings(embeddings, manifest, config):
        raise MismatchError(
            f"{embeddings!r} may be tied to an output head the base does not store, and {remote} is remote code (its "
            f"config.json's auto_map): loraops cannot tell which head reads them, nor that none does; merge into a "
            f"copy of the base that stores its head (tie_word_embeddings: false)")
    if head is None or head in manifest:
        return None
    if remote is not None:
        raise MismatchError(
            f"{embeddings!r} is tied to an output head the base does not store, and {remote} is remote code (its "
            f"config.json's auto_map): loraops cannot tell which head it reads them as (a transformers causal LM's "
            f"would be {head!r}); merge into a copy of the base that stores its head (tie_word_embeddings: false)")
    return head


def _may_be_tied_embeddings(tensor: str, manifest: Mapping[str, object], config: dict) -> bool:
    """Might a model of remote code read ``tensor`` as the input embeddings it ties an unstored head to (InternLM2's
    model.tok_embeddings, its head output)? A table of input embeddings by its name (_names_input_embeddings), with a
    row per token of its config's vocabulary where the config says one (a model's MLP may be as tall: it is no
    table), by its name alone where it says none (the remote config class's default is the model's); and no other
    tensor of its shape stored outside the model's numbered blocks (which would be that head)."""
    shape = tuple(manifest[tensor].shape)
    vocabulary = {level.get(key) for level in _tie_flags(config)
                  for key in ("vocab_size", "padded_vocab_size")} - {None}
    if len(shape) != 2 or not _names_input_embeddings(tensor) or (vocabulary and shape[0] not in vocabulary):
        return False
    return not any(tuple(info.shape) == shape and not _IN_BLOCK.search(name) for name, info in manifest.items()
                   if name != tensor)


_IN_BLOCK = re.compile(r"\.\d+\.")
"""A tensor of a model's numbered blocks (model.layers.0.…)."""


def _names_input_embeddings(tensor: str) -> bool:
    """Does remote code's tensor name say it is a table of input embeddings: outside the numbered blocks, its module
    named for embeddings (InternLM2's tok_embeddings, ChatGLM's word_embeddings, Qwen's and Phi-1's wte, RWKV's
    emb), not for positions or token types?"""
    leaf = tensor.removesuffix(".weight").rpartition(".")[2]
    return not _IN_BLOCK.search(tensor) and ("emb" in leaf or leaf == "wte") and not re.search("pos|type", leaf)


def head_tied_to(embeddings: str, config: dict) -> str | None:
    """The output head a model of this config.json ties to its input embeddings ``embeddings``, stored or not, named
    as transformers saves it: by its class where TIED_HEAD_OF_CLASS lists it, else a causal LM's beside the decoder's
    wrapper; None where the config names no class with an output head, or the rule names none of these embeddings
    (T5's shared: its head is tied to them, but PEFT's LoRA on them is no lookup its adapted model makes)."""
    tied = _tied_head_of_class(config)
    if tied is not None:
        return _class_head(tied, embeddings)
    if config.get("model_type") == "marian" and config.get("share_encoder_decoder_embeddings") is False \
            and names_module(embeddings, "encoder.embed_tokens.weight"):
        return None  # its own embeddings: MarianMTModel ties its head to the decoder's alone (else to shared, as BART)
    return _causal_lm_head(embeddings) if _names_heads(config) else None


def _names_heads(config: dict) -> bool:
    """Does this config.json name a class whose output head a rule names (TIED_HEAD_OF_CLASS, a causal LM's,
    MarianMTModel's: lm_head beside its decoder's embed_tokens where it stores each side's own)?"""
    return _tied_head_of_class(config) is not None or any(
        a.endswith(LM_HEAD_CLASSES) or a == "MarianMTModel" for a in architectures_of(config))


def _causal_lm_head(embeddings: str) -> str | None:
    """The head a causal LM ties to ``embeddings``, by rule: lm_head.weight beside the decoder's wrapper (GPT-NeoX's
    embed_out.weight beside embed_in), or None."""
    found = _LM_WRAPPER.match(embeddings) if embeddings.endswith(INPUT_EMBEDDINGS) else None
    if found is None:
        return None
    return (found["owner"] or "") + ("embed_out.weight" if found["leaf"] == "embed_in" else "lm_head.weight")


def _remote_code_class(config: dict) -> str | None:
    """The class of config.json's architectures that its auto_map loads from the model's own code (ChatGLM's
    modeling_chatglm.ChatGLMForConditionalGeneration, InternLM2's …), or None: transformers' own classes, whose heads
    the causal-LM rule names."""
    auto_map = config.get("auto_map")
    loaded = {str(ref).rpartition(".")[2] for refs in (auto_map.values() if isinstance(auto_map, dict) else ())
              for ref in (refs if isinstance(refs, list) else [refs]) if ref}
    return next((a for a in architectures_of(config) if a in loaded), None)


def stored_twice(manifest: Mapping[str, object], config: Callable[[str], dict], touched: Iterable[str], *,
                 heads: bool = True) -> list[set[str]]:
    """Groups of the base's tensors (``manifest``: read from its files; ``config``: tensor → its model's config.json)
    that are one tied parameter stored more than once (byte-identical copies), among those ``touched``: a change to
    one must reach every copy, or the loaded model comes out untied, its head still the base's (transformers re-ties
    only equal tensors), where PEFT changed the one shared tensor. ``heads``: the tied heads among the copies too
    (not those of a single-file checkpoint, which has no config to tie them)."""
    import torch

    candidates = [n for n in manifest if is_tied_embeddings(n, config(n)) and not embeddings_untied(config(n))]
    if heads:
        candidates += [n for n in manifest if is_tied_head(n, config(n)) and n.endswith(".weight")
                       and ties_word_embeddings(config(n)) is not False]
    groups = []
    for name in set(touched) & set(candidates):
        info = manifest[name]
        twins = {other for other in candidates if other != name and manifest[other].shape == info.shape
                 and manifest[other].dtype == info.dtype}
        twins = {other for other in twins if all(
            torch.equal(a, b) for (_, _, a), (_, _, b)
            in zip(read_row_blocks(info), read_row_blocks(manifest[other]), strict=True))}
        if twins and not any(name in group for group in groups):
            groups.append({name, *twins})
    return groups


def embeddings_untied(config: dict) -> bool:
    """Does a model of this config.json hold its shared embeddings and each side's as parameters of their own: one of
    UNTIES_SIDE_EMBEDDINGS saying tie_word_embeddings: false (as the untied merge writes it; transformers 5 ties
    nothing of it), whose byte-identical copies are three parameters, not one stored thrice. Its shared is read by
    nothing: a change to it reaches each side (as in the tied model, and so a subtract takes off what the untied
    merge put into the copies); a side's own change stays its own."""
    return config.get("model_type") in UNTIES_SIDE_EMBEDDINGS and ties_word_embeddings(config) is False


def untied_stored_head(tensor: str, manifest: Mapping[str, object], config: Callable[[str], dict], *,
                       heads: bool = True) -> str | None:
    """The head stored byte-identical to its input embeddings (the tie, as some exporters save it) that a merge
    writes untied because ``tensor`` changes apart from the other copies: ``tensor`` itself, such a head, or the head
    the rule ties to ``tensor`` (head_tied_to) among its copies; None where the model may not be untied (can_untie)
    or there is no such head."""
    own = config(tensor) if tensor in manifest else None
    if own is None or not (is_tied_head(tensor, own) or is_tied_embeddings(tensor, own)) or not can_untie(own):
        return None  # (before stored_twice looks through the whole manifest: once per module checked)
    group = next(iter(stored_twice(manifest, config, [tensor], heads=heads)), set())
    tied = {name for name in group if is_tied_head(name, config(name))}
    if not group - tied:
        return None
    return tensor if tensor in tied else next((h for h in tied if h == head_tied_to(tensor, config(tensor))), None)


def tied_decoder_bias(head: str, config: dict) -> tuple[str, str] | None:
    """(a bias transformers ties only while ``head`` is tied, the bias it ties it to), which an untied head needs
    written as its own: BERT's cls.predictions.decoder.bias ← cls.predictions.bias; or None. By the class where
    TIED_HEAD_OF_CLASS lists it (ESM's and LXMERT's decoders have no bias; LUKE's entity head unties its word head's
    lm_head.bias ← lm_head.decoder.bias), else by the head's name."""
    tied = _tied_head_of_class(config)
    if tied is None:
        return _decoder_bias(head)
    pair = tied.tied_bias() if head.endswith(tied.head) else None
    prefix = head.removesuffix(tied.head)
    return None if pair is None else (prefix + pair[0], prefix + pair[1])


def stored_tied_bias(name: str, shape, manifest: Mapping[str, object]) -> str | None:
    """The bias the base stores for a tied bias ``name`` that it does not store (BERT's cls.predictions.decoder.bias
    is cls.predictions.bias, RoBERTa's lm_head.decoder.bias lm_head.bias, while the head is tied: one parameter,
    which PEFT's bias="all" saves under both names and bias="lora_only" on the decoder under the decoder's), or
    None. By the pairs TIED_HEAD_OF_CLASS names, under any prefix."""
    if name in manifest:
        return None
    pairs = {tied.tied_bias() for tied in TIED_HEAD_OF_CLASS.values() if tied.bias}
    parents = [name.removesuffix(bias) + parent for bias, parent in pairs if names_module(name, bias)]
    return next((p for p in parents if p in manifest and tuple(manifest[p].shape) == tuple(shape)), None)


def decoder_bias_of(name: str) -> str | None:
    """The head's bias a base-stored bias ``name`` is while the head is tied (BERT's cls.predictions.bias is
    cls.predictions.decoder.bias: the name a bound adapter gives the decoder's bias, stored_tied_bias), or None."""
    pairs = {tied.tied_bias() for tied in TIED_HEAD_OF_CLASS.values() if tied.bias}
    return next((name.removesuffix(parent) + bias for bias, parent in pairs if names_module(name, parent)), None)


def kohya_forms(manifest: Mapping[str, object]) -> dict[str, set[str]]:
    """kohya name → the base module paths that produce it: from each module's own path (parts of fused tensors
    included), from its diffusers path when the base is a single-file SD or FLUX.1 checkpoint (sd-scripts names
    SD 1.x/2.x UNets the diffusers way), and from its checkpoint path when the base is a pipeline (sd-scripts names
    SDXL's UNet so)."""
    modules = ldm.checkpoint_modules(manifest)
    # a pipeline's UNet at its checkpoint paths too, by which sd-scripts names SDXL's
    named = [(module, module) for module in modules] + list(ldm.diffusers_names(manifest).items()) + [
        (path, module) for module, path in ldm.checkpoint_paths(modules, whole=True).items()]
    named += [(head, head) for head in unstored_tied_heads(manifest)]
    forms: dict[str, set[str]] = {}
    for name, module in named:
        for base_prefix, kohya_prefixes in KOHYA_BASE_PREFIXES:
            if name.startswith(base_prefix):
                rest = name[len(base_prefix):]
                # a pipeline saved by transformers 5 lacks sd-scripts' text_model. level (ldm.clip_paths)
                for path in ldm.clip_paths(rest) if base_prefix.startswith("text_encoder") else [rest]:
                    for kohya_prefix in kohya_prefixes:
                        forms.setdefault(f"{kohya_prefix}_{path.replace('.', '_')}", set()).add(module)
    return forms


def tied_layer_copy(adapter: Adapter, name: str, manifest: Mapping[str, object]) -> bool:
    """Is the adapter's full tensor ``name`` the copy of its tied embeddings' layer that PEFT saves for the head the
    base does not store, beside trainable tokens (save_embedding_layers): the same values as the embeddings' saved
    layer? A merge leaves it out, and the head tied, as PEFT's model keeps it."""
    import torch

    if not adapter.token_rows or (tensor := adapter.full_tensors.get(name)) is None:
        return False
    twin = adapter.full_tensors.get(tied_head_source(name, tuple(tensor.shape), manifest))
    return twin is not None and torch.equal(twin, tensor)


def same_rows(adapter: Adapter, name: str, source: str | None) -> bool:
    """Are the adapter's trainable tokens on ``name`` those on ``source`` (the same rows, the same values): PEFT's
    copy for a layer it ties to the tokens on ``source`` (a tied head; each side of shared)?"""
    import torch

    rows, twin = adapter.token_rows.get(name), adapter.token_rows.get(source)
    return rows is not None and twin is not None and twin.indices == rows.indices and torch.equal(twin.values,
                                                                                                  rows.values)


def tied_side_source(weight_name: str, shape, manifest: Mapping[str, object]) -> str | None:
    """The embeddings a base stores that one side's lookup ``weight_name``, not stored, is tied to: T5's and BART's
    shared (shared_embeddings_of), ProphetNet's X.word_embeddings for X.encoder. and X.decoder.word_embeddings; or
    None."""
    if (shared := shared_embeddings_of(weight_name, shape, manifest)) is not None or weight_name in manifest:
        return shared
    for side in ("encoder.word_embeddings.weight", "decoder.word_embeddings.weight"):
        if names_module(weight_name, side):
            source = weight_name.removesuffix(side) + "word_embeddings.weight"
            return source if source in manifest and tuple(manifest[source].shape) == tuple(shape) else None
    return None


def without_tied_copies(adapter: Adapter, manifest: Mapping[str, object], config: Callable[[str], dict] | None,
                        *, heads: bool = True) -> Adapter:
    """The adapter without the trainable tokens of a head the base ties to its embeddings (not stored, or, with
    ``config``, stored twice: stored_twice, ``heads`` its own) that are the same rows as the embeddings' (PEFT's
    TrainableTokensConfig saves the tied head's copy too), nor those of one side's lookup that are the stored
    embeddings' it is tied to (tied_side_source: PEFT's tokens on shared, tied to each side), nor the head's copy of
    the embeddings saved whole beside the tokens: the merged model then stays tied, as PEFT's does, in a model
    loraops does not untie too (NLLB-MoE, PegasusX, ProphetNet). Copies that differ stay, for check to judge."""
    copies = set()
    for name, rows in adapter.token_rows.items():
        shape = rows_shape(rows, manifest)
        source = tied_head_source(name, shape, manifest) or tied_side_source(name, shape, manifest)
        # (stored twice, byte-identical: the tie)
        if config is not None and name in manifest and (is_side_embeddings(name) or is_tied_head(name, config(name))):
            source = next((n for group in stored_twice(manifest, config, [name], heads=heads) for n in sorted(group)
                           if not is_tied_head(n, config(n)) and not is_side_embeddings(n)), None)
        if same_rows(adapter, name, source):
            copies.add(name)
    # the head's copy of the embedding layer saved whole beside the tokens (PEFT's save_embedding_layers)
    layers = {name for name in adapter.full_tensors if tied_layer_copy(adapter, name, manifest)}
    if not copies and not layers:
        return adapter
    return replace(adapter, token_rows={n: r for n, r in adapter.token_rows.items() if n not in copies},
                   full_tensors={n: t for n, t in adapter.full_tensors.items() if n not in layers})


def unstored_tied_heads(manifest: Mapping[str, object]) -> list[str]:
    """The module paths of the output heads a tied base does not store that a PEFT name binds to (tied_head_source),
    by its embeddings: the causal-LM rule's (lm_head beside the decoder's wrapper, GPT-NeoX's embed_out) and the heads
    TIED_HEAD_OF_CLASS names beside their class's embeddings. The kohya writer names such a module by its path
    (lora_unet_lm_head), which no stored tensor gives."""
    heads = {}
    named = tuple({".".join(tied.embeddings.split(".")[-2:]) for tied in TIED_HEAD_OF_CLASS.values()})
    for embeddings, info in manifest.items():
        if not embeddings.endswith(INPUT_EMBEDDINGS + named):
            continue
        if (head := _causal_lm_head(embeddings)) is not None:
            heads[head] = info.shape
        for tied in TIED_HEAD_OF_CLASS.values():
            if (head := _class_head(tied, embeddings)) is not None:
                heads[head] = info.shape
    return sorted(head.removesuffix(".weight") for head, shape in heads.items()
                  if tied_head_source(head, shape, manifest) is not None)


@dataclass
class Resolution:
    names: dict[str, str] = field(default_factory=dict)
    """adapter module name → base module path"""
    full: dict[str, str] = field(default_factory=dict)
    """adapter full-tensor name → base tensor name"""
    rows: dict[str, str] = field(default_factory=dict)
    """adapter trainable-token tensor name → base tensor name"""
    missing: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)


def resolve(adapter: Adapter, manifest: Mapping[str, object]) -> Resolution:
    res = Resolution()
    if not adapter.names_resolved:
        forms = kohya_forms(manifest)
        for name in adapter.modules:
            candidates = sorted(forms.get(name, ()))
            if len(candidates) == 1:
                res.names[name] = candidates[0]
            elif candidates:
                res.ambiguous[name] = candidates
            else:
                res.missing.append(name)
        res.full = {n: n for n in adapter.full_tensors}
        return res
    rename = renaming(adapter, manifest)
    res.names = {n: rename(n) for n in adapter.modules}
    res.full = {n: stored_tied_bias(rename(n), adapter.full_tensors[n].shape, manifest) or rename(n)
                for n in adapter.full_tensors}
    res.rows = {n: rename(n) for n in adapter.token_rows}
    return res


# transformers 5 renames some models' modules in memory and saves them under their checkpoint names again (its
# conversion_mapping.py); PEFT names an adapter's modules as they are in memory. Per family: the rules in-memory →
# saved, and their inverse saved → in-memory right next to them; every rule of a list is tried on a name in turn (each
# at most once). check uses the forward rules only when they make every module of an adapter match the base; extract
# (memory_names) uses the inverse ones for the families its base's config.json names.
_VIT_ATTENTION = [(r"\.attention\.q_proj(?=\.|$)", ".attention.attention.query"),
                  (r"\.attention\.k_proj(?=\.|$)", ".attention.attention.key"),
                  (r"\.attention\.v_proj(?=\.|$)", ".attention.attention.value"),
                  (r"\.attention\.o_proj(?=\.|$)", ".attention.output.dense")]
_VIT_ATTENTION_BACK = [(r"\.attention\.attention\.query(?=\.|$)", ".attention.q_proj"),
                       (r"\.attention\.attention\.key(?=\.|$)", ".attention.k_proj"),
                       (r"\.attention\.attention\.value(?=\.|$)", ".attention.v_proj"),
                       (r"\.attention\.output\.dense(?=\.|$)", ".attention.o_proj")]
# Swin and Segformer keep BERT's attention.self.query/key/value
_SELF_ATTENTION = [(r"\.attention\.q_proj(?=\.|$)", ".attention.self.query"),
                   (r"\.attention\.k_proj(?=\.|$)", ".attention.self.key"),
                   (r"\.attention\.v_proj(?=\.|$)", ".attention.self.value"),
                   (r"\.attention\.o_proj(?=\.|$)", ".attention.output.dense")]
_SELF_ATTENTION_BACK = [(r"\.attention\.self\.query(?=\.|$)", ".attention.q_proj"),
                        (r"\.attention\.self\.key(?=\.|$)", ".attention.k_proj"),
                        (r"\.attention\.self\.value(?=\.|$)", ".attention.v_proj"),
                        (r"\.attention\.output\.dense(?=\.|$)", ".attention.o_proj")]
_LANGUAGE_MODEL = [(r"^lm_head(?=\.|$)", "language_model.lm_head"),
                   (r"^model\.language_model\.", "language_model.model.")]
_LANGUAGE_MODEL_BACK = [(r"^language_model\.lm_head(?=\.|$)", "lm_head"),
                        (r"^language_model\.model\.", "model.language_model.")]
# Mixtral's per-expert weights (and PhiMoE's): experts.<e>.{gate,up,down}_proj ↔ experts.<e>.{w1,w3,w2}
_EXPERT_WEIGHTS = [(r"(\.experts\.\d+)\.gate_proj(?=\.|$)", r"\1.w1"), (r"(\.experts\.\d+)\.up_proj(?=\.|$)", r"\1.w3"),
                   (r"(\.experts\.\d+)\.down_proj(?=\.|$)", r"\1.w2")]
_EXPERT_WEIGHTS_BACK = [(r"(\.experts\.\d+)\.w1(?=\.|$)", r"\1.gate_proj"), (r"(\.experts\.\d+)\.w3(?=\.|$)", r"\1.up_proj"),
                        (r"(\.experts\.\d+)\.w2(?=\.|$)", r"\1.down_proj")]
_TOWERS = r"(vision_tower|multi_modal_projector|image_tower|video_tower|vision_model|vision_embed_tokens|audio_tower)"


@dataclass(frozen=True)
class Layout:
    """One family's renaming: ``rules`` in-memory → saved, ``inverse`` saved → in-memory (each a list of (pattern,
    replacement), applied in turn, each at most once), and ``families``: the config.json model_type values and
    architectures classes transformers renames this way (its conversion_mapping.py keys and their aliases)."""

    name: str
    families: frozenset[str]
    rules: tuple
    inverse: tuple
    marks: "re.Pattern | None" = None
    """Saved names only this family's checkpoints have, where the names its rules rename are common to others (a
    Llama's are Qwen2-VL's language model's, BERT's layers look like ViT's): without a config.json the family is
    suspected only when some name matches. None: any name its rules rename marks it."""

    @staticmethod
    def of(name: str, families: str, rules, inverse, marks: str | None = None) -> "Layout":
        compiled = [tuple((re.compile(p), r) for p, r in rs) for rs in (rules, inverse)]
        return Layout(name, frozenset(families.split()), *compiled, re.compile(marks) if marks else None)

    def marked(self, name: str) -> bool:
        """Is a saved name one only this family's checkpoints have (``marks``)?"""
        return bool(self.marks.search(name)) if self.marks is not None else self.in_memory(name) != name

    @staticmethod
    def _apply(rules, name: str) -> str:
        for pattern, replacement in rules:
            name = pattern.sub(replacement, name, count=1)
        return name

    def saved(self, name: str) -> str:
        return self._apply(self.rules, name)

    def in_memory(self, name: str) -> str:
        return self._apply(self.inverse, name)


SAVED_LAYOUTS = [
    # LLaVA and the multimodal models transformers maps like it: its llava, llava_next, video_llava, fuyu,
    # mllama and qwen2_audio mappings move a tower or projector under model. (LLaVA-NeXT/OneVision, Mistral3,
    # Gemma3, PaliGemma, InternVL, Aria, Video-LLaVA, Fuyu, Mllama, Qwen2-Audio, Voxtral, …)
    Layout.of("LLaVA-style",
              "llava aria paligemma aya_vision got_ocr2 gemma3 internvl vipllava mistral3 pp_chart2table llava_next "
              "llava_next_video llava_onevision video_llava fuyu mllama qwen2_audio voxtral voxtral_realtime "
              "audioflamingo3 glmasr musicflamingo",
              [*_LANGUAGE_MODEL, (rf"^model\.{_TOWERS}(?=\.|$)", r"\1")],
              [*_LANGUAGE_MODEL_BACK, (rf"^{_TOWERS}(?=\.|$)", r"model.\1")],
              r"^(language_model|multi_modal_projector)\."),  # (a tower alone: CLIP's vision_model too)
    # a text model loaded from a multimodal checkpoint (transformers' qwen3_5_text PrefixChange, also Qwen3.5-MoE,
    # Gemma3n, Apertus 1.5 text): model.… in memory ↔ model.language_model.… saved, the head as it is
    Layout.of("text model of a multimodal checkpoint", "qwen3_5_text qwen3_5_moe_text gemma3n_text",
              [(r"^model\.(?!language_model\.)", "model.language_model.")],
              [(r"^model\.language_model\.", "model.")]),
    # Granite Speech (its granite_speech mapping: the speech encoder and projector under model.)
    Layout.of("Granite Speech", "granite_speech granite_speech_plus",
              [*_LANGUAGE_MODEL, (r"^model\.(encoder|projector)(?=\.|$)", r"\1")],
              [*_LANGUAGE_MODEL_BACK, (r"^(encoder|projector)(?=\.|$)", r"model.\1")],
              r"^projector\."),  # (a top-level encoder alone: T5's too)
    # DINOv3 ViT (its dinov3_vit mapping): model.layer.<i> ↔ layer.<i>, the embeddings not under model.
    Layout.of("DINOv3 ViT", "dinov3_vit", [(r"^model\.(?=layer\.\d)", "")], [(r"^(?=layer\.\d)", "model.")]),
    Layout.of("GPT-NeoX's embed_out", "gpt_neox GPTNeoXForCausalLM",
              [(r"^lm_head(?=\.|$)", "embed_out")], [(r"^embed_out(?=\.|$)", "lm_head")]),
    # Qwen2-VL, Qwen2.5-VL: model.language_model.… ↔ model.…, model.visual.… ↔ visual.…
    Layout.of("Qwen2-VL", "qwen2_vl qwen2_5_vl Qwen2VLForConditionalGeneration Qwen2_5_VLForConditionalGeneration",
              [(r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual.")],
              [(r"^model\.", "model.language_model."), (r"^visual\.", "model.visual.")],
              r"^visual\."),  # (its language model is saved as any Llama's, Whisper's model.… too)
    # Qwen2.5-Omni (its Qwen2_5OmniThinkerForConditionalGeneration mapping, within the whole model's thinker.):
    # [thinker.]model.language_model.… ↔ [thinker.]model.…, [thinker.]model.{audio_tower,visual}.… ↔ [thinker.]{…}.…
    # (marked by thinker. or its vision tower's separate q/k/v: a thinker's model.… alone is any Llama's)
    Layout.of("Qwen2.5-Omni", "qwen2_5_omni qwen2_5_omni_thinker Qwen2_5OmniForConditionalGeneration "
              "Qwen2_5OmniThinkerForConditionalGeneration",
              [(r"^(thinker\.)?model\.language_model\.", r"\1model."),
               (r"^(thinker\.)?model\.(audio_tower|visual)(?=\.|$)", r"\1\2")],
              [(r"^(thinker\.)?model\.", r"\1model.language_model."),
               (r"^(thinker\.)?(audio_tower|visual)(?=\.|$)", r"\1model.\2")],
              r"^thinker\.(model|audio_tower|visual)\.|^visual\.blocks\.\d+\.attn\.q(\.|$)"),
    # ViT and the vision encoders transformers maps like it (DeiT, BEiT, ViT-MAE, ViT-MSN, AST, I-JEPA, ViViT)
    Layout.of("ViT-style", "vit deit beit vit_mae vit_msn audio-spectrogram-transformer ijepa vivit",
              [(r"(^|\.)layers\.(?=\d)", r"\1encoder.layer."), *_VIT_ATTENTION,
               (r"\.mlp\.fc1(?=\.|$)", ".intermediate.dense"), (r"\.mlp\.fc2(?=\.|$)", ".output.dense")],
              [(r"(^|\.)encoder\.layer\.(?=\d)", r"\1layers."), *_VIT_ATTENTION_BACK,
               (r"\.intermediate\.dense(?=\.|$)", ".mlp.fc1"), (r"\.output\.dense(?=\.|$)", ".mlp.fc2")],
              r"\.attention\.attention\."),  # (BERT's encoder.layer.N is renamed too, attention.self is BERT's)
    # DINOv2 (its layers keep their names; a SwiGLU MLP's gate_proj and up_proj are row blocks of weights_in,
    # see ldm.FUSED)
    Layout.of("DINOv2", "dinov2 dinov2_with_registers",
              [*_VIT_ATTENTION, (r"\.mlp\.down_proj(?=\.|$)", ".mlp.weights_out")],
              [*_VIT_ATTENTION_BACK, (r"\.mlp\.weights_out(?=\.|$)", ".mlp.down_proj")], r"\.attention\.attention\."),
    # Swin (transformers' swin mapping; its layers keep their names)
    Layout.of("Swin", "swin",
              [*_SELF_ATTENTION, (r"(\.blocks\.\d+)\.mlp\.fc1(?=\.|$)", r"\1.intermediate.dense"),
               (r"(\.blocks\.\d+)\.mlp\.fc2(?=\.|$)", r"\1.output.dense")],
              [*_SELF_ATTENTION_BACK, (r"(\.blocks\.\d+)\.intermediate\.dense(?=\.|$)", r"\1.mlp.fc1"),
               (r"(\.blocks\.\d+)\.output\.dense(?=\.|$)", r"\1.mlp.fc2")], r"\.layers\.\d+\.blocks\.\d+\."),
    # Segformer (SegformerModel, SegformerForSemanticSegmentation): stages.<s>.blocks.<b> ↔ encoder.block.<s>.<b>,
    # stages.<s>.patch_embeddings ↔ encoder.patch_embeddings.<s> (the inverse in reverse order: its MLP rule needs
    # the saved block path)
    Layout.of("Segformer", "segformer",
              [(r"(^|\.)stages\.(\d+)\.blocks\.(\d+)\.", r"\1encoder.block.\2.\3."),
               (r"(^|\.)stages\.(\d+)\.patch_embeddings\.", r"\1encoder.patch_embeddings.\2."), *_SELF_ATTENTION,
               (r"\.attention\.sequence_reduction\.sequence_reduction(?=\.|$)", ".attention.self.sr"),
               (r"(\.block\.\d+\.\d+)\.mlp\.fc(?=[12](\.|$))", r"\1.mlp.dense"),
               (r"^decode_head\.linear_projections\.", "decode_head.linear_c.")],
              [(r"^decode_head\.linear_c\.", "decode_head.linear_projections."),
               (r"(\.block\.\d+\.\d+)\.mlp\.dense(?=[12](\.|$))", r"\1.mlp.fc"),
               (r"\.attention\.self\.sr(?=\.|$)", ".attention.sequence_reduction.sequence_reduction"),
               *_SELF_ATTENTION_BACK,
               (r"(^|\.)encoder\.patch_embeddings\.(\d+)\.", r"\1stages.\2.patch_embeddings."),
               (r"(^|\.)encoder\.block\.(\d+)\.(\d+)\.", r"\1stages.\2.blocks.\3.")],
              r"(^|\.)encoder\.block\.\d+\.\d+\.|^decode_head\.linear_c\."),
    # Mixtral (and MiniMax): mlp.gate / mlp.experts.<e>.{gate,up,down}_proj ↔ block_sparse_moe.gate /
    # block_sparse_moe.experts.<e>.{w1,w3,w2} (the per-expert shares of fused experts, see formats.params)
    Layout.of("Mixtral's block_sparse_moe", "mixtral minimax minimax_m2",
              [(r"\.mlp\.(?=gate(\.|$)|experts\.\d)", ".block_sparse_moe."), *_EXPERT_WEIGHTS],
              [(r"\.block_sparse_moe\.(?=gate(\.|$)|experts\.\d)", ".mlp."), *_EXPERT_WEIGHTS_BACK]),
    # PhiMoE: Mixtral's layout, its router renamed too (transformers' phimoe mapping: block_sparse_moe.gate ↔
    # mlp.router)
    Layout.of("PhiMoE's block_sparse_moe", "phimoe",
              [(r"\.mlp\.router(?=\.|$)", ".block_sparse_moe.gate"), (r"\.mlp\.(?=experts\.\d)", ".block_sparse_moe."),
               *_EXPERT_WEIGHTS],
              [(r"\.block_sparse_moe\.gate(?=\.|$)", ".mlp.router"), (r"\.block_sparse_moe\.(?=experts\.\d)", ".mlp."),
               *_EXPERT_WEIGHTS_BACK]),
]


def memory_names(names: Iterable[str], config: Mapping) -> tuple[dict[str, str], str | None]:
    """({saved tensor name: the name transformers 5 gives it in memory, where they differ}, a warning or None) for a
    checkpoint holding the tensors ``names``, whose config.json is ``config`` ({} when it has none): the names PEFT
    sees. Names alone cannot say which family a checkpoint is (Qwen2-VL's language model is saved as a Llama's;
    BERT's layers look like ViT's and Swin's), so the family comes from config.json's model_type and architectures.
    Its inverse rules are used only when every name is one its forward rules leave alone (a checkpoint in the saved
    layout, not one already in the in-memory layout) and gives back exactly (forward ∘ inverse = identity). Without
    a config.json, names are kept, with a warning when some family's rules would have renamed them."""
    names = list(names)
    kinds = {model_type_of(config), *architectures_of(config)}
    layout = next((layout for layout in SAVED_LAYOUTS if layout.families & kinds), None)
    if layout is not None:
        if any(layout.saved(n) != n for n in names):
            return {}, None  # saved under the in-memory names already
        moved = {n: layout.in_memory(n) for n in names}
        if all(layout.saved(m) == n for n, m in moved.items()):
            return {n: m for n, m in moved.items() if m != n}, None
        bad = next(n for n, m in moved.items() if layout.saved(m) != n)
        return {}, (f"cannot tell the names transformers gives {bad} in memory ({layout.name} rules do not map it "
                    "back): PEFT module names are written as saved, and PEFT may skip some; merge with loraops")
    if config or ldm.diffusers_names(names):  # a model of no renamed family, or a single-file SD/FLUX checkpoint
        return {}, None
    suspects = [layout.name for layout in SAVED_LAYOUTS
                if any(layout.in_memory(n) != n for n in names) and any(layout.marked(n) for n in names)
                and all(layout.saved(n) == n and layout.saved(layout.in_memory(n)) == n for n in names)]
    if not suspects:
        return {}, None
    return {}, (f"no config.json to tell the model family: PEFT module names are written as saved; if transformers "
                f"loads it under other names ({', '.join(suspects)}), PEFT skips those modules: merge with loraops")


def clip_layout(names: Iterable[str]):
    """A renaming of a pipeline's text-encoder module or tensor names into the CLIP layout (ldm.clip_paths) each
    text encoder has among ``names``, a pipeline's: per component, as transformers 5 saves SDXL's CLIPTextModel
    (text_encoder) without text_model. and its CLIPTextModelWithProjection (text_encoder_2) with it."""
    with_level = {component for component, _, rest in (n.partition(".") for n in names)
                  if component.startswith("text_encoder") and rest.startswith("text_model.")}

    def rename(name: str) -> str:
        component, dot, rest = name.partition(".")
        if not (dot and component.startswith("text_encoder")) or len(ldm.clip_paths(rest)) == 1:
            return name
        stored = component in with_level
        return name if rest.startswith("text_model.") == stored else f"{component}.{ldm.clip_paths(rest)[-1]}"
    return rename


# ComfyUI's in-memory text encoders of SD 1.x (clip_l), SD 2.x (clip_h) and SDXL (clip_l, clip_g; the refiner's
# clip_g), as its key map names them for a LoRA, → the pipeline components diffusers (and ldm.diffusers_names) gives them
COMFYUI_TEXT_ENCODERS = {"text_encoders.clip_l.transformer.": "text_encoder.",
                         "text_encoders.clip_h.transformer.": "text_encoder.",
                         "text_encoders.clip_g.transformer.": "text_encoder_2."}


def comfyui_name(name: str) -> str:
    """A module name in ComfyUI's LoRA names → the diffusers pipeline's (a text encoder's) or the checkpoint's."""
    prefix = next((p for p in COMFYUI_TEXT_ENCODERS if name.startswith(p)), None)
    return f"model.{name}" if prefix is None else COMFYUI_TEXT_ENCODERS[prefix] + name[len(prefix):]


def renaming(adapter: Adapter, manifest: Mapping[str, object]):
    """PEFT module paths are relative to the model PEFT wrapped; a base saved from another class may have or lack a
    leading ``model.``, a diffusers LoRA (``unet.down_blocks…``) may meet a single-file SD checkpoint, and a model
    transformers renames in memory is saved under its old names (SAVED_LAYOUTS). Apply the one renaming that makes
    every module and full tensor match, if any does; else the one that makes the most match, more than half of them,
    leaving the others under their own names for check to report."""
    wanted = {f"{n}.weight": m.weight_shape for n, m in adapter.modules.items()}
    wanted.update((n, tuple(t.shape)) for n, t in adapter.full_tensors.items())
    wanted.update((n, rows_shape(r, manifest)) for n, r in adapter.token_rows.items())
    aliases = ldm.diffusers_names(manifest)

    def checkpoint_name(name: str) -> str:
        """A diffusers module path or tensor name → the checkpoint's."""
        if name in aliases:
            return aliases[name]
        module, _, leaf = name.rpartition(".")
        return f"{aliases[module]}.{leaf}" if module in aliases else name

    def as_is(name: str) -> str:
        return name

    candidates = [as_is, lambda n: f"model.{n}"]
    if any(n.startswith("model.") for n in wanted):  # (BartModel's checkpoint: lm_head beside it, not under model.)
        candidates.insert(1, lambda n: n.removeprefix("model."))
    # a checkpoint saved from the bare model lacks its base_model_prefix (GPT-2's and BLOOM's own: wte, h.0…, where
    # PEFT says transformer.wte), the head beside it keeping its name: transformers adds the prefix on load
    leading = Counter(n.partition(".")[0] for n in wanted if "." in n.partition(".")[2]).most_common(1)
    strip = f"{leading[0][0]}." if leading and leading[0][0] != "model" else None
    if strip is not None:
        candidates.insert(2, lambda n, prefix=strip: n.removeprefix(prefix))
    # a DiT's original module paths (Wan's blocks.0.self_attn.q) bare, behind ComfyUI's diffusion_model. or behind
    # model.diffusion_model., whichever of these the checkpoint (or a pipeline's, ldm.pipeline_dit) has; and behind
    # a component (ai-toolkit's and diffusion-pipe's transformer.) on a checkpoint saved by ComfyUI
    # (model.diffusion_model.), as ComfyUI's key maps take both
    candidates += [lambda n: ldm.UNET_PREFIX + n, lambda n: DIFFUSION_MODEL.sub("", n)]
    if strip is not None:
        candidates.append(lambda n, prefix=strip: ldm.UNET_PREFIX + n.removeprefix(prefix))
    if aliases:
        candidates.append(checkpoint_name)
        # a PEFT adapter of a diffusers transformer or UNet alone (FLUX's, SD3's; an SD UNet's): named without the
        # pipeline's component, as diffusers' load_lora_adapter(prefix=None), PEFT and ComfyUI take it on that model
        candidates += [lambda n: checkpoint_name(f"transformer.{n}"), lambda n: checkpoint_name(f"unet.{n}")]
    candidates += [layout.saved for layout in SAVED_LAYOUTS] + [clip_layout(manifest)]
    if aliases:
        to_aliases = clip_layout(aliases)
        candidates.append(lambda n: checkpoint_name(to_aliases(n)))
        # ComfyUI's names of a LoRA it saved (its text encoders text_encoders.clip_l.transformer.…, its denoiser
        # diffusion_model.…) on an SD/SDXL checkpoint that stores the encoders otherwise
        candidates.append(lambda n: checkpoint_name(to_aliases(comfyui_name(n))))

    def present(tensor: str, shape, tied: bool) -> bool:
        module = tensor.removesuffix(".weight")
        return (tensor in manifest or ldm.fused_target(module, manifest) is not None
                or params.stored_fused(module, manifest) is not None
                or (tied and (tied_head_source(tensor, shape, manifest) or stored_tied_bias(tensor, shape, manifest)
                              or shared_embeddings_of(tensor, shape, manifest)) is not None))

    # a head the base stores under another name (GPT-NeoX's embed_out) before one it would share with its embeddings
    # (or one side's embed_tokens with its shared embeddings)
    for tied in (False, True):
        for rename in candidates:
            if all(present(rename(n), shape, tied) for n, shape in wanted.items()):
                return rename
    # none binds them all (an LTX-2.3 LoRA on an LTX-2 base, an image-to-video Wan LoRA on a text-to-video one): the
    # renaming that binds the most, the first of equals, if it binds more than half; the rest keep the adapter's own
    # names, to be reported missing as they are named there (a renamed one the base holds under its own name keeps
    # the renamed name: one renaming for all, never a mix)
    # (counted by name, each one's misses only while it may still be the best: a tied head's lookups are slow)
    unbound, best = set(wanted), as_is
    for rename in candidates:
        limit = min(len(unbound), (len(wanted) + 1) // 2)
        left = set(itertools.islice((n for n, shape in wanted.items() if not present(rename(n), shape, False)), limit))
        if len(left) < limit:
            unbound, best = left, rename
    if best is as_is:
        return as_is
    given = {f"{n}.weight": n for n in adapter.modules} | {n: n for n in (*adapter.full_tensors, *adapter.token_rows)}
    keep = {given[n] for n in unbound if not present(best(n), wanted[n], True) and not present(n, wanted[n], True)}
    return lambda n: n if n in keep else best(n)


def conv1d_layout(manifest: Mapping[str, object]) -> bool:
    """Does the base store its c_attn/c_fc projections as transformers' Conv1D (in×out)? Both widen (out is 2–4× in),
    so in×out storage puts the smaller dimension first (GPT-2's c_attn: 768×2304); an nn.Linear puts the larger
    first (Qwen-1's c_attn)."""
    for name, info in manifest.items():
        if name.endswith((".c_attn.weight", ".c_fc.weight")) and len(info.shape) == 2:
            return info.shape[0] < info.shape[1]
    return False


def fit_orientation(module: LoraModule, base_shape: tuple[int, ...], conv1d: bool, *, stored: bool = False,
                    embedding: bool = False) -> LoraModule:
    """Whether W holds B·A or (B·A)ᵀ is the base layer's business, as in PEFT (a Conv1D is fan_in_fan_out whatever
    the config says, an nn.Linear never is), but PEFT saves one fan_in_fan_out for the whole adapter: the value set
    by the last layer it wrapped, so a GPT-2 adapter on c_proj and lm_head says false, and a bare file says nothing.
    So a module is transposed when the config says so or it is a Conv1D of a Conv1D-layout base, unless the base's
    shape says otherwise (an nn.Linear stored out×in); a square one, whose shape cannot say, only when it is such a
    Conv1D (a fan_in_fan_out set by hand in a Llama adapter's config transposed its square q_proj, which PEFT, resetting
    the flag for an nn.Linear, does not). A LoRA on the raw parameter is added as the parameter is stored
    (PEFT's ParamWrapper), whatever the layer.

    ``stored``: the factors give the delta as the base stores it (kohya's: up·down, no transposed convention, so the
    kohya writer writes a Conv1D's or an embedding's module as Bᵀ/Aᵀ). On a Conv1D or an embedding (by its weight's
    name, or ``embedding``: the file says so, formats.kohya.EMBEDDINGS_KEY) such a module is put in PEFT's layout, A = upᵀ (r × the layer's inputs), B = downᵀ, the same delta: as read, the PEFT file written
    of it had a Conv1D's lora_A as wide as its outputs (PEFT refused it), or lora_A/lora_B on an nn.Embedding, whose
    LoRA PEFT keeps in lora_embedding_A/B (it loaded the file without that module's factors)."""
    if module.kind != "linear" or module.fused is not None or module.raw_parameter is not None or module.product:
        return module
    conv1d_layer = conv1d and conv1d_named(module.name)
    if stored:
        embedding = embedding or is_embedding(module.weight_name)
        if module.transposed or module.weight_shape != base_shape or not (embedding or conv1d_layer):
            return module
        return replace(module, A=module.B.T.contiguous(), B=module.A.T.contiguous(),
                       kind="embedding" if embedding else "linear", fan_in_fan_out=not embedding)
    out_f, in_f = module.out_features, module.in_features
    transposed = module.fan_in_fan_out or conv1d_layer
    if out_f != in_f and base_shape == (out_f, in_f) and not conv1d_layer:
        # (a Conv1D's lora_A is as wide as its stored rows: factors that fit only untransposed are another layer's,
        # which PEFT refuses to load; left transposed, they are reported as not fitting)
        transposed = False
    elif out_f == in_f:  # the shape cannot tell: the layer's class (PEFT sets a Linear's flag false, a Conv1D's true)
        transposed = conv1d_layer
    if transposed == module.fan_in_fan_out and module.orientation_known:
        return module
    return replace(module, fan_in_fan_out=transposed, orientation_known=True)


def fit_kind(module: LoraModule, base_shape: tuple[int, ...]) -> LoraModule:
    """kohya stores 1×1 convs as 4-D factors and sometimes targets a Linear with them (and vice versa): reshape the
    factors to the base's kind when only the trailing 1×1 differs, or when 2-D factors are a conv's flattened
    (out × in·k…, as ComfyUI applies them). LoHa/LoKr (PEFT's and LyCORIS') and PEFT's AdaLoRA
    store a conv's factors flattened, out × in·k…: the base's shape says the kernel."""
    shape = module.weight_shape
    if module.product is not None or module.method == "adalora":
        if module.product is not None:
            module = replace(module, product=replace(module.product, kernel_known=True))
        if base_shape in (shape, shape[::-1]):  # a Linear (a Conv1D stored in×out: fit_orientation's business)
            return replace(module, inputs_known=True)
        if len(base_shape) >= 2 and base_shape[0] == shape[0] and math.prod(base_shape[1:]) == math.prod(shape[1:]):
            return _factors_shaped(module, base_shape, inputs_known=True)
        return module
    if module.kind == "conv" and shape[2:] == (1, 1) and base_shape == shape[:2]:
        B2, A2 = module.matrices()
        return replace(module, kind="linear", A=A2, B=B2)
    # 2-D factors on a conv: a 1×1's, or a k×k's flattened out × in·k… (ComfyUI applies them so): the base's kernel
    if (module.kind == "linear" and not module.transposed and len(base_shape) > 2 and base_shape[0] == shape[0]
            and math.prod(base_shape[1:]) == shape[1]):
        return _factors_shaped(module, base_shape)
    return module


def _factors_shaped(module: LoraModule, base_shape: tuple[int, ...], **changes) -> LoraModule:
    """``module`` with A r × (the base's inputs and kernel) and B out × r × 1…: a conv's factors for a conv base, a
    Linear's for a 2-D one."""
    r = module.A.shape[0]
    return replace(module, kind="conv" if len(base_shape) > 2 else "linear", A=module.A.reshape(r, *base_shape[1:]),
                   B=module.B.reshape(base_shape[0], r, *[1] * (len(base_shape) - 2)), **changes)


def renamed(adapter: Adapter, res: Resolution, manifest: Mapping[str, object]) -> Adapter:
    modules = {}
    # PEFT keys carry PEFT's fan_in_fan_out convention; kohya factors are always in the stored weight's layout
    conv1d, stored = conv1d_layout(manifest), adapter.format == "kohya"
    embeddings = embedding_names(adapter.metadata) if stored else frozenset()
    for old, new in res.names.items():
        module = replace(adapter.modules[old], name=new, fused=None, fused_columns=None)
        if module.experts > 1:
            module = params.bind_fused(module, manifest)
        elif f"{new}.weight" not in manifest:
            module = replace(module, fused=ldm.fused_target(new, manifest))
        shape = bound_shape(module, manifest)
        if shape is not None:
            module = lowrank.fit_inputs(module, shape)
            if not adapter.names_resolved or module.product is not None or module.method == "adalora":
                module = fit_kind(module, shape)
            module = fit_orientation(module, shape, conv1d, stored=stored, embedding=old in embeddings)
        if new in modules:
            raise MismatchError(f"{adapter.label}: two adapter modules resolve to base module {new!r}")
        modules[new] = module
    # one adapter tensor per base tensor, the one under its own name first: PEFT's bias="all" saves a tied decoder's
    # bias under the decoder's name too (stored_tied_bias)
    full_names = {}
    for old, new in sorted(res.full.items(), key=lambda item: item[0] != item[1]):
        full_names.setdefault(new, old)
    full = {new: adapter.full_tensors[old] for old, new in res.full.items() if full_names[new] == old}
    for old, new in res.full.items():
        # (headers only, values=False: meta tensors, whose values are compared once read, by the merge's binding)
        if full_names[new] != old and not full[new].is_meta and not full[new].equal(adapter.full_tensors[old]):
            raise MismatchError(f"{adapter.label}: {old!r} and {full_names[new]!r} are one tensor of the base "
                                f"({new!r}), with different values")
    rows = {res.rows[n]: replace(r, name=res.rows[n]) for n, r in adapter.token_rows.items()}
    own = {}
    if adapter.names_resolved:  # kohya names are not module paths: written back, they come from the bound ones
        renames = [*res.names.items(), *((old, new) for new, old in full_names.items()), *res.rows.items()]
        own = {new: adapter.own_names.get(old, old) for old, new in renames if adapter.own_names.get(old, old) != new}
    metadata = ldm.versioned(adapter.metadata, manifest)
    metadata.pop(ldm.DIT_BARE_KEY, None)
    if (layout := ldm.dit_layout(transformer_class(manifest))) is not None:
        metadata[ldm.DIT_LAYOUT_KEY] = layout.name  # (the kohya writer names its transformer's modules by it)
        if not any(tensor.startswith("transformer.") for tensor in manifest):
            metadata[ldm.DIT_BARE_KEY] = "true"
    return replace(adapter, modules=modules, full_tensors=full, token_rows=rows, names_resolved=True, own_names=own,
                   metadata=metadata)


def file_tensor_names(adapter: Adapter, manifest: Mapping[str, object]) -> set[str]:
    """The base tensors an adapter's whole tensors are under their own names (resolve's, without its stored_tied_bias:
    RoBERTa's lm_head.decoder.bias binds to lm_head.bias, which the base stores, and is not that one's key)."""
    rename = renaming(adapter, manifest) if adapter.names_resolved else (lambda name: name)
    return {rename(name) for name in adapter.full_tensors}


def tensors_of(manifest: "Mapping[str, object] | BaseModel") -> Mapping[str, object]:
    """What check and bind take as a base: its tensors (a mapping of name → TensorInfo), or a BaseModel's."""
    if isinstance(manifest, BaseModel):
        return manifest.tensors
    if not isinstance(manifest, Mapping):  # a path: iterating it raised a raw TypeError or AttributeError
        raise InvalidInputError(f"a base is given by its tensors (BaseModel.open(path), or its .tensors), not the "
                                f"{type(manifest).__name__} {str(manifest)[:80]!r}")
    for name, info in manifest.items():  # (a value without a shape was an AttributeError, or matched nothing unsaid)
        shape = getattr(info, "shape", None)
        if not isinstance(name, str) or not isinstance(shape, (tuple, list)) \
                or not all(is_integer(size) and size >= 0 for size in shape):
            raise InvalidInputError(f"a base's tensors map each name to what has its shape (a TensorInfo, a tensor), "
                                    f"not {repr(name)[:200]} to {reprlib.repr(info)} ({type(info).__name__})")
    return manifest


DIFFUSION_MODEL = re.compile(r"^(?:model\.)?diffusion_model\.")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"  # (a diffusers model's weights file, sharded or not)
# a module of a FLUX.1 or SD3 single-file checkpoint, as sd-scripts (lora_unet_double_blocks_0_…) or BFL
# (…double_blocks.0.…) name it: a block's, or FLUX's outside the blocks (a LoRA of img_in alone was "not in base")
DIT_NAMED = re.compile(r"(?:^|[._])(?:(?:double_blocks|single_blocks|joint_blocks)[._]\d+[._]"
                       r"|(?:img_in|txt_in|time_in|vector_in|guidance_in|final_layer)(?:[._]|$))")


def transformer_class(manifest: Mapping[str, object]) -> str | None:
    """The ``_class_name`` of the config.json of a pipeline's transformer: the one a registered base's manifest
    carries (ldm.Tensors, read in the base's folder), else the one beside its tensors' files; None where neither
    says."""
    recorded = getattr(manifest, "transformer_class", None)
    if recorded is not None:
        return recorded
    info = next((info for tensor, info in manifest.items() if tensor.startswith("transformer.")), None)
    file = getattr(info, "file", None)
    if file is not None:
        return ldm.transformer_class(file.parent.parent)
    # a diffusers transformer's own folder (a pipeline's transformer_2/), not a single-file checkpoint beside a config
    file = getattr(next(iter(manifest.values()), None), "file", None)
    return ldm.transformer_class(file.parent) if file is not None and file.name.startswith(DIFFUSERS_WEIGHTS) else None


SECOND_TRANSFORMER = "transformer_2"
"""Wan 2.2 A14B's second transformer (the low-noise expert), a pipeline component of its own: what diffusers loads a
LoRA into with ``load_into_transformer_2=True``, and what merge's, subtract's and check's ``transformer_2`` adapters
bind to (a LoRA given plainly binds to the pipeline's ``transformer/``)."""


def component_tensors(manifest: Mapping[str, object], component: str,
                      base_name: str | None = None) -> Mapping[str, object]:
    """The tensors of a diffusers pipeline's ``component``, named without ``<component>.``: what its own folder given
    as the base holds (a Wan 2.2 ``transformer_2/``, read as a pipeline's transformer: in_pipeline_dit). A base
    without that component is refused, naming the parameter that asked for it (`transformer_2`)."""
    prefix = f"{component}."
    tensors = ldm.Tensors((name.removeprefix(prefix), info) for name, info in manifest.items()
                          if name.startswith(prefix))
    if not tensors:
        where = f"base {base_name}" if base_name else "the base"
        raise ParameterError(f"`{component}`: {where} has no {component}/ (a Wan 2.2 A14B pipeline folder's second "
                             "transformer, the low-noise expert): give its adapters as the others", [component])
    tensors.transformer_class = getattr(manifest, "transformer_class", None)  # (a recorded manifest's, ldm.Tensors)
    return tensors


def in_component(adapter: Adapter, component: str) -> Adapter:
    """An adapter bound to a pipeline component's tensors (component_tensors) with its names the pipeline's:
    ``<component>.`` before each module and tensor."""
    def named(name: str) -> str:
        return f"{component}.{name}"

    modules = {named(n): replace(m, name=named(m.name),
                                 fused=m.fused and (named(m.fused[0]), *m.fused[1:]),
                                 raw_parameter=m.raw_parameter and (named(m.raw_parameter[0]), *m.raw_parameter[1:]))
               for n, m in adapter.modules.items()}
    full = adapter.full_tensors
    full = (full.renamed({n: named(n) for n in full}) if isinstance(full, LazyTensors)
            else {named(n): t for n, t in full.items()})
    rows = {named(n): replace(r, name=named(r.name)) for n, r in adapter.token_rows.items()}
    metadata = {k: v for k, v in adapter.metadata.items() if k != ldm.DIT_BARE_KEY}  # (named as the pipeline's now)
    return replace(adapter, modules=modules, full_tensors=full, token_rows=rows, metadata=metadata,
                   own_names={named(n): own for n, own in adapter.own_names.items()})


def in_pipeline_dit(adapter: Adapter, manifest: Mapping[str, object]) -> Adapter:
    """An adapter on a FLUX.1 or SD3 single-file checkpoint's modules (sd-scripts'
    ``lora_unet_double_blocks_0_img_attn_qkv``, BFL's ``double_blocks.0.img_attn.qkv``), or on one of
    ldm.DIT_LAYOUTS' (Wan's ``blocks.0.self_attn.q``, musubi-tuner's ``lora_unet_blocks_0_self_attn_q``), for a
    diffusers pipeline holding that transformer (for a layout, of the class its config.json names): bound to the
    checkpoint tensors the pipeline's make up (ldm.pipeline_dit), then each module named as the pipeline's, a LoRA on
    a fused tensor (qkv, linear1) split into its parts' rows of B with A shared: the same delta, as diffusers'
    converter splits them (DoRA magnitudes and lora_bias per row too); one on an adaLN whose shift and scale halves
    the pipeline holds swapped (the final layer's, SD3's last context block's) with B's halves swapped the same way.
    A module the pipeline lacks keeps its name, for check to report alone. Any other adapter, or one none of whose
    blocks' modules binds so, as it is."""
    cls = transformer_class(manifest)
    layout = ldm.dit_layout(cls)
    named = DIT_NAMED if layout is None else layout.named
    # the transformer's own folder as the base (Wan 2.2's transformer_2/): read as a pipeline's transformer, and its
    # modules named as the folder's at the end
    bare = layout is not None and not any(tensor.startswith("transformer.") for tensor in manifest)
    pipeline = {f"transformer.{tensor}": info for tensor, info in manifest.items()} if bare else manifest
    if not any(named.search(name) for name in adapter.modules) or not (virtual := ldm.pipeline_dit(pipeline, cls)):
        return adapter
    res = resolve(adapter, virtual)
    if adapter.names_resolved:  # (renaming leaves the modules it cannot bind under their own names)
        res.missing = [name for name, target in res.names.items() if target == name
                       and f"{name}.weight" not in virtual and ldm.fused_target(name, virtual) is None]
        res.names = {name: target for name, target in res.names.items() if name not in res.missing}
    if res.ambiguous or not any(named.search(name) for name in res.names):
        return adapter
    # (a module the base lacks — another network's, sd-scripts' FLUX T5 as lora_te3_…, or a block's: kept by its
    # name, reported alone)
    res.names.update((name, name) for name in res.missing)
    bound = renamed(adapter, res, virtual)
    if not all(m.weight_name in virtual for n, m in bound.modules.items() if named.search(n)
               and n not in res.missing):
        return adapter
    modules = {}
    for name, module in bound.modules.items():
        info = virtual.get(module.weight_name)
        held = dict(getattr(info, "parts", ()))
        # (split by the pipeline's own rows of each part, Lumina2's grouped-query k and v too)
        pieces = [] if module.fused is not None or module.transposed else info.pieces() if held and \
            module.out_features == info.shape[0] else ldm.split(module.weight_name, module.weight_shape, whole=True)
        swapped = getattr(info, "swapped", False)
        for part, (_, first, rows, _) in pieces or [(name, (None, 0, module.out_features, None))]:
            # a part as the pipeline module holding it, any other module as the pipeline tensor it was read from
            whole = None if pieces else getattr(virtual.get(module.weight_name), "pipeline", None)
            target = held[part] if pieces else name if whole is None else whole.removesuffix(".weight")
            if (pieces or swapped) and module.product is not None:
                given = next(old for old, new in res.names.items() if new == name)  # (the file's name of it)
                raise FormatError(f"{adapter.label}: module {given!r} is a LoHa/LoKr on {module.weight_name!r}, which "
                                  "the pipeline stores " + ("in parts" if pieces else "with its halves swapped")
                                  + ": bind it to the single-file checkpoint")

            def rows_of(tensor):
                """Its rows the target's: the part's, or (shift, scale) swapped where the pipeline swaps them (B's rows
                map as the weight's: ΔW' = B'·A)."""
                if tensor is None:
                    return None
                return tensor.roll(tensor.shape[0] // 2, 0) if swapped else tensor[first:first + rows]

            if bare:
                target = target.removeprefix("transformer.")
            modules[target] = replace(module, name=target, fused=None, B=rows_of(module.B),
                                      magnitude=rows_of(module.magnitude), lora_bias=rows_of(module.lora_bias))
    return replace(bound, modules=modules, own_names={n: o for n, o in bound.own_names.items() if n in modules})


def bind(adapter: Adapter, manifest: "Mapping[str, object] | BaseModel") -> Adapter:
    """The adapter with module names resolved against the base (kohya names → module paths, a leading ``model.``
    added/removed when that makes every module match). Unresolvable kohya names raise; shapes are check's job."""
    adapter, manifest = adapter_argument(adapter, "bind"), tensors_of(manifest)
    given, adapter = adapter, in_pipeline_dit(adapter, manifest)
    res = resolve(adapter, manifest)
    if given is not adapter and not given.names_resolved:  # kohya names in_pipeline_dit left as they are
        res.missing = [name for name in given.modules if name in adapter.modules]
    if res.ambiguous:
        name, candidates = next(iter(res.ambiguous.items()))
        raise AmbiguousError(
            f"{adapter.label}: kohya name {name!r} matches several base modules ({', '.join(candidates[:3])})"
            + (f" and {len(res.ambiguous) - 1} more ambiguous names" if len(res.ambiguous) > 1 else "")
        )
    if res.missing:
        raise MismatchError(
            f"{adapter.label}: {len(res.missing)} kohya module name(s) match no base module: {', '.join(res.missing[:SHOWN])}"
            + (", …" if len(res.missing) > SHOWN else "")
        )
    return renamed(adapter, res, manifest)


def default_targets_refusal(adapter: Adapter, manifest: Mapping[str, object],
                            config: Callable[[str], dict] | None) -> tuple[str, list[str]] | None:
    """(why PEFT would not load this PEFT folder's LoRA as loraops merges it, the modules concerned), or None, for
    ``adapter`` bound to the base (the names PEFT's keys map to: own_names). A
    LoRA/LoHa/LoKr config with no target_modules (null or absent) and no target_parameters: PEFT fills them from its
    table for the base's config.json model_type (formats.peft.DEFAULT_TARGETS; Llama: q_proj, v_proj) and leaves the
    file's other factors unused, or refuses to load where the table has no entry. Only the base says which, so this
    is a fit (``config``: tensor → its model's config.json); without a model_type nothing is said. The reason is
    a misfit's (check.misfits), without the adapter's label."""
    cfg = adapter.config
    if adapter.format != "peft" or not cfg or cfg.get("target_modules") is not None or cfg.get("target_parameters") \
            or peft.peft_type_of(cfg) not in peft.DEFAULTED_TYPES or config is None:
        return None
    tensor = next((m.weight_name for m in adapter.modules.values() if m.weight_name in manifest), None)
    model_type = None if tensor is None else model_type_of(config(tensor))
    if model_type is None:
        return None
    keys = {n: adapter.own_names.get(n, n) for n in adapter.modules}  # PEFT's module keys
    names = list(keys)
    defaults = peft.DEFAULT_TARGETS.get(model_type)
    fix = "set target_modules in adapter_config.json"
    if defaults is None:
        return (f"adapter_config.json gives no target_modules and PEFT has no defaults for model_type "
                f"{model_type!r} (it refuses to load the adapter); {fix}", names)
    if isinstance(defaults, str):
        outside = [n for n, key in keys.items() if re.fullmatch(defaults, key) is None]
        shown, listed = [keys[n] for n in outside], defaults
    else:
        outside = [n for n, key in keys.items() if key.rsplit(".", 1)[-1] not in defaults]
        shown, listed = sorted({keys[n].rsplit(".", 1)[-1] for n in outside}), ", ".join(defaults)
    if not outside:
        return None
    more = ", …" if len(shown) > SHOWN else ""
    return (f"adapter_config.json gives no target_modules: PEFT would adapt only {model_type}'s "
            f"defaults ({listed}) and ignore {', '.join(shown[:SHOWN])}{more}; {fix}", outside)


def check_paths(adapter: "str | Path", base: "str | Path", *, alpha: float | None = None,
                component: str | None = None) -> CheckResult:
    """How the adapter file or folder at ``adapter`` fits the base model at ``base`` (or its ``component``), both on
    disk: what Registry.check_adapter says of two paths, without a registry. Read from their headers and configs,
    without torch (st.without_torch) unless the adapter's read needs values (formats.read_for_fit)."""
    from . import formats

    formats.common.given_alpha(alpha, adapter)

    def fit() -> CheckResult:
        read = formats.read_for_fit(adapter, alpha=alpha)
        return CheckResult.of(str(adapter), [check(read, BaseModel.open(base), base_name=str(base),
                                                   component=component)], read.base_model)

    return without_torch(fit)


@flags_checked
def check(adapter: Adapter, manifest: "Mapping[str, object] | BaseModel", *, base_name: str | None = None,
          quantization: Callable[[str], dict | None] | None = None,
          config: Callable[[str], dict] | None = None, sides: Callable[[str], dict] | None = None,
          heads: bool = True, component: str | None = None) -> CheckReport:
    """See ``fitting`` (its report)."""
    return fitting(adapter_argument(adapter, "check"), manifest, base_name=base_name, quantization=quantization,
                   config=config, sides=sides, heads=heads, component=component)[0]


def fitting(adapter: Adapter, manifest: "Mapping[str, object] | BaseModel", *, base_name: str | None = None,
            quantization: Callable[[str], dict | None] | None = None, config: Callable[[str], dict] | None = None,
            sides: Callable[[str], dict] | None = None, heads: bool = True,
            component: str | None = None) -> tuple[CheckReport, Callable[[Adapter], Adapter]]:
    """(the report, ``bind`` by the names this check resolved: for ``adapter`` or another read of its file, with the
    same names, such as its headers alone; only where the report is ok). Every module matched by name and shape, or
    exactly what is not (never raises for a misfit). With
    ``quantization`` (tensor → its model's quantization_config, BaseModel.quantization_config), a module (or trainable
    tokens) on a quantized weight is also checked to be one loraops can merge into (loraops.fp8): missing, with
    merge's reason, if not. With ``config`` (tensor → its model's config.json, BaseModel.config), the heads a merge
    unties because a LoRA or a modules_to_save copy changes their tied embeddings (unstored_head_of) are listed in
    tied_heads too, and what a merge refuses to untie (untie_refusal) or to merge into (a remote-code model's
    embeddings) is missing, with merge's reason. ``sides`` (the same, read for that alone; ``config`` implies it): one
    side's embed_tokens the base ties to its shared embeddings fits where a merge writes it untied
    (untied_side_source). ``heads``: stored_twice's, as the merge reads the base (BaseModel.ties_stored_heads). A
    BaseModel for ``manifest`` is checked as merge reads it: its tensors, with its quantization, config and heads.
    ``component``: against that component of a diffusers pipeline alone, as against its own folder (Wan 2.2's
    transformer_2/, SECOND_TRANSFORMER), the report's base named ``base_name/component``; bound, its modules are named
    as the pipeline's (``transformer_2.blocks.0.attn1.to_q``)."""
    if isinstance(manifest, BaseModel):
        quantization, config = quantization or manifest.quantization_config, config or manifest.config
        heads = manifest.ties_stored_heads
    manifest = tensors_of(manifest)
    if component is not None:
        prefix = f"{component}."

        def inside(read: Callable[[str], dict | None] | None) -> Callable[[str], dict | None] | None:
            return None if read is None else lambda tensor: read(prefix + tensor)

        report, bind_read = fitting(adapter, component_tensors(manifest, component, base_name),
                                    base_name=None if base_name is None else f"{base_name}/{component}",
                                    quantization=inside(quantization), config=inside(config), sides=inside(sides),
                                    heads=heads)
        return report, lambda read: in_component(bind_read(read), component)
    sides = config or sides
    given, adapter = adapter, in_pipeline_dit(adapter, manifest)
    res = resolve(adapter, manifest)
    named = renamed(adapter, res, manifest)
    bound = without_tied_copies(named, manifest, sides, heads=heads)
    missing, mismatches, matched, why_missing = list(res.missing), [], 0, {}
    names = None  # the manifest's names sorted, when a missing module's quantized tensors are looked for
    tied_heads = []

    def refused(head: str, shape) -> str | None:
        """Why a merge refuses to untie ``head``, a tied head the base does not store (untie_refusal), or None."""
        source = tied_head_source(head, shape, manifest) if config is not None else None
        return None if source is None else untie_refusal(source, config(source))

    def side_source(name: str, shape) -> str | None:
        """The shared embeddings one side ``name`` (not stored) is written apart from with its trainable tokens in
        (shared's values, those rows replaced), or None: PEFT ties a side's tokens to nothing (only tokens on the
        input embeddings, shared, to the sides and the head), so they change that side's lookup alone, as a LoRA
        there does (untied_side_source: a T5's side written apart, a BART's with the model untied)."""
        return untied_side_source(name, shape, manifest, sides) if sides is not None else None

    def unties_head(tensor: str, name: str) -> bool:
        """List the head a merge unties because ``tensor`` changes (unstored_head_of) in tied_heads; False where merge
        refuses to change ``tensor`` (remote code): ``name`` is then missing, with merge's reason. (Raised, it
        ended a check against every registered base at the first such base.)"""
        try:
            head = unstored_head_of(tensor, manifest, config(tensor)) if config is not None else None
        except MismatchError as refusal:
            missing.append(name)
            why_missing[name] = str(refusal)
            return False
        if head is None and config is not None:  # or stored twice, byte-identical to its embeddings
            head = untied_stored_head(tensor, manifest, config, heads=heads)
        if head is not None:
            tied_heads.append(head.removesuffix(".weight"))
        return True

    miscounted = expert_count_mismatches(bound, manifest)
    why, unloaded = default_targets_refusal(named, manifest, sides) or (None, ())
    unloaded = dict.fromkeys(unloaded, why)  # the modules PEFT would not load
    for name, module in bound.modules.items():
        why = unloaded.get(name) or saved_tie_refusal(bound, module, manifest, config) \
            or lora_bias_misfit(module, manifest, sides) or linear_factors_on_embedding(bound, module)
        if why is not None:  # (the bias before the weight's fit: a head the base does not store has none either)
            missing.append(name)
            why_missing[name] = why
            continue
        info = manifest.get(module.weight_name)
        if info is None:
            if (why := refused(module.weight_name, module.weight_shape)) is not None:
                missing.append(name)
                why_missing[name] = why
            elif tied_head_source(module.weight_name, module.weight_shape, manifest) is not None:
                tied_heads.append(name)
                matched += 1
            elif sides is not None and (shared := untied_side_source(module.weight_name, module.weight_shape,
                                                                     manifest, sides)) is not None:
                if config is not None and (head := side_tied_head(shared, manifest, config(shared))) is not None:
                    tied_heads.append(head.removesuffix(".weight"))  # written untied, as the merge writes it
                matched += 1
            else:
                missing.append(name)
                if (shared := shared_embeddings_of(module.weight_name, module.weight_shape, manifest)
                        or _decoder_lookup_of(module.weight_name, manifest, sides)) is not None:
                    why_missing[name] = side_lookup_refusal(shared, "a LoRA on one side's lookup",
                                                            sides(shared) if sides is not None else None)
                elif (why := params.why_unstored(name, manifest)) is not None:
                    why_missing[name] = why
                elif fp8.quantized_siblings(module.weight_name, manifest, names := names or sorted(manifest)):
                    why_missing[name] = f"quantized, {fp8.describe(manifest, module.weight_name, None, names)}"
            continue
        if not unties_head(module.weight_name, name):
            continue
        expected = bound_shape(module, manifest)
        if expected != tuple(module.weight_shape):
            mismatches.append(ShapeMismatch(name=name, tensor=module.weight_name, expected=list(expected),
                                            actual=list(module.weight_shape)))
        elif module.raw_parameter is None or module.raw_parameter[0] not in miscounted:
            matched += 1  # (an expert's share of a parameter whose experts are miscounted fits its tensor by accident)
    mismatches += miscounted.values()
    full_mismatches = []
    for name, tensor in bound.full_tensors.items():
        if (why := refused(name, tensor.shape)) is not None:
            missing.append(name)
            why_missing[name] = why
            continue
        # a modules_to_save copy of the embeddings (a layer saved under their tokens is what the head reads too)
        if name in manifest and name not in bound.token_rows and not unties_head(name, name):
            continue
        if name not in manifest and (shared := shared_embeddings_of(name, tensor.shape, manifest)) is not None:
            # one side's embed_tokens saved whole (PEFT wraps each side's apart from shared): written untied where
            # a merge may, as the LoRA on that side is (untied_side_source)
            if sides is None or untied_side_source(name, tensor.shape, manifest, sides) is None:
                missing.append(name)
                why_missing[name] = side_lookup_refusal(shared, "one side's lookup saved whole (modules_to_save)",
                                                        sides(shared) if sides is not None else None)
            elif config is not None and (head := side_tied_head(shared, manifest, config(shared))) is not None:
                tied_heads.append(head.removesuffix(".weight"))
            continue
        source = None if name in manifest else tied_head_source(name, tensor.shape, manifest)
        if source is not None and not tied_layer_copy(bound, name, manifest):
            tied_heads.append(name.removesuffix(".weight"))  # a copy of a tied head the base does not store
        info = manifest.get(name) or manifest.get(source)
        if info is None or tuple(info.shape) != tuple(tensor.shape):
            full_mismatches.append(ShapeMismatch(name=name, tensor=name, expected=None if info is None else list(info.shape),
                                                 actual=list(tensor.shape)))
    unsaved = unsaved_tensors(bound, manifest, config, file_tensor_names(adapter, manifest), sides)
    for tensor, why in (unsaved | edited_originals(adapter, bound, manifest)).items():  # (the latter saved: in full)
        missing.append(tensor)
        why_missing[tensor] = why
    row_mismatches = []
    for name, rows in bound.token_rows.items():
        shared = shared_embeddings_of(name, rows_shape(rows, manifest), manifest)
        if name in manifest and config is not None and side_tokens_apart(name, config(name)) \
                and not same_rows(bound, name, shared):
            unties_head(name, name)  # a side's own tokens (a BART's stored as shared's copy, an unshared Marian's
            # decoder): PEFT ties them to nothing, untied as the merge does
        if name in bound.full_tensors:  # rows PEFT copies into the layer saved whole beside them (loaded first):
            base = list(bound.full_tensors[name].shape)  # its fit to the base is the whole tensor's, counted once
        else:
            shape = rows_shape(rows, manifest)
            if (why := refused(name, shape)) is not None:
                missing.append(name)
                why_missing[name] = why
                continue
            source = tied_head_source(name, shape, manifest) or side_source(name, shape)
            if source is None and name not in manifest \
                    and (shared := shared_embeddings_of(name, shape, manifest)
                         or _decoder_lookup_of(name, manifest, sides)) is not None:
                missing.append(name)
                why_missing[name] = side_lookup_refusal(shared, "trainable tokens on one side's lookup",
                                                        sides(shared) if sides is not None else None)
                continue
            if config is not None and source is not None and source != tied_head_source(name, shape, manifest) \
                    and not same_rows(bound, name, source) \
                    and (head := side_tied_head(source, manifest, config(source))) is not None:
                tied_heads.append(head.removesuffix(".weight"))  # a BART's side: written untied, as the merge does
            info = manifest.get(name) or manifest.get(source)
            base = None if info is None else list(info.shape)
        if base is None or len(base) != 2 or base[1] != rows.values.shape[1] or max(rows.indices) >= base[0]:
            row_mismatches.append(ShapeMismatch(name=name, tensor=name, expected=base,
                                                actual=[max(rows.indices) + 1, int(rows.values.shape[1])]))
    ok = not (missing or mismatches or full_mismatches or row_mismatches or res.ambiguous)
    if ok and quantization is not None:  # what an adapter that fits changes, the merge must be able to read and write
        # (a head the base does not store is written from its embeddings: theirs is the layout merge reads)
        for name, weight, shape in [*((n, m.weight_name, m.weight_shape) for n, m in bound.modules.items()),
                                    *((n, n, rows_shape(rows, manifest)) for n, rows in bound.token_rows.items()
                                      if n not in bound.full_tensors),
                                    *((n, n, tensor.shape) for n, tensor in bound.full_tensors.items())]:
            if (source := weight if weight in manifest else tied_head_source(weight, shape, manifest)) is None \
                    or name in why_missing:
                continue
            try:
                fp8.layout(manifest, source, quantization(source))
            except FormatError as refusal:  # merge's reason; a misfit of this base (not the end of a check of all)
                missing.append(name)
                why_missing[name] = str(refusal)
                if name in bound.modules:
                    matched -= 1
        ok = not missing
    tensor_misfits = {m.name for m in full_mismatches} | {n for n in missing if n in bound.full_tensors} | set(unsaved)
    whole = bound.full_tensors.keys() | unsaved.keys()  # (a saved head refused for its values is in both: counted once)
    refused_heads = set(missing) | {n.removesuffix(".weight") for n in missing}  # (refused: not said to be untied)

    def bind_read(read: Adapter) -> Adapter:
        return named if read is given else renamed(in_pipeline_dit(read, manifest), res, manifest)

    return CheckReport(
        ok=ok, base_ref=base_name, matched=matched,
        modules=len(adapter.modules), missing=sorted(missing), ambiguous=sorted(res.ambiguous),
        shape_mismatches=mismatches, full_tensor_mismatches=full_mismatches, token_row_mismatches=row_mismatches,
        tied_heads=sorted(set(tied_heads) - refused_heads), why_missing=why_missing,
        token_rows=sum(len(r.indices) for r in bound.token_rows.values()),
        token_rows_matched=sum(len(r.indices) for n, r in bound.token_rows.items()
                               if n not in {m.name for m in row_mismatches}
                               and (n not in why_missing or n in bound.full_tensors)),
        tensors=len(whole), tensors_matched=len(whole - tensor_misfits),
    ), bind_read


def _decoder_lookup_of(weight_name: str, manifest: Mapping[str, object],
                       sides: Callable[[str], dict] | None) -> str | None:
    """The stored decoder embeddings an encoder's lookup ``weight_name`` (not stored) is tied to, where
    untied_side_embeddings says so (FSMT's: its encoder's embed_tokens are its decoder's), by name: the one candidate,
    not a scan of the manifest asking each tensor's config."""
    if sides is None or not names_module(weight_name, "encoder.embed_tokens.weight"):
        return None
    source = weight_name.removesuffix("encoder.embed_tokens.weight") + "decoder.embed_tokens.weight"
    return source if source in manifest and weight_name in untied_side_embeddings(source, sides(source)) else None


def lora_bias_misfit(module: LoraModule, manifest: Mapping[str, object],
                     config: Callable[[str], dict] | None = None) -> str | None:
    """Why a module's lora_bias (PEFT) cannot be merged into this base, or None: its merge adds scale·lora_B.bias to
    the layer's own bias, which must be there (PEFT's merge raises for a layer without one) and as long as B's
    outputs. A tied decoder's bias the base does not store is the one its class ties it to (``config``, tensor → its
    model's config.json, says the class: ESM's and LXMERT's decoders have none, beside a stored lm_head.bias)."""
    if module.lora_bias is None:
        return None
    if module.fused is not None or module.raw_parameter is not None:  # (PEFT makes no lora_bias there)
        return "lora_bias on a part of a fused tensor or a raw parameter, which PEFT does not make"
    # (a tied decoder's bias, not stored: the bias transformers ties it to, BERT's cls.predictions.bias)
    parent = stored_tied_bias(module.bias_name, (module.out_features,), manifest)
    if parent is not None and config is not None \
            and tied_decoder_bias(module.weight_name, config(parent)) != (module.bias_name, parent):
        parent = None
    info = manifest.get(parent or module.bias_name)
    if info is None:
        return (f"lora_bias needs the base layer's bias, and the base has no {module.bias_name} "
                "(PEFT cannot merge it either)")
    if tuple(info.shape) != (module.out_features,):
        return f"lora_bias is {module.out_features} long, the base's {module.bias_name} {fmt_shape(info.shape)}"
    return None


def linear_factors_on_embedding(adapter: Adapter, module: LoraModule) -> str | None:
    """Why a PEFT module saved as lora_A/lora_B on an nn.Embedding is not merged, or None: PEFT keeps an embedding's
    LoRA in lora_embedding_A/B, so its load leaves these keys unused and the embeddings unchanged (it warns of missing
    adapter keys). Read as a Linear's, the factors were reported as a shape mismatch (the delta transposed), which
    pointed at the base; a square table took them untransposed."""
    if adapter.format != "peft" or module.kind != "linear" or module.raw_parameter is not None \
            or module.fused is not None or not is_embedding(module.weight_name) \
            or not any(".lora_A." in key or key.endswith(".lora_A") for key in module.source_keys):
        return None
    return ("lora_A/lora_B on an embedding: PEFT keeps an embedding's LoRA in lora_embedding_A/lora_embedding_B and "
            "loads this adapter without these factors")


def bound_shape(module: LoraModule, manifest: Mapping[str, object]) -> tuple[int, ...] | None:
    """The shape of the base weight ``module`` is bound to: its tensor's, its part's of a fused tensor
    (LoraModule.fused), or that of the embeddings a head the base does not store is tied to (tied_head_source); None
    when the base has none."""
    info = manifest.get(module.weight_name)
    if info is not None:
        return tuple(info.shape) if module.fused is None else part_shape(module, info.shape)
    # a head is an nn.Linear, out×in, whatever the adapter's one fan_in_fan_out says (a GPT-2 LoRA on c_attn and
    # lm_head says true: fit_orientation)
    heads = [(module.out_features, module.in_features) if module.kind == "linear" else module.weight_shape]
    if module.method == "vera" and not module.inputs_known:
        # a VeRA layer takes the first in_features columns of the shared vera_A, as wide as the widest targeted layer
        # (PEFT's vera_A[:, :in]): the head's inputs are any up to that width, the widest first (lowrank.fit_inputs)
        heads += sorted({tuple(info.shape) for info in manifest.values() if len(info.shape) == 2
                         and info.shape[0] == module.out_features and info.shape[1] < module.in_features}, reverse=True)
    sources = [found for head in heads if (found := tied_head_source(module.weight_name, head, manifest))]
    # the head's own model's embeddings before wider ones elsewhere (InstructBLIP's Q-Former's), as tied_head_source
    # prefers them among embeddings of one shape
    owner = module.weight_name.removesuffix(".weight").rpartition(".")[0]
    source = min(sources, key=lambda found: not found.startswith(owner), default=None)
    return None if source is None else tuple(manifest[source].shape)


def part_shape(module: LoraModule, shape) -> tuple[int, int]:
    """The shape of the part of a fused base tensor (of ``shape``) that a module is bound to (LoraModule.fused)."""
    _, _, rows, tensor_rows = module.fused
    return rows, module.fused_columns[1] if module.fused_columns else math.prod(shape) // tensor_rows


EXPERT_RE = re.compile(r"^(?P<owner>.*\.experts\.)(?P<e>\d+)(?P<rest>\..*)$")


def expert_count_mismatches(bound: Adapter, manifest: Mapping[str, object]) -> dict[str, ShapeMismatch]:
    """A LoRA on fused experts holds E experts (its config's r says how its factors split): the base must have exactly
    E of each expert tensor it binds to (or E slices of the fused tensor), or the split (and every expert's share) is
    wrong though each shape fits. One mismatch per fused parameter (by its first piece's tensor)."""
    firsts = {}
    for module in bound.modules.values():
        if params.first_share(module):
            if module.fused is not None:
                firsts[(module.weight_name, f".{module.name.rpartition('.')[2]}")] = module
            elif m := EXPERT_RE.match(module.weight_name):
                firsts[(m["owner"], m["rest"])] = module
    if not firsts:
        return {}
    counts: dict[tuple[str, str], int] = {}
    for tensor in manifest:
        if (m := EXPERT_RE.match(tensor)) and (key := (m["owner"], m["rest"])) in firsts:
            counts[key] = counts.get(key, 0) + 1
    out: dict[str, ShapeMismatch] = {}
    for (owner, rest), module in sorted(firsts.items()):
        parameter, _, experts = module.raw_parameter
        if module.fused is not None:
            shape = manifest[owner].shape
            have, tensor, part = shape[0], owner, list(part_shape(module, shape))
        else:
            have, tensor = counts.get((owner, rest), 0), f"{owner}*{rest}"
            part = list(manifest[module.weight_name].shape) if module.weight_name in manifest else []
        if have not in (0, experts) and parameter not in out:  # none: its modules are not in the base, reported so
            out[parameter] = ShapeMismatch(name=f"{parameter} ({rest.removeprefix('.').removesuffix('.weight')})",
                                           tensor=tensor, expected=[have, *part], actual=[experts, *module.weight_shape])
    return out


def misfits(report: CheckReport) -> list[str]:
    """One short phrase per problem, for one-line messages."""
    out = [f"{m.name} (adapter {fmt_shape(m.actual)}, base {fmt_shape(m.expected)})" for m in report.shape_mismatches]
    out += [f"{n} (not in base)" for n in report.missing if n not in report.why_missing]
    # a reason is about one base tensor (every expert of a quantized fused tensor has the same): said once
    by_reason: dict[str, list[str]] = {}
    for name in report.missing:
        if name in report.why_missing:
            by_reason.setdefault(report.why_missing[name], []).append(name)
    out += [f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''} ({why})" for why, names in by_reason.items()]
    out += [f"{n} (several base modules match)" for n in report.ambiguous]
    out += [
        f"{m.name} (full tensor {fmt_shape(m.actual)}, " + ("not in base)" if m.expected is None else f"base {fmt_shape(m.expected)})")
        for m in report.full_tensor_mismatches
    ]
    out += [f"{m.name} (trainable tokens up to row {m.actual[0] - 1} of width {m.actual[1]}, "
            + ("not in base)" if m.expected is None else f"base {fmt_shape(m.expected)})")
            for m in report.token_row_mismatches]
    return out


def counted(parts: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join(filter(None, [", ".join(parts[:-1]), parts[-1]]))


def fit_counts(report: CheckReport) -> str:
    """What fits, for check's headline: the LoRA modules always (as 0/0 for a tokens-only adapter), the whole tensors
    and trainable-token rows where the adapter has them."""
    parts = [f"{report.matched}/{report.modules} modules"]
    if report.tensors:
        parts.append(f"{report.tensors_matched}/{report.tensors} whole tensors")
    if report.token_rows:
        parts.append(f"{report.token_rows_matched}/{report.token_rows} token rows")
    return counted(parts)


def misfit_counts(report: CheckReport) -> str:
    """What does not fit, with its verb, as the headline counts it: "1 module does", "2 modules and 1 whole tensor
    do" (a misfit phrase may stand for several modules: the experts of one quantized tensor)."""
    counts = [(report.modules - report.matched, "module"), (report.tensors - report.tensors_matched, "whole tensor"),
              (report.token_rows - report.token_rows_matched, "token row")]
    if not any(n for n, _ in counts):  # (no path is known to give this; what misfits lists, rather than a traceback)
        counts = [(len(misfits(report)), "item")]
    parts = [f"{n} {noun}{'s' if n != 1 else ''}" for n, noun in counts if n]
    return counted(parts) + (" does" if sum(n for n, _ in counts) == 1 else " do")


def rows_shape(rows: TokenRows, manifest: Mapping[str, object]) -> tuple[int, ...]:
    """The shape of the tensor trainable tokens replace rows of, as far as the base says: its own, or (a tied head the
    base does not store) that of input embeddings of the rows' width."""
    width = int(rows.values.shape[1])
    info = manifest.get(rows.name)
    if info is not None:
        return tuple(info.shape)
    return next((tuple(i.shape) for t, i in manifest.items() if t.endswith(INPUT_EMBEDDINGS) and tuple(i.shape)[1:] == (width,)),
                (0, width))


def made_for(base_model: str | None, report: CheckReport) -> str:
    """'; it was made for BASE' after a misfit where no module fits: most often another base than the adapter's, which
    its PEFT config names (``base_model``); '' otherwise."""
    return f"; it was made for {base_model}" if base_model and not report.matched else ""


def require_fit(adapter: Adapter, manifest: Mapping[str, object], *, base_name: str | None = None,
                quantization: Callable[[str], dict | None] | None = None,
                sides: Callable[[str], dict] | None = None, heads: bool = True,
                record: Adapter | None = None, component: str | None = None) -> Adapter:
    """The bound adapter when it fits the base (check's ``quantization``, ``sides``, ``heads`` and ``component``),
    else one MismatchError line summarising every misfit. ``record``: another read of the adapter's file (its headers
    alone), bound instead."""
    report, bind_read = fitting(adapter, manifest, base_name=base_name, quantization=quantization, sides=sides,
                                heads=heads, component=component)
    if not report.ok:
        problems = misfits(report)
        shown = ", ".join(problems[:SHOWN]) + (f", … ({len(problems) - SHOWN} more)" if len(problems) > SHOWN else "")
        where = f"base {report.base_ref}" if report.base_ref else "the base"
        raise MismatchError(f"{adapter.label}: {misfit_counts(report)} not fit {where}: {shown}"
                            f"{made_for(adapter.base_model, report)}")
    return bind_read(adapter if record is None else record)
