"""Fine-grained FP8 weights: transformers' ``quant_method: "fp8"`` (FineGrainedFP8Config), the layout DeepSeek-V3/R1,
Kimi-K2, Qwen3-*-FP8, GLM-4.5-FP8 and MiniMax ship in.

A quantized weight ``<w>`` (out×in for a Linear, E×out×in for fused MoE experts) is stored as two tensors:

    <w>            F8_E4M3, the weight's shape
    <w>_scale_inv  one inverse scale per block of bo×bi elements (config.json's weight_block_size, [128, 128] in
                   every published model), shape (…, ⌈out/bo⌉, ⌈in/bi⌉): the blocks at the bottom and right edges
                   are partial. float32; with scale_fmt "ue8m0" powers of two (F32, or one byte: F8_E8M0/U8)

so ``<m>.weight`` has ``<m>.weight_scale_inv`` and a fused ``<m>.gate_up_proj`` has ``<m>.gate_up_proj_scale_inv``.
weight_block_size null means one scale per matrix. A module the config leaves unquantized (modules_to_not_convert:
lm_head, embeddings, routers, norms) is stored in bf16 and is an ordinary float weight here.

    decode:  W = float32(fp8) · scale_inv of its block                 (transformers' Fp8Dequantize, DeepSeek's kernel)
    encode:  per block amax = max |W|;  scale = 448 / amax (1 when amax = 0);  scale_inv = 1 / scale
             (ue8m0: scale_inv = 2^⌈log2 scale_inv⌉, scale = 1 / scale_inv)
             fp8 = clamp(W · scale, ±448) rounded to nearest            (transformers' Fp8Quantize)

A streamed chunk of a weight holds whole block rows (``row_unit``), so each block is encoded from all of its values.
"""
from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from .errors import FormatError
from .st import TensorInfo, read_tensor, torch_dtype

if TYPE_CHECKING:
    import torch

FP8 = "F8_E4M3"
FP8_MAX = 448.0
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0", "U8")
DEFAULT_BLOCK = [128, 128]
"""FineGrainedFP8Config's weight_block_size when the config does not say."""
QUANTIZED_WEIGHTS = ("F8_E4M3", "F8_E5M2")
"""Dtypes of weights a quantization stores one byte each (the scales' F8_E8M0 is not one)."""
SUPPORTED = ("loraops merges only into float weights and fine-grained FP8 ones (F8_E4M3 with a per-block "
             "<weight>_scale_inv, quant_method 'fp8')")


