"""A LoRA adapter extracted from the difference between a fine-tuned model and its base (`loraops extract`).

Per weight W that differs, D = W_tuned − W_base is formed in float32 (float64 with ``precise`` or an F64 model), one
tensor at a time, and factorized at the rank a RankRule gives (a fixed rank, or kohya's dynamic rules on D's singular values) with the
algebra's SVD code: B = U_k·diag(S_k), A = V_kᵀ (S on B, as resize and combine put it), so D ≈ B·A, the best rank-k
approximation (Eckart–Young). alpha defaults to each module's rank (scale 1); with ``alpha`` given, B is divided by
the scale alpha/k so that the delta stays the same.

Layouts (LoraModule's): a Linear's D (out×in) is B·A; a GPT-2 Conv1D's (in×out) and an Embedding's
(num_embeddings×dim) are (B·A)ᵀ; a k×k Conv's (out×in×kh×kw) flattened to out×(in·kh·kw) is B·A, stored LoCon-style
(A k×in×kh×kw, B out×k×1×1).

Which tensors: which differ comes from the per-tensor sha256 digests of the fingerprint (cached per file: the
registry needs them anyway), and, when the two models store a tensor in different dtypes, from its values; there,
a tensor whose every difference is within the rounding between the two dtypes is the same model saved in another
dtype and is left out (reported; refused when it is all that differs), unless ``keep_rounding``.
Targets are every 2-D / conv ``.weight`` that differs, embeddings only when asked for (``modules``: an embedding
LoRA, PEFT's lora_embedding_A/B); ``save_modules`` stores modules whole (PEFT modules_to_save). A fused tensor no
module holds whole is one module per part, each factorized on its rows (_modules_of, ldm.split: OpenCLIP's
in_proj_weight is q_proj, k_proj, v_proj; DINOv2's weights_in gate_proj, up_proj); a MoE router is a LoRA on its
weight parameter (PEFT target_parameters). Tensors that differ and are none of these (norms, biases, embeddings not
asked for) are reported, never silently dropped. A target whose delta turns out exactly zero (bytes that differ only
in signed zeros; a part whose rows are unchanged) is dropped, and a weight none of whose modules is left is counted
identical; NaN or Inf in a tensor that is read, and quantized weights, are refused.
A single-file SD/SDXL/FLUX/SD3 checkpoint's adapter is a kohya one (sd-scripts' names) by default; as PEFT, one that
holds OpenCLIP's q/k/v parts is refused as it is written (no model PEFT wraps has them as modules).
Nothing here registers or writes: see loraops.derive.extract.
"""
from __future__ import annotations

import functools
import math
import os
import re
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from . import ldm, st
from .adapter import Adapter, LazyTensors, LoraModule
from .basemodel import BaseModel
from .check import EXPERT_RE, conv1d_layout, is_embedding, memory_names, tied_head_source, untied_side_source
from .lazy import LazyModule
from .errors import InvalidInputError, MismatchError, UnsupportedAdapterError
from .formats import peft_unwritable_parts, refuse_misnamed, refuse_unwritable
from .formats.common import conv1d_named, given_alpha, names_module, shown
from .fp8 import FLOAT_DTYPES, describe
from .records import ExtractModuleRecord, ExtractReport, ExtractSkippedRecord
from .references import PATH, argument, flags_checked, name_list

if TYPE_CHECKING:
    import torch

    from . import algebra
else:
    torch = LazyModule("torch")  # what annotations name resolves when they are read: lazy.py
    algebra = LazyModule("loraops.algebra")

PRECISION = {"F64": (52, -1022), "F32": (23, -126), "F16": (10, -14), "BF16": (7, -126)}
"""(mantissa bits, smallest normal exponent) of each float dtype: its spacing (ulp) at x is
2^(max(⌊log2 |x|⌋, emin) − bits), subnormals included."""


@dataclass
class Plan:
    """What an extract will do, decided from the headers and the tensor digests before any value is computed."""

    targets: dict[str, LoraModule]
    """module name → a stand-in (rank-1 factors on the meta device: its kind and layout) of the module to make."""
    saved: list[str]
    """Tensors stored whole (modules_to_save)."""
    skipped: list[tuple[str, str]]
    """(tensor, why) of the tensors that differ but are not extracted."""
    identical: int
    rounding: list[ExtractSkippedRecord]
    """Tensors the two models store in other dtypes that differ only by the rounding between those (left out unless
    keep_rounding)."""
    rounding_targets: list[str] = field(default_factory=list)
    """Of ``rounding``, the weights keep_rounding would extract: those the selection takes (not norms, biases,
    embeddings not asked for, weights outside --modules, a checkpoint's VAE)."""


def _open(model: "str | Path | BaseModel", name: str) -> BaseModel:
    return model if isinstance(model, BaseModel) else BaseModel.open(argument(model, name, *PATH))


