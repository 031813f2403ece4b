# Sourced by the demo and test commands: make (or reuse) ./.venv with loraops and its test extras installed.
# torch==2.13.0 first: the project's machines resolve it to a local CPU build (elsewhere, set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for it); a plain `torch` would pull a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LORAOPS_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.loraops-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[test]" 2>&1 | grep -v "^WARNING: Location" || true
  # mergekit itself, the reference of tests/test_combine_mergekit_package.py: its merge methods need only torch and
  # pydantic, while its declared dependencies (datasets, scipy, accelerate, …) would add minutes to every install
  "$PY" -m pip install -q --disable-pip-version-check --no-deps "mergekit==0.1.5" 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -c "import loraops, torch, peft, transformers, mergekit.merge_methods, lycoris" && touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
