"""Streaming merge and subtract: adapters into base weights at disk speed, in bounded memory, on CPU or GPU.

    W' = W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ      accumulated in float32 (float64 with precise=True), rounded ONCE to the output dtype

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

from . import settings
from .adapter import Adapter, LoraModule
from .basemodel import BaseModel, fingerprint_of, store_digests
from .check import INPUT_EMBEDDINGS, is_head, tied_head_source
from .errors import FormatError, InvalidInputError, LoraopsError, MismatchError
from .formats.common import FLOAT32_MAX
from .fsutil import (DirectFileWriter, ReadAhead, atomic_path, ensure_free_space, output_path, refuse_overlap,
                     remove_stale_temps)
from .records import MergeInputRecord, MergeReport, ResidualRecord
from .st import DTYPE_BYTES, TensorInfo, header_bytes, read_row_blocks, torch_dtype

if TYPE_CHECKING:
    import torch

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
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
    new_name: str | None = None
    """Name in the output file of a tensor the base does not have: an untied head, whose values start from the input
    embeddings in ``info``."""
    digest: str | None = None
    """sha256 hex of the output bytes, when known (fingerprinting)."""
    source_digest: str | None = None
    """sha256 hex of the base tensor's bytes, when known (fingerprinting)."""

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
    def row_elements(self) -> int:
        return self.info.numel // self.rows if self.rows else 0

    @property
    def out_nbytes(self) -> int:
        return self.info.numel * DTYPE_BYTES[self.out_dtype]

    @property
    def decoded(self) -> bool:
        return bool(self.terms) or self.replacement is not None or self.out_dtype != self.info.dtype


@dataclass
class _File:
    source: Path
    target: Path
    """Relative to the output root ('' for a single-file output)."""
    tensors: list[_Tensor]
    metadata: dict[str, str]
    untie: bool = False
    """The model in this file's folder comes out with its output head untied from its input embeddings."""

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
    out_nbytes: int = 0
    holders: int = 1
    """Stages still reading the buffer (writer, and hasher when fingerprinting)."""


@dataclass
class _Close:
    path: Path
    size: int


_END = object()


