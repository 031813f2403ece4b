"""PEFT target_parameters LoRAs on transformers 5's fused MoE experts (what PEFT 0.21's all-linear makes on Mixtral,
Qwen3-MoE, DeepSeek-V3): read as per-expert modules, bound to the per-expert tensors on disk (Mixtral's
block_sparse_moe.experts.<e>.w1/w3/w2), merged and subtracted exactly; what loraops cannot map is refused."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from factories import tiny_transformers
from loraops import engine, formats
from loraops.basemodel import BaseModel
from loraops.check import check
from loraops.cli import main
from loraops.errors import InvalidInputError, MismatchError, UnsupportedAdapterError

LM = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
          vocab_size=128, max_position_embeddings=64)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)
FAMILIES = {
    "mixtral": ("mixtral", "MixtralForCausalLM", dict(LM, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM", dict(LM, **MOE, num_experts=4, head_dim=8)),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3ForCausalLM",
                    dict(LM, **MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16,
                         q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)),
}
IDS = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))


def model_class(family):
    import transformers

    return getattr(transformers, FAMILIES[family][1])


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {family: tiny_transformers(root / family, model_type, cls, **config)
            for family, (model_type, cls, config) in FAMILIES.items()}


def peft_model(base, family, **lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **lora})
    return get_peft_model(model_class(family).from_pretrained(base).eval(), config).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def tensors(path):
    return {name: t for file in sorted(path.glob("*.safetensors")) for name, t in load_file(file).items()}


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


@pytest.mark.no_registry
@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_linear_merge_equals_peft(tmp_path, bases, family):
    base = bases[family]
    model = peft_model(base, family)
    assert model.peft_config["default"].target_parameters  # the fused experts are raw parameters to PEFT
    model.save_pretrained(tmp_path / "a")
    expected = logits(model)

    adapter = formats.read_adapter(tmp_path / "a")
    experts = [m for m in adapter.modules.values() if m.raw_parameter is not None and m.raw_parameter[2] > 1]
    assert len(experts) == 2 * 4 * 3  # 2 layers × 4 experts × (gate, up, down)
    routers = [m.raw_parameter for m in adapter.modules.values() if m.raw_parameter and m.raw_parameter[2] == 1]
    assert [(p.rsplit(".", 2)[-2:], i, n) for p, i, n in routers] == [(["gate", "weight"], 0, 1)] * 2
    stored = sum(t.numel() for t in load_file(tmp_path / "a" / "adapter_model.safetensors").values())
    assert adapter.num_parameters == stored  # an expert's gate and up share one A, counted once
    report = check(adapter, BaseModel.open(base).tensors)
    assert report.ok and report.matched == len(adapter.modules), report

    engine.merge(base, [(adapter, 1.0)], tmp_path / "out", device="cpu")
    ours = model_class(family).from_pretrained(tmp_path / "out").eval()
    assert (logits(ours) - expected).abs().max() < 1e-5
    assert (logits(model_class(family).from_pretrained(base)) - expected).abs().max() > 0.1  # the LoRA does something

    model.merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    peft_merged, merged, original = tensors(tmp_path / "peft-merged"), tensors(tmp_path / "out"), tensors(base)
    assert merged.keys() == peft_merged.keys() == original.keys()
    touched = [n for n in original if not torch.equal(merged[n], original[n])]
    assert len(touched) == len(adapter.modules)  # every expert's tensors, each once
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, peft_merged[name], rtol=0, atol=1e-6, msg=name)

    engine.subtract(tmp_path / "out", [(adapter, 1.0)], tmp_path / "restored", device="cpu")
    restored = tensors(tmp_path / "restored")
    for name, tensor in original.items():
        torch.testing.assert_close(restored[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_mixtral_binds_to_block_sparse_moe_w1_w3_w2(tmp_path, bases):
    """Mixtral saves its experts under the original names: expert e's gate rows go to w1, up rows to w3, down to w2."""
    peft_model(bases["mixtral"], "mixtral").save_pretrained(tmp_path / "a")
    result = run("check", tmp_path / "a", "--base", bases["mixtral"], "--json")
    assert json.loads(result.output)["fits"] == [str(bases["mixtral"])]
    bound = check_bound(tmp_path / "a", bases["mixtral"])
    assert {"model.layers.0.block_sparse_moe.gate", "model.layers.0.block_sparse_moe.experts.3.w1",
            "model.layers.0.block_sparse_moe.experts.3.w3", "model.layers.0.block_sparse_moe.experts.0.w2"} <= bound


