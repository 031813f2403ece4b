"""Crash safety: commands SIGKILLed after random delays (seeded) leave no partial output, no registry row without
its complete stored files, and nothing in the blob store that `loraops gc` does not clean; a merge interrupted by
Ctrl-C leaves no temporary folder and says truly what it left. Each command runs 20+ times in a child of
tests/forkserver.py (no interpreter start-up per run); delays are uniform in [0, 1.5 T] where T is a typical
uninterrupted run timed in the same loop, so kills land everywhere from start-up to after the end (signal_trials)."""
from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import statistics
import time
from pathlib import Path

import pytest

from factories import kohya_file
from forkserver import ForkServer
from loraops.fsutil import TMP_MARK
from loraops.registry import Registry
from test_concurrency import MODULES, variants

pytestmark = pytest.mark.registry_backend  # the registry's own code: run on PostgreSQL too (conftest.py)

TRIALS = 20  # signalled runs, at least
ENOUGH = 3  # runs that finished, and runs stopped mid-way, at least
TIMED_EVERY = 5
MAX_RUNS = 6 * TRIALS  # generous: on a loaded machine many signals land before the program began
ENV_KEYS = ("LORAOPS_HOME", "LORAOPS_DB", "LORAOPS_BLOBS", "HF_HOME", "HF_ENDPOINT", "LORAOPS_QUIET", "HF_HUB_DISABLE_XET")


@pytest.fixture(scope="module")
def forks():
    with ForkServer() as server:
        yield server


def env() -> dict[str, str]:
    """What the child needs of this test's environment (the fork server started with the session's)."""
    return {k: os.environ.get(k, "") for k in ENV_KEYS}


def signal_trials(forks: ForkServer, logs: Path, args_of, sig: int, seed: int, spread: float, outcome) -> dict[int, int]:
    """Run ``args_of(0)`` (it creates the registry), then ``args_of(i)`` for i = 1, 2, …: every TIMED_EVERY-th run
    uninterrupted and timed, the others sent ``sig`` after a delay uniform in [0, spread·T], T the median of the
    latest timed runs. ``outcome(i, status, log, began)`` (log: the run's output; began: whether the loraops program
    had begun) says "finished", "stopped" (the signal landed mid-way) or None (it counts as neither). Goes on until
    at least TRIALS runs were signalled, ENOUGH finished and ENOUGH were stopped; fails after MAX_RUNS. Returns each
    run's exit status."""
    statuses: dict[int, int] = {}

    def timed(i: int) -> float:
        args, log = args_of(i), logs / f"log{i}"
        start = time.perf_counter()
        statuses[i] = forks.run(args, env(), str(log))
        assert statuses[i] == 0, log.read_text()
        return time.perf_counter() - start

    # Timed in the same loop as the trials, so a load that comes or goes mid-test moves T with it: T timed once
    # before a load began made every delay too short ("every run was killed").
    timed(0)
    times = [timed(1)]
    rng = random.Random(seed)
    seen: collections.Counter = collections.Counter()
    for i in range(2, MAX_RUNS):
        if seen.total() >= TRIALS and seen["finished"] >= ENOUGH and seen["stopped"] >= ENOUGH:
            return statuses
        if i % TIMED_EVERY == 0:
            times.append(timed(i))
            continue
        args, log, began = args_of(i), logs / f"log{i}", logs / f"began{i}"
        pid = forks.start(args, env(), str(log), began=str(began))
        time.sleep(rng.uniform(0, spread * statistics.median(times[-3:])))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        statuses[i] = forks.wait()
        seen[outcome(i, statuses[i], log.read_text() if log.exists() else "", began.exists())] += 1
    pytest.fail(f"not enough runs finished and stopped mid-way in {MAX_RUNS}: {dict(seen)}, {times=}")


def kill_trials(forks: ForkServer, logs: Path, args_of, seed: int) -> dict[int, int]:
    """signal_trials with SIGKILL: returns the exit statuses (0: it finished first, -9: killed)."""
    def outcome(i, status, log, began):
        assert status in (0, -signal.SIGKILL), log
        return "finished" if status == 0 else "stopped" if began else None

    return signal_trials(forks, logs, args_of, signal.SIGKILL, seed, 1.5, outcome)


def assert_registry_consistent(reg: Registry) -> list:
    """Every record's stored files are complete; after `gc --grace 0` every stored folder has its record and no
    temp file is left. Returns the records."""
    assert reg.verify() == []
    reg.gc(grace_s=0)
    records = reg.list_adapters()
    root = reg.blobs.root
    assert sorted(f.relative_to(root).as_posix() for f in reg.blobs.folders()) == sorted(
        Path(r.path).relative_to(root).parts[0] + "/" + Path(r.path).relative_to(root).parts[1] for r in records)
    assert not [p for p in root.rglob("*") if TMP_MARK in p.name]
    return records


