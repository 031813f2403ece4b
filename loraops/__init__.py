"""loraops: manage LoRA adapters and do their arithmetic.

`import loraops` stays light (no torch, alembic or huggingface_hub); the heavy modules load on first use.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pathlib import Path

from .lazy import LazyModule

if TYPE_CHECKING:
    from . import adapter, basemodel, records
else:  # what extract's annotations name resolves when they are read: lazy.py
    adapter, basemodel, records = (LazyModule(f"loraops.{m}") for m in ("adapter", "basemodel", "records"))

__version__ = "0.1.0"

# notes (what was read in place of what) go to this logger: the CLI says them, the API prints nothing unasked
logging.getLogger(__name__).addHandler(logging.NullHandler())

from .errors import (  # noqa: F401
    AmbiguousError,
    ConflictError,
    DiskSpaceError,
    FormatError,
    HubError,
    InvalidInputError,
    LoraopsError,
    MismatchError,
    NotFoundError,
    RegistryError,
    UnsupportedAdapterError,
)


def extract(base: "str | Path | basemodel.BaseModel", tuned: "str | Path | basemodel.BaseModel",
            **options: Any) -> "tuple[adapter.Adapter, records.ExtractReport]":
    """The LoRA adapter of a fine-tuned model minus its base: (Adapter, ExtractReport); ``options`` are
    loraops.extraction.extract_lazily's (rank, dynamic, param, max_rank, conv_rank, alpha, device, ...). Imported on
    first call: `import loraops` stays light."""
    from .extraction import extract as run

    return run(base, tuned, **options)
