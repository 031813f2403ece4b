"""Singular value decompositions for the adapter algebra: of a low-rank product without forming it, and of a dense
delta when an element-wise method has made one.

Convention for truncated factors (same as kohya's resize_lora.py and PEFT's svd combination):
    B' = U_k · diag(S_k)        A' = V_kᵀ        (A' has orthonormal rows; B' carries the magnitudes)
so a resized kohya file puts its weight where kohya's own tool does.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ContextManager, Iterable

import torch

from .. import settings
from ..st import all_finite, converted, past_range

# A dense delta is re-factorized with a randomized SVD when both sides exceed this (kohya's threshold): an exact
# SVD of a 4096×14336 matrix takes minutes on a CPU, the randomized one with power iterations well under a second.
RANDOMIZED_MIN_DIM = 2048
POWER_ITERATIONS = 4
OVERSAMPLE = 10
BLOCK_ELEMENTS = 1 << 22
"""Elements of a row block (16 MiB in float32) when a dense delta is built or measured piecewise: a 70B model's
8192×28672 module is 940 MB in float32, and every whole-matrix temporary would be another."""
PRODUCT_BLOCK_ELEMENTS = 1 << 20
"""Elements of the row blocks of a large matrix that ``product`` spreads over the threads: 4 MiB in float32, some 40
blocks of an 11008×4096 module (enough to keep 16 threads busy), each still a product at full BLAS speed."""


class NonFiniteInput(ValueError):
    """What an SVD was given holds NaN or ±inf (weights × values beyond the dtype it computes in). LAPACK's answer to
    it depends on the build and the machine — a LinAlgError, or NaN or inf factors without one (an AVX-512 machine) —
    so it is looked for first."""


def finite(M: torch.Tensor) -> torch.Tensor:
    """M, refused (NonFiniteInput) where it holds NaN or ±inf: one reduction."""
    if M.numel() and not all_finite(M):
        raise NonFiniteInput("non-finite values in the matrix to factorize")
    return M


def row_blocks(shape: tuple[int, ...], elements: int | None = None) -> list[slice]:
    """Row slices of a matrix of ``shape``, each about ``elements`` (BLOCK_ELEMENTS) elements, at least a row."""
    rows, cols = shape
    step = max(1, (elements or BLOCK_ELEMENTS) // max(cols, 1))
    return [slice(row, min(rows, row + step)) for row in range(0, rows, step)]


@dataclass
class Spectrum:
    """A thin SVD  M = U · diag(S) · Vh  (S descending); S always whole, U and Vh perhaps only their leading
    vectors (leading_svd: enough for truncate at up to that rank)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def truncate(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') of rank k: B' = U_k·diag(S_k), A' = Vh_k."""
        return self.U[:, :k] * self.S[:k], self.Vh[:k]

    def retained(self, k: int) -> tuple[float, float]:
        """(‖S_k‖/‖S‖, ΣS_k/ΣS): the Frobenius norm and the sum of singular values kept by rank k (1 for zeros)."""
        S = self.S.double()
        total_sq, total = float(S.square().sum()), float(S.sum())
        if total == 0:
            return 1.0, 1.0
        return math.sqrt(float(S[:k].square().sum()) / total_sq), float(S[:k].sum()) / total

    def tail_error(self, k: int) -> float:
        """Relative Frobenius error ‖M − M_k‖/‖M‖ of the rank-k truncation (exact when this is the full spectrum)."""
        fro, _ = self.retained(k)
        return math.sqrt(max(0.0, 1.0 - fro * fro))


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> Spectrum:
    """Exact thin SVD of B·A (B out×r, A r×in) without forming it.

    B = Qb·Rb and Aᵀ = Qa·Ra (reduced QR), so B·A = Qb·(Rb·Raᵀ)·Qaᵀ; the SVD of the small r×r core
    Rb·Raᵀ = U·S·Vh gives B·A = (Qb·U)·S·(Vh·Qaᵀ) with orthonormal outer factors. O((out+in)·r²) instead of
    O(out·in·min(out, in)). The spectrum has min(r, out, in) entries: the nonzero part of B·A's.
    """
    with single_threaded(B.device):
        Qb, Rb = torch.linalg.qr(finite(B))
        Qa, Ra = torch.linalg.qr(finite(A).T)
        U, S, Vh = torch.linalg.svd(finite(Rb @ Ra.T), full_matrices=False)
        return Spectrum(Qb @ U, S, Vh @ Qa.T)


def single_threaded(device: torch.device) -> ContextManager[None]:
    """Torch on one CPU thread inside (a CUDA device: unchanged). MKL's QR, SVD and eigh split their work by thread
    and round accordingly: every one gave other bytes at 1, 2, 3 and 4 threads (bench/results/svd-threads-2core.txt),
    a factored SVD other bytes at 2, 3, 8 or 16 threads than at 1, even of a 64-wide module; one thread gives the same
    bytes whatever the thread count outside. Library calls on several Python threads at once, and nested ones, leave
    torch's count as they found it (settings.torch_threads: saving and restoring it here, one could restore another's
    1 for good)."""
    return settings.torch_threads(device, lambda before: 1)


def product(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """M·X with the same bytes at any thread count, as fast: row blocks of M (PRODUCT_BLOCK_ELEMENTS each, a matter
    of M's shape alone), each a product on one torch thread, shared among as many Python threads as torch had (its
    kernels release the GIL). MKL's own threading split the sum of a narrow product (X 42 columns wide) by thread
    from 3 threads on: other bytes at 3 and 4 threads than at 1 and 2."""
    if M.device.type != "cpu":
        return M @ X
    blocks = row_blocks(tuple(M.shape), PRODUCT_BLOCK_ELEMENTS)
    workers = min(len(blocks), torch.get_num_threads())

    def block(rows: slice) -> torch.Tensor:
        with single_threaded(M.device):
            return M[rows] @ X

    if workers == 1:
        return torch.cat([block(rows) for rows in blocks])
    with ThreadPoolExecutor(workers, thread_name_prefix="loraops-product") as pool:
        return torch.cat(list(pool.map(block, blocks)))


def dense_svd(D: torch.Tensor) -> Spectrum:
    """The exact thin SVD of a dense matrix; on the CPU in float64 on one thread (single_threaded), factors in D's
    dtype: the same bytes at any thread count, and closer to the exact factors than float32 LAPACK at any count
    (rank 16 of 256×2048 and 1024×4096 delta-like matrices: 3.6e-8 from the float64 optimum, float32 1.0–1.7e-6 at
    1, 2 or 4 threads). Where two shared cores are busy this is also faster than float32 on both (4–9 s against
    11–34 s at 1024×4096; float32 on one thread 3–5 s): bench/results/svd-threads-2core.txt. A wide matrix is
    factorized as its transpose: LAPACK's SVD of 2048×5632 took twice as long as of 5632×2048 (19 s, 9 s)."""
    finite(D)
    if D.device.type != "cpu":
        return Spectrum(*torch.linalg.svd(D, full_matrices=False))
    with single_threaded(D.device):
        if D.shape[0] < D.shape[1]:
            V, S, Uh = torch.linalg.svd(D.T.double(), full_matrices=False)
            U, Vh = Uh.T, V.T
        else:
            U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
    return Spectrum(U.to(D.dtype), S.to(D.dtype), Vh.to(D.dtype))


def leading_svd(D: torch.Tensor, k: int) -> Spectrum:
    """D's leading k singular vectors (U m×k, Vh k×n) with all its singular values, from the eigendecomposition of
    its Gram matrix over its smaller side, in float64 on one thread (the same bytes at any thread count): the
    eigenvectors are that side's singular vectors, D's product with them the other side's times S, whose column
    norms are S_k (no square root of a small eigenvalue, no division by a small σ in B' = U_k·S_k). The rest of S
    are the square roots of the other eigenvalues, good to √ε·σ₁ (what a tail error or a sum of S needs). On the
    1.1B model's shapes, 1.9–6× faster than dense_svd, top-k factors within 1e-14 of its
    (bench/results/svd-gram-2core.txt). A CUDA device: dense_svd, truncated."""
    finite(D)
    if D.device.type != "cpu":
        whole = dense_svd(D)
        return Spectrum(whole.U[:, :k], whole.S, whole.Vh[:k])
    with single_threaded(D.device):
        wide = D.shape[0] < D.shape[1]
        M = D.T.double() if wide else D.double()  # tall: the Gram matrix over its columns is the small one
        eigenvalues, vectors = torch.linalg.eigh(M.T @ M)  # ascending
        small = vectors.flip(1)[:, :k]
        other = M @ small
        S_k = torch.linalg.vector_norm(other, dim=0)
        other /= torch.where(S_k > 0, S_k, 1.0)  # (a zero σ: that column is zero, and stays so)
        S = torch.cat([S_k, eigenvalues.flip(0)[k:].clamp_min(0).sqrt()])
    U, Vh = (small, other.T) if wide else (other, small.T)
    return Spectrum(U.to(D.dtype), S.to(D.dtype), Vh.to(D.dtype))


def randomized_svd(M: torch.Tensor, q: int, niter: int = POWER_ITERATIONS, seed: int = 0) -> Spectrum:
    """The top-q part of M's SVD by Halko–Martinsson–Tropp range finding with ``niter`` power iterations
    (re-orthonormalized each step). Same algorithm as ``torch.svd_lowrank``, but drawn from its own seeded
    generator: torch.svd_lowrank uses the global RNG, and the same inputs must give the same bytes. Also at any
    thread count: the products of M by ``product``, the QRs of the q-column bases and the q×q SVD on one thread
    (single_threaded; they were also faster so on two busy cores: a 11008×42 QR 3 ms against 15–250 ms)."""
    # drawn on the CPU, as DARE's masks: the same test matrix on every device
    omega = torch.randn(M.shape[1], q, generator=torch.Generator().manual_seed(seed), dtype=M.dtype)

    def orthonormal(Y: torch.Tensor) -> torch.Tensor:
        with single_threaded(Y.device):
            return torch.linalg.qr(Y).Q

    Q = orthonormal(product(M, omega.to(M.device)))
    for _ in range(niter):
        Q = orthonormal(product(M.T, Q))
        Q = orthonormal(product(M, Q))
    # Q·Qᵀ·M from the QR of Mᵀ·Q = Qa·Ra (Qᵀ·M = Raᵀ·Qaᵀ), the SVD of the small q×q Raᵀ: an SVD of the wide Qᵀ·M
    # itself took 4.5 times as long (23 s for 522×28672 on 2 cores). In float64, of factor size: 2–4 times closer to
    # the best rank-k factors than float32 (float32 on one thread: as close as on two, give or take), no slower.
    MtQ = product(M.T, Q)
    with single_threaded(M.device):
        Qa, Ra = torch.linalg.qr(MtQ.double())
        U, S, Vh = torch.linalg.svd(Ra.T, full_matrices=False)
        return Spectrum((Q.double() @ U).to(M.dtype), S.to(M.dtype), (Vh @ Qa.T).to(M.dtype))


@dataclass
class Refactored:
    """New 2-D factors (B' out×k, A' k×in) of a module and how they were obtained."""

    B: torch.Tensor
    A: torch.Tensor
    svd: str
    """"none" (exact by construction), "factored" (exact), "exact" (dense) or "randomized" (dense)."""
    error: float
    """Relative Frobenius error ‖D − B'·A'‖/‖D‖ against the exact result D of the method."""
    spectrum: Spectrum | None = None
    """Every singular value (and the vectors up to the rank), when an exact decomposition computed them (None
    otherwise)."""


def refactor_dense(D: torch.Tensor, k: int, exact: bool = False) -> Refactored:
    """Rank-k factors of a dense matrix: the exact ``torch.linalg.svd`` when ``exact`` (--precise); else when a side
    is ≤ RANDOMIZED_MIN_DIM (or k is too close to full rank for sampling to pay) the leading part of the exact
    decomposition from the Gram matrix (leading_svd), else the seeded randomized SVD with power iterations. The error
    reported is exact in every case (from the full spectrum of the SVD, or measured against D)."""
    finite(D)
    small = min(D.shape)
    k = max(1, min(k, small))
    q = min(small, 2 * k + OVERSAMPLE)
    if exact:
        spectrum = dense_svd(D)
        B, A = spectrum.truncate(k)
        return Refactored(B, A, "exact", spectrum.tail_error(k), spectrum)
    if small <= RANDOMIZED_MIN_DIM or q >= small:
        spectrum = leading_svd(D, k)
        B, A = spectrum.truncate(k)
        # (in float64: a float32 product's rounding, ~1e-7, would hide a lossless factorization's ~5e-8)
        return Refactored(B, A, "exact", relative_residual(D, B, A, torch.float64), spectrum)
    B, A = randomized_svd(D, q).truncate(k)
    return Refactored(B, A, "randomized", relative_residual(D, B, A))


def factors_in(B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out×r) and A (r×in) in ``dtype`` on the CPU (st.converted: NaN past its range). Where a value goes beyond
    ``dtype``'s range, each rank component's magnitude is first shared between its two factors (B[:, i]/cᵢ and
    cᵢ·A[i], cᵢ = √(max|B[:, i]| / max|A[i]|)): B·A is the same, and an SVD's B = U·S, which carries all of it
    (kohya's and PEFT's convention, kept wherever it fits), no longer overflows float16 while A = Vᵀ sits near
    1/√in. Where even that does not fit, the NaN is left for the caller to refuse. (Not for a delta below what
    ``dtype`` holds: shared, its factors would come out subnormal, their precision silently lost; the caller refuses
    the all-zero factors the plain conversion gives.)"""
    if past_range(B, dtype) is None and past_range(A, dtype) is None:  # (converted's own scan would find nothing)
        return B.to(device="cpu", dtype=dtype), A.to(device="cpu", dtype=dtype)
    peakB = B.abs().amax(dim=0).double()
    peakA = A.abs().amax(dim=1).double()
    c = torch.where((peakB > 0) & (peakA > 0), (peakB / peakA.clamp_min(1e-300)).sqrt(), torch.ones_like(peakB))
    return converted(B / c.to(B), dtype), converted(A * c.to(A)[:, None], dtype)


def relative_residual(D: torch.Tensor, B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype | None = None) -> float:
    """‖D − B·A‖/‖D‖, by row blocks, the product in ``dtype`` (default D's; 0 for a zero D): measured, where a
    spectrum's tail is not known exactly."""
    dtype = dtype or D.dtype
    A = A.to(dtype)
    norm = frobenius(D[rows] for rows in row_blocks(D.shape))
    # (D − B·A into B·A's block: one block-sized temporary less, the same values)
    residual = frobenius(torch.sub(D[rows], approx, out=approx) for rows in row_blocks(D.shape)
                         for approx in [B[rows].to(dtype) @ A])
    return residual / norm if norm else 0.0


def frobenius(blocks: Iterable[torch.Tensor]) -> float:
    """The Frobenius norm of a matrix given as row blocks, summed in float64: torch's float32 norm of a whole
    8192×28672 matrix was measured 3.4 % off."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2 for block in blocks))


def refactor_product(B: torch.Tensor, A: torch.Tensor, k: int) -> Refactored:
    """Rank-k factors of the low-rank product B·A via the factored SVD (exact; error = the truncated tail)."""
    spectrum = factored_svd(B, A)
    k = max(1, min(k, spectrum.S.numel()))
    B2, A2 = spectrum.truncate(k)
    return Refactored(B2, A2, "factored", spectrum.tail_error(k))
