"""Command-line adapter arguments: REF[:WEIGHT], shared by merge, subtract and combine."""
from __future__ import annotations

import math
from pathlib import Path

from .errors import InvalidInputError


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
