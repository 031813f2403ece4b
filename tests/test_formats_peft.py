"""PEFT adapters made by peft itself read into the canonical model: every module's delta equals PEFT's own
get_delta_weight (the parity test), for every layer kind and scale rule PEFT has."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import factories
from loraops import engine
from loraops.errors import InvalidInputError, MismatchError
from loraops.formats import adapter_files, detect, identity, read_adapter, write_adapter

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return factories.tiny_llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return factories.tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "base")


def assert_parity(adapter_path, model):
    from peft import PeftModel

    expected = factories.peft_delta_weights(PeftModel.from_pretrained(model, adapter_path))
    adapter = read_adapter(adapter_path)
    assert sorted(adapter.modules) == sorted(expected)
    for name, module in adapter.modules.items():
        torch.testing.assert_close(module.delta(), expected[name], **TOL, msg=name)
    return adapter


def test_llama_all_seven_targets(llama, tmp_path):
    path = factories.peft_adapter(llama, tmp_path / "a", r=8, alpha=16)
    adapter = assert_parity(path, factories.load_model(llama))
    assert detect(path) == "peft" and adapter.format == "peft"
    assert adapter.target_modules == sorted(factories.LLAMA_TARGETS)
    assert len(adapter.modules) == 14 and adapter.rank == 8 and adapter.alpha == 16
    assert all(m.scale == 2.0 and m.kind == "linear" for m in adapter.modules.values())
    assert adapter.base_model == str(llama)
    q = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert q.source_keys == ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")


def test_gpt2_conv1d_fan_in_fan_out(gpt2, tmp_path):
    path = factories.peft_adapter(gpt2, tmp_path / "a", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    adapter = assert_parity(path, factories.load_model(gpt2))
    c_attn = adapter.modules["transformer.h.0.attn.c_attn"]
    assert c_attn.fan_in_fan_out and c_attn.weight_shape == (64, 192)


def test_rslora(llama, tmp_path):
    path = factories.peft_adapter(llama, tmp_path / "a", r=16, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)
    adapter = assert_parity(path, factories.load_model(llama))
    assert adapter.scale_mode == "rslora"
    assert all(m.scale == pytest.approx(8 / 4) for m in adapter.modules.values())


def test_rank_and_alpha_patterns_resolved_like_peft(llama, tmp_path):
    # Regex keys, suffix keys and a key that must NOT match "layers.1" inside "layers.10"-like names.
    path = factories.peft_adapter(
        llama, tmp_path / "a", r=8, alpha=16,
        rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
        alpha_pattern={"v_proj": 3, r"model\.layers\.0\..*k_proj": 5, "layers.1.self_attn.o_proj": 7},
    )
    adapter = assert_parity(path, factories.load_model(llama))
    mods = adapter.modules
    assert mods["model.layers.0.self_attn.q_proj"].rank == 4
    assert mods["model.layers.1.mlp.down_proj"].rank == 2 and mods["model.layers.0.mlp.down_proj"].rank == 8
    assert mods["model.layers.0.self_attn.k_proj"].alpha == 5 and mods["model.layers.1.self_attn.k_proj"].alpha == 16
    assert mods["model.layers.1.self_attn.o_proj"].alpha == 7 and mods["model.layers.0.self_attn.v_proj"].alpha == 3
    assert adapter.rank is None and adapter.alpha is None


def test_embedding_and_conv_layers(tmp_path):
    path = factories.conv_peft_adapter(tmp_path / "a")
    adapter = assert_parity(path, factories.conv_embedding_model())
    kinds = {n: m.kind for n, m in adapter.modules.items()}
    assert kinds == {"embed": "embedding", "proj": "linear", "conv1": "conv", "conv3": "conv"}
    assert adapter.modules["embed"].weight_shape == (32, 16)
    assert adapter.modules["conv3"].weight_shape == (6, 8, 3, 3)


def test_modules_to_save_become_full_tensors(tmp_path):
    from peft import PeftModel

    path = factories.conv_peft_adapter(tmp_path / "a", target_modules=["proj", "conv3"], modules_to_save=["conv1"])
    adapter = read_adapter(path)
    assert sorted(adapter.full_tensors) == ["conv1.bias", "conv1.weight"]
    peft_model = PeftModel.from_pretrained(factories.conv_embedding_model(), path)
    saved = peft_model.base_model.model.conv1.modules_to_save["default"]
    torch.testing.assert_close(adapter.full_tensors["conv1.weight"], saved.weight.detach())


def test_bf16_adapter_keeps_dtype(llama, tmp_path):
    path = factories.peft_adapter(llama, tmp_path / "a", target_modules=["q_proj"], dtype=torch.bfloat16)
    adapter = read_adapter(path)
    assert adapter.dtype == torch.bfloat16


@pytest.mark.parametrize("wide", ["lora_B", "lora_A"])
def test_factors_of_two_dtypes_are_reported_and_written_in_the_wider(llama, tmp_path, wide):
    """A file that keeps one factor in float32 beside a bf16 other: its dtype is float32 (inspect's, the registry's),
    and combine and resize write float32, so a float32 factor keeps every bit (cat folds the scale, 16/4, into B)."""
    from click.testing import CliRunner

    from loraops import algebra
    from loraops.cli import main
    from loraops.formats import write_adapter

    path = factories.peft_adapter(llama, tmp_path / "a", target_modules=["q_proj", "v_proj"], r=4)
    weights = path / "adapter_model.safetensors"
    stored = {k: v if wide in k else v.to(torch.bfloat16) for k, v in load_file(weights).items()}
    save_file(stored, str(weights), metadata={"format": "pt"})
    adapter = read_adapter(path)
    assert adapter.dtype == torch.float32
    assert json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).output)["dtype"] == "float32"
    combined, _ = algebra.combine([(adapter, 1.0)], "cat")
    written = load_file(write_adapter(combined, tmp_path / "cat") / "adapter_model.safetensors")
    assert written.keys() == stored.keys()
    assert all(torch.equal(written[k], stored[k].float() * (4 if "lora_B" in k else 1)) for k in stored)
    resized, _ = algebra.resize(adapter, rank=4)
    written = load_file(write_adapter(resized, tmp_path / "resized") / "adapter_model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.float32}


def test_adapter_name_segment_tolerated(llama, tmp_path):
    path = factories.peft_adapter(llama, tmp_path / "a", target_modules=["q_proj", "v_proj"])
    plain = read_adapter(path)
    weights = path / "adapter_model.safetensors"
    renamed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in load_file(weights).items()}
    save_file(renamed, str(weights), metadata={"format": "pt"})
    named = read_adapter(path)
    for name, module in plain.modules.items():
        torch.testing.assert_close(named.modules[name].delta(), module.delta())


def test_bare_file_with_sibling_config_and_without(llama, tmp_path):
    path = factories.peft_adapter(llama, tmp_path / "a", r=4, alpha=8, target_modules=["q_proj"])
    weights = path / "adapter_model.safetensors"
    assert read_adapter(weights).alpha == 8  # the sibling adapter_config.json is used
    assert adapter_files(weights) == [weights, path / "adapter_config.json"]
    bare = tmp_path / "bare.safetensors"
    shutil.copy(weights, bare)
    with pytest.raises(InvalidInputError, match=r"bare\.safetensors.*--alpha"):
        read_adapter(bare)
    adapter = read_adapter(bare, alpha=2)
    assert adapter.alpha == 2 and all(m.scale == 0.5 for m in adapter.modules.values())
    assert adapter_files(bare) == [bare]
    tensors = load_file(bare)
    save_file(tensors, str(bare), metadata={"format": "pt", "lora_alpha": "12"})
    assert read_adapter(bare).alpha == 12


def test_bare_file_alpha_beside_its_metadata_config(llama, tmp_path):
    """A bare file whose header holds a JSON config without lora_alpha and the alpha as a key of its own is read with
    that alpha (it asked for --alpha, saying the metadata had none); a number in ``alpha`` counts where
    ``lora_alpha`` holds none. A config in the header that says no alpha at all is still refused, AdaLoRA's too (it
    was a TypeError traceback)."""
    path = factories.peft_adapter(llama, tmp_path / "a", r=4, alpha=8, target_modules=["q_proj"])
    tensors = load_file(path / "adapter_model.safetensors")
    bare = tmp_path / "bare.safetensors"
    config = json.dumps({"peft_type": "LORA", "r": 4, "use_rslora": True})
    save_file(tensors, str(bare), metadata={"format": "pt", "adapter_config": config, "lora_alpha": "12"})
    assert all(m.alpha == 12 and m.scale == 6.0 for m in read_adapter(bare).modules.values())  # (12/√4)
    save_file(tensors, str(bare), metadata={"format": "pt", "lora_alpha": "n/a", "alpha": "6"})
    assert read_adapter(bare).alpha == 6
    save_file(tensors, str(bare), metadata={"format": "pt", "adapter_config": config})
    with pytest.raises(InvalidInputError, match=r"bare\.safetensors: no adapter_config.json and no alpha .*--alpha"):
        read_adapter(bare)
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(factories.load_model(llama), AdaLoraConfig(init_r=4, target_modules=["q_proj"],
                                                                      total_step=10))
    model.save_pretrained(tmp_path / "ada")
    config = {k: v for k, v in model.peft_config["default"].to_dict().items() if k != "lora_alpha"}
    save_file(load_file(tmp_path / "ada" / "adapter_model.safetensors"), str(bare),
              metadata={"format": "pt", "adapter_config": json.dumps(config, default=sorted)})
    with pytest.raises(InvalidInputError, match=r"bare\.safetensors: its metadata's AdaLoRA config gives no "
                                                r"lora_alpha; pass the LoRA alpha"):
        read_adapter(bare)
    assert read_adapter(bare, alpha=6).modules["model.layers.0.self_attn.q_proj"].alpha == 6


def test_config_rank_disagreeing_with_tensors_uses_tensor_rank(llama, tmp_path):
    path = factories.peft_adapter(llama, tmp_path / "a", r=4, alpha=8, target_modules=["q_proj"])
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["r"] = 16
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    adapter = read_adapter(path)
    assert adapter.rank == 4 and all(m.scale == 2.0 for m in adapter.modules.values())


def test_config_without_lora_alpha_takes_peft_default(llama, tmp_path):
    """LoraConfig's lora_alpha defaults to 8: a config that leaves it out means 8, as PEFT reads it (and the same
    identity as writing 8)."""
    path = factories.peft_adapter(llama, tmp_path / "a", r=4, alpha=8, target_modules=["q_proj"])
    explicit = identity(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    adapter = read_adapter(path)
    assert adapter.alpha == 8 and all(m.scale == 2.0 for m in adapter.modules.values())
    assert identity(path) == explicit


def test_config_with_null_lora_alpha_is_refused_as_such(llama, tmp_path):
    """``"lora_alpha": null`` is no default (PEFT divides it by r and fails): refused naming the config, not as a file
    without adapter_config.json (which the message said of a folder that has one); --alpha still supplies one."""
    path = factories.peft_adapter(llama, tmp_path / "a", r=4, alpha=8, target_modules=["q_proj"])
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": None}))
    with pytest.raises(InvalidInputError) as err:
        read_adapter(path)
    assert "adapter_config.json: config lora_alpha is null" in str(err.value)
    assert "no adapter_config.json" not in str(err.value)
    assert all(m.scale == 3.0 for m in read_adapter(path, alpha=12).modules.values())


def test_a_config_in_the_metadata_with_a_lone_surrogate_is_refused(tmp_path):
    """A bare PEFT file's ``adapter_config`` metadata (JSON in a metadata string) whose base_model_name_or_path held
    "\\udcff" was read, and `register` then failed with a UnicodeEncodeError traceback from the database driver."""
    from loraops.errors import FormatError

    key = "base_model.model.model.layers.0.self_attn.q_proj"
    config = json.dumps({"r": 2, "lora_alpha": 4, "base_model_name_or_path": "\udcff/models/llama"})
    save_file({f"{key}.lora_A.weight": torch.ones(2, 8), f"{key}.lora_B.weight": torch.ones(8, 2)},
              str(tmp_path / "a.safetensors"), metadata={"adapter_config": config})
    with pytest.raises(FormatError, match=r"a.safetensors: its metadata's adapter_config holds text that is not Unicode"):
        read_adapter(tmp_path / "a.safetensors")


def test_identity_covers_math_config_fields_only(llama, tmp_path):
    path = factories.peft_adapter(llama, tmp_path / "a", target_modules=["q_proj"])
    first = identity(path)
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": "elsewhere", "target_modules": ["q_proj"]}))
    assert identity(path) == first  # not a math field; list order normalised
    cfg_path.write_text(json.dumps({**cfg, "lora_alpha": 99}))
    assert identity(path) != first
    cfg_path.write_text(json.dumps({**cfg, "use_rslora": True}))
    assert identity(path) != first
    assert len(first) == 64 and adapter_files(path) == [path / "adapter_model.safetensors", cfg_path]


def test_trained_bias_and_old_modules_to_save_keys(tmp_path):
    path = factories.conv_peft_adapter(tmp_path / "a", target_modules=["proj"], bias="lora_only")
    adapter = read_adapter(path)
    assert sorted(adapter.full_tensors) == ["proj.bias"]
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.conv1.modules_to_save.default.weight"] = torch.ones(8, 4, 1, 1)
    save_file(tensors, str(weights))
    assert sorted(read_adapter(path).full_tensors) == ["conv1.weight", "proj.bias"]


def test_pattern_key_matches_peft_first_key_rule_with_precompiled_patterns():
    """Keys are compiled once per pattern set (a resized adapter has one per module: past re's 512-pattern cache,
    matching them as strings recompiled each one, 110 s for 1,600 modules) and tested on names only when the name
    ends with the key's literal tail: the answer stays PEFT's get_pattern_key's, first matching key wins."""
    import itertools
    import re

    from loraops.formats.common import pattern_key

    def peft_rule(keys, name):
        return next((key for key in keys if re.match(rf"(.*\.)?({key})$", name)), None)

    names = [f"model.layers.{i}.{m}" for i in range(12) for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                                   "mlp.down_proj", "mlp.up_proj")]
    keys = ["q_proj", "layers.1.mlp.down_proj", r"layers\.1\d\..*", "(q|k)_proj", "[kq]_proj", "down_proj",
            r"mlp\.up_proj", "up", "x?", "layers.1.self_attn.q_projx?", r"layers.2.mlp.up_pro\w", "layers.3",
            r"\u0071_proj", r"k_pr\u006fj", r"down_pro\152", r"q_pro\x6a"]  # escapes longer than one letter
    for size in (1, 2):
        for chosen in itertools.permutations(keys, size):
            for name in names:
                assert pattern_key(chosen, name) == peft_rule(chosen, name), (chosen, name)


