"""loraops: manage LoRA adapters and do their arithmetic.

`import loraops` stays light (no torch, alembic or huggingface_hub); the heavy modules load on first use.
"""
from __future__ import annotations

import logging

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


def extract(base, tuned, **options):
    """The LoRA adapter of a fine-tuned model minus its base: (Adapter, ExtractReport); see loraops.extraction
    (imported on first call: `import loraops` stays light)."""
    from .extraction import extract as run

    return run(base, tuned, **options)