@dataclass(frozen=True)
class BlockScaled:
    """How the base stores one fine-grained FP8 weight, and the block arithmetic on its rows."""

    weight: str
    """Full name in the base manifest."""
    shape: tuple[int, ...]
    scale: TensorInfo
    scale_name: str
    """Full name of the scale tensor in the base manifest."""
    block: tuple[int, int]
    """(rows, columns) of a block; a per-matrix scale's is the matrix's own shape."""
    ue8m0: bool
    companions: tuple[str, ...] = ()
    """The module's other quantization tensors (a static activation_scale), left out with the scale when the weight
    comes out dequantized."""

    @property
    def matrix_rows(self) -> int:
        return self.shape[-2]

    @property
    def grid(self) -> tuple[int, int]:
        """Blocks per matrix: (block rows, block columns)."""
        return math.ceil(self.shape[-2] / self.block[0]), math.ceil(self.shape[-1] / self.block[1])

    @property
    def row_unit(self) -> int:
        """Chunks of the weight (its matrices' rows one after another) are a multiple of this many rows, so each holds
        whole block rows: a block's height, or whole matrices when the experts' block rows do not line up."""
        X, bo = self.matrix_rows, self.block[0]
        return bo if X % bo == 0 or math.prod(self.shape[:-2]) == 1 else X

    def rows_of(self, scales: "torch.Tensor", row0: int, row1: int) -> "torch.Tensor":
        """The rows of a scale grid (as read_scales(), or the scale tensor as stored: all matrices' block rows one
        after another) that weight rows [row0, row1) use: a view."""
        X, bo, per_matrix = self.matrix_rows, self.block[0], self.grid[0]
        first = row0 // X * per_matrix + row0 % X // bo
        end = row1 // X * per_matrix + math.ceil(row1 % X / bo)
        return scales.view(-1, self.grid[1])[first:end]

    def read_scales(self) -> "torch.Tensor":
        """The stored inverse scales, float32, one row per block row: (matrices · block rows) × block columns."""
        return self.scale_values(read_tensor(self.scale)).reshape(-1, self.grid[1])

    def scale_values(self, stored: "torch.Tensor") -> "torch.Tensor":
        import torch

        if stored.dtype == torch.uint8:  # UE8M0 exponents stored as bytes (2^(b − 127)), as some MXFP8 exports do
            stored = stored.view(torch.float8_e8m0fnu)
        return stored.to(torch.float32)

    def decode(self, acc: "torch.Tensor", q: "torch.Tensor", scales: "torch.Tensor", scratch: "torch.Tensor",
               non_blocking: bool = False) -> None:
        """Dequantize-before: acc (rows × in, on the compute device) ← the chunk's FP8 values q (on the CPU) times the
        inverse scales of their blocks (``scales``: the chunk's rows of read_scales()). ``scratch``: a work buffer of
        at least acc's elements, on acc's device."""
        import torch

        if acc.device.type == "cpu":  # through a table of the 256 values: torch converts FP8 one element at a time
            index = scratch.view(-1).view(torch.int32)[: acc.numel()]
            index.copy_(q.reshape(-1).view(torch.uint8))
            torch.index_select(_values(acc.dtype), 0, index, out=acc.view(-1))
        else:  # the FP8 bytes cross, the GPU converts
            acc.copy_(q.reshape(acc.shape).to(acc.device, non_blocking=non_blocking))
        self._per_block(acc, scales.to(acc.device, acc.dtype))

    def encode(self, acc: "torch.Tensor", scratch: "torch.Tensor") -> "torch.Tensor":
        """Quantize-after, for a chunk of whole block rows (acc, rows × in): acc becomes W · scale of its block,
        clamped to the FP8 range (the caller rounds it into the FP8 output); returns the chunk's rows of new inverse
        scales as the scale tensor stores them, on the CPU. ``scratch`` as for decode."""
        import torch

        amax = self._block_amax(torch.abs(acc, out=scratch.view(-1)[: acc.numel()].view(acc.shape)))
        amax = amax.to(torch.float32)  # transformers quantizes float32 values
        # capped: below amax ≈ 1.3e-36, 448 / amax overflows, and an infinite scale (inverse 0) makes the zeros NaN
        scale = torch.where(amax > 0, FP8_MAX / amax, 1.0).clamp(max=torch.finfo(torch.float32).max)
        inverse = 1 / scale
        if self.ue8m0:
            inverse = torch.exp2(torch.ceil(torch.log2(inverse.clamp(min=torch.finfo(torch.float32).tiny))))
        stored = self._stored(inverse)
        kept = self.scale_values(stored)
        # a lossy scale dtype (F16) can make it inf or 0 (NaN decoded), or round it down so far that its block's
        # largest values saturate by more than half an FP8 unit (1/28 at 448)
        unfit = ~(torch.isfinite(kept) & (kept >= inverse * (1 - 1 / 32))).view(-1)
        if bool(unfit.any()):
            at = int(unfit.nonzero()[0])
            raise FormatError(f"{self.scale.file}: the new scales of {self.weight!r}: a block's max |W + ΔW| is "
                              f"{float(amax.view(-1)[at]):g}, whose inverse scale {float(inverse.view(-1)[at]):g} "
                              f"{self.scale.dtype} cannot hold; merge with --dtype bf16 instead")
        # quantize with the reciprocal of what is stored where storing rounded it (ue8m0, a bf16 scale tensor), so
        # decoding multiplies by exactly what the values were divided by; else with transformers' 448 / amax
        scale = 1 / kept if self.ue8m0 else torch.where(kept == inverse, scale, 1 / kept)
        self._per_block(acc, scale.to(acc.dtype))
        acc.clamp_(-FP8_MAX, FP8_MAX)
        return stored.cpu()

    def _block_amax(self, magnitudes: "torch.Tensor") -> "torch.Tensor":
        """The max of each block (one row per block row) of a chunk's |W|: over each block's columns first (one pass
        over the chunk), then over its rows (on a matrix bi times smaller)."""
        import torch
        import torch.nn.functional as F

        pieces = self._pieces(magnitudes)
        bi = self.block[1]
        full = pieces.shape[-1] // bi
        by_columns = [pieces[..., : full * bi].unflatten(-1, (full, bi)).amax(-1)]
        if pieces.shape[-1] % bi:
            by_columns.append(pieces[..., full * bi:].amax(-1, keepdim=True))
        per_row = torch.cat(by_columns, -1) if len(by_columns) > 1 else by_columns[0]
        amax = F.max_pool2d(per_row.unsqueeze(1), (self.block[0], 1), (self.block[0], 1), ceil_mode=True)
        return amax.reshape(-1, self.grid[1])

    def _stored(self, inverse: "torch.Tensor") -> "torch.Tensor":
        import torch

        if self.scale.dtype == "U8":
            return inverse.to(torch.float8_e8m0fnu).view(torch.uint8)
        return inverse.to(torch_dtype(self.scale.dtype))

    def _pieces(self, acc: "torch.Tensor") -> "torch.Tensor":
        """The chunk as (pieces, rows, in), each piece starting at a block row: the chunk itself, or its matrices."""
        if self.row_unit == self.matrix_rows:
            return acc.view(-1, self.matrix_rows, acc.shape[-1])
        return acc.view(1, *acc.shape)

    def _per_block(self, acc: "torch.Tensor", factors: "torch.Tensor") -> None:
        """acc (rows × in) *= the factor of each element's block (``factors``: one row per block row), in place;
        the factors are spread over rows only and broadcast over columns (transformers' _dequantize_fp8_weight)."""
        pieces = self._pieces(acc)
        bo, bi = self.block
        rows, cols = pieces.shape[-2:]
        per_row = factors.reshape(pieces.shape[0], -1, factors.shape[-1]).repeat_interleave(bo, dim=1)[:, :rows]
        full = cols // bi
        pieces[..., : full * bi].unflatten(-1, (full, bi)).mul_(per_row[..., :full, None])
        if cols % bi:
            pieces[..., full * bi:].mul_(per_row[..., full:])


