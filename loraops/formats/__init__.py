"""On-disk adapter layouts, read into and written from the canonical model (loraops.adapter).

    detect(path) -> "peft" | "kohya" | "diffusers" | "xlabs"
    read_adapter(path, *, alpha=None, values=True) -> Adapter
    check_values(path)                                                     (NaN/Inf, in bounded memory)
    write_adapter(adapter, dest, fmt="peft", *, force=False) -> Path     (atomic)
    write(adapter, dest, fmt, *, force=False, modules=None) -> Written     (atomic; modules as they are computed)
    adapter_files(path) -> [Path]                                          (what makes up the adapter)
    identity(path) -> sha256 hex                                           (see ``identity``)

One module per layout (peft.py, kohya.py, diffusers.py, xlabs.py: read only); what they share is in common.py.
"""
from __future__ import annotations

import hashlib
import json
import re
import reprlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping

from .. import ldm, settings, st
from ..errors import FormatError, InvalidInputError, LoraopsError, UnsupportedAdapterError, reworded
from ..lazy import LazyModule
from ..fsutil import atomic_path, existing_path, output_path, refuse_misnamed_output, sha256_file
from ..references import PATH, argument, flags_checked
from . import common, diffusers, kohya, lowrank, lycoris, params, peft, tokens, xlabs
from .kohya import kohya_name

from ..adapter import Adapter, LoraModule, adapter_argument

if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")  # what annotations name resolves when they are read: lazy.py

FORMATS = ("peft", "kohya", "diffusers")
# the layouts read; an XLabs FLUX file is read as the diffusers LoRA diffusers converts it to (no writer of its own)
READERS = {"peft": peft.read, "kohya": kohya.read, "diffusers": diffusers.read, "xlabs": xlabs.read}
# format → (writer, writes a folder?)
WRITERS = {"peft": (peft.write, True), "kohya": (kohya.write, False), "diffusers": (diffusers.write, False)}
IDENTITY_VERSION = "loraops-peft-identity-v1"



def detect(path: str | Path) -> str:
    """The layout of an adapter file or folder, from its file names and tensor keys (no tensor is loaded)."""
    path = existing_path(path)
    if path.is_dir():
        if (path / peft.CONFIG_NAME).is_file() or any((path / n).exists() for n in (peft.WEIGHTS_NAME, *peft.PICKLE_WEIGHTS)):
            return "peft"
        if (path / diffusers.WEIGHTS_NAME).is_file():
            return "diffusers"
        raise FormatError(f"{path}: a folder without {peft.CONFIG_NAME}/{peft.WEIGHTS_NAME} or {diffusers.WEIGHTS_NAME}"
                          + _what_folder_holds(path))
    if path.name == peft.CONFIG_NAME:
        raise FormatError(f"{path}: a PEFT adapter's config, not the adapter: give its folder ({path.parent})")
    return layout_of_keys(path, list(st.read_header(path).tensors))


def _what_folder_holds(path: Path) -> str:
    """What an adapter folder that is none holds instead, said after its refusal: a user gives the folder they have."""
    # PEFT's save_pretrained puts an adapter not named "default" in a subfolder of that name
    named = sorted(str(sub) for sub in path.iterdir() if (sub / peft.CONFIG_NAME).is_file())
    files = sorted(str(file) for file in path.glob("*.safetensors"))
    if named:
        return (f"; it holds PEFT adapters in subfolders, as PEFT saves named ones: give one of them "
                f"({common.shown(named)})")
    if any((path / name).is_file() for name in ("config.json", "model_index.json")):
        return f"; it holds a model, not a LoRA adapter (a base model is added with `loraops base add {path}`)"
    return f"; give the adapter's .safetensors file itself ({common.shown(files)})" if files else ""


def layout_of_keys(path: str | Path, keys: list[str], hint: str = "") -> str:
    """The layout of an adapter file holding tensors named ``keys``, or the one-line error that says why it is none
    (``path`` names the file in it; ``hint`` ends the message for names that are no adapter's at all). Also for a
    file not downloaded yet, from its header on the Hub (hub.download_adapter)."""
    layout = key_layout(keys)
    if layout is not None:
        return layout
    common.refuse_unsupported(path, keys)
    if not keys:
        raise FormatError(f"{path}: holds no tensors")
    old = next((k for k in keys if OLD_DIFFUSERS_KEY.search(k)), None)
    if old is not None:
        raise FormatError(
            f"{path}: an older diffusers LoRA layout (attention-processor keys such as {old!r}); load it with "
            "diffusers (pipe.load_lora_weights) and save it again (pipe.save_lora_weights) for the current layout"
        )
    raise FormatError(f"{common.unknown_layout(path, keys, 'not a LoRA adapter (unknown key layout)')}{hint}")


