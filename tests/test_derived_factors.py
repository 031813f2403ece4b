"""Factors readers compose from finite stored ones (a Tucker core contracted into its down factor: kohya/LyCORIS
LoCon, LoHa, LoKr; AdaLoRA's B·diag(E); VeRA's diag(λ_b)·vera_B·diag(λ_d)), formed in float64 and kept in float32:
stored values near 1e20 compose to 1e40, which float32 rounds to inf. Each is refused in one line that names the
module and the product (it said a stored tensor, which holds none, "contains NaN or Inf"), also on a read whose
stored values a stamp vouches for (``checked``: that skips the stored tensors' check, not the composed ones')."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from loraops.errors import InvalidInputError
from loraops.formats import read_adapter

BIG = 1e20
LYCORIS = {"ss_network_module": "lycoris.kohya"}


def _file(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def kohya_tucker(tmp_path, big=BIG):
    return _file(tmp_path / "locon.safetensors", {
        "lora_unet_conv.lora_down.weight": torch.full((2, 8, 1, 1), big),
        "lora_unet_conv.lora_mid.weight": torch.full((2, 2, 3, 3), big),
        "lora_unet_conv.lora_up.weight": torch.ones(6, 2, 1, 1)}, LYCORIS)


def loha_tucker(tmp_path, big=BIG):
    return _file(tmp_path / "loha.safetensors", {
        "lora_unet_conv.hada_w1_a": torch.ones(2, 6), "lora_unet_conv.hada_w1_b": torch.full((2, 8), big),
        "lora_unet_conv.hada_t1": torch.full((2, 2, 3, 3), big),
        "lora_unet_conv.hada_w2_a": torch.ones(2, 6), "lora_unet_conv.hada_w2_b": torch.ones(2, 8),
        "lora_unet_conv.hada_t2": torch.ones(2, 2, 3, 3)}, LYCORIS)


def lokr_tucker(tmp_path, big=BIG):
    return _file(tmp_path / "lokr.safetensors", {
        "lora_unet_conv.lokr_w1": torch.ones(2, 2),
        "lora_unet_conv.lokr_w2_a": torch.ones(2, 3), "lora_unet_conv.lokr_w2_b": torch.full((2, 4), big),
        "lora_unet_conv.lokr_t2": torch.full((2, 2, 3, 3), big)}, LYCORIS)


def _peft(folder, config, tensors):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"target_modules": ["lin"], **config}))
    _file(folder / "adapter_model.safetensors", {f"base_model.{k}": v for k, v in tensors.items()})
    return folder


def adalora(tmp_path, big=BIG, e=None):
    return _peft(tmp_path / "adalora", {"peft_type": "ADALORA", "init_r": 2, "lora_alpha": 2}, {
        "model.lin.lora_A": torch.ones(2, 4), "model.lin.lora_B": torch.full((6, 2), big),
        "model.lin.lora_E": torch.full((2, 1), big if e is None else e)})


def vera(tmp_path, big=BIG):
    return _peft(tmp_path / "vera", {"peft_type": "VERA", "r": 2, "save_projection": True}, {
        "vera_A": torch.ones(2, 4), "vera_B": torch.full((6, 2), big),
        "model.lin.vera_lambda_b": torch.full((6,), big), "model.lin.vera_lambda_d": torch.ones(2)})


CASES = {
    "kohya Tucker": (kohya_tucker, "lora_unet_conv", "the Tucker composition of lora_unet_conv.lora_mid.weight and "
                                                     "lora_unet_conv.lora_down.weight"),
    "LoHa Tucker": (loha_tucker, "lora_unet_conv", "the Tucker composition of lora_unet_conv.hada_t1 and "
                                                   "lora_unet_conv.hada_w1_b"),
    "LoKr Tucker": (lokr_tucker, "lora_unet_conv", "the Tucker composition of lora_unet_conv.lokr_t2 and "
                                                   "lora_unet_conv.lokr_w2_b"),
    "AdaLoRA": (adalora, "lin", "base_model.model.lin.lora_B·diag(base_model.model.lin.lora_E)"),
    "VeRA": (vera, "lin", "diag(base_model.model.lin.vera_lambda_b)·vera_B·diag(base_model.model.lin.vera_lambda_d)"),
}


@pytest.mark.no_registry
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("checked", [False, True])
def test_a_composed_factor_beyond_float32_is_refused(case, checked, tmp_path):
    make, module, product = CASES[case]
    path = make(tmp_path)
    with pytest.raises(InvalidInputError, match=re.escape(f"module {module!r}: {product} goes beyond what float32 "
                                                          "holds")):
        read_adapter(path, checked=checked)


@pytest.mark.no_registry
@pytest.mark.parametrize("case", CASES)
def test_the_same_factors_within_float32_are_read(case, tmp_path):
    make, module, _ = CASES[case]
    adapter = read_adapter(make(tmp_path, big=1e15))
    assert module in adapter.modules


@pytest.mark.no_registry
def test_a_nan_stored_in_adalora_s_b_is_named_as_stored(tmp_path):
    """B is checked before E is folded into it: a NaN it holds is the stored tensor's, not an overflow."""
    folder = adalora(tmp_path, big=float("nan"), e=1.0)
    with pytest.raises(InvalidInputError, match=re.escape("tensor 'base_model.model.lin.lora_B' contains NaN or Inf")):
        read_adapter(folder)


