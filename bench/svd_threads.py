"""Which of the linear algebra ops loraops' SVDs use give other bytes at another torch thread count, and what each
costs at 1 thread and at more, on the shapes loraops uses (float32, CPU).

    python bench/svd_threads.py               # Llama-7B widths (11008×4096, rank 16 and 256): ~2 min on 2 cores
    python bench/svd_threads.py --quick       # TinyLlama widths (5632×2048, rank 16)
    python bench/svd_threads.py --threads 1,2,4
    python bench/svd_threads.py --compare     # before/after of refactor_dense: time, error, bytes per thread count

Each op runs on the same inputs at every thread count in one process (torch.set_num_threads sets MKL's count too);
a row lists the sha256 prefix of its result per count ("=" where equal to the 1-thread one) and the best of
``--repeat`` times. The ops: the products of randomized_svd (M·Ω, Mᵀ·Q, M·Q with q = 2k+10 columns), its QRs of
tall q-column bases, the SVD of the small core, the exact dense SVD refactor_dense takes below RANDOMIZED_MIN_DIM,
and eigh (not used: listed as the alternative for the core).

``--compare`` runs refactor_dense as it was (MKL's threading everywhere: ``before`` below) and as it is (``ops.svd``:
the same bytes at any thread count) on delta-like matrices (rank 64, a decaying spectrum; ``--seeds`` of them),
randomized at the large shape and exact at the small one: the best of ``--repeat`` times at the process's thread
count, the ratio, the relative Frobenius error of each against the float64 matrix and against its best rank-k part,
and the sha256 of each at every ``--threads`` count.
"""
from __future__ import annotations

import argparse
import hashlib

import torch
from algebra import best  # (bench/algebra.py: this folder is the script's first import path)

FULL = {"out": 11008, "in": 4096, "small": (1024, 4096), "ranks": (16, 256)}
QUICK = {"out": 5632, "in": 2048, "small": (256, 2048), "ranks": (16,)}


