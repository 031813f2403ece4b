"""Merge and subtract: two weighted adapters into a sharded bf16 Llama-style model, then out again — with the
residual a bf16 round trip leaves, and `--exact`, which restores the base bit for bit from the registry. Then a LoRA
into an FP8 copy of that model (DeepSeek-V3's fine-grained layout), kept FP8 or dequantized to bf16. Then kohya
LoRAs into single-file SD 1.x and SDXL checkpoints (sd-scripts' names bound to the checkpoints' original ones; SDXL's
second text encoder keeps q, k and v fused in one tensor), a LyCORIS LoHa into the SD 1.x checkpoint (checked against
LyCORIS' formula in float64), and a diffusers-format FLUX LoRA into a FLUX.1 checkpoint
in Black Forest Labs' layout. A DoRA adapter (PEFT use_dora), merged to what PEFT's adapted model computes. A LoRA
with PEFT trainable tokens (trainable_token_indices): those embedding rows replaced by the trained ones. A PEFT
lora_bias adapter (a bias on lora_B), its biases merged into the base layers'. PEFT AdaLoRA
(after its budget allocation) and VeRA adapters, read, merged and exported as the plain LoRAs they equal. Last, SD
block weights (sd-scripts' --lbws): a kohya LoRA merged with each U-Net block's ΔW weighted on its own and
subtracted again, merged with the LoRA Block Weight extension's OUTALL preset, and two combined with one list
each. Last, a kohya FLUX LoRA (sd-scripts' names, q/k/v fused)
checked against and merged into a diffusers FLUX pipeline folder, which holds them in parts, and written back as
kohya from the pipeline-bound adapter. Then a Wan 2.2 pipeline's two experts, each given its own LoRA in one merge
(--transformer-2 for the low-noise one, named as Wan 2.2's distilled LoRAs are: lora_down/lora_up on Wan's own
dotted paths).

    python examples/02_merge.py [WORKDIR]

Builds everything it uses (no network), runs the commands through the real CLI, then the same merge through the
Python API.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _build import (FLUX, FLUX_PIPELINE_KOHYA, SD15, SDXL, WAN_DOTTED, WAN_KOHYA, adalora, diffusers_lora,  # noqa: E402
                    flux_pipeline, fp8_llama, gpt_oss, llama, loraops, lycoris_loha, mixtral, named_kohya_lora,
                    peft_lora, sd_checkpoint, vera, wan22_pipeline, workdir)

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def main() -> None:
    work = workdir("02_merge")
    print(f"building a sharded bf16 base and two adapters in {work} ...")
    base = llama(work / "llama-tiny", dtype=torch.bfloat16, shard_size="60KB")
    style = peft_lora(base, work / "style", r=8, alpha=16, targets=TARGETS, seed=1)
    topic = peft_lora(base, work / "topic", r=4, alpha=8, targets=TARGETS, seed=2)

    loraops("base", "add", base)
    loraops("register", style)
    loraops("merge", "style:0.7", f"{topic}:-0.3", "--into", "llama-tiny", "-o", work / "merged", "--name", "merged")
    loraops("base", "show", "merged")
    loraops("check", "style", "--base", "merged")  # merged models are bases like any other
    loraops("subtract", "style:0.7", f"{topic}:-0.3", "--from", "merged", "-o", work / "restored")
    loraops("subtract", "style:0.7", f"{topic}:-0.3", "--from", "merged", "-o", work / "exact", "--exact")
    same = all((work / "exact" / f.name).read_bytes() == f.read_bytes() for f in base.glob("*.safetensors"))
    print(f"\n--exact output byte-identical to the base: {same}")
    if not same:
        sys.exit("--exact did not restore the base")
    loraops("merge", "style", "--into", "llama-tiny", "-o", work / "exact", ok=False)  # exists: needs --force
    # a registered base's files are never replaced, not even with --force (its record would describe other values)
    loraops("merge", "style", "--into", "llama-tiny", "-o", work / "merged", "--force", ok=False)
    loraops("merge", "style", "--into", work / "does-not-exist", "-o", work / "x", ok=False)

    print("\n--- a LoRA into an FP8 checkpoint (transformers' fine-grained FP8, DeepSeek-V3's layout) ---")
    fp8 = fp8_llama(base, work / "llama-fp8")
    loraops("check", "style", "--base", fp8)  # the weight_scale_inv tensors are no modules: nothing to misfit
    loraops("merge", "style", "--into", fp8, "-o", work / "merged-fp8", "--no-record")  # FP8 again, new scales
    loraops("merge", "style", "--into", fp8, "-o", work / "merged-fp8-bf16", "--dtype", "bf16", "--no-record")
    # transformers on a CPU loads an FP8 model dequantized to bf16: the merged FP8 one, and the base under PEFT
    for merged, atol in (("merged-fp8", 0.1), ("merged-fp8-bf16", 0.02)):
        print(f"{merged} vs the PEFT model on the FP8 base: max |Δ logits| "
              f"{logit_gap(fp8, style, work / merged, atol):.2g}")

    print("\n--- kohya LoRAs into single-file SD checkpoints: sd-scripts' names bound to the original ones ---")
    for label, (tensors, modules), version in [("sd15", SD15, "sd_v1"), ("sdxl", SDXL, "sdxl_base_v1-0")]:
        checkpoint = sd_checkpoint(work / f"{label}-tiny.safetensors", tensors)
        kohya = named_kohya_lora(work / f"{label}-style.safetensors", modules, r=4, alpha=2,
                                 metadata={"ss_network_module": "networks.lora", "ss_base_model_version": version})
        loraops("check", kohya, "--base", checkpoint)
        loraops("merge", f"{kohya}:0.8", "--into", checkpoint, "-o", work / f"{label}-merged.safetensors", "--no-record")
    print("\n--- a LyCORIS LoCon in Tucker form (1×1 down, k×k lora_mid, 1×1 up) into the SD 1.5 checkpoint ---")
    tucker = named_kohya_lora(work / "sd15-tucker.safetensors", SD15[1], r=4, alpha=2, tucker=True,
                              metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1"})
    loraops("check", tucker, "--base", work / "sd15-tiny.safetensors")
    loraops("merge", tucker, "--into", work / "sd15-tiny.safetensors", "-o", work / "sd15-tucker-merged.safetensors",
            "--no-record")
    print(f"\nthe 3×3 conv's LoRA as loraops reads it vs LyCORIS' three convolutions: max relative |Δ output| "
          f"{tucker_gap(tucker):.0e}")

    print("\n--- a LyCORIS LoHa (Hadamard product of two rank-4 products) into the SD 1.5 checkpoint ---")
    loha = lycoris_loha(work / "sd15-loha.safetensors", SD15[1], r=4, alpha=2,
                        metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1"})
    loraops("inspect", loha)
    loraops("check", loha, "--base", work / "sd15-tiny.safetensors")
    loraops("merge", f"{loha}:0.8", "--into", work / "sd15-tiny.safetensors", "-o", work / "sd15-loha-merged.safetensors",
            "--no-record")
    print(f"\nmerged vs W + 0.8·(alpha/r)·(w1a·w1b)⊙(w2a·w2b) in float64: max error "
          f"{loha_gap(loha, work / 'sd15-tiny.safetensors', work / 'sd15-loha-merged.safetensors'):.1f} ulp")
    loraops("export", loha, "--format", "kohya", "-o", work / "loha-lora.safetensors", ok=False)  # no B·A to write

    print("\n--- a diffusers FLUX LoRA (split q/k/v) into a FLUX.1 checkpoint that fuses them ---")
    flux = sd_checkpoint(work / "flux-tiny.safetensors", FLUX[0])
    flux_lora = diffusers_lora(work / "flux-style.safetensors", FLUX[1], r=4)
    loraops("check", flux_lora, "--base", flux)
    loraops("merge", flux_lora, "--into", flux, "-o", work / "flux-merged.safetensors", "--no-record")

    print("\n--- a Mixtral LoRA made with PEFT's all-linear: its experts are raw 3-D parameters (target_parameters) ---")
    moe = mixtral(work / "mixtral-tiny")
    moe_lora = peft_lora(moe, work / "moe-lora", r=4, alpha=8, targets="all-linear", seed=3)
    loraops("check", moe_lora, "--base", moe)
    loraops("merge", moe_lora, "--into", moe, "-o", work / "mixtral-merged", "--no-record")
    print(f"\nmerged Mixtral vs the PEFT model: max |Δ logits| {logit_gap(moe, moe_lora, work / 'mixtral-merged'):.0e}")

    print("\n--- a gpt-oss LoRA as TRL's recipe makes it: one layer's fused experts (stored fused on disk too) ---")
    oss = gpt_oss(work / "gpt-oss-tiny")
    oss_lora = peft_lora(oss, work / "oss-lora", r=4, alpha=8, targets="all-linear", seed=4,
                         parameters=["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj"])
    loraops("check", oss_lora, "--base", oss)
    loraops("merge", oss_lora, "--into", oss, "-o", work / "gpt-oss-merged", "--no-record")
    print(f"\nmerged gpt-oss vs the PEFT model: max |Δ logits| {logit_gap(oss, oss_lora, work / 'gpt-oss-merged'):.0e}")

    print("\n--- a DoRA adapter (PEFT use_dora): each output channel rescaled to its learned magnitude ---")
    small = llama(work / "llama-fp32")
    dora = peft_lora(small, work / "dora", r=8, alpha=16, targets=TARGETS, seed=5, dora=True)
    loraops("inspect", dora)
    loraops("check", dora, "--base", small)
    loraops("merge", dora, "--into", small, "-o", work / "dora-merged", "--name", "dora-merged")
    print(f"\nmerged DoRA model vs the PEFT model: max |Δ logits| {logit_gap(small, dora, work / 'dora-merged'):.0e}")
    loraops("subtract", dora, "--from", "dora-merged", "-o", work / "dora-restored", ok=False)  # needs W: --exact
    loraops("subtract", dora, "--from", "dora-merged", "-o", work / "dora-restored", "--exact")

    print("\n--- PEFT trainable tokens (trainable_token_indices): three embedding rows replaced, not added to ---")
    tokens = peft_lora(small, work / "tokens", r=8, alpha=16, targets=TARGETS, seed=6, tokens=[3, 5, 7])
    loraops("inspect", tokens)
    loraops("register", tokens, "--name", "tokens", "--base", "llama-fp32")  # the registry records the token rows
    loraops("check", "tokens")
    loraops("merge", tokens, "--into", small, "-o", work / "tokens-merged", "--no-record")
    print(f"\nmerged model vs the PEFT model: max |Δ logits| {logit_gap(small, tokens, work / 'tokens-merged'):.0e}")
    loraops("merge", f"{tokens}:0.5", "--into", small, "-o", work / "tokens-half", "--no-record", ok=False)

    print("\n--- PEFT lora_bias (a bias on lora_B): merged into the base layers' biases, b + s·lora_B.bias ---")
    biased = llama(work / "llama-bias", attention_bias=True)
    with_bias = peft_lora(biased, work / "lora-bias", r=4, alpha=8, targets=["q_proj", "v_proj"], seed=9, lora_bias=True)
    loraops("inspect", with_bias)
    loraops("merge", with_bias, "--into", biased, "-o", work / "lora-bias-merged", "--no-record")
    gap = logit_gap(biased, with_bias, work / "lora-bias-merged")
    print(f"\nmerged model vs the PEFT model: max |Δ logits| {gap:.0e}")
    loraops("check", with_bias, "--base", small, ok=False)  # its q/v have no bias: PEFT cannot merge it either

    print("\n--- PEFT AdaLoRA (after its budget allocation) and VeRA (shared random projections): plain LoRAs ---")
    ada = adalora(small, work / "adalora", init_r=6, alpha=16, targets=TARGETS)
    shared = vera(small, work / "vera", r=32, targets=TARGETS)
    loraops("inspect", ada)
    loraops("register", shared, "--name", "vera", "--base", "llama-fp32")  # bound: each layer's width of vera_A
    loraops("show", "vera")
    for adapter in (ada, shared):
        merged = work / f"{adapter.name}-merged"
        loraops("merge", adapter, "--into", small, "-o", merged, "--no-record")
        print(f"\nmerged {adapter.name} vs the PEFT model: max |Δ logits| {logit_gap(small, adapter, merged):.0e}")
    loraops("export", "vera", "--format", "peft", "-o", work / "vera-lora")  # a LoraConfig folder, same ΔW
    print(f"\nthe exported LoRA vs the VeRA adapter under PEFT: max |Δ logits| "
          f"{logit_gap(small, shared, work / 'vera-lora', as_adapter=True):.0e}")
    loraops("export", shared, "--format", "peft", "-o", work / "vera-unbound", ok=False)  # widths need the base

    print("\n--- the same merge through the Python API ---")
    from loraops import engine, formats

    adapters = [(formats.read_adapter(style), 0.7), (formats.read_adapter(topic), -0.3)]
    report = engine.merge(base, adapters, work / "lib-merged")
    print(f"engine.merge: {report.tensors_merged} tensors merged, {report.tensors_copied} copied, "
          f"{report.seconds:.2f} s, peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB")
    back = engine.subtract(work / "lib-merged", adapters, work / "lib-restored", reference=base)
    r = back.residual
    print(f"engine.subtract: {r.elements_differing} of {r.elements} elements differ from the base "
          f"(max |Δ| {r.max_abs_diff:.2g}): bf16 round trips are never bit-exact")

    print("\n--- SD block weights (sd-scripts' --lbws): each U-Net block's ΔW weighted on its own ---")
    # 17 weights: BASE (text encoder), IN01 IN02 IN04 IN05 IN07 IN08, MID, OUT03…OUT11
    weights = "1,0,1,0,0,0,0,0.5,1,1,1,1,1,1,1,1,0"  # IN01 and OUT11 off, MID at half, the rest as they are
    sd15, plain = work / "sd15-tiny.safetensors", work / "sd15-merged.safetensors"
    loraops("merge", f"{work / 'sd15-style.safetensors'}:0.8", "--into", sd15, "-o", work / "sd15-blocks.safetensors",
            "--block-weights", weights, "--no-record")
    print_block_shares(sd15, plain, work / "sd15-blocks.safetensors")
    loraops("subtract", f"{work / 'sd15-style.safetensors'}:0.8", "--from", work / "sd15-blocks.safetensors",
            "-o", work / "sd15-unblocked.safetensors", "--block-weights", weights, "--no-record")  # the same ΔW off
    print_block_shares(sd15, plain, work / "sd15-unblocked.safetensors")
    loraops("merge", f"{work / 'sd15-style.safetensors'}:0.8", "--into", sd15, "-o", work / "sd15-x.safetensors",
            "--block-weights", "1,0,1,0,0,0,0,0.5,1,1,1,1", "--no-record", ok=False)  # 12 weights are SDXL's
    loraops("merge", f"{work / 'sd15-style.safetensors'}:0.8", "--into", sd15, "-o", work / "sd15-outall.safetensors",
            "--block-weights", "OUTALL", "--no-record")  # the LoRA Block Weight extension's preset: OUT blocks only
    print_block_shares(sd15, plain, work / "sd15-outall.safetensors")
    second = named_kohya_lora(work / "sd15-detail.safetensors", SD15[1], r=4, alpha=2, seed=9,
                              metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})
    loraops("combine", work / "sd15-style.safetensors", second, "--method", "svd", "--rank", "4", "--name", "sd15-mix",
            "--block-weights", weights, "--block-weights", "0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
            "-o", work / "sd15-mix.safetensors")

    print("\n--- a kohya FLUX LoRA (sd-scripts' names, fused qkv) into a diffusers FLUX pipeline folder ---")
    pipe = flux_pipeline(work / "flux-pipe")
    kohya_flux = named_kohya_lora(work / "flux-kohya.safetensors", FLUX_PIPELINE_KOHYA, r=4, alpha=2,
                                  metadata={"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"})
    loraops("check", kohya_flux, "--base", pipe)  # qkv → to_q, to_k, to_v; linear1 → those and proj_mlp
    loraops("merge", kohya_flux, "--into", pipe, "-o", work / "flux-pipe-merged", "--no-record")
    loraops("base", "add", pipe, "--name", "flux-pipe")
    loraops("register", kohya_flux, "--name", "flux-kohya", "--base", "flux-pipe")
    loraops("export", "flux-kohya", "--format", "kohya", "-o", work / "flux-kohya-back.safetensors")
    same = kohya_file_tensors(kohya_flux) == kohya_file_tensors(work / "flux-kohya-back.safetensors")
    print(f"\nwritten back as kohya: the same names and values as the file read: {same}")
    if not same:
        sys.exit("the pipeline-bound kohya FLUX LoRA did not round-trip")

    print("\n--- Wan 2.2's two experts, into one pipeline folder in one run: a musubi-tuner LoRA for the high-noise "
          "one, and for the low-noise one a LoRA named as Wan 2.2's distilled (Lightning) LoRAs are, kohya's "
          "lora_down/lora_up on Wan's own dotted paths ---")
    wan = wan22_pipeline(work / "wan22-pipe")
    high = named_kohya_lora(work / "wan22-high.safetensors", WAN_KOHYA, r=4, alpha=2, seed=11,
                            metadata={"ss_network_module": "networks.lora_wan"})
    low = named_kohya_lora(work / "wan22-low.safetensors", WAN_DOTTED, r=4, alpha=2, seed=12, metadata={})
    loraops("check", high, "--transformer-2", low, "--base", wan)
    loraops("merge", high, "--transformer-2", f"{low}:0.8", "--into", wan, "-o", work / "wan22-merged", "--no-record")


def kohya_file_tensors(path: Path) -> dict[str, list]:
    """A kohya file's tensors (alphas as float32, factors as float32 values), to compare two files by."""
    from safetensors.torch import load_file

    return {k: v.float().flatten().tolist() for k, v in load_file(str(path)).items()}


