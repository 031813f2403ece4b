"""The library as a Python user calls it (README "Python API"): plausible arguments get loraops' own errors, and an
explicit argument does what the CLI's option (an environment variable) does."""
from __future__ import annotations

import inspect
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import peft_adapter, tiny_llama
from safetensors.torch import load_file, save_file

from loraops import algebra, derive, merging
from loraops.basemodel import BaseModel
from loraops.check import bind, check
from loraops.errors import InvalidInputError
from loraops.formats import read_adapter
from loraops.registry import Registry
from loraops.registry.reads import reader


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    d = tmp_path_factory.mktemp("art")
    base = tiny_llama(d / "llama")
    return {"base": base, "ad": peft_adapter(base, d / "ad", r=4, alpha=8, target_modules=["q_proj"])}


def test_an_explicit_sqlite_url_keeps_its_own_blob_store(art, tmp_path):
    """Registry.open("sqlite:///other.db") stored its adapters in the home's store, as `--db` once did, so a gc of
    the home's registry deleted them (and the other registry's gc the home's)."""
    url = f"sqlite:///{tmp_path / 'other.db'}"
    with Registry.open(url) as other:
        record = other.add_adapter(art["ad"])
        assert other.blobs.root == tmp_path / "other.db.blobs"
    with reader(url) as found:
        assert found.get_adapter(record.id).path.startswith(str(tmp_path / "other.db.blobs"))
    with Registry.open() as home:
        assert home.gc(grace_s=0) == []
    with Registry.open(url) as other:
        assert other.verify() == []


@pytest.mark.parametrize("first", ["load", "verify"])
def test_an_adapter_stored_by_an_older_registry_open_url_is_still_found(art, tmp_path, monkeypatch, first):
    """Up to 0.1.0 Registry.open(url) kept an SQLite URL's adapters in the home's store; after the upgrade its own
    store (<file>.blobs) lacked them: load_adapter said the stored copy was missing and verify listed it. Both copy
    it over."""
    from loraops import settings

    url = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("LORAOPS_BLOBS", str(settings.home() / "blobs"))  # where the older code put them
    with Registry.open(url) as other:
        record = other.add_adapter(art["ad"])
    monkeypatch.delenv("LORAOPS_BLOBS")
    with Registry.open(url) as other:
        if first == "load":
            assert other.load_adapter(record.id).modules.keys() == read_adapter(art["ad"]).modules.keys()
        assert other.verify() == []
    assert (tmp_path / "other.db.blobs" / record.path.split("/blobs/", 1)[1]).exists()


def test_tags_given_as_one_string_are_refused(art):
    """tags="chat" was iterated into the four tags c, h, a, t."""
    with Registry.open() as reg:
        with pytest.raises(InvalidInputError, match=r"give \['chat'\]"):
            reg.add_adapter(art["ad"], tags="chat")
        for tags in ({"chat": 1}, b"chat"):  # (a dict's keys were taken for the tags)
            with pytest.raises(InvalidInputError, match="^tags is a list of tags, not "):
                reg.add_adapter(art["ad"], tags=tags)
        assert reg.list_adapters() == []
        reg.add_adapter(art["ad"], tags=["chat"])
        with pytest.raises(InvalidInputError, match=r"give \['style'\]"):
            reg.add_tags(art["ad"].name, "style")
        assert reg.get_adapter(art["ad"].name).tags == ["chat"]


def test_merge_subtract_and_combine_take_pairs_or_ref_strings(art, tmp_path):
    """merging.merge took only 'REF[:W]' strings and derive.combine only (ref, weight) pairs: each raised a raw
    AttributeError/ValueError on the other's form, and a lone string for the list merged each of its letters."""
    ad = str(art["ad"])
    one = merging.merge(art["base"], [(ad, 0.5)], tmp_path / "one", record=False)
    two = merging.merge(art["base"], [f"{ad}:0.5"], tmp_path / "two", record=False)
    assert one.adapters[0].weight == two.adapters[0].weight == 0.5
    back = merging.subtract(tmp_path / "one", [(Path(ad), 0.5)], tmp_path / "back", record=False)
    assert back.adapters[0].weight == -0.5
    combined = derive.combine([f"{ad}:0.5", (ad, 0.25)], "cat", name="both")
    assert [i.weight for i in combined.report.inputs] == [0.5, 0.25]
    for wrong in (f"{ad}:0.5", [(ad, "0.5")], [(ad,)], [(ad, float("nan"))]):
        with pytest.raises(InvalidInputError):
            merging.merge(art["base"], wrong, tmp_path / "bad", record=False)
        with pytest.raises(InvalidInputError):
            derive.combine(wrong, "cat", name="bad")
    assert not (tmp_path / "bad").exists()


def test_check_takes_a_base_model_and_checks_it_as_merge_reads_it(art, tmp_path):
    """check(adapter, BaseModel) raised a raw TypeError, and the README's check(adapter, base.tensors) passed an
    int8 base that merge refuses: only the CLI's path (the registry's) gave check the base's quantization."""
    base = tmp_path / "int8"
    shutil.copytree(art["base"], base)
    state = load_file(base / "model.safetensors")
    save_file({k: v.to(torch.int8) if "q_proj" in k else v for k, v in state.items()}, base / "model.safetensors",
              metadata={"format": "pt"})
    adapter, model = read_adapter(art["ad"]), BaseModel.open(base)
    report = check(adapter, model)
    assert not report.ok and "stored as I8" in report.why_missing["model.layers.0.self_attn.q_proj"]
    assert bind(adapter, model).modules.keys() == bind(adapter, model.tensors).modules.keys()
    for wrong in (str(base), base):
        with pytest.raises(InvalidInputError, match="BaseModel.open"):
            check(adapter, wrong)
        with pytest.raises(InvalidInputError, match="BaseModel.open"):
            bind(adapter, wrong)
    # a mapping whose values have no shape was an AttributeError ('str' object has no attribute 'shape'), or a report
    # of nothing matched; a state dict of tensors is a base's tensors too
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    for wrong, said in (({q_proj: "abc"}, f"{q_proj!r} to 'abc' (str)"), ({"x": 1}, "'x' to 1 (int)"),
                        ({q_proj: (4, 4)}, f"{q_proj!r} to (4, 4) (tuple)"), ({1: torch.zeros(2)}, "1 to tensor")):
        for call in (check, bind):
            with pytest.raises(InvalidInputError, match="^a base's tensors map each name to what has its shape "
                                                        rf"\(a TensorInfo, a tensor\), not {re.escape(said)}"):
                call(adapter, wrong)
    state_dict = {name: torch.zeros(info.shape) for name, info in BaseModel.open(art["base"]).tensors.items()}
    assert check(adapter, state_dict).ok


