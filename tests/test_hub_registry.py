"""pull / push wired to the registry, library and CLI, against the local Hub over real HTTP."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from loraops import formats, hub
from loraops.cli import main
from loraops.errors import FormatError, HubError, InvalidInputError, NotFoundError
from loraops.fsutil import TMP_MARK
from loraops.records import LineageInput, LineageSpec
from loraops.registry import Registry

pytestmark = pytest.mark.registry_backend  # the registry's own code: run on PostgreSQL too (conftest.py)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny Llama base and three PEFT adapters made by peft on it."""
    from factories import peft_adapter, tiny_llama

    root = tmp_path_factory.mktemp("hub-adapters")
    base = tiny_llama(root / "base")
    return {
        "base": base,
        "a": peft_adapter(base, root / "a", seed=1, r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": peft_adapter(base, root / "b", seed=2, r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        "c": peft_adapter(base, root / "c", seed=3, r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
    }


@pytest.fixture
def registry():
    with Registry.open() as reg:
        yield reg


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


def test_pull_registers_with_source_and_versions(fake_hub, adapters, registry):
    first = fake_hub.commit_folder("someone/anime-lora", adapters["a"])
    fake_hub.tag("someone/anime-lora", "v1")
    pulled = hub.pull(registry, "someone/anime-lora")
    assert pulled.new and pulled.commit == first
    assert pulled.adapter.ref == "anime-lora@1"
    assert pulled.adapter.source == f"hf://someone/anime-lora@{first}"
    assert folder_bytes(Path(pulled.adapter.path)) == {
        n: b for n, b in folder_bytes(adapters["a"]).items() if n in ("adapter_config.json", "adapter_model.safetensors")}

    again = hub.pull(registry, "someone/anime-lora@v1")  # same commit: nothing changes
    assert not again.new and again.adapter.id == pulled.adapter.id
    assert len(registry.list_adapters()) == 1

    second = fake_hub.commit_folder("someone/anime-lora", adapters["b"])
    newer = hub.pull(registry, "someone/anime-lora")
    assert newer.new and newer.adapter.ref == "anime-lora@2"
    assert newer.adapter.source == f"hf://someone/anime-lora@{second}"
    assert hub.pull(registry, f"someone/anime-lora@{first}").adapter.ref == "anime-lora@1"


def test_push_then_pull_back_is_byte_identical(fake_hub, adapters, registry):
    local = registry.add_adapter(adapters["a"], name="anime-style")
    pushed = hub.push(registry, "anime-style", "me/anime-style", token="hf_owner")
    assert pushed.files == ["adapter_model.safetensors", "adapter_config.json", "README.md"]
    remote = fake_hub.files("me/anime-style")
    stored = folder_bytes(Path(local.path))
    assert remote["adapter_model.safetensors"] == stored["adapter_model.safetensors"]
    assert remote["adapter_config.json"] == stored["adapter_config.json"]
    assert remote["README.md"].decode().startswith("---\nlibrary_name: peft\n")
    assert f"hf://me/anime-style@{pushed.commit}" in registry.get_adapter("anime-style").tags

    back = hub.pull(registry, "me/anime-style")
    assert not back.new and back.adapter == registry.get_adapter(local.id)  # the same record
    download = hub.download_adapter("me/anime-style")
    assert folder_bytes(download.adapter_path) == {**stored, "README.md": remote["README.md"]}


def test_wrong_arguments_are_refused_before_any_request(fake_hub, adapters, registry):
    """A push to an id with no owner made the repo under the token's account (create_repo) and then failed with
    'not found'; a registry= that is no Registry, or a revision that is no string, was a raw AttributeError."""
    from loraops.errors import InvalidInputError

    registry.add_adapter(adapters["a"], name="style")
    with pytest.raises(InvalidInputError, match="^'bare' is not a Hub repo id to push to: give owner/name$"):
        hub.push(registry, "style", "bare", token="hf_owner")
    assert fake_hub.repos == {}
    for call in (lambda: hub.pull(None, "me/x"), lambda: hub.push("sqlite:///x.db", "style", "me/x")):
        with pytest.raises(InvalidInputError, match="^registry= takes a Registry"):
            call()
    for revision in (1, ["dev"]):
        with pytest.raises(InvalidInputError, match="is no branch"):
            hub.push(registry, "style", "me/x", revision=revision, token="hf_owner")
        with pytest.raises(InvalidInputError, match="is no branch"):
            hub.pull(registry, "me/x", revision=revision)
    assert fake_hub.repos == {}


def test_push_keeps_a_repos_own_readme_and_replaces_its_own_card(fake_hub, adapters, registry):
    """A push to an existing repo replaced its README.md — the owner's card, written by hand — with loraops's card,
    saying nothing (transformers' and PEFT's push_to_hub keep its text). It is kept, and the push says so; a card
    loraops pushed before is replaced, as it describes the adapter pushed then."""
    own = b"---\nlicense: mit\ntags:\n- lora\n---\n\n# My style\n\nTrained on my drawings; use weight 0.8.\n"
    fake_hub.commit("me/style", {"README.md": own}, branch="main")
    registry.add_adapter(adapters["a"], name="style")
    registry.add_adapter(adapters["b"], name="style")
    first = CliRunner().invoke(main, ["push", "style@1", "me/style", "--token", "hf_owner"])
    assert first.exit_code == 0, first.output
    assert first.output.splitlines()[1:3] == [
        "  files   adapter_model.safetensors, adapter_config.json",
        "  card    me/style@main has its own README.md, not loraops's: kept, no model card pushed"]
    assert fake_hub.files("me/style")["README.md"] == own
    assert hub.push(registry, "style@2", "me/style", token="hf_owner").card_kept

    ours = hub.push(registry, "style@1", "me/fresh", token="hf_owner")
    assert not ours.card_kept and ours.files[-1] == "README.md"
    again = hub.push(registry, "style@2", "me/fresh", token="hf_owner")
    assert not again.card_kept and again.changed
    card = fake_hub.files("me/fresh")["README.md"].decode()
    assert f"| sha256 | `{registry.get_adapter('style@2').weights_sha256}` |" in card


def test_another_adapter_file_beside_what_is_pushed_or_pulled_is_said(fake_hub, adapters, registry, tmp_path):
    """A push into a repo holding another adapter file (style.safetensors) left it holding two adapters, unsaid, and
    a pull of such a repo silently took the PEFT one (two bare .safetensors are refused as ambiguous): both say so."""
    registry.add_base(adapters["base"], name="tiny")
    registry.add_adapter(adapters["a"], name="anime", base="tiny")
    kohya = formats.write_adapter(registry.load_adapter("anime"), tmp_path / "style.safetensors", "kohya")
    fake_hub.commit("me/style", {"style.safetensors": kohya.read_bytes()})
    runner = CliRunner()
    pushed = runner.invoke(main, ["push", "anime", "me/style", "--token", "hf_owner"])
    assert pushed.exit_code == 0, pushed.output
    assert pushed.stderr == ("note: me/style@main also holds style.safetensors beside what was pushed, left as it was: "
                             "`loraops pull me/style` takes the PEFT adapter pushed now\n")
    fake_hub.commit("someone/both", {**fake_hub.files("me/style"), "style.safetensors": kohya.read_bytes()})
    pulled = runner.invoke(main, ["pull", "someone/both"])
    assert pulled.exit_code == 0, pulled.output
    assert pulled.stderr == ("note: someone/both: took the PEFT adapter at the top level (adapter_config.json + "
                             "adapter_model.safetensors); style.safetensors is there too: pull it with --file "
                             "style.safetensors\n")
    other = runner.invoke(main, ["pull", "me/style", "--file", "style.safetensors"])
    assert other.exit_code == 0 and other.stderr == "", other.output
    single = runner.invoke(main, ["push", "anime", "me/style", "--format", "kohya", "--token", "hf_owner"])
    assert single.exit_code == 0 and single.stderr == (
        "note: me/style@main also holds style.safetensors beside what was pushed, left as it was: `loraops pull "
        "me/style` asks which to take (--file anime.safetensors)\n"), single.output
    alone = runner.invoke(main, ["push", "anime", "me/alone", "--token", "hf_owner"])
    assert alone.exit_code == 0 and alone.stderr == ""


def test_an_adapter_registered_from_another_repo_or_pushed_pulls_again_offline(fake_hub, adapters, registry,
                                                                               monkeypatch):
    """s/a and s/b hold the same adapter: `pull s/b@v1` answered "already registered … as a@1", and the same pull
    offline then said "not in the local Hub cache … pull it once online first" (the download went to the blob store,
    not the cache). The other repo's source is now a tag of the record, found as its source is; and what push
    tagged pulls offline too."""
    import json

    files = {p.name: p.read_bytes() for p in adapters["a"].iterdir()}
    config = json.loads(files["adapter_config.json"])
    fake_hub.commit("s/a", {**files, "adapter_config.json": json.dumps({**config, "base_model_name_or_path": "x"}).encode()})
    commit = fake_hub.commit("s/b", files)
    fake_hub.tag("s/b", "v1")
    first = hub.pull(registry, "s/a")
    again = hub.pull(registry, "s/b@v1")
    assert not again.new and again.adapter.id == first.adapter.id
    assert again.adapter.tags == [f"hf://s/b@{commit}"] and again.adapter.source == first.adapter.source
    registry.add_adapter(adapters["c"], name="mine")
    pushed = hub.push(registry, "mine", "me/mine", token="hf_owner")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for repo, record in (("s/b@v1", first.adapter), (f"s/b@{commit[:8]}", first.adapter),
                         ("me/mine", registry.get_adapter("mine"))):
        offline = CliRunner().invoke(main, ["pull", repo])
        assert offline.exit_code == 0 and offline.stdout.startswith(f"already registered: {repo} ") and \
            offline.stdout.splitlines()[0].endswith(f" as {record.ref}"), (repo, offline.output, pushed.commit)
    assert [a.ref for a in registry.list_adapters()] == [first.adapter.ref, "mine@1"]


def test_push_other_format_private_branch_pr(fake_hub, adapters, registry):
    registry.add_base(adapters["base"], name="tiny")
    registry.add_adapter(adapters["a"], name="anime", base="tiny")
    done = hub.push(registry, "anime", "me/kohya", fmt="kohya", private=True, revision="dev", token="hf_owner")
    assert done.files == ["anime.safetensors", "README.md"] and done.revision == "dev"
    assert fake_hub.repos["me/kohya"].private
    card = fake_hub.files("me/kohya", "dev")["README.md"].decode()
    assert "library_name" not in card and '- "kohya"' in card
    assert "main" in fake_hub.repos["me/kohya"].branches and "anime.safetensors" not in fake_hub.files("me/kohya")

    pr = hub.push(registry, "anime", "me/kohya", create_pr=True, token="hf_owner")
    assert pr.pr_url.endswith("/me/kohya/discussions/1")
    assert "adapter_model.safetensors" in fake_hub.files("me/kohya", "refs/pr/1")


def test_push_writes_the_version_it_looked_up_when_another_lands_meanwhile(fake_hub, adapters, registry,
                                                                             monkeypatch):
    """push resolves REF once: a version registered under the same name after the lookup (another process) is not
    the one written in another layout under the first one's record and card."""
    registry.add_base(adapters["base"], name="tiny")
    first = registry.add_adapter(adapters["a"], name="anime", base="tiny")
    looked_up = registry.get_adapter

    def get_adapter_then_a_new_version_lands(ref):
        record = looked_up(ref)
        monkeypatch.setattr(registry, "get_adapter", looked_up)
        registry.add_adapter(adapters["c"], name="anime", base="tiny")
        return record

    monkeypatch.setattr(registry, "get_adapter", get_adapter_then_a_new_version_lands)
    hub.push(registry, "anime", "me/anime", fmt="kohya", token="hf_owner")
    assert registry.get_adapter("anime").version == 2  # the new version did land
    from safetensors.torch import load

    pushed = load(fake_hub.files("me/anime")["anime.safetensors"])
    assert {t.shape[0] for k, t in pushed.items() if k.endswith("lora_down.weight")} == {first.rank} == {4}


def test_a_removed_inputs_card_line_says_what_is_known(fake_hub, adapters, registry):
    """An input removed from the registry keeps its label and sha256 in the lineage; the card says it was removed,
    with them (its Hub source went with its record), where it showed a sha256 as if it were a local file. A base
    input added from the Hub shows its hf:// source, as an adapter pulled does."""
    fake_hub.commit_folder("someone/style", adapters["a"])
    base_commit = fake_hub.commit_folder("meta/tiny", adapters["base"])
    style = hub.pull(registry, "someone/style").adapter
    base, _ = hub.add_base(registry, "hub:meta/tiny")
    derived = registry.add_adapter(adapters["c"], name="mix", lineage=LineageSpec(
        op="linear", inputs=[LineageInput(kind="adapter", id=style.id, weight=0.7),
                             LineageInput(kind="base", id=base.id, role="base")]))
    registry.remove_adapter(style.ref)
    hub.push(registry, derived.ref, "me/mix", token="hf_owner")
    card = fake_hub.files("me/mix")["README.md"].decode()
    assert f"| style@1 | 0.7 | removed from the registry; sha256 {style.sha256[:16]}… |" in card, card
    assert f"| tiny | 1 | hf://meta/tiny@{base_commit} |" in card, card


def test_push_to_an_open_pull_request(fake_hub, adapters, registry):
    """`--revision refs/pr/N` adds a commit to that open pull request (huggingface_hub's create_commit(revision=
    "refs/pr/N")), not a branch of that name; main stays as it was, and no tag is recorded (as for --create-pr)."""
    registry.add_adapter(adapters["a"], name="anime")
    registry.add_adapter(adapters["b"], name="other")
    hub.push(registry, "anime", "me/prs", token="hf_owner")
    main_files = fake_hub.files("me/prs")
    opened = hub.push(registry, "other", "me/prs", create_pr=True, token="hf_owner")
    code = CliRunner().invoke(main, ["push", "anime", "me/prs", "--revision", "refs/pr/1", "--token", "hf_owner"])
    assert code.exit_code == 0, code.output
    head = fake_hub.repos["me/prs"].prs[1]
    assert head != opened.commit and code.output.splitlines()[0] == (
        f"pushed anime@1 (peft) to me/prs@refs/pr/1: commit {head[:12]}")
    assert code.output.splitlines()[-1].endswith("/me/prs/discussions/1")
    assert fake_hub.files("me/prs", "refs/pr/1") == main_files  # anime again, over other in the PR
    assert fake_hub.files("me/prs") == main_files and set(fake_hub.repos["me/prs"].branches) == {"main"}
    assert f"hf://me/prs@{head}" not in registry.get_adapter("anime").tags

    missing = CliRunner().invoke(main, ["push", "anime", "me/prs", "--revision", "refs/pr/7", "--token", "hf_owner"])
    assert missing.exit_code == 3 and missing.output == (
        "error: me/prs has no pull request 7: open one with --create-pr (refs/pr/N pushes to an open one)\n")
    both = CliRunner().invoke(main, ["push", "anime", "me/prs", "--revision", "refs/pr/1", "--create-pr",
                                     "--token", "hf_owner"])
    assert both.exit_code == 2 and both.output.startswith("error: --create-pr opens a new pull request"), both.output
    absent = CliRunner().invoke(main, ["push", "anime", "me/none", "--revision", "refs/pr/1", "--token", "hf_owner"])
    assert absent.exit_code == 3 and absent.output.startswith("error: repository me/none not found on "), absent.output
    assert "me/none" not in fake_hub.repos  # (no repo made, public, only to find it has no pull request)


@pytest.mark.parametrize("status, delete_ref, hint", [
    ("closed", False, "reopen it on the Hub or open another with --create-pr"),
    ("merged", False, "open another with --create-pr"),
    ("merged", True, "open another with --create-pr"),  # its ref deleted since, as the Hub offers
])
def test_push_to_a_closed_or_merged_pull_request_pushes_nothing(fake_hub, adapters, registry, status, delete_ref, hint):
    """A closed or merged pull request keeps its refs/pr/N (until someone deletes it) and took the commit: the push
    said `pushed` to a pull request nobody looks at any more. Its status is asked first; nothing is uploaded. A draft
    takes commits (that is what it is for); a discussion's number is no pull request."""
    registry.add_adapter(adapters["a"], name="anime")
    registry.add_adapter(adapters["b"], name="other")
    hub.push(registry, "anime", "me/prs", token="hf_owner")
    hub.push(registry, "other", "me/prs", create_pr=True, token="hf_owner")
    head = fake_hub.repos["me/prs"].prs[1]
    fake_hub.set_status("me/prs", 1, status, delete_ref=delete_ref)
    asked = len(fake_hub.requests)
    push = ["push", "anime", "me/prs", "--revision", "refs/pr/1", "--token", "hf_owner"]
    result = CliRunner().invoke(main, push)
    assert (result.exit_code, result.output) == (2, f"error: me/prs pull request 1 is {status}: nothing pushed; "
                                                    f"{hint}\n")
    assert fake_hub.repos["me/prs"].prs.get(1) == (None if delete_ref else head)
    assert not [r for r in fake_hub.requests[asked:] if r["method"] != "GET"]  # no preupload, upload or commit

    draft = fake_hub.open_pr("me/prs")
    fake_hub.set_status("me/prs", draft, "draft")
    assert CliRunner().invoke(main, push[:4] + [f"refs/pr/{draft}"] + push[5:]).exit_code == 0
    assert fake_hub.files("me/prs", f"refs/pr/{draft}") == fake_hub.files("me/prs")
    question = fake_hub.open_discussion("me/prs")
    asked = CliRunner().invoke(main, push[:4] + [f"refs/pr/{question}"] + push[5:])
    assert (asked.exit_code, asked.output) == (3, f"error: me/prs #{question} is a discussion, not a pull request: "
                                                  "open one with --create-pr (refs/pr/N pushes to an open one)\n")


def test_push_derived_adapter_renders_its_lineage(fake_hub, adapters, registry):
    style_commit = fake_hub.commit_folder("someone/style", adapters["a"])
    style = hub.pull(registry, "someone/style").adapter
    subject = registry.add_adapter(adapters["b"], name="subject")
    derived = registry.add_adapter(adapters["c"], name="style-subject", lineage=LineageSpec(
        op="linear", params={"density": 1.0},
        inputs=[LineageInput(kind="adapter", id=style.id, weight=0.7),
                LineageInput(kind="adapter", id=subject.id, weight=0.3)]))
    hub.push(registry, derived.ref, "me/combo", token="hf_owner")
    card = fake_hub.files("me/combo")["README.md"].decode()
    assert "## Lineage" in card and "by **linear** of:" in card
    assert f"| style@1 | 0.7 | hf://someone/style@{style_commit} |" in card
    assert f"| subject@1 | 0.3 | sha256 {subject.sha256[:16]}… |" in card
    assert "| rank | 8 |" in card and "| alpha | 16 |" in card and "| target modules | q_proj, v_proj |" in card


def test_cli_pull_push_and_errors(fake_hub, adapters):
    commit = fake_hub.commit_folder("someone/anime-lora", adapters["a"])
    fake_hub.tag("someone/anime-lora", "v1.2")
    runner = CliRunner()
    result = runner.invoke(main, ["pull", "someone/anime-lora@v1.2", "--name", "anime"])
    assert result.exit_code == 0, result.output
    assert result.output == (f"pulled someone/anime-lora@v1.2 (commit {commit[:12]}) as anime@1\n"
                             f"  source  hf://someone/anime-lora@{commit}\n"
                             "  files   adapter_config.json, adapter_model.safetensors, README.md\n")
    again = runner.invoke(main, ["pull", "someone/anime-lora", "--name", "anime"])
    assert again.output.startswith("already registered: someone/anime-lora (commit")
    assert runner.invoke(main, ["base", "add", str(adapters["base"]), "--name", "tiny"]).exit_code == 0
    linked = runner.invoke(main, ["pull", "someone/anime-lora", "--name", "other", "--base", "tiny"])
    assert linked.output.splitlines()[0] == (
        f"already registered: someone/anime-lora (commit {commit[:12]}) as anime@1; not registered again as 'other': "
        "one record per adapter, under its first name; linked to base tiny")

    pushed = runner.invoke(main, ["push", "anime", "me/anime", "--token", "hf_owner", "--json"])
    assert pushed.exit_code == 0, pushed.output
    assert '"repo_id": "me/anime"' in pushed.output
    again = runner.invoke(main, ["push", "anime", "me/anime", "--token", "hf_owner"])
    assert again.exit_code == 0 and again.output.startswith("nothing to push: me/anime@main already holds anime@1 (peft)")
    assert "No files have been modified" not in again.output
    unchanged = runner.invoke(main, ["push", "anime", "me/anime", "--token", "hf_owner", "--create-pr"])
    assert unchanged.exit_code == 0, unchanged.output
    assert unchanged.output.endswith("  pull request  none: me/anime@main already has these files\n")

    missing = runner.invoke(main, ["pull", "someone/nope"])
    assert missing.exit_code == 3
    assert missing.output.startswith("error: repository someone/nope not found on http://127.0.0.1:")
    forbidden = runner.invoke(main, ["push", "anime", "someone/anime", "--token", "hf_owner"])
    assert forbidden.exit_code == 7 and "forbids you to push to someone/anime@main" in forbidden.output
    escaping = runner.invoke(main, ["pull", "someone/anime-lora", "--file", "../evil.safetensors"])
    assert escaping.exit_code == 2 and "refusing file name '../evil.safetensors'" in escaping.output  # bad input
    bad = runner.invoke(main, ["pull", "not a repo"])
    assert bad.exit_code == 2 and bad.output == "error: 'not a repo' is not a Hub repo id (expected owner/name[@revision])\n"


@pytest.mark.parametrize("repo", ["someone/", "/someone", "someone/style/", "//someone", "/someone@main",
                                  "hub:someone/", "hf://someone/", "https://huggingface.co/someone/"])
def test_a_repo_id_with_an_empty_owner_or_name_is_refused_before_the_hub_is_asked(fake_hub, repo):
    """`pull someone/` and `pull /someone` were read as the bare name someone, and asked of the Hub."""
    fake_hub.commit("someone", {"style.safetensors": b"k" * 32})
    fake_hub.commit("someone/style", {"style.safetensors": b"k" * 32})
    asked = len(fake_hub.requests)
    result = CliRunner().invoke(main, ["pull", repo])
    assert (result.exit_code, result.output) == (2, f"error: {repo!r} is not a Hub repo id: a '/' begins or ends it "
                                                    "(expected owner/name[@revision])\n")
    assert len(fake_hub.requests) == asked and not hub.cache_dir().exists()


@pytest.mark.parametrize("repo", ["someone//style", "someone/style/x/y"])
def test_a_repo_id_with_more_than_one_slash_is_refused_before_the_hub_is_asked(fake_hub, repo):
    asked = len(fake_hub.requests)
    result = CliRunner().invoke(main, ["pull", repo])
    assert result.exit_code == 2 and result.output.startswith(f"error: {repo!r} is not a Hub repo id (expected "
                                                              "owner/name[@revision])")
    assert result.output.count("\n") == 1 and len(fake_hub.requests) == asked and not hub.cache_dir().exists()


@pytest.mark.parametrize("subpath", ["", "/"])
def test_a_file_option_that_names_nothing_is_refused_before_the_hub_is_asked(fake_hub, subpath):
    """`pull someone/style --file ""` was read as no --file: the Hub was asked for the repo's top level."""
    fake_hub.commit("someone/style", {"style.safetensors": b"k" * 32})
    asked = len(fake_hub.requests)
    result = CliRunner().invoke(main, ["pull", "someone/style", "--file", subpath])
    assert (result.exit_code, result.output) == (2, f"error: --file {subpath!r} names no file or folder in the repo; "
                                                    "leave it out for the adapter at the repo's top level\n")
    assert len(fake_hub.requests) == asked and not hub.cache_dir().exists()


def test_a_copied_url_or_hf_path_may_end_with_a_slash(fake_hub):
    assert hub.parse_repo_ref("https://huggingface.co/someone/style/") == hub.RepoRef("someone/style", None)
    assert hub.parse_repo_ref("hf://someone/style/") == hub.RepoRef("someone/style", None)


@pytest.mark.parametrize("args, message", [
    (["anime-lora"], "repository anime-lora not found on {url}: a Hub repo id is owner/name, and 'anime-lora' names "
                     "no owner"),
    (["owner/missing"], "repository owner/missing not found on {url} (if it is private, log in with `hf auth login`, "
                        "set HF_TOKEN or pass --token)"),
    (["someone/style@v9"], "someone/style@v9: revision not found (use a branch, a tag or a commit sha)"),
    (["someone/style", "--file", "gone.safetensors"], "someone/style: no file or folder gone.safetensors in the repo; "
                                                      "it holds: .gitattributes, style.safetensors"),
])
def test_a_pull_of_what_the_hub_does_not_hold_says_so_in_one_line(fake_hub, args, message):
    """`pull anime-lora` (no owner) said "the Hub answered 404: Sorry, we can't find the page you are looking for
    (/api/models/anime-lora)", exit 7: the endpoint's page text, where the repository is simply not there."""
    fake_hub.commit("someone/style", {"style.safetensors": b"k" * 32})
    result = CliRunner().invoke(main, ["pull", *args])
    assert (result.exit_code, result.output) == (3, f"error: {message.format(url=fake_hub.url)}\n")


def test_cli_subprocess_saved_login_and_xet_default(fake_hub, adapters, tmp_path):
    """A fresh `python -m loraops` process: the token saved by `hf auth login` (HF_HOME/token) is used, and the
    upload works against an endpoint without Xet although HF_HUB_DISABLE_XET is not set (loraops.hub sets it)."""
    (Path(os.environ["HF_HOME"]) / "token").write_text("hf_owner")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_XET", "HF_TOKEN")}
    run = lambda *args: subprocess.run([sys.executable, "-m", "loraops", *args], env=env, capture_output=True,  # noqa: E731
                                       text=True, timeout=300)
    with Registry.open() as registry:
        registry.add_adapter(adapters["a"], name="anime")
    pushed = run("push", "anime", "me/anime")
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.startswith("pushed anime@1 (peft) to me/anime@main: commit ")
    assert "adapter_model.safetensors" in fake_hub.files("me/anime")


def test_forked_cli_turns_xet_off_like_a_fresh_process(fake_hub, adapters, monkeypatch):
    """loraops_run's child (tests/forkserver.py) gets the test's environment whole, replacing the server's, in which
    importing loraops.hub had set HF_HUB_DISABLE_XET: the child sets it again, as importing loraops.hub does in a fresh
    process, before huggingface_hub reads it; else the upload goes through Xet, which the local Hub does not speak."""
    from factories import loraops_run

    monkeypatch.delenv("HF_HUB_DISABLE_XET")
    monkeypatch.setenv("HF_TOKEN", "hf_owner")
    with Registry.open() as registry:
        registry.add_adapter(adapters["a"], name="anime")
    pushed = loraops_run("push", "anime", "me/anime")
    assert pushed.returncode == 0, pushed.stderr
    assert "adapter_model.safetensors" in fake_hub.files("me/anime")


def test_huggingface_hubs_own_offline_line_is_not_printed(fake_hub, adapters):
    """With a pulled adapter's ref in the cache, a Hub that cannot be reached made huggingface_hub's resolve_revision
    fall back on that ref, printing its own `Could not reach the Hub (…). Using cached commit hash for …` — also in a
    program that imported huggingface_hub with HF_HUB_OFFLINE=1 and unset it (its `offline mode is enabled`), while
    loraops, reading the environment at call time, asked the Hub. loraops's line is the only one; HF_HUB_OFFLINE=1
    is what uses the cache."""
    fake_hub.commit_folder("someone/a", adapters["a"])
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    cli = "import sys; from loraops.cli import main; sys.argv[0] = 'loraops'; main()"
    imported_offline = ("import os; os.environ['HF_HUB_OFFLINE'] = '1'; import huggingface_hub.constants; "
                        "del os.environ['HF_HUB_OFFLINE']; " + cli)

    def run(code, **more):
        return subprocess.run([sys.executable, "-c", code, "pull", "someone/a"], env={**env, **more},
                              capture_output=True, text=True, timeout=300)

    assert run(cli).returncode == 0
    down = run(cli, HF_ENDPOINT="http://127.0.0.1:9")
    assert (down.returncode, down.stdout) == (7, ""), down.stderr
    assert down.stderr.startswith("error: cannot reach the Hub at http://127.0.0.1:9 to resolve someone/a (") and \
        down.stderr.endswith("); set HF_HUB_OFFLINE=1 to use what is already in the local cache\n") and \
        len(down.stderr.splitlines()) == 1, down.stderr
    stale = run(imported_offline)
    assert (stale.returncode, stale.stdout) == (7, ""), stale.stderr
    assert stale.stderr.startswith(f"error: cannot reach the Hub at {fake_hub.url} to resolve someone/a (") and \
        "offline mode is enabled" in stale.stderr and len(stale.stderr.splitlines()) == 1, stale.stderr
    offline = run(cli, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    assert (offline.returncode, offline.stderr) == (0, ""), offline.stderr
    assert offline.stdout.startswith("already registered: someone/a (commit ")


def test_base_add_hub_manifest_only_then_weights_on_demand(fake_hub, adapters, registry):
    from loraops.basemodel import BaseModel

    fake_hub.commit_folder("meta/tiny", adapters["base"])
    runner = CliRunner()
    added = runner.invoke(main, ["base", "add", "hub:meta/tiny"])
    assert added.exit_code == 0, added.output
    commit = fake_hub.repos["meta/tiny"].branches["main"]
    local = BaseModel.open(adapters["base"])
    assert added.output == (f"added base tiny (id 1) from hf://meta/tiny@{commit}: {len(local.tensors)} tensors, "
                            f"{local.num_parameters:,} parameters, float32; manifest only, weights download on first "
                            "use\n")
    def base_weight_gets():
        return [r for r in fake_hub.downloads(".safetensors") if r["path"].startswith("/meta/tiny/")]

    assert all(r["range"] for r in base_weight_gets())  # headers only
    again = runner.invoke(main, ["base", "add", "hub:meta/tiny"])
    assert again.output.startswith("already registered as base tiny")

    # check works from the manifest alone, and pulled adapters bind to it
    assert registry.check_adapter(adapters["a"], "tiny").fits == ["tiny"]
    fake_hub.commit_folder("someone/a", adapters["a"])
    assert hub.pull(registry, "someone/a", base="tiny").adapter.base.name == "tiny"
    assert all(r["range"] for r in base_weight_gets())  # still no weights downloaded

    path = registry.base_path("tiny")  # a merge asks for the files: downloaded once, attached
    record = registry.get_base("tiny")
    assert record.path == str(path.resolve()) and record.fingerprint == local.fingerprint()
    assert any(r["range"] is None for r in base_weight_gets())
    assert registry.base_path("tiny") == path


def test_a_ctrl_c_as_base_add_hub_commits_says_the_base_was_added(fake_hub, adapters, monkeypatch, capsys):
    """`base add hub:` interrupted in the instant its manifest committed said "nothing was written" of a base the
    registry had recorded; it says the base was added, as `base add PATH` and pull do."""
    import factories
    from loraops.cli import exit_status

    fake_hub.commit_folder("meta/tiny", adapters["base"])
    capsys.readouterr()
    factories.interrupted_as_a_write_commits(monkeypatch)
    assert exit_status(["base", "add", "hub:meta/tiny"]) == 130
    assert capsys.readouterr().err == "error: interrupted after base tiny was added\n"
    with Registry.open() as reg:
        assert [b.name for b in reg.list_bases()] == ["tiny"]


def test_an_offline_base_needs_its_weights_in_the_cache_and_no_other_file(fake_hub, adapters, tmp_path, monkeypatch):
    """Offline, a Hub base's weights come from the cache snapshot of its commit (a download that ran online, or
    `hf download --include`): huggingface_hub was asked for the whole snapshot and called it incomplete for the
    repo's pytorch_model.bin, which loraops never downloads (or for the .gitattributes `hf download --include` left
    out), so the base was "not in the local Hub cache". It is asked for the safetensors weights, what loraops reads;
    a snapshot without all of them (a download stopped midway) is said to be only partly in the cache, and the base
    stays without files."""
    from huggingface_hub import snapshot_download

    files = {p.name: p.read_bytes() for p in adapters["base"].iterdir() if p.is_file()}
    commit = fake_hub.commit("meta/tiny", {**files, "pytorch_model.bin": b"a pickle"})
    runner = CliRunner()
    assert runner.invoke(main, ["base", "add", "hub:meta/tiny"]).exit_code == 0
    folder = Path(snapshot_download("meta/tiny", cache_dir=hub.cache_dir(), endpoint=fake_hub.url,
                                    allow_patterns=["*.safetensors", "*.json"]))
    (folder / "model.safetensors").rename(folder.parent / "aside")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    merge = ["merge", f"{adapters['a']}:0.5", "--into", "tiny", "-o"]
    partly = runner.invoke(main, merge + [str(tmp_path / "m1")])
    assert (partly.exit_code, partly.output) == (3, (
        f"error: meta/tiny@{commit} is only partly in the local Hub cache ({hub.cache_dir()}) and HF_HUB_OFFLINE=1 "
        "is set; its weights download on first use: run this once online first\n"))
    with Registry.open() as reg:
        assert reg.get_base("tiny").path is None
    (folder.parent / "aside").rename(folder / "model.safetensors")
    merged = runner.invoke(main, merge + [str(tmp_path / "m2")])
    assert merged.exit_code == 0, merged.output
    with Registry.open() as reg:
        assert reg.get_base("tiny").path == str(folder.resolve())


def test_an_offline_sharded_base_needs_the_files_that_say_how_to_read_its_weights(fake_hub, adapters, tmp_path,
                                                                                 monkeypatch):
    """Offline, a Hub base's snapshot needs its weights and what loraops reads beside them: the safetensors index and
    config.json (its tied head, FP8 scales, and the merged model's own config). A snapshot without config.json (`hf
    download --include "*.safetensors" "*.index.json"`, or a download stopped midway) was taken: the merge wrote a
    model without config.json, computed without the base's config. A snapshot without its index is partly there
    too (it was "not in the local Hub cache"). The Hub is not asked for anything offline."""
    from factories import tiny_llama
    from huggingface_hub import hf_hub_download, snapshot_download

    base = tiny_llama(tmp_path / "sharded", shard_size="100KB")
    files = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    assert len([n for n in files if n.endswith(".safetensors")]) > 1
    commit = fake_hub.commit("meta/sharded", files)
    runner = CliRunner()
    assert runner.invoke(main, ["base", "add", "hub:meta/sharded"]).exit_code == 0
    folder = Path(snapshot_download("meta/sharded", cache_dir=hub.cache_dir(), endpoint=fake_hub.url,
                                    allow_patterns=["*.safetensors", "*.index.json"]))
    (folder / "config.json").unlink()  # (base add read it: its transformers_weights)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    merge = ["merge", f"{adapters['a']}:0.5", "--into", "sharded", "-o"]
    partly = (f"error: meta/sharded@{commit} is only partly in the local Hub cache ({hub.cache_dir()}) and "
              "HF_HUB_OFFLINE=1 is set; its weights download on first use: run this once online first\n")
    result = runner.invoke(main, merge + [str(tmp_path / "m1")])
    assert (result.exit_code, result.output) == (3, partly)
    assert not (tmp_path / "m1").exists()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hf_hub_download("meta/sharded", "config.json", revision=commit, cache_dir=hub.cache_dir(), endpoint=fake_hub.url)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.rename(tmp_path / "aside")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = len(fake_hub.requests)
    result = runner.invoke(main, merge + [str(tmp_path / "m2")])
    assert (result.exit_code, result.output) == (3, partly)
    (tmp_path / "aside").rename(shard)
    (folder / "model.safetensors.index.json").rename(tmp_path / "aside")
    result = runner.invoke(main, merge + [str(tmp_path / "m3")])
    assert (result.exit_code, result.output) == (3, partly)
    (tmp_path / "aside").rename(folder / "model.safetensors.index.json")
    result = runner.invoke(main, merge + [str(tmp_path / "m3")])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "m3").iterdir()} >= {"config.json", "model.safetensors.index.json"}
    assert len(fake_hub.requests) == asked  # (offline: the index is read from the cache, nothing asked)