def print_block_shares(base: Path, plain: Path, weighted: Path) -> None:
    """Each U-Net tensor's ΔW under block weights as a share of the plain merge's (0 = left as the base)."""
    from safetensors.torch import load_file

    b, p, w = (load_file(str(f)) for f in (base, plain, weighted))
    for name in sorted(b):
        full = (p[name].double() - b[name].double()).flatten()
        if full.abs().max() > 0:
            share = (w[name].double() - b[name].double()).flatten() @ full / (full @ full)
            print(f"  {name}: {round(share.item(), 2) + 0.0:.2f} of the plain ΔW")  # + 0.0: no -0.00


def tucker_gap(lora: Path) -> float:
    """How far the resnet conv's LoRA, as loraops reads it (one k×k factor), computes from down (1×1), mid (3×3) and
    up (1×1) run one after another as LyCORIS runs them, in float64 on a random input."""
    from safetensors.torch import load_file

    from loraops import formats

    conv, name = torch.nn.functional.conv2d, "lora_unet_down_blocks_0_resnets_1_conv1"
    down, mid, up = (load_file(lora)[f"{name}.lora_{part}.weight"].double() for part in ("down", "mid", "up"))
    module = formats.read_adapter(lora).modules[name]
    x = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lycoris = module.scale * conv(conv(conv(x, down), mid, padding=1), up)
    return float((conv(x, module.delta(dtype=torch.float64), padding=1) - lycoris).abs().max() / lycoris.abs().max())


