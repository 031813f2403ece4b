"""kohya / sd-scripts LoRA: one .safetensors of ``<name>.lora_down.weight`` (r×in, or r×in×k×k),
``<name>.lora_up.weight`` (out×r, or out×r×1×1) and ``<name>.alpha`` (0-d; missing or 0 means alpha = r),
with ``ss_*`` training metadata; LyCORIS LoCon's Tucker form of a k×k conv adds ``<name>.lora_mid.weight``
(r×r×k×k, with a 1×1 down), read as the plain LoRA it equals (``tucker_down``). Names are the base module path with every "." replaced by "_" behind a prefix
naming the network (``lora_unet_``, ``lora_te_``, ``lora_te1_``/``lora_te2_``...); they are resolved to real module
paths by loraops.check.bind against a base.
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import replace
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from .. import ldm, st
from ..adapter import Adapter, LoraModule
from ..errors import FormatError, InvalidInputError
from . import common, lycoris, peft

if TYPE_CHECKING:
    import torch

KEY_RE = re.compile(r"^(?P<name>[^.]+)\.(?P<part>lora_down\.weight|lora_mid\.weight|lora_up\.weight|alpha)$")
PARTS = {"lora_down.weight": "down", "lora_mid.weight": "mid", "lora_up.weight": "up", "alpha": "alpha"}

# diffusers component (None: a single network such as an LLM) → kohya prefix. sd-scripts names the denoiser
# "lora_unet" for every architecture (UNet, SD3 MMDiT, FLUX), and the text encoders lora_te / lora_te1, lora_te2
# (SDXL), lora_te3 (the T5 of SD3/FLUX). A plain model is "the network", so it gets the denoiser's prefix.
KOHYA_PREFIXES = {
    None: "lora_unet", "unet": "lora_unet", "transformer": "lora_unet", "prior": "lora_unet",
    "text_encoder": "lora_te", "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3",
}
# the parts of a diffusers pipeline base whose module names begin with their component
PIPELINE_COMPONENTS = ("unet", "prior", "text_encoder", "text_encoder_2", "text_encoder_3")
# sd-scripts' plain LoRA networks (SD 1.x/2.x/XL, FLUX.1, SD3): the ss_network_module a written file says, by the
# adapter's metadata (a bound adapter's is its base's: ldm.versioned); any other (LyCORIS') is networks.lora
NETWORK_MODULES = ("networks.lora", "networks.lora_flux", "networks.lora_sd3")
HASH_KEY = "sshs_model_hash"
# The arguments of sd-scripts' LoRA networks (lora.py, lora_flux.py, lora_sd3.py) that stay true of the source's
# modules written anew, resized or not: how it was trained (dropouts, LoRA+ ratios, block learning-rate weights, GGPO)
# and which blocks and encoders it trained. A written file keeps these of its source's ss_network_args and no others:
# its ranks and alphas (conv_dim, block_dims, in_dims, img_attn_dim, …: each written module has its own, and
# conv_dim/conv_alpha are made from them), how its modules are laid out (lora_flux's split_qkv: a LoRA of one rank
# per part of qkv, down stacked and up block-diagonal, which a resize makes one LoRA of any rank) and any other
# network's arguments (LyCORIS' algo, preset, use_tucker, …: the file is written as sd-scripts' plain LoRA network,
# lora_mid composed away) would no longer be true.
KEPT_NETWORK_ARGS = frozenset({
    "rank_dropout", "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
    "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "ggpo_beta", "ggpo_sigma",
    "train_blocks", "train_double_block_indices", "train_single_block_indices", "train_block_indices", "train_t5xxl",
})
EMBEDDINGS_KEY = "loraops_embeddings"
"""Header metadata naming (JSON list) the modules of an embedding layer: kohya has no embedding convention, so they
are written transposed like a linear one on the stored table, and nothing else in the file tells them from one
(binding puts them back in PEFT's layout: check.fit_orientation)."""


def is_kohya_layout(keys: Iterable[str]) -> bool:
    """Kohya's names: a key behind kohya's own prefix, or kohya's factor names on underscored module names only. The
    same factor names on a dotted module path (diffusion_model.blocks.0.self_attn.q.lora_down.weight) are a bare
    PEFT-style file's (peft.KOHYA_FACTORS), and so are its top-level modules beside them (conv_in beside
    down_blocks.0.resnets.0.conv1); behind kohya's own prefix (lora_unet.down_blocks…) they stay kohya's, refused as
    such."""
    modules = []
    for key in keys:
        if key.startswith(("lora_unet_", "lora_te", "lora_transformer_", "lycoris_")):
            return True
        module = next((key.removesuffix(s) for s in peft.KOHYA_FACTORS if key.endswith(s)), None)
        if module is not None and module.startswith("lora_"):
            return True
        if module is not None:
            modules.append(module)
    return bool(modules) and all("." not in module for module in modules)


def kohya_name(module_path: str, component: str | None = None) -> str:
    """The kohya name of a module: ``kohya_name("down_blocks.0.attentions.0.proj_in", "unet")`` →
    ``lora_unet_down_blocks_0_attentions_0_proj_in``; ``kohya_name("model.layers.0.self_attn.q_proj")`` →
    ``lora_unet_model_layers_0_self_attn_q_proj``. ``component`` "text_encoder_1" gives SDXL's ``lora_te1_``."""
    return f"{kohya_prefix(component)}_{module_path.replace('.', '_')}"


def kohya_prefix(component: str | None) -> str:
    """The kohya prefix of a diffusers component (None: a plain model); "text_encoder_1" is ``lora_te1``, the name
    sd-scripts gives a first text encoder that has others (SDXL's, SD3's CLIP-L) even when it is named alone."""
    if component == "text_encoder_1":
        return "lora_te1"
    if component in KOHYA_PREFIXES:
        return KOHYA_PREFIXES[component]
    raise InvalidInputError(f"no kohya prefix for component {component!r} (known: {sorted(filter(None, KOHYA_PREFIXES))})")


def read(path: Path, *, alpha: float | None = None, values: bool = True, mapped: bool = False) -> Adapter:
    header = st.read_header(path)
    lycoris.refuse_unsupported(path, header.tensors)
    # LyCORIS LoHa/LoKr modules (hada_…, lokr_…), each with its .alpha; a file may mix them with LoCon modules
    products, keys = lycoris.group(path, header.tensors)
    found: dict[str, dict[str, str]] = {}
    unknown = []
    for key in keys:
        match = KEY_RE.match(key)
        if match is None:
            unknown.append(key)
        elif match["name"] in products and match["part"] == "alpha":
            products[match["name"]]["alpha"] = key
        else:
            found.setdefault(match["name"], {})[PARTS[match["part"]]] = key
    if unknown:
        raise common.unknown_layout(path, unknown, "unknown keys in a kohya LoRA file")
    both = sorted(products.keys() & found.keys())
    if both:  # one of the two sets of factors was dropped silently: the merge was another ΔW than the file's
        raise InvalidInputError(f"{path}: module {both[0]!r} holds both LoRA (lora_down/lora_up) and LoHa/LoKr "
                                "(hada_/lokr_) factors: a module is one or the other")
    for name, parts in found.items():
        if "down" not in parts and "up" not in parts:
            raise InvalidInputError(f"{path}: {next(iter(parts.values()))!r} has no lora_down/lora_up tensors")
    common.pair_factors(path, found, "down", "up")
    if not found and not products:
        raise FormatError(f"{path}: no LoRA tensors in this file")
    tensors = st.load_tensors(header, values=values, mapped=mapped)
    unscaled = [name for name, parts in found.items() if "alpha" not in parts]
    zero_alphas: list[str] = []

    def alpha_of(name: str, key: str | None) -> float | None:
        read = module_alpha(path, tensors, key, alpha)
        if read is None and key is not None and alpha is None:  # (a stored 0)
            zero_alphas.append(name)
        return read

    modules = {}
    for name, parts in sorted(products.items()):
        modules[name] = lycoris.build(path, name, parts, tensors, alpha=alpha_of(name, parts.pop("alpha", None)))
    for name, parts in sorted(found.items()):
        down, up = tensors[parts["down"]], tensors[parts["up"]]
        extra = tuple(parts[part] for part in ("mid", "alpha") if part in parts)
        stored = ()
        if "mid" in parts:
            stored = (down, tensors[parts["mid"]], up)
            down = tucker_down(path, name, down, tensors[parts["mid"]], parts)
        if down.dim() in (3, 4, 5) and up.dim() == 2:  # LyCORIS' DyLoRA saves a conv's lora_up out×r: the same B
            up = up.reshape(*up.shape, *[1] * (down.dim() - 2))
        modules[name] = common.build_module(
            path, name, down, up, a_key=parts["down"], b_key=parts["up"],
            alpha=alpha_of(name, parts.get("alpha")), extra_keys=extra, stored=stored,
        )
    if alpha is None:
        note_missing_alphas(path, header.metadata, [modules[name] for name in unscaled], len(modules))
    if zero_alphas:
        logging.getLogger("loraops").info(
            f"{path}: .alpha is 0 in {len(zero_alphas)} of {len(modules)} modules ({zero_alphas[0]}): read at alpha = "
            "rank (scale 1), as kohya's sd-scripts and LyCORIS read it; ComfyUI applies such a module at scale 0")
    return Adapter(modules=dict(sorted(modules.items())), format="kohya", metadata=dict(header.metadata), path=path, names_resolved=False)


def note_missing_alphas(path: Path, metadata: dict[str, str], unscaled: list[LoraModule], total: int) -> None:
    """Say where modules without an ``.alpha`` tensor get another alpha than the metadata's ss_network_alpha: each is
    read at alpha = its rank (scale 1), as sd-scripts' networks/lora.py reads it ("support old LoRA without alpha"; the
    metadata is never read there), which inspect's table shows without a word. k×k convolutions are left out: their
    alpha in training was conv_alpha."""
    try:
        said = float(metadata.get("ss_network_alpha", "nan"))
    except ValueError:  # ("Dynamic": one alpha per module, none to compare)
        return
    other = [m for m in unscaled if not m.spatial and m.rank != said]
    if other and math.isfinite(said):
        logging.getLogger("loraops").info(
            f"{path}: no .alpha tensor in {len(other)} of {total} modules ({other[0].name}, rank {other[0].rank}): "
            "they are read at alpha = rank (scale 1), as kohya's sd-scripts reads them, not at the metadata's "
            f"ss_network_alpha {said:g}")


def embedding_names(metadata: dict[str, str]) -> frozenset[str]:
    """The modules the header marks as an embedding's (EMBEDDINGS_KEY); none where it says nothing readable."""
    try:
        names = json.loads(metadata.get(EMBEDDINGS_KEY, "[]"))
    except ValueError:
        return frozenset()
    return frozenset(n for n in names if isinstance(n, str)) if isinstance(names, list) else frozenset()


def module_alpha(path: Path, tensors: dict[str, "torch.Tensor"], key: str | None, alpha: float | None) -> float | None:
    """A module's alpha: the caller's, else its ``.alpha`` tensor's (``key``); None when neither says or it is 0
    (alpha = r, kohya's and LyCORIS' rule)."""
    if alpha is not None:
        return common.check_alpha(path, alpha, "alpha")
    if key is None:
        return None
    return common.stored_alpha(path, tensors[key], key) or None


def tucker_down(path: Path, name: str, down: "torch.Tensor", mid: "torch.Tensor", keys: dict[str, str]) -> "torch.Tensor":
    """The down factor (r×in×k×k) equal to LyCORIS' Tucker pair: a 1×1 conv ``down`` (r×in×1×1) then a k×k conv
    ``mid`` (r×r×k×k). A 1×1 convolution commutes with the spatial one, so the two are one k×k convolution with
    kernel Σ_b mid[a,b]·down[b,i], and up·(mid∘down) is plain kohya LoCon (ComfyUI and LyCORIS compose it the same
    way). Composed in float64 and kept in float32 (float64 if stored so): rounding it back to a half-precision
    stored dtype would add an error the trained network never had."""
    import torch

    if mid.dim() < 3 or down.dim() != mid.dim() or any(d != 1 for d in down.shape[2:]) or mid.shape[1] != down.shape[0]:
        raise InvalidInputError(
            f"{path}: module {name!r}: a Tucker (lora_mid) conv needs {keys['down']} r×in×1×1 and {keys['mid']} "
            f"r×r×k×k, has {common.fmt_shape(down.shape)} and {common.fmt_shape(mid.shape)}"
        )
    if not mid.is_floating_point():
        raise InvalidInputError(f"{path}: module {name!r}: {keys['mid']} must be floating point, not {mid.dtype}")
    common.check_finite(path, keys["mid"], mid)
    common.check_finite(path, keys["down"], down)
    kept = torch.float64 if down.dtype == torch.float64 else torch.float32  # (torch promotes no float8)
    mid, down = mid.double(), down.flatten(1).double()
    composed = torch.einsum("ab...,bi->ai...", mid, down).to(kept)
    # |Σ_b mid·down| ≤ r·max|mid|·max|down|: where that is within float32 nothing overflowed, and the composed
    # factor (k·k times the stored down factor) is not scanned: the scan was a quarter of a stamped load's time
    if composed.is_meta or not composed.numel() or \
            not mid.shape[1] * float(mid.abs().amax()) * float(down.abs().amax()) <= common.FLOAT32_MAX:
        common.check_derived(path, name, f"the Tucker composition of {keys['mid']} and {keys['down']}", composed)
    return composed


def component_of(adapter: Adapter, name: str, *, sdxl: bool = False) -> tuple[str | None, str]:
    """(diffusers component, path inside it) of a bound module name: the part of a single-file SD or FLUX.1
    checkpoint under sd-scripts' names, a diffusers adapter's own prefix, or a pipeline base's component.
    ``transformer.`` is split off only for a diffusers adapter or a FLUX/SD3 block (a kohya LoRA bound to a pipeline:
    check.in_pipeline_dit): a plain model (GPT-2) has it too."""
    named = ldm.sd_scripts_name(name, sdxl=sdxl)
    if named is not None:
        return named
    head, _, rest = name.partition(".")
    if rest and (head in PIPELINE_COMPONENTS or (head == "transformer" and (
            adapter.format == "diffusers" or rest.startswith(("transformer_blocks.", "single_transformer_blocks."))))):
        return head, rest
    return None, name


def kohya_names(adapter: Adapter) -> dict[str, str]:
    """adapter module name → kohya name: unbound names as they are; bound ones as sd-scripts would name them."""
    if not adapter.names_resolved:
        return {name: name for name in adapter.modules}
    sdxl = ldm.is_sdxl(adapter.modules, adapter.metadata)
    other = ldm.other_unet(adapter.modules, adapter.metadata)
    # a UNet of no sd-scripts model (the x4 upscaler's, SVD's, AudioLDM's): by its checkpoint paths, as SDXL's, which
    # ComfyUI applies to any UNet it loads (lora_unet_ + the path)
    by_path = bool(sdxl) or other is not None
    if by_path and adapter.metadata.get(ldm.UNET_LEVELS_KEY) and any(n.startswith(ldm.DIFFUSERS_UNET)
                                                                    for n in adapter.modules):
        raise FormatError(
            f"{adapter.label}: sd-scripts names the {'SDXL' if sdxl else other.name} UNet by checkpoint paths, which "
            "number two resnets per down level and three per up level; the bound pipeline's UNet has other levels (a "
            "distilled one), so those names would be other modules': write it as diffusers or peft")
    # a diffusers-named UNet (a diffusers LoRA's, a pipeline's) at the checkpoint paths named so
    at_path = ldm.checkpoint_paths(adapter.modules, attending=ldm.up_attention(adapter.metadata))

    def named(name: str, by_path: bool) -> tuple[str | None, str]:
        return component_of(adapter, at_path[name], sdxl=True) if by_path and name in at_path else \
            component_of(adapter, name, sdxl=by_path)

    split = {name: named(name, by_path) for name in adapter.modules}
    common.refuse_unplaced(adapter, [n for n, parts in split.items()
                                     if sdxl is None and not by_path and named(n, True) != parts],
                           "sd-scripts names one way for SDXL (lora_unet_input_blocks_…) and another for SD 1.x/2.x "
                           "(lora_unet_down_blocks_…)")
    unplaced = [n for n in adapter.modules if by_path and n.startswith(ldm.DIFFUSERS_UNET) and n not in at_path]
    if unplaced:
        raise FormatError(
            f"{adapter.label}: {common.shown(unplaced)}: diffusers UNet modules whose checkpoint path, by which "
            f"sd-scripts names the {'SDXL' if sdxl else other.name} UNet, the adapter's modules do not say (an up "
            "level's upsampler: behind its attention or not; a class_embedding): bind it to its single-file "
            "checkpoint (--base), or write it as diffusers")
    components = {component for component, _ in split.values()}
    if "transformer" in components:
        # sd-scripts, ComfyUI and diffusers' kohya converter know a FLUX/SD3 transformer only by the original
        # checkpoint's paths (double_blocks…, joint_blocks…), q/k/v fused: lora_unet_<diffusers path> loads nowhere
        raise FormatError(
            "a diffusers FLUX/SD3 transformer LoRA has no kohya names of its own: bind it to a single-file FLUX/SD3 "
            "checkpoint (register it with --base <that checkpoint>) to write it as kohya, or write it as diffusers"
        )
    out = {}
    for name, (component, rest) in split.items():
        if component == "text_encoder" and ("text_encoder_2" in components or sdxl):
            component = "text_encoder_1"  # SDXL's first, even alone (as sd-scripts, and bound to its checkpoint)
        if component == "text_encoder_2" and ldm.T5_PATH.match(rest):
            # FluxPipeline's T5, which sd-scripts' lora_flux names lora_te3 (SD3's T5); SDXL's and SD3's CLIP-G here,
            # text_projection included (no CLIP layer path), stays lora_te2 (ComfyUI's lora_te2_text_projection)
            component = "text_encoder_3"
        if component is not None and component.startswith("text_encoder") and not rest.startswith("text_model."):
            rest = ldm.clip_paths(rest)[-1]  # sd-scripts' names keep CLIP's text_model. level (transformers 4)
        out[name] = kohya_name(rest, component)
    clashes = [n for n, count in Counter(out.values()).items() if count > 1]
    if clashes:
        raise InvalidInputError(f"modules collide under kohya naming (dots become underscores): {sorted(clashes)[:3]}")
    return out


DIT_NETWORKS = {"networks.lora_flux": True, "networks.lora_sd3": False}  # sd-scripts' network → FLUX.1's (else SD3's)
PIPELINE_DIT = re.compile(r"^transformer\.(?P<block>(?:single_)?transformer_blocks)\.(?P<n>\d+)\.(?P<rest>.+)$")


def out_of_pipeline(adapter: Adapter) -> "Callable[..., LoraModule] | None":
    """For an adapter bound to a FLUX.1 or SD3 diffusers pipeline's transformer (whose header names sd-scripts'
    network for it, as binding gives it: ldm.versioned), or to one of ldm.DIT_LAYOUTS' (ldm.DIT_LAYOUT_KEY), each
    module → the same delta on the single-file checkpoint's module, which sd-scripts (musubi-tuner) names
    (check.in_pipeline_dit the other way): a part of a fused tensor (to_q) the part of that tensor
    (``…img_attn.qkv.to_q``, its rows after its siblings'), joined as it is written (``join``); an adaLN the pipeline
    holds with its shift and scale halves swapped, its rows swapped back. A module of another component that the
    layout names (DitLayout.beside: LTX-2's text projection, ``connectors.text_proj_in``) → the checkpoint's module
    it was converted from (``text_embedding_projection.aggregate_embed``), behind the transformer's prefix as the
    others, so it is written as musubi-tuner names it (``lora_unet_text_embedding_projection_aggregate_embed``); its
    other modules (a text encoder's) as they are. None for another adapter. ``values=False``: names and rows alone
    (the announced stand-ins)."""
    flux = DIT_NETWORKS.get(adapter.metadata.get("ss_network_module"))
    by_layout = ldm.DIT_LAYOUT_KEY in adapter.metadata  # (Wan's, HunyuanVideo's…: musubi-tuner's names)
    if not by_layout and (flux is None or not any(PIPELINE_DIT.match(name) for name in adapter.modules)):
        return None
    inverse, top = ldm.dit_inverse(bool(flux))

    def place(module: LoraModule) -> tuple[str, bool] | None:
        """(checkpoint module path, whether its halves are swapped), None outside the transformer."""
        if by_layout:
            found = ldm.checkpoint_dit(adapter.metadata, module.name)
            return found
        path, match = module.name.removeprefix("transformer."), PIPELINE_DIT.match(module.name)
        if path == "norm_out.linear" and module.name != path:
            return "final_layer.adaLN_modulation.1", True
        if match is None:
            return (top[path], False) if module.name != path and path in top else None
        if not flux and match["rest"] == "norm1_context.linear":  # the last block's: shift and scale alone, swapped
            return f"joint_blocks.{match['n']}.context_block.adaLN_modulation.1", \
                module.out_features == 2 * module.in_features
        found = inverse.get(f"{match['block']}.{{n}}.{match['rest']}")
        return None if found is None else (found.replace("{n}", match["n"]), False)

    placed = {name: (ldm.UNET_PREFIX + path, swapped) for name, module in adapter.modules.items()
              if (where := place(module)) is not None for path, swapped in [where]}
    rows = {path: adapter.modules[name].out_features for name, (path, _) in placed.items()}

    def on_checkpoint(module: LoraModule, values: bool = True) -> LoraModule:
        if module.name not in placed:
            return module
        path, swapped = placed[module.name]
        owner, _, _ = path.rpartition(".")
        entry = ldm.fused(f"{owner}.weight")
        fused = None
        if entry is not None and entry.whole:
            # a part the adapter lacks: as many rows as the tensor's columns, or as a part it has of Fused.unsized
            sized = [rows[f"{owner}.{part}"] for part in entry.unsized if f"{owner}.{part}" in rows]
            sizes = [rows.get(f"{owner}.{part}", next(iter(sized), None) if part in entry.unsized
                              else module.in_features) for part in entry.parts]
            if None in sizes:
                lacks = " and ".join(p for p, size in zip(entry.parts, sizes, strict=True) if size is None)
                raise FormatError(f"{adapter.label}: {module.name!r} is a part of "
                                  f"{owner.removeprefix(ldm.UNET_PREFIX)!r} whose {lacks} the adapter lacks, so its "
                                  "rows there are unknown: write it as diffusers")
            first = sum(sizes[:entry.parts.index(path.rpartition(".")[2])])
            fused = (f"{owner}.weight", first, module.out_features, sum(sizes))
        module = replace(module, name=path, fused=fused)
        if not (values and swapped):
            return module
        back = {k: None if t is None else t.roll(t.shape[0] // 2, 0)
                for k, t in (("B", module.B), ("magnitude", module.magnitude), ("lora_bias", module.lora_bias))}
        return replace(module, **back)

    return on_checkpoint


def factors(module: LoraModule) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(down, up) such that up·down is the delta in the base weight's stored layout. kohya has no fan_in_fan_out or
    embedding convention, so transposed modules are written as Bᵀ/Aᵀ (read back, they are plain linear modules of
    the stored shape: the same delta on the same tensor)."""
    if module.transposed:
        return module.B.T.contiguous(), module.A.T.contiguous()
    return module.A.contiguous(), module.B.contiguous()


def part_of(module: LoraModule) -> str | None:
    """The fused FLUX/SD3 tensor a module is one part of (``…img_attn.qkv.to_q``, ``…linear1.proj_mlp``: sd-scripts has
    no names for them, it trains the tensor as one Linear: ldm.Fused.whole), else None. The parts of each are written joined into one module on the whole tensor, which
    every kohya loader knows (``join``)."""
    entry = None if module.fused is None else ldm.fused(module.fused[0])
    return module.fused[0] if entry is not None and entry.whole else None


def joined_names(adapter: Adapter) -> dict[str, LoraModule]:
    """The modules as written: each fused tensor's parts as one module under the tensor's module name (the first
    part stands in for it: the names are what count here)."""
    modules: dict[str, LoraModule] = {}
    owners: dict[str, LoraModule] = {}
    for name, module in adapter.modules.items():
        if (tensor := part_of(module)) is None:
            modules[name] = module
        else:
            owners.setdefault(tensor.removesuffix(".weight"), module)
    for owner, first in owners.items():
        if owner in modules:
            raise FormatError(f"{adapter.label}: changes {owner!r} both whole and in parts; merge them first")
        modules[owner] = replace(first, name=owner, fused=None)
    return modules


def join(parts: list[LoraModule], work: "torch.dtype | None" = None) -> LoraModule:
    """The parts of one fused tensor as one module on it: where they are every row of it with one A and one scale,
    that A and their B's rows stacked (the LoRA a split made them from); else A stacked, B block-diagonal with zero
    rows for the parts not trained, rank Σr. The same delta exactly (the zeros add nothing); each part's scale is
    folded into its B when the scales differ, in ``work`` (default: the parts' dtype; float64 where the writer
    converts, so that a folded B is rounded once, by the conversion)."""
    import torch

    scales = {part.scale for part in parts}
    one_scale = len(scales) == 1
    scale = scales.pop() if one_scale else 1.0
    total = parts[0].fused[3]
    if one_scale and sum(part.fused[2] for part in parts) == total \
            and all(torch.equal(part.A, parts[0].A) for part in parts[1:]):
        # one LoRA's rows, as diffusers' converter (and check.in_pipeline_dit) split it: B's rows back together
        B = torch.empty(total, parts[0].rank, dtype=work or parts[0].B.dtype)
        for part in parts:
            B[part.fused[1]: part.fused[1] + part.fused[2]] = part.B.to(B.dtype)
        return LoraModule(part_of(parts[0]).removesuffix(".weight"), A=parts[0].A, B=B, alpha=scale * parts[0].rank,
                          scale=scale)
    rank = sum(part.rank for part in parts)
    B = torch.zeros(total, rank, dtype=work or parts[0].B.dtype)
    column = 0
    for part in parts:
        _, first, rows, _ = part.fused
        B[first : first + rows, column : column + part.rank] = folded(part, part.scale / scale, B.dtype)
        column += part.rank
    A = torch.cat([part.A for part in parts])
    return LoraModule(part_of(parts[0]).removesuffix(".weight"), A=A, B=B, alpha=scale * rank, scale=scale)


def folded(part: LoraModule, ratio: float, dtype: "torch.dtype") -> "torch.Tensor":
    """``part``'s B × ``ratio`` in ``dtype``, rounded once. torch has no float8 arithmetic on the CPU, so a float8 B
    is multiplied in float32, and refused where the product passes the float8's range (its conversion saturates)."""
    if ratio == 1:
        return part.B.to(dtype)
    if dtype.itemsize > 1:
        return part.B.to(dtype) * ratio
    out = st.converted(part.B.float() * ratio, dtype)  # (NaN where the float8 would saturate)
    if not st.all_finite(out.float()):
        raise st.beyond_range(f"{part.name}.lora_B", dtype, "write it with `dtype` bf16 or fp32")
    return out


def write(adapter: Adapter, modules: Iterable[LoraModule], dest: Path, *, spill: bool,
          dtype: "torch.dtype | None" = None) -> dict[str, str]:
    """Write a kohya file at ``dest`` from ``modules`` as they come (see common.ModuleStream, st.TensorWriter);
    returns its sha256."""
    import torch

    from . import peft  # the alpha that reproduces a module's scale is the same rule with rsLoRA off

    peft.refuse_full_tensors(adapter, "kohya")
    joined = joined_names(adapter)
    names = kohya_names(replace(adapter, modules=joined))
    stream = common.ModuleStream(adapter, modules, part_of)
    with st.TensorWriter(dest, spill=spill, dtype=dtype) as out:
        for group in stream:
            module = group[0] if part_of(group[0]) is None else join(group, None if dtype is None else torch.float64)
            down, up = factors(module)
            key = names[module.name]
            out.add(f"{key}.lora_down.weight", down)
            out.add(f"{key}.lora_up.weight", up)
            # float32 whatever the dtype: a rounded alpha would change the scale of the whole delta
            out.add(f"{key}.alpha", torch.tensor(peft.stored_alpha(module, rslora=False), dtype=torch.float32),
                    convert=False)
            stream.keep(module)
        written = list(stream.written(joined).values())

        def dim_alpha(group: list[LoraModule]) -> tuple[str, str]:
            """The group's rank and alpha, each "Dynamic" unless every module has the same (sd-scripts' mark); the
            rank an int, the alpha a Python float ("4", "2.0"), as sd-scripts' resize_lora.py and
            extract_lora_from_models.py write them (str(new_rank), str(float(alpha)))."""
            ranks, alphas = {m.rank for m in group}, {peft.stored_alpha(m, rslora=False) for m in group}
            return (str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
                    str(float(alphas.pop())) if len(alphas) == 1 else "Dynamic")

        # sd-scripts' LoCon: network_dim/alpha are the modules other than k×k convs', the convs' are conv_dim/alpha in
        # the network args (resize_lora.py --new_conv_rank: ss_network_dim = --new_rank)
        convs = [m for m in written if m.spatial]
        dim, alpha = dim_alpha([m for m in written if not m.spatial] or written)
        conv_args = dict(zip(("conv_dim", "conv_alpha"), dim_alpha(convs), strict=True)) if convs else {}
        metadata = {
            "ss_network_module": network if (network := adapter.metadata.get("ss_network_module")) in NETWORK_MODULES
            else "networks.lora",
            "ss_network_dim": dim,
            "ss_network_alpha": alpha,
            "ss_network_args": json.dumps({**kept_network_args(adapter.metadata), **conv_args}),
            # an SDXL adapter whose header names no version (a PEFT file's), known by its modules: sd-scripts' SDXL's
            "ss_base_model_version": adapter.metadata.get("ss_base_model_version") or (
                ldm.SDXL["ss_base_model_version"] if ldm.is_sdxl(adapter.modules, adapter.metadata) else ""),
            "ss_v2": adapter.metadata.get("ss_v2", "False"),
        }
        if embeddings := sorted(names[m.name] for m in written if m.kind == "embedding"):
            metadata[EMBEDDINGS_KEY] = json.dumps(embeddings)
        return {dest.name: out.close(metadata, hash_key=HASH_KEY)}


def kept_network_args(metadata: dict[str, str]) -> dict:
    """The source's ss_network_args that a written file keeps (KEPT_NETWORK_ARGS); none where they are no JSON object
    (LyCORIS writes "null"), or hold Python's NaN/Infinity (no JSON: written back, a strict reader could not parse
    the header's value)."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}", parse_constant=_no_json_constant)
    except ValueError:
        return {}
    return {k: v for k, v in args.items() if k in KEPT_NETWORK_ARGS} if isinstance(args, dict) else {}


def _no_json_constant(name: str):
    raise ValueError(f"{name} is no JSON")


def data_hash(path: Path) -> str:
    """sshs_model_hash as sd-scripts computes it: sha256 of the bytes after the header."""
    from ..fsutil import sha256_file

    return sha256_file(path, start=st.read_header(path).data_offset)

