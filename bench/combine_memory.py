"""Peak memory of the element-wise combine methods on one Llama-7B MLP-shaped module (4096×11008, two rank-256
float32 inputs, rank 16 out): each method in a fresh process, its peak RSS (VmHWM, reset first) above the RSS before,
in multiples of the module's dense float32 delta (172 MiB). Twice: with glibc's default allocator (what a CLI run
gets: freed blocks the heap keeps count), and with a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=65536: every
large block goes back when freed, so the peak is what was alive at once).

    python bench/combine_memory.py     # from the root of the checkout to measure
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path.cwd()  # (the checkout measured: run it from its root)
CHILD = """
import sys, time, torch
from loraops.ops import combine as C

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) * 1024

shape, rank = (4096, 11008), 256
g = torch.Generator().manual_seed(0)
terms = [C.Term(torch.randn(shape[0], rank, generator=g) * 0.1, torch.randn(rank, shape[1], generator=g) / 100, 0.5, w)
         for w in (0.7, 0.4)]
spec = C.METHODS[sys.argv[1]]
params = spec.params.model_validate({"density": 0.5})
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
started = time.perf_counter()
spec.run(terms, params, 16, C.Context("m", shape))
print(f"{(status('VmHWM') - before) / (shape[0] * shape[1] * 4):.2f} {time.perf_counter() - started:.1f}")
"""
METHODS = ("ties", "dare_ties", "dare_linear", "della", "breadcrumbs", "magnitude_prune")


def main() -> None:
    print(f"{'method':<18}{'default malloc':>16}{'fixed mmap threshold':>22}   (peak above the RSS before, × delta)")
    for method in METHODS:
        cells = []
        for extra in ({}, {"MALLOC_MMAP_THRESHOLD_": "65536"}):
            env = {**os.environ, **extra, "PYTHONPATH": str(ROOT)}
            out = subprocess.run([sys.executable, "-c", CHILD, method], env=env, capture_output=True, text=True,
                                 check=True).stdout.split()
            cells.append(f"{out[0]}× {out[1]:>5}s")
        print(f"{method:<18}{cells[0]:>16}{cells[1]:>22}", flush=True)


if __name__ == "__main__":
    main()
