"""Streaming merge and subtract: adapters into base weights at disk speed, in bounded memory, on CPU or GPU.

    W' = W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ      accumulated in float32 (float64 with precise=True), rounded ONCE to the output dtype

A DoRA adapter (LoraModule.magnitude m) instead takes what the adapters before it made, W', to f ⊙ (W' + Δ), with
Δ = wᵢ·sᵢ·Bᵢ·Aᵢ and f = m / ‖W + Δ‖ per output channel, the norm of the *base* weight plus its own delta: what PEFT's
merge and its forward both compute with the adapters active in the order given (so with DoRA the order matters, and
weight 0 is no no-op: f = m / ‖W‖). An output channel is a row of W, except in a transposed one (GPT-2's Conv1D, an
embedding), where it is a column: the rows of a chunk then do not hold whole channels, so those norms are taken in one
more pass over the tensor before its first chunk (``_Pipeline._column_factors``).

How it streams. The output layout is known before anything is read: same files, same tensor order, same shapes;
only dtypes may change. So each output file is written front to back: its header first, then every tensor's bytes.
Three stages run at once, joined by bounded queues:

  reader thread   pread()s row chunks of the tensors that change into buffers taken from a fixed pool
  main thread     decodes a chunk, adds every adapter's delta for those rows (one addmm each), rounds once
  writer thread   appends the chunks, and the raw bytes of tensors nothing touches (never decoded), to the
                  output file through fsutil.DirectFileWriter (O_DIRECT: the page cache is bypassed); each finished
                  file is fdatasync'ed while the next one is computed

Fingerprint (basemodel's definition: per-tensor sha256, so any order works). With fingerprint=True (the default) a
fourth thread hashes every computed chunk while the writer writes it (hashlib releases the GIL on large buffers); the
chunk's buffer goes back to the pool when both are done, so hashing is off the path from compute to disk. A tensor
copied unchanged takes its digest from the base's digest cache (there whenever the base was fingerprinted). For a
base never fingerprinted, the reader hashes what it reads and the writer hashes what it copies, so the base's digests
get cached as well. The report carries the output's fingerprint and both models' digests are cached: recording the
output and its base re-reads neither.

FP8 bases (loraops.fp8, transformers' fine-grained layout): a weight a LoRA changes is decoded per block before the
deltas are added (dequantize-before) and encoded with fresh block scales after (quantize-after), its chunks holding
whole block rows. Its new scale tensor is a tensor of the plan like any other, whose values come from its weight's
chunks: the plan writes it right after its weight (in the weight's file, the index saying so), whatever its place in
the base (safetensors puts F32 before F8, so scales usually come first). With --dtype every FP8 weight is decoded and
its scales are left out.

Memory is bounded by the pool (a few chunks of ≤ CHUNK_ELEMENTS elements) plus the adapters, whatever the model
size. File I/O and torch kernels release the GIL, so the stages overlap in one process.

Safety: every adapter is checked against the base before anything is written; the output is written into a temp
sibling (fsutil.atomic_path) renamed into place at the end, so a crash or kill leaves no output, only possibly a
`.loraops-tmp-*` sibling that `loraops gc` removes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import re
import resource
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from . import fp8, settings
from .adapter import Adapter, LoraModule, TokenRows, weighted
from .basemodel import PICKLE_SUFFIXES, BaseModel, fingerprint_of, store_digests, tensor_digest
from .check import (SECOND_TRANSFORMER, can_untie, embeddings_untied, head_tied_to, is_side_embeddings, is_tied_head,
                    rows_shape, saved_tie_refusal, shared_embeddings_of, side_stored_apart, stored_twice,
                    tied_decoder_bias, tied_head_source, side_tied_head, side_tokens_apart, unstored_head_of,
                    untie_refusal, untied, untied_side_embeddings, untied_side_source, without_tied_copies)
from .errors import FormatError, InvalidInputError, LoraopsError, MismatchError, UnsupportedAdapterError
from .formats.common import FLOAT32_MAX
from .formats.peft import saved_layer_tensors
from .fp8 import FLOAT_DTYPES, BlockScaled
from .lazy import LazyModule
from .fsutil import (DirectFileWriter, ReadAhead, atomic_path, ensure_free_space, output_path, refuse_misnamed_output,
                     read_json, read_model_config, refuse_overlap, remove_stale_temps)
from .records import MergeInputRecord, MergeReport, ResidualRecord
from .references import PATH, argument, flags_checked
from .st import (DTYPE_BYTES, TensorInfo, all_finite, beyond_range, dtype_name, header_bytes, narrows, read_row_blocks,
                 torch_dtype)

if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")  # what annotations name resolves when they are read: lazy.py

DTYPE_NAMES = {
    "bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "half": "F16",
    "fp32": "F32", "float32": "F32", "float": "F32", "fp64": "F64", "float64": "F64",
}
CHUNK_ELEMENTS = 2 << 20
"""Elements per row chunk: an 8 MiB float32 working set (16 MiB in float64). Measured on a 2-core AVX-512 VM,
convert + rank-16 addmm + round runs at 2.0 G elements/s with 8 MiB chunks and 1.1 with 32 MiB (cache locality)."""
POOL_BUFFERS = 8
"""Chunk buffers in flight (reading, computing, writing, and queued between them)."""


@dataclass
class _Tensor:
    """One output tensor: where its bytes come from and what happens to them."""

    name: str
    """Full name in the base manifest (with a diffusers component prefix), or an untied head's."""
    info: TensorInfo
    out_dtype: str
    terms: list[tuple[LoraModule, float]] = field(default_factory=list)
    """(module, wᵢ·sᵢ) for every adapter that changes this tensor."""
    replacement: "torch.Tensor | None" = None
    token_rows: list[TokenRows] = field(default_factory=list)
    """Trainable tokens (PEFT): rows whose values are replaced (PEFT's index_copy), on the base's or the replacement's
    values, before any LoRA delta."""
    new_name: str | None = None
    """Name in the output file of a tensor the base does not have: an untied head, whose values start from the input
    embeddings in ``info``."""
    digest: str | None = None
    """sha256 hex of the output bytes, when known (fingerprinting)."""
    source_digest: str | None = None
    """sha256 hex of the base tensor's bytes, when known (fingerprinting)."""
    scaled: BlockScaled | None = None
    """How the base stores this weight when it is fine-grained FP8: decoded per block before the deltas are added,
    and encoded again after when the output stays FP8."""
    scale_of: "_Tensor | None" = None
    """For the scale tensor of a weight that is encoded again: that weight, whose chunks compute its values (it is
    written right after the weight)."""
    new_scales: "torch.Tensor | None" = None
    """The inverse scales the chunks of an encoded weight computed (scale grid rows, as stored)."""

    @property
    def file_name(self) -> str:
        return self.new_name or self.info.name

    @property
    def rows(self) -> int:
        # seen as the modules that change parts of it see it (LoraModule.fused): fused experts E×X×Y have E·X rows;
        # one no LoRA changes, by its last dimension (a 3-D one converted by --dtype is not chunked an expert at a time)
        if not self.terms:
            return math.prod(self.info.shape[:-1])
        parts = {module.fused[3] for module, _ in self.terms if module.fused is not None}
        return parts.pop() if parts else self.info.shape[0] if self.info.shape else 1

    @property
    def encoded(self) -> bool:
        """An FP8 weight whose output is FP8 again (with new scales)."""
        return self.scaled is not None and self.out_dtype == self.info.dtype

    @property
    def row_elements(self) -> int:
        return self.info.numel // self.rows if self.rows else 0

    @property
    def chunk_rows(self) -> int:
        """About CHUNK_ELEMENTS elements' worth of rows; whole block rows of an FP8 weight (BlockScaled.row_unit)."""
        unit = self.scaled.row_unit if self.scaled is not None else 1
        return max(1, CHUNK_ELEMENTS // max(1, self.row_elements * unit)) * unit

    @property
    def dora(self) -> bool:
        return any(module.dora for module, _ in self.terms)

    @property
    def out_nbytes(self) -> int:
        return self.info.numel * DTYPE_BYTES[self.out_dtype]

    @property
    def decoded(self) -> bool:
        return (bool(self.terms) or self.replacement is not None or bool(self.token_rows)
                or self.out_dtype != self.info.dtype or self.scale_of is not None)


@dataclass
class _File:
    source: Path
    target: Path
    """Relative to the output root ('' for a single-file output)."""
    tensors: list[_Tensor]
    metadata: dict[str, str]
    untie: bool = False
    """The model in this file's folder comes out with its output head untied from its input embeddings."""
    dequantized: bool = False
    """The FP8 weights of the model in this file's folder come out in a float dtype (its quantization_config goes)."""

    @property
    def header(self) -> bytes:
        return header_bytes(((t.file_name, t.out_dtype, t.info.shape) for t in self.tensors), self.metadata)

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.out_nbytes for t in self.tensors)


# Pipeline items, in output order.
@dataclass
class _Open:
    path: Path
    header: bytes
    size: int


@dataclass
class _Copy:
    source: Path
    start: int
    nbytes: int
    tensors: list[_Tensor]


@dataclass
class _Chunk:
    tensor: _Tensor
    row0: int
    row1: int
    buffer: "torch.Tensor | None" = None
    scales: "torch.Tensor | None" = None
    """An FP8 weight's inverse scales for these rows (float32, one row per block row)."""
    out_nbytes: int = 0
    holders: int = 1
    """Stages still reading the buffer (writer, and hasher when fingerprinting)."""


@dataclass
class _Close:
    path: Path
    size: int


_END = object()


def parse_dtype(dtype: "str | torch.dtype | None") -> str | None:
    """'bf16' / 'fp16' / 'fp32' / torch.bfloat16 / 'BF16' → safetensors dtype name (None stays None). 'fp64' too,
    which only the Python API offers (the CLI's --dtype is a choice of the other three): a float64 merge keeps W + ΔW
    unrounded, so subtracting the same adapters gives a float32 base back bit for bit without a recorded lineage."""
    if dtype is None:
        return None
    name = dtype_name(dtype)
    if name.upper() in FLOAT_DTYPES:
        return name.upper()
    if name.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[name.lower()]
    raise InvalidInputError(f"unknown dtype {dtype!r}: use bf16, fp16, fp32 or fp64")


@flags_checked
def merge(
    base: str | Path | BaseModel,
    adapters: Sequence[tuple[Adapter, float]],
    output: str | Path,
    *,
    dtype: "str | torch.dtype | None" = None,
    device: "str | torch.device" = "auto",
    precise: bool = False,
    force: bool = False,
    progress: bool | None = None,
    fingerprint: bool = True,
    transformer_2: Sequence[tuple[Adapter, float]] = (),
) -> MergeReport:
    """Write base + Σ wᵢ·sᵢ·Bᵢ·Aᵢ to ``output`` (a folder like the base's, or one .safetensors for a single-file
    base). ``dtype`` changes the output dtype of every floating tensor (integer tensors are never converted).
    ``fingerprint``: hash the output while writing it (report.fingerprint; see the module docstring).
    ``transformer_2``: (Adapter, weight) pairs merged into the second transformer of a Wan 2.2 pipeline folder
    (``transformer_2/``, the low-noise expert; check.SECOND_TRANSFORMER), as into that folder given as the base; the
    ``adapters`` bind to the pipeline as always (its ``transformer/``)."""
    adapters = _components(weighted(adapters, "merge"), weighted(transformer_2, "merge's transformer_2"))
    return _run("merge", base, adapters, output, dtype=dtype, device=device, precise=precise, force=force,
                progress=progress, fingerprint=fingerprint)


