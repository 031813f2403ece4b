"""Derived adapters: resolve the inputs (registry references or paths), run the algebra (or an extraction), and
register the result with its base and lineage (optionally also writing it to a path). What `loraops
combine/resize/export/extract` call.

A path input is registered first (idempotent: the same bytes give the same record), so the lineage of every
derived adapter points at registered inputs; when the command then fails, the inputs it registered are removed
again (``inputs_of``), so a failed command leaves the registry as it was. A reference that is an existing path is
read as a path; anything else is looked up in the registry (name, name@version, id, sha256 prefix).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from . import algebra, blocks
from .errors import (AmbiguousError, InvalidInputError, LoraopsError, MismatchError, ModelLoraError,
                     NotFoundError, reworded)
from .formats import refuse_unwritable
from .formats.peft import refuse_full_tensors
from .landing import Landing, registered, tell, watched
from .lazy import LazyModule
from .fsutil import atomic_path, copy_file, disk_named, output_path, path_exists, refuse_existing, resolved
from .records import AdapterRecord, DerivedRecord, ExportReport, LineageInput, LineageSpec
from .references import PATH, argument, flags_checked, refuse_output_over, weighted_inputs
from .st import dtype_name

if TYPE_CHECKING:
    import torch

    from .adapter import Adapter
    from .basemodel import BaseModel
    from .hub import RepoRef
    from .ops.resize import RankRule
    from .records import BaseRecord
    from .registry import Registry, store
    from .registry.store import Registration
else:
    # what annotations name resolves when they are read: lazy.py
    store, torch = LazyModule("loraops.registry.store"), LazyModule("torch")


@dataclass
class Input:
    record: AdapterRecord
    adapter: "Adapter"


@contextlib.contextmanager
def inputs_of(reg: "Registry") -> Iterator[Callable[[str, "str | None"], Input]]:
    """``open_input`` for one command: if the command fails, the adapters it registers from paths are removed again,
    and those it linked to its --base get back the link they had."""
    done: list[Registration] = []
    result = Landing()
    try:
        yield lambda ref, base=None: open_input(reg, ref, base, done)
    except BaseException:
        if result.landed() is None:  # else the command was interrupted once its result (lineage: these) was saved
            for registration in reversed(done):
                take_back(reg, registration)
        raise


def take_back(reg: "Registry", registration: "Registration") -> None:
    """Undo what one register_adapter of a failing command did: remove the adapter it created, or give the one it
    linked to a base its previous link back."""
    with contextlib.suppress(Exception):  # the command's own error is the one to report
        if registration.created:
            reg.remove_adapter(registration.record.id, undo=True)
        elif registration.linked:
            previous = registration.previous_base
            reg.restore_base_link(registration.record.id, previous.id if previous else None,
                                  linked_to=registration.record.base.id)


def open_input(reg: "Registry", ref: str, base: str | None = None, done: list[Registration] | None = None) -> Input:
    """A registered adapter (registering a path first — what that did appended to ``done``), loaded and bound to its
    base."""
    if path_exists(ref):
        def made(registration: "Registration") -> None:  # as it commits: one a Ctrl-C cut there stayed registered
            if done is not None and (registration.created or registration.linked):
                done.append(registration)

        record = reg.register_adapter(ref, base=base, told=made).record
    else:
        record = registered_for(reg, ref, base)
    return Input(record, reg.load_adapter(record.id))


def registered_for(reg: "Registry", ref: str, base: str | None) -> "AdapterRecord":
    """A registered adapter, which must be recorded against ``base`` when one is given."""
    record = reg.get_adapter(ref)
    if base is not None and (record.base is None or reg.get_base(base).id != record.base.id):
        raise MismatchError(f"adapter {record.ref} is recorded against "
                            f"{'no base' if record.base is None else 'base ' + record.base.name}, not {base} "
                            f"(link it: loraops register <its file> --base {base})")
    return record


def check_base_model(reg: "Registry", inputs: Sequence[Input], base_model: str) -> None:
    """Every input is for ``base_model``. A file or folder that exists (the whole text, else its path read as mergekit
    reads a model reference: recipe.model_reference) is the model it holds, as mergekit reads it, whatever a registry
    name it shares says: it must be the input's registered base (its folder, or the same tensors: a copy, a base moved
    since), whatever the revision. Otherwise, as a whole or else read as mergekit reads a reference
    (recipe.base_reference: ``PATH[@REVISION]``), its path names the input's registered base (its name, or the
    folder or Hub id it was added from) or the adapter's own base_model_name_or_path, a folder however it is written
    (``./x``, ``x/``); a revision must name the commit a base pulled from the Hub was recorded at, as loraops resolves a
    revision offline (_not_the_commit: a full sha, else a branch or tag the Hub cache recorded, else a commit prefix;
    where loraops knows no commit, the path decides). An input that names no base at all is taken as it is;
    base_model is still refused where it is what no base is (a LoRA merged in, what mergekit cannot read) unless it
    names an input's base as a whole."""
    from .hub import good_revision, parse_hub_source
    from .recipe import base_reference

    on_disk = _on_disk(base_model)
    named_whole = on_disk is not None
    for i in inputs:
        base = reg.get_base(i.record.base.id) if i.record.base else None  # (the record's BaseRef has no source)
        known = [name for name in (base.name, base.source, base.path) if name] if base else []
        if i.adapter.base_model:
            known.append(i.adapter.base_model)
        shown = base.name if base else i.adapter.base_model
        if base is not None and on_disk is not None:
            if not _holds(on_disk, base):
                raise MismatchError(f"base_model {base_model!r}: {on_disk} exists and is read as the model it holds "
                                    f"(as mergekit reads it), which is not {i.record.ref}'s base {base.name} "
                                    f"({base.path or base.source})")
            continue
        if not known:
            continue
        if any(_names(base_model, name) for name in known):  # ('+' and '@' may be in a name or path)
            named_whole = True
            continue
        want = base_reference(base_model)
        if not any(_names(want.path, name) for name in known):
            raise MismatchError(f"base_model {base_model!r}: {i.record.ref} is for {shown}, and a recipe combines "
                                "task vectors over the adapters' own base")
        pulled = sorted({ref for ref in map(parse_hub_source, known) if ref is not None and ref.revision},
                        key=lambda ref: ref.revision)
        if want.revision and pulled:
            if not good_revision(want.revision):
                raise InvalidInputError(f"base_model {base_model!r}: invalid revision {want.revision!r}")
            try:
                why = [_not_the_commit(want.revision, ref) for ref in pulled]
            except AmbiguousError as exc:
                raise AmbiguousError(f"base_model {base_model!r}: {exc}") from None
            if None not in why:
                raise MismatchError(f"base_model {base_model!r}: {i.record.ref} is for {shown}, pulled at commit "
                                    f"{pulled[0].revision[:12]}, and revision {want.revision!r} {why[0]}")
    if not named_whole:
        base_reference(base_model)  # a base with a LoRA merged in, or what mergekit cannot read, where no input tells


