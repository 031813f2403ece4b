"""combine against the real mergekit package (not the transcription in combine_reference): each module's combined ΔW
equals mergekit's merge (mergekit.merge_methods.merge_tensors, mergekit >= 0.1.5) of base 0 + the inputs' task
vectors τᵢ = sᵢ·Bᵢ·Aᵢ, in the base weight's layout. Skipped where mergekit is not importable.

What is bridged, and why:
- DARE's and DELLA's masks: mergekit draws torch.bernoulli from the global RNG; here its sparsify module's
  `torch.bernoulli(p)` is replaced by (u < p) with loraops' own uniforms for that (seed, module, input), so both sides
  use the same mask and everything else (ranks, probabilities, rescale, election, mix) is mergekit's code.
- rescale: mergekit's `rescale: true` is an L1 norm rescale (loraops' rescale_norm="l1"); l2/linf are mergekit's
  RescaleNorm choices, reached by swapping the L1 that GeneralizedTaskArithmeticMerge hard-codes. loraops' default
  rescale (÷ density, ÷ p: the papers') has no counterpart in mergekit 0.1.5 (README "mergekit").
- consensus count and PEFT's magnitude_prune: mergekit's GeneralizedTaskArithmeticMerge class built with
  consensus_method=count, or with magnitude sparsification and no election (mergekit registers neither).
- sce and model_stock take no weights in mergekit: it is given wᵢτᵢ. Cases avoid the documented differences
  (⌊density·n⌋ = 0, mergekit's absolute 1e-6 cut-offs, a conv's last dimension, equal magnitudes).
"""
from __future__ import annotations

import contextlib
import itertools
import types

import pytest
import torch

mm = pytest.importorskip("mergekit.merge_methods")
if not hasattr(mm, "merge_tensors"):
    pytest.skip("mergekit without merge_methods.merge_tensors (before 0.1.5)", allow_module_level=True)

import combine_reference as ref  # noqa: E402
from factories import layouts_adapter, lora_adapter  # noqa: E402
from loraops.algebra import combine  # noqa: E402

gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
sp = pytest.importorskip("mergekit.sparsify")

SHAPES = {"m.q": (24, 40), "m.v": (16, 40), "m.o": (33, 17)}
ELECTED = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
MAGNITUDE = {"ties": "magnitude", "magnitude_prune": "magnitude", "dare_ties": "random", "dare_linear": "random",
             "breadcrumbs": "magnitude_outliers", "breadcrumbs_ties": "magnitude_outliers",
             "della": "della_magprune", "della_linear": "della_magprune"}


def mergekit_method(method: str, consensus: str = "sum"):
    if method != "magnitude_prune" and consensus == "sum":
        return mm.get(method)
    registered = mm.get("ties" if method == "magnitude_prune" else method)
    return gta.GeneralizedTaskArithmeticMerge(
        consensus_method=gta.ConsensusMethod(consensus) if method in ELECTED else None,
        sparsification_method=sp.SparsificationMethod(MAGNITUDE[method]),
        default_normalize=registered.default_normalize and method != "magnitude_prune",
        default_rescale=registered.default_rescale and method != "magnitude_prune",
        method_name=f"{method}_{consensus}", method_pretty_name=None, method_reference_url=None)


@contextlib.contextmanager
def loraops_masks(draws, norm=None):
    """mergekit's Bernoulli masks from ``draws`` (one uniform tensor per non-base input, in order); ``norm``: the
    RescaleNorm in place of the L1 that rescale=True selects."""
    counter = itertools.count()
    current = [None]
    shim = types.ModuleType("torch")
    shim.__getattr__ = lambda name: getattr(torch, name)

    def bernoulli(p):
        return (draws[current[0]] < p).to(p.dtype)

    shim.bernoulli = bernoulli
    original = gta.sparsify, sp.torch, gta.RescaleNorm

    def sparsify(*args, **kwargs):
        current[0] = next(counter)
        return original[0](*args, **kwargs)

    gta.sparsify, sp.torch = sparsify, shim
    if norm:
        gta.RescaleNorm = types.SimpleNamespace(l1=sp.RescaleNorm(norm))
    try:
        yield
    finally:
        gta.sparsify, sp.torch, gta.RescaleNorm = original


