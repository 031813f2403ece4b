import runpy
from pathlib import Path

import torch
import pytest

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass

BENCH = Path(__file__).resolve().parents[1] / "bench" / "algebra.py"


def test_bench_quick_smoke(capsys):
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(BENCH))["main"](["--quick", "--repeat", "1", "--threads", str(threads)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "factored SVD vs dense svd(B·A)" in out and "resize, " in out and "cat vs PEFT cat" in out
    assert "ties vs modules in turn" in out and "ties vs PEFT ties_svd" in out
    loha = [line for line in out.splitlines() if "vs modules in turn" in line and line.lstrip().startswith("resize")]
    assert len(loha) == 2 and all(line.endswith("same bytes") for line in loha)


def test_svd_gram_bench_quick_smoke(capsys):
    """bench/svd_gram.py: leading_svd against LAPACK's SVD, as refactor_dense runs them (one thread)."""
    runpy.run_path(str(BENCH.with_name("svd_gram.py")))["main"](["--quick", "--repeat", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 3 and all(float(row[-2]) < 1e-10 for row in rows)  # top-k diff, float64 against LAPACK's
