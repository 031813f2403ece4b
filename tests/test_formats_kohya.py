"""kohya/sd-scripts files written by the tests, read and bound to bases with the matching module names."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

import factories
from loraops import st
from loraops.check import bind
from loraops.formats import detect, kohya_name, read_adapter

pytestmark = pytest.mark.no_registry  # never opens a registry: skipped in the PostgreSQL pass

# The conv/embedding test model's modules, in kohya form (a plain model: the lora_unet_ prefix).
CONV_MODULES = {
    "lora_unet_proj": ((16,), (24,)),
    "lora_unet_conv1": ((4, 1, 1), (8, 1, 1)),
    "lora_unet_conv3": ((8, 3, 3), (6, 1, 1)),
}


@pytest.fixture
def conv_base(tmp_path):
    return factories.save_state_dict(factories.conv_embedding_model(), tmp_path / "base.safetensors")


def test_read_and_bind_linear_and_conv(conv_base, tmp_path):
    path = factories.kohya_file(tmp_path / "k.safetensors", CONV_MODULES, rank=4, alpha=2.0,
                                metadata={"ss_output_name": "style", "ss_base_model_version": "sd_v1"})
    assert detect(path) == "kohya"
    adapter = read_adapter(path)
    assert adapter.format == "kohya" and not adapter.names_resolved
    assert adapter.metadata["ss_output_name"] == "style" and adapter.metadata["ss_network_dim"] == "4"
    assert sorted(adapter.modules) == sorted(CONV_MODULES)
    assert all(m.alpha == 2.0 and m.scale == 0.5 for m in adapter.modules.values())
    bound = bind(adapter, st.read_header(conv_base).tensors)
    assert bound.names_resolved and sorted(bound.modules) == ["conv1", "conv3", "proj"]
    conv3 = bound.modules["conv3"]
    assert conv3.kind == "conv" and conv3.weight_shape == (6, 8, 3, 3)
    down, up = conv3.A, conv3.B
    expected = 0.5 * (up.reshape(6, 4) @ down.reshape(4, -1)).reshape(6, 8, 3, 3)
    torch.testing.assert_close(conv3.delta(), expected)
    # The composition of the two convolutions is the k×k conv with that weight.
    x = torch.randn(1, 8, 5, 5)
    composed = 0.5 * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=1), up)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, conv3.delta(), padding=1), composed, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha", [None, 0.0])
def test_missing_or_zero_alpha_means_rank(alpha, tmp_path):
    path = factories.kohya_file(tmp_path / "k.safetensors", {"lora_unet_proj": ((16,), (24,))}, rank=8, alpha=alpha)
    module = read_adapter(path).modules["lora_unet_proj"]
    assert module.alpha == 8 and module.scale == 1.0


def test_a_missing_alpha_is_the_rank_whatever_the_metadata_says_and_a_note_says_so(tmp_path, caplog):
    """sd-scripts' networks/lora.py reads a module without .alpha at alpha = its rank ("support old LoRA without
    alpha") and never reads ss_network_alpha; loraops does the same, and notes it where the metadata said another
    alpha (inspect's table showed scale 1 without a word). No note where it agrees, is no number or alpha= is given."""
    import logging

    modules = {**CONV_MODULES, "lora_unet_other": ((16,), (24,))}
    path = factories.kohya_file(tmp_path / "k.safetensors", modules, rank=4, alpha=None,
                                metadata={"ss_network_alpha": "1.0"})
    with caplog.at_level(logging.INFO, logger="loraops"):
        adapter = read_adapter(path)
    assert {(m.alpha, m.scale) for m in adapter.modules.values()} == {(4, 1.0)}
    assert caplog.messages == [f"{path}: no .alpha tensor in 3 of 4 modules (lora_unet_conv1, rank 4): they are read "
                               "at alpha = rank (scale 1), as kohya's sd-scripts reads them, not at the metadata's "
                               "ss_network_alpha 1"]  # (the 3×3 conv's alpha in training was conv_alpha)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loraops"):
        read_adapter(path, alpha=2)
        for said in ("4", "Dynamic"):
            read_adapter(factories.kohya_file(tmp_path / f"{said}.safetensors", modules, rank=4, alpha=None,
                                              metadata={"ss_network_alpha": said}))
        read_adapter(factories.kohya_file(tmp_path / "stored.safetensors", modules, rank=4, alpha=1.0))
    assert caplog.messages == []


def test_explicit_alpha_replaces_stored(tmp_path):
    path = factories.kohya_file(tmp_path / "k.safetensors", {"lora_unet_proj": ((16,), (24,))}, rank=8, alpha=4)
    assert read_adapter(path, alpha=16).modules["lora_unet_proj"].scale == 2.0


def test_bind_to_diffusers_pipeline_and_sdxl_text_encoders(tmp_path):
    def info(*shape):
        return SimpleNamespace(shape=shape)

    manifest = {
        "unet.down_blocks.0.attentions.0.proj_in.weight": info(8, 16),
        "unet.down_blocks.0.attentions.0.proj_in.bias": info(8),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight": info(12, 12),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight": info(20, 20),
    }
    modules = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": ((16, 1, 1), (8, 1, 1)),  # 1×1 conv factors on a Linear
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ((12,), (12,)),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": ((20,), (20,)),
    }
    bound = bind(read_adapter(factories.kohya_file(tmp_path / "k.safetensors", modules)), manifest)
    assert sorted(bound.modules) == sorted(name[: -len(".weight")] for name in manifest if name.endswith("weight"))
    proj_in = bound.modules["unet.down_blocks.0.attentions.0.proj_in"]
    assert proj_in.kind == "linear" and proj_in.weight_shape == (8, 16)


