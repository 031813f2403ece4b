"""An architecture sweep of check + merge + subtract against PEFT, on tiny random models of the families where
something needed fixing and a representative handful (MoE, fused qkv, encoder, encoder-decoder, VLM).

transformers 5 loads some families under other module names than it saves (ViT, DINOv2, Qwen2-VL, Swin, Segformer,
the towers of Mllama, Qwen2-Audio, Voxtral, Video-LLaVA, Fuyu), ties output
heads that are not called lm_head (BERT, DistilBERT, Mamba), and PEFT saves a targeted head's bias with it (Phi):
PEFT names an adapter's modules as they are in memory, the merge works on the checkpoint's tensors. Each case merges
a PEFT adapter made by PEFT on the loaded model and checks the merged model computes what the adapter's model
computes, that it equals PEFT's merge_and_unload where PEFT's merge is right (untied), and that subtract restores
the base."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from factories import tiny_transformers
from loraops import engine, formats
from loraops.basemodel import BaseModel
from loraops.check import check

pytestmark = pytest.mark.no_registry

LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=128, max_position_embeddings=64)
ENCODER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=128,
               max_position_embeddings=32)
VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8)
QWEN2_VL = dict(text_config=dict(**LM, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
                vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                                   spatial_merge_size=2, temporal_patch_size=2),
                image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
EMBEDDINGS_AND_HEAD = ["embed_tokens", "lm_head"]
MLLAMA = dict(text_config=dict(LM, num_hidden_layers=2, cross_attention_layers=[1], pad_token_id=0),
              vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_global_layers=1,
                                 attention_heads=2, image_size=16, patch_size=8, vision_output_dim=32,
                                 intermediate_layers_indices=[0], max_num_tiles=1, supported_aspect_ratios=[[1, 1]]),
              image_token_index=120)
CLIP_VISION = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, image_size=16, patch_size=8)
AUDIO = dict(num_mel_bins=8, max_source_positions=8)


def token_ids(model, n=8):
    return {"input_ids": torch.randint(3, 100, (1, n), generator=torch.Generator().manual_seed(0))}


def seq2seq_ids(model):
    return {**token_ids(model), "decoder_input_ids": token_ids(model, 5)["input_ids"]}


def pixels(model):
    size = model.config.image_size
    return {"pixel_values": torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))}


def pixels_of(size):
    def inputs(model):
        return {"pixel_values": torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))}
    return inputs


def qwen2_vl_inputs(model):
    """Text with one 4×4-patch image (4 tokens after the 2×2 merge)."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 100, (1, 4), generator=g)
    ids = torch.cat([text[:, :2], torch.tensor([[cfg.vision_start_token_id] + [cfg.image_token_id] * 4
                                                + [cfg.vision_end_token_id]]), text[:, 2:]], 1)
    vision = cfg.vision_config
    patches = torch.randn(16, 3 * vision.temporal_patch_size * vision.patch_size ** 2, generator=g)
    return {"input_ids": ids, "pixel_values": patches, "image_grid_thw": torch.tensor([[1, 4, 4]]),
            "mm_token_type_ids": (ids == cfg.image_token_id).long()}