@dataclass
class _Untying(BaseModel):
    """A base that ties its output head to its input embeddings (and so does not store it), as a fine-tune that
    untied the head is compared with it: the head under its own name, holding the embeddings' bytes. That is the
    weight the tied model's head reads, to which PEFT's LoRA on the head adds its delta (leaving the embeddings'
    lookup alone), and from which a merge writes the head untied (engine.untied_head_source): D = W_head(tuned) −
    W_embeddings(base)."""

    heads: dict[str, str] = field(default_factory=dict)
    """head → the embeddings it reads."""

    def tensor_digests(self, progress: bool | None = None) -> dict[str, str]:
        digests = super().tensor_digests(progress)
        return {**digests, **{head: digests[embeddings] for head, embeddings in self.heads.items()}}


def _untied(base: BaseModel, tuned: BaseModel) -> BaseModel:
    """``base`` with the heads it ties (not stored) that ``tuned`` stores, as _Untying; ``base`` itself when none."""
    from .engine import untied_head_source

    # (and one side's embed_tokens a merge wrote apart from the shared embeddings: check.untied_side_source)
    heads = {n: e for n in sorted(tuned.tensors.keys() - base.tensors.keys())
             if (e := untied_head_source(base, n, tuned.tensors[n].shape)
                 or untied_side_source(n, tuned.tensors[n].shape, base.tensors, base.config)) is not None}
    if not heads:
        return base
    view = _Untying(**{f.name: getattr(base, f.name) for f in fields(BaseModel)}, heads=heads)
    view.tensors = {**base.tensors, **{head: replace(base.tensors[e], name=head) for head, e in heads.items()}}
    return view


def _kind(name: str, shape: Sequence[int], conv1d: bool) -> tuple[str, bool] | None:
    """(LoRA kind, fan_in_fan_out) of a weight that can hold a LoRA (or whose parts can: ldm.split), None for anything
    else."""
    if len(shape) < 2 or not (name.endswith(".weight") or ldm.split(name, shape)):
        return None
    if len(shape) > 2:
        return "conv", False
    if is_embedding(name):
        return "embedding", False
    return "linear", conv1d and conv1d_named(name.removesuffix(".weight"))


def _stand_in(name: str, shape: Sequence[int], kind: str, fan_in_fan_out: bool, dtype: "torch.dtype",
              **where) -> LoraModule:
    import torch

    out, rest = shape[0], tuple(shape[1:])
    if kind == "embedding" or fan_in_fan_out:  # W holds (B·A)ᵀ
        out, rest = shape[1], (shape[0],)
    A = torch.empty((1, *rest), dtype=dtype, device="meta")
    B = torch.empty((out, 1, *[1] * (len(rest) - 1)), dtype=dtype, device="meta")
    return LoraModule(name, A=A, B=B, alpha=1.0, scale=1.0, kind=kind, fan_in_fan_out=fan_in_fan_out,  # type: ignore[arg-type]
                      **where)


_ROUTER = re.compile(r"^(?P<owner>.+)\.(?:gate|router)\.weight$")
_EXPERTS = re.compile(r"^(?P<owner>.+)\.experts\.")


def _modules_of(tensor: str, manifest, kind: tuple[str, bool], dtype: "torch.dtype", parameters: bool,
                experts: set[str]) -> list[LoraModule]:
    """The stand-ins of the modules that extract makes of a weight: one, on the module the weight is saved under,
    except for a fused tensor no module holds whole (ldm.split): one module on each part's rows, as kohya and
    transformers name them — OpenCLIP's ``attn.in_proj_weight`` (SD 2.x, SDXL's second text encoder) is ``attn.q_proj``,
    ``k_proj``, ``v_proj``; DINOv2's SwiGLU ``mlp.weights_in``, which transformers 5 splits on load, ``gate_proj`` and
    ``up_proj``. And where transformers 5 holds a weight otherwise in memory: a MoE layer's
    router (its ``gate`` or ``router`` beside its ``experts``) is a router class of its own, which PEFT cannot wrap
    as a module (it refuses the adapter): with ``parameters`` (a PEFT output) a LoRA on its ``weight``, PEFT's
    ``target_parameters``, as PEFT's own conversion of Mixtral adapters makes it (formats.params)."""
    shape = manifest[tensor].shape
    parts = ldm.split(tensor, shape)
    if parts:
        return [_stand_in(part, (fused[2], shape[1]), *kind, dtype, fused=fused) for part, fused in parts]
    router = _ROUTER.match(tensor)
    raw = (tensor, 0, 1) if parameters and router and router["owner"] in experts and len(shape) == 2 else None
    return [_stand_in(tensor.removesuffix(".weight"), shape, *kind, dtype, raw_parameter=raw)]


SLICE = 1 << 22
"""Elements of the base's block converted to the compute dtype at a time as extract forms a delta (16 MiB in
float32): a whole 64 MiB bf16 block's float32 copy was 128 MiB more at the peak."""


