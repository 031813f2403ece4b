#!/usr/bin/env bash
# The demo command: installs loraops into ./.venv (first run only), then runs every example end to end on the
# embedded SQLite registry in a fresh home under ./demo-output, with small models the examples build themselves.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/setup_env.sh"
cd "$ROOT"
rm -rf demo-output
mkdir -p demo-output
export LORAOPS_HOME="$ROOT/demo-output/home" HF_HOME="$ROOT/demo-output/hf-home" LORAOPS_QUIET=1
unset LORAOPS_DB LORAOPS_BLOBS
for script in examples/[0-9][0-9]_*.py; do
  echo
  echo "################ $script"
  python "$script" "$ROOT/demo-output"
done
echo
echo "demo finished: everything it made is under demo-output/"
