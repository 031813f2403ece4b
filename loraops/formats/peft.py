"""PEFT LoRA: a folder (adapter_config.json + adapter_model.safetensors) or a bare .safetensors of PEFT keys.

Keys: ``base_model.model.<module>.lora_A.weight`` (r×in) / ``.lora_B.weight`` (out×r), embeddings
``.lora_embedding_A`` (r×num_embeddings) / ``.lora_embedding_B`` (dim×r); an adapter-name segment
(``.lora_A.default.weight``) is tolerated. Scales follow PEFT 0.21's LoraModel._create_and_replace: per module
r and alpha come from rank_pattern/alpha_pattern (first matching key, see common.pattern_key), else r/lora_alpha;
scale = alpha/r, or alpha/sqrt(r) with use_rslora. r itself is read from the tensors.
The same key grammar, with a component prefix instead of base_model.model., is the diffusers layout (diffusers.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection, Iterable

from .. import st
from ..adapter import Adapter, LoraModule
from ..errors import FormatError, InvalidInputError, UnsupportedAdapterError
from ..fsutil import read_json, refuse_lone_surrogates
from . import common, lowrank, lycoris, params, tokens

if TYPE_CHECKING:
    import torch

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
FACTOR_PARTS = {"lora_A": ("A", "linear"), "lora_B": ("B", "linear"),
                "lora_embedding_A": ("A", "embedding"), "lora_embedding_B": ("B", "embedding")}
FACTOR_RE = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?P<rest>(\.[^.]+)*)$")
PART_RE = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_magnitude_vector|lora_E)(?P<rest>(\.[^.]+)*)$")
"""DoRA's magnitude (``<module>.lora_magnitude_vector`` as PEFT saves it) and AdaLoRA's singular values
(``<module>.lora_E``, see formats.lowrank), with the factors' optional segments."""
OTHER_PARTS = {"lora_magnitude_vector": "magnitude", "lora_E": "E"}

# Config fields that change the math (or the modules touched): hashed into a PEFT folder's identity, with
# PEFT's defaults for absent ones so an explicit default and an absent field hash alike.
# (r, lora_alpha and the switches default per peft_type: common.peft_default)
MATH_FIELDS = {
    "peft_type": "LORA", **{k: common.peft_default("LORA", k) for k in ("r", "lora_alpha", "use_rslora")},
    "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False, "target_modules": None, "modules_to_save": None,
    "use_dora": False,
}


TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
"""PEFT 0.21's TaskType values: its PeftConfig refuses any other task_type (another spelling, "seq_cls", too)."""

TASK_SAVED = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
"""The modules PEFT's task models (PeftModelForSequenceClassification, …ForTokenClassification,
…ForQuestionAnswering) add to modules_to_save when they load an adapter of that task_type, whatever the config lists."""


def task_saved(task_type) -> tuple[str, ...]:
    """The modules_to_save entries the task model of ``task_type`` adds (TASK_SAVED). Only PEFT's own spelling: its
    config refuses any other ("seq_cls"), and PeftModel.from_pretrained picks the task model by that exact value."""
    return TASK_SAVED.get(task_type, ()) if isinstance(task_type, str) else ()


def saved_entries(cfg: dict) -> list[str]:
    """The modules_to_save a PEFT model loads a config with: the config's own, and the task's (task_saved), which
    older PEFT did not write into the config (it saved ``"modules_to_save": null`` beside the classifier's tensors)
    and PEFT adds on load all the same. A config without modules_to_save (a trainable-tokens adapter's
    TrainableTokensConfig) saves none: PEFT drops the field from it (a warning), whatever its value, and its task
    models add their head only where the field exists (identity_entries hashes a list of names all the same).
    A false value (``""``, ``false``, ``{}``) is no module, as PEFT skips it, unless a task model extends it with
    its head (which fails on anything but a list). What is no list (one string, which PEFT iterates by character)
    is returned as it is, for scale_config to refuse."""
    own = cfg.get("modules_to_save")
    if tokens.is_standalone(cfg):
        return []
    task = task_saved(cfg.get("task_type"))
    if own is None or not own and not task:
        own = []
    if not isinstance(own, list):
        return own
    return [*own, *(m for m in task if m not in own)]


def identity_entries(cfg: dict) -> list[str]:
    """The modules_to_save an identity hashes: saved_entries, but a trainable-tokens config's list of names as written.
    PEFT drops that list (see saved_entries), and so does the reader; folders registered with one were hashed with it,
    and keep that identity."""
    own = cfg.get("modules_to_save")
    return own if tokens.is_standalone(cfg) and module_names(own) else saved_entries(cfg)


def module_names(value) -> bool:
    """Is ``value`` a modules_to_save of the form PEFT takes, a list of module names?"""
    return isinstance(value, list) and all(isinstance(m, str) for m in value)


def modules_to_save(saved: Iterable[str], task_type) -> list[str] | None:
    """The modules_to_save entries of a PEFT config for the modules ``saved`` whole (their full paths). PEFT wraps
    every module whose path ends with an entry, a module inside a wrapped one too, and two wrappers on one tensor fail
    its load (KeyError): so a module that another entry, or the task's own (TASK_SAVED), wraps or lies in is left to
    that one (RoBERTa's classifier.dense and DistilBERT's pre_classifier under SEQ_CLS's "classifier"), and the
    task's entries are written, as PEFT writes them."""
    implied = task_saved(task_type)
    entries = {*saved, *implied}

    def inside_another(name: str) -> bool:
        return wrapping_entry(entries - {name}, name) is not None

    return sorted({*implied, *(name for name in saved if not inside_another(name))}) or None


_QV, _QKV = ["q_proj", "v_proj"], ["query_key_value"]
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": _QV, "gpt2": ["c_attn"], "bloom": _QKV,
    "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": _QV, "gptj": _QV, "gpt_neox": _QKV, "gpt_neo": _QV,
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": _QV, "llama4": _QV, "chatglm": _QKV, "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"], "RefinedWebModel": _QKV, "RefinedWeb": _QKV, "falcon": _QKV, "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"], "mistral": _QV, "mixtral": _QV, "stablelm": _QV, "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": _QV, "gemma2": _QV, "gemma3_text": _QV, "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": _QV, "qwen3": _QV, "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"], "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}
"""PEFT 0.21's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (its LoHa and LoKr tables are the same): what a
config without target_modules adapts, by the base's config.json model_type (a string: a regex over the whole module
key); PEFT refuses to load such a config for a model type not in it. A copy (peft is no dependency of loraops),
compared with the installed PEFT's by the tests. AdaLoRA and VeRA have tables of their own, not copied."""
DEFAULTED_TYPES = ("LORA", "LOHA", "LOKR")
"""The peft_types whose config without target_modules PEFT fills from DEFAULT_TARGETS."""


LORA_CONFIG_TYPES = ("LORA", "ADALORA")
"""The peft_types whose config is a LoraConfig (AdaLoraConfig subclasses it): PEFT drops the fields only LoraConfig has
(layers beside a regex checked) from the other methods' configs, with a warning."""


def peft_type_of(cfg: dict) -> str:
    """The config's peft_type, upper-case (LoraConfig's "LORA" where it says none)."""
    return str(cfg.get("peft_type") or "LORA").upper()


def ties_weights(cfg: dict) -> bool:
    """The config's ensure_weight_tying as PEFT reads it: a LoraConfig's field, AdaLoraConfig's too (AdaLoraModel
    inherits LoraModel's tying), dropped from the other methods' configs (LORA_CONFIG_TYPES)."""
    return bool(cfg.get("ensure_weight_tying")) and peft_type_of(cfg) in LORA_CONFIG_TYPES


def names_embedding_layer(entry: str) -> bool:
    """Is this modules_to_save or target_modules entry one PEFT's ensure_weight_tying takes for the embeddings: its
    last name one of EMBEDDING_LAYER_NAMES (tokens.EMBEDDING_LAYERS; GPT-2's "wte" is not)?"""
    return entry.rpartition(".")[2] in tokens.EMBEDDING_LAYERS


def ties_saved_embeddings(cfg: dict) -> bool:
    """Does PEFT, loading this config (``{}`` for an adapter of another format: False), tie a module to the embeddings
    modules_to_save saves (ensure_weight_tying)? Only where an entry is named as PEFT's EMBEDDING_LAYER_NAMES
    (tokens.EMBEDDING_LAYERS) are: its _check_tied_modules takes GPT-2's "wte" for no embeddings and warns that no
    tied module is added. (Saving, it may have tied them all the same: the config it writes names the embeddings by
    their path, GPT-2's "transformer.wte", whatever the entry that tied them; the reader takes the head's copy beside
    any: full_tensor_name.)"""
    return ties_weights(cfg) and _saves_named_embeddings(cfg)


def _saves_named_embeddings(cfg: dict) -> bool:
    return any(map(names_embedding_layer, (m for m in saved_entries(cfg) if isinstance(m, str))))


def ties_targeted_embeddings(cfg: dict) -> bool:
    """Does PEFT add, beside the targeting, LoRA layers on the modules a model ties to targeted embeddings (a tied
    lm_head)? A LoRA's ensure_weight_tying with target_modules naming an embedding layer (names_embedding_layer, a
    regex matching "embed_tokens" or "lm_head" whole), unless modules_to_save names one: PEFT then ties the saved
    copies instead (_check_tied_modules), and the targeting alone decides which modules get a LoRA."""
    targets = cfg.get("target_modules")
    if not (ties_weights(cfg) and peft_type_of(cfg) == "LORA") or not targets:
        return False
    if _saves_named_embeddings(cfg):
        return False
    if isinstance(targets, str):
        try:
            return any(re.fullmatch(targets, m) for m in tokens.EMBEDDING_LAYERS)
        except re.error:  # (refused by refuse_untargeted, in its words)
            return False
    return isinstance(targets, list) and any(map(names_embedding_layer, (m for m in targets if isinstance(m, str))))