# family: (model_type, class, config, PEFT target_modules, inputs[, class the adapter is made on]). Targets are "all-linear" plus, where a family
# has them, the input embeddings and the output head (tied in BERT, DistilBERT, Mamba; with a bias in Phi).
CASES = {
    # fixed: module names transformers renames in memory (vit.layers.0.attention.q_proj ↔
    # vit.encoder.layer.0.attention.attention.query; the patch-embedding conv too)
    "vit": ("vit", "ViTForImageClassification", dict(**VISION, intermediate_size=64, num_labels=3),
            ["query", "key", "value", "dense", "q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "classifier",
             "projection"], pixels),
    # fixed: DINOv2's SwiGLU gate_proj/up_proj are the two halves of its saved mlp.weights_in
    "dinov2-swiglu": ("dinov2", "Dinov2Model", dict(**VISION, mlp_ratio=2, use_swiglu_ffn=True), "all-linear", pixels),
    # fixed: the same under a classifier's dinov2. prefix (ldm.FUSED's owner pattern was matched at the start only)
    "dinov2-swiglu-classifier": ("dinov2", "Dinov2ForImageClassification",
                                 dict(**VISION, mlp_ratio=2, use_swiglu_ffn=True, num_labels=3), "all-linear", pixels),
    # fixed: model.language_model.… / model.visual.… saved as model.… / visual.… (a VLM, its head and embeddings)
    "qwen2_vl": ("qwen2_vl", "Qwen2VLForConditionalGeneration", QWEN2_VL,
                 ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "proj", "fc1",
                  "fc2", *EMBEDDINGS_AND_HEAD], qwen2_vl_inputs),
    # fixed: the towers and projectors transformers moves under model. (its mllama, qwen2_audio, video_llava, fuyu,
    # granite_speech mappings; Voxtral's is Qwen2-Audio's); text only: the merged towers are compared with PEFT's merge
    "mllama": ("mllama", "MllamaForConditionalGeneration", MLLAMA, "all-linear", token_ids),
    "qwen2_audio": ("qwen2_audio", "Qwen2AudioForConditionalGeneration",
                    dict(text_config=dict(model_type="qwen2", **LM), audio_config=dict(
                        AUDIO, d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32),
                         audio_token_index=120), "all-linear", token_ids),
    "voxtral": ("voxtral", "VoxtralForConditionalGeneration",
                dict(text_config=dict(model_type="llama", **LM), audio_config=dict(
                    AUDIO, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
                     audio_token_id=120), "all-linear", token_ids),
    "video_llava": ("video_llava", "VideoLlavaForConditionalGeneration",
                    dict(text_config=dict(model_type="llama", **LM), vision_config=CLIP_VISION,
                         image_token_index=120, video_token_index=121), "all-linear", token_ids),
    "fuyu": ("fuyu", "FuyuForCausalLM", dict(text_config=dict(model_type="persimmon", **ENCODER), **ENCODER,
                                             patch_size=4), "all-linear", token_ids),
    "granite_speech": ("granite_speech", "GraniteSpeechForConditionalGeneration",
                       dict(text_config=dict(model_type="granite", **LM),
                            encoder_config=dict(input_dim=8, num_layers=1, hidden_dim=16, feedforward_mult=2,
                                                num_heads=2, dim_head=8, output_dim=8, context_size=4),
                            projector_config=dict(model_type="blip_2_qformer", hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32,
                                                  encoder_hidden_size=16),
                            window_size=4, downsample_rate=2, audio_token_index=120), "all-linear", token_ids),
    # fixed: DINOv3 ViT's layers are model.layer.<i> in memory, saved as layer.<i>; its patch embeddings are not
    # under model. (so stripping a leading model. from every name does not do)
    "dinov3_vit": ("dinov3_vit", "DINOv3ViTModel", dict(VISION, intermediate_size=64),
                   ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "patch_embeddings"], pixels),
    # fixed: Swin's and Segformer's attention.self.query/…, intermediate.dense, Segformer's encoder.block.<s>.<b>
    # (with their patch-embedding and sequence-reduction convs)
    "swin": ("swin", "SwinForImageClassification",
             dict(image_size=16, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                  num_labels=3),
             ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "reduction", "projection", "classifier"],
             pixels),
    "segformer": ("segformer", "SegformerForSemanticSegmentation",
                  dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                       num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
                       decoder_hidden_size=32, num_labels=3),
                  r".*\.(q_proj|k_proj|v_proj|o_proj|fc1|fc2|sequence_reduction\.sequence_reduction|proj)$",
                  pixels_of(32)),
    # fixed: a text-only fine-tune of a multimodal checkpoint (built as the VLM, loaded as its causal LM):
    # model.layers.… in memory, model.language_model.layers.… saved
    "qwen3_5": ("qwen3_5", "Qwen3_5ForConditionalGeneration",
                dict(text_config=dict(LM, num_hidden_layers=2, head_dim=8,
                                      layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                                      linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8),
                     vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, out_hidden_size=32,
                                        num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                                        num_position_embeddings=16)),
                ["in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "o_proj", "down_proj", *EMBEDDINGS_AND_HEAD],
                token_ids, "Qwen3_5ForCausalLM"),
    # fixed: PEFT saves the targeted lm_head whole (base_layer.weight and .bias)
    "phi": ("phi", "PhiForCausalLM", {k: v for k, v in LM.items() if k != "num_key_value_heads"},
            ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", *EMBEDDINGS_AND_HEAD], token_ids),
    # fixed: tied output heads not called lm_head
    "bert": ("bert", "BertForMaskedLM", ENCODER, ["query", "key", "value", "dense", "word_embeddings", "decoder"],
             token_ids),
    "distilbert": ("distilbert", "DistilBertForMaskedLM",
                   dict(dim=32, n_layers=1, n_heads=4, hidden_dim=64, vocab_size=128, max_position_embeddings=32),
                   ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2", "vocab_transform", "word_embeddings",
                    "vocab_projector"], token_ids),
    # (not dt_proj: Mamba's forward reads its weight directly, so PEFT's unmerged model ignores a LoRA on it)
    "mamba": ("mamba", "MambaForCausalLM", dict(hidden_size=32, state_size=4, num_hidden_layers=1, vocab_size=128),
              ["in_proj", "x_proj", "embeddings", "lm_head"], token_ids),
    # representatives that worked: MoE (shared expert and router), fused qkv, encoder-decoder
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM",
                  dict(LM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=32), "all-linear", token_ids),
    "phi3": ("phi3", "Phi3ForCausalLM", dict(LM, pad_token_id=0), "all-linear", token_ids),
    "t5": ("t5", "T5ForConditionalGeneration",
           dict(d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8, vocab_size=128), "all-linear", seq2seq_ids),
}


