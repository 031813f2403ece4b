"""Benchmark of `loraops extract` against the kohya / mergekit way of extracting a LoRA, side by side in one run.

    python bench/extract.py              # hidden 2304, intermediate 5632, 2 layers, bf16, rank 32 (~3 min on 2 cores)
    python bench/extract.py --quick      # small shapes: a smoke run

A synthetic base (Llama-style linear layers, bf16) and a "fine-tune" of it: base + a rank-``delta_rank`` delta + small
full-rank noise, rounded to bf16 (so the true delta is not exactly low-rank, as after real training). Both sides
extract rank ``rank`` from every linear weight:

  loraops      loraops.extract(base, tuned, rank=…): streamed tensor by tensor, the randomized SVD (4 power
               iterations) where both sides exceed 2048, the exact one below; error measured against D
  reference    what kohya's extract_lora_from_models.py and mergekit-extract-lora do per tensor: D = tuned − base in
               float32, a full torch.linalg.svd(D), keep the top k (kohya's 99th-percentile clamp left out: it only
               adds error); error from the exact spectrum

Each side runs in its own process (so each has its own peak RSS), ``--repeat`` times; the time is the best run
(loraops' first run also hashes both models for the registry fingerprint: shown apart, a later run reads the digests
from their cache). The last line compares the relative Frobenius errors module by module: the randomized SVD loses
almost nothing against the optimum the full SVD gives.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FULL = {"hidden": 2304, "mlp": 5632, "kv": 576, "layers": 2, "rank": 32, "delta_rank": 32}
QUICK = {"hidden": 256, "mlp": 640, "kv": 64, "layers": 2, "rank": 8, "delta_rank": 8}


def shapes(g: dict) -> dict[str, tuple[int, int]]:
    h, m, kv = g["hidden"], g["mlp"], g["kv"]
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (m, h), "mlp.up_proj": (m, h), "mlp.down_proj": (h, m)}


def build(g: dict, folder: Path) -> tuple[Path, Path]:
    """base.safetensors and tuned.safetensors (bf16): tuned = base + rank-r delta (entries ~1e-3) + noise (~1e-5)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for layer in range(g["layers"]):
        for leaf, (out, inp) in shapes(g).items():
            name = f"model.layers.{layer}.{leaf}.weight"
            W = torch.randn(out, inp, generator=gen) * 0.02
            r = g["delta_rank"]
            S = torch.logspace(0, -1.5, r)  # a decaying spectrum, as a trained delta's
            U = torch.linalg.qr(torch.randn(out, r, generator=gen)).Q
            V = torch.linalg.qr(torch.randn(inp, r, generator=gen)).Q
            delta = (U * S) @ V.T
            delta *= 1e-3 / float(delta.square().mean().sqrt())
            base[name] = W.to(torch.bfloat16)
            tuned[name] = (W + delta + 1e-5 * torch.randn(out, inp, generator=gen)).to(torch.bfloat16)
        base[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(g["hidden"], dtype=torch.bfloat16)
        tuned[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(g["hidden"], dtype=torch.bfloat16)
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    return folder / "base.safetensors", folder / "tuned.safetensors"


def run_loraops(base: str, tuned: str, rank: int, repeat: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import loraops

    times, report = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        _, report = loraops.extract(base, tuned, rank=rank, device="cpu", dtype="fp32")
        times.append(time.perf_counter() - started)
    return {"times": times, "errors": {m.name: m.error for m in report.modules},
            "svd": sorted({m.svd for m in report.modules})}


def run_reference(base: str, tuned: str, rank: int, repeat: int) -> dict:
    from safetensors import safe_open

    times, errors = [], {}
    for _ in range(repeat):
        started = time.perf_counter()
        with safe_open(base, "pt") as b, safe_open(tuned, "pt") as t:
            for key in b.keys():
                if not key.endswith("proj.weight"):
                    continue
                D = t.get_tensor(key).float() - b.get_tensor(key).float()
                U, S, Vh = torch.linalg.svd(D, full_matrices=False)
                up, down = (U[:, :rank] * S[:rank]).contiguous(), Vh[:rank].contiguous()  # what kohya saves
                errors[key.removesuffix(".weight")] = float(S[rank:].double().square().sum().sqrt()
                                                            / S.double().square().sum().sqrt())
                del D, U, S, Vh, up, down
        times.append(time.perf_counter() - started)
    return {"times": times, "errors": errors, "svd": ["full"]}


def peak_rss() -> int:
    """This process's peak resident memory: VmHWM, which starts afresh at exec (ru_maxrss would carry the parent's
    peak, the models it built, into the child)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> None:
    run = run_loraops if args.side == "loraops" else run_reference
    result = run(args.base, args.tuned, args.rank, args.repeat)
    result["peak_rss"] = peak_rss()
    print(json.dumps(result))


def side(which: str, base: Path, tuned: Path, rank: int, repeat: int, home: str) -> dict:
    env = {**os.environ, "LORAOPS_HOME": home, "HF_HOME": home, "LORAOPS_QUIET": "1"}
    done = subprocess.run([sys.executable, __file__, "--side", which, "--base", str(base), "--tuned", str(tuned),
                           "--rank", str(rank), "--repeat", str(repeat)], capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--side", choices=["loraops", "reference"])
    parser.add_argument("--base")
    parser.add_argument("--tuned")
    parser.add_argument("--rank", type=int)
    args = parser.parse_args()
    if args.side:
        return child(args)
    g = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        base, tuned = build(g, Path(tmp))
        size = base.stat().st_size
        print(f"extract rank {g['rank']} from {g['layers']} layers × 7 linear weights (hidden {g['hidden']}, "
              f"intermediate {g['mlp']}, kv {g['kv']}), bf16, {size / 2**20:.0f} MiB per model; delta of rank "
              f"{g['delta_rank']} + noise; torch {torch.__version__}, {torch.get_num_threads()} threads; best of "
              f"{args.repeat}")
        ours = side("loraops", base, tuned, g["rank"], args.repeat, str(Path(tmp) / "home"))
        ref = side("reference", base, tuned, g["rank"], args.repeat, str(Path(tmp) / "home"))
    best_ours, best_ref = min(ours["times"]), min(ref["times"])
    print(f"  {'':40s} {'loraops':>12s} {'reference':>12s}")
    print(f"  {'time (best run)':40s} {best_ours:10.2f} s {best_ref:10.2f} s   reference / loraops = "
          f"{best_ref / best_ours:.1f}×")
    print(f"  {'first run (loraops: + hashing, imports)':40s} {ours['times'][0]:10.2f} s {ref['times'][0]:10.2f} s")
    print(f"  {'peak RSS':40s} {ours['peak_rss'] / 2**20:8.0f} MiB {ref['peak_rss'] / 2**20:8.0f} MiB")
    print(f"  {'SVD':40s} {'+'.join(ours['svd']):>16s} {'+'.join(ref['svd']):>8s}")
    mean = {k: sum(v["errors"].values()) / len(v["errors"]) for k, v in (("ours", ours), ("ref", ref))}
    print(f"  {'relative Frobenius error (mean)':40s} {mean['ours']:12.5f} {mean['ref']:12.5f}")
    worst = max(ours["errors"], key=lambda n: ours["errors"][n] - ref["errors"][n])
    print(f"  max error difference (loraops − reference) over {len(ref['errors'])} modules: "
          f"{ours['errors'][worst] - ref['errors'][worst]:.2e} ({worst})")


if __name__ == "__main__":
    main()
