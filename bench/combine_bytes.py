"""sha256 of every element-wise combine method's output over seeded adapters: the check that a change to how they
are computed (memory, speed) leaves every output byte as it was. Run it at two commits and compare the lines:

    PYTHONPATH=. python bench/combine_bytes.py > before.txt   # at the old commit
    PYTHONPATH=. python bench/combine_bytes.py > after.txt    # at the new one; diff them: no line may differ

Cases: each method with several option sets; weights positive, negative and past float32's range (the refusal's
message is hashed then); float32, bfloat16 and float16 inputs; precise (float64, exact SVD); small modules cut into
many row blocks (BLOCK_ELEMENTS lowered), layouts whose weight is transposed (an embedding, a Conv1D) or one column
wide, and one module of two real row blocks re-factorized by the randomized SVD."""
from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from factories import layouts_adapter, lora_adapter  # noqa: E402
from loraops.algebra import combine  # noqa: E402
from loraops.errors import LoraopsError  # noqa: E402
from loraops.ops import svd  # noqa: E402

CASES = [
    ("ties", {"density": 0.3}), ("ties", {"density": 0.3, "consensus": "count"}),
    ("ties", {"density": 0.5, "normalize": False, "lambda": 0.7}), ("ties", {"density": 0.3, "rescale_norm": "l2"}),
    ("ties", {"density": 1.0}), ("ties", {"density": [0.2, 0.6, 0.4]}),
    ("magnitude_prune", {"density": 0.5}), ("magnitude_prune", {"density": 0.1, "normalize": True}),
    ("dare_linear", {"density": 0.4, "seed": 7}), ("dare_linear", {"density": 0.4, "rescale": False}),
    ("dare_linear", {"density": 0.4, "seed": 7, "rescale_norm": "l2", "normalize": True}),
    ("dare_ties", {"density": 0.6, "seed": 3, "lambda": 0.7}),
    ("dare_ties", {"density": 0.6, "seed": 3, "rescale": False, "consensus": "count"}),
    ("dare_ties", {"density": 0.6, "rescale_norm": "linf", "normalize": True}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}), ("breadcrumbs", {"density": 0.5, "rescale_norm": "l1"}),
    ("breadcrumbs_ties", {"density": 0.3, "lambda": 1.5}), ("breadcrumbs_ties", {"density": 0.3, "consensus": "count"}),
    ("breadcrumbs", {"density": [0.5, 0.3, 0.4], "gamma": [0.1, 0.0, 0.2]}),
    ("della", {"density": 0.5, "seed": 5}), ("della", {"density": 0.5, "seed": 5, "rescale": False,
                                                       "consensus": "count"}),
    ("della_linear", {"density": 0.4, "epsilon": 0.3, "seed": 2}),
    ("della_linear", {"density": 0.4, "epsilon": 0.3, "rescale_norm": "linf"}),
    ("della_linear", {"density": 0.6, "epsilon": 0.0, "normalize": True}),
    ("sce", {"select_topk": 0.3}), ("sce", {}), ("sce", {"select_topk": 0.5, "consensus": "count"}),
]
WEIGHTS = {"mixed": (0.7, -0.4, 1.2), "positive": (0.7, 0.4, 1.2), "large": (1e30, 2e30, 5e29),
           "small": (1e-30, 2e-30, 3e-31), "tiny": (1e-30, 2e-30, 1e-38),
           "huge": (3e38, 2e38, 1.0), "beyond": (1e39, 0.5, 1.0)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def digest(result) -> str:
    h = hashlib.sha256()
    for name, module in sorted(result[0].modules.items()):
        for t in (module.B, module.A):
            h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.flatten().clone().view(torch.uint8).numpy().tobytes())
    h.update(repr([(m.name, m.rank, m.svd, m.error) for m in result[1].modules]).encode())
    return h.hexdigest()[:16]


def run(label: str, inputs, method: str, params: dict, **options) -> None:
    try:
        out = digest(combine(inputs, method, params, device="cpu", **options))
    except LoraopsError as e:
        out = "refused " + hashlib.sha256(str(e).encode()).hexdigest()[:16]
    print(f"{label:<14}{method:<18}{str(params):<70}{out}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-big", action="store_true", help="skip the module of real row blocks (the slow part)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # (the SVDs' bytes depend on the thread count: one, whatever the machine)
    shapes = {"a.q": (48, 40), "a.v": (33, 40), "a.o": (40, 1)}
    svd.BLOCK_ELEMENTS = 200  # many row blocks (and a ragged last one) in these small modules
    for dname, dtype in DTYPES.items():
        for wname, weights in WEIGHTS.items():
            adapters = [lora_adapter(shapes, rank=r, alpha=a, seed=s, dtype=dtype, scale_mode=m)
                        for r, a, s, m in ((3, 6, 1, "classic"), (5, 4, 2, "rslora"), (4, 4, 3, "classic"))]
            adapters[2] = replace(adapters[2], modules={**adapters[2].modules,
                                                        "b.o": lora_adapter({"b.o": (24, 16)}, rank=2, seed=4,
                                                                            dtype=dtype).modules["b.o"]})
            for method, params in CASES:
                run(f"{dname}/{wname}", list(zip(adapters, weights)), method, params)
    layouts = [layouts_adapter(seed) for seed in (1, 2)]
    for method, params in CASES:
        run("layouts", list(zip(layouts, (0.8, 0.5))), method, params)
        for weights in ((0.8, -0.5), (3e38, 2e38), (1e300, 1e300)):
            run("precise", list(zip(layouts, weights)), method, params, precise=True)
    if args.no_big:
        return
    svd.BLOCK_ELEMENTS = 1 << 22
    big = [lora_adapter({"m": (2100, 2200)}, rank=8, seed=s) for s in (5, 6)]
    for method, params in CASES[::3]:
        run("big", list(zip(big, (0.7, 0.5))), method, {**params, "density": 0.5} if "density" in params else params,
            rank=8)


if __name__ == "__main__":
    main()
