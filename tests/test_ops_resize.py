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


def _kohya_rank_resize(S: torch.Tensor, cap: int, method: str | None, p: float | None) -> tuple[int, float, float]:
    """sd-scripts networks/resize_lora.py's rank_resize, ported: (new rank, fro retained, sum retained) for the
    singular values S of a module's dense up·down (cap: --new_rank, or --new_conv_rank for a 4-D lora_down)."""
    n = len(S)

    def index(i: int) -> int:
        return max(0, min(i, n - 1))

    if method == "sv_ratio":
        k = index(int((S > S[0] / p).sum()) - 1) + 1
    elif method == "sv_cumulative":
        k = index(int(torch.searchsorted(torch.cumsum(S, 0) / float(S.sum()), p))) + 1
    elif method == "sv_fro":
        k = index(int(torch.searchsorted(torch.cumsum(S.pow(2), 0) / float(S.pow(2).sum()), p ** 2))) + 1
    else:
        k = cap
    k = 1 if S[0] <= 1e-6 else min(k, cap)
    return k, float(S[:k].pow(2).sum().sqrt() / S.pow(2).sum().sqrt()), float(S[:k].sum() / S.sum())


@pytest.mark.parametrize("rule", [
    {"rank": 3}, {"dynamic": "sv_ratio", "param": 8}, {"dynamic": "sv_cumulative", "param": 0.9},
    {"dynamic": "sv_fro", "param": 0.9}, {"dynamic": "sv_fro", "param": 0.99, "max_rank": 3},
    {"dynamic": "sv_fro", "param": 0.99, "max_rank": 5, "conv_rank": 2},
])
def test_a_kohya_file_resizes_as_resize_lora_py(tmp_path, rule):
    """A kohya file (fp16; a Linear, a 3×3 conv, one without .alpha, one with in < rank, one never trained): each
    module's rank, alpha, fro and sum retained are resize_lora.py's (its rules on the dense SVD, its alpha = scale·k),
    and the means are its average (which leaves out the untrained module's 0/0)."""
    from safetensors.torch import load_file, save_file

    from loraops import algebra
    from loraops.formats import read_adapter

    g, r = torch.Generator().manual_seed(0), 8
    decay = torch.logspace(0, -2, r)
    shapes = {"lora_unet_a_proj": ((40,), (30,), 4.0), "lora_unet_b_conv": ((6, 3, 3), (12, 1, 1), 2.0),
              "lora_unet_c_proj": ((50,), (20,), None), "lora_unet_d_proj": ((6,), (10,), 4.0),
              "lora_unet_e_proj": ((16,), (12,), 4.0)}
    tensors = {}
    for name, (down, up, alpha) in shapes.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(r, *down, generator=g).half()
        B = torch.randn(up[0], r, *up[1:], generator=g) * decay.reshape(1, r, *[1] * (len(up) - 1))
        tensors[f"{name}.lora_up.weight"] = (B * (name != "lora_unet_e_proj")).half()
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, tmp_path / "k.safetensors", metadata={"ss_network_module": "networks.lora"})
    _, report = algebra.resize(read_adapter(tmp_path / "k.safetensors"), device="cpu", **rule)
    sd = {k: v.float() for k, v in load_file(tmp_path / "k.safetensors").items()}
    fros = []
    for record in report.modules:
        down, up = sd[f"{record.name}.lora_down.weight"], sd[f"{record.name}.lora_up.weight"]
        scale = float(sd[f"{record.name}.alpha"]) / r if f"{record.name}.alpha" in sd else 1.0
        S = torch.linalg.svdvals(up.reshape(up.shape[0], -1) @ down.reshape(r, -1))
        cap = (rule.get("conv_rank") if down.dim() == 4 else None) or rule.get("rank") or rule.get("max_rank") or r
        k, fro, total = _kohya_rank_resize(S, cap, rule.get("dynamic"), rule.get("param"))
        assert (record.rank_after, record.alpha_after) == (k, pytest.approx(scale * k)), record.name
        if not math.isnan(fro):
            assert (record.fro_retained, record.sum_retained) == (pytest.approx(fro, abs=1e-5),
                                                                 pytest.approx(total, abs=1e-5)), record.name
            fros.append(fro)
    assert len(fros) == 4 and report.fro_retained_mean == pytest.approx(sum(fros) / len(fros), abs=1e-5)