def parse_dtype(dtype: "str | torch.dtype | None") -> str | None:
    """'bf16' / 'fp16' / 'fp32' / torch.bfloat16 / 'BF16' → safetensors dtype name (None stays None)."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    if name.upper() in FLOAT_DTYPES:
        return name.upper()
    if name.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[name.lower()]
    raise InvalidInputError(f"unknown dtype {dtype!r}: use bf16, fp16 or fp32")


def merge(
    base: str | Path | BaseModel,
    adapters: Sequence[tuple[Adapter, float]],
    output: str | Path,
    *,
    dtype: "str | torch.dtype | None" = None,
    device: str = "auto",
    precise: bool = False,
    force: bool = False,
    progress: bool | None = None,
    fingerprint: bool = True,
) -> MergeReport:
    """Write base + Σ wᵢ·sᵢ·Bᵢ·Aᵢ to ``output`` (a folder like the base's, or one .safetensors for a single-file
    base). ``dtype`` changes the output dtype of every floating tensor (integer tensors are never converted).
    ``fingerprint``: hash the output while writing it (report.fingerprint; see the module docstring)."""
    return _run("merge", base, [(a, float(w)) for a, w in adapters], output, dtype=dtype, device=device,
                precise=precise, force=force, progress=progress, fingerprint=fingerprint)


def subtract(
    model: str | Path | BaseModel,
    adapters: Sequence[tuple[Adapter, float]],
    output: str | Path,
    *,
    dtype: "str | torch.dtype | None" = None,
    device: str = "auto",
    precise: bool = False,
    force: bool = False,
    progress: bool | None = None,
    reference: str | Path | BaseModel | None = None,
    fingerprint: bool = True,
) -> MergeReport:
    """Write model − Σ wᵢ·sᵢ·Bᵢ·Aᵢ. The report's ``residual`` says what the round trip left: always the largest
    rounding error of the output, and, when ``reference`` (the pristine base) is given, how many elements of the
    touched tensors differ from it. In bf16/fp16 this is never zero: merge rounded W + ΔW once already."""
    return _run("subtract", model, [(a, -float(w)) for a, w in adapters], output, dtype=dtype, device=device,
                precise=precise, force=force, progress=progress, reference=reference, fingerprint=fingerprint)


def _run(operation, base, adapters, output, *, dtype, device, precise, force, progress, fingerprint,
         reference=None) -> MergeReport:
    import torch

    started = time.perf_counter()
    base = base if isinstance(base, BaseModel) else BaseModel.open(base)
    reference = reference if reference is None or isinstance(reference, BaseModel) else BaseModel.open(reference)
    out_dtype = parse_dtype(dtype)
    dev = settings.resolve_device(device)
    output = output_path(output)
    refuse_overlap(output, base.path, "the model it reads")
    if reference is not None:
        refuse_overlap(output, reference.path, "the pristine base it compares with")
    adapters = [(fit(adapter, base), weight) for adapter, weight in adapters]
    files = _plan(base, adapters, out_dtype, undo=operation == "subtract")
    if reference is not None:
        _check_reference(reference, files)
    copied, left_out = _other_files(base)
    _ensure_room(base, files, copied, output)
    tensors = [t for f in files for t in f.tensors]
    compute_dtype = torch.float64 if precise or any("F64" in (t.info.dtype, t.out_dtype) for t in tensors) else torch.float32
    stats = _Residual(reference) if operation == "subtract" else None
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
            _Pipeline(root, dev, compute_dtype, bar, stats, fingerprint).run(files)
        finally:
            bar.close()
        if not base.is_single_file:
            _copy_other_files(base, copied, tmp, files, out_dtype)
    if fingerprint:
        _store_digests(base, output, files, known)
    return MergeReport(
        operation=operation,
        output=str(output),
        base=str(base.path),
        adapters=[
            MergeInputRecord(adapter=a.label, weight=w, modules=len(a.modules),
                             full_tensors=len(a.full_tensors))
            for a, w in adapters
        ],
        dtype=out_dtype or base.dtype,
        device=str(dev),
        precise=precise,
        tensors_merged=sum(bool(t.terms) for t in tensors),
        tensors_replaced=sum(t.replacement is not None for t in tensors),
        tensors_converted=sum(t.decoded and not t.terms and t.replacement is None for t in tensors),
        tensors_copied=sum(not t.decoded for t in tensors),
        bytes_written=sum(f.size for f in files),
        seconds=round(time.perf_counter() - started, 3),
        peak_rss_bytes=peak_rss(),
        residual=stats.record() if stats else None,
        files_left_out=[str(p) for p in left_out],
        heads_untied=[t.name for f in files if f.untie for t in f.tensors if is_head(t.name)],
        fingerprint=fingerprint_of((t.name, t.out_dtype, t.info.shape, t.digest) for t in tensors) if fingerprint else None,
    )


def check_room(base: BaseModel, output: str | Path, dtype: "str | torch.dtype | None" = None) -> None:
    """Refuse an output that cannot fit before any adapter is loaded (the run checks again, with its adapters)."""
    _ensure_room(base, _plan(base, [], parse_dtype(dtype)), _other_files(base)[0], output_path(output))


def _ensure_room(base: BaseModel, files: list[_File], copied: list[Path], output: Path) -> None:
    remove_stale_temps(output)  # what a killed earlier run to this output left, before counting free space
    needed = sum(f.size for f in files) + sum((base.path / p).stat().st_size for p in copied)
    ensure_free_space(output.parent, needed, output.name)


def _store_digests(base: BaseModel, output: Path, files: list[_File], known: dict[str, str]) -> None:
    """Cache the digests the pipeline computed: the output's, and the base's when they were not cached."""
    empty = hashlib.sha256().hexdigest()
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
        base_digests = {t.info.name: t.source_digest for t in file.tensors if t.new_name is None}
        # (a replaced tensor's base bytes are never read, so such a file stays unknown)
        if None not in base_digests.values() and any(t.name not in known for t in file.tensors):
            store_digests(file.source, base_digests)


def peak_rss() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def fit(adapter: Adapter, base: BaseModel) -> Adapter:
    """The adapter bound to ``base`` (kohya names resolved), or one MismatchError line listing what does not fit."""
    from .check import require_fit

    return require_fit(adapter, base.tensors, base_name=str(base.path))


def _plan(base: BaseModel, adapters: list[tuple[Adapter, float]], out_dtype: str | None, *,
          undo: bool = False) -> list[_File]:
    heads = _unstored_heads(base, adapters, undo)
    terms: dict[str, list[tuple[LoraModule, float]]] = {}
    changed_by: dict[str, set[int]] = {}  # tensor → the inputs whose LoRAs change it
    replacements: dict[str, "torch.Tensor"] = {}
    replaced_by: dict[str, int] = {}
    for index, (adapter, weight) in enumerate(adapters):
        for module in adapter.modules.values():
            if abs(weight * module.scale) > FLOAT32_MAX:  # addmm_ refused it as a coefficient: a traceback
                raise InvalidInputError(f"{adapter.label}: weight {weight:g} × scale {module.scale:g} of module "
                                        f"{module.name!r} is beyond what float32 holds")
            if weight * module.scale != 0:
                terms.setdefault(module.weight_name, []).append((module, weight * module.scale))
                changed_by.setdefault(module.weight_name, set()).add(index)
        adapted = _saved_layer_tensors(adapter)
        for name, tensor in adapter.full_tensors.items():
            # PEFT's saved layer under a LoRA (save_embedding_layers): untouched by training it replaces nothing;
            # a subtract takes the LoRA's delta back off and leaves the layer as the merge made it
            if name in adapted and (undo or _same_as_base(base, heads.get(name, name), tensor)):
                continue
            # A modules_to_save tensor is a new value, not a difference: there is nothing to scale or negate.
            if weight != 1:
                raise InvalidInputError(
                    f"{adapter.label}: replaces {name!r} with a full tensor (modules_to_save or a saved layer), "
                    f"which cannot be applied with weight {weight:g}; only weight 1 (a plain merge) is defined"
                )
            if name in replacements:
                raise InvalidInputError(f"two adapters replace {name!r} (modules_to_save); merge them separately")
            replacements[name] = tensor
            replaced_by[name] = index
    for name, index in replaced_by.items():
        # the LoRA of the adapter that saved the layer is added on its value (PEFT's save_embedding_layers); another
        # adapter's was trained on a different tensor
        if changed_by.get(name, set()) - {index}:
            raise InvalidInputError(f"{name!r} is replaced by one adapter (modules_to_save) and changed by another's "
                                    "LoRA; merge them separately")
    untied = {base.tensors[source].file for source in heads.values()}
    for group in _stored_twice(base, terms.keys() | replacements.keys()):
        if not undo and any(is_head(name) for name in group & (terms.keys() | replacements.keys())) \
                and _can_untie(base, min(group)):
            untied |= {base.tensors[name].file for name in group}  # each copy keeps its own changes
            continue
        shared = [term for name in sorted(group) for term in terms.get(name, [])]
        replacement = next((replacements[name] for name in sorted(group) if name in replacements), None)
        for name in group:
            terms[name] = shared
            if replacement is not None:
                replacements[name] = replacement
    for name in [*terms, *replacements]:
        info = base.tensors[heads.get(name, name)]
        if info.dtype not in FLOAT_DTYPES:
            raise FormatError(
                f"{info.file}: {info.name!r} is stored as {info.dtype}; "
                "merging into quantized or integer weights is not supported"
            )
    by_file: dict[Path, list[tuple[str, TensorInfo]]] = {}
    for name, info in base.tensors.items():
        by_file.setdefault(info.file, []).append((name, info))
    files = []
    for part in base.parts:
        for source in part.files:
            tensors = []
            for name, info in sorted(by_file.get(source, []), key=lambda item: item[1].start):
                convert = out_dtype is not None and info.dtype in FLOAT_DTYPES
                component = name.removesuffix(info.name)  # a pipeline's "unet." …
                for out_name in [name, *sorted(head for head, embeddings in heads.items() if embeddings == name)]:
                    tensors.append(_Tensor(out_name, info, out_dtype if convert else info.dtype,
                                           terms.get(out_name, []), replacements.get(out_name),
                                           new_name=None if out_name == name else out_name.removeprefix(component)))
            target = source.relative_to(base.path) if part.folder is not None else Path(source.name)
            files.append(_File(source, target, tensors, base.headers[source].metadata, untie=source in untied))
    return files


def _saved_layer_tensors(adapter: Adapter) -> set[str]:
    """The tensors a PEFT saved layer under a LoRA (save_embedding_layers) can hold: each module's weight, and its
    bias when the adapter trains no biases (PEFT saves the wrapped layer whole: Phi's and GPT-J's lm_head)."""
    names = {module.weight_name for module in adapter.modules.values()}
    if (adapter.config.get("bias") or "none") == "none":  # PEFT's default, also when the config says null
        names |= {f"{module.name}.bias" for module in adapter.modules.values()
                  if module.fused is None and module.weight_name in adapter.full_tensors}
    return names


def _unstored_heads(base: BaseModel, adapters: list[tuple[Adapter, float]], undo: bool) -> dict[str, str]:
    """Output heads an adapter changes that the base does not store, since it ties them to its input embeddings →
    those embeddings. The merge writes such a head as a tensor of its own (the embeddings' values + the head's
    changes) and unties the model's config; the embeddings get only their own changes. The merged model then
    computes what the adapter's model computed, where changing the one shared tensor (PEFT's merge) would move the
    input embeddings by the head's delta too."""
    wanted = {m.weight_name: m.weight_shape for adapter, weight in adapters for m in adapter.modules.values()
              if weight * m.scale != 0}
    wanted.update((name, tuple(t.shape)) for adapter, _ in adapters for name, t in adapter.full_tensors.items())
    heads = {}
    for name, shape in sorted(wanted.items()):
        embeddings = tied_head_source(name, shape, base.tensors)
        if embeddings is None:
            continue
        if undo:
            raise InvalidInputError(f"{name!r} is not in the model, which ties its output head to {embeddings!r}: "
                                    "there is no head to take a LoRA off")
        if _tie_word_embeddings(base, embeddings) is False:
            raise MismatchError(f"{name!r} is not in the base, and its config.json says tie_word_embeddings: false")
        if not _can_untie(base, embeddings):
            raise MismatchError(f"{name!r} is tied to {embeddings!r} in an encoder-decoder model, where "
                                "tie_word_embeddings also decides how the output is scaled (T5-style): loraops "
                                "does not untie it, and does not merge into tied heads")
        heads[name] = embeddings
    return heads


