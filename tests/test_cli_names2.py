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


def never(*args, **kwargs):
    raise AssertionError("read an input before refusing the output's name")


@pytest.mark.parametrize("command", [["combine", "a"], ["resize", "a", "--rank", "2"], ["export", "a"]])
def test_a_misnamed_output_is_refused_before_the_inputs_are_read(reg, tmp_path, monkeypatch, command):
    from loraops import derive

    monkeypatch.setattr(derive, "open_input", never)
    monkeypatch.setattr(derive, "registered_for", never)
    code, text = run(*command, "--format", "kohya", "-o", tmp_path / "style")
    assert (code, text) == (2, f"error: {tmp_path / 'style'}: a kohya adapter is one .safetensors file; give a name "
                               "ending in .safetensors, or --format peft for a folder\n")
    code, text = run(*command, "--format", "peft", "-o", tmp_path / "style.safetensors")
    assert (code, text) == (2, f"error: {tmp_path / 'style.safetensors'}: a peft adapter is a folder, not one "
                               ".safetensors file; give a folder name, or --format kohya/diffusers for one .safetensors "
                               "file\n")


@pytest.mark.parametrize("fmt", [[], ["--format", "kohya"]])
def test_extract_refuses_a_misnamed_output_before_comparing_the_models(tmp_path, monkeypatch, fmt):
    from test_extract_fused import K_AND_V, pair
    from test_ldm import SDXL_TEXT

    from loraops import extraction

    base, tuned = pair(tmp_path, SDXL_TEXT, K_AND_V, prefix="conditioner.embedders.0.model.")
    monkeypatch.setattr(extraction, "plan", never)
    out = tmp_path / "x"  # a single-file checkpoint's adapter is kohya by default
    code, text = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", *fmt, "-o", out)
    assert (code, text) == (2, f"error: {out}: a kohya adapter is one .safetensors file; give a name ending in "
                               ".safetensors, or --format peft for a folder\n")


@pytest.mark.parametrize("command, verb", [(["merge", "--into"], "merging into"),
                                           (["subtract", "a", "--from"], "subtracting from")])
@pytest.mark.parametrize("registered", [False, True])
def test_a_single_file_models_output_not_named_safetensors_is_refused(reg, tmp_path, command, verb, registered):
    import torch

    from loraops import st

    single = tmp_path / "single.safetensors"
    st.write_safetensors(single, {"q.weight": torch.zeros(4, 4)})
    if registered:
        assert run("base", "add", single, "--name", "one")[0] == 0
    out = tmp_path / "out" / "merged.bin"
    code, text = run(*command, "one" if registered else single, "--dtype", "bf16", "-o", out)
    assert (code, text) == (2, f"error: {out}: the output of {verb} the single-file model "
                               f"{'one' if registered else 'single.safetensors'} is one .safetensors file; give a name "
                               "ending in .safetensors\n")
    assert not (tmp_path / "out").exists()


def test_name_at_latest_is_the_latest_version(reg, files, tmp_path):
    assert run("resize", "a", "--rank", "2", "--name", "a")[0] == 0  # a@2
    for command in (["show", "a@latest", "--json"], ["show", "a", "--json"]):
        code, text = run(*command)
        assert code == 0, text
        assert (json.loads(text)["name"], json.loads(text)["version"]) == ("a", 2)
    code, text = run("combine", "a@latest:0.5", "a@1", "--name", "c", "--json")
    assert code == 0, text
    assert [i["ref"] for i in json.loads(text)["report"]["inputs"]] == ["a@2", "a@1"]
    assert run("rm", "c@latest")[0] == 0 and run("show", "c")[0] == 3
    assert run("show", "nope@latest") == (3, "error: no adapter named 'nope' in the registry\n")
    assert run("show", "a@newest") == (2, "error: bad adapter reference 'a@newest': the part after @ must be a version "
                                          "number or latest\n")


def test_a_kohya_input_bound_to_a_base_from_the_hub_names_its_commit(reg, tmp_path, monkeypatch):
    from peft import PeftConfig

    from loraops.hub import hub_source
    from loraops.registry.store import Registry as Store

    kohya = tmp_path / "k.safetensors"
    assert run("export", "a", "--format", "kohya", "-o", kohya)[0] == 0
    assert run("register", kohya, "--name", "ko", "--base", "tiny")[0] == 0
    commit = "c0ffee" * 6 + "abcd"
    pulled = reg.get_base("tiny").model_copy(update={"source": hub_source("org/tiny-llama", commit)})
    monkeypatch.setattr(Store, "get_base", lambda self, ref: pulled)  # (as `base add hub:org/tiny-llama` records it)
    for command in (["export", "ko"], ["resize", "ko", "--rank", "2"]):
        out = tmp_path / command[0]
        code, text = run(*command, "--format", "peft", "-o", out)
        assert code == 0, text
        config = PeftConfig.from_pretrained(out)
        assert (config.base_model_name_or_path, config.revision) == ("org/tiny-llama", commit)



def test_a_peft_configs_revision_is_its_bases_and_is_kept(reg, tmp_path, monkeypatch):
    """PEFT's revision is the base model's (AutoPeftModel loads the base at it; get_peft_model(revision=) sets it): a
    PEFT input's, and the commit loraops wrote itself, stay with its base_model_name_or_path through export, resize
    and combine; they were dropped."""
    from peft import PeftConfig

    from loraops.hub import hub_source
    from loraops.registry.store import Registry as Store

    kohya = tmp_path / "k.safetensors"
    assert run("export", "a", "--format", "kohya", "-o", kohya)[0] == 0
    assert run("register", kohya, "--name", "ko", "--base", "tiny")[0] == 0
    commit = "c0ffee" * 6 + "abcd"
    pulled = reg.get_base("tiny").model_copy(update={"source": hub_source("org/tiny-llama", commit)})
    monkeypatch.setattr(Store, "get_base", lambda self, ref: pulled)
    code, text = run("resize", "ko", "--rank", "2", "--format", "peft", "--name", "r")  # (it writes the commit)
    assert code == 0, text
    for command in (["export", "r"], ["resize", "r", "--rank", "1"], ["combine", "ko", "r"]):
        out = tmp_path / command[0]
        code, text = run(*command, "--format", "peft", "-o", out)
        assert code == 0, text
        config = PeftConfig.from_pretrained(out)
        assert (config.base_model_name_or_path, config.revision) == ("org/tiny-llama", commit), command
