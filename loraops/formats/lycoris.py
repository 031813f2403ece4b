"""LoHa and LoKr (LyCORIS' Hadamard and Kronecker products; PEFT's LoHaConfig/LoKrConfig): a LoraModule whose ΔW is
not one low-rank product B·A carries a ``Product`` instead (``LoraModule.product``; its A and B are then meta tensors
that only give the layer's layout, see ``product_module``).

ΔW, flattened to out × in·k… (Linear: out × in), then reshaped into W's layout:

    LoHa   scale · (w1a·w1b) ⊙ (w2a·w2b)          w1a, w2a out×r      w1b, w2b r×in·k…
    LoKr   scale · kron(w1, w2)                    w1 = lokr_w1, or lokr_w1_a·lokr_w1_b (a×b)
                                                   w2 = lokr_w2, or lokr_w2_a·lokr_w2_b (c×d·k…)      out = a·c, in = b·d

A conv's kron is torch.kron(w1 a×b×1×1, w2 c×d×k×k) as LyCORIS, PEFT and ComfyUI compute it, whose flattened column
j1·(d·k…) + (j2·k… + s) is the flattened 2-D kron's: the same numbers. The Tucker forms of a k×k conv (LyCORIS
``use_tucker``, PEFT ``use_effective_conv2d``: ``hada_t1``/``hada_t2``, ``lokr_t2`` r×r×k…, with w_a r×out and
w_b r×in) are ``einsum("ij…,jr,ip->pr…", t, w_b, w_a)`` = w_aᵀ · (t contracted with w_b): a factored pair like the
plain form, composed on read (kohya.tucker_down, as LoCon's lora_mid).

Scales (r = the factors' inner dimension): LoHa alpha/r. LoKr alpha/r with r from lokr_w2_b (else lokr_w1_b) in a
LyCORIS file, and 1 when both w1 and w2 are stored whole (LyCORIS ignores alpha then; ComfyUI and A1111 alike);
PEFT's LoKr is always alpha/r with r from its config (rank_pattern), whole factors or not. A missing or 0 alpha in a
LyCORIS file means alpha = r, as kohya's and LyCORIS' own rule.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..adapter import LoraModule
from ..errors import InvalidInputError
from . import common

if TYPE_CHECKING:
    import torch

PART_RE = r"hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2"
KEY_RE = re.compile(rf"^(?P<module>.+)\.(?P<part>{PART_RE})$")
PEFT_TYPES = {"LOHA": "loha", "LOKR": "lokr"}
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def described(adapter) -> str:
    """How refusals name an adapter with LoHa/LoKr modules."""
    names = {"loha": ("LoHa", "Hadamard"), "lokr": ("LoKr", "Kronecker")}
    kinds, products = (" and ".join(names[k][i] for k in adapter.products) for i in (0, 1))
    return f"a {kinds} adapter (its ΔW is a {products} product, no low-rank B·A)"


def is_product_key(key: str) -> bool:
    return KEY_RE.match(key) is not None


def refuse_unsupported(path: Path, keys) -> None:
    """common.refuse_unsupported without the LoHa/LoKr markers (their keys are read here)."""
    common.refuse_unsupported(path, keys, [m for m in common.REFUSED_MARKERS if m not in common.PRODUCT_MARKERS])


@dataclass
class Product:
    """The factors of a LoHa or LoKr module as 2-D matrices (Tucker forms composed), and ``rows`` of its unscaled ΔW."""

    kind: Literal["loha", "lokr"]
    factors: dict[str, "torch.Tensor"]
    """loha: w1a, w1b, w2a, w2b. lokr: w1 or (w1a, w1b); w2 or (w2a, w2b)."""
    rank: int | None
    """The inner dimension of the factored products; None for a LoKr whose w1 and w2 are both whole."""
    kernel_known: bool = False
    """Its layer's layout is known: the stored factors give a conv's kernel (Tucker, a whole 4-D lokr_w2), or it was
    bound to a base tensor (check.fit_kind). Otherwise its factors are out × in·k…, a Linear's or a flattened
    conv's: only the base can tell."""

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in·k…) of the flattened ΔW."""
        f = self.factors
        if self.kind == "loha":
            return int(f["w1a"].shape[0]), int(f["w1b"].shape[1])
        (a, b), (c, d) = self._dims("w1"), self._dims("w2")
        return a * c, b * d

    def _dims(self, which: str) -> tuple[int, int]:
        f = self.factors
        if which in f:
            return int(f[which].shape[0]), int(f[which].shape[1])
        return int(f[which + "a"].shape[0]), int(f[which + "b"].shape[1])

    def numel(self) -> int:
        return sum(t.numel() for t in self.factors.values())

    def to(self, device=None, dtype=None) -> "Product":
        return replace(self, factors={k: t.to(device=device, dtype=dtype) for k, t in self.factors.items()})

    def _whole(self, which: str) -> "torch.Tensor":
        f = self.factors
        return f[which] if which in f else f[which + "a"] @ f[which + "b"]

    def rows(self, rows: slice | None = None) -> "torch.Tensor":
        """Rows of the unscaled, flattened ΔW (all when None), in the factors' dtype, never more than those rows: a
        LoKr's Kronecker product is formed row by row from the rows of w1 and w2 they come from."""
        import torch

        start, stop, _ = (rows or slice(None)).indices(self.shape[0])
        rows = slice(start, stop)
        f = self.factors
        if self.kind == "loha":
            return (f["w1a"][rows] @ f["w1b"]).mul_(f["w2a"][rows] @ f["w2b"])
        w1 = self._whole("w1")  # the small factor: a×b
        c = self._dims("w2")[0]
        index = torch.arange(start, stop, device=w1.device)
        i1, i2 = index // c, index % c
        w2 = f["w2"][i2] if "w2" in f else f["w2a"][i2] @ f["w2b"]
        # K[i1·c + i2, j1·d + j2] = w1[i1, j1] · w2[i2, j2]
        return (w1[i1].unsqueeze(2) * w2.unsqueeze(1)).reshape(len(index), -1)

    def stand_in(self) -> "Product":
        return self.to("meta")


