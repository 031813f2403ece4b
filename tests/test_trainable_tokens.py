"""PEFT trainable tokens (LoraConfig(trainable_token_indices=...), TrainableTokensConfig): read, checked against the
base, merged as PEFT merges them (rows replaced, bit for bit), tied heads as PEFT's adapted model computes them,
refusals, and written back to PEFT unchanged."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, TrainableTokensConfig
from safetensors.torch import load_file, save_file

from factories import load_model, peft_adapter, tiny_llama, token_adapter
from loraops import check, engine, formats
from loraops.basemodel import BaseModel
from loraops.cli import main
from loraops.errors import InvalidInputError, UnsupportedAdapterError

IDS = torch.tensor([[3, 5, 7, 1, 2, 9, 0, 11]])
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    return {"untied": tiny_llama(root / "untied"), "tied": tiny_llama(root / "tied", tie=True),
            "bf16": tiny_llama(root / "bf16", dtype=torch.bfloat16)}


def lora(**kwargs):
    return LoraConfig(r=4, lora_alpha=8, target_modules=kwargs.pop("targets", ["q_proj"]), init_lora_weights=False,
                      **kwargs)


def resized_token_adapter(tmp_path, config, *, tie=False):
    """A tiny Llama (``tmp_path/source``), its vocabulary resized to 130 (``tmp_path/base``) and a PEFT adapter of
    ``config`` on that (``tmp_path/a``), saved with the embedding layers whole (save_embedding_layers, as "auto" saves
    a resized one); returns (folder, the PeftModel)."""
    model = load_model(tiny_llama(tmp_path / "source", tie=tie))
    model.resize_token_embeddings(130)
    model.save_pretrained(tmp_path / "base")
    folder, peft_model = token_adapter(tmp_path / "base", tmp_path / "a", config)
    peft_model.save_pretrained(folder, save_embedding_layers=True)
    return folder, peft_model


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def merged_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


# (base, config, PEFT's own merge equals its adapted model): with different tokens on a tied model's embeddings and
# head (or a LoRA on its head), PEFT's merge writes both into the one shared tensor, unlike its forward; loraops
# unties the head and matches the forward
CASES = {
    "list": ("untied", lambda: lora(trainable_token_indices=[3, 5, 7]), True),
    "list-bf16": ("bf16", lambda: lora(trainable_token_indices=[3, 5, 7]), True),
    "list-tied": ("tied", lambda: lora(trainable_token_indices=[3, 5, 7]), True),
    # unsorted: row i of the values is token indices[i], across chunks (sorting the indices alone passed every other case)
    "list-unsorted": ("untied", lambda: lora(trainable_token_indices=[7, 3, 11, 0, 5]), True),
    "dict-head": ("untied", lambda: lora(trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [1, 2]}), True),
    "dict-head-tied": ("tied", lambda: lora(trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [1, 2]}), False),
    # the same indices on a tied model's embeddings and head: PEFT ties the head's tokens to the embeddings' and saves
    # only the embeddings' delta (its load is fine; the lm_head entry has no tensor of its own)
    "dict-head-tied-same": ("tied", lambda: lora(trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [3, 5]}),
                            True),
    "lora-head-tied": ("tied", lambda: lora(targets=["q_proj", "lm_head"], trainable_token_indices=[3, 5, 7]), False),
    "lora-other-embedding": ("untied", lambda: lora(targets=["q_proj", "lm_head"], trainable_token_indices=[3, 7]), True),
    "standalone": ("untied", lambda: TrainableTokensConfig(token_indices=[3, 5, 7]), True),
    "standalone-tied": ("tied", lambda: TrainableTokensConfig(token_indices=[3, 5, 7]), True),
    "standalone-unsorted-tied": ("tied", lambda: TrainableTokensConfig(token_indices=[9, 2, 5]), True),
}


@pytest.mark.parametrize("case", CASES)
def test_merge_matches_peft(tmp_path, bases, case, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 3 * 64)  # three embedding rows a chunk: the tokens span chunks
    base_name, config, peft_merge_agrees = CASES[case]
    base = bases[base_name]
    folder, model = token_adapter(base, tmp_path / "adapter", config())
    adapter = formats.read_adapter(folder)
    assert adapter.token_rows and all(len(r.indices) == r.values.shape[0] for r in adapter.token_rows.values())
    report = engine.merge(base, [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert report.tensors_replaced >= 1 and report.tensors_converted == 0  # (tokens count as replaced, not converted)
    ours = merged_tensors(tmp_path / "out")
    adapted = logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = model.merge_and_unload()
    if peft_merge_agrees:  # PEFT's merged tensors that have tokens, bit for bit (the LoRA deltas: see logits below)
        theirs = peft_merged.state_dict()
        lora_changed = {m.weight_name for m in adapter.modules.values()}
        for name in adapter.token_rows.keys() & ours.keys() - lora_changed:
            assert torch.equal(ours[name], theirs[name]), name
    tied = "lm_head.weight" not in ours
    assert tied == (base_name == "tied" and not report.heads_untied)
    mine = load_model(tmp_path / "out", dtype=ours[EMBED].dtype)
    if tied:
        assert mine.lm_head.weight.data_ptr() == mine.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(mine), adapted, atol=1e-5 if ours[EMBED].dtype == torch.float32 else 0.05,
                               rtol=1e-5)
    rows = next(r for n, r in adapter.token_rows.items() if n == EMBED) if EMBED in adapter.token_rows else None
    if rows is not None:  # the rows ARE the stored values; the other rows are the base's
        base_embed = load_file(next(base.glob("*.safetensors")))[EMBED]
        index = torch.tensor(rows.indices)
        assert torch.equal(ours[EMBED][index], rows.values.to(ours[EMBED].dtype))
        keep = torch.ones(len(base_embed), dtype=torch.bool)
        keep[index] = False
        assert torch.equal(ours[EMBED][keep], base_embed[keep])


def test_lora_on_the_same_embedding(tmp_path, bases):
    """PEFT refuses to build it (a trainable-tokens wrapper around a LoRA layer); a folder that claims it is refused."""
    base = bases["untied"]
    with pytest.raises(TypeError, match="cannot be applied"):
        token_adapter(base, tmp_path / "x", lora(targets=["q_proj", "embed_tokens"], trainable_token_indices=[3]))
    folder = peft_adapter(base, tmp_path / "a", r=4, target_modules=["q_proj", "embed_tokens"])
    add_tokens(folder, {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": torch.randn(1, 64)},
               trainable_token_indices=[3])
    out = run("merge", folder, "--into", base, "-o", tmp_path / "out", "--no-record", code=2).output
    assert "PEFT itself refuses" in out and out.count("\n") == 1


def add_tokens(folder, tensors, **config):
    weights = folder / "adapter_model.safetensors"
    save_file({**load_file(weights), **tensors}, str(weights), metadata={"format": "pt"})
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


@pytest.mark.parametrize("indices, values, message", [
    ([3, 500], torch.randn(2, 64), "trainable tokens up to row 500 of width 64, base 128×64"),
    ([3, 3], torch.randn(2, 64), "lists token 3 twice"),
    ([3, 5], torch.randn(2, 32), "trainable tokens up to row 5 of width 32, base 128×64"),
    ([3, 5], torch.randn(3, 64), "is 3×64 float32, not 2×width floating point"),
    ([3, 5], torch.tensor([[float("nan")] * 64, [0.0] * 64]), "contains NaN or Inf"),
    ([3, -1], torch.randn(2, 64), "holds -1, not a token index"),
])
def test_malformed(tmp_path, bases, indices, values, message):
    folder, _ = token_adapter(bases["untied"], tmp_path / "a", lora(trainable_token_indices=[3, 5]))
    add_tokens(folder, {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": values},
               trainable_token_indices=indices)
    out = run("merge", folder, "--into", bases["untied"], "-o", tmp_path / "out", "--no-record", code=2).output
    assert message in out and out.startswith("error:") and out.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_bare_file_refused(tmp_path, bases):
    folder, _ = token_adapter(bases["untied"], tmp_path / "a", lora(trainable_token_indices=[3, 5]))
    bare = tmp_path / "bare.safetensors"  # (beside its adapter_config.json, the file is read with it)
    bare.write_bytes((folder / "adapter_model.safetensors").read_bytes())
    out = run("inspect", bare, "--alpha", "8", code=2).output
    assert "their token indices are only in the config" in out


def test_bare_standalone_file(tmp_path, bases):
    """A TrainableTokensConfig adapter's weights alone in a .safetensors: read as PEFT (it has no LoRA factor to be
    recognised by), accepted with its config in the metadata, else refused for want of the indices."""
    folder, _ = token_adapter(bases["untied"], tmp_path / "a", TrainableTokensConfig(token_indices=[9, 2]))
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file(tensors, str(tmp_path / "bare.safetensors"), metadata={"format": "pt"})
    out = run("inspect", tmp_path / "bare.safetensors", code=2).output
    assert "their token indices are only in the config" in out and out.count("\n") == 1
    config = (folder / "adapter_config.json").read_text()
    save_file(tensors, str(tmp_path / "meta.safetensors"), metadata={"format": "pt", "adapter_config": config})
    assert formats.read_adapter(tmp_path / "meta.safetensors").token_rows[EMBED].indices == (9, 2)
    run("merge", tmp_path / "meta.safetensors", "--into", bases["untied"], "-o", tmp_path / "m1", "--no-record")
    run("merge", folder, "--into", bases["untied"], "-o", tmp_path / "m2", "--no-record")
    assert all(torch.equal(v, merged_tensors(tmp_path / "m2")[k]) for k, v in merged_tensors(tmp_path / "m1").items())


def test_diffusers_file_with_tokens_refused(tmp_path, bases):
    """diffusers keeps no adapter_config.json, so no indices: PEFT keys behind a pipeline component with trainable
    tokens are refused as such (not as unknown keys)."""
    folder, _ = token_adapter(bases["untied"], tmp_path / "a", lora(trainable_token_indices=[3, 5]))
    tensors = {k.replace("base_model.model.", "text_encoder."): v
               for k, v in load_file(folder / "adapter_model.safetensors").items()}
    save_file(tensors, str(tmp_path / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    out = run("inspect", tmp_path / "pytorch_lora_weights.safetensors", code=2).output
    assert "PEFT trainable tokens" in out and "trainable_tokens_delta" in out and out.count("\n") == 1


def test_check_refuses_tokens_on_a_tensor_the_merge_cannot_write(tmp_path, bases):
    """An embedding stored in a type loraops does not merge into (here I8): check says so, as the merge does, rather
    than that the adapter fits (merge: one line; check: a misfit, with merge's reason, as for every base it checks)."""
    folder, _ = token_adapter(bases["untied"], tmp_path / "a", lora(trainable_token_indices=[3, 5]))
    base = tmp_path / "int8"
    base.mkdir()
    for f in bases["untied"].iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    state = load_file(base / "model.safetensors")
    state[EMBED] = (state[EMBED] * 100).to(torch.int8)
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    for args in (["check", folder, "--base", base], ["merge", folder, "--into", base, "-o", tmp_path / "o", "--no-record"]):
        out = run(*args, code=2).output
        assert f"{EMBED!r} is stored as I8" in out, out
        assert out.count("\n") == 1 if args[0] == "merge" else "0/2 token rows match" in out, out
        # the rows counted as check's headline counts them, not as "1 module" (the LoRA's modules all fit)
        assert ": 2 token rows do not fit " in out if args[0] == "merge" else "does not fit" in out, out


def test_check_and_register_of_tokens_with_a_tied_heads_copy(tmp_path, bases):
    """PEFT's TrainableTokensConfig on a tied Llama saves the tokens under lm_head too: check (and register, which
    checks the hinted base) read their values to see that it is the embeddings' copy, not headers only (meta
    tensors, which cannot be compared: it crashed)."""
    folder, _ = token_adapter(bases["tied"], tmp_path / "a", TrainableTokensConfig(token_indices=[3, 5]))
    assert "lm_head.weight" in formats.read_adapter(folder).token_rows
    assert run("check", folder, "--base", bases["tied"]).output.startswith(f"{folder} fits {bases['tied']}: ")
    run("base", "add", bases["tied"], "--name", "tied")
    run("register", folder, "--name", "tok", "--base", "tied")
    assert run("check", "tok").output.startswith("tok@1 fits tied: ")


def test_weight_subtract_combine_kohya_refused(tmp_path, bases):
    base = bases["untied"]
    folder, _ = token_adapter(base, tmp_path / "a", lora(trainable_token_indices=[3, 5]))
    adapter = formats.read_adapter(folder)
    with pytest.raises(InvalidInputError, match="cannot be applied with weight 0.5"):
        engine.merge(base, [(adapter, 0.5)], tmp_path / "out", progress=False)
    with pytest.raises(UnsupportedAdapterError, match="cannot be subtracted.*exact=True restores"):
        engine.subtract(base, [(adapter, 1.0)], tmp_path / "out", progress=False)
    with pytest.raises(UnsupportedAdapterError, match="cannot be written as kohya"):
        formats.write_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    out = run("combine", folder, folder, "--method", "cat", "-o", tmp_path / "c", code=2).output
    assert "trainable tokens" in out
    other, _ = token_adapter(base, tmp_path / "b", lora(trainable_token_indices=[5, 9]), seed=3)
    with pytest.raises(InvalidInputError, match="two adapters replace row 5"):
        engine.merge(base, [(adapter, 1.0), (formats.read_adapter(other), 1.0)], tmp_path / "out", progress=False)
    embedding_lora = formats.read_adapter(peft_adapter(base, tmp_path / "e", r=4, target_modules=["embed_tokens"]))
    with pytest.raises(InvalidInputError, match="another adapter's LoRA; merge them separately"):
        engine.merge(base, [(embedding_lora, 1.0), (adapter, 1.0)], tmp_path / "out", progress=False)


@pytest.mark.parametrize("config", [lambda: lora(trainable_token_indices={"embed_tokens": [3, 5], "lm_head": [1]}),
                                    lambda: TrainableTokensConfig(token_indices=[4, 2])])
@pytest.mark.registry_backend
def test_register_export_round_trip(tmp_path, bases, config):
    config = config()
    folder, _ = token_adapter(bases["tied"], tmp_path / "a", config)
    registered = run("register", folder, "--name", "tok").output  # (tokens alone: no LoRA modules, no rank)
    assert ("0 modules, rank -, alpha -" in registered) == isinstance(config, TrainableTokensConfig)
    run("export", "tok", "--format", "peft", "-o", tmp_path / "back")
    assert load_file(tmp_path / "back/adapter_model.safetensors").keys() == load_file(folder / "adapter_model.safetensors").keys()
    for key, value in load_file(folder / "adapter_model.safetensors").items():
        assert torch.equal(load_file(tmp_path / "back/adapter_model.safetensors")[key], value), key
    config, back = (json.loads((f / "adapter_config.json").read_text()) for f in (folder, tmp_path / "back"))
    for field in ("peft_type", "trainable_token_indices", "token_indices"):
        assert back.get(field) == config.get(field)
    run("merge", "tok", "--into", bases["tied"], "-o", tmp_path / "m1", "--no-record")
    run("merge", tmp_path / "back", "--into", bases["tied"], "-o", tmp_path / "m2", "--no-record")
    assert merged_tensors(tmp_path / "m1").keys() == merged_tensors(tmp_path / "m2").keys()
    assert all(torch.equal(v, merged_tensors(tmp_path / "m2")[k]) for k, v in merged_tensors(tmp_path / "m1").items())


def test_push_card_names_the_token_rows(tmp_path, bases):
    """The model card pushed with an adapter of trainable tokens says which rows it replaces (a tokens-only adapter
    read as "A PEFT LoRA adapter, modules 0" with nothing else)."""
    from loraops import hub
    from loraops.registry import Registry

    folder, _ = token_adapter(bases["untied"], tmp_path / "a", TrainableTokensConfig(token_indices=[4, 2]))
    with Registry.open() as reg:
        record = reg.register_adapter(str(folder), name="tok").record
        card = hub.render_card(hub.card_info(reg, record, "peft"))
    front, body = card.split("---\n")[1], card.split("---\n")[2]
    assert '- "trainable-tokens"' in front and f"| trainable tokens | `{EMBED}` rows 4, 2 (replaced) |" in body


def test_resize_keeps_rows(tmp_path, bases):
    from loraops import algebra

    folder, _ = token_adapter(bases["untied"], tmp_path / "a", lora(trainable_token_indices=[3, 5]))
    adapter = formats.read_adapter(folder)
    resized, _ = algebra.resize(adapter, rank=2)
    assert resized.token_rows.keys() == adapter.token_rows.keys()
    formats.write_adapter(resized, tmp_path / "r")
    back = formats.read_adapter(tmp_path / "r")
    assert torch.equal(back.token_rows[EMBED].values, adapter.token_rows[EMBED].values)
    assert back.rank == 2


def test_check_and_inspect(tmp_path, bases):
    folder, _ = token_adapter(bases["untied"], tmp_path / "a", lora(trainable_token_indices=[3, 5]))
    run("check", folder, "--base", bases["untied"])
    out = run("check", folder, "--base", bases["tied"]).output  # same shapes: it fits
    assert "ok" in out.lower()
    report = json.loads(run("inspect", folder, "--json").output)
    assert report["num_parameters"] == 2 * 64 + sum(4 * 64 * 2 for _ in range(2))
    assert report["trainable_tokens"] == {EMBED: [3, 5]}
    assert f"tokens      {EMBED} rows 3, 5 (replaced)" in run("inspect", folder).output


@pytest.mark.parametrize("tie", [False, True])
def test_new_tokens_with_resized_vocabulary(tmp_path, tie):
    """PEFT's way to add tokens: resize the vocabulary, train the new rows; save_pretrained then saves the embedding
    layers whole as well (save_embedding_layers, on when the vocabulary grew), the tokens going in on top."""
    # (merged into tmp_path / "base": resized)
    folder, peft_model = resized_token_adapter(tmp_path, lora(trainable_token_indices=[128, 129]), tie=tie)
    keys = set(load_file(folder / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.token_adapter.base_layer.weight" in keys
    adapter = formats.read_adapter(folder)
    assert EMBED in adapter.full_tensors and EMBED in adapter.token_rows
    engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False)
    ours = merged_tensors(tmp_path / "out")
    adapted = logits(peft_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_model.merge_and_unload().state_dict()
    assert torch.equal(ours[EMBED], theirs[EMBED]) and ("lm_head.weight" in ours) == (not tie)
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), adapted, atol=1e-5, rtol=1e-5)
    formats.write_adapter(adapter, tmp_path / "back")
    assert set(load_file(tmp_path / "back/adapter_model.safetensors")) == keys
    assert json.loads((tmp_path / "back/adapter_config.json").read_text()).get("modules_to_save") is None


@pytest.mark.parametrize("config", [lambda: lora(trainable_token_indices=[3, 5, 7]),
                                    lambda: TrainableTokensConfig(token_indices=[7, 3, 5])])
def test_tied_head_stored_twice(tmp_path, bases, config):
    """A tied model some exporter saved with its head too (byte-identical): the tokens reach both copies, as they reach
    the one shared tensor in PEFT, and the model stays tied (a TrainableTokensConfig's saved copy for the head too)."""
    base = tmp_path / "base"
    base.mkdir()
    for f in bases["tied"].iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    state = load_file(base / "model.safetensors")
    save_file({**state, "lm_head.weight": state[EMBED].clone()}, str(base / "model.safetensors"), metadata={"format": "pt"})
    folder, model = token_adapter(base, tmp_path / "a", config())
    report = engine.merge(base, [(formats.read_adapter(folder), 1.0)], tmp_path / "out", progress=False)
    ours = merged_tensors(tmp_path / "out")
    assert not report.heads_untied and torch.equal(ours["lm_head.weight"], ours[EMBED])
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("what", ["lora-head", "tokens-head"])
def test_head_untied_from_fp8_embeddings(tmp_path, what):
    """A tied model whose embeddings are fine-grained FP8: the head an adapter unties comes out in the model's dtype
    (transformers does not load an output head as FP8 unless modules_to_not_convert says so: tests/
    test_tied_embeddings.py), the --dtype fp32 merge rounded to bf16; the embeddings the FP8 encoding of that merge,
    or as stored when the adapter leaves them alone."""
    from factories import fp8_model, fp8_quantize

    base = fp8_model(tiny_llama(tmp_path / "bf16", dtype=torch.bfloat16, tie=True), tmp_path / "fp8",
                     modules=("embed_tokens", "q_proj"))
    config = (lora(targets=["q_proj", "lm_head"]) if what == "lora-head"
              else lora(trainable_token_indices={"embed_tokens": [3, 40], "lm_head": [5]}))
    adapter = formats.read_adapter(token_adapter(tmp_path / "bf16", tmp_path / "a", config)[0])
    assert engine.merge(base, [(adapter, 1.0)], tmp_path / "out", progress=False).heads_untied == ["lm_head.weight"]
    engine.merge(base, [(adapter, 1.0)], tmp_path / "f32", dtype="fp32", progress=False)
    ours, exact, stored = (merged_tensors(tmp_path / f) for f in ("out", "f32", "fp8"))
    values, inverse = ((stored[EMBED], stored[f"{EMBED}_scale_inv"]) if what == "lora-head"
                       else fp8_quantize(exact[EMBED], (16, 24)))
    assert torch.equal(ours[EMBED].view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(ours[f"{EMBED}_scale_inv"], inverse)
    assert torch.equal(ours["lm_head.weight"], exact["lm_head.weight"].to(torch.bfloat16))
    assert "lm_head.weight_scale_inv" not in ours


@pytest.mark.parametrize("base_name, targets", [("untied", ["q_proj", "lm_head"]), ("tied", ["q_proj"])])
def test_dora_beside_tokens(tmp_path, bases, monkeypatch, base_name, targets):
    """A DoRA adapter with trainable tokens (magnitudes moved off their initial norms) merges to PEFT's adapted model."""
    from peft import PeftModel

    from factories import perturb_magnitudes

    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 3 * 64)
    base = bases[base_name]
    folder, _ = token_adapter(base, tmp_path / "a", lora(targets=targets, use_dora=True, trainable_token_indices=[7, 3, 40]))
    perturb_magnitudes(folder)
    model = PeftModel.from_pretrained(load_model(base), folder)
    engine.merge(base, [(formats.read_adapter(folder), 1.0)], tmp_path / "out", progress=False)
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), logits(model), atol=1e-5, rtol=1e-5)