def registered_base_folders(base_model: str, registry: "store.Registry | None" = None) -> list[str]:
    """The folders of the registered bases a recipe's base_model names by their name or Hub id (as a whole, or the
    path of the reference it is), for recipe.parse_recipe's base_folders. ``registry``: as combine's, which it is
    looked up for (functools.partial(registered_base_folders, registry=reg))."""
    from .recipe import model_reference
    from .registry.store import opened

    names = [base_model]
    with contextlib.suppress(InvalidInputError):
        names.append(model_reference(base_model).path)
    with opened(registry) as reg:  # (as combine opens it next)
        return [b.path for b in reg.list_bases()
                if b.path and any(_names(name, known) for name in names for known in (b.name, b.source) if known)]


def _not_the_commit(revision: str, pulled: "RepoRef") -> str | None:
    """Why ``revision`` does not name the commit a base was pulled at (``pulled``: its Hub id at that commit), read as
    loraops resolves a revision without the network (hub.resolve_commit offline): a full commit sha is that commit
    (huggingface_hub's rule); otherwise a branch or tag the Hub cache recorded under that exact name (hub.cached_ref:
    one resolved here before, by the pull itself among others) is read before a commit prefix, as git and the Hub
    read a name that could be either; otherwise 4 to 39 hex digits, in either case, are a prefix of the commit, and
    one that other cached snapshots' commits start with too is refused (an AmbiguousError, hub.refuse_ambiguous).
    None where it names that commit."""
    from .hub import RepoRef, cached_commits, cached_ref, is_commit_prefix, is_commit_sha, refuse_ambiguous

    if is_commit_sha(revision):
        return None if revision == pulled.revision else "is not that commit"
    named = cached_ref(RepoRef(pulled.repo_id, revision))
    if named is not None and not is_commit_sha(named):  # (not what huggingface_hub writes: empty, garbage)
        return (f"is the branch or tag {revision}, whose Hub cache ref holds no commit sha: give the commit, or no "
                "revision")
    if named is not None:
        return None if named == pulled.revision else (
            f"is the branch or tag {revision}, at commit {named[:12]} as the Hub cache last resolved it (a branch or "
            "tag is read before a commit prefix, as git and the Hub read a name): give the commit, or no revision")
    if is_commit_prefix(revision):
        ref = RepoRef(pulled.repo_id, revision)
        found = set(cached_commits(ref))
        if pulled.revision.startswith(revision.lower()):
            found.add(pulled.revision)
        refuse_ambiguous(ref, sorted(found))  # (as an offline pull refuses it)
        if pulled.revision in found:
            return None
    return "is not that commit (loraops does not look a branch or tag up: give the commit, or no revision)"


def _on_disk(base_model: str) -> str | None:
    """The existing file or folder a recipe's base_model names (the whole text, else the path of the model reference
    it is, without a LoRA merged in), which mergekit reads whatever the revision; None where none exists."""
    from .recipe import model_reference

    if path_exists(Path(base_model).expanduser()):
        return base_model
    with contextlib.suppress(InvalidInputError):
        ref = model_reference(base_model)
        if ref.lora is None and path_exists(Path(ref.path).expanduser()):
            return ref.path
    return None


