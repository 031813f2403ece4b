"""The registry commands through click's CliRunner: output, --json schema, exit codes, exact error text, and bad
input that changes nothing (no record, no blob)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import factories
from factories import kohya_file, peft_adapter, tiny_llama
from loraops import settings, st
from loraops.cli import main
from loraops.errors import InvalidInputError
from loraops.formats import read_adapter
from loraops.registry import Registry, db
from test_registry import KOHYA_MODULES, snapshot

pytestmark = pytest.mark.registry_backend  # the registry's own code: run on PostgreSQL too (conftest.py)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-art")
    base = tiny_llama(d / "llama")
    return {
        "dir": d,
        "base": base,
        "other": tiny_llama(d / "wide", hidden=32, intermediate=64, seed=5),
        "ad1": peft_adapter(base, d / "ad1", r=4, alpha=8),
        "kohya": kohya_file(d / "style.safetensors", KOHYA_MODULES, rank=4, alpha=2),
    }


def cli(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def test_register_list_show_rm(art):
    out = cli("base", "add", art["base"], "--name", "llama-tiny").output
    assert out.startswith("added base llama-tiny (id 1, fingerprint ")
    assert "21 tensors, 90,432 parameters, float32" in out
    out = cli("register", art["ad1"], "--tag", "chat").output
    assert out.startswith("registered ad1@1 (id 1, sha256 ") and out.endswith(
        "peft, 14 modules, rank 4, alpha 8, base llama-tiny\n")
    assert cli("register", art["ad1"]).output.startswith("already registered as ad1@1 (id 1, sha256 ")
    cli("register", art["kohya"], "--name", "anime-style", "--base", "llama-tiny", "--tag", "sd", "--tag", "style")
    rows = cli("list").output.splitlines()
    assert rows[0].split() == ["id", "name", "format", "rank", "alpha", "modules", "params", "base", "tags", "sha256"]
    assert [r.split()[1] for r in rows[2:]] == ["ad1@1", "anime-style@1"]
    assert [r.split()[1] for r in cli("list", "--target", "v_proj").output.splitlines()[2:]] == ["ad1@1"]
    assert [r.split()[1] for r in cli("list", "--tag", "style", "--rank", "4").output.splitlines()[2:]] == ["anime-style@1"]

    shown = json.loads(cli("show", "anime-style", "--json").output)
    for key in ("id", "name", "version", "sha256", "format", "base", "rank", "alpha", "target_modules", "modules",
                "tags", "source", "created", "lineage"):
        assert key in shown
    assert shown["base"]["name"] == "llama-tiny" and len(shown["base"]["fingerprint"]) == 64
    assert shown["rank"] == 4 and shown["alpha"] == 2 and shown["tags"] == ["sd", "style"]
    assert shown["modules"][0].keys() == {"name", "rank", "alpha", "scale", "in_features", "out_features", "kind", "kernel"}
    listed = json.loads(cli("list", "--json", "--base", "llama-tiny").output)
    # show alone reads the stored file for lora_bias (no column): list prints the record without it
    assert shown.pop("lora_bias") is False
    assert [a["name"] for a in listed] == ["ad1", "anime-style"] and listed[1] == shown
    text = cli("show", shown["sha256"][:8]).output
    assert "name            anime-style@1" in text and "model.layers.1.mlp.down_proj" in text

    assert cli("rm", "anime-style").output.startswith("removed anime-style@1 (id 2, sha256 ")
    assert not os.path.exists(shown["path"])
    assert cli("show", "anime-style", code=3).stderr == "error: no adapter 'anime-style' in the registry " \
        "(give a name, name@version, id or sha256 prefix of 6+ hex digits)\n"


def test_register_and_show_give_the_range_of_mixed_ranks_and_alphas(art):
    from test_inspect_cli import mixed_kohya

    path = mixed_kohya(art["dir"] / "mixed.safetensors")
    assert cli("register", path).output.endswith(", 3 modules, rank mixed (2–16), alpha mixed (1–8), base -\n")
    out = cli("show", "mixed").output
    assert "\nrank            mixed (2–16)\nalpha           mixed (1–8)\n" in out
    assert "kohya   mixed (2–16)  mixed (1–8)        3" in cli("list", "--name", "mixed").output
    cli("rm", "mixed")


def test_register_again_links_its_base_and_keeps_its_name(art):
    """Registering an adapter that is already registered: --base links it (one line says so), another --name does
    not rename it (said too); a base it does not fit is refused and changes nothing."""
    sha = cli("register", art["kohya"], "--name", "style", "--json").output
    sha = json.loads(sha)["adapter"]["sha256"][:12]
    cli("base", "add", art["base"], "--name", "llama-tiny")
    cli("base", "add", art["other"], "--name", "wide")
    assert cli("register", art["kohya"], "--base", "wide", code=2).stderr.startswith(
        f"error: {art['kohya']}: 2 modules do not fit base wide: model.layers.0.self_attn.q_proj (adapter 64×64, ")
    assert json.loads(cli("show", "style", "--json").output)["base"] is None
    out = cli("register", art["kohya"], "--name", "anime", "--base", "llama-tiny").output
    assert out == (f"already registered as style@1 (id 1, sha256 {sha}); not registered again as 'anime': one record "
                   "per adapter, under its first name; linked to base llama-tiny\n")
    shown = json.loads(cli("show", "style", "--json").output)
    assert shown["base"]["name"] == "llama-tiny" and shown["target_modules"] == ["down_proj", "q_proj"]
    assert cli("register", art["kohya"], "--base", "llama-tiny").output == \
        f"already registered as style@1 (id 1, sha256 {sha})\n"
    assert cli("show", "anime", code=3).stderr.startswith("error: no adapter 'anime' in the registry")


@pytest.mark.parametrize("command, what", [
    (["register", "{ad1}"], "adapter"), (["combine", "{ad1}", "{ad1}"], "adapter"),
    (["resize", "{ad1}", "--rank", "2"], "adapter"), (["pull", "someone/x"], "adapter"), (["base", "add", "{base}"], "base"),
    (["base", "add", "hub:someone/x"], "base"),
    (["merge", "{ad1}", "--into", "{base}", "-o", "{tmp}/out", "--device", "cpu"], "base"),
])
def test_an_empty_name_is_an_error_everywhere(art, tmp_path, command, what):
    with Registry.open() as reg:
        before = snapshot(reg)
    args = [a.format(ad1=art["ad1"], base=art["base"], tmp=tmp_path) for a in command]
    result = cli(*args, "--name", "", code=2)
    assert result.output == f"error: empty {what} name: give a name, or leave --name out for the default\n"
    with Registry.open() as reg:
        assert snapshot(reg) == before
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["merge", "{ad1}", "--into", "{base}", "-o", "{tmp}/out"],
                                     ["combine", "{ad1}", "{ad1}", "-o", "{tmp}/out"], ["resize", "{ad1}", "--rank", "2"]])
@pytest.mark.parametrize("device", ["", " ", "gpu"])
def test_a_device_that_is_none_of_the_accepted_ones_is_an_error(art, tmp_path, command, device):
    """An empty --device is not 'auto' (that is what leaving it out means): an error naming the accepted values."""
    with Registry.open() as reg:
        before = snapshot(reg)
    args = [a.format(ad1=art["ad1"], base=art["base"], tmp=tmp_path) for a in command]
    result = cli(*args, "--device", device, code=2)
    assert result.output == f"error: unknown device {device.strip()!r}: use cpu, cuda, cuda:N or auto\n"
    with Registry.open() as reg:
        assert snapshot(reg) == before
    assert list(tmp_path.iterdir()) == []


def test_base_commands(art):
    cli("base", "add", art["base"])
    cli("register", art["ad1"])
    assert cli("base", "add", art["base"], "--name", "again").output.startswith("already registered as base llama (id 1,")
    rows = cli("base", "list").output.splitlines()
    assert rows[2].split()[:5] == ["1", "llama", "21", "90,432", "float32"]
    shown = json.loads(cli("base", "show", "llama", "--json").output)
    assert shown["name"] == "llama" and shown["num_tensors"] == 21 and shown["derived"] is False
    assert "fingerprint  " in cli("base", "show", "1").output
    err = cli("base", "rm", "llama", code=4).stderr
    assert err == "error: base 'llama' is still used by 1 adapter(s) (ad1@1); use --force to remove it anyway\n"
    assert cli("base", "rm", "llama", "--force").output.startswith("removed base llama (id 1); its files at ")
    assert json.loads(cli("show", "ad1", "--json").output)["base"] is None
    assert cli("base", "show", "llama", code=3).stderr == "error: no base 'llama' in the registry (see `loraops base list`)\n"


def test_check(art):
    cli("base", "add", art["base"], "--name", "llama-tiny")
    cli("base", "add", art["other"], "--name", "wide")
    cli("register", art["kohya"], "--name", "style")  # no base known: check tries every registered base
    lines = cli("check", "style").stdout.splitlines()  # fits one: exit 0
    assert lines[:2] == ["style@1 fits llama-tiny: 2/2 modules match", "style@1 does not fit wide: 0/2 modules match"]
    assert json.loads(cli("check", "style", "--json").output)["fits"] == ["llama-tiny"]
    out = cli("check", "style", "--base", "llama-tiny").output
    assert out == "style@1 fits llama-tiny: 2/2 modules match\n"
    result = cli("check", art["ad1"], "--base", "wide", code=2)
    lines = result.stdout.splitlines()
    assert lines[0] == f"{art['ad1']} does not fit wide: 0/14 modules match"
    assert "  model.layers.0.mlp.down_proj (adapter 64×128, base 32×64)" in lines
    assert len(lines) == 15  # every mismatch listed
    assert result.stderr == f"error: {art['ad1']} does not fit base wide; it was made for {art['base']}\n"
    data = json.loads(cli("check", art["ad1"], "--base", art["base"], "--json").output)
    assert data["fits"] == [str(art["base"])] and data["reports"][0]["matched"] == 14


def test_check_of_registered_adapters_imports_no_torch(art):
    """`check REF` reads the stored copy's headers and the bases' records or files: in a fresh interpreter it runs
    without torch (st.without_torch, as check of two paths) and says, byte for byte, what the read with torch's meta
    tensors says in this process (torch loaded), fits and misfits alike. It imported torch: 3.0 s where 0.8 s do."""
    cli("base", "add", art["base"], "--name", "llama-tiny")
    cli("base", "add", art["other"], "--name", "wide")
    cli("register", art["kohya"], "--name", "style")
    cli("register", art["ad1"], "--name", "ad1", "--base", "llama-tiny")
    for args, code in [(["style"], 0), (["ad1"], 0), (["ad1", "--base", "wide"], 2),
                       (["ad1", "--base", art["other"], "--json"], 2)]:  # every base, the recorded one, named, a path
        imported, fresh, loaded = factories.fresh_cli_against_loaded("check", *args)
        assert "torch" not in imported and fresh == loaded, (args, imported, fresh, loaded)
        assert fresh[0] == code, (args, fresh)


def tensors_file(path, tensors, metadata=None):
    st.write_safetensors(path, tensors, metadata)
    return path


P = "base_model.model.model.layers.0.self_attn.q_proj"


def bad_inputs(d):
    """name → path of a bad adapter; EXPECTED[name] is its exact error line ({path} filled in)."""
    d.mkdir(exist_ok=True)
    A, B = torch.ones(4, 64), torch.ones(64, 4)
    text = d / "notes.safetensors"
    text.write_text("these are not tensors, just some text long enough")
    pickle = d / "adapter.bin"
    pickle.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    whole = tensors_file(d / "whole.safetensors", {f"{P}.lora_A.weight": A, f"{P}.lora_B.weight": B})
    truncated = d / "truncated.safetensors"
    truncated.write_bytes(whole.read_bytes()[:-100])
    return {
        "missing": d / "nope",
        "not-safetensors": text,
        "truncated": truncated,
        "pickle": pickle,
        "rank-mismatch": tensors_file(d / "rank.safetensors", {f"{P}.lora_A.weight": A, f"{P}.lora_B.weight": torch.ones(64, 3)}),
        "partner-missing": tensors_file(d / "partner.safetensors", {f"{P}.lora_A.weight": A}),
        "unknown-layout": tensors_file(d / "layout.safetensors", {"model.embed.weight": A}),
        "nan": tensors_file(d / "nan.safetensors", {f"{P}.lora_A.weight": torch.full((4, 64), float("nan")),
                                                    f"{P}.lora_B.weight": B}),
    }


EXPECTED = {
    "missing": (3, "{path}: no such file or folder"),
    "not-safetensors": (2, "{path}: not a safetensors file: it begins with text ('these ar'…), as a JSON, YAML or notes "
                           "file does"),
    "truncated": (2, f"{{path}}: corrupt safetensors header (tensor '{P}.lora_B.weight': data ends at byte 2048, past the "
                     "end of the file (truncated?))"),
    "pickle": (2, "{path}: a pickle (PyTorch .bin/.pt) file, which can run code when loaded; convert it to safetensors "
                  "first (e.g. safetensors.torch.save_file(torch.load(f, weights_only=True), 'out.safetensors'))"),
    "rank-mismatch": (2, f"{{path}}: module 'model.layers.0.self_attn.q_proj': rank mismatch: A has rank 4, B has rank 3 "
                         f"({P}.lora_A.weight 4×64, {P}.lora_B.weight 64×3)"),
    "partner-missing": (2, f"{{path}}: '{P}.lora_A.weight' has no matching B tensor for module "
                           "'model.layers.0.self_attn.q_proj'"),
    "unknown-layout": (2, "{path}: not a LoRA adapter (unknown key layout): 'model.embed.weight'"),
    "nan": (2, f"{{path}}: tensor '{P}.lora_A.weight' contains NaN or Inf"),
}


def test_bad_input_changes_nothing(art, tmp_path):
    cli("base", "add", art["base"], "--name", "llama-tiny")
    cli("register", art["ad1"])
    with Registry.open() as reg:
        before = snapshot(reg)
    for name, path in bad_inputs(tmp_path / "bad").items():
        code, message = EXPECTED[name]
        assert cli("register", path, "--alpha", "8", code=code).stderr == f"error: {message.format(path=path)}\n", name
    assert cli("register", art["kohya"], "--base", "nope", code=3).stderr == \
        "error: no base 'nope' in the registry (see `loraops base list`)\n"
    err = cli("register", art["kohya"], "--base", "llama-tiny", "--name", "other", "--alpha", "1e400", code=2).stderr
    assert err.startswith("error: invalid value for '--alpha': '1e400' is not a finite number")  # (cli.FLOAT)
    err = cli("register", art["kohya"], "--base", "llama-tiny", "--name", "other", "--alpha", "1e300", code=2).stderr
    assert err.startswith(f"error: {art['kohya']}: ")
    with Registry.open() as reg:
        assert snapshot(reg) == before


def test_ambiguous_prefix_cli(art, monkeypatch):
    shas = {"ad1": "abcdef01" + "0" * 56, "style.safetensors": "abcdef02" + "0" * 56}
    shas.update({sha: sha for sha in shas.values()})  # the stored copies, in folders named by identity
    monkeypatch.setattr("loraops.formats.identity", lambda path, **_: shas[Path(path).name])
    cli("register", art["ad1"])
    cli("register", art["kohya"])
    err = cli("show", "abcdef", code=3).stderr
    assert err == ("error: adapter reference 'abcdef' matches several adapters (ad1@1 abcdef010000, style@1 abcdef020000); "
                   "give more of the sha256, or name@version\n")


def test_verify_gc_and_db(art):
    cli("register", art["ad1"])
    assert cli("verify").output == "all stored files of 1 adapter(s) match their sha256\n"
    shown = json.loads(cli("show", "ad1", "--json").output)
    weights = os.path.join(shown["path"], "adapter_model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[100] ^= 1
    open(weights, "wb").write(bytes(data))
    result = cli("verify", code=6)
    assert result.stdout.startswith(f"ad1@1: {weights}: sha256 ")
    assert result.stderr == ("error: 1 stored file(s) missing or changed; re-register those adapters from their "
                             "originals\n")
    extra = os.path.join(shown["path"], "notes.txt")  # (a file no record holds: said apart, with its own remedy)
    open(extra, "w").write("mine")
    result = cli("verify", code=6)
    assert result.stdout.endswith(f"ad1@1: {extra}: not recorded: no record holds it (remove it)\n")
    assert result.stderr == ("error: 1 stored file(s) missing or changed; re-register those adapters from their "
                             "originals; 1 file(s) in stored adapter folders that no record holds; remove them\n")
    assert cli("gc", "--grace", "0").output == "removed 0 item(s), 0 B\n"
    assert cli("db", "current").output.endswith(f": revision {db.HEAD} (head)\n")
    assert cli("db", "upgrade").output.endswith(f": already at revision {db.HEAD} (head)\n")


def test_help_and_reads_import_no_torch_nor_sqlalchemy(art):
    """Reads go straight over the database driver (loraops.registry.reads) once the schema is at head."""
    code = ("import sys; from loraops.cli import main\n"
            "for args in (['--help'], ['list'], ['list', '--base', 'llama', '--rank', '4'], ['show', 'ad1', '--json'],\n"
            "             ['base', 'list'], ['base', 'show', 'llama']):\n"
            "    try: main(args)\n"
            "    except SystemExit as e: assert not e.code, (args, e.code)\n"
            "heavy = [m for m in ('torch', 'safetensors', 'sqlalchemy', 'alembic', 'huggingface_hub') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    cli("base", "add", art["base"])
    cli("register", art["ad1"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.no_registry
@pytest.mark.parametrize("url, says", [
    ("foo://", "cannot use the registry at foo://: Can't load plugin"),
    ("garbage", "the registry URL is not a SQLAlchemy database URL"),
    ("mysql://me:secret@localhost/x", "cannot use the registry at mysql://me:***@localhost/x: its database driver is not"),
    ("postgresql+psycopg://me:secret@127.0.0.1:1/x", "cannot open the registry at postgresql+psycopg://me:***@127.0.0.1:1/x"),
    # (a port that is no number: the driver refuses it, then naming the URL failed: a traceback from `list`)
    ("postgresql+psycopg://me:secret@127.0.0.1:abc/x", "the registry URL is not a SQLAlchemy database URL"),
])
@pytest.mark.parametrize("command", [["list"], ["db", "current"], ["db", "upgrade"]])
def test_unusable_registry_urls_are_one_line_errors(url, says, command, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAOPS_BLOBS", str(tmp_path / "blobs"))  # (a server registry needs one: test_team)
    result = cli("--db", url, *command, code=6)
    assert result.output.startswith(f"error: {says}") and len(result.output.splitlines()) == 1, result.output
    assert "secret" not in result.output


@pytest.mark.no_registry
def test_an_unreachable_server_is_the_same_line_for_reads_and_writes(art, tmp_path, monkeypatch):
    """`list` (over the driver) and `register` / `db current` (over SQLAlchemy) said one refused connection in two
    ways: the latter with SQLAlchemy's "(psycopg.OperationalError) " before the driver's line."""
    monkeypatch.setenv("LORAOPS_BLOBS", str(tmp_path / "blobs"))
    url = "postgresql+psycopg://me@127.0.0.1:1/x"
    said = {cli("--db", url, *args, code=6).output for args in (["list"], ["register", art["ad1"]], ["db", "current"])}
    assert len(said) == 1 and next(iter(said)).startswith(f"error: cannot open the registry at {url}: connection "
                                                          "failed: "), said


@pytest.mark.no_registry
def test_db_current_does_not_create_a_registry(tmp_path):
    url = f"sqlite:///{tmp_path}/missing/registry.db"
    assert cli("--db", url, "db", "current").output == \
        f"{url}: no registry there yet (a command that records creates it, as does `loraops db upgrade`)\n"
    assert not (tmp_path / "missing").exists()


@pytest.mark.no_registry
@pytest.mark.parametrize("command", [
    ["list"], ["show", "x"], ["check", "x"], ["base", "list"], ["base", "show", "x"], ["rm", "x"], ["base", "rm", "x"],
    ["verify"], ["gc"], ["export", "x", "--format", "peft", "-o", "{tmp}/out"], ["push", "x", "me/x"],
    ["merge", "x", "--into", "y", "-o", "{tmp}/out", "--no-record"],
])
def test_commands_that_add_no_record_refuse_a_missing_registry_file(tmp_path, command):
    """A mistyped --db: commands that only read (or change records that would have to exist) say there is no such
    registry, naming the file, instead of creating an empty one there; those that record create it as ever."""
    typo = tmp_path / "regsitry.db"
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    result = cli("--db", f"sqlite:///{typo}", *args, code=6)
    assert result.output == (f"error: no registry at {typo}: the file does not exist (a mistyped --db or LORAOPS_DB? "
                             "a command that records creates it, as does `loraops db upgrade`)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.no_registry
@pytest.mark.parametrize("command", [["list"], ["show", "x"], ["base", "list"], ["gc"]])
def test_commands_that_add_no_record_refuse_an_empty_file_as_registry(tmp_path, command):
    """An empty file is what SQLite opens as an empty database: `--db sqlite:///notes.txt list` (an empty file, a
    0-byte placeholder) wrote the registry's tables into it (139 KB) and listed nothing, as a missing file would have
    been created; it is refused as one, and left as it was."""
    empty = tmp_path / "notes.txt"
    empty.write_bytes(b"")
    result = cli("--db", f"sqlite:///{empty}", *command, code=6)
    assert result.output == (f"error: no registry at {empty}: the file is empty (a mistyped --db or LORAOPS_DB? "
                             "a command that records creates it, as does `loraops db upgrade`)\n")
    assert empty.read_bytes() == b"" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert cli("--db", f"sqlite:///{empty}", "db", "current").output.endswith(": no registry there yet (a command "
                                                                              "that records creates it, as does "
                                                                              "`loraops db upgrade`)\n")


@pytest.mark.no_registry
def test_commands_that_record_create_the_registry_file(tmp_path, art):
    url = f"sqlite:///{tmp_path}/new/registry.db"
    assert cli("--db", url, "register", art["ad1"]).output.startswith("registered ad1@1")
    assert [a["name"] for a in json.loads(cli("--db", url, "list", "--json").output)] == ["ad1"]


def test_an_unwritable_output_is_bad_input_naming_the_users_path(art, tmp_path, monkeypatch):
    """A folder the file system refuses (read-only, no permission: root ignores chmod, so the refusal is injected)
    is exit 2 like other bad input, and the message names the output asked for, not the temporary sibling."""
    import errno

    from loraops import fsutil

    def refuse(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp / "adapter_model.safetensors"))

    monkeypatch.setattr(fsutil, "fsync_tree", refuse)
    out = tmp_path / "ro" / "exported"
    result = cli("export", art["ad1"], "--format", "peft", "-o", out, code=2)
    assert result.output == f"error: {out}/adapter_model.safetensors: Permission denied\n"
    assert fsutil.user_path(tmp_path / f"{fsutil.TMP_MARK}x.safetensors.0a1b2c3d") == str(tmp_path / "x.safetensors")
    assert not [p for p in (tmp_path / "ro").iterdir()]


def test_a_default_name_starts_with_a_letter_or_digit(art, tmp_path):
    """A folder or file whose name starts with '_' (or '+') gave that name as the default, which check_name refuses:
    `register _lora` failed "bad adapter name '_lora'" for a name the user never gave. Such characters are dropped."""
    import shutil

    folder = shutil.copytree(art["ad1"], tmp_path / "_lora")
    assert cli("register", folder).output.startswith("registered lora@1 ")
    single = tmp_path / "+tiny.safetensors"
    shutil.copy(art["base"] / "model.safetensors", single)
    assert cli("base", "add", single).output.startswith("added base tiny ")


def test_list_name_refuses_a_reference(art):
    """`list --name a@1` listed nothing (no name holds '@'), as if no such adapter were registered; so did an empty
    --name, --tag or --target."""
    cli("register", art["ad1"], "--name", "a")
    assert cli("list", "--name", "a@1", code=2).output == (
        "error: 'a@1' is a reference, not a name: list --name takes the name alone (`loraops show a@1` shows that "
        "version)\n")
    assert [r.split()[1] for r in cli("list", "--name", "a").output.splitlines()[2:]] == ["a@1"]
    for option in ("--name", "--tag", "--target"):  # ("an empty --name is an error everywhere": list listed nothing)
        assert cli("list", option, "", code=2).output == (f"error: empty {option[2:]}: give one, or leave that filter "
                                                          "out\n")


def test_base_add_of_moved_files_says_the_record_follows_them(art, tmp_path):
    """The same model added from a new place once its recorded files are gone moves the record there: it said only
    "already registered as base …", the change unsaid."""
    import shutil

    first = shutil.copytree(art["base"], tmp_path / "here")
    cli("base", "add", first, "--name", "llama-tiny")
    moved = first.rename(tmp_path / "there")
    shown = cli("base", "show", "llama-tiny", "--json")  # (it said nothing of the files gone)
    assert json.loads(shown.stdout)["path"] == str(first) and shown.stderr == (
        f"note: base llama-tiny: its files at {first} are missing (moved? `loraops base add` them where they are now: "
        "the record follows them)\n")
    result = cli("base", "add", moved)
    assert result.stdout.startswith("already registered as base llama-tiny (id 1, ")
    assert result.stderr == (f"note: base llama-tiny: its files were no longer at {first}; recorded at {moved} now\n")
    assert cli("base", "add", moved).stderr == cli("base", "show", "llama-tiny").stderr == ""  # (nothing moved now)
    with Registry.open() as reg:
        assert reg.get_base("llama-tiny").path == str(moved)


def test_base_add_refuses_an_adapter(art):
    result = cli("base", "add", art["ad1"], code=2)
    assert result.output == f"error: {art['ad1']}: this is a LoRA adapter, not a base model; register it with `loraops register {art['ad1']}`\n"


@pytest.mark.sqlite_only  # a database file in a folder
def test_a_registry_in_a_folder_that_cannot_be_written_is_read_only(art, isolated_home):
    """An SQLite registry in WAL mode cannot even be read from a folder the process may not write (the -shm file):
    it is opened read-only instead, reads work, and anything that would record says why it cannot."""
    cli("register", art["ad1"], "--name", "ad1")
    folders = [str(isolated_home), str(isolated_home / "blobs")]  # (a read-only share: its store too)
    if os.geteuid() == 0:  # root ignores permission bits; the immutable attribute stops it
        if subprocess.run(["chattr", "+i", *folders], capture_output=True).returncode != 0:
            pytest.skip("needs chattr (running as root)")
        undo = ["chattr", "-i", *folders]
    else:
        for folder in folders:
            Path(folder).chmod(0o555)
        undo = ["chmod", "755", *folders]
    try:
        assert "ad1@1" in cli("list").output
        assert cli("verify").output.startswith("all stored files of 1 adapter(s) match")
        refused = cli("merge", art["ad1"], "--into", art["base"], "-o", isolated_home.parent / "merged", code=6)
        assert refused.output.endswith("--no-record writes the output without recording it\n")
        assert not (isolated_home.parent / "merged").exists()  # refused before the merge ran
        cli("merge", art["ad1"], "--into", art["base"], "-o", isolated_home.parent / "merged", "--no-record")
        result = cli("register", art["kohya"], code=6)
        assert result.output == (f"error: the registry {isolated_home}/registry.db is read-only here (it is in a folder "
                                 "this process cannot write): nothing can be recorded\n")
        # combine and resize register their result: refused as register is, before computing (they failed once
        # computed, "error: …/blobs: Permission denied", exit 2); `db current` reads (it failed "attempt to write a
        # readonly database", exit 6)
        for args in (["combine", "ad1", "ad1", "--name", "twice"], ["resize", "ad1", "--rank", "2"]):
            assert cli(*args, code=6).output == result.output, args
        assert cli("db", "current").output == f"sqlite:///{isolated_home}/registry.db: revision {db.HEAD} (head)\n"
    finally:
        subprocess.run(undo, check=True)
    assert [r.name for r in Registry.open().list_adapters()] == ["ad1"]


@pytest.mark.sqlite_only
def test_a_second_sqlite_registry_keeps_its_own_blob_store(art, isolated_home, tmp_path):
    """gc and rm remove the stored files no record of their own registry uses: a second registry on the home's
    store deleted the first one's adapters. An SQLite registry elsewhere keeps its files beside it."""
    first = f"sqlite:///{isolated_home / 'registry.db'}"  # --db sets LORAOPS_DB for the rest of this process
    cli("--db", first, "register", art["ad1"], "--name", "first")
    second = f"sqlite:///{tmp_path / 'second.db'}"
    cli("--db", second, "register", art["kohya"], "--name", "other")
    assert (tmp_path / "second.db.blobs").is_dir()
    cli("--db", second, "gc", "--grace", "0")
    cli("--db", second, "rm", "other")
    cli("--db", second, "gc", "--grace", "0")
    assert cli("--db", first, "verify").output.startswith("all stored files of 1 adapter(s) match")