def test_many_token_indices_are_validated_in_linear_time():
    """Tens of thousands of tokens (a vocabulary extended for a new language) are read at once: their duplicate check
    is one pass (it was quadratic: 3.4 s for 20,000 indices, minutes for 100,000), and still names the duplicate."""
    import time
    from pathlib import Path

    from loraops.formats import tokens

    started = time.perf_counter()
    config = {"trainable_token_indices": list(range(100_000, 0, -1))}
    assert len(tokens.indices_for(Path("a"), config, "model.embed_tokens", "k")) == 100_000
    assert time.perf_counter() - started < 2
    with pytest.raises(InvalidInputError, match="lists token 9 twice"):
        tokens.indices_for(Path("a"), {"trainable_token_indices": [9, 5, 7, 5, 9]}, "model.embed_tokens", "k")
    with pytest.raises(InvalidInputError, match="holds -1, not a token index") as error:  # the culprit, not the list
        tokens.indices_for(Path("a"), {"trainable_token_indices": [*range(10_000), -1]}, "model.embed_tokens", "k")
    assert len(str(error.value)) < 200
    with pytest.raises(InvalidInputError, match="holds None, not a token index"):
        tokens.indices_for(Path("a"), {"trainable_token_indices": [3, None]}, "model.embed_tokens", "k")


