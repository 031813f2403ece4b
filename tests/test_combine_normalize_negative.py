"""A negative weight with normalize on: refused where the method elects signs (each entry divided by the weights that
agree on it, which undoes a lone negative weight's sign), and computed as mergekit computes it where it does not
(Σ wᵢτ̂ᵢ / Σ wᵢ over all the inputs: the negative weight subtracts), |Σw| < 1e-8 left undivided — on the command line,
through the API and in a recipe, against the float64 transcription of mergekit's GTATask (combine_reference)."""
import pytest
import torch
import yaml

import combine_reference as ref
from factories import combine_inputs, lora_adapter, loraops_run as loraops
from loraops.algebra import combine
from loraops.errors import InvalidInputError
from loraops.recipe import parse_recipe

SHAPES = {"a.q": (24, 40), "a.v": (16, 40)}
UNELECTED = [("dare_linear", {"density": 0.4, "seed": 7}), ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
             ("della_linear", {"density": 0.4, "epsilon": 0.3, "seed": 2}), ("magnitude_prune", {"density": 0.5}),
             ("dare_linear", {"density": 0.4, "seed": 7, "rescale_norm": "l1"})]
ELECTED = [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.6, "normalize": True}),
           ("breadcrumbs_ties", {"density": 0.3, "normalize": True}), ("della", {"density": 0.5})]


def adapters(count=3):
    return [lora_adapter(SHAPES, rank=3 + i, alpha=4, seed=i + 1) for i in range(count)]


def close(got, want):
    assert float((got - want).norm()) <= 2e-6 * float(want.norm())


@pytest.mark.parametrize("weights", [[0.7, -0.4, 1.2], [0.5, -1.5, 0.2]])  # Σw = 1.5, −0.8
@pytest.mark.parametrize("method, params", UNELECTED)
def test_unelected_methods_divide_by_the_sum_and_subtract(method, params, weights):
    inputs = list(zip(adapters(), weights))
    got, report = combine(inputs, method, {**params, "normalize": True}, rank=40, device="cpu")
    assert report.params["normalize"] is True
    keys = {"lambda": "lam"}
    for name, module in got.modules.items():
        want = ref.reference(method, inputs, name, normalize=True, **{keys.get(k, k): v for k, v in params.items()})
        close(module.delta(dtype=torch.float64), want)
        # the negative weight subtracts: the same as the unnormalized sum over Σw
        plain = ref.reference(method, inputs, name, normalize=False, **{keys.get(k, k): v for k, v in params.items()})
        close(module.delta(dtype=torch.float64), plain / sum(weights))


def test_sum_below_1e8_is_left_undivided_as_mergekit():
    """Σw = 5e-9: mergekit leaves |Σw| < 1e-8 undivided: the plain sum."""
    inputs = list(zip(adapters(2), [1.0, -1.0 + 5e-9]))
    got, _ = combine(inputs, "dare_linear", {"density": 1, "normalize": True}, rank=40, device="cpu")
    for name, module in got.modules.items():
        close(module.delta(dtype=torch.float64), sum(w * t for w, t in ref.taus(inputs, name)))


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.1, 0.2, -0.3]])  # Σw 0, 5.6e-17
@pytest.mark.parametrize("method, params", UNELECTED[:4])
def test_unelected_methods_leave_a_sum_of_zero_undivided(method, params, weights):
    """Weights that cancel are what mergekit's |Σw| < 1e-8 guard is for: the plain sum, as recipes' task_arithmetic
    with normalize (this branch first refused them, while Σw = 5e-9 ran undivided)."""
    inputs = list(zip(adapters(len(weights)), weights))
    got, _ = combine(inputs, method, {**params, "normalize": True}, rank=40, device="cpu")
    keys = {"lambda": "lam"}
    for name, module in got.modules.items():
        close(module.delta(dtype=torch.float64),
              ref.reference(method, inputs, name, normalize=False, **{keys.get(k, k): v for k, v in params.items()}))


@pytest.mark.parametrize("small", [1e-7, 3e-8])
def test_sum_that_cancels_is_divided_by_exactly(small):
    """Σw summed in the compute dtype: float32's 1 + 1e-7 − 1 is 1.19e-7 (a result 16% small), 1 + 3e-8 − 1 is 0
    (left undivided, 3e7 times too small); the float64 reference divides by Σw itself."""
    inputs = list(zip(adapters(3), [1.0, small, -1.0]))
    got, _ = combine(inputs, "dare_linear", {"density": 1, "normalize": True}, rank=40, device="cpu")
    for name, module in got.modules.items():
        close(module.delta(dtype=torch.float64), ref.reference("dare_linear", inputs, name, density=1, normalize=True))


