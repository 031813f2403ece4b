"""PEFT AdaLoRA and VeRA: methods whose ΔW is exactly low rank, read as the plain LoRA module each module equals
(its diagonal factors folded into B, factors otherwise as stored, the scale apart: see loraops.adapter).

AdaLoRA (AdaLoraConfig, peft_type ADALORA): keys ``<module>.lora_A`` (r×in), ``.lora_E`` (r×1), ``.lora_B`` (out×r),
without ``.weight``. PEFT 0.21's SVDLinear and SVDConv2d compute

    ΔW = B·(A ⊙ E) · scaling / (ranknum + 1e-5)          scaling = lora_alpha (the module's r when lora_alpha ≤ 0)

ranknum is not saved: PEFT makes every module at init_r, so ranknum = init_r. A budget allocation leaves the config a
rank_pattern (``<module>.lora_E`` → one boolean per initial triplet) and saves each module's kept triplets only; on
load PEFT shrinks the module to the kept rank and copies ranknum back (resize_modules_by_rank_pattern), so ranknum
stays init_r. Read as B' = B·diag(E), A as stored, scale = scaling/(init_r + 1e-5) (PEFT's model computes with the
1e-5, so it is kept), alpha = scaling. A module with every triplet masked (rank 0: 0×in and out×0 tensors) changes
nothing and is left out; one whose E is all zero is read (its ΔW is zero). A Conv2d's A is r×(in·kh·kw), flattened as
PEFT stores it: read as a Linear until bound to a base, whose shape makes it the conv (check.fit_kind), so until then
``LoraModule.inputs_known`` is false and what needs the layer's layout (writing, resize, combine) is refused
(``refuse_unbound``): nothing in the file tells a Linear from a convolution, nor in from kh·kw. PEFT has no AdaLoRA for
embeddings, and its AdaLoraConfig refuses DoRA.

VeRA (VeraConfig, peft_type VERA): keys ``<module>.vera_lambda_b`` (out), ``.vera_lambda_d`` (r) and the frozen
random projections all modules share, ``base_model.vera_A`` (r × the widest targeted layer's inputs) and
``base_model.vera_B`` (the widest outputs × r). PEFT's Linear computes, without a scale (transposed for a Conv1D,
fan_in_fan_out),

    ΔW = diag(λ_b)·vera_B[:out, :]·diag(λ_d)·vera_A[:, :in]

Read as B' = diag(λ_b)·vera_B[:out]·diag(λ_d), A = vera_A[:, :in] (a view of the one shared tensor), scale 1, alpha r.
A layer's ``in`` is in no tensor of the file: until the module is bound to a base its A is all of vera_A
(``LoraModule.inputs_known`` false), cut to the layer's width there (``fit_inputs``), and what needs the width before
(writing, resize, combine) is refused (``refuse_unbound``). Projections PEFT regenerates (save_projection false) are
refused: PEFT draws them from projection_prng_key with torch's CPU generator, sized by the base model's widest
targeted layer (even B's values depend on that width), which loraops does not reproduce.

B' is formed in float64 and kept in float32 (float64 if a factor is stored so), never rounded back to a half-precision
file dtype; A keeps the file's. ``LoraModule.stored_dtype`` is the file's (the type holding all of a module's stored
tensors), which Adapter.dtype reports.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from ..adapter import LoraModule, widest_dtype
from ..errors import InvalidInputError, UnsupportedAdapterError
from . import common

if TYPE_CHECKING:
    import torch

    from ..adapter import Adapter

PEFT_TYPES = {"ADALORA": "adalora", "VERA": "vera"}
RANKNUM_EPS = 1e-5
"""PEFT's AdaLoRA divides by ranknum + 1e-5."""
PROJECTIONS = {"A": "base_model.vera_A", "B": "base_model.vera_B"}
LAMBDA_RE = re.compile(r"^(?P<module>.+)\.vera_lambda_(?P<part>[bd])$")
PATTERN_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_E(\.[^.]+)?$")
OWN_MARKERS = {"adalora": common.ADALORA_MARKER, "vera": common.VERA_MARKER}


def refuse_unsupported(path: Path, keys, method: str) -> None:
    """common.refuse_unsupported without the method's own marker (its keys are read here)."""
    common.refuse_unsupported(path, keys, [m for m in common.REFUSED_MARKERS if m is not OWN_MARKERS[method]])


