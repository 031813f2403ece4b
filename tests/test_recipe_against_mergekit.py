"""Random recipes (methods, per-model and top-level values, negative weights, normalize/rescale on and off, the base
listed or not) through parse_recipe and combine, against a transcription of mergekit's current code written apart from
combine_reference: its planner (parameter fallback, the base skipped or averaged in), registry.py's defaults,
sparsify.py (rescale as the l1 norm; no division by the keep probability), GTATask.execute and LinearMergeTask, and
sce.py, nuslerp.py, model_stock.py and multislerp.py with a base, in float64 on the dense deltas (DARE's and DELLA's
draws are loraops' seeded ones)."""
import random

import pytest
import torch

from factories import lora_adapter
from loraops.algebra import combine
from loraops.errors import InvalidInputError
from loraops.ops.combine import module_seed
from loraops.recipe import parse_recipe

SPHERICAL = ("sce", "nuslerp", "model_stock", "multislerp")
GTA = {  # consensus, sparsification, default normalize, default rescale (mergekit registry.py)
    "task_arithmetic": (None, None, False, False),
    "ties": ("sum", "magnitude", True, False),
    "dare_ties": ("sum", "random", False, True),
    "dare_linear": (None, "random", False, True),
    "breadcrumbs": (None, "magnitude_outliers", False, False),
    "breadcrumbs_ties": ("sum", "magnitude_outliers", False, False),
    "della": ("sum", "della_magprune", True, True),
    "della_linear": (None, "della_magprune", False, True),
}


def draws(seed, name, index, shape):
    return torch.rand(shape, generator=torch.Generator().manual_seed(module_seed(seed, name, index))).double()


def rescaled(t, mask, norm):
    masked = t * mask
    if norm is None:
        return masked
    before, after = t.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def sparsify(t, method, density, gamma, epsilon, norm, u):
    if density >= 1:
        return t
    n = t.numel()
    if method == "magnitude":
        k = int(density * n)
        mask = torch.zeros(n, dtype=t.dtype)
        mask[torch.argsort(t.abs().view(-1), descending=True)[:k]] = 1
        return rescaled(t, mask.view(t.shape), norm)
    if method == "magnitude_outliers":
        target, n_top = int(density * n), int(gamma * n)
        n_bot = n - target - n_top
        if n_bot < 0:
            n_top += n_bot
            n_bot = 0
        idx = torch.sort(t.abs().view(-1)).indices
        mask = torch.zeros(n, dtype=t.dtype)
        mask[idx[n_bot:n - n_top]] = 1
        return rescaled(t, mask.view(t.shape), norm)
    if method == "random":
        return rescaled(t, (u < density).to(t.dtype), norm)
    assert method == "della_magprune"
    assert 0 < density - epsilon and density + epsilon < 1
    ranks = torch.argsort(t.abs(), dim=1).argsort(dim=1).double() + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    p = (density - epsilon) + rank_norm * 2 * epsilon
    return rescaled(t, (u < p).to(t.dtype), norm)


def param(doc, entry, key, default):
    own = (entry.get("parameters") or {})
    if key in own:
        return own[key]
    return (doc.get("parameters") or {}).get(key, default)


def sce(deltas, select_topk):
    """SCETask.execute (mergekit 2024's sce.py) minus the base. mergekit 2025's sce_merge differs only by absolute
    thresholds loraops does not follow (docs/algebra.md: uniform coefficients where Σ mean(τ²) < 1e-6, divisor
    clamped at 1e-6), which these task vectors (mean squares near 1e-2) never reach."""
    deltas = torch.stack(deltas)
    if select_topk < 1:
        variance = torch.var(deltas, dim=0, unbiased=False)
        k = int(abs(select_topk) * torch.count_nonzero(variance))
        mask = torch.zeros_like(variance)
        if k:
            mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
        deltas = deltas * mask.unsqueeze(0)
    weights = [float(torch.sum(d ** 2)) / d.numel() for d in deltas]
    total = sum(weights)
    weights = [1 / len(weights)] * len(weights) if total == 0 else [w / total for w in weights]
    weights = torch.tensor(weights, dtype=deltas.dtype).view(-1, 1, 1)
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    erased = weights * (deltas.sign() == majority)
    divisor = erased.sum(dim=0)
    divisor[divisor == 0] = 1
    return (deltas * erased).sum(dim=0) / divisor