def check_bound(adapter_path, base):
    from loraops.check import require_fit

    return set(require_fit(formats.read_adapter(adapter_path), BaseModel.open(base).tensors).modules)


def test_rslora_and_a_weight_through_the_cli(tmp_path, bases):
    """rsLoRA (s = alpha/√r, with PEFT's doubled r and alpha for gate_up_proj) merged at weight 0.5: the merge adds
    half of PEFT's own delta, and subtract at 0.5 takes it off again."""
    base = bases["qwen3_moe"]
    model = peft_model(base, "qwen3_moe", use_rslora=True, lora_alpha=6)
    model.save_pretrained(tmp_path / "a")
    original = tensors(base)
    model.merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    peft_delta = {n: t - original[n] for n, t in tensors(tmp_path / "peft-merged").items()}
    adapter = formats.read_adapter(tmp_path / "a")
    gate = adapter.modules["model.layers.0.mlp.experts.2.gate_proj"]
    assert (gate.rank, gate.alpha, gate.scale) == (8, 12.0, 12.0 / 8 ** 0.5)
    assert "fits" in run("check", tmp_path / "a", "--base", base).output

    run("merge", f"{tmp_path / 'a'}:0.5", "--into", base, "-o", tmp_path / "out", "--no-record")
    merged = tensors(tmp_path / "out")
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, original[name] + 0.5 * peft_delta[name], rtol=0, atol=1e-6, msg=name)
    run("subtract", f"{tmp_path / 'a'}:0.5", "--from", tmp_path / "out", "-o", tmp_path / "restored", "--no-record")
    for name, tensor in tensors(tmp_path / "restored").items():
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.no_registry
def test_one_parameter_with_patterns_on_its_key(tmp_path, bases):
    """A LoRA on down_proj alone (one wrapper, no nesting) beside a module LoRA; rank_pattern/alpha_pattern keys
    match '<module>.<parameter>' as PEFT matches them."""
    model = peft_model(bases["mixtral"], "mixtral", r=3, lora_alpha=5, target_modules=["q_proj"],
                       target_parameters=["down_proj"], rank_pattern={"down_proj": 2}, alpha_pattern={"experts.down_proj": 7})
    model.save_pretrained(tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    assert {(m.rank, m.alpha) for m in adapter.modules.values() if m.raw_parameter} == {(2, 7.0)}
    engine.merge(bases["mixtral"], [(adapter, 1.0)], tmp_path / "out", device="cpu")
    assert (logits(model_class("mixtral").from_pretrained(tmp_path / "out")) - logits(model)).abs().max() < 1e-5
    assert_loads_back(adapter, tmp_path / "back", model_class("mixtral").from_pretrained(bases["mixtral"]), model)


def assert_loads_back(adapter, folder, base_model, peft_model):
    """``adapter`` written as PEFT loads into ``base_model`` with PEFT to ``peft_model``'s logits."""
    formats.write_adapter(adapter, folder, "peft")
    assert_peft_loads(folder, base_model, peft_model)


def assert_peft_loads(folder, base_model, peft_model, atol=1e-6):
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(base_model.eval(), folder).eval()
    torch.testing.assert_close(logits(loaded), logits(peft_model), rtol=0, atol=atol)


@pytest.fixture
def qwen_adapter(tmp_path, bases):
    peft_model(bases["qwen3_moe"], "qwen3_moe").save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.no_registry
def test_unmapped_target_parameters_are_refused(qwen_adapter):
    edit_config(qwen_adapter, target_parameters=["gate_up_proj", "down_proj", "experts.gate_up_proj_bias"])
    with pytest.raises(UnsupportedAdapterError, match=r"a LoRA on raw parameters loraops does not map \(target_parameters: "
                                                      r"experts.gate_up_proj_bias\); it handles only fused MoE experts"):
        formats.read_adapter(qwen_adapter)


@pytest.mark.no_registry
def test_nested_wrappers_in_another_order_are_refused(qwen_adapter):
    """Which nested wrapper is which parameter is PEFT's wrapping order; wrappers whose shapes say otherwise are
    refused rather than split wrongly."""
    file = qwen_adapter / "adapter_model.safetensors"
    swapped = {k.replace(".experts.base_layer.", ".experts.TMP.").replace(".experts.lora_", ".experts.base_layer.lora_")
               .replace(".experts.TMP.", ".experts."): v for k, v in load_file(file).items()}
    save_file(swapped, file, {"format": "pt"})
    with pytest.raises(UnsupportedAdapterError, match=r"do not have the shapes of gate_up_proj \(inner: .*refusing to "
                                                      "guess which is which"):
        formats.read_adapter(qwen_adapter)


def test_a_config_rank_that_splits_into_other_experts_is_refused_beside_a_saved_router(tmp_path, bases):
    """The router saved whole (modules_to_save=["gate"]) has one row per expert: an r twice too large, which splits the
    factors into half the experts, contradicts it, and PEFT cannot load the file. Refused from the file alone: register
    without a base (which checks no expert count) as with one, check, inspect; the file as PEFT saved it registers."""
    from peft import PeftModel

    from loraops.errors import InvalidInputError

    base = bases["qwen3_moe"]
    peft_model(base, "qwen3_moe", target_modules=["q_proj"], modules_to_save=["gate"],
               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]).save_pretrained(tmp_path / "a")
    assert "model.layers.0.mlp.gate.weight" in formats.read_adapter(tmp_path / "a").full_tensors
    run("base", "add", base, "--name", "qwen")
    run("register", tmp_path / "a", "--name", "good")
    edit_config(tmp_path / "a", r=8, lora_alpha=16, rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 8})
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(model_class("qwen3_moe").from_pretrained(base), tmp_path / "a")
    why = ("config r=8 splits the LoRA on model.layers.0.mlp.experts.gate_up_proj into 2 experts, but the router "
           "model.layers.0.mlp.gate.weight saved whole beside it has 4 (its rows): r is not the rank it was trained "
           "with, and PEFT cannot load the file")
    for args in (["register", tmp_path / "a", "--name", "bad"], ["register", tmp_path / "a", "--base", "qwen"],
                 ["check", tmp_path / "a", "--base", base], ["inspect", tmp_path / "a"]):
        result = run(*args, code=InvalidInputError.exit_code)
        assert result.output == f"error: {tmp_path / 'a' / 'adapter_model.safetensors'}: {why}\n", (args, result.output)
    assert [a["name"] for a in json.loads(run("list", "--json").output)] == ["good"]


