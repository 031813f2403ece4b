"""`loraops gc | verify`: keep the blob store honest."""
from __future__ import annotations

import click

from . import SECONDS
from .adapters import _registry
from .render import echo_json, human_bytes, json_option


@click.command()
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--grace", type=SECONDS, default=3600, show_default=True, metavar="SECONDS",
              help="Keep anything younger than this (a registration may be in progress).")
@json_option("the GcReport")
def gc(dry_run: bool, grace: float, as_json: bool) -> None:
    """Remove stored adapter files no record uses, and leftovers of interrupted copies."""
    from ..records import GcItem, GcReport
    from ..registry.store import refuse_bad_grace

    refuse_bad_grace(grace, "--grace")  # (before the registry is opened)
    with _registry(create=False) as reg:
        found = reg.gc(grace_s=grace, dry_run=dry_run)  # (it tells what an interruption then says)
    if as_json:
        echo_json(GcReport(dry_run=dry_run, items=[GcItem(path=str(path), size=size) for path, size in found],
                           size=sum(size for _, size in found)))
        return
    verb = "would remove" if dry_run else "removed"
    for path, _ in found:
        click.echo(f"{verb} {path}")
    click.echo(f"{verb} {len(found)} item(s), {human_bytes(sum(size for _, size in found))}")


@click.command()
@json_option("the VerifyReport")
def verify(as_json: bool) -> None:
    """Re-hash every stored adapter file; exit non-zero when any is missing or changed, or when a stored adapter's
    folder holds a file none of its records does (put there since: remove it)."""
    from ..errors import RegistryError
    from ..records import VerifyReport
    from ..registry.store import UNRECORDED

    with _registry(create=False) as reg:
        problems = reg.verify()
        count = len(reg.list_adapters(modules=False))
    pulled = {p.ref: p.pull_again for p in problems if p.pull_again}  # (they have no original on disk)
    if as_json:  # (the error line below still says what is wrong, on stderr, with its exit status)
        echo_json(VerifyReport(ok=not problems, adapters=count, problems=problems))
    else:
        for p in problems:
            click.echo(f"{p.ref}: {p.file}: {p.problem}")
        for adapter, again in pulled.items():
            click.echo(f"{adapter}: pulled from the Hub: `{again}` downloads it again")
    extra, said = sum(p.problem == UNRECORDED for p in problems), []
    if len(problems) > extra:
        said.append(f"{len(problems) - extra} stored file(s) missing or changed; re-register those adapters from their "
                    "originals" + (", or pull again those from the Hub" if pulled else ""))
    if extra:
        said.append(f"{extra} file(s) in stored adapter folders that no record holds; remove them")
    if said:
        raise RegistryError("; ".join(said))
    if not as_json:
        click.echo(f"all stored files of {count} adapter(s) match their sha256")
