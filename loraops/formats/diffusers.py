"""diffusers LoRA: PEFT-grammar keys behind a pipeline component (``unet.down_blocks.0...lora_A.weight``), in one
.safetensors (diffusers' ``pytorch_lora_weights.safetensors``). Module names keep the component prefix
("unet.down_blocks.0.attentions.0.proj_in"), the same names a pipeline folder's tensors get in a base manifest.

Alpha: diffusers writes the LoraConfig of each component as JSON under the header key ``lora_adapter_metadata``
(keys prefixed "<component>." for a pipeline). Files without it are loaded by diffusers with lora_alpha = r
(scale 1), so that is what loraops does too, unless the caller passes an alpha.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from .. import ldm, st
from ..adapter import Adapter, LoraModule
from ..errors import FormatError, UnsupportedAdapterError
from . import common, peft, tokens

if TYPE_CHECKING:
    import torch

COMPONENTS = ("unet", "transformer", "prior", "text_encoder", "text_encoder_2", "text_encoder_3")
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"


def component_of(key: str) -> str | None:
    head = key.split(".", 1)[0]
    return head if head in COMPONENTS else None


def is_diffusers_key(key: str) -> bool:
    return component_of(key) is not None and peft.is_factor_key(peft.peft_key(key))


def component_config(cfg: dict, component: str) -> dict:
    """One component's LoraConfig out of diffusers' metadata (a pipeline packs them as "<component>.<field>")."""
    prefix = f"{component}."
    packed = {k[len(prefix):]: v for k, v in cfg.items() if k.startswith(prefix)}
    if packed or any("." in k for k in cfg):
        return packed
    return cfg


def read(path: Path, *, alpha: float | None = None, values: bool = True, mapped: bool = False) -> Adapter:
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    header = st.read_header(weights)
    common.refuse_unsupported(weights, header.tensors)
    parsed = peft.parse_stored_keys(weights, header.tensors, lambda module: module)
    alpha_keys = peft.split_alpha_keys(parsed)
    others = parsed.others
    if (key := next((k for k in others if tokens.is_token_key(k)), None)) is not None:
        raise UnsupportedAdapterError(f"{weights}: PEFT trainable tokens ({key!r}) in a diffusers file, which keeps no "
                                      "adapter_config.json with their token indices; loraops reads them from a PEFT folder")
    if others:
        raise common.unknown_layout(weights, others, "unknown keys in a diffusers LoRA file")
    if not parsed.factors:
        raise FormatError(f"{weights}: no LoRA tensors in this file")
    unprefixed = [n for n in parsed.factors if component_of(n) is None]
    if unprefixed:
        raise common.unknown_layout(weights, unprefixed, f"modules without a pipeline component ({', '.join(COMPONENTS)})")
    raw = peft.metadata_config(header) or {}
    configs = {}
    for component in {component_of(n) for n in parsed.factors}:
        cfg = component_config(raw, component)
        if alpha is None and "lora_alpha" not in cfg:
            cfg = {**cfg, "lora_alpha": None}
        configs[component] = peft.scale_config(weights, cfg, alpha)
        if configs[component].method is not None:  # (its lora_A/lora_B would be read with LoRA's scale)
            raise UnsupportedAdapterError(f"{weights}: a {cfg['peft_type']} config in a diffusers file; loraops reads "
                                          "AdaLoRA and VeRA adapters from PEFT folders only")
        if configs[component].target_parameters:
            raise UnsupportedAdapterError(f"{weights}: a LoRA on raw parameters (target_parameters) in a diffusers file; "
                                          "loraops reads those only from a PEFT folder")

    tensors = st.load_tensors(header, values=values, mapped=mapped)

    def config_for(name: str):
        component, _, rest = name.partition(".")
        cfg = configs[component]
        if cfg.alpha is None and common.pattern_key(cfg.alpha_pattern, rest) is None:
            # diffusers' default: alpha = r
            cfg = peft.ScaleConfig(alpha=peft.key_alpha(weights, tensors, parsed, name, alpha_keys), rslora=cfg.rslora,
                                   fan_in_fan_out=cfg.fan_in_fan_out, dora=cfg.dora)
        return cfg, rest

    modules = peft.build_modules(weights, parsed, tensors, config_for, adapter_of=component_of)
    scale_modes = {cfg.rslora for cfg in configs.values()}
    return Adapter(
        modules=modules, format="diffusers", metadata=dict(header.metadata), config=raw, path=path,
        scale_mode="rslora" if scale_modes == {True} else "classic",
    )


def config_path(name: str) -> str:
    """A written module's path in its component's LoraConfig: behind the component; a CLIP text encoder's without
    transformers 4's ``text_model.`` level, which transformers 5's CLIPTextModel lacks in memory (PEFT refused the
    whole file there: "Target modules … not found"). PEFT matches a target and a pattern as a dot-bounded suffix, so
    the path finds the module under either layout."""
    component, _, path = name.partition(".")
    return path.removeprefix("text_model.") if component.startswith("text_encoder") else path


def parts(module: LoraModule) -> list[LoraModule]:
    """The modules a LoRA is written as: itself, but a LoRA on a whole FLUX/SD3 fused tensor (its qkv or linear1,
    which sd-scripts trains as one Linear: lora_unet_double_blocks_0_img_attn_qkv) as the parts diffusers names
    (to_q, to_k, to_v, proj_mlp), each A and its rows of B, as diffusers' own conversion of kohya FLUX LoRAs splits
    it: the same delta. A rank component whose B is zero in a part's rows is left out of that part, and a part with
    none is no module: the parts the kohya writer joined (B block-diagonal) come back as they were. Stand-ins (no
    values) are split by name only."""
    split = [] if module.fused is not None or module.kind != "linear" or module.transposed or module.dora else ldm.split(
        module.weight_name, module.weight_shape, whole=True)
    if not split:
        return [module]
    out = []
    for part, (_, first, rows, _) in split:
        B = module.B[first:first + rows]
        used = None if B.is_meta else B.any(dim=0)
        if used is None:
            out.append(replace(module, name=part, B=B))
        elif bool(used.any()):
            out.append(replace(module, name=part, A=module.A[used], B=B[:, used].contiguous()))
    return out


def pipeline_names(adapter: Adapter) -> dict[str, str]:
    """Module name (a part's, for a LoRA on a whole fused tensor: ``parts``) → its pipeline name: as it is, or
    translated from a single-file SD, FLUX.1 or SD3 checkpoint's (``model.diffusion_model.input_blocks.1.1…`` →
    ``unet.down_blocks.0.attentions.0…``)."""
    top, sdxl = ldm.dit_top(adapter.modules, adapter.metadata), ldm.is_sdxl(adapter.modules, adapter.metadata)
    listed = [part.name for module in adapter.modules.values() for part in parts(module)]  # a part and a whole: twice
    other = ldm.other_unet(adapter.modules, adapter.metadata)
    video = other is not None and other.video
    # a language model rooted at transformer. (GPT-2, BLOOM, Falcon: transformer.h.0…) reads as a pipeline's
    # component: its PEFT task type or a Conv1D module says it is none (no pipeline holds those)
    task = adapter.config.get("task_type")
    conv1d = next((m.name for m in adapter.modules.values() if m.fan_in_fan_out), None)
    if task or conv1d:
        said = f"task_type {task}" if task else f"a Conv1D module, {conv1d}"
        raise FormatError(f"{adapter.label}: a language model's adapter ({said}): the diffusers format is a "
                          "pipeline's (`fmt` peft or kohya)", ["fmt"])
    names: dict[str, str] = {}
    for name in listed:
        target = name if component_of(name) is not None else ldm.diffusers_name(name, top=top, sdxl=sdxl, video=video)
        if target is None:
            raise FormatError(f"{adapter.label}: module {name!r} has no pipeline component prefix "
                              f"({', '.join(COMPONENTS)}): the diffusers format is a pipeline's (a language model's "
                              "adapter: `fmt` peft or kohya)", ["fmt"])
        names[name] = target
    common.refuse_unplaced(adapter, [n for n in listed if sdxl is None and other is None and component_of(n) is None
                                     and names[n] != ldm.diffusers_name(n, top=top, sdxl=False)],
                           "diffusers names one way for SDXL (unet.add_embedding) and another for SD 2.x unCLIP "
                           "(unet.class_embedding)")
    target, count = Counter(names[name] for name in listed).most_common(1)[0] if names else (None, 0)
    if count > 1:
        raise FormatError(f"{adapter.label}: two modules are both the pipeline's {target!r}; merge them first")
    return names


def write(adapter: Adapter, modules: Iterable[LoraModule], dest: Path, *, spill: bool,
          dtype: "torch.dtype | None" = None) -> dict[str, str]:
    """One .safetensors with component-prefixed PEFT keys and the per-component LoraConfig in the header, written
    from ``modules`` as they come (see common.ModuleStream, st.TensorWriter); returns its sha256."""
    peft.refuse_full_tensors(adapter, "diffusers")
    rslora = adapter.scale_mode == "rslora"
    names = pipeline_names(adapter)
    stream = common.ModuleStream(adapter, modules)
    kept = set()
    with st.TensorWriter(dest, spill=spill, dtype=dtype) as out:
        for (module,) in stream:
            for part in parts(module):
                part = replace(part, name=names[part.name], fused=None)
                for key, tensor in peft.module_tensors(part, ""):
                    out.add(key, tensor)
                stream.keep(part)
                kept.add(part.name)
        by_component: dict[str, dict] = {}
        for name, module in stream.written(n for n in names.values() if n in kept).items():
            by_component.setdefault(component_of(name), {})[name] = module
        packed = {}
        for component, members in by_component.items():
            cfg = peft.lora_config(members, {n: config_path(n) for n in members}, rslora=rslora, saved_modules=[])
            packed.update({f"{component}.{k}": v for k, v in cfg.items()})
        return {dest.name: out.close({"format": "pt", METADATA_KEY: json.dumps(packed, sort_keys=True)})}
