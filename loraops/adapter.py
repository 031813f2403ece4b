"""The canonical adapter model: every on-disk layout is read into these two classes.

A LoraModule holds the factors exactly as stored (never pre-scaled) plus the scale that multiplies B·A, so
readers, writers, the merge engine and the algebra all agree on one convention:

    delta(W) = scale · B · A          (reshaped / transposed into W's layout, see ``weight_shape``)

Factor layouts by kind (r = rank):
    linear     A: r×in              B: out×r              W: out×in  (in×out when fan_in_fan_out, GPT-2 Conv1D)
    conv       A: r×in×kh×kw        B: out×r×1×1          W: out×in×kh×kw   (Conv1d/Conv3d: one/three kernel dims)
    embedding  A: r×num_embeddings  B: dim×r              W: num_embeddings×dim   (delta = (B·A)ᵀ)

A DoRA module (PEFT ``use_dora``) also holds a magnitude m, one value per output channel: its merge is not W + s·B·A
but m ⊙ (W + s·B·A) / ‖W + s·B·A‖, each output channel rescaled to its learned norm (see ``magnitude``).

A module bound to one part of a fused base tensor (q, k or v of OpenCLIP's in_proj_weight or FLUX's qkv) changes only
its block of rows: see ``LoraModule.fused``. A LoRA on a raw parameter (one expert's share of a fused MoE experts
parameter is a plain module on that expert's own tensor) is marked: see ``LoraModule.raw_parameter``.

A LoHa or LoKr module (LyCORIS, PEFT LoHaConfig/LoKrConfig) has no B·A: its ΔW is a Hadamard or Kronecker product of
factors, held in ``LoraModule.product`` (see loraops.formats.lycoris); its A and B are meta tensors that only give the
layout (rank×in×k…, out×rank×1…), so names, shapes and binding treat it as any module, and ``delta`` is exact.

A PEFT AdaLoRA or VeRA module is exactly low rank: it is read as the plain LoRA module it equals, its diagonal factors
folded into B (see loraops.formats.lowrank), and ``method`` says where it came from.
"""
from __future__ import annotations

import functools
import os
import reprlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .errors import InvalidInputError
from .lazy import LazyModule
from .references import checked_weight, is_pair, is_weight
from .st import dtype_name

if TYPE_CHECKING:
    import torch

    from .formats.lycoris import Product
else:
    torch = LazyModule("torch")  # what annotations name resolves when they are read: lazy.py

ModuleKind = Literal["linear", "conv", "embedding"]

DORA_NOTE = "DoRA: a magnitude per output channel (merged as magnitude · (W + s·B·A)/‖W + s·B·A‖)"
"""What `inspect`, `show` and a pushed model card say of a DoRA adapter."""

LORA_BIAS_NOTE = "lora_bias: lora_B has a bias (merged as bias + scale·lora_B.bias)"
"""What `inspect` says of an adapter with PEFT lora_bias."""

PRODUCT_NAMES = {"loha": "LoHa", "lokr": "LoKr"}
PRODUCT_NOTES = {"loha": "LoHa: ΔW = scale·(w1a·w1b)⊙(w2a·w2b)", "lokr": "LoKr: ΔW = scale·kron(w1, w2)"}
"""What `inspect`, `show` and a pushed model card say of an adapter with LoHa/LoKr modules, by Adapter.products."""

METHOD_NAMES = {"adalora": "AdaLoRA", "vera": "VeRA"}
METHOD_NOTES = {
    "adalora": "AdaLoRA: ΔW = scale·B·diag(E)·A, read as the LoRA B' = B·diag(E), A",
    "vera": "VeRA: ΔW = diag(λ_b)·vera_B[:out]·diag(λ_d)·vera_A[:, :in], read as the LoRA "
            "B' = diag(λ_b)·vera_B[:out]·diag(λ_d), A = vera_A[:, :in]",
}
"""What `inspect`, `show` and a pushed model card say of an adapter read from PEFT AdaLoRA/VeRA, by Adapter.methods."""


def token_rows_phrase(tensor: str, indices) -> str:
    """How inspect and the pushed model card name a tensor's PEFT trainable tokens: its first rows, then a count."""
    shown = ", ".join(map(str, indices[:8])) + (f", … ({len(indices)} rows)" if len(indices) > 8 else "")
    return f"{tensor} rows {shown} (replaced)"


