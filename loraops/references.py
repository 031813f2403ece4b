"""Adapter arguments, shared by merge, subtract and combine: REF[:WEIGHT] on the command line, (ref, weight)
pairs from Python; and the type check of the library's other arguments (``argument``)."""
from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
import re
import reprlib
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from .errors import InvalidInputError
from .fsutil import path_exists, refuse_overlap


WEIGHT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
"""A number as written on a command line (a weight, --alpha, --density …): decimal or scientific, ASCII digits only.
Python's float() also takes '1_0', 'inf', 'nan', ' 1' and other scripts' digits, which were accepted."""
DECIMAL_COMMA = re.compile(r"[+-]?[0-9]*,[0-9]+")
"""A weight written with a decimal comma (0,7), as many locales write one: a weight was meant, not part of a name."""
INTEGER = re.compile(r"[+-]?[0-9]+")
"""An integer as written on a command line (--rank, --seed …); Python's int() also takes '1_0', ' 1' and other
scripts' digits."""
PLAINLY = "written plainly (like 0.7, -1 or 2e-3)"
PATH = (str, os.PathLike)
"""What a path argument takes: a str or an os.PathLike (pathlib.Path), as Path() does, not its bytes."""
F = TypeVar("F", bound=Callable)
FLOAT32_TINY = 2.0 ** -126
"""float32's smallest normal number: a weight below it is 0 or subnormal where adapters are computed in float32 (it
multiplies float32 deltas), its precision lost or flushed to 0 (GPUs' flush-to-zero)."""


def parse_number(text: str, integer: bool = False, kind: str | None = None) -> float | int:
    """``text`` as a command-line number, else InvalidInputError: written plainly (WEIGHT, or INTEGER) and finite.
    ``kind``: what the refusal says was expected, in place of the generic example (which shows a -1)."""
    if (INTEGER if integer else WEIGHT).fullmatch(text):
        try:
            value = int(text) if integer else float(text)
        except ValueError:  # (int(): more digits than Python converts, 4300 by default)
            raise InvalidInputError(f"'{text[:12]}…' ({len(text)} digits) is too large") from None
        if math.isfinite(value):
            return value
    elif not (_python_number(text) and not math.isfinite(float(text))):
        kind = kind or ("an integer written plainly (like 8)" if integer else f"a number {PLAINLY}")
        raise InvalidInputError(f"{text!r} is not {kind}")
    raise InvalidInputError(f"{text!r} is not a finite number")


def parse_weighted(text: str) -> tuple[str, float]:
    """'ref:0.7' → ('ref', 0.7); 'ref' → ('ref', 1.0). Only a trailing ':<number>' is a weight, and not when the
    whole text is an existing path, so 'C:/models/x', 'dir:with:colons' and 'hub:owner/name' stay references. A tail
    that Python would read as a number but is not written plainly (WEIGHT), or with a decimal comma, is refused, as is
    any tail after an existing path: either way a weight was meant."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or path_exists(text):
        return text, 1.0
    if WEIGHT.fullmatch(tail):
        return head, checked_weight(text, float(tail), nonzero=written_nonzero(tail))
    if _python_number(tail) or DECIMAL_COMMA.fullmatch(tail) or path_exists(head):
        raise InvalidInputError(f"{text!r}: the weight after ':' must be a number {PLAINLY}")
    return text, 1.0


def written_nonzero(text: str) -> bool:
    """Is the number ``text`` (written as WEIGHT takes it) nonzero as written: '1e-400' is, though float() reads 0."""
    return re.search("[1-9]", WEIGHT.fullmatch(text)[1]) is not None


def weighted_inputs(adapters: Iterable[str | tuple[str | Path, float]],
                    name: str = "adapters") -> list[tuple[str, float]]:
    """The library's adapter arguments as (ref, weight) pairs: each a 'REF[:W]' string (parse_weighted), a path (an
    os.PathLike, weight 1) or a (ref, weight) pair. One string for the whole list is refused: iterated, its letters
    were taken as references. ``name``: the parameter that gave them, as the refusal names it."""
    if isinstance(adapters, PATH):
        given = os.fspath(adapters)
        raise InvalidInputError(f"{name} is a list: give [{given!r}], not the string {given!r}")
    if not isinstance(adapters, Iterable):  # (None was a raw TypeError: 'NoneType' object is not iterable)
        raise InvalidInputError(f"{name} is a list of 'REF[:WEIGHT]' strings or (ref, weight) pairs, not "
                                f"{reprlib.repr(adapters)}")
    pairs = []
    for item in adapters:
        if isinstance(item, str):
            pairs.append(parse_weighted(item))
            continue
        ref, weight = item if is_pair(item) else (item, 1) if isinstance(item, os.PathLike) else (None, None)
        if not isinstance(ref, PATH) or not is_weight(weight):
            raise InvalidInputError(f"bad adapter argument {item!r}: give 'REF[:WEIGHT]' or a (ref, weight) pair")
        pairs.append((os.fspath(ref), checked_weight(item, weight, nonzero=weight != 0)))
    return pairs


def checked_weight(item: object, weight: float, *, nonzero: bool) -> float:
    """``weight`` (a real number, is_weight) as a float, read from ``item`` (the argument, as the message names it),
    when it is finite (is_finite) and, given as ``nonzero``, not below FLOAT32_TINY: '1e-400' read as 0.0 and merged
    as no adapter at all. 0 written as 0 is a weight."""
    if not is_finite(weight):
        raise InvalidInputError(f"{item!r}: the weight must be a finite number")
    weight = float(weight)
    if nonzero and abs(weight) < FLOAT32_TINY:
        raise InvalidInputError(f"{item!r}: the weight is not 0 but below float32's smallest normal number "
                                f"({FLOAT32_TINY:.3g}): computed in float32 it is 0 or loses its precision; write 0 "
                                "for no weight")
    return weight


def name_list(value: object, what: str) -> list[str] | None:
    """A caller's list of names (``what``: the parameter; None: none given): a string is refused (iterated, each of its
    characters was taken for a name: `modules m: no weight by that name`), and so is anything but strings."""
    if value is None:
        return None
    if isinstance(value, str):
        raise InvalidInputError(f"{what} is a list of names: give [{value!r}], not the string {value!r}", [what])
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
        raise InvalidInputError(f"{what} is a list of names, not {value!r}", [what])
    return list(value)


def is_pair(item: object) -> bool:
    """A (ref or Adapter, weight) pair as Python code gives one: a tuple, or a list (read from JSON or YAML)."""
    return isinstance(item, (tuple, list)) and len(item) == 2


def is_weight(value: object) -> bool:
    """A weight as Python code gives one: any real number (numpy's too, which float() took before pairs were
    checked), not a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite(value: object) -> bool:
    """A real number (is_weight) that a float holds: not NaN or ±inf, nor an integer beyond float's range, which
    math.isfinite and float() raise OverflowError for (a weight of 10**400 was a traceback)."""
    try:
        return is_weight(value) and math.isfinite(value)
    except OverflowError:
        return False


