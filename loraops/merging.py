"""Merge and subtract by reference, with the registry: what the `merge` / `subtract` commands call.

References are registry references or paths (a path that exists wins; paths work without registering). After the
output is renamed into place it is recorded as a derived base: its fingerprint and its lineage (op, base, adapters
with their identity sha256 and weight, dtype). A failure before that leaves no row; a failure while recording leaves
the output in place and says so. The lineage is what lets `subtract --exact` find the pristine base: with nothing
left to keep it copies the recorded base's files verbatim (bit for bit), otherwise it re-merges the adapters that
remain onto it, which is bit-identical to having merged only those.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from . import blocks, engine, settings
from .adapter import Adapter
from .basemodel import BaseModel, store_digests
from .errors import (ConflictError, LoraopsError, MismatchError, NotFoundError, ParameterError, RegistryError,
                     UnsupportedAdapterError)
from .landing import Landing
from .lazy import LazyModule
from .fsutil import (atomic_path, ensure_free_space, output_path, path_exists, refuse_overlap, refuse_unrecordable,
                     resolved)
from .records import LineageInput, LineageSpec, MergeInputRecord, MergeReport, ResidualRecord
from .st import torch_name
from .references import PATH, argument, flags_checked
from .references import parse_weighted, refuse_output_over, weighted_inputs  # noqa: F401 - parse_weighted is part of this module's API

if TYPE_CHECKING:
    from .registry import store
else:
    store = LazyModule("loraops.registry.store")  # what annotations name resolves when they are read: lazy.py


@dataclass
class Input:
    """One adapter argument, resolved."""

    label: str
    adapter: Adapter
    weight: float
    sha256: str
    registry_id: int | None = None
    block_weights: list[float] | None = None
    """A Stable Diffusion LoRA's block weights (loraops.blocks), already applied to ``adapter``; None for none (or a
    list of 1s: blocks.recorded)."""
    component: str | None = None
    """The pipeline component it goes to alone (check.SECOND_TRANSFORMER: a ``transformer_2`` argument); None where it
    binds to the whole base."""

    def weighed(self, weights: "Sequence[float] | None") -> "Input":
        """This input with its block weights applied (itself for none)."""
        if weights is None:
            return self
        adapter = blocks.block_weighted(self.adapter, weights, self.label)  # (checked even when all 1s)
        return replace(self, adapter=adapter, block_weights=blocks.recorded(weights))

    def shown(self) -> str:
        """How --exact's refusals and subtract's notes name it (_named)."""
        return _named(self.label, self.weight, self.block_weights, self.component)

    def recorded_blocks(self) -> dict:
        """What a merge's lineage records of its block weights and component, beside its weight (nothing for none)."""
        return ({} if self.block_weights is None else {"block_weights": self.block_weights}) | (
            {} if self.component is None else {"component": self.component})


def resolve_adapter(reg, ref: str, weight: float, scratch: Path | None = None, reserve: int = 0) -> Input:
    """A path or a registry reference. A path is matched to the registry by identity: when it is registered, its
    stored copy (the same bytes) is what is loaded, mapped into memory rather than read into it (see
    Registry.load_adapter: a user's file is never mapped, since it could be truncated while in use); else, or when
    the stored copy is damaged, the file is read as it is, or with ``scratch`` (a folder) copied there first and
    mapped from that copy (_read_copied; ``reserve``: bytes of that folder's free disk the output needs, which no
    copy may take). Without a registry the path's identity is not looked up."""
    from . import formats

    if path_exists(ref):
        sha = formats.identity(ref) if reg is not None else None
        registry_id = _registered_id(reg, sha) if sha is not None else None
        adapter = _stored_copy(reg, registry_id, ref) if registry_id is not None else None
        if adapter is not None:
            return Input(ref, adapter, weight, sha, registry_id)
        adapter, read_sha = _read_copied(ref, scratch, reserve, sha)
        # (a file changed since it was hashed is what was read: not the registered one)
        return Input(ref, adapter, weight, read_sha, registry_id if read_sha == sha else None)
    if reg is None:
        raise NotFoundError(f"{ref}: no such file or folder")
    record = reg.get_adapter(ref)
    return Input(f"{record.name}@{record.version}", reg.load_adapter(record.id), weight, record.sha256, record.id)


