import threading

import pytest
import torch

from engine_helpers import torch_threads_everywhere
from loraops import settings
from loraops.ops import svd

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass


def _factors(out, r, n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, r, generator=g, dtype=dtype), torch.randn(r, n, generator=g, dtype=dtype)


@pytest.mark.parametrize("shape", [(40, 6, 30), (7, 9, 50), (50, 9, 5)])
def test_factored_svd_equals_dense(shape):
    B, A = _factors(*shape)
    spectrum = svd.factored_svd(B, A)
    dense = torch.linalg.svdvals(B @ A)
    n = spectrum.S.numel()
    assert n == min(shape)
    torch.testing.assert_close(spectrum.S, dense[:n], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(spectrum.U @ torch.diag(spectrum.S) @ spectrum.Vh, B @ A)
    torch.testing.assert_close(spectrum.Vh @ spectrum.Vh.T, torch.eye(n, dtype=B.dtype))


def test_float32_factored_svd_matches_float64():
    B, A = _factors(300, 16, 500)
    s32 = svd.factored_svd(B.float(), A.float()).S.double()
    torch.testing.assert_close(s32, torch.linalg.svdvals(B @ A)[:16], rtol=1e-5, atol=0)


def test_truncation_is_best_rank_k_and_reports_tail():
    B, A = _factors(30, 8, 40)
    spectrum = svd.factored_svd(B, A)
    B2, A2 = spectrum.truncate(3)
    assert B2.shape == (30, 3) and A2.shape == (3, 40)
    D = B @ A
    U, S, Vh = torch.linalg.svd(D)
    torch.testing.assert_close(B2 @ A2, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3])
    err = float(torch.linalg.matrix_norm(D - B2 @ A2) / torch.linalg.matrix_norm(D))
    assert spectrum.tail_error(3) == pytest.approx(err, rel=1e-9)
    fro, total = spectrum.retained(3)
    assert fro == pytest.approx(float(S[:3].norm() / S.norm()))
    assert total == pytest.approx(float(S[:3].sum() / S.sum()))


def test_zero_product_retains_everything():
    spectrum = svd.factored_svd(torch.zeros(5, 2), torch.zeros(2, 7))
    assert spectrum.retained(1) == (1.0, 1.0)
    B2, A2 = spectrum.truncate(1)
    assert not B2.any()


def test_refactor_dense_exact_and_randomized(monkeypatch):
    g = torch.Generator().manual_seed(0)
    # a rank-6 matrix plus a little noise
    D = torch.randn(300, 6, generator=g) @ torch.randn(6, 200, generator=g) + 1e-3 * torch.randn(300, 200, generator=g)
    exact = svd.refactor_dense(D, 6)
    assert exact.svd == "exact"
    monkeypatch.setattr(svd, "RANDOMIZED_MIN_DIM", 100)
    approx = svd.refactor_dense(D, 6)
    assert approx.svd == "randomized"
    assert approx.error == pytest.approx(exact.error, rel=1e-3)
    again = svd.refactor_dense(D, 6)
    assert torch.equal(again.B, approx.B)  # seeded: same bytes every run
    assert svd.refactor_dense(D, 6, exact=True).svd == "exact"


