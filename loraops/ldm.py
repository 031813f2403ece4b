"""Single-file Stable Diffusion checkpoints (the original LDM / sgm layout that A1111, ComfyUI and sd-scripts save)
seen under diffusers names.

LoRAs name modules the diffusers way: sd-scripts builds SD 1.x/2.x UNets with diffusers block names
(``lora_unet_down_blocks_0_attentions_0_…``) and the text encoders as transformers' CLIP; diffusers-trained LoRAs
use ``unet.down_blocks.0.…``. A single-file checkpoint names the same UNet modules ``input_blocks.1.1.…``. This
module gives every checkpoint module its diffusers path, so both name styles bind to either kind of base:

    diffusers_names(modules) -> {diffusers module path: checkpoint module path}     (binding LoRAs to a checkpoint)
    sd_scripts_name(module, sdxl) -> (component, path) | None                      (naming them back, as sd-scripts)

The UNet translation is structural (read off the LDM path, not a table per model), for the SD-family UNets: two
resnets per down block and three per up block (SD 1.x, 2.x, XL), which is diffusers' conversion table
(scripts/convert_diffusers_to_original_stable_diffusion.py) generalised to blocks with or without attentions.
Transformer blocks keep their names in both layouts. The OpenCLIP text encoders (SD 2.x, SDXL's second) store q, k
and v fused in one ``in_proj_weight`` and have no per-module diffusers counterpart here; they are not translated.
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


def diffusers_names(modules: Iterable[str]) -> dict[str, str]:
    """{diffusers module path ("unet.down_blocks.0…", "text_encoder.text_model…"): checkpoint module path} for the
    modules of a single-file SD checkpoint; empty for any other base."""
    out = {}
    for module in modules:
        if module.startswith(UNET_PREFIX):
            path = unet_path(module[len(UNET_PREFIX):])
            if path is not None:
                out[f"unet.{path}"] = module
            continue
        for prefix, component in TEXT_ENCODERS:
            if module.startswith(prefix):
                out[f"{component}.{module[len(prefix):]}"] = module
    return out


def sd_scripts_name(module: str, *, sdxl: bool) -> tuple[str, str] | None:
    """(diffusers component, path) that sd-scripts names a checkpoint module by, or None for a path outside a
    single-file SD checkpoint. sd-scripts builds SD 1.x/2.x UNets with diffusers block names but SDXL's with the
    original ones (``lora_unet_input_blocks_4_1_…``); SDXL's first text encoder is always ``lora_te1``."""
    if module.startswith(UNET_PREFIX):
        path = module[len(UNET_PREFIX):]
        return "unet", path if sdxl else (unet_path(path) or path)
    if module.startswith("conditioner.embedders.0.transformer."):
        return "text_encoder_1", module[len("conditioner.embedders.0.transformer."):]
    if module.startswith("cond_stage_model.transformer."):
        return "text_encoder", module[len("cond_stage_model.transformer."):]
    return None
