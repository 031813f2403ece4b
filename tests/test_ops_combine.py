"""Every combine method against an independent float64 dense reference."""
import pytest
import torch

from combine_reference import NORMALIZED, reference
from factories import lora_adapter
from loraops.algebra import combine
from loraops.ops.combine import METHODS

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass

SHAPES = {"a.q": (24, 40), "a.v": (16, 40)}


@pytest.fixture
def inputs():
    one = lora_adapter(SHAPES, rank=3, alpha=6, seed=1)
    two = lora_adapter(SHAPES, rank=5, alpha=4, seed=2, scale_mode="rslora")
    # "b.o" only in the third input: the others count as zero there
    three = lora_adapter({**SHAPES, "b.o": (24, 16)}, rank=4, alpha=4, seed=3)
    return [(one, 0.7), (two, -0.4), (three, 1.2)]


CASES = [("cat", {}), ("linear", {}), ("svd", {}), ("ties", {"density": 0.3}), ("magnitude_prune", {"density": 0.5}),
         ("dare_linear", {"density": 0.4, "seed": 7}), ("dare_ties", {"density": 0.6, "seed": 3, "lambda": 0.7}),
         ("breadcrumbs", {"density": 0.5, "gamma": 0.1}), ("breadcrumbs_ties", {"density": 0.3, "lambda": 1.5}),
         ("della", {"density": 0.5, "seed": 5}), ("della_linear", {"density": 0.4, "epsilon": 0.3, "seed": 2}),
         # mergekit's rescale: false and consensus_method: count
         ("ties", {"density": 0.3, "consensus": "count"}),
         ("dare_linear", {"density": 0.4, "seed": 7, "rescale": False}),
         ("dare_ties", {"density": 0.6, "seed": 3, "rescale": False, "consensus": "count"}),
         ("breadcrumbs_ties", {"density": 0.3, "consensus": "count"}),
         ("della", {"density": 0.5, "seed": 5, "rescale": False, "consensus": "count"}),
         ("della_linear", {"density": 0.4, "epsilon": 0.3, "seed": 2, "rescale": False}),
         # mergekit's current rescale (rescale_norm; its config's rescale: true is l1)
         ("ties", {"density": 0.3, "rescale_norm": "l1"}),
         ("dare_linear", {"density": 0.4, "seed": 7, "rescale_norm": "l2"}),
         ("dare_ties", {"density": 0.6, "seed": 3, "rescale_norm": "linf"}),
         ("breadcrumbs", {"density": 0.5, "gamma": 0.1, "rescale_norm": "l1"}),
         ("breadcrumbs_ties", {"density": 0.3, "rescale_norm": "l2"}),
         ("della", {"density": 0.5, "seed": 5, "rescale_norm": "l1"}),
         ("della_linear", {"density": 0.4, "epsilon": 0.3, "seed": 2, "rescale_norm": "linf"}),
         ("sce", {"select_topk": 0.3}), ("sce", {}), ("sce", {"select_topk": 0.5, "consensus": "count"}),
         ("nuslerp", {}), ("nuslerp", {"flatten": False}), ("nuslerp", {"flatten": False, "row_wise": True}),
         ("model_stock", {}), ("model_stock", {"filter_wise": True}),
         ("multislerp", {}), ("multislerp", {"normalize_weights": False}), ("multislerp", {"eps": 0.05})]
TWO = {"nuslerp"}  # methods of exactly two inputs: the second and third (b.o then only in one of them)


def expected(method, inputs, name, params):
    """The float64 reference with the case's params (and the methods' defaults)."""
    keys = {"density": "density", "seed": "seed", "gamma": "gamma", "epsilon": "epsilon", "normalize": "normalize",
            "lambda": "lam", "rescale": "rescale", "consensus": "consensus", "select_topk": "select_topk",
            "flatten": "flatten", "row_wise": "row_wise", "filter_wise": "filter_wise",
            "rescale_norm": "rescale_norm", "normalize_weights": "normalize_weights", "eps": "eps"}
    return reference(method, inputs, name, **{keys[k]: v for k, v in params.items()})