def key_layout(keys: Iterable[str]) -> str | None:
    """The adapter layout tensor names are in (kohya, diffusers, peft, xlabs), or None when they are no adapter's."""
    keys = list(keys)
    if any(xlabs.is_xlabs_key(k) for k in keys):
        return "xlabs"
    if any(diffusers.is_diffusers_key(k) for k in keys) and not any(k.startswith(peft.PREFIX) for k in keys):
        return "diffusers"
    if kohya.is_kohya_layout(keys):
        return "kohya"
    if any(peft.is_factor_key(peft.peft_key(k)) or (k.startswith(peft.PREFIX) and (tokens.is_token_key(k) or lycoris.is_product_key(k)))
           for k in keys):
        return "peft"  # (trainable tokens alone have no factor: a TrainableTokensConfig adapter)
    return None


@flags_checked
def read_adapter(path: str | Path, *, alpha: float | None = None, values: bool = True,
                 mapped: bool = False, checked: bool = False) -> "Adapter":
    """Read any supported adapter. ``alpha`` is the LoRA alpha to use where the file does not say (a bare PEFT
    .safetensors without config); when the file does say, it replaces the stored alpha (PEFT: lora_alpha, with
    alpha_pattern entries still applying; kohya: every module's alpha). ``values`` False reads headers only:
    factors on the meta device (shapes, dtypes, alphas, scales exact; no NaN check), for check and inspect — a
    70B rank-64 adapter is 1.6 GB of values they do not look at. ``mapped``: the factors are views of the file
    mapped into memory (st.map_file), only for files that nothing rewrites: the registry's stored copies. ``checked``:
    these very bytes passed this read's NaN/Inf checks before (a stored copy whose stamps say so), so its values are
    not looked at (the other checks, of headers and shapes, still run)."""
    path = existing_path(argument(path, "path", *PATH))
    if alpha is not None:
        common.check_alpha(path, alpha, "`alpha`")
    with common.values_known_finite(checked):
        return READERS[detect(path)](path, alpha=alpha, values=values, mapped=mapped)


def read_for_fit(path: str | Path, *, alpha: float | None = None, mapped: bool = False,
                 headers: "Adapter | None" = None) -> "Adapter":
    """read_adapter for check and register --base: headers only (values=False), but all values where the file saves
    whole tensors (modules_to_save, saved embedding layers, original_module copies): two tied copies saved with
    different values, which PEFT's load folds into one tensor, are a misfit only their values show (the merge's
    refusal, check.differing_tied_copy). Such files are mostly those tensors; a LoRA-only file stays unread. And
    where it saves trainable tokens: PEFT's copies of them on a tied head or side are dropped (check.without_tied_copies)
    only where their values are those of the tokens they copy. ``headers``: the file's headers-only read, done
    already (returned as it is where no value is needed)."""
    adapter = read_adapter(path, alpha=alpha, values=False) if headers is None else headers
    whole = adapter.full_tensors or adapter.originals or adapter.token_rows
    return read_adapter(path, alpha=alpha, mapped=mapped) if whole else adapter


# diffusers before 0.21: LoRAAttnProcessor (…processor.to_q_lora.up.weight), LoRACompatibleLinear (…to_q.lora.up.weight)
# and the text encoders' monkey-patched layers (…q_proj.lora_linear_layer.up.weight)
OLD_DIFFUSERS_KEY = re.compile(r"(\.processor\.to_(q|k|v|out)_lora|\.lora|\.lora_linear_layer)\.(up|down)\.weight$")


@dataclass(frozen=True)
class Written:
    """An adapter ``write`` wrote: where, and the sha256 of each of its files' bytes (by file name), hashed as they
    were written, so no one needs to read them again to know (see ``identity``); ``checked``: every value written was
    checked finite as it was computed (a loraops.algebra.Derivation's modules), so no one needs to read them again
    for that either (an adapter in memory written as it is was not: its values are whatever the caller put there)."""

    path: Path
    sha256: dict[str, str]
    checked: bool = False


