"""`loraops combine / resize / export` through the CLI: registration with lineage, outputs, tables, --json,
one-line errors."""
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from factories import peft_adapter, tiny_llama
from loraops import fsutil
from loraops.cli import main
from loraops.errors import InvalidInputError
from loraops.formats import kohya_name, read_adapter
from loraops.registry import Registry

pytestmark = pytest.mark.registry_backend  # the registry's own code: run on PostgreSQL too (conftest.py)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-algebra")
    base = tiny_llama(root / "base")
    other = tiny_llama(root / "other", seed=5)
    a = peft_adapter(base, root / "a", seed=1, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    b = peft_adapter(base, root / "b", seed=2, r=6, alpha=3, target_modules=["q_proj", "o_proj"])
    c = peft_adapter(other, root / "c", seed=3, r=4, alpha=8, target_modules=["q_proj"])
    return {"base": base, "other": other, "a": a, "b": b, "c": c}


@pytest.fixture
def reg(files):
    """A fresh registry (the home is per test) that knows both bases."""
    code, out = run("base", "add", files["base"], "--name", "tiny")
    assert code == 0, out
    code, out = run("base", "add", files["other"], "--name", "other")
    assert code == 0, out
    with Registry.open() as registry:
        yield registry


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_combine_registers_with_lineage_and_writes(files, reg, tmp_path):
    a, b = files["a"], files["b"]
    code, out = run("combine", f"{a}:0.7", f"{b}:-0.5", "-o", tmp_path / "ab")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "cat of a@1×0.7, b@1×-0.5"
    assert lines[-1].startswith("registered a+b-cat@1 (id 3, sha256 ") and lines[-1].endswith(
        f"base tiny; wrote {tmp_path / 'ab'}")
    record = reg.get_adapter("a+b-cat")
    assert record.base.name == "tiny" and record.lineage.op == "combine"
    assert [(i.ref, i.weight) for i in record.lineage.inputs] == [("a@1", 0.7), ("b@1", -0.5)]
    assert record.lineage.params == {"method": "cat", "params": {}, "rank": None}
    result, one, two = reg.load_adapter("a+b-cat"), read_adapter(a), read_adapter(b)
    for name, module in result.modules.items():
        expected = sum(w * ad.modules[name].delta() for ad, w in ((one, 0.7), (two, -0.5)) if name in ad.modules)
        torch.testing.assert_close(module.delta(), expected, rtol=1e-5, atol=1e-6)
    # the same result again is the same registry entry
    code, out = run("combine", f"{a}:0.7", f"{b}:-0.5", "--name", "again")
    assert code == 0 and "already registered as a+b-cat@1" in out


def test_combine_json_from_registry_refs(files, reg):
    assert run("register", files["a"])[0] == 0 and run("register", files["b"])[0] == 0
    code, out = run("combine", "a", "b@1", "--method", "dare_ties", "--density", "0.5", "--seed", "7", "--rank", "3",
                    "--format", "kohya", "--name", "ab-dare", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["adapter"]["name"] == "ab-dare" and data["adapter"]["format"] == "kohya" and data["output"] is None
    assert data["report"]["params"] == {"density": 0.5, "seed": 7, "normalize": False, "lambda": 1.0}
    assert {m["rank"] for m in data["report"]["modules"]} == {3}
    assert data["adapter"]["lineage"]["params"]["rank"] == 3
    code, out = run("combine", "a", "b@1", "--method", "dare_ties", "--density", "0.5", "--normalize", "--json")
    assert code == 0 and json.loads(out)["report"]["params"]["normalize"] is True, out


def test_resize_table_and_export_round_trip(files, reg, tmp_path):
    code, out = run("resize", files["b"], "--dynamic", "sv_fro", "--param", "0.9", "--max-rank", "5")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["module", "kind", "rank", "new", "alpha", "fro", "kept", "sum(S)", "kept"]
    assert "model.layers.0.self_attn.q_proj" in out and lines[-2].startswith("average: fro kept ")
    assert lines[-1].startswith("registered b-sv_fro0.9@1 ")
    assert reg.get_adapter("b-sv_fro0.9").lineage.params == {"dynamic": "sv_fro", "param": 0.9, "max_rank": 5}
    code, out = run("export", "b-sv_fro0.9", "--format", "kohya", "-o", tmp_path / "s.safetensors")
    assert (code, out) == (0, f"wrote {tmp_path / 's.safetensors'}\n")
    code, out = run("export", tmp_path / "s.safetensors", "--format", "peft", "-o", tmp_path / "p", "--base", "tiny")
    assert code == 0, out
    kohya, peft = read_adapter(tmp_path / "s.safetensors"), read_adapter(tmp_path / "p")
    assert len(peft.modules) == len(kohya.modules) == 4
    for name, module in peft.modules.items():
        torch.testing.assert_close(module.delta(), kohya.modules[kohya_name(name)].delta())


@pytest.mark.parametrize("args, code, message", [
    (["combine", "{a}", "--method", "mean"], 2,
     "error: unknown combine method 'mean': use one of cat, linear, svd, ties, dare_ties, dare_linear, breadcrumbs, "
     "breadcrumbs_ties, della, della_linear, magnitude_prune, sce, nuslerp, model_stock, multislerp"),
    # mergekit's names: what they are here
    (["combine", "{a}", "{b}", "--method", "task_arithmetic"], 2,
     "error: unknown combine method 'task_arithmetic': mergekit's task_arithmetic is linear here (λ·Σ wᵢτᵢ: fold "
     "lambda into the weights; combine --recipe reads a task_arithmetic recipe)"),
    (["combine", "{a}", "{b}", "--method", "slerp"], 2,
     "error: unknown combine method 'slerp': mergekit's slerp interpolates whole weights (from the base_model's at "
     "t = 0), which no LoRA holds: nuslerp interpolates two adapters' task vectors (mergekit's nuslerp with a "
     "base_model)"),
    (["combine", "{a}", "{b}", "--method", "ties", "--density", "1.5"], 2,
     "error: bad parameters for ties: --density: Input should be less than or equal to 1"),
    (["combine", "{a}", "--method", "linear", "--rank", "0"], 2, "error: --rank must be a positive integer (got 0)"),
    (["combine", "{a}", "{c}"], 2, "error: adapters are for different bases: a@1 is for tiny, c@1 is for other"),
    (["combine", "{a}", "-o", "{a}"], 4, "error: {a}: already exists (use --force to replace it)"),
    (["resize", "{a}", "--rank", "5"], 2, "error: rank 5 is above the adapter's rank 4: resize only lowers rank"),
    # option names, not the library's parameter names (max_rank), which it still says to Python callers
    (["resize", "{a}", "--dynamic", "sv_fro", "--param", "0.5", "--max-rank", "0"], 2,
     "error: bad parameters for resize: --max-rank: Input should be greater than 0"),
    (["resize", "{a}"], 2,
     "error: bad parameters for resize: give either a --rank or a --dynamic rule (sv_ratio, sv_cumulative, "
     "sv_fro)"),
    # a writer's refusal names the result as the user knows it (it said '<in memory>'; a resize's, its input's)
    (["combine", "{a}", "{b}", "--method", "linear", "--format", "diffusers", "-o", "{tmp}/ab.safetensors"], 2,
     "error: {tmp}/ab.safetensors: module 'model.layers.0.self_attn.o_proj' has no pipeline component prefix "
     "(unet, transformer, prior, text_encoder, text_encoder_2, text_encoder_3): the diffusers format is a "
     "pipeline's (a language model's adapter: --format peft or kohya)"),
    (["resize", "{a}", "--rank", "2", "--format", "diffusers", "--name", "a2"], 2,
     "error: a2: module 'model.layers.0.self_attn.q_proj' has no pipeline component prefix "
     "(unet, transformer, prior, text_encoder, text_encoder_2, text_encoder_3): the diffusers format is a "
     "pipeline's (a language model's adapter: --format peft or kohya)"),
    (["combine", "nope"], 3,
     "error: no adapter 'nope' in the registry (give a name, name@version, id or sha256 prefix of 6+ hex digits)"),
])
def test_errors_are_one_line(files, reg, tmp_path, args, code, message):
    fill = {**files, "tmp": tmp_path}
    got, out = run(*[arg.format(**fill) for arg in args])
    assert (got, out) == (code, message.format(**fill) + "\n")
    assert reg.list_adapters() == []  # nothing registered: no result, and the path inputs were removed again


def test_a_failed_command_keeps_inputs_that_were_registered_before(files, reg):
    assert run("register", files["a"])[0] == 0
    assert run("resize", files["a"], "--rank", "5")[0] == 2
    assert [r.ref for r in reg.list_adapters()] == ["a@1"]


def test_a_registered_reference_must_be_recorded_against_the_base_given(files, reg, tmp_path):
    """export, combine and resize of a registry reference with --base check that base (export ignored it)."""
    assert run("register", files["a"])[0] == 0  # linked to tiny by its hint
    for args in (["export", "a", "--format", "kohya", "-o", tmp_path / "k.safetensors"], ["resize", "a", "--rank", "2"]):
        assert run(*args, "--base", "other") == (2, "error: adapter a@1 is recorded against base tiny, not other "
                                                    "(link it: loraops register <its file> --base other)\n")
    assert not (tmp_path / "k.safetensors").exists()
    assert run("export", "a", "--format", "kohya", "-o", tmp_path / "k.safetensors", "--base", "tiny")[0] == 0


def test_a_derived_adapter_is_moved_into_the_store_not_copied(files, reg, monkeypatch):
    """Without -o the result is written into a scratch folder inside the store and renamed into place (a 70B
    adapter is 1.6 GB: no second copy), hashed and made durable first; nothing of the scratch folder stays."""
    from loraops.registry import blobs

    def no_copy(*args):
        raise AssertionError("copied")

    assert run("register", files["a"])[0] == 0 and run("register", files["b"])[0] == 0  # inputs are copied
    monkeypatch.setattr(blobs, "_copy", no_copy)
    code, out = run("combine", "a", "b", "--name", "ab")
    assert code == 0, out
    assert reg.verify() == [] and not [p for p in reg.blobs.root.iterdir() if "scratch" in p.name]


@pytest.mark.parametrize("name", ["ab.safetensors", "ab.SafeTensors"])
def test_a_name_ending_in_safetensors_is_only_a_name(files, reg, name):
    """Without -o the result was written into a scratch folder named after --name, so a peft result named
    'ab.safetensors' (any case) was refused as a folder named like a file — an error about a path the user never
    gave (…/blobs/.loraops-tmp-scratch-…/ab.safetensors). The name is a name; the stored folder is loraops' own."""
    code, out = run("combine", files["a"], files["b"], "--name", name)
    assert code == 0, out
    assert reg.get_adapter(name).format == "peft" and reg.verify() == []


def test_derived_adapters_keep_their_inputs_module_names(tmp_path):
    """A registered adapter is bound to its base, whose saved names can differ from the ones PEFT gave the modules
    (transformers 5 holds GPT-NeoX's head as lm_head, saves it as embed_out). What resize, combine and export write
    must carry the adapter's own names, or PEFT cannot place those LoRAs when it loads the result (it ignored the
    head's: logits 1.4 off)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=100)).save_pretrained(tmp_path / "base")
    model = get_peft_model(GPTNeoXForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["query_key_value", "lm_head"], init_lora_weights=False)).eval()
    model.save_pretrained(tmp_path / "a")  # with the head's layer saved whole (a full tensor, renamed too)
    model.save_pretrained(tmp_path / "plain", save_embedding_layers=False)  # combine refuses saved layers
    for args in (["base", "add", tmp_path / "base", "--name", "neox"],
                 ["register", tmp_path / "a", "--name", "a", "--base", "neox"],
                 ["register", tmp_path / "plain", "--name", "plain", "--base", "neox"],
                 ["resize", "a", "--rank", "4", "-o", tmp_path / "resized"],  # full rank: the same deltas
                 ["combine", "plain:0.5", "plain:0.5", "-o", tmp_path / "combined"],
                 ["export", "a", "--format", "peft", "-o", tmp_path / "exported"]):
        code, out = run(*args)
        assert code == 0, out
    ids = torch.arange(3, 15).unsqueeze(0)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        for written in ("resized", "combined", "exported"):
            assert "lm_head" in read_adapter(tmp_path / written).modules
            loaded = PeftModel.from_pretrained(GPTNeoXForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / written)
            torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, expected, rtol=0, atol=1e-4, msg=written)


def test_resize_is_named_after_the_ranks_its_modules_get(tmp_path):
    """A rank-16 LoRA on modules 8 wide has a delta of rank ≤ 8: --rank 12 gives every module 8, and the default
    name said -r12 (extract's rule, derive.rank_name: the largest rank a module gets; one line says --rank was
    capped)."""
    from factories import lora_adapter
    from loraops.formats import write_adapter

    adapter = lora_adapter({"m.q": (8, 32), "m.v": (32, 8)}, rank=16, alpha=16)
    write_adapter(adapter, tmp_path / "wide", "peft")
    code, out = run("resize", tmp_path / "wide", "--rank", "12")
    assert code == 0, out
    assert "--rank 12 capped: no module is larger than rank 8 (min(its rank, out, in))\n" in out
    assert "registered wide-r8@1" in out, out
    code, out = run("resize", tmp_path / "wide", "--rank", "6")
    assert code == 0 and "capped" not in out and "registered wide-r6@1" in out, out


# `combine/resize/extract -o OUT`: the output and its registration are one outcome. OUT lands (replaces an old OUT
# under --force) only once the registration commits; when the registration fails (an error, Ctrl-C) or the rename
# after it does, the old OUT is untouched, no temporary sibling stays, and the registry is as it was.

# (command line before -o, whether OUT is a folder)
COMMANDS = {
    "combine": (lambda f: ["combine", f"{f['a']}:0.7", f"{f['b']}:-0.5"], True),
    "resize": (lambda f: ["resize", f["b"], "--rank", "2", "--format", "kohya"], False),
    "extract": (lambda f: ["extract", "--base", f["base"], "--tuned", f["other"], "--rank", "2"], True),
}


def tree(path):
    """Every file under ``path`` (or ``path`` itself) with its bytes."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def registry_state():
    with Registry.open() as reg:
        return sorted(a.ref for a in reg.list_adapters()), sorted(b.name for b in reg.list_bases())


def old_output(out, is_dir):
    if is_dir:
        out.mkdir()
        (out / "adapter_model.safetensors").write_bytes(b"old weights")
    else:
        out.write_bytes(b"old file")
    return tree(out)


@pytest.mark.parametrize("force", [False, True], ids=["new", "force"])
@pytest.mark.parametrize("failure", ["invalid", "interrupt", "rename"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_failed_registration_leaves_no_output(files, tmp_path, monkeypatch, command, failure, force):
    args, is_dir = COMMANDS[command]
    folder = tmp_path / "outputs"
    folder.mkdir()
    out = folder / "out"
    before = old_output(out, is_dir) if force else None
    state = registry_state()

    if failure == "rename":  # the registration commits, then the rename into place fails
        real_replace = os.replace

        def replace(src, dst):
            if Path(src).parent.name.startswith(fsutil.TMP_MARK) and str(dst) == str(out):  # the staged output
                raise PermissionError(13, "Permission denied", str(dst))
            return real_replace(src, dst)

        monkeypatch.setattr(fsutil.os, "replace", replace)
        real_rename_new = fsutil.rename_new  # (a new output's rename: fsutil.rename_new, no os.replace)
        monkeypatch.setattr(fsutil, "rename_new", lambda src, dst: replace(src, dst) if str(dst) == str(out) else
                            real_rename_new(src, dst))
    else:
        real_register = Registry.register_adapter

        def register_adapter(self, path, **kwargs):
            if kwargs.get("lineage") is None:  # an input given by path: registered as usual
                return real_register(self, path, **kwargs)
            raise InvalidInputError("refused for the test") if failure == "invalid" else KeyboardInterrupt

        monkeypatch.setattr(Registry, "register_adapter", register_adapter)

    code, output = run(*args(files), "-o", out, *(["--force"] if force else []))
    assert code != 0
    assert len(output.splitlines()) == 1 and output.startswith("error: "), output
    if force:
        assert tree(out) == before
    else:
        assert not os.path.lexists(out)
    assert [p.name for p in folder.iterdir()] == (["out"] if force else [])  # no temporary sibling
    assert registry_state() == state


@pytest.mark.parametrize("force", [False, True], ids=["new", "force"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_record_names_the_output_not_its_staged_path(files, tmp_path, command, force):
    args, is_dir = COMMANDS[command]
    out = tmp_path / ("out" if is_dir else "out.safetensors")
    if force:
        old_output(out, is_dir)
    code, output = run(*args(files), "-o", out, *(["--force"] if force else []), "--name", "derived")
    assert code == 0, output
    assert output.splitlines()[-1].endswith(f"wrote {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    with Registry.open() as reg:
        record = reg.get_adapter("derived")
        assert record.source == str(out.resolve())
    stored = Path(record.path)
    assert fsutil.TMP_MARK not in str(stored)
    if is_dir:
        assert tree(stored) == tree(out)
    else:  # a one-file adapter is stored under its output's name
        assert stored.name == out.name and stored.read_bytes() == out.read_bytes()


def test_a_ctrl_c_after_the_output_landed_keeps_its_record(files, tmp_path, monkeypatch):
    """Interrupted between the rename and the return: the output is in place and registered, so its record stays."""
    out = tmp_path / "out"
    real_fsync_dir = fsutil.fsync_dir

    def fsync_dir(path):
        if path == tmp_path:  # the output's folder, synced after the rename
            raise KeyboardInterrupt
        real_fsync_dir(path)

    monkeypatch.setattr(fsutil, "fsync_dir", fsync_dir)
    code, output = run(*COMMANDS["combine"][0](files), "-o", out, "--name", "landed")
    assert code != 0 and len(output.splitlines()) == 1, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with Registry.open() as reg:
        assert tree(Path(reg.get_adapter("landed").path)) == tree(out)


LANDED_COMMANDS = {**{f"{c} -o": (args, "out" if is_dir else "out.safetensors")
                      for c, (args, is_dir) in COMMANDS.items()},
                   "combine": (COMMANDS["combine"][0], None),
                   "export": (lambda f: ["export", f["b"], "--format", "peft"], "out")}
"""The commands that write, each with the name of its -o (None: none)."""


@pytest.mark.parametrize("where", ["in the library", "as click returns"])
@pytest.mark.parametrize("command", sorted(LANDED_COMMANDS))
def test_a_ctrl_c_once_the_result_landed_says_what_landed(files, tmp_path, monkeypatch, command, where):
    """A Ctrl-C after the output was renamed into place and registered (in the library, as it returns; in the
    command, after the summary was said: test_crash's merge case) said "nothing was written"; it says what is there.
    Without -o, combine registers the result alone: that is said too."""
    from factories import interrupted_once_returned
    from loraops import derive

    args, output_name = LANDED_COMMANDS[command]
    out, with_output = tmp_path / str(output_name), output_name is not None
    name = command.split()[0]
    if where == "in the library":  # right after the result landed, as the call builds what it returns
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(derive, "ExportReport" if name == "export" else "DerivedRecord", interrupted)
    else:
        interrupted_once_returned(monkeypatch, name)
    code, output = run(*args(files), *(["-o", out] if with_output else []),
                       *(["--name", "landed"] if name != "export" else []))
    assert code == 130
    said = {"export": f"{out} was written in full"}.get(name, f"{out} was written in full and registered as landed@1"
                                                        if with_output else "the result was registered as landed@1")
    assert output.splitlines()[-1] == f"error: interrupted after {said}", output
    assert os.path.lexists(out) == with_output
    if name != "export":
        with Registry.open() as reg:
            assert reg.get_adapter("landed").ref == "landed@1"


@pytest.mark.parametrize("where", ["in the library", "as click returns"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_ctrl_c_once_a_result_already_registered_landed_says_so(files, tmp_path, monkeypatch, command, where):
    """A result the registry already held (the same identity: not registered again) said "registered as" after a
    Ctrl-C once its -o output landed; it says "already registered as", as the summary does."""
    from factories import interrupted_once_returned
    from loraops import derive

    args, is_dir = COMMANDS[command][0](files), COMMANDS[command][1]
    first, again = (tmp_path / (n if is_dir else f"{n}.safetensors") for n in ("first", "again"))
    code, output = run(*args, "-o", first, "--name", "landed")
    assert code == 0 and output.splitlines()[-1].startswith("registered landed@1 "), output
    registered = registry_state()
    if where == "in the library":
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(derive, "DerivedRecord", interrupted)
    else:
        interrupted_once_returned(monkeypatch, command)
    code, output = run(*args, "-o", again, "--name", "landed")
    assert (code, output.splitlines()[-1]) == (
        130, f"error: interrupted after {again} was written in full and already registered as landed@1"), output
    assert again.exists() and registry_state() == registered


def test_a_library_call_interrupted_once_its_result_landed_says_so(files, tmp_path, monkeypatch):
    """What the CLI says (test_a_ctrl_c_once_the_result_landed_says_what_landed), a library user's KeyboardInterrupt
    carries: derive's commands run under a Landing (landing.watched), as merging.merge does."""
    from loraops import derive

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(derive, "DerivedRecord", interrupted)
    monkeypatch.setattr(derive, "ExportReport", interrupted)
    with pytest.raises(KeyboardInterrupt, match=f"^interrupted after {tmp_path / 'c'} was written in full and "
                                                "registered as c@1$"):
        derive.combine([str(files["a"])], "cat", name="c", output=str(tmp_path / "c"))
    with pytest.raises(KeyboardInterrupt, match="^interrupted after the result was registered as r@1$"):
        derive.resize(str(files["a"]), rank=2, name="r")
    with pytest.raises(KeyboardInterrupt, match=f"^interrupted after {tmp_path / 'e'} was written in full$"):
        derive.export(str(files["a"]), "peft", str(tmp_path / "e"))


@pytest.mark.parametrize("command", sorted(LANDED_COMMANDS))
def test_a_ctrl_c_before_the_result_landed_says_nothing_was_written(files, tmp_path, monkeypatch, command):
    """The other side of test_a_ctrl_c_once_the_result_landed_says_what_landed: interrupted while the result is
    written, nothing is left (no output, no temporary sibling, no registration) and that is what is said."""
    from loraops import formats

    args, output_name = LANDED_COMMANDS[command]
    folder = tmp_path / "outputs"
    folder.mkdir()
    state = registry_state()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(formats, "write_adapter" if command == "export" else "write", interrupted)
    code, output = run(*args(files), *(["-o", folder / output_name] if output_name else []))
    assert (code, output) == (130, "error: interrupted; nothing was written\n")
    assert list(folder.iterdir()) == []
    assert registry_state() == state


@pytest.mark.parametrize("with_output", [False, True], ids=["registered", "-o"])
@pytest.mark.parametrize("command", ["combine", "resize"])
def test_a_ctrl_c_as_the_result_commits_says_what_is_there(files, reg, tmp_path, monkeypatch, command, with_output):
    """A Ctrl-C in the instant after the result's registration committed said "nothing was written" and left it
    registered: without -o, it is the result, said as registered; with -o, whose output had not landed, it was left
    recorded as the output's (from a source that is not there), and is taken back now."""
    from factories import interrupted_as_a_write_commits

    for name in ("a", "b"):
        assert run("register", files[name])[0] == 0
    args = ["combine", "a:0.7", "b:-0.5"] if command == "combine" else ["resize", "b", "--rank", "2"]
    out = tmp_path / "out"
    state, stored = registry_state(), sorted(p.name for p in reg.blobs.folders())
    interrupted_as_a_write_commits(monkeypatch)
    code, output = run(*args, "--name", "landed", *(["-o", out] if with_output else []))
    assert (code, output.splitlines()[-1]) == (130, "error: interrupted; nothing was written" if with_output else
                                               "error: interrupted after the result was registered as landed@1")
    assert not out.exists()
    if with_output:
        assert registry_state() == state and sorted(p.name for p in reg.blobs.folders()) == stored
    else:
        assert registry_state()[0] == sorted([*state[0], "landed@1"]) and reg.verify() == []


@pytest.mark.parametrize("with_output", [False, True], ids=["registered", "-o"])
@pytest.mark.parametrize("command", ["combine", "resize"])
def test_a_ctrl_c_as_an_input_given_by_path_commits_leaves_it_unregistered(files, reg, tmp_path, monkeypatch,
                                                                           command, with_output):
    """An input given by path is registered for the result's lineage, and registered no longer when the command
    fails: one whose registration a Ctrl-C cut as it committed was not known to be the command's, and stayed
    registered after "interrupted; nothing was written" (derive.open_input learns it as it commits now)."""
    from factories import interrupted_as_a_write_commits

    args = ["combine", files["a"], files["b"]] if command == "combine" else ["resize", files["b"], "--rank", "2"]
    out = tmp_path / "out"
    state, stored = registry_state(), sorted(p.name for p in reg.blobs.folders())
    interrupted_as_a_write_commits(monkeypatch)  # the first input's registration
    code, output = run(*args, "--name", "landed", *(["-o", out] if with_output else []))
    assert (code, output) == (130, "error: interrupted; nothing was written\n")
    assert registry_state() == state and sorted(p.name for p in reg.blobs.folders()) == stored
    assert not out.exists()


def test_a_ctrl_c_as_extract_records_a_model_given_by_path_leaves_it_unrecorded(files, tmp_path, monkeypatch):
    """extract records the two models it reads as bases (their lineage), and removes them again when it fails: one
    whose record a Ctrl-C cut as it committed stayed recorded after "interrupted; nothing was written"."""
    from factories import interrupted_as_a_write_commits

    interrupted_as_a_write_commits(monkeypatch)  # the base's record
    code, output = run(*COMMANDS["extract"][0](files), "-o", tmp_path / "out")
    assert (code, output) == (130, "error: interrupted; nothing was written\n")
    assert registry_state() == ([], []) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_registry_error_while_staged_names_the_output(files, tmp_path, monkeypatch, command):
    """The output changed under the registration (here: its weights truncated): the refusal names OUT, the path the
    user gave, not the staged `.loraops-tmp-OUT…/OUT` that is gone once the command ends."""
    args, _ = COMMANDS[command]
    out = tmp_path / "out"
    real_register = Registry.register_adapter

    def register_adapter(self, path, **kwargs):
        if kwargs.get("lineage") is not None:  # the derived output, at its staged path
            weights = next(p for p in ([path] if Path(path).is_file() else Path(path).iterdir())
                           if p.name.endswith(".safetensors") or p == path)
            weights.write_bytes(weights.read_bytes()[:40])
        return real_register(self, path, **kwargs)

    monkeypatch.setattr(Registry, "register_adapter", register_adapter)
    code, output = run(*args(files), "-o", out)
    assert code != 0 and len(output.splitlines()) == 1 and output.startswith("error: "), output
    assert fsutil.TMP_MARK not in output and f"{out}" in output, output
    assert not os.path.lexists(out)


def test_an_unbound_export_refusal_names_the_commands_that_bind_it(tmp_path):
    """Starcoder2's q_proj and lm_head beside its MLP's c_fc/c_proj (PEFT's saved false is the head's): an adapter
    of no recorded class is refused as kohya unbound, and the line gives the commands that write it: `base add` of the
    model its config names (base_model_name_or_path), then the export with --base; once that base is registered,
    the export alone. Run as given, they write PEFT's deltas."""
    import re
    import shlex

    from test_formats_write import LINEAR_FAMILY, assert_peft_deltas, conv1d_family, manifest

    from loraops.check import bind

    config = LINEAR_FAMILY[-1][2]
    base, folder, deltas = conv1d_family(tmp_path, "starcoder2", "Starcoder2ForCausalLM",
                                         r".*(c_fc|c_proj|q_proj|lm_head)", **config)
    out = tmp_path / "k.safetensors"
    runner = CliRunner()
    export = ["export", str(folder), "--format", "kohya", "-o", str(out)]
    result = runner.invoke(main, export)
    assert result.exit_code != 0 and result.output.startswith("error: ") and result.output.count("\n") == 1, \
        result.output
    commands = re.findall(r"`([^`]+)`", result.output)
    assert commands == [f"loraops base add {base} --name base",
                        f"loraops export {folder} --format kohya -o {out} --base base"], result.output
    assert runner.invoke(main, shlex.split(commands[0])[1:]).exit_code == 0
    result = runner.invoke(main, export)
    assert re.findall(r"`([^`]+)`", result.output) == commands[1:], result.output
    result = runner.invoke(main, shlex.split(commands[1])[1:])
    assert result.exit_code == 0, result.output
    assert_peft_deltas(bind(read_adapter(out), manifest(base)), deltas)


def test_an_unbound_export_whose_base_names_several_registered_bases_names_them(tmp_path, monkeypatch):
    """base_model_name_or_path naming several registered bases (a base's name, and another's folder by a relative
    path): the refusal said to `base add` that folder, registered already; it names the bases and the export to run
    with the one chosen, which then works."""
    import re
    import shlex

    from test_formats_write import LINEAR_FAMILY, conv1d_family

    config = LINEAR_FAMILY[-1][2]
    base, folder, _ = conv1d_family(tmp_path, "starcoder2", "Starcoder2ForCausalLM",
                                    r".*(c_fc|c_proj|q_proj|lm_head)", **config)
    monkeypatch.chdir(base.parent)
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": base.name}))
    runner = CliRunner()
    assert runner.invoke(main, ["base", "add", str(base), "--name", "star"]).exit_code == 0
    assert runner.invoke(main, ["base", "add", str(tiny_llama(tmp_path / "o")), "--name", base.name]).exit_code == 0
    out = tmp_path / "k.safetensors"
    result = runner.invoke(main, ["export", str(folder), "--format", "kohya", "-o", str(out)])
    assert result.exit_code != 0 and result.output.count("\n") == 1, result.output
    export = f"loraops export {folder} --format kohya -o {out} --base "
    assert result.output.endswith(f"its base_model_name_or_path {base.name!r} names the registered bases "
                                  f"{base.name}, star: run `{export}NAME` with NAME the one it was trained on\n"), \
        result.output
    assert "base add" not in result.output
    command = re.findall(r"`([^`]+)`", result.output)[-1].replace("NAME", "star")
    assert runner.invoke(main, shlex.split(command)[1:]).exit_code == 0 and out.exists()


def test_the_commands_an_unbound_export_refusal_names_run_as_given(tmp_path, monkeypatch):
    """The named commands work as printed: a base folder given as ~/… (PEFT's base_model_name_or_path as the user
    gave it) is named expanded (quoted, the shell would not expand it); a folder name that is no registry name
    ('tiny base') gives its cleaned form; a name another model holds gives a free one (-2); an export given --force
    keeps it. Each of these printed a command that failed."""
    import re
    import shlex

    from test_formats_write import LINEAR_FAMILY, assert_peft_deltas, conv1d_family, manifest

    from loraops.check import bind

    home = tmp_path / "my home"
    config = LINEAR_FAMILY[-1][2]
    base, folder, deltas = conv1d_family(home, "starcoder2", "Starcoder2ForCausalLM",
                                         r".*(c_fc|c_proj|q_proj|lm_head)", **config)
    base = base.rename(home / "tiny base")
    monkeypatch.setenv("HOME", str(home))
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    names_base = lambda named: {**adapter_config, "base_model_name_or_path": named}  # noqa: E731
    (folder / "adapter_config.json").write_text(json.dumps(names_base("~/tiny base")))
    runner = CliRunner()
    other = tiny_llama(tmp_path / "other")
    assert runner.invoke(main, ["base", "add", str(other), "--name", "tiny-base"]).exit_code == 0
    out = tmp_path / "out dir" / "k.safetensors"
    out.parent.mkdir()
    result = runner.invoke(main, ["export", str(folder), "--format", "kohya", "-o", str(out)])
    assert result.exit_code != 0 and result.output.count("\n") == 1, result.output
    commands = re.findall(r"`([^`]+)`", result.output)
    assert len(commands) == 2, result.output
    for command in commands:
        ran = runner.invoke(main, shlex.split(command)[1:])
        assert ran.exit_code == 0, (command, ran.output)
    assert_peft_deltas(bind(read_adapter(out), manifest(base)), deltas)
    # a Hub id whose name two bases hold already (tiny-base, tiny-base-2); the export given --force (its output exists)
    (folder / "adapter_config.json").write_text(json.dumps(names_base("o/tiny-base")))
    result = runner.invoke(main, ["export", str(folder), "--format", "kohya", "-o", str(out), "--force"])
    assert re.findall(r"`([^`]+)`", result.output) == [
        "loraops base add hub:o/tiny-base --name tiny-base-3",
        f"loraops export {shlex.quote(str(folder))} --format kohya -o {shlex.quote(str(out))} --force "
        "--base tiny-base-3"
    ], result.output


def test_a_name_asked_for_an_adapter_already_registered_is_said_not_used(files, reg):
    """combine / resize --name N whose result is byte for byte an adapter already registered under another name:
    the result stays that record and the line says N was not used, as `register --name` says it (N was dropped
    silently; `merge N` then found no adapter N)."""
    a, b = files["a"], files["b"]
    assert run("combine", a, b, "--method", "cat", "--name", "first")[0] == 0
    code, out = run("combine", a, b, "--method", "cat", "--name", "second")
    assert code == 0, out
    assert out.splitlines()[-1].startswith("already registered as first@1 (id 3, sha256 ")
    assert out.splitlines()[-1].endswith(
        "base tiny; not registered again as 'second': one record per adapter, under its first name")
    assert run("combine", a, b, "--method", "cat", "--name", "first")[1].splitlines()[-1].endswith("base tiny")
    assert run("resize", a, "--rank", 2, "--name", "small")[0] == 0
    code, out = run("resize", a, "--rank", 2, "--name", "tiny-a")
    assert out.splitlines()[-1].endswith("; not registered again as 'tiny-a': one record per adapter, under its first name"), out


def test_a_result_that_fits_no_base_is_named_in_the_error_not_its_scratch_folder(files, reg, tmp_path):
    """Without -o, a combination that fits no base was said of the store's scratch folder
    (`error: …/blobs/.loraops-tmp-scratch-…/adapter: 2 modules do not fit base tiny`): the result's name now."""
    narrow = peft_adapter(tiny_llama(tmp_path / "narrow", hidden=32, intermediate=64), tmp_path / "n", r=2,
                          target_modules=["o_proj"])
    code, out = run("combine", files["a"], narrow, "--method", "cat", "--name", "a-and-n")
    assert code == 2
    assert out.startswith("error: a-and-n: ") and "do not fit base tiny" in out and ".loraops-tmp" not in out, out


def test_a_ctrl_c_a_library_swallows_is_still_an_interruption(files, reg, tmp_path, monkeypatch, capsys):
    """torch's C++ start-up clears whatever its `import numpy` raises: a Ctrl-C that landed there (1–2 s into a
    command, while torch loads) was lost, and the command ran to its end and exited 0. The signal the CLI's handler
    saw is now said once the command returns, as any Ctrl-C after the output landed is (exit 130)."""
    import signal

    from loraops import algebra
    from loraops.cli import exit_status

    real = algebra.combine_lazily

    def swallowing(*args, **kwargs):
        try:  # as torch does: the KeyboardInterrupt raised in its import of numpy, cleared
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(algebra, "combine_lazily", swallowing)
    out = tmp_path / "out"
    code = exit_status(["combine", str(files["a"]), str(files["b"]), "-o", str(out), "--name", "swallowed"])
    error = capsys.readouterr().err
    assert code == 130 and error == f"error: interrupted after {out} was written in full and registered as " \
                                     "swallowed@1\n", error
    assert out.exists() and reg.get_adapter("swallowed")


def test_a_combination_that_is_zero_everywhere_says_so(files, reg):
    """A DARE density of 1e-30 drops every entry: the zero adapter was registered without a word. Each module's
    record says whether it came out zero, and a combination zero in every module is said in a note."""
    import json

    a, b = files["a"], files["b"]
    result = CliRunner().invoke(main, ["combine", str(a), str(b), "--method", "dare_linear", "--density", "1e-30",
                                       "--name", "nothing", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["report"]["modules"] and all(
        m["zero"] for m in json.loads(result.stdout)["report"]["modules"])
    assert result.stderr.splitlines()[-1] == ("note: the dare_linear combination is zero in every module (every entry "
                                              "dropped, or the inputs cancel): merged, it changes nothing")
    result = CliRunner().invoke(main, ["combine", str(a), str(b), "--method", "dare_linear", "--density", "0.5",
                                       "--json"])
    assert result.exit_code == 0 and "zero in every module" not in result.stderr
    assert not any(m["zero"] for m in json.loads(result.stdout)["report"]["modules"])
