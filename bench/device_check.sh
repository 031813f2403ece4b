#!/bin/bash
# GPU test + CPU/CUDA bench on the device machine (one call; ~5 min). It has torch, peft, transformers, safetensors,
# click and tqdm but not pydantic/sqlalchemy/alembic: fetch their wheels into .whl/ first (see
# /work/.library/device/README.md; pydantic pydantic_core annotated-types typing-inspection SQLAlchemy alembic Mako)
# and carry .whl.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests PYTHONUNBUFFERED=1
nvidia-smi -L; nproc
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine_io.py -k "gpu or sharded or midway" 2>&1 | tail -4
timeout 240 python3 bench/merge.py --runs 2 --device cpu --cache /tmp/bench 2>&1 | tee "${OUT:-/tmp}/bench_cpu.txt" | tail -14
timeout 120 python3 bench/merge.py --runs 2 --device cuda --cache /tmp/bench --no-peft 2>&1 | tee "${OUT:-/tmp}/bench_cuda.txt" | tail -10
