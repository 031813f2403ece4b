"""PEFT AdaLoRA and VeRA adapters, read as the plain LoRA each module equals (formats.lowrank): parity with PEFT's
merge_and_unload and its adapted model (float32 and bf16), AdaLoRA after a budget allocation (rank_pattern), VeRA's
shared projections sliced per layer shape, subtract, export as a LoRA PEFT loads, the CLI end to end, refusals."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from factories import conv_embedding_model, load_model, loraops_run, peft_adapter, save_state_dict, tiny_gpt2, tiny_llama
from loraops import algebra, engine, formats, st
from loraops.check import bind, check
from loraops.cli import main
from loraops.errors import InvalidInputError, UnsupportedAdapterError
from test_engine import assert_parity, merged_tensors

TARGETS = ["q_proj", "v_proj", "down_proj"]  # three shapes: 64×64, 32×64, 64×128
INIT_R = 6
TOKENS = torch.arange(3, 15).unsqueeze(0)


def adalora_adapter(base, out, *, masks: dict[str, list[bool]] | None = None, dtype=None, seed=1, targets=TARGETS,
                    model=None, alpha=16, **kwargs):
    """A PEFT AdaLoRA adapter on the model at ``base`` (or ``model``), E moved off PEFT's zeros. ``masks`` (module →
    the triplets a budget allocation keeps; unlisted modules keep all): what PEFT's RankAllocator leaves, the masked
    E zeroed and the config's rank_pattern keyed <module>.lora_E.default, so save_pretrained keeps the kept ones."""
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = AdaLoraConfig(init_r=INIT_R, target_r=2, lora_alpha=alpha, target_modules=targets, total_step=10, **kwargs)
    peft_model = get_peft_model(load_model(base) if model is None else model, config)
    with torch.no_grad():
        pattern = {}
        for name, param in peft_model.base_model.model.named_parameters():
            if ".lora_E." in name:
                param.normal_()
                module = name.removesuffix(".lora_E.default")
                keep = (masks or {}).get(module, [True] * INIT_R)
                param.masked_fill_(~torch.tensor(keep).unsqueeze(1), 0.0)
                pattern[name] = keep
            if dtype is not None and "lora_" in name:
                param.data = param.data.to(dtype)
    if masks is not None:
        peft_model.peft_config["default"].rank_pattern = pattern
    peft_model.save_pretrained(out)
    return out


def vera_adapter(base, out, *, dtype=None, seed=1, targets=TARGETS, r=16, model=None, **kwargs):
    """A PEFT VeRA adapter on the model at ``base`` (or ``model``), λ_b and λ_d moved off PEFT's zeros and
    d_initial."""
    from peft import VeraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(load_model(base) if model is None else model,
                                VeraConfig(r=r, target_modules=targets, **kwargs))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "vera_lambda" in name:
                param.normal_()
        if dtype is not None:
            for name, tensor in [*peft_model.named_parameters(), *peft_model.named_buffers()]:
                if "vera_" in name:
                    tensor.data = tensor.data.to(dtype)
    peft_model.save_pretrained(out)
    return out


MASKS = {"model.layers.0.self_attn.q_proj": [False, True, False, False, True, False],
         "model.layers.0.mlp.down_proj": [False] * INIT_R,  # every triplet masked: rank 0, no ΔW
         "model.layers.1.self_attn.v_proj": [True, False, True, True, True, False]}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowrank")
    return {dtype: tiny_llama(root / str(dtype).removeprefix("torch."), dtype=dtype)
            for dtype in (torch.float32, torch.bfloat16)}


def make(kind, base, out, dtype):
    if kind == "adalora":
        return adalora_adapter(base, out, masks=MASKS, dtype=dtype)
    return vera_adapter(base, out, dtype=dtype)


