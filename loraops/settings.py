"""Where loraops keeps its state, and the process-wide switches.

Everything is read from the environment at call time (not import time), so tests and the CLI's
--home/--db/--quiet options can change it by setting the variables.
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar
from urllib.parse import quote, unquote

from .fsutil import human_bytes, resolved

T = TypeVar("T")
R = TypeVar("R")

ENV_HOME = "LORAOPS_HOME"
ENV_DB = "LORAOPS_DB"
ENV_BLOBS = "LORAOPS_BLOBS"
ENV_QUIET = "LORAOPS_QUIET"
ENV_DIRECT_IO = "LORAOPS_DIRECT_IO"
ENV_MMAP = "LORAOPS_MMAP"
ENV_STAMPS = "LORAOPS_STAMPS"


def home() -> Path:
    """The loraops home folder: $LORAOPS_HOME, else the user's data dir (XDG_DATA_HOME/loraops)."""
    explicit = os.environ.get(ENV_HOME)
    if explicit:
        return Path(explicit).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "loraops"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "loraops"
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "loraops"


def db_url() -> str:
    """SQLAlchemy URL of the registry: $LORAOPS_DB, else SQLite at <home>/registry.db."""
    return os.environ.get(ENV_DB) or home_db_url()


def home_db_url() -> str:
    """The home's own registry (SQLite at <home>/registry.db), which any command creates on first use. The path is
    %-escaped: SQLAlchemy decodes %XX in a URL's database and ends it at '?', so a home named `50%20off` or `a?b`
    opened another file."""
    return f"sqlite:///{quote(str(home() / 'registry.db'))}"


def blobs_dir(url: str | None = None) -> Path:
    """Content-addressed adapter store of the registry at ``url`` (default: db_url()): the home's own registry.db
    keeps <home>/blobs; any other registry $LORAOPS_BLOBS (a shared folder for a team); else, for an SQLite registry,
    a folder beside its file (<file>.blobs), else <home>/blobs. One store per registry:
    `gc` and `rm` of one registry remove the files no record of *its own* uses, so two registries on one store
    would delete each other's adapters (a second --db file once defaulted to the home's store; and a home whose
    shell exports the team's LORAOPS_BLOBS had its own registry's `gc` remove the team's adapters)."""
    database = sqlite_database(url)
    if database is not None and is_home_database(database):
        return home() / "blobs"
    explicit = os.environ.get(ENV_BLOBS)
    if explicit:
        return folder(explicit)
    if database is not None:
        return database.with_name(database.name + ".blobs")
    return home() / "blobs"


def earlier_blobs_dir(url: str, own: Path) -> Path | None:
    """The store loraops kept the registry at ``url`` in before its own (``own``), when another: up to 0.1.0
    Registry.open(url) stored an SQLite URL's adapters in LORAOPS_DB's store (the home's), not <file>.blobs; a server
    registry's were in each home's <home>/blobs until LORAOPS_BLOBS was required; the home's own registry's were in
    LORAOPS_BLOBS while that applied to it too (blobs_dir). What is found there is copied over on first use."""
    database = sqlite_database(url)
    if database is None:
        before = home() / "blobs"
    elif is_home_database(database) and os.environ.get(ENV_BLOBS):
        before = folder(os.environ[ENV_BLOBS])
    else:
        before = blobs_dir()
    return before if resolved(own) != resolved(before) else None


def is_home_database(database: Path) -> bool:
    """Whether an SQLite registry file is the home's own registry.db."""
    return resolved(database) == resolved(home() / "registry.db")


def folder(path: str | os.PathLike) -> Path:
    """A blob folder as given (LORAOPS_BLOBS, Registry.open's blobs=), absolute: a relative one named another folder
    after a chdir in the same process."""
    try:
        return Path(path).expanduser().absolute()
    except RuntimeError:  # ~name of no user on this system
        from .errors import RegistryError

        raise RegistryError(f"the blob folder {path} starts with {str(path).split('/')[0]}, which names no user's "
                            "home folder here; give the full path") from None


