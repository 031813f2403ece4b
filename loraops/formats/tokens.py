"""PEFT trainable tokens: some rows of an embedding (or of an untied head) replaced by trained values.

Two ways PEFT (>= 0.15) saves them, both read into ``Adapter.token_rows`` (loraops.adapter.TokenRows):
  * a LoRA with ``trainable_token_indices`` (a list: the input embeddings; or {module name: list}, names matched as
    PEFT's _set_trainable does: the module path ends with the key, as a plain string, see ``wraps``), keys
    ``base_model.model.<module>.token_adapter.trainable_tokens_delta``;
  * a TrainableTokensConfig adapter (peft_type TRAINABLE_TOKENS, ``token_indices`` for every targeted module), keys
    ``base_model.model.<module>.trainable_tokens_delta`` (a tied head is saved too, a copy of its embeddings' rows).
The stored tensor is, despite its name, no delta: PEFT's merge is ``W.index_copy(0, indices, values)``. A bare file
has no indices (they live only in adapter_config.json): refused.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ..adapter import TokenRows
from ..errors import FormatError, InvalidInputError
from ..st import dtype_name
from . import common

if TYPE_CHECKING:
    import torch

    from ..adapter import Adapter

EMBEDDING_LAYERS = ("embed_tokens", "lm_head")
"""PEFT's EMBEDDING_LAYER_NAMES: what save_embedding_layers saves whole (when the vocabulary was resized: the common
way to add tokens, which PEFT then saves with the tokens, ``<module>.token_adapter.base_layer.weight``)."""
TOKEN_KEY = re.compile(r"^(?P<module>.+?)\.(?P<wrapper>token_adapter\.)?trainable_tokens_delta$")
STANDALONE = "TRAINABLE_TOKENS"


def is_token_key(key: str) -> bool:
    return TOKEN_KEY.match(key) is not None


def wraps(module: str, entry: str) -> bool:
    """Does a trainable_token_indices key name ``module`` (its path)? PEFT's _set_trainable wraps every module whose
    path ends with the key as a plain string, not dot-bounded: "model.embed_tokens" also names a VLM's
    model.language_model.embed_tokens, where transformers 5 holds its language model's embeddings."""
    return module.endswith(entry)


