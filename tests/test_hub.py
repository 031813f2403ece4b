"""loraops.hub against a local Hub over real HTTP (tests/hubserver.py): the real huggingface_hub client, no internet."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loraops import hub
from loraops.errors import AmbiguousError, FormatError, HubError, InvalidInputError, NotFoundError

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass

PEFT_FILES = {"adapter_config.json": b'{"r": 4, "lora_alpha": 8}', "adapter_model.safetensors": b"w1" * 64,
              "README.md": b"# card\n", "training_args.json": b"{}"}


@pytest.fixture
def peft_repo(fake_hub):
    """someone/lora: v1 (tag) → first commit; main → second commit, which changed the weights."""
    first = fake_hub.commit("someone/lora", PEFT_FILES, message="v1")
    fake_hub.tag("someone/lora", "v1")
    second = fake_hub.commit("someone/lora", {"adapter_model.safetensors": b"w2" * 64}, message="v2")
    return first, second


# ---- references ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, repo_id, revision", [
    ("someone/lora", "someone/lora", None),
    ("someone/lora@v1.2", "someone/lora", "v1.2"),
    ("hub:someone/lora@refs/pr/3", "someone/lora", "refs/pr/3"),
    ("https://huggingface.co/someone/lora", "someone/lora", None),
    ("gpt2", "gpt2", None),
])
def test_parse_repo_ref(text, repo_id, revision):
    assert hub.parse_repo_ref(text) == hub.RepoRef(repo_id, revision)


SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("text, repo_id, revision, path", [
    (f"hf://someone/lora@{SHA}/sub/dir", "someone/lora", SHA, "sub/dir"),
    (f"hf://someone/lora@{SHA}", "someone/lora", SHA, None),
    ("hf://someone/lora@dev/x", "someone/lora", "dev/x", None),  # a branch's name may hold '/'
    ("https://huggingface.co/someone/lora/tree/main", "someone/lora", "main", None),
    ("https://huggingface.co/someone/lora/tree/refs%2Fpr%2F2/sub", "someone/lora", "refs/pr/2", "sub"),
    ("https://huggingface.co/someone/lora/blob/v1/x.safetensors?download=true", "someone/lora", "v1", "x.safetensors"),
    ("https://huggingface.co/someone/lora/resolve/main/a/b.safetensors", "someone/lora", "main", "a/b.safetensors"),
])
def test_parse_repo_path(text, repo_id, revision, path):
    assert hub.parse_repo_path(text) == (hub.RepoRef(repo_id, revision), path)


@pytest.mark.parametrize("text", ["", "a/b/c", "someone/lora@", "../x", "someone/x..y", "someone/lo ra", "a--b/c",
                                  "someone/lora@/home/me/.bashrc"])
def test_parse_repo_ref_refuses(text):
    """(A revision that starts with '/' names no branch, tag or commit — git refuses such a ref — and, recorded as
    the Hub cache's refs/<revision> once pulled, as huggingface_hub records it, it was that absolute path: a Hub
    answering any revision had loraops write a commit sha over the file there.)"""
    with pytest.raises(InvalidInputError):
        hub.parse_repo_ref(text)


@pytest.mark.parametrize("text, kind", [("datasets/someone/data", "dataset"), ("hub:spaces/someone/app@main", "Space"),
                                        ("https://huggingface.co/datasets/someone/data", "dataset")])
def test_a_dataset_or_space_is_named_as_such(text, kind):
    """A dataset's or Space's id (or URL) was "not a Hub repo id": it is one, of a kind loraops does not read."""
    with pytest.raises(InvalidInputError) as caught:
        hub.parse_repo_ref(text)
    assert str(caught.value) == f"{text!r} is a {kind} repo: loraops reads model repos (owner/name[@revision])"


# ---- pull ------------------------------------------------------------------------------------------------------


def test_download_by_branch_tag_and_sha(peft_repo):
    first, second = peft_repo
    latest = hub.download_adapter("someone/lora")
    assert latest.commit == second and latest.source == f"hf://someone/lora@{second}"
    assert latest.files == ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    assert (latest.adapter_path / "adapter_model.safetensors").read_bytes() == b"w2" * 64
    assert not (latest.folder / "training_args.json").exists()  # only the adapter's files

    tagged = hub.download_adapter("someone/lora@v1")
    assert tagged.commit == first
    assert (tagged.adapter_path / "adapter_model.safetensors").read_bytes() == b"w1" * 64
    assert tagged.card.read_bytes() == b"# card\n"

    assert hub.download_adapter(f"someone/lora@{first}").commit == first
    assert hub.download_adapter(f"someone/lora@{first[:8]}").commit == first


def test_offline_pull_from_cache(peft_repo, fake_hub, monkeypatch):
    first, second = peft_repo
    hub.download_adapter("someone/lora@v1")
    hub.download_adapter("someone/lora")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(fake_hub.requests)
    assert hub.download_adapter("someone/lora@v1").commit == first
    assert hub.download_adapter("someone/lora").commit == second
    assert hub.download_adapter(f"someone/lora@{first}").commit == first
    assert hub.download_adapter(f"someone/lora@{first[:7].upper()}").commit == first  # a prefix, as online
    assert len(fake_hub.requests) == before  # nothing went over the wire
    with pytest.raises(NotFoundError, match=r"someone/other is not in the local Hub cache .* HF_HUB_OFFLINE=1"):
        hub.download_adapter("someone/other")
    unknown = "0" * 8 if not first.startswith("0" * 8) else "f" * 8
    with pytest.raises(NotFoundError, match=rf"someone/lora@{unknown} is not in the local Hub cache"):
        hub.download_adapter(f"someone/lora@{unknown}")
    (hub.cache_dir() / "models--someone--lora" / "snapshots" / (first[:7] + "0" * 33)).mkdir()
    with pytest.raises(AmbiguousError, match=rf"^someone/lora@{first[:7]}: 2 cached commits start with {first[:7]} "
                                             rf"\({min(first[:12], first[:7] + '00000')}, .*\); give more of the sha$"):
        hub.download_adapter(f"someone/lora@{first[:7]}")


def test_kohya_single_file_and_choices(fake_hub):
    fake_hub.commit("someone/style", {"style.safetensors": b"k" * 32, "sample.png": b"png"})
    assert hub.download_adapter("someone/style").adapter_path.name == "style.safetensors"

    commit = fake_hub.commit("someone/epochs", {"e1.safetensors": b"1", "e2.safetensors": b"2",
                                                "sub/adapter_config.json": b"{}", "sub/adapter_model.safetensors": b"s",
                                                "sub/more/x.safetensors": b"x"})
    with pytest.raises(AmbiguousError, match=r"someone/epochs: several .safetensors files \(e1.safetensors, "
                                             r"e2.safetensors\); pick one with subpath"):
        hub.download_adapter("someone/epochs")
    e2 = hub.download_adapter("someone/epochs", subpath="e2.safetensors")
    assert e2.adapter_path.read_bytes() == b"2" and e2.source == f"hf://someone/epochs@{commit}/e2.safetensors"
    peft_sub = hub.download_adapter("someone/epochs", subpath="sub")
    assert peft_sub.files == ["sub/adapter_config.json", "sub/adapter_model.safetensors"]
    assert peft_sub.adapter_path == peft_sub.folder / "sub"
    assert peft_sub.source == f"hf://someone/epochs@{commit}/sub"  # where in the repo it came from
    by_file = hub.download_adapter("someone/epochs", subpath="sub/adapter_model.safetensors")
    assert by_file.files == peft_sub.files and by_file.source == peft_sub.source
    nested = hub.download_adapter("someone/epochs", subpath="sub/more/x.safetensors")
    assert nested.source == f"hf://someone/epochs@{commit}/sub/more/x.safetensors"
    assert hub.parse_hub_source(nested.source) == hub.RepoRef("someone/epochs", commit)
    assert hub.download_adapter("someone/style").source.endswith("/style.safetensors")


def test_the_pull_that_repairs_a_pulled_file_quotes_its_path(fake_hub):
    """hub.pull_again (the repair verify and a damaged stored copy name) gave a path with a blank or a bracket
    unquoted (`--file loras/my style [v2].safetensors`), which a shell splits: it did not run as printed."""
    import shlex

    name = "loras/my style [v2].safetensors"
    commit = fake_hub.commit("someone/style", {name: b"k" * 32})
    source = hub.download_adapter("someone/style", subpath=name).source
    again = hub.pull_again(source)
    assert again == f"loraops pull someone/style@{commit} --file 'loras/my style [v2].safetensors'"
    _, _, ref, _, path = shlex.split(again)
    assert hub.download_adapter(ref, subpath=path).source == source


def test_peft_folders_in_subfolders_are_listed(fake_hub):
    """No adapter at the root (or in the folder asked for), PEFT folders below it: the only one is taken, several are
    listed in one line."""
    peft = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w"}
    fake_hub.commit("someone/two", {**{f"a/{n}": b for n, b in peft.items()}, **{f"b/{n}": b for n, b in peft.items()},
                                    "c/notes.txt": b"", "README.md": b"# two"})
    with pytest.raises(AmbiguousError, match=r"^someone/two: no adapter at the top level, but 2 PEFT adapter folders "
                                             r"below it \(a, b\); pick one with subpath FOLDER$"):
        hub.download_adapter("someone/two")
    assert hub.download_adapter("someone/two", subpath="b").files == ["b/adapter_config.json", "b/adapter_model.safetensors"]
    commit = fake_hub.commit("someone/deep", {f"runs/x/final/{n}": b for n, b in peft.items()} | {"runs/x/log.txt": b""})
    for subpath in (None, "runs", "runs/x/final"):
        only = hub.download_adapter("someone/deep", subpath=subpath)
        assert only.files == ["runs/x/final/adapter_config.json", "runs/x/final/adapter_model.safetensors"]
        assert only.source == f"hf://someone/deep@{commit}/runs/x/final"
    fake_hub.commit("someone/deep", {f"runs/y/{n}": b for n, b in peft.items()})
    with pytest.raises(AmbiguousError, match=r"^someone/deep@main: no adapter in runs/, but 2 PEFT adapter folders "
                                             r"below it \(runs/x/final, runs/y\); pick one with subpath FOLDER$"):
        hub.download_adapter("someone/deep@main", subpath="runs")


def test_nothing_adapter_like_lists_the_files(fake_hub):
    fake_hub.commit("someone/model", {"config.json": b"{}", "pytorch_model.bin": b"pickle"})
    with pytest.raises(NotFoundError, match=r"^someone/model: nothing adapter-like .*the repo holds: .gitattributes, "
                                            r"config.json, pytorch_model.bin$"):
        hub.download_adapter("someone/model")
    fake_hub.commit("someone/binpeft", {"adapter_config.json": b"{}", "adapter_model.bin": b"pickle"})
    with pytest.raises(FormatError, match="adapter_model.bin \\(pickle"):
        hub.download_adapter("someone/binpeft")


@pytest.mark.parametrize("name", ["../evil.safetensors", "a/../../evil.safetensors", "/etc/evil.safetensors",
                                  "a\\..\\evil.safetensors"])
def test_names_escaping_the_folder_are_refused(fake_hub, name, tmp_path):
    fake_hub.commit("someone/evil", {name: b"x", "ok.txt": b"y"})
    with pytest.raises(HubError, match=r"refusing file name .* would escape the download folder"):
        hub.download_adapter("someone/evil")
    assert not any(tmp_path.parent.rglob("evil.safetensors"))


def _safetensors(tmp_path: Path, name: str, tensors: dict) -> bytes:
    import torch

    from loraops import st

    st.write_safetensors(tmp_path / name, {k: torch.zeros(shape) for k, shape in tensors.items()})
    return (tmp_path / name).read_bytes()


MODEL_TENSORS = {"model.embed_tokens.weight": (64, 8), "model.layers.0.self_attn.q_proj.weight": (8, 8),
                 "lm_head.weight": (64, 8)}


def test_a_models_repo_is_refused_from_its_header_before_anything_is_downloaded(fake_hub, tmp_path):
    """`pull` of a base model's repo (a lone model.safetensors) downloaded the whole file — gigabytes — before reading
    it and refusing it as no adapter. Its header is read first, with HTTP ranges, and judged as the downloaded file
    would be."""
    weights = _safetensors(tmp_path, "model.safetensors", MODEL_TENSORS)
    fake_hub.commit("meta/tiny", {"model.safetensors": weights, "config.json": b"{}"})
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(FormatError) as caught:
        hub.download_adapter("meta/tiny@main", into=into)
    assert str(caught.value) == (
        "meta/tiny@main/model.safetensors: not a LoRA adapter (unknown key layout): 'lm_head.weight', "
        "'model.embed_tokens.weight', 'model.layers.0.self_attn.q_proj.weight'; if it is a model, `loraops base add "
        "hub:meta/tiny@main` records it as a base (nothing was downloaded)")
    reads = fake_hub.downloads("model.safetensors")
    assert reads and all(r["range"] is not None for r in reads)  # the header's range only, never the whole file
    assert list(into.iterdir()) == [] and not any(hub.cache_dir().rglob("model.safetensors"))


def test_a_models_repo_with_adapters_in_subfolders_names_them(fake_hub, tmp_path):
    """A model at the top of a repo and PEFT adapters in subfolders (a common layout for a fine-tune and its LoRA):
    `pull` said to `base add` the model, not that the adapter the user came for is taken with --file."""
    weights = _safetensors(tmp_path, "model.safetensors", MODEL_TENSORS)
    peft = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w"}
    fake_hub.commit("meta/tuned", {"model.safetensors": weights, **{f"lora/{n}": b for n, b in peft.items()}})
    with pytest.raises(FormatError) as one:
        hub.download_adapter("meta/tuned")
    assert str(one.value).endswith(
        "; the PEFT adapter in lora/ is pulled with `loraops pull meta/tuned --file lora`; if model.safetensors is a "
        "model, `loraops base add hub:meta/tuned` records it as a base (nothing was downloaded)")
    fake_hub.commit("meta/tuned", {f"runs/x/{n}": b for n, b in peft.items()})
    with pytest.raises(FormatError) as two:
        hub.download_adapter("meta/tuned@main")
    assert str(two.value).endswith(
        "; 2 PEFT adapter folders are below it (lora, runs/x): pick one with `loraops pull meta/tuned@main --file "
        "FOLDER`; if model.safetensors is a model, `loraops base add hub:meta/tuned@main` records it as a base "
        "(nothing was downloaded)")
    assert all(r["range"] is not None for r in fake_hub.downloads("model.safetensors"))
    assert hub.download_adapter("meta/tuned", subpath="lora").files == ["lora/adapter_config.json",
                                                                        "lora/adapter_model.safetensors"]
    shards = {f"model-0000{i}-of-00002.safetensors": weights for i in (1, 2)}
    fake_hub.commit("meta/sharded", {**shards, **{f"lora/{n}": b for n, b in peft.items()}})
    with pytest.raises(AmbiguousError, match=r"^meta/sharded: several .safetensors files \(model-00001-of-00002."
                                             r"safetensors, model-00002-of-00002.safetensors\); pick one with subpath, "
                                             r"or the PEFT adapter folder lora$"):
        hub.download_adapter("meta/sharded")


def test_an_adapter_file_is_judged_by_its_header_then_downloaded(fake_hub, tmp_path):
    """A kohya file passes the header check and is downloaded; one in a layout loraops refuses is refused from its
    header with the message the downloaded file would get; a file whose header the client cannot parse is left to
    the download (the reader then says what is wrong with it)."""
    kohya = _safetensors(tmp_path, "style.safetensors", {"lora_unet_x_q.lora_down.weight": (2, 8),
                                                         "lora_unet_x_q.lora_up.weight": (8, 2)})
    fake_hub.commit("someone/style", {"style.safetensors": kohya})
    assert hub.download_adapter("someone/style").adapter_path.read_bytes() == kohya
    assert [r["range"] is None for r in fake_hub.downloads("style.safetensors")] == [False, True]
    oft = _safetensors(tmp_path, "oft.safetensors", {"transformer.h.0.attn.ia3_l": (8,)})  # (IA)³
    fake_hub.commit("someone/oft", {"oft.safetensors": oft})
    from loraops import formats

    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "oft.safetensors").write_bytes(oft)
    with pytest.raises(FormatError) as local:
        formats.detect(tmp_path / "local" / "oft.safetensors")
    with pytest.raises(FormatError) as remote:
        hub.download_adapter("someone/oft")
    assert str(remote.value) == str(local.value).replace(str(tmp_path / "local"), "someone/oft")
    assert all(r["range"] is not None for r in fake_hub.downloads("oft.safetensors"))


@pytest.mark.parametrize("ignore_ranges", [True, False])
def test_an_endpoint_that_ignores_ranges_sends_little_more_than_the_header(fake_hub, tmp_path, ignore_ranges):
    """An endpoint that ignores HTTP ranges (some mirrors, plain file servers) answers the header check's ranged
    reads with the whole file (200): the client read all of it, a model's gigabytes, to judge its header, for
    `pull` and for `base add hub:`. The answer is now streamed and closed once the header is in, whether it is in
    the first 100 kB read or needs a second read (a header of 2,000 tensors here)."""
    size = 64 * 2**20
    many = {f"model.layers.{i}.mlp.experts.gate_proj.weight": (1,) for i in range(2000)}
    weights = _safetensors(tmp_path, "model.safetensors", {**MODEL_TENSORS, **many, "model.big.weight": (size // 4,)})
    header_end = 8 + int.from_bytes(weights[:8], "little")
    assert header_end > 100_001
    fake_hub.commit("meta/big", {"model.safetensors": weights, "config.json": b"{}"})
    fake_hub.ignore_ranges = ignore_ranges
    with pytest.raises(FormatError, match=r"^meta/big/model.safetensors: not a LoRA adapter .* `loraops base add "
                                          r"hub:meta/big` records it"):
        hub.download_adapter("meta/big")
    base = hub.remote_base("hub:meta/big")
    assert base.tensors["model.big.weight"].shape == (size // 4,) and len(base.tensors) == len(MODEL_TENSORS) + 2001
    gets = fake_hub.downloads("model.safetensors")
    assert len(gets) == 4  # the first 100 kB, then the rest of the header; for pull, then for base add
    # what was read, and what the socket buffers took before the connection closed (~4 MB at most, measured)
    assert all(r["sent"] < size / 8 for r in gets)
    assert not any(hub.cache_dir().rglob("model.safetensors"))


def test_a_remote_header_of_a_file_named_with_url_characters(fake_hub, tmp_path):
    """A repo path with a blank, '#', '?' or non-ASCII letters is escaped in the header's URL (a '#' cut it short)."""
    name = "sub dir/ü mödel #1?.safetensors"
    commit = fake_hub.commit("meta/odd", {name: _safetensors(tmp_path, "model.safetensors", MODEL_TENSORS)})
    assert hub.remote_header(hub.RepoRef("meta/odd"), name, commit, None).keys() == MODEL_TENSORS.keys()
    assert [r["path"] for r in fake_hub.downloads()] == [f"/meta/odd/resolve/{commit}/{name}"]


