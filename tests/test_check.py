"""check / bind / require_fit against base manifests read from real safetensors headers."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import factories
from loraops import st
from loraops.check import bind, check, fit_counts, misfit_counts, require_fit
from loraops.errors import AmbiguousError, MismatchError
from loraops.formats import read_adapter

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    big = factories.tiny_llama(root / "big")
    small = factories.tiny_llama(root / "small", hidden=32, intermediate=64)
    adapter = factories.peft_adapter(big, root / "adapter", r=4, target_modules=["q_proj", "down_proj"])
    return SimpleNamespace(big=st.read_header(big / "model.safetensors").tensors,
                           small=st.read_header(small / "model.safetensors").tensors, adapter=adapter)


def test_fitting_adapter(bases):
    adapter = read_adapter(bases.adapter)
    report = check(adapter, bases.big, base_name="big")
    assert report.ok and report.matched == report.modules == 4 and report.base_ref == "big"
    assert report.missing == [] and report.shape_mismatches == []
    assert require_fit(adapter, bases.big).modules.keys() == adapter.modules.keys()


def test_mismatching_base_lists_every_shape(bases):
    adapter = read_adapter(bases.adapter)
    report = check(adapter, bases.small, base_name="small")
    assert not report.ok and report.matched == 0 and len(report.shape_mismatches) == 4
    q = next(m for m in report.shape_mismatches if m.name == "model.layers.0.self_attn.q_proj")
    assert (q.expected, q.actual, q.tensor) == ([32, 32], [64, 64], "model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(MismatchError) as info:
        require_fit(adapter, bases.small, base_name="small")
    message = str(info.value)
    assert "\n" not in message and "4 modules do not fit base small" in message
    assert "model.layers.0.mlp.down_proj (adapter 64×128, base 32×64)" in message


def test_missing_modules_and_full_tensors(bases):
    adapter = read_adapter(bases.adapter)
    partial = {k: v for k, v in bases.big.items() if "layers.1." not in k}
    report = check(adapter, partial)
    assert report.missing == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"] and report.matched == 2
    adapter.full_tensors["lm_head.weight"] = torch.zeros(3, 3)
    report = check(adapter, bases.big)
    assert [(m.name, m.expected, m.actual) for m in report.full_tensor_mismatches] == [("lm_head.weight", [128, 64], [3, 3])]
    with pytest.raises(MismatchError, match=r"lm_head.weight \(full tensor 3×3, base 128×64\)"):
        require_fit(adapter, bases.big)


def test_misfit_counts_say_what_they_count(bases):
    """The one-line refusal counts LoRA modules, whole tensors (modules_to_save copies) and token rows apart, as
    check's headline counts them: a whole tensor is no module (it said "1 module does not fit: lm_head.weight (full
    tensor …)")."""
    adapter = read_adapter(bases.adapter)
    partial = {k: v for k, v in bases.big.items() if "layers.1." not in k}
    report = check(adapter, partial)
    assert misfit_counts(report) == "2 modules do" and fit_counts(report) == "2/4 modules"
    adapter.full_tensors["lm_head.weight"] = torch.zeros(3, 3)
    adapter.full_tensors["model.norm.weight"] = torch.zeros(64)
    alone = check(adapter, bases.big)
    assert (alone.tensors, alone.tensors_matched) == (2, 1)
    assert misfit_counts(alone) == "1 whole tensor does" and fit_counts(alone) == "4/4 modules and 1/2 whole tensors"
    with pytest.raises(MismatchError, match=r": 1 whole tensor does not fit the base: lm_head.weight \(full tensor "):
        require_fit(adapter, bases.big)
    both = check(adapter, partial)
    assert fit_counts(both) == "2/4 modules and 1/2 whole tensors"
    with pytest.raises(MismatchError, match=r": 2 modules and 1 whole tensor do not fit base part: "):
        require_fit(adapter, partial, base_name="part")
    del adapter.modules["model.layers.1.mlp.down_proj"]
    assert misfit_counts(check(adapter, partial)) == "1 module and 1 whole tensor do"
    adapter.full_tensors["lm_head.weight"] = torch.zeros(128, 64)
    assert check(adapter, bases.big).tensors_matched == 2 and check(adapter, partial).tensors_matched == 2
    # a report not ok whose counts are all even (no path known to give one) says what misfits lists, not a traceback
    odd = check(adapter, partial).model_copy(update={"modules": 1, "matched": 1, "tensors_matched": 2})
    assert misfit_counts(odd) == "1 item does"


