"""Benchmark the peak RSS and wall time of every command that reads a base or a big adapter (merge and subtract
have bench/merge.py), each a whole CLI process, best of N, beside the size of what it reads.

    python bench/commands.py                  # Llama-7B-shaped base of 8 layers (3.3 GiB), rank-256 fp32 adapters
    python bench/commands.py --only header    # only the 70B-shaped header-only case
    python bench/commands.py --quick          # small shapes, one run each: a smoke test

Inputs, built once under --cache (default /tmp/loraops-bench-commands; the 8-layer set takes ~10 GB of disk):
  base     bf16, hidden 4096, intermediate 11008, 32 heads / 8 KV heads, vocab 32000, --layers layers, in --shards
           shards with an index (written directly as safetensors, as bench/merge.py does)
  tuned    base + a rank-16 adapter merged in (`loraops merge --no-record`): what extract reads beside the base
  big1/2   rank-256 float32 PEFT adapters on the 7 linear types of every layer (and the same on layer 0 alone, for
           the element-wise combines: ~2 minutes a layer on 2 shared cores, their memory per module)
  70b      (header-only) a Llama-70B-shaped base, 80 layers in 30 shards, as sparse files (the headers are real, the
           data holes: 0 bytes of disk), and a rank-2 adapter on its 560 linear modules: `check` against it
Every command runs as `/usr/bin/time -f '%e %M' python -m loraops ...` in a fresh process (the peak RSS is the
child's VmHWM: mapped file pages it touched count too; anon: its RssAnon sampled every 5 ms), against one registry
(LORAOPS_HOME under --cache) holding the base and adapters; `base add` starts from a fresh registry each run (so it
hashes every tensor). Files are warm in the page cache. Seconds: the fastest of --runs; RSS: the largest. push goes
to tests/hubserver.py's Hub on 127.0.0.1 (one run: a second finds its files there). Other sessions share the
machine, so the seconds are noisy; the RSS much less so.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge as merge_bench  # noqa: E402
from merge import ROOT, TARGETS, tensor_shapes  # noqa: E402

sys.path.insert(0, str(ROOT))

SHAPE = {"full": (4096, 11008, 32, 8, 32000), "quick": (256, 688, 8, 2, 1000)}  # hidden, inter, heads, kv, vocab


def anon_peak(timer: subprocess.Popen) -> int:
    """The largest RssAnon of /usr/bin/time's child (the loraops process) seen while it runs, sampled every 5 ms:
    the memory the kernel cannot drop (VmHWM also counts the pages of the mapped files it read: page cache)."""
    peak = 0
    while timer.poll() is None:
        with contextlib.suppress(OSError, StopIteration, ValueError, IndexError):
            child = open(f"/proc/{timer.pid}/task/{timer.pid}/children").read().split()[0]
            with open(f"/proc/{child}/status") as f:
                peak = max(peak, next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:")))
        time.sleep(0.005)
    return peak


def size(path: Path) -> int:
    """Bytes of a file or folder (allocated, so sparse files count what they hold)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(f.stat().st_blocks * 512 for f in files)


def adapter(folder: Path, shapes: dict[str, tuple[int, int]], rank: int, seed: int, dtype: str = "float32") -> Path:
    """A PEFT folder of random factors on ``shapes`` ({module: (out, in)}), written once, tensor by tensor."""
    import torch

    from loraops.st import TensorWriter

    if (folder / "adapter_config.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    g, dtype = torch.Generator().manual_seed(seed), getattr(torch, dtype)
    with TensorWriter(folder / "adapter_model.safetensors") as writer:
        for module, (out, inp) in shapes.items():
            key = f"base_model.model.{module}"
            writer.add(f"{key}.lora_A.weight", (torch.randn(rank, inp, generator=g) / inp ** 0.5).to(dtype))
            writer.add(f"{key}.lora_B.weight", (torch.randn(out, rank, generator=g) * 0.01).to(dtype))
        writer.close({"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted({m.rpartition(".")[2]
                                                                                       for m in shapes})}))
    return folder


def linear(shapes: dict[str, tuple]) -> dict[str, tuple[int, int]]:
    return {name.removesuffix(".weight"): shape for name, shape in shapes.items()
            if name.removesuffix(".weight").rpartition(".")[2] in TARGETS}