def config_fields(path: Path, method: str, cfg: dict) -> dict:
    """Check an AdaLoraConfig/VeraConfig and give the LoraConfig fields of it that peft.scale_config reads: ``r`` is
    AdaLoRA's init_r (its ranknum) or VeRA's r; the scales are this module's (adalora_modules, vera_modules)."""
    if method == "adalora":
        if cfg.get("use_dora"):
            raise UnsupportedAdapterError(f"{path}: DoRA in an AdaLoRA config (use_dora), which PEFT's AdaLoraConfig "
                                          "refuses; loraops does not guess its math")
        if cfg.get("target_parameters"):
            raise UnsupportedAdapterError(f"{path}: target_parameters in an AdaLoRA config: PEFT's AdaLoRA wraps "
                                          "modules only; loraops does not guess its math")
        r = cfg.get("init_r", common.peft_default("ADALORA", "init_r"))
        what = "init_r"
        if "lora_alpha" in cfg:
            lora_alpha = cfg["lora_alpha"]
            if lora_alpha is None:  # (PEFT's SVD layers compare it with 0: a TypeError)
                raise InvalidInputError(f"{path}: config lora_alpha=null must be a number")
            if isinstance(lora_alpha, (int, float)) and not isinstance(lora_alpha, bool) and lora_alpha < 0:
                # PEFT's SVD layers read any lora_alpha ≤ 0 as "scaling = the module's rank" (adalora_modules), which
                # LoRA's alpha check would refuse as negative
                cfg = {**cfg, "lora_alpha": 0}
        # (lora_alpha; layer_replication for the LoRA checks to refuse; r, rank_pattern and alpha_pattern are LoRA's
        # fields, which AdaLoRA does not read)
        kept = ("lora_alpha", "fan_in_fan_out", "modules_to_save", "bias", "layer_replication")
    else:
        if cfg.get("save_projection", True) is not True:
            raise UnsupportedAdapterError(
                f"{path}: a VeRA adapter saved without its projections (save_projection: "
                f"{str(cfg.get('save_projection')).lower()}): PEFT regenerates vera_A/vera_B from projection_prng_key "
                "with torch's random generator, sized by the base model's widest targeted layer, which loraops does "
                "not reproduce; save the adapter from PEFT with save_projection=True")
        r = cfg.get("r", common.peft_default("VERA", "r"))
        what = "r"
        kept = ("fan_in_fan_out", "modules_to_save", "bias")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise InvalidInputError(f"{path}: config {what}={r!r} must be a positive integer")
    return {"r": r, **{k: cfg[k] for k in kept if k in cfg}}


def fold(B: "torch.Tensor", *diagonals: "torch.Tensor") -> "torch.Tensor":
    """B multiplied element-wise by each of ``diagonals`` (a row broadcast over B's rows is B·diag(d), a column
    diag(d)·B), in float64, kept in float32 (float64 when a factor is)."""
    import torch

    tensors = (B, *diagonals)
    kept = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    # (a headers-only read has meta factors, and single values read: a rank-1 module's lora_E)
    device = "meta" if any(t.is_meta for t in tensors) else B.device
    out = B.to(device, torch.float64)
    for d in diagonals:
        out = out * d.to(device, torch.float64)
    return out.to(kept)


def _floating(path: Path, key: str, tensor: "torch.Tensor") -> None:
    if not tensor.is_floating_point():
        raise InvalidInputError(f"{path}: {key} must be floating point, not {tensor.dtype}")
    common.check_finite(path, key, tensor)


# -- AdaLoRA -----------------------------------------------------------------------------------------------------


def kept_ranks(path: Path, pattern, init_r: int, modules: Iterable[str], prefix: str) -> dict[str, int]:
    """Module → the rank an AdaLoRA rank_pattern keeps (its triplets left: the mask's true values)."""
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise InvalidInputError(f"{path}: config rank_pattern must be an object of <module>.lora_E: [true/false, …]")
    names = set(modules)
    kept = {}
    for key, mask in pattern.items():
        match = PATTERN_KEY_RE.match(key)
        if match is None:
            raise InvalidInputError(f"{path}: config rank_pattern key {key!r} names no AdaLoRA module's lora_E")
        if not isinstance(mask, list) or not all(isinstance(v, bool) for v in mask) or len(mask) != init_r:
            raise InvalidInputError(f"{path}: config rank_pattern[{key!r}] must be {init_r} true/false values (one per "
                                    "initial triplet, init_r), as PEFT's budget allocation writes it")
        module = match["module"].removeprefix(prefix)
        if module not in names:
            raise InvalidInputError(f"{path}: config rank_pattern names {module!r}, which has no AdaLoRA tensors here")
        kept[module] = sum(mask)
    return kept