def test_leading_model_prefix_tolerated(bases, tmp_path):
    adapter = read_adapter(bases.adapter)
    without = {k.removeprefix("model."): v for k, v in bases.big.items()}
    bound = require_fit(adapter, without)
    assert "layers.0.self_attn.q_proj" in bound.modules
    with_more = {f"model.{k}": v for k, v in bases.big.items()}
    assert "model.model.layers.0.self_attn.q_proj" in bind(adapter, with_more).modules


def test_a_prefix_binds_the_modules_it_can_and_the_rest_are_listed_alone(bases):
    """Without ``model.`` every module but one the base lacks binds: that one is listed, under the adapter's name, and
    the others match (it listed all four, none bound). A renaming that binds no more than half binds nothing."""
    adapter = read_adapter(bases.adapter)
    without = {k.removeprefix("model."): v for k, v in bases.big.items() if ".1.mlp.down_proj." not in k}
    report = check(adapter, without)
    assert not report.ok and report.missing == ["model.layers.1.mlp.down_proj"] and report.matched == 3, report
    with pytest.raises(MismatchError, match=r"model\.layers\.1\.mlp\.down_proj"):
        require_fit(adapter, without)
    half = {k: v for k, v in without.items() if ".1.self_attn.q_proj." not in k}
    report = check(adapter, half)
    assert report.matched == 0 and sorted(report.missing) == sorted(adapter.modules), report


def test_kohya_no_match_and_ambiguity(tmp_path):
    info = SimpleNamespace(shape=(4, 3))
    path = factories.kohya_file(tmp_path / "k.safetensors", {"lora_unet_a_b_c": ((3,), (4,))})
    adapter = read_adapter(path)
    ambiguous = {"a.b_c.weight": info, "a_b.c.weight": info}
    with pytest.raises(AmbiguousError, match=r"k\.safetensors.*'lora_unet_a_b_c' matches several base modules \(a.b_c, a_b.c\)"):
        bind(adapter, ambiguous)
    report = check(adapter, ambiguous)
    assert not report.ok and report.ambiguous == ["lora_unet_a_b_c"]
    with pytest.raises(MismatchError, match=r"k\.safetensors.*match no base module: lora_unet_a_b_c"):
        bind(adapter, {"x.y.weight": info})
    report = check(adapter, {"x.y.weight": info})
    assert report.missing == ["lora_unet_a_b_c"] and not report.ok
    assert bind(adapter, {"a.b_c.weight": info, "a_b.c.bias": info}).modules["a.b_c"].weight_shape == (4, 3)


def test_check_report_json_schema(bases):
    data = json.loads(check(read_adapter(bases.adapter), bases.small).model_dump_json())
    assert set(data) == {"ok", "base_ref", "matched", "modules", "missing", "ambiguous", "shape_mismatches",
                         "full_tensor_mismatches", "token_row_mismatches", "tied_heads", "why_missing", "token_rows",
                         "token_rows_matched", "tensors", "tensors_matched"}
    assert set(data["shape_mismatches"][0]) == {"name", "tensor", "expected", "actual"}


def test_conv1d_layout_told_by_the_widening_projections():
    """GPT-2 stores c_attn/c_fc in×out (smaller dimension first); Qwen-1's c_attn is an nn.Linear (larger first):
    only the first makes a square c_proj a transposed (fan_in_fan_out) module."""
    import torch

    from loraops.adapter import LoraModule
    from loraops.check import conv1d_layout, fit_orientation

    gpt2 = {"h.0.attn.c_attn.weight": SimpleNamespace(shape=(64, 192)), "h.0.attn.c_proj.weight": SimpleNamespace(shape=(64, 64))}
    qwen = {"h.0.attn.c_attn.weight": SimpleNamespace(shape=(192, 64)), "h.0.attn.c_proj.weight": SimpleNamespace(shape=(64, 64))}
    assert conv1d_layout(gpt2) and not conv1d_layout(qwen) and not conv1d_layout({})
    square = LoraModule(name="h.0.attn.c_proj", A=torch.zeros(4, 64), B=torch.zeros(64, 4), alpha=4.0, scale=1.0)
    assert fit_orientation(square, (64, 64), conv1d=True).fan_in_fan_out
    assert not fit_orientation(square, (64, 64), conv1d=False).fan_in_fan_out
    wide = LoraModule(name="h.0.attn.c_attn", A=torch.zeros(4, 64), B=torch.zeros(192, 4), alpha=4.0, scale=1.0,
                      fan_in_fan_out=True)
    assert not fit_orientation(wide, (192, 64), conv1d=False).fan_in_fan_out  # an nn.Linear: the shape says so