class Renamed:
    """``modules`` (the real ones, as they come) as ``rename`` makes them, and the names of those the computation
    dropped (``dropped``, see common.ModuleStream) as it names them: ``announced`` (name → stand-in) tells what each
    dropped one was. Read at the end, as the computation fills them as it runs."""

    def __init__(self, modules: "Iterable[LoraModule]", rename: "Callable[..., LoraModule]",
                 announced: "Mapping[str, LoraModule]") -> None:
        self.modules, self.rename, self.announced = modules, rename, announced

    def __iter__(self) -> "Iterator[LoraModule]":
        return map(self.rename, self.modules)

    @property
    def dropped(self) -> set[str]:
        return {self.rename(self.announced[name].stand_in()).name for name in getattr(self.modules, "dropped", ())}


@flags_checked
def write(adapter: "Adapter", dest: str | Path, fmt: str = "peft", *, force: bool = False,
          modules: "Iterable[LoraModule] | None" = None, dtype: "str | torch.dtype | None" = None) -> Written:
    """Write ``adapter`` as ``fmt``: "peft" → a folder (adapter_model.safetensors + adapter_config.json);
    "kohya"/"diffusers" → one .safetensors file. Nothing appears at ``dest`` unless the write completes.

    ``modules``: the adapter's modules as they are computed (a loraops.algebra.Derivation), each written as it comes
    and then dropped, so the whole result is never in memory; ``adapter.modules`` then only announces them (stand-ins
    without values do, see common.ModuleStream). By default, the adapter's own modules. On any error, nothing appears
    at ``dest`` and an old ``dest`` (``force``) stays as it was.

    ``dtype`` (bf16, fp16, fp32 or a torch dtype): the dtype every floating tensor is written in — factors, DoRA
    magnitudes, lora_bias, saved whole tensors and token rows, not kohya's alpha scalars (float32) — each rounded
    once from the values given; one that overflows it is refused (st.TensorWriter.add). Default: each as it is."""
    adapter, dest = adapter_argument(adapter, "write_adapter"), argument(dest, "dest", *PATH)
    known_format(fmt)
    if fmt != "kohya" and not adapter.names_resolved:
        raise InvalidInputError(
            f"{adapter.label}: kohya module names are not resolved, so it cannot be written as {fmt}; bind it to a base "
            "first (`loraops register FILE --base BASE` links a registered one; in Python, loraops.check.bind)"
        )
    from ..algebra import Derivation

    spill = modules is not None  # an adapter's own tensors are in memory anyway: kept, not spilled
    checked = isinstance(modules, Derivation)
    modules = adapter.modules.values() if modules is None else modules if checked else given_modules(modules)
    if fmt == "peft" and adapter.own_names:  # PEFT keys are module paths as the adapter's own model names them in
        # memory (the diffusers writer maps bound checkpoint names to its own component names, and kohya's are
        # sd-scripts')
        own = adapter.own_names
        modules = Renamed(modules, lambda m: replace(m, name=own.get(m.name, m.name)), adapter.modules)
        adapter = adapter.with_own_names()
    if fmt == "kohya" and (on_checkpoint := kohya.out_of_pipeline(adapter)) is not None:
        # (sd-scripts names a FLUX/SD3 transformer by the single-file checkpoint's modules only)
        modules = Renamed(modules, on_checkpoint, adapter.modules)
        adapter = replace(adapter, modules={m.name: m for m in (on_checkpoint(m, values=False)
                                                                for m in adapter.modules.values())})
    refuse_unwritable(adapter, fmt, values=False)  # the values are checked as the modules come
    if adapter.products:
        raise UnsupportedAdapterError(f"{adapter.label}: {lycoris.described(adapter)}, so it cannot be written as "
                                      f"{fmt}; `loraops resize --rank K` makes a LoRA of it (an SVD of each module's ΔW)")
    writer, is_dir = WRITERS[fmt]
    refuse_misnamed(dest, fmt)
    staged = None
    try:
        with atomic_path(dest, force=force, is_dir=is_dir, keep_name=True) as staged:
            sha256 = writer(adapter, modules, staged, spill=spill, dtype=out_dtype(dtype))
    except LoraopsError as exc:  # said of the output asked for, not of its staged path, gone now
        if staged is None:
            raise
        raise reworded(exc, str(staged), str(output_path(dest))) from exc.__cause__  # (a DeviceMemoryError's: torch's)
    return Written(output_path(dest), sha256, checked)


