"""mergekit merge configurations (YAML) read as a `combine`: the subset that means something for LoRA task vectors
over one base, mapped onto combine's methods and parameters as mergekit computes them; everything else is refused in
one line naming it (docs/recipes.md).

mergekit's semantics kept here (its config.py, merge_methods/registry.py and generalized_task_arithmetic.py):
- a model's parameter falls back to the top-level ``parameters`` (weight, density, gamma, epsilon there are every
  model's default);
- a model that is the ``base_model`` contributes no task vector (mergekit skips it), so listing it is harmless; it is
  the base however its path is written or linked (_is_base), where mergekit, comparing the text, reads a zero task
  vector;
- ``weight`` is required where mergekit requires it; ``density`` defaults to 1 (nothing dropped), and above 1 is 1
  (mergekit's sparsify keeps a task vector whole at any density ≥ 1);
- a model at a revision that is no registry version (``org/lora@v2``: mergekit's Hub revision) is refused in recipe
  terms (_refuse_hub_revision);
- ``rescale`` (default on for dare_* and della*, off for ties and breadcrumbs*) is its current rescale, the l1 norm
  of each task vector (``rescale_norm: l1``); off, DARE's and DELLA's survivors are kept undivided;
- ``task_arithmetic`` and ``linear`` are weighted sums (loraops' linear) with the weights folded: λ·wᵢ, and divided
  by Σw where they normalize;
- ``int8_mask`` changes only the dtype of mergekit's sign mask: accepted, it changes nothing;
- ``base_model`` is read as mergekit's ModelReference.parse reads a reference: ``PATH[@REVISION][+LORA[@REVISION]]``
  (model_reference) where it names no base as a whole; a base with a LoRA merged into it is no adapter's base, so
  it is refused (base_reference, called by derive.check_base_model, which knows the registry).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import InvalidInputError
from .fsutil import path_exists, read_small_file
from .references import PATH, WEIGHT, argument, is_finite
from .st import dtype_name

ELEMENT_WISE = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
DIVIDES_BY_DEFAULT = {"dare_ties", "dare_linear", "della", "della_linear"}
"""mergekit's methods whose ``rescale`` defaults to on."""


@dataclass(frozen=True)
class MethodSpec:
    """What a mergekit method takes: per-model parameters (with mergekit's required weight or not) and top-level
    ones, each top-level one mapped to combine's parameter name (None: accepted, no effect on the result)."""

    per_model: tuple[str, ...]
    top: dict[str, str | None]
    weighted: bool = True
    needs_base: bool = False


GTA_TOP = {"normalize": "normalize", "rescale": "rescale", "lambda": "lambda", "int8_mask": None}
METHODS: dict[str, MethodSpec] = {
    **{m: MethodSpec(("weight", "density") + (("gamma",) if m.startswith("breadcrumbs") else ())
                     + (("epsilon",) if m.startswith("della") else ()), GTA_TOP) for m in sorted(ELEMENT_WISE)},
    "task_arithmetic": MethodSpec(("weight",), {"normalize": "normalize", "lambda": "lambda", "int8_mask": None}),
    "linear": MethodSpec(("weight",), {"normalize": "normalize"}),
    "sce": MethodSpec((), {"select_topk": "select_topk", "int8_mask": None}, weighted=False),
    "nuslerp": MethodSpec(("weight",), {"nuslerp_flatten": "flatten", "nuslerp_row_wise": "row_wise"},
                          needs_base=True),
    "model_stock": MethodSpec((), {"filter_wise": "filter_wise"}, weighted=False, needs_base=True),
    "multislerp": MethodSpec(("weight",), {"normalize_weights": "normalize_weights", "eps": "eps"}, needs_base=True),
}
BOOLEAN = {"normalize", "rescale", "int8_mask", "nuslerp_flatten", "nuslerp_row_wise", "filter_wise",
           "normalize_weights"}
TENSOR_PARAMETERS = ("weight", "density", "gamma", "epsilon")
REFUSED_TOP = {
    "slices": "layer slices are not supported: a recipe combines whole adapters (list them under models)",
    "tokenizer_source": "tokenizer options have no meaning for a LoRA adapter",
    "tokenizer": "tokenizer options have no meaning for a LoRA adapter",
    "chat_template": "a chat template has no meaning for a LoRA adapter",
}
DTYPES = {"float32": False, "bfloat16": False, "float16": False, "float64": True}
"""mergekit's dtype → whether loraops computes in float64 (--precise); the others compute in float32 as always.
float64 is loraops' own (mergekit's dtype_from_name refuses it); its int64 is no dtype to compute a merge in.
Each name also with a ``torch.`` prefix (_read_dtype)."""
OUT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
"""mergekit's out_dtype (the float names its dtype_from_name reads, also with a ``torch.`` prefix: _read_dtype) →
combine's --dtype: the written adapter's dtype."""