def raw_deltas(adapter_dir) -> dict[str, torch.Tensor]:
    """Each module's ΔW in float64 straight from the file, by PEFT's formulas (the reference)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    t = {k.removeprefix("base_model.model."): v.double()
         for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    out = {}
    for key in t:
        if key.endswith(".lora_E") and t[key].numel():
            module = key.removesuffix(".lora_E")
            scale = cfg["lora_alpha"] / (cfg["init_r"] + 1e-5)
            out[module] = t[f"{module}.lora_B"] @ (t[f"{module}.lora_A"] * t[key]) * scale
        if key.endswith(".vera_lambda_b"):
            module = key.removesuffix(".vera_lambda_b")
            A, B = t["base_model.vera_A"], t["base_model.vera_B"]
            b, d = t[key], t[f"{module}.vera_lambda_d"]
            out[module] = (b[:, None] * B[: len(b)]) @ (d[:, None] * A)  # A's columns cut by the caller
    return out


def reference_of(adapter_dir):
    deltas = raw_deltas(adapter_dir)

    def reference(base: torch.Tensor, terms) -> torch.Tensor:
        out = base.double()
        for module, weight in terms:
            delta = deltas[module.name]
            delta = delta.T if module.transposed else delta
            out = out + weight * delta[: out.shape[0], : out.shape[1]]
        return out

    return reference


def peft_merged(base, adapter_dir, dtype, weight: float) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload at ``weight``, in float32 on the ``dtype`` model's values, rounded once to ``dtype``
    (PEFT's own bf16 merge rounds A⊙E, the product, the scaled delta: roundings that are not the merge's)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base).float(), adapter_dir)
    if weight != 1.0:
        for layer in model.base_model.model.modules():
            if isinstance(getattr(layer, "scaling", None), dict) and "default" in layer.scaling:
                layer.scaling["default"] *= weight
            elif hasattr(layer, "vera_lambda_b") and "default" in layer.vera_lambda_b:
                layer.vera_lambda_b["default"].data *= weight
    return {k: v.to(dtype) for k, v in model.merge_and_unload().state_dict().items()}


def logits(model_dir, adapter_dir=None, dtype=torch.float32):
    from peft import PeftModel

    model = load_model(model_dir).to(dtype)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model.eval()(TOKENS).logits.float()


@pytest.mark.no_registry
@pytest.mark.parametrize("kind", ["adalora", "vera"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_matches_peft(tmp_path, bases, kind, dtype):
    """Every merged tensor within one rounding of PEFT's merge_and_unload (and at least as close to the float64
    formula), untouched ones bit-identical; the merged model computes PEFT's adapted model's logits."""
    adapter_dir = make(kind, bases[dtype], tmp_path / "adapter", dtype)
    adapter = formats.read_adapter(adapter_dir)
    assert adapter.methods == [kind] and {(m.method, m.shown_kind) for m in adapter.modules.values()} == {(kind, "linear")}
    assert adapter.dtype == dtype  # the file's (B' is float32: composed on read)
    if kind == "adalora":  # the masked-out module is left out; the others at their kept rank, ranknum init_r
        assert "model.layers.0.mlp.down_proj" not in adapter.modules
        assert adapter.ranks["model.layers.0.self_attn.q_proj"] == 2
        assert adapter.ranks["model.layers.1.self_attn.v_proj"] == 4
        assert adapter.ranks["model.layers.1.mlp.down_proj"] == INIT_R
        assert {m.scale for m in adapter.modules.values()} == {16 / (INIT_R + 1e-5)}
    base_state = merged_tensors(bases[dtype] / "model.safetensors")
    bound = bind(adapter, st.read_header(bases[dtype] / "model.safetensors").tensors)
    for weight in (1.0, -0.7):
        out = tmp_path / f"merged{weight}"
        engine.merge(bases[dtype], [(adapter, weight)], out, device="cpu", fingerprint=False)
        ours = merged_tensors(out)
        terms = {m.weight_name: [(m, weight)] for m in bound.modules.values()}
        theirs, reference = peft_merged(bases[dtype], adapter_dir, dtype, weight), reference_of(adapter_dir)
        if dtype == torch.bfloat16:
            assert_parity(ours, theirs, base_state, terms, reference=reference)
        else:  # float32 matmuls on both sides, the diagonal folded into another factor: errors of PEFT's size
            for name, module_terms in terms.items():
                exact = reference(base_state[name], module_terms)
                mine, peft = (ours[name].double() - exact).abs(), (theirs[name].double() - exact).abs()
                assert float(mine.max()) <= 2 * float(peft.max()) and float(mine.mean()) <= 1.1 * float(peft.mean())
        assert all(torch.equal(ours[k], base_state[k]) for k in set(base_state) - set(terms))
    expected = logits(bases[dtype], adapter_dir, dtype=torch.float32)  # the adapted model on the dtype's values
    got = logits(tmp_path / "merged1.0")
    if dtype == torch.float32:
        assert float((got - expected).abs().max()) < 1e-5
    else:  # our one rounding to bf16 is the only difference: as close as PEFT's own bf16 merge, rounded once too
        theirs = load_model(bases[dtype]).float()
        theirs.load_state_dict(peft_merged(bases[dtype], adapter_dir, dtype, 1.0))
        with torch.no_grad():
            peft_gap = float((theirs.eval()(TOKENS).logits - expected).abs().max())
        assert float((got - expected).abs().max()) <= 2 * peft_gap + 1e-6


@pytest.mark.no_registry
def test_deltas_are_peft_get_delta_weight(tmp_path, bases):
    """delta() of every bound module is PEFT's get_delta_weight: AdaLoRA and VeRA on Llama (three layer shapes) and
    on GPT-2's Conv1D layers (fan_in_fan_out, in×out), AdaLoRA on a Conv2d (A stored r×(in·kh·kw)); a VeRA module's
    in_features is vera_A's width until it is bound."""
    from peft import PeftModel

    gpt2 = tiny_gpt2(tmp_path / "gpt2")
    conv = save_state_dict(conv_embedding_model(), tmp_path / "conv.safetensors")
    cases = [
        (bases[torch.float32], adalora_adapter(bases[torch.float32], tmp_path / "a-llama"), None),
        (bases[torch.float32], vera_adapter(bases[torch.float32], tmp_path / "v-llama"), None),
        (gpt2, adalora_adapter(gpt2, tmp_path / "a-gpt2", targets=["c_attn", "mlp.c_proj"]), None),
        (gpt2, vera_adapter(gpt2, tmp_path / "v-gpt2", targets=["c_attn", "c_fc", "mlp.c_proj"]), None),
        (conv, adalora_adapter(None, tmp_path / "a-conv", model=conv_embedding_model(), targets=["proj", "conv3"]),
         conv_embedding_model),
    ]
    for base, adapter_dir, build in cases:
        model = PeftModel.from_pretrained(build() if build else load_model(base), adapter_dir)
        weights = base if base.is_file() else base / "model.safetensors"
        adapter = formats.read_adapter(adapter_dir)
        bound = bind(adapter, st.read_header(weights).tensors)
        assert check(adapter, st.read_header(weights).tensors).ok
        for name, module in bound.modules.items():
            layer = model.base_model.model.get_submodule(name)
            ref = layer.get_delta_weight("default").double()
            assert module.weight_shape == tuple(ref.shape), (adapter_dir.name, name)
            assert torch.allclose(module.delta(dtype=torch.float64), ref, rtol=1e-5, atol=1e-7), (adapter_dir.name, name)
            if adapter.modules[name].method == "vera":
                assert adapter.modules[name].in_features == model.base_model.vera_A["default"].shape[1]
                assert module.in_features == layer.in_features


