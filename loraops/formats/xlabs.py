"""XLabs FLUX.1 LoRA (x-flux's attention processors): ``double_blocks.N.processor.qkv_lora1.down.weight`` (r×in) and
``.up.weight`` (out×r), optionally behind ``diffusion_model.``, no alpha (x-flux's LoRALinearLayer saves none: scale
1, as diffusers loads them). Read as the diffusers FLUX LoRA diffusers' ``_convert_xlabs_flux_lora_to_diffusers``
makes of it: a qkv LoRA becomes to_q/to_k/to_v (or add_q/k/v_proj), each the whole down factor and its third of
up's rows — the same ΔW — so the adapter is a diffusers one from then on (binding, merging, writing).
"""
from __future__ import annotations

import re
from pathlib import Path

from .. import st
from ..adapter import Adapter
from ..errors import FormatError, InvalidInputError
from . import common

KEY_RE = re.compile(r"^(?:diffusion_model\.)?(?P<block>double|single)_blocks\.(?P<index>\d+)\.processor\."
                    r"(?P<lora>qkv_lora1|qkv_lora2|proj_lora1|proj_lora2|qkv_lora|proj_lora)\.(?P<part>down|up)\.weight$")
# (block kind, x-flux processor LoRA) → the diffusers modules its up factor's rows go to, in equal thirds for qkv
TARGETS = {
    ("double", "qkv_lora1"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("double", "qkv_lora2"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("double", "proj_lora1"): ("attn.to_out.0",),
    ("double", "proj_lora2"): ("attn.to_add_out",),
    ("single", "qkv_lora"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("single", "proj_lora"): ("proj_out",),
}
BLOCKS = {"double": "transformer.transformer_blocks", "single": "transformer.single_transformer_blocks"}


def is_xlabs_key(key: str) -> bool:
    return KEY_RE.match(key) is not None


def read(path: Path, *, alpha: float | None = None, values: bool = True, mapped: bool = False) -> Adapter:
    header = st.read_header(path)
    common.refuse_unsupported(path, header.tensors)
    found: dict[tuple[str, str, str], dict[str, str]] = {}
    unknown = []
    for key in header.tensors:
        match = KEY_RE.match(key)
        if match is None or (match["block"], match["lora"]) not in TARGETS:
            unknown.append(key)
        else:
            parts = found.setdefault((match["block"], match["index"], match["lora"]), {})
            if match["part"] in parts:  # (with and without diffusion_model.: one would silently replace the other)
                raise InvalidInputError(f"{path}: duplicate factor {parts[match['part']]!r} and {key!r}")
            parts[match["part"]] = key
    if unknown:
        raise common.unknown_layout(path, unknown, "unknown keys in an XLabs FLUX LoRA file")
    if not found:
        raise FormatError(f"{path}: no LoRA tensors in this file")
    common.pair_factors(path, {f"{b}_blocks.{i}.processor.{lora}": parts for (b, i, lora), parts in found.items()},
                        "down", "up")
    tensors = st.load_tensors(header, values=values, mapped=mapped)
    modules = {}
    for (block, index, lora), keys in found.items():
        down, up = tensors[keys["down"]], tensors[keys["up"]]
        targets = TARGETS[block, lora]
        rows, left = divmod(int(up.shape[0]), len(targets))
        if left or up.dim() != 2:
            raise InvalidInputError(f"{path}: {keys['up']!r} is {common.fmt_shape(up.shape)}: a qkv LoRA's up factor "
                                    "must be 2-D with rows in three equal parts (q, k, v)")
        for i, target in enumerate(targets):
            name = f"{BLOCKS[block]}.{index}.{target}"
            # x-flux saves no alpha: scale 1 (alpha = r), unless the caller gives one
            modules[name] = common.build_module(path, name, down, up[i * rows:(i + 1) * rows], a_key=keys["down"],
                                                b_key=keys["up"], alpha=alpha)
    return Adapter(modules=dict(sorted(modules.items())), format="diffusers", metadata=dict(header.metadata),
                   config={}, path=path)