@dataclass(frozen=True)
class ModelReference:
    """A model as mergekit names one (its ModelReference): a path or Hub id, the revision after ``@``, and the LoRA
    merged into it after ``+`` (as written, its own revision included)."""

    path: str
    revision: str | None = None
    lora: str | None = None


def model_reference(text: str) -> ModelReference:
    """``text`` read as mergekit's ModelReference.parse reads it (one ``+`` at most, one ``@`` in each part at
    most); what it cannot read is one InvalidInputError line."""
    parts = text.split("+")
    if len(parts) > 2:
        raise InvalidInputError(f"{text!r} has more than one '+' (mergekit reads MODEL+LORA)")
    for part in parts:
        path, at, revision = part.partition("@")
        if "@" in revision:
            raise InvalidInputError(f"{text!r}: more than one '@' in {part!r} (mergekit reads PATH@REVISION)")
        if not path or (at and not revision):
            raise InvalidInputError(f"{text!r}: an empty {'path' if not path else 'revision'} in {part!r}")
    path, _, revision = parts[0].partition("@")
    return ModelReference(path, revision or None, parts[1] if len(parts) == 2 else None)


def base_reference(text: str) -> ModelReference:
    """A recipe's ``base_model`` that names no base as a whole (registry names and folders may hold ``+``), read as
    mergekit reads it (model_reference); a base with a LoRA merged into it is refused: mergekit would take every task
    vector over that merged model, and each adapter's ΔW is over the base alone."""
    try:
        ref = model_reference(text)
    except InvalidInputError as exc:
        raise InvalidInputError(f"base_model {exc}") from None
    if ref.lora is not None:
        model = text.partition("+")[0]
        raise InvalidInputError(f"base_model {text!r} is {model} with the LoRA {ref.lora} merged into it (mergekit's "
                                "MODEL+LORA), which no adapter's ΔW is taken over: give the adapters' base alone "
                                f"(base_model: {model})")
    return ref


@dataclass(frozen=True)
class Recipe:
    """A mergekit configuration as combine's arguments."""

    merge_method: str
    """mergekit's name of the method."""
    method: str
    """combine's method."""
    inputs: list[tuple[str, float]]
    params: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    precise: bool = False
    dtype: str | None = None
    """combine's --dtype (bf16, fp16, fp32) from out_dtype; None: the inputs' widest."""
    source: str = "recipe"
    """Where the recipe was read (its path), as its refusals name it: derive.combine's ``recipe``."""


def read_recipe(path: str | Path, base_folders: Callable[[str], list[str]] | None = None) -> Recipe:
    """The recipe in a YAML file (``base_folders``: see parse_recipe); a file that cannot be read or parsed is one
    InvalidInputError line."""
    import yaml

    try:
        text = read_small_file(argument(path, "path", *PATH), "recipe").decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: cannot read the recipe ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InvalidInputError(f"{path}: not valid YAML{where}: {problem}") from None
    return parse_recipe(data, str(path), base_folders)


