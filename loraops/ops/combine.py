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
  ``sce``             on τᵢ' = wᵢτᵢ: keep the entries of largest variance across the inputs (select_topk), weigh each
                      input by its Σ τᵢ'² there, elect sign, disjoint mean with those weights (mergekit's SCE).
  ``normalize`` divides by the summed weights of the contributing entries, as mergekit does; ``lambda`` (mergekit's
  methods) scales the mixed result last, after that division. ``consensus`` elects the sign from Σ wᵢτᵢ (sum) or from
  a vote of their signs (count); ``rescale`` (DARE, DELLA) divides the survivors by their keep probability;
  ``rescale_norm`` (mergekit's methods; mergekit's current rescale) instead multiplies each sparsified τ̂ᵢ by
  ‖τᵢ‖/‖τ̂ᵢ‖ in l1, l2 or linf over the module, before the weights.
* vector-wise methods, on each module's τᵢ as one vector or as rows/columns of the base weight: the result is a
  combination Σ cᵢτᵢ with a coefficient per vector, computed from inner products of the factors (never a dense
  delta) and re-factorized exactly from the cat factors (lossless at rank Σ rᵢ).
  ``nuslerp``         two inputs: spherical interpolation of τ₁ and τ₂ at t = w₂/(w₁ + w₂) (mergekit's, with a base).
  ``model_stock``     t·mean(wᵢτᵢ), t from the mean angle between the wᵢτᵢ (mergekit's, the base at ΔW = 0).
  ``multislerp``      two or more inputs: the weighted mean of the τᵢ's directions on the sphere, at the weighted mean
                      of their norms (mergekit's, with a base).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Annotated, Callable, Iterator, Literal, Sequence

import torch
from pydantic import ConfigDict, Field, model_serializer, model_validator

from ..errors import InvalidInputError, ParameterError
from ..references import is_finite
from .params import Params
from .svd import Refactored, refactor_dense, refactor_product, row_blocks, single_threaded


@dataclass
class Term:
    """One input's share of a module: 2-D factors on the compute device, its scale and the user weight.
    An input without the module is a rank-0 term (B out×0, A 0×in): a zero delta."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float
    weight: float
    params: Params | None = None
    """This input's own parameters, where its density, gamma or epsilon differ from the others' (mergekit's per-model
    parameters); None: the method's."""

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
    check_weights: Callable[[str, Sequence[float], Params], None] | None = None
    """Refuses input counts or weights the method has no meaning for, with its parameters (InvalidInputError), before
    any work."""


METHODS: dict[str, Method] = {}


def register(*names: str, params: type[Params], default_rank: Callable[[list[int]], int] | None,
             weights_scale: bool = True,
             check_weights: Callable[[str, Sequence[float], Params], None] | None = None):
    def decorate(fn: MethodFn) -> MethodFn:
        for name in names:
            METHODS[name] = Method(name, params, fn, default_rank, weights_scale, check_weights)
        return fn

    return decorate


class CombineParams(Params):
    """Base of the combine methods' parameters. Options added after results were recorded (``consensus``,
    ``rescale``, ``rescale_norm``) are dumped (report, lineage) only when they differ from their default, which is what
    every method did before them: so one computation has one record, before and after."""

    model_config = ConfigDict(serialize_by_alias=True)  # "lambda", a Python keyword, is held as lambda_

    @model_validator(mode="before")
    @classmethod
    def _unread_when_whole(cls, data):
        # a task vector kept whole is returned before gamma or epsilon is read (mergekit's sparsify), so at density 1
        # their value is not checked, its range included (a recipe's gamma: 1 on such a model runs in mergekit)
        if isinstance(data, dict) and _number(data.get("density")) and data["density"] >= 1:
            return {key: value for key, value in data.items()
                    if not (key in WHOLE_IGNORES and key in cls.model_fields and _number(value))}
        return data

    @model_serializer(mode="wrap")
    def _omit_later_defaults(self, handler):
        data = handler(self)
        for name, default in LATER_DEFAULTS.items():
            if name in data and data[name] == default:
                del data[name]
        if getattr(self, "density", 0) >= 1:
            # a task vector kept whole is returned before gamma or epsilon is read (as mergekit's sparsify): the
            # record says none applied, rather than a value that changed nothing
            data.update({name: None for name in WHOLE_IGNORES if name in data})
        return data


LATER_DEFAULTS = {"consensus": "sum", "rescale": True, "rescale_norm": None}
WHOLE_IGNORES = ("gamma", "epsilon")
"""The parameters of how entries are dropped, which a density of 1 (nothing dropped) leaves without effect."""


def _number(value) -> bool:
    """A finite number as given (not a bool, not text: those are left to the fields' own checks)."""
    return isinstance(value, (int, float)) and is_finite(value)


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


class MergekitParams(DensityParams):
    """The parameters of mergekit's sparsifying methods (all the element-wise ones but PEFT's magnitude_prune)."""

    rescale_norm: Literal["l1", "l2", "linf"] | None = Field(None, description=(
        "mergekit's current rescale: each sparsified task vector multiplied by ‖τ‖/‖τ̂‖ in this norm (over the "
        "module), in place of DARE's and DELLA's division by the keep probability"))

    @model_validator(mode="after")
    def check_rescale(self):
        # rescale given (on or off) with a norm: on, it would be ignored (the norm replaces the division); the
        # default (rescale on, not given) is what a norm replaces
        if self.rescale_norm is not None and "rescale" in self.model_fields_set:
            raise ValueError("`rescale_norm` is a way to rescale the survivors (in place of the division by their keep "
                             f"probability); it cannot go with `rescale={self.rescale}`")
        return self


def divides_by_keep_probability(params: "DareParams | DellaLinearParams") -> bool:
    """DARE's and DELLA's own rescale (1/density, 1/p): on unless turned off, or replaced by a norm's."""
    return params.rescale and params.rescale_norm is None


class TiesParams(MergekitParams):
    consensus: Consensus = "sum"
    normalize: bool = True
    lambda_: Lambda = 1.0


class DareParams(MergekitParams):
    seed: int = 0
    rescale: Rescale = True
    normalize: bool = False
    lambda_: Lambda = 1.0


class DareTiesParams(DareParams):
    consensus: Consensus = "sum"


class PruneParams(DensityParams):
    normalize: bool = False


class BreadcrumbsParams(MergekitParams):
    gamma: float = Field(0.01, ge=0, lt=1, description="fraction of the largest-magnitude entries dropped")
    normalize: bool = False
    lambda_: Lambda = 1.0

    @model_validator(mode="after")
    def check_fits(self):
        # mergekit lowers gamma silently until the density fits; a value the user gave is not changed behind them,
        # but the default (0.01) is, as there (drop_outliers drops at most n − ⌊density·n⌋): density 0.995 is no error.
        # At density 1 nothing is dropped and gamma is never read (mergekit's magnitude_outliers returns first).
        if self.gamma + self.density > 1 + 1e-9 and "gamma" in self.model_fields_set and self.density < 1:
            raise ValueError(f"`gamma` ({self.gamma:g}) + `density` ({self.density:g}) must be at most 1: a gamma "
                             "share of the largest magnitudes is dropped, a density share kept below them")
        return self


class BreadcrumbsTiesParams(BreadcrumbsParams):
    consensus: Consensus = "sum"


class DellaLinearParams(MergekitParams):
    epsilon: float = Field(0.15, ge=0, description="half-width of the keep probabilities around density")
    seed: int = 0
    rescale: Rescale = True
    normalize: bool = False
    lambda_: Lambda = 1.0

    @model_validator(mode="after")
    def check_fits(self):
        # as mergekit: every probability density ± epsilon must be in (0, 1); at density 1 nothing is dropped and
        # epsilon, given or not, is never read (its della_magprune returns first) (epsilon 0 is allowed: every
        # probability is density, DARE's mask with DELLA's draws)
        if not (0 < self.density - self.epsilon and self.density + self.epsilon < 1) and self.density < 1:
            raise ValueError(f"`density` ± `epsilon` ({self.density - self.epsilon:g} to "
                             f"{self.density + self.epsilon:g}) must lie inside (0, 1): they are keep probabilities")
        return self


class DellaParams(DellaLinearParams):
    normalize: bool = True
    consensus: Consensus = "sum"


Sparsifier = Callable[[torch.Tensor], torch.Tensor]
"""One pass of one input's sparsification, called on its delta's row blocks in order (it may keep state across
them). It may sparsify a block in place and return it: the caller hands over a block it does not read again (one
block-sized temporary less per input, and fewer allocations of varying size to fragment the heap)."""
Sparsification = Callable[[], Sparsifier]
"""One input's sparsification: each call a fresh pass, which keeps the same entries (same masks, same draws)."""


def _passes(sparsifier: Sparsifier) -> Sparsification:
    """The sparsification of a sparsifier that keeps no state: every pass is that one."""
    return lambda: sparsifier


def _unchanged(block: torch.Tensor) -> torch.Tensor:
    return block


def _zero(block: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=block.dtype, device=block.device)


def trim(term: Term, density: float, blocks: list[slice], ctx: Context, index: int,
         params: Params) -> Sparsification:
    """Keep the ⌊density·n⌋ (at least 1) largest-magnitude entries of one task vector (TIES' trim); of entries equal
    to the smallest kept magnitude, the first in row-major order (torch.topk, as mergekit uses, keeps any)."""
    if density >= 1:
        return _passes(_unchanged)
    [top] = kth_largest_magnitudes(term.delta, [max(1, int(density * math.prod(ctx.shape)))], blocks, term.A)

    def new_pass() -> Sparsifier:
        mask = top.mask()
        return lambda block: block.masked_fill_(mask(_magnitude_bits(block)).logical_not_(), 0)

    return new_pass


def drop_outliers(term: Term, density: float, blocks: list[slice], ctx: Context, index: int,
                  params: BreadcrumbsParams) -> Sparsification:
    """Model Breadcrumbs (mergekit's magnitude_outliers): of the entries in order of decreasing magnitude, drop the
    first ⌊gamma·n⌋ and keep the next ⌊density·n⌋ (at least 1); equal magnitudes are ordered row-major, as in trim.
    Two exact thresholds over the whole module (one radix select), then a mask per row block."""
    if density >= 1:
        return _passes(_unchanged)
    n = math.prod(ctx.shape)
    kept = max(1, int(density * n))
    dropped = min(int(params.gamma * n), n - kept)
    if not dropped:
        return trim(term, density, blocks, ctx, index, params)
    largest = kth_largest_magnitudes(term.delta, [dropped, dropped + kept], blocks, term.A)

    def new_pass() -> Sparsifier:
        outliers, top = (k.mask() for k in largest)

        def sparsify(block: torch.Tensor) -> torch.Tensor:
            bits = _magnitude_bits(block)
            dropped = outliers(bits).logical_or_(top(bits).logical_not_())
            del bits
            return block.masked_fill_(dropped, 0)

        return sparsify

    return new_pass


def _magnitude_bits(block: torch.Tensor, owned: bool = False) -> torch.Tensor:
    """|entries| as their IEEE bit patterns: integers in the same order as the non-negative values; ``owned``: a block
    the caller hands over, made its magnitudes in place."""
    magnitudes = block.abs_() if owned else block.abs()
    return magnitudes.view(torch.int64 if block.dtype == torch.float64 else torch.int32)


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
            return (bits > self.threshold).logical_or_(equal)

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
            pattern = _magnitude_bits(values(rows), owned=True).reshape(-1)
            upper = pattern >> high if high < width else None
            for prefix, hist in counts.items():
                part = pattern if upper is None else pattern[upper == prefix]  # entries under this prefix
                # (not torch.bincount, which allocates 65536 bins per call: 7 ms for a 40-entry block against
                # 0.003 ms, 14 ms for a 4M-entry one against 5.6 ms, on 2 threads)
                hist.index_add_(0, (part >> shift).bitwise_and_(0xFFFF), ones.expand(part.numel()))
        for i, prefix in enumerate(prefixes):
            at_least = counts[prefix >> high if high < width else 0].flip(0).cumsum(0)  # [j]: digit ≥ 65535 − j
            j = int(torch.searchsorted(at_least, torch.tensor([wanted[i]], device=at_least.device)))
            wanted[i] -= int(at_least[j - 1]) if j else 0
            prefixes[i] |= (0xFFFF - j) << shift
    return [Largest(prefix, equal) for prefix, equal in zip(prefixes, wanted, strict=True)]


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
                     params: DareParams) -> Sparsification:
    """DARE: drop each entry with probability 1 − density (uniform draw ≥ density), rescale the survivors by
    1/density (``rescale``; mergekit's rescale: false keeps them as they are, and so does a ``rescale_norm``)."""
    if density >= 1:
        return _passes(_unchanged)
    divisor = density if divides_by_keep_probability(params) else 1

    def new_pass() -> Sparsifier:
        draw = uniforms(term, ctx, index, params)
        return lambda block: block.masked_fill_((draw(block.shape) < density).logical_not_(), 0).div_(divisor)

    return new_pass


SORT_PARTS = 8
"""DELLA's per-row ranks are sorted in this many parts of a row block."""


def sample_by_rank(term: Term, density: float, blocks: list[slice], ctx: Context, index: int,
                   params: DellaLinearParams) -> Sparsification:
    """DELLA's MagPrune (mergekit's rank_magnitude_sampling): in each row, the entry of magnitude rank r (0 for the
    smallest, equal magnitudes ranked in column order) of m is kept with probability
    p = density − epsilon + 2·epsilon·r/(m − 1) (density for a row of one), by a uniform draw < p as DARE's, and
    divided by p (``rescale``, not with a ``rescale_norm``): each entry keeps its expectation. Rows are whole in every
    block."""
    if density >= 1:
        return _passes(_unchanged)
    low, span = density - params.epsilon, 2 * params.epsilon
    divides = divides_by_keep_probability(params)

    def new_pass() -> Sparsifier:
        draw = uniforms(term, ctx, index, params)

        def sparsify(block: torch.Tensor) -> torch.Tensor:
            cols = block.shape[1]
            if cols == 1:
                p = torch.full_like(block, density)
            else:  # the probabilities in rank order, put where each rank's entry is (sorting the bit patterns: a
                # third faster than the floats, same order)
                by_rank = torch.arange(cols, dtype=block.dtype, device=block.device).mul_(span / (cols - 1)).add_(low)
                bits, p = _magnitude_bits(block), torch.empty_like(block)
                # by parts of the block: the sort's int64 indices and values were 3 blocks of float32 at once (a row's
                # order is its own, so the same by parts)
                step = -(-block.shape[0] // SORT_PARTS)
                for start in range(0, block.shape[0], step):
                    order = bits[start:start + step].argsort(dim=1, stable=True)
                    p[start:start + step].scatter_(1, order, by_rank.expand_as(order))
                del bits, order
            dropped = (draw(block.shape) < p).logical_not_()
            if divides:
                block /= p
            del p
            return block.masked_fill_(dropped, 0)

        return sparsify

    return new_pass


def elected_positive(weighted: list[torch.Tensor], consensus: str) -> torch.Tensor:
    """Where the elected sign is + (ties to +): the sign of Σ wᵢτᵢ (``sum``, TIES'), or of Σ sign(wᵢτᵢ) (``count``:
    one vote per input that has the entry), as mergekit's get_mask."""
    total = None
    for tau in weighted:  # sum()'s order, 0 + τ₁ + τ₂ + …, one running total
        vote = torch.sign(tau) if consensus == "count" else tau
        if total is None:
            total = vote + 0
        else:
            total += vote
    return total >= 0


def mix(out: torch.Tensor, taus: list[torch.Tensor], weights: Sequence[float], consensus: str | None, normalize: bool,
        elected: torch.Tensor | None = None) -> None:
    """One block of mergekit's mix, into ``out``: Σ τᵢ (already weighted), of the entries whose sign agrees with the
    one ``elected`` (default: from the τᵢ, elected_positive) when ``consensus``; divided, when ``normalize``, by the
    weights that contribute to each entry. The τᵢ (distinct tensors) are the caller's temporaries: overwritten."""
    out.zero_()
    if consensus and elected is None:
        elected = elected_positive(taus, consensus)
    divisor = torch.zeros_like(out) if normalize and consensus else None
    for weight, tau in zip(weights, taus, strict=True):
        if consensus:
            agree = (tau > 0).eq_(elected).logical_and_(tau != 0)
            tau.mul_(agree)  # (in place, as every step here: the caller's τᵢ are its temporaries)
        out += tau
        if divisor is not None:
            # (agree as the divisor's dtype first: bool × float is float32, which cut float64's weights to float32
            # and made weights past 3.4e38 inf, a NaN result; mul_, not add_'s alpha, which raises past the dtype;
            # in τᵢ's block, added to out already)
            divisor += tau.copy_(agree).mul_(weight)
    if divisor is not None:
        # mergekit: entries with no agreeing contribution are left undivided; agreeing weights are positive, so tiny
        # ones still divide
        divisor[divisor == 0] = 1
        out /= divisor
        if sum(map(abs, weights)) > torch.finfo(out.dtype).max:
            # weights summing past the dtype: an inf divisor made its entries 0, a result of zeros; NaN is refused
            out[divisor.isinf()] = math.nan
    elif normalize:
        # one Σw for every entry, summed in float64 whatever the dtype: negative weights cancel, and in float32
        # 1 + 1e-7 − 1 is 1.19e-7 (1 + 3e-8 − 1 is 0, left undivided). mergekit leaves |Σw| < 1e-8 undivided
        total = float(sum(weights))
        if abs(total) > torch.finfo(out.dtype).max:  # (as above: past the dtype, NaN, refused)
            out.fill_(math.nan)
        elif abs(total) >= 1e-8:
            out /= total


RESCALE_NORM_ORDERS = {"l1": 1, "l2": 2, "linf": math.inf}
RESCALE_EPS = 1e-7
"""mergekit's: a task vector, or its sparsified one, with a norm below it is left as sparsified."""


def norm_ratio(term: Term, sparsification: Sparsification, blocks: list[slice], norm: str) -> float:
    """mergekit's rescaled_masked_tensor factor ‖τ‖/‖τ̂‖ of one task vector τ and its sparsified τ̂, in the norm l1,
    l2 or linf over the module (mergekit: over its tensor), 1 where either is below RESCALE_EPS. One pass of the
    sparsification over the row blocks; each block's norm in float64, the module's the same norm of theirs."""
    order = RESCALE_NORM_ORDERS[norm]
    sparsify = sparsification()
    whole, kept = [], []
    for rows in blocks:
        block = term.delta(rows)
        whole.append(torch.linalg.vector_norm(block, order, dtype=torch.float64))
        kept.append(torch.linalg.vector_norm(sparsify(block), order, dtype=torch.float64))
    before, after = (float(torch.linalg.vector_norm(torch.stack(parts), order)) for parts in (whole, kept))
    return 1.0 if before < RESCALE_EPS or after < RESCALE_EPS else before / after


def task_arithmetic(
    terms: list[Term], params: DensityParams, ctx: Context, sparsifier: Callable[..., Sparsification],
    consensus: bool
) -> torch.Tensor:
    """mergekit's generalized task arithmetic on one module: sparsify each τᵢ (and bring it back to τᵢ's norm, with
    a ``rescale_norm``: a pass of its own), weight, optionally keep only the entries that agree with the elected sign,
    sum, optionally normalize. Every step is per entry, so the result is made row block by row block (see the module
    docstring). Each τᵢ is sparsified with its own parameters where it has them (Term.params), as mergekit sparsifies
    each model's task vector with that model's density, gamma and epsilon; the mix takes the method's."""
    blocks = row_blocks(ctx.shape)
    owns = [t.params or params for t in terms]
    sparsifications = [sparsifier(t, own.density, blocks, ctx, i, own)
                       for i, (t, own) in enumerate(zip(terms, owns, strict=True))]
    norm = getattr(params, "rescale_norm", None)
    factors = [t.weight * (norm_ratio(t, s, blocks, norm) if norm else 1.0)
               for t, s in zip(terms, sparsifications, strict=True)]
    sparsify = [s() for s in sparsifications]
    mixed = torch.empty(ctx.shape, dtype=terms[0].A.dtype, device=terms[0].A.device)
    for rows in blocks:
        out = mixed[rows]
        mix(out, [s(t.delta(rows)).mul_(f) for t, s, f in zip(terms, sparsify, factors, strict=True)],
            [t.weight for t in terms], params.consensus if consensus else None, params.normalize)
        if getattr(params, "lambda_", 1.0) != 1:
            out *= params.lambda_
    return mixed


def _elementwise(sparsifier: Callable[..., Sparsification], consensus: bool, by_rows: bool = False) -> MethodFn:
    """A method from a sparsifier. ``by_rows``: the sparsifier works on the rows of the base weight as stored (as
    mergekit's does on the checkpoint's tensor), so a transposed module's terms are transposed too — its delta
    (B·A)ᵀ = Aᵀ·Bᵀ is built by rows of the weight — and the result is transposed back (a view) for the SVD."""
    def run(terms: list[Term], params: DensityParams, rank: int, ctx: Context) -> Refactored:
        if by_rows and ctx.transposed:
            flipped = [Term(t.A.T, t.B.T, t.scale, t.weight, t.params) for t in terms]
            mixed = task_arithmetic(flipped, params, replace(ctx, shape=ctx.shape[::-1]), sparsifier, consensus)
            return refactor_dense(mixed.T, rank, exact=ctx.exact)
        return refactor_dense(task_arithmetic(terms, params, ctx, sparsifier, consensus), rank, exact=ctx.exact)

    return run


class SceParams(CombineParams):
    select_topk: float = Field(1.0, gt=0, le=1, description="fraction of the entries kept: those whose weighted task "
                                                            "vectors vary most across the inputs")
    consensus: Consensus = "sum"


def sce(terms: list[Term], params: SceParams, rank: int, ctx: Context) -> Refactored:
    """mergekit's SCE (FuseChat's select, calculate, erase) on the weighted task vectors τᵢ' = wᵢτᵢ: keep the entries
    of the ⌊select_topk·z⌋ (at least 1) largest variances across the inputs, z being the entries whose variance is
    not 0 (population variance; equal variances in row-major order), zero elsewhere in every τᵢ'; each input's
    coefficient cᵢ = Σ τᵢ'² over the kept entries, normalized to sum 1; elect each entry's sign from the τᵢ'
    (consensus) and take the disjoint mean Σ cᵢmᵢτᵢ' / Σ cᵢmᵢ (left undivided where no input agrees).

    Made row block by row block: a pass counts the entries that vary, a radix select finds the variance threshold
    (2 passes in float32), a pass sums the cᵢ, a last one mixes; each recomputes the inputs' deltas from the factors."""
    blocks = row_blocks(ctx.shape)
    like = terms[0].A
    mixed = torch.zeros(ctx.shape, dtype=like.dtype, device=like.device)

    def weighted(rows: slice) -> list[torch.Tensor]:
        return [t.delta(rows).mul_(t.weight) for t in terms]

    def variance(rows: slice, taus: list[torch.Tensor] | None = None) -> torch.Tensor:
        return torch.var(torch.stack(weighted(rows) if taus is None else taus), dim=0, unbiased=False)

    top = None
    if params.select_topk < 1:
        varying = sum(int(torch.count_nonzero(variance(rows))) for rows in blocks)
        if not varying:  # one input, or equal ones: mergekit selects nothing, and the module comes out zero
            return refactor_dense(mixed, rank, exact=ctx.exact)
        [top] = kth_largest_magnitudes(variance, [max(1, int(params.select_topk * varying))], blocks, like)

    def selected() -> Iterator[tuple[slice, list[torch.Tensor]]]:
        """Each row block's τᵢ', zero outside the selected entries (a fresh mask each pass: it counts ties)."""
        keep = top.mask() if top is not None else None
        for rows in blocks:
            taus = weighted(rows)
            if keep is not None:
                dropped = keep(_magnitude_bits(variance(rows, taus), owned=True)).logical_not_()
                for tau in taus:
                    tau.masked_fill_(dropped, 0)
            yield rows, taus

    sums = [0.0] * len(terms)
    for _, taus in selected():
        for i, tau in enumerate(taus):
            sums[i] += float(torch.linalg.vector_norm(tau, dtype=torch.float64)) ** 2
    if not sum(sums):  # nothing kept is nonzero
        return refactor_dense(mixed, rank, exact=ctx.exact)
    coefficients = [c / sum(sums) for c in sums]
    for rows, taus in selected():
        elected = elected_positive(taus, params.consensus)  # (of the τᵢ', before they are scaled in place)
        mix(mixed[rows], [tau.mul_(c) for tau, c in zip(taus, coefficients, strict=True)], coefficients,
            params.consensus, True, elected=elected)
    return refactor_dense(mixed, rank, exact=ctx.exact)


# ---- vector-wise methods (factors only: a combination of the τᵢ scaled per vector) --------------------------


Vectors = Literal["module", "rows", "columns"]
"""What a vector-wise method takes as one vector of a module's B·A: all of it, each row, each column."""


def _vectors(ctx: Context, weight_rows: bool) -> Vectors:
    """The rows of the base weight as stored (weight_rows), or its columns, as vectors of B·A: a transposed module's
    weight (an embedding, a Conv1D) holds (B·A)ᵀ, so its rows are B·A's columns."""
    return "rows" if weight_rows != ctx.transposed else "columns"


def coordinates(terms: list[Term], vectors: Vectors) -> list[torch.Tensor]:
    """Each wᵢτᵢ's vectors (one row each: the module's as one row) as coordinates in one orthonormal basis shared by
    all the terms, in float64 from the factors (the dense deltas are never formed): Aᵢᵀ = Q·Rᵢ from the QR of the
    stacked Aᵢᵀ makes τᵢ's rows Bᵢ·Rᵢᵀ, the Bᵢ's QR makes its columns Rᵢ·Aᵢ, both make the module Rᴮᵢ·Rᴬᵢᵀ. Their
    inner products and norms are those of the vectors, and consistent with each other: two vectors of one entry have
    a cosine of exactly ±1 (x·y / (|x|·|y|)). Inner products taken from each pair's own factors (Bₐ·Aₐ·A_bᵀ·B_bᵀ)
    carry roundings of their own: opposite vectors came out at cos θ = −1 + 1e-11 on an AVX-512 machine, which nuslerp
    divided by sin θ ≈ 4e-6 — values 1e5 times too large."""
    Bs = [t.B.double() * (t.scale * t.weight) for t in terms]
    As = [t.A.double() for t in terms]
    ranks = [B.shape[1] for B in Bs]
    if vectors != "columns":
        RAs = torch.linalg.qr(torch.cat(As).T, mode="r").R.split(ranks, dim=1)
    if vectors != "rows":
        RBs = torch.linalg.qr(torch.cat(Bs, dim=1), mode="r").R.split(ranks, dim=1)
    if vectors == "rows":
        return [B @ RA.T for B, RA in zip(Bs, RAs, strict=True)]
    if vectors == "columns":
        return [(RB @ A).T for RB, A in zip(RBs, As, strict=True)]
    return [(RB @ RA.T).reshape(1, -1) for RB, RA in zip(RBs, RAs, strict=True)]


def cosines(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cos θ between each row of x and of y (coordinates), clamped to [−1, 1]; 0 where one is zero (mergekit's: 0, by
    its norm clamps)."""
    norms = torch.linalg.vector_norm(x, dim=1) * torch.linalg.vector_norm(y, dim=1)
    dot = (x * y).sum(dim=1)
    return torch.where(norms > 0, dot / torch.where(norms > 0, norms, 1), 0).clamp(-1, 1)


def combination(terms: list[Term], coefficients: list[torch.Tensor], vectors: Vectors, rank: int) -> Refactored:
    """Σ cᵢ·wᵢτᵢ with cᵢ a number per vector, re-factorized to rank k from the cat factors (a row's coefficient scales
    Bᵢ's row, a column's Aᵢ's column): exact, lossless at Σ rᵢ."""
    Bs, As = [], []
    for t, c in zip(terms, coefficients, strict=True):
        c = c.to(t.B.dtype)
        B, A = t.B * (t.scale * t.weight), t.A
        if vectors == "columns":
            A = A * c
        else:
            B = B * (c[:, None] if vectors == "rows" else c)
        Bs.append(B)
        As.append(A)
    return refactor_product(torch.cat(Bs, dim=1), torch.cat(As, dim=0), rank)


def norm_of_sum(terms: list[Term], coefficients: torch.Tensor) -> float:
    """‖Σ cᵢτᵢ‖ in float64 from the cat factors, as ‖R_B·R_Aᵀ‖ with B = Q_B·R_B and Aᵀ = Q_A·R_A; 0 where it is within
    that QR's rounding, which (Householder's, column by column) is float64's of Σ ‖bⱼ‖·‖aⱼ‖ over the cat's rank
    components, not of the ‖cᵢτᵢ‖: factors whose components cancel within one τ (B = [b, b], A = [a; −a + δ]) round
    to 1e-11 of ‖τ‖, measured, where it was taken for a length (2⁻⁴⁸ leaves ×15 over the 2.4e-16 measured up to
    4096×4096). √(cᵀGc) from the Gram matrix G = ⟨τᵢ, τⱼ⟩ rounds cᵀGc to float64, so where the τᵢ cancel it is
    ~1e-8 of them, not ~1e-16 (and multislerp's test against eps = 1e-8 fell on the wrong side)."""
    B = torch.cat([t.B.double() * (float(c) * t.scale * t.weight)
                   for t, c in zip(terms, coefficients, strict=True)], dim=1)
    A = torch.cat([t.A.double() for t in terms], dim=0)
    size = float(torch.linalg.norm(torch.linalg.qr(B, mode="r").R @ torch.linalg.qr(A.T, mode="r").R.T))
    return 0.0 if size <= 2 ** -48 * float(B.norm(dim=0) @ A.norm(dim=1)) else size


def exactly_two(method: str, weights: Sequence[float], params: Params) -> None:
    if len(weights) != 2:
        raise InvalidInputError(f"{method} interpolates between exactly two adapters (got {len(weights)})")
    if min(weights) < 0 or not sum(weights):
        raise InvalidInputError(f"{method}'s weights only place the point t = w₂/(w₁ + w₂) between the two task "
                                f"vectors: give weights ≥ 0, not both 0 (got {weights[0]:g} and {weights[1]:g})")


class NuslerpParams(CombineParams):
    flatten: bool = Field(True, description="one vector per module (mergekit's nuslerp_flatten); off: per row or "
                                            "column")
    row_wise: bool = Field(False, description="with flatten off: the columns of the weight (dim 0 vectors, mergekit's "
                                              "nuslerp_row_wise) instead of its rows")

    @model_validator(mode="after")
    def check_fits(self):
        if self.row_wise and self.flatten:  # (mergekit ignores it there)
            raise ValueError("`row_wise` applies only with `flatten` off: a flattened module is one vector")
        return self


def nuslerp(terms: list[Term], params: NuslerpParams, rank: int, ctx: Context) -> Refactored:
    """mergekit's nuslerp with a base: the spherical interpolation of the two task vectors τ₁, τ₂ at
    t = w₂/(w₁ + w₂), as vectors of the whole module (flatten), of each row of the base weight, or of each column
    (row_wise): with θ the angle between them, (sin((1−t)θ)·τ₁ + sin(tθ)·τ₂)/sin θ, or (1−t)·τ₁ + t·τ₂ where they
    are parallel or opposite; a zero vector is at θ = π/2 from any other. The weights only place t: the task vectors
    are not scaled by them. (mergekit lerps where sin θ < 1e-8: in float64, where cos θ rounds to ±1. The cosine of
    a task vector and its opposite made from other factors (B and −2B, A and A/2) rounds to −1 + 1e-16, which sin θ
    ≈ 1e-8 would divide into values 1e8 times too large, so the lerp is taken where |cos θ| > 1 − 1e-12.)"""
    first, second = (replace(term, weight=1.0) for term in terms)
    t = terms[1].weight / (terms[0].weight + terms[1].weight)
    vectors = "module" if params.flatten else _vectors(ctx, weight_rows=not params.row_wise)
    cos = cosines(*coordinates([first, second], vectors))
    theta = torch.acos(cos)
    parallel = 1 - cos.abs() < 1e-12
    safe = torch.where(parallel, 1, torch.sin(theta))
    c1 = torch.where(parallel, 1 - t, torch.sin((1 - t) * theta) / safe)
    c2 = torch.where(parallel, t, torch.sin(t * theta) / safe)
    return combination([first, second], [c1, c2], vectors, rank)


class ModelStockParams(CombineParams):
    filter_wise: bool = Field(False, description="one ratio per row of the base weight instead of per module")


def at_least_two(method: str, weights: Sequence[float], params: Params) -> None:
    if len(weights) < 2:
        raise InvalidInputError(f"{method} needs at least two adapters (got {len(weights)}): its ratio comes from the "
                                "angles between their task vectors")


MODEL_STOCK_SINGULAR = 1e-6
"""mergekit's `singular` cut-off on 1 + (N − 1)·cos θ in model_stock (0.1.5): below it, the base."""


def model_stock(terms: list[Term], params: ModelStockParams, rank: int, ctx: Context) -> Refactored:
    """mergekit's model_stock with the base at ΔW = 0, on the weighted task vectors τᵢ' = wᵢτᵢ: cos θ the mean of the
    cosines between every two of the N τᵢ' (a zero vector: 0), t = N·cos θ / (1 + (N − 1)·cos θ), the result
    t·Σ τᵢ'/N; per module, or per row of the base weight (filter_wise). Where 1 + (N − 1)·cos θ is below 1e-6 (the
    unit vectors nearly cancel out; it is never below 0), t is 0: the base, as mergekit (0.1.5) keeps it. That cut-off
    is on a cosine, whatever the task vectors' size (unlike mergekit's cut-offs on norms, which loraops does not
    take): just above it t is up to ~1e6, a ΔW that many times the inputs'."""
    vectors = _vectors(ctx, weight_rows=True) if params.filter_wise else "module"
    n = len(terms)
    points = coordinates(terms, vectors)
    cos = torch.stack([cosines(points[i], points[j]) for i in range(n) for j in range(i + 1, n)]).mean(dim=0)
    denominator = 1 + (n - 1) * cos
    kept = denominator >= MODEL_STOCK_SINGULAR
    ratio = torch.where(kept, n * cos / torch.where(kept, denominator, 1), 0)
    return combination(terms, [ratio / n] * n, vectors, rank)


class MultislerpParams(CombineParams):
    normalize_weights: bool = Field(True, description="divide the weights by their sum (mergekit's default)")
    eps: float = Field(1e-8, ge=0, description=(
        "mergekit's: added to each task vector's norm and to the tangent's; a weighted mean of the directions shorter "
        "than it has no direction"))


def zero_sum(weights: Sequence[float]) -> str:
    """'0', or '0 to rounding (Σw)' where Σw is within the rounding of adding the weights up (n·2⁻⁵²·Σ|wᵢ|), as
    0.1 + 0.2 − 0.3 = 5.6e-17: weights divided by it are ~1e16, the result ~1e16 times too long (mergekit's float32
    sum is 0 there: NaN); '' where Σw is not 0."""
    total = sum(weights)
    if not total:
        return "0"
    return f"0 to rounding ({total:.2g})" if abs(total) <= len(weights) * 2 ** -52 * sum(map(abs, weights)) else ""


def normalize_refusal(method: str, weights: Sequence[float], elects_sign: bool, off: str, instead: str) -> str:
    """Why ``method`` with normalize on cannot take these weights ('' where it can), with ``off`` (how to turn
    normalize off, in the caller's terms) and ``instead`` (a method under which a negative weight subtracts). With sign
    election each entry is divided by the weights that agree on its sign: where a negative weight agrees alone,
    wτ/w = τ, its sign undone. Without, by Σw over all the inputs (as mergekit), where a negative weight subtracts,
    and weights that cancel (|Σw| < 1e-8) leave the sum undivided, as mergekit and recipes' task_arithmetic."""
    if elects_sign and any(w < 0 for w in weights):
        return (f"{method} with normalize divides by the weights that agree on each entry, so a negative weight would "
                f"not subtract: {off}, or {instead}")
    return ""


def multislerp_weights(method: str, weights: Sequence[float], params: MultislerpParams) -> None:
    if len(weights) < 2:
        raise InvalidInputError(f"{method} needs at least two adapters (got {len(weights)}): of one, mergekit returns "
                                "its task vector unchanged, whatever its weight")
    if params.normalize_weights and (zero := zero_sum(weights)):
        raise ParameterError(f"{method} with normalize_weights divides the weights by their sum, which is {zero}: "
                             "give other weights, or `normalize_weights=False`", ["normalize_weights"])


def multislerp(terms: list[Term], params: MultislerpParams, rank: int, ctx: Context) -> Refactored:
    """mergekit's multislerp with a base, each module's task vectors as one vector each: with weights wᵢ (divided by
    their sum with normalize_weights) and directions uᵢ = τᵢ/(‖τᵢ‖ + eps), the weighted mean direction
    m = Σ wᵢuᵢ/‖Σ wᵢuᵢ‖ at the weighted mean norm Σ wᵢ‖τᵢ‖, times cos(eps). mergekit then maps the weighted tangents
    t = Σ wᵢ(uᵢ − ⟨uᵢ, m⟩·m) back by the exponential map, m·cos(‖t‖ + eps) + t·sin(‖t‖ + eps)/(‖t‖ + eps); but
    t = Σ wᵢuᵢ − ⟨Σ wᵢuᵢ, m⟩·m = 0 by construction (its float rounding aside), which leaves m·cos(eps). The result is
    Σ cᵢτᵢ, its coefficients from the norms ‖τᵢ‖ and ‖Σ wᵢuᵢ‖ (norm_of_sum) of the factors in float64. Where
    ‖Σ wᵢuᵢ‖ < eps (or is 0): two inputs give mergekit's fallback Σ wᵢτᵢ; more are refused as mergekit does, unless
    every τᵢ is zero (then the mean norm is 0, and so the result)."""
    plain = [replace(term, weight=1.0) for term in terms]
    # (each ‖τᵢ‖ of its factors' QR too, not √⟨τᵢ, τᵢ⟩: where its components cancel that is rounded to float64's of
    # (Σ‖bⱼ‖‖aⱼ‖)², and two such norms of one direction differ by more than norm_of_sum's zero)
    norms = torch.tensor([norm_of_sum([t], [1.0]) for t in plain], dtype=torch.float64, device=plain[0].B.device)
    w = torch.tensor([t.weight for t in terms], dtype=torch.float64, device=norms.device)
    if params.normalize_weights:
        w = w / w.sum()
    eps = params.eps
    scale = torch.where(norms + eps > 0, 1 / (norms + eps), 0)  # uᵢ = scaleᵢ·τᵢ (a zero τᵢ at eps 0: uᵢ = 0)
    size = norm_of_sum(plain, w * scale)  # ‖Σ wᵢuᵢ‖ (0 to its rounding: a − a)
    if size < eps or not size:
        if len(terms) == 2:
            return combination(plain, list(w), "module", rank)
        if norms.any():
            raise InvalidInputError(
                f"multislerp: in {ctx.module} the weighted mean of the task vectors' directions has length "
                f"{size:.2g}, below eps ({eps:g}), where mergekit raises: directions that cancel out (a and −a with "
                "equal weights), or task vectors not much longer than eps: give other weights, or a smaller eps")
        w = torch.zeros_like(w)
        size = 1.0
    if size < float(w.abs().sum()) / 64:  # the cᵢτᵢ, ~Σ|wᵢ|/size times the result, cancel: float32 lost 6 bits or more
        plain = [replace(t, B=t.B.double(), A=t.A.double()) for t in plain]
    coefficients = w / size * (math.cos(eps) * float(w @ norms)) * scale
    return combination(plain, list(coefficients), "module", rank)


register("ties", params=TiesParams, default_rank=max)(_elementwise(trim, consensus=True))
register("dare_ties", params=DareTiesParams, default_rank=max)(_elementwise(drop_and_rescale, consensus=True))
register("dare_linear", params=DareParams, default_rank=max)(_elementwise(drop_and_rescale, consensus=False))
register("breadcrumbs", params=BreadcrumbsParams, default_rank=max)(_elementwise(drop_outliers, consensus=False))
register("breadcrumbs_ties", params=BreadcrumbsTiesParams, default_rank=max)(
    _elementwise(drop_outliers, consensus=True))
register("della", params=DellaParams, default_rank=max)(_elementwise(sample_by_rank, consensus=True, by_rows=True))
register("della_linear", params=DellaLinearParams, default_rank=max)(
    _elementwise(sample_by_rank, consensus=False, by_rows=True))
register("magnitude_prune", params=PruneParams, default_rank=max)(_elementwise(trim, consensus=False))
register("sce", params=SceParams, default_rank=max)(sce)


def _on_one_thread(method: MethodFn) -> MethodFn:
    """A vector-wise method on one CPU thread (svd.single_threaded): its QRs, products and sums are of factor size,
    O((out + in)·(Σr)²), and so its bytes do not depend on the thread count, as linear's do not."""
    def run(terms: list[Term], params: Params, rank: int, ctx: Context) -> Refactored:
        with single_threaded(terms[0].A.device):
            return method(terms, params, rank, ctx)

    return run


register("nuslerp", params=NuslerpParams, default_rank=sum, weights_scale=False, check_weights=exactly_two)(
    _on_one_thread(nuslerp))
register("model_stock", params=ModelStockParams, default_rank=sum, check_weights=at_least_two)(
    _on_one_thread(model_stock))
register("multislerp", params=MultislerpParams, default_rank=sum, weights_scale=False,
         check_weights=multislerp_weights)(_on_one_thread(multislerp))


def rank_ceiling(method: str) -> str:
    """What bounds a module's rank in ``method``'s result, in the words of combine's capped note: the methods whose
    default rank is Σ rᵢ re-factorize from the cat factors (refactor_product: lossless there, so nothing above it);
    the others factorize a dense delta (refactor_dense)."""
    return "min(Σ input ranks, out, in)" if METHODS[method].default_rank is sum else "min(out, in)"