def test_an_offline_pull_of_a_ref_moved_to_a_partial_snapshot(fake_hub, adapters, registry, monkeypatch):
    """Another tool's download that stopped midway moved the branch's ref (huggingface_hub writes refs/ before it
    downloads) to a commit whose snapshot lacks the adapter's weights: an offline pull says so, and does not go
    around the ref to the older snapshot it has in full (the branch is not there any more)."""
    from huggingface_hub import snapshot_download

    fake_hub.commit_folder("someone/x", adapters["a"])
    snapshot_download("someone/x", cache_dir=hub.cache_dir(), endpoint=fake_hub.url)
    fake_hub.commit_folder("someone/x", adapters["b"])
    folder = Path(snapshot_download("someone/x", cache_dir=hub.cache_dir(), endpoint=fake_hub.url))
    (folder / "adapter_model.safetensors").unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(main, ["pull", "someone/x"])
    assert (result.exit_code, result.output) == (3, (
        f"error: someone/x is only partly in the local Hub cache ({hub.cache_dir()}) and HF_HUB_OFFLINE=1 is set; "
        "pull it once online first\n"))
    assert not registry.list_adapters()


def test_an_offline_pull_of_files_fetched_one_by_one(fake_hub, adapters, registry, monkeypatch):
    """An adapter's files fetched one by one (hf_hub_download, as PEFT's from_pretrained does) leave no repo listing in
    the cache: offline, the snapshot's complete top-level PEFT adapter is what a pull online takes first whatever else
    the repo holds, so it is pulled from there (it said the repo was not in the local Hub cache), and registered as an
    online pull registers it: the same record, source hf://REPO@COMMIT. The repo's README.md, which PEFT does not
    fetch, is not listed as pulled. `--file` naming a file of the snapshot is pulled from there too."""
    from huggingface_hub import hf_hub_download

    commit = fake_hub.commit_folder("someone/x", adapters["a"])
    assert "README.md" in fake_hub.files("someone/x")  # (what an online pull also fetches)
    online = hub.pull(registry, "someone/x")
    assert online.files == ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    registry.remove_adapter(online.adapter.id)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        hf_hub_download("someone/x", name, cache_dir=hub.cache_dir(), endpoint=fake_hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = len(fake_hub.requests)
    result = CliRunner().invoke(main, ["pull", "someone/x"])
    [offline] = registry.list_adapters()
    assert (result.exit_code, result.output) == (0, (
        f"pulled someone/x (commit {commit[:12]}) as {offline.ref}\n"
        f"  source  hf://someone/x@{commit}\n"
        "  files   adapter_config.json, adapter_model.safetensors\n"))
    registered = {"id", "version", "created"}  # (a version number is not used twice: this one is the next)
    assert registry.get_adapter(offline.id).model_dump(exclude=registered) == \
        online.adapter.model_dump(exclude=registered)
    assert len(fake_hub.requests) == asked

    registry.remove_adapter(offline.id)
    pulled = CliRunner().invoke(main, ["pull", "someone/x", "--file", "adapter_model.safetensors"])
    assert pulled.exit_code == 0, pulled.output
    assert registry.get_adapter("x").source == f"hf://someone/x@{commit}"


def snapshot_lacks(repo: str, lacking: str) -> str:
    """An offline pull's refusal of a cached snapshot that holds no complete adapter, saying what it lacks."""
    return (f"error: {repo} is only partly in the local Hub cache ({hub.cache_dir()}) and HF_HUB_OFFLINE=1 is set "
            f"({lacking}); pull it once online first\n")


def test_an_offline_pull_of_a_snapshot_without_the_weights(fake_hub, adapters, registry, monkeypatch):
    """Files fetched one by one, no listing cached, and only adapter_config.json among them (a fetch stopped before
    the weights): an offline pull says what the snapshot lacks, in one line, and registers nothing; so does --file
    naming a folder whose adapter is not there."""
    from huggingface_hub import hf_hub_download

    commit = fake_hub.commit_folder("someone/x", adapters["a"])
    hf_hub_download("someone/x", "adapter_config.json", cache_dir=hub.cache_dir(), endpoint=fake_hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(main, ["pull", "someone/x"])
    assert (result.exit_code, result.output) == (3, snapshot_lacks(
        "someone/x", f"its snapshot of commit {commit[:12]} has adapter_config.json but no adapter_model.safetensors"))
    result = CliRunner().invoke(main, ["pull", "someone/x", "--file", "loras/b"])
    assert (result.exit_code, result.output) == (3, snapshot_lacks(
        "someone/x", f"its snapshot of commit {commit[:12]} has no loras/b/adapter_config.json or "
        "loras/b/adapter_model.safetensors"))
    assert not registry.list_adapters()


def test_an_offline_pull_of_a_subfolder_fetched_one_by_one(fake_hub, adapters, registry, monkeypatch):
    """PEFT's from_pretrained(repo, subfolder=…) fetches loras/b/'s files one by one: with no listing, an offline pull
    cannot know that folder holds the repo's only adapter (what a pull online takes then), so it refuses and names
    it; `--file loras/b` pulls it, with the source an online pull records."""
    from huggingface_hub import hf_hub_download

    commit = fake_hub.commit_folder("someone/deep", adapters["a"], prefix="loras/b/")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        hf_hub_download("someone/deep", name, subfolder="loras/b", cache_dir=hub.cache_dir(), endpoint=fake_hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(main, ["pull", "someone/deep"])
    assert (result.exit_code, result.output) == (3, snapshot_lacks(
        "someone/deep", f"its snapshot of commit {commit[:12]} has no adapter_config.json or "
        "adapter_model.safetensors; the PEFT adapter in loras/b/ is pulled with --file loras/b"))
    result = CliRunner().invoke(main, ["pull", "someone/deep", "--file", "loras/b"])
    assert result.exit_code == 0, result.output
    assert registry.get_adapter("deep/loras/b").source == f"hf://someone/deep@{commit}/loras/b"


def test_a_private_hub_base_downloads_on_first_use_with_hf_token(fake_hub, adapters, tmp_path, monkeypatch):
    """`base add hub: --token` keeps no token (loraops stores none): it says so, and the first use that downloads the
    weights, refused without credentials, says how to give them (HF_TOKEN or the saved login), not `--token`, which
    `merge` has not; with HF_TOKEN set it downloads."""
    fake_hub.create("me/tiny", private=True)
    commit = fake_hub.commit_folder("me/tiny", adapters["base"])
    runner = CliRunner()
    added = runner.invoke(main, ["base", "add", "hub:me/tiny", "--token", "hf_owner"])
    assert added.exit_code == 0, added.output
    assert added.output.endswith("manifest only, weights download on first use, with HF_TOKEN or the saved login "
                                 "(the token given here is not kept)\n"), added.output
    merge = ["merge", f"{adapters['a']}:0.5", "--into", "tiny", "-o", str(tmp_path / "m")]
    refused = runner.invoke(main, merge)
    assert (refused.exit_code, refused.output) == (3, (
        f"error: repository me/tiny not found on {fake_hub.url} (if it is private, set HF_TOKEN or log in with "
        "`hf auth login`: base tiny's weights download on first use, and the token given to `base add --token` "
        "was not kept)\n"))
    monkeypatch.setenv("HF_TOKEN", "hf_owner")
    merged = runner.invoke(main, merge)
    assert merged.exit_code == 0, merged.output
    with Registry.open() as reg:
        assert reg.get_base("tiny").path == str(hub.cache_dir().resolve() / "models--me--tiny" / "snapshots" / commit)


def test_registry_base_path_downloads_a_private_base_with_the_token_given(fake_hub, adapters, registry):
    """`Registry.base_path(ref, token=…)` (Python's way to give the first-use download a token, as loraops keeps
    none) downloads with that token, HF_TOKEN unset; a token the Hub refuses is said as such, not as the token given
    to `base add --token` that was not kept."""
    fake_hub.create("me/tiny", private=True)
    commit = fake_hub.commit_folder("me/tiny", adapters["base"])
    hub.add_base(registry, "hub:me/tiny", token="hf_owner")
    with pytest.raises(NotFoundError) as refused:
        registry.base_path("tiny", token="hf_other")
    assert str(refused.value) == (f"repository me/tiny not found on {fake_hub.url} (if it is private, "
                                  "log in with `hf auth login`, set HF_TOKEN or pass token)")
    assert registry.base_path("tiny", token="hf_owner") == hub.cache_dir().resolve() / "models--me--tiny" / \
        "snapshots" / commit


def test_a_damaged_hub_cache_is_one_clear_line(fake_hub, adapters, tmp_path):
    """The Hub cache's `blobs` folder of a repo is a file (a damaged cache): a first-use download said the client's
    `[Errno 17] File exists: '…' (FileExistsError: [Errno 17] …)` as a Hub error (exit 7); it is the local cache."""
    fake_hub.commit_folder("meta/tiny", adapters["base"])
    runner = CliRunner()
    assert runner.invoke(main, ["base", "add", "hub:meta/tiny"]).exit_code == 0
    blobs = hub.cache_dir() / "models--meta--tiny" / "blobs"
    # (base add downloaded config.json into it, and the download reads it again first: its transformers_weights)
    shutil.rmtree(blobs, ignore_errors=True)
    blobs.parent.mkdir(parents=True, exist_ok=True)
    blobs.write_text("not a folder")
    merged = runner.invoke(main, ["merge", f"{adapters['a']}:0.5", "--into", "tiny", "-o", str(tmp_path / "m")])
    commit = fake_hub.repos["meta/tiny"].branches["main"]
    assert (merged.exit_code, merged.output) == (2, (
        f"error: cannot read meta/tiny@{commit}: {blobs} (or a folder above it) is a file where huggingface_hub "
        f"keeps a folder: the Hub cache ({hub.cache_dir()}) is damaged; move that file away and run this again\n"))
    assert not (tmp_path / "m").exists()


def test_show_prints_the_hub_source(fake_hub, adapters):
    commit = fake_hub.commit_folder("someone/anime-lora", adapters["a"])
    runner = CliRunner()
    assert runner.invoke(main, ["pull", "someone/anime-lora"]).exit_code == 0
    shown = runner.invoke(main, ["show", "anime-lora"])
    assert f"hf://someone/anime-lora@{commit}" in shown.output


def test_merge_into_a_hub_base_downloads_it_once(fake_hub, adapters, tmp_path):
    """`loraops merge --into` a base known only by its Hub manifest fetches the weights, then merges."""
    from safetensors.torch import load_file

    from loraops import engine
    from loraops.formats import read_adapter

    fake_hub.commit_folder("meta/tiny", adapters["base"])
    runner = CliRunner()
    assert runner.invoke(main, ["base", "add", "hub:meta/tiny", "--name", "tiny"]).exit_code == 0
    merged = runner.invoke(main, ["merge", f"{adapters['a']}:0.5", "--into", "tiny", "-o", str(tmp_path / "m")])
    assert merged.exit_code == 0, merged.output
    assert [r for r in fake_hub.downloads("model.safetensors") if r["range"] is None]  # the weights came down

    engine.merge(adapters["base"], [(read_adapter(adapters["a"]), 0.5)], tmp_path / "local")
    ours, local = load_file(str(tmp_path / "m/model.safetensors")), load_file(str(tmp_path / "local/model.safetensors"))
    assert ours.keys() == local.keys() and all(ours[k].equal(local[k]) for k in ours)
    again = runner.invoke(main, ["merge", f"{adapters['a']}:0.5", "--into", "tiny", "-o", str(tmp_path / "m2")])
    assert again.exit_code == 0, again.output
    assert len([r for r in fake_hub.downloads("model.safetensors") if r["range"] is None]) == 1  # cached


def test_a_hub_base_whose_weights_are_also_registered_locally_still_merges(fake_hub, adapters, tmp_path):
    """The downloaded weights' fingerprint is another base's (the same model added from a local folder): the two
    records cannot share it, but the files serve all the same (the merge was refused as a conflict)."""
    fake_hub.commit_folder("meta/tiny", adapters["base"])
    runner = CliRunner()
    assert runner.invoke(main, ["base", "add", "hub:meta/tiny", "--name", "tiny"]).exit_code == 0
    assert runner.invoke(main, ["base", "add", str(adapters["base"]), "--name", "local"]).exit_code == 0
    for name in ("tiny", "local"):
        merged = runner.invoke(main, ["merge", f"{adapters['a']}:0.5", "--into", name, "-o", str(tmp_path / name),
                                      "--no-record"])
        assert merged.exit_code == 0, merged.output
    assert (tmp_path / "tiny" / "model.safetensors").read_bytes() == (tmp_path / "local" / "model.safetensors").read_bytes()


def test_a_push_in_another_layout_replaces_the_adapter_pull_would_take(fake_hub, adapters, registry, tmp_path):
    """A repo holding a PEFT adapter gets a kohya push (on main, or on a new branch, which starts from main): the
    PEFT pair, which pull takes first, goes in the same commit, so pulling the pushed commit gives the pushed
    adapter (it gave the old one)."""
    registry.add_base(adapters["base"], name="tiny")
    registry.add_adapter(adapters["a"], name="old", base="tiny")
    registry.add_adapter(adapters["b"], name="new", base="tiny")
    hub.push(registry, "old", "me/mix", token="hf_owner")
    for revision in ("main", "kohya"):
        done = hub.push(registry, "new", "me/mix", fmt="kohya", revision=revision, token="hf_owner")
        held = set(fake_hub.files("me/mix", revision))
        assert "adapter_config.json" not in held and "adapter_model.safetensors" not in held and "new.safetensors" in held
        download = hub.download_adapter(f"me/mix@{done.commit}")
        assert formats.read_adapter(download.adapter_path).format == "kohya"


def test_pull_from_a_subfolder_records_where_it_came_from(fake_hub, adapters):
    fake_hub.commit_folder("someone/many", adapters["a"], prefix="loras/a/")
    commit = fake_hub.commit_folder("someone/many", adapters["b"], prefix="loras/b/")
    runner = CliRunner()
    several = runner.invoke(main, ["pull", "someone/many"])
    assert several.exit_code == 3 and several.output == (
        "error: someone/many: no adapter at the top level, but 2 PEFT adapter folders below it (loras/a, loras/b); "
        "pick one with --file FOLDER\n")
    pulled = runner.invoke(main, ["pull", "someone/many", "--file", "loras/b/adapter_model.safetensors"])
    assert pulled.exit_code == 0, pulled.output
    assert pulled.output.splitlines() == [f"pulled someone/many (commit {commit[:12]}) as many/loras/b@1",
                                          f"  source  hf://someone/many@{commit}/loras/b",
                                          "  files   loras/b/adapter_config.json, loras/b/adapter_model.safetensors, "
                                          "loras/b/README.md"]
    with Registry.open() as reg:
        assert reg.get_adapter("many/loras/b").source == f"hf://someone/many@{commit}/loras/b"


def test_adapters_at_other_paths_of_one_repo_are_other_adapters(fake_hub, adapters, registry, tmp_path, monkeypatch):
    """The default name was the repo's alone, so two unrelated adapters of one repo (`--file loras/b`, `--file
    style.safetensors`) became versions 1 and 2 of one adapter `loras`. Below the top level the name holds the
    adapter's path in the repo (as its source does, less .safetensors): each path is its own adapter, pulled again
    (online, offline, by its recorded source) it is found, and a newer commit of it is its next version."""
    from factories import kohya_file

    style = kohya_file(tmp_path / "style.safetensors", {"lora_unet_model_layers_0_self_attn_q_proj": ((64,), (64,))})
    fake_hub.commit_folder("someone/loras", adapters["a"])
    fake_hub.commit_folder("someone/loras", adapters["b"], prefix="loras/b/")
    first = fake_hub.commit_folder("someone/loras", style)
    runner = CliRunner()
    pulls = [[], ["--file", "loras/b"], ["--file", "style.safetensors"]]
    for args, name in zip(pulls, ["loras@1", "loras/loras/b@1", "loras/style@1"]):
        pulled = runner.invoke(main, ["pull", "someone/loras", *args])
        assert pulled.stdout.splitlines()[0] == f"pulled someone/loras (commit {first[:12]}) as {name}", pulled.output
        assert ("style.safetensors is there too" in pulled.stderr) == (args == [])  # (the PEFT one taken: said)
    sources = {a.ref: a.source for a in registry.list_adapters()}
    assert sources == {"loras@1": f"hf://someone/loras@{first}",
                       "loras/loras/b@1": f"hf://someone/loras@{first}/loras/b",
                       "loras/style@1": f"hf://someone/loras@{first}/style.safetensors"}

    for offline in ("", "1"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        for args, name in zip(pulls + [[sources["loras/loras/b@1"]], ["--file", "loras/b/adapter_config.json"]],
                              ["loras@1", "loras/loras/b@1", "loras/style@1", "loras/loras/b@1", "loras/loras/b@1"]):
            again = runner.invoke(main, ["pull", *(args if args[:1] == [sources["loras/loras/b@1"]] else
                                                   ["someone/loras", *args])])
            assert again.exit_code == 0 and again.stdout.startswith("already registered: ") and \
                again.stdout.splitlines()[0].endswith(f" as {name}"), (args, again.output)
    monkeypatch.delenv("HF_HUB_OFFLINE")

    fake_hub.commit_folder("someone/loras", adapters["c"], prefix="loras/b/")
    newer = hub.pull(registry, "someone/loras", subpath="loras/b")
    assert newer.new and newer.adapter.ref == "loras/loras/b@2"
    assert not hub.pull(registry, "someone/loras", subpath="style.safetensors").new
    restyled = kohya_file(tmp_path / "style.safetensors", {"lora_unet_model_layers_0_self_attn_q_proj": ((64,), (64,))},
                          seed=1)
    fake_hub.commit_folder("someone/loras", restyled)
    assert hub.pull(registry, "someone/loras", subpath="style.safetensors", name="mine").adapter.ref == "mine@1"
    assert sorted(a.ref for a in registry.list_adapters()) == [
        "loras/loras/b@1", "loras/loras/b@2", "loras/style@1", "loras@1", "mine@1"]


def test_the_default_name_of_an_adapter_picked_below_the_top_level_holds_its_folder(fake_hub, adapters, registry,
                                                                                     monkeypatch):
    """A repo whose only adapter is a PEFT folder below the top level: pull picks it from the repo's listing and names
    it then, with that folder (it was the repo's name, which an adapter at another path of the repo also got); a path
    named up front is judged as a name before anything is asked of the Hub. Pulled again, it is found by the path
    pull took at that commit: online nothing is downloaded again (the repo was listed and the adapter downloaded to
    find it), offline it is found (it was "not in the local Hub cache", as an online pull leaves nothing there)."""
    first = fake_hub.commit_folder("someone/deep", adapters["a"], prefix="runs/x/final/")
    pulled = hub.pull(registry, "someone/deep")
    assert pulled.new and pulled.adapter.ref == "deep/runs/x/final@1"
    downloaded = len(fake_hub.downloads())
    again = hub.pull(registry, "someone/deep")
    assert not again.new and again.adapter.id == pulled.adapter.id
    assert len(fake_hub.downloads()) == downloaded
    with monkeypatch.context() as offline:
        offline.setenv("HF_HUB_OFFLINE", "1")
        for ref in ("someone/deep", f"someone/deep@{first[:7]}"):
            again = hub.pull(registry, ref)
            assert not again.new and again.adapter.ref == "deep/runs/x/final@1", ref
    fake_hub.commit_folder("someone/deep", adapters["b"], prefix="runs/x/final/")
    assert hub.pull(registry, "someone/deep").adapter.ref == "deep/runs/x/final@2"
    assert hub.pull(registry, f"someone/deep@{first}", subpath="runs").adapter.ref == "deep/runs/x/final@1"

    asked = len(fake_hub.requests)
    with pytest.raises(InvalidInputError, match=r"^bad adapter name 'deep/x{251}': .*; that is the default name, the "
                                                r"repo's and the adapter's path in it: give name$"):
        hub.pull(registry, "someone/deep", subpath="x" * 251 + ".safetensors")
    assert len(fake_hub.requests) == asked


def test_pull_takes_the_forms_a_user_copies_a_subfolder_in(fake_hub, adapters, registry):
    """The source a pull records (`hf://REPO@COMMIT/PATH`, which `show` prints) was refused as "revision not found",
    a Hub page's URL (…/tree/REV/PATH, …/blob/REV/PATH) as "not a Hub repo id", and `--file` naming a PEFT
    adapter_config.json as "not a .safetensors file": each pulls that adapter."""
    commit = fake_hub.commit_folder("someone/many", adapters["a"], prefix="loras/a/")
    fake_hub.branch("someone/many", "feature/x")
    first = hub.pull(registry, f"hf://someone/many@{commit}/loras/a")
    assert first.new and first.commit == commit and first.adapter.source == f"hf://someone/many@{commit}/loras/a"
    url = "https://huggingface.co/someone/many"
    for ref, path in [(f"hf://someone/many@{commit}/loras/a/", None), (f"{url}/tree/main/loras/a", "loras/a/"),
                      (f"{url}/tree/feature%2Fx/loras/a?x=1", None),
                      (f"{url}/blob/{commit[:7]}/loras/a/adapter_config.json", None),
                      (f"{url}/resolve/main/loras/a/adapter_model.safetensors", None),
                      ("someone/many", "loras/a/adapter_config.json")]:
        again = hub.pull(registry, ref, subpath=path)
        assert not again.new and again.adapter.id == first.adapter.id, ref
    with pytest.raises(InvalidInputError, match="names loras/a in the repo, and subpath loras/b another path"):
        hub.pull(registry, f"{url}/tree/main/loras/a", subpath="loras/b")
    with pytest.raises(InvalidInputError, match="names loras/a in the repo: give the repo alone"):
        hub.add_base(registry, f"hub:{url}/tree/main/loras/a")
    shown = CliRunner().invoke(main, ["pull", first.adapter.source])
    assert shown.exit_code == 0 and shown.output.startswith(f"already registered: someone/many@{commit} "), shown.output


def test_pull_revision_as_huggingface_hub_takes_it(fake_hub, adapters):
    """`pull --revision` (huggingface_hub's and `push`'s word) was `no such option '--revision'`: it is REPO@REVISION,
    and a reference that names another revision is refused."""
    first = fake_hub.commit_folder("someone/lora", adapters["a"])
    fake_hub.tag("someone/lora", "v1")
    fake_hub.commit_folder("someone/lora", adapters["b"])
    runner = CliRunner()
    pulled = runner.invoke(main, ["pull", "someone/lora", "--revision", "v1"])
    assert pulled.exit_code == 0, pulled.output
    assert pulled.output.splitlines()[:2] == [f"pulled someone/lora@v1 (commit {first[:12]}) as lora@1",
                                              f"  source  hf://someone/lora@{first}"]
    same = runner.invoke(main, ["pull", "someone/lora@v1", "--revision", "v1"])
    assert same.exit_code == 0 and same.output.startswith("already registered: someone/lora@v1 ")
    both = runner.invoke(main, ["pull", "someone/lora@main", "--revision", "v1"])
    assert (both.exit_code, both.output) == (
        2, "error: someone/lora@main names revision main, and --revision v1 another: give one\n")
    empty = runner.invoke(main, ["pull", "someone/lora", "--revision", ""])
    assert empty.exit_code == 2 and empty.output.startswith("error: --revision '' is no branch, tag or commit")


def test_cli_token_blanks_at_its_ends_go_as_huggingface_hub_drops_hf_tokens(fake_hub, adapters):
    """`--token " hf_… "` (quoted with the blanks of a copy) was `cannot reach the Hub … (LocalProtocolError:
    Illegal header value b'Bearer  hf_… ')`, printing the token: its blanks go, as huggingface_hub drops
    $HF_TOKEN's."""
    fake_hub.create("me/secret", private=True)
    fake_hub.commit_folder("me/secret", adapters["a"])
    result = CliRunner().invoke(main, ["pull", "me/secret", "--token", " hf_owner "])
    assert result.exit_code == 0 and result.output.startswith("pulled me/secret "), result.output


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_pull_keeps_one_copy_and_nothing_in_the_hub_cache(fake_hub, adapters, registry, monkeypatch):
    """The adapter goes into the blob store only: nothing of it in HF_HOME (the Hub cache keeps at most the ref a
    branch name resolved to), no temp folder left in the store, on success, failure or Ctrl-C; pulled again (online
    or offline) it comes from the store, with no download."""
    commit = fake_hub.commit_folder("someone/anime-lora", adapters["a"])
    hf_home = Path(os.environ["HF_HOME"])
    pulled = hub.pull(registry, "someone/anime-lora")
    weights = (adapters["a"] / "adapter_model.safetensors").read_bytes()
    assert (Path(pulled.adapter.path) / "adapter_model.safetensors").read_bytes() == weights
    assert files_under(hf_home) == ["hub/models--someone--anime-lora/refs/main"]  # what `main` resolved to
    assert not [p for p in registry.blobs.root.rglob("*") if TMP_MARK in p.name]

    before = len(fake_hub.downloads("adapter_model.safetensors"))
    assert not hub.pull(registry, "someone/anime-lora").new  # online again: from the store
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for revision in ("", "@main", f"@{commit}", f"@{commit[:7]}"):
        again = hub.pull(registry, f"someone/anime-lora{revision}")
        assert not again.new and again.adapter.id == pulled.adapter.id and again.commit == commit
        assert again.files == ["adapter_model.safetensors", "adapter_config.json"]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert len(fake_hub.downloads("adapter_model.safetensors")) == before

    fake_hub.commit_folder("someone/anime-lora", adapters["b"])
    for interruption in (KeyboardInterrupt(), RuntimeError("disk on fire")):
        def fail(*args, **kwargs):
            raise interruption
        with monkeypatch.context() as patched, pytest.raises(type(interruption)):
            patched.setattr(registry, "register_adapter", fail)
            hub.pull(registry, "someone/anime-lora")
        assert not [p for p in registry.blobs.root.rglob("*") if TMP_MARK in p.name]
        assert not [f for f in files_under(hf_home) if "/refs/" not in f]
    assert len(registry.list_adapters()) == 1


def test_a_failed_pull_leaves_the_ref_that_offline_pulls_use(fake_hub, adapters, registry, monkeypatch):
    """A pull (or `base add hub:`) that fails after the Hub resolved its branch — the network gone mid-download, a
    file refused — recorded the new commit as the branch's ref in the Hub cache all the same: an offline pull, which
    found the commit pulled before, then said the repo is not in the local cache. The ref is recorded once the
    pull succeeded; huggingface_hub's own reader (resolve_revision, offline) agrees."""
    import httpx2
    import huggingface_hub
    from huggingface_hub import HfApi

    first = fake_hub.commit_folder("someone/y", adapters["a"])
    hub.pull(registry, "someone/y")
    fake_hub.commit_folder("someone/y", adapters["b"])
    ref = hub.cache_dir() / "models--someone--y" / "refs" / "main"

    def down(*args, **kwargs):
        raise httpx2.ConnectError("network down")

    def refused(*args, **kwargs):
        raise FormatError("a bad file")

    with monkeypatch.context() as patched, pytest.raises(HubError, match="network down"):
        patched.setattr(huggingface_hub, "snapshot_download", down)
        hub.pull(registry, "someone/y")
    assert ref.read_text() == first
    with monkeypatch.context() as patched, pytest.raises(FormatError):
        patched.setattr(registry, "register_adapter", refused)
        hub.pull(registry, "someone/y")
    assert ref.read_text() == first
    base = adapters["base"]
    fake_hub.commit("meta/lora-like", {"model.safetensors": (adapters["a"] / "adapter_model.safetensors").read_bytes(),
                                       "config.json": (base / "config.json").read_bytes()})
    with pytest.raises(InvalidInputError, match="this is a LoRA adapter"):
        hub.add_base(registry, "hub:meta/lora-like")
    assert not (hub.cache_dir() / "models--meta--lora-like" / "refs").exists()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = hub.pull(registry, "someone/y")
    assert not again.new and again.commit == first
    assert HfApi().resolve_revision("someone/y", cache_dir=hub.cache_dir(), local_files_only=True).resolved == first


def test_the_refs_recorded_are_huggingface_hubs(fake_hub, adapters, registry, tmp_path, monkeypatch):
    """What a pull records in the Hub cache's refs/ for each kind of revision (the default branch, a tag, a branch
    with a slash, a pull request's refs/pr/N, a sha prefix; none for a full sha) is what huggingface_hub's
    resolve_revision writes in a cache of its own, byte for byte; and a write that fails midway (a full disk)
    leaves the ref it had, never a truncated one."""
    from huggingface_hub import CommitOperationAdd, HfApi

    first = fake_hub.commit_folder("someone/x", adapters["a"])
    fake_hub.tag("someone/x", "v1")
    fake_hub.branch("someone/x", "feat/slash")
    fake_hub.commit_folder("someone/x", adapters["b"], branch="feat/slash")
    api = HfApi(endpoint=fake_hub.url, token="hf_other")
    api.create_commit("someone/x", [CommitOperationAdd("note.txt", b"hi")], commit_message="m", create_pr=True)
    theirs = tmp_path / "their-cache"
    for n, revision in enumerate([None, "v1", "feat/slash", "refs/pr/1", first[:10], first]):
        api.resolve_revision("someone/x", revision=revision, cache_dir=theirs)
        hub.pull(registry, f"someone/x@{revision}" if revision else "someone/x", name=f"x{n}")

    def refs(cache: Path) -> dict[str, bytes]:
        folder = cache / "models--someone--x" / "refs"
        return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    assert refs(hub.cache_dir()) == refs(theirs) and set(refs(theirs)) == {
        "main", "v1", "feat/slash", "refs/pr/1", first[:10]}

    def disk_full(self, data, *args, **kwargs):
        with open(self, "w") as f:
            f.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)
    hub.remember_ref(hub.RepoRef("someone/x", "v1"), "0" * 40)
    assert refs(hub.cache_dir()) == refs(theirs)


def test_an_offline_pull_reads_a_cache_huggingface_hub_made(fake_hub, adapters, registry, monkeypatch):
    """A repo huggingface_hub's snapshot_download put in the Hub cache (transformers, diffusers) pulls offline at
    each kind of revision it cached: the default branch, a tag, a branch with a slash, refs/pr/N, a sha, a prefix."""
    from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download

    first = fake_hub.commit_folder("someone/x", adapters["a"])
    fake_hub.tag("someone/x", "v1")
    fake_hub.branch("someone/x", "feat/slash")
    slash = fake_hub.commit_folder("someone/x", adapters["b"], branch="feat/slash")
    pr = HfApi(endpoint=fake_hub.url, token="hf_other").create_commit(
        "someone/x", [CommitOperationAdd("adapter_model.safetensors", adapters["c"] / "adapter_model.safetensors"),
                      CommitOperationAdd("adapter_config.json", adapters["c"] / "adapter_config.json")],
        commit_message="c", create_pr=True).oid
    for revision in (None, "v1", "feat/slash", "refs/pr/1"):
        snapshot_download("someone/x", revision=revision, cache_dir=hub.cache_dir(), endpoint=fake_hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for n, (revision, commit) in enumerate([("", first), ("@v1", first), ("@feat/slash", slash),
                                            ("@refs/pr/1", pr), (f"@{first}", first), (f"@{first[:8]}", first)]):
        assert hub.pull(registry, f"someone/x{revision}", name=f"x{n}").commit == commit, revision


def test_pull_repairs_a_damaged_stored_copy(fake_hub, adapters, registry):
    fake_hub.commit_folder("someone/anime-lora", adapters["a"])
    pulled = hub.pull(registry, "someone/anime-lora")
    stored = Path(pulled.adapter.path) / "adapter_model.safetensors"
    stored.unlink()
    again = hub.pull(registry, "someone/anime-lora")
    assert not again.new and stored.read_bytes() == (adapters["a"] / "adapter_model.safetensors").read_bytes()
    assert registry.verify() == []


def test_pull_of_a_base_models_repo_is_refused_before_its_weights_come_down(fake_hub, adapters, registry):
    """The whole model.safetensors was downloaded (into the store's scratch folder) before `pull` refused it as no
    adapter; its header, read with HTTP ranges, decides it now, and the line says how to add it as a base."""
    base = adapters["base"]
    fake_hub.commit("meta/tiny", {n: (base / n).read_bytes() for n in ("model.safetensors", "config.json")})
    result = CliRunner().invoke(main, ["pull", "meta/tiny"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: meta/tiny/model.safetensors: not a LoRA adapter (unknown key layout): ")
    assert result.stderr.endswith("; if it is a model, `loraops base add hub:meta/tiny` records it as a base (nothing "
                                  "was downloaded)\n") and len(result.stderr.splitlines()) == 1
    assert all(r["range"] is not None for r in fake_hub.downloads("model.safetensors"))
    assert registry.list_adapters() == [] and not any(TMP_MARK in p.name for p in registry.blobs.root.iterdir())


def test_pull_file_is_not_blocked_by_a_bad_name_elsewhere_in_the_repo(fake_hub, adapters, registry):
    """A file name loraops refuses (it would land outside the download folder) anywhere in the repo blocked `pull
    --file` of another file; only what --file picks is judged now."""
    files = {f"good/{n}": (adapters["a"] / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    commit = fake_hub.commit("someone/mixed", {"../evil.safetensors": b"x", **files})
    blocked = CliRunner().invoke(main, ["pull", "someone/mixed"])
    assert blocked.exit_code == 7 and "refusing file name '../evil.safetensors'" in blocked.stderr
    pulled = CliRunner().invoke(main, ["pull", "someone/mixed", "--file", "good", "--name", "good"])
    assert pulled.exit_code == 0, pulled.output
    assert registry.get_adapter("good").source == f"hf://someone/mixed@{commit}/good"


@pytest.mark.parametrize("command", [["merge", "{a}", "--into", "tiny"], ["subtract", "{a}", "--from", "tiny"],
                                     ["subtract", "{a}", "--from", "tiny", "--exact"]])
def test_a_misnamed_output_is_refused_before_a_hub_base_is_downloaded(fake_hub, adapters, tmp_path, command):
    """`merge --into` a base recorded from the Hub with `-o x.safetensors` downloaded the whole base, then refused the
    output's name: a Hub base comes down as a folder, which is known from its record, so the name is refused first
    and nothing is asked of the Hub."""
    fake_hub.commit_folder("meta/tiny", adapters["base"])
    runner = CliRunner()
    assert runner.invoke(main, ["base", "add", "hub:meta/tiny", "--name", "tiny"]).exit_code == 0
    before = len(fake_hub.requests)
    out = tmp_path / "x.safetensors"
    result = runner.invoke(main, [a.format(a=adapters["a"]) for a in command] + ["-o", str(out)])
    verb = {"merge": "merging into", "subtract": "subtracting from"}[command[0]] if "--exact" not in command \
        else "restoring"
    assert (result.exit_code, result.output) == (2, f"error: {out}: the output of {verb} the folder model tiny is a "
                                                    "folder, not one .safetensors file; give a folder name\n")
    assert fake_hub.requests[before:] == []  # not even asked where main is now
    assert not out.exists() and not any(hub.cache_dir().rglob("*.safetensors"))


def test_odd_uses_of_a_base_recorded_from_the_hub(fake_hub, adapters, tmp_path, monkeypatch):
    """`base rm` of a base known by its Hub manifest only said "its files at None are untouched"; a merge into it
    offline, before its weights came down, said to `pull` it (bases are not pulled: they download on first use)."""
    commit = fake_hub.commit_folder("meta/tiny", adapters["base"])
    runner = CliRunner()
    assert runner.invoke(main, ["base", "add", "hub:meta/tiny", "--name", "tiny"]).exit_code == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = runner.invoke(main, ["merge", str(adapters["a"]), "--into", "tiny", "-o", str(tmp_path / "m")])
    assert (offline.exit_code, offline.output) == (3, (
        f"error: meta/tiny@{commit} is not in the local Hub cache ({hub.cache_dir()}) and HF_HUB_OFFLINE=1 is set; "
        "its weights download on first use: run this once online first\n"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    removed = runner.invoke(main, ["base", "rm", "tiny"])
    assert (removed.exit_code, removed.output) == (0, (
        f"removed base tiny (id 1); it had no files on disk (its manifest came from hf://meta/tiny@{commit})\n"))
    assert runner.invoke(main, ["base", "add", "hub:meta/tiny", "--name", "tiny"]).exit_code == 0
    with Registry.open() as reg:
        path = reg.base_path("tiny")
    removed = runner.invoke(main, ["base", "rm", "tiny"])
    assert removed.output == f"removed base tiny (id 2); its files at {path} are untouched\n"


def test_push_refuses_a_branch_that_is_no_name(fake_hub, adapters, registry):
    """`push --revision ""` (a script's unset variable) pushed to main; a name git refuses (`a~b^c:d`, `-dev`) was
    asked of the Hub, which answers 400 once create_repo made the repo. Refused by git's rules (check-ref-format)."""
    from loraops.hub import REF_NAME_RULES

    registry.add_adapter(adapters["a"], name="anime")
    for bad in ("", " dev", "a/../b", "/dev", "a~b^c:d", "-dev", "dev.lock", "x/.dev", "a@{1}", "a b", "dev/", "dev.",
                "a//b", "@", "a*b", "a\\b", "a\x7fb"):
        result = CliRunner().invoke(main, ["push", "anime", "me/anime", "--revision", bad, "--token", "hf_owner"])
        assert (result.exit_code, result.output) == (2, (
            f"error: me/anime: --revision {bad!r} is no branch name ({REF_NAME_RULES}); leave it out to push to main"
            "\n")), bad
    assert "me/anime" not in fake_hub.repos


def test_push_refuses_a_ref_that_is_no_pull_request(fake_hub, adapters, registry):
    """`--revision refs/pr/0` or `refs/pr/01` (or any other name under refs/) was taken for a branch: the repo was
    created, then the Hub refused the branch (400). Pull requests are refs/pr/N, N from 1 in plain decimals, as the
    Hub names them (huggingface_hub passes the name through): refused in one line before anything is asked."""
    registry.add_adapter(adapters["a"], name="anime")
    expected = {"refs/pr/0": "is no pull request: the Hub numbers them from 1, written without leading zeros",
                "refs/pr/01": "is no pull request: the Hub numbers them from 1, written without leading zeros "
                              "(refs/pr/1)",
                "refs/pr/x": "is no branch name: the Hub keeps refs/ for its own refs (a pull request is refs/pr/N); "
                             "give a branch's plain name",
                "refs/heads/dev": "is no branch name: the Hub keeps refs/ for its own refs (a pull request is "
                                  "refs/pr/N); give a branch's plain name"}
    for revision, why in expected.items():
        result = CliRunner().invoke(main, ["push", "anime", "me/new", "--revision", revision, "--token", "hf_owner"])
        assert (result.exit_code, result.output) == (2, f"error: me/new: --revision {revision!r} {why}\n")
    assert "me/new" not in fake_hub.repos and not fake_hub.requests


def test_a_damaged_pulled_adapter_is_repaired_by_pulling_it_again(fake_hub, adapters):
    """verify and push said to `register` the original of a damaged stored copy: a pulled adapter has none on disk.
    They name the `pull` that downloads it again (repo, commit and --file), which repairs it."""
    fake_hub.commit_folder("someone/many", adapters["a"], prefix="loras/a/")
    commit = fake_hub.commit_folder("someone/many", adapters["b"], prefix="loras/b/")
    runner = CliRunner()
    assert runner.invoke(main, ["pull", "someone/many", "--file", "loras/b", "--name", "b"]).exit_code == 0
    with Registry.open() as reg:
        stored = Path(reg.get_adapter("b").path) / "adapter_model.safetensors"
    stored.unlink()
    again = f"loraops pull someone/many@{commit} --file loras/b"
    verified = runner.invoke(main, ["verify"])
    assert (verified.exit_code, verified.stdout, verified.stderr) == (6, (
        f"b@1: {stored}: missing\n"
        f"b@1: pulled from the Hub: `{again}` downloads it again\n"),
        "error: 1 stored file(s) missing or changed; re-register those adapters from their originals, or pull again "
        "those from the Hub\n")
    pushed = runner.invoke(main, ["push", "b", "me/b", "--token", "hf_owner"])
    assert (pushed.exit_code, pushed.output) == (6, (
        f"error: adapter b@1: its stored copy {stored} is missing, so it is not used; `{again}` downloads it again "
        "to repair it (`loraops verify` checks all)\n"))
    assert runner.invoke(main, again.split()[1:]).exit_code == 0
    assert runner.invoke(main, ["verify"]).exit_code == 0


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_a_push_interrupted_says_what_the_hub_has(fake_hub, adapters, registry, monkeypatch):
    """A Ctrl-C after the Hub made the commit, before the registry recorded it as a tag, said "nothing was written";
    one during the upload says the commit was not confirmed. Pushing again records the tag, with no second commit."""
    registry.add_adapter(adapters["a"], name="anime")
    runner = CliRunner()
    with monkeypatch.context() as patched:
        patched.setattr(hub, "upload", interrupt)
        during = runner.invoke(main, ["push", "anime", "me/anime", "--token", "hf_owner"])
    assert (during.exit_code, during.output) == (130, (
        "error: interrupted while pushing anime@1 to me/anime@main, before the Hub confirmed a commit; push again "
        "(files the Hub already has are not committed twice)\n"))
    with monkeypatch.context() as patched:
        patched.setattr(Registry, "add_tags", interrupt)
        after = runner.invoke(main, ["push", "anime", "me/anime", "--token", "hf_owner"])
    commit = fake_hub.repos["me/anime"].branches["main"]
    assert (after.exit_code, after.output) == (130, (
        f"error: interrupted after me/anime@main got commit {commit[:12]} with anime@1, before the registry recorded it "
        "as a tag; push again to record it (the Hub makes no second commit)\n"))
    again = runner.invoke(main, ["push", "anime", "me/anime", "--token", "hf_owner"])
    assert again.output.startswith("nothing to push: ")
    assert registry.get_adapter("anime").tags == [f"hf://me/anime@{commit}"]


def test_a_push_interrupted_once_the_hub_has_it_says_so(fake_hub, adapters, registry, monkeypatch):
    """A Ctrl-C once push made its commit and recorded its tag (as the library call returns; in the command, after
    the summary was said) said "nothing was written"; it says what the Hub and the registry have, as the library
    user's KeyboardInterrupt does."""
    from factories import interrupted_once_returned
    from loraops import records

    registry.add_adapter(adapters["a"], name="anime")
    registry.add_adapter(adapters["b"], name="other")
    with monkeypatch.context() as patched:
        patched.setattr(records, "PushRecord", interrupt)
        with pytest.raises(KeyboardInterrupt) as library:
            hub.push(registry, "anime", "me/anime", token="hf_owner")
    commit = fake_hub.repos["me/anime"].branches["main"]
    assert library.value.args == (f"interrupted after me/anime@main got commit {commit[:12]} with anime@1, recorded "
                                  "as a tag",)
    with monkeypatch.context() as patched:
        interrupted_once_returned(patched, "push")
        result = CliRunner().invoke(main, ["push", "other", "me/other", "--token", "hf_owner"])
    commit = fake_hub.repos["me/other"].branches["main"]
    assert (result.exit_code, result.output.splitlines()[-1]) == (130, (
        f"error: interrupted after me/other@main got commit {commit[:12]} with other@1, recorded as a tag"))
    assert registry.get_adapter("other").tags == [f"hf://me/other@{commit}"]


def test_a_push_with_nothing_to_push_interrupted_says_what_it_recorded(fake_hub, adapters, registry, monkeypatch):
    """A push that found the Hub holding the adapter already records the commit as a tag where the registry lacked
    it, and says so when interrupted; where the tag was there already nothing landed, and that is what is said (it
    said "recorded as a tag" of a tag it found)."""
    from factories import interrupted_once_returned

    registry.add_adapter(adapters["a"], name="anime")
    push = ["push", "anime", "me/anime", "--token", "hf_owner"]
    with monkeypatch.context() as patched:
        patched.setattr(Registry, "add_tags", interrupt)
        assert CliRunner().invoke(main, push).exit_code == 130
    commit = fake_hub.repos["me/anime"].branches["main"]
    said = []
    for _ in range(2):
        with monkeypatch.context() as patched:
            interrupted_once_returned(patched, "push")
            result = CliRunner().invoke(main, push)
        assert result.output.startswith("nothing to push: ")
        said.append((result.exit_code, result.output.splitlines()[-1]))
    assert said == [(130, f"error: interrupted after the registry recorded me/anime@{commit[:12]} as a tag of "
                          "anime@1"),
                    (130, "error: interrupted; nothing was written")]
    assert registry.get_adapter("anime").tags == [f"hf://me/anime@{commit}"]
    assert fake_hub.repos["me/anime"].branches["main"] == commit


def test_a_push_interrupted_as_its_temporary_files_go_says_what_the_hub_has(fake_hub, adapters, registry,
                                                                           monkeypatch):
    """Push in another layout writes it into a temporary folder, removed after the Hub made the commit: a Ctrl-C
    there said "nothing was written" of a commit made."""
    import tempfile

    def interrupted_once_removed(self, *exc, real=tempfile.TemporaryDirectory.__exit__):
        real(self, *exc)
        if "loraops-push-" in self.name:
            raise KeyboardInterrupt

    registry.add_adapter(adapters["a"], name="anime")
    monkeypatch.setattr(tempfile.TemporaryDirectory, "__exit__", interrupted_once_removed)
    result = CliRunner().invoke(main, ["push", "anime", "me/anime", "--format", "kohya", "--token", "hf_owner"])
    commit = fake_hub.repos["me/anime"].branches["main"]
    assert (result.exit_code, result.output.splitlines()[-1]) == (130, (
        f"error: interrupted after me/anime@main got commit {commit[:12]} with anime@1, before the registry recorded "
        "it as a tag; push again to record it (the Hub makes no second commit)"))


def test_a_pull_interrupted_says_what_it_registered(fake_hub, adapters, registry, monkeypatch):
    """A Ctrl-C once pull registered the adapter (after its summary was said) said "nothing was written" of an
    adapter registered; one during the download still says that, and leaves nothing registered."""
    from factories import interrupted_once_returned

    fake_hub.commit_folder("someone/style", adapters["a"])
    with monkeypatch.context() as patched:
        patched.setattr(hub, "download_adapter", interrupt)
        during = CliRunner().invoke(main, ["pull", "someone/style"])
    assert (during.exit_code, during.output) == (130, "error: interrupted; nothing was written\n")
    assert registry.list_adapters() == []
    with monkeypatch.context() as patched:
        interrupted_once_returned(patched, "pull")
        after = CliRunner().invoke(main, ["pull", "someone/style"])
    assert (after.exit_code, after.output.splitlines()[-1]) == (
        130, "error: interrupted after someone/style was pulled and registered as style@1")
    assert [a.ref for a in registry.list_adapters()] == ["style@1"]


def test_a_pull_interrupted_as_its_scratch_folder_goes_says_what_it_registered(fake_hub, adapters, registry,
                                                                                monkeypatch):
    """The download's scratch folder is cleaned up after the registration committed: a Ctrl-C there said "nothing
    was written" of the adapter registered."""
    import contextlib

    from loraops.registry.blobs import BlobStore

    @contextlib.contextmanager
    def interrupted_once_cleaned(self, real=BlobStore.scratch):
        with real(self) as folder:
            yield folder
        raise KeyboardInterrupt

    fake_hub.commit_folder("someone/style", adapters["a"])
    monkeypatch.setattr(BlobStore, "scratch", interrupted_once_cleaned)
    result = CliRunner().invoke(main, ["pull", "someone/style"])
    assert (result.exit_code, result.output) == (
        130, "error: interrupted after someone/style was pulled and registered as style@1\n")
    assert [a.ref for a in registry.list_adapters()] == ["style@1"]


def test_an_offline_pull_fetched_one_by_one_takes_what_online_takes(fake_hub, adapters, registry, monkeypatch,
                                                                      tmp_path):
    """A repo whose top level holds a PEFT adapter and a kohya file, its files fetched one by one (no listing
    cached): offline, `--file style.safetensors` takes that file as online (the same record); `--file
    adapter_model.safetensors` with only the weights cached is refused (online takes them with the config beside
    them, which the cache lacks); `--file .`, which online finds nothing adapter-like in, is refused too, not read as
    the top level."""
    from huggingface_hub import hf_hub_download

    from factories import kohya_file

    kohya = kohya_file(tmp_path / "style.safetensors", {"lora_unet_model_layers_0_self_attn_q_proj": ((64,), (64,))})
    fake_hub.commit_folder("someone/x", adapters["a"])
    commit = fake_hub.commit_folder("someone/x", kohya)
    online = hub.pull(registry, "someone/x", subpath="style.safetensors")
    registry.remove_adapter(online.adapter.id)
    dot = CliRunner().invoke(main, ["pull", "someone/x", "--file", "."])
    assert dot.exit_code != 0 and not registry.list_adapters(), dot.output
    for name in ("style.safetensors", "adapter_model.safetensors"):
        hf_hub_download("someone/x", name, cache_dir=hub.cache_dir(), endpoint=fake_hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    result = CliRunner().invoke(main, ["pull", "someone/x", "--file", "style.safetensors"])
    assert result.exit_code == 0, result.output
    [offline] = registry.list_adapters()
    registered = {"id", "version", "created"}
    assert registry.get_adapter(offline.id).model_dump(exclude=registered) == \
        online.adapter.model_dump(exclude=registered)
    registry.remove_adapter(offline.id)

    result = CliRunner().invoke(main, ["pull", "someone/x", "--file", "adapter_model.safetensors"])
    assert (result.exit_code, result.output) == (3, snapshot_lacks(
        "someone/x", f"its snapshot of commit {commit[:12]} has adapter_model.safetensors but no adapter_config.json"))
    hf_hub_download("someone/x", "adapter_config.json", cache_dir=hub.cache_dir(), endpoint=fake_hub.url)
    result = CliRunner().invoke(main, ["pull", "someone/x", "--file", "."])
    assert result.exit_code == 3 and not registry.list_adapters(), result.output


def test_an_offline_pull_of_a_snapshot_link_to_a_missing_blob(fake_hub, adapters, registry, monkeypatch):
    """A snapshot link whose blob is gone (a cache cleaned by hand) is no file of the snapshot: the offline pull says
    the snapshot lacks it; a commit with no snapshot at all is not in the cache."""
    from huggingface_hub import hf_hub_download

    commit = fake_hub.commit_folder("someone/x", adapters["a"])
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = Path(hf_hub_download("someone/x", name, cache_dir=hub.cache_dir(), endpoint=fake_hub.url))
    path.resolve().unlink()  # the weights' blob
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(main, ["pull", "someone/x"])
    assert (result.exit_code, result.output) == (3, snapshot_lacks(
        "someone/x", f"its snapshot of commit {commit[:12]} has adapter_config.json but no adapter_model.safetensors"))
    other = "0123456789abcdef0123456789abcdef01234567"
    result = CliRunner().invoke(main, ["pull", f"someone/x@{other}"])
    assert (result.exit_code, result.output) == (3, (
        f"error: someone/x@{other} is not in the local Hub cache ({hub.cache_dir()}) and HF_HUB_OFFLINE=1 is set; "
        "pull it once online first\n"))
    assert not registry.list_adapters()


def test_a_hub_base_that_keeps_its_adapter_config_merges(fake_hub, adapters, tmp_path):
    """A merged model uploaded with the adapter_config.json it was made from: `base add hub:` reads its weights'
    names, a model's; the download takes the small files with them, and the snapshot was then refused by merge as
    'a LoRA adapter' for that file."""
    import shutil

    upload = tmp_path / "upload"
    shutil.copytree(adapters["base"], upload)
    shutil.copy(adapters["b"] / "adapter_config.json", upload / "adapter_config.json")
    fake_hub.commit_folder("meta/tiny-merged", upload)
    runner = CliRunner()
    assert runner.invoke(main, ["base", "add", "hub:meta/tiny-merged", "--name", "tiny"]).exit_code == 0
    merged = runner.invoke(main, ["merge", f"{adapters['a']}:0.5", "--into", "tiny", "-o", str(tmp_path / "m")])
    assert merged.exit_code == 0, merged.output


def test_extract_from_a_base_pulled_from_the_hub_names_its_repo_and_commit(fake_hub, adapters, registry, tmp_path):
    """extract's PEFT config names a base added from the Hub as naming_base names it (its repo id, at the commit it
    was pulled at: loadable anywhere), not by the folder it was downloaded to; also when given by a folder of the same
    model (the base it is registered against, found by fingerprint); a base of no Hub keeps its folder."""
    import json

    from factories import tiny_llama
    from loraops import derive

    commit = fake_hub.commit_folder("meta/tiny", adapters["base"])
    hub.add_base(registry, "hub:meta/tiny")
    tuned = tiny_llama(tmp_path / "tuned", seed=1)
    derive.extract("tiny", str(tuned), rank=2, output=str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("meta/tiny", commit)
    derive.extract(str(adapters["base"]), str(tuned), rank=3, output=str(tmp_path / "same"))
    config = json.loads((tmp_path / "same" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("meta/tiny", commit)
    local = tiny_llama(tmp_path / "local-base", seed=2)
    derive.extract(str(local), str(tuned), rank=2, output=str(tmp_path / "local"))
    config = json.loads((tmp_path / "local" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config.get("revision")) == (str(local), None)


def test_push_of_an_adapter_registered_with_alpha_writes_that_alpha(fake_hub, registry, tmp_path):
    """The stored file keeps its own alpha (4); the record, registered with --alpha 1, is another adapter: pushed as
    its stored bytes, the Hub got the file's alpha under a card saying 1."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    save_file({"lora_unet_a.lora_down.weight": torch.randn(4, 8, generator=g),
               "lora_unet_a.lora_up.weight": torch.randn(8, 4, generator=g), "lora_unet_a.alpha": torch.tensor(4.0)},
              str(tmp_path / "k.safetensors"))
    registry.add_adapter(tmp_path / "k.safetensors", name="k", alpha=1.0)
    done = hub.push(registry, "k", "me/k", token="hf_owner")
    [name] = [f for f in done.files if f.endswith(".safetensors")]
    (tmp_path / "pushed.safetensors").write_bytes(fake_hub.files("me/k")[name])
    assert [m.alpha for m in formats.read_adapter(tmp_path / "pushed.safetensors").modules.values()] == [1.0]
    assert "| alpha | 1 |" in fake_hub.files("me/k")["README.md"].decode()