def test_a_head_missing_from_a_tied_model_fits_as_a_tied_head():
    """lm_head absent while the base has input embeddings of its shape: a tied model, which stores the shared tensor
    once; the head fits (a merge writes it untied). Without such embeddings it is plainly not in the base."""
    import torch

    from loraops.adapter import Adapter, LoraModule
    from loraops.check import misfits, tied_head_source

    head = LoraModule(name="lm_head", A=torch.zeros(4, 64), B=torch.zeros(128, 4), alpha=4.0, scale=1.0)
    adapter = Adapter(modules={"lm_head": head}, format="peft")
    tied = {"model.embed_tokens.weight": SimpleNamespace(shape=(128, 64))}
    report = check(adapter, tied)
    assert report.ok and report.tied_heads == ["lm_head"] and report.matched == 1 and misfits(report) == []
    other = check(adapter, {"model.embed_tokens.weight": SimpleNamespace(shape=(256, 64))})
    assert not other.ok and other.tied_heads == [] and misfits(other) == ["lm_head (not in base)"]
    # T5 stores its shared embeddings three times: the shallowest; a VLM's head takes its own language model's
    t5 = {n: SimpleNamespace(shape=(128, 64)) for n in ("encoder.embed_tokens.weight", "shared.weight",
                                                        "decoder.embed_tokens.weight")}
    assert tied_head_source("lm_head.weight", (128, 64), t5) == "shared.weight"
    vlm = {n: SimpleNamespace(shape=(128, 64)) for n in ("language_model.model.embed_tokens.weight",
                                                         "speech_model.embed_tokens.weight")}
    assert tied_head_source("language_model.lm_head.weight", (128, 64), vlm) == "language_model.model.embed_tokens.weight"
    assert tied_head_source("lm_head.weight", (128, 64), {**tied, "lm_head.weight": None}) is None  # stored: not tied
    # a tied VLM saved in the old layout (Gemma3, PaliGemma): PEFT's in-memory names are renamed, the head included
    q = LoraModule(name="model.language_model.layers.0.self_attn.q_proj", A=torch.zeros(4, 64), B=torch.zeros(64, 4),
                   alpha=4.0, scale=1.0)
    vlm_adapter = Adapter(modules={"lm_head": head, q.name: q}, format="peft")
    saved = {"language_model.model.embed_tokens.weight": SimpleNamespace(shape=(128, 64)),
             "language_model.model.layers.0.self_attn.q_proj.weight": SimpleNamespace(shape=(64, 64))}
    report = check(vlm_adapter, saved)
    assert report.ok and report.tied_heads == ["language_model.lm_head"], misfits(report)


def test_output_heads_by_module_path():
    """Heads that models tie to their input embeddings, by path; a diffusers block's proj_out is not one (Whisper's
    top-level proj_out is)."""
    from loraops.check import is_head

    heads = ["lm_head.weight", "language_model.lm_head", "embed_out.weight", "cls.predictions.decoder.weight",
             "lm_head.decoder", "vocab_projector.weight", "proj_out.weight"]
    others = ["down_blocks.0.attentions.0.proj_out.weight", "unet.mid_block.attentions.0.proj_out", "lm_head_norm.weight",
              "model.layers.0.mlp.down_proj.weight", "decoder.weight"]
    assert [is_head(n) for n in heads] == [True] * len(heads)
    assert [is_head(n) for n in others] == [False] * len(others)


