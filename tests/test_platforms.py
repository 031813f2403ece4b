"""What loraops does where a Linux facility is missing (macOS, other Unixes), simulated on Linux: no O_DIRECT, no
posix_fadvise, no sched_getaffinity, no os.fdatasync, no /proc, F_FULLFSYNC, ru_maxrss in bytes, a file system that
ignores case. Merge, combine and register give the same results as with every facility there."""
from __future__ import annotations

import builtins
import errno
import fcntl
import os
import resource
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from factories import combine_inputs
from test_merge_cli import run, tensors
from loraops import engine, fsutil
from loraops.errors import InvalidInputError

F_FULLFSYNC = 51  # macOS's value; Linux's fcntl has no such command


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return combine_inputs(tmp_path_factory.mktemp("platforms"))


def full_fsyncs(monkeypatch, refuse: int = 0) -> list[int]:
    """fcntl with macOS's F_FULLFSYNC (an fsync here, or failing with errno ``refuse``: ENOTSUP as some network file
    systems do); the fds it flushed."""
    flushed, real = [], fcntl.fcntl

    def fake(fd, cmd, *args):
        if cmd != F_FULLFSYNC:
            return real(fd, cmd, *args)
        if refuse:
            raise OSError(refuse, os.strerror(refuse))
        os.fsync(fd)
        flushed.append(fd)
        return 0

    monkeypatch.setattr(fcntl, "F_FULLFSYNC", F_FULLFSYNC, raising=False)
    monkeypatch.setattr(fcntl, "fcntl", fake)
    return flushed


def as_on_macos(monkeypatch):
    """This process as on macOS, as far as loraops can tell; peak resident memory 300 MiB, in bytes."""
    for name in ("O_DIRECT", "posix_fadvise", "sched_getaffinity", "fdatasync"):
        monkeypatch.delattr(os, name, raising=False)
    full_fsyncs(monkeypatch)
    real_open, real_is_dir, real_sysconf = builtins.open, Path.is_dir, os.sysconf

    def no_proc(file, *args, **kwargs):
        if str(file).startswith("/proc/"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(file))
        return real_open(file, *args, **kwargs)

    def sysconf(name):
        if name == "SC_AVPHYS_PAGES":  # (macOS's sysconf has no such name)
            raise ValueError("unrecognized configuration name")
        return real_sysconf(name)

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(Path, "is_dir", lambda self: False if str(self).startswith("/proc") else real_is_dir(self))
    monkeypatch.setattr(os, "sysconf", sysconf)
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=300 << 20))
    monkeypatch.setattr(sys, "platform", "darwin")


def test_peak_memory_is_in_bytes_on_macos_and_kib_on_linux(monkeypatch):
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=300 << 10))
    monkeypatch.setattr(sys, "platform", "linux")
    assert engine.peak_rss() == 300 << 20
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=300 << 20))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert engine.peak_rss() == 300 << 20


def test_writer_without_fdatasync(monkeypatch, tmp_path):
    """macOS's os has no fdatasync: every output's close raised AttributeError there."""
    monkeypatch.delattr(os, "fdatasync")
    data = os.urandom(fsutil.DirectFileWriter.STAGE + 12345)
    out = fsutil.DirectFileWriter(tmp_path / "out.bin")
    out.write(memoryview(data))
    out.close()
    assert (tmp_path / "out.bin").read_bytes() == data


def test_full_fsync_where_there_and_fsync_where_refused(monkeypatch, tmp_path):
    """Where fcntl has F_FULLFSYNC (macOS) outputs and their folders are flushed with it: fsync leaves the bytes in
    the drive's cache there. Where the file system refuses it, fsync."""
    flushed = full_fsyncs(monkeypatch)
    with fsutil.atomic_path(tmp_path / "x.bin") as tmp:
        out = fsutil.DirectFileWriter(tmp)
        out.write(memoryview(b"abc"))
        out.close()
    assert len(flushed) == 3  # the writer's close, atomic_path's fsync of the file and of its folder
    assert (tmp_path / "x.bin").read_bytes() == b"abc"
    flushed = full_fsyncs(monkeypatch, refuse=errno.ENOTSUP)
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    with fsutil.atomic_path(tmp_path / "y.bin") as tmp:
        tmp.write_bytes(b"abc")
    assert not flushed and len(synced) == 2


