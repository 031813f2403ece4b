"""Shared by the engine tests: canonical adapters taken from a live PEFT model, ulp distances, float64 references."""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from loraops.adapter import Adapter, LoraModule


def adapter_of(peft_model, name: str = "default", path: Path | None = None) -> Adapter:
    """The canonical Adapter for one adapter loaded in a PeftModel (factors exactly as PEFT holds them)."""
    from peft.tuners.lora import LoraLayer

    modules = {}
    for module_path, layer in peft_model.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer) or name not in layer.scaling:
            continue
        if name in layer.lora_A:
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            kind = "conv" if A.dim() == 4 else "linear"
        else:
            A, B = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
            kind = "embedding"
        modules[module_path] = LoraModule(
            module_path, A.detach().clone(), B.detach().clone(), alpha=float(layer.lora_alpha[name]),
            scale=float(layer.scaling[name]), kind=kind, fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
        )
    return Adapter(modules, "peft", path=path)


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units of the last place between two tensors of the same floating dtype."""
    assert a.dtype == b.dtype
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]

    def key(x):
        i = x.contiguous().view(bits).to(torch.int64)
        return torch.where(i < 0, torch.iinfo(bits).min - i, i)

    return (key(a) - key(b)).abs()


def reference64(base: torch.Tensor, terms: list[tuple[LoraModule, float]]) -> torch.Tensor:
    """W + Σ w·s·B·A computed in float64 from the module's own delta()."""
    out = base.double()
    for module, weight in terms:
        out = out + weight * module.delta(dtype=torch.float64)
    return out


def dora_reference64(base: torch.Tensor, terms: list[tuple[LoraModule, float]]) -> torch.Tensor:
    """What PEFT's merge and forward compute with the adapters active in the order of ``terms``, in float64: a plain
    module adds w·s·B·A; a DoRA module takes W' to f ⊙ (W' + Δ), f = m/‖W + Δ‖ per output channel (a row of W, a column
    of a transposed one), Δ = w·s·B·A, W the base."""
    w0 = base.double()
    out = w0.clone()
    for module, weight in terms:
        delta = weight * module.delta(dtype=torch.float64)
        if module.magnitude is None:
            out = out + delta
            continue
        both = (w0 + delta).reshape(w0.shape[0], -1)
        if module.transposed:
            factors = (module.magnitude.double() / both.norm(dim=0)).reshape(1, -1)
        else:
            factors = (module.magnitude.double() / both.norm(dim=1)).reshape(-1, *[1] * (w0.dim() - 1))
        out = factors * (out + delta)
    return out


def torch_threads_everywhere() -> tuple[int, int]:
    """The torch thread count here and in a thread started now (with OpenMP each thread has its own)."""
    seen = []
    fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    return torch.get_num_threads(), seen[0]