def _read_copied(ref: str, scratch: Path | None, reserve: int, sha: str | None) -> tuple[Adapter, str]:
    """(the adapter at path ``ref``, its identity), read from a private copy of its weights in ``scratch``
    (st.private_copy, leaving ``reserve`` bytes free there) and mapped from there, so its saved whole tensors (a
    modules_to_save lm_head, GBs for a large vocabulary) are page cache the kernel can drop rather than anonymous
    memory, as a registered adapter's are; the identity is of the copied bytes, so it names what was merged. Without
    ``scratch``, or where no copy is made, the file is read into memory (its identity: ``sha`` when known)."""
    from . import formats, st

    if scratch is not None:
        with st.private_copy(formats.adapter_weights(ref), scratch, reserve) as digest:
            if digest is not None:
                return formats.read_adapter(ref, mapped=True), formats.identity(ref, weights_sha256=digest)
    return formats.read_adapter(ref), sha or formats.identity(ref)


def scratch_folder(output: str | Path) -> Path:
    """Where private copies of adapters go for a merge to ``output``: the nearest folder that exists of those that
    will hold it (on its filesystem, which has room for the output)."""
    folder = output_path(output).parent
    while not folder.is_dir():
        folder = folder.parent
    return folder


def _arguments(adapters, transformer_2, block_weights) -> tuple[list[tuple[str, float]], list, list]:
    """merge's and subtract's adapter arguments: ((ref, weight) pairs, the block weights of each (a checked list, or
    None), the component each goes to alone (None, or check.SECOND_TRANSFORMER)), the ``adapters`` first: a block
    weight list is given per adapter of those (Stable Diffusion LoRAs; a Wan 2.2 expert's takes none)."""
    from .check import SECOND_TRANSFORMER

    pairs, second = weighted_inputs(adapters), weighted_inputs(transformer_2, "transformer_2")
    lists = blocks.checked_lists(block_weights, len(pairs)) or [None] * len(pairs)
    return ([*pairs, *second], [*lists, *[None] * len(second)],
            [*[None] * len(pairs), *[SECOND_TRANSFORMER] * len(second)])


def _resolved(reg, adapters: Sequence[tuple[str, float]], lists: list, components: list, output: str | Path | None,
              room: int = 0) -> list[Input]:
    """The adapter arguments, (ref, weight) pairs, resolved and weighed by their block weights (a list or None each),
    each going to its component (None: the whole base); a path's private copy goes beside ``output``
    (scratch_folder) where that leaves the ``room`` bytes the output needs (a copy must not cost a merge that fits
    without it its disk), none without ``output``."""
    scratch = scratch_folder(output) if output is not None else None
    return [replace(resolve_adapter(reg, ref, weight, scratch, room).weighed(weights), component=component)
            for (ref, weight), weights, component in zip(adapters, lists, components, strict=True)]


def _refuse_no_component(model: BaseModel, label: str, components: list) -> None:
    """A component asked for that the model lacks (a Wan 2.2 expert's adapter given for a pipeline with one
    transformer), refused before any adapter is read."""
    from .check import component_tensors

    for component in {c for c in components if c is not None}:
        component_tensors(model.tensors, component, label)


def _engine_inputs(inputs: list[Input], sign: int = 1) -> dict:
    """``inputs`` as engine.merge's and subtract's ``adapters`` and ``transformer_2`` (Adapter, weight) pairs."""
    from .check import SECOND_TRANSFORMER

    return {"adapters": [(i.adapter, sign * i.weight) for i in inputs if i.component is None],
            "transformer_2": [(i.adapter, sign * i.weight) for i in inputs if i.component == SECOND_TRANSFORMER]}


def _stored_copy(reg, registry_id: int, ref: str) -> Adapter | None:
    """The registered adapter with identity equal to the file ``ref``'s, as read_adapter(ref) gives it (unbound,
    named by that path), from the stored copy; None when that copy is missing or changed."""
    try:
        adapter = reg.load_adapter(registry_id, bind=False)
    except RegistryError:
        return None
    return replace(adapter, ref=None, path=Path(ref))


def _registered_id(reg, sha: str) -> int | None:
    """The registry id of the adapter with this identity, if it is registered (then recording a merge need not
    register it again, which would read and hash it twice more)."""
    record = _registered(reg, sha)
    return None if record is None else record.id


