"""Per-input density, gamma and epsilon (mergekit's per-model parameters) in the element-wise methods: against a
float64 transcription of mergekit's generalized task arithmetic (combine_reference.per_model_reference), their
checks, their record, and the shared-value path unchanged."""
import pytest
import torch

import combine_reference as ref
from factories import layouts_adapter, lora_adapter
from loraops.algebra import combine
from loraops.errors import InvalidInputError
from loraops.ops import svd


@pytest.fixture
def inputs():
    """Three float64 adapters (so is the result); "z" only in the last, "y" in the first two (the others count as zero
    there)."""
    f64 = torch.float64
    return [(lora_adapter({"x": (24, 40), "y": (16, 16)}, rank=4, seed=1, dtype=f64), 0.7),
            (lora_adapter({"x": (24, 40), "y": (16, 16)}, rank=3, seed=2, dtype=f64), 1.3),
            (lora_adapter({"x": (24, 40), "z": (8, 16)}, rank=5, seed=3, dtype=f64), 0.5)]


CASES = [
    ("ties", {"density": [0.2, 0.5, 0.9]}, {}),
    ("ties", {"density": [0.3, 1.0, 0.6]}, {"consensus": "count", "lambda": 0.8}),
    ("magnitude_prune", {"density": [0.1, 0.4, 0.7]}, {}),
    ("dare_ties", {"density": [0.3, 0.6, 0.8]}, {"seed": 5}),
    ("dare_linear", {"density": [0.25, 0.5, 0.75]}, {"rescale": False}),
    ("dare_linear", {"density": [0.25, 0.5, 0.75]}, {"rescale_norm": "l1"}),
    ("breadcrumbs", {"density": [0.2, 0.4, 0.6], "gamma": [0.0, 0.05, 0.3]}, {}),
    ("breadcrumbs_ties", {"density": [0.5, 0.3, 0.6], "gamma": 0.1}, {"normalize": True}),
    ("breadcrumbs_ties", {"density": 0.4, "gamma": [0.02, 0.2, 0.1]}, {"rescale_norm": "l2"}),
    ("della", {"density": [0.3, 0.5, 0.7], "epsilon": [0.1, 0.2, 0.25]}, {"seed": 2}),
    ("della_linear", {"density": 0.5, "epsilon": [0.0, 0.1, 0.4]}, {"lambda": 1.5}),
]


def per_model(params, count):
    """Each input's own density/gamma/epsilon from the lists (or the one value) given."""
    return [{key: value[i] if isinstance(value, list) else value for key, value in params.items()}
            for i in range(count)]


@pytest.mark.parametrize("method, own, shared", CASES)
@pytest.mark.parametrize("block_elements", [40, 1 << 22])
def test_per_input_parameters_match_mergekit(inputs, method, own, shared, block_elements, monkeypatch):
    """Each task vector sparsified with its own density (gamma, epsilon), the mix with the shared parameters: the
    same delta as mergekit's per-model loop, whatever the row blocks (float64, exact SVD at full rank)."""
    monkeypatch.setattr(svd, "BLOCK_ELEMENTS", block_elements)
    result, report = combine(inputs, method, {**own, **shared}, rank=40, device="cpu", precise=True)
    options = {"lam" if k == "lambda" else k: v for k, v in shared.items()}
    for name, module in result.modules.items():
        want = ref.per_model_reference(method, inputs, name, per_model(own, len(inputs)), **options)
        got = module.delta(dtype=torch.float64)
        # (1e-8 apart with one shared value too: the re-factorization's roundings)
        assert float((got - want).norm()) <= 1e-7 * float(want.norm()), name
    for key, value in own.items():
        assert report.params[key] == value


@pytest.mark.parametrize("method, own", [("della", {"density": [0.3, 0.6], "epsilon": [0.1, 0.2]}),
                                         ("breadcrumbs_ties", {"density": [0.3, 0.6], "gamma": [0.05, 0.1]})])