def _holds(path: str, base: "BaseRecord") -> bool:
    """Whether the file or folder at ``path`` is the registered ``base``: its own, or the same tensors (a copy, or the
    base moved since it was added; only then are they read)."""
    from .basemodel import BaseModel
    from .errors import LoraopsError

    where = Path(path).expanduser()
    with contextlib.suppress(OSError):
        if base.path and where.samefile(base.path):
            return True
    try:
        return BaseModel.open(where).fingerprint() == base.fingerprint
    except (LoraopsError, OSError):
        return False


def _names(path: str, name: str) -> bool:
    """Whether a model path or Hub id (a recipe's) names what a base was recorded under (``name``: its name, a
    folder, an ``hf://`` source, or an adapter's base_model_name_or_path)."""
    import os

    from .hub import parse_hub_source

    hub = parse_hub_source(name) if name.startswith("hf://") else None
    if hub is not None:
        return os.path.normpath(path) == hub.repo_id
    if os.path.normpath(path) == os.path.normpath(name):
        return True
    with contextlib.suppress(OSError, ValueError):  # a folder written another way (relative, ~, a link)
        return Path(name).is_absolute() and resolved(Path(path).expanduser()) == resolved(Path(name))
    return False


def check_arguments(name: str | None, output: str | None, force: bool, refs: Sequence[str]) -> None:
    """What can be refused before any input is registered (a failed command changes nothing)."""
    from .registry.store import check_name

    if name is not None:
        check_name(name, "adapter")
    for ref in refs:
        argument(ref, "ref", *PATH)
    if output is not None:
        refuse_existing(output, force)
        refuse_output_over(output, refs)


def check_output(reg: "Registry", output: str | None, fmt: str | None, record: bool = True) -> None:
    """The output refused, once the registry is open and before any input is read: over the registry's own files,
    or misnamed for ``fmt``, given or known before the inputs are read (input_format; else write refuses it before
    it computes, extract once it has read the models' headers, which say its layout). ``record``: the result is
    registered (combine, resize, extract; not export), so a read-only registry is refused first (it failed once
    computed, on the store's scratch folder: "Permission denied", exit 2)."""
    from .formats import refuse_misnamed

    if record:
        reg.refuse_writes()
    if output is not None:
        reg.refuse_output_inside(output)
        if fmt is not None:
            refuse_misnamed(output, fmt)


def input_format(reg: "Registry", ref: str) -> str | None:
    """The layout of input ``ref`` before it is read or registered — a path's from its file names and tensor keys
    (formats.detect), a registered adapter's from its record — for check_output; None where that fails (opening the
    input says why, in its turn)."""
    from .formats import detect

    try:
        return detect(ref) if path_exists(ref) else reg.get_adapter(ref).format
    except (LoraopsError, OSError):
        return None


def rank_name(stem: str, rule: "RankRule", ceilings: Iterable[tuple[int, bool]]) -> str:
    """The default name of an adapter made by ``rule`` (extract, resize): ``<stem>-r<k>`` for a fixed rank, k the
    largest rank a module gets, each capped at its ceiling (the most rank a truncated SVD of its delta has: min(out,
    in), and a LoRA's own rank when it is resized), so a --rank above every module's size names none of them;
    ``<stem>-<rule><param>`` for a dynamic rule; and ``-conv<c>`` after it for a conv_rank, c the largest rank (cap) a
    k×k convolution gets — alone, with a fixed rank that ranks no module (only k×k convolutions). ``ceilings``:
    (ceiling, whether a k×k convolution) of every module."""
    ceilings = list(ceilings)

    def largest(rank: int, spatial: bool | None) -> int | None:
        """The largest rank ``rank`` gives a module of the group (None: the group has none)."""
        group = [c for c, s in ceilings if spatial in (None, s)]
        return min(rank, max(group)) if group else None

    if rule.dynamic is not None:
        name = f"{stem}-{rule.dynamic}{rule.param:g}"
    else:
        k = largest(rule.rank, None if rule.conv_rank is None else False)
        name = stem if k is None else f"{stem}-r{k}"
    return name if rule.conv_rank is None else f"{name}-conv{largest(rule.conv_rank, True)}"


def lineage_rule(rule: "RankRule") -> dict[str, Any]:
    """What the lineage records of a rank rule (resize, extract): the rank, or the dynamic rule; conv_rank when given."""
    recorded = {"rank": rule.rank} if rule.dynamic is None else {"dynamic": rule.dynamic, "param": rule.param,
                                                                  "max_rank": rule.max_rank}
    return with_conv_rank(recorded, rule.conv_rank)


def with_conv_rank(recorded: dict[str, Any], conv_rank: int | None) -> dict[str, Any]:
    """A lineage's params with conv_rank when given (so records made without one stay as they were)."""
    return recorded if conv_rank is None else {**recorded, "conv_rank": conv_rank}


def common_base(inputs: Sequence[Input]) -> int | None:
    """The registered base every input is recorded against (None when none is); two different ones are refused."""
    bases = {i.record.base.id: i for i in inputs if i.record.base is not None}
    if len(bases) > 1:
        first, second = list(bases.values())[:2]
        raise MismatchError(f"adapters are for different bases: {first.record.ref} is for {first.record.base.name}, "
                            f"{second.record.ref} is for {second.record.base.name}")
    return next(iter(bases), None)


