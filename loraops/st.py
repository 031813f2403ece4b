"""safetensors headers, read and checked without loading any weights.

Everything that opens a .safetensors file goes through ``read_header`` first, so a truncated, corrupt or
hostile file fails here with a one-line FormatError naming the file, before any tensor is touched.
The format: 8-byte little-endian header length N, N bytes of JSON, then the raw tensor data; each entry's
``data_offsets`` are relative to the start of the data.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import json
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from .errors import FormatError, InvalidInputError, NotFoundError
from .fsutil import DirectFileWriter, ReadAhead, resolved

if TYPE_CHECKING:
    from typing import Callable, TypeVar

    import torch

    T = TypeVar("T")

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}

UNSUPPORTED_DTYPES = {
    "C64": "complex64", "F4": "4-bit float, E2M1", "F6_E2M3": "6-bit float, E2M3", "F6_E3M2": "6-bit float, E3M2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
"""The safetensors library's other dtypes (0.8's Dtype): valid files whose tensors loraops does not read, refused
as that rather than as an unknown dtype."""

TORCH_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
    "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}


def torch_name(dtype: str | None) -> str | None:
    """A safetensors dtype name as torch names it (BF16 → bfloat16, F8_E4M3 → float8_e4m3fn), as loraops shows
    dtypes; any other name (already torch's) as it is."""
    return TORCH_DTYPE_NAMES.get(dtype, dtype)


def dtype_name(dtype: "torch.dtype | str") -> str:
    """A torch dtype as loraops shows and records it: torch.bfloat16 (or the string 'torch.bfloat16') → 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(st_dtype: str) -> "torch.dtype":
    import torch

    return getattr(torch, TORCH_DTYPE_NAMES[st_dtype])


def st_dtype(dtype: "torch.dtype") -> str:
    name = dtype_name(dtype)
    for key, value in TORCH_DTYPE_NAMES.items():
        if value == name:
            return key
    raise FormatError(f"dtype {dtype} cannot be stored in safetensors")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    """safetensors dtype name (F32, BF16, ...)."""
    shape: tuple[int, ...]
    start: int
    """Absolute byte offset of the tensor's data in ``file``."""
    end: int
    file: Path

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int
    """Absolute offset where tensor data begins (8 + header length)."""
    file_size: int
    source: Path = field(default=None)
    """The file the bytes are read from: ``path`` itself, or a private copy of it (``private_copy``)."""

    def __post_init__(self) -> None:
        if self.source is None:
            object.__setattr__(self, "source", self.path)


_COPIES: contextvars.ContextVar[dict[Path, Path]] = contextvars.ContextVar("private_copies", default={})


@contextlib.contextmanager
def private_copy(path: Path, folder: Path, reserve: int = 0) -> Iterator[str | None]:
    """While in the block, ``path`` is read (read_header, load_tensors, map_file) from a copy of its bytes made now in
    a file with no name in ``folder`` (fsutil.DirectFileWriter's scratch: gone with the process, even after a SIGKILL),
    which nobody else can rewrite: so it may be mapped (map_file), where the user's own file may not (a file that
    shrinks while mapped kills the process). Yields the sha256 of the copied bytes, hashed as they are copied: they
    are the bytes every later read sees. Yields None, copying nothing, where the copy could not be reopened by name
    (no /proc/self/fd), mapping is turned off (settings.map_stored), ``folder`` has no room for it with
    ``reserve`` bytes left (what the output written there needs) or its file system cannot map files: the file is
    then read as it is."""
    import shutil

    from . import settings

    if not settings.map_stored() or not Path("/proc/self/fd").is_dir():
        yield None
        return
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if shutil.disk_usage(folder).free < size + reserve:
            yield None
            return
        # (through the page cache: the copy is read back at once, through the mapping)
        writer, digest = DirectFileWriter(folder, scratch=True, direct=False), hashlib.sha256()
        try:
            try:
                writer.copy_from(f.fileno(), 0, size, digest.update)
            except EOFError:
                raise FormatError(f"{path}: changed while it was being read (shorter than {size} bytes)") from None
            writer.close(keep_open=True)
            if not _mappable(writer.fd):  # (a file system that cannot map files, some FUSE ones: read as it is)
                yield None
                return
            token = _COPIES.set({**_COPIES.get(), resolved(path): Path(f"/proc/self/fd/{writer.fd}")})
            try:
                yield digest.hexdigest()
            finally:
                _COPIES.reset(token)
        finally:
            writer.abandon()  # (closes the copy; what maps it keeps it)


def _mappable(fd: int) -> bool:
    import mmap

    try:
        mmap.mmap(fd, 0, access=mmap.ACCESS_READ).close()
    except (OSError, ValueError):
        return False
    return True


def looks_like_pickle(path: Path) -> bool:
    """PyTorch .bin/.pt files are zip archives (new) or raw pickles (old). A safetensors file has '{' right after its
    8-byte length, which tells the two apart even when the length's first byte happens to be 0x80 or 'P'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return False
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def narrows(source: "torch.dtype", out: "torch.dtype") -> bool:
    """Whether converting ``source`` to ``out`` can carry a finite value past ``out``'s range (float64 or float32 to
    bfloat16: float32's top 0.4 % is beyond bfloat16's max), so a conversion alone is scanned: one aminmax a chunk."""
    import torch

    return source.is_floating_point and out.is_floating_point and torch.finfo(source).max > torch.finfo(out).max


def converted(tensor: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    """``tensor`` in ``dtype`` on the CPU, with NaN where a value rounds past ``dtype``'s range (beyond its max plus
    half its last step): torch's conversion to float8_e4m3fn saturates such values at ±448, silently, where float16's
    makes them inf; so the finite checks find both."""
    out = tensor.to(device="cpu", dtype=dtype)
    beyond = past_range(tensor, dtype)
    if beyond is not None:
        out = tensor.cpu().masked_fill(beyond, math.nan).to(dtype)
    return out


def past_range(tensor: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor | None":
    """Where ``tensor``'s values round past ``dtype``'s range (beyond its max plus half its last step), on the CPU;
    None where none does."""
    import torch

    if not (narrows(tensor.dtype, dtype) and tensor.numel()):
        return None
    info = torch.finfo(dtype)
    beyond = (tensor.abs() > info.max + 2.0 ** math.floor(math.log2(info.max)) * info.eps / 2).cpu()
    return beyond if beyond.any() else None


def all_finite(tensor: "torch.Tensor") -> bool:
    """Whether no value is NaN or ±inf: one reduction finds both (they propagate through min/max), 10-20× faster on
    CPU than isinf().any() or isfinite().all(), which write a bool per value."""
    import torch

    low, high = (float(v) for v in torch.aminmax(tensor))
    return math.isfinite(low) and math.isfinite(high)


def beyond_range(name: str, dtype: "torch.dtype", hint: str) -> InvalidInputError:
    """The error of a tensor whose values go past ``dtype``'s range (they would round to inf, silently in torch)."""
    import torch

    return InvalidInputError(f"{name!r} comes out with values beyond {dtype_name(dtype)}'s range "
                             f"(±{torch.finfo(dtype).max:.6g}); {hint}", ["dtype"])  # (the hint may name `dtype`)