def _can_untie(base: BaseModel, tensor: str) -> bool:
    """May the model holding ``tensor`` come out with tie_word_embeddings false? Not an encoder-decoder one: some
    (Switch Transformers, UDOP, and T5 before transformers 5) scale their decoder's output when tied."""
    return _model_config(base, tensor).get("is_encoder_decoder") is not True


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


def _stored_twice(base: BaseModel, touched: Iterable[str]) -> list[set[str]]:
    """Groups of the base's tensors that are one tied parameter stored more than once (byte-identical copies), among
    those a merge touches: a change to one must reach every copy, or the loaded model comes out untied, its
    head still the base's (transformers re-ties only equal tensors), where PEFT changed the one shared tensor."""
    import torch

    candidates = [n for n in base.tensors if n.endswith(INPUT_EMBEDDINGS)]
    if not base.is_single_file:
        candidates += [n for n in base.tensors if is_head(n) and n.endswith(".weight")
                       and _tie_word_embeddings(base, n) is not False]
    groups = []
    for name in set(touched) & set(candidates):
        info = base.tensors[name]
        twins = {other for other in candidates if other != name and base.tensors[other].shape == info.shape
                 and base.tensors[other].dtype == info.dtype}
        twins = {other for other in twins
                 if all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(read_row_blocks(info), read_row_blocks(base.tensors[other])))}
        if twins and not any(name in group for group in groups):
            groups.append({name, *twins})
    return groups


