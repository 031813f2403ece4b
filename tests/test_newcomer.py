"""Mistakes a new user makes on the first day, each answered in one line that says what was meant: a typo'd adapter,
base or command name, a weight written `a=0.7`, `a 0.7` or with a decimal comma, `--dtype BF16` as loraops prints
dtypes, and a folder given as an adapter that holds something else (a model, a kohya file, named PEFT adapters)."""
import shutil

import pytest
from click.testing import CliRunner

from factories import kohya_file, peft_adapter, tiny_llama
from loraops.cli import exit_status, main

pytestmark = pytest.mark.registry_backend


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("newcomer")
    base = tiny_llama(root / "llama-tiny")
    return {"base": base, "chat": peft_adapter(base, root / "chat", seed=1, r=4, alpha=8, target_modules=["q_proj"])}


@pytest.fixture
def reg(files):
    assert run("base", "add", files["base"])[0] == 0
    assert run("register", files["chat"], "--name", "style")[0] == 0


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], prog_name="loraops")
    return result.exit_code, result.output


@pytest.mark.parametrize("args, said", [
    (["merge", "styel", "--into", "llama-tiny", "-o", "out"],
     "no adapter 'styel' in the registry (did you mean 'style'?)"),
    (["show", "stlye@1"], "no adapter named 'stlye' in the registry (did you mean 'style'?)"),
    (["merge", "style", "--into", "llama-tny", "-o", "out"],
     "no base 'llama-tny' in the registry (did you mean 'llama-tiny'?)"),
    (["merge", "style=0.7", "--into", "llama-tiny", "-o", "out"],
     "no adapter 'style=0.7' in the registry (a weight is written after ':', with no space: style:0.7)"),
    (["merge", "style:", "0.7", "--into", "llama-tiny", "-o", "out"],
     "no adapter 'style:' in the registry (a weight is written after ':', with no space: style:0.7)"),
    (["merge", "style", "0.7", "--into", "llama-tiny", "-o", "out"],
     "no adapter '0.7' in the registry (a weight is written right after its adapter, with no space: NAME:0.7)"),
    (["merge", "style:0.5,style:0.5", "--into", "llama-tiny", "-o", "out"],
     "no adapter 'style:0.5,style' in the registry (adapters are separate arguments, not joined by commas: style style "
     "(each with its :WEIGHT))"),
    (["show", "77"], "no adapter '77' in the registry (give a name, name@version, id or sha256 prefix of 6+ hex "
                     "digits)"),
    (["show", "zzzz"], "no adapter 'zzzz' in the registry (give a name, name@version, id or sha256 prefix of 6+ hex "
                       "digits)"),
])
def test_a_name_that_names_nothing_says_the_name_meant(reg, tmp_path, monkeypatch, args, said):
    monkeypatch.chdir(tmp_path)
    assert run(*args) == (3, f"error: {said}\n")
    assert list(tmp_path.iterdir()) == []


def test_a_weight_with_a_decimal_comma_is_refused_as_a_weight(reg, tmp_path, monkeypatch):
    """`style:0,7` for a registered style (no path of that name here) was 'no adapter 'style:0,7' in the registry'."""
    monkeypatch.chdir(tmp_path)
    assert run("merge", "style:0,7", "--into", "llama-tiny", "-o", "out") == (
        2, "error: 'style:0,7': the weight after ':' must be a number written plainly (like 0.7, -1 or 2e-3)\n")


def test_dtype_in_capitals_as_loraops_prints_it(reg, tmp_path):
    code, text = run("merge", "style", "--into", "llama-tiny", "-o", tmp_path / "m", "--dtype", "BF16", "--no-record")
    assert code == 0 and "bfloat16 on cpu" in text, text  # (the summary names it as torch does)
    assert run("merge", "style", "--into", "llama-tiny", "-o", tmp_path / "n", "--dtype", "Int8") == (
        2, "error: invalid value for '--dtype': 'Int8' is not one of 'bf16', 'fp16', 'fp32' (see `loraops merge "
           "--help`)\n")