def test_full_fsync_write_error_is_not_hidden_by_fsync(monkeypatch, tmp_path):
    """An I/O error from F_FULLFSYNC is the output's bytes lost: the fsync tried after it may report none (the error
    was already given), and the output landed as if durable."""
    full_fsyncs(monkeypatch, refuse=errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        with fsutil.atomic_path(tmp_path / "x.bin") as tmp:
            out = fsutil.DirectFileWriter(tmp)
            out.write(memoryview(b"abc"))
            out.close()
    assert not os.listdir(tmp_path)


def test_merge_combine_register_as_on_macos(inputs, tmp_path, monkeypatch):
    """The results are those of a Linux run, byte for byte; the peak memory line says 300 MiB (ru_maxrss in bytes)."""
    base, a, b = inputs["base"], inputs["a"], inputs["b"]
    run("merge", f"{a}:0.7", "--into", base, "-o", tmp_path / "linux-merged", "--no-record")
    run("combine", f"{a}:0.5", b, "-o", tmp_path / "linux-combined")
    with monkeypatch.context() as m:
        as_on_macos(m)
        merged = run("merge", f"{a}:0.7", "--into", base, "-o", tmp_path / "merged", "--no-record").output
        run("combine", f"{a}:0.5", b, "-o", tmp_path / "combined")
        registered = run("register", inputs["c"], "--name", "Style").output
    assert "peak memory 300.0 MiB" in merged
    for name in ("merged", "combined"):
        ours, linux = tensors(tmp_path / name), tensors(tmp_path / f"linux-{name}")
        assert ours.keys() == linux.keys()
        assert all(torch.equal(ours[k], linux[k]) for k in ours)
    assert registered.startswith("registered Style@1"), registered


def case_insensitive(monkeypatch, tmp_path) -> tuple[Path, Path]:
    """A folder 'Base' and the name 'base' for it, as on a file system that ignores case: no link realpath
    resolves (a symlink here, with fsutil.resolved not following it)."""
    (tmp_path / "Base").mkdir()
    (tmp_path / "base").symlink_to("Base")
    monkeypatch.setattr(fsutil, "resolved", lambda path: Path(os.path.abspath(path)))
    return tmp_path / "Base", tmp_path / "base"


def test_overlap_under_another_case_is_refused(monkeypatch, tmp_path):
    """'base' is 'Base' on APFS: writing the output there with --force replaced the model being read."""
    folder, alias = case_insensitive(monkeypatch, tmp_path)
    for output in (alias, alias / "sub", tmp_path):
        with pytest.raises(InvalidInputError, match="overlaps the model it reads"):
            fsutil.refuse_overlap(output, folder, "the model it reads")
    fsutil.refuse_overlap(tmp_path / "other", folder, "the model it reads")
    fsutil.refuse_overlap(tmp_path / "new" / "out", folder, "the model it reads")  # nothing there yet


def test_windows_is_refused_in_one_line(monkeypatch, capfd):
    """Windows has no os.pwrite, os.preadv, fcntl or resource: a merge computed there failed as it wrote its output
    (a traceback), and the registry's locks were no-ops."""
    from loraops import cli

    with monkeypatch.context() as m:
        m.setattr(os, "name", "nt")
        code = cli.exit_status(["list"])
    assert code == 1
    assert capfd.readouterr().err == "error: loraops runs on Linux and macOS; on Windows, run it in WSL2\n"


def test_overlap_by_stat_stats_each_folder_once(monkeypatch, tmp_path):
    """refuse_output_over_registered checks every registered base (0.16 s for 5,000 by name): stat'ing the output's
    folders again for each base, and each base's folders, took 2-3 times that."""
    bases = [(tmp_path / "models" / f"base{i}", f"registered base b{i}") for i in range(100)]
    for path, _ in bases:
        path.mkdir(parents=True)
    real, calls = os.stat, []
    monkeypatch.setattr(os, "stat", lambda path, *args, **kwargs: (calls.append(path), real(path, *args, **kwargs))[1])
    (tmp_path / "work").mkdir()
    for output in (tmp_path / "work" / "deep" / "out.safetensors", tmp_path / "work"):  # (a folder: --force)
        calls.clear()
        fsutil.refuse_overlaps(output, bases)
        assert len(calls) <= len(bases) + len(output.parts) + 2, len(calls)
