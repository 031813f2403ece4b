"""PEFT lora_bias adapters (lora_B with a bias): merged as PEFT's merge_and_unload (the layer's bias gains
scale·lora_B.bias), subtracted back, checked against a base, inspected; what loraops cannot write is refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import loraops_run
from loraops import algebra, engine, formats
from loraops.errors import InvalidInputError, MismatchError



def qwen2(path: Path, seed: int = 0, tie: bool = False) -> Path:
    """A tiny float64 Qwen2 (its q/k/v projections have biases; ``tie``: its head, not stored, tied)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, tie_word_embeddings=tie)
    Qwen2ForCausalLM(config).to(torch.float64).save_pretrained(path)
    return path


def bias_adapter(base: Path, out: Path, *, targets=("q_proj", "v_proj"), seed: int = 1, **config) -> Path:
    """A lora_bias adapter made by PEFT on ``base``, its lora_B biases random (PEFT's init zeroes them)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, **config}, target_modules=list(targets),
                                                  init_lora_weights=False, lora_bias=True))
    for name, param in peft_model.named_parameters():
        if name.endswith("lora_B.default.bias"):
            param.data = torch.randn_like(param)
    peft_model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("lorabias")
    base = qwen2(root / "base")
    return base, bias_adapter(base, root / "adapter")


def test_merge_matches_peft_and_subtract_restores(made, tmp_path):
    base, adapter = made
    read = formats.read_adapter(adapter)
    assert read.lora_bias and all(m.lora_bias is not None for m in read.modules.values())
    engine.merge(base, [(read, 1.0)], tmp_path / "merged", device="cpu", fingerprint=False)
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    reference = peft_merged(base, adapter)
    original = load_file(base / "model.safetensors")
    changed = [k for k in original if not torch.equal(original[k], ours[k])]
    assert "model.layers.0.self_attn.q_proj.bias" in changed and "model.layers.1.self_attn.v_proj.bias" in changed
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-12, msg=name)
    engine.subtract(tmp_path / "merged", [(read, 1.0)], tmp_path / "back", device="cpu", fingerprint=False)
    back = load_file(tmp_path / "back" / "model.safetensors")
    for name, tensor in original.items():
        torch.testing.assert_close(back[name], tensor, rtol=0, atol=1e-12, msg=name)


def test_weighted_merge_scales_the_bias(made, tmp_path):
    base, adapter = made
    read = formats.read_adapter(adapter)
    engine.merge(base, [(read, 0.5)], tmp_path / "merged", device="cpu", fingerprint=False)
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    original = load_file(base / "model.safetensors")
    module = read.modules["model.layers.0.self_attn.q_proj"]
    name = "model.layers.0.self_attn.q_proj.bias"
    torch.testing.assert_close(ours[name], original[name] + 0.5 * module.scale * module.lora_bias.double(),
                               rtol=0, atol=1e-12)


def test_base_layer_without_bias_refused(made, tmp_path):
    base, _ = made
    adapter = bias_adapter(base, tmp_path / "o", targets=("o_proj",))  # (PEFT warns: its merge would fail)
    with pytest.raises(MismatchError, match=r"has no model\.layers\.0\.self_attn\.o_proj\.bias"):
        engine.merge(base, [(formats.read_adapter(adapter), 1.0)], tmp_path / "out", device="cpu")
    run = loraops_run("check", adapter, "--base", base)
    assert run.returncode != 0 and "lora_bias needs the base layer's bias" in run.stdout + run.stderr
    assert "Traceback" not in run.stderr


def test_tied_head_without_bias_refused(tmp_path):
    """A head the base does not store (tied to the embeddings) has no bias either: refused, not merged without it."""
    base = qwen2(tmp_path / "tied", tie=True)
    adapter = bias_adapter(base, tmp_path / "head", targets=("lm_head",))
    with pytest.raises(MismatchError, match=r"the base has no lm_head\.bias"):
        engine.merge(base, [(formats.read_adapter(adapter), 1.0)], tmp_path / "out", device="cpu")


def edited(adapter: Path, out: Path, edit) -> Path:
    out.mkdir()
    tensors = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    edit(tensors, config)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"


@pytest.mark.parametrize("edit, error, message", [
    (lambda t, c: t.__setitem__(KEY, t[KEY][:-1].clone()), InvalidInputError, r"lora_bias .* is 31 float64, not 32 floating point"),
    (lambda t, c: t[KEY].__setitem__(0, float("nan")), InvalidInputError, "contains NaN or Inf"),
    (lambda t, c: c.__setitem__("lora_bias", False), InvalidInputError, "config says lora_bias: false"),
    (lambda t, c: t.pop(KEY), InvalidInputError, "has no lora_B.bias but the config says lora_bias: true"),
])
def test_bad_bias_is_one_line(made, tmp_path, edit, error, message):
    _, adapter = made
    bad = edited(adapter, tmp_path / "bad", edit)
    with pytest.raises(error, match=message):
        formats.read_adapter(bad)
    run = loraops_run("merge", bad, "--into", made[0], "-o", tmp_path / "out")
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_base_bias_of_other_length_refused(made, tmp_path):
    base, adapter = made
    read = formats.read_adapter(adapter)
    module = read.modules["model.layers.0.self_attn.q_proj"]
    from loraops.check import lora_bias_misfit

    manifest = engine.BaseModel.open(base).tensors
    module.lora_bias = torch.zeros(module.out_features)
    assert lora_bias_misfit(module, manifest) is None
    module.B = module.B[:-4]
    module.lora_bias = module.lora_bias[:-4]
    assert "lora_bias is 28 long, the base's model.layers.0.self_attn.q_proj.bias 32" in lora_bias_misfit(module, manifest)


def test_inspect_and_show_say_lora_bias(made):
    _, adapter = made
    run = loraops_run("inspect", adapter)
    assert run.returncode == 0 and "variant     lora_bias: " in run.stdout, run.stdout + run.stderr
    assert loraops_run("register", adapter, "--name", "biased").returncode == 0
    run = loraops_run("show", "biased")
    assert run.returncode == 0 and "variant         lora_bias: " in run.stdout, run.stdout + run.stderr


def merged(base: Path, adapters, out: Path) -> dict[str, torch.Tensor]:
    engine.merge(base, adapters, out, device="cpu", fingerprint=False, precise=True)
    return load_file(out / "model.safetensors")


def test_export_peft_keeps_the_bias_and_peft_loads_it(made, tmp_path):
    base, adapter = made
    formats.write_adapter(formats.read_adapter(adapter), tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["lora_bias"] is True
    assert torch.equal(load_file(tmp_path / "again" / "adapter_model.safetensors")[KEY],
                       load_file(adapter / "adapter_model.safetensors")[KEY])
    reference = peft_merged(base, adapter)
    for name, tensor in peft_merged(base, tmp_path / "again").items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_export_elsewhere_refused(made, tmp_path, fmt):
    _, adapter = made
    run = loraops_run("export", adapter, "--format", fmt, "-o", tmp_path / "out.safetensors")
    assert run.returncode != 0 and "lora_bias" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_combine_sums_weighted_biases(made, tmp_path, method):
    """Merging the combination is merging the inputs at their weights (biases included); an input without lora_bias
    adds no bias."""
    from factories import peft_adapter

    base, first = made
    second = bias_adapter(base, tmp_path / "second", targets=("q_proj", "k_proj"), seed=2, r=2, lora_alpha=3,
                          use_rslora=True)  # (another scale than the first's: each bias is weighted by its own)
    plain = peft_adapter(base, tmp_path / "plain", target_modules=["v_proj"], seed=3)
    inputs = [(formats.read_adapter(p), w) for p, w in ((first, 0.7), (second, -1.3), (plain, 0.5))]
    combined, _ = algebra.combine(inputs, method, precise=True, device="cpu")
    formats.write_adapter(combined, tmp_path / "combined")
    ours = merged(base, [(formats.read_adapter(tmp_path / "combined"), 1.0)], tmp_path / "a")
    reference = merged(base, inputs, tmp_path / "b")
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-10, msg=name)


def test_combine_other_methods_refused(made):
    _, adapter = made
    with pytest.raises(InvalidInputError, match="lora_bias .* which ties does not define; combine it with cat or linear"):
        algebra.combine([(formats.read_adapter(adapter), 1.0)], "ties", {"density": 0.5}, device="cpu")


def test_resize_keeps_the_bias(made, tmp_path):
    base, adapter = made
    read = formats.read_adapter(adapter)
    resized, _ = algebra.resize(read, rank=2, device="cpu")
    formats.write_adapter(resized, tmp_path / "resized")
    again = formats.read_adapter(tmp_path / "resized")
    for name, module in read.modules.items():
        torch.testing.assert_close(again.modules[name].lora_bias * again.modules[name].scale,
                                   module.lora_bias * module.scale, rtol=0, atol=1e-12)


def test_lora_bias_config_on_a_registered_plain_lora_is_read_again(made, tmp_path):
    """A plain LoRA's folder whose config says lora_bias: true is another adapter (its identity hashes the flag):
    merge by path reads it, and refuses its missing biases, rather than taking the registered plain LoRA."""
    from factories import peft_adapter

    base, _ = made
    plain = peft_adapter(base, tmp_path / "plain", target_modules=["q_proj"])
    assert loraops_run("register", plain).returncode == 0
    copy = tmp_path / "copy"
    shutil.copytree(plain, copy)  # the same weights bytes
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))
    run = loraops_run("merge", copy, "--into", base, "-o", tmp_path / "out", "--device", "cpu")
    assert run.returncode == 2 and "has no lora_B.bias but the config says lora_bias: true" in run.stderr, run.stderr


def test_gpt2_conv1d_matches_peft(tmp_path):
    """GPT-2's Conv1D layers (weights in×out, fan_in_fan_out): the bias is the layer's outputs all the same."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)).double()
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                  fan_in_fan_out=True, init_lora_weights=False, lora_bias=True))
    for name, param in peft_model.named_parameters():
        if name.endswith("lora_B.default.bias"):
            param.data = torch.randn_like(param)
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = merged(tmp_path / "base", [(formats.read_adapter(tmp_path / "adapter"), 1.0)], tmp_path / "out")
    fresh = GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=torch.float64)
    reference = PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload().state_dict()
    base = load_file(tmp_path / "base" / "model.safetensors")
    assert not torch.equal(ours["transformer.h.1.mlp.c_fc.bias"], base["transformer.h.1.mlp.c_fc.bias"])
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-12, msg=name)