TARGETING = [  # (config fields, module keys of the file): PEFT's check_target_module_exists decides each key
    ({"target_modules": ["q_proj", "v_proj"]}, ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]),
    ({"target_modules": ["model.layers.0.self_attn.q_proj"]}, ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
    ({"target_modules": "q_proj"}, ["model.layers.0.self_attn.q_proj"]),  # a string is a regex matching the whole key
    ({"target_modules": r".*\.1\.self_attn\.(q|v)_proj"}, ["model.layers.1.self_attn.v_proj", "model.layers.0.self_attn.q_proj"]),
    ({"target_modules": ["q_proj"], "layers_to_transform": [1]}, ["model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.q_proj"]),
    ({"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
     ["model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj"]),
    ({"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": ["h", "blocks"]},
     ["model.layers.0.self_attn.q_proj", "transformer.h.0.attn.q_proj"]),
    ({"target_modules": ["q_proj"], "layers_to_transform": []}, ["model.layers.7.self_attn.q_proj"]),
    ({"target_modules": ["model.layers.0.self_attn.q_proj"], "layers_to_transform": [1]}, ["model.layers.0.self_attn.q_proj"]),
    ({"target_modules": ["q_proj", "k_proj"], "exclude_modules": ["layers.0.self_attn.k_proj"]},
     ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.0.self_attn.k_proj"]),
    ({"target_modules": ["q_proj"], "exclude_modules": r".*\.0\..*"}, ["model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.q_proj"]),
    ({"target_modules": ["dense", "out_proj"], "modules_to_save": ["classifier"]},
     ["model.layers.0.attention.dense", "classifier.dense", "classifier.out_proj"]),
    ({"target_modules": r"model\.layers\.\d+\.self_attn\.q"}, ["model.layers.0.self_attn.q_proj"]),  # whole key only
    # no layers_pattern: the first numbered component is the layer, not an expert's index after it
    ({"target_modules": ["w1"], "layers_to_transform": [1]},
     ["model.layers.1.block_sparse_moe.experts.0.w1", "model.layers.0.block_sparse_moe.experts.1.w1"]),
    ({"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers"}, ["layers.0.attn.q_proj"]),
    ({"target_modules": "all-linear"}, ["model.layers.0.self_attn.q_proj", "lm_head"]),  # only the model can say
    ({"target_modules": "ALL-Linear"}, ["lm_head"]),  # (as PEFT reads it, in any case)
    ({}, ["model.layers.0.self_attn.q_proj"]),  # no target_modules: PEFT's defaults for the model type
    # whatever the model's targeting selects, PEFT wraps nothing modules_to_save names (was read: the check stopped
    # where only the model can say)
    ({"modules_to_save": ["lm_head"]}, ["model.layers.0.self_attn.q_proj", "lm_head"]),
    ({"target_modules": "all-linear", "modules_to_save": ["classifier"]}, ["layers.0.dense", "classifier.dense"]),
]


@pytest.mark.parametrize("fields, keys", TARGETING)
def test_modules_the_config_does_not_target_are_refused_as_peft_matches(fields, keys, tmp_path):
    """PEFT wraps only the modules its config's targeting selects and leaves the file's other factors unused; a
    config edited to leave layers out (layers_to_transform, exclude_modules, a narrower target_modules) was read with
    every module of the file, so merge, export… added LoRAs the PEFT model does not have. Each file module must be one
    PEFT's own check_target_module_exists selects, else the read is refused naming it."""
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    config = SimpleNamespace(**{"target_modules": None, "target_parameters": None, "exclude_modules": None,
                                "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, **fields})
    for key in keys:
        folder = tmp_path / key
        folder.mkdir()
        save_file({f"base_model.model.{key}.lora_A.weight": torch.ones(2, 4),
                   f"base_model.model.{key}.lora_B.weight": torch.ones(4, 2)}, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **fields}))
        model_decides = str(fields.get("target_modules")).lower() in ("none", "all-linear")
        # where only the model can say what the targeting selects, it may select any module: PEFT's check of one
        # its targeting selected
        found = check_target_module_exists(SimpleNamespace(**{**vars(config), "target_modules": [key]})
                                           if model_decides else config, key)
        if found and not isinstance(found, _ExcludedModule):
            assert list(read_adapter(folder).modules) == [key]
        else:
            with pytest.raises(InvalidInputError, match=f"module '{key}' has LoRA weights that the config's .* leaves out"):
                read_adapter(folder)


def test_layers_left_out_by_an_edited_config_are_refused_not_merged(llama, tmp_path):
    """A PEFT adapter on both layers whose config is then edited to layers_to_transform [1]: PEFT loads layer 1's LoRAs
    only (the checks below); loraops read all four modules, so its merge was not PEFT's model. Refused, naming one."""
    from peft import PeftModel

    path = factories.peft_adapter(llama, tmp_path / "a", target_modules=["q_proj", "v_proj"])
    assert len(read_adapter(path).modules) == 4
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "layers_to_transform": [1]}))
    loaded = factories.peft_delta_weights(PeftModel.from_pretrained(factories.load_model(llama), path))
    assert sorted(loaded) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    # (no note on PEFT's old greedy layer regex: it took layer 0 too, and a module another field leaves out is not its)
    with pytest.raises(InvalidInputError, match="'model.layers.0.self_attn.q_proj' has LoRA weights that the config's "
                                                "layers_to_transform leaves out: .* remove the module's tensors$"):
        read_adapter(path)
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "layers_to_transform": [0, 1], "target_modules": ["q_proj"]}))
    with pytest.raises(InvalidInputError, match="'model.layers.0.self_attn.v_proj' has LoRA weights that the config's "
                                                "target_modules leaves out: .* remove the module's tensors$"):
        read_adapter(path)
    with pytest.raises(InvalidInputError, match="config layers_to_transform='1' is none of the values PEFT takes"):
        (path / "adapter_config.json").write_text(json.dumps({**cfg, "layers_to_transform": "1"}))
        read_adapter(path)