def is_integer(value: object) -> bool:
    """An integer as Python code gives one (numpy's too), not a bool, a float or a string."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def argument(value: object, name: str, *types: type) -> object:
    """``value`` when it is one of ``types`` (PATH for a path, type(None) where it may be left out) — a path as its
    str (os.fspath), as the command line gives it: str() of an os.PathLike other than a Path is no path — else
    InvalidInputError naming the parameter ``name``: what the library's entry points check their paths, references,
    names and formats with. None, a number, a list or bytes there was a raw TypeError from pathlib, or an
    AttributeError from deep inside."""
    if isinstance(value, types):
        return os.fspath(value) if isinstance(value, os.PathLike) else value
    kinds = [{bool: "True or False", str: "a str", os.PathLike: "an os.PathLike (a pathlib.Path)",
              numbers.Integral: "an int", type(None): "None"}.get(t)
             or f"a {'' if t.__module__.startswith(('builtins', 'loraops')) else t.__module__ + '.'}{t.__name__}"
             for t in types]
    said = " or ".join(kinds) if len(kinds) < 3 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
    raise InvalidInputError(f"{name}= takes {said}, not {reprlib.repr(value)}"
                            + ("" if value is None else f" ({type(value).__name__})"))


FLAG_ANNOTATIONS = {"bool": False, "bool | None": True}
"""How a flag parameter is annotated (the annotations are strings: `from __future__ import annotations`), and
whether None is taken (progress=None: a bar when stderr is a terminal)."""


def flags_checked(fn: F) -> F:
    """``fn`` refusing, in argument's words, anything but True or False (or None where it is annotated
    `bool | None`) for its parameters annotated bool: `force="no"` replaced an output, `create="no"` created a
    registry and `progress="no"` drew a bar, each string being truthy. The library's entry points wear it."""
    signature = inspect.signature(fn)
    flags = {name: FLAG_ANNOTATIONS[str(p.annotation)] for name, p in signature.parameters.items()
             if str(p.annotation) in FLAG_ANNOTATIONS}

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            given = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:  # Python's own error, naming the function, comes from the call itself
            return fn(*args, **kwargs)
        for name, takes_none in flags.items():
            if name in given:
                argument(given[name], name, bool, *[type(None)] * takes_none)
        return fn(*args, **kwargs)
    run.checked_flags = tuple(flags)  # what the tests look for
    return run  # type: ignore[return-value]


def _python_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def refuse_output_over(output: str | Path, refs: Iterable[str]) -> None:
    """An output that is, holds or lies inside an adapter given by path is refused, even with --force (which
    replaced the user's adapter with the result), as an output over the base a merge reads is."""
    for ref in refs:
        if path_exists(ref):
            refuse_overlap(output, ref, "the adapter it reads")
