"""Outputs over what the registry describes: a registered base's files or a registered adapter's source are refused
as outputs (equal, holding them, or inside them), even with --force, for every command that writes one; nothing is
written and the record still matches its files."""
from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from factories import peft_adapter, tiny_llama
from loraops.cli import main


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
    ["merge", "style", "--into", "{other}", "-o", "{base}/..", "--force", "--no-record"],  # holds the base
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
    argv = [a.format(base=base, other=other, link=tmp_path / "link") for a in args]
    result = run(*argv, code=2)
    assert result.output.startswith(f"error: {argv[argv.index('-o') + 1]}: overlaps registered base llama-tiny (")
    assert len(result.output.splitlines()) == 1
    assert snapshot(base) == before
    assert "fits" in run("check", "style", "--base", "llama-tiny").output


def test_an_output_over_a_registered_adapters_source_is_refused(tmp_path, registered):
    adapter = registered[2]
    before = snapshot(adapter)
    result = run("combine", "style", "style", "--method", "cat", "-o", adapter, "--force", code=2)
    assert snapshot(adapter) == before
    assert result.output == (f"error: {adapter}: overlaps the source of registered adapter style@1 "
                             f"({adapter.resolve()}); write the output elsewhere\n")


def test_a_base_whose_folder_is_gone_is_no_obstacle(tmp_path, registered):
    base, other, _ = registered
    shutil.rmtree(base)
    run("merge", "style", "--into", other, "-o", base, "--no-record")
    assert (base / "config.json").exists()
