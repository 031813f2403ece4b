"""`loraops extract`: exactness against float64 references, PEFT as the independent reference (merge_and_unload →
extract → PeftModel.from_pretrained), GPT-2 Conv1D and k×k convs merged back, --save-module, the CLI's registry
record with lineage, and one-line errors that leave nothing behind."""
import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import loraops
from factories import conv_embedding_model, load_model, peft_adapter, save_state_dict, tiny_gpt2, tiny_llama
from loraops.cli import main
from loraops.formats import read_adapter
from loraops.ops.resize import RankRule
from loraops.registry import Registry

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
TRUE_RANK = 6


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def state(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def with_tensors(source, dest, changes):
    """A copy of the model folder ``source`` with some tensors replaced."""
    shutil.copytree(source, dest)
    tensors = {**state(source), **changes}
    for file in dest.glob("*.safetensors"):
        file.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """base + a known rank-6 delta per target, with spread-out singular values (so float32 and float64 agree on
    every dynamic rule's rank): float64 deltas kept for reference."""
    root = tmp_path_factory.mktemp("extract-synthetic")
    base = tiny_llama(root / "base")
    weights = state(base)
    g = torch.Generator().manual_seed(3)
    changes, deltas = {}, {}
    for name in TARGETS:
        W = weights[f"{name}.weight"].double()
        U = torch.linalg.qr(torch.randn(W.shape[0], TRUE_RANK, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(W.shape[1], TRUE_RANK, generator=g, dtype=torch.float64)).Q
        S = 0.05 * torch.tensor([1.0, 0.6, 0.35, 0.2, 0.1, 0.05], dtype=torch.float64)
        tuned = (W + (U * S) @ V.T).float()
        changes[f"{name}.weight"] = tuned
        deltas[name] = tuned.double() - W  # the delta the float32 file really holds
    tuned = with_tensors(base, root / "tuned", changes)
    return base, tuned, deltas


def relative_error(module, D):
    return float(torch.linalg.norm(module.delta(dtype=torch.float64) - D) / torch.linalg.norm(D))


def test_full_rank_reproduces_the_delta_and_lower_rank_is_eckart_young(synthetic):
    base, tuned, deltas = synthetic
    adapter, report = loraops.extract(base, tuned, rank=8, device="cpu")
    assert sorted(adapter.modules) == sorted(TARGETS) and report.identical == len(state(base)) - len(TARGETS)
    assert adapter.target_modules == ["down_proj", "q_proj", "v_proj"]
    for name, D in deltas.items():
        module = adapter.modules[name]
        assert module.rank == 8 and module.scale == 1 and module.alpha == 8
        assert relative_error(module, D) < 2e-6

    small, report = loraops.extract(base, tuned, rank=3, device="cpu")
    for record in report.modules:
        D = deltas[record.name]
        S = torch.linalg.svdvals(D)
        optimum = float(S[3:].square().sum().sqrt() / S.square().sum().sqrt())
        assert math.isclose(relative_error(small.modules[record.name], D), optimum, rel_tol=1e-4)
        assert math.isclose(record.error, optimum, rel_tol=1e-4) and record.svd == "exact"

    precise, _ = loraops.extract(base, tuned, rank=6, device="cpu", precise=True, dtype="fp32")
    for name, D in deltas.items():
        assert relative_error(precise.modules[name], D) < 1e-6


@pytest.mark.parametrize("dynamic, param", [("sv_fro", 0.9), ("sv_ratio", 4.0), ("sv_cumulative", 0.8)])
def test_dynamic_rules_pick_the_ranks_of_the_float64_spectrum(synthetic, dynamic, param):
    base, tuned, deltas = synthetic
    adapter, report = loraops.extract(base, tuned, dynamic=dynamic, param=param, max_rank=16, device="cpu")
    rule = RankRule(dynamic=dynamic, param=param, max_rank=16)
    for name, D in deltas.items():
        S = torch.linalg.svdvals(D)
        assert adapter.modules[name].rank == rule.choose(S, min(D.shape)), name
        assert 1 < adapter.modules[name].rank < TRUE_RANK + 1


@pytest.mark.parametrize("dynamic, param", [("sv_fro", 0.99), ("sv_ratio", 4.0), ("sv_cumulative", 0.8)])
def test_a_dynamic_rank_does_not_depend_on_the_deltas_scale(tmp_path, dynamic, param):
    # a delta is never a zero module (those are dropped): kohya resize's MIN_SV floor (S[0] ≤ 1e-6: rank 1) made a
    # fine-tune's small change rank 1 whatever the rule, keeping half of it under sv_fro 0.99
    g = torch.Generator().manual_seed(5)
    W = 1e-6 * torch.randn(64, 48, generator=g, dtype=torch.float64)  # (float32 holds W + a 1e-9 delta exactly)
    U = torch.linalg.qr(torch.randn(64, 6, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(48, 6, generator=g, dtype=torch.float64)).Q
    S = torch.tensor([1.0, 0.6, 0.35, 0.2, 0.1, 0.05], dtype=torch.float64)
    save_file({"a.weight": W.float()}, str(tmp_path / "base.safetensors"))
    ranks = []
    for scale in (1e-2, 1e-7):
        save_file({"a.weight": (W + (U * (scale * S)) @ V.T).float()}, str(tmp_path / f"tuned{scale}.safetensors"))
        _, report = loraops.extract(tmp_path / "base.safetensors", tmp_path / f"tuned{scale}.safetensors",
                                    dynamic=dynamic, param=param, device="cpu")
        ranks.append(report.modules[0].rank)
    assert ranks[0] == ranks[1] == RankRule(dynamic=dynamic, param=param).choose(S, 6) > 1


def test_a_float64_models_delta_is_formed_in_float64(tmp_path):
    # in float32 both sides were rounded first: a fine-tune's 1e-9 change of weights near 1 came out as rounding
    # noise, or as nothing ("hold the same values in every tensor")
    g = torch.Generator().manual_seed(7)
    W = torch.randn(16, 12, generator=g, dtype=torch.float64)
    tuned = W + 1e-9 * torch.randn(16, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 12, generator=g,
                                                                                           dtype=torch.float64)
    save_file({"a.weight": W}, str(tmp_path / "base.safetensors"))
    save_file({"a.weight": tuned}, str(tmp_path / "tuned.safetensors"))
    adapter, report = loraops.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=12,
                                      device="cpu")
    assert report.precision == "float64" and report.dtype == "float64"
    assert relative_error(adapter.modules["a"], tuned - W) < 1e-9


def test_alpha_keeps_the_delta(synthetic):
    base, tuned, deltas = synthetic
    adapter, _ = loraops.extract(base, tuned, rank=6, alpha=2.0, device="cpu")
    for name, D in deltas.items():
        module = adapter.modules[name]
        assert module.alpha == 2.0 and module.scale == pytest.approx(2 / 6)
        assert relative_error(module, D) < 2e-6


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    """base, and base with a PEFT LoRA (r=4) merged by PEFT's merge_and_unload."""
    from peft import PeftModel

    root = tmp_path_factory.mktemp("extract-peft")
    base = tiny_llama(root / "base")
    lora = peft_adapter(base, root / "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    PeftModel.from_pretrained(load_model(base), lora).merge_and_unload().save_pretrained(root / "tuned")
    return base, root / "tuned"


def logits(model):
    ids = torch.arange(24).reshape(2, 12)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_peft_loads_the_extracted_adapter_as_the_tuned_model(peft_pair, tmp_path):
    from peft import PeftModel

    base, tuned = peft_pair
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "4", "-o", tmp_path / "lora")
    assert code == 0, out
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and sorted(config["target_modules"]) == [
        "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    model = PeftModel.from_pretrained(load_model(base), tmp_path / "lora")
    expected = load_model(tuned)
    torch.testing.assert_close(logits(model), logits(expected), rtol=0, atol=1e-5)
    merged = model.merge_and_unload().state_dict()
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)


def test_loraops_merge_of_the_extracted_adapter_gives_the_tuned_weights(peft_pair, tmp_path):
    base, tuned = peft_pair
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "4", "--name", "ft")
    assert code == 0, out
    code, out = run("merge", "ft", "--into", base, "-o", tmp_path / "merged")
    assert code == 0, out
    merged, expected = state(tmp_path / "merged"), state(tuned)
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)


