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


def rescaled_masked(tau, masked, norm):
    """mergekit's rescaled_masked_tensor (sparsify.py, RescaleNorm): the sparsified task vector times ‖τ‖/‖masked‖ in
    the norm l1 (Σ|x|), l2 or linf (max |x|) of the whole tensor (loraops: of the module); as it is where either norm
    is below mergekit's eps, 1e-7."""
    if norm is None:
        return masked
    measure = {"l1": lambda x: x.abs().sum(), "l2": lambda x: x.norm(), "linf": lambda x: x.abs().max()}[norm]
    before, after = measure(tau), measure(masked)
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def elect(weighted, weights, normalize, consensus="sum", voters=None):
    """mergekit's get_mask and mix: the majority sign of Σ wτ (sum) or of Σ sign(wτ) (count) of the voters (default:
    the weighted τ), 0 counting as +; disjoint sum of the entries of that sign (0 agrees with neither); normalized by
    the agreeing weights (0 → 1)."""
    voters = weighted if voters is None else voters
    total = sum(voters) if consensus == "sum" else sum(torch.sign(t) for t in voters)
    sign = torch.where(total >= 0, 1.0, -1.0).double()
    masks = [torch.sign(t) == sign for t in voters]
    num = sum(t * m for t, m in zip(weighted, masks))
    if not normalize:
        return num
    den = sum(w * m for w, m in zip(weights, masks))
    return num / torch.where(den == 0, torch.ones_like(den), den)


def sce(weighted, select_topk, consensus="sum"):
    """mergekit's sce on the weighted task vectors: keep the entries of the ⌊select_topk·z⌋ (≥ 1) largest variances
    across the inputs (z: the entries whose variance is not 0; equal ones in row-major order), zero elsewhere; the
    matrix-level coefficients mean(τ²), normalized to sum 1 (uniform if all 0); mergekit's sign election; the
    disjoint mean with those coefficients (0 → 1)."""
    stacked = torch.stack(weighted)
    if select_topk < 1:
        variance = stacked.var(dim=0, unbiased=False)
        varying = int(torch.count_nonzero(variance))
        k = max(1, int(select_topk * varying)) if varying else 0
        stacked = stacked * (kept(variance, descending(variance)[:k]) != 0)
    means = (stacked ** 2).flatten(1).mean(dim=1)
    coefficients = means / means.sum() if means.sum() > 0 else torch.full_like(means, 1 / len(means))
    return elect([coefficients[i] * t for i, t in enumerate(stacked)], list(coefficients), True, consensus,
                 voters=list(stacked))


def nuslerp(t, v0, v1, dim=-1, flatten=False, eps=1e-8):
    """mergekit's nuslerp of two task vectors as it is written (its norms clamped at 1e-7, lerp where sin θ < eps),
    on the weight seen as a matrix (a conv's out × in·kh·kw): flatten, or vectors along ``dim`` (-1: rows, 0:
    columns)."""
    shape = v0.shape
    v0, v1 = v0.reshape(shape[0], -1), v1.reshape(shape[0], -1)
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.T, v1.T

    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    theta = torch.acos((unit(v0) * unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1))
    sin_theta = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    res = torch.where(sin_theta.abs() < eps, (1 - t) * v0 + t * v1, res)
    if dim != -1 and not flatten:
        res = res.T
    return res.reshape(shape)