def parse_recipe(data: Any, source: str = "recipe", base_folders: Callable[[str], list[str]] | None = None) -> Recipe:
    """A parsed YAML document as a Recipe (see the module docstring); refusals name the key. ``base_folders``: the
    folders of the registered bases a base_model names (derive.registered_base_folders): a model entry that is one
    of them, by its own path, is the base too (the registry is the caller's: this reads no registry)."""
    def refuse(message: str) -> InvalidInputError:
        return InvalidInputError(f"{source}: {message}")

    if not isinstance(data, dict):
        raise refuse("a recipe is a mapping with merge_method and models (mergekit's format)")
    for key in data:
        if key in REFUSED_TOP:
            raise refuse(f"{key}: {REFUSED_TOP[key]}")
        if key not in ("merge_method", "models", "parameters", "base_model", "dtype", "out_dtype"):
            raise refuse(f"unknown key {key!r} (a recipe takes merge_method, models, parameters, base_model, dtype, "
                         "out_dtype)")
    name = data.get("merge_method")
    if not isinstance(name, str):  # (one given as 7 or [ties] was said to be missing)
        said = "is missing" if name is None else f"{name!r} is not a method's name"
        raise refuse(f"merge_method {said} (give one of " + ", ".join(METHODS) + ")")
    spec = METHODS.get(name)
    if spec is None:
        from .algebra import MERGEKIT_ONLY

        hint = MERGEKIT_ONLY.get(name)
        raise refuse(f"merge_method {name!r}: {hint}" if hint else
                     f"merge_method {name!r} is not supported for LoRA adapters (use one of {', '.join(METHODS)})")
    base_model = data.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        raise refuse("base_model must be a name or path (the adapters' base)")
    if spec.needs_base and base_model is None:
        raise refuse(f"{name} needs a base_model (mergekit's {name} without one works on whole weights, not on task "
                     "vectors): give the adapters' base")
    bases = [base_model, *(base_folders(base_model) if base_folders else [])] if base_model is not None else []
    dtype = _read_dtype(data, "dtype", DTYPES, refuse)
    written = _read_dtype(data, "out_dtype", OUT_DTYPES, refuse)

    top = _parameters(data.get("parameters"), "parameters", refuse)
    for key in top:
        if key not in spec.top and key not in spec.per_model:
            raise refuse(f"parameters: {name} takes no {key!r} (it takes {_takes(spec)})")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise refuse("models must be a list of {model: REF, parameters: {...}}")
    refs, entries, per_model, base_weights, listed, base_listed = [], [], [], [], set(), False
    for i, entry in enumerate(models, 1):
        where = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise refuse(f"{where}: give model: REF (a registry reference or a path to an adapter)")
        model = _adapter_of(entry["model"], bases)
        is_base = _is_base(model, bases)
        if (base_listed if is_base else model in listed):
            raise refuse(f"{where}: {entry['model']!r} is listed twice (mergekit merges a model once, with its first "
                         "entry's parameters): list it once")
        listed.add(model)
        base_listed = base_listed or is_base
        for key in entry:
            if key not in ("model", "parameters"):
                raise refuse(f"{where}: {key!r} is not supported (a model takes model and parameters)")
        own = _parameters(entry.get("parameters"), f"{where}.parameters", refuse)
        for key in own:
            if key not in spec.per_model:
                # (mergekit 2024's DELLA read lambda per model, the first model's; now it is top-level only)
                raise refuse(f"{where}.parameters: {name} takes no per-model {key!r}"
                             + (f" (it takes {', '.join(spec.per_model)})" if spec.per_model else "")
                             + (f": {key} is one value for the whole merge: move it under the top-level parameters"
                                if key in spec.top else ""))
        if is_base:
            # mergekit's task-vector methods skip the base; its linear averages it in: a zero task vector whose
            # weight still counts in Σw
            if name == "linear":
                weight = own.get("weight", top.get("weight"))
                if weight is None:
                    raise refuse(f"{where} (the base_model) has no weight: mergekit's linear averages it in and "
                                 "requires one")
                base_weights.append(float(weight))
            continue
        _refuse_hub_revision(entry["model"], model, where, refuse)
        refs.append(model)
        entries.append(where)
        per_model.append({key: own.get(key, top.get(key)) for key in spec.per_model
                          if own.get(key, top.get(key)) is not None})
    if name == "linear" and base_model is not None and not base_listed:
        # mergekit's planner adds it as a source without parameters: the top-level weight is its weight
        if top.get("weight") is None:
            raise refuse("base_model (not in models) has no weight: mergekit's linear averages it in and requires one "
                         "(list it under models with a weight, or give a top-level weight)")
        base_weights.append(float(top["weight"]))
    if not refs:
        raise refuse("models lists no adapter besides the base_model")
    for where, ref, own in zip(entries, refs, per_model, strict=True):
        if spec.weighted and "weight" not in own:
            raise refuse(f"{where} ({ref}) has no weight: mergekit's {name} requires one (per model or under "
                         "parameters)")

    weights = [float(own.get("weight", 1.0)) for own in per_model]
    params: dict[str, Any] = {}
    if "density" in spec.per_model:
        # mergekit's sparsify returns a task vector whole at any density ≥ 1: density 1, with its record
        params["density"] = [min(own.get("density", 1.0), 1.0) for own in per_model]
    for key in ("gamma", "epsilon"):
        if key in spec.per_model:
            # None: the method's default for that model (mergekit's, lowered where it does not fit); a model kept
            # whole (density 1) ignores its value, as mergekit's sparsify returns it before reading them
            values = [own.get(key) for own in per_model]
            if any(v is not None for v in values):
                params[key] = values
    for key, value in top.items():
        target = spec.top.get(key)
        if target is not None:
            params[target] = value
    method, weights = _mapped(name, params, weights, sum(base_weights), refuse)
    from .algebra import combine_arguments

    try:  # combine's own checks, naming each input by its entry (models[N] counts the base's entry too)
        combine_arguments(method, params, None, weights, names=entries)
    except InvalidInputError as exc:
        raise refuse(str(exc)) from None
    return Recipe(name, method, list(zip(refs, weights, strict=True)), params, base_model, DTYPES.get(dtype, False),
                  OUT_DTYPES.get(written), source)