@pytest.mark.parametrize("rank", [8.0, "8", True])
def test_combine_refuses_a_rank_that_is_no_integer(art, rank):
    """rank=8.0 failed deep in the SVD with a raw TypeError (slice indices), rank="8" with one from a comparison."""
    adapter = read_adapter(art["ad"])
    with pytest.raises(InvalidInputError, match="rank must be a positive integer"):
        algebra.combine([(adapter, 1.0), (adapter, 0.5)], "linear", rank=rank)


@pytest.mark.parametrize("call, message", [
    (lambda a: algebra.combine([(a, 1.0), (a, 0.5)], "ties", {"density": True}),
     "bad parameters for ties: density: Input should be a valid number, not True (bool)"),
    (lambda a: algebra.combine([(a, 1.0), (a, 0.5)], "dare_ties", {"density": 0.5, "seed": "7"}),
     "bad parameters for dare_ties: seed: Input should be a valid integer, not '7' (str)"),
    (lambda a: algebra.combine([(a, 1.0), (a, 0.5)], "dare_ties", {"density": 0.5, "seed": 7.0}),
     "bad parameters for dare_ties: seed: Input should be a valid integer, not 7.0 (float)"),
    (lambda a: algebra.combine([(a, 1.0), (a, 0.5)], "ties", {"density": 0.5, "normalize": 1}),
     "bad parameters for ties: normalize: Input should be a valid boolean, not 1 (int)"),
    (lambda a: algebra.combine([(a, 1.0), (a, 0.5)], "ties", {"density": "0.5"}),
     "bad parameters for ties: density: Input should be a valid number, not '0.5' (str)"),
    (lambda a: algebra.resize(a, rank=2.0), "bad parameters for resize: rank: Input should be a valid integer, not 2.0 "
                                            "(float)"),
    (lambda a: algebra.resize(a, dynamic="sv_fro", param=True),
     "bad parameters for resize: param: Input should be a valid number, not True (bool)"),
    (lambda a: algebra.resize(a, dynamic="sv_fro", param=0.5, max_rank="2"),
     "bad parameters for resize: max_rank: Input should be a valid integer, not '2' (str)"),
    (lambda a: algebra.resize(a, rank=2, conv_rank=True),
     "bad parameters for resize: conv_rank: Input should be a valid integer, not True (bool)"),
])
def test_parameters_of_another_type_are_refused_not_converted(art, call, message):
    """pydantic's lax mode converted them silently: density=True was a density of 1, seed="7" a seed of 7, rank=2.0
    a rank of 2, normalize=1 normalize on."""
    with pytest.raises(InvalidInputError) as info:
        call(read_adapter(art["ad"]))
    assert str(info.value) == message


def test_parameters_keep_taking_ints_for_floats_and_numpy_numbers(art):
    adapter = read_adapter(art["ad"])
    assert algebra.resize(adapter, rank=np.int64(2))[1].rank == 2
    _, report = algebra.combine([(adapter, 1.0), (adapter, 0.5)], "dare_ties",
                                {"density": np.float32(0.5), "seed": np.int64(3), "lambda": 1})
    assert (report.params["density"], report.params["seed"], report.params["lambda"]) == (0.5, 3, 1.0)


@pytest.mark.parametrize("call, message", [
    (lambda a: algebra.resize(a, dynamic="sv_fro", param=0.5, max_rank=0),
     "bad parameters for resize: max_rank: Input should be greater than 0"),
    (lambda a: algebra.resize(a, rank=2, max_rank=2),
     "bad parameters for resize: param and max_rank go with a dynamic rule, not with a fixed rank"),
    (lambda a: algebra.combine([(a, 1.0)], "cat", {"density": 0.5}),
     "cat takes no density (it is a parameter of ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, "
     "della_linear, magnitude_prune)"),
    (lambda a: algebra.combine([(a, 1.0), (a, 1.0)], "cat", conv_rank=2),
     "cat (combine's default method) keeps every input's rank (their sum), so it takes no conv_rank: give method "
     "linear with conv_rank to truncate"),
])
def test_parameter_errors_name_the_python_parameters(art, call, message):
    """The CLI says these parameters as its options (--max-rank: test_algebra_cli); the library keeps their Python
    names."""
    with pytest.raises(InvalidInputError) as info:
        call(read_adapter(art["ad"]))
    assert str(info.value) == message


def documented() -> list:
    """What README's "Python API" calls (and the derive/merging calls its per-area pages name)."""
    import loraops
    from loraops import engine, formats, hub
    from loraops.adapter import LoraModule
    from loraops.blocks import block_of, block_weighted
    from loraops.recipe import read_recipe

    return [formats.read_adapter, formats.write_adapter, formats.write, formats.identity, bind, check,
            BaseModel.open, BaseModel.fingerprint, LoraModule.delta, engine.merge, engine.subtract, algebra.combine,
            algebra.resize, algebra.resize_lazily, loraops.extract, read_recipe, merging.merge, merging.subtract,
            derive.combine, derive.resize, derive.export, derive.extract, hub.pull, hub.push, Registry.open,
            block_of, block_weighted,
            *(getattr(Registry, n) for n in vars(Registry) if not n.startswith("_") and callable(getattr(Registry, n)))]


