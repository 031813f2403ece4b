import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraops.basemodel import BaseModel
from loraops.errors import FormatError, InvalidInputError, NotFoundError
from tests.factories import peft_adapter, tiny_llama

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass


def test_manifest_and_fingerprint_do_not_depend_on_sharding(tmp_path):
    one = BaseModel.open(tiny_llama(tmp_path / "one"))
    sharded = BaseModel.open(tiny_llama(tmp_path / "sharded", shard_size="60KB"))
    assert len(sharded.files) > 1 and len(one.files) == 1
    assert {n: (t.shape, t.dtype) for n, t in one.tensors.items()} == {
        n: (t.shape, t.dtype) for n, t in sharded.tensors.items()
    }
    assert one.fingerprint() == sharded.fingerprint()
    assert "config.json" in {str(p) for p in sharded.other_files()}
    assert "model.safetensors.index.json" in {str(p) for p in sharded.other_files()}


def test_fingerprint_changes_with_bytes_and_is_cached(tmp_path, monkeypatch):
    save_file({"w": torch.zeros(4, 4)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(4, 4)}, str(tmp_path / "b.safetensors"))
    a, b = BaseModel.open(tmp_path / "a.safetensors"), BaseModel.open(tmp_path / "b.safetensors")
    assert a.fingerprint() != b.fingerprint()
    expected = a.fingerprint()

    def no_rehash(*args):
        raise AssertionError("rehashed an unchanged file")

    monkeypatch.setattr("loraops.basemodel._hash_file", no_rehash)
    assert BaseModel.open(tmp_path / "a.safetensors").fingerprint() == expected


def test_pipeline_components_are_prefixed(tmp_path):
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "text_encoder").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    save_file({"conv.weight": torch.zeros(2, 2)}, str(tmp_path / "pipe/unet/diffusion_pytorch_model.safetensors"))
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "pipe/text_encoder/model.safetensors"))
    base = BaseModel.open(tmp_path / "pipe")
    assert set(base.tensors) == {"unet.conv.weight", "text_encoder.fc.weight"}


def test_missing_shard_and_bad_index(tmp_path):
    folder = tiny_llama(tmp_path / "m", shard_size="60KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (folder / shard).unlink()
    with pytest.raises(NotFoundError, match="is missing"):
        BaseModel.open(folder)
    for bad in ([], {"weight_map": {"model.norm.weight": 5}}, {"weight_map": {"a": shard, "b": None}}):
        (folder / "model.safetensors.index.json").write_text(json.dumps(bad))
        with pytest.raises(FormatError, match="not a valid safetensors index|index is not a JSON object"):  # a number for a shard: TypeError
            BaseModel.open(folder)


def test_an_index_that_leaves_out_a_shard_is_refused(tmp_path):
    """Without it, the shard's tensors would only show up as an adapter's modules 'not in base'."""
    folder = tiny_llama(tmp_path / "m", shard_size="60KB")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != last}
    index_file.write_text(json.dumps(index))
    with pytest.raises(FormatError, match=f"does not list {last}, a shard of the same model"):
        BaseModel.open(folder)


def test_an_old_set_of_shards_of_another_total_beside_the_index_is_read_past(tmp_path):
    """A repo saved again with another shard count and the old shards left in it (model-0000N-of-00002 beside the
    index of model-0000N-of-00003): transformers reads the index's set and never looks at the other, which holds no
    shard of this set. Read as transformers reads it, locally and on the Hub (whose download fetches the listed
    shards only), not refused as a shard the index leaves out; one of the index's own total still is."""
    from transformers import AutoModelForCausalLM

    from loraops import hub

    folder = tiny_llama(tmp_path / "m", shard_size="60KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards[0].endswith(f"-of-{len(shards):05d}.safetensors") and len(shards) > 2
    for n in (1, 2):  # the old set, of another total
        save_file({"old": torch.zeros(2)}, str(folder / f"model-{n:05d}-of-00002.safetensors"))
    AutoModelForCausalLM.from_pretrained(folder)
    assert [f.name for f in BaseModel.open(folder).files] == shards
    names = sorted(p.name for p in folder.iterdir())
    read = lambda name: json.loads((folder / name).read_text())  # noqa: E731
    assert hub.weight_layout(names, read)[0] == shards

    (folder / "model.safetensors.index.json").write_text(json.dumps(
        index | {"weight_map": {n: s for n, s in index["weight_map"].items() if s != shards[-1]}}))
    with pytest.raises(FormatError, match=f"does not list {shards[-1]}, a shard"):
        BaseModel.open(folder)
    with pytest.raises(FormatError, match=f"does not list {shards[-1]}, a shard"):
        hub.weight_layout(names, read)


def test_pickle_only_folder(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(FormatError, match="pickle"):
        BaseModel.open(tmp_path)


CORRUPT_JSON = {"not JSON": ('{"weight_map": ', "is not JSON (Expecting value at line 1 column 16)"),
                "5000 digits": ('{"n": 1' + "0" * 5000 + "}", "is not JSON (a number of more than 4300 digits)"),
                "deep": ("[" * 100_000, "is not JSON (nested deeper than Python's recursion limit)"),
                "not UTF-8": (b'{"a": "\xff"}', "is not JSON (not UTF-8 text)"),
                "a list": ("[]", "is not a JSON object")}


@pytest.mark.parametrize("corrupt", CORRUPT_JSON)
def test_a_corrupt_index_or_config_is_one_line(tmp_path, corrupt):
    """A base's safetensors index or config.json that Python's json cannot read (a number past its 4300-digit limit,
    nesting past its recursion limit) was a traceback, and a corrupt config.json was read as {} (its
    tie_word_embeddings, its dtype for a merge's --dtype edit unknown): one FormatError naming the file, when the base
    is opened (its transformers_weights says which weights are the base's)."""
    from loraops.cli import main
    from click.testing import CliRunner

    text, says = CORRUPT_JSON[corrupt]
    folder = tiny_llama(tmp_path / "m", shard_size="60KB")
    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["q_proj"])
    index = folder / "model.safetensors.index.json"
    good = index.read_bytes()
    (index.write_bytes if isinstance(text, bytes) else index.write_text)(text)
    with pytest.raises(FormatError, match="^" + re.escape(f"{index}: safetensors index {says}")):
        BaseModel.open(folder)
    index.write_bytes(good)
    config = folder / "config.json"
    (config.write_bytes if isinstance(text, bytes) else config.write_text)(text)
    with pytest.raises(FormatError, match="^" + re.escape(f"{config}: model config {says}")):
        BaseModel.open(folder)  # (read before the weights, as from_pretrained reads it: its transformers_weights)
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(folder), "-o", str(out), "--no-record",
                                       "--dtype", "bf16"])
    assert result.exit_code != 0 and result.output.count("\n") == 1, result.output
    assert result.output == f"error: {config}: model config {says}\n"
    assert not out.exists()