def adalora_modules(path: Path, factors: dict[str, dict[str, str]], tensors: dict[str, "torch.Tensor"], raw_cfg: dict,
                    *, init_r: int, alpha: float, fan_in_fan_out: bool, prefix: str) -> dict[str, LoraModule]:
    """The modules of an AdaLoRA file (``factors``: module → {"A", "B", "E" → key}, peft.parse_keys'), as PEFT loads
    them: each at the rank its config gives it (init_r, or what rank_pattern keeps), ranknum init_r."""
    kept = kept_ranks(path, raw_cfg.get("rank_pattern"), init_r, factors, prefix)
    modules = {}
    for name, parts in sorted(factors.items()):
        if "magnitude" in parts:
            raise InvalidInputError(f"{path}: {parts['magnitude']!r}: a DoRA magnitude in an AdaLoRA adapter")
        if "E" not in parts:
            raise InvalidInputError(f"{path}: module {name!r} has no lora_E (AdaLoRA's singular values) beside "
                                    f"{parts['A']!r}")
        A, B, E = (tensors[parts[k]] for k in "ABE")
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0] or tuple(E.shape) != (A.shape[0], 1):
            shapes = ", ".join(f"{parts[k]} {common.fmt_shape(t.shape)}" for k, t in zip("ABE", (A, B, E), strict=True))
            raise InvalidInputError(f"{path}: module {name!r}: AdaLoRA's lora_A must be r×in, lora_B out×r and "
                                    f"lora_E r×1 ({shapes})")
        rank, expected = int(A.shape[0]), kept.get(name, init_r)
        if rank != expected:
            why = "its rank_pattern mask keeps" if name in kept else "init_r says"
            raise InvalidInputError(f"{path}: module {name!r} has rank {rank} ({parts['A']} "
                                    f"{common.fmt_shape(A.shape)}), but {why} {expected}: PEFT would not load it")
        if rank == 0:  # every triplet masked: PEFT keeps an empty layer, which changes nothing
            continue
        _floating(path, parts["E"], E)
        if not B.is_floating_point():  # (build_module says so too, but the fold comes first)
            raise InvalidInputError(f"{path}: module {name!r}: factors must be floating point, not {B.dtype}")
        common.check_finite(path, parts["B"], B)  # (a NaN stored is no product's overflow)
        folded = fold(B, E.reshape(1, -1))
        common.check_derived(path, name, f"{parts['B']}·diag({parts['E']})", folded)
        module = common.build_module(path, name, A, folded, a_key=parts["A"], b_key=parts["B"],
                                     alpha=None, kind="linear", extra_keys=(parts["E"],),
                                     fan_in_fan_out=common.peft_fan_in_fan_out(fan_in_fan_out, name),
                                     stored=(A, B, E))
        scaling = alpha if alpha > 0 else float(rank)
        modules[name] = replace(module, alpha=scaling, scale=scaling / (init_r + RANKNUM_EPS), method="adalora",
                                inputs_known=False)
    return modules


# -- VeRA --------------------------------------------------------------------------------------------------------


def vera_group(keys, module_name: Callable[[str], str]) -> tuple[dict[str, dict[str, str]], dict[str, str], list[str]]:
    """(module → {"b"/"d" → its λ key}, {"A"/"B" → the shared projection's key}, the other keys)."""
    lambdas: dict[str, dict[str, str]] = {}
    projections = {}
    others = []
    for key in keys:
        match = LAMBDA_RE.match(key)
        if match is not None:
            lambdas.setdefault(module_name(match["module"]), {})[match["part"]] = key
        elif key in PROJECTIONS.values():
            projections[key.rpartition("_")[2]] = key
        else:
            others.append(key)
    return lambdas, projections, others


