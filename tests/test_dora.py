"""DoRA adapters (PEFT use_dora): merged like PEFT's merge_and_unload and its adapted model, several in order, resized,
written back; subtract, combine and kohya output refused; a malformed magnitude is one line.

PEFT initialises a magnitude to ‖W + s·B·A‖, with which DoRA merges exactly as plain LoRA: every adapter here has its
magnitudes perturbed (factories.perturb_magnitudes), so a test that passed treating DoRA as LoRA would fail."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from engine_helpers import dora_reference64, ulps
from factories import (conv_peft_adapter, load_model, peft_adapter, perturb_magnitudes,
                       save_state_dict, conv_embedding_model, tiny_gpt2, tiny_llama)
from loraops import algebra, engine, formats
from loraops.adapter import Adapter, LoraModule
from loraops.cli import main
from loraops.errors import InvalidInputError, UnsupportedAdapterError
from test_engine import assert_parity, merged_tensors

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def dora(base: Path, out: Path, *, seed: int = 1, **kwargs) -> Path:
    """A DoRA adapter made by PEFT on ``base``, its magnitudes perturbed."""
    return perturb_magnitudes(peft_adapter(base, out, seed=seed, use_dora=True, **kwargs), seed=seed)


def peft_model(base: Path, dirs: list[Path], weights: list[float] | None = None, dtype: torch.dtype | None = None):
    """PEFT's model with the adapters active in the order given, each at its weight (PEFT's set_scale)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(load_model(base, dtype), dirs[0], adapter_name="a0")
    for i, folder in enumerate(dirs[1:], 1):
        model.load_adapter(folder, adapter_name=f"a{i}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(dirs))])
    for i, weight in enumerate(weights or []):
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                layer.set_scale(f"a{i}", weight)
    return model.eval()


def merge(base: Path, dirs: list[Path], out: Path, weights: list[float] | None = None, **options):
    adapters = [formats.read_adapter(d) for d in dirs]
    weights = weights or [1.0] * len(dirs)
    engine.merge(base, list(zip(adapters, weights)), out, device="cpu", fingerprint=False, **options)
    terms: dict[str, list] = {}
    for adapter, weight in zip(adapters, weights):
        for module in engine.fit(adapter, engine.BaseModel.open(base)).modules.values():
            terms.setdefault(module.weight_name, []).append((module, weight))
    return merged_tensors(out), terms


def assert_matches_peft(ours: dict, peft_state: dict, base_state: dict, terms: dict, precise: dict) -> None:
    """bf16/fp16: test_engine.assert_parity (within one unit of rounding of PEFT's merge, at least as close as it to
    float64). float32: both merges compute in float32 and are off in the last bits of ΔW's magnitude, in different
    places (measured: ours up to 1.6× PEFT's largest error in a tensor): ours within twice PEFT's largest error, and
    ``precise`` (the --precise merge: float64 rounded once, the float32 nearest the exact value) at
    least as close as PEFT's everywhere."""
    if next(iter(ours.values())).dtype != torch.float32:
        assert_parity(ours, peft_state, base_state, terms, reference=dora_reference64)
        return
    for name, module_terms in terms.items():
        exact = dora_reference64(base_state[name], module_terms)
        theirs = (peft_state[name].double() - exact).abs()
        assert float((ours[name].double() - exact).abs().max()) <= 2 * float(theirs.max()), name
        assert bool(((precise[name].double() - exact).abs() <= theirs).all()), name


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="module")
def llama16(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama16") / "base", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def llama_dora(llama32, tmp_path_factory):
    return dora(llama32, tmp_path_factory.mktemp("dora") / "a")


@pytest.mark.no_registry
@pytest.mark.parametrize("kwargs", [{}, {"use_rslora": True}, {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 3}},
                                    {"dtype": torch.bfloat16}], ids=["classic", "rslora", "rank_pattern", "bf16_factors"])
