"""Benchmark what grows with a base's shard count and with a module's size: before (another loraops checkout,
--before) and after (this one), side by side, best of N, round-robin so both sides meet the same other load.

    python bench/scale.py --before /work/main            # both parts
    python bench/scale.py --before /work/main --only shards
    python bench/scale.py --before /work/main --only combine --methods ties,dare --runs 2
    python bench/scale.py --quick                        # small shapes, one run each: a smoke test

shards   a Llama-shaped base with tiny widths, --layers layers (9 tensors each) in --shards safetensors shards with a
         model.safetensors.index.json, and a rank-4 PEFT adapter on its 7 linear types: `loraops check ADAPTER
         --base BASE` and `loraops merge ADAPTER --into BASE --no-record` (CLI, fresh process each; both used to
         look up a tensor's model folder by searching every shard list: quadratic in the shards).
combine  one Llama-70B MLP module (8192×28672), two rank-256 inputs combined by each --methods method to rank 256
         (element-wise: a dense delta, then refactor_dense's randomized SVD), on 2 torch threads; and that SVD alone
         (refactor_dense of the plain sum of the two deltas). --shape OUTxINxRANK and --inputs N change the module
         and the inputs. The last column compares after's factors with before's (identical bytes, else the
         relative Frobenius difference of B'·A': float32 rounding, not a different result). Then the element-wise
         part alone (the whole less refactor_dense) and each side's peak RSS (the child's ru_maxrss).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import peft_folder  # noqa: E402
from merge import ROOT, TARGETS, tensor_shapes  # noqa: E402

COMBINE = """
import json, resource, sys, time, torch
from loraops.ops import combine, svd
from loraops.ops.combine import METHODS, Context, Term
method, out_f, in_f, rank, threads, save, count = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6], int(sys.argv[7])
clock = time.process_time if sys.argv[8] == "cpu" else time.perf_counter
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
terms = [Term(torch.randn(out_f, rank, generator=g) * 0.01, torch.randn(rank, in_f, generator=g) / in_f ** 0.5, 2.0, w)
         for w in (1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.9, 0.8)[:count]]
svd_seconds = [0.0]
refactor_dense = combine.refactor_dense

def timed(D, k, exact=False):  # the element-wise part is the rest
    started = clock()
    try:
        return refactor_dense(D, k, exact=exact)
    finally:
        svd_seconds[0] += clock() - started

combine.refactor_dense = timed
started = clock()
if method == "dense-svd":  # refactor_dense alone
    made = timed(terms[0].delta().add_(terms[1].delta(), alpha=0.7), rank)
else:
    spec = METHODS[method]
    options = {"select_topk": 0.5} if method == "sce" else {"density": 0.5}
    params = spec.params(**options, **({"gamma": 0.01} if method.startswith("breadcrumbs") else {}))
    made = spec.run(terms, params, rank, Context("model.layers.0.mlp.down_proj", (out_f, in_f)))
