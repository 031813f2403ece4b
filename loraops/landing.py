"""What a Ctrl-C left of a command that writes: nothing, or what landed (an output renamed into place, a registry
row, a Hub commit), said in place of "nothing was written".

An output is watched (its file identity changes when it lands); what cannot be watched from outside (a registration
without an output, a Hub commit) is told by the code that made it, right after (``tell``). Imports nothing heavy:
the CLI keeps a Landing for every command.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import itertools
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

from .errors import LoraopsError
from .fsutil import resolved
from .references import PATH, argument

if TYPE_CHECKING:
    from .registry import store

F = TypeVar("F", bound=Callable)
_counter = itertools.count(1)
# (number, line) of the latest thing landed in this thread's context: a Landing sees what came after it was built
_told: contextvars.ContextVar[tuple[int, str | None]] = contextvars.ContextVar("loraops_landed", default=(0, None))


def tell(line: str) -> None:
    """Something landed that no Landing can watch: ``line`` ("interrupted after …") is what an interruption from now
    on says, in every Landing built before it (the library's own, and the CLI's for the command)."""
    _told.set((next(_counter), line))


def registered(what: str) -> Callable[["store.Registration"], str | None]:
    """What a registration (register, pull, a derived result) tells as it commits (register_adapter's ``told``):
    ``what`` ("PATH was registered") as the record it made, or the link it set; None when it changed nothing."""
    def line(done: "store.Registration") -> str | None:
        if done.created:
            return f"interrupted after {what} as {done.record.ref}"
        if done.linked:
            return f"interrupted after {done.record.ref} was linked to base {done.record.base.name}"
        return None
    return line


class Landing:
    """Says what a Ctrl-C left: nothing (the temporary output is removed), or the output complete in place — once
    renamed, a merge is not undone — and whether the registry recorded it (asked again: the interrupt may land
    between the commit and the line after it) or holds its weights as another base; or what was told since
    (``tell``), which says more. The CLI keeps one for the whole command (cli.expect_output): a Ctrl-C can also land
    after the library call returned. ``output``: None for a command that writes none (push, combine without -o);
    ``record``: whether a merge's output is recorded as a base after it lands."""

    def __init__(self, output: str | Path | None = None, record: bool = False,
                 registry: "store.Registry | None" = None) -> None:
        self.output, self.record, self.registry = None if output is None else Path(output), record, registry
        self.before = self._identity()
        self.since = _told.get()[0]

    def _identity(self) -> tuple[int, int] | None:
        if self.output is None:
            return None
        try:
            st = self.output.stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def __enter__(self) -> "Landing":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is KeyboardInterrupt and (message := self.landed()) is not None:
            raise KeyboardInterrupt(message) from None

    def landed(self) -> str | None:
        """What an interruption now would leave, when something has landed; None while nothing was written."""
        number, line = _told.get()
        if number > self.since and line is not None:
            return line
        if self._identity() in (None, self.before):
            return None
        done = f"interrupted after {self.output} was written in full"
        if not self.record:
            return done
        try:
            recorded, same_as = self._recorded()
        except (LoraopsError, OSError):  # the registry cannot say now (busy, gone)
            return f"{done}; whether the registry recorded it, `loraops base list` tells"
        if recorded:
            return f"{done} and recorded"
        if same_as is not None:  # (`base add` of it says "already registered" too: its hint misled)
            return f"{done}; it holds the same weights as the registered base {same_as}: not registered again"
        return (f"{done}, before it was recorded in the registry (`loraops base add {self.output}` records it, without "
                "its lineage)")

    def _recorded(self) -> tuple[bool, str | None]:
        """(whether a base is recorded at the output's path, else the name of the registered base whose weights it
        holds: `subtract --exact` restoring one, which is not recorded again). The output's fingerprint is taken from
        the digests its writer cached, never by reading it: a GB model is not hashed after a Ctrl-C."""
        from .basemodel import BaseModel
        from .registry.store import opened

        where = str(resolved(self.output))
        with opened(self.registry) as reg:
            if any(b.path == where for b in reg.list_bases()):
                return True, None
            fingerprint = BaseModel.open(self.output).cached_fingerprint()
            found = reg.find_base(fingerprint) if fingerprint is not None else None
            return False, None if found is None else found.name


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C (and SIGTERM, as the CLI handles it) deferred to the end of the block, then raised as it would have been.
    SQLAlchemy swallows a KeyboardInterrupt that lands while its pool closes a connection (it logs "Exception closing
    connection") and then fails on its own broken state (an AssertionError, once): a Ctrl-C while the registry was
    being opened came out as "cannot open the registry …" (exit 6) instead of an interruption. Opening takes
    milliseconds; torch's import (cli.TorchImport), a second or two. Only in the main thread (where Python runs
    signal handlers) and only over Python's own handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, object]] = []
    saved = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):
            saved[signum] = handler
            signal.signal(signum, lambda n, frame, h=handler: caught.append((n, h)))
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        if caught:
            signum, handler = caught[0]
            handler(signum, None)


def watched(output: str | None = None) -> Callable[[F], F]:
    """A library call run under a Landing of its argument named ``output`` (None: it writes no output; what it lands
    is told): a Ctrl-C once something landed comes out of it as a KeyboardInterrupt saying what."""
    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        # what the output takes (argument): a path, or None where that is its default
        takes = () if output is None else (*PATH, *[type(None)] * (signature.parameters[output].default is None))

        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:  # Python's own error, which names the function (bind's said "got an unexpected …")
                return fn(*args, **kwargs)
            if output is not None:
                bound.arguments[output] = argument(bound.arguments.get(output), output, *takes)
            with Landing(None if output is None else bound.arguments[output]):
                return fn(*bound.args, **bound.kwargs)
        return run  # type: ignore[return-value]
    return decorate