def _registered(reg, sha: str):
    """The registry record of the adapter with this identity, or None."""
    if reg is None:
        return None
    try:
        record = reg.get_adapter(sha)
    except LoraopsError:
        return None
    return record if record.sha256 == sha else None


def resolve_base(reg, ref: str | Path, output: str | Path | None = None,
                 operation: str = "merge") -> tuple[BaseModel, str]:
    """(the model, its label): a path, or a registered base whose files are still where they were. With ``output``,
    an output named as the other kind of model (engine.refuse_misnamed) is refused first: a registered base's kind
    is known from its record, before its files are opened or, for a base from the Hub, downloaded."""
    if path_exists(ref) or reg is None:
        model = BaseModel.open(ref)
        if output is not None:
            engine.refuse_misnamed(model, output, operation)
        return model, str(ref)
    record = reg.get_base(str(ref))
    single_file = reg.base_is_single_file(record.id) if output is not None else None
    if single_file is not None:
        engine.refuse_misnamed_kind(single_file, record.name, output, operation, record.path)
    return BaseModel.open(reg.base_path(record.id)), record.name


def _streamed_early(ref: str | Path, output: str | Path, operation: str) -> tuple[BaseModel, str] | None:
    """A model given by path, opened and already coming into the page cache (BaseModel.prefetch) before the registry
    loads (SQLAlchemy alone takes ~0.35 s) and torch (~1 s): the disk works while the process starts up. The engine
    stops the prefetch when its own reading starts."""
    return _streamed(None, ref, None, output, operation) if path_exists(ref) else None


def _streamed(reg, ref: str | Path, early: tuple[BaseModel, str] | None, output: str | Path,
              operation: str) -> tuple[BaseModel, str]:
    """The model to stream, prefetching (what _streamed_early opened, or now, by registry reference) once its
    output is known to be named as what it writes (a folder, or one file)."""
    if early is not None:
        return early
    model, label = resolve_base(reg, ref, output, operation)
    model.prefetch()
    return model, label


@flags_checked
def merge(base: str | Path, adapters: Sequence[str | tuple[str, float]], output: str | Path, *,
          name: str | None = None, record: bool = True, block_weights: "Sequence[Sequence[float]] | None" = None,
          registry: "store.Registry | None" = None, transformer_2: Sequence[str | tuple[str, float]] = (),
          **options) -> MergeReport:
    """`loraops merge`: adapters given as 'REF[:W]' strings or (ref, weight) pairs merged into ``base`` (a ref or
    path), then recorded. ``block_weights``: one list per adapter of a Stable Diffusion LoRA's block weights (see
    loraops.blocks), recorded with it. ``registry``: the Registry references resolve in and the output is recorded
    in (default: LORAOPS_DB / LORAOPS_HOME's, opened for the call). ``transformer_2``: adapters given so merged into
    the second transformer of a Wan 2.2 pipeline folder (its low-noise expert, diffusers' load_into_transformer_2),
    those of ``adapters`` into its transformer/ (as always), in one output; the lineage records which went where."""
    base, output = argument(base, "base", *PATH), argument(output, "output", *PATH)
    pairs, lists, components = _arguments(adapters, transformer_2, block_weights)
    settings.resolve_device(options.get("device"))  # before a 70B's base is hashed and its adapters read
    with Landing(output, record, registry):
        return _merge(base, pairs, output, name=name, record=record, lists=lists, components=components,
                      registry=registry, **options)


def _merge(base, adapters, output, *, name, record, lists, components, registry, **options) -> MergeReport:
    if not adapters and options.get("dtype") is None:
        raise ParameterError("no adapter to merge: give at least one, or `dtype` to convert the base alone "
                             "(an FP8 model to bf16, say)", ["dtype"])
    early = _streamed_early(base, output, "merge")
    model, reg = early[0] if early else None, None
    try:
        reg = _open_registry(registry, record or _references(base, adapters), create=record)
        _check_name_free(reg, name, record)
        _check_output(reg, output, record, base, adapters)
        model, label = _streamed(reg, base, early, output, "merge")
        _refuse_no_component(model, label, components)
        room = engine.check_room(model, output, options.get("dtype"))  # before loading adapters (GBs for a 70B's)
        inputs = _resolved(reg, adapters, lists, components, output, room)
        report = engine.merge(model, output=output, fingerprint=record, **_engine_inputs(inputs), **options)
        report = _labelled(report, inputs)
        if not record:
            return report
        return _record(reg, report, "merge", model, inputs, name, options)
    finally:
        _close(reg if registry is None else None, model)