def test_gpt2_conv1d_modules_merge_back(tmp_path):
    from peft import PeftModel

    base = tiny_gpt2(tmp_path / "base")
    lora = peft_adapter(base, tmp_path / "lora", r=4, alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    PeftModel.from_pretrained(load_model(base), lora).merge_and_unload().save_pretrained(tmp_path / "tuned")
    adapter, report = loraops.extract(base, tmp_path / "tuned", rank=4, device="cpu")
    assert {m.kind for m in report.modules} == {"linear"} and all(m.fan_in_fan_out for m in adapter.modules.values())
    expected, weights = state(tmp_path / "tuned"), state(base)
    for name, module in adapter.modules.items():
        torch.testing.assert_close(weights[module.weight_name] + module.delta(), expected[module.weight_name],
                                   rtol=0, atol=1e-6)
    code, out = run("extract", "--base", base, "--tuned", tmp_path / "tuned", "--rank", "4", "-o", tmp_path / "x")
    assert code == 0, out
    model = PeftModel.from_pretrained(load_model(base), tmp_path / "x")
    torch.testing.assert_close(logits(model), logits(load_model(tmp_path / "tuned")), rtol=0, atol=1e-5)


def test_conv_kxk_is_locon_and_merges_back(tmp_path):
    model = conv_embedding_model()
    base = save_state_dict(model, tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(0)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    up, down = torch.randn(6, 2, generator=g), torch.randn(2, 8 * 9, generator=g)
    sd["conv3.weight"] += 0.1 * (up @ down).reshape(6, 8, 3, 3)
    sd["proj.weight"] += 0.1 * torch.randn(24, 2, generator=g) @ torch.randn(2, 16, generator=g)
    sd["conv3.bias"] += 0.5
    tuned = tmp_path / "tuned.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tuned))
    adapter, report = loraops.extract(base, tuned, rank=2, device="cpu")
    conv = adapter.modules["conv3"]
    assert conv.kind == "conv" and tuple(conv.A.shape) == (2, 8, 3, 3) and tuple(conv.B.shape) == (6, 2, 1, 1)
    assert [(s.name, s.reason) for s in report.skipped] == [("conv3.bias", "norm or bias")]
    assert report.skipped[0].max_abs_diff == pytest.approx(0.5)
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "--name", "c")
    assert code == 0, out
    assert "not extracted: 1 tensor that differs (norm or bias); largest |Δ| 0.5 in conv3.bias" in out
    code, out = run("merge", "c", "--into", base, "-o", tmp_path / "merged.safetensors")
    assert code == 0, out
    merged = load_file(tmp_path / "merged.safetensors")
    for name in ("conv3.weight", "proj.weight", "conv1.weight", "embed.weight"):
        torch.testing.assert_close(merged[name], sd[name], rtol=0, atol=1e-6)


def test_save_module_carries_full_tensors_peft_loads(peft_pair, tmp_path):
    from peft import PeftModel

    base, tuned = peft_pair
    weights = state(tuned)
    g = torch.Generator().manual_seed(1)
    changed = with_tensors(tuned, tmp_path / "tuned2", {
        "model.embed_tokens.weight": weights["model.embed_tokens.weight"] + 0.01 * torch.randn(128, 64, generator=g),
        "model.norm.weight": weights["model.norm.weight"] + 0.25,
    })
    code, out = run("extract", "--base", base, "--tuned", changed, "--rank", "4", "--save-module", "embed_tokens",
                    "-o", tmp_path / "lora")
    assert code == 0, out
    assert "stored whole (modules_to_save): model.embed_tokens.weight" in out
    assert "not extracted: 1 tensor that differs (norm or bias); largest |Δ| 0.25 in model.norm.weight; keep them " \
           "with --save-module" in out
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.embed_tokens"]
    code, out = run("extract", "--base", base, "--tuned", changed, "--rank", "4", "--save-module", "embed_tokens,norm",
                    "-o", tmp_path / "lora2")
    assert code == 0, out and "not extracted" not in out
    model = PeftModel.from_pretrained(load_model(base), tmp_path / "lora2")
    torch.testing.assert_close(logits(model), logits(load_model(changed)), rtol=0, atol=1e-5)


def test_save_module_tensors_are_read_as_written_one_at_a_time(synthetic, tmp_path, monkeypatch):
    """--save-module tensors (a 70B model's embed_tokens + lm_head: 4 GB) are not held while the modules are computed:
    the writer reads each when it writes it, and has let go of the one before (the file is the same)."""
    import weakref

    import loraops.st
    from loraops.extraction import extract_lazily
    from loraops.formats import write

    base, tuned, _ = synthetic
    saved = {"model.embed_tokens.weight", "lm_head.weight"}
    read_whole, alive = [], []
    real = loraops.st.read_tensor

    def reading(info, handle=None):
        values = real(info, handle)
        if info.name in saved:
            assert not [ref for ref in alive if ref() is not None], "a full tensor read while another was held"
            read_whole.append(info.name)
            alive.append(weakref.ref(values))
        return values

    monkeypatch.setattr(loraops.st, "read_tensor", reading)
    derived = extract_lazily(base, tuned, rank=4, save_modules=["embed_tokens", "lm_head"], device="cpu")
    assert read_whole == []  # checked finite in blocks, not read whole (nor kept)
    write(derived.adapter, tmp_path / "lazy", modules=derived)
    assert sorted(read_whole) == sorted(saved)
    monkeypatch.setattr(loraops.st, "read_tensor", real)
    adapter, report = loraops.extract(base, tuned, rank=4, save_modules=["embed_tokens", "lm_head"], device="cpu")
    assert report.parameters == adapter.num_parameters and sorted(adapter.full_tensors) == sorted(saved)
    write(adapter, tmp_path / "whole")
    assert (tmp_path / "lazy" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "adapter_model.safetensors").read_bytes()
    torch.testing.assert_close(load_file(tmp_path / "lazy" / "adapter_model.safetensors")[
        "base_model.model.lm_head.weight"], state(tuned)["lm_head.weight"], rtol=0, atol=0)


def test_an_embedding_left_out_is_compared_by_row_blocks_in_other_dtypes(synthetic, tmp_path, monkeypatch):
    """A differing embedding that is not extracted is only reported (its largest |Δ|): a 70B model's is 4 GiB in
    float32, so it is compared in row blocks, never read whole, also when the two models store it in other dtypes."""
    import loraops.st

    base, _, _ = synthetic
    embed = state(base)["model.embed_tokens.weight"]
    changed = embed.clone()
    changed[5, 3] += 0.25
    tuned = with_tensors(base, tmp_path / "tuned", {"model.embed_tokens.weight": changed.to(torch.bfloat16),
                                                     "model.layers.0.self_attn.q_proj.weight":
                                                         state(base)["model.layers.0.self_attn.q_proj.weight"] + 0.01})
    real = loraops.st.read_tensor

    def reading(info, handle=None):
        assert info.name != "model.embed_tokens.weight", "the embedding was read whole"
        return real(info, handle)

    monkeypatch.setattr(loraops.st, "read_tensor", reading)
    monkeypatch.setattr(loraops.st, "rows_per_block", lambda info: 7)  # several blocks even for a tiny table
    _, report = loraops.extract(base, tuned, rank=1, device="cpu")
    [skipped] = [s for s in report.skipped if s.name == "model.embed_tokens.weight"]
    expected = (changed.to(torch.bfloat16).float() - embed).abs().max().item()
    assert skipped.reason == "embedding" and skipped.max_abs_diff == pytest.approx(expected)


def test_embedding_lora_when_named(peft_pair, tmp_path):
    base, tuned = peft_pair
    weights = state(tuned)
    g = torch.Generator().manual_seed(2)
    delta = 0.1 * torch.randn(128, 3, generator=g) @ torch.randn(3, 64, generator=g)
    changed = with_tensors(tuned, tmp_path / "tuned2",
                           {"model.embed_tokens.weight": weights["model.embed_tokens.weight"] + delta})
    adapter, report = loraops.extract(base, changed, rank=4, device="cpu")
    assert "model.embed_tokens" not in adapter.modules
    assert [(s.name, s.reason) for s in report.skipped] == [("model.embed_tokens.weight", "embedding")]
    adapter, _ = loraops.extract(base, changed, rank=4, modules=["embed_tokens", "q_proj"], device="cpu")
    module = adapter.modules["model.embed_tokens"]
    assert module.kind == "embedding" and sorted(adapter.modules)[1:] == ["model.layers.0.self_attn.q_proj",
                                                                            "model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(module.delta(), delta, rtol=0, atol=3e-6)


@pytest.mark.registry_backend
def test_cli_registers_with_lineage_json_and_kohya(peft_pair, tmp_path):
    base, tuned = peft_pair
    code, out = run("base", "add", base, "--name", "llama-tiny")
    assert code == 0, out
    code, out = run("extract", "--base", "llama-tiny", "--tuned", tuned, "--dynamic", "sv_fro", "--param", "0.9",
                    "--max-rank", "8", "--json")
    assert code == 0, out
    record = json.loads(out)
    assert record["adapter"]["name"] == "tuned-sv_fro0.9" and record["adapter"]["base"]["name"] == "llama-tiny"
    assert record["report"]["dynamic"] == "sv_fro" and len(record["report"]["modules"]) == 6
    code, out = run("show", "tuned-sv_fro0.9")
    assert code == 0 and "lineage         extract(llama-tiny, tuned)" in out
    with Registry.open() as reg:
        lineage = reg.get_adapter("tuned-sv_fro0.9").lineage
        assert [(i.kind, i.ref, i.role) for i in lineage.inputs] == [("base", "llama-tiny", "base"),
                                                                        ("base", "tuned", "tuned")]
        assert lineage.params["dynamic"] == "sv_fro" and lineage.params["precise"] is False
    code, out = run("extract", "--base", "llama-tiny", "--tuned", tuned, "--rank", "4", "--format", "kohya",
                    "-o", tmp_path / "ft.safetensors")
    assert code == 0, out
    kohya = read_adapter(tmp_path / "ft.safetensors")
    assert kohya.format == "kohya" and len(kohya.modules) == 6
    code, out = run("merge", tmp_path / "ft.safetensors", "--into", base, "-o", tmp_path / "merged")
    assert code == 0, out
    merged, expected = state(tmp_path / "merged"), state(tuned)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)


def test_rank_above_every_module_is_capped_in_name_and_said(synthetic):
    base, tuned, _ = synthetic
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "99999999999999999999")
    assert code == 0, out
    assert "--rank 99999999999999999999 capped: no module is larger than rank 64 (min(out, in))" in out
    assert "registered tuned-r64@1" in out  # the largest module's rank (q_proj 64×64; v_proj 32×64 has 32)
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "40")
    assert code == 0 and "capped" not in out and "registered tuned-r40@1" in out, out