@pytest.mark.sqlite_only
@pytest.mark.parametrize("form", ["sqlite+pysqlite:///{}", "sqlite:///{}?timeout=5", "sqlite:///file:{}?uri=true",
                                  "sqlite:///file://{}?uri=true", "sqlite:///file:{}?uri=true&mode=rwc"])
def test_every_url_of_an_sqlite_file_keeps_its_own_blob_store(art, tmp_path, form):
    """Only `sqlite:///PATH` put the store beside the file: any other URL of an SQLite file (a driver named, a
    query, a file: URI) used the home's store, and `gc` on it removed every adapter the home's registry stored."""
    cli("register", art["ad1"], "--name", "home")
    second = form.format(tmp_path / "sp ace.db").replace(" ", "%20")
    cli("--db", second, "register", art["kohya"], "--name", "other")
    assert (tmp_path / "sp ace.db").is_file() and (tmp_path / "sp ace.db.blobs").is_dir()
    assert cli("--db", second, "gc", "--grace", "0").output == "removed 0 item(s), 0 B\n"
    assert cli("--db", settings.home_db_url(), "verify").output.startswith("all stored files of 1 adapter(s) match")


@pytest.mark.sqlite_only
@pytest.mark.parametrize("url", ["sqlite://", "sqlite+pysqlite://", "sqlite:///:memory:", "sqlite:///file::memory:?uri=true",
                                 "sqlite:///file:x?mode=memory&uri=true", "sqlite:///file:x?vfs=memdb&uri=true",
                                 "sqlite:///file:?uri=true"])