def merged(method, vectors, weights, parameters, draws=None, norm=None, consensus="sum"):
    """mergekit's merge of base 0 (first) + ``vectors``."""
    tensors = [torch.zeros_like(vectors[0]), *vectors]
    parameters = dict(parameters)
    if method in MAGNITUDE or method == "task_arithmetic":
        parameters["weight"] = list(weights)
        with loraops_masks(draws, norm) if draws is not None or norm else contextlib.nullcontext():
            return mm.merge_tensors(tensors, mergekit_method(method, consensus), parameters=parameters, base_index=0)
    if method in ("nuslerp", "multislerp"):
        parameters["weight"] = list(weights)
    return mm.merge_tensors(tensors, method, parameters=parameters, base_index=0)


def random_inputs(seed, weights, missing=0.0):
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for i, weight in enumerate(weights):
        shapes = {k: v for k, v in SHAPES.items() if i == 0 or float(torch.rand(1, generator=g)) >= missing}
        rank = int(torch.randint(1, 7, (1,), generator=g))
        alpha = float(torch.randint(1, 17, (1,), generator=g))
        inputs.append((lora_adapter(shapes or {"m.q": SHAPES["m.q"]}, rank=rank, alpha=alpha, seed=seed * 10 + i),
                       weight))
    return inputs


def assert_matches(inputs, method, params, mergekit_params, *, norm=None, consensus="sum", seed=0,
                   weighted_vectors=False, mergekit_name=None):
    result, _ = combine(inputs, method, params, rank=None if method == "cat" else 64, device="cpu")
    weights = [w for _, w in inputs]
    assert set(result.modules) == set().union(*(a.modules for a, _ in inputs))
    for name, module in result.modules.items():
        vectors = [t for _, t in ref.taus(inputs, name)]
        if weighted_vectors:
            vectors = [w * t for w, t in zip(weights, vectors)]
        draws = [ref.uniform_draws(seed, name, i, t.shape) for i, t in enumerate(vectors)] if method in RANDOM else None
        want = merged(mergekit_name or method, vectors, weights, mergekit_params, draws, norm, consensus)
        got = module.delta(dtype=torch.float64)
        assert got.shape == want.shape
        assert float((got - want).norm()) <= 1e-5 * float(want.norm()) + 1e-12, (name, method, params)


GTA_CASES = [
    ("ties", {"density": 0.4}, {"density": 0.4}),
    ("ties", {"density": 0.25, "lambda": 1.7, "consensus": "count"}, {"density": 0.25, "lambda": 1.7}),
    ("ties", {"density": [0.3, 0.8, 0.55], "rescale_norm": "l1"}, {"density": [0.3, 0.8, 0.55], "rescale": True}),
    ("ties", {"density": 0.6, "rescale_norm": "linf", "normalize": False}, {"density": 0.6, "rescale": True,
                                                                             "normalize": False}),
    ("magnitude_prune", {"density": 0.3}, {"density": 0.3}),
    ("magnitude_prune", {"density": 0.5, "normalize": True}, {"density": 0.5, "normalize": True}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.05}, {"density": 0.5, "gamma": 0.05}),
    ("breadcrumbs", {"density": 0.7}, {"density": 0.7}),
    ("breadcrumbs", {"density": 0.4, "gamma": 0.0, "normalize": True, "rescale_norm": "l2"},
     {"density": 0.4, "gamma": 0.0, "normalize": True, "rescale": True}),
    ("breadcrumbs_ties", {"density": [0.3, 0.6, 0.45], "gamma": [0.1, 0.02, 0.0], "lambda": -0.5},
     {"density": [0.3, 0.6, 0.45], "gamma": [0.1, 0.02, 0.0], "lambda": -0.5}),
    ("breadcrumbs_ties", {"density": 0.35, "normalize": True, "consensus": "count"},
     {"density": 0.35, "normalize": True}),
    ("dare_ties", {"density": 0.4, "rescale": False, "seed": 3}, {"density": 0.4, "rescale": False}),
    ("dare_ties", {"density": 0.6, "rescale_norm": "l1", "normalize": True, "seed": 5},
     {"density": 0.6, "rescale": True, "normalize": True}),
    ("dare_linear", {"density": [0.2, 0.7, 0.5], "rescale_norm": "l1", "lambda": 0.8},
     {"density": [0.2, 0.7, 0.5], "rescale": True, "lambda": 0.8}),
    ("dare_linear", {"density": 0.3, "rescale": False, "normalize": True}, {"density": 0.3, "rescale": False,
                                                                             "normalize": True}),
    ("della", {"density": 0.5, "rescale": False}, {"density": 0.5, "epsilon": 0.15, "rescale": False}),
    ("della", {"density": 0.4, "epsilon": 0.3, "rescale_norm": "l1", "consensus": "count", "seed": 9},
     {"density": 0.4, "epsilon": 0.3, "rescale": True}),
    ("della_linear", {"density": [0.5, 0.3, 0.7], "epsilon": [0.2, 0.1, 0.25], "rescale_norm": "l2", "lambda": 2},
     {"density": [0.5, 0.3, 0.7], "epsilon": [0.2, 0.1, 0.25], "rescale": True, "lambda": 2}),
    ("della_linear", {"density": 0.6, "epsilon": 0.0, "rescale": False, "normalize": True},
     {"density": 0.6, "epsilon": 0.0, "rescale": False, "normalize": True}),
]