@pytest.mark.parametrize("ignore_ranges", [False, True])
def test_a_header_behind_the_hubs_redirect_is_read_with_ranges(fake_hub, tmp_path, ignore_ranges):
    """The Hub answers a weights file's resolve URL with a redirect to its CDN (LFS, Xet): the header's reads follow
    it with their Range, the second read of a large header too, for `base add hub:` and pull's check."""
    many = {f"model.layers.{i}.mlp.experts.gate_proj.weight": (1,) for i in range(2000)}
    weights = _safetensors(tmp_path, "model.safetensors", {**MODEL_TENSORS, **many})
    header_end = 8 + int.from_bytes(weights[:8], "little")
    fake_hub.commit("meta/big", {"model.safetensors": weights})
    fake_hub.redirect_files, fake_hub.ignore_ranges = True, ignore_ranges
    assert len(hub.remote_base("meta/big").tensors) == len(MODEL_TENSORS) + 2000
    with pytest.raises(FormatError, match=r"^meta/big/model.safetensors: not a LoRA adapter "):
        hub.download_adapter("meta/big")
    cdn = [r["range"] for r in fake_hub.requests if r["path"].startswith("/cdn/")]
    assert cdn == ["bytes=0-99999", f"bytes=100000-{header_end - 1}"] * 2
    assert not any(hub.cache_dir().rglob("model.safetensors"))


