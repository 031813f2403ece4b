"""mergekit's breadcrumbs, breadcrumbs_ties, della, della_linear and lambda: their edge cases (equal magnitudes at both
breadcrumbs thresholds, DELLA's probabilities, transposed and conv modules, unbiasedness), parameter checks, and the
CLI end to end. (Each method against the float64 reference, by row blocks too: test_ops_combine.)"""
import json
import math

import pytest
import torch

import combine_reference as ref
from factories import combine_inputs, layouts_adapter, lora_adapter, loraops_run as loraops
from loraops.algebra import combine
from loraops.errors import InvalidInputError
from loraops.ops import svd
from loraops.ops.combine import (METHODS, BreadcrumbsParams, Context, DellaLinearParams, TiesParams, Term,
                                 drop_and_rescale, drop_outliers, sample_by_rank, task_arithmetic, trim)

VALUES = [[3.0, -1.0, 2.0, 0.0], [-2.0, 2.0, 5.0, -2.0], [1.0, 0.0, -5.0, 2.0]]


def term_of(values: torch.Tensor, weight: float = 1.0) -> Term:
    """A term whose delta is ``values`` (B = values, A = I)."""
    return Term(B=values, A=torch.eye(values.shape[1], dtype=values.dtype), scale=1.0, weight=weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_elements", [4, 1 << 22])
def test_breadcrumbs_breaks_ties_in_row_major_order_at_both_thresholds(dtype, block_elements, monkeypatch):
    """n = 12, density 0.42 keeps 5, gamma 0.1 drops 1. By decreasing magnitude: 5 (row 1), −5 (row 2), 3, then five
    entries of magnitude 2. The upper threshold falls inside the two 5s (the first in row-major order is dropped),
    the lower one inside the 2s (the first three are kept) — whatever the row blocks."""
    monkeypatch.setattr(svd, "BLOCK_ELEMENTS", block_elements)
    values = torch.tensor(VALUES, dtype=dtype)
    term, blocks = term_of(values), svd.row_blocks(values.shape)
    params = BreadcrumbsParams(density=0.42, gamma=0.1)
    sparsify = drop_outliers(term, params.density, blocks, Context("m", (3, 4)), 0, params)()
    got = torch.cat([sparsify(term.delta(rows)) for rows in blocks])
    assert got.tolist() == [[3.0, 0.0, 2.0, 0.0], [-2.0, 2.0, 0.0, 0.0], [0.0, 0.0, -5.0, 0.0]]
    assert torch.equal(got.double(), ref.breadcrumbs(values.double(), 0.42, 0.1))


@pytest.fixture
def inputs():
    shapes = {"a.q": (24, 40), "a.v": (16, 40)}
    return [(lora_adapter(shapes, rank=3, alpha=6, seed=1), 0.7), (lora_adapter(shapes, rank=5, alpha=4, seed=2), 0.4)]


def _same(a, b):
    for name, module in a.modules.items():
        torch.testing.assert_close(module.delta(dtype=torch.float64), b.modules[name].delta(dtype=torch.float64),
                                   rtol=1e-5, atol=1e-7)


def test_breadcrumbs_without_outliers_is_the_magnitude_trim(inputs):
    """gamma·n < 1 drops no outlier: breadcrumbs is then the top-density trim. (mergekit keeps indices[n_bot:-n_top],
    which for n_top = 0 is indices[n_bot:0]: nothing at all.)"""
    small, _ = combine(inputs, "breadcrumbs", {"density": 0.3, "gamma": 1 / 1000}, rank=40, device="cpu")
    prune, _ = combine(inputs, "magnitude_prune", {"density": 0.3}, rank=40, device="cpu")
    _same(small, prune)
    assert small.modules["a.q"].delta().abs().sum() > 0


@pytest.mark.parametrize("method, given", [
    ("breadcrumbs", {}), ("breadcrumbs_ties", {"gamma": 0.05}), ("della", {}), ("della_linear", {"epsilon": 0.3}),
    ("breadcrumbs", {"gamma": 1}), ("della", {"epsilon": -0.2}), ("della_linear", {"epsilon": 3})])
def test_density_one_keeps_everything_whatever_gamma_and_epsilon(inputs, method, given):
    """As mergekit: density 1 returns each task vector whole before gamma or epsilon is read, the default or one
    given that would not fit a lower density, even outside the range a lower one needs (sign election still drops
    the entries that disagree); the report says that none applied."""
    got, report = combine(inputs, method, {"density": 1, "normalize": False, **given}, rank=40, device="cpu")
    assert report.params["gamma" if method.startswith("breadcrumbs") else "epsilon"] is None
    for name, module in got.modules.items():
        weighted = [w * t for w, t in ref.taus(inputs, name)]
        want = ref.elect(weighted, [w for w, _ in inputs], False) if method in ref.CONSENSUS else sum(weighted)
        torch.testing.assert_close(module.delta(dtype=torch.float64), want, rtol=1e-5, atol=1e-7)


def test_della_probabilities_by_rank_with_equal_magnitudes_in_column_order(monkeypatch):
    """Uniform draws injected at 0.5 keep exactly the entries with p > 0.5. Row [1, −1, 1, 2]: ranks 0, 1, 2, 3
    (equal magnitudes in column order), p = 0.2, 0.4, 0.6, 0.8 at density 0.5, epsilon 0.3; survivors ÷ p."""
    from loraops.ops import combine as ops

    monkeypatch.setattr(ops, "uniforms", lambda *_: lambda shape: torch.full(shape, 0.5))
    values = torch.tensor([[1.0, -1.0, 1.0, 2.0], [4.0, 3.0, 2.0, 1.0]], dtype=torch.float64)
    params = DellaLinearParams(density=0.5, epsilon=0.3)
    sparsify = sample_by_rank(term_of(values), 0.5, [slice(None)], Context("m", (2, 4)), 0, params)()
    kept = sparsify(values.clone())  # (a copy: a sparsifier may overwrite the block it is given)
    torch.testing.assert_close(kept, torch.tensor([[0, 0, 1 / 0.6, 2 / 0.8], [4 / 0.8, 3 / 0.6, 0, 0]],
                                                  dtype=torch.float64))
    torch.testing.assert_close(ref.della_probabilities(values, 0.5, 0.3),
                               torch.tensor([[0.2, 0.4, 0.6, 0.8], [0.8, 0.6, 0.4, 0.2]], dtype=torch.float64))


@pytest.mark.parametrize("block_elements", [16, 1 << 22])
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_ranks_the_rows_of_the_base_weight_as_stored(method, block_elements, monkeypatch):
    """mergekit ranks each row of the checkpoint's 2-D tensor: an embedding's and a Conv1D's weight hold (B·A)ᵀ, so
    their rows are B·A's columns; a conv's rows are its output channels over in·kh·kw (ours: mergekit ranks a 4-D
    tensor along its input channels only); a row of one entry keeps it with probability density (mergekit divides 0
    by 0 there)."""
    monkeypatch.setattr(svd, "BLOCK_ELEMENTS", block_elements)
    inputs = [(layouts_adapter(1), 0.6), (layouts_adapter(2), 0.9)]
    params = {"density": 0.5, "epsilon": 0.2, "seed": 4}
    result, _ = combine(inputs, method, params, rank=64, device="cpu")
    assert result.modules["emb"].weight_shape == (40, 16) and result.modules["c1d"].weight_shape == (24, 12)
    for name, module in result.modules.items():
        want = ref.reference(method, inputs, name, density=0.5, epsilon=0.2, seed=4)
        got = module.delta(dtype=torch.float64)
        assert got.shape == want.shape and float((got - want).norm() / want.norm()) < 2e-6, name


def test_della_keeps_every_entry_expectation():
    """E[τ̃] = τ entry by entry: survivors are divided by their own keep probability. On 256×512 entries, for the
    projection S = Σ τ̃·τ (E = Σ τ², Var = Σ τ⁴(1−p)/p) and the number kept (E = Σ p = n·density, Var = Σ p(1−p)),
    the tolerance is 6 standard deviations, computed from the data: no seed makes it flake. Rescaling every
    survivor by 1/density (DARE's) would be off by many deviations — the test tells the two apart."""
    g = torch.Generator().manual_seed(0)
    term = Term(B=torch.randn(256, 8, generator=g, dtype=torch.float64),
                A=torch.randn(8, 512, generator=g, dtype=torch.float64), scale=0.1, weight=1.0)
    tau = term.delta()
    density, epsilon = 0.4, 0.25
    p = ref.della_probabilities(tau, density, epsilon)
    for seed in range(3):
        params = DellaLinearParams(density=density, epsilon=epsilon, seed=seed)
        got = task_arithmetic([term], params, Context("m", tuple(tau.shape)), sample_by_rank, consensus=False)
        sigma = math.sqrt(float((tau ** 4 * (1 - p) / p).sum()))
        total = float((tau ** 2).sum())
        assert abs(float((got * tau).sum()) - total) < 6 * sigma, seed
        kept = got != 0
        assert abs(int(kept.sum()) - tau.numel() * density) < 6 * math.sqrt(float((p * (1 - p)).sum())), seed
        # the same survivors rescaled by 1/density instead are biased: large entries are kept more often
        assert abs(float((tau * kept * tau).sum()) / density - total) > 10 * sigma


def test_lambda_scales_after_normalize(inputs):
    """lambda multiplies the mixed result after the division by the agreeing weights: ties at lambda 0.5 is half of
    ties, where halving every weight changes nothing (the disjoint mean divides it out)."""
    plain, _ = combine(inputs, "ties", {"density": 0.3}, rank=40, device="cpu")
    half, report = combine(inputs, "ties", {"density": 0.3, "lambda": 0.5}, rank=40, device="cpu")
    lighter, _ = combine([(a, w / 2) for a, w in inputs], "ties", {"density": 0.3}, rank=40, device="cpu")
    assert report.params == {"density": 0.3, "normalize": True, "lambda": 0.5}
    for name, module in half.modules.items():
        torch.testing.assert_close(module.delta(), plain.modules[name].delta() / 2, rtol=1e-5, atol=1e-7)
    _same(lighter, plain)


@pytest.mark.parametrize("method, params, message", [
    ("ties", {"density": 0.5, "gamma": 0.1}, "ties takes no gamma (it is a parameter of breadcrumbs, breadcrumbs_ties)"),
    ("dare_ties", {"density": 0.5, "epsilon": 0.1},
     "dare_ties takes no epsilon (it is a parameter of della, della_linear)"),
    ("linear", {"lambda": 0.5}, "linear takes no lambda (it is a parameter of ties, dare_ties, dare_linear, "
                                "breadcrumbs, breadcrumbs_ties, della, della_linear); scale the weights instead"),
    ("breadcrumbs", {"density": 0.95, "gamma": 0.1}, "bad parameters for breadcrumbs: gamma (0.1) + density (0.95) "
                                                     "must be at most 1: a gamma share of the largest magnitudes is "
                                                     "dropped, a density share kept below them"),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 1}, "gamma: Input should be less than 1"),
    ("della", {"density": 0.1}, "bad parameters for della: density ± epsilon (-0.05 to 0.25) must lie inside (0, 1): "
                                "they are keep probabilities"),
    ("della_linear", {"density": 0.5, "epsilon": 0.5}, "density ± epsilon (0 to 1) must lie inside (0, 1)"),
    ("della_linear", {"density": 0.5, "epsilon": -0.1}, "epsilon: Input should be greater than or equal to 0"),
    ("della", {"density": 0.5, "lambda": float("inf")}, "lambda: Input should be a finite number"),
    ("della", {"density": 0.5}, "della with normalize divides by the weights that agree on each entry"),
    ("ties", {"density": 0.5, "rescale": False},
     "ties takes no rescale (it is a parameter of dare_ties, dare_linear, della, della_linear)"),
    ("breadcrumbs", {"density": 0.5, "consensus": "count"},
     "breadcrumbs takes no consensus (it is a parameter of ties, dare_ties, breadcrumbs_ties, della, sce)"),
    ("dare_ties", {"density": 0.5, "consensus": "vote"}, "bad parameters for dare_ties: consensus: Input should be "
                                                         "'sum' or 'count'"),
])
def test_bad_parameters_are_one_line(inputs, method, params, message):
    inputs = [(inputs[0][0], 1.0), (inputs[1][0], -1.0)]  # negative: refused only where normalize is on
    with pytest.raises(InvalidInputError, match=None) as info:
        combine(inputs, method, params, device="cpu")
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return combine_inputs(tmp_path_factory.mktemp("gta-cli"))