def _source(path: Path) -> Path:
    """Where ``path``'s bytes are read from: its private copy inside a private_copy block, else itself."""
    return _COPIES.get().get(resolved(path), path) if _COPIES.get() else path


def read_header(path: str | Path) -> Header:
    """Parse and fully validate a safetensors header. Raises NotFoundError / FormatError with the file named."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise FormatError(f"{path}: is a folder, not a .safetensors file")
    source = _source(path)
    size = source.stat().st_size
    if size < 8:
        raise FormatError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
    if looks_like_pickle(source):
        raise FormatError(
            f"{path}: a pickle (PyTorch .bin/.pt) file, which can run code when loaded; convert it to safetensors "
            "first (e.g. safetensors.torch.save_file(torch.load(f, weights_only=True), 'out.safetensors'))"
        )
    with open(source, "rb") as f:
        return _header_from(f, path, size, source)


def _header_from(f, path: Path, size: int, source: Path, seen: Callable[[bytes], None] | None = None) -> Header:
    """The validated header of the file ``path`` of ``size`` bytes, read from ``f`` at its start (read_header);
    ``seen`` is given the bytes it was parsed from (its length and JSON)."""
    head = f.read(8)
    if head.startswith(b"GGUF"):  # (as a length, over the limit: it said "header claims 14064895815 bytes")
        raise FormatError(f"{path}: a GGUF file (llama.cpp's format), not safetensors: give the safetensors model "
                          "or adapter it was converted from")
    if len(head) < 8:
        raise FormatError(f"{path}: not a safetensors file ({len(head)} bytes, too short for a header)")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER_BYTES:
        if all(32 <= byte < 127 or byte in b"\t\n\r" for byte in head):  # (a real length's high bytes are 0)
            raise FormatError(f"{path}: not a safetensors file: it begins with text ({head.decode()!r}…), as a JSON, "
                              "YAML or notes file does")
        raise FormatError(f"{path}: not a safetensors file (header claims {length} bytes, over the 100 MB limit)")
    if 8 + length > size:
        raise FormatError(f"{path}: truncated or not a safetensors file (header of {length} bytes, file of {size})")
    raw = f.read(length)
    if len(raw) < length:
        raise FormatError(f"{path}: changed while it was being read (shorter than {size} bytes)")
    if seen is not None:
        seen(head)
        seen(raw)
    header = parse_header(raw, path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_offset = 8 + length
    data_size = size - data_offset
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_offset, data_size)
    # the tensors' bytes must cover the data back to back, as the safetensors library requires of a file it loads
    position, previous = data_offset, None
    for start, end, name in sorted((t.start, t.end, t.name) for t in tensors.values()):
        if start < position:
            raise FormatError(f"{path}: corrupt safetensors file (tensors {previous!r} and {name!r} overlap)")
        if start > position:
            raise FormatError(f"{path}: corrupt safetensors file (bytes {position - data_offset}–{start - data_offset} "
                              "of its data belong to no tensor)")
        position, previous = end, name
    if position < size:
        raise FormatError(f"{path}: corrupt safetensors file ({size - position} bytes after the last tensor's data)")
    return Header(path=path, tensors=tensors, metadata=dict(metadata), data_offset=data_offset, file_size=size,
                  source=source)


def parse_header(raw: bytes, where: object) -> dict:
    """The JSON object of a safetensors header (``raw``: the bytes after its length), read as the safetensors library
    reads it, or a FormatError naming ``where`` (a file, or a Hub file read by ranges)."""
    if raw.startswith(b"\xef\xbb\xbf"):  # json.loads(bytes) skips it; the safetensors library does not
        raise FormatError(f"{where}: not a safetensors file (header starts with a byte order mark; its JSON must not)")
    try:
        header = json.loads(raw.decode(), object_pairs_hook=_header_members, parse_int=_header_int,
                            parse_float=_header_float, parse_constant=_header_constant)
        _refuse_deep(header)
    except RecursionError:  # (Python's JSON nests about 1000 deep)
        raise FormatError(f"{where}: corrupt safetensors header (it nests deeper than {MAX_HEADER_DEPTH})") from None
    except _Refused as refused:
        raise FormatError(f"{where}: corrupt safetensors header ({refused.args[0]})") from None
    except UnicodeEncodeError as exc:
        raise FormatError(f"{where}: corrupt safetensors header ({exc.object!r} is not Unicode text: a lone surrogate "
                          "escape)") from None
    except ValueError:  # (JSONDecodeError, UnicodeDecodeError, and a number past Python's 4300-digit limit)
        raise FormatError(f"{where}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{where}: not a safetensors file (header is not a JSON object)")
    return header


class _Refused(Exception):
    """JSON that json.loads reads but the safetensors library refuses (or reads otherwise); its argument says why."""


def _header_members(pairs: list[tuple[str, object]]) -> dict:
    """A header object's members. Text with a lone surrogate escape ("\\udcff": JSON that json.loads reads, but no
    Unicode text; the registry cannot store it) is refused as the safetensors library refuses it; a member named twice
    is refused more strictly than the library, which keeps the last (a writer's bug, which other readers may read as
    the first). Both raise the error read_header names."""
    for key, value in pairs:
        key.encode()
        if isinstance(value, str):
            value.encode()
    members = dict(pairs)
    if len(members) < len(pairs):
        seen: set[str] = set()
        raise _Refused(f"it names {next(key for key, _ in pairs if key in seen or seen.add(key))!r} twice")
    return members


def _header_int(text: str) -> int | float:
    """An integer of the header as the safetensors library (serde_json) reads it: '-0' is a float, refused where a size
    or offset is read, taken elsewhere; one past float64 (a 400-digit integer) is out of range anywhere."""
    if text == "-0":
        return -0.0
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise _Refused(f"{text[:12]}… ({len(text)} digits) is beyond float64") from None
    return value


def _header_float(text: str) -> float:
    """A number of the header: one past float64 ('1e999', which Python reads as inf) is out of range to the library."""
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"{text} is beyond float64")
    return value


MAX_HEADER_DEPTH = 127
"""How deep the safetensors library's JSON (serde_json) nests arrays and objects, the header itself counted."""