def is_factor_key(key: str) -> bool:
    return FACTOR_RE.match(key) is not None


@dataclass
class ScaleConfig:
    """The part of a LoraConfig that decides each module's alpha and scale."""

    alpha: float | None
    """lora_alpha; None when nothing says (a bare file): then reading needs an explicit alpha."""
    r: int | None = None
    rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    fan_in_fan_out: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    bias: str = "none"
    target_parameters: list[str] = field(default_factory=list)
    """PEFT target_parameters (see loraops.formats.params)."""
    dora: bool | None = None
    """use_dora as the config says (None: it says nothing, a bare file: the magnitude keys decide)."""
    product: str | None = None
    """"loha"/"lokr" for a LoHaConfig/LoKrConfig adapter (peft_type LOHA/LOKR: see formats.lycoris), else None."""
    method: str | None = None
    """"adalora"/"vera" for an AdaLoraConfig/VeraConfig adapter (see formats.lowrank), else None; ``r`` is then
    AdaLoRA's init_r or VeRA's r."""
    lora_bias: bool | None = None
    """PEFT's lora_bias as the config says (None: it says nothing, a bare file: the lora_B.bias keys decide)."""
    ensure_weight_tying: bool = False
    """PEFT's ensure_weight_tying: a saved module tied to another (a tied model's embeddings and head) is saved under
    both names, the counterpart without a modules_to_save entry of its own."""

    def alpha_for(self, name: str) -> float | None:
        key = common.pattern_key(self.alpha_pattern, name)
        return float(self.alpha_pattern[key]) if key is not None else self.alpha

    def rank_for(self, name: str) -> int:
        """The configured r (LoraConfig's default 8 when absent): only where the tensors cannot say, the rank per
        expert of a LoRA on fused experts."""
        key = common.pattern_key(self.rank_pattern, name)
        return int(self.rank_pattern[key]) if key is not None else self.r or MATH_FIELDS["r"]

    def saves(self, module: str) -> bool:
        """Is ``module`` (or a module it lies in) one PEFT saves whole? See wrapping_entry."""
        return wrapping_entry(self.modules_to_save, module) is not None


def wrapping_entry(entries: Iterable[str], module: str) -> str | None:
    """The modules_to_save entry by which PEFT saves ``module`` (or a module it lies in) whole, or None. PEFT's
    _set_trainable wraps every module whose name ends with an entry, as a plain string ("classifier" wraps RoBERTa's
    classifier head, whose dense and out_proj are saved, and DistilBERT's pre_classifier too; "norm" also wraps
    input_layernorm), and saves the wrapped module's parameters under it."""
    parts = module.split(".")
    return next((m for i in range(1, len(parts) + 1) for m in entries if ".".join(parts[:i]).endswith(m)), None)


def wrapped_twice(entries: Iterable[str], module: str) -> tuple[str, str] | None:
    """(the outer, the inner) of two modules PEFT wraps that ``module`` lies in, one inside the other, or None. An
    entry ends both names (GPT-2's "attn": h.0.attn and, inside it, h.0.attn.c_attn): PEFT 0.21 wraps the inner one
    as a stray child of the outer wrapper, unused by its forward, and saves both under one key (the inner copy's
    values last), so its file lacks the trained copy the adapted model computes with, and its load fails (KeyError).
    A module whose grandparent PEFT wrapped is not wrapped again (_set_trainable updates the grandparent's wrapper):
    modules_to_save=["h.0", "c_fc"] saves h.0 whole, c_fc in it, and loads."""
    parts = module.split(".")
    entries = list(entries)
    wrapped: list[str] = []
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if any(name.endswith(m) for m in entries) and ".".join(parts[:i - 2]) not in wrapped:
            wrapped.append(name)
    return (wrapped[0], wrapped[1]) if len(wrapped) > 1 else None


FLAGS = ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias")
"""LoraConfig's switches: true or false."""


def nulls_as_false(cfg: dict) -> dict:
    """``cfg`` with its switches (FLAGS) that are null false: PEFT's LoraConfig keeps a null as None, which its
    layers and merge read as false (``if use_dora:``, ``bias=lora_bias``, a Conv1D's fan_in_fan_out set true as for
    false)."""
    return {**cfg, **{flag: False for flag in FLAGS if flag in cfg and cfg[flag] is None}}


def note_config_ranks(cfg_file: Path, cfg: ScaleConfig, modules: dict[str, LoraModule]) -> None:
    """Say where the config (r, rank_pattern) gives LoRA modules another rank than their tensors have: PEFT builds
    those layers at the config's r and fails to load the file, and its scale would be alpha over that r; loraops
    reads the tensors' rank and scales by it (docs/formats.md), which inspect's table shows without a word."""
    other = {name: r for name, m in modules.items()
             if (r := cfg.rank_for(params.pattern_name(cfg, name))) != m.rank}
    if other:
        name, r = next(iter(other.items()))
        logging.getLogger("loraops").info(
            f"{cfg_file}: its r/rank_pattern give {len(other)} of {len(modules)} modules another rank than their "
            f"tensors ({name}: r {r}, tensors {modules[name].rank}): PEFT fails to load it; loraops reads the "
            "tensors' rank and scales by it (alpha/rank)")


def scale_config(path: Path, cfg: dict, alpha: float | None = None) -> ScaleConfig:
    """Validate a PEFT config dict and keep what sets the scales; ``alpha`` (the caller's) replaces lora_alpha."""
    cfg = nulls_as_false(cfg)
    tying = ties_weights(cfg)  # (before the fields of another method are narrowed to LoRA's below)
    peft_type = peft_type_of(cfg)
    task_type = cfg.get("task_type")
    if task_type is not None and task_type not in TASK_TYPES:
        raise InvalidInputError(f"{path}: config task_type={task_type!r} is none of PEFT's task types "
                                f"({', '.join(TASK_TYPES)}), which its config refuses")
    modules_to_save = saved_entries(cfg)  # (before the fields of another method are narrowed to LoRA's below)
    product = lycoris.PEFT_TYPES.get(peft_type)
    if product is not None:  # LoHaConfig/LoKrConfig: r, alpha (not lora_alpha), rank/alpha patterns, modules_to_save
        if alpha is None:
            alpha = cfg.get("alpha", common.peft_default(peft_type, "alpha"))
        cfg = {k: cfg[k] for k in ("r", "rank_pattern", "alpha_pattern", "modules_to_save", "bias") if k in cfg}
        peft_type = "LORA"
    method = lowrank.PEFT_TYPES.get(peft_type)
    if method is not None:  # AdaLoraConfig/VeraConfig: their LoraConfig-like fields (scales: formats.lowrank)
        if method == "vera" and alpha is not None:
            raise InvalidInputError(f"{path}: --alpha: a VeRA adapter has no alpha (its ΔW has no scale)")
        cfg = lowrank.config_fields(path, method, cfg)
        peft_type = "LORA"
    if peft_type in common.OTHER_PEFT_TYPES:
        raise UnsupportedAdapterError(
            f"{path}: {common.OTHER_PEFT_TYPES[peft_type]} (peft_type {peft_type}); loraops handles plain LoRA only"
        )
    if peft_type not in ("LORA", tokens.STANDALONE):
        read = sorted({"LORA", tokens.STANDALONE, *lycoris.PEFT_TYPES, *lowrank.PEFT_TYPES})
        raise FormatError(f"{path}: unknown peft_type {cfg.get('peft_type')!r} (loraops reads {', '.join(read)})")
    for flag, what in common.REFUSED_CONFIG_FLAGS.items():
        if common.sets_flag(flag, value := cfg.get(flag)):
            value = ", ".join(map(str, value)) if isinstance(value, list) else repr(value)
            raise UnsupportedAdapterError(f"{path}: {what.format(value=value)}; loraops handles plain LoRA only")
    common.refuse_base_changing_init(path, cfg.get("init_lora_weights"))
    unknown = sorted(k for k, v in cfg.items() if k.startswith("use_") and k not in MATH_FIELDS
                     and k not in common.REFUSED_CONFIG_FLAGS and v)
    if unknown:
        raise UnsupportedAdapterError(
            f"{path}: unknown LoRA option {unknown[0]}={cfg[unknown[0]]!r} that may change the math; refusing to guess"
        )
    r = cfg.get("r")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise InvalidInputError(f"{path}: config r={r!r} must be a positive integer")
    for flag in FLAGS:
        if not isinstance(cfg.get(flag, False), bool):
            raise InvalidInputError(f"{path}: config {flag}={cfg[flag]!r} must be true or false")
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise InvalidInputError(f"{path}: config rank_pattern/alpha_pattern must be objects")
    for key, value in rank_pattern.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidInputError(f"{path}: config rank_pattern[{key!r}]={value!r} must be a positive integer")
    for key, value in alpha_pattern.items():
        common.check_alpha(path, value, f"config alpha_pattern[{key!r}]")
    for which, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key in patterns:  # PEFT matches the keys as regexes: a broken one was an re.error traceback
            try:
                common.pattern_regex(key)
            except re.error as e:
                raise InvalidInputError(f"{path}: config {which}[{key!r}] is no regular expression ({e})") from None
    lora_alpha = cfg.get("lora_alpha")
    if alpha is not None:
        lora_alpha = alpha
    if lora_alpha is not None:
        lora_alpha = common.check_alpha(path, lora_alpha, "config lora_alpha")
    if not module_names(modules_to_save):
        why = (f" or null (PEFT's {task_type} model adds its head to it, and fails on this one)" if not modules_to_save
               else " (PEFT reads a string as its characters)" if isinstance(modules_to_save, str) else "")
        raise InvalidInputError(f"{path}: config modules_to_save={modules_to_save!r} must be a list of module "
                                f"names{why}")
    target_parameters = params.check_entries(path, cfg["target_parameters"]) if cfg.get("target_parameters") else []
    if target_parameters and cfg.get("use_dora"):
        raise UnsupportedAdapterError(f"{path}: DoRA on raw parameters (use_dora with target_parameters), which PEFT "
                                      "itself refuses; loraops does not guess its math")
    recorded = recorded_class_fan_in_fan_out(cfg)  # (what the model's class says over the last layer's flag)
    return ScaleConfig(
        alpha=lora_alpha, r=r, rslora=bool(cfg.get("use_rslora", False)), rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)) if recorded is None else recorded,
        modules_to_save=list(modules_to_save), bias=str(cfg.get("bias") or "none"), target_parameters=target_parameters,
        dora=cfg["use_dora"] if "use_dora" in cfg else None, product=product, method=method,
        lora_bias=cfg["lora_bias"] if "lora_bias" in cfg else None,
        ensure_weight_tying=tying,
    )