def test_a_typo_in_a_command_suggests_it(capsys):
    assert exit_status(["merg", "x"]) == 2
    assert capsys.readouterr().err == "error: no such command 'merg'. Did you mean 'merge'? (see `loraops --help`)\n"
    assert exit_status(["xyz"]) == 2
    assert capsys.readouterr().err == "error: no such command 'xyz' (see `loraops --help`)\n"
    assert exit_status(["version"]) == 2  # (not "Did you mean 'verify'?")
    assert capsys.readouterr().err == ("error: no such command 'version': `loraops --version` prints it (see `loraops "
                                       "--help`)\n")


def test_a_folder_that_is_no_adapter_says_what_it_holds(files, tmp_path):
    refused = "a folder without adapter_config.json/adapter_model.safetensors or pytorch_lora_weights.safetensors"
    base = files["base"]
    assert run("register", base) == (
        2, f"error: {base}: {refused}; it holds a model, not a LoRA adapter (a base model is added with "
           f"`loraops base add {base}`)\n")
    download = tmp_path / "download"
    download.mkdir()
    style = kohya_file(download / "style.safetensors", {"lora_unet_a_proj": ((8,), (8,))})
    assert run("inspect", download) == (2, f"error: {download}: {refused}; give the adapter's .safetensors file "
                                           f"itself ({style})\n")
    named = tmp_path / "named"
    for name in ("a", "b"):
        shutil.copytree(files["chat"], named / name)
    assert run("inspect", named) == (2, f"error: {named}: {refused}; it holds PEFT adapters in subfolders, as PEFT "
                                        f"saves named ones: give one of them ({named / 'a'}, {named / 'b'})\n")
    (tmp_path / "empty").mkdir()
    assert run("inspect", tmp_path / "empty") == (2, f"error: {tmp_path / 'empty'}: {refused}\n")


def test_rank_with_combines_default_method_says_to_give_a_method(reg, tmp_path):
    """`combine a b --rank 8` runs cat, combine's default, which said "cat keeps every input's rank (their sum); use
    linear with --rank to truncate" to a user who had named no cat and no way to give linear."""
    assert run("combine", "style:0.5", "style:0.5", "--rank", "2") == (
        2, "error: cat (combine's default --method) keeps every input's rank (their sum), so it takes no --rank: give "
           "--method linear with --rank to truncate\n")


def test_an_adapter_shows_in_one_line(files, reg):
    """An Adapter or LoraModule in a REPL or a log printed every factor's values (the dataclass's repr)."""
    from loraops.formats import read_adapter
    from loraops.registry import Registry

    adapter = read_adapter(files["chat"])
    assert repr(adapter) == f"Adapter({str(files['chat'])!r}, peft, 2 modules, rank 4, float32)"
    assert repr(adapter.modules["model.layers.0.self_attn.q_proj"]) == (
        "LoraModule('model.layers.0.self_attn.q_proj', linear, rank 4, 64×64, scale 2, float32)")
    with Registry.open() as registry:
        assert repr(registry.load_adapter("style")) == "Adapter('style@1', peft, 2 modules, rank 4, float32)"


def test_a_bare_name_that_is_a_folder_here_says_to_register_it(files, reg, monkeypatch):
    """`show chat` beside the folder chat, never registered under that name, said only "no adapter 'chat' in the
    registry"; a name written as a path (./chat) said how to record it already."""
    monkeypatch.chdir(files["chat"].parent)
    assert run("show", "chat") == (3, "error: chat: no adapter of that name in the registry, and a path is not taken "
                                      "here, only a registered adapter: `loraops register chat` records it\n")
    assert run("base", "show", "llama-tiny")[0] == 0  # a registered name is that record, whatever lies here
    assert run("base", "rm", "llama-tiny", "--force")[0] == 0
    assert run("base", "add", "llama-tiny", "--name", "tiny")[0] == 0
    assert run("list", "--base", "llama-tiny") == (3, "error: llama-tiny: a path is not taken here, only a registered "
                                                      "base: the base there is registered as 'tiny', give that\n")


@pytest.mark.parametrize("given, hub", [
    ("meta/tiny-llama", "meta/tiny-llama"), ("hf://meta/tiny-llama@v1", "meta/tiny-llama@v1"),
    ("https://huggingface.co/meta/tiny-llama/tree/main", "meta/tiny-llama@main")])