def registry_blobs_dir(url: str | None = None, blobs: str | os.PathLike | None = None) -> Path:
    """blobs_dir(url), for opening the registry at ``url``, or ``blobs`` when given (Registry.open's keyword, which
    takes precedence over $LORAOPS_BLOBS as an argument does over the environment): a server database (PostgreSQL)
    with neither is refused. Every home that names the server shares its records, but each kept the adapters' files
    in its own <home>/blobs: another user's `show` named a file that was not there, `export` and `verify` failed, and
    the advice was to register the adapter again. A URL that is not one, or names no known database, is refused as
    such first (registry.db.refuse_bad_url): "garbage" read as a garbage server."""
    if blobs is not None:
        if not str(blobs).strip():  # (Path("") is the working folder, whose two-letter folders gc would prune)
            from .errors import InvalidInputError

            raise InvalidInputError("blobs= is empty: give the blob folder's path, or leave it out for "
                                    f"${ENV_BLOBS}'s")
        return folder(blobs)
    explicit = os.environ.get(ENV_BLOBS)
    scheme = backend(url or db_url())
    if not explicit and scheme != "sqlite":
        from .errors import RegistryError
        from .registry.db import refuse_bad_url

        refuse_bad_url(url or db_url())
        raise RegistryError(f"the registry is on a server ({scheme}), shared by every loraops home that names it, but "
                            f"{ENV_BLOBS} is not set, so adapters would be stored in this home's own folder, where no "
                            f"other home finds them: set {ENV_BLOBS} (from Python: Registry.open(url, blobs=PATH)) to "
                            f"the folder every user of the registry mounts (`export {ENV_BLOBS}={home() / 'blobs'}` "
                            "keeps this home's, for a registry only it uses)")
    return blobs_dir(url)


def backend(url: str) -> str:
    """The database a registry URL names (sqlite, postgresql, …: its dialect, without the driver)."""
    return url.partition("://")[0].partition("+")[0]


WRITER_LOCK = ".writer-lock"
"""The suffix of the file lock SQLite registry writers queue on, beside the database (registry.db.writer_lock)."""
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal", WRITER_LOCK)
"""The suffixes of the files kept beside an SQLite registry's database: SQLite's, and the writers' lock."""


def sqlite_database(url: str | None = None) -> Path | None:
    """The file of the SQLite registry at ``url`` (default: db_url()), else None (a server, or an SQLite database in
    no file: see sqlite_file)."""
    url = url or db_url()
    if backend(url) != "sqlite":
        return None
    plain = plain_sqlite_file(url)
    if plain is not None:
        return plain
    from sqlalchemy.engine import make_url  # (only for the rarer forms: `list` of a plain URL imports no SQLAlchemy)

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a URL: opening the registry says so
        return None
    return sqlite_file(parsed.database, parsed.query)


def plain_sqlite_file(url: str) -> Path | None:
    """The file of a plain ``sqlite[+driver]:///PATH`` URL (no query, no %-escapes), read as SQLAlchemy reads it
    but without importing it (`list` reads such a registry over sqlite3), else None."""
    scheme, _, rest = url.partition("://")
    if scheme.partition("+")[0] != "sqlite" or not rest.startswith("/") or any(c in rest for c in "?%"):
        return None
    return sqlite_file(rest[1:], {})


def sqlite_file(database: str | None, query: Mapping[str, Any]) -> Path | None:
    """The file an SQLite URL's database part and query (as SQLAlchemy parses them) open, or None when it opens no
    file of its own: an in-memory database (`sqlite://`, `:memory:`, a `file:` URI with mode=memory or vfs=memdb) or
    SQLite's private temporary one (`file:` with no path). A `file:` name is a URI only with uri=true; without it the
    driver opens a file of that very name. Other SQLite URLs than `sqlite:///PATH` kept the home's blob store, so
    `gc` on them removed every adapter the home's registry had stored. A leading ~ or ~user is a home folder, in
    both forms (sqlite:///~/reg.db): the driver alone opened ./~/reg.db, so the engine is given this very file
    (registry.db.make_engine), and every other use (the blob store beside it, the read-only checks, the plain reads)
    asks this function."""
    database = database or ""
    if sqlite_uri(database, query):
        path = database[len("file:"):]
        if path.startswith("//"):  # file://localhost/path, file:///path
            _authority, slash, rest = path[2:].partition("/")
            path = slash + rest
        if query.get("mode") == "memory" or query.get("vfs") == "memdb":
            return None
        database = unquote(path)
    if database in ("", ":memory:"):
        return None
    if not database.startswith("~"):  # (Path would drop a './' and expand the ~ of ./~/reg.db, a folder named ~)
        return Path(database)
    try:
        return Path(database).expanduser()
    except RuntimeError:  # ~name of no user on this system
        from .errors import RegistryError

        raise RegistryError(f"{database}: the registry path starts with {database.split('/')[0]}, which names no "
                            "user's home folder here; give the full path") from None