def check_pair(base: BaseModel, tuned: BaseModel, labels: tuple[str, str]) -> None:
    """The two models must be one architecture: the same tensor names and shapes (dtypes may differ); FP8 is refused."""
    if os.path.realpath(base.path) == os.path.realpath(tuned.path):
        raise InvalidInputError(f"base and tuned are the same model ({base.path}): nothing to extract")
    only_base = sorted(base.tensors.keys() - tuned.tensors.keys())
    only_tuned = sorted(tuned.tensors.keys() - base.tensors.keys())
    shapes = [f"{n} {list(base.tensors[n].shape)} vs {list(tuned.tensors[n].shape)}"
              for n in sorted(base.tensors.keys() & tuned.tensors.keys())
              if tuple(base.tensors[n].shape) != tuple(tuned.tensors[n].shape)]
    parts = [f"{what}: {shown(names)}" for what, names in
             ((f"only in {labels[0]}", only_base), (f"only in {labels[1]}", only_tuned), ("shapes differ", shapes)) if names]
    tied = next((f"{n} is a head that {labels[1 - side]} ties to its input embeddings (and so does not store)"
                 for side, names in enumerate((only_base, only_tuned)) for n in names
                 if tied_head_source(n, (base, tuned)[side].tensors[n].shape, (tuned, base)[side].tensors)), None)
    if tied:  # a tied base and an untied fine-tune, or the reverse: say why the head is in one model only
        parts.append(tied)
    if parts:
        raise MismatchError(f"{labels[1]} is not a fine-tune of {labels[0]}'s architecture: {'; '.join(parts)}")
    for model, label in zip((base, tuned), labels, strict=True):
        odd = next((n for n, info in model.tensors.items() if info.dtype.startswith("F8")
                    or (info.dtype not in FLOAT_DTYPES and _kind(n, info.shape, False) is not None)), None)
        if odd is None:
            continue
        if model.tensors[odd].dtype.startswith("F8"):
            raise UnsupportedAdapterError(
                f"{label} stores {odd} as {model.tensors[odd].dtype}: extract reads float weights; convert the FP8 "
                f"model first (loraops merge --into {model.path} --dtype bf16 -o …)")
        # a quantized weight's integer codes (bitsandbytes int8/4-bit) are no values a delta can be taken of
        raise UnsupportedAdapterError(f"{label}: {odd} is {describe(model.tensors, odd, None)}; extract reads float "
                                      "weights: dequantize the model first")


def _half_gap(x: "torch.Tensor", toward: "torch.Tensor", dtype: str) -> "torch.Tensor":
    """Half the gap between each value x of ``dtype`` and its neighbour in ``dtype`` on the side of ``toward``: how
    far from x the reals that round to x reach that way. The spacing at |x| (the subnormals' below the smallest
    normal, zero included), but half of it from a power of two toward zero (the binade below is twice as dense).
    Computed in place where it can: it runs on blocks of 64 MiB."""
    import torch

    bits, emin = PRECISION[dtype]
    mantissa, exponent = torch.frexp(x)  # |x| = |mantissa|·2^exponent, |mantissa| in [0.5, 1)
    exponent.sub_(1).clamp_(min=emin).masked_fill_(mantissa == 0, emin)  # ⌊log2 |x|⌋, at least emin
    inward = toward.sub(x).sign_().mul_(x.sign()) < 0  # (signs: a product of tiny values would underflow)
    inward &= mantissa.abs_() == 0.5
    inward &= exponent > emin
    exponent.sub_(inward.to(exponent.dtype)).sub_(bits + 1)
    return torch.ldexp(mantissa.fill_(1.0), exponent)


def _differs(base: BaseModel, tuned: BaseModel) -> tuple[dict[str, bool], dict[str, float]]:
    """(whether each tensor differs, {tensor: largest |Δ|} of those that differ only by the rounding between the two
    dtypes the models store it in). Whether it differs: by its bytes' digest (the fingerprint's, cached per file), or
    by value when the models store it in different dtypes (a bf16 tuned model of an fp32 base: the same values are
    other bytes). Rounding: every pair of values is one that rounding one to the other, or both from one original,
    can make: the reals that round to the one (in its dtype) and those that round to the other meet, i.e. |Δ| is at
    most half the gap from each value to its neighbour on the other's side (_half_gap; ulp₁/2 + ulp₂/2, but a
    quarter of a spacing from a power of two toward zero). A tensor within it holds nothing one of the two models
    does not: the other rounded (up to ties)."""
    import torch

    from .st import read_paired_row_blocks, torch_dtype

    base_digests, tuned_digests = base.tensor_digests(), tuned.tensor_digests()
    out: dict[str, bool] = {}
    rounding: dict[str, float] = {}
    for name, info in base.tensors.items():
        other = tuned.tensors[name]
        if info.dtype == other.dtype or info.dtype not in FLOAT_DTYPES or other.dtype not in FLOAT_DTYPES:
            out[name] = base_digests[name] != tuned_digests[name]
            continue
        common = torch.promote_types(torch_dtype(info.dtype), torch_dtype(other.dtype))
        # torch rounds F64 to F16 or BF16 through F32 (twice: a tie there may go the other way), so an F64 value
        # reaches as far as F32's rounding does
        rounds = [("F32" if d == "F64" and {info.dtype, other.dtype} & {"F16", "BF16"} else d)
                  for d in (info.dtype, other.dtype)]
        differs, within, largest = False, True, 0.0
        for b, t in read_paired_row_blocks(info, other) if info.nbytes else ():  # a vocabulary is never read whole
            b, t = b.to(common), t.to(common)
            if torch.equal(b, t):
                continue
            differs, diff = True, t.sub(b).abs_()
            largest = max(largest, float(diff.max()))
            if within:  # (NaN is never within: refused when read)
                reach = _half_gap(b, t, rounds[0]).add_(_half_gap(t, b, rounds[1]))
                within = bool((diff <= reach).all())
        out[name] = differs
        if differs and within:
            rounding[name] = largest
    return out, rounding


