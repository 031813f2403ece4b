"""Single-file checkpoints — Stable Diffusion's original LDM / sgm layout that A1111, ComfyUI and sd-scripts save,
FLUX.1's and SD3's — seen under diffusers names.

LoRAs name modules the diffusers way: sd-scripts builds SD 1.x/2.x UNets with diffusers block names
(``lora_unet_down_blocks_0_attentions_0_…``) and every text encoder as the transformers model it loads it into; diffusers-trained LoRAs
use ``unet.down_blocks.0.…``. A single-file checkpoint names the same UNet modules ``input_blocks.1.1.…`` and keeps
the OpenCLIP text encoders (SD 2.x, SDXL's second, the SDXL refiner's) in OpenCLIP's layout; SD3's three (and a
ComfyUI FLUX checkpoint's) are saved under transformers' names behind ``text_encoders.<clip_l|clip_g|t5xxl>.
transformer.`` (TEXT_ENCODERS). This module gives every checkpoint module its diffusers path, so both name styles
bind to either kind of base, and names bound modules back as sd-scripts does:

    diffusers_names(tensors) -> {diffusers module path: checkpoint module path}     (binding LoRAs to a checkpoint)
    fused_target(module, manifest) -> (tensor, first row, rows, all rows) | None  (q/k/v inside a fused tensor)
    split(tensor, shape) -> [(part module, its rows as fused_target gives them)]  (the modules extract makes of one)
    sd_scripts_name(module, sdxl) -> (component, path) | None                      (naming them back, as sd-scripts)
    is_sdxl(names, metadata) -> bool | None       (whose UNet: SDXL's or SD 1.x/2.x's, which are named differently)
    other_unet(names, metadata) -> OtherUnet | None  (the x4 upscaler's, SVD's, AudioLDM's: neither, no sd-scripts model)
    checkpoint_paths(names) -> {diffusers UNet module: checkpoint module path}    (diffusers_names' UNet part, inverse)
    clip_paths(path) -> [path, the same CLIP module in the other saved layout]   (transformers 4 vs 5)

The UNet translation is structural (read off the LDM path, not a table per model), for the SD-family UNets: two
resnets per down block and three per up block (SD 1.x, 2.x, XL), which is diffusers' conversion table
(scripts/convert_diffusers_to_original_stable_diffusion.py) generalised to blocks with or without attentions; only
label_emb depends on the family (SDXL's add_embedding, SD 2.x unCLIP's class_embedding), and Stable Video Diffusion's
resnets and attentions hold spatio-temporal parts (VIDEO_RESNET, VIDEO_ATTENTION).
Transformer blocks keep their names in both layouts. FLUX.1 (Black Forest Labs' layout) and SD3 / SD3.5 (MMDiT)
checkpoints, bare or behind ``model.diffusion_model.`` as ComfyUI saves them, are translated to diffusers'
``transformer.`` names as diffusers' single-file converters do. A diffusers pipeline's FLUX.1/SD3 transformer, or one
of DIT_LAYOUTS' (Wan, Wan VACE, Wan Animate, HunyuanVideo, LTX-Video, LTX-2, Qwen-Image, Lumina2, HiDream: told by
its config.json class), is read as the checkpoint tensors it holds (pipeline_dit), for LoRAs named by the original
checkpoint.

Fused tensors: OpenCLIP's attention stores q, k and v as the three row blocks of one ``attn.in_proj_weight``; FLUX
stores them in ``img_attn.qkv`` / ``txt_attn.qkv``, and q, k, v and the MLP's input in a single block's ``linear1``;
SD3 in ``x_block.attn.qkv``, ``x_block.attn2.qkv`` (SD3.5) and ``context_block.attn.qkv``.
A LoRA trained on the split modules binds to a *part* of such a tensor, named by the owner's path and the split
module's leaf (``…attn.q_proj``, ``…img_attn.qkv.to_q``, ``…linear1.proj_mlp``) — names of no tensor: fused_target
says which rows of which tensor a part changes. FUSED is the one table of them, for binding, merging, extracting
(split: one module per part where no module holds the tensor whole, so OpenCLIP's q/k/v but not FLUX's qkv, which
sd-scripts trains and extracts as one Linear) and writing kohya names (parts of a whole one joined).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from .fsutil import read_small_file

UNET_PREFIX = "model.diffusion_model."
RESNET = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
    # the SD x4 upscaler's noise-level embedding (an nn.Embedding), AudioLDM's FiLM projection: each diffusers'
    # class_embedding (single_file_utils.convert_ldm_unet_checkpoint, scripts/convert_original_audioldm_to_diffusers.py)
    "label_emb": "class_embedding", "film_emb": "class_embedding",
    # LCM's guidance-scale projection: no entry in diffusers' conversion table
    # (scripts/convert_diffusers_to_original_stable_diffusion.py), which keeps an unmapped key as it is, so a single-file
    # LCM checkpoint holds it under its diffusers path; sd-scripts' UNet has no such module
    "time_embedding.cond_proj": "time_embedding.cond_proj",
}
# SDXL's size/crop embedding (diffusers' add_embedding), or SD 2.x unCLIP's image-embedding class embedding
# (class_embedding), as diffusers' convert_ldm_unet_checkpoint names it by the UNet's family
LABEL_EMB = {"label_emb.0.0": "linear_1", "label_emb.0.2": "linear_2"}
BLOCK_RE = re.compile(r"^(?P<kind>input_blocks|output_blocks|middle_block)\.(?P<n>\d+)\.(?:(?P<m>\d+)\.)?(?P<rest>.+)$")


@dataclass(frozen=True)
class TextEncoder:
    """A text encoder inside a single-file checkpoint: where its tensors are, and what diffusers and sd-scripts call
    it."""

    prefix: str
    """Its tensors' prefix in the checkpoint."""
    component: str
    """Its diffusers pipeline component (text_encoder, text_encoder_2, text_encoder_3)."""
    sd_scripts: str
    """The component sd-scripts names its modules by: text_encoder (lora_te_), text_encoder_1 (lora_te1_: SDXL's
    first, even alone; SD3's and FLUX's CLIP-L), text_encoder_2 (lora_te2_), text_encoder_3 (lora_te3_: the T5)."""
    open_clip: bool = False
    """Saved in OpenCLIP's layout (transformer.resblocks.N.…, q, k and v fused in attn.in_proj_weight), which
    diffusers and sd-scripts load as transformers' CLIPTextModel; otherwise saved with transformers' names."""
    flux_component: str | None = None
    """Its component in diffusers' FluxPipeline where that differs from ``component`` (SD3's): T5-XXL is its
    text_encoder_2."""

    def path(self, module: str) -> str | None:
        """The module's path inside its transformers model (None: an OpenCLIP module LoRAs do not target)."""
        rest = module[len(self.prefix):]
        return open_clip_path(rest) if self.open_clip else rest


TEXT_ENCODERS = (
    TextEncoder("cond_stage_model.transformer.", "text_encoder", "text_encoder"),  # SD 1.x (CLIP ViT-L)
    TextEncoder("cond_stage_model.model.", "text_encoder", "text_encoder", open_clip=True),  # SD 2.x (OpenCLIP ViT-H)
    TextEncoder("conditioner.embedders.0.transformer.", "text_encoder", "text_encoder_1"),  # SDXL's first (CLIP ViT-L)
    TextEncoder("conditioner.embedders.1.model.", "text_encoder_2", "text_encoder_2", open_clip=True),  # SDXL's bigG
    # the SDXL refiner's only encoder, OpenCLIP bigG: its diffusers pipeline has it as text_encoder_2 alone
    TextEncoder("conditioner.embedders.0.model.", "text_encoder_2", "text_encoder_2", open_clip=True),
    # SD3's three (and the CLIP-L and T5 of a FLUX checkpoint ComfyUI saved), as sd-scripts' lora_sd3.py and
    # lora_flux.py name them: lora_te1_ CLIP-L, lora_te2_ CLIP-G, lora_te3_ T5-XXL, each by its transformers path
    TextEncoder("text_encoders.clip_l.transformer.", "text_encoder", "text_encoder_1"),
    TextEncoder("text_encoders.clip_g.transformer.", "text_encoder_2", "text_encoder_2"),
    TextEncoder("text_encoders.t5xxl.transformer.", "text_encoder_3", "text_encoder_3", flux_component="text_encoder_2"),
)


def text_encoder(module: str) -> TextEncoder | None:
    """The text encoder a checkpoint module (or tensor) path is in, or None."""
    return next((encoder for encoder in TEXT_ENCODERS if module.startswith(encoder.prefix)), None)


