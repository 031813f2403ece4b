"""Randomized differential test of merging kohya and diffusers-format LoRAs into diffusers pipeline folders against
diffusers itself (pipe.load_lora_weights + set_adapters + fuse_lora, 0.42) and a float64 reference
W + Σ w·(alpha/r)·B·A.

Bases: tiny SD 1.x-style (UNet with conv proj_in + CLIP text encoder), SDXL-style (linear projections, text_time
embedding, two text encoders, the second with a text_projection) and FLUX.1-style (FluxTransformer2DModel) pipeline
folders, in float32, float16 or bfloat16. Adapters (one to three, weights possibly negative or 0): kohya files
(lora_unet_/lora_te_/lora_te1_/lora_te2_ names, SDXL's UNet under diffusers or sgm names, CLIP under text_model. or
flat names, sd-scripts FLUX names with fused qkv/linear1, alpha as a float32 or factor-dtype key or missing) and
diffusers files (component.… lora_A/lora_B, alpha from lora_adapter_metadata with rank_pattern/alpha_pattern, from
.alpha keys (FLUX) or none); linear, 1×1 and 3×3 conv LoRAs, ranks 1–8, factors in the base dtype, float32 or float16.

A session's sweep ran 1,000 such cases (seeds 1–1000) into pipeline folders and 345 into single-file checkpoints;
these seeds are clean ones that meet every pair of those features (278 pairs, a greedy cover). Cases where
diffusers is documented or found to differ are not here (README,
"diffusers and other trainers": a kohya file with mixed alphas; diffusers' kohya FLUX converter dropping the modules
outside the blocks and final_layer's alpha; its text-encoder loader refusing or dropping some kohya/PEFT text-encoder
LoRAs; fp16 FLUX kohya factors rescaled in fp16). Each merge must be within rounding of the float64 merge (half an
ulp of a half-precision output, 1e-5 of a float32 one), touch exactly the tensors diffusers' fuse touches, equal
diffusers' fuse within 1e-5 in float32, and be at least as close to float64 as diffusers' in fp16/bf16 (PEFT rounds
ΔW to the weight dtype before adding it, once per adapter: README, "one rounding, not two").
"""
from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SEEDS = [16, 164, 278, 577, 435, 151, 276, 919, 205, 267, 152, 3, 402, 798, 550]
SINGLE_FILE_SEEDS = [557, 768, 560]
"""SD 1.x-style cases merged into the same weights saved as one single-file checkpoint (original LDM names, the
text encoder under cond_stage_model.transformer.text_model.), compared tensor by tensor through the name table
tests/test_ldm.py generates as diffusers' conversion scripts do."""
BSTD = 0.03
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- bases
def sd_unet(kind: str, seed: int, layers: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if kind == "sd15":
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=layers, cross_attention_dim=32,
            norm_num_groups=8, attention_head_dim=4, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    # SDXL-like: linear projections, text_time embedding, attention in the lower levels
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=layers, cross_attention_dim=64,
        norm_num_groups=8, attention_head_dim=(2, 4), block_out_channels=(16, 32), use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=32 + 6 * 4)


def clip(seed: int, hidden: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=16, projection_dim=hidden, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def flux(seed: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6))


def build_components(case):
    seed, fam = case["seed"], case["family"]
    comps = {}
    if fam == "sd15":
        comps["unet"] = sd_unet("sd15", seed, case["layers"])
        comps["text_encoder"] = clip(seed + 1, 32, False)
    elif fam == "sdxl":
        comps["unet"] = sd_unet("sdxl", seed, case["layers"])
        comps["text_encoder"] = clip(seed + 1, 16, False)
        comps["text_encoder_2"] = clip(seed + 2, 16, True)
    else:
        comps["transformer"] = flux(seed)
    dtype = DTYPES[case["dtype"]]
    for m in comps.values():
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("bias"):
                    p.add_(0.05 * torch.randn_like(p))
        m.to(dtype)
    return comps


PIPE_CLASS = {"sd15": ("StableDiffusionPipeline", ), "sdxl": ("StableDiffusionXLPipeline",), "flux": ("FluxPipeline",)}


