"""A registry writer for tests/test_concurrency.py, run as its own process: `python registry_worker.py PLAN.json`.

The plan is a list of steps, done in order with one Registry: ["register", path, name] and ["rm", ref], and
["derive", path, name, [input names]] (a registration with lineage). Prints one JSON line: the seconds it took."""
from __future__ import annotations

import json
import sys
import time

from loraops.records import LineageInput, LineageSpec
from loraops.registry import Registry


def main(plan_path: str) -> None:
    plan = json.loads(open(plan_path).read())
    start = time.perf_counter()
    with Registry.open() as reg:
        for step in plan:
            if step[0] == "register":
                reg.add_adapter(step[1], name=step[2])
            elif step[0] == "rm":
                reg.remove_adapter(step[1])
            else:
                inputs = [LineageInput(kind="adapter", id=reg.get_adapter(n).id, weight=1.0) for n in step[3]]
                reg.add_adapter(step[1], name=step[2], lineage=LineageSpec(op="combine", inputs=inputs))
    print(json.dumps({"seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main(sys.argv[1])