@flags_checked
def subtract(
    model: str | Path | BaseModel,
    adapters: Sequence[tuple[Adapter, float]],
    output: str | Path,
    *,
    dtype: "str | torch.dtype | None" = None,
    device: "str | torch.device" = "auto",
    precise: bool = False,
    force: bool = False,
    progress: bool | None = None,
    reference: str | Path | BaseModel | None = None,
    fingerprint: bool = True,
    transformer_2: Sequence[tuple[Adapter, float]] = (),
) -> MergeReport:
    """Write model − Σ wᵢ·sᵢ·Bᵢ·Aᵢ. The report's ``residual`` says what the round trip left: always the largest
    rounding error of the output, and, when ``reference`` (the pristine base) is given, how many elements of the
    touched tensors differ from it. In bf16/fp16 this is never zero: merge rounded W + ΔW once already. A DoRA adapter
    is refused: see ``refuse_dora``. ``transformer_2``: as merge's, taken off the second transformer."""
    adapters = _components(weighted(adapters, "subtract"), weighted(transformer_2, "subtract's transformer_2"))
    for adapter, _, _ in adapters:
        refuse_dora(adapter)
        refuse_token_rows(adapter)
    return _run("subtract", model, [(a, -w, c) for a, w, c in adapters], output, dtype=dtype, device=device,
                precise=precise, force=force, progress=progress, reference=reference, fingerprint=fingerprint)


def _components(adapters: list[tuple[Adapter, float]],
                transformer_2: list[tuple[Adapter, float]]) -> list[tuple[Adapter, float, str | None]]:
    """merge's and subtract's adapters as (adapter, weight, the pipeline component it binds to alone, or None)."""
    return [(a, w, None) for a, w in adapters] + [(a, w, SECOND_TRANSFORMER) for a, w in transformer_2]


def _run(operation, base, adapters, output, *, dtype, device, precise, force, progress, fingerprint,
         reference=None) -> MergeReport:
    import torch

    started = time.perf_counter()
    output = argument(output, "output", *PATH)
    if not isinstance(base, BaseModel):
        base = BaseModel.open(argument(base, "base" if operation == "merge" else "model", *PATH))
    if reference is not None and not isinstance(reference, BaseModel):
        reference = BaseModel.open(argument(reference, "reference", *PATH))
    out_dtype = parse_dtype(dtype)
    dev = settings.resolve_device(device)
    refuse_misnamed(base, output, operation)
    output = output_path(output)
    refuse_overlap(output, base.path, "the model it reads")
    if reference is not None:
        refuse_overlap(output, reference.path, "the pristine base it compares with")
    components = [component for _, _, component in adapters]
    adapters = [(fit(adapter, base, component), weight) for adapter, weight, component in adapters]
    files = _plan(base, adapters, out_dtype, undo=operation == "subtract")
    compared = _check_reference(reference, files) if reference is not None else {}
    copied, left_out = _other_files(base)
    _ensure_room(base, files, copied, output)
    tensors = [t for f in files for t in f.tensors]
    compute_dtype = torch.float64 if precise or any("F64" in (t.info.dtype, t.out_dtype) for t in tensors) else torch.float32
    stats = _Residual(reference, compared) if operation == "subtract" else None
    if fingerprint:
        known = base.cached_digests()
        for tensor in tensors:
            tensor.source_digest = known.get(tensor.name)
            tensor.digest = None if tensor.decoded else tensor.source_digest
    with atomic_path(output, force=force, is_dir=not base.is_single_file) as tmp:
        root = tmp if not base.is_single_file else tmp.parent
        if base.is_single_file:
            files[0].target = Path(tmp.name)
        bar = settings.progress_bar(sum(f.size for f in files), f"{operation} → {output.name}", progress)
        base.stop_prefetch()  # from here on the pipeline's reads keep the disk busy
        try:
            with settings.device_memory(dev, f"{VERBS[operation]} {base.path}", precise):
                _Pipeline(operation, root, dev, compute_dtype, bar, stats, fingerprint).run(files)
        finally:
            bar.close()
        if not base.is_single_file:
            _copy_other_files(base, copied, tmp, files, out_dtype)
    if fingerprint:
        _store_digests(base, output, files, known)
    return MergeReport(
        operation=operation,
        output=str(output),
        base_path=str(base.path),
        adapters=[
            MergeInputRecord(ref=a.label, weight=w, modules=len(a.modules),
                             full_tensors=len(a.full_tensors), component=component)
            for (a, w), component in zip(adapters, components, strict=True)
        ],
        dtype=out_dtype or base.dtype,
        device=str(dev),
        precise=precise,
        tensors_merged=sum(bool(t.terms) for t in tensors),
        tensors_replaced=sum(t.replacement is not None or bool(t.token_rows) for t in tensors),
        tensors_converted=sum(t.decoded and not t.terms and t.replacement is None and not t.token_rows
                              and t.scale_of is None for t in tensors),
        tensors_copied=sum(not t.decoded for t in tensors),
        bytes_written=sum(f.size for f in files),
        seconds=round(time.perf_counter() - started, 3),
        peak_rss_bytes=peak_rss(),
        residual=stats.record() if stats else None,
        files_left_out=[str(p) for p in left_out],
        heads_untied=[t.name for f in files if f.untie for t in f.tensors  # written anew, or a stored copy
                      if t.name.endswith(".weight") and (t.new_name is not None or _is_head(base, t.name))
                      and not is_side_embeddings(t.name)],  # (BART's, untied)
        fingerprint=fingerprint_of((t.name, t.out_dtype, t.info.shape, t.digest) for t in tensors) if fingerprint else None,
    )


def refuse_dora(adapter: Adapter) -> None:
    """DoRA cannot be taken off arithmetically: its merge rescaled each output channel by m / ‖W + ΔW‖, a norm of the
    base weights W that the merged model no longer holds."""
    if adapter.dora:
        raise UnsupportedAdapterError(
            f"{adapter.label}: a DoRA adapter cannot be subtracted: its merge rescaled every output channel by "
            "magnitude/‖W + s·B·A‖, a norm of the base weights the merged model no longer holds; `exact=True` "
            "restores a merge loraops recorded from its base", ["exact"]
        )


def refuse_token_rows(adapter: Adapter) -> None:
    """Trainable tokens cannot be taken off: their merge replaced rows, whose old values the merged model no longer
    holds."""
    if adapter.token_rows:
        name = next(iter(adapter.token_rows))
        raise UnsupportedAdapterError(
            f"{adapter.label}: an adapter with PEFT trainable tokens cannot be subtracted: its merge replaced rows of "
            f"{name!r}, whose old values the merged model no longer holds; `exact=True` restores a merge loraops "
            "recorded from its base", ["exact"]
        )


def applies(module: LoraModule, weight: float) -> bool:
    """Does ``module`` at ``weight`` change its tensor? A DoRA module always does: at weight 0 it still rescales each
    output channel to its magnitude (PEFT's set_scale(0) too)."""
    return module.dora or weight * module.scale != 0


VERBS = {"merge": "merging into", "subtract": "subtracting from", "restore": "restoring"}


def refuse_misnamed(model: BaseModel, output: str | Path, operation: str) -> None:
    """The output of ``operation`` on ``model`` is of the model's kind: a folder of a folder model, one file of a
    single-file one; named as the other kind, it is refused (fsutil.refuse_misnamed_output)."""
    refuse_misnamed_kind(model.is_single_file, model.path.name, output, operation, model.path)


def refuse_misnamed_kind(single_file: bool, label: str, output: str | Path, operation: str,
                         path: str | Path | None = None) -> None:
    """refuse_misnamed for a model known by its kind, label and ``path`` only, before it is opened (or downloaded):
    a single file's output may end in that file's own suffix too (model.sft → out.sft)."""
    kind = "single-file" if single_file else "folder"
    own = Path(path).suffix if single_file and path else ""
    # (not a pickle's: safetensors bytes read as model.bin, but an out.bin is what other tools torch.load)
    refuse_misnamed_output(output, is_dir=not single_file, what=f"the output of {VERBS[operation]} the {kind} model "
                           f"{label}", own="" if own.lower() in PICKLE_SUFFIXES else own)


def check_room(base: BaseModel, output: str | Path, dtype: "str | torch.dtype | None" = None) -> int:
    """Refuse an output that cannot fit before any adapter is loaded (the run checks again, with its adapters);
    returns the bytes it needs."""
    return _ensure_room(base, _plan(base, [], parse_dtype(dtype)), _other_files(base)[0], output_path(output))


def _ensure_room(base: BaseModel, files: list[_File], copied: list[Path], output: Path) -> int:
    remove_stale_temps(output)  # what a killed earlier run to this output left, before counting free space
    needed = sum(f.size for f in files) + sum((base.path / p).stat().st_size for p in copied)
    ensure_free_space(output.parent, needed, output.name)
    return needed


def _store_digests(base: BaseModel, output: Path, files: list[_File], known: dict[str, str]) -> None:
    """Cache the digests the pipeline computed: the output's, and the base's when they were not cached."""
    empty = hashlib.sha256().hexdigest()
    sources: dict[Path, dict[str, str | None]] = {}  # base file → its tensors' digests
    fresh: set[Path] = set()  # the base files whose digests were not cached
    for file in files:
        for tensor in file.tensors:
            if not tensor.decoded:
                tensor.source_digest = tensor.digest
            # A tensor without rows has no chunk to hash.
            if tensor.digest is None and tensor.out_nbytes == 0:
                tensor.digest = empty
            if tensor.source_digest is None and tensor.info.nbytes == 0:
                tensor.source_digest = empty
        store_digests(output / file.target if not base.is_single_file else output,
                      {t.file_name: t.digest for t in file.tensors})
        for t in file.tensors:
            if t.new_name is None:
                sources.setdefault(t.info.file, {})[t.info.name] = t.source_digest
                if t.name not in known:
                    fresh.add(t.info.file)
    for source in fresh:
        digests = sources[source]
        if None in digests.values():  # (a replaced tensor's base bytes are never read: such a file stays unknown)
            continue
        # the scales of FP8 weights that come out dequantized are left out of the output unread: small, hashed here
        left_out = [info for name, info in base.headers[source].tensors.items() if name not in digests]
        digests.update((info.name, tensor_digest(info)) for info in left_out)
        store_digests(source, digests)


def peak_rss() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def fit(adapter: Adapter, base: BaseModel, component: str | None = None) -> Adapter:
    """The adapter bound to ``base`` (kohya names resolved), or one MismatchError line listing what does not fit;
    with ``component``, to that pipeline component alone (check.fitting)."""
    from .check import require_fit

    bound = require_fit(adapter, base.tensors, base_name=str(base.path), quantization=base.quantization_config,
                        sides=base.config, heads=base.ties_stored_heads, component=component)
    for name, module in bound.modules.items():
        if (why := saved_tie_refusal(bound, module, base.tensors, base.config)) is not None:
            raise MismatchError(f"{adapter.label}: {name!r} is {why}")
    return bound