def plan(base: BaseModel, tuned: BaseModel, *, modules: Sequence[str] | None = None,
         save_modules: Sequence[str] | None = None, dtype: "torch.dtype", labels: tuple[str, str],
         keep_rounding: bool = False, parameters: bool = True, checkpoint: bool = False) -> Plan:
    """Which weights to factorize, which tensors to store whole, what is left out; every name asked for must match.
    Tensors that differ only by the rounding between the dtypes the two models store them in are left out (they
    are the same model saved in another dtype), unless ``keep_rounding``. ``parameters``: MoE routers as LoRAs on
    their weight parameter (PEFT target_parameters), see _modules_of. ``checkpoint``: the base is a single-file
    SD/FLUX checkpoint, whose VAE is left out unless --modules names it."""
    check_pair(base, tuned, labels)
    differs, within = _differs(base, tuned)
    identical = sum(not d for d in differs.values())
    rounding = [] if keep_rounding else [  # (dtypes as torch names them, as the rest of the report does)
        ExtractSkippedRecord(name=n, reason=f"{st.torch_name(base.tensors[n].dtype)} → "
                             f"{st.torch_name(tuned.tensors[n].dtype)}", max_abs_diff=d)
        for n, d in within.items()]
    differs.update((r.name, False) for r in rounding)
    conv1d = conv1d_layout(base.tensors)
    kinds = {n: k for n, info in base.tensors.items() if (k := _kind(n, info.shape, conv1d)) is not None}
    saved: list[str] = []
    for wanted in save_modules or ():
        found = [n for n in base.tensors if names_module(n.rpartition(".")[0], wanted)]
        if not found:
            raise InvalidInputError(f"`save_modules` {wanted}: {labels[0]} has no module by that name",
                                    ["save_modules"])
        saved += [n for n in found if n not in saved]
    parts = {n: [m for m, _ in split] for n in kinds if (split := ldm.split(n, base.tensors[n].shape))}
    named: dict[str, set[str]] = {}  # a fused tensor's parts --modules names (q_proj alone of OpenCLIP's in_proj)
    if modules:
        selected: list[str] = []  # the weights asked for, whether they differ or not
        for wanted in modules:
            matched = [n for n in kinds
                       if any(names_module(m, wanted) for m in [n.removesuffix(".weight"), *parts.get(n, ())])]
            for n in (n for n in matched if n in parts):
                whole = names_module(n.removesuffix(".weight"), wanted)
                named.setdefault(n, set()).update(m for m in parts[n] if whole or names_module(m, wanted))
            found = [n for n in matched if n not in saved]
            if matched and not found:
                raise InvalidInputError(f"`modules` {wanted}: its weights ({shown(matched)}) are stored whole by "
                                        "`save_modules`: a module is either extracted or stored whole",
                                        ["modules", "save_modules"])
            if not found:
                raise InvalidInputError(f"`modules` {wanted}: {labels[0]} has no 2-D or conv weight by that name "
                                        "(norms and biases are no LoRA targets: `save_modules` keeps them whole)",
                                        ["modules", "save_modules"])
            if not any(differs[n] for n in found):
                same = "differ only by the rounding between the two models' dtypes (`keep_rounding=True` extracts " \
                    "them anyway)" if any(n in within for n in found) else "are the same in both models"
                raise InvalidInputError(f"`modules` {wanted}: its weights ({shown(found)}) {same}: nothing to "
                                        "extract", ["modules", "keep_rounding"])
            selected += [n for n in found if n not in selected]
    else:
        selected = [n for n, (kind, _) in kinds.items() if kind != "embedding" and n not in saved
                    and not _in_vae(n, checkpoint)]
    taken = {*(n for n in selected if differs[n]), *saved}
    experts = {m["owner"] for n in base.tensors if (m := _EXPERTS.match(n))}
    targets = {m.name: m for n in base.tensors if n in taken and n not in saved  # in file order
               for m in _modules_of(n, base.tensors, kinds[n], dtype, parameters, experts)
               if m.fused is None or n not in named or m.name in named[n]}
    skipped = [(n, _left_out(kinds.get(n), len(info.shape), _in_vae(n, checkpoint))) for n, info in base.tensors.items()
               if differs[n] and n not in taken]
    selected = set(selected)
    work = Plan(targets, saved, skipped, identical, rounding, [r.name for r in rounding if r.name in selected])
    if not targets and not saved:
        raise _nothing_to_extract(work, labels)
    return work


