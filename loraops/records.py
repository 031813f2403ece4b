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


class MergeInputRecord(Record):
    """One adapter of a merge or subtract: where it came from and the weight it was applied with (negated for
    subtract: the weight as it entered W' = W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ)."""

    adapter: str
    weight: float
    modules: int
    full_tensors: int = 0


class ResidualRecord(Record):
    """What a subtract leaves behind. ``compared_to`` names the pristine base when one was available to compare
    against (then ``elements_differing`` / ``max_abs_diff`` are measured over the tensors the adapters touch);
    ``rounding_max_abs`` is always measured: the largest |stored − exact| introduced by the final rounding."""

    compared_to: str | None = None
    elements: int = 0
    elements_differing: int | None = None
    max_abs_diff: float | None = None
    rounding_max_abs: float = 0.0
    note: str = ""


class MergeReport(Record):
    operation: Literal["merge", "subtract", "restore"]
    output: str
    base: str
    adapters: list[MergeInputRecord]
    dtype: str
    """Output dtype of the floating tensors (safetensors name, e.g. BF16)."""
    device: str
    precise: bool = False
    tensors_merged: int = 0
    tensors_replaced: int = 0
    """modules_to_save tensors written in place of the base's."""
    tensors_converted: int = 0
    """Untouched floating tensors converted to a new --dtype."""
    tensors_copied: int = 0
    """Untouched tensors copied byte for byte."""
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    """Peak resident memory of the whole process (getrusage), start-up included."""
    residual: ResidualRecord | None = None
    name: str | None = None
    """Registry name the output was recorded under, when it was."""
    fingerprint: str | None = None