def digest(result) -> str:
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def cases(g: dict) -> list[tuple[str, object]]:
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(g["out"], g["in"], generator=gen)
    S_small = torch.randn(*g["small"], generator=gen)
    made = []
    for k in g["ranks"]:
        q = 2 * k + 10
        omega = torch.randn(g["in"], q, generator=gen)
        Q = torch.linalg.qr(M @ omega).Q
        Qin = torch.linalg.qr(M.T @ Q).Q
        core = torch.randn(q, q, generator=gen)
        made += [
            (f"matmul M·Ω      {g['out']}×{g['in']} · {g['in']}×{q}", lambda M=M, o=omega: M @ o),
            (f"matmul Mᵀ·Q     {g['in']}×{g['out']} · {g['out']}×{q}", lambda M=M, Q=Q: M.T @ Q),
            (f"matmul M·Q      {g['out']}×{g['in']} · {g['in']}×{q}", lambda M=M, Q=Qin: M @ Q),
            (f"qr              {g['out']}×{q}", lambda Q=M @ omega: torch.linalg.qr(Q)),
            (f"qr              {g['in']}×{q}", lambda Q=M.T @ Q: torch.linalg.qr(Q)),
            (f"svd (core)      {q}×{q}", lambda C=core: torch.linalg.svd(C, full_matrices=False)),
            (f"eigh (core)     {q}×{q}", lambda C=core: torch.linalg.eigh(C @ C.T)),
            (f"residual B·A    {g['out'] // 4}×{k} · {k}×{g['in']}",
             lambda B=M[: g["out"] // 4, :k].contiguous(), A=M[:k].contiguous(): B @ A),
        ]
    made.append((f"svd (dense)     {g['small'][0]}×{g['small'][1]}",
                 lambda D=S_small: torch.linalg.svd(D, full_matrices=False)))
    return made


def before(D: torch.Tensor, k: int):
    """refactor_dense's SVD before this change (c4f4cbf…8280a0c): (B', A')."""
    from loraops.ops import svd

    q = min(min(D.shape), 2 * k + svd.OVERSAMPLE)
    if min(D.shape) <= svd.RANDOMIZED_MIN_DIM:
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        return U[:, :k] * S[:k], Vh[:k]
    omega = torch.randn(D.shape[1], q, generator=torch.Generator().manual_seed(0), dtype=D.dtype)
    Q = torch.linalg.qr(D @ omega).Q
    for _ in range(svd.POWER_ITERATIONS):
        Q = torch.linalg.qr(D.T @ Q).Q
        Q = torch.linalg.qr(D @ Q).Q
    Qa, Ra = torch.linalg.qr(D.T @ Q)
    U, S, Vh = torch.linalg.svd(Ra.T, full_matrices=False)
    return (Q @ U)[:, :k] * S[:k], (Vh @ Qa.T)[:k]


def delta_like(out: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (U, S, V) of a delta-like matrix U·diag(S)·Vᵀ: rank 64, a decaying spectrum as a trained delta's
    (its best rank-k part U_k·S_k·V_kᵀ known exactly)."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out, 64, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(inp, 64, generator=gen, dtype=torch.float64)).Q
    return U, torch.logspace(0, -2, 64, dtype=torch.float64), V


def compare(g: dict, counts: list[int], repeat: int, seeds: int) -> None:
    from loraops.ops import svd

    def after(D: torch.Tensor, k: int):
        made = svd.refactor_dense(D, k)
        return made.B, made.A

    threads = torch.get_num_threads()
    for (out, inp), k in [((g["out"], g["in"]), g["ranks"][0]), (g["small"], g["ranks"][0])]:
        kind = "randomized" if min(out, inp) > svd.RANDOMIZED_MIN_DIM else "exact"
        print(f"refactor_dense {out}×{inp} rank {k} ({kind}), {threads} threads; error: ‖D − B'A'‖/‖D‖ and "
              f"‖D_k − B'A'‖/‖D_k‖ in float64 (D_k: D's best rank {k})")
        took, wins = {}, 0
        for seed in range(seeds):
            U, S, V = delta_like(out, inp, seed)
            D64 = (U * S) @ V.T
            Dk = (U[:, :k] * S[:k]) @ V[:, :k].T
            D = D64.float()
            errors = {}
            for label, fn in (("before", before), ("after", after)):
                if seed == 0:
                    took[label], (B, A) = best(lambda: fn(D, k), repeat)
                else:
                    B, A = fn(D, k)
                P = B.double() @ A.double()
                errors[label] = (float(torch.linalg.matrix_norm(D64 - P) / torch.linalg.matrix_norm(D64)),
                                 float(torch.linalg.matrix_norm(Dk - P) / torch.linalg.matrix_norm(Dk)))
                hashes = []
                if seed == 0:
                    for n in counts:
                        torch.set_num_threads(n)
                        hashes.append(digest(fn(D, k)))
                    torch.set_num_threads(threads)
                verdict = "" if not hashes else (" same bytes at every count" if len(set(hashes)) == 1
                                                 else " VARIES")
                print(f"  seed {seed} {label:6} error {errors[label][0]:.12e}  {errors[label][1]:.6e}"
                      + (f"  {took[label]:7.2f} s  " if seed == 0 else "")
                      + " ".join(f"{n}t {h}" for n, h in zip(counts, hashes)) + verdict, flush=True)
            wins += errors["after"][1] <= errors["before"][1]
        print(f"  after/before time: {took['after'] / took['before']:.2f}×; after's ‖D_k − B'A'‖ ≤ before's in "
              f"{wins} of {seeds} matrices")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", default="1,2,3,4")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.threads.split(",")]
    g = QUICK if args.quick else FULL
    if args.compare:
        print(f"# torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, best of {args.repeat}")
        compare(g, counts, args.repeat, args.seeds)
        return
    print(f"# torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, threads {counts}, best of "
          f"{args.repeat}; sha256 prefix per thread count ('=': same bytes as at {counts[0]} thread(s))")
    before = torch.get_num_threads()
    for label, fn in cases(g):
        hashes, times = [], []
        for n in counts:
            torch.set_num_threads(n)
            took, result = best(fn, args.repeat)
            hashes.append(digest(result))
            times.append(took)
        shown = [hashes[0]] + ["=" if h == hashes[0] else h for h in hashes[1:]]
        verdict = "same" if len(set(hashes)) == 1 else "VARIES"
        print(f"{label:42} {verdict:6} {' '.join(f'{h:>12}' for h in shown)}   "
              + " ".join(f"{n}t {t * 1000:8.1f} ms" for n, t in zip(counts, times)), flush=True)
    torch.set_num_threads(before)


if __name__ == "__main__":
    main()
