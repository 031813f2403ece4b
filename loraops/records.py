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
