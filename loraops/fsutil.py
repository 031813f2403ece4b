"""Atomic outputs: everything loraops writes goes to a temporary sibling and is renamed into place at the end,
so an interrupted run (Ctrl-C, SIGKILL, a full disk) never leaves a half-written file or folder."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from .errors import ConflictError, DiskSpaceError, InvalidInputError

TMP_MARK = ".loraops-tmp-"


def temp_sibling(path: Path) -> Path:
    return path.with_name(f"{TMP_MARK}{path.name}.{uuid.uuid4().hex[:8]}")


def refuse_existing(path: str | Path, force: bool = False) -> None:
    """Raise ConflictError when ``path`` exists and ``force`` is not set, InvalidInputError when its folder cannot
    be made because a file is in the way (also usable before a long computation)."""
    path = Path(path)
    if path.exists() and not force:
        raise ConflictError(f"{path}: already exists (use --force to replace it)")
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise InvalidInputError(f"{path}: cannot be written, {above} is not a folder")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, force: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write into; on success it replaces ``path`` (refused when ``path``
    exists unless ``force``); on any error it is removed. For folders, the temp folder is created for you."""
    path = Path(path)
    refuse_existing(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            if path.is_dir() and not path.is_symlink():
                old = temp_sibling(path)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        remove(tmp)
        raise


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


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                with open(child, "rb+") as f:
                    os.fsync(f.fileno())
        fsync_dir(path)
    elif path.exists():
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


def ensure_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse up front when ``folder``'s filesystem has less than ``needed`` bytes free."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DiskSpaceError(
            f"{folder}: not enough free disk for {what} ({needed / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free)"
        )


def sha256_file(path: Path, *, start: int = 0, progress=None) -> str:
    """sha256 of a file's bytes from ``start``; ``progress`` (a tqdm-like object) is advanced per chunk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(8 << 20):
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
    for tmp in path.parent.glob(f"{TMP_MARK}{path.name}.*") if path.parent.exists() else []:
        entries = [tmp, *tmp.rglob("*")] if tmp.is_dir() else [tmp]
        try:
            newest = max(e.stat().st_mtime for e in entries)
        except OSError:
            continue
        if newest <= cutoff:
            remove(tmp)
            removed.append(tmp)
    return removed
