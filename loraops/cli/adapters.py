"""`loraops register | list | show | rm | check`: the adapter registry from the command line."""
from __future__ import annotations

import contextlib

import click

from . import FLOAT, INT
from ..landing import registered
from .render import (METHODS, PRODUCTS, echo_fields, echo_json, echo_modules, echo_table, human_bytes, json_option,
                     not_again, number, rank_alpha, scale_mode, to_jsonable, variants)


def _registry(create: bool = True):
    """The registry; ``create`` false for commands that add no record (see Registry.open)."""
    from ..registry import Registry

    return Registry.open(create=create)


def _reader():
    """Reads only (list, show): straight over the database driver when it can, without SQLAlchemy (reads.reader)."""
    from ..registry.reads import reader

    return reader()


def _base_label(record) -> str:
    return record.base.name if record.base else "-"


def tokens_phrase(token_rows: dict[str, int] | None) -> str:
    """`show`'s line for PEFT trainable tokens: "3 rows of model.embed_tokens.weight, 2 rows of lm_head.weight"."""
    if token_rows is None:
        return "not recorded (registered before loraops recorded them; `loraops verify` records them)"
    return ", ".join(f"{n} row{'s' if n != 1 else ''} of {tensor}" for tensor, n in token_rows.items()) or "-"


def format_label(record) -> str:
    """The format as `list` and `register` show it, with what else the adapter is: DoRA, LoHa/LoKr, AdaLoRA/VeRA,
    trainable tokens."""
    return (record.format + (" DoRA" if record.dora else "") + "".join(f" {PRODUCTS[p]}" for p in record.products)
            + "".join(f" {METHODS[m]}" for m in record.methods)
            + (" +tokens" if record.token_rows else ""))




def registered_again(record, name: str | None, linked: bool, previous_base) -> str:
    """What registering an adapter that is already registered did, beyond returning its record (register, pull)."""
    text = not_again(name, record.name, "adapter")
    if linked:
        text += f"; linked to base {record.base.name}" + (f" (was {previous_base.name})" if previous_base else "")
    return text


@click.command()
@click.argument("path", type=click.Path())
@click.option("--name", help="Registry name (default: the folder or file name). Same name, other bytes → next version.")
@click.option("--base", "base", metavar="BASE", help="Registered base it is for (it must fit); links (or re-links) an adapter already registered.")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="Tag it (repeatable).")
@click.option("--alpha", type=FLOAT, help="LoRA alpha: for a file that does not record one, or replacing the one it records (part of its identity).")
@json_option("\"new\" (false: registered already), \"adapter\" (the AdapterRecord), \"linked\" and "
             "\"previous_base\", as pull's")
def register(path: str, name: str | None, base: str | None, tags: tuple[str, ...], alpha: float | None,
             as_json: bool) -> None:
    """Register an adapter: a PEFT folder or a .safetensors file (PEFT, kohya or diffusers keys)."""
    with _registry() as reg:
        done = reg.register_adapter(path, name=name, base=base, tags=tags, alpha=alpha,
                                    told=registered(f"{path} was registered"))
    record = done.record
    if as_json:
        echo_json({"new": done.created, "adapter": record, "linked": done.linked, "previous_base": done.previous_base})
        return
    if not done.created:
        click.echo(f"already registered as {record.ref} (id {record.id}, sha256 {record.sha256[:12]})"
                   + registered_again(record, name, done.linked, done.previous_base))
        return
    rank, alpha = rank_alpha(record)
    click.echo(
        f"registered {record.ref} (id {record.id}, sha256 {record.sha256[:12]}): {format_label(record)}, "
        f"{len(record.modules)} modules, rank {rank}, alpha {alpha}, base {_base_label(record)}"
    )


