"""Recipes: how a reference's Hub revision names a pulled base's commit (a branch or tag the Hub cache recorded before
a commit prefix), a LoRA's Hub revision said in recipe terms, a model entry naming the base written another way, and
a density above 1 kept whole as mergekit keeps it."""
from types import SimpleNamespace as NS

import pytest
import yaml

from factories import combine_inputs
from loraops.errors import InvalidInputError, MismatchError

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def recipe(method, *models, **top):
    doc = {"merge_method": method, "models": [{"model": m} if p is None else {"model": m, "parameters": p}
                                               for m, p in models]}
    doc.update(top)
    return doc


def write(path, doc):
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return combine_inputs(tmp_path_factory.mktemp("recipe-refs"))


def cached_ref(repo_id: str, name: str, commit: str) -> None:
    """A branch or tag ``name`` of ``repo_id`` as the Hub cache records one that was resolved (refs/<name>)."""
    from huggingface_hub.file_download import repo_folder_name

    from loraops.hub import cache_dir

    path = cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(commit)


def check(base_model: str) -> None:
    from loraops.derive import check_base_model

    base = NS(name="llama", source=f"hf://org/llama@{SHA}", path=None)
    pulled = NS(record=NS(ref="h@1", base=NS(id=7)), adapter=NS(base_model=None))
    check_base_model(NS(get_base=lambda i: base), [pulled], base_model)


def test_a_branch_the_hub_cache_recorded_is_read_before_a_commit_prefix():
    """A revision that could be a branch or a commit prefix (`beef`, all hex) is read as loraops resolves a pulled
    model's revision offline (hub.resolve_commit) and as git and huggingface_hub read a name: a branch or tag the Hub
    cache recorded under that exact name first (it was taken as a prefix of the commit whatever the branch held),
    else a commit prefix of at least 4 hex digits in any case (`BEEF`: git reads an abbreviation so; a branch of
    that name is another one). A branch pulled from (refs/<branch>: its commit) names the base (it was refused)."""
    check("org/llama@0123")  # no such branch here: a prefix of the commit
    check("org/llama@0123456789AB")  # a prefix in upper case, as git reads one
    cached_ref("org/llama", "0123", OTHER)  # a branch named 0123, at another commit
    with pytest.raises(MismatchError) as caught:
        check("org/llama@0123")
    assert str(caught.value) == (
        "base_model 'org/llama@0123': h@1 is for llama, pulled at commit 0123456789ab, and revision '0123' is the "
        "branch or tag 0123, at commit fedcba987654 as the Hub cache last resolved it (a branch or tag is read before "
        "a commit prefix, as git and the Hub read a name): give the commit, or no revision")
    check("org/llama@0123456789AB")  # not the branch 0123: a prefix still
    cached_ref("org/llama", "v1", SHA)  # the branch the base was pulled from
    check("org/llama@v1")
    check("llama@v1")  # the registry name at that branch: the same repo's branch
    cached_ref("org/other", "v2", SHA)  # another repo's branch of that name says nothing of this one
    with pytest.raises(MismatchError, match=r"^base_model 'org/llama@v2': h@1 is for llama, pulled at commit "
                                            r"0123456789ab, and revision 'v2' is not that commit \(loraops does not "
                                            r"look a branch or tag up"):
        check("org/llama@v2")
    with pytest.raises(MismatchError, match=r"revision 'V1' is not that commit"):
        check("org/llama@V1")  # branch names are exact: V1 is not v1
    with pytest.raises(MismatchError, match=r"revision '0123456789ABCDEF0123456789ABCDEF01234567' is not that commit"):
        check(f"org/llama@{SHA.upper()}")  # 40 digits in upper case: no full sha (huggingface_hub's), no prefix
    with pytest.raises(InvalidInputError, match=r"^base_model 'org/llama@\.\./x': invalid revision"):
        check("org/llama@../x")  # never a path out of the cache's refs/
