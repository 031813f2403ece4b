"""`loraops merge` / `loraops subtract` from the command line: weights, registry lineage, residuals, --exact, errors."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from factories import kohya_file, peft_adapter, save_state_dict, conv_embedding_model, tiny_llama
from loraops import check, formats
from loraops.cli import main
from loraops.errors import InvalidInputError
from loraops.merging import parse_weighted
from loraops.references import weighted_inputs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = tiny_llama(root / "base", dtype=torch.bfloat16, shard_size="60KB")
    return base, peft_adapter(base, root / "a", r=4), peft_adapter(base, root / "b", seed=7, r=2)


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        out.update(load_file(f))
    return out


def test_parse_weighted(tmp_path):
    odd = tmp_path / "dir:0.5"
    odd.mkdir()
    assert parse_weighted("style:0.7") == ("style", 0.7)
    assert parse_weighted("style:-0.2") == ("style", -0.2)
    assert parse_weighted("style") == ("style", 1.0)
    assert parse_weighted("name@3:2") == ("name@3", 2.0)
    assert parse_weighted("C:/models/x") == ("C:/models/x", 1.0)
    assert parse_weighted(str(odd)) == (str(odd), 1.0)  # an existing path is never split
    assert parse_weighted(f"{odd}:0.25") == (str(odd), 0.25)
    with pytest.raises(InvalidInputError, match="the weight after ':' must be a number"):
        parse_weighted(f"{odd}:abc")


@pytest.mark.parametrize("tail", ["1_0", "inf", "-Infinity", "nan", " 1", "1 ", "\t2", "\u0661", "+1_000.5"])
def test_a_weight_python_reads_but_not_written_plainly_is_refused(tail):
    """float() takes '1_0' (10), 'inf', 'nan', ' 1', other scripts' digits: they were weights (or, for inf/nan, said
    'must be a finite number'). Only decimal and scientific numbers are weights now; the rest is one line naming the
    input."""
    with pytest.raises(InvalidInputError, match=r"must be a number written plainly \(like 0.7, -1 or 2e-3\)$") as caught:
        parse_weighted(f"style:{tail}")
    assert str(caught.value).startswith(repr(f"style:{tail}"))


@pytest.mark.parametrize("text, parsed", [
    ("style:0.7", ("style", 0.7)), ("c:-0.2", ("c", -0.2)), ("name@3:0.5", ("name@3", 0.5)), ("s:+.5", ("s", 0.5)),
    ("s:5.", ("s", 5.0)), ("s:2E-3", ("s", 0.002)), ("s:1e+2", ("s", 100.0)), ("s:-0", ("s", -0.0)),
    ("hub:owner/name", ("hub:owner/name", 1.0)), ("hub:owner/name@v1:0.5", ("hub:owner/name@v1", 0.5)),
    ("s:0x10", ("s:0x10", 1.0)), ("dir:with:colons", ("dir:with:colons", 1.0)),
])
def test_plain_weights_and_names_with_colons(text, parsed):
    assert parse_weighted(text) == parsed


@pytest.mark.parametrize("tail", ["1e-400", "-1e-400", "1e-40", "0.00000000000000000000000000000000000000001"])
def test_a_nonzero_weight_that_computes_as_zero_is_refused(tail):
    """'1e-400' is 0.0 as a float: merged as weight 0, a no-op for a user who wrote a number that is not 0. Below
    float32's smallest normal number a weight is 0 or subnormal where deltas are computed (1e-40): refused too, as is
    such a weight given from Python; a weight written as 0 stays one."""
    with pytest.raises(InvalidInputError, match=r"the weight is not 0 but below float32's smallest normal number "
                                                r"\(1.18e-38\).*write 0 for no weight$") as caught:
        parse_weighted(f"style:{tail}")
    assert str(caught.value).startswith(repr(f"style:{tail}"))
    with pytest.raises(InvalidInputError, match=r"^\('style', 1e-40\): the weight is not 0"):
        weighted_inputs([("style", 1e-40)])
    assert [parse_weighted(f"style:{zero}") for zero in ("0", "-0.0", "0e-400", "0.000")] == [("style", 0.0)] * 4
    assert parse_weighted("style:1.2e-38") == ("style", 1.2e-38)
    assert weighted_inputs([("style", 0.0)]) == [("style", 0.0)]


def test_a_nonzero_weight_that_computes_as_zero_is_one_line(tmp_path, models):
    base, a, _ = models
    result = run("merge", f"{a}:1e-400", "--into", base, "-o", tmp_path / "out", code=2)
    assert result.output.startswith(f"error: '{a}:1e-400': the weight is not 0 but below float32's")
    assert len(result.output.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_badly_written_weight_is_one_line_before_anything_is_done(tmp_path, models):
    base, a, _ = models
    result = run("merge", f"{a}:1_0", "--into", base, "-o", tmp_path / "out", code=2)
    assert result.output == (f"error: '{a}:1_0': the weight after ':' must be a number written plainly (like 0.7, "
                             "-1 or 2e-3)\n")
    result = run("combine", "x:inf", "y", "--method", "cat", code=2)
    assert result.output == "error: 'x:inf': the weight after ':' must be a number written plainly (like 0.7, -1 or 2e-3)\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.registry_backend
def test_merge_subtract_round_trip_and_exact(tmp_path, models):
    base, a, b = models
    out = tmp_path / "blend"
    report = json.loads(run("merge", a, f"{b}:-0.5", "--into", base, "-o", out, "--device", "cpu", "--json").output)
    assert [x["weight"] for x in report["adapters"]] == [1.0, -0.5] and report["name"] == "blend"
    shown = run("base", "show", "blend").output
    assert "derived      yes" in shown and "merge(base" in shown and "×-0.5" in shown

    back = tmp_path / "back"
    text = run("subtract", a, f"{b}:-0.5", "--from", out, "-o", back, "--device", "cpu").output
    assert "subtracted" in text and "elements differ" in text and "--exact" in text
    residual = json.loads(run("subtract", a, f"{b}:-0.5", "--from", out, "-o", tmp_path / "b2", "--json").output)["residual"]
    assert residual["compared_to"] == str(base) and residual["elements_differing"] > 0  # bf16: never bit-exact
    assert residual["max_abs_diff"] < 0.05
    # taking off only one of the two: b stays merged, so the base is not what the result should be, and the
    # difference from it (b's delta) is not reported as the round trip's rounding
    partial = json.loads(run("subtract", a, "--from", out, "-o", tmp_path / "b3", "--json").output)["residual"]
    assert partial["compared_to"] is None and "no pristine base" in partial["note"]

    exact = tmp_path / "exact"
    text = run("subtract", a, f"{b}:-0.5", "--from", out, "-o", exact, "--exact").output
    assert "bit for bit" in text
    for f in base.iterdir():
        assert (exact / f.name).read_bytes() == f.read_bytes(), f.name

    # removing one of the two: the other re-merged onto the pristine base, same bytes as merging it alone
    run("subtract", a, "--from", out, "-o", tmp_path / "only-b", "--exact")
    run("merge", f"{b}:-0.5", "--into", base, "-o", tmp_path / "b-alone", "--no-record")
    for f in (tmp_path / "b-alone").glob("*.safetensors"):
        assert (tmp_path / "only-b" / f.name).read_bytes() == f.read_bytes()


@pytest.mark.registry_backend
def test_exact_without_a_recorded_base_says_so(tmp_path, models):
    base, a, _ = models
    run("merge", a, "--into", base, "-o", tmp_path / "m", "--no-record")
    result = run("subtract", a, "--from", tmp_path / "m", "-o", tmp_path / "r", "--exact", code=3)
    assert result.output.startswith("error: --exact:") and "not recorded" in result.output
    assert not (tmp_path / "r").exists()
    run("merge", a, "--into", base, "-o", tmp_path / "m2")
    result = run("subtract", f"{a}:0.5", "--from", tmp_path / "m2", "-o", tmp_path / "r", "--exact", code=2)
    assert "is not one of the adapters" in result.output


def test_the_same_adapter_twice_merges_as_their_weights_summed(tmp_path, models):
    """`merge a:0.5 a:0.5` is a merge of a at 1 (rounded once, as any merge), recorded with both entries; --exact
    takes off one of them and re-merges the other, or both and gives the base back."""
    base, a, _ = models
    twice, once = tmp_path / "twice", tmp_path / "once"
    run("merge", f"{a}:0.5", f"{a}:0.5", "--into", base, "-o", twice)
    run("merge", a, "--into", base, "-o", once, "--no-record")
    merged, expected = tensors(twice), tensors(once)
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=0.02)
    assert "lineage      merge(base, a@1×0.5, a@1×0.5)" in run("base", "show", "twice").output
    run("subtract", f"{a}:0.5", "--from", twice, "-o", tmp_path / "half", "--exact")
    run("merge", f"{a}:0.5", "--into", base, "-o", tmp_path / "half-alone", "--no-record")
    for f in (tmp_path / "half-alone").glob("*.safetensors"):
        assert (tmp_path / "half" / f.name).read_bytes() == f.read_bytes()
    run("subtract", f"{a}:0.5", f"{a}:0.5", "--from", twice, "-o", tmp_path / "none", "--exact")
    for f in base.glob("*.safetensors"):
        assert (tmp_path / "none" / f.name).read_bytes() == f.read_bytes()


def test_an_adapter_changed_while_it_was_merged_is_not_recorded_as_what_was_merged(tmp_path, models, monkeypatch):
    """The file given by path was registered again once the output was written: changed in between (retrained over,
    say), its new contents were registered and linked in the lineage as the adapter merged, while the lineage's params
    kept the sha256 of what was read. Now nothing is registered of it, the lineage names it by that sha256 only, and
    a note says so."""
    import shutil

    from loraops import engine
    from loraops.registry import Registry

    base, a, b = models
    adapter = shutil.copytree(a, tmp_path / "adapter")
    real_merge = engine.merge

    def merge(*args, **kwargs):
        report = real_merge(*args, **kwargs)
        for name in ("adapter_model.safetensors", "adapter_config.json"):  # (b's rank: its config with it)
            shutil.copy(b / name, adapter / name)
        return report

    monkeypatch.setattr(engine, "merge", merge)
    result = run("merge", f"{adapter}:0.5", "--into", base, "-o", tmp_path / "m", "--json")
    note, _, report = result.output.partition("\n")
    sha = formats.identity(a)
    assert note == (f"note: {adapter} changed while it was merged (sha256 {sha[:12]} when read, "
                    f"{formats.identity(adapter)[:12]} now): {tmp_path / 'm'} is recorded with what was merged, by "
                    "its sha256, not linked to the file's new contents")
    assert json.loads(report)["name"] == "m"
    with Registry.open() as reg:
        assert reg.list_adapters() == []  # (its new contents were registered, then taken back)
    shown = json.loads(run("base", "show", "m", "--json").output)["lineage"]
    assert [i["kind"] for i in shown["inputs"]] == ["base"]
    assert shown["params"]["adapters"] == [{"ref": str(adapter), "sha256": sha, "weight": 0.5}]


def test_an_adapter_changed_between_check_and_merge_is_merged_as_it_is_then(tmp_path, models):
    """`check` keeps nothing a later merge reads (the merge hashes and reads the file itself): what the merge reads
    is what it writes and records."""
    import shutil

    base, a, b = models
    adapter = shutil.copytree(a, tmp_path / "adapter")
    assert "fits" in run("check", adapter, "--base", base).output
    shutil.rmtree(adapter)
    shutil.copytree(b, adapter)
    run("merge", f"{adapter}:0.5", "--into", base, "-o", tmp_path / "m")
    run("merge", f"{b}:0.5", "--into", base, "-o", tmp_path / "b", "--no-record")
    for f in (tmp_path / "b").glob("*.safetensors"):
        assert (tmp_path / "m" / f.name).read_bytes() == f.read_bytes()
    shown = json.loads(run("base", "show", "m", "--json").output)["lineage"]
    assert [i["sha256"] for i in shown["inputs"] if i["kind"] == "adapter"] == [formats.identity(b)]


def test_errors_are_one_line(tmp_path, models):
    base, a, _ = models
    out = tmp_path / "o"
    out.mkdir()
    result = run("merge", a, "--into", base, "-o", out, code=4)
    assert result.output == f"error: {out}: already exists (use --force to replace it)\n"
    gpt_like = tiny_llama(tmp_path / "other", hidden=32, intermediate=64)
    result = run("merge", a, "--into", gpt_like, "-o", tmp_path / "x", code=2)
    assert result.output.startswith("error: ") and result.output.count("\n") == 1 and "do not fit" in result.output
    result = run("merge", "no-such-adapter", "--into", base, "-o", tmp_path / "y", code=3)
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    result = run("merge", a, "--into", base, "-o", tmp_path / "z", "--dtype", "int8", code=2)
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])  # float8 LoRAs circulate for FLUX
def test_kohya_adapter_into_single_file_checkpoint(tmp_path, dtype):
    base = save_state_dict(conv_embedding_model(), tmp_path / "sd.safetensors")
    lora = kohya_file(tmp_path / "k.safetensors", {"lora_unet_proj": ((16,), (24,)), "lora_unet_conv3": ((8, 3, 3), (6, 1, 1))},
                      rank=4, alpha=2.0, dtype=dtype)
    out = tmp_path / "merged.safetensors"
    text = run("merge", f"{lora}:0.8", "--into", base, "-o", out, "--no-record").output
    assert "2 tensors merged" in text
    bound = check.bind(formats.read_adapter(lora), load_file(base))
    merged, original = load_file(out), load_file(base)
    for module in bound.modules.values():
        expected = original[module.weight_name].double() + 0.8 * module.delta(dtype=torch.float64)
        assert torch.allclose(merged[module.weight_name].double(), expected, atol=1e-5)
    assert torch.equal(merged["embed.weight"], original["embed.weight"])


@pytest.mark.registry_backend
def test_a_registry_that_cannot_be_used_stops_the_merge_before_writing(tmp_path, models):
    from sqlalchemy import text

    from loraops.errors import RegistryError
    from loraops.registry import Registry

    base, a, _ = models
    with Registry.open() as reg, reg.engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    result = run("merge", a, "--into", base, "-o", tmp_path / "out", code=RegistryError.exit_code)
    assert "newer loraops" in result.output and not (tmp_path / "out").exists()



def test_the_streamed_model_is_prefetched_before_the_registry_opens_and_stopped_after(tmp_path, models, monkeypatch):
    from loraops import basemodel, registry

    base, a, _ = models
    events, prefetchers = [], []

    class Spy(basemodel.Prefetcher):
        def __init__(self, files, budget=None):
            super().__init__(files, budget)
            events.append("prefetch")
            prefetchers.append((files, self))

    real_open = registry.Registry.open.__func__
    monkeypatch.setattr(basemodel, "Prefetcher", Spy)
    monkeypatch.setattr(registry.Registry, "open", classmethod(lambda cls, *a, **k: events.append("registry")
                                                               or real_open(cls, *a, **k)))
    run("merge", a, "--into", base, "-o", tmp_path / "m")
    run("subtract", a, "--from", "m", "-o", tmp_path / "s")  # by name: the registry first, then the model it names
    run("subtract", a, "--from", tmp_path / "m", "-o", tmp_path / "x", "--exact")  # reads the recorded base only
    assert events == ["prefetch", "registry", "registry", "prefetch", "registry"]
    streamed = [sorted(p.name for p in files) for files, _ in prefetchers]
    assert streamed == [sorted(p.name for p in base.glob("*.safetensors"))] * 2
    assert [files[0].parent for files, _ in prefetchers] == [base, tmp_path / "m"]
    assert all(p._stop.is_set() for _, p in prefetchers)


def test_outputs_that_would_destroy_an_input_or_the_store_are_refused_even_with_force(tmp_path, models):
    """-o on the base it reads (or a folder holding it, or inside it) would replace the weights being read and
    leave the registry's fingerprint of them false; -o in the blob store would corrupt a stored adapter."""
    import shutil

    from loraops.registry import Registry

    base, a, _ = models
    mine = tmp_path / "models" / "base"
    shutil.copytree(base, mine)
    before = tensors(mine)
    for out in (mine, mine.parent, mine / "merged"):
        result = run("merge", a, "--into", mine, "-o", out, "--force", code=2)
        assert "overlaps the model it reads" in result.output and len(result.output.splitlines()) == 1
    assert all(torch.equal(t, before[n]) for n, t in tensors(mine).items())
    run("register", a, "--name", "a")
    with Registry.open() as reg:
        stored = reg.get_adapter("a").path
        store = reg.blobs.root
    result = run("export", "a", "--format", "kohya", "-o", stored, "--force", code=2)
    assert "overlaps the registry's blob store" in result.output
    run("merge", "a", "--into", mine, "-o", store / "x", code=2)
    result = run("merge", a, "--into", mine, "-o", stored, "--force", "--no-record", code=2)  # no registry opened
    assert "overlaps the registry's blob store" in result.output
    run("verify")