@pytest.mark.parametrize("bad", ["../evil.safetensors", "a\\..\\evil.safetensors", "/etc/evil.safetensors"])
def test_file_picks_the_named_file_past_a_bad_name_elsewhere(fake_hub, bad, tmp_path):
    """A name loraops refuses anywhere in the listing blocked `pull --file` of another file; with --file only the
    files picked (and the config a PEFT weights file needs) are judged. Without --file the listing still is."""
    peft = {"good/adapter_config.json": b"{}", "good/adapter_model.safetensors": b"w"}
    fake_hub.commit("someone/mixed", {bad: b"x", "style.safetensors": b"k" * 16, **peft})
    assert hub.download_adapter("someone/mixed", subpath="style.safetensors").files == ["style.safetensors"]
    assert hub.download_adapter("someone/mixed", subpath="good/adapter_model.safetensors").files == sorted(peft)
    assert hub.download_adapter("someone/mixed", subpath="good").files == sorted(peft)
    with pytest.raises(HubError, match=r"refusing file name .* would escape the download folder"):
        hub.download_adapter("someone/mixed")
    fake_hub.commit("someone/mixed", {"sub/a\\b.safetensors": b"x"})  # the one picked in a folder: still judged
    with pytest.raises(HubError, match=r"^someone/mixed: refusing file name 'sub/a\\\\b.safetensors'"):
        hub.download_adapter("someone/mixed", subpath="sub")
    assert not any(tmp_path.parent.rglob("evil.safetensors"))