@pytest.mark.parametrize("version", ["0.17.1", None])
def test_a_moe_adapter_of_the_old_greedy_layer_regex_is_refused_saying_so(version, tmp_path):
    """Before huggingface/peft#3318 PEFT took a name's last number for its layer (no layers_pattern): with
    layers_to_transform [0] it trained expert 0 of every layer. PEFT now reads layer 1 there and loads the adapter
    without it; loraops refuses it as before, now saying why the file has it and what loads it as trained."""
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    keys = ["model.layers.0.block_sparse_moe.experts.0.w1", "model.layers.1.block_sparse_moe.experts.0.w1"]
    fields = {"target_modules": ["w1"], "layers_to_transform": [0]}
    config = SimpleNamespace(target_modules=["w1"], layers_to_transform=[0], layers_pattern=None)
    assert [bool(check_target_module_exists(config, key)) for key in keys] == [True, False]
    save_file({f"base_model.model.{key}.lora_{part}.weight": torch.ones(2, 2) for key in keys for part in "AB"},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, **fields, **({"peft_version": version} if version else {})}))
    with pytest.raises(InvalidInputError) as refused:
        read_adapter(tmp_path)
    recorded = f" (this config records peft_version {version})" if version else ""
    assert str(refused.value).endswith(
        f"module '{keys[1]}' has LoRA weights that the config's layers_to_transform leaves out: PEFT would load the "
        "adapter without them; correct the config, or remove the module's tensors. PEFT before huggingface/peft#3318 "
        f"took the name's last number, 0, for its layer index, so an adapter trained then has it{recorded}; to load "
        "it as trained, list the modules by full name in target_modules, without layers_to_transform")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": keys, "layers_to_transform": None}))
    assert sorted(read_adapter(tmp_path).modules) == keys


def test_a_moe_module_left_out_under_a_layers_pattern_gets_no_greedy_regex_note(tmp_path):
    """With layers_pattern PEFT's layer regex, old and new, takes the number after the pattern (the layer's, 1 here):
    such an adapter never held the module, so the refusal does not say the old regex took the expert's index."""
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    keys = ["model.layers.0.block_sparse_moe.experts.0.w1", "model.layers.1.block_sparse_moe.experts.0.w1"]
    fields = {"target_modules": ["w1"], "layers_to_transform": [0], "layers_pattern": "layers"}
    assert [bool(check_target_module_exists(SimpleNamespace(**fields), key)) for key in keys] == [True, False]
    save_file({f"base_model.model.{key}.lora_{part}.weight": torch.ones(2, 2) for key in keys for part in "AB"},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, **fields}))
    with pytest.raises(InvalidInputError) as refused:
        read_adapter(tmp_path)
    assert str(refused.value).endswith(f"module '{keys[1]}' has LoRA weights that the config's layers_to_transform "
                                       "leaves out: PEFT would load the adapter without them; correct the config, or "
                                       "remove the module's tensors")


ADALORA_SCHEDULE = {"init_r": 4, "target_r": 4, "total_step": 10}


@pytest.mark.parametrize("method", ["LoraConfig", "AdaLoraConfig"])
def test_a_regex_with_layers_is_refused_as_peft_refuses_it(method, llama, tmp_path):
    """LoraConfig, and AdaLoraConfig with it, refuse layers_to_transform beside a target_modules regex; read with the
    regex alone, a config edited so (to leave a layer out) merged every layer."""
    import peft

    settings = ADALORA_SCHEDULE if method == "AdaLoraConfig" else {"r": 4}
    with pytest.raises(ValueError, match="`layers_to_transform` cannot be used when `target_modules` is a str"):
        getattr(peft, method)(**settings, target_modules=".*q_proj", layers_to_transform=[1])
    torch.manual_seed(0)
    peft.get_peft_model(factories.load_model(llama), getattr(peft, method)(**settings, target_modules=".*q_proj")
                        ).save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "layers_to_transform": [1]}))
    with pytest.raises(InvalidInputError, match=r"adapter_config.json: config layers_to_transform=\[1\] beside "
                                                r"target_modules '\.\*q_proj', a regex: PEFT's LoraConfig refuses that"):
        read_adapter(tmp_path / "a")


@pytest.mark.parametrize("method, fields, edited", [
    # LoHaConfig takes layers beside a regex, and PEFT selects by the regex alone
    ("LoHaConfig", {"target_modules": r".*\.(q|k)_proj", "layers_to_transform": [1], "layers_pattern": "layers"}, {}),
    # VeraConfig has no exclude_modules: PEFT drops the field (a warning) and wraps k_proj (was refused: a false
    # "the config's exclude_modules leaves out")
    ("VeraConfig", {"target_modules": ["q_proj", "k_proj"]}, {"exclude_modules": ["k_proj"]}),
], ids=["loha-regex-with-layers", "vera-exclude-modules"])
def test_targeting_fields_a_method_does_not_use_are_not_applied(method, fields, edited, llama, tmp_path):
    """The targeting is what PEFT's config class of the adapter's method reads: loraops reads exactly the modules PEFT
    wraps."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    torch.manual_seed(0)
    peft.get_peft_model(factories.load_model(llama), getattr(peft, method)(r=4, **fields)).save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, **edited}))
    model = peft.PeftModel.from_pretrained(factories.load_model(llama), tmp_path / "a")
    wrapped = [name.removeprefix("base_model.model.") for name, layer in model.named_modules()
               if isinstance(layer, BaseTunerLayer)]
    assert len(wrapped) == 4
    assert sorted(read_adapter(tmp_path / "a").modules) == sorted(wrapped)


@pytest.mark.parametrize("method", ["LoHaConfig", "LoKrConfig", "VeraConfig", "AdaLoraConfig"])
def test_ensure_weight_tying_adds_no_module_beside_the_targeting_but_in_a_lora(method, llama, tmp_path):
    """ensure_weight_tying is a LoraConfig field (LoHaConfig(ensure_weight_tying=True) is a TypeError): in a LoHa, LoKr
    or VeRA config PEFT drops it (a warning) and wraps what the targeting selects, no more. AdaLoraConfig inherits it,
    but the only layers it adds are those tied to a targeted embedding, and AdaLoRA wraps no embedding (PEFT refuses
    the config). It made loraops skip the targeting check, so a module the config leaves out was read, merged and
    exported."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    settings = ADALORA_SCHEDULE if method == "AdaLoraConfig" else {"r": 4}
    if method == "AdaLoraConfig":
        with pytest.raises(ValueError, match="Target module Embedding.* is not supported"):
            peft.get_peft_model(factories.load_model(llama), peft.AdaLoraConfig(
                **settings, target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True))
    torch.manual_seed(0)
    peft.get_peft_model(factories.load_model(llama), getattr(peft, method)(**settings, target_modules=["q_proj", "k_proj"])
                        ).save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(
        {**cfg, "target_modules": ["q_proj"], "ensure_weight_tying": True}))
    model = peft.PeftModel.from_pretrained(factories.load_model(llama), tmp_path / "a")
    wrapped = [name.removeprefix("base_model.model.") for name, layer in model.named_modules()
               if isinstance(layer, BaseTunerLayer)]
    assert wrapped == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(InvalidInputError, match="module 'model.layers.0.self_attn.k_proj' has LoRA weights that the "
                                                "config's target_modules leaves out"):
        read_adapter(tmp_path / "a")


def test_tied_modules_peft_adds_beside_the_targeting_are_read(tmp_path):
    """ensure_weight_tying on a tied model's targeted embeddings: PEFT takes lm_head out of target_modules, wraps it
    anyway (tied to embed_tokens' LoRA) and saves its factors, so a module outside the targeting is PEFT's own there."""
    from peft import LoraConfig, get_peft_model

    base = factories.tiny_llama(tmp_path / "tied", tie=True)
    model = get_peft_model(factories.load_model(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"], ensure_weight_tying=True,
        init_lora_weights=False))
    model.save_pretrained(tmp_path / "a")
    assert "lm_head" not in json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    assert {"lm_head", "model.embed_tokens"} <= set(read_adapter(tmp_path / "a").modules)