def widest_dtype(*dtypes: "torch.dtype") -> "torch.dtype":
    """The dtype that holds the values of all of ``dtypes``: torch's promotion (bfloat16 and float16 → float32), and
    for float8 types, which torch promotes with nothing, the wider type (two float8 kinds: float16 holds both)."""

    def wider(a: "torch.dtype", b: "torch.dtype") -> "torch.dtype":
        if a == b:  # (before torch is imported: st.header_only's dtypes are equal or need torch)
            return a
        import torch

        try:
            return torch.promote_types(a, b)
        except RuntimeError:  # "Promotion for Float8 Types is not supported"
            return max(a, b, key=lambda dtype: dtype.itemsize) if a.itemsize != b.itemsize else torch.float16

    return functools.reduce(wider, dtypes)


@dataclass
class LoraModule:
    name: str
    """Module path in the base model ("model.layers.0.self_attn.q_proj"; diffusers: "unet.down_blocks...").
    For a kohya file before it is bound to a base, the kohya name ("lora_unet_down_blocks_0_...")."""
    A: "torch.Tensor"
    B: "torch.Tensor"
    alpha: float
    scale: float
    kind: ModuleKind = "linear"
    fan_in_fan_out: bool = False
    source_keys: tuple[str, ...] = ()
    fused: tuple[str, int, int, int] | None = None
    """(base tensor, first row, rows, the tensor's rows) when the module is one part of a fused base tensor — q, k or v
    of OpenCLIP's ``attn.in_proj_weight``, of FLUX's or SD3's ``qkv``, FLUX's ``linear1`` (set by loraops.check when
    binding, see loraops.ldm): its delta covers that many rows of the tensor from the first row. The tensor is seen as a
    matrix of that many rows: a base tensor that holds all experts of a fused MoE parameter (E×X×Y) has E·X rows of Y,
    and an expert's share covers its rows (see loraops.formats.params)."""
    fused_columns: tuple[int, int] | None = None
    """(first column, columns) when the module's part of a fused tensor is also a block of its columns: an expert's
    gate or up share of a ``gate_up_proj`` that the base stores in×out (gpt-oss, Aria), whose rows are the inputs."""
    raw_parameter: tuple[str, int, int] | None = None
    """(parameter, index, count) when the module comes from a LoRA on a raw parameter (PEFT ``target_parameters``, see
    loraops.formats.params): one expert's share of a fused MoE experts parameter (transformers 5's
    ``experts.gate_up_proj``/``down_proj``: index = the expert, count = the experts), or a 2-D ``weight`` whole (0, 1).
    Its delta is in the parameter's stored layout (never transposed for a Conv1D, as PEFT adds it; an expert's share
    bound to a base that stores the fused parameter in×out is, see ``fused_columns``). None for a LoRA on a module."""
    magnitude: "torch.Tensor | None" = None
    """DoRA: the learned norm of every output channel, flattened to (out,) (PEFT's ``lora_magnitude_vector``; Conv
    layers store it 1×out×1×1). The merged weight is f ⊙ (W + s·B·A) with f = magnitude / ‖W + s·B·A‖, the norm taken
    per output channel over all its inputs (a row of W, a column of a transposed one): see loraops.engine. None for a
    plain LoRA."""
    product: "Product | None" = None
    """LoHa/LoKr: the factors whose product is ΔW/scale (formats.lycoris.Product); None for a LoRA (ΔW = scale·B·A)."""
    method: str | None = None
    """"adalora"/"vera": the PEFT method this plain LoRA module was read from (formats.lowrank); None otherwise, and for
    any module the algebra makes."""
    stored_dtype: "torch.dtype | None" = None
    """The dtype its file stores its factors in, where one was composed on read and kept in float32 (float64 when a
    factor is stored so) whatever the file's: AdaLoRA's and VeRA's B' (formats.lowrank), a Tucker down factor
    (formats.kohya.tucker_down). None: A's and B's own (see ``dtype``)."""
    inputs_known: bool = True
    """False for a VeRA or AdaLoRA module not bound to a base, whose layer's inputs only the base says (see
    formats.lowrank): a VeRA layer takes the first in_features columns of the shared vera_A, so its A is still all of
    vera_A (cut when bound); an AdaLoRA Conv2d's A is stored r × in·kh·kw, read as a Linear's (made the conv when
    bound: check.fit_kind)."""
    orientation_known: bool = True
    """False for a PEFT module named as a Conv1D layer whose fan_in_fan_out neither its config nor its adapter settles
    (formats.peft.settled_orientation): whether W holds B·A or (B·A)ᵀ is its base layer's class, said when bound
    (check.fit_orientation). Until then it cannot be written in a layout that fixes orientation (kohya, diffusers)."""

    lora_bias: "torch.Tensor | None" = None
    """PEFT ``lora_bias``: the bias of lora_B, (out,), as stored (never pre-scaled). Its merge adds scale · lora_bias
    to the base layer's bias (PEFT's merge; a base layer without one is refused, as PEFT's merge refuses it): see
    ``bias_term``. None for a LoRA without it."""

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    @property
    def bias_name(self) -> str:
        return f"{self.name}.bias"

    def bias_term(self) -> "LoraModule":
        """The change to the base layer's bias as a module of its own: scale · lora_bias·[1], a rank-1 "LoRA" on the
        bias seen as an out×1 tensor (LoraModule.fused: all its rows), so the merge engine adds it as any delta."""
        import torch

        out = self.out_features
        return LoraModule(name=self.bias_name, A=torch.ones(1, 1, dtype=self.lora_bias.dtype),
                          B=self.lora_bias.reshape(out, 1), alpha=self.alpha, scale=self.scale,
                          fused=(self.bias_name, 0, out, out))

    @property
    def experts(self) -> int:
        """How many experts the fused parameter this module is one share of holds (1: it is no expert's share)."""
        return self.raw_parameter[2] if self.raw_parameter is not None else 1

    @property
    def rank(self) -> int | None:
        """r; None only for a LoKr whose two factors are stored whole (no inner dimension)."""
        return self.product.rank if self.product is not None else int(self.A.shape[0])

    @property
    def dtype(self) -> "torch.dtype":
        """The dtype its factors are stored in: ``stored_dtype``, else the wider of A's and B's (a file may keep B in
        float32 beside a bf16 A: both are what it holds). What inspect reports and combine and resize write."""
        return self.stored_dtype or widest_dtype(self.A.dtype, self.B.dtype)

    @property
    def shown_kind(self) -> str:
        """What records and tables call the module: loha/lokr for those, else its layer kind (an AdaLoRA/VeRA module's
        too: the plain LoRA it is read as; Adapter.methods names the method)."""
        return self.product.kind if self.product is not None else self.kind

    @property
    def num_parameters(self) -> int:
        """Its stored values (a LoHa/LoKr's as composed, a Tucker core folded in)."""
        if self.product is not None:
            return self.product.numel()
        return (self.A.numel() + self.B.numel() + (self.magnitude.numel() if self.dora else 0)
                + (self.lora_bias.numel() if self.lora_bias is not None else 0))

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def weight_name(self) -> str:
        return self.fused[0] if self.fused else f"{self.name}.weight"

    @property
    def first_row(self) -> int:
        """The first row of the base tensor that this module's delta covers (0 unless fused)."""
        return self.fused[1] if self.fused else 0

    @property
    def kernel(self) -> tuple[int, ...] | None:
        """A convolution's kernel size ((3, 3), (1, 1), …); None for any other layer."""
        return tuple(int(k) for k in self.A.shape[2:]) if self.kind == "conv" else None

    @property
    def shown_kernel(self) -> tuple[int, ...] | None:
        """What records say of the kernel: a convolution's, None for loha/lokr (their shown_kind is no conv)."""
        return self.kernel if self.product is None else None

    @property
    def spatial(self) -> bool:
        """A convolution whose kernel is larger than 1 (3×3, …): what --conv-rank sets (kohya's LoCon conv modules).
        A 1×1 convolution is a Linear over the channels, ranked like one (sd-scripts' networks/lora.py gives it the
        network's dim, not conv_dim)."""
        return self.kernel is not None and any(k > 1 for k in self.kernel)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base tensor this module changes (of its rows in that tensor, when fused)."""
        if self.kind == "conv":
            return (self.out_features, *self.A.shape[1:])
        if self.kind == "embedding" or self.fan_in_fan_out:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    def __repr__(self) -> str:
        # (the dataclass's repr printed every factor's values: pages of numbers for one module in a REPL or a log)
        return (f"LoraModule({self.name!r}, {self.shown_kind}, rank {self.rank}, "
                f"{'×'.join(map(str, self.weight_shape))}, scale {self.scale:g}, {dtype_name(self.dtype)})")

    @property
    def transposed(self) -> bool:
        """True when W holds (B·A)ᵀ rather than B·A."""
        return self.kind == "embedding" or self.fan_in_fan_out

    def matrices(self) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(B2, A2) as 2-D matrices, out×r and r×(in·kh·kw), with delta_2d = scale · B2 @ A2 (untransposed)."""
        return self.B.reshape(self.B.shape[0], -1), self.A.reshape(self.A.shape[0], -1)

    def delta(
        self,
        rows: slice | None = None,
        dtype: "torch.dtype | None" = None,
        device: "torch.device | str | None" = None,
    ) -> "torch.Tensor":
        """scale·B·A in the base weight's layout (rows = a slice of W's first dimension), computed in ``dtype``
        (default float32) on ``device``. Rows let a caller bound the working set of a huge module."""
        import torch

        if dtype is not None or device is not None:  # checked as every dtype= and device= is (not a raw TypeError)
            from .formats import out_dtype
            from .settings import resolve_device

            dtype, device = out_dtype(dtype), None if device is None else resolve_device(device)
        dtype = dtype or torch.float32
        if self.product is not None:  # (never transposed: LoHa/LoKr exist for Linear and Conv layers only)
            out = self.product.to(device, dtype).rows(rows).mul_(self.scale)
            return out.reshape(out.shape[0], *self.weight_shape[1:])
        B2, A2 = self.matrices()
        B2 = B2.to(device=device, dtype=dtype)
        A2 = A2.to(device=device, dtype=dtype)
        if self.transposed:
            # W = (B·A)ᵀ, so W's rows are A's columns.
            cols = A2 if rows is None else A2[:, rows]
            out = (B2 @ cols).T
        else:
            out = (B2 if rows is None else B2[rows]) @ A2
        out = out.mul_(self.scale) if out.is_contiguous() else out * self.scale
        shape = self.weight_shape
        return out.reshape(out.shape[0], *shape[1:])

    def with_factors(self, B2: "torch.Tensor", A2: "torch.Tensor", alpha: float, scale: float) -> "LoraModule":
        """A module of the same kind/name with new 2-D factors (reshaped into this kind's layout)."""
        r = A2.shape[0]
        if self.kind == "conv":
            A = A2.reshape(r, *self.A.shape[1:])
            B = B2.reshape(B2.shape[0], r, *[1] * (self.A.dim() - 2))
        else:
            A, B = A2, B2
        return replace(self, A=A.contiguous(), B=B.contiguous(), alpha=float(alpha), scale=float(scale), source_keys=(),
                       method=None, stored_dtype=None)

    def stand_in(self) -> "LoraModule":
        """This module without its values (factors on the meta device, same shapes and dtypes): what a writer or a
        report keeps of every module while the modules themselves come and go one at a time."""
        magnitude = None if self.magnitude is None else self.magnitude.to("meta")
        product = None if self.product is None else self.product.stand_in()
        bias = None if self.lora_bias is None else self.lora_bias.to("meta")
        return replace(self, A=self.A.to("meta"), B=self.B.to("meta"), magnitude=magnitude, product=product,
                       lora_bias=bias)


