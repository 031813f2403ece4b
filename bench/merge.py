"""Benchmark `loraops merge` against the physical floor (cp -r + sync) and PEFT, side by side, best of N.

    python bench/merge.py                 # TinyLlama-1.1B-shaped bf16 base (3 shards) + rank-16 adapter, 7 linear types
    python bench/merge.py --size 8gb      # the same architecture, 88 layers (~8 GB); PEFT skipped unless --peft
    python bench/merge.py --quick         # a tiny model, one run each: a smoke test of every path

The base and adapter are built once (random tensors written directly as safetensors, no transformers needed) and
cached under --cache (default ./tmp/bench). Every measured run starts from the same state: `sync`, then the base
files read once, so they sit in the page cache (warm, the default), or, with --cold, dropped from it
(posix_fadvise DONTNEED on each file, no root needed; Python and torch stay cached): what a model bigger than the
memory, or one not used lately, costs. Each run writes a fresh output and ends with its data on disk (cp: `sync`;
loraops: fdatasync of every file).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab, shards)
    "1b": (2048, 5632, 22, 32, 4, 32000, 3),
    "8gb": (2048, 5632, 88, 32, 4, 32000, 4),
    "quick": (256, 688, 2, 8, 2, 1000, 2),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16


def tensor_shapes(hidden, inter, layers, heads, kv, vocab):
    kv_dim = hidden // heads * kv
    out = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    out["model.norm.weight"] = (hidden,)
    out["lm_head.weight"] = (vocab, hidden)
    return out


def build(folder: Path, size: str) -> tuple[Path, Path]:
    """The base folder (shards + index + config.json) and a PEFT adapter folder, built once."""
    import torch

    from loraops.st import header_bytes

    base, adapter = folder / "base", folder / "adapter"
    if (base / "config.json").exists() and (adapter / "adapter_config.json").exists():
        return base, adapter
    shutil.rmtree(folder, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir()
    hidden, inter, layers, heads, kv, vocab, shards = SHAPES[size]
    shapes = tensor_shapes(hidden, inter, layers, heads, kv, vocab)
    total = sum(math.prod(s) * 2 for s in shapes.values())
    per_shard = math.ceil(total / shards)
    groups, current, acc = [], [], 0
    for name, shape in shapes.items():
        current.append(name)
        acc += math.prod(shape) * 2
        if acc >= per_shard:
            groups.append(current)
            current, acc = [], 0
    if current:
        groups.append(current)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    print(f"building a {total / 2**30:.2f} GiB bf16 base in {len(groups)} shards under {folder} (once)", flush=True)
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        names = sorted(names)  # the order the safetensors library writes
        with open(base / file, "wb") as f:
            f.write(header_bytes([(n, "BF16", shapes[n]) for n in names], {"format": "pt"}))
            for n in names:
                t = (torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16)
                f.write(t.view(torch.uint8).numpy().tobytes())
                weight_map[n] = file
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=2))
    (base / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
    }, indent=2))
    from safetensors.torch import save_file

    lora = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            out_f, in_f = shape
            key = f"base_model.model.{module}"
            lora[f"{key}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g) * 0.01
            lora[f"{key}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.01
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 32, "target_modules": TARGETS, "lora_dropout": 0.0,
        "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "fan_in_fan_out": False,
    }, indent=2))
    return base, adapter


def settle(base: Path, cold: bool) -> None:
    """The same starting state for every run: dirty pages flushed, then the base read once into the page cache, or
    (cold) dropped from it."""
    subprocess.run(["sync"], check=True)
    for f in sorted(base.iterdir()):
        with open(f, "rb") as h:
            if cold:
                os.posix_fadvise(h.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                continue
            while h.read(64 << 20):
                pass


def timed(cmd: list[str], env=None) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


LIBRARY_CALL = """
import json, sys, time
import torch  # start-up, not measured
from loraops import check, engine, formats
base, adapter, out, device = sys.argv[1:5]
started = time.perf_counter()
report = engine.merge(base, [(formats.read_adapter(adapter), 1.0)], out, force=True, device=device, progress=False)
print(json.dumps({"seconds": time.perf_counter() - started, "rss": report.peak_rss_bytes}))
"""

PEFT_CALL = """
import json, resource, sys, time
started = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
import os
for f in os.listdir(out):
    fd = os.open(os.path.join(out, f), os.O_RDONLY); os.fsync(fd); os.close(fd)
