"""Block weights of a Stable Diffusion LoRA (sd-scripts' ``--lbws``, after the "LoRA Block Weight" extension): each
U-Net block's ΔW, and the text encoders', multiplied by a weight of its own. The blocks are the original (LDM) U-Net's:
BASE (the text encoders), IN00…IN11 (``input_blocks.N``), MID (``middle_block``), OUT00…OUT11 (``output_blocks.N``);
SDXL's U-Net has IN00…IN08 and OUT00…OUT08. A list of weights names some of them, by its length (sd-scripts'
svd_merge_lora.py LAYER17/26 for SD 1.x/2.x, LAYER12/20 for SDXL); the modules of blocks it does not name keep
weight 1, as sd-scripts'."""
from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Iterable, Sequence

from .errors import InvalidInputError
from .formats.common import overflows_float32
from .lazy import LazyModule
from .references import argument, checked_weight, is_finite, parse_number, written_nonzero

if TYPE_CHECKING:
    from . import adapter as adapter_module
else:
    adapter_module = LazyModule("loraops.adapter")  # what annotations name resolves when they are read: lazy.py

ALL = ("BASE", *(f"IN{n:02d}" for n in range(12)), "MID", *(f"OUT{n:02d}" for n in range(12)))
SD, SDXL = "SD 1.x/2.x", "SDXL"
LAYOUTS = {
    26: (SD, ALL),
    17: (SD, ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{n:02d}" for n in range(3, 12)))),
    20: (SDXL, ("BASE", *(f"IN{n:02d}" for n in range(9)), "MID", *(f"OUT{n:02d}" for n in range(9)))),
    12: (SDXL, ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{n:02d}" for n in range(6)))),
}
"""Number of weights → (the U-Net they are for, the blocks they weigh, in order)."""
SD_ONLY = frozenset(ALL[10:13] + ALL[-3:])
"""IN09…IN11, OUT09…OUT11: blocks SDXL's U-Net does not have."""
COUNTS = "17 or 26 (SD 1.x/2.x) or 12 or 20 (SDXL)"
# The "LoRA Block Weight" extension's preset names, which users copy from it and from model pages: its default presets
# (DEF_WEIGHT_PRESET in hako-mikan/sd-webui-lora-block-weight, scripts/lora_block_weight.py), each 17 weights for
# SD 1.x/2.x. It has none for SDXL (nor does loraops read its FLUXALL: FLUX adapters are refused).
PRESETS = {name: tuple(float(w) for w in weights.split(",")) for name, weights in {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}.items()}
PRESET_NAME = re.compile(r"[A-Za-z][\w.]*")

TEXT_ENCODER = re.compile(r"^(?:lora_te[12]?_|text_encoder(?:_2)?\.|cond_stage_model\.|conditioner\.|text_model[._])")
UNET = re.compile(r"^(?:lora_unet_|unet\.|model\.diffusion_model\.)?")
DIFFUSERS_BLOCK = re.compile(r"^(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_")
LDM_BLOCK = re.compile(r"^(input|output)_blocks_(\d+)_")
MIDDLE = re.compile(r"^(?:mid_block|middle_block)_")
# sd-scripts puts SDXL's time and label embeddings in IN00 with its conv_in (input_blocks.0), and its out (conv_out)
# after OUT08, in a block no list weighs
FIRST = re.compile(r"^(?:conv_in|time_embedding|time_embed|add_embedding|class_embedding|label_emb)_")
LAST = re.compile(r"^(?:conv_out|conv_norm_out|out)_")
# a transformer (attention) block's module: diffusers' attentions.N, the original's <block>.1 (its resampler is a conv)
ATTENTION = re.compile(r"^(?:(?:down|up)_blocks_\d+_attentions_|(?:input|output)_blocks_\d+_1_(?!conv))")


def block_of(name: str) -> str | None:
    """The block of a module, named as kohya (``lora_unet_down_blocks_0_…``, ``lora_unet_input_blocks_4_1_…``,
    ``lora_te1_…``), diffusers (``[unet.]down_blocks.0.…``) or the original checkpoint (``[model.diffusion_model.]
    input_blocks.4.1.…``) names it: "BASE", "IN00"…"IN11", "MID", "OUT00"…"OUT11", or None for the U-Net's out
    (conv_out), in no block. InvalidInputError for a module of neither a U-Net nor an SD text encoder."""
    if TEXT_ENCODER.match(argument(name, "name", str)):
        return "BASE"
    rest = name[UNET.match(name).end():].replace(".", "_") + "_"
    if match := DIFFUSERS_BLOCK.match(rest):
        side, level, kind, index = match[1], int(match[2]), match[3], int(match[4])
        # diffusers' level i holds the original's blocks 3i+1… (down) or 3i… (up), its resampler in the last
        if side == "down":
            n = 3 * (level + 1) if kind == "downsamplers" else 3 * level + index + 1
        else:
            n = 3 * level + 2 if kind == "upsamplers" else 3 * level + index
        label = f"{'IN' if side == 'down' else 'OUT'}{n:02d}"
    elif match := LDM_BLOCK.match(rest):
        label = f"{'IN' if match[1] == 'input' else 'OUT'}{int(match[2]):02d}"
    elif MIDDLE.match(rest):
        return "MID"
    elif FIRST.match(rest):
        return "IN00"
    elif LAST.match(rest):
        return None
    else:
        label = None
    if label not in ALL:
        raise InvalidInputError(f"block weights are for Stable Diffusion (1.x, 2.x, XL) U-Net and text encoder "
                                f"adapters: module {name!r} is in none of their blocks")
    return label


def parse_block_weights(text: str) -> tuple[float, ...]:
    """'1,0.5,…', sd-scripts' '[1, 0.5, …]' or a preset's name ('OUTALL': PRESETS) → the weights, 12, 17, 20 or 26 of
    them."""
    inner = text.strip()
    if PRESET_NAME.fullmatch(inner):
        if inner not in PRESETS:
            raise InvalidInputError(f"block weights {text!r}: not a preset name of the LoRA Block Weight extension "
                                    f"({', '.join(PRESETS)}: 17 weights, for SD 1.x/2.x) nor a list of numbers")
        return PRESETS[inner]
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
    parts = [part.strip() for part in inner.split(",")]
    # the extension's R and U draw a random weight, X takes the prompt's: no record could say which weights were used
    if drawn := next((part for part in parts if part in ("R", "U") or part.startswith("X")), None):
        raise InvalidInputError(f"block weights {text!r}: {drawn!r} is the LoRA Block Weight extension's random (R, U) "
                                "or prompt's (X) weight, which a merge cannot reproduce: give numbers")
    try:  # (each as a :WEIGHT is read: one written nonzero is no subnormal, which merged as no weight)
        weights = tuple(checked_weight(part, parse_number(part), nonzero=written_nonzero(part)) for part in parts)
    except InvalidInputError as exc:
        raise InvalidInputError(f"block weights {text!r}: {exc}") from None
    if len(weights) not in LAYOUTS:
        raise InvalidInputError(f"block weights {text!r}: {len(weights)} numbers, where a list has {COUNTS}")
    return tuple(float(w) for w in weights)


def block_weighted(adapter: "adapter_module.Adapter", weights: "str | Sequence[float]",
                   label: str) -> "adapter_module.Adapter":
    """``adapter`` with each module's ΔW multiplied by its block's weight (1 for a block ``weights`` does not name);
    ``label`` names the adapter in errors."""
    from .adapter import adapter_argument

    adapter, weights = adapter_argument(adapter, "block_weighted"), checked(weights)
    unet = LAYOUTS[len(weights)][0]
    by_block = _by_block(weights)
    # a list of 1s leaves the adapter as it is (the error for a missing list says to give one): refused only where
    # a weight other than 1 would apply
    if (adapter.full_tensors or adapter.token_rows) and any(w != 1 for w in weights):
        raise InvalidInputError(f"{label}: block weights scale LoRA deltas; this adapter also replaces whole tensors "
                                "(modules_to_save or trainable tokens), which have no block weight")
    modules = {}
    for name, module in adapter.modules.items():
        block = block_of(name)
        if module.dora and by_block.get(block, 1.0) != 1:
            raise InvalidInputError(f"{label}: module {name!r} is DoRA, whose merge is not linear in its ΔW: block "
                                    "weights are for plain LoRA, LoCon, LoHa and LoKr modules")
        if unet == SDXL and block in SD_ONLY:
            raise InvalidInputError(f"{label} is an SD 1.x/2.x adapter (module {name!r} is in block {block}, which "
                                    f"SDXL lacks): give it 17 or 26 block weights, not {len(weights)}")
        weight = by_block.get(block, 1.0)
        if overflows_float32(module.scale * weight):  # (the merge named the adapter's weight 1 and a huge "scale")
            raise InvalidInputError(f"{label}: block weight {weight:g} of block {block} × scale {module.scale:g} of "
                                    f"module {name!r} is beyond what float32 holds")
        modules[name] = module if weight == 1 else replace(module, scale=module.scale * weight)
    told = told_unet(adapter)
    if told not in (None, unet):
        counts = "12 or 20" if told == SDXL else "17 or 26"
        preset = next((f" ({name} is the LoRA Block Weight extension's SD 1.x/2.x preset: it has none for SDXL)"
                       for name, listed in PRESETS.items() if listed == weights), "")
        raise InvalidInputError(f"{label} is an {told} adapter: give it {counts} block weights, not {len(weights)}"
                                + preset)
    return replace(adapter, modules=modules)


def told_unet(adapter: "adapter_module.Adapter") -> str | None:
    """The U-Net an adapter says it is for (SD or SDXL), else None: sd-scripts' metadata (ss_base_model_version
    sdxl_…, or sd_v1/sd_v2…), a second text encoder's modules (SDXL), or attention in a block only one family has
    there (OUT00–OUT02: SDXL; IN01, IN02: SD 1.x/2.x), as a diffusers-trained file without metadata tells it."""
    version = adapter.metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl") or any(name.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "conditioner."))
                                         for name in adapter.modules):
        return SDXL
    if version.startswith("sd_v"):
        return SD
    attention = {block_of(name) for name in adapter.modules if not TEXT_ENCODER.match(name) and ATTENTION.match(
        name[UNET.match(name).end():].replace(".", "_"))}
    return SDXL if attention & {"OUT00", "OUT01", "OUT02"} else SD if attention & {"IN01", "IN02"} else None


def checked_lists(lists: "Sequence[str | Sequence[float]] | None", inputs: int) -> list[tuple[float, ...]] | None:
    """Block weights as a command takes them — one list per input, each a string (parse_block_weights) or a sequence
    of numbers — checked; None (or no lists) for none."""
    if not lists:
        return None
    if isinstance(lists, str):
        raise InvalidInputError("block weights are one list per adapter: give [text], not the string alone")
    if not isinstance(lists, (list, tuple)):  # (a number was a raw TypeError: no len())
        raise InvalidInputError(f"block weights are one list per adapter, not {lists!r}")
    if len(lists) != inputs:
        raise InvalidInputError(f"{len(lists)} lists of block weights for {inputs} adapters: give one per adapter, "
                                "in order (a list of 1s leaves one as it is)")
    return [checked(weights) for weights in lists]


def checked(weights: "str | Sequence[float]") -> tuple[float, ...]:
    """One adapter's block weights — a string (parse_block_weights) or a sequence of numbers — checked."""
    if isinstance(weights, str):
        return parse_block_weights(weights)
    if not isinstance(weights, (list, tuple)):
        raise InvalidInputError(f"block weights {weights!r}: give each adapter's as a list of numbers (or a "
                                "string '1,0.5,…')")
    if not all(is_finite(w) for w in weights):
        raise InvalidInputError(f"block weights {list(weights)!r}: every weight must be a finite number")
    if len(weights) not in LAYOUTS:
        raise InvalidInputError(f"block weights: {len(weights)} numbers, where a list has {COUNTS}")
    try:
        return tuple(checked_weight(w, w, nonzero=w != 0) for w in weights)
    except InvalidInputError as exc:
        raise InvalidInputError(f"block weights {list(weights)!r}: {exc}") from None


def recorded(weights: "Sequence[float] | None") -> list[float] | None:
    """One adapter's block weights as records and reports keep them: None for none, and for a list of 1s (the same
    ΔW, so a merge with it is the merge without, and subtract --exact matches either)."""
    return None if weights is None or all(w == 1 for w in weights) else list(weights)


def lineage(lists: "Sequence[Sequence[float]] | None") -> dict:
    """What a derived adapter's lineage records of its block weights: one entry per input (recorded), nothing when
    every input's is none."""
    kept = [recorded(weights) for weights in lists or []]
    return {"block_weights": kept} if any(w is not None for w in kept) else {}


def factors(names: "Iterable[str]", weights: "Sequence[float] | None") -> dict[str, float]:
    """Each module's factor other than 1 that ``weights`` give the modules ``names``: equal for two lists that give
    an adapter the same ΔW (a 17-list and the 26-list equal on its blocks, a list of 1s and none), which subtract
    --exact matches as the same."""
    if weights is None:
        return {}
    by_block = _by_block(checked(list(weights)))
    return {name: w for name in names if (w := by_block.get(block_of(name), 1.0)) != 1}


def _by_block(weights: tuple[float, ...]) -> dict[str, float]:
    """Checked weights → {block: weight} for the blocks their layout names."""
    return dict(zip(LAYOUTS[len(weights)][1], weights, strict=True))


def text(weights: "Sequence[float] | None") -> str:
    """How the text output shows an adapter's block weights after it: ' [blocks 1,0,0.5,…]', or '' for none (spelled:
    two lists shown alike are alike)."""
    return "" if weights is None else f" [blocks {spelled(weights)}]"


def spelled(weights: "Sequence[float]") -> str:
    """'1,0,0.5,…': each weight as short as reads back the same."""
    return ",".join(map(_short, weights))


def _short(weight: float) -> str:
    return f"{weight:g}" if float(f"{weight:g}") == weight else repr(float(weight))
