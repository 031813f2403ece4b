"""Atomic outputs: everything loraops writes goes to a temporary sibling and is renamed into place at the end,
so an interrupted run (Ctrl-C, SIGKILL, a full disk) never leaves a half-written file or folder."""
from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import functools
import glob
import hashlib
import json
import mmap
import os
import shutil
import stat
import sys
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import ConflictError, DiskSpaceError, FormatError, InvalidInputError, NotFoundError

TMP_MARK = ".loraops-tmp-"


def resolved(path: str | Path) -> Path:
    """Path.resolve(), without its RuntimeError on a symlink loop (Python before 3.13): the loop is left in the
    path for the open or the existence check that follows to report as the user's bad path."""
    return Path(os.path.realpath(path))


def path_exists(path: str | Path) -> bool:
    """Path.exists(), and False for text no file can be named (a part longer than the file system takes:
    ENAMETOOLONG), as for a missing one: a reference that may be a path or a registry name is then read as a name.
    Empty text names no file either, though Path('') is the current folder: `loraops merge ''` merged the adapter
    in the working folder."""
    if not str(path):
        return False
    try:
        return Path(path).exists()
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return False
        raise


def existing_path(path: str | Path) -> Path:
    """``path`` as a Path, or NotFoundError when it names nothing ('' included), for an argument that can only be a
    path: one no file can be named (ENAMETOOLONG) is the OS's error (OSError), not read as a missing file as
    path_exists reads it for a reference that may be a registry name."""
    if not str(path) or not Path(path).exists():
        raise NotFoundError(f"{path or repr(path)}: no such file or folder")
    return Path(path)


SMALL_FILE_LIMIT = 100 * 2**20
"""The most a file read whole may hold (a config.json, an index, a recipe): a safetensors header's own limit. The
largest real ones are a few MB (a many-expert MoE's index)."""


def read_small_file(path: str | Path, what: str, name: str | None = None) -> bytes:
    """The bytes of a file loraops reads whole (``what``: "model config", "recipe"…): a FIFO, socket or device there
    is refused before it is opened (a FIFO blocked forever, a link to /dev/zero filled memory), and so is a file over
    SMALL_FILE_LIMIT, each one FormatError line. ``name``: how the message names the file (default: its path).
    OSError where it cannot be read (missing, unreadable), for the caller to say."""
    name = name or str(path)
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise FormatError(f"{name}: not a regular file (a FIFO, a socket or a device), so no {what}")
    with open(path, "rb") as file:
        data = file.read(SMALL_FILE_LIMIT + 1)
    if len(data) > SMALL_FILE_LIMIT:
        raise FormatError(f"{name}: over {SMALL_FILE_LIMIT // 2**20} MiB, too large for a {what}")
    return data


