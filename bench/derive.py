"""Benchmark `loraops combine --method linear` of two adapters and `loraops resize --rank` on Llama-70B-shaped
adapters: time and peak memory of the whole CLI run, this tree against another checkout (default /work/main, the
commit this work branched from), side by side in one run, best of N, round-robin.

    python bench/derive.py                  # 20 layers × 7 linear types of 70B shape, rank 64, bfloat16 (414 MB each)
    python bench/derive.py --layers 80      # the whole 70B adapter (1.66 GB each)
    python bench/derive.py --quick          # 1 layer, one run each: a smoke test
    python bench/derive.py --before PATH    # compare against another checkout of loraops

Each tree gets its own home with both inputs registered once (not measured); before each measured run the result
of the previous one is removed from the registry, so every run computes, writes, hashes and stores its result.
Peak memory is the child process's ru_maxrss (os.wait4). The inputs are built once under --cache (outside the repo).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import ROOT  # noqa: E402
from store import RANK, SHAPES  # noqa: E402

sys.path.insert(0, str(ROOT))


def build(folder: Path, layers: int, seed: int) -> Path:
    """A PEFT adapter folder of random bfloat16 factors (written once, kept under --cache)."""
    import torch

    from loraops.st import write_safetensors

    adapter = folder / f"adapter-{layers}-{seed}"
    if (adapter / "adapter_config.json").exists():
        return adapter
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for name, (out, inp) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(RANK, inp, generator=generator) / inp ** 0.5).bfloat16()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out, RANK, generator=generator) * 0.01).bfloat16()
    shutil.rmtree(adapter, ignore_errors=True)
    adapter.mkdir(parents=True)
    write_safetensors(adapter / "adapter_model.safetensors", tensors, {"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": sorted(SHAPES)}))
    return adapter


def measured(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one child process."""
    started = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    stderr = child.stderr.read().decode()
    child.stderr.close()
    if child.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode}):\n{stderr[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--new-rank", type=int, default=16, help="resize --rank (default 16)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--before", type=Path, default=Path("/work/main"), help="the checkout to compare against")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/loraops-bench/derive"))
    args = parser.parse_args(argv)
    layers, runs = (1, 1) if args.quick else (args.layers, args.runs)
    py = sys.executable
    a, b = build(args.cache, layers, 1), build(args.cache, layers, 2)
    size = (a / "adapter_model.safetensors").stat().st_size
    trees = {"before": args.before.resolve(), "after": ROOT}
    out = args.cache / "out"
    envs = {}
    for label, tree in trees.items():
        home = args.cache / f"home-{label}"
        shutil.rmtree(home, ignore_errors=True)
        # run from the cache folder: `python -m` puts the working folder first on sys.path, before PYTHONPATH
        envs[label] = {**os.environ, "PYTHONPATH": str(tree), "LORAOPS_HOME": str(home), "LORAOPS_QUIET": "1"}
        for name, adapter in (("a", a), ("b", b)):
            subprocess.run([py, "-m", "loraops", "register", str(adapter), "--name", name], env=envs[label], check=True,
                           stdout=subprocess.DEVNULL, cwd=args.cache)
    ops = {
        "combine linear a b -o": ["combine", "a", "b", "--method", "linear", "--name", "c", "--device", "cpu",
                                  "-o", str(out / "c"), "--force"],
        "combine linear a b (registry only)": ["combine", "a", "b", "--method", "linear", "--name", "c", "--device",
                                               "cpu"],
        f"resize a --rank {args.new_rank} -o": ["resize", "a", "--rank", str(args.new_rank), "--name", "c",
                                                "--device", "cpu", "-o", str(out / "c"), "--force"],
    }

    def run(label: str, op: list[str]) -> tuple[float, int]:
        env = envs[label]
        subprocess.run([py, "-m", "loraops", "rm", "c", "--all"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, cwd=args.cache)  # the previous run's result (absent the first time)
        shutil.rmtree(out, ignore_errors=True)
        os.sync()  # no dirty pages of an earlier run still waiting to be written
        return measured([py, "-m", "loraops", *op], env, args.cache)

    results: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for _ in range(runs):  # round-robin: every kind of run meets the same mix of other load
        for op, cmd in ops.items():
            for label in trees:
                results.setdefault((op, label), []).append(run(label, cmd))
    shutil.rmtree(out, ignore_errors=True)

    print(f"\ninputs: two rank-{RANK} PEFT adapters, {layers} Llama-70B-shaped layers × 7 linear types, "
          f"{size / 2**20:.0f} MiB bfloat16 each; before = {trees['before']}, after = {trees['after']}; best of "
          f"{runs}; {os.cpu_count()} CPUs; whole CLI runs (torch start-up included)")
    print(f"{'run':<38}{'before s':>10}{'after s':>9}{'after/before':>14}{'before RSS':>12}{'after RSS':>11}"
          f"{'after/before':>14}")
    for op in ops:
        t0, t1 = (min(t for t, _ in results[(op, label)]) for label in trees)
        m0, m1 = (max(m for _, m in results[(op, label)]) for label in trees)  # the worst run's
        print(f"{op:<38}{t0:>10.2f}{t1:>9.2f}{t1 / t0:>14.2f}{m0 / 2**30:>10.2f} G{m1 / 2**30:>9.2f} G{m1 / m0:>14.2f}")


if __name__ == "__main__":
    main()
