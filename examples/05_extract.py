"""Extract a LoRA adapter from a fine-tuned model and its base, then check it against PEFT and by merging it back.

    python examples/05_extract.py [WORKDIR]

Builds a tiny Llama-style base and a "fine-tune" of it in WORKDIR (default: a temp dir): a rank-8 PEFT LoRA merged
by PEFT's own merge_and_unload, plus a nudged final norm (what a full fine-tune also changes). Then runs `loraops
extract` through the real CLI and checks that PEFT, loading the extracted adapter on the base, gives the tuned
model's logits, and that `loraops merge` of it gives back the tuned weights.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _build import llama, loraops, peft_lora, workdir  # noqa: E402


def fine_tune(base: Path, lora: Path, out: Path) -> Path:
    """base + the LoRA (merged by PEFT) with model.norm.weight nudged: a stand-in for a full fine-tune."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora).merge_and_unload()
    with torch.no_grad():
        model.model.norm.weight.add_(0.01)
    model.save_pretrained(out)
    return out


def max_difference(adapter: Path, base: Path, tuned: Path) -> tuple[float, float]:
    """(max |logits difference| of PEFT's base + adapter against the tuned model, max |weight difference| after
    `loraops merge`)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = torch.arange(32).reshape(2, 16)
    with torch.no_grad():
        got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)(input_ids=ids).logits
        want = AutoModelForCausalLM.from_pretrained(tuned)(input_ids=ids).logits
    merged, expected = load_file(adapter.parent / "merged" / "model.safetensors"), load_file(tuned / "model.safetensors")
    weights = max(float((merged[name] - tensor).abs().max()) for name, tensor in expected.items())
    return float((got - want).abs().max()), weights


def main() -> None:
    work = workdir("05_extract")
    print(f"building a base and a fine-tune of it in {work} ...")
    base = llama(work / "llama-tiny")
    lora = peft_lora(base, work / "trained-lora", r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"], seed=3)
    tuned = fine_tune(base, lora, work / "llama-ft")

    loraops("base", "add", base)
    loraops("extract", "--base", "llama-tiny", "--tuned", tuned, "--rank", "8", "--save-module", "norm",
            "--name", "ft-r8", "-o", work / "ft-r8")
    loraops("show", "ft-r8")
    loraops("extract", "--base", "llama-tiny", "--tuned", tuned, "--dynamic", "sv_fro", "--param", "0.9",
            "--max-rank", "16", "--modules", "q_proj,v_proj")
    loraops("extract", "--base", "llama-tiny", "--tuned", tuned, "--rank", "4", "--format", "kohya",
            "-o", work / "ft-r4.safetensors")
    loraops("merge", "ft-r8", "--into", "llama-tiny", "-o", work / "merged")
    loraops("extract", "--base", "llama-tiny", "--tuned", base, "--rank", "8", ok=False)  # nothing differs
    loraops("extract", "--base", "llama-tiny", "--tuned", tuned, "--rank", "8", "--modules", "k_proj", ok=False)

    logits, weights = max_difference(work / "ft-r8", base, tuned)
    print(f"\nPEFT on the base with ft-r8 against the tuned model: max |Δ logits| = {logits:.2e}")
    print(f"loraops merge of ft-r8 against the tuned weights: max |Δ| = {weights:.2e}")
    if logits > 1e-4 or weights > 1e-5:
        sys.exit("the extracted adapter does not reproduce the fine-tune")


if __name__ == "__main__":
    main()