@dataclass
class TokenRows:
    """PEFT trainable tokens (``trainable_token_indices``, TrainableTokensConfig): some rows of a base tensor (an
    embedding, or an untied head: one row per token) replaced by stored values. Merged, the rows at ``indices`` ARE
    ``values`` (PEFT's index_copy), whatever the base held there: a replacement, not a difference."""

    name: str
    """The base tensor (``model.embed_tokens.weight``)."""
    indices: tuple[int, ...]
    values: "torch.Tensor"
    """len(indices) × the tensor's width, row i replacing row indices[i]."""
    key: str = ""
    """The key the values were stored under (messages)."""


class LazyTensors(Mapping):
    """Full tensors read each time one is asked for (name → a function that reads it), for an adapter computed as it
    is written (an extract's --save-module: a 70B model's embed_tokens and lm_head are 4 GB): the writer reads them
    one at a time, and none is held while the modules are computed. Names and len without reading."""

    def __init__(self, readers: "dict[str, Callable[[], torch.Tensor]]") -> None:
        self._readers = readers

    def __getitem__(self, name: str) -> "torch.Tensor":
        return self._readers[name]()

    def __contains__(self, name: object) -> bool:  # (Mapping's would read the tensor)
        return name in self._readers

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def renamed(self, names: dict[str, str]) -> "LazyTensors":
        return LazyTensors({names.get(n, n): read for n, read in self._readers.items()})