def writable(adapter: "Adapter", fmt: str) -> None:
    if fmt != "kohya" and not adapter.names_resolved:
        raise InvalidInputError(f"kohya module names cannot be written as {fmt} without their base: give --base BASE")


def computed_dtype(dtype: "str | torch.dtype | None") -> "torch.dtype | None":
    """The dtype the algebra leaves a result's factors in when it is written in ``dtype`` (bf16, fp16, fp32): float64,
    which holds what was computed (float32 or float64) exactly, so that the write rounds it once; None (the inputs')
    without one. An unknown dtype is refused here, before any work."""
    import torch

    from .formats import out_dtype

    return None if out_dtype(dtype) is None else torch.float64


def lineage_dtype(dtype: "str | torch.dtype | None") -> dict[str, str]:
    """What the lineage records of a --dtype: only one given (so the records and identities of the others stay)."""
    from .formats import out_dtype

    return {} if dtype is None else {"dtype": dtype_name(out_dtype(dtype))}


def save(reg: "Registry", derived: "algebra.Derivation", *, name: str, output: str | None, fmt: str | None,
         force: bool, base: int | None, lineage: LineageSpec,
         dtype: "str | torch.dtype | None" = None) -> DerivedRecord:
    """Compute ``derived`` while it is written, module by module (into a scratch folder in the blob store), and
    register it: from the hashes taken as it was written, its values checked as they were computed; the written files
    are moved into the store, not copied. ``output``: they are copied there first (a plain copy: the stored copy is
    the one hashed as written, so the output is not read and hashed again to store it), landing (replacing an old one
    with ``force``) only once the registration committed; the registration is taken back when the output cannot
    land: one outcome, or none. ``dtype``: the written tensors' (formats.write), rounded once as they are written."""
    from .formats import WRITERS, write

    adapter = derived.adapter = naming_base(reg, derived.adapter, base)
    fmt = fmt or adapter.format
    writable(adapter, fmt)
    final = None
    if output is not None:
        reg.refuse_output_inside(output)
        final = output_path(output)
        # a one-file adapter is stored under its file name: the output's, as a registration of the output stores it
        scratch = final.name
    else:
        # a folder's name is not kept (and a name is only a name: a peft folder named after --name ab.safetensors was
        # refused as misnamed)
        scratch = "adapter" if fmt == "peft" else name.replace("/", "-") + ".safetensors"
    done: list[Registration] = []
    staged_id = None
    with reg.blobs.scratch() as tmp:
        written_at = Path(tmp) / scratch
        filling = reg.blobs.root  # the file system a full disk (ENOSPC) is said of: the store's, then the output's
        try:
            # the writers' refusals name the result by where it is written, said below as the output or the name
            # (it has no path of its own: they said '<in memory>'; a resize's kept its input's reference)
            written = write(replace(adapter, path=written_at, ref=None), written_at, fmt, modules=derived, dtype=dtype)
            if final is None:
                record, created, *_ = reg.register_adapter(written.path, name=name, base=base, lineage=lineage,
                                                           source=f"loraops {lineage.op}", scratch=True,
                                                           written=written,
                                                           told=registered("the result was registered"))
                return DerivedRecord(adapter=record, new=created, output=None, report=derived.report)
            filling = final.parent
            with atomic_path(final, force=force, is_dir=WRITERS[fmt][1], keep_name=True) as staged:
                for file in sorted(written.path.iterdir()) if written.path.is_dir() else [written.path]:
                    copy_file(file, staged / file.name if written.path.is_dir() else staged)
                # (in done as it commits: a Ctrl-C as the call returned left it registered without its output)
                reg.register_adapter(written.path, name=name, base=base, lineage=lineage, written=written,
                                     scratch=True, source=str(resolved(final.parent) / final.name), told=done.append)
                staged_id = _file_id(staged)
            record, created, *_ = done[0]
        except BaseException as exc:
            if staged_id is None or _file_id(final) != staged_id:  # else a Ctrl-C came after it landed: it stays
                for registration in done:
                    take_back(reg, registration)
            if isinstance(exc, LoraopsError):  # said of the output asked for, or of the result by name: never the scratch
                raise reworded(exc, str(written_at), str(final) if final is not None else name) from exc.__cause__
            if isinstance(exc, OSError):  # (a write that fills the disk names no file: say which disk)
                with disk_named(filling):
                    raise
            raise
        finally:  # (also of a Ctrl-C between the rename and the lines after it: the inputs_of that kept its inputs)
            if staged_id is not None and _file_id(final) == staged_id:  # (as the summary says: cli.algebra.echo_saved)
                tell(f"interrupted after {final} was written in full and "
                     f"{'registered' if done[0].created else 'already registered'} as {done[0].record.ref}")
    return DerivedRecord(adapter=record, new=created, output=str(final), report=derived.report)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.lstat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


