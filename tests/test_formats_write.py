"""Writers: a PEFT folder we write loads in PEFT with the same deltas and outputs; kohya and diffusers files read
back to the same deltas; outputs are atomic."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
import torch

import factories
from loraops import algebra, st
from loraops.check import bind
from loraops.errors import ConflictError, FormatError, InvalidInputError
from loraops.formats import detect, read_adapter, write_adapter
from loraops.formats.kohya import data_hash

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return factories.tiny_llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="module")
def mixed(llama, tmp_path_factory):
    """A PEFT adapter with per-module ranks and alphas."""
    return factories.peft_adapter(llama, tmp_path_factory.mktemp("mixed") / "a", r=8, alpha=16,
                                  rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 3, "layers.1.mlp.up_proj": 5})


def manifest(path):
    return st.read_header(path / "model.safetensors").tensors


def assert_same_deltas(left, right):
    assert sorted(left.modules) == sorted(right.modules)
    for name, module in left.modules.items():
        torch.testing.assert_close(right.modules[name].delta(), module.delta(), **TOL, msg=name)


def test_peft_round_trip_loads_in_peft_with_identical_outputs(llama, mixed, tmp_path):
    from peft import PeftModel

    adapter = read_adapter(mixed)
    out = write_adapter(adapter, tmp_path / "out")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and set(cfg["rank_pattern"].values()) == {4}
    assert st.read_header(out / "adapter_model.safetensors").metadata == {"format": "pt"}
    assert_same_deltas(adapter, read_adapter(out))
    ours = PeftModel.from_pretrained(factories.load_model(llama), out).eval()
    theirs = PeftModel.from_pretrained(factories.load_model(llama), mixed).eval()
    expected = factories.peft_delta_weights(theirs)
    for name, delta in factories.peft_delta_weights(ours).items():
        torch.testing.assert_close(delta, expected[name], **TOL)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits)


def test_peft_writer_expresses_any_scale(llama, tmp_path):
    """Modules whose scale is not alpha/r (as the algebra makes them) get an alpha that reproduces the scale."""
    from peft import PeftModel

    adapter = read_adapter(factories.peft_adapter(llama, tmp_path / "a", target_modules=["q_proj", "k_proj"]))
    q = "model.layers.0.self_attn.q_proj"
    B2, A2 = adapter.modules[q].matrices()
    adapter.modules[q] = adapter.modules[q].with_factors(torch.cat([B2, B2], 1), torch.cat([A2, A2]), alpha=16, scale=0.75)
    out = write_adapter(adapter, tmp_path / "out")
    deltas = factories.peft_delta_weights(PeftModel.from_pretrained(factories.load_model(llama), out))
    for name, module in adapter.modules.items():
        torch.testing.assert_close(deltas[name], module.delta(), **TOL)


def test_peft_round_trip_embedding_conv_and_modules_to_save(tmp_path):
    from peft import PeftModel

    src = factories.conv_peft_adapter(tmp_path / "a", target_modules=["embed", "proj", "conv3"], modules_to_save=["conv1"])
    adapter = read_adapter(src)
    out = write_adapter(adapter, tmp_path / "out")
    again = read_adapter(out)
    assert_same_deltas(adapter, again)
    assert sorted(again.full_tensors) == ["conv1.bias", "conv1.weight"]
    model = PeftModel.from_pretrained(factories.conv_embedding_model(), out)
    deltas = factories.peft_delta_weights(model)
    for name, module in adapter.modules.items():
        torch.testing.assert_close(deltas[name], module.delta(), **TOL)
    torch.testing.assert_close(model.base_model.model.conv1.modules_to_save["default"].weight.detach(),
                               adapter.full_tensors["conv1.weight"])


def test_kohya_round_trip_hash_and_metadata(llama, mixed, tmp_path):
    adapter = read_adapter(mixed)
    path = write_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    header = st.read_header(path)
    meta = header.metadata
    assert meta["sshs_model_hash"] == data_hash(path)
    with open(path, "rb") as f:
        f.seek(header.data_offset)
        assert meta["sshs_model_hash"] == hashlib.sha256(f.read()).hexdigest()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "Dynamic"
    assert {"ss_network_alpha", "ss_network_args", "ss_base_model_version", "ss_v2"} <= set(meta)
    assert header.tensors["lora_unet_model_layers_0_self_attn_q_proj.alpha"].dtype == "F32"
    assert detect(path) == "kohya"
    back = read_adapter(path)
    assert not back.names_resolved and "lora_unet_model_layers_0_self_attn_q_proj" in back.modules
    assert_same_deltas(adapter, bind(back, manifest(llama)))


def test_kohya_writes_rslora_scale_as_true_alpha(llama, tmp_path):
    adapter = read_adapter(factories.peft_adapter(llama, tmp_path / "a", r=16, alpha=8, target_modules=["q_proj"],
                                                  use_rslora=True))
    back = read_adapter(write_adapter(adapter, tmp_path / "k.safetensors", "kohya"))
    assert back.alpha == pytest.approx(2.0 * 16)  # scale 8/sqrt(16)=2 written as kohya alpha 32 at r=16
    assert_same_deltas(adapter, bind(back, manifest(llama)))


def test_kohya_round_trip_of_fan_in_fan_out_modules(tmp_path):
    from peft import PeftModel

    gpt2 = factories.tiny_gpt2(tmp_path / "gpt2")
    src = factories.peft_adapter(gpt2, tmp_path / "a", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    adapter = read_adapter(src)
    back = bind(read_adapter(write_adapter(adapter, tmp_path / "k.safetensors", "kohya")), manifest(gpt2))
    assert_same_deltas(adapter, back)  # same delta on the same stored (in×out) tensor
    # binding what is bound changes nothing (the square c_proj, its factors swapped again, would add ΔWᵀ)
    assert_same_deltas(adapter, bind(back, manifest(gpt2)))
    # bound, the Conv1D modules are in PEFT's layout again: written as PEFT, they load (were lora_A 4×192 for c_attn,
    # whose Conv1D takes 64 inputs: PEFT refused the file) with the source's deltas, and kohya gets the same file
    assert all(m.fan_in_fan_out for m in back.modules.values())
    deltas = factories.peft_delta_weights(PeftModel.from_pretrained(factories.load_model(gpt2), write_adapter(back, tmp_path / "p")))
    assert sorted(deltas) == sorted(adapter.modules)
    for name, module in adapter.modules.items():
        torch.testing.assert_close(deltas[name], module.delta(), **TOL, msg=name)
    again = write_adapter(back, tmp_path / "k2.safetensors", "kohya")
    assert (tmp_path / "k2.safetensors").read_bytes() == (tmp_path / "k.safetensors").read_bytes() and again
    # and it combines with the PEFT source (was 'module … differs between inputs: linear (64, 192) … linear (64, 192)')
    both, _ = algebra.combine([(adapter, 1.0), (back, -1.0)], "cat")
    for name, module in both.modules.items():
        torch.testing.assert_close(module.delta(), torch.zeros_like(module.delta()), atol=1e-6, rtol=0, msg=name)


def test_kohya_round_trip_of_embedding_modules(llama, tmp_path):
    """An embedding's LoRA is written to kohya transposed (kohya has no embedding convention); bound to its base it is
    an embedding module again: written as PEFT it was lora_A/lora_B on an nn.Embedding, keys PEFT's embedding layer
    does not have, so PEFT loaded the adapter with that module's factors left at their initial values (a warning)."""
    from peft import PeftModel

    src = factories.peft_adapter(llama, tmp_path / "a", target_modules=["embed_tokens", "q_proj"])
    adapter = replace(read_adapter(src), full_tensors={})  # (PEFT saves the embedding layer beside: kohya holds none)
    kohya = write_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    back = bind(read_adapter(kohya), manifest(llama))
    assert layouts(back) == layouts(adapter)  # the embedding module an embedding module again, q_proj as it was
    assert_same_deltas(adapter, back)
    # a kohya file that does not list its embedding modules (written before loraops_embeddings, or by another tool):
    # embed_tokens is known by its name
    header = st.read_header(kohya)
    unmarked = tmp_path / "unmarked.safetensors"
    st.write_safetensors(unmarked, st.load_tensors(header),
                         {k: v for k, v in header.metadata.items() if k != "loraops_embeddings"})
    assert layouts(bind(read_adapter(unmarked), manifest(llama))) == layouts(adapter)
    model = PeftModel.from_pretrained(factories.load_model(llama), write_adapter(back, tmp_path / "p"))
    deltas = factories.peft_delta_weights(model)
    assert sorted(deltas) == sorted(adapter.modules)
    for name, module in adapter.modules.items():
        torch.testing.assert_close(deltas[name], module.delta(), **TOL, msg=name)


