"""Benchmark of the adapter algebra: factored SVD vs dense SVD, a 7B-shaped resize, combine vs PEFT, ties, a
LoHa resize.

    python bench/algebra.py              # the full run (several minutes on 2 cores; the dense SVDs dominate)
    python bench/algebra.py --quick      # small shapes, seconds: a smoke run

Fast timings are the best of --repeat runs; the slow dense SVDs run once.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraops import settings  # noqa: E402
from loraops.adapter import Adapter, LoraModule  # noqa: E402
from loraops.algebra import combine, resize  # noqa: E402
from loraops.formats.lycoris import Product, product_module  # noqa: E402
from loraops.ops import svd  # noqa: E402
from loraops.ops.svd import factored_svd  # noqa: E402

# Llama-3-8B / Mistral-7B geometry (hidden 4096, MLP 14336, grouped-query k/v 1024), 32 layers
FULL = {"hidden": 4096, "mlp": 14336, "kv": 1024, "layers": 32, "rank": 64, "new_rank": 16}
QUICK = {"hidden": 256, "mlp": 896, "kv": 64, "layers": 2, "rank": 16, "new_rank": 4}
# combine vs PEFT: smaller, since PEFT's svd is a dense SVD per module
PEFT_FULL = {"hidden": 512, "mlp": 1792, "kv": 128, "layers": 4, "rank": 16}
PEFT_QUICK = {"hidden": 64, "mlp": 224, "kv": 16, "layers": 2, "rank": 4}
# ties: one TinyLlama-1.1B layer, no side above svd.RANDOMIZED_MIN_DIM (every delta factorized exactly)
TIES_FULL = {"hidden": 2048, "mlp": 5632, "kv": 256, "layers": 1, "rank": 64}
TIES_QUICK = {"hidden": 128, "mlp": 352, "kv": 32, "layers": 1, "rank": 8}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shapes(g: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear type."""
    h, m, kv = g["hidden"], g["mlp"], g["kv"]
    return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (m, h), "up_proj": (m, h), "down_proj": (h, m)}


def best(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def random_adapter(g: dict, seed: int) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    r = g["rank"]
    modules = {}
    for layer in range(g["layers"]):
        for target, (out, inp) in shapes(g).items():
            kind = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            name = f"model.layers.{layer}.{kind}.{target}"
            A = torch.randn(r, inp, generator=gen) / inp ** 0.5
            B = torch.randn(out, r, generator=gen) * 0.01
            modules[name] = LoraModule(name, A=A, B=B, alpha=2.0 * r, scale=2.0)
    return Adapter(modules=modules, format="peft", base_model="bench")


def row(label: str, ours: float, theirs: float | None, note: str = "") -> str:
    ratio = f"{theirs / ours:8.1f}×" if theirs else "         "
    other = f"{theirs:10.3f} s" if theirs is not None else " " * 12
    return f"  {label:50s} {ours:9.3f} s {other} {ratio}  {note}"


def module_bench(g: dict, repeat: int) -> float:
    out, inp = g["hidden"], g["mlp"]
    print(f"\n1. one module {out}×{inp}, rank {g['rank']} → {g['new_rank']}   (ours | dense torch.linalg.svd of B·A | ratio)")
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(out, g["rank"], generator=gen) * 0.01
    A = torch.randn(g["rank"], inp, generator=gen) / inp ** 0.5
    k = g["new_rank"]
    ours, spectrum = best(lambda: factored_svd(B, A), repeat)
    start = time.perf_counter()
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    dense_full = time.perf_counter() - start
    rel = float(((spectrum.S - S[: g["rank"]]).abs() / S[: g["rank"]]).max())
    start = time.perf_counter()
    _, low_s, _ = torch.svd_lowrank(B @ A, q=2 * k, niter=2)  # kohya's path for modules > 2048 on both sides
    kohya = time.perf_counter() - start
    low_rel = float(((low_s[:k] - S[:k]).abs() / S[:k]).max())
    print(row("factored SVD vs dense svd(B·A)", ours, dense_full, f"singular values max rel diff {rel:.1e}"))
    print(row("factored SVD vs kohya svd_lowrank(q=2k, niter=2)", ours, kohya, f"its top-{k} S max rel err {low_rel:.1e}"))
    return dense_full


def resize_bench(g: dict, repeat: int, dense_big: float) -> None:
    adapter = random_adapter(g, seed=1)
    n = len(adapter.modules)
    print(f"\n2. resize {n} modules ({g['layers']} layers × 7 types, {g['hidden']}/{g['mlp']}/{g['kv']}), rank "
          f"{g['rank']} → {g['new_rank']}   (ours | dense-SVD estimate | ratio)")
    ours, (_, report) = best(lambda: resize(adapter, rank=g["new_rank"], device="cpu"), repeat)
    # dense estimate: one dense SVD per distinct shape, times the number of such modules
    estimate, counts = 0.0, {}
    for shape in shapes(g).values():
        counts[shape] = counts.get(shape, 0) + g["layers"]
    for (out, inp), count in counts.items():
        if {out, inp} == {g["hidden"], g["mlp"]} and dense_big:
            each = dense_big
        else:
            gen = torch.Generator().manual_seed(2)
            D = torch.randn(out, g["rank"], generator=gen) @ torch.randn(g["rank"], inp, generator=gen)
            start = time.perf_counter()
            torch.linalg.svd(D, full_matrices=False)
            each = time.perf_counter() - start
        estimate += each * count
    print(row(f"resize, {torch.get_num_threads()} threads", ours, estimate,
              f"mean fro kept {report.fro_retained_mean:.3f}"))


def peft_pair(g: dict):
    """A PEFT model of ``g``'s layers with two random LoRAs "a" and "b", and the same two as loraops inputs (weights
    0.7 and 0.5)."""
    from peft import LoraConfig, get_peft_model

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for target, (out, inp) in shapes(g).items():
                setattr(self, target, torch.nn.Linear(inp, out, bias=False))

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(Block() for _ in range(g["layers"]))
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=g["rank"], lora_alpha=2 * g["rank"], target_modules=list(TARGETS),
                                                  init_lora_weights=False), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(r=g["rank"], lora_alpha=g["rank"], target_modules=list(TARGETS),
                                           init_lora_weights=False))
    adapters = {"a": {}, "b": {}}
    for name, layer in peft_model.named_modules():
        if hasattr(layer, "lora_A") and "a" in layer.lora_A:
            for key in adapters:
                path = name.removeprefix("base_model.model.")
                adapters[key][path] = LoraModule(path, A=layer.lora_A[key].weight.detach(), B=layer.lora_B[key].weight.detach(),
                                                 alpha=0.0, scale=layer.scaling[key])
    return peft_model, [(Adapter(modules=adapters[k], format="peft"), w) for k, w in (("a", 0.7), ("b", 0.5))]