def test_subtract_to_another_dtype_reports_the_residual_by_value(tmp_path, models):
    """subtract --dtype fp32 from a bf16 merge: the residual against the bf16 base is taken by value (it was refused
    as 'cannot serve as the pristine base' because the dtypes differ)."""
    base, a, _ = models
    run("merge", a, "--into", base, "-o", tmp_path / "m", "--device", "cpu")
    report = json.loads(run("subtract", a, "--from", tmp_path / "m", "-o", tmp_path / "s", "--dtype", "fp32",
                            "--json").output)
    residual = report["residual"]
    assert residual["compared_to"] == str(base) and report["dtype"] == "float32"
    back, original = tensors(tmp_path / "s"), tensors(base)
    assert residual["max_abs_diff"] == max(float((back[n].double() - original[n].double()).abs().max()) for n in back)
    assert 0 < residual["max_abs_diff"] < 0.01


@pytest.mark.registry_backend
def test_no_record_still_resolves_registry_references(tmp_path, models):
    """--no-record writes nothing to the registry, but REF and --into/--from may still name registry entries."""
    from loraops.registry import Registry

    base, a, _ = models
    run("base", "add", base, "--name", "llama")
    run("register", a, "--name", "style")
    with Registry.open() as reg:
        before = (len(reg.list_bases()), len(reg.list_adapters()))
    run("merge", "style:0.5", "--into", "llama", "-o", tmp_path / "m", "--no-record", "--device", "cpu")
    run("subtract", "style:0.5", "--from", tmp_path / "m", "-o", tmp_path / "s", "--no-record")
    expected = tensors(tmp_path / "m")
    run("merge", f"{a}:0.5", "--into", base, "-o", tmp_path / "paths", "--no-record", "--device", "cpu")
    assert all(torch.equal(t, expected[n]) for n, t in tensors(tmp_path / "paths").items())
    with Registry.open() as reg:
        assert (len(reg.list_bases()), len(reg.list_adapters())) == before


