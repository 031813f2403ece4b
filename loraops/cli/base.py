"""`loraops base add | list | show | rm`: base models the registry knows (their files stay where they are)."""
from __future__ import annotations

import click

from .adapters import _reader, _registry
from .hub import TOKEN_HELP, check_token
from .render import component_marks, echo_fields, echo_json, echo_table, human_bytes, json_option, not_again


@click.group()
def base() -> None:
    """Base models: manifest (tensor names, shapes, dtypes) and a fingerprint that ignores sharding."""


@base.command("add")
@click.argument("path", type=click.Path())
@click.option("--name", help="Registry name (default: the folder or file name).")
@click.option("--token", help=f"hub: only — {TOKEN_HELP}", callback=check_token)
@json_option("\"new\" (false: that model was registered already) and \"base\" (the BaseRecord)")
def add(path: str, name: str | None, token: str | None, as_json: bool) -> None:
    """Record a base model: an HF folder (sharded safetensors + index), a diffusers pipeline, or one .safetensors;
    or hub:OWNER/NAME[@REV], read from the safetensors headers on the Hub (weights downloaded on first use)."""
    if token is not None and not path.startswith("hub:"):  # (it was left unused)
        from ..errors import InvalidInputError

        raise InvalidInputError(f"{path}: --token is for a base added from the Hub (hub:OWNER/NAME); a path is read "
                                "from disk")
    def told(done) -> str | None:  # said as the record commits: a Ctrl-C then said "nothing was written"
        record, created = done
        return f"interrupted after base {record.name} was added" if created else None

    refuse_hub_id_as_path(path)
    with _registry() as reg:
        if path.startswith("hub:"):
            from .. import hub

            record, created = hub.add_base(reg, path, name=name, token=token, told=told)
        else:
            record, created = reg.register_base(path, name=name, told=told)
    if as_json:
        echo_json({"new": created, "base": record})
    elif created and record.path is None:
        click.echo(f"added base {record.name} (id {record.id}) from {record.source}: {record.num_tensors} tensors, "
                   f"{record.num_parameters:,} parameters, {record.dtype}; manifest only, weights download on first use"
                   + (", with HF_TOKEN or the saved login (the token given here is not kept)" if token else ""))
    elif created:
        click.echo(
            f"added base {record.name} (id {record.id}, fingerprint {record.fingerprint[:12]}): "
            f"{record.num_tensors} tensors, {record.num_parameters:,} parameters, {record.dtype}"
        )
    else:
        click.echo(f"already registered as base {record.name} (id {record.id}, fingerprint {record.fingerprint[:12]})"
                   + not_again(name, record.name, "model (its fingerprint)"))


def refuse_hub_id_as_path(path: str) -> None:
    """A Hub model named without `hub:` (`base add meta/llama`, as `pull` takes a repo, or the hf:// or URL form a
    user copies) said only "no such file or folder"."""
    import os

    from ..errors import LoraopsError, NotFoundError
    from ..hub import parse_repo_ref

    if path.startswith("hub:") or os.path.lexists(path):
        return
    try:
        ref = parse_repo_ref(path)
    except LoraopsError:
        return
    if "/" in ref.repo_id:
        raise NotFoundError(f"{path}: no such file or folder; a base on the Hub is added as hub:{ref}")


@base.command("list")
@json_option("a list of BaseRecords")
def list_bases(as_json: bool) -> None:
    """List registered base models."""
    with _reader() as reg:
        records = reg.list_bases()
    if as_json:
        echo_json(records)
        return
    echo_table(
        ["id", "name", "tensors", "params", "dtype", "size", "fingerprint", "source"],
        [(r.id, r.name, r.num_tensors, f"{r.num_parameters:,}", r.dtype, human_bytes(r.total_bytes), r.fingerprint[:12],
          r.source) for r in records],
    )


@base.command("show")
@click.argument("ref")
@json_option("the BaseRecord")
def show(ref: str, as_json: bool) -> None:
    """Show a base model: by name, id, or fingerprint prefix."""
    from pathlib import Path

    with _reader() as reg:
        r = reg.get_base(ref)
    if r.path is not None and not Path(r.path).exists():  # (only the manifest is recorded: a merge needs the files)
        click.echo(f"note: base {r.name}: its files at {r.path} are missing (moved? `loraops base add` them where they "
                   "are now: the record follows them)", err=True)
    if as_json:
        echo_json(r)
        return
    fields = [
        ("name", r.name), ("id", r.id), ("fingerprint", r.fingerprint), ("source", r.source), ("path", r.path or "-"),
        ("tensors", r.num_tensors), ("parameters", f"{r.num_parameters:,}"), ("dtype", r.dtype),
        ("size", human_bytes(r.total_bytes)), ("derived", "yes" if r.derived else "no"),
        ("created", r.created.isoformat(timespec="seconds")),
    ]
    if r.lineage:
        # (an adapter merged into one pipeline component alone has that component as its role: merging._record)
        marks = component_marks([None if i.role == "adapter" else i.role
                                 for i in r.lineage.inputs if i.kind == "adapter"])[::-1]
        inputs = ", ".join(i.ref + (f"×{i.weight:g}" if i.weight is not None else "")
                           + (marks.pop() if i.kind == "adapter" else "") for i in r.lineage.inputs)
        fields.append(("lineage", f"{r.lineage.op}({inputs})"))
    echo_fields(fields)


@base.command("rm")
@click.argument("ref")
@click.option("--force", is_flag=True, help="Remove it even while adapters or lineage refer to it.")
@json_option("the BaseRecord removed")
def rm(ref: str, force: bool, as_json: bool) -> None:
    """Forget a base model (its files are not touched)."""
    with _registry(create=False) as reg:
        record = reg.remove_base(ref, force=force, told=lambda r: f"interrupted after base {r.name} was removed")
    if as_json:
        echo_json(record)
    elif record.path is None:  # a base from the Hub whose weights never came down
        click.echo(f"removed base {record.name} (id {record.id}); it had no files on disk (its manifest came from "
                   f"{record.source})")
    else:
        click.echo(f"removed base {record.name} (id {record.id}); its files at {record.path} are untouched")
