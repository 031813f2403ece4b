"""Merge math: parity with PEFT's merge_and_unload and with a float64 reference, for every layer kind."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine_helpers import adapter_of, reference64, ulps
from factories import (conv_embedding_model, load_model, peft_adapter, peft_delta_weights, roberta_classifier_adapter,
                       save_state_dict, tiny_gpt2, tiny_llama, tiny_transformers)
from loraops import engine, formats
from loraops.adapter import LoraModule
from loraops.basemodel import BaseModel
from loraops.errors import InvalidInputError, MismatchError

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass


def merged_tensors(path) -> dict[str, torch.Tensor]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def assert_parity(ours: dict, peft_state: dict, base_state: dict, terms: dict[str, list], reference=reference64):
    """Every merged bf16/fp16 tensor within one unit of rounding of the output dtype from PEFT's, and at least as close as
    PEFT's to the float64 reference. The unit is taken at the magnitude of the operands (max |W|, |ΔW|, |W'|): where W + ΔW
    cancels to almost nothing, float32 arithmetic (PEFT's and ours) cannot be exact to the tiny result's last bit.
    ``reference(base tensor, [(module, weight)])`` is the float64 result (DoRA's: engine_helpers.dora_reference64)."""
    assert terms
    for name, module_terms in terms.items():
        mine, theirs = ours[name], peft_state[name].to(ours[name].dtype)
        exact = reference(base_state[name], module_terms)
        w = base_state[name].double()
        scale = torch.stack([w.abs(), (exact - w).abs(), mine.double().abs(), theirs.double().abs()]).amax(0)
        if mine.dtype != torch.float32:
            # A float32 output carries float32 matmul error on both sides (several units where the factors are
            # large): there the float64 comparison below is the meaningful check.
            assert bool(((mine.double() - theirs.double()).abs() <= unit_of_rounding(scale, mine.dtype)).all()), name
        my_err, peft_err = (mine.double() - exact).abs(), (theirs.double() - exact).abs()
        # float32 accumulation then one rounding can, very rarely, land on a tie of the output dtype (PEFT shares
        # this): a relative slack of 1e-6 on the aggregates absorbs those single elements. In a float32 output both
        # errors are float32 matmul noise, whose mean over a few hundred elements is a coin flip: compare the max.
        assert float(my_err.max()) <= float(peft_err.max()) * (1 + 1e-6), name
        if mine.dtype != torch.float32:
            assert float(my_err.mean()) <= float(peft_err.mean()) * (1 + 1e-6), name


def unit_of_rounding(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s values at each magnitude (its ulp there)."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(magnitude.clamp_min(info.tiny))
    return torch.ldexp(torch.full_like(magnitude, info.eps), exponent - 1)


def peft_case(tmp_path, base, adapters: dict[str, dict], weights: dict[str, float]):
    """Load `adapters` (name → peft_adapter kwargs) onto `base` with PEFT; return (our merge, PEFT's merge, base state,
    terms per tensor).

    Several adapters: PEFT's exact combination is add_weighted_adapter(combination_type='cat') (its 'linear' mixes
    A's and B's and adds cross terms). On a bf16 model, cat stores the weighted factors wᵢ·sᵢ·Aᵢ in bf16 before
    multiplying, an extra rounding unrelated to merging, so the reference runs PEFT in float32 (the bf16 weights
    upcast exactly) and compares after one rounding."""
    from peft import PeftModel

    dirs = {name: peft_adapter(base, tmp_path / name, seed=i + 1, **kw) for i, (name, kw) in enumerate(adapters.items())}
    names = list(adapters)
    model = load_model(base, torch.float32) if len(names) > 1 else load_model(base)
    model = PeftModel.from_pretrained(model, dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    canon = {name: formats.read_adapter(dirs[name]) for name in names}
    base_state = merged_tensors(base)
    report = engine.merge(base, [(canon[n], weights[n]) for n in names], tmp_path / "out", device="cpu")
    if len(names) > 1:
        model.add_weighted_adapter(names, [weights[n] for n in names], "mix", combination_type="cat")
        model.set_adapter("mix")
        peft_state = model.merge_and_unload(adapter_names=["mix"]).state_dict()
    else:
        assert weights[names[0]] == 1
        peft_state = model.merge_and_unload().state_dict()
    terms: dict[str, list] = {}
    for name in names:
        for module in canon[name].modules.values():
            terms.setdefault(module.weight_name, []).append((module, weights[name]))
    assert report.tensors_merged == len(terms)
    return merged_tensors(tmp_path / "out"), peft_state, base_state, terms


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama") / "base", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def llama_fp32(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama32") / "base")


@pytest.mark.parametrize("kwargs", [{}, {"use_rslora": True}, {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 3}}],
                         ids=["classic", "rslora", "rank_pattern"])
def test_llama_bf16_matches_peft(tmp_path, llama_bf16, kwargs):
    ours, peft_state, base_state, terms = peft_case(tmp_path, llama_bf16, {"a": kwargs}, {"a": 1.0})
    assert_parity(ours, peft_state, base_state, terms)
    assert all(t.dtype == torch.bfloat16 for t in ours.values())


def test_llama_fp32_matches_peft(tmp_path, llama_fp32):
    ours, peft_state, base_state, terms = peft_case(tmp_path, llama_fp32, {"a": {"r": 4}}, {"a": 1.0})
    assert_parity(ours, peft_state, base_state, terms)


def test_weighted_adapters_with_negative_weight_match_peft_cat(tmp_path, llama_bf16):
    adapters = {"a": {"r": 8}, "b": {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}, "c": {"r": 2}}
    ours, peft_state, base_state, terms = peft_case(tmp_path, llama_bf16, adapters, {"a": 0.7, "b": -0.4, "c": 0.25})
    assert_parity(ours, peft_state, base_state, terms)


@pytest.mark.parametrize("cross_attention", [False, True])
def test_gpt2_fan_in_fan_out_matches_peft(cross_attention, tmp_path):
    """GPT-2's Conv1D layers, with cross-attention (a GPT-2 decoder of an encoder-decoder model) its square q_attn too,
    which only its name tells from an nn.Linear (formats.common.CONV1D_LAYERS)."""
    if cross_attention:
        base = tiny_transformers(tmp_path / "gpt2", "gpt2", "GPT2LMHeadModel", n_embd=64, n_layer=2, n_head=4,
                                 vocab_size=128, n_positions=64, add_cross_attention=True)
    else:
        base = tiny_gpt2(tmp_path / "gpt2")
    kwargs = {"target_modules": ["c_attn", "c_proj", "c_fc", *(["q_attn"] if cross_attention else [])],
              "fan_in_fan_out": True}
    ours, peft_state, base_state, terms = peft_case(tmp_path, base, {"a": kwargs}, {"a": 1.0})
    assert any(m.fan_in_fan_out for ts in terms.values() for m, _ in ts)
    assert_parity(ours, peft_state, base_state, terms)
    for name in terms:  # (the parity's reference is our modules': it cannot see an orientation they all share)
        torch.testing.assert_close(ours[name], peft_state[name], rtol=0, atol=1e-5, msg=name)


class LinearsNamedLikeConv1D(torch.nn.Module):
    """Qwen-1's attention: nn.Linear layers under Conv1D's names, c_attn widening (stored out×in, the larger dimension
    first: no Conv1D layout, check.conv1d_layout) and a square c_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.c_attn = torch.nn.Linear(16, 48)
        self.attn.c_proj = torch.nn.Linear(16, 16)


@pytest.mark.parametrize("model", ["llama", "linears-named-like-conv1d"])
def test_fan_in_fan_out_set_by_hand_on_linear_layers_is_reset_as_peft_does(model, tmp_path):
    """fan_in_fan_out: true set by hand in the config of an adapter on nn.Linear layers: PEFT sets it false for each
    (a warning) and merges B·A; loraops added (B·A)ᵀ to the square ones (the shape corrected only the others), read
    so (Llama's q_proj: its delta unbound, as a kohya export without a base writes it, too) or bound so (a square
    Linear named c_proj, as Conv1D layers are named)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    if model == "llama":
        base, targets = tiny_llama(tmp_path / "base"), ["q_proj", "k_proj"]
        fresh = lambda: load_model(base)  # noqa: E731
    else:
        base, targets = save_state_dict(LinearsNamedLikeConv1D(), tmp_path / "base.safetensors"), ["c_attn", "c_proj"]

        def fresh():
            linears = LinearsNamedLikeConv1D()
            linears.load_state_dict(load_file(base))
            return linears
    get_peft_model(fresh(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
                   ).save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": True}))
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        peft_model = PeftModel.from_pretrained(fresh(), tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    if model == "llama":
        deltas = peft_delta_weights(peft_model)
        for name, module in adapter.modules.items():
            torch.testing.assert_close(module.delta(), deltas[name], rtol=0, atol=1e-6, msg=name)
    out = tmp_path / ("out" if model == "llama" else "out.safetensors")
    engine.merge(base, [(adapter, 1.0)], out, device="cpu")
    ours, expected, original = merged_tensors(out), peft_model.merge_and_unload().state_dict(), merged_tensors(base)
    assert sum(not torch.equal(ours[n], original[n]) for n in ours) == (4 if model == "llama" else 2)
    for name in ours:
        torch.testing.assert_close(ours[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_embedding_and_conv_kinds_match_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = conv_embedding_model()
    base = save_state_dict(model, tmp_path / "tiny.safetensors")
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=6, init_lora_weights=False,
                                                  target_modules=["embed", "proj", "conv1", "conv3"]))
    adapter = adapter_of(peft_model)
    assert {m.kind for m in adapter.modules.values()} == {"embedding", "linear", "conv"}
    report = engine.merge(base, [(adapter, 1.0)], tmp_path / "out.safetensors", device="cpu")
    assert report.tensors_merged == 4 and report.tensors_copied == 3  # the three biases, untouched
    ours = load_file(tmp_path / "out.safetensors")
    peft_state = peft_model.merge_and_unload().state_dict()
    terms = {m.weight_name: [(m, 1.0)] for m in adapter.modules.values()}
    assert_parity(ours, peft_state, load_file(base), terms)
    for bias in ("proj.bias", "conv1.bias", "conv3.bias"):
        assert torch.equal(ours[bias], load_file(base)[bias])


def test_conv_kxk_merge_equals_composed_convolutions(tmp_path):
    torch.manual_seed(0)
    W, A, B = torch.randn(6, 8, 3, 3), torch.randn(3, 8, 3, 3), torch.randn(6, 3, 1, 1)
    base = save_state_dict_dict({"conv.weight": W}, tmp_path / "conv.safetensors")
    module = LoraModule("conv", A, B, alpha=6.0, scale=2.0, kind="conv")
    engine.merge(base, [(_adapter(module), 0.5)], tmp_path / "out.safetensors", device="cpu", precise=True)
    merged = load_file(tmp_path / "out.safetensors")["conv.weight"].double()
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    conv = torch.nn.functional.conv2d
    expected = conv(x, W.double(), padding=1) + 0.5 * 2.0 * conv(conv(x, A.double(), padding=1), B.double())
    assert torch.allclose(conv(x, merged, padding=1), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "fan_in_fan_out", "conv", "embedding"])
def test_row_chunks_sum_to_the_module_delta(kind, monkeypatch, tmp_path):
    """Tiny chunks force every tensor through many row chunks; the result equals delta() computed at once."""
    torch.manual_seed(1)
    shapes = {"linear": ((4, 12), (10, 4)), "fan_in_fan_out": ((4, 12), (10, 4)), "conv": ((4, 3, 3, 3), (10, 4, 1, 1)),
              "embedding": ((4, 12), (10, 4))}
    A, B = (torch.randn(s) for s in shapes[kind])
    module = LoraModule("m", A, B, alpha=8.0, scale=2.0, kind="linear" if kind == "fan_in_fan_out" else kind,
                        fan_in_fan_out=kind == "fan_in_fan_out")
    W = torch.randn(module.weight_shape)
    base = save_state_dict_dict({"m.weight": W}, tmp_path / "m.safetensors")
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 7)
    engine.merge(base, [(_adapter(module), -1.5)], tmp_path / "out.safetensors", device="cpu", precise=True)
    merged = load_file(tmp_path / "out.safetensors")["m.weight"]
    assert torch.allclose(merged.double(), W.double() - 1.5 * module.delta(dtype=torch.float64), atol=1e-6)


def test_a_3d_tensor_no_lora_changes_is_converted_in_bounded_chunks(monkeypatch, tmp_path):
    """--dtype converts every tensor; a fused experts tensor (E×X×Y) no LoRA changes is chunked by its last dimension,
    not one expert at a time (gpt-oss-120b's gate_up_proj: 16.6 M elements per expert)."""
    torch.manual_seed(2)
    A, B = torch.randn(2, 6), torch.randn(4, 2)
    experts = torch.randn(3, 8, 5)
    base = save_state_dict_dict({"m.weight": torch.randn(4, 6), "experts.gate_up_proj": experts}, tmp_path / "b.safetensors")
    seen = []
    steps = engine._steps

    def recorded(*args, **kwargs):
        for read in steps(*args, **kwargs):
            if isinstance(read, engine._Chunk):
                seen.append((read.row1 - read.row0) * read.tensor.row_elements)
            yield read

    monkeypatch.setattr(engine, "_steps", recorded)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 7)
    engine.merge(base, [(_adapter(LoraModule("m", A, B, alpha=2.0, scale=1.0)), 1.0)], tmp_path / "out.safetensors",
                 device="cpu", dtype="bf16")
    assert max(seen) <= 7
    assert torch.equal(load_file(tmp_path / "out.safetensors")["experts.gate_up_proj"], experts.to(torch.bfloat16))