@pytest.mark.no_registry
@pytest.mark.parametrize("experts, ranks", [(2, {r".*\.gate_up_proj": 16, r".*\.down_proj": 8}),
                                            (1, {r".*\.gate_up_proj": 32, r".*\.down_proj": 16})])
def test_a_config_rank_that_splits_into_other_experts_does_not_fit(tmp_path, qwen_adapter, bases, experts, ranks):
    """The number of experts comes from the config's r (the factors hold E·r rows): an r twice too large reads as
    half the experts, each of which has a tensor on disk; check counts the base's experts and refuses. r E times too
    large reads as one expert, which LoraModule.experts cannot tell from no expert's share: that whole LoRA fitted
    expert 0's tensor and was merged into it alone (PEFT cannot load the file)."""
    edit_config(qwen_adapter, rank_pattern=ranks, alpha_pattern={k: 2 * r for k, r in ranks.items()})
    adapter = formats.read_adapter(qwen_adapter)
    assert {m.raw_parameter[2] for n, m in adapter.modules.items() if ".experts." in n} == {experts}
    report = check(adapter, BaseModel.open(bases["qwen3_moe"]).tensors)
    assert not report.ok
    assert [m.name for m in report.shape_mismatches] == [
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
        for p in ("down_proj (down_proj)", "gate_up_proj (gate_proj)")]
    with pytest.raises(MismatchError, match=rf"model.layers.0.mlp.experts.down_proj \(down_proj\) \(adapter "
                                            rf"{experts}×32×16, base 4×32×16\)"):
        engine.merge(bases["qwen3_moe"], [(adapter, 1.0)], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.no_registry
def test_a_config_rank_that_splits_into_one_expert_is_refused_beside_a_saved_router(tmp_path, bases):
    peft_model(bases["qwen3_moe"], "qwen3_moe", target_modules=["q_proj"], modules_to_save=["gate"],
               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]).save_pretrained(tmp_path / "g")
    edit_config(tmp_path / "g", r=16, lora_alpha=32, rank_pattern={"q_proj": 4}, alpha_pattern={"q_proj": 8})
    with pytest.raises(InvalidInputError, match=r"config r=16 splits the LoRA on model.layers.0.mlp.experts.gate_up_proj "
                                                r"into 1 expert, but the router model.layers.0.mlp.gate.weight saved "
                                                r"whole beside it has 4 \(its rows\)"):
        formats.read_adapter(tmp_path / "g")


