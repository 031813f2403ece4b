"""A base model on disk: its safetensors files, its tensor manifest, and a fingerprint.

Layouts understood:
  * one ``.safetensors`` checkpoint (SD-style single file, or any state dict);
  * a Hugging Face folder: ``model.safetensors`` or shards listed in ``model.safetensors.index.json``;
  * a diffusers pipeline folder (``model_index.json``): one such folder per component; tensor names are then
    prefixed ``<component>.`` ("unet.down_blocks.0...."), which is how diffusers-style adapter keys name them.

Only headers are read to build the manifest. The fingerprint is sha256 over the tensors sorted by name of
(name, dtype, shape, bytes), so the same tensors give the same fingerprint however they are sharded; it is
cached per (path, size, mtime) of every file so re-adding unchanged files does not rehash.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import settings
from .errors import FormatError, NotFoundError
from .st import Header, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
PIPELINE_INDEX = "model_index.json"


@dataclass
class Part:
    """One set of weights: a single file, or the shards of one (component) folder."""

    prefix: str
    """'' for a plain model; '<component>.' for a diffusers pipeline component."""
    folder: Path | None
    files: list[Path]
    index_file: Path | None = None


@dataclass
class BaseModel:
    path: Path
    parts: list[Part]
    tensors: dict[str, TensorInfo]
    """Manifest: full tensor name (with component prefix) → where its bytes are."""
    headers: dict[Path, Header] = field(repr=False, default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "BaseModel":
        path = Path(path)
        if not path.exists():
            raise NotFoundError(f"{path}: no such file or folder")
        if path.is_file():
            if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
                read_header(path)  # raises the pickle message
            parts = [Part("", None, [path])]
        elif (path / PIPELINE_INDEX).exists():
            parts = _pipeline_parts(path)
        else:
            parts = [_folder_part(path, "")]
        headers: dict[Path, Header] = {}
        tensors: dict[str, TensorInfo] = {}
        for part in parts:
            for file in part.files:
                header = headers[file] = read_header(file)
                for name, info in header.tensors.items():
                    full = part.prefix + name
                    if full in tensors:
                        raise FormatError(f"{file}: tensor {name!r} also appears in {tensors[full].file}")
                    tensors[full] = info
            if part.index_file is not None:
                _check_index(part, headers)
        if not tensors:
            raise FormatError(f"{path}: holds no tensors")
        return cls(path=path, parts=parts, tensors=tensors, headers=headers)

    @property
    def files(self) -> list[Path]:
        return [f for part in self.parts for f in part.files]

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def dtype(self) -> str:
        """The dtype holding most of the bytes (safetensors name, e.g. BF16)."""
        totals: dict[str, int] = {}
        for t in self.tensors.values():
            totals[t.dtype] = totals.get(t.dtype, 0) + t.nbytes
        return max(totals, key=totals.get)

    @property
    def is_single_file(self) -> bool:
        return self.path.is_file()

    def other_files(self) -> list[Path]:
        """Files of the folder that are not weights (config, tokenizer, index, ...), relative to ``path``."""
        if self.is_single_file:
            return []
        weights = set(self.files)
        return sorted(
            p.relative_to(self.path)
            for p in self.path.rglob("*")
            if p.is_file() and p not in weights and not p.name.startswith(".")
        )

    def fingerprint(self, progress: bool | None = None) -> str:
        """sha256 over (name, dtype, shape, bytes) of every tensor sorted by name; cached per file stat."""
        key = _cache_key(self.files)
        cache = _FingerprintCache()
        cached = cache.get(key)
        if cached:
            return cached
        digest = hashlib.sha256()
        bar = _progress(self.total_bytes, f"fingerprint {self.path.name}", progress)
        handles: dict[Path, object] = {}
        try:
            for name in sorted(self.tensors):
                info = self.tensors[name]
                digest.update(f"{name}\0{info.dtype}\0{list(info.shape)}\0{info.nbytes}\0".encode())
                handle = handles.get(info.file) or handles.setdefault(info.file, open(info.file, "rb"))
                handle.seek(info.start)
                remaining = info.nbytes
                while remaining:
                    chunk = handle.read(min(remaining, 8 << 20))
                    if not chunk:
                        raise FormatError(f"{info.file}: truncated while hashing tensor {name!r}")
                    digest.update(chunk)
                    remaining -= len(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()
            for handle in handles.values():
                handle.close()
        fingerprint = digest.hexdigest()
        cache.put(key, fingerprint)
        return fingerprint


def _folder_part(folder: Path, prefix: str) -> Part:
    index = folder / INDEX_NAME
    if not index.exists():
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        index = indexes[0] if len(indexes) == 1 else index
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shard_names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise FormatError(f"{index}: not a valid safetensors index (no weight_map)") from None
        files = []
        for name in shard_names:
            # Lexical check, not resolve(): in the Hugging Face cache every file is a symlink into ../../blobs.
            shard = Path(os.path.normpath(folder.absolute() / name))
            if Path(os.path.normpath(folder.absolute())) not in shard.parents:
                raise FormatError(f"{index}: shard {name!r} points outside the folder")
            if not shard.exists():
                raise NotFoundError(f"{folder / name}: shard listed in {index.name} is missing")
            files.append(folder / name)
        return Part(prefix, folder, files, index)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise FormatError(f"{folder}: holds only pickle weights (.bin/.pt); convert them to safetensors first")
        raise FormatError(f"{folder}: no .safetensors weights found")
    return Part(prefix, folder, files)


def _pipeline_parts(folder: Path) -> list[Part]:
    parts = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(sub.glob("*.safetensors")):
            parts.append(_folder_part(sub, f"{sub.name}."))
    if not parts:
        raise FormatError(f"{folder}: a diffusers pipeline folder without .safetensors weights")
    return parts


def _check_index(part: Part, headers: dict[Path, Header]) -> None:
    weight_map = json.loads(part.index_file.read_text())["weight_map"]
    for name, shard in weight_map.items():
        header = headers.get(part.folder / shard)
        if header is None or name not in header.tensors:
            raise FormatError(f"{part.index_file}: lists {name!r} in {shard}, which does not hold it")


def _cache_key(files: list[Path]) -> str:
    parts = []
    for f in files:
        st = f.stat()
        parts.append(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return "\n".join(parts)


class _FingerprintCache:
    """A small JSON file under the home: stat key → fingerprint. Best effort: a broken cache is ignored."""

    def __init__(self) -> None:
        self.path = settings.home() / "cache" / "fingerprints.json"

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> str | None:
        return self._load().get(key)

    def put(self, key: str, value: str) -> None:
        try:
            data = self._load()
            data[key] = value
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.path)
        except OSError:
            pass


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool | None):
    if enabled is False or (enabled is None and not settings.progress_enabled()):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