# ---- errors ----------------------------------------------------------------------------------------------------


def test_repo_and_revision_not_found(peft_repo):
    with pytest.raises(NotFoundError, match=r"^repository someone/nope not found on http://127.0.0.1:\d+ \(if it is "
                                            r"private, log in"):
        hub.download_adapter("someone/nope")
    with pytest.raises(NotFoundError, match=r"^someone/lora@v9: revision not found \(use a branch, a tag or a commit"):
        hub.download_adapter("someone/lora@v9")


def test_private_repo_needs_the_owners_token(fake_hub, monkeypatch):
    fake_hub.create("me/secret", private=True)
    fake_hub.commit("me/secret", {"a.safetensors": b"s"})
    with pytest.raises(NotFoundError, match="repository me/secret not found .*if it is private"):
        hub.download_adapter("me/secret")
    with pytest.raises(NotFoundError):
        hub.download_adapter("me/secret", token="hf_other")
    assert hub.download_adapter("me/secret", token="hf_owner").adapter_path.read_bytes() == b"s"
    monkeypatch.setenv("HF_TOKEN", "hf_owner")  # the environment's token is used when no argument is given
    assert hub.download_adapter("me/secret").adapter_path.read_bytes() == b"s"
    with pytest.raises(HubError, match="refused the token .* invalid or expired"):
        hub.download_adapter("me/secret", token="hf_wrong")  # the argument wins


NON_ASCII = "holds '…', which an HTTP header cannot carry (a token is ASCII; one copied as shown, cut short?)"


@pytest.mark.parametrize("token, what, env", [
    ("hf_s3cretT0ken…", NON_ASCII, False), ("hf_s3cretT0ken…", NON_ASCII, True),
    (" hf_s3cretT0ken ", "has a blank at an end or a control character, which an HTTP header cannot carry", False)])
def test_a_token_no_header_carries_is_bad_input_and_never_shown(fake_hub, monkeypatch, env, token, what):
    """A token holding a non-ASCII character (one copied as the Hub shows it, cut short with '…') was a Hub error,
    `cannot resolve REPO: 'ascii' codec can't encode character '\\u2026' in position 16…` (exit 7); one with a blank
    at an end (given as an argument: huggingface_hub strips $HF_TOKEN's) was `cannot reach the Hub …
    (LocalProtocolError: Illegal header value b'Bearer  hf_…')`, printing the token. Both are bad input, in one line
    that says what to check, without the token."""
    fake_hub.commit("someone/lora", {"a.safetensors": b"s"})
    if env:
        monkeypatch.setenv("HF_TOKEN", token)
    given = None if env else token
    with pytest.raises(InvalidInputError) as caught:
        hub.download_adapter("someone/lora", token=given)
    assert str(caught.value) == (f"cannot resolve someone/lora: the Hub token {what}; check token, else $HF_TOKEN, "
                                 "else the token saved by `hf auth login`")
    with pytest.raises(InvalidInputError, match="^cannot push to me/x@main: the Hub token ") as caught:
        hub.upload("me/x", {"a.safetensors": b"s"}, message="m", token=given)
    assert "s3cret" not in str(caught.value) and "me/x" not in fake_hub.repos


def test_gated_repo(fake_hub):
    repo = fake_hub.create("corp/gated", gated=True)
    fake_hub.commit("corp/gated", {"a.safetensors": b"g"})
    for token in (None, "hf_other"):
        with pytest.raises(HubError, match=r"^corp/gated is gated: accept its conditions at http://127.0.0.1:\d+/"
                                           r"corp/gated with an account that has access"):
            hub.download_adapter("corp/gated", token=token)
    repo.granted.add("someone")
    assert hub.download_adapter("corp/gated", token="hf_other").adapter_path.read_bytes() == b"g"


def test_no_network_suggests_offline_mode():
    # HF_ENDPOINT points at a dead port (conftest)
    with pytest.raises(HubError, match=r"cannot reach the Hub at http://127.0.0.1:9 to resolve someone/lora "
                                       r"\(ConnectionRefusedError.*set HF_HUB_OFFLINE=1"):
        hub.download_adapter("someone/lora")


# ---- push ------------------------------------------------------------------------------------------------------