@pytest.mark.registry_backend
def test_register_inspect_and_what_is_refused(tmp_path, qwen_adapter, monkeypatch):
    """register/inspect work; kohya/diffusers have no layout for raw parameters (refused, combine before computing
    anything), and a dynamic resize rule would give the experts of one fused parameter different ranks."""
    from loraops import algebra

    assert "experts.0.gate_proj" in run("inspect", qwen_adapter).output
    assert run("register", qwen_adapter, "--name", "moe").output.startswith("registered moe@1")
    with pytest.raises(UnsupportedAdapterError, match=r"comes from a LoRA on the raw parameter "
                                                      r"'model.layers.0.mlp.experts.(gate_up|down)_proj'.*only as PEFT"):
        formats.write_adapter(formats.read_adapter(qwen_adapter), tmp_path / "out.safetensors", "kohya")
    assert not (tmp_path / "out.safetensors").exists()
    result = run("resize", "moe", "--dynamic", "sv_ratio", "--param", "2", "-o", tmp_path / "small", code=2)
    assert "has one rank for all experts, which a dynamic rule would not keep: give --rank" in result.output
    with pytest.raises(InvalidInputError, match="a dynamic rule would not keep: give rank$"):  # (the library's name)
        algebra.resize(formats.read_adapter(qwen_adapter), dynamic="sv_ratio", param=2)
    monkeypatch.setattr(algebra, "combine", lambda *a, **k: pytest.fail("combined before refusing"))
    result = run("combine", "moe", "moe", "--format", "kohya", "-o", tmp_path / "k.safetensors",
                 code=UnsupportedAdapterError.exit_code)
    assert "only as PEFT, not kohya" in result.output
    assert not (tmp_path / "small").exists() and not (tmp_path / "k.safetensors").exists()


def test_resize_and_combine_keep_one_a_per_expert(tmp_path, bases):
    """An expert's gate and up rows are factorized jointly, so the results keep PEFT's wrapper layout: resize to the
    adapter's own ranks and linear 0.5+0.5 load into PEFT with its logits; resize --rank 2 is the best rank-2
    approximation of each expert's stacked [gate; up] delta; cat doubles every delta."""
    model = peft_model(bases["qwen3_moe"], "qwen3_moe")
    model.save_pretrained(tmp_path / "a")
    run("register", tmp_path / "a", "--name", "moe")
    base_model = model_class("qwen3_moe").from_pretrained
    run("resize", "moe", "--rank", "8", "-o", tmp_path / "same")
    assert_peft_loads(tmp_path / "same", base_model(bases["qwen3_moe"]), model, atol=1e-5)
    run("combine", "moe:0.5", "moe:0.5", "--method", "linear", "-o", tmp_path / "half")
    assert_peft_loads(tmp_path / "half", base_model(bases["qwen3_moe"]), model, atol=1e-5)

    original = formats.read_adapter(tmp_path / "a").modules
    run("combine", "moe", "moe", "--method", "cat", "-o", tmp_path / "cat")
    doubled = formats.read_adapter(tmp_path / "cat").modules
    assert doubled.keys() == original.keys()
    for name, m in original.items():
        torch.testing.assert_close(doubled[name].delta(), 2 * m.delta(), rtol=0, atol=1e-6, msg=name)

    run("resize", "moe", "--rank", "2", "-o", tmp_path / "small")
    small = formats.read_adapter(tmp_path / "small").modules
    assert {m.rank for m in small.values()} == {2}
    for e in range(4):
        gate, up = (f"model.layers.1.mlp.experts.{e}.{p}" for p in ("gate_proj", "up_proj"))
        U, S, Vh = torch.linalg.svd(torch.cat([original[gate].delta(), original[up].delta()]).double())
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        torch.testing.assert_close(torch.cat([small[gate].delta(), small[up].delta()]).double(), best, rtol=0, atol=1e-5)


