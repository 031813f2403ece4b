import torch

from loraops.adapter import LoraModule
import pytest

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass


def _module(kind, fan_in_fan_out=False):
    g = torch.Generator().manual_seed(0)
    if kind == "conv":
        A, B = torch.randn(3, 4, 3, 3, generator=g), torch.randn(5, 3, 1, 1, generator=g)
    else:
        A, B = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    return LoraModule("m", A=A, B=B, alpha=6.0, scale=2.0, kind=kind, fan_in_fan_out=fan_in_fan_out)


def test_linear_delta_and_row_chunks():
    m = _module("linear")
    full = m.delta()
    assert full.shape == m.weight_shape == (5, 7)
    torch.testing.assert_close(full, 2.0 * m.B @ m.A)
    torch.testing.assert_close(torch.cat([m.delta(slice(0, 2)), m.delta(slice(2, 5))]), full)


def test_transposed_layouts():
    for m in (_module("linear", fan_in_fan_out=True), _module("embedding")):
        assert m.weight_shape == (7, 5)
        torch.testing.assert_close(m.delta(), 2.0 * (m.B @ m.A).T)
        torch.testing.assert_close(torch.cat([m.delta(slice(0, 3)), m.delta(slice(3, 7))]), m.delta())


def test_conv_delta_is_composition_of_convolutions():
    m = _module("conv")
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    composed = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, m.A.double()), m.B.double()) * 2.0
    merged = torch.nn.functional.conv2d(x, m.delta(dtype=torch.float64))
    torch.testing.assert_close(merged, composed)


def test_with_factors_keeps_layout():
    m = _module("conv")
    B2, A2 = m.matrices()
    again = m.with_factors(B2, A2, alpha=m.alpha, scale=m.scale)
    torch.testing.assert_close(again.delta(), m.delta())
    assert again.A.shape == m.A.shape and again.B.shape == m.B.shape
