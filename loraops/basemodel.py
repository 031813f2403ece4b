"""A base model on disk: its safetensors files, its tensor manifest, and a fingerprint.

Layouts understood:
  * one ``.safetensors`` checkpoint (SD-style single file, or any state dict);
  * a Hugging Face folder: ``model.safetensors`` or shards listed in ``model.safetensors.index.json``, as
    from_pretrained reads it without variant= (folder_weights: config.json's transformers_weights first, a variant's
    files only where they are all it holds);
  * a diffusers pipeline folder (``model_index.json``): one such folder per component; tensor names are then
    prefixed ``<component>.`` ("unet.down_blocks.0...."), which is how diffusers-style adapter keys name them.

Only headers are read to build the manifest. The fingerprint is sha256 over the tensors sorted by name of
(name, dtype, shape, sha256 of the tensor's bytes), so the same tensors give the same fingerprint however they are
sharded. Hashing each tensor on its own (rather than one stream over all bytes in name order) lets a writer compute
it while it writes tensors in file order, and lets a merge reuse the digests of the tensors it copies unchanged.
The per-tensor digests are cached per file (path, size, mtime), so unchanged files are never hashed twice.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from . import fp8, settings
from .errors import FormatError, HubError, InvalidInputError, LoraopsError, NotFoundError
from .fsutil import Prefetcher, chunks, existing_path, read_json, read_model_config, resolved
from .references import PATH, argument, flags_checked
from .st import Header, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
INDEX_SUFFIX = ".safetensors.index.json"
PIPELINE_INDEX = "model_index.json"
SHARD_NAME = re.compile(r"(?P<stem>.+)-(?P<n>\d+)-of-(?P<total>\d+)(?P<tail>(?:\.[^.]+)?\.safetensors)")
"""How transformers/diffusers name a shard (huggingface_hub's split_*_state_dict_into_shards); ``tail`` is
.safetensors, or .VARIANT.safetensors for diffusers' legacy variant shards (see VARIANT_FILE)."""
VARIANT_FILE = re.compile(r"(?P<name>model|diffusion_pytorch_model)"
                          r"(?:\.(?P<variant>[^.]+?)(?:-\d+-of-\d+)?|-\d+-of-\d+\.(?P<legacy>[^.]+))\.safetensors")
"""A variant's weights file: transformers' and diffusers' weights names (SAFE_WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME)
as _add_variant names them, or as diffusers named a variant's shards before (its legacy format, the legacy group)."""
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""PyTorch's (pickle) weights files, which loraops does not read: loading one can run code."""


@dataclass
class Part:
    """One set of weights: a single file, or the shards of one (component) folder."""

    prefix: str
    """'' for a plain model; '<component>.' for a diffusers pipeline component."""
    folder: Path | None
    files: list[Path]
    index_file: Path | None = None


class AdapterAsBase(InvalidInputError):
    """A LoRA adapter given where a base model goes (arguments swapped: `merge BASE --into ADAPTER`)."""


def refuse_an_adapter(path: Path, tensors: Iterable[str]) -> None:
    """Refuse a base whose weights, as read, are a LoRA adapter's: a file with an adapter's keys, or a folder the
    formats take for an adapter (adapter_config.json, adapter_model.safetensors) whose weights were its factors.
    Not a model folder that keeps an adapter_config.json beside its own weights (a merged upload), nor one that
    stores LoRA tensors among its own (Phi-4-multimodal): their weights are what they are."""
    from . import formats

    if formats.key_layout(tensors) is None:
        return
    if path.is_dir():
        try:
            formats.detect(path)
        except LoraopsError:
            return
    raise AdapterAsBase(f"{path}: this is a LoRA adapter, not a base model")


@dataclass
class BaseModel:
    path: Path
    parts: list[Part]
    tensors: dict[str, TensorInfo]
    """Manifest: full tensor name (with component prefix) → where its bytes are."""
    headers: dict[Path, Header] = field(repr=False, default_factory=dict)
    prefetcher: Prefetcher | None = field(repr=False, default=None)
    _configs: dict[Path, dict] = field(repr=False, default_factory=dict)
    _folders: dict[Path, Path] = field(repr=False, default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "BaseModel":
        """The model at ``path`` — a transformers folder (sharded or not), a diffusers pipeline folder or a single
        .safetensors checkpoint — read from its headers alone (no tensor bytes)."""
        path = existing_path(argument(path, "path", *PATH))
        if path.is_file():
            if path.suffix in PICKLE_SUFFIXES:
                read_header(path)  # raises the pickle message
            parts = [Part("", None, [path])]
        elif not path.is_dir():
            raise FormatError(f"{path}: neither a file nor a folder (a FIFO, a socket or a device), not a base model")
        elif _exists(path / PIPELINE_INDEX):
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
        refuse_an_adapter(path, tensors)  # (else its factors were read as the weights: "modules do not fit")
        return cls(path=path, parts=parts, tensors=tensors, headers=headers)

    def prefetch(self) -> None:
        """Start reading the weights into the page cache in the background (fsutil.Prefetcher), for a caller that
        will stream them after a slow start-up; stop_prefetch() ends it."""
        self.stop_prefetch()
        self.prefetcher = Prefetcher(self.files)

    def stop_prefetch(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.stop()
            self.prefetcher = None

    @property
    def files(self) -> list[Path]:
        return [f for part in self.parts for f in part.files]

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    @property
    def num_parameters(self) -> int:
        """The model's parameters: its tensors' elements, an FP8 weight's scales left out (fp8.model_parameters)."""
        return fp8.model_parameters({name: (t.dtype, t.shape) for name, t in self.tensors.items()})

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

    @property
    def ties_stored_heads(self) -> bool:
        """Is a head stored byte-identical to its input embeddings one tied parameter stored twice (check.stored_twice's
        ``heads``), for check and merge alike: not in a single-file checkpoint, which has no config to tie them."""
        return not self.is_single_file

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

    @flags_checked
    def fingerprint(self, progress: bool | None = None) -> str:
        """See the module docstring; only files whose digests are not cached are read."""
        return self._fingerprint(self.tensor_digests(progress))

    def cached_fingerprint(self) -> str | None:
        """The fingerprint from the cached digests alone (no tensor byte read); None while some are not cached."""
        digests = self.cached_digests()
        return self._fingerprint(digests) if digests.keys() >= self.tensors.keys() else None

    def _fingerprint(self, digests: dict[str, str]) -> str:
        return fingerprint_of((name, info.dtype, info.shape, digests[name]) for name, info in self.tensors.items())

    @flags_checked
    def tensor_digests(self, progress: bool | None = None) -> dict[str, str]:
        """sha256 hex of every tensor's bytes, by full name: from the cache, else by reading the files (in
        parallel; hashlib releases the GIL)."""
        digests = self.cached_digests()
        missing = [(part, f) for part in self.parts for f in part.files
                   if any(part.prefix + n not in digests for n in self.headers[f].tensors)]
        if not missing:
            return digests
        bar = settings.progress_bar(sum(f.stat().st_size for _, f in missing), f"fingerprint {self.path.name}", progress)
        try:
            with ThreadPoolExecutor(max_workers=min(len(missing), os.cpu_count() or 1)) as pool:
                hashed = list(pool.map(lambda item: _hash_file(self.headers[item[1]], bar), missing))
        finally:
            bar.close()
        for (part, file), file_digests in zip(missing, hashed, strict=True):
            store_digests(file, file_digests)
            digests.update({part.prefix + n: d for n, d in file_digests.items()})
        return digests

    def config(self, tensor: str) -> dict:
        """The config.json of the model holding ``tensor``; {} when there is none, or for a single-file base (a file
        beside it describes another model)."""
        if self.is_single_file:
            return {}
        folder = self.model_folder(self.tensors[tensor].file)
        if folder not in self._configs:
            path = folder / "config.json"
            from .check import refuse_unread_tie_flag

            config = read_model_config(path) if path.exists() else {}
            refuse_unread_tie_flag(config, path)
            self._configs[folder] = config
        return self._configs[folder]

    def model_folder(self, file: Path) -> Path:
        """The folder of the model (pipeline component) whose weights ``file`` is, where its config.json and index
        are: the file's own, or one above it (config.json's transformers_weights may name sub/model.safetensors)."""
        if not self._folders:  # (searching every part's files per call made check and merge quadratic in the shards)
            self._folders.update({f: part.folder for part in self.parts for f in part.files})
        return self._folders[file]

    def quantization_config(self, tensor: str) -> dict | None:
        """The quantization_config of the model holding ``tensor`` (loraops.fp8), None when it has none."""
        found = self.config(tensor).get("quantization_config")
        return found if isinstance(found, dict) else None

    def cached_digests(self) -> dict[str, str]:
        """The cached per-tensor digests of the files that have not changed since they were hashed (by full name;
        tensors of other files are absent). Never reads tensor bytes."""
        digests = {}
        for part in self.parts:
            for file in part.files:
                cached = _DigestCache.get(file)
                if cached is not None and cached.keys() == self.headers[file].tensors.keys():
                    digests.update({part.prefix + n: d for n, d in cached.items()})
        return digests


def fingerprint_of(entries) -> str:
    """The fingerprint of (name, dtype, shape, tensor sha256 hex) entries given in any order."""
    digest = hashlib.sha256()
    for name, dtype, shape, tensor_digest in sorted(entries, key=lambda entry: entry[0]):
        digest.update(f"{name}\0{dtype}\0{list(shape)}\0{tensor_digest}\n".encode())
    return digest.hexdigest()


def store_digests(file: Path, digests: dict[str, str]) -> None:
    """Cache ``file``'s per-tensor digests (by name as stored in the file) under its current stat."""
    _DigestCache.put(file, digests)


def _hash_file(header: Header, bar) -> dict[str, str]:
    """sha256 of each tensor of one file, read front to back."""
    buffer = bytearray(8 << 20)
    with open(header.path, "rb", buffering=0) as handle:
        return {info.name: tensor_digest(info, handle, buffer, bar)
                for info in sorted(header.tensors.values(), key=lambda t: t.start)}


def tensor_digest(info: TensorInfo, handle=None, buffer: bytearray | None = None, bar=None) -> str:
    """sha256 of one tensor's bytes (``handle``: its file open unbuffered; ``bar`` advanced per chunk read)."""
    if handle is None:
        with open(info.file, "rb", buffering=0) as own:
            return tensor_digest(info, own, buffer, bar)
    digest = hashlib.sha256()
    handle.seek(info.start)
    hashed = 0
    if buffer is None:  # (sized to the tensor: an FP8 model's thousands of small scales)
        buffer = bytearray(max(1, min(info.nbytes, 8 << 20)))
    for chunk in chunks(handle, info.nbytes, buffer):
        digest.update(chunk)
        hashed += len(chunk)
        if bar is not None:
            bar.update(len(chunk))
    if hashed != info.nbytes:
        raise FormatError(f"{info.file}: truncated while hashing tensor {info.name!r}")
    return digest.hexdigest()


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError as exc:  # a folder the user may not search (chmod 000): EACCES, not "no such file"
        raise _unreadable(path.parent, exc) from None


def _unreadable(folder: Path, exc: OSError) -> InvalidInputError:
    """A base folder the file system refuses to list or search (no permission): the folder named and why, in one
    line (the file system's own message named a file inside it, or nothing)."""
    return InvalidInputError(f"{folder}: cannot read this folder ({exc.strerror or exc})")


def _folder_part(folder: Path, prefix: str) -> Part:
    names = _names(folder)
    dangling = _dangling_weights(folder, names)
    part = _weights_part(folder, prefix, [name for name in names if name not in dangling], dangling)
    for link in _would_read(folder, names, dangling):  # (a note, not printed: the CLI says it, cli.LoraopsGroup.invoke)
        logging.getLogger("loraops").info(
            f"{folder / link} is a symlink to a missing file ({os.readlink(folder / link)}): left out, as "
            f"from_pretrained leaves it out; read {part.index_file or ', '.join(map(str, part.files))} instead")
    return part


def _dangling_weights(folder: Path, names: list[str]) -> list[str]:
    """The weights files (.safetensors, safetensors index) among ``names`` of ``folder`` that are symlinks to nothing:
    from_pretrained looks for its files with os.path.isfile, which is false for them, and reads the next it looks for
    (a Hugging Face snapshot whose model.safetensors blob was deleted beside its index and shards)."""
    return [name for name in names
            if name.endswith((".safetensors", INDEX_SUFFIX)) and (folder / name).is_symlink()
            and not _exists(folder / name)]


def _would_read(folder: Path, names: list[str], dangling: list[str]) -> list[str]:
    """The ``dangling`` links that the folder's loading rule (folder_weights) would read were their files there: the
    weights it picks, the index it reads them through and the shards that lists. Only those were left out; a link
    it would never read (extra.safetensors beside model.safetensors) goes unsaid, as from_pretrained says nothing."""
    config = read_model_config(folder / "config.json") if "config.json" in names else None

    def shards_of(name: str) -> list[str]:
        return [] if name in dangling else listed_shards(read_json(folder / name, "safetensors index"))

    try:
        index, files = folder_weights(names, config, holds=lambda name: name in dangling or (folder / name).is_file(),
                                      shards_of=shards_of)
    except FormatError:  # (a folder those links would make ambiguous: each of them said, as before)
        return dangling
    read = {*files, *([index, *shards_of(index)] if index else [])}
    return [name for name in dangling if name in read]


def _missing_link(link: Path) -> str:
    return f"{link}: no such file (a symlink to {os.readlink(link)}, which is missing)"


def _weights_part(folder: Path, prefix: str, names: list[str], dangling: list[str]) -> Part:
    # read before the weights, as from_pretrained does: its transformers_weights names them
    config = read_model_config(folder / "config.json") if "config.json" in names else None
    try:
        index_name, file_names = folder_weights(names, config, holds=lambda name: (folder / name).is_file(),
                                                shards_of=lambda name: listed_shards(read_json(folder / name,
                                                                                               "safetensors index")))
    except FormatError as exc:  # (a dangling index beside its shards: the link named too)
        raise FormatError("; ".join([f"{folder}: {exc}", *(_missing_link(folder / name) for name in dangling)])) \
            from None
    if index_name is None:
        if not file_names:
            pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise FormatError(f"{folder}: holds only pickle weights ({', '.join(pickles[:3])}"
                                  f"{' ...' if len(pickles) > 3 else ''}), which loraops does not read (loading one "
                                  "can run code); convert them to safetensors first: from_pretrained(folder) and "
                                  "save_pretrained(out) write them")
            if dangling:
                raise NotFoundError(_missing_link(folder / dangling[0]))
            raise FormatError(f"{folder}: no .safetensors weights found")
        return Part(prefix, folder, [folder / name for name in file_names])
    index = folder / index_name
    try:
        weight_map = read_json(index, "safetensors index")["weight_map"]
        if not all(isinstance(shard, str) for shard in weight_map.values()):
            raise TypeError
        shard_names = sorted(set(weight_map.values()))
    except (KeyError, TypeError, AttributeError):
        raise FormatError(f"{index}: not a valid safetensors index (no weight_map of tensor names to shard file "
                          "names)") from None
    problem = diffusers_subfolder_shard(index_name, shard_names, config)
    if problem:
        raise FormatError(f"{index}: {problem}")
    files = []
    for name in shard_names:
        # Lexical check, not resolve(): in the Hugging Face cache every file is a symlink into ../../blobs.
        shard = Path(os.path.normpath(folder.absolute() / name))
        if Path(os.path.normpath(folder.absolute())) not in shard.parents:
            raise FormatError(f"{index}: shard {name!r} points outside the folder")
        if not shard.exists():
            raise NotFoundError(f"{folder / name}: shard listed in {index_name} is missing")
        files.append(folder / name)
    try:
        unlisted = unlisted_shards(index_name, weight_map, lambda sub: _names(folder / sub),
                                   lambda shard: read_header(folder / shard).tensors)
    except FormatError as exc:
        raise FormatError(f"{index}: {exc}") from None
    if unlisted:
        raise FormatError(f"{index}: does not list {', '.join(unlisted[:3])}, a shard of the same model")
    return Part(prefix, folder, files, index)


def listed_shards(index: dict) -> list[str]:
    """The shard names a safetensors index lists, [] where it has no weight_map (refused where it is read)."""
    weight_map = index.get("weight_map")
    return [shard for shard in weight_map.values() if isinstance(shard, str)] if isinstance(weight_map, dict) else []


def _names(folder: Path) -> list[str]:
    """The file names in ``folder``, hidden ones left out."""
    try:
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise _unreadable(folder, exc) from None


def unlisted_shards(index_name: str, weight_map: dict[str, str], names_in, tensors_of=None) -> list[str]:
    """The shards of the same set as the index ``index_name`` lists (by its name: index_of, and the total of the
    shards it lists) that lie beside it or beside a shard it lists but that it does not list (its ``weight_map``'s
    values), paths relative to the model's folder as the index's are; their tensors would be missing from the model.
    A set of another total (a repo saved again with another shard count, the old shards left in it) is not the
    index's: from_pretrained never looks at it. ``names_in(folder)``: the file names in that folder of the model's
    ('.' its own). An index may lie in a subfolder (transformers_weights names sub/x.index.json) and list its shards
    relative to the model's folder, as transformers reads them; every folder is looked in. ``tensors_of(path)``: the
    tensor names of such a shard (its header), where they can be read: a shard whose tensors the index all lists
    (in other shards) is one it replaces, not one it leaves out (a patch: sub/x.index.json listing the top-level
    shards but one, replaced by sub/<that shard>, which transformers loads); without it every such shard is one.
    Such a shard whose header cannot be read is refused (FormatError, its line to follow the index's path): which of
    the two it is cannot be told."""
    shard_names = set(weight_map.values())
    index = PurePosixPath(index_name)
    folders = {index.parent, *(PurePosixPath(name).parent for name in shard_names)}
    listed = {os.path.normpath(name) for name in shard_names}
    totals = {match["total"] for name in shard_names if (match := SHARD_NAME.fullmatch(PurePosixPath(name).name))}
    unlisted = [str(sub / name) for sub in sorted(folders) for name in names_in(str(sub))
                if index_of(name) == index.name and os.path.normpath(sub / name) not in listed
                and (not totals or SHARD_NAME.fullmatch(name)["total"] in totals)]
    return [shard for shard in unlisted if tensors_of is None or not _all_listed(shard, weight_map, tensors_of)]


def _all_listed(shard: str, weight_map: dict[str, str], tensors_of) -> bool:
    """Does the index (``weight_map``) list every tensor of ``shard``, one of its set it does not list, in its other
    shards (a shard it replaces: unlisted_shards)?"""
    try:
        return set(tensors_of(shard)) <= weight_map.keys()
    except HubError:  # (a ConnectionError: the Hub unreachable says nothing of the file)
        raise
    except (FormatError, NotFoundError, OSError) as exc:  # corrupt, truncated, a dangling link, no permission
        reason = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise FormatError(f"does not list {shard}, a shard of its set in the model's folder, whose header loraops "
                          "reads to see whether the index lists all its tensors elsewhere (a shard it replaces), and "
                          f"it cannot be read ({reason}): remove the file, or list it in the index") from None


def give_one_variant(variants: list[str]) -> str:
    """What a local base of several variants and no default weights is to be given as instead."""
    return "give one variant's .safetensors file, or a folder holding only its files, as the base"


def folder_weights(names: list[str], config: dict | None = None, several_variants=give_one_variant,
                   holds=None, shards_of=None) -> tuple[str | None, list[str]]:
    """Which of a folder's file ``names`` hold its weights, as from_pretrained (transformers', diffusers') reads
    them by default, without variant=: (the safetensors index they are read through, []) or (None, the
    .safetensors files, paths relative to the folder). ``config``: the folder's config.json; a transformers
    model's transformers_weights names the file transformers reads before any other (explicit_weights, which asks
    ``holds(path)`` whether the folder holds it, default: it is one of ``names``; a diffusers model's config,
    is_diffusers, has no such key). Else the weights by the names from_pretrained looks for, in its order
    (_named_weights: transformers' model.safetensors before its index, the two being copies; diffusers' index before
    its file; Mistral's consolidated.safetensors beside them is no part of them); else the folder's only index; else
    its .safetensors files but a variant's (model.fp16.safetensors: from_pretrained reads them only when asked for
    that variant). A folder of one variant only, which loads only as that variant, is read as
    from_pretrained(variant=) reads it (by the same names with the variant added); a folder of several variants and
    no default weights is refused (from_pretrained needs variant= there). Raises a FormatError (not naming the
    folder) for these refusals (``several_variants``(the variants): what to give instead, which depends on the kind
    of reference: a Hub one names no file) and for a set of shards that would be read without its index.
    ``shards_of(index)``: the shard names an index of the folder lists (for a folder without config.json, whose
    shards beside the weights read are refused where no index lists them; default: none are listed)."""
    names = sorted(names)
    if not is_diffusers(config):
        explicit = explicit_weights(config or {}, holds or set(names).__contains__)
        if explicit is not None:
            return (explicit, []) if explicit.endswith(INDEX_SUFFIX) else (None, [explicit])
    found = _named_weights(names, None, config, shards_of)
    if found is not None:
        return found
    indexes = [name for name in names if name.endswith(INDEX_SUFFIX)]
    if len(indexes) == 1:
        return indexes[0], []
    files = [name for name in names if name.endswith(".safetensors")]
    default = [name for name in files if variant_of(name) is None]
    variants = sorted({variant_of(name) for name in files} - {None})
    if not default and len(variants) == 1:
        found = _named_weights(names, variants[0], config, shards_of)
        if found is not None:
            return found
    if not default and len(variants) > 1:
        raise FormatError(f"no default weights, only the variants {', '.join(variants)}, which from_pretrained loads "
                          f"only with variant=: {several_variants(variants)}")
    files = default or files
    problem = shards_without_index(files, names)
    if problem:
        raise FormatError(problem)
    return None, files


def _named_weights(names: list[str], variant: str | None, config: dict | None,
                   shards_of=None) -> tuple[str | None, list[str]] | None:
    """What from_pretrained(variant=``variant``) reads of a folder of these file ``names`` by the names it looks for,
    as folder_weights returns it, else None. transformers: model.safetensors before model.safetensors.index.json
    (model.fp16.safetensors before model.safetensors.index.fp16.json); diffusers: its index (a variant's, then its
    legacy one: _fetch_index_file_legacy) before its file. A folder without a diffusers ``config`` is looked at for
    both (a pipeline component without one, a folder of either's files: their names differ), transformers' first.
    A folder with no config.json at all is refused (FormatError) where it holds both libraries' weights, or beside
    them another set of shards of the variant without its index: neither from_pretrained loads a folder without its
    config, and nothing says which of the sets is the model (with a config, its library reads its own names only).
    The shards the index read lists (``shards_of``, folder_weights') are its set, whatever their names."""
    def add(name: str) -> str:  # transformers' and diffusers' _add_variant
        stem, _, suffix = name.rpartition(".")
        return f"{stem}.{variant}.{suffix}" if variant else name

    legacy = [f"{DIFFUSERS_WEIGHTS}.{variant}.index.json"] if variant else []
    wanted = {"diffusers": [add(DIFFUSERS_INDEX), *legacy, add(DIFFUSERS_WEIGHTS)]}
    if not is_diffusers(config):
        wanted = {"transformers": [add("model.safetensors"), add(INDEX_NAME)], **wanted}
    found = {library: name for library, candidates in wanted.items()
             for name in [next((n for n in candidates if n in names), None)] if name}
    if config is None and len(found) > 1:
        raise FormatError(f"no config.json, and both transformers' weights ({found['transformers']}) and diffusers' "
                          f"({found['diffusers']}): neither from_pretrained loads a folder without its config, and "
                          "which is the model is not known; add the model's config.json, or keep one model's weights "
                          "only")
    name = next(iter(found.values()), None)
    if name is None:
        return None
    if config is None:
        read = {os.path.normpath(n) for n in shards_of(name)} if shards_of and name.endswith(".json") else set()
        problem = shards_without_index([n for n in names if n.endswith(".safetensors") and variant_of(n) == variant
                                        and n not in read], names)
        if problem:
            raise FormatError(f"no config.json, and {problem}")
    return (name, []) if name.endswith(".json") else (None, [name])


def is_diffusers(config: dict | None) -> bool:
    """Is this config.json a diffusers model's (ConfigMixin writes _diffusers_version, which no transformers config
    has), which diffusers' from_pretrained loads by its own rule, rather than a transformers model's?"""
    return isinstance(config, dict) and "_diffusers_version" in config


def explicit_weights(config: dict, holds) -> str | None:
    """The weights file a folder's config.json names in ``transformers_weights``, which transformers' from_pretrained
    reads before any other (a .safetensors file or a .safetensors.index.json inside the folder), else None: its path
    relative to the folder, normalized (./x.safetensors is x.safetensors; sub/x.safetensors, in a subfolder, is
    loaded too, and an index there lists its shards relative to the model's folder, as transformers reads them).
    What transformers refuses, a path out of the folder, an absolute one (which transformers takes where it points
    inside the folder: a config that loads on one machine only), or a file the folder lacks (``holds(path)`` false)
    is a FormatError."""
    named = config.get("transformers_weights")
    if named is None:
        return None
    if not isinstance(named, str) or not named.endswith((".safetensors", INDEX_SUFFIX)):
        raise FormatError(f"config.json's transformers_weights {named!r} is neither a .safetensors file nor a "
                          f"{INDEX_SUFFIX} (loraops reads safetensors weights only)")
    name = os.path.normpath(named)  # (transformers joins it to the folder: ./x.safetensors is x.safetensors)
    if os.path.isabs(name) or name.split(os.sep)[0] == os.pardir:
        raise FormatError(f"config.json's transformers_weights {named!r} is not a path inside the folder")
    if not holds(name):
        raise FormatError(f"config.json's transformers_weights names {named}, which the folder does not hold")
    return name


def variant_of(name: str) -> str | None:
    """The variant (fp16, ema, ...) of a weights file named as from_pretrained names them (_add_variant:
    model.fp16.safetensors, model.fp16-00001-of-00002.safetensors; diffusers' legacy
    diffusion_pytorch_model-00001-of-00002.fp16.safetensors), else None."""
    match = VARIANT_FILE.fullmatch(name)
    return match and (match["variant"] or match["legacy"])


def index_of(name: str) -> str | None:
    """The name of the index that lists ``name`` when it is a shard, else None: model-00001-of-00002.safetensors's
    is model.safetensors.index.json; a variant's, as _add_variant names it, model.fp16-00001-of-00002.safetensors's
    model.safetensors.index.fp16.json; diffusers' legacy diffusion_pytorch_model-00001-of-00002.fp16.safetensors's
    diffusion_pytorch_model.safetensors.fp16.index.json (_fetch_index_file_legacy)."""
    match, variant = SHARD_NAME.fullmatch(name), variant_of(name)
    if match is None or (match["tail"] != ".safetensors" and variant is None):
        return None
    if match["tail"] != ".safetensors":
        return f"{match['stem']}.safetensors.{variant}.index.json"
    stem = match["stem"].removesuffix(f".{variant}")
    return f"{stem}.safetensors.index.{variant}.json" if variant else f"{stem}{INDEX_SUFFIX}"


def shards_without_index(files: list[str], names: list[str]) -> str | None:
    """What is wrong with reading the .safetensors ``files`` of a folder of these file ``names`` when some are
    shards whose index it lacks, else None. Shards are only a model together with their index: transformers and
    diffusers find them through it (never by a glob), so a folder of shards without one (an interrupted copy, a
    snapshot without the index) does not load, and a merge of it would write an output that does not load either.
    Every set read is looked at (by its name and total); the line names the first without its index."""
    unindexed = [match for match in map(SHARD_NAME.fullmatch, sorted(files))
                 if match and index_of(match[0]) not in (None, *names)]
    if not unindexed:
        return None
    stem, total, tail = unindexed[0]["stem"], unindexed[0]["total"], unindexed[0]["tail"]
    shard = lambda n: f"{stem}-{str(n).rjust(len(total), '0')}-of-{total}{tail}"  # noqa: E731
    missing = [shard(n) for n in range(1, int(total) + 1) if shard(n) not in files]
    also = f", and {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} missing too" if missing else ""
    return f"shards {shard('N')} but no {index_of(shard(1))}{also}: the index is missing (an interrupted copy?)"


def diffusers_subfolder_shard(index_name: str, shard_names, config: dict | None) -> str | None:
    """What is wrong with an index diffusers reads (its diffusion_pytorch_model name, not one transformers_weights
    names) that lists a shard in a subfolder, else None: diffusers' _get_checkpoint_shard_files refuses any shard
    name with a path separator (transformers joins it to the folder and loads it)."""
    by_diffusers = PurePosixPath(index_name).name.startswith(DIFFUSERS_WEIGHTS) and (
        is_diffusers(config) or not (config or {}).get("transformers_weights"))
    below = sorted(name for name in shard_names if PurePosixPath(name).name != name)
    if by_diffusers and below:
        return (f"lists its shard {below[0]!r} in a subfolder, which diffusers does not load (its index lists file "
                "names beside it)")
    return None


def is_component(names: list[str], below: bool, config) -> bool:
    """Does a pipeline's subfolder of these file ``names`` (its top) hold weights diffusers loads, as a component:
    .safetensors weights or an index at its top, or (weights ``below`` it: .safetensors deeper in it) a config.json
    naming them in transformers_weights (``config()``: it, read only then), which transformers reads (load_sub_model's
    from_pretrained of the component's folder)? A safetensors index may list shards below it too. A folder with no
    .safetensors in it (scheduler/, tokenizer/) is none: diffusers reads no config.json of it, whatever it holds."""
    if any(name.endswith((".safetensors", INDEX_SUFFIX)) for name in names):
        return True
    if not below or "config.json" not in names:
        return False
    found = config()  # (transformers takes a null transformers_weights as none: getattr(config, ..., None))
    return not is_diffusers(found) and found.get("transformers_weights") is not None


def _pipeline_parts(folder: Path) -> list[Part]:
    parts = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        below = any(sub.rglob("*.safetensors"))
        if is_component(_names(sub), below, lambda: read_model_config(sub / "config.json")):
            parts.append(_folder_part(sub, f"{sub.name}."))
    if not parts:
        raise FormatError(f"{folder}: a diffusers pipeline folder without .safetensors weights")
    return parts


def _check_index(part: Part, headers: dict[Path, Header]) -> None:
    weight_map = read_json(part.index_file, "safetensors index")["weight_map"]  # (as _folder_part read it)
    for name, shard in weight_map.items():
        header = headers.get(part.folder / shard)
        if header is None or name not in header.tensors:
            raise FormatError(f"{part.index_file}: lists {name!r} in {shard}, which does not hold it")


class _DigestCache:
    """One small JSON file per hashed safetensors file under <home>/cache/digests, named by its path and holding
    its size, mtime, ctime and per-tensor digests. Best effort: an unreadable or stale entry is ignored (and
    rewritten)."""

    @staticmethod
    def _entry(file: Path) -> Path:
        key = hashlib.sha256(os.fsencode(resolved(file))).hexdigest()[:32]  # (a path need not be UTF-8)
        return settings.home() / "cache" / "digests" / f"{key}.json"

    @staticmethod
    def _stat(file: Path) -> list:
        # ctime too: a file rewritten with its mtime set back (or another one moved over it) was taken as unchanged,
        # and `subtract --exact` copied its new bytes as the pristine base's; any change moves ctime, which no one can
        # set back. (Not the inode, which the blob store's stamps hold: a FUSE mount may number a file anew after the
        # kernel forgets it, and a base's miss costs a read of the whole model.)
        st = file.stat()
        return [str(resolved(file)), st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    @classmethod
    def get(cls, file: Path) -> dict[str, str] | None:
        try:
            data = json.loads(cls._entry(file).read_text())
            return data["tensors"] if data["stat"] == cls._stat(file) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @classmethod
    def put(cls, file: Path, digests: dict[str, str]) -> None:
        try:
            entry = cls._entry(file)
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"stat": cls._stat(file), "tensors": digests}))
            os.replace(tmp, entry)
        except OSError:
            pass