@pytest.mark.no_registry
def test_adalora_as_initialised_changes_nothing(tmp_path, bases):
    """PEFT initialises E to zero: an AdaLoRA adapter saved before training is read (every module at init_r) and
    merges to the base, bit for bit."""
    from peft import AdaLoraConfig, get_peft_model

    base = bases[torch.bfloat16]
    model = get_peft_model(load_model(base), AdaLoraConfig(init_r=INIT_R, target_modules=TARGETS, total_step=10))
    model.save_pretrained(tmp_path / "adapter")
    adapter = formats.read_adapter(tmp_path / "adapter")
    assert set(adapter.ranks.values()) == {INIT_R} and len(adapter.modules) == 6
    assert all(not m.delta().any() for m in adapter.modules.values())
    engine.merge(base, [(adapter, 1.0)], tmp_path / "m", fingerprint=False)
    merged, original = merged_tensors(tmp_path / "m"), merged_tensors(base / "model.safetensors")
    assert merged.keys() == original.keys() and all(torch.equal(merged[k], original[k]) for k in original)


@pytest.mark.no_registry
def test_budget_allocation_by_peft(tmp_path, bases):
    """An adapter trained a few steps with PEFT's own update_and_allocate (rank_pattern as its RankAllocator writes
    it, some modules shrunk): read at the kept ranks, and merged to PEFT's adapted model's logits."""
    from peft import AdaLoraConfig, get_peft_model

    base = bases[torch.float32]
    torch.manual_seed(0)
    model = get_peft_model(load_model(base), AdaLoraConfig(init_r=INIT_R, target_r=2, lora_alpha=16, total_step=10,
                                                           tinit=1, tfinal=2, target_modules=TARGETS))
    model.train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_E" in name:
                param.normal_()
    for step in range(1, 9):
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        model.base_model.update_and_allocate(step)
        model.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    pattern = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and all(len(mask) == INIT_R for mask in pattern.values())
    adapter = formats.read_adapter(tmp_path / "adapter")
    kept = {key.removesuffix(".lora_E"): sum(mask) for key, mask in pattern.items()}
    assert adapter.ranks == {name: n for name, n in kept.items() if n}
    assert min(kept.values()) < INIT_R
    engine.merge(base, [(adapter, 1.0)], tmp_path / "merged", fingerprint=False)
    assert float((logits(tmp_path / "merged") - logits(base, tmp_path / "adapter")).abs().max()) < 1e-5


@pytest.mark.no_registry
def test_subtract_round_trip_and_combine(tmp_path, bases):
    base = bases[torch.float32]
    manifest = st.read_header(base / "model.safetensors").tensors
    adalora = formats.read_adapter(adalora_adapter(base, tmp_path / "a", masks=MASKS))
    vera = formats.read_adapter(vera_adapter(base, tmp_path / "v"))
    both = [(adalora, 0.8), (vera, -0.5)]
    engine.merge(base, both, tmp_path / "m", fingerprint=False)
    report = engine.subtract(tmp_path / "m", both, tmp_path / "back", reference=base, fingerprint=False)
    assert report.residual.max_abs_diff < 1e-6
    # combine: cat is exact on the plain LoRA each equals (each bound to its base first)
    with pytest.raises(InvalidInputError, match="VeRA adapter takes the first columns of the shared vera_A"):
        algebra.combine([(bind(adalora, manifest), 0.8), (vera, -0.5)], "cat")
    with pytest.raises(InvalidInputError, match=r"AdaLoRA adapter has an A of \d+ columns, a Linear's inputs or a "
                                                "convolution's flattened"):
        algebra.combine([(adalora, 0.8), (bind(vera, manifest), -0.5)], "cat")
    cat, _ = algebra.combine([(bind(adalora, manifest), 0.8), (bind(vera, manifest), -0.5)], "cat")
    bound = {a: bind(x, manifest) for a, x in (("a", adalora), ("v", vera))}
    for name, module in cat.modules.items():
        expected = sum(w * b.modules[name].delta(dtype=torch.float64)
                       for (w, b) in ((0.8, bound["a"]), (-0.5, bound["v"])) if name in b.modules)
        assert torch.allclose(module.delta(dtype=torch.float64), expected, atol=1e-6), name
    assert not cat.methods