def null_modules_to_save(folder):
    """The folder's config with ``"modules_to_save": null``, as PEFT before its task models wrote their entries into
    the config saved a task adapter (beside the head's tensors)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": None}))
    return folder


def head_of(model) -> list[str]:
    """The modules a loaded PEFT model saves whole (its ModulesToSaveWrappers)."""
    from peft.utils.other import ModulesToSaveWrapper

    return sorted(name.removeprefix("base_model.model.") for name, module in model.named_modules()
                  if isinstance(module, ModulesToSaveWrapper))


@pytest.mark.parametrize("task, model_type, cls_name, config, targets", factories.TASK_MODELS)
def test_a_task_head_under_a_null_modules_to_save_merges_as_peft_loads_it(task, model_type, cls_name, config,
                                                                          targets, tmp_path):
    """PEFT's task models (SEQ_CLS, TOKEN_CLS, QUESTION_ANS) add their head to modules_to_save when they load an
    adapter, whatever its config lists: a config with "modules_to_save": null beside the head's tensors (as older
    PEFT saved it) loads with the head saved whole. loraops refused it (an unknown adapter key layout); it reads the
    head as PEFT does, full tensors in place of the base's, and its merge is PEFT's merge_and_unload."""
    from peft import PeftModel

    from loraops import engine

    base, folder, model_cls = factories.task_adapter(tmp_path, task, model_type, cls_name, config, targets)
    null_modules_to_save(folder)
    model = PeftModel.from_pretrained(model_cls.from_pretrained(base), folder)
    heads, entries = head_of(model), model.peft_config["default"].modules_to_save  # PEFT's own entries, added on load
    assert heads and entries
    adapter = read_adapter(folder)
    assert adapter.full_tensors and all(any(name.startswith(f"{head}.") for head in heads) for name in adapter.full_tensors)
    engine.merge(base, [(adapter, 1.0)], tmp_path / "out", device="cpu")
    expected = model.merge_and_unload().state_dict()
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged.keys() == expected.keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
    base_state = load_file(base / "model.safetensors")
    assert not any(torch.equal(merged[name], base_state[name]) for name in adapter.full_tensors)  # the trained head
    # exported, its config lists the entries PEFT added (as PEFT 0.21 saves them), and PEFT merges it the same
    out = write_adapter(adapter, tmp_path / "export")
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == sorted(entries)
    exported = PeftModel.from_pretrained(model_cls.from_pretrained(base), out).merge_and_unload().state_dict()
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("targeting", ["listed", "defaults"])
@pytest.mark.parametrize("task, model_type, cls_name, config, targets", factories.TASK_MODELS)
def test_a_lora_on_a_task_head_is_refused_as_peft_loads_none(task, model_type, cls_name, config, targets,
                                                               targeting, tmp_path):
    """A LoRA on the head the task model saves whole (score, classifier, qa_outputs), its config listing no
    modules_to_save (as older PEFT saved it): loraops read the factors and merged them. PEFT never loads them: its
    SEQ_CLS model adds the head to modules_to_save before it wraps anything, and check_target_module_exists wraps no
    module modules_to_save names, so it loads the adapter without them; its TOKEN_CLS and QUESTION_ANS models add it
    after, so a head target_modules lists is wrapped by the LoRA and then their ModulesToSaveWrapper refuses it (a
    TypeError), and a head it does not list (PEFT's defaults for the model type, "defaults" here) is left out.
    loraops now refuses them in one line. (PEFT cannot load the head's factors without its saved tensors either: its
    load of the wrapped head fails, a KeyError; so they are kept.)"""
    import torch.nn as nn
    from peft import PeftModel

    base, folder, model_cls = factories.task_adapter(tmp_path, task, model_type, cls_name, config, targets)
    expected = PeftModel.from_pretrained(model_cls.from_pretrained(base), folder).merge_and_unload().state_dict()
    heads = head_of(PeftModel.from_pretrained(model_cls.from_pretrained(base), folder))
    linears = {name: m for name, m in model_cls.from_pretrained(base).named_modules()
               if isinstance(m, nn.Linear) and any(name == h or name.startswith(f"{h}.") for h in heads)}
    tensors = load_file(folder / "adapter_model.safetensors")
    torch.manual_seed(2)
    for name, m in linears.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(4, m.in_features)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m.out_features, 4)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({
        **cfg, "modules_to_save": None, "target_modules": [*targets, *linears] if targeting == "listed" else None}))
    (entry,) = heads  # the module the task's entry names, which PEFT wraps
    with pytest.raises(InvalidInputError, match=rf"module '{sorted(linears)[0]}' has LoRA weights, but the model of "
                                                rf"task_type {task} saves '{entry}' whole \(PEFT adds it to "
                                                r"modules_to_save\) and PEFT loads no LoRA on a module it saves whole"):
        read_adapter(folder)
    if task != "SEQ_CLS" and targeting == "listed":
        with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type .*lora"):
            PeftModel.from_pretrained(model_cls.from_pretrained(base), folder)
        return
    model = PeftModel.from_pretrained(model_cls.from_pretrained(base), folder)
    assert head_of(model) == heads and not any("lora_A" in n and any(f".{h}." in n for h in heads)
                                               for n, _ in model.named_parameters())
    merged = model.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in merged.items():  # the head's factors unused: its trained tensors as they were saved
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_distilbert_pre_classifier_is_saved_whole_under_seq_cls_as_peft_saves_it(tmp_path):
    """PEFT wraps every module whose name ends with a modules_to_save entry, as a plain string: under SEQ_CLS's
    "classifier", DistilBERT's pre_classifier too (its regex that keeps LoRAs off saved modules is dot-bounded and
    does not see it). A PEFT SEQ_CLS adapter saves pre_classifier whole: loraops merges it as PEFT does, and its export
    lists modules_to_save as PEFT wrote them (it added "pre_classifier"). A LoRA on pre_classifier, which PEFT cannot
    load (its ModulesToSaveWrapper refuses the LoRA layer, a TypeError), was read and merged; now refused in one line.
    Without modules_to_save (no task), such a LoRA is PEFT's and is read."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from loraops import engine

    base, folder, model_cls = factories.task_adapter(tmp_path, "SEQ_CLS", "distilbert",
                                                     "DistilBertForSequenceClassification", factories.TINY_DISTILBERT,
                                                     ["q_lin", "v_lin"])
    model = PeftModel.from_pretrained(model_cls.from_pretrained(base), folder)
    assert head_of(model) == ["classifier", "pre_classifier"]
    adapter = read_adapter(folder)
    assert {"pre_classifier.weight", "pre_classifier.bias"} <= adapter.full_tensors.keys()
    engine.merge(base, [(adapter, 1.0)], tmp_path / "out", device="cpu")
    expected = model.merge_and_unload().state_dict()
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
    out = write_adapter(adapter, tmp_path / "export")
    written = json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    assert sorted(written) == sorted(json.loads((folder / "adapter_config.json").read_text())["modules_to_save"])

    tensors = load_file(folder / "adapter_model.safetensors")
    torch.manual_seed(2)
    tensors["base_model.model.pre_classifier.lora_A.weight"] = torch.randn(4, 32)
    tensors["base_model.model.pre_classifier.lora_B.weight"] = torch.randn(32, 4)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    for saved in (cfg["modules_to_save"], None):  # as PEFT 0.21 saves it, and as older PEFT did
        (folder / "adapter_config.json").write_text(json.dumps({
            **cfg, "modules_to_save": saved, "target_modules": ["q_lin", "v_lin", "pre_classifier"]}))
        with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type .*lora"):
            PeftModel.from_pretrained(model_cls.from_pretrained(base), folder)
        with pytest.raises(InvalidInputError, match="module 'pre_classifier' has LoRA weights, but .* saves every "
                                                    "module whose name ends with 'classifier' whole"):
            read_adapter(folder)

    plain = get_peft_model(model_cls.from_pretrained(base), LoraConfig(r=4, target_modules=["q_lin", "pre_classifier"]))
    plain.save_pretrained(tmp_path / "plain")
    assert "pre_classifier" in read_adapter(tmp_path / "plain").modules


def classifier_folder(folder, task_type):
    """A hand-made PEFT folder with LoRAs on ``classifier`` and ``layers.0.dense``, of ``task_type``."""
    folder.mkdir()
    save_file({f"base_model.model.{m}.{p}.weight": torch.ones(*shape) for m in ("classifier", "layers.0.dense")
               for p, shape in (("lora_A", (2, 4)), ("lora_B", (4, 2)))}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["classifier", "dense"],
        "modules_to_save": None, "task_type": task_type}))
    return folder


@pytest.mark.parametrize("task_type", ["seq_cls", "Token_Cls", ["SEQ_CLS"], ""])
def test_a_task_type_peft_does_not_know_is_refused_as_peft_refuses_it(task_type, tmp_path):
    """PeftConfig's __post_init__ refuses a task_type that is not one of its TaskType values, exactly spelled (every
    method's config, at load): loraops read such a folder as one without a task. Refused in one line, by the reader
    and by the identity (so `register` refuses it too)."""
    from peft import LoraConfig

    folder = classifier_folder(tmp_path / "a", task_type)
    with pytest.raises(ValueError, match="Invalid task type"):
        LoraConfig.from_pretrained(folder)
    message = (rf"adapter_config.json: config task_type={re.escape(repr(task_type))} is none of PEFT's task types "
               r"\(SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION\), which its config "
               r"refuses$")
    with pytest.raises(InvalidInputError, match=message):
        read_adapter(folder)
    with pytest.raises(InvalidInputError, match=message):
        identity(folder)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_a_task_type_without_a_head_adds_none(task_type, tmp_path):
    """Only PEFT's SEQ_CLS, TOKEN_CLS and QUESTION_ANS models add a head to modules_to_save: under another task (or
    none) a LoRA on a module named classifier is read as any module, and the export keeps the task and lists no
    modules_to_save, so it reads back the same."""
    adapter = read_adapter(classifier_folder(tmp_path / "a", task_type))
    assert sorted(adapter.modules) == ["classifier", "layers.0.dense"] and not adapter.full_tensors
    out = write_adapter(adapter, tmp_path / "out")
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["task_type"] == task_type and written["modules_to_save"] is None
    assert sorted(read_adapter(out).modules) == sorted(adapter.modules)


@pytest.mark.parametrize("task, model_type, cls_name, config, targets",
                         [factories.TASK_MODELS[0], factories.TASK_MODELS[3]])
def test_a_string_modules_to_save_is_refused_as_peft_reads_its_characters(task, model_type, cls_name, config,
                                                                          targets, tmp_path):
    """modules_to_save is a list in every PEFT config; given one string ("classifier"), PEFT's task models fail on it
    (SEQ_CLS: an AttributeError, str has no extend) or wrap every module whose name ends with one of its characters
    (a TypeError on the first LoRA layer's ModuleDict). loraops read it as a list of that one name. Refused in one
    line, by the reader and by the identity."""
    refused_as_peft_fails(tmp_path, (task, model_type, cls_name, config, targets), lambda entries: entries[0],
                          AttributeError if task == "SEQ_CLS" else TypeError,
                          r"\(PEFT reads a string as its characters\)")