def sqlite_uri(database: str | None, query: Mapping[str, Any]) -> bool:
    """Is an SQLite URL's database part a `file:` URI (with uri=true), rather than the name of a file?"""
    return (database or "").startswith("file:") and str(query.get("uri", "")).lower() in ("true", "yes", "on", "y",
                                                                                          "t", "1")


def progress_enabled() -> bool:
    """Progress bars show only on a terminal, and never with --quiet / LORAOPS_QUIET=1."""
    if os.environ.get(ENV_QUIET, "") not in ("", "0"):
        return False
    return sys.stderr.isatty()


def direct_io() -> bool:
    """Merge outputs bypass the page cache (O_DIRECT, see fsutil.DirectFileWriter) unless LORAOPS_DIRECT_IO=0."""
    return os.environ.get(ENV_DIRECT_IO, "") != "0"


def map_stored() -> bool:
    """Stored adapters are mapped into memory rather than read (st.map_file) unless LORAOPS_MMAP=0: for a store on a
    network filesystem shared with other machines, where another machine's `rm` can make a mapped page unreadable."""
    return os.environ.get(ENV_MMAP, "") != "0"


def trust_stamps() -> bool:
    """A stored file whose stat is as it was when it last hashed right is not hashed again on load (registry.blobs
    stamps) unless LORAOPS_STAMPS=0: for a store others can write but not the registry's database (a team's shared
    LORAOPS_BLOBS beside PostgreSQL), where a stamp written with replaced bytes would get them past the load's hash."""
    return os.environ.get(ENV_STAMPS, "") != "0"


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool | None = None):
    """A tqdm bar in bytes, or a do-nothing stand-in when progress is off (``enabled`` None: progress_enabled())."""
    if enabled is False or (enabled is None and not progress_enabled()):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def resolve_device(name: "str | torch.device | None" = "auto") -> "torch.device":  # noqa: F821 - torch imported lazily
    """'auto' (or None) → cuda when available, else cpu; 'cpu', 'cuda', 'cuda:N' or a torch.device as given
    (checked); anything else, an empty string included, is an error naming these."""
    import torch

    from .errors import InvalidInputError

    if isinstance(name, torch.device):  # (as dtype= takes a torch.dtype; it was a raw AttributeError)
        name = str(name)
    elif name is not None and not isinstance(name, str):
        raise InvalidInputError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto")
    name = "auto" if name is None else name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidInputError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"device {name!r} asked for, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInputError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
    elif device.type != "cpu":
        raise InvalidInputError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or auto")
    return device


# torch's ways of saying memory ran out that are not its OutOfMemoryError: a CUDA call's "CUDA error: out of memory"
# (a pinned host buffer, a kernel's workspace), cuBLAS/cuSOLVER's ALLOC_FAILED (an SVD's workspace), the CPU allocator
_OUT_OF_MEMORY = re.compile(r"out of memory|_ALLOC_FAILED|DefaultCPUAllocator: (can't allocate|not enough) memory",
                            re.I)
_SIZE = r"(\d+(?:\.\d+)? [KMGTPE]?i?B)\b"


def out_of_memory(exc: BaseException, device: "torch.device | None" = None, what: str | None = None,  # noqa: F821
                  precise: bool = False) -> "DeviceMemoryError | None":  # noqa: F821
    """``exc`` said as one DeviceMemoryError line when it is torch running out of memory on ``device`` (None:
    unknown) while doing ``what``, naming what to do; None when it is anything else."""
    from .errors import DeviceMemoryError, LoraopsError

    torch = sys.modules.get("torch")  # (no torch loaded: nothing of it ran out)
    if torch is None or not isinstance(exc, RuntimeError) or isinstance(exc, LoraopsError):
        return None
    text = str(exc)
    # (torch.OutOfMemoryError is torch ≥ 2.5's name; 2.1–2.4 have only torch.cuda's)
    if not isinstance(exc, torch.cuda.OutOfMemoryError) and not _OUT_OF_MEMORY.search(text):
        return None
    host = "DefaultCPUAllocator" in text or (device is not None and device.type == "cpu")
    where = "cpu" if host else str(device) if device is not None else "cuda" if "CUDA" in text else "the device"
    sized = re.search(r"[Tt]ried to allocate " + _SIZE, text)
    counted = re.search(r"tried to allocate (\d+) bytes", text)  # (the CPU allocator's)
    asked = sized.group(1) if sized else human_bytes(int(counted.group(1)), 2) if counted else None
    free = re.search(r"of which " + _SIZE + r" is free|; " + _SIZE + r" free", text)  # (torch ≥ 2.2's | older)
    detail = ", ".join(part for part in (asked and f"tried to allocate {asked}",
                                          free and f"{free.group(1) or free.group(2)} free") if part)
    ways = ["free memory"] if host else ["run with --device cpu", f"free memory on {where}"]
    if precise:
        ways.append("leave out --precise (float64 takes twice the memory)")
    advice = ways[0] if len(ways) == 1 else f"{', '.join(ways[:-1])} or {ways[-1]}"
    doing = f" while {what}" if what else ""
    return DeviceMemoryError(f"out of memory on {where}{doing}{f' ({detail})' if detail else ''}: {advice}")


