#!/usr/bin/env bash
# The test command: installs what it needs into ./.venv, then runs the whole suite twice — on the embedded SQLite
# registry, and on a throwaway PostgreSQL server on loopback (skipped with LORAOPS_SKIP_POSTGRES=1).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
echo "== pass 1: SQLite registry"
python -m pytest "$@"
if [ "${LORAOPS_SKIP_POSTGRES:-0}" != 1 ]; then
  source tests/postgres.sh
  echo "== pass 2: PostgreSQL registry ($LORAOPS_TEST_DB)"
  python -m pytest -m "not sqlite_only" "$@"
fi
