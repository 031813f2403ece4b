"""`loraops inspect`: human summary + module table, --json record, --alpha, one-line errors with exit codes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import factories
from loraops.cli import main
from loraops.inspect import inspect_path

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    base = factories.tiny_llama(root / "base")
    return factories.peft_adapter(base, root / "adapter", r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def run(*args):
    return CliRunner().invoke(main, ["inspect", *map(str, args)])


def test_human_output(adapter):
    result = run(adapter)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "format      peft" in out and "rank        4" in out and "alpha       8" in out
    assert "classic (alpha/r)" in out and "targets     q_proj, v_proj" in out
    assert "model.layers.1.self_attn.v_proj  linear     4      8      2  64   32" in out


def test_json_output_is_the_record(adapter):
    result = run(adapter, "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data == json.loads(inspect_path(adapter).model_dump_json())
    assert data["format"] == "peft" and data["rank"] == 4 and data["num_modules"] == 4 and len(data["identity"]) == 64
    assert data["modules"][0] == {"name": "model.layers.0.self_attn.q_proj", "kind": "linear", "rank": 4, "alpha": 8.0,
                                  "scale": 2.0, "in_features": 64, "out_features": 64, "kernel": None}
    assert data["files"] == [str(adapter / "adapter_model.safetensors"), str(adapter / "adapter_config.json")]


def test_kohya_file_and_alpha_option(adapter, tmp_path):
    kohya = factories.kohya_file(tmp_path / "k.safetensors", {"lora_unet_proj": ((16,), (24,))}, rank=4, alpha=None,
                                 metadata={"ss_output_name": "style"})
    result = run(kohya)
    assert result.exit_code == 0 and "kohya names" in result.output and "ss_output_name = style" in result.output
    bare = tmp_path / "bare.safetensors"
    shutil.copy(adapter / "adapter_model.safetensors", bare)
    result = run(bare)
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "--alpha" in result.output
    assert json.loads(run(bare, "--alpha", 16, "--json").output)["alpha"] == 16


def test_errors_are_one_line_with_exit_codes(tmp_path):
    result = run(tmp_path / "missing.safetensors")
    assert result.exit_code == 3 and result.output.startswith("error: ") and "missing.safetensors" in result.output
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    result = run(bad)
    assert result.exit_code == 2 and result.output.count("\n") == 1


def test_a_name_that_is_no_path_points_to_show(tmp_path, monkeypatch):
    """A registered adapter's name given to inspect (which reads files, no registry) was only "no such file or
    folder": the line says where a registered adapter is shown."""
    monkeypatch.chdir(tmp_path)
    result = run("style@1")
    assert result.exit_code == 3 and result.output == (
        "error: style@1: no such file or folder (inspect reads files; a registered adapter is shown by "
        "`loraops show style@1`)\n")


def test_subprocess_entry_point(adapter):
    proc = subprocess.run([sys.executable, "-m", "loraops", "inspect", str(adapter), "--json"], capture_output=True,
                          text=True, env=os.environ.copy(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["scale_mode"] == "classic"


def test_inspect_and_check_read_headers_and_alphas_only(adapter, tmp_path, monkeypatch):
    """inspect and check need shapes, dtypes and alphas: a 70B rank-64 adapter's 1.6 GB of factor values are not
    read (only single values, like kohya's alphas, are); the report is the same as from a full read."""
    from loraops import formats, st
    from loraops.basemodel import BaseModel
    from loraops.check import check

    kohya = factories.kohya_file(tmp_path / "k.safetensors", {"lora_unet_model_layers_0_self_attn_q_proj": ((64,), (64,))},
                                 rank=4, alpha=2)
    full = {path: inspect_path(path) for path in (adapter, kohya)}
    real_read = st.read_tensor

    def single_values_only(info, handle=None):
        assert info.numel <= 1, f"{info.name} was read"
        return real_read(info, handle)

    monkeypatch.setattr(st, "read_tensor", single_values_only)
    for path, report in full.items():
        assert inspect_path(path) == report
    assert formats.read_adapter(kohya, values=False).modules["lora_unet_model_layers_0_self_attn_q_proj"].scale == 0.5
    base = BaseModel.open(factories.Path(adapter).parent / "base")
    assert check(formats.read_adapter(adapter, values=False), base.tensors).ok


def mixed_kohya(path):
    """A kohya file whose modules have other ranks and alphas (2/1, 16/8, 4/0: alpha 0 is the rank, kohya's rule)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, rank, alpha in (("lora_unet_a_q", 2, 1.0), ("lora_unet_a_k", 16, 8.0), ("lora_unet_a_v", 4, 0.0)):
        tensors |= {f"{name}.lora_down.weight": torch.randn(rank, 32, generator=g),
                    f"{name}.lora_up.weight": torch.randn(32, rank, generator=g), f"{name}.alpha": torch.tensor(alpha)}
    save_file(tensors, str(path))
    return path


def test_mixed_ranks_and_alphas_are_given_as_their_range(tmp_path):
    """Modules of other ranks or alphas: the summary says their range, not only "mixed"; --json keeps null."""
    path = mixed_kohya(tmp_path / "mixed.safetensors")
    out = run(path).output
    assert "\nrank        mixed (2–16)\n" in out and "\nalpha       mixed (1–8)\n" in out
    result = run(path, "--json")  # (its rank-4 module's .alpha is 0: alpha 4, said on stderr)
    data = json.loads(result.stdout)
    assert result.stderr.startswith(f"note: {path}: .alpha is 0 in 1 of 3 modules (lora_unet_a_v)")
    assert data["rank"] is None and data["alpha"] is None
    assert sorted((m["rank"], m["alpha"]) for m in data["modules"]) == [(2, 1), (4, 4), (16, 8)]


def test_a_config_rank_that_is_not_the_tensors_is_said(adapter, tmp_path):
    """A config whose r (or rank_pattern) is not its tensors' rank: PEFT fails to load it (size mismatch); loraops
    reads the tensors' rank and scales by it, and says so rather than showing that scale without a word."""
    folder = tmp_path / "a"
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"v_proj": 16}}))
    result = CliRunner().invoke(main, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["rank"] == 4
    assert result.stderr == (f"note: {folder}/adapter_config.json: its r/rank_pattern give 2 of 4 modules another rank "
                             "than their tensors (model.layers.0.self_attn.v_proj: r 16, tensors 4): PEFT fails to "
                             "load it; loraops reads the tensors' rank and scales by it (alpha/rank)\n")
    assert CliRunner().invoke(main, ["inspect", str(adapter)]).stderr == ""


def test_an_adapter_of_trainable_tokens_alone_has_no_targets_nor_module_table(adapter, tmp_path):
    """As `show` gives it: targets "-" and no empty table (inspect printed a blank targets line and a table's headers
    with no row)."""
    from peft import TrainableTokensConfig

    folder, _ = factories.token_adapter(adapter.parent / "base", tmp_path / "tokens",
                                        TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[1, 2]))
    out = run(folder).output
    assert "\nmodules     0\nrank        -\nalpha       -\n" in out and "\ntargets     -\n" in out
    assert "tokens      model.embed_tokens.weight rows 1, 2 (replaced)" in out and "module  kind" not in out


