"""Outputs over what the registry describes: a registered base's files are refused as outputs (equal, holding them, or inside them), even with --force, for every command that writes one; nothing is
written and the record still matches its files."""
from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from factories import peft_adapter, tiny_llama
from loraops.cli import main

pytestmark = pytest.mark.registry_backend  # the registry's own code: run on PostgreSQL too (conftest.py)


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


@pytest.fixture
def registered(tmp_path):
    base = tiny_llama(tmp_path / "llama-tiny")
    other = shutil.copytree(base, tmp_path / "other")
    adapter = peft_adapter(base, tmp_path / "style", r=4)
    run("base", "add", base, "--name", "llama-tiny")
    run("register", adapter, "--name", "style", "--base", "llama-tiny")
    return base, other, adapter


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("args", [
    ["merge", "style", "--into", "{other}", "-o", "{base}", "--force"],
    ["merge", "style", "--into", "{other}", "-o", "{base}", "--force", "--no-record"],  # no registry opened for it
    ["merge", "style", "--into", "{other}", "-o", "{base}/sub"],
    ["merge", "style", "--into", "{other}", "-o", "{holder}", "--force", "--no-record"],  # holds the base
    ["subtract", "style", "--from", "{other}", "-o", "{base}", "--force"],
    ["resize", "style", "--rank", "2", "-o", "{base}/r"],
    ["combine", "style", "style", "--method", "cat", "-o", "{base}/c"],
    ["export", "style", "--format", "kohya", "-o", "{base}/x.safetensors"],
    ["merge", "style", "--into", "{other}", "-o", "{link}", "--force"],  # through a symlink
])
def test_outputs_over_a_registered_base_are_refused(tmp_path, registered, args):
    base, other, _ = registered
    (tmp_path / "link").symlink_to(base)
    before = snapshot(base)
    argv = [a.format(base=base, other=other, link=tmp_path / "link", holder=base.parent) for a in args]
    result = run(*argv, code=2)
    assert result.output.startswith(f"error: {argv[argv.index('-o') + 1]}: overlaps registered base llama-tiny (")
    assert result.output.rstrip().endswith("; write the output elsewhere, or forget the base first with `loraops base rm`")
    assert len(result.output.splitlines()) == 1
    assert snapshot(base) == before
    assert "fits" in run("check", "style", "--base", "llama-tiny").output


def test_an_output_over_a_registered_adapters_source_is_allowed_with_force(tmp_path, registered):
    """The registry reads an adapter's stored copy, never its recorded source: replacing the source with --force
    leaves every record true."""
    adapter = registered[2]
    run("combine", "style", "style", "--method", "cat", "-o", adapter, "--force")
    assert "fits" in run("check", "style", "--base", "llama-tiny").output
    assert run("verify").exit_code == 0


def test_a_registry_server_that_is_down_does_not_stop_a_merge_that_records_nothing(tmp_path, registered, monkeypatch):
    base, other, adapter = registered
    monkeypatch.setenv("LORAOPS_DB", "postgresql+psycopg://nobody@127.0.0.1:9/none")
    run("merge", adapter, "--into", other, "-o", tmp_path / "out", "--no-record")
    assert (tmp_path / "out" / "config.json").exists()


def test_a_base_whose_folder_is_gone_is_no_obstacle(tmp_path, registered):
    base, other, _ = registered
    shutil.rmtree(base)
    run("merge", "style", "--into", other, "-o", base, "--no-record")
    assert (base / "config.json").exists()