def _tie_word_embeddings(base: BaseModel, tensor: str) -> bool | None:
    """What the config.json of the model holding ``tensor`` says of tying (a VLM's in its text_config); None when
    it says nothing."""
    config = _model_config(base, tensor)
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return config.get("tie_word_embeddings", text_config.get("tie_word_embeddings"))


def _model_config(base: BaseModel, tensor: str) -> dict:
    """The config.json of the model holding ``tensor``; {} when there is none, or for a single-file base (a file
    beside it describes another model)."""
    if base.is_single_file:
        return {}
    try:
        config = json.loads((base.tensors[tensor].file.parent / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


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
        step = max(1, CHUNK_ELEMENTS // max(1, tensor.row_elements))
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

    def __init__(self, root: Path, device: "torch.device", compute_dtype: "torch.dtype", bar, residual,
                 hashing: bool) -> None:
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
        self._factors: dict[int, tuple["torch.Tensor", "torch.Tensor"]] = {}
        self._factors_of: _Tensor | None = None

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
        reader = threading.Thread(target=self._guard, args=(self._read, files), name="loraops-read", daemon=True)
        writer = threading.Thread(target=self._guard, args=(self._write,), name="loraops-write", daemon=True)
        stages = [reader, writer]
        if self.hashing:
            stages.append(threading.Thread(target=self._guard, args=(self._hash,), name="loraops-hash", daemon=True))
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(compute_threads(len(stages), threads))
        for stage in stages:
            stage.start()
        try:
            self._guard(self._compute)
        finally:
            self._join(stages)
            torch.set_num_threads(threads)
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
        handles: list[int] = []
        source_hasher = _TensorHasher()
        try:
            for file in files:
                self._put(self.read_q, _Open(self.root / file.target, file.header, file.size))
                fd = os.open(file.source, os.O_RDONLY)
                handles.append(fd)
                ahead = ReadAhead(fd)
                for step in _steps(file):  # raw copies (_Copy) are read by the writer
                    if isinstance(step, _Chunk):
                        step.buffer = self._get(self.pool)
                        if step.tensor.replacement is None:
                            info = step.tensor.info
                            row_bytes = step.tensor.row_elements * DTYPE_BYTES[info.dtype]
                            nbytes = (step.row1 - step.row0) * row_bytes
                            offset = info.start + step.row0 * row_bytes
                            ahead.before(offset)
                            _pread_exact(fd, _bytes_view(step.buffer), nbytes, offset, info)
                            if self.hashing and step.tensor.source_digest is None:
                                step.tensor.source_digest = source_hasher.add(step, _bytes_view(step.buffer)[:nbytes])
                    self._put(self.read_q, step)
                self._put(self.read_q, _Close(self.root / file.target, file.size))
            self._put(self.read_q, _END)
        finally:
            for fd in handles:
                os.close(fd)

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
        if tensor.replacement is not None:  # the new value, with the LoRA deltas on it when it has any
            w = tensor.replacement.reshape(-1)[chunk.row0 * tensor.row_elements : chunk.row1 * tensor.row_elements]
            if not tensor.terms:
                out.copy_(w)
                return
        else:
            w = buf[: n * DTYPE_BYTES[tensor.info.dtype]].view(torch_dtype(tensor.info.dtype))
            if not tensor.terms:  # a --dtype conversion; the input and output views overlap: convert out of place
                out.copy_(w.to(out_dtype))
                return
        cuda = self.device.type == "cuda"
        acc = self.work[:n]
        acc.copy_(w, non_blocking=cuda)
        acc2 = acc.view(rows, tensor.row_elements)
        for module, coef in tensor.terms:
            # the module's rows of W (all of them, unless it is one part of a fused tensor) inside this chunk
            first = module.first_row
            row0, row1 = max(chunk.row0, first), min(chunk.row1, first + module.weight_shape[0])
            if row0 < row1:
                B2, A2 = self._module_factors(tensor, module)
                col0, cols = module.fused_columns or (0, tensor.row_elements)
                add_delta(acc2[row0 - chunk.row0 : row1 - chunk.row0, col0 : col0 + cols], B2, A2, module.transposed,
                          slice(row0 - first, row1 - first), coef)
        if cuda:
            out.copy_(acc.to(out_dtype), non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        else:
            out.copy_(acc)
        if self.residual is not None:
            self.residual.add(tensor, chunk, acc, out)

    def _module_factors(self, tensor: _Tensor, module: LoraModule):
        """(B2, A2) in the compute dtype on the device, kept while one tensor's chunks are computed."""
        if self._factors_of is not tensor:
            self._factors, self._factors_of = {}, tensor
        key = id(module)
        if key not in self._factors:
            B2, A2 = module.matrices()
            self._factors[key] = (B2.to(self.device, self.compute_dtype), A2.to(self.device, self.compute_dtype))
        return self._factors[key]


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

    def __init__(self, reference: BaseModel | None) -> None:
        self.reference = reference
        self.elements = 0
        self.differing = 0
        self.max_diff = 0.0
        self.rounding = 0.0
        self._handles: dict[Path, int] = {}

    def add(self, tensor: _Tensor, chunk: _Chunk, acc: "torch.Tensor", out: "torch.Tensor") -> None:
        import torch

        stored = out.to(device=acc.device, dtype=acc.dtype)
        self.rounding = max(self.rounding, float((stored - acc).abs().max()))
        self.elements += out.numel()
        if self.reference is None:
            return
        info = self.reference.tensors[tensor.name]
        row_bytes = tensor.row_elements * DTYPE_BYTES[info.dtype]
        raw = bytearray((chunk.row1 - chunk.row0) * row_bytes)
        fd = self._handles.get(info.file) or self._handles.setdefault(info.file, os.open(info.file, os.O_RDONLY))
        _pread_exact(fd, memoryview(raw), len(raw), info.start + chunk.row0 * row_bytes, info)
        ref = torch.frombuffer(raw, dtype=torch_dtype(info.dtype)) if raw else out.new_empty(0, dtype=torch_dtype(info.dtype))
        if ref.dtype == out.dtype:  # bit for bit (so -0.0 ≠ 0.0 and NaNs compare by their bits)
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[ref.element_size()]
            self.differing += int((ref.view(bits) != out.view(bits).reshape(-1)).sum())
        else:  # a subtract to another dtype (--dtype) than the base's: by value
            self.differing += int((ref.double() != out.double().reshape(-1)).sum())
        # in float32 unless a side is float64: the difference of two bf16/fp16 neighbours is exact there, and the
        # float64 conversions cost more than the merge's own arithmetic
        wide = torch.promote_types(torch.promote_types(ref.dtype, out.dtype), torch.float32)
        diff = (ref.to(wide) - out.to(wide).reshape(-1)).abs().max() if ref.numel() else 0.0
        self.max_diff = max(self.max_diff, float(diff))

    def record(self) -> ResidualRecord:
        for fd in self._handles.values():
            os.close(fd)
        self._handles = {}
        if self.reference is None:
            note = ("no pristine base to compare with; merge+subtract in a low-precision dtype is never bit-exact "
                    "(each round trip rounds twice): for a merge recorded by loraops, --exact restores its base")
            return ResidualRecord(elements=self.elements, rounding_max_abs=self.rounding, note=note)
        note = "bit-exact" if self.differing == 0 else (
            "the rounding of the round trip; use --exact to restore the base bit for bit")
        return ResidualRecord(compared_to=str(self.reference.path), elements=self.elements,
                              elements_differing=self.differing, max_abs_diff=self.max_diff,
                              rounding_max_abs=self.rounding, note=note)


def _check_reference(reference: BaseModel, files: list[_File]) -> None:
    for tensor in (t for f in files for t in f.tensors if t.terms):
        info = reference.tensors.get(tensor.name)
        if info is None or info.shape != tensor.info.shape:
            raise MismatchError(f"{reference.path}: cannot serve as the pristine base ({tensor.name!r} differs)")


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


def _other_files(base: BaseModel) -> tuple[list[Path], list[Path]]:
    """(the folder's other files the output gets, the other copies of the merged weights it does not), relative
    to the base: a copy is named like a weights file and lies in the folder of weights that are merged."""
    folders = {part.folder for part in base.parts if part.folder is not None}
    others = base.other_files()
    left_out = [rel for rel in others if (base.path / rel).parent in folders and WEIGHT_COPY.search(rel.name)
                and not rel.name.endswith(".json")]
    return [rel for rel in others if rel not in left_out], left_out


def _copy_other_files(base: BaseModel, copied: list[Path], out: Path, files: list[_File], out_dtype: str | None) -> None:
    """Config, tokenizer, index, ... copied; with a dtype change the index's total_size and config's dtype updated,
    with an untied head its tensor added to the index and the config untied."""
    index_files = {part.index_file for part in base.parts if part.index_file is not None}
    untied = {f.target.parent for f in files if f.untie}
    for rel in copied:
        source, target = base.path / rel, out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        untie = rel.parent in untied
        if (out_dtype is not None or untie) and source in index_files:
            index = json.loads(source.read_text())
            mine = [f for f in files if f.target.parent == rel.parent]
            index.setdefault("metadata", {})["total_size"] = sum(t.out_nbytes for f in mine for t in f.tensors)
            index.setdefault("weight_map", {}).update(
                {t.new_name: f.target.name for f in mine for t in f.tensors if t.new_name is not None})
            target.write_text(json.dumps(index, indent=2) + "\n")
        elif (out_dtype is not None or untie) and rel.name == "config.json":
            target.write_text(_edited_config(source, out_dtype, untie))
        else:
            shutil.copy2(source, target)


def _edited_config(path: Path, dtype: str | None, untie: bool) -> str:
    text = path.read_text()
    try:
        config = json.loads(text)
    except ValueError:
        return text
    if dtype is not None:
        name = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[key] = name
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    return json.dumps(config, indent=2, sort_keys=True) + "\n"