@pytest.mark.registry_backend
def test_a_registered_adapter_is_named_by_its_reference_in_errors(tmp_path, models):
    base, a, _ = models
    other = tiny_llama(tmp_path / "wide", hidden=32, intermediate=64, dtype=torch.bfloat16)
    run("register", a, "--name", "style")
    result = run("merge", "style", "--into", other, "-o", tmp_path / "x", "--no-record", code=2)
    assert result.output.startswith("error: style@1: ") and "do not fit" in result.output, result.output


def test_other_copies_of_the_weights_are_left_out(tmp_path, models):
    """A folder with an index's shards and also a model.safetensors / pytorch_model.bin: model.safetensors is merged
    (transformers reads it before the index), so the other copies, which still hold the base, are not copied — and
    the summary says so."""
    import shutil

    from safetensors.torch import load_file, save_file

    base, a, _ = models
    folder = tmp_path / "base"
    shutil.copytree(base, folder)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert shards
    save_file({n: t for shard in shards for n, t in load_file(str(folder / shard)).items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "pytorch_model.bin").write_bytes(b"stale pickle")
    (folder / "notes.txt").write_text("kept")
    (folder / "mm_projector.bin").write_bytes(b"another module's weights")
    (folder / "2_Dense").mkdir()
    (folder / "2_Dense" / "model.safetensors").write_bytes(b"a sentence-transformers layer")
    out = tmp_path / "out"
    result = run("merge", a, "--into", folder, "-o", out, "--no-record", "--device", "cpu")
    copies = ", ".join([*shards, "model.safetensors.index.json", "pytorch_model.bin"])
    assert f"left out {copies}: other copies of the base's weights, not merged" in result.output, result.output
    assert not any(out.glob("model-*")) and not (out / "pytorch_model.bin").exists()
    assert (out / "notes.txt").read_text() == "kept" and (out / "model.safetensors").exists()
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / "mm_projector.bin").exists() and (out / "2_Dense" / "model.safetensors").exists()