def test_the_documented_entry_points_have_docstrings_and_type_hints():
    """What README's "Python API" calls shows its arguments and says what it does in help() and an editor."""
    lacking = []
    for function in documented():
        signature = inspect.signature(function)
        unannotated = [name for name, p in signature.parameters.items() if name not in ("self", "cls")
                       and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.annotation is p.empty]
        if not (function.__doc__ or "").strip() or unannotated or signature.return_annotation is signature.empty:
            lacking.append(f"{function.__qualname__} {unannotated}")
    assert lacking == []


def test_every_documented_flag_takes_only_true_or_false(art):
    """force="no" replaced an output, create="no" created a registry, progress="no" drew a bar, keep_rounding="no"
    kept the rounding: each string is truthy. Every flag of what README's "Python API" calls is checked
    (references.flags_checked), and a wrong one is refused before anything happens."""
    import loraops
    from loraops import algebra as lazy_calls, extraction
    from loraops.formats import write_adapter

    unchecked = []
    for function in [*documented(), lazy_calls.combine_lazily, extraction.extract_lazily]:
        flags = [name for name, p in inspect.signature(function).parameters.items()
                 if str(p.annotation) in ("bool", "bool | None")]
        if flags and getattr(function, "checked_flags", ()) != tuple(flags):
            unchecked.append(f"{function.__qualname__} {flags}")
    assert unchecked == []

    adapter = read_adapter(art["ad"])
    new_db = art["base"].parent / "new.db"
    calls = {
        "create": lambda: Registry.open(f"sqlite:///{new_db}", create="no"),
        "progress": lambda: BaseModel.open(art["base"]).fingerprint(progress="no"),
        "keep_rounding": lambda: loraops.extract(art["base"], art["base"], rank=2, keep_rounding="no"),
        "precise": lambda: algebra.resize(adapter, rank=2, precise=1),
        "record": lambda: merging.merge(art["base"], [art["ad"]], art["base"].parent / "merged", record="no"),
        "heads": lambda: check(adapter, BaseModel.open(art["base"]), heads=None),
        "values": lambda: read_adapter(art["ad"], values="no"),
        "force": lambda: write_adapter(adapter, art["base"].parent / "written", "peft", force="yes"),
    }
    for name, call in calls.items():
        with pytest.raises(InvalidInputError, match=f"^{name}= takes True or False( or None)?, not "):
            call()
    with pytest.raises(InvalidInputError, match="^progress= takes True or False or None, not 'no' \\(str\\)$"):
        BaseModel.open(art["base"]).fingerprint(progress="no")
    assert not new_db.exists()
    assert not (art["base"].parent / "merged").exists() and not (art["base"].parent / "written").exists()
    BaseModel.open(art["base"]).fingerprint(progress=None)  # None: a bar when stderr is a terminal


def test_the_documented_entry_points_type_hints_resolve():
    """typing.get_type_hints() raised NameError on most of them: their annotations name what the module imports only
    for type checkers (Adapter, torch, Registry), so pydantic, typer-like wrappers and IDE tools could not read them."""
    import typing

    failing = []
    for function in documented():
        try:
            typing.get_type_hints(function)
        except Exception as exc:  # noqa: BLE001 - the test lists every failure at once
            failing.append(f"{function.__qualname__}: {exc}")
    assert failing == []


def test_the_in_memory_api_refuses_paths_and_unweighted_adapters(art, tmp_path):
    """engine.merge/subtract and algebra.combine take (Adapter, weight) pairs and algebra.resize an Adapter: a path,
    a registry reference or an Adapter alone raised a raw TypeError or AttributeError from deep inside."""
    from loraops import engine

    adapter = read_adapter(art["ad"])
    calls = {
        "merging.merge": lambda wrong: engine.merge(art["base"], wrong, tmp_path / "out"),
        "merging.subtract": lambda wrong: engine.subtract(art["base"], wrong, tmp_path / "out"),
        "derive.combine": lambda wrong: algebra.combine(wrong, "linear"),
    }
    for hint, call in calls.items():
        for wrong in ([adapter], [(str(art["ad"]), 1.0)], [(adapter, "1")]):
            with pytest.raises(InvalidInputError, match=r"takes"):
                call(wrong)
        with pytest.raises(InvalidInputError, match=hint):
            call([(art["ad"], 1.0)])
    with pytest.raises(InvalidInputError, match="derive.resize"):
        algebra.resize(str(art["ad"]), rank=2)
    assert not (tmp_path / "out").exists()


