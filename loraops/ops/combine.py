"""Methods that combine several adapters, module by module: a registry filled by a decorator (mergekit style),
each method with a pydantic params model.

Every input i contributes to a module the task vector τᵢ = sᵢ·Bᵢ·Aᵢ (its full scale, rsLoRA and patterns
included) with the user weight wᵢ; an input without the module contributes τᵢ = 0 (a rank-0 term, so its
weight still counts where a method normalizes by the weights).

* ``cat``     B = [w₁s₁B₁ | w₂s₂B₂ | …], A = [A₁; A₂; …], scale 1: exactly Σ wᵢτᵢ, rank = Σ rᵢ.
* ``linear``  (alias ``svd``) Σ wᵢτᵢ re-factorized to rank k by the exact factored SVD of the cat factors (never
              forming the dense delta); lossless when k ≥ Σ rᵢ, else the best rank-k approximation.
* element-wise methods (mergekit's generalized task arithmetic, on each module's dense τᵢ, then re-factorized
  to rank k by an SVD of the dense result — exact, or randomized for large modules, see ops/svd.py). The result
  is built row block by row block from the factors: the only whole-module matrix is the result itself (a 70B
  model's MLP module is 940 MB in float32; holding every τᵢ, a top-k's indices and the masks took 9 GB for two).
  ``ties``            trim each τᵢ to its top ⌊density·n⌋ entries by magnitude; elect the sign of Σ wᵢτ̂ᵢ per entry;
                      disjoint mean Σ wᵢτ̂ᵢ·mᵢ / Σ wᵢ·mᵢ over the entries mᵢ that agree (normalize=True).
  ``dare_ties``       drop each entry with probability 1−density, rescale survivors by 1/density; elect sign;
                      Σ wᵢτ̃ᵢ·mᵢ (normalize=False: DARE already preserves the expectation).
  ``dare_linear``     drop and rescale as DARE; Σ wᵢτ̃ᵢ.
  ``magnitude_prune`` trim as TIES; Σ wᵢτ̂ᵢ (PEFT's method; no sign election).
  ``normalize`` divides by the summed weights of the contributing entries, as mergekit does.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from pydantic import Field

from .params import Params
from .svd import Refactored, refactor_dense, refactor_product, row_blocks


@dataclass
class Term:
    """One input's share of a module: 2-D factors on the compute device, its scale and the user weight.
    An input without the module is a rank-0 term (B out×0, A 0×in): a zero delta."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float
    weight: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self, rows: slice = slice(None)) -> torch.Tensor:
        return (self.B[rows] @ self.A).mul_(self.scale)


@dataclass
class Context:
    """What a method may need beyond the terms: the module's name (it seeds DARE) and the output shape."""

    module: str
    shape: tuple[int, int]
    exact: bool = False
    """Force an exact dense SVD (precise mode)."""


MethodFn = Callable[[list[Term], Params, int, Context], Refactored]


@dataclass(frozen=True)
class Method:
    name: str
    params: type[Params]
    run: MethodFn
    default_rank: Callable[[list[int]], int] | None
    """Rank used when the caller gives none, from the present inputs' ranks; None: the method fixes the rank."""


METHODS: dict[str, Method] = {}


def register(*names: str, params: type[Params], default_rank: Callable[[list[int]], int] | None):
    def decorate(fn: MethodFn) -> MethodFn:
        for name in names:
            METHODS[name] = Method(name, params, fn, default_rank)
        return fn

    return decorate


class NoParams(Params):
    pass


def _stacked(terms: list[Term]) -> tuple[torch.Tensor, torch.Tensor]:
    """The cat factors B = [w₁s₁B₁ | …], A = [A₁; …] of Σ wᵢτᵢ."""
    B = torch.cat([t.B * (t.weight * t.scale) for t in terms], dim=1)
    return B, torch.cat([t.A for t in terms], dim=0)


@register("cat", params=NoParams, default_rank=None)
def cat(terms: list[Term], params: Params, rank: int, ctx: Context) -> Refactored:
    B, A = _stacked(terms)
    return Refactored(B, A, "none", 0.0)


@register("linear", "svd", params=NoParams, default_rank=sum)
def linear(terms: list[Term], params: Params, rank: int, ctx: Context) -> Refactored:
    return refactor_product(*_stacked(terms), rank)


# ---- element-wise methods (generalized task arithmetic on dense deltas) -------------------------------------------


class DensityParams(Params):
    density: float = Field(gt=0, le=1, description="fraction of each task vector's entries kept")


class TiesParams(DensityParams):
    normalize: bool = True


class DareParams(DensityParams):
    seed: int = 0
    normalize: bool = False


class PruneParams(DensityParams):
    normalize: bool = False


Sparsifier = Callable[[torch.Tensor], torch.Tensor]
"""One input's sparsification, called on its delta's row blocks in order (it may keep state across them)."""


def trim(term: Term, density: float, blocks: list[slice], ctx: Context, index: int, params: Params) -> Sparsifier:
    """Keep the ⌊density·n⌋ (at least 1) largest-magnitude entries of one task vector (TIES' trim); of entries equal
    to the smallest kept magnitude, the first in row-major order (torch.topk, as mergekit uses, keeps any)."""
    if density >= 1:
        return lambda block: block
    threshold, equal_kept = kth_largest_magnitude(term, max(1, int(density * math.prod(ctx.shape))), blocks)
    remaining = [equal_kept]

    def sparsify(block: torch.Tensor) -> torch.Tensor:
        pattern = _magnitude_bits(block)
        keep, equal = pattern > threshold, pattern == threshold
        count = int(equal.sum())
        if count > remaining[0]:
            equal &= (equal.reshape(-1).cumsum(0) <= remaining[0]).reshape(equal.shape)
        remaining[0] -= min(count, remaining[0])
        return torch.where(keep | equal, block, torch.zeros((), dtype=block.dtype, device=block.device))

    return sparsify