@flags_checked
def subtract(model: str | Path, adapters: Sequence[str | tuple[str, float]], output: str | Path, *,
             exact: bool = False, name: str | None = None, record: bool = True,
             block_weights: "Sequence[Sequence[float]] | None" = None, registry: "store.Registry | None" = None,
             transformer_2: Sequence[str | tuple[str, float]] = (), **options) -> MergeReport:
    """`loraops subtract`: W − Σ wᵢ·sᵢ·Bᵢ·Aᵢ, reporting the residual against the pristine base when the registry
    knows it; ``exact`` restores from that base instead (refused, with the reason, when it is not available).
    ``adapters``, ``block_weights`` and ``registry`` as merge's: each adapter's ΔW weighed by its block weights is
    what comes off, and what ``exact`` matches in the recorded merge. ``transformer_2``: as merge's, taken off (or,
    with ``exact``, matched in) the second transformer."""
    model, output = argument(model, "model", *PATH), argument(output, "output", *PATH)
    pairs, lists, components = _arguments(adapters, transformer_2, block_weights)
    given = [key for key in ("dtype", "precise") if options.get(key)]
    if exact and given:  # (they were ignored: --exact --dtype fp32 of a bf16 merge wrote bf16)
        raise ParameterError(
            f"{' and '.join(f'`{key}`' for key in given)} cannot be given with `exact`: it restores the recorded base "
            "as it is, or re-merges the adapters that stay with the dtype and precision the merge had; convert the "
            "result afterwards (`loraops merge --into RESULT --dtype …` with no adapter)", [*given, "exact"])
    if not exact:  # (--exact may only copy the recorded base; a re-merge is checked by the engine)
        settings.resolve_device(options.get("device"))
    with Landing(output, record, registry):
        return _subtract(model, pairs, output, exact=exact, name=name, record=record, lists=lists,
                         components=components, registry=registry, **options)


def _subtract(model, adapters, output, *, exact, name, record, lists, components, registry,
              **options) -> MergeReport:
    streamed = not exact  # --exact copies or re-merges the recorded base: the merged model itself is not read
    early = _streamed_early(model, output, "subtract") if streamed else None
    merged, reg = early[0] if early else None, None
    try:
        reg = _open_registry(registry, record or exact or _references(model, adapters), create=record)
        _check_name_free(reg, name, record)
        _check_output(reg, output, record, model, adapters)
        if streamed:
            merged, label = _streamed(reg, model, early, output, "subtract")
            _refuse_no_component(merged, label, components)
            inputs = _resolved(reg, adapters, lists, components, output,
                               engine.check_room(merged, output, options.get("dtype")))
        else:  # a recorded merge has its base's kind, which the restored output has
            merged, label = resolve_base(reg, model, output, "restore")
            _refuse_no_component(merged, label, components)
            # (its adapters are matched by identity, never merged: no private copies, which could take the room of
            # an output whose size is not known yet)
            inputs = _resolved(reg, adapters, lists, components, None)
        origin = _origin(reg, merged) if reg is not None and (record or exact) else None
        if exact:
            report, pristine, kept, made = _restore(reg, merged, label, origin, inputs, output, options)
            if reg is None or not record:
                return report
            # what it is: the recorded base itself, or a merge of the adapters that stay into it, as that merge was
            # made (recorded as "subtract(merged)" with no adapters, a later --exact on it found no merge to undo)
            return _record(reg, report, "merge", pristine, kept, name, made)
        else:
            _refuse_dora_after(reg, origin, inputs, label)
            # the recorded base is what the result should be only when every merged adapter comes off: with some left
            # merged, the difference from it is theirs, not rounding
            remaining, stray = _take_off(origin.lineage.params, inputs) if origin is not None else ([], None)
            pristine = _pristine(reg, origin) if origin is not None and (remaining, stray) == ([], None) else None
            report = engine.subtract(merged, output=output, reference=pristine, fingerprint=record,
                                     **_engine_inputs(inputs), **options)
            report = _labelled(report, inputs, sign=-1)
            if stray is not None:  # (plain arithmetic all the same: negating an adapter never merged is a use too)
                logging.getLogger("loraops").info(
                    f"{stray.shown()} is not one of the adapters {label} was merged with "
                    f"({_merged_with(origin.lineage.params)}), so what comes off is not what that merge added")
        if reg is None or not record:
            return report
        return _record(reg, report, "subtract", merged, inputs, name, options, sign=-1)
    finally:
        _close(reg if registry is None else None, merged)


