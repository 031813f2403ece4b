"""Benchmark the start-up of the CLI's quick commands (those that read headers, configs or the registry, no tensor
math): each a whole `python -m loraops ...` process, best of N, beside `python -c pass` and `python -c "import
torch"`, with the heavy modules each one imports.

    python bench/startup.py                # best of 5
    python bench/startup.py --runs 10
    python bench/startup.py --code /path/to/main   # another checkout's code (a before), same inputs

Inputs, built once under --cache (default /tmp/loraops-bench-startup) as the tests build them (tests/factories.py):
a tiny Llama folder, a PEFT adapter on its 7 linear types and a kohya file; a registry holding the base and the
adapter (`list`, `show`, `base …`, `db current`), and an empty one (`list (empty registry)`). Files are warm in the
page cache. Other sessions share the machine, so the seconds are noisy: the ratios to `python -c pass` and to
`import torch`, measured in the same run, are what compares across runs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "sqlalchemy", "alembic", "pydantic", "transformers", "huggingface_hub", "safetensors")
SAID = ("import sys; from loraops.cli import exit_status\n"
        "code = exit_status(sys.argv[1:])\n"
        f"print('\\nimported:', ' '.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
        "sys.exit(code)\n")
TORCH_LABEL = 'python -c "import torch"'


def build(cache: Path) -> dict[str, Path]:
    """The inputs (made once): base folder, PEFT folder, kohya file, and the two homes."""
    inputs = {"base": cache / "base", "peft": cache / "peft", "kohya": cache / "kohya.safetensors",
              "home": cache / "home", "empty": cache / "empty"}
    if (cache / "done").exists():
        return inputs
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    sys.path.insert(0, str(ROOT / "tests"))
    import factories

    factories.tiny_llama(inputs["base"])
    factories.peft_adapter(inputs["base"], inputs["peft"], r=8, alpha=16)
    factories.kohya_file(inputs["kohya"], {"lora_unet_down_blocks_0_attentions_0_proj_in": ((64,), (64,)),
                                           "lora_te_text_model_encoder_layers_0_mlp_fc1": ((32,), (128,))})
    inputs["empty"].mkdir()
    for args in (["base", "add", str(inputs["base"]), "--name", "tiny"],
                 ["register", str(inputs["peft"]), "--name", "style", "--base", "tiny"]):
        subprocess.run([sys.executable, "-m", "loraops", *args], check=True, env=env(inputs["home"]),
                       stdout=subprocess.DEVNULL)
    (cache / "done").touch()
    return inputs


CODE = [ROOT]  # the checkout whose loraops is timed (--code); the processes run in it (sys.path[0] is their folder)


def env(home: Path) -> dict[str, str]:
    return {**os.environ, "LORAOPS_HOME": str(home), "HF_HOME": str(home / "hf"), "PYTHONPATH": str(CODE[0])}


def best(argv: list[str], environ: dict[str, str], runs: int) -> float:
    """The fastest of ``runs`` runs of ``argv`` (each a fresh process), in seconds; a failing run stops the bench."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=environ, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=CODE[0])
        times.append(time.perf_counter() - start)
    return min(times)


def imported(args: list[str], environ: dict[str, str]) -> str:
    """The heavy modules the command imports (the CLI's own code path, in a fresh interpreter)."""
    done = subprocess.run([sys.executable, "-c", SAID, *args], env=environ, capture_output=True, text=True,
                          cwd=CODE[0])
    return done.stderr.rpartition("imported:")[2].strip() or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs of each command; the fastest counts (default 5)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/loraops-bench-startup"))
    parser.add_argument("--code", type=Path, default=ROOT, help="the loraops checkout to time (default: this one)")
    options = parser.parse_args()
    CODE[0] = options.code.resolve()
    inputs = build(options.cache)
    home, empty = env(inputs["home"]), env(inputs["empty"])
    commands = [
        ("--version", ["--version"], empty),
        ("inspect PEFT folder", ["inspect", str(inputs["peft"])], empty),
        ("inspect kohya file", ["inspect", str(inputs["kohya"])], empty),
        ("check PEFT folder --base folder", ["check", str(inputs["peft"]), "--base", str(inputs["base"])], empty),
        ("list (empty registry)", ["list"], empty),
        ("list", ["list"], home),
        ("show", ["show", "style"], home),
        ("base list", ["base", "list"], home),
        ("base show", ["base", "show", "tiny"], home),
        ("db current", ["db", "current"], home),
    ]
    floor = best([sys.executable, "-c", "pass"], empty, options.runs)
    torch = best([sys.executable, "-c", "import torch"], empty, options.runs)
    print(f"loraops from {CODE[0]}")
    print(f"{os.cpu_count()} CPUs, best of {options.runs}, each a fresh process; ×pass and ×torch: its time over "
          "`python -c pass`'s and `python -c 'import torch'`'s in this run")
    print(f"  {'command':34}  {'seconds':>7}  {'×pass':>6}  {'×torch':>6}  heavy modules imported")
    print(f"  {'python -c pass':34}  {floor:6.3f}s  {1:6.1f}  {floor / torch:6.2f}")
    print(f"  {TORCH_LABEL:34}  {torch:6.3f}s  {torch / floor:6.1f}  {1:6.2f}  torch numpy")
    for label, args, environ in commands:
        seconds = best([sys.executable, "-m", "loraops", *args], environ, options.runs)
        print(f"  {label:34}  {seconds:6.3f}s  {seconds / floor:6.1f}  {seconds / torch:6.2f}  "
              f"{imported(args, environ)}", flush=True)


if __name__ == "__main__":
    main()