def test_a_kohya_file_gives_the_model_it_was_trained_on_from_its_metadata(tmp_path):
    """sd-scripts records the base in ss_sd_model_name (modelspec.architecture in newer files), past the first 12
    metadata keys shown: `base model` said "-"."""
    keys = {f"ss_a{i}": "x" for i in range(20)}
    named = factories.kohya_file(tmp_path / "k.safetensors", {"lora_unet_x": ((8,), (8,))},
                                 metadata={**keys, "ss_sd_model_name": "sd_xl_base_1.0.safetensors"})
    assert "\nbase model  sd_xl_base_1.0.safetensors (metadata ss_sd_model_name)\n" in run(named).output
    spec = factories.kohya_file(tmp_path / "s.safetensors", {"lora_unet_x": ((8,), (8,))},
                                metadata={"modelspec.architecture": "stable-diffusion-v1/lora"})
    assert "\nbase model  stable-diffusion-v1/lora (metadata modelspec.architecture)\n" in run(spec).output
    assert json.loads(run(spec, "--json").output)["base_model"] is None  # (the record's is PEFT's own field)
    plain = factories.kohya_file(tmp_path / "n.safetensors", {"lora_unet_x": ((8,), (8,))})
    assert "\nbase model  -\n" in run(plain).output


def test_a_lycoris_lokr_of_whole_factors_says_its_scale_is_1(tmp_path):
    """LyCORIS scales a LoKr module whose w1 and w2 are stored whole by 1 (it has no r), whatever its alpha: the
    `scale mode` line said alpha/r alone beside a table of scale 1."""
    from safetensors.torch import save_file

    path = tmp_path / "lokr.safetensors"
    save_file({"lora_unet_x.lokr_w1": torch.ones(2, 2), "lora_unet_x.lokr_w2": torch.ones(4, 4),
               "lora_unet_x.alpha": torch.tensor(2.0)}, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    out = run(path).output
    assert "\nscale mode  classic (alpha/r); 1 for LoKr factors stored whole, as LyCORIS\n" in out
    assert "lora_unet_x  lokr  -         2      1   8    8" in out



@pytest.mark.parametrize("case", ["peft", "dora", "kohya", "error"])
def test_inspect_imports_no_torch_and_says_what_the_torch_read_says(adapter, tmp_path, case):
    """inspect reads headers and configs only: in a fresh interpreter it runs without importing torch (st.header_only:
    its start-up was ~2/3 of the command's time) or the registry's modules, and prints, byte for byte, what the read
    with torch's meta tensors prints (in this process, where torch is loaded, header_only stands aside)."""
    if case == "error":  # (a bare PEFT file without an alpha: refused, one line)
        path = tmp_path / "bare.safetensors"
        shutil.copy(adapter / "adapter_model.safetensors", path)
    elif case == "dora":
        path = factories.peft_adapter(adapter.parent / "base", tmp_path / "dora", r=4, alpha=8,
                                      target_modules=["q_proj"], use_dora=True)
    else:
        path = {"peft": adapter, "kohya": factories.kohya_file(
            tmp_path / "k.safetensors", {"lora_unet_proj": ((16,), (24,)), "lora_te_conv": ((8, 3, 3), (6, 1, 1))},
            rank=4, alpha=3, dtype=torch.bfloat16, metadata={"ss_output_name": "x"})}[case]
    for args in (["inspect", path], ["inspect", path, "--json"]):
        imported, fresh, loaded = factories.fresh_cli_against_loaded(*args)
        assert imported == [] and fresh == loaded, (args, imported, fresh, loaded)
