"""The registry of adapters, base models and lineage: ``Registry.open()`` (see store.py)."""
from __future__ import annotations

from .store import BlobProblem, Registry

__all__ = ["Registry", "BlobProblem"]