def _magnitude_bits(block: torch.Tensor) -> torch.Tensor:
    """|entries| as their IEEE bit patterns: integers in the same order as the non-negative values."""
    return block.abs().view(torch.int64 if block.dtype == torch.float64 else torch.int32)


def kth_largest_magnitude(term: Term, k: int, blocks: list[slice]) -> tuple[int, int]:
    """(bit pattern of the k-th largest |entry| of the term's delta, how many entries equal to it are among the k
    largest). Exact, by a radix select on the bit patterns, 16 bits a pass (two passes in float32, four in
    float64), each recomputing the delta block by block: neither the whole delta nor a sort of it is ever held."""
    width = term.A.element_size() * 8
    prefix, wanted = 0, k
    for shift in range(width - 16, -1, -16):
        counts = torch.zeros(1 << 16, dtype=torch.int64, device=term.A.device)
        for rows in blocks:
            pattern = _magnitude_bits(term.delta(rows)).reshape(-1)
            if shift + 16 < width:  # only entries whose higher digits are the prefix found so far
                pattern = pattern[(pattern >> (shift + 16)) == (prefix >> (shift + 16))]
            counts += torch.bincount((pattern >> shift) & 0xFFFF, minlength=1 << 16)
        at_least = counts.flip(0).cumsum(0)  # [j]: entries whose digit is ≥ 65535 − j
        j = int(torch.searchsorted(at_least, torch.tensor([wanted], device=at_least.device)))
        wanted -= int(at_least[j - 1]) if j else 0
        prefix |= (0xFFFF - j) << shift
    return prefix, wanted


def module_seed(seed: int, module: str, index: int) -> int:
    """A seed per (user seed, module, input): DARE's masks do not depend on which other modules or inputs exist,
    nor on the order modules are processed in."""
    digest = hashlib.sha256(f"{seed}\0{module}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def drop_and_rescale(term: Term, density: float, blocks: list[slice], ctx: Context, index: int,
                     params: DareParams) -> Sparsifier:
    """DARE: drop each entry with probability 1 − density, rescale the survivors by 1/density. The mask is drawn
    in float32 from a generator on the compute device seeded per module and input, block after block (on the CPU
    the same numbers as one draw of the whole shape): reproducible on one device, but CPU and CUDA generators draw
    different numbers. Drawing on the CPU for every device was measured and dropped: 2 s per 8192×28672 module on
    2 cores (a serial Mersenne twister), which would dwarf a GPU's few milliseconds; a counter-based hash in torch
    integer ops is device-independent but ten times slower again on the CPU."""
    if density >= 1:
        return lambda block: block
    generator = torch.Generator(device=term.A.device).manual_seed(module_seed(params.seed, ctx.module, index))

    def sparsify(block: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(block.shape, generator=generator, device=block.device) < density
        return torch.where(keep, block / density, torch.zeros((), dtype=block.dtype, device=block.device))

    return sparsify


def task_arithmetic(
    terms: list[Term], params: DensityParams, ctx: Context, sparsifier: Callable[..., Sparsifier], consensus: bool
) -> torch.Tensor:
    """mergekit's generalized task arithmetic on one module: sparsify each τᵢ, weight, optionally keep only the
    entries that agree with the elected sign (sign of Σ wᵢτᵢ, ties to +), sum, optionally normalize. Every step is
    per entry, so the result is made row block by row block (see the module docstring)."""
    blocks = row_blocks(ctx.shape)
    sparsify = [sparsifier(t, params.density, blocks, ctx, i, params) for i, t in enumerate(terms)]
    mixed = torch.empty(ctx.shape, dtype=terms[0].A.dtype, device=terms[0].A.device)
    for rows in blocks:
        weighted = [(t.weight, s(t.delta(rows)).mul_(t.weight)) for t, s in zip(terms, sparsify)]
        out = mixed[rows].zero_()
        divisor = torch.zeros_like(out) if params.normalize else None
        if consensus:
            elected = sum(tau for _, tau in weighted) >= 0
        for weight, tau in weighted:
            if consensus:
                agree = ((tau > 0) == elected) & (tau != 0)
                tau = tau * agree
            out += tau
            if divisor is not None:
                divisor += agree * weight if consensus else weight
        if divisor is not None:
            # mergekit: entries with no contribution (or weights summing to ~0) are left undivided.
            divisor[divisor.abs() < 1e-8] = 1
            out /= divisor
    return mixed


def _elementwise(sparsifier: Callable[..., Sparsifier], consensus: bool) -> MethodFn:
    def run(terms: list[Term], params: DensityParams, rank: int, ctx: Context) -> Refactored:
        return refactor_dense(task_arithmetic(terms, params, ctx, sparsifier, consensus), rank, exact=ctx.exact)

    return run


register("ties", params=TiesParams, default_rank=max)(_elementwise(trim, consensus=True))
register("dare_ties", params=DareParams, default_rank=max)(_elementwise(drop_and_rescale, consensus=True))
register("dare_linear", params=DareParams, default_rank=max)(_elementwise(drop_and_rescale, consensus=False))
register("magnitude_prune", params=PruneParams, default_rank=max)(_elementwise(trim, consensus=False))
