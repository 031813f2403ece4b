"""loraops against the LyCORIS package itself (lycoris-lora 4.1.3): networks built and saved by LyCORIS' own code
(``lycoris.kohya.create_network`` as sd-scripts saves them, ``lycoris.create_lycoris`` as SimpleTuner does), every
parameter random, merged by loraops and compared with the ΔW LyCORIS' modules apply in their forward pass
(``get_weight(shape) * scalar`` for LoHa/LoKr, ``get_diff_weight`` for LoCon), in float64, from the file's values.

Not LyCORIS' ``merge_to``: for LoHa/LoKr it applies the scale twice (docs/lycoris.md). Not a LoKr with both
factors whole trained with ``rs_lora``: its training forward used √dim where every reader of the file (LyCORIS'
loader, ComfyUI, loraops) uses 1. Skipped when ``lycoris`` is not importable."""
from __future__ import annotations

import logging
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

lycoris = pytest.importorskip("lycoris")
from lycoris import create_lycoris, create_lycoris_from_weights  # noqa: E402
from lycoris.kohya import create_network  # noqa: E402

from loraops import engine, formats  # noqa: E402

MANT = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


class ResnetBlock2D(nn.Module):  # class names LyCORIS' sd-scripts network targets
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(32, 48, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(32, 48, 1)
        self.time_emb_proj = nn.Linear(16, 48)
        self.conv1d = nn.Conv1d(32, 48, 3)
        self.conv_wide = nn.Conv2d(32, 48, (3, 5))
        self.grouped = nn.Conv2d(32, 32, 3, groups=2)


class Transformer2DModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(48, 64)
        self.to_q = nn.Linear(64, 64, bias=False)
        self.ff_net_2 = nn.Linear(64, 48)
        self.odd = nn.Linear(7, 13)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.down_blocks = nn.ModuleList([ResnetBlock2D()])
        self.mid_attn = Transformer2DModel()


CONFIGS = {
    "loha": dict(algo="loha", dim=4, alpha=2.0),
    "loha-tucker-scalar": dict(algo="loha", dim=3, alpha=5.0, use_tucker=True, use_scalar=True, conv_dim=2,
                               conv_alpha=1.0),
    "lokr": dict(algo="lokr", dim=2, alpha=3.0),  # w1 whole, w2 factored
    "lokr-both": dict(algo="lokr", dim=1, alpha=0.0, decompose_both=True),  # alpha 0: alpha = dim
    "lokr-tucker": dict(algo="lokr", dim=2, alpha=1.0, use_tucker=True, decompose_both=True, conv_dim=1),
    "lokr-whole": dict(algo="lokr", dim=4, alpha=7.0, full_matrix=True),  # scale 1
    "lokr-factor-unbalanced": dict(algo="lokr", dim=2, alpha=2.0, factor=4, unbalanced_factorization=True,
                                   decompose_both=True),
    "locon-tucker": dict(algo="locon", dim=4, alpha=2.0, use_tucker=True, conv_dim=2, conv_alpha=2.0),
}
CASES = [  # (config, sd-scripts names, file dtype, base dtype, weight)
    ("loha", True, torch.float32, torch.float32, -0.7),
    ("loha-tucker-scalar", False, torch.float16, torch.bfloat16, 0.5),
    ("lokr", True, torch.bfloat16, torch.float16, 1.0),
    ("lokr-both", False, torch.float32, torch.float32, 0.5),
    ("lokr-tucker", True, torch.float32, torch.bfloat16, -0.7),
    ("lokr-whole", False, torch.float32, torch.float32, 1.3),
    ("lokr-factor-unbalanced", True, torch.float16, torch.float32, -1.0),
    ("locon-tucker", False, torch.float32, torch.float16, 0.5),
]


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(dtype).tiny))) - MANT[dtype])


def lycoris_delta(module) -> torch.Tensor:
    """The ΔW a LyCORIS module applies in its forward pass at multiplier 1."""
    if type(module).__name__ in ("LohaModule", "LokrModule"):
        return (module.get_weight(module.shape) * module.scalar).detach()
    return module.get_diff_weight(1.0)[0].detach()


