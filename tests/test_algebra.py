"""algebra.combine / algebra.resize: validation, and agreement with PEFT on real PEFT adapters."""
import pytest
import torch

from factories import lora_adapter, peft_adapter, tiny_llama
from loraops.algebra import combine, resize
from loraops.errors import InvalidInputError, MismatchError
from loraops.formats import kohya_name, read_adapter, write_adapter

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass

SHAPES = {"m.q": (12, 20), "m.v": (8, 20)}


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-pair")
    base = tiny_llama(root / "base")
    a = peft_adapter(base, root / "a", seed=1, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    b = peft_adapter(base, root / "b", seed=2, r=6, alpha=3, target_modules=["q_proj", "v_proj", "down_proj"])
    return base, a, b


def _peft_combined(base, a, b, weights, **kwargs):
    from peft import PeftModel

    from factories import load_model

    model = PeftModel.from_pretrained(load_model(base), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, "c", **kwargs)
    return {name.removeprefix("base_model.model."): layer.get_delta_weight("c").detach()
            for name, layer in model.named_modules() if hasattr(layer, "lora_A") and "c" in layer.lora_A}


def _weighted_sum(inputs):
    out = {}
    for adapter, weight in inputs:
        for name, module in adapter.modules.items():
            out[name] = out.get(name, 0) + weight * module.delta(dtype=torch.float64)
    return out


@pytest.mark.parametrize("method, peft_kwargs", [("cat", {"combination_type": "cat"}),
                                                 ("svd", {"combination_type": "svd", "svd_rank": 10})])
def test_cat_and_svd_match_peft(peft_pair, method, peft_kwargs):
    base, a, b = peft_pair
    inputs = [(read_adapter(a), 0.7), (read_adapter(b), -0.5)]
    ours, _ = combine(inputs, method, rank=10 if method == "svd" else None, device="cpu")
    theirs = _peft_combined(base, a, b, [0.7, -0.5], **peft_kwargs)
    truth = _weighted_sum(inputs)
    assert set(ours.modules) == set(theirs) == set(truth)  # down_proj only in b: zero delta from a
    for name, delta in theirs.items():
        torch.testing.assert_close(ours.modules[name].delta(), delta, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.modules[name].delta(dtype=torch.float64), truth[name], rtol=1e-5, atol=1e-6)


def test_peft_linear_is_not_the_weighted_delta(peft_pair):
    base, a, _ = peft_pair
    # PEFT's linear needs equal ranks: combine a with a second rank-4 adapter
    c = peft_adapter(base, a.parent / "c", seed=5, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    inputs = [(read_adapter(a), 0.6), (read_adapter(c), 0.4)]
    ours, _ = combine(inputs, "linear", device="cpu")
    theirs = _peft_combined(base, a, c, [0.6, 0.4], combination_type="linear")
    truth = _weighted_sum(inputs)
    name = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(ours.modules[name].delta(dtype=torch.float64), truth[name], rtol=1e-5, atol=1e-6)
    # PEFT sums √(w·s)·A and √(w·s)·B separately: (Σ√cᵢBᵢ)(Σ√cᵢAᵢ) has cross terms BᵢAⱼ
    off = float((theirs[name].double() - truth[name]).norm() / truth[name].norm())
    assert off > 0.1


def test_ties_equals_peft_ties_svd_with_unit_weights(peft_pair):
    base, a, b = peft_pair
    inputs = [(read_adapter(a), 1.0), (read_adapter(b), 1.0)]
    ours, _ = combine(inputs, "ties", {"density": 0.3}, rank=8, device="cpu")
    theirs = _peft_combined(base, a, b, [1.0, 1.0], combination_type="ties_svd", svd_rank=8, density=0.3)
    for name, delta in theirs.items():
        torch.testing.assert_close(ours.modules[name].delta(), delta, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("normalize, agrees", [(True, True), (False, False)])
def test_dare_ties_equals_peft_dare_ties_svd_only_when_normalized(peft_pair, normalize, agrees):
    """At density 1 (nothing dropped) PEFT's dare_ties_svd is TIES' disjoint mean; ours (mergekit's default) is the
    agreeing sum unless --normalize."""
    base, a, b = peft_pair
    inputs = [(read_adapter(a), 1.0), (read_adapter(b), 1.0)]
    ours, _ = combine(inputs, "dare_ties", {"density": 1.0, "normalize": normalize}, rank=8, device="cpu")
    theirs = _peft_combined(base, a, b, [1.0, 1.0], combination_type="dare_ties_svd", svd_rank=8, density=1.0)
    name = "model.layers.0.self_attn.q_proj"  # in both inputs
    off = float((ours.modules[name].delta() - theirs[name]).norm() / theirs[name].norm())
    assert (off < 1e-5) == agrees, off


def test_written_peft_folder_loads_in_peft(peft_pair, tmp_path):
    from peft import PeftModel

    from factories import load_model

    base, a, b = peft_pair
    inputs = [(read_adapter(a), 0.7), (read_adapter(b), 0.5)]
    for method, rank in (("cat", None), ("ties", 5)):
        result, _ = combine(inputs, method, {"density": 0.5} if method == "ties" else {}, rank=rank, device="cpu")
        out = write_adapter(result, tmp_path / method)
        merged = PeftModel.from_pretrained(load_model(base), out).merge_and_unload().state_dict()
        plain = load_model(base).state_dict()
        for name, module in result.modules.items():
            torch.testing.assert_close(merged[module.weight_name] - plain[module.weight_name], module.delta(),
                                       rtol=1e-4, atol=1e-6)


def test_resize_peft_and_kohya_round_trips(peft_pair, tmp_path):
    from peft import PeftModel

    from factories import load_model

    base, _, b = peft_pair
    adapter = read_adapter(b)
    small, report = resize(adapter, rank=2, device="cpu")
    assert set(small.ranks.values()) == {2} and len(report.modules) == len(adapter.modules)
    out = write_adapter(small, tmp_path / "small")
    merged = PeftModel.from_pretrained(load_model(base), out).merge_and_unload().state_dict()
    plain = load_model(base).state_dict()
    for module in small.modules.values():
        torch.testing.assert_close(merged[module.weight_name] - plain[module.weight_name], module.delta(),
                                   rtol=1e-4, atol=1e-6)
    kohya = read_adapter(write_adapter(small, tmp_path / "small.safetensors", fmt="kohya"))
    assert len(kohya.modules) == len(small.modules)
    for name, module in small.modules.items():
        torch.testing.assert_close(kohya.modules[kohya_name(name)].delta(), module.delta())


def test_resize_dynamic_report_and_scale():
    adapter = lora_adapter(SHAPES, rank=6, alpha=3, seed=4, dtype=torch.bfloat16)
    small, report = resize(adapter, dynamic="sv_fro", param=0.8, max_rank=4, device="cpu")
    assert all(1 <= r <= 4 for r in small.ranks.values())
    assert all(m.scale == adapter.modules[n].scale and m.A.dtype == torch.bfloat16 for n, m in small.modules.items())
    assert report.fro_retained_mean == pytest.approx(sum(m.fro_retained for m in report.modules) / 2)
    assert all(m.fro_retained >= 0.8 - 1e-6 or m.rank_after == 4 for m in report.modules)
    assert report.parameters_after < report.parameters_before


@pytest.mark.parametrize("call, error, message", [
    (lambda a, b: combine([], "cat"), InvalidInputError, "at least one adapter"),
    (lambda a, b: combine([(a, 1)], "average"), InvalidInputError, "unknown combine method 'average'"),
    (lambda a, b: combine([(a, 1)], "ties", {"density": 0}), InvalidInputError, "density: Input should be greater than 0"),
    (lambda a, b: combine([(a, 1)], "ties", {"density": 1.5}), InvalidInputError, "less than or equal to 1"),
    (lambda a, b: combine([(a, 1)], "ties"), InvalidInputError, "density: Field required"),
    (lambda a, b: combine([(a, 1)], "linear", {"density": 0.5}), InvalidInputError, "linear takes no density (it is a parameter of ties, dare_ties, "),
    (lambda a, b: combine([(a, 1)], "linear", rank=0), InvalidInputError, "rank must be a positive integer"),
    (lambda a, b: combine([(a, 1)], "cat", rank=4), InvalidInputError, "default method) keeps every input's rank"),
    (lambda a, b: combine([(a, 1), (b, 1)], "cat"), MismatchError, "different bases"),
    (lambda a, b: resize(a, rank=0), InvalidInputError, "greater than 0"),
    (lambda a, b: resize(a, rank=9), InvalidInputError, "rank 9 is above the adapter's rank 4"),
    (lambda a, b: resize(a, dynamic="sv_fro", param=2), InvalidInputError, "fraction in (0, 1]"),
])
def test_bad_input_is_one_line(call, error, message):
    a = lora_adapter(SHAPES, base_model="org/base-a")
    b = lora_adapter(SHAPES, base_model="org/base-b")
    with pytest.raises(error) as info:
        call(a, b)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_mismatched_modules_and_full_tensors_refused():
    a = lora_adapter(SHAPES)
    b = lora_adapter({"m.q": (12, 24)})
    with pytest.raises(MismatchError, match="module m.q differs between inputs"):
        combine([(a, 1), (b, 1)], "cat")
    a.full_tensors["lm_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(InvalidInputError, match="modules_to_save or saved layers: lm_head.weight"):
        combine([(a, 1)], "cat")


@pytest.mark.parametrize("method, peft_kwargs, r", [("cat", {"combination_type": "cat"}, 8),
                                                    ("svd", {"combination_type": "svd", "svd_rank": 12}, 12)])
def test_peft_combination_after_an_rslora_adapter_is_off_by_sqrt_r(peft_pair, method, peft_kwargs, r):
    base, _, _ = peft_pair
    root = peft_pair[1].parent
    a = peft_adapter(base, root / "rs", seed=3, r=4, alpha=8, target_modules=["q_proj"], use_rslora=True)
    b = peft_adapter(base, root / "plain", seed=4, r=4, alpha=8, target_modules=["q_proj"])
    inputs = [(read_adapter(a), 1.0), (read_adapter(b), 1.0)]
    ours, _ = combine(inputs, method, device="cpu")
    theirs = _peft_combined(base, a, b, [1.0, 1.0], **peft_kwargs)
    truth = _weighted_sum(inputs)
    name = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(ours.modules[name].delta(dtype=torch.float64), truth[name], rtol=1e-5, atol=1e-6)
    # every combination type keeps use_rslora from the first adapter with lora_alpha = its new r: a scale of √r, not 1
    torch.testing.assert_close(theirs[name].double(), truth[name] * r ** 0.5, rtol=1e-4, atol=1e-5)


def test_a_combined_adapter_is_named_as_its_first_input_names_its_modules(tmp_path):
    """Inputs bound to one base under different own names (made on LlamaForCausalLM: model.layers.…; on LlamaModel:
    layers.…): the output carries the first input's names for every module it holds, so PEFT can load it onto that
    input's model class (an input needing no renaming has no own_names entries, and must still win)."""
    from dataclasses import replace

    from factories import peft_adapter, tiny_llama
    from loraops.basemodel import BaseModel
    from loraops.check import bind
    from loraops.formats import read_adapter, write_adapter

    base = tiny_llama(tmp_path / "base")
    causal = read_adapter(peft_adapter(base, tmp_path / "a", r=2, alpha=4, target_modules=["q_proj"]))
    bare = replace(causal, modules={n.removeprefix("model."): replace(m, name=n.removeprefix("model."))
                                    for n, m in causal.modules.items()})
    manifest = BaseModel.open(base).tensors
    causal, bare = bind(causal, manifest), bind(bare, manifest)
    assert not causal.own_names and bare.own_names
    for inputs, prefix in (([causal, bare], "model.layers."), ([bare, causal], "layers.")):
        combined, _ = combine([(a, 1.0) for a in inputs], "cat", device="cpu")
        written = read_adapter(write_adapter(combined, tmp_path / f"out-{prefix}", "peft"))
        assert written.modules and all(n.startswith(prefix) for n in written.modules), sorted(written.modules)


def test_resize_means_leave_out_zero_modules_as_kohya_does():
    """resize_lora.py --verbose averages the Frobenius retention over the modules where it is a number: a zero B·A
    (a module whose lora_up never trained) gives 0/0 there and is left out. Ours counts it 100 % in its row but leaves
    it out of the means too, so the averages are kohya's (here against the float64 spectra)."""
    from dataclasses import replace

    adapter = lora_adapter({"m.q": (12, 20), "m.v": (8, 20), "m.k": (8, 20)}, rank=6, seed=3)
    adapter = replace(adapter, modules={**adapter.modules,
                                        "m.k": replace(adapter.modules["m.k"], B=torch.zeros(8, 6))})
    _, report = resize(adapter, rank=2, device="cpu")
    fro, total = [], []
    for name in ("m.q", "m.v"):
        S = torch.linalg.svdvals(adapter.modules[name].delta(dtype=torch.float64) / adapter.modules[name].scale)
        fro.append(float(S[:2].norm() / S.norm()))
        total.append(float(S[:2].sum() / S.sum()))
    zero_row = next(m for m in report.modules if m.name == "m.k")
    assert zero_row.rank_after == 1 and zero_row.fro_retained == 1.0 and zero_row.zero
    assert report.fro_retained_mean == pytest.approx(sum(fro) / 2, rel=1e-6)
    assert report.sum_retained_mean == pytest.approx(sum(total) / 2, rel=1e-6)
    only_zero = replace(adapter, modules={"m.k": adapter.modules["m.k"]})
    _, report = resize(only_zero, rank=2, device="cpu")
    assert report.fro_retained_mean == 1.0 and report.sum_retained_mean == 1.0


@pytest.mark.parametrize("derive", ["combine", "resize"])
def test_float8_factors_beyond_its_range_are_refused_not_saturated(derive):
    """The result of float8_e4m3fn inputs is written in float8_e4m3fn, whose torch conversion saturates at ±448
    silently (float16's gives inf, which the finite check finds): a combine at weight 3000 came out ~25 % off, a resize
    whose B' = U·S passes 448 likewise. Factors that U·S makes too large share each component's magnitude instead
    (ops.svd.factors_in: the product within float8's rounding); what does not fit even so is refused as float16's inf
    is."""
    fp8 = torch.float8_e4m3fn
    a = lora_adapter(SHAPES, seed=1, dtype=fp8)
    b = lora_adapter(SHAPES, seed=2, dtype=fp8)

    def relative_error(got, want):
        return float((got.delta().double() - want).norm() / want.norm())

    if derive == "combine":
        result, _ = combine([(a, 20), (b, 20)], "cat", device="cpu")
        assert result.modules["m.q"].B.dtype == fp8
        shared, _ = combine([(a, 3000), (b, 3000)], "linear", device="cpu")
        want = 3000 * (a.modules["m.q"].delta().double() + b.modules["m.q"].delta().double())
        assert relative_error(shared.modules["m.q"], want) < 0.1 and want.abs().max() > 448 * 3
        with pytest.raises(InvalidInputError, match=r"module 'm.q' comes out with NaN or Inf values \(beyond what "
                                                    r"float8_e4m3fn holds\?\)"):
            combine([(a, 3e7), (b, 3e7)], "linear", device="cpu")
        return
    resized, _ = resize(a, rank=2, device="cpu")
    assert resized.modules["m.q"].B.dtype == fp8
    big = lora_adapter({"m.q": (8, 64)}, rank=2, dtype=fp8)
    big.modules["m.q"].A = torch.full((2, 64), 256.0).to(fp8)
    big.modules["m.q"].B = torch.full((8, 2), 0.5).to(fp8)  # B'·A' = 256·1·1ᵀ: B' = U·S = 2048 everywhere
    shared, _ = resize(big, rank=1, device="cpu")
    assert relative_error(shared.modules["m.q"], big.modules["m.q"].delta().double()) < 0.1
    big.modules["m.q"].A = torch.full((2, 64), 448.0).to(fp8)
    big.modules["m.q"].B = torch.full((8, 2), 448.0).to(fp8)  # shared: 633 in each factor, past 448
    with pytest.raises(InvalidInputError, match=r"module 'm.q' comes out with NaN or Inf values"):
        resize(big, rank=1, device="cpu")


def test_peft_combines_one_adapter_linearly_whatever_the_method(peft_pair):
    """PEFT's add_weighted_adapter turns any combination_type into linear for one adapter (w·τ, nothing trimmed);
    ours applies the method, as mergekit does (ties of one task vector: its trim)."""
    from peft import PeftModel

    from combine_reference import trim
    from factories import load_model

    base, a, _ = peft_pair
    model = PeftModel.from_pretrained(load_model(base), a, adapter_name="a")
    model.add_weighted_adapter(["a"], [0.5], "c", combination_type="ties_svd", density=0.3, svd_rank=4)
    name = "model.layers.0.self_attn.q_proj"
    theirs = model.get_submodule(f"base_model.model.{name}").get_delta_weight("c").double()
    adapter = read_adapter(a)
    tau = adapter.modules[name].delta(dtype=torch.float64)
    torch.testing.assert_close(theirs, 0.5 * tau, rtol=1e-5, atol=1e-6)
    ours, _ = combine([(adapter, 0.5)], "ties", {"density": 0.3}, rank=64, device="cpu")
    torch.testing.assert_close(ours.modules[name].delta(dtype=torch.float64), trim(tau, 0.3), rtol=1e-4, atol=1e-6)


def test_consensus_count_is_peft_frequency_sign_method(peft_pair):
    """PEFT's majority_sign_method="frequency" votes with the signs of the trimmed deltas: --consensus count (at weights
    1, where PEFT's divisor, the count of agreeing inputs, is ours, their weights)."""
    base, a, b = peft_pair
    inputs = [(read_adapter(a), 1.0), (read_adapter(b), 1.0)]
    ours, _ = combine(inputs, "ties", {"density": 0.4, "consensus": "count"}, rank=8, device="cpu")
    theirs = _peft_combined(base, a, b, [1.0, 1.0], combination_type="ties_svd", svd_rank=8, density=0.4,
                            majority_sign_method="frequency")
    summed, _ = combine(inputs, "ties", {"density": 0.4}, rank=8, device="cpu")
    name = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(ours.modules[name].delta(), theirs[name], rtol=1e-3, atol=1e-5)
    assert not torch.allclose(summed.modules[name].delta(), theirs[name], rtol=1e-3, atol=1e-5)


def test_peft_leaves_lora_bias_out_of_a_combination(peft_pair):
    """PEFT's add_weighted_adapter combines lora_A and lora_B's weights only: the new adapter's lora_B.bias stays at
    its initialization (zeros under PEFT's default init; random here, the first input's init_lora_weights being
    false). Ours is Σ wᵢ·sᵢ·biasᵢ, what the inputs add to the layer's output."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    from factories import load_model

    base, _, _ = peft_pair
    root = peft_pair[1].parent
    paths = [peft_adapter(base, root / f"bias{i}", seed=i, r=4, alpha=8, target_modules=["q_proj"], lora_bias=True)
             for i in (1, 2)]
    for path in paths:  # PEFT inits lora_B.bias at zero: give it values
        tensors = load_file(path / "adapter_model.safetensors")
        tensors = {k: torch.randn_like(v) if k.endswith("lora_B.bias") else v for k, v in tensors.items()}
        save_file(tensors, path / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(load_model(base), paths[0], adapter_name="x")
    model.load_adapter(paths[1], adapter_name="y")
    model.add_weighted_adapter(["x", "y"], [0.7, -0.5], "c", combination_type="cat")
    name = "model.layers.0.self_attn.q_proj"
    layer = model.get_submodule(f"base_model.model.{name}")
    adapters = [read_adapter(p) for p in paths]
    ours, _ = combine([(adapters[0], 0.7), (adapters[1], -0.5)], "cat", device="cpu")
    truth = sum(w * layer.scaling[n] * layer.lora_B[n].bias.double() for n, w in (("x", 0.7), ("y", -0.5)))
    torch.testing.assert_close(ours.modules[name].lora_bias.double(), truth, rtol=1e-5, atol=1e-6)
    assert float((layer.lora_B["c"].bias.double() - truth).norm()) > 0.5 * float(truth.norm())


def test_peft_svd_rank_above_a_module_breaks_it_where_ours_is_capped(peft_pair):
    """PEFT slices its SVD at svd_rank without capping it at min(out, in): a v_proj (32×64) at 40 gets a 32-column
    lora_B beside a 40-row lora_A, which fails when used; ours caps each module at min(Σ rᵢ, out, in) and says so."""
    base, a, b = peft_pair
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        _peft_combined(base, a, b, [1.0, 1.0], combination_type="svd", svd_rank=40)
    inputs = [(read_adapter(a), 1.0), (read_adapter(b), 1.0)]
    _, report = combine(inputs, "svd", rank=40, device="cpu")
    assert {m.rank for m in report.modules} == {6, 10}  # Σ rᵢ: 4 + 6, and b's alone on its down_proj
    _, report = combine(inputs, "ties", {"density": 0.5}, rank=40, device="cpu")
    assert {m.name.rsplit(".", 1)[1]: m.rank for m in report.modules} == {"q_proj": 40, "v_proj": 32, "down_proj": 40}


def test_peft_magnitude_prune_below_one_entry_keeps_none_where_ours_keeps_the_largest(peft_pair):
    """PEFT's prune keeps ⌊density·n⌋ entries, none at all where that is 0 (a zero module); ours keeps at least one,
    the largest, as TIES' trim does (mergekit asserts k > 0)."""
    base, a, b = peft_pair
    theirs = _peft_combined(base, a, b, [1.0, 1.0], combination_type="magnitude_prune_svd", density=1e-4, svd_rank=4)
    inputs = [(read_adapter(a), 1.0), (read_adapter(b), 1.0)]
    ours, _ = combine(inputs, "magnitude_prune", {"density": 1e-4}, rank=4, device="cpu")
    name = "model.layers.0.self_attn.q_proj"  # 64×64: ⌊1e-4·4096⌋ = 0
    assert not theirs[name].any()
    kept = ours.modules[name].delta(dtype=torch.float64)
    assert 1 <= int((kept.abs() > 1e-6 * kept.abs().max()).sum()) <= 2  # each input's largest entry


def test_factors_beyond_float16_share_each_components_magnitude_in_resize_and_combine():
    """B = U·S carries all of a component's magnitude (kohya's and PEFT's convention): a module whose delta fits
    float16 but whose σ does not came out NaN in float16 and was refused. Such factors now share the magnitude
    (B·A unchanged); factors that fit keep B = U·S, byte for byte."""
    from dataclasses import replace

    big = lora_adapter({"m": (32, 24)}, rank=2, alpha=2, seed=4)
    module = big.modules["m"]
    big = replace(big, modules={"m": replace(module, B=module.B * 3e5)})  # ΔW entries up to ~4e4, U·S to ~8e4
    delta = big.modules["m"].delta().double()
    assert delta.abs().max() < 65504
    for made, _ in (resize(big, rank=2, out_dtype=torch.float16),
                    combine([(big, 0.5), (big, 0.5)], "linear", rank=2, out_dtype=torch.float16)):
        got = made.modules["m"]
        assert got.B.dtype == torch.float16 and torch.isfinite(got.B).all() and torch.isfinite(got.A).all()
        assert got.B.abs().max() > 65504 ** 0.5 / 10 and got.A.abs().max() > 1  # shared, not all in B
        assert torch.allclose(got.delta().double(), delta, rtol=0, atol=float(delta.abs().max()) * 2e-3)
    fits, _ = resize(lora_adapter({"m": (32, 24)}, rank=2, seed=4), rank=2, out_dtype=torch.float16)
    A = fits.modules["m"].A.double()
    assert torch.allclose(A @ A.T, torch.eye(2, dtype=torch.float64), atol=2e-3)  # A = Vᵀ: orthonormal rows
