"""loraops: manage LoRA adapters and do their arithmetic.

`import loraops` stays light (no torch, alembic or huggingface_hub); the heavy modules load on first use.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pathlib import Path

from .lazy import LazyModule

# what extract's annotations name, resolved when they are read (lazy.py); private names, since the package's own
# `adapter`, `basemodel` and `records` are its submodules, which `from loraops import basemodel` must give
if TYPE_CHECKING:
    from . import adapter as _adapter, basemodel as _basemodel, records as _records
else:
    _adapter, _basemodel, _records = (LazyModule(f"loraops.{m}") for m in ("adapter", "basemodel", "records"))

__version__ = "0.1.0"

# notes (what was read in place of what) go to this logger: the CLI says them, the API prints nothing unasked
logging.getLogger(__name__).addHandler(logging.NullHandler())

from .errors import (  # noqa: F401
    AmbiguousError,
    ConflictError,
    DeviceMemoryError,
    DiskSpaceError,
    FormatError,
    HubError,
    InvalidInputError,
    LoraopsError,
    MismatchError,
    ModelLoraError,
    NotFoundError,
    RegistryError,
    UnsupportedAdapterError,
)


def extract(base: "str | Path | _basemodel.BaseModel", tuned: "str | Path | _basemodel.BaseModel",
            **options: Any) -> "tuple[_adapter.Adapter, _records.ExtractReport]":
    """The LoRA adapter of a fine-tuned model minus its base: (Adapter, ExtractReport); ``options`` are
    loraops.extraction.extract_lazily's (rank, dynamic, param, max_rank, conv_rank, alpha, device, ...). Imported on
    first call: `import loraops` stays light."""
    from .extraction import extract as run

    return run(base, tuned, **options)
