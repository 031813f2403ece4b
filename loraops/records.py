"""Plain pydantic records: what the library returns and what `--json` prints (a documented, stable schema).

Registry rows, tensors and file handles never leave the library; these do.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class ModuleRecord(Record):
    """One adapted module: `name` is its path in the base model (for an unbound kohya file, the kohya name)."""

    name: str
    kind: Literal["linear", "conv", "embedding"]
    rank: int
    alpha: float
    scale: float
    in_features: int
    out_features: int

    @classmethod
    def of(cls, module) -> "ModuleRecord":
        return cls(
            name=module.name, kind=module.kind, rank=module.rank, alpha=module.alpha, scale=module.scale,
            in_features=module.in_features, out_features=module.out_features,
        )


class ResizeModuleRecord(Record):
    """One module of a resize: ranks before/after and how much of its spectrum the new rank keeps."""

    name: str
    kind: Literal["linear", "conv", "embedding"]
    rank_before: int
    rank_after: int
    alpha_after: float
    fro_retained: float
    """‖S_k‖/‖S‖ over the singular values S of B·A: 1 − fro_retained² is the relative squared Frobenius error."""
    sum_retained: float
    """ΣS_k/ΣS (kohya's 'sum(S) retained')."""


class ResizeReport(Record):
    rank: int | None
    dynamic: str | None
    param: float | None
    max_rank: int | None
    device: str
    precision: Literal["float32", "float64"]
    modules: list[ResizeModuleRecord]
    fro_retained_mean: float
    sum_retained_mean: float
    parameters_before: int
    parameters_after: int
    seconds: float


class CombineInputRecord(Record):
    ref: str
    weight: float
    rank: int | None
    """The input's rank (None when its modules have different ranks)."""
    modules: int


class CombineModuleRecord(Record):
    name: str
    rank: int
    inputs: int
    """How many inputs adapt this module (the others count as a zero delta)."""
    svd: Literal["none", "factored", "exact", "randomized"]
    """How the result was factored: none (cat, exact by construction), factored (exact SVD of the stacked factors),
    exact / randomized (SVD of the dense delta an element-wise method produced)."""
    error: float
    """Relative Frobenius error ‖D − B'A'‖/‖D‖ of the output factors against the method's exact result D."""


class CombineReport(Record):
    method: str
    params: dict
    inputs: list[CombineInputRecord]
    device: str
    precision: Literal["float32", "float64"]
    modules: list[CombineModuleRecord]
    error_max: float
    error_mean: float
    parameters: int
    seconds: float


class ShapeMismatch(Record):
    """A module (or full tensor) whose base tensor has another shape; ``expected`` is the base's, None if absent."""

    name: str
    tensor: str
    expected: list[int] | None
    actual: list[int]


class CheckReport(Record):
    """How an adapter fits a base: every module matched by name and shape, or exactly what does not."""

    ok: bool
    base: str | None = None
    matched: int
    modules: int
    missing: list[str]
    """Adapter modules with no tensor in the base (for kohya names: no base module has that underscore form)."""
    ambiguous: list[str] = []
    """kohya names that more than one base module turns into."""
    shape_mismatches: list[ShapeMismatch]
    full_tensor_mismatches: list[ShapeMismatch] = []
    """modules_to_save tensors missing from the base (expected null) or of another shape."""


class InspectReport(Record):
    """What `loraops inspect` reports about an adapter file or folder (no registry involved)."""

    path: str
    format: str
    identity: str
    """sha256 of the file; for a PEFT folder it also covers the math fields of the config (see formats.identity)."""
    files: list[str]
    size: int
    dtype: str
    rank: int | None
    """null when modules have different ranks."""
    alpha: float | None
    """null when modules have different alphas."""
    scale_mode: Literal["classic", "rslora"]
    target_modules: list[str]
    num_modules: int
    num_parameters: int
    names_resolved: bool
    base_model: str | None
    full_tensors: list[str]
    metadata: dict[str, str]
    modules: list[ModuleRecord]
