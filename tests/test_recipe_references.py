"""Recipes: how a reference's Hub revision names a pulled base's commit (a branch or tag the Hub cache recorded before
a commit prefix), a LoRA's Hub revision said in recipe terms, a model entry naming the base written another way, and
a density above 1 kept whole as mergekit keeps it."""
import os
import re
from types import SimpleNamespace as NS

import pytest
import yaml

from factories import combine_inputs, loraops_run as loraops
from loraops.errors import AmbiguousError, InvalidInputError, MismatchError
from loraops.recipe import parse_recipe

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


def test_a_commit_prefix_several_cached_commits_start_with_is_refused_as_a_pull_refuses_it(monkeypatch):
    """A base_model revision that is a prefix of the pulled commit and of another cached snapshot's was taken for the
    pulled commit; an offline pull of the same revision refuses it as ambiguous, and so does the recipe (one rule:
    hub.refuse_ambiguous). More of the sha names the commit."""
    from loraops import hub

    snapshots = hub.cache_dir() / "models--org--llama" / "snapshots"
    for commit in (SHA, "0123" + "f" * 36):
        (snapshots / commit).mkdir(parents=True, exist_ok=True)
    says = "org/llama@0123: 2 cached commits start with 0123 (0123456789ab, 0123ffffffff); give more of the sha"
    with pytest.raises(AmbiguousError) as caught:
        check("org/llama@0123")
    assert str(caught.value) == f"base_model 'org/llama@0123': {says}"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AmbiguousError, match="^" + re.escape(says) + "$"):
        hub.resolve_commit(hub.RepoRef("org/llama", "0123"))
    check("org/llama@01234")
    (snapshots / SHA).rmdir()  # (the pulled commit need not be cached: it is known)
    with pytest.raises(AmbiguousError):
        check("org/llama@0123")


@pytest.mark.registry_backend
def test_a_model_entry_too_long_for_a_file_name_is_read_as_a_registry_reference(files, tmp_path):
    """A model entry no file can be named (a part longer than the file system takes) got the OS's 'File name too
    long' (an OSError out of parse_recipe); it is no path, so it is read as a registry reference: the registry's one
    line where no adapter has it, and the adapter where one does (a 255-character name at @1 is longer than a file
    name, and a registry reference)."""
    long = "a" * 300
    assert parse_recipe(recipe("ties", (long, {"weight": 1}), (str(files["a"]), {"weight": 1}),
                               base_model="org/base")).inputs[0] == (long, 1.0)
    run = loraops("combine", "--recipe", write(tmp_path / "r.yml", recipe("ties", (long, {"weight": 1}),
                                                                          (str(files["b"]), {"weight": 1}))))
    assert run.returncode == 3 and run.stderr == f"error: no adapter {long!r} in the registry (give a name, " \
        "name@version, id or sha256 prefix of 6+ hex digits)\n", run.stderr
    name = "n" * 255
    assert loraops("register", files["a"], "--name", name).returncode == 0
    doc = recipe("ties", (f"{name}@1", {"weight": 1}), (str(files["b"]), {"weight": 1}))
    run = loraops("combine", "--recipe", write(tmp_path / "r.yml", doc), "--name", "long")
    assert run.returncode == 0, run.stderr



@pytest.mark.registry_backend
def test_a_reference_too_long_for_a_file_name_is_a_registry_reference_on_the_command_line(files, tmp_path):
    """What a recipe's model entry does (above), the command line does too, where the docs say it does (combine,
    export) and in merge, check and resize: a 255-character name at @1 is no path, so it resolves; it was the OS's
    'File name too long' (references.parse_weighted and refuse_output_over, merging and the registry still asked
    the file system with Path.exists, which raises it)."""
    name = "l" * 255
    assert loraops("register", files["a"], "--name", name).returncode == 0
    ref = f"{name}@1"
    for args in (("combine", ref, files["b"], "-o", tmp_path / "c", "--name", "long-combined"),
                 ("combine", f"{ref}:0.5", files["b"], "--name", "long-weighted"),
                 ("export", ref, "--format", "kohya", "-o", tmp_path / "k.safetensors"),
                 ("merge", ref, "--into", files["base"], "-o", tmp_path / "m", "--no-record"),
                 ("check", ref, "--base", files["base"]),
                 ("resize", ref, "--rank", "2", "-o", tmp_path / "r", "--name", "long-r2")):
        run = loraops(*args)
        assert run.returncode == 0, (args[0], run.stderr)
    run = loraops("combine", "a" * 300, files["b"], "-o", tmp_path / "c2")
    assert run.returncode == 3 and run.stderr.startswith(f"error: no adapter {'a' * 300!r} in the registry"), run.stderr