def test_a_saved_layout_binds_the_whole_adapter_or_the_most_never_a_mix():
    """transformers 5's in-memory names (check.SAVED_LAYOUTS) are mapped back for the whole adapter: one module the
    rules cannot place is reported alone under the name PEFT wrote (every name was left so, all reported); one the
    base holds under that name is reported under the renamed one, never bound by another renaming than the rest."""
    import torch

    from loraops.adapter import Adapter, LoraModule

    def adapter(*names):
        return Adapter(modules={n: LoraModule(name=n, A=torch.zeros(2, 16), B=torch.zeros(16, 2), alpha=2.0, scale=1.0)
                                for n in names}, format="peft")

    shape = SimpleNamespace(shape=(16, 16))
    segformer = {n: shape for n in ("segformer.encoder.block.0.0.attention.self.query.weight",
                                    "segformer.encoder.block.0.0.mlp.dense1.weight")}
    q, fc1 = "segformer.stages.0.blocks.0.attention.q_proj", "segformer.stages.0.blocks.0.mlp.fc1"
    assert bind(adapter(q, fc1), segformer).modules.keys() == {
        "segformer.encoder.block.0.0.attention.self.query", "segformer.encoder.block.0.0.mlp.dense1"}
    k = "segformer.stages.0.blocks.0.attention.k_proj"
    report = check(adapter(q, fc1, k), segformer)
    assert not report.ok and report.missing == [k] and report.matched == 2, report
    report = check(adapter(q, fc1, k), {**segformer, f"{k}.weight": shape})
    assert report.missing == ["segformer.encoder.block.0.0.attention.self.key"] and report.matched == 2, report
    # an encoder-decoder's model.encoder.* stays as it is although Granite Speech's rule moves model.encoder.*
    bart = {"model.encoder.layers.0.fc1.weight": shape, "encoder.layers.0.fc1.weight": shape}
    assert bind(adapter("model.encoder.layers.0.fc1"), bart).modules.keys() == {"model.encoder.layers.0.fc1"}


def test_a_conv1d_lora_that_fits_only_untransposed_does_not_fit(tmp_path):
    """A GPT-2 Conv1D stores in×out and PEFT's lora_A on it is r×in whatever the config says: factors whose B·A has
    the stored shape as it is (A as wide as the layer's outputs, another layer's LoRA) are refused by PEFT's load.
    check said they fit, and merge added B·A untransposed into c_attn."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    gpt2 = factories.tiny_gpt2(tmp_path / "gpt2")
    folder = factories.peft_adapter(gpt2, tmp_path / "lora", r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    file = folder / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.transformer.h.0.attn.c_attn"
    tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = torch.randn(4, 192), torch.randn(64, 4)
    save_file(tensors, file)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(factories.load_model(gpt2), folder)
    report = check(read_adapter(folder), st.read_header(gpt2 / "model.safetensors").tensors)
    assert not report.ok and report.matched == 1
    assert [(m.name, m.expected, m.actual) for m in report.shape_mismatches] == [
        ("transformer.h.0.attn.c_attn", [64, 192], [192, 64])]


def test_linear_factors_on_an_embedding_are_what_peft_leaves_out(tmp_path):
    """PEFT keeps an embedding's LoRA in lora_embedding_A/B: saved as lora_A/lora_B its load leaves them unused (a
    missing-keys warning) and the embeddings unchanged. check reported them as a shape mismatch (the base's fault,
    by its message); it now says what PEFT does, and merge refuses them alike."""
    import warnings

    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    from loraops.check import misfits

    llama = factories.tiny_llama(tmp_path / "llama")
    folder = factories.peft_adapter(llama, tmp_path / "lora", r=4, target_modules=["embed_tokens", "q_proj"])
    file, key = folder / "adapter_model.safetensors", "base_model.model.model.embed_tokens"
    tensors = load_file(file)
    tensors[f"{key}.lora_A.weight"] = tensors.pop(f"{key}.lora_embedding_A")
    tensors[f"{key}.lora_B.weight"] = tensors.pop(f"{key}.lora_embedding_B")
    save_file(tensors, file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(factories.load_model(llama), folder)
    assert any("missing adapter keys" in str(w.message) for w in caught)
    report = check(read_adapter(folder), st.read_header(llama / "model.safetensors").tensors)
    assert not report.ok and report.shape_mismatches == [] and report.missing == ["model.embed_tokens"]
    assert misfits(report) == ["model.embed_tokens (lora_A/lora_B on an embedding: PEFT keeps an embedding's LoRA in "
                               "lora_embedding_A/lora_embedding_B and loads this adapter without these factors)"]


@pytest.mark.parametrize("base", ["big", "small"])
def test_check_of_two_paths_imports_no_torch_nor_the_registry(bases, base, isolated_home):
    """`check PATH --base PATH` reads headers and configs only: in a fresh interpreter it runs without torch
    (st.without_torch), SQLAlchemy or Alembic (no registry is opened: check.check_paths), and says, byte for byte, what
    the read with torch's meta tensors says (in this process, torch loaded), a fit and a misfit alike."""
    for json_flag in ([], ["--json"]):
        imported, fresh, loaded = factories.fresh_cli_against_loaded(
            "check", bases.adapter, "--base", bases.adapter.parent / base, *json_flag)
        assert imported == [] and fresh == loaded, (imported, fresh, loaded)
    assert fresh[0] == (0 if base == "big" else 2)
    assert list(isolated_home.iterdir()) == []  # (no registry created, nor opened)