def given_modules(modules: object) -> "Iterator[LoraModule]":
    """A caller's ``modules`` for write, each refused as it comes unless it is a LoraModule (nothing is at the output
    until the last one is written): 5, "x" or [1] were raw TypeErrors and AttributeErrors from inside a writer."""
    if isinstance(modules, (str, bytes, Mapping)) or not isinstance(modules, Iterable):
        raise InvalidInputError("modules= takes the modules of a lazy resize or combine (algebra.resize_lazily(...)) "
                                f"or LoraModule objects, not {reprlib.repr(modules)} ({type(modules).__name__})")
    for module in modules:
        if not isinstance(module, LoraModule):
            raise InvalidInputError(f"modules= holds LoraModule objects, not {reprlib.repr(module)} "
                                    f"({type(module).__name__})")
        yield module


def known_format(fmt: str) -> str:
    """``fmt`` when loraops writes it (derive's fmt= was a raw KeyError: the CLI's --format is a choice)."""
    if not isinstance(fmt, str) or fmt not in WRITERS:  # (a list was a raw TypeError: unhashable)
        raise InvalidInputError(f"unknown adapter format {fmt!r} (choose from {', '.join(FORMATS)})")
    return fmt


def refuse_misnamed(dest: str | Path, fmt: str) -> None:
    """An output named as what ``fmt`` does not write (fsutil.refuse_misnamed_output): a peft folder named
    .safetensors, a kohya or diffusers file not named .safetensors. Commands check it before reading their inputs,
    once they know the format, so a long computation does not end in it."""
    is_dir = WRITERS[known_format(fmt)][1]
    instead = ", or --format kohya/diffusers for one .safetensors file" if is_dir else ", or --format peft for a folder"
    refuse_misnamed_output(dest, is_dir=is_dir, what=f"a {fmt} adapter", instead=instead)


@flags_checked
def write_adapter(adapter: "Adapter", dest: str | Path, fmt: str = "peft", *, force: bool = False,
                  dtype: "str | torch.dtype | None" = None) -> Path:
    """``write`` of an adapter in memory; returns where it went."""
    return write(adapter, dest, fmt, force=force, dtype=dtype).path


def out_dtype(dtype: "str | torch.dtype | None") -> "torch.dtype | None":
    """The torch dtype of a written adapter's ``dtype`` (bf16, fp16, fp32, as extract's; None stays None)."""
    from ..engine import parse_dtype
    from ..st import torch_dtype

    return None if dtype is None else torch_dtype(parse_dtype(dtype))


def peft_unwritable_parts(adapter: "Adapter") -> list["LoraModule"]:
    """The modules of ``adapter`` that PEFT cannot hold: LoRAs on a part of a fused tensor written under the part's
    checkpoint path (``adapter.own_names`` give the written names of a bound adapter) where no model PEFT wraps has a
    module of that path (ldm.Fused.peft: OpenCLIP's q, k, v; FLUX's and SD3's qkv and linear1 parts). Under the
    adapter's own names a part is a module of the model it was trained on (a diffusers LoRA's
    ``transformer.transformer_blocks.0.attn.to_q``, ``text_encoder_2.…self_attn.k_proj``): written as unbound."""
    parts = []
    for module in adapter.modules.values():
        entry = None if module.fused is None else ldm.fused(module.fused[0])
        written = adapter.own_names.get(module.name, module.name)
        if entry is not None and not entry.peft and written.rpartition(".")[0] == entry.owner_of(module.fused[0]):
            parts.append(module)
    return parts