def peft_combination(peft_model):
    """PEFT's add_weighted_adapter of "a" and "b" (weights 0.7 and 0.5) by a combination type, then deleted."""
    counter = iter(range(10 ** 6))

    def peft(kind: str, **kwargs) -> None:
        name = f"{kind}{next(counter)}"
        peft_model.add_weighted_adapter(["a", "b"], [0.7, 0.5], name, combination_type=kind, **kwargs)
        peft_model.delete_adapter(name)

    return peft


def peft_bench(g: dict, repeat: int) -> None:
    peft_model, inputs = peft_pair(g)
    total = 2 * g["rank"]
    print(f"\n3. combine 2 adapters of {len(inputs[0][0].modules)} modules ({g['hidden']}/{g['mlp']}, rank {g['rank']})"
          "   (ours | PEFT add_weighted_adapter | ratio)")

    peft = peft_combination(peft_model)

    def truth_error(adapter: Adapter) -> float:
        worst = 0.0
        for name, module in adapter.modules.items():
            exact = sum(w * a.modules[name].delta(dtype=torch.float64) for a, w in inputs)
            worst = max(worst, float((module.delta(dtype=torch.float64) - exact).norm() / exact.norm()))
        return worst

    with torch.no_grad():
        ours_cat, (cat_adapter, _) = best(lambda: combine(inputs, "cat", device="cpu"), repeat)
        peft_cat, _ = best(lambda: peft("cat"), repeat)
        ours_lin, (lin_adapter, _) = best(lambda: combine(inputs, "linear", rank=total, device="cpu"), repeat)
        peft_svd, _ = best(lambda: peft("svd", svd_rank=total), 1)
        ours_k, _ = best(lambda: combine(inputs, "linear", rank=g["rank"], device="cpu"), repeat)
        peft_k, _ = best(lambda: peft("svd", svd_rank=g["rank"]), 1)
    print(row("cat vs PEFT cat", ours_cat, peft_cat, f"ours vs float64 Σwτ: max rel err {truth_error(cat_adapter):.1e}"))
    print(row(f"linear rank {total} (lossless) vs PEFT svd", ours_lin, peft_svd,
              f"ours vs float64 Σwτ: max rel err {truth_error(lin_adapter):.1e}"))
    print(row(f"linear rank {g['rank']} vs PEFT svd rank {g['rank']}", ours_k, peft_k))