OLD_LAYER_RE = re.compile(r".*\.[^.]*\.(?P<idx>\d+)\.")
"""PEFT's layer-index regex without layers_pattern before huggingface/peft#3318: greedy, it took a name's last number,
in a MoE layer an expert's index (model.layers.1.mlp.experts.0.up_proj: 0), where PEFT now takes the first."""


def refuse_untargeted(path: Path, cfg: dict, modules: Iterable[str], saved_keys: Iterable[str] = ()) -> None:
    """Refuse a module with LoRA weights that the config's targeting leaves out. PEFT wraps only the modules its
    target_modules, layers_to_transform/layers_pattern, exclude_modules and modules_to_save select (0.21's
    ``check_target_module_exists``, followed here rule for rule) and leaves the file's other factors unused, without
    a warning, so its model is not W + s·B·A over every module of the file: read as it was, a config edited to leave
    some layers out merged them anyway. Not checked where only the model can say: no target_modules (PEFT's defaults
    per model type: check.default_targets_refusal, at fit time), "all-linear" (its Linear layers), or a LoRA's
    ensure_weight_tying on targeted embeddings
    (ties_targeted_embeddings: PEFT also wraps, whatever the targeting, the layers the model ties to them: a tied
    lm_head, saved with its own factors; not beside embeddings modules_to_save names, nor GPT-2's wte; a LoHa,
    LoKr or VeRA config has no such field, PEFT drops it; an AdaLoRA config has it, but AdaLoRA wraps no embedding,
    so PEFT refuses a config that targets one and no tied LoRA layer is added). A module its modules_to_save saves
    whole (the task's own entries too, see saved_entries) is refused whatever the targeting: PEFT's check excludes it
    before it looks at target_modules, and so is one a LoRA's or AdaLoRA's ensure_weight_tying saves whole
    (``saved_keys``: the file's full-tensor keys, without PEFT's prefix: the tied head's weight is among them, see
    _refuse_saved)."""
    modules = list(modules)
    _refuse_saved(path, cfg, modules, frozenset(saved_keys))
    peft_type = peft_type_of(cfg)
    targets, layers, patterns = cfg.get("target_modules"), cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    # VeraConfig has no exclude_modules: PEFT drops the field (a warning) and wraps the modules it names
    excluded = (cfg.get("exclude_modules") if peft_type != "VERA" else None) or None
    if isinstance(targets, str) and peft_type in LORA_CONFIG_TYPES:  # (LoHa's, LoKr's, VeRA's take it, unused)
        for name, value in (("layers_to_transform", layers), ("layers_pattern", patterns)):
            if value is not None:
                raise InvalidInputError(f"{path}: config {name}={value!r} beside target_modules {targets!r}, a regex: "
                                        f"PEFT's LoraConfig refuses that ({name} selects among a list of names)")
    patterns = patterns or None
    if targets is None or isinstance(targets, str) and targets.lower() == "all-linear" or ties_targeted_embeddings(cfg):
        return
    for name, value, ints in (("target_modules", targets, False), ("exclude_modules", excluded, False),
                              ("layers_to_transform", layers, True), ("layers_pattern", patterns, False)):
        if value is not None and not _names_or_pattern(value, ints):
            raise InvalidInputError(f"{path}: config {name}={value!r} is none of the values PEFT takes")
    layers = frozenset([layers] if isinstance(layers, int) else layers or ()) or None
    try:
        layer_res = [re.compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.")
                     for p in ([patterns] if isinstance(patterns, str) else patterns)] if patterns else \
            [re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")]
        for pattern in (targets, excluded):
            if isinstance(pattern, str):
                re.compile(pattern)
    except re.error as e:
        raise InvalidInputError(f"{path}: config targeting holds no regular expression ({e})") from None

    targets, excluded = (v if isinstance(v, str) or v is None else frozenset(v) for v in (targets, excluded))

    def names(entries, key: str) -> bool:
        """PEFT's match of a module key against target_modules or exclude_modules: a regex matching it whole, or a
        list holding it or a dot-bounded suffix of it (looked up, not scanned: an export lists every module's path)."""
        if isinstance(entries, str):
            return re.fullmatch(entries, key) is not None
        parts = key.split(".")
        return any(".".join(parts[i:]) in entries for i in range(len(parts)))

    def left_out_by(key: str) -> str | None:
        if excluded is not None and names(excluded, key):
            return "exclude_modules"
        if not names(targets, key):
            return "target_modules"
        if isinstance(targets, str) or key in targets or layers is None:
            return None
        index = next((match["idx"] for r in layer_res if (match := r.match(key))), None)
        return None if index is not None and int(index) in layers else "layers_to_transform"

    def trained_then(key: str) -> str:
        """Why a module layers_to_transform leaves out can be in the file: PEFT's old regex took it."""
        greedy = None if patterns else OLD_LAYER_RE.match(key)
        if greedy is None or int(greedy["idx"]) not in layers:
            return ""
        version = _text(cfg.get("peft_version"))
        recorded = f" (this config records peft_version {version})" if version else ""
        return (f". PEFT before huggingface/peft#3318 took the name's last number, {greedy['idx']}, for its layer "
                f"index, so an adapter trained then has it{recorded}; to load it as trained, list the modules by full "
                f"name in target_modules, without layers_to_transform")

    for module in modules:
        if (why := left_out_by(module)) is not None:
            raise _left_out(path, module, why, trained_then(module) if why == "layers_to_transform" else "")


def _refuse_saved(path: Path, cfg: dict, modules: list[str], saved_keys: frozenset[str]) -> None:
    """Refuse a module with LoRA weights inside one that modules_to_save (saved_entries) names: PEFT's
    check_target_module_exists wraps none (its regex, each entry dot-bounded), whatever the targeting, so it loads
    the adapter without them. An entry only the task adds (the config may list none, as older PEFT wrote it) is named
    with its task: PEFT 0.21's SEQ_CLS model adds it before it wraps anything, and so leaves such a LoRA out, but its
    TOKEN_CLS and QUESTION_ANS models after, so one the targeting selects fails their load (a TypeError: a
    ModulesToSaveWrapper around a LoRA layer) and only one it does not is left out: no LoRA of PEFT's on it either way.
    So does a module whose name only ends with an entry (DistilBERT's pre_classifier, "classifier"): the regex lets
    the targeting wrap it, and then PEFT saves it whole too (wrapping_entry), the same TypeError. And so does the
    module tied to a saved embedding under a LoRA's or AdaLoRA's ensure_weight_tying (a tied lm_head): PEFT saves it
    whole too (its modules_to_tie, which the config does not list: its weight is saved as a plain key,
    ``saved_keys``), and leaves a LoRA on it out, or, one the targeting selects, fails its load (the same
    TypeError)."""
    entries, own = saved_entries(cfg), saved_entries({**cfg, "task_type": None})
    tying = ties_weights(cfg)
    try:
        matchers = [(m, re.compile(rf"(^|.*\.){m}($|\..*)")) for m in entries]
    except re.error as e:
        raise InvalidInputError(f"{path}: config modules_to_save holds no regular expression ({e})") from None
    for module in modules:
        entry = next((m for m, matcher in matchers if matcher.match(module)), None)
        if entry is not None and entry in own:
            raise _left_out(path, module, "modules_to_save (PEFT wraps no module it saves whole)")
        what = repr(entry)
        if entry is None and (entry := wrapping_entry(entries, module)) is not None:
            what = f"every module whose name ends with {entry!r}"
        if entry is None and tying and (weight := f"{module}.weight") in saved_keys:
            raise _saved_whole(path, module, f"the config's ensure_weight_tying saves it whole (tied to a module "
                                             f"modules_to_save saves, its weight {weight!r} is in the file)")
        if entry is None:
            continue
        saver = "the config's modules_to_save" if entry in own else f"the model of task_type {cfg['task_type']}"
        added = "" if entry in own else " (PEFT adds it to modules_to_save)"
        raise _saved_whole(path, module, f"{saver} saves {what} whole{added}")


def _saved_whole(path: Path, module: str, why: str) -> InvalidInputError:
    return InvalidInputError(f"{path}: module {module!r} has LoRA weights, but {why} and PEFT loads no LoRA on a "
                             f"module it saves whole; correct the config, or remove the module's tensors")


def _left_out(path: Path, module: str, why: str, note: str = "") -> InvalidInputError:
    return InvalidInputError(f"{path}: module {module!r} has LoRA weights that the config's {why} leaves out: PEFT "
                             f"would load the adapter without them; correct the config, or remove the module's "
                             f"tensors{note}")


def _names_or_pattern(value, ints: bool) -> bool:
    """A targeting field of a form PEFT takes: a list of names or one regex (layers_to_transform: of indices, or one)."""
    kind = int if ints else str
    one = isinstance(value, kind) and not isinstance(value, bool)
    return one or isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)