@pytest.mark.no_registry
def test_export_is_a_lora_peft_loads(tmp_path, bases):
    """An exported (and a full-rank resized) AdaLoRA/VeRA adapter is a PEFT LoRA: its config a LoraConfig, its
    logits those of the original adapter's model."""
    base = bases[torch.float32]
    manifest = st.read_header(base / "model.safetensors").tensors
    for kind in ("adalora", "vera"):
        adapter_dir = make(kind, base, tmp_path / kind, None)
        adapter = bind(formats.read_adapter(adapter_dir), manifest)
        for label, written in (("export", adapter), ("resize", algebra.resize(adapter, rank=INIT_R if kind == "adalora"
                                                                              else 16)[0])):
            out = formats.write_adapter(written, tmp_path / f"{kind}-{label}")
            config = json.loads((out / "adapter_config.json").read_text())
            assert config["peft_type"] == "LORA" and not {"init_r", "vera_dropout", "projection_prng_key"} & set(config)
            reread = formats.read_adapter(out)
            assert not reread.methods and {m.kind for m in reread.modules.values()} == {"linear"}
            gap = (logits(base, out) - logits(base, adapter_dir)).abs().max()
            assert float(gap) < 1e-5, (kind, label)


@pytest.mark.registry_backend
def test_cli_end_to_end(tmp_path, bases):
    """register, inspect, show, merge and export in processes of their own (one a fresh `python -m loraops`), as a
    user runs them."""
    base = bases[torch.float32]
    ada = adalora_adapter(base, tmp_path / "ada", masks=MASKS)
    vera = vera_adapter(base, tmp_path / "vera")
    def loraops(*args, code=0):  # a process of its own, forked from a preloaded server (no start-up per run)
        done = loraops_run(*args)
        assert done.returncode == code, done.stdout + done.stderr
        return done.stdout + done.stderr

    def run(*args, code=0):  # the rest in process (each python -m loraops costs a few seconds on a busy machine)
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == code, result.output
        return result.output

    assert "VeRA: ΔW" in loraops("inspect", vera)
    run("base", "add", base, "--name", "llama")
    # one run as a user starts it, a fresh `python -m loraops` (LORAOPS_HOME, HF_HOME and PYTHONPATH inherited)
    done = subprocess.run([sys.executable, "-m", "loraops", "register", ada, "--name", "ada", "--base", "llama"],
                          capture_output=True, text=True)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "peft AdaLoRA, 5 modules, rank mixed (2–6), alpha 16, base llama" in out
    assert "peft VeRA, 6 modules, rank 16" in run("register", vera, "--name", "vera", "--base", "llama")
    assert "merged ada@1:1, vera@1:0.5" in loraops("merge", "ada", "vera:0.5", "--into", "llama", "-o", tmp_path / "m")
    out = loraops("export", "vera", "--format", "peft", "-o", tmp_path / "vera-lora")
    assert "a plain LoRA with the VeRA adapter's ΔW" in out
    shown = json.loads(run("show", "vera", "--json"))
    assert shown["methods"] == ["vera"] and {m["kind"] for m in shown["modules"]} == {"linear"}
    assert {(m["name"].rpartition(".")[2], m["in_features"]) for m in shown["modules"]} == {
        ("q_proj", 64), ("v_proj", 64), ("down_proj", 128)}  # bound: each layer's own width of vera_A
    text = run("show", "ada")
    assert "AdaLoRA (lora_alpha/(init_r + 1e-5)" in text and "AdaLoRA: ΔW = scale·B·diag(E)·A" in text
    assert "vera_A (of 128)" in run("export", vera, "--format", "peft", "-o", tmp_path / "x", code=2)  # no base: widths?
    run("export", vera, "--format", "kohya", "-o", tmp_path / "vera.safetensors", "--base", "llama")
    from peft import PeftModel

    # what the merge made: ada whole, then vera at 0.5 (PEFT's set_scale has no effect on VeRA: scale λ_b)
    expected = PeftModel.from_pretrained(PeftModel.from_pretrained(load_model(base), ada).merge_and_unload(), vera)
    for layer in expected.base_model.model.modules():
        if hasattr(layer, "vera_lambda_b") and "default" in layer.vera_lambda_b:
            layer.vera_lambda_b["default"].data *= 0.5
    with torch.no_grad():
        want = expected.eval()(TOKENS).logits
    assert float((logits(tmp_path / "m") - want).abs().max()) < 1e-5
    assert float((logits(base, tmp_path / "vera-lora") - logits(base, vera)).abs().max()) < 1e-5


