"""Content-addressed copies of adapter files, so the registry keeps working when the user deletes the originals.

Layout: ``<blobs_dir>/<sha[:2]>/<sha>/<file names as registered>`` where sha is the adapter's identity; a PEFT
folder is stored as its files (adapter_config.json + weights), a single file under its own name, so a stored
adapter reads exactly like the original. Each file is written to a temp sibling and renamed into place
(os.replace), so a crash leaves only temp files that `loraops gc` removes.

``<blobs_dir>/.stamps/<sha[:2]>/<sha>.json`` remembers, per stored file, its stat (inode, size, mtime and ctime in
ns: not the device, see _stat_of) when its bytes last hashed to the recorded sha256, so loading a stored adapter need
not hash it again (see unchanged, remember), and whether a load has checked its values under that stamp (see
mark_checked); a cache only: one missing, stale or unreadable means the file is hashed (and checked).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .. import settings
from ..errors import ConflictError
from ..fsutil import (TMP_MARK, copy_file, ensure_free_space, file_lock, fsync_dir, refuse_overlap, sha256_file, sync,
                      temp_sibling)


LOCKS = ".locks"
STAMPS = ".stamps"
STAMPS_LOCK = "stamps"  # (in LOCKS, beside the shards' locks, whose names are two hex digits)
# A stamp vouches for a file only when its mtime and ctime are older than the hash began by this much: a write in the
# same clock tick as the last one (a coarse file-system clock, a file server's clock behind ours) could leave both
# as they were; later writes cannot (ctime cannot be set back by a user, only by the system clock).
RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class StoredFile:
    name: str
    size: int
    sha256: str

    def as_dict(self) -> dict:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


class BlobStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else settings.blobs_dir()

    def refuse_output_inside(self, output: str | Path, database: Path | None = None) -> None:
        """An output that is, holds or lies inside the store could overwrite stored adapters: refused, even with
        --force (needs no database: a --no-record merge checks it too). So is one over the registry's SQLite
        ``database`` (default: settings'), or the files kept beside it: `-o …/registry.db --force` replaced the
        registry with an adapter, `-o …/registry.db.writer-lock --force` the writers' lock (every write then failed
        on it); and one over loraops' cache in the home (digests, Hub picks)."""
        refuse_overlap(output, self.root, "the registry's blob store")
        refuse_overlap(output, settings.home() / "cache", "loraops' cache")
        database = database or settings.sqlite_database()
        for name in (database.name, *(database.name + s for s in settings.SQLITE_SIDE_FILES)) if database else ():
            refuse_overlap(output, database.with_name(name), "the registry's database")

    def folder(self, identity: str) -> Path:
        return self.root / identity[:2] / identity

    def path(self, key: str) -> Path:
        """Absolute path of a stored adapter from its key (relative to the store root)."""
        return self.root / key

    def key(self, identity: str, entry: str | None) -> str:
        """The key of an adapter: its folder, or the file inside it when the adapter is one file."""
        folder = f"{identity[:2]}/{identity}"
        return f"{folder}/{entry}" if entry else folder

    def put(self, identity: str, files: Iterable[Path], progress=None, *, move: bool = False,
            known: dict[str, str] | None = None) -> list[StoredFile]:
        """Copy ``files`` (flat: by base name) into the identity's folder; returns what was stored, hashed while
        copying. ``progress`` is a tqdm-like object advanced per chunk. ``move``: files loraops wrote into
        ``scratch()`` (the same filesystem) are renamed into place instead of copied; ``known``: their sha256 by
        name, taken as loraops wrote them (formats.Written), so they are not read again."""
        files = list(files)
        folder = self.folder(identity)
        if not move:
            ensure_free_space(self.root, sum(f.stat().st_size for f in files), "the adapter's stored copy")
        folder.mkdir(parents=True, exist_ok=True)
        stored = []
        for src in files:
            if move:
                stored.append(_move(src, folder / src.name, progress, (known or {}).get(src.name)))
            else:
                stored.append(_copy(src, folder / src.name, progress))
        fsync_dir(folder)
        return stored

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """An exclusive lock (flock, so across processes and machines sharing the folder) on the shard that holds
        an identity or key, taken by whoever puts, records or removes stored files: `rm` never deletes files a
        concurrent `register` of the same bytes has just copied. Lock files stay in <root>/.locks (one per shard,
        256 at most)."""
        with file_lock(self.root / LOCKS / key[:2]):
            yield

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A temporary folder inside the store (same filesystem: stored copies are cheap), removed afterwards; one a
        killed process leaves is a temp file for `loraops gc`. Held (a shared flock on the folder) while in use: gc
        leaves a held one however old it is, since a folder's mtime does not change while a file deep in it grows
        (a download of hours into huggingface_hub's local_dir, see in_use)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f"{TMP_MARK}scratch-"))
        handle = os.open(tmp, os.O_RDONLY)
        try:
            _flock(handle, shared=True)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(handle)  # (the lock goes with it, after the folder)

    @staticmethod
    def in_use(path: Path) -> bool:
        """A scratch folder a process holds now (see scratch)."""
        if not path.is_dir():
            return False
        try:
            handle = os.open(path, os.O_RDONLY)
        except OSError:  # gone meanwhile
            return False
        try:
            return not _flock(handle, shared=False, wait=False)
        finally:
            os.close(handle)

    def remove(self, key: str) -> None:
        """Remove an adapter's folder (the key may name a file inside it), its stamps, and its shard folder when that
        is empty now. Call with the shard's lock held."""
        folder = self.root / folder_of(key)
        shutil.rmtree(folder, ignore_errors=True)
        self.prune(folder)
        self.forget(key)

    def _stamps(self, key: str) -> Path:
        return self.root / STAMPS / f"{folder_of(key)}.json"

    def forget(self, key: str) -> None:
        """Drop the stamps of the adapter at ``key`` (its files are hashed on their next load): with its folder, or
        when one of its files hashed wrong, which its stamp may not show (bytes changed below the file system keep
        its stat); and their shard folder (.stamps/XX) when that is empty now. Where the store is read-only,
        nothing."""
        with self._stamps_locked(), contextlib.suppress(OSError):
            self._stamps(key).unlink(missing_ok=True)
            self._stamps(key).parent.rmdir()  # (only an empty one; a write makes it again under this lock)

    def empty_stamp_folders(self) -> Iterator[Path]:
        """Stamp shard folders (.stamps/XX) that hold nothing: litter of a `forget` by an older loraops, which left
        them after their last stamp, for gc (drop_empty)."""
        for folder in sorted((self.root / STAMPS).glob("??")):
            with contextlib.suppress(OSError):
                if folder.is_dir() and next(folder.iterdir(), None) is None:
                    yield folder

    def drop_empty(self, folder: Path) -> bool:
        """Remove the stamp shard folder ``folder`` if it is still empty: under the stamps' lock, which a stamp's
        write holds from making its folder to renaming the file into it, so a folder being filled is never removed
        under it. Whether it went."""
        with self._stamps_locked():
            try:
                folder.rmdir()
            except OSError:  # not empty (filled meanwhile), or gone
                return False
        return True

    @contextlib.contextmanager
    def _stamps_locked(self) -> Iterator[None]:
        """Held while the stamps are read, changed and written back (remember, mark_checked) and while they are
        dropped (forget): else a load that read them before a `verify` found a file damaged and dropped them wrote
        them back after, and its stamp vouched for the damaged bytes again (loads went by it, unchecked). Not the
        shard's lock, which remove and a repair hold for a whole copy. Where it cannot be made (a read-only store,
        another user's lock file), none: what the stamps then do is what they did without it."""
        with contextlib.ExitStack() as lock:
            with contextlib.suppress(OSError):
                lock.enter_context(file_lock(self.root / LOCKS / STAMPS_LOCK))
            yield

    def stray_stamps(self) -> Iterator[Path]:
        """Stamp files whose adapter folder is gone (an `rm` killed between the two, a load stamping while `rm`
        ran): litter for gc, vouching for nothing."""
        for path in sorted((self.root / STAMPS).glob("??/*.json")):
            if TMP_MARK not in path.name and not (self.root / path.parent.name / path.stem).is_dir():
                yield path

    def unchanged(self, key: str, name: str, sha256: str) -> bool:
        """Whether the stored file ``name`` of the adapter at ``key`` is known to hash to ``sha256`` without reading
        it: a stamp remember() recorded for that sha256 matches the file's stat now. Rewriting a file (in place or
        anew) changes its ctime, which no one but the system clock can set back."""
        return name in self.holding(key, {name: sha256})

    def holding(self, key: str, files: dict[str, str]) -> dict[str, dict]:
        """The stamps that vouch now for the stored files of the adapter at ``key`` (sha256 by name): stamped with that
        sha256 and the file's stat as it is now (see unchanged), by name."""
        known, held = self._read_stamps(key), {}
        for name, sha256 in files.items():
            stamp = known.get(name)
            with contextlib.suppress(OSError):
                if isinstance(stamp, dict) and stamp.get("sha256") == sha256 \
                        and stamp.get("stat") == _stat_of((self.root / folder_of(key) / name).stat()):
                    held[name] = stamp
        return held

    @staticmethod
    def checked(held: dict[str, dict], files: dict[str, str]) -> bool:
        """Whether the stamps ``held`` (holding's) say that a load has read and checked (NaN/Inf) every one of
        ``files`` as they are: see mark_checked."""
        return bool(files) and all(held.get(name, {}).get("checked") is True for name in files)

    def mark_checked(self, key: str, held: dict[str, dict]) -> None:
        """Record in the stamps ``held`` (holding's, taken before the files were read) that a read of the files
        checked their values: only where the stamp and the file's stat are still the ones held, so that no write
        came between the stamp's hash and the end of that read (a write moves ctime) and what was checked is what
        hashed to the recorded sha256. Files registered before loads checked nothing have no such mark, so their
        first load checks them."""
        with self._stamps_locked():
            known = self._read_stamps(key)
            marked = False
            for name, stamp in held.items():
                with contextlib.suppress(OSError):
                    now = _stat_of((self.root / folder_of(key) / name).stat())
                    if known.get(name) == stamp and stamp["stat"] == now:
                        known[name] = {**stamp, "checked": True}
                        marked = True
            if marked:
                self._write_stamps(key, known)

    def _read_stamps(self, key: str) -> dict:
        """The stamps of the adapter at ``key`` by file name; {} where there are none or the file is damaged (JSON
        nested past Python's recursion limit too: a cache never fails a load)."""
        try:
            known = json.loads(self._stamps(key).read_text())
        except (OSError, ValueError, RecursionError):
            return {}
        return known if isinstance(known, dict) else {}

    def hash(self, key: str, name: str) -> tuple[str, Callable[[], None]]:
        """The sha256 of the stored file ``name`` of the adapter at ``key``, read now, and what records it (call it
        once the hash is the recorded one) as a stamp for unchanged(): only when the file's stat did not change
        while it was read, and its last change was well before (RACY_NS)."""
        path = self.root / folder_of(key) / name
        began, before = time.time_ns(), path.stat()
        sha256 = sha256_file(path)

        def remember() -> None:
            with contextlib.suppress(OSError):
                settled = max(before.st_mtime_ns, before.st_ctime_ns) < began - RACY_NS
                if settled and _stat_of(path.stat()) == _stat_of(before):
                    self._remember(key, name, sha256, before)

        return sha256, remember

    def _remember(self, key: str, name: str, sha256: str, st: os.stat_result) -> None:
        with self._stamps_locked():
            known = self._read_stamps(key)
            known[name] = {"sha256": sha256, "stat": _stat_of(st)}  # (not checked: that is for a read to say)
            self._write_stamps(key, known)

    def _write_stamps(self, key: str, known: dict) -> None:
        """Where the store is read-only, nothing (a cache)."""
        stamps = self._stamps(key)
        with contextlib.suppress(OSError):
            stamps.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_sibling(stamps)
            try:
                tmp.write_text(json.dumps(known))
                os.replace(tmp, stamps)
            finally:
                tmp.unlink(missing_ok=True)

    def prune(self, removed: Path) -> None:
        """Remove the folders above ``removed`` (a path just deleted inside the store) that are empty now, up to the
        store's root, which stays. Call with the shard's lock held: registrations create their folders under that
        lock (put), so none can be making one of these meanwhile; and rmdir removes only an empty folder."""
        folder = removed.parent
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): what is above it is not empty either
                return
            folder = folder.parent

    def folders(self) -> Iterator[Path]:
        """Every stored adapter folder."""
        if not self.root.exists():
            return
        for shard in sorted(self.root.iterdir()):
            if shard.is_dir() and len(shard.name) == 2:
                yield from sorted(p for p in shard.iterdir() if p.is_dir() and TMP_MARK not in p.name)

    def unrecorded(self, key: str, names: set[str]) -> list[Path]:
        """What the stored folder of the adapter at ``key`` holds besides ``names`` (the files its records hold):
        put there by hand, since loraops stores the recorded files only, and not always inert (an adapter_config.json
        beside a one-file adapter's weights is read with them). Not the temp files of an interrupted copy, which gc
        removes (temp_files)."""
        try:
            entries = sorted(self.path(folder_of(key)).iterdir())
        except OSError:  # (gone: its files are missing)
            return []
        return [p for p in entries if p.name not in names and not p.name.startswith(TMP_MARK)]

    def temp_files(self) -> Iterator[Path]:
        """Leftovers of interrupted copies (not what is inside one: a scratch folder goes whole, or not at all)."""
        if self.root.exists():
            yield from (p for p in self.root.rglob(f"{TMP_MARK}*")
                        if not any(part.startswith(TMP_MARK) for part in p.relative_to(self.root).parts[:-1]))