@pytest.mark.parametrize("remove", [(), (2,)])
def test_shards_without_their_index_are_refused(tmp_path, remove):
    """transformers and diffusers find shards only through the index (never by a glob): read as they are, the shards
    of an interrupted copy merged into an output folder without an index, which from_pretrained does not load."""
    folder = tiny_llama(tmp_path / "m", shard_size="60KB")
    (folder / "model.safetensors.index.json").unlink()
    total = len(list(folder.glob("model-*-of-*.safetensors")))
    for n in remove:
        (folder / f"model-{n:05d}-of-{total:05d}.safetensors").unlink()
    also = f", and model-00002-of-{total:05d}.safetensors missing too" if remove else ""
    with pytest.raises(FormatError, match=re.escape(
            f"{folder}: shards model-0000N-of-{total:05d}.safetensors but no model.safetensors.index.json{also}: "
            "the index is missing (an interrupted copy?)")):
        BaseModel.open(folder)


def test_a_pipeline_component_with_shards_but_no_index_is_refused(tmp_path):
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    for n in (1, 2):
        save_file({f"conv{n}.weight": torch.zeros(2, 2)},
                  str(tmp_path / f"pipe/unet/diffusion_pytorch_model-0000{n}-of-00002.safetensors"))
    with pytest.raises(FormatError, match=re.escape(
            "unet: shards diffusion_pytorch_model-0000N-of-00002.safetensors but no "
            "diffusion_pytorch_model.safetensors.index.json: the index is missing")):
        BaseModel.open(tmp_path / "pipe")


def test_a_variants_shards_with_their_variant_index_are_read_as_before(tmp_path):
    """transformers names a variant's index model.safetensors.index.fp16.json (_add_variant): it is there, so the
    shards are not refused as missing one; without it the line names that index."""
    folder = tmp_path / "m"
    folder.mkdir()
    for n in (1, 2):
        save_file({f"w{n}": torch.zeros(2, 2)}, str(folder / f"model.fp16-0000{n}-of-00002.safetensors"))
    with pytest.raises(FormatError, match=re.escape("but no model.safetensors.index.fp16.json: the index is missing")):
        BaseModel.open(folder)
    (folder / "model.safetensors.index.fp16.json").write_text(json.dumps({"weight_map": {
        "w1": "model.fp16-00001-of-00002.safetensors", "w2": "model.fp16-00002-of-00002.safetensors"}}))
    assert set(BaseModel.open(folder).tensors) == {"w1", "w2"}


def test_the_missing_shards_named_are_those_of_the_same_set(tmp_path):
    """The line names the first three shards missing from the set (its total), not counting a shard of another
    total (a copy of an older sharding), and says there are more."""
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("model-00001-of-00005.safetensors", "model-00002-of-00003.safetensors"):
        save_file({name: torch.zeros(2)}, str(folder / name))
    with pytest.raises(FormatError, match=re.escape(
            "but no model.safetensors.index.json, and model-00002-of-00005.safetensors, "
            "model-00003-of-00005.safetensors, model-00004-of-00005.safetensors ... missing too: the index")):
        BaseModel.open(folder)


def test_diffusers_legacy_variant_shards_beside_an_index_are_not_its_unlisted_shards(tmp_path):
    """diffusers' legacy variant shards (diffusion_pytorch_model-00001-of-00002.fp16.safetensors, with their own
    index diffusion_pytorch_model.safetensors.fp16.index.json: _check_legacy_sharding_variant_format) match the glob
    diffusion_pytorch_model-*-of-*.safetensors: the folder's own index was refused for "not listing" them."""
    folder = tmp_path / "unet"
    folder.mkdir()
    weight_map = {}
    for n in (1, 2):
        shard = f"diffusion_pytorch_model-0000{n}-of-00002.safetensors"
        save_file({f"w{n}": torch.zeros(2)}, str(folder / shard))
        save_file({f"w{n}": torch.zeros(2, dtype=torch.float16)},
                  str(folder / f"diffusion_pytorch_model-0000{n}-of-00002.fp16.safetensors"))
        weight_map[f"w{n}"] = shard
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert {n: t.dtype for n, t in BaseModel.open(folder).tensors.items()} == {"w1": "F32", "w2": "F32"}