@pytest.mark.parametrize("args, says", [
    (["merge", "style", "--into", "{base}", "-o", "{out}/x.safetensors"],
     "the output of merging into the folder model llama-tiny is a folder, not one .safetensors file; give a folder name"),
    (["merge", "nope", "--into", "{base}", "-o", "{out}/x.SafeTensors/", "--no-record"],  # before the adapters
     "the output of merging into the folder model llama-tiny is a folder, not one .safetensors file; give a folder name"),
    (["subtract", "style", "--from", "{base}", "-o", "{out}/x.safetensors"],
     "the output of subtracting from the folder model llama-tiny is a folder, not one .safetensors file; give a "
     "folder name"),
    (["subtract", "style", "--from", "{base}", "-o", "{out}/x.safetensors", "--exact"],
     "the output of restoring the folder model llama-tiny is a folder, not one .safetensors file; give a folder name"),
    (["merge", "--dtype", "bf16", "--into", "{single}", "-o", "{out}/folder/"],
     "the output of merging into the single-file model single.safetensors is one file, not a folder; give a file "
     "name (…/name.safetensors)"),
    (["merge", "--dtype", "bf16", "--into", "{single}", "-o", "{out}/folder/.", "--no-record"],
     "the output of merging into the single-file model single.safetensors is one file, not a folder; give a file "
     "name (…/name.safetensors)"),
    (["export", "style", "--format", "kohya", "-o", "{out}/folder/"],  # export's rule, the same one
     "a kohya adapter is one file, not a folder; give a file name (…/name.safetensors), or --format peft for a folder"),
    (["export", "style", "--format", "peft", "-o", "{out}/x.safetensors"],
     "a peft adapter is a folder, not one .safetensors file; give a folder name, or --format kohya/diffusers for one "
     ".safetensors file"),
])
def test_an_output_named_as_the_other_kind_is_refused_before_anything_is_read(tmp_path, registered, monkeypatch, args,
                                                                               says):
    """`merge --into FOLDER -o x.safetensors` wrote a folder named x.safetensors, and a single-file model's output
    given as `-o folder/` a file named folder: refused in one line as `export` refused a PEFT folder named
    *.safetensors (one rule, fsutil.refuse_misnamed_output), before the model is read (no prefetch) or an adapter
    loaded."""
    import torch

    from loraops import st
    from loraops.basemodel import BaseModel

    base, _, _ = registered
    single = tmp_path / "single.safetensors"
    st.write_safetensors(single, {"q.weight": torch.zeros(4, 4)})
    out = tmp_path / "out"
    out.mkdir()

    def no_reading(self):
        raise AssertionError("the model was read before the output's name was checked")

    monkeypatch.setattr(BaseModel, "prefetch", no_reading)
    argv = [a.format(base=base, single=single, out=out) for a in args]
    result = run(*argv, code=2)
    assert result.output == f"error: {argv[argv.index('-o') + 1]}: {says}\n"
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["combine", "style", "{adapter}", "-o", "{out}/x.safetensors"],
    ["resize", "{adapter}", "--rank", "2", "-o", "{out}/x.safetensors"],
    ["resize", "style", "--rank", "2", "-o", "{out}/x.safetensors"],
])
def test_an_output_named_as_the_inputs_layout_does_not_write_is_refused_before_they_are_read(
        tmp_path, registered, monkeypatch, args):
    """Without --format, combine and resize write their inputs' layout, and checked the output's name against it only
    once the inputs were registered (hashed) and loaded: a layout known from a path's file names or a record is
    checked first, as a --format given."""
    from loraops.registry.store import Registry

    _, _, adapter = registered
    out = tmp_path / "out"
    out.mkdir()

    def no_reading(*_args, **_kwargs):
        raise AssertionError("an input was read before the output's name was checked")

    for name in ("register_adapter", "load_adapter"):
        monkeypatch.setattr(Registry, name, no_reading)
    argv = [a.format(adapter=adapter, out=out) for a in args]
    result = run(*argv, code=2)
    assert result.output == (f"error: {out}/x.safetensors: a peft adapter is a folder, not one .safetensors file; "
                             "give a folder name, or --format kohya/diffusers for one .safetensors file\n")
    assert list(out.iterdir()) == []


def test_the_engine_refuses_a_misnamed_output_too(tmp_path):
    """Library callers of engine.merge/subtract get the same rule as the commands."""
    import torch

    from loraops import engine, st
    from loraops.errors import InvalidInputError

    single = tmp_path / "single.safetensors"
    st.write_safetensors(single, {"q.weight": torch.zeros(4, 4)})
    base = tiny_llama(tmp_path / "llama-tiny")
    with pytest.raises(InvalidInputError, match=r"/folder/: the output of merging into the single-file model"):
        engine.merge(single, [], f"{tmp_path}/folder/", dtype="bf16")
    with pytest.raises(InvalidInputError, match=r"x.safetensors: the output of subtracting from the folder model"):
        engine.subtract(base, [], tmp_path / "x.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-tiny", "single.safetensors"]


