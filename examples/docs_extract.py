"""The commands whose output docs/extract.md shows beyond the demo's (not part of the demo): extract on a family
whose checkpoints transformers renames on load, and on a fine-tune that untied its head.

    python examples/docs_extract.py [WORKDIR]

In WORKDIR/ext (the docs ran in /tmp/ext), each part in a folder of its own with its own registry (LORAOPS_HOME set
there, so each starts at id 1):

- pythia/: `pythia-tiny`, a random GPT-NeoX (hidden 32, one layer, vocab 128), and `pythia-ft`, it with random
  rank-2 deltas on `embed_out` and the layer's `dense_4h_to_h`; extract at rank 2, then PEFT's adapted base
  against the tuned model.
- tied/: `llama-tied`, a random Llama (hidden 64, two layers) whose head is tied to its input embeddings, and
  `llama-tied-ft`, a fine-tune that stores its head apart (the embeddings plus a rank-3 delta) and moved the first
  q_proj by a rank-2 delta; extract at rank 4, merge it back, and compare logits of PEFT's adapted base and the
  merged model with the fine-tune's.

The sha256s it prints are the same on a rerun with the same loraops, torch and transformers (README, "Reproducible
outputs").
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _build import llama, loraops, workdir  # noqa: E402

TOKENS = torch.arange(3, 19).reshape(2, 8)


def low_rank(rows: int, columns: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    return 0.05 * torch.randn(rows, rank, generator=generator) @ torch.randn(rank, columns, generator=generator)


def pythia(path: Path) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           vocab_size=128, max_position_embeddings=64)
    GPTNeoXForCausalLM(config).save_pretrained(path)
    return path


def pythia_fine_tune(base: Path, out: Path) -> Path:
    from transformers import GPTNeoXForCausalLM

    model, generator = GPTNeoXForCausalLM.from_pretrained(base), torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in (model.get_output_embeddings().weight, model.gpt_neox.layers[0].mlp.dense_4h_to_h.weight):
            weight += low_rank(*weight.shape, 2, generator)
    model.save_pretrained(out)
    return out


def untied_fine_tune(base: Path, out: Path) -> Path:
    from transformers import LlamaForCausalLM

    model, generator = LlamaForCausalLM.from_pretrained(base), torch.Generator().manual_seed(2)
    model.config.tie_word_embeddings = False
    embeddings = model.model.embed_tokens.weight.detach()
    model.lm_head.weight = torch.nn.Parameter(embeddings + low_rank(*embeddings.shape, 3, generator))
    with torch.no_grad():
        q_proj = model.model.layers[0].self_attn.q_proj.weight
        q_proj += low_rank(*q_proj.shape, 2, generator)
    model.save_pretrained(out)
    return out


def logits(model: Path, adapter: Path | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model)
    if adapter is not None:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, adapter)
    with torch.no_grad():
        return loaded.eval()(input_ids=TOKENS).logits


def compare(label: str, got: torch.Tensor, want: torch.Tensor) -> None:
    off = float((got - want).abs().max())
    print(f"{label}: max |Δ logits| = {off:.2e}")
    if off > 1e-4:
        sys.exit(f"{label}: the extracted adapter does not reproduce the fine-tune")


def part(work: Path, name: str) -> None:
    """Work in WORKDIR/ext/<name>, with a registry of its own there (the docs name paths relative to it)."""
    (work / name).mkdir(parents=True)
    os.chdir(work / name)
    os.environ["LORAOPS_HOME"] = str(work / name / "home")
    print(f"\n################ {name}")


def main() -> None:
    work = workdir("ext")
    part(work, "pythia")
    base = pythia(Path("pythia-tiny"))
    tuned = pythia_fine_tune(base, Path("pythia-ft"))
    loraops("extract", "--base", base, "--tuned", tuned, "--rank", "2", "-o", "pythia-ft-r2")
    compare("PEFT on pythia-tiny with pythia-ft-r2 vs pythia-ft", logits(base, Path("pythia-ft-r2")), logits(tuned))

    part(work, "tied")
    base = llama(Path("llama-tied"), tied=True)
    tuned = untied_fine_tune(base, Path("llama-tied-ft"))
    loraops("extract", "--base", base, "--tuned", tuned, "--rank", "4", "--name", "tied-ft-r4", "-o", "tied-ft-r4")
    loraops("merge", "tied-ft-r4", "--into", base, "-o", "llama-tied-merged")
    print()
    want = logits(tuned)
    compare("PEFT on llama-tied with tied-ft-r4 vs llama-tied-ft", logits(base, Path("tied-ft-r4")), want)
    compare("loraops merge of tied-ft-r4 vs llama-tied-ft", logits(Path("llama-tied-merged")), want)


if __name__ == "__main__":
    main()