@pytest.mark.registry_backend
def test_cli_della_end_to_end_with_lineage(files, tmp_path):
    from loraops.formats import read_adapter
    from loraops.registry import Registry

    bad = loraops("combine", files["a"], files["b"], "-m", "della", "--density", "0.5", "--gamma", "0.1")
    assert (bad.returncode, bad.stderr, bad.stdout) == (
        2, "error: della takes no --gamma (it is a parameter of breadcrumbs, breadcrumbs_ties)\n", "")
    with Registry.open() as reg:
        reg.add_base(files["base"], name="tiny")
    run = loraops("combine", f"{files['a']}:0.6", f"{files['b']}:0.8", "-m", "della", "--density", "0.4", "--epsilon",
                  "0.2", "--seed", "3", "--lambda", "1.5", "--rank", "8", "--name", "ab-della", "-o", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "della(density=0.4, epsilon=0.2, seed=3, normalize=True, lambda=1.5) of a@1×0.6, b@1×0.8"
    assert lines[-1].startswith("registered ab-della@1") and lines[-1].endswith(f"wrote {tmp_path / 'out'}")
    with Registry.open() as reg:
        record = reg.get_adapter("ab-della")
    assert record.lineage.op == "combine" and record.lineage.params == {
        "method": "della", "rank": 8,
        "params": {"density": 0.4, "epsilon": 0.2, "seed": 3, "normalize": True, "lambda": 1.5}}
    assert [(i.ref, i.weight) for i in record.lineage.inputs] == [("a@1", 0.6), ("b@1", 0.8)]
    assert set(read_adapter(tmp_path / "out").modules) == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1)
                                                           for p in "qvo"}

    run = loraops("combine", "a", "b", "-m", "breadcrumbs_ties", "--density", "0.5", "--gamma", "0.05", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["adapter"]["lineage"]["params"]["params"] == {
        "density": 0.5, "gamma": 0.05, "normalize": False, "lambda": 1.0}


@pytest.mark.registry_backend
def test_cli_no_rescale_and_count_consensus_with_lineage(files):
    """--no-rescale and --consensus count are recorded (report, lineage); at their defaults they are not, as before
    they existed (one computation, one record)."""
    from loraops.registry import Registry

    with Registry.open() as reg:
        reg.add_base(files["base"], name="tiny")
    run = loraops("combine", files["a"], files["b"], "-m", "dare_ties", "--density", "0.5", "--seed", "2",
                  "--no-rescale", "--consensus", "count", "--name", "ab-counted")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == ("dare_ties(density=0.5, seed=2, rescale=False, normalize=False, lambda=1.0, "
                                          "consensus=count) of a@1×1, b@1×1")
    run = loraops("combine", "a", "b", "-m", "dare_ties", "--density", "0.5", "--rescale", "--consensus", "sum",
                  "--name", "ab-default")
    assert run.stdout.splitlines()[0] == "dare_ties(density=0.5, seed=0, normalize=False, lambda=1.0) of a@1×1, b@1×1"
    with Registry.open() as reg:
        counted, default = reg.get_adapter("ab-counted"), reg.get_adapter("ab-default")
    assert counted.lineage.params["params"] == {"density": 0.5, "seed": 2, "rescale": False, "normalize": False,
                                                "lambda": 1.0, "consensus": "count"}
    assert default.lineage.params["params"] == {"density": 0.5, "seed": 0, "normalize": False, "lambda": 1.0}


@pytest.mark.parametrize("args, message", [
    (["-m", "ties", "--density", "0.5", "--gamma", "0.1"],
     "error: ties takes no --gamma (it is a parameter of breadcrumbs, breadcrumbs_ties)"),
    (["-m", "breadcrumbs", "--density", "0.95", "--gamma", "0.1"],
     "error: bad parameters for breadcrumbs: --gamma (0.1) + --density (0.95) must be at most 1: a gamma share of "
     "the largest magnitudes is dropped, a density share kept below them"),
    (["-m", "della", "--density", "0.9"],
     "error: bad parameters for della: --density ± --epsilon (0.75 to 1.05) must lie inside (0, 1): they are "
     "keep probabilities"),
    (["-m", "della_linear", "--density", "0.5", "--epsilon", "0.6"],
     "error: bad parameters for della_linear: --density ± --epsilon (-0.1 to 1.1) must lie inside (0, 1): they "
     "are keep probabilities"),
    (["-m", "cat", "--lambda", "2"], "error: cat takes no --lambda (it is a parameter of ties, dare_ties, dare_linear, "
                                     "breadcrumbs, breadcrumbs_ties, della, della_linear); scale the weights instead"),
    (["-m", "magnitude_prune", "--density", "0.5", "--lambda", "2"],
     "error: magnitude_prune takes no --lambda (it is a parameter of ties, dare_ties, dare_linear, breadcrumbs, "
     "breadcrumbs_ties, della, della_linear); scale the weights instead"),
    (["-m", "ties", "--density", "0.5", "--no-rescale"],
     "error: ties takes no --rescale (it is a parameter of dare_ties, dare_linear, della, della_linear)"),
    (["-m", "della_linear", "--density", "0.5", "--consensus", "count"],
     "error: della_linear takes no --consensus (it is a parameter of ties, dare_ties, breadcrumbs_ties, della, sce)"),
    (["-m", "ties", "--density", "0.5", "--consensus", "vote"],
     "error: invalid value for '--consensus': 'vote' is not one of 'sum', 'count' (see `loraops combine --help`)"),
])
def test_cli_bad_parameters(files, args, message):
    """One line and exit 2, before any input is registered (in-process; a subprocess run shows no traceback)."""
    from click.testing import CliRunner

    from loraops.cli import main
    from loraops.registry import Registry

    result = CliRunner().invoke(main, ["combine", str(files["a"]), str(files["b"]), *args], prog_name="loraops")
    assert (result.exit_code, result.output.strip()) == (2, message)
    with Registry.open() as reg:
        assert reg.list_adapters() == []


def test_della_epsilon_zero_keeps_every_entry_with_probability_density(inputs):
    """epsilon 0 is in range (density ± 0 inside (0, 1), as mergekit checks it): every p is density, so DELLA's
    survivors are DARE's (same uniforms, u < density, ÷ density). The chained 0 < d − ε < d + ε < 1 refused it."""
    della, report = combine(inputs, "della_linear", {"density": 0.4, "epsilon": 0, "seed": 5}, rank=40, device="cpu")
    dare, _ = combine(inputs, "dare_linear", {"density": 0.4, "seed": 5}, rank=40, device="cpu")
    assert report.params["epsilon"] == 0
    _same(della, dare)


@pytest.mark.parametrize("method", ["ties", "della"])
def test_disjoint_mean_divides_tiny_weights_out(inputs, method):
    """With sign election the divisor is the sum of the agreeing (positive) weights: mergekit leaves only a 0
    undivided, so the disjoint mean does not depend on the weights' scale, down to weights below 1e-8 (left
    undivided by the |Σw| < 1e-8 rule of the methods without election, the result was 1e-9 of the mean)."""
    params = {"density": 0.3, "seed": 1}
    params = params if method == "della" else {"density": 0.3}
    plain, _ = combine(inputs, method, params, rank=40, device="cpu")
    tiny, _ = combine([(a, w * 1e-9) for a, w in inputs], method, params, rank=40, device="cpu")
    for name, module in tiny.modules.items():  # (float32 rounding of the scaled weights may flip a near-0 sign)
        want = plain.modules[name].delta(dtype=torch.float64)
        assert float((module.delta(dtype=torch.float64) - want).norm() / want.norm()) < 1e-4, name


def test_default_gamma_is_lowered_where_it_does_not_fit():
    """Density 0.995 with the default gamma 0.01: as mergekit, the default drops what is left above the kept share
    (n − ⌊density·n⌋ entries) instead of being refused; a gamma given that does not fit is refused (above)."""
    values = torch.arange(1.0, 401.0).reshape(20, 20) * torch.tensor([1.0, -1.0]).repeat(10)
    term, blocks = term_of(values), svd.row_blocks(values.shape)
    params = BreadcrumbsParams(density=0.995)
    sparsify = drop_outliers(term, params.density, blocks, Context("m", (20, 20)), 0, params)()
    got = torch.cat([sparsify(term.delta(rows)) for rows in blocks])
    assert torch.equal(got.double(), ref.breadcrumbs(values.double(), 0.995, 0.01))
    assert got[-1, -1] == 0 and int((got != 0).sum()) == 398


@pytest.mark.parametrize("params, hint", [({"density": 0.5, "lambda": 2}, True),
                                          ({"density": 0.5, "lambda": 2, "normalize": False}, True),
                                          ({"density": 0.5, "lambda": 2, "normalize": True}, False)])
def test_magnitude_prune_lambda_says_to_scale_the_weights(inputs, params, hint):
    """As for cat and linear: without normalize, λ·Σwτ = Σ(λw)τ, so the error says what to do instead; with normalize
    the weights divide out, and the hint would be wrong."""
    with pytest.raises(InvalidInputError) as info:
        combine(inputs, "magnitude_prune", params, device="cpu")
    takers = "ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear"
    assert str(info.value) == (f"magnitude_prune takes no lambda (it is a parameter of {takers})"
                               + ("; scale the weights instead" if hint else ""))


@pytest.mark.parametrize("method, extra", [("dare_linear", {}), ("della_linear", {"epsilon": 0.2})])
def test_no_rescale_keeps_the_survivors_as_they_are(inputs, method, extra):
    """mergekit's rescale: false: the same entries survive (same draws), undivided. DARE's survivors are then exactly
    density × the rescaled ones; DELLA's are each τ's own entries (its p differs per entry)."""
    params = {"density": 0.4, "seed": 3, **extra}
    plain, report = combine(inputs, method, {**params, "rescale": False}, rank=40, device="cpu")
    rescaled, _ = combine(inputs, method, params, rank=40, device="cpu")
    assert report.params["rescale"] is False
    for name, module in plain.modules.items():
        got = module.delta(dtype=torch.float64)
        if method == "dare_linear":
            want = rescaled.modules[name].delta(dtype=torch.float64) * 0.4
        else:
            want = ref.reference(method, inputs, name, density=0.4, epsilon=0.2, seed=3, rescale=False)
        assert float((got - want).norm() / want.norm()) < 2e-6, name


def test_consensus_count_elects_by_votes():
    """Three inputs on one entry: +1, +1 and −5. The sum elects − (−3): only −5 is kept; the count elects + (two
    votes to one): +1 and +1 are kept, −5 dropped. Normalized: the disjoint mean of the agreeing entries."""
    values = [torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, -3.0]]), torch.tensor([[-5.0, 4.0]])]
    terms = [term_of(v) for v in values]
    for consensus, want in (("sum", [[-5.0, 3.0]]), ("count", [[1.0, 3.0]])):
        params = TiesParams(density=1, consensus=consensus)
        got = task_arithmetic(terms, params, Context("m", (1, 2)), trim, consensus=True)
        assert got.tolist() == want, consensus
        reference = ref.elect(values, [1.0] * 3, True, consensus)
        assert reference.tolist() == want, consensus