# -- registry plumbing ------------------------------------------------------------------------------------------------
def _close(reg, model: BaseModel | None) -> None:
    if model is not None:
        model.stop_prefetch()
    if reg is not None:
        reg.close()


def _open_registry(registry, wanted: bool, create: bool):
    """The caller's registry, else the default one when the call needs one."""
    if registry is not None:
        from .registry.store import given

        return given(registry)
    if not wanted:
        return None
    from .registry import Registry

    return Registry.open(create=create)


def _references(model, adapters) -> bool:
    """Does the model or any adapter argument ((ref, weight) pairs) name a registry entry rather than an existing path?
    (--no-record still reads the registry to resolve those.)"""
    return not path_exists(model) or any(not path_exists(ref) for ref, _ in adapters)


def _labelled(report: MergeReport, inputs: list[Input], sign: int = 1) -> MergeReport:
    return report.model_copy(update={"adapters": [
        MergeInputRecord(ref=i.label, weight=sign * i.weight, modules=len(i.adapter.modules),
                         full_tensors=len(i.adapter.full_tensors), block_weights=i.block_weights,
                         component=i.component)
        for i in inputs
    ]})


def _record(reg, report: MergeReport, op: str, source: BaseModel, inputs: list[Input],
            name: str | None, options: dict, sign: int = 1) -> MergeReport:
    """Record the output (already in place) as a derived base with its lineage. Inputs given by path are recorded
    too (a base by its manifest and fingerprint, its files staying where they are; an adapter by a copy in the blob
    store, or the existing entry with the same identity)."""
    source_record, _, changed = record_read(reg, source)
    for i in inputs:  # adapters given by path join the registry (by identity), so the lineage can name them
        if i.registry_id is None:
            i.registry_id = _register_merged(reg, i, report.output)
    params = {
        "dtype": report.dtype, "precise": bool(options.get("precise", False)),
        # the --dtype given (None: each tensor as stored), which --exact re-merges with; "dtype" is the output's, for
        # display (float8_e4m3fn for an FP8 model kept FP8, or bfloat16 for one whose bytes are mostly its bf16
        # embeddings); both named as torch names them, as every --json does (a record before said BF16)
        "requested_dtype": torch_name(engine.parse_dtype(options.get("dtype"))),
        "base": {"name": source_record.name, "fingerprint": source_record.fingerprint},
        "adapters": [{"ref": i.label, "sha256": i.sha256, "weight": sign * i.weight, **i.recorded_blocks()}
                     for i in inputs],
    }
    if report.operation == "restore":
        params["restored"] = True
    lineage = LineageSpec(op=op, params=params, inputs=[
        LineageInput(kind="base", id=source_record.id, role="base", ref=source_record.name),
        # (the role of an adapter sent to a pipeline component alone is that component: `base show` names it)
        *(LineageInput(kind="adapter", id=i.registry_id, weight=sign * i.weight, role=i.component or "adapter",
                       ref=i.label) for i in inputs if i.registry_id is not None),
    ])
    try:
        record, created = reg.register_base(report.output, name=free_name(reg, report.output) if name is None else name,
                                            lineage=lineage)
    except LoraopsError as exc:
        raise type(exc)(f"{report.output} was written, but recording it in the registry failed: {exc}") from None
    return report.model_copy(update={"name": record.name, "fingerprint": record.fingerprint, "base_changed": changed,
                                     # (a record that already held this output's path is the output's)
                                     "already_registered": not created and record.path != str(resolved(report.output))})


def _register_merged(reg, i: Input, output: str) -> int | None:
    """The registry id of the adapter ``i`` names by path, registered now; None, with nothing left registered, where
    that file no longer holds what was merged (it changed after it was read): the lineage then names it only by its
    ref and sha256 (params), and a note says so. Its new contents were linked as the adapter merged."""
    from .derive import take_back

    registration = reg.register_adapter(i.label)
    if registration.record.sha256 == i.sha256:
        return registration.record.id
    take_back(reg, registration)
    logging.getLogger("loraops").info(
        f"{i.label} changed while it was merged (sha256 {i.sha256[:12]} when read, {registration.record.sha256[:12]} "
        f"now): {output} is recorded with what was merged, by its sha256, not linked to the file's new contents")
    return None