def refused_as_peft_fails(tmp_path, task_model, edit, peft_error, why):
    """A task adapter of ``task_model`` (factories.TASK_MODELS) whose modules_to_save is ``edit`` of the list PEFT
    wrote: PEFT fails to load it (``peft_error``), and the reader and the identity refuse it in one line, the value
    followed by ``why`` (a regex)."""
    from peft import PeftModel

    base, folder, model_cls = factories.task_adapter(tmp_path, *task_model)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    value = edit(cfg["modules_to_save"])
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": value}))
    with pytest.raises(peft_error):
        PeftModel.from_pretrained(model_cls.from_pretrained(base), folder)
    message = rf"adapter_config.json: config modules_to_save={re.escape(repr(value))} must be a list of module names " \
              rf"{why}$"
    with pytest.raises(InvalidInputError, match=message):
        read_adapter(folder)
    with pytest.raises(InvalidInputError, match=message):
        identity(folder)


@pytest.mark.parametrize("task, model_type, cls_name, config, targets",
                         [factories.TASK_MODELS[0], factories.TASK_MODELS[2], factories.TASK_MODELS[3]])
@pytest.mark.parametrize("value", ["", False, {}])
def test_a_false_modules_to_save_fails_a_task_model_and_is_refused(task, model_type, cls_name, config, targets,
                                                                   value, tmp_path):
    """A modules_to_save that is false but no list ("", false, {}): PEFT reads it as no module where nothing adds to
    it, but its SEQ_CLS, TOKEN_CLS and QUESTION_ANS models extend it with their head and fail to load (an
    AttributeError). loraops read it as null, the head's entries added. Refused in one line naming the field, by the
    reader and by the identity; without such a task it is still read as null, with the identity it had."""
    refused_as_peft_fails(tmp_path, (task, model_type, cls_name, config, targets), lambda entries: value,
                          AttributeError,
                          rf"or null \(PEFT's {task} model adds its head to it, and fails on this one\)")
    untasked = classifier_folder(tmp_path / "untasked", None)
    nulled = identity(untasked)
    cfg = json.loads((untasked / "adapter_config.json").read_text())
    (untasked / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": value}))
    assert identity(untasked) == nulled
    assert sorted(read_adapter(untasked).modules) == ["classifier", "layers.0.dense"]


def test_a_task_adapter_hashes_the_modules_it_saves_not_their_spelling(tmp_path):
    """A task adapter's identity hashes the modules_to_save PEFT loads it with (saved_entries): older PEFT's
    ``"modules_to_save": null`` and PEFT 0.21's ``["classifier", "score"]`` beside the same weights are one adapter
    (they were two). PEFT 0.21's spelling keeps the identity it had (the documented formula, recomputed here); without
    a task the two spellings still differ, as they save different modules."""
    import hashlib

    _, folder, _ = factories.task_adapter(tmp_path, *factories.TASK_MODELS[0])
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier", "score"]
    weights = hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
    fields = {"peft_type": "LORA", "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "use_rslora": False,
              "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False,
              "target_modules": sorted(cfg["target_modules"]), "modules_to_save": ["classifier", "score"],
              "use_dora": False}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    saved = identity(folder)
    assert saved == hashlib.sha256(f"loraops-peft-identity-v1\n{weights}\n{canonical}".encode()).hexdigest()
    assert identity(null_modules_to_save(folder)) == saved
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["classifier"]}))
    assert identity(folder) == saved
    for task_type in (None, "CAUSAL_LM"):
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": task_type}))
        listed = identity(folder)
        assert identity(null_modules_to_save(folder)) != listed


def test_a_task_type_adds_no_head_to_a_trainable_tokens_identity(tmp_path):
    """PEFT's task models add their head to modules_to_save only where the config has that field, which
    TrainableTokensConfig has not: a SEQ_CLS trainable-tokens adapter saves no head. Its identity (modules_to_save as
    PEFT loads it, saved_entries) is then the one it had before task entries were hashed, that of the same folder
    without a task_type; hashing the task's entries would re-identify every such adapter."""
    import transformers
    from peft import TrainableTokensConfig, get_peft_model

    _, model_type, cls_name, config, _ = factories.TASK_MODELS[1]
    base = factories.tiny_transformers(tmp_path / "base", model_type, cls_name, **config)
    model = get_peft_model(getattr(transformers, cls_name).from_pretrained(base),
                           TrainableTokensConfig(task_type="SEQ_CLS", token_indices=[1, 2]))
    model.save_pretrained(tmp_path / "a")
    assert not hasattr(model.peft_config["default"], "modules_to_save")
    assert not any("score" in key for key in load_file(tmp_path / "a" / "adapter_model.safetensors"))
    tasked = identity(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": None}))
    assert identity(tmp_path / "a") == tasked


def test_a_loha_configs_ensure_weight_tying_reads_no_tied_head(tmp_path):
    """PEFT drops ensure_weight_tying from a LoHa (LoKr, VeRA) config, so it saves no tied head beside saved
    embeddings: a plain lm_head.weight in such a file is no layout of PEFT's and is refused, not read as the head's
    new value (as the field, kept, made it)."""
    import peft

    from loraops.errors import FormatError

    base = factories.tiny_llama(tmp_path / "tied", tie=True)
    peft.get_peft_model(factories.load_model(base), peft.LoHaConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"])).save_pretrained(tmp_path / "a")
    config = tmp_path / "a" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "ensure_weight_tying": True}))
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({**state, "base_model.model.lm_head.weight": state["base_model.model.model.embed_tokens.weight"] + 0.05},
              str(weights))
    with pytest.raises(FormatError, match="unknown adapter key layout: 'base_model.model.lm_head.weight'"):
        read_adapter(tmp_path / "a")


@pytest.mark.parametrize("entry", ["wte", "transformer.wte"])
def test_ensure_weight_tying_beside_embeddings_peft_does_not_name_so_reads_a_head_as_peft_loads_it(tmp_path, entry):
    """PEFT ties a module to saved embeddings (ensure_weight_tying) only where a modules_to_save entry is named as its
    EMBEDDING_LAYER_NAMES (embed_tokens, lm_head): GPT-2's wte is not, so PEFT warns that no tied module is added and
    saves no head. A plain lm_head.weight there all the same is the layout PEFT saves for modules_to_save=["lm_head"]
    (its config then says ["transformer.wte"]), and PEFT's load (not strict) puts it over the head: read as the head's
    replacement, it merges as PEFT's adapted model."""
    import warnings

    import peft
    from transformers import AutoModelForCausalLM

    from loraops import engine

    base = factories.tiny_gpt2(tmp_path / "gpt2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.get_peft_model(factories.load_model(base), peft.LoraConfig(
            r=4, target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=[entry], ensure_weight_tying=True,
            init_lora_weights=False))
    assert any("no tied modules are added" in str(w.message) for w in caught)
    model.save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(weights)
    assert [k for k in state if "lora_" not in k] == ["base_model.model.transformer.wte.weight"]
    assert sorted(read_adapter(tmp_path / "a").full_tensors) == ["transformer.wte.weight"]
    head = state["base_model.model.transformer.wte.weight"] + 0.05
    save_file({**state, "base_model.model.lm_head.weight": head}, str(weights))
    assert torch.equal(read_adapter(tmp_path / "a").full_tensors["lm_head.weight"], head)
    tokens = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(factories.load_model(base), tmp_path / "a").eval()(tokens).logits
        engine.merge(base, [(read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(tokens).logits
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value", [None, [], "", False, {}])
def test_a_head_beside_a_false_modules_to_save_is_refused_saying_what_it_is(llama, tmp_path, value):
    """A non-task folder whose modules_to_save is null or false (a head dropped from the list by hand) beside the
    head's tensor: PEFT does not ignore it, its load is not strict and puts the file's lm_head.weight over the model's
    own, whatever the list says. loraops does not take the file's word over the config's: refused as before, but
    saying what the tensor is and what to do (it said only "unknown adapter key layout"). Listed, it is read."""
    from peft import PeftModel

    from loraops.errors import FormatError

    folder = factories.peft_adapter(llama, tmp_path / "a", target_modules=["q_proj"], modules_to_save=["lm_head"])
    weights, config_path = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    state = load_file(weights)
    trained = state["base_model.model.lm_head.weight"] + 1
    # (model.norm: a whole lm_head alone is what save_embedding_layers writes, read as PEFT loads it)
    save_file({**state, "base_model.model.lm_head.weight": trained,
               "base_model.model.model.norm.weight": torch.full((64,), 2.0)}, str(weights))
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "modules_to_save": value}))
    model = PeftModel.from_pretrained(factories.load_model(llama), folder)
    assert torch.equal(model.base_model.model.lm_head.weight, trained)
    with pytest.raises(FormatError, match=r"unknown adapter key layout: 'base_model.model.model.norm.weight': whole "
                                          r"tensors of modules the config's modules_to_save does not name \(model.norm\), "
                                          r"which PEFT's load \(not strict\) would put over the model's own; list them "
                                          r"in modules_to_save to read them as saved whole, or remove them$"):
        read_adapter(folder)
    config_path.write_text(json.dumps({**config, "modules_to_save": ["lm_head", "norm"]}))
    assert torch.equal(read_adapter(folder).full_tensors["lm_head.weight"], trained)