def test_every_method_is_tested():
    assert {name for name, _ in CASES} == set(METHODS)


@pytest.mark.parametrize("method, params", CASES,
                         ids=[",".join([method, *(f"{k}={v}" for k, v in params.items())]) for method, params in CASES])
def test_method_matches_float64_reference(inputs, method, params):
    if method in NORMALIZED | TWO:  # normalized: negative weights are refused (next test); nuslerp's place t
        inputs = [(adapter, abs(weight)) for adapter, weight in inputs[-2 if method in TWO else 0:]]
    # lossless rank: the full rank of each output (element-wise results are full-rank matrices)
    rank = None if method in ("cat", "linear", "svd") else 40
    result, report = combine(inputs, method, params, rank=rank, device="cpu")
    assert set(result.modules) == {"a.q", "a.v", "b.o"}
    for name, module in result.modules.items():
        want = expected(method, inputs, name, params)
        got = module.delta(dtype=torch.float64)
        assert float((got - want).norm()) <= 2e-6 * float(want.norm()), name  # (a zero result: exactly)
        assert module.scale == 1.0 and module.alpha == module.rank
    assert report.error_max < 1e-5
    assert {m.name: m.inputs for m in report.modules} == {"a.q": len(inputs), "a.v": len(inputs), "b.o": 1}


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.5}),
                                            ("dare_ties", {"density": 0.5, "normalize": True})])
def test_normalized_methods_refuse_negative_weights(inputs, method, params):
    """The disjoint mean Σwτ/Σw of the agreeing entries undoes a weight's sign: ties(A:-1) is +A, and A:1 with
    A:-0.9 divides by 0.1. Refused, pointing at normalize=False (which sums, and then a negative weight subtracts)."""
    from loraops.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="a negative weight would not subtract: use normalize=False,"):
        combine(inputs, method, params, device="cpu")
    negated, _ = combine([(inputs[0][0], -1.0)], method, {**params, "density": 1.0, "normalize": False}, rank=40,
                         device="cpu")
    original = inputs[0][0].modules["a.q"].delta(dtype=torch.float64)
    torch.testing.assert_close(negated.modules["a.q"].delta(dtype=torch.float64), -original, rtol=1e-5, atol=1e-6)


def test_cat_and_linear_ranks(inputs):
    cat, report = combine(inputs, "cat", device="cpu")
    assert cat.ranks == {"a.q": 12, "a.v": 12, "b.o": 4}
    assert {m.svd for m in report.modules} == {"none"}
    linear, report = combine(inputs, "linear", rank=6, device="cpu")
    assert linear.ranks == {"a.q": 6, "a.v": 6, "b.o": 4}  # b.o has rank 4: nothing to truncate
    # rank 6 < 12: the best rank-6 approximation of the true weighted sum
    expected = reference("linear", inputs, "a.q")
    U, S, Vh = torch.linalg.svd(expected)
    best = U[:, :6] @ torch.diag(S[:6]) @ Vh[:6]
    torch.testing.assert_close(linear.modules["a.q"].delta(dtype=torch.float64), best, rtol=1e-5, atol=1e-6)
    err = {m.name: m.error for m in report.modules}["a.q"]
    assert err == pytest.approx(float(S[6:].norm() / S.norm()), rel=1e-4)


def test_element_wise_default_rank_is_largest_input_rank(inputs):
    result, report = combine(inputs, "ties", {"density": 0.5, "normalize": False}, device="cpu")
    assert result.ranks == {"a.q": 5, "a.v": 5, "b.o": 4}
    assert all(m.svd == "exact" and 0 < m.error < 1 for m in report.modules if m.name != "b.o")


