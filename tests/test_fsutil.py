"""fsutil.DirectFileWriter: the merge's output writer (O_DIRECT with staging, and its page-cache fallback); fsutil.Prefetcher,
which reads a merge's base into the page cache while the process starts up."""
from __future__ import annotations

import errno
import fcntl
import os
import re
import threading

import pytest

from loraops import fsutil
from loraops.fsutil import DirectFileWriter

pytestmark = pytest.mark.no_registry


@pytest.fixture
def small_stage(monkeypatch):
    """Stages of two blocks, so a few KiB cross many stage boundaries and the flusher swaps buffers often."""
    monkeypatch.setattr(DirectFileWriter, "STAGE", 2 * DirectFileWriter.ALIGN)


def supports_direct(folder) -> bool:
    probe = folder / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def write_pieces(path, direct, source):
    """Header-like bytes, pieces from memory and from a file of odd sizes and offsets: what a merge writes."""
    expected = bytearray()
    out = DirectFileWriter(path, direct=direct)
    with open(source, "rb") as f:
        fd = f.fileno()
        for i, size in enumerate([13, 4096, 1, 8191, 3 * 4096 + 7, 0, 5000]):
            piece = bytes((i * 37 + k) % 251 for k in range(size))
            out.write(memoryview(piece))
            expected += piece
            seen = bytearray()
            offset = 101 * i + 3
            out.copy_from(fd, offset, 6000 + i, seen.extend)
            expected += source.read_bytes()[offset : offset + 6000 + i]
            assert seen == source.read_bytes()[offset : offset + 6000 + i]
    assert out.size == len(expected)
    was_direct = out.direct
    out.close()
    return bytes(expected), was_direct


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.bin"
    path.write_bytes(os.urandom(20000))
    return path


@pytest.mark.parametrize("direct", [True, False])
def test_writes_exactly_the_bytes_given(tmp_path, small_stage, source, direct):
    expected, was_direct = write_pieces(tmp_path / "out.bin", direct, source)
    assert (tmp_path / "out.bin").read_bytes() == expected  # the tail's block padding was truncated away
    assert was_direct == (direct and supports_direct(tmp_path))