@pytest.mark.no_registry
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_written_back_as_peft_target_parameters(tmp_path, bases, family):
    """Written as PEFT saves it (the same keys and bytes: stacked A, B's columns (rank, expert), gate_up_proj nested
    inside down_proj, the router's weight as a plain LoRA), PEFT loads it to the same logits and loraops reads it back
    to the same modules."""
    model = peft_model(bases[family], family)
    model.save_pretrained(tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    assert_loads_back(adapter, tmp_path / "back", model_class(family).from_pretrained(bases[family]), model)
    original, written = tensors(tmp_path / "a"), tensors(tmp_path / "back")
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], t) for k, t in original.items())
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert len(config["target_parameters"]) == 2 * 3 and config["r"] == 4 and config["lora_alpha"] == 8
    # the rank_pattern as PEFT wrote it, which still gives every module its rank
    assert config["rank_pattern"] == json.loads((tmp_path / "a" / "adapter_config.json").read_text())["rank_pattern"]
    assert config["rank_pattern"] == {r".*\.gate_up_proj": 8}
    back = formats.read_adapter(tmp_path / "back")
    assert back.modules.keys() == adapter.modules.keys()
    for name, m in adapter.modules.items():
        b = back.modules[name]
        assert (b.raw_parameter, b.rank, b.alpha, b.scale) == (m.raw_parameter, m.rank, m.alpha, m.scale), name
        assert torch.equal(b.A, m.A) and torch.equal(b.B, m.B), name


def test_export_resize_combine_of_a_registered_mixtral_keep_peft_names(tmp_path, bases):
    """Registered with --base, the adapter is bound to Mixtral's saved names (block_sparse_moe.experts.<e>.w1);
    export, resize and combine write PEFT's in-memory names again, which PEFT loads."""
    model = peft_model(bases["mixtral"], "mixtral")
    model.save_pretrained(tmp_path / "a")
    run("base", "add", bases["mixtral"], "--name", "mixtral")
    run("register", tmp_path / "a", "--name", "moe", "--base", "mixtral")
    run("export", "moe", "--format", "peft", "-o", tmp_path / "out")
    assert tensors(tmp_path / "out").keys() == tensors(tmp_path / "a").keys()
    assert_peft_loads(tmp_path / "out", model_class("mixtral").from_pretrained(bases["mixtral"]), model)
    # resize and combine split a joined gate+up module back into w1 and w3, each under its own PEFT name again
    run("resize", "moe", "--rank", "8", "-o", tmp_path / "same")
    run("combine", "moe:0.5", "moe:0.5", "--method", "linear", "-o", tmp_path / "half")
    for folder in ("same", "half"):
        assert tensors(tmp_path / folder).keys() == tensors(tmp_path / "a").keys()
        assert_peft_loads(tmp_path / folder, model_class("mixtral").from_pretrained(bases["mixtral"]), model, atol=1e-5)


@pytest.mark.no_registry
def test_what_peft_target_parameters_cannot_hold_is_refused(tmp_path, qwen_adapter):
    """Written back only when exact: every expert, one rank and alpha per fused parameter, gate and up sharing A."""
    from dataclasses import replace

    adapter = formats.read_adapter(qwen_adapter)
    name = "model.layers.0.mlp.experts.{}.{}"
    cases = {
        "3 of its 4 expert modules are here": {k: m for k, m in adapter.modules.items() if k != name.format(2, "down_proj")},
        "different ranks or alphas": {**adapter.modules, name.format(1, "down_proj"): replace(
            adapter.modules[name.format(1, "down_proj")], alpha=3.0, scale=0.75)},
        "expert 3's gate_proj and up_proj do not share one A": {**adapter.modules, name.format(3, "up_proj"): replace(
            adapter.modules[name.format(3, "up_proj")], A=adapter.modules[name.format(3, "up_proj")].A + 1)},
    }
    for why, modules in cases.items():
        with pytest.raises(UnsupportedAdapterError, match=rf"cannot write the LoRA on model.layers.0.mlp.experts."
                                                           rf"(down|gate_up)_proj as PEFT target_parameters: .*{why}"):
            formats.write_adapter(replace(adapter, modules=modules), tmp_path / "out", "peft")
        assert not (tmp_path / "out").exists()