def record_read(reg, model: BaseModel, told=None):
    """(its registry record, whether it is new, changed) for a model that was read: the base with its fingerprint
    (given its path again if its recorded files are gone), or recorded now by manifest and fingerprint (its files
    staying where they are). ``changed`` names the registered base whose recorded files are the ones read when their
    fingerprint is no longer its own (they changed since it was registered: what was read is a base of its own, and
    the lineage names that one), else None: merge, subtract and extract say so (cli.render.echo_base_changed).
    ``told``: register_base's, for a model recorded now."""
    found = reg.find_base(model.fingerprint())
    if found is not None and Path(found.path or "").exists():
        return found, False, None
    # also when the base read is registered with files that are gone: those read are another base's (moved over it)
    changed = _stale_record_of(reg, model.path)
    record, created = reg.register_base(model.path, name=free_name(reg, model.path), told=told)
    return record, created, changed


def _stale_record_of(reg, path: Path) -> str | None:
    """The name of a registered base whose recorded files are at ``path`` (their fingerprint then no longer theirs:
    the files changed since it was registered), or None."""
    where = os.path.realpath(path)
    return next((b.name for b in reg.list_bases() if b.path and os.path.realpath(b.path) == where), None)


def free_name(reg, wanted: str | Path) -> str:
    """A registry name for a model at ``wanted`` (its folder or file name), suffixed -2, -3… when another model
    holds it: the name is a label; the fingerprint is the identity."""
    from .registry.store import default_name

    stem = default_name(Path(wanted))
    candidate, n = stem, 1
    while _name_taken(reg, candidate):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def _name_taken(reg, name: str) -> bool:
    return any(b.name == name for b in reg.list_bases())


def _check_output(reg, output, record: bool, model: str | Path, adapters: Sequence[tuple[str, float]]) -> None:
    """Refusals before any work: an output over the registry's files (opened or not) or over an adapter it reads,
    and a merge to record in a registry that is read-only here, or under a path it cannot record (the output's, or
    that of a model or adapter given by path, which the record registers)."""
    from .registry.blobs import BlobStore

    if reg is None:
        from .registry.reads import refuse_output_over_registered

        BlobStore().refuse_output_inside(output)
        refuse_output_over_registered(output)
    else:
        reg.refuse_output_inside(output)
    refs = [ref for ref, _ in adapters]
    refuse_output_over(output, refs)
    if record and reg is not None:
        reg.refuse_writes(hint="; --no-record writes the output without recording it")
        for path in [output, *(ref for ref in [model, *refs] if path_exists(ref))]:
            refuse_unrecordable(resolved(path))


def _check_name_free(reg, name: str | None, record: bool) -> None:
    """An explicit --name that is no name, or one already used, is refused before anything is written; so is one given
    with --no-record, which left it unused without a word (as --exact refuses --precise)."""
    from .registry.store import check_name

    if name is not None and not record:
        raise ParameterError(f"`name` {name!r} names the output's record, and `record=False` makes none: leave one of "
                             "them out", ["name", "record"])
    if name is not None and _name_taken(reg, check_name(name, "base")):
        raise ConflictError(f"base name {name!r} is already used in the registry; choose another `name`",
                            ["name"])


def _origin(reg, model: BaseModel):
    """The registry record of ``model`` when it is a recorded merge, else None (the fingerprint is cached per file
    stat, so a model this tool wrote and recorded is not re-read)."""
    record = reg.find_base(model.fingerprint())
    if record is None or record.lineage is None or record.lineage.op != "merge":
        return None
    return record