@pytest.mark.no_registry
def test_an_rslora_scale_whose_kohya_alpha_overflows_is_refused(tmp_path):
    """kohya has no rsLoRA: its alpha is scale·r, where PEFT's is scale·√r. An rsLoRA alpha float32 holds (3e38 at
    r 16) is 1.2e39 there: written as an inf alpha with exit 0, which no reader takes (loraops refuses it). Refused
    with nothing written; PEFT keeps it."""
    from loraops.formats import write_adapter

    folder = _peft(tmp_path / "rslora", {"peft_type": "LORA", "r": 16, "lora_alpha": 3e38, "use_rslora": True}, {
        "model.lin.lora_A.weight": torch.full((16, 4), 1e-30), "model.lin.lora_B.weight": torch.full((6, 16), 1e-30)})
    adapter = read_adapter(folder)
    with pytest.raises(InvalidInputError, match=re.escape("module 'lin': scale 7.5e+37 at rank 16 is alpha 1.2e+39, "
                                                          "beyond what float32 holds")):
        write_adapter(adapter, tmp_path / "out.safetensors", "kohya")
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())
    assert read_adapter(write_adapter(adapter, tmp_path / "peft", "peft")).modules["lin"].alpha == 3e38


TUCKER = [case for case in CASES if "Tucker" in case]


@pytest.mark.no_registry
@pytest.mark.parametrize("case", TUCKER)
def test_a_tucker_composition_bounded_within_float32_is_not_scanned(case, monkeypatch, tmp_path):
    """r·max|mid|·max|down| bounds the composed kernel: where that is within float32 it cannot overflow, and the
    composed factor (k·k times the stored down factor) is not scanned; the scan was a quarter of the time of a stamped
    (checked) load of a Tucker LoHa (60 3×3 convs 640→640 at rank 32: 70 of 220-300 ms)."""
    from loraops.formats import common

    scanned = []
    monkeypatch.setattr(common, "check_derived", lambda *args: scanned.append(args[2]))
    make, module, _ = CASES[case]
    assert module in read_adapter(make(tmp_path, big=1e15), checked=True).modules
    assert scanned == []


@pytest.mark.no_registry
def test_a_tucker_composition_past_its_bound_that_cancels_is_read(tmp_path):
    """Past the bound the composed factor is scanned, not refused: opposite cores cancel to 0 here."""
    mid = torch.full((2, 2, 3, 3), BIG)
    mid[:, 1] = -BIG
    path = _file(tmp_path / "locon.safetensors", {
        "lora_unet_conv.lora_down.weight": torch.full((2, 8, 1, 1), BIG),
        "lora_unet_conv.lora_mid.weight": mid, "lora_unet_conv.lora_up.weight": torch.ones(6, 2, 1, 1)}, LYCORIS)
    adapter = read_adapter(path, checked=True)
    assert not adapter.modules["lora_unet_conv"].A.any()


@pytest.mark.no_registry
@pytest.mark.parametrize("case", CASES)
def test_a_shapes_only_read_composes_nothing_to_check(case, tmp_path):
    """values=False (inspect, shapes only): the composed factors are on the meta device, with no values to scan."""
    make, module, _ = CASES[case]
    assert module in read_adapter(make(tmp_path), values=False).modules