@watched("output")
@flags_checked
def combine(
    refs: Sequence[str | tuple[str, float]], method: str, params: "dict[str, Any] | None" = None, *,
    rank: int | None = None, device: "str | torch.device" = "auto", precise: bool = False, name: str | None = None,
    output: str | None = None, fmt: str | None = None, force: bool = False, base: str | None = None,
    base_model: str | None = None, conv_rank: int | None = None, dtype: "str | torch.dtype | None" = None,
    block_weights: "Sequence[Sequence[float]] | None" = None, registry: "store.Registry | None" = None,
    recipe: str | None = None,
) -> DerivedRecord:
    """Combine registered adapters or paths — (ref, weight) pairs or 'REF[:W]' strings — and register the result; see
    algebra.combine. ``base_model`` (a recipe's): the base every input must be for (see check_base_model). ``dtype``
    (bf16, fp16, fp32): the written tensors' (default: the inputs' widest), rounded once from the computed values.
    ``block_weights``: one list per input of a Stable Diffusion LoRA's block weights (see loraops.blocks), each
    input's deltas weighed by them before the method sees them. ``registry``: as resize's. ``recipe``: the recipe
    (Recipe.source) whose models the refs are: an entry that names no adapter and reads as mergekit's MODEL+LORA is
    refused with why (ModelLoraError)."""
    from .registry.store import opened

    refs = weighted_inputs(refs)
    block_weights = blocks.checked_lists(block_weights, len(refs))
    arguments = algebra.combine_arguments(method, params, rank, [weight for _, weight in refs], conv_rank)
    computed = computed_dtype(dtype)
    check_arguments(name, output, force, [ref for ref, _ in refs])
    with opened(registry) as reg, inputs_of(reg) as open_input:
        told = [input_format(reg, ref) for ref, _ in refs]
        check_output(reg, output, fmt or (None if None in told else algebra.combined_format(told)))
        inputs = [open_entry(reg, open_input, ref, base, recipe, base_model) for ref, _ in refs]
        if block_weights is not None:
            inputs = [replace(i, adapter=blocks.block_weighted(i.adapter, weights, i.record.ref))
                      for i, weights in zip(inputs, block_weights, strict=True)]
        inputs = [without_saved_layers(reg, i) for i in inputs]
        written = fmt or algebra.combined_format(i.adapter.format for i in inputs)
        for i in inputs:  # before the work: what could not be written is refused first
            refuse_unwritable(i.adapter, written)
        base_id = common_base(inputs)
        if base_model is not None:
            check_base_model(reg, inputs, base_model)
        combined = algebra.combine_lazily(
            [(i.adapter, weight) for i, (_, weight) in zip(inputs, refs, strict=True)], method, params, rank=rank,
            device=device,
            precise=precise, labels=[i.record.ref for i in inputs], bases=[i.record.base.id if i.record.base else None
                                                                          for i in inputs], conv_rank=conv_rank,
            out_dtype=computed,
        )
        if base_id is not None:
            refuse_biasless(combined.adapter, reg.base_manifest(base_id), reg.get_base(base_id).name)
        else:
            note_zero_biases(combined.adapter, [i.adapter for i in inputs])
        lineage = LineageSpec(
            op="combine", params=with_conv_rank({"method": method, "params": arguments.record(), "rank": rank,
                                                 **lineage_dtype(dtype), **blocks.lineage(block_weights)}, conv_rank),
            inputs=[LineageInput(kind="adapter", id=i.record.id, weight=w, ref=i.record.ref)
                    for i, (_, w) in zip(inputs, refs, strict=True)],
        )
        default = "+".join(i.record.name for i in inputs) + f"-{method}"
        result = save(reg, combined, name=default if name is None else name, output=output, fmt=fmt, force=force,
                      base=base_id, lineage=lineage, dtype=dtype)
    if all(module.zero for module in result.report.modules):  # (it was registered without a word)
        logging.getLogger("loraops").info(
            f"the {method} combination is zero in every module (every entry dropped, or the inputs cancel): merged, it "
            "changes nothing")
    if block_weights is None:
        return result
    report = result.report.model_copy(update={"inputs": [
        i.model_copy(update={"block_weights": blocks.recorded(weights)})
        for i, weights in zip(result.report.inputs, block_weights, strict=True)]})
    return result.model_copy(update={"report": report})


def open_entry(reg: "Registry", open_input: Callable[[str, "str | None"], Input], ref: str, base: str | None,
               recipe: str | None, base_model: str | None) -> Input:
    """combine's input ``ref``; a recipe's entry that is mergekit's MODEL+LORA over another model than the base_model
    and names no adapter is refused in the recipe's terms, the entry to change (ModelLoraError)."""
    from .recipe import unresolved_lora_hint

    if recipe is not None and not path_exists(ref) and (hint := unresolved_lora_hint(ref, base_model)) is not None:
        try:
            reg.get_adapter(ref)
        except NotFoundError:
            raise ModelLoraError(f"{recipe}: {hint}", ref) from None
    return open_input(ref, base)


def refuse_biasless(combined: "Adapter", manifest, base_name: str) -> None:
    """A combination with PEFT's lora_bias (one switch: the plain inputs' modules get a zero bias) that its base could
    not merge, refused before it is computed: PEFT loads it with a warning but its merge raises there, as does ours."""
    from .check import lora_bias_misfit

    for name, module in combined.modules.items():
        if (why := lora_bias_misfit(module, manifest)) is not None:
            raise MismatchError(f"the combination has lora_bias (PEFT's one switch: an input has it), which module "
                                f"{name!r} cannot have on base {base_name}: {why}; combine the inputs with and "
                                "without lora_bias apart, or merge them in turn")


