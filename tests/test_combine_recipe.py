"""`loraops combine --recipe`: mergekit YAML configurations read as combine's arguments (loraops.recipe) — the
mapping of each supported method and parameter, each refusal in one line, the result against the float64
transcription of mergekit's per-model task arithmetic, and the CLI end to end."""
import json
import os

import pytest
import torch
import yaml

import combine_reference as ref
from factories import combine_inputs, lora_adapter, loraops_run as loraops
from loraops.algebra import combine
from loraops.errors import InvalidInputError, MismatchError
from loraops.recipe import parse_recipe, read_recipe


def recipe(method, *models, **top):
    """A recipe document: models as (ref, parameters or None)."""
    doc = {"merge_method": method, "models": [{"model": m} if p is None else {"model": m, "parameters": p}
                                               for m, p in models]}
    doc.update(top)
    return doc


def test_element_wise_per_model_parameters_and_the_base_entry():
    """Per-model density; the top-level parameters are every model's default (mergekit's fallback); the base, listed
    as mergekit's examples do, is no input; ties' rescale is off by default."""
    read = parse_recipe(recipe("ties", ("base", None), ("a", {"weight": 0.7, "density": 0.3}), ("b", {"weight": 0.5}),
                               base_model="base", parameters={"density": 0.8, "normalize": False, "int8_mask": True}))
    assert (read.method, read.inputs, read.base_model, read.precise) == ("ties", [("a", 0.7), ("b", 0.5)], "base", False)
    assert read.params == {"density": [0.3, 0.8], "normalize": False}


@pytest.mark.parametrize("method, top, params", [
    ("dare_ties", {}, {"rescale_norm": "l1"}),  # mergekit's current default rescale: the l1 norm
    ("dare_linear", {"rescale": False}, {"rescale": False}),
    ("della", {"lambda": 1.2}, {"rescale_norm": "l1", "lambda": 1.2}),
    ("ties", {"rescale": True}, {"rescale_norm": "l1"}),
    ("breadcrumbs", {}, {}),
    ("breadcrumbs_ties", {"rescale": False}, {}),
])
def test_rescale_is_mergekit_current_one(method, top, params):
    read = parse_recipe(recipe(method, ("a", {"weight": 1, "density": 0.5}), ("b", {"weight": 2, "density": 0.5}),
                               parameters=top))
    assert read.params == {"density": [0.5, 0.5], **params}


def test_gamma_and_epsilon_per_model_with_mergekit_defaults():
    """A model without gamma/epsilon takes the method's default (None in the list: 0.01, 0.15)."""
    crumbs = parse_recipe(recipe("breadcrumbs", ("a", {"weight": 1, "density": 0.5, "gamma": 0.1}),
                                 ("b", {"weight": 1, "density": 0.4})))
    assert crumbs.params == {"density": [0.5, 0.4], "gamma": [0.1, None]}
    della = parse_recipe(recipe("della_linear", ("a", {"weight": 1, "epsilon": 0.05}), ("b", {"weight": 1}),
                                parameters={"density": "5e-1"}))  # YAML 1.1 reads 5e-1 as text; mergekit a number
    assert della.params == {"density": [0.5, 0.5], "epsilon": [0.05, None], "rescale_norm": "l1"}
    _, report = combine([(lora_adapter({"x": (8, 8)}, seed=s), 1) for s in (1, 2)], della.method, della.params)
    assert report.params["epsilon"] == [0.05, 0.15]



def test_a_model_kept_whole_takes_any_gamma_or_epsilon():
    """mergekit reads no gamma/epsilon for a model kept whole (density 1), so none is checked there, its range
    included (gamma: 1 on such a model ran before the recipe passed the values on, then was refused)."""
    for method, key, value in (("breadcrumbs", "gamma", 1), ("della_linear", "epsilon", 2)):
        read = parse_recipe(recipe(method, ("a", {"weight": 1, "density": 1, key: value}),
                                   ("b", {"weight": 1, "density": 0.5})))
        _, report = combine([(lora_adapter({"x": (8, 8)}, seed=s), 1) for s in (1, 2)], read.method, read.params)
        assert report.params[key] == [None, {"gamma": 0.01, "epsilon": 0.15}[key]], report.params

@pytest.mark.parametrize("doc, inputs", [
    (recipe("task_arithmetic", ("a", {"weight": 0.5}), ("b", {"weight": 1.5}), parameters={"lambda": 2}),
     [("a", 1.0), ("b", 3.0)]),
    (recipe("task_arithmetic", ("a", {"weight": 0.5}), ("b", {"weight": 1.5}),
            parameters={"lambda": 2, "normalize": True}), [("a", 0.5), ("b", 1.5)]),
    (recipe("task_arithmetic", ("a", {"weight": 1}), ("b", {"weight": -1}), parameters={"normalize": True}),
     [("a", 1.0), ("b", -1.0)]),  # mergekit leaves a sum of weights below 1e-8 undivided
    (recipe("linear", ("a", {"weight": 1}), ("b", {"weight": 3})), [("a", 0.25), ("b", 0.75)]),
    (recipe("linear", ("base", {"weight": 2}), ("a", {"weight": 1}), ("b", {"weight": 1}), base_model="base"),
     [("a", 0.25), ("b", 0.25)]),  # mergekit's linear averages the listed base in: a zero task vector
    (recipe("linear", ("a", {"weight": 0.25}), ("b", {"weight": 0.75}), parameters={"normalize": False}),
     [("a", 0.25), ("b", 0.75)]),
    (recipe("linear", ("a", {"weight": 1}), ("b", {"weight": -0.999999999})),  # (Σw ≈ 1e-9: mergekit's linear
     [("a", 1 / (1 - 0.999999999)), ("b", -0.999999999 / (1 - 0.999999999))]),  # divides, only task_arithmetic not)
])
def test_weighted_sums_fold_lambda_and_normalize_into_the_weights(doc, inputs):
    read = parse_recipe(doc)
    assert (read.method, read.params) == ("linear", {}) and [r for r, _ in read.inputs] == [r for r, _ in inputs]
    assert [w for _, w in read.inputs] == pytest.approx([w for _, w in inputs])