seconds = clock() - started
torch.save({"B": made.B, "A": made.A}, save)
print(json.dumps({"seconds": seconds, "elementwise": seconds - svd_seconds[0], "svd": made.svd, "error": made.error,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def sharded_base(folder: Path, layers: int, shards: int) -> tuple[Path, Path]:
    """A bf16 Llama-shaped base of tiny widths in ``shards`` shards (tensors dealt out evenly, index + config.json)
    and a rank-4 PEFT adapter on it, written once."""
    import torch

    from loraops.st import header_bytes

    base, adapter = folder / "base", folder / "adapter"
    hidden, inter, heads, kv, vocab = 32, 64, 4, 2, 500
    shapes = tensor_shapes(hidden, inter, layers, heads, kv, vocab)
    targeted = {name.removesuffix(".weight"): shape for name, shape in shapes.items()
                if name.removesuffix(".weight").rpartition(".")[2] in TARGETS}
    if not (base / "config.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        names = list(shapes)
        per = math.ceil(len(names) / shards)
        groups = [sorted(names[i:i + per]) for i in range(0, len(names), per)]
        weight_map, total, g = {}, 0, torch.Generator().manual_seed(0)
        for i, group in enumerate(groups):
            file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            with open(base / file, "wb") as f:
                f.write(header_bytes([(n, "BF16", shapes[n]) for n in group], {"format": "pt"}))
                for n in group:
                    t = (torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16)
                    f.write(t.view(torch.uint8).numpy().tobytes())
                    weight_map[n], total = file, total + t.numel() * 2
        (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                         "weight_map": weight_map}))
        (base / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    return base, peft_folder(adapter, targeted, 4, TARGETS, seed=1)


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, done.stdout


def side_by_side(title: str, rows: dict[str, dict[str, float]], codes, extra=None) -> None:
    print(f"\n{title}")
    print(f"  {'':<28}" + "".join(f"{label:>10}" for label in codes) + ("     after/before" if len(codes) == 2 else ""))
    for name, seconds in rows.items():
        line = f"  {name:<28}" + "".join(f"{seconds[label]:>9.2f}s" for label in codes)
        if len(codes) == 2:
            line += f"{seconds['after'] / seconds['before']:>12.2f}×"
        print(line + (f"   {extra[name]}" if extra and name in extra else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="another loraops checkout to compare with (e.g. /work/main)")
    parser.add_argument("--only", choices=["shards", "combine"])
    parser.add_argument("--runs", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--shards", type=int, default=1443)
    parser.add_argument("--layers", type=int, default=1600, help="base layers: 9 tensors each (default 1600)")
    parser.add_argument("--methods", default="ties,dare_ties,breadcrumbs,della,dense-svd",
                        help="combine methods to time (dense-svd: refactor_dense alone)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", help="OUTxINxRANK of the combine module and inputs (default 8192x28672x256)")
    parser.add_argument("--inputs", type=int, default=2, help="inputs combined (default 2, at most 8)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="combine: wall seconds, or the process's CPU seconds (all threads: steadier on a "
                             "machine others load)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/loraops-bench-scale"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    runs, shards, layers, (out_f, in_f, rank) = ((1, 20, 20, (2304, 4096, 16)) if args.quick else
                                                 (args.runs, args.shards, args.layers, (8192, 28672, 256)))
    if args.shape:
        out_f, in_f, rank = map(int, args.shape.lower().split("x"))
    codes = {"before": args.before, "after": ROOT} if args.before else {"after": ROOT}
    args.cache.mkdir(parents=True, exist_ok=True)

    def env(label: str) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(codes[label]), "LORAOPS_HOME": str(args.cache / f"home-{label}"),
                "HF_HOME": str(args.cache / "hf"), "HF_HUB_OFFLINE": "1", "LORAOPS_QUIET": "1"}

    py = [sys.executable, "-P"]
    print(f"{os.cpu_count()} CPUs, best of {runs}")
    if args.only in (None, "shards"):
        base, adapter = sharded_base(args.cache / f"base-{layers}x{shards}", layers, shards)
        out = args.cache / "merged"
        plan = {"check": ["check", str(adapter), "--base", str(base)],
                "merge --no-record": ["merge", str(adapter), "--into", str(base), "-o", str(out), "--no-record",
                                      "--device", "cpu", "--force"]}
        times: dict[str, dict[str, float]] = {name: {} for name in plan}
        for _ in range(runs):
            for name, cmd in plan.items():
                for label in codes:
                    seconds, _ = run([*py, "-m", "loraops", *cmd], env(label))
                    times[name][label] = min(times[name].get(label, math.inf), seconds)
        shutil.rmtree(out, ignore_errors=True)
        files = len(list(base.glob("*.safetensors")))
        side_by_side(f"shards: {files} shards, {layers * 9 + 3} tensors, adapter on {layers * 7} modules (CLI, whole "
                     "process)", times, codes)
    if args.only in (None, "combine"):
        methods = args.methods.split(",")
        times = {m: {} for m in methods}
        parts = {m: {} for m in methods if m != "dense-svd"}  # the element-wise part: the whole less the SVD
        peaks = {m: {} for m in methods}
        notes = {}
        for _ in range(runs):
            for method in methods:
                for label in codes:
                    save = args.cache / f"{method}-{label}.pt"
                    _, stdout = run([*py, "-c", COMBINE, method, str(out_f), str(in_f), str(rank), str(args.threads),
                                     str(save), str(args.inputs), args.clock], env(label))
                    made = json.loads(stdout.strip().splitlines()[-1])
                    times[method][label] = min(times[method].get(label, math.inf), made["seconds"])
                    if method in parts:
                        parts[method][label] = min(parts[method].get(label, math.inf), made["elementwise"])
                    peaks[method][label] = max(peaks[method].get(label, 0), made["peak_rss"] / 1e9)
                    notes[method] = f"{made['svd']} SVD, error {made['error']:.4f}"
        if len(codes) == 2:
            import torch

            for method in methods:
                before, after = (torch.load(args.cache / f"{method}-{label}.pt") for label in codes)
                if all(torch.equal(before[f], after[f]) for f in "BA"):
                    notes[method] += ", after = before: identical bytes"
                    continue
                P0, P1 = (m["B"].double() @ m["A"].double() for m in (before, after))
                notes[method] += f", after vs before: product rel diff {float((P1 - P0).norm() / P0.norm()):.1e}"
        label = {m: "refactor_dense alone" if m == "dense-svd" else m for m in methods}
        title = (f"one {out_f}×{in_f} module, {args.inputs} inputs of rank {rank} → rank {rank}, "
                 f"{args.threads} threads")
        side_by_side(f"combine: {title}, {args.clock} seconds", {label[m]: times[m] for m in methods}, codes,
                     {label[m]: notes[m] for m in methods})
        side_by_side("  of which the element-wise part (the whole less refactor_dense)", parts, codes)
        print("\n  peak RSS (GB, the largest of the runs)")
        for method in methods:
            print(f"  {label[method]:<28}" + "".join(f"{peaks[method][c]:>9.2f} " for c in codes), flush=True)


if __name__ == "__main__":
    main()