def test_check_and_merge_say_a_tied_head_is_written_untied(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)).save_pretrained(tmp_path / "base")
    adapter = peft_adapter(tmp_path / "base", tmp_path / "a", target_modules=["q_proj", "lm_head"])
    assert run("check", adapter, "--base", tmp_path / "base").output.splitlines()[1:] == [
TIED_HEAD_LINE]
    out = run("merge", adapter, "--into", tmp_path / "base", "-o", tmp_path / "out", "--no-record").output
    assert out.splitlines()[1] == UNTIED
    assert "lm_head.weight" in tensors(tmp_path / "out")


TIED_HEAD_LINE = (
    "  lm_head: tied to the input embeddings in this base (not stored, or stored as a copy of them); a merge writes it "
    "untied (an encoder-decoder model's only where loraops unties it: T5's, UMT5's, LongT5's, Pop2Piano's, mT5's, "
    "BART's, mBART's, PLBart's, Pegasus's, Marian's, Blenderbot's, Blenderbot-small's, M2M-100's, LED's, "
    "BigBird-Pegasus's, Whisper's and FSMT's; a T5-family one's inside BLIP-2 or InstructBLIP too)")
UNTIED = ("untied lm_head.weight from the input embeddings (the adapters change one without the other): written as "
          "its own tensor, config.json says tie_word_embeddings: false")