def test_vector_methods_and_dtype():
    nuslerp = parse_recipe(recipe("nuslerp", ("a", {"weight": 1}), ("b", {"weight": 3}), base_model="base",
                                  parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}, dtype="float64"))
    assert (nuslerp.params, nuslerp.inputs, nuslerp.precise) == ({"flatten": False, "row_wise": True},
                                                                 [("a", 1.0), ("b", 3.0)], True)
    stock = parse_recipe(recipe("model_stock", ("base", None), ("a", None), ("b", None), base_model="base",
                                parameters={"filter_wise": True}, dtype="bfloat16"))
    assert (stock.params, stock.inputs, stock.precise) == ({"filter_wise": True}, [("a", 1.0), ("b", 1.0)], False)
    sce = parse_recipe(recipe("sce", ("a", None), ("b", None), parameters={"select_topk": 0.5}))
    assert (sce.method, sce.params) == ("sce", {"select_topk": 0.5})


@pytest.mark.parametrize("top, precise, dtype", [
    ({}, False, None),
    ({"out_dtype": "float16"}, False, "fp16"),
    ({"out_dtype": "bfloat16", "dtype": "float64"}, True, "bf16"),  # computed in float64, written in bfloat16
    ({"out_dtype": "float32", "dtype": "bfloat16"}, False, "fp32"),
    # mergekit's dtype_from_name drops a torch. prefix, and reads an empty name as none
    ({"out_dtype": "torch.float16", "dtype": "torch.float64"}, True, "fp16"),
    ({"out_dtype": "torch.bfloat16", "dtype": "torch.float32"}, False, "bf16"),
    ({"out_dtype": "torch.float32", "dtype": "torch.bfloat16"}, False, "fp32"),
    ({"out_dtype": "", "dtype": "torch.float16"}, False, None),
])
def test_out_dtype_is_combines_dtype(top, precise, dtype):
    read = parse_recipe(recipe("ties", ("a", {"weight": 1, "density": 0.5}), **top))
    assert (read.precise, read.dtype) == (precise, dtype)