def _plan(base: BaseModel, adapters: list[tuple[Adapter, float]], out_dtype: str | None, *,
          undo: bool = False) -> list[_File]:
    adapters = [(without_tied_copies(adapter, base.tensors, base.config, heads=base.ties_stored_heads), weight)
                for adapter, weight in adapters]
    heads = _unstored_heads(base, adapters, undo)
    terms: dict[str, list[tuple[LoraModule, float]]] = {}
    changed_by: dict[str, set[int]] = {}  # tensor → the inputs whose LoRAs change it
    replacements: dict[str, "torch.Tensor"] = {}
    replaced_by: dict[str, int] = {}
    saved_layers: set[str] = set()  # the replacements that are PEFT saved layers under a LoRA
    position: dict[int, int] = {}  # id(module) → its adapter's place in the order given (DoRA's order matters)
    for index, (adapter, weight) in enumerate(adapters):
        for module in adapter.modules.values():
            if abs(weight * module.scale) > FLOAT32_MAX:  # addmm_ refused it as a coefficient: a traceback
                raise InvalidInputError(f"{adapter.label}: weight {weight:g} × scale {module.scale:g} of module "
                                        f"{module.name!r} is beyond what float32 holds")
            # (PEFT lora_bias: the change to the layer's bias is a module of its own, on the bias tensor)
            for term in [module] if module.lora_bias is None else [module, module.bias_term()]:
                if applies(term, weight):
                    terms.setdefault(term.weight_name, []).append((term, weight * term.scale))
                    changed_by.setdefault(term.weight_name, set()).add(index)
                    position[id(term)] = index
        adapted = saved_layer_tensors(adapter)
        for name, tensor in adapter.full_tensors.items():
            # PEFT's saved layer under a LoRA (save_embedding_layers): untouched by training it replaces nothing;
            # a subtract takes the LoRA's delta back off and leaves the layer as the merge made it
            if name in adapted and (undo or _same_as_base(base, heads.get(name, name), tensor)):
                continue
            # A modules_to_save tensor is a new value, not a difference: there is nothing to scale or negate.
            if weight != 1 and undo:  # (subtract passes -w: its `x:-1` puts the tensor in, as a merge does)
                raise UnsupportedAdapterError(
                    f"{adapter.label}: an adapter that replaces {name!r} with a full tensor (modules_to_save) cannot "
                    "be subtracted: its merge wrote that tensor over the base's, whose values the merged model no "
                    "longer holds; `exact=True` restores a merge loraops recorded from its base", ["exact"]
                )
            if weight != 1:
                raise InvalidInputError(
                    f"{adapter.label}: replaces {name!r} with a full tensor (modules_to_save or a saved layer), "
                    f"which cannot be applied with weight {weight:g}; only weight 1 (a plain merge) is defined"
                )
            if name in replacements:
                raise InvalidInputError(f"two adapters replace {name!r} (modules_to_save); merge them separately")
            replacements[name] = tensor
            replaced_by[name] = index
            if name in adapted:
                saved_layers.add(name)
    for bias in [name for name in terms if name.endswith(".bias")]:  # (only lora_bias: see LoraModule.bias_term)
        # PEFT's decoder bias is the parameter transformers ties it to (BERT's cls.predictions.bias): its merge gives
        # both names the lora_bias, so both come out with it, one value for the one parameter; a subtract from the
        # merged model (both stored) takes it off both
        if (parent := _tied_bias_parent(base, heads, bias)) is not None and parent not in terms:
            terms[parent], changed_by[parent] = terms[bias], changed_by[bias]
    rows = _token_rows(adapters, changed_by, replaced_by)
    for name, index in replaced_by.items():
        # the LoRA of the adapter that saved the layer is added on its value (PEFT's save_embedding_layers); another
        # adapter's was trained on a different tensor
        if changed_by.get(name, set()) - {index}:
            raise InvalidInputError(f"{name!r} is replaced by one adapter (modules_to_save) and changed by another's "
                                    "LoRA; merge them separately")
    _inherit(base, heads, rows, replacements, saved_layers)
    # (a T5's side written apart from shared keeps the config: transformers ties its sides by value)
    untied = {base.tensors[source].file for head, source in heads.items()
              if not side_stored_apart(head, base.config(source))}
    touched, apart = terms.keys() | replacements.keys() | rows.keys(), _changed_apart(adapters)
    stored_sides = {}  # each side's embed_tokens stored as a copy of shared, in a group the merge unties → shared
    for group in _stored_twice(base, touched):
        # a head changed, or the embeddings it is tied to apart from it (see _changed_apart; as where it is not
        # stored: unstored_head_of), or one side's embed_tokens of a model whose config unties them from shared
        # (check.untied_side_source). Other copies of the embeddings (T5's shared and each side's embed_tokens, saved
        # before transformers 5) are one parameter: they share their changes, but for one side's embed_tokens of a T5
        # changed apart, written with its own changes alone (check.side_stored_apart; not shared's, which nothing
        # in the merged model's config tells a subtract to take off it, as BART's untied config does)
        group_heads = {name for name in group if _is_head(base, name)}
        source = next((name for name in sorted(group) if untied_side_embeddings(name, base.config(name))), None)
        group_sides = group & set(untied_side_embeddings(source, base.config(source))) if source else set()
        # (a side's own trainable tokens too: PEFT ties them to nothing; without_tied_copies took shared's copies)
        untie = not undo and _can_untie(base, min(group)) and (bool(group_sides & (apart | rows.keys())) or any(
            name in touched if name in group_heads
            else name in apart and head_tied_to(name, base.config(name)) in group_heads for name in group))
        # (by its trainable tokens too: PEFT ties a side's to nothing; shared's it saves for each side as well)
        own = {name for name in group & (apart | rows.keys())
               if not undo and side_stored_apart(name, base.config(name))}
        one = (group - group_heads - group_sides if untie else group) - own
        together = sorted((term for name in sorted(one) for term in terms.get(name, [])),
                          key=lambda term: position[id(term[0])])
        replacement = next((replacements[name] for name in sorted(one) if name in replacements), None)
        shared_rows = [r for name in sorted(one) for r in rows.get(name, [])]
        for name in one:
            if together:
                terms[name] = together
            if shared_rows:
                rows[name] = shared_rows
            if replacement is not None:
                replacements[name] = replacement
        if untie:
            untied |= {base.tensors[name].file for name in group}  # each head keeps its own changes
            stored_sides.update(dict.fromkeys(group_sides, source))
            biases = _decoder_biases(base, {name: name for name in group_heads})
            heads.update(biases)
            untied |= {base.tensors[parent].file for parent in biases.values()}
            embeddings = source or min(group - group_heads, default=None)
            _inherit(base, {**({name: embeddings for name in group_heads} if embeddings else {}), **biases}, rows,
                     replacements, saved_layers)  # but for what PEFT's tied weight carries
    # shared's change is each side's lookup's (check.embeddings_untied; one parameter in the adapter's model, where a
    # side is untied: written as shared's copy, or stored as one); a side's own change stays its own
    sides = {side: shared for shared in touched if shared in base.tensors and embeddings_untied(base.config(shared))
             for side in untied_side_embeddings(shared, base.config(shared)) if side in base.tensors}
    written = _untied_side_embeddings(base, untied)
    heads.update(written)
    # (FSMT's encoder lookup, written as its decoder's: that one's own change is its decoder's lookup alone)
    written_apart = {side: e for side, e in written.items() if not is_side_embeddings(e)}
    for side, shared in {**sides, **stored_sides, **written_apart}.items():
        if side in replacements:  # saved whole (modules_to_save): PEFT's model reads that copy, not shared's changes
            continue
        if shared in terms:
            terms[side] = sorted([*terms[shared], *terms.get(side, [])], key=lambda term: position[id(term[0])])
        for changes in (rows, replacements):
            if shared in changes and side not in changes:
                changes[side] = changes[shared]
    # fine-grained FP8 weights (loraops.fp8): those the adapters change, encoded again with new scales; with --dtype
    # every one, dequantized, and its scales left out
    scaled = {}
    for name in [*terms, *replacements, *rows, *heads]:
        source = heads.get(name, name)
        if (found := fp8.layout(base.tensors, source, base.quantization_config(source))) is not None:
            scaled[name] = found
    if out_dtype is not None:
        scaled.update(fp8.layouts(base.tensors, base.quantization_config))
    for name in scaled.keys() & terms.keys():
        # its column norms come from one more pass over the stored tensor (_base_blocks), which reads it undecoded
        if (module := next((m for m, _ in terms[name] if m.dora and m.transposed), None)) is not None:
            raise UnsupportedAdapterError(f"DoRA module {module.name!r}: {name!r} is FP8 and stored in×out, which a "
                                          "DoRA merge does not read; convert the base first (a merge with `dtype` "
                                          "bf16)", ["dtype"])
    left_out = {n for found in scaled.values() for n in (found.scale_name, *found.companions)} if out_dtype else set()
    # (an untied head's layout is its embeddings': their scale is encoded only when they are)
    encoded = {found.scale_name for name, found in scaled.items() if name not in heads} if out_dtype is None else set()
    by_file: dict[Path, list[tuple[str, TensorInfo]]] = {}
    for name, info in base.tensors.items():
        by_file.setdefault(info.file, []).append((name, info))
    files = []
    for part in base.parts:
        for source in part.files:
            tensors = []
            for name, info in sorted(by_file.get(source, []), key=lambda item: item[1].start):
                if name in left_out or name in encoded:  # an encoded weight's scale is written after it
                    continue
                convert = out_dtype is not None and (info.dtype in FLOAT_DTYPES or name in scaled)
                component = name.removesuffix(info.name)  # a pipeline's "unet." …
                for out_name in [name, *sorted(head for head, embeddings in heads.items() if embeddings == name)]:
                    dtype = out_dtype if convert else info.dtype
                    if out_name != name and out_dtype is None and scaled.get(out_name) is not None:
                        dtype = _untied_head_dtype(base, name, out_name.removeprefix(component))
                    tensor = _Tensor(out_name, info, dtype, terms.get(out_name, []),
                                     replacements.get(out_name), rows.get(out_name, []), scaled=scaled.get(out_name),
                                     new_name=None if out_name == name else out_name.removeprefix(component))
                    tensors.append(tensor)
                    if tensor.encoded:  # an untied head's scale under its own name, not its embeddings'
                        tensors.append(_Tensor(tensor.scaled.scale_name if tensor.new_name is None
                                               else fp8.scale_name(tensor.name), tensor.scaled.scale,
                                               tensor.scaled.scale.dtype, scale_of=tensor if tensor.decoded else None,
                                               new_name=tensor.new_name and fp8.scale_name(tensor.new_name)))
            if not tensors and by_file.get(source):
                continue  # it held only FP8 scales, moved to their weights' files or left out: no index lists it
            target = source.relative_to(base.path) if part.folder is not None else Path(source.name)
            files.append(_File(source, target, tensors, base.headers[source].metadata, untie=source in untied,
                               dequantized=out_dtype is not None and any(t.scaled for t in tensors)))
    return files


def _untied_side_embeddings(base: BaseModel, untied: set[Path]) -> dict[str, str]:
    """Each side's input embeddings that a model coming out untied (a file of its folder in ``untied``) reads apart
    from its shared embeddings, which the base does not store (BART's: transformers ties them to model.shared only
    while tied, check.untied_side_embeddings) → those shared embeddings."""
    folders = {base.model_folder(file) for file in untied}
    return {side: name for name, info in base.tensors.items() if base.model_folder(info.file) in folders
            for side in untied_side_embeddings(name, base.config(name)) if side not in base.tensors}


def _untied_head_dtype(base: BaseModel, embeddings: str, head: str) -> str:
    """The dtype of a head untied from FP8 embeddings: FP8 (with its own scale) where transformers loads it as
    FP8, else the model's float dtype (bf16 when its config names none). transformers skips the output head when it
    converts Linears to FP8 (fp8.loaded_as_fp8), and on a GPU that plain Linear takes the FP8 bytes as values."""
    config = base.config(embeddings)
    if fp8.loaded_as_fp8(head.removesuffix(".weight"), base.quantization_config(embeddings)):
        return base.tensors[embeddings].dtype
    named = config.get("dtype") or config.get("torch_dtype")
    found = DTYPE_NAMES.get(named.lower()) if isinstance(named, str) else None
    return found if found in ("BF16", "F16", "F32") else "BF16"