def test_check_and_merge_say_an_embeddings_lora_unties_the_head(tmp_path):
    """A LoRA on a tied model's embeddings alone: PEFT's head reads the base weight, so the merge unties it."""
    base = tiny_llama(tmp_path / "base", tie=True)
    adapter = peft_adapter(base, tmp_path / "a", target_modules=["embed_tokens"])
    assert run("check", adapter, "--base", base).output.splitlines()[1:] == [
TIED_HEAD_LINE]
    out = run("merge", adapter, "--into", base, "-o", tmp_path / "out", "--no-record").output
    assert out.splitlines()[1] == UNTIED


@pytest.mark.registry_backend
def test_an_output_through_dotdot_creates_nothing_else_and_is_recorded(tmp_path, models):
    """`-o a/../b` (a missing): b is written and recorded, no folder a appears (merge and combine alike)."""
    base, a, _ = models
    run("merge", a, "--into", base, "-o", tmp_path / "a" / ".." / "merged", "--device", "cpu")
    run("combine", a, a, "--method", "cat", "--name", "twice", "-o", tmp_path / "x" / ".." / "twice")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "twice"]
    assert run("base", "show", "merged", "--json").output.count(str(tmp_path / "merged")) == 2  # source and path


def test_not_enough_disk_is_refused_before_any_adapter_is_loaded(tmp_path, models, monkeypatch):
    """A 70B model's adapters can take GBs and tens of seconds to load: the space check comes first."""
    import shutil
    from collections import namedtuple

    from loraops import merging

    base, a, _ = models
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("Usage", "total used free")(10**9, 10**9 - 1000, 1000))

    def never(*args):
        raise AssertionError("an adapter was loaded")

    monkeypatch.setattr(merging, "resolve_adapter", never)
    for command in (["merge", a, "--into", base], ["subtract", a, "--from", base]):
        assert "not enough free disk" in run(*command, "-o", tmp_path / "out", "--no-record", code=5).output