def _refuse_deep(header: object) -> None:
    level, depth = ([header] if isinstance(header, (dict, list)) else []), 0
    while level:  # (level by level, without recursion: a walk per value cost a third of the parse)
        depth += 1
        if depth > MAX_HEADER_DEPTH:
            raise _Refused(f"it nests deeper than {MAX_HEADER_DEPTH}")
        level = [child for value in level for child in (value.values() if isinstance(value, dict) else value)
                 if isinstance(child, (dict, list))]


def _header_constant(text: str):
    """NaN, Infinity, -Infinity: Python's JSON extensions, which the safetensors library refuses anywhere."""
    raise _Refused(f"{text} is not JSON")


def _tensor_info(path: Path, name: str, entry: object, data_offset: int, data_size: int) -> TensorInfo:
    dtype, shape = tensor_dtype_shape(path, name, entry)
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(path, name, f"bad data_offsets {offsets!r}")
    if offsets[1] > data_size:
        raise _corrupt(path, name, f"data ends at byte {offsets[1]}, past the end of the file (truncated?)")
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise _corrupt(path, name, f"{offsets[1] - offsets[0]} bytes for a {dtype} tensor of shape {shape} ({expected} "
                                   "expected)")
    return TensorInfo(name, dtype, shape, data_offset + offsets[0], data_offset + offsets[1], path)


