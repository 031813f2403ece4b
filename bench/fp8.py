"""Benchmark a merge into an FP8 checkpoint against the same merge into its bf16 original, side by side, best of N.

    python bench/fp8.py            # TinyLlama-1.1B-shaped base (bench/merge.py's) + rank-16 adapter on 7 linear types
    python bench/fp8.py --quick    # a tiny model, one run each

The FP8 copy is bench/merge.py's bf16 base with every decoder Linear quantized by transformers' own Fp8Quantize
(128×128 blocks, as DeepSeek-V3), built once beside it. Each run is the whole `loraops merge` command (interpreter
start included, --no-record) with the base in the page cache, its output written and synced; the peak RSS is the
engine's (its MergeReport).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import ROOT, build, settle, timed  # noqa: E402


def fp8_copy(base: Path, folder: Path) -> Path:
    """``base`` with its decoder Linear weights in transformers' fine-grained FP8 layout (built once)."""
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    out = folder / "base-fp8"
    if (out / "config.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    quantize = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=[128, 128])))
    index = json.loads((base / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        state = {}
        for name, tensor in load_file(base / shard).items():
            state.update(quantize._quantize_one(name, tensor) if name.endswith("_proj.weight") else {name: tensor})
        save_file(state, str(out / shard), metadata={"format": "pt"})
        index["weight_map"].update({name: shard for name in state})
    index["metadata"]["total_size"] = sum((out / f).stat().st_size for f in set(index["weight_map"].values()))
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=ROOT / "tmp" / "bench")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = "quick" if args.quick else "1b"
    folder = args.cache / size
    if args.build_only:
        fp8_copy(build(folder, size)[0], folder)
        return
    # built in a child: Linux keeps a process's peak RSS across fork and exec, so the runs started from here would
    # report the builder's gigabytes
    subprocess.run([sys.executable, __file__, "--build-only", "--cache", str(args.cache), *(["--quick"] * args.quick)],
                   check=True)
    base, adapter = build(folder, size)
    fp8 = fp8_copy(base, folder)
    out = folder / "out-fp8"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "LORAOPS_HOME": str(folder / "home"), "LORAOPS_QUIET": "1"}
    cases = {"bf16 base → bf16": (base, []), "FP8 base → FP8": (fp8, []), "FP8 base → bf16": (fp8, ["--dtype", "bf16"])}
    rows = []
    for label, (model, extra) in cases.items():
        best, peak = float("inf"), 0
        for _ in range(1 if args.quick else args.runs):
            shutil.rmtree(out, ignore_errors=True)
            settle(model, cold=False)
            seconds, stdout = timed([sys.executable, "-m", "loraops", "merge", str(adapter), "--into", str(model),
                                     "-o", str(out), "--no-record", "--json", "--device", args.device, *extra], env=env)
            best, peak = min(best, seconds), max(peak, json.loads(stdout)["peak_rss_bytes"])
        size_in = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        size_out = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        rows.append((label, best, size_in, size_out, peak))
        shutil.rmtree(out, ignore_errors=True)
    print(f"{'merge (rank-16, 7 linear types)':34} {'seconds':>8} {'× bf16':>7} {'read':>9} {'written':>9} {'peak RSS':>9}")
    for label, seconds, size_in, size_out, peak in rows:
        print(f"{label:34} {seconds:8.2f} {seconds / rows[0][1]:7.2f} {size_in / 2**30:7.2f} G {size_out / 2**30:7.2f} G "
              f"{peak / 2**20:6.0f} MiB")


if __name__ == "__main__":
    main()