def peft_model_on(base, cls, targets):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(cls.from_pretrained(base).eval(), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)).eval()


def output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return next(v for v in model(**inputs).to_tuple() if isinstance(v, torch.Tensor))


def tensors(path) -> dict[str, torch.Tensor]:
    return {name: t for file in sorted(path.glob("*.safetensors")) for name, t in load_file(file).items()}


@pytest.mark.parametrize("family", list(CASES))
def test_merge_computes_what_the_adapter_computes(tmp_path, family):
    import transformers

    model_type, cls_name, config, targets, inputs_of, *load_as = CASES[family]
    cls = getattr(transformers, load_as[0] if load_as else cls_name)
    base = tiny_transformers(tmp_path / "base", model_type, cls_name, **config)
    model = peft_model_on(base, cls, targets)
    model.save_pretrained(tmp_path / "a")
    inputs = inputs_of(model.base_model.model)
    expected = output(model, inputs)
    adapter = formats.read_adapter(tmp_path / "a")
    report = check(adapter, BaseModel.open(base).tensors)
    assert report.ok and report.matched == len(adapter.modules), report

    merged = engine.merge(base, [(adapter, 1.0)], tmp_path / "out", device="cpu")
    ours = cls.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(output(ours, inputs), expected, rtol=0, atol=1e-4)
    peft_merged = model.merge_and_unload().state_dict()
    if not merged.heads_untied:  # PEFT's merge of a tied head changes the shared tensor (see test_engine)
        for name, tensor in ours.state_dict().items():
            torch.testing.assert_close(tensor, peft_merged[name], rtol=0, atol=1e-6, msg=name)

    engine.subtract(tmp_path / "out", [(adapter, 1.0)], tmp_path / "restored", device="cpu")
    restored, original = tensors(tmp_path / "restored"), tensors(base)
    assert original.keys() <= restored.keys()
    for name, tensor in original.items():
        torch.testing.assert_close(restored[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_a_null_bias_in_the_config_is_peft_default(tmp_path):
    """A config saying "bias": null (which PEFT itself cannot load) is read as PEFT's default "none": Phi's saved lm_head
    bias is then part of the saved layer (equal to the base, replacing nothing), not a trained bias, which only a
    merge at weight 1 could take; an adapter loraops writes from it says "none"."""
    import transformers

    model_type, cls_name, config, targets, _ = CASES["phi"]
    base = tiny_transformers(tmp_path / "base", model_type, cls_name, **config)
    peft_model_on(base, getattr(transformers, cls_name), targets).save_pretrained(tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "bias": None}))
    adapter = formats.read_adapter(tmp_path / "a")
    engine.merge(base, [(adapter, 0.5)], tmp_path / "out", device="cpu")
    formats.write_adapter(adapter, tmp_path / "written")
    assert json.loads((tmp_path / "written" / "adapter_config.json").read_text())["bias"] == "none"
    # written back, the bias is still part of the saved layer (not flipped to a trained "lora_only" bias)
    engine.merge(base, [(formats.read_adapter(tmp_path / "written"), 0.5)], tmp_path / "again", device="cpu")
    torch.testing.assert_close(tensors(tmp_path / "out")["lm_head.bias"], tensors(base)["lm_head.bias"], rtol=0, atol=0)


def test_a_lora_on_t5s_encoder_embed_tokens_is_written_apart_from_shared(tmp_path):
    """T5 saves its embeddings once, as shared.weight; a LoRA on encoder.embed_tokens changes the encoder's lookup
    only. transformers 5 ties a T5's sides to shared by value (its config always says tie_word_embeddings: true; a
    side stored with values of its own loads apart), so the merge writes encoder.embed_tokens as shared's copy with
    the LoRA in, and the merged model computes the adapted model's output. It was refused ("stored once as
    shared.weight … cannot be merged"); by the manifest alone (no config: a registered base whose files are gone) it
    still is."""
    import transformers

    model_type, cls_name, config, _, inputs_of = CASES["t5"]
    cls = getattr(transformers, cls_name)
    base = tiny_transformers(tmp_path / "base", model_type, cls_name, **config)
    model = peft_model_on(base, cls, ["q", "encoder.embed_tokens"])
    model.save_pretrained(tmp_path / "a", save_embedding_layers=False)
    adapter, opened = formats.read_adapter(tmp_path / "a"), BaseModel.open(base)
    assert check(adapter, opened.tensors).missing == ["encoder.embed_tokens"]
    report = check(adapter, opened.tensors, config=opened.config)
    assert report.ok and report.tied_heads == [], report
    engine.merge(base, [(adapter, 1.0)], tmp_path / "out", device="cpu")
    inputs = inputs_of(model.base_model.model)
    merged, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(output(merged.eval(), inputs), output(model, inputs), rtol=0, atol=1e-4)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    written, stored = tensors(tmp_path / "out"), tensors(base)
    assert written.keys() == stored.keys() | {"encoder.embed_tokens.weight"}
    assert torch.equal(written["shared.weight"], stored["shared.weight"])