def read_json(path: str | Path, what: str, *, name: str | None = None, refuse_surrogates: bool = True) -> dict:
    """The JSON object in a file of a model (its config.json, its safetensors index; one from the Hub): one line
    (FormatError) where it is unreadable, no JSON (also a number past Python's 4300-digit limit, or nesting past its
    recursion limit) or no object, or that holds a lone surrogate escape (refuse_lone_surrogates) unless
    ``refuse_surrogates`` is false (read_model_config). ``name``: how the message names the file (default: its
    path)."""
    name = name or str(path)
    try:
        data = json.loads(read_small_file(path, what, name).decode())
    except FormatError:  # (a ValueError, as the number-of-digits one below)
        raise
    except json.JSONDecodeError as exc:
        raise FormatError(f"{name}: {what} is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError:
        raise FormatError(f"{name}: {what} is not JSON (not UTF-8 text)") from None
    except ValueError:  # JSON has no bound on digits, Python's int() has (sys.get_int_max_str_digits)
        raise FormatError(f"{name}: {what} is not JSON (a number of more than {sys.get_int_max_str_digits()} "
                          "digits)") from None
    except RecursionError:
        raise FormatError(f"{name}: {what} is not JSON (nested deeper than Python's recursion limit)") from None
    except OSError as exc:
        raise FormatError(f"{name}: unreadable {what} ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{name}: {what} is not a JSON object")
    if refuse_surrogates:
        refuse_lone_surrogates(data, f"{name}: {what}")
    return data


def read_model_config(path: str | Path, *, name: str | None = None) -> dict:
    """A model's config.json (read_json), where a lone surrogate escape is no error: transformers loads one (its
    json reads it), and loraops stores none of a config's text (a merge writes it back escaped)."""
    return read_json(path, "model config", name=name, refuse_surrogates=False)


def refuse_lone_surrogates(data: object, where: str) -> None:
    """Refuse JSON that holds a lone surrogate escape ("\udcff"), which json reads but no database (nor the
    safetensors library) takes: one FormatError line starting with ``where`` ("FILE: what"), showing where it is."""
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise FormatError(f"{where} holds text that is not Unicode "
                          f"({exc.object[max(0, exc.start - 20):exc.end + 20]!r}: a lone surrogate escape)") from None


NAME_MAX = 255
"""The bytes a file name may have (Linux, macOS, Windows' 255 UTF-16 units)."""


def temp_stem(name: str) -> str:
    """The part of a temporary sibling's name that comes from its output's ``name``: the name itself, cut short
    where the sibling's name (mark, name, '.' and 8 hex digits) would exceed NAME_MAX bytes, so any name the file
    system takes can be written (a 242-byte name was "File name too long")."""
    room = NAME_MAX - len(TMP_MARK) - 9
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return name


def temp_sibling(path: Path) -> Path:
    return path.with_name(f"{TMP_MARK}{temp_stem(path.name)}.{uuid.uuid4().hex[:8]}")


def user_path(path: str | Path) -> str:
    """The path a user asked for, given a path that may be (or lie inside) one of our temporary siblings."""
    parts = list(Path(path).parts)
    for i, part in enumerate(parts):
        if part.startswith(TMP_MARK):
            name, rest = part[len(TMP_MARK):].rpartition(".")[0], parts[i + 1:]
            if rest and temp_stem(rest[0]) == name:  # the output under its own name inside its temp folder
                name, rest = rest[0], rest[1:]       # (atomic_path keep_name), which names it whole
            return str(Path(*parts[:i], name, *rest))
    return str(path)


def output_path(path: str | Path) -> Path:
    """Where an output given as ``path`` goes. With a '..' in it, its folder is resolved as the kernel would
    (symlinks followed), and a '..' after a folder that does not exist cancels it instead of making that folder:
    `-o a/../b` writes b and creates nothing else. Other paths are kept as given (so messages show them so).
    A path that names no file or folder of its own ('', '.', '/', one ending in '..') is refused: '.' and '/' have
    no sibling to write into (a ValueError traceback), and with --force `-o ..` replaced the folder holding the
    current one, both with all they held, by the output (meant, as `cp x ..` reads it, to go into it). '-' is
    refused too: it wrote a file named '-' where the user asked for standard output."""
    text, path = str(path), Path(path)
    if text == "-":  # standard output to other tools; an output here is files, never a stream
        raise InvalidInputError("'-': loraops writes no output to standard output; give the output's name (a path "
                                "that ends in /- for one called '-')")
    if path.name in ("", ".."):  # Path('') is Path('.'): the text tells them apart
        raise InvalidInputError(f"{text!r}: names no file or folder to write; give the output's own name "
                                "(e.g. ./merged)")
    if ".." not in path.parts:
        return path
    return Path(os.path.realpath(path.parent)) / path.name


def refuse_unrecordable(path: str | Path) -> None:
    """Refuse a path the registry cannot record: it records paths as UTF-8 text (SQLite's and PostgreSQL's), and a
    name with other bytes (a folder copied from an old Latin-1 system) was a UnicodeEncodeError traceback from the
    database driver, after a merge's output was already in place. Checked before any work."""
    try:
        str(path).encode()
    except UnicodeEncodeError:
        raise InvalidInputError(f"{path}: the path is not UTF-8 text, which the registry records paths as; rename "
                                "it") from None


def refuse_misnamed_output(output: str | Path, *, is_dir: bool, what: str, instead: str = "", own: str = "") -> None:
    """Refuse an output named as the other kind of thing than the one written there: a folder whose name ends in
    .safetensors (`merge --into FOLDER -o x.safetensors` made a folder of that name), or one file named as a folder,
    with a trailing '/' (`-o out/` made a file named out), or not named .safetensors. ``what`` is what is written (e.g. "a peft adapter"),
    ``instead`` an alternative the user has (", or --format kohya for one file"), ``own`` the suffix of the single
    file the output is made from, taken too (a base named .sft, as early FLUX releases were, which ComfyUI lists).
    Checked before anything is read."""
    text = str(output)
    if is_dir and Path(text).suffix.lower() == ".safetensors":
        raise InvalidInputError(f"{text}: {what} is a folder, not one .safetensors file; give a folder name{instead}")
    if not is_dir and text.endswith(("/", os.sep, "/.")):
        raise InvalidInputError(f"{text}: {what} is one file, not a folder; give a file name (…/name.safetensors)"
                                f"{instead}")
    # Refused, not renamed: the output is where the user said. Without the suffix the file was written as named, and
    # kohya's scripts, ComfyUI, A1111 and diffusers' single-file loaders list or read only .safetensors files.
    suffixes = dict.fromkeys([".safetensors", own.lower()] if own else [".safetensors"])
    if not is_dir and Path(text).suffix.lower() not in suffixes:
        raise InvalidInputError(f"{text}: {what} is one .safetensors file; give a name ending in "
                                f"{' or '.join(suffixes)}{instead}")


def refuse_existing(path: str | Path, force: bool = False) -> None:
    """Raise ConflictError when ``path`` exists and ``force`` is not set, InvalidInputError when it is what --force
    never replaces (refuse_replacing_surroundings) or its folder cannot be made because a file is in the way (also
    usable before a long computation)."""
    if not isinstance(force, bool):  # (force="no" replaced an output: it is truthy)
        raise InvalidInputError(f"force= takes True or False, not {force!r} ({type(force).__name__})", ["force"])
    path = output_path(path)
    if os.path.lexists(path):  # a dangling symlink or a symlink loop is there too
        if not force:
            raise ConflictError(f"{path}: already exists (use --force to replace it)")
        refuse_replacing_surroundings(path)
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise InvalidInputError(f"{path}: cannot be written, {above} is not a folder")


def refuse_replacing_surroundings(path: Path) -> None:
    """Refuse, even with --force, to replace the file system's root, the home folder, the current folder or a
    folder holding one of them: `-o ~/ --force` (a slip for `-o ~/merged`) or `-o /work --force` run from
    /work/project replaced everything under it with one model. Compared by stat identity, so another name for the
    same folder (a symlinked path, another case on macOS) is caught too; the output itself is lstat'ed, since
    replacing a symlink that points at home replaces only the link."""
    try:
        found = os.lstat(path)
    except OSError:
        return
    itself = found.st_dev, found.st_ino
    for name, folder in (("the home folder", os.path.expanduser("~")), ("the current folder", _cwd())):
        if folder is None:
            continue
        for above in (Path(folder), *Path(folder).parents):
            if _identity(str(above)) == itself:
                what = name if above == Path(folder) else f"a folder holding {name} ({folder})"
                raise InvalidInputError(f"{path}: is {what}; `force=True` will not replace it, give the output its "
                                        "own name (e.g. ./merged)", names=["force"])


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the current folder was removed: nothing there to protect
        return None


def refuse_overlap(output: str | Path, protected: str | Path, what: str) -> None:
    """Refuse, even with --force, an output that is, holds or lies inside ``protected`` (a model being read, the
    registry's blob store): replacing it would destroy what the command reads or what the registry keeps."""
    refuse_overlaps(output, [(protected, what)])


def refuse_overlaps(output: str | Path, protected: Iterable[tuple[str | Path, str]],
                    hint: str = "write the output elsewhere") -> None:
    """refuse_overlap for many (path, what) at once, the output resolved once. By name, and by stat: the same folder
    under another name, which realpath does not tell (another case on APFS, macOS's default, or a bind mount). The
    output's folders are stat'ed once and every folder once (a registry's thousands of bases share theirs): walking
    each path's folders doubled the time the by-name check took for 5,000 bases."""
    out = resolved(output_path(output))
    identity = functools.cache(_identity)
    around = {identity(str(above)) for above in (out, *out.parents)} - {None}
    itself = identity(str(out))
    for path, what in protected:
        keep = resolved(path)
        if (keep.is_relative_to(out) or out.is_relative_to(keep) or identity(str(keep)) in around
                or itself is not None and itself in map(identity, map(str, keep.parents))):
            raise InvalidInputError(f"{output}: overlaps {what} ({path}); {hint}")


def _identity(path: str) -> tuple[int, int] | None:
    """What os.path.samestat compares; None where nothing is there (nothing to destroy)."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


@contextlib.contextmanager
def atomic_path(path: str | Path, *, force: bool = False, is_dir: bool = False,
                keep_name: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write into; on success it replaces ``path`` (refused when ``path``
    exists unless ``force``); on any error, raised in the block or by the rename, it is removed and an old ``path``
    is left as it was. For folders, the temp folder is created for you. The output goes to output_path(path).
    ``keep_name``: what is yielded has ``path``'s own name, inside a temporary sibling folder: for what reads the
    name (a registration, which the block runs before the rename, so the output lands only if it commits)."""
    path = output_path(path)
    refuse_existing(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)  # what a killed earlier run to this output left (merge's did this alone)
    holder = temp_sibling(path)
    tmp = holder / path.name if keep_name else holder
    replaced = None  # the old output, once the new one took its place
    try:  # from the mkdir on: a Ctrl-C right after it must not leave the folder
        if keep_name:
            holder.mkdir()
        if is_dir:
            tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        if not force:  # (what another run landed there meanwhile is refused, as it was at the start, not replaced)
            rename_new(tmp, path)
        elif os.path.lexists(path) and (is_dir or (path.is_dir() and not path.is_symlink())):
            from .landing import interrupts_deferred

            # rename(2) puts no folder over a file (ENOTDIR: --force over a file failed) nor over a folder: the
            # old one goes aside first, and comes back if the new one cannot take its place. One step for a Ctrl-C:
            # one between the renames left no output under the name, the old one a temp sibling the next run removes
            old = temp_sibling(path)
            with interrupts_deferred():
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old, path)
                    raise
                replaced = old
            remove(replaced)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
        if keep_name:  # in the block: a Ctrl-C landing here (after it) left the empty holder beside the output
            with contextlib.suppress(OSError):
                holder.rmdir()
    except BaseException:
        remove(holder)
        if replaced is not None:  # (a Ctrl-C once the new output landed: the old one is not left beside it)
            remove(replaced)
        raise