@pytest.mark.parametrize("base_name", ["untied", "tied"])
def test_two_adapters_with_disjoint_tokens(tmp_path, bases, monkeypatch, base_name):
    """Two adapters' disjoint tokens on one embedding merge in one run as PEFT merges both adapters."""
    from peft import PeftModel

    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 3 * 64)
    base = bases[base_name]
    first, _ = token_adapter(base, tmp_path / "a", lora(trainable_token_indices=[5, 3]), seed=1)
    second, _ = token_adapter(base, tmp_path / "b", lora(targets=["v_proj"], trainable_token_indices=[9, 1]), seed=2)
    model = PeftModel.from_pretrained(load_model(base), first, adapter_name="a")
    model.load_adapter(second, adapter_name="b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = model.merge_and_unload(adapter_names=["a", "b"])
    engine.merge(base, [(formats.read_adapter(first), 1.0), (formats.read_adapter(second), 1.0)], tmp_path / "out",
                 progress=False)
    assert torch.equal(merged_tensors(tmp_path / "out")[EMBED], theirs.state_dict()[EMBED])
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), logits(theirs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base_name, dtype, torch_dtype", [("bf16", "fp32", torch.float32), ("untied", "bf16", torch.bfloat16),
                                                           ("untied", "fp16", torch.float16)])
