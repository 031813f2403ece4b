"""Small models and adapters for the examples, built locally (no network): a random Llama-style model saved by
transformers, PEFT adapters made by peft itself, and a kohya-style file written by hand."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch


def llama(path: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32,
          shard_size: str | None = None, attention_bias: bool = False, tied: bool = False) -> Path:
    """A random Llama-style model saved by transformers (sharded, with an index, when shard_size is given;
    ``attention_bias``: q, k, v and o with biases, as Qwen2's q, k, v; ``tied``: its head tied to its input
    embeddings, lm_head.weight not stored)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tied,
                         attention_bias=attention_bias)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    LlamaForCausalLM(config).to(dtype).save_pretrained(path, safe_serialization=True, **kwargs)
    return Path(path)


def fp8_llama(source: Path, out: Path, *, block: tuple[int, int] = (16, 16)) -> Path:
    """An FP8 copy of a Llama-style model folder in transformers' fine-grained layout (DeepSeek-V3's), quantized by
    transformers' own Fp8Quantize: each decoder layer's Linear weights F8_E4M3 with their per-block
    weight_scale_inv; embeddings, norms and lm_head kept, as published FP8 models keep them."""
    import json
    import shutil
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    quantize = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=list(block))))
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    state, quantized = {}, {}
    for shard in sorted(source.glob("*.safetensors")):
        state.update(load_file(shard))
    for name, tensor in state.items():
        quantized.update(quantize._quantize_one(name, tensor) if ".layers." in name and name.endswith("_proj.weight")
                         else {name: tensor})
    save_file(quantized, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def mixtral(path: Path, *, hidden: int = 32, layers: int = 2, experts: int = 4, seed: int = 0) -> Path:
    """A random Mixtral-style MoE model: transformers 5 holds its experts fused (3-D parameters) and saves them one
    tensor per expert (block_sparse_moe.experts.<e>.w1/w2/w3)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=4, num_local_experts=experts, num_experts_per_tok=2, vocab_size=128,
                           max_position_embeddings=64)
    MixtralForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return Path(path)


def gpt_oss(path: Path, *, hidden: int = 32, layers: int = 2, experts: int = 4, seed: int = 0) -> Path:
    """A random gpt-oss-style MoE model: its experts are saved as transformers holds them, fused (one E×H×2I
    gate_up_proj with gate and up interleaved, one E×I×H down_proj per layer)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=4, head_dim=8, num_local_experts=experts, num_experts_per_tok=2,
                          vocab_size=128, max_position_embeddings=64, sliding_window=8)
    GptOssForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return Path(path)


def peft_lora(base: Path, out: Path, *, r: int, alpha: float, targets: list[str] | str, seed: int = 1,
              parameters: list[str] | None = None, dora: bool = False, tokens: list[int] | None = None,
              lora_bias: bool = False) -> Path:
    """A PEFT LoRA folder trained on nothing: random, non-zero factors, as peft itself writes them (``parameters``:
    PEFT's target_parameters). ``dora``: a DoRA adapter (use_dora), its magnitudes moved off PEFT's initial ‖W + s·B·A‖
    (where DoRA merges as plain LoRA would), as training moves them. ``tokens``: PEFT trainable tokens
    (trainable_token_indices) on the input embeddings, their rows moved off the embeddings' own values.
    ``lora_bias``: a bias on each lora_B (PEFT's lora_bias), random as nn.Linear initializes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # PEFT 0.21 warns that the gate_up_proj patterns its all-linear writes for fused MoE experts match nothing,
        # then applies them (docs/moe.md)
        warnings.filterwarnings("ignore", message=r".*_pattern keys did not match any targeted module")
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_dora=dora,
                                                      target_parameters=parameters, init_lora_weights=False,
                                                      trainable_token_indices=tokens, lora_bias=lora_bias))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.exp(0.3 * torch.randn_like(param)))
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn_like(param))
    peft_model.save_pretrained(out)
    return Path(out)


def algebra_inputs(work: Path) -> tuple[Path, Path, Path, Path]:
    """The algebra examples' tiny Llama base and three PEFT adapters on it, of ranks 8, 4 and 16 over growing sets of
    attention layers: (base, style, subject, big)."""
    base = llama(work / "llama-tiny")
    style = peft_lora(base, work / "style", r=8, alpha=16, targets=["q_proj", "v_proj"], seed=1)
    subject = peft_lora(base, work / "subject", r=4, alpha=4, targets=["q_proj", "k_proj", "v_proj"], seed=2)
    big = peft_lora(base, work / "big", r=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj"], seed=3)
    return base, style, subject, big


def adalora(base: Path, out: Path, *, init_r: int, alpha: float, targets: list[str], seed: int = 7) -> Path:
    """A PEFT AdaLoRA adapter trained a few steps on the tokens 3…14 with PEFT's own budget allocation
    (update_and_allocate: the config's rank_pattern, each module saved at the rank it keeps), E moved off PEFT's zeros
    first so the first steps have gradients to rank by."""
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AdaLoraConfig(init_r=init_r, target_r=init_r // 2, lora_alpha=alpha, target_modules=targets,
                           total_step=10, tinit=1, tfinal=2)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_E" in name:
                param.normal_()
    tokens = torch.arange(3, 15).unsqueeze(0)
    model.train()
    for step in range(1, 9):
        model(input_ids=tokens, labels=tokens).loss.backward()
        model.base_model.update_and_allocate(step)
        model.zero_grad()
    model.save_pretrained(out)
    return Path(out)


def vera(base: Path, out: Path, *, r: int, targets: list[str], seed: int = 8) -> Path:
    """A PEFT VeRA adapter (its shared vera_A/vera_B saved, as by default), λ_b and λ_d moved off PEFT's zeros and
    d_initial, as training moves them."""
    from peft import VeraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), VeraConfig(r=r, target_modules=targets))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda" in name:
                param.normal_()
    model.save_pretrained(out)
    return Path(out)


def kohya_lora(base: Path, out: Path, *, r: int, alpha: float, targets: list[str], seed: int = 2) -> Path:
    """A kohya/sd-scripts style file (lora_down/lora_up/alpha, ss_* metadata) for the base's modules named in
    ``targets``, with names in kohya's underscore form."""
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as f:
        modules = {"lora_unet_" + key.removesuffix(".weight").replace(".", "_"): tuple(f.get_slice(key).get_shape())
                   for key in f.keys() if key.removesuffix(".weight").rsplit(".", 1)[-1] in targets}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(r), "ss_network_alpha": str(alpha)}
    return named_kohya_lora(out, modules, r=r, alpha=alpha, metadata=meta, seed=seed)


