"""`loraops inspect`: what an adapter file or folder holds, without a registry."""
from __future__ import annotations

import shlex
from pathlib import Path

from .errors import NotFoundError
from .fsutil import existing_path
from .records import InspectReport, ModuleRecord
from .st import dtype_name, without_torch


def inspect_path(path: str | Path, alpha: float | None = None) -> InspectReport:
    """Read the adapter at ``path`` (any supported format) and describe it: from its headers and config alone, without
    torch (st.without_torch), unless the read needs a tensor's values or a torch dtype."""
    try:
        path = existing_path(path)
    except NotFoundError as exc:  # (a registered adapter's name was only "no such file or folder")
        raise NotFoundError(f"{exc} (inspect reads files; a registered adapter is shown by `loraops show "
                            f"{shlex.quote(str(path))}`)") from None
    from . import formats

    described = without_torch(lambda: _described(path, alpha))
    files = formats.adapter_files(path)
    return InspectReport(path=str(path), identity=formats.identity(path), files=[str(f) for f in files],
                         size=sum(f.stat().st_size for f in files), **described)


def _described(path: Path, alpha: float | None) -> dict:
    """What the adapter's read says of it (InspectReport's fields but its files')."""
    from . import formats

    adapter = formats.read_adapter(path, alpha=formats.common.given_alpha(alpha, path), values=False)
    return dict(
        format=adapter.format, dtype=dtype_name(adapter.dtype),
        rank=adapter.rank, alpha=adapter.alpha, scale_mode=adapter.scale_mode, target_modules=adapter.target_modules,
        dora=adapter.dora, products=adapter.products, methods=adapter.methods, lora_bias=adapter.lora_bias,
        trainable_tokens={n: list(r.indices) for n, r in adapter.token_rows.items()},
        num_modules=len(adapter.modules), num_parameters=adapter.num_parameters, names_resolved=adapter.names_resolved,
        base_model=adapter.base_model, full_tensors=sorted(adapter.full_tensors), metadata=adapter.metadata,
        modules=[ModuleRecord.of(m) for m in adapter.modules.values()],
    )
