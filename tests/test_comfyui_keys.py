"""ComfyUI key-mapping parity (sweep 35b): LoRAs in each key style ComfyUI's model_lora_keys_unet /
model_lora_keys_clip map, merged by loraops into tiny single-file checkpoints, equal W + (alpha/r)·up@down applied
where ComfyUI applies it (Comfy-Org/ComfyUI comfy/lora.py, comfy/utils.py unet_to_diffusers / flux_to_diffusers /
mmdit_to_diffusers, comfy/weight_adapter/lora.py: alpha/rank, no .alpha → 1, fused targets by row offset, LoCon
lora_mid). The reference is re-implemented here from ComfyUI's source; loraops is only called to merge."""
from __future__ import annotations

import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraops import merging

# ---------------------------------------------------------------- ComfyUI's tables (re-implemented)
RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
ATTN = ("proj_in", "proj_out")
TBLOCK = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
          "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
BASIC = {"input_blocks.0.0": "conv_in", "out.2": "conv_out", "time_embed.0": "time_embedding.linear_1",
         "time_embed.2": "time_embedding.linear_2"}


def unet_to_diffusers(cfg):
    """comfy.utils.unet_to_diffusers, weights only: diffusers module path -> ldm module path."""
    nrb, depth, depth_out = cfg["num_res_blocks"], list(cfg["transformer_depth"]), list(cfg["transformer_depth_output"])
    m = {}
    for x in range(len(nrb)):
        n = 1 + (nrb[x] + 1) * x
        for i in range(nrb[x]):
            m.update({f"down_blocks.{x}.resnets.{i}.{d}": f"input_blocks.{n}.0.{l}" for l, d in RESNET.items()})
            nt = depth.pop(0)
            if nt:
                m.update({f"down_blocks.{x}.attentions.{i}.{b}": f"input_blocks.{n}.1.{b}" for b in ATTN})
                m.update({f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}": f"input_blocks.{n}.1.transformer_blocks.{t}.{b}"
                          for t in range(nt) for b in TBLOCK})
            n += 1
        m[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    m.update({f"mid_block.attentions.0.{b}": f"middle_block.1.{b}" for b in ATTN})
    m.update({f"mid_block.attentions.0.transformer_blocks.{t}.{b}": f"middle_block.1.transformer_blocks.{t}.{b}"
              for t in range(cfg["transformer_depth_middle"]) for b in TBLOCK})
    for i, n in enumerate([0, 2]):
        m.update({f"mid_block.resnets.{i}.{d}": f"middle_block.{n}.{l}" for l, d in RESNET.items()})
    rev = list(reversed(nrb))
    for x in range(len(rev)):
        n, l = (rev[x] + 1) * x, rev[x] + 1
        for i in range(l):
            c = 1
            m.update({f"up_blocks.{x}.resnets.{i}.{d}": f"output_blocks.{n}.0.{k}" for k, d in RESNET.items()})
            nt = depth_out.pop()
            if nt:
                c += 1
                m.update({f"up_blocks.{x}.attentions.{i}.{b}": f"output_blocks.{n}.1.{b}" for b in ATTN})
                m.update({f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{b}": f"output_blocks.{n}.1.transformer_blocks.{t}.{b}"
                          for t in range(nt) for b in TBLOCK})
            if i == l - 1:
                m[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    m.update({d: l for l, d in BASIC.items()})
    return m


def flux_to_diffusers(h, nd, ns):
    """comfy.utils.flux_to_diffusers (weights): diffusers path -> (BFL path, row offset or None)."""
    m = {}
    for i in range(nd):
        f, t = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, p in enumerate("qkv"):
            m[f"{f}.attn.to_{p}"] = (f"{t}.img_attn.qkv", (j * h, h))
            m[f"{f}.attn.add_{p}_proj"] = (f"{t}.txt_attn.qkv", (j * h, h))
        for d, o in {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                     "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                     "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}.items():
            m[f"{f}.{d}"] = (f"{t}.{o}", None)
    for i in range(ns):
        f, t = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, p in enumerate("qkv"):
            m[f"{f}.attn.to_{p}"] = (f"{t}.linear1", (j * h, h))
        m[f"{f}.proj_mlp"] = (f"{t}.linear1", (3 * h, 4 * h))
        m[f"{f}.norm.linear"] = (f"{t}.modulation.lin", None)
        m[f"{f}.proj_out"] = (f"{t}.linear2", None)
    m.update({d: (o, None) for o, d in {"final_layer.linear": "proj_out", "img_in": "x_embedder", "txt_in": "context_embedder",
              "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1", "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
              "vector_in.in_layer": "time_text_embed.text_embedder.linear_1", "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
              "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
              "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}.items()})
    return m


def mmdit_to_diffusers(depth):
    """comfy.utils.mmdit_to_diffusers (weights, without the swapped adaLNs): offset = depth * 64."""
    off, m = depth * 64, {}
    for i in range(depth):
        f, t = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for j, p in enumerate("qkv"):
            m[f"{f}.attn.to_{p}"] = (f"{t}.x_block.attn.qkv", (j * off, off))
            m[f"{f}.attn.add_{p}_proj"] = (f"{t}.context_block.attn.qkv", (j * off, off))
            m[f"{f}.attn2.to_{p}"] = (f"{t}.x_block.attn2.qkv", (j * off, off))
        for o, d in {"context_block.attn.proj": "attn.to_add_out", "context_block.mlp.fc1": "ff_context.net.0.proj",
                     "context_block.mlp.fc2": "ff_context.net.2", "x_block.adaLN_modulation.1": "norm1.linear",
                     "x_block.attn.proj": "attn.to_out.0", "x_block.attn2.proj": "attn2.to_out.0",
                     "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2"}.items():
            m[f"{f}.{d}"] = (f"{t}.{o}", None)
    m.update({d: (o, None) for o, d in {"context_embedder": "context_embedder", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
              "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2", "x_embedder.proj": "pos_embed.proj",
              "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1", "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
              "final_layer.linear": "proj_out"}.items()})
    return m


# ---------------------------------------------------------------- tiny checkpoints (ComfyUI's state-dict names)
class Gen:
    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape):
        return torch.randn(*shape, generator=self.g) * 0.5


def linear(t, g, name, o, i):
    t[f"{name}.weight"], t[f"{name}.bias"] = g(o, i), g(o)


SD15 = dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)


def sd15_checkpoint(g):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), cross_attention_dim=16,
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8)
    d2l = unet_to_diffusers(SD15)
    t = {}
    for k, v in unet.state_dict().items():
        module, _, leaf = k.rpartition(".")
        t[f"model.diffusion_model.{d2l.get(module, module)}.{leaf}"] = v.clone()
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
        t[f"cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.{n}.weight"] = g(16, 16)
    t["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] = g(32, 16)
    t["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc2.weight"] = g(16, 32)
    t["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = g(50, 16)
    return t, {v: k for k, v in d2l.items()}


def flux_checkpoint(g, h=8):
    t = {}
    for i in range(2):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            linear(t, g, p + "mod.lin", 6 * h, h), linear(t, g, p + "attn.qkv", 3 * h, h), linear(t, g, p + "attn.proj", h, h)
            linear(t, g, p + "mlp.0", 4 * h, h), linear(t, g, p + "mlp.2", h, 4 * h)
            t[p + "attn.norm.query_norm.scale"], t[p + "attn.norm.key_norm.scale"] = torch.ones(h // 2), torch.ones(h // 2)
        p = f"single_blocks.{i}."
        linear(t, g, p + "linear1", 7 * h, h), linear(t, g, p + "linear2", h, 5 * h), linear(t, g, p + "modulation.lin", 3 * h, h)
    for name, i in (("img_in", 16), ("txt_in", 12), ("time_in.in_layer", 16), ("time_in.out_layer", h), ("vector_in.in_layer", 12),
                    ("vector_in.out_layer", h), ("guidance_in.in_layer", 16), ("guidance_in.out_layer", h)):
        linear(t, g, name, h, i)
    linear(t, g, "final_layer.linear", 16, h), linear(t, g, "final_layer.adaLN_modulation.1", 2 * h, h)
    return t


def sd3_checkpoint(g, depth=2):
    h, t = 64 * depth, {}
    for i in range(depth):
        p, last = f"joint_blocks.{i}.", i == depth - 1
        linear(t, g, p + "x_block.adaLN_modulation.1", (9 if i == 0 else 6) * h, h)
        for a in ("attn",) + (("attn2",) if i == 0 else ()):
            linear(t, g, p + f"x_block.{a}.qkv", 3 * h, h), linear(t, g, p + f"x_block.{a}.proj", h, h)
        linear(t, g, p + "x_block.mlp.fc1", 4 * h, h), linear(t, g, p + "x_block.mlp.fc2", h, 4 * h)
        linear(t, g, p + "context_block.adaLN_modulation.1", (2 if last else 6) * h, h)
        linear(t, g, p + "context_block.attn.qkv", 3 * h, h)
        if not last:
            linear(t, g, p + "context_block.attn.proj", h, h)
            linear(t, g, p + "context_block.mlp.fc1", 4 * h, h), linear(t, g, p + "context_block.mlp.fc2", h, 4 * h)
    t["x_embedder.proj.weight"], t["pos_embed"] = g(h, 16, 2, 2), g(1, 16, h)
    for name, i in (("context_embedder", 32), ("t_embedder.mlp.0", 16), ("t_embedder.mlp.2", h), ("y_embedder.mlp.0", 32), ("y_embedder.mlp.2", h)):
        linear(t, g, name, h, i)
    linear(t, g, "final_layer.linear", 64, h), linear(t, g, "final_layer.adaLN_modulation.1", 2 * h, h)
    return t


def wan_checkpoint(g, d=16):
    t = {}
    for b in range(2):
        for a in ("self_attn", "cross_attn"):
            for n in "qkvo":
                linear(t, g, f"blocks.{b}.{a}.{n}", d, d)
        linear(t, g, f"blocks.{b}.cross_attn.k_img", d, d), linear(t, g, f"blocks.{b}.cross_attn.v_img", d, d)
        linear(t, g, f"blocks.{b}.ffn.0", 2 * d, d), linear(t, g, f"blocks.{b}.ffn.2", d, 2 * d)
        t[f"blocks.{b}.modulation"] = g(1, 6, d)
    t["patch_embedding.weight"] = g(d, 16, 1, 2, 2)
    for name, o, i in (("text_embedding.0", d, 12), ("text_embedding.2", d, d), ("time_embedding.0", d, 8),
                       ("time_embedding.2", d, d), ("time_projection.1", 6 * d, d), ("head.head", 64, d)):
        linear(t, g, name, o, i)
    return t


def qwen_checkpoint(g, d=16):
    t = {}
    for b in range(2):
        for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            linear(t, g, f"transformer_blocks.{b}.attn.{n}", d, d)
        for s in ("img", "txt"):
            linear(t, g, f"transformer_blocks.{b}.{s}_mod.1", 6 * d, d)
            linear(t, g, f"transformer_blocks.{b}.{s}_mlp.net.0.proj", 4 * d, d), linear(t, g, f"transformer_blocks.{b}.{s}_mlp.net.2", d, 4 * d)
    linear(t, g, "img_in", d, 16), linear(t, g, "txt_in", d, 12), linear(t, g, "norm_out.linear", 2 * d, d), linear(t, g, "proj_out", 16, d)
    return t


def hunyuan_original_checkpoint(g, h=8):
    """HunyuanVideo in Tencent's names; ComfyUI renames them on load (supported_models.HunyuanVideo.process_unet_state_dict)
    and maps diffusion-pipe's `transformer.<those names>` back to them (model_lora_keys_unet, HunyuanVideo branch)."""
    t = {}
    for s in ("img", "txt"):
        p = f"double_blocks.0.{s}_"
        linear(t, g, p + "mod.linear", 6 * h, h), linear(t, g, p + "attn_qkv", 3 * h, h), linear(t, g, p + "attn_proj", h, h)
        linear(t, g, p + "mlp.fc1", 4 * h, h), linear(t, g, p + "mlp.fc2", h, 4 * h)
    linear(t, g, "single_blocks.0.linear1", 7 * h, h), linear(t, g, "single_blocks.0.linear2", h, 5 * h)
    linear(t, g, "single_blocks.0.modulation.linear", 3 * h, h)
    r = "txt_in.individual_token_refiner.blocks.0."
    t[r + "norm1.weight"] = torch.ones(h)
    linear(t, g, r + "self_attn_qkv", 3 * h, h), linear(t, g, r + "self_attn_proj", h, h)
    linear(t, g, r + "mlp.fc1", 4 * h, h), linear(t, g, r + "mlp.fc2", h, 4 * h), linear(t, g, r + "adaLN_modulation.1", 2 * h, h)
    linear(t, g, "final_layer.linear", 16, h), linear(t, g, "final_layer.adaLN_modulation.1", 2 * h, h)
    return t


# ---------------------------------------------------------------- adapters and ComfyUI's merge
def factors(g, shape, r):
    if len(shape) == 2:
        return g(shape[0], r), g(r, shape[1])
    return g(shape[0], r, *[1] * (len(shape) - 2)), g(r, *shape[1:])


def build(g, targets, base, kind):
    """targets: lora key -> (base tensor name, (row0, rows) or None). Distinct random factors and alpha per module."""
    up_name, down_name = ("lora_up.weight", "lora_down.weight") if kind == "kohya" else ("lora_B.weight", "lora_A.weight")
    lora, expected = {}, {}
    for i, (key, (tensor, rows)) in enumerate(sorted(targets.items())):
        shape = list(base[tensor].shape)
        if rows:
            shape[0] = rows[1]
        r = 2 + i % 3
        up, down = factors(g, shape, r)
        lora[f"{key}.{up_name}"], lora[f"{key}.{down_name}"] = up, down
        scale = 1.0
        if i % 4:  # some modules without .alpha: ComfyUI's scale 1
            alpha = float(1 + i % 7)
            lora[f"{key}.alpha"], scale = torch.tensor(alpha), alpha / r
        w = expected.setdefault(tensor, base[tensor].double().clone())
        part = w[rows[0]:rows[0] + rows[1]] if rows else w
        part += scale * (up.double().flatten(1) @ down.double().flatten(1)).reshape(part.shape)
    return lora, expected


def merged_equals_comfyui(tmp_path, base, lora, expected):
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(lora, str(tmp_path / "lora.safetensors"))
    merging.merge(str(tmp_path / "base.safetensors"), [str(tmp_path / "lora.safetensors")], str(tmp_path / "out.safetensors"),
                  record=False, precise=True)
    out = load_file(str(tmp_path / "out.safetensors"))
    assert out.keys() == base.keys()
    for name, weight in base.items():
        want = expected.get(name, weight.double())
        assert torch.allclose(out[name].double(), want, atol=2e-6, rtol=0), name  # (untouched ones bit for bit)


def two_d(base, prefix=""):
    return [k[len(prefix):-7] for k, v in base.items() if k.startswith(prefix) and k.endswith(".weight") and v.dim() >= 2]


# ---------------------------------------------------------------- the cases
def sd15_case(style, g):
    base, l2d = sd15_checkpoint(g)
    P = "model.diffusion_model."
    ldm = [n for n in two_d(base, P)]
    if style == "lora_te_":
        return base, {f"lora_te_text_model_encoder_layers_0_{m}": (f"cond_stage_model.transformer.text_model.encoder.layers.0.{m.replace('self_attn_', 'self_attn.').replace('mlp_', 'mlp.')}.weight", None)
                      for m in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}, "kohya"
    if style == "lora_unet_<ldm>":
        return base, {f"lora_unet_{n.replace('.', '_')}": (f"{P}{n}.weight", None) for n in ldm}, "kohya"
    if style == "diffusion_model.<ldm>":
        return base, {f"diffusion_model.{n}": (f"{P}{n}.weight", None) for n in ldm}, "peft"
    pre = {"lora_unet_<diffusers>": "lora_unet_", "lycoris_<diffusers>": "lycoris_"}[style]
    return base, {pre + l2d[n].replace(".", "_"): (f"{P}{n}.weight", None) for n in ldm if n in l2d}, "kohya"


def flux_case(style, g, prefix):
    base = {prefix + k: v for k, v in flux_checkpoint(g).items()}
    if style in ("lora_unet_<BFL>", "diffusion_model.<BFL>"):
        pre = "lora_unet_" if style.startswith("lora") else "diffusion_model."
        return base, {pre + (n.replace(".", "_") if pre == "lora_unet_" else n): (f"{prefix}{n}.weight", None)
                      for n in two_d(base, prefix) if not n.startswith("final_layer.adaLN")}, "kohya" if pre == "lora_unet_" else "peft"
    d = flux_to_diffusers(8, 2, 2)
    name = {"transformer.<diffusers>": lambda n: f"transformer.{n}", "lora_transformer_<diffusers>": lambda n: "lora_transformer_" + n.replace(".", "_"),
            "lycoris_<diffusers>": lambda n: "lycoris_" + n.replace(".", "_"), "<diffusers> (DiffSynth)": lambda n: n}[style]
    kind = "peft" if style in ("transformer.<diffusers>", "<diffusers> (DiffSynth)") else "kohya"
    return base, {name(n): (f"{prefix}{o}.weight", rows) for n, (o, rows) in d.items()}, kind


CASES = [("sd15", s) for s in ("lora_unet_<diffusers>", "lora_unet_<ldm>", "lycoris_<diffusers>", "diffusion_model.<ldm>", "lora_te_")]
CASES += [("flux" + p, s) for p in ("", "-mdm") for s in ("lora_unet_<BFL>", "diffusion_model.<BFL>", "transformer.<diffusers>",
                                                          "lora_transformer_<diffusers>", "lycoris_<diffusers>", "<diffusers> (DiffSynth)")]
CASES += [("sd3", "transformer.<diffusers>"), ("sd3", "lora_unet_<orig>"), ("wan", "lora_unet_<orig>"), ("wan", "diffusion_model.<orig>"),
          ("qwen", "transformer.<orig>"), ("qwen", "<orig>"), ("hunyuan", "transformer.<original>"), ("hunyuan", "lora_unet_<original>")]


@pytest.mark.parametrize("family,style", CASES, ids=[f"{f}:{s}" for f, s in CASES])
def test_merge_equals_comfyui(tmp_path, family, style):
    g = Gen(zlib.crc32(f"{family}|{style}".encode()) % 10_000)
    if family == "sd15":
        base, targets, kind = sd15_case(style, g)
    elif family.startswith("flux"):
        base, targets, kind = flux_case(style, g, "model.diffusion_model." if family.endswith("mdm") else "")
    elif family == "sd3":
        base = sd3_checkpoint(g)
        if style == "lora_unet_<orig>":
            targets, kind = {"lora_unet_" + n.replace(".", "_"): (f"{n}.weight", None) for n in two_d(base)}, "kohya"
        else:
            targets, kind = {f"transformer.{n}": (f"{o}.weight", rows) for n, (o, rows) in mmdit_to_diffusers(2).items()
                             if f"{o}.weight" in base}, "peft"
    elif family == "wan":
        base = wan_checkpoint(g)
        names = [n for n in two_d(base) if n != "patch_embedding"]
        targets = {("lora_unet_" + n.replace(".", "_") if style.startswith("lora") else f"diffusion_model.{n}"): (f"{n}.weight", None) for n in names}
        kind = "kohya" if style.startswith("lora") else "peft"
    elif family == "qwen":
        base = qwen_checkpoint(g)
        targets, kind = {(f"transformer.{n}" if style.startswith("transformer") else n): (f"{n}.weight", None) for n in two_d(base)}, "peft"
    else:  # hunyuan, original names (bare file)
        base = hunyuan_original_checkpoint(g)
        if style.startswith("transformer"):
            targets, kind = {f"transformer.{n}": (f"{n}.weight", None) for n in two_d(base)}, "peft"
        else:  # musubi-tuner's names; ComfyUI maps those whose underscored form equals its own (qkv, proj, linear1/2, final)
            names = [n for n in two_d(base) if not any(s in n for s in ("mod.linear", "mlp.fc", "modulation.linear"))]
            targets, kind = {"lora_unet_" + n.replace(".", "_"): (f"{n}.weight", None) for n in names}, "kohya"
    lora, expected = build(g, targets, base, kind)
    if kind == "peft" and not any(k.endswith(".alpha") for k in lora):
        pytest.skip("needs an alpha")
    merged_equals_comfyui(tmp_path, base, lora, expected)


def test_locon_tucker_mid_equals_comfyui(tmp_path):
    """comfy/weight_adapter/lora.py: a lora_mid composes as mm(downᵀ, midᵀ) reshaped [in, r, kh, kw] and transposed."""
    g = Gen(7)
    base = {"model.diffusion_model.input_blocks.1.0.in_layers.2.weight": g(8, 8, 3, 3),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": g(8, 8, 1, 1)}
    r, x = 3, "lora_unet_input_blocks_1_0_in_layers_2"
    down, mid, up = g(r, 8, 1, 1), g(r, r, 3, 3), g(8, r, 1, 1)
    lora = {f"{x}.lora_down.weight": down, f"{x}.lora_mid.weight": mid, f"{x}.lora_up.weight": up, f"{x}.alpha": torch.tensor(2.0)}
    mat2 = (down.double().transpose(0, 1).flatten(1) @ mid.double().transpose(0, 1).flatten(1)).reshape(8, r, 3, 3).transpose(0, 1)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    expected = {key: base[key].double() + (2.0 / r) * (up.double().flatten(1) @ mat2.flatten(1)).reshape(8, 8, 3, 3)}
    merged_equals_comfyui(tmp_path, base, lora, expected)


# ---------------------------------------------------------------- key styles ComfyUI applies that loraops refused once
@pytest.mark.parametrize("style", ["transformer.", "lycoris_"])
def test_dit_names_bind_to_a_checkpoint_comfyui_saved(tmp_path, style):
    """ai-toolkit's and diffusion-pipe's transformer.… and SimpleTuner's lycoris_… names of a DiT LoRA (Qwen-Image)
    on its checkpoint behind model.diffusion_model. (ComfyUI's CheckpointSave), as ComfyUI's key map takes them:
    they bound to the bare checkpoint only ("not in base")."""
    g = Gen(35)
    prefix = "model.diffusion_model."
    base = {prefix + k: v for k, v in qwen_checkpoint(g).items()}
    name = (lambda n: f"transformer.{n}") if style == "transformer." else (lambda n: "lycoris_" + n.replace(".", "_"))
    targets = {name(n): (f"{prefix}{n}.weight", None) for n in two_d(base, prefix)}
    lora, expected = build(g, targets, base, "peft" if style == "transformer." else "kohya")
    merged_equals_comfyui(tmp_path, base, lora, expected)


def test_videox_fun_double_underscore_names_bind(tmp_path):
    """VideoX-Fun's Wan LoRAs name modules lora_unet__blocks_0_… (ComfyUI's convert_lora_wan_fun reads them as
    lora_unet_…), on a bare checkpoint and one behind model.diffusion_model."""
    for prefix in ("", "model.diffusion_model."):
        g = Gen(36)
        base = {prefix + k: v for k, v in wan_checkpoint(g).items()}
        targets = {"lora_unet__" + n.replace(".", "_"): (f"{prefix}{n}.weight", None)
                   for n in two_d(base, prefix) if n != "patch_embedding"}
        lora, expected = build(g, targets, base, "kohya")
        (tmp_path / prefix).mkdir(exist_ok=True)
        merged_equals_comfyui(tmp_path / prefix, base, lora, expected)


def test_two_d_factors_on_a_kxk_conv_are_its_flattened_factors(tmp_path):
    """A LoRA stored with 2-D factors (out×r, r×in·k·k) on a 3×3 conv: ComfyUI applies up·down reshaped to the
    weight; loraops takes the kernel from the base as for a 1×1 (it was "adapter 8×72, base 8×8×3×3")."""
    g = Gen(37)
    conv, proj = "model.diffusion_model.input_blocks.1.0.in_layers.2", "model.diffusion_model.input_blocks.1.1.proj_in"
    base = {f"{conv}.weight": g(8, 8, 3, 3), f"{conv}.bias": g(8), f"{proj}.weight": g(8, 8, 1, 1)}
    lora, expected = {}, {}
    for name, tensor in ((conv, f"{conv}.weight"), (proj, f"{proj}.weight")):
        key = "lora_unet_" + name.removeprefix("model.diffusion_model.").replace(".", "_")
        up, down = g(8, 3), g(3, base[tensor][0].numel())
        lora |= {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(1.5)}
        expected[tensor] = base[tensor].double() + 0.5 * (up.double() @ down.double()).reshape(base[tensor].shape)
    merged_equals_comfyui(tmp_path, base, lora, expected)


def test_comfyui_saved_lora_names_bind_to_sd_checkpoints(tmp_path):
    """A LoRA ComfyUI saved names its denoiser's modules diffusion_model.… and its text encoders'
    text_encoders.clip_l.transformer.… (clip_g for SDXL's OpenCLIP, in HF names: q/k/v are rows of its in_proj_weight),
    as model_lora_keys_clip's generic loop maps them; they were "not in base" on SD 1.5 and SDXL checkpoints."""
    g = Gen(38)
    base, _ = sd15_checkpoint(g)
    te = "cond_stage_model.transformer.text_model.encoder.layers.0."
    targets = {f"text_encoders.clip_l.transformer.text_model.encoder.layers.0.{m}": (f"{te}{m}.weight", None)
               for m in ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1")}
    targets |= {f"diffusion_model.{n}": (f"model.diffusion_model.{n}.weight", None)
                for n in ("input_blocks.1.1.proj_in", "input_blocks.1.0.in_layers.2", "output_blocks.3.1.proj_out")}
    lora, expected = build(g, targets, base, "kohya")
    (tmp_path / "sd15").mkdir()
    merged_equals_comfyui(tmp_path / "sd15", base, lora, expected)

    d, l, bigg = 16, "conditioner.embedders.0.transformer.text_model.encoder.layers.0.", "conditioner.embedders.1.model."
    base = {f"{l}self_attn.{m}.weight": g(d, d) for m in ("q_proj", "k_proj", "v_proj", "out_proj")}
    base |= {f"{l}mlp.fc1.weight": g(2 * d, d), f"{l}mlp.fc2.weight": g(d, 2 * d),
             f"{bigg}transformer.resblocks.0.attn.in_proj_weight": g(3 * d, d),
             f"{bigg}transformer.resblocks.0.attn.out_proj.weight": g(d, d),
             f"{bigg}transformer.resblocks.0.mlp.c_fc.weight": g(2 * d, d),
             f"{bigg}transformer.resblocks.0.mlp.c_proj.weight": g(d, 2 * d),
             f"{bigg}token_embedding.weight": g(50, d), "conditioner.embedders.0.transformer.text_model.embeddings."
             "token_embedding.weight": g(50, d)}
    g_layer, fused = "text_encoders.clip_g.transformer.text_model.encoder.layers.0.", f"{bigg}transformer.resblocks.0."
    targets = {f"text_encoders.clip_l.transformer.text_model.encoder.layers.0.{m}": (f"{l}{m}.weight", None)
               for m in ("self_attn.k_proj", "mlp.fc2")}
    targets |= {f"{g_layer}self_attn.{p}_proj": (f"{fused}attn.in_proj_weight", (i * d, d)) for i, p in enumerate("qkv")}
    targets |= {f"{g_layer}self_attn.out_proj": (f"{fused}attn.out_proj.weight", None),
                f"{g_layer}mlp.fc1": (f"{fused}mlp.c_fc.weight", None)}
    lora, expected = build(g, targets, base, "kohya")
    (tmp_path / "sdxl").mkdir()
    merged_equals_comfyui(tmp_path / "sdxl", base, lora, expected)


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_diffusers_unet_names_without_unet_prefix_bind(tmp_path, kind):
    """diffusers UNet module names without the pipeline's unet. (ComfyUI's diffusers_lora_prefix ["", "unet."]), in
    lora_down/lora_up or lora_A/lora_B keys, beside top-level modules (conv_in): they were "not in base", and with
    lora_down/up keys the dotless conv_in made the file read as kohya's ("unknown keys in a kohya LoRA file")."""
    g = Gen(39)
    base, l2d = sd15_checkpoint(g)
    prefix = "model.diffusion_model."
    names = [n for n in two_d(base, prefix) if n in l2d and "transformer_blocks" not in l2d[n]]
    assert "input_blocks.0.0" in names  # conv_in
    lora, expected = build(g, {l2d[n]: (f"{prefix}{n}.weight", None) for n in names}, base, kind)
    merged_equals_comfyui(tmp_path, base, lora, expected)
