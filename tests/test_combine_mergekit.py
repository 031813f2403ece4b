"""mergekit's sce, nuslerp and model_stock on the task vectors ΔW: their edge cases (equal variances at the select
threshold, zero and parallel vectors, the endpoints of t, cancelling task vectors), transposed and conv modules, the
checks of their inputs and parameters, and the CLI end to end. (Each against the float64 reference, by row blocks too:
test_ops_combine.)"""
from dataclasses import replace

import pytest
import torch

import combine_reference as ref
from factories import combine_inputs, layouts_adapter, lora_adapter, loraops_run as loraops
from loraops.algebra import combine
from loraops.errors import InvalidInputError
from loraops.ops import svd
from loraops.ops.combine import Context, SceParams, Term, sce


def values_term(values: torch.Tensor, weight: float = 1.0) -> Term:
    """A term whose delta is ``values`` (B = values, A = I)."""
    return Term(B=values, A=torch.eye(values.shape[1], dtype=values.dtype), scale=1.0, weight=weight)


@pytest.mark.parametrize("block_elements", [4, 1 << 22])
def test_sce_selects_equal_variances_in_row_major_order(block_elements, monkeypatch):
    """Two inputs, the second zero: the variance of an entry is τ²/4. |τ| = 3, 2, 2, 2, 2, 1, …: of z = 10 entries
    that vary, select_topk 0.3 keeps 3, the 3 and the first two 2s in row-major order, whatever the row blocks;
    the rest is zero, and the single contributing input comes out whole there."""
    monkeypatch.setattr(svd, "BLOCK_ELEMENTS", block_elements)
    values = torch.tensor([[1.0, -2.0, 0.0], [2.0, 3.0, -2.0], [0.0, 2.0, 1.0], [1.0, -1.0, 1.0]])
    terms = [values_term(values), values_term(torch.zeros_like(values))]
    made = sce(terms, SceParams(select_topk=0.3), 3, Context("m", (4, 3), exact=True))
    got = made.B @ made.A
    want = torch.tensor([[0.0, -2.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(ref.sce([values.double(), torch.zeros(4, 3, dtype=torch.float64)], 0.3),
                               want.double())


@pytest.fixture
def inputs():
    shapes = {"a.q": (24, 40), "a.v": (16, 40)}
    return [(lora_adapter(shapes, rank=3, alpha=6, seed=1), 0.7), (lora_adapter(shapes, rank=5, alpha=4, seed=2), 0.4)]


def test_sce_of_equal_inputs_selects_nothing(inputs):
    """No entry varies across equal inputs: mergekit's select keeps none of them (k = 0), and the module comes out
    zero; without select (select_topk 1) it is the input itself (its coefficient divides out)."""
    same = [(inputs[0][0], 1.0), (inputs[0][0], 1.0)]
    nothing, _ = combine(same, "sce", {"select_topk": 0.5}, rank=40, device="cpu")
    whole, _ = combine(same, "sce", {}, rank=40, device="cpu")
    for name, module in inputs[0][0].modules.items():
        assert not nothing.modules[name].delta().any()
        torch.testing.assert_close(whole.modules[name].delta(), module.delta(), rtol=1e-5, atol=1e-6)


def test_sce_scales_with_the_weights_and_takes_no_lambda(inputs):
    """SCE runs on the weighted task vectors: the selection, the coefficients (normalized) and the election do not
    change when every weight is halved, so the result halves — which is what the lambda error tells the user to do."""
    plain, report = combine(inputs, "sce", {"select_topk": 0.4}, rank=40, device="cpu")
    half, _ = combine([(a, w / 2) for a, w in inputs], "sce", {"select_topk": 0.4}, rank=40, device="cpu")
    assert report.params == {"select_topk": 0.4}  # (consensus sum: recorded only when not the default)
    for name, module in half.modules.items():
        torch.testing.assert_close(module.delta(), plain.modules[name].delta() / 2, rtol=1e-5, atol=1e-7)
    with pytest.raises(InvalidInputError, match=r"^sce takes no lambda \(it is a parameter of .*\); scale the "
                                                r"weights instead$"):
        combine(inputs, "sce", {"lambda": 2}, device="cpu")


def test_sce_negative_weight_subtracts(inputs):
    """The coefficients are mean squares (≥ 0), so a negative weight keeps its sign through the mean: A:1 with
    A:−1 cancels everywhere (no sign agrees with both); sce(A:−1) is −A."""
    negated, _ = combine([(inputs[0][0], -1.0)], "sce", {}, rank=40, device="cpu")
    for name, module in inputs[0][0].modules.items():
        torch.testing.assert_close(negated.modules[name].delta(), -module.delta(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, params", [
    ("sce", {"select_topk": 0.35}), ("sce", {"select_topk": 0.6, "consensus": "count"}), ("nuslerp", {}),
    ("nuslerp", {"flatten": False}), ("nuslerp", {"flatten": False, "row_wise": True}), ("model_stock", {}),
    ("model_stock", {"filter_wise": True}), ("multislerp", {})])
@pytest.mark.parametrize("block_elements", [16, 1 << 22])
def test_transposed_and_conv_modules_match_the_reference(method, params, block_elements, monkeypatch):
    """mergekit works on the checkpoint's tensor: an embedding's and a Conv1D's weight hold (B·A)ᵀ, so their rows (the
    vectors of nuslerp without flatten, of model_stock's filter_wise) are B·A's columns; a conv's rows are its
    output channels over in·kh·kw (ours: mergekit's last dimension is kw there, see the docs); sce's selection does
    not depend on the row blocks."""
    monkeypatch.setattr(svd, "BLOCK_ELEMENTS", block_elements)
    inputs = [(layouts_adapter(1), 0.6), (layouts_adapter(2), 0.9)]
    result, _ = combine(inputs, method, params, rank=64, device="cpu")
    assert result.modules["emb"].weight_shape == (40, 16) and result.modules["c1d"].weight_shape == (24, 12)
    for name, module in result.modules.items():
        want = ref.reference(method, inputs, name, **params)
        got = module.delta(dtype=torch.float64)
        assert got.shape == want.shape and float((got - want).norm()) <= 2e-6 * float(want.norm()), name


def pair(first, second):
    return [(lora_adapter({"m": (12, 20)}, rank=4, seed=1), first), (lora_adapter({"m": (12, 20)}, rank=3, seed=2),
                                                                     second)]


@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_endpoints_and_lossless_rank(flatten):
    """t = w₂/(w₁ + w₂): weights 1, 0 give τ₁ and 0, 1 give τ₂, unscaled by the weights; the result is a combination
    of the two, so the default rank (r₁ + r₂) is lossless and the factored SVD exact."""
    params = {"flatten": flatten}
    inputs = pair(1, 0)
    first, report = combine(inputs, "nuslerp", params, device="cpu")
    assert first.ranks == {"m": 7} and {m.svd for m in report.modules} == {"factored"} and report.error_max < 1e-6
    second, _ = combine(pair(0, 3), "nuslerp", params, device="cpu")
    for got, (adapter, _) in ((first, inputs[0]), (second, inputs[1])):
        torch.testing.assert_close(got.modules["m"].delta(), adapter.modules["m"].delta(), rtol=1e-5, atol=1e-6)
    same, _ = combine(pair(2, 2), "nuslerp", params, device="cpu")
    halves, _ = combine(pair(1, 1), "nuslerp", params, device="cpu")
    torch.testing.assert_close(same.modules["m"].delta(), halves.modules["m"].delta())


def test_nuslerp_of_parallel_and_zero_vectors():
    """τ₂ = 2·τ₁ is parallel (sin θ = 0): the lerp (1 − t)·τ₁ + t·τ₂; a zero task vector (a module one input
    lacks) is at θ = π/2: sin((1 − t)·π/2)·τ₁ = cos(t·π/2)·τ₁, as mergekit."""
    one = lora_adapter({"m": (12, 20), "only": (8, 20)}, rank=4, seed=1)
    double = replace(one, modules={"m": replace(one.modules["m"], B=one.modules["m"].B * 2)})
    result, _ = combine([(one, 1.0), (double, 3.0)], "nuslerp", {}, device="cpu")
    tau = one.modules["m"].delta(dtype=torch.float64)
    t = 0.75
    torch.testing.assert_close(result.modules["m"].delta(dtype=torch.float64), (1 - t) * tau + t * 2 * tau,
                               rtol=1e-5, atol=1e-6)
    only = one.modules["only"].delta(dtype=torch.float64)
    torch.testing.assert_close(result.modules["only"].delta(dtype=torch.float64),
                               torch.cos(torch.tensor(t * torch.pi / 2, dtype=torch.float64)) * only,
                               rtol=1e-5, atol=1e-6)


def test_model_stock_ratios():
    """N = 2: equal task vectors (cos 1) give t = 1, their mean; exactly opposite ones make 1 + (N − 1)·cos = 0: the
    base (ΔW = 0), finite, as mergekit 0.1.5 keeps it below 1e-6. Nearly opposite ones (1 + cos θ ~ 3e-8) gave
    t ~ 1e7, a ΔW 10⁴ times the inputs' (ours kept the base only below 1e-12): the base now, as mergekit."""
    one = lora_adapter({"m": (12, 20)}, rank=4, seed=1)
    same, _ = combine([(one, 1.0), (one, 1.0)], "model_stock", {}, device="cpu")
    torch.testing.assert_close(same.modules["m"].delta(), one.modules["m"].delta(), rtol=1e-5, atol=1e-6)
    opposite, _ = combine([(one, 1.0), (one, -2.0)], "model_stock", {"filter_wise": True}, device="cpu")
    assert not opposite.modules["m"].delta().any()
    module = one.modules["m"]
    other = lora_adapter({"m": (12, 20)}, rank=1, seed=2).modules["m"]
    for delta, kept in ((1e-3, False), (1e-1, True)):  # 1 + cos θ: 5.5e-8 (below 1e-6), 5.5e-4
        nearly = replace(one, modules={"m": replace(module, B=torch.cat([-module.B, delta * other.B], dim=1),
                                                    A=torch.cat([module.A, other.A]), alpha=module.alpha * 5 / 4)})
        result, _ = combine([(one, 1.0), (nearly, 1.0)], "model_stock", {}, device="cpu")
        want = ref.model_stock([m.delta(dtype=torch.float64) for m in (module, nearly.modules["m"])])
        got = result.modules["m"].delta(dtype=torch.float64)
        assert bool(got.any()) == bool(want.any()) == kept
        assert float((got - want).norm()) <= 1e-4 * float(want.norm())  # (t ~ 3600 amplifies float32's cosines)


@pytest.mark.parametrize("method, params", [("nuslerp", {"flatten": False}), ("nuslerp", {}),
                                            ("model_stock", {"filter_wise": True}), ("model_stock", {}),
                                            ("multislerp", {"eps": 0})])
def test_angles_of_small_task_vectors_are_exact(method, params):
    """The angles do not depend on the task vectors' size (mergekit's absolute clamps, of each norm at 1e-7 in nuslerp
    and of two norms' product at 1e-6 in model_stock, are deliberately not taken: docs/algebra.md; multislerp keeps
    mergekit's eps, absolute, and is so at eps 0): task vectors scaled by 1e-8 (rows of norm below 1e-7) give 1e-8 ×
    the result."""
    inputs = pair(1, 2)
    small = [(replace(a, modules={n: replace(m, scale=m.scale * 1e-8) for n, m in a.modules.items()}), w)
             for a, w in inputs]
    plain, _ = combine(inputs, method, params, device="cpu", precise=True)
    scaled, _ = combine(small, method, params, device="cpu", precise=True)
    rows = small[0][0].modules["m"].delta(dtype=torch.float64).norm(dim=1)
    assert float(rows.max()) < 1e-7  # (so that both of mergekit's clamps would bite)
    want = plain.modules["m"].delta(dtype=torch.float64) * 1e-8
    got = scaled.modules["m"].delta(dtype=torch.float64)
    assert float((got - want).norm()) <= 2e-6 * float(want.norm())  # (the float32 factors' rounding)


def test_sce_of_modules_that_are_zero_in_every_input():
    """A module every input leaves at zero (PEFT initializes B to 0; an adapter saved before training has it so):
    its coefficients would be 0/0 — it comes out zero, as in mergekit (uniform coefficients, nothing to mix)."""
    adapter = lora_adapter({"m": (12, 20), "z": (8, 20)}, rank=4, seed=1)
    untrained = replace(adapter, modules={**adapter.modules, "z": replace(adapter.modules["z"],
                                                                          B=torch.zeros_like(adapter.modules["z"].B))})
    for params in ({}, {"select_topk": 0.5}):
        result, _ = combine([(untrained, 1.0), (untrained, 0.5)], "sce", params, device="cpu")
        assert not result.modules["z"].delta().any(), params


def scaled(adapter, factor):
    """``adapter`` with every delta times ``factor`` (by the scale: exactly parallel in float64)."""
    return replace(adapter, modules={n: replace(m, scale=m.scale * factor) for n, m in adapter.modules.items()})


def test_multislerp_of_parallel_opposite_and_zero_task_vectors():
    """Against mergekit's code (float64 reference) where its cases part: parallel task vectors keep their direction at
    the weighted mean norm (τ, 2τ at 1:3 give 1.75·τ), lossless at rank Σ rᵢ; opposite ones whose directions cancel
    (τ, −3τ at 1:1) take mergekit's fallback, the weighted sum (−τ); with three inputs mergekit raises there, and so
    does loraops, in one line naming the module; a module every input leaves at zero comes out zero (mergekit: its
    error)."""
    one = lora_adapter({"m": (12, 20), "z": (8, 20)}, rank=4, seed=1)
    one = replace(one, modules={**one.modules, "z": replace(one.modules["z"], B=torch.zeros_like(one.modules["z"].B))})
    tau = one.modules["m"].delta(dtype=torch.float64)
    for inputs, want in (([(one, 1.0), (scaled(one, 2), 3.0)], 1.75 * tau), ([(one, 1.0), (scaled(one, -3), 1.0)], -tau)):
        result, report = combine(inputs, "multislerp", {}, device="cpu")
        assert result.ranks == {"m": 8, "z": 8} and {m.svd for m in report.modules} == {"factored"}
        mergekit = ref.multislerp([a.modules["m"].delta(dtype=torch.float64) for a, _ in inputs], [w for _, w in inputs])
        torch.testing.assert_close(mergekit, want)
        torch.testing.assert_close(result.modules["m"].delta(dtype=torch.float64), want, rtol=1e-5, atol=1e-6)
        assert not result.modules["z"].delta().any()
    cancelling = [(one, 1.0), (scaled(one, -1), 1.0), (lora_adapter({"m": (12, 20)}, rank=2, seed=3), 0.0)]
    with pytest.raises(ValueError, match="The weighted sum of the input tensors is zero"):
        ref.multislerp([a.modules["m"].delta(dtype=torch.float64) for a, _ in cancelling], [1.0, 1.0, 0.0])
    with pytest.raises(InvalidInputError) as info:
        combine(cancelling, "multislerp", {}, device="cpu")
    assert str(info.value) == (
        "multislerp: in m the weighted mean of the task vectors' directions has length 0, below eps (1e-08), where "
        "mergekit raises: directions that cancel out (a and −a with equal weights), or task vectors not much longer "
        "than eps: give other weights, or a smaller eps")
    zeros, _ = combine([(one, 1.0), (one, 2.0), (one, 0.5)], "multislerp", {}, device="cpu")
    assert not zeros.modules["z"].delta().any() and zeros.modules["m"].delta().any()


@pytest.mark.parametrize("seed", range(8))
def test_multislerp_of_opposite_task_vectors_takes_mergekits_fallback(seed):
    """τ and −2.5τ at equal weights: their directions differ by eps only, ‖Σ wᵢuᵢ‖ ≈ 2e-9 < eps, and mergekit falls
    back to Σ wᵢτᵢ = −0.75τ. From the Gram matrix that length came out ~1e-8, on the other side of eps at seed 5: the
    result was the rounding of a sum that cancels, divided by it (norm 42 for 1.35, float32)."""
    a = lora_adapter({"m": (48, 80)}, rank=8, seed=seed)
    inputs = [(a, 0.7), (scaled(a, -2.5), 0.7)]
    tau = a.modules["m"].delta(dtype=torch.float64)
    torch.testing.assert_close(ref.multislerp([tau, -2.5 * tau], [0.7, 0.7]), -0.75 * tau)
    for precise in (False, True):
        result, _ = combine(inputs, "multislerp", {}, device="cpu", precise=precise)
        torch.testing.assert_close(result.modules["m"].delta(dtype=torch.float64), -0.75 * tau, rtol=1e-5, atol=1e-6)


def test_multislerp_at_eps_zero_takes_the_limit_where_mergekit_divides_zero_by_zero():
    """eps 0 and a module one of three adapters lacks: mergekit's direction of its zero task vector is 0/0 (the module
    NaN); loraops' is the limit eps → 0, direction 0 (its weight still counted)."""
    a, b, c = (lora_adapter(shapes, rank=r, seed=s) for shapes, r, s in
               (({"m": (12, 20), "o": (8, 20)}, 4, 1), ({"m": (12, 20)}, 3, 2), ({"m": (12, 20)}, 2, 3)))
    inputs = [(a, 1.0), (b, 2.0), (c, 0.5)]
    result, _ = combine(inputs, "multislerp", {"eps": 0}, device="cpu")
    taus = [a.modules["o"].delta(dtype=torch.float64), torch.zeros(8, 20, dtype=torch.float64)]
    assert ref.multislerp([taus[0], taus[1], taus[1]], [1.0, 2.0, 0.5], eps=0).isnan().all()
    limit = ref.multislerp([taus[0], taus[1], taus[1]], [1.0, 2.0, 0.5], eps=1e-300)
    torch.testing.assert_close(limit, taus[0] / 3.5)
    torch.testing.assert_close(result.modules["o"].delta(dtype=torch.float64), limit, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("eps", [1e-12, 0.0])
def test_multislerp_of_opposite_task_vectors_whose_factors_cancel_within_each_takes_the_fallback(eps):
    """τ and −2τ at equal weights, τ's factors B = [b, 3b], A = [a; (−a + 10⁻⁴δ)/3]: their components cancel within τ
    (‖τ‖ ~ 1e-4 of Σ‖bⱼ‖‖aⱼ‖), so the float64 QR's length of Σ wᵢuᵢ, exactly 0, came out ~1e-12, not below eps
    1e-12 nor 0, and the result was that rounding's direction, divided by it. Its rounding is taken of the factors'
    components now: 0, mergekit's fallback Σ wᵢτᵢ = −τ/2 (at eps 0 mergekit divides 0 by 0; the limit eps → 0, as
    above), to float32's rounding of those components (6e-8 × 1e4) or float64's."""
    g = torch.Generator().manual_seed(3)
    b, a = torch.randn(64, 4, generator=g), torch.randn(4, 96, generator=g)
    one = lora_adapter({"m": (64, 96)}, rank=8, seed=1)
    one = replace(one, modules={"m": replace(one.modules["m"], B=torch.cat([b, 3 * b], 1), scale=2.0 ** 10,
                                             A=torch.cat([a, (1e-4 * torch.randn(4, 96, generator=g) - a) / 3]))})
    tau = one.modules["m"].delta(dtype=torch.float64)
    assert float(tau.norm()) > 1  # (mergekit's eps 1e-12 then falls back too: its uᵢ differ by ~eps/‖τ‖)
    want = ref.multislerp([tau, -2 * tau], [1.0, 1.0], eps=eps or 1e-300)
    torch.testing.assert_close(want, -tau / 2)
    for precise in (False, True):
        result, _ = combine([(one, 1.0), (scaled(one, -2), 1.0)], "multislerp", {"eps": eps}, device="cpu",
                            precise=precise)
        got = result.modules["m"].delta(dtype=torch.float64)
        assert float((got - want).norm()) <= (1e-6 if precise else 1e-2) * float(want.norm()), precise


@pytest.mark.parametrize("eps", [1e-8, 1e-12])
def test_multislerp_of_one_direction_in_two_factorizations_whose_components_cancel_takes_the_fallback(eps):
    """τ and −3τ at equal weights, τ's factors B = [b, 3b], A = [a; (−a + 10⁻⁵δ)/3], −3τ's the same rank components
    in another order (one matrix, its Gram sums rounded otherwise): ‖τᵢ‖ as √⟨τᵢ, τᵢ⟩ was rounded to float64's of
    (Σ‖bⱼ‖‖aⱼ‖)², 1e-6 of ‖τ‖ here, and the uᵢ's lengths differed by that: ‖Σ wᵢuᵢ‖ came out ~1e-6, above eps and
    norm_of_sum's zero, where mergekit's is ~eps/‖τ‖ and it falls back to Σ wᵢτᵢ = −τ (loraops gave ±2τ̂‖τ‖)."""
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(64, 4, generator=g), torch.randn(4, 96, generator=g)
    B, A = torch.cat([b, 3 * b], 1), torch.cat([a, (1e-5 * torch.randn(4, 96, generator=g) - a) / 3])
    order = torch.randperm(8, generator=g)
    one = lora_adapter({"m": (64, 96)}, rank=8, seed=1)
    one, other = (replace(one, modules={"m": replace(one.modules["m"], B=B, A=A, scale=scale)})
                  for B, A, scale in ((B, A, 2.0 ** 10), (B[:, order], A[order], -3 * 2.0 ** 10)))
    tau = one.modules["m"].delta(dtype=torch.float64)
    assert float(tau.norm()) > 1  # (mergekit's uᵢ differ by ~eps/‖τ‖: it falls back too)
    want = ref.multislerp([tau, -3 * tau], [1.0, 1.0], eps=eps)
    torch.testing.assert_close(want, -tau)
    for precise in (False, True):
        result, _ = combine([(one, 1.0), (other, 1.0)], "multislerp", {"eps": eps}, device="cpu", precise=precise)
        got = result.modules["m"].delta(dtype=torch.float64)
        assert float((got - want).norm()) <= (1e-6 if precise else 1e-1) * float(want.norm()), precise


@pytest.mark.parametrize("eps", [1e-9, 1e-7])
def test_multislerp_whose_mean_direction_is_short_but_above_eps_is_formed_without_float32s_cancellation(eps):
    """τ and −2τ at equal weights with ‖τ‖ = 0.2: mergekit's uᵢ differ by eps/‖τ‖, ‖Σ wᵢuᵢ‖ = 1.25·eps is above eps,
    and its result is −τ̂ at the mean norm. The result is Σ cᵢτᵢ with cᵢ ~ 1/‖Σ wᵢuᵢ‖ that cancel: formed in float32
    its rounding was 6e-8 × 1e9 (at eps 1e-9: 90× the result's norm; 1e-7: 100 %); float64 where they cancel."""
    one = lora_adapter({"m": (48, 80)}, rank=8, seed=5)
    one = scaled(one, 0.2 / float(one.modules["m"].delta(dtype=torch.float64).norm()))
    tau = one.modules["m"].delta(dtype=torch.float64)
    want = ref.multislerp([tau, -2 * tau], [1.0, 1.0], eps=eps)
    torch.testing.assert_close(want, -0.3 * tau / float(tau.norm()))  # (not the fallback −τ/2)
    result, _ = combine([(one, 1.0), (scaled(one, -2), 1.0)], "multislerp", {"eps": eps}, device="cpu")
    assert result.modules["m"].B.dtype == torch.float32
    got = result.modules["m"].delta(dtype=torch.float64)
    assert float((got - want).norm()) <= 1e-6 * float(want.norm())


@pytest.mark.parametrize("dtype, bound, bias", [(torch.bfloat16, 3e-3, 5e-4), (torch.float16, 4e-4, 5e-5)])
def test_multislerp_of_half_precision_adapters_takes_its_weights_in_float64(dtype, bound, bias):
    """mergekit builds the weights in the tensors' dtype: in bfloat16, 1/3 is 0.333984375 and the normalized weights
    sum to 1.00195, the whole module ~2⁻⁹ too long (float16: 2⁻¹²), a bias about as large as rounding the exact
    result to that dtype once. loraops takes the weights in float64: its half-precision adapter is within about two
    such roundings of the float64 reference on the same inputs, without a bias of the module's length (the
    projection of its delta on the reference's)."""
    adapters = [lora_adapter({"m": (64, 96)}, rank=8, seed=s, dtype=dtype) for s in (1, 2, 3)]
    taus = [a.modules["m"].delta(dtype=torch.float64) for a in adapters]
    for weights in ([1.0, 1.0, 1.0], [0.7, -0.2, 0.5], [1.0, 2.0, 0.5]):
        exact = ref.multislerp(taus, weights)
        rounded = torch.tensor(weights, dtype=dtype)
        in_dtype = ref.multislerp(taus, (rounded / rounded.sum()).double().tolist(), normalize_weights=False)
        for precise in (False, True):
            result, _ = combine(list(zip(adapters, weights)), "multislerp", {}, device="cpu", precise=precise)
            got = result.modules["m"].delta(dtype=torch.float64)
            assert result.modules["m"].B.dtype == dtype
            assert float((got - exact).norm()) <= bound * float(exact.norm()), (weights, precise)
            assert abs(float((got * exact).sum() / (exact * exact).sum()) - 1) <= bias, (weights, precise)
        if weights == [1.0, 1.0, 1.0]:  # (mergekit's weights: the bias this test would catch)
            assert abs(float((in_dtype * exact).sum() / (exact * exact).sum()) - 1) > 3 * bias


@pytest.mark.parametrize("method, weights, params, message", [
    ("nuslerp", [1, 1, 1], {}, "nuslerp interpolates between exactly two adapters (got 3)"),
    ("nuslerp", [1], {}, "nuslerp interpolates between exactly two adapters (got 1)"),
    ("nuslerp", [1, -0.5], {}, "nuslerp's weights only place the point t = w₂/(w₁ + w₂) between the two task vectors: "
                               "give weights ≥ 0, not both 0 (got 1 and -0.5)"),
    ("nuslerp", [0, 0], {}, "give weights ≥ 0, not both 0 (got 0 and 0)"),
    ("nuslerp", [1, 1], {"row_wise": True}, "bad parameters for nuslerp: row_wise applies only with flatten off: a "
                                            "flattened module is one vector"),
    ("nuslerp", [1, 1], {"lambda": 2}, "nuslerp takes no lambda (it is a parameter of ties, dare_ties, dare_linear, "
                                       "breadcrumbs, breadcrumbs_ties, della, della_linear)"),
    ("model_stock", [1], {}, "model_stock needs at least two adapters (got 1): its ratio comes from the angles between "
                             "their task vectors"),
    ("model_stock", [1, 1], {"flatten": False}, "model_stock takes no flatten (it is a parameter of nuslerp)"),
    ("multislerp", [2], {}, "multislerp needs at least two adapters (got 1): of one, mergekit returns its task vector "
                            "unchanged, whatever its weight"),
    ("multislerp", [1, -0.5, -0.5], {}, "multislerp with normalize_weights divides the weights by their sum, which is "
                                        "0: give other weights, or normalize_weights=False"),
    ("multislerp", [1, 1], {"eps": -1}, "bad parameters for multislerp: eps: Input should be greater than or equal "
                                        "to 0"),
    ("multislerp", [1, 1], {"lambda": 2}, "multislerp takes no lambda (it is a parameter of ties, dare_ties, "
                                          "dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear)"),
    ("sce", [1, 1], {"select_topk": 0}, "bad parameters for sce: select_topk: Input should be greater than 0"),
    ("sce", [1, 1], {"density": 0.5}, "sce takes no density (it is a parameter of ties,"),
])
def test_bad_inputs_and_parameters_are_one_line(method, weights, params, message):
    adapter = lora_adapter({"m": (12, 20)}, rank=4, seed=1)
    with pytest.raises(InvalidInputError) as info:
        combine([(adapter, w) for w in weights], method, params, device="cpu")
    text = str(info.value)
    assert (text.startswith(message) if message.endswith(",") else message in text) and "\n" not in text
    if method in ("nuslerp", "multislerp") and "lambda" in params:
        assert text == message  # the weights place t, or are normalized: scaling them is no substitute


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return combine_inputs(tmp_path_factory.mktemp("mergekit-cli"))


def test_cli_end_to_end_with_lineage(files):
    from loraops.registry import Registry

    with Registry.open() as reg:
        reg.add_base(files["base"], name="tiny")
    runs = {
        "abc-sce": (["sce", "--select-topk", "0.3", "--consensus", "count"],
                    "sce(select_topk=0.3, consensus=count) of a@1×1, b@1×0.5, c@1×1",
                    {"select_topk": 0.3, "consensus": "count"}),
        "ab-nuslerp": (["nuslerp", "--no-flatten", "--row-wise"],
                       "nuslerp(flatten=False, row_wise=True) of a@1×1, b@1×0.5", {"flatten": False, "row_wise": True}),
        "abc-stock": (["model_stock", "--filter-wise", "--rank", "6"],
                      "model_stock(filter_wise=True) of a@1×1, b@1×0.5, c@1×1", {"filter_wise": True}),
        "abc-multislerp": (["multislerp", "--no-normalize-weights", "--eps", "0.001"],
                           "multislerp(normalize_weights=False, eps=0.001) of a@1×1, b@1×0.5, c@1×1",
                           {"normalize_weights": False, "eps": 0.001}),
    }
    for name, (args, first, params) in runs.items():
        refs = [f"{files['a']}", f"{files['b']}:0.5"] + ([str(files["c"])] if name.startswith("abc") else [])
        run = loraops("combine", *refs, "-m", *args, "--name", name)
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[0] == first and lines[-1].startswith(f"registered {name}@1"), lines
        with Registry.open() as reg:
            record = reg.get_adapter(name)
        assert record.lineage.params["params"] == params and record.lineage.params["method"] == args[0]
    run = loraops("combine", "a", "b", "c", "-m", "model_stock", "--rank", "5")  # (v_proj: a's rank 4 alone)
    assert run.stdout.splitlines()[0] == "model_stock(filter_wise=False) of a@1×1, b@1×1, c@1×1"
    assert run.stdout.splitlines()[1].startswith("6 modules, rank 4–5, ")


@pytest.mark.parametrize("args, message", [
    (["{a}", "{b}", "{c}", "-m", "nuslerp"], "error: nuslerp interpolates between exactly two adapters (got 3)"),
    (["{a}", "-m", "model_stock"], "error: model_stock needs at least two adapters (got 1): its ratio comes from the "
                                   "angles between their task vectors"),
    (["{a}", "-m", "multislerp"], "error: multislerp needs at least two adapters (got 1): of one, mergekit returns its "
                                  "task vector unchanged, whatever its weight"),
    (["{a}", "{b}:-1", "-m", "multislerp"], "error: multislerp with normalize_weights divides the weights by their "
                                            "sum, which is 0: give other weights, or --no-normalize-weights"),
    (["{a}:0.1", "{b}:0.2", "{c}:-0.3", "-m", "multislerp"],  # (Σw = 5.6e-17: each weight ÷ it ~1e16)
     "error: multislerp with normalize_weights divides the weights by their sum, which is 0 to rounding (5.6e-17): "
     "give other weights, or --no-normalize-weights"),
    (["{a}", "{a}:-1", "{c}:0", "-m", "multislerp", "--no-normalize-weights"],  # (found while combining)
     "error: multislerp: in model.layers.0.self_attn.q_proj the weighted mean of the task vectors' directions has "
     "length 0, below eps (1e-08), where mergekit raises: directions that cancel out (a and −a with equal weights), "
     "or task vectors not much longer than eps: give other weights, or a smaller eps"),
    (["{a}", "{b}", "{c}", "-m", "multislerp", "--eps", "5"],  # (o_proj: b's alone, u = τ/(‖τ‖ + 5), at weight 1/3)
     "error: multislerp: in model.layers.0.self_attn.o_proj the weighted mean of the task vectors' directions has "
     "length 0.071, below eps (5), where mergekit raises: directions that cancel out (a and −a with equal weights), or "
     "task vectors not much longer than eps: give other weights, or a smaller eps"),
    (["{a}", "{b}", "-m", "nuslerp", "--row-wise"], "error: bad parameters for nuslerp: --row-wise applies only "
                                                    "with --flatten off: a flattened module is one vector"),
    (["{a}", "{b}", "-m", "ties", "--density", "0.5", "--select-topk", "0.5"],
     "error: ties takes no --select-topk (it is a parameter of sce)"),
    (["{a}", "{b}", "-m", "sce", "--filter-wise"],
     "error: sce takes no --filter-wise (it is a parameter of model_stock)"),
])
def test_cli_bad_inputs(files, args, message):
    """One line and exit 2, before any input is registered."""
    from click.testing import CliRunner

    from loraops.cli import main
    from loraops.registry import Registry

    argv = ["combine", *(a.format(**{k: str(v) for k, v in files.items()}) for a in args)]
    result = CliRunner().invoke(main, argv, prog_name="loraops")
    assert (result.exit_code, result.output.strip()) == (2, message)
    with Registry.open() as reg:
        assert reg.list_adapters() == []
