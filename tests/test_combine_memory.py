"""The element-wise combines' peak memory: the mixed result and a few row blocks of temporaries, measured in a child
process whose allocator hands every large block back to the system when it is freed (a fixed mmap threshold), so its
peak RSS is what was alive at once, not what the heap kept."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.no_registry,
              pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's /proc peak RSS")]

CHILD = """
import json, sys, torch
from loraops.ops import combine as C
from loraops.ops.svd import BLOCK_ELEMENTS

torch.set_num_threads(1)
shape, rank = (1024, 16384), 64  # 4 row blocks
g = torch.Generator().manual_seed(0)
terms = [C.Term(torch.randn(shape[0], rank, generator=g), torch.randn(rank, shape[1], generator=g), 0.5, w)
         for w in (0.7, 0.4)]

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) * 1024

method, sparsifier, consensus = sys.argv[1], getattr(C, sys.argv[2]), sys.argv[3] == "1"
params = C.METHODS[method].params.model_validate({"density": 0.5})
for _ in range(2):  # the first run warms torch and the allocator up
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to VmRSS
    C.task_arithmetic(terms, params, C.Context("m", shape), sparsifier, consensus)
    peak = status("VmHWM") - before
print(json.dumps((peak - shape[0] * shape[1] * 4) / (BLOCK_ELEMENTS * 4)))
"""


@pytest.mark.parametrize("method, sparsifier, consensus, blocks", [
    # measured: 4.5, 4.5 and 3.5 blocks (before: 6.5, 6.5 and 4.5: new temporaries where the blocks are now changed
    # in place, and DELLA's sort of a whole block, 3 blocks of float32 in its int64 indices and values)
    ("ties", "trim", True, 5.25), ("della", "sample_by_rank", True, 5.25), ("dare_ties", "drop_and_rescale", True, 4)])
def test_elementwise_temporaries_are_a_few_row_blocks(method, sparsifier, consensus, blocks):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", CHILD, method, sparsifier, str(int(consensus))], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) <= blocks, f"{method}: {json.loads(out):.2f} row blocks of temporaries beside the result"
