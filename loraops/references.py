"""Command-line adapter arguments: REF[:WEIGHT], shared by merge, subtract and combine."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

from .errors import InvalidInputError
from .fsutil import refuse_overlap


def parse_weighted(text: str) -> tuple[str, float]:
    """'ref:0.7' → ('ref', 0.7); 'ref' → ('ref', 1.0). Only a trailing ':<number>' is a weight, and not when the
    whole text is an existing path, so 'C:/models/x' or 'dir:with:colons' stay references."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or Path(text).exists():
        return text, 1.0
    try:
        weight = float(tail)
    except ValueError:
        if Path(head).exists():  # an existing adapter followed by something that is not a weight
            raise InvalidInputError(f"{text!r}: the weight after ':' must be a number") from None
        return text, 1.0
    if not math.isfinite(weight):
        raise InvalidInputError(f"{text!r}: the weight must be a finite number")
    return head, weight


def refuse_output_over(output: str | Path, refs: Iterable[str]) -> None:
    """An output that is, holds or lies inside an adapter given by path is refused, even with --force (which
    replaced the user's adapter with the result), as an output over the base a merge reads is."""
    for ref in refs:
        if Path(ref).exists():
            refuse_overlap(output, ref, "the adapter it reads")