def _read_dtype(data: dict, key: str, names: dict[str, Any], refuse: Callable[[str], InvalidInputError]) -> str | None:
    """The recipe's ``key`` (dtype, out_dtype) as a key of ``names``, read as mergekit's dtype_from_name reads it: a
    ``torch.`` prefix dropped, empty or missing being none (mergekit's field is a string: false, 0, [] are refused)."""
    value = data.get(key)
    if value is None or value == "":
        return None
    name = dtype_name(value) if isinstance(value, str) else None
    if name not in names:
        raise refuse(f"{key} {value!r} is not one of {', '.join(names)} (each also as torch.NAME, as mergekit reads "
                     "it)")
    return name


def _adapter_of(model: str, bases: list[str]) -> str:
    """The adapter a model entry names: mergekit's ``MODEL+LORA`` where MODEL is the base_model as the recipe writes
    it (that model with the LoRA merged in, whose task vector over the base is the LoRA's ΔW), else the entry as
    written (combine's REF: a registry name may hold '+', as combine's default names do), and a file or folder that
    exists under the whole text (an adapter saved as llama+style beside its base llama) is that one. ``bases``: the
    base_model and its registered folders ([] without a base_model)."""
    if not bases or "+" not in model or path_exists(model):
        return model
    try:
        ref = model_reference(model)
    except InvalidInputError:
        return model
    written = model.partition("+")[0]
    return ref.lora if _is_base(written, bases) else model


def unresolved_lora_hint(model: str, base_model: str | None) -> str | None:
    """What to say when a recipe's model entry names no adapter and reads as mergekit's ``MODEL+LORA`` over a model
    that is not the base_model (or with no base_model): only over the base_model is it the adapter LORA."""
    try:
        ref = model_reference(model)
    except InvalidInputError:
        return None
    if ref.lora is None:
        return None
    written = model.partition("+")[0]
    said = f"{model!r} is mergekit's MODEL+LORA, read as the adapter {ref.lora!r} only where MODEL is the base_model"
    if base_model is None:
        return (f"{said}, and the recipe gives none: give base_model: {written} (with linear, also a top-level "
                "weight: 0, which leaves the base out of the average)")
    return (f"{said} ({base_model}): over another model its task vector is no adapter's ΔW; write {ref.lora} or "
            f"{base_model}+{ref.lora}")


def _is_base(model: str, bases: list[str]) -> bool:
    """Whether a model entry names the base_model (or a registered folder of it, ``bases``): the same text however a
    path is written (``./x``, ``x/``), or the same file or folder (an absolute path, a link). mergekit compares the
    text, and reads a base written another way as one more model, whose task vector is zero (docs/recipes.md: where
    its weight would still count)."""
    for base in bases:
        if os.path.normpath(model) == os.path.normpath(base):
            return True
        with contextlib.suppress(OSError, ValueError):
            if Path(model).expanduser().samefile(Path(base).expanduser()):
                return True
    return False


def _refuse_hub_revision(written: str, model: str, where: str, refuse) -> None:
    """A model (or the LoRA of ``BASE+LORA``) at a revision that is no registry version (``org/lora@v2``, which
    mergekit reads as a Hub revision) is refused in recipe terms, before combine reads it as a bad version number; a
    file or folder of that name is read as it is. ``MODEL+LORA`` over another model than the base is read as mergekit
    reads it: a revision is its model's or its LoRA's."""
    if path_exists(model):
        return
    try:
        ref = model_reference(model)
    except InvalidInputError:
        return  # (what mergekit cannot read either: combine's REF says what is wrong)
    parts = [("model" if model == written else "LoRA", ref.path, ref.revision)]
    if ref.lora is not None:
        lora, _, lora_revision = ref.lora.partition("@")
        parts.append(("LoRA", lora, lora_revision))
    hub = [(what, name, revision) for what, name, revision in parts
           if revision and not (revision.isascii() and revision.isdigit())]
    if not hub:
        return
    what, name, revision = hub[0]
    pull = "" if "+" in model else f" (loraops pull {model} registers it)"  # (MODEL+LORA over another model: none)
    raise refuse(f"{where}: {written!r} names the {what} {name} at revision {revision!r}, a Hub revision (as mergekit "
                 f"reads it), which a recipe does not fetch: a recipe's {what} is a registry reference (NAME or "
                 f"NAME@VERSION, a version number) or a path{pull}")