def _token_rows(adapters: list[tuple[Adapter, float]], changed_by: dict[str, set[int]],
                replaced_by: dict[str, int]) -> dict[str, list[TokenRows]]:
    """Tensor → the trainable tokens that replace some of its rows, refusing what PEFT does not define: a weight
    other than 1 (a replacement is not a difference), a LoRA or another adapter's full tensor on the same tensor, two
    adapters' tokens on one row."""
    rows: dict[str, list[TokenRows]] = {}
    for index, (adapter, weight) in enumerate(adapters):
        for name, token_rows in adapter.token_rows.items():
            if weight != 1:
                raise InvalidInputError(
                    f"{adapter.label}: replaces rows {list(token_rows.indices)[:4]} of {name!r} (PEFT trainable tokens), "
                    f"which cannot be applied with weight {weight:g}; only weight 1 (a plain merge) is defined"
                )
            if name in changed_by:
                same = changed_by[name] == {index}
                raise InvalidInputError(
                    f"{adapter.label}: {name!r} has trainable tokens and is changed by "
                    + ("a LoRA of the same adapter, which PEFT itself refuses to build (trainable_token_indices cannot "
                       "wrap a LoRA layer)" if same else "another adapter's LoRA; merge them separately, in the order "
                                                          "you mean")
                )
            if replaced_by.get(name, index) != index:
                raise InvalidInputError(f"{name!r} is replaced by one adapter (modules_to_save) and has trainable tokens "
                                        f"in another ({adapter.label}); merge them separately")
            taken = {i for r in rows.get(name, []) for i in r.indices} & set(token_rows.indices)
            if taken:
                raise InvalidInputError(f"two adapters replace row {min(taken)} of {name!r} (PEFT trainable tokens), "
                                        "which PEFT refuses too; merge them separately")
            rows.setdefault(name, []).append(token_rows)
    return rows


def _inherit(base: BaseModel, heads: dict[str, str], rows: dict[str, list[TokenRows]],
             replacements: dict[str, "torch.Tensor"], saved_layers: set[str]) -> None:
    """Give the untied heads (head → its embeddings) what PEFT puts into the one weight a tied model's head reads,
    where they have none of their own: the embeddings' trainable tokens (PEFT ties them to the head: its layer,
    LoRA-wrapped or not, reads the embeddings' weight with the tokens in place), and a saved layer under the
    embeddings' LoRA (PEFT loads it into that weight); and the embeddings the saved layer under the head's LoRA
    where they have none (PEFT loads it into that one weight too, the embeddings' values then: its lm_head.base_layer
    is the tied parameter). Not a modules_to_save copy (PEFT wraps the embeddings apart),
    and not rows for a head given tokens of its own (trainable_token_indices={"lm_head": …} with other indices: it is
    wrapped apart and reads the base's weight). And an untied decoder's bias (→ the bias transformers ties it to,
    _decoder_biases) gets that bias' new value: PEFT's bias="all"/"lora_only" trains the one parameter both are."""
    for head, embeddings in heads.items():
        # (not a side's tokens: PEFT ties them to nothing, the head reads the base's weight, as an unshared Marian's;
        # but Whisper's decoder.embed_tokens are its input embeddings)
        if head not in rows and embeddings in rows and not side_tokens_apart(embeddings, base.config(embeddings)):
            rows[head] = rows[embeddings]
        if head not in replacements and embeddings in replacements \
                and (embeddings in saved_layers or head.endswith(".bias")):
            replacements[head] = replacements[embeddings]
        elif embeddings not in replacements and head in saved_layers:
            replacements[embeddings] = replacements[head]


def _unstored_heads(base: BaseModel, adapters: list[tuple[Adapter, float]], undo: bool) -> dict[str, str]:
    """Output heads the base does not store, since it ties them to its input embeddings, that a merge changes apart
    from those embeddings → those embeddings: heads an adapter changes, and the heads of embeddings a LoRA or a
    modules_to_save copy changes (_changed_apart).
    The merge writes such a head as a tensor of its own (the embeddings' values + the head's changes, if any) and
    unties the model's config; the embeddings get only their own changes. The merged model then computes what the
    adapter's model computed (PEFT's LoRA on the embeddings changes their lookup only; its head reads the shared
    base weight), where changing the one shared tensor (PEFT's merge) would move the head by the embeddings' delta,
    or the input embeddings by the head's."""
    wanted = {m.weight_name: m.weight_shape for adapter, weight in adapters for m in adapter.modules.values()
              if applies(m, weight)}
    wanted.update((name, tuple(t.shape)) for adapter, _ in adapters for name, t in adapter.full_tensors.items())
    wanted.update((name, rows_shape(r, base.tensors)) for adapter, _ in adapters for name, r in adapter.token_rows.items())
    heads = {}
    for name, shape in sorted(wanted.items()):
        if undo and (embeddings := tied_head_source(name, shape, base.tensors)) is not None:
            raise InvalidInputError(f"{name!r} is not in the model, which ties its output head to {embeddings!r}: "
                                    "there is no head to take a LoRA off")
        if undo and (shared := untied_side_source(name, shape, base.tensors, base.config)) is not None:
            raise InvalidInputError(f"{name!r} is not in the model, which ties it to {shared!r}: there is no "
                                    "separate lookup to take a LoRA off")
        embeddings = untied_head_source(base, name, shape)
        if embeddings is not None:
            heads[name] = embeddings
        elif (shared := untied_side_source(name, shape, base.tensors, base.config)) is not None:
            # one side changed apart from shared: the model comes out untied, its head (if any) shared's copy
            heads[name] = shared
            if (head := side_tied_head(shared, base.tensors, base.config(shared))) not in (None, *base.tensors):
                heads.setdefault(head, shared)
    for name in sorted(_changed_apart(adapters) & base.tensors.keys()) if not undo else ():
        head = unstored_head_of(name, base.tensors, base.config(name))
        if head is not None and head not in heads:
            heads[head] = name
    # a stored side's embed_tokens with trainable tokens of its own (PEFT ties a side's tokens to nothing; shared's
    # copies are gone: without_tied_copies): a BART's side stored as shared's copy, an unshared Marian's decoder.
    # Untied as by a LoRA there, its head the base's copy (of shared, or of that side) without those rows
    for name, shape in sorted(wanted.items()) if not undo else ():
        if name in base.tensors and any(name in adapter.token_rows for adapter, _ in adapters) \
                and side_tokens_apart(name, base.config(name)) \
                and (head := unstored_head_of(name, base.tensors, base.config(name))) is not None:
            heads.setdefault(head, shared_embeddings_of(name, shape, base.tensors) or name)
    heads.update(_decoder_biases(base, heads))
    return heads


def untied_head_source(base: BaseModel, name: str, shape) -> str | None:
    """The input embeddings whose values an output head ``name`` (of ``shape``) starts from when a merge writes it as a
    tensor of its own, untied: the base ties the head to them and does not store it (tied_head_source); None when
    the head is no such one. Refused where loraops does not untie: a config that says the head is untied, and an
    encoder-decoder model (merge; extract of a fine-tune that untied its head)."""
    embeddings = tied_head_source(name, shape, base.tensors)
    if embeddings is not None and (why := untie_refusal(embeddings, base.config(embeddings))) is not None:
        raise MismatchError(f"{name!r} is {why}")
    return embeddings


def _decoder_biases(base: BaseModel, heads: dict[str, str]) -> dict[str, str]:
    """The biases of untied ``heads`` (→ a tensor of their model in the base) that transformers ties to their parent's
    while the head is tied (BERT's, RoBERTa's, ALBERT's decoder's), which the base does not store → that parent's:
    written as the head's own, or transformers loads the untied model with a newly initialized one."""
    biases = {}
    for head, tensor in heads.items():
        bias = tied_decoder_bias(head, base.config(tensor))
        if bias is not None and bias[0] not in base.tensors and bias[1] in base.tensors:
            biases[bias[0]] = bias[1]
    return biases


def _tied_bias_parent(base: BaseModel, heads: dict[str, str], bias: str) -> str | None:
    """The stored bias transformers ties a decoder's ``bias`` to (BERT's cls.predictions.bias), or None: from the
    untied heads where the base does not store ``bias`` (_decoder_biases), else by the model's class (a merged,
    untied BERT stores both; transformers before 5 ties them whatever its config says)."""
    if bias not in base.tensors:
        return heads.get(bias)
    pair = tied_decoder_bias(bias.removesuffix(".bias") + ".weight", base.config(bias))
    return pair[1] if pair is not None and pair[0] == bias and pair[1] in base.tensors else None


def _changed_apart(adapters: list[tuple[Adapter, float]]) -> set[str]:
    """The tensors a merge changes apart from a head tied to them, in PEFT's adapted model: by a LoRA (PEFT's LoRA on
    the embeddings changes their lookup only; the head reads the shared base weight) or a modules_to_save copy
    (PEFT wraps a copy of the embeddings; the head reads the base weight). Not trainable tokens (PEFT ties them to
    the head) nor a saved layer under a LoRA or tokens (PEFT loads it into the shared weight: see _inherit)."""
    return {name for adapter, weight in adapters
            for name in [*(m.weight_name for m in adapter.modules.values() if applies(m, weight)),
                         *(adapter.full_tensors.keys() - saved_layer_tensors(adapter) - adapter.token_rows.keys())]}


def _can_untie(base: BaseModel, tensor: str) -> bool:
    """May the model holding ``tensor`` come out with tie_word_embeddings false (check.can_untie)?"""
    return can_untie(base.config(tensor))


def _same_as_base(base: BaseModel, name: str, tensor: "torch.Tensor") -> bool:
    """Does this full tensor hold exactly the base's values (in the base's dtype)?"""
    import torch

    info = base.tensors.get(name)
    if info is None or tuple(info.shape) != tuple(tensor.shape) or info.dtype not in FLOAT_DTYPES:
        return False
    flat = tensor.reshape(info.shape[0] if info.shape else 1, -1)
    # in the narrower dtype: a bf16 saved layer of an fp32 base (trained in bf16) is the base, rounded
    narrow = tensor.dtype if tensor.element_size() < DTYPE_BYTES[info.dtype] else torch_dtype(info.dtype)
    return all(torch.equal(flat[row0:row1].reshape(-1).to(narrow), stored.to(narrow))
               for row0, row1, stored in read_row_blocks(info))


def unchanged_saved_layers(base: BaseModel, adapter: Adapter) -> list[str]:
    """The adapter's PEFT saved layers under a LoRA (save_embedding_layers) that hold the base's values (as a merge
    compares them: _same_as_base; a tied head's against its embeddings): they replace nothing."""
    return sorted(name for name in saved_layer_tensors(adapter) & adapter.full_tensors.keys()
                  if _same_as_base(base, tied_head_source(name, tuple(adapter.full_tensors[name].shape), base.tensors)
                                   or name, adapter.full_tensors[name]))


def _stored_twice(base: BaseModel, touched: Iterable[str]) -> list[set[str]]:
    """check.stored_twice in ``base`` (BaseModel.ties_stored_heads)."""
    return stored_twice(base.tensors, base.config, touched, heads=base.ties_stored_heads)


def _is_head(base: BaseModel, tensor: str) -> bool:
    """Is this tensor of the base an output head its model ties to the input embeddings (by path, or by its class)?"""
    return is_tied_head(tensor, base.config(tensor))


def _steps(file: _File) -> Iterable[_Copy | _Chunk]:
    """The reads of one file in output order: raw byte ranges (adjacent untouched tensors coalesced) and row chunks."""
    pending: _Copy | None = None
    for tensor in file.tensors:
        if not tensor.decoded:
            info = tensor.info
            if pending is not None and pending.start + pending.nbytes == info.start:
                pending.nbytes += info.nbytes
                pending.tensors.append(tensor)
            else:
                if pending is not None:
                    yield pending
                pending = _Copy(info.file, info.start, info.nbytes, [tensor])
            continue
        if pending is not None:
            yield pending
            pending = None
        step = tensor.chunk_rows
        for row0 in range(0, tensor.rows, step):
            yield _Chunk(tensor, row0, min(row0 + step, tensor.rows))
    if pending is not None:
        yield pending


def _chunk_bytes(chunk: _Chunk) -> int:
    t = chunk.tensor
    elements = (chunk.row1 - chunk.row0) * t.row_elements
    return elements * max(DTYPE_BYTES[t.info.dtype], DTYPE_BYTES[t.out_dtype])