def test_an_sqlite_database_in_no_file_is_refused(art, url, tmp_path, monkeypatch):
    """In memory, or SQLite's private temporary database (an empty file: URI): what was recorded there was gone
    with the command, and with no file to keep a store beside, `gc` there removed the home's stored adapters.
    The file: URI forms (uri=true) were taken for files, and `register` said it registered."""
    cli("register", art["ad1"], "--name", "home")
    monkeypatch.chdir(tmp_path)
    for command in (["register", art["kohya"]], ["gc", "--grace", "0"]):
        result = cli("--db", url, *command, code=6)
        assert result.output.startswith(f"error: {url}: an in-memory SQLite database cannot hold a registry")
    assert list(tmp_path.iterdir()) == []
    assert cli("--db", settings.home_db_url(), "verify").output.startswith("all stored files of 1 adapter(s) match")


def test_a_damaged_stored_copy_is_not_used_and_registering_the_original_repairs_it(art):
    """A stored file that changed (or went missing) is refused where the adapter is loaded, not merged silently
    under the record's sha256; registering the original again, as `verify` advises, restores it."""
    from pathlib import Path

    cli("base", "add", art["base"], "--name", "llama-tiny")
    cli("register", art["ad1"], "--name", "chat", "--base", "llama-tiny")
    with Registry.open() as reg:
        stored = Path(reg.get_adapter("chat").path) / "adapter_model.safetensors"
    intact = stored.read_bytes()
    data = bytearray(intact)
    data[20] ^= 0x55  # in its header: `check`, which reads headers only, said the file was no safetensors file
    stored.write_bytes(bytes(data))
    assert "its stored copy" in cli("check", "chat", code=6).output
    data = bytearray(intact)
    data[-1] ^= 0x01
    stored.write_bytes(bytes(data))
    out = art["dir"] / "damaged-merge"
    result = cli("merge", "chat", "--into", "llama-tiny", "-o", out, "--no-record", code=6)
    assert "its stored copy" in result.output and "is changed (sha256" in result.output and not out.exists()
    assert cli("register", art["ad1"]).output.startswith("already registered as chat@1")
    assert cli("verify").output.startswith("all stored files of 1 adapter(s) match")
    cli("merge", "chat", "--into", "llama-tiny", "-o", out, "--no-record")