def layouts(adapter):
    return {name: (module.kind, module.fan_in_fan_out) for name, module in adapter.modules.items()}


@pytest.mark.parametrize("listed", ["lora_unet_embed", "5", '{"lora_unet_embed": 1}'])
def test_a_kohya_header_that_lists_no_embedding_modules_marks_none(listed, tmp_path):
    """loraops_embeddings that is no JSON list of names is read as marking no module (a linear module on the
    embedding's stored table: the same delta), not a traceback."""
    adapter = read_adapter(factories.conv_peft_adapter(tmp_path / "a", target_modules=["embed", "proj"]))
    header = st.read_header(write_adapter(adapter, tmp_path / "k.safetensors", "kohya"))
    kohya = tmp_path / "listed.safetensors"
    st.write_safetensors(kohya, st.load_tensors(header), {**header.metadata, "loraops_embeddings": listed})
    base = factories.save_state_dict(factories.conv_embedding_model(), tmp_path / "base.safetensors")
    back = bind(read_adapter(kohya), st.read_header(base).tensors)
    assert layouts(back) == {"embed": ("linear", False), "proj": ("linear", False)}
    assert_same_deltas(adapter, back)


def test_kohya_round_trip_of_an_embedding_by_any_name_and_convs(tmp_path):
    """An embedding layer named as no model loraops knows ('embed'): the kohya file marks its module (loraops_embeddings
    in the header), so bound back it is an embedding module all the same, and PEFT loads the PEFT file written of it
    with the source's deltas; the 1×1 and 3×3 conv modules come back as they were."""
    from peft import PeftModel

    src = factories.conv_peft_adapter(tmp_path / "a", target_modules=["embed", "proj", "conv1", "conv3"])
    adapter = read_adapter(src)
    kohya = write_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    assert json.loads(st.read_header(kohya).metadata["loraops_embeddings"]) == ["lora_unet_embed"]
    base = factories.save_state_dict(factories.conv_embedding_model(), tmp_path / "base.safetensors")
    back = bind(read_adapter(kohya), st.read_header(base).tensors)
    assert back.modules["embed"].kind == "embedding"
    assert_same_deltas(adapter, back)
    deltas = factories.peft_delta_weights(PeftModel.from_pretrained(factories.conv_embedding_model(),
                                                                    write_adapter(back, tmp_path / "p")))
    assert sorted(deltas) == sorted(adapter.modules)
    for name, module in adapter.modules.items():
        torch.testing.assert_close(deltas[name], module.delta(), **TOL, msg=name)
    assert write_adapter(back, tmp_path / "k2.safetensors", "kohya").read_bytes() == kohya.read_bytes()