def sparse_base(folder: Path, layers: int, shards: int) -> Path:
    """A Llama-70B-shaped bf16 base whose shards are real headers over holes: what header-only commands read."""
    from loraops.st import header_bytes

    if (folder / "config.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shapes = tensor_shapes(8192, 28672, layers, 64, 8, 128256)
    names = list(shapes)
    per = math.ceil(len(names) / shards)
    groups = [sorted(names[i:i + per]) for i in range(0, len(names), per)]
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header = header_bytes([(n, "BF16", shapes[n]) for n in group], {"format": "pt"})
        data = sum(math.prod(shapes[n]) * 2 for n in group)
        with open(folder / file, "wb") as f:
            f.write(header)
            f.truncate(len(header) + data)
        weight_map.update(dict.fromkeys(group, file))
        total += data
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": layers, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["commands", "header"])
    parser.add_argument("--runs", type=int, default=2, help="best of N (default 2)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--rank", type=int, default=256, help="rank of the big adapters (default 256)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/loraops-bench-commands"))
    parser.add_argument("--keep", action="store_true", help="keep the built inputs (default: removed at the end)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    shape = "quick" if args.quick else "full"
    runs, layers, rank = (1, 2, 16) if args.quick else (args.runs, args.layers, args.rank)
    hidden, inter, heads, kv, vocab = SHAPE[shape]
    cache = args.cache / shape
    home = cache / "home"
    py = [sys.executable, "-P", "-m", "loraops"]

    def timed_python(code: str) -> tuple[float, int, int]:
        done = subprocess.run(["/usr/bin/time", "-f", "@@ %e %M", sys.executable, "-c", code], capture_output=True,
                              text=True)
        seconds, kib = done.stderr.rstrip().rpartition("@@ ")[2].split()
        return float(seconds), int(kib) * 1024, 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAOPS_HOME": str(home), "HF_HOME": str(cache / "hf"),
           "HF_HUB_OFFLINE": "1", "LORAOPS_QUIET": "1"}

    def run(*cmd: str, home_dir: Path = home) -> tuple[float, int, int, str]:
        """(seconds, peak RSS, peak anonymous RSS, stdout) of one CLI process."""
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            child = subprocess.Popen(["/usr/bin/time", "-f", "@@ %e %M", *py, *cmd], stdout=out, stderr=err,
                                     env={**env, "LORAOPS_HOME": str(home_dir)})
            anon = anon_peak(child)
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
        if child.returncode != 0:
            raise SystemExit(f"loraops {' '.join(cmd)} failed:\n{stderr[-2000:]}")
        seconds, kib = stderr.rstrip().rpartition("@@ ")[2].split()
        return float(seconds), int(kib) * 1024, anon, stdout

    def row(label: str, reads: str, seconds: float, rss: int, anon: int) -> None:
        print(f"  {label:<56}{reads:<30}{seconds:>8.2f}s{rss / 2**30:>9.2f} GiB{anon / 2**30:>9.2f} GiB", flush=True)

    def measure(label: str, reads: str, *cmd: str, before=None, home_dir: Path = home, times: int = 0) -> None:
        best_s, best_rss, best_anon = math.inf, 0, 0
        for _ in range(times or runs):
            if before:
                before()
            seconds, rss, anon, _ = run(*cmd, home_dir=home_dir)
            best_s, best_rss, best_anon = min(best_s, seconds), max(best_rss, rss), max(best_anon, anon)
        row(label, reads, best_s, best_rss, best_anon)

    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    print(f"{os.cpu_count()} CPUs, best of {runs} (seconds: the fastest run; RSS: the largest; peak RSS: VmHWM, "
          "mapped file pages included; anon: RssAnon sampled every 5 ms)")
    print(f"  {'command':<56}{'reads':<30}{'seconds':>9}{'peak RSS':>13}{'anon':>13}")
    row("python -m loraops --version (start-up)", "", *run("--version")[:3])
    row("python -c 'import torch'", "", *timed_python("import torch"))

    if args.only in (None, "commands"):
        merge_bench.SHAPES[f"commands-{shape}"] = (hidden, inter, layers, heads, kv, vocab, args.shards)
        base, small = merge_bench.build(cache / "model", f"commands-{shape}")  # small: a rank-16 fp32 adapter
        modules = linear(tensor_shapes(hidden, inter, layers, heads, kv, vocab))
        big1 = adapter(cache / "big1", modules, rank, seed=1)
        big2 = adapter(cache / "big2", modules, rank, seed=2)
        tuned = cache / "tuned"
        if not (tuned / "config.json").exists():
            run("merge", str(small), "--into", str(base), "-o", str(tuned), "--no-record", "--force", "--device", "cpu")
        shards = len(list(base.glob("*.safetensors")))
        b, a = f"base {gib(size(base))}", f"adapter {gib(size(big1))}"
        print(f"  (base: {shards} shards, {layers * 9 + 3} tensors; adapters: rank {rank} fp32 on "
              f"{len(modules)} modules)", flush=True)
        fresh = cache / "home-fresh"
        measure("base add (fresh registry: hashes)", b, "base", "add", str(base), "--name", "base",
                before=lambda: shutil.rmtree(fresh, ignore_errors=True), home_dir=fresh)
        shutil.rmtree(home, ignore_errors=True)
        run("base", "add", str(base), "--name", "base")
        measure("register --base", a, "register", str(big1), "--name", "big1", "--base", "base",
                before=lambda: subprocess.run([*py, "rm", "big1", "--all"], env=env, capture_output=True))
        run("register", str(big2), "--name", "big2", "--base", "base")
        measure("check --base (path)", f"{a} + headers", "check", str(big1), "--base", str(base))
        measure("inspect (path)", a, "inspect", str(big1))
        measure("show", "registry", "show", "big1")
        measure("list", "registry", "list")
        measure("verify", "2 adapters (hash)", "verify")
        out = cache / "out"
        for method, extra in [("cat", []), ("linear", ["--rank", str(rank)])]:
            measure(f"combine -m {method} {' '.join(extra)}".rstrip(), f"2 adapters {gib(2 * size(big1))}",
                    "combine", "big1", "big2", "-m", method, *extra, "--name", f"c-{method}", "--device", "cpu")
        # element-wise methods form each module's dense delta: ~2 minutes per layer on 2 shared cores, so one layer of
        # the same widths and rank, one run (their memory is per module: it does not grow with the layers)
        few = {name: shape for name, shape in modules.items() if name.startswith("model.layers.0.")}
        for i in (1, 2):
            layer = adapter(cache / f"layer0-{i}", few, rank, seed=i)
            run("register", str(layer), "--name", f"few{i}", "--base", "base")
        for method in ("ties", "dare_ties"):
            measure(f"combine -m {method} --density 0.5 --rank 16 (one run)", f"2 × {len(few)} modules, "
                    f"{gib(2 * size(cache / 'layer0-1'))}", "combine", "few1", "few2", "-m", method, "--density", "0.5",
                    "--rank", "16", "--name", f"c-{method}", "--device", "cpu", times=1)
        measure(f"resize --rank {rank // 4}", a, "resize", "big1", "--rank", str(rank // 4), "--name", "r-fixed",
                "--device", "cpu")
        measure("resize --dynamic sv_ratio", a, "resize", "big1", "--dynamic", "sv_ratio", "--param", "4",
                "--name", "r-dynamic", "--device", "cpu")
        measure("extract --rank 16 (one run)", f"2 × base {gib(size(base))}", "extract", "--base", str(base),
                "--tuned", str(tuned), "--rank", "16", "--name", "extracted", "--device", "cpu", times=1)
        measure("export --format kohya", a, "export", "big1", "--format", "kohya", "-o", str(out / "big1.safetensors"),
                "--force")
        sys.path.insert(0, str(ROOT / "tests"))
        from hubserver import FakeHub  # the tests' Hub over HTTP on 127.0.0.1: the target of push

        with FakeHub(cache / "hub") as hub:  # one run: a second would find the files on the Hub already
            env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
            measure("push (to a local fake Hub; one run)", a, "push", "big1", "me/big1", "--token", "hf_owner",
                    times=1)
            env.update(HF_HUB_OFFLINE="1")
        shutil.rmtree(cache / "hub", ignore_errors=True)
        run("rm", "c-cat")
        measure("gc", "registry", "gc", "--grace", "0")
        shutil.rmtree(out, ignore_errors=True)

    if args.only in (None, "header"):
        n70 = 2 if args.quick else 80
        big = sparse_base(cache / "70b", n70, 30)
        lora = adapter(cache / "70b-adapter", linear(tensor_shapes(8192, 28672, n70, 64, 8, 128256)), 2, seed=3,
                       dtype="bfloat16")
        tensors = n70 * 9 + 3
        measure("check --base (70B, sparse)", f"{tensors} tensors, 30 shards", "check", str(lora), "--base", str(big))

    if not args.keep:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