@pytest.mark.parametrize("base_dtype", ["bf16", "fp32"])
def test_llama_merge_matches_peft(tmp_path, request, base_dtype, kwargs):
    """Within one unit of rounding of PEFT's merge_and_unload, and at least as close as it to float64."""
    base = request.getfixturevalue({"bf16": "llama16", "fp32": "llama32"}[base_dtype])
    folder = dora(base, tmp_path / "a", **kwargs)
    ours, terms = merge(base, [folder], tmp_path / "out")
    assert all(m.dora for ts in terms.values() for m, _ in ts) and len(terms) == 14
    peft_state = peft_model(base, [folder]).merge_and_unload().state_dict()
    precise, _ = merge(base, [folder], tmp_path / "precise", precise=True)
    assert_matches_peft(ours, peft_state, merged_tensors(base), terms, precise)


@pytest.mark.no_registry
@pytest.mark.parametrize("chunk", [None, 700], ids=["one_chunk", "many_chunks"])
def test_gpt2_conv1d_output_channels_are_columns(tmp_path, monkeypatch, chunk):
    """GPT-2 stores its Conv1D weights in×out: an output channel is a column, normed over every row of the tensor
    (taken in a pass before the chunks when a chunk holds only some rows)."""
    if chunk:
        monkeypatch.setattr(engine, "CHUNK_ELEMENTS", chunk)
    base = tiny_gpt2(tmp_path / "gpt2")
    folder = dora(base, tmp_path / "a", target_modules=GPT2_TARGETS, fan_in_fan_out=True)
    ours, terms = merge(base, [folder], tmp_path / "out")
    assert all(m.fan_in_fan_out and m.dora for ts in terms.values() for m, _ in ts)
    peft_state = peft_model(base, [folder]).merge_and_unload().state_dict()
    precise, _ = merge(base, [folder], tmp_path / "precise", precise=True)
    assert_matches_peft(ours, peft_state, merged_tensors(base), terms, precise)


@pytest.mark.no_registry
def test_conv_and_embedding_match_peft(tmp_path, monkeypatch):
    """Conv2d 1×1 and 3×3 (norm over all but the output dimension) and an embedding (output channels are columns)."""
    from peft import PeftModel

    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 40)  # the embedding's 32 rows in several chunks
    base = save_state_dict(conv_embedding_model(), tmp_path / "tiny.safetensors")
    folder = perturb_magnitudes(conv_peft_adapter(tmp_path / "a", use_dora=True))
    adapter = formats.read_adapter(folder)
    assert {m.kind for m in adapter.modules.values()} == {"embedding", "linear", "conv"}
    assert tuple(load_file(folder / "adapter_model.safetensors")["base_model.model.conv3.lora_magnitude_vector"].shape) \
        == (1, 6, 1, 1)
    merged = {}
    for precise in (False, True):
        engine.merge(base, [(adapter, 1.0)], tmp_path / f"{precise}.safetensors", device="cpu", precise=precise,
                     fingerprint=False)
        merged[precise] = load_file(tmp_path / f"{precise}.safetensors")
    peft_state = PeftModel.from_pretrained(conv_embedding_model(), folder).merge_and_unload().state_dict()
    terms = {m.weight_name: [(m, 1.0)] for m in adapter.modules.values()}
    assert_matches_peft(merged[False], peft_state, load_file(base), terms, merged[True])


@pytest.mark.no_registry
def test_merged_model_computes_what_peft_adapted_model_computes(tmp_path, llama32, llama_dora):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    merge(llama32, [llama_dora], tmp_path / "out")
    merged = logits(load_model(tmp_path / "out"), ids)
    adapted = logits(peft_model(llama32, [llama_dora]), ids)
    plain = logits(load_model(llama32), ids)
    assert float((merged - adapted).abs().max()) < 1e-4 < float((merged - plain).abs().max())


@pytest.mark.no_registry
@pytest.mark.parametrize("order, weights", [(("plain", "dora"), [0.7, 1.3]), (("dora", "plain"), [1.0, 1.0]),
                                            (("dora", "dora2"), [1.0, -0.5]), (("dora",), [0.0])],
                         ids=["plain_then_dora", "dora_then_plain", "two_dora", "weight_zero"])