_threads_lock = threading.Lock()
_threads_inside = 0
_threads_before = 0
_threads_here = threading.local()  # .counts: this thread's count at the entry of each of its blocks now open


@contextlib.contextmanager
def torch_threads(device: "torch.device", count: Callable[[int], int]) -> Iterator[None]:  # noqa: F821
    """Torch on ``count(n)`` CPU threads inside (n: its thread count before), put back after; a CUDA device: unchanged.
    Blocks may overlap on several Python threads and nest. Torch keeps a count per thread (OpenMP), and
    set_num_threads also sets the one a thread started later begins with: a block that saved and restored the count
    it found could find another's lowered count (its thread started inside that block) and restore it for good.
    So, under a lock, the first block to enter reads n, each thread gets n back as it leaves its outermost block, and
    a nested block gives its thread back what it had at that block's entry. Only the counting is locked: each block
    sets its own thread's count, and the work inside runs on all threads at once."""
    global _threads_inside, _threads_before
    if device.type != "cpu":
        yield
        return
    import torch

    if not hasattr(_threads_here, "counts"):
        _threads_here.counts = []
    counts = _threads_here.counts
    with _threads_lock:
        here = torch.get_num_threads()
        before = _threads_before if _threads_inside else here
        torch.set_num_threads(count(before))  # (first: a count it refuses leaves nothing counted)
        counts.append(here)
        _threads_before, _threads_inside = before, _threads_inside + 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_inside -= 1
            entered = counts.pop()
            torch.set_num_threads(entered if counts else _threads_before)


AHEAD_ELEMENTS = 1 << 26
"""At most this many elements of dense matrices (Σ out·in of the items running; about 2 GB of a float64 SVD's work)
computed at once by ``in_order``'s threads."""
ALONE_ELEMENTS = 1 << 24
"""An item with more elements than this (a Llama-7B MLP's 4096×11008) runs alone on all of torch's threads."""


def in_order(items: Iterable[T], run: Callable[[T], R], elements: Callable[[T], int],
             device: "torch.device") -> Iterator[R]:  # noqa: F821
    """run(item) for each item, yielded in order. On the CPU at n > 1 torch threads, items of at most ALONE_ELEMENTS
    run ahead on up to n Python threads, each on one torch thread (torch_threads), while those running hold at most
    AHEAD_ELEMENTS; a larger one runs alone on all n, once those before it are done. A dense SVD runs on one thread
    whatever the count (ops.svd.single_threaded: the same bytes at any count), so n modules at once take the time of
    one; ``run`` must give the same result on one thread as on n."""
    import torch

    threads = torch.get_num_threads() if device.type == "cpu" else 1
    if threads == 1:
        yield from map(run, items)
        return

    def on_one_thread(item: T) -> R:
        with torch_threads(device, lambda before: 1):
            return run(item)

    running: collections.deque[tuple[Future, int]] = collections.deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="loraops-ahead") as pool:
        try:
            for item in items:
                size = elements(item)
                alone = size > ALONE_ELEMENTS
                while running and (alone or len(running) == threads
                                   or sum(held for _, held in running) + size > AHEAD_ELEMENTS):
                    yield running.popleft()[0].result()
                if alone:
                    yield run(item)
                else:
                    running.append((pool.submit(on_one_thread, item), size))
            while running:
                yield running.popleft()[0].result()
        finally:  # (an error, or the caller stopped: what has not started never will)
            for future, _ in running:
                future.cancel()


@contextlib.contextmanager
def device_memory(device: "torch.device", what: str, precise: bool = False) -> Iterator[None]:  # noqa: F821
    """Running out of memory on ``device`` while doing ``what`` is one DeviceMemoryError line (out_of_memory), with
    torch's error as its cause: it was torch's traceback, pages of it, and the command's exit status 1 by accident."""
    try:
        yield
    except RuntimeError as exc:
        error = out_of_memory(exc, device, what, precise)
        if error is None:
            raise
        raise error from exc