def _refuse_dora_after(reg, origin, inputs: list[Input], label: str) -> None:
    """A DoRA adapter merged after one that is subtracted rescaled the channels it changed (f ⊙ (W + Δ + Δ_D)), so
    taking Δ off leaves (f − 1)·Δ: refused when the lineage says so, the recorded merge's and those of the merges its
    base came from. (A DoRA adapter merged before it is no obstacle: f ⊙ (W + Δ_D) + Δ − Δ is exact.)"""
    applied: list[dict] = []  # every adapter merged on the way to the model, in the order they went in
    record, seen = origin, set()
    while record is not None and record.lineage is not None and record.lineage.op == "merge" and record.id not in seen:
        seen.add(record.id)
        applied[:0] = record.lineage.params.get("adapters", [])
        fingerprint = (record.lineage.params.get("base") or {}).get("fingerprint")
        record = reg.find_base(fingerprint) if fingerprint else None
    for i in (i for i in inputs if not i.adapter.dora):  # (a DoRA one is refused for itself: engine.refuse_dora)
        first = next((n for n, a in enumerate(applied) if a["sha256"] == i.sha256), None)
        later = [] if first is None else applied[first + 1:]
        dora = next((a for a in later if getattr(_registered(reg, a["sha256"]), "dora", False)), None)
        if dora is not None:
            raise UnsupportedAdapterError(
                f"{i.label}: {label} was merged with the DoRA adapter {dora['ref']}:{dora['weight']:g} after it, "
                f"which rescaled every output channel by magnitude/‖W + s·B·A‖, those {i.label} changed included: "
                "subtracting it cannot take it off; `exact=True` rebuilds a recorded merge from its base instead",
                ["exact"]
            )


def _pristine(reg, origin) -> BaseModel | None:
    """The recorded merge's base, found by its fingerprint (a base removed and added again, under another name, is
    the same base), when its files are there unchanged; else None."""
    fingerprint = origin.lineage.params["base"]["fingerprint"]
    record = reg.find_base(fingerprint)
    try:
        path = reg.base_path(record.id) if record is not None else None
    except LoraopsError:
        return None
    base = BaseModel.open(path) if path is not None else None
    return base if base is not None and base.fingerprint() == fingerprint else None


def _restore(reg, merged: BaseModel, label: str, origin, inputs: list[Input], output,
             options: dict) -> tuple[MergeReport, BaseModel, list[Input], dict]:
    """--exact: rebuild from the recorded pristine base instead of subtracting. Returns (the report, that base, the
    adapters re-merged onto it, the options they were merged with)."""
    if origin is None:
        where = str(resolved(merged.path))
        changed = next((b for b in reg.list_bases() if b.path == where and b.lineage and b.lineage.op == "merge"), None)
        if changed is not None:  # it said "not recorded as a merge" of a recorded merge whose bytes changed since
            raise MismatchError(
                f"`exact=True`: {label} at {merged.path} is recorded as a merge, but its files changed since "
                f"(fingerprint {merged.fingerprint()[:12]} ≠ recorded {changed.fingerprint[:12]}), so its record does "
                "not say how they were made; drop `exact=True` to subtract arithmetically", ["exact"]
            )
        raise NotFoundError(
            f"`exact=True`: {label} is not recorded in the registry as a merge (it was not made by `loraops merge`, "
            "or its record was removed), so there is no pristine base to restore; drop `exact=True` to subtract "
            "arithmetically", ["exact"]
        )
    params = origin.lineage.params
    base_info = params["base"]
    pristine = _pristine(reg, origin)
    if pristine is None:
        raise NotFoundError(
            f"`exact=True`: {label} was merged onto base {base_info['name']!r} (fingerprint "
            f"{base_info['fingerprint'][:12]}), whose files are not available unchanged; `loraops base add` them "
            "again, or drop `exact=True`", ["exact"]
        )
    remaining, stray = _take_off(params, inputs)
    if stray is not None:
        below = reg.find_base(base_info["fingerprint"])  # a merge of a merge: one level is restored at a time
        deeper = (f"; its base {below.name} is itself a merge ({_merged_with(below.lineage.params)}): take {label}'s "
                  f"adapters off with `exact=True` first, then {below.name}'s from that"
                  if below is not None and below.lineage is not None and below.lineage.op == "merge" else "")
        raise MismatchError(f"`exact=True`: {stray.shown()} is not one of the adapters {label} was merged with "
                            f"({_merged_with(params)}){deeper}", ["exact"])
    kept = [_recorded_adapter(reg, a) for a in remaining]
    # (a record from before "requested_dtype" holds only the output's dtype, an FP8 one no --dtype names)
    dtype = params.get("requested_dtype", params["dtype"] if params["dtype"] in engine.FLOAT_DTYPES else None)
    if remaining:
        report = engine.merge(pristine, output=output, dtype=dtype, precise=params["precise"],
                              device=options.get("device", "auto"), force=options.get("force", False),
                              progress=options.get("progress"), **_engine_inputs(kept))
        report = _labelled(report, kept)
    else:
        report = _copy_model(pristine, Path(output), force=options.get("force", False))
    residual = ResidualRecord(compared_to=str(pristine.path), elements_differing=0, max_abs_diff=0.0, note=(
        "restored bit for bit from the recorded base" if not remaining else
        f"re-merged the {len(remaining)} remaining adapter(s) onto the recorded base: bit-identical to merging only those"))
    report = report.model_copy(update={"operation": "restore", "residual": residual})
    return report, pristine, kept, {"dtype": dtype, "precise": params["precise"]}