def test_a_hub_model_added_without_hub_says_how_to_name_it(tmp_path, monkeypatch, given, hub):
    """`base add meta/tiny-llama` (as `pull` takes a repo) said only "no such file or folder"; a local name that is
    no repo id, or a path that exists, is read as before."""
    monkeypatch.chdir(tmp_path)
    assert run("base", "add", given) == (3, f"error: {given}: no such file or folder; a base on the Hub is added as "
                                            f"hub:{hub}\n")
    assert run("base", "add", "llama-tny") == (3, "error: llama-tny: no such file or folder\n")


def test_a_pull_of_what_is_no_repo_says_what_was_meant(files, fake_hub, tmp_path, monkeypatch):
    """`pull ./chat` (a local adapter), `pull owner/name/file` (a file in a repo) said only "not a Hub repo id", and
    `--file` naming nothing in the repo "nothing adapter-like in nope.safetensors/"."""
    monkeypatch.chdir(files["chat"].parent)
    assert run("pull", "./chat") == (2, "error: './chat' is not a Hub repo id (expected owner/name[@revision]); "
                                        "./chat is here on disk: `loraops register ./chat` records it\n")
    assert run("pull", "someone/lora/adapter_model.safetensors") == (
        2, "error: 'someone/lora/adapter_model.safetensors' is not a Hub repo id (expected owner/name[@revision]); a "
           "file or folder in a repo is given with --file: `loraops pull someone/lora --file adapter_model.safetensors`"
           "\n")
    fake_hub.commit_folder("someone/lora", files["chat"])
    assert run("pull", "someone/lora", "--file", "nope.safetensors") == (
        3, "error: someone/lora: no file or folder nope.safetensors in the repo; it holds: .gitattributes, README.md, "
           "adapter_config.json, adapter_model.safetensors\n")


def test_an_adapter_for_another_base_names_the_base_it_was_made_for(files, tmp_path):
    """Merged into another model, nothing of it fits: the line names the base its PEFT config says it was made for
    (one that fits in part says nothing of it: the base may be the right one, with some modules off)."""
    wide = tiny_llama(tmp_path / "wide", hidden=32)
    code, text = run("merge", files["chat"], "--into", wide, "-o", tmp_path / "out", "--no-record")
    assert code == 2 and text.startswith(f"error: {files['chat']}: 2 modules do not fit base {wide}: "), text
    assert text.endswith(f"; it was made for {files['base']}\n") and text.count("\n") == 1, text
    code, text = run("check", files["chat"], "--base", wide)  # (its line said no base)
    assert code == 2 and text.endswith(f"error: {files['chat']} does not fit base {wide}; it was made for "
                                       f"{files['base']}\n"), text


def test_a_gguf_file_is_named_as_one(tmp_path):
    """A llama.cpp GGUF file given as a base or an adapter said "not a safetensors file (header claims 14064895815
    bytes, over the 100 MB limit)"."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(2000))
    said = ("a GGUF file (llama.cpp's format), not safetensors: give the safetensors model or adapter it was converted "
            "from")
    assert run("base", "add", gguf) == (2, f"error: {gguf}: {said}\n")
    assert run("inspect", gguf) == (2, f"error: {gguf}: {said}\n")


@pytest.mark.parametrize("args, said", [
    (["merge", "a", "--base", "b", "-o", "c"], "no such option '--base': merge takes --into BASE (see `loraops merge "
                                               "--help`)"),
    (["subtract", "a", "--into", "b", "-o", "c"], "no such option '--into': subtract takes --from MODEL (see "
                                                  "`loraops subtract --help`)"),
    (["extract", "--into", "b"], "no such option '--into': extract takes --base MODEL and --tuned MODEL (see `loraops "
                                 "extract --help`)"),
    (["combine", "a", "--into", "b"], "no such option '--into': combine takes --base BASE (see `loraops combine "
                                      "--help`)"),
])
def test_the_model_option_of_another_command_says_which_this_one_takes(args, said):
    """merge names its base --into, subtract its model --from, the others --base: `merge --base B` said "Did you mean
    '--name'?"."""
    assert run(*args) == (2, f"error: {said}\n")
