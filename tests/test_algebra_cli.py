"""`loraops combine / resize / export` through the CLI: outputs, tables, --json, one-line errors."""
import json

import pytest
import torch
from click.testing import CliRunner

from factories import peft_adapter, tiny_llama
from loraops.cli import main
from loraops.formats import read_adapter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-algebra")
    base = tiny_llama(root / "base")
    a = peft_adapter(base, root / "a", seed=1, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    b = peft_adapter(base, root / "b", seed=2, r=6, alpha=3, target_modules=["q_proj", "o_proj"])
    return base, a, b


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_combine_cat_writes_the_weighted_sum(files, tmp_path):
    base, a, b = files
    code, out = run("combine", f"{a}:0.7", f"{b}:-0.5", "-o", tmp_path / "ab")
    assert code == 0, out
    assert out.splitlines()[0] == f"cat of {a}×0.7, {b}×-0.5"
    assert f"wrote {tmp_path / 'ab'}" in out
    result, one, two = read_adapter(tmp_path / "ab"), read_adapter(a), read_adapter(b)
    for name, module in result.modules.items():
        expected = sum(w * ad.modules[name].delta() for ad, w in ((one, 0.7), (two, -0.5)) if name in ad.modules)
        torch.testing.assert_close(module.delta(), expected, rtol=1e-5, atol=1e-6)


def test_combine_json_and_kohya_output(files, tmp_path):
    _, a, b = files
    code, out = run("combine", a, b, "--method", "dare_ties", "--density", "0.5", "--seed", "7", "--rank", "3",
                    "--format", "kohya", "-o", tmp_path / "ab.safetensors", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["report"]["params"] == {"density": 0.5, "seed": 7, "normalize": False}
    assert {m["rank"] for m in data["report"]["modules"]} == {3}
    assert read_adapter(tmp_path / "ab.safetensors").format == "kohya"


def test_resize_table_and_export_round_trip(files, tmp_path):
    base, _, b = files
    code, out = run("resize", b, "--dynamic", "sv_fro", "--param", "0.9", "--max-rank", "5", "-o", tmp_path / "s.safetensors",
                    "--format", "kohya")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["module", "kind", "rank", "new", "alpha", "fro", "kept", "sum(S)", "kept"]
    assert "model.layers.0.self_attn.q_proj" in out and lines[-2].startswith("average: fro kept ")
    code, out = run("export", tmp_path / "s.safetensors", "--format", "peft", "-o", tmp_path / "p", "--base", base)
    assert code == 0, out
    kohya, peft = read_adapter(tmp_path / "s.safetensors"), read_adapter(tmp_path / "p")
    assert len(peft.modules) == len(kohya.modules) == 4
    from loraops.formats import kohya_name

    for name, module in peft.modules.items():
        torch.testing.assert_close(module.delta(), kohya.modules[kohya_name(name)].delta())


@pytest.mark.parametrize("args, code, message", [
    (["combine", "{a}", "--method", "mean", "-o", "{tmp}/x"], 2,
     "error: unknown combine method 'mean': use one of cat, linear, svd, ties, dare_ties, dare_linear, magnitude_prune"),
    (["combine", "{a}", "{b}", "--method", "ties", "--density", "1.5", "-o", "{tmp}/x"], 2,
     "error: bad parameters for ties: density: Input should be less than or equal to 1"),
    (["combine", "{a}", "--method", "linear", "--rank", "0", "-o", "{tmp}/x"], 2,
     "error: rank must be a positive integer (got 0)"),
    (["combine", "{a}", "{b}"], 2, "error: nothing to do with the result: give -o PATH"),
    (["combine", "{a}", "-o", "{a}"], 4, "error: {a}: already exists (use --force to replace it)"),
    (["resize", "{a}", "--rank", "5", "-o", "{tmp}/x"], 2, "error: rank 5 is above the adapter's rank 4: resize only lowers rank"),
    (["resize", "{a}", "-o", "{tmp}/x"], 2,
     "error: bad parameters for resize: give either a rank or a dynamic rule (sv_ratio, sv_cumulative, sv_fro)"),
    (["combine", "{tmp}/nope", "-o", "{tmp}/x"], 3, "error: {tmp}/nope: no such file or folder"),
])
def test_errors_are_one_line(files, tmp_path, args, code, message):
    _, a, b = files
    fill = {"a": a, "b": b, "tmp": tmp_path}
    got, out = run(*[arg.format(**fill) for arg in args])
    assert (got, out) == (code, message.format(**fill) + "\n")
    assert not (tmp_path / "x").exists()
