"""Single-file Stable Diffusion checkpoints (the original LDM / sgm layout that A1111, ComfyUI and sd-scripts save)
seen under diffusers names.

LoRAs name modules the diffusers way: sd-scripts builds SD 1.x/2.x UNets with diffusers block names
(``lora_unet_down_blocks_0_attentions_0_…``) and every text encoder as transformers' CLIP; diffusers-trained LoRAs
use ``unet.down_blocks.0.…``. A single-file checkpoint names the same UNet modules ``input_blocks.1.1.…`` and keeps
the OpenCLIP text encoders (SD 2.x, SDXL's second) in OpenCLIP's layout. This module gives every checkpoint module its
diffusers path, so both name styles bind to either kind of base, and names bound modules back as sd-scripts does:

    diffusers_names(tensors) -> {diffusers module path: checkpoint module path}     (binding LoRAs to a checkpoint)
    fused_target(module, manifest) -> (tensor, first row, rows) | None            (q/k/v inside in_proj_weight)
    sd_scripts_name(module, sdxl) -> (component, path) | None                      (naming them back, as sd-scripts)

The UNet translation is structural (read off the LDM path, not a table per model), for the SD-family UNets: two
resnets per down block and three per up block (SD 1.x, 2.x, XL), which is diffusers' conversion table
(scripts/convert_diffusers_to_original_stable_diffusion.py) generalised to blocks with or without attentions.
Transformer blocks keep their names in both layouts. OpenCLIP's attention stores q, k and v as the three row blocks
of one ``attn.in_proj_weight``; their modules get the checkpoint path ``…attn.q_proj`` (``k_proj``, ``v_proj``), which
names no tensor: fused_target says which rows of in_proj_weight such a module changes.
"""
from __future__ import annotations

import re
from typing import Iterable

UNET_PREFIX = "model.diffusion_model."
# checkpoint prefix of a CLIP text encoder saved with transformers' names → its diffusers component
TEXT_ENCODERS = (
    ("cond_stage_model.transformer.", "text_encoder"),  # SD 1.x
    ("conditioner.embedders.0.transformer.", "text_encoder"),  # SDXL's first (CLIP ViT-L)
)
# checkpoint prefix of an OpenCLIP text encoder → its diffusers component (named as transformers' CLIPTextModel)
OPEN_CLIP = (
    ("cond_stage_model.model.", "text_encoder"),  # SD 2.x (OpenCLIP ViT-H)
    ("conditioner.embedders.1.model.", "text_encoder_2"),  # SDXL's second (OpenCLIP ViT-bigG)
)
OPEN_CLIP_PREFIXES = tuple(prefix for prefix, _ in OPEN_CLIP)
OPEN_CLIP_LAYER_RE = re.compile(r"^transformer\.resblocks\.(?P<layer>\d+)\.(?P<rest>.+)$")
OPEN_CLIP_MODULES = {
    "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
    "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
FUSED = ("q_proj", "k_proj", "v_proj")  # the order of their row blocks in attn.in_proj_weight
RESNET = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
}
BLOCK_RE = re.compile(r"^(?P<kind>input_blocks|output_blocks|middle_block)\.(?P<n>\d+)\.(?:(?P<m>\d+)\.)?(?P<rest>.+)$")


def unet_path(ldm: str) -> str | None:
    """The diffusers path of an LDM UNet module path (relative to ``model.diffusion_model.``), or None for a path
    outside the blocks this translation knows. ``input_blocks.4.1.proj_in`` → ``down_blocks.1.attentions.0.proj_in``.
    """
    if ldm in UNET_TOP:
        return UNET_TOP[ldm]
    match = BLOCK_RE.match(ldm)
    if match is None:
        return None
    kind, n, rest = match["kind"], int(match["n"]), match["rest"]
    if kind == "middle_block":  # resnet, attention, resnet; no sub-index
        if match["m"] is not None:
            rest = f"{match['m']}.{rest}"
        return f"mid_block.attentions.0.{rest}" if n == 1 else resnet(f"mid_block.resnets.{n // 2}", rest)
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
            return resnet(f"down_blocks.{block}.resnets.{slot}", rest)
        return f"down_blocks.{block}.attentions.{slot}.{rest}" if m == 1 else None
    block, slot = divmod(n, 3)  # output blocks: three (resnet, attention?) slots, the last ends with the upsampler
    if m == 0:
        return resnet(f"up_blocks.{block}.resnets.{slot}", rest)
    if rest == "conv" and slot == 2:  # an Upsample's only weight; a transformer block has no direct "conv"
        return f"up_blocks.{block}.upsamplers.0.conv"
    return f"up_blocks.{block}.attentions.{slot}.{rest}" if m == 1 else None