@dataclass
class Adapter:
    modules: dict[str, LoraModule]
    format: str
    """"peft", "kohya" or "diffusers" (PEFT-style keys with a component prefix)."""
    metadata: dict[str, str] = field(default_factory=dict)
    """safetensors header metadata (kohya's ss_* keys live here)."""
    config: dict = field(default_factory=dict)
    """PEFT adapter_config.json as read ({} when there is none)."""
    full_tensors: "Mapping[str, torch.Tensor]" = field(default_factory=dict)
    """modules_to_save: base tensor name → full replacement tensor (a dict, or LazyTensors read as written)."""
    base_model: str | None = None
    """base_model_name_or_path from the PEFT config, when present."""
    base_revision: str | None = None
    """The revision of ``base_model`` that AutoPeftModel loads the base at: the PEFT config's ``revision`` (PEFT's
    field is the base model's, not the adapter's), or the commit of a base pulled from the Hub where loraops named
    it (derive.naming_base); what the PEFT writer writes as ``revision``."""
    path: Path | None = None
    scale_mode: Literal["classic", "rslora"] = "classic"
    names_resolved: bool = True
    """False for kohya names until bound to a base (see loraops.check)."""
    token_rows: dict[str, TokenRows] = field(default_factory=dict)
    """PEFT trainable tokens: base tensor name → the rows it replaces (see TokenRows)."""
    ref: str | None = None
    """The registry reference (name@version) of an adapter loaded from the registry."""
    targeted: frozenset[str] | None = None
    """A PEFT folder's LoRA modules as read (names as in its file), all of which its config's targeting
    (target_modules, layers_to_transform, …) selects (formats.peft.refuse_untargeted): the PEFT writer keeps that
    targeting when it writes exactly these modules (see formats.peft.lora_config)."""
    originals: "Mapping[str, torch.Tensor]" = field(default_factory=dict)
    """PEFT's save_embedding_layers: a saved module's ``original_module`` tensors (the base's, as PEFT saw it), under
    the module's own tensor name (lm_head.weight), which PEFT's load puts into the model's own parameter: on a tied
    base, the embeddings (see check.edited_originals). Merged nowhere."""
    own_names: dict[str, str] = field(default_factory=dict)
    """Module (and full tensor) name after binding to a base → the name this adapter gave it, where binding renamed
    it: PEFT names modules as the model holds them in memory, which transformers 5 saves under other names for some
    models (LLaVA, GPT-NeoX's head, ViT, …; see loraops.check). What loraops writes goes back to the adapter's own
    names (``with_own_names``), so a derived adapter loads where its inputs load."""

    def with_own_names(self) -> "Adapter":
        """This adapter under the names it had before it was bound to a base."""
        if not self.own_names:
            return self
        names = self.own_names
        modules = {names.get(n, n): replace(m, name=names.get(n, n)) for n, m in self.modules.items()}
        full = (self.full_tensors.renamed(names) if isinstance(self.full_tensors, LazyTensors)
                else {names.get(n, n): t for n, t in self.full_tensors.items()})
        rows = {names.get(n, n): replace(r, name=names.get(n, n)) for n, r in self.token_rows.items()}
        return replace(self, modules=modules, full_tensors=full, token_rows=rows, own_names={})

    @property
    def label(self) -> str:
        """How messages name it: its registry reference, else the path it was read from."""
        return self.ref or (str(self.path) if self.path is not None else "<in memory>")

    @property
    def dtype(self) -> "torch.dtype":
        """The dtype its modules' factors are stored in (the type that holds each module's: LoraModule.dtype), else
        its full tensors' (an adapter of modules_to_save or trainable tokens alone)."""
        if self.modules:
            return widest_dtype(*(m.dtype for m in self.modules.values()))
        import torch

        others = [*self.full_tensors.values(), *(r.values for r in self.token_rows.values())]
        return others[0].dtype if others else torch.float32

    @property
    def products(self) -> list[str]:
        """The kinds of non-LoRA products among its modules (["loha"], ["lokr"], both, or [])."""
        return sorted({m.product.kind for m in self.modules.values() if m.product is not None})

    @property
    def methods(self) -> list[str]:
        """The PEFT methods its modules were read from as plain LoRA (["adalora"], ["vera"] or [])."""
        return sorted({m.method for m in self.modules.values() if m.method is not None})

    @property
    def lora_bias(self) -> bool:
        """PEFT lora_bias: its modules carry a bias on lora_B (all of them: PEFT's lora_bias is one switch)."""
        return any(m.lora_bias is not None for m in self.modules.values())

    def __repr__(self) -> str:
        # (the dataclass's repr printed every module's factors: `read_adapter(…)` in a REPL filled the screen)
        ranks = sorted({r for r in self.ranks.values() if r is not None})
        rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}–{ranks[-1]}" if ranks else "no rank"
        extra = f", {len(self.full_tensors)} whole tensors" if self.full_tensors else ""
        return (f"Adapter({self.label!r}, {self.format}, {len(self.modules)} modules, {rank}{extra}, "
                f"{dtype_name(self.dtype)})")

    @property
    def ranks(self) -> dict[str, int | None]:
        return {name: m.rank for name, m in self.modules.items()}

    @property
    def rank(self) -> int | None:
        """The rank when every module shares one, else None."""
        values = set(self.ranks.values())
        return values.pop() if len(values) == 1 else None

    @property
    def alpha(self) -> float | None:
        """The alpha when every module shares one, else None."""
        values = {m.alpha for m in self.modules.values()}
        return values.pop() if len(values) == 1 else None

    @property
    def target_modules(self) -> list[str]:
        """Sorted last path components of the targeted modules (q_proj, c_attn, ...)."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules} if self.names_resolved else set(self.modules))

    @property
    def dora(self) -> bool:
        """A DoRA adapter: its modules carry magnitudes (all of them, except in a diffusers file, whose components
        each have their own use_dora)."""
        return any(m.dora for m in self.modules.values())

    @property
    def num_parameters(self) -> int:
        # an expert's gate and up modules share one A (one block of a fused parameter's lora_A): counted once
        shared = {m.raw_parameter[:2]: m.A.numel() for m in self.modules.values() if m.raw_parameter is not None}
        return (sum(m.num_parameters - (m.A.numel() if m.raw_parameter else 0) for m in self.modules.values())
                + sum(shared.values())
                + sum(t.numel() for t in self.full_tensors.values())
                + sum(r.values.numel() for r in self.token_rows.values()))


BY_REFERENCE = {"merge": "merging.merge", "subtract": "merging.subtract", "combine": "derive.combine",
                "resize": "derive.resize", "write_adapter": "derive.export"}
"""The call that does what an in-memory API call does, given paths and registry references."""


def adapter_argument(adapter: object, what: str) -> "Adapter":
    """An Adapter as the in-memory API takes it (algebra.resize, weighted's pairs, write_adapter, check, bind,
    block_weighted): a path, a registry reference or None raised a raw AttributeError far inside."""
    if not isinstance(adapter, Adapter):
        shown = repr(os.fspath(adapter)[:80]) if isinstance(adapter, (str, os.PathLike)) else reprlib.repr(adapter)
        instead = f", or give paths and registry references to loraops.{BY_REFERENCE[what]}" \
            if what in BY_REFERENCE else ""
        raise InvalidInputError(f"{what} takes Adapter objects, not {shown}: read a file with "
                                f"loraops.formats.read_adapter{instead}")
    return adapter


def weighted(inputs: "Iterable[tuple[Adapter, float]]", what: str) -> "list[tuple[Adapter, float]]":
    """The (Adapter, weight) pairs of engine.merge/subtract and algebra.combine, checked (an Adapter alone raised a
    raw TypeError, and None one that said only 'NoneType' object is not iterable)."""
    if not isinstance(inputs, Iterable):
        raise InvalidInputError(f"{what} takes a list of (Adapter, weight) pairs, not {reprlib.repr(inputs)}")
    pairs = []
    for item in inputs:
        adapter, weight = item if is_pair(item) else (item, None)
        if not is_weight(weight):
            shown = f"the Adapter {item.label} without its weight" if isinstance(item, Adapter) \
                else f"(the Adapter {adapter.label}, {reprlib.repr(weight)})" if isinstance(adapter, Adapter) \
                else repr(str(item)[:80])
            raise InvalidInputError(f"{what} takes (Adapter, weight) pairs, not {shown}")
        adapter = adapter_argument(adapter, what)
        pairs.append((adapter, checked_weight((adapter.label, weight), weight, nonzero=weight != 0)))
    return pairs