def ties_bench(g: dict, skip_peft: bool) -> None:
    """TIES at its default rank (the largest input's) on whole modules of ``g``: each module's dense delta is
    re-factorized exactly (no side above svd.RANDOMIZED_MIN_DIM), which was nearly all of the time."""
    peft_model, inputs = peft_pair(g)
    print(f"\n4. ties (density 0.5) of 2 adapters of {len(inputs[0][0].modules)} modules ({g['hidden']}/{g['mlp']}/"
          f"{g['kv']}, rank {g['rank']} → {g['rank']}), once each   (ours | other | other ÷ ours)")

    def ties():
        return combine(inputs, "ties", {"density": 0.5}, device="cpu")[0]

    def lapack(D: torch.Tensor, k: int) -> svd.Spectrum:  # the former dense_svd: of D as it is (wide or tall)
        with svd.single_threaded(D.device):
            return svd.Spectrum(*(t.to(D.dtype) for t in torch.linalg.svd(D.double(), full_matrices=False)))

    def before():  # the code before: modules one after another, each delta's top-k from LAPACK's whole SVD
        saved = settings.in_order, svd.leading_svd
        settings.in_order = lambda items, run, elements, device: map(run, items)
        svd.leading_svd = lapack
        try:
            return ties()
        finally:
            settings.in_order, svd.leading_svd = saved

    def worst_difference(ours: Adapter, other: Adapter) -> float:
        return max(float((m.delta(dtype=torch.float64) - theirs).norm() / theirs.norm())
                   for n, m in ours.modules.items() for theirs in [other.modules[n].delta(dtype=torch.float64)])

    with torch.no_grad():
        ours, made = best(ties, 1)
        old, old_made = best(before, 1)
        print(row("ties vs modules in turn, LAPACK SVD (before)", ours, old,
                  f"max rel diff of the deltas {worst_difference(made, old_made):.1e}"))
        if not skip_peft:
            # (PEFT's "ties" trims A and B apart; "ties_svd" trims the delta, as loraops and mergekit do)
            peft, _ = best(lambda: peft_combination(peft_model)("ties_svd", density=0.5), 1)
            print(row("ties vs PEFT ties_svd (float32 SVD, all threads)", ours, peft))


def loha_adapter(g: dict, seed: int) -> Adapter:
    """A LoHa adapter of ``g``'s shapes (rank g["rank"] // 4 per Hadamard factor), its layout known (as if bound)."""
    gen = torch.Generator().manual_seed(seed)
    r, modules = g["rank"] // 4, {}
    for name, lora in random_adapter(g, seed).modules.items():
        out, inp = lora.weight_shape
        factors = {"w1a": torch.randn(out, r, generator=gen) * 0.1, "w1b": torch.randn(r, inp, generator=gen) * 0.1,
                   "w2a": torch.randn(out, r, generator=gen) * 0.1, "w2b": torch.randn(r, inp, generator=gen) * 0.1}
        modules[name] = product_module(Path("bench"), name, Product("loha", factors, r), alpha=float(r), scale=1.0,
                                       keys=(), kernel=())
        modules[name].product = replace(modules[name].product, kernel_known=True)
    return Adapter(modules=modules, format="peft", base_model="bench")


def loha_resize_bench(g: dict) -> None:
    """resize of a LoHa adapter: each module's dense ΔW is factorized on one thread, so its modules now run side by
    side on torch's threads (settings.in_order); before, one after another."""
    adapter = loha_adapter(g, 5)
    print(f"\n5. resize of a LoHa adapter of {len(adapter.modules)} modules ({g['hidden']}/{g['mlp']}/{g['kv']}, "
          f"Hadamard rank {g['rank'] // 4}), once each   (ours | before | before ÷ ours)")

    def in_turn(**rule):  # the code before: modules one after another
        saved = settings.in_order
        settings.in_order = lambda items, run, elements, device: map(run, items)
        try:
            return resize(adapter, **rule, device="cpu")[0]
        finally:
            settings.in_order = saved

    for label, rule in ((f"--rank {g['rank'] // 2}", {"rank": g["rank"] // 2}),
                        ("--dynamic sv_fro --param 0.9", {"dynamic": "sv_fro", "param": 0.9})):
        ours, made = best(lambda: resize(adapter, **rule, device="cpu")[0], 1)
        old, old_made = best(lambda: in_turn(**rule), 1)
        same = all(torch.equal(m.A, old_made.modules[n].A) and torch.equal(m.B, old_made.modules[n].B)
                   for n, m in made.modules.items())
        print(row(f"resize {label} vs modules in turn", ours, old, "same bytes" if same else "BYTES DIFFER"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run in seconds")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per fast timing (best is shown)")
    parser.add_argument("--skip-peft", action="store_true", help="leave out the PEFT comparison")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # PEFT's and transformers' deprecation chatter
    torch.set_num_threads(args.threads)
    g, pg = (QUICK, PEFT_QUICK) if args.quick else (FULL, PEFT_FULL)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    dense_big = module_bench(g, args.repeat)
    resize_bench(g, args.repeat, dense_big)
    if not args.skip_peft:
        peft_bench(pg, args.repeat)
    ties_bench(TIES_QUICK if args.quick else TIES_FULL, args.skip_peft)
    loha_resize_bench(TIES_QUICK if args.quick else TIES_FULL)


if __name__ == "__main__":
    main()