def _values(dtype: "torch.dtype") -> "torch.Tensor":
    """The 256 float8_e4m3fn values (NaN at 0x7f and 0xff) in ``dtype``, by their bytes."""
    import torch

    if dtype not in _VALUES:
        _VALUES[dtype] = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(dtype)
    return _VALUES[dtype]


_VALUES: dict = {}


def scale_name(weight: str) -> str:
    """``<m>.weight`` → ``<m>.weight_scale_inv``; a fused experts parameter ``<m>.gate_up_proj`` →
    ``<m>.gate_up_proj_scale_inv``."""
    return f"{weight}_scale_inv"


def loaded_as_fp8(module: str, quantization: dict | None) -> bool:
    """Does transformers load the Linear ``module`` (its path in the model) of a model with this quantization_config
    as FP8 (FP8Linear, which reads <module>.weight_scale_inv)? Without a modules_to_not_convert list it skips the
    output head and the tied modules (quantizers.base.get_keys_to_not_convert): a plain Linear then takes an FP8
    weight's bytes as values and drops its scale (the load path on a GPU; on a CPU it dequantizes every weight that
    has a scale). With a list, exactly the modules it matches are skipped (quantizers_utils.should_convert_module)."""
    skip = (quantization or {}).get("modules_to_not_convert")
    if not isinstance(skip, list):
        return False
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{key}){boundary}", module) or module.endswith(key) for key in map(str, skip))


def layout(manifest: Mapping[str, TensorInfo], name: str, quantization: dict | None) -> BlockScaled | None:
    """How the base stores the weight ``name``: None for a float weight, its BlockScaled for a fine-grained FP8 one
    (its scale checked against the block size), else one FormatError line naming what the base holds.
    ``quantization``: the model's config.json quantization_config, None when it has none."""
    info = manifest[name]
    if info.dtype in FLOAT_DTYPES:
        return None
    method = (quantization or {}).get("quant_method")
    scale = manifest.get(scale_name(name))
    if info.dtype != FP8 or method not in (None, "fp8") or len(info.shape) < 2:
        raise FormatError(f"{info.file}: {name!r} is {describe(manifest, name, quantization)}; {SUPPORTED}")
    if scale is None:
        if quantized_siblings(name, manifest):  # another layout's scales (transformers' FP8Embedding: weight_scale)
            raise FormatError(f"{info.file}: {name!r} is {describe(manifest, name, quantization)}; {SUPPORTED}")
        raise FormatError(f"{info.file}: {name!r} is stored as {FP8} but its scale {scale_name(name)!r} is missing")
    if scale.dtype not in SCALE_DTYPES or (scale.dtype == "U8" and (quantization or {}).get("scale_fmt") != "ue8m0"):
        raise FormatError(f"{scale.file}: {scale_name(name)!r} is stored as {scale.dtype}; fine-grained FP8 scales are "
                          "float32 (or UE8M0: F8_E8M0, or U8 with scale_fmt 'ue8m0')")
    block = _block(info, scale, quantization)
    found = BlockScaled(name, tuple(info.shape), scale, scale_name(name), block,
                        ue8m0=(quantization or {}).get("scale_fmt") == "ue8m0" or scale.dtype in ("F8_E8M0", "U8"),
                        companions=tuple(n for n in [_activation_scale(name)] if n in manifest))
    lead = tuple(info.shape[:-2])
    expected = (*lead, *found.grid)
    per_matrix = found.grid == (1, 1) and scale.numel == math.prod(lead)  # a per-tensor scale: (), (1,), (1, 1), (E,)…
    if tuple(scale.shape) != expected and not per_matrix:
        raise FormatError(f"{scale.file}: {scale_name(name)!r} has shape {list(scale.shape)}; {name!r} "
                          f"{list(info.shape)} in blocks of {block[0]}×{block[1]} needs {list(expected)}")
    return found