def test_direct_io_is_really_used_where_the_filesystem_allows_it(tmp_path):
    if not supports_direct(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    out = DirectFileWriter(tmp_path / "out.bin")
    try:
        assert fcntl.fcntl(out.fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        out.close()


def test_a_filesystem_refusing_o_direct_gets_buffered_writes(tmp_path, small_stage, source, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # what tmpfs answers
        return real_open(path, flags, *args)

    monkeypatch.setattr(fsutil.os, "open", no_direct)
    expected, was_direct = write_pieces(tmp_path / "out.bin", True, source)
    assert not was_direct and (tmp_path / "out.bin").read_bytes() == expected


def test_a_device_refusing_our_alignment_falls_back_midway(tmp_path, small_stage, source, monkeypatch):
    if not supports_direct(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    real_write = os.pwrite
    refused = []

    def picky(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")  # e.g. a device with 64 KiB blocks
        return real_write(fd, data, offset)

    monkeypatch.setattr(fsutil.os, "pwrite", picky)
    expected, was_direct = write_pieces(tmp_path / "out.bin", True, source)
    assert refused and not was_direct
    assert (tmp_path / "out.bin").read_bytes() == expected


def test_errors_of_the_flusher_reach_the_caller(tmp_path, small_stage, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "pwrite", full)
    out = DirectFileWriter(tmp_path / "out.bin")
    with pytest.raises(OSError, match="No space"):
        for _ in range(6):  # full stages go to the flushers; a later call sees their failure
            out.write(memoryview(bytes(DirectFileWriter.STAGE)))
        out.close()
    out.abandon()
    assert out.fd == -1


def test_reading_past_the_end_of_the_source_is_reported(tmp_path, source):
    out = DirectFileWriter(tmp_path / "out.bin")
    with open(source, "rb") as f, pytest.raises(EOFError):
        out.copy_from(f.fileno(), 19990, 100)
    out.abandon()


def test_prefetcher_reads_the_files_in_order_up_to_its_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil.Prefetcher, "PIECE", 4096)
    files = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for file, size in zip(files, [10_000, 5_000, 7_000]):
        file.write_bytes(os.urandom(size))
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    whole = fsutil.Prefetcher(files, budget=1 << 30)
    whole._thread.join(10)
    assert whole.left == (1 << 30) - 22_000 and opened == files
    opened.clear()
    some = fsutil.Prefetcher(files, budget=12_000)
    some._thread.join(10)
    assert some.left == 0 and opened == files[:2]  # 10 000 bytes of a, 2 000 of b, nothing of c


def test_prefetcher_stops_when_told(tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil.Prefetcher, "PIECE", 1)  # a byte per read: 4 MiB take far longer than the test
    big = tmp_path / "big"
    big.write_bytes(bytes(4 << 20))
    prefetcher = fsutil.Prefetcher([big], budget=1 << 30)
    prefetcher.stop()
    prefetcher._thread.join(10)
    assert not prefetcher._thread.is_alive() and prefetcher.left > (1 << 30) - (4 << 20)


def test_prefetcher_errors_end_it_quietly(tmp_path, monkeypatch):
    escaped = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    prefetcher = fsutil.Prefetcher([tmp_path / "missing", tmp_path], budget=1 << 30)
    prefetcher._thread.join(10)
    prefetcher.stop()
    assert not prefetcher._thread.is_alive() and prefetcher.left == 1 << 30 and not escaped


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux only")
def test_available_memory_is_what_the_kernel_says():
    with open("/proc/meminfo") as meminfo:
        kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
    assert abs(fsutil.available_memory() - kib * 1024) < 256 << 20  # memory moves a little between the two reads


def test_read_ahead_asks_for_pieces_a_bounded_distance_past_the_reader(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(bytes(10_000))
    asked = []
    monkeypatch.setattr(fsutil.ReadAhead, "DISTANCE", 4000)
    monkeypatch.setattr(fsutil.ReadAhead, "PIECE", 1000)
    with open(path, "rb") as f:
        ahead = fsutil.ReadAhead(f.fileno())
        monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: asked.append((offset, length, advice)))
        ahead.before(0)
        assert asked == [(o, 1000, os.POSIX_FADV_WILLNEED) for o in (0, 1000, 2000, 3000)]
        asked.clear()
        ahead.before(500)  # still covered up to 4000; asks for the piece that reaches 4500
        assert [o for o, _, _ in asked] == [4000]
        asked.clear()
        ahead.before(9500)  # skipped ahead: nothing behind the reader, nothing past the end of the file
        assert [o for o, _, _ in asked] == [9500]
        asked.clear()
        ahead.before(9900)
        assert asked == []


def test_free_space_is_not_checked_where_a_filesystem_has_no_capacity(tmp_path, monkeypatch):
    """/proc and /sys report 0 bytes of 0: refusing there as 'disk full' would be false; the write says why."""
    import shutil as sh

    from loraops import fsutil
    from loraops.errors import DiskSpaceError

    monkeypatch.setattr(sh, "disk_usage", lambda path: sh._ntuple_diskusage(0, 0, 0))
    fsutil.ensure_free_space(tmp_path, 10**12, "out")
    monkeypatch.setattr(sh, "disk_usage", lambda path: sh._ntuple_diskusage(100, 90, 10))
    with pytest.raises(DiskSpaceError, match="not enough free disk for out"):
        fsutil.ensure_free_space(tmp_path, 11, "out")


@pytest.mark.parametrize("is_dir", [False, True])
def test_an_output_through_a_missing_folder_and_dotdot_creates_only_the_output(tmp_path, is_dir):
    """`-o a/../b` means b (as `a` would, were it there): nothing but b is made, an existing b is refused without
    --force; through a symlink, `link/..` is the link target's parent, as the kernel reads it."""
    def write(output, **kwargs):
        with fsutil.atomic_path(output, is_dir=is_dir, **kwargs) as tmp:
            (tmp / "f" if is_dir else tmp).write_bytes(b"x")

    write(tmp_path / "a" / ".." / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    with pytest.raises(fsutil.ConflictError, match="already exists"):
        write(tmp_path / "a" / ".." / "b")
    write(tmp_path / "a" / ".." / "b", force=True)
    write(tmp_path / "new" / "x" / ".." / "c")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.iterdir()) == ["b", "new"]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["c"]
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    write(tmp_path / "link" / ".." / "d")
    assert (tmp_path / "real" / "d").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("output", ["", ".", "./", "/", "..", "../", "sub/..", "sub/../..", "/.."])
def test_an_output_that_names_no_file_of_its_own_is_refused(tmp_path, monkeypatch, output):
    """Not even with --force: `-o ..` replaced the folder holding the current one, with everything in it, by the
    output (`cp x ..` writes into it); '.' and '/' have no sibling to write into."""
    work = tmp_path / "top" / "work"
    (work / "sub").mkdir(parents=True)
    (tmp_path / "top" / "keep").write_bytes(b"x")
    monkeypatch.chdir(work)
    with pytest.raises(fsutil.InvalidInputError, match=f"^{re.escape(repr(output))}: names no file or folder"):
        with fsutil.atomic_path(output, force=True) as tmp:
            tmp.write_bytes(b"x")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "top", "top/keep", "top/work", "top/work/sub"]


def test_a_dash_output_is_refused_as_no_stdout(tmp_path, monkeypatch):
    """`-o -` wrote a file (or a folder) named '-' in the current folder, where `-` means standard output to every
    other tool (kohya's, safetensors-cli's, tar); a longer path still names a file called '-' (not './-', which
    pathlib makes '-')."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(fsutil.InvalidInputError, match=r"^'-': loraops writes no output to standard output"):
        with fsutil.atomic_path("-") as tmp:
            tmp.write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []
    with fsutil.atomic_path(tmp_path / "-") as tmp:
        tmp.write_bytes(b"x")
    assert (tmp_path / "-").read_bytes() == b"x"


def test_chunks_and_sha256_file_read_through_one_reused_buffer(tmp_path):
    import hashlib

    from loraops.fsutil import chunks, sha256_file

    data = bytes(range(256)) * ((8 << 20) // 256 * 2 + 3)  # two full buffers and a bit
    path = tmp_path / "f"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, start=1000) == hashlib.sha256(data[1000:]).hexdigest()
    with open(path, "rb", buffering=0) as f:
        f.seek(5)
        assert b"".join(bytes(c) for c in chunks(f, 20, bytearray(8))) == data[5:25]  # 8 + 8 + 4
        assert sum(len(c) for c in chunks(f)) == len(data) - 25


@pytest.mark.parametrize("old", ["file", "folder", "dangling link"])
@pytest.mark.parametrize("is_dir", [False, True], ids=["file", "folder"])
def test_force_replaces_a_file_by_a_folder_and_back(tmp_path, old, is_dir):
    """rename(2) puts no folder over a file: `merge`/`extract`/`resize -o FILE --force` of a PEFT folder ended in
    'error: FILE: Not a directory' (the file kept, the work lost)."""
    out = tmp_path / "out"
    if old == "file":
        out.write_bytes(b"old")
    elif old == "folder":
        out.mkdir()
        (out / "inside").write_bytes(b"old")
    else:
        out.symlink_to(tmp_path / "nowhere")
    with fsutil.atomic_path(out, force=True, is_dir=is_dir) as tmp:
        (tmp / "new" if is_dir else tmp).write_bytes(b"new")
    assert (out / "new" if is_dir else out).read_bytes() == b"new" and not out.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("after", [1, 2], ids=["the old one went aside", "the new one took its place"])
def test_a_ctrl_c_as_force_swaps_a_folder_leaves_the_new_one_in_place(tmp_path, monkeypatch, after):
    """--force over a folder moves the old one aside, then the new one in: a Ctrl-C between the two renames left no
    output under the name (the old one a temp sibling, which the next run to it removes; "nothing was written").
    The swap is one step now; the Ctrl-C comes once the new output is in place, and the old one is not left beside
    it."""
    import signal

    out = tmp_path / "out"
    out.mkdir()
    (out / "inside").write_bytes(b"old")
    renames, real = [], os.replace

    def replace(*args):
        real(*args)
        renames.append(args)
        if len(renames) == after:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with fsutil.atomic_path(out, force=True, is_dir=True) as tmp:
            (tmp / "new").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "new").read_bytes() == b"new"


@pytest.mark.parametrize("is_dir", [False, True], ids=["file", "folder"])
def test_keep_name_stages_the_output_under_its_own_name(tmp_path, is_dir):
    """What reads the output's name before the rename (a registration) sees the name it will have; messages about
    the staged path name the output."""
    out = tmp_path / "out.safetensors"
    with fsutil.atomic_path(out, is_dir=is_dir, keep_name=True) as tmp:
        assert tmp.name == out.name and tmp.parent.name.startswith(fsutil.TMP_MARK)
        assert fsutil.user_path(tmp / "f" if is_dir else tmp) == str(out / "f" if is_dir else out)
        (tmp / "f" if is_dir else tmp).write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


@pytest.mark.parametrize("is_dir", [False, True], ids=["file", "folder"])
def test_a_ctrl_c_as_the_kept_name_holder_goes_leaves_no_sibling(tmp_path, monkeypatch, is_dir):
    """The empty holder of a keep_name output was removed after the block that cleans up: a Ctrl-C landing there (the
    output written, export's or combine -o's) left `.loraops-tmp-out.<hex>` beside it, which only a SIGKILL may."""
    from pathlib import Path

    rmdir = Path.rmdir

    def interrupted(self):
        if self.name.startswith(fsutil.TMP_MARK):
            raise KeyboardInterrupt  # (where a pending SIGINT is raised, as the holder goes)
        rmdir(self)

    monkeypatch.setattr(Path, "rmdir", interrupted)
    out = tmp_path / "out.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with fsutil.atomic_path(out, is_dir=is_dir, keep_name=True) as tmp:
            (tmp / "f" if is_dir else tmp).write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    assert (out / "f" if is_dir else out).read_bytes() == b"new"


def test_json_with_a_lone_surrogate_escape_is_refused_in_one_line(tmp_path):
    """"\\udcff" is JSON that json.loads reads, but no Unicode text: an adapter_config.json's base_model_name_or_path
    holding one was a UnicodeEncodeError traceback from the database driver at `register` (asked for that base)."""
    path = tmp_path / "adapter_config.json"
    path.write_text('{"base_model_name_or_path": "\\udcff/models/llama", "r": 4}')
    with pytest.raises(fsutil.FormatError, match=r"adapter config holds text that is not Unicode \('.*udcff/models"):
        fsutil.read_json(path, "adapter config")


@pytest.mark.parametrize("is_dir, keep_name", [(False, False), (True, False), (False, True)])
def test_an_output_name_the_filesystem_takes_is_written_however_long(tmp_path, is_dir, keep_name):
    """A name of 234–255 bytes is one the filesystem takes, but its temporary sibling's (.loraops-tmp-NAME.xxxxxxxx)
    was not: `-o` with it was "File name too long". The sibling's name is shortened to fit; what is staged under
    the output's own name (keep_name) is still shown as the output, and a killed run's sibling is still found."""
    out = tmp_path / ("é" * 90 + "x" * 50 + ".safetensors")  # 152 characters, 242 bytes
    assert len(os.fsencode(out.name)) == 242
    with fsutil.atomic_path(out, is_dir=is_dir, keep_name=keep_name) as tmp:
        assert len(os.fsencode(tmp.parent.name if keep_name else tmp.name)) <= 255
        assert fsutil.user_path(tmp) == str(out) if keep_name else str(out).startswith(fsutil.user_path(tmp))
        (tmp / "f").write_bytes(b"x") if is_dir else tmp.write_bytes(b"x")
    assert out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    stale = fsutil.temp_sibling(out)
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    assert fsutil.remove_stale_temps(out) == [stale] and not stale.exists()


@pytest.mark.parametrize("is_dir, keep_name", [(False, False), (True, False), (False, True), (True, True)])
def test_a_write_to_an_output_removes_what_a_killed_run_to_it_left(tmp_path, is_dir, keep_name):
    """Every output (combine/resize/extract/export -o as merge's) is written through atomic_path, which removes the
    temp siblings a killed run to the same output left (idle 5 minutes); a recent one may be a live run's: kept."""
    out = tmp_path / "out"
    killed, live = fsutil.temp_sibling(out), fsutil.temp_sibling(out)
    (killed / "out").mkdir(parents=True)
    os.utime(killed / "out", (0, 0)), os.utime(killed, (0, 0))
    live.write_bytes(b"x")
    with fsutil.atomic_path(out, is_dir=is_dir, keep_name=keep_name) as tmp:
        (tmp / "f").write_bytes(b"x") if is_dir else tmp.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name])


@pytest.mark.parametrize("out_name, other_name", [("m[1]", "m1"), ("m*", "mx"), ("x", "x.safetensors"),
                                                  ("x.safetensors", "x.safetensors.bak")])
def test_stale_temps_of_another_output_are_left_alone(tmp_path, out_name, other_name):
    """The cleanup before a write removes what a killed run to *this* output left: not the temporary sibling of an
    output whose name a glob would match (a name with [ ] * ? in it, or this one plus a suffix)."""
    stale = fsutil.temp_sibling(tmp_path / out_name)
    other = fsutil.temp_sibling(tmp_path / other_name)
    for path in (stale, other):
        path.write_bytes(b"x")
        os.utime(path, (0, 0))
    assert fsutil.remove_stale_temps(tmp_path / out_name) == [stale]
    assert other.exists() and not stale.exists()


@pytest.mark.parametrize("atomic", [True, False])
@pytest.mark.parametrize("is_dir", [False, True])
def test_an_output_another_run_landed_meanwhile_is_refused_not_replaced(tmp_path, monkeypatch, is_dir, atomic):
    """Two runs writing the same new output (no --force) both passed the check at their start; the later one's
    rename replaced the earlier one's output (a folder was moved aside), and both said they wrote it. The later one
    is refused now, its temporary removed, the other's output untouched: atomically by renameat2 RENAME_NOREPLACE,
    or (``atomic`` False: no such call) by a check just before the rename."""
    from loraops.errors import ConflictError

    if not atomic:
        monkeypatch.setattr(fsutil.ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    output = tmp_path / ("out" if is_dir else "out.safetensors")
    with pytest.raises(ConflictError, match=f"^{output}: already exists \\(use --force to replace it\\)$"):
        with fsutil.atomic_path(output, is_dir=is_dir) as tmp:
            (tmp / "model.safetensors" if is_dir else tmp).write_bytes(b"mine")
            if is_dir:  # the other run lands first
                output.mkdir()
                (output / "model.safetensors").write_bytes(b"theirs")
            else:
                output.write_bytes(b"theirs")
    assert (output / "model.safetensors" if is_dir else output).read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name]
    with fsutil.atomic_path(tmp_path / "new", is_dir=True) as tmp:  # (a new output still lands)
        (tmp / "x").write_bytes(b"x")
    assert (tmp_path / "new" / "x").read_bytes() == b"x"