def test_bind_to_single_file_sd_checkpoint(tmp_path):
    manifest = {
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": SimpleNamespace(shape=(32, 12)),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": SimpleNamespace(shape=(8, 16, 1, 1)),
    }
    modules = {
        "lora_te_text_model_encoder_layers_0_mlp_fc1": ((12,), (32,)),
        "lora_unet_input_blocks_1_1_proj_in": ((16,), (8,)),  # linear factors on a 1×1 conv
    }
    bound = bind(read_adapter(factories.kohya_file(tmp_path / "k.safetensors", modules)), manifest)
    proj_in = bound.modules["model.diffusion_model.input_blocks.1.1.proj_in"]
    assert proj_in.kind == "conv" and proj_in.delta().shape == (8, 16, 1, 1)


def test_kohya_name():
    assert kohya_name("down_blocks.0.attentions.0.proj_in", "unet") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert kohya_name("transformer_blocks.0.attn.to_q", "transformer") == "lora_unet_transformer_blocks_0_attn_to_q"
    assert kohya_name("text_model.encoder.layers.0.mlp.fc1", "text_encoder") == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert kohya_name("text_model.encoder.layers.0.mlp.fc1", "text_encoder_1").startswith("lora_te1_")
    assert kohya_name("text_model.encoder.layers.0.mlp.fc1", "text_encoder_2").startswith("lora_te2_")
    assert kohya_name("model.layers.0.self_attn.q_proj") == "lora_unet_model_layers_0_self_attn_q_proj"


def test_kohya_writer_refuses_name_collisions(tmp_path):
    from dataclasses import replace

    from loraops.errors import InvalidInputError
    from loraops.formats import write_adapter

    adapter = read_adapter(factories.kohya_file(tmp_path / "k.safetensors", {"lora_unet_proj": ((16,), (24,))}))
    module = adapter.modules.pop("lora_unet_proj")
    adapter = replace(adapter, names_resolved=True,
                      modules={"a.b_c": replace(module, name="a.b_c"), "a_b.c": replace(module, name="a_b.c")})
    with pytest.raises(InvalidInputError, match="collide under kohya naming"):
        write_adapter(adapter, tmp_path / "out.safetensors", "kohya")
    assert not (tmp_path / "out.safetensors").exists()


