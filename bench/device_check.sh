#!/bin/bash
# Every check that needs a GPU, in one call on a CUDA machine (~5 min):
#   1. the GPU tests (combine/resize/merge — plain, DoRA, into FP8 — on cuda agree with the CPU);
#   2. `loraops merge --device cuda` through the real CLI on a tiny model, compared with the CPU result;
#   3. bench/merge.py on the CPU and on CUDA (1.1B-shaped bf16 base), and on CUDA with the base out of the page cache.
# A machine without pydantic/sqlalchemy/alembic gets them from wheels in .whl/ (see /work/.library/device/README.md).
set -u
OUT=${OUT:-/tmp/device-out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 LORAOPS_QUIET=1 LORAOPS_HOME=/tmp/loraops-home HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi -L; nproc; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

echo "== 1. GPU tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider -W ignore tests/test_algebra_gpu.py tests/test_engine_io.py tests/test_dora.py tests/test_fp8.py -k "cuda or gpu" -rs 2>&1 | tail -6 | tee "$OUT/gpu_tests.txt"

echo "== 2. loraops merge --device cuda (CLI) vs cpu"
timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT/gpu_cli.txt"
import subprocess, sys, tempfile
from pathlib import Path
sys.path.insert(0, "examples")
import torch
from _build import llama, peft_lora
from safetensors.torch import load_file
work = Path(tempfile.mkdtemp())
base = llama(work / "base")
adapter = peft_lora(base, work / "adapter", r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"])
for device in ("cpu", "cuda"):
    done = subprocess.run([sys.executable, "-m", "loraops", "merge", f"{adapter}:0.7", "--into", str(base),
                           "-o", str(work / device), "--device", device, "--dtype", "bf16", "--no-record"],
                          capture_output=True, text=True)
    print(device, "exit", done.returncode, done.stdout.strip().splitlines()[-1:] , done.stderr.strip()[-300:])
cpu, gpu = load_file(str(work / "cpu/model.safetensors")), load_file(str(work / "cuda/model.safetensors"))
ulps = max(float(((cpu[k].float() - gpu[k].float()).abs() / cpu[k].float().abs().clamp_min(1e-30)).max()) for k in cpu)
same = sum(torch.equal(cpu[k], gpu[k]) for k in cpu)
print(f"cuda vs cpu: {same}/{len(cpu)} tensors bit-identical, max relative difference {ulps:.2e} (bf16 ulp = 7.8e-3)")
PY

echo "== 3. bench/merge.py, CPU then CUDA"
timeout 150 python3 bench/merge.py --runs 1 --device cpu --no-peft --cache /tmp/bench 2>&1 | tee "$OUT/bench_cpu.txt" | tail -14
timeout 200 python3 bench/merge.py --runs 1 --device cuda --no-peft --cache /tmp/bench 2>&1 | tee "$OUT/bench_cuda.txt" | tail -14
timeout 150 python3 bench/merge.py --runs 1 --device cuda --no-peft --cold --cache /tmp/bench 2>&1 | tee "$OUT/bench_cuda_cold.txt" | tail -14