def test_dtype_conversion(tmp_path, bases, monkeypatch, base_name, dtype, torch_dtype):
    """With --dtype the stored rows are rounded once to the output dtype (not to the base's first), the other rows are
    the base's converted."""
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 3 * 64)
    folder, _ = token_adapter(bases[base_name], tmp_path / "a", lora(trainable_token_indices=[7, 3, 5]))
    rows = formats.read_adapter(folder).token_rows[EMBED]
    engine.merge(bases[base_name], [(formats.read_adapter(folder), 1.0)], tmp_path / "out", dtype=dtype, progress=False)
    ours = merged_tensors(tmp_path / "out")[EMBED]
    base = load_file(next(bases[base_name].glob("*.safetensors")))[EMBED]
    index = torch.tensor(rows.indices)
    assert ours.dtype == torch_dtype and torch.equal(ours[index], rows.values.to(torch_dtype))
    keep = torch.ones(len(base), dtype=torch.bool)
    keep[index] = False
    assert torch.equal(ours[keep], base[keep].to(torch_dtype))


@pytest.mark.parametrize("value", ["lm_head", "", False, ["embed_tokens", 1], 5])
def test_standalone_modules_to_save_that_is_no_list_of_names_is_ignored_as_peft_drops_it(tmp_path, bases, value):
    """TrainableTokensConfig has no modules_to_save: PEFT drops the field (a warning: unexpected keyword arguments)
    and loads the folder, whatever its value. loraops refused a hand-edited one that is no list of names as a list
    "PEFT reads as its characters", which it does not here. Read as PEFT reads it, without the field: the same rows
    and the identity of the folder without it. A list of names (read before, hashed into existing identities) keeps
    the identity it had."""
    from peft import PeftModel

    folder, _ = token_adapter(bases["untied"], tmp_path / "a", TrainableTokensConfig(token_indices=[3, 5]))
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert "modules_to_save" not in config
    plain, rows = formats.identity(folder), formats.read_adapter(folder).token_rows
    listed = {**config, "modules_to_save": ["lm_head"]}
    config_path.write_text(json.dumps(listed))
    listed_identity = formats.identity(folder)
    assert listed_identity != plain
    config_path.write_text(json.dumps({**config, "modules_to_save": value}))
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['modules_to_save'\] for class "
                                         r"TrainableTokensConfig, these are ignored"):
        model = PeftModel.from_pretrained(load_model(bases["untied"]), folder)
    assert not hasattr(model.peft_config["default"], "modules_to_save")
    adapter = formats.read_adapter(folder)
    assert adapter.token_rows.keys() == rows.keys() and not adapter.full_tensors
    assert all(torch.equal(adapter.token_rows[k].values, rows[k].values) for k in rows)
    assert formats.identity(folder) == plain