def vera_modules(path: Path, lambdas: dict[str, dict[str, str]], projections: dict[str, str],
                 tensors: dict[str, "torch.Tensor"], *, r: int, fan_in_fan_out: bool) -> dict[str, LoraModule]:
    """The modules of a VeRA file, each with all of vera_A until bound to a base (see fit_inputs)."""
    common.pair_factors(path, lambdas, "b", "d")
    if lambdas and len(projections) < 2:
        missing = next(key for part, key in PROJECTIONS.items() if part not in projections)
        raise InvalidInputError(f"{path}: no {missing!r} in the file, though the config says save_projection: true "
                                "(PEFT refuses it too)")
    if not lambdas:
        return {}
    A, B = tensors[projections["A"]], tensors[projections["B"]]
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] != r:
        raise InvalidInputError(f"{path}: VeRA's shared projections must be vera_A r×in and vera_B out×r with r = the "
                                f"config's {r} ({projections['A']} {common.fmt_shape(A.shape)}, {projections['B']} "
                                f"{common.fmt_shape(B.shape)})")
    for key in projections.values():
        _floating(path, key, tensors[key])
    modules = {}
    for name, parts in sorted(lambdas.items()):
        b, d = tensors[parts["b"]], tensors[parts["d"]]
        if b.dim() != 1 or d.dim() != 1 or d.shape[0] != r or not 0 < b.shape[0] <= B.shape[0]:
            raise InvalidInputError(
                f"{path}: module {name!r}: VeRA's vera_lambda_b must hold one value per output (at most vera_B's "
                f"{B.shape[0]} rows) and vera_lambda_d one per rank ({r}) ({parts['b']} {common.fmt_shape(b.shape)}, "
                f"{parts['d']} {common.fmt_shape(d.shape)})")
        _floating(path, parts["b"], b)
        _floating(path, parts["d"], d)
        folded = fold(B[: b.shape[0]], b.reshape(-1, 1), d.reshape(1, -1))
        common.check_derived(path, name, f"diag({parts['b']})·vera_B·diag({parts['d']})", folded)
        modules[name] = LoraModule(
            name=name, A=A, B=folded, alpha=float(r), scale=1.0, kind="linear",
            fan_in_fan_out=common.peft_fan_in_fan_out(fan_in_fan_out, name),
            source_keys=(parts["b"], parts["d"], projections["A"], projections["B"]), method="vera", inputs_known=False,
            stored_dtype=widest_dtype(A.dtype, B.dtype, b.dtype, d.dtype),
        )
    return modules


def fit_inputs(module: LoraModule, base_shape: tuple[int, ...]) -> LoraModule:
    """A VeRA module bound to a base tensor of ``base_shape``: A cut to the layer's inputs, vera_A's first columns
    (PEFT's vera_A[:, :in]). Left as it is when the tensor is no out×in (Linear) or in×out (Conv1D) matrix of its
    outputs and at most vera_A's width: check then reports the misfit."""
    if module.method != "vera" or module.inputs_known or len(base_shape) != 2:
        return module
    rows, cols = base_shape
    out, width = module.out_features, module.in_features
    fits = [(cols, rows == out), (rows, cols == out)]  # (inputs, fits) stored out×in, then in×out
    if module.fan_in_fan_out:
        fits.reverse()
    inputs = next((n for n, ok in fits if ok and n <= width), None)
    return module if inputs is None else replace(module, A=module.A[:, :inputs], inputs_known=True)


def refuse_unbound(adapter: "Adapter", label: str, what: str) -> None:
    """A VeRA or AdaLoRA module not bound to a base (LoraModule.inputs_known false) cannot be ``what`` (written,
    resized, combined): how many columns of vera_A a VeRA layer takes, and whether an AdaLoRA layer is a Linear or a
    convolution (its A stored flattened, r × in·kh·kw), only the base says."""
    module = next((m for m in adapter.modules.values() if not m.inputs_known), None)
    if module is None:
        return
    if module.method == "vera":
        why = (f"a VeRA adapter takes the first columns of the shared vera_A (of {module.in_features}), as many as its "
               "layer has inputs, which only its base says")
    else:
        why = (f"an AdaLoRA adapter has an A of {module.in_features} columns, a Linear's inputs or a convolution's "
               "flattened (in·kh·kw, as PEFT stores a Conv2d's), which only its base tells apart")
    raise InvalidInputError(f"{label}: module {module.name!r} of {why}: bind it "
                            f"to its base before it is {what} (give --base BASE, or register it with --base; in Python, "
                            "loraops.check.bind)")