def save_pipeline(case, comps, root: Path):
    index = {"_class_name": PIPE_CLASS[case["family"]][0]}
    for name, m in comps.items():
        m.save_pretrained(root / name)
        lib = "transformers" if "text_encoder" in name else "diffusers"
        index[name] = [lib, type(m).__name__]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def diffusers_pipeline(case, comps):
    import diffusers

    fam = case["family"]
    if fam == "sd15":
        return diffusers.StableDiffusionPipeline(vae=None, text_encoder=comps["text_encoder"], tokenizer=None,
                                                 unet=comps["unet"], scheduler=None, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
    if fam == "sdxl":
        return diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=comps["text_encoder"],
                                                   text_encoder_2=comps["text_encoder_2"], tokenizer=None,
                                                   tokenizer_2=None, unet=comps["unet"], scheduler=None)
    return diffusers.FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None, transformer=comps["transformer"])


# ----------------------------------------------------------------------------------------------- modules
def lora_targets(case, comps):
    """[(component, module path, torch module)] a LoRA may target."""
    out = []
    for cname, m in comps.items():
        for name, mod in m.named_modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                if cname.startswith("text_encoder") and "encoder.layers" not in name and "text_projection" not in name:
                    continue
                out.append((cname, name, mod))
    return out


# sgm (SDXL checkpoint) names for kohya SDXL LoRAs, from the tiny UNet's layout
SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2"}
SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}


def sgm_block(kind: str, rest: str) -> str:
    """A resnet's or an attention's module path inside its LDM block: (sub-index, path)."""
    if kind == "resnets":
        leaf, dot, tail = rest.partition(".")
        return f"0.{SGM_RESNET.get(leaf, leaf)}{dot}{tail}"
    return f"1.{rest}"


def sgm_name(path: str, layers: int, fam: str) -> str | None:
    """diffusers UNet module path → the sgm/LDM module path sd-scripts uses for SDXL (None: an up level's upsampler,
    whose slot depends on the level's attention)."""
    if path in SGM_TOP:
        return SGM_TOP[path]
    per = layers + 1  # blocks per level: the resnets, then the downsampler (down) or one more resnet (up)
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", path):
        first = per * int(m[2]) + int(m[4]) + (m[1] == "down")
        return f"{'input' if m[1] == 'down' else 'output'}_blocks.{first}.{sgm_block(m[3], m[5])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{per * (int(m[1]) + 1)}.0.op"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", path):
        held = sgm_block(m[1], m[3])
        return f"middle_block.{2 * int(m[2])}.{held[2:]}" if m[1] == "resnets" else f"middle_block.{held}"
    return None


FLUX_FUSED = {  # kohya FLUX (sd-scripts) name: [(diffusers module, row block index, rows-multiple)]
    "double_blocks_0_img_attn_qkv": [("transformer_blocks.0.attn.to_q", 0), ("transformer_blocks.0.attn.to_k", 1),
                                     ("transformer_blocks.0.attn.to_v", 2)],
    "double_blocks_0_txt_attn_qkv": [("transformer_blocks.0.attn.add_q_proj", 0),
                                     ("transformer_blocks.0.attn.add_k_proj", 1),
                                     ("transformer_blocks.0.attn.add_v_proj", 2)],
    "single_blocks_0_linear1": [("single_transformer_blocks.0.attn.to_q", 0),
                                ("single_transformer_blocks.0.attn.to_k", 1),
                                ("single_transformer_blocks.0.attn.to_v", 2),
                                ("single_transformer_blocks.0.proj_mlp", 3)],
}
FLUX_PLAIN = {
    "double_blocks_0_img_attn_proj": "transformer_blocks.0.attn.to_out.0",
    "double_blocks_0_txt_attn_proj": "transformer_blocks.0.attn.to_add_out",
    "double_blocks_0_img_mlp_0": "transformer_blocks.0.ff.net.0.proj",
    "double_blocks_0_img_mlp_2": "transformer_blocks.0.ff.net.2",
    "double_blocks_0_txt_mlp_0": "transformer_blocks.0.ff_context.net.0.proj",
    "double_blocks_0_txt_mlp_2": "transformer_blocks.0.ff_context.net.2",
    "double_blocks_0_img_mod_lin": "transformer_blocks.0.norm1.linear",
    "double_blocks_0_txt_mod_lin": "transformer_blocks.0.norm1_context.linear",
    "single_blocks_0_linear2": "single_transformer_blocks.0.proj_out",
    "single_blocks_0_modulation_lin": "single_transformer_blocks.0.norm.linear",
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer_linear": "proj_out",
}