def _nothing_to_extract(work: Plan, labels: tuple[str, str], dropped: Sequence[str] = ()) -> InvalidInputError:
    """The error when no module is left to make: every tensor equal (or equal up to dtype rounding), those that
    differ no LoRA targets, or the targets' deltas all zero (``dropped``): a block of a weight's rows --modules named
    alone (DINOv2's gate_proj) is, while the weight differs in its other rows."""
    halves = [f"{n} (rows {m.first_row}–{m.first_row + m.fused[2]} of {m.weight_name})" for n in dropped
              if (m := work.targets[n]).fused is not None
              and sum(t.weight_name == m.weight_name for t in work.targets.values()) == 1]
    if halves:
        return InvalidInputError(f"`modules`: {shown(halves)}: the same in both models (other rows of the weight "
                                 "differ): nothing to extract", ["modules"])
    skipped = work.skipped
    if not skipped and work.rounding:
        worst = max(work.rounding, key=lambda r: r.max_abs_diff)
        return InvalidInputError(
            f"{labels[1]} and {labels[0]} differ only by the rounding between their dtypes ({worst.reason}; largest "
            f"|Δ| {worst.max_abs_diff:.3g} in {worst.name}): the same model saved in another dtype, not a fine-tune; "
            "nothing to extract" + (" (`keep_rounding=True` extracts the rounding anyway)" if work.rounding_targets
                                    else ""), ["keep_rounding"])
    if not skipped:
        return InvalidInputError(f"{labels[0]} and {labels[1]} hold the same values in every tensor: nothing to "
                                 "extract")
    return InvalidInputError(f"nothing to extract: the tensors that differ are no LoRA targets "
                             f"({shown([f'{n} ({why})' for n, why in skipped])}); name embeddings with "
                             "`modules`, or keep tensors whole with `save_modules`", ["modules", "save_modules"])


def _in_vae(tensor: str, checkpoint: bool) -> bool:
    """Is this a single-file SD/FLUX checkpoint's VAE weight, which extract leaves out unless --modules names it?"""
    return checkpoint and tensor.startswith(ldm.VAE_PREFIXES)


def _left_out(kind: tuple[str, bool] | None, dims: int, vae: bool = False) -> str:
    """Why a tensor that differs is not extracted."""
    if vae:
        return "VAE: no LoRA loader applies it; --modules extracts it"
    if kind is not None:
        return "embedding" if kind[0] == "embedding" else "not in --modules"
    return "norm or bias" if dims < 2 else "not a module weight"


def _layout(checkpoint: bool, fmt: str | None, save_modules: Sequence[str] | None, label: str) -> str:
    """The layout the adapter is for: ``fmt``, by default kohya for a single-file SD/SDXL/FLUX/SD3 checkpoint (sd-scripts'
    names, which A1111, ComfyUI, sd-scripts and diffusers load) and peft for any other model. A kohya file holds no
    whole tensors. (What PEFT cannot hold, OpenCLIP's q/k/v parts, is refused as the adapter is written:
    formats.refuse_unwritable.)"""
    fmt = fmt or ("kohya" if checkpoint else "peft")
    if fmt == "kohya" and save_modules:
        raise InvalidInputError("kohya files cannot hold whole tensors (`save_modules`)" + (
            f": {label} is a single-file SD/FLUX checkpoint, whose adapters are kohya files by default: use `fmt` peft"
            if checkpoint else ": use `fmt` peft"), ["save_modules", "fmt"])
    return fmt


def extract(base: "str | Path | BaseModel", tuned: "str | Path | BaseModel", **options) -> tuple[Adapter, ExtractReport]:
    """``extract_lazily`` (same arguments), computed whole: (the adapter, its report)."""
    from .algebra import refuse_unknown_options

    refuse_unknown_options(extract, extract_lazily, options)
    adapter, report = extract_lazily(base, tuned, **options).collect()
    return replace(adapter, full_tensors=dict(adapter.full_tensors)), report


