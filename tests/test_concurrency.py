"""Many writers at once: 8 processes × 50 registrations (distinct adapters, identical ones, new versions of one
name, one with lineage) and 5 removals each, against the active backend (SQLite here, PostgreSQL in the second
pass). The registry must end with exactly the right rows and files, and no writer may see an error."""
from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factories import kohya_file
from loraops.registry import Registry
from loraops.st import read_header

pytestmark = pytest.mark.registry_backend  # the registry's own code: run on PostgreSQL too (conftest.py)

WORKERS, SHARED, VERSIONS, DISTINCT, REMOVED = 8, 5, 5, 39, 5  # 5 + 5 + 39 + 1 derived = 50 registrations each
MODULES = {"lora_unet_a_proj": ((64,), (64,)), "lora_unet_b_proj": ((64,), (64,))}
WORKER = Path(__file__).with_name("registry_worker.py")


def variants(template: Path, folder: Path):
    """Distinct valid kohya files from one template: the first factor element set to a different number."""
    data = bytearray(template.read_bytes())
    header = read_header(template)
    at = header.data_offset + header.tensors["lora_unet_a_proj.lora_up.weight"].start
    count = 0

    def make(label: str) -> str:
        nonlocal count
        count += 1
        data[at:at + 4] = struct.pack("<f", 1.0 + count)
        path = folder / f"{label}.safetensors"
        path.write_bytes(bytes(data))
        return str(path)

    return make


def test_many_writers(tmp_path, registry_backend):
    make = variants(kohya_file(tmp_path / "template.safetensors", MODULES, rank=4), tmp_path)
    shared = [make(f"shared-{j}") for j in range(SHARED)]
    procs = []
    for w in range(WORKERS):
        rng = random.Random(w)
        middle = [["register", make(f"v-{w}-{i}"), "ver"] for i in range(VERSIONS)]
        middle += [["register", make(f"d-{w}-{i}"), f"d-{w}-{i}"] for i in range(DISTINCT)]
        middle.append(["derive", make(f"derived-{w}"), f"derived-{w}", ["shared-0", "shared-1"]])
        rng.shuffle(middle)
        plan = [["register", p, f"shared-{j}"] for j, p in enumerate(shared)] + middle
        plan += [["rm", f"d-{w}-{i}"] for i in range(REMOVED)]
        (tmp_path / f"plan-{w}.json").write_text(json.dumps(plan))
    start = time.perf_counter()
    for w in range(WORKERS):
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / f"plan-{w}.json")],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    elapsed = time.perf_counter() - start
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and "locked" not in err, err[-2000:]

    with Registry.open() as reg:
        records = reg.list_adapters()
        by_name: dict[str, list[int]] = {}
        for r in records:
            by_name.setdefault(r.name, []).append(r.version)
        assert len(records) == SHARED + WORKERS * (VERSIONS + DISTINCT - REMOVED + 1)
        assert sorted(by_name.pop("ver")) == list(range(1, WORKERS * VERSIONS + 1))
        assert all(versions == [1] for versions in by_name.values())
        expected = {f"shared-{j}" for j in range(SHARED)} | {f"derived-{w}" for w in range(WORKERS)}
        expected |= {f"d-{w}-{i}" for w in range(WORKERS) for i in range(REMOVED, DISTINCT)}
        assert set(by_name) == expected
        derived = [r for r in records if r.name.startswith("derived-")]
        assert all([i.ref for i in r.lineage.inputs] == ["shared-0@1", "shared-1@1"] for r in derived)
        assert len({r.sha256 for r in records}) == len(records)
        # Every record has its files, and no file lacks its record.
        assert reg.verify() == []
        assert reg.gc(grace_s=0, dry_run=True) == []
        assert len(list(reg.blobs.folders())) == len(records)
    busy = max(json.loads(out)["seconds"] for out, _ in results)
    print(f"\n{registry_backend}: {WORKERS} writers x {SHARED + VERSIONS + DISTINCT + 1} registrations + {REMOVED} rm: "
          f"{busy:.1f} s for the slowest writer's loop, {elapsed:.1f} s with interpreter start-up")