@pytest.mark.registry_backend
def test_a_registered_base_whose_files_changed_is_said_to_have_changed(tmp_path, models):
    """The merge reads the files as they are now and records them by their own fingerprint (the lineage stays
    true); the note says the registered base named is not what was read."""
    import shutil

    base = shutil.copytree(models[0], tmp_path / "base")
    run("base", "add", base, "--name", "llama")
    unchanged = run("merge", models[1], "--into", "llama", "-o", tmp_path / "m1").output
    assert "note:" not in unchanged
    shard = sorted(base.glob("*.safetensors"))[0]
    state = load_file(shard)
    name = next(n for n, t in state.items() if t.dim() == 2)
    state[name] = state[name] + 1
    from safetensors.torch import save_file

    save_file(state, str(shard), metadata={"format": "pt"})
    out = run("merge", models[1], "--into", "llama", "-o", tmp_path / "m2").output
    assert ("note: the files of registered base llama changed since it was registered; what was read is recorded as "
            "a base of its own (by its fingerprint), and the lineage names it") in out
    assert "lineage      merge(llama, " in run("base", "show", "m1").output
    assert "lineage      merge(base, " in run("base", "show", "m2").output  # the changed files, recorded anew



@pytest.mark.parametrize("command", ["merge", "subtract"])
@pytest.mark.registry_backend
def test_a_registered_base_whose_files_now_hold_another_moved_base_is_said_to_have_changed(tmp_path, models, command):
    """The files of registered base llama replaced by those of another registered base whose own folder is gone
    (moved over llama's): the command reads that other base (found by fingerprint, given llama's path), and llama's
    files changed since it was registered, which merge said before merging.record_read and then no longer did."""
    import shutil

    from safetensors.torch import save_file

    base = shutil.copytree(models[0], tmp_path / "base")
    other = shutil.copytree(models[0], tmp_path / "other")
    shard = sorted(other.glob("*.safetensors"))[0]
    state = load_file(shard)
    name = next(n for n, t in state.items() if t.dim() == 2)
    save_file({**state, name: state[name] + 1}, str(shard), metadata={"format": "pt"})
    run("base", "add", base, "--name", "llama")
    run("base", "add", other, "--name", "other")
    shutil.rmtree(base)
    other.rename(base)
    into = "--into" if command == "merge" else "--from"
    out = run(command, models[1], into, "llama", "-o", tmp_path / "out").output
    assert ("note: the files of registered base llama changed since it was registered; what was read is recorded as "
            "a base of its own (by its fingerprint), and the lineage names it") in out, out
    assert f"lineage      {command}(other, " in run("base", "show", "out").output


def test_check_against_a_base_that_is_a_fifo_is_one_line(tmp_path, models):
    """check --base PATH on a path that exists but is no file or folder (a FIFO): one error line naming it, exit 2
    (it said only "<path>: Not a directory")."""
    import os

    _, adapter, _ = models
    os.mkfifo(tmp_path / "pipe")
    result = run("check", adapter, "--base", tmp_path / "pipe", code=2)
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'pipe'}: neither a file nor a folder (a FIFO, a socket or a device), not a base model"]


def test_an_adapter_given_as_the_base_is_said_to_be_one(tmp_path, models):
    """An adapter where a base goes (arguments swapped: `merge BASE --into ADAPTER`, `check A --base B`): one line
    saying so, as `base add` says it. Its adapter_model.safetensors was read as the base's weights, and the error was
    "6 modules do not fit base …", as if the base were a wrong model."""
    base, a, b = models
    kohya = kohya_file(tmp_path / "k.safetensors", {"lora_unet_proj": ((16,), (24,))})
    for adapter_as_base in (b, kohya):
        said = f"error: {adapter_as_base}: this is a LoRA adapter, not a base model\n"
        assert run("merge", a, "--into", adapter_as_base, "-o", tmp_path / "o", "--no-record", code=2).output == said
        assert run("check", a, "--base", adapter_as_base, code=2).output == said
        assert run("extract", "--base", base, "--tuned", adapter_as_base, "--rank", 2, code=2).output == said
    assert not (tmp_path / "o").exists()


def test_a_model_folder_that_keeps_an_adapter_beside_its_weights_is_a_base(tmp_path, models):
    """A merged model uploaded with the adapter it was made from left beside its weights (adapter_config.json,
    adapter_model.safetensors next to model-0000x-of-0000y.safetensors) is a base: its weights are the model's. The
    adapter check refused it as an adapter by its file names alone, where merge and check had read it."""
    import shutil

    base, a, b = models
    kept = tmp_path / "merged-upload"
    shutil.copytree(base, kept)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(b / name, kept / name)
    run("check", a, "--base", kept)
    run("merge", a, "--into", kept, "-o", tmp_path / "kept", "--no-record")
    run("merge", a, "--into", base, "-o", tmp_path / "plain", "--no-record")
    (tmp_path / "kept" / "adapter_model.safetensors").unlink()  # (copied with the model's other files)
    kept, plain = tensors(tmp_path / "kept"), tensors(tmp_path / "plain")
    assert kept.keys() == plain.keys() and all(torch.equal(kept[k], v) for k, v in plain.items())


