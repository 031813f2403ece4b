"""Regressions of the contract sweep of the established commands (register … verify, pull/push, global options), each
in a process of its own as a user runs it (factories.loraops_run): one `error:` line and its exit code, nothing
half-written, the registry as it was after a refused command."""
from __future__ import annotations

import os

import torch

import test_cli_contract
from factories import loraops_run
from test_cli_contract import MODULES

kohya = test_cli_contract.kohya  # the fixture: a small kohya file


def run(*args, code=0, cwd=None):
    """`loraops ARGS` in a process of its own, in ``cwd`` when given."""
    done = loraops_run(*args, cwd=cwd)
    assert done.returncode == code, (done.stdout, done.stderr)
    if code:
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    return done


def test_an_output_that_names_no_file_is_refused(tmp_path, kohya):
    """`-o .` (or '', '/') with --force was a ValueError traceback (exit 1) from the temporary sibling's name; without
    it, '' was said to overlap the blob store, or to exist, as '.'."""
    work = tmp_path / "work"
    work.mkdir()
    for output in ("", "."):
        done = run("export", kohya, "--format", "kohya", "-o", output, "--force", code=2, cwd=work)
        assert done.stderr == (f"error: {output!r}: names no file or folder to write; give the output's own name "
                               "(e.g. ./merged)\n")
    assert list(work.iterdir()) == []


def test_an_in_memory_registry_is_refused(kohya, isolated_home):
    """`--db sqlite://` opened an in-memory registry: `register` said it registered what was gone when the command
    ended, and `gc` — with no file to keep a store beside, its store was the home's — removed every stored adapter of
    the home's registry."""
    run("register", kohya, "--name", "style")
    for url in ("sqlite://", "sqlite:///:memory:"):
        done = run("--db", url, "gc", "--grace", "0", code=6)
        assert done.stderr == (f"error: {url}: an in-memory SQLite database cannot hold a registry (it is gone when "
                               "the command ends); give a file, e.g. sqlite:////path/registry.db\n")
    assert run("verify").stdout == "all stored files of 1 adapter(s) match their sha256\n"


def test_a_refused_command_gives_back_the_version_it_took(kohya):
    """combine/resize register a path input first and remove it again when they fail, but the version number stayed
    taken: after a refused `resize style.safetensors --rank 9`, registering the file made style@2."""
    run("resize", kohya, "--rank", "9", code=2)
    assert run("register", kohya).stdout.startswith("registered style@1 ")


def test_a_name_not_used_because_the_model_is_recorded_says_so(tmp_path):
    """`base add` of a model already recorded (same fingerprint, e.g. resharded) with another --name said only
    'already registered as base a', where `register` says the --name was not used and why."""
    from loraops import st

    st.write_safetensors(tmp_path / "model.safetensors", {"w.weight": torch.ones(4, 4)})
    run("base", "add", tmp_path / "model.safetensors", "--name", "a")
    done = run("base", "add", tmp_path / "model.safetensors", "--name", "b")
    assert done.stdout.endswith("; not registered again as 'b': one record per model (its fingerprint), under its "
                                "first name\n")


def test_pull_asks_for_the_files_it_picked_by_their_exact_names(fake_hub, kohya):
    """Picked file names were passed to huggingface_hub as globs: `style [v2].safetensors` matched nothing ('not in
    the local cache', after a second stray line on stderr), and `st?le.safetensors` matched other files too."""
    fake_hub.commit("someone/br", {"style [v2].safetensors": kohya.read_bytes()})
    assert run("pull", "someone/br").stdout.startswith("pulled someone/br ")


def test_a_bad_pulled_file_is_named_as_in_the_repo(fake_hub):
    """It was named by the scratch folder it was downloaded into (gone by then)."""
    fake_hub.commit("someone/bad", {"adapter.safetensors": b"garbage"})
    done = run("pull", "someone/bad", code=2)
    assert done.stderr == "error: someone/bad/adapter.safetensors: not a safetensors file (7 bytes, too short for a header)\n"


def test_push_of_unlinked_kohya_as_peft_says_how_to_link_it(fake_hub, kohya):
    """The message named a library function (loraops.check.bind) to a command-line user."""
    run("register", kohya, "--name", "style")
    done = run("push", "style", "me/style", "--format", "peft", "--token", "hf_owner", code=2)
    assert "`loraops register FILE --base BASE`" in done.stderr
    assert os.environ["HF_ENDPOINT"] == fake_hub.url


def test_a_file_without_alpha_says_where_to_give_one(tmp_path):
    """A bare PEFT .safetensors with no alpha anywhere: `merge` told its user to pass --alpha, which merge has not
    (only register, inspect and check have it; the registered adapter keeps it)."""
    from loraops import st

    bare = tmp_path / "bare.safetensors"
    st.write_safetensors(bare, {"base_model.model.q.lora_A.weight": torch.ones(2, 4),
                                "base_model.model.q.lora_B.weight": torch.ones(4, 2)})
    st.write_safetensors(tmp_path / "base.safetensors", {"q.weight": torch.zeros(4, 4)})
    done = run("merge", bare, "--into", tmp_path / "base.safetensors", "-o", tmp_path / "out.safetensors",
               "--no-record", code=2)
    assert "pass the LoRA alpha: --alpha A to `register`" in done.stderr
    assert run("register", bare, "--alpha", "4").stdout.startswith("registered bare@1 ")
    # the file again is read again (its identity without the alpha is not the registered one): the message must
    # say to give the registered adapter by name, as what follows does
    again = run("merge", bare, "--into", tmp_path / "base.safetensors", "-o", tmp_path / "out.safetensors",
                "--no-record", code=2)
    assert "give them the name@version `register` printed, not the file" in again.stderr
    run("merge", "bare@1", "--into", tmp_path / "base.safetensors", "-o", tmp_path / "out.safetensors", "--no-record")


def test_a_refused_combine_leaves_the_base_link_of_its_input_as_it_was(tmp_path, kohya):
    """`combine FILE --base B` links a registered FILE to B (as `register FILE --base B` does); when the command was
    then refused (here: diffusers output cannot name the modules), the link stayed: a refused command changed the
    registry."""
    import json

    from loraops import st

    st.write_safetensors(tmp_path / "base.safetensors", {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)})
    run("base", "add", tmp_path / "base.safetensors", "--name", "b")
    run("register", kohya, "--name", "style")
    run("combine", kohya, "--base", "b", "--method", "cat", "--format", "diffusers", "-o", tmp_path / "out.safetensors",
        code=2)
    record = json.loads(run("show", "style", "--json").stdout)
    assert record["base"] is None and [m["name"] for m in record["modules"]] == list(MODULES)


def test_an_adapter_repo_is_not_added_as_a_base(fake_hub, kohya):
    """`base add hub:OWNER/LORA` recorded a LoRA adapter's factors as a base model's tensors, where `base add` of the
    same adapter on disk says what it is."""
    fake_hub.commit("someone/style", {"style.safetensors": kohya.read_bytes()})
    done = run("base", "add", "hub:someone/style", code=2)
    assert done.stderr == ("error: someone/style: this is a LoRA adapter, not a base model; pull it with "
                           "`loraops pull someone/style`\n")
    assert run("base", "list", "--json").stdout.strip() == "[]"