def tensor_dtype_shape(where: object, name: str, entry: object) -> tuple[str, tuple[int, ...]]:
    """The dtype and shape of header entry ``name``, checked as the safetensors library checks them (a dtype it knows
    that loraops does not read named so), or a FormatError naming ``where``."""
    if not isinstance(entry, dict):
        raise _corrupt(where, name, "entry is not an object")
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if not isinstance(dtype, str):
        raise _corrupt(where, name, f"unknown dtype {dtype!r}")
    if dtype in UNSUPPORTED_DTYPES:
        raise FormatError(f"{where}: tensor {name!r} is {dtype} ({UNSUPPORTED_DTYPES[dtype]}): loraops does not "
                          "support tensors of that dtype")
    if dtype not in DTYPE_BYTES:
        raise _corrupt(where, name, f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _corrupt(where, name, f"bad shape {shape!r}")
    # the safetensors library counts elements (then bits) in 64 bits, each product checked, refusing an empty tensor
    # too where a partial product overflows; 0 bytes would pass the size check of its data
    count = 1
    for factor in [*shape, 8 * DTYPE_BYTES[dtype]]:  # the elements, then their bits
        count *= factor
        if factor >= 2 ** 64 or count >= 2 ** 64:
            raise _corrupt(where, name, f"shape {shape!r} has more elements than 64 bits count")
    return dtype, tuple(shape)


def _corrupt(where: object, name: str, why: str) -> FormatError:
    return FormatError(f"{where}: corrupt safetensors header (tensor {name!r}: {why})")


def header_bytes(entries, metadata: dict[str, str] | None = None, *, ensure_ascii: bool = False) -> bytes:
    """The bytes that start a safetensors file whose tensors follow back to back in the order of ``entries``
    ((name, dtype, shape) triples): 8-byte length, compact JSON (``__metadata__`` first), padded with spaces to a
    multiple of 8 as the safetensors library pads it. A streaming writer writes this, then each tensor's bytes."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        end = offset + math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=ensure_ascii).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def read_tensor(info: TensorInfo, handle=None) -> "torch.Tensor":
    """Load one tensor's bytes (and nothing else) from its file; ``handle`` reuses an open binary file."""
    import torch

    data = bytearray(info.nbytes)  # read straight into the tensor's memory: one copy of the bytes, not two

    def read(f) -> int:
        f.seek(info.start)
        return f.readinto(data)

    if handle is None:
        with open(info.file, "rb") as f:
            got = read(f)
    else:
        got = read(handle)
    if got != info.nbytes:
        raise FormatError(f"{info.file}: truncated while reading tensor {info.name!r}")
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    return torch.frombuffer(data, dtype=torch_dtype(info.dtype)).reshape(info.shape)


def rows_per_block(info: TensorInfo) -> int:
    """How many rows of a stored tensor make a block of ≤ 64 MiB (read_row_blocks)."""
    rows = info.shape[0] if info.shape else 1
    return max(1, (64 << 20) // max(info.nbytes // max(rows, 1), 1))


def read_row_blocks(info: TensorInfo, step: int | None = None) -> Iterator[tuple[int, int, "torch.Tensor"]]:
    """(first row, end row, values) of a stored tensor in blocks of ``step`` rows (default: ≤ 64 MiB), so a
    vocabulary-sized embedding is never read whole."""
    import torch

    rows = info.shape[0] if info.shape else 1
    row_bytes = info.nbytes // max(rows, 1)
    step = step or rows_per_block(info)
    def read(row0: int, row1: int) -> bytearray:
        f.seek(info.start + row0 * row_bytes)
        data = bytearray((row1 - row0) * row_bytes)  # read into the tensor's memory: one copy, not two
        if f.readinto(data) != len(data):
            raise FormatError(f"{info.file}: truncated while reading tensor {info.name!r}")
        return data

    with open(info.file, "rb") as f:
        for row0 in range(0, rows, step):
            row1 = min(rows, row0 + step)
            # named nowhere here: a suspended generator's names keep the caller's block alive while the next is read
            yield row0, row1, torch.frombuffer(read(row0, row1), dtype=torch_dtype(info.dtype))


def scan(path: Path, seen: Callable[[memoryview], None] | None = None) -> Iterator[tuple[TensorInfo, "torch.Tensor"]]:
    """Every tensor of the safetensors file at ``path`` as flat blocks of ≤ 8 MiB (whole values: a block is one view of
    a reused buffer, to use before asking for the next), in one read of the file from its first byte to its last, its
    header parsed from that read too; ``seen`` is given every byte read, in order. So hashing them gives the sha256 of
    the very bytes the header and blocks came from: register checks an adapter's values and takes its identity in
    one read, and a copy that hashes the same holds what was checked."""
    import torch

    source = _source(path)
    with open(source, "rb") as f:  # (buffered: a large readinto goes straight into the buffer, to its end or EOF)
        header = _header_from(f, path, os.fstat(f.fileno()).st_size, source, seen)
        ahead, buffer = ReadAhead(f.fileno()), memoryview(bytearray(8 << 20))
        for info in sorted(header.tensors.values(), key=lambda t: t.start):
            dtype = torch_dtype(info.dtype)
            step = len(buffer) // dtype.itemsize * dtype.itemsize
            for offset in range(info.start, info.end, step):
                ahead.before(offset)
                view = buffer[:min(step, info.end - offset)]
                if f.readinto(view) != len(view):
                    raise FormatError(f"{info.file}: truncated while reading tensor {info.name!r}")
                if seen is not None:
                    seen(view)
                yield info, torch.frombuffer(view, dtype=dtype)


def read_paired_row_blocks(first: TensorInfo, second: TensorInfo) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """The same rows of two tensors of one shape (their dtypes may differ), block by block (read_row_blocks)."""
    step = min(rows_per_block(first), rows_per_block(second))
    # not zip: its result tuple holds the last pair's blocks until each of the next two is read
    seconds = read_row_blocks(second, step)
    for _, _, a in read_row_blocks(first, step):
        _, _, b = next(seconds)
        yield a, b
        del a, b  # (before the next blocks are read)


class NeedsTorch(Exception):
    """Raised inside ``header_only``: the read asked for what only torch gives (a tensor's values or an operation on
    one, a torch dtype, ``import torch``), so it is done again the usual way."""


_HEADER_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("header_only", default=False)


class _NoTorch:
    """A finder on sys.meta_path inside ``header_only``: ``import torch`` raises NeedsTorch rather than load it."""

    def find_spec(self, name: str, path, target=None):
        if name == "torch" and _HEADER_ONLY.get():
            raise NeedsTorch(name)
        return None


@contextlib.contextmanager
def header_only() -> Iterator[bool]:
    """While in the block, ``load_tensors(values=False)`` gives HeaderTensors (shapes and dtypes from the header, a
    single value decoded from its bytes) in place of torch's meta tensors, and importing torch raises NeedsTorch: a
    command that reads only names and shapes (inspect) runs without torch's start-up (1–2 s, ~2/3 of its time), and
    one that turns out to need torch raises NeedsTorch, for its caller to run it again outside the block. Yields
    False, changing nothing, where torch is imported already (its meta tensors then cost nothing)."""
    import sys

    if "torch" in sys.modules:
        yield False
        return
    finder, token = _NoTorch(), _HEADER_ONLY.set(True)
    sys.meta_path.insert(0, finder)
    try:
        yield True
    finally:
        sys.meta_path.remove(finder)
        _HEADER_ONLY.reset(token)


def without_torch(read: Callable[[], T]) -> T:
    """``read()`` inside ``header_only``; where it raises NeedsTorch, ``read()`` again outside, with torch (so ``read``
    must do nothing it cannot do twice: it reads). The notes the "loraops" logger gets are said once, those of the
    try that counts (also when it raises). ``read`` returns plain data (a record, ranks): what it read is
    HeaderTensors, which refuse every operation on values (NeedsTorch), also after the block."""
    failure = None
    with header_only() as alone:
        if not alone:  # (torch is imported already)
            return read()
        notes, kept = logging.getLogger("loraops"), _Kept()
        handlers, propagate = notes.handlers, notes.propagate
        notes.handlers, notes.propagate = [kept], False
        try:
            done = read()
        except NeedsTorch:
            kept = None
        except BaseException as exc:  # its notes are said before it, as without the block
            failure = exc
        finally:
            notes.handlers, notes.propagate = handlers, propagate
    if kept is None:
        return read()
    for record in kept.records:
        notes.handle(record)
    if failure is not None:
        raise failure
    return done


class _Kept(logging.Handler):
    """Keeps the records it is given, to be said once the try they come from counts (without_torch)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _needs_torch(*_args, **_kwargs):
    raise NeedsTorch("an operation on a tensor's values")


class HeaderDtype:
    """A dtype as a HeaderTensor has it: torch's name for it (str and repr as torch.dtype's: 'torch.bfloat16'), equal
    to the same dtype; what else torch.dtype has raises NeedsTorch."""

    __slots__ = ("name",)

    def __init__(self, st_name: str) -> None:
        self.name = st_name

    def __str__(self) -> str:
        return f"torch.{TORCH_DTYPE_NAMES[self.name]}"

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HeaderDtype) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.name]

    @property
    def is_floating_point(self) -> bool:
        return self.name.startswith(("F", "BF"))

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):  # (copy, pickle, introspection)
            raise AttributeError(attribute)
        raise NeedsTorch(f"dtype.{attribute}")


class HeaderSize(tuple):
    """A HeaderTensor's shape: a tuple that repr()s, slices and adds as torch.Size does (messages show them)."""

    def __repr__(self) -> str:
        return f"torch.Size({list(self)})"

    __str__ = __repr__

    def __getitem__(self, index):
        item = tuple.__getitem__(self, index)
        return HeaderSize(item) if isinstance(index, slice) else item

    def __add__(self, other):
        return HeaderSize(tuple(self) + tuple(other))

    def numel(self) -> int:
        return math.prod(self)


_STRUCT = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U64": "<Q",
           "U32": "<I", "U16": "<H", "U8": "<B", "BOOL": "<?"}