def test_upload_one_commit_private_branch_and_pr(fake_hub, tmp_path):
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(b"weights" * 100)
    files = {"adapter_model.safetensors": weights, "adapter_config.json": b"{}", "README.md": b"card"}
    done = hub.upload("me/new", files, message="add", private=True, token="hf_owner")
    assert fake_hub.repos["me/new"].private
    assert done.commit == fake_hub.repos["me/new"].branches["main"]
    stored = fake_hub.files("me/new")
    assert stored["adapter_model.safetensors"] == b"weights" * 100 and stored["README.md"] == b"card"
    commits = [r for r in fake_hub.requests if r["path"].startswith("/api/models/me/new/commit/")]
    assert len(commits) == 1  # all files in one atomic commit; the weights went through LFS
    assert any(r["path"].startswith("/lfs-upload/") for r in fake_hub.requests)

    dev = hub.upload("me/new", {"README.md": b"dev card"}, message="dev", revision="dev", token="hf_owner")
    assert fake_hub.files("me/new", "dev")["README.md"] == b"dev card"
    assert fake_hub.files("me/new")["README.md"] == b"card" and dev.revision == "dev"

    pr = hub.upload("me/new", {"README.md": b"pr card"}, message="pr", create_pr=True, token="hf_owner")
    assert pr.pr_url.endswith("/me/new/discussions/1")
    assert fake_hub.files("me/new", "refs/pr/1")["README.md"] == b"pr card"
    assert fake_hub.files("me/new")["README.md"] == b"card"


def test_private_refuses_a_public_repo_that_exists(fake_hub):
    """`--private` to a repo that exists and is public pushed into it (create_repo keeps an existing repo's
    visibility), publishing what the user asked to keep private. Nothing is pushed; a private repo takes it."""
    public = fake_hub.commit("me/open", {"README.md": b"card"})
    number = fake_hub.open_pr("me/open")
    for revision, create_pr in [(None, False), ("dev", False), (None, True), (f"refs/pr/{number}", False)]:
        with pytest.raises(InvalidInputError, match=r"^private=True: me/open exists and is public: nothing pushed"):
            hub.upload("me/open", {"a.safetensors": b"s"}, message="m", private=True, revision=revision,
                       create_pr=create_pr, token="hf_owner")
    repo = fake_hub.repos["me/open"]
    assert repo.branches == {"main": public} and repo.prs == {number: public} and not repo.private
    fake_hub.create("me/closed", private=True)
    done = hub.upload("me/closed", {"a.safetensors": b"s"}, message="m", private=True, token="hf_owner")
    assert fake_hub.files("me/closed")["a.safetensors"] == b"s" and done.changed


def test_upload_errors(fake_hub):
    with pytest.raises(HubError, match="refused to push to someone/x@main without valid credentials"):
        hub.upload("someone/x", {"a.txt": b"a"}, message="m")
    with pytest.raises(HubError, match=r"forbids you to push to someone/x@main .*write access"):
        hub.upload("someone/x", {"a.txt": b"a"}, message="m", token="hf_owner")
    with pytest.raises(HubError, match="would escape"):
        hub.upload("me/x", {"../a.txt": b"a"}, message="m", token="hf_owner")
    with pytest.raises(InvalidInputError, match="give the branch with revision, not @"):
        hub.upload("me/x@dev", {"a.txt": b"a"}, message="m", token="hf_owner")


def _xet_script(hub_url: str, early: bool) -> str:
    return "\n".join([
        "import os, sys, tempfile",
        "import huggingface_hub.constants" if early else "",
        "from loraops import hub",
        "from loraops.errors import HubError",
        f"os.environ['HF_ENDPOINT'] = {hub_url!r}",
        "try:",
        "    print(hub.upload('me/xet', {'w.safetensors': b'x' * 4096}, message='m', token='hf_owner').commit)",
        "except HubError as exc:",
        "    print('error:', exc)",
    ])