def test_a_lora_revision_is_said_in_recipe_terms(files, tmp_path):
    """`BASE+path/lora@v2` (mergekit: the LoRA path/lora at the Hub revision v2) was refused with combine's 'the part
    after @ must be a version number'; the recipe says what is wrong: a recipe's LoRA is a registry reference or a
    path, and the revision is a Hub one it does not fetch. `@2` stays the registry version."""
    with pytest.raises(InvalidInputError) as caught:
        parse_recipe(recipe("ties", ("org/base+path/lora@v2", {"weight": 1}), base_model="org/base"), "r.yml")
    assert str(caught.value) == (
        "r.yml: models[1]: 'org/base+path/lora@v2' names the LoRA path/lora at revision 'v2', a Hub revision (as "
        "mergekit reads it), which a recipe does not fetch: a recipe's LoRA is a registry reference (NAME or "
        "NAME@VERSION, a version number) or a path (loraops pull path/lora@v2 registers it)")
    with pytest.raises(InvalidInputError, match=r"^r.yml: models\[1\]: 'style@main' names the model style at "
                                                r"revision 'main'"):
        parse_recipe(recipe("ties", ("style@main", {"weight": 1})), "r.yml")
    with pytest.raises(InvalidInputError) as caught:  # over another model than the base: no LoRA to pull alone
        parse_recipe(recipe("ties", ("other+org/lora@v2", {"weight": 1}), base_model="org/base"), "r.yml")
    assert str(caught.value).endswith("registry reference (NAME or NAME@VERSION, a version number) or a path")
    assert parse_recipe(recipe("ties", ("org/base+style@2", {"weight": 1}), base_model="org/base")).inputs == [
        ("style@2", 1.0)]
    doc = recipe("ties", (f"{files['base']}+org/lora@v2", {"weight": 1}), base_model=str(files["base"]))
    run = loraops("combine", "--recipe", write(tmp_path / "r.yml", doc))
    assert run.returncode != 0 and len(run.stderr.splitlines()) == 1, run.stderr
    assert "names the LoRA org/lora at revision 'v2'" in run.stderr and "version number'" not in run.stderr


def test_a_model_entry_naming_the_base_another_way_is_the_base(files, tmp_path, monkeypatch):
    """mergekit skips the model equal to the base (its task vector is zero); `./base` beside `base_model: base` (or
    the base's folder by another path) was read as an adapter path (the base is none: refused). It is the base: no
    input, and for linear its weight counts in Σw as the base's does."""
    (tmp_path / "llama").symlink_to(files["base"])
    entry = "./" + os.path.relpath(tmp_path / "llama") + "/"  # (the CLI runs in this folder: no chdir before it)
    doc = recipe("ties", (entry, None), (str(files["a"]), {"weight": 1, "density": 0.5}), base_model=str(files["base"]))
    run = loraops("combine", "--recipe", write(tmp_path / "r.yml", doc), "--name", "based")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == "ties(density=0.5, normalize=True, lambda=1.0) of a@1×1", run.stdout
    monkeypatch.chdir(tmp_path)
    for entry in ("./llama", "llama/", str(tmp_path / "llama"), str(files["base"])):
        read = parse_recipe(recipe("ties", (entry, None), ("a", {"weight": 1}), base_model="llama"))
        assert read.inputs == [("a", 1.0)], entry
        read = parse_recipe(recipe("linear", (entry, {"weight": 1}), ("a", {"weight": 3}), base_model="./llama/"))
        assert read.inputs == [("a", 0.75)], entry
    read = parse_recipe(recipe("ties", ("./org/x", None), ("a", {"weight": 1}), base_model="org/x"))  # no such folder
    assert read.inputs == [("a", 1.0)]
    with pytest.raises(InvalidInputError, match=r"models\[2\]: '\./llama/' is listed twice"):
        parse_recipe(recipe("linear", ("llama", {"weight": 1}), ("./llama/", {"weight": 1}), ("a", {"weight": 1}),
                            base_model="llama"), "r")


@pytest.mark.registry_backend
def test_a_model_entry_that_is_the_registered_base_folder_of_a_registry_name_base_model_is_the_base(files, tmp_path):
    """`base_model: llama` (a registry name) with the base's folder listed by its own path: it was read as an adapter
    path (a model folder: refused). It is the base (the CLI gives parse_recipe the registry's folders of the base
    base_model names): no input, and for linear its weight counts in Σw as the base's does."""
    from loraops.derive import registered_base_folders

    doc = recipe("linear", (str(files["base"]), {"weight": 1}), (str(files["a"]), {"weight": 3}), base_model="llama")
    assert loraops("base", "add", files["base"], "--name", "llama").returncode == 0
    run = loraops("combine", "--recipe", write(tmp_path / "r.yml", doc), "--name", "based")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == "linear of a@1×0.75", run.stdout
    assert registered_base_folders("llama@2") == [str(files["base"].resolve())]  # (a registry version, read whole)
    with pytest.raises(InvalidInputError, match="base_model .not in models. has no weight"):
        parse_recipe(doc)  # (no registry given: the folder is one more model, and the base is not listed)