class _TensorHasher:
    """sha256 of tensors arriving as row chunks in order, one tensor after another."""

    def __init__(self) -> None:
        self._digest = None

    def add(self, chunk: _Chunk, data: memoryview) -> str | None:
        """Hash one chunk; the tensor's hex digest once its last chunk is in, else None."""
        if chunk.row0 == 0:
            self._digest = hashlib.sha256()
        self._digest.update(data)
        return self._digest.hexdigest() if chunk.row1 == chunk.tensor.rows else None


class _Pipeline:
    """Reader thread → compute (calling thread) → writer thread, with a fixed pool of chunk buffers."""

    def __init__(self, operation: str, root: Path, device: "torch.device", compute_dtype: "torch.dtype", bar, residual,
                 hashing: bool) -> None:
        self.operation = operation  # (merge or subtract: the command an error's hint names)
        self.root = root
        self.hashing = hashing
        self.device = device
        self.compute_dtype = compute_dtype
        self.bar = bar
        self.residual = residual
        self.abort = threading.Event()
        self._holders_lock = threading.Lock()
        self.errors: list[BaseException] = []
        self.pool: queue.Queue = queue.Queue()
        self.read_q: queue.Queue = queue.Queue(maxsize=POOL_BUFFERS)
        self.write_q: queue.Queue = queue.Queue(maxsize=POOL_BUFFERS)
        self.hash_q: queue.Queue = queue.Queue(maxsize=POOL_BUFFERS)
        self._factors: dict[int, tuple["torch.Tensor", "torch.Tensor", "torch.Tensor | None"]] = {}
        self._factors_of: _Tensor | None = None
        self._columns: dict[int, "torch.Tensor"] = {}
        self._columns_of: _Tensor | None = None
        self._nan_columns_of: tuple[_Tensor | None, "torch.Tensor | None"] = (None, None)
        self._indices: list[tuple[TokenRows, "torch.Tensor"]] = []
        self._indices_of: _Tensor | None = None
        self._may_overflow_of: tuple[_Tensor | None, bool] = (None, True)

    def run(self, files: list[_File]) -> None:
        import torch

        chunks = [s for f in files for s in _steps(f) if isinstance(s, _Chunk)]
        if chunks:
            size = max(_chunk_bytes(c) for c in chunks)
            pinned = self.device.type == "cuda"
            for _ in range(POOL_BUFFERS):
                self.pool.put(torch.empty(size, dtype=torch.uint8, pin_memory=pinned))
            most = max((c.row1 - c.row0) * c.tensor.row_elements for c in chunks)
            self.work = torch.empty(most, dtype=self.compute_dtype, device=self.device)
            if any(c.tensor.scaled is not None for c in chunks):  # FP8 weights' work space (loraops.fp8)
                self.scratch = torch.empty(most, dtype=self.compute_dtype, device=self.device)
            if any(c.tensor.dora for c in chunks):  # DoRA's: the base rows, one delta, base + delta
                self.dora_work = torch.empty(3, most, dtype=self.compute_dtype, device=self.device)
        reader = threading.Thread(target=self._guard, args=(self._read, files), name="loraops-read", daemon=True)
        writer = threading.Thread(target=self._guard, args=(self._write,), name="loraops-write", daemon=True)
        stages = [reader, writer]
        if self.hashing:
            stages.append(threading.Thread(target=self._guard, args=(self._hash,), name="loraops-hash", daemon=True))
        # pipelines may run at once in threads of one process (settings.torch_threads)
        with settings.torch_threads(self.device, lambda before: compute_threads(len(stages), before)):
            try:
                for stage in stages:
                    stage.start()
                self._guard(self._compute)
            except BaseException:  # a stage that did not start: the ones that did must stop before we return
                self.abort.set()
                raise
            finally:
                self._join(stages)
        errors = [e for e in self.errors if not isinstance(e, _Aborted)]
        if errors:
            raise errors[0]

    # -- plumbing -------------------------------------------------------------------------------------------------
    def _join(self, stages: list[threading.Thread]) -> None:
        """Wait for every stage, through a Ctrl-C too (which then aborts them): the caller removes the temporary
        output next, and a writer still running would recreate it and leave a finished shard behind."""
        interrupted = None
        for stage in stages:
            while stage.is_alive():
                try:
                    stage.join()
                except KeyboardInterrupt as exc:
                    interrupted = exc
                    self.abort.set()
        if interrupted is not None:
            raise interrupted

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # handed to the calling thread, which re-raises the first one
            self.errors.append(_as_loraops_error(exc))
            self.abort.set()

    def _put(self, q: queue.Queue, item) -> None:
        while not self.abort.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                pass
        raise _Aborted

    def _get(self, q: queue.Queue):
        while not self.abort.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                pass
        raise _Aborted

    # -- stages ---------------------------------------------------------------------------------------------------
    def _read(self, files: list[_File]) -> None:
        sources: dict[Path, ReadAhead] = {}  # (an encoded weight's scale may lie in another file)
        source_hasher = _TensorHasher()
        scales = None
        try:
            for file in files:
                self._put(self.read_q, _Open(self.root / file.target, file.header, file.size))
                for step in _steps(file):  # raw copies (_Copy) are read by the writer
                    if isinstance(step, _Chunk):
                        step.buffer = self._get(self.pool)
                        tensor = step.tensor
                        if tensor.replacement is None:
                            info = tensor.info
                            ahead = sources.get(info.file)
                            if ahead is None:
                                ahead = sources[info.file] = ReadAhead(os.open(info.file, os.O_RDONLY))
                            row_bytes = tensor.row_elements * DTYPE_BYTES[info.dtype]
                            nbytes = (step.row1 - step.row0) * row_bytes
                            offset = info.start + step.row0 * row_bytes
                            ahead.before(offset)
                            _pread_exact(ahead.fd, _bytes_view(step.buffer), nbytes, offset, info)
                            if self.hashing and tensor.source_digest is None:
                                tensor.source_digest = source_hasher.add(step, _bytes_view(step.buffer)[:nbytes])
                            if tensor.scaled is not None:  # the FP8 weight's block scales, read with its first rows
                                if step.row0 == 0:
                                    scales = tensor.scaled.read_scales()
                                step.scales = tensor.scaled.rows_of(scales, step.row0, step.row1)
                    self._put(self.read_q, step)
                self._put(self.read_q, _Close(self.root / file.target, file.size))
            self._put(self.read_q, _END)
        finally:
            for ahead in sources.values():
                os.close(ahead.fd)

    def _compute(self) -> None:
        while (item := self._get(self.read_q)) is not _END:
            if isinstance(item, _Chunk):
                self._compute_chunk(item)
                if self.hashing:  # hashed while it is written: the buffer goes back to the pool when both are done
                    item.holders = 2
                    self._put(self.hash_q, item)
            self._put(self.write_q, item)
        if self.hashing:
            self._put(self.hash_q, _END)
        self._put(self.write_q, _END)

    def _hash(self) -> None:
        hasher = _TensorHasher()
        while (item := self._get(self.hash_q)) is not _END:
            item.tensor.digest = hasher.add(item, _bytes_view(item.buffer)[: item.out_nbytes])
            self._release(item)

    def _release(self, chunk: _Chunk) -> None:
        """One holder (writer or hasher) is done with the chunk's buffer; the last one returns it to the pool."""
        with self._holders_lock:
            chunk.holders -= 1
            free = chunk.holders == 0
        if free:
            self.pool.put(chunk.buffer)

    def _write(self) -> None:
        out: DirectFileWriter | None = None
        sources: dict[Path, ReadAhead] = {}
        syncs: list[threading.Thread] = []
        try:
            while (item := self._get(self.write_q)) is not _END:
                if isinstance(item, _Open):
                    item.path.parent.mkdir(parents=True, exist_ok=True)
                    out = DirectFileWriter(item.path)
                    out.write(memoryview(item.header))
                    self.bar.update(len(item.header))
                elif isinstance(item, _Copy):
                    source = sources.get(item.source)
                    if source is None:
                        source = sources[item.source] = ReadAhead(os.open(item.source, os.O_RDONLY))
                    _copy(item, source, out, hashing=self.hashing)
                    self.bar.update(item.nbytes)
                elif isinstance(item, _Chunk):
                    out.write(_bytes_view(item.buffer)[: item.out_nbytes])
                    self._release(item)
                    self.bar.update(item.out_nbytes)
                else:
                    if out.size != item.size:  # the header promised exactly this many bytes
                        raise FormatError(f"{item.path}: internal error, wrote a different size than planned")
                    # Finished and flushed by another thread while the next file is written, so the writer never
                    # waits for the disk.
                    syncer = threading.Thread(target=self._guard, args=(out.close,), daemon=True)
                    syncer.start()
                    syncs.append(syncer)
                    out = None
        finally:
            if out is not None:
                out.abandon()
            for source in sources.values():
                os.close(source.fd)
            for syncer in syncs:
                syncer.join()

    # -- math -----------------------------------------------------------------------------------------------------
    def _compute_chunk(self, chunk: _Chunk) -> None:
        import torch

        tensor, buf = chunk.tensor, chunk.buffer
        rows = chunk.row1 - chunk.row0
        n = rows * tensor.row_elements
        out_dtype = torch_dtype(tensor.out_dtype)
        chunk.out_nbytes = n * DTYPE_BYTES[tensor.out_dtype]
        out = buf[: chunk.out_nbytes].view(out_dtype)
        elements = slice(chunk.row0 * tensor.row_elements, chunk.row1 * tensor.row_elements)

        def of_base():
            return _nonfinite_of_base(tensor, chunk, lambda: self._nan_columns(tensor))

        if tensor.scale_of is not None:  # the new scales of the FP8 weight written just before
            out.copy_(tensor.scale_of.new_scales.reshape(-1)[elements])
            if chunk.row1 == tensor.rows:  # written: held no longer (all of a model's would grow with it)
                tensor.scale_of.new_scales = None
            return
        if tensor.replacement is not None:  # the new value, with the LoRA deltas on it when it has any
            w = tensor.replacement.reshape(-1)[elements]
            if not tensor.terms and not tensor.encoded and not tensor.token_rows:
                out.copy_(w)
                _refuse_overflow(self.operation, tensor, out, of_base, may_overflow=narrows(w.dtype, out_dtype))
                return
        else:
            w = buf[: n * DTYPE_BYTES[tensor.info.dtype]].view(torch_dtype(tensor.info.dtype))
            if not tensor.terms and tensor.scaled is None and not tensor.token_rows:  # a --dtype conversion; the input
                out.copy_(w.to(out_dtype))  # and output views overlap: convert out of place
                _refuse_overflow(self.operation, tensor, out, of_base, may_overflow=narrows(w.dtype, out_dtype))
                return
        cuda = self.device.type == "cuda"
        columns = self._column_factors(tensor) if tensor.dora else {}  # before the DoRA buffers fill: it uses them
        acc = self.work[:n]
        acc2 = acc.view(rows, tensor.row_elements)
        if tensor.scaled is not None and tensor.replacement is None:  # dequantize-before: W from its FP8 blocks
            tensor.scaled.decode(acc2, w, chunk.scales, self.scratch, non_blocking=cuda)
        else:
            acc.copy_(w, non_blocking=cuda)
        # trainable tokens: the stored rows replace the base's (PEFT's index_copy), before any LoRA delta, which only
        # an untied head has here (PEFT's LoRA on a tied head reads the embeddings with the tokens in place)
        for token_rows, index in self._token_indices(tensor):
            here = (index >= chunk.row0) & (index < chunk.row1)
            if bool(here.any()):
                acc2.index_copy_(0, (index[here] - chunk.row0).to(acc2.device),
                                 token_rows.values[here].to(acc2.device, acc2.dtype))
        if tensor.dora:  # DoRA's norms are of the base weight (plus one adapter's delta), not of what came before
            base2 = self.dora_work[0, :n].view_as(acc2)
            base2.copy_(acc2)
        for module, coef in tensor.terms:
            region = _region(tensor, chunk, module)
            if region is not None:
                here, rows_of_module = region
                B2, A2, magnitude = self._module_factors(tensor, module)
                if A2 is None:  # LoHa/LoKr: B2 is its Product, whose rows of ΔW are formed here (no B·A to fuse)
                    acc2[here].add_(B2.rows(rows_of_module), alpha=coef)
                    continue
                if magnitude is None:
                    add_delta(acc2[here], B2, A2, module.transposed, rows_of_module, coef)
                    continue
                delta = self.dora_work[1, : acc2[here].numel()].view(acc2[here].shape)
                delta.zero_()
                add_delta(delta, B2, A2, module.transposed, rows_of_module, coef)
                if module.transposed:
                    factors = columns[id(module)]
                else:
                    both = self._base_plus(base2[here], delta)
                    norms = torch.linalg.vector_norm(both, dim=1)
                    factors = dora_factors(module, magnitude[rows_of_module], norms,
                                           lambda: torch.isinf(base2[here]).any(1), lambda: (both != 0).any(1),
                                           lambda: (~torch.isfinite(both)).any(1)).unsqueeze(1)
                acc2[here].add_(delta).mul_(factors)
        exact = acc.clone() if self.residual is not None and tensor.encoded else acc
        if tensor.encoded:  # quantize-after: acc becomes W · scale per block; its new scales are kept for the scale
            if chunk.row0 == 0:
                tensor.new_scales = torch.empty(tensor.scaled.scale.shape, dtype=torch_dtype(tensor.scaled.scale.dtype))
            new = tensor.scaled.encode(acc2, self.scratch)
            tensor.scaled.rows_of(tensor.new_scales, chunk.row0, chunk.row1).copy_(new)
        if cuda:
            out.copy_(acc.to(out_dtype), non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        else:
            out.copy_(acc)
        _refuse_overflow(self.operation, tensor, out, of_base, may_overflow=self._may_overflow(tensor),
                         work=self.compute_dtype, exact=lambda: _exact_merge(tensor, chunk))
        if self.residual is not None and tensor.terms:
            self.residual.add(tensor, chunk, exact, out, self._stored(tensor, chunk, out, exact))

    def _stored(self, tensor: _Tensor, chunk: _Chunk, out: "torch.Tensor", like: "torch.Tensor") -> "torch.Tensor":
        """The values the output holds for a chunk (out decoded with its new scales when it is FP8), as ``like``."""
        if not tensor.encoded:
            return out.to(device=like.device, dtype=like.dtype)
        stored = like.new_empty(like.shape)
        scales = tensor.scaled.scale_values(tensor.scaled.rows_of(tensor.new_scales, chunk.row0, chunk.row1))
        tensor.scaled.decode(stored.view(chunk.row1 - chunk.row0, -1), out, scales, self.scratch)
        return stored

    def _module_factors(self, tensor: _Tensor, module: LoraModule):
        """(B2, A2, DoRA magnitude or None) in the compute dtype on the device, kept while one tensor's chunks are
        computed; (its Product, None, None) for a LoHa/LoKr module."""
        import torch

        if self._factors_of is not tensor:
            self._factors, self._factors_of = {}, tensor
        key = id(module)
        if key not in self._factors and module.product is not None:
            # in float64, added to the accumulator in one rounding: a product takes more roundings than B·A's one
            # fused matmul (two matmuls, then the Hadamard or Kronecker product), which in float32 left a float32
            # output no closer to the exact result than PEFT's merge
            self._factors[key] = (module.product.to(self.device, torch.float64), None, None)
        if key not in self._factors:
            B2, A2 = module.matrices()
            magnitude = None if module.magnitude is None else module.magnitude.to(self.device, self.compute_dtype)
            self._factors[key] = (B2.to(self.device, self.compute_dtype), A2.to(self.device, self.compute_dtype),
                                  magnitude)
        return self._factors[key]

    def _may_overflow(self, tensor: _Tensor) -> bool:
        """Whether the tensor's deltas can carry a finite weight past float32's or bfloat16's range, so that its
        chunks are scanned for inf: a scan of every merged byte made a bfloat16 merge 1.5× slower (512 MiB, 2 cores:
        torch's isinf on CPU). |ΔW_ij| ≤ Σ |wᵢsᵢ|·‖B_i‖·‖A_j‖ (Cauchy–Schwarz, which bounds the matmul's partial sums
        too), and a finite value moved by less than half the dtype's last step below its max rounds to that max at
        most; the bound must stay under a quarter step, as the sum is rounded twice where the work dtype is wider
        (float32 then bf16; float64 then float32 with --precise: just under half a step rounded to the tie, then to
        inf), and the weight must be one of the output's range (not a float32 weight or FP8 blocks × scales going
        out as bf16, nor a replacement in a wider dtype). LoHa/LoKr products, DoRA's rescaling and trainable-token
        rows are scanned; made once per tensor."""
        import torch

        if self._may_overflow_of[0] is tensor:
            return self._may_overflow_of[1]
        may = True
        finfo = torch.finfo(torch_dtype(tensor.out_dtype))
        weights = tensor.replacement.dtype if tensor.replacement is not None else torch_dtype(tensor.info.dtype)
        if not tensor.token_rows and tensor.scaled is None and weights.is_floating_point \
                and torch.finfo(weights).max <= finfo.max \
                and all(module.product is None and module.magnitude is None for module, _ in tensor.terms):
            quarter_last_step = math.ldexp(finfo.eps, math.frexp(finfo.max)[1] - 3)  # float32: 2⁻²³·2¹²⁵ = 2¹⁰²
            bound = 0.0
            for module, coef in tensor.terms:
                B2, A2 = module.matrices()
                bound += abs(coef) * float(torch.linalg.vector_norm(B2.double(), dim=1).max()) * float(
                    torch.linalg.vector_norm(A2.double(), dim=0).max())
            may = not bound < quarter_last_step
        self._may_overflow_of = (tensor, may)
        return may

    def _nan_columns(self, tensor: _Tensor) -> "torch.Tensor":
        """The columns where the base tensor holds a NaN in some row (the rows _column_factors' norms are taken over):
        read once per tensor, not again for each chunk that comes out with NaN there (every chunk of a vocabulary, whose
        transposed DoRA channel the NaN spreads over)."""
        import torch

        if self._nan_columns_of[0] is not tensor:
            self._nan_columns_of = (tensor, _base_columns(tensor, torch.isnan))
        return self._nan_columns_of[1]

    def _token_indices(self, tensor: _Tensor) -> list[tuple[TokenRows, "torch.Tensor"]]:
        """The tensor's trainable tokens with their indices as a tensor, made once per tensor (in every chunk, 100,000
        indices cost 13 s over a 128k-row embedding's 501 chunks)."""
        import torch

        if self._indices_of is not tensor:
            self._indices, self._indices_of = [(r, torch.tensor(r.indices)) for r in tensor.token_rows], tensor
        return self._indices

    def _base_plus(self, base2: "torch.Tensor", delta: "torch.Tensor") -> "torch.Tensor":
        """W + Δ for a block of W and Δ's values there, into the third DoRA buffer."""
        import torch

        return torch.add(base2, delta, out=self.dora_work[2, : delta.numel()].view_as(delta))

    def _column_factors(self, tensor: _Tensor) -> dict[int, "torch.Tensor"]:
        """id(module) → m / ‖W + Δ‖ per column (1×out) for the tensor's DoRA modules whose output channels are columns
        (transposed): every row goes into those norms, so they come from one more pass over the base tensor, in
        chunks through the DoRA buffers, before its first chunk is finished. Kept while its chunks are computed."""
        import torch

        if self._columns_of is tensor:
            return self._columns
        modules = [(module, coef) for module, coef in tensor.terms if module.dora and module.transposed]
        # summed over the chunks in float64: a float32 running sum over a vocabulary's chunks drifts (~1e-6 relative
        # over 16 chunks, measured), where PEFT's one-shot norm does not
        squares = {id(module): torch.zeros(module.out_features, dtype=torch.float64, device=self.device)
                   for module, _ in modules}
        for module, both in self._columns_plus(tensor, modules):
            squares[id(module)] += both.mul_(both).sum(0)  # (a chunk's own sum is pairwise, as PEFT's)

        def columns_where(module, test):
            found = torch.zeros(module.out_features, dtype=torch.bool, device=self.device)
            for _, both in self._columns_plus(tensor, [(m, c) for m, c in modules if m is module]):
                found |= test(both).any(0)
            return found

        self._columns_of = tensor
        self._columns = {id(module): dora_factors(module, self._module_factors(tensor, module)[2],
                                                  squares[id(module)].sqrt().to(self.compute_dtype),
                                                  lambda: _base_columns(tensor, torch.isinf),
                                                  lambda: columns_where(module, lambda both: both != 0),
                                                  lambda: columns_where(module, lambda both: ~torch.isfinite(both)))
                         .unsqueeze(0)
                         for module, _ in modules}
        return self._columns

    def _columns_plus(self, tensor: _Tensor, modules):
        """(module, W + Δ) for each block of the base tensor's rows and each (transposed DoRA module, coef), in the
        third DoRA buffer (overwritten by the next)."""
        for row0, block in _base_blocks(tensor) if modules else ():
            base2 = self.dora_work[0, : block.numel()].view(block.shape)
            base2.copy_(block)
            for module, coef in modules:
                B2, A2, _ = self._module_factors(tensor, module)
                delta = self.dora_work[1, : block.numel()].view(block.shape)
                delta.zero_()
                add_delta(delta, B2, A2, True, slice(row0, row0 + block.shape[0]), coef)
                yield module, self._base_plus(base2, delta)


def dora_factors(module: LoraModule, magnitude: "torch.Tensor", norms: "torch.Tensor", base_inf, nonzero,
                 nonfinite) -> "torch.Tensor":
    """DoRA's f = m / ‖W + Δ‖ per output channel; a zero norm (W + Δ all zeros there: its direction is undefined, and
    PEFT writes NaN) is refused, and so is one beyond what the work dtype holds (finite values whose squares
    overflow: f became 0, and the channel was written as zeros, silently; or underflow, values below ~2.6e-23 in
    float32, bfloat16's subnormals: ``nonzero()``, the channels where W + Δ is not all zeros, asked only then, tells
    them from a zero channel), and one that is inf because the base holds ±inf in the channel (``base_inf()``: the
    channels where it does, asked only then; PEFT's f is 0 there and its merge writes the channel as zeros with NaN
    at the inf, which no dtype mends). A NaN norm (a NaN in the base's
    channel, or deltas that cancel as inf − inf) is left to _refuse_overflow, which tells the two apart: the base's
    NaN stays NaN, as in PEFT's merge; so is an inf one where W + Δ holds ±inf that the deltas made
    (``nonfinite()``: the channels where W + Δ holds a value that is not finite; the factor is NaN there), as whether
    the work dtype's kernel makes inf − inf NaN or, with FMA, keeps one inf, depends on the machine."""
    import torch

    dtype = dtype_name(norms.dtype)
    hint = "; `precise=True` computes in float64" if norms.dtype != torch.float64 else ""
    if not bool(norms.all()):
        if bool(((norms == 0).cpu() & nonzero().cpu()).any()):
            raise InvalidInputError(f"DoRA module {module.name!r}: the squares summed for the norm of an output "
                                    f"channel of {module.weight_name} + ΔW are below what {dtype} holds (its values "
                                    f"are all but zero), so its rescaling is undefined{hint}", ["precise"])
        raise InvalidInputError(f"DoRA module {module.name!r}: an output channel of {module.weight_name} + ΔW is all "
                                "zeros, so its direction (and the merge) is undefined")
    if bool(torch.isinf(norms).any()):
        inf = torch.isinf(norms)
        if bool((inf.cpu() & base_inf().cpu()).any()):
            raise InvalidInputError(f"DoRA module {module.name!r}: the base's {module.weight_name} holds ±inf in an "
                                    "output channel, so the norm DoRA rescales that channel by is inf and its merge "
                                    "undefined (PEFT's writes the channel as zeros and NaN)")
        unbounded = inf & nonfinite().to(norms.device)
        if not bool((inf & ~unbounded).any()):
            return torch.where(unbounded, math.nan, magnitude / norms)
        # (the squares, not the norm: values of 1e20 have a norm float32 holds, and torch's sums of squares overflow)
        raise InvalidInputError(f"DoRA module {module.name!r}: the squares summed for the norm of an output channel of "
                                f"{module.weight_name} + ΔW go beyond what {dtype} holds, so its rescaling is "
                                f"undefined{hint}", ["precise"])
    return magnitude / norms


def _base_columns(tensor: _Tensor, test) -> "torch.Tensor":
    """The columns where ``test`` (torch.isnan, torch.isinf) holds for the base tensor in some row (the rows a
    transposed DoRA module's norms are taken over), read again."""
    import torch

    columns = torch.zeros(tensor.row_elements, dtype=torch.bool)
    for _, block in _base_blocks(tensor):
        columns |= test(block.float()).any(0)
    return columns


def _base_blocks(tensor: _Tensor):
    """(first row, rows) of the base tensor (its replacement's, when it has one) in chunks of ``chunk_rows`` rows, as
    2-D rows×row_elements: what a transposed DoRA module's column norms are taken over. Rows as the chunks count them
    (fused experts E×X×Y: E·X rows of Y), not the stored tensor's first dimension, which the blocks are read by."""
    if tensor.replacement is not None:
        blocks = [(0, tensor.rows, tensor.replacement.reshape(-1))]
    else:
        blocks = read_row_blocks(tensor.info)
    step, first = tensor.chunk_rows, 0
    for _, _, values in blocks:
        values = values.view(-1, tensor.row_elements)
        for row0 in range(0, len(values), step):
            yield first + row0, values[row0 : row0 + step]
        first += len(values)


def _region(tensor: _Tensor, chunk: _Chunk, module: LoraModule) -> "tuple[tuple[slice, slice], slice] | None":
    """(the chunk's rows × columns that the module changes, those rows as the module's own), or None where it
    changes none of the chunk: its rows of W are all of them, unless it is one part of a fused tensor."""
    first = module.first_row
    row0, row1 = max(chunk.row0, first), min(chunk.row1, first + module.weight_shape[0])
    if row0 >= row1:
        return None
    col0, cols = module.fused_columns or (0, tensor.row_elements)
    return (slice(row0 - chunk.row0, row1 - chunk.row0), slice(col0, col0 + cols)), slice(row0 - first, row1 - first)


def _base_rows(tensor: _Tensor, row0: int, row1: int) -> "torch.Tensor":
    """Rows row0:row1 of the base tensor (its replacement, when it has one; FP8 blocks undecoded) as
    rows × row_elements, read again."""
    import torch

    elements = tensor.row_elements
    if tensor.replacement is not None:
        values = tensor.replacement.reshape(-1)[row0 * elements : row1 * elements]
    else:
        fd = os.open(tensor.info.file, os.O_RDONLY)
        try:
            values = _read_rows(fd, tensor.info, elements, row0, row1)
        finally:
            os.close(fd)
        values = values if values is not None else torch.empty(0)
    return values.view(row1 - row0, elements)


def _read_rows(fd: int, info: TensorInfo, row_elements: int, row0: int, row1: int) -> "torch.Tensor | None":
    """Rows row0:row1 of the stored tensor ``info``, read from ``fd`` (its file) in its stored dtype, flat; None where
    there are none."""
    import torch

    row_bytes = row_elements * DTYPE_BYTES[info.dtype]
    raw = bytearray((row1 - row0) * row_bytes)
    if not raw:
        return None
    _pread_exact(fd, memoryview(raw), len(raw), info.start + row0 * row_bytes, info)
    return torch.frombuffer(raw, dtype=torch_dtype(info.dtype))


def _nonfinite_of_base(tensor: _Tensor, chunk: _Chunk, nan_columns) -> "torch.Tensor":
    """What a chunk's output holds because its base does, where the base is not finite: the base's ±inf (W + Δ with Δ
    finite) and NaNs there, 0 elsewhere (decoded, for an FP8 weight: a NaN or inf scale makes its block's values NaN
    or ±inf too; not in a trainable token's row, replaced). A NaN spreads over its output channel where a DoRA module
    rescales it (its norm is NaN there, as PEFT's m/‖W + ΔW‖: a row; a transposed module's column, over every row of
    the tensor: ``nan_columns()``). Read again, only where a chunk came out with a value that is not finite."""
    import torch

    values = _base_values(tensor, chunk)
    base = torch.where(torch.isfinite(values), 0.0, values)
    for _, _, rows in _token_rows_in(tensor, chunk):
        base[rows] = 0.0
    nan = torch.isnan(base)
    for module, _ in tensor.terms:
        region = _region(tensor, chunk, module) if module.dora else None
        if region is None:
            continue
        here = region[0]
        if module.transposed:
            nan[here] |= nan_columns()[here[1]]
        else:
            nan[here] |= nan[here].any(1, keepdim=True)
    return base.masked_fill_(nan, math.nan)


def _token_rows_in(tensor: _Tensor, chunk: _Chunk):
    """(trainable tokens, which of their indices fall in the chunk, those as the chunk's rows), for each set of the
    tensor's, on the CPU: read again where a chunk came out with a value that is not finite."""
    import torch

    for token_rows in tensor.token_rows:
        index = torch.tensor(token_rows.indices, dtype=torch.long)
        here = (index >= chunk.row0) & (index < chunk.row1)
        yield token_rows, here, index[here] - chunk.row0


def _base_values(tensor: _Tensor, chunk: _Chunk) -> "torch.Tensor":
    """A chunk's rows of the base tensor, read again, in float64 (a copy): decoded as _compute_chunk decodes them (an
    FP8 value × its block's scale, which may be beyond float32's range: not the base's inf, but one the merge makes
    where the output cannot hold it)."""
    import torch

    values = _base_rows(tensor, chunk.row0, chunk.row1)
    if tensor.scaled is not None and tensor.replacement is None:
        decoded = torch.empty(values.shape, dtype=torch.float64)
        tensor.scaled.decode(decoded, values, chunk.scales, torch.empty(decoded.numel()))
        return decoded
    return values.to(torch.float64, copy=True)


def _exact_merge(tensor: _Tensor, chunk: _Chunk) -> "torch.Tensor":
    """A chunk's merge in float64 on the CPU, where its output came out with a value that is not finite, to tell why
    (_refuse_overflow): the base's rows with the trainable tokens' rows in place, plus each module's delta. A DoRA
    module's output m·(W + Δ)/‖W + Δ‖ is finite wherever W + Δ is (its norm is not 0 there: refused before), and only
    that counts, so it stands as 0 there."""
    import torch

    values = _base_values(tensor, chunk)
    for token_rows, here, rows in _token_rows_in(tensor, chunk):
        values[rows] = token_rows.values[here].double()
    for module, coef in tensor.terms:
        region = _region(tensor, chunk, module)
        if region is None:
            continue
        here, rows = region
        if module.product is not None:
            values[here] += module.product.to("cpu", torch.float64).rows(rows) * coef
            continue
        B2, A2 = module.matrices()
        delta = torch.zeros_like(values[here])
        add_delta(delta, B2.double(), A2.double(), module.transposed, rows, coef)
        both = values[here] + delta
        values[here] = both if module.magnitude is None else torch.where(torch.isfinite(both), 0.0, both)
    return values


def _refuse_overflow(operation: str, tensor: _Tensor, out: "torch.Tensor", of_base, may_overflow: bool = False,
                     work: "torch.dtype | None" = None, exact=None) -> None:
    """A value beyond its dtype's range rounds to inf, silently (torch, PEFT): a model that then computes inf/NaN. So
    an output that overflows stops the merge, with nothing written: float16's ±65504 whatever made the value, and,
    where LoRA deltas added may carry values past it (``may_overflow``: _Pipeline._may_overflow), float32's and
    bfloat16's ±3.4e38, which weights × scales float32 holds still pass on factors above 1. (FP8 is clamped.) A NaN
    output is refused there too. Where deltas were added, the chunk's merge in float64 (``exact()``: _exact_merge)
    tells why: deltas beyond the work dtype ``work`` as they are merged (1e20·1e20 products that cancel: inf − inf is
    NaN, or inf where the kernel fuses the multiply-add, as AVX-512's and GPUs' do, so the output alone cannot tell)
    where the exact merge holds the values, or results beyond the output's range where it does not. What the base holds
    is not refused (``of_base()``: _nonfinite_of_base, asked only once a value is not finite): its ±inf and NaN stay,
    unsaid, as in PEFT's merge and on a copied tensor (e.g. a mask buffer's inf), and an inf or NaN the deltas or the
    conversion made beside them is still refused."""
    import torch

    checked = (torch.float16, torch.bfloat16, torch.float32) if may_overflow else (torch.float16,)
    # (16M float32/bfloat16 values: 6/3 ms for all_finite against 65-83 ms for isinf().any())
    if out.dtype not in checked or not out.numel() or all_finite(out):
        return
    out = out.cpu()
    inf = torch.isinf(out)
    if not may_overflow and not bool(inf.any()):  # NaN alone, where no delta can overflow: the base's
        return
    # where deltas may overflow, a NaN the base does not hold is refused: two deltas beyond ``work`` cancel as inf − inf
    nan = torch.isnan(out) if may_overflow else torch.zeros_like(inf)
    base = of_base().view(out.shape)
    made = (inf & (out != base)) | (nan & ~torch.isnan(base))
    if not bool(made.any()):
        return
    if exact is not None:
        merged = exact().view(out.shape)
        rounded = merged.to(out.dtype)
        if bool((torch.isfinite(rounded) | (rounded == base))[made].all()):
            hint = "; `precise=True` computes in float64" if work != torch.float64 else ""
            raise InvalidInputError(f"{tensor.file_name!r} comes out with inf or NaN values that the exact merge does "
                                    f"not make: its deltas go beyond what {dtype_name(work)} holds as "
                                    f"they are merged (products or sums past ±{torch.finfo(work).max:g}){hint}",
                                    ["precise"])
        if not bool(torch.isfinite(merged)[made].all()):
            raise InvalidInputError(f"{tensor.file_name!r} comes out with inf or NaN values: its deltas go beyond what "
                                    "float64 holds as they are merged; the adapters' weights × scales are too large")
    dtype = dtype_name(out.dtype)
    hint = (f"{operation} with `dtype` bf16 or fp32" if dtype == "float16"
            else "the adapters' weights × scales are too large" if tensor.terms
            else f"it holds values {dtype} cannot; keep a wider dtype")
    raise beyond_range(tensor.file_name, out.dtype, hint)


def compute_threads(other_stages: int, default: int) -> int:
    """Torch threads for the compute stage: the cores the other stages leave free. Torch's default (one per core)
    makes its threads wait for ours at every kernel's barrier: on 2 busy cores the 1.1B merge took 9–14 s with 2
    threads and 6 s with 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(default, cores - other_stages))


def add_delta(acc2: "torch.Tensor", B2: "torch.Tensor", A2: "torch.Tensor", transposed: bool, rows: slice,
              coef: float) -> None:
    """acc2 += coef · (rows of W's delta), in one fused addmm. acc2 holds rows ``rows`` of W flattened to 2-D
    (out×in·kh·kw, or in×out for a transposed module); B2, A2 as LoraModule.matrices()."""
    if transposed:  # W = (B·A)ᵀ: W's rows are A's columns
        acc2.addmm_(A2[:, rows].T, B2.T, alpha=coef)
    else:
        acc2.addmm_(B2[rows], A2, alpha=coef)


class _Residual:
    """Running residual statistics of a subtract (see ResidualRecord)."""

    def __init__(self, reference: BaseModel | None, compared: dict[str, str]) -> None:
        self.reference = reference
        self.compared = compared  # each touched tensor → the reference's tensor it should come back to
        self.elements = 0
        self.differing = 0
        self.max_diff = 0.0
        self.rounding = 0.0
        self._handles: dict[Path, int] = {}
        self._scaled: dict[str, tuple[BlockScaled | None, "torch.Tensor | None"]] = {}  # the tensor compared now

    def add(self, tensor: _Tensor, chunk: _Chunk, acc: "torch.Tensor", out: "torch.Tensor",
            stored: "torch.Tensor") -> None:
        """acc: a chunk's exact result; out: the values written; stored: what they are worth, as acc (decoded with
        their new scales when FP8)."""
        import torch

        self.rounding = max(self.rounding, _max_gap(stored, acc))
        self.elements += out.numel()
        if self.reference is None:
            return
        info = self.reference.tensors[self.compared[tensor.name]]
        found, scales = self._reference_scales(self.compared[tensor.name])
        # an FP8 reference is decoded by its whole block rows, which the chunk need not hold (a --dtype output's)
        unit = found.row_unit if found is not None else 1
        row0, row1 = chunk.row0 // unit * unit, min(-(-chunk.row1 // unit) * unit, tensor.rows)
        fd = self._handles.get(info.file) or self._handles.setdefault(info.file, os.open(info.file, os.O_RDONLY))
        ref = _read_rows(fd, info, tensor.row_elements, row0, row1)
        ref = ref if ref is not None else out.new_empty(0, dtype=torch_dtype(info.dtype))
        if found is not None or tensor.encoded:  # FP8 on a side: compared by value, each decoded with its own scales
            if found is not None:
                values = stored.new_empty((row1 - row0, tensor.row_elements), device="cpu")
                found.decode(values, ref, found.rows_of(scales, row0, row1), values.new_empty(values.shape))
                ref = values[chunk.row0 - row0 : chunk.row1 - row0].reshape(-1)
            out = stored.cpu()
        if ref.dtype == out.dtype:  # bit for bit (so -0.0 ≠ 0.0 and NaNs compare by their bits)
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[ref.element_size()]
            self.differing += int((ref.view(bits) != out.view(bits).reshape(-1)).sum())
        else:  # a subtract to another dtype (--dtype) than the base's: by value (a NaN kept is no difference)
            ref64, out64 = ref.double(), out.double().reshape(-1)
            self.differing += int(((ref64 != out64) & ~(torch.isnan(ref64) & torch.isnan(out64))).sum())
        # in float32 unless a side is float64: the difference of two bf16/fp16 neighbours is exact there, and the
        # float64 conversions cost more than the merge's own arithmetic
        wide = torch.promote_types(torch.promote_types(ref.dtype, out.dtype), torch.float32)
        self.max_diff = max(self.max_diff, _max_gap(ref.to(wide), out.to(wide).reshape(-1)))

    def _reference_scales(self, name: str) -> tuple[BlockScaled | None, "torch.Tensor | None"]:
        """How the reference stores a tensor when it is FP8, and its inverse scales (read once per tensor)."""
        if name not in self._scaled:
            found = fp8.layout(self.reference.tensors, name, self.reference.quantization_config(name))
            self._scaled = {name: (found, found.read_scales() if found is not None else None)}
        return self._scaled[name]

    def record(self) -> ResidualRecord:
        for fd in self._handles.values():
            os.close(fd)
        self._handles = {}
        if self.reference is None:
            # said of any dtype: a float32 round trip rounds too (in bf16/fp16 it is never bit-exact)
            note = ("no pristine base to compare with; a merge+subtract round trip rounds at each step, so it need not "
                    "give the base back bit for bit: for a merge recorded by loraops, --exact restores its base")
            return ResidualRecord(elements=self.elements, rounding_max_abs=self.rounding, note=note)
        note = "bit-exact" if self.differing == 0 else (
            "the rounding of the round trip; use --exact to restore the base bit for bit")
        return ResidualRecord(compared_to=str(self.reference.path), elements=self.elements,
                              elements_differing=self.differing, max_abs_diff=self.max_diff,
                              rounding_max_abs=self.rounding, note=note)


def _max_gap(a: "torch.Tensor", b: "torch.Tensor") -> float:
    """max |a − b|, where an inf or NaN both hold (a base's, kept) is no gap and one a alone holds is an infinite one:
    the plain max is NaN there (inf − inf), which Python's max() over the chunks then dropped with the chunk."""
    import torch

    if not a.numel():
        return 0.0
    gap = (a - b).abs()
    top = float(gap.max())
    if math.isnan(top):
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        top = float(torch.where(same, 0.0, gap.nan_to_num(nan=math.inf, posinf=math.inf)).max())
    return top


def _check_reference(reference: BaseModel, files: list[_File]) -> dict[str, str]:
    """Each tensor the subtract changes → the pristine base's tensor it should come back to: its own, or, for one an
    untied merge wrote (a head, BART's side embed_tokens), the embeddings it was tied to, which that base stores
    instead."""
    compared = {}
    for tensor in (t for f in files for t in f.tensors if t.terms):
        shape = tensor.info.shape
        name = (tensor.name if tensor.name in reference.tensors else
                tied_head_source(tensor.name, shape, reference.tensors)
                or shared_embeddings_of(tensor.name, shape, reference.tensors))
        if name is None or reference.tensors[name].shape != shape:
            raise MismatchError(f"{reference.path}: cannot serve as the pristine base ({tensor.name!r} differs)")
        fp8.layout(reference.tensors, name, reference.quantization_config(name))
        compared[tensor.name] = name
    return compared


# -- file helpers ---------------------------------------------------------------------------------------------------
class _Aborted(Exception):
    """Another stage failed; this one stops quietly."""


def _as_loraops_error(exc: BaseException) -> BaseException:
    if isinstance(exc, OSError) and not isinstance(exc, LoraopsError) and exc.errno == 28:
        from .errors import DiskSpaceError

        return DiskSpaceError(f"{exc.filename or 'output'}: disk full while writing ({exc.strerror})")
    return exc


def _bytes_view(buffer: "torch.Tensor") -> memoryview:
    return memoryview(buffer.numpy()).cast("B")


def _pread_exact(fd: int, view: memoryview, nbytes: int, offset: int, info: TensorInfo) -> None:
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:nbytes]], offset + done)
        if got == 0:
            raise FormatError(f"{info.file}: truncated while reading tensor {info.name!r}")
        done += got