def test_precise_is_at_least_as_close_as_float32(tmp_path, llama_bf16):
    from peft import PeftModel

    ad = peft_adapter(llama_bf16, tmp_path / "a", r=8)
    adapter = adapter_of(PeftModel.from_pretrained(load_model(llama_bf16), ad))
    engine.merge(llama_bf16, [(adapter, 1.0)], tmp_path / "f32", device="cpu")
    engine.merge(llama_bf16, [(adapter, 1.0)], tmp_path / "f64", device="cpu", precise=True)
    f32, f64, base = merged_tensors(tmp_path / "f32"), merged_tensors(tmp_path / "f64"), merged_tensors(llama_bf16)
    for module in adapter.modules.values():
        exact = reference64(base[module.weight_name], [(module, 1.0)])
        assert (f64[module.weight_name].double() - exact).abs().max() <= (f32[module.weight_name].double() - exact).abs().max()
        assert int(ulps(f32[module.weight_name], f64[module.weight_name]).max()) <= 1


def _adapter(*modules):
    from loraops.adapter import Adapter

    return Adapter({m.name: m for m in modules}, "peft")


def save_state_dict_dict(tensors: dict, path):
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


def test_pissa_adapter_refused_and_its_conversion_merges_like_peft(tmp_path):
    """PEFT takes a PiSSA adapter's initial principal part out of the base each time it loads it: W + s·B·A on the
    original base would be wrong, so loraops refuses it, naming PEFT's conversion; the converted adapter (a plain
    LoRA of rank 2r on the original base) merges to the trained model itself. (PEFT reloading the unconverted
    adapter does not even give that back: pissa_niter_* redoes a randomized SVD of the base.)"""
    from peft import LoraConfig, get_peft_model

    from loraops.errors import UnsupportedAdapterError

    base = tiny_llama(tmp_path / "base")
    model = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights="pissa_niter_4"))
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial factors first
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = "pissa_niter_4"
    torch.manual_seed(3)
    with torch.no_grad():  # "training"
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(tmp_path / "pissa")
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    with pytest.raises(UnsupportedAdapterError, match="path_initial_model_for_weight_conversion"):
        formats.read_adapter(tmp_path / "pissa")

    engine.merge(base, [(formats.read_adapter(tmp_path / "converted"), 1.0)], tmp_path / "out", device="cpu")
    trained = model.merge_and_unload().state_dict()
    ours, original = merged_tensors(tmp_path / "out"), merged_tensors(base)
    changed = [n for n in ours if not torch.equal(ours[n], original[n])]
    assert len(changed) == 4  # q_proj and v_proj of both layers
    for name in ours:
        torch.testing.assert_close(ours[name], trained[name], rtol=0, atol=1e-6)


