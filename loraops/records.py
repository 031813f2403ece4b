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
