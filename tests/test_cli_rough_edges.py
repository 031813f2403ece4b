"""CLI rough edges an exploratory tester found: export --json, one-file adapters not named .safetensors, a kohya
adapter exported as PEFT naming its base, subtract's residual note on a float32 model."""
import json

import pytest
import torch
from click.testing import CliRunner

from factories import peft_adapter, tiny_llama
from loraops.cli import main
from loraops.derive import base_model_name
from loraops.hub import hub_source
from loraops.registry import Registry

pytestmark = pytest.mark.registry_backend


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rough-edges")
    base = tiny_llama(root / "base")
    return {"base": base, "a": peft_adapter(base, root / "a", seed=1, r=4, alpha=8, target_modules=["q_proj", "v_proj"])}


@pytest.fixture
def reg(files):
    assert run("base", "add", files["base"], "--name", "tiny")[0] == 0
    assert run("register", files["a"], "--base", "tiny")[0] == 0
    with Registry.open() as registry:
        yield registry


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_export_json(reg, tmp_path):
    out = tmp_path / "a.safetensors"
    code, text = run("export", "a", "--format", "kohya", "-o", out, "--json")
    assert code == 0, text
    assert json.loads(text) == {"ref": "a@1", "format": "kohya", "output": str(out), "plain_lora_of": [],
                                "left_out": []}
    code, text = run("export", out, "--format", "peft", "-o", tmp_path / "p", "--base", "tiny", "--json")
    assert code == 0, text
    assert json.loads(text)["ref"] == str(out) and json.loads(text)["output"] == str(tmp_path / "p")


@pytest.mark.parametrize("command", [["export", "a"], ["combine", "a"], ["resize", "a", "--rank", "2"]])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_a_one_file_adapter_not_named_safetensors_is_refused(reg, tmp_path, command, fmt):
    out = tmp_path / "style"
    code, text = run(*command, "--format", fmt, "-o", out)
    assert (code, text) == (2, f"error: {out}: a {fmt} adapter is one .safetensors file; give a name ending in "
                               ".safetensors, or --format peft for a folder\n")
    assert list(tmp_path.iterdir()) == [] and [r.ref for r in reg.list_adapters()] == ["a@1"]


def test_a_kohya_adapter_exported_as_peft_names_its_registered_base(files, reg, tmp_path):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    kohya = tmp_path / "k.safetensors"
    assert run("export", "a", "--format", "kohya", "-o", kohya)[0] == 0
    assert run("register", kohya, "--name", "ko", "--base", "tiny")[0] == 0
    code, text = run("export", "ko", "--format", "peft", "-o", tmp_path / "p")
    assert code == 0, text
    named = PeftConfig.from_pretrained(tmp_path / "p").base_model_name_or_path
    assert named == reg.get_base("tiny").path
    # what PEFT's AutoPeftModel does with it (its task_type aside): load the base from there, then the adapter
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(named), tmp_path / "p")
    direct = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["base"]), files["a"])
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=1e-4, atol=1e-5)


def test_a_base_from_the_hub_is_named_by_its_repo_id(reg):
    base = reg.get_base("tiny")
    pulled = base.model_copy(update={"source": hub_source("org/tiny-llama", "a" * 40)})
    assert (base_model_name(base), base_model_name(pulled)) == (base.path, "org/tiny-llama")


def test_subtract_residual_note_does_not_call_float32_low_precision(files, reg, tmp_path):
    code, text = run("subtract", "a", "--from", "tiny", "-o", tmp_path / "out", "--no-record")
    assert code == 0, text
    note = text.splitlines()[1]
    assert note.startswith("residual: largest rounding ") and "low-precision" not in note, note
    assert "need not give the base back bit for bit" in note and "--exact restores its base" in note


@pytest.mark.parametrize("args, note, made", [
    (["combine", "a", "--method", "cat"], "note: the result has the same ΔW as a@1 (a cat of one adapter at weight 1)",
     "a-cat"),
    (["resize", "a", "--rank", "4"],
     "note: the result has the same ΔW as a@1 (every module keeps its rank; up to rounding)", "a-r4"),
])
def test_a_result_equal_to_its_input_says_so(reg, args, note, made):
    """A note, not a refusal: the result is registered (as another adapter where its factors differ)."""
    code, text = run(*args)
    assert code == 0, text
    assert text.splitlines()[-2] == note and text.splitlines()[-1].startswith(f"registered {made}@1 ")
    result = reg.load_adapter(made)
    source = reg.load_adapter("a@1")
    for name, module in source.modules.items():
        torch.testing.assert_close(result.modules[name].delta().double(), module.delta().double(), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("args", [["combine", "a:0.5", "--method", "cat"], ["combine", "a", "--method", "ties", "--density", "0.5"],
                                  ["resize", "a", "--rank", "3"]])
def test_a_result_that_differs_from_its_input_has_no_note(reg, args):
    code, text = run(*args)
    assert code == 0 and "note:" not in text, text


def test_a_loha_resized_at_its_own_rank_has_no_note(tmp_path):
    """A LoHa's rank is its product's r: its ΔW = (B₁A₁)⊙(B₂A₂) has rank up to r², so a resize at r cuts it (fro kept
    below 1) and is no same-ΔW result."""
    from factories import conv_embedding_model, save_state_dict
    from test_lycoris import lycoris_file

    path, _ = lycoris_file(tmp_path / "lyco.safetensors", "loha", rank=3, alpha=2.0)
    base = save_state_dict(conv_embedding_model(), tmp_path / "base.safetensors")
    for args in (["base", "add", base, "--name", "conv"], ["register", path, "--name", "lyco", "--base", "conv"]):
        assert run(*args)[0] == 0
    code, text = run("resize", "lyco", "--rank", "3")
    assert code == 0 and " 3    3 " in text and "note:" not in text, text