@pytest.mark.parametrize("int8_mask", [False, True])
@pytest.mark.parametrize("method, params, mergekit_params", GTA_CASES)
def test_generalized_task_arithmetic_matches_mergekit(method, params, mergekit_params, int8_mask):
    """Three random inputs (ranks 1-6, one lacking some modules: a zero task vector there, as mergekit sees it on the
    merged checkpoint), mergekit's parameters as a recipe gives them; int8_mask changes nothing."""
    weights = [0.7, 0.45, 1.2] if method in ELECTED and params.get("normalize", method in ("ties", "della")) \
        else [0.7, -0.45, 1.2]
    inputs = random_inputs(sum(map(ord, method)) + len(params), weights, missing=0.4)
    norm = params.get("rescale_norm")
    assert_matches(inputs, method, params, {**mergekit_params, "int8_mask": int8_mask},
                   norm=norm if norm != "l1" else None, consensus=params.get("consensus", "sum"),
                   seed=params.get("seed", 0))


@pytest.mark.parametrize("method, params, mergekit_params, weighted", [
    ("sce", {}, {}, True), ("sce", {"select_topk": 0.4}, {"select_topk": 0.4}, True),
    ("model_stock", {}, {}, True), ("model_stock", {"filter_wise": True}, {"filter_wise": True}, True),
    ("nuslerp", {}, {}, False), ("nuslerp", {"flatten": False}, {"nuslerp_flatten": False}, False),
    ("nuslerp", {"flatten": False, "row_wise": True}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, False),
    ("multislerp", {}, {}, False), ("multislerp", {"normalize_weights": False, "eps": 1e-6},
                                    {"normalize_weights": False, "eps": 1e-6}, False),
])
def test_factor_methods_match_mergekit(method, params, mergekit_params, weighted):
    """sce and model_stock on wᵢτᵢ (mergekit's take no weights); nuslerp's t = w₂/(w₁ + w₂); multislerp's weighted
    mean direction at the weighted mean norm."""
    weights = [0.8, 1.3] if method == "nuslerp" else [0.8, 1.3, 0.6]
    assert_matches(random_inputs(11, weights, missing=0.3), method, params, mergekit_params,
                   weighted_vectors=weighted)


@pytest.mark.parametrize("method", ["linear", "svd", "cat"])
def test_weighted_sum_matches_mergekit_task_arithmetic(method):
    """linear/svd/cat are mergekit's task_arithmetic (normalize off), and its linear with normalize: false."""
    inputs = random_inputs(5, [0.7, -0.3, 1.1], missing=0.3)
    assert_matches(inputs, method, {}, {}, mergekit_name="task_arithmetic")
    result, _ = combine(inputs, method, {}, rank=None if method == "cat" else 64, device="cpu")
    for name, module in result.modules.items():
        vectors = [t for _, t in ref.taus(inputs, name)]
        want = mm.merge_tensors(vectors, "linear", parameters={"weight": [0.7, -0.3, 1.1], "normalize": False})
        got = module.delta(dtype=torch.float64)  # (float32 factors: compared as a whole, as assert_matches does)
        assert float((got - want).norm()) <= 1e-5 * float(want.norm()), name


@pytest.mark.parametrize("method, params, mergekit_params", [
    ("ties", {"density": 0.4}, {"density": 0.4}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}, {"density": 0.5, "gamma": 0.05}),
    ("sce", {"select_topk": 0.5}, {"select_topk": 0.5}),
    ("nuslerp", {}, {}), ("nuslerp", {"flatten": False, "row_wise": True},
                          {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("model_stock", {}, {}), ("multislerp", {}, {})])
def test_layouts_match_mergekit(method, params, mergekit_params):
    """An embedding and a GPT-2 Conv1D (the weight holds (B·A)ᵀ), a 3×3 conv (flattened methods and row_wise only:
    per-row vectors of a conv are documented to differ), a Linear of one input feature."""
    inputs = [(layouts_adapter(1), 0.6), (layouts_adapter(2), 0.9)]
    assert_matches(inputs, method, params, mergekit_params, weighted_vectors=method in ("sce", "model_stock"))