@pytest.mark.parametrize("value", [5, "lm_head", ["lm_head"]])
def test_a_standalone_with_saved_layers_exports_whatever_modules_to_save_it_carries(tmp_path, value):
    """Where the embedding layers saved beside tokens go when written (tokens.saved_layer_keys) depended on the
    config's raw modules_to_save, which PEFT drops from a TrainableTokensConfig: a number there (the reader ignores
    it) ended the export of a resized-vocabulary adapter in a TypeError. It takes the reader's value
    (peft.saved_entries): the folder goes back as the TrainableTokensConfig it is, with the same keys and rows."""
    folder, _ = resized_token_adapter(tmp_path, TrainableTokensConfig(token_indices=[128, 129]))
    config_path = folder / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "modules_to_save": value}))
    adapter = formats.read_adapter(folder)
    assert EMBED in adapter.full_tensors and EMBED in adapter.token_rows
    out = formats.write_adapter(adapter, tmp_path / "back")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "TRAINABLE_TOKENS"
    assert load_file(out / "adapter_model.safetensors").keys() == load_file(folder / "adapter_model.safetensors").keys()
    back = formats.read_adapter(out)
    assert torch.equal(back.full_tensors[EMBED], adapter.full_tensors[EMBED])
    assert torch.equal(back.token_rows[EMBED].values, adapter.token_rows[EMBED].values)