def nuslerp(weights, v0, v1, row_wise, flatten, eps=1e-8):
    """NuSlerpTask.execute's t and nuslerp() on the two task vectors."""
    t = 0.5 if abs(sum(weights)) < 1e-6 else weights[1] / sum(weights)
    shape, dim = v0.shape, 0 if row_wise else -1
    if flatten:
        v0, v1 = v0.view(-1), v1.view(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    v0_u = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    v1_u = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos(torch.sum(v0_u * v1_u, dim=-1, keepdim=True).clamp(-1, 1))
    sin_theta = torch.sin(theta)
    colinear = (sin_theta.abs() < eps).squeeze()
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    res[colinear] = (1 - t) * v0[colinear] + t * v1[colinear]
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(shape)


def model_stock(offsets, filter_wise):
    """ModelStockMergeTask.execute minus the base (w_0 = 0: the offsets are the task vectors)."""
    shape = offsets[0].shape
    offsets = offsets if filter_wise else [o.view(-1) for o in offsets]
    cos_thetas = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos_thetas.append(((a * b).sum(dim=-1) / product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    n = len(offsets)
    t = (n * cos_theta) / (1 + (n - 1) * cos_theta)
    return (t * (sum(offsets) / n)).reshape(shape)


def multislerp(tensors, weight, normalize_weights, eps):
    """multislerp() of the task vectors (the base subtracted: a zero base_tensor)."""
    tensors = torch.stack(tensors)
    flat = tensors.view(tensors.shape[0], -1)
    weights = torch.tensor(weight, dtype=tensors.dtype)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    unit = flat / (norms + eps)
    mean = (unit * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if tensors.shape[0] > 2:
            raise ValueError("The weighted sum of the input tensors is zero.")
        return (tensors[0] * weights[0] + tensors[1] * weights[1]).view(tensors.shape[1:])
    mean = mean / mean_norm
    tangent = ((unit - (unit * mean).sum(-1, keepdim=True) * mean) * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    return (result * (norms.squeeze(-1) * weights).sum()).view(tensors.shape[1:])


def mergekit_delta(doc, adapters, name, seed=0):
    """The merged weight minus the base for one module, dense float64."""
    method = doc["merge_method"]
    base = doc.get("base_model")
    top = doc.get("parameters") or {}
    entries = [e for e in doc["models"] if e["model"] != base]
    taus = [adapters[e["model"]].modules[name].delta(dtype=torch.float64) for e in entries]
    if method == "sce":
        return sce(taus, top.get("select_topk", 1.0))
    if method == "model_stock":
        return model_stock(taus, top.get("filter_wise", False))
    weights = [float(param(doc, e, "weight", None)) for e in entries]
    if method == "nuslerp":
        return nuslerp(weights, *taus, top.get("nuslerp_row_wise", False), top.get("nuslerp_flatten", True))
    if method == "multislerp":
        return multislerp(taus, weights, top.get("normalize_weights", True), top.get("eps", 1e-8))
    if method == "linear":
        total = sum(weights) + sum(float(param(doc, e, "weight", None)) for e in doc["models"] if e["model"] == base)
        if base is not None and all(e["model"] != base for e in doc["models"]):
            total += top["weight"]
        mixed = sum(w * t for w, t in zip(weights, taus))
        return mixed / total if top.get("normalize", True) else mixed
    consensus, sparsification, dnorm, drescale = GTA[method]
    norm = "l1" if top.get("rescale", drescale) else None
    deltas = []
    for i, (e, t) in enumerate(zip(entries, taus)):
        if sparsification:
            t = sparsify(t, sparsification, float(param(doc, e, "density", 1.0)), float(param(doc, e, "gamma", 0.01)),
                         float(param(doc, e, "epsilon", 0.15)), norm, draws(seed, name, i, t.shape))
        deltas.append(t)
    deltas = torch.stack(deltas)
    w = torch.tensor(weights, dtype=torch.float64).view(-1, 1, 1)
    weighted = deltas * w
    if consensus:
        majority = (weighted.sum(0) >= 0).double() * 2 - 1
        mask = (weighted.sign() == majority).double()
        mixed = (weighted * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(0)
        divisor = w.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if top.get("normalize", dnorm):
        mixed = mixed / divisor
    lam = top.get("lambda", 1.0)
    return mixed * lam


def random_spherical_doc(rng, method, names):
    """sce, nuslerp, model_stock, multislerp: with a base (listed or not), their own parameters."""
    top = {}
    if method == "sce" and rng.random() < 0.7:
        top["select_topk"] = round(rng.uniform(0.1, 1), 3)
    if method == "nuslerp":
        names = names[:2]
        top.update({"nuslerp_flatten": rng.random() < 0.5, "nuslerp_row_wise": rng.random() < 0.5})
    if method == "model_stock" and rng.random() < 0.5:
        top["filter_wise"] = rng.random() < 0.5
    if method == "multislerp":
        if rng.random() < 0.5:
            top["normalize_weights"] = rng.random() < 0.5
        if rng.random() < 0.5:
            top["eps"] = rng.choice([0, 1e-3, 0.05, 0.5])
    weighted = method in ("nuslerp", "multislerp")
    models = [{"model": m, "parameters": {"weight": round(rng.uniform(-1, 2) if rng.random() < 0.3
                                                          else rng.uniform(0.1, 2), 3)}} if weighted else {"model": m}
              for m in names]
    if rng.random() < 0.5:
        models.insert(0, {"model": "base"})
    return {"merge_method": method, "base_model": "base", "models": models, "parameters": top}


def random_doc(rng, names):
    method = rng.choice(list(GTA) + ["linear"] + list(SPHERICAL))
    if method in SPHERICAL:
        return random_spherical_doc(rng, method, names)
    models = []
    with_base = rng.random() < 0.5
    if with_base:
        models.append({"model": "base", "parameters": {"weight": 0.5}} if method == "linear" else {"model": "base"})
    for m in names:
        p = {"weight": round(rng.uniform(-1, 2) if rng.random() < 0.3 else rng.uniform(0.1, 2), 3)}
        if GTA.get(method, (0, None))[1] and rng.random() < 0.8:
            p["density"] = round(rng.uniform(0.3, 0.8), 3)
        if method.startswith("breadcrumbs") and rng.random() < 0.6:
            p["gamma"] = round(rng.uniform(0, 0.15), 3)
        if method.startswith("della") and rng.random() < 0.6:
            p["epsilon"] = round(rng.uniform(0.01, 0.25), 3)
        models.append({"model": m, "parameters": p})
    top = {}
    if rng.random() < 0.5:
        top["normalize"] = rng.random() < 0.5
    if method in GTA and method != "task_arithmetic" and rng.random() < 0.4:
        top["rescale"] = rng.random() < 0.5
    if method in GTA and rng.random() < 0.3:
        top["lambda"] = round(rng.uniform(0.5, 1.5), 3)
    if method in GTA and GTA[method][1] and rng.random() < 0.3:
        top["density"] = round(rng.uniform(0.3, 0.8), 3)
    doc = {"merge_method": method, "models": models, "parameters": top}
    if with_base or rng.random() < 0.3:
        doc["base_model"] = "base"
        if method == "linear" and not with_base:
            top["weight"] = 1.0
    return doc


def test_random_recipes_compute_what_mergekit_computes():
    f64 = torch.float64
    adapters = {m: lora_adapter({"x": (12, 20), "y": (9, 7)}, rank=3, seed=s, dtype=f64)
                for s, m in enumerate("abc", 1)}
    rng = random.Random(7)
    checked = 0
    drawn, raised = set(), set()
    for _ in range(150):
        doc = random_doc(rng, rng.sample("abc", rng.choice([2, 3])))
        try:
            read = parse_recipe(doc)
            result, _ = combine([(adapters[r], w) for r, w in read.inputs], read.method, read.params, rank=40,
                                device="cpu", precise=True)
        except InvalidInputError as exc:  # only what loraops refuses by design (docs/recipes.md), or mergekit too
            refused_by_design = ("negative weight", "sum to", "density ± epsilon", "give weights ≥ 0", "which is 0")
            if "where mergekit raises" in str(exc):
                module = str(exc).split(" in ")[1].split()[0]
                with pytest.raises(ValueError, match="The weighted sum of the input tensors is zero"):
                    mergekit_delta(doc, adapters, module)
                raised.add(doc["merge_method"])
            else:
                assert any(reason in str(exc) for reason in refused_by_design), (doc, exc)
            continue
        for name, module in result.modules.items():
            want = mergekit_delta(doc, adapters, name)
            assert float((module.delta(dtype=f64) - want).norm()) <= 1e-7 * float(want.norm()), (doc, name)
        checked += 1
        drawn.add(doc["merge_method"])
    assert checked >= 100 and drawn == set(GTA) | {"linear", *SPHERICAL} and raised == {"multislerp"}