@pytest.mark.registry_backend
def test_exact_refuses_a_base_file_rewritten_with_its_mtime_put_back(tmp_path, models):
    """The digest cache took a base file of the same size and mtime as unchanged: one rewritten with its mtime set
    back was copied by --exact as the pristine base ("restored bit for bit") and recorded by the old fingerprint."""
    import os
    import shutil

    base = shutil.copytree(models[0], tmp_path / "base")
    run("merge", models[1], "--into", base, "-o", tmp_path / "m")
    shard = sorted(base.glob("*.safetensors"))[-1]
    before, data = shard.stat(), bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    result = run("subtract", models[1], "--from", tmp_path / "m", "-o", tmp_path / "r", "--exact", code=3)
    assert "whose files are not available unchanged" in result.output and not (tmp_path / "r").exists()


@pytest.mark.registry_backend
def test_exact_finds_the_recorded_base_added_again_under_another_name(tmp_path, models):
    """--exact looked the recorded base up by name: removed and added again as another name (the same fingerprint),
    it said the base's files were not available."""
    base, a, _ = models
    run("base", "add", base, "--name", "llama")
    run("merge", f"{a}:0.7", "--into", "llama", "-o", tmp_path / "m")
    run("base", "rm", "llama", "--force")
    run("base", "add", base, "--name", "llama-again")
    run("subtract", f"{a}:0.7", "--from", tmp_path / "m", "-o", tmp_path / "r", "--exact")
    for f in base.glob("*.safetensors"):
        assert (tmp_path / "r" / f.name).read_bytes() == f.read_bytes()


@pytest.mark.parametrize("given", [["--dtype", "fp32"], ["--precise"]])
def test_exact_refuses_dtype_and_precise_it_would_ignore(tmp_path, models, given):
    """--exact restores the recorded base, or re-merges with the merge's own dtype and precision: `--exact --dtype
    fp32` of a bf16 merge wrote bf16, silently."""
    base, a, _ = models
    run("merge", a, "--into", base, "-o", tmp_path / "m")
    result = run("subtract", a, "--from", tmp_path / "m", "-o", tmp_path / "r", "--exact", *given, code=2)
    assert result.output.startswith(f"error: {given[0]} cannot be given with --exact: ")
    assert len(result.output.splitlines()) == 1 and not (tmp_path / "r").exists()
    from loraops import merging

    key = given[0].removeprefix("--")  # the library says its parameters by their Python names
    with pytest.raises(InvalidInputError, match=f"^{key} cannot be given with exact: "):
        merging.subtract(tmp_path / "m", [a], tmp_path / "r", exact=True, **{key: given[1] if given[1:] else True})
    with pytest.raises(InvalidInputError, match="^no adapter to merge: give at least one, or dtype to convert"):
        merging.merge(base, [], tmp_path / "r")


@pytest.mark.registry_backend
def test_subtracting_what_a_recorded_merge_did_not_add_says_so(tmp_path, models):
    """a:0.7 merged, a (at 1) or b subtracted: plain arithmetic as before, with a note that the recorded merge did not
    add that (the residual's "no pristine base" said nothing of it)."""
    base, a, b = models
    run("merge", f"{a}:0.7", "--into", base, "-o", tmp_path / "m")
    for i, (refs, stray) in enumerate([([a], f"{a}:1"), ([f"{a}:0.7", b], f"{b}:1")]):
        out = run("subtract", *refs, "--from", tmp_path / "m", "-o", tmp_path / f"r{i}").output
        assert (f"note: {stray} is not one of the adapters {tmp_path / 'm'} was merged with ({a}:0.7), so what comes "
                "off is not what that merge added") in out
    assert "note:" not in run("subtract", f"{a}:0.7", "--from", tmp_path / "m", "-o", tmp_path / "r2").output


