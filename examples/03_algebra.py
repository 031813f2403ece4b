"""Adapter algebra: combine (cat, linear, ties, dare_ties, breadcrumbs_ties, della, nuslerp, multislerp), resize
(fixed and kohya's dynamic rules), export.

    python examples/03_algebra.py [WORKDIR]

Builds a tiny Llama-style base and three PEFT adapters in WORKDIR (default: a temp dir), then runs each command
through the real CLI (`python -m loraops ...`). Finally it checks, in float64, that the exact methods reproduce the
weighted sum of the inputs' deltas — the guarantee the README states.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _build import algebra_inputs, loraops, workdir  # noqa: E402


def max_error_of_weighted_sum(result: Path, inputs: list[tuple[Path, float]]) -> float:
    """Largest |Δ_result − Σ wᵢ·Δᵢ| over every module, relative to the largest |Σ wᵢ·Δᵢ|."""
    import torch

    from loraops.formats import read_adapter

    combined = read_adapter(result)
    adapters = [(read_adapter(path), weight) for path, weight in inputs]
    worst = 0.0
    for name, module in combined.modules.items():
        expected = sum(
            weight * adapter.modules[name].delta(dtype=torch.float64)
            for adapter, weight in adapters
            if name in adapter.modules
        )
        error = (module.delta(dtype=torch.float64) - expected).abs().max() / expected.abs().max()
        worst = max(worst, float(error))
    return worst


def main() -> None:
    work = workdir("03_algebra")
    print(f"building a base and three adapters in {work} ...")
    base, style, subject, big = algebra_inputs(work)

    loraops("base", "add", base)
    loraops("register", style)
    loraops("register", subject)
    loraops("register", big)
    # cat: exact for any ranks; modules missing from an input count as a zero delta.
    loraops("combine", "style:0.7", "subject:0.5", "--method", "cat", "--name", "style-subject",
            "-o", work / "style-subject")
    loraops("show", "style-subject")
    # linear: the same weighted sum, re-factorized by the exact SVD of the concatenated factors.
    loraops("combine", "style:1", "subject:1", "--method", "linear", "--rank", "12", "-o", work / "ab")
    loraops("combine", "style", "subject", "big", "--method", "ties", "--density", "0.2", "--rank", "16",
            "--name", "abc")
    loraops("combine", "style", "subject", "--method", "dare_ties", "--density", "0.3", "--seed", "7",
            "--rank", "16", "--name", "ab-dare")
    # mergekit's other sparsifiers: breadcrumbs drops each delta's gamma largest entries and its smallest, keeping
    # density; DELLA keeps each entry with a probability from its magnitude's rank in its row (density ± epsilon) and
    # divides the survivors by it; lambda scales the mixed result last.
    loraops("combine", "style", "subject", "big", "--method", "breadcrumbs_ties", "--density", "0.3", "--gamma", "0.02",
            "--rank", "16", "--name", "abc-crumbs")
    loraops("combine", "style:0.6", "big:0.8", "--method", "della", "--density", "0.4", "--epsilon", "0.2", "--seed",
            "3", "--lambda", "1.2", "--rank", "16", "--name", "ab-della")
    loraops("combine", "style", "big", "--method", "della", "--density", "0.9", ok=False)  # 0.9 + 0.15 ≥ 1
    loraops("resize", "big", "--rank", "4", "-o", work / "small")
    loraops("resize", "big", "--dynamic", "sv_fro", "--param", "0.9", "--max-rank", "64")
    loraops("export", "abc", "--format", "kohya", "-o", work / "abc.safetensors")
    loraops("inspect", work / "abc.safetensors")
    loraops("resize", "big", "--rank", "32", ok=False)  # rank can only go down
    loraops("combine", "style", "subject", "--method", "ties", "--density", "1.5", ok=False)
    # nuslerp: the spherical interpolation of two deltas (here of each output channel's row, at t = 0.5), from the
    # factors alone: the result is a combination of the two, so the default rank (16 + 8) is lossless.
    loraops("combine", "style", "big", "--method", "nuslerp", "--no-flatten", "--name", "ab-nuslerp")
    # multislerp: the weighted mean of three deltas' directions, at the weighted mean of their norms (lossless too).
    loraops("combine", "style", "subject:0.5", "big", "--method", "multislerp", "--name", "abc-multislerp")
    # --dtype: the result written in float16 (the inputs are float32), each value rounded once from what was computed
    loraops("resize", "big", "--rank", "4", "--dtype", "fp16", "--name", "big-r4-fp16", "-o", work / "small-fp16")

    from loraops.registry import Registry

    with Registry.open() as registry:
        lineage = registry.get_adapter("ab-della").lineage
    print(f"\nlineage of ab-della in the registry: {lineage.op} {lineage.params}, inputs "
          f"{[(i.ref, i.weight) for i in lineage.inputs]}")

    for label, path, inputs in [
        ("cat", work / "style-subject", [(style, 0.7), (subject, 0.5)]),
        ("linear --rank 12 (= total rank: lossless)", work / "ab", [(style, 1.0), (subject, 1.0)]),
    ]:
        error = max_error_of_weighted_sum(path, inputs)
        print(f"\n{label}: max relative error against the float64 weighted sum of deltas = {error:.2e}")
        if error > 1e-5:
            sys.exit(f"{label} is not exact")


if __name__ == "__main__":
    main()
