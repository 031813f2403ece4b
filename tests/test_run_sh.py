"""tests/run.sh's PostgreSQL pass: a user's -m narrows the pass's own selection (registry_backend …), never replaces it."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.no_registry
PASS_ARGS = Path(__file__).with_name("pass_args.sh")
OWN = "registry_backend and not sqlite_only and not no_registry"


def pass_args(*args: str) -> list[str]:
    script = 'set -euo pipefail; source "$0"; postgres_pass_args "$@"; printf "%s\\0" "${PG_ARGS[@]}"'
    out = subprocess.run(["bash", "-c", script, str(PASS_ARGS), *args], capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def test_user_mark_combines_with_the_pass_selection():
    assert pass_args("-q", "-m", "slow or gpu", "-k", "a b", "tests/x.py") == [
        "-m", f"(slow or gpu) and {OWN}", "-q", "-k", "a b", "tests/x.py"]
    assert pass_args("-mslow", "-x") == ["-m", f"(slow) and {OWN}", "-x"]
    assert pass_args("-m", "a", "-m", "b") == ["-m", f"(b) and {OWN}"]  # pytest takes the last -m


def test_without_a_mark_the_pass_selection_alone():
    assert pass_args() == ["-m", OWN]
    assert pass_args("-q", "--durations=5") == ["-m", OWN, "-q", "--durations=5"]