def _text(value) -> str | None:
    """A free-text config field (a hint only): kept when it is a non-empty string, else ignored."""
    return value if isinstance(value, str) and value else None


def metadata_config(header: st.Header) -> dict | None:
    """A LoRA config carried in safetensors header metadata: diffusers' ``lora_adapter_metadata`` (a JSON
    LoraConfig, possibly with component-prefixed keys), an ``adapter_config`` JSON, or a bare ``lora_alpha``/``alpha``."""
    metadata = header.metadata
    for key in ("lora_adapter_metadata", "adapter_config"):
        if key in metadata:
            try:
                cfg = json.loads(metadata[key])
            except ValueError:  # (not JSON, or a number past Python's 4300-digit limit for reading one)
                cfg = None
            if isinstance(cfg, dict):
                refuse_lone_surrogates(cfg, f"{header.path}: its metadata's {key}")
                return cfg
    alpha = metadata_alpha(metadata)
    return None if alpha is None else {"lora_alpha": alpha}


def metadata_alpha(metadata: dict[str, str]) -> float | None:
    """The number a bare ``lora_alpha`` or ``alpha`` header key holds (the first that is one), or None."""
    for key in ("lora_alpha", "alpha"):
        try:
            return float(metadata[key])
        except (KeyError, ValueError):
            continue
    return None


def bare_config(header: st.Header) -> dict | None:
    """metadata_config for a bare PEFT file: a JSON config without lora_alpha takes the bare ``lora_alpha``/``alpha``
    key beside it (metadata_alpha), which says the alpha as well as a config would; it asked for --alpha."""
    cfg, alpha = metadata_config(header), metadata_alpha(header.metadata)
    return cfg if cfg is None or alpha is None or "lora_alpha" in cfg else {**cfg, "lora_alpha": alpha}


@dataclass
class ParsedKeys:
    factors: dict[str, dict[str, str]]
    """module name → {"A"/"B": key, "magnitude": key for a DoRA module, "lora_bias": key for lora_B's bias}"""
    kinds: dict[str, str]
    others: list[str]


# kohya's factor names on PEFT-style dotted module paths: behind a pipeline component (transformer.….lora_down.weight:
# some Civitai FLUX files, which diffusers and ComfyUI load as lora_A/lora_B) or in a bare file
# (diffusion_model.blocks.0.self_attn.q.lora_down.weight: Wan 2.2's distilled LoRAs, Qwen-Image trainers' files, which
# diffusers' Wan and Qwen converters read so)
KOHYA_FACTORS = {".lora_down.weight": ".lora_A.weight", ".lora_up.weight": ".lora_B.weight"}


def peft_key(key: str) -> str:
    """``key`` with kohya's factor suffix (KOHYA_FACTORS) as PEFT's."""
    suffix = next((s for s in KOHYA_FACTORS if key.endswith(s)), None)
    return key if suffix is None else key.removesuffix(suffix) + KOHYA_FACTORS[suffix]


def parse_stored_keys(path: Path, keys, module_name: Callable[[str], str]) -> ParsedKeys:
    """parse_keys of ``keys`` read with PEFT's factor names (peft_key); the result names the keys as stored."""
    stored = {peft_key(key): key for key in keys}
    if len(stored) < len(keys):
        raise InvalidInputError(f"{path}: a module holds both lora_A/lora_B and lora_down/lora_up factors")
    parsed = parse_keys(path, stored, module_name)
    parsed.factors = {name: {part: stored[key] for part, key in parts.items()} for name, parts in parsed.factors.items()}
    parsed.others = [stored[key] for key in parsed.others]
    return parsed


def parse_keys(path: Path, keys, module_name: Callable[[str], str]) -> ParsedKeys:
    """Group PEFT-grammar factor keys by module; ``module_name`` maps the key's module part to our name."""
    factors: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    others: list[str] = []
    adapter_names: set[str] = set()
    for key in keys:
        match = FACTOR_RE.match(key) or PART_RE.match(key)
        if match is None:
            others.append(key)
            continue
        segments = match["rest"].split(".")[1:]
        which, kind = FACTOR_PARTS.get(match["part"]) or (OTHER_PARTS[match["part"]], None)
        if segments and segments[-1] == "bias" and match["part"] == "lora_B":  # PEFT lora_bias
            which, kind = "lora_bias", None
            segments.pop()
        elif segments and segments[-1] == "weight":
            segments.pop()
        if len(segments) > 1:  # at most one adapter-name segment
            raise common.unknown_layout(path, [key], "unknown LoRA key layout")
        adapter_names.update(segments)
        name = module_name(match["module"])
        parts = factors.setdefault(name, {})
        if which in parts:
            raise InvalidInputError(
                f"{path}: duplicate module {name!r} after key normalisation ({parts[which]!r} and {key!r})"
            )
        if kind is not None and kinds.setdefault(name, kind) != kind:
            raise InvalidInputError(f"{path}: module {name!r} mixes lora_A/B and lora_embedding_A/B keys")
        parts[which] = key
    if len(adapter_names) > 1:
        raise FormatError(f"{path}: holds several adapters ({', '.join(sorted(adapter_names))}); save them apart")
    common.pair_factors(path, factors, "A", "B")
    for name, parts in factors.items():
        if "A" not in parts:
            raise InvalidInputError(f"{path}: {next(iter(parts.values()))!r} has no lora_A/lora_B tensors for module "
                                    f"{name!r}")
    return ParsedKeys(factors, kinds, others)


def split_alpha_keys(parsed: ParsedKeys, module_name: Callable[[str], str] = lambda module: module) -> dict[str, str]:
    """Module → its ``<module>.alpha`` key, taken out of ``parsed.others``: kohya-style network alphas some trainers
    write beside PEFT keys (ComfyUI-style ``diffusion_model.…`` files, some FLUX trainers' diffusers files), which
    diffusers and ComfyUI read as the module's alpha."""
    keys = {module_name(key.removesuffix(".alpha")): key for key in parsed.others if key.endswith(".alpha")}
    keys = {name: key for name, key in keys.items() if name in parsed.factors}
    parsed.others = [key for key in parsed.others if key not in keys.values()]
    return keys


def key_alpha(path: Path, tensors: dict[str, "torch.Tensor"], parsed: ParsedKeys, name: str,
              alpha_keys: dict[str, str]) -> float:
    """A module's alpha from its ``.alpha`` key (split_alpha_keys); without one, or 0 (as in kohya files), r."""
    rank = float(tensors[parsed.factors[name]["A"]].shape[0])
    if name not in alpha_keys:
        return rank
    return common.stored_alpha(path, tensors[alpha_keys[name]], alpha_keys[name]) or rank


def build_modules(
    path: Path, parsed: ParsedKeys, tensors: dict[str, "torch.Tensor"], config_for: Callable[[str], tuple[ScaleConfig, str]],
    adapter_of: Callable[[str], str | None] = lambda name: None,
) -> dict[str, LoraModule]:
    """Modules with PEFT's scales; ``config_for(name)`` gives the ScaleConfig and the name patterns match against.
    DoRA: every module of one PEFT adapter has its magnitude or none has (PEFT's use_dora is one switch for the whole
    adapter; ``adapter_of(name)`` says which adapter a module is in: a diffusers file holds one per component), and
    they agree with a config's use_dora (PEFT ignores magnitudes when it is false, and makes up ones that turn DoRA
    into plain LoRA when they are missing)."""
    modules = {}
    for name, parts in sorted(parsed.factors.items()):
        cfg, pattern_name = config_for(name)
        if cfg.dora is not None and cfg.dora != ("magnitude" in parts):
            what = f"a DoRA magnitude ({parts['magnitude']!r})" if "magnitude" in parts else "no lora_magnitude_vector"
            raise InvalidInputError(f"{path}: module {name!r} has {what} but the config says use_dora: "
                                    f"{str(cfg.dora).lower()}")
        refuse_lora_bias(path, name, parts, cfg, parsed.kinds[name])
        alpha = cfg.alpha_for(pattern_name)
        if alpha is None:
            raise InvalidInputError(
                f"{path}: no adapter_config.json and no alpha in the file's metadata; {common.ALPHA_WANTED}"
            )
        kind = parsed.kinds[name]
        modules[name] = common.build_module(
            path, name, tensors[parts["A"]], tensors[parts["B"]], a_key=parts["A"], b_key=parts["B"], alpha=alpha,
            rslora=cfg.rslora, kind="embedding" if kind == "embedding" else None,
            fan_in_fan_out=common.peft_fan_in_fan_out(cfg.fan_in_fan_out, name) and kind == "linear"
            and tensors[parts["A"]].dim() == 2,
            magnitude=tensors[parts["magnitude"]] if "magnitude" in parts else None, magnitude_key=parts.get("magnitude", ""),
            lora_bias=tensors[parts["lora_bias"]] if "lora_bias" in parts else None, bias_key=parts.get("lora_bias", ""),
        )
    switches: dict[str | None, set[bool]] = {}
    for name, module in modules.items():
        switches.setdefault(adapter_of(name), set()).add(module.dora)
    mixed = [group for group, dora in switches.items() if len(dora) > 1]
    if mixed:
        plain = next(name for name, m in modules.items() if adapter_of(name) == mixed[0] and not m.dora)
        raise InvalidInputError(f"{path}: only some modules carry a DoRA magnitude (lora_magnitude_vector); "
                                f"{plain!r} has none")
    return modules