def _indices(path: Path, where: str, value) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidInputError(f"{path}: config {where}={value!r} must be a non-empty list of token indices")
    bad = [i for i in value if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad:  # (the culprit, not a list of thousands)
        raise InvalidInputError(f"{path}: config {where} holds {bad[0]!r}, not a token index (an integer ≥ 0)")
    twice = next((i for i, count in Counter(value).items() if count > 1), None)  # (not value.count: quadratic)
    if twice is not None:
        raise InvalidInputError(f"{path}: config {where} lists token {twice} twice")
    return tuple(value)


def indices_for(path: Path, config: dict | None, module: str, key: str) -> tuple[int, ...]:
    """The token indices the config gives the module ``module`` (a path without base_model.model.)."""
    if config is None:
        raise InvalidInputError(f"{path}: trainable tokens ({key!r}) without an adapter_config.json: their token "
                                "indices are only in the config; read the PEFT folder")
    if is_standalone(config):
        return _indices(path, "token_indices", config.get("token_indices"))
    spec = config.get("trainable_token_indices")
    if isinstance(spec, dict):
        names = [name for name in spec if wraps(module, name)]
        if len(names) != 1:
            raise InvalidInputError(f"{path}: {key!r}: the config's trainable_token_indices name "
                                    f"{'no entry' if not names else 'several entries'} for module {module!r}")
        return _indices(path, f"trainable_token_indices[{names[0]!r}]", spec[names[0]])
    if spec is None:
        raise InvalidInputError(f"{path}: {key!r} holds trainable tokens but the config has no trainable_token_indices")
    return _indices(path, "trainable_token_indices", spec)


def canonical_indices(path: Path, keys: Iterable[str], config: dict, prefix: str):
    """``trainable_token_indices`` as loraops reads it against the file's keys, for the identity: the one list when
    every token tensor gets the same indices (what the list form says, so its identities stay as they were), else
    {module path: indices}. The list and dict spellings of the same rows are one adapter; a config that does not
    resolve is hashed as written (the reader refuses it)."""
    spec = config.get("trainable_token_indices")
    modules = [TOKEN_KEY.match(k.removeprefix(prefix))["module"] for k in keys if k.startswith(prefix) and is_token_key(k)]
    if not isinstance(spec, dict) or not modules:
        return spec
    try:
        given = {module: list(indices_for(path, config, module, "")) for module in sorted(modules)}
    except InvalidInputError:
        return spec
    lists = list(given.values())
    return lists[0] if all(v == lists[0] for v in lists) else given


def saved_layer_name(key: str, token_modules: frozenset[str]) -> str | None:
    """The base tensor a saved embedding layer beside trainable tokens replaces (``key`` without base_model.model.):
    a token module's wrapped weight (``<module>.token_adapter.base_layer.weight``, standalone ``<module>.base_layer.
    weight``), which PEFT loads before it puts the tokens in, or another embedding layer's weight saved whole."""
    for wrapper in (".token_adapter.base_layer.weight", ".base_layer.weight"):
        module = key.removesuffix(wrapper)
        if module != key and module in token_modules:
            return f"{module}.weight"
    module, _, param = key.rpartition(".")
    return key if param == "weight" and module.rpartition(".")[2] in EMBEDDING_LAYERS else None


def saved_layer_keys(adapter: "Adapter") -> dict[str, str]:
    """Where the saved embedding layers among an adapter's full tensors go in a PEFT file (tensor → key, without
    base_model.model.), as saved_layer_name reads them back; not modules_to_save (an adapter's own config may say a
    layer is one: it stays one), as the reader takes the config's (peft.saved_entries)."""
    if not adapter.token_rows:
        return {}
    from .peft import ScaleConfig, saved_entries

    saves = ScaleConfig(alpha=None, modules_to_save=saved_entries(adapter.config)).saves
    wrapper = "" if is_standalone(adapter.config) else "token_adapter."
    keys = {}
    for name in adapter.full_tensors:
        module = name.removesuffix(".weight")
        if name in adapter.token_rows:
            keys[name] = f"{module}.{wrapper}base_layer.weight"
        elif module != name and module.rpartition(".")[2] in EMBEDDING_LAYERS and not saves(module):
            keys[name] = name
    return keys


def is_standalone(config: dict) -> bool:
    """Is this a TrainableTokensConfig (peft_type TRAINABLE_TOKENS)?"""
    return str(config.get("peft_type") or "").upper() == STANDALONE


def read_rows(path: Path, keys: Iterable[str], tensors: dict[str, "torch.Tensor"], config: dict | None,
              prefix: str) -> dict[str, TokenRows]:
    """Validated TokenRows (base tensor name → rows) of the trainable-token keys among ``keys``."""
    rows = {}
    modules = {key: TOKEN_KEY.match(key.removeprefix(prefix))["module"] for key in keys}
    for key, module in modules.items():
        indices = indices_for(path, config, _tied_to(config, module, key, modules, tensors) or module, key)
        values = tensors[key]
        if values.dim() != 2 or values.shape[0] != len(indices) or not values.is_floating_point():
            raise InvalidInputError(f"{path}: {key!r} is {common.fmt_shape(values.shape)} "
                                    f"{dtype_name(values.dtype)}, not {len(indices)}×width floating "
                                    f"point (one row per token index in the config)")
        common.check_finite(path, key, values)
        rows[f"{module}.weight"] = TokenRows(f"{module}.weight", indices, values, key)
    return rows


def refuse_missing(path: Path, config: dict, rows: dict[str, TokenRows]) -> None:
    """Refuse a config whose trainable tokens (an entry of its trainable_token_indices dict, or its list) have no
    trainable_tokens_delta in the file: PEFT's load fails on it (a KeyError), and the LoRA merged without them is not
    the trained model. Not an entry with the same indices as one the file has: on a tied model PEFT ties that head's
    tokens to the embeddings' and saves only the embeddings' delta."""
    field = "token_indices" if is_standalone(config) else "trainable_token_indices"
    spec = config.get(field)
    if not spec:
        return
    modules = [name.removesuffix(".weight") for name in rows]
    entries = spec if isinstance(spec, dict) else {None: spec}
    saved = [indices for name, indices in entries.items()
             if any(name is None or wraps(module, name) for module in modules)]
    for name, indices in entries.items():
        if indices not in saved:
            raise InvalidInputError(f"{path}: the config's {field}{'' if name is None else f'[{name!r}]'} lists "
                                    "trainable tokens, but the file holds no trainable_tokens_delta for them: PEFT "
                                    "fails to load it, and merged without them it is not the trained model")


def _tied_to(config: dict | None, module: str, key: str, modules: dict[str, str],
             tensors: dict[str, "torch.Tensor"]) -> str | None:
    """The module whose trainable tokens ``module``'s are PEFT's tied copy of, where the config's
    trainable_token_indices (a dict) names no entry for ``module``: PEFT ties a tied model's head to the embeddings'
    tokens (their indices, one delta parameter) and saves the head's copy with save_embedding_layers. The one module
    the dict names whose saved rows are these, byte for byte; None otherwise."""
    import torch

    spec = (config or {}).get("trainable_token_indices")
    if not isinstance(spec, dict) or any(wraps(module, name) for name in spec):
        return None
    twins = [other for other_key, other in modules.items() if other_key != key
             and any(wraps(other, name) for name in spec)
             and tensors[other_key].shape == tensors[key].shape and torch.equal(tensors[other_key], tensors[key])]
    return twins[0] if len(twins) == 1 else None


def standalone(adapter: "Adapter") -> dict | None:
    """The TrainableTokensConfig to write ``adapter`` back with, when it is one (no LoRA modules, read from such a
    config): its own, as read. None: it is written as a LoRA with trainable_token_indices."""
    config = adapter.config if adapter.format == "peft" else {}
    if adapter.modules or adapter.full_tensors.keys() - saved_layer_keys(adapter).keys() or not is_standalone(config):
        return None
    indices = {r.indices for r in adapter.token_rows.values()}
    if indices != {tuple(config.get("token_indices") or ())}:
        raise FormatError(f"{adapter.label}: a TrainableTokensConfig has one token_indices for all its modules, and "
                          "this adapter's rows differ from its config's")
    return dict(config)


def tensor_keys(rows: dict[str, TokenRows], standalone: bool, prefix: str) -> dict[str, str]:
    """Where each TokenRows goes in a PEFT file (tensor name → key)."""
    wrapper = "" if standalone else "token_adapter."
    return {name: f"{prefix}{name.removesuffix('.weight')}.{wrapper}trainable_tokens_delta" for name in rows}


def config_fields(rows: dict[str, TokenRows], base: dict | None) -> dict:
    """The config field that gives ``rows`` their indices in a LoRA config: the adapter's own when it says exactly
    that (so an export is the file it came from), else {module path: indices}."""
    if base is not None and "trainable_token_indices" in base:
        try:
            same = all(indices_for(Path(), base, name.removesuffix(".weight"), "") == r.indices
                       for name, r in rows.items())
        except InvalidInputError:
            same = False
        if same:
            return {"trainable_token_indices": base["trainable_token_indices"]}
    return {"trainable_token_indices": {name.removesuffix(".weight"): list(r.indices) for name, r in rows.items()}}
