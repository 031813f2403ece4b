"""Small real models and adapters, built locally (no network) for tests, examples and benchmarks.

Models are random `transformers` models saved with save_pretrained; adapters are made by `peft` itself
with init_lora_weights=False so B is not zero. Everything is seeded and tiny.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(path: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, shard_size: str | None = None,
               hidden: int = 64, layers: int = 2, intermediate: int = 128, vocab: int = 128, tie: bool = False) -> Path:
    """A random Llama-style model folder (config + safetensors, sharded when shard_size is given); ``tie``: its head
    tied to its input embeddings (lm_head.weight not stored)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).to(dtype)
    kwargs: dict[str, Any] = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return Path(path)


def tiny_gpt2(path: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A random GPT-2 model folder (Conv1D layers: PEFT needs fan_in_fan_out=True for them)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    GPT2LMHeadModel(config).to(dtype).save_pretrained(path, safe_serialization=True)
    return Path(path)


def load_model(path: Path, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype) if dtype else AutoModelForCausalLM.from_pretrained(path)


def peft_adapter(base_path: Path, out: Path, *, seed: int = 1, r: int = 8, alpha: float = 16,
                 target_modules: list[str] | str | None = None, dtype: torch.dtype | None = None,
                 **lora_kwargs: Any) -> Path:
    """A PEFT LoRA adapter folder made by peft itself on the model at base_path (B initialised non-zero)."""
    from peft import LoraConfig, get_peft_model

    model = load_model(base_path)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules or LLAMA_TARGETS,
                        init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    if dtype is not None:
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(dtype)
    peft_model.save_pretrained(out)
    # Record the base by its local path, as PEFT does for a model loaded from disk.
    cfg_path = Path(out) / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base_path)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return Path(out)


def token_adapter(base_path: Path, out: Path, config, *, seed: int = 1):
    """A PEFT adapter with trainable tokens (``config``: a LoraConfig with trainable_token_indices, or a
    TrainableTokensConfig) made by peft on the model at base_path, the token rows moved off their initial values (the
    embeddings' own) by random steps; returns (folder, the PeftModel, adapters active)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(load_model(base_path), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn_like(param))
    peft_model.save_pretrained(out)
    return Path(out), peft_model


def perturb_magnitudes(adapter_dir: Path, *, seed: int = 0, spread: float = 0.3) -> Path:
    """Multiply a DoRA adapter's magnitudes (lora_magnitude_vector) by random factors exp(spread·N(0, 1)): PEFT
    initialises them to ‖W + s·B·A‖, with which a DoRA adapter merges exactly as the plain LoRA would (f = 1)."""
    from safetensors.torch import load_file, save_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(seed)
    tensors = {k: v * torch.exp(spread * torch.randn(v.shape, generator=g)).to(v.dtype) if "lora_magnitude_vector" in k
               else v for k, v in load_file(path).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return Path(adapter_dir)


def conv_embedding_model() -> torch.nn.Module:
    """A tiny torch model with an Embedding, a Linear, a 1×1 Conv2d and a 3×3 Conv2d, for PEFT's other layer kinds."""

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(32, 16)
            self.proj = torch.nn.Linear(16, 24)
            self.conv1 = torch.nn.Conv2d(4, 8, 1)
            self.conv3 = torch.nn.Conv2d(8, 6, 3, padding=1)

        def forward(self, ids, image):  # pragma: no cover - shapes only
            return self.proj(self.embed(ids)), self.conv3(self.conv1(image))

    torch.manual_seed(0)
    return Tiny()


def save_state_dict(model: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path)


def kohya_file(path: Path, modules: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], *, rank: int = 4,
               alpha: float | None = 2.0, seed: int = 0, dtype: torch.dtype = torch.float32,
               metadata: dict[str, str] | None = None) -> Path:
    """A kohya/sd-scripts LoRA file: {kohya_name: (down_shape, up_shape)} with random factors.

    down_shape/up_shape are given without the rank, e.g. ((in,), (out,)) for linear or ((in, 3, 3), (out, 1, 1))
    for a k×k conv; the rank is inserted. alpha=None writes no .alpha tensor (kohya then uses alpha = r).
    """
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (down_rest, up_rest) in modules.items():
        down_shape = (rank, *down_rest)
        up_shape = (up_rest[0], rank, *up_rest[1:])
        tensors[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=g).to(dtype)
        tensors[f"{name}.lora_up.weight"] = (torch.randn(up_shape, generator=g) * 0.1).to(dtype)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha if alpha is not None else rank)}
    meta.update(metadata or {})
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


