"""Checks the output that README's tour and the docs pages made by the examples show against a real run of them.

    bash examples/run_demo.sh > demo.log 2>&1     # or: python examples/0N_*.py WORKDIR > 0N.log 2>&1
    python examples/docs_algebra.py /tmp > alg.log 2>&1
    python examples/docs_extract.py /tmp > ext.log 2>&1
    python tests/check_tour.py demo.log alg.log ext.log

Each `$ loraops …` shown is looked up by its command line in the logs (paths shortened to demo-output/… and alg/…),
and the lines shown under it must be among that command's output, in order ("…" stands for lines left out). What
changes from run to run is masked: times, throughput, peak memory, timestamps, and the commit shas and port of the
local Hub 04_hub.py starts. sha256s of outputs are not masked: they are the same on every run (README, "Reproducible
outputs"). Prints each block that differs and exits 1 if any does.
"""
from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the pages whose blocks come from the examples: (file, first and last heading of the part that does; None: all)
PAGES = [("README.md", "## A tour of every command", "## Python API"), ("docs/extract.md", None, None),
         ("docs/algebra.md", None, None)]
ELIDED = ("…", "...")
MASKS = [
    (r"(?:/[^\s/]+)+/(demo-output|alg)/", r"\1/"),
    (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)?", "<time>"),
    (r"\b\d+\.\d+ s\b", "<t> s"),
    (r"\([\d.]+ [KMG]?i?B/s\)", "(<rate>)"),
    (r"peak (memory|RSS) [\d.]+ [KMG]iB", r"peak \1 <mem>"),
    (r"(commit[ /]|@)[0-9a-f]{12}([0-9a-f]{28})?\b", r"\1<commit>"),
    (r"127\.0\.0\.1:\d+", "127.0.0.1:<port>"),
    (r"-{3,}", "---"),  # a table's rules and spacing follow the width of the paths in it
    (r"\s+", " "),
]


def normal(line: str) -> str:
    for pattern, replacement in MASKS:
        line = re.sub(pattern, replacement, line)
    return line.strip()


def commands(lines: list[str]) -> list[tuple[int, str, list[str]]]:
    """(index, command line, its output lines) for each `$ loraops` line; a script's own lines go with the command
    before. The environment a page shows before the command (`$ HF_HUB_OFFLINE=1 loraops …`) is left out: the
    examples pass it without echoing it."""
    found: list[tuple[int, str, list[str]]] = []
    output = None
    for index, line in enumerate(lines):
        if line.startswith(("$ ", "################")):
            output = None
            command = re.match(r"\$ (?:\w+=\S* )*(loraops\b.*)", line)
            if command:
                output = []
                found.append((index, normal(f"$ {command[1]}"), output))
        elif output is not None:
            output.append(normal(line))
    for _, _, output in found:
        while output and not output[-1]:
            output.pop()
    return found


def shown(page: str, first: str | None, last: str | None) -> list[tuple[int, str, list[str]]]:
    """(line number, command, lines shown) for each command in the page's code blocks, within its part."""
    lines = (ROOT / page).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first)) if first else 0
    end = next(i for i, line in enumerate(lines) if line.startswith(last)) if last else len(lines)
    blocks, block = [], None
    for number, line in enumerate(lines[start:end], start + 1):
        if line.startswith("```") and block is None:
            block = []
        elif line.startswith("```"):
            blocks.append(block)
            block = None
        elif block is not None:
            block.append((number, line))
    found = []
    for block in blocks:
        found += [(block[i][0], command, output) for i, command, output in commands([line for _, line in block])]
    return found


def fits(lines: list[str], output: list[str]) -> bool:
    rest = iter(output)
    return all(line in rest for line in lines if line not in ELIDED)


def main(logs: list[str]) -> int:
    if not logs:
        sys.exit(__doc__)
    ran = [(command, output) for log in logs for _, command, output in commands(Path(log).read_text().splitlines())]
    compared = differ = 0
    for page, first, last in PAGES:
        for number, command, lines in shown(page, first, last):
            outputs = [output for ran_command, output in ran if ran_command == command]
            if not outputs:
                continue
            compared += 1
            if not any(fits(lines, output) for output in outputs):
                differ += 1
                closest = max(outputs, key=lambda output: difflib.SequenceMatcher(None, lines, output).ratio())
                print(f"{page}:{number}: {command}")
                print("\n".join(difflib.unified_diff(lines, closest, "shown", "ran", n=1, lineterm="")), end="\n\n")
    print(f"{compared} commands compared, {differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