# ----------------------------------------------------------------------------------------------- adapters
def rnd(g, shape, std):
    return torch.randn(shape, generator=g, dtype=torch.float64) * std


def make_adapter(case, idx, comps, root: Path):
    """Writes adapter ``idx`` of ``case``; returns (path, modules) where modules lists
    (component, diffusers module path, A (float64, r×in[×kh×kw]), B (float64, out×r), scale, row0)."""
    spec = case["adapters"][idx]
    rng = random.Random(spec["seed"])
    g = torch.Generator().manual_seed(spec["seed"])
    fdtype = DTYPES[spec["fdtype"]]
    fam, layout = case["family"], spec["layout"]
    targets = lora_targets(case, comps)
    tensors, modules, metadata = {}, [], {}
    if fam == "flux" and layout == "kohya":
        pool = sorted(FLUX_FUSED) + sorted(FLUX_PLAIN)
        if not spec.get("linear1"):  # diffusers' kohya FLUX converter hard-codes FLUX.1-dev's linear1 split
            pool.remove("single_blocks_0_linear1")
        names = rng.sample(pool, min(spec["n"], len(pool)))
        mods = dict(comps["transformer"].named_modules())
        for kname in names:
            r = rng.choice(spec["ranks"])
            alpha = spec["alpha"] if not spec["mixed_alpha"] else rng.choice([1.0, 4.0, 3.5, 16.0])
            if kname in FLUX_FUSED:
                parts = FLUX_FUSED[kname]
                rows = [mods[p].weight.shape[0] for p, _ in parts]
                cols = mods[parts[0][0]].weight.shape[1]
                out = sum(rows)
            else:
                w = mods[FLUX_PLAIN[kname]].weight
                out, cols = w.shape
            A = rnd(g, (r, cols), 0.5).to(fdtype)
            B = rnd(g, (out, r), BSTD).to(fdtype)
            key = f"lora_unet_{kname}"
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = A, B
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
            s = alpha / r
            if kname in FLUX_FUSED:
                first = 0
                for (p, _), h in zip(FLUX_FUSED[kname], rows):
                    modules.append(("transformer", p, A.double(), B.double()[first:first + h], s))
                    first += h
            else:
                modules.append(("transformer", FLUX_PLAIN[kname], A.double(), B.double(), s))
        path = root / f"a{idx}.safetensors"
        save_file(tensors, str(path), {"ss_network_module": "networks.lora_flux"})
        return path, modules

    chosen = rng.sample(targets, min(spec["n"], len(targets)))
    if spec.get("te_out", True):  # diffusers 0.42 infers a text-encoder LoRA's layout from an out_proj (or kohya mlp)
        for cname in sorted({c for c, _, _ in chosen if c.startswith("text_encoder")}):
            extra = next(t for t in targets if t[0] == cname and t[1].endswith("layers.0.self_attn.out_proj"))
            if extra not in chosen:
                chosen.append(extra)
    tm = "" if spec.get("flat_te") else "text_model_"
    tmd = "" if spec.get("flat_te") else "text_model."

    def te_prefix(mpath, p):
        return "" if mpath.startswith("text_model.") or mpath == "text_projection" else p
    alphas_by = {}
    for cname, mpath, mod in chosen:
        r = rng.choice(spec["ranks"])
        alpha = spec["alpha"] if not spec["mixed_alpha"] else rng.choice([1.0, 4.0, 3.5, 16.0])
        w = mod.weight
        if isinstance(mod, torch.nn.Conv2d):
            out, cin, kh, kw = w.shape
            A = rnd(g, (r, cin, kh, kw), 0.5).to(fdtype)
            B = rnd(g, (out, r, 1, 1), BSTD).to(fdtype)
            Bm = B.double().reshape(out, r)
        else:
            out, cin = w.shape
            A = rnd(g, (r, cin), 0.5).to(fdtype)
            B = rnd(g, (out, r), BSTD).to(fdtype)
            Bm = B.double()
        if layout == "kohya":
            if cname == "unet":
                dpath = mpath if fam == "sd15" or not spec.get("sgm") else sgm_name(mpath, case["layers"], fam)
                if dpath is None:
                    continue
                key = "lora_unet_" + dpath.replace(".", "_")
            elif cname == "text_encoder":
                key = ("lora_te_" if fam == "sd15" else "lora_te1_") + te_prefix(mpath, tm) + mpath.replace(".", "_")
            elif cname == "text_encoder_2":
                key = "lora_te2_" + te_prefix(mpath, tm) + mpath.replace(".", "_")
            else:
                key = "lora_transformer_" + mpath.replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = A, B
            if spec["alpha_key"]:
                alpha_dtype = fdtype if spec["alpha_dtype_factor"] else torch.float32
                tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=alpha_dtype)
                a_eff = float(tensors[f"{key}.alpha"])
            else:
                a_eff = r
            s = a_eff / r
        else:
            key = f"{cname}.{te_prefix(mpath, tmd) if cname.startswith('text_encoder') else ''}{mpath}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = A, B
            alphas_by[(cname, mpath)] = (r, alpha)
            s = None
        modules.append([cname, mpath, A.double(), Bm, s])
    if layout == "diffusers":
        mode = spec["alpha_mode"]
        if mode == "metadata":
            # per component: LoraConfig-like dict with r, lora_alpha, rank_pattern, alpha_pattern, target_modules
            for cname in {c for c, _ in alphas_by}:
                items = {p: ra for (c, p), ra in alphas_by.items() if c == cname}
                r0 = max(set(r for r, _ in items.values()), key=[r for r, _ in items.values()].count)
                a0 = max(set(a for _, a in items.values()), key=[a for _, a in items.values()].count)
                cfg = {"r": r0, "lora_alpha": a0, "target_modules": sorted(items), "use_dora": False,
                       "rank_pattern": {p: r for p, (r, _) in items.items() if r != r0},
                       "alpha_pattern": {p: a for p, (_, a) in items.items() if a != a0}}
                metadata[cname] = cfg
            for m in modules:  # alpha as PEFT matches alpha_pattern: a key is a dot-bounded suffix of the path
                cfg = metadata[m[0]]
                a = next((v for k, v in cfg["alpha_pattern"].items() if re.match(rf"(.*\.)?{re.escape(k)}$", m[1])),
                         cfg["lora_alpha"])
                m[4] = a / alphas_by[(m[0], m[1])][0]
        elif mode == "alpha_keys":
            for m in modules:
                r, a = alphas_by[(m[0], m[1])]
                inner = te_prefix(m[1], tmd) if m[0].startswith("text_encoder") else ""
                tensors[f"{m[0]}.{inner}{m[1]}.alpha"] = torch.tensor(a)
                m[4] = a / r
        else:
            for m in modules:
                m[4] = 1.0
    path = root / f"a{idx}.safetensors"
    if layout == "diffusers" and metadata:
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

        header = {"format": "pt"}
        flat = {}
        for cname, cfg in metadata.items():
            for k, v in cfg.items():
                flat[f"{cname}.{k}"] = v
        header[LORA_ADAPTER_METADATA_KEY] = json.dumps(flat)
        save_file(tensors, str(path), header)
    else:
        save_file(tensors, str(path), {"ss_network_module": "networks.lora"} if layout == "kohya" else None)
    return path, [tuple(m) for m in modules]