def without_saved_layers(reg: "Registry", entry: Input) -> Input:
    """A combine input without the PEFT saved embedding layers that hold its base's values (a LoRA on the embeddings
    saves them by default): they replace nothing, and combine refuses full tensors, so such an adapter could not be
    combined at all. Said in a note."""
    adapter, same = unchanged_layers_left_out(reg, entry.adapter, entry.record.base.id if entry.record.base else None)
    if same:
        logging.getLogger("loraops").info(
            f"left out {entry.record.ref}'s {', '.join(same)}: PEFT's saved embedding layer (save_embedding_layers), "
            "its base's own values, which replace nothing")
    return replace(entry, adapter=adapter)


def note_zero_biases(combined: "Adapter", inputs: "Sequence[Adapter]") -> None:
    """A combination with PEFT's lora_bias and no known base to check it against (refuse_biasless): the modules no
    input gives a bias get a zero one, which a base without those layers' biases cannot merge; said, not refused."""
    if not combined.lora_bias:
        return
    zero = sum(not any((m := a.modules.get(name)) is not None and m.lora_bias is not None for a in inputs)
               for name in combined.modules)
    if zero:
        logging.getLogger("loraops").info(
            f"{zero} module{'s' if zero > 1 else ''} of the combination got a zero lora_B.bias (PEFT's lora_bias is one "
            "switch and an input has it): a base without those layers' biases cannot merge it")


@watched("output")
@flags_checked
def resize(
    ref: str, *, rank: int | None = None, dynamic: str | None = None, param: float | None = None,
    max_rank: int | None = None, conv_rank: int | None = None, device: "str | torch.device" = "auto",
    precise: bool = False, name: str | None = None, output: str | None = None, fmt: str | None = None,
    force: bool = False, base: str | None = None, dtype: "str | torch.dtype | None" = None,
    registry: "store.Registry | None" = None,
) -> DerivedRecord:
    """Resize a registered adapter or a path and register the result; see algebra.resize. ``dtype`` (bf16, fp16,
    fp32): the written tensors' (default: each module's), rounded once from the computed values. ``registry``: the
    Registry to read references from and record in (default: LORAOPS_DB / LORAOPS_HOME's)."""
    from .registry.store import opened

    rule = algebra.resize_rule(rank, dynamic, param, max_rank, conv_rank)
    computed = computed_dtype(dtype)
    check_arguments(name, output, force, [ref])
    with opened(registry) as reg, inputs_of(reg) as open_input:
        check_output(reg, output, fmt or input_format(reg, ref))
        source = open_input(ref, base)
        written = fmt or source.adapter.format
        if written != "peft":  # (a kohya or diffusers file holds no full tensor: those that carry nothing stay out)
            source = without_saved_layers(reg, source)
            refuse_full_tensors(source.adapter, written, base=source.record.base.name if source.record.base else None)
        refuse_unwritable(source.adapter, written)
        resized = algebra.resize_lazily(source.adapter, rank=rank, dynamic=dynamic, param=param, max_rank=max_rank,
                                        conv_rank=conv_rank, device=device, precise=precise, out_dtype=computed)
        lineage = LineageSpec(op="resize", params={**lineage_rule(rule), **lineage_dtype(dtype)},
                              inputs=[LineageInput(kind="adapter", id=source.record.id, ref=source.record.ref)])
        default = rank_name(source.record.name, rule, (
            (min(m.product.shape) if m.product is not None else min(m.rank, m.B.shape[0], math.prod(m.A.shape[1:])),
             m.spatial) for m in source.adapter.modules.values()))
        return save(reg, resized, name=default if name is None else name, output=output, fmt=fmt, force=force,
                    base=source.record.base.id if source.record.base else None, lineage=lineage, dtype=dtype)


@watched("output")
@flags_checked
def export(ref: str, fmt: str, output: str, *, force: bool = False, base: str | None = None,
           dtype: "str | torch.dtype | None" = None, registry: "store.Registry | None" = None) -> ExportReport:
    """Write a registered adapter or a path in another layout (same deltas). Nothing is registered; ``base`` (a
    registered base) resolves kohya names of an unregistered file (and a VeRA file's layer widths, an AdaLoRA file's
    layer kinds). Reports where it went, the PEFT methods (adalora, vera) whose modules it wrote as the plain LoRA
    they equal — another adapter, of another identity, which only `register` records (`resize --rank <its rank>`
    converts with a lineage) — and the PEFT saved embedding layers it left out of a kohya or diffusers file, which
    hold the base's values (they replace nothing: the same ΔW, the same merge). ``dtype`` (bf16, fp16, fp32): the
    written tensors' (formats.write; default: as stored). ``registry``: as resize's."""
    from . import check
    from .formats import out_dtype, read_adapter, write_adapter
    from .registry.store import opened

    out_dtype(dtype)  # an unknown one refused before anything is read
    check_arguments(None, output, force, [ref])
    with opened(registry, create=False) as reg:
        check_output(reg, output, fmt, record=False)
        label = os.fspath(ref)  # (a Path was pydantic's raw ValidationError from the report)
        if path_exists(ref):
            adapter = read_adapter(ref)
            if base is not None:
                adapter = check.require_fit(adapter, reg.base_manifest(base), base_name=base)
        else:
            record = registered_for(reg, ref, base)
            adapter, label = reg.load_adapter(record.id), record.ref
            base = base or (record.base.name if record.base is not None else None)
        adapter = naming_base(reg, adapter, base)
        left_out = []
        if fmt != "peft":
            adapter, left_out = without_unchanged_layers(reg, adapter, fmt, base)
        if base is None and path_exists(ref):  # (a registered adapter takes --base only once recorded against it)
            refuse_unwritable(adapter, fmt, base_way_out=export_with_base(reg, adapter, ref, fmt, output, force))
    writable(adapter, fmt)
    with disk_named(Path(output).parent):  # (it said only "No space left on device", as no other writer did)
        written = write_adapter(adapter, output, fmt, force=force, dtype=dtype)
    return ExportReport(ref=label, format=fmt, output=str(written), plain_lora_of=list(adapter.methods),
                        left_out=list(left_out))


