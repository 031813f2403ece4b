"""Base folders a user hands loraops as they lie: a patch index beside an unreadable shard, stale copies below the
model's folder, a Hugging Face cache snapshot of symlinks (docs/readme-bases7.md)."""
import json
import re
from pathlib import Path

import pytest

from loraops.basemodel import BaseModel
from loraops.errors import FormatError, NotFoundError
from tests.factories import peft_adapter
from tests.test_basemodel import _patched_model


@pytest.mark.parametrize("spoil", ["truncated", "no permission", "dangling link"])
def test_an_unreadable_shard_a_patch_index_leaves_out_is_refused_saying_why_it_was_read(tmp_path, monkeypatch, spoil):
    """The original shard beside a patch index that does not list it is read (its header) to tell a replaced shard
    from a left-out one; where it could not be, the file system's or the header's own error was all the user saw (or,
    without read permission, for root, nothing: it was read anyway). One line now, naming the index, the file, why
    it was read and what to do, from base add, check and merge; the same on the Hub."""
    from click.testing import CliRunner

    from loraops import hub
    from loraops.cli import main

    folder, last, _ = _patched_model(tmp_path)
    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["q_proj"])
    shard = folder / last
    if spoil == "truncated":
        shard.write_bytes(shard.read_bytes()[:50])
        reason = f"{shard}: truncated or not a safetensors file"
    elif spoil == "dangling link":
        shard.unlink()
        shard.symlink_to(tmp_path / "blobs" / "gone")  # (an HF cache snapshot whose blob was deleted)
        reason = f"{shard}: no such file"
    else:
        def refuse(file, *args, **kwargs):
            if Path(file) == shard:
                raise PermissionError(13, "Permission denied", str(file))
            return open(file, *args, **kwargs)

        monkeypatch.setattr("loraops.st.open", refuse, raising=False)  # (root reads a chmod 000 file)
        reason = f"{shard}: Permission denied"
    says = (f"{folder}/patch/model.safetensors.index.json: does not list {last}, a shard of its set in the model's "
            f"folder, whose header loraops reads to see whether the index lists all its tensors elsewhere (a shard it "
            f"replaces), and it cannot be read ({reason}")
    for args in (["base", "add", str(folder)], ["check", str(adapter), "--base", str(folder)],
                 ["merge", str(adapter), "--into", str(folder), "-o", str(tmp_path / "out"), "--no-record"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert line.startswith(f"error: {says}") and line.endswith(": remove the file, or list it in the index")
        assert "\n" not in line
    assert not (tmp_path / "out").exists()
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    read = lambda n: json.loads((folder / n).read_text())  # noqa: E731
    with pytest.raises(FormatError, match=re.escape(f"patch/model.safetensors.index.json: does not list {last}, a shard")):
        hub.weight_layout(names, read, read_header=lambda n: BaseModel.open(folder / n).tensors)


def test_a_stale_copy_beside_the_weights_transformers_weights_names_in_a_subfolder_is_left_out_of_a_merge(tmp_path):
    """config.json's transformers_weights naming sub/model.safetensors.index.json, an old sub/model.safetensors (and
    sub/config.json) beside it: transformers reads the named index only, but from_pretrained(out, subfolder="sub")
    reads sub/model.safetensors first. It was copied into the merge as it was, so that load gave the base unmerged,
    unsaid; it is now left out (and said to be), as a copy beside the top-level weights already was."""
    import shutil

    import torch
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from loraops.cli import main
    from tests.factories import tiny_llama

    folder = tiny_llama(tmp_path / "m", shard_size="60KB")
    (folder / "sub").mkdir()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {name: f"sub/{shard}" for name, shard in index["weight_map"].items()}
    for shard in folder.glob("model-*.safetensors"):
        shard.rename(folder / "sub" / shard.name)
    (folder / "sub" / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors.index.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"transformers_weights": "sub/model.safetensors.index.json"}))
    old = tiny_llama(tmp_path / "old", seed=3)
    shutil.copy(old / "model.safetensors", folder / "sub" / "model.safetensors")
    shutil.copy(old / "config.json", folder / "sub" / "config.json")
    stale = AutoModelForCausalLM.from_pretrained(folder, subfolder="sub").state_dict()  # (what that load read)
    assert torch.equal(stale["lm_head.weight"], AutoModelForCausalLM.from_pretrained(old).state_dict()["lm_head.weight"])

    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["q_proj"])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(folder), "-o", str(out), "--no-record"])
    assert result.exit_code == 0, result.output
    assert "left out sub/model.safetensors: other copies of the base's weights, not merged" in result.output
    assert not (out / "sub" / "model.safetensors").exists()
    assert (out / "sub" / "config.json").exists() and (out / "sub" / "model.safetensors.index.json").exists()
    q = "model.layers.0.self_attn.q_proj.weight"
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()[q]
    assert not torch.equal(merged, AutoModelForCausalLM.from_pretrained(folder).state_dict()[q])