def has_lora_bias(path: str | Path) -> bool:
    """Whether the PEFT adapter at ``path`` (a folder or its weights file) has lora_B biases (lora_bias), by its
    tensor names."""
    path = Path(path)
    keys = st.read_header(weights_file(path) if path.is_dir() else path).tensors
    return any(re.search(common.LORA_BIAS_MARKER[0], key) for key in keys)


def refuse_lora_bias(path: Path, name: str, parts: dict[str, str], cfg: ScaleConfig, kind: str) -> None:
    """A module's lora_B.bias as PEFT loads it: its lora_bias is one switch for the whole adapter, which the bias keys
    must agree with where a config says it (false: PEFT's lora_B has no bias and leaves the stored one unused; true
    with a bias missing: PEFT's stays as its init made it), and it makes none for embeddings or DoRA (its config
    refuses them)."""
    if "lora_bias" not in parts:
        if cfg.lora_bias:
            raise InvalidInputError(f"{path}: module {name!r} has no lora_B.bias but the config says lora_bias: true")
        return
    if cfg.lora_bias is False:
        raise InvalidInputError(f"{path}: module {name!r} has a lora_B bias ({parts['lora_bias']!r}) but the config "
                                "says lora_bias: false (PEFT would leave it unused)")
    if kind == "embedding" or "magnitude" in parts or cfg.dora:
        what = "an embedding" if kind == "embedding" else "DoRA"
        raise UnsupportedAdapterError(f"{path}: module {name!r}: lora_bias on {what}, which PEFT itself refuses")


def saved_layer_tensors(adapter: Adapter) -> set[str]:
    """The tensors a PEFT saved layer under a LoRA (save_embedding_layers) can hold: each module's weight, and its
    bias when the adapter trains no biases (PEFT saves the wrapped layer whole: Phi's and GPT-J's lm_head)."""
    names = {module.weight_name for module in adapter.modules.values()}
    if (adapter.config.get("bias") or "none") == "none":  # PEFT's default, also when the config says null
        names |= {f"{module.name}.bias" for module in adapter.modules.values()
                  if module.fused is None and module.weight_name in adapter.full_tensors}
    return names | embedding_layers_saved(adapter)


def refuse_full_tensors(adapter: Adapter, fmt: str, *, base: str | None = None) -> None:
    """Full tensors (modules_to_save, PEFT's saved embedding layers) cannot be written as kohya or diffusers, which
    hold only low-rank factors. A saved embedding layer (save_embedding_layers, on by default when a LoRA targets the
    embeddings) is named as what it is: export leaves it out where it holds its base's values (``base``: the base
    it was compared with, where it was)."""
    names = sorted(adapter.full_tensors)
    layers = [n for n in names if n in saved_layer_tensors(adapter)]
    if not names:
        return
    if not layers:
        raise FormatError(f"{adapter.label}: {fmt} files cannot hold full replacement tensors "
                          f"(modules_to_save: {common.shown(names)}); write it as peft")
    if base is None:
        why = ("bound to no base, so loraops cannot tell it carries nothing (it is left out when it equals the "
               "base's: give --base BASE)")
    else:
        why = f"which differs from base {base}'s, so it carries trained values"
    raise FormatError(f"{adapter.label}: {common.shown(layers)}: PEFT's saved embedding layer (save_embedding_layers, "
                      f"saved whole beside the LoRA), {why}; a {fmt} file cannot hold a full tensor: write it as peft")


def full_tensor_name(key: str, cfg: ScaleConfig | None, lora_modules: frozenset[str] = frozenset(),
                     token_modules: frozenset[str] = frozenset()) -> str | None:
    """The base tensor a non-LoRA PEFT key replaces (modules_to_save, trained biases, a LoRA layer's whole wrapped
    weight, the embedding layers saved beside trainable tokens), or None if it is not one."""
    if token_modules and (name := tokens.saved_layer_name(key, token_modules)) is not None:
        return name
    wrapped = ".base_layer." in key
    key = key.replace(".base_layer.", ".")  # PEFT saves a LoRA layer's trained bias under its wrapped base layer
    module, _, param = key.rpartition(".")
    if wrapped and param in ("weight", "bias") and module in lora_modules:
        # save_embedding_layers (on by default when embeddings are targeted): the layer's weight (and bias: Phi's and
        # GPT-J's lm_head) as trained with, which PEFT loads over the base's before adding the LoRA
        return key
    if ".modules_to_save." in key:
        owner, _, rest = key.partition(".modules_to_save.")
        return f"{owner}.{rest.split('.', 1)[1]}" if "." in rest else None
    if cfg is None or not module:
        return None
    if cfg.saves(module) or (param == "bias" and cfg.bias != "none"):
        return key
    if cfg.ensure_weight_tying and cfg.modules_to_save and param == "weight" and not wrapped:
        # the tied counterpart of a saved module (the head of saved embeddings), with the same values. Not only beside
        # entries ties_saved_embeddings takes: PEFT writes the input embeddings' own path into the config it saves
        # (GPT-2's modules_to_save=["lm_head"] goes out as ["transformer.wte"] beside the head's copy)
        return key
    return None


WRAPPER_STATE = re.compile(r"^(?P<owner>.+?)\.(?:modules_to_save|original_module)\.(?P<param>.+)$")


def wrapper_state_keys(keys: Iterable[str], cfg: ScaleConfig | None) -> set[str]:
    """The keys (without base_model.model.) of a saved module's ModulesToSaveWrapper state that PEFT 0.21's
    save_embedding_layers writes beside the module's own (``modules_to_save=["lm_head"]`` saved with
    save_embedding_layers=True, or "auto" on a resized vocabulary: the output embeddings are then the wrapper, saved
    whole as its state dict, ``lm_head.original_module.weight``, the base's, and ``lm_head.modules_to_save.weight``,
    the trained copy once more, beside ``lm_head.weight``). PEFT's load (set_peft_model_state_dict) takes the copy from
    ``lm_head.weight`` alone, puts ``original_module``'s into the wrapped base layer, which merge_and_unload drops, and
    leaves the other unused: none of them is in the merged model. Only beside the module's own key (without it PEFT's
    load fails: a KeyError) and for a module modules_to_save wraps, or, with ensure_weight_tying, the counterpart PEFT
    wraps tied to a saved one without an entry of its own (a tied model's lm_head beside saved embeddings: its config
    lists "model.embed_tokens" alone; see full_tensor_name)."""
    keys = set(keys)
    return {key for key in keys if (match := WRAPPER_STATE.match(key)) is not None and cfg is not None
            and (cfg.saves(match["owner"]) or cfg.ensure_weight_tying and bool(cfg.modules_to_save))
            and (f"{match['owner']}.{match['param']}" in keys
                 # (the base layer's tied bias, RoBERTa's decoder's, is saved as the original's state alone: the
                 # wrapped copy's, deep-copied from the base, is no parameter PEFT saves)
                 or ".original_module." in key and f"{match['owner']}.weight" in keys)}


def saved_beside_wrapper(key: str, wrapper_keys: set[str]) -> str | None:
    """The tensor ``key`` (without base_model.model.) replaces where it is the other embedding layer save_embedding_
    layers saved whole beside a wrapper's state (``wrapper_keys``, see wrapper_state_keys: the proof it was on): a
    module's whole weight or bias (the input embeddings, ``model.embed_tokens.weight``; a biased head, Phi's
    ``lm_head.bias``, beside wrapped input embeddings), which PEFT's load (not strict) puts over the model's own."""
    return key if wrapper_keys and key.rpartition(".")[2] in ("weight", "bias") and ".base_layer." not in key \
        else None


def saved_embedding_layer(key: str, lora_modules: Collection[str] = frozenset()) -> str | None:
    """The tensor ``key`` (without base_model.model.) replaces where it is a layer save_embedding_layers saves whole
    with no LoRA on it (True, or "auto" on a resized vocabulary): the model's input embeddings' weight, its output
    head's weight or bias (PEFT saves get_input_embeddings() and get_output_embeddings() whole), named as loraops
    knows them (check.INPUT_EMBEDDINGS, check.is_head); PEFT's load (not strict) puts it over the model's own. Any
    other whole tensor is none PEFT's rule writes (a hand-edited file): None."""
    from ..check import INPUT_EMBEDDINGS, is_head

    module, _, param = key.rpartition(".")
    if ".base_layer." in key or not module or module in lora_modules:  # (PEFT saves a LoRA layer's under base_layer)
        return None
    if param == "weight" and any(common.names_module(key, name) for name in INPUT_EMBEDDINGS):
        return key
    return key if param in ("weight", "bias") and is_head(module) else None