def test_diffusers_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    modules = {"unet.down_blocks.0.attentions.0.proj_in": (8, 16), "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (12, 12)}
    tensors = {}
    for name, (out_f, in_f) in modules.items():
        tensors[f"{name}.lora_A.weight"] = torch.randn(4, in_f, generator=g)
        tensors[f"{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=g)
    src = tmp_path / "pytorch_lora_weights.safetensors"
    st.write_safetensors(src, tensors)
    adapter = read_adapter(src)
    assert adapter.format == "diffusers" and adapter.alpha == 4  # diffusers' default alpha = r
    assert sorted(adapter.modules) == sorted(modules)
    adapter.modules["unet.down_blocks.0.attentions.0.proj_in"] = replace(
        adapter.modules["unet.down_blocks.0.attentions.0.proj_in"], alpha=2.0, scale=0.5)
    out = write_adapter(adapter, tmp_path / "out.safetensors", "diffusers")
    back = read_adapter(out)
    assert back.format == "diffusers"
    assert back.modules["unet.down_blocks.0.attentions.0.proj_in"].scale == 0.5
    assert_same_deltas(adapter, back)
    assert read_adapter(tmp_path).format == "diffusers"  # a folder holding pytorch_lora_weights.safetensors


def test_writes_are_atomic_and_refuse_existing(llama, tmp_path):
    adapter = read_adapter(factories.peft_adapter(llama, tmp_path / "a", target_modules=["q_proj"]))
    dest = write_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    with pytest.raises(ConflictError, match="already exists"):
        write_adapter(adapter, dest, "kohya")
    write_adapter(adapter, dest, "kohya", force=True)
    with pytest.raises(InvalidInputError, match="a peft adapter is a folder"):
        write_adapter(adapter, tmp_path / "p.safetensors", "peft")
    with pytest.raises(InvalidInputError, match="unknown adapter format"):
        write_adapter(adapter, tmp_path / "x", "lycoris")
    unbound = read_adapter(dest)
    with pytest.raises(InvalidInputError, match="bind it to a base first"):
        write_adapter(unbound, tmp_path / "p")
    # (not lm_head: beside no modules_to_save that is PEFT's saved embedding layer, refused in its own words)
    adapter.full_tensors["model.norm.weight"] = torch.zeros(64)
    with pytest.raises(FormatError, match="full replacement tensors"):
        write_adapter(adapter, tmp_path / "bad.safetensors", "kohya")
    assert not (tmp_path / "bad.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if ".loraops-tmp-" in p.name] == []


def test_peft_round_trip_of_trained_biases(tmp_path):
    from peft import PeftModel

    src = factories.conv_peft_adapter(tmp_path / "a", target_modules=["proj", "conv3"], bias="lora_only")
    adapter = read_adapter(src)
    adapter.full_tensors["proj.bias"] = adapter.full_tensors["proj.bias"] + 1
    out = write_adapter(adapter, tmp_path / "out")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["bias"] == "lora_only" and cfg["modules_to_save"] is None
    model = PeftModel.from_pretrained(factories.conv_embedding_model(), out)
    torch.testing.assert_close(model.base_model.model.proj.base_layer.bias.detach(), adapter.full_tensors["proj.bias"])
    assert sorted(read_adapter(out).full_tensors) == ["conv3.bias", "proj.bias"]


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "kohya"])
def test_writers_are_byte_stable(llama, tmp_path, fmt):
    """Writing the same adapter again gives the same bytes: the file's sha256 is the adapter's identity, and
    safetensors' own save_file writes metadata in an order that changes from one call to the next."""
    adapter = read_adapter(factories.peft_adapter(llama, tmp_path / "a", target_modules=["q_proj", "v_proj"]))
    if fmt == "diffusers":
        adapter = replace(adapter, modules={f"text_encoder.{n}": replace(m, name=f"text_encoder.{n}")
                                            for n, m in adapter.modules.items()})
    digests = set()
    for i in range(6):
        out = write_adapter(adapter, tmp_path / f"out{i}{'' if fmt == 'peft' else '.safetensors'}", fmt)
        data = out / "adapter_model.safetensors" if fmt == "peft" else out
        digests.add(hashlib.sha256(data.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_a_diffusers_flux_lora_is_not_written_under_made_up_kohya_names(tmp_path):
    """kohya's FLUX/SD3 names are the original checkpoint's paths (double_blocks…, q/k/v fused);
    lora_unet_single_transformer_blocks_… loads in no FLUX loader (diffusers rejects it), so it is refused."""
    tensors = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 8),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(8, 2)}
    st.write_safetensors(tmp_path / "flux.safetensors", tensors)
    adapter = read_adapter(tmp_path / "flux.safetensors")
    with pytest.raises(FormatError, match="no kohya names of its own: bind it to a single-file FLUX/SD3 checkpoint"):
        write_adapter(adapter, tmp_path / "k.safetensors", "kohya")
    assert not (tmp_path / "k.safetensors").exists()


def test_sequence_classification_head_export_loads_in_peft(tmp_path):
    """PEFT's SEQ_CLS model adds "classifier" to modules_to_save itself: the export listed classifier.dense and
    classifier.out_proj (the saved tensors' modules), PEFT wrapped them inside the wrapped classifier and its load
    failed (KeyError 'base_model.model.classifier.dense.weight'). Written as PEFT writes it, it loads with the
    original's outputs and merged weights."""
    from peft import PeftModel
    from transformers import RobertaForSequenceClassification

    base, source, _ = factories.roberta_classifier_adapter(tmp_path)
    out = write_adapter(read_adapter(source), tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
    ids = torch.arange(12).reshape(2, 6) + 3
    models = [PeftModel.from_pretrained(RobertaForSequenceClassification.from_pretrained(base), folder).eval()
              for folder in (source, out)]
    torch.testing.assert_close(models[1](ids).logits, models[0](ids).logits, rtol=0, atol=0)
    expected = models[0].merge_and_unload().state_dict()
    merged = models[1].merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("task, model_type, cls_name, config, targets", factories.TASK_MODELS)
def test_task_heads_are_written_as_peft_writes_them(task, model_type, cls_name, config, targets, tmp_path):
    """Each task model of PEFT adds its head to modules_to_save itself (TOKEN_CLS: classifier and score, QUESTION_ANS:
    qa_outputs) and saves the list so; the export lists the same entries and PEFT loads it with the original's
    outputs (the head trained, as by the task's recipe)."""
    from peft import PeftModel

    base, source, model_cls = factories.task_adapter(tmp_path, task, model_type, cls_name, config, targets)
    out = write_adapter(read_adapter(source), tmp_path / "out")
    source_cfg, written = (json.loads((folder / "adapter_config.json").read_text()) for folder in (source, out))
    assert sorted(written["modules_to_save"]) == sorted(source_cfg["modules_to_save"])
    ids = torch.arange(12).reshape(2, 6) + 3
    outputs = [PeftModel.from_pretrained(model_cls.from_pretrained(base), folder).eval()(ids)
               for folder in (source, out)]
    for name in ("logits", "start_logits", "end_logits"):
        if getattr(outputs[0], name, None) is not None:
            torch.testing.assert_close(getattr(outputs[1], name), getattr(outputs[0], name), rtol=0, atol=0)


def test_layers_pattern_without_layers_to_transform_is_not_written(llama, tmp_path):
    """Older PEFT saved layers_pattern without layers_to_transform; PEFT reads it only to find the layer index that
    list holds, so alone it selects nothing (every targeted layer is wrapped, as the test's PEFT load of the config
    without it shows), and PEFT 0.21's LoraConfig refuses it: an export kept it and PEFT could not load the export."""
    from peft import PeftModel

    source = factories.peft_adapter(llama, tmp_path / "a", target_modules=["q_proj", "v_proj"])
    expected = factories.peft_delta_weights(PeftModel.from_pretrained(factories.load_model(llama), source))
    cfg = json.loads((source / "adapter_config.json").read_text())
    (source / "adapter_config.json").write_text(json.dumps({**cfg, "layers_pattern": "layers"}))
    with pytest.raises(ValueError, match="When `layers_pattern` is specified, `layers_to_transform` must also be"):
        PeftModel.from_pretrained(factories.load_model(llama), source)
    out = write_adapter(read_adapter(source), tmp_path / "out")
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["layers_pattern"] is None and sorted(written["target_modules"]) == ["q_proj", "v_proj"]
    loaded = factories.peft_delta_weights(PeftModel.from_pretrained(factories.load_model(llama), out))
    assert loaded.keys() == expected.keys() and len(loaded) == 4
    for name, delta in loaded.items():
        torch.testing.assert_close(delta, expected[name], rtol=0, atol=0)


GPT2_HEAD_TARGETS = r".*(c_attn|attn\.c_proj|lm_head)"


def conv1d_family(tmp_path, model_type, cls_name, targets, task_type="CAUSAL_LM", **config):
    """A tiny untied ``model_type`` base, a PEFT LoRA on ``targets`` made by PEFT, and PEFT's own delta of each
    module in the base weight's layout (what its merge_and_unload adds). ``task_type`` None: PEFT records the model's
    class in the config (auto_mapping)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    config = config or dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)
    base = factories.tiny_transformers(tmp_path / "base", model_type, cls_name, vocab_size=128,
                                       tie_word_embeddings=False, **config)
    torch.manual_seed(1)
    get_peft_model(factories.load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                          init_lora_weights=False, task_type=task_type)).save_pretrained(tmp_path / "a", save_embedding_layers=False)
    deltas = factories.peft_delta_weights(PeftModel.from_pretrained(factories.load_model(base), tmp_path / "a"))
    return base, tmp_path / "a", deltas


def assert_peft_deltas(adapter, deltas):
    """``adapter`` (a kohya file read back and bound) adds PEFT's delta to every base tensor."""
    assert sorted(adapter.modules) == sorted(deltas)
    for name, module in adapter.modules.items():
        torch.testing.assert_close(module.delta(), deltas[name], **TOL, msg=name)


def test_unbound_gpt2_adapter_with_a_head_is_refused_as_kohya_or_diffusers(tmp_path):
    """PEFT saves a GPT-2 LoRA on c_attn, attn.c_proj and lm_head with fan_in_fan_out false (lm_head's, wrapped last),
    and its factors are shaped as an nn.Linear's would be: unbound, nothing says its Conv1D modules are transposed.
    Written to kohya it held the square c_proj's ΔW untransposed (merged, c_proj got ΔWᵀ, not PEFT's ΔW); now it is
    refused in one line asking for a base, and bound to one it is written with PEFT's deltas."""
    from loraops.errors import UnsupportedAdapterError

    base, folder, deltas = conv1d_family(tmp_path, "gpt2", "GPT2LMHeadModel", GPT2_HEAD_TARGETS)
    assert json.loads((folder / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    adapter = read_adapter(folder)
    for fmt in ("kohya", "diffusers"):
        with pytest.raises(UnsupportedAdapterError, match=rf"attn\.c_attn.*only their base says.*--base.* as {fmt}$"):
            write_adapter(adapter, tmp_path / f"{fmt}.safetensors", fmt)
        assert not (tmp_path / f"{fmt}.safetensors").exists()
    write_adapter(adapter, tmp_path / "p")  # as PEFT: PEFT itself decides per layer
    bound = bind(adapter, manifest(base))
    kohya = write_adapter(bound, tmp_path / "kohya.safetensors", "kohya")
    assert_peft_deltas(bind(read_adapter(kohya), manifest(base)), deltas)
    # a combination of unbound inputs keeps the doubt (its modules announce it), bound it has none
    both, _ = algebra.combine([(adapter, 1.0), (adapter, 1.0)], "cat")
    with pytest.raises(UnsupportedAdapterError, match="--base"):
        write_adapter(both, tmp_path / "both.safetensors", "kohya")
    write_adapter(algebra.combine([(bound, 1.0), (bound, 1.0)], "cat")[0], tmp_path / "both.safetensors", "kohya")


def test_bare_gpt2_file_is_refused_as_kohya_unbound(tmp_path):
    """A bare PEFT file (no config, no flag) of Conv1D-named modules: whether they are GPT-2's Conv1D or GPT-BigCode's
    nn.Linear, only the base says (before: written untransposed, GPT-2's c_attn then misfit its base in×out and its
    square c_proj merged ΔWᵀ). A kohya file written of it bound holds PEFT's deltas; diffusers is refused bound too,
    as a language model's (no pipeline holds a Conv1D: it was written under a transformer. component)."""
    import shutil

    from loraops.errors import UnsupportedAdapterError

    base, folder, deltas = conv1d_family(tmp_path, "gpt2", "GPT2LMHeadModel", ["c_attn", "c_proj"])
    shutil.copy(folder / "adapter_model.safetensors", tmp_path / "bare.safetensors")
    bare = read_adapter(tmp_path / "bare.safetensors", alpha=8)
    for fmt in ("kohya", "diffusers"):
        with pytest.raises(UnsupportedAdapterError, match="--base"):
            write_adapter(bare, tmp_path / f"{fmt}.safetensors", fmt)
    written = write_adapter(bind(bare, manifest(base)), tmp_path / "kohya.safetensors", "kohya")
    assert_peft_deltas(bind(read_adapter(written), manifest(base)), deltas)
    with pytest.raises(FormatError, match=r"a language model's adapter \(a Conv1D module, transformer\.h\.0\.attn\.c_attn\): "
                                          r"the diffusers format is a pipeline's"):
        write_adapter(bind(bare, manifest(base)), tmp_path / "diffusers.safetensors", "diffusers")
    assert not (tmp_path / "diffusers.safetensors").exists()
    with pytest.raises(FormatError, match=r"a language model's adapter \(task_type CAUSAL_LM\)"):
        write_adapter(read_adapter(folder), tmp_path / "diffusers.safetensors", "diffusers")
    # with its config (fan_in_fan_out true: PEFT saw a Conv1D) it is settled unbound
    kohya = write_adapter(read_adapter(folder), tmp_path / "k2.safetensors", "kohya")
    assert_peft_deltas(bind(read_adapter(kohya), manifest(base)), deltas)


BIGCODE = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)


LINEAR_FAMILY = [
    ("gpt_bigcode", "GPTBigCodeForCausalLM", {**BIGCODE, "multi_query": False}),
    ("gpt_bigcode", "GPTBigCodeForCausalLM", {**BIGCODE, "multi_query": True}),
    ("gpt_neo", "GPTNeoForCausalLM", dict(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global"], 2]],
                                          max_position_embeddings=64)),
    ("starcoder2", "Starcoder2ForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=64)),
]


@pytest.mark.parametrize("model_type, cls_name, config", LINEAR_FAMILY)
def test_linear_family_under_conv1d_names_is_settled_unbound_unless_a_head_is_targeted(model_type, cls_name, config,
                                                                                      tmp_path):
    """GPT-BigCode, GPT-Neo and Starcoder2 keep nn.Linear layers under Conv1D names (c_attn, c_proj, c_fc; GPT-Neo's
    and Starcoder2's MLP): PEFT saves false, and with no other layer targeted that false is theirs, so the adapter is
    written as kohya unbound with PEFT's deltas. With another linear layer targeted too (lm_head, attention's q_proj)
    the false may be that layer's (as GPT-2's lm_head's): refused unbound, written bound with PEFT's deltas."""
    from loraops.errors import UnsupportedAdapterError

    conv1d_named = r".*\.(c_attn|c_proj|c_fc)"
    base, folder, deltas = conv1d_family(tmp_path / "a", model_type, cls_name, conv1d_named, **config)
    assert json.loads((folder / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    kohya = write_adapter(read_adapter(folder), tmp_path / "k.safetensors", "kohya")
    assert_peft_deltas(bind(read_adapter(kohya), manifest(base)), deltas)

    base, folder, deltas = conv1d_family(tmp_path / "b", model_type, cls_name, r".*(c_fc|c_proj|q_proj|lm_head)",
                                         **config)
    with pytest.raises(UnsupportedAdapterError, match="--base"):
        write_adapter(read_adapter(folder), tmp_path / "k2.safetensors", "kohya")
    kohya = write_adapter(bind(read_adapter(folder), manifest(base)), tmp_path / "k2.safetensors", "kohya")
    assert_peft_deltas(bind(read_adapter(kohya), manifest(base)), deltas)


@pytest.mark.parametrize("model_type, cls_name, config", [
    ("gpt2", "GPT2LMHeadModel", {}),
    ("gpt_bigcode", "GPTBigCodeForCausalLM", {**BIGCODE, "multi_query": True}),
    *[case for case in LINEAR_FAMILY if case[0] != "gpt_bigcode"],
])
def test_the_model_class_peft_records_settles_conv1d_named_modules_unbound(model_type, cls_name, config, tmp_path):
    """An adapter saved without a task_type has its model's class in its config (auto_mapping: PEFT's
    save_pretrained): transformers' class says whether its Conv1D-named layers are Conv1D (GPT-2) or nn.Linear
    (GPT-BigCode, GPT-Neo, Starcoder2), where the false PEFT saves for a head or q_proj wrapped last does not. Such an
    adapter on the Conv1D-named layers and others is written as kohya unbound, with PEFT's deltas (it was refused)."""
    targets = r".*(c_attn|c_fc|c_proj|q_proj|lm_head)"
    base, folder, deltas = conv1d_family(tmp_path, model_type, cls_name, targets, task_type=None, **config)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is False and saved["auto_mapping"]["base_model_class"] == cls_name
    kohya = write_adapter(read_adapter(folder), tmp_path / "k.safetensors", "kohya")
    assert_peft_deltas(bind(read_adapter(kohya), manifest(base)), deltas)


def test_the_conv1d_and_linear_model_lists_are_transformers_own():
    """Every transformers model that has a layer of a Conv1D name (c_attn, q_attn, c_proj, c_fc) is in one list, by
    what its sources make that layer: Conv1D(...) or nn.Linear(...), as an attribute or a named child (BridgeTower's
    ("c_fc", nn.Linear(...)) in an OrderedDict), in any of the model's modules (IDEFICS's perceiver.py): a model
    whose sources name such a layer but make none of them as the test reads fails it, rather than go unlisted."""
    import re
    from pathlib import Path

    import transformers

    from loraops.formats.common import CONV1D_LAYERS
    from loraops.formats.peft import CONV1D_MODELS, LINEAR_MODELS

    names = "|".join(CONV1D_LAYERS)
    made = {}
    for source in Path(transformers.__file__).parent.glob("models/*/*.py"):
        if source.stem.startswith(("modular_", "configuration_", "convert_")):
            continue
        text = source.read_text()
        if not re.search(rf"\b(?:{names})\b", text):
            continue
        layers = re.findall(rf"(?:self\.(?:{names}) =|\(\s*[\"'](?:{names})[\"'],) (Conv1D|nn\.Linear)\(", text)
        assert layers, f"{source}: names a Conv1D-named layer but makes none as this test reads"
        made.setdefault(source.parent.name, set()).update(layers)
    assert made == {**{m: {"Conv1D"} for m in CONV1D_MODELS}, **{m: {"nn.Linear"} for m in LINEAR_MODELS}}


@pytest.mark.parametrize("modules, said", [
    (5, "modules= takes the modules of a lazy resize or combine (algebra.resize_lazily(...)) or LoraModule objects, "
        "not 5 (int)"),
    ("x", "modules= takes the modules of a lazy resize or combine (algebra.resize_lazily(...)) or LoraModule objects, "
          "not 'x' (str)"),
    ([1], "modules= holds LoraModule objects, not 1 (int)"),
])
def test_write_refuses_modules_that_are_no_lora_modules(mixed, tmp_path, modules, said):
    """formats.write(modules=5) was a raw TypeError ('int' object is not iterable), "x" and [1] AttributeErrors from
    inside the writer; a list of the adapter's own modules is written as they are."""
    from loraops import formats

    adapter = read_adapter(mixed)
    with pytest.raises(InvalidInputError) as caught:
        formats.write(adapter, tmp_path / "out", "peft", modules=modules)
    assert str(caught.value) == said
    assert list(tmp_path.iterdir()) == []
    written = formats.write(adapter, tmp_path / "out", "peft", modules=list(adapter.modules.values()))
    assert_same_deltas(read_adapter(written.path), adapter)