def test_show_says_a_stored_copy_that_is_missing_or_of_another_size(art):
    """`show` still shows the record of an adapter whose stored copy is damaged (the source to register again is in
    it), and says on stderr what a stat finds (no hashing: `verify` does that); it said nothing."""
    from pathlib import Path

    cli("register", art["ad1"], "--name", "cut")
    cli("register", art["kohya"], "--name", "gone")
    assert cli("show", "cut").stderr == ""
    cut, gone = (Path(json.loads(cli("show", n, "--json").output)["path"]) for n in ("cut", "gone"))
    weights = cut / "adapter_model.safetensors"
    size = sum(f.stat().st_size for f in cut.iterdir())
    left = size - weights.stat().st_size + 100
    os.truncate(weights, 100)
    result = cli("show", "cut")
    assert "name            cut@1" in result.stdout
    assert result.stderr == (f"note: cut@1: its stored copy {cut} holds {left:,} "
                             f"bytes, {size:,} recorded; `loraops verify` checks every stored file, registering its "
                             "original again repairs it\n")
    gone.unlink()
    result = cli("show", "gone", "--json")
    assert json.loads(result.stdout)["name"] == "gone" and f"its stored copy {gone} is missing;" in result.stderr
    cli("register", art["ad1"])
    cli("register", art["kohya"])
    assert cli("show", "cut").stderr == cli("show", "gone").stderr == ""
    cli("rm", "cut"), cli("rm", "gone")


