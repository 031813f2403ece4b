import math

import pytest
import torch

from loraops.adapter import LoraModule
from loraops.ops.resize import RankRule, alpha_for_scale, resize_module

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass

SPECTRUM = [10.0, 5.0, 2.0, 1.0, 0.5, 0.1]


def _module(S, out=20, n=30, scale=0.5, seed=0, kind="linear"):
    """A module whose unscaled B·A has exactly the singular values S."""
    g = torch.Generator().manual_seed(seed)
    r = len(S)
    U = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    B, A = (U * torch.tensor(S, dtype=torch.float64)).float(), V.T.float()
    return LoraModule("m", A=A, B=B, alpha=scale * r, scale=scale, kind=kind)


def _rank(rule, S=SPECTRUM):
    module = _module(S)
    resized, record = resize_module(module, RankRule(**rule), "classic", torch.device("cpu"), torch.float32)
    assert resized.rank == record.rank_after
    return record.rank_after


@pytest.mark.parametrize("p, k", [(1, 1), (4, 2), (4.9, 2), (9, 3), (25, 5), (1000, 6)])
def test_sv_ratio(p, k):
    # kohya: k = #{S > S[0]/p} (strict), at least 1
    assert _rank({"dynamic": "sv_ratio", "param": p}) == k


@pytest.mark.parametrize("p, k", [(0.5, 1), (0.9, 3), (0.95, 4), (0.99, 5), (1.0, 6)])
def test_sv_cumulative(p, k):
    # cumulative fractions of ΣS = 18.6: .538 .806 .914 .968 .995 1 → first index reaching p, + 1
    assert _rank({"dynamic": "sv_cumulative", "param": p}) == k


@pytest.mark.parametrize("p, k", [(0.5, 1), (0.9, 2), (0.995, 3), (1.0, 6)])
def test_sv_fro(p, k):
    # cumulative fractions of ΣS² = 130.26: .768 .960 .990 .998 .9999 1, compared with p²
    assert _rank({"dynamic": "sv_fro", "param": p}) == k


def test_max_rank_caps_dynamic_and_module_rank_caps_everything():
    assert _rank({"dynamic": "sv_ratio", "param": 10, "max_rank": 2}) == 2
    assert _rank({"dynamic": "sv_ratio", "param": 1000, "max_rank": 64}) == 6
    assert _rank({"rank": 3}) == 3


def test_zero_module_stays_rank_one_zero():
    module = LoraModule("z", A=torch.zeros(4, 9), B=torch.zeros(7, 4), alpha=4, scale=1.0)
    resized, record = resize_module(module, RankRule(dynamic="sv_fro", param=0.9), "classic", torch.device("cpu"),
                                    torch.float32)
    assert resized.rank == 1 and not resized.delta().any() and record.fro_retained == 1.0


def test_fixed_rank_is_best_approximation_and_keeps_scale():
    module = _module(SPECTRUM, scale=0.5)
    resized, record = resize_module(module, RankRule(rank=3), "classic", torch.device("cpu"), torch.float64)
    assert resized.scale == 0.5 and resized.alpha == 1.5
    D = module.delta(dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(D)
    torch.testing.assert_close(resized.delta(dtype=torch.float64), U[:, :3] @ torch.diag(S[:3]) @ Vh[:3],
                               rtol=1e-6, atol=1e-6)
    assert record.fro_retained == pytest.approx(math.sqrt(129 / 130.26), rel=1e-6)
    assert record.sum_retained == pytest.approx(17 / 18.6, rel=1e-6)


def test_full_rank_is_lossless_and_rslora_alpha():
    module = _module([3.0, 2.0, 1.0, 0.5])
    resized, _ = resize_module(module, RankRule(rank=4), "rslora", torch.device("cpu"), torch.float32)
    torch.testing.assert_close(resized.delta(), module.delta(), rtol=1e-5, atol=1e-6)
    assert resized.alpha == pytest.approx(module.scale * 2.0)
    assert alpha_for_scale(0.5, 16, "classic") == 8.0 and alpha_for_scale(0.5, 16, "rslora") == 2.0


def test_conv_kxk_and_dtype_kept():
    g = torch.Generator().manual_seed(3)
    module = LoraModule("c", A=torch.randn(6, 4, 3, 3, generator=g).bfloat16(),
                        B=torch.randn(5, 6, 1, 1, generator=g).bfloat16(), alpha=6, scale=1.0, kind="conv")
    resized, _ = resize_module(module, RankRule(rank=5), "classic", torch.device("cpu"), torch.float32)
    assert resized.A.shape == (5, 4, 3, 3) and resized.B.shape == (5, 5, 1, 1)
    assert resized.A.dtype == torch.bfloat16
    D = module.delta(dtype=torch.float64).reshape(5, -1)
    assert torch.linalg.matrix_rank(D) == 5  # out = 5: rank 5 is lossless
    torch.testing.assert_close(resized.delta(dtype=torch.float64).reshape(5, -1), D, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("rule, message", [
    ({}, "either a rank or a dynamic rule"),
    ({"rank": 2, "dynamic": "sv_fro", "param": 0.5}, "either a rank"),
    ({"dynamic": "sv_fro"}, "needs a param"),
    ({"dynamic": "sv_fro", "param": 1.5}, "fraction in (0, 1]"),
    ({"dynamic": "sv_ratio", "param": 0.5}, "≥ 1"),
    ({"rank": 0}, "greater than 0"),
    ({"rank": 2, "max_rank": 4}, "go with a dynamic rule"),
    ({"dynamic": "sv_nope", "param": 1}, "sv_ratio"),
])
def test_bad_rules(rule, message):
    from loraops.errors import InvalidInputError
    from loraops.ops.params import parse_params

    with pytest.raises(InvalidInputError, match="bad parameters for resize") as info:
        parse_params(RankRule, rule, "resize")
    assert message in str(info.value) and "\n" not in str(info.value)