def loha_gap(loha: Path, checkpoint: Path, merged: Path) -> float:
    """The largest distance, in units of the last place of the merged dtype, between every merged tensor the LoHa
    changed and LyCORIS' formula computed in float64 from the file's own tensors."""
    from safetensors.torch import load_file

    from loraops import check, formats, st

    lycoris, base, out = load_file(loha), load_file(checkpoint), load_file(merged)
    bound = check.bind(formats.read_adapter(loha), st.read_header(checkpoint).tensors)
    worst = 0.0
    for kohya, module in zip(formats.read_adapter(loha).modules, bound.modules.values()):
        f = {p: lycoris[f"{kohya}.{p}"].double() for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")}
        delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * float(f["alpha"]) / 4
        exact = base[module.weight_name].double() + 0.8 * delta.reshape(base[module.weight_name].shape)
        got = out[module.weight_name]
        spacing = torch.finfo(got.dtype).eps * exact.abs().clamp_min(torch.finfo(got.dtype).tiny)
        worst = max(worst, float(((got.double() - exact).abs() / spacing).max()))
    if worst > 1:
        sys.exit("the merged LoHa is not within one rounding of LyCORIS' formula")
    return worst


def logit_gap(base: Path, adapter: Path, merged: Path, atol: float = 1e-5, as_adapter: bool = False) -> float:
    """How far the merged model's logits are from the adapter's model (PEFT, unmerged) on the same tokens
    (``as_adapter``: ``merged`` is another adapter of the base, under PEFT too)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokens = torch.arange(3, 15).unsqueeze(0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*_pattern keys did not match any targeted module")  # see _build
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()(tokens).logits
        model = (PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), merged) if as_adapter
                 else AutoModelForCausalLM.from_pretrained(merged))
        got = model.eval()(tokens).logits
    if not torch.allclose(got, expected, atol=atol):
        sys.exit(f"the merged {merged.name} does not compute what the adapter's model computes")
    return float((got - expected).abs().max())


if __name__ == "__main__":
    main()
