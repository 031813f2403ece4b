"""combine --recipe: a mergekit YAML configuration, with per-model weights and densities, run on LoRA adapters.

    python examples/06_recipe.py [WORKDIR]

Builds a tiny Llama-style base and three PEFT adapters in WORKDIR (default: a temp dir), writes mergekit recipes for
them (the base listed as mergekit's examples list it, one density per model), and runs them through the real CLI
(`python -m loraops combine --recipe ...`). Then it checks, in float64, that the ties result is mergekit's per-model
TIES: each delta trimmed to its own density, signs elected, the disjoint mean — computed here on the dense deltas.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _build import algebra_inputs, loraops, workdir  # noqa: E402

TIES = """\
merge_method: ties
base_model: {base}
models:
  - model: {base}          # the base: no task vector (mergekit skips it)
  - model: style
    parameters: {{weight: 0.7, density: 0.3}}
  - model: subject
    parameters: {{weight: 0.5, density: 0.8}}
  - model: big
    parameters: {{weight: 0.4}}   # density from the top-level parameters
parameters:
  density: 0.5
  normalize: true
  int8_mask: true          # mergekit's mask dtype: changes nothing
dtype: float64             # compute in float64 (--precise)
"""

DARE = """\
merge_method: dare_linear
models:
  - model: style
    parameters: {weight: 1.0, density: 0.4}
  - model: big
    parameters: {weight: 0.6, density: 0.7}
parameters:
  rescale: false           # keep the survivors undivided (true: mergekit's l1 rescale, its default)
"""

REFUSED = """\
merge_method: ties
slices:
  - sources: [{model: style, layer_range: [0, 1]}]
"""


def ties_reference(inputs: list[tuple[Path, float, float]], name: str):
    """mergekit's per-model TIES on the dense float64 deltas of one module: trim each to its own density (the
    ⌊density·n⌋ largest magnitudes), elect the sign of Σ wᵢτ̂ᵢ, the mean of the agreeing entries weighted by wᵢ."""
    import torch

    from loraops.formats import read_adapter

    taus, weights = [], []
    for path, weight, density in inputs:
        module = read_adapter(path).modules.get(name)
        if module is None:
            continue  # a zero task vector: trimmed, it is still zero and agrees with no sign
        tau = module.delta(dtype=torch.float64)
        keep = tau.abs().flatten().argsort(descending=True, stable=True)[:max(1, int(density * tau.numel()))]
        mask = torch.zeros(tau.numel(), dtype=torch.bool)
        mask[keep] = True
        taus.append(tau * mask.reshape(tau.shape))
        weights.append(weight)
    weighted = [w * t for w, t in zip(weights, taus)]
    sign = torch.where(sum(weighted) >= 0, 1.0, -1.0).double()
    agree = [torch.sign(t) == sign for t in weighted]
    divisor = sum(w * a for w, a in zip(weights, agree))
    return sum(t * a for t, a in zip(weighted, agree)) / torch.where(divisor == 0, 1.0, divisor)


def main() -> None:
    import torch

    from loraops.formats import read_adapter

    work = workdir("06_recipe")
    print(f"building a base and three adapters in {work} ...")
    base, style, subject, big = algebra_inputs(work)
    loraops("base", "add", base)
    for adapter in (style, subject, big):
        loraops("register", adapter)

    recipes = {}
    for label, text in (("ties", TIES.format(base=base)), ("dare", DARE), ("refused", REFUSED)):
        recipes[label] = work / f"{label}.yml"
        recipes[label].write_text(text)
    print(f"\n{recipes['ties']}:\n{recipes['ties'].read_text()}")
    # full rank (64 = min(out, in)) so that the result is the method's delta itself, to compare below
    loraops("combine", "--recipe", recipes["ties"], "--rank", "64", "--name", "recipe-ties", "-o", work / "ties-out")
    loraops("combine", "--recipe", recipes["dare"], "--seed", "7", "--rank", "16", "--name", "recipe-dare")
    loraops("show", "recipe-ties")
    # what a recipe gives cannot be given again beside it; what LoRA has no use for is refused by name
    loraops("combine", "--recipe", recipes["ties"], "--density", "0.2", ok=False)
    loraops("combine", "--recipe", recipes["refused"], ok=False)

    result = read_adapter(work / "ties-out")
    inputs = [(style, 0.7, 0.3), (subject, 0.5, 0.8), (big, 0.4, 0.5)]
    worst = 0.0
    for name, module in result.modules.items():
        want = ties_reference(inputs, name)
        worst = max(worst, float((module.delta(dtype=torch.float64) - want).norm() / want.norm()))
    print(f"\nties recipe: relative error against mergekit's per-model TIES in float64 = {worst:.2e}")
    if worst > 1e-5:
        sys.exit("the recipe's ties is not mergekit's per-model TIES")


if __name__ == "__main__":
    main()