def test_density_one_reduces_to_linear(inputs):
    linear, _ = combine(inputs, "linear", device="cpu")
    for method in ("dare_linear", "magnitude_prune"):
        got, _ = combine(inputs, method, {"density": 1.0}, rank=40, device="cpu")
        for name in linear.modules:
            torch.testing.assert_close(got.modules[name].delta(), linear.modules[name].delta(), rtol=1e-4, atol=1e-6)


def test_dare_is_seeded(inputs):
    first, _ = combine(inputs, "dare_ties", {"density": 0.5, "seed": 1}, device="cpu")
    again, _ = combine(inputs, "dare_ties", {"density": 0.5, "seed": 1}, device="cpu")
    other, _ = combine(inputs, "dare_ties", {"density": 0.5, "seed": 2}, device="cpu")
    assert torch.equal(first.modules["a.q"].B, again.modules["a.q"].B)
    assert not torch.allclose(first.modules["a.q"].delta(), other.modules["a.q"].delta())


def test_conv_and_embedding_modules():
    conv = [(lora_adapter({"c": (6, 4, 3, 3)}, rank=r, seed=s, kind="conv"), 1.0) for r, s in ((2, 0), (3, 1))]
    result, _ = combine(conv, "linear", device="cpu")
    expected = sum(a.modules["c"].delta(dtype=torch.float64) for a, _ in conv)
    assert result.modules["c"].A.shape == (5, 4, 3, 3)
    torch.testing.assert_close(result.modules["c"].delta(dtype=torch.float64), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_elements", [40, 100])
@pytest.mark.parametrize("method, params", CASES[3:])
def test_element_wise_methods_built_in_row_blocks_match_the_reference(inputs, method, params, block_elements,
                                                                      monkeypatch):
    """The element-wise result is built row block by row block (one row, or two and a half); a block boundary must
    change nothing: the trim threshold is global, DARE's mask stream runs on across blocks."""
    from loraops.ops import svd

    monkeypatch.setattr(svd, "BLOCK_ELEMENTS", block_elements)
    inputs = [(adapter, abs(weight)) for adapter, weight in inputs[-2 if method in TWO else 0:]]
    result, _ = combine(inputs, method, params, rank=40, device="cpu")
    for name, module in result.modules.items():
        want = expected(method, inputs, name, params)
        assert float((module.delta(dtype=torch.float64) - want).norm()) <= 2e-6 * float(want.norm()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trim_keeps_exactly_k_entries_with_ties_first_in_row_major_order(dtype, monkeypatch):
    """The k-th largest magnitude by radix select over the bit patterns (never a sort of the whole delta); of
    entries tied with it, the first ones in row-major order, so exactly k are kept, whatever the blocks."""
    from loraops.ops import svd
    from loraops.ops.combine import Context, Term, kth_largest_magnitudes, trim

    monkeypatch.setattr(svd, "BLOCK_ELEMENTS", 6)
    values = torch.tensor([[3.0, -1.0, 2.0, 0.0], [-2.0, 2.0, 5.0, -2.0], [1.0, 0.0, -5.0, 2.0]], dtype=dtype)
    term = Term(B=values, A=torch.eye(4, dtype=dtype), scale=1.0, weight=1.0)  # delta = values
    blocks = svd.row_blocks(values.shape)
    assert len(blocks) == 3
    bits_dtype = torch.int64 if dtype == torch.float64 else torch.int32
    for k, (magnitude, ties_kept) in {1: (5.0, 1), 2: (5.0, 2), 3: (3.0, 1), 5: (2.0, 2), 8: (2.0, 5), 9: (1.0, 1),
                                      12: (0.0, 2)}.items():
        [top] = kth_largest_magnitudes(term.delta, [k], blocks, term.A)
        assert (torch.tensor([top.threshold], dtype=bits_dtype).view(dtype).item(), top.equal_kept) == (
            magnitude, ties_kept), k
    sparsify = trim(term, 0.42, blocks, Context("m", (3, 4)), 0, None)()  # k = 5
    kept = torch.cat([sparsify(term.delta(rows)) for rows in blocks])
    assert kept.tolist() == [[3.0, 0.0, 2.0, 0.0], [-2.0, 0.0, 5.0, 0.0], [0.0, 0.0, -5.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_select_matches_a_stable_sort_on_extreme_values(dtype):
    """The masks of ``kth_largest_magnitudes`` (several ks in one select, float64's four passes) against a stable sort of the bit
    patterns, on −0, denormals, the largest finite values, all-equal and integer-valued deltas, for k = 1, k = n
    and others, over blocks of one row, three rows and the whole: the same entries every time."""
    import random

    from loraops.ops import combine as ops
    from loraops.ops.svd import row_blocks

    class Values(ops.Term):  # a term whose delta is given (a product would turn −0 into +0)
        def delta(self, rows=slice(None)):
            return self.B[rows].clone()

    info = torch.finfo(dtype)
    specials = [0.0, -0.0, info.tiny / 4, -info.tiny / 8, info.tiny, info.smallest_normal * 1e-3, 1.0, -1.0,
                info.max, -info.max]
    rng = random.Random(0)
    for trial in range(12):
        rows, cols = rng.randint(1, 5), rng.randint(1, 7)
        n = rows * cols
        values = [torch.tensor([rng.choice(specials) for _ in range(n)], dtype=dtype),
                  torch.full((n,), rng.choice(specials), dtype=dtype),
                  torch.randint(-2, 3, (n,)).to(dtype)][trial % 3].reshape(rows, cols)
        order = torch.sort(ops._magnitude_bits(values).flatten(), descending=True, stable=True).indices
        ks = sorted({1, n, rng.randint(1, n), rng.randint(1, n)})
        for step in (1, 3, rows):  # (3: a partial last block)
            blocks = row_blocks((rows, cols)) if step == rows else [slice(r, r + step) for r in range(0, rows, step)]
            term = Values(B=values, A=values[:0], scale=1.0, weight=1.0)
            for k, top in zip(ks, ops.kth_largest_magnitudes(term.delta, ks, blocks, values)):
                mask = top.mask()
                got = torch.cat([mask(ops._magnitude_bits(values[r])) for r in blocks]).flatten()
                assert got.nonzero().flatten().tolist() == sorted(order[:k].tolist()), (trial, k, step)


def test_mix_normalizes_in_the_dtype_it_computes_in():
    """The sign-elected divisor was Σ agree × weight with agree a bool tensor, which torch makes float32: in float64
    (--precise) the weights were rounded to float32 (0.1 → 0.10000000149), and a weight past 3.4e38 became inf."""
    from loraops.ops.combine import mix

    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(8, 8, generator=g, dtype=torch.float64).abs() for _ in range(2)]  # all agree: +
    for weights in ([0.1, 0.3], [1e39, 3e39]):
        out = torch.empty(8, 8, dtype=torch.float64)
        mix(out, [t * w for t, w in zip(taus, weights)], weights, "sum", normalize=True)
        assert torch.equal(out, (taus[0] * weights[0] + taus[1] * weights[1]) / (0.0 + weights[0] + weights[1]))


def test_mix_refuses_weights_whose_sum_is_past_its_dtype():
    """Weights of 1e308 (float64) or 2e38 (float32) sum to inf: the division made every entry they both contribute to
    0, a result of zeros written silently. Those entries are NaN now, which the checks after refuse."""
    from loraops.ops.combine import mix

    for dtype, weight in ((torch.float64, 1e308), (torch.float32, 2e38)):
        taus = [torch.full((4, 4), 0.25 * weight, dtype=dtype)] * 2  # (finite: the weighted τ of 0.25 each)
        for consensus in ("sum", None):
            out = torch.empty(4, 4, dtype=dtype)
            mix(out, taus, [weight, weight], consensus, normalize=True)
            assert out.isnan().all(), (dtype, consensus)