def wraps_embedding_layer(entries: list[str], names: Iterable[str]) -> bool:
    """Does modules_to_save (``entries``) wrap an embedding layer among the tensors ``names``? Then PEFT's
    save_embedding_layers writes that wrapper's state (wrapper_state_keys), and a plain embedding layer beside it is
    read by that rule (saved_beside_wrapper), not by saved_embedding_layer's. Beside modules_to_save wrapping other
    modules (["norm"]) it saves the embeddings and head whole all the same, and PEFT's load puts them over the
    model's own."""
    return any(saved_embedding_layer(name) is not None and wrapping_entry(entries, name.rpartition(".")[0])
               for name in names)


def embedding_layers_saved(adapter: Adapter) -> set[str]:
    """The adapter's full tensors that are saved_embedding_layer's: beside no modules_to_save wrapping an embedding
    layer (wraps_embedding_layer; as read reads them: with a config), not a LoRA layer's own weight
    (saved_layer_tensors) nor a trained bias."""
    config = adapter.config
    if adapter.format != "peft" or not config:
        return set()
    entries = saved_entries(config)
    if not module_names(entries) or wraps_embedding_layer(entries, adapter.full_tensors):
        return set()
    from ..check import decoder_bias_of

    trains_biases = (config.get("bias") or "none") != "none"
    # (a bound adapter's head bias under the name of the bias the base stores for it: BERT's cls.predictions.bias)
    return {name for name in adapter.full_tensors
            if (saved_embedding_layer(name) or saved_embedding_layer(decoder_bias_of(name) or "")) is not None
            and name.rpartition(".")[0] not in adapter.modules and not (name.endswith(".bias") and trains_biases)}


def _unknown_layout(weights: Path, keys: list[str], configured: bool, lora_modules: frozenset[str]) -> FormatError:
    """The refusal of keys full_tensor_name does not place, saying so where they are whole tensors of modules beside
    a config (``configured``) that saves none of them. PEFT's load is not strict: it puts such a tensor in place of the
    model's own of that name (where the model has one unwrapped), modules_to_save or not; loraops does not take the
    file's word over the config's (a head dropped from modules_to_save on purpose would come back)."""
    error = common.unknown_layout(weights, keys)
    modules = sorted({key.removeprefix(PREFIX).rpartition(".")[0] for key in keys})
    if not configured or not all(re.fullmatch(rf"{re.escape(PREFIX)}[^.].*\.(weight|bias)", key) for key in keys) \
            or any(".modules_to_save." in m or ".base_layer" in m or m in lora_modules for m in modules):
        return error
    return FormatError(f"{error}: whole tensors of modules the config's modules_to_save does not name "
                       f"({common.shown(modules)}), which PEFT's load (not strict) would put over the model's own; "
                       f"list them in modules_to_save to read them as saved whole, or remove them")


# -- reading ---------------------------------------------------------------------------------------------------


def load_config(path: Path) -> dict:
    """adapter_config.json as a dict (fsutil.read_json: one line where it is no JSON object Python reads)."""
    return read_json(path, "adapter config")


def weights_file(folder: Path) -> Path:
    """The safetensors weights of a PEFT folder; a pickle-only folder is refused with a conversion hint."""
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        return weights
    for name in PICKLE_WEIGHTS:
        if (folder / name).is_file():
            st.read_header(folder / name)  # raises the pickle message naming the file
    raise FormatError(f"{folder}: no {WEIGHTS_NAME} in this folder (not a PEFT adapter?)")


def config_path(path: Path) -> Path | None:
    """The adapter_config.json that goes with a PEFT folder or weights file, if there is one."""
    candidate = (path if path.is_dir() else path.parent) / CONFIG_NAME
    return candidate if candidate.is_file() else None


def read(path: Path, *, alpha: float | None = None, values: bool = True, mapped: bool = False) -> Adapter:
    weights = weights_file(path) if path.is_dir() else path
    cfg_file = config_path(path)
    if path.is_dir() and cfg_file is None:
        raise FormatError(f"{path}: no {CONFIG_NAME} in this PEFT folder")
    header = st.read_header(weights)
    raw_cfg = load_config(cfg_file) if cfg_file else bare_config(header)
    raw_cfg = nulls_as_false(raw_cfg) if raw_cfg is not None else None  # (settled_orientation reads it too)
    if cfg_file:  # LoraConfig's defaults, as PEFT reads the file
        raw_cfg = {k: common.peft_default("LORA", k) for k in ("lora_alpha", "use_dora")} | raw_cfg
    cfg = scale_config(cfg_file or weights, raw_cfg or {}, alpha) if raw_cfg is not None or alpha is not None else None
    if cfg_file and cfg.alpha is None and cfg.product is None and cfg.method is None:  # (absent, it is LoraConfig's 8)
        raise InvalidInputError(f"{cfg_file}: config lora_alpha is null, which PEFT cannot read (it divides it by r); "
                                f"set it there, or {common.ALPHA_WANTED}")
    if cfg is not None and cfg.method == "adalora" and cfg.alpha is None:  # (a folder's is AdaLoraConfig's 8)
        raise InvalidInputError(f"{weights}: its metadata's AdaLoRA config gives no lora_alpha; {common.ALPHA_WANTED}")
    product = cfg.product if cfg is not None else None
    method = cfg.method if cfg is not None else None
    products, keys = ({}, header.tensors) if product is None else \
        lycoris.group(weights, header.tensors, lambda module: module.removeprefix(PREFIX))
    lambdas, projections, keys = ({}, {}, keys) if method != "vera" else \
        lowrank.vera_group(keys, lambda module: module.removeprefix(PREFIX))
    if method is not None:
        lowrank.refuse_unsupported(weights, keys, method)
    else:
        if product is None:
            common.refuse_unsupported(weights, keys, [m for m in common.REFUSED_MARKERS
                                                      if m is not common.LORA_BIAS_MARKER])  # (read here)
        else:
            lycoris.refuse_unsupported(weights, keys)
    bare = cfg_file is None and product is None and method is None  # a plain LoRA's factors, no config beside them
    # a bare file may name its factors as kohya does (lora_down/lora_up): kohya's alpha rule then, α = r without .alpha
    kohya_factors = bare and any(key.endswith(tuple(KOHYA_FACTORS)) for key in keys)
    parsed = (parse_stored_keys if kohya_factors else parse_keys)(
        weights, list(keys), lambda module: module.removeprefix(PREFIX))
    # a bare file's ".alpha" keys (ComfyUI reads them; a module without one: r), where no config or --alpha says
    alpha_keys = split_alpha_keys(parsed, lambda module: module.removeprefix(PREFIX)) if bare else {}
    if (product is not None or method == "vera") and parsed.factors:
        raise InvalidInputError(f"{weights}: lora_A/lora_B keys ({next(iter(parsed.factors))!r}) in a "
                                f"{raw_cfg['peft_type']} adapter")
    token_keys = [key for key in parsed.others if tokens.is_token_key(key)]
    parsed.others = [key for key in parsed.others if key not in token_keys]
    lora_modules = frozenset(parsed.factors) | frozenset(products) | frozenset(lambdas)
    token_modules = frozenset(tokens.TOKEN_KEY.match(key.removeprefix(PREFIX))["module"] for key in token_keys)
    if tied_tokens := [key for key in parsed.others if ".token_adapter.base_layer." in key and cfg is not None
                       and wrapping_entry(cfg.modules_to_save, key.removeprefix(PREFIX).partition(".token_adapter.")[0])]:
        # (PEFT wraps the head modules_to_save saves in a TrainableTokensWrapper tied to the embeddings' tokens, whose
        # layer then wraps the ModulesToSaveWrapper, no Embedding nor Linear: a tied Llama's ["lm_head"], RoBERTa's
        # ["decoder"]. Beside no such entry the key is the layer save_embedding_layers saves under the tokens)
        raise FormatError(f"{weights}: {common.shown(tied_tokens)}: trainable tokens tied to a module modules_to_save "
                          f"saves whole: PEFT's model with this adapter cannot run (its forward fails: \"TrainableTokens"
                          f"Layer wraps an unknown layer type\"), so there is no result to merge to; train the tokens "
                          f"without that module in modules_to_save")
    wrapper_keys = wrapper_state_keys((key.removeprefix(PREFIX) for key in parsed.others), cfg)
    originals = {f"{match['owner']}.{match['param']}": PREFIX + key for key in wrapper_keys
                 if ".original_module." in key and (match := WRAPPER_STATE.match(key)) is not None}
    parsed.others = [key for key in parsed.others if key.removeprefix(PREFIX) not in wrapper_keys]
    full_names = {key: full_tensor_name(key.removeprefix(PREFIX), cfg, lora_modules, token_modules)
                  or saved_beside_wrapper(key.removeprefix(PREFIX), wrapper_keys)
                  or (saved_embedding_layer(key.removeprefix(PREFIX), lora_modules) if raw_cfg and not
                      wraps_embedding_layer(cfg.modules_to_save, (k.removeprefix(PREFIX) for k in parsed.others))
                      else None)
                  for key in parsed.others}
    unknown = [key for key, target in full_names.items() if target is None]
    if unknown:
        raise _unknown_layout(weights, unknown, cfg_file is not None, lora_modules)
    if len(set(full_names.values())) < len(full_names):
        raise InvalidInputError(f"{weights}: duplicate full tensors after key normalisation ({sorted(full_names)[:4]})")
    if not parsed.factors and not products and not lambdas and not full_names and not token_keys:
        raise FormatError(f"{weights}: no LoRA tensors in this file")
    tensors = st.load_tensors(header, values=values, mapped=mapped)
    no_config = ScaleConfig(alpha=None)
    experts = params.split_experts(weights, parsed, tensors, cfg)
    if method == "adalora":
        modules = lowrank.adalora_modules(weights, parsed.factors, tensors, raw_cfg, init_r=cfg.r, alpha=cfg.alpha,
                                          fan_in_fan_out=cfg.fan_in_fan_out, prefix=PREFIX)
    else:
        modules = build_modules(weights, parsed, tensors, lambda name: (
            ScaleConfig(alpha=key_alpha(weights, tensors, parsed, name, alpha_keys))
            if (alpha_keys or kohya_factors) and cfg is None
            else cfg or no_config,
            params.pattern_name(cfg or no_config, name)))
        if cfg_file is not None:
            note_config_ranks(cfg_file, cfg, modules)
    if method == "vera":
        modules.update(lowrank.vera_modules(weights, lambdas, projections, tensors, r=cfg.r,
                                            fan_in_fan_out=cfg.fan_in_fan_out))
    modules.update((name, lycoris.build(weights, name, parts, tensors, alpha=cfg.alpha_for(name),
                                        peft_rank=cfg.rank_for(name))) for name, parts in products.items())
    modules = dict(sorted({**params.mark_weight_targets(modules, cfg), **experts}.items()))
    if product is None and method is None:
        modules = settled_orientation(modules, raw_cfg)
    if cfg_file is not None:
        refuse_untargeted(cfg_file, raw_cfg, [name for name, m in modules.items() if m.raw_parameter is None],
                          [key.removeprefix(PREFIX) for key in full_names])
    full = {}
    for key, target in full_names.items():
        common.check_finite(weights, key, tensors[key])
        full[target] = tensors[key]
    params.refuse_miscounted(weights, experts, full)
    # a bare file's indices only when its metadata carries the config that has them
    knows = cfg_file or any(k in (raw_cfg or {}) for k in ("trainable_token_indices", "token_indices"))
    rows = tokens.read_rows(weights, token_keys, tensors, raw_cfg if knows else None, PREFIX)
    if knows:
        tokens.refuse_missing(cfg_file or weights, raw_cfg, rows)
    return Adapter(
        modules=modules, format="peft", metadata=dict(header.metadata), config=raw_cfg or {}, full_tensors=full,
        token_rows=rows, targeted=lora_modules if cfg_file is not None else None,
        originals={name: tensors[key] for name, key in originals.items()},
        base_model=_text((raw_cfg or {}).get("base_model_name_or_path")),
        base_revision=_text((raw_cfg or {}).get("revision")), path=path,
        scale_mode="rslora" if cfg is not None and cfg.rslora else "classic",
    )