@pytest.fixture(scope="module")
def others(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract-others")
    wide = tiny_llama(root / "wide", intermediate=96)
    return wide


def assert_nothing_left(tmp_path):
    with Registry.open() as reg:
        assert reg.list_adapters() == [] and reg.list_bases() == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, code, message", [
    ("shapes", 2, "error: {wide} is not a fine-tune of {base}'s architecture: shapes differ: "
                  "model.layers.0.mlp.down_proj.weight [64, 128] vs [64, 96], "),
    ("identical", 2, "error: {base} and {copy} hold the same values in every tensor: nothing to extract"),
    ("same", 2, "error: base and tuned are the same model ({base}): nothing to extract"),
    ("modules", 2, "error: --modules q_projx: {base} has no 2-D or conv weight by that name (norms and biases are "
                   "no LoRA targets: --save-module keeps them whole)"),
    ("unchanged", 2, "error: --modules k_proj: its weights (model.layers.0.self_attn.k_proj.weight, "
                     "model.layers.1.self_attn.k_proj.weight) are the same in both models: nothing to extract"),
    ("save", 2, "error: --save-module nope: {base} has no module by that name"),
    ("missing", 3, "error: {missing}: no such file or folder, and no base of that name in the registry"),
])
def test_errors_are_one_line_and_leave_nothing(peft_pair, others, tmp_path, case, code, message):
    base, tuned = peft_pair
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    missing = tmp_path / "nowhere"
    args = {"shapes": ["--tuned", others], "identical": ["--tuned", copy], "same": ["--tuned", base],
            "modules": ["--tuned", tuned, "--modules", "q_projx"], "unchanged": ["--tuned", tuned, "--modules", "k_proj"],
            "save": ["--tuned", tuned, "--save-module", "nope"], "missing": ["--tuned", missing]}[case]
    got, out = run("extract", "--base", base, *args, "--rank", "4", "-o", tmp_path / "out")
    expected = message.format(base=base, wide=others, copy=copy, missing=missing)
    assert (got, out.count("\n")) == (code, 1) and out.startswith(expected), out
    assert_nothing_left(tmp_path)