def refuse_unwritable(adapter: "Adapter", fmt: str, *, values: bool = True, label: str | None = None,
                      peft_way_out: str | None = None, base_way_out: str | None = None) -> None:
    """LoRAs on raw parameters (PEFT target_parameters) that cannot be written as ``fmt``: only PEFT can hold them
    (as target_parameters again: as per-module keys transformers 5 has no module by those names, and a Conv1D's would
    be transposed), and only in PEFT's wrapper layout (params.expert_layout, under the adapter's own names; with
    ``values`` False, only what the modules' names and shapes say). DoRA adapters, as kohya: sd-scripts' LoRA has no
    magnitude. A VeRA or AdaLoRA adapter not bound to a base (formats.lowrank.refuse_unbound). As PEFT, the parts of
    fused tensors peft_unwritable_parts gives (kohya joins or names them, diffusers names them as its pipeline does).
    Callers that compute an adapter to write it (combine, resize) ask first about their inputs, extract about what it
    will make. ``label``: how messages name the adapter (default: adapter.label); ``peft_way_out``: what the refusal
    of such parts says to do (extract's differs); ``base_way_out``: what the refusal of modules whose orientation only
    their base says says to do (export names its commands)."""
    label = label or adapter.label
    lowrank.refuse_unbound(adapter, label, f"written as {fmt}")
    parts = peft_unwritable_parts(adapter) if fmt == "peft" else []
    if parts:
        raise UnsupportedAdapterError(
            f"{label}: {common.shown([m.name for m in parts])}: rows of a fused tensor ({parts[0].fused[0]}) that no "
            f"model PEFT wraps holds as a module, "
            f"{peft_way_out or 'so it cannot be written as peft: use `fmt` kohya or diffusers'}", ["fmt"]
        )
    unsettled = [m.name for m in adapter.modules.values() if not m.orientation_known]
    if fmt != "peft" and unsettled:
        raise UnsupportedAdapterError(
            f"{label}: {common.shown(unsettled)}: Conv1D-named modules whose orientation (fan_in_fan_out) only their "
            f"base says, which the {fmt} layout fixes; "
            f"{base_way_out or f'give --base (a registered base) to write it as {fmt}'}"
        )
    if fmt == "kohya" and adapter.dora:
        raise UnsupportedAdapterError(
            f"{label}: a DoRA adapter (lora_magnitude_vector) cannot be written as kohya: sd-scripts' LoRA "
            "has no magnitude, and LyCORIS' dora_scale decomposes the weight its own way; write it as peft or diffusers"
        )
    if fmt != "peft" and adapter.lora_bias:
        raise UnsupportedAdapterError(
            f"{label}: an adapter with PEFT lora_bias (a bias on lora_B) cannot be written as {fmt}, which has no "
            "place for it; write it as peft"
        )
    if fmt != "peft" and adapter.token_rows:
        raise UnsupportedAdapterError(
            f"{label}: an adapter with PEFT trainable tokens (rows of {next(iter(adapter.token_rows))!r}) "
            f"cannot be written as {fmt}, which has no place for them; write it as peft"
        )
    module = next((m for m in adapter.modules.values() if m.raw_parameter is not None), None)
    if module is None:
        return
    if fmt != "peft":
        raise UnsupportedAdapterError(
            f"{label}: module {module.name!r} comes from a LoRA on the raw parameter "
            f"{module.raw_parameter[0]!r} (PEFT target_parameters); loraops writes such adapters only as PEFT, not {fmt}"
        )
    (params.expert_layout if values else params.expert_shares)(label, adapter.with_own_names().modules)


def _peft_parts(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config file or None) when ``path`` is a PEFT folder or a weights file with a sibling config."""
    if path.is_dir():
        if detect(path) == "diffusers":
            return path / diffusers.WEIGHTS_NAME, None
        return peft.weights_file(path), peft.config_path(path)
    if detect(path) == "peft":
        return path, peft.config_path(path)
    return path, None


def check_values(path: str | Path, *, hash_weights: bool = False) -> str | None:
    """NaN/Inf anywhere in an adapter's tensors, each file read once ≤ 8 MiB at a time (st.scan): the value check a
    headers-only read (``read_adapter(values=False)``) leaves out, in bounded memory. ``hash_weights``: returns the
    sha256 of the weights file (identity's ``weights_sha256``) hashed in that same read, so of the very bytes checked;
    None where it read none (not a safetensors file).

    On one torch thread: a block's aminmax is a few ms of memory-bound work between the block's hash and the next
    read, and a second OpenMP thread only spun through those on the other core (395 MiB checked and hashed on two
    busy cores: 2.9 s, as against 0.7 s on one; bench/results/register-passes-2core.txt)."""
    import torch

    files, digest = adapter_files(path), None
    with settings.torch_threads(torch.device("cpu"), lambda before: 1):
        for file in files:
            if file.suffix != ".safetensors":
                continue
            hasher = hashlib.sha256() if hash_weights and file == files[0] else None  # (the weights come first)
            for info, block in st.scan(file, None if hasher is None else hasher.update):
                common.check_finite(file, info.name, block)
            digest = digest if hasher is None else hasher.hexdigest()
    return digest


def adapter_weights(path: str | Path) -> Path:
    """The file that holds an adapter's tensors: a folder's weights file, else the file itself."""
    return _peft_parts(existing_path(path))[0]


def adapter_files(path: str | Path) -> list[Path]:
    """The files an adapter consists of: a PEFT folder's weights file and adapter_config.json (also for a weights
    file read with its sibling config); a diffusers folder's weights file; otherwise the single file."""
    weights, config = _peft_parts(existing_path(path))
    return [weights] if config is None else [weights, config]