def test_pairs_may_be_lists_and_weights_numpy_numbers(art, tmp_path):
    """float(w) took a numpy weight and `for a, w in adapters` a [ref, weight] list (read from JSON or YAML); the
    checked pairs refused both."""
    import numpy as np

    from loraops import engine

    adapter = read_adapter(art["ad"])
    for weight in (np.float32(0.5), np.int64(1)):
        report = engine.merge(art["base"], [[adapter, weight]], tmp_path / f"engine-{weight}")
        assert report.adapters[0].weight == float(weight)
        report = merging.merge(art["base"], [[str(art["ad"]), weight]], tmp_path / f"merging-{weight}", record=False)
        assert report.adapters[0].weight == float(weight)
    combined = algebra.combine([[adapter, np.float32(0.5)], (adapter, 0.25)], "cat")[0]
    assert combined.modules.keys() == adapter.modules.keys()
    for wrong in ([[adapter, np.bool_(True)]], [[adapter, True]], [[adapter, 0.5, 1]]):
        with pytest.raises(InvalidInputError, match="takes"):
            engine.merge(art["base"], wrong, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()



@pytest.mark.parametrize("weight", [float("nan"), float("inf"), pytest.param(10**400, id="10**400")])
def test_weights_no_float_holds_are_refused_as_the_references_refuse_them(art, tmp_path, weight):
    """A weight of 10**400 (a real number, which float() cannot convert) raised a raw OverflowError from every merge
    and combine; a NaN (Adapter, weight) pair was merged until the output came out NaN, then blamed on overflowing
    weights × scales, and combined until the SVD refused an overflow; a nonzero weight below float32's smallest normal
    merged as nothing. The (Adapter, weight) pairs are now checked as the (ref, weight) pairs are."""
    from loraops import engine

    adapter, ad = read_adapter(art["ad"]), str(art["ad"])
    finite = r"\('[^']*/ad', [^)]*\): the weight must be a finite number$"
    calls = [lambda: engine.merge(art["base"], [(adapter, weight)], tmp_path / "out"),
             lambda: engine.subtract(art["base"], [(adapter, weight)], tmp_path / "out"),
             lambda: algebra.combine([(adapter, weight), (adapter, 1.0)], "linear"),
             lambda: merging.merge(art["base"], [(ad, weight)], tmp_path / "out", record=False),
             lambda: derive.combine([(ad, weight), (ad, 1.0)], "linear", name="bad")]
    for call in calls:
        with pytest.raises(InvalidInputError, match=finite):
            call()
    with pytest.raises(InvalidInputError, match="below float32's smallest normal number"):
        engine.merge(art["base"], [(adapter, 1e-40)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_numbers_no_float_holds_are_refused(art):
    """Block weights, a combine method's parameter and gc's grace of 10**400 raised a raw OverflowError (from
    math.isfinite, or time.time() - grace_s)."""
    from loraops.blocks import checked

    with pytest.raises(InvalidInputError, match="every weight must be a finite number"):
        checked([10**400] + [1] * 16)
    adapter = read_adapter(art["ad"])
    with pytest.raises(InvalidInputError, match="density: Input should be a valid number"):
        algebra.combine([(adapter, 1.0), (adapter, 1.0)], "ties", {"density": 10**400})
    with Registry.open() as reg:
        with pytest.raises(InvalidInputError, match="give a number of seconds ≥ 0$"):
            reg.gc(grace_s=10**400)

def test_list_rank_and_gc_grace_are_refused_in_the_library_as_the_cli_refuses_them(art):
    """Registry.list_adapters(rank="8") raised a raw TypeError (reads compares it with integers), rank=True or 8.0
    matched as 1 or 8; Registry.gc(grace_s=-1) was accepted though the CLI refuses --grace -1 (and NaN compared as
    "old" to everything: every unused file removed at once)."""
    with Registry.open() as reg:
        reg.add_adapter(art["ad"])
        for rank in ("8", 4.0, True):
            with pytest.raises(InvalidInputError, match=rf"^rank must be an integer \(got {rank!r}\)$"):
                reg.list_adapters(rank=rank)
        assert len(reg.list_adapters(rank=4)) == 1 and reg.list_adapters(rank=0) == []
        # a numpy int is an integer (references.is_integer): sqlite3 bound its bytes as a blob, and it matched nothing
        assert [len(reg.list_adapters(rank=np.int64(4))), len(reg.list_adapters(rank=np.int32(4)))] == [1, 1]
        for grace, shown in ((-1, "-1"), (float("nan"), "nan"), ("60", "'60'"), (None, "None")):
            with pytest.raises(InvalidInputError, match=rf"^grace_s {shown}: give a number of seconds ≥ 0$"):
                reg.gc(grace_s=grace)
        assert reg.gc(grace_s=0) == []


def test_merging_and_derive_read_and_record_in_the_registry_given(art, tmp_path, isolated_home, registry_backend):
    """merging.* and derive.* always opened the default registry (LORAOPS_DB / LORAOPS_HOME): an adapter registered
    through Registry.open(url) was "not found", and what they made was recorded in the home instead."""
    url = f"sqlite:///{tmp_path / 'mine.db'}"
    with Registry.open(url) as mine:
        mine.add_adapter(art["ad"], name="ad")
        merged = merging.merge(art["base"], ["ad:0.5"], tmp_path / "merged", registry=mine)
        assert mine.get_base(merged.name).lineage.op == "merge"
        back = merging.subtract(tmp_path / "merged", [("ad", 0.5)], tmp_path / "back", exact=True, registry=mine)
        assert back.operation == "restore" and mine.get_base(back.name).fingerprint == merged_from(mine, merged)
        combined = derive.combine([("ad", 0.5), ("ad@1", 0.5)], "cat", name="both", registry=mine)
        resized = derive.resize("both", rank=2, registry=mine)
        extracted = derive.extract(art["base"], tmp_path / "merged", rank=2, name="ex", registry=mine)
        for record in (combined, resized, extracted):
            assert mine.get_adapter(record.adapter.ref).id == record.adapter.id
            assert mine.adapter_path(record.adapter.id).is_relative_to(tmp_path / "mine.db.blobs")
        derive.export("both", "kohya", str(tmp_path / "both.safetensors"), registry=mine)
        merging.merge(art["base"], ["ad"], tmp_path / "unrecorded", record=False, registry=mine)
        assert mine.list_adapters(name="both")  # still open: the caller's to close
    for call in (lambda: merging.merge(art["base"], ["ad"], tmp_path / "x", registry=url),
                 lambda: derive.combine([("ad", 1.0)], "cat", registry=url)):
        with pytest.raises(InvalidInputError, match=r"registry= takes a Registry \(.*Registry.open\(url\)\), not"):
            call()
    if registry_backend == "sqlite":
        assert not (isolated_home / "registry.db").exists() and not (isolated_home / "blobs").exists()
    with Registry.open() as default:
        assert default.list_adapters() == [] and default.list_bases() == []


def merged_from(reg, merged) -> str:
    """The fingerprint of the base a recorded merge was made from (what subtract --exact restores)."""
    return reg.get_base(merged.name).lineage.params["base"]["fingerprint"]


@pytest.mark.parametrize("call, typo", [("algebra.combine", "methd"), ("algebra.resize", "rnk"),
                                        ("loraops.extract", "rnk"), ("extraction.extract", "rnk")])
def test_a_keyword_typo_names_the_function_called(art, call, typo):
    """algebra.combine(..., methd=…) said `combine_lazily() got an unexpected keyword argument`, naming a function the
    user never called (resize: resize_lazily(), extract: extract_lazily())."""
    import loraops
    from loraops import extraction

    function = {"algebra.combine": algebra.combine, "algebra.resize": algebra.resize,
                "loraops.extract": loraops.extract, "extraction.extract": extraction.extract}[call]
    adapter = read_adapter(art["ad"])
    args = {"algebra.combine": ([(adapter, 1.0)], "ties"), "algebra.resize": (adapter,)}.get(call, (art["base"],) * 2)
    name = call.split(".")[-1]
    with pytest.raises(TypeError, match=rf"^{name}\(\) got an unexpected keyword argument '{typo}'$"):
        function(*args, **{typo: 1})


def test_fp64_is_an_api_only_dtype_that_round_trips_a_merge_bit_for_bit(art, tmp_path):
    """The API's dtype= takes fp64, which the CLI's --dtype does not offer; a bad dtype's message said only "use
    bf16, fp16 or fp32". A float64 merge keeps W + ΔW unrounded: subtracting the adapter gives the float32 base back
    bit for bit (the float32 round trip does not), and a float64 adapter is written, read back and loaded by PEFT."""
    import peft
    import transformers

    from loraops import engine, formats

    with pytest.raises(InvalidInputError, match=r"^unknown dtype 'int8': use bf16, fp16, fp32 or fp64$"):
        engine.merge(art["base"], [], tmp_path / "bad", dtype="int8")
    adapter = read_adapter(art["ad"])
    original = load_file(art["base"] / "model.safetensors")
    differing = {}
    for dtype in ("fp64", "fp32"):
        engine.merge(art["base"], [(adapter, 1.0)], tmp_path / f"m-{dtype}", dtype=dtype, precise=True)
        engine.subtract(tmp_path / f"m-{dtype}", [(adapter, 1.0)], tmp_path / f"b-{dtype}", dtype="fp32", precise=True)
        back = load_file(tmp_path / f"b-{dtype}" / "model.safetensors")
        differing[dtype] = sum(int((back[k] != original[k]).sum()) for k in original)
    assert differing["fp64"] == 0 and differing["fp32"] > 0
    written = formats.write_adapter(adapter, tmp_path / "ad64", "peft", dtype="fp64")
    again = read_adapter(written)
    name = "model.layers.0.self_attn.q_proj"
    assert again.modules[name].A.dtype == torch.float64
    assert torch.equal(again.modules[name].delta(), adapter.modules[name].delta())
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(art["base"]), written)
    assert dict(model.named_parameters())[f"base_model.model.{name}.lora_A.default.weight"].dtype == torch.float32


def test_from_loraops_import_a_submodule_gives_the_module_itself():
    """loraops/__init__ bound the names adapter, basemodel and records to LazyModule stand-ins (for extract's
    annotations), and `from loraops import basemodel` in a fresh interpreter gave the stand-in, not the module: what
    a test or a user patched on it (monkeypatch.setattr(basemodel, ...)) never reached loraops.basemodel."""
    import os
    import subprocess
    import sys

    said = ("import sys, types\n"
            "from loraops import adapter, basemodel, records\n"
            "for m in (adapter, basemodel, records):\n"
            "    assert isinstance(m, types.ModuleType) and m is sys.modules[m.__name__], repr(m)\n"
            "import typing, loraops\n"
            "typing.get_type_hints(loraops.extract)\n")
    done = subprocess.run([sys.executable, "-c", said], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr


def test_a_recipes_base_folders_are_looked_up_in_the_registry_given(art, tmp_path, isolated_home):
    """derive.registered_base_folders (read_recipe's base_folders, for `derive.combine(base_model=...)`) read only the
    default registry: a recipe run against registry=reg found none of reg's bases."""
    import functools

    from loraops.recipe import parse_recipe

    with Registry.open(f"sqlite:///{tmp_path / 'mine.db'}") as mine:
        mine.add_base(art["base"], name="llama")
        folders = functools.partial(derive.registered_base_folders, registry=mine)
        assert folders("llama") == [str(art["base"].resolve())]
        recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": "llama",
                               "models": [{"model": str(art["base"])}, {"model": "ad", "parameters": {"weight": 1.0}}]},
                              base_folders=folders)
        assert recipe.inputs == [("ad", 1.0)]
    assert derive.registered_base_folders("llama") == []


def test_a_lazy_module_stand_in_copies_and_pickles():
    """copy.copy, copy.deepcopy and pickle of a LazyModule (loraops.adapter.torch, say) ended in a RecursionError:
    they make it without __init__ and ask it for __setstate__, which __getattr__ looked up through its unset _name."""
    import copy
    import pickle

    from loraops.lazy import LazyModule

    lazy = LazyModule("json")
    for again in (copy.copy(lazy), copy.deepcopy(lazy), pickle.loads(pickle.dumps(lazy))):
        assert again.dumps([1]) == "[1]"


def test_a_recipes_model_plus_lora_entry_that_names_nothing_is_refused_with_why(art, tmp_path):
    """A models entry BASE+LORA without a base_model names no adapter (mergekit reads LORA only over the base_model):
    the CLI found its hint by looking for the entry in the text of a NotFoundError, and the library got the plain
    'not found'; the library's combine now raises ModelLoraError, carrying the entry, as the CLI says it. A registered
    name holding '+' (combine's default a+b-ties) is still an adapter."""
    from loraops.errors import ModelLoraError
    from loraops.recipe import parse_recipe

    entry = f"{art['base']}+{art['ad']}"
    doc = {"merge_method": "task_arithmetic", "models": [{"model": entry, "parameters": {"weight": 1.0}}]}
    recipe = parse_recipe(doc, "r.yml")
    with Registry.open(f"sqlite:///{tmp_path / 'r.db'}") as reg:
        with pytest.raises(ModelLoraError) as caught:
            derive.combine(recipe.inputs, recipe.method, recipe.params, base_model=recipe.base_model, registry=reg,
                           recipe=recipe.source)
        assert caught.value.ref == entry and str(caught.value).startswith(
            f"r.yml: {entry!r} is mergekit's MODEL+LORA, read as the adapter {str(art['ad'])!r} only where MODEL is "
            "the base_model, and the recipe gives none"), str(caught.value)
        assert reg.list_adapters() == []
        reg.add_adapter(art["ad"], name="x+ad")
        named = parse_recipe({**doc, "models": [{"model": "x+ad", "parameters": {"weight": 1.0}}]}, "r.yml")
        done = derive.combine(named.inputs, named.method, named.params, registry=reg, recipe=named.source)
        assert [i.ref for i in done.report.inputs] == ["x+ad@1"]


def test_an_unknown_format_is_refused_by_derive_as_by_write_adapter(art, tmp_path):
    """derive.export/resize/combine(fmt="safetensors") raised a raw KeyError: 'safetensors' (the CLI's --format is a
    choice, so only the library met it)."""
    ad = str(art["ad"])
    calls = [lambda: derive.export(ad, "safetensors", str(tmp_path / "out")),
             lambda: derive.resize(ad, rank=2, fmt="safetensors", output=str(tmp_path / "out")),
             lambda: derive.combine([ad, ad], "cat", fmt="safetensors", output=str(tmp_path / "out"))]
    for call in calls:
        with pytest.raises(InvalidInputError, match=r"^unknown adapter format 'safetensors' \(choose from peft, kohya, "
                                                    r"diffusers\)$"):
            call()
    assert not (tmp_path / "out").exists()
    with Registry.open() as reg:
        assert reg.list_adapters() == []


def test_device_takes_a_torch_device_as_dtype_takes_a_torch_dtype(art, tmp_path):
    """device=torch.device("cpu") raised a raw AttributeError ('torch.device' object has no attribute 'strip') from
    every call that takes a device, though dtype= takes a torch.dtype; a device that is no string was one too."""
    from loraops import engine

    adapter = read_adapter(art["ad"])
    cpu = torch.device("cpu")
    assert engine.merge(art["base"], [(adapter, 1.0)], tmp_path / "engine", device=cpu).device == "cpu"
    assert merging.merge(art["base"], [(str(art["ad"]), 1.0)], tmp_path / "merging", device=cpu,
                         record=False).device == "cpu"
    assert algebra.combine([(adapter, 1.0), (adapter, 0.5)], "linear", device=cpu)[0].modules.keys() \
        == adapter.modules.keys()
    assert algebra.resize(adapter, rank=2, device=cpu)[1].device == "cpu"
    with pytest.raises(InvalidInputError, match=r"^unknown device 0: use cpu, cuda, cuda:N or auto$"):
        algebra.resize(adapter, rank=2, device=0)


def test_device_annotations_say_a_torch_device_is_taken():
    """Every signature said `device: str`, though each takes a torch.device (test above): an editor or a type
    checker flagged device=torch.device("cuda:1")."""
    import typing

    functions = [*documented(), algebra.combine_lazily, algebra.resize_lazily]
    said = {f"{f.__module__}.{f.__qualname__}": typing.get_type_hints(f)["device"] for f in functions
            if "device" in inspect.signature(f).parameters}
    assert len(said) == 8 and {name: hint for name, hint in said.items()
                               if not {str, torch.device} <= set(typing.get_args(hint))} == {}


def test_names_tags_params_and_urls_of_the_wrong_type_are_typed_errors(art, tmp_path):
    """name=1, tags=[1] or tags=5, Registry.open(Path(...)) and combine's params as a list or a string raised raw
    AttributeErrors, TypeErrors and ValueErrors (name.split, tag.strip, url.partition, dict(params))."""
    ad = str(art["ad"])
    with Registry.open() as reg:
        for bad, message in ((1, "bad adapter name 1: a name is a string"), (b"x", "bad adapter name b'x'")):
            with pytest.raises(InvalidInputError, match=message):
                reg.add_adapter(ad, name=bad)
        for tags, message in (([1], "bad tag 1: a tag is one word"), ([None], "bad tag None"),
                              (5, "tags is a list of tags, not 5")):
            with pytest.raises(InvalidInputError, match=message):
                reg.add_adapter(ad, tags=tags)
        with pytest.raises(InvalidInputError, match="bad base name 1: a name is a string"):
            reg.add_base(art["base"], name=1)
        assert reg.list_adapters() == [] and reg.list_bases() == []
    with pytest.raises(InvalidInputError, match="bad adapter name 7"):
        derive.resize(ad, rank=2, name=7)
    with pytest.raises(InvalidInputError, match="bad base name 7"):
        merging.merge(art["base"], [ad], tmp_path / "out", name=7)
    with pytest.raises(InvalidInputError, match=r"^Registry.open takes a database URL .*, not PosixPath\("):
        Registry.open(tmp_path / "registry.db")
    adapter = read_adapter(art["ad"])
    for params in ([("density", 0.5)], "density=0.5"):
        with pytest.raises(InvalidInputError, match=r"^params is a dict of ties's parameters \(like \{'density': "):
            algebra.combine([(adapter, 1.0), (adapter, 1.0)], "ties", params)
        with pytest.raises(InvalidInputError, match="params is a dict"):
            derive.combine([ad, ad], "ties", params, name="bad")
    assert not (tmp_path / "out").exists()


class PathLike:
    """An os.PathLike that is no pathlib.Path (as a user's own path class is): path arguments take it."""

    def __init__(self, path):
        self.path = str(path)

    def __fspath__(self) -> str:
        return self.path


def path_calls(art, out: Path, reg) -> dict:
    """Every documented call that takes a path, reference or output, by the name of that parameter."""
    import loraops
    from loraops import engine, formats, hub
    from loraops.blocks import block_of
    from loraops.recipe import read_recipe

    base, ad = art["base"], art["ad"]
    adapter = read_adapter(ad)
    return {
        "read_adapter path": lambda w: read_adapter(w),
        "identity path": lambda w: formats.identity(w),
        "BaseModel.open path": lambda w: BaseModel.open(w),
        "read_recipe path": lambda w: read_recipe(w),
        "write_adapter dest": lambda w: formats.write_adapter(adapter, w),
        "engine.merge base": lambda w: engine.merge(w, [(adapter, 1.0)], out),
        "engine.merge output": lambda w: engine.merge(base, [(adapter, 1.0)], w),
        "engine.subtract model": lambda w: engine.subtract(w, [(adapter, 1.0)], out),
        "engine.subtract reference": lambda w: engine.subtract(base, [(adapter, 1.0)], out, reference=w),
        "extract base": lambda w: loraops.extract(w, base, rank=2),
        "extract tuned": lambda w: loraops.extract(base, w, rank=2),
        "merging.merge base": lambda w: merging.merge(w, [str(ad)], out, record=False),
        "merging.merge output": lambda w: merging.merge(base, [str(ad)], w, record=False),
        "merging.subtract model": lambda w: merging.subtract(w, [str(ad)], out, record=False),
        "derive.resize ref": lambda w: derive.resize(w, rank=2),
        "derive.resize output": lambda w: derive.resize(str(ad), rank=2, output=w),
        "derive.combine output": lambda w: derive.combine([str(ad), str(ad)], "cat", output=w),
        "derive.export ref": lambda w: derive.export(w, "peft", str(out)),
        "derive.export output": lambda w: derive.export(str(ad), "peft", w),
        "derive.extract base": lambda w: derive.extract(w, str(base), rank=2),
        "derive.extract tuned": lambda w: derive.extract(str(base), w, rank=2),
        "hub.pull ref": lambda w: hub.pull(reg, w),
        "hub.push repo_id": lambda w: hub.push(reg, "ad", w),
        "Registry.open blobs": lambda w: Registry.open(f"sqlite:///{out}.db", blobs=w).close(),
        "Registry.add_base path": lambda w: reg.add_base(w),
        "Registry.add_adapter path": lambda w: reg.add_adapter(w),
        "Registry.register_adapter path": lambda w: reg.register_adapter(w),
        "Registry.check_adapter ref_or_path": lambda w: reg.check_adapter(w),
        "Registry.attach_base_files path": lambda w: reg.attach_base_files("llama", w),
        "Registry.list_adapters target": lambda w: reg.list_adapters(target=w),
        "Registry.list_adapters tag": lambda w: reg.list_adapters(tag=w),
        "Registry.find_base fingerprint": lambda w: reg.find_base(w),
        "block_of name": lambda w: block_of(w),
    }


# where None is what leaving the argument out gives, or a registry filter's "any"
OPTIONAL = {"engine.subtract reference", "derive.resize output", "derive.combine output", "Registry.open blobs",
            "Registry.list_adapters target", "Registry.list_adapters tag"}


def test_a_path_or_reference_of_the_wrong_type_is_a_typed_error_naming_the_parameter(art, tmp_path):
    """None, a number, a list holding the path or its bytes where a path, a reference or an output goes raised a raw
    TypeError from pathlib (expected str, bytes or os.PathLike object), an AttributeError (hub: .strip, .repo_id) or
    sqlite3's ProgrammingError from deep inside; each is now one InvalidInputError naming the parameter, nothing
    written or registered. str, pathlib.Path and any other os.PathLike still work."""
    out = tmp_path / "out"
    with Registry.open() as reg:
        reg.add_base(PathLike(art["base"]), name="llama")
        reg.add_adapter(PathLike(art["ad"]), name="ad")
        calls = path_calls(art, out, reg)
        for label, call in calls.items():
            parameter = label.split()[-1]
            for wrong in ([None] * (label not in OPTIONAL) + [1, [str(art["ad"])], bytes(str(art["ad"]), "utf-8")]):
                with pytest.raises(InvalidInputError, match=rf"^{parameter}= takes a str"):
                    call(wrong)
        assert not out.exists() and not Path(f"{out}.db").exists()
        assert [r.name for r in reg.list_adapters()] == ["ad"] and [b.name for b in reg.list_bases()] == ["llama"]
    for kind in (str, Path, PathLike):
        assert len(calls["read_adapter path"](kind(art["ad"])).modules) == 2
        assert calls["engine.merge base"](kind(art["base"])).output == str(out)
        shutil.rmtree(out)
        merged, exported = tmp_path / f"merged-{kind.__name__}", tmp_path / f"exported-{kind.__name__}"
        # (a path alone in the list of adapters was refused; derive.export(…, Path) raised shlex's raw TypeError)
        done = merging.merge(kind(art["base"]), [kind(art["ad"]), (kind(art["ad"]), 0.5)], kind(merged), record=False)
        assert done.output == str(merged) and [a.weight for a in done.adapters] == [1.0, 0.5]
        assert derive.export(kind(art["ad"]), "peft", kind(exported)).output == str(exported)


def test_an_adapter_list_method_or_format_of_the_wrong_type_is_a_typed_error(art, tmp_path):
    """None for the list of adapters raised a raw TypeError ('NoneType' object is not iterable), block weights of 5
    one from len(), a list for the method or the format one from a dict lookup (unhashable), and a path or None where
    an Adapter goes in write_adapter, check, bind and block_weighted an AttributeError (names_resolved, modules,
    full_tensors)."""
    from loraops import engine, formats
    from loraops.blocks import block_weighted

    adapter, out = read_adapter(art["ad"]), tmp_path / "out"
    lists = [lambda: engine.merge(art["base"], None, out), lambda: engine.subtract(art["base"], 5, out),
             lambda: algebra.combine(None, "cat"), lambda: merging.merge(art["base"], None, out, record=False),
             lambda: derive.combine(None, "cat"),
             lambda: merging.merge(art["base"], [str(art["ad"])], out, block_weights=5, record=False),
             lambda: algebra.combine([(adapter, 1.0)], ["cat"]), lambda: derive.combine([str(art["ad"])], ["cat"]),
             lambda: formats.write_adapter(adapter, out, ["peft"]), lambda: derive.export(str(art["ad"]), {}, str(out))]
    for call in lists:
        with pytest.raises(InvalidInputError):
            call()
    for wrong in (None, str(art["ad"])):
        for name, call in {"write_adapter": lambda: formats.write_adapter(wrong, out),
                           "check": lambda: check(wrong, {}), "bind": lambda: bind(wrong, {}),
                           "block_weighted": lambda: block_weighted(wrong, [1] * 17, "x")}.items():
            with pytest.raises(InvalidInputError, match=rf"^{name} takes Adapter objects, not .*read_adapter"):
                call()
    assert not out.exists()
    with Registry.open() as reg:
        assert reg.list_adapters() == []


def test_a_dtype_or_device_of_the_wrong_type_is_a_typed_error(art):
    """LoraModule.delta(dtype=1) and (device=[…]) raised torch's raw TypeError (to() received an invalid combination
    of arguments), device=1 a RuntimeError, and dtype={} was taken as float32; resize_lazily's out_dtype took anything
    until torch met it. They are checked as every other dtype= and device= is; torch.dtype and torch.device work."""
    adapter = read_adapter(art["ad"])
    module = adapter.modules["model.layers.0.self_attn.q_proj"]
    for wrong in (1, {}, "int8"):
        with pytest.raises(InvalidInputError, match="^unknown dtype"):
            module.delta(dtype=wrong)
        with pytest.raises(InvalidInputError, match="^unknown dtype"):
            algebra.resize_lazily(adapter, rank=2, out_dtype=wrong)
    for wrong in (1, [0], "gpu"):
        with pytest.raises(InvalidInputError, match="device"):
            module.delta(device=wrong)
    exact = module.delta(dtype=torch.float64, device=torch.device("cpu"))
    assert exact.dtype == torch.float64 and torch.equal(module.delta(dtype="fp64", device="cpu"), exact)
    assert {m.A.dtype for m in algebra.resize_lazily(adapter, rank=2, out_dtype=torch.bfloat16)} == {torch.bfloat16}


@pytest.mark.parametrize("name", ["combine", "resize", "export", "extract"])
def test_a_keyword_typo_in_derive_names_the_function_called(name):
    """derive.* said only `got an unexpected keyword argument 'rnk'` (no function named): the wrapper that watches
    their output (landing.watched) bound the arguments itself, with inspect's TypeError."""
    with pytest.raises(TypeError, match=rf"^{name}\(\) got an unexpected keyword argument 'rnk'$"):
        getattr(derive, name)(*[None] * (3 if name == "export" else 2), rnk=1)


def test_a_registry_reference_of_the_wrong_type_is_a_typed_error(art):
    """The registry read a reference as str(ref): get_adapter(None) found the adapter named 'None' (and
    remove_adapter(None) removed it), and a list, bytes or a float were looked up as the text of their repr. A
    reference is a str, a path or an id (numpy's integers too); anything else names the parameter."""
    with Registry.open() as reg:
        named = reg.add_adapter(art["ad"], name="None")
        reg.add_base(art["base"], name="llama")
        for call in (reg.get_adapter, reg.load_adapter, reg.adapter_path, reg.remove_adapter, reg.get_base):
            for wrong in (None, [named.id], b"None", float(named.id)):
                with pytest.raises(InvalidInputError, match=r"^ref= takes a str, an os.PathLike \(a pathlib.Path\) "
                                                            r"or an int, not "):
                    call(wrong)
        for call in (lambda w: reg.list_adapters(base=w), lambda w: reg.add_adapter(art["ad"], base=w),
                     lambda w: reg.check_adapter("None", base=w)):
            with pytest.raises(InvalidInputError, match=r"^base= takes a str"):
                call([1])
        assert reg.get_adapter(np.int64(named.id)) == reg.get_adapter("None") == reg.list_adapters()[0]


def test_derive_takes_a_torch_dtype_as_its_annotations_say(tmp_path, monkeypatch):
    """derive.* took a torch.dtype (as engine.merge does) while annotated `str | None`: the signature now says so."""
    import typing

    import torch

    for function in (derive.combine, derive.resize, derive.export, derive.extract):
        assert typing.get_type_hints(function)["dtype"] == str | torch.dtype | None, function.__qualname__


def test_force_that_is_no_bool_and_names_given_as_one_string_are_refused(art, tmp_path):
    """force="no" replaced an existing output (a non-empty string is truthy); extract's modules="a.b.c" was read
    character by character (`modules m: … no weight by that name`), as save_modules was."""
    import loraops
    from loraops.formats import write_adapter

    adapter = read_adapter(art["ad"])
    out = tmp_path / "out"
    write_adapter(adapter, out, "peft")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for force in ("no", 1, None):
        with pytest.raises(InvalidInputError, match="^force= takes True or False, not "):
            write_adapter(adapter, out, "peft", force=force)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    write_adapter(adapter, out, "peft", force=True)
    for name in ("modules", "save_modules"):
        with pytest.raises(InvalidInputError, match=f"^{name} is a list of names: give \\['model.norm'\\], not the "
                                                    "string 'model.norm'"):
            loraops.extract(art["base"], art["base"], rank=2, **{name: "model.norm"})
        with pytest.raises(InvalidInputError, match=f"^{name} is a list of names, not 5"):
            loraops.extract(art["base"], art["base"], rank=2, **{name: 5})