def test_a_delta_below_what_fp16_holds_is_refused_not_written_as_a_zero_module(tmp_path):
    # B = U·S of a 1e-9 delta is ~1e-10 an entry, below float16's smallest subnormal (6e-8): the module was written
    # all zero (merging to nothing) while the report said it kept the whole delta
    g = torch.Generator().manual_seed(6)
    W = 1e-6 * torch.randn(16, 12, generator=g)
    save_file({"a.weight": W}, str(tmp_path / "base.safetensors"))
    save_file({"a.weight": W + 1e-9 * torch.randn(16, 2, generator=g) @ torch.randn(2, 12, generator=g)},
              str(tmp_path / "tuned.safetensors"))
    code, out = run("extract", "--base", tmp_path / "base.safetensors", "--tuned", tmp_path / "tuned.safetensors",
                    "--rank", "2", "--dtype", "fp16", "--name", "tiny", "-o", tmp_path / "out")
    assert code == 2 and out == (f"error: extract of {tmp_path / 'tuned.safetensors'} − {tmp_path / 'base.safetensors'}"
                                 ": module 'a' comes out all zero in float16 (its delta is below what float16 "
                                 "holds): use --dtype bf16 or fp32\n")
    assert_nothing_left(tmp_path)
    adapter, report = loraops.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=2,
                                      dtype="bf16", device="cpu")
    assert adapter.modules["a"].B.any() and report.modules[0].error < 1e-2


def test_an_fp16_delta_whose_singular_values_do_not_fit_fp16_is_extracted_in_fp16(tmp_path):
    """Both models float16, every entry of the delta (~6e4) fits float16, but B = U·S took all of σ (~2e6): the
    module came out NaN and the extract was refused at the default dtype (the tuned model's). B and A now share
    each component's magnitude where U·S does not fit; a delta that fits keeps B = U·S (A's rows orthonormal)."""
    g = torch.Generator().manual_seed(7)
    W = torch.randn(32, 24, generator=g).half()
    V = W[:16, :12].clone()
    small = 0.01 * torch.randn(16, 2, generator=g) @ torch.randn(2, 12, generator=g)
    save_file({"a.weight": W, "b.weight": V}, str(tmp_path / "base.safetensors"))
    save_file({"a.weight": (W.float() + 60000).half(), "b.weight": (V.float() + small).half()},
              str(tmp_path / "tuned.safetensors"))
    adapter, report = loraops.extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", rank=4,
                                      device="cpu")
    assert report.dtype == "float16" and adapter.modules["a"].B.dtype == torch.float16
    real = (W.float() + 60000).half().double() - W.double()
    assert torch.allclose(adapter.modules["a"].delta().double(), real, rtol=2e-3, atol=0)
    A = adapter.modules["b"].A.double()
    assert torch.allclose(A @ A.T, torch.eye(A.shape[0], dtype=torch.float64), atol=2e-3)