def test_a_config_with_a_lone_surrogate_escape_is_read_as_transformers_reads_it(tmp_path):
    """config.json holding a lone surrogate escape ("\\ud800", which Python's json reads): transformers loads the
    model, loraops refused the base at open (the refusal meant for text it stores: an adapter config, an index's
    tensor names, which stays). Now opened and merged (the config written back with the escape, which loads);
    test_hub: a Hub base's too."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from loraops.cli import main

    folder = tiny_llama(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"note": "\ud800"}))
    assert AutoModelForCausalLM.from_pretrained(folder).config.note == "\ud800"
    assert BaseModel.open(folder).config("model.embed_tokens.weight")["note"] == "\ud800"
    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["q_proj"])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(folder), "-o", str(out), "--no-record",
                                       "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert AutoModelForCausalLM.from_pretrained(out).config.note == "\ud800"
    index = tiny_llama(tmp_path / "s", shard_size="60KB") / "model.safetensors.index.json"
    listed = json.loads(index.read_text())
    index.write_text(json.dumps(listed | {"metadata": {"note": "\ud800"}}))
    with pytest.raises(FormatError, match="safetensors index holds text that is not Unicode"):
        BaseModel.open(index.parent)


def _shards(folder, stem, total, n_values=None, legacy_variant=None, dtype=torch.float32):
    """Shards of one set, NAME-0000n-of-0000total.safetensors (diffusers' legacy: ….VARIANT.safetensors), each one
    tensor w<n>; returns {tensor: shard} as its index lists them."""
    folder.mkdir(parents=True, exist_ok=True)
    listed = {}
    for n in n_values or range(1, total + 1):
        shard = f"{stem}-{n:05d}-of-{total:05d}" + (f".{legacy_variant}" if legacy_variant else "") + ".safetensors"
        save_file({f"w{n}": torch.zeros(2, dtype=dtype)}, str(folder / shard))
        listed[f"w{n}"] = shard
    return listed


def test_several_variants_without_default_weights_are_refused_naming_them(tmp_path):
    """Only variants (no default weights): from_pretrained without variant= loads none of them. Every set was read,
    so each tensor came twice, refused as 'also appears in' another file (or, shards of one set without their index,
    for that); one line names the variants and what to give instead."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "m"
    listed = _shards(folder, "model.bf16", 2)
    (folder / "model.safetensors.index.bf16.json").write_text(json.dumps({"weight_map": listed}))
    _shards(folder, "model.fp16", 2)
    (folder / "config.json").write_text((tiny_llama(tmp_path / "ref") / "config.json").read_text())
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(folder)
    says = ("no default weights, only the variants bf16, fp16, which from_pretrained loads only with variant=: give "
            "one variant's .safetensors file, or a folder holding only its files, as the base")
    with pytest.raises(FormatError, match="^" + re.escape(f"{folder}: {says}") + "$"):
        BaseModel.open(folder)
    single = tmp_path / "s"
    single.mkdir()
    save_file({"w": torch.zeros(2)}, str(single / "model.ema.safetensors"))
    save_file({"w": torch.zeros(2, dtype=torch.float16)}, str(single / "model.fp16.safetensors"))
    with pytest.raises(FormatError, match=re.escape(f"{single}: no default weights, only the variants ema, fp16,")):
        BaseModel.open(single)
    assert BaseModel.open(single / "model.fp16.safetensors").dtype == "F16"  # (what the line says to give)


def test_model_safetensors_is_read_before_its_index_as_transformers_does(tmp_path):
    """transformers reads model.safetensors before model.safetensors.index.json (diffusers reads its index first);
    loraops read the index's shards. Copies give the same fingerprint either way; where they differ, the base is
    what transformers loads, and a merge writes model.safetensors alone (the shards and index are left out)."""
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loraops.cli import main

    folder = tiny_llama(tmp_path / "m")
    copy = tiny_llama(tmp_path / "copy", shard_size="60KB")
    for file in copy.glob("model*"):
        (folder / file.name).write_bytes(file.read_bytes())  # the same weights, sharded
    base = BaseModel.open(folder)
    assert base.files == [folder / "model.safetensors"]
    assert base.fingerprint() == BaseModel.open(copy).fingerprint()
    other = tiny_llama(tmp_path / "other", seed=1, shard_size="60KB")
    for file in other.glob("model-*"):
        (folder / file.name).write_bytes(file.read_bytes())  # shards of other weights
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    single = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in single.items())
    assert BaseModel.open(folder).fingerprint() == base.fingerprint()
    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["q_proj"])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(folder), "-o", str(out), "--no-record"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_config_transformers_weights_names_the_weights(tmp_path):
    """config.json's transformers_weights names the file transformers' from_pretrained reads before any other; it was
    ignored (model.safetensors read). A name transformers refuses, one outside the folder, or a file the folder lacks
    is one line; the Hub layout reads it the same way."""
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loraops import hub
    from loraops.cli import main

    folder = tiny_llama(tmp_path / "m")
    (folder / "custom.safetensors").write_bytes((tiny_llama(tmp_path / "o", seed=1) / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"transformers_weights": "custom.safetensors"}))
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    custom = load_file(str(folder / "custom.safetensors"))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in custom.items())
    assert BaseModel.open(folder).files == [folder / "custom.safetensors"]
    names = ["config.json", "custom.safetensors", "model.safetensors"]
    assert hub.weight_layout(names, lambda name: json.loads((folder / name).read_text()))[0] == ["custom.safetensors"]
    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["q_proj"])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(folder), "-o", str(out), "--no-record"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["custom.safetensors"]
    AutoModelForCausalLM.from_pretrained(out)
    for named, says in (("weights.bin", "is neither a .safetensors file nor a .safetensors.index.json"),
                        ("../m/custom.safetensors", "is not a path inside the folder"),
                        (str(folder / "custom.safetensors"), "is not a path inside the folder"),
                        ("gone.safetensors", "names gone.safetensors, which the folder does not hold")):
        (folder / "config.json").write_text(json.dumps(config | {"transformers_weights": named}))
        with pytest.raises(FormatError, match=re.escape(f"{folder}: config.json's transformers_weights ")
                           + ".*" + re.escape(says)):
            BaseModel.open(folder)


def test_transformers_weights_naming_an_index_or_a_dot_path_reads_what_transformers_loads(tmp_path):
    """transformers_weights may name an index (its shards are the weights) and may be written as a path inside the
    folder (./custom.safetensors, which transformers joins to the folder and loads); the index was untested and the
    ./ form refused as 'not a file name of the folder itself'. A merge of the index writes its shards, which load."""
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loraops.cli import main

    def loads(folder, files):
        loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
        assert all(torch.equal(loaded[name], tensor) for file in files for name, tensor in load_file(str(file)).items())
        return loaded

    folder = tiny_llama(tmp_path / "m")
    other = tiny_llama(tmp_path / "o", seed=1, shard_size="60KB")
    index = json.loads((other / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        (folder / shard.replace("model-", "custom-")).write_bytes((other / shard).read_bytes())
    weight_map = {name: shard.replace("model-", "custom-") for name, shard in index["weight_map"].items()}
    (folder / "custom.safetensors.index.json").write_text(json.dumps(index | {"weight_map": weight_map}))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"transformers_weights": "custom.safetensors.index.json"}))
    shards = sorted(folder / shard for shard in set(weight_map.values()))
    base = loads(folder, shards)
    assert BaseModel.open(folder).files == shards
    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["q_proj"])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(folder), "-o", str(out), "--no-record"])
    assert result.exit_code == 0, result.output
    merged = loads(out, sorted(out.glob("custom-*.safetensors")))
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    (folder / "custom.safetensors").write_bytes((other / shards[0].name.replace("custom-", "model-")).read_bytes())
    (folder / "config.json").write_text(json.dumps(config | {"transformers_weights": "./custom.safetensors"}))
    loads(folder, [folder / "custom.safetensors"])
    assert BaseModel.open(folder).files == [folder / "custom.safetensors"]


def _tiny_vae(folder, seed, **save):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(block_out_channels=(4,), layers_per_block=1, norm_num_groups=2, latent_channels=2,
                  down_block_types=("DownEncoderBlock2D",),
                  up_block_types=("UpDecoderBlock2D",)).save_pretrained(folder, **save)
    return folder