@click.command("list")
@click.option("--base", metavar="BASE", help="Only adapters recorded against this base.")
@click.option("--rank", type=INT, help="Only adapters with a module of this rank.")
@click.option("--target", metavar="MODULE", help="Only adapters with a module named so (q_proj, c_attn, ...).")
@click.option("--tag", metavar="TAG", help="Only adapters with this tag.")
@click.option("--name", help="Only versions of this name.")
@json_option("a list of AdapterRecords")
def list_adapters(base: str | None, rank: int | None, target: str | None, tag: str | None, name: str | None,
                  as_json: bool) -> None:
    """List registered adapters (every version)."""
    with _reader() as reg:
        records = reg.list_adapters(base=base, rank=rank, target=target, tag=tag, name=name, modules=as_json)
        spans = {} if as_json else reg.spans([r.id for r in records if r.rank is None or r.alpha is None])
    if as_json:
        echo_json(records)
        return
    echo_table(
        ["id", "name", "format", "rank", "alpha", "modules", "params", "base", "tags", "sha256"],
        [
            (r.id, r.ref, format_label(r), number(r.rank, r.num_modules, spans.get(r.id, ((), ()))[0]),
             number(r.alpha, r.num_modules, spans.get(r.id, ((), ()))[1]), r.num_modules, f"{r.num_parameters:,}",
             _base_label(r), ",".join(r.tags), r.sha256[:12])
            for r in records
        ],
    )


def stored_damage(record) -> str | None:
    """What a stat finds wrong with a registered adapter's stored copy: missing, or not the size recorded (the sum
    of its files'); None when it looks intact (only `verify`'s hashes tell that)."""
    from pathlib import Path

    path = Path(record.path)
    try:
        size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
    except OSError:
        return "is missing"
    return None if size == record.size else f"holds {size:,} bytes, {record.size:,} recorded"


@click.command()
@click.argument("ref")
@json_option("the AdapterRecord with \"lora_bias\" (PEFT's, from the stored file; null when it cannot be read)")
def show(ref: str, as_json: bool) -> None:
    """Show an adapter: by name (latest version), name@version, id, or sha256 prefix."""
    from ..errors import LoraopsError
    from ..formats.peft import has_lora_bias

    with _reader() as reg:
        r = reg.get_adapter(ref)
        # a conv row recorded before revision 0007 that it could not fill: its kernel read from the stored file, as
        # lora_bias, through the same reader (no writable open)
        if any(m.kind == "conv" and m.kernel is None for m in r.modules):
            with contextlib.suppress(OSError, LoraopsError):
                kernels = reg.module_kernels(r.id)
                r = r.model_copy(update={"modules": [m.model_copy(update={"kernel": m.kernel or kernels.get(m.name)})
                                                     for m in r.modules]})
    try:  # (the record alone has no lora_bias; a damaged store is verify's to hash, show still shows the record)
        biased = r.format == "peft" and has_lora_bias(r.path)
    except (OSError, LoraopsError):
        biased = None  # (unknown: null in the JSON, no line in the text)
    if damage := stored_damage(r):  # (what a stat tells, no hashing: the record's facts are no longer its files')
        click.echo(f"note: {r.ref}: its stored copy {r.path} {damage}; `loraops verify` checks every stored file, "
                   "registering its original again repairs it", err=True)
    if as_json:
        echo_json({**to_jsonable(r), "lora_bias": biased})
        return
    fields = [
        ("name", r.ref), ("id", r.id), ("sha256", r.sha256), ("weights sha256", r.weights_sha256),
        ("format", r.format), ("dtype", r.dtype), ("size", human_bytes(r.size)), ("modules", len(r.modules)),
        *zip(("rank", "alpha"), rank_alpha(r), strict=True),
        ("scale mode", scale_mode(r)),
        *variants(r, biased),
        *([("trainable tokens", tokens_phrase(r.token_rows))] if r.token_rows != {} else []),
        ("targets", ", ".join(r.target_modules) or "-"), ("parameters", f"{r.num_parameters:,}"),
        ("base", f"{r.base.name} ({r.base.fingerprint[:12]})" if r.base else "-"),
    ]
    if r.base_hint:
        fields.append(("base hint", r.base_hint))
    fields += [("tags", ", ".join(r.tags) or "-"), ("source", r.source or "-"), ("stored at", r.path),
               ("created", r.created.isoformat(timespec="seconds"))]
    if r.lineage:
        inputs = ", ".join(f"{i.ref}" + (f"×{i.weight:g}" if i.weight is not None else "") for i in r.lineage.inputs)
        fields.append(("lineage", f"{r.lineage.op}({inputs})"))
    echo_fields(fields)
    if r.modules:  # a trainable-tokens-only adapter has no LoRA module to tabulate
        click.echo()
        echo_modules(r.modules)