def naming_base(reg: "Registry", adapter: "Adapter", base: str | int | None) -> "Adapter":
    """``adapter`` with the base_model_name_or_path of ``base`` (a registered base's name or id) where it names none
    (a kohya file's, and what combine or resize made of one): what a PEFT config written of it says; of a base pulled
    from the Hub, with the commit it was pulled at (the config's revision)."""
    if adapter.base_model is not None or base is None:
        return adapter
    return named_for(adapter, reg.get_base(base))


def named_for(adapter: "Adapter", base: "BaseRecord") -> "Adapter":
    """``adapter`` with the base_model_name_or_path (base_model_name) and revision a PEFT config written of it says for
    ``base``: of a base pulled from the Hub, its repo id at the commit it was pulled at."""
    from .hub import parse_hub_source

    hub = parse_hub_source(base.source)
    return replace(adapter, base_model=base_model_name(base), base_revision=hub.revision if hub else None)


def base_model_name(base: "BaseRecord") -> str | None:
    """The base_model_name_or_path of a PEFT config written for an adapter bound to ``base`` that names none (a kohya
    file's): what AutoPeftModel.from_pretrained loads the base from. The Hub repo id of a base pulled from the Hub
    (loadable anywhere), else its folder (extract writes the tuned model's base so); None for a single-file
    checkpoint, which from_pretrained cannot load."""
    from .hub import parse_hub_source

    hub = parse_hub_source(base.source)
    if hub is not None:
        return hub.repo_id
    return base.path if base.path is not None and Path(base.path).is_dir() else None


def _repo_id(text: str) -> str | None:
    from .hub import parse_repo_ref

    with contextlib.suppress(InvalidInputError):
        return parse_repo_ref(text).repo_id
    return None


def export_with_base(reg: "Registry", adapter: "Adapter", ref: str, fmt: str, output: str, force: bool) -> str:
    """The commands that export ``ref`` bound to its base: `loraops export … --base NAME` with the registered base its
    PEFT config's base_model_name_or_path names (the bases it names, where it names several), else after the
    `loraops base add` that registers that model (a folder
    that exists, else a Hub id) under a name no other base holds, else after one for the base it was trained on
    (which only the user knows). The export is the one given (``force``: its --force), bound."""
    import shlex

    from .merging import free_name

    named = adapter.base_model
    bases = [b.name for b in reg.list_bases()
             if named and any(_names(named, n) for n in (b.name, b.source, b.path) if n)]
    export = (f"loraops export {shlex.quote(os.fspath(ref))} --format {fmt} -o {shlex.quote(os.fspath(output))}"
              f"{' --force' * force} --base ")
    if len(bases) == 1:
        return f"run `{export}{shlex.quote(bases[0])}`"
    if bases:  # (registered already: a base add of it would add nothing)
        return (f"its base_model_name_or_path {named!r} names the registered bases {', '.join(bases)}: run "
                f"`{export}NAME` with NAME the one it was trained on")
    if named and path_exists(Path(named).expanduser()):  # (expanded: the shell does not expand a quoted ~)
        add, name = shlex.quote(str(Path(named).expanduser())), free_name(reg, Path(named).expanduser())
    elif named and (repo_id := _repo_id(named)):
        add, name = f"hub:{repo_id}", free_name(reg, repo_id.split("/")[-1])
    else:
        return (f"register its base first, then run `{export}NAME` (`loraops base add <its base model's folder, or "
                "hub:OWNER/NAME> --name NAME`)")
    return f"run `loraops base add {add} --name {shlex.quote(name)}`, then `{export}{shlex.quote(name)}`"


def without_unchanged_layers(reg: "Registry", adapter: "Adapter", fmt: str,
                             base: str | None) -> tuple["Adapter", list[str]]:
    """``adapter`` without the PEFT saved embedding layers that hold the base's values, which a kohya or diffusers
    file cannot hold and which carry nothing; refused when any full tensor is left (formats.refuse_full_tensors)."""
    adapter, same = unchanged_layers_left_out(reg, adapter, base)
    if adapter.full_tensors:
        refuse_full_tensors(adapter, fmt, base=base)
    return adapter, same