@pytest.mark.parametrize("copy_as", ["model.safetensors", "custom.safetensors"])
def test_a_diffusers_folder_is_read_by_diffusers_rule(tmp_path, copy_as):
    """A diffusers model folder (its config.json has _class_name, _diffusers_version): diffusers' from_pretrained
    reads diffusion_pytorch_model.safetensors.index.json before any file and knows no transformers_weights, but
    transformers' order was applied (model.safetensors before the index, transformers_weights first): the base was
    other weights than diffusers loads. Now the index's shards, as loaded, also in a pipeline and on the Hub."""
    from diffusers import AutoencoderKL

    from loraops import hub
    from loraops.basemodel import folder_weights

    folder = _tiny_vae(tmp_path / "vae", 0, max_shard_size="2KB")
    (folder / copy_as).write_bytes((_tiny_vae(tmp_path / "o", 1) / "diffusion_pytorch_model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    if copy_as != "model.safetensors":
        (folder / "config.json").write_text(json.dumps(config | {"transformers_weights": copy_as}))
        config = json.loads((folder / "config.json").read_text())
    loaded = AutoencoderKL.from_pretrained(folder).state_dict()
    base = BaseModel.open(folder)
    shards = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert base.files == shards and base.fingerprint() == BaseModel.open(folder).fingerprint()
    from safetensors.torch import load_file
    assert all(torch.equal(loaded[n], t) for f in shards for n, t in load_file(str(f)).items())
    names = sorted(p.name for p in folder.iterdir())
    assert folder_weights(names, config) == ("diffusion_pytorch_model.safetensors.index.json", [])
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    folder.rename(pipe / "vae")
    assert BaseModel.open(pipe).files == [pipe / "vae" / s.name for s in shards]
    listing = ["model_index.json", *(f"vae/{n}" for n in names)]
    read = lambda name: json.loads((pipe / name).read_text())  # noqa: E731
    assert hub.weight_layout(listing, read)[0] == [f"vae/{s.name}" for s in shards]


def test_transformers_weights_in_a_subfolder_is_read_as_transformers_reads_it(tmp_path):
    """transformers_weights naming a file in a subfolder (sub/model.safetensors), which transformers loads (it
    refuses only a path out of the folder), was refused; an index there lists its shards relative to the model's
    folder, as transformers reads them. Read, merged (the config and index of the model above them edited, the
    output loading in transformers) and laid out on the Hub the same, its config.json fetched with it."""
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loraops import hub
    from loraops.cli import main

    folder = tiny_llama(tmp_path / "m")
    (folder / "sub").mkdir()
    other = tiny_llama(tmp_path / "o", seed=1)
    (folder / "sub" / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"transformers_weights": "sub/model.safetensors"}))
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert all(torch.equal(loaded[n], t) for n, t in load_file(str(other / "model.safetensors")).items())
    base = BaseModel.open(folder)
    assert base.files == [folder / "sub" / "model.safetensors"]
    assert base.config("lm_head.weight")["transformers_weights"] == "sub/model.safetensors"
    names = ["config.json", "model.safetensors", "sub/model.safetensors"]
    read = lambda name: json.loads((folder / name).read_text())  # noqa: E731
    weights = hub.weight_layout(names, read)[0]
    assert weights == ["sub/model.safetensors"] and "config.json" in hub.base_reads(names, weights)
    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["q_proj"])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(folder), "-o", str(out), "--no-record",
                                       "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors")) == ["sub/model.safetensors"]
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert merged["lm_head.weight"].dtype == torch.bfloat16  # (its config's dtype edited: the model's, above it)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"].float(),
                           loaded["model.layers.0.self_attn.q_proj.weight"].bfloat16().float())

    sharded = tiny_llama(tmp_path / "s", seed=2, shard_size="60KB")
    (sharded / "sub").mkdir()
    (sharded / "model.safetensors.index.json").rename(sharded / "sub" / "model.safetensors.index.json")
    config = json.loads((sharded / "config.json").read_text())
    named = {"transformers_weights": "sub/model.safetensors.index.json"}
    (sharded / "config.json").write_text(json.dumps(config | named))
    loaded = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert BaseModel.open(sharded).files == shards
    out = tmp_path / "out2"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(sharded), "-o", str(out), "--no-record",
                                       "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "sub" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    assert index["metadata"]["total_size"] == sum(p.stat().st_size - 8 - int.from_bytes(p.read_bytes()[:8], "little")
                                                  for p in out.glob("model-*.safetensors"))
    AutoModelForCausalLM.from_pretrained(out)


