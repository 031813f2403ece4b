#!/usr/bin/env bash
# The test command: installs what it needs into ./.venv and runs the whole suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
python -m pytest "$@"