def test_a_registered_bases_kind_is_known_from_its_record(tmp_path):
    """A registered base's output is judged by the base's kind as recorded (Registry.base_is_single_file, before its
    files are opened): a single-file base takes `-o x.safetensors` and refuses `-o folder/`, naming the base as
    registered; one whose file is gone says so, whatever the output's name."""
    import torch

    from loraops import st

    single = tmp_path / "single.safetensors"
    st.write_safetensors(single, {"q.weight": torch.zeros(4, 4)})
    run("base", "add", single, "--name", "one")
    run("merge", "--dtype", "bf16", "--into", "one", "-o", tmp_path / "out.safetensors", "--no-record")
    assert (tmp_path / "out.safetensors").is_file()
    refused = run("merge", "--dtype", "bf16", "--into", "one", "-o", f"{tmp_path}/folder/", code=2)
    assert refused.output == (f"error: {tmp_path}/folder/: the output of merging into the single-file model one is one "
                              "file, not a folder; give a file name (…/name.safetensors)\n")
    single.unlink()
    gone = run("merge", "--dtype", "bf16", "--into", "one", "-o", tmp_path / "x.safetensors", code=3)
    assert gone.output == f"error: base 'one': its files are no longer at {single}; `loraops base add` them again\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_a_single_file_model_named_sft_takes_an_output_named_sft(tmp_path):
    """A single-file base named .sft (early FLUX releases; ComfyUI lists .sft) is read as a base, but its merge and
    subtract outputs had to end in .safetensors: an output may end in the base file's own suffix too (one rule,
    fsutil.refuse_misnamed_output), for a base given by path or registered; any other name is still refused."""
    import torch

    from loraops import st

    flux = tmp_path / "flux.sft"
    st.write_safetensors(flux, {"q.weight": torch.ones(4, 4)})
    run("base", "add", flux, "--name", "fx")
    run("merge", "--dtype", "bf16", "--into", flux, "-o", tmp_path / "out.sft")  # (recorded: a derived base)
    assert st.read_header(tmp_path / "out.sft").tensors.keys() == {"q.weight"}
    run("merge", "--dtype", "fp16", "--into", "fx", "-o", tmp_path / "back.SFT", "--no-record")
    assert (tmp_path / "back.SFT").is_file()
    result = run("subtract", "style", "--from", "fx", "-o", tmp_path / "out.ckpt", "--no-record", code=2)
    assert result.output == (f"error: {tmp_path}/out.ckpt: the output of subtracting from the single-file model fx is "
                             "one .safetensors file; give a name ending in .safetensors or .sft\n")
    single = tmp_path / "single.safetensors"
    st.write_safetensors(single, {"q.weight": torch.ones(4, 4)})
    assert run("merge", "--dtype", "fp16", "--into", single, "-o", tmp_path / "x.sft", code=2).output.endswith(
        "give a name ending in .safetensors\n")
    # a safetensors file named as a pickle is read as a base, but its output is not named as one (torch.load's)
    named_bin = tmp_path / "model.bin"
    st.write_safetensors(named_bin, {"q.weight": torch.ones(4, 4)})
    assert run("merge", "--dtype", "fp16", "--into", named_bin, "-o", tmp_path / "x.bin", code=2).output.endswith(
        "give a name ending in .safetensors\n")
    assert not (tmp_path / "x.bin").exists()


def test_a_merge_that_records_nothing_is_refused_over_a_server_registrys_base_without_its_blob_folder(
        tmp_path, registered, monkeypatch):
    """A server registry is refused without LORAOPS_BLOBS (test_team), but reading its bases' paths needs no blob
    store: that refusal made `merge --no-record --force` skip the check and overwrite a registered base's files."""
    import os

    if not os.environ.get("LORAOPS_DB"):
        pytest.skip("a server registry's")
    base, other, adapter = registered
    monkeypatch.delenv("LORAOPS_BLOBS")
    before = snapshot(base)
    result = run("merge", adapter, "--into", other, "-o", base, "--force", "--no-record", code=2)
    assert "overlaps registered base llama-tiny" in result.output
    assert snapshot(base) == before
