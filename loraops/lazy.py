"""Modules that annotations name, imported when the annotations are read (typing.get_type_hints, pydantic, a
documentation tool) rather than when the module naming them is: torch, SQLAlchemy and pydantic cost up to a second
that `import loraops` and the CLI's quick commands do not pay. A type checker sees the real import instead::

    if TYPE_CHECKING:
        import torch
    else:
        torch = LazyModule("torch")
"""
from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):  # copy, pickle, introspection: asked of the stand-in (_name may be unset yet)
            raise AttributeError(attribute)
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"