@pytest.mark.parametrize("modules_to_save", ["listed", "null"])
@pytest.mark.parametrize("task, model_type, cls_name, config, targets", factories.TASK_MODELS)
def test_a_task_adapter_without_its_head_tensors_does_not_fit_as_peft_cannot_load_it(
        task, model_type, cls_name, config, targets, modules_to_save, tmp_path):
    """A task adapter whose file lacks the head its task model saves whole (the tensors removed; its config listing
    the head, or null as older PEFT saved it): PEFT's load takes every tensor of a module it wraps from the file and
    fails (a KeyError); loraops read it and merged the base's own head (untrained), a deliberate difference until
    then. It reads (the file is what it is) but fits no base whose head PEFT wraps: check names the head's tensors,
    and merge refuses."""
    from peft import PeftModel

    from loraops import check, engine
    from loraops.basemodel import BaseModel
    from loraops.errors import MismatchError

    base, folder, model_cls = factories.task_adapter(tmp_path, task, model_type, cls_name, config, targets)
    if modules_to_save == "null":
        null_modules_to_save(folder)
    weights = folder / "adapter_model.safetensors"
    state = load_file(weights)
    head = sorted(k.removeprefix("base_model.model.") for k in state if "lora_" not in k)
    save_file({k: v for k, v in state.items() if "lora_" in k}, str(weights))
    with pytest.raises(KeyError, match=re.escape(f"base_model.model.{head[0].rpartition('.')[0]}")):
        PeftModel.from_pretrained(model_cls.from_pretrained(base), folder)
    adapter = read_adapter(folder)
    model = BaseModel.open(base)
    report = check.check(adapter, model.tensors, config=model.config)
    assert not report.ok and sorted(report.why_missing) == head, report
    assert "but not in the adapter's file: PEFT fails to load the adapter without it (a KeyError)" in \
        report.why_missing[head[0]]
    # counted as the whole tensors they are, the LoRA modules apart (it said "N modules do not fit")
    assert (report.matched, report.tensors, report.tensors_matched) == (report.modules, len(head), 0)
    counted = f"{len(head)} whole tensors do" if len(head) > 1 else "1 whole tensor does"
    with pytest.raises(MismatchError, match=re.escape(f": {counted} not fit base ") + ".*" + re.escape(head[0])):
        engine.merge(base, [(adapter, 1.0)], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_a_saved_block_fits_a_gpt2_checkpoint_that_stores_its_attention_mask_buffers(tmp_path):
    """GPT-2's checkpoints on the Hub (GPT-J's and GPT-NeoX's too) store each attention's causal mask,
    ``h.N.attn.bias``, a buffer transformers no longer keeps (_keys_to_ignore_on_load_unexpected). A block saved whole
    (modules_to_save=["h.1"]) is saved by PEFT without it, as the wrapped block's state dict has none, and PEFT loads
    the adapter; check asked for the mask as a bias PEFT fails to load without, and refused the adapter. A module's
    bias is one of its layer's parameters only beside its weight."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from loraops import check, engine
    from loraops.basemodel import BaseModel

    base = factories.tiny_gpt2(tmp_path / "base")
    weights = base / "model.safetensors"
    state = load_file(weights)
    for i in range(2):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    save_file(state, str(weights), metadata={"format": "pt"})
    torch.manual_seed(1)
    get_peft_model(factories.load_model(base), LoraConfig(
        r=4, target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["h.1"],
        init_lora_weights=False)).save_pretrained(tmp_path / "a")
    expected = PeftModel.from_pretrained(factories.load_model(base), tmp_path / "a").merge_and_unload().state_dict()
    adapter = read_adapter(tmp_path / "a")
    model = BaseModel.open(base)
    for report in (check.check(adapter, model.tensors, config=model.config), check.check(adapter, model.tensors)):
        assert report.ok, report
    engine.merge(base, [(adapter, 1.0)], tmp_path / "out", device="cpu", progress=False)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert set(expected) - set(merged) == {"lm_head.weight"}  # (tied, not stored)
    for name in expected.keys() & merged.keys():
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("resized", [False, True])
def test_a_saved_head_with_save_embedding_layers_merges_as_peft_loads_it(tmp_path, resized):
    """modules_to_save=["lm_head"] saved with save_embedding_layers=True (or "auto" on a resized vocabulary): PEFT
    0.21 saves the output embeddings, here its ModulesToSaveWrapper, whole as its state dict beside the head's copy
    (``lm_head.original_module.weight``, ``lm_head.modules_to_save.weight``) and the input embeddings whole
    (``model.embed_tokens.weight``). loraops refused the wrapper's keys as an unknown layout. Read as PEFT's load
    does (the copy from ``lm_head.weight``, the wrapper's own state left out of the merged model, the embeddings put
    over the model's), the merge is PEFT's merge_and_unload, bit for bit."""
    import peft
    from transformers import AutoModelForCausalLM

    from loraops import engine

    base = factories.tiny_llama(tmp_path / "base")

    def base_model():  # (the resized vocabulary's new rows are drawn: seeded, the same each time)
        model = factories.load_model(base)
        if resized:
            torch.manual_seed(5)
            model.resize_token_embeddings(136)
        return model

    torch.manual_seed(1)
    model = peft.get_peft_model(base_model(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path / "a", save_embedding_layers="auto" if resized else True)
    saved = sorted(k for k in load_file(tmp_path / "a" / "adapter_model.safetensors") if "lora_" not in k)
    assert saved == [f"base_model.model.{k}" for k in ("lm_head.modules_to_save.weight",
                                                      "lm_head.original_module.weight", "lm_head.weight",
                                                      "model.embed_tokens.weight")]
    adapter = read_adapter(tmp_path / "a")
    assert sorted(adapter.full_tensors) == ["lm_head.weight", "model.embed_tokens.weight"]
    target = base
    if resized:  # (merged into the resized base, as PEFT loads it: docs/tokens.md)
        base_model().save_pretrained(target := tmp_path / "resized")
    expected = peft.PeftModel.from_pretrained(base_model(), tmp_path / "a").merge_and_unload().state_dict()
    engine.merge(target, [(adapter, 1.0)], tmp_path / "out", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert merged.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], atol=1e-6, rtol=1e-6, msg=name)
    assert torch.equal(merged["lm_head.weight"], adapter.full_tensors["lm_head.weight"])


def test_a_saved_module_s_bias_without_a_weight_of_its_own_is_asked_for_as_peft_fails_without_it(tmp_path):
    """RoBERTa's masked-LM head saved whole (modules_to_save=["lm_head"]) has a parameter of its own, ``lm_head.bias``
    (1-D, no lm_head.weight beside it: the weights are its submodules'). PEFT saves it, and its load fails without it
    (a KeyError); check asked only for a bias beside its layer's weight (so as to leave GPT-2's 4-D attention masks
    alone), so it passed such a file and merge took the base's bias. Asked for now: a 1-D bias is a parameter."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import RobertaForMaskedLM

    from loraops import check
    from loraops.basemodel import BaseModel

    base = factories.tiny_transformers(tmp_path / "base", "roberta", "RobertaForMaskedLM", **factories.TINY_BERT)
    torch.manual_seed(1)
    get_peft_model(RobertaForMaskedLM.from_pretrained(base), LoraConfig(
        r=4, target_modules=["query"], modules_to_save=["lm_head"], init_lora_weights=False)).save_pretrained(
        tmp_path / "a")
    model = BaseModel.open(base)
    assert check.check(read_adapter(tmp_path / "a"), model.tensors, config=model.config).ok
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(weights)
    del state["base_model.model.lm_head.bias"]
    save_file(state, str(weights))
    with pytest.raises(KeyError, match="base_model.model.lm_head.bias"):
        PeftModel.from_pretrained(RobertaForMaskedLM.from_pretrained(base), tmp_path / "a")
    for config in (model.config, None):
        report = check.check(read_adapter(tmp_path / "a"), model.tensors, config=config)
        assert not report.ok and sorted(report.why_missing) == ["lm_head.bias"], report
        assert "modules_to_save entry 'lm_head'" in report.why_missing["lm_head.bias"]


@pytest.mark.parametrize("cls_name, model_type, config, dropped", [
    ("RobertaForMaskedLM", "roberta", factories.TINY_BERT, "lm_head.decoder.weight"),
    ("RobertaForMaskedLM", "roberta", factories.TINY_BERT, "lm_head.decoder.bias"),
    ("LlamaForCausalLM", "llama", {**factories.TINY_LLAMA, "tie_word_embeddings": True}, "lm_head.weight")])
def test_a_tied_head_in_a_saved_module_is_asked_for_as_peft_fails_without_it(tmp_path, cls_name, model_type, config,
                                                                            dropped):
    """modules_to_save=["lm_head"] on a tied model: PEFT's copy of the head is untied from the embeddings, and it
    saves the tied tensors the base does not store (RoBERTa's lm_head.decoder.weight and .decoder.bias, a tied
    Llama's lm_head.weight); its load fails without one (a KeyError). check looked only at the tensors the base
    stores, so it passed such a file (and merge took the embeddings for the head). The whole file merges to
    PEFT's merge_and_unload."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    from loraops import check
    from loraops.basemodel import BaseModel

    cls = getattr(transformers, cls_name)
    base = factories.tiny_transformers(tmp_path / "base", model_type, cls_name, **config)
    assert dropped not in load_file(base / "model.safetensors")
    torch.manual_seed(1)
    adapted = get_peft_model(cls.from_pretrained(base), LoraConfig(
        r=4, target_modules=["query", "q_proj"], modules_to_save=["lm_head"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if ".modules_to_save." in name:
                param.add_(0.1 * torch.randn_like(param))  # trained: the head's copy leaves the embeddings
    adapted.save_pretrained(tmp_path / "a")
    model = BaseModel.open(base)
    engine.merge(base, [(read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    tokens = torch.arange(3, 19).view(2, 8)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(cls.from_pretrained(base), tmp_path / "a").merge_and_unload().eval()
        torch.testing.assert_close(cls.from_pretrained(tmp_path / "out").eval()(input_ids=tokens).logits,
                                   expected(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(weights)
    del state[f"base_model.model.{dropped}"]
    save_file(state, str(weights))
    with pytest.raises(KeyError, match=f"base_model.model.{re.escape(dropped)}"):
        PeftModel.from_pretrained(cls.from_pretrained(base), tmp_path / "a")
    for given in (model.config, None):
        report = check.check(read_adapter(tmp_path / "a"), model.tensors, config=given)
        assert not report.ok and sorted(report.why_missing) == [dropped], report
        assert "modules_to_save entry 'lm_head'" in report.why_missing[dropped]
    with pytest.raises(MismatchError):
        engine.merge(base, [(read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out2", progress=False)


@pytest.mark.parametrize("entry, asked", [("proj_out", ["single_blocks.0.linear2.weight"]), ("final_layer", [])])
def test_modules_to_save_on_a_flux_single_file_checkpoint_are_matched_as_diffusers_paths(tmp_path, entry, asked):
    """A PEFT adapter of diffusers' FluxTransformer2DModel (proj_out saved whole) bound to a BFL single-file
    checkpoint: PEFT matches modules_to_save against the diffusers model's paths, where "proj_out" also ends
    single_transformer_blocks.0.proj_out (BFL's single_blocks.0.linear2), which the file lacks: its load would fail.
    check matched the entries against the checkpoint's names: it passed that file, and asked for BFL's
    final_layer.* under an entry "final_layer" that names no diffusers module."""
    from dataclasses import replace

    from test_ldm import FLUX, checkpoint

    from loraops import check
    from loraops.basemodel import BaseModel

    base = checkpoint(tmp_path / "flux.safetensors", FLUX)
    adapter = factories.lora_adapter({"transformer_blocks.0.attn.to_q": (16, 16), "x_embedder": (16, 8)})
    if entry == "proj_out":  # (the final layer's copy, BFL's final_layer.linear)
        adapter = replace(adapter, full_tensors={"proj_out.weight": torch.randn(8, 16)})
    folder = write_adapter(adapter, tmp_path / "a", "peft")
    config_path = folder / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "modules_to_save": [entry]}))
    model = BaseModel.open(base)
    report = check.check(read_adapter(folder), model.tensors, config=model.config)
    assert sorted(report.why_missing) == asked and report.ok == (not asked), report
    if asked:
        assert "modules_to_save entry 'proj_out'" in report.why_missing[asked[0]]


def test_t5_relative_attention_bias_saved_whole_is_asked_for_on_each_side(tmp_path):
    """T5's relative_attention_bias (an embedding in each side's first block) saved whole: the file as PEFT saves
    it fits, and merges as PEFT's merge_and_unload; without the decoder's, PEFT's load fails (a KeyError) and check
    says which tensor."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import T5ForConditionalGeneration

    from loraops import check, engine
    from loraops.basemodel import BaseModel

    base = factories.tiny_transformers(tmp_path / "base", "t5", "T5ForConditionalGeneration", d_model=32, d_kv=8,
                                       d_ff=64, num_layers=2, num_heads=4, vocab_size=100)
    torch.manual_seed(1)
    model = get_peft_model(T5ForConditionalGeneration.from_pretrained(base), LoraConfig(
        r=4, target_modules=["q"], modules_to_save=["relative_attention_bias"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path / "a")
    bias = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    base_model = BaseModel.open(base)
    adapter = read_adapter(tmp_path / "a")
    assert check.check(adapter, base_model.tensors, config=base_model.config).ok
    expected = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(base),
                                         tmp_path / "a").merge_and_unload().state_dict()
    engine.merge(base, [(adapter, 1.0)], tmp_path / "out", progress=False)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for name in merged:
        torch.testing.assert_close(merged[name], expected[name], atol=1e-6, rtol=1e-6, msg=name)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(weights)
    del state[f"base_model.model.{bias}"]
    save_file(state, str(weights))
    with pytest.raises(KeyError, match=re.escape(f"base_model.model.{bias}")):
        PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(base), tmp_path / "a")
    report = check.check(read_adapter(tmp_path / "a"), base_model.tensors, config=base_model.config)
    assert sorted(report.why_missing) == [bias], report


def test_a_biased_head_saved_whole_beside_a_saved_embedding_merges_as_peft_loads_it(tmp_path):
    """modules_to_save=["embed_tokens"] saved with save_embedding_layers=True on a model whose head has a bias (Phi,
    GPT-J, CodeGen): PEFT saves the output embeddings, a plain Linear, whole, weight and bias (``lm_head.bias``),
    and its load puts both over the model's. loraops took a ``.weight`` beside the wrapper's state alone and refused
    ``lm_head.bias`` as an unknown layout."""
    import peft
    from transformers import PhiForCausalLM

    base = factories.tiny_transformers(tmp_path / "base", "phi", "PhiForCausalLM", **{
        **factories.TINY_BERT, "num_key_value_heads": 4})
    torch.manual_seed(1)
    model = peft.get_peft_model(PhiForCausalLM.from_pretrained(base), peft.LoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name or name.endswith("lm_head.bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    assert "base_model.model.lm_head.bias" in load_file(tmp_path / "a" / "adapter_model.safetensors")
    adapter = read_adapter(tmp_path / "a")
    assert sorted(adapter.full_tensors) == ["lm_head.bias", "lm_head.weight", "model.embed_tokens.weight"]
    assert_merges_as_peft_loads(adapter, tmp_path / "a", base, lambda: PhiForCausalLM.from_pretrained(base),
                                tmp_path / "out")


@pytest.mark.parametrize("edit", ["head key removed", "head not listed"])
def test_a_wrapper_s_state_is_left_out_only_beside_the_head_modules_to_save_names(tmp_path, edit):
    """The wrapper's keys save_embedding_layers writes (lm_head.original_module/modules_to_save.weight) are left out
    only beside the head's own key and for a head modules_to_save names. Without lm_head.weight PEFT's load fails (a
    KeyError): left out, the file would have read as an adapter without its head, merged with the base's. Not listed,
    the head is a whole tensor the config does not name: refused as such files are (the wrapper's keys with it)."""
    import peft

    from loraops.errors import FormatError

    base = factories.tiny_llama(tmp_path / "base")
    torch.manual_seed(1)
    model = peft.get_peft_model(factories.load_model(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    weights, config_path = tmp_path / "a" / "adapter_model.safetensors", tmp_path / "a" / "adapter_config.json"
    read_adapter(tmp_path / "a")
    if edit == "head key removed":
        state = load_file(weights)
        del state["base_model.model.lm_head.weight"]
        save_file(state, str(weights))
        with pytest.raises(KeyError, match="base_model.model.lm_head.weight"):
            peft.PeftModel.from_pretrained(factories.load_model(base), tmp_path / "a")
    else:
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "modules_to_save": None}))
    with pytest.raises(FormatError, match="unknown adapter key layout: 'base_model.model.lm_head."):
        read_adapter(tmp_path / "a")


def test_modules_to_save_on_an_sd_single_file_checkpoint_name_only_the_bound_component_s_modules(tmp_path):
    """A PEFT adapter of the UNet with conv_in saved whole, its modules_to_save also naming the text encoder's q_proj
    (one list for both models: PEFT ignores an entry that names no module of the model it wraps), bound to a
    single-file SD checkpoint that also holds the text encoder: PEFT wrapped the UNet alone, so the text encoder's
    q_proj is no tensor its load asks for, and the adapter fits."""
    from dataclasses import replace

    from test_ldm import sd15_checkpoint

    from loraops import check
    from loraops.basemodel import BaseModel

    base = sd15_checkpoint(tmp_path / "sd15.safetensors")
    save_file({**load_file(base), "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3)},
              str(base))
    adapter = replace(factories.lora_adapter({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8)}),
                      full_tensors={"unet.conv_in.weight": torch.randn(8, 4, 3, 3)})
    folder = write_adapter(adapter, tmp_path / "a", "peft")
    config_path = folder / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "modules_to_save": ["conv_in", "q_proj"]}))
    model = BaseModel.open(base)
    report = check.check(read_adapter(folder), model.tensors, config=model.config)
    assert report.ok and not report.why_missing, report


