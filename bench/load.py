"""Benchmark what loading registered adapters costs in anonymous memory (the memory the kernel cannot drop under
pressure) and time: before (another loraops checkout, --before) and after (this one), side by side, best of N.

    python bench/load.py --before /work/main          # before/after, in one run
    python bench/load.py --quick                      # small shapes, one run each: a smoke test
    python bench/load.py --before /work/main --only load --runs 9   # the load alone, best of 9

Three runs, each in a fresh process against a registry holding the adapters (LORAOPS_HOME under --cache):
  load        Registry.load_adapter of a rank-64 bf16 PEFT adapter on --layers Llama-70B-shaped layers × 7 linear
              types (20 layers: 395 MiB; the whole 80-layer adapter is 1.5 GiB)
  merge ref   `merge lora --into base --no-record` as a library call: the bench/merge.py TinyLlama-1.1B-shaped bf16
              base (2 GiB) and a rank-256 bf16 adapter on it (385 MiB), given by registry reference
  merge path  the same adapter given by its path (registered: since this change its stored copy is used)
Each process reports RssAnon (/proc/self/status) before the operation, its peak while it runs (sampled every
2 ms), and VmHWM, the peak of all its resident memory, which counts the mapped file pages it touched too (page
cache: reclaimable). (ru_maxrss is not shown: Linux carries it over from the parent across exec, so a child of this
script reports this script's peak.) Files are warm in the page cache; torch's import is not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge as merge_bench  # noqa: E402
from merge import ROOT, timed  # noqa: E402
from store import SHAPES as SHAPES_70B  # noqa: E402

sys.path.insert(0, str(ROOT))

MERGE_RANK = 256

RUN = """
import json, sys, threading, time
import torch  # start-up, not measured
from loraops import merging
from loraops.registry import Registry

def status(key="RssAnon:"):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

anon = status

what, arg, base, out = sys.argv[1:5]
peak, stop = [anon()], threading.Event()
def sample():
    while not stop.wait(0.002):
        peak[0] = max(peak[0], anon())
with Registry.open() as reg:
    before = anon()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    if what == "load":
        kept = reg.load_adapter(arg)
    else:
        kept = merging.merge(base, [arg], out, record=False, force=True, device="cpu", progress=False)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    print(json.dumps({"seconds": seconds, "before": before, "peak": max(peak[0], anon()),
                      "hwm": status("VmHWM:")}))
"""


def peft_folder(folder: Path, factors: dict[str, tuple[int, int]], rank: int, targets, seed: int) -> Path:
    """A PEFT folder of random bf16 factors, {module: (out, in)}, written once."""
    import torch

    from loraops.st import write_safetensors

    if (folder / "adapter_config.json").exists():
        return folder
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out, inp) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = (torch.randn(rank, inp, generator=generator) * 0.01).bfloat16()
        tensors[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(out, rank, generator=generator) * 0.01).bfloat16()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(targets)}))
    return folder


def build(cache: Path, layers: int, size: str) -> dict[str, Path]:
    big = peft_folder(cache / f"adapter-70b-{layers}", {
        f"model.layers.{i}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}": shape
        for i in range(layers) for name, shape in SHAPES_70B.items()}, 64, SHAPES_70B, seed=0)
    base, _ = merge_bench.build(cache / size, size)
    hidden, inter, n, heads, kv, vocab, _ = merge_bench.SHAPES[size]
    targeted = {name.removesuffix(".weight"): shape for name, shape in
                merge_bench.tensor_shapes(hidden, inter, n, heads, kv, vocab).items()
                if name.removesuffix(".weight").rpartition(".")[2] in merge_bench.TARGETS}
    rank = MERGE_RANK if size != "quick" else 16
    adapter = peft_folder(cache / f"adapter-{size}-r{rank}", targeted, rank, merge_bench.TARGETS, seed=1)
    return {"big": big, "base": base, "adapter": adapter, "rank": rank}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="another loraops checkout to compare with (e.g. /work/main)")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/loraops-bench-load"))
    parser.add_argument("--only", help="comma-separated runs to do (load, merge ref, merge path; default all)")
    args = parser.parse_args()
    layers, runs, size = (1, 1, "quick") if args.quick else (args.layers, args.runs, "1b")
    made = build(args.cache, layers, size)
    codes = {"before": args.before, "after": ROOT} if args.before else {"after": ROOT}
    out = args.cache / "out"

    def env(label: str) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(codes[label]), "LORAOPS_HOME": str(args.cache / f"home-{label}"),
                "LORAOPS_QUIET": "1"}

    py = sys.executable
    for label in codes:  # each checkout's own registry, holding the same adapters and base
        home = args.cache / f"home-{label}"
        if not (home / "registry.db").exists():
            shutil.rmtree(home, ignore_errors=True)
            for cmd in (["register", str(made["big"]), "--name", "big"], ["register", str(made["adapter"]), "--name", "lora"],
                        ["base", "add", str(made["base"]), "--name", "base"]):
                timed([py, "-P", "-m", "loraops", *cmd], env=env(label))
    plan = {"load": ("load", "big"), "merge ref": ("merge", "lora"), "merge path": ("merge", str(made["adapter"]))}
    if args.only:
        plan = {run: plan[run] for run in args.only.split(",")}
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(runs):  # round-robin: every kind of run meets the same mix of other load
        for run, (what, arg) in plan.items():
            for label in codes:
                shutil.rmtree(out, ignore_errors=True)
                _, stdout = timed([py, "-P", "-c", RUN, what, arg, "base", str(out)], env=env(label))
                results.setdefault((run, label), []).append(json.loads(stdout.strip().splitlines()[-1]))
    shutil.rmtree(out, ignore_errors=True)

    mib = 2 ** 20
    big_size = (made["big"] / "adapter_model.safetensors").stat().st_size
    lora_size = (made["adapter"] / "adapter_model.safetensors").stat().st_size
    print(f"\nload: rank-64 bf16 PEFT adapter, {layers} Llama-70B-shaped layers × 7 linear types, {big_size / mib:.0f} MiB")
    print(f"merge: {size} bf16 base, rank-{made['rank']} bf16 adapter on its 7 linear types, {lora_size / mib:.0f} MiB")
    print(f"best of {runs} (time); memory: the largest of the runs; {os.cpu_count()} CPUs; files warm in the page cache")
    print(f"{'run':<12}{'code':<8}{'seconds':>9}{'anon before':>13}{'anon peak':>11}{'anon growth':>13}{'VmHWM':>10}")
    for run in plan:
        for label in codes:
            measured = results[(run, label)]
            seconds, before, peak, hwm = (f(m[k] for m in measured) for f, k in
                                          ((min, "seconds"), (max, "before"), (max, "peak"), (max, "hwm")))
            print(f"{run:<12}{label:<8}{seconds:>9.2f}{before / mib:>9.0f} MiB{peak / mib:>7.0f} MiB"
                  f"{(peak - before) / mib:>9.0f} MiB{hwm / mib:>6.0f} MiB")
        if len(codes) == 2:
            time = [min(m["seconds"] for m in results[(run, label)]) for label in codes]
            growth = [max(m["peak"] - m["before"] for m in results[(run, label)]) for label in codes]
            print(f"{'':<12}{'after/before: time':<28}{time[1] / time[0]:.2f}×, anonymous growth "
                  f"{growth[1] / max(growth[0], 1):.2f}×")

if __name__ == "__main__":
    main()
