"""`loraops pull` and `loraops push`: the Hugging Face Hub as an extension of the registry."""
from __future__ import annotations

import click

from .adapters import registered_again
from .render import echo_json, json_option

TOKEN_HELP = "Hub token for this call (default: $HF_TOKEN, else the token saved by `hf auth login`)."


def check_token(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A token that cannot go in an HTTP header (`--token "$UNSET"`, a pasted newline) is bad input: the Hub client
    failed on it as 'cannot reach the Hub … Illegal header value'."""
    if value is not None and (not value.strip() or not value.isprintable()):
        from ..errors import InvalidInputError

        raise InvalidInputError("--token is empty or holds a control character (a newline?); leave it out to use "
                                "$HF_TOKEN or the token saved by `hf auth login`")
    return value.strip(" ") if value is not None else None  # (huggingface_hub drops $HF_TOKEN's blanks so)


@click.command()
@click.argument("repo", metavar="REPO[@REVISION]")
@click.option("--name", help="Registry name (default: the repo's name, then the adapter's path in the repo when it is "
                             "not the top-level adapter: REPO/loras/a, REPO/style). Another commit with other weights "
                             "becomes its next version.")
@click.option("--file", "subpath", metavar="PATH",
              help="The adapter inside the repo: a folder or a .safetensors file (or the PEFT adapter_config.json).")
@click.option("--base", metavar="BASE",
              help="A registered base the adapter must fit (links an adapter already registered to it).")
@click.option("--revision", help="A branch, tag or commit sha: the same as REPO@REVISION.")
@click.option("--token", help=TOKEN_HELP, callback=check_token)
@json_option("the PullRecord")
def pull(repo: str, name: str | None, subpath: str | None, base: str | None, revision: str | None, token: str | None,
         as_json: bool) -> None:
    """Download an adapter from the Hub (a branch, tag or commit; HF_HUB_OFFLINE=1: from the cache) and register
    it with source hf://REPO@COMMIT. Pulling an adapter that is already registered changes nothing. REPO may also be
    a recorded source hf://REPO@COMMIT/PATH or a Hub page's URL (…/tree/REVISION/PATH): PATH is then --file."""
    from .. import hub
    from ..registry import Registry

    with Registry.open() as registry:
        done = hub.pull(registry, repo, name=name, token=token, subpath=subpath, base=base, revision=revision)
    if as_json:
        echo_json(done)
        return
    asked = f"{done.repo_id}@{done.revision}" if done.revision else done.repo_id
    verb = "pulled" if done.new else "already registered:"
    again = "" if done.new else registered_again(done.adapter, name, done.linked, done.previous_base)
    click.echo(f"{verb} {asked} (commit {done.commit[:12]}) as {done.adapter.ref}{again}")
    click.echo(f"  source  {done.adapter.source}")
    click.echo(f"  files   {', '.join(done.files)}")


@click.command()
@click.argument("ref")
@click.argument("repo")
@click.option("--private", is_flag=True,
              help="Create the repo private; an existing repo must be private already (nothing is pushed to a public "
                   "one).")
@click.option("--revision", default="main", show_default=True, help="Branch to commit to (created from main if missing), or refs/pr/N: an open pull request.")
@click.option("--create-pr", is_flag=True, help="Open a pull request with the commit instead of committing to the branch.")
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya", "diffusers"]),
              help="Layout to upload (default: the adapter's own, byte for byte).")
@click.option("--token", help=TOKEN_HELP, callback=check_token)
@json_option("the PushRecord")
def push(ref: str, repo: str, private: bool, revision: str, create_pr: bool, fmt: str | None, token: str | None,
         as_json: bool) -> None:
    """Upload a registered adapter REF to the Hub repo REPO in one commit, with a model card (base model, ranks,
    alphas, target modules and, for a derived adapter, its lineage); a README.md of the repo's own is kept."""
    from .. import hub
    from ..registry import Registry

    with Registry.open(create=False) as registry:
        done = hub.push(registry, ref, repo, fmt=fmt, private=private, revision=revision, create_pr=create_pr,
                        token=token)
    if as_json:
        echo_json(done)
        return
    if done.changed or done.pr_url:
        click.echo(f"pushed {done.ref} ({done.format}) to {done.repo_id}@{done.revision}: commit {done.commit[:12]}")
    else:
        click.echo(f"nothing to push: {done.repo_id}@{done.revision} already holds {done.ref} ({done.format}), "
                   f"commit {done.commit[:12]}")
    click.echo(f"  files   {', '.join(done.files)}")
    if done.card_kept:
        click.echo(f"  card    {done.repo_id}@{done.revision} has its own README.md, not loraops's: kept, no model "
                   "card pushed")
    click.echo(f"  commit  {done.commit_url}")
    if done.pr_url:
        click.echo(f"  pull request  {done.pr_url}")
    elif create_pr:  # the Hub makes no commit, so no pull request, when the files are already there
        click.echo(f"  pull request  none: {done.repo_id}@{done.revision} already has these files")