def test_combined_bias_past_the_dtype_refused(made, tmp_path):
    """A weighted bias beyond what the output dtype holds is refused, not written as inf."""
    _, adapter = made
    read = formats.read_adapter(adapter)
    for module in read.modules.values():
        module.A, module.B = module.A.half(), module.B.half()
        module.lora_bias = torch.full_like(module.lora_bias, 60000, dtype=torch.float16)  # × scale 2: past 65504
    with pytest.raises(InvalidInputError, match="comes out with NaN or Inf"):
        algebra.combine([(read, 1.0)], "cat", device="cpu")


def test_combine_with_a_plain_embedding_lora_refused(made, tmp_path):
    """The result's lora_bias is one switch: a plain input's LoRA on the embeddings would get a bias PEFT (and loraops'
    reader) refuses, so the combination is refused rather than written unreadable."""
    from factories import peft_adapter

    base, adapter = made
    plain = peft_adapter(base, tmp_path / "embed", target_modules=["embed_tokens"])
    tensors = load_file(plain / "adapter_model.safetensors")  # its LoRA only (no saved layer, which combine refuses)
    save_file({k: v for k, v in tensors.items() if "lora_" in k}, plain / "adapter_model.safetensors")
    inputs = [(formats.read_adapter(adapter), 1.0), (formats.read_adapter(plain), 1.0)]
    with pytest.raises(InvalidInputError, match=r"'model\.embed_tokens' of .* is on an embedding, where the "
                                                r"result's lora_bias .* cannot be"):
        algebra.combine(inputs, "cat", device="cpu")