def product_module(path: Path, name: str, product: Product, *, alpha: float, scale: float, keys: tuple[str, ...],
                   kernel: tuple[int, ...] = ()) -> LoraModule:
    """A LoraModule for a product: A and B are meta tensors (rank×in×k…, out×rank×1…) that give its layout, so names,
    shapes and binding work as for any module; ``kernel`` () when the stored factors do not say it (a flattened
    conv: the base's shape does when the module is bound, check.fit_kind)."""
    import torch

    for which, tensor in product.factors.items():
        if not tensor.is_floating_point():
            raise InvalidInputError(f"{path}: module {name!r}: factors must be floating point, not {tensor.dtype}")
        common.check_finite(path, f"{name} ({which})", tensor)
    out, flat = product.shape
    inner = flat
    for k in kernel:
        if inner % k:
            raise InvalidInputError(f"{path}: module {name!r}: {flat} inputs are no whole number of {kernel} kernels")
        inner //= k
    dtype = next(iter(product.factors.values())).dtype
    r = product.rank or 1
    product = replace(product, kernel_known=bool(kernel))
    A = torch.empty(r, inner, *kernel, dtype=dtype, device="meta")
    B = torch.empty(out, r, *[1] * len(kernel), dtype=dtype, device="meta")
    return LoraModule(name=name, A=A, B=B, alpha=float(alpha), scale=float(scale), kind="conv" if kernel else "linear",
                      source_keys=keys, product=product)


def group(path: Path, keys, module_name=lambda module: module) -> tuple[dict[str, dict[str, str]], list[str]]:
    """(module name → {part → key} for the LoHa/LoKr keys, the other keys); ``module_name`` maps a key's module part
    to the module's name (PEFT: without base_model.model.)."""
    found: dict[str, dict[str, str]] = {}
    others = []
    for key in keys:
        match = KEY_RE.match(key)
        if match is None:
            others.append(key)
        else:
            found.setdefault(module_name(match["module"]), {})[match["part"]] = key
    return found, others