def unchanged_layers_left_out(reg: "Registry", adapter: "Adapter",
                              base: "str | int | None") -> tuple["Adapter", list[str]]:
    """(``adapter`` without its PEFT saved embedding layers that hold the values of ``base`` (a registered base; None:
    none is known, nothing left out), the names left out): saved whole beside a LoRA on the embeddings
    (save_embedding_layers, on by default there), they replace nothing."""
    from .formats.peft import saved_layer_tensors

    if base is None or not saved_layer_tensors(adapter) & adapter.full_tensors.keys():
        return adapter, []
    from .basemodel import BaseModel
    from .engine import unchanged_saved_layers

    same = unchanged_saved_layers(BaseModel.open(reg.base_path(base)), adapter)
    return replace(adapter, full_tensors={n: t for n, t in adapter.full_tensors.items() if n not in same}), same


@contextlib.contextmanager
def models_of(reg: "Registry") -> Iterator[Callable[["BaseModel"], "tuple[BaseRecord, str | None]"]]:
    """``record_model`` for one command: (the record of a model, found in the registry by fingerprint or recorded
    now, manifest only, its files staying where they are; the name of the registered base whose files it is when
    they changed since: merging.record_read); the ones recorded are removed again if the command fails."""
    from .merging import record_read

    recorded: list[int] = []
    result = Landing()

    def made(done: "tuple[BaseRecord, bool]") -> None:  # as it commits: one a Ctrl-C cut there stayed recorded
        if done[1]:
            recorded.append(done[0].id)

    def record_model(model: "BaseModel") -> "tuple[BaseRecord, str | None]":
        record, _, changed = record_read(reg, model, told=made)
        return record, changed

    try:
        yield record_model
    except BaseException:
        for base_id in reversed(recorded if result.landed() is None else []):  # (as inputs_of)
            with contextlib.suppress(Exception):  # the command's own error is the one to report
                reg.remove_base(base_id)
        raise


@watched("output")
@flags_checked
def extract(
    base: str, tuned: str, *, rank: int | None = None, dynamic: str | None = None, param: float | None = None,
    max_rank: int | None = None, conv_rank: int | None = None, alpha: float | None = None,
    modules: Sequence[str] | None = None,
    save_modules: Sequence[str] | None = None, device: "str | torch.device" = "auto", precise: bool = False,
    dtype: "str | torch.dtype | None" = None,
    keep_rounding: bool = False, name: str | None = None, output: str | None = None, fmt: str | None = None,
    force: bool = False, registry: "store.Registry | None" = None,
) -> DerivedRecord:
    """Extract the LoRA adapter of ``tuned`` − ``base`` (registered bases or paths) and register it against the base,
    with lineage op "extract" (inputs: the base, role "base", and the tuned model, role "tuned", each recorded by
    manifest and fingerprint when given by an unregistered path); see loraops.extraction. ``registry``: as resize's."""
    from .fsutil import refuse_overlap
    from .hub import parse_hub_source
    from .merging import resolve_base
    from .extraction import extract_lazily
    from .registry.store import opened

    rule = algebra.resize_rule(rank, dynamic, param, max_rank, conv_rank, what="extract")
    base, tuned = argument(base, "base", *PATH), argument(tuned, "tuned", *PATH)
    check_arguments(name, output, force, [])
    with opened(registry) as reg, models_of(reg) as record_model:
        check_output(reg, output, fmt)
        (base_model, base_label), (tuned_model, tuned_label) = resolve_base(reg, base), resolve_base(reg, tuned)
        if output is not None:
            for model in (base_model, tuned_model):
                refuse_overlap(output, model.path, "a model it reads")
        derived = extract_lazily(base_model, tuned_model, rank=rank, dynamic=dynamic, param=param, max_rank=max_rank,
                                 conv_rank=conv_rank, alpha=alpha, modules=modules, save_modules=save_modules, device=device,
                                 precise=precise, dtype=dtype, keep_rounding=keep_rounding, fmt=fmt,
                                 labels=(base_label, tuned_label), output=output)
        (base_record, base_changed), (tuned_record, tuned_changed) = record_model(base_model), record_model(tuned_model)
        if parse_hub_source(base_record.source) is not None:
            # its Hub id at its commit (loadable anywhere), not the folder it was downloaded to (extract_lazily's)
            derived.adapter = named_for(derived.adapter, base_record)
        lineage = LineageSpec(op="extract", params={
            **lineage_rule(rule), "alpha": alpha, "modules": list(modules) if modules else None,
            "save_modules": list(save_modules) if save_modules else None, "precise": precise,
            **({"keep_rounding": True} if keep_rounding else {}),
            "dtype": dtype_name(derived.adapter.dtype),
        }, inputs=[LineageInput(kind="base", id=base_record.id, role="base", ref=base_record.name),
                   LineageInput(kind="base", id=tuned_record.id, role="tuned", ref=tuned_record.name)])
        default = rank_name(tuned_record.name, rule, ((min(m.B.shape[0], math.prod(m.A.shape[1:])), m.spatial)
                                                      for m in derived.adapter.modules.values()))
        result = save(reg, derived, name=default if name is None else name, output=output, fmt=fmt, force=force,
                      base=base_record.id, lineage=lineage)
    changed = [n for n in (base_changed, tuned_changed) if n is not None]
    return result.model_copy(update={"report": result.report.model_copy(update={"base_changed": changed})})