@pytest.mark.parametrize("flag", [None, False, True])
def test_identity_of_a_plain_lora_is_as_before(made, tmp_path, flag):
    """A folder without lora_bias, or with "lora_bias": false, keeps the identity main gave it (the documented formula,
    recomputed here); only "lora_bias": true adds the field."""
    import hashlib

    from factories import peft_adapter

    plain = peft_adapter(made[0], tmp_path / "plain", target_modules=["q_proj"])
    cfg = json.loads((plain / "adapter_config.json").read_text())
    cfg.pop("lora_bias", None)
    (plain / "adapter_config.json").write_text(json.dumps(cfg if flag is None else {**cfg, "lora_bias": flag}))
    weights = hashlib.sha256((plain / "adapter_model.safetensors").read_bytes()).hexdigest()
    fields = {"peft_type": "LORA", "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "use_rslora": False,
              "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False, "target_modules": ["q_proj"],
              "modules_to_save": None, "use_dora": False, **({"lora_bias": True} if flag else {})}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    expected = hashlib.sha256(f"loraops-peft-identity-v1\n{weights}\n{canonical}".encode()).hexdigest()
    assert formats.identity(plain) == expected


def test_show_without_the_stored_file_still_shows_the_record(made, tmp_path):
    """show reads the stored file only for lora_bias (the record has no field for it): a blob gone from the store does
    not make show fail, as it did not before."""
    import os

    from factories import peft_adapter

    plain = peft_adapter(made[0], tmp_path / "shown", target_modules=["q_proj"])
    assert loraops_run("register", plain, "--name", "shown").returncode == 0
    for weights in Path(os.environ["LORAOPS_HOME"]).rglob("adapter_model.safetensors"):
        weights.unlink()
    run = loraops_run("show", "shown")
    assert run.returncode == 0 and "shown@1" in run.stdout, run.stdout + run.stderr