def test_a_merge_of_an_index_in_a_subfolder_keeps_its_shards_paths(tmp_path):
    """transformers_weights naming sub/model.safetensors.index.json whose shards lie in sub/ too: its weight_map names
    them sub/model-0000n-of-0000N.safetensors (relative to the model's folder, as transformers reads them). A merge
    rewrote them by the bare file name, and the output did not load (FileNotFoundError: out/model-00001-…)."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from loraops.cli import main

    folder = tiny_llama(tmp_path / "s", shard_size="60KB")
    (folder / "sub").mkdir()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for shard in folder.glob("model-*.safetensors"):
        shard.rename(folder / "sub" / shard.name)
    index["weight_map"] = {name: f"sub/{shard}" for name, shard in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").unlink()
    (folder / "sub" / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"transformers_weights": "sub/model.safetensors.index.json"}))
    AutoModelForCausalLM.from_pretrained(folder)
    assert BaseModel.open(folder).files == sorted((folder / "sub").glob("model-*.safetensors"))
    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["q_proj"])
    for dtype in ([], ["--dtype", "bf16"]):
        out = tmp_path / f"out{len(dtype)}"
        result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(folder), "-o", str(out), "--no-record",
                                           *dtype])
        assert result.exit_code == 0, result.output
        written = json.loads((out / "sub" / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(written.values()) == set(index["weight_map"].values())
        AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("shards_in", ["", "sub/"])
def test_an_index_in_a_subfolder_is_held_to_the_shards_beside_it_and_its_shards(tmp_path, shards_in):
    """An index transformers_weights names in a subfolder (sub/model.safetensors.index.json) lists its shards
    relative to the model's folder, as transformers reads them (get_checkpoint_shard_files joins them to the
    folder), at the top or in sub/. A shard of its set that it does not list was read past (its tensors missing from
    the base) where an index at the top is refused for it; now refused the same, locally and on the Hub, whose
    offline snapshot needs that index (base_reads left it out where the shards lie at the top)."""
    from transformers import AutoModelForCausalLM

    from loraops import hub

    folder = tiny_llama(tmp_path / "s", shard_size="60KB")
    (folder / "sub").mkdir()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / "model.safetensors.index.json").unlink()
    for shard in folder.glob("model-*.safetensors"):
        shard.rename(folder / shards_in / shard.name)
    index["weight_map"] = {name: f"{shards_in}{shard}" for name, shard in index["weight_map"].items()}
    index_file = folder / "sub" / "model.safetensors.index.json"
    index_file.write_text(json.dumps(index))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"transformers_weights": "sub/model.safetensors.index.json"}))
    AutoModelForCausalLM.from_pretrained(folder)
    shards = sorted(set(index["weight_map"].values()))
    assert [str(f.relative_to(folder)) for f in BaseModel.open(folder).files] == shards
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    read = lambda name: json.loads((folder / name).read_text())  # noqa: E731
    weights, _, indexes = hub.weight_layout(names, read)
    assert weights == shards and indexes == ["sub/model.safetensors.index.json"]
    assert "sub/model.safetensors.index.json" in hub.base_reads(names, weights, indexes)

    index_file.write_text(json.dumps(index | {"weight_map": {n: s for n, s in index["weight_map"].items()
                                                             if s != shards[-1]}}))
    says = f"does not list {shards[-1]}, a shard of the same model"
    with pytest.raises(FormatError, match=re.escape(f"{index_file}: {says}")):
        BaseModel.open(folder)
    with pytest.raises(FormatError, match=re.escape(f"sub/model.safetensors.index.json: {says}")):
        hub.weight_layout(names, read)


def test_a_tied_model_whose_weights_lie_in_a_subfolder_comes_out_untied(tmp_path):
    """A LoRA on a tied model's embeddings unties its head (merged untied: the head keeps the base's embeddings); with
    transformers_weights naming sub/model.safetensors, the config to edit (tie_word_embeddings false) is the model's,
    above the weights file, not one beside it (left saying tied, it is loaded tied by what honours the flag; transformers
    5 warns and keeps the stored head)."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from loraops.cli import main

    folder = tiny_llama(tmp_path / "m", tie=True)
    (folder / "sub").mkdir()
    (folder / "model.safetensors").rename(folder / "sub" / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"transformers_weights": "sub/model.safetensors"}))
    embeddings = AutoModelForCausalLM.from_pretrained(folder).state_dict()["model.embed_tokens.weight"]
    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["embed_tokens"])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(folder), "-o", str(out), "--no-record"])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert not torch.equal(merged["model.embed_tokens.weight"], embeddings)
    assert torch.equal(merged["lm_head.weight"], embeddings)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_default_load_reads_no_variant_files(tmp_path):
    """from_pretrained without variant= reads model.safetensors (transformers) or diffusion_pytorch_model.safetensors
    (diffusers), never a variant's files beside them: the base is what it loads. Both were read (each tensor twice:
    refused), and a variant's shards without their index refused the folder."""
    from transformers import AutoModelForCausalLM

    folder = tiny_llama(tmp_path / "m")
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).save_pretrained(
        folder, variant="fp16", max_shard_size="60KB")
    assert (folder / "model.safetensors.index.fp16.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    base = BaseModel.open(folder)
    assert base.files == [folder / "model.safetensors"]
    assert {n: t.dtype for n, t in base.tensors.items()} == {n: "F32" for n in loaded}
    (folder / "model.safetensors.index.fp16.json").unlink()
    assert BaseModel.open(folder).files == [folder / "model.safetensors"]

    unet = tmp_path / "pipe" / "unet"
    unet.mkdir(parents=True)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(unet / "diffusion_pytorch_model.safetensors"))
    save_file({"w": torch.zeros(2, dtype=torch.float16)}, str(unet / "diffusion_pytorch_model.fp16.safetensors"))
    _shards(unet, "diffusion_pytorch_model", 2, legacy_variant="ema")
    assert BaseModel.open(tmp_path / "pipe").files == [unet / "diffusion_pytorch_model.safetensors"]


@pytest.mark.parametrize("index", ["model.safetensors.index.fp16.json",
                                   "diffusion_pytorch_model.safetensors.fp16.index.json"])
def test_a_lone_variant_is_read_through_its_index(tmp_path, index):
    """A folder of one variant only loads with variant= (transformers' and diffusers' _add_variant naming, or
    diffusers' legacy shards), through that variant's index: read through it too, so a shard it does not list is
    refused (it was read by glob) and a merge rewrites the index for its output (it was copied as it was)."""
    folder = tmp_path / "m"
    legacy = index.endswith(".fp16.index.json")
    stem = index.split(".")[0]
    listed = _shards(folder, stem if legacy else f"{stem}.fp16", 2, legacy_variant="fp16" if legacy else None)
    (folder / index).write_text(json.dumps({"weight_map": listed}))
    base = BaseModel.open(folder)
    assert base.parts[0].index_file == folder / index and set(base.tensors) == {"w1", "w2"}
    (folder / index).write_text(json.dumps({"weight_map": {"w1": listed["w1"]}}))
    with pytest.raises(FormatError, match=re.escape(f"{folder / index}: does not list {listed['w2']}, a shard")):
        BaseModel.open(folder)
    (folder / index).unlink()  # (diffusers' legacy shards were read by glob without it)
    with pytest.raises(FormatError, match=re.escape(f"shards {listed['w1'].replace('00001', '0000N')} but no {index}")):
        BaseModel.open(folder)