@pytest.mark.parametrize("block_elements", [4, 1 << 22])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm, ratio", [("l1", 25 / 17), ("l2", 9 / math.sqrt(67)), ("linf", 1.0)])
def test_rescale_norm_brings_the_trimmed_vector_back_to_the_whole_norm(norm, ratio, dtype, block_elements, monkeypatch):
    """mergekit's rescaled_masked_tensor by hand: the top 5 of VALUES (the first of the equal 2s in row-major order,
    whatever the row blocks: the norm's pass and the mix's each start a fresh mask) are 3, 2, −2, 5, −5; Σ|x| 25 → 17,
    Σx² 81 → 67, max 5 → 5. The factor is computed before the weight (0.5) is applied."""
    monkeypatch.setattr(svd, "BLOCK_ELEMENTS", block_elements)
    values = torch.tensor(VALUES, dtype=dtype)
    params = TiesParams(density=0.42, rescale_norm=norm, normalize=False)
    got = task_arithmetic([term_of(values, 0.5)], params, Context("m", (3, 4)), trim, consensus=False)
    kept = torch.tensor([[3.0, 0.0, 2.0, 0.0], [-2.0, 0.0, 5.0, 0.0], [0.0, 0.0, -5.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(got.double(), kept * 0.5 * ratio)
    torch.testing.assert_close(got.double(), 0.5 * ref.rescaled_masked(values.double(), ref.trim(values.double(), 0.42),
                                                                        norm))


@pytest.mark.parametrize("scale, rescaled", [(1e-9, False), (5e-9, False), (1e-8, True), (1e-7, True)])
def test_rescale_norm_leaves_a_vector_below_mergekits_eps_as_sparsified(scale, rescaled):
    """mergekit returns the masked tensor as it is where ‖τ‖ or ‖τ̂‖ is below 1e-7; l1 norms 25·scale and 17·scale:
    both below at 1e-9, only the sparsified one at 5e-9 (1.25e-7 and 8.5e-8), neither at 1e-8 (rescaled: 25/17)."""
    values = torch.tensor(VALUES, dtype=torch.float64) * scale
    params = TiesParams(density=0.42, rescale_norm="l1", normalize=False)
    got = task_arithmetic([term_of(values)], params, Context("m", (3, 4)), trim, consensus=False)
    trimmed = ref.trim(values, 0.42)
    # relative only: entries of 1e-8 are all within assert_close's default absolute tolerance (1e-7)
    torch.testing.assert_close(got, trimmed * (25 / 17 if rescaled else 1), rtol=1e-12, atol=0)
    torch.testing.assert_close(got, ref.rescaled_masked(values, trimmed, "l1"), rtol=1e-12, atol=0)


def test_rescale_norm_of_a_dare_that_drops_every_entry_is_zero(monkeypatch):
    """Every draw ≥ density: nothing survives, ‖τ̂‖ = 0 and the module comes out zero (mergekit's eps edge), not
    0·‖τ‖/0 = NaN."""
    from loraops.ops import combine as ops

    monkeypatch.setattr(ops, "uniforms", lambda *_: lambda shape: torch.full(shape, 0.9))
    values = torch.tensor(VALUES, dtype=torch.float64)
    for method in ("dare_linear", "della_linear"):
        params = METHODS[method].params(density=0.5, rescale_norm="l2")
        sparsifier = drop_and_rescale if method == "dare_linear" else sample_by_rank
        got = task_arithmetic([term_of(values)], params, Context("m", (3, 4)), sparsifier, consensus=False)
        assert torch.equal(got, torch.zeros_like(values)), method


def test_rescale_norm_replaces_dellas_division_by_p(inputs):
    """della_linear with a rescale_norm is mergekit's current della_linear: the survivors (the same draws) undivided,
    then brought back to τ's norm; the division by each p is not applied on top (not a scaled --rescale result)."""
    params = {"density": 0.4, "epsilon": 0.2, "seed": 3}
    normed, report = combine(inputs, "della_linear", {**params, "rescale_norm": "l1"}, rank=40, device="cpu")
    assert report.params == {**params, "rescale_norm": "l1", "normalize": False, "lambda": 1.0}
    for name, module in normed.modules.items():
        got = module.delta(dtype=torch.float64)
        want = ref.reference("della_linear", inputs, name, rescale_norm="l1", **params)
        assert float((got - want).norm() / want.norm()) < 2e-6, name
        divided = sum(w * ref.rescaled_masked(t, ref.della(t, 0.4, 0.2, ref.uniform_draws(3, name, i, t.shape)), "l1")
                      for i, (w, t) in enumerate(ref.taus(inputs, name)))
        assert float((got - divided).norm() / want.norm()) > 1e-2, name


@pytest.mark.parametrize("method, params, message", [
    ("magnitude_prune", {"density": 0.5, "rescale_norm": "l1"}, "magnitude_prune takes no rescale_norm (it is a "
     "parameter of ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear)"),
    ("dare_linear", {"density": 0.5, "rescale": False, "rescale_norm": "l2"},
     "bad parameters for dare_linear: rescale_norm is a way to rescale the survivors (in place of the division by "
     "their keep probability); it cannot go with rescale=False"),
    ("dare_ties", {"density": 0.5, "rescale": True, "rescale_norm": "l1"},  # not silently ignored
     "bad parameters for dare_ties: rescale_norm is a way to rescale the survivors (in place of the division by "
     "their keep probability); it cannot go with rescale=True"),
    ("ties", {"density": 0.5, "rescale_norm": "l3"},
     "bad parameters for ties: rescale_norm: Input should be 'l1', 'l2' or 'linf'"),
])
def test_rescale_norm_bad_parameters(inputs, method, params, message):
    with pytest.raises(InvalidInputError) as info:
        combine(inputs, method, params, device="cpu")
    assert str(info.value) == message


@pytest.mark.registry_backend
def test_cli_rescale_norm_with_lineage(files):
    """--rescale-norm is recorded (report, lineage) where given, and nowhere otherwise (test above: one computation,
    one record as before it existed); --no-rescale with it is one line, before anything is registered."""
    from loraops.registry import Registry

    run = loraops("combine", files["a"], files["b"], "-m", "dare_linear", "--density", "0.5", "--no-rescale",
                  "--rescale-norm", "l1")
    assert (run.returncode, run.stderr) == (2, "error: bad parameters for dare_linear: --rescale-norm is a way to "
                                               "rescale the survivors (in place of the division by their keep "
                                               "probability); it cannot go with --no-rescale\n")
    run = loraops("combine", files["a"], files["b"], "-m", "della", "--density", "0.5", "--rescale",
                  "--rescale-norm", "l1")
    assert (run.returncode, run.stderr) == (2, "error: bad parameters for della: --rescale-norm is a way to "
                                               "rescale the survivors (in place of the division by their keep "
                                               "probability); it cannot go with --rescale\n")
    with Registry.open() as reg:
        assert reg.list_adapters() == []
        reg.add_base(files["base"], name="tiny")
    run = loraops("combine", files["a"], files["b"], "-m", "breadcrumbs_ties", "--density", "0.5", "--rescale-norm",
                  "linf", "--name", "ab-normed")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == ("breadcrumbs_ties(density=0.5, rescale_norm=linf, gamma=0.01, "
                                          "normalize=False, lambda=1.0) of a@1×1, b@1×1")
    with Registry.open() as reg:
        record = reg.get_adapter("ab-normed")
    assert record.lineage.params["params"] == {"density": 0.5, "rescale_norm": "linf", "gamma": 0.01,
                                               "normalize": False, "lambda": 1.0}