def test_an_interrupt_in_clicks_own_code_exits_130(monkeypatch, capsys):
    """A Ctrl-C that lands in click itself — here while the top context closes, after the command returned — is
    "error: interrupted", exit 130; click's standalone mode made it "Aborted!" and exit 1."""
    import click

    from loraops.cli import exit_status

    close = click.Context._close_with_exception_info

    def interrupted_close(self, *exc_info):
        result = close(self, *exc_info)
        if self.parent is None:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(click.Context, "_close_with_exception_info", interrupted_close)
    assert exit_status(["list"]) == 130
    assert capsys.readouterr().err.endswith("error: interrupted\n")


@pytest.mark.sqlite_only
@pytest.mark.parametrize("form", ["sqlite:///~/reg.db", "sqlite:///file:~/reg.db?uri=true"])
def test_a_tilde_in_an_sqlite_url_is_the_home_folder(art, tmp_path, monkeypatch, form):
    """`--db sqlite:///~/reg.db` opened ./~/reg.db (a folder named '~' in the current one) while the blob store went
    beside ~/reg.db: the engine, the store, the read-only checks and `list`'s plain reads now all open the same file."""
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    missing = cli("--db", form, "list", code=6)  # a command that only reads names the file it looked for
    assert missing.stderr.startswith(f"error: no registry at {home}/reg.db: the file does not exist")
    cli("--db", form, "register", art["kohya"], "--name", "style")
    assert (home / "reg.db").is_file() and (home / "reg.db.blobs").is_dir() and list(elsewhere.iterdir()) == []
    assert [row.split()[1] for row in cli("--db", form, "list").output.splitlines()[2:]] == ["style@1"]
    assert cli("--db", form, "verify").output.startswith("all stored files of 1 adapter(s) match")
    current = cli("--db", form, "db", "current").output
    assert str(home / "reg.db") in current and current.endswith(f": revision {db.HEAD} (head)\n")
    if "?" not in form:  # `list` of a plain URL reads the file straight over sqlite3 (registry/reads.py)
        code = ("import sys; from loraops.cli import main\n"
                "try: main(['list'])\n"
                "except SystemExit as e: assert not e.code, e.code\n"
                "assert 'sqlalchemy' not in sys.modules\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={
            **os.environ, "LORAOPS_DB": form, "PYTHONPATH": str(Path(settings.__file__).parents[1])})
        assert done.returncode == 0 and "style@1" in done.stdout, done.stderr
    assert list(elsewhere.iterdir()) == []


@pytest.mark.sqlite_only
@pytest.mark.parametrize("form", ["sqlite:///./~/reg.db", "sqlite:///./~nobody-here/reg.db",
                                  "sqlite:///file:./~/reg.db?uri=true"])
def test_a_tilde_after_dot_slash_is_a_folder_of_that_name(art, tmp_path, monkeypatch, form):
    """Only a leading ~ is a home: `./~/reg.db` names a folder called '~' in the current one, the way to say so
    (pathlib dropped the './', and the registry went to the home folder, or ~nobody-here was "no user")."""
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    folder = elsewhere / form.split("./")[1].split("/")[0]
    cli("--db", form, "register", art["kohya"], "--name", "style")
    assert (folder / "reg.db").is_file() and (folder / "reg.db.blobs").is_dir() and list(home.iterdir()) == []
    assert [row.split()[1] for row in cli("--db", form, "list").output.splitlines()[2:]] == ["style@1"]