@pytest.mark.parametrize("entry", ["lm_head", "embed_tokens"])
def test_tied_saved_embeddings_with_save_embedding_layers_merge_as_peft_loads_them(tmp_path, entry):
    """A tied model's embeddings or head saved (modules_to_save) with ensure_weight_tying and save_embedding_layers:
    PEFT wraps both, the head tied to the embeddings' copy, and saves each wrapper's state, but its config lists
    "model.embed_tokens" alone. The head's wrapper keys (lm_head.original_module/modules_to_save.weight) were read
    as whole tensors of their own, not in the base: the adapter fit no base. Left out as for a listed module, the
    merge is PEFT's merge_and_unload."""
    base = tied_llama_saved_with_embedding_layers(tmp_path, entry)
    assert "base_model.model.lm_head.original_module.weight" in load_file(tmp_path / "a" / "adapter_model.safetensors")
    adapter = read_adapter(tmp_path / "a")
    assert sorted(adapter.full_tensors) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert_merges_as_peft_loads(adapter, tmp_path / "a", base, lambda: factories.load_model(base), tmp_path / "out")


@pytest.mark.parametrize("edited", ["lm_head.original_module.weight", "model.embed_tokens.original_module.weight",
                                    "lm_head.modules_to_save.weight", "lm_head.weight"])
def test_an_edited_tied_copy_under_ensure_weight_tying_merges_as_peft_loads_it_or_is_refused(tmp_path, edited):
    """A tied Llama's embeddings saved with ensure_weight_tying and save_embedding_layers, one key edited. PEFT's
    load leaves the wrapper keys unused (original_module, modules_to_save): loraops merges as PEFT does. A head copy
    (lm_head.weight) that differs from model.embed_tokens.weight is loaded into PEFT's one tied tensor, the last
    read winning (the head's), where loraops wrote the two untied: refused, in one line."""
    import peft

    from loraops import check
    from loraops.basemodel import BaseModel

    base = tied_llama_saved_with_embedding_layers(tmp_path, "embed_tokens")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(weights)
    state[f"base_model.model.{edited}"] += 1.0
    save_file(state, str(weights))
    adapter = read_adapter(tmp_path / "a")
    if edited != "lm_head.weight":
        assert_merges_as_peft_loads(adapter, tmp_path / "a", base, lambda: factories.load_model(base), tmp_path / "out")
        return
    merged = peft.PeftModel.from_pretrained(factories.load_model(base), tmp_path / "a").merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert torch.equal(merged.lm_head.weight, state["base_model.model.lm_head.weight"])
    bound = BaseModel.open(base)
    for config in (bound.config, None):
        report = check.check(adapter, bound.tensors, config=config)
        assert sorted(report.why_missing) == ["lm_head.weight"], report
        assert "ensure_weight_tying keeps tied (one tensor), with different values" in report.why_missing["lm_head.weight"]
    with pytest.raises(MismatchError, match="with different values"):
        engine.merge(base, [(adapter, 1.0)], tmp_path / "out", progress=False)