def _flock(handle: int, *, shared: bool, wait: bool = True) -> bool:
    """flock ``handle``; False when ``wait`` is off and another holds it. True without fcntl (Windows)."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _stat_of(st: os.stat_result) -> list[int]:
    """What a stamp holds of a file's stat. Not its device number, which git's index leaves out too (unless built with
    USE_STDEV): an NFS or other network share has a different one on each machine that mounts it, and on every
    remount, so its stamps never held there; a file on another device at the same path with the same inode, size and
    nanosecond mtime and ctime but other bytes would take a copy of the file system that then changed, and any change
    moves ctime."""
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def folder_of(key: str) -> str:
    """The identity folder part of a key ("ab/abcd..." of "ab/abcd.../file.safetensors")."""
    return "/".join(Path(key).parts[:2])


def _copy(src: Path, dst: Path, progress) -> StoredFile:
    tmp = temp_sibling(dst)
    try:
        sha = _hash_copy(src, tmp, progress)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return StoredFile(dst.name, dst.stat().st_size, sha)


def _move(src: Path, dst: Path, progress, sha: str | None = None) -> StoredFile:
    """A file of our own, hashed (unless its ``sha`` was taken as it was written), made durable and renamed into the
    store: a derived adapter of a 70B model (1.6 GB) is not copied a second time."""
    size = src.stat().st_size
    if sha is None:
        sha = sha256_file(src, progress=progress)
    elif progress is not None:
        progress.update(size)
    with open(src, "rb") as f:
        sync(f.fileno())
    os.replace(src, dst)
    return StoredFile(dst.name, size, sha)


def _hash_copy(src: Path, dst: Path, progress) -> str:
    """Copy and hash in one pass (the hash is of the bytes actually written), bypassing the page cache (see
    fsutil.DirectFileWriter: a 414 MB adapter's copy took 2.6–3 s of buffered writes on this VM, 0.3 s direct), read
    ahead (an output loraops has just written bypassed the cache too: 790 MB stored in 2.3–2.5 s without, 1.3 with)."""
    digest = hashlib.sha256()

    def seen(chunk: memoryview) -> None:
        digest.update(chunk)
        if progress is not None:
            progress.update(len(chunk))

    try:
        copy_file(src, dst, seen)
    except EOFError:
        raise ConflictError(f"{src}: the file shrank while it was being stored; register it again") from None
    return digest.hexdigest()