def settled_orientation(modules: dict[str, LoraModule], config: dict | None) -> dict[str, LoraModule]:
    """``modules`` with those named as Conv1D layers marked LoraModule.orientation_known false where nothing read
    settles their fan_in_fan_out. PEFT decides it per layer (Conv1D: true, nn.Linear: false) and saves the last wrapped
    layer's: true says that layer, and so the adapter's model, is a Conv1D one (GPT-2); false where every 2-D LoRA
    module is Conv1D-named says they are nn.Linear (GPT-BigCode, GPT-Neo, Starcoder2); false beside another layer
    (GPT-2's lm_head, saved last) or no flag at all (a bare file) says nothing of them, unless the config records the
    model's class (recorded_class_fan_in_fan_out). The factors cannot say either: PEFT's lora_A is r × the layer's
    inputs, lora_B its outputs × r, for a Conv1D as for an nn.Linear."""
    linear = [m for m in modules.values() if m.kind == "linear" and m.raw_parameter is None and m.product is None]
    conv1d = [m for m in linear if common.conv1d_named(m.name)]
    flag = (config or {}).get("fan_in_fan_out")
    if (not conv1d or flag is True or (flag is False and len(conv1d) == len(linear))
            or recorded_class_fan_in_fan_out(config) is not None):
        return modules
    return {**modules, **{m.name: replace(m, orientation_known=False) for m in conv1d}}


CONV1D_MODELS = frozenset({"gpt2", "openai", "imagegpt", "decision_transformer", "clvp"})
"""transformers' models whose Conv1D-named layers (common.CONV1D_LAYERS) are its Conv1D (stored in × out)."""
LINEAR_MODELS = frozenset({"gpt_bigcode", "gpt_neo", "starcoder2", "bridgetower", "idefics"})
"""transformers' models whose Conv1D-named layers are nn.Linear. (Both lists: every transformers model with a layer of
those names, tests/test_formats_write.py checks against the installed transformers' source.)"""


def recorded_class_fan_in_fan_out(config: dict | None) -> bool | None:
    """The fan_in_fan_out of the Conv1D-named layers of the model class PEFT recorded in the config (auto_mapping's
    parent_library, saved for an adapter without a task_type): true for a CONV1D_MODELS class, false for a
    LINEAR_MODELS one; None where none is recorded, or one of another model or library (remote code)."""
    mapping = (config or {}).get("auto_mapping")
    library = mapping.get("parent_library") if isinstance(mapping, dict) else None
    match = re.fullmatch(r"transformers\.models\.(\w+)\.modeling_\1", library) if isinstance(library, str) else None
    model = match[1] if match else None
    return True if model in CONV1D_MODELS else False if model in LINEAR_MODELS else None


# -- writing ---------------------------------------------------------------------------------------------------


def lora_config_of(config: dict) -> dict:
    """The config of a LoRA written from another PEFT method's adapter (LoHa/LoKr resized; AdaLoRA or VeRA exported,
    resized, combined): the fields a LoraConfig shares (targets, task, modules_to_save, bias), others left behind
    (PEFT's LoraConfig would not load AdaLoRA's init_r or VeRA's projection_prng_key). A LoRA's own, unchanged."""
    if str(config.get("peft_type")).upper() not in (*lycoris.PEFT_TYPES, *lowrank.PEFT_TYPES):
        return config
    shared = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
              "task_type", "base_model_name_or_path", "revision", "auto_mapping")
    out = {"peft_type": "LORA", **{k: config[k] for k in shared if k in config}}
    if isinstance(bias := config.get("bias"), str):  # "vera_only", "hada_only": the adapted layers' biases
        out["bias"] = "lora_only" if bias.endswith("_only") else bias
    return out


def stored_alpha(module: LoraModule, rslora: bool) -> float:
    """The alpha that gives this module's scale under PEFT's rule (modules made by the algebra may carry a scale
    that is not alpha/r, e.g. cat's scale 1)."""
    alpha = module.scale * (math.sqrt(module.rank) if rslora else module.rank)
    if common.overflows_float32(alpha):  # (an rsLoRA scale written as kohya's alpha/r, ×√r: it was written as inf)
        raise InvalidInputError(f"module {module.name!r}: scale {module.scale:g} at rank {module.rank} is alpha "
                                f"{alpha:g}{' (alpha/√r)' if rslora else ''}, beyond what float32 holds")
    nearest = round(alpha)  # not 0: an alpha under 1e-9 was written as 0 (alpha = rank in kohya, scale 0 in PEFT)
    return float(nearest) if nearest and math.isclose(alpha, nearest, rel_tol=0, abs_tol=1e-9) else alpha