def _named(label: str, weight: float, block_weights, component: str | None = None) -> str:
    """An adapter of a merge as --exact's refusal names it: 'x:0.7', 'x:0.7 [blocks 1,0,…]', 'x:0.7 (transformer_2)'
    (its component: Input.component)."""
    return f"{label}:{weight:g}{blocks.text(block_weights)}" + (f" ({component})" if component else "")


def _merged_with(params: dict) -> str:
    """The adapters of a recorded merge, as its messages list them."""
    return ", ".join(_named(a["ref"], a["weight"], a.get("block_weights"), a.get("component"))
                     for a in params["adapters"])


def _take_off(params: dict, inputs: list[Input]) -> tuple[list[dict], Input | None]:
    """The recorded merge's adapters (``params["adapters"]``) left merged once ``inputs`` are taken off, each matched
    by identity, weight and the ΔW its block weights give (blocks.factors), and the first input that is none of them
    (None when all are)."""
    remaining = [dict(a) for a in params["adapters"]]
    for i in inputs:
        weighs = blocks.factors(i.adapter.modules, i.block_weights)
        match = next((a for a in remaining if a["sha256"] == i.sha256 and math.isclose(a["weight"], i.weight)
                      and a.get("component") == i.component
                      and blocks.factors(i.adapter.modules, a.get("block_weights")) == weighs), None)
        if match is None:
            return remaining, i
        remaining.remove(match)
    return remaining, None


def _recorded_adapter(reg, entry: dict) -> Input:
    """An adapter of a recorded merge, found by its identity: in the registry, else at its recorded path."""
    from . import formats

    try:
        found = resolve_adapter(reg, entry["sha256"], entry["weight"])
    except LoraopsError:
        found = None
        if path_exists(entry["ref"]) and formats.identity(entry["ref"]) == entry["sha256"]:
            found = resolve_adapter(reg, entry["ref"], entry["weight"])
    if found is None:
        raise NotFoundError(f"`exact=True`: adapter {entry['ref']} (sha256 {entry['sha256'][:12]}), which stays "
                            "merged, is neither registered nor at its recorded path any more", ["exact"])
    # named as the merge named it (its summary, _merged_with), not by the reference its identity found
    return replace(found, label=entry["ref"], component=entry.get("component")).weighed(entry.get("block_weights"))


def _copy_model(model: BaseModel, output: Path, *, force: bool) -> MergeReport:
    """The model's files copied verbatim (same bytes, headers included), atomically."""
    import time

    started = time.perf_counter()
    engine.refuse_misnamed(model, output, "restore")
    refuse_overlap(output, model.path, "the recorded base it restores")
    size = model.total_bytes + sum((model.path / p).stat().st_size for p in model.other_files())
    ensure_free_space(output.parent, size, output.name)
    with atomic_path(output, force=force, is_dir=not model.is_single_file) as tmp:
        if model.is_single_file:
            shutil.copyfile(model.path, tmp)
        else:
            for rel in [f.relative_to(model.path) for f in model.files] + model.other_files():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(model.path / rel, tmp / rel)
    # Same bytes, same digests: recording the copy does not re-read it.
    digests = model.tensor_digests()
    for part in model.parts:
        for file in part.files:
            store_digests(output if model.is_single_file else output / file.relative_to(model.path),
                          {n: digests[part.prefix + n] for n in model.headers[file].tensors})
    return MergeReport(operation="restore", output=str(output), base_path=str(model.path), adapters=[],
                       dtype=model.dtype, device="cpu", tensors_copied=len(model.tensors), bytes_written=size,
                       seconds=round(time.perf_counter() - started, 3), peak_rss_bytes=engine.peak_rss(),
                       fingerprint=model.fingerprint())