# ----------------------------------------------------------------------------------------------- drawing
def drawn(seed: int) -> dict:
    rng = random.Random(seed)
    fam = rng.choice(["sd15", "sd15", "sdxl", "flux"])
    case = dict(seed=seed, family=fam, dtype=rng.choice(["fp32", "fp32", "fp16", "bf16"]),
                layers=2 if fam == "sdxl" else rng.choice([1, 2]),
                adapters=[], weights=[])
    for i in range(rng.choice([1, 1, 2, 3])):
        layout = rng.choice(["kohya", "diffusers"])
        spec = dict(seed=seed * 10 + i, layout=layout, n=rng.randint(2, 10),
                    ranks=rng.choice([[1], [2], [4], [8], [2, 4], [1, 3, 8]]),
                    alpha=rng.choice([1.0, 2.0, 4.0, 8.0, 3.5, 16.0]),
                    mixed_alpha=rng.random() < 0.15,
                    fdtype=rng.choice([case["dtype"], case["dtype"], "fp32", "fp16"]),
                    alpha_key=rng.random() < 0.9, alpha_dtype_factor=rng.random() < 0.3,
                    alpha_mode=rng.choice(["metadata", "metadata", "alpha_keys", "none"] if fam == "flux"
                                          else ["metadata", "metadata", "none"]),
                    sgm=fam == "sdxl" and rng.random() < 0.7, flat_te=rng.random() < 0.15,
                    te_out=rng.random() < 0.85, linear1=rng.random() < 0.25)
        if spec["fdtype"] == "fp16" and case["dtype"] == "bf16":
            spec["fdtype"] = "bf16"
        case["adapters"].append(spec)
        case["weights"].append(rng.choice([1.0, 1.0, 0.7, -0.3, 0.5, 1.5, -1.0, 0.0]))
    return case