def model_stock(taus, filter_wise=False):
    """mergekit's model_stock with the base's weight at 0, as it is written (norm products clamped at 1e-6): the mean
    of the pairwise cosines, t = N·cos/(1 + (N − 1)·cos) (0 where the denominator is below 1e-6), t·mean(τ); per row
    of the weight seen as a matrix (filter_wise) or of the flattened weight."""
    shape = taus[0].shape
    vectors = [t.reshape(shape[0], -1) if filter_wise else t.reshape(-1) for t in taus]
    cosines = []
    for i, a in enumerate(vectors):
        for b in vectors[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(taus)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6  # (mergekit 0.1.5: the base there, "instead of amplifying opposing updates")
    t = torch.where(singular, 0, n * cos / torch.where(singular, 1, denominator))
    return (t * sum(vectors) / n).reshape(shape)


def multislerp(taus, weights, normalize_weights=True, eps=1e-8):
    """mergekit's multislerp of task vectors as it is written: one input returned as it is; each tensor flattened,
    divided by its norm + eps; the weighted mean direction (its norm below eps: two inputs lerp, more are mergekit's
    ValueError); the weighted tangents at it, mapped back by the exponential map at ‖t‖ + eps; times Σ wᵢ‖τᵢ‖."""
    if len(taus) == 1:
        return taus[0]
    shape = taus[0].shape
    flat = torch.stack(taus).reshape(len(taus), -1)
    w = torch.tensor(weights, dtype=flat.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(taus) == 2:
            return (flat[0] * w[0] + flat[1] * w[1]).reshape(shape)
        raise ValueError("The weighted sum of the input tensors is zero.")
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    t = (tangents * w.view(-1, 1)).sum(0)
    t_norm = torch.norm(t) + eps
    result = mean * torch.cos(t_norm) + t * (torch.sin(t_norm) / t_norm)
    return (result * (norms.squeeze(-1) * w).sum()).reshape(shape)


CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
NORMALIZED = {"ties", "della"}  # normalize's default


def reference(method, inputs, name, density=None, seed=0, gamma=0.01, epsilon=0.15, normalize=None, lam=1.0,
              rescale=True, consensus="sum", select_topk=1.0, flatten=True, row_wise=False, filter_wise=False,
              rescale_norm=None, normalize_weights=True, eps=1e-8):
    """The module's combined delta, in the base weight's layout: DELLA ranks the rows of that layout (and loraops
    draws its uniforms there); DARE's draws are in the B·A layout, the same one for all but transposed modules.
    ``rescale_norm``: mergekit's current rescale, each sparsified τ (DARE's and DELLA's survivors undivided) brought
    back to the norm of the whole τ."""
    pairs = taus(inputs, name)
    weights = [w for w, _ in pairs]
    if method in ("cat", "linear", "svd"):
        return sum(w * t for w, t in pairs)
    if method == "sce":
        return sce([w * t for w, t in pairs], select_topk, consensus)
    if method == "nuslerp":  # mergekit's t from the weights; the task vectors themselves unweighted
        (w1, tau1), (w2, tau2) = pairs
        return nuslerp(w2 / (w1 + w2), tau1, tau2, dim=0 if row_wise else -1, flatten=flatten)
    if method == "model_stock":
        return model_stock([w * t for w, t in pairs], filter_wise)
    if method == "multislerp":
        return multislerp([t for _, t in pairs], weights, normalize_weights, eps)
    if method in ("ties", "magnitude_prune"):
        sparse = [trim(t, density) for _, t in pairs]
    elif method.startswith("breadcrumbs"):
        sparse = [breadcrumbs(t, density, gamma) for _, t in pairs]
    elif method.startswith("dare"):
        sparse = [dare(t, density, uniform_draws(seed, name, i, t.shape), rescale and not rescale_norm)
                  for i, (_, t) in enumerate(pairs)]
    else:
        sparse = [della(t, density, epsilon, uniform_draws(seed, name, i, t.shape), rescale and not rescale_norm)
                  for i, (_, t) in enumerate(pairs)]
    sparse = [rescaled_masked(t, s, rescale_norm) for (_, t), s in zip(pairs, sparse)]
    return mixed(method, weights, sparse, normalize, lam, consensus)


def mixed(method, weights, sparse, normalize, lam, consensus):
    """mergekit's GTATask after the sparsification: weighted, sign-elected where the method elects, summed, divided
    by the (agreeing) weights where it normalizes (default: the method's), times lambda."""
    weighted = [w * t for w, t in zip(weights, sparse)]
    normalize = method in NORMALIZED if normalize is None else normalize
    if method in CONSENSUS:
        mix = elect(weighted, weights, normalize, consensus)
    else:
        mix = sum(weighted)
        if normalize:
            total = sum(weights)
            mix = mix / (total if abs(total) >= 1e-8 else 1)
    return mix * lam


def per_model_reference(method, inputs, name, per_model, seed=0, normalize=None, lam=1.0, rescale=True,
                        consensus="sum", rescale_norm=None):
    """mergekit's generalized task arithmetic with per-model parameters, as its GTATask.execute runs: each model's
    task vector is sparsified with that model's own density (and gamma for magnitude_outliers, epsilon for DELLA's
    magprune), then weighted, sign-elected and mixed with the merge's parameters, and scaled by lambda.
    ``per_model``: one dict per input with its density and, where the method takes them, gamma and epsilon."""
    pairs = taus(inputs, name)
    sparse = []
    for i, ((_, tau), own) in enumerate(zip(pairs, per_model)):
        density = own["density"]
        divide = rescale and not rescale_norm
        if method in ("ties", "magnitude_prune"):
            s = trim(tau, density) if density < 1 else tau
        elif method.startswith("breadcrumbs"):
            s = breadcrumbs(tau, density, own.get("gamma", 0.01)) if density < 1 else tau
        elif method.startswith("dare"):
            s = dare(tau, density, uniform_draws(seed, name, i, tau.shape), divide) if density < 1 else tau
        else:
            s = (della(tau, density, own.get("epsilon", 0.15), uniform_draws(seed, name, i, tau.shape), divide)
                 if density < 1 else tau)
        sparse.append(rescaled_masked(tau, s, rescale_norm) if density < 1 else s)
    return mixed(method, [w for w, _ in pairs], sparse, normalize, lam, consensus)