def _copy(item: _Copy, source: ReadAhead, out: DirectFileWriter, *, hashing: bool) -> None:
    """Append raw bytes of untouched tensors, hashing each tensor on the way when its digest is not cached."""
    for tensor in item.tensors:
        info = tensor.info
        digest = hashlib.sha256() if hashing and tensor.digest is None else None
        try:
            out.copy_from(source.fd, info.start, info.nbytes, digest.update if digest is not None else None,
                          before=source.before)
        except EOFError:
            raise FormatError(f"{info.file}: truncated while reading tensor {info.name!r}") from None
        if digest is not None:
            tensor.digest = digest.hexdigest()


# Files named like these beside the weights that are merged are other copies of the same weights (a
# model.safetensors next to an index's shards, a pytorch_model.bin, Mistral's consolidated.safetensors, a GGUF):
# copied, they would still hold the base, and loaders that prefer them would load it unmerged. Other weight files
# (a sentence-transformers 2_Dense/, an mm_projector.bin) are not the merged model's and are copied.
WEIGHT_COPY = re.compile(r"^((pytorch_|tf_|flax_|diffusion_pytorch_)?model|consolidated)([-.][^/]*)?"
                         r"\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|\.gguf$")
WEIGHT_INDEX = re.compile(r"^((pytorch_|diffusion_pytorch_)?model|consolidated)\.(safetensors|bin)\.([^/]+\.)?index"
                          r"(\.[^/]+)?\.json$")