def test_null_lora_bias_is_false_as_peft_reads_it(made, tmp_path):
    """PEFT's LoraConfig keeps "lora_bias": null as None, which its layers read as false (no lora_B bias): a plain
    LoRA's folder saying null is read as one, and a file with lora_B biases under null is refused as under false."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from factories import peft_adapter

    base, adapter = made
    plain = peft_adapter(base, tmp_path / "plain", target_modules=["q_proj"])
    nulled = edited(plain, tmp_path / "nulled", lambda t, c: c.__setitem__("lora_bias", None))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64), nulled)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].bias is None  # PEFT: false
    read = formats.read_adapter(nulled)
    resaved = edited(plain, tmp_path / "resaved", lambda t, c: c.pop("lora_bias", None))  # (the same weights bytes)
    assert not read.lora_bias and formats.identity(nulled) == formats.identity(resaved)
    ours = merged(base, [(read, 1.0)], tmp_path / "ours")
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, model.merge_and_unload().state_dict()[name], rtol=0, atol=1e-12, msg=name)
    biased = edited(adapter, tmp_path / "biased", lambda t, c: c.__setitem__("lora_bias", None))
    with pytest.raises(InvalidInputError, match="has a lora_B bias .* but the config says lora_bias: false"):
        formats.read_adapter(biased)


def test_show_json_and_the_card_say_lora_bias(made, tmp_path):
    from factories import peft_adapter
    from loraops import hub
    from loraops.registry import Registry

    _, adapter = made
    plain = peft_adapter(made[0], tmp_path / "plain", target_modules=["q_proj"])
    for path, name in ((adapter, "biased"), (plain, "plain")):
        assert loraops_run("register", path, "--name", name).returncode == 0
    for name, flag in (("biased", True), ("plain", False)):
        run = loraops_run("show", name, "--json")
        assert run.returncode == 0 and json.loads(run.stdout)["lora_bias"] is flag, run.stdout + run.stderr
        with Registry.open() as reg:
            card = hub.render_card(hub.card_info(reg, reg.get_adapter(name), "peft"))
        assert (f"| variant | {hub.LORA_BIAS_NOTE} |" in card) is flag, card


def test_combine_onto_a_base_without_the_bias_refused(made, tmp_path):
    """The result's lora_bias is one switch: a plain input's o_proj (Qwen2's has no bias) gets a zero lora_B bias,
    which PEFT's merge (and loraops') cannot merge into this base. With the base known, combine refuses it in one
    line naming the module, before anything is written; without one it combines (PEFT loads such an adapter) and says
    in one note how many modules got a zero bias; none where every module has its own."""
    from factories import peft_adapter

    base, adapter = made
    plain = peft_adapter(base, tmp_path / "plain", target_modules=["o_proj"])
    run = loraops_run("combine", adapter, plain, "--name", "unbound", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ("note: 2 modules of the combination got a zero lora_B.bias (PEFT's lora_bias is one switch "
                          "and an input has it): a base without those layers' biases cannot merge it\n"), run.stderr
    second = bias_adapter(base, tmp_path / "second", seed=2)
    run = loraops_run("combine", adapter, second, "--name", "biased", "--device", "cpu")
    assert run.returncode == 0 and "note" not in run.stderr + run.stdout, run.stderr + run.stdout
    assert loraops_run("base", "add", base, "--name", "qwen").returncode == 0
    run = loraops_run("combine", adapter, plain, "--base", "qwen", "--name", "both", "--device", "cpu")
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "module 'model.layers.0.self_attn.o_proj' cannot have on base qwen" in run.stderr, run.stderr
    assert loraops_run("show", "both").returncode != 0


def test_lora_bias_on_bert_tied_decoder(tmp_path):
    """BERT's decoder bias is not stored: transformers ties it to cls.predictions.bias, the one parameter PEFT's merge
    adds the lora_bias to (under both names). loraops merges it (it refused: "the base has no ...decoder.bias"), the
    decoder untied: both biases PEFT's, and the merged model computes PEFT's adapted model."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import BertForMaskedLM

    from test_tied_embeddings import saved_with_biases

    saved_with_biases(BertForMaskedLM, tmp_path / "base")
    torch.manual_seed(1)
    adapted = get_peft_model(BertForMaskedLM.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["decoder"], init_lora_weights=False, lora_bias=True)).eval()
    for name, param in adapted.named_parameters():
        if name.endswith("lora_B.default.bias"):
            param.data = torch.randn_like(param)
    adapted.save_pretrained(tmp_path / "a")
    engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    ours = load_file(tmp_path / "out" / "model.safetensors")
    reference = PeftModel.from_pretrained(BertForMaskedLM.from_pretrained(tmp_path / "base"), tmp_path / "a")
    reference = reference.merge_and_unload().state_dict()
    for name in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-6, msg=name)
    merged, info = BertForMaskedLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(input_ids=tokens).logits, adapted(input_ids=tokens).logits,
                                   rtol=1e-5, atol=1e-5)
    # subtract from the merged model (both biases stored) takes the lora_bias off both: the base's bias again
    engine.subtract(tmp_path / "out", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "back", progress=False)
    back, base = load_file(tmp_path / "back" / "model.safetensors"), load_file(tmp_path / "base" / "model.safetensors")
    for name in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
        torch.testing.assert_close(back[name], base["cls.predictions.bias"], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(back["cls.predictions.decoder.weight"], base["bert.embeddings.word_embeddings.weight"],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls_name", ["EsmForMaskedLM", "LxmertForPreTraining"])
def test_lora_bias_on_a_tied_decoder_without_a_bias_refused(tmp_path, cls_name):
    """ESM's and LXMERT's decoders have no bias (their lm_head.bias / cls.predictions.bias is added apart, not tied
    to the decoder's), so PEFT's merge raises: refused in one line as for any layer without a bias (a name-only
    match of BERT's pair took that bias for the decoder's, and the merge ended in a KeyError traceback)."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    from test_tied_embeddings import saved_with_biases

    cls = getattr(transformers, cls_name)
    saved_with_biases(cls, tmp_path / "base")
    get_peft_model(cls.from_pretrained(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["decoder"], init_lora_weights=False, lora_bias=True)).save_pretrained(
        tmp_path / "a")
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
        PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "base"), tmp_path / "a").merge_and_unload()
    with pytest.raises(MismatchError, match=r"lora_bias needs the base layer's bias, and the base has no .*decoder\.bias"):
        engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a"), 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["use_rslora", "fan_in_fan_out", "use_dora"])
def test_null_switches_are_false_as_peft_reads_them(made, tmp_path, flag):
    """PEFT's LoraConfig keeps a null use_rslora/fan_in_fan_out/use_dora as None, which it reads as false: loraops
    reads, identifies and merges such a config as the one saying false (it refused "must be true or false")."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from factories import peft_adapter

    base = made[0]
    plain = peft_adapter(base, tmp_path / "plain", r=4, alpha=16, target_modules=["q_proj", "o_proj"])
    nulled = edited(plain, tmp_path / "nulled", lambda t, c: c.__setitem__(flag, None))
    false = edited(plain, tmp_path / "false", lambda t, c: c.__setitem__(flag, False))  # (the same weights bytes)
    assert formats.identity(nulled) == formats.identity(false)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64), nulled)
    reference = model.merge_and_unload().state_dict()
    for name, tensor in merged(base, [(formats.read_adapter(nulled), 1.0)], tmp_path / "ours").items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-12, msg=name)
