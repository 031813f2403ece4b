"""Benchmark what loraops writes besides merged models — the registry's stored copy of an adapter and an adapter
written in another layout — against the floor (`cp --reflink=never` + `sync` of the same bytes), with direct I/O
(the default) and through the page cache (LORAOPS_DIRECT_IO=0), side by side, best of N, round-robin.

    python bench/store.py              # a rank-64 PEFT adapter on 10 Llama-70B-shaped layers (414 MB, float32)
    python bench/store.py --layers 80  # the whole 70B adapter (3.3 GB)
    python bench/store.py --quick      # 1 layer, one run each: a smoke test
    python bench/store.py --against /tmp/base  # also register with another checkout's loraops, in the same rounds

`register` runs against an empty home each time, so it stores the adapter (hash, value check, copy, record);
`export` writes the registered adapter as a kohya file. Torch's start-up is measured apart.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import ROOT, timed  # noqa: E402

sys.path.insert(0, str(ROOT))

SHAPES = {"q_proj": (8192, 8192), "k_proj": (1024, 8192), "v_proj": (1024, 8192), "o_proj": (8192, 8192),
          "gate_proj": (28672, 8192), "up_proj": (28672, 8192), "down_proj": (8192, 28672)}
RANK = 64


def build(folder: Path, layers: int) -> Path:
    """A PEFT adapter folder of random float32 factors (written once, kept under --cache)."""
    import torch

    from loraops.st import write_safetensors

    adapter = folder / f"adapter-{layers}"
    if (adapter / "adapter_config.json").exists():
        return adapter
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(layers):
        for name, (out, inp) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, inp, generator=generator) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, RANK, generator=generator) * 0.01
    shutil.rmtree(adapter, ignore_errors=True)
    adapter.mkdir(parents=True)
    write_safetensors(adapter / "adapter_model.safetensors", tensors)
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": sorted(SHAPES)}))
    return adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--cache", type=Path, default=ROOT / "tmp" / "bench")
    parser.add_argument("--against", type=Path, help="another checkout (e.g. `git worktree add /tmp/base main`): "
                        "its register is timed in the same round-robin, a before/after in one run")
    args = parser.parse_args()
    layers, runs = (1, 1) if args.quick else (args.layers, args.runs)
    folder = args.cache / "store"
    adapter = build(folder, layers)
    weights = adapter / "adapter_model.safetensors"
    size = weights.stat().st_size
    home, out = folder / "home", folder / "out"
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "LORAOPS_HOME": str(home), "LORAOPS_QUIET": "1"}
    buffered = {**env, "LORAOPS_DIRECT_IO": "0"}
    against = args.against and {**env, "PYTHONPATH": os.pathsep.join([str(args.against.resolve()),
                                                                      os.environ.get("PYTHONPATH", "")])}

    def fresh() -> None:
        os.sync()  # no dirty pages of an earlier run still waiting to be written
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)

    def cp() -> float:
        fresh()
        return timed(["bash", "-c", f"mkdir -p '{out}' && cp --reflink=never '{weights}' '{out}/' && sync"])[0]

    def register(environ) -> float:
        fresh()
        return timed([py, "-m", "loraops", "register", str(adapter), "--name", "big"], env=environ)[0]

    def export(environ) -> float:
        os.sync()
        shutil.rmtree(out, ignore_errors=True)
        if not home.exists():
            timed([py, "-m", "loraops", "register", str(adapter), "--name", "big"], env=env)
        return timed([py, "-m", "loraops", "export", "big", "--format", "kohya", "-o", str(out / "big.safetensors"),
                      "--force"], env=environ)[0]

    plan = {"cp": cp, "register": lambda: register(env),
            **({"register against": lambda: register(against)} if against else {}),
            "register buffered": lambda: register(buffered),
            "export": lambda: export(env), "export buffered": lambda: export(buffered),
            "torch": lambda: timed([py, "-c", "import torch, os; os._exit(0)"])[0] - timed([py, "-c", "pass"])[0]}
    results: dict[str, list[float]] = {}
    for _ in range(runs):  # round-robin: every kind of run meets the same mix of other load
        for label, fn in plan.items():
            results.setdefault(label, []).append(fn())
    best = {label: min(times) for label, times in results.items()}
    print(f"\nadapter: rank-{RANK} PEFT, {layers} Llama-70B-shaped layers × 7 linear types, {size / 2**20:.0f} MiB "
          f"float32; best of {runs}; {os.cpu_count()} CPUs" + (f"; --against {args.against}" if against else ""))
    print(f"{'run':<44}{'seconds':>9}{'× cp':>8}{'minus torch':>13}{'× cp':>8}")
    for label, text in (("cp", "cp --reflink=never + sync"), ("register", "loraops register (direct I/O)"),
                        *([("register against", "  the same, --against's loraops")] if against else []),
                        ("register buffered", "loraops register (LORAOPS_DIRECT_IO=0)"),
                        ("export", "loraops export --format kohya (direct I/O)"),
                        ("export buffered", "loraops export --format kohya (buffered)")):
        seconds = best[label]
        work = seconds if label == "cp" else seconds - best["torch"]
        print(f"{text:<44}{seconds:>9.2f}{seconds / best['cp']:>8.2f}{work:>13.2f}{work / best['cp']:>8.2f}")
    print(f"{'torch start-up (process)':<44}{best['torch']:>9.2f}")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