class HeaderTensor:
    """A stored tensor as ``header_only`` gives it: the shape and dtype its header says (the meta tensor a headers-only
    read otherwise makes, ``is_meta`` as that), and for a tensor of one value (an alpha) that value, decoded from its
    bytes as torch reads it (float(), int(), item()). Any other use of it (arithmetic, a comparison, a method torch's
    tensors have and this does not) raises NeedsTorch."""

    def __init__(self, info: TensorInfo, handle=None) -> None:
        self.shape, self.dtype, self._info = HeaderSize(info.shape), HeaderDtype(info.dtype), info
        self.is_meta = info.numel > 1  # (load_tensors reads tensors of one value and none, values=False or not)
        self._value = None
        if info.numel == 1 and info.dtype in _STRUCT:
            handle.seek(info.start)
            raw = handle.read(info.nbytes)
            if len(raw) != info.nbytes:
                raise FormatError(f"{info.file}: truncated while reading tensor {info.name!r}")
            (self._value,) = struct.unpack(_STRUCT[info.dtype], raw)
        elif info.numel == 1 and info.dtype == "BF16":
            handle.seek(info.start)
            raw = handle.read(2)
            if len(raw) != 2:
                raise FormatError(f"{info.file}: truncated while reading tensor {info.name!r}")
            (self._value,) = struct.unpack("<f", b"\0\0" + raw)  # (bfloat16: float32's top two bytes)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self._info.numel

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def element_size(self) -> int:
        return self.dtype.itemsize

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __len__(self) -> int:
        if not self.shape:
            raise NeedsTorch("len() of a 0-d tensor")
        return self.shape[0]

    def double(self) -> "HeaderTensor":
        """A tensor of one value as float64 (kohya's alphas are read so): torch rounds an integer as float() does."""
        if self._value is None:
            raise NeedsTorch("the value of a tensor of no or many values, or of a float8")
        double = copy.copy(self)
        double.dtype, double._value = HeaderDtype("F64"), float(self._value)
        return double

    def reshape(self, *shape) -> "HeaderTensor":
        """The same tensor seen in ``shape`` (one -1 inferred), as torch's reshape; a shape torch would refuse is
        torch's to refuse (NeedsTorch)."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if not all(isinstance(d, int) and d >= -1 for d in shape) or list(shape).count(-1) > 1:
            raise NeedsTorch(f"reshape{shape}")
        known = math.prod(d for d in shape if d != -1)
        if -1 in shape:
            if known == 0 or self.numel() % known:
                raise NeedsTorch(f"reshape{shape}")
            shape = tuple(self.numel() // known if d == -1 else d for d in shape)
        if math.prod(shape) != self.numel():
            raise NeedsTorch(f"reshape{shape}")
        seen = copy.copy(self)
        seen.shape = HeaderSize(shape)
        return seen

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> "HeaderTensor":
        dims = len(self.shape) or 1
        start, end = start_dim % dims, end_dim % dims
        if start > end:
            raise NeedsTorch(f"flatten({start_dim}, {end_dim})")
        if not self.shape:
            return self.reshape(1)
        return self.reshape(*self.shape[:start], math.prod(self.shape[start:end + 1]), *self.shape[end + 1:])

    def item(self):
        if self._value is None:
            raise NeedsTorch("the value of a tensor of no or many values, or of a float8")
        return self._value

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __bool__(self) -> bool:
        return bool(self.item())

    def __repr__(self) -> str:
        return f"HeaderTensor({self._info.name!r}, {self.dtype}, {list(self.shape)})"

    __hash__ = object.__hash__
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _needs_torch
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _needs_torch
    __matmul__ = __rmatmul__ = __neg__ = __abs__ = __pow__ = __getitem__ = __iter__ = _needs_torch
    __index__ = __array__ = __contains__ = _needs_torch

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):  # (copy, pickle, introspection)
            raise AttributeError(attribute)
        raise NeedsTorch(f"Tensor.{attribute}")


def load_tensors(header: Header, names=None, *, values: bool = True, mapped: bool = False) -> dict[str, "torch.Tensor"]:
    """Load the named tensors (default: all) of a validated file with one open handle. ``values`` False: tensors
    on the meta device (shape and dtype, no data) except single values (alphas), for what needs shapes only.
    ``mapped``: tensors are views of the file mapped into memory (``map_file``; only for files nobody rewrites, see
    there), except those whose data is not aligned to their element size, which are read."""
    wanted = header.tensors if names is None else {n: header.tensors[n] for n in names}
    if not values and _HEADER_ONLY.get():
        with open(header.source, "rb") as f:
            return {name: HeaderTensor(info, f) for name, info in wanted.items()}
    import torch

    whole = map_file(header) if mapped and values else None
    out = {}
    with open(header.source, "rb") as f:
        for name, info in wanted.items():
            if not values and info.numel > 1:
                out[name] = torch.empty(info.shape, dtype=torch_dtype(info.dtype), device="meta")
            elif whole is not None and info.start % DTYPE_BYTES[info.dtype] == 0:
                # (torch refuses a view of another element size at a misaligned offset: another writer's unpadded
                # header; safetensors' save_file and write_safetensors align every tensor)
                out[name] = whole[info.start : info.end].view(torch_dtype(info.dtype)).reshape(info.shape)
            else:
                out[name] = read_tensor(info, f)
    return out


def map_file(header: Header) -> "torch.Tensor":
    """A validated file as one uint8 tensor over a private mapping of it, for tensors that are views of it rather
    than copies in the process's anonymous memory: their pages are the page cache's, read on first touch, which the
    kernel can drop again under memory pressure (anonymous pages it can only swap out, where there is swap). Three
    adapters of a 70B model are ~5 GB; mapped, they merge on a machine with less free memory than that.

    Private and writable (MAP_PRIVATE, torch's ``from_file(shared=False)``, as torch.load(mmap=True) maps): nothing
    done to the tensors can reach the file, and a write into one would copy the page into anonymous memory rather
    than crash the process, as a read-only mapping would (SIGSEGV); nothing writes into loaded factors (tested). The
    cost: the kernel counts such a mapping as memory it may have to provide, so with the default overcommit rule one
    file larger than the RAM and swap together cannot be mapped (ENOMEM: a one-line error here). The file descriptor
    is closed once the file is mapped; the mapping lives as long as a tensor views it (torch's storage refcount).

    Not for any file: one that shrinks while it is mapped kills the process with SIGBUS at the next touch of a page
    past its new end — no exception, no message, no cleanup. So loraops maps only the registry's stored copies, which
    it never rewrites (written to a temp name and renamed into place; `rm`/`gc` unlink them, which leaves a mapping
    intact), and reads the user's files, which anyone may rewrite meanwhile."""
    import torch

    try:
        storage = torch.UntypedStorage.from_file(str(header.source), shared=False, nbytes=header.file_size)
    except RuntimeError as exc:  # shrunk since its header was read, or too large to map (see above)
        raise FormatError(f"{header.path}: cannot be mapped ({str(exc).splitlines()[0]})") from None
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def write_safetensors(path: str | Path, tensors: dict[str, "torch.Tensor"], metadata: dict[str, str] | None = None,
                      *, hash_key: str | None = None) -> str:
    """Write a safetensors file of tensors held in memory (see TensorWriter for the layout); returns its sha256."""
    with TensorWriter(Path(path), spill=False) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        return writer.close(metadata, hash_key=hash_key)


class TensorWriter:
    """A safetensors file written from tensors that arrive one at a time, in any order, byte for byte the same for
    the same tensors and metadata (safetensors' save_file writes the metadata in hash-map order, which changes from
    one process to the next, and with it the file's sha256 — an adapter's identity): tensors go widest element
    first, then by name, as save_file orders them (so every tensor's data is aligned to its element size), after a
    header with the metadata sorted. With ``hash_key``, the metadata entry of that name is set to the sha256 of the
    data section (the bytes after the header, kohya's sshs_model_hash).

    The header comes first but depends on every tensor, so ``spill`` (the default) writes each tensor's bytes to an
    unnamed scratch file beside ``path`` as it is added (fsutil.DirectFileWriter's ``scratch``: nothing of it
    outlives the process, even a SIGKILL) and copies them into place at ``close``: what is computed module by module
    is never all in memory. Without
    ``spill`` the tensors are kept (tensors an adapter in memory holds anyway). ``close`` returns the sha256 of the
    file's bytes, hashed as they are written; ``abandon`` (or an error in ``close``) leaves the caller a partial
    file to remove, as an atomic output's temp sibling is."""

    def __init__(self, path: Path, *, spill: bool = True, dtype: "torch.dtype | None" = None) -> None:
        self.path = Path(path)
        self.spill = spill
        self.dtype = dtype
        """The dtype every floating tensor is written in (None: its own); see ``add``."""
        self._scratch = None  # opened with the first tensor spilled
        self._entries: dict[str, tuple[str, tuple[int, ...], object]] = {}
        """name → (dtype, shape, the tensor kept or its byte offset in the scratch file)"""

    def add(self, name: str, tensor: "torch.Tensor", *, convert: bool = True) -> None:
        """Add ``tensor``, converted to the writer's dtype where it is floating and ``convert``: rounded once, from the
        values given; a value that the conversion carries past the dtype's range is refused (nothing is written)."""
        if name in self._entries:
            from .fsutil import user_path

            raise FormatError(f"{user_path(self.path)}: two tensors would be named {name!r}")
        tensor = tensor.detach().to("cpu")
        if convert and self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype:
            source, tensor = tensor, tensor.to(self.dtype)
            if narrows(source.dtype, self.dtype) and tensor.numel() and not all_finite(tensor):
                raise beyond_range(name, self.dtype, self._wider(float(source.abs().amax())))
        tensor = tensor.contiguous()
        entry = (st_dtype(tensor.dtype), tuple(tensor.shape))
        if not self.spill:
            self._entries[name] = (*entry, tensor)
            return
        if self._scratch is None:
            # direct, as the output is: through the page cache, 790 MB took 2.2–2.9 s to spill on the dev VM
            self._scratch = DirectFileWriter(self.path.parent, scratch=True)
        self._entries[name] = (*entry, self._scratch.size)
        self._scratch.write(_bytes_of(tensor))

    def _wider(self, peak: float) -> str:
        """The hint for values up to ``peak`` that overflow the writer's dtype: the wider ones that hold them."""
        import torch

        wider = [flag for flag, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
                 if torch.finfo(self.dtype).max < torch.finfo(dtype).max and peak <= torch.finfo(dtype).max]
        if not wider:
            return "no dtype it can be written in holds them"
        return f"write it with `dtype` {' or '.join(wider)}"

    def close(self, metadata: dict[str, str] | None = None, *, hash_key: str | None = None) -> str:
        import hashlib

        try:
            if self._scratch is not None:
                self._scratch.close(keep_open=True)
            ordered = sorted(self._entries.items(), key=lambda item: (-DTYPE_BYTES[item[1][0]], item[0]))
            metadata = dict(sorted((metadata or {}).items()))
            if hash_key:
                data_digest = hashlib.sha256()
                for piece in self._data(ordered):
                    data_digest.update(piece)
                metadata[hash_key] = data_digest.hexdigest()
            header = header_bytes(((name, dtype, shape) for name, (dtype, shape, _) in ordered), metadata,
                                  ensure_ascii=True)
            digest = hashlib.sha256(header)
            ahead = ReadAhead(self._scratch.fd) if self._scratch is not None else None  # spilled direct: not cached
            out = DirectFileWriter(self.path)  # written once and fsynced at once: see DirectFileWriter for why direct
            try:
                out.write(memoryview(header))
                for name, (dtype, shape, source) in ordered:
                    if isinstance(source, int):
                        out.copy_from(self._scratch.fd, source, math.prod(shape) * DTYPE_BYTES[dtype], digest.update,
                                      before=ahead.before)
                    else:
                        data = _bytes_of(source)
                        digest.update(data)
                        out.write(data)
                out.close()
            except BaseException:
                out.abandon()
                raise
            return digest.hexdigest()
        finally:
            self.abandon()

    def __enter__(self) -> "TensorWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.abandon()  # after close, nothing left; after an error, the scratch file and what was kept

    def abandon(self) -> None:
        """Drop the scratch file and what was kept (``close`` and leaving a ``with`` block do it too)."""
        self._entries.clear()
        if self._scratch is not None:
            self._scratch.abandon()
            self._scratch = None

    def _data(self, ordered) -> Iterator[memoryview]:
        """The data section's bytes in order, in pieces (the scratch file's read ≤ 8 MiB at a time)."""
        buffer = None
        for _, (dtype, shape, source) in ordered:
            if not isinstance(source, int):
                yield _bytes_of(source)
                continue
            if buffer is None:
                buffer = memoryview(bytearray(8 << 20))
            left, offset = math.prod(shape) * DTYPE_BYTES[dtype], source
            while left:
                got = os.preadv(self._scratch.fd, [buffer[:min(left, len(buffer))]], offset)
                if not got:
                    raise EOFError(offset)
                yield buffer[:got]
                left, offset = left - got, offset + got


def _bytes_of(tensor: "torch.Tensor") -> memoryview:
    import torch

    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