def lycoris_file(tmp_path, config: str, kohya: bool, file_dtype, base_dtype, seed: int = 0):
    """(base path, adapter path, base tensors, {base tensor: (LyCORIS module, float64 ΔW from the file)})."""
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    model = Tiny()
    base = {k: v.detach().clone().to(base_dtype) for k, v in model.state_dict().items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    kw = dict(CONFIGS[config])
    dim, alpha = kw.pop("dim"), kw.pop("alpha")
    if kohya:
        net = create_network(1.0, dim, alpha, None, None, model, warn_on_unmatched=False, **kw)
        net.apply_to(None, model, False, True)
        prefix = "lora_unet_"
    else:
        net = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=alpha, warn_on_unmatched=False, **kw)
        net.apply_to()
        prefix = "lycoris_"
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LyCORIS zero-initialises one factor: every parameter random (use_scalar's too)
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path / "lyco.safetensors"
    net.save_weights(str(path), file_dtype, {})
    saved = load_file(str(path))
    net = net.double()
    net.load_state_dict({k: v.double() for k, v in saved.items()}, strict=False)  # (resets scalar to 1)
    paths = {name.replace(".", "_"): name for name, _ in model.named_modules()}
    deltas = {}
    for module in net.loras:
        module.scale = float(saved[f"{module.lora_name}.alpha"].double()) / module.lora_dim  # alpha as the file has it
        deltas[paths[module.lora_name[len(prefix):]] + ".weight"] = (module, lycoris_delta(module))
    assert len(deltas) >= 9
    return tmp_path / "base.safetensors", path, base, deltas


@pytest.mark.parametrize("config,kohya,file_dtype,base_dtype,weight", CASES, ids=[c[0] for c in CASES])
def test_merge_matches_lycoris_package(tmp_path, config, kohya, file_dtype, base_dtype, weight):
    base_path, path, base, deltas = lycoris_file(tmp_path, config, kohya, file_dtype, base_dtype)
    adapter = formats.read_adapter(path)
    engine.merge(base_path, [(adapter, weight)], tmp_path / "out.safetensors", fingerprint=False, progress=False)
    merged = load_file(str(tmp_path / "out.safetensors"))
    assert merged.keys() == base.keys()
    for name, tensor in base.items():
        if name not in deltas:
            assert torch.equal(merged[name], tensor), name
            continue
        module, delta = deltas[name]
        exact = tensor.double() + weight * delta.reshape(tensor.shape)
        err = (merged[name].double() - exact).abs()
        assert merged[name].dtype == base_dtype
        if base_dtype == torch.float32:
            # at least as close as LyCORIS' own float32 forward ΔW added in float32, within one unit at the tensor's
            # scale (a Tucker core and LoCon's float32 matmul take roundings of their own)
            module.float()
            theirs = (tensor + weight * lycoris_delta(module).reshape(tensor.shape)).double()
            module.double()
            bound = float((theirs - exact).abs().max()) + float(ulp(exact.abs().max(), torch.float32))
            assert float(err.max()) <= bound, (name, float(err.max()), bound)
        else:  # one unit of rounding of the output dtype (the float32 accumulator shows only at cancellation)
            bound = ulp(exact, base_dtype) + 1e-6 * exact.abs().max()
            assert bool((err <= bound).all()), (name, float((err / bound).max()))


@pytest.mark.parametrize("config", ["loha", "lokr", "lokr-both", "lokr-whole", "locon-tucker"])
def test_module_deltas_equal_lycoris_loader(tmp_path, config):
    """Each module's delta() equals the ΔW of the module LyCORIS' own loader (create_lycoris_from_weights) builds
    from the same file (its loader cannot read a Tucker LoKr: it takes r from lokr_w2_a.size(1))."""
    _, path, base, _ = lycoris_file(tmp_path, config, False, torch.float32, torch.float32)
    model = Tiny().double()
    model.load_state_dict({k: v.double() for k, v in base.items()})
    net, _ = create_lycoris_from_weights(1.0, str(path), model)
    theirs = {}
    for module in net.loras:
        module.double()
        theirs[module.lora_name] = lycoris_delta(module)
    adapter = formats.read_adapter(path)
    assert sorted(adapter.modules) == sorted(theirs)
    for name, module in adapter.modules.items():
        ours = module.delta().double().reshape(-1)
        ref = theirs[name].reshape(-1)
        assert float((ours - ref).abs().max()) <= 1e-6 * float(ref.abs().max()), name


def test_dylora_conv_merges_as_its_factors(tmp_path):
    """LyCORIS' DyLoRA saves a conv's lora_up out×r (2-D) beside its r×in×k×k lora_down (a Linear's is a plain LoRA):
    read as the conv LoRA it is (it was refused: "conv factors must both be 3-, 4- or 5-D"), merged as
    W + w·(alpha/r)·up·down, the product DyLoRA's forward applies at its full rank."""
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = nn.Module()
    model.conv, model.proj = nn.Conv2d(8, 12, 3), nn.Linear(16, 16)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=3.0, algo="dylora")
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    net.save_weights(str(tmp_path / "dy.safetensors"), torch.float32, {})
    saved = load_file(str(tmp_path / "dy.safetensors"))
    assert saved["lycoris_conv.lora_up.weight"].shape == (12, 4)  # the layout this test is about
    engine.merge(tmp_path / "base.safetensors", [(formats.read_adapter(tmp_path / "dy.safetensors"), -0.5)],
                 tmp_path / "out.safetensors", fingerprint=False, progress=False)
    merged = load_file(str(tmp_path / "out.safetensors"))
    for name in ("conv", "proj"):
        up, down = (saved[f"lycoris_{name}.{part}.weight"].double() for part in ("lora_up", "lora_down"))
        scale = float(saved[f"lycoris_{name}.alpha"]) / down.shape[0]
        weight = base[f"{name}.weight"]
        exact = weight.double() - 0.5 * scale * (up.reshape(up.shape[0], -1) @ down.flatten(1)).reshape(weight.shape)
        assert float((merged[f"{name}.weight"].double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max()), name
    assert torch.equal(merged["conv.bias"], base["conv.bias"])


@pytest.mark.parametrize("algo,said", [("glora", "a LyCORIS GLoRA adapter"), ("ia3", "a LyCORIS (IA)³ adapter"),
                                       ("tlora", "a LyCORIS T-LoRA adapter")])
def test_lycoris_named_methods_are_refused_by_name(tmp_path, algo, said):
    """GLoRA, (IA)³ and T-LoRA files from LyCORIS' own network (lycoris_… names, as SimpleTuner saves them) are refused
    naming the method, as the same files under sd-scripts' lora_unet_… names are (they were "unknown keys")."""
    from loraops.errors import UnsupportedAdapterError

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = nn.Module()
    model.proj = nn.Linear(16, 16)
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=1.0, algo=algo)
    net.apply_to()
    net.save_weights(str(tmp_path / f"{algo}.safetensors"), torch.float32, {})
    assert any(k.startswith("lycoris_proj.") for k in load_file(str(tmp_path / f"{algo}.safetensors")))
    with pytest.raises(UnsupportedAdapterError, match=f"^{tmp_path / algo}.safetensors: {re.escape(said)}"):
        formats.read_adapter(tmp_path / f"{algo}.safetensors")