@click.command()
@click.argument("ref")
@click.option("--all", "all_versions", is_flag=True,
              help="Remove every version of the name (given alone, not name@version).")
@json_option("a list of the AdapterRecords removed")
def rm(ref: str, all_versions: bool, as_json: bool) -> None:
    """Remove an adapter (name = its latest version; name@version, id, sha256 prefix) and its stored copy."""
    with _registry(create=False) as reg:
        removed = reg.remove_adapter(ref, all_versions=all_versions)  # (it tells what an interruption then says)
    if as_json:
        echo_json(removed)
        return
    for r in removed:
        click.echo(f"removed {r.ref} (id {r.id}, sha256 {r.sha256[:12]})")


@click.command()
@click.argument("ref_or_path", required=False)
@click.option("--base", metavar="BASE", help="A registered base, or a base model path.")
@click.option("--transformer-2", "transformer_2", multiple=True, metavar="REF",
              help="An adapter to check against the second transformer of the Wan 2.2 pipeline --base "
                   "(transformer_2/), as merge --transformer-2 binds it; repeatable.")
@click.option("--alpha", type=FLOAT, help="LoRA alpha: for a file that does not record one, or replacing the one it records.")
@json_option("the CheckResult (a list of them, one per adapter, with --transformer-2)")
def check(ref_or_path: str | None, base: str | None, transformer_2: tuple[str, ...], alpha: float | None,
          as_json: bool) -> None:
    """Check that an adapter fits a base: every module by name and shape, or each mismatch.

    Without --base: against the adapter's recorded base; when it has none, against every registered base."""
    from ..check import SECOND_TRANSFORMER, UNTIED_FAMILIES, check_paths, fit_counts, made_for, misfits
    from ..errors import MismatchError
    from ..fsutil import path_exists

    if ref_or_path is None and not transformer_2:
        raise click.UsageError("give the adapter to check (REF_OR_PATH), or --transformer-2 ones")
    given = [(ref, False) for ref in [ref_or_path] if ref is not None] + [(ref, True) for ref in transformer_2]
    if base is not None and path_exists(base) and all(path_exists(ref) for ref, _ in given):  # (no registry to open)
        results = [check_paths(ref, base, alpha=alpha, component=SECOND_TRANSFORMER if second else None)
                   for ref, second in given]
    else:
        with _registry(create=False) as reg:
            results = [reg.check_adapter(ref, base, alpha=alpha, transformer_2=second) for ref, second in given]
    if as_json:
        echo_json(results if transformer_2 else results[0])
    else:
        for result in results:
            for report in result.reports:
                verdict = "fits" if report.ok else "does not fit"
                click.echo(f"{result.ref} {verdict} {report.base_ref}: {fit_counts(report)} match")
                if report.tied_heads:
                    click.echo(f"  {', '.join(report.tied_heads)}: tied to the input embeddings in this base (not "
                               "stored, or stored as a copy of them); a merge writes it untied (an encoder-decoder "
                               f"model's only where loraops unties it: {UNTIED_FAMILIES}; a T5-family one's inside "
                               "BLIP-2 or InstructBLIP too)")
                if not report.ok:
                    for problem in misfits(report):
                        click.echo(f"  {problem}")
    for result in results:
        if not result.reports:
            raise MismatchError(f"{result.ref}: no base to check against (give --base, or `loraops base add` one)")
        if not result.fits:
            if len(result.reports) == 1:
                raise MismatchError(f"{result.ref} does not fit base {result.reports[0].base_ref}"
                                    f"{made_for(result.base_hint, result.reports[0])}")
            raise MismatchError(f"{result.ref} fits none of the {len(result.reports)} registered bases")
