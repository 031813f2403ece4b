"""LoHa and LoKr (PEFT LoHaConfig/LoKrConfig, LyCORIS/kohya files): read, checked, merged and subtracted exactly (parity
with PEFT's merge_and_unload and with float64 references from LyCORIS' formulas), resized into a LoRA, refused where
their ΔW is no low-rank product."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from engine_helpers import reference64, ulps
from factories import conv_embedding_model, save_state_dict
from loraops import algebra, engine, formats, st
from loraops.check import bind
from loraops.cli import main
from loraops.errors import InvalidInputError, UnsupportedAdapterError
from test_engine import assert_parity, merged_tensors

TARGETS = ["proj", "conv1", "conv3"]
CONFIGS = {
    "loha": ("LoHaConfig", dict(r=4, alpha=6)),
    "loha-tucker": ("LoHaConfig", dict(r=3, alpha=5, use_effective_conv2d=True,
                                       rank_pattern={"proj": 2}, alpha_pattern={"conv3": 7})),
    "lokr": ("LoKrConfig", dict(r=2, alpha=3)),
    "lokr-both": ("LoKrConfig", dict(r=1, alpha=3, decompose_both=True, use_effective_conv2d=True)),
    "lokr-whole": ("LoKrConfig", dict(r=8, alpha=4)),  # r ≥ the factors' sizes / 2: w1 and w2 stored whole
}


def peft_lycoris(out, kind: str, dtype=torch.float32, seed: int = 1):
    """A PEFT LoHa/LoKr adapter on the tiny conv model (random non-zero factors, stored in ``dtype``)."""
    import peft

    cls, kwargs = CONFIGS[kind]
    torch.manual_seed(seed)
    model = peft.get_peft_model(conv_embedding_model(), getattr(peft, cls)(target_modules=TARGETS, init_weights=False,
                                                                           **kwargs))
    for name, param in model.named_parameters():
        if "hada_" in name or "lokr_" in name:
            param.data = param.data.to(dtype)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("lycoris")
    return {dtype: save_state_dict(conv_embedding_model().to(dtype), root / f"base-{dtype}.safetensors".replace("torch.", ""))
            for dtype in (torch.float32, torch.bfloat16)}


def peft_merged(adapter_dir, dtype, weight: float) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload at ``weight`` (set_scale), run in float32 on the ``dtype`` model's values and rounded
    once to ``dtype``: in bf16 PEFT forms each factor product and the Hadamard/Kronecker product in bf16, roundings
    that have nothing to do with merging (the LoRA tests' reference does the same for PEFT's cat)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(conv_embedding_model().to(dtype).float(), adapter_dir)
    for layer in model.base_model.model.modules():
        if hasattr(layer, "set_scale") and "default" in getattr(layer, "scaling", {}):
            layer.set_scale("default", weight)
    return {k: v.to(dtype) for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_matches_peft(tmp_path, bases, kind, dtype):
    adapter_dir = peft_lycoris(tmp_path / "adapter", kind, dtype)
    adapter = formats.read_adapter(adapter_dir)
    assert {m.product.kind for m in adapter.modules.values()} == {kind.split("-")[0]}
    for weight in (1.0, 0.5, -0.7):
        out = tmp_path / f"merged{weight}.safetensors"
        engine.merge(bases[dtype], [(adapter, weight)], out, device="cpu", fingerprint=False)
        ours, base_state = merged_tensors(out), merged_tensors(bases[dtype])
        bound = bind(adapter, st.read_header(bases[dtype]).tensors)
        terms = {m.weight_name: [(m, weight)] for m in bound.modules.values()}
        assert_parity(ours, peft_merged(adapter_dir, dtype, weight), base_state, terms)
        untouched = set(base_state) - set(terms)
        assert all(torch.equal(ours[k], base_state[k]) for k in untouched)


def test_peft_deltas_and_scales(tmp_path):
    """Each module's delta() is PEFT's get_delta_weight (LoKr's scale is alpha/r even with both factors whole)."""
    from peft import PeftModel

    for kind in CONFIGS:
        adapter_dir = peft_lycoris(tmp_path / kind, kind)
        model = PeftModel.from_pretrained(conv_embedding_model(), adapter_dir)
        adapter = formats.read_adapter(adapter_dir)
        for name, module in adapter.modules.items():
            layer = model.base_model.model.get_submodule(name)
            ref = layer.get_delta_weight("default").double()
            assert module.scale == pytest.approx(layer.scaling["default"]), (kind, name)
            assert torch.allclose(module.delta(dtype=torch.float64).reshape(ref.shape), ref, atol=1e-6), (kind, name)
    whole = formats.read_adapter(tmp_path / "lokr-whole")
    assert {m.rank for m in whole.modules.values()} == {None} and whole.rank is None


def test_subtract_round_trip(tmp_path, bases):
    adapter = formats.read_adapter(peft_lycoris(tmp_path / "a", "loha-tucker"))
    engine.merge(bases[torch.float32], [(adapter, 0.5)], tmp_path / "m.safetensors", fingerprint=False)
    report = engine.subtract(tmp_path / "m.safetensors", [(adapter, 0.5)], tmp_path / "back.safetensors",
                             reference=bases[torch.float32], fingerprint=False)
    assert report.residual.max_abs_diff < 1e-6
    back, base = merged_tensors(tmp_path / "back.safetensors"), merged_tensors(bases[torch.float32])
    assert all(torch.allclose(back[k], base[k], atol=1e-6) for k in base)


def test_loha_and_lora_in_one_merge(tmp_path, bases):
    """A LoHa and a plain LoRA on the same tensors, merged in one run: the float64 sum, rounded once."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    lora = get_peft_model(conv_embedding_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj", "conv3"],
                                                            init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    inputs = [(formats.read_adapter(peft_lycoris(tmp_path / "loha", "loha", torch.bfloat16)), 0.8),
              (formats.read_adapter(tmp_path / "lora"), -0.5)]
    engine.merge(bases[torch.bfloat16], inputs, tmp_path / "m.safetensors", fingerprint=False)
    ours, base = merged_tensors(tmp_path / "m.safetensors"), merged_tensors(bases[torch.bfloat16])
    manifest = st.read_header(bases[torch.bfloat16]).tensors
    terms: dict[str, list] = {}
    for adapter, weight in inputs:
        for module in bind(adapter, manifest).modules.values():
            terms.setdefault(module.weight_name, []).append((module, weight))
    assert len(terms["proj.weight"]) == 2
    for name, module_terms in terms.items():
        exact = reference64(base[name], module_terms)
        assert int(ulps(ours[name], exact.to(torch.bfloat16)).max()) <= 1, name


# -- LyCORIS / kohya files ----------------------------------------------------------------------------------------

SHAPES = {"proj": (24, 16), "conv1": (8, 4, 1, 1), "conv3": (6, 8, 3, 3)}


def lycoris_file(path, algo: str, *, rank: int = 3, alpha: float | None = 2.0, seed: int = 0):
    """A LyCORIS file for the tiny conv model, as LyCORIS' modules save them, and the float64 ΔW of each module by
    LyCORIS' own formulas (LohaModule/LokrModule.get_weight; ComfyUI's and A1111's loaders compute the same)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5

    tensors, deltas = {}, {}
    for module, shape in SHAPES.items():
        key = f"lora_unet_{module}"
        out, inp, kernel = shape[0], shape[1], shape[2:]
        flat = inp * (kernel[0] * kernel[1] if kernel else 1)
        tucker = algo.endswith("tucker") and kernel and kernel != (1, 1)
        parts = {}
        if algo.startswith("loha"):
            if tucker:
                parts = {"hada_t1": rand(rank, rank, *kernel), "hada_w1_a": rand(rank, out), "hada_w1_b": rand(rank, inp),
                         "hada_t2": rand(rank, rank, *kernel), "hada_w2_a": rand(rank, out), "hada_w2_b": rand(rank, inp)}
                w = [torch.einsum("ijkl,jr,ip->prkl", parts[f"hada_t{n}"], parts[f"hada_w{n}_b"], parts[f"hada_w{n}_a"])
                     for n in (1, 2)]
                delta = w[0] * w[1]
            else:
                parts = {p: rand(out, rank) if p.endswith("_a") else rand(rank, flat)
                         for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
                delta = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
            r = rank
        else:  # lokr: w1 a×b, w2 c×d(×k×k); out = a·c, in = b·d
            a, b = {24: 4, 8: 2, 6: 2}[out], {16: 4, 4: 2, 8: 2}[inp]
            c, d = out // a, inp // b
            if algo == "lokr-whole":
                parts = {"lokr_w1": rand(a, b), "lokr_w2": rand(c, d, *kernel)}
                r = None
            else:  # "lokr-w1": w1 whole, w2 factored (LyCORIS' default, no decompose_both)
                parts = {"lokr_w1": rand(a, b)} if algo == "lokr-w1" else {"lokr_w1_a": rand(a, rank),
                                                                           "lokr_w1_b": rand(rank, b)}
                if tucker:
                    parts.update(lokr_t2=rand(rank, rank, *kernel), lokr_w2_a=rand(rank, c), lokr_w2_b=rand(rank, d))
                else:
                    parts.update(lokr_w2_a=rand(c, rank), lokr_w2_b=rand(rank, d * (flat // inp)))
                r = rank
            w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
            if "lokr_w2" in parts:
                w2 = parts["lokr_w2"]
            elif "lokr_t2" in parts:
                w2 = torch.einsum("ijkl,jr,ip->prkl", parts["lokr_t2"], parts["lokr_w2_b"], parts["lokr_w2_a"])
            else:
                w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
            delta = torch.kron(w1.reshape(a, b, *[1] * (w2.dim() - 2)), w2.contiguous())
        scale = 1.0 if r is None else (alpha or r) / r  # LyCORIS: whole LoKr factors → 1; no or 0 alpha → r
        deltas[f"{module}.weight"] = (delta * scale).reshape(shape)
        tensors.update({f"{key}.{p}": t.float().contiguous() for p, t in parts.items()})
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return path, deltas


@pytest.mark.parametrize("algo", ["loha", "loha-tucker", "lokr", "lokr-w1", "lokr-tucker", "lokr-whole"])
@pytest.mark.parametrize("alpha", [2.0, None, 0.0], ids=["alpha2", "no-alpha", "alpha0"])
def test_lycoris_file_merges_to_lycoris_formula(tmp_path, bases, algo, alpha):
    path, deltas = lycoris_file(tmp_path / "lyco.safetensors", algo, alpha=alpha)
    assert formats.detect(path) == "kohya"
    adapter = formats.read_adapter(path)
    engine.merge(bases[torch.float32], [(adapter, -0.6)], tmp_path / "m.safetensors", fingerprint=False)
    ours, base = merged_tensors(tmp_path / "m.safetensors"), merged_tensors(bases[torch.float32])
    for name, delta in deltas.items():
        exact = base[name].double() - 0.6 * delta
        assert float((ours[name].double() - exact).abs().max()) <= 4e-7 * max(1.0, float(exact.abs().max())), name


def test_lycoris_mixed_with_locon_modules(tmp_path, bases):
    """A LyCORIS preset can give some modules LoKr and others LoCon: each is read as what it is."""
    path, deltas = lycoris_file(tmp_path / "lyco.safetensors", "lokr")
    tensors = st.load_tensors(st.read_header(path))
    tensors = {k: v for k, v in tensors.items() if not k.startswith("lora_unet_proj.")}
    tensors |= {"lora_unet_proj.lora_down.weight": torch.randn(2, 16), "lora_unet_proj.lora_up.weight": torch.randn(24, 2)}
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    adapter = formats.read_adapter(tmp_path / "mixed.safetensors")
    assert {n: m.shown_kind for n, m in adapter.modules.items()} == {
        "lora_unet_conv1": "lokr", "lora_unet_conv3": "lokr", "lora_unet_proj": "linear"}
    report = engine.merge(bases[torch.float32], [(adapter, 1.0)], tmp_path / "m.safetensors", fingerprint=False)
    assert report.tensors_merged == 3


def test_lycoris_network_names(tmp_path, bases):
    """LyCORIS' own network (create_lycoris, as SimpleTuner saves its LoKr/LoHa) names the model it wraps lycoris_…:
    read as a kohya file and bound by module path like lora_unet_… (as ComfyUI maps them); they were refused as "a
    LoKr adapter … outside … a kohya/LyCORIS file"."""
    path, deltas = lycoris_file(tmp_path / "lyco.safetensors", "lokr-w1")
    tensors = st.load_tensors(st.read_header(path))
    save_file({k.replace("lora_unet_", "lycoris_"): v for k, v in tensors.items()}, str(tmp_path / "named.safetensors"))
    adapter = formats.read_adapter(tmp_path / "named.safetensors")
    assert sorted(adapter.modules) == ["lycoris_conv1", "lycoris_conv3", "lycoris_proj"]
    engine.merge(bases[torch.float32], [(adapter, 0.7)], tmp_path / "m.safetensors", fingerprint=False)
    ours, base = merged_tensors(tmp_path / "m.safetensors"), merged_tensors(bases[torch.float32])
    for name, delta in deltas.items():
        exact = base[name].double() + 0.7 * delta
        assert float((ours[name].double() - exact).abs().max()) <= 4e-7 * max(1.0, float(exact.abs().max())), name
    # a FLUX transformer's diffusers paths, bound to a BFL checkpoint: to_k's rows of the fused linear1
    flux = {"single_blocks.0.linear1.weight": SimpleNamespace(shape=(112, 16)),
            "double_blocks.0.img_attn.qkv.weight": SimpleNamespace(shape=(48, 16))}
    to_k = "lycoris_single_transformer_blocks_0_attn_to_k"
    factors = {"hada_w1_a": (16, 2), "hada_w1_b": (2, 16), "hada_w2_a": (16, 2), "hada_w2_b": (2, 16)}
    save_file({f"{to_k}.{part}": torch.ones(shape) for part, shape in factors.items()}, str(tmp_path / "f.safetensors"))
    bound = bind(formats.read_adapter(tmp_path / "f.safetensors"), flux)
    assert [m.fused for m in bound.modules.values()] == [("single_blocks.0.linear1.weight", 16, 16, 112)]


@pytest.mark.registry_backend
def test_lycoris_inspect_and_register_show(tmp_path, bases):
    path, _ = lycoris_file(tmp_path / "lyco.safetensors", "lokr-whole", alpha=16)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()[-3:]}
    assert rows["lora_unet_conv3"] == ["lokr", "-", "16", "1", "8", "6"]  # whole LoKr factors: no rank, scale 1
    loha, _ = lycoris_file(tmp_path / "loha.safetensors", "loha", rank=3, alpha=6)
    report = json.loads(CliRunner().invoke(main, ["inspect", str(loha), "--json"]).output)
    assert report["rank"] == 3 and {m["kind"] for m in report["modules"]} == {"loha"}
    assert {m["scale"] for m in report["modules"]} == {2.0}
    runner = CliRunner()
    for args in (["base", "add", str(bases[torch.float32]), "--name", "tiny"],
                 ["register", str(path), "--name", "kron", "--base", "tiny"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    shown = json.loads(runner.invoke(main, ["show", "kron", "--json"]).output)
    assert {(m["name"], m["kind"], m["rank"]) for m in shown["modules"]} == {
        ("proj", "lokr", None), ("conv1", "lokr", None), ("conv3", "lokr", None)}
    # a whole-factor LoKr module is stored with rank 0 (no rank): `list --rank 0` must not match it
    for rank, names in (("0", []), ("-1", [])):
        listed = json.loads(runner.invoke(main, ["list", "--rank", rank, "--json"]).output)
        assert [a["name"] for a in listed] == names
    merged = runner.invoke(main, ["merge", "kron:0.5", "--into", "tiny", "-o", str(tmp_path / "out.safetensors")])
    assert merged.exit_code == 0, merged.output


def test_resize_makes_a_lora(tmp_path, bases):
    """resize --rank K of a LoHa/LoKr: the SVD of each module's dense ΔW; at full rank the same deltas, and PEFT loads
    the LoRA it writes (the LoHaConfig's fields left behind)."""
    from peft import PeftModel

    adapter_dir = peft_lycoris(tmp_path / "loha", "loha-tucker")
    manifest = st.read_header(bases[torch.float32]).tensors
    adapter = bind(formats.read_adapter(adapter_dir), manifest)
    full, report = algebra.resize(adapter, rank=64)
    assert not full.products and {r.fro_retained for r in report.modules} == {1.0}
    for name, module in full.modules.items():
        assert torch.allclose(module.delta(), adapter.modules[name].delta(), atol=1e-5), name
    formats.write_adapter(full, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "alpha" not in config and "use_effective_conv2d" not in config
    model = PeftModel.from_pretrained(conv_embedding_model(), tmp_path / "lora")
    for name, module in full.modules.items():
        ref = model.base_model.model.get_submodule(name).get_delta_weight("default")
        assert torch.allclose(ref, adapter.modules[name].delta().reshape(ref.shape), atol=1e-5), name
    small, report = algebra.resize(adapter, rank=2)
    assert {m.rank for m in small.modules.values()} == {2}
    for record, (name, module) in zip(report.modules, small.modules.items()):
        D = adapter.modules[name].delta().double()
        err = float((module.delta().double() - D).norm() / D.norm())
        assert err == pytest.approx((1 - record.fro_retained ** 2) ** 0.5, abs=1e-5)


def test_resize_big_modules_by_randomized_svd(tmp_path, bases, monkeypatch):
    """A fixed-rank resize of a LoHa/LoKr module above svd.RANDOMIZED_MIN_DIM takes refactor_dense's randomized SVD
    (an exact one of an LLM's 4096×11008 ΔW takes minutes), its error measured, its sum(S) kept unknown (None,
    shown '-'); --precise and the dynamic rules keep the exact spectrum."""
    from loraops.ops import svd

    monkeypatch.setattr(svd, "RANDOMIZED_MIN_DIM", 4)  # the tiny model's 24×16 Linear counts as big
    adapter = bind(formats.read_adapter(peft_lycoris(tmp_path / "loha", "loha")), st.read_header(bases[torch.float32]).tensors)
    small, report = algebra.resize(adapter, rank=1)  # (2·1 + oversampling < 16 columns: worth sampling)
    record = next(r for r in report.modules if r.name == "proj")
    assert record.rank_after == 1 and record.sum_retained is None
    D = adapter.modules["proj"].delta().double()
    err = float((small.modules["proj"].delta().double() - D).norm() / D.norm())
    assert err == pytest.approx((1 - record.fro_retained ** 2) ** 0.5, abs=1e-5)
    S = torch.linalg.svdvals(D)
    assert err <= 1.001 * float(S[1:].norm() / S.norm())  # as good as the exact truncation
    _, exact = algebra.resize(adapter, rank=1, precise=True)
    _, dynamic = algebra.resize(adapter, dynamic="sv_fro", param=0.9)
    assert None not in {r.sum_retained for r in exact.modules + dynamic.modules}
    from loraops.cli.algebra import percent

    assert percent(None) == "-" and percent(0.5) == "50.00%"


def test_refusals(tmp_path, bases):
    adapter_dir = peft_lycoris(tmp_path / "loha", "loha")
    adapter = formats.read_adapter(adapter_dir)
    for fmt in ("peft", "kohya", "diffusers"):
        with pytest.raises(UnsupportedAdapterError, match="a LoHa adapter .*cannot be written as"):
            formats.write_adapter(bind(adapter, st.read_header(bases[torch.float32]).tensors), tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()
    with pytest.raises(InvalidInputError, match="is a LoHa adapter .*combine works on low-rank factors"):
        algebra.combine([(adapter, 1.0)], "cat")
    with pytest.raises(InvalidInputError, match="stored flattened .*register it against its base"):
        algebra.resize(adapter, rank=2)
    # LyCORIS' weight-decomposed LoHa (dora_scale)
    path, _ = lycoris_file(tmp_path / "lyco.safetensors", "loha")
    tensors = st.load_tensors(st.read_header(path)) | {"lora_unet_proj.dora_scale": torch.ones(24, 1)}
    save_file(tensors, str(tmp_path / "dora.safetensors"))
    with pytest.raises(UnsupportedAdapterError, match="a LyCORIS DoRA adapter"):
        formats.read_adapter(tmp_path / "dora.safetensors")
    # a bare PEFT LoHa weights file without its config says no alpha and no peft_type
    save_file(st.load_tensors(st.read_header(adapter_dir / "adapter_model.safetensors")), str(tmp_path / "bare.safetensors"))
    with pytest.raises(UnsupportedAdapterError, match="a LoHa adapter .*outside a PEFT folder"):
        formats.read_adapter(tmp_path / "bare.safetensors")
    # a LoHa config over LoRA keys, and GLoRA / full-diff LyCORIS files, stay refused in one line
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (tmp_path / "mixed").mkdir()
    save_file({"base_model.model.proj.lora_A.weight": torch.ones(2, 16), "base_model.model.proj.lora_B.weight": torch.ones(24, 2)},
              str(tmp_path / "mixed" / "adapter_model.safetensors"))
    (tmp_path / "mixed" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="lora_A/lora_B keys .* in a LOHA adapter"):
        formats.read_adapter(tmp_path / "mixed")
    for keys, what in (({"lora_unet_proj.diff": torch.ones(24, 16)}, "full-weight difference"),
                       ({"lora_unet_proj.a1.weight": torch.ones(2, 16), "lora_unet_proj.a2.weight": torch.ones(24, 2),
                         "lora_unet_proj.b1.weight": torch.ones(2, 16), "lora_unet_proj.b2.weight": torch.ones(24, 2)},
                        "LyCORIS GLoRA"),
                       ({"lora_unet_proj.weight": torch.ones(16), "lora_unet_proj.on_input": torch.tensor(True)},
                        r"LyCORIS \(IA\)³")):
        save_file(keys, str(tmp_path / "other.safetensors"))
        with pytest.raises(UnsupportedAdapterError, match=what):
            formats.read_adapter(tmp_path / "other.safetensors")
    result = CliRunner().invoke(main, ["export", str(adapter_dir), "--format", "kohya", "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "x.safetensors").exists()


def test_peft_lokr_conv1d(tmp_path):
    """PEFT's LoKr on a Conv1d: a factored w2 is the plain Kronecker product (PEFT's delta); a whole 3-D lokr_w2 PEFT
    multiplies as torch.kron(a×b, c×d×k), another layout: refused in one line, not merged wrong."""
    import peft

    class Audio(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(8, 12, 3)

    for r, ok in ((1, True), (2, False)):  # r 1: w2 4×12 factored; r 2 ≥ max(4, 4)/2: w2 stored whole, 4×4×3
        torch.manual_seed(0)
        model = peft.get_peft_model(Audio(), peft.LoKrConfig(r=r, alpha=3, target_modules=["conv"], init_weights=False))
        model.save_pretrained(tmp_path / f"r{r}")
        if not ok:
            with pytest.raises(InvalidInputError, match="PEFT LoKr on a Conv1d with lokr_w2 stored whole"):
                formats.read_adapter(tmp_path / f"r{r}")
            continue
        save_state_dict(Audio(), tmp_path / "base.safetensors")
        module = bind(formats.read_adapter(tmp_path / f"r{r}"), st.read_header(tmp_path / "base.safetensors").tensors)
        expected = model.base_model.model.conv.get_delta_weight("default").detach()
        assert torch.allclose(module.modules["conv"].delta(), expected, rtol=1e-6, atol=1e-7)


def test_identity_covers_loha_alpha(tmp_path):
    adapter_dir = peft_lycoris(tmp_path / "a", "loha")
    first = formats.identity(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "alpha": 12}))
    assert formats.identity(adapter_dir) != first
    assert formats.read_adapter(adapter_dir).modules["proj"].scale == 3.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merge_matches_cpu(tmp_path, bases):
    """The engine's product branch on CUDA: the same code, factors on the device; equal to the CPU merge within one
    bf16 rounding (float64 matmuls on both, but in another order)."""
    path, _ = lycoris_file(tmp_path / "lyco.safetensors", "lokr-tucker")
    adapter = formats.read_adapter(peft_lycoris(tmp_path / "loha", "loha-tucker", torch.bfloat16))
    inputs = [(adapter, 0.5), (formats.read_adapter(path), -1.0)]
    for device in ("cpu", "cuda"):
        engine.merge(bases[torch.bfloat16], inputs, tmp_path / f"{device}.safetensors", device=device, fingerprint=False)
    cpu, cuda = merged_tensors(tmp_path / "cpu.safetensors"), merged_tensors(tmp_path / "cuda.safetensors")
    assert all(int(ulps(cpu[k], cuda[k]).max()) <= 1 for k in cpu)


def test_push_card_says_loha(tmp_path):
    """The model card pushed with a LoHa adapter said "A kohya / sd-scripts LoRA" with rank and alpha, which a
    reader would merge as W + s·B·A: it names LoHa (tag, title line, variant row with ΔW's formula)."""
    from loraops import hub
    from loraops.registry import Registry

    path, _ = lycoris_file(tmp_path / "loha.safetensors", "loha")
    with Registry.open() as reg:
        record = reg.register_adapter(str(path), name="lh").record
        card = hub.render_card(hub.card_info(reg, record, "kohya"))
    front, body = card.split("---\n")[1], card.split("---\n")[2]
    assert '- "loha"' in front and "A kohya / sd-scripts LoHa, published with loraops." in body
    assert "| variant | LoHa: ΔW = scale·(w1a·w1b)⊙(w2a·w2b) |" in body


@pytest.mark.parametrize("rule", [{"rank": 2}, {"dynamic": "sv_fro", "param": 0.9}])
def test_resize_runs_a_product_adapters_modules_side_by_side(tmp_path, bases, monkeypatch, three_threads, rule):
    """A LoHa/LoKr module's dense SVD is on one thread, so resize runs such an adapter's modules ahead on torch's
    threads (settings.in_order), one torch thread each; the result is the same bytes as at one thread."""
    import threading

    from loraops.ops import resize

    adapter = bind(formats.read_adapter(peft_lycoris(tmp_path / "loha", "loha")),
                   st.read_header(bases[torch.float32]).tensors)
    seen, factorize = [], resize.factorize_dense

    def spy(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return factorize(*args, **kwargs)

    monkeypatch.setattr(resize, "factorize_dense", spy)
    ahead, report = algebra.resize(adapter, **rule, device="cpu")
    assert len(seen) == len(adapter.modules) > 1
    assert {count for _, count in seen} == {1} and all(name.startswith("loraops-ahead") for name, _ in seen)
    assert [r.name for r in report.modules] == list(adapter.modules)  # (in order)
    torch.set_num_threads(1)
    alone, _ = algebra.resize(adapter, **rule, device="cpu")
    assert {name for name, _ in seen[len(adapter.modules):]} == {threading.current_thread().name}
    assert list(ahead.modules) == list(alone.modules)
    for name, module in ahead.modules.items():
        assert torch.equal(module.A, alone.modules[name].A) and torch.equal(module.B, alone.modules[name].B), name
