"""What `export --format peft` (and combine/resize -o) write as a PEFT config's targeting: PEFT's own spelling
(short names, layers_to_transform, rank_pattern) when the modules are those that targeting gave the adapter, so an
export is the adapter it came from (same target_modules, same identity); full module paths otherwise, which PEFT
applies to those modules only. Each export is loaded by PEFT itself."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from factories import load_model, peft_adapter, tiny_llama
from loraops import formats
from loraops.cli import main

IDS = torch.tensor([[3, 5, 7, 1, 2, 9, 0, 11]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("targets") / "base")


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def config(folder):
    return json.loads((folder / "adapter_config.json").read_text())


def peft_load(base, folder):
    """(logits, the modules PEFT put a LoRA on) of the base with the adapter loaded by PEFT."""
    from peft import PeftModel

    model = load_model(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a key PEFT finds no module for (or the reverse) warns
        model = PeftModel.from_pretrained(model, folder)
    lora = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                  if getattr(m, "lora_A", None) is not None and len(m.lora_A))
    with torch.no_grad():
        return model(IDS).logits, lora


def file_modules(folder):
    return sorted(formats.read_adapter(folder, values=False).modules)


CASES = {
    "short names": dict(target_modules=["q_proj", "v_proj"]),
    "some layers": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    "rank pattern": dict(target_modules=["q_proj", "v_proj", "o_proj"], rank_pattern={"v_proj": 2},
                         alpha_pattern={"o_proj": 3}),
    "regex": dict(target_modules=r".*\.0\.self_attn\.(q|k)_proj"),
}


@pytest.mark.parametrize("case", CASES)
def test_export_of_a_peft_adapter_is_that_adapter(tmp_path, base, case):
    original = peft_adapter(base, tmp_path / "a", r=4, alpha=8, **CASES[case])
    run("register", original, "--name", "a")
    run("export", "a", "--format", "peft", "-o", tmp_path / "e")
    assert config(tmp_path / "e")["target_modules"] == config(original)["target_modules"]
    for field in ("layers_to_transform", "rank_pattern", "alpha_pattern"):
        assert config(tmp_path / "e").get(field) == config(original).get(field)
    assert (tmp_path / "e/adapter_model.safetensors").read_bytes() == (original / "adapter_model.safetensors").read_bytes()
    assert formats.identity(tmp_path / "e") == formats.identity(original)
    assert run("register", tmp_path / "e").startswith("already registered as a@1")
    logits, lora = peft_load(base, original)
    exported_logits, exported_lora = peft_load(base, tmp_path / "e")
    assert torch.equal(logits, exported_logits) and lora == exported_lora == file_modules(original)


def test_modules_that_differ_from_the_targeting_get_full_paths(tmp_path, base):
    """A combine of adapters with other coverage: short names would put a LoRA on every q_proj/v_proj when PEFT
    loads it."""
    one = peft_adapter(base, tmp_path / "one", r=4, alpha=8, target_modules=["q_proj"], layers_to_transform=[0])
    two = peft_adapter(base, tmp_path / "two", seed=2, r=4, alpha=8, target_modules=["v_proj"], layers_to_transform=[1])
    run("combine", one, two, "--method", "cat", "--name", "c", "-o", tmp_path / "c")
    written = config(tmp_path / "c")
    assert written["target_modules"] == file_modules(tmp_path / "c") == ["model.layers.0.self_attn.q_proj",
                                                                        "model.layers.1.self_attn.v_proj"]
    assert "layers_to_transform" not in written
    assert peft_load(base, tmp_path / "c")[1] == file_modules(tmp_path / "c")


def test_resize_keeps_the_targeting_and_peft_loads_it(tmp_path, base):
    original = peft_adapter(base, tmp_path / "a", r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                            layers_to_transform=[1])
    run("resize", original, "--rank", "2", "--name", "r", "-o", tmp_path / "r")
    written = config(tmp_path / "r")
    assert written["target_modules"] == config(original)["target_modules"] and written["layers_to_transform"] == [1]
    assert written["r"] == 2 and not written["rank_pattern"]
    assert peft_load(base, tmp_path / "r")[1] == file_modules(original)


def test_an_rslora_alpha_that_is_no_integer_is_kept_as_written(tmp_path, base):
    """rsLoRA's alpha recovered from the scale is 12.300000000000002 at r=8: the config's own 12.3 gives every
    module its scale, so the export is the same adapter (it was written as 12.300000000000002, another identity)."""
    original = peft_adapter(base, tmp_path / "a", r=8, alpha=12.3, target_modules=["q_proj", "v_proj"], use_rslora=True)
    run("register", original, "--name", "a")
    run("export", "a", "--format", "peft", "-o", tmp_path / "e")
    assert config(tmp_path / "e")["lora_alpha"] == 12.3 and not config(tmp_path / "e")["alpha_pattern"]
    assert formats.identity(tmp_path / "e") == formats.identity(original)


def test_a_language_models_adapter_exported_as_diffusers_says_which_format_it_needs(base, tmp_path):
    """The diffusers format names a pipeline's components: a language model's adapter was refused with "module
    'model.layers.0.self_attn.q_proj' has no pipeline component prefix", naming neither the adapter nor what to do."""
    adapter = peft_adapter(base, tmp_path / "a", target_modules=["q_proj"])
    result = CliRunner().invoke(main, ["export", str(adapter), "--format", "diffusers", "-o",
                                         str(tmp_path / "d.safetensors")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"error: {adapter}: module 'model.layers.0.self_attn.q_proj' has no pipeline "
                                    "component prefix") and "--format peft or kohya" in result.output, result.output
    assert not (tmp_path / "d.safetensors").exists()