MANT = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def ulp(x, dtype):
    tiny = torch.finfo(dtype).tiny
    return torch.pow(2.0, torch.floor(torch.log2(x.abs().clamp_min(tiny))) - MANT[dtype])


def reference(base_sd, modules_by_adapter, weights):
    ref = {c: {k: v.double() for k, v in sd.items()} for c, sd in base_sd.items()}
    for mods, w in zip(modules_by_adapter, weights):
        for cname, mpath, A, B, s in mods:
            key = f"{mpath}.weight"
            W = ref[cname][key]
            if A.dim() == 4:
                d = (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).reshape(W.shape)
            else:
                d = B @ A
                if W.dim() == 4:
                    d = d.reshape(W.shape)
            ref[cname][key] = W + w * s * d
    return ref


def loraops_merge(base_dir, paths, weights, out):
    from loraops import engine, formats

    rep = engine.merge(base_dir, [(formats.read_adapter(p), w) for p, w in zip(paths, weights)], out, device="cpu",
                       progress=False)
    return rep


def load_component(case, name, folder, dtype):
    import diffusers
    import transformers

    idx = json.loads((folder / "model_index.json").read_text())
    lib, cls = idx[name]
    mod = getattr(diffusers if lib == "diffusers" else transformers, cls)
    kw = {"torch_dtype": dtype} if lib == "diffusers" else {"dtype": dtype}
    return mod.from_pretrained(folder / name, **kw).state_dict()


def diffusers_fuse(case, comps, paths, weights):
    pipe = diffusers_pipeline(case, comps)
    names = [f"a{i}" for i in range(len(paths))]
    for p, n in zip(paths, names):
        pipe.load_lora_weights(str(p), adapter_name=n)
    pipe.set_adapters(names, adapter_weights=list(weights))
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    return {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in comps.items()}


def assert_within_rounding(ours, ref, dtype, name):
    ours, ref = ours.double(), ref.double()
    err = (ours - ref).abs()
    if dtype == torch.float32:
        scale = ref.abs().max().clamp_min(1e-30)
        bound = 1e-5 * torch.maximum(ref.abs(), 0.05 * scale) + 1e-7 * scale
    else:
        bound = 0.5001 * ulp(ref, dtype) + 1e-6 * ref.abs().max()
    assert bool((err <= bound).all()), (name, float(err.max()), float((err / bound).max()))


def sd15_table():
    from test_ldm import reference_table

    return reference_table(down=2, attention_down=lambda i: i == 0, attention_up=lambda i: i == 1,
                           upsampler_slot=lambda i: 1)


def checkpoint_name(component: str, key: str, table) -> str:
    from test_ldm import reference_checkpoint_name

    if component == "text_encoder":
        return "cond_stage_model.transformer.text_model." + key
    module, leaf = key.rsplit(".", 1)
    return f"model.diffusion_model.{reference_checkpoint_name(module, table)}.{leaf}"