def build(path: Path, name: str, parts: dict[str, str], tensors: dict[str, "torch.Tensor"], *, alpha: float | None,
          peft_rank: int | None = None) -> LoraModule:
    """The module of LyCORIS/PEFT parts (``parts``: part name → key). ``alpha`` None or 0 in a LyCORIS file: alpha =
    r. ``peft_rank``: PEFT's configured r for the module (PEFT's scale is alpha/r as configured: a LoKr's r is in no
    tensor when w1 and w2 are whole)."""
    from . import kohya

    def bad(why: str) -> InvalidInputError:
        shown = ", ".join(f"{key} {common.fmt_shape(tensors[key].shape)}" for key in parts.values())
        return InvalidInputError(f"{path}: module {name!r}: {why} ({shown})")

    loha = any(p.startswith("hada_") for p in parts)
    if loha and any(p.startswith("lokr_") for p in parts):
        raise bad("mixes LoHa (hada_) and LoKr (lokr_) factors")
    t = {p: tensors[k] for p, k in parts.items()}
    if any(not v.numel() for v in t.values()):  # a rank 0 divided its alpha by 0; an empty w1 made ΔW silently 0
        raise bad("empty factor")
    kernel: tuple[int, ...] = ()

    def pair(a: str, b: str, core: str | None) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(out×r, r×in·k…) of a factored product, its Tucker core composed (kohya.tucker_down)."""
        nonlocal kernel
        if a not in t or b not in t:
            raise bad(f"{a} and {b} go together")
        wa, wb = t[a], t[b]
        if core is None or core not in t:
            if wa.dim() != 2 or wb.dim() != 2 or wa.shape[1] != wb.shape[0]:
                raise bad(f"{a} must be out×r and {b} r×in")
            return wa, wb
        mid = t[core]
        if wa.dim() != 2 or wb.dim() != 2 or mid.dim() < 3 or mid.shape[:2] != (wa.shape[0], wb.shape[0]):
            raise bad(f"a Tucker {core} needs {a} r×out, {b} r×in and {core} r×r×k…")
        kernel = tuple(mid.shape[2:])
        composed = kohya.tucker_down(path, name, wb.reshape(*wb.shape, *[1] * len(kernel)), mid,
                                     {"down": parts[b], "mid": parts[core]})
        return wa.T, composed.flatten(1)

    if loha:
        missing = [p for p in LOHA_PARTS if p not in t]
        if missing:
            raise bad(f"no {missing[0]}")
        if ("hada_t1" in t) != ("hada_t2" in t):
            raise bad("hada_t1 and hada_t2 go together")
        w1a, w1b = pair("hada_w1_a", "hada_w1_b", "hada_t1")
        w2a, w2b = pair("hada_w2_a", "hada_w2_b", "hada_t2")
        if w1a.shape != w2a.shape or w1b.shape != w2b.shape:
            raise bad("the two Hadamard factors differ in shape")
        rank = int(w1b.shape[0])
        product = Product("loha", {"w1a": w1a, "w1b": w1b, "w2a": w2a, "w2b": w2b}, rank)
    else:
        factors = {}
        if "lokr_w1" in t:
            if t["lokr_w1"].dim() != 2 or "lokr_w1_a" in t or "lokr_w1_b" in t:
                raise bad("lokr_w1 must be one a×b matrix, without lokr_w1_a/_b")
            factors["w1"] = t["lokr_w1"]
        else:
            factors["w1a"], factors["w1b"] = pair("lokr_w1_a", "lokr_w1_b", None)
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
            if w2.dim() < 2 or "lokr_w2_a" in t or "lokr_w2_b" in t or "lokr_t2" in t:
                raise bad("lokr_w2 must be one c×d(×k…) tensor, without lokr_w2_a/_b/lokr_t2")
            if peft_rank is not None and w2.dim() == 3:
                # PEFT's make_kron widens w1 only for a 4-D w2: torch.kron(w1, c×d×k) pads w1 to 1×a×b in front,
                # which is another ΔW than the Kronecker product of w1 and w2 (LyCORIS pads w1 behind, as here)
                raise bad("a PEFT LoKr on a Conv1d with lokr_w2 stored whole: PEFT forms its Kronecker product "
                          "in its own layout there (torch.kron of a×b with c×d×k), which loraops does not reproduce")
            kernel = tuple(w2.shape[2:])
            factors["w2"] = w2.flatten(1)
        else:
            factors["w2a"], factors["w2b"] = pair("lokr_w2_a", "lokr_w2_b", "lokr_t2")
        ranks = [int(factors[k].shape[0]) for k in ("w2b", "w1b") if k in factors]
        rank = ranks[0] if ranks else None
        product = Product("lokr", factors, rank)
    if peft_rank is not None:
        scale_rank = rank if loha else peft_rank
    else:
        scale_rank = rank
        alpha = alpha or float(rank or 1)
    # LyCORIS: a LoKr stored whole (w1 and w2) has scale 1, whatever its alpha
    scale = 1.0 if scale_rank is None else alpha / scale_rank
    return product_module(path, name, product, alpha=alpha, scale=scale, keys=tuple(parts.values()), kernel=kernel)