def test_gpt2_conv1d_orientation_comes_from_the_base_not_the_saved_flag(tmp_path):
    """PEFT decides fan_in_fan_out per layer (Conv1D: yes, nn.Linear: no) but saves one value, the last layer's: a
    GPT-2 adapter on c_attn, attn.c_proj (square) and lm_head is saved with false. Read with that config, and as a
    bare file with no config at all, it merges like PEFT's model — the square Conv1D transposed too."""
    import json
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, tie_word_embeddings=False)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base", safe_serialization=True)
    model = get_peft_model(load_model(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*(c_attn|attn\.c_proj|lm_head)", init_lora_weights=False))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=False)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    shutil.copy(tmp_path / "a" / "adapter_model.safetensors", tmp_path / "bare.safetensors")
    peft_state = model.merge_and_unload().state_dict()
    base_state = merged_tensors(tmp_path / "base")
    for name, adapter in (("config", formats.read_adapter(tmp_path / "a")),
                          ("bare", formats.read_adapter(tmp_path / "bare.safetensors", alpha=8))):
        engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / name, device="cpu")
        ours = merged_tensors(tmp_path / name)
        changed = [n for n in ours if not torch.equal(ours[n], base_state[n])]
        assert len(changed) == 5, (name, changed)  # c_attn and attn.c_proj of 2 layers, lm_head
        for tensor in ours:
            torch.testing.assert_close(ours[tensor], peft_state[tensor], rtol=0, atol=1e-6)


def test_peft_saved_embedding_layer_merges_like_peft(tmp_path):
    """PEFT saves the whole embedding weight with an embedding LoRA by default (save_embedding_layers): unchanged
    from the base it is nothing to replace, so the adapter merges with any weight; changed (here: edited in the file,
    as after resizing or training the embeddings) it is the new value under the LoRA, as PEFT loads it, and only
    weight 1 is defined."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import save_file

    from loraops.errors import InvalidInputError

    base = tiny_llama(tmp_path / "base")
    torch.manual_seed(4)
    model = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                                        init_lora_weights=False))
    model.save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    saved = load_file(weights)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in saved
    original = merged_tensors(base)

    adapter = formats.read_adapter(tmp_path / "a")
    assert list(adapter.full_tensors) == ["model.embed_tokens.weight"]
    engine.merge(base, [(adapter, 1.0)], tmp_path / "one", device="cpu")
    peft_state = model.merge_and_unload().state_dict()
    ours = merged_tensors(tmp_path / "one")
    for name in ours:
        torch.testing.assert_close(ours[name], peft_state[name], rtol=0, atol=1e-6)
    engine.subtract(tmp_path / "one", [(adapter, 1.0)], tmp_path / "back", device="cpu")  # the saved layer ≠ merged
    for name, tensor in merged_tensors(tmp_path / "back").items():
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=1e-6)
    half = engine.merge(base, [(adapter, 0.5)], tmp_path / "half", device="cpu")
    assert half.tensors_replaced == 0
    embed = adapter.modules["model.embed_tokens"]
    torch.testing.assert_close(merged_tensors(tmp_path / "half")["model.embed_tokens.weight"],
                               original["model.embed_tokens.weight"] + 0.5 * embed.delta(), rtol=0, atol=1e-6)

    rounded = dict(saved, **{key: saved[key].to(torch.bfloat16)})  # saved by a bf16 training run: the base, rounded
    save_file(rounded, str(weights), metadata={"format": "pt"})
    assert engine.merge(base, [(formats.read_adapter(tmp_path / "a"), 0.5)], tmp_path / "bf16", device="cpu").tensors_replaced == 0

    saved[key] = saved[key] + 0.25
    save_file(saved, str(weights), metadata={"format": "pt"})
    edited = formats.read_adapter(tmp_path / "a")
    report = engine.merge(base, [(edited, 1.0)], tmp_path / "edited", device="cpu")
    assert report.tensors_replaced == 1
    peft_state = PeftModel.from_pretrained(load_model(base), tmp_path / "a").merge_and_unload().state_dict()
    ours = merged_tensors(tmp_path / "edited")
    for name in ours:
        torch.testing.assert_close(ours[name], peft_state[name], rtol=0, atol=1e-6)
    with pytest.raises(InvalidInputError, match="cannot be applied with weight 0.5"):
        engine.merge(base, [(edited, 0.5)], tmp_path / "no", device="cpu")

    back = formats.read_adapter(formats.write_adapter(edited, tmp_path / "written"))
    assert torch.equal(back.full_tensors["model.embed_tokens.weight"], edited.full_tensors["model.embed_tokens.weight"])
    assert formats.peft.load_config(tmp_path / "written" / "adapter_config.json")["bias"] == "none"


def tied_base_stored_twice(path):
    """A tied Llama (tie_word_embeddings) saved with lm_head.weight too, a byte-identical copy of the embeddings, as
    some exporters write it; returns its state."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)).save_pretrained(path)
    state = load_file(path / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return state


def test_a_tied_parameter_stored_twice_gets_the_delta_in_the_embeddings_only(tmp_path):
    """A tied model (tie_word_embeddings) whose file also holds lm_head.weight, a byte-identical copy of the
    embeddings (some exporters write it), and a LoRA on the embeddings only: PEFT's adapted model changes their
    lookup only, its head reads the base weight; so the head copy keeps it and the model comes out untied
    (tests/test_tied_embeddings.py compares the logits)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    state = tied_base_stored_twice(tmp_path / "base")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=False)
    adapter = formats.read_adapter(tmp_path / "a")
    engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", device="cpu")
    ours = merged_tensors(tmp_path / "out")
    assert torch.equal(ours["lm_head.weight"], state["lm_head.weight"])
    shared = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "a")
    expected = shared.merge_and_unload().state_dict()["model.embed_tokens.weight"]
    torch.testing.assert_close(ours["model.embed_tokens.weight"], expected, rtol=0, atol=1e-6)


def test_tensors_equal_by_coincidence_are_not_one_parameter(tmp_path):
    """Only a tied head and its input embeddings are copies of one parameter (_stored_twice): tensors a model stores
    byte-identical by coincidence (two layers' q_proj alike, every RMSNorm's weight of ones beside a head stored
    twice) each keep their own changes: a LoRA on one layer's q_proj and a modules_to_save copy of the final norm
    reach nothing else, as in PEFT's merge_and_unload."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    state = tied_base_stored_twice(tmp_path / "base")
    state["model.layers.1.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"].clone()
    save_file(state, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    norms = [name for name in state if name.endswith("norm.weight")]
    assert len(norms) > 1 and all(torch.equal(state[name], torch.ones_like(state[name])) for name in norms)
    torch.manual_seed(1)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], layers_to_transform=[0], modules_to_save=["norm"],
        init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.model.norm.modules_to_save["default"].weight.mul_(3)
    model.save_pretrained(tmp_path / "a")
    engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", device="cpu")
    ours = merged_tensors(tmp_path / "out")
    expected = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "a") \
        .merge_and_unload().state_dict()
    for name in [*norms, "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]:
        torch.testing.assert_close(ours[name], expected[name], rtol=0, atol=1e-6)
    assert torch.equal(ours["model.layers.1.self_attn.q_proj.weight"], state["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(ours["model.norm.weight"], 3 * state["model.norm.weight"])
    assert sum(not torch.equal(ours[name], state[name]) for name in norms) == 1


def tied_llama(path, **save):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)).save_pretrained(path, **save)
    return path


@pytest.mark.parametrize("case", ["head-not-stored", "sharded", "tied-adapters", "head-stored-twice"])
def test_a_lora_on_a_tied_head_is_merged_untied_and_exact(tmp_path, case):
    """A LoRA on the output head of a tied model (tie_word_embeddings): the adapter's model computes its head from
    the embeddings' old values plus the head's delta, and its embeddings with their own delta only. PEFT's
    merge_and_unload adds both into the one shared tensor, so its merged model computes something else (it warns);
    ours writes the head as its own tensor, unties config.json, and computes what the adapter's model computes."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    base = tmp_path / "base"
    tied_base_stored_twice(base) if case == "head-stored-twice" else tied_llama(
        base, **({"max_shard_size": "40KB"} if case == "sharded" else {}))
    targets = {"head-not-stored": ["q_proj", "lm_head"], "sharded": ["q_proj", "lm_head"],
               "tied-adapters": ["embed_tokens", "lm_head"], "head-stored-twice": ["lm_head"]}[case]
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, ensure_weight_tying=case == "tied-adapters"))
    model.save_pretrained(tmp_path / "a")
    tokens = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "a")(tokens).logits
        peft_merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "a").merge_and_unload()
        assert (peft_merged(tokens).logits - expected).abs().max() > 1  # why we do not merge into the shared tensor
    report = engine.merge(base, [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", device="cpu")
    assert report.heads_untied == ["lm_head.weight"]
    assert report.fingerprint == BaseModel.open(tmp_path / "out").fingerprint()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    if case == "sharded":
        assert len(list(base.glob("*.safetensors"))) > 1
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert index["weight_map"]["lm_head.weight"] == index["weight_map"]["model.embed_tokens.weight"]
        assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in merged_tensors(tmp_path / "out").values())
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.lm_head.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, expected, rtol=0, atol=1e-4)

    adapter = formats.read_adapter(tmp_path / "a")
    restored = engine.subtract(tmp_path / "out", [(adapter, 1.0)], tmp_path / "restored", device="cpu")
    assert restored.heads_untied == []  # the merged model stores its head: a plain subtract
    if case != "head-stored-twice":
        with pytest.raises(InvalidInputError, match="ties its output head to 'model.embed_tokens.weight': there is no "
                                                    "head to take a LoRA off"):
            engine.subtract(base, [(adapter, 1.0)], tmp_path / "no", device="cpu")


def test_a_tied_head_lora_at_weight_zero_unties_nothing(tmp_path):
    from loraops.adapter import Adapter, LoraModule

    base = tied_llama(tmp_path / "base")
    head = LoraModule(name="lm_head", A=torch.randn(4, 64), B=torch.randn(100, 4), alpha=4.0, scale=1.0)
    report = engine.merge(base, [(Adapter(modules={"lm_head": head}, format="peft"), 0.0)], tmp_path / "out", device="cpu")
    assert report.heads_untied == [] and "lm_head.weight" not in merged_tensors(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("config, why", [
    ({"is_encoder_decoder": True}, "in an encoder-decoder model loraops does not untie"),
    ({"tie_word_embeddings": False}, "not in the base, and its config.json says tie_word_embeddings: false")])
def test_a_lora_on_the_tied_head_of_an_encoder_decoder_model_is_refused(tmp_path, config, why):
    """Some encoder-decoder models scale their decoder output by tie_word_embeddings (Switch Transformers, UDOP, T5
    before transformers 5): untying them would change what they compute. A head the base does not store whose config
    says it is untied is no tied head. check, given the config.json, says what merge says (it said "fits")."""
    from loraops import check
    from loraops.adapter import Adapter, LoraModule
    from loraops.basemodel import BaseModel

    base = tied_llama(tmp_path / "base")
    (base / "config.json").write_text(json.dumps({**json.loads((base / "config.json").read_text()), **config}))
    head = LoraModule(name="lm_head", A=torch.randn(4, 64), B=torch.randn(100, 4), alpha=4.0, scale=1.0)
    adapter = Adapter(modules={"lm_head": head}, format="peft")
    with pytest.raises(MismatchError, match=why):
        engine.merge(base, [(adapter, 1.0)], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    model = BaseModel.open(base)
    report = check.check(adapter, model.tensors, config=model.config)
    assert not report.ok and report.tied_heads == [] and report.missing == ["lm_head"]
    assert why in check.misfits(report)[0]
    assert check.check(adapter, model.tensors).ok  # (the manifest alone cannot tell)


@pytest.mark.parametrize("config, why", [
    ({"is_encoder_decoder": True}, "in an encoder-decoder model loraops does not untie"),
    ({"tie_word_embeddings": False}, "not in the base, and its config.json says tie_word_embeddings: false")])
@pytest.mark.parametrize("kind", ["modules_to_save", "trainable tokens"])
def test_a_saved_head_or_head_tokens_merge_will_not_untie_do_not_fit(tmp_path, config, why, kind):
    """A modules_to_save copy of a tied head the base does not store, or trainable tokens on it: check, given the
    config.json, says what merge says, as for a LoRA on the head."""
    from loraops import check
    from loraops.adapter import Adapter, TokenRows
    from loraops.basemodel import BaseModel

    base = tied_llama(tmp_path / "base")
    (base / "config.json").write_text(json.dumps({**json.loads((base / "config.json").read_text()), **config}))
    if kind == "modules_to_save":
        adapter = Adapter(modules={}, format="peft", full_tensors={"lm_head.weight": torch.randn(100, 64)})
    else:
        rows = TokenRows(name="lm_head.weight", indices=(3, 7), values=torch.randn(2, 64))
        adapter = Adapter(modules={}, format="peft", token_rows={"lm_head.weight": rows})
    with pytest.raises(MismatchError, match=why):
        engine.merge(base, [(adapter, 1.0)], tmp_path / "out", device="cpu")
    model = BaseModel.open(base)
    report = check.check(adapter, model.tensors, config=model.config)
    assert not report.ok and report.missing == ["lm_head.weight"] and why in check.misfits(report)[0]


def test_roberta_sequence_classification_head_merges_like_peft(tmp_path):
    """PEFT's sequence-classification recipe (task_type SEQ_CLS) saves the whole classifier head, a module with
    submodules (dense, out_proj), because modules_to_save=["classifier"] wraps it: loraops read those keys as an
    unknown layout."""
    _, _, model = roberta_classifier_adapter(tmp_path)
    adapter = formats.read_adapter(tmp_path / "a")
    assert sorted(adapter.full_tensors) == ["classifier.dense.bias", "classifier.dense.weight",
                                            "classifier.out_proj.bias", "classifier.out_proj.weight"]
    engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", device="cpu")
    peft_state = model.merge_and_unload().state_dict()
    ours = merged_tensors(tmp_path / "out")
    for name in ours:
        torch.testing.assert_close(ours[name], peft_state[name], rtol=0, atol=1e-6)


def test_conv1d_and_conv3d_loras_merge_like_peft(tmp_path):
    """PEFT's LoRA on Conv1d (Whisper's audio stem) and Conv3d: A r×in×k…, B out×r×1…, delta the composition."""
    from peft import LoraConfig, get_peft_model

    class Convs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv1d(6, 8, 3, padding=1)
            self.conv3 = torch.nn.Conv3d(4, 5, (3, 2, 2))

    torch.manual_seed(0)
    model = Convs()
    base = save_state_dict(model, tmp_path / "convs.safetensors")
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "conv3"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    assert {n: m.kind for n, m in adapter.modules.items()} == {"conv1": "conv", "conv3": "conv"}
    engine.merge(base, [(adapter, 1.0)], tmp_path / "out.safetensors", device="cpu")
    ours = merged_tensors(tmp_path / "out.safetensors")
    peft_state = peft_model.merge_and_unload().state_dict()
    for name in ours:
        torch.testing.assert_close(ours[name], peft_state[name], rtol=0, atol=1e-6)
    x = torch.randn(1, 6, 5)
    reference = torch.nn.functional.conv1d(torch.nn.functional.conv1d(x, adapter.modules["conv1"].A, padding=1),
                                           adapter.modules["conv1"].B) * adapter.modules["conv1"].scale
    delta = ours["conv1.weight"] - merged_tensors(base)["conv1.weight"]
    torch.testing.assert_close(torch.nn.functional.conv1d(x, delta, padding=1), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "gpt_neox"])
def test_modules_transformers_renames_in_memory_bind_to_their_saved_names(tmp_path, family):
    """transformers 5 loads LLaVA-style VLMs and GPT-NeoX under other module names than it saves
    (model.language_model.… ↔ language_model.model.…, lm_head ↔ embed_out); PEFT names the adapter's modules as
    in memory. Merged by their saved names, the output loads as PEFT's merged model."""
    from peft import LoraConfig, get_peft_model
    from transformers import (CLIPVisionConfig, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    torch.manual_seed(0)
    if family == "llava":
        cls = LlavaForConditionalGeneration
        config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                            num_attention_heads=4, image_size=32, patch_size=8),
                             text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100),
                             image_token_index=99)
        targets = ["q_proj", "v_proj", "linear_1", "lm_head"]
    else:
        cls = GPTNeoXForCausalLM
        config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=100)
        targets = ["query_key_value", "lm_head"]
    cls(config).save_pretrained(tmp_path / "base")
    model = get_peft_model(cls.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(tmp_path / "a")
    engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", device="cpu")
    ours = cls.from_pretrained(tmp_path / "out").state_dict()
    peft_state = model.merge_and_unload().state_dict()
    assert ours.keys() == peft_state.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], peft_state[name], rtol=0, atol=1e-6)