@pytest.mark.parametrize("method, params", ELECTED)
def test_elected_methods_still_refuse_a_negative_weight(method, params):
    inputs = list(zip(adapters(2), [1.0, -0.5]))
    with pytest.raises(InvalidInputError) as caught:
        combine(inputs, method, params, device="cpu")
    assert str(caught.value) == (f"{method} with normalize divides by the weights that agree on each entry, so a "
                                 "negative weight would not subtract: use normalize=False, or the linear method")
    combine(inputs, method, {**params, "normalize": False}, device="cpu")  # without normalize it subtracts


# ---- recipes and the command line -----------------------------------------------------------------------------------


def recipe(method, models, **parameters):
    return {"merge_method": method, "parameters": {"normalize": True, **parameters},
            "models": [{"model": m, "parameters": p} for m, p in models]}


@pytest.mark.parametrize("method, model", [("dare_linear", {}), ("breadcrumbs", {"gamma": 0.1}),
                                           ("della_linear", {"epsilon": 0.3})])
def test_recipe_unelected_negative_weight_is_mergekit_result(method, model):
    read = parse_recipe(recipe(method, [("a", {"weight": 0.7, "density": 0.5, **model}),
                                        ("b", {"weight": -0.4, "density": 0.4, **model})]))
    assert read.inputs == [("a", 0.7), ("b", -0.4)] and read.params["normalize"] is True
    inputs = [(adapter, w) for adapter, (_, w) in zip(adapters(2), read.inputs)]
    got, _ = combine(inputs, read.method, read.params, rank=40, device="cpu")
    per_model = [{"density": 0.5, **model}, {"density": 0.4, **model}]
    norm = read.params.get("rescale_norm")
    for name, module in got.modules.items():
        close(module.delta(dtype=torch.float64),
              ref.per_model_reference(method, inputs, name, per_model, normalize=True, rescale_norm=norm))


def test_recipe_sum_of_zero_runs_as_task_arithmetic():
    """dare_linear at density 1 is task_arithmetic in mergekit (one code path): both leave Σw = 0 undivided."""
    doc = recipe("dare_linear", [(m, {"weight": w}) for m, w in (("a", 1), ("b", -1))])
    read = parse_recipe(doc)
    assert read.inputs == [("a", 1.0), ("b", -1.0)] and read.params["normalize"] is True
    assert parse_recipe({**doc, "merge_method": "task_arithmetic"}).inputs == read.inputs


@pytest.mark.parametrize("method, weights, message", [
    ("breadcrumbs_ties", [1, -0.5], "breadcrumbs_ties with normalize divides by the weights that agree on each entry, "
                                    "so a negative weight would not subtract: give normalize: false, or use "
                                    "task_arithmetic"),
])
def test_recipe_refusals_in_recipe_terms(method, weights, message):
    doc = recipe(method, [(m, {"weight": w}) for m, w in zip("abc", weights)])
    with pytest.raises(InvalidInputError) as caught:
        parse_recipe(doc, "r")
    assert str(caught.value) == f"r: {message}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return combine_inputs(tmp_path_factory.mktemp("normneg"))


@pytest.mark.registry_backend
def test_cli_unelected_negative_weight_with_normalize(files, tmp_path):
    from loraops.formats import read_adapter

    run = loraops("combine", f"{files['a']}:0.7", f"{files['b']}:-0.4", f"{files['c']}:1.2", "-m", "della_linear",
                  "--density", "0.5", "--seed", "4", "--normalize", "--rank", "64", "-o", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    inputs = [(read_adapter(files[x]), w) for x, w in (("a", 0.7), ("b", -0.4), ("c", 1.2))]
    for name, module in read_adapter(tmp_path / "out").modules.items():
        close(module.delta(dtype=torch.float64),
              ref.reference("della_linear", inputs, name, density=0.5, seed=4, normalize=True))
    doc = recipe("dare_linear", [(str(files["a"]), {"weight": 0.7, "density": 0.5}),
                                 (str(files["b"]), {"weight": -0.4, "density": 0.5})], rescale=False)
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(doc))
    run = loraops("combine", "--recipe", path, "--rank", "64", "--seed", "2", "-o", tmp_path / "recipe")
    assert run.returncode == 0, run.stderr
    inputs = inputs[:2]
    for name, module in read_adapter(tmp_path / "recipe").modules.items():
        close(module.delta(dtype=torch.float64),
              ref.reference("dare_linear", inputs, name, density=0.5, seed=2, normalize=True, rescale=False))
    refused = loraops("combine", f"{files['a']}:1", f"{files['b']}:-0.5", "-m", "ties", "--density", "0.5")
    assert (refused.returncode, refused.stderr) == (
        2, "error: ties with normalize divides by the weights that agree on each entry, so a negative weight would not "
           "subtract: use --no-normalize, or the linear method\n")