@pytest.mark.sqlite_only
def test_a_tilde_of_no_user_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("--db", "sqlite:///~no-such-user-here/reg.db", "register", "x", code=6)
    assert result.stderr == ("error: ~no-such-user-here/reg.db: the registry path starts with ~no-such-user-here, "
                             "which names no user's home folder here; give the full path\n")
    assert list(tmp_path.iterdir()) == []


ALPHA_ZERO = ("alpha must be a positive number (got 0): an alpha of 0 means alpha = rank in a kohya file but a scale "
              "of 0 in PEFT, so loraops takes neither; give the rank itself for scale 1 (--alpha 8 for rank 8), or "
              "leave --alpha out")
ALPHA_NEGATIVE = "alpha must be a positive number (got -2): to negate an adapter, weight it -1 in merge or combine (NAME:-1)"
ALPHA_HUGE = "alpha 1e+300 is beyond what float32 holds"
ALPHA_TINY = ("alpha 1e-50 is below what float32 holds (its smallest normal number is 1.2e-38): a kohya file stores "
              "alphas in float32, where this one would lose its precision or be 0 (alpha = rank)")


@pytest.mark.parametrize("alpha, says", [("0", ALPHA_ZERO), ("-0.0", ALPHA_ZERO.replace("got 0", "got -0")),
                                         ("-2", ALPHA_NEGATIVE), ("1e300", ALPHA_HUGE), ("1e-50", ALPHA_TINY),
                                         ("3.4028236e38", ALPHA_HUGE.replace("1e+300", "3.4028236e+38"))])
@pytest.mark.parametrize("command", [["register", "{kohya}"], ["register", "{ad1}"], ["check", "{kohya}"],
                                     ["inspect", "{kohya}"], ["extract", "--base", "{base}", "--tuned", "{other}",
                                                              "--rank", "2"]])
def test_an_alpha_not_positive_or_out_of_float32_is_refused_by_every_command_that_takes_it(art, command, alpha, says):
    """`--alpha 0` on a kohya file gave scale 0, while the file's own alpha of 0 means alpha = rank (sd-scripts):
    the same number meant two things. An alpha given must be above 0, in one line that says what to give; nothing
    is recorded. It must be a number float32 holds, one rule (formats.common.given_alpha) for every command:
    `--alpha 1e-50` was registered with scale 5e-51, and its kohya export stored alpha 0 (float32), read back as
    alpha = rank, scale 1."""
    with Registry.open() as reg:
        before = snapshot(reg)
    argv = [a.format(**art) for a in command]
    result = cli(*argv, "--alpha", alpha, code=2)
    where = "" if command[0] == "extract" else f"{argv[1]}: --alpha: "  # the adapter it was given for
    assert result.stderr == f"error: {where}{says}\n"
    with Registry.open() as reg:
        assert snapshot(reg) == before
    with pytest.raises(InvalidInputError, match=r": alpha: alpha must be a positive number \(got 0\): an alpha of 0"):
        Registry.open().register_adapter(art["kohya"], alpha=0)


@pytest.mark.parametrize("alpha", ["1e-10", "1.1754943508222875e-38", "3.4028234663852886e38",
                                   "3.4028235e38"])  # float32's max as numpy prints it: float32 rounds it to its max
@pytest.mark.parametrize("adapter, fmt", [("kohya", "kohya"), ("ad1", "kohya"), ("ad1", "peft")])
def test_an_alpha_the_rule_takes_is_written_as_given(art, tmp_path, alpha, adapter, fmt):
    """The ends of what given_alpha takes (float32's smallest normal number and its largest) are taken, and every
    alpha it takes is written as given: one below 1e-9 was written as 0 (peft.stored_alpha rounded an alpha within
    1e-9 of an integer to it), which a kohya file reads as alpha = rank (scale 1 where 2.5e-11 was registered) and
    PEFT as a scale of 0."""
    from loraops import formats

    cli("register", art[adapter], "--name", "style", "--alpha", alpha)
    with Registry.open() as reg:
        scales = {m.scale for m in reg.load_adapter("style").modules.values()}
    assert scales == {float(alpha) / 4}  # rank 4
    out = tmp_path / ("style.safetensors" if fmt == "kohya" else "style")
    cli("export", "style", "--format", fmt, "-o", out)
    written = {m.scale for m in formats.read_adapter(out, values=False).modules.values()}
    assert len(written) == 1 and math.isclose(written.pop(), float(alpha) / 4, rel_tol=1e-7)  # (kohya: float32)


def test_an_alpha_override_of_zero_recorded_before_is_still_read_as_recorded(art):
    """A registry row from before the refusal (register --alpha 0) keeps loading as it was recorded: scale 0."""
    from sqlalchemy import text

    cli("register", art["kohya"], "--name", "style", "--alpha", "4")
    with Registry.open() as reg:
        with reg.engine.begin() as connection:
            connection.execute(text("UPDATE adapters SET alpha_override = 0"))
        assert {m.scale for m in reg.load_adapter("style").modules.values()} == {0.0}


@pytest.mark.parametrize("tag, says", [
    ("a,b", "bad tag 'a,b': a tag holds no comma (`list` joins tags with commas); give each tag its own --tag"),
    (",", "bad tag ',': a tag holds no comma (`list` joins tags with commas); give each tag its own --tag"),
    ("", "bad tag '': a tag is one word of at most 255 characters"),
    ("  ", "bad tag '  ': a tag is one word of at most 255 characters"),
    ("two words", "bad tag 'two words': a tag is one word of at most 255 characters"),
    ("a\x7fb", "bad tag 'a\\x7fb': a tag is one word of at most 255 characters"),  # (a DEL was taken)
])
def test_a_tag_with_a_comma_or_no_word_is_refused(art, tag, says):
    """`list` prints an adapter's tags comma-joined and `list --tag` matches one whole tag: a tag 'a,b' was shown as
    two tags that neither --tag a nor --tag b found. Refused in one line naming the tag as given; nothing recorded,
    for a new adapter or one registered again."""
    cli("register", art["kohya"], "--name", "style", "--tag", "ok")
    with Registry.open() as reg:
        before = snapshot(reg)
    for adapter in (art["kohya"], art["ad1"]):
        assert cli("register", adapter, "--tag", "fine", "--tag", tag, code=2).stderr == f"error: {says}\n"
    with Registry.open() as reg:
        assert snapshot(reg) == before
        with pytest.raises(InvalidInputError, match="^bad tag"):
            reg.add_tags("style", [tag])
    assert [r.split()[-2] for r in cli("list", "--tag", "ok").output.splitlines()[2:]] == ["ok"]