def test_a_recipe_density_above_one_keeps_the_model_whole_as_density_one(files, tmp_path):
    """mergekit's sparsify returns a task vector whole at density ≥ 1; a recipe's density above 1 was refused. It is
    density 1: the same bytes and the same record (gamma/epsilon not applied: None). The command line's --density
    keeps its range (0, 1]."""
    read = parse_recipe(recipe("breadcrumbs", ("a", {"weight": 1, "density": 1.5, "gamma": 0.3}),
                               ("b", {"weight": 1, "density": 0.5}), parameters={"density": 2}))
    assert read.params == {"density": [1.0, 0.5], "gamma": [0.3, None]}
    assert parse_recipe(recipe("ties", ("a", {"weight": 1}), parameters={"density": 3})).params == {"density": [1.0]}
    one = recipe("della", (str(files["a"]), {"weight": 1, "density": 1}), (str(files["b"]), {"weight": 1}),
                 parameters={"density": 1})
    above = recipe("della", (str(files["a"]), {"weight": 1, "density": 1.25, "epsilon": 0.5}),
                   (str(files["b"]), {"weight": 1}), parameters={"density": 7})
    first = loraops("combine", "--recipe", write(tmp_path / "one.yml", one), "--name", "one")
    second = loraops("combine", "--recipe", write(tmp_path / "above.yml", above), "--name", "above")
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    assert second.stdout.splitlines()[0] == first.stdout.splitlines()[0], (first.stdout, second.stdout)
    assert second.stdout.splitlines()[-1].startswith("already registered as one@1"), second.stdout
    cli = loraops("combine", str(files["a"]), str(files["b"]), "-m", "ties", "--density", "1.5")
    assert cli.returncode != 0 and "density" in cli.stderr and len(cli.stderr.splitlines()) == 1, cli.stderr


def test_a_revision_no_cache_ref_holds_is_not_that_commit():
    """A revision the Hub cache can hold no ref of (a name too long for a file) is no branch or tag resolved here: it
    is refused as another revision is, not with the file system's error about a path in the cache; a ref that holds
    no commit sha (empty, garbage, upper case: what huggingface_hub did not write) names no commit, said so, not as
    'at commit ' followed by nothing or by what looks like the commit."""
    from loraops.hub import RepoRef, cached_ref as read_ref

    for name, held in (("empty", ""), ("garbage", "not a commit"), ("upper", SHA.upper())):
        cached_ref("org/llama", name, held)
        with pytest.raises(MismatchError) as caught:
            check(f"org/llama@{name}")
        assert str(caught.value) == (
            f"base_model 'org/llama@{name}': h@1 is for llama, pulled at commit 0123456789ab, and revision {name!r} is "
            f"the branch or tag {name}, whose Hub cache ref holds no commit sha: give the commit, or no revision")
    long = "v" * 300  # (refs/ exists now: the name itself is what the file system refuses)
    assert read_ref(RepoRef("org/llama", long)) is None
    with pytest.raises(MismatchError, match=rf"^base_model 'org/llama@{long}': h@1 is for llama, pulled at commit "
                                            rf"0123456789ab, and revision '{long}' is not that commit \(loraops"):
        check(f"org/llama@{long}")


def test_what_a_recipe_entry_holding_at_or_plus_names(files, tmp_path, monkeypatch):
    """A file or folder whose whole name holds '@' is read as it is (no Hub revision); a revision of digits that are
    not ASCII is no registry version (combine reads none) and is refused in recipe terms; `BASE+LORA` where BASE is
    the base_model's folder by another path (a link) is the LoRA, as `./x+LORA` beside `base_model: x` is."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x@v2").mkdir()
    assert parse_recipe(recipe("ties", ("x@v2", {"weight": 1}))).inputs == [("x@v2", 1.0)]
    with pytest.raises(InvalidInputError, match=r"^r: models\[1\]: 'style@١' names the model style at revision '١'"):
        parse_recipe(recipe("ties", ("style@١", {"weight": 1})), "r")
    (tmp_path / "llama").symlink_to(files["base"])
    read = parse_recipe(recipe("ties", ("llama+style@2", {"weight": 1}), base_model=str(files["base"])))
    assert read.inputs == [("style@2", 1.0)]


def test_a_hub_revision_in_model_plus_lora_over_another_model_names_its_part():
    """`MODEL+LORA` over another model than the base_model, read as mergekit reads it: a revision after the LoRA is
    the LoRA's (it was said to be the model `other+org/lora`'s), one after the model is the model's (it was
    'the model other at revision main+lora'); no `loraops pull` hint (no such repo to pull alone)."""
    tail = ("a Hub revision (as mergekit reads it), which a recipe does not fetch: a recipe's {} is a registry "
            "reference (NAME or NAME@VERSION, a version number) or a path")
    for written, said in (("other+org/lora@v2", "the LoRA org/lora at revision 'v2'"),
                          ("other@main+org/lora", "the model other at revision 'main'"),
                          ("other@main+org/lora@v2", "the model other at revision 'main'")):
        with pytest.raises(InvalidInputError) as caught:
            parse_recipe(recipe("ties", (written, {"weight": 1}), base_model="org/base"), "r")
        what = said.split()[1]
        assert str(caught.value) == f"r: models[1]: {written!r} names {said}, " + tail.format(what), written