def test_a_lone_variant_is_read_in_transformers_order_for_that_variant(tmp_path):
    """A folder of one variant only loads as from_pretrained(variant=) loads it: model.fp16.safetensors before
    model.safetensors.index.fp16.json, as without a variant. loraops read the variant's index whenever the folder had
    one (other weights than transformers loads), and refused model.fp16.safetensors beside stray shards of the
    variant without their index, which transformers never looks at."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = tiny_llama(tmp_path / "m", dtype=torch.float16, shard_size="60KB")
    for file in folder.glob("model*"):
        file.rename(folder / file.name.replace("model-", "model.fp16-").replace("index.json", "index.fp16.json"))
    index = folder / "model.safetensors.index.fp16.json"
    index.write_text(index.read_text().replace('"model-', '"model.fp16-'))
    shards = sorted(folder.glob("model.fp16-*.safetensors"))
    assert BaseModel.open(folder).files == shards  # (as before)
    single = tiny_llama(tmp_path / "o", seed=1, dtype=torch.float16) / "model.safetensors"
    (folder / "model.fp16.safetensors").write_bytes(single.read_bytes())
    loaded = AutoModelForCausalLM.from_pretrained(folder, variant="fp16").state_dict()
    assert all(torch.equal(loaded[n], t) for n, t in load_file(str(single)).items())
    assert BaseModel.open(folder).files == [folder / "model.fp16.safetensors"]
    index.unlink()
    AutoModelForCausalLM.from_pretrained(folder, variant="fp16")
    assert BaseModel.open(folder).files == [folder / "model.fp16.safetensors"]


def test_a_merge_of_a_lone_variant_rewrites_its_index(tmp_path):
    """Read through its index, a lone variant's merge (--dtype) writes that index for its output, which
    from_pretrained(variant=) then loads; the index was copied as it was (the base's sizes, a stale total_size)."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from loraops.cli import main

    default = tiny_llama(tmp_path / "default")
    adapter = peft_adapter(default, tmp_path / "a", target_modules=["q_proj"])
    folder = tmp_path / "fp16"
    AutoModelForCausalLM.from_pretrained(default).save_pretrained(folder, variant="fp16", max_shard_size="60KB")
    index = "model.safetensors.index.fp16.json"
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(folder), "-o", str(out), "--no-record",
                                       "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    total = json.loads((out / index).read_text())["metadata"]["total_size"]
    assert total == json.loads((folder / index).read_text())["metadata"]["total_size"] // 2
    merged = AutoModelForCausalLM.from_pretrained(out, variant="fp16")
    assert merged.dtype == torch.bfloat16


def test_a_merge_leaves_out_the_index_of_the_variant_shards_it_leaves_out(tmp_path):
    """A variant's files beside the default weights are other copies of the base (not merged: left out of the
    output); its index was copied, listing shards the output does not hold (variant= then failed on them)."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from loraops.cli import main

    folder = tiny_llama(tmp_path / "m")
    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["q_proj"])
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, variant="fp16", max_shard_size="60KB")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(folder), "-o", str(out), "--no-record"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_a_merge_leaves_out_every_index_of_weights_it_does_not_write(tmp_path):
    """An index beside the merged weights lists other copies of them, which the output does not hold: a variant's
    whose shards are not there (a Hub snapshot downloads the variant's index, a .json, but not its shards), and
    pytorch_model.bin.index.json (its .bin shards are left out). Copied, variant= / use_safetensors=False loaded
    from_pretrained a folder that lists missing files."""
    from click.testing import CliRunner

    from loraops.cli import main

    folder = tiny_llama(tmp_path / "m")
    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["q_proj"])
    missing = {"weight_map": {"lm_head.weight": "model.fp16-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.fp16.json").write_text(json.dumps(missing))
    (folder / "pytorch_model-00001-of-00001.bin").write_bytes(b"pickle")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "pytorch_model-00001-of-00001.bin"}}))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(folder), "-o", str(out), "--no-record"])
    assert result.exit_code == 0, result.output
    assert not list(out.glob("*index*")) and (out / "model.safetensors").exists()


@pytest.mark.parametrize("names, read", [
    # SD/SDXL/Flux single-file checkpoints: their dots and dashes are no variant's or shard's
    (["sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors"],
     ["sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors"]),
    (["v1-5-pruned.safetensors"], ["v1-5-pruned.safetensors"]),
    (["flux1-dev-00001-of-00002.fp8.safetensors"], ["flux1-dev-00001-of-00002.fp8.safetensors"]),
    # diffusers' unet/ of SD 1.5: fp16 and non_ema variants beside the default weights
    (["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
      "diffusion_pytorch_model.non_ema.safetensors"], ["diffusion_pytorch_model.safetensors"]),
    (["model.safetensors", "model.fp16.safetensors", "model.safetensors.index.fp16.json"], ["model.safetensors"]),
    # Mistral's repos: its own format's consolidated.safetensors beside transformers' weights, which read only theirs
    (["consolidated.safetensors", "model.safetensors"], ["model.safetensors"]),
    (["consolidated.safetensors"], ["consolidated.safetensors"]),
])
def test_folder_weights_of_real_layouts(names, read):
    """What folder_weights reads of layouts as published: a name not from_pretrained's weights name (model,
    diffusion_pytorch_model) is never a variant, and a shard only by its -N-of-M.safetensors ending (a checkpoint
    named …-00001-of-00002.fp8.safetensors is read as a file, not refused for an index named after no variant)."""
    from loraops.basemodel import folder_weights

    assert folder_weights(names) == (None, read)


def test_mistrals_consolidated_weights_beside_transformers_are_left_out(tmp_path):
    """A Mistral repo's consolidated.safetensors (its own format's copy of the weights) beside model.safetensors was
    read as more of the base: the merge wrote it through unmerged, a model Mistral-format loaders (vLLM's
    --load-format mistral) load without the LoRA. transformers reads model.safetensors alone, and so does loraops."""
    from click.testing import CliRunner

    from loraops.cli import main

    folder = tiny_llama(tmp_path / "m")
    save_file({"layers.0.attention.wq.weight": torch.zeros(2, 2)}, str(folder / "consolidated.safetensors"))
    assert not any(name.startswith("layers.") for name in BaseModel.open(folder).tensors)
    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["q_proj"])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(folder), "-o", str(out), "--no-record"])
    assert result.exit_code == 0, result.output
    assert "consolidated.safetensors" in result.output and not (out / "consolidated.safetensors").exists()


def test_a_base_that_is_neither_file_nor_folder_is_one_line(tmp_path):
    """A FIFO given as the base (it exists, for root too): it was listed as a folder, and the file system's
    NotADirectoryError ("Not a directory") was all the user saw."""
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(FormatError, match=r"pipe: neither a file nor a folder \(a FIFO, a socket or a device\)"):
        BaseModel.open(tmp_path / "pipe")


@pytest.mark.parametrize("refused", ["iterdir", "exists"])
def test_a_base_folder_it_may_not_read_is_one_line(tmp_path, monkeypatch, refused):
    """A folder without read or search permission (chmod 000; root reads it anyway, so the refusal is the file
    system's PermissionError raised where the folder is listed or searched): a typed error naming the folder."""
    folder = tiny_llama(tmp_path / "base")
    original = getattr(Path, refused)

    def refuse(self, *args, **kwargs):
        if (self if refused == "iterdir" else self.parent) == folder:  # (listing it, or searching it for a file)
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, refused, refuse)
    with pytest.raises(InvalidInputError, match=re.escape(f"{folder}: cannot read this folder (Permission denied)")):
        BaseModel.open(folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 folder")
def test_a_base_folder_without_permission_is_one_line(tmp_path):
    folder = tiny_llama(tmp_path / "base")
    folder.chmod(0)
    try:
        with pytest.raises(InvalidInputError, match="cannot read this folder"):
            BaseModel.open(folder)
    finally:
        folder.chmod(0o755)


def test_a_folder_without_config_holding_both_libraries_weights_is_refused(tmp_path):
    """No config.json (neither transformers' nor diffusers' from_pretrained loads such a folder) and both
    model.safetensors and diffusion_pytorch_model.safetensors: the first was read and the other left out, which of
    the two being the model unknown. Refused in one line, locally and on the Hub; with a config, its library's own
    file is read (a transformers config: model.safetensors; a diffusers one: diffusion_pytorch_model.safetensors)."""
    from diffusers import UNet2DModel
    from transformers import AutoModelForCausalLM

    from loraops import hub

    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"a": torch.zeros(2)}, str(folder / "model.safetensors"))
    save_file({"b": torch.zeros(2)}, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="Should have a `model_type` key in its config.json"):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(OSError, match="no file named config.json"):
        UNet2DModel.from_pretrained(folder)
    says = ("no config.json, and both transformers' weights (model.safetensors) and diffusers' "
            "(diffusion_pytorch_model.safetensors): neither from_pretrained loads")
    with pytest.raises(FormatError, match=re.escape(f"{folder}: {says}")):
        BaseModel.open(folder)
    names = sorted(p.name for p in folder.iterdir())
    with pytest.raises(FormatError, match="^" + re.escape(says)):
        hub.weight_layout(names, lambda name: {})
    for config, read in (({"model_type": "llama"}, "model.safetensors"),
                         ({"_class_name": "UNet2DModel", "_diffusers_version": "0.42.0"},
                          "diffusion_pytorch_model.safetensors")):
        (folder / "config.json").write_text(json.dumps(config))
        assert BaseModel.open(folder).files == [folder / read]
    (folder / "config.json").unlink()
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    assert BaseModel.open(folder).files == [folder / "model.safetensors"]  # (one model's weights: read as before)


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_a_folder_without_config_is_refused_for_a_set_of_shards_without_its_index(tmp_path, variant):
    """No config.json, transformers' shards read through their index (model.safetensors.index.json, or a lone
    variant's model.safetensors.index.fp16.json) and beside them diffusers' shards of the same variant without
    theirs: the indexed set was read and the other left out (the shard rule looked at a folder's shards only where no
    index was found). Refused, as a set without its index is; a transformers config reads its own set only."""
    folder = tmp_path / "m"
    dot = f".{variant}" if variant else ""
    listed = _shards(folder, f"model{dot}", 2)
    index = f"model.safetensors.index{dot}.json"
    (folder / index).write_text(json.dumps({"weight_map": listed}))
    assert BaseModel.open(folder).files == [folder / s for s in sorted(listed.values())]
    _shards(folder, f"diffusion_pytorch_model{dot}", 2)
    with pytest.raises(FormatError, match=re.escape(
            f"{folder}: no config.json, and shards diffusion_pytorch_model{dot}-0000N-of-00002.safetensors but no "
            f"diffusion_pytorch_model.safetensors.index{dot}.json: the index is missing")):
        BaseModel.open(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert BaseModel.open(folder).files == [folder / s for s in sorted(listed.values())]


def test_a_folder_without_config_whose_index_lists_shards_named_otherwise_is_read(tmp_path):
    """No config.json, and model.safetensors.index.json listing shards not named after it (weights-0000N-of-00002,
    as some converters name them): the shards are the index's set, read through it as before, not "another set of
    shards without its index" (bases5 refused the folder, which it had read and fingerprinted: "no
    weights.safetensors.index.json: the index is missing"). Locally and on the Hub; an unlisted set beside it is
    still refused."""
    from loraops import hub

    folder = tmp_path / "m"
    listed = _shards(folder, "weights", 2)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": listed}))
    assert BaseModel.open(folder).files == [folder / s for s in sorted(listed.values())]
    names = sorted(p.name for p in folder.iterdir())
    read = lambda name: json.loads((folder / name).read_text())  # noqa: E731
    assert hub.weight_layout(names, read)[0] == sorted(listed.values())

    _shards(folder, "other", 2)
    with pytest.raises(FormatError, match=re.escape("no config.json, and shards other-0000N-of-00002.safetensors but no")):
        BaseModel.open(folder)


def _patched_model(tmp_path: Path) -> tuple[Path, str, dict]:
    """A sharded tiny Llama 'patched' as transformers_weights lets one: patch/model.safetensors.index.json lists the
    top-level shards but the last, replaced by patch/<last> (other values, the same tensors), the original left
    beside the top-level index. Returns (folder, the last shard's name, the patch index)."""
    from safetensors.torch import load_file

    folder = tiny_llama(tmp_path / "m", shard_size="60KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    (folder / "patch").mkdir()
    save_file({name: tensor + 1 for name, tensor in load_file(folder / last).items()}, str(folder / "patch" / last),
              metadata={"format": "pt"})
    patch = index | {"weight_map": {n: f"patch/{s}" if s == last else s for n, s in index["weight_map"].items()}}
    (folder / "patch" / "model.safetensors.index.json").write_text(json.dumps(patch))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"transformers_weights": "patch/model.safetensors.index.json"}))
    return folder, last, patch


