"""A PEFT config without target_modules: PEFT adapts its per-model-type defaults only (formats.peft.DEFAULT_TARGETS),
so a file with other modules is refused at fit time; one whose modules are all defaults merges as PEFT's does."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from factories import load_model, peft_adapter, tiny_llama
from loraops import check, formats
from loraops.basemodel import BaseModel
from loraops.cli import main
from loraops.formats import peft as peft_format


def test_default_table_is_peft_s():
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING,
                                      TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING,
                                      TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)

    for table in (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING,
                  TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING):
        assert peft_format.DEFAULT_TARGETS == table


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("targetnull") / "base")


def untargeted(folder, drop: bool = False):
    """The folder with its config's target_modules null (``drop``: absent)."""
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    if drop:
        del cfg["target_modules"]
    else:
        cfg["target_modules"] = None
    path.write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("drop", [False, True])
def test_modules_outside_the_defaults_are_refused(tmp_path, base, drop):
    adapter = untargeted(peft_adapter(base, tmp_path / "qkv", target_modules=["q_proj", "k_proj", "v_proj"]), drop)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(base), "-o", str(out), "--no-record"])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line
    assert ("adapter_config.json gives no target_modules: PEFT would adapt only llama's defaults (q_proj, v_proj) "
            "and ignore k_proj; set target_modules in adapter_config.json") in line
    assert not out.exists()
    # check says so too; the file alone (no base) is read as before
    report = check.check(formats.read_adapter(adapter), BaseModel.open(base))
    assert not report.ok and all(n.endswith("k_proj") for n in report.missing)
    assert len(formats.read_adapter(adapter).modules) == 3 * 2


def with_config(base, folder, **changes):
    """The base's files linked into ``folder``, with its config.json's ``changes``."""
    folder.mkdir()
    for f in base.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "config.json").unlink()
    cfg = json.loads((base / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))
    return folder


def test_a_model_type_peft_has_no_defaults_for_is_refused(tmp_path, base):
    adapter = untargeted(peft_adapter(base, tmp_path / "qv", target_modules=["q_proj", "v_proj"]))
    other = with_config(base, tmp_path / "base", model_type="llama_x")
    report = check.check(formats.read_adapter(adapter), BaseModel.open(other))
    assert not report.ok and len(report.missing) == 4
    assert "PEFT has no defaults for model_type 'llama_x'" in next(iter(report.why_missing.values()))


def test_all_default_modules_merge_as_peft(tmp_path, base):
    from peft import PeftModel

    adapter = untargeted(peft_adapter(base, tmp_path / "qv", target_modules=["q_proj", "v_proj"]))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(base), "-o", str(out), "--no-record"])
    assert result.exit_code == 0, result.output
    expected = PeftModel.from_pretrained(load_model(base), adapter).merge_and_unload().state_dict()
    ours = {}
    for f in out.glob("*.safetensors"):
        ours.update(load_file(f))
    original = load_model(base).state_dict()
    assert sum(not torch.equal(ours[n], original[n]) for n in ours) == 4
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)


def test_a_loha_config_without_targets_is_refused_too(tmp_path, base):
    from peft import LoHaConfig, get_peft_model

    model = get_peft_model(load_model(base), LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "o_proj"],
                                                        init_weights=False))
    model.save_pretrained(tmp_path / "loha")
    report = check.check(formats.read_adapter(untargeted(tmp_path / "loha")), BaseModel.open(base))
    assert not report.ok and report.missing and all(n.endswith("o_proj") for n in report.missing)
    assert "llama's defaults (q_proj, v_proj) and ignore o_proj" in report.why_missing[report.missing[0]]


@pytest.mark.parametrize("model_type, architectures", [(["llama"], None), ({"name": "llama"}, 5),
                                                       (None, [["LlamaForCausalLM"]])])
def test_a_model_type_or_architectures_of_no_name_is_none(tmp_path, base, model_type, architectures):
    """A base config.json whose model_type is no string (which transformers' AutoConfig fails on) names no model type,
    as one without it: a config without target_modules is not checked against it (it was a TypeError traceback,
    unhashable, from check and merge); architectures that hold no class names name none (extract's renaming read them
    by hashing: a TypeError, or for a number, not iterable)."""
    adapter = untargeted(peft_adapter(base, tmp_path / "qkv", target_modules=["q_proj", "k_proj", "v_proj"]))
    other = with_config(base, tmp_path / "base", model_type=model_type, architectures=architectures)
    assert check.check(formats.read_adapter(adapter), BaseModel.open(other)).ok
    assert check.model_type_of(json.loads((other / "config.json").read_text())) is None
    config = json.loads((other / "config.json").read_text())
    assert check.memory_names(["model.layers.0.self_attn.q_proj.weight"], config) == ({}, None)
    assert check.architectures_of({"architectures": "LlamaForCausalLM"}) == ["LlamaForCausalLM"]
