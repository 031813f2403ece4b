"""CLI rough edges a demanding new user found: kohya inputs combined or resized into PEFT name their base, output names
refused before any work, single-file merges named .safetensors, `@latest` references, weighted combine names."""
import json

import pytest

import test_cli_rough_edges as rough

pytestmark = pytest.mark.registry_backend
files, reg, run = rough.files, rough.reg, rough.run  # (its fixtures: a tiny base, adapter a registered on it)


@pytest.mark.parametrize("command", [["combine", "ko"], ["combine", "ko:0.5", "ko"], ["resize", "ko", "--rank", "2"]])
def test_a_kohya_input_written_as_peft_names_its_registered_base(reg, tmp_path, command):
    kohya = tmp_path / "k.safetensors"
    assert run("export", "a", "--format", "kohya", "-o", kohya)[0] == 0
    assert run("register", kohya, "--name", "ko", "--base", "tiny")[0] == 0
    code, text = run(*command, "--format", "peft", "-o", tmp_path / "p")
    assert code == 0, text
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == reg.get_base("tiny").path