@pytest.mark.parametrize("args, kind, how", [
    (["export", "{kohya}", "--format", "peft", "-o", "{dir}/out", "--base", "{base}"], "base", "loraops base add"),
    (["register", "{kohya}", "--base", "{base}"], "base", "loraops base add"),
    (["base", "show", "{base}"], "base", "loraops base add"),
    (["show", "{kohya}"], "adapter", "loraops register"),
])
def test_an_existing_path_where_only_a_registered_one_is_taken_is_not_said_missing(art, tmp_path, args, kind, how):
    """`--base PATH` of export/register (and show of a path) take registered references only: an existing path was
    said to be 'no such file or folder', sending the user to check a path that is there."""
    paths = {"kohya": art["kohya"], "base": art["base"], "dir": tmp_path}
    given = [a.format(**paths) for a in args]
    ref = art["base"] if kind == "base" else art["kohya"]
    err = cli(*given, code=3).stderr
    assert err == (f"error: {ref}: no {kind} of that name in the registry, and a path is not taken here, only a "
                   f"registered {kind}: `{how} {ref}` records it\n"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.sqlite_only  # the home's own SQLite registry (the PostgreSQL pass sets LORAOPS_DB)
def test_a_home_whose_name_holds_url_characters_keeps_its_registry_inside(art, tmp_path, monkeypatch):
    """The home's registry URL is built from its path: SQLAlchemy decodes %XX there and ends the path at '?', so a
    LORAOPS_HOME named `50%20off?x` opened (and created) `50 off` beside it instead."""
    home = tmp_path / "50%20off?x"
    monkeypatch.setenv("LORAOPS_HOME", str(home))
    cli("base", "add", art["base"], "--name", "llama-tiny")
    cli("register", art["kohya"], "--base", "llama-tiny")
    assert (home / "registry.db").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [home.name]
    assert "llama-tiny" in cli("list").output and cli("db", "current").exit_code == 0
    with Registry.open() as reg:
        assert [r.name for r in reg.list_adapters()] == ["style"]


def test_check_alpha_of_a_registered_adapter_is_refused_not_ignored(art):
    cli("base", "add", art["base"], "--name", "llama-tiny")
    cli("register", art["kohya"], "--name", "anime", "--base", "llama-tiny")
    assert cli("check", "anime", "--alpha", "4", code=2).stderr == (
        "error: anime@1: --alpha applies to an adapter given by path; a registered adapter is read with the alpha it "
        "was registered with (register it again with --alpha to change that)\n")
    assert cli("check", art["kohya"], "--base", "llama-tiny", "--alpha", "4").exit_code == 0  # a path: used


def test_check_headline_counts_a_task_adapters_whole_tensors(tmp_path):
    """check's headline counts the head a task adapter saves whole beside its LoRA modules (it counted the modules
    alone, so a misfit head read "8/8 modules match" under "does not fit"); an adapter without such tensors keeps the
    modules-only headline."""
    base, folder, _ = factories.task_adapter(tmp_path, *factories.TASK_MODELS[0])
    adapter = read_adapter(folder)
    modules, tensors = len(adapter.modules), len(adapter.full_tensors)
    assert modules and tensors
    result = factories.loraops_run("check", folder, "--base", base)
    assert result.stdout.startswith(f"{folder} fits {base}: {modules}/{modules} modules and {tensors}/{tensors} whole "
                                    "tensors match\n"), result.stdout + result.stderr


def test_a_ctrl_c_once_a_registry_change_committed_says_what_changed(art, monkeypatch):
    """register, base add, rm, base rm, interrupted once their change committed (as click returns from them, after the
    summary was said) said "interrupted; nothing was written"; each says what changed. Before it: nothing written."""
    from factories import interrupted_once_returned

    steps = [(["base", "add", art["base"], "--name", "llama-tiny"], "base llama-tiny was added"),
             (["base", "add", art["base"]], None),  # already there: nothing changed
             (["register", art["ad1"]], f"{art['ad1']} was registered as ad1@1"),
             (["register", art["kohya"], "--name", "style", "--base", "llama-tiny"],
              f"{art['kohya']} was registered as style@1"),
             (["rm", "style"], "style@1 was removed"),
             (["rm", "ad1"], "ad1@1 was removed"),
             (["base", "rm", "llama-tiny"], "base llama-tiny was removed")]
    for args, said in steps:
        with monkeypatch.context() as patched:
            interrupted_once_returned(patched, args[1] if args[0] == "base" else args[0])
            result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 130, result.output
        assert result.output.splitlines()[-1] == (f"error: interrupted after {said}" if said else
                                                  "error: interrupted; nothing was written"), args
    with Registry.open() as reg:
        assert reg.list_adapters() == [] and reg.list_bases() == []


def stored_folders() -> list[str]:
    with Registry.open() as reg:
        return [p.name for p in reg.blobs.folders()]


@pytest.mark.parametrize("command", ["register", "rm", "base rm"])
def test_a_ctrl_c_as_a_registry_change_commits_says_what_changed(art, monkeypatch, command):
    """A Ctrl-C in the instant after the transaction committed (the database has the change; the command's next line
    has not run) said "nothing was written" of it: the commit and what it tells are one step now (Registry.session
    defers the Ctrl-C across both). What the registry says and what the store holds agree."""
    cli("base", "add", art["base"], "--name", "llama-tiny")
    if command != "register":
        cli("register", art["ad1"])
    args, said = {"register": (["register", art["ad1"]], f"{art['ad1']} was registered as ad1@1"),
                  "rm": (["rm", "ad1"], "ad1@1 was removed; `loraops gc` removes what is left of its stored files"),
                  "base rm": (["base", "rm", "llama-tiny", "--force"], "base llama-tiny was removed")}[command]
    with monkeypatch.context() as patched:
        factories.interrupted_as_a_write_commits(patched)
        result = CliRunner().invoke(main, [str(a) for a in args])
    assert (result.exit_code, result.output) == (130, f"error: interrupted after {said}\n")  # (one line)
    with Registry.open() as reg:
        assert [a.ref for a in reg.list_adapters()] == ([] if command == "rm" else ["ad1@1"])
        assert [b.name for b in reg.list_bases()] == ([] if command == "base rm" else ["llama-tiny"])
        assert reg.verify() == []  # every record's stored files are there
    assert len(stored_folders()) == 1  # (rm's: left for gc, as said)
    if command == "rm":
        assert cli("gc", "--grace", "0").output.splitlines()[-1].startswith("removed 1 item(s), ")
        assert stored_folders() == []


def test_a_sigterm_as_rm_commits_is_said_as_a_ctrl_c_is(art, monkeypatch, capsys):
    """SIGTERM is handled as Ctrl-C (cli._terminate), at the commit too: exit 143, and the line says what went."""
    import signal

    from loraops.cli import exit_status

    cli("register", art["ad1"])
    capsys.readouterr()
    factories.interrupted_as_a_write_commits(monkeypatch, signal.SIGTERM)
    assert exit_status(["rm", "ad1"]) == 143
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: interrupted after ad1@1 was removed; `loraops gc` removes what is left of its stored files")
    with Registry.open() as reg:
        assert reg.list_adapters() == []


@pytest.mark.parametrize("signum", [2, 15])
@pytest.mark.parametrize("what", ["folder", "file"])
def test_a_ctrl_c_as_base_add_commits_says_the_base_was_added(art, monkeypatch, capsys, what, signum):
    """`base add` interrupted in the instant its record committed said "nothing was written" of a base the registry
    had recorded (it told what it added only after the library call returned): the commit and what it tells are one
    step, as for register. SIGTERM is said the same way, exit 143."""
    from loraops.cli import exit_status

    path = art["base"] if what == "folder" else art["base"] / "model.safetensors"
    capsys.readouterr()
    factories.interrupted_as_a_write_commits(monkeypatch, signum)
    assert exit_status(["base", "add", str(path), "--name", "llama-tiny"]) == 128 + signum
    assert capsys.readouterr().err == "error: interrupted after base llama-tiny was added\n"
    with Registry.open() as reg:
        assert [(b.name, b.num_tensors) for b in reg.list_bases()] == [("llama-tiny", 21)]


def test_a_ctrl_c_as_base_add_moves_a_record_says_it_moved(art, tmp_path, monkeypatch, capsys):
    """`base add` of a registered base's files where they are now moves its record there (no file written, but the
    registry changed): interrupted as that committed, it said "nothing was written"."""
    import shutil

    from loraops.cli import exit_status

    old, new = tmp_path / "llama", tmp_path / "moved"
    shutil.copytree(art["base"], old)
    cli("base", "add", old, "--name", "llama-tiny")
    old.rename(new)
    capsys.readouterr()
    factories.interrupted_as_a_write_commits(monkeypatch)
    assert exit_status(["base", "add", str(new)]) == 130
    assert capsys.readouterr().err == (f"error: interrupted after base llama-tiny was recorded at {new} (its files "
                                       f"were no longer at {old})\n")
    with Registry.open() as reg:
        assert [(b.name, b.path) for b in reg.list_bases()] == [("llama-tiny", str(new))]


def test_base_add_interrupted_before_its_commit_leaves_nothing(art, monkeypatch):
    """The other side: interrupted while its tensors are written, before the commit, nothing is recorded."""
    from loraops.registry.store import Registry as Store

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(Store, "_base_record", interrupted)
        result = CliRunner().invoke(main, ["base", "add", str(art["base"])])
    assert (result.exit_code, result.output) == (130, "error: interrupted; nothing was written\n")
    with Registry.open() as reg:
        assert reg.list_bases() == []


@pytest.mark.parametrize("step", ["in the store", "before the commit"])
def test_register_interrupted_before_its_commit_leaves_nothing(art, monkeypatch, step):
    """The other side of test_a_ctrl_c_as_a_registry_change_commits_says_what_changed: interrupted while its files
    are stored or before its row commits, `register` says nothing was written, and no stored file is left."""
    from loraops.registry import store
    from loraops.registry.blobs import BlobStore

    with Registry.open() as reg:
        before = snapshot(reg)

    def interrupted(*args, real=BlobStore.put, **kwargs):
        if step == "in the store":
            real(*args, **kwargs)
        raise KeyboardInterrupt

    if step == "in the store":
        monkeypatch.setattr(BlobStore, "put", interrupted)
    else:
        monkeypatch.setattr(store, "_insert_modules", interrupted)
    result = CliRunner().invoke(main, ["register", str(art["ad1"])])
    assert (result.exit_code, result.output) == (130, "error: interrupted; nothing was written\n")
    with Registry.open() as reg:
        assert snapshot(reg) == before


@pytest.mark.parametrize("step", ["before the commit", "between the stored files", "once the stored files went"])
def test_rm_all_interrupted_says_what_it_removed(art, monkeypatch, step):
    """`rm --all` interrupted once its records were removed, while it removed their stored files, said "nothing was
    written"; it says which records went, and that gc removes what is left of their files."""
    from factories import interrupted_once_returned
    from loraops.registry.store import Registry as Store

    cli("register", art["ad1"])
    cli("register", art["kohya"], "--name", "ad1")
    with Registry.open() as reg:
        before = snapshot(reg)
    removals = []

    def interrupted(*args, real=Store._drop_blob_if_unused):
        removals.append(args)
        if len(removals) == 2:
            raise KeyboardInterrupt
        return real(*args)

    with monkeypatch.context() as patched:
        if step == "before the commit":
            patched.setattr(Store, "_drop_lineage", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        elif step == "between the stored files":
            patched.setattr(Store, "_drop_blob_if_unused", interrupted)
        else:
            interrupted_once_returned(patched, "rm")
        result = CliRunner().invoke(main, ["rm", "ad1", "--all"])
    said = {"before the commit": "error: interrupted; nothing was written",
            "between the stored files": "error: interrupted after ad1@1, ad1@2 were removed; `loraops gc` removes "
                                        "what is left of their stored files",
            "once the stored files went": "error: interrupted after ad1@1, ad1@2 were removed"}[step]
    assert (result.exit_code, result.output.splitlines()[-1]) == (130, said)
    with Registry.open() as reg:
        if step == "before the commit":
            assert snapshot(reg) == before
            return
        assert reg.list_adapters() == []
    assert len(stored_folders()) == (1 if step == "between the stored files" else 0)
    cli("gc", "--grace", "0")
    assert stored_folders() == []


@pytest.mark.parametrize("after", [0, 1])
def test_gc_interrupted_says_how_many_items_it_removed(art, monkeypatch, after):
    """gc interrupted between two items said "nothing was written" of the one it had removed; it says how many."""
    from loraops.registry.blobs import BlobStore
    from loraops.registry.store import Registry as Store

    cli("register", art["ad1"])
    cli("register", art["kohya"])
    with monkeypatch.context() as patched:  # two stored folders no record uses
        patched.setattr(Store, "_drop_blob_if_unused", lambda *args: None)
        cli("rm", "ad1")
        cli("rm", "style")
    assert len(stored_folders()) == 2
    removals = []

    def interrupted(store, key, real=BlobStore.remove):
        removals.append(key)
        if len(removals) > after:
            raise KeyboardInterrupt
        real(store, key)

    with monkeypatch.context() as patched:
        patched.setattr(BlobStore, "remove", interrupted)
        result = CliRunner().invoke(main, ["gc", "--grace", "0"])
    assert (result.exit_code, result.output) == (
        130, f"error: interrupted after {after} item(s) were removed\n" if after else
        "error: interrupted; nothing was written\n")
    assert len(stored_folders()) == 2 - after
    assert cli("gc", "--grace", "0").output.splitlines()[-1].startswith(f"removed {2 - after} item(s), ")
    assert stored_folders() == []


@pytest.mark.no_registry
def test_a_ctrl_c_once_db_upgrade_committed_says_so(tmp_path, monkeypatch):
    from factories import interrupted_once_returned

    interrupted_once_returned(monkeypatch, "upgrade")
    result = CliRunner().invoke(main, ["--db", f"sqlite:///{tmp_path}/registry.db", "db", "upgrade"])
    assert (result.exit_code, result.output.splitlines()[-1]) == (
        130, f"error: interrupted after the registry was upgraded to revision {db.HEAD}")


@pytest.mark.sqlite_only  # a database file damaged in place
def test_a_damaged_registry_is_one_line_not_a_traceback(tmp_path, isolated_home):
    """Damage that opening the registry does not meet — a table gone while the schema revision is intact, pages
    overwritten by a crash or a bad disk — escaped the reads as the driver's traceback (`sqlite3.DatabaseError:
    database disk image is malformed`, `no such table`), exit 1, from list, show and verify."""
    import sqlite3

    for i in range(12):
        cli("register", kohya_file(tmp_path / f"k{i}.safetensors", KOHYA_MODULES, rank=4, alpha=2 + i), "--tag",
            f"t{i}")
    database = isolated_home / "registry.db"
    copy = tmp_path / "dropped.db"
    copy.write_bytes(database.read_bytes())
    with sqlite3.connect(copy) as connection:
        connection.execute("DROP TABLE adapter_tags")
    connection.close()
    url = f"sqlite:///{copy}"
    for args in (["list"], ["show", "k1"], ["verify"]):
        result = CliRunner().invoke(main, ["--db", url, *args])
        assert (result.exit_code, result.stderr) == (6, (
            f"error: the registry at {url} failed: no such table: adapter_tags (is its database damaged? restore it "
            "from a backup)\n")), (args, result.output, result.exception)
    damaged = bytearray(database.read_bytes())
    for page in range(2, len(damaged) // 4096):  # every page past the first (the schema's)
        damaged[page * 4096 + 100:page * 4096 + 300] = b"\xa5" * 200
    (tmp_path / "damaged.db").write_bytes(bytes(damaged))
    url = f"sqlite:///{tmp_path / 'damaged.db'}"
    for args in (["list"], ["verify"]):
        result = CliRunner().invoke(main, ["--db", url, *args])
        assert result.exit_code == 6 and result.stderr.count("\n") == 1, (args, result.output, result.exception)
        assert "database disk image is malformed" in result.stderr, result.stderr