@pytest.mark.parametrize("seed,single_file", [(s, False) for s in SEEDS] + [(s, True) for s in SINGLE_FILE_SEEDS])
def test_merge_equals_diffusers_fuse_lora(seed, single_file, tmp_path):
    warnings.filterwarnings("ignore")
    case = drawn(seed)
    dtype = DTYPES[case["dtype"]]
    comps = build_components(case)
    save_pipeline(case, comps, tmp_path / "base")
    if single_file:
        assert case["family"] == "sd15" and case["layers"] == 2
        table = sd15_table()
        save_file({checkpoint_name(c, k, table): v.contiguous() for c, m in comps.items()
                   for k, v in m.state_dict().items()}, str(tmp_path / "sd.safetensors"))
    base = {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in comps.items()}
    paths, modules = [], []
    for i in range(len(case["adapters"])):
        path, mods = make_adapter(case, i, comps, tmp_path)
        paths.append(path)
        modules.append(mods)
    weights = case["weights"]
    ref = reference(base, modules, weights)

    if single_file:
        from safetensors.torch import load_file

        loraops_merge(tmp_path / "sd.safetensors", paths, weights, tmp_path / "out.safetensors")
        merged = load_file(str(tmp_path / "out.safetensors"))
        assert len(merged) == sum(len(b) for b in base.values())
        ours = {c: {k: merged[checkpoint_name(c, k, table)] for k in base[c]} for c in comps}
    else:
        loraops_merge(tmp_path / "base", paths, weights, tmp_path / "out")
        ours = {c: load_component(case, c, tmp_path / "out", dtype) for c in comps}
    theirs = diffusers_fuse(case, comps, paths, weights)
    touched = 0
    for c in ref:
        assert ours[c].keys() == theirs[c].keys() == base[c].keys(), c
        for k, exact in ref[c].items():
            name = f"{c}.{k}"
            assert ours[c][k].dtype == dtype, name
            assert torch.equal(ours[c][k], base[c][k]) == torch.equal(theirs[c][k], base[c][k]), name
            touched += not torch.equal(ours[c][k], base[c][k])
            assert_within_rounding(ours[c][k], exact, dtype, name)
            if dtype == torch.float32:
                assert_within_rounding(ours[c][k], theirs[c][k], dtype, name + " vs diffusers")
            else:
                e_ours = float((ours[c][k].double() - exact).abs().max())
                e_theirs = float((theirs[c][k].double() - exact).abs().max())
                assert e_ours <= e_theirs + 1e-6 * float(exact.abs().max()), (name, e_ours, e_theirs)
    assert touched > 0


OUTSIDE_BLOCKS = ["img_in", "txt_in", "time_in_in_layer", "time_in_out_layer", "vector_in_in_layer",
                  "vector_in_out_layer", "final_layer_linear"]


@pytest.mark.parametrize("kohya_name", OUTSIDE_BLOCKS)
def test_a_flux_lora_of_modules_outside_the_blocks_alone_merges(kohya_name, tmp_path):
    """A kohya FLUX LoRA holding only modules outside the double/single blocks was refused by a FLUX pipeline folder
    ("not in base"): the checkpoint's names were bound only when a block's module was among them. (diffusers' own
    converter drops img_in, txt_in, time_in and vector_in: docs/formats.md.)"""
    from loraops import engine, formats

    transformer = flux(1)
    case = {"family": "flux"}
    save_pipeline(case, {"transformer": transformer}, tmp_path / "base")
    g = torch.Generator().manual_seed(2)
    W = dict(transformer.named_modules())[FLUX_PLAIN[kohya_name]].weight.detach().double()
    A, B = rnd(g, (4, W.shape[1]), 0.5).float(), rnd(g, (W.shape[0], 4), BSTD).float()
    key = f"lora_unet_{kohya_name}"
    save_file({f"{key}.lora_down.weight": A, f"{key}.lora_up.weight": B, f"{key}.alpha": torch.tensor(8.0)},
              str(tmp_path / "a.safetensors"), {"ss_network_module": "networks.lora_flux"})
    engine.merge(tmp_path / "base", [(formats.read_adapter(tmp_path / "a.safetensors"), 0.5)], tmp_path / "out",
                 device="cpu", progress=False)
    merged = load_component(case, "transformer", tmp_path / "out", torch.float32)[f"{FLUX_PLAIN[kohya_name]}.weight"]
    assert_within_rounding(merged, W + 0.5 * 2.0 * (B.double() @ A.double()), torch.float32, kohya_name)
