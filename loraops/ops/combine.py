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
  ``breadcrumbs``     drop each τᵢ's ⌊gamma·n⌋ largest-magnitude entries and its smallest, so that ⌊density·n⌋
                      remain (mergekit's magnitude_outliers); Σ wᵢτ̂ᵢ.
  ``breadcrumbs_ties`` the same, with sign election (normalize=False).
  ``della``           keep each entry with a probability from its magnitude's rank in its row, density−epsilon for
                      the smallest to density+epsilon for the largest, rescale survivors by 1/p (mergekit's
                      rank_magnitude_sampling, the DELLA paper's MagPrune); elect sign; disjoint mean (normalize=True).
  ``della_linear``    sample and rescale as DELLA; Σ wᵢτ̃ᵢ.
  ``magnitude_prune`` trim as TIES; Σ wᵢτ̂ᵢ (PEFT's method; no sign election).
  ``normalize`` divides by the summed weights of the contributing entries, as mergekit does; ``lambda`` (mergekit's
  methods) scales the mixed result last, after that division.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Annotated, Callable, Literal, Sequence

import torch
from pydantic import ConfigDict, Field, model_serializer, model_validator

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
    transposed: bool = False
    """The base weight holds (B·A)ᵀ (an embedding, a Conv1D): a method that works on the weight's rows (DELLA) works
    on this layout's columns."""


MethodFn = Callable[[list[Term], Params, int, Context], Refactored]


@dataclass(frozen=True)
class Method:
    name: str
    params: type[Params]
    run: MethodFn
    default_rank: Callable[[list[int]], int] | None
    """Rank used when the caller gives none, from the present inputs' ranks; None: the method fixes the rank."""
    weights_scale: bool = True
    """Multiplying every weight by λ multiplies the result by λ (where normalize is off): what a method without
    ``lambda`` tells the user to do instead."""
    check_weights: Callable[[str, Sequence[float]], None] | None = None
    """Refuses input counts or weights the method has no meaning for (InvalidInputError), before any work."""


METHODS: dict[str, Method] = {}


def register(*names: str, params: type[Params], default_rank: Callable[[list[int]], int] | None,
             weights_scale: bool = True, check_weights: Callable[[str, Sequence[float]], None] | None = None):
    def decorate(fn: MethodFn) -> MethodFn:
        for name in names:
            METHODS[name] = Method(name, params, fn, default_rank, weights_scale, check_weights)
        return fn

    return decorate


class CombineParams(Params):
    """Base of the combine methods' parameters. Options added after results were recorded (``consensus``,
    ``rescale``) are dumped (report, lineage) only when they differ from their default, which is what every method
    did before them: so one computation has one record, before and after."""

    model_config = ConfigDict(serialize_by_alias=True)  # "lambda", a Python keyword, is held as lambda_

    @model_serializer(mode="wrap")
    def _omit_later_defaults(self, handler):
        data = handler(self)
        for name, default in LATER_DEFAULTS.items():
            if name in data and data[name] == default:
                del data[name]
        return data


LATER_DEFAULTS = {"consensus": "sum", "rescale": True}


class NoParams(CombineParams):
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


class DensityParams(CombineParams):
    density: float = Field(gt=0, le=1, description="fraction of each task vector's entries kept")


Lambda = Annotated[float, Field(alias="lambda", description="mergekit's scale of the mixed result, after normalize")]
Consensus = Annotated[Literal["sum", "count"], Field(
    description="sign election: the sign of Σ wᵢτᵢ (sum, TIES') or of Σ sign(wᵢτᵢ) (count: one vote per input)")]
Rescale = Annotated[bool, Field(description="divide the survivors by their keep probability (DARE's 1/density, "
                                            "DELLA's 1/p)")]


class TiesParams(DensityParams):
    consensus: Consensus = "sum"
    normalize: bool = True
    lambda_: Lambda = 1.0


class DareParams(DensityParams):
    seed: int = 0
    rescale: Rescale = True
    normalize: bool = False
    lambda_: Lambda = 1.0


class DareTiesParams(DareParams):
    consensus: Consensus = "sum"


class PruneParams(DensityParams):
    normalize: bool = False


class BreadcrumbsParams(DensityParams):
    gamma: float = Field(0.01, ge=0, lt=1, description="fraction of the largest-magnitude entries dropped")
    normalize: bool = False
    lambda_: Lambda = 1.0

    @model_validator(mode="after")
    def check_fits(self):
        # mergekit lowers gamma silently until the density fits; a value the user gave is not changed behind them,
        # but the default (0.01) is, as there (drop_outliers drops at most n − ⌊density·n⌋): density 0.995 is no error.
        if self.gamma + self.density > 1 + 1e-9 and "gamma" in self.model_fields_set:
            raise ValueError(f"gamma ({self.gamma:g}) + density ({self.density:g}) must be at most 1: a gamma share "
                             "of the largest magnitudes is dropped, a density share kept below them")
        return self


class BreadcrumbsTiesParams(BreadcrumbsParams):
    consensus: Consensus = "sum"


class DellaLinearParams(DensityParams):
    epsilon: float = Field(0.15, ge=0, description="half-width of the keep probabilities around density")
    seed: int = 0
    rescale: Rescale = True
    normalize: bool = False
    lambda_: Lambda = 1.0

    @model_validator(mode="after")
    def check_fits(self):
        # as mergekit: every probability density ± epsilon must be in (0, 1); at density 1 nothing is dropped
        # (epsilon 0 is allowed: every probability is density, DARE's mask with DELLA's draws)
        if not (0 < self.density - self.epsilon and self.density + self.epsilon < 1) and (
                self.density < 1 or "epsilon" in self.model_fields_set):
            raise ValueError(f"density ± epsilon ({self.density - self.epsilon:g} to {self.density + self.epsilon:g})"
                             " must lie inside (0, 1): they are keep probabilities")
        return self


class DellaParams(DellaLinearParams):
    normalize: bool = True
    consensus: Consensus = "sum"


Sparsifier = Callable[[torch.Tensor], torch.Tensor]
"""One input's sparsification, called on its delta's row blocks in order (it may keep state across them)."""


def _unchanged(block: torch.Tensor) -> torch.Tensor:
    return block


def _zero(block: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=block.dtype, device=block.device)


def trim(term: Term, density: float, blocks: list[slice], ctx: Context, index: int, params: Params) -> Sparsifier:
    """Keep the ⌊density·n⌋ (at least 1) largest-magnitude entries of one task vector (TIES' trim); of entries equal
    to the smallest kept magnitude, the first in row-major order (torch.topk, as mergekit uses, keeps any)."""
    if density >= 1:
        return _unchanged
    [top] = kth_largest_magnitudes(term.delta, [max(1, int(density * math.prod(ctx.shape)))], blocks, term.A)
    mask = top.mask()
    return lambda block: torch.where(mask(_magnitude_bits(block)), block, _zero(block))


def drop_outliers(term: Term, density: float, blocks: list[slice], ctx: Context, index: int,
                  params: BreadcrumbsParams) -> Sparsifier:
    """Model Breadcrumbs (mergekit's magnitude_outliers): of the entries in order of decreasing magnitude, drop the
    first ⌊gamma·n⌋ and keep the next ⌊density·n⌋ (at least 1); equal magnitudes are ordered row-major, as in trim.
    Two exact thresholds over the whole module (one radix select), then a mask per row block."""
    if density >= 1:
        return _unchanged
    n = math.prod(ctx.shape)
    kept = max(1, int(density * n))
    dropped = min(int(params.gamma * n), n - kept)
    if not dropped:
        return trim(term, density, blocks, ctx, index, params)
    outliers, top = (k.mask() for k in kth_largest_magnitudes(term.delta, [dropped, dropped + kept], blocks, term.A))

    def sparsify(block: torch.Tensor) -> torch.Tensor:
        bits = _magnitude_bits(block)
        return torch.where(top(bits) & ~outliers(bits), block, _zero(block))

    return sparsify


def _magnitude_bits(block: torch.Tensor) -> torch.Tensor:
    """|entries| as their IEEE bit patterns: integers in the same order as the non-negative values."""
    return block.abs().view(torch.int64 if block.dtype == torch.float64 else torch.int32)


@dataclass(frozen=True)
class Largest:
    """Where the k largest magnitudes of a matrix end: the bit pattern of the k-th, and how many entries equal to it
    are among the k."""

    threshold: int
    equal_kept: int

    def mask(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A mask of the k largest, to be called on the bit patterns of the matrix's row blocks in order (once each):
        entries above the k-th magnitude, and of those equal to it the first ones in row-major order, so that exactly
        k are kept whatever the blocks."""
        remaining = [self.equal_kept]

        def mask(bits: torch.Tensor) -> torch.Tensor:
            equal = bits == self.threshold
            count = int(equal.sum())
            if count > remaining[0]:
                equal &= (equal.reshape(-1).cumsum(0) <= remaining[0]).reshape(equal.shape)
            remaining[0] -= min(count, remaining[0])
            return (bits > self.threshold) | equal

        return mask


def kth_largest_magnitudes(values: Callable[[slice], torch.Tensor], ks: Sequence[int], blocks: list[slice],
                           like: torch.Tensor) -> list[Largest]:
    """For each k (1 ≤ k ≤ n), where the k largest |entries| of a matrix end; ``values(rows)`` computes its row blocks
    (a term's delta, the variance across inputs), with ``like``'s dtype and device. Exact, by a radix select on the
    bit patterns, 16 bits a pass (two passes in float32, four in float64), each recomputing the matrix block by
    block, once for all the ks: neither the whole matrix nor a sort of it is ever held."""
    width = like.element_size() * 8
    prefixes, wanted = [0] * len(ks), list(ks)
    ones = torch.ones((), dtype=torch.int64, device=like.device)
    for shift in range(width - 16, -1, -16):
        high = shift + 16  # the digits above this pass's, fixed by the passes before it
        counts = {p >> high if high < width else 0: torch.zeros(1 << 16, dtype=torch.int64, device=like.device)
                  for p in prefixes}  # one histogram per prefix found so far (ks with the same prefix share it)
        for rows in blocks:
            pattern = _magnitude_bits(values(rows)).reshape(-1)
            upper = pattern >> high if high < width else None
            for prefix, hist in counts.items():
                part = pattern if upper is None else pattern[upper == prefix]  # entries under this prefix
                # (not torch.bincount, which allocates 65536 bins per call: 7 ms for a 40-entry block against
                # 0.003 ms, 14 ms for a 4M-entry one against 5.6 ms, on 2 threads)
                hist.index_add_(0, (part >> shift) & 0xFFFF, ones.expand(part.numel()))
        for i, prefix in enumerate(prefixes):
            at_least = counts[prefix >> high if high < width else 0].flip(0).cumsum(0)  # [j]: digit ≥ 65535 − j
            j = int(torch.searchsorted(at_least, torch.tensor([wanted[i]], device=at_least.device)))
            wanted[i] -= int(at_least[j - 1]) if j else 0
            prefixes[i] |= (0xFFFF - j) << shift
    return [Largest(prefix, equal) for prefix, equal in zip(prefixes, wanted)]


def module_seed(seed: int, module: str, index: int) -> int:
    """A seed per (user seed, module, input): DARE's masks do not depend on which other modules or inputs exist,
    nor on the order modules are processed in."""
    digest = hashlib.sha256(f"{seed}\0{module}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def uniforms(term: Term, ctx: Context, index: int,
             params: DareParams | DellaLinearParams) -> Callable[[torch.Size], torch.Tensor]:
    """The uniform draws of one input's random mask, block after block, in float32 from a generator on the compute
    device seeded per module and input (on the CPU the same numbers as one draw of the whole shape): reproducible
    on one device, but CPU and CUDA generators draw different numbers. Drawing on the CPU for every device was
    measured and dropped: 2 s per 8192×28672 module on 2 cores (a serial Mersenne twister), which would dwarf a
    GPU's few milliseconds; a counter-based hash in torch integer ops is device-independent but ten times slower
    again on the CPU."""
    device = term.A.device
    generator = torch.Generator(device=device).manual_seed(module_seed(params.seed, ctx.module, index))
    return lambda shape: torch.rand(shape, generator=generator, device=device)


def drop_and_rescale(term: Term, density: float, blocks: list[slice], ctx: Context, index: int,
                     params: DareParams) -> Sparsifier:
    """DARE: drop each entry with probability 1 − density (uniform draw ≥ density), rescale the survivors by
    1/density (``rescale``; mergekit's rescale: false keeps them as they are)."""
    if density >= 1:
        return _unchanged
    draw = uniforms(term, ctx, index, params)
    divisor = density if params.rescale else 1
    return lambda block: torch.where(draw(block.shape) < density, block / divisor, _zero(block))


def sample_by_rank(term: Term, density: float, blocks: list[slice], ctx: Context, index: int,
                   params: DellaLinearParams) -> Sparsifier:
    """DELLA's MagPrune (mergekit's rank_magnitude_sampling): in each row, the entry of magnitude rank r (0 for the
    smallest, equal magnitudes ranked in column order) of m is kept with probability
    p = density − epsilon + 2·epsilon·r/(m − 1) (density for a row of one), by a uniform draw < p as DARE's, and
    divided by p (``rescale``): each entry keeps its expectation. Rows are whole in every block."""
    if density >= 1:
        return _unchanged
    draw = uniforms(term, ctx, index, params)
    low, span = density - params.epsilon, 2 * params.epsilon

    def sparsify(block: torch.Tensor) -> torch.Tensor:
        cols = block.shape[1]
        if cols == 1:
            p = torch.full_like(block, density)
        else:  # the probabilities in rank order, put where each rank's entry is (sorting the bit patterns: a third
            # faster than the floats, same order)
            by_rank = torch.arange(cols, dtype=block.dtype, device=block.device).mul_(span / (cols - 1)).add_(low)
            order = _magnitude_bits(block).argsort(dim=1, stable=True)
            p = torch.empty_like(block).scatter_(1, order, by_rank.expand_as(order))
            del order
        return torch.where(draw(block.shape) < p, block / p if params.rescale else block, _zero(block))

    return sparsify


def elected_positive(weighted: list[torch.Tensor], consensus: str) -> torch.Tensor:
    """Where the elected sign is + (ties to +): the sign of Σ wᵢτᵢ (``sum``, TIES'), or of Σ sign(wᵢτᵢ) (``count``:
    one vote per input that has the entry), as mergekit's get_mask."""
    if consensus == "count":
        return sum(torch.sign(tau) for tau in weighted) >= 0
    return sum(weighted) >= 0


def mix(out: torch.Tensor, taus: list[torch.Tensor], weights: Sequence[float], consensus: str | None, normalize: bool,
        voters: list[torch.Tensor] | None = None) -> None:
    """One block of mergekit's mix, into ``out``: Σ τᵢ (already weighted), of the entries whose sign agrees with the
    one elected from ``voters`` (default: the τᵢ) when ``consensus``; divided, when ``normalize``, by the weights
    that contribute to each entry."""
    out.zero_()
    divisor = torch.zeros_like(out) if normalize else None
    if consensus:
        elected = elected_positive(taus if voters is None else voters, consensus)
    for weight, tau in zip(weights, taus):
        if consensus:
            agree = ((tau > 0) == elected) & (tau != 0)
            tau = tau * agree
        out += tau
        if divisor is not None:
            divisor += agree * weight if consensus else weight
    if divisor is not None:
        # mergekit: entries with no agreeing contribution (sign election), or whose weights sum to ~0 (no
        # election), are left undivided; agreeing weights are positive, so tiny ones still divide
        divisor[divisor == 0 if consensus else divisor.abs() < 1e-8] = 1
        out /= divisor


def task_arithmetic(
    terms: list[Term], params: DensityParams, ctx: Context, sparsifier: Callable[..., Sparsifier], consensus: bool
) -> torch.Tensor:
    """mergekit's generalized task arithmetic on one module: sparsify each τᵢ, weight, optionally keep only the
    entries that agree with the elected sign, sum, optionally normalize. Every step is per entry, so the result is
    made row block by row block (see the module docstring)."""
    blocks = row_blocks(ctx.shape)
    sparsify = [sparsifier(t, params.density, blocks, ctx, i, params) for i, t in enumerate(terms)]
    mixed = torch.empty(ctx.shape, dtype=terms[0].A.dtype, device=terms[0].A.device)
    for rows in blocks:
        out = mixed[rows]
        mix(out, [s(t.delta(rows)).mul_(t.weight) for t, s in zip(terms, sparsify)], [t.weight for t in terms],
            params.consensus if consensus else None, params.normalize)
        if getattr(params, "lambda_", 1.0) != 1:
            out *= params.lambda_
    return mixed


def _elementwise(sparsifier: Callable[..., Sparsifier], consensus: bool, by_rows: bool = False) -> MethodFn:
    """A method from a sparsifier. ``by_rows``: the sparsifier works on the rows of the base weight as stored (as
    mergekit's does on the checkpoint's tensor), so a transposed module's terms are transposed too — its delta
    (B·A)ᵀ = Aᵀ·Bᵀ is built by rows of the weight — and the result is transposed back (a view) for the SVD."""
    def run(terms: list[Term], params: DensityParams, rank: int, ctx: Context) -> Refactored:
        if by_rows and ctx.transposed:
            flipped = [Term(t.A.T, t.B.T, t.scale, t.weight) for t in terms]
            mixed = task_arithmetic(flipped, params, replace(ctx, shape=ctx.shape[::-1]), sparsifier, consensus)
            return refactor_dense(mixed.T, rank, exact=ctx.exact)
        return refactor_dense(task_arithmetic(terms, params, ctx, sparsifier, consensus), rank, exact=ctx.exact)

    return run


register("ties", params=TiesParams, default_rank=max)(_elementwise(trim, consensus=True))
register("dare_ties", params=DareTiesParams, default_rank=max)(_elementwise(drop_and_rescale, consensus=True))
register("dare_linear", params=DareParams, default_rank=max)(_elementwise(drop_and_rescale, consensus=False))
register("breadcrumbs", params=BreadcrumbsParams, default_rank=max)(_elementwise(drop_outliers, consensus=False))
register("breadcrumbs_ties", params=BreadcrumbsTiesParams, default_rank=max)(_elementwise(drop_outliers, consensus=True))
register("della", params=DellaParams, default_rank=max)(_elementwise(sample_by_rank, consensus=True, by_rows=True))
register("della_linear", params=DellaLinearParams, default_rank=max)(
    _elementwise(sample_by_rank, consensus=False, by_rows=True))
register("magnitude_prune", params=PruneParams, default_rank=max)(_elementwise(trim, consensus=False))