@pytest.mark.no_registry
def test_a_raw_weight_of_a_conv1d_is_added_as_stored(tmp_path):
    """target_parameters on GPT-2's Conv1D weights (in×out): PEFT adds B·A to the parameter as stored, where a LoRA on
    the module is transposed. The square c_proj is where a transposed merge would still fit the shapes. The model
    class PEFT records (auto_mapping: gpt2, whose Conv1D layers are fan_in_fan_out) settles the LoRA modules' layout,
    not the raw parameters' (it transposed them: c_fc did not fit its base). (Beside a LoRA on c_attn, PEFT refuses:
    "lora.ParamWrapper does not work with fan_in_fan_out".)"""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    base = tiny_transformers(tmp_path / "gpt2", "gpt2", "GPT2LMHeadModel", n_embd=32, n_layer=1, n_head=4,
                             vocab_size=128, n_positions=64)
    torch.manual_seed(1)
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(base).eval(), LoraConfig(
        r=4, lora_alpha=8, target_modules=[], target_parameters=["attn.c_proj.weight", "mlp.c_fc.weight"],
        init_lora_weights=False)).eval()
    model.save_pretrained(tmp_path / "a")
    run("merge", tmp_path / "a", "--into", base, "-o", tmp_path / "out", "--no-record")
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert torch.allclose(logits(merged), logits(model), atol=1e-5)
    assert_loads_back(formats.read_adapter(tmp_path / "a"), tmp_path / "back", GPT2LMHeadModel.from_pretrained(base), model)


@pytest.mark.no_registry
def test_a_raw_weight_on_one_expert_of_a_module_list_is_not_a_fused_experts_share():
    """A 2-D weight target on experts.0.gate_proj of a model whose experts are a ModuleList (remote-code MoEs) is one
    module on one tensor: the expert count check is for shares of fused experts only."""
    from types import SimpleNamespace

    from loraops.adapter import Adapter, LoraModule

    name = "model.layers.0.mlp.experts.0.gate_proj"
    module = LoraModule(name=name, A=torch.ones(2, 16), B=torch.ones(32, 2), alpha=2.0, scale=1.0,
                        raw_parameter=(f"{name}.weight", 0, 1))
    manifest = {f"model.layers.0.mlp.experts.{e}.gate_proj.weight": SimpleNamespace(shape=(32, 16)) for e in range(4)}
    assert check(Adapter(modules={name: module}, format="peft"), manifest).ok


def test_an_expert_with_a_zero_delta_keeps_the_rank_of_the_others(tmp_path, bases):
    """An expert that saw no token keeps PEFT's zero-initialized B: resized to a fixed rank it keeps that rank (zero
    factors) where kohya's rule would give a zero module rank 1, which PEFT's one-rank wrapper could not hold."""
    model = peft_model(bases["qwen3_moe"], "qwen3_moe")
    model.save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    data = load_file(weights)
    for key in [k for k in data if k.endswith("lora_B.weight") and ".experts." in k]:
        data[key][:, 0::4] = 0  # expert 0 of every fused parameter: B's columns (rank, expert), expert fastest
    save_file(data, weights)
    run("resize", tmp_path / "a", "--rank", "2", "-o", tmp_path / "small")
    small = formats.read_adapter(tmp_path / "small").modules
    experts = [m for m in small.values() if m.raw_parameter and m.raw_parameter[2] > 1]
    assert {m.rank for m in experts} == {2} and not small["model.layers.0.mlp.experts.0.down_proj"].delta().any()


@pytest.mark.no_registry
def test_inputs_with_different_numbers_of_experts_are_refused_before_combining(tmp_path, bases):
    from dataclasses import replace

    from loraops import algebra

    model = peft_model(bases["qwen3_moe"], "qwen3_moe")
    model.save_pretrained(tmp_path / "a")
    four = formats.read_adapter(tmp_path / "a")
    eight = {}  # the same adapter as if on an 8-expert model: experts 4–7 copies of 0–3
    for name, m in four.modules.items():
        if not (m.raw_parameter and m.raw_parameter[2] > 1):
            eight[name] = m
            continue
        parameter, e, _ = m.raw_parameter
        for shift in (0, 4):
            copy = name.replace(f".experts.{e}.", f".experts.{e + shift}.")
            eight[copy] = replace(m, name=copy, raw_parameter=(parameter, e + shift, 8))
    eight = replace(four, modules=eight)
    with pytest.raises(MismatchError, match=r"experts.0.down_proj differs between inputs: a share of 4 fused experts in .*, "
                                            r"of 8 in "):
        algebra.combine([(four, 1.0), (eight, 1.0)], "cat", device="cpu")