OPEN_CLIP_LAYER_RE = re.compile(r"^transformer\.resblocks\.(?P<layer>\d+)\.(?P<rest>.+)$")
OPEN_CLIP_MODULES = {
    "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
    "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
# DiT transformers in their original single-file layout → diffusers' transformer (component "transformer."), as
# diffusers' single-file converters map them. The adaLN projections whose shift and scale halves diffusers swaps
# (FLUX's and SD3's final_layer.adaLN_modulation.1, SD3's last context block's) have no row-for-row name and are left
# out; so is every SD3 context block's adaLN (which one is last is not in its path). A pipeline's are bound apart
# (pipeline_dit).
FLUX_TOP = {  # FLUX.1, Black Forest Labs' names
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}
SD3_TOP = {  # SD3 / SD3.5 MMDiT
    "x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder", "final_layer.linear": "proj_out",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
}
DIT_BLOCKS = {  # original block name → (diffusers block name, {path inside the block: diffusers path})
    "double_blocks": ("transformer_blocks", {
        "img_attn.qkv.to_q": "attn.to_q", "img_attn.qkv.to_k": "attn.to_k", "img_attn.qkv.to_v": "attn.to_v",
        "txt_attn.qkv.add_q_proj": "attn.add_q_proj", "txt_attn.qkv.add_k_proj": "attn.add_k_proj",
        "txt_attn.qkv.add_v_proj": "attn.add_v_proj",
        "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
        "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj",
        "txt_mlp.2": "ff_context.net.2", "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    }),
    "single_blocks": ("single_transformer_blocks", {
        "linear1.to_q": "attn.to_q", "linear1.to_k": "attn.to_k", "linear1.to_v": "attn.to_v",
        "linear1.proj_mlp": "proj_mlp", "linear2": "proj_out", "modulation.lin": "norm.linear",
    }),
    "joint_blocks": ("transformer_blocks", {
        "x_block.attn.qkv.to_q": "attn.to_q", "x_block.attn.qkv.to_k": "attn.to_k", "x_block.attn.qkv.to_v": "attn.to_v",
        "context_block.attn.qkv.add_q_proj": "attn.add_q_proj", "context_block.attn.qkv.add_k_proj": "attn.add_k_proj",
        "context_block.attn.qkv.add_v_proj": "attn.add_v_proj",
        "x_block.attn2.qkv.to_q": "attn2.to_q", "x_block.attn2.qkv.to_k": "attn2.to_k", "x_block.attn2.qkv.to_v": "attn2.to_v",
        "x_block.attn.proj": "attn.to_out.0", "context_block.attn.proj": "attn.to_add_out",
        "x_block.attn2.proj": "attn2.to_out.0", "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
        "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
        "x_block.adaLN_modulation.1": "norm1.linear",
    }),
}
DIT_BLOCK_RE = re.compile(r"^(?P<kind>double_blocks|single_blocks|joint_blocks)\.(?P<n>\d+)\.(?P<rest>.+)$")

QKV, ADD_QKV = ("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")


@dataclass(frozen=True)
class DitLayout:
    """A DiT whose LoRAs are trained on its original checkpoint's module paths (``blocks.0.self_attn.q``, bare,
    behind ``diffusion_model.``, or musubi-tuner's ``lora_unet_blocks_0_self_attn_q``), and the diffusers transformer
    classes that hold it under other names. Which one a pipeline holds is told by its transformer's config.json
    ``_class_name``, not by its tensor names (HunyuanVideo's are FLUX.1's: transformer_blocks,
    single_transformer_blocks, add_q_proj)."""

    name: str
    classes: tuple[str, ...]
    """diffusers' transformer classes (config.json _class_name) of this layout."""
    named: re.Pattern
    """An adapter module named by the original checkpoint (for the pipeline's binding to be tried at all)."""
    blocks: dict[str, tuple[str, dict[str, str]]]
    """Original block list → (diffusers' block list, {path inside the block: diffusers' path}), as DIT_BLOCKS."""
    top: dict[str, str]
    """The modules outside the blocks, original → diffusers'."""
    swapped: dict[str, str] = dataclasses.field(default_factory=dict)
    """diffusers' adaLN projections that hold the original's with the shift and scale halves swapped → the
    original's."""
    keeps: bool = False
    """Every other module of the transformer has its diffusers path as its original name (LTX-Video's blocks)."""
    beside: dict[str, str] = dataclasses.field(default_factory=dict)
    """Original modules a pipeline holds in another component than its transformer → their paths there, the
    component included (LTX-2's text projection, in ``connectors``)."""


WAN_BLOCK = {
    **{f"{attn}.{o}": f"{diffusers}.{c}" for attn, diffusers in (("self_attn", "attn1"), ("cross_attn", "attn2"))
       for o, c in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))},
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",  # image-to-video's
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
WAN = DitLayout(  # as diffusers' convert_wan_transformer_to_diffusers and _convert_non_diffusers_wan_lora_to_diffusers
    "Wan", ("WanTransformer3DModel",), re.compile(r"(?:^|[._])blocks[._]\d+[._](?:self_attn|cross_attn|ffn)[._]"),
    {"blocks": ("blocks", WAN_BLOCK)},
    {"patch_embedding": "patch_embedding", "head.head": "proj_out",
     "text_embedding.0": "condition_embedder.text_embedder.linear_1",
     "text_embedding.2": "condition_embedder.text_embedder.linear_2",
     "time_embedding.0": "condition_embedder.time_embedder.linear_1",
     "time_embedding.2": "condition_embedder.time_embedder.linear_2",
     "time_projection.1": "condition_embedder.time_proj",
     "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
     "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2"},
)
# Wan VACE and Wan Animate: Wan's blocks and more, as convert_wan_transformer_to_diffusers renames the weights (the
# LoRA converter refuses every module outside Wan's): VACE's context blocks (vace_blocks, the first with before_proj),
# Animate's face adapter (its linear1_kv: k and v, FUSED) and the conditioning inputs beside patch_embedding
WAN_VACE = dataclasses.replace(
    WAN, name="Wan VACE", classes=("WanVACETransformer3DModel",),
    blocks={**WAN.blocks, "vace_blocks": ("vace_blocks", {**WAN_BLOCK, "before_proj": "proj_in",
                                                          "after_proj": "proj_out"})},
    top={**WAN.top, "vace_patch_embedding": "vace_patch_embedding"},
)
WAN_ANIMATE = dataclasses.replace(
    WAN, name="Wan Animate", classes=("WanAnimateTransformer3DModel",),
    named=re.compile(rf"{WAN.named.pattern}|(?:^|[._])face_adapter[._]fuser_blocks[._]\d+[._]"),
    blocks={**WAN.blocks, "face_adapter.fuser_blocks": ("face_adapter", {
        "linear1_q": "to_q", "linear1_kv.to_k": "to_k", "linear1_kv.to_v": "to_v", "linear2": "to_out"})},
    top={**WAN.top, "pose_patch_embedding": "pose_patch_embedding", "face_encoder.out_proj": "face_encoder.out_proj"},
)
HUNYUAN_VIDEO = DitLayout(  # as diffusers' convert_hunyuan_video_transformer_to_diffusers (its LoRA converter's table)
    "HunyuanVideo", ("HunyuanVideoTransformer3DModel",),
    re.compile(r"(?:^|[._])(?:double_blocks|single_blocks|individual_token_refiner[._]blocks)[._]\d+[._]"),
    {"double_blocks": ("transformer_blocks", {
        **{f"img_attn_qkv.{part}": f"attn.{part}" for part in QKV},
        **{f"txt_attn_qkv.{part}": f"attn.{part}" for part in ADD_QKV},
        "img_attn_proj": "attn.to_out.0", "txt_attn_proj": "attn.to_add_out",
        "img_mlp.fc1": "ff.net.0.proj", "img_mlp.fc2": "ff.net.2",
        "txt_mlp.fc1": "ff_context.net.0.proj", "txt_mlp.fc2": "ff_context.net.2",
        "img_mod.linear": "norm1.linear", "txt_mod.linear": "norm1_context.linear",
    }), "single_blocks": ("single_transformer_blocks", {
        **{f"linear1.{part}": f"attn.{part}" for part in QKV}, "linear1.proj_mlp": "proj_mlp",
        "linear2": "proj_out", "modulation.linear": "norm.linear",
    }), "txt_in.individual_token_refiner.blocks": ("context_embedder.token_refiner.refiner_blocks", {
        **{f"self_attn_qkv.{part}": f"attn.{part}" for part in QKV},
        "self_attn_proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
        "adaLN_modulation.1": "norm_out.linear",
    })},
    {"img_in.proj": "x_embedder.proj", "final_layer.linear": "proj_out",
     "time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1",
     "time_in.mlp.2": "time_text_embed.timestep_embedder.linear_2",
     "guidance_in.mlp.0": "time_text_embed.guidance_embedder.linear_1",
     "guidance_in.mlp.2": "time_text_embed.guidance_embedder.linear_2",
     "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
     "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
     "txt_in.input_embedder": "context_embedder.proj_in",
     "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
     "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
     "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
     "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2"},
    {"norm_out.linear": "final_layer.adaLN_modulation.1"},
)
LTX_VIDEO = DitLayout(  # as convert_ltx_transformer_checkpoint_to_diffusers; its blocks are named alike
    "LTX-Video", ("LTXVideoTransformer3DModel",),
    re.compile(r"(?:^|[._])transformer_blocks[._]\d+[._](?:attn[12]|ff)[._]"), {},
    {"patchify_proj": "proj_in", "adaln_single.linear": "time_embed.linear",
     "adaln_single.emb.timestep_embedder.linear_1": "time_embed.emb.timestep_embedder.linear_1",
     "adaln_single.emb.timestep_embedder.linear_2": "time_embed.emb.timestep_embedder.linear_2"},
    keeps=True,
)
# LTX-2 (audio-video): its blocks are named alike (video and audio attentions, the cross-modal ones, ff, audio_ff);
# outside them as diffusers' _convert_non_diffusers_ltx2_lora_to_diffusers and convert_ltx2_transformer_to_diffusers
LTX2_ADALN = {"adaln_single": "time_embed", "audio_adaln_single": "audio_time_embed",
              "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
              "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
              "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
              "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
              "prompt_adaln_single": "prompt_adaln", "audio_prompt_adaln_single": "audio_prompt_adaln"}  # (LTX-2.3's)
LTX2 = DitLayout(
    "LTX-2", ("LTX2VideoTransformer3DModel",),
    re.compile(r"(?:^|[._])transformer_blocks[._]\d+[._]"
               r"(?:(?:audio_)?(?:attn[12]|ff)|audio_to_video_attn|video_to_audio_attn)[._]"), {},
    {"patchify_proj": "proj_in", "audio_patchify_proj": "audio_proj_in",
     **{f"{original}.{leaf}": f"{diffusers}.{leaf}" for original, diffusers in LTX2_ADALN.items()
        for leaf in ("linear", "emb.timestep_embedder.linear_1", "emb.timestep_embedder.linear_2")}},
    keeps=True, beside={"text_embedding_projection.aggregate_embed": "connectors.text_proj_in"},
)
# Qwen-Image's checkpoints and LoRAs (ComfyUI's, musubi-tuner's) name its modules as diffusers does
QWEN_IMAGE = DitLayout(
    "Qwen-Image", ("QwenImageTransformer2DModel",),
    re.compile(r"(?:^|[._])transformer_blocks[._]\d+[._](?:attn|img_mlp|txt_mlp|img_mod|txt_mod)[._]"), {}, {},
    keeps=True,
)
# Lumina-Image 2.0 (NextDiT), as diffusers' convert_lumina2_to_diffusers and its LoRA converter
# (_convert_non_diffusers_lumina2_lora_to_diffusers; sd-scripts' lora_lumina.py names lora_unet_layers_0_attention_qkv);
# its qkv holds grouped-query heads (FUSED)
LUMINA2_BLOCK = {
    **{f"attention.qkv.{part}": f"attn.{part}" for part in QKV}, "attention.out": "attn.to_out.0",
    **{f"feed_forward.w{n}": f"feed_forward.linear_{n}" for n in (1, 2, 3)}, "adaLN_modulation.1": "norm1.linear",
}
LUMINA2 = DitLayout(
    "Lumina2", ("Lumina2Transformer2DModel",),
    re.compile(r"(?:^|[._])(?:layers|noise_refiner|context_refiner)[._]\d+[._]"
               r"(?:attention[._](?:qkv|out)|feed_forward[._]w[123]|adaLN_modulation)"),
    {block: (block, LUMINA2_BLOCK) for block in ("layers", "noise_refiner", "context_refiner")},
    {"x_embedder": "x_embedder", "cap_embedder.1": "time_caption_embed.caption_embedder.1",
     "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
     "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
     "final_layer.adaLN_modulation.1": "norm_out.linear_1", "final_layer.linear": "norm_out.linear_2"},
)
# HiDream-I1's checkpoints name its modules as diffusers does (convert_hidream_transformer_to_diffusers and its LoRA
# converter only strip the prefix), its MoE experts as separate Linears (ff_i.experts.0.w1)
HIDREAM = DitLayout(
    "HiDream", ("HiDreamImageTransformer2DModel",),
    re.compile(r"(?:^|[._])(?:double|single)_stream_blocks[._]\d+[._]block[._]"), {}, {}, keeps=True,
)
DIT_LAYOUTS = (WAN, WAN_VACE, WAN_ANIMATE, HUNYUAN_VIDEO, LTX_VIDEO, LTX2, QWEN_IMAGE, LUMINA2, HIDREAM)


class Tensors(dict):
    """A base's tensors by name (name → info), with the class of its pipeline's transformer (its config.json
    ``_class_name``) where the infos cannot say it: a registered base's recorded manifest, whose infos name no file."""

    transformer_class: str | None = None


def transformer_class(pipeline: Path) -> str | None:
    """The ``_class_name`` of a diffusers pipeline folder's transformer (``transformer/config.json``), or of a diffusers
    model folder itself (its ``config.json``: a pipeline's component folder given as the base, Wan 2.2's
    ``transformer_2/``), or None: no such folder or file, or not a readable one."""
    for file in (pipeline / "transformer" / "config.json", pipeline / "config.json"):
        try:
            config = json.loads(read_small_file(file, "model config"))
        except (OSError, ValueError):  # (FormatError, a ValueError, too)
            continue
        name = config.get("_class_name") if isinstance(config, dict) else None
        return name if isinstance(name, str) else None
    return None


def dit_layout(transformer_class: str | None) -> DitLayout | None:
    """The layout of DIT_LAYOUTS whose diffusers transformer class this is, or None."""
    return next((layout for layout in DIT_LAYOUTS if transformer_class in layout.classes), None)


DIT_LAYOUT_KEY = "loraops_dit_layout"
"""Metadata of an adapter bound to a diffusers pipeline whose transformer is one of DIT_LAYOUTS' (check.renamed), in
memory (no writer writes it): the layout's name, by which the kohya writer names its modules back (checkpoint_dit)."""
DIT_BARE_KEY = "loraops_dit_bare"
"""Beside DIT_LAYOUT_KEY ("true"): bound to the transformer's own folder (a pipeline's ``transformer_2/``), whose
modules are named without the pipeline's ``transformer.``."""


def checkpoint_dit(metadata: Mapping[str, str] | None, module: str) -> tuple[str, bool] | None:
    """(the original checkpoint's module path, whether the checkpoint holds it with its shift and scale halves
    swapped) of a pipeline transformer's module (``transformer.blocks.0.attn1.to_q`` → ``blocks.0.self_attn.q``; a
    part of a fused tensor by the part's path, ``double_blocks.0.img_attn_qkv.to_q``) of an adapter whose ``metadata``
    names the DIT_LAYOUTS layout it was bound by (DIT_LAYOUT_KEY; without ``transformer.`` where bound to the
    transformer's folder: DIT_BARE_KEY), or of another component's module the layout names (DitLayout.beside:
    ``connectors.text_proj_in`` → ``text_embedding_projection.aggregate_embed``). None for any other module or
    adapter."""
    layout = next((layout for layout in DIT_LAYOUTS if layout.name == (metadata or {}).get(DIT_LAYOUT_KEY)), None)
    bare = (metadata or {}).get(DIT_BARE_KEY) == "true"
    beside = {} if layout is None or bare else {held: path for path, held in layout.beside.items()}
    if module in beside:
        return beside[module], False
    if layout is None or not (bare or module.startswith("transformer.")):
        return None
    path = module if bare else module.removeprefix("transformer.")
    if path in layout.swapped:
        return layout.swapped[path], True
    inverse, top = dit_inverse(False, layout)
    match = re.match(r"^(?P<block>[a-z_.]+)\.(?P<n>\d+)\.(?P<rest>.+)$", path)
    found = None if match is None else inverse.get(f"{match['block']}.{{n}}.{match['rest']}")
    if found is None:
        found = top.get(path) or (path if layout.keeps and path not in layout.top else None)
    return None if found is None else (found.replace("{n}", match["n"]) if match else found, False)


DIT = f"^(?:{re.escape(UNET_PREFIX)})?"  # bare, or behind model.diffusion_model. as ComfyUI saves them
# a tensor that tells the family of a checkpoint, and so which top-level names are its own
FLUX_MARK = re.compile(DIT + r"double_blocks\.\d+\.img_attn\.qkv\.weight$")
SD3_MARK = re.compile(DIT + r"joint_blocks\.\d+\.x_block\.attn\.qkv\.weight$")
DIT_MARKS = ((FLUX_MARK, FLUX_TOP), (SD3_MARK, SD3_TOP))
# the MMDiT's q/k RMS norms (SD3.5) and its x blocks' second attention (SD3.5 Medium), by which sd-scripts tells its
# model type (sd3_utils.analyze_state_dict_state)
SD3_QK_NORM = re.compile(DIT + r"joint_blocks\.0\.context_block\.attn\.ln_k\.weight$")
SD3_X_ATTN2 = re.compile(DIT + r"joint_blocks\.\d+\.x_block\.attn2\.ln_k\.weight$")


# transformers 5 saves a CLIP text encoder without its "text_model." level (encoder.layers.0.…), transformers 4 —
# every hub pipeline, sd-scripts' names, diffusers-trained LoRAs — with it (text_model.encoder.layers.0.…)
CLIP_TEXT_MODEL = re.compile(r"^(text_model\.)?(?=(?:encoder\.layers|embeddings|final_layer_norm)\.)")

# a T5 encoder's module paths (transformers' T5EncoderModel: FluxPipeline's text_encoder_2, SD3's text_encoder_3)
T5_PATH = re.compile(r"^(?:shared|encoder\.(?:block|embed_tokens|final_layer_norm))(?:\.|$)")


def clip_paths(path: str) -> list[str]:
    """A text-encoder module path, followed by the same module in CLIP's other saved layout when it is a CLIP path
    (a T5's encoder.block.… is not)."""
    match = CLIP_TEXT_MODEL.match(path)
    if match is None:
        return [path]
    return [path, path[match.end():] if match.group(1) else f"text_model.{path}"]


def thirds(shape: tuple[int, ...]) -> list[int] | None:
    return [shape[0] // 3] * 3 if shape[0] % 3 == 0 else None


def halves(shape: tuple[int, ...]) -> list[int] | None:
    return [shape[0] // 2] * 2 if shape[0] % 2 == 0 else None


def grouped_qkv(shape: tuple[int, ...]) -> list[int] | None:
    """Lumina2's qkv with grouped-query heads: q of the hidden size (the tensor's columns), k and v alike of the rest
    (Lumina-Image 2.0: 2304, 768, 768). A pipeline's are split by its parts' own rows (VirtualTensor.rows)."""
    rest = shape[0] - shape[1]
    return [shape[1], rest // 2, rest // 2] if rest > 0 and rest % 2 == 0 else None


def qkv_and_mlp(shape: tuple[int, ...]) -> list[int] | None:
    """FLUX linear1: q, k, v of the hidden size (the tensor's columns), then the MLP's input rows."""
    hidden = shape[1]
    return [hidden] * 3 + [shape[0] - 3 * hidden] if shape[0] > 3 * hidden else None


@dataclass(frozen=True)
class Fused:
    """A tensor that holds the weights of several modules (its parts) as blocks of its rows. A part is named by the
    owner's path and the leaf of the split module it stands for (transformers' CLIP, diffusers' FLUX), so a LoRA's
    targets read the same bound as unbound."""

    owner: re.Pattern
    """The owner module's path, searched (anchored with ^ where the owner starts the name: a classifier's DINOv2 is
    under dinov2.)."""
    suffix: str
    """The tensor's name after the owner's path."""
    parts: tuple[str, ...]
    """The parts' leaves, in row order."""
    sizes: Callable[[tuple[int, ...]], "list[int] | None"]
    """Rows of each part, from the tensor's shape (None: a shape that does not split so)."""
    whole: bool = False
    """The tensor is one nn.Linear's weight in the model the checkpoint is trained as (Black Forest Labs' FLUX,
    SD3's MMDiT), which sd-scripts trains and extracts whole (flux_extract_lora.py): extract keeps it one module, and
    a LoRA on its parts is written to kohya joined. Otherwise (OpenCLIP's in_proj_weight, a parameter of
    nn.MultiheadAttention; DINOv2's weights_in, which transformers 5 splits on load) the parts are the modules LoRA
    trainers see: extract makes one module of each."""
    peft: bool = True
    """A part's path (owner and leaf) is a module of a model PEFT wraps, so a LoRA on the part can be written as PEFT
    under it (DINOv2's gate_proj: transformers 5's). Not OpenCLIP's q, k, v: rows of nn.MultiheadAttention's
    in_proj_weight, a parameter (transformers' CLIPTextModel, which has them, names them
    text_model.encoder.layers.N.self_attn.q_proj: the diffusers and kohya names); nor FLUX's and SD3's, rows of one
    Linear in the model the checkpoint is of (diffusers' FluxTransformer2DModel, which has them, names them
    transformer_blocks.N.attn.to_q). Under such names the part is written only as the adapter's own
    (formats.peft_unwritable_parts)."""
    unsized: tuple[str, ...] = ()
    """Parts whose rows are not the tensor's columns (the others' are): FLUX's proj_mlp; Lumina2's grouped-query k
    and v, as many rows as each other. Where an adapter lacks one, its rows are those of such a part it has, else
    unknown (formats.kohya, joining the parts)."""

    def owner_of(self, tensor: str) -> str | None:
        """The owner's path when ``tensor`` is one of these, else None."""
        owner = tensor.removesuffix(self.suffix)
        return owner if tensor.endswith(self.suffix) and self.owner.search(owner) else None

    def rows(self, tensor: str, shape: Sequence[int]) -> list[tuple[str, tuple[str, int, int, int]]] | None:
        """[(part module path, (tensor, first row, rows, the tensor's rows))] of one of these tensors of ``shape``,
        None for another tensor, or a shape that does not split so."""
        owner = self.owner_of(tensor)
        sizes = self.sizes(tuple(shape)) if owner is not None and len(shape) == 2 else None
        if sizes is None:
            return None
        firsts = itertools.accumulate(sizes[:-1], initial=0)
        return [(f"{owner}.{part}", (tensor, first, rows, sum(sizes)))
                for part, first, rows in zip(self.parts, firsts, sizes, strict=True)]


FUSED = (
    Fused(re.compile("^(?:" + "|".join(re.escape(e.prefix) for e in TEXT_ENCODERS if e.open_clip)
                     + r")transformer\.resblocks\.\d+\.attn$"),
          ".in_proj_weight", ("q_proj", "k_proj", "v_proj"), thirds, peft=False),
    Fused(re.compile(DIT + r"double_blocks\.\d+\.img_attn\.qkv$"), ".weight", QKV, thirds, whole=True, peft=False),
    Fused(re.compile(DIT + r"double_blocks\.\d+\.txt_attn\.qkv$"), ".weight", ADD_QKV, thirds, whole=True,
          peft=False),
    Fused(re.compile(DIT + r"single_blocks\.\d+\.linear1$"), ".weight", (*QKV, "proj_mlp"), qkv_and_mlp, whole=True,
          peft=False, unsized=("proj_mlp",)),
    # HunyuanVideo's (its single blocks' linear1 is FLUX's, above)
    Fused(re.compile(DIT + r"double_blocks\.\d+\.img_attn_qkv$"), ".weight", QKV, thirds, whole=True, peft=False),
    Fused(re.compile(DIT + r"double_blocks\.\d+\.txt_attn_qkv$"), ".weight", ADD_QKV, thirds, whole=True, peft=False),
    # Wan Animate's face adapter: k and v
    Fused(re.compile(DIT + r"face_adapter\.fuser_blocks\.\d+\.linear1_kv$"), ".weight", ("to_k", "to_v"), halves,
          whole=True, peft=False),
    Fused(re.compile(DIT + r"txt_in\.individual_token_refiner\.blocks\.\d+\.self_attn_qkv$"), ".weight", QKV, thirds,
          whole=True, peft=False),
    Fused(re.compile(DIT + r"joint_blocks\.\d+\.x_block\.attn2?\.qkv$"), ".weight", QKV, thirds, whole=True,
          peft=False),
    Fused(re.compile(DIT + r"joint_blocks\.\d+\.context_block\.attn\.qkv$"), ".weight", ADD_QKV, thirds, whole=True,
          peft=False),
    Fused(re.compile(DIT + r"(?:layers|noise_refiner|context_refiner)\.\d+\.attention\.qkv$"), ".weight", QKV,
          grouped_qkv, whole=True, peft=False, unsized=("to_k", "to_v")),
    # DINOv2's SwiGLU MLP: transformers 5 splits weights_in into gate_proj and up_proj in memory
    Fused(re.compile(r"(?:^|\.)encoder\.layer\.\d+\.mlp$"), ".weights_in.weight", ("gate_proj", "up_proj"), halves),
)


def fused(tensor: str) -> Fused | None:
    """The entry of FUSED that ``tensor`` is one of, or None."""
    return next((entry for entry in FUSED if entry.owner_of(tensor) is not None), None)


def parts(tensor: str) -> list[str]:
    """The module paths of a fused tensor's parts (``…attn.in_proj_weight`` → ``…attn.q_proj``, ``…attn.k_proj``,
    ``…attn.v_proj``), [] for any other tensor."""
    entry = fused(tensor)
    return [] if entry is None else [f"{entry.owner_of(tensor)}.{part}" for part in entry.parts]


def split(tensor: str, shape: Sequence[int], *, whole: bool = False) -> list[tuple[str, tuple[str, int, int, int]]]:
    """The parts of a fused tensor, each with its rows (as fused_target gives them), when its Fused.whole is
    ``whole``. False: the modules extract makes of a tensor that no module holds whole (OpenCLIP's in_proj_weight →
    q_proj, k_proj, v_proj; DINOv2's weights_in → gate_proj, up_proj). True: FLUX's and SD3's, one Linear each,
    which diffusers names only in parts (``…img_attn.qkv.weight`` → ``…img_attn.qkv.to_q``, to_k, to_v). [] for any
    other tensor, and for a shape that does not split."""
    entry = fused(tensor)
    return [] if entry is None or entry.whole != whole else entry.rows(tensor, shape) or []


# Stable Video Diffusion's UNet (sgm's VideoUNet) in diffusers' UNetSpatioTemporalConditionModel, as diffusers'
# scripts/convert_svd_to_diffusers.py converts it: SD's table, but a VideoResBlock is a SpatioTemporalResBlock (its
# own layers → spatial_res_block, its time_stack ResBlock → temporal_res_block) and a SpatialVideoTransformer's
# time_stack is temporal_transformer_blocks, its time_pos_embed Sequential a TimestepEmbedding (diffusers prefix →
# checkpoint prefix, inside a resnet or an attention)
VIDEO_RESNET = {"spatial_res_block.": "", "temporal_res_block.": "time_stack."}
VIDEO_ATTENTION = {"temporal_transformer_blocks.": "time_stack.", "time_pos_embed.linear_1": "time_pos_embed.0",
                   "time_pos_embed.linear_2": "time_pos_embed.2"}


def unet_path(ldm: str, sdxl: bool | None = None, *, video: bool = False) -> str | None:
    """The diffusers path of an LDM UNet module path (relative to ``model.diffusion_model.``), or None for a path
    outside the blocks this translation knows. ``input_blocks.4.1.proj_in`` → ``down_blocks.1.attentions.0.proj_in``.
    ``sdxl``: the UNet's family (is_sdxl), which names label_emb: False (SD 2.x unCLIP) class_embedding, else SDXL's
    add_embedding (SVD's too); ``video``: Stable Video Diffusion's UNet (VIDEO_RESNET, VIDEO_ATTENTION)."""
    if ldm in UNET_TOP:
        return UNET_TOP[ldm]
    if ldm in LABEL_EMB:
        return f"{'class_embedding' if sdxl is False else 'add_embedding'}.{LABEL_EMB[ldm]}"
    match = BLOCK_RE.match(ldm)
    if match is None:
        return None
    kind, n, rest = match["kind"], int(match["n"]), match["rest"]
    if kind == "middle_block":  # resnet, attention, resnet; no sub-index
        if match["m"] is not None:
            rest = f"{match['m']}.{rest}"
        return f"mid_block.attentions.0.{attention(rest)}" if n == 1 else \
            resnet(f"mid_block.resnets.{n // 2}", rest, video)
    if match["m"] is None:
        return None
    m = int(match["m"])
    if kind == "input_blocks":
        if n == 0:
            return None
        block, slot = divmod(n - 1, 3)  # two (resnet, attention) slots, then the downsampler
        if slot == 2:
            return f"down_blocks.{block}.downsamplers.0.conv" if (m, rest) == (0, "op") else None
        if m == 0:
            return resnet(f"down_blocks.{block}.resnets.{slot}", rest, video)
        return f"down_blocks.{block}.attentions.{slot}.{attention(rest)}" if m == 1 else None
    block, slot = divmod(n, 3)  # output blocks: three (resnet, attention?) slots, the last ends with the upsampler
    if m == 0:
        return resnet(f"up_blocks.{block}.resnets.{slot}", rest, video)
    if rest == "conv" and slot == 2:  # an Upsample's only weight; a transformer block has no direct "conv"
        return f"up_blocks.{block}.upsamplers.0.conv"
    return f"up_blocks.{block}.attentions.{slot}.{attention(rest)}" if m == 1 else None


def resnet(prefix: str, rest: str, video: bool = False) -> str | None:
    """A resnet's module: SD's ResBlock, or (``video``) SVD's VideoResBlock, its time_stack included."""
    if video:
        block = "temporal_res_block." if rest.startswith(VIDEO_RESNET["temporal_res_block."]) else "spatial_res_block."
        return resnet(prefix + "." + block[:-1], rest.removeprefix(VIDEO_RESNET[block]))
    return f"{prefix}.{RESNET[rest]}" if rest in RESNET else None


def attention(rest: str) -> str:
    """A module inside an attention (a SpatialTransformer's keeps its name; SVD's time_stack and time_pos_embed are
    renamed: VIDEO_ATTENTION, whose names no other UNet has)."""
    return next((diffusers + rest[len(ldm):] for diffusers, ldm in VIDEO_ATTENTION.items() if rest.startswith(ldm)),
                rest)


DIFFUSERS_UNET = "unet."
DIFFUSERS_BLOCK_RE = re.compile(r"^(?P<kind>down_blocks|up_blocks|mid_block)\.(?:(?P<level>\d+)\.)?"
                                r"(?P<part>resnets|attentions|downsamplers|upsamplers)\.(?P<slot>\d+)\.(?P<rest>.+)$")
# the top-level modules back (label_emb by SDXL's name alone: class_embedding is also the x4 upscaler's label_emb and
# AudioLDM's film_emb)
UNET_TOP_BACK = {diffusers: path for path, diffusers in UNET_TOP.items() if diffusers != "class_embedding"} | {
    f"add_embedding.{diffusers}": path for path, diffusers in LABEL_EMB.items()}
RESNET_BACK = {diffusers: path for path, diffusers in RESNET.items()}
# every module (and tensor) of an SD-family diffusers UNet (two resnets per down level, three per up level, attention
# in Transformer2DModels; SVD's spatio-temporal ones: VIDEO_RESNET, VIDEO_ATTENTION): a UNet with any other (DeepFloyd
# IF's or Kandinsky's three resnets per level and bare attention processors) is no SD UNet to these rules
_RESNET = r"(?:(?:spatial|temporal)_res_block\.)?(?:norm1|conv1|time_emb_proj|norm2|conv2|conv_shortcut)"
_TRANSFORMER = (r"(?:norm|proj_in|proj_out|time_pos_embed\.linear_[12]|(?:temporal_)?transformer_blocks\.\d+\."
                r"(?:norm_in|norm[123]|attn[12]\.(?:to_[qkv]|to_out\.0)|ff(?:_in)?\.net\.(?:0\.proj|2)))")
SD_DIFFUSERS_UNET = re.compile(
    r"(?:time_embedding\.(?:linear_[12]|cond_proj)|conv_in|conv_out|conv_norm_out|add_embedding\.linear_[12]|"
    r"class_embedding(?:\.linear_[12])?|"
    rf"down_blocks\.\d+\.(?:resnets\.[01]\.{_RESNET}|attentions\.[01]\.{_TRANSFORMER}|downsamplers\.0\.conv)|"
    rf"up_blocks\.\d+\.(?:resnets\.[012]\.{_RESNET}|attentions\.[012]\.{_TRANSFORMER}|upsamplers\.0\.conv)|"
    rf"mid_block\.(?:resnets\.[01]\.{_RESNET}|attentions\.0\.{_TRANSFORMER}))$")


def attending_up_levels(names: Iterable[str]) -> set[int]:
    """The up levels of a diffusers UNet (``up_blocks.N``) that ``names`` show attentions of."""
    return {int(m["level"]) for n in names if (m := DIFFUSERS_BLOCK_RE.match(n.removeprefix(DIFFUSERS_UNET)))
            and m["kind"] == "up_blocks" and m["part"] == "attentions"}


def ldm_levels(names: Iterable[str]) -> bool:
    """Whether a whole diffusers UNet (its module names) has two resnets in each down level and three in each up
    level, the layout checkpoint paths number (input_blocks.3·level + slot + 1, output_blocks.3·level + slot), as
    every SD 1.x/2.x/SDXL UNet has. A distilled UNet of one resnet a level holds its modules at other paths: taken
    for this layout, an up level's second resnet was its first, and an sgm-named LoRA of it bound there silently
    where the two shapes agree."""
    slots: dict[tuple[str, str], set[int]] = {}
    for name in names:
        match = DIFFUSERS_BLOCK_RE.match(name.removeprefix(DIFFUSERS_UNET))
        if match and match["part"] == "resnets" and match["kind"] != "mid_block":
            slots.setdefault((match["kind"], match["level"]), set()).add(int(match["slot"]))
    return all(held == ({0, 1} if kind == "down_blocks" else {0, 1, 2}) for (kind, _), held in slots.items())


def checkpoint_paths(names: Iterable[str], *, whole: bool = False,
                     attending: Iterable[int] | None = None) -> dict[str, str]:
    """{diffusers UNet module name ("unet.down_blocks.1.attentions.0.proj_in"): its checkpoint path
    ("model.diffusion_model.input_blocks.4.1.proj_in")} for the SD-family diffusers UNet names among ``names`` (an
    adapter's modules, or a pipeline's tensors): unet_path's inverse, SDXL's add_embedding as label_emb. An up level's
    upsampler sits behind its attention (output_blocks.N.2.conv) where that level attends, else as
    output_blocks.N.1.conv. Which levels attend: ``attending`` where given (the bound base's: up_attention), else
    those ``names`` show attentions of — all of them in a ``whole`` UNet (a pipeline's); in an adapter that shows none
    of a level its upsampler is left out: SDXL base's first up level attends, the refiner's does not. Nothing at all
    where any of them is no SD-family UNet's module (SD_DIFFUSERS_UNET), or a ``whole`` UNet is not of the layout
    checkpoint paths number (ldm_levels)."""
    names = [re.sub(r"\.(?:weight|bias)$", "", n) for n in names if n.startswith(DIFFUSERS_UNET)]
    if not all(SD_DIFFUSERS_UNET.match(n[len(DIFFUSERS_UNET):]) for n in names) or whole and not ldm_levels(names):
        return {}
    known = attending is not None
    attends = set(attending) if known else attending_up_levels(names)

    def upsampler_slot(level: int) -> int | None:
        return 2 if level in attends else 1 if whole or known else None

    paths = {name: checkpoint_unet_path(name[len(DIFFUSERS_UNET):], upsampler_slot) for name in names}
    return {name: UNET_PREFIX + path for name, path in paths.items() if path is not None}


def checkpoint_unet_path(path: str, upsampler_slot: Callable[[int], "int | None"]) -> str | None:
    """The LDM path (relative to model.diffusion_model.) of an SD-family diffusers UNet module path, or None outside
    the blocks unet_path translates. ``upsampler_slot``: where an up level's upsampler sits in its last output block
    (None: not known)."""
    if path in UNET_TOP_BACK:
        return UNET_TOP_BACK[path]
    match = DIFFUSERS_BLOCK_RE.match(path)
    if match is None:
        return None
    kind, part, slot, rest = match["kind"], match["part"], int(match["slot"]), match["rest"]
    level = None if match["level"] is None else int(match["level"])
    if part == "resnets":
        video = next((prefix for prefix in VIDEO_RESNET if rest.startswith(prefix)), "")  # SVD's
        if rest[len(video):] not in RESNET_BACK:
            return None
        rest = VIDEO_RESNET.get(video, "") + RESNET_BACK[rest[len(video):]]
    elif part == "attentions":
        rest = next((ldm + rest[len(diffusers):] for diffusers, ldm in VIDEO_ATTENTION.items()
                     if rest.startswith(diffusers)), rest)
    if (kind == "mid_block") != (level is None):
        return None
    if kind == "mid_block":
        if part == "resnets" and slot < 2:
            return f"middle_block.{2 * slot}.{rest}"
        return f"middle_block.1.{rest}" if (part, slot) == ("attentions", 0) else None
    held = {"resnets": 0, "attentions": 1}.get(part)
    if kind == "down_blocks":
        if held is not None:
            return f"input_blocks.{3 * level + slot + 1}.{held}.{rest}" if slot < 2 else None
        return f"input_blocks.{3 * level + 3}.0.op" if (part, slot, rest) == ("downsamplers", 0, "conv") else None
    if held is not None:
        return f"output_blocks.{3 * level + slot}.{held}.{rest}" if slot < 3 else None
    where = upsampler_slot(level) if (part, slot, rest) == ("upsamplers", 0, "conv") else None
    return None if where is None else f"output_blocks.{3 * level + 2}.{where}.conv"


def open_clip_path(path: str) -> str | None:
    """transformers' CLIP path of an OpenCLIP text-encoder module path: ``transformer.resblocks.3.mlp.c_fc`` →
    ``text_model.encoder.layers.3.mlp.fc1``; None for the modules LoRAs do not target."""
    match = OPEN_CLIP_LAYER_RE.match(path)
    if match is None or match["rest"] not in OPEN_CLIP_MODULES:
        return None
    return f"text_model.encoder.layers.{match['layer']}.{OPEN_CLIP_MODULES[match['rest']]}"


def dit_path(path: str, top: dict[str, str] | None = None) -> str | None:
    """diffusers' path of a FLUX.1 or SD3 module path (original names, parts of fused tensors included):
    ``double_blocks.3.img_attn.qkv.to_k`` → ``transformer_blocks.3.attn.to_k``. ``top``: the family's embedders and
    final layer (img_in, t_embedder…), names too plain to translate outside a checkpoint known to be of it."""
    if top is not None and path in top:
        return top[path]
    match = DIT_BLOCK_RE.match(path)
    if match is None:
        return None
    block, table = DIT_BLOCKS[match["kind"]]
    rest = table.get(match["rest"])
    return None if rest is None else f"{block}.{match['n']}.{rest}"


def checkpoint_modules(tensors: Iterable[str]) -> list[str]:
    """The module paths of a checkpoint's tensor names: ``X.weight`` → X, plus the parts of fused tensors
    (OpenCLIP ``X.in_proj_weight`` → ``X.q_proj``, ``X.k_proj``, ``X.v_proj``; FLUX ``…img_attn.qkv.weight`` →
    ``…img_attn.qkv.to_q`` …)."""
    modules = []
    for tensor in tensors:
        if tensor.endswith(".weight"):
            modules.append(tensor[: -len(".weight")])
        modules += parts(tensor)
    return modules


def diffusers_names(tensors: Iterable[str]) -> dict[str, str]:
    """{diffusers module path ("unet.down_blocks.0…", "text_encoder.text_model…", "transformer.…"): checkpoint
    module path} for the tensors of a single-file SD, FLUX.1 or SD3 checkpoint; empty for any other base. The names
    adapters are bound by: an SD 2.x unCLIP label_emb also under the add_embedding name loraops once wrote for it."""
    tensors = list(tensors)
    top = next((top for mark, top in DIT_MARKS if any(mark.match(t) for t in tensors)), None)
    sdxl, other = is_sdxl(tensors), other_unet(tensors)
    out = {}
    video = other is not None and other.video
    for module in checkpoint_modules(tensors):
        name = diffusers_name(module, top=top, sdxl=sdxl, video=video)
        if name is not None:
            out[name] = module
        if sdxl is False and name is not None and name.startswith("unet.class_embedding."):
            # unCLIP's label_emb under SDXL's name too, which loraops wrote for it before (no SD 1.x/2.x module has it)
            out[diffusers_name(module, sdxl=True)] = module
    return out


def in_dit_block(module: str) -> bool:
    """Is this checkpoint module path inside a FLUX.1 or SD3 block (double_blocks, single_blocks, joint_blocks)?"""
    return DIT_BLOCK_RE.match(module.removeprefix(UNET_PREFIX)) is not None


def dit_top(modules: Iterable[str], metadata: dict[str, str] | None = None) -> dict[str, str] | None:
    """The top-level names of the DiT family whose blocks these bound module paths include, or that ``metadata`` (a
    bound adapter's: versioned) names — FLUX.1's flux1, for an adapter of its text encoders alone (None: neither)."""
    kinds = {m["kind"] for m in (DIT_BLOCK_RE.match(module.removeprefix(UNET_PREFIX)) for module in modules) if m}
    if not kinds and (metadata or {}).get("ss_base_model_version") == "flux1":
        return FLUX_TOP
    return SD3_TOP if "joint_blocks" in kinds else FLUX_TOP if kinds else None


def diffusers_name(module: str, *, top: dict[str, str] | None = None, sdxl: bool | None = None,
                   video: bool = False) -> str | None:
    """The diffusers path of a checkpoint module (component included), or None outside the parts translated.
    ``top``: the DiT family's top-level names, when the checkpoint is known to be of it (see dit_path; FLUX_TOP also
    names its T5 as FluxPipeline does); ``sdxl``, ``video``: the SD UNet's family (see unet_path)."""
    path = dit_path(module.removeprefix(UNET_PREFIX), top)
    if path is not None:
        return f"transformer.{path}"
    if module.startswith(UNET_PREFIX):
        path = unet_path(module[len(UNET_PREFIX):], sdxl, video=video)
        return None if path is None else f"unet.{path}"
    encoder = text_encoder(module)
    path = None if encoder is None else encoder.path(module)
    if path is None:
        return None
    return f"{(top is FLUX_TOP and encoder.flux_component) or encoder.component}.{path}"


def fused_target(module: str, manifest) -> tuple[str, int, int, int] | None:
    """(fused tensor, first row, rows, the tensor's rows) for a part of a fused tensor the checkpoint has
    (``…attn.q_proj`` of OpenCLIP's in_proj_weight; ``…img_attn.qkv.to_k``, ``…linear1.proj_mlp`` of FLUX), else None."""
    owner, _, part = module.rpartition(".")
    entry = next((e for e in FUSED if part in e.parts and e.owner.search(owner)), None)
    info = None if entry is None else manifest.get(owner + entry.suffix)
    blocks = None if info is None else entry.rows(owner + entry.suffix, info.shape)
    return None if blocks is None else dict(blocks)[module]


def sd_scripts_name(module: str, *, sdxl: bool) -> tuple[str, str] | None:
    """(diffusers component, path) that sd-scripts names a checkpoint module by, or None outside the parts
    translated. sd-scripts builds SD 1.x/2.x UNets with diffusers block names but SDXL's with the original ones
    (``lora_unet_input_blocks_4_1_…``), names text encoders as TEXT_ENCODERS says (SDXL's first ``lora_te1`` even
    alone, SD3's ``lora_te1``/``lora_te2``/``lora_te3``), and FLUX.1 and SD3 modules by their original paths
    (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_img_in``, also behind ComfyUI's
    ``model.diffusion_model.``; a part of a fused tensor has no sd-scripts name and keeps its checkpoint path)."""
    path = module.removeprefix(UNET_PREFIX)
    if (sdxl and module.startswith(UNET_PREFIX)) or in_dit_block(module):
        return "unet", path
    encoder = text_encoder(module)
    if encoder is not None:
        path = encoder.path(module)
        return None if path is None else (encoder.sd_scripts, path)
    name = diffusers_name(module, sdxl=sdxl)
    if name is None:  # behind the UNet's prefix and no SD UNet module: a DiT's embedders and final layer
        return ("unet", path) if module.startswith(UNET_PREFIX) else None
    component, path = name.split(".", 1)
    return component, path


# a single-file checkpoint's VAE (the LDM/SGM first_stage_model, ComfyUI's bundled vae.): no LoRA loader applies a
# LoRA to it (sd-scripts, A1111, ComfyUI, diffusers load UNet/DiT and text-encoder modules), and kohya's extract
# leaves it out
VAE_PREFIXES = ("first_stage_model.", "vae.")


# the header fields sd_scripts_metadata decides
VERSION_KEYS = ("ss_base_model_version", "ss_v2", "ss_network_module")
# sd-scripts' only SDXL version (sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0), the refiner's too: sd-scripts builds
# SDXL's UNet in the base's shape alone (it trains no refiner LoRA and has no refiner version), A1111 files a LoRA
# under SDXL by the "sdxl_" prefix alone (extensions-builtin/Lora/network.py, detect_version), ComfyUI reads no
# version; the SAI model spec's stable-diffusion-xl-v1-refiner is a modelspec.architecture, which loraops does not write
SDXL = {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}
SD1 = {"ss_base_model_version": "sd_v1", "ss_v2": "False"}
SD2 = {"ss_base_model_version": "sd_v2_v", "ss_v2": "True"}
# SD UNet modules (or their tensors), under the checkpoint's names, that only SDXL's UNet (base or refiner) has: a
# transformer block more than one layer deep (SD 1.x/2.x have one everywhere; SDXL base 2 and 10, the refiner 4), or
# attention in the first output level (the base's: output_blocks 0–2, whose upsampler then sits in slot 2, where an
# SD UNet's output_blocks.2.1.conv is the upsampler); and that only SD 1.x/2.x's has: attention in the first input
# level or the last output level (input_blocks 1–2, output_blocks 9–11: SDXL has none there, base or refiner)
SDXL_UNET = re.compile(re.escape(UNET_PREFIX) + r"(?:(?:input_blocks|middle_block|output_blocks)\.[\d.]*"
                       r"transformer_blocks\.[1-9]|output_blocks\.[0-2]\.(?:1\.(?!conv(?:\.|$))|2\.))")
SD_UNET = re.compile(re.escape(UNET_PREFIX) + r"(?:input_blocks\.[12]|output_blocks\.(?:9|10|11))\.1\.")
# the tensor whose width tells SD 2.x's UNet from 1.x's (its cross-attention reads OpenCLIP-H's 1024-wide context,
# 1.x CLIP-L's 768), as diffusers' single-file loader tells them (CHECKPOINT_KEY_NAMES["v2"])
SD2_CONTEXT = UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
# (and a pipeline's)
SD2_CONTEXTS = (SD2_CONTEXT, DIFFUSERS_UNET + "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight")
# the SAI model spec's architectures of SD 1.x/2.x and SDXL (stable-diffusion-v1, stable-diffusion-v2-768-v,
# stable-diffusion-xl-v1-base, each with its "/lora" suffix in a LoRA), as sd-scripts' sai_model_spec.py names them
SD_ARCHITECTURE = re.compile(r"stable-diffusion-(v[12]|xl)(?:[-/]|$)")


@dataclass(frozen=True)
class OtherUnet:
    """An SD-family UNet (the LDM/SGM UNetModel) that is none of SD 1.x/2.x/XL: sd-scripts trains none of them and has
    no version for them, and is_sdxl's structural rules do not hold for them (the x4 upscaler's and AudioLDM's first
    output level attends, as SDXL's does)."""

    name: str
    """What messages call it, and what the header records (OTHER_UNET_KEY) for an adapter bound to it."""
    mark: re.Pattern
    """Checkpoint module or tensor paths only this UNet has."""
    video: bool = False
    """Stable Video Diffusion's: diffusers' UNetSpatioTemporalConditionModel names its blocks by SD's conversion with
    its own resnets and temporal attention (unet_path's ``video``: resnets.N.spatial_res_block,
    temporal_transformer_blocks); the others' diffusers UNets are UNet2DConditionModels, named by SD's conversion."""


_UNET = re.escape(UNET_PREFIX)
OTHER_UNETS = (
    # sgm's VideoResBlock and SpatialVideoTransformer: time_stack, time_mixer; diffusers' SpatioTemporalResBlock and
    # TransformerSpatioTemporalModel: spatial_res_block, temporal_res_block, temporal_transformer_blocks, …
    OtherUnet("Stable Video Diffusion", re.compile(
        rf"(?:{_UNET}(?:.+\.)?(?:time_stack|time_mixer)|unet\.(?:.+\.)?(?:spatial_res_block|temporal_res_block|"
        r"temporal_transformer_blocks|time_pos_embed|time_mixer))(?:\.|$)"), video=True),
    # its FiLM projection, diffusers' class_embedding: a Linear, with a bias (the x4 upscaler's is an Embedding)
    AUDIOLDM := OtherUnet("AudioLDM", re.compile(_UNET + r"film_emb(?:\.|$)|unet\.class_embedding\.bias$")),
    # its noise-level label_emb, an nn.Embedding (diffusers' class_embedding: a weight and no bias)
    X4 := OtherUnet("SD x4 upscaler", re.compile(_UNET + r"label_emb(?:\.weight)?$")),
    # the tensor diffusers' single-file loader tells the upscaler by (CHECKPOINT_KEY_NAMES["upscale"]: the widening
    # into its fourth level, which no SD 1.x/2.x/XL UNet has), which AudioLDM's has too: which of them, tell_widening
    X4_OR_AUDIOLDM := OtherUnet("SD x4 upscaler or AudioLDM", re.compile(
        _UNET + r"input_blocks\.10\.0\.skip_connection(?:\.\w+)?$")),
)
# a diffusers UNet's cross-attention key and value projections (their input: what the attention reads)
CONTEXT_PROJECTION = re.compile(r"^unet\..+\.attn2\.to_[kv](?:\.weight)?$")


def tell_widening(names: Sequence[str], modules: Mapping[str, object]) -> OtherUnet:
    """Which UNet whose fourth level widens (X4_OR_AUDIOLDM's mark) a diffusers UNet's tensor or module names are (an
    adapter's modules with their shapes), by what differs: the class embedding (the x4 upscaler's noise-level
    nn.Embedding, a weight alone; AudioLDM's FiLM Linear, whose bias is its mark) and what cross-attention reads —
    AudioLDM's its own level's features (diffusers' conversion sets cross_attention_dim to block_out_channels: key
    and value map a level's width to itself, one width per level), the upscaler's one text context for every level.
    X4_OR_AUDIOLDM itself where nothing there says."""
    embedding = getattr(modules.get(DIFFUSERS_UNET + "class_embedding"), "kind", None)
    if embedding in ("linear", "embedding") or DIFFUSERS_UNET + "class_embedding.weight" in names:
        return AUDIOLDM if embedding == "linear" else X4
    shapes = [tuple(getattr(m, "weight_shape", None) or getattr(m, "shape", ())) for n, m in modules.items()
              if CONTEXT_PROJECTION.match(n)]
    shapes = [shape for shape in shapes if len(shape) == 2]
    if any(out != width for out, width in shapes):
        return X4
    return AUDIOLDM if len({width for _, width in shapes}) > 1 else X4_OR_AUDIOLDM


UP_ATTENTION_KEY = "loraops_unet_up_attention"
"""Metadata of an adapter bound to a diffusers pipeline whose UNet sd-scripts names by checkpoint paths (SDXL's, base
or refiner; the x4 upscaler's, AudioLDM's, SVD's), in memory (no writer writes it): the up levels that attend,
comma-separated ("" for none). Where an up level's upsampler sits (output_blocks.N.2.conv behind attention, else .1.conv) depends on
it, and an adapter of the upsampler alone does not say (up_attention)."""
OTHER_UNET_KEY = "loraops_unet"
"""Header metadata naming (OtherUnet.name) the UNet of OTHER_UNETS an adapter was bound to: the few modules of an
adapter may not say it, and what they say otherwise (is_sdxl) would be false."""


UNET_LEVELS_KEY = "loraops_unet_levels"
"""Metadata of an adapter bound to a diffusers pipeline whose UNet sd-scripts would name by checkpoint paths but whose
levels are not the layout those number (ldm_levels: a distilled UNet), in memory ("other"): the kohya writer refuses
to name its modules so."""


def up_attention(metadata: dict[str, str] | None) -> list[int] | None:
    """The up levels the header says (UP_ATTENTION_KEY) the bound pipeline's UNet attends in, None where it says
    nothing, or nothing binding would record (a file's header that has the key: no writer writes it)."""
    recorded = (metadata or {}).get(UP_ATTENTION_KEY)
    if not isinstance(recorded, str) or not re.fullmatch(r"(?:\d+(?:,\d+)*)?", recorded):
        return None
    return [int(level) for level in recorded.split(",") if level]


def other_unet(names: Iterable[str], metadata: dict[str, str] | None = None) -> OtherUnet | None:
    """The UNet of OTHER_UNETS a checkpoint's tensor names, or an adapter's bound module names (with their shapes, as
    the adapter's modules: tell_widening) or its header (OTHER_UNET_KEY), say; else None."""
    recorded = (metadata or {}).get(OTHER_UNET_KEY)
    if recorded:
        return next((unet for unet in OTHER_UNETS if unet.name == recorded), None)
    modules = names if isinstance(names, Mapping) else {}
    names = list(names)
    names += checkpoint_paths(names).values()  # a pipeline's (or a diffusers LoRA's) UNet at its checkpoint paths
    unet = next((unet for unet in OTHER_UNETS if any(unet.mark.match(n) for n in names)), None)
    return tell_widening(names, modules) if unet is X4_OR_AUDIOLDM else unet


def is_sdxl(names: Iterable[str], metadata: dict[str, str] | None = None) -> bool | None:
    """Is the SD UNet of a single-file checkpoint (its tensor names) or of an adapter (its bound module names and
    header) SDXL's, base or refiner? sd-scripts names SDXL's UNet modules by their checkpoint paths and SD 1.x/2.x's
    by diffusers blocks, and diffusers names SDXL's label_emb add_embedding, unCLIP's class_embedding. Known by the
    text encoders (SDXL's conditioner.embedders., not any conditioner.: Stable Audio's conditioner.conditioners.;
    SD 1.x/2.x's cond_stage_model.), else by the UNet's structure (SDXL_UNET, SD_UNET; a diffusers-named UNet's,
    unet.…, at its checkpoint paths: checkpoint_paths), else by SDXL's second text encoder beside a diffusers-named
    UNet (text_encoder_2.), else by ``metadata``: the
    version it records (ss_base_model_version "sdxl…" or another; the SAI model spec's modelspec.architecture
    "stable-diffusion-xl…", or SD 1.x/2.x's "stable-diffusion-v1…"/"…-v2…"). None: nothing says (an adapter of a few
    UNet modules that every one of these UNets has, label_emb included, with no version recorded; and the UNets of
    OTHER_UNETS, which are neither)."""
    names = list(names)
    if other_unet(names, metadata) is not None:
        return None
    for sdxl, encoders in ((True, "conditioner.embedders."), (False, "cond_stage_model.")):
        if any(n.startswith(encoders) for n in names):
            return sdxl
    names += checkpoint_paths(names).values()  # a diffusers LoRA's or a pipeline's UNet (unet.…) at its paths
    for sdxl, structure in ((True, SDXL_UNET), (False, SD_UNET)):
        if any(structure.match(n) for n in names):
            return sdxl
    if any(n.startswith(UNET_PREFIX) for n in names) and any(n.startswith("text_encoder_2.") for n in names):
        return True  # SDXL's second text encoder beside a diffusers SD UNet (SD3's has no UNet)
    metadata = metadata or {}
    if metadata.get("ss_base_model_version"):
        return metadata["ss_base_model_version"].startswith("sdxl")
    architecture = SD_ARCHITECTURE.match(metadata.get("modelspec.architecture", ""))
    return None if architecture is None else architecture[1] == "xl"


def sd_scripts_metadata(tensors: Mapping[str, object]) -> dict[str, str]:
    """The header fields sd-scripts writes that a single-file checkpoint's tensors (name → anything with a shape)
    decide, as its extract_lora_from_models.py and flux_extract_lora.py write them: ss_base_model_version — SDXL's
    (by which the kohya writer names its UNet the SDXL way, input_blocks…, even when no text-encoder module says
    SDXL: is_sdxl), SD 1.x's, SD 2.x's ``sd_v2_v`` with ss_v2 (the tensors do not say whether it is
    v-parameterized; sd-scripts' extract takes --v_parameterization to default to --v2) — for an SD UNet alone, 2.x
    by SD2_CONTEXT, else 1.x, as diffusers' single-file loader tells them —, FLUX.1's ``flux1``, SD3's MMDiT model
    type (``medium``, ``5-large``, ``5-medium``), each with its ss_v2 (sd-scripts writes the two together, and reads
    SD 2.x from ss_v2 alone); and the network module of FLUX.1 (networks.lora_flux) and SD3 (networks.lora_sd3, as
    its lora_sd3.py)."""
    names = list(tensors)
    other = other_unet(names)
    if other is not None:  # no sd-scripts version: the UNet recorded for the writers instead (OTHER_UNET_KEY)
        return {OTHER_UNET_KEY: other.name}
    if any(FLUX_MARK.match(n) for n in names):
        return {"ss_base_model_version": "flux1", "ss_v2": "False", "ss_network_module": "networks.lora_flux"}
    if any(SD3_MARK.match(n) for n in names):
        # sd-scripts (sd3 branch) records the MMDiT's model type: sd3_train_network.py's load_target_model returns
        # mmdit.model_type as the model version that train_network.py writes as ss_base_model_version, and
        # sd3_utils.analyze_state_dict_state sets it "5-large" / "5-medium" with q/k norms (without / with x-block
        # attn2), else "medium" (SD3 Medium); ss_v2 is its args.v2, False
        version = ("5-medium" if any(SD3_X_ATTN2.match(n) for n in names) else "5-large") \
            if any(SD3_QK_NORM.match(n) for n in names) else "medium"
        return {"ss_base_model_version": version, "ss_v2": "False", "ss_network_module": "networks.lora_sd3"}
    sdxl = is_sdxl(names)
    if sdxl:
        return dict(SDXL)
    if any(n.startswith("cond_stage_model.model.") for n in names):
        return dict(SD2)
    if any(n.startswith("cond_stage_model.transformer.") for n in names):
        return dict(SD1)
    if sdxl is False:  # an SD UNet alone, or a pipeline's
        widths = {tuple(getattr(tensors.get(name), "shape", ()))[-1:] for name in SD2_CONTEXTS}
        return dict(SD2 if (1024,) in widths else SD1)
    return {}


def versioned(metadata: dict[str, str], tensors: Mapping[str, object]) -> dict[str, str]:
    """``metadata`` of an adapter bound to a base of ``tensors``, with the fields sd_scripts_metadata gives for that
    base where it has none (a diffusers file; a kohya file of a trainer that writes no ss_* header): the kohya writer
    names SDXL's UNet by them. A file that names no version takes ss_v2 with the base's version, whatever it says
    (loraops writes "False" where it cannot place an adapter): "sd_v2_v" beside ss_v2 "False" reads as SD 1.x to
    sd-scripts. The base's network module replaces the adapter's own: what the kohya writer writes is sd-scripts'
    plain LoRA for the base's family, whatever network the file names (LyCORIS', or networks.lora that loraops wrote
    for FLUX before); so does the base's UNet of OTHER_UNETS (OTHER_UNET_KEY), and a pipeline base's attending up
    levels (UP_ATTENTION_KEY) where sd-scripts names its UNet by checkpoint paths."""
    base = sd_scripts_metadata(tensors)
    placed = bool(metadata.get("ss_base_model_version")) or "ss_base_model_version" not in base
    # (the base says, or nothing does)
    metadata = {k: v for k, v in metadata.items() if k not in (OTHER_UNET_KEY, UP_ATTENTION_KEY, UNET_LEVELS_KEY)}
    if base.get("ss_base_model_version", "").startswith("sdxl") or OTHER_UNET_KEY in base:
        # its modules, not its tensors: SVD's UNet also holds parameters of no module (time_mixer.mix_factor), which
        # checkpoint_paths takes for a UNet of other blocks
        pipeline = [name for name in checkpoint_modules(tensors) if name.startswith(DIFFUSERS_UNET)]
        if checkpoint_paths(pipeline, whole=True):
            metadata[UP_ATTENTION_KEY] = ",".join(map(str, sorted(attending_up_levels(pipeline))))
        elif pipeline and not ldm_levels(pipeline):
            metadata[UNET_LEVELS_KEY] = "other"
    return {**metadata, **{k: v for k, v in base.items()
                           if k in ("ss_network_module", OTHER_UNET_KEY) or not placed or not metadata.get(k)}}


@dataclass(frozen=True)
class VirtualTensor:
    """A checkpoint tensor a pipeline stores under other names or in parts (pipeline_dit): what binding reads of one."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    pipeline: str | None = None
    """The pipeline's tensor it is (``transformer.….weight``); None for one stacked from parts."""
    swapped: bool = False
    """The pipeline holds it with its two halves of rows swapped: an adaLN projection whose shift and scale diffusers
    swaps (swap_scale_shift): a delta's rows map by the same swap."""
    parts: tuple[tuple[str, str], ...] = ()
    """One stacked from parts: (part module path, the pipeline's module holding that part), in row order."""
    rows: tuple[int, ...] = ()
    """Each part's rows, as the pipeline's module holding it has them (Lumina2's grouped-query k and v are fewer
    than q's; its config says how many)."""

    def pieces(self) -> list[tuple[str, tuple[str, int, int, int]]]:
        """[(part module path, (this tensor, first row, rows, all rows))] of one stacked from parts, as
        Fused.rows gives them, by the pipeline's own rows."""
        firsts = itertools.accumulate(self.rows[:-1], initial=0)
        return [(part, (self.name, first, rows, self.shape[0]))
                for (part, _), first, rows in zip(self.parts, firsts, self.rows, strict=True)]


def dit_inverse(flux: bool, layout: DitLayout | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """diffusers' paths of FLUX.1's (else SD3's; ``layout``'s where given) transformer → the checkpoint's:
    ({"transformer_blocks.{n}.attn.to_q": "double_blocks.{n}.img_attn.qkv.to_q", …} for the blocks, {"x_embedder":
    "img_in", …} for the rest), as DIT_BLOCKS and FLUX_TOP / SD3_TOP map them the other way; the swapped adaLNs are
    not in them (pipeline_dit)."""
    if layout is None:
        kinds = ("double_blocks", "single_blocks") if flux else ("joint_blocks",)
        blocks = {kind: DIT_BLOCKS[kind] for kind in kinds}
    else:
        blocks = layout.blocks
    inverse = {f"{block}.{{n}}.{inner}": f"{kind}.{{n}}.{path}"
               for kind, (block, table) in blocks.items() for path, inner in table.items()}
    top = layout.top if layout is not None else FLUX_TOP if flux else SD3_TOP
    return inverse, {inner: path for path, inner in top.items()}


def pipeline_dit(manifest: Mapping[str, object], transformer_class: str | None = None) -> dict[str, object]:
    """A diffusers pipeline's FLUX.1 or SD3 transformer (``transformer.transformer_blocks.0.attn.to_q.weight`` …), or
    one of DIT_LAYOUTS' told by its ``transformer_class`` (Wan's ``transformer.blocks.0.attn1.to_q.weight``), as the
    single-file checkpoint's tensors that hold it (``double_blocks.0.img_attn.qkv.weight``: to_q, to_k, to_v stacked
    in FUSED's row order; ``blocks.0.self_attn.q.weight``), each {name: its info with that shape}, beside the
    pipeline's other tensors; {} for a base with no such transformer. LoRAs trained by sd-scripts or musubi-tuner
    (``lora_unet_double_blocks_0_img_attn_qkv``) or saved in the original layout name those tensors, which a pipeline
    stores under other names, or only in parts."""
    layout = dit_layout(transformer_class)
    flux = layout is None and any(t.startswith("transformer.single_transformer_blocks.") for t in manifest)
    if layout is None and ("transformer.transformer_blocks.0.attn.add_q_proj.weight" not in manifest or not (
            flux or "transformer.pos_embed.proj.weight" in manifest)):  # (diffusers' other DiTs: PixArt's, Sana's…)
        return {}
    inverse, top = dit_inverse(flux, layout)
    swaps = {"norm_out.linear": "final_layer.adaLN_modulation.1"} if layout is None else layout.swapped
    beside = {} if layout is None else {f"{held}.weight": path for path, held in layout.beside.items()}
    block = re.compile(r"^transformer\.(?P<block>[a-z_.]+)\.(?P<n>\d+)\.(?P<rest>.+)\.weight$")
    last = max((int(m["n"]) for m in map(block.match, manifest) if m and m["block"] == "transformer_blocks"),
               default=-1)
    out: dict[str, object] = {}
    parts: dict[str, dict[str, tuple[object, str]]] = {}  # fused tensor → {part leaf: (info, pipeline tensor)}
    for tensor, info in manifest.items():
        match, swapped, path = block.match(tensor), False, None
        if match is not None:
            path = inverse.get(f"{match['block']}.{{n}}.{match['rest']}", "").replace("{n}", match["n"]) or None
            if layout is None and not flux and match["rest"] == "norm1_context.linear":
                # SD3's context adaLN, row for row but in the last block, whose shift and scale halves diffusers swaps
                # (single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers): not in DIT_BLOCKS, which
                # cannot tell the last block by its path; here, it is the last block of the pipeline
                path = f"joint_blocks.{match['n']}.context_block.adaLN_modulation.1"
                swapped = int(match["n"]) == last
        inner = tensor.removeprefix("transformer.").removesuffix(".weight")
        if path is None and tensor.startswith("transformer.") and tensor.endswith(".weight"):
            # (the final adaLN — FLUX's, SD3's, HunyuanVideo's — swapped as SD3's last context one)
            path, swapped = (swaps[inner], True) if inner in swaps else (top.get(inner), False)
            if path is None and layout is not None and layout.keeps and inner not in layout.top:
                path = inner
        if tensor in beside:
            out[f"{beside[tensor]}.weight"] = VirtualTensor(f"{beside[tensor]}.weight", tuple(info.shape), info.dtype,
                                                             tensor)
        if not tensor.startswith("transformer."):
            out[tensor] = info
        elif path is not None:
            owner, _, leaf = path.rpartition(".")
            if fused(f"{owner}.weight") is not None:
                parts.setdefault(f"{owner}.weight", {})[leaf] = (info, tensor)
            else:
                out[f"{path}.weight"] = VirtualTensor(f"{path}.weight", tuple(info.shape), info.dtype, tensor, swapped)
    for tensor, found in parts.items():
        entry = fused(tensor)
        if set(found) == set(entry.parts) and len({found[p][0].shape[1:] for p in entry.parts}) == 1:
            first, sizes = found[entry.parts[0]][0], [found[p][0].shape[0] for p in entry.parts]
            owner = tensor.removesuffix(entry.suffix)
            out[tensor] = VirtualTensor(tensor, (sum(sizes), *first.shape[1:]), first.dtype, parts=tuple(
                (f"{owner}.{p}", found[p][1].removesuffix(".weight")) for p in entry.parts), rows=tuple(sizes))
    return out