@pytest.mark.no_registry
def test_lora_alpha_not_positive_is_the_kept_rank(tmp_path, bases):
    """PEFT's SVD layers take scaling = the module's rank (the kept one, after a rank_pattern) for any lora_alpha ≤ 0:
    a negative lora_alpha is read so (it was refused as a negative alpha), a null one refused in one line (it was a
    TypeError traceback)."""
    from peft import PeftModel

    base = bases[torch.float32]
    ada = adalora_adapter(base, tmp_path / "ada", masks=MASKS, alpha=-3)
    model = PeftModel.from_pretrained(load_model(base), ada)
    adapter = formats.read_adapter(ada)
    assert adapter.modules["model.layers.0.self_attn.q_proj"].alpha == 2  # its mask keeps 2 of 6
    for name, module in adapter.modules.items():
        ref = model.base_model.model.get_submodule(name).get_delta_weight("default").double()
        assert torch.allclose(module.delta(dtype=torch.float64), ref, rtol=1e-5, atol=1e-7), name
    config = json.loads((ada / "adapter_config.json").read_text())
    (ada / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": None}))
    with pytest.raises(InvalidInputError, match="config lora_alpha=null must be a number"):
        formats.read_adapter(ada)


@pytest.mark.no_registry
def test_identity_and_refusals(tmp_path, bases):
    base = bases[torch.float32]
    ada = adalora_adapter(base, tmp_path / "ada", masks=MASKS)
    config_path = ada / "adapter_config.json"
    config = json.loads(config_path.read_text())
    identity = formats.identity(ada)

    def with_config(**changes):
        config_path.write_text(json.dumps({**config, **changes}))

    with_config(init_r=8)  # ranknum divides the scale: another adapter
    assert formats.identity(ada) != identity
    refused = [
        ({"init_r": 8}, InvalidInputError, "rank_pattern.*must be 8 true/false values"),
        ({"use_dora": True}, UnsupportedAdapterError, "DoRA in an AdaLoRA config"),
        ({"rank_pattern": {**config["rank_pattern"], "model.layers.0.self_attn.q_proj.lora_E": [True] * INIT_R}},
         InvalidInputError, r"'model.layers.0.self_attn.q_proj' has rank 2 .* but its rank_pattern mask keeps 6"),
        ({"rank_pattern": None}, InvalidInputError, "'model.layers.0.mlp.down_proj' has rank 0 .* but init_r says 6: PEFT would not load it"),
        ({"rank_pattern": {"model.layers.5.mlp.up_proj.lora_E": [True] * INIT_R}}, InvalidInputError,
         "rank_pattern names 'model.layers.5.mlp.up_proj', which has no AdaLoRA tensors"),
    ]
    for changes, error, message in refused:
        with_config(**changes)
        with pytest.raises(error, match=message):
            formats.read_adapter(ada)
    with_config()
    tensors = load_file(ada / "adapter_model.safetensors")
    save_file(tensors, tmp_path / "bare.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedAdapterError, match="an AdaLoRA adapter .* outside a PEFT folder"):
        formats.read_adapter(tmp_path / "bare.safetensors")

    vera = vera_adapter(base, tmp_path / "vera")
    with pytest.raises(InvalidInputError, match="a VeRA adapter has no alpha"):
        formats.read_adapter(vera, alpha=8)
    weights = {k: v for k, v in load_file(vera / "adapter_model.safetensors").items() if "vera_B" not in k}
    save_file(weights, vera / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidInputError, match="no 'base_model.vera_B' in the file, though the config says "
                                                "save_projection: true"):
        formats.read_adapter(vera)
    # lora_A/lora_B of a plain LoRA stay LoRA's: a LoRA with a lora_E key is still refused
    lora = peft_adapter(base, tmp_path / "lora", r=2)
    tensors = load_file(lora / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_E"] = torch.ones(2, 1)
    save_file(tensors, lora / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedAdapterError, match="an AdaLoRA adapter"):
        formats.read_adapter(lora)


def test_inspect_show_and_card_say_the_method(tmp_path, bases):
    """inspect and show name the method (variant line, AdaLoRA's scale rule; each module's kind is its layer's, as a
    LoRA's); an unbound VeRA adapter's `in` column is vera_A's width, which they say; the pushed card says AdaLoRA/VeRA as pushed, and LoRA when the
    adapter is pushed in another layout (then the plain LoRA it equals)."""
    from loraops import hub
    from loraops.registry import Registry

    base = bases[torch.float32]
    vera = vera_adapter(base, tmp_path / "vera")
    ada = adalora_adapter(base, tmp_path / "ada")
    inspected = CliRunner().invoke(main, ["inspect", str(vera)]).output
    assert "not bound to a base, the `in` column is vera_A's width" in inspected
    report = json.loads(CliRunner().invoke(main, ["inspect", str(ada), "--json"]).output)
    assert report["methods"] == ["adalora"] and report["products"] == []
    assert {m["kind"] for m in report["modules"]} == {"linear"}
    assert {m["alpha"] for m in report["modules"]} == {16.0}
    with Registry.open() as reg:
        reg.add_base(str(base), name="llama")
        record = reg.register_adapter(str(vera), name="v", base="llama").record
        card = hub.render_card(hub.card_info(reg, record, "peft"))
        kohya_card = hub.render_card(hub.card_info(reg, record, "kohya"))
        unbound = reg.register_adapter(str(ada), name="a").record
    assert '- "vera"' in card and "A PEFT VeRA adapter" in card and "| variant | VeRA: ΔW = " in card
    assert "vera" not in kohya_card.split("---\n")[1] and "A kohya / sd-scripts LoRA" in kohya_card
    shown = CliRunner().invoke(main, ["show", "v"]).output
    assert "VeRA: ΔW" in shown and "not bound to a base" not in shown
    assert "peft AdaLoRA" in CliRunner().invoke(main, ["list"]).output and unbound.methods == ["adalora"]


@pytest.mark.no_registry
def test_vera_without_projections_is_refused_and_resaved_with_them(tmp_path, bases):
    """save_projection=False: PEFT regenerates vera_A/vera_B from projection_prng_key, which loraops does not: refused
    in one line. The recipe in the docs (load it with PEFT, make the projections persistent, save_projection=True)
    gives a file loraops merges to that adapter's logits."""
    from peft import PeftModel

    base = bases[torch.float32]
    bare = vera_adapter(base, tmp_path / "bare", save_projection=False)
    result = CliRunner().invoke(main, ["inspect", str(bare)])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "saved without its projections (save_projection: false)" in result.output
    model = PeftModel.from_pretrained(load_model(base), bare)
    for shared in (model.base_model.vera_A, model.base_model.vera_B):
        shared.persistent = True
        for key in list(shared):
            shared[key] = shared[key]  # registered again, now persistent: saved with the adapter
    model.peft_config["default"].save_projection = True
    model.save_pretrained(tmp_path / "saved")
    engine.merge(base, [(formats.read_adapter(tmp_path / "saved"), 1.0)], tmp_path / "m", fingerprint=False)
    assert float((logits(tmp_path / "m") - logits(base, bare)).abs().max()) < 1e-5


def test_adalora_on_convs(tmp_path):
    """An AdaLoRA Conv2d's A is stored r×(in·kh·kw): unbound it reads as a linear module of in·kh·kw inputs (inspect
    says so), and writing it then is refused in one line (written flat, PEFT would not load it: it cannot be told from
    a Linear without the base); with --base it is written as a conv LoRA that PEFT loads to the AdaLoRA adapter's
    outputs. Registered with its base, show says each module's layer kind (conv, linear), as for a LoRA."""
    from peft import PeftModel
    from sqlalchemy import text

    from loraops import settings
    from loraops.registry import db

    base = save_state_dict(conv_embedding_model(), tmp_path / "conv.safetensors")
    ada = adalora_adapter(None, tmp_path / "ada", model=conv_embedding_model(), targets=["proj", "conv3"])

    def run(*args, code=0):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == code, result.output
        return result.output

    inspected = json.loads(run("inspect", ada, "--json"))
    assert {(m["name"], m["kind"], m["in_features"]) for m in inspected["modules"]} == {
        ("conv3", "linear", 8 * 3 * 3), ("proj", "linear", 16)}
    assert "a Conv2d's module reads as a linear one of in·kh·kw inputs" in run("inspect", ada)
    refused = run("export", ada, "--format", "peft", "-o", tmp_path / "flat", code=2)
    assert refused.count("\n") == 1 and "AdaLoRA adapter has an A of" in refused and "--base BASE" in refused
    assert not (tmp_path / "flat").exists()
    run("base", "add", base, "--name", "conv")
    run("export", ada, "--format", "peft", "-o", tmp_path / "lora", "--base", "conv")
    ids, image = torch.arange(5).unsqueeze(0), torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(conv_embedding_model(), ada)(ids, image)
        exported = PeftModel.from_pretrained(conv_embedding_model(), tmp_path / "lora")
        assert {type(m).__name__ for n, m in exported.named_modules() if n.endswith(("conv3", "proj"))} == {"Conv2d", "Linear"}
        for got, want in zip(exported(ids, image), expected):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    run("register", ada, "--name", "ada", "--base", "conv")
    shown = json.loads(run("show", "ada", "--json"))
    assert shown["methods"] == ["adalora"]
    assert {(m["name"], m["kind"], m["in_features"]) for m in shown["modules"]} == {("conv3", "conv", 8), ("proj", "linear", 16)}
    assert "peft AdaLoRA" in run("list")
    # a registry written before revision 0006 kept the method in the module's kind: the upgrade makes it the layer's
    engine = db.make_engine(settings.db_url())
    db.downgrade(engine, "0005")
    with engine.connect() as c:
        assert set(c.execute(text("SELECT kind FROM adapter_modules")).scalars()) == {"adalora"}
    if engine.dialect.name != "sqlite":  # a server registry is upgraded only when asked (test_migrations)
        db.ensure_schema(engine, explicit=True)
    engine.dispose()
    assert json.loads(run("show", "ada", "--json")) == shown  # opened: upgraded to head


def _dinov2_swiglu(path):
    """A tiny DINOv2 with a SwiGLU MLP: gate_proj and up_proj in memory are the halves of the saved mlp.weights_in
    (an ldm.FUSED tensor)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8,
                             mlp_ratio=2, use_swiglu_ffn=True)).save_pretrained(path)
    return path


def loha_adapter(base, out, *, model, targets):
    from peft import LoHaConfig, get_peft_model

    torch.manual_seed(1)
    get_peft_model(model, LoHaConfig(r=4, target_modules=targets, init_weights=False)).save_pretrained(out)
    return out


PIXELS = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
BOUND_APART = {  # a base, its model class, the adapter's targets
    "tied head": (lambda path: tiny_llama(path, tie=True), "AutoModelForCausalLM", ["q_proj", "lm_head"]),
    # (down_proj: VeRA's vera_A is as wide as its 128 inputs, the head takes the embeddings' 64)
    "tied head, wider vera_A": (lambda path: tiny_llama(path, tie=True), "AutoModelForCausalLM",
                                ["q_proj", "down_proj", "lm_head"]),
    # (down_proj: VeRA's vera_A is as wide as its 48 inputs, the halves of weights_in take 32)
    "fused part": (_dinov2_swiglu, "Dinov2Model", ["q_proj", "gate_proj", "up_proj", "down_proj"]),
}


@pytest.mark.parametrize("case, method", [("tied head", "adalora"), ("tied head", "vera"),
                                          ("tied head, wider vera_A", "vera"), ("fused part", "adalora"),
                                          ("fused part", "vera"), ("fused part", "loha")])
def test_a_module_bound_to_a_tied_head_or_a_fused_part(tmp_path, case, method):
    """An AdaLoRA, VeRA or LoHa module on a head the base does not store (tied to its embeddings) or on a part of a
    tensor the base stores fused (DINOv2's SwiGLU gate_proj/up_proj, rows of weights_in) is fitted to its layer when
    bound, as one on a tensor of its own: AdaLoRA's gets its kind (it was refused as unbound by `export --base`),
    VeRA's its inputs (it was a misfit: all of vera_A's width), LoHa's its kernel (resize refused it as stored
    flattened). The export (AdaLoRA's and VeRA's the LoRA each equals) loads in PEFT to the adapter's outputs."""
    import transformers
    from peft import PeftModel

    from loraops.basemodel import BaseModel

    make_base, cls_name, targets = BOUND_APART[case]
    base = make_base(tmp_path / "base")
    cls = getattr(transformers, cls_name)
    make = {"adalora": adalora_adapter, "vera": vera_adapter, "loha": loha_adapter}[method]
    adapter = make(None, tmp_path / "adapter", model=cls.from_pretrained(base), targets=targets)
    bound = bind(formats.read_adapter(adapter), BaseModel.open(base).tensors)
    assert {(m.kind, m.inputs_known, m.product is None or m.product.kernel_known)
            for m in bound.modules.values()} == {("linear", True, True)}
    written = ["export", adapter] if method != "loha" else ["resize", adapter, "--rank", "16"]
    for args in (["base", "add", base, "--name", "base"],
                 [*written, "--format", "peft", "-o", tmp_path / "lora", "--base", "base"]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output

    def outputs(adapter):
        model = PeftModel.from_pretrained(cls.from_pretrained(base), adapter).eval()
        with torch.no_grad():
            found = model(TOKENS) if case.startswith("tied head") else model(pixel_values=PIXELS)
        return found.logits if case.startswith("tied head") else found.last_hidden_state

    torch.testing.assert_close(outputs(tmp_path / "lora"), outputs(adapter), atol=1e-5, rtol=1e-5)
    if case.startswith("tied head"):  # merged untied, the head's own module fitted as in the export
        assert engine.merge(base, [(formats.read_adapter(adapter), 1.0)], tmp_path / "merged",
                            progress=False).heads_untied == ["lm_head.weight"]
        with torch.no_grad():
            merged = cls.from_pretrained(tmp_path / "merged").eval()(TOKENS).logits
        torch.testing.assert_close(merged, outputs(adapter), atol=1e-5, rtol=1e-5)


def test_a_vera_tied_head_binds_to_its_own_model_s_embeddings(tmp_path):
    """A VeRA module on an unstored tied head takes vera_A's first columns, as many as the embeddings it is tied to
    are wide: those of the head's own model (InstructBLIP's language model), not wider ones elsewhere with as many
    rows (its Q-Former's word embeddings, here of the same vocabulary size), which it was bound to (the merged head
    Q-Former-wide, a model transformers does not load). Merged: PEFT's adapted model's logits."""
    from peft import PeftModel
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration as cls

    from loraops.basemodel import BaseModel

    config = InstructBlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=16, patch_size=8),
        qformer_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                            vocab_size=128, encoder_hidden_size=32),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True),
        num_query_tokens=4, image_token_index=120)
    torch.manual_seed(0)
    cls._from_config(config).save_pretrained(tmp_path / "base")
    # (down_proj: vera_A 128 wide, wider than both embeddings)
    adapter = vera_adapter(None, tmp_path / "a", model=cls.from_pretrained(tmp_path / "base"),
                           targets=["language_model.lm_head", "down_proj"])
    bound = bind(formats.read_adapter(adapter), BaseModel.open(tmp_path / "base").tensors)
    assert bound.modules["language_model.lm_head"].weight_shape == (128, 32)

    def logits(model):
        with torch.no_grad():
            return model.eval()(pixel_values=PIXELS, qformer_input_ids=TOKENS[:, :6],
                                input_ids=torch.cat([torch.full((1, 4), 120), TOKENS[:, :6]], 1)).logits

    engine.merge(tmp_path / "base", [(formats.read_adapter(adapter), 1.0)], tmp_path / "merged", progress=False)
    expected = logits(PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "base"), adapter))
    torch.testing.assert_close(logits(cls.from_pretrained(tmp_path / "merged")), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["adalora", "vera"])