def test_existing_output_needs_force(peft_pair, tmp_path):
    base, tuned = peft_pair
    (tmp_path / "out").mkdir()
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "4", "-o", tmp_path / "out")
    assert code != 0 and out.count("\n") == 1 and "exists" in out, out
    with Registry.open() as reg:
        assert reg.list_adapters() == [] and reg.list_bases() == []
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "4", "-o", tmp_path / "out", "--force")
    assert code == 0, out
    assert (tmp_path / "out" / "adapter_config.json").exists()


def test_cuda_without_cuda_is_the_device_error(peft_pair):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    base, tuned = peft_pair
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "4", "--device", "cuda")
    assert (code, out) == (2, "error: device 'cuda' asked for, but no CUDA device is available\n")
    with Registry.open() as reg:
        assert reg.list_bases() == []


def test_single_file_sd_checkpoint_gets_sd_scripts_names(tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),
              "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
              "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (48, 48)}
    base = {n: torch.randn(s, generator=g).half() for n, s in shapes.items()}
    tuned = {n: (t.float() + 0.05 * torch.randn(t.shape, generator=g)).half() for n, t in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    code, out = run("extract", "--base", tmp_path / "base.safetensors", "--tuned", tmp_path / "tuned.safetensors",
                    "--rank", "48", "--format", "kohya", "-o", tmp_path / "sd.safetensors")
    assert code == 0, out
    keys = set(load_file(tmp_path / "sd.safetensors"))
    assert {k.removesuffix(".alpha") for k in keys if k.endswith(".alpha")} == {
        "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"}
    code, out = run("merge", tmp_path / "sd.safetensors", "--into", tmp_path / "base.safetensors",
                    "-o", tmp_path / "merged.safetensors")
    assert code == 0, out
    merged = load_file(tmp_path / "merged.safetensors")
    for name, tensor in tuned.items():  # full rank: back to the tuned fp16 weights, give or take one fp16 rounding
        torch.testing.assert_close(merged[name].float(), tensor.float(), rtol=2e-3, atol=2e-3)


def test_a_weight_whose_bytes_differ_only_in_signed_zeros_is_identical(tmp_path):
    """The digests differ (0.0 and -0.0 are other bytes) but the delta is exactly zero: no all-zero module."""
    base = tiny_llama(tmp_path / "base")
    weights = state(base)
    zeroed = weights["model.layers.0.self_attn.q_proj.weight"].clone()
    zeroed[0, :4] = 0.0
    base = with_tensors(base, tmp_path / "base0", {"model.layers.0.self_attn.q_proj.weight": zeroed})
    signed = zeroed.clone()
    signed[0, :4] = -0.0
    only_zeros = with_tensors(base, tmp_path / "signed", {"model.layers.0.self_attn.q_proj.weight": signed})
    g = torch.Generator().manual_seed(4)
    changed = weights["model.layers.1.self_attn.q_proj.weight"] + 0.01 * torch.randn(64, 2, generator=g) @ torch.randn(
        2, 64, generator=g)
    tuned = with_tensors(only_zeros, tmp_path / "tuned", {"model.layers.1.self_attn.q_proj.weight": changed})
    adapter, report = loraops.extract(base, tuned, rank=2, device="cpu")
    assert list(adapter.modules) == ["model.layers.1.self_attn.q_proj"] and report.identical == len(weights) - 1
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "-o", tmp_path / "out", "--json")
    assert code == 0, out
    report = json.loads(out)["report"]
    assert [m["name"] for m in report["modules"]] == ["model.layers.1.self_attn.q_proj"]
    assert report["identical"] == len(weights) - 1
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    assert set(load_file(tmp_path / "out" / "adapter_model.safetensors")) == {
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"}
    code, out = run("extract", "--base", base, "--tuned", only_zeros, "--rank", "2", "-o", tmp_path / "none")
    assert (code, out) == (2, f"error: {base} and {only_zeros} hold the same values in every tensor: nothing to "
                              "extract\n")
    assert not (tmp_path / "none").exists()
    with Registry.open() as reg:
        assert [a.name for a in reg.list_adapters()] == ["tuned-r2"]
        assert sorted(b.name for b in reg.list_bases()) == ["base0", "tuned"]


@pytest.mark.parametrize("model, tensor, value", [
    ("tuned", "model.layers.0.self_attn.q_proj.weight", float("nan")),
    ("base", "model.layers.0.self_attn.q_proj.weight", float("inf")),
    ("tuned", "model.norm.weight", float("inf")),  # differs, not extracted: still refused
])
def test_non_finite_weights_are_refused_naming_the_tensor(peft_pair, tmp_path, model, tensor, value):
    base, tuned = peft_pair
    source = {"base": base, "tuned": tuned}[model]
    broken = state(source)[tensor].clone()
    broken.view(-1)[3] = value
    paths = {"base": base, "tuned": tuned, model: with_tensors(source, tmp_path / "broken", {tensor: broken})}
    code, out = run("extract", "--base", paths["base"], "--tuned", paths["tuned"], "--rank", "4", "-o", tmp_path / "out")
    assert (code, out) == (2, f"error: {paths[model]} has NaN or Inf values in {tensor}: extract refuses non-finite "
                              "weights (a delta or a stored copy of them would carry them into the adapter)\n")
    assert_nothing_left(tmp_path)


def untied_fine_tune(base, dest, *, embeddings=False):
    """A fine-tune of the tied model ``base`` that untied its head: lm_head stored apart and moved by a rank-3 delta
    (and q_proj nudged; with ``embeddings`` the input embeddings moved too)."""
    model = load_model(base)
    model.config.tie_word_embeddings = False
    g = torch.Generator().manual_seed(0)
    W = model.model.embed_tokens.weight.detach()
    model.lm_head.weight = torch.nn.Parameter(W + 0.05 * torch.randn(128, 3, generator=g) @ torch.randn(3, 64, generator=g))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight += 0.01
        if embeddings:
            model.model.embed_tokens.weight += 0.05 * torch.randn(128, 2, generator=g) @ torch.randn(2, 64, generator=g)
    model.save_pretrained(dest)
    return dest


@pytest.mark.parametrize("how", ["lora", "save-module", "embeddings too"])
def test_a_fine_tune_that_untied_its_head_extracts_the_head_from_the_embeddings(tmp_path, how):
    """A base with tied embeddings (no lm_head stored) and a fine-tune that stores its head apart: the head's delta is
    taken from the embeddings the tied head reads (a LoRA on lm_head, or lm_head whole with --save-module). PEFT's
    adapted base and loraops merge (which unties the head) both give the tuned logits; refused before ('only in
    tuned: lm_head.weight')."""
    from peft import PeftModel

    base = tiny_llama(tmp_path / "base", tie=True)
    tuned = untied_fine_tune(base, tmp_path / "tuned", embeddings=how == "embeddings too")
    args = {"lora": [], "save-module": ["--save-module", "lm_head"],
            "embeddings too": ["--modules", "q_proj,embed_tokens,lm_head"]}[how]
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "4", *args, "--name", "ex", "-o",
                    tmp_path / "lora")
    assert code == 0, out
    said = "stored whole" if how == "save-module" else "extracted as its change from those embeddings"
    assert (f"lm_head.weight: tied to model.embed_tokens.weight in {base}, stored apart in {tuned}: {said} (a merge "
            "unties it)\n") in out
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert ("lm_head" in config["target_modules"]) == (how != "save-module")
    assert config["modules_to_save"] == (["lm_head"] if how == "save-module" else None)
    ids = {"input_ids": torch.arange(3, 11).reshape(1, 8)}
    with torch.no_grad():
        expected = load_model(tuned).eval()(**ids).logits
        peft = PeftModel.from_pretrained(load_model(base), tmp_path / "lora").eval()
        torch.testing.assert_close(peft(**ids).logits, expected, rtol=0, atol=1e-5)
    code, out = run("merge", "ex", "--into", base, "-o", tmp_path / "merged", "--no-record")
    assert code == 0 and "untied lm_head.weight from the input embeddings" in out, out
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "merged").eval()(**ids).logits, expected, rtol=0, atol=1e-5)
    if how == "lora":  # kohya names resolve against stored tensors: refused before any work, nothing left
        code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "4", "--format", "kohya", "-o",
                        tmp_path / "k.safetensors")
        assert (code, out) == (2, f"error: lm_head: {base} ties this head to its input embeddings and does not store "
                                  "it, and kohya module names are resolved against the tensors a base stores: use "
                                  "--format peft\n")
        assert not (tmp_path / "k.safetensors").exists()