def test_a_tensor_replaced_by_one_adapter_and_changed_by_another_is_refused(tmp_path):
    """A modules_to_save value from one adapter and another adapter's LoRA on the same tensor: that LoRA was
    trained on a different tensor, so no merge of the two is defined (the same adapter's LoRA on its own saved
    layer is: see the embedding-layer test)."""
    from loraops.adapter import Adapter
    from loraops.errors import InvalidInputError

    base = tiny_llama(tmp_path / "base")
    lora = formats.read_adapter(peft_adapter(base, tmp_path / "a", target_modules=["q_proj"]))
    name = "model.layers.0.self_attn.q_proj.weight"
    saved = Adapter(modules={}, format="peft", full_tensors={name: torch.zeros(64, 64)})
    with pytest.raises(InvalidInputError, match="replaced by one adapter .* and changed by another's LoRA"):
        engine.merge(base, [(saved, 1.0), (lora, 1.0)], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_a_tied_parameter_stored_twice_keeps_the_heads_copy_under_modules_to_save(tmp_path):
    """modules_to_save on embed_tokens of a tied model whose file also holds lm_head.weight: PEFT wraps a copy of the
    embeddings and its head reads the base weight, so the head's copy keeps the base's values and the config unties
    them (logits against PEFT: test_tied_embeddings.test_modules_to_save_on_the_embeddings)."""
    from loraops.adapter import Adapter

    state = tied_base_stored_twice(tmp_path / "base")
    new = torch.randn(100, 64)
    saved = Adapter(modules={}, format="peft", full_tensors={"model.embed_tokens.weight": new})
    report = engine.merge(tmp_path / "base", [(saved, 1.0)], tmp_path / "out", device="cpu")
    ours = merged_tensors(tmp_path / "out")
    assert report.heads_untied == ["lm_head.weight"]
    assert torch.equal(ours["model.embed_tokens.weight"], new) and torch.equal(ours["lm_head.weight"], state["lm_head.weight"])