@pytest.mark.parametrize("edited", [None, "lm_head.original_module.weight", "model.embed_tokens.weight"])
def test_an_original_module_copy_that_differs_from_the_tied_embeddings_is_refused(tmp_path, edited):
    """A tied Llama's head saved whole (modules_to_save=["lm_head"], no ensure_weight_tying) with
    save_embedding_layers: the file holds lm_head.original_module.weight, the base's head, which is the embeddings,
    beside model.embed_tokens.weight, equal. PEFT's load puts original_module's values into the tied embeddings after
    model.embed_tokens.weight's: edited to differ, PEFT's embeddings are original_module's, where loraops merged
    model.embed_tokens.weight. Refused in one line; the file as PEFT saved it merges as PEFT loads it."""
    import peft

    from loraops import check
    from loraops.basemodel import BaseModel

    base = tied_llama_saved_with_embedding_layers(tmp_path, "lm_head", tying=False)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(weights)
    if edited is None:
        assert_merges_as_peft_loads(read_adapter(tmp_path / "a"), tmp_path / "a", base,
                                    lambda: factories.load_model(base), tmp_path / "out")
        return
    state[f"base_model.model.{edited}"] += 1.0
    save_file(state, str(weights))
    merged = peft.PeftModel.from_pretrained(factories.load_model(base), tmp_path / "a").merge_and_unload()
    assert torch.equal(merged.model.embed_tokens.weight, state["base_model.model.lm_head.original_module.weight"])
    adapter = read_adapter(tmp_path / "a")
    bound = BaseModel.open(base)
    for config in (bound.config, None):
        report = check.check(adapter, bound.tensors, config=config)
        assert sorted(report.why_missing) == ["lm_head.weight"], report
        assert "original_module copy differs from 'model.embed_tokens.weight'" in report.why_missing["lm_head.weight"]
        assert check.misfit_counts(report) == "1 whole tensor does"
    with pytest.raises(MismatchError, match="original_module copy differs"):
        engine.merge(base, [(adapter, 1.0)], tmp_path / "out", progress=False)


@pytest.mark.parametrize("edited", [None, "lm_head.original_module.weight"])
def test_original_module_copies_beside_saved_embeddings_merge_as_peft_loads_them(tmp_path, edited):
    """A tied Llama's embeddings and head both saved whole (no ensure_weight_tying) with save_embedding_layers: the
    file's model.embed_tokens.weight is the trained copy, so lm_head.original_module.weight (the base's) differs from
    it as PEFT saved it. Nothing of PEFT's adapted model uses the original_module values then (both users of the tied
    tensor are wrapped): the file merges as PEFT loads it, edited or not (it was refused as an edited copy)."""
    base = tied_llama_saved_with_embedding_layers(tmp_path, "embed_tokens", "lm_head", tying=False)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(weights)
    assert not state["base_model.model.lm_head.original_module.weight"].equal(
        state["base_model.model.model.embed_tokens.weight"])
    if edited is not None:
        state[f"base_model.model.{edited}"] += 1.0
        save_file(state, str(weights))
    assert_merges_as_peft_loads(read_adapter(tmp_path / "a"), tmp_path / "a", base,
                                lambda: factories.load_model(base), tmp_path / "out")


@pytest.mark.parametrize("edited", [False, True])
def test_an_original_module_copy_without_the_embeddings_in_the_file_is_compared_with_the_base_s(tmp_path, edited):
    """As above, model.embed_tokens.weight dropped from the file (PEFT loads it: the embeddings are not wrapped): the
    original_module copy is compared with the base's stored embeddings, refused only where it differs from them
    (the stored blocks came flat, so every such file was refused). A registered base's manifest alone (no values)
    has nothing to compare: check passes (it raised an AttributeError)."""
    import peft

    from loraops import check
    from loraops.basemodel import BaseModel
    from loraops.records import TensorRecord

    base = tied_llama_saved_with_embedding_layers(tmp_path, "lm_head", tying=False)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(weights)
    del state["base_model.model.model.embed_tokens.weight"]
    if edited:
        state["base_model.model.lm_head.original_module.weight"] += 1.0
    save_file(state, str(weights))
    adapter = read_adapter(tmp_path / "a")
    bound = BaseModel.open(base)
    records = {name: TensorRecord(name=name, dtype=info.dtype, shape=tuple(info.shape))
               for name, info in bound.tensors.items()}
    assert check.check(adapter, records).ok
    if not edited:
        assert_merges_as_peft_loads(adapter, tmp_path / "a", base, lambda: factories.load_model(base), tmp_path / "out")
        return
    merged = peft.PeftModel.from_pretrained(factories.load_model(base), tmp_path / "a").merge_and_unload()
    assert torch.equal(merged.model.embed_tokens.weight, state["base_model.model.lm_head.original_module.weight"])
    report = check.check(adapter, bound.tensors, config=bound.config)
    assert sorted(report.why_missing) == ["lm_head.weight"], report
    assert "original_module copy differs from 'model.embed_tokens.weight'" in report.why_missing["lm_head.weight"]


def tied_llama_saved_with_embedding_layers(tmp_path, *entries: str, tying: bool = True):
    """A tied Llama (``tmp_path/base``, returned) and a PEFT LoRA on it (``tmp_path/a``) with ``entries`` saved whole
    (trained), ensure_weight_tying as ``tying``, saved with save_embedding_layers=True."""
    import peft

    base = factories.tiny_llama(tmp_path / "base", tie=True)
    torch.manual_seed(1)
    model = peft.get_peft_model(factories.load_model(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=list(entries), ensure_weight_tying=tying,
        init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    return base


def assert_merges_as_peft_loads(adapter, folder, base, load, out):
    """``adapter`` (read from the PEFT ``folder``) merged into ``base`` gives PEFT's merge_and_unload of ``folder``
    loaded on ``load()``, tensor for tensor (the merged folder read back as ``load`` builds its model)."""
    from peft import PeftModel

    from loraops import engine

    model = load()
    expected = PeftModel.from_pretrained(model, folder).merge_and_unload().state_dict()
    engine.merge(base, [(adapter, 1.0)], out, progress=False)
    merged = type(model).from_pretrained(out).state_dict()
    assert merged.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("entry", ["attn", "attn.c_attn"])
def test_modules_to_save_wrapping_a_module_inside_another_is_refused(tmp_path, entry):
    """GPT-2 with modules_to_save=["attn"]: the entry ends both h.N.attn and h.N.attn.c_attn, and PEFT wraps both,
    the inner one a stray child of the outer wrapper that its forward does not use. Its save writes both copies of
    c_attn under one key, the stray one's last: the file lacks the values the adapted model computes with, and PEFT
    fails to load it (a KeyError). loraops merged the stray values (logits 0.5 off the adapted model's): refused in
    one line. An entry that wraps c_attn alone merges to the adapted model."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2LMHeadModel

    from loraops import check
    from loraops.basemodel import BaseModel

    base = factories.tiny_transformers(tmp_path / "base", "gpt2", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4,
                                       vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(1)
    adapted = get_peft_model(GPT2LMHeadModel.from_pretrained(base), LoraConfig(
        r=4, target_modules=["c_fc"], modules_to_save=[entry], init_lora_weights=False)).eval()
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if ".modules_to_save." in name:
                param.add_(0.05 * torch.randn_like(param))
        tokens = torch.arange(3, 19).view(2, 8)
        expected = adapted(input_ids=tokens).logits
    adapted.save_pretrained(tmp_path / "a")
    adapter = read_adapter(tmp_path / "a")
    model = BaseModel.open(base)
    if entry == "attn.c_attn":
        engine.merge(base, [(adapter, 1.0)], tmp_path / "out", progress=False)
        with torch.no_grad():
            merged = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()(input_ids=tokens).logits
        torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
        return
    with pytest.raises(KeyError, match="attn.c_attn.weight"):
        PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), tmp_path / "a")
    report = check.check(adapter, model.tensors, config=model.config)
    assert sorted(report.why_missing) == [f"transformer.h.{i}.attn.c_attn.{leaf}" for i in (0, 1)
                                          for leaf in ("bias", "weight")], report
    assert "which modules_to_save wraps inside 'transformer.h.0.attn'" in \
        report.why_missing["transformer.h.0.attn.c_attn.weight"]
    with pytest.raises(MismatchError, match="wraps inside"):
        engine.merge(base, [(adapter, 1.0)], tmp_path / "out", progress=False)


def test_modules_to_save_naming_a_grandchild_of_a_saved_module_merge_as_peft_loads_them(tmp_path):
    """GPT-2 with modules_to_save=["h.0", "c_fc"]: h.0.mlp.c_fc lies two levels inside h.0, and PEFT does not wrap it
    again (_set_trainable updates the wrapper it finds as the grandparent): h.0 is saved whole, c_fc in it, and PEFT
    loads the file. It was refused as wrapped twice (as a child such as h.0.ln_1 is); it merges as PEFT loads it."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    base = factories.tiny_transformers(tmp_path / "base", "gpt2", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4,
                                       vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(1)
    adapted = get_peft_model(GPT2LMHeadModel.from_pretrained(base), LoraConfig(
        r=4, target_modules=["transformer.h.1.mlp.c_proj"], modules_to_save=["h.0", "c_fc"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if ".modules_to_save." in name:
                param.add_(0.05 * torch.randn_like(param))
    adapted.save_pretrained(tmp_path / "a")
    assert_merges_as_peft_loads(read_adapter(tmp_path / "a"), tmp_path / "a", base,
                                lambda: GPT2LMHeadModel.from_pretrained(base), tmp_path / "out")