def test_a_fine_tune_that_tied_its_head_is_named_and_refused(tmp_path):
    """The other way round (the base stores its head, the fine-tune ties it to its embeddings): one line names it."""
    base = tiny_llama(tmp_path / "base")
    model = load_model(base)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "tied")
    code, out = run("extract", "--base", base, "--tuned", tmp_path / "tied", "--rank", "4")
    assert (code, out) == (2, f"error: {tmp_path / 'tied'} is not a fine-tune of {base}'s architecture: only in "
                              f"{base}: lm_head.weight; lm_head.weight is a head that {tmp_path / 'tied'} ties to its "
                              "input embeddings (and so does not store)\n")


def test_a_quantized_weight_is_refused_not_extracted_from_its_integer_codes(tmp_path):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 127, (32, 32), generator=g, dtype=torch.int8)
    base = {"q.weight": codes, "q.SCB": torch.rand(32, generator=g), "v.weight": torch.randn(32, 32, generator=g)}
    tuned = {**base, "q.weight": (codes.int() + 1).clamp(-127, 127).to(torch.int8)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    code, out = run("extract", "--base", tmp_path / "base.safetensors", "--tuned", tmp_path / "tuned.safetensors",
                    "--rank", "4", "-o", tmp_path / "out")
    assert (code, out) == (2, f"error: {tmp_path / 'base.safetensors'}: q.weight is stored as I8 with q.SCB F32[32]; "
                              "extract reads float weights: dequantize the model first\n")
    assert_nothing_left(tmp_path)


@pytest.mark.registry_backend
def test_a_registered_model_whose_files_changed_is_said_to_have_changed(synthetic, tmp_path):
    """As merge says it (one note per model, the same words): the files are read as they are now and recorded by
    their own fingerprint, so the lineage names what was read, not the registered base named."""
    base, tuned, _ = synthetic
    base, tuned = shutil.copytree(base, tmp_path / "b"), shutil.copytree(tuned, tmp_path / "t")
    assert run("base", "add", base, "--name", "llama")[0] == 0 and run("base", "add", tuned, "--name", "ft")[0] == 0
    code, out = run("extract", "--base", "llama", "--tuned", "ft", "--rank", "2", "--name", "before")
    assert code == 0 and "note:" not in out, out
    for folder in (base, tuned):  # the same change to both: the deltas stay, the fingerprints do not
        weights = state(folder)
        weights["model.norm.weight"] = weights["model.norm.weight"] + 1
        save_file(weights, str(next(folder.glob("*.safetensors"))), metadata={"format": "pt"})
    code, out = run("extract", "--base", "llama", "--tuned", "ft", "--rank", "3", "--name", "after")  # (other bytes)
    assert code == 0, out
    for name in ("llama", "ft"):
        assert (f"note: the files of registered base {name} changed since it was registered; what was read is "
                "recorded as a base of its own (by its fingerprint), and the lineage names it\n") in out, out
    with Registry.open() as reg:
        assert [i.ref for i in reg.get_adapter("before").lineage.inputs] == ["llama", "ft"]
        assert [i.ref for i in reg.get_adapter("after").lineage.inputs] == ["b", "t"]
    code, out = run("extract", "--base", "llama", "--tuned", "ft", "--rank", "4", "--json", "--name", "again")
    assert json.loads(out)["report"]["base_changed"] == []  # now recorded as they are (by path, the newest record)


def in_dtype(weights, dtype):
    return {k: v.to(dtype) for k, v in weights.items()}


@pytest.mark.parametrize("base_dtype, tuned_dtype", [
    (torch.float32, torch.bfloat16),   # an fp32 base re-saved in bf16: tuned = round(base)
    (torch.bfloat16, torch.float32),   # a bf16 release and the fp32 weights it was rounded from: base = round(tuned)
    (torch.bfloat16, torch.float16),   # both rounded from one fp32 original
    (torch.float16, torch.bfloat16),   # the fp16 model converted to bf16
])
def test_a_model_saved_in_another_dtype_is_refused_as_rounding(synthetic, tmp_path, base_dtype, tuned_dtype):
    """Not a fine-tune: every difference is within the rounding between the two dtypes; factorizing it would make
    a LoRA of noise (every module, at any rank). --keep-rounding goes on."""
    source, _, _ = synthetic
    weights = state(source)
    if (base_dtype, tuned_dtype) == (torch.float16, torch.bfloat16):
        weights = in_dtype(weights, torch.float16)
    base = with_tensors(source, tmp_path / "base", in_dtype(weights, base_dtype))
    tuned = with_tensors(source, tmp_path / "tuned", in_dtype(weights, tuned_dtype))
    code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "-o", tmp_path / "out")
    assert (code, out.count("\n")) == (2, 1) and out.startswith(
        f"error: {tuned} and {base} differ only by the rounding between their dtypes ("), out
    assert ("the same model saved in another dtype, not a fine-tune; nothing to extract (--keep-rounding extracts "
            "the rounding anyway)\n") in out
    assert_nothing_left(tmp_path)
    if base_dtype == torch.float32:
        code, out = run("extract", "--base", base, "--tuned", tuned, "--rank", "2", "--keep-rounding")
        assert code == 0 and "15 modules, " in out and "rounding" not in out, out  # 14 layers + lm_head