def test_xet_is_turned_off_before_huggingface_hub_is_imported(fake_hub):
    """The local Hub, like mirrors and self-hosted endpoints, does not speak Xet: loraops.hub must switch it off
    before huggingface_hub reads HF_HUB_DISABLE_XET; when huggingface_hub was imported earlier, it says so."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
    late = subprocess.run([sys.executable, "-c", _xet_script(fake_hub.url, early=False)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert late.stdout.strip() == fake_hub.repos["me/xet"].branches["main"], late.stderr
    early = subprocess.run([sys.executable, "-c", _xet_script(fake_hub.url, early=True)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert "does not accept Xet uploads" in early.stdout and "set HF_HUB_DISABLE_XET=1" in early.stdout, early.stderr


# ---- model card ------------------------------------------------------------------------------------------------


def test_card_front_matter_and_body():
    card = hub.render_card(hub.CardInfo(
        name="anime-style", format="peft", ranks={"model.layers.0.self_attn.q_proj": 8,
                                                  "model.layers.0.self_attn.v_proj": 8},
        alphas={"model.layers.0.self_attn.q_proj": 16.0, "model.layers.0.self_attn.v_proj": 16.0},
        base_model="meta-llama/Llama-3.2-1B"))
    front, body = card.split("---\n")[1], card.split("---\n")[2]
    assert front == ('library_name: peft\nbase_model: "meta-llama/Llama-3.2-1B"\nbase_model_relation: adapter\n'
                     'tags:\n- "lora"\n- "loraops"\n')
    assert "| rank | 8 |" in body and "| alpha | 16 |" in body and "| target modules | q_proj, v_proj |" in body
    assert "Lineage" not in body


def test_card_kohya_local_base_and_lineage():
    card = hub.render_card(hub.CardInfo(
        name="combo", format="kohya", ranks={"a.q": 4, "a.k": 16}, alphas={"a.q": 4.0, "a.k": 8.0},
        base_model="/models/sdxl.safetensors", method="linear",
        inputs=[hub.CardInput("style@1", 0.7, "someone/style@" + "a" * 40), hub.CardInput("subject@2", 0.3)],
        params={"density": 0.5}))
    front = card.split("---\n")[1]
    assert "library_name" not in front and "base_model" not in front  # a local path is not a Hub repo id
    assert '- "kohya"' in front
    assert "| rank | 4–16 (per module) |" in card
    assert "by **linear** of:" in card
    assert f"| style@1 | 0.7 | someone/style@{'a' * 40} |" in card and "| subject@2 | 0.3 |  |" in card
    assert "`density=0.5`" in card


def test_card_shows_each_inputs_block_weights():
    """combine's lineage block_weights (a list or null per input) are a column of the inputs' table, not a Python
    repr among the parameters; the old shape (a list for every input) reads the same."""
    for recorded, first in ([None, [0.5] * 16 + [0.1]], "-"), ([[1.0] * 17, [0.5] * 16 + [0.1]], "1" + ",1" * 16):
        card = hub.render_card(hub.CardInfo(
            name="combo", format="kohya", ranks={"a.q": 4}, alphas={"a.q": 4.0}, method="cat",
            inputs=[hub.CardInput("style@1", 0.7), hub.CardInput("subject@2", 0.3)],
            params={"method": "cat", "block_weights": recorded}))
        assert "| input | weight | source | block weights |\n|---|---|---|---|\n" in card
        assert f"| style@1 | 0.7 |  | {first} |" in card
        assert "| subject@2 | 0.3 |  | " + "0.5," * 16 + "0.1 |" in card
        assert "block_weights" not in card and "None" not in card and "`method=cat`" in card


# ---- base models -----------------------------------------------------------------------------------------------


def test_remote_base_manifest_from_headers_only(fake_hub, tmp_path):
    from factories import tiny_llama

    from loraops.basemodel import BaseModel

    folder = tiny_llama(tmp_path / "base", shard_size="200KB")
    assert (folder / "model.safetensors.index.json").exists()
    fake_hub.commit_folder("meta/tiny", folder)
    fake_hub.commit("meta/tiny", {"original/consolidated.pth": b"pickle"})
    base = hub.remote_base("hub:meta/tiny")
    local = BaseModel.open(folder)
    assert {n: (t.dtype, t.shape) for n, t in base.tensors.items()} == \
        {n: (t.dtype, t.shape) for n, t in local.tensors.items()}
    assert sorted(base.weight_files) == sorted(f.name for f in local.files)
    assert "config.json" in base.other_files and "original/consolidated.pth" not in base.other_files
    weights_gets = [r for r in fake_hub.downloads(".safetensors")]
    assert weights_gets and all(r["range"] for r in weights_gets)  # header ranges only
    sizes = {f.name: f.stat().st_size for f in local.files}
    for name in base.weight_files:
        sent = sum(r["sent"] for r in weights_gets if r["path"].endswith("/" + name))
        assert sent <= min(sizes[name], 100_001)
    assert not list((Path(os.environ["HF_HOME"]) / "hub").rglob("*.safetensors"))

    path = hub.download_base("meta/tiny")
    assert sorted(p.name for p in path.glob("*.safetensors")) == sorted(sizes)
    assert not (path / "original").exists()
    assert BaseModel.open(path).fingerprint() == local.fingerprint()


def test_remote_base_pipeline_and_pickles(fake_hub):
    fake_hub.commit("sd/pipe", {"model_index.json": b"{}", "unet/config.json": b"{}"})
    from safetensors.torch import save

    import torch

    fake_hub.commit("sd/pipe", {"unet/diffusion_pytorch_model.safetensors": save({"conv.weight": torch.zeros(2, 3)}),
                                "vae/diffusion_pytorch_model.safetensors": save({"dec.weight": torch.zeros(4)})})
    base = hub.remote_base("sd/pipe")
    assert {n: t.shape for n, t in base.tensors.items()} == {"unet.conv.weight": (2, 3), "vae.dec.weight": (4,)}
    fake_hub.commit("old/model", {"config.json": b"{}", "pytorch_model.bin": b"pickle"})
    with pytest.raises(FormatError, match=r"^old/model: no .safetensors weights \(only pickle files: pytorch_model.bin"):
        hub.remote_base("old/model")
    assert json.loads(fake_hub.files("sd/pipe")["model_index.json"]) == {}


@pytest.mark.parametrize("ignore_ranges", [False, True])
def test_a_remote_header_that_is_not_one_is_refused_in_one_line(fake_hub, tmp_path, ignore_ranges):
    """`base add hub:` of a repo whose weights file is no safetensors file: one line naming the file, as the local
    reader would; pull leaves such a file to its download (the reader there says what is wrong)."""
    good = _safetensors(tmp_path, "model.safetensors", MODEL_TENSORS)
    fake_hub.ignore_ranges = ignore_ranges
    length = int.from_bytes(good[:8], "little")
    cases = {b"abc": "not a safetensors file (no header of a readable size)",
             good[:40]: f"truncated or not a safetensors file (header of {length} bytes, file of 40)",
             b"\x02" + b"\0" * 7 + b"[]": "not a safetensors file (header is not a JSON object)",
             b"\x07" + b"\0" * 7 + b'{"a":1}': "corrupt safetensors header (tensor 'a': entry is not an object)",
             # read as the local reader reads a header (st.parse_header): as the safetensors library does
             _header_text(b'\xef\xbb\xbf{"a":1}'):
                 "not a safetensors file (header starts with a byte order mark; its JSON must not)",
             _header_text(b'{"a":NaN,"b":1}'): "corrupt safetensors header (NaN is not JSON)",
             # a dtype safetensors has (complex) that loraops does not read: no corrupt file
             _header({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}):
                 "tensor 'a' is C64 (complex64): loraops does not support tensors of that dtype",
             _header({"a": {"dtype": 5, "shape": [1], "data_offsets": [0, 8]}}):
                 "corrupt safetensors header (tensor 'a': unknown dtype 5)",
             _header({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}):  # (a TypeError traceback)
                 "corrupt safetensors header (tensor 'a': unknown dtype ['F32'])",
             _header({"a": {"dtype": "f32 ", "shape": [1], "data_offsets": [0, 4]}}):  # no dtype's name
                 "corrupt safetensors header (tensor 'a': unknown dtype 'f32 ')",
             _header({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}):  # a name no library has
                 "corrupt safetensors header (tensor 'a': unknown dtype 'Q7')",
             _header({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}):
                 "corrupt safetensors header (tensor 'a': bad shape [-1])"}
    for n, (data, says) in enumerate(cases.items()):
        fake_hub.commit(f"meta/bad{n}", {"model.safetensors": data})
        with pytest.raises(FormatError) as caught:
            hub.remote_base(f"meta/bad{n}")
        assert str(caught.value) == f"meta/bad{n}/model.safetensors: {says}"


def _header(header: dict) -> bytes:
    return _header_text(json.dumps(header).encode())


def _header_text(raw: bytes) -> bytes:
    return len(raw).to_bytes(8, "little") + raw


def test_a_remote_header_that_claims_over_100_mb_is_refused_from_the_first_read(fake_hub, tmp_path):
    """A file whose first 8 bytes say a header of more than 100 MB (the limit of the safetensors library; here a
    PyTorch zip named .safetensors) is refused from the first ranged read: the second read asked for the header it
    claims, the whole file."""
    import torch

    torch.save(torch.zeros(2**18), tmp_path / "model.pt")
    fake_hub.commit("meta/zip", {"model.safetensors": (tmp_path / "model.pt").read_bytes()})
    with pytest.raises(FormatError) as caught:
        hub.remote_base("meta/zip")
    assert str(caught.value) == "meta/zip/model.safetensors: not a safetensors file (no header of a readable size)"
    assert [r["range"] for r in fake_hub.downloads("model.safetensors")] == ["bytes=0-99999"]


def test_a_remote_header_is_read_with_the_callers_token(fake_hub, tmp_path, monkeypatch):
    """`base add hub:` reads the headers as the caller: a gated repo's refusal is said as gated (the Hub's error
    answer is not read as a header), a private repo is read with the token given or HF_TOKEN."""
    weights = _safetensors(tmp_path, "model.safetensors", MODEL_TENSORS)
    fake_hub.create("corp/gated", gated=True)
    fake_hub.commit("corp/gated", {"model.safetensors": weights})
    with pytest.raises(HubError, match=r"^corp/gated is gated: accept its conditions at "):
        hub.remote_base("corp/gated", token="hf_other")
    assert fake_hub.downloads("model.safetensors")  # (refused reading the header, not before)
    fake_hub.repos["corp/gated"].granted.add("someone")
    assert hub.remote_base("corp/gated", token="hf_other").tensors.keys() == MODEL_TENSORS.keys()
    fake_hub.create("me/private", private=True)
    fake_hub.commit("me/private", {"model.safetensors": weights})
    assert hub.remote_base("me/private", token="hf_owner").tensors.keys() == MODEL_TENSORS.keys()
    monkeypatch.setenv("HF_TOKEN", "hf_owner")
    assert hub.remote_base("me/private").tensors.keys() == MODEL_TENSORS.keys()


def test_the_fake_hub_is_quiet_about_a_client_that_went_away(fake_hub, capfd):
    """A client that resets its connection (a `loraops pull` killed mid-request: test_crash's kill trials) made the
    fake Hub's server print a ConnectionResetError traceback on stderr, though nothing failed."""
    import socket
    import struct
    import time
    from urllib.parse import urlsplit

    address = urlsplit(fake_hub.url)
    before = len(fake_hub.requests)
    for _ in range(3):
        with socket.create_connection((address.hostname, address.port)) as client:
            client.sendall(b"GET /api/models/someone/x HTTP/1.1\r\nHost: hub\r\n\r\n")
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        deadline = time.monotonic() + 5
        while len(fake_hub.requests) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        before = len(fake_hub.requests)
    time.sleep(0.2)  # the handler threads meet the reset on their next read
    assert "Traceback" not in capfd.readouterr().err


def test_an_endpoint_that_is_not_a_hub(monkeypatch, tmp_path):
    """A plain web server at HF_ENDPOINT (a wrong mirror URL): still one line, never a traceback."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    (tmp_path / "api").mkdir()
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(HubError, match=r"^cannot resolve someone/lora: the Hub answered 404: ") as info:
            hub.download_adapter("someone/lora")
        assert "\n" not in str(info.value)
        server.shutdown()


def test_exactly_picks_each_name_and_no_other():
    """huggingface_hub reads allow_patterns as fnmatch globs (after turning backslashes into '/', which
    check_repo_names refuses in names first): each escaped name must pick itself alone from a listing of look-alikes."""
    from huggingface_hub.utils import filter_repo_objects

    names = ["style [v2].safetensors", "style v.safetensors", "a[b]c.safetensors", "abc.safetensors", "x]y[z.bin",
             "a[!b].st", "a!.st", "ac.st", "st?le.safetensors", "style.safetensors", "*.safetensors", "[", "]",
             "sub/[x]/y.safetensors", "sub/x/y.safetensors", "a[^b].st", "a[[]b.st", "a[b.st"]
    for name in names:
        assert list(filter_repo_objects(names, allow_patterns=hub.exactly([name]))) == [name], name


def test_an_offline_base_needs_what_basemodel_reads_of_it():
    """Offline, a Hub base's snapshot must hold what loraops.basemodel reads: the weights, a pipeline's
    model_index.json (without it the folder is not read as a pipeline), and each weights folder's config.json
    and safetensors index; not the other weight formats, the tokenizer, or a folder with no weights loraops reads."""
    names = ["model_index.json", "README.md", ".gitattributes", "config.json", "scheduler/scheduler_config.json",
             "unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.json",
             "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model-00002-of-00002.safetensors", "unet/diffusion_pytorch_model.bin",
             "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json",
             "vae/config.json", "vae/diffusion_pytorch_model.bin"]
    index = {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    weights = hub.weight_layout(names, lambda name: index)[0]
    assert sorted(hub.base_reads(names, weights)) == sorted([
        "model_index.json", "text_encoder/config.json", "text_encoder/model.safetensors", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors.index.json", "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors"])
    plain = ["config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"]
    assert hub.base_reads(plain, ["model.safetensors"]) == ["model.safetensors", "config.json"]


@pytest.mark.parametrize("corrupt", ["not JSON", "5000 digits", "deep"])
def test_a_corrupt_index_or_header_on_the_hub_is_one_line(fake_hub, tmp_path, corrupt):
    """A Hub base's safetensors index that Python's json cannot read was a traceback (JSONDecodeError, the 4300-digit
    limit's ValueError, RecursionError), and so were the last two in a safetensors header read by ranges: one
    FormatError naming the repo's file."""
    text = {"not JSON": b'{"weight_map": ', "5000 digits": b'{"n": 1' + b"0" * 5000 + b"}",
            "deep": b"[" * 100_000}[corrupt]
    shard = "model-00001-of-00001.safetensors"  # (beside model.safetensors, the index is not read: transformers')
    weights = _safetensors(tmp_path, shard, MODEL_TENSORS)
    fake_hub.commit("meta/index", {shard: weights, "model.safetensors.index.json": text})
    with pytest.raises(FormatError, match=r"^meta/index: model.safetensors.index.json: safetensors index is not JSON"):
        hub.remote_base("meta/index")
    fake_hub.commit("meta/header", {"model.safetensors": len(text).to_bytes(8, "little") + text})
    says = {"deep": r"corrupt safetensors header \(it nests deeper than 127\)"}.get(
        corrupt, r"not a safetensors file \(header is not JSON\)")  # (as st.read_header says of a local file)
    with pytest.raises(FormatError, match=rf"^meta/header/model.safetensors: {says}$"):
        hub.remote_base("meta/header")


def test_a_hub_base_of_shards_without_their_index_is_refused_as_a_local_one(fake_hub, tmp_path):
    """`base add hub:` read a repo's shards without their index by headers as they are (weight_layout), which the
    same folder downloaded is refused for (basemodel): the base was recorded and `check` passed, to fail at the
    first merge. Refused the same, and before the weights are fetched (also a pipeline's component)."""
    from factories import tiny_llama

    from loraops.basemodel import BaseModel

    folder = tiny_llama(tmp_path / "base", shard_size="200KB")
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(FormatError) as local:
        BaseModel.open(folder)
    fake_hub.commit_folder("meta/tiny", folder)
    with pytest.raises(FormatError) as remote:
        hub.remote_base("meta/tiny")
    assert str(remote.value) == "meta/tiny: " + str(local.value).removeprefix(f"{folder}: ")
    assert not fake_hub.downloads(".safetensors")

    names = ["model_index.json", "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model-00002-of-00002.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    with pytest.raises(FormatError, match=re.escape(
            "unet: shards diffusion_pytorch_model-0000N-of-00002.safetensors but no "
            "diffusion_pytorch_model.safetensors.index.json: the index is missing")):
        hub.weight_layout(names, lambda name: {})


def test_a_hub_base_reads_the_weights_a_local_one_does_not_its_variants():
    """A repo's variants (SD 1.5's unet/diffusion_pytorch_model.fp16.safetensors beside its default weights) were
    read with the default weights (each tensor twice: refused); a repo of one variant only is read through that
    variant's index, which an offline snapshot then needs."""
    names = ["model_index.json", "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert hub.weight_layout(names, lambda name: {})[1] == {
        "unet/diffusion_pytorch_model.safetensors": "unet.", "vae/diffusion_pytorch_model.fp16.safetensors": "vae."}
    shards = ["model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors"]
    names = ["config.json", "model.safetensors.index.fp16.json", *shards]
    read = []
    index = {"weight_map": {"a": shards[0], "b": shards[1]}}
    weights = hub.weight_layout(names, lambda name: read.append(name) or index)[0]
    assert weights == shards and read == ["config.json", "model.safetensors.index.fp16.json"]  # (transformers_weights)
    assert hub.base_reads(names, weights) == [*shards, "config.json", "model.safetensors.index.fp16.json"]


def test_offline_a_branch_named_like_a_commit_prefix_is_the_branch(monkeypatch):
    """Offline, a revision that could be a branch or a commit prefix (`beef`) is the branch where the Hub cache
    recorded one (refs/beef), as huggingface_hub and git read a name, though a cached snapshot's commit starts with
    it; without that ref it is the prefix. One rule with a recipe's base_model revision (hub.cached_ref)."""
    branch, snapshot = "1" * 40, "beef" + "2" * 36
    repo = hub.cache_dir() / "models--someone--x"
    for commit in (branch, snapshot):
        (repo / "snapshots" / commit).mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_commit(hub.RepoRef("someone/x", "beef")) == snapshot
    (repo / "refs").mkdir()
    (repo / "refs" / "beef").write_text(branch)
    assert hub.resolve_commit(hub.RepoRef("someone/x", "beef")) == branch


def test_a_hub_base_of_several_variants_is_told_what_a_hub_reference_can_do(fake_hub, tmp_path):
    """A repo of several variants and no default weights: the refusal told a `hub:` user to give one variant's file,
    which a Hub reference cannot name. It names the download that leaves out the other variants' files, whose
    folder is then read as the lone variant (a pipeline's component, with its folder)."""
    import torch
    from safetensors.torch import save_file

    from loraops.basemodel import BaseModel

    folder = tmp_path / "repo"
    folder.mkdir()
    save_file({"w": torch.zeros(2, dtype=torch.bfloat16)}, str(folder / "model.bf16.safetensors"))
    save_file({"w": torch.zeros(2, dtype=torch.float16)}, str(folder / "model.fp16.safetensors"))
    fake_hub.commit_folder("meta/variants", folder)
    with pytest.raises(FormatError) as remote:
        hub.remote_base("meta/variants")
    commit = hub.resolve_commit(hub.parse_repo_ref("meta/variants"), None)
    assert str(remote.value) == (
        "meta/variants: no default weights, only the variants bf16, fp16, which from_pretrained loads only with "
        f"variant=: a Hub reference cannot name one; download the repo without the other variants' files (hf download "
        f"meta/variants --revision {commit} --exclude '*.fp16*' --local-dir DIR) and give DIR as the base")
    (folder / "model.fp16.safetensors").unlink()  # what that download leaves
    assert BaseModel.open(folder).dtype == "BF16"
    names = ["model_index.json", "unet/diffusion_pytorch_model.fp16.safetensors",
             "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.ema.safetensors"]
    with pytest.raises(FormatError, match=re.escape(
            "unet: no default weights, only the variants ema, fp16, non_ema, which from_pretrained loads only with "
            "variant=: a Hub reference cannot name one; download the repo without the other variants' files (hf "
            "download REPO --exclude 'unet/*.fp16*' --exclude 'unet/*.non_ema*' --local-dir DIR)")):
        hub.weight_layout(names, lambda name: {})


def test_a_hub_base_whose_config_holds_a_lone_surrogate_escape_is_read(fake_hub, tmp_path):
    """A config.json with a lone surrogate escape ("\\ud800"), which transformers loads: `base add hub:` refused it
    (read for its transformers_weights), as a local base was refused at open."""
    from factories import tiny_llama

    folder = tiny_llama(tmp_path / "base")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"note": "\ud800"}))
    fake_hub.commit_folder("meta/odd", folder)
    assert hub.remote_base("meta/odd").weight_files == ["model.safetensors"]


def test_a_hub_base_patched_by_a_subfolder_index_reads_what_transformers_loads(fake_hub, tmp_path, monkeypatch):
    """A repo whose transformers_weights names patch/model.safetensors.index.json, listing the top-level shards but
    one, replaced by patch/<that shard> (the original left beside the top-level index): transformers loads it; `base
    add hub:` refused it by name as an unlisted shard. The original's header is read (a range): the index lists all
    its tensors, so it is replaced, not left out. The download (online, then offline from the cache) is the base."""
    from test_basemodel import _patched_model

    from loraops.basemodel import BaseModel

    folder, last, patch = _patched_model(tmp_path)
    local = BaseModel.open(folder)
    fake_hub.commit_folder("meta/patched", folder)
    base = hub.remote_base("meta/patched")
    assert sorted(base.weight_files) == sorted(set(patch["weight_map"].values()))
    assert {n: (t.dtype, t.shape) for n, t in base.tensors.items()} == \
        {n: (t.dtype, t.shape) for n, t in local.tensors.items()}
    path = hub.download_base("meta/patched")
    assert not (path / last).exists() and BaseModel.open(path).fingerprint() == local.fingerprint()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert BaseModel.open(hub.download_base("meta/patched")).fingerprint() == local.fingerprint()