def test_per_input_parameters_on_transposed_modules(method, own):
    """An embedding's and a Conv1D's weights hold (B·A)ᵀ: DELLA ranks their rows there with each input's epsilon."""
    inputs = [(layouts_adapter(1), 0.6), (layouts_adapter(2), 0.9)]
    result, _ = combine(inputs, method, own, rank=64, device="cpu", precise=True)
    for name, module in result.modules.items():  # float32 adapters: the result is rounded to float32
        want = ref.per_model_reference(method, inputs, name, per_model(own, 2))
        got = module.delta(dtype=torch.float64)
        assert got.shape == want.shape and float((got - want).norm()) <= 2e-6 * float(want.norm()), name


def factor_bytes(adapter) -> list[bytes]:
    return [t.contiguous().numpy().tobytes() for name in sorted(adapter.modules)
            for t in (adapter.modules[name].B, adapter.modules[name].A)]


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.4, "seed": 3}),
                                            ("breadcrumbs", {"density": 0.4, "gamma": 0.05}),
                                            ("della", {"density": 0.5, "epsilon": 0.2}),
                                            ("magnitude_prune", {"density": 0.3})])
def test_one_value_for_every_input_is_the_shared_value(inputs, method, params):
    """A list that repeats one value is that value: the same bytes and the same record as the one value."""
    shared, shared_report = combine(inputs, method, params)
    listed, listed_report = combine(inputs, method, {k: [v] * 3 if k in ("density", "gamma", "epsilon") else v
                                                     for k, v in params.items()})
    assert factor_bytes(listed) == factor_bytes(shared)
    assert listed_report.params == shared_report.params and not any(
        isinstance(v, list) for v in shared_report.params.values())


def test_a_differing_value_changes_only_its_input(inputs):
    """Different densities do not give the result of either shared one (so the per-input values are used)."""
    low, _ = combine(inputs, "ties", {"density": 0.2}, rank=40, precise=True)
    mixed, _ = combine(inputs, "ties", {"density": [0.2, 0.2, 0.9]}, rank=40, precise=True)
    assert not torch.allclose(low.modules["z"].delta(), mixed.modules["z"].delta())
    assert torch.allclose(low.modules["y"].delta(), mixed.modules["y"].delta(), atol=1e-12)  # z's input lacks y


@pytest.mark.parametrize("method, params, message", [
    ("ties", {"density": [0.2, 0.5]}, "density has 2 values for 3 adapters: give one value, or one per adapter"),
    ("breadcrumbs", {"density": [0.2, 0.9, 0.5], "gamma": [0.1, 0.2, 0.1]},
     "bad parameters for breadcrumbs (adapter 2): gamma (0.2) + density (0.9) must be at most 1"),
    ("della", {"density": [0.5, 0.1, 0.5]}, "bad parameters for della (adapter 2): density ± epsilon"),
    ("ties", {"density": [0.2, 1.5, 0.5]}, "bad parameters for ties (adapter 2): density: Input should be less than"),
    ("ties", {"density": [0.2, 0.5, 0.5], "gamma": [0.1, 0.2, 0.3]}, "ties takes no gamma"),
    ("linear", {"density": [0.2, 0.5, 0.5]}, "linear takes no density"),
])
def test_bad_per_input_parameters_are_one_line(inputs, method, params, message):
    with pytest.raises(InvalidInputError, match=None) as caught:
        combine(inputs, method, params)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_none_in_a_list_is_that_inputs_default(inputs):
    """None: the method's default for that input — breadcrumbs' 0.01 lowered where it does not fit (density 0.995,
    where a given 0.01 is refused), as one value left out; a list of None is the parameter left out."""
    result, report = combine(inputs, "breadcrumbs", {"density": [0.4, 0.995, 0.5], "gamma": [0.1, None, 0.2]},
                             rank=40, precise=True)
    assert report.params["gamma"] == [0.1, 0.01, 0.2]
    own = [{"density": 0.4, "gamma": 0.1}, {"density": 0.995, "gamma": 0.01}, {"density": 0.5, "gamma": 0.2}]
    for name, module in result.modules.items():
        want = ref.per_model_reference("breadcrumbs", inputs, name, own)
        assert float((module.delta(dtype=torch.float64) - want).norm()) <= 1e-7 * float(want.norm()), name
    left_out, _ = combine(inputs, "della", {"density": 0.5})
    nones, _ = combine(inputs, "della", {"density": 0.5, "epsilon": [None] * 3})
    assert factor_bytes(nones) == factor_bytes(left_out)
