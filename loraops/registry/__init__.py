"""The registry of adapters, base models and lineage: ``Registry.open()`` (see store.py).

Registry loads on first use, so `loraops.registry.reads` (the fast read path of `loraops list`) imports no SQLAlchemy.
"""
from __future__ import annotations

__all__ = ["Registry"]


def __getattr__(name: str):
    if name in __all__:
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