@flags_checked
def extract_lazily(
    base: "str | Path | BaseModel",
    tuned: "str | Path | BaseModel",
    *,
    rank: int | None = None,
    dynamic: str | None = None,
    param: float | None = None,
    max_rank: int | None = None,
    conv_rank: int | None = None,
    alpha: float | None = None,
    modules: Sequence[str] | None = None,
    save_modules: Sequence[str] | None = None,
    device: "str | torch.device" = "auto",
    precise: bool = False,
    dtype: str | None = None,
    keep_rounding: bool = False,
    fmt: str | None = None,
    labels: tuple[str, str] | None = None,
    output: str | Path | None = None,
) -> "algebra.Derivation":
    """The LoRA adapter of tuned − base (models as paths or opened BaseModels): every differing weight (or those
    ``modules`` name) factorized at ``rank`` or by a kohya ``dynamic`` rule with ``param`` (capped by ``max_rank``;
    ``conv_rank``: the k×k convolutions' rank, or their cap, in place of those: RankRule),
    ``save_modules`` stored whole (as the tuned model stores them). Factors in ``dtype`` (bf16, fp16, fp32; default:
    the tuned model's), each module's alpha ``alpha`` (default its rank). Tensors stored in other dtypes that differ
    only by the rounding between those are left out (reported), unless ``keep_rounding``. ``fmt``: the layout it is
    for (a MoE router is a LoRA on its weight parameter in PEFT's, a plain module in kohya's); by default kohya for
    a single-file SD/FLUX checkpoint, else peft; ``output``: where it will be written, refused now when misnamed for
    that layout (formats.refuse_misnamed), before the models are compared. Everything is checked
    now (names, shapes, what differs); the modules are computed as the Derivation is iterated, one tensor pair in
    memory at a time."""
    import torch

    from .algebra import Derivation, compute_precision, factorizing, finite_module, refuse_idle_conv_rank, resize_rule
    from .engine import parse_dtype, peak_rss
    from .ops.resize import factorize_dense
    from .ops.svd import factors_in
    from .settings import device_memory, in_order, resolve_device
    from .st import all_finite, read_paired_row_blocks, read_row_blocks, read_tensor, torch_dtype

    rule = resize_rule(rank, dynamic, param, max_rank, conv_rank, what="extract")
    modules, save_modules = name_list(modules, "modules"), name_list(save_modules, "save_modules")
    given_alpha(alpha)  # (one beyond float32 was refused only at the end, naming a scratch file)
    base, tuned = _open(base, "base"), _open(tuned, "tuned")
    base = _untied(base, tuned)  # a fine-tune that untied the head its base ties: the head's delta from the embeddings
    labels = labels or (str(base.path), str(tuned.path))
    # a single-file SD/FLUX checkpoint (or one of OTHER_UNETS' UNets, however few of its tensors translate; by its
    # checkpoint tensors alone, as other_unet also tells a pipeline's UNet)
    checkpoint = bool(ldm.diffusers_names(base.tensors)) or ldm.other_unet(
        n for n in base.tensors if n.startswith(ldm.UNET_PREFIX)) is not None
    fmt = _layout(checkpoint, fmt, save_modules, labels[0])
    if output is not None:
        refuse_misnamed(output, fmt)
    out_dtype = torch_dtype(parse_dtype(dtype) or (tuned.dtype if tuned.dtype in FLOAT_DTYPES else "F32"))
    work = plan(base, tuned, modules=modules, save_modules=save_modules, dtype=out_dtype, labels=labels,
                keep_rounding=keep_rounding, parameters=fmt != "kohya", checkpoint=checkpoint)
    made = {*work.saved, *(m.weight_name for m in work.targets.values())}
    untied = {h: e for h, e in (base.heads if isinstance(base, _Untying) else {}).items() if h in made}
    if untied and fmt == "kohya":  # (--save-module is refused for kohya before)
        raise UnsupportedAdapterError(
            f"{next(iter(untied)).removesuffix('.weight')}: {labels[0]} ties this head to its input embeddings and "
            "does not store it, and kohya module names are resolved against the tensors a base stores: use `fmt` "
            "peft", ["fmt"])
    started = time.perf_counter()
    target = resolve_device(device)
    # a float64 model's deltas in float64: float32 rounds both sides first, losing (or zeroing) what differs below
    # its precision
    compute_dtype, precision = compute_precision(precise or any(
        model.tensors[m.weight_name].dtype == "F64" for m in work.targets.values() for model in (base, tuned)))

    def finite(model: BaseModel, label: str, tensor: str, values: "torch.Tensor | None" = None) -> "torch.Tensor":
        values = read_tensor(model.tensors[tensor]) if values is None else values
        # (all_finite: one reduction; torch.isfinite made |values| and two masks of the whole block)
        if values.is_floating_point() and values.numel() and not all_finite(values):
            raise InvalidInputError(f"{label} has NaN or Inf values in {tensor}: extract refuses non-finite weights "
                                    "(a delta or a stored copy of them would carry them into the adapter)")
        return values

    for tensor in work.saved:  # checked now, in blocks of ≤ 64 MiB; read again (whole, one at a time) as written
        if tuned.tensors[tensor].nbytes:
            for _, _, block in read_row_blocks(tuned.tensors[tensor]):
                finite(tuned, labels[1], tensor, block)

    # PEFT names modules as transformers holds them in memory, which for some families is not as saved: the
    # adapter's own names (what the PEFT writer writes) are those; bound to the base, it keeps the saved ones
    renames, names_warning = memory_names(base.tensors, base.config(next(iter(base.tensors))))
    own = {n: renames[m.weight_name].removesuffix(".weight") for n, m in work.targets.items()
           if m.fused is None and m.weight_name in renames}
    own.update((n, renames[n]) for n in work.saved if n in renames)
    warnings = [names_warning] if names_warning else []
    experts = [own.get(n, n) for n in work.targets if EXPERT_RE.match(own.get(n, n))]
    if experts:  # (as PEFT target_parameters they would need one A per expert for gate and up together)
        warnings.append(f"{len(experts)} per-expert module{'s' if len(experts) > 1 else ''} ({shown(experts)}): "
                        "transformers 5 holds a MoE layer's experts as fused parameters, so PEFT finds no module by "
                        "these names and skips them; merge with loraops, or leave them out with --modules")
    result = Adapter(
        modules={n: m.stand_in() for n, m in work.targets.items()}, format=fmt, base_model=str(base.path),
        metadata=ldm.sd_scripts_metadata(base.tensors),
        # as stored (an exact replacement), read as written: never all in memory, nor while modules are computed
        full_tensors=LazyTensors({n: functools.partial(read_tensor, tuned.tensors[n]) for n in work.saved}),
        own_names=own,
    )
    what = f"extract of {labels[1]} − {labels[0]}"
    # before any module is computed; kohya, extract's way out of PEFT's refusal, holds no whole tensors (--save-module)
    way_out = ("and a kohya file holds no whole tensors (--save-module): leave those modules out with --modules, or "
               "leave --save-module out and write kohya") if save_modules else \
        "so it cannot be written as peft: use --format kohya"

    def delta(tensor: str) -> "torch.Tensor":
        # by row blocks into one buffer: whole, each side's read, its finiteness mask and its float32 copy made the
        # peak ~3× the delta (2.8 GiB for a 70B's 8192×28672 bf16 MLP weight)
        D = torch.empty(tuned.tensors[tensor].shape, dtype=compute_dtype, device=target)
        flat, at = D.view(-1), 0
        for ours, theirs in read_paired_row_blocks(tuned.tensors[tensor], base.tensors[tensor]):
            piece = flat[at:at + ours.numel()]
            piece.copy_(finite(tuned, labels[1], tensor, ours))
            # (in the compute dtype first: a float64 base subtracted from float32 would be rounded once, not twice),
            # a slice at a time: a whole block's copy in it was as large as the delta's share of the block
            theirs = finite(base, labels[0], tensor, theirs)
            for start in range(0, theirs.numel(), SLICE):
                piece[start:start + SLICE].sub_(theirs[start:start + SLICE].to(device=target, dtype=compute_dtype))
            at += ours.numel()
            del ours, theirs, piece  # (before the next blocks are read)
        return D

    if fmt == "peft":  # of the parts PEFT refuses, those whose rows did not change are no modules (compute drops them)
        weight_delta = functools.lru_cache(maxsize=1)(delta)  # (a fused weight's parts come in a row)
        with device_memory(target, f"comparing the weights for the {what}", precise):
            unchanged = {m.name for m in peft_unwritable_parts(result)
                         if not bool(weight_delta(m.weight_name)[m.first_row:m.first_row + m.fused[2]].any())}
        del weight_delta
        result = replace(result, modules={n: m for n, m in result.modules.items() if n not in unchanged})
    refuse_unwritable(result, fmt, values=False, label=what, peft_way_out=way_out)
    refuse_idle_conv_rank(rule.conv_rank, work.targets.values(), f"the {what} has")
    records: list[ExtractModuleRecord] = []
    skipped: list[ExtractSkippedRecord] = []
    dropped: set[str] = set()

    def max_abs_difference(tensor: str) -> float:
        if not tuned.tensors[tensor].nbytes:
            return 0.0
        largest = 0.0
        for ours, theirs in read_paired_row_blocks(tuned.tensors[tensor], base.tensors[tensor]):
            block = finite(tuned, labels[1], tensor, ours).to(compute_dtype)
            block.sub_(finite(base, labels[0], tensor, theirs).to(compute_dtype))
            largest = max(largest, float(block.abs_().max()))
        return largest

    def factorized(name: str, template: LoraModule, fused: dict[str, "torch.Tensor"]):
        """(the module, its SVD's kind, its error) of its weight's delta; None where that delta is zero."""
        if template.fused is None:
            fused.clear()
            D = delta(template.weight_name)
        else:  # one module on a block of the weight's rows (OpenCLIP's q, k, v; DINOv2's halves)
            if template.weight_name not in fused:
                fused.clear()
                fused[template.weight_name] = delta(template.weight_name)
            D = fused[template.weight_name][template.first_row:template.first_row + template.fused[2]]
        if not bool(D.any()):  # bytes that differ only in the sign of a zero (or in other parts' rows): no module
            return None
        M = D.reshape(D.shape[0], -1)
        with factorizing(what, name, precision):
            # a delta however small is not zero (dropped above): a fixed rank is kept, and a dynamic rule ranks it
            # as it would the same delta larger (no kohya MIN_SV floor, which made every delta below 1e-6 rank 1)
            made = factorize_dense(M.T if template.transposed else M, rule.for_module(template), exact=precise,
                                   keep_zero_rank=True, min_sv=0.0)
        module_alpha = float(made.A.shape[0]) if alpha is None else float(alpha)
        scale = module_alpha / made.A.shape[0]
        return (template.with_factors(*factors_in(made.B / scale, made.A, out_dtype), module_alpha, scale),
                made.svd, made.error)

    # the targets by the weight they come from (a fused weight's parts come in a row): each weight's modules are
    # made together, its delta read once, while other weights' are made on other threads (settings.in_order: every
    # SVD runs on one thread, so side by side)
    weights: list[list[tuple[str, LoraModule]]] = []
    for name, template in work.targets.items():
        if weights and template.fused is not None and weights[-1][0][1].weight_name == template.weight_name:
            weights[-1].append((name, template))
        else:
            weights.append([(name, template)])

    def made_of_weight(modules: list[tuple[str, LoraModule]]) -> list:
        fused: dict[str, "torch.Tensor"] = {}  # a fused weight's delta, kept while its parts are made
        made = []
        for name, template in modules:
            with device_memory(target, f"computing module {name!r} of the {what}", precise):
                made.append((name, template, factorized(name, template, fused)))
        return made

    def weight_elements(modules: list[tuple[str, LoraModule]]) -> int:
        return tuned.tensors[modules[0][1].weight_name].numel

    def compute() -> Iterator[LoraModule]:
        for name, template, made in (module for weight in in_order(weights, made_of_weight, weight_elements, target)
                                     for module in weight):
            if made is None:
                dropped.add(name)
                continue
            module, svd, error = made
            del made
            module = finite_module(what, module)
            if not (bool(module.B.any()) and bool(module.A.any())):  # (its delta is not: dropped above)
                kept = st.dtype_name(out_dtype)
                raise InvalidInputError(
                    f"{what}: module {name!r} comes out all zero in {kept} (its delta is below what {kept} holds): "
                    "use `dtype` " + ("bf16 or fp32" if out_dtype == torch.float16 else "fp32"), ["dtype"])
            records.append(ExtractModuleRecord(
                name=name, kind=template.kind, spatial=template.spatial, shape=list(template.weight_shape),
                rank=module.rank, alpha=module.alpha, svd=svd, error=error,
                fro_retained=math.sqrt(max(0.0, 1.0 - error * error))))
            yield module
        for tensor, why in work.skipped:  # norms and biases, or a vocabulary-sized embedding: by row blocks
            skipped.append(ExtractSkippedRecord(name=tensor, reason=why, max_abs_diff=max_abs_difference(tensor)))
        if len(dropped) == len(work.targets) and not work.saved:
            raise _nothing_to_extract(work, labels, sorted(dropped))

    def summarize(extracted: Adapter, seconds: float) -> ExtractReport:
        errors = [r.error for r in records] or [0.0]
        # weights none of whose modules was made (an OpenCLIP in_proj_weight is three modules)
        unchanged = {m.weight_name for m in work.targets.values()} - {
            m.weight_name for n, m in work.targets.items() if n not in dropped}
        return ExtractReport(
            base_ref=labels[0], tuned_ref=labels[1], rank=rule.rank, dynamic=rule.dynamic, param=rule.param,
            max_rank=rule.max_rank, conv_rank=rule.conv_rank, alpha=alpha, device=str(target), precision=precision,
            dtype=st.dtype_name(out_dtype), modules=records, error_max=max(errors),
            error_mean=sum(errors) / len(errors),
            fro_retained_mean=sum(r.fro_retained for r in records) / len(records) if records else 1.0,
            identical=work.identical + len(unchanged), skipped=skipped, rounding=work.rounding,
            rounding_targets=work.rounding_targets, saved=work.saved,
            parameters=replace(extracted, full_tensors={}).num_parameters  # (sizes of the full tensors: unread)
            + sum(tuned.tensors[n].numel for n in work.saved), seconds=seconds, peak_rss_bytes=peak_rss(),
            peft_names={n: own.get(n, n) for n in [*(r.name for r in records), *work.saved]
                        if own.get(n, n) != n}, warnings=warnings, untied_heads=untied,
        )

    return Derivation(result, compute(), summarize, seconds=time.perf_counter() - started, dropped=dropped)
