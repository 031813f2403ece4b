"""Command-line adapter arguments: REF[:WEIGHT], shared by merge, subtract and combine."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable

from .errors import InvalidInputError
from .fsutil import refuse_overlap


WEIGHT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
"""A weight as written on a command line: decimal or scientific, ASCII digits only. Python's float() also takes
'1_0', 'inf', 'nan', ' 1' and other scripts' digits, which were accepted as weights."""


def parse_weighted(text: str) -> tuple[str, float]:
    """'ref:0.7' → ('ref', 0.7); 'ref' → ('ref', 1.0). Only a trailing ':<number>' is a weight, and not when the
    whole text is an existing path, so 'C:/models/x', 'dir:with:colons' and 'hub:owner/name' stay references. A tail
    that Python would read as a number but is not written plainly (WEIGHT) is refused, as is any tail after an
    existing path: either way a weight was meant."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or Path(text).exists():
        return text, 1.0
    if WEIGHT.fullmatch(tail):
        weight = float(tail)
        if not math.isfinite(weight):
            raise InvalidInputError(f"{text!r}: the weight must be a finite number")
        return head, weight
    if _python_number(tail) or Path(head).exists():
        raise InvalidInputError(f"{text!r}: the weight after ':' must be a number written plainly (like 0.7, -1 or "
                                "2e-3)")
    return text, 1.0


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
        if Path(ref).exists():
            refuse_overlap(output, ref, "the adapter it reads")
