"""Export of a PEFT adapter with a LoRA on the embeddings as kohya: PEFT saves the embedding layer whole beside the
LoRA by default (save_embedding_layers="auto"), which a kohya file cannot hold. Where it is the base's own values it
carries nothing and is left out; where it differs, export refuses and says what the tensor is."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import peft_adapter, peft_delta_weights, tiny_llama
from test_engine import merged_tensors
from test_merge_cli import run
from loraops import check, formats
from loraops.registry import Registry

EMBED_LAYER = "base_model.model.model.embed_tokens.base_layer.weight"


@pytest.fixture
def saved(tmp_path):
    """(base folder, a PEFT adapter with a LoRA on embed_tokens and q_proj, saved with PEFT's default
    save_embedding_layers), the base registered as "tiny"."""
    base = tiny_llama(tmp_path / "base")
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        adapter = peft_adapter(base, tmp_path / "emb", target_modules=["embed_tokens", "q_proj"])
    assert EMBED_LAYER in load_file(adapter / "adapter_model.safetensors")
    run("base", "add", base, "--name", "tiny")
    return base, adapter


def test_kohya_export_leaves_out_an_unchanged_saved_layer(tmp_path, saved):
    from peft import PeftModel

    from factories import load_model

    base, adapter = saved
    out = tmp_path / "k.safetensors"
    result = run("export", adapter, "--format", "kohya", "-o", out, "--base", "tiny")
    assert "left out model.embed_tokens.weight: PEFT's saved embedding layer" in result.output
    with Registry.open() as reg:
        bound = check.require_fit(formats.read_adapter(out), reg.base_manifest("tiny"), base_name="tiny")
    assert not bound.full_tensors
    reference = peft_delta_weights(PeftModel.from_pretrained(load_model(base), adapter))  # PEFT's own ΔW
    assert {m.name for m in bound.modules.values()} == reference.keys()
    for module in bound.modules.values():
        torch.testing.assert_close(module.delta(), reference[module.name], rtol=1e-6, atol=1e-7)
    run("merge", adapter, "--into", base, "-o", tmp_path / "from-peft", "--no-record")
    run("merge", out, "--into", base, "-o", tmp_path / "from-kohya", "--no-record")
    peft_merge, kohya_merge = merged_tensors(tmp_path / "from-peft"), merged_tensors(tmp_path / "from-kohya")
    assert peft_merge.keys() == kohya_merge.keys()
    assert not torch.equal(peft_merge["model.embed_tokens.weight"], load_file(base / "model.safetensors")[
        "model.embed_tokens.weight"])  # (the embedding LoRA was merged)
    for name in peft_merge:
        assert torch.equal(peft_merge[name], kohya_merge[name]), name


@pytest.mark.registry_backend
def test_kohya_export_of_a_registered_adapter_uses_its_base(tmp_path, saved):
    _, adapter = saved
    run("register", adapter, "--base", "tiny", "--name", "emb")
    result = run("export", "emb", "--format", "kohya", "-o", tmp_path / "k.safetensors")
    assert "left out model.embed_tokens.weight" in result.output
    assert (tmp_path / "k.safetensors").is_file()


def test_a_changed_or_unbound_saved_layer_is_refused_by_name(tmp_path, saved):
    _, adapter = saved
    weights = adapter / "adapter_model.safetensors"
    out = tmp_path / "k.safetensors"
    unbound = run("export", adapter, "--format", "kohya", "-o", out, code=2).output
    assert f"error: {adapter}: model.embed_tokens.weight: PEFT's saved embedding layer (save_embedding_layers" in unbound
    assert "--base BASE" in unbound and "modules_to_save" not in unbound
    tensors = load_file(weights)
    tensors[EMBED_LAYER][3, 5] += 1  # trained: it carries values the LoRA does not
    save_file(tensors, weights, metadata={"format": "pt"})
    changed = run("export", adapter, "--format", "kohya", "-o", out, "--base", "tiny", code=2).output
    assert changed.count("\n") == 1 and changed.startswith(f"error: {adapter}: model.embed_tokens.weight: PEFT's "
                                                           "saved embedding layer (save_embedding_layers")
    assert "differs from base tiny's" in changed and "modules_to_save" not in changed
    assert not out.exists()


def test_kohya_export_leaves_out_a_bert_head_bias_saved_unchanged(tmp_path):
    """save_embedding_layers=True on BertForMaskedLM (no LoRA on the embeddings): PEFT saves the word embeddings
    and cls.predictions.decoder (weight and bias) whole. Bound to the base, the decoder's bias is named as the bias
    it stores, cls.predictions.bias: holding the base's values it is a saved layer left out too, not refused as a
    modules_to_save tensor."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from factories import TINY_BERT, tiny_transformers

    base = tiny_transformers(tmp_path / "base", "bert", "BertForMaskedLM", **TINY_BERT)
    torch.manual_seed(1)
    model = get_peft_model(transformers.BertForMaskedLM.from_pretrained(base),
                           LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    assert "base_model.model.cls.predictions.decoder.bias" in load_file(tmp_path / "a" / "adapter_model.safetensors")
    run("base", "add", base, "--name", "bert")
    out = tmp_path / "k.safetensors"
    result = run("export", tmp_path / "a", "--format", "kohya", "-o", out, "--base", "bert")
    assert "cls.predictions.bias" in result.output and "left out" in result.output
    assert not formats.read_adapter(out).full_tensors


@pytest.mark.registry_backend
def test_combine_leaves_out_unchanged_saved_layers_and_refuses_changed_ones(tmp_path, saved):
    """combine refuses full tensors, so two adapters with a LoRA on the embeddings, saved as PEFT saves them by
    default, could not be combined at all (PEFT's add_weighted_adapter combines them). The saved layers that hold the
    inputs' base's values are left out (a note says so); the combination merges as the inputs do, and PEFT loads it.
    One that differs from the base is still refused; an input with no base cannot tell, and is refused as before."""
    from peft import PeftModel

    from factories import load_model

    base, first = saved
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        second = peft_adapter(base, tmp_path / "emb2", target_modules=["embed_tokens", "q_proj"], seed=2)
    run("register", first, "--base", "tiny", "--name", "e1")
    run("register", second, "--base", "tiny", "--name", "e2")
    result = run("combine", "e1:0.7", "e2:-0.4", "--method", "cat", "-o", tmp_path / "c")
    assert result.output.count("note: left out e1@1's model.embed_tokens.weight: PEFT's saved embedding layer") == 1
    assert "note: left out e2@1's model.embed_tokens.weight" in result.output
    assert EMBED_LAYER not in load_file(tmp_path / "c" / "adapter_model.safetensors")
    run("merge", "e1:0.7", "e2:-0.4", "--into", base, "-o", tmp_path / "inputs", "--no-record")
    run("merge", tmp_path / "c", "--into", base, "-o", tmp_path / "combined", "--no-record")
    inputs, combined = merged_tensors(tmp_path / "inputs"), merged_tensors(tmp_path / "combined")
    assert inputs.keys() == combined.keys()
    for name in inputs:
        torch.testing.assert_close(combined[name], inputs[name], rtol=1e-5, atol=1e-5)  # (cat's float32 factors)
    PeftModel.from_pretrained(load_model(base), tmp_path / "c")  # (loads without the saved layer)
    tensors = load_file(second / "adapter_model.safetensors")
    tensors[EMBED_LAYER][3, 5] += 1
    save_file(tensors, second / "adapter_model.safetensors", metadata={"format": "pt"})
    run("register", second, "--base", "tiny", "--name", "changed")
    refused = run("combine", "e1", "changed", code=2).output
    assert refused.splitlines()[-1].startswith("error: changed@1 carries full replacement tensors")


def test_resize_to_kohya_leaves_out_an_unchanged_saved_layer(tmp_path, saved):
    """resize --format kohya (or diffusers) of such an adapter, registered against its base or given --base, leaves
    the unchanged saved layer out as export and combine do (it said "bound to no base … give --base BASE" however it
    was given); one that differs is refused naming the base it was compared with. As peft it is kept."""
    base, adapter = saved
    run("register", adapter, "--base", "tiny", "--name", "emb")
    result = run("resize", "emb", "--rank", "8", "--format", "kohya", "-o", tmp_path / "r.safetensors")
    assert "note: left out emb@1's model.embed_tokens.weight: PEFT's saved embedding layer" in result.output
    with Registry.open() as reg:
        bound = check.require_fit(formats.read_adapter(tmp_path / "r.safetensors"), reg.base_manifest("tiny"),
                                  base_name="tiny")
    assert not bound.full_tensors and set(bound.modules) == set(check.require_fit(
        formats.read_adapter(adapter), reg.base_manifest("tiny"), base_name="tiny").modules)
    run("merge", "emb", "--into", base, "-o", tmp_path / "from-peft", "--no-record")
    run("merge", tmp_path / "r.safetensors", "--into", base, "-o", tmp_path / "from-kohya", "--no-record")
    peft_merge, kohya_merge = merged_tensors(tmp_path / "from-peft"), merged_tensors(tmp_path / "from-kohya")
    for name in peft_merge:  # (rank 8 is the adapter's own: the same ΔW, refactored)
        torch.testing.assert_close(kohya_merge[name], peft_merge[name], rtol=1e-5, atol=1e-5)
    run("resize", adapter, "--rank", "8", "--base", "tiny", "--format", "diffusers", "-o", tmp_path / "d.safetensors",
        code=2)  # (a language model's adapter: no pipeline component — refused for that, not for the layer)
    kept = run("resize", "emb", "--rank", "8", "-o", tmp_path / "p").output
    assert "left out" not in kept and EMBED_LAYER in load_file(tmp_path / "p" / "adapter_model.safetensors")
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors[EMBED_LAYER][3, 5] += 1
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    changed = run("resize", adapter, "--rank", "8", "--base", "tiny", "--format", "kohya",
                  "-o", tmp_path / "c.safetensors", code=2).output
    assert "differs from base tiny's, so it carries trained values" in changed and "bound to no base" not in changed
    assert not (tmp_path / "c.safetensors").exists()