def math_config(config: dict) -> dict:
    """The config fields that change the math, PEFT defaults filled in, lists sorted (PEFT saves sets in any order)."""
    out, config = {}, peft.nulls_as_false(config)
    peft_type = peft.peft_type_of(config)
    for name, default in peft.MATH_FIELDS.items():
        default = common.peft_default(peft_type, name) if name in ("r", "lora_alpha", "use_rslora") else default
        # modules_to_save as PEFT loads it (a task model adds its head): older PEFT's null and 0.21's list are one
        value = peft.identity_entries(config) if name == "modules_to_save" else config.get(name, default)
        if isinstance(value, list):  # strings as PEFT writes them; anything else (a broken config) after them
            value = sorted(value, key=lambda v: (0, v) if isinstance(v, str) else (1, json.dumps(v, sort_keys=True)))
        if name in ("modules_to_save", "target_modules") and not value:
            value = None
        if name == "peft_type" and isinstance(value, str):
            value = value.upper()
        out[name] = value
    if str(config.get("peft_type")).upper() in lycoris.PEFT_TYPES:  # LoHa/LoKr's alpha (its lora_alpha is unused)
        out["alpha"] = config.get("alpha", common.peft_default(peft_type, "alpha"))
    if str(config.get("peft_type")).upper() == "ADALORA":  # its ranknum, which divides the scale
        out["init_r"] = config.get("init_r", common.peft_default(peft_type, "init_r"))
    if config.get("lora_bias"):  # (only when set, as below: a biased copy of a plain LoRA's file is no plain LoRA)
        out["lora_bias"] = True
    if value := config.get("target_parameters"):  # only when set: the identities of other adapters stay as they were
        # sorted like the lists above; a malformed value as it is (hashed before the reader refuses it)
        out["target_parameters"] = sorted(value, key=str) if isinstance(value, list) else value
    for name in ("trainable_token_indices", "token_indices"):  # trainable tokens: row i of the values is token
        if value := config.get(name):                            # value[i], so unsorted; only when set, as above
            out[name] = value
    return out


def identity(path: str | Path, *, weights_sha256: str | None = None) -> str:
    """sha256 that identifies an adapter.

    A single file (kohya, diffusers, bare PEFT .safetensors): sha256 of the file's bytes (what the Hub and Civitai
    show). A PEFT folder, or a PEFT weights file with a sibling adapter_config.json: sha256 of the UTF-8 text
        "loraops-peft-identity-v1\\n" + <sha256 hex of the weights file bytes> + "\\n" + <canonical JSON>
    where the canonical JSON (sorted keys, separators "," and ":") holds the config fields that change the math:
    peft_type, r, lora_alpha, use_rslora, rank_pattern, alpha_pattern, fan_in_fan_out, target_modules,
    modules_to_save (as PEFT loads it, a task model's entries included: peft.identity_entries), use_dora (absent ones as
    PEFT's defaults, lists sorted, empty lists as null), LoHa/LoKr's alpha
    and AdaLoRA's init_r (its ranknum divides the scale), target_parameters when set (sorted; absent otherwise, as
    before it was read), lora_bias when true (absent otherwise, so a plain LoRA's identity is unchanged), and
    trainable_token_indices / token_indices when set (unsorted: their order pairs indices
    with stored rows; trainable_token_indices as the rows it gives the file's token tensors, see
    tokens.canonical_indices, so its list and dict spellings agree). So the same
    weights with another alpha are another adapter, while a config edit that does not change the math (a new
    base_model_name_or_path, a comment) keeps the identity. ``weights_sha256``: the weights file's sha256 when the
    caller already has it (the file is then not read)."""
    weights, config = _peft_parts(existing_path(argument(path, "path", *PATH)))
    digest = weights_sha256 or sha256_file(weights)
    if config is None:
        return digest
    cfg = peft.load_config(config)
    # a config the reader refuses has no identity: merge takes a registered adapter of the same identity for the
    # path, and merged a PiSSA-initialised copy of a registered LoRA (init_lora_weights is not hashed) as that LoRA
    peft.scale_config(config, cfg)
    math = math_config(cfg)
    if "trainable_token_indices" in math:
        math["trainable_token_indices"] = tokens.canonical_indices(weights, st.read_header(weights).tensors, cfg,
                                                                    peft.PREFIX)
    canonical = json.dumps(math, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{IDENTITY_VERSION}\n{digest}\n{canonical}".encode()).hexdigest()


__all__ = ["FORMATS", "Written", "detect", "read_adapter", "write", "write_adapter", "adapter_files", "adapter_weights",
           "identity", "kohya_name"]