def lora_adapter(shapes: dict[str, tuple[int, ...]], *, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                 dtype: torch.dtype = torch.float32, scale_mode: str = "classic", base_model: str | None = "base",
                 kind: str = "linear", fmt: str = "peft"):
    """An in-memory loraops Adapter with random factors: {module name: weight shape} (out, in) for linear,
    (out, in, kh, kw) for conv. The scale follows alpha and scale_mode (rsLoRA: alpha/√r)."""
    import math

    from loraops.adapter import Adapter, LoraModule

    g = torch.Generator().manual_seed(seed)
    scale = alpha / (math.sqrt(rank) if scale_mode == "rslora" else rank)
    modules = {}
    for name, shape in shapes.items():
        out, rest = shape[0], shape[1:]
        A = torch.randn(rank, *rest, generator=g) / math.sqrt(rest[0])
        B = torch.randn(out, rank, *([1, 1] if kind == "conv" else []), generator=g) * 0.1
        modules[name] = LoraModule(name, A=A.to(dtype), B=B.to(dtype), alpha=alpha, scale=scale, kind=kind)
    return Adapter(modules=modules, format=fmt, base_model=base_model, scale_mode=scale_mode)


def layouts_adapter(seed: int):
    """An in-memory adapter with a module of each layout: an embedding and a GPT-2 Conv1D (weights stored (B·A)ᵀ),
    a 3×3 conv, and a Linear of one input feature."""
    from dataclasses import replace

    linear = lora_adapter({"emb": (16, 40), "c1d": (12, 24), "one": (8, 1)}, rank=3, seed=seed)
    modules = {"emb": replace(linear.modules["emb"], kind="embedding"),
               "c1d": replace(linear.modules["c1d"], fan_in_fan_out=True), "one": linear.modules["one"]}
    conv = lora_adapter({"conv": (6, 4, 3, 3)}, rank=2, seed=seed, kind="conv").modules
    return replace(linear, modules={**modules, **conv})