def test_a_patch_index_with_a_replacement_shard_reads_what_transformers_loads(tmp_path):
    """A subfolder index (transformers_weights) listing the top-level shards but one, replaced by a shard of its own
    beside it, loads in transformers (get_checkpoint_shard_files reads the shards it lists, relative to the model's
    folder); the original beside the top-level index is read past. It was refused by name as a shard the index does
    not list; an unlisted shard is now refused only where it holds a tensor the index does not list (headers read),
    locally and on the Hub. The merge writes the patch layout and it loads, its logits those of PEFT's merge."""
    from click.testing import CliRunner
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraops import hub
    from loraops.cli import main

    folder, last, patch = _patched_model(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder)
    name = next(n for n, s in patch["weight_map"].items() if s == f"patch/{last}")
    assert model.state_dict()[name].ne(0).any()  # (+1: not the original's)
    shards = sorted(set(patch["weight_map"].values()))
    assert [str(f.relative_to(folder)) for f in BaseModel.open(folder).files] == shards
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    read = lambda n: json.loads((folder / n).read_text())  # noqa: E731
    headers = lambda n: BaseModel.open(folder / n).tensors  # noqa: E731
    weights, _, indexes = hub.weight_layout(names, read, read_header=headers)
    assert weights == shards and indexes == ["patch/model.safetensors.index.json"]
    assert last not in hub.base_reads(names, weights, indexes)

    adapter = peft_adapter(folder, tmp_path / "a", target_modules=["q_proj", "down_proj", "lm_head"])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(folder), "-o", str(out), "--no-record"])
    assert result.exit_code == 0, result.output
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors")) == shards
    assert not (out / "model.safetensors.index.json").exists()  # (the old one: lists the replaced shard)
    reference = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    ids = torch.arange(16).unsqueeze(0)
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, reference(ids).logits)