@pytest.mark.registry_backend
def test_exact_on_a_merge_of_a_merge_restores_one_level_at_a_time_and_says_so(tmp_path, models):
    """--exact matches the adapters of the model's own merge: one merged into the model it was merged onto is refused
    naming that merge and how to get there (it named only the top merge's adapters); the two steps give the base."""
    base, a, b = models
    run("merge", f"{a}:0.7", "--into", base, "-o", tmp_path / "m1")
    run("merge", b, "--into", tmp_path / "m1", "-o", tmp_path / "m2")
    assert "lineage      merge(m1, b@1×1)" in run("base", "show", "m2").output
    result = run("subtract", f"{a}:0.7", b, "--from", tmp_path / "m2", "-o", tmp_path / "r", "--exact", code=2)
    assert result.output == (f"error: --exact: {a}:0.7 is not one of the adapters {tmp_path / 'm2'} was merged with "
                             f"({b}:1); its base m1 is itself a merge ({a}:0.7): take {tmp_path / 'm2'}'s adapters off "
                             "with --exact first, then m1's from that\n")
    run("subtract", b, "--from", tmp_path / "m2", "-o", tmp_path / "r1", "--exact")
    run("subtract", f"{a}:0.7", "--from", tmp_path / "r1", "-o", tmp_path / "r2", "--exact")
    for f in base.glob("*.safetensors"):
        assert (tmp_path / "r2" / f.name).read_bytes() == f.read_bytes()


@pytest.mark.registry_backend
def test_an_exact_re_merge_is_recorded_as_the_merge_it_is(tmp_path, models):
    """--exact taking a off merge(base, a, b) writes merge(base, b) bit for bit, and records it so (it recorded
    "subtract(m)" with no adapters, so a later --exact on it found no merge to undo)."""
    base, a, b = models
    run("merge", f"{a}:0.7", b, "--into", base, "-o", tmp_path / "m")
    run("subtract", f"{a}:0.7", "--from", tmp_path / "m", "-o", tmp_path / "only-b", "--exact")
    assert "lineage      merge(base, b@1×1)" in run("base", "show", "only-b").output
    run("subtract", b, "--from", tmp_path / "only-b", "-o", tmp_path / "back", "--exact")
    for f in base.glob("*.safetensors"):
        assert (tmp_path / "back" / f.name).read_bytes() == f.read_bytes()


@pytest.mark.parametrize("where", ["before it is recorded", "as click returns"])
def test_a_ctrl_c_once_an_exact_restore_of_a_registered_base_landed_says_so(tmp_path, models, monkeypatch, capsys,
                                                                             where):
    """`subtract --exact` taking every adapter off writes the recorded base's weights, which stay recorded as that
    base (not registered again): a Ctrl-C once they landed said they were not recorded yet, and that `loraops base
    add OUT` would record them (it says "already registered" of them)."""
    from factories import interrupted_once_returned
    from loraops import merging
    from loraops.cli import exit_status

    base, a, _ = models
    run("merge", f"{a}:0.7", "--into", base, "-o", tmp_path / "m")
    if where == "before it is recorded":
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(merging, "_record", interrupted)
    else:
        interrupted_once_returned(monkeypatch, "subtract")
    out = tmp_path / "restored"
    capsys.readouterr()
    assert exit_status(["subtract", f"{a}:0.7", "--from", str(tmp_path / "m"), "-o", str(out), "--exact"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: interrupted after {out} was written in full; it holds "
                                                        "the same weights as the registered base base: not registered "
                                                        "again")
    assert [r["name"] for r in json.loads(run("base", "list", "--json").output)] == ["base", "m"]


@pytest.mark.registry_backend
def test_an_exact_restore_names_adapters_as_the_merge_did_and_says_what_is_registered(tmp_path, models):
    """--exact's summary named an adapter that stays by the reference its identity found (`b@1:1`, merged as a
    path), and a restore of the recorded base itself said "recorded as base base", though the output is not the one
    recorded (the registered base's record stands, at its own files)."""
    base, a, b = models
    merged = run("merge", f"{a}:0.7", b, "--into", base, "-o", tmp_path / "m").output
    assert merged.startswith(f"merged {a}:0.7, {b}:1 → ")
    lines = run("subtract", f"{a}:0.7", "--from", tmp_path / "m", "-o", tmp_path / "only-b", "--exact").output
    lines = lines.splitlines()
    assert lines[0].startswith(f"restored {base} + {b}:1 → {tmp_path / 'only-b'}: ")
    assert lines[-1].startswith("recorded as base only-b (fingerprint ")
    fingerprint = json.loads(run("base", "show", "base", "--json").output)["fingerprint"]
    restored = (f"holds the same weights as the registered base base (fingerprint {fingerprint[:12]}): "
                "not registered again")
    back = run("subtract", b, "--from", tmp_path / "only-b", "-o", tmp_path / "back", "--exact").output.splitlines()
    assert back[-1] == f"{tmp_path / 'back'} {restored}"
    named = run("subtract", b, "--from", tmp_path / "only-b", "-o", tmp_path / "named", "--exact", "--name", "mine")
    assert named.output.splitlines()[-1] == (f"{tmp_path / 'named'} {restored} as 'mine' (one record per model, "
                                             "under its first name)")
    report = run("subtract", b, "--from", tmp_path / "only-b", "-o", tmp_path / "j", "--exact", "--json").output
    report = json.loads(report)
    assert report["already_registered"] is True and report["name"] == "base"
    assert [r["name"] for r in json.loads(run("base", "list", "--json").output)] == ["base", "m", "only-b"]