def test_a_fine_tune_saved_in_another_dtype_extracts_its_fine_tune_alone(synthetic, tmp_path):
    """A bf16 fine-tune of an fp32 base: the weights it trained are extracted; the others, rounded to bf16 and
    nothing else, are left out in one line (no module of rounding noise)."""
    base, tuned, _ = synthetic
    code, out = run("extract", "--base", base, "--tuned", with_tensors(base, tmp_path / "bf16", in_dtype(
        state(tuned), torch.bfloat16)), "--rank", "6", "--json")
    assert code == 0, out
    report = json.loads(out)["report"]
    assert sorted(m["name"] for m in report["modules"]) == sorted(TARGETS)
    assert len(report["rounding"]) == len(state(base)) - len(TARGETS) - report["identical"] > 0
    assert {r["reason"] for r in report["rounding"]} == {"float32 → bfloat16"}
    code, out = run("extract", "--base", base, "--tuned", tmp_path / "bf16", "--rank", "6", "--name", "again")
    assert code == 0, out
    assert (f"not extracted: {len(report['rounding'])} tensors that differ only by the rounding between the models' "
            "dtypes (float32 → bfloat16); largest |Δ| ") in out, out


def test_the_rounding_line_counts_what_keep_rounding_would_add(synthetic, tmp_path):
    """The line said "--keep-rounding extracts them" of every tensor that differs only by rounding, norms, embeddings
    and weights outside --modules included. It counts what --keep-rounding does add: checked against the modules a
    --keep-rounding run makes beyond the fine-tune's. Where none would be added (only norms rounded), neither the line
    nor the refusal of such a pair says --keep-rounding extracts anything."""
    base, tuned, _ = synthetic
    bf16 = with_tensors(base, tmp_path / "bf16", in_dtype(state(tuned), torch.bfloat16))
    for extra in ([], ["--modules", "q_proj"]):
        code, out = run("extract", "--base", base, "--tuned", bf16, "--rank", "6", "--json", *extra)
        assert code == 0, out
        report = json.loads(out)["report"]
        code, out = run("extract", "--base", base, "--tuned", bf16, "--rank", "6", "--json", "--keep-rounding", *extra)
        assert code == 0, out
        added = {m["name"] for m in json.loads(out)["report"]["modules"]} - {m["name"] for m in report["modules"]}
        assert sorted(f"{n}.weight" for n in added) == sorted(report["rounding_targets"])
        assert 0 < len(added) < len(report["rounding"]), extra  # the embeddings (and more) are no targets
        code, out = run("extract", "--base", base, "--tuned", bf16, "--rank", "6", "--name", f"r{len(extra)}", *extra)
        assert code == 0 and "rounding between the models' dtypes (float32 → bfloat16); largest |Δ| " in out, out
        assert out.count(f"; --keep-rounding extracts {len(added)} of them\n") == 1, out
    # every rounded tensor a weight it would extract (norms and embeddings bf16-exact on both sides): "them"
    exact = {k: v.to(torch.bfloat16).float() if v.dim() == 1 or "embed" in k else v for k, v in state(base).items()}
    fine_tuned = {**exact, **{k: v for k, v in state(tuned).items() if k.removesuffix(".weight") in TARGETS}}
    code, out = run("extract", "--base", with_tensors(base, tmp_path / "exact-embeddings", exact), "--tuned", with_tensors(
        base, tmp_path / "ft-bf16", in_dtype(fine_tuned, torch.bfloat16)), "--rank", "6", "--name", "all")
    assert code == 0 and out.count("; --keep-rounding extracts them\n") == 1, out

    weights = {k: v.to(torch.bfloat16).float() if v.dim() > 1 else v + 1e-3 for k, v in state(base).items()}
    exact = with_tensors(base, tmp_path / "exact", weights)  # every weight bf16-exact, the norms not
    code, out = run("extract", "--base", exact, "--tuned", with_tensors(base, tmp_path / "norms-bf16", in_dtype(
        weights, torch.bfloat16)), "--rank", "2")
    assert code == 2 and out.endswith("the same model saved in another dtype, not a fine-tune; nothing to extract\n"), out


