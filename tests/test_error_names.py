"""Parameters named in any loraops error: the library says them as Python names (`exact=True`, `force=True`), the CLI
as the options the user typed (--exact, --force), with each error's exit code as before."""
from __future__ import annotations

import click
import pytest
import torch
from click.testing import CliRunner

from factories import peft_adapter, tiny_llama
import loraops
from loraops import hub, merging
from loraops.cli import main, said
from loraops.errors import ConflictError, InvalidInputError, NotFoundError, reworded
from loraops.registry import Registry


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    base = tiny_llama(root / "base", dtype=torch.bfloat16)
    return base, peft_adapter(base, root / "a", r=4)


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def test_reworded_keeps_the_type_and_the_parameters_named():
    """reworded rebuilt the error from its text: a CLI user then read the Python names (subpath, all_versions=True)."""
    exc = NotFoundError("`subpath` /tmp/stage/a: pick one, or drop `all_versions=True`", ["subpath", "all_versions"])
    again = reworded(exc, "/tmp/stage", "out")
    assert type(again) is NotFoundError and again.exit_code == 3
    assert str(again) == "subpath out/a: pick one, or drop all_versions=True"
    command = click.Command("c", params=[click.Option(["--file", "subpath"]),
                                         click.Option(["--all", "all_versions"], is_flag=True)])
    assert said(again, command) == "--file out/a: pick one, or drop --all"


@pytest.mark.registry_backend
def test_subtract_exact_of_an_unrecorded_merge(tmp_path, models):
    base, a = models
    run("merge", a, "--into", base, "-o", tmp_path / "m", "--no-record")
    with pytest.raises(NotFoundError) as refused:
        merging.subtract(str(tmp_path / "m"), [str(a)], tmp_path / "r", exact=True)
    library = str(refused.value)
    assert library.startswith("exact=True: ") and library.endswith("; drop exact=True to subtract arithmetically")
    result = run("subtract", a, "--from", tmp_path / "m", "-o", tmp_path / "r", "--exact", code=3)
    assert result.output == f"error: {library.replace('exact=True', '--exact')}\n"


@pytest.mark.registry_backend
def test_removing_a_base_in_use(tmp_path, models):
    base, a = models
    run("base", "add", base, "--name", "tiny")
    run("register", a)
    with Registry.open() as reg, pytest.raises(ConflictError, match=r"; use force=True to remove it anyway$"):
        reg.remove_base("tiny")
    assert run("base", "rm", "tiny", code=4).output.endswith("; use --force to remove it anyway\n")
    with Registry.open() as reg, pytest.raises(InvalidInputError, match=r"or drop all_versions=True$"):
        reg.remove_adapter("a@1", all_versions=True)
    assert run("rm", "a@1", "--all", code=2).output == (
        "error: 'a@1' names one version (a@1), and --all removes every version of a name: give the name 'a', or "
        "drop --all\n")


def test_a_revision_that_is_none():
    with pytest.raises(InvalidInputError, match=r"^revision '' is no branch, tag or commit"):
        hub.with_revision(hub.parse_repo_ref("someone/lora"), "")
    assert run("pull", "someone/lora", "--revision", "", code=2).output.startswith(
        "error: --revision '' is no branch, tag or commit")


def test_extract_of_a_module_the_base_lacks(tmp_path, models):
    base, _ = models
    tuned = tiny_llama(tmp_path / "tuned", dtype=torch.bfloat16, seed=3)
    says = "{} q_projx: %s has no 2-D or conv weight by that name (norms and biases are no LoRA targets: {} keeps " \
        "them whole)" % base
    with pytest.raises(InvalidInputError) as refused:
        loraops.extract(base, tuned, rank=2, modules=["q_projx"], device="cpu")
    assert str(refused.value) == says.format("modules", "save_modules")
    result = run("extract", "--base", base, "--tuned", tuned, "--modules", "q_projx", "--rank", "2", "-o",
                 tmp_path / "out", code=2)
    assert result.output == f"error: {says.format('--modules', '--save-module')}\n"