@pytest.mark.parametrize("files", [["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                                    "pytorch_model.bin.index.json"], ["model.ckpt"], ["weights.pth"]])
def test_a_pickle_only_folder_is_refused_naming_its_files_and_how_to_convert_them(tmp_path, files):
    """A folder of .ckpt or .pth weights only was "no .safetensors weights found" (only .bin and .pt were looked
    for), and the line for .bin said neither which files nor how to convert them."""
    import torch

    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for name in files:
        if name.endswith(".json"):
            (folder / name).write_text(json.dumps({"weight_map": {"w": files[0]}}))
        else:
            torch.save({"w": torch.zeros(2)}, folder / name)
    pickles = ", ".join(name for name in files if not name.endswith(".json"))
    with pytest.raises(FormatError, match=re.escape(
            f"{folder}: holds only pickle weights ({pickles}), which loraops does not read (loading one can run "
            "code); convert them to safetensors first: from_pretrained(folder) and save_pretrained(out) write them")):
        BaseModel.open(folder)


def _hf_cache_snapshot(model: Path, repo: Path) -> Path:
    """``model``'s files laid out as the Hugging Face cache holds a download: snapshots/<commit>/<file>, each a
    relative symlink to blobs/<sha256 of its bytes>."""
    import hashlib
    import os
    import shutil

    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    for file in sorted(p for p in model.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, blob)
        link = snapshot / file.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_a_hugging_face_cache_snapshot_of_symlinks_is_read_hashed_and_merged_as_its_files(tmp_path):
    """A base given as an HF cache snapshot (every file a symlink into ../../blobs): its fingerprint is the real
    folder's, the merge writes plain files (not links, nor through them into the blobs) byte for byte as a merge of
    the real folder does, and a merge --force over another snapshot sharing those blobs leaves the blobs as they
    were. Held as it works: the shards are checked lexically (not resolved: a blob lies outside the snapshot)."""
    import hashlib

    from click.testing import CliRunner

    from loraops.cli import main
    from tests.factories import tiny_llama

    model = tiny_llama(tmp_path / "model", shard_size="60KB")
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = _hf_cache_snapshot(model, repo)
    assert all(p.is_symlink() for p in snapshot.iterdir())
    assert BaseModel.open(snapshot).fingerprint(progress=False) == BaseModel.open(model).fingerprint(progress=False)
    adapter = peft_adapter(model, tmp_path / "a", target_modules=["q_proj", "down_proj"])
    runner = CliRunner()
    for base, out in ((model, tmp_path / "plain"), (snapshot, tmp_path / "out")):
        result = runner.invoke(main, ["merge", str(adapter), "--into", str(base), "-o", str(out), "--no-record"])
        assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*"))
    assert written == sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*"))
    assert not any((tmp_path / "out" / p).is_symlink() for p in written)
    assert all((tmp_path / "out" / p).read_bytes() == (tmp_path / "plain" / p).read_bytes() for p in written)

    other = repo / "snapshots" / ("1" * 40)
    other.mkdir()
    for link in snapshot.iterdir():
        (other / link.name).symlink_to(link.readlink())
    result = runner.invoke(main, ["merge", str(adapter), "--into", str(snapshot), "-o", str(other), "--no-record",
                                  "--force"])
    assert result.exit_code == 0, result.output
    assert all(hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name for blob in (repo / "blobs").iterdir())
    assert BaseModel.open(snapshot).fingerprint(progress=False) == BaseModel.open(model).fingerprint(progress=False)


@pytest.mark.parametrize("said", ["false", 0, 1])
def test_a_tie_word_embeddings_that_is_not_a_bool_is_refused_in_one_line(tmp_path, said):
    """transformers 5 refuses a config whose tie_word_embeddings is a string or a number (its strict config: "expected
    bool"); loraops read it by truthiness ("false" tied, 0 untied), as transformers 4 did, and merged a base that
    loads nowhere the way loraops took it. null stays what it was: some configs (Gemma 3's top) take it."""
    from click.testing import CliRunner

    from loraops.cli import main
    from tests.factories import tiny_llama

    folder = tiny_llama(tmp_path / "m", tie=True)
    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["embed_tokens", "q_proj"])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": said}))
    for args in (["check", str(adapter), "--base", str(folder)],
                 ["merge", str(adapter), "--into", str(folder), "-o", str(tmp_path / "out"), "--no-record"],
                 ["base", "add", str(folder)]):  # (it recorded the base, which check by name then said fits)
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert result.output.strip() == (
            f"error: {folder / 'config.json'}: tie_word_embeddings is {said!r}, not true or false (transformers 5 "
            "refuses to load such a config); write true or false")
    assert not (tmp_path / "out").exists()
    assert json.loads(CliRunner().invoke(main, ["base", "list", "--json"]).output) == []


def test_a_dangling_model_safetensors_beside_a_valid_index_is_left_out_with_a_note_as_transformers_does(tmp_path,
                                                                                                     capfd):
    """An HF snapshot whose model.safetensors blob was deleted, beside the index and its shards: from_pretrained
    looks for model.safetensors with os.path.isfile (false for a link to nothing) and loads the index; loraops
    refused it ("no such file"). It reads the index now, saying in one note which link it left out; the merge is the
    one of the same folder without the link. A dangling link that is all the folder holds is still refused, naming
    it."""
    from click.testing import CliRunner

    from loraops.cli import main
    from tests.factories import load_model, tiny_llama

    model = tiny_llama(tmp_path / "model", shard_size="60KB")
    adapter = peft_adapter(model, tmp_path / "a", target_modules=["q_proj", "down_proj"])
    runner = CliRunner()
    assert runner.invoke(main, ["merge", str(adapter), "--into", str(model), "-o", str(tmp_path / "plain"),
                                "--no-record"]).exit_code == 0
    link = model / "model.safetensors"
    link.symlink_to(tmp_path / "blobs" / "gone")
    load_model(model)  # (transformers loads it)
    note = (f"note: {link} is a symlink to a missing file ({tmp_path / 'blobs' / 'gone'}): left out, as "
            f"from_pretrained leaves it out; read {model / 'model.safetensors.index.json'} instead")
    for args in (["check", str(adapter), "--base", str(model)], ["base", "add", str(model)],
                 ["merge", str(adapter), "--into", str(model), "-o", str(tmp_path / "out"), "--no-record"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        assert result.output.count(note) == 1, result.output
    capfd.readouterr()
    assert BaseModel.open(model).files == sorted(model.glob("model-*.safetensors"))
    assert capfd.readouterr() == ("", "")  # (the Python API prints nothing unasked: the CLI says the note)
    written = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*"))
    assert written == sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*"))
    assert all((tmp_path / "out" / p).read_bytes() == (tmp_path / "plain" / p).read_bytes() for p in written)

    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "config.json").write_text((model / "config.json").read_text())
    (alone / "model.safetensors").symlink_to(tmp_path / "blobs" / "gone")
    with pytest.raises(NotFoundError, match=re.escape(
            f"{alone / 'model.safetensors'}: no such file (a symlink to {tmp_path / 'blobs' / 'gone'}, which is "
            "missing)")):
        BaseModel.open(alone)
    # a dangling index beside its shards: refused (from_pretrained finds no weights), naming the link
    link.unlink()
    index = model / "model.safetensors.index.json"
    index.rename(tmp_path / "index.json")
    index.symlink_to(tmp_path / "blobs" / "gone")
    with pytest.raises(FormatError, match=re.escape(
            f"; {index}: no such file (a symlink to {tmp_path / 'blobs' / 'gone'}, which is missing)")):
        BaseModel.open(model)


def test_a_dangling_link_the_folder_would_never_read_goes_unsaid(tmp_path):
    """Only a link the folder's loading rule would read were its file there is said to be left out (the test above):
    extra.safetensors beside a valid model.safetensors is no file from_pretrained would read, link or not, so no note;
    a dangling model.safetensors beside an index still gets its note (that test)."""
    from click.testing import CliRunner

    from loraops.cli import main
    from tests.factories import tiny_llama

    model = tiny_llama(tmp_path / "model")
    adapter = peft_adapter(model, tmp_path / "a", target_modules=["q_proj"])
    (model / "extra.safetensors").symlink_to(tmp_path / "blobs" / "gone")
    for args in (["check", str(adapter), "--base", str(model)], ["base", "add", str(model)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and "note" not in result.output, result.output
    assert BaseModel.open(model).files == [model / "model.safetensors"]


def test_a_side_file_that_is_a_fifo_a_device_or_huge_is_refused_in_one_line(tmp_path, monkeypatch):
    """A base's config.json or index, or a recipe, were read whole with read_text: a FIFO there blocked forever, a
    link to /dev/zero filled memory (the OOM killer, or a MemoryError traceback). Refused before they are opened
    (fsutil.read_small_file), as the weights files are; a file past its limit is refused too. (A writer thread feeds
    the FIFOs after a while, so a reader that opens one fails this test instead of hanging it.)"""
    import os
    import shutil
    import threading

    from click.testing import CliRunner

    from loraops import fsutil
    from loraops.cli import main
    from tests.factories import tiny_llama

    folder = tiny_llama(tmp_path / "m")
    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["q_proj"])
    fifo, device, index = tmp_path / "fifo", tmp_path / "device", tmp_path / "index"
    for copy in (fifo, device, index):
        shutil.copytree(folder, copy)
    (fifo / "config.json").unlink()
    os.mkfifo(fifo / "config.json")
    (device / "config.json").unlink()
    (device / "config.json").symlink_to("/dev/null")
    (index / "model.safetensors").rename(index / "model-00001-of-00001.safetensors")
    os.mkfifo(index / "model.safetensors.index.json")
    recipe = tmp_path / "recipe.yml"
    os.mkfifo(recipe)

    def feed(path):  # (blocks until a reader opens it: only a regressed reader ever does)
        with open(path, "w") as writer:
            writer.write("{not json")

    for path in (fifo / "config.json", index / "model.safetensors.index.json", recipe):
        threading.Thread(target=feed, args=(path,), daemon=True).start()
    cases = [(["base", "add", fifo], fifo / "config.json", "model config"),
             (["merge", adapter, "--into", fifo, "-o", tmp_path / "out", "--no-record"], fifo / "config.json",
              "model config"),
             (["base", "add", device], device / "config.json", "model config"),
             (["check", adapter, "--base", index], index / "model.safetensors.index.json", "safetensors index"),
             (["combine", "--recipe", recipe], recipe, "recipe")]
    for args, path, what in cases:
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert (result.exit_code, result.stderr) == (
            2, f"error: {path}: not a regular file (a FIFO, a socket or a device), so no {what}\n"), args
    monkeypatch.setattr(fsutil, "SMALL_FILE_LIMIT", 2**20)
    (folder / "config.json").write_text(json.dumps(json.loads((folder / "config.json").read_text())
                                                   | {"padding": "x" * 2**20}))
    result = CliRunner().invoke(main, ["base", "add", str(folder)])
    assert (result.exit_code, result.stderr) == (
        2, f"error: {folder / 'config.json'}: over 1 MiB, too large for a model config\n")
    assert not (tmp_path / "out").exists()
    assert json.loads(CliRunner().invoke(main, ["base", "list", "--json"]).output) == []