def test_a_standalone_list_modules_to_save_is_read_as_peft_drops_it_and_keeps_its_identity(tmp_path, bases):
    """A list of names in a TrainableTokensConfig's modules_to_save: PEFT drops the field, so it saves nothing whole.
    loraops read the list (a plain ``model.norm.weight`` beside the tokens became the norm's replacement). It reads
    the folder as without the field (that tensor: the same refusal), and hashes the list as before: identities of
    folders registered with one stay as they were (the documented formula, recomputed here)."""
    import hashlib

    from loraops.errors import FormatError

    folder, _ = token_adapter(bases["untied"], tmp_path / "a", TrainableTokensConfig(token_indices=[3, 5]))
    weights, config_path = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    save_file({**load_file(weights), "base_model.model.model.norm.weight": torch.ones(64) * 2}, str(weights))
    with pytest.raises(FormatError, match="unknown adapter key layout: 'base_model.model.model.norm.weight'"):
        formats.read_adapter(folder)
    config_path.write_text(json.dumps({**config, "modules_to_save": ["model.norm"]}))
    with pytest.raises(FormatError, match="unknown adapter key layout: 'base_model.model.model.norm.weight'"):
        formats.read_adapter(folder)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    fields = {**formats.math_config({**config, "modules_to_save": None}), "modules_to_save": ["model.norm"]}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    assert formats.identity(folder) == hashlib.sha256(
        f"loraops-peft-identity-v1\n{digest}\n{canonical}".encode()).hexdigest()