def combine_inputs(root: Path) -> dict[str, Path]:
    """A tiny Llama ("base") and three PEFT adapters on it, for the combine CLI tests: "a" (q_proj, v_proj; r 4),
    "b" (q_proj, o_proj; r 6), "c" (q_proj; r 2)."""
    base = tiny_llama(root / "base")
    return {"base": base,
            "a": peft_adapter(base, root / "a", seed=1, r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
            "b": peft_adapter(base, root / "b", seed=2, r=6, alpha=3, target_modules=["q_proj", "o_proj"]),
            "c": peft_adapter(base, root / "c", seed=3, r=2, alpha=2, target_modules=["q_proj"])}


_FORKS: list = []  # this process's fork server, started by the first loraops_run


def loraops_run(*args, cwd=None):
    """`loraops ARGS` as a user runs it (no traceback may reach them), in a process of its own with this test's
    environment, in its working folder (or ``cwd``): a child of tests/forkserver.py, which imported loraops and torch once (a plain
    `python -m loraops` pays 1-3 s of start-up per run). Returns a subprocess.CompletedProcess, text."""
    import atexit
    import os
    import subprocess
    import tempfile

    from forkserver import ForkServer

    if not _FORKS:
        _FORKS.append(ForkServer())
        atexit.register(_FORKS[0].__exit__)
    args = [str(a) for a in args]
    with tempfile.TemporaryDirectory(prefix="loraops-run-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        code = _FORKS[0].run(args, dict(os.environ), out, stdout=out, stderr=err, cwd=str(cwd or os.getcwd()), whole_env=True)
        with open(out) as stdout, open(err) as stderr:
            return subprocess.CompletedProcess(["loraops", *args], code, stdout.read(), stderr.read())


HEAVY_MODULES = ("torch", "numpy", "sqlalchemy", "alembic", "transformers", "huggingface_hub", "safetensors")


def fresh_cli_against_loaded(*args) -> tuple[list[str], tuple, tuple]:
    """`loraops ARGS` in a fresh interpreter (where the header-only commands run without torch: st.without_torch) and
    in this one (torch loaded: the usual reads): (the HEAVY_MODULES the fresh run imported, its (exit code, stdout,
    stderr), this process's)."""
    import os
    import subprocess
    import sys

    from click.testing import CliRunner

    from loraops.cli import main

    code = ("import sys; from loraops.cli import exit_status\n"
            "code = exit_status(sys.argv[1:])\n"
            f"print('imported:', *[m for m in {HEAVY_MODULES!r} if m in sys.modules], file=sys.stderr)\n"
            "sys.exit(code)\n")
    args = [str(a) for a in args]
    fresh = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    said, _, imported = fresh.stderr.rpartition("imported:")
    loaded = CliRunner().invoke(main, args)
    return imported.split(), (fresh.returncode, fresh.stdout, said), (loaded.exit_code, loaded.stdout, loaded.stderr)


def interrupted_once_returned(monkeypatch, command: str) -> None:
    """A Ctrl-C as click returns from ``command`` (`loraops COMMAND` run in this process), after its summary was
    said: where a run under load was interrupted once its output had landed (test_crash's merge)."""
    import click

    def invoke_then_interrupted(ctx, callback, *args, real=click.Context.invoke, **kwargs):
        result = real(ctx, callback, *args, **kwargs)
        if ctx.info_name == command:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(click.Context, "invoke", invoke_then_interrupted)


def interrupted_as_a_write_commits(monkeypatch, signum: int | None = None) -> None:
    """A Ctrl-C (a real SIGINT, as the user's; or ``signum``) that arrives in the instant after the registry's first
    write transaction committed, before the code after the commit runs."""
    import os
    import signal

    from sqlalchemy.orm import Session

    sent = []

    def commit_then_ctrl_c(self, real=Session.commit):
        real(self)
        if not sent and self.get_bind().get_execution_options().get("loraops_write"):
            sent.append(True)
            os.kill(os.getpid(), signum or signal.SIGINT)

    monkeypatch.setattr(Session, "commit", commit_then_ctrl_c)


def conv_peft_adapter(out: Path, *, seed: int = 1, r: int = 4, alpha: float = 8,
                      target_modules: list[str] | None = None, **lora_kwargs: Any) -> Path:
    """A PEFT adapter made by peft on conv_embedding_model() (Embedding, Linear, 1×1 and 3×3 Conv2d)."""
    from peft import LoraConfig, get_peft_model

    model = conv_embedding_model()
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules or ["embed", "proj", "conv1", "conv3"],
                        init_lora_weights=False, **lora_kwargs)
    get_peft_model(model, config).save_pretrained(out)
    return Path(out)


def peft_delta_weights(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's own delta for every LoRA layer of a loaded PeftModel ({module path without base_model.model.: delta}),
    in the base weight's layout, as PEFT computes it for merging."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in peft_model.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.scaling:
            with torch.no_grad():
                out[name.removeprefix("base_model.model.")] = layer.get_delta_weight("default").float()
    return out


def roberta_classifier_adapter(root: Path, *, seed: int = 0):
    """A tiny RobertaForSequenceClassification (``root/base``) and a PEFT SEQ_CLS LoRA on it (``root/a``: query and
    value, modules_to_save the whole classifier head, a module with submodules dense and out_proj, its parameters
    moved off the base's as by training); returns (base, adapter folder, the PeftModel)."""
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           vocab_size=100, max_position_embeddings=64, num_labels=3)
    RobertaForSequenceClassification(config).save_pretrained(root / "base")
    model = get_peft_model(RobertaForSequenceClassification.from_pretrained(root / "base"), LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False))
    with torch.no_grad():
        for param in model.base_model.model.classifier.modules_to_save["default"].parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(root / "a")
    return root / "base", root / "a", model