def test_show_after_the_base_is_removed(tmp_path, bases, method):
    """An adapter registered with its base keeps the module rows its base gave it when the base is removed
    (`base rm --force`): an AdaLoRA conv stays `conv` with its channels as `in`, a VeRA module its layer's width. The
    variant line says so, not that the rows read as a file without a base does (a Conv2d read as a linear module,
    vera_A's width in the `in` column), which the table contradicted; an adapter registered without a base still
    says that. (An AdaLoRA conv keeps its kernel, which the rows record: the file alone reads it as a linear
    module.)"""
    def run(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    def adapter(seed):
        if method == "adalora":
            return adalora_adapter(None, tmp_path / f"ada{seed}", model=conv_embedding_model(), targets=["proj", "conv3"],
                                   seed=seed)
        return vera_adapter(base, tmp_path / f"vera{seed}", seed=seed)

    base = save_state_dict(conv_embedding_model(), tmp_path / "conv.safetensors") if method == "adalora" \
        else bases[torch.float32]
    run("base", "add", base, "--name", "base")
    run("register", adapter(1), "--name", "bound", "--base", "base")
    rows = json.loads(run("show", "bound", "--json"))["modules"]
    run("base", "rm", "base", "--force")
    run("register", adapter(2), "--name", "unbound")
    shown = json.loads(run("show", "bound", "--json"))
    assert shown["base"] is None and rows == shown["modules"]
    kernels = {m["name"]: m["kernel"] for m in rows}
    assert kernels == ({"proj": None, "conv3": [3, 3]} if method == "adalora" else dict.fromkeys(kernels))
    assert "conv" in {m["kind"] for m in rows} if method == "adalora" else len({m["in_features"] for m in rows}) > 1
    assert "not bound to a base" not in run("show", "bound")
    assert "its base was removed: the rows are as bound to it" in run("show", "bound")
    assert "not bound to a base" in run("show", "unbound")


@pytest.mark.no_registry
@pytest.mark.parametrize("head", ["saved whole", "with a LoRA too"])
def test_adalora_ensure_weight_tying_saves_the_tied_head_whole(tmp_path, head):
    """AdaLoraConfig inherits LoraConfig's ensure_weight_tying, and AdaLoraModel LoraModel's tying: with the tied
    embeddings in modules_to_save, PEFT saves the head whole too (lm_head.weight, its modules_to_tie, no entry of its
    own) and loads the folder. loraops dropped the field from an AdaLoRA config and refused the folder as an unknown
    key layout; it reads the head as for a LoRA, and the merge computes PEFT's adapted model. The identity is the
    one it had (ensure_weight_tying is not hashed). An AdaLoRA on that head, which the targeting lists, fails PEFT's
    load (a TypeError: a ModulesToSaveWrapper around the LoRA layer), and is refused as for a LoRA."""
    from peft import PeftModel

    tied = tiny_llama(tmp_path / "tied", tie=True)
    targets = ["q_proj"] if head == "saved whole" else ["q_proj", "lm_head"]
    model = load_model(tied)
    ada = adalora_adapter(None, tmp_path / "ada", model=model, targets=["q_proj"],
                          modules_to_save=["embed_tokens"], ensure_weight_tying=True)
    config_path = ada / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert config["ensure_weight_tying"] and config["peft_type"] == "ADALORA"
    assert "base_model.model.lm_head.weight" in load_file(ada / "adapter_model.safetensors")
    embed = "model.embed_tokens.weight"
    if head == "with a LoRA too":
        weights = ada / "adapter_model.safetensors"
        state = load_file(weights)
        save_file({**state, **{f"base_model.model.lm_head.lora_{part}": torch.randn(shape) for part, shape in
                               (("A", (INIT_R, 64)), ("E", (INIT_R, 1)), ("B", (128, INIT_R)))}}, str(weights))
        config_path.write_text(json.dumps({**config, "target_modules": targets}))
        with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type .*lora"):
            PeftModel.from_pretrained(load_model(tied), ada)
        with pytest.raises(InvalidInputError, match=r"module 'lm_head' has LoRA weights, but the config's "
                                                    r"ensure_weight_tying saves it whole"):
            formats.read_adapter(ada)
        return
    with torch.no_grad():  # the trained embeddings (PEFT's modules_to_save copy), moved off the base's
        trained = load_model(tied).model.embed_tokens.weight + 0.05
    state = load_file(ada / "adapter_model.safetensors")
    save_file({**state, f"base_model.model.{embed}": trained, "base_model.model.lm_head.weight": trained.clone()},
              str(ada / "adapter_model.safetensors"))
    adapter = formats.read_adapter(ada)
    assert sorted(adapter.full_tensors) == ["lm_head.weight", embed]
    identity = formats.identity(ada)
    config_path.write_text(json.dumps({**config, "ensure_weight_tying": False}))
    assert formats.identity(ada) == identity
    config_path.write_text(json.dumps(config))
    expected = logits(tied, ada)
    assert not torch.allclose(logits(tied), expected, atol=1e-2)
    engine.merge(tied, [(adapter, 1.0)], tmp_path / "out", progress=False)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    torch.testing.assert_close(merged["lm_head.weight"], trained)
    torch.testing.assert_close(logits(tmp_path / "out"), expected, atol=1e-5, rtol=1e-5)


def test_a_config_field_left_out_is_its_own_peft_type_s_default(tmp_path, bases):
    """A field a config leaves out means its config class's default (formats.common.PEFT_DEFAULTS, which the installed
    PEFT's classes give): VeraConfig's r is 256, and a VeRA folder whose config leaves r out has the identity of the
    one that writes 256 (it hashed LoraConfig's 8, so the same adapter registered twice)."""
    import dataclasses

    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig

    from loraops.formats import common

    classes = {"LORA": LoraConfig, "ADALORA": AdaLoraConfig, "LOHA": LoHaConfig, "LOKR": LoKrConfig, "VERA": VeraConfig}
    assert common.PEFT_DEFAULTS.keys() == classes.keys()
    for peft_type, cls in classes.items():
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        assert common.PEFT_DEFAULTS[peft_type] == {k: fields[k] for k in common.PEFT_DEFAULTS[peft_type]}, peft_type
    vera = vera_adapter(bases[torch.float32], tmp_path / "vera", r=256, targets=["q_proj"])
    config_path = vera / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert config["r"] == 256
    explicit, modules = formats.identity(vera), formats.read_adapter(vera).modules
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "r"}))
    assert formats.identity(vera) == explicit
    assert all(torch.equal(m.B, modules[n].B) for n, m in formats.read_adapter(vera).modules.items())