def number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def lora_config(modules: dict[str, LoraModule], pattern_names: dict[str, str], *, rslora: bool,
                saved_modules: list[str], base: dict | None = None, base_model: str | None = None,
                revision: str | None = None, target_parameters: list[str] = (),
                targeted: frozenset[str] | None = None) -> dict:
    """An adapter_config.json PEFT loads unchanged, giving every module its rank and scale.

    Which modules: when ``modules`` are exactly ``targeted`` (the modules the ``base`` config's targeting gave the
    adapter it came from), that targeting as PEFT wrote it (short names like ["q_proj", "v_proj"], a regex,
    layers_to_transform, …), so an export is the file it came from; otherwise each module's full path. Short names
    are not derived for other module sets: PEFT applies them to every module of the model with that suffix, so they
    would widen an adapter that covers only some layers (resized, combined, layers_to_transform) when PEFT loads it.

    Ranks and alphas: the ``base`` config's r/lora_alpha/rank_pattern/alpha_pattern when they give every module its
    own (under PEFT's matching rule); else the commonest rank and alpha are r/lora_alpha and the others go into
    rank_pattern/alpha_pattern under the module's full (escaped) name, so no pattern can reach another module
    (verified below). ``target_parameters``: the pattern names among ``modules`` that are raw parameters
    (``<module>.<parameter>``, see params.parameter_factors) rather than modules."""
    ranks = {pattern_names[n]: m.rank for n, m in modules.items()}
    alphas = {pattern_names[n]: stored_alpha(m, rslora) for n, m in modules.items()}
    dora = {m.dora for m in modules.values()}
    if len(dora) > 1:
        raise FormatError("cannot write an adapter where only some modules are DoRA: PEFT's use_dora is one switch "
                          "for the whole adapter")
    lora_bias = {m.lora_bias is not None for m in modules.values()}
    if len(lora_bias) > 1:
        raise FormatError("cannot write an adapter where only some modules have a lora_B bias: PEFT's lora_bias is "
                          "one switch for the whole adapter")
    cfg = dict(base or {})
    kept = _patterns(cfg, ranks, alphas)
    if kept is None:
        r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
        lora_alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else 8
        rank_pattern = {re.escape(n): v for n, v in sorted(ranks.items()) if v != r}
        alpha_pattern = {re.escape(n): number(v) for n, v in sorted(alphas.items()) if v != lora_alpha}
        if _patterns({"r": r, "lora_alpha": lora_alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern},
                     ranks, alphas) is None:
            raise FormatError("cannot express a module's rank/alpha in a PEFT config without touching others")
        kept = r, lora_alpha, rank_pattern, alpha_pattern
    r, lora_alpha, rank_pattern, alpha_pattern = kept
    keep_targets = (targeted is not None and not target_parameters and not cfg.get("target_parameters")
                    and cfg.get("target_modules") and set(ranks) == targeted)
    targets = cfg.get("target_modules") if keep_targets else sorted(set(ranks) - set(target_parameters))
    for stale in ("megatron_config", "revision") if keep_targets else \
            ("layers_to_transform", "layers_pattern", "exclude_modules", "megatron_config", "revision"):
        cfg.pop(stale, None)
    cfg.update(
        peft_type="LORA", r=r, lora_alpha=number(lora_alpha), use_rslora=rslora, rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern, target_modules=targets,
        # (a raw parameter's share is transposed only as bound to a base that stores it in×out: PEFT has no such flag)
        fan_in_fan_out=any(m.fan_in_fan_out for m in modules.values() if m.raw_parameter is None),
        modules_to_save=modules_to_save(saved_modules, cfg.get("task_type")), use_dora=dora == {True},
        base_model_name_or_path=base_model, inference_mode=True,
    )
    if revision is not None:  # (the base's, Adapter.base_revision: the input's own or the commit loraops named)
        cfg["revision"] = revision
    if cfg.get("layers_pattern") and cfg.get("layers_to_transform") is None:
        # alone it selects nothing (PEFT reads it only to find the layer index layers_to_transform lists) and PEFT
        # 0.21's config refuses it, which older PEFT saved: the written config says what PEFT applied, nothing
        cfg["layers_pattern"] = None
    cfg.pop("target_parameters", None)
    if target_parameters:
        cfg["target_parameters"] = sorted(target_parameters)
    cfg["bias"] = cfg.get("bias") or "none"  # PEFT itself cannot load "bias": null (it reads it as a string)
    if lora_bias == {True} or cfg.get("lora_bias"):
        cfg["lora_bias"] = lora_bias == {True}
    cfg.setdefault("lora_dropout", 0.0)
    cfg.setdefault("task_type", None)
    cfg.setdefault("init_lora_weights", True)
    return dict(sorted(cfg.items()))


def _patterns(cfg: dict, ranks: dict[str, int], alphas: dict[str, float]):
    """(r, lora_alpha, rank_pattern, alpha_pattern) of ``cfg`` when they give every module its rank and alpha under
    PEFT's matching rule, else None. Alphas are compared to a float's rounding: a module's alpha is recovered from its
    scale (rsLoRA's 12.3/sqrt(8)·sqrt(8) is 12.300000000000002), and the config's own 12.3 gives that scale."""
    try:
        r, lora_alpha = cfg.get("r", MATH_FIELDS["r"]), cfg.get("lora_alpha", MATH_FIELDS["lora_alpha"])
        rank_pattern, alpha_pattern = dict(cfg.get("rank_pattern") or {}), dict(cfg.get("alpha_pattern") or {})
        for name in ranks:
            rk, ak = common.pattern_key(rank_pattern, name), common.pattern_key(alpha_pattern, name)
            if (rank_pattern[rk] if rk else r) != ranks[name] or \
                    not math.isclose(alpha_pattern[ak] if ak else lora_alpha, alphas[name], rel_tol=1e-12):
                return None
    except (TypeError, ValueError, re.error):  # a malformed config: rewritten
        return None
    return r, lora_alpha, rank_pattern, alpha_pattern


def factor_keys(module: LoraModule) -> tuple[str, str]:
    if module.kind == "embedding":
        return f"{module.name}.lora_embedding_A", f"{module.name}.lora_embedding_B"
    return f"{module.name}.lora_A.weight", f"{module.name}.lora_B.weight"


def full_tensor_keys(adapter: Adapter) -> dict[str, str]:
    """Where each full tensor goes in a PEFT file: a LoRA-adapted module's trained bias or whole weight under its
    wrapped ``base_layer`` (PEFT's bias="lora_only" and save_embedding_layers layouts); anything else as a
    modules_to_save tensor under its own name."""
    keys = tokens.saved_layer_keys(adapter)
    for name in adapter.full_tensors.keys() - keys.keys():
        module, _, param = name.rpartition(".")
        if module in adapter.modules:
            keys[name] = f"{module}.base_layer.{param}"
        else:
            keys[name] = name
    return keys


def module_tensors(module: LoraModule, prefix: str) -> list[tuple[str, "torch.Tensor"]]:
    """The factors of a LoRA on a module under their keys (a raw parameter's are params.parameter_factors'), and a
    DoRA module's magnitude in the shape PEFT stores it."""
    a_key, b_key = factor_keys(module)
    tensors = [(prefix + a_key, module.A), (prefix + b_key, module.B)]
    if module.dora:
        shape = common.magnitude_shape(module.kind, module.A.dim(), module.out_features)
        tensors.append((f"{prefix}{module.name}.lora_magnitude_vector", module.magnitude.reshape(shape)))
    if module.lora_bias is not None:
        tensors.append((f"{prefix}{module.name}.lora_B.bias", module.lora_bias))
    return tensors


def write(adapter: Adapter, modules: Iterable[LoraModule], tmp: Path, *, spill: bool,
          dtype: "torch.dtype | None" = None) -> dict[str, str]:
    """Write a PEFT folder into ``tmp`` (an empty folder the caller renames into place) from ``modules`` as they come
    (see common.ModuleStream; ``spill``: each one's tensors go to a scratch file, see st.TensorWriter); returns each
    file's sha256."""
    rslora = adapter.scale_mode == "rslora"
    keys = full_tensor_keys(adapter)
    # (PEFT's save_embedding_layers, not modules_to_save: listed there, a tied model's embeddings and head would load
    # as two wrapped copies, untied)
    layers = tokens.saved_layer_keys(adapter).keys() | embedding_layers_saved(adapter)
    # a bias saved without its layer's weight is a trained one (bias="all"), not a modules_to_save layer: PEFT loads
    # a saved module's every parameter, and fails on the missing weight
    biases_alone = {name for name, key in keys.items() if key == name and name.endswith(".bias")
                    and f"{name.removesuffix('.bias')}.weight" not in adapter.full_tensors}
    saved = sorted({name.rpartition(".")[0] for name, key in keys.items()
                    if key == name and name not in layers and name not in biases_alone})
    fused = {key for m in adapter.modules.values() if (key := params.parameter_group(m)) is not None}
    stream = common.ModuleStream(adapter, modules, params.parameter_group)
    with st.TensorWriter(tmp / WEIGHTS_NAME, spill=spill, dtype=dtype) as out:
        # first (the file's order is TensorWriter's): full tensors read as they are written (LazyTensors) are then
        # spilled and gone before the modules are computed, and a Derivation's report counts them in its peak RSS
        for name, key in keys.items():
            out.add(PREFIX + key, adapter.full_tensors[name])
        for group in stream:
            for module in group:
                stream.keep(module)
            if group[0].raw_parameter is None:
                factors = module_tensors(group[0], PREFIX)
            else:
                factors = [(f"{PREFIX}{module}.lora_{part}.weight", tensor) for module, pair in
                           params.parameter_factors(adapter.label, {m.name: m for m in group}, fused).items()
                           for part, tensor in zip("AB", pair, strict=True)]
            for key, tensor in factors:
                out.add(key, tensor)
        standalone = tokens.standalone(adapter)
        for name, key in tokens.tensor_keys(adapter.token_rows, standalone is not None, PREFIX).items():
            out.add(key, adapter.token_rows[name].values)
        written = stream.written(adapter.modules)
        parameters = params.parameter_patterns(adapter.label, written)
        targets = {**{n: m for n, m in written.items() if m.raw_parameter is None}, **parameters}
        cfg = lora_config(
            targets, {n: n for n in targets}, rslora=rslora, saved_modules=saved,
            base=lora_config_of(adapter.config) if adapter.format == "peft" else None, base_model=adapter.base_model,
            revision=adapter.base_revision,
            target_parameters=sorted(parameters), targeted=adapter.targeted if adapter.format == "peft" else None,
        )
        weights_sha256 = out.close({"format": "pt"})
    biases = [name for name, key in keys.items() if key.endswith(".base_layer.bias")]
    # a bias saved with its whole layer (save_embedding_layers: Phi's lm_head) says nothing about training biases
    trained = [name for name in biases if f"{name.rpartition('.')[0]}.weight" not in adapter.full_tensors]
    if biases_alone:
        cfg["bias"] = "all"
    elif trained:
        cfg["bias"] = cfg["bias"] if cfg["bias"] != "none" else "lora_only"
    elif not biases:
        cfg["bias"] = "none"
    cfg.pop("trainable_token_indices", None)
    if adapter.token_rows:
        cfg.update(tokens.config_fields(adapter.token_rows, adapter.config if adapter.format == "peft" else None))
    cfg = standalone or cfg
    text = (json.dumps(cfg, indent=2) + "\n").encode()
    (tmp / CONFIG_NAME).write_bytes(text)
    return {WEIGHTS_NAME: weights_sha256, CONFIG_NAME: hashlib.sha256(text).hexdigest()}