def _tucker_file(path, *, rank=4, dtype=torch.float32, down_shape=None, mid_shape=None, mid_value=None):
    """A LyCORIS LoCon file with the conv_embedding_model's 3×3 conv (8 → 6) in Tucker form: a 1×1 down, a k×k mid,
    a 1×1 up, as LyCORIS' LoConModule(use_tucker=True) saves it."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    mid = torch.randn(mid_shape or (rank, rank, 3, 3), generator=g)
    if mid_value is not None:
        mid.view(-1)[0] = mid_value
    tensors = {
        "lora_unet_conv3.lora_down.weight": torch.randn(down_shape or (rank, 8, 1, 1), generator=g),
        "lora_unet_conv3.lora_mid.weight": mid,
        "lora_unet_conv3.lora_up.weight": torch.randn(6, rank, 1, 1, generator=g) * 0.1,
        "lora_unet_conv3.alpha": torch.tensor(2.0),
        "lora_unet_proj.lora_down.weight": torch.randn(rank, 16, generator=g),
        "lora_unet_proj.lora_up.weight": torch.randn(24, rank, generator=g),
    }
    save_file({k: v.to(dtype) if v.dim() else v for k, v in tensors.items()}, str(path),
              metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "locon", "use_tucker": true}'})
    return path, {k: v.to(dtype).double() for k, v in tensors.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])  # float8 LoRAs circulate too
def test_tucker_locon_reads_as_the_conv_it_equals(conv_base, dtype, tmp_path):
    """LyCORIS' Tucker LoCon runs down (1×1), mid (k×k, the layer's padding) and up (1×1) convolutions; loraops reads
    it as the one plain LoRA they compose to, so check/merge/resize treat it as kohya LoCon."""
    from loraops import engine

    path, raw = _tucker_file(tmp_path / "tucker.safetensors", dtype=dtype)
    adapter = read_adapter(path)
    conv3 = adapter.modules["lora_unet_conv3"]
    assert conv3.A.shape == (4, 8, 3, 3) and conv3.rank == 4 and conv3.scale == 0.5
    assert conv3.A.dtype == torch.float32  # the composition is not rounded back to bfloat16
    assert adapter.dtype == dtype  # the file's
    assert "lora_unet_conv3.lora_mid.weight" in conv3.source_keys
    assert read_adapter(path, values=False).modules["lora_unet_conv3"].A.shape == (4, 8, 3, 3)  # inspect and check
    conv = torch.nn.functional.conv2d
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    three_convs = conv(conv(conv(x, raw["lora_unet_conv3.lora_down.weight"]), raw["lora_unet_conv3.lora_mid.weight"],
                            padding=1), raw["lora_unet_conv3.lora_up.weight"])
    torch.testing.assert_close(conv(x, conv3.delta(dtype=torch.float64), padding=1), 0.5 * three_convs,
                               rtol=1e-6, atol=1e-7)
    # merged into the base: the merged layer computes the base layer plus the three convolutions
    engine.merge(conv_base, [(adapter, 1.0)], tmp_path / "out.safetensors", device="cpu", precise=True)
    merged, base = st.load_tensors(st.read_header(tmp_path / "out.safetensors")), st.load_tensors(st.read_header(conv_base))
    torch.testing.assert_close(conv(x, merged["conv3.weight"].double(), padding=1),
                               conv(x, base["conv3.weight"].double(), padding=1) + 0.5 * three_convs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"down_shape": (4, 8, 3, 3)}, "needs lora_unet_conv3.lora_down.weight r×in×1×1 and lora_unet_conv3.lora_mid.weight r×r×k×k"),
    ({"mid_shape": (4, 3, 3, 3)}, "has 4×8×1×1 and 4×3×3×3"),
    ({"mid_shape": (5, 4, 3, 3)}, "rank mismatch: A has rank 5, B has rank 4"),
    ({"mid_value": float("nan")}, "tensor 'lora_unet_conv3.lora_mid.weight' contains NaN or Inf"),
])
def test_malformed_tucker_is_a_one_line_error(change, message, tmp_path):
    from loraops.errors import InvalidInputError

    path, _ = _tucker_file(tmp_path / "bad.safetensors", **change)
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        read_adapter(path)


def test_a_zero_alpha_is_the_rank_and_a_note_says_comfyui_differs(tmp_path, caplog):
    """An .alpha of 0 is read as alpha = r (sd-scripts' and LyCORIS' rule), where ComfyUI computes 0/r and applies
    the module at scale 0: a note says so (a merge checked in ComfyUI rendered otherwise without a word). Not with
    alpha= given, nor for a nonzero alpha."""
    import logging

    modules = {"lora_unet_a": ((16,), (24,)), "lora_unet_b": ((16,), (24,))}
    path = factories.kohya_file(tmp_path / "k.safetensors", modules, rank=4, alpha=0.0)
    with caplog.at_level(logging.INFO, logger="loraops"):
        adapter = read_adapter(path)
    assert {(m.alpha, m.scale) for m in adapter.modules.values()} == {(4, 1.0)}
    assert caplog.messages == [f"{path}: .alpha is 0 in 2 of 2 modules (lora_unet_a): read at alpha = rank (scale 1), "
                               "as kohya's sd-scripts and LyCORIS read it; ComfyUI applies such a module at scale 0"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loraops"):
        read_adapter(path, alpha=2)
        read_adapter(factories.kohya_file(tmp_path / "one.safetensors", modules, rank=4, alpha=1.0))
    assert caplog.messages == []
