"""The exact re-factorization of a dense delta below svd.RANDOMIZED_MIN_DIM: LAPACK's whole float64 SVD of it as it
is (what refactor_dense ran before session 32), of its transpose when wide (dense_svd now), and leading_svd (the
eigendecomposition of the Gram matrix over the smaller side), all on one torch thread, as loraops runs them.

    python bench/svd_gram.py            # TinyLlama-1.1B's and SDXL's module shapes, rank 64; a minute or two
    python bench/svd_gram.py --quick    # small shapes: a smoke run

Each matrix is what an element-wise combine leaves: a decaying rank-128 part plus a full-rank floor, in float32.
"Top-k diff" is ‖B'A' − B₀A₀‖/‖B₀A₀‖ in float64 against the LAPACK factors; "equal" is the share of the float32
factors' elements refactor_dense would write that are the same (up to the singular vectors' signs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from algebra import best  # noqa: E402  (bench/algebra.py's best-of-n timer)
from loraops.ops import svd  # noqa: E402

FULL = [(2048, 2048), (5632, 2048), (2048, 5632), (256, 2048), (1280, 1280), (10240, 1280), (1280, 5120)]
QUICK = [(256, 256), (700, 256), (256, 700)]


def delta(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(128, m, n)
    part = (torch.randn(m, r, generator=g) * torch.logspace(0, -2, r)) @ torch.randn(r, n, generator=g) / n ** 0.5
    return part + 1e-3 * torch.randn(m, n, generator=g) / n ** 0.5


def as_is(D: torch.Tensor) -> svd.Spectrum:
    """LAPACK's SVD of D as it is, float64: refactor_dense's exact path before session 32."""
    U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
    return svd.Spectrum(U.to(D.dtype), S.to(D.dtype), Vh.to(D.dtype))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2, help="runs per timing (best is shown)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, one thread (svd.single_threaded), rank {args.rank}")
    print(f"{'shape':>12} {'SVD as is':>10} {'SVD, dense_svd':>15} {'leading_svd':>12} {'as is ÷ leading':>16} "
          f"{'top-k diff':>11} {'equal':>8}")
    for shape in QUICK if args.quick else FULL:
        D = delta(shape)
        k = min(args.rank, *shape)
        with svd.single_threaded(D.device):
            old, reference = best(lambda: as_is(D), args.repeat)
            dense, _ = best(lambda: svd.dense_svd(D), args.repeat)
        new, spectrum = best(lambda: svd.leading_svd(D, k), args.repeat)
        B0, A0 = reference.truncate(k)
        B, A = spectrum.truncate(k)
        exact = B0.double() @ A0.double()
        diff = float((B.double() @ A.double() - exact).norm() / exact.norm())
        signs = torch.sign((A * A0).sum(dim=1))  # a singular pair may come out negated in both factors
        equal = (int((B * signs == B0).sum()) + int((A * signs[:, None] == A0).sum())) / (B.numel() + A.numel())
        print(f"{shape[0]:>5}×{shape[1]:<6} {old:>9.2f}s {dense:>14.2f}s {new:>11.2f}s {old / new:>15.1f}× "
              f"{diff:>11.1e} {equal:>8.2%}")


if __name__ == "__main__":
    main()
