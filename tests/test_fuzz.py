"""Bounded fuzzing of the format readers (hypothesis, derandomized so CI runs the same cases): random bytes and
mutated valid files must either read or raise a LoraopsError subclass — never another exception. About 10-20 s."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_

import factories
from loraops import st
from loraops.errors import LoraopsError
from loraops.formats import identity, read_adapter

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Valid files to mutate: a kohya file and a PEFT folder's weights and config."""
    d = tmp_path_factory.mktemp("seeds")
    kohya = factories.kohya_file(d / "k.safetensors", {"lora_unet_a_proj": ((8,), (8,)), "lora_unet_b": ((8,), (4,))},
                                 rank=2)
    peft = d / "peft"
    peft.mkdir()
    st.write_safetensors(peft / "adapter_model.safetensors", {
        "base_model.model.layer.q.lora_A.weight": torch.ones(2, 8), "base_model.model.layer.q.lora_B.weight": torch.ones(8, 2),
    }, {"format": "pt"})
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                          "target_modules": ["q"]}))
    return {"kohya": kohya.read_bytes(), "peft_weights": (peft / "adapter_model.safetensors").read_bytes(),
            "peft_config": (peft / "adapter_config.json").read_bytes(), "dir": d}


def read_all(path) -> None:
    """Everything a command does with an unknown adapter path: header, adapter, identity."""
    try:
        if path.is_file():
            st.read_header(path)
        read_adapter(path)
        identity(path)
    except LoraopsError as exc:
        assert "\n" not in str(exc)


mutation = st_.lists(st_.tuples(st_.integers(0, 10**6), st_.integers(0, 255)), min_size=1, max_size=6)


def mutate(data: bytes, edits, cut: int | None) -> bytes:
    out = bytearray(data)
    for at, value in edits:
        out[at % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


@FUZZ
@given(data=st_.binary(max_size=512))
def test_random_bytes(data, tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    read_all(path)


@FUZZ
@given(edits=mutation, cut=st_.none() | st_.integers(0, 4096), header_only=st_.booleans())
def test_mutated_kohya_file(seeds, edits, cut, header_only, tmp_path):
    data = seeds["kohya"]
    if header_only:  # aim at the JSON header, where the interesting structure is
        edits = [(8 + at % (int.from_bytes(data[:8], "little")), v) for at, v in edits]
    path = tmp_path / "k.safetensors"
    path.write_bytes(mutate(data, edits, cut))
    read_all(path)


json_value = st_.recursive(st_.none() | st_.booleans() | st_.integers(-3, 10**12) | st_.floats() | st_.text(max_size=8),
                           lambda inner: st_.lists(inner, max_size=3) | st_.dictionaries(st_.text(max_size=8), inner, max_size=3),
                           max_leaves=6)
CONFIG_KEYS = ["bias", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "target_modules",
               "peft_type", "use_dora", "modules_to_save", "base_model_name_or_path", "layers_to_transform"]


@FUZZ
@given(changes=st_.dictionaries(st_.sampled_from(CONFIG_KEYS), json_value, max_size=3),
       edits=st_.none() | mutation)
def test_mutated_peft_folder(seeds, changes, edits, tmp_path):
    folder = tmp_path / "peft"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    config = {**json.loads(seeds["peft_config"]), **changes}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    weights = seeds["peft_weights"] if edits is None else mutate(seeds["peft_weights"], edits, None)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    read_all(folder)


@FUZZ
@given(changes=st_.dictionaries(st_.sampled_from(CONFIG_KEYS), json_value, min_size=1, max_size=2))
def test_mutated_config_then_combined(seeds, changes, tmp_path):
    """What a config field becomes must also survive the code after reading (algebra compares base hints)."""
    from loraops import algebra

    folder = tmp_path / "peft"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({**json.loads(seeds["peft_config"]), **changes}))
    (folder / "adapter_model.safetensors").write_bytes(seeds["peft_weights"])
    try:
        adapter = read_adapter(folder)
        algebra.combine([(adapter, 1.0), (adapter, 0.5)], "cat", device="cpu")
    except LoraopsError as exc:
        assert "\n" not in str(exc)