def resnet(prefix: str, rest: str) -> str | None:
    return f"{prefix}.{RESNET[rest]}" if rest in RESNET else None


def open_clip_path(path: str) -> str | None:
    """transformers' CLIP path of an OpenCLIP text-encoder module path: ``transformer.resblocks.3.mlp.c_fc`` →
    ``text_model.encoder.layers.3.mlp.fc1``; None for the modules LoRAs do not target."""
    match = OPEN_CLIP_LAYER_RE.match(path)
    if match is None or match["rest"] not in OPEN_CLIP_MODULES:
        return None
    return f"text_model.encoder.layers.{match['layer']}.{OPEN_CLIP_MODULES[match['rest']]}"


def checkpoint_modules(tensors: Iterable[str]) -> list[str]:
    """The module paths of a checkpoint's tensor names: ``X.weight`` → X, and OpenCLIP's fused
    ``X.in_proj_weight`` → ``X.q_proj``, ``X.k_proj``, ``X.v_proj``."""
    modules = []
    for tensor in tensors:
        if tensor.endswith(".in_proj_weight") and tensor.startswith(OPEN_CLIP_PREFIXES):
            attn = tensor[: -len(".in_proj_weight")]
            modules += [f"{attn}.{part}" for part in FUSED]
        elif tensor.endswith(".weight"):
            modules.append(tensor[: -len(".weight")])
    return modules


def diffusers_names(tensors: Iterable[str]) -> dict[str, str]:
    """{diffusers module path ("unet.down_blocks.0…", "text_encoder.text_model…"): checkpoint module path} for the
    tensors of a single-file SD checkpoint; empty for any other base."""
    out = {}
    for module in checkpoint_modules(tensors):
        name = diffusers_name(module)
        if name is not None:
            out[name] = module
    return out


def diffusers_name(module: str) -> str | None:
    """The diffusers path of a checkpoint module (component included), or None outside the parts translated."""
    if module.startswith(UNET_PREFIX):
        path = unet_path(module[len(UNET_PREFIX):])
        return None if path is None else f"unet.{path}"
    for prefix, component in TEXT_ENCODERS:
        if module.startswith(prefix):
            return f"{component}.{module[len(prefix):]}"
    for prefix, component in OPEN_CLIP:
        if module.startswith(prefix):
            path = open_clip_path(module[len(prefix):])
            return None if path is None else f"{component}.{path}"
    return None


def fused_target(module: str, manifest) -> tuple[str, int, int] | None:
    """(in_proj_weight tensor, first row, rows) for an OpenCLIP ``…attn.q_proj`` / ``k_proj`` / ``v_proj`` module
    whose checkpoint has that fused tensor (3·d rows: q, then k, then v), else None."""
    attn, _, part = module.rpartition(".")
    if part not in FUSED or not attn.startswith(OPEN_CLIP_PREFIXES):
        return None
    tensor = f"{attn}.in_proj_weight"
    info = manifest.get(tensor)
    if info is None or len(info.shape) != 2 or info.shape[0] % 3:
        return None
    rows = info.shape[0] // 3
    return tensor, FUSED.index(part) * rows, rows


def sd_scripts_name(module: str, *, sdxl: bool) -> tuple[str, str] | None:
    """(diffusers component, path) that sd-scripts names a checkpoint module by, or None outside the parts
    translated. sd-scripts builds SD 1.x/2.x UNets with diffusers block names but SDXL's with the original ones
    (``lora_unet_input_blocks_4_1_…``), and calls SDXL's first text encoder ``lora_te1`` even alone."""
    if sdxl and module.startswith(UNET_PREFIX):
        return "unet", module[len(UNET_PREFIX):]
    name = diffusers_name(module)
    if name is None:
        return None
    component, path = name.split(".", 1)
    return ("text_encoder_1" if module.startswith("conditioner.") and component == "text_encoder" else component), path