print(json.dumps({"seconds": time.perf_counter() - started, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["1b", "8gb"], default="1b")
    parser.add_argument("--quick", action="store_true", help="a tiny model, one run of everything (smoke test)")
    parser.add_argument("--runs", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--peft", action=argparse.BooleanOptionalAction, default=None,
                        help="run PEFT too (default: yes, except for --size 8gb)")
    parser.add_argument("--cold", action="store_true", help="start every run with the base out of the page cache")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=ROOT / "tmp" / "bench")
    parser.add_argument("--keep", action="store_true", help="keep the built base (default: kept for 1b, removed for 8gb)")
    args = parser.parse_args()
    size = "quick" if args.quick else args.size
    runs = 1 if args.quick else args.runs
    peft = args.peft if args.peft is not None else size != "8gb"
    folder = args.cache / size
    base, adapter = build(folder, size)
    out = folder / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "LORAOPS_HOME": str(folder / "home"), "LORAOPS_QUIET": "1"}
    py = sys.executable
    size_bytes = sum(f.stat().st_size for f in base.iterdir())
    results: dict[str, list[float]] = {}
    rss: dict[str, int] = {}

    def measure(label: str, fn) -> None:
        shutil.rmtree(out, ignore_errors=True)
        settle(base, args.cold)
        seconds, peak = fn()
        results.setdefault(label, []).append(seconds)
        if peak:
            rss[label] = max(rss.get(label, 0), peak)
        shutil.rmtree(out, ignore_errors=True)

    def cp():
        seconds, _ = timed(["bash", "-c", f"cp -r --reflink=never '{base}' '{out}' && sync"])
        return seconds, 0

    def direct_copy():
        """The bytes copied by dd with O_DIRECT, as loraops writes them: the device's speed, no page-cache cost."""
        script = (f"mkdir '{out}' && for f in '{base}'/*; do dd if=\"$f\" of='{out}'/\"$(basename \"$f\")\" "
                  "bs=64M oflag=direct status=none || exit 1; done && sync")
        seconds, _ = timed(["bash", "-c", script])
        return seconds, 0

    def cli(*extra, fresh_home=False):
        def run():
            if fresh_home:  # a first-time user: base never fingerprinted, adapter not registered
                shutil.rmtree(folder / "home", ignore_errors=True)
            seconds, _ = timed([py, "-m", "loraops", "merge", str(adapter), "--into", str(base), "-o", str(out),
                                "--force", "--device", args.device, *extra], env=env)
            return seconds, 0
        return run

    def library():
        _, stdout = timed([py, "-c", LIBRARY_CALL, str(base), str(adapter), str(out), args.device], env=env)
        data = json.loads(stdout.strip().splitlines()[-1])
        return data["seconds"], data["rss"]

    def peft_run():
        _, stdout = timed([py, "-c", PEFT_CALL, str(base), str(adapter), str(out)], env=env)
        data = json.loads(stdout.strip().splitlines()[-1])
        return data["seconds"], data["rss"]

    import_s = min(float(timed([py, "-c", "import time; t = time.perf_counter(); import torch; "
                                          "print(time.perf_counter() - t)"])[1]) for _ in range(runs))
    # What torch adds to a process's life, exit included (the CLI exits the same way: os._exit, see cli.run).
    torch_s = min(timed([py, "-c", "import torch, os; os._exit(0)"])[0] - timed([py, "-c", "pass"])[0]
                  for _ in range(runs))
    plan = [("cp", cp), ("dd", direct_copy), ("cli", cli("--no-record")), ("cli+record:fresh", cli(fresh_home=True)),
            ("cli+record", cli()), ("library", library)] + ([("peft", peft_run)] if peft else [])
    # Round-robin, so on a shared machine every run type meets the same mix of other load; best of N each.
    for n in range(runs):
        for label, fn in plan:
            if label != "peft" or n == 0 or size != "8gb":
                measure(label, fn)

    best = {k: min(v) for k, v in results.items()}
    floor = best["cp"]
    print(f"\nbase: {size} shape, {size_bytes / 2**30:.2f} GiB bf16 in {len(list(base.glob('*.safetensors')))} shards; "
          f"rank-{RANK} adapter on {len(TARGETS)} linear types; device {args.device}; best of {runs}; "
          f"{os.cpu_count()} CPUs; base {'cold (out of the page cache)' if args.cold else 'warm (in the page cache)'}")
    print(f"{'run':<34}{'seconds':>9}{'× cp':>8}{'× dd':>8}{'GiB/s':>8}{'peak RSS':>11}")

    def row(label, seconds, peak=None):
        print(f"{label:<34}{seconds:>9.2f}{seconds / floor:>8.2f}{seconds / best['dd']:>8.2f}"
              f"{size_bytes / 2**30 / seconds:>8.2f}{'' if not peak else f'{peak / 2**30:.2f} GiB':>11}")

    row("cp -r --reflink=never + sync", floor)
    row("dd oflag=direct (per file) + sync", best["dd"])
    row("loraops merge (CLI, --no-record)", best["cli"])
    row("loraops merge (CLI, recorded)", best["cli+record"])
    row("  same, minus torch start-up", best["cli+record"] - torch_s)
    row("  same, first run (fresh registry)", best["cli+record:fresh"])
    row("engine.merge (library call)", best["library"], rss.get("library"))
    print(f"{'import torch':<34}{import_s:>9.2f}")
    print(f"{'torch start-up (process)':<34}{torch_s:>9.2f}")
    if peft:
        row("PEFT merge_and_unload + save", best["peft"], rss.get("peft"))
        print(f"\nPEFT / loraops CLI: {best['peft'] / best['cli+record']:.1f}× (recorded), "
              f"{best['peft'] / best['cli']:.1f}× (--no-record)")
    print("× dd: against a copy that also bypasses the page cache, as loraops writes (see docs/merge.md)")
    print("targets: whole CLI run ≤ 1.5× cp (1b; torch start-up shown apart), library ≤ 1.3× cp (8gb), "
          "≥ 4× faster than PEFT, RSS ≤ 1 GiB")
    if size == "8gb" and not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