# Tiny single-file SD checkpoints (original LDM names, {tensor: shape}) and the sd-scripts names of LoRA modules on
# them ({kohya name: (out, in, *kernel)}). SD 1.x: sd-scripts names UNet modules with diffusers blocks. SDXL: the
# UNet keeps its own names, and the second text encoder (OpenCLIP) holds q, k and v fused in one in_proj_weight.
SD15 = (
    {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (32, 32),
     "model.diffusion_model.middle_block.1.proj_in.weight": (64, 64, 1, 1),
     "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight": (32, 128),
     "model.diffusion_model.input_blocks.2.0.in_layers.2.weight": (32, 32, 3, 3),
     "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight": (48, 48),
     "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3)},
    {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
     "lora_unet_mid_block_attentions_0_proj_in": (64, 64, 1, 1),
     "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": (32, 128),
     "lora_unet_down_blocks_0_resnets_1_conv1": (32, 32, 3, 3),
     "lora_te_text_model_encoder_layers_0_self_attn_k_proj": (48, 48)},
)
SDXL = (
    {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (64, 80),
     "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (48, 48),
     "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3 * 80, 80),
     "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias": (3 * 80,),
     "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (320, 80)},
    {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (64, 80),
     "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (48, 48),
     "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (80, 80),
     "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": (80, 80),
     "lora_te2_text_model_encoder_layers_0_self_attn_v_proj": (80, 80),
     "lora_te2_text_model_encoder_layers_0_mlp_fc1": (320, 80)},
)


# FLUX.1 in Black Forest Labs' layout (q, k, v fused in img_attn.qkv; q, k, v and the MLP input in linear1), hidden 64,
# and a diffusers-format LoRA on the split modules, as ai-toolkit and diffusers' trainers save them.
FLUX = (
    {"img_in.weight": (64, 16), "double_blocks.0.img_attn.qkv.weight": (3 * 64, 64),
     "double_blocks.0.img_attn.proj.weight": (64, 64), "double_blocks.0.img_mlp.0.weight": (256, 64),
     "single_blocks.0.linear1.weight": (3 * 64 + 256, 64), "single_blocks.0.linear2.weight": (64, 64 + 256)},
    {"transformer.transformer_blocks.0.attn.to_q": (64, 64), "transformer.transformer_blocks.0.attn.to_v": (64, 64),
     "transformer.transformer_blocks.0.attn.to_out.0": (64, 64),
     "transformer.single_transformer_blocks.0.attn.to_k": (64, 64),
     "transformer.single_transformer_blocks.0.proj_mlp": (256, 64)},
)


def flux_pipeline(out: Path, *, seed: int = 0) -> Path:
    """A diffusers FluxPipeline folder holding only its transformer (a random FluxTransformer2DModel, hidden 32: one
    double and one single block), saved by diffusers; q, k, v and the MLP input in parts (to_q…, proj_mlp)."""
    import json

    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                           guidance_embeds=False, axes_dims_rope=(4, 6, 6)).save_pretrained(out / "transformer")
    (out / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    return out


def wan22_pipeline(out: Path) -> Path:
    """A diffusers Wan 2.2 A14B-style WanPipeline folder holding only its two experts, transformer/ (high noise) and
    transformer_2/ (low noise): random WanTransformer3DModels (hidden 16, one block), other weights each."""
    import json

    from diffusers import WanTransformer3DModel

    for seed, component in enumerate(("transformer", "transformer_2")):
        torch.manual_seed(seed)
        WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                              out_channels=4, text_dim=12, freq_dim=8, ffn_dim=32, num_layers=1,
                              cross_attn_norm=True).save_pretrained(out / component)
    (out / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
         "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    return out


# musubi-tuner's names for Wan's checkpoint modules (blocks.0.self_attn.q …), in that pipeline
WAN_KOHYA = {"lora_unet_blocks_0_self_attn_q": (16, 16), "lora_unet_blocks_0_cross_attn_k": (16, 16),
             "lora_unet_blocks_0_ffn_0": (32, 16)}
# the same modules as Wan 2.2's distilled (Lightning) LoRAs name them: kohya's factor names on Wan's own dotted paths
WAN_DOTTED = {"diffusion_model.blocks.0.self_attn.q": (16, 16), "diffusion_model.blocks.0.cross_attn.k": (16, 16),
              "diffusion_model.blocks.0.ffn.0": (32, 16)}


# sd-scripts' lora_flux names for that pipeline's checkpoint modules: the fused qkv and linear1, and the final adaLN
# (whose shift and scale halves diffusers swaps)
FLUX_PIPELINE_KOHYA = {
    "lora_unet_double_blocks_0_img_attn_qkv": (3 * 32, 32), "lora_unet_double_blocks_0_txt_attn_proj": (32, 32),
    "lora_unet_single_blocks_0_linear1": (7 * 32, 32), "lora_unet_final_layer_adaLN_modulation_1": (2 * 32, 32),
}


def diffusers_lora(out: Path, modules: dict[str, tuple[int, int]], *, r: int, seed: int = 4) -> Path:
    """A diffusers-format LoRA file (PEFT keys behind the component, no alpha metadata: alpha = r)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_f, in_f) in modules.items():
        tensors[f"{name}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
        tensors[f"{name}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.01
    save_file(tensors, str(out))
    return Path(out)


def sd_checkpoint(out: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    """A random fp16 single-file checkpoint with these tensors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    save_file({name: torch.randn(shape, generator=g).half() for name, shape in tensors.items()}, str(out))
    return Path(out)


def named_kohya_lora(out: Path, modules: dict[str, tuple[int, ...]], *, r: int, alpha: float,
                     metadata: dict[str, str], seed: int = 3, tucker: bool = False) -> Path:
    """A kohya LoRA with these names and ``ss_*`` metadata ({name: (out, in, *kernel)}; a 4-D shape gets LoCon
    factors, and with ``tucker`` a k×k one LyCORIS' Tucker form: a 1×1 down, an r×r×k×k mid). Written by loraops'
    writer, whose bytes do not change from run to run (safetensors' save_file orders the metadata differently each
    time), so the demo's sha256s can be quoted."""
    from loraops.st import write_safetensors

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_f, in_f, *kernel) in modules.items():
        if tucker and any(k > 1 for k in kernel):
            tensors[f"{name}.lora_down.weight"] = torch.randn(r, in_f, 1, 1, generator=g)
            tensors[f"{name}.lora_mid.weight"] = torch.randn(r, r, *kernel, generator=g) / 3
        else:
            tensors[f"{name}.lora_down.weight"] = torch.randn(r, in_f, *kernel, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_f, r, *([1, 1] if kernel else []), generator=g) * 0.01
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    write_safetensors(out, tensors, metadata)
    return Path(out)


def lycoris_loha(out: Path, modules: dict[str, tuple[int, ...]], *, r: int, alpha: float, metadata: dict[str, str],
                 seed: int = 4) -> Path:
    """A LyCORIS LoHa file with these names ({name: (out, in, *kernel)}): hada_w1_a/hada_w2_a out×r,
    hada_w1_b/hada_w2_b r×(in·k·k) — a conv's factors flattened, as LyCORIS stores them without use_tucker."""
    from loraops.st import write_safetensors

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_f, in_f, *kernel) in modules.items():
        flat = in_f * (kernel[0] * kernel[1] if kernel else 1)
        for n in (1, 2):
            tensors[f"{name}.hada_w{n}_a"] = torch.randn(out_f, r, generator=g) * 0.1
            tensors[f"{name}.hada_w{n}_b"] = torch.randn(r, flat, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    write_safetensors(out, tensors, metadata)
    return Path(out)


def workdir(name: str) -> Path:
    """WORKDIR/<name> from the command line (default: a temp dir), with the registry in its own home there unless
    LORAOPS_HOME is set."""
    import os
    import sys
    import tempfile

    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()) / name
    os.environ.setdefault("LORAOPS_HOME", str(work / "home"))
    os.environ.setdefault("LORAOPS_QUIET", "1")
    # transformers' and the Hub's progress bars and notices (making and loading the tiny models) are not the demo
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    return work


def loraops(*args, ok: bool = True, env: dict | None = None) -> None:
    """Run the real CLI (`python -m loraops ...`), echoing the command line; stop the example on an unexpected
    exit code (ok=False: the command is meant to fail)."""
    import subprocess
    import sys

    print(f"\n$ loraops {' '.join(str(a) for a in args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "loraops", *map(str, args)], text=True, env=env)
    if (done.returncode == 0) != ok:
        sys.exit(f"unexpected exit code {done.returncode} from: loraops {' '.join(map(str, args))}")
