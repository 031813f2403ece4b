"""The registry library: idempotent registration, versions, references, filters, bases, lineage, rm, blobs."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import re
import struct
import threading
from pathlib import Path

import pytest

from factories import kohya_file, peft_adapter, tiny_llama
from loraops import formats
from loraops.errors import (AmbiguousError, ConflictError, InvalidInputError, MismatchError, NotFoundError,
                            RegistryError)
from loraops.records import LineageInput, LineageSpec, StoredFileProblem
from loraops.registry import Registry
from loraops.registry import blobs as blob_store
from loraops.registry.blobs import LOCKS, STAMPS

pytestmark = pytest.mark.registry_backend  # the registry's own code: run on PostgreSQL too (conftest.py)

KOHYA_MODULES = {
    "lora_unet_model_layers_0_self_attn_q_proj": ((64,), (64,)),
    "lora_unet_model_layers_1_mlp_down_proj": ((128,), (64,)),
}


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """Models and adapters built once per module (each test still gets its own empty registry)."""
    d = tmp_path_factory.mktemp("art")
    base = tiny_llama(d / "llama")
    other = tiny_llama(d / "llama-wide", hidden=32, intermediate=64, seed=5)
    return {
        "base": base,
        "other": other,
        "ad1": peft_adapter(base, d / "ad1", r=4, alpha=8),
        "ad2": peft_adapter(base, d / "ad2", r=8, alpha=8, target_modules=["q_proj", "v_proj"], seed=3),
        "kohya": kohya_file(d / "style.safetensors", KOHYA_MODULES, rank=4, alpha=2),
    }


@pytest.fixture
def reg():
    with Registry.open() as registry:
        yield registry


def snapshot(reg: Registry) -> tuple:
    """Everything a failed command must leave unchanged."""
    root = reg.blobs.root
    blobs = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                   if LOCKS not in p.parts and STAMPS not in p.parts) if root.exists() else []
    return ([a.model_dump() for a in reg.list_adapters()], [b.model_dump() for b in reg.list_bases()], blobs)


def test_register_is_idempotent_and_versions_by_name(reg, art):
    base = reg.add_base(art["base"], name="llama-tiny")
    first, created, *_ = reg.register_adapter(art["ad1"], tags=["a"])
    assert created and first.ref == "ad1@1" and first.base.name == "llama-tiny" and first.base_hint == str(art["base"])
    again, created, *_ = reg.register_adapter(art["ad1"], tags=["b"])
    assert not created and again.id == first.id and again.tags == ["a", "b"]
    second = reg.add_adapter(art["ad2"], name="ad1")
    assert second.ref == "ad1@2" and second.rank == 8 and second.base.fingerprint == base.fingerprint
    assert reg.get_adapter("ad1").id == second.id  # the name alone is the latest version
    assert reg.get_adapter("ad1@1").id == first.id
    assert reg.get_adapter(first.id).id == first.id
    assert reg.get_adapter(first.sha256[:6]).id == first.id
    assert reg.get_adapter(first.weights_sha256[:10].upper()).id == first.id
    assert [m.name for m in first.modules][0] == "model.layers.0.mlp.down_proj"
    stored = Path(first.path)
    assert stored.is_dir() and sorted(p.name for p in stored.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_identity_covers_config_math_and_alpha(reg, art, tmp_path):
    a = reg.add_adapter(art["ad1"])
    copy = shutil.copytree(art["ad1"], tmp_path / "ad1-alpha")
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 16
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    b = reg.add_adapter(copy, name="ad1")
    assert b.ref == "ad1@2" and b.weights_sha256 == a.weights_sha256 and b.sha256 != a.sha256 and b.alpha == 16
    k = reg.add_adapter(art["kohya"])
    assert k.sha256 == k.weights_sha256 and k.format == "kohya" and k.base is None
    k2 = reg.add_adapter(art["kohya"], alpha=4)
    assert k2.sha256 != k.sha256 and k2.alpha == 4 and k2.ref == "style@2"
    assert reg.load_adapter("style@2").alpha == 4  # the override is kept for later reads


def test_kohya_bound_to_explicit_base_and_filters(reg, art):
    reg.add_base(art["base"], name="llama-tiny")
    reg.add_base(art["other"], name="wide")
    k = reg.add_adapter(art["kohya"], name="style", base="llama-tiny", tags=["sd", "style"])
    assert sorted(m.name for m in k.modules) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert k.target_modules == ["down_proj", "q_proj"]
    with pytest.raises(MismatchError, match="do not fit base wide"):
        reg.add_adapter(art["ad2"], name="x", base="wide")
    reg.add_adapter(art["ad1"])
    reg.add_adapter(art["ad2"])
    refs = lambda **kw: [a.ref for a in reg.list_adapters(**kw)]  # noqa: E731
    assert refs() == ["ad1@1", "ad2@1", "style@1"]
    assert refs(target="v_proj") == ["ad1@1", "ad2@1"]
    assert refs(target="down_proj", rank=4) == ["ad1@1", "style@1"]
    assert refs(rank=8) == ["ad2@1"]
    assert refs(tag="sd") == ["style@1"]
    assert refs(name="ad2") == ["ad2@1"]
    assert refs(base="llama-tiny") == ["ad1@1", "ad2@1", "style@1"]
    assert refs(base="wide") == []


def test_register_again_with_a_base_links_it(reg, art, tmp_path):
    """An adapter registered before its base: registering it again with --base links it (kohya names then bound,
    as a fresh registration with that base stores them), after the same fit check; with another base it re-links."""
    k = reg.add_adapter(art["kohya"], name="style")
    assert k.base is None and k.modules[0].name.startswith("lora_unet_")
    reg.add_base(art["base"], name="llama-tiny")
    reg.add_base(art["other"], name="wide")
    with pytest.raises(MismatchError, match="do not fit base wide"):
        reg.register_adapter(art["kohya"], base="wide")
    assert reg.get_adapter("style") == k  # a refused link changes nothing

    done = reg.register_adapter(art["kohya"], name="other-name", base="llama-tiny", tags=["sd"])
    assert (done.created, done.linked, done.previous_base) == (False, True, None)
    linked = done.record
    assert linked.id == k.id and linked.ref == "style@1" and linked.base.name == "llama-tiny" and linked.tags == ["sd"]
    assert [m.name for m in linked.modules] == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert linked.target_modules == ["down_proj", "q_proj"] and reg.get_adapter("style") == linked
    assert [a.ref for a in reg.list_adapters(target="q_proj", base="llama-tiny")] == ["style@1"]
    assert not reg.register_adapter(art["kohya"], base="llama-tiny").linked  # already linked there
    assert not reg.register_adapter(art["kohya"]).linked and reg.get_adapter("style").base.name == "llama-tiny"

    reg.add_base(tiny_llama(tmp_path / "twin", seed=9), name="twin")  # same shapes, other weights
    again = reg.register_adapter(art["kohya"], base="twin")
    assert again.linked and again.previous_base.name == "llama-tiny" and again.record.base.name == "twin"
    assert reg.load_adapter("style").modules.keys() == {m.name for m in linked.modules}


def test_hint_links_base_only_when_it_fits(reg, art):
    reg.add_base(art["other"], name="wide", source=str(art["base"]))  # a lying source: same hint, other shapes
    assert reg.add_adapter(art["ad1"]).base is None


def test_references_errors(reg, art):
    with pytest.raises(NotFoundError, match="no adapter 'nope' in the registry"):
        reg.get_adapter("nope")
    reg.add_adapter(art["ad1"])
    with pytest.raises(NotFoundError, match=r"adapter 'ad1' has no version 3 \(versions: 1\)"):
        reg.get_adapter("ad1@3")
    with pytest.raises(InvalidInputError, match="must be a version number"):
        reg.get_adapter("ad1@x")
    with pytest.raises(NotFoundError, match="no base 'zz'"):
        reg.get_base("zz")
    with pytest.raises(InvalidInputError, match="bad adapter name '12'"):
        reg.add_adapter(art["ad2"], name="12")


def test_ambiguous_prefix(reg, art, monkeypatch):
    shas = {"ad1": "abcdef01" + "0" * 56, "ad2": "abcdef02" + "0" * 56}
    shas.update({sha: sha for sha in shas.values()})  # the stored copies, in folders named by identity
    monkeypatch.setattr("loraops.formats.identity", lambda path, **_: shas[Path(path).name])
    reg.add_adapter(art["ad1"])
    reg.add_adapter(art["ad2"])
    with pytest.raises(AmbiguousError, match="matches several adapters"):
        reg.get_adapter("abcdef")
    assert reg.get_adapter("abcdef02").name == "ad2"


def test_rm_versions_blobs_and_lineage(reg, art):
    a1 = reg.add_adapter(art["ad1"])
    a2 = reg.add_adapter(art["ad2"], name="ad1")
    k = reg.add_adapter(art["kohya"])
    spec = LineageSpec(op="combine", params={"method": "cat"},
                       inputs=[LineageInput(kind="adapter", id=a1.id, weight=0.5), LineageInput(kind="adapter", id=k.id)])
    combo = reg.add_adapter(art["ad1"], name="combo", alpha=3, lineage=spec)
    assert combo.lineage.op == "combine" and [i.ref for i in combo.lineage.inputs] == ["ad1@1", "style@1"]
    assert [r.ref for r in reg.remove_adapter("ad1")] == ["ad1@2"]  # the name alone: its latest version
    assert not Path(a2.path).exists() and Path(a1.path).exists()
    assert reg.add_adapter(art["ad2"], name="ad1").ref == "ad1@3"  # a removed version number is not reused
    assert [r.ref for r in reg.remove_adapter("ad1", all_versions=True)] == ["ad1@1", "ad1@3"]
    assert not Path(a1.path).exists()
    kept = reg.get_adapter("combo").lineage.inputs[0]
    assert kept.id is None and kept.ref == "ad1@1" and kept.sha256 == a1.sha256 and kept.weight == 0.5
    with pytest.raises(NotFoundError):
        reg.remove_adapter("ad1")


def test_an_input_removed_meanwhile_is_named_by_its_reference(reg, art):
    """`combine pa pb` while another process ran `rm pa` failed with `lineage input: no adapter with id 1 in the
    registry`, an id the user never gave: the reference it was found by is named, and nothing is recorded."""
    a1 = reg.add_adapter(art["ad1"])
    gone = LineageSpec(op="combine", inputs=[LineageInput(kind="adapter", id=a1.id, ref="ad1@1")])
    reg.remove_adapter("ad1")
    with pytest.raises(NotFoundError, match=r"^adapter ad1@1 was removed from the registry while this ran \(by another "
                                            r"process\?\): nothing was recorded$"):
        reg.add_adapter(art["ad2"], name="combo", lineage=gone)
    base_gone = LineageSpec(op="extract", inputs=[LineageInput(kind="base", id=999, ref="llama", role="base")])
    with pytest.raises(NotFoundError, match=r"^base llama was removed from the registry while this ran"):
        reg.add_adapter(art["ad2"], name="combo", lineage=base_gone)
    with pytest.raises(NotFoundError, match=r"^lineage input: no adapter with id 999 in the registry$"):
        reg.add_adapter(art["ad2"], name="combo", lineage=LineageSpec(op="x", inputs=[LineageInput(kind="adapter",
                                                                                                    id=999)]))
    assert reg.list_adapters() == []


def test_rm_all_takes_a_name_not_one_version(reg, art):
    """`rm ad1@2 --all` removed ad1@1 too: a reference to one version (or an id) with --all is refused, and nothing
    goes."""
    one = reg.add_adapter(art["ad1"])
    two = reg.add_adapter(art["ad2"], name="ad1")
    for ref, named in (("ad1@2", "ad1@2"), ("ad1@latest", "ad1@2"), (one.id, "ad1@1"), (two.sha256[:8], "ad1@2")):
        with pytest.raises(InvalidInputError, match=rf"^{re.escape(repr(ref))} names one version \({named}\), "
                                                    "and all_versions=True removes every version of a name: give "
                                                    "the name 'ad1', or drop all_versions=True$"):
            reg.remove_adapter(ref, all_versions=True)
    assert [r.ref for r in reg.list_adapters()] == ["ad1@1", "ad1@2"] and Path(one.path).exists()
    assert [r.ref for r in reg.remove_adapter("ad1", all_versions=True)] == ["ad1@1", "ad1@2"]


def test_ids_of_removed_adapters_and_bases_are_never_reused(reg, art):
    """`show 2` must never name another adapter later (SQLite reuses a removed last rowid without AUTOINCREMENT)."""
    base = reg.add_base(art["base"])
    adapter = reg.add_adapter(art["ad1"])
    reg.remove_adapter(adapter.ref)
    reg.remove_base(base.name, force=True)
    assert reg.add_base(art["base"]).id > base.id
    assert reg.add_adapter(art["ad1"]).id > adapter.id


def failing(reg: Registry, *steps):
    """Run ``steps`` (each given the command's open_input) in a command that then fails (derive.inputs_of)."""
    from loraops.derive import inputs_of

    with pytest.raises(RuntimeError), inputs_of(reg) as open_input:
        for step in steps:
            step(open_input)
        raise RuntimeError("the command fails")


def test_a_failed_command_takes_back_only_what_no_other_writer_used(reg, art, tmp_path):
    """A failing command removes the path inputs it registered and gives their numbers back, but a number another
    writer was given meanwhile stays given, and an input another writer derived from meanwhile stays (removed, its
    number would later name other bytes under the label in that record's lineage)."""
    mine, other, third = (kohya_file(tmp_path / f"{n}.safetensors", KOHYA_MODULES, seed=i) for i, n in enumerate("abc"))
    failing(reg, lambda open_input: open_input(str(mine)))
    assert reg.list_adapters() == []
    failing(reg, lambda open_input: open_input(str(mine)), lambda _: reg.add_adapter(other, name="a"))
    assert [a.ref for a in reg.list_adapters()] == ["a@2"]
    assert reg.add_adapter(mine).ref == "a@3"  # not a@2 again

    taken = []

    def derive_from_it(_):
        spec = LineageSpec(op="resize", inputs=[LineageInput(kind="adapter", id=taken[0].id)])
        reg.add_adapter(art["ad1"], name="derived", lineage=spec)

    failing(reg, lambda open_input: taken.append(open_input(str(art["kohya"])).record), derive_from_it)
    assert reg.get_adapter("style").id == taken[0].id
    assert reg.get_adapter("derived").lineage.inputs[0].id == taken[0].id
    assert reg.add_adapter(third, name="style").ref == "style@2"


def test_a_failed_command_gives_back_only_the_base_link_it_set(reg, art, tmp_path):
    """A failing `combine FILE --base B` of a registered FILE gives it back the link it had (none, or another base:
    none if that one was removed meanwhile), but not over a link another writer set meanwhile
    (`register FILE --base C`)."""
    reg.add_base(art["base"], name="llama-tiny")
    for seed in (8, 9):  # same shapes, other weights
        reg.add_base(tiny_llama(tmp_path / f"twin{seed}", seed=seed), name=f"twin{seed}")
    style = reg.add_adapter(art["kohya"])
    failing(reg, lambda open_input: open_input(str(art["kohya"]), "llama-tiny"))
    assert reg.get_adapter("style") == style
    style = reg.register_adapter(art["kohya"], base="twin8").record
    failing(reg, lambda open_input: open_input(str(art["kohya"]), "llama-tiny"))
    assert reg.get_adapter("style") == style
    failing(reg, lambda open_input: open_input(str(art["kohya"]), "llama-tiny"),
            lambda _: reg.register_adapter(art["kohya"], base="twin9"))
    assert reg.get_adapter("style").base.name == "twin9"
    failing(reg, lambda open_input: open_input(str(art["kohya"]), "llama-tiny"),
            lambda _: reg.remove_base("twin9", force=True))
    assert reg.get_adapter("style").base is None


@pytest.mark.parametrize("output", [False, True])
def test_a_ctrl_c_once_the_result_landed_keeps_the_base_link_its_input_got(reg, art, tmp_path, monkeypatch, output):
    """`combine FILE --base B` of a FILE registered without a base links it to B, and the result is recorded against
    B with FILE as its input. Interrupted once the result landed (without -o: as it returns; with -o: right after the
    output was renamed into place, before the line that says so), the command gave FILE its old link (none) back."""
    from loraops import derive

    reg.add_base(art["base"], name="llama-tiny")
    assert reg.add_adapter(art["kohya"]).base is None
    if output:
        @contextlib.contextmanager
        def interrupted_once_renamed(*args, real=derive.atomic_path, **kwargs):
            with real(*args, **kwargs) as staged:
                yield staged
            raise KeyboardInterrupt
        monkeypatch.setattr(derive, "atomic_path", interrupted_once_renamed)
    else:
        monkeypatch.setattr(derive, "DerivedRecord", lambda **_: (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "c.safetensors"
    with pytest.raises(KeyboardInterrupt, match="interrupted after .*registered as c@1$"):
        derive.combine([str(art["kohya"])], "cat", base="llama-tiny", name="c", output=str(out) if output else None,
                       registry=reg)
    result = reg.get_adapter("c")
    assert result.base.name == "llama-tiny" and result.lineage.inputs[0].ref == "style@1"
    assert reg.get_adapter("style").base.name == "llama-tiny"


def lineage_rows(reg: Registry) -> tuple[int, int]:
    with reg.reader() as r:
        return tuple(r.rows(f"SELECT count(*) FROM {table}")[0][0] for table in ("lineage", "lineage_inputs"))


def test_rm_of_a_derived_adapter_or_base_takes_its_lineage(reg, art):
    """A derived adapter's (or base's) lineage goes with it, in the same transaction; a lineage some record still
    points at stays, and removing one of its inputs keeps the input's label."""
    a = reg.add_adapter(art["ad1"])
    b = reg.add_base(art["base"], name="llama")
    spec = lambda op, ids: LineageSpec(op=op, inputs=[LineageInput(kind="adapter", id=i) for i in ids])  # noqa: E731
    reg.add_adapter(art["ad2"], name="combo", lineage=spec("combine", [a.id]))
    reg.add_adapter(art["kohya"], name="small", lineage=spec("resize", [a.id]))
    reg.add_base(art["other"], name="merged", lineage=LineageSpec(
        op="merge", inputs=[LineageInput(kind="base", id=b.id, role="base"), LineageInput(kind="adapter", id=a.id)]))
    assert lineage_rows(reg) == (3, 4)
    reg.remove_adapter("ad1")  # an input: the lineages that used it keep their ref
    assert lineage_rows(reg) == (3, 4) and reg.get_adapter("combo").lineage.inputs[0].ref == "ad1@1"
    reg.remove_adapter("combo")
    assert lineage_rows(reg) == (2, 3) and reg.get_adapter("small").lineage.op == "resize"
    reg.remove_base("merged")
    assert lineage_rows(reg) == (1, 1)
    reg.remove_adapter("small", all_versions=True)
    assert lineage_rows(reg) == (0, 0)


def test_bases_idempotent_conflicts_derived_and_rm(reg, art, tmp_path):
    b, created = reg.register_base(art["base"])
    assert created and b.name == "llama" and b.num_tensors == 21 and b.dtype == "float32" and not b.derived
    sharded = tiny_llama(tmp_path / "sharded", shard_size="60KB")
    same, created = reg.register_base(sharded, name="other-name")
    assert not created and same.id == b.id  # same tensors, however sharded
    with pytest.raises(ConflictError, match="base name 'llama' is already used"):
        reg.add_base(art["other"], name="llama")
    manifest = reg.base_manifest("llama")
    assert manifest["model.embed_tokens.weight"].shape == (128, 64)
    assert reg.get_base(b.fingerprint[:8]).id == b.id and reg.find_base(b.fingerprint).id == b.id
    derived = reg.add_base(art["other"], name="merged", lineage=LineageSpec(
        op="merge", params={"weights": [1.0]}, inputs=[LineageInput(kind="base", id=b.id, role="base")]))
    assert derived.derived and derived.lineage.inputs[0].ref == "llama"
    a = reg.add_adapter(art["ad1"])
    assert a.base.name == "llama"
    with pytest.raises(ConflictError, match=r"base 'llama' is still used by 1 adapter\(s\) \(ad1@1\) and 1 lineage"):
        reg.remove_base("llama")
    reg.remove_base("llama", force=True)
    assert reg.get_adapter("ad1").base is None and reg.get_base("merged").lineage.inputs[0].id is None
    assert reg.base_path("merged") == art["other"].resolve()


def test_failed_registration_leaves_nothing(reg, art, monkeypatch):
    before = snapshot(reg)

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Registry, "_insert_adapter", boom)
    with pytest.raises(RuntimeError):
        reg.add_adapter(art["ad1"])
    assert snapshot(reg) == before


@pytest.mark.parametrize("change", ["rewritten", "truncated", "truncated while copied", "rewritten after the check"])
def test_files_changed_while_registering_are_refused(reg, art, tmp_path, monkeypatch, change):
    """The bytes stored must be the bytes the identity was computed from: a writer that rewrites or truncates the
    file after it was hashed gets a clear refusal, and nothing is stored."""
    from loraops import fsutil
    from loraops.registry import blobs

    adapter = tmp_path / "style.safetensors"
    shutil.copy(art["kohya"], adapter)
    data = adapter.read_bytes()
    real_put, real_writer = blobs.BlobStore.put, fsutil.DirectFileWriter

    def concurrent_writer(self, identity, files, *args, **kwargs):
        if change not in ("truncated while copied", "rewritten after the check"):
            adapter.write_bytes(data[:-1] + bytes([data[-1] ^ 1]) if change == "rewritten" else data[:-4])
        return real_put(self, identity, files, *args, **kwargs)

    class ShrinkingSource(real_writer):
        def copy_from(self, fd, offset, nbytes, *args, **kwargs):
            os.truncate(adapter, nbytes - 4)
            return super().copy_from(fd, offset, nbytes, *args, **kwargs)

    real_check = formats.check_values

    def checked_then_rewritten(path, **kwargs):  # values checked, then a NaN written in: must not be stored as checked
        digest = real_check(path, **kwargs)
        adapter.write_bytes(data[:-4] + struct.pack("<f", float("nan")))
        return digest

    if change == "rewritten after the check":
        monkeypatch.setattr(formats, "check_values", checked_then_rewritten)
    monkeypatch.setattr(blobs.BlobStore, "put", concurrent_writer)
    monkeypatch.setattr(fsutil, "DirectFileWriter", ShrinkingSource if change == "truncated while copied" else real_writer)
    before = snapshot(reg)
    with pytest.raises(ConflictError, match="shrank while" if change == "truncated while copied" else "changed while"):
        reg.add_adapter(adapter)
    assert snapshot(reg) == before


def bytes_read() -> int:
    """What this process has read so far (every thread's read/pread calls, from the page cache or not)."""
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts reads by Linux's /proc/self/io")
def test_register_reads_the_adapter_twice(reg, art, tmp_path):
    """One read checks the values and hashes the identity (formats.check_values with hash_weights), one copies the file
    into the store and hashes the copy: the weights' bytes are read twice, not three times (identity, check, copy)."""
    reg.add_adapter(art["kohya"])  # (imports and the new database's reads out of the count)
    big = kohya_file(tmp_path / "big.safetensors", {"lora_unet_model_layers_0_self_attn_q_proj": ((4096,), (4096,))},
                     rank=512)
    size = big.stat().st_size
    before = bytes_read()
    record = reg.add_adapter(big)
    passes = (bytes_read() - before) / size
    assert 1.9 < passes < 2.5, passes
    assert record.sha256 == record.weights_sha256 == hashlib.sha256(big.read_bytes()).hexdigest()


def test_the_value_check_runs_on_one_torch_thread(art, monkeypatch):
    """check_values' aminmax per block runs between hashing and reading the next: on one torch thread (a second only
    spins meanwhile, on a core others need), and the count is put back after."""
    import torch

    from loraops.formats import common

    counts, real = [], common.check_finite
    monkeypatch.setattr(common, "check_finite", lambda *args: counts.append(torch.get_num_threads()) or real(*args))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        formats.check_values(art["kohya"], hash_weights=True)
        assert counts and set(counts) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_concurrent_registration(art, tmp_path):
    """Threads with their own connections: same name → distinct versions; same bytes → one record."""
    copies = []
    for i in range(3):
        copy = shutil.copytree(art["ad1"], tmp_path / f"c{i}")
        cfg = json.loads((copy / "adapter_config.json").read_text())
        cfg["lora_alpha"] = 10 + i
        (copy / "adapter_config.json").write_text(json.dumps(cfg))
        copies.append(copy)
    results, errors = [], []

    def work(path):
        try:
            with Registry.open() as r:
                results.append(r.add_adapter(path, name="same"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in [*copies, copies[0], copies[0]]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted({r.version for r in results}) == [1, 2, 3] and len({r.id for r in results}) == 3


def test_verify_and_gc(reg, art):
    a = reg.add_adapter(art["ad1"])
    k = reg.add_adapter(art["kohya"])
    assert reg.verify() == []
    weights = Path(a.path) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    problems = reg.verify()
    # the records `verify --json` prints (a reference string is `ref`, as in every record)
    assert all(isinstance(p, StoredFileProblem) for p in problems)
    assert [(p.ref, Path(p.file).name) for p in problems] == [("ad1@1", "adapter_model.safetensors")]
    assert "≠ recorded" in problems[0].problem
    orphan = reg.blobs.folder("ff" * 32)
    orphan.mkdir(parents=True)
    (orphan / "x.safetensors").write_bytes(b"x")
    temp = Path(k.path).parent / ".loraops-tmp-style.safetensors.1234abcd"
    temp.write_bytes(b"partial")
    assert reg.gc() == []  # too young: could be a registration in progress
    removed = {p for p, _ in reg.gc(grace_s=0)}
    assert removed == {orphan, temp} and not orphan.exists() and Path(k.path).exists()


def test_verify_reports_what_a_stored_folder_holds_besides_its_files(reg, art):
    """A file put into a stored adapter's folder is a change to the stored copy (a config beside a one-file
    adapter's weights is read with them): verify said all was intact. It names each; an interrupted copy's temp file
    stays gc's."""
    from loraops.fsutil import TMP_MARK
    from loraops.registry.store import UNRECORDED

    a, k = reg.add_adapter(art["ad1"]), reg.add_adapter(art["kohya"])
    extra = [Path(a.path) / "notes.txt", Path(k.path).parent / "adapter_config.json"]
    for path in extra:
        path.write_text("{}")
    (Path(a.path) / f"{TMP_MARK}adapter_model.safetensors.1234abcd").write_bytes(b"partial")
    assert [(p.ref, p.file, p.problem) for p in reg.verify()] == [
        ("ad1@1", str(extra[0]), UNRECORDED), ("style@1", str(extra[1]), UNRECORDED)]
    for path in extra:
        path.unlink()
    assert reg.verify() == []


def test_a_config_put_beside_a_stored_one_file_adapter_is_not_read_with_it(reg, art, tmp_path):
    """A PEFT weights file registered alone (its alpha given) is stored alone in its folder; an adapter_config.json
    put there was read with it by every load (its use_rslora scaled the deltas by √r more): the load, the stored path
    and a check of it refuse it in one line, and taking it away gives the registered adapter back."""
    import shutil

    from loraops.errors import RegistryError

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(Path(art["ad1"]) / "adapter_model.safetensors", bare / "adapter_model.safetensors")
    record = reg.add_adapter(bare / "adapter_model.safetensors", name="bare", alpha=8)
    scale = reg.load_adapter(record.id).modules["model.layers.0.self_attn.q_proj"].scale
    stray = Path(record.path).parent / "adapter_config.json"
    config = json.loads((Path(art["ad1"]) / "adapter_config.json").read_text())
    stray.write_text(json.dumps({**config, "use_rslora": True}))
    for attempt in (lambda: reg.load_adapter(record.id), lambda: reg.intact_path(record.id),
                    lambda: reg.check_adapter("bare@1")):
        with pytest.raises(RegistryError, match=f"^adapter bare@1: its stored folder {stray.parent} holds "
                                                "adapter_config.json, which no record holds"):
            attempt()
    stray.unlink()
    assert reg.load_adapter(record.id).modules["model.layers.0.self_attn.q_proj"].scale == scale == 2


def counted_hashes(monkeypatch) -> list[Path]:
    """The stored files loads hash from now on (the blob store's sha256_file calls)."""
    hashed = []
    real = blob_store.sha256_file

    def counting(path, **kwargs):
        hashed.append(Path(path).name)
        return real(path, **kwargs)

    monkeypatch.setattr(blob_store, "sha256_file", counting)
    return hashed


def test_a_stored_copy_that_hashed_right_is_not_hashed_again_while_unchanged(reg, art, monkeypatch):
    """Loading a registered adapter hashes its stored copy once; later loads go by the stamp of its stat, and
    `verify` still reads every file."""
    monkeypatch.setattr(blob_store, "RACY_NS", 0)  # (else only a file changed 2 s before the hash began is stamped)
    record = reg.add_adapter(art["ad1"])
    hashed = counted_hashes(monkeypatch)
    first = reg.load_adapter(record.id)
    assert hashed == ["adapter_model.safetensors", "adapter_config.json"]
    again = reg.load_adapter(record.id)
    assert hashed == ["adapter_model.safetensors", "adapter_config.json"]
    assert all((again.modules[n].B == m.B).all() for n, m in first.modules.items())
    assert reg.verify() == []
    monkeypatch.setenv("LORAOPS_STAMPS", "0")  # a team's store others can write: every load hashes again
    reg.load_adapter(record.id)
    assert hashed == ["adapter_model.safetensors", "adapter_config.json"] * 2
    reg.remove_adapter(record.id)
    assert not (reg.blobs.root / STAMPS / f"{record.sha256[:2]}/{record.sha256}.json").exists()


def flip_last_byte_keeping_mtime(path: Path) -> None:
    """A file rewritten (same size, its last byte changed) with its mtime set back as it was."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_changed_stored_copy_is_caught_even_with_its_mtime_put_back(reg, art, monkeypatch):
    """A stamped file rewritten (same size, one byte changed, its mtime set back as it was) is hashed again and
    refused: its ctime moved, which no one can set back."""
    monkeypatch.setattr(blob_store, "RACY_NS", 0)
    record = reg.add_adapter(art["ad1"])
    reg.load_adapter(record.id)  # stamped
    flip_last_byte_keeping_mtime(Path(record.path) / "adapter_model.safetensors")
    with pytest.raises(RegistryError, match="is changed \\(sha256"):
        reg.load_adapter(record.id)


def test_gc_takes_the_stamps_of_the_folders_it_removes(reg, monkeypatch):
    monkeypatch.setattr(blob_store, "RACY_NS", -10**12)  # (a file written just now stamped as if written long ago)
    orphan = reg.blobs.folder("ee" * 32)
    orphan.mkdir(parents=True)
    (orphan / "x.safetensors").write_bytes(b"x")
    key = reg.blobs.key("ee" * 32, None)
    sha256, remember = reg.blobs.hash(key, "x.safetensors")
    remember()
    assert reg.blobs.unchanged(key, "x.safetensors", sha256)
    assert {p for p, _ in reg.gc(grace_s=0)} == {orphan}
    assert not (reg.blobs.root / STAMPS / "ee" / f"{'ee' * 32}.json").exists()


def test_a_file_changed_just_before_its_hash_is_not_stamped(reg, art, monkeypatch):
    """A file changed within RACY_NS of its hash could change again within the same clock tick unseen: no stamp,
    so the next load hashes it again."""
    record = reg.add_adapter(art["ad1"])  # just written
    hashed = counted_hashes(monkeypatch)
    reg.load_adapter(record.id)
    reg.load_adapter(record.id)
    assert hashed.count("adapter_model.safetensors") == 2


def test_damage_verify_finds_stops_loads_that_went_by_a_stamp(reg, art, monkeypatch):
    """Bytes that change with no write through the file system (bit rot, a raw-device write) keep the stamped stat:
    `verify` reads them and reports the damage, and from then on a load refuses the copy, as before stamps; it went
    on mapping the damaged bytes by their stamp."""
    import json

    monkeypatch.setattr(blob_store, "RACY_NS", 0)
    record = reg.add_adapter(art["ad1"])
    reg.load_adapter(record.id)  # stamped
    weights = Path(record.path) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    stamps = reg.blobs.root / STAMPS / f"{record.sha256[:2]}/{record.sha256}.json"
    known = json.loads(stamps.read_text())  # the stat as it is now: what a change below the file system leaves
    known[weights.name]["stat"] = blob_store._stat_of(weights.stat())
    stamps.write_text(json.dumps(known))
    assert [p.file for p in reg.verify()] == [str(weights)]
    with pytest.raises(RegistryError, match="is changed \\(sha256"):
        reg.load_adapter(record.id)


def test_a_file_whose_mtime_was_set_back_just_now_is_not_stamped(reg, art, monkeypatch):
    """Its ctime says it changed just now (within RACY_NS), whatever its mtime says: not stamped."""
    record = reg.add_adapter(art["ad1"])
    for path in Path(record.path).iterdir():
        os.utime(path, ns=(0, 0))
    hashed = counted_hashes(monkeypatch)
    reg.load_adapter(record.id)
    reg.load_adapter(record.id)
    assert hashed.count("adapter_model.safetensors") == 2


@pytest.mark.parametrize("junk", [b"", b'{"adapter_model.safetensors": {"sha256": ', b"\xff\xfe\x00", b"[1, 2]",
                                  b'{"adapter_model.safetensors": []}', b"[" * 100_000, b"1" * 5000],
                         ids=["empty", "truncated", "binary", "list", "entry", "deep", "long number"])
def test_a_damaged_stamp_file_means_a_hash(reg, art, monkeypatch, junk):
    """A stamp file cut short, overwritten or nested past Python's recursion limit is no stamp: the load hashes the
    file (and stamps it anew) instead of failing."""
    monkeypatch.setattr(blob_store, "RACY_NS", 0)
    record = reg.add_adapter(art["ad1"])
    stamps = reg.blobs.root / STAMPS / f"{record.sha256[:2]}/{record.sha256}.json"
    stamps.parent.mkdir(parents=True)
    stamps.write_bytes(junk)
    hashed = counted_hashes(monkeypatch)
    reg.load_adapter(record.id)
    assert "adapter_model.safetensors" in hashed
    hashed.clear()
    reg.load_adapter(record.id)
    assert hashed == []


def test_gc_removes_stamps_whose_folder_is_gone(reg, art, monkeypatch):
    """A stamp left without its folder (an `rm` killed between the two, or a load stamping while `rm` ran) is litter
    gc takes; the stamps of stored folders stay."""
    monkeypatch.setattr(blob_store, "RACY_NS", 0)
    kept, gone = reg.add_adapter(art["ad1"]), reg.add_adapter(art["kohya"])
    reg.load_adapter(kept.id), reg.load_adapter(gone.id)
    stamps = reg.blobs.root / STAMPS
    left = stamps / gone.sha256[:2] / f"{gone.sha256}.json"
    saved = left.read_bytes()
    reg.remove_adapter(gone.id)
    left.parent.mkdir(parents=True, exist_ok=True)
    left.write_bytes(saved)  # as if rm was killed before it took the stamp
    assert reg.gc() == [] and left.exists()  # (younger than the grace period)
    assert {p for p, _ in reg.gc(grace_s=0, dry_run=True)} == {left} and left.exists()
    assert {p for p, _ in reg.gc(grace_s=0)} == {left}
    assert [p.relative_to(stamps).as_posix() for p in stamps.rglob("*.json")] == [
        f"{kept.sha256[:2]}/{kept.sha256}.json"]
    hashed = counted_hashes(monkeypatch)
    reg.load_adapter(kept.id)
    assert hashed == []


def test_rm_leaves_no_empty_stamp_folder_and_gc_takes_one_left(reg, art, monkeypatch):
    """`rm` dropped an adapter's stamps and left their folder (.stamps/XX) empty, which nothing removed: it goes
    with its last stamp now, and gc takes one an older loraops left (after the grace period, as all it removes)."""
    monkeypatch.setattr(blob_store, "RACY_NS", 0)
    record = reg.add_adapter(art["ad1"])
    reg.load_adapter(record.id)  # stamped
    stamps = reg.blobs.root / STAMPS
    assert [p.name for p in stamps.iterdir()] == [record.sha256[:2]]
    reg.remove_adapter(record.id)
    assert list(stamps.iterdir()) == []
    left = stamps / "ab"
    left.mkdir()
    assert reg.gc() == [] and left.is_dir()  # (younger than the grace period)
    assert reg.gc(grace_s=0, dry_run=True) == [(left, 0)] and left.is_dir()
    assert reg.gc(grace_s=0) == [(left, 0)] and not left.exists()


def test_gc_leaves_a_stamp_folder_being_filled(reg, monkeypatch):
    """A stamp's write makes its folder, then renames the stamp file into it, under the stamps' lock: gc, finding
    the folder empty in between, waits for that lock and leaves it (else the write failed, its stamp lost)."""
    import time

    folder = reg.blobs.root / STAMPS / "cd"
    reached, written, failed = threading.Event(), [], []
    real = blob_store.BlobStore.drop_empty

    def reaching(self, path):
        reached.set()
        return real(self, path)

    def write_a_stamp():
        with reg.blobs._stamps_locked():
            folder.mkdir(parents=True)
            os.utime(folder, (0, 0))  # (old enough for any grace period)
            made.set()
            reached.wait(30)
            time.sleep(0.2)  # (time for an unlocked rmdir to land: it would, at once)
            try:
                (folder / f"{'cd' * 32}.json").write_text("{}")
                written.append(True)
            except OSError as exc:
                failed.append(exc)

    made = threading.Event()
    monkeypatch.setattr(blob_store.BlobStore, "drop_empty", reaching)
    writer = threading.Thread(target=write_a_stamp)
    writer.start()
    made.wait(30)
    assert reg.gc(grace_s=0) == []
    writer.join()
    assert (written, failed) == ([True], []) and (folder / f"{'cd' * 32}.json").exists()


def test_gc_keeps_a_stored_file_whose_name_looks_like_a_temp_file(reg, art, tmp_path):
    """A file registered under a name starting with the temp mark (`register .loraops-tmp-a.safetensors`, or
    `combine -o .loraops-tmp-c.safetensors`: a one-file adapter is stored under its own name) is a live stored file:
    gc removed it as an interrupted copy's leftover, and the record's copy was gone."""
    from loraops.fsutil import TMP_MARK

    odd = tmp_path / f"{TMP_MARK}style.safetensors"
    shutil.copy(art["kohya"], odd)
    record = reg.add_adapter(odd)
    assert reg.gc(grace_s=0) == []
    assert reg.verify() == []
    leftover = Path(record.path).with_name(f"{TMP_MARK}style.safetensors.1234abcd")
    leftover.write_bytes(b"partial")  # a real leftover beside it still goes
    assert [p for p, _ in reg.gc(grace_s=0)] == [leftover]


def test_gc_removes_the_folders_it_empties_but_not_the_store(reg, art):
    """Shard folders (blobs/ab/) that gc empties go too; the store's root, a shard still holding an adapter, and a
    folder a registration may be filling (younger than the grace period) stay."""
    import os
    import time

    a = reg.add_adapter(art["ad1"])
    orphans = [reg.blobs.folder(c * 64) for c in "fe"] + [reg.blobs.folder("e" * 63 + "f")]
    for folder in orphans:
        folder.mkdir(parents=True)
    (orphans[0] / "x.safetensors").write_bytes(b"x")  # the last one stays empty, as a crashed copy leaves it
    temp = Path(a.path) / ".loraops-tmp-adapter_model.safetensors.1234abcd"
    temp.write_bytes(b"partial")
    young = reg.blobs.folder("c" * 64)
    young.mkdir(parents=True)
    old = time.time() - 7200
    for path in [*orphans, temp]:
        os.utime(path, (old, old))
    removed = {p for p, _ in reg.gc()}
    assert removed == {*orphans, temp} and young.is_dir() and Path(a.path).is_dir()
    shards = {p.name for p in reg.blobs.root.iterdir()}
    assert shards == {Path(a.path).parent.name, "cc", ".locks"}
    reg.remove_adapter(a.id)
    os.utime(young, (old, old))
    assert {p for p, _ in reg.gc()} == {young}
    assert {p.name for p in reg.blobs.root.iterdir()} == {".locks"}


def test_register_never_holds_the_factors_whole(reg, art, monkeypatch):
    """A record needs shapes and alphas; the values are only checked for NaN/Inf, ≤ 64 MiB at a time (a 70B rank-64
    adapter is 1.6 GB)."""
    from loraops import st

    real_read = st.read_tensor

    def single_values_only(info, handle=None):
        assert info.numel <= 1, f"{info.name} was read whole"
        return real_read(info, handle)

    monkeypatch.setattr(st, "read_tensor", single_values_only)
    reg.add_base(art["base"], name="llama-tiny")
    assert reg.add_adapter(art["ad1"]).base.name == "llama-tiny"
    assert reg.add_adapter(art["kohya"], base="llama-tiny").alpha == 2


def test_a_failed_copy_leaks_no_file_descriptor(tmp_path, art):
    from loraops.registry.blobs import _hash_copy

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(OSError):
            _hash_copy(art["kohya"], tmp_path / "no-such-folder" / "copy", None)
    assert len(os.listdir("/proc/self/fd")) == before


def test_what_is_no_adapter_is_refused_before_it_is_hashed(reg, art, monkeypatch):
    """A base checkpoint registered as an adapter by mistake (gigabytes) is refused from its header, unhashed."""
    from loraops.errors import LoraopsError
    from loraops.registry import store

    monkeypatch.setattr(store, "adapter_identity", lambda *a, **k: pytest.fail("hashed before refusing"))
    with pytest.raises(LoraopsError):
        reg.add_adapter(next(Path(art["base"]).glob("*.safetensors")))


def test_a_ctrl_c_while_the_registry_opens_is_an_interruption(monkeypatch):
    """SQLAlchemy swallows a KeyboardInterrupt that lands while its pool closes a connection, then fails on its own
    state: a Ctrl-C during Registry.open came out once as "cannot open the registry …: AssertionError" (exit 6).
    Opening defers the signal and raises it once done, through the handler that was in place; the registry it
    opened, which no caller gets, is closed (its connections were left open, for a library user's process to keep)."""
    import os
    import signal

    from loraops.registry import db

    real_make_engine = db.make_engine
    engines = []

    def interrupted_midway(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # handled at once by Python, were it not deferred
        engines.append(real_make_engine(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(db, "make_engine", interrupted_midway)
    reached = []
    monkeypatch.setattr(db, "ensure_schema", lambda engine, real=db.ensure_schema: (reached.append(1), real(engine)))
    with pytest.raises(KeyboardInterrupt):
        Registry.open()
    assert reached  # the opening went on after the signal, which came at its end
    assert [engine.pool.checkedin() for engine in engines] == [0]  # disposed: no pooled connection left open
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_gc_leaves_a_scratch_folder_in_use_however_old(reg):
    """A pull downloads into a scratch folder in the store for as long as the download takes, and the folder's mtime
    does not change while a file deep in it grows: gc (in another process) removed it from under the download once
    it was older than the grace period. A held one stays; one a killed process left goes."""
    import os
    import time

    old = time.time() - 7200
    with reg.blobs.scratch() as busy:
        (busy / ".cache" / "huggingface").mkdir(parents=True)
        (busy / ".cache" / "huggingface" / "adapter_model.safetensors.incomplete").write_bytes(b"partial")
        inner = busy / ".loraops-tmp-adapter_model.safetensors.1234abcd"  # a writer's temp file inside it
        inner.write_bytes(b"partial")
        left = reg.blobs.root / ".loraops-tmp-scratch-killed"  # what a killed pull leaves
        (left / ".cache").mkdir(parents=True)
        for path in (busy, left, inner):
            os.utime(path, (old, old))
        assert [p for p, _ in reg.gc()] == [left]
        assert busy.is_dir() and inner.is_file()
    assert not busy.exists()


@pytest.mark.sqlite_only
def test_opening_waits_out_a_database_is_locked_answer_to_its_first_read(tmp_path, monkeypatch):
    """SQLite can answer a reader "database is locked" without waiting while another connection sets up or recovers
    the WAL (test_concurrent_registration caught it under load: `cannot open the registry …: database is locked`).
    Opening reads the schema revision again after a short back-off; only a lock that lasts is reported."""
    import sqlite3

    from loraops.errors import RegistryError
    from loraops.registry import db

    engine = db.make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    db.ensure_schema(engine)
    real, calls = db.current_revision, []
    monkeypatch.setattr(db.time, "sleep", lambda s: None)

    def locked_twice(connection):
        calls.append(1)
        if len(calls) <= 2:
            raise sqlite3.OperationalError("database is locked")
        return real(connection)

    monkeypatch.setattr(db, "current_revision", locked_twice)
    db.ensure_schema(engine)
    assert len(calls) == 3

    def always_locked(connection):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(db, "current_revision", always_locked)
    with pytest.raises(RegistryError, match="cannot open the registry at .*: database is locked"):
        db.ensure_schema(engine)
    engine.dispose()


def test_paths_that_are_not_utf8_are_refused_in_one_line_with_nothing_written(reg, art, tmp_path):
    """A file or folder name with bytes that are not UTF-8 (os.fsdecode makes them surrogates): recording it was a
    UnicodeEncodeError traceback from the database driver — after a merge's output was in place, and in the base
    digest cache's key before that. Now refused before any work, nothing written or recorded; a merge that records
    nothing still works."""
    from safetensors.torch import load_file, save

    from loraops import derive, merging
    from loraops.basemodel import BaseModel

    odd = tmp_path / os.fsdecode(b"odd-\xff")
    odd.mkdir()
    base = Path(shutil.copytree(art["base"], odd / "llama"))
    kohya = Path(shutil.copy(art["kohya"], odd / "style.safetensors"))
    tuned = Path(shutil.copytree(art["base"], odd / "tuned", ignore=shutil.ignore_patterns("*.safetensors")))
    weights = load_file(art["base"] / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.weight"] += 0.1
    (tuned / "model.safetensors").write_bytes(save(weights, metadata={"format": "pt"}))  # (safetensors wants UTF-8)
    reg.add_base(art["base"], name="llama")
    before = snapshot(reg)
    for call in (lambda: reg.add_base(base, name="odd"),
                 lambda: reg.register_adapter(kohya, base="llama"),
                 lambda: merging.merge("llama", [str(kohya)], tmp_path / "m1"),
                 lambda: merging.merge(str(base), [str(art["kohya"])], tmp_path / "m2"),
                 lambda: merging.merge("llama", [str(art["kohya"])], odd / "m3"),
                 lambda: derive.extract(str(base), str(tuned), rank=2, output=tmp_path / "x")):
        with pytest.raises(InvalidInputError, match="the path is not UTF-8 text, which the registry records paths "
                                                    "as; rename it$") as err:  # (refused up front: refuse_unrecordable)
            call()
        assert "\n" not in str(err.value)
    assert snapshot(reg) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [odd.name]
    assert sorted(p.name for p in odd.iterdir()) == ["llama", "style.safetensors", "tuned"]
    merging.merge(str(base), [str(kohya)], odd / "m4", record=False)
    assert BaseModel.open(base).fingerprint() == BaseModel.open(art["base"]).fingerprint()  # (its digest cache's key)
    assert (odd / "m4" / "model.safetensors").is_file() and snapshot(reg) == before


def test_text_that_is_not_utf8_is_refused_by_the_write_itself(reg, art, monkeypatch):
    """The registry's own guard (Registry.write), behind the paths' (refuse_unrecordable, above) and the tags' (a tag
    is printable: clean_tags, bypassed here): other text from the command line, such as a tag from argv with bytes
    that are not UTF-8, was the driver's UnicodeEncodeError."""
    from loraops.registry import store

    before = snapshot(reg)
    with pytest.raises(InvalidInputError, match=r"^bad tag 't\\udcff'"):
        reg.register_adapter(art["kohya"], tags=[os.fsdecode(b"t\xff")])
    monkeypatch.setattr(store, "clean_tags", list)
    with pytest.raises(InvalidInputError) as err:
        reg.register_adapter(art["kohya"], tags=[os.fsdecode(b"t\xff")])
    assert str(err.value) == ("could not register 'style': it holds text that is not UTF-8 ('t\\udcff'), which the "
                              "registry cannot record (a path with other bytes in its name? rename it)")
    assert snapshot(reg) == before


def counted_value_checks(monkeypatch) -> list[int]:
    """The NaN/Inf checks (formats.common.check_finite's one reduction each) that look at values from now on."""
    import torch

    looked = []
    real = torch.aminmax

    def counting(tensor, *args, **kwargs):
        looked.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "aminmax", counting)
    return looked


def stamps_of(reg: Registry, record) -> dict:
    return json.loads((reg.blobs.root / STAMPS / f"{record.sha256[:2]}/{record.sha256}.json").read_text())


def test_a_stored_copy_checked_under_its_stamp_is_not_checked_again(reg, art, monkeypatch):
    """The first load under a stamp reads the values for NaN/Inf and marks the stamps checked; later loads whose
    stamps still hold look at no value (the same factors); without stamps every load checks."""
    monkeypatch.setattr(blob_store, "RACY_NS", 0)
    record = reg.add_adapter(art["ad1"])
    looked = counted_value_checks(monkeypatch)
    first = reg.load_adapter(record.id)
    assert looked and all(stamp.get("checked") is True for stamp in stamps_of(reg, record).values())
    looked.clear()
    again = reg.load_adapter(record.id)
    assert looked == []
    assert all((again.modules[n].B == m.B).all() and (again.modules[n].A == m.A).all() for n, m in first.modules.items())
    monkeypatch.setenv("LORAOPS_STAMPS", "0")
    reg.load_adapter(record.id)
    assert looked


def test_a_stamp_without_the_checked_mark_does_not_skip_the_check(reg, art, monkeypatch, tmp_path):
    """A file an old loraops registered without checking its values (here a NaN), whose stamp holds (it hashes
    right: the NaN is what was registered), is still checked, and refused, on every load."""
    monkeypatch.setattr(blob_store, "RACY_NS", 0)
    adapter = tmp_path / "nan"
    shutil.copytree(art["ad1"], adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + struct.pack("<f", float("nan")))
    monkeypatch.setattr(formats, "check_values", lambda path, **kwargs: None)  # as before register checked
    record = reg.add_adapter(adapter)
    for _ in range(2):
        with pytest.raises(InvalidInputError, match="NaN or Inf"):
            reg.load_adapter(record.id)
        stamp = stamps_of(reg, record)[weights.name]  # (it holds)
        assert stamp["stat"] == blob_store._stat_of((Path(record.path) / weights.name).stat())
        assert not any(stamp.get("checked") for stamp in stamps_of(reg, record).values())


def test_the_checked_mark_goes_with_the_stamp(reg, art, monkeypatch):
    """A stored file replaced by the same bytes (a new inode, ctime) is hashed and stamped anew, and its values checked
    again: the mark vouches for the bytes read under the stat it was made with, no other."""
    monkeypatch.setattr(blob_store, "RACY_NS", 0)
    record = reg.add_adapter(art["ad1"])
    reg.load_adapter(record.id)
    reg.load_adapter(record.id)  # checked
    weights = Path(record.path) / "adapter_model.safetensors"
    copy = weights.with_name("copy")
    shutil.copy2(weights, copy)
    os.replace(copy, weights)
    looked = counted_value_checks(monkeypatch)
    reg.load_adapter(record.id)
    assert looked
    looked.clear()
    reg.load_adapter(record.id)
    assert looked == []


def test_a_stamp_made_while_the_values_were_read_is_not_marked_checked(reg, art, monkeypatch):
    """The stamps a load marks checked are the ones that held before it read: a file replaced during the read and
    stamped meanwhile (by another load) holds bytes this read did not check, so its stamp stays unmarked."""
    monkeypatch.setattr(blob_store, "RACY_NS", -10**12)  # (a file written just now stamped as if written long ago)
    record = reg.add_adapter(art["ad1"])
    reg.load_adapter(record.id)  # stamped, not checked
    for name in list(stamps_of(reg, record)):
        stamps = stamps_of(reg, record)
        stamps[name].pop("checked", None)
        (reg.blobs.root / STAMPS / f"{record.sha256[:2]}/{record.sha256}.json").write_text(json.dumps(stamps))
    weights = Path(record.path) / "adapter_model.safetensors"
    real_read = formats.read_adapter

    def replaced_while_read(path, **kwargs):
        adapter = real_read(path, **kwargs)
        copy = weights.with_name("copy")
        shutil.copy2(weights, copy)
        os.replace(copy, weights)
        reg.blobs.hash(reg.blobs.key(record.sha256, None), weights.name)[1]()  # another load's stamp of the new file
        return adapter

    monkeypatch.setattr(formats, "read_adapter", replaced_while_read)
    reg.load_adapter(record.id)
    assert "checked" not in stamps_of(reg, record)[weights.name]


def test_the_copy_push_uploads_is_hashed_by_the_stamp_rule(reg, art, monkeypatch):
    """push (and a repeated pull) take a stored copy only intact: one whose stamp holds is not hashed again, one
    rewritten is hashed and refused."""
    monkeypatch.setattr(blob_store, "RACY_NS", 0)
    record = reg.add_adapter(art["ad1"])
    hashed = counted_hashes(monkeypatch)
    assert reg.intact_path(record.id) == Path(record.path)
    assert hashed == ["adapter_model.safetensors", "adapter_config.json"]  # (and stamped)
    assert reg.intact_path(record.id) == Path(record.path)
    assert len(hashed) == 2
    flip_last_byte_keeping_mtime(Path(record.path) / "adapter_model.safetensors")
    with pytest.raises(RegistryError, match="is changed \\(sha256"):
        reg.intact_path(record.id)


def test_a_stamp_holds_on_a_machine_that_sees_another_device_number(reg, art, monkeypatch):
    """An NFS share has another st_dev on each machine (and remount): the stamp leaves the device out, as git's index
    does, so a load there does not hash again; the inode, size, mtime and ctime still decide."""
    monkeypatch.setattr(blob_store, "RACY_NS", 0)
    record = reg.add_adapter(art["ad1"])
    reg.load_adapter(record.id)  # stamped on "this machine"
    real_stat = Path.stat

    class OtherMachine:
        def __init__(self, st):
            self.st = st

        def __getattr__(self, name):
            return getattr(self.st, name) + (1 if name == "st_dev" else 0)

    def seen_elsewhere(path, *args, **kwargs):
        st = real_stat(path, *args, **kwargs)
        return OtherMachine(st) if Path(record.path) in Path(path).parents else st

    monkeypatch.setattr(Path, "stat", seen_elsewhere)
    hashed, looked = counted_hashes(monkeypatch), counted_value_checks(monkeypatch)
    reg.load_adapter(record.id)
    assert hashed == [] and looked == []


@pytest.mark.parametrize("write", ["mark_checked", "remember"])
def test_stamps_dropped_while_a_load_rewrites_them_stay_dropped(reg, art, monkeypatch, write):
    """`verify` drops the stamps of a damaged adapter (its bytes changed below the file system, its stat as
    stamped). A load that had read the stamps to add its own (the checked mark, a stamp of another of its files) wrote
    them back after the drop, and later loads took the damaged copy unhashed and unchecked: the read-modify-write and
    the drop take turns (a lock), so the drop comes after the write and holds."""
    monkeypatch.setattr(blob_store, "RACY_NS", 0)
    record = reg.add_adapter(art["ad1"])
    reg.load_adapter(record.id)  # stamped
    key, weights = reg.blobs.key(record.sha256, None), "adapter_model.safetensors"
    files = {name: stamp["sha256"] for name, stamp in stamps_of(reg, record).items()}
    held = {name: {k: v for k, v in stamp.items() if k != "checked"} for name, stamp in stamps_of(reg, record).items()}
    (reg.blobs.root / STAMPS / f"{record.sha256[:2]}/{record.sha256}.json").write_text(json.dumps(held))
    read, real_read = threading.Event(), reg.blobs._read_stamps

    def read_then_wait(k):
        known = real_read(k)
        read.set()
        threading.Event().wait(0.5)  # (verify's drop comes now)
        return known

    monkeypatch.setattr(reg.blobs, "_read_stamps", read_then_wait)
    writing = threading.Thread(target=(lambda: reg.blobs.mark_checked(key, held)) if write == "mark_checked"
                               else reg.blobs.hash(key, "adapter_config.json")[1])
    writing.start()
    read.wait(5)
    reg.blobs.forget(key)  # what verify does on a file that hashed wrong
    writing.join()
    monkeypatch.setattr(reg.blobs, "_read_stamps", real_read)
    assert weights not in reg.blobs.holding(key, files)


def test_stamps_dropped_during_a_load_are_not_marked_back(reg, art, monkeypatch):
    """`verify` drops the stamps of a damaged adapter while a load reads it (its stat as stamped: bytes changed below
    the file system): the load's checked mark is for stamps that are still there, so it writes none back, and the next
    load hashes the copy (and refuses it)."""
    monkeypatch.setattr(blob_store, "RACY_NS", 0)
    record = reg.add_adapter(art["ad1"])
    reg.load_adapter(record.id)  # stamped and checked
    key = reg.blobs.key(record.sha256, None)
    stamps = reg.blobs.root / STAMPS / f"{record.sha256[:2]}/{record.sha256}.json"
    stamps.write_text(json.dumps({name: {k: v for k, v in stamp.items() if k != "checked"}
                                  for name, stamp in stamps_of(reg, record).items()}))
    real_read = formats.read_adapter

    def verify_meanwhile(path, **kwargs):
        adapter = real_read(path, **kwargs)
        reg.blobs.forget(key)
        return adapter

    monkeypatch.setattr(formats, "read_adapter", verify_meanwhile)
    reg.load_adapter(record.id)
    assert not stamps.exists()


def test_a_read_that_skipped_the_check_leaves_later_checks_on(reg, art, monkeypatch):
    """The skip is for the one read whose stamps say so: after it, what the algebra makes of the adapter (a module
    that overflows to Inf, which nothing reads back to check) is still checked and refused."""
    from dataclasses import replace

    from loraops import algebra

    monkeypatch.setattr(blob_store, "RACY_NS", 0)
    record = reg.add_adapter(art["ad1"])
    reg.load_adapter(record.id)
    looked = counted_value_checks(monkeypatch)
    module = next(iter(reg.load_adapter(record.id).modules.values()))
    assert looked == []  # (skipped)
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        algebra.finite_module("combine", replace(module, B=module.B * float("inf")))


def test_hinted_bases_are_loaded_until_one_fits(reg, art, monkeypatch):
    """Of several registered bases the adapter's base_model_name_or_path names, the first that fits is linked, and
    the manifests of those after it are not loaded (a manifest is a row per base tensor: tens of thousands for an
    MoE base)."""
    loaded = []
    manifest = Registry._manifest
    monkeypatch.setattr(Registry, "_manifest", lambda self, s, base_id: loaded.append(base_id) or manifest(self, s, base_id))
    fits = reg.add_base(art["base"], name="llama-tiny")
    reg.add_base(art["other"], name="wide", source=str(art["base"]))  # same hint, other shapes
    assert reg.add_adapter(art["ad1"]).base.name == "llama-tiny" and loaded == [fits.id]


def test_a_file_replaced_before_its_hash_is_recorded_as_hashed(reg, art, tmp_path, monkeypatch):
    """A file replaced after register's first read (which refuses what is no adapter) and before its hash (taken in
    the read that checks its values) is recorded with the hash and the shapes of what it then is: the record's headers
    are read after the hash."""
    from loraops.registry import store

    shutil.copytree(art["ad1"], tmp_path / "a")
    identity, check = store.adapter_identity, formats.check_values

    def replaced(path, **kwargs):
        if path == tmp_path / "a":
            shutil.rmtree(path)
            shutil.copytree(art["ad2"], path)
        return check(path, **kwargs)

    monkeypatch.setattr(formats, "check_values", replaced)
    record = reg.add_adapter(tmp_path / "a")
    assert record.rank == 8 and record.sha256 == identity(art["ad2"], None)


@pytest.mark.parametrize("given", [True, False])
def test_register_with_a_base_reads_the_file_and_binds_it_once(reg, art, tmp_path, monkeypatch, given):
    """register with a base (given, or hinted by base_model_name_or_path) loads the base's manifest once, resolves the
    adapter's names against it once (the fit's resolution binds the record too) and parses the file's headers twice:
    once to refuse what is no adapter before hashing, once after for the record and the fit. A file that saves whole
    tensors is read with its values for the fit alone: the record is bound from the headers-only read."""
    from loraops import check
    from loraops.registry import store

    calls = {"manifest": 0, "resolve": 0, "headers": 0, "values": 0}

    def counted(owner, name, key):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls[key(kwargs) if callable(key) else key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    reg.add_base(art["base"], name="llama-tiny")
    counted(store.Registry, "_manifest", "manifest")
    counted(check, "resolve", "resolve")
    counted(formats, "read_adapter", lambda kwargs: "headers" if kwargs.get("values") is False else "values")
    inserted = []
    insert = store.Registry._insert_adapter
    monkeypatch.setattr(store.Registry, "_insert_adapter",
                        lambda self, name, fields, adapter, *a: inserted.append(adapter) or insert(self, name, fields, adapter, *a))
    saves = peft_adapter(art["base"], tmp_path / "saves", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    for adapter, values in ((art["ad1"], 0), (saves, 1)):
        calls.update(dict.fromkeys(calls, 0))
        record = reg.add_adapter(adapter, base="llama-tiny" if given else None)
        assert record.base.name == "llama-tiny"
        assert calls == {"manifest": 1, "resolve": 1, "headers": 2, "values": values}, (adapter, calls)
    assert [m.name for m in record.modules][:1] == ["model.layers.0.self_attn.q_proj"]
    bound = inserted[-1]
    assert bound.names_resolved and all(t.is_meta for t in (*bound.full_tensors.values(), bound.modules[
        "model.layers.0.self_attn.q_proj"].A))