def layouts(manifest: Mapping[str, TensorInfo], quantization: Callable[[str], dict | None]) -> dict[str, BlockScaled]:
    """Every quantized weight of the base (name → its BlockScaled); a FormatError line for one loraops cannot read."""
    return {name: layout(manifest, name, quantization(name)) for name, info in manifest.items()
            if info.dtype in QUANTIZED_WEIGHTS}


def _block(info: TensorInfo, scale: TensorInfo, quantization: dict | None) -> tuple[int, int]:
    rows, cols = info.shape[-2:]
    if quantization is not None:
        block = quantization.get("weight_block_size", DEFAULT_BLOCK)
        if block is None:
            return rows, cols
        if not (isinstance(block, (list, tuple)) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise FormatError(f"{info.file}: config.json's quantization_config.weight_block_size is {block!r}, "
                              "not two positive integers")
        return block[0], block[1]
    # no config to say: the block that divides the weight into the scale's grid, as transformers' loader takes it
    grid = tuple(scale.shape[-2:]) if len(scale.shape) >= 2 else (1, 1)
    if 0 in grid or rows % grid[0] or cols % grid[1]:
        raise FormatError(f"{scale.file}: no quantization_config.weight_block_size beside it, and {list(scale.shape)} "
                          f"does not divide {info.name!r} {list(info.shape)} into whole blocks: the block size is "
                          "unknown")
    return rows // grid[0], cols // grid[1]


def _activation_scale(weight: str) -> str:
    """The name of the module's static activation scale (activation_scheme "static")."""
    if weight.endswith(".weight"):
        return f"{weight.removesuffix('weight')}activation_scale"
    return f"{weight}_activation_scale"


SCALES = ("weight_scale", "input_scale", "scale_weight", "scale_input")
"""A one-byte weight's scales beside it in the other FP8 layouts, as ``<m>.<scale>`` (compressed-tensors' and FBGEMM's
weight_scale and input_scale, ComfyUI's scaled_fp8 scale_weight and scale_input): loraops merges into none of them,
but counts them as what they are (model_parameters)."""


def model_parameters(tensors: Mapping[str, tuple[str, Sequence[int]]]) -> int:
    """The parameters of the model whose tensors are ``tensors`` (name → (safetensors dtype, shape)): the elements of
    every tensor but the scales of its FP8 weights (``<w>_scale_inv``, a static activation scale, SCALES), which only
    say how the weights decode; so an FP8 model counts what its bf16 copy (merge --dtype bf16) counts."""
    scales = {scale for weight, (dtype, _) in tensors.items() if dtype in QUANTIZED_WEIGHTS
              for scale in (scale_name(weight), _activation_scale(weight),
                            *(f"{weight.removesuffix('.weight')}.{s}" for s in SCALES))}
    return sum(math.prod(shape) for name, (_, shape) in tensors.items() if name not in scales)


def quantized_siblings(weight: str, manifest: Mapping[str, TensorInfo], names: list[str] | None = None) -> list[str]:
    """The tensors beside a module's weight that a quantization stores (weight_scale, SCB, qweight, scales, absmax,
    _blocks, …): its other tensors than the weight and the bias, as 'name DTYPE[shape]'. ``names``: the manifest's
    names sorted, when the caller asks for many modules."""
    names = sorted(manifest) if names is None else names
    module = weight.removesuffix(".weight")
    found, at = [], bisect.bisect_left(names, module)
    while at < len(names) and names[at].startswith(module):  # (the names with its prefix lie together)
        name, at = names[at], at + 1
        if name != weight and name[len(module):len(module) + 1] in (".", "_") and not name.endswith(".bias"):
            found.append(f"{name} {manifest[name].dtype}{list(manifest[name].shape)}")
    return found


def describe(manifest: Mapping[str, TensorInfo], weight: str, quantization: dict | None,
             names: list[str] | None = None) -> str:
    """What the base holds for a module's weight, for messages: 'stored as I8 with m.SCB F32[4096] (quant_method
    'bitsandbytes')'."""
    info = manifest.get(weight)
    siblings = quantized_siblings(weight, manifest, names)
    shown = ", ".join(siblings[:3]) + (", …" if len(siblings) > 3 else "")
    method = (quantization or {}).get("quant_method")
    stored = f"{info.dtype}" + (f" with {shown}" if siblings else "") if info is not None else shown
    return f"stored as {stored}" + (f" (config.json quant_method {method!r})" if method else "")