"""The index of such a copy's shards, as transformers and diffusers name it (with a variant: _add_variant's
model.safetensors.index.fp16.json, diffusers' legacy diffusion_pytorch_model.safetensors.fp16.index.json)."""


def _other_files(base: BaseModel) -> tuple[list[Path], list[Path]]:
    """(the folder's other files the output gets, the other copies of the merged weights it does not), relative
    to the base: a copy is named like a weights file and lies in the folder of weights that are merged: the model's,
    or the subfolder of it its merged files or index lie in (config.json's transformers_weights: sub/model.safetensors;
    transformers reads only that file, but from_pretrained(subfolder="sub") reads a stale sub/model.safetensors
    beside sub/model.safetensors.index.json first, and would load the base unmerged)."""
    parts = [part for part in base.parts if part.folder is not None]
    folders = ({part.folder for part in parts} | {file.parent for part in parts for file in part.files}
               | {part.index_file.parent for part in parts if part.index_file is not None})
    others, indexes = base.other_files(), {part.index_file for part in base.parts}
    # and an index other than the merged weights' lists other copies (a variant's model.safetensors.index.fp16.json,
    # whose shards a Hub snapshot lacks; pytorch_model.bin.index.json): the output does not hold the files it lists
    left_out = [rel for rel in others if (base.path / rel).parent in folders
                and (WEIGHT_COPY.search(rel.name) and not rel.name.endswith(".json")
                     or WEIGHT_INDEX.search(rel.name) and base.path / rel not in indexes)]
    return [rel for rel in others if rel not in left_out], left_out