def test_a_tied_heads_copy_of_tokens_named_by_the_embeddings_entry_alone(tmp_path, bases):
    """trainable_token_indices={"embed_tokens": […]} on a tied model: PEFT ties the head's tokens to the embeddings'
    (one delta) and, saving with save_embedding_layers=True, writes the head's copy, which no dict entry names. It was
    refused ("the config's trainable_token_indices name no entry for module 'lm_head'") where PEFT loads it; read with
    the embeddings' indices, it is their tied copy: the merge keeps the head tied and computes the adapted model."""
    _, model = token_adapter(bases["tied"], tmp_path / "unused", lora(trainable_token_indices={"embed_tokens": [3, 5]}))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    assert "base_model.model.lm_head.token_adapter.trainable_tokens_delta" in load_file(
        tmp_path / "a" / "adapter_model.safetensors")
    adapter = formats.read_adapter(tmp_path / "a")
    assert adapter.token_rows["lm_head.weight"].indices == (3, 5)
    base = BaseModel.open(bases["tied"])  # the head's saved layer beside them is the tie's copy: nothing untied
    assert check.check(adapter, base.tensors, config=base.config).tied_heads == []
    report = engine.merge(bases["tied"], [(adapter, 1.0)], tmp_path / "out", progress=False)
    assert report.heads_untied == [] and "lm_head.weight" not in merged_tensors(tmp_path / "out")
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), logits(model), atol=1e-5, rtol=1e-5)


def test_tokens_on_a_layer_saved_whole_count_once_against_a_base_it_does_not_fit(tmp_path):
    """Tokens added to a resized vocabulary, saved with the embedding layers whole (save_embedding_layers), checked
    against the base before resizing: the embeddings misfit once, as the whole tensor PEFT loads first; the rows go
    into that layer (they fit its 130 rows). They counted twice, as a whole tensor and as token rows ("2 whole tensors
    and 2 token rows do not fit", the embeddings listed twice)."""
    folder, _ = resized_token_adapter(tmp_path, lora(trainable_token_indices=[128, 129]))
    adapter = formats.read_adapter(folder)
    base = BaseModel.open(tmp_path / "source")
    for config in (base.config, None):
        report = check.check(adapter, base.tensors, config=config)
        assert not report.ok
        assert check.fit_counts(report) == f"{len(adapter.modules)}/{len(adapter.modules)} modules, 0/2 whole tensors " \
                                           "and 2/2 token rows"
        assert check.misfit_counts(report) == "2 whole tensors do"
        assert check.misfits(report) == ["lm_head.weight (full tensor 130×64, base 128×64)",
                                         "model.embed_tokens.weight (full tensor 130×64, base 128×64)"]
    resized = BaseModel.open(tmp_path / "base")
    assert check.check(adapter, resized.tensors, config=resized.config).ok


