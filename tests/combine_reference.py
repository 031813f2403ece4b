"""Independent float64 references of the combine methods, written from mergekit's algorithms on the dense deltas
(what loraops.ops.combine computes by row blocks from the factors). Shared by the combine tests."""
from __future__ import annotations

import torch

from loraops.ops.combine import module_seed


def taus(inputs, name):
    """[(weight, τ)] of one module, τ in float64 in the base weight's layout (zero for an input without it)."""
    out = []
    for adapter, weight in inputs:
        module = adapter.modules.get(name)
        ref = next(a.modules[name] for a, _ in inputs if name in a.modules)
        out.append((weight, module.delta(dtype=torch.float64) if module
                    else torch.zeros(ref.weight_shape, dtype=torch.float64)))
    return out


def descending(tau):
    """Flat indices of τ by decreasing magnitude, equal magnitudes in row-major order (loraops' tie rule)."""
    return torch.sort(tau.abs().flatten(), descending=True, stable=True).indices


def kept(tau, indices):
    mask = torch.zeros(tau.numel(), dtype=torch.bool)
    mask[indices] = True
    return tau * mask.reshape(tau.shape)


def trim(tau, density):
    """TIES' trim: the ⌊density·n⌋ (≥ 1) largest magnitudes."""
    return kept(tau, descending(tau)[:max(1, int(density * tau.numel()))])


def breadcrumbs(tau, density, gamma):
    """mergekit's magnitude_outliers: sorted by magnitude, drop ⌊gamma·n⌋ from the top and keep ⌊density·n⌋ below
    them (mergekit keeps indices[n_bot:-n_top] of the ascending order: the same entries, when n_top > 0)."""
    n = tau.numel()
    target = max(1, int(density * n))
    n_top = min(int(gamma * n), n - target)
    return kept(tau, descending(tau)[n_top:n_top + target])


def uniform_draws(seed, name, index, shape):
    """The uniforms DARE and DELLA compare against their keep probabilities: float32, one CPU generator per
    (seed, module, input), one draw of the whole shape."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(module_seed(seed, name, index)))


def dare(tau, density, draws, rescale=True):
    """Bernoulli(density) by the uniform draws (u < density); survivors ÷ density (mergekit's rescale)."""
    return tau * (draws < density) / (density if rescale else 1)


def della_probabilities(tau, density, epsilon):
    """mergekit's rank_magnitude_sampling: ranks 1…m of |τ| in each row (ascending; equal ones in column order),
    mapped linearly onto density − epsilon … density + epsilon."""
    rows = tau.reshape(tau.shape[0], -1)
    m = rows.shape[1]
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).double() + 1
    if m == 1:
        return torch.full_like(rows, density).reshape(tau.shape)
    norm = (ranks - ranks.min(dim=1, keepdim=True).values) / (ranks.max(dim=1, keepdim=True).values
                                                              - ranks.min(dim=1, keepdim=True).values)
    return ((density - epsilon) + norm * 2 * epsilon).reshape(tau.shape)


def della(tau, density, epsilon, draws, rescale=True):
    """Bernoulli(p) by the same uniform draws (u < p), survivors divided by their own p (mergekit's rescale)."""
    p = della_probabilities(tau, density, epsilon)
    return tau * (draws.reshape(tau.shape) < p) / (p if rescale else 1)


def elect(weighted, weights, normalize, consensus="sum"):
    """mergekit's get_mask and mix: the majority sign of Σ wτ (sum) or of Σ sign(wτ) (count), 0 counting as +;
    disjoint sum of the entries of that sign (0 agrees with neither); normalized by the agreeing weights (0 → 1)."""
    total = sum(weighted) if consensus == "sum" else sum(torch.sign(t) for t in weighted)
    sign = torch.where(total >= 0, 1.0, -1.0).double()
    masks = [torch.sign(t) == sign for t in weighted]
    num = sum(t * m for t, m in zip(weighted, masks))
    if not normalize:
        return num
    den = sum(w * m for w, m in zip(weights, masks))
    return num / torch.where(den == 0, torch.ones_like(den), den)


CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
NORMALIZED = {"ties", "della"}  # normalize's default


def reference(method, inputs, name, density=None, seed=0, gamma=0.01, epsilon=0.15, normalize=None, lam=1.0,
              rescale=True, consensus="sum"):
    """The module's combined delta, in the base weight's layout: DELLA ranks the rows of that layout (and loraops
    draws its uniforms there); DARE's draws are in the B·A layout, the same one for all but transposed modules."""
    pairs = taus(inputs, name)
    weights = [w for w, _ in pairs]
    if method in ("cat", "linear", "svd"):
        return sum(w * t for w, t in pairs)
    if method in ("ties", "magnitude_prune"):
        sparse = [trim(t, density) for _, t in pairs]
    elif method.startswith("breadcrumbs"):
        sparse = [breadcrumbs(t, density, gamma) for _, t in pairs]
    elif method.startswith("dare"):
        sparse = [dare(t, density, uniform_draws(seed, name, i, t.shape), rescale) for i, (_, t) in enumerate(pairs)]
    else:
        sparse = [della(t, density, epsilon, uniform_draws(seed, name, i, t.shape), rescale)
                  for i, (_, t) in enumerate(pairs)]
    weighted = [w * t for w, t in zip(weights, sparse)]
    normalize = method in NORMALIZED if normalize is None else normalize
    if method in CONSENSUS:
        mixed = elect(weighted, weights, normalize, consensus)
    else:
        mixed = sum(weighted)
        if normalize:
            total = sum(weights)
            mixed = mixed / (total if abs(total) >= 1e-8 else 1)
    return mixed * lam
