#!/usr/bin/env bash
# The test command: installs what it needs into ./.venv, then runs the whole suite on the embedded SQLite registry,
# and the tests that go through the registry's own code (marked registry_backend; tests/conftest.py says which) again
# on a throwaway PostgreSQL server on loopback (skipped with LORAOPS_SKIP_POSTGRES=1). Tests run in parallel on
# every core (pytest-xdist; LORAOPS_TEST_WORKERS=0 runs them in this one process).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
# Bytecode caches are written (in __pycache__ folders, which git ignores) even where PYTHONDONTWRITEBYTECODE is set,
# as in many container images: without them each worker of each pass re-rewrote every test module's asserts and
# every interpreter a test starts recompiled loraops.
unset PYTHONDONTWRITEBYTECODE
# Each worker is a busy process per core already; torch's OpenMP threads (one per core in every worker) spun while
# they waited for each other, taking the cores from the other workers: sleeping instead ran the SQLite pass in
# 397 s instead of 491 s on 2 cores (one thread per worker: 426 s). A value the caller set is kept.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
workers=(-n "${LORAOPS_TEST_WORKERS:-auto}" --durations=25)  # the slowest 25: where CI time goes
echo "== pass 1: SQLite registry"
python -m pytest "${workers[@]}" "$@"
if [ "${LORAOPS_SKIP_POSTGRES:-0}" != 1 ]; then
  source tests/pass_args.sh
  postgres_pass_args "$@"  # a user's -m narrows the pass's selection; it does not replace it
  source tests/postgres.sh
  echo "== pass 2: PostgreSQL registry ($LORAOPS_TEST_DB)"
  python -m pytest "${workers[@]}" "${PG_ARGS[@]}"
fi