def _takes(spec: MethodSpec) -> str:
    return ", ".join(dict.fromkeys([*spec.per_model, *spec.top])) or "no parameters"


def _parameters(values: Any, where: str, refuse) -> dict[str, Any]:
    """A parameters mapping with plain values: numbers (a number written as text, as YAML 1.1 reads 1e-2, is read as
    mergekit's pydantic reads it) and booleans; gradients (lists) and conditional values (mappings) are refused."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise refuse(f"{where} must be a mapping of names to values")
    out = {}
    for key, value in values.items():
        if isinstance(value, list) and any(isinstance(item, dict) for item in value):
            # mergekit's conditional values are a list of {filter: ..., value: ...} mappings
            raise refuse(f"{where}.{key}: conditional values (filter/value) are not supported: give one value")
        if isinstance(value, list):
            raise refuse(f"{where}.{key}: a gradient (a list of values across the layers) is not supported: give one "
                         "value")
        if isinstance(value, dict):
            raise refuse(f"{where}.{key}: conditional values (filter/value) are not supported: give one value")
        if key in BOOLEAN:
            if not isinstance(value, bool):
                raise refuse(f"{where}.{key} must be true or false (got {value!r})")
        elif isinstance(value, str) and WEIGHT.fullmatch(value):
            value = float(value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refuse(f"{where}.{key} must be a number (got {value!r})")
        if not isinstance(value, bool) and not is_finite(value):
            raise refuse(f"{where}.{key} must be a finite number (got {value!r})")
        out[key] = value
    return out


def _mapped(name: str, params: dict[str, Any], weights: list[float], base_weight: float,
            refuse) -> tuple[str, list[float]]:
    """combine's method and weights for mergekit's ``name``, ``params`` turned into combine's in place;
    ``base_weight``: linear's weight of the base, which counts in Σw."""
    from .ops.combine import zero_sum  # (here: reading a recipe needs no torch until this point)

    if name in ELEMENT_WISE:
        from .ops.combine import METHODS, normalize_refusal

        fields = METHODS[name].params.model_fields
        # combine's own refusal points at --no-normalize, which is refused beside --recipe
        if params.get("normalize", fields["normalize"].default) and (refusal := normalize_refusal(
                name, weights, "consensus" in fields, "give normalize: false", "use task_arithmetic")):
            raise refuse(refusal)
        rescale = params.pop("rescale", name in DIVIDES_BY_DEFAULT)
        if rescale:
            params["rescale_norm"] = "l1"
        elif name in DIVIDES_BY_DEFAULT:
            params["rescale"] = False
        return name, weights
    if name in ("task_arithmetic", "linear"):
        normalize = params.pop("normalize", name == "linear")
        factor = float(params.pop("lambda", 1.0))
        total = sum(weights) + base_weight
        if normalize:
            if name == "linear" and (zero := zero_sum([*weights, base_weight])):
                raise refuse(f"linear with normalize divides by the sum of the weights, which is {zero}")
            if name == "linear" or abs(total) >= 1e-8:  # mergekit's task_arithmetic leaves a sum below 1e-8 undivided
                factor /= total
        elif name == "linear" and abs(total - 1) > 1e-9:
            raise refuse(f"linear without normalize sums whole models (Σw·base + Σwτ), a task vector over the base "
                         f"only when the weights sum to 1 (they sum to {total:g})")
        return "linear", [w * factor for w in weights]
    if name == "multislerp" and params.get("normalize_weights", True) and (zero := zero_sum(weights)):
        # combine's own refusal points at --no-normalize-weights, which is refused beside --recipe
        raise refuse(f"multislerp with normalize_weights divides the weights by their sum, which is {zero}: give "
                     "other weights, or normalize_weights: false")
    if name == "nuslerp" and params.get("flatten", True):
        params.pop("row_wise", None)  # mergekit flattens before it looks at row_wise (combine refuses the pair)
    return name, weights
