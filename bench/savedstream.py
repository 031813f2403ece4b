"""Benchmark what merging an adapter given by path with a large saved whole tensor (a PEFT modules_to_save lm_head)
costs in anonymous memory (what the kernel cannot drop under pressure): before (another loraops checkout, --before)
and after (this one), and whether the output bytes are the same.

    python bench/savedstream.py --before /work/main     # before/after, in one run
    python bench/savedstream.py --quick                 # small shapes: a smoke test

The base: a one-layer Llama of --hidden width with a --vocab × --hidden bf16 lm_head and embeddings (16384 × 8192:
256 MiB each); the adapter: a rank-16 bf16 LoRA on q_proj and v_proj and the lm_head saved whole (modules_to_save).
Each run is `merge ADAPTER-DIR --into base --no-record` as a library call in a fresh process (LORAOPS_HOME under
--cache, empty: the path is not registered); it reports RssAnon (/proc/self/status) before the merge, its peak while
it runs (sampled every 1 ms) and VmHWM (all resident memory, mapped page-cache pages too), and the sha256 of every
output file. Files are warm in the page cache; torch's import is not measured.
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
import merge as merge_bench  # noqa: E402
from merge import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT))

RUN = """
import hashlib, json, pathlib, sys, threading, time
import torch  # start-up, not measured
from loraops import merging

def status(key="RssAnon:"):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

adapter, base, out = sys.argv[1:4]
before, stop = status(), threading.Event()
peak = [before]
def sample():
    while not stop.wait(0.001):
        peak[0] = max(peak[0], status())
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
started = time.perf_counter()
merging.merge(base, [adapter], out, record=False, force=True, device="cpu", progress=False)
seconds = time.perf_counter() - started
stop.set()
sampler.join()
digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(pathlib.Path(out).iterdir())}
print(json.dumps({"seconds": seconds, "before": before, "peak": max(peak[0], status()), "hwm": status("VmHWM:"),
                  "sha256": hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()}))
"""


def build(cache: Path, hidden: int, vocab: int) -> tuple[Path, Path]:
    """(base folder, adapter folder), built once."""
    import torch

    from loraops.st import write_safetensors

    base, adapter = cache / "base", cache / "adapter"
    if (adapter / "adapter_config.json").exists():
        return base, adapter
    shutil.rmtree(cache, ignore_errors=True)
    base.mkdir(parents=True)
    heads = hidden // 128
    shapes = merge_bench.tensor_shapes(hidden, 1024, 1, heads, heads // 8, vocab)
    generator = torch.Generator().manual_seed(0)
    write_safetensors(base / "model.safetensors", {
        name: (torch.randn(shape, generator=generator) * 0.02).bfloat16() for name, shape in shapes.items()},
        {"format": "pt"})
    (base / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": 1024,
        "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": heads // 8, "vocab_size": vocab,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    prefix, rank, tensors = "base_model.model.", 16, {}
    for module in ("q_proj", "v_proj"):
        out_f, in_f = shapes[f"model.layers.0.self_attn.{module}.weight"]
        key = f"{prefix}model.layers.0.self_attn.{module}"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, in_f, generator=generator) * 0.01).bfloat16()
        tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, rank, generator=generator) * 0.01).bfloat16()
    tensors[f"{prefix}lm_head.weight"] = (torch.randn(vocab, hidden, generator=generator) * 0.02).bfloat16()
    adapter.mkdir()
    write_safetensors(adapter / "adapter_model.safetensors", tensors, {"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["lm_head"], "task_type": "CAUSAL_LM"}))
    return base, adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="another loraops checkout to compare with (e.g. /work/main)")
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--runs", type=int, default=3, help="runs of each (memory: the largest growth)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/loraops-bench-savedstream"))
    args = parser.parse_args()
    hidden, vocab, runs = (1024, 2048, 1) if args.quick else (args.hidden, args.vocab, args.runs)
    cache = args.cache / f"{hidden}x{vocab}"
    base, adapter = build(cache, hidden, vocab)
    codes = {"before": args.before, "after": ROOT} if args.before else {"after": ROOT}
    results: dict[str, list[dict]] = {}
    for _ in range(runs):
        for label, code in codes.items():
            home, out = cache / f"home-{label}", cache / "out"
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            env = {**os.environ, "PYTHONPATH": str(code), "LORAOPS_HOME": str(home), "HF_HOME": str(home / "hf"),
                   "LORAOPS_QUIET": "1"}
            done = subprocess.run([sys.executable, "-P", "-c", RUN, str(adapter), str(base), str(out)], env=env,
                                  capture_output=True, text=True, check=True)
            results.setdefault(label, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    shutil.rmtree(cache / "out", ignore_errors=True)
    mib = 2 ** 20
    head = vocab * hidden * 2
    print(f"merge by path, --no-record: saved lm_head {vocab}×{hidden} bf16 ({head / mib:.0f} MiB), "
          f"{os.cpu_count()} CPUs, {runs} run(s) each, files warm")
    print(f"{'code':<8}{'seconds':>9}{'anon growth':>13}{'VmHWM':>10}  output sha256")
    for label, measured in results.items():
        growth = max(m["peak"] - m["before"] for m in measured)
        print(f"{label:<8}{min(m['seconds'] for m in measured):>9.2f}{growth / mib:>9.0f} MiB"
              f"{max(m['hwm'] for m in measured) / mib:>6.0f} MiB  {measured[0]['sha256'][:16]}")
    digests = {m["sha256"] for measured in results.values() for m in measured}
    print("outputs: byte-identical" if len(digests) == 1 else f"outputs DIFFER: {sorted(digests)}")


if __name__ == "__main__":
    main()