@pytest.mark.parametrize("shape", [(700, 300), (300, 700), (400, 400)])
def test_leading_svd_gives_the_exact_svds_leading_factors_and_every_singular_value(shape):
    """The Gram path (refactor_dense's default below RANDOMIZED_MIN_DIM): the same rank-k factors as LAPACK's SVD in
    float64, to rounding, tall, wide or square, and all of S (the tail to √ε·σ₁); B' = U_k·S_k, A' orthonormal rows."""
    g = torch.Generator().manual_seed(1)
    m, n = shape
    # a decaying spectrum over 40 directions plus a full-rank floor: what an element-wise combine leaves
    D = (torch.randn(m, 40, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 40, dtype=torch.float64)) \
        @ torch.randn(40, n, generator=g, dtype=torch.float64) + 1e-4 * torch.randn(m, n, generator=g, dtype=torch.float64)
    truth = svd.dense_svd(D)
    mine = svd.leading_svd(D, 12)
    assert mine.U.shape == (m, 12) and mine.Vh.shape == (12, n) and mine.S.shape == truth.S.shape
    B, A = mine.truncate(12)
    B0, A0 = truth.truncate(12)
    assert float((B @ A - B0 @ A0).norm() / (B0 @ A0).norm()) < 1e-12
    torch.testing.assert_close(A @ A.T, torch.eye(12, dtype=A.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(mine.S[:12], truth.S[:12], rtol=1e-12, atol=0)
    torch.testing.assert_close(mine.S, truth.S, rtol=0, atol=1e-7 * float(truth.S[0]))
    made = svd.refactor_dense(D, 12)
    assert made.svd == "exact" and made.error == pytest.approx(truth.tail_error(12), rel=1e-9)


def test_leading_svd_of_a_matrix_of_lower_rank_than_asked():
    """σ = 0 among the leading k: zero columns, no NaN (no division by a zero σ), and the factors still give D."""
    g = torch.Generator().manual_seed(2)
    D = torch.randn(50, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 80, generator=g, dtype=torch.float64)
    for M in (D, D.T, torch.zeros(50, 80, dtype=torch.float64)):
        made = svd.refactor_dense(M, 6)
        assert made.B.isfinite().all() and made.A.isfinite().all()
        torch.testing.assert_close(made.B @ made.A, M, rtol=0, atol=1e-10 * max(1.0, float(M.abs().max())))
        assert made.error < 1e-12


def test_dense_svd_of_a_wide_matrix_factorizes_its_transpose():
    D = torch.randn(30, 90, generator=torch.Generator().manual_seed(3))
    spectrum = svd.dense_svd(D)
    assert spectrum.U.shape == (30, 30) and spectrum.Vh.shape == (30, 90)
    torch.testing.assert_close(spectrum.U @ torch.diag(spectrum.S) @ spectrum.Vh, D, rtol=0, atol=1e-5)
    torch.testing.assert_close(spectrum.S, torch.linalg.svdvals(D.double()).float())


def test_frobenius_of_row_blocks_is_float64_accurate_where_torch_float32_norm_is_not():
    """A re-factorization's reported error divides two norms of module-sized matrices: torch's float32 norm of a
    whole 8192×4096 matrix is 0.2 % off (3.4 % at a 70B model's 8192×28672); summed per row block in float64 it is
    exact to rounding."""
    D = torch.randn(8192, 4096, generator=torch.Generator().manual_seed(0))
    exact = float(torch.linalg.vector_norm(D, dtype=torch.float64))
    assert abs(float(torch.linalg.matrix_norm(D)) / exact - 1) > 1e-3
    assert abs(svd.frobenius(D[rows] for rows in svd.row_blocks(D.shape)) / exact - 1) < 1e-12


def test_randomized_svd_matches_the_svd_of_its_projection():
    """randomized_svd takes Q·Qᵀ·M's SVD from the QR of Mᵀ·Q (an SVD of the q×q R) instead of an SVD of the wide
    Qᵀ·M (4.5 times as long): the same rank-k factors to float32 rounding — as close to the float64 result as the
    direct SVD's — and the same singular values."""
    g = torch.Generator().manual_seed(3)
    M = torch.randn(300, 12, generator=g) @ torch.randn(12, 700, generator=g) + 0.05 * torch.randn(300, 700, generator=g)

    def direct(M, q):  # the former last step, same range finder
        omega = torch.randn(M.shape[1], q, generator=torch.Generator().manual_seed(0), dtype=M.dtype)
        Q = torch.linalg.qr(M @ omega).Q
        for _ in range(svd.POWER_ITERATIONS):
            Q = torch.linalg.qr(M @ torch.linalg.qr(M.T @ Q).Q).Q
        U, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
        return svd.Spectrum(Q @ U, S, Vh)

    def product(spectrum, k=6):
        B, A = spectrum.truncate(k)
        return B.double() @ A.double()

    truth = product(direct(M.double(), 34))
    new, old = svd.randomized_svd(M, 34), direct(M, 34)
    torch.testing.assert_close(new.S, old.S, rtol=1e-5, atol=0)
    assert float((product(new) - product(old)).norm() / product(old).norm()) < 1e-5
    assert float((product(new) - truth).norm()) <= 2 * float((product(old) - truth).norm())
    torch.testing.assert_close(new.Vh @ new.Vh.T, torch.eye(34))


@pytest.mark.parametrize("factorize", [lambda M: svd.factored_svd(M, torch.eye(4)), lambda M: svd.refactor_dense(M, 2),
                                       lambda M: svd.refactor_dense(M, 2, exact=True)])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_matrix_that_is_not_finite_is_refused_before_lapack_sees_it(factorize, value):
    """LAPACK's answer to NaN or ±inf depends on the build and the machine: a LinAlgError 'non-finite' here, NaN
    factors and no error on an AVX-512 machine, where a combine's overflowing weighted sum came out as 'NaN or Inf
    values (beyond what float32 holds?)' instead of naming its weights. Refused first, on every machine."""
    M = torch.ones(6, 4)
    M[2, 1] = value
    with pytest.raises(svd.NonFiniteInput):
        factorize(M)


def test_single_threaded_on_two_threads_at_once_leaves_the_count_as_it_was(three_threads):
    """Each call saved torch's thread count and put it back: a thread that began inside another's call found that
    call's 1 (torch's count is per thread, a new one starting with the last count set), and put it back after the
    other ended, so every thread started later ran torch on one thread."""
    cpu = torch.device("cpu")
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen, failures = {}, []

    def first() -> None:
        with svd.single_threaded(cpu):
            first_in.set()
            assert second_in.wait(60)
            seen["first"] = torch.get_num_threads()
        first_out.set()

    def second() -> None:
        with svd.single_threaded(cpu):
            second_in.set()
            assert first_out.wait(60)
            seen["second, the first gone"] = torch.get_num_threads()
        seen["second, after"] = torch.get_num_threads()

    def guarded(run):
        def go():
            try:
                run()
            except BaseException as exc:
                failures.append(exc)
                for event in (first_in, second_in, first_out):
                    event.set()
        return threading.Thread(target=go)

    threads = [guarded(first), guarded(second)]
    threads[0].start()
    assert first_in.wait(60)
    threads[1].start()
    for thread in threads:
        thread.join()
    assert not failures
    assert seen == {"first": 1, "second, the first gone": 1, "second, after": 3}
    assert torch_threads_everywhere() == (3, 3)


def test_nested_thread_counts_unwind_one_block_at_a_time(three_threads):
    cpu = torch.device("cpu")
    with settings.torch_threads(cpu, lambda before: 2):
        with svd.single_threaded(cpu):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    assert torch_threads_everywhere() == (3, 3)


@pytest.mark.parametrize("exact, randomized_min_dim, kind", [(True, 100, "exact"), (False, 100, "randomized"),
                                                               (False, 2048, "exact")])
def test_refactor_dense_gives_the_same_bytes_at_any_thread_count(monkeypatch, exact, randomized_min_dim, kind):
    """MKL's QRs and SVDs split their work by thread and round accordingly: the exact and the randomized SVD of the
    same matrix gave other bytes at 1, 2 and 4 threads (so did their error). Also the Gram path (leading_svd)."""
    monkeypatch.setattr(svd, "RANDOMIZED_MIN_DIM", randomized_min_dim)
    monkeypatch.setattr(svd, "PRODUCT_BLOCK_ELEMENTS", 1 << 15)  # several row blocks, on several threads
    D = torch.randn(600, 400, generator=torch.Generator().manual_seed(0))
    made = {}
    for count in (1, 2, 4):
        with settings.torch_threads(torch.device("cpu"), lambda before: count):
            made[count] = svd.refactor_dense(D, 8, exact=exact)
    assert made[1].svd == kind
    for count in (2, 4):
        assert torch.equal(made[count].B, made[1].B) and torch.equal(made[count].A, made[1].A)
        assert made[count].error == made[1].error


def test_product_is_the_matrix_product_by_row_blocks(monkeypatch):
    monkeypatch.setattr(svd, "PRODUCT_BLOCK_ELEMENTS", 1 << 12)
    g = torch.Generator().manual_seed(1)
    M, X = torch.randn(300, 70, generator=g, dtype=torch.float64), torch.randn(70, 9, generator=g, dtype=torch.float64)
    with settings.torch_threads(torch.device("cpu"), lambda before: 3):
        torch.testing.assert_close(svd.product(M, X), M @ X)
        torch.testing.assert_close(svd.product(M.T, M), M.T @ M)  # (a transposed view)
        assert torch.get_num_threads() == 3