def test_a_patch_index_is_still_refused_where_a_shard_it_leaves_out_holds_a_tensor_it_does_not_list(tmp_path):
    """The check kept: the original shard beside it holding a tensor no shard the patch index lists holds (its
    tensors would be missing from the base) is refused, locally and on the Hub."""
    from safetensors.torch import load_file

    from loraops import hub

    folder, last, patch = _patched_model(tmp_path)
    save_file(load_file(folder / last) | {"extra.weight": torch.zeros(2)}, str(folder / last))
    says = f"patch/model.safetensors.index.json: does not list {last}, a shard of the same model"
    with pytest.raises(FormatError, match=re.escape(says)):
        BaseModel.open(folder)
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    read = lambda n: json.loads((folder / n).read_text())  # noqa: E731
    with pytest.raises(FormatError, match=re.escape(says)):
        hub.weight_layout(names, read, read_header=lambda n: BaseModel.open(folder / n).tensors)


@pytest.mark.parametrize("named_by", ["transformers_weights", "index"])
def test_a_pipeline_component_whose_weights_lie_below_it_is_read(tmp_path, named_by):
    """A pipeline's transformers component (text_encoder) whose weights lie in a subfolder of it, named by its
    config.json's transformers_weights (sub/model.safetensors) or by its model.safetensors.index.json (shards
    sub/model-0000n-of-0000N.safetensors): diffusers loads it (load_sub_model: from_pretrained(<pipe>/text_encoder),
    which reads them). loraops looked only at folders with .safetensors at their top: the component was left out
    of the base, its tensors missing; now read, locally and on the Hub."""
    from transformers import AutoModelForCausalLM

    from loraops import hub

    pipe = tmp_path / "pipe"
    _tiny_vae(pipe / "vae", 0)
    (pipe / "model_index.json").write_text("{}")
    encoder = tiny_llama(pipe / "text_encoder", shard_size="60KB" if named_by == "index" else None)
    (encoder / "sub").mkdir()
    for weights in encoder.glob("*.safetensors"):
        weights.rename(encoder / "sub" / weights.name)
    if named_by == "index":
        index = json.loads((encoder / INDEX).read_text())
        (encoder / INDEX).write_text(json.dumps(index | {"weight_map": {n: f"sub/{s}" for n, s in
                                                                        index["weight_map"].items()}}))
    else:
        config = json.loads((encoder / "config.json").read_text())
        (encoder / "config.json").write_text(json.dumps(config | {"transformers_weights": "sub/model.safetensors"}))
    loaded = AutoModelForCausalLM.from_pretrained(encoder).state_dict()
    base = BaseModel.open(pipe)
    assert {n.removeprefix("text_encoder.") for n in base.tensors if n.startswith("text_encoder.")} == set(loaded)
    assert any(n.startswith("vae.") for n in base.tensors)
    names = sorted(str(p.relative_to(pipe)) for p in pipe.rglob("*") if p.is_file())
    read = lambda name: json.loads((pipe / name).read_text())  # noqa: E731
    assert sorted(hub.weight_layout(names, read)[0]) == sorted(str(f.relative_to(pipe)) for f in base.files)


INDEX = "model.safetensors.index.json"


def test_a_diffusers_index_listing_a_shard_in_a_subfolder_is_refused_as_diffusers_refuses_it(tmp_path):
    """diffusers' index lists plain file names beside it (_get_checkpoint_shard_files raises on a path separator):
    an index naming sub/diffusion_pytorch_model-0000n-of-0000N.safetensors does not load. It was read as a
    transformers index is (joined to the folder), or, in a pipeline with no weights at the component's top, the
    component left out; now one line, locally and on the Hub."""
    from diffusers import AutoencoderKL

    from loraops import hub

    pipe = tmp_path / "pipe"
    folder = _tiny_vae(pipe / "vae", 0, max_shard_size="2KB")
    (pipe / "model_index.json").write_text("{}")
    (folder / "sub").mkdir()
    for shard in folder.glob("*.safetensors"):
        shard.rename(folder / "sub" / shard.name)
    index_file = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps(index | {"weight_map": {n: f"sub/{s}" for n, s in index["weight_map"].items()}}))
    with pytest.raises(ValueError, match="path separator"):
        AutoencoderKL.from_pretrained(folder)
    shard = sorted(set(index["weight_map"].values()))[0]
    says = (f"lists its shard 'sub/{shard}' in a subfolder, which diffusers does not load (its index lists file names "
            "beside it)")
    for opened in (folder, pipe):
        with pytest.raises(FormatError, match=re.escape(f"{index_file}: {says}")):
            BaseModel.open(opened)
    names = sorted(str(p.relative_to(pipe)) for p in pipe.rglob("*") if p.is_file())
    read = lambda name: json.loads((pipe / name).read_text())  # noqa: E731
    with pytest.raises(FormatError, match=re.escape(f"vae/diffusion_pytorch_model.safetensors.index.json: {says}")):
        hub.weight_layout(names, read)


@pytest.mark.parametrize("config", ["not JSON", "[1, 2]", '{"transformers_weights": null}'])
def test_a_pipeline_subfolder_without_weights_is_no_component_whatever_its_config_holds(tmp_path, config):
    """The config.json of a pipeline's subfolder is read only where .safetensors lie below it (a component whose
    transformers_weights names them): a scheduler/ or tokenizer/ holds none, and diffusers reads no config.json of
    it, so one that is not JSON, or no object, did not refuse the pipeline before these reads and does not now. A
    null transformers_weights is none (transformers' getattr(config, 'transformers_weights', None)): a folder of
    pickle weights is still left out, locally as on the Hub (it was refused locally, left out on the Hub)."""
    from loraops import hub
    from loraops.fsutil import read_json, read_model_config

    pipe = tmp_path / "pipe"
    _tiny_vae(pipe / "vae", 0)
    (pipe / "model_index.json").write_text("{}")
    for sub in ("scheduler", "text_encoder"):
        (pipe / sub).mkdir()
        (pipe / sub / "config.json").write_text(config)
    (pipe / "text_encoder" / "pytorch_model.bin").write_bytes(b"pickle")
    assert [str(f.relative_to(pipe)) for f in BaseModel.open(pipe).files] == ["vae/diffusion_pytorch_model.safetensors"]
    names = sorted(str(p.relative_to(pipe)) for p in pipe.rglob("*") if p.is_file())
    read = lambda name: read_model_config(pipe / name) if name.endswith("config.json") else read_json(pipe / name, "index")  # noqa: E731,E501
    assert hub.weight_layout(names, read)[0] == ["vae/diffusion_pytorch_model.safetensors"]