OUT_LIST = "float32, bfloat16, float16 (each also as torch.NAME, as mergekit reads it)"
TIES = {"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1, "density": 0.5}}]}


@pytest.mark.parametrize("doc, message", [
    ([1, 2], "r: a recipe is a mapping with merge_method and models (mergekit's format)"),
    ({**TIES, "slices": []}, "r: slices: layer slices are not supported: a recipe combines whole adapters"),
    ({**TIES, "tokenizer_source": "base"}, "r: tokenizer_source: tokenizer options have no meaning for a LoRA adapter"),
    ({**TIES, "out_dtype": "fp16"}, "r: out_dtype 'fp16' is not one of " + OUT_LIST),  # as mergekit
    ({**TIES, "out_dtype": "float64"}, "r: out_dtype 'float64' is not one of " + OUT_LIST),
    ({**TIES, "out_dtype": "torch.fp16"}, "r: out_dtype 'torch.fp16' is not one of " + OUT_LIST),
    ({**TIES, "out_dtype": "int64"}, "r: out_dtype 'int64' is not one of " + OUT_LIST),  # mergekit's: no float
    ({**TIES, "out_dtype": ["float16"]}, "r: out_dtype ['float16'] is not one of " + OUT_LIST),  # was a TypeError
    ({**TIES, "dtype": {"a": 1}}, "r: dtype {'a': 1} is not one of float32, bfloat16, float16, float64 (each"),
    # mergekit's dtype/out_dtype are Optional[str]: a falsy non-string fails its validation, it is no "none"
    ({**TIES, "out_dtype": False}, "r: out_dtype False is not one of " + OUT_LIST),
    ({**TIES, "out_dtype": []}, "r: out_dtype [] is not one of " + OUT_LIST),
    ({**TIES, "dtype": 0}, "r: dtype 0 is not one of float32, bfloat16, float16, float64 (each"),
    ({**TIES, "dtype": {}}, "r: dtype {} is not one of float32, bfloat16, float16, float64 (each"),
    ({**TIES, "name": "x"}, "r: unknown key 'name' (a recipe takes merge_method, models, parameters, base_model, "
                            "dtype, out_dtype)"),
    ({"models": TIES["models"]}, "r: merge_method is missing (give one of "),
    ({**TIES, "merge_method": 7}, "r: merge_method 7 is not a method's name (give one of "),  # (it was "missing")
    ({**TIES, "merge_method": ["ties"]}, "r: merge_method ['ties'] is not a method's name (give one of "),
    ({**TIES, "merge_method": "passthrough"}, "r: merge_method 'passthrough' is not supported for LoRA adapters (use "
                                              "one of "),
    # mergekit's whole-weight methods say why, and what interpolates task vectors instead
    ({**TIES, "merge_method": "slerp"}, "r: merge_method 'slerp': mergekit's slerp interpolates whole weights (from the "
                                        "base_model's at t = 0), which no LoRA holds: nuslerp interpolates two "
                                        "adapters' task vectors"),
    ({**TIES, "merge_method": "karcher"}, "r: merge_method 'karcher': mergekit's karcher averages whole weights, which "
                                          "no LoRA holds: multislerp averages"),
    ({**TIES, "merge_method": "magnitude_prune"}, "r: merge_method 'magnitude_prune' is not supported"),
    ({**TIES, "dtype": "int8"}, "r: dtype 'int8' is not one of float32, bfloat16, float16, float64"),
    ({**TIES, "base_model": 3}, "r: base_model must be a name or path (the adapters' base)"),
    ({**TIES, "models": "a"}, "r: models must be a list of {model: REF, parameters: {...}}"),
    ({**TIES, "models": [{"model": "a", "layer_range": [0, 4]}]},
     "r: models[1]: 'layer_range' is not supported (a model takes model and parameters)"),
    ({**TIES, "models": [{"parameters": {}}]}, "r: models[1]: give model: REF"),
    ({**TIES, "models": [{"model": "a", "parameters": {"weight": 1, "density": [0.1, 0.9]}}]},
     "r: models[1].parameters.density: a gradient (a list of values across the layers) is not supported: give one "
     "value"),
    # mergekit's conditional values are a list of filter/value mappings: not a gradient
    ({**TIES, "parameters": {"density": [{"filter": "mlp", "value": 0.5}, {"value": 0.2}]}},
     "r: parameters.density: conditional values (filter/value) are not supported: give one value"),
    ({**TIES, "models": [{"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, 0.2]}}]},
     "r: models[1].parameters.weight: conditional values (filter/value) are not supported: give one value"),
    ({**TIES, "parameters": {"density": {"filter": "mlp", "value": 0.5}}},
     "r: parameters.density: conditional values (filter/value) are not supported: give one value"),
    ({**TIES, "models": [{"model": "a", "parameters": {"weight": 1, "gamma": 0.1}}]},
     "r: models[1].parameters: ties takes no per-model 'gamma' (it takes weight, density)"),
    # mergekit 2024's DELLA read lambda per model (the first model's); now it is one top-level parameter
    ({"merge_method": "della", "models": [{"model": "a", "parameters": {"weight": 1, "density": 0.5, "lambda": 1.1}}]},
     "r: models[1].parameters: della takes no per-model 'lambda' (it takes weight, density, epsilon): lambda is one "
     "value for the whole merge: move it under the top-level parameters"),
    ({**TIES, "models": [{"model": "a", "parameters": {"weight": 1, "normalize": False}}]},
     "r: models[1].parameters: ties takes no per-model 'normalize' (it takes weight, density): normalize is one value "
     "for the whole merge: move it under the top-level parameters"),
    ({**TIES, "parameters": {"select_topk": 0.5}},
     "r: parameters: ties takes no 'select_topk' (it takes weight, density, normalize, rescale, lambda, int8_mask)"),
    ({**TIES, "parameters": {"normalize": "yes"}}, "r: parameters.normalize must be true or false (got 'yes')"),
    ({**TIES, "parameters": {"lambda": True}}, "r: parameters.lambda must be a number (got True)"),
    ({**TIES, "models": [{"model": "a", "parameters": {"density": 0.5}}]},
     "r: models[1] (a) has no weight: mergekit's ties requires one (per model or under parameters)"),
    ({**TIES, "base_model": "b", "models": [{"model": "b"}, {"model": "a", "parameters": {"weight": 1}},
                                             {"model": "c", "parameters": {"density": 0.5}}]},
     "r: models[3] (c) has no weight: mergekit's ties requires one (per model or under parameters)"),
    # combine's checks of the parameters name the entry (the base listed first counts), with the recipe's path
    ({"merge_method": "della", "base_model": "b",
      "models": [{"model": "b"}, {"model": "a", "parameters": {"weight": 1, "density": 0.5}},
                 {"model": "c", "parameters": {"weight": 1, "density": 0.5, "epsilon": 0.6}}]},
     "r: bad parameters for della (models[3]): density ± epsilon (-0.1 to 1.1) must lie inside (0, 1)"),
    ({**TIES, "base_model": "a"}, "r: models lists no adapter besides the base_model"),
    ({"merge_method": "nuslerp", "models": [{"model": "a", "parameters": {"weight": 1}}]},
     "r: nuslerp needs a base_model (mergekit's nuslerp without one works on whole weights"),
    ({"merge_method": "multislerp", "models": [{"model": "a", "parameters": {"weight": 1}}]},
     "r: multislerp needs a base_model (mergekit's multislerp without one works on whole weights"),
    ({"merge_method": "multislerp", "base_model": "b", "models": [{"model": "a"}]},
     "r: models[1] (a) has no weight: mergekit's multislerp requires one"),
    ({"merge_method": "multislerp", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}}],
      "parameters": {"normalize_weights": 1}}, "r: parameters.normalize_weights must be true or false (got 1)"),
    ({"merge_method": "multislerp", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}},
                                                                   {"model": "c", "parameters": {"weight": -1}}]},
     "r: multislerp with normalize_weights divides the weights by their sum, which is 0: give other weights, or "
     "normalize_weights: false"),
    ({"merge_method": "multislerp", "base_model": "b",
      "models": [{"model": m, "parameters": {"weight": w}} for m, w in (("a", 0.1), ("c", 0.2), ("d", -0.3))]},
     "r: multislerp with normalize_weights divides the weights by their sum, which is 0 to rounding (5.6e-17): give "
     "other weights, or normalize_weights: false"),
    # combine's own refusal says --no-normalize, which is refused beside --recipe: the recipe's terms instead
    ({**TIES, "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "c", "parameters": {"weight": -0.5}}]},
     "r: ties with normalize divides by the weights that agree on each entry, so a negative weight would not "
     "subtract: give normalize: false, or use task_arithmetic"),
    ({"merge_method": "della", "parameters": {"normalize": True, "density": 0.5},
      "models": [{"model": "a", "parameters": {"weight": -1}}, {"model": "c", "parameters": {"weight": 1}}]},
     "r: della with normalize divides by the weights that agree on each entry"),
    ({"merge_method": "model_stock", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}}]},
     "r: models[1].parameters: model_stock takes no per-model 'weight'"),
    ({"merge_method": "linear", "parameters": {"normalize": False},
      "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": 1}}]},
     "r: linear without normalize sums whole models (Σw·base + Σwτ), a task vector over the base only when the "
     "weights sum to 1 (they sum to 2)"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
                                           {"model": "b", "parameters": {"weight": -1}}]},
     "r: linear with normalize divides by the sum of the weights, which is 0"),
    ({"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}}
                                           for m, w in (("a", 0.1), ("c", 0.2), ("d", -0.3))]},
     "r: linear with normalize divides by the sum of the weights, which is 0 to rounding (5.6e-17)"),
    ({"merge_method": "linear", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}},
                                                             {"model": "b"}]},
     "r: models[2] (the base_model) has no weight: mergekit's linear averages it in and requires one"),
])
def test_refusals_are_one_line_naming_the_key(doc, message):
    with pytest.raises(InvalidInputError) as caught:
        parse_recipe(doc, "r")
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value), str(caught.value)