def test_rounding_is_bounded_by_half_a_spacing_of_each_dtype(tmp_path):
    """The criterion (extraction._differs) holds every pair that rounding can make — one dtype rounded to the other,
    or both from one original, subnormals and binade edges included — and nothing one spacing further."""
    from loraops.basemodel import BaseModel
    from loraops.extraction import _differs, _half_gap

    g = torch.Generator().manual_seed(0)
    exponents = torch.randint(-40, 12, (4096,), generator=g).float()
    x = torch.randn(4096, generator=g) * torch.exp2(exponents)
    x = torch.cat([x, torch.exp2(torch.arange(-30, 12.0)) * (1 - 2 ** -20), torch.zeros(6)]).reshape(-1, 8)
    pairs = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float16)]
    for first, second in pairs:
        for name, a, b in [("rounded", x.to(first), x.to(first).to(second)), ("both", x.to(first), x.to(second))]:
            save_file({"w.weight": a}, str(tmp_path / "a.safetensors"))
            save_file({"w.weight": b}, str(tmp_path / "b.safetensors"))
            differs, rounding = _differs(BaseModel.open(tmp_path / "a.safetensors"),
                                         BaseModel.open(tmp_path / "b.safetensors"))
            assert differs["w.weight"] and "w.weight" in rounding, (first, second, name)
            coarse = "BF16" if torch.bfloat16 in (first, second) else "F16"
            bumped = b.clone()
            v = b[3, 3].float()
            bumped[3, 3] = (v + 3 * _half_gap(v, 2 * v, coarse)).to(second)  # 1.5 spacings outward
            save_file({"w.weight": bumped}, str(tmp_path / "b.safetensors"))
            differs, rounding = _differs(BaseModel.open(tmp_path / "a.safetensors"),
                                         BaseModel.open(tmp_path / "b.safetensors"))
            assert differs["w.weight"] and "w.weight" not in rounding, (first, second, name)



def test_rounding_is_no_step_across_a_power_of_two(tmp_path):
    """Below a power of two a dtype's values are twice as dense: bf16's 1.0 is what every real from 1 − 2⁻⁹ to
    1 + 2⁻⁸ rounds to, so a bf16 fine-tune saved in fp32 that moved 1.0 one step down (to 1 − 2⁻⁸) holds no rounding
    of its base, nor does one that moved 1 − 2⁻⁸ up to 1.0. The bound took the spacing above the larger of the two
    values on both sides and called both rounding; what rounding can make is a pair whose rounding intervals meet."""
    from loraops.basemodel import BaseModel
    from loraops.extraction import _differs

    def rounding(first, second):
        save_file({"w.weight": first}, str(tmp_path / "a.safetensors"))
        save_file({"w.weight": second}, str(tmp_path / "b.safetensors"))
        differs, within = _differs(BaseModel.open(tmp_path / "a.safetensors"), BaseModel.open(tmp_path / "b.safetensors"))
        assert differs["w.weight"]
        return "w.weight" in within

    for coarse, bits, fine in [(torch.bfloat16, 7, torch.float32), (torch.bfloat16, 7, torch.float16),
                               (torch.float16, 10, torch.float32), (torch.float32, 23, torch.float64)]:
        edges = torch.tensor([1.0, 0.5, -2.0, 1024.0, 2.0 ** -12], dtype=torch.float64)
        inward = edges - edges.sign() * torch.ldexp(edges.abs(), torch.tensor(-bits - 1))  # one coarse step down
        for i in range(len(edges)):
            for at, moved in [(edges, inward), (inward, edges)]:  # the fine-tune's step: inward, or outward
                c, f = at.to(coarse), at.to(fine, copy=True)
                f[i] = moved[i]
                assert c[i] != f[i].to(coarse)
                assert not rounding(c, f) and not rounding(f, c), (coarse, fine, float(at[i]), float(moved[i]))
    # the half step (a tie, from either side) and whatever rounding makes around a power of two still are
    x = torch.tensor([1.0 - 2 ** -9, 1.0 - 2 ** -10, 1.0 + 2 ** -9, -(1.0 - 2 ** -9), 0.5 - 2 ** -10 - 2 ** -20])
    assert rounding(x.to(torch.float32), x.to(torch.bfloat16)) and rounding(x.to(torch.bfloat16), x.to(torch.float32))
    assert rounding(x.to(torch.float16), x.to(torch.bfloat16)) and rounding(x.to(torch.bfloat16), x.to(torch.float16))
    # zero's neighbours are the smallest subnormals: 2⁻¹³⁴ rounds to bf16's 0 (a tie), 1e-4 does not
    assert rounding(torch.tensor([2.0 ** -134, -(2.0 ** -134)]), torch.zeros(2, dtype=torch.bfloat16))
    assert not rounding(torch.tensor([1e-4, 0.0]), torch.zeros(2, dtype=torch.bfloat16))


def test_an_f64_model_rounded_by_torch_to_bf16_or_fp16_is_rounding(tmp_path):
    """torch rounds float64 to bf16 and fp16 through float32, twice: 1 + 2⁻⁸ + 2⁻⁴⁰ becomes the tie 1 + 2⁻⁸ first,
    then 1.0 (to even), one step below what rounding it once gives. About one value in 2¹⁶ (bf16) or 2¹³ (fp16) is
    such a tie in float32, so every large tensor of an F64 model saved in bf16 had one and was extracted as a
    fine-tune."""
    from loraops.basemodel import BaseModel
    from loraops.extraction import _differs

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(60, dtype=torch.float64, generator=g),
                   torch.tensor([1 + 2 ** -8, -(0.5 + 2 ** -9), 1 + 2 ** -11, -(0.5 + 2 ** -12)],  # bf16's, fp16's ties
                                dtype=torch.float64) * (1 + 2 ** -40)])
    for coarse in (torch.bfloat16, torch.float16):
        save_file({"w.weight": x.reshape(8, 8)}, str(tmp_path / "a.safetensors"))
        save_file({"w.weight": x.reshape(8, 8).to(coarse)}, str(tmp_path / "b.safetensors"))
        for first, second in [("a", "b"), ("b", "a")]:
            differs, within = _differs(BaseModel.open(tmp_path / f"{first}.safetensors"),
                                       BaseModel.open(tmp_path / f"{second}.safetensors"))
            assert differs["w.weight"] and "w.weight" in within, (coarse, first)
