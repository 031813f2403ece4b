"""Rank reduction of one LoRA module on its factors, with kohya's rank rules.

The spectrum of B·A comes from the factored SVD (exact, never forming the out×in delta); it has min(r, out, in)
entries, the nonzero part of the spectrum kohya gets from a dense SVD of the whole delta. kohya's rules
(sd-scripts networks/resize_lora.py), on singular values S (descending, of the *unscaled* B·A), n = len(S):

    sv_ratio p        index = #{S > S[0]/p} − 1
    sv_cumulative p   index = searchsorted(cumsum(S)/ΣS, p)           (first i with cumulative fraction ≥ p)
    sv_fro p          index = searchsorted(cumsum(S²)/ΣS², p²)
    then              index clamped to [0, n−1], k = index + 1, capped at the max rank;
    a zero module     (S[0] ≤ 1e-6, kohya's MIN_SV) keeps rank 1.

Where we differ, deliberately: kohya's n is min(out, in) and its cap is --new_rank, so a module could come out
*above* its own rank (zero singular values padded in); here the cap is also the module's own rank — rank only
goes down. The new factors keep the scale: B' = U_k·S_k, A' = V_kᵀ, alpha' = s·k (classic) or s·√k (rsLoRA),
so scale' = s and the delta is the best rank-k approximation of the old one.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..adapter import LoraModule
from ..records import ResizeModuleRecord
from .params import Params
from .svd import Refactored, Spectrum, dense_svd, factored_svd, factors_in, refactor_dense

MIN_SV = 1e-6


def _sv_ratio(S: torch.Tensor, p: float) -> int:
    return int((S > S[0] / p).sum()) - 1


def _sv_cumulative(S: torch.Tensor, p: float) -> int:
    return int(torch.searchsorted(torch.cumsum(S, 0) / S.sum(), p))


def _sv_fro(S: torch.Tensor, p: float) -> int:
    squared = S.square()
    return int(torch.searchsorted(torch.cumsum(squared, 0) / squared.sum(), p * p))


DYNAMIC_RULES = {"sv_ratio": _sv_ratio, "sv_cumulative": _sv_cumulative, "sv_fro": _sv_fro}
DynamicRule = Literal["sv_ratio", "sv_cumulative", "sv_fro"]


class RankRule(Params):
    """How to choose each module's new rank: a fixed ``rank``, or a kohya ``dynamic`` rule with ``param``
    (sv_ratio: p ≥ 1; sv_cumulative, sv_fro: 0 < p ≤ 1) capped by ``max_rank``. ``conv_rank``: the k×k convolutions'
    own (LoraModule.spatial; sd-scripts' --new_conv_rank, --conv_dim): their fixed rank in place of ``rank``, or with
    a dynamic rule their cap in place of ``max_rank`` (kohya's --new_conv_rank caps their dynamic rank)."""

    rank: int | None = Field(None, gt=0)
    dynamic: DynamicRule | None = None
    param: float | None = None
    max_rank: int | None = Field(None, gt=0)
    conv_rank: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_rule(self) -> "RankRule":
        if (self.rank is None) == (self.dynamic is None):
            raise ValueError("give either a `rank` or a `dynamic` rule (sv_ratio, sv_cumulative, sv_fro)")
        if self.dynamic is None:
            if self.param is not None or self.max_rank is not None:
                raise ValueError("`param` and `max_rank` go with a `dynamic` rule, not with a fixed `rank`")
            return self
        if self.param is None:
            raise ValueError(f"{self.dynamic} needs a `param`")
        if self.dynamic == "sv_ratio" and self.param < 1:
            raise ValueError(f"sv_ratio `param` is the ratio S[0]/S[k] to keep, ≥ 1 (got {self.param:g})")
        if self.dynamic != "sv_ratio" and not 0 < self.param <= 1:
            raise ValueError(f"{self.dynamic} `param` is a fraction in (0, 1] (got {self.param:g})")
        return self

    def for_module(self, module: LoraModule) -> "RankRule":
        """The rule that ranks ``module``: with a ``conv_rank``, a k×k convolution's has it as its rank (or cap)."""
        if self.conv_rank is None or not module.spatial:
            return self
        limit = "rank" if self.dynamic is None else "max_rank"
        return self.model_copy(update={limit: self.conv_rank, "conv_rank": None})

    def choose(self, S: torch.Tensor, current: int, keep_zero_rank: bool = False, min_sv: float = MIN_SV) -> int:
        """The new rank for a module of rank ``current`` whose B·A has singular values S (``keep_zero_rank``: a zero
        module gets a fixed rank like the others, zero factors, instead of kohya's rank 1). A module is zero when
        S[0] ≤ ``min_sv`` (kohya's MIN_SV; 0 where S is known not to be zero: extract's deltas, whose dynamic rank
        must not depend on their scale)."""
        n = S.numel()
        if n == 0 or (float(S[0]) <= min_sv and not (keep_zero_rank and self.dynamic is None)):
            return 1
        if self.dynamic is None:
            return min(self.rank, current, n)
        k = min(max(DYNAMIC_RULES[self.dynamic](S, self.param), 0), n - 1) + 1
        return min(k, self.max_rank or current, current)


def alpha_for_scale(scale: float, rank: int, scale_mode: str) -> float:
    """The alpha that gives ``scale`` at ``rank``: s·r (classic, s = alpha/r) or s·√r (rsLoRA, s = alpha/√r)."""
    return scale * (math.sqrt(rank) if scale_mode == "rslora" else rank)


def resize_module(
    module: LoraModule, rule: RankRule, scale_mode: str, device: torch.device, dtype: torch.dtype, *,
    keep_zero_rank: bool = False, exact: bool = False, out: torch.dtype | None = None,
) -> tuple[LoraModule, ResizeModuleRecord]:
    """The module at its new rank (factors in ``out``, default the module's dtype, on the CPU) and its report line. A
    LoHa/LoKr module becomes a LoRA: its dense ΔW/scale is factorized (``factorize_dense``; its rank may be above the
    product's r, up to the ΔW's own)."""
    before = module.rank
    rule = rule.for_module(module)
    if module.product is not None:
        D = module.product.to(device, dtype).rows()
        made = factorize_dense(D, rule, exact, keep_zero_rank)
        if made.spectrum is None:  # a randomized SVD: its top singular values only, its error measured
            fro, total = math.sqrt(max(0.0, 1.0 - made.error * made.error)), None
        else:
            fro, total = made.spectrum.retained(int(made.A.shape[0]))
        return _resized(replace(module, product=None), made.B, made.A, before or min(D.shape), fro, total, scale_mode,
                        out)
    B2, A2 = module.matrices()
    spectrum = factored_svd(B2.to(device=device, dtype=dtype), A2.to(device=device, dtype=dtype))
    k = rule.choose(spectrum.S, module.rank, keep_zero_rank)
    B, A = spectrum.truncate(k)
    fro, total = spectrum.retained(k)
    return _resized(module, B, A, module.rank, fro, total, scale_mode, out)


def _resized(module: LoraModule, B: torch.Tensor, A: torch.Tensor, before: int, fro: float, total: float | None,
             scale_mode: str, out: torch.dtype | None) -> tuple[LoraModule, ResizeModuleRecord]:
    k = int(A.shape[0])
    alpha = alpha_for_scale(module.scale, k, scale_mode)
    out = out or module.dtype  # (the file's: a factor composed on read in float32 is not written so)
    resized = module.with_factors(*factors_in(B, A, out), alpha, module.scale)
    record = ResizeModuleRecord(
        name=module.name, kind=module.kind, spatial=module.spatial, kernel=module.kernel, rank_before=before,
        rank_after=k, alpha_after=alpha, fro_retained=fro, sum_retained=total, zero=not B.any(),
    )
    return resized, record


def factorize_dense(D: torch.Tensor, rule: RankRule, exact: bool = False, keep_zero_rank: bool = False,
                    min_sv: float = MIN_SV) -> Refactored:
    """Factors B·A ≈ D of a dense matrix at the rank ``rule`` gives: what extract does to a model's delta and resize
    to a LoHa/LoKr's ΔW (neither has a factored SVD). A fixed rank goes through refactor_dense (a randomized SVD
    with power iterations when both sides are above svd.RANDOMIZED_MIN_DIM, unless ``exact``: minutes → seconds for
    an LLM's 4096×11008 module; its error measured, and no ``spectrum``); the dynamic rules need every singular
    value, so they take the whole spectrum (kohya's way). The rank of an exact spectrum is ``rule.choose``'s, with
    min(D.shape) as the current rank (``keep_zero_rank``, ``min_sv``: see RankRule.choose). A zero D has the one singular value
    0 (rank 1, as RankRule.choose gives any zero module)."""
    if not D.any():
        spectrum = Spectrum(D.new_zeros(D.shape[0], 1), D.new_zeros(1), D.new_zeros(1, D.shape[1]))
    elif rule.dynamic is None:
        made = refactor_dense(D, rule.rank, exact=exact)
        k = None if made.spectrum is None else rule.choose(made.spectrum.S, min(D.shape), keep_zero_rank, min_sv)
        if k is None or k == made.A.shape[0]:
            return made
        spectrum = made.spectrum  # (a module rule.choose calls zero: rank 1, below what was made)
    else:
        spectrum = dense_svd(D)
    k = rule.choose(spectrum.S, min(D.shape), keep_zero_rank, min_sv)
    B, A = spectrum.truncate(k)
    return Refactored(B, A, "exact", spectrum.tail_error(k), spectrum)
