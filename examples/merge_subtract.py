"""Merge two weighted LoRA adapters into a small Llama-style model, subtract them again, and restore the base
bit for bit — with the library API and the same steps as `loraops` commands. Builds everything it uses (no network).

    python examples/merge_subtract.py [workdir]
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def build_models(root: Path) -> tuple[Path, Path, Path]:
    """A random tiny Llama (bf16, sharded) and two PEFT LoRA adapters made by peft itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    base = root / "llama-tiny"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base, max_shard_size="60KB")
    adapters = []
    for seed, (name, r) in enumerate([("style", 8), ("topic", 4)], start=1):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        lora = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                          target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
        get_peft_model(model, lora).save_pretrained(root / name)
        adapters.append(root / name)
    return base, *adapters


def library(base: Path, style: Path, topic: Path, root: Path) -> None:
    from loraops import engine, formats

    adapters = [(formats.read_adapter(style), 0.7), (formats.read_adapter(topic), -0.3)]
    report = engine.merge(base, adapters, root / "lib-merged", force=True)
    print(f"library merge: {report.tensors_merged} tensors merged, {report.tensors_copied} copied, "
          f"{report.seconds:.2f} s, peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB")
    back = engine.subtract(root / "lib-merged", adapters, root / "lib-restored", reference=base, force=True)
    r = back.residual
    print(f"library subtract: {r.elements_differing} of {r.elements} elements differ from the base "
          f"(max |Δ| {r.max_abs_diff:.2g}) — bf16 round trips are never bit-exact")


def cli(base: Path, style: Path, topic: Path, root: Path) -> None:
    env = {**os.environ, "LORAOPS_HOME": str(root / "home")}

    def loraops(*args: object) -> None:
        print("$ loraops " + " ".join(str(a) for a in args))
        subprocess.run([sys.executable, "-m", "loraops", *map(str, args)], env=env, check=True)

    loraops("merge", f"{style}:0.7", f"{topic}:-0.3", "--into", base, "-o", root / "merged", "--force")
    loraops("base", "show", "merged")
    loraops("subtract", f"{style}:0.7", f"{topic}:-0.3", "--from", root / "merged", "-o", root / "restored", "--force")
    loraops("subtract", f"{style}:0.7", f"{topic}:-0.3", "--from", root / "merged", "-o", root / "exact", "--exact",
            "--force")
    same = all((root / "exact" / f.name).read_bytes() == f.read_bytes() for f in base.glob("*.safetensors"))
    print(f"--exact output byte-identical to the base: {same}")


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="loraops-merge-"))
    root.mkdir(parents=True, exist_ok=True)
    base, style, topic = build_models(root)
    library(base, style, topic, root)
    cli(base, style, topic, root)
    print(f"everything is under {root}")


if __name__ == "__main__":
    main()
