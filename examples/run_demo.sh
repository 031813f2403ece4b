#!/usr/bin/env bash
# The demo command: installs loraops into ./.venv (first run only), then runs every example end to end on the
# embedded SQLite registry (a fresh one per example under ./demo-output), with small models the examples build.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/setup_env.sh"
cd "$ROOT"
rm -rf demo-output
mkdir -p demo-output
# Each example keeps its registry (SQLite) in its own folder under demo-output/, so they never collide.
export HF_HOME="$ROOT/demo-output/hf-home" LORAOPS_QUIET=1
# Quiet the model-building libraries, so what shows is loraops.
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS="ignore::FutureWarning,ignore::UserWarning"
unset LORAOPS_HOME LORAOPS_DB LORAOPS_BLOBS
for script in examples/[0-9][0-9]_*.py; do
  echo
  echo "################ $script"
  python "$script" "$ROOT/demo-output"
done
echo
echo "demo finished: everything it made is under demo-output/"