def test_tokens_on_a_layer_saved_whole_that_the_base_cannot_merge_into_count_once(tmp_path):
    """Tokens on embeddings saved whole (save_embedding_layers), on a base storing those embeddings in a layout
    loraops does not merge into (int8 here): the whole tensor is refused once, with merge's reason; its token rows go
    into that layer and are not refused again, nor counted as misfits ("1 whole tensor does", 2/2 token rows)."""
    from dataclasses import replace

    folder, peft_model = token_adapter(tiny_llama(tmp_path / "base"), tmp_path / "a",
                                       lora(trainable_token_indices=[3, 5]))
    peft_model.save_pretrained(folder, save_embedding_layers=True)
    adapter = formats.read_adapter(folder)
    assert "model.embed_tokens.weight" in adapter.full_tensors and "model.embed_tokens.weight" in adapter.token_rows
    base = BaseModel.open(tmp_path / "base")
    embeddings = "model.embed_tokens.weight"
    manifest = {**base.tensors, embeddings: replace(base.tensors[embeddings], dtype="I8")}
    report = check.check(adapter, manifest, quantization=lambda name: None)
    assert not report.ok and report.missing == [embeddings], report
    whole = len(adapter.full_tensors)
    assert check.fit_counts(report) == f"{len(adapter.modules)}/{len(adapter.modules)} modules, " \
                                       f"{whole - 1}/{whole} whole tensors and 2/2 token rows"
    assert check.misfit_counts(report) == "1 whole tensor does"
    assert check.misfits(report) == [f"{embeddings} ({report.why_missing[embeddings]})"]


def test_token_rows_beyond_the_base_count_as_misfits(tmp_path):
    """Tokens of a resized vocabulary (rows 128 and 129) saved without the embedding layers, checked against the base
    before resizing: the rows misfit and are counted so ("0/2 token rows", "2 token rows do")."""
    model = load_model(tiny_llama(tmp_path / "source"))
    model.resize_token_embeddings(130)
    model.save_pretrained(tmp_path / "base")
    folder, _ = token_adapter(tmp_path / "base", tmp_path / "a", lora(trainable_token_indices=[128, 129]))
    adapter = formats.read_adapter(folder)
    assert not adapter.full_tensors
    base = BaseModel.open(tmp_path / "source")
    report = check.check(adapter, base.tensors, config=base.config)
    assert not report.ok
    assert check.fit_counts(report) == f"{len(adapter.modules)}/{len(adapter.modules)} modules and 0/2 token rows"
    assert check.misfit_counts(report) == "2 token rows do"


def test_check_counts_a_single_file_tied_bases_token_rows_as_the_merge_merges_them(tmp_path):
    """A single-file checkpoint storing lm_head byte-identical to the embeddings has no config to tie them: the merge
    writes the head's saved copy of the tokens into lm_head itself (BaseModel.ties_stored_heads), while check took
    that copy for a tied one and counted half the rows ("2/2 token rows"). Both read the base by one rule now."""
    model = tiny_llama(tmp_path / "m", tie=True)
    state = load_file(model / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    single = tmp_path / "single.safetensors"
    save_file(state, single)
    adapter, peft_model = token_adapter(model, tmp_path / "a",
                                        TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[3, 5]))
    result = CliRunner().invoke(main, ["check", str(adapter), "--base", str(single)])
    assert result.exit_code == 0, result.output
    assert "0/0 modules and 4/4 token rows match" in result.output, result.output
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(main, ["merge", str(adapter), "--into", str(single), "-o", str(out), "--no-record"])
    assert result.exit_code == 0, result.output
    merged = load_file(out)
    expected = peft_model.merge_and_unload().get_input_embeddings().weight
    changed = sum(int((merged[n] != state[n]).any(dim=1).sum()) for n in ("model.embed_tokens.weight", "lm_head.weight"))
    assert changed == 4
    assert torch.equal(merged["model.embed_tokens.weight"], expected) and torch.equal(merged["lm_head.weight"], expected)


def test_a_token_entry_names_a_module_whose_path_ends_with_it_as_peft_matches_it(tmp_path):
    """PEFT's _set_trainable wraps every module whose path ends with a trainable_token_indices key as a plain string:
    {"model.embed_tokens": …} (a text model's name) gives tokens to a VLM's model.language_model.embed_tokens, which
    transformers 5 holds LLaVA's embeddings as. Such a folder was refused (its entry names no module, dot-bounded);
    it merges as PEFT's merge_and_unload."""
    import transformers

    cls = transformers.LlavaForConditionalGeneration
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=64, vocab_size=128, max_position_embeddings=64, model_type="llama")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=16, model_type="clip_vision_model", projection_dim=32)
    torch.manual_seed(0)
    cls._from_config(cls.config_class(text_config=text, vision_config=vision, image_token_index=120)).save_pretrained(
        tmp_path / "base")
    from peft import get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(cls.from_pretrained(tmp_path / "base"),
                           lora(trainable_token_indices={"model.embed_tokens": [3, 5]}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn_like(param))
    model.save_pretrained(tmp_path / "a")
    adapter = formats.read_adapter(tmp_path / "a")
    assert list(adapter.token_rows) == ["model.language_model.embed_tokens.weight"]
    assert adapter.token_rows["model.language_model.embed_tokens.weight"].indices == (3, 5)
    engine.merge(tmp_path / "base", [(adapter, 1.0)], tmp_path / "out", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_and_unload().save_pretrained(tmp_path / "theirs")
    ours, theirs = merged_tensors(tmp_path / "out"), merged_tensors(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)
    embed = "language_model.model.embed_tokens.weight"
    assert not torch.equal(ours[embed], merged_tensors(tmp_path / "base")[embed])
