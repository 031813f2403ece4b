"""Adapter algebra: combine several adapters, resize one — validation and orchestration over loraops.ops.

All SVD work runs in float32 (float64 with ``precise``) on the chosen device, one module at a time; results are
cast back to the inputs' dtype on the CPU. Nothing here reads or writes files.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from . import ldm
from .adapter import Adapter, LoraModule, adapter_argument, weighted, widest_dtype
from .errors import InvalidInputError, MismatchError, ParameterError
from .lazy import LazyModule
from .references import flags_checked, is_integer
from .records import CombineInputRecord, CombineModuleRecord, CombineReport, ResizeModuleRecord, ResizeReport
from .st import dtype_name

if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")  # what annotations name resolves when they are read: lazy.py


def refuse_unknown_options(called: Callable, lazily: Callable, options: dict[str, Any]) -> None:
    """A keyword that ``called`` (combine, resize, extract, which pass ``options`` on to ``lazily``) does not take,
    refused as Python refuses one: naming the function the user called, not the one it passes them to."""
    known = inspect.signature(lazily).parameters
    for key in options:
        if key not in known:
            raise TypeError(f"{called.__name__}() got an unexpected keyword argument {key!r}")


def compute_precision(precise: bool):
    """(torch dtype, its name) the SVD work runs in: float64 with ``precise``, else float32."""
    import torch

    return (torch.float64, "float64") if precise else (torch.float32, "float32")


def _label(adapter: Adapter, index: int) -> str:
    return adapter.label if adapter.ref or adapter.path is not None else f"input {index + 1}"


def _check_bases(bases: Sequence[object], labels: Sequence[str]) -> None:
    """Refuse inputs that name two different bases (None: unknown, compatible with any)."""
    seen: dict[object, str] = {}
    for base, label in zip(bases, labels, strict=True):
        if base is not None:
            seen.setdefault(base, label)
    if len(seen) > 1:
        (base1, label1), (base2, label2) = list(seen.items())[:2]
        raise MismatchError(f"adapters are for different bases: {label1} is for {base1}, {label2} is for {base2}")


SUMS_BIASES = ("cat", "linear", "svd")
"""The combine methods whose result is Σ wᵢ·ΔWᵢ itself (up to --rank), for which the lora_bias of the result is
Σ wᵢ·sᵢ·lora_biasᵢ exactly."""


def _check_combinable(adapters: Sequence[Adapter], labels: Sequence[str], method: str) -> None:
    from .formats import lowrank
    from .formats.lycoris import described

    for adapter, label in zip(adapters, labels, strict=True):
        if adapter.lora_bias and method not in SUMS_BIASES:
            raise InvalidInputError(f"{label} has PEFT lora_bias (a bias on lora_B), which {method} does not define; "
                                    "combine it with cat or linear (the biases summed, weighted)")
        if adapter.products:
            raise InvalidInputError(f"{label} is {described(adapter)}: combine works on low-rank factors; make a LoRA "
                                    "of it first (loraops resize --rank K), or merge the adapters into the base in turn")
        if adapter.dora:
            raise InvalidInputError(
                f"{label} is a DoRA adapter, whose merge rescales each output channel by a norm of the base weights: "
                "a combination of it is no LoRA and no DoRA adapter, so combine refuses it; merge the adapters into "
                "the base in turn instead (loraops merge A B --into BASE)"
            )
        if adapter.token_rows:
            raise InvalidInputError(
                f"{label} has PEFT trainable tokens (rows of {', '.join(sorted(adapter.token_rows)[:3])} replaced by "
                "stored values); a weighted combination of replaced rows is not defined, so combine refuses them; "
                "merge the adapters into the base in turn instead (loraops merge A B --into BASE)"
            )
        if adapter.full_tensors:
            names = ", ".join(sorted(adapter.full_tensors)[:3])
            adapted = {m.weight_name for m in adapter.modules.values()}
            how = ("re-save it with PEFT's save_pretrained(..., save_embedding_layers=False) if the embeddings were "
                   "not resized" if adapted & adapter.full_tensors.keys() else "drop them from the adapter first")
            raise InvalidInputError(
                f"{label} carries full replacement tensors (modules_to_save or saved layers: {names}); a weighted "
                f"combination of replaced weights is not defined, so combine refuses them: {how}"
            )
        lowrank.refuse_unbound(adapter, label, "combined")
    if len({a.names_resolved for a in adapters}) > 1:
        raise MismatchError("some inputs have unresolved kohya module names: bind them to their base first")


def _check_module(name: str, modules: Sequence[tuple[str, LoraModule]]) -> None:
    (label0, first), *rest = modules
    for label, module in rest:
        if (module.kind, module.weight_shape, module.fan_in_fan_out) != (first.kind, first.weight_shape, first.fan_in_fan_out):
            raise MismatchError(
                f"module {name} differs between inputs: {first.kind} {tuple(first.weight_shape)} in {label0}, "
                f"{module.kind} {tuple(module.weight_shape)} in {label}"
            )
        if module.experts != first.experts:  # the fused experts parameter of two different models
            raise MismatchError(f"module {name} differs between inputs: a share of {first.experts} fused experts in "
                                f"{label0}, of {module.experts} in {label}")


@dataclass
class Derivation:
    """An adapter computed one module at a time, as it is asked for: what loraops.formats.write writes as it comes,
    so the whole result is never in memory (a combine of two 70B rank-64 adapters is 3.2 GB of bfloat16 factors).

    ``adapter`` is what is known before any module is computed: format, config, names, and its modules as stand-ins
    (the result's names, kinds and layouts without values, see LoraModule.stand_in; ranks are not final). Iterating
    yields the real modules (once; each checked finite as it is made), and sets ``report`` after the last;
    ``collect`` keeps them all, for callers that want the adapter in memory. A module the computation finds empty (an
    extract's delta that is exactly zero) is not yielded but named in ``dropped``, which the writers read."""

    adapter: Adapter
    compute: Iterator[LoraModule]
    summarize: Callable[[Adapter, float], Any]
    """The report, from the result (its modules as stand-ins) and the seconds spent computing."""
    seconds: float = 0.0
    """Spent computing so far (the writing in between not counted)."""
    report: Any = None
    dropped: set[str] = field(default_factory=set)

    def __iter__(self) -> Iterator[LoraModule]:
        if self.compute is None:
            raise InvalidInputError("a derivation's modules are computed once; make a new one to compute them again")
        compute, self.compute = self.compute, None
        done: dict[str, LoraModule] = {}
        baseline = 0  # resident bytes after the first module: the inputs and one module's work
        while True:
            started = time.perf_counter()
            module = next(compute, None)
            self.seconds += time.perf_counter() - started
            if module is None:
                break
            done[module.name] = module.stand_in()
            yield module
            del module
            resident = _rss()
            if not baseline:
                baseline = resident
            elif resident > baseline + TRIM_ABOVE:
                _release_freed_memory()
                baseline = max(baseline, _rss())
        modules = {name: done[name] for name in self.adapter.modules if name not in self.dropped}
        self.report = self.summarize(replace(self.adapter, modules=modules), self.seconds)

    def collect(self) -> tuple[Adapter, Any]:
        """(the result with all its modules, the report)."""
        modules = {module.name: module for module in self}
        return replace(self.adapter, modules={name: modules[name] for name in self.adapter.modules
                                              if name not in self.dropped}), self.report


TRIM_ABOVE = 128 << 20
"""How far the resident memory may grow past where the first module left it (the inputs and one module's work)
before _release_freed_memory. A call costs 5–7 ms, and the pages it gives back are faulted in again by the next
modules: after every module, a linear combine of two 20-layer 70B-shaped adapters (140 modules) took ~4 s longer
(16.6–16.9 s against 11.7–15.2 s never; peak 1.25 GB, against 1.54–1.89 GB never); past 64 MiB it ran ~50 times
(14.9–15.0 s, 1.27 GB), past 128 MiB 15–16 times (11.9–13.3 s, 1.31–1.32 GB)."""


def _rss() -> int:
    """Resident bytes of this process (0 where /proc is not)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None


def _release_freed_memory() -> None:
    """Give the memory of the modules written so far back to the system. glibc keeps freed blocks below its mmap
    threshold (which it raises itself, up to 32 MiB, as large blocks are freed) in its heaps, where each module's
    differently sized blocks fragment them: a combine's RSS grew by ~3 MB a module and ended near where holding the
    whole result would have (1.5–1.9 GB, run to run, for two 395 MiB inputs). malloc_trim returns the free pages."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def factorizing(what: str, name: str, precision: str, weights: Sequence[float] | None = None) -> Iterator[None]:
    """An SVD that fails is one line naming the module, as a result with NaN or Inf is (finite_module); it was a
    LinAlgError traceback. Its usual cause, NaN or Inf in what it factorizes, comes from weights × values beyond
    what the ``precision`` it computes in holds: said so, not as torch's "failed to converge". The inputs are finite
    (the readers refuse NaN and Inf), so in a combine (``weights``: the inputs', in order) it is their weighted sum
    that overflows, said with the weights that made it."""
    import torch

    from .ops.svd import NonFiniteInput

    try:
        yield
    except (torch.linalg.LinAlgError, NonFiniteInput) as exc:
        if isinstance(exc, NonFiniteInput) or "non-finite" in str(exc):
            hint = "; --precise computes in float64" if precision == "float32" else ""
            if weights is not None:
                raise InvalidInputError(f"{what}: module {name!r}: the weighted sum of its inputs overflows "
                                        f"{precision} (weights {', '.join(f'{w:g}' for w in weights)}{hint}), so it "
                                        "cannot be factorized") from None
            raise InvalidInputError(f"{what}: module {name!r}: its values go beyond what {precision} holds (weights "
                                    f"or values too large?{hint}), so it cannot be factorized") from None
        raise InvalidInputError(f"{what}: module {name!r}: its SVD failed ({str(exc).splitlines()[0]})") from None


def finite_module(what: str, module: LoraModule) -> LoraModule:
    """A module the algebra made, refused when its values are not all finite (factors beyond what the inputs' dtype
    holds): so what loraops writes of it is never read back to check (see Registry.register_adapter's ``written``)."""
    from .formats.common import check_finite

    try:
        for tensor in (module.A, module.B, *([] if module.lora_bias is None else [module.lora_bias])):
            check_finite(module.name, "", tensor)  # type: ignore[arg-type]
    except InvalidInputError:
        raise InvalidInputError(f"{what}: module {module.name!r} comes out with NaN or Inf values (beyond what "
                                f"{dtype_name(module.A.dtype)} holds?)") from None
    return module


def combine(inputs: Sequence[tuple[Adapter, float]], method: str, params: "dict[str, Any] | None" = None,
            **options) -> tuple[Adapter, CombineReport]:
    """``combine_lazily`` (same arguments), computed whole: (the adapter, its report)."""
    refuse_unknown_options(combine, combine_lazily, options)
    return combine_lazily(inputs, method, params, **options).collect()


def combined_format(formats: Iterable[str]) -> str:
    """The layout of a combination: the inputs' (``formats``) when they share one, else peft."""
    formats = set(formats)
    return formats.pop() if len(formats) == 1 else "peft"


@flags_checked
def combine_lazily(
    inputs: Sequence[tuple[Adapter, float]],
    method: str,
    params: "dict[str, Any] | None" = None,
    rank: int | None = None,
    device: "str | torch.device" = "auto",
    precise: bool = False,
    labels: Sequence[str] | None = None,
    bases: Sequence[object] | None = None,
    conv_rank: int | None = None,
    out_dtype: "torch.dtype | None" = None,
) -> Derivation:
    """Combine weighted adapters with ``method`` (see loraops.ops.combine.METHODS) into a new adapter at ``rank``
    (default: the method's — Σ ranks for linear/svd, the largest input rank for element-wise methods; cat
    always keeps Σ ranks); ``conv_rank``: the k×k convolutions' rank in place of ``rank`` (sd-scripts'
    svd_merge_lora.py --new_conv_rank). Output scale is 1 (alpha = rank, classic scaling). ``labels`` name the inputs in
    messages and the report (default: their paths). ``bases`` identify the inputs' bases (e.g. registry ids) for
    the same-base check; by default their base_model_name_or_path hints are compared. An expert's gate and up
    modules of a LoRA on fused MoE experts are combined jointly (``params.join_gate_up``), so they keep one A.
    Everything is checked now; the modules are computed as the Derivation is iterated. ``out_dtype``: the factors'
    dtype (default: the widest of the inputs'; float64 keeps what was computed, for a writer that converts it)."""
    import torch

    from .formats import out_dtype as torch_dtype_of, params as raw
    from .ops.combine import Context, Term
    from .ops.svd import factors_in
    from .settings import device_memory, in_order, resolve_device
    from .st import converted

    inputs = weighted(inputs, "combine")
    if not inputs:
        raise InvalidInputError("combine needs at least one adapter")
    arguments = combine_arguments(method, params, rank, [weight for _, weight in inputs], conv_rank)
    spec, parsed = arguments.spec, arguments.params
    owns = arguments.own or [None] * len(inputs)
    adapters = [adapter for adapter, _ in inputs]
    labels = list(labels) if labels is not None else [_label(a, i) for i, a in enumerate(adapters)]
    hints = [a.base_model.rstrip("/") if a.base_model else None for a in adapters]
    _check_bases(bases if bases is not None else hints, labels)
    _check_combinable(adapters, labels, method)
    if not any(a.modules for a in adapters):
        raise InvalidInputError("the inputs have no LoRA modules to combine")
    refuse_idle_conv_rank(conv_rank, [m for a in adapters for m in a.modules.values()], "the inputs have")
    halves: raw.Halves = {}
    for i, adapter in enumerate(adapters):  # the report still describes the inputs as given
        adapters[i], joined = raw.join_gate_up(adapter)
        halves.update(joined)
    present = {name: [(label, a.modules[name]) for a, label in zip(adapters, labels, strict=True) if name in a.modules]
               for name in sorted(set().union(*(a.modules for a in adapters)))}
    for name, modules in present.items():  # all refused before anything is computed
        _check_module(name, modules)
    templates = {name: modules[0][1] for name, modules in present.items()}
    if any(a.lora_bias for a in adapters):  # (PEFT's lora_bias is one switch: every module of the result has one)
        for name, modules in present.items():
            label, module = modules[0]
            if module.kind == "embedding" or module.raw_parameter is not None:  # (it would be written unreadable)
                where = "an embedding" if module.kind == "embedding" else "a raw parameter (target_parameters)"
                raise InvalidInputError(f"module {name!r} of {label} is on {where}, where the result's lora_bias (PEFT's "
                                        "one switch, set by an input with lora_bias) cannot be; combine them apart")
        templates = {name: replace(t, lora_bias=torch.zeros(t.out_features, dtype=t.dtype, device="meta"))
                     for name, t in templates.items()}

    started = time.perf_counter()
    target = resolve_device(device)
    dtype, precision = compute_precision(precise)
    out_dtype = torch_dtype_of(out_dtype) or widest_dtype(*(adapter.dtype for adapter in adapters))
    result = raw.split_gate_up(Adapter(
        modules={name: template.stand_in() for name, template in templates.items()},
        format=combined_format(a.format for a in adapters), base_model=next((h for h in hints if h), None),
        # (that input's)
        base_revision=next((a.base_revision for a, h in zip(adapters, hints, strict=True) if h), None),
        # the PEFT writer keeps the non-math fields of this config (task_type, ...) and rewrites the rest
        config=dict(adapters[0].config), scale_mode="classic", names_resolved=adapters[0].names_resolved,
        own_names=own_names(templates, adapters),
        # the base's version (SDXL's UNet has kohya names of its own), and the DiT a pipeline holds (its transformer's
        # kohya names are the checkpoint's), where every input says the same
        metadata={k: v for k in (*ldm.VERSION_KEYS, ldm.DIT_LAYOUT_KEY, ldm.DIT_BARE_KEY)
                  if (v := adapters[0].metadata.get(k)) and all(a.metadata.get(k) == v for a in adapters)},
    ), halves)
    records: list[CombineModuleRecord] = []
    what = f"{method} of {', '.join(labels)}"

    def made_of(name: str, template: LoraModule):
        B0, A0 = template.matrices()
        terms = []
        for adapter, (_, weight), own in zip(adapters, inputs, owns, strict=True):
            module = adapter.modules.get(name)
            if module is None:  # a zero delta: rank-0 factors
                B2, A2, scale = B0[:, :0], A0[:0], 0.0
            else:
                (B2, A2), scale = module.matrices(), module.scale
            terms.append(Term(B2.to(device=target, dtype=dtype), A2.to(device=target, dtype=dtype), scale,
                              float(weight), own))
        ranks = [m.rank for _, m in present[name]]
        k = (conv_rank if template.spatial and conv_rank else rank) or (
            spec.default_rank(ranks) if spec.default_rank else sum(ranks))
        with factorizing(what, name, precision, [float(weight) for _, weight in inputs]):
            made = spec.run(terms, parsed, k, Context(name, (B0.shape[0], A0.shape[1]), exact=precise,
                                                         transposed=template.transposed))
        return made, *factors_in(made.B, made.A, out_dtype)

    def computed(name: str):
        with device_memory(target, f"computing module {name!r} of the {what}", precise):
            return name, *made_of(name, templates[name])

    def dense_elements(name: str) -> int:
        B0, A0 = templates[name].matrices()
        return B0.shape[0] * A0.shape[1]

    def compute() -> Iterator[LoraModule]:
        # a method that factorizes runs its modules ahead on the threads, each SVD on one (single_threaded); cat
        # (default_rank None: no SVD) only copies factors, where handing modules to threads cost more than it saved
        made_in_order = in_order(templates, computed, dense_elements, target) if spec.default_rank else map(
            computed, templates)
        for name, made, B, A in made_in_order:
            template = templates[name]
            new_rank = int(made.A.shape[0])
            module = template.with_factors(B, A, alpha=float(new_rank), scale=1.0)
            if module.lora_bias is not None:  # scale 1: Σ wᵢ·sᵢ·lora_biasᵢ
                bias = sum((float(weight) * m.scale * m.lora_bias.to(torch.float64)
                            for (_, weight), a in zip(inputs, adapters, strict=True)
                            if (m := a.modules.get(name)) is not None and m.lora_bias is not None),
                           torch.zeros(template.out_features, dtype=torch.float64))
                module.lora_bias = converted(bias, out_dtype)
            module = finite_module(what, module)
            records.append(CombineModuleRecord(name=name, rank=new_rank, spatial=template.spatial,
                                               inputs=len(present[name]), svd=made.svd, error=made.error,
                                               zero=not (made.B.any() and made.A.any())))
            del made, B, A  # not kept while the module is written
            yield from raw.split_joined(module, halves)

    def summarize(combined: Adapter, seconds: float) -> CombineReport:
        errors = [r.error for r in records]
        return CombineReport(
            method=method, params=arguments.record(), rank=rank, conv_rank=conv_rank,
            inputs=[CombineInputRecord(ref=label, weight=float(w), rank=a.rank, modules=len(a.modules))
                    for (a, w), label in zip(inputs, labels, strict=True)],
            device=str(target), precision=precision, modules=records, error_max=max(errors),
            error_mean=sum(errors) / len(errors), parameters=combined.num_parameters, seconds=seconds,
        )

    return Derivation(result, compute(), summarize, seconds=time.perf_counter() - started)


def mean(values: Iterable[float]) -> float | None:
    """Their mean; None when there are none."""
    values = list(values)
    return sum(values) / len(values) if values else None


def own_names(modules: dict[str, LoraModule], adapters: Sequence[Adapter]) -> dict[str, str]:
    """The combined adapter's own name for each module: that of the first input holding the module (an input whose
    names needed no renaming has no entries, and must still win over a later one's)."""
    names = {}
    for name in modules:
        own = next(a.own_names.get(name, name) for a in adapters if name in a.modules)
        if own != name:
            names[name] = own
    return names


def _scales_with_weights(spec, params: dict[str, Any]) -> bool:
    """Whether multiplying every weight by λ multiplies the method's result by λ with these parameters (λ·Σwτ = Σ(λw)τ;
    with normalize on, the weights divide out)."""
    normalize = spec.params.model_fields.get("normalize")
    return spec.weights_scale and not params.get("normalize", normalize is not None and normalize.default)


PER_INPUT = ("density", "gamma", "epsilon")
"""The parameters an element-wise method takes per input (mergekit's per-model parameters, beside the weight): a
list of one value per input in place of one value for all."""


@dataclass(frozen=True)
class CombineArguments:
    """combine's checked arguments: the method, its parameters and, where density, gamma or epsilon differ between
    the inputs, each input's own."""

    spec: Any
    params: Any
    """The method's parameters (with the first input's own values where they differ per input)."""
    own: list | None = None
    """Each input's parameters (``Term.params``), or None when every input takes ``params``."""

    def record(self) -> dict[str, Any]:
        """The parameters as the report and the lineage record them: one value each, or the list of each input's
        where they differ (the same record as before per-input values existed when they do not)."""
        data = self.params.model_dump()
        for key in set(PER_INPUT) & set(data) if self.own else ():
            values = [own.model_dump()[key] for own in self.own]
            if any(v != values[0] for v in values):
                data[key] = values
        return data


def _per_input(given: dict[str, Any], count: int) -> dict[str, list]:
    """The PER_INPUT parameters given as lists, checked against the number of inputs; a list of one repeated value
    is that value, None in a list that input's default (``given`` is changed in place: so one computation has one
    record and one result)."""
    lists = {}
    for key in PER_INPUT:
        values = given.get(key)
        if not isinstance(values, (list, tuple)):
            continue
        if len(values) != count:
            raise InvalidInputError(f"{key} has {len(values)} values for {count} adapters: give one value, or one "
                                    "per adapter")
        if all(v == values[0] for v in values):
            given[key] = values[0]
            if values[0] is None:
                del given[key]
        else:
            lists[key] = list(values)
            del given[key]
    return lists


MERGEKIT_ONLY = {
    "task_arithmetic": "mergekit's task_arithmetic is linear here (λ·Σ wᵢτᵢ: fold lambda into the weights; "
                       "combine --recipe reads a task_arithmetic recipe)",
    "slerp": "mergekit's slerp interpolates whole weights (from the base_model's at t = 0), which no LoRA holds: "
             "nuslerp interpolates two adapters' task vectors (mergekit's nuslerp with a base_model)",
    "karcher": "mergekit's karcher averages whole weights, which no LoRA holds: multislerp averages the adapters' "
               "task vectors on the sphere (mergekit's multislerp with a base_model)",
}
"""mergekit's method names that are no combine method, with what to use instead."""


def combine_arguments(method: str, params: "dict[str, Any] | None", rank: int | None,
                      weights: Sequence[float] = (), conv_rank: int | None = None,
                      names: Sequence[str] | None = None) -> CombineArguments:
    """The checked arguments of combine alone — callers that register inputs first (loraops.derive) call it before
    touching anything. density, gamma and epsilon may be lists of one value per input (``weights``); ``names``: how
    an error names each input (default "adapter N"; a recipe's entries are its models[N])."""
    from .ops.combine import METHODS, normalize_refusal
    from .ops.params import parameter_names, parse_params

    # (a list for the method was a raw TypeError: unhashable)
    spec, hint = (METHODS.get(method), MERGEKIT_ONLY.get(method)) if isinstance(method, str) else (None, None)
    if spec is None:
        raise InvalidInputError(f"unknown combine method {method!r}: "
                                + (f"{hint}" if hint else f"use one of {', '.join(METHODS)}"))
    if params is not None and not isinstance(params, Mapping):  # (dict() of a list or a string: a raw TypeError)
        raise InvalidInputError(f"params is a dict of {method}'s parameters (like {{'density': 0.5}}), not {params!r}")
    given = dict(params or {})
    for key in given:  # a parameter of other methods: say which, rather than "unknown parameter"
        takers = [m.name for m in METHODS.values() if key in parameter_names(m.params)]
        if takers and key not in parameter_names(spec.params):
            hint = "; scale the weights instead" if key == "lambda" and _scales_with_weights(spec, given) else ""
            raise ParameterError(f"{method} takes no `{key}` (it is a parameter of {', '.join(takers)}){hint}", [key])
    lists = _per_input(given, len(weights))
    own = [parse_params(spec.params, {**given, **{key: values[i] for key, values in lists.items()
                                                  if values[i] is not None}},
                        f"{method} ({names[i] if names else f'adapter {i + 1}'})")
           for i in range(len(weights))] if lists else None
    parsed = own[0] if own else parse_params(spec.params, given, method)
    if spec.check_weights is not None:
        spec.check_weights(method, list(weights), parsed)
    for what, given in (("rank", rank), ("conv_rank", conv_rank)):
        if given is not None and (not is_integer(given) or given <= 0):
            raise ParameterError(f"`{what}` must be a positive integer (got {given!r})", [what])
        if given is not None and spec.default_rank is None:
            # (cat is combine's default method: `combine a b --rank 8` without --method lands here)
            raise ParameterError(f"{method} (combine's default `method`) keeps every input's rank (their sum), so it "
                                 f"takes no `{what}`: give `method` linear with `{what}` to truncate", [what, "method"])
    if getattr(parsed, "normalize", False) and (refusal := normalize_refusal(
            method, weights, "consensus" in spec.params.model_fields, "use `normalize=False`", "the linear method")):
        raise ParameterError(refusal, ["normalize"])
    return CombineArguments(spec, parsed, own)


def resize_rule(rank: int | None = None, dynamic: str | None = None, param: float | None = None,
                max_rank: int | None = None, conv_rank: int | None = None, what: str = "resize"):
    """resize's rank rule (extract's too: ``what`` names the command in the error), checked (see combine_arguments)."""
    from .ops.params import parse_params
    from .ops.resize import RankRule

    return parse_params(RankRule, {"rank": rank, "dynamic": dynamic, "param": param, "max_rank": max_rank,
                                   "conv_rank": conv_rank}, what)


def refuse_idle_conv_rank(conv_rank: int | None, modules: Iterable[LoraModule], label: str) -> None:
    """A conv_rank where no module is a k×k convolution would change nothing: refused (resize, extract, combine;
    ``label`` says who has none: "X has")."""
    if conv_rank is not None and not any(m.spatial for m in modules):
        raise InvalidInputError(f"conv rank {conv_rank}: {label} no k×k convolution (a conv with a kernel "
                                "larger than 1×1) for it to rank")


def resize(adapter: Adapter, **options) -> tuple[Adapter, ResizeReport]:
    """``resize_lazily`` (same arguments), computed whole: (the adapter, its report)."""
    refuse_unknown_options(resize, resize_lazily, options)
    return resize_lazily(adapter, **options).collect()


@flags_checked
def resize_lazily(
    adapter: Adapter,
    rank: int | None = None,
    dynamic: str | None = None,
    param: float | None = None,
    max_rank: int | None = None,
    conv_rank: int | None = None,
    device: "str | torch.device" = "auto",
    precise: bool = False,
    out_dtype: "torch.dtype | None" = None,
) -> Derivation:
    """Lower the rank of every module: to ``rank``, or by a kohya ``dynamic`` rule (sv_ratio, sv_cumulative,
    sv_fro) with ``param``, capped at ``max_rank`` and at each module's own rank; ``conv_rank`` is the k×k
    convolutions' rank in place of ``rank`` (their cap in place of ``max_rank``: RankRule). The scale of every module is
    kept (alpha follows), so each delta becomes its best approximation at the new rank. Modules already at or
    below ``rank`` keep their rank (re-orthogonalized, same delta). An expert's gate and up modules of a LoRA on
    fused MoE experts are resized jointly (``params.join_gate_up``), so they keep one A; such an adapter needs a fixed
    ``rank`` (PEFT's wrapper has one rank for all experts, which a dynamic rule would not keep). Everything is
    checked now; the modules are computed as the Derivation is iterated. A DoRA module keeps its magnitude as it is:
    its merge takes the norms of W + the new ΔW (as PEFT does), so each output channel keeps its learned norm and only
    the direction's update is truncated. ``out_dtype``: the factors' dtype (default: each module's), as combine's."""
    from .formats import lowrank, out_dtype as torch_dtype_of, params as raw
    from .formats.peft import lora_config_of
    from .ops.resize import resize_module
    from .settings import device_memory, in_order, resolve_device

    rule, out_dtype = resize_rule(rank, dynamic, param, max_rank, conv_rank), torch_dtype_of(out_dtype)
    if not adapter_argument(adapter, "resize").modules:
        raise InvalidInputError(f"{_label(adapter, 0)} has no LoRA modules to resize")
    # (a LoHa/LoKr module becomes a LoRA of any rank up to its ΔW's: the SVD of its dense ΔW, see resize_module)
    flat = next((m for m in adapter.modules.values() if m.product is not None and not m.product.kernel_known), None)
    if flat is not None:
        raise InvalidInputError(f"{_label(adapter, 0)}: module {flat.name!r} of a LoHa/LoKr adapter is stored "
                                "flattened (out × in·k…), so only its base says whether it is a Linear or a convolution: "
                                "register it against its base (--base) to resize it")
    lowrank.refuse_unbound(adapter, _label(adapter, 0), "resized")
    refuse_idle_conv_rank(rule.conv_rank, adapter.modules.values(), f"{_label(adapter, 0)} has")
    if rule.dynamic is None:  # resize only lowers rank (a dynamic rule's caps may be above any rank)
        lora = [m for m in adapter.modules.values() if m.product is None]
        for what, given, ranks, group in (
                ("rank", rule.rank, "rank", [m for m in lora if rule.conv_rank is None or not m.spatial]),
                ("conv rank", rule.conv_rank, "k×k convolutions' rank", [m for m in lora if m.spatial])):
            current = max((m.rank for m in group), default=None)
            if given is not None and current is not None and given > current:
                raise InvalidInputError(f"{what} {given} is above the adapter's {ranks} {current}: resize only lowers "
                                        "rank")
    shared = next((m for m in adapter.modules.values() if m.experts > 1), None)
    if shared is not None and rule.dynamic is not None:
        raise ParameterError(f"{_label(adapter, 0)}: a LoRA on the fused experts {shared.raw_parameter[0]} has one "
                             "rank for all experts, which a dynamic rule would not keep: give `rank`", ["rank"])
    what = f"resize of {_label(adapter, 0)}"
    adapter, halves = raw.join_gate_up(adapter)

    started = time.perf_counter()
    target = resolve_device(device)
    dtype, precision = compute_precision(precise)
    result = raw.split_gate_up(replace(adapter, modules={n: replace(m.stand_in(), product=None)
                                                         for n, m in adapter.modules.items()},
                                       path=None, config=lora_config_of(adapter.config)), halves)
    records = []

    def computed(module: LoraModule) -> tuple[LoraModule, ResizeModuleRecord]:
        # an expert's share keeps the rank even when it is zero: PEFT's wrapper has one rank for all experts
        with device_memory(target, f"computing module {module.name!r} of the {what}", precise), \
                factorizing(what, module.name, precision):
            return resize_module(module, rule, adapter.scale_mode, target, dtype, keep_zero_rank=module.experts > 1,
                                 exact=precise, out=out_dtype)

    def compute() -> Iterator[LoraModule]:
        # a LoHa/LoKr module's dense ΔW is factorized by an SVD on one thread (ops.svd.single_threaded), so such an
        # adapter's modules run ahead on the threads; a LoRA's factored SVD takes less than handing it to a thread
        modules = adapter.modules.values()
        made_in_order = in_order(modules, computed, lambda m: math.prod(m.weight_shape), target) if any(
            m.product is not None for m in modules) else map(computed, modules)
        for resized, record in made_in_order:
            records.append(record)
            yield from raw.split_joined(finite_module(what, resized), halves)

    def summarize(resized: Adapter, seconds: float) -> ResizeReport:
        counted = [r for r in records if not r.zero] or records  # (kohya's average leaves out its 0/0 of a zero B·A)
        return ResizeReport(
            rank=rule.rank, dynamic=rule.dynamic, param=rule.param, max_rank=rule.max_rank, conv_rank=rule.conv_rank,
            device=str(target),
            precision=precision, modules=records,
            fro_retained_mean=sum(r.fro_retained for r in counted) / len(counted),
            sum_retained_mean=mean(r.sum_retained for r in counted if r.sum_retained is not None),
            parameters_before=adapter.num_parameters, parameters_after=resized.num_parameters, seconds=seconds,
        )

    return Derivation(result, compute(), summarize, seconds=time.perf_counter() - started)