RENAME_NOREPLACE = 1


def rename_new(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, which must not exist: ConflictError (refuse_existing's) where it does. Two runs
    writing the same new output both passed the check at their start, and the later rename replaced the earlier's
    output, both saying they wrote it. Atomic where the kernel and file system can (renameat2 RENAME_NOREPLACE: Linux
    3.15+, ext4, xfs, btrfs, tmpfs); elsewhere (another OS, a file system that refuses the flag) checked just before
    the rename, which narrows the race to that moment."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_cwd = -100
        if renameat2(at_cwd, os.fsencode(source), at_cwd, os.fsencode(target), RENAME_NOREPLACE) == 0:
            return
        error = ctypes.get_errno()
        if error == errno.EEXIST:
            refuse_existing(target)
        if error not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # (unsupported here: the fallback below)
            raise OSError(error, os.strerror(error), str(source), None, str(target))
    refuse_existing(target)
    os.rename(source, target)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on ``path`` (created if missing, left in place), across processes and,
    on NFSv4 and most shared filesystems, machines. A waiter wakes the moment it is free. No-op without fcntl
    (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_REFUSED = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY}  # (F_FULLFSYNC not taken)


def sync(fd: int, *, data: bool = False) -> None:
    """fsync ``fd`` (``data``: its bytes and size only, fdatasync, where there is one: not on macOS). macOS's fsync
    leaves the bytes in the drive's own cache, which a power loss empties, and the rename that follows can land
    first: F_FULLFSYNC flushes that cache too (where the file system takes it; some network ones refuse it)."""
    try:
        import fcntl
    except ImportError:  # (Windows)
        fcntl = None
    if hasattr(fcntl, "F_FULLFSYNC"):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError as exc:  # only a refusal falls back: after an EIO, an fsync may report nothing, bytes lost
            if exc.errno not in _REFUSED:
                raise
    (os.fdatasync if data and hasattr(os, "fdatasync") else os.fsync)(fd)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # (a folder's fsync is refused by some file systems: nothing to flush there)
        fd = os.open(path, os.O_RDONLY)
        try:
            sync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                with open(child, "rb+") as f:
                    sync(f.fileno())
        fsync_dir(path)
    elif path.exists():
        with open(path, "rb+") as f:
            sync(f.fileno())


def human_bytes(count: float, places: int = 1) -> str:
    """A byte count in binary units: "512 B", "1.5 GiB" (``places`` decimals; 2 reads like torch's own messages)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.{places}f} {unit}"
        count /= 1024


@contextlib.contextmanager
def disk_named(folder: str | Path) -> Iterator[None]:
    """A write that fills the disk names no file (OSError ENOSPC, "No space left on device"): say which disk, as one
    DiskSpaceError line (exit 5) naming ``folder``, where the result was going."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC or isinstance(exc, DiskSpaceError):
            raise
        raise DiskSpaceError(f"{folder}: not enough free disk for the result ({exc.strerror})") from None


def ensure_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse up front when ``folder``'s filesystem has less than ``needed`` bytes free."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    if usage.total == 0:  # no capacity to speak of (/proc, /sys): the write itself will say why it cannot
        return
    free = usage.free
    if free < needed:
        raise DiskSpaceError(
            f"{folder}: not enough free disk for {what} ({human_bytes(needed, 2)} needed, {human_bytes(free, 2)} free)"
        )


class DirectFileWriter:
    """Writes a new file front to back, bypassing the page cache (O_DIRECT) where the filesystem allows it.

    Why: a merged model is written once and not read back. Through the page cache every byte is copied into freshly
    allocated cache pages and written back later; on a 2-core VM that kernel work cost more CPU than the merge's
    arithmetic (2 GiB: 2.3–8 s of system time buffered + fdatasync, 0.2 s direct; dd showed the same). Direct writes
    go from our buffers to the device, and leave the page cache (the user's other files) alone.

    The same holds for every large file loraops writes and fsyncs at once: stored adapter copies and written adapters
    (a 414 MB adapter: 0.6–2.8 s buffered on this VM, run to run, against 0.3 s direct). ``direct`` None: as
    settings.direct_io() says (LORAOPS_DIRECT_IO=0 turns it off).

    O_DIRECT needs block-aligned buffers, offsets and lengths, so bytes are staged in page-aligned buffers: one fills
    while the others are written by helper threads. The tail is written padded to a block and the file then
    truncated to its true size. Where O_DIRECT is refused (tmpfs, some network filesystems, macOS) the same code
    writes through the page cache."""

    ALIGN = 4096
    IN_FLIGHT = 2
    """Writes in flight (pwrite at their offsets), so the device always has the next one queued. On this VM's virtio
    disk 1, 2 and 3 were within noise (8 GB merge, best of 5: 7.08, 7.01, 6.67 s)."""
    STAGE = 8 << 20
    """Measured on the 1.1B merge: 8 MiB stages as fast as 16 MiB (1.95 s against 1.92 s, best of 4), 4 MiB slower."""

    def __init__(self, path: Path, *, direct: bool | None = None, scratch: bool = False) -> None:
        """``scratch``: a file with no name in the folder ``path`` (O_TMPFILE where the filesystem has it, else one
        unlinked as soon as it is made), for data read back before the process ends: nothing of it outlives the
        process, even a SIGKILL. ``close(keep_open=True)`` then leaves it readable at ``fd``."""
        from . import settings

        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = (settings.direct_io() if direct is None else direct) and hasattr(os, "O_DIRECT")
        self.fd = -1
        if scratch:
            import tempfile

            with tempfile.TemporaryFile(dir=path, prefix=TMP_MARK) as handle:
                self.fd = os.dup(handle.fileno())
            self.direct = self.direct and _set_direct(self.fd, True)
        elif self.direct:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError:
                self.direct = False
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o644)
        self.size = 0
        self._stages = [mmap.mmap(-1, self.STAGE) for _ in range(self.IN_FLIGHT + 1)]
        self._stage = self._stages[0]
        self._free = self._stages[1:]
        self._fill = 0
        self._flushed = 0  # file offset where the stage being filled starts
        self._pending: collections.deque[tuple[mmap.mmap, Future]] = collections.deque()
        self._flusher = ThreadPoolExecutor(self.IN_FLIGHT, thread_name_prefix="loraops-flush")

    def write(self, data: memoryview) -> None:
        data = memoryview(data).cast("B")
        while data:
            n = min(len(data), self.STAGE - self._fill)
            self._stage[self._fill : self._fill + n] = data[:n]
            self._advance(n)
            data = data[n:]

    def copy_from(self, fd: int, offset: int, nbytes: int, on_data: Callable[[memoryview], None] | None = None, *,
                  before: Callable[[int], None] | None = None) -> None:
        """Append ``nbytes`` of ``fd`` from ``offset``, read straight into the stage; ``on_data`` sees each piece,
        ``before`` (ReadAhead.before) is told each offset before it is read."""
        while nbytes:
            if before is not None:
                before(offset)
            # released however this ends: an exported view of a stage would keep abandon() from closing it
            with memoryview(self._stage)[self._fill : self._fill + min(nbytes, self.STAGE - self._fill)] as view:
                got = os.preadv(fd, [view], offset)
                if got == 0:
                    raise EOFError(offset)
                if on_data is not None:
                    on_data(view[:got])
            self._advance(got)
            offset += got
            nbytes -= got

    def close(self, *, keep_open: bool = False) -> None:
        """Write what is staged, truncate to the true size, make it durable (sync) and close. ``keep_open`` (a scratch
        file): no sync, and the file stays open at ``fd``, read at any offset (through the page cache), until
        ``abandon``."""
        try:
            if self._fill:
                tail = self._fill
                padded = -(-tail // self.ALIGN) * self.ALIGN if self.direct else tail
                self._stage[tail:padded] = bytes(padded - tail)
                self._fill = padded
                self._flush()
            self._wait(0)
            os.ftruncate(self.fd, self.size)  # drops the tail's padding
            if keep_open:
                if self.direct:  # reads at any offset from here
                    _set_direct(self.fd, False)
                    self.direct = False
                return
            sync(self.fd, data=True)
        except BaseException:
            self.abandon()
            raise
        self.abandon()

    def abandon(self) -> None:
        """Close without finishing (after an error); what was written stays, the caller removes it."""
        if self.fd >= 0:
            with contextlib.suppress(Exception):
                self._wait(0)
            self._flusher.shutdown(wait=True)
            os.close(self.fd)
            self.fd = -1
            for stage in self._stages:
                stage.close()

    def _advance(self, n: int) -> None:
        self._fill += n
        self.size += n
        if self._fill == self.STAGE:
            self._flush()

    def _flush(self) -> None:
        self._wait(self.IN_FLIGHT - 1)
        future = self._flusher.submit(self._write_block, self._stage, self._fill, self._flushed)
        self._pending.append((self._stage, future))
        self._flushed += self._fill
        self._stage = self._free.pop()
        self._fill = 0

    def _wait(self, in_flight: int) -> None:
        """Wait until at most ``in_flight`` writes are pending (their stages are free again)."""
        while len(self._pending) > in_flight:
            stage, future = self._pending.popleft()
            self._free.append(stage)
            future.result()

    def _write_block(self, stage: mmap.mmap, n: int, offset: int) -> None:
        view = memoryview(stage)[:n]
        try:
            while view:
                try:
                    written = os.pwrite(self.fd, view, offset)
                except OSError as exc:
                    import errno

                    if not (self.direct and exc.errno == errno.EINVAL):
                        raise
                    # A device whose blocks are larger than ALIGN: carry on through the page cache.
                    _set_direct(self.fd, False)
                    self.direct = False
                    continue
                view = view[written:]
                offset += written
        finally:
            view.release()


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for an open file; whether that was done (not where the filesystem refuses it)."""
    import fcntl

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        return False
    return True


class Prefetcher:
    """Reads ``files`` in order into the page cache from a background thread, up to ``budget`` bytes (default: a
    quarter of the memory available, so what is read ahead is still cached when it is used), until stop(). A merge
    starts one as soon as it knows its base and stops it when its own reading starts: the disk works while the
    process starts up (importing torch alone takes ~1 s, and nothing can be computed before it), on a core that
    would be idle. Real reads into a scratch buffer (with a ReadAhead in front), not WILLNEED alone: those return at
    once, so a loop of them would run through the files with no bound on how far it got. Advisory: a read error
    just ends it (the merge's own read reports it); where the available memory is unknown it reads nothing."""

    PIECE = 16 << 20

    def __init__(self, files: list[Path], budget: int | None = None) -> None:
        self.left = available_memory() // 4 if budget is None else budget
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(list(files),), name="loraops-prefetch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Returns at once: the thread ends after the read it is in (waiting for it could cost seconds on a slow
        network filesystem, for nothing)."""
        self._stop.set()

    def _run(self, files: list[Path]) -> None:
        scratch = mmap.mmap(-1, self.PIECE)
        try:
            for file in files:
                with open(file, "rb", buffering=0) as f:
                    ahead = ReadAhead(f.fileno())
                    while self.left > 0 and not self._stop.is_set():
                        ahead.before(f.tell())
                        n = f.readinto(memoryview(scratch)[: min(self.PIECE, self.left)])
                        if not n:
                            break
                        self.left -= n
                if self.left <= 0 or self._stop.is_set():
                    return
        except OSError:
            pass
        finally:
            scratch.close()


class ReadAhead:
    """Keeps the kernel reading a file a bounded distance ahead of a sequential reader (posix_fadvise SEQUENTIAL, then
    WILLNEED, asynchronous). The kernel's own readahead keeps about one window in flight (read_ahead_kb: 128 KiB by default,
    8 MiB on the dev VM's disk), refilled as the reader reaches it; asking for the next DISTANCE bytes keeps the
    device busy while the reader copies. Measured on the dev VM, 2.2 GB read cold in 8 MiB preads: 2.1 s → 1.2 s,
    and half the reader's CPU time; with the file cached, ~0.02 s more per 2.2 GB. Pieces, because the kernel caps
    one WILLNEED at the device's readahead size."""

    DISTANCE = 32 << 20
    PIECE = 2 << 20

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size, self.asked = 0, 0
        if hasattr(os, "posix_fadvise"):  # elsewhere there is nothing to ask
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # the kernel's own window, doubled
            self.size = os.fstat(fd).st_size

    def before(self, offset: int) -> None:
        """Called before reading at ``offset``: every piece up to DISTANCE past it has been asked for."""
        self.asked = max(self.asked, offset)
        end = min(self.size, offset + self.DISTANCE)
        while self.asked < end:
            os.posix_fadvise(self.fd, self.asked, self.PIECE, os.POSIX_FADV_WILLNEED)
            self.asked += self.PIECE


def copy_file(src: Path, dst: Path, on_data: Callable[[memoryview], None] | None = None) -> None:
    """Copy ``src`` to a new ``dst``, each chunk given to ``on_data`` as it is written (to hash the bytes written),
    with direct writes (DirectFileWriter) and the source read ahead (ReadAhead: a file loraops has just written
    bypassed the page cache too). EOFError when ``src`` shrinks meanwhile; on any error, what was written of ``dst``
    stays: the caller removes it (it writes into a temp path)."""
    fd = os.open(src, os.O_RDONLY)
    try:
        out = DirectFileWriter(dst)
        try:
            out.copy_from(fd, 0, os.fstat(fd).st_size, on_data, before=ReadAhead(fd).before)
            out.close()
        except BaseException:
            out.abandon()
            raise
    finally:
        os.close(fd)


def available_memory() -> int:
    """Bytes of memory available without swapping (Linux MemAvailable; free pages elsewhere; 0 when unknown)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def chunks(handle, nbytes: int | None = None, buffer: bytearray | None = None) -> Iterator[memoryview]:
    """The next ``nbytes`` (default: all that is left) of an unbuffered binary file, 8 MiB at a time into one
    reused buffer: use each chunk before asking for the next. A fresh 8 MiB object per read (``f.read``) cost more
    system time than hashing the bytes (2 GiB: 0.9–3.2 s against 0.4 s)."""
    view = memoryview(buffer if buffer is not None else bytearray(8 << 20))
    while nbytes is None or nbytes > 0:
        got = handle.readinto(view if nbytes is None else view[:min(nbytes, len(view))])
        if not got:
            return
        yield view[:got]
        if nbytes is not None:
            nbytes -= got


def sha256_file(path: Path, *, start: int = 0, progress=None) -> str:
    """sha256 of a file's bytes from ``start``; ``progress`` (a tqdm-like object) is advanced per chunk."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        for chunk in chunks(f):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return digest.hexdigest()


def remove_stale_temps(path: str | Path, idle_s: float = 300) -> list[Path]:
    """Remove temp siblings of ``path`` left by killed runs (SIGKILL, power loss: no cleanup ran). A sibling counts
    as stale when nothing in it changed for ``idle_s`` seconds: a live run writes far more often than that."""
    import time

    path = Path(path)
    cutoff = time.time() - idle_s
    removed = []
    # temp_sibling's name exactly: a '.*' tail also took the siblings of outputs named this plus a suffix (x.bak's
    # for x)
    pattern = f"{TMP_MARK}{glob.escape(temp_stem(path.name))}.{'[0-9a-f]' * 8}"
    for tmp in path.parent.glob(pattern) if path.parent.exists() else []:
        entries = [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]
        try:
            newest = max(e.stat().st_mtime for e in entries)
        except OSError:
            continue
        if newest <= cutoff:
            remove(tmp)
            removed.append(tmp)
    return removed
