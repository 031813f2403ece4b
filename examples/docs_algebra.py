"""The commands whose output docs/algebra.md shows, on the inputs it describes (not part of the demo).

    python examples/docs_algebra.py [WORKDIR]

Builds the tiny Llama base and the PEFT adapters `style` (rank 8 on all seven linear types, alpha 16, seed 1) and
`subject` (rank 4 on q_proj/v_proj, alpha 8, seed 2) in WORKDIR/alg (the docs ran in /tmp/alg), then runs the
commands there. The sha256s it prints are the same on a rerun with the same loraops, torch and thread count on the
same kind of CPU (README, "Reproducible outputs"; cat, linear and resize at any thread count): the docs' come from 2
torch threads on an x86 CPU with AVX-512.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _build import llama, loraops, peft_lora, workdir  # noqa: E402

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    work = workdir("alg")
    work.mkdir(parents=True)
    os.chdir(work)  # the docs name the inputs and outputs relative to it
    base = llama(Path("base"))
    peft_lora(base, Path("style"), r=8, alpha=16, targets=LLAMA_LINEAR, seed=1)
    peft_lora(base, Path("subject"), r=4, alpha=8, targets=["q_proj", "v_proj"], seed=2)
    loraops("base", "add", "base", "--name", "tiny-llama")
    loraops("register", "style")
    loraops("register", "subject")
    loraops("combine", "style:0.7", "subject:0.5", "--method", "cat", "--name", "style-subject")
    loraops("combine", "style:1", "subject:1", "--method", "linear", "--rank", "8", "-o", "ab")
    loraops("combine", "style", "subject", "--method", "ties", "--density", "0.2", "--rank", "4", "--name", "st-ties")
    loraops("combine", "style", "subject", "--method", "dare_ties", "--density", "0.3", "--seed", "7", "--rank", "4",
            "--name", "st-dare")
    loraops("resize", "subject", "--rank", "2")
    loraops("resize", "style-subject", "--dynamic", "sv_fro", "--param", "0.9", "--max-rank", "8",
            "-o", "dyn.safetensors", "--format", "kohya")
    loraops("export", "style-subject", "--format", "kohya", "-o", "style-subject.safetensors")
    loraops("show", "style-subject-sv_fro0.9")
    loraops("list")
    loraops("resize", "subject", "--rank", "16", ok=False)
    loraops("combine", "style", "subject", "--method", "ties", "--density", "1.5", ok=False)
    loraops("combine", "style", "subject", "--method", "average", ok=False)
    loraops("combine", "style", "-o", "ab", ok=False)
    loraops("combine", "style", "nothere", ok=False)


if __name__ == "__main__":
    main()