@pytest.mark.parametrize("text, message", [
    ("merge_method: ties\nmodels: [a\n", "not valid YAML at line 3, column 1: expected ',' or ']'"),
    ("merge_method: ties\n  models: x\n", "not valid YAML at line 2, column 9: mapping values are not allowed here"),
    ("\tmerge_method: ties\n", "not valid YAML at line 1, column 1: found character '\\t' that cannot start any "
                               "token"),
    ("", "a recipe is a mapping with merge_method and models"),
])
def test_bad_yaml_is_one_line(tmp_path, text, message):
    path = tmp_path / "r.yml"
    path.write_text(text)
    with pytest.raises(InvalidInputError) as caught:
        read_recipe(path)
    assert str(caught.value).startswith(f"{path}: {message}") and "\n" not in str(caught.value), str(caught.value)


def test_a_missing_or_binary_recipe_is_one_line(tmp_path):
    with pytest.raises(InvalidInputError, match=r"cannot read the recipe \(No such file or directory\)$"):
        read_recipe(tmp_path / "none.yml")
    (tmp_path / "bin.yml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InvalidInputError, match="cannot read the recipe"):
        read_recipe(tmp_path / "bin.yml")


def adapters():
    f64 = torch.float64
    return {"a": lora_adapter({"x": (24, 40), "y": (16, 16)}, rank=4, seed=1, dtype=f64),
            "b": lora_adapter({"x": (24, 40), "y": (16, 16)}, rank=3, seed=2, dtype=f64),
            "c": lora_adapter({"x": (24, 40)}, rank=5, seed=3, dtype=f64)}


@pytest.mark.parametrize("method, models, top, own, options", [
    ("dare_ties", {"a": {"weight": 0.7, "density": 0.3}, "b": {"weight": 1.1, "density": 0.6},
                   "c": {"weight": 0.4, "density": 0.9}}, {}, [{"density": d} for d in (0.3, 0.6, 0.9)],
     {"rescale_norm": "l1"}),
    ("breadcrumbs_ties", {"a": {"weight": 1.0, "gamma": 0.05}, "b": {"weight": 0.5, "gamma": 0.2},
                          "c": {"weight": 0.8}}, {"density": 0.5, "rescale": True},
     [{"density": 0.5, "gamma": g} for g in (0.05, 0.2, 0.01)], {"rescale_norm": "l1"}),
    ("della", {"a": {"weight": 1.0, "density": 0.4, "epsilon": 0.1}, "b": {"weight": 0.6, "density": 0.7},
               "c": {"weight": 0.3, "density": 0.5, "epsilon": 0.3}}, {"rescale": False, "lambda": 0.9},
     [{"density": 0.4, "epsilon": 0.1}, {"density": 0.7, "epsilon": 0.15}, {"density": 0.5, "epsilon": 0.3}],
     {"rescale": False, "lam": 0.9}),
])
def test_a_recipe_computes_mergekit_per_model_task_arithmetic(method, models, top, own, options):
    """The recipe's arguments give what mergekit's GTATask computes with those per-model parameters (float64)."""
    made = adapters()
    read = parse_recipe(recipe(method, *models.items(), parameters=top))
    inputs = [(made[r], w) for r, w in read.inputs]
    result, _ = combine(inputs, read.method, read.params, rank=40, precise=True)
    for name, module in result.modules.items():
        want = ref.per_model_reference(method, inputs, name, own, **options)
        assert float((module.delta(dtype=torch.float64) - want).norm()) <= 1e-7 * float(want.norm()), name


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return combine_inputs(tmp_path_factory.mktemp("recipe-cli"))


def write(path, doc):
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.registry_backend
def test_cli_end_to_end(files, tmp_path):
    """A recipe with the base listed and per-model densities: combined, written and registered with the per-input
    values in its lineage; the output is mergekit's per-model result."""
    from loraops.formats import read_adapter
    from loraops.registry import Registry

    doc = recipe("ties", (str(files["base"]), None), (str(files["a"]), {"weight": 0.7, "density": 0.3}),
                 (str(files["b"]), {"weight": 0.5, "density": 0.8}), base_model=str(files["base"]),
                 parameters={"normalize": True, "int8_mask": True}, dtype="float64")
    run = loraops("combine", "--recipe", write(tmp_path / "r.yml", doc), "--rank", "64", "--name", "ab-recipe",
                  "-o", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "ties(density=[0.3, 0.8], normalize=True, lambda=1.0) of a@1×0.7, b@1×0.5", lines
    assert lines[1].endswith("float64 on cpu, " + lines[1].rsplit(", ", 1)[1])
    assert lines[-1].startswith("registered ab-recipe@1") and lines[-1].endswith(f"wrote {tmp_path / 'out'}")
    with Registry.open() as reg:
        record = reg.get_adapter("ab-recipe")
    assert record.lineage.params["params"] == {"density": [0.3, 0.8], "normalize": True, "lambda": 1.0}
    inputs = [(read_adapter(files["a"]), 0.7), (read_adapter(files["b"]), 0.5)]
    out = read_adapter(tmp_path / "out")
    for name, module in out.modules.items():
        want = ref.per_model_reference("ties", inputs, name, [{"density": 0.3}, {"density": 0.8}])
        assert float((module.delta(dtype=torch.float64) - want).norm()) <= 2e-6 * float(want.norm()), name
    shown = json.loads(loraops("show", "ab-recipe", "--json").stdout)
    assert shown["lineage"]["params"]["params"]["density"] == [0.3, 0.8]


@pytest.mark.registry_backend
def test_cli_multislerp_recipe(files, tmp_path):
    """mergekit's multislerp with its parameters: the result is mergekit's code's (float64 reference) on the three
    task vectors, a module an adapter lacks being its zero one."""
    from loraops.formats import read_adapter

    doc = recipe("multislerp", (str(files["base"]), None), (str(files["a"]), {"weight": 0.7}),
                 (str(files["b"]), {"weight": -0.2}), (str(files["c"]), None), base_model=str(files["base"]),
                 parameters={"weight": 1.5, "normalize_weights": False, "eps": 0.01}, dtype="float64")
    run = loraops("combine", "--recipe", write(tmp_path / "r.yml", doc), "--name", "abc-ms", "-o", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == ("multislerp(normalize_weights=False, eps=0.01) of a@1×0.7, b@1×-0.2, "
                                          "c@1×1.5"), run.stdout
    inputs = [(read_adapter(files[x]), w) for x, w in (("a", 0.7), ("b", -0.2), ("c", 1.5))]
    out = read_adapter(tmp_path / "out")
    assert set(out.modules) == {m for a, _ in inputs for m in a.modules}
    for name, module in out.modules.items():
        want = ref.reference("multislerp", inputs, name, normalize_weights=False, eps=0.01)
        assert float((module.delta(dtype=torch.float64) - want).norm()) <= 2e-6 * float(want.norm()), name


@pytest.mark.parametrize("extra, message", [
    (["--eps", "0.1"], "error: --eps given with --recipe"),
    (["--density", "0.5"], "error: --density given with --recipe: the recipe gives the adapters, the method and its "
                           "parameters (edit the recipe instead)"),
    (["-m", "dare_ties"], "error: --method given with --recipe"),
    (["--no-normalize"], "error: --normalize/--no-normalize given with --recipe"),
    (["{a}:0.5"], "error: the adapters (REF[:WEIGHT]) given with --recipe"),
])
def test_cli_options_the_recipe_gives_are_refused(files, tmp_path, extra, message):
    doc = recipe("ties", (str(files["a"]), {"weight": 1, "density": 0.5}))
    argv = ["combine", "--recipe", write(tmp_path / "r.yml", doc), *(a.format(a=files["a"]) for a in extra)]
    run = loraops(*argv)
    assert run.returncode == 2 and run.stderr.startswith(message) and len(run.stderr.splitlines()) == 1, run.stderr


@pytest.mark.registry_backend
def test_cli_out_dtype_writes_that_dtype(files, tmp_path):
    """out_dtype: float16 is --dtype fp16 (the same file and lineage); --dtype beside it may repeat it, not differ."""
    from loraops.formats import read_adapter
    from loraops.registry import Registry

    doc = recipe("ties", (str(files["a"]), {"weight": 0.7, "density": 0.5}), (str(files["b"]), {"weight": 0.5}),
                 out_dtype="float16")
    path = write(tmp_path / "r.yml", doc)
    run = loraops("combine", "--recipe", path, "--name", "half", "-o", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    assert {m.A.dtype for m in read_adapter(tmp_path / "out").modules.values()} == {torch.float16}
    with Registry.open() as reg:
        record = reg.get_adapter("half")
    assert record.dtype == "float16" and record.lineage.params["dtype"] == "float16"
    del doc["out_dtype"]
    run = loraops("combine", "--recipe", write(tmp_path / "plain.yml", doc), "--dtype", "fp16")
    assert "already registered as half@1" in run.stdout, run.stdout + run.stderr
    run = loraops("combine", "--recipe", path, "--dtype", "fp16", "-o", tmp_path / "again")
    assert run.returncode == 0 and "already registered as half@1" in run.stdout, run.stdout + run.stderr
    run = loraops("combine", "--recipe", path, "--dtype", "fp32")
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1 and run.stderr.startswith(
        "error: --dtype fp32 given with --recipe, whose out_dtype writes fp16: give one (edit the recipe or drop "
        "--dtype)"), run.stderr


def test_cli_options_beside_the_recipe_apply(files, tmp_path):
    """--seed and --consensus (which no recipe gives) apply with it."""
    doc = recipe("dare_ties", (str(files["a"]), {"weight": 1, "density": 0.5}), (str(files["c"]), {"weight": 1}))
    run = loraops("combine", "--recipe", write(tmp_path / "r.yml", doc), "--seed", "3", "--consensus", "count")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == ("dare_ties(density=[0.5, 1.0], rescale_norm=l1, seed=3, normalize=False, "
                                          "lambda=1.0, consensus=count) of a@1×1, c@1×1")


@pytest.mark.parametrize("doc, message", [
    (lambda f: recipe("ties", (str(f["a"]), {"weight": 1, "density": 0.5}), base_model="other/model"),
     "error: base_model 'other/model': a@1 is for {base}, and a recipe combines task vectors over the adapters' own "
     "base"),
    (lambda f: recipe("ties", (str(f["a"]), {"weight": 1, "density": 0.5}), base_model=f"{f['base']}+{f['c']}"),
     "error: base_model '{base}+{c}' is {base} with the LoRA {c} merged into it (mergekit's MODEL+LORA), which no "
     "adapter's ΔW is taken over: give the adapters' base alone (base_model: {base})"),
    (lambda f: recipe("ties", (str(f["a"]), {"weight": 1, "density": [0.5, 0.2]})),
     "error: {path}: models[1].parameters.density: a gradient"),
    # mergekit's MODEL+LORA names the adapter LORA only over the base_model: without one (mergekit's linear of
    # BASE+LORA entries), or over another model, it names nothing, and the error says why
    (lambda f: recipe("linear", (f"{f['base']}+{f['a']}", {"weight": 1}), (f"{f['base']}+{f['b']}", {"weight": 3})),
     "error: {path}: '{base}+{a}' is mergekit's MODEL+LORA, read as the adapter '{a}' only where MODEL is the "
     "base_model, and the recipe gives none: give base_model: {base} (with linear, also a top-level weight: 0, which "
     "leaves the base out of the average)"),
    (lambda f: recipe("ties", (f"other+{f['a']}", {"weight": 1}), (str(f["b"]), {"weight": 1}),
                      base_model=str(f["base"])),
     "error: {path}: 'other+{a}' is mergekit's MODEL+LORA, read as the adapter '{a}' only where MODEL is the "
     "base_model ({base}): over another model its task vector is no adapter's ΔW; write {a} or {base}+{a}"),
    (lambda f: recipe("breadcrumbs", (str(f["a"]), {"weight": 1, "density": 0.5, "gamma": 0.6}),
                      (str(f["b"]), {"weight": 1, "density": 0.5})),
     "error: {path}: bad parameters for breadcrumbs (models[1]): gamma (0.6) + density (0.5) must be at most 1"),
    # the entry as the recipe numbers it: the base listed first is models[1]
    (lambda f: recipe("della", (str(f["base"]), None), (str(f["a"]), {"weight": 1, "density": 0.1}),
                      (str(f["b"]), {"weight": 1, "density": 0.5}), base_model=str(f["base"])),
     "error: {path}: bad parameters for della (models[2]): density ± epsilon (-0.05 to 0.25) must lie inside (0, 1)"),
])
@pytest.mark.registry_backend
def test_cli_bad_recipes_are_one_line_and_register_nothing(files, tmp_path, doc, message):
    from loraops.registry import Registry

    path = write(tmp_path / "r.yml", doc(files))
    run = loraops("combine", "--recipe", path)
    want = message.format(base=files["base"], a=files["a"], c=files["c"], path=path)
    # 2, as every refusal of a recipe's content (a MODEL+LORA entry naming nothing too: the recipe is to change)
    assert run.returncode == 2 and run.stderr.startswith(want) and len(run.stderr.splitlines()) == 1, run.stderr
    with Registry.open() as reg:
        assert [a.name for a in reg.list_adapters()] == []


@pytest.mark.registry_backend
def test_base_model_is_the_inputs_registered_base_or_their_hint(files, tmp_path):
    """A registered base matches by its name or where it was added from (through the CLI, on real records: the
    adapter's record carries only a reference to its base, which had no source — a traceback); an unregistered one
    by the adapter's base_model_name_or_path (a trailing / aside); an input that names no base is taken as it is."""
    from types import SimpleNamespace as NS

    from loraops.derive import check_base_model
    from loraops.errors import MismatchError
    from loraops.registry import Registry

    assert loraops("base", "add", files["base"], "--name", "tiny").returncode == 0
    assert loraops("register", files["a"], "--base", "tiny").returncode == 0
    for i, name in enumerate(("tiny", str(files["base"]), str(files["base"]) + "/", os.path.relpath(files["base"]),
                              "./" + os.path.relpath(files["base"]) + "/", f"{files['base']}@main")):
        doc = recipe("ties", (str(files["a"]), {"weight": 1, "density": 0.5}), base_model=name)
        run = loraops("combine", "--recipe", write(tmp_path / f"r{i}.yml", doc), "--name", f"ok{i}")
        assert run.returncode == 0, run.stderr
    doc = recipe("ties", (str(files["a"]), {"weight": 1, "density": 0.5}), base_model="org/other")
    run = loraops("combine", "--recipe", write(tmp_path / "other.yml", doc), "--name", "other")
    assert run.returncode != 0 and len(run.stderr.splitlines()) == 1, run.stderr
    assert run.stderr.startswith("error: base_model 'org/other': a@1 is for tiny, and a recipe combines"), run.stderr
    with Registry.open() as reg:
        assert sorted(a.name for a in reg.list_adapters()) == ["a", "ok0"]  # (ok1, ok2: the same bytes as ok0)

    hinted = NS(record=NS(ref="b@1", base=None), adapter=NS(base_model="org/tiny/"))
    check_base_model(None, [hinted], "org/tiny@v2")  # a revision where loraops knows no commit: the name decides
    unknown = NS(record=NS(ref="c@1", base=None), adapter=NS(base_model=None))
    check_base_model(None, [hinted, unknown], "org/tiny")
    with pytest.raises(MismatchError, match=r"^base_model 'tiny': b@1 is for org/tiny/, and a recipe combines"):
        check_base_model(None, [hinted], "tiny")
    for doc in ("org/tiny+style", "org/tiny@a@b"):  # what no base is, refused though no input names its base
        with pytest.raises(InvalidInputError, match=r"^base_model 'org/tiny(\+style' is org/tiny with the LoRA|@a@b': "
                                                    r"more than one)"):
            check_base_model(None, [unknown], doc)


@pytest.mark.parametrize("method, models, top, own", [
    # a model kept whole (density 1, mergekit's default) ignores its gamma/epsilon, as mergekit's sparsify returns
    # the task vector before reading them
    ("breadcrumbs", {"a": {"weight": 1.0, "density": 0.5, "gamma": 0.1}, "b": {"weight": 0.5, "gamma": 0.05}}, {},
     [{"density": 0.5, "gamma": 0.1}, {"density": 1.0}]),
    ("breadcrumbs_ties", {"a": {"weight": 1.0, "density": 0.5}, "b": {"weight": 0.5}}, {"gamma": 0.2},
     [{"density": 0.5, "gamma": 0.2}, {"density": 1.0}]),
    ("della", {"a": {"weight": 1.0, "epsilon": 0.1}, "b": {"weight": 0.6, "density": 0.5}}, {},
     [{"density": 1.0}, {"density": 0.5, "epsilon": 0.15}]),
    # a model without gamma takes mergekit's default 0.01, lowered where it does not fit (density 0.995)
    ("breadcrumbs", {"a": {"weight": 1.0, "density": 0.5, "gamma": 0.1}, "b": {"weight": 0.5, "density": 0.995}},
     {}, [{"density": 0.5, "gamma": 0.1}, {"density": 0.995, "gamma": 0.01}]),
])
def test_parameters_a_model_does_not_use_are_not_checked(method, models, top, own):
    """mergekit runs these recipes; they give its per-model result."""
    made = adapters()
    read = parse_recipe(recipe(method, *models.items(), parameters=top))
    inputs = [(made[r], w) for r, w in read.inputs]
    result, _ = combine(inputs, read.method, read.params, rank=40, precise=True)
    for name, module in result.modules.items():
        want = ref.per_model_reference(method, inputs, name, own, rescale_norm=read.params.get("rescale_norm"))
        assert float((module.delta(dtype=torch.float64) - want).norm()) <= 1e-7 * float(want.norm()), name


@pytest.mark.parametrize("models, message", [
    ([{"model": "a", "parameters": {"weight": 1, "density": 0.5}}, {"model": "b", "parameters": {"weight": 1}},
      {"model": "a", "parameters": {"weight": 2, "density": 0.2}}],
     "r: models[3]: 'a' is listed twice (mergekit merges a model once, with its first entry's parameters): list it "
     "once"),
    ([{"model": "a", "parameters": {"weight": float("inf")}}], "r: models[1].parameters.weight must be a finite "
                                                               "number (got inf)"),
    ([{"model": "a", "parameters": {"weight": "1e400"}}], "r: models[1].parameters.weight must be a finite number"),
    ([{"model": "a", "parameters": {"weight": 10**400}}], "r: models[1].parameters.weight must be a finite number"),
    ([{"model": "a", "parameters": {"weight": 1, "density": -10**400}}],
     "r: models[1].parameters.density must be a finite number"),
    ([{"model": "a", "parameters": {"weight": 1, "density": float("nan")}}],
     "r: models[1].parameters.density must be a finite number (got nan)"),
])
def test_models_listed_twice_and_non_finite_numbers_are_refused(models, message):
    with pytest.raises(InvalidInputError) as caught:
        parse_recipe({"merge_method": "ties", "models": models}, "r")
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value), str(caught.value)


def test_linear_averages_an_unlisted_base_model_in_with_the_top_level_weight():
    """mergekit's planner adds a base_model missing from models as a source without parameters: linear weighs it by
    the top-level weight (a zero task vector that counts in Σw), and fails without one."""
    read = parse_recipe(recipe("linear", ("a", None), ("b", {"weight": 2}), base_model="base",
                               parameters={"weight": 1}))
    assert read.inputs == [("a", pytest.approx(0.25)), ("b", pytest.approx(0.5))]
    with pytest.raises(InvalidInputError, match=r"^r: base_model \(not in models\) has no weight: mergekit's linear "
                                                r"averages it in"):
        parse_recipe(recipe("linear", ("a", {"weight": 1}), ("b", {"weight": 1}), base_model="base"), "r")


def test_nuslerp_row_wise_without_flatten_off_is_ignored_as_mergekit_ignores_it():
    """mergekit's nuslerp flattens before it looks at nuslerp_row_wise (flatten is on by default): such a recipe
    runs as the flattened nuslerp, not a refusal."""
    read = parse_recipe(recipe("nuslerp", ("a", {"weight": 1}), ("b", {"weight": 2}), base_model="base",
                               parameters={"nuslerp_row_wise": True}))
    assert read.params == {}
    made = adapters()
    combine([(made[r], w) for r, w in read.inputs], read.method, read.params)
    both = parse_recipe(recipe("nuslerp", ("a", {"weight": 1}), ("b", {"weight": 2}), base_model="base",
                               parameters={"nuslerp_row_wise": True, "nuslerp_flatten": False}))
    assert both.params == {"flatten": False, "row_wise": True}


def test_density_one_with_epsilon_runs_alike_on_the_command_line_and_in_a_recipe(files, tmp_path):
    """mergekit's della returns a task vector kept whole (density 1) before it reads epsilon: --density 1 --epsilon
    0.3 runs (it was refused) as the recipe with those values does — the same record and the same adapter — and the
    report says no epsilon applied; beside a model that is sparsified, the kept-whole one shows none (it showed the
    default 0.15 for both)."""
    cli = loraops_ok("combine", files["a"], files["b"], "-m", "della", "--density", "1", "--epsilon", "0.3",
                        "--rescale-norm", "l1", "--name", "whole")
    shown = "della(density=1.0, rescale_norm=l1, epsilon=None, seed=0, normalize=True, lambda=1.0) of a@1×1, b@1×1"
    assert cli.splitlines()[0] == shown, cli
    doc = recipe("della", (str(files["a"]), {"weight": 1, "density": 1, "epsilon": 0.3}),
                 (str(files["b"]), {"weight": 1}), parameters={"epsilon": 0.3})
    read = loraops_ok("combine", "--recipe", write(tmp_path / "whole.yml", doc)).splitlines()
    assert read[0] == shown and read[-1].startswith("already registered as whole@1"), read
    doc = recipe("della", (str(files["a"]), {"weight": 1, "density": 1, "epsilon": 0.3}),
                 (str(files["b"]), {"weight": 1, "density": 0.5}))
    mixed = loraops_ok("combine", "--recipe", write(tmp_path / "mixed.yml", doc), "--json")
    assert json.loads(mixed)["report"]["params"]["epsilon"] == [None, 0.15]


def loraops_ok(*args) -> str:
    """stdout of a loraops command that must succeed."""
    run = loraops(*args)
    assert run.returncode == 0, run.stderr
    return run.stdout


SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("base_model, message", [
    ("org/llama", None),
    ("org/llama/", None),
    ("llama", None),
    (f"org/llama@{SHA}", None),
    ("org/llama@0123456", None),  # a short commit, as git abbreviates it
    ("org/llama@012", "base_model 'org/llama@012': h@1 is for llama, pulled at commit 0123456789ab, and revision "
                      "'012' is not that commit"),  # shorter than git's shortest abbreviation (4)
    ("org/llama@main", "base_model 'org/llama@main': h@1 is for llama, pulled at commit 0123456789ab, and revision "
                       "'main' is not that commit (loraops does not look a branch or tag up: give the commit, or no "
                       "revision)"),
    ("org/llama@fedc", "base_model 'org/llama@fedc': h@1 is for llama, pulled at commit 0123456789ab, and revision"),
    ("llama@main", "base_model 'llama@main': h@1 is for llama, pulled at commit 0123456789ab, and revision 'main' is "
                   "not that commit"),  # the registry name at a branch: the commit is known all the same
    ("org/other@0123456", "base_model 'org/other@0123456': h@1 is for llama, and a recipe combines task vectors"),
    ("org/llama+style", "base_model 'org/llama+style' is org/llama with the LoRA style merged into it (mergekit's "
                        "MODEL+LORA), which no adapter's ΔW is taken over: give the adapters' base alone (base_model: "
                        "org/llama)"),
    ("org/llama@a@b", "base_model 'org/llama@a@b': more than one '@' in 'org/llama@a@b' (mergekit reads "
                      "PATH@REVISION)"),
    ("a+b+c", "base_model 'a+b+c' has more than one '+' (mergekit reads MODEL+LORA)"),
    ("org/llama@", "base_model 'org/llama@': an empty revision in 'org/llama@'"),
])
def test_base_model_is_read_as_mergekit_reads_a_model_reference(base_model, message):
    """base_model is mergekit's PATH[@REVISION][+LORA]: the Hub id of a base pulled from the Hub (source
    hf://org/llama@<commit>) names it, at its commit (or a prefix of it) or without a revision; a branch, another
    commit, or a LoRA merged into the base (no adapter's ΔW is over that) is refused in one line, in the recipe
    (it was compared as a plain string). A name or folder that holds '+' or '@' names its base as a whole."""
    from types import SimpleNamespace as NS

    from loraops.derive import check_base_model
    from loraops.errors import LoraopsError

    base = NS(name="llama", source=f"hf://org/llama@{SHA}", path=None)
    pulled = NS(record=NS(ref="h@1", base=NS(id=7)), adapter=NS(base_model=None))
    registry = NS(get_base=lambda i: {7: base}[i])
    if message is None:
        check_base_model(registry, [pulled], base_model)
        return
    merged = NS(record=NS(ref="m@1", base=NS(id=8)), adapter=NS(base_model=None))
    whole = {8: NS(name=base_model, source="/models/x", path="/models/x")}
    check_base_model(NS(get_base=lambda i: whole[i]), [merged], base_model)  # e.g. a merged base named llama+style
    with pytest.raises(LoraopsError) as caught:
        check_base_model(registry, [pulled], base_model)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value), str(caught.value)


def test_a_model_written_base_plus_lora_is_that_lora(files, tmp_path):
    """mergekit lists a LoRA as MODEL+LORA (the base with the LoRA merged in: over the base, its task vector is the
    LoRA's ΔW): where MODEL is the base_model as written (./x and x/ alike), the entry is the adapter LORA (it was
    read as an adapter named 'MODEL+LORA': not found); anything else stays combine's REF, as a registry name such as
    combine's default a+b-ties may hold '+'."""
    read = parse_recipe(recipe("ties", ("org/base", None), ("org/base+style@2", {"weight": 1}),
                               ("./org/base/+sub/x", {"weight": 0.5}), ("a+b-ties", {"weight": 2}),
                               ("other+c", {"weight": 3}), ("org/base+x+y", {"weight": 4}), base_model="org/base"))
    assert read.inputs == [("style@2", 1.0), ("sub/x", 0.5), ("a+b-ties", 2.0), ("other+c", 3.0),
                           ("org/base+x+y", 4.0)]  # (what mergekit cannot read stays as written: not found later)
    with pytest.raises(InvalidInputError, match=r"^r: models\[2\]: 'org/base\+a' is listed twice"):
        parse_recipe(recipe("ties", ("a", {"weight": 1}), ("org/base+a", {"weight": 1}), base_model="org/base"), "r")
    (tmp_path / "llama").symlink_to(files["base"])
    (tmp_path / "llama+style").symlink_to(files["a"])  # an adapter folder whose name is BASE+LORA: matched whole
    whole = str(tmp_path / "llama+style")
    assert parse_recipe(recipe("ties", (whole, {"weight": 1}), base_model=str(tmp_path / "llama"))).inputs == [
        (whole, 1.0)]
    base = str(files["base"])
    doc = recipe("ties", (base, None), (f"{base}+{files['a']}", {"weight": 1, "density": 0.5}),
                 (f"{base}/+{files['b']}", {"weight": 0.5}), base_model=base)
    lines = loraops_ok("combine", "--recipe", write(tmp_path / "plus.yml", doc), "--name", "plus").splitlines()
    assert lines[0] == "ties(density=[0.5, 1.0], normalize=True, lambda=1.0) of a@1×1, b@1×0.5", lines


def test_a_base_model_that_exists_on_disk_is_the_model_it_holds(files, tmp_path, monkeypatch):
    """mergekit reads an existing folder as the model it holds (whatever the revision): a folder ./llama shadows the
    registered base named llama — accepted only where it holds that base's tensors (a copy, or the base moved since it
    was added; it was accepted by name whatever it held, and refused once moved); a registry name that no folder
    shadows still names its base."""
    from types import SimpleNamespace as NS

    from loraops.basemodel import BaseModel
    from loraops.derive import check_base_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama").symlink_to(files["base"])
    fingerprint = BaseModel.open(files["base"]).fingerprint()
    pulled = NS(record=NS(ref="h@1", base=NS(id=7)), adapter=NS(base_model=None))
    other = NS(name="llama", source=f"hf://org/llama@{SHA}", path="/gone/llama", fingerprint="0" * 64)
    for base_model in ("llama", "./llama/", "llama@main"):
        with pytest.raises(MismatchError, match=r"^base_model '.*': .*llama/? exists and is read as the model it holds "
                                                r"\(as mergekit reads it\), which is not h@1's base llama \(/gone/llama\)$"):
            check_base_model(NS(get_base=lambda i: other), [pulled], base_model)
    moved = NS(name="tiny", source="/gone/tiny", path="/gone/tiny", fingerprint=fingerprint)
    for base_model in ("llama", str(tmp_path / "llama") + "@main", "tiny"):
        check_base_model(NS(get_base=lambda i: moved), [pulled], base_model)
    check_base_model(NS(get_base=lambda i: other), [pulled], "org/llama")  # no such folder: the Hub id