def test_register_killed_at_random_points(forks, tmp_path):
    make = variants(kohya_file(tmp_path / "template.safetensors", MODULES, rank=4), tmp_path)
    statuses = kill_trials(forks, tmp_path, lambda i: ["register", make(f"a{i}"), "--name", f"a{i}"], seed=1)
    with Registry.open() as reg:
        records = {r.name: r for r in assert_registry_consistent(reg)}
    assert {f"a{i}" for i, s in statuses.items() if s == 0} <= set(records) <= {f"a{i}" for i in statuses}


def test_pull_killed_at_random_points(forks, tmp_path, fake_hub):
    make = variants(kohya_file(tmp_path / "template.safetensors", MODULES, rank=4), tmp_path)

    def args(i):
        fake_hub.commit(f"someone/style-{i}", {"style.safetensors": Path(make(f"s{i}")).read_bytes()})
        return ["pull", f"someone/style-{i}"]

    statuses = kill_trials(forks, tmp_path, args, seed=2)
    with Registry.open() as reg:
        records = {r.name: r for r in assert_registry_consistent(reg)}
    assert {f"style-{i}" for i, s in statuses.items() if s == 0} <= set(records)
    assert all(r.source.startswith(f"hf://someone/{r.name}@") for r in records.values())


def test_verify_reports_a_flipped_byte(forks, tmp_path):
    stored = kohya_file(tmp_path / "style.safetensors", MODULES, rank=4)
    log = tmp_path / "log"
    assert forks.run(["register", str(stored)], env(), str(log)) == 0
    assert forks.run(["verify"], env(), str(log)) == 0
    with Registry.open() as reg:
        path = Path(reg.get_adapter("style").path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert forks.run(["verify"], env(), str(log)) == 6
    lines = log.read_text().splitlines()
    assert lines[0].startswith(f"style@1: {path}: sha256 ") and "≠ recorded" in lines[0]
    assert lines[-1] == "error: 1 stored file(s) missing or changed; re-register those adapters from their originals"


def assert_outputs_whole(folder: Path, complete) -> list[Path]:
    """Each entry of ``folder`` is a finished output (``complete(path)`` reads it) or a marked temp sibling that
    the next run to that output removes (fsutil.remove_stale_temps). Returns the finished ones."""
    done = [p for p in folder.iterdir() if TMP_MARK not in p.name]
    for path in done:
        complete(path)
    return done


def kohya_trial_files(tmp_path: Path):
    """``make(label)``: a new distinct kohya input file."""
    return variants(kohya_file(tmp_path / "template.safetensors", MODULES, rank=4), tmp_path)


def test_combine_killed_at_random_points(forks, tmp_path):
    from loraops import formats

    make, out = kohya_trial_files(tmp_path), tmp_path / "out"
    other = kohya_file(tmp_path / "other.safetensors", MODULES, rank=2, seed=9)
    kill_trials(forks, tmp_path, lambda i: ["combine", make(f"in{i}"), f"{other}:0.5", "--name", f"c{i}", "--device",
                                            "cpu", "-o", str(out / f"c{i}.safetensors")], seed=3)
    with Registry.open() as reg:
        records = {r.name: r for r in assert_registry_consistent(reg)}
        for path in assert_outputs_whole(out, formats.read_adapter):
            if path.stem in records:  # the output is what was registered (it may be written and not yet recorded)
                assert formats.identity(path) == records[path.stem].sha256
        assert all(r.lineage.op == "combine" for n, r in records.items() if n.startswith("c"))


def test_resize_killed_at_random_points(forks, tmp_path):
    from loraops import formats

    make, out = kohya_trial_files(tmp_path), tmp_path / "out"
    kill_trials(forks, tmp_path, lambda i: ["resize", make(f"in{i}"), "--rank", "2", "--name", f"r{i}", "--device",
                                            "cpu", "-o", str(out / f"r{i}.safetensors")], seed=4)
    with Registry.open() as reg:
        records = {r.name: r for r in assert_registry_consistent(reg)}
        for path in assert_outputs_whole(out, formats.read_adapter):
            assert formats.read_adapter(path).rank == 2
            if path.stem in records:
                assert formats.identity(path) == records[path.stem].sha256


def test_merge_killed_at_random_points(forks, tmp_path):
    from factories import peft_adapter, tiny_llama
    from loraops.basemodel import BaseModel

    base = tiny_llama(tmp_path / "llama")
    adapter = peft_adapter(base, tmp_path / "ad", r=4, alpha=8)
    out = tmp_path / "out"
    out.mkdir()
    kill_trials(forks, tmp_path, lambda i: ["merge", f"{adapter}:{1 + i / 100}", "--into", str(base), "--device",
                                            "cpu", "-o", str(out / f"m{i}")], seed=5)
    finished = {p.name: BaseModel.open(p).fingerprint() for p in assert_outputs_whole(out, BaseModel.open)}
    with Registry.open() as reg:
        assert_registry_consistent(reg)
        for b in reg.list_bases():  # no record of an output that is not all there
            assert b.path and Path(b.path).exists()
            if b.derived:
                assert finished[Path(b.path).name] == b.fingerprint and b.lineage.op == "merge"


def test_merge_interrupted_at_random_points(forks, tmp_path):
    """Ctrl-C (SIGINT) anywhere in a merge: exit 130, no temporary folder left (the stages are joined before it is
    removed, or a writer would recreate it), and the message tells what is there: nothing, or the output in full,
    recorded or not — exactly as the registry has it."""
    from factories import peft_adapter, tiny_llama
    from loraops.basemodel import BaseModel

    base = tiny_llama(tmp_path / "llama", hidden=512, layers=4, intermediate=1024, shard_size="10MB")
    adapter = peft_adapter(base, tmp_path / "ad", r=8, alpha=8)
    out = tmp_path / "out"
    out.mkdir()

    def args(i):
        return ["merge", f"{adapter}:{1 + i / 100}", "--into", str(base), "--device", "cpu", "-o", str(out / f"m{i}")]

    messages = {}

    def outcome(i, status, log, began):
        if status in (70, -signal.SIGINT) and not log:
            # the fork server's child, interrupted before the loraops program began (70), or between the fork and its
            # try block / in its final flush, where a KeyboardInterrupt escapes and Python exits by SIGINT (-2)
            return None
        if status == 6:  # PostgreSQL: the interrupt broke the recording's query, which then failed as such
            assert f"{out / f'm{i}'} was written, but recording it in the registry failed" in log, log
            return None
        assert status in (0, 130), log
        if status == 0:
            return "finished"
        # its error line, wherever it is: the summary of a merge said before the interrupt may come after it
        messages[f"m{i}"] = ([line for line in log.splitlines() if line.startswith("error:")] or [""])[-1]
        return "stopped"

    signal_trials(forks, tmp_path, args, signal.SIGINT, 6, 1.2, outcome)
    assert not [p.name for p in out.iterdir() if TMP_MARK in p.name]
    with Registry.open() as reg:
        recorded = {Path(b.path).name for b in reg.list_bases() if b.derived}
    for name, message in messages.items():
        if message in ("", "error: interrupted"):  # before the command was dispatched or after it returned
            continue
        if not (out / name).exists():
            assert message == "error: interrupted; nothing was written", message
            continue
        BaseModel.open(out / name).fingerprint()  # complete
        assert f"{out / name} was written in full" in message, message
        assert (name in recorded) == message.endswith("and recorded"), message


@pytest.mark.parametrize("where", ["as merging.merge returns", "as click returns from the command"])
def test_a_ctrl_c_once_the_merge_returned_says_its_output_is_there(tmp_path, monkeypatch, capsys, where):
    """test_merge_interrupted_at_random_points under load: a Ctrl-C that landed after merging.merge's own check
    (its with-block exiting, the command's last lines, click's return from it: after the summary was printed) came
    out as "error: interrupted; nothing was written", of an output written in full and recorded."""
    from factories import interrupted_once_returned, peft_adapter, tiny_llama
    from loraops import merging
    from loraops.cli import exit_status

    base = tiny_llama(tmp_path / "llama")
    adapter = peft_adapter(base, tmp_path / "ad", r=4, alpha=8)
    out = tmp_path / "merged"
    if where == "as merging.merge returns":
        def then_interrupted(*args, real=merging.merge, **kwargs):
            real(*args, **kwargs)
            raise KeyboardInterrupt
        monkeypatch.setattr(merging, "merge", then_interrupted)
    else:
        interrupted_once_returned(monkeypatch, "merge")
    assert exit_status(["merge", f"{adapter}:1", "--into", str(base), "--device", "cpu", "-o", str(out)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == f"error: interrupted after {out} was written in full and recorded"
    with Registry.open() as reg:
        assert [Path(b.path) for b in reg.list_bases() if b.derived] == [out]


@pytest.mark.no_registry
def test_a_ctrl_c_as_the_run_ends_is_one_line_not_a_traceback(tmp_path):
    """A Ctrl-C that lands once exit_status gave back its handlers and before `loraops` ignores the signals for its
    final flush escaped the program as a KeyboardInterrupt: Python's traceback, and exit by SIGINT. Now the run is
    said to be interrupted in one line, exit 130."""
    import sys

    import loraops.cli as cli

    log = tmp_path / "log"
    pid = os.fork()
    if pid == 0:  # the caller here is this test: it must never go on in the child, whatever run() does
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)

            def finished_then_interrupted(real=cli.exit_status):
                real(["--version"])
                raise KeyboardInterrupt  # as a Ctrl-C landing right after it returned

            cli.exit_status = finished_then_interrupted
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
            cli.run()
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130, (status, log.read_text())
    assert log.read_text().splitlines()[-1] == "error: interrupted", log.read_text()


CTRL_C_IN_CLI_IMPORT = """
import importlib.abc, signal, sys

class CtrlC(importlib.abc.MetaPathFinder):  # a Ctrl-C as loraops.cli imports click, ~50 ms into the command
    def find_spec(self, name, path, target=None):
        if name == "click":
            sys.meta_path.remove(self)
            signal.raise_signal(signal.SIGINT)

sys.meta_path.insert(0, CtrlC())
sys.argv = ["loraops", "list"]
import runpy
runpy.run_module("loraops", run_name="__main__")
"""


def test_a_ctrl_c_while_the_command_starts_is_one_line_not_a_traceback(tmp_path):
    """A Ctrl-C in a command's first ~50 ms, while loraops.cli (and click) were imported by the console script, was
    Python's KeyboardInterrupt traceback: the entry (loraops.start, console script and `python -m loraops`) says it
    in one line, exit 130, nothing written."""
    import subprocess
    import sys

    env = {**os.environ, "LORAOPS_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", CTRL_C_IN_CLI_IMPORT], env=env, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "error: interrupted\n")
    assert not (tmp_path / "home").exists()


def test_an_exception_that_escapes_a_forked_command_is_printed_and_exits_1(forks, tmp_path):
    """What `python -m loraops` does with an uncaught exception (print it, exit 1), the fork server's child does too,
    so a traceback still reaches a test that runs commands through it (factories.loraops_run)."""
    log = tmp_path / "log"
    assert forks.run(None, env(), str(log)) == 1  # no argument list: a TypeError in the child, before the command
    assert log.read_text().startswith("Traceback (most recent call last):") and "TypeError" in log.read_text()


@pytest.mark.no_registry
def test_a_signal_in_a_forked_child_s_final_flush_does_not_escape_os_exit(tmp_path):
    """A Ctrl-C that lands while the fork server's child flushes its output on the way out must not raise past its
    os._exit: the KeyboardInterrupt once escaped the child's function, and the child went on running its caller (in
    the server, the server's own loop)."""
    import io
    import sys

    import forkserver

    class SignalledInFlush(io.StringIO):
        def flush(self):
            os.kill(os.getpid(), signal.SIGINT)

    log = str(tmp_path / "log")
    pid = os.fork()
    if pid == 0:  # the caller here is this test: it must never go on in the child, whatever _child does
        try:
            sys.stdout = SignalledInFlush()
            forkserver._child({"args": None, "env": {}, "stdout": log, "stderr": log})  # no argument list: exit 1
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1, (status, Path(log).read_text())


CTRL_C_IN_TORCH_IMPORT = """
import importlib.abc, signal, sys

class CtrlC(importlib.abc.MetaPathFinder):  # a Ctrl-C as torch's C++ start-up imports numpy, which clears it
    def find_spec(self, name, path, target=None):
        if name == "numpy" and "torch" in sys.modules:
            sys.meta_path.remove(self)
            signal.raise_signal(signal.SIGINT)

sys.meta_path.insert(0, CtrlC())
sys.argv = ["loraops", *sys.argv[1:]]
from loraops.cli import run
run()
"""


def test_a_ctrl_c_while_torch_loads_stops_the_merge_once_it_loaded(tmp_path):
    """A Ctrl-C while torch is imported (1–2 s into every command that computes) was cleared by torch's start-up:
    the merge ran to its end, its output written and recorded, and only then said it was interrupted. torch's
    import now runs with it deferred, raised once torch is loaded: nothing is written (a fresh process, as a
    user's: the fork server has torch loaded)."""
    import subprocess
    import sys

    from factories import peft_adapter, tiny_llama

    base = tiny_llama(tmp_path / "llama")
    adapter = peft_adapter(base, tmp_path / "ad", r=4, alpha=8)
    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-c", CTRL_C_IN_TORCH_IMPORT, "merge", str(adapter), "--into", str(base),
                           "--device", "cpu", "-o", str(out)], capture_output=True, text=True)
    assert (done.returncode, done.stderr.splitlines()[-1]) == (130, "error: interrupted; nothing was written"), done
    assert not out.exists() and not [p for p in tmp_path.iterdir() if TMP_MARK in p.name]
    with Registry.open() as reg:
        assert not [b for b in reg.list_bases() if b.derived]