def _copy_other_files(base: BaseModel, copied: list[Path], out: Path, files: list[_File], out_dtype: str | None) -> None:
    """Config, tokenizer, index, ... copied; the index rewritten when the output's tensors or sizes differ from the
    base's (a dtype change, an untied head added, FP8 scales left out or moved to their weight's file), the config
    edited for a dtype change (and its quantization_config dropped when FP8 weights come out dequantized) and an
    untied head."""
    indexed = {part.index_file: part for part in base.parts if part.index_file is not None}
    untied = {base.model_folder(f.source) for f in files if f.untie}
    for rel in copied:
        source, target = base.path / rel, out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        part = indexed.get(source)
        folder = part.folder if part is not None else source.parent  # (an index may lie in a subfolder of it)
        mine = [f for f in files if base.model_folder(f.source) == folder]  # the model's whose config or index it is
        untie = folder in untied
        if part is not None:
            index = read_json(source, "safetensors index")
            listed = index.get("weight_map", {})
            # (by its path from the model's folder, as the index lists it: sub/model-00001-of-00002.safetensors
            # where transformers_weights names sub/model.safetensors.index.json)
            placed = {t.file_name: f.source.relative_to(folder).as_posix() for f in mine for t in f.tensors}
            weight_map = {name: placed[name] for name in listed if name in placed} | placed
            if out_dtype is not None or weight_map != listed:
                metadata = index.setdefault("metadata", {})
                metadata["total_size"] = sum(t.out_nbytes for f in mine for t in f.tensors)
                if isinstance(metadata.get("total_parameters"), int):  # transformers' count, by what changed
                    metadata["total_parameters"] += (
                        sum(math.prod(t.info.shape) for f in mine for t in f.tensors)
                        - sum(math.prod(info.shape) for file in part.files
                              for info in base.headers[file].tensors.values()))
                index["weight_map"] = weight_map
                target.write_text(json.dumps(index, indent=2) + "\n")
                continue
        elif (out_dtype is not None or untie) and rel.name == "config.json":
            target.write_text(_edited_config(source, out_dtype, untie, any(f.dequantized for f in mine)))
            continue
        shutil.copy2(source, target)


def _edited_config(path: Path, dtype: str | None, untie: bool, dequantized: bool) -> str:
    config = read_model_config(path)
    if dtype is not None:
        name = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[key] = name
    if dequantized:
        config.pop("quantization_config", None)
    if untie:
        config = untied(config)
    return json.dumps(config, indent=2, sort_keys=True) + "\n"
