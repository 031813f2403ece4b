"""Every error loraops raises on purpose.

Each class inherits from LoraopsError *and* the builtin it resembles, so library users can catch either.
The CLI maps them to exit codes in one place (loraops.cli.main); nothing else prints tracebacks.
"""
from __future__ import annotations

import copy
import re
from typing import Callable, Iterable


class LoraopsError(Exception):
    """Base of every deliberate loraops error. The message is one line, fit for a terminal. ``template`` may name
    each parameter of ``names`` between backticks, a flag's value with it (`record=False`): str() says them as Python
    writes them, ``said`` otherwise (the CLI as its options: --max-rank for max_rank, --no-record for record=False,
    cli.said). Other backticked words (`loraops merge …`) are left as written."""

    exit_code = 1

    def __init__(self, template: str = "", names: Iterable[str] = ()):
        self.template, self.names = template, frozenset(names)
        super().__init__(self.said(str))

    def said(self, name: Callable[[str], str]) -> str:
        """The message with each parameter (``max_rank``, or a flag's value ``record=False``) named as ``name`` says
        it."""
        return re.sub(r"`(\w+)(=True|=False)?`",
                      lambda found: name(found[1] + (found[2] or "")) if found[1] in self.names else found[0],
                      self.template)


class InvalidInputError(LoraopsError, ValueError):
    """A file, argument or value that cannot be used as given (corrupt file, bad rank, NaN factors, ...)."""

    exit_code = 2


class FormatError(InvalidInputError):
    """A file whose layout loraops does not understand or cannot accept."""


class UnsupportedAdapterError(FormatError):
    """A recognised adapter type loraops does not handle (LoHa, LoKr, LyCORIS DoRA, ...), or an operation its math
    does not allow (subtracting a DoRA adapter)."""


class ParameterError(InvalidInputError):
    """Bad parameters of a call (a combine method's, a rank rule's), named as LoraopsError names them."""


class ModelLoraError(InvalidInputError):
    """A recipe's models entry written as mergekit's ``MODEL+LORA`` that names no adapter: it is the adapter LORA only
    where MODEL is the recipe's base_model. ``ref``: the entry as the recipe writes it."""

    def __init__(self, message: str, ref: str):
        super().__init__(message)
        self.ref = ref


class MismatchError(InvalidInputError):
    """An adapter that does not fit a base model (missing modules, wrong shapes, different bases)."""


class DeviceMemoryError(LoraopsError, MemoryError):
    """The device the work runs on (a CUDA GPU, or the CPU's memory) ran out of memory for it. The message names the
    device, what was being done and what to do; torch's own error is the ``__cause__``."""


class NotFoundError(LoraopsError, LookupError):
    """A registry reference, base, file or Hub object that does not exist."""

    exit_code = 3


class AmbiguousError(LoraopsError, LookupError):
    """A reference that matches more than one thing."""

    exit_code = 3


class ConflictError(LoraopsError, FileExistsError):
    """An output that already exists (use --force), or a registry write that collides."""

    exit_code = 4


class DiskSpaceError(LoraopsError, OSError):
    """Not enough free space for an output."""

    exit_code = 5


class RegistryError(LoraopsError, RuntimeError):
    """The registry database cannot be used (schema from a newer loraops, unreachable server, ...)."""

    exit_code = 6


class HubError(LoraopsError, ConnectionError):
    """A Hugging Face Hub request that failed (no network, unauthorized, gated, ...)."""

    exit_code = 7


def reworded(exc: LoraopsError, where: str, said: str) -> LoraopsError:
    """``exc`` (same type) with ``where`` — a path only loraops knows, a staged output or a scratch folder, gone once
    the command ends — said as ``said``, what the user asked for. The parameters it names stay marked (a copy, not
    type(exc)(str(exc)), which said them as Python names to the CLI too)."""
    again = copy.copy(exc)
    again.template = exc.template.replace(where, said)
    again.args = (again.said(str),)
    return again