def test_several_adapters_apply_in_order_as_peft_does(tmp_path, llama32, llama_dora, order, weights):
    """PEFT's forward (and merge) take each DoRA adapter over what the adapters before it made: W' ← f ⊙ (W' + Δ),
    f = m/‖W + Δ‖ from the base alone. The weight scales Δ in both places (set_scale), and weight 0 still rescales."""
    dirs = {"dora": llama_dora,
            "dora2": dora(llama32, tmp_path / "d2", seed=2, r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
            "plain": peft_adapter(llama32, tmp_path / "p", seed=3, r=4, target_modules=["q_proj", "up_proj"])}
    folders = [dirs[name] for name in order]
    ours, terms = merge(llama32, folders, tmp_path / "out", weights)
    base = merged_tensors(llama32)
    for name, module_terms in terms.items():
        exact = dora_reference64(base[name], module_terms)
        assert float((ours[name].double() - exact).abs().max()) < 1e-5 * float(exact.abs().max()), name
    if weights == [0.0]:  # no no-op: each output channel rescaled to its magnitude, f = m/‖W‖
        assert all(not torch.equal(ours[name], base[name]) for name in terms)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    adapted = logits(peft_model(llama32, folders, weights), ids)
    assert float((logits(load_model(tmp_path / "out"), ids) - adapted).abs().max()) < 1e-4
    if len(order) == 2:  # the order matters (unless no tensor has a DoRA module after another adapter's)
        merge(llama32, folders[::-1], tmp_path / "reversed", weights[::-1])
        assert float((logits(load_model(tmp_path / "reversed"), ids) - adapted).abs().max()) > 1e-3


@pytest.mark.no_registry
def test_resize_keeps_the_magnitude_and_peft_loads_the_result(tmp_path, llama32, llama_dora):
    adapter = formats.read_adapter(llama_dora)
    same, _ = algebra.resize(adapter, rank=8, device="cpu")
    smaller, _ = algebra.resize(adapter, rank=3, device="cpu")
    for name, module in smaller.modules.items():
        assert module.rank == 3 and torch.equal(module.magnitude, adapter.modules[name].magnitude)
    formats.write_adapter(smaller, tmp_path / "r3")
    assert json.loads((tmp_path / "r3" / "adapter_config.json").read_text())["use_dora"] is True
    ours, terms = merge(llama32, [tmp_path / "r3"], tmp_path / "out")
    peft_state = peft_model(llama32, [tmp_path / "r3"]).merge_and_unload().state_dict()
    precise, _ = merge(llama32, [tmp_path / "r3"], tmp_path / "precise", precise=True)
    assert_matches_peft(ours, peft_state, merged_tensors(llama32), terms, precise)
    engine.merge(llama32, [(same, 1.0)], tmp_path / "same", device="cpu", fingerprint=False)
    full, _ = merge(llama32, [llama_dora], tmp_path / "full")
    same = merged_tensors(tmp_path / "same")  # the same delta, re-factored: the same merge to float32 noise
    assert all(float((same[n] - full[n]).abs().max()) < 1e-6 * float(full[n].abs().max()) for n in terms)


@pytest.mark.no_registry
def test_an_output_channel_of_zero_norm_is_refused(tmp_path):
    weight = torch.randn(4, 3)
    weight[2] = 0
    base = save_file({"lin.weight": weight}, str(tmp_path / "m.safetensors")) or tmp_path / "m.safetensors"
    B = torch.randn(4, 2)
    B[2] = 0
    module = LoraModule("lin", torch.randn(2, 3), B, alpha=2.0, scale=1.0, magnitude=torch.ones(4))
    with pytest.raises(InvalidInputError, match="output channel of lin.weight \\+ ΔW is all zeros"):
        engine.merge(base, [(Adapter({"lin": module}, "peft"), 1.0)], tmp_path / "out.safetensors", device="cpu")
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(UnsupportedAdapterError, match="cannot be subtracted"):
        engine.subtract(base, [(Adapter({"lin": module}, "peft"), 1.0)], tmp_path / "out.safetensors", device="cpu")


@pytest.mark.no_registry
@pytest.mark.parametrize("base_value, factor, says", [(1.0, 1e10, "go beyond"), (1e-23, 1e-12, "are below")])
@pytest.mark.parametrize("transposed", [False, True])
def test_an_output_channel_whose_squares_overflow_or_underflow_is_refused(transposed, base_value, factor, says,
                                                                          tmp_path):
    """W + ΔW of finite values whose squares go beyond float32 (1e20 each): its norm was inf, the factor m/‖·‖ 0, and
    the channel was written as zeros with exit 0; of values 1.1e-23 (bfloat16's subnormals are 1e-39), whose squares
    are below float32's least value: its norm was 0 and the channel refused as 'all zeros', which it is not. Both
    refused for the squares with the --precise hint, in both of DoRA's norms (rows, and a transposed module's
    columns); --precise (float64) merges them right: m·(W + ΔW)/‖W + ΔW‖, 1/√3 here."""
    base = save_file({"lin.weight": torch.full((3, 4) if transposed else (4, 3), base_value)},
                     str(tmp_path / "m.safetensors")) or tmp_path / "m.safetensors"
    module = LoraModule("lin", torch.full((1, 3), factor), torch.full((4, 1), factor), alpha=1.0, scale=1.0,
                        magnitude=torch.ones(4), fan_in_fan_out=transposed)
    adapter = Adapter({"lin": module}, "peft")
    with pytest.raises(InvalidInputError, match="^DoRA module 'lin': the squares summed for the norm of an output "
                                                f"channel of lin.weight \\+ ΔW {says} what float32 holds.*; "
                                                "precise=True computes in float64$"):
        engine.merge(base, [(adapter, 1.0)], tmp_path / "out.safetensors", device="cpu")
    assert not (tmp_path / "out.safetensors").exists()
    engine.merge(base, [(adapter, 1.0)], tmp_path / "out.safetensors", device="cpu", precise=True)
    merged = load_file(tmp_path / "out.safetensors")["lin.weight"]
    assert torch.allclose(merged, torch.full_like(merged, 3 ** -0.5))


@pytest.mark.no_registry
@pytest.mark.parametrize("precise", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_base_channel_holding_inf_is_refused_as_the_bases(transposed, precise, tmp_path):
    """A base whose output channel holds ±inf: ‖W + ΔW‖ is inf there, and the message said the squares went beyond
    float32 with a --precise hint that does not help (float64's norm is inf too). PEFT's merge (float64, below)
    writes that channel as zeros with NaN at the inf (f = m/inf = 0), not the base's channel: refused, naming the
    base, in both of DoRA's norms and both work dtypes."""
    from peft import LoraConfig, get_peft_model

    weight = torch.ones(4, 3, dtype=torch.float64)
    weight[1, 2] = float("inf")
    linear = torch.nn.Sequential()
    linear.add_module("lin", torch.nn.Linear(3, 4, bias=False, dtype=torch.float64))
    with torch.no_grad():
        linear.lin.weight.copy_(weight)
    model = get_peft_model(linear, LoraConfig(r=2, target_modules=["lin"], use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.lin.lora_magnitude_vector["default"].weight.fill_(2.0)
    theirs = model.merge_and_unload().lin.weight[1]
    assert bool((theirs[:2] == 0).all()) and bool(theirs[2].isnan())

    base = save_file({"lin.weight": (weight.T if transposed else weight).float().contiguous()},
                     str(tmp_path / "m.safetensors")) or tmp_path / "m.safetensors"
    module = LoraModule("lin", torch.randn(2, 3), torch.randn(4, 2), alpha=2.0, scale=1.0,
                        magnitude=torch.full((4,), 2.0), fan_in_fan_out=transposed)
    with pytest.raises(InvalidInputError, match="^DoRA module 'lin': the base's lin.weight holds ±inf in an output "
                                                "channel, so the norm DoRA rescales that channel by is inf"):
        engine.merge(base, [(Adapter({"lin": module}, "peft"), 1.0)], tmp_path / "out.safetensors", device="cpu",
                     precise=precise)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.no_registry
@pytest.mark.parametrize("transposed", [False, True])
def test_deltas_that_cancel_as_inf_minus_inf_are_refused(transposed, tmp_path):
    """A NaN norm is no longer refused by dora_factors (a NaN the base holds stays NaN, as in PEFT), so one that comes
    of deltas beyond float32 cancelling (1e20 · 1e20, opposite signs) is refused by the output's scan, naming it; a
    kernel with fused multiply-adds (AVX-512) makes them inf, not NaN, whose norm was refused for its squares."""
    base = save_file({"lin.weight": torch.ones(4, 6) if transposed else torch.ones(6, 4)},
                     str(tmp_path / "m.safetensors")) or tmp_path / "m.safetensors"
    module = LoraModule("lin", torch.full((2, 4), 1e20), torch.tensor([[1e20, -1e20]] * 6), alpha=1.0, scale=1.0,
                        magnitude=torch.ones(6), fan_in_fan_out=transposed)
    with pytest.raises(InvalidInputError, match="'lin.weight' comes out with inf or NaN values that the exact merge "
                                               "does not make: its deltas go beyond what "
                                                "float32 holds as they are merged"):
        engine.merge(base, [(Adapter({"lin": module}, "peft"), 1.0)], tmp_path / "out.safetensors", device="cpu")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.no_registry
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merge_is_the_cpu_merge(tmp_path):
    base = tiny_gpt2(tmp_path / "gpt2")
    folder = dora(base, tmp_path / "a", target_modules=GPT2_TARGETS, fan_in_fan_out=True)
    adapter = formats.read_adapter(folder)
    for device in ("cpu", "cuda"):
        engine.merge(base, [(adapter, 0.8)], tmp_path / device, device=device, fingerprint=False)
    cpu, cuda = merged_tensors(tmp_path / "cpu"), merged_tensors(tmp_path / "cuda")
    assert all(int(ulps(cpu[n], cuda[n]).max()) <= 2 for n in cpu)


# -- the command line ---------------------------------------------------------------------------------------------
def run(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def one_line_error(code: int, output: str, pattern: str, exit_code: int = 2) -> None:
    import re

    assert code == exit_code and output.count("\n") == 1 and output.startswith("error: "), output
    assert re.search(pattern, output), output


def test_cli_merge_check_show_and_subtract(tmp_path, llama32, llama_dora):
    """merge and check a DoRA adapter; show/list/inspect say DoRA; subtract refuses it and --exact restores."""
    code, out = run("inspect", llama_dora, "--json")
    assert code == 0 and json.loads(out)["dora"] is True
    code, out = run("register", llama_dora, "--name", "d")
    assert code == 0 and "peft DoRA" in out
    assert run("check", "d", "--base", llama32)[0] == 0
    code, out = run("merge", "d", "--into", llama32, "-o", tmp_path / "m")
    assert code == 0, out
    code, out = run("show", "d")
    assert "variant" in out and "DoRA" in out
    assert json.loads(run("list", "--json")[1])[0]["dora"] is True
    one_line_error(*run("subtract", "d", "--from", tmp_path / "m", "-o", tmp_path / "r"),
                   "a DoRA adapter cannot be subtracted: .* --exact restores")
    assert not (tmp_path / "r").exists()
    code, out = run("subtract", "d", "--from", tmp_path / "m", "-o", tmp_path / "r", "--exact")
    assert code == 0, out
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == (llama32 / "model.safetensors").read_bytes()



def test_cli_subtract_of_an_adapter_a_dora_one_was_merged_after_is_refused(tmp_path, llama32, llama_dora):
    """merge P D writes f ⊙ (W + Δ_P + Δ_D), f = m/‖W + Δ_D‖: taking Δ_P off leaves (f − 1)·Δ_P, which is not
    merge D. The recorded lineage (of the model, or of the merges it was made from) says a DoRA adapter came after P:
    refused, and --exact gives merge D bit for bit. With D first (f ⊙ (W + Δ_D) + Δ_P) taking P off is exact."""
    plain = peft_adapter(llama32, tmp_path / "p", seed=3, r=4, target_modules=["q_proj", "up_proj"])
    assert run("merge", plain, llama_dora, "--into", llama32, "-o", tmp_path / "m")[0] == 0
    after = "was merged with the DoRA adapter .*/a:1 after it"
    one_line_error(*run("subtract", plain, "--from", tmp_path / "m", "-o", tmp_path / "s"), after)
    assert not (tmp_path / "s").exists()
    assert run("merge", llama_dora, "--into", llama32, "-o", tmp_path / "d", "--no-record")[0] == 0
    assert run("subtract", plain, "--from", tmp_path / "m", "-o", tmp_path / "e", "--exact")[0] == 0
    assert (tmp_path / "e" / "model.safetensors").read_bytes() == (tmp_path / "d" / "model.safetensors").read_bytes()
    # the DoRA adapter merged into a merge of P: the same, one merge further down
    assert run("merge", plain, "--into", llama32, "-o", tmp_path / "p1")[0] == 0
    assert run("merge", llama_dora, "--into", tmp_path / "p1", "-o", tmp_path / "p2")[0] == 0
    one_line_error(*run("subtract", plain, "--from", tmp_path / "p2", "-o", tmp_path / "s"), after)
    assert run("merge", llama_dora, plain, "--into", llama32, "-o", tmp_path / "dp")[0] == 0
    assert run("subtract", plain, "--from", tmp_path / "dp", "-o", tmp_path / "s")[0] == 0
    assert torch.allclose(merged_tensors(tmp_path / "s")["model.layers.0.self_attn.q_proj.weight"],
                          merged_tensors(tmp_path / "d")["model.layers.0.self_attn.q_proj.weight"], rtol=0, atol=1e-6)

def test_cli_combine_and_kohya_export_are_refused(tmp_path, llama32, llama_dora):
    plain = peft_adapter(llama32, tmp_path / "p", seed=3)
    one_line_error(*run("combine", plain, llama_dora, "-o", tmp_path / "c"), "is a DoRA adapter.*combine refuses it")
    one_line_error(*run("export", llama_dora, "--format", "kohya", "-o", tmp_path / "k.safetensors"),
                   "cannot be written as kohya")
    assert not (tmp_path / "c").exists() and not (tmp_path / "k.safetensors").exists()
    assert json.loads(run("list", "--json")[1]) == []  # combine took back what it registered


def bad_magnitude(folder: Path, out: Path, value) -> Path:
    """A copy of a DoRA folder with one module's magnitude replaced."""
    out.mkdir()
    (out / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    tensors[key] = value(tensors[key])
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("value, message", [
    (lambda m: m[:-1], "DoRA magnitude .*lora_magnitude_vector is 63 float32, not 64 floating point"),
    (lambda m: torch.where(torch.arange(m.numel()) == 3, float("nan"), m), "lora_magnitude_vector' contains NaN"),
], ids=["wrong_length", "nan"])
def test_cli_malformed_magnitude_is_one_line(tmp_path, llama32, llama_dora, value, message):
    bad = bad_magnitude(llama_dora, tmp_path / "bad", value)
    one_line_error(*run("merge", bad, "--into", llama32, "-o", tmp_path / "out", "--no-record"), message)
    one_line_error(*run("register", bad), message)
    assert not (tmp_path / "out").exists()


def test_cli_check_against_another_base_fails(tmp_path, llama_dora):
    other = tiny_llama(tmp_path / "other", hidden=32, intermediate=64)
    code, out = run("check", llama_dora, "--base", other)
    assert code == 2 and "does not fit" in out


def test_register_export_round_trip_keeps_every_tensor(tmp_path, llama_dora):
    assert run("register", llama_dora, "--name", "d")[0] == 0
    code, out = run("export", "d", "--format", "peft", "-o", tmp_path / "e")
    assert code == 0, out
    before, after = load_file(llama_dora / "adapter_model.safetensors"), load_file(tmp_path / "e" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "e" / "adapter_config.json").read_text())["use_dora"] is True


@pytest.mark.no_registry
def test_diffusers_file_round_trip(tmp_path):
    """A diffusers file (component-prefixed PEFT keys, the config in its header) carries DoRA the same way."""
    folder = perturb_magnitudes(conv_peft_adapter(tmp_path / "a", use_dora=True, target_modules=["proj", "conv3"]))
    tensors = {k.replace("base_model.model.", "unet."): v for k, v in load_file(folder / "adapter_model.safetensors").items()}
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_dora": True}
    save_file(tensors, str(tmp_path / "d.safetensors"), {"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    adapter = formats.read_adapter(tmp_path / "d.safetensors")
    assert adapter.format == "diffusers" and adapter.dora
    formats.write_adapter(adapter, tmp_path / "again.safetensors", "diffusers")
    again = load_file(tmp_path / "again.safetensors")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert formats.read_adapter(tmp_path / "again.safetensors").dora
    config["unet.use_dora"] = False  # (a component without lora_alpha, alpha = r: the other way to its config)
    del config["unet.lora_alpha"]
    save_file(tensors, str(tmp_path / "no.safetensors"), {"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    with pytest.raises(InvalidInputError, match="has a DoRA magnitude .* but the config says use_dora: false"):
        formats.read_adapter(tmp_path / "no.safetensors")


@pytest.mark.no_registry
def test_diffusers_components_each_have_their_own_use_dora(tmp_path):
    """A diffusers file packs one LoraConfig per component, and diffusers loads each with use_dora as its own keys say
    (peft_utils.get_peft_kwargs): a DoRA UNet beside a plain LoRA text encoder is read, merged per module, and written
    back as it was; only within one component is a partial DoRA refused."""
    dora_part = perturb_magnitudes(conv_peft_adapter(tmp_path / "d", use_dora=True, target_modules=["proj", "conv3"]))
    plain_part = conv_peft_adapter(tmp_path / "p", seed=2, target_modules=["proj"])
    tensors = {k.replace("base_model.model.", "unet."): v for k, v in load_file(dora_part / "adapter_model.safetensors").items()}
    tensors.update({k.replace("base_model.model.", "text_encoder."): v
                    for k, v in load_file(plain_part / "adapter_model.safetensors").items()})
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_dora": True,
              "text_encoder.r": 4, "text_encoder.lora_alpha": 8, "text_encoder.use_dora": False}
    save_file(tensors, str(tmp_path / "mixed.safetensors"), {"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    adapter = formats.read_adapter(tmp_path / "mixed.safetensors")
    assert {name: m.dora for name, m in adapter.modules.items()} == {"unet.proj": True, "unet.conv3": True,
                                                                   "text_encoder.proj": False}
    formats.write_adapter(adapter, tmp_path / "again.safetensors", "diffusers")
    again = load_file(tmp_path / "again.safetensors")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    del tensors["unet.conv3.lora_magnitude_vector"]
    config.pop("unet.use_dora")
    save_file(tensors, str(tmp_path / "partial.safetensors"), {"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    with pytest.raises(InvalidInputError, match="only some modules carry a DoRA magnitude .*'unet.conv3' has none"):
        formats.read_adapter(tmp_path / "partial.safetensors")


def test_push_card_says_dora(llama_dora):
    """The model card pushed with a DoRA adapter says so (a "dora" tag, a variant row): rank and alpha alone describe
    a plain LoRA, which a reader would merge as W + s·B·A."""
    from loraops import hub
    from loraops.registry import Registry

    with Registry.open() as reg:
        record = reg.register_adapter(str(llama_dora), name="d").record
        card = hub.render_card(hub.card_info(reg, record, "peft"))
    front, body = card.split("---\n")[1], card.split("---\n")[2]
    assert '- "dora"' in front and "| variant | DoRA: a magnitude per output channel" in body