def tiny_transformers(path: Path, model_type: str, cls_name: str, *, seed: int = 0, **config: Any) -> Path:
    """A random transformers model of any family, from its config (``AutoConfig.for_model(model_type, **config)``;
    nested text_config/vision_config as dicts), built as ``cls_name`` and saved with save_pretrained."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)._from_config(transformers.AutoConfig.for_model(model_type, **config))
    model.save_pretrained(path)
    return Path(path)


TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
             "vocab_size": 100, "max_position_embeddings": 64}
TINY_LLAMA = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 64, "vocab_size": 100, "pad_token_id": 0}
TINY_DISTILBERT = {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64, "vocab_size": 100,
                   "max_position_embeddings": 64}
TASK_MODELS = [  # (task_type, model_type, class, config, LoRA targets): a tiny model of each PEFT task model's head
    ("SEQ_CLS", "roberta", "RobertaForSequenceClassification", TINY_BERT, ["query", "value"]),  # classifier.dense/out_proj
    ("SEQ_CLS", "llama", "LlamaForSequenceClassification", TINY_LLAMA, ["q_proj", "v_proj"]),  # score
    ("TOKEN_CLS", "bert", "BertForTokenClassification", TINY_BERT, ["query", "value"]),  # classifier
    ("QUESTION_ANS", "bert", "BertForQuestionAnswering", TINY_BERT, ["query", "value"]),  # qa_outputs
]


def task_adapter(root: Path, task: str, model_type: str, cls_name: str, config: dict, targets: list[str], *,
                 seed: int = 1):
    """A tiny ``cls_name`` model (``root/base``) and a PEFT LoRA of ``task`` on it (``root/a``), made by
    get_peft_model: PEFT's task model saves its head whole (modules_to_save), moved here off the base's values as by
    training. Returns (base, adapter folder, the model class)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    base = tiny_transformers(root / "base", model_type, cls_name, **config)
    model_cls = getattr(transformers, cls_name)
    torch.manual_seed(seed)
    model = get_peft_model(model_cls.from_pretrained(base), LoraConfig(
        task_type=task, r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(root / "a")
    return base, root / "a", model_cls


def fp8_quantize(w: torch.Tensor, block: tuple[int, int] | None, *, ue8m0: bool = False):
    """(FP8 values, float32 inverse scales) of a weight (out×in, or E×out×in) in transformers' fine-grained layout,
    quantized as its Fp8Quantize does (per block amax, scale = 448 / amax, stored 1 / scale; ue8m0: the inverse
    rounded up to a power of two) — here with partial blocks at the edges too (grid ⌈out/bo⌉×⌈in/bi⌉, as DeepSeek's
    and FP8Linear's), which Fp8Quantize leaves unquantized. ``block`` None: one scale per matrix."""
    w = w.float()
    rows, cols = w.shape[-2:]
    bo, bi = block or (rows, cols)
    grid = (-(-rows // bo), -(-cols // bi))
    padded = w.new_zeros(*w.shape[:-2], grid[0] * bo, grid[1] * bi)
    padded[..., :rows, :cols] = w.abs()
    amax = padded.unflatten(-1, (grid[1], bi)).unflatten(-3, (grid[0], bo)).amax(dim=(-3, -1))
    scales = torch.where(amax > 0, 448.0 / torch.where(amax > 0, amax, 1.0), 1.0)
    inverse = (1.0 / scales).float()
    if ue8m0:
        inverse = torch.exp2(torch.ceil(torch.log2(inverse)))
        scales = 1.0 / inverse
    spread = scales.repeat_interleave(bo, -2)[..., :rows, :].repeat_interleave(bi, -1)[..., :cols]
    return (w * spread).clamp(-448, 448).to(torch.float8_e4m3fn), inverse


def fp8_dequantize(q: torch.Tensor, inverse: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """float64 W = fp8 · inverse scale of its block (exact)."""
    rows, cols = q.shape[-2:]
    bo, bi = block or (rows, cols)
    spread = inverse.double().reshape(*q.shape[:-2], -(-rows // bo), -(-cols // bi))
    return q.double() * spread.repeat_interleave(bo, -2)[..., :rows, :].repeat_interleave(bi, -1)[..., :cols]


def fp8_model(source: Path, out: Path, *, block: tuple[int, int] | None = (16, 24), modules=tuple(LLAMA_TARGETS),
              scale_fmt: str | None = None, scale_dtype: torch.dtype = torch.float32) -> Path:
    """An FP8 copy of a float model folder in transformers' fine-grained layout: the weights of the Linear layers
    named in ``modules`` quantized (F8_E4M3 + <m>.weight_scale_inv), the rest (embeddings, norms, lm_head) kept;
    config.json gets its quantization_config. Saved in two shards with every scale in the other shard than its
    weight (the index says where each lies)."""
    import shutil

    from safetensors.torch import load_file, save_file

    state = {}
    for f in sorted(Path(source).glob("*.safetensors")):
        state.update(load_file(f))
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for name, tensor in state.items():
        if name.endswith(".weight") and name.split(".")[-2] in modules:
            q, inverse = fp8_quantize(tensor, block, ue8m0=scale_fmt == "ue8m0")
            shards[1][name] = q
            # (UE8M0 exponents as bytes, as MXFP8 exports store them, for scale_dtype uint8)
            stored = inverse.to(torch.float8_e8m0fnu).view(torch.uint8) if scale_dtype == torch.uint8 else None
            shards[0][f"{name}_scale_inv"] = inverse.to(scale_dtype) if stored is None else stored
        else:
            shards[0][name] = tensor
    out.mkdir(parents=True)
    names = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
             "weight_map": {t: names[i] for i, s in enumerate(shards) for t in sorted(s)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((Path(source) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block) if block else None}
    if scale_fmt:
        config["quantization_config"]["scale_fmt"] = scale_fmt
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for other in Path(source).iterdir():
        if other.suffix != ".safetensors" and other.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(other, out / other.name)
    return out
