"""What every layout shares: recognising what is not plain LoRA, building validated modules, PEFT's scale rules.

Readers collect, per module, the two factors and the alpha; ``build_module`` turns them into a checked LoraModule
(shapes coherent, ranks equal, values finite) so no reader repeats those checks.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import re
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from ..adapter import LoraModule, ModuleKind, widest_dtype
from ..errors import FormatError, InvalidInputError, UnsupportedAdapterError
from ..st import dtype_name

if TYPE_CHECKING:
    import torch

    from ..adapter import Adapter


ALPHA_WANTED = ("pass the LoRA alpha: --alpha A to `register`, `inspect` or `check` (merge, combine… take it from the "
                "registered adapter: give them the name@version `register` printed, not the file); alpha= in Python")
"""What to do about an adapter file that records no alpha. merge, subtract, combine, resize and export have no --alpha,
and their users were told to pass one; given the file again after `register --alpha`, they read the file (its
identity without the alpha is not the registered one), so the registered adapter has to be given by name."""


# LoHa and LoKr keys: read from kohya/LyCORIS files and PEFT folders (formats.lycoris), refused elsewhere.
PRODUCT_MARKERS: tuple[tuple[str, str], ...] = (
    (r"(^|\.)hada_[wt]\d", "a LoHa adapter (hada_w1_a/hada_w2_b, Hadamard product factors) outside a PEFT folder "
                           "with its adapter_config.json or a kohya/LyCORIS file"),
    (r"(^|\.)lokr_[wt]\d", "a LoKr adapter (lokr_w1/lokr_w2, Kronecker product factors) outside a PEFT folder "
                           "with its adapter_config.json or a kohya/LyCORIS file"),
)

# AdaLoRA and VeRA keys: read from PEFT folders (formats.lowrank), refused elsewhere (their scale and layout are in the
# config).
ADALORA_MARKER = (r"(^|\.)lora_E(\.|$)", "an AdaLoRA adapter (lora_E, SVD-parametrised) outside a PEFT folder with "
                                          "its adapter_config.json (its scale needs lora_alpha and init_r)")
VERA_MARKER = (r"(^|\.)vera_lambda_[bd](\.|$)", "a VeRA adapter (vera_lambda_b/_d, shared random projections) "
                                                "outside a PEFT folder with its adapter_config.json")

LORA_BIAS_MARKER = (r"(^|\.)(lora_B|lora_up)(\.[^.]+)?\.bias$", "a LoRA with a bias on its up factor (PEFT lora_bias)")
"""Read from a PEFT folder (formats.peft); refused in every other layout, which has no such bias."""
READ_ELSEWHERE = (*PRODUCT_MARKERS, ADALORA_MARKER, VERA_MARKER)

# Key segments of layouts whose math is not W + s·B·A (checked before anything else, so the message names them).
# Each regex is searched in the full key; segments are dot-bounded so lora_embedding_A never reads as AdaLoRA's lora_E.
REFUSED_MARKERS: tuple[tuple[str, str], ...] = (
    (r"(^|\.)dora_scale$", "a LyCORIS DoRA adapter (dora_scale): LyCORIS decomposes the weight its own way (which "
                          "dimension it normalises is a training option), and loraops reads DoRA only as PEFT's "
                          "lora_magnitude_vector"),
    *PRODUCT_MARKERS,
    (r"(^|\.)ia3_l(\.|$)", "an IA3 adapter (ia3_l, learned rescaling vectors)"),
    # (kohya's lora_unet_/lora_te_… names, or LyCORIS' own network's lycoris_…)
    (r"^(lora_[a-z0-9]+|lycoris)_[^.]*\.on_input$", "a LyCORIS (IA)³ adapter (on_input, learned rescaling vectors)"),
    (r"^(lora_[a-z0-9]+|lycoris)_[^.]*\.(a1|a2|b1|b2|bm)\.weight$",
     "a LyCORIS GLoRA adapter (a1/a2/b1/b2, generalised LoRA)"),
    (r"^(lora_[a-z0-9]+|lycoris)_[^.]*\.(lambda_layer|[pq]_layer\.weight)$",
     "a LyCORIS T-LoRA adapter (p_layer/q_layer/lambda_layer: its ΔW depends on the timestep and on its initial "
     "factors, which the file does not hold)"),
    (r"(^|\.)(oft_r|oft_blocks|oft_diag)(\.|$)", "an OFT adapter (orthogonal finetuning)"),
    (r"(^|\.)boft_[Rs](\.|$)", "a BOFT adapter (boft_R, butterfly orthogonal finetuning)"),
    ADALORA_MARKER,
    VERA_MARKER,
    LORA_BIAS_MARKER,
    (r"\.diff(_b)?$", "a full-weight difference file (.diff/.diff_b keys, LyCORIS 'full')"),
    (r"(^|\.)[wb]_norm$", "a LyCORIS norm-layer adapter (w_norm/b_norm)"),
)

# PEFT peft_type values that are known and are not LoRA.
_LORA_DEFAULTS = {"r": 8, "lora_alpha": 8, "use_rslora": False, "fan_in_fan_out": False, "use_dora": False}
PEFT_DEFAULTS = {
    "LORA": _LORA_DEFAULTS,
    "ADALORA": {**_LORA_DEFAULTS, "init_r": 12},  # (AdaLoraConfig subclasses LoraConfig; its r is unused)
    "LOHA": {"r": 8, "alpha": 8},
    "LOKR": {"r": 8, "alpha": 8},
    "VERA": {"r": 256, "fan_in_fan_out": False},
}
"""PEFT 0.21's defaults, per peft_type, of the config fields that set the scales: what a config that leaves one out
means (its config class's field default; tests/test_formats_peft.py compares them with the installed PEFT's)."""


def peft_default(peft_type: str, name: str):
    """The default of config field ``name`` for an adapter of ``peft_type`` (PEFT_DEFAULTS; LoraConfig's where that
    type's config has no such field, or for a type not listed)."""
    return PEFT_DEFAULTS.get(peft_type, _LORA_DEFAULTS).get(name, _LORA_DEFAULTS.get(name))


OTHER_PEFT_TYPES = {
    "LOHA": "a LoHa adapter", "LOKR": "a LoKr adapter", "IA3": "an IA3 adapter", "OFT": "an OFT adapter",
    "BOFT": "a BOFT adapter", "FOURIERFT": "a FourierFT adapter",
    "PROMPT_TUNING": "a prompt-tuning adapter", "PREFIX_TUNING": "a prefix-tuning adapter",
    "P_TUNING": "a p-tuning adapter", "LN_TUNING": "a LayerNorm-tuning adapter", "POLY": "a Poly adapter",
    "HRA": "an HRA adapter", "BONE": "a Bone adapter", "VBLORA": "a VB-LoRA adapter", "XLORA": "an X-LoRA adapter",
    "MISS": "a MiSS adapter", "RANDLORA": "a RandLoRA adapter", "SHIRA": "a SHiRA adapter", "C3A": "a C3A adapter",
    "ROAD": "a RoAd adapter", "WAVEFT": "a WaveFT adapter", "DELORA": "a DeLoRA adapter", "GRALORA": "a GraLoRA adapter",
}

# LoraConfig fields that change the math away from W + s·B·A (or add weights we would drop) when set.
REFUSED_CONFIG_FLAGS = {
    "use_qalora": "a QA-LoRA adapter (use_qalora)",
    "use_bdlora": "a block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "an activated LoRA (alora_invocation_tokens): applied only after invocation tokens",
    "layer_replication": "an adapter that replicates base layers (layer_replication)",
    "velora_config": "a VeLoRA adapter (velora_config)",
    "monteclora_config": "a MonteCLoRA adapter (monteclora_config)",
    "kasa_config": "a KaSA adapter (kasa_config)",
    "arrow_config": "an Arrow routing adapter (arrow_config)",
}
SUBCONFIG_FLAGS = frozenset({"velora_config", "monteclora_config", "kasa_config", "arrow_config", "use_bdlora"})
"""The REFUSED_CONFIG_FLAGS that are sub-configs: PEFT makes a dict, an empty {} too, the variant's config object,
which switches the variant on."""


def sets_flag(flag: str, value) -> bool:
    """Does a REFUSED_CONFIG_FLAGS field with this value switch its variant on in PEFT (which tests it by truthiness)?
    (A sub-config's other false values: MonteCLoRA's false is off; the others' fail PEFT's load, a TypeError.)"""
    return bool(value) or flag in SUBCONFIG_FLAGS and isinstance(value, dict)


# LoraConfig.init_lora_weights values whose initialisation PEFT subtracts from the base weights (again, every time
# it loads the adapter): the trained model is (W − s·B₀·A₀) + s·B·A, not W + s·B·A on the base a user has.
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
BASE_KEEPING_INITS = ("gaussian", "eva", "orthogonal", "mica")
"""PEFT 0.21's other named inits: they set only A and B (MiCA's B frozen in training), W + s·B·A as for true/false."""


def refuse_base_changing_init(path: Path, init) -> None:
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise UnsupportedAdapterError(
            f"{path}: init_lora_weights={init!r}: PEFT takes this initialisation out of the base weights when it loads "
            "the adapter, so W + s·B·A on the original base is not the trained model; save it with PEFT's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...), which makes it a plain LoRA of the "
            "original base, and use that"
        )
    # (PEFT 0.21 fails to load any other truthy value; a newer PEFT's init may rewrite the base as PiSSA's does)
    if init and not isinstance(init, bool) and not (isinstance(init, str) and init.lower() in BASE_KEEPING_INITS):
        raise UnsupportedAdapterError(
            f"{path}: init_lora_weights={init!r} is no initialisation PEFT 0.21 knows (true, false, "
            f"{', '.join(BASE_KEEPING_INITS + BASE_CHANGING_INITS)}): if it changes the base weights when PEFT loads "
            "the adapter, W + s·B·A is not the trained model; refusing to guess"
        )


def refuse_unsupported(path: Path, keys: Iterable[str], markers=REFUSED_MARKERS) -> None:
    """Raise UnsupportedAdapterError when any key belongs to a known non-LoRA layout (of ``markers``)."""
    for key in keys:
        for marker, what in markers:
            if re.search(marker, key):
                # (a layout read from elsewhere, a PEFT folder or a kohya file, says so itself)
                tail = "" if (marker, what) in READ_ELSEWHERE else "; loraops handles plain LoRA only"
                raise UnsupportedAdapterError(f"{path}: {what} (key {key!r}){tail}")


def unknown_layout(path: Path, keys: Iterable[str], what: str = "unknown adapter key layout") -> FormatError:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    return FormatError(f"{path}: {what}: {shown}")


def shown(names: Sequence[str], count: int = 3) -> str:
    """The first ``count`` names, and how many more there are."""
    return ", ".join(names[:count]) + (f" (+{len(names) - count} more)" if len(names) > count else "")


def refuse_unplaced(adapter: "Adapter", modules: Sequence[str], naming: str) -> None:
    """Refuse to write ``modules``, SD UNet modules whose written names depend on whose UNet it is, SDXL's or
    SD 1.x/2.x's, when neither the adapter's modules nor its header say (ldm.is_sdxl None): a guess would be loaded by
    one family's loaders and by none of the other's. ``naming``: who names them how."""
    if modules:
        raise FormatError(
            f"{adapter.label}: {shown(list(modules))}: modules of an SD UNet, which {naming}, and neither these modules "
            "nor the adapter's header say which it is: give its checkpoint as --base (or register it with --base)"
        )


def names_module(path: str, name: str) -> bool:
    """PEFT's rule for a plain module name (target_modules): the module path itself or its last dot-separated
    components. (trainable_token_indices keys are matched otherwise: tokens.wraps.)"""
    return path == name or path.endswith(f".{name}")


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first key of a PEFT rank_pattern/alpha_pattern that matches module ``name``, exactly as
    peft.utils.other.get_pattern_key does (0.21): the key is a regex that must match a dot-bounded suffix."""
    for key, tail, regex in _compiled_patterns(tuple(patterns)):
        if name.endswith(tail) and regex.match(name):
            return key
    return None


@functools.lru_cache(maxsize=16)
def _compiled_patterns(keys: tuple[str, ...]) -> tuple[tuple[str, str, re.Pattern], ...]:
    """Each key compiled once, with the literal text any name it matches must end with. A resized adapter has a
    pattern per module: matching them as strings recompiled every key once past re's 512-pattern cache (110 s to
    write 1,600 modules), and testing every key on every name is quadratic without the cheap suffix test."""
    return tuple((key, _literal_tail(key), pattern_regex(key)) for key in keys)


def pattern_regex(key: str) -> re.Pattern:
    """A rank_pattern/alpha_pattern key as PEFT's get_pattern_key matches it (re.error where it is none)."""
    return re.compile(rf"(.*\.)?({key})$")


def _literal_tail(key: str) -> str:
    """The longest end of a regex that matches only itself ('' when unsure: an alternation, an escape, inline
    flags)."""
    if "|" in key or "(?" in key:
        return ""
    start = len(key)
    while start and key[start - 1] not in ".^$*+?{}[]\\()":
        start -= 1
    return "" if start and key[start - 1] == "\\" else key[start:]


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: alphas and merge coefficients beyond it overflow where loraops computes (and kohya stores
alphas) in float32."""
FLOAT32_TINY = 1.1754943508222875e-38
"""The smallest normal float32: a kohya alpha below it keeps few bits or none (stored as 0: alpha = rank)."""


def overflows_float32(value: float) -> bool:
    """Does float32 round ``value`` to ±inf? Not for what rounds to its largest number (3.4028235e38, as numpy
    prints float32's max, is above FLOAT32_MAX); an int beyond any float does."""
    try:
        return math.isinf(struct.unpack("<f", struct.pack("<f", float(value)))[0])
    except OverflowError:  # (struct refuses a finite value float32 rounds to inf; float() an int beyond any float)
        return True


def given_alpha(alpha: float | None, where: str | Path | None = None) -> float | None:
    """An alpha the user gives: `register`/`check`/`inspect --alpha` (every module's, replacing what the file says)
    and `extract --alpha` (the extracted adapter's); alpha= to the library calls behind them. It must be a number
    above 0. Not 0: a kohya file's stored alpha of 0 means alpha = rank (sd-scripts, LyCORIS), while PEFT's
    lora_alpha 0 scales every module by 0, and `--alpha 0` on a kohya file gave scale 0 where the same 0 in the file
    gave scale 1; the rank itself says alpha = rank in every layout. Not negative: a weight of -1 negates an adapter.
    (A stored --alpha override of 0 from before is still read as it was recorded: check_alpha.) And a number float32
    holds as a normal number, where loraops computes and kohya files store alphas: 1e-50 was registered, and its
    kohya export stored 0. ``where`` starts the message: the adapter it is given for, as other refusals of it do."""
    if alpha is None:
        return None
    number = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    prefix = f"{where}: `alpha`: " if where else ""
    if number and alpha > 0 and (isinstance(alpha, int) or math.isfinite(alpha)):  # (NaN is not above 0)
        if beyond := _beyond_float32(alpha):
            raise InvalidInputError(f"{prefix}{beyond}", ["alpha"])
        return float(alpha)
    why = ""
    if number and alpha == 0:
        why = (": an alpha of 0 means alpha = rank in a kohya file but a scale of 0 in PEFT, so loraops takes neither; "
               "give the rank itself for scale 1 (`alpha` 8 for rank 8), or leave `alpha` out")
    elif number and alpha < 0:
        why = ": to negate an adapter, weight it -1 in merge or combine (NAME:-1)"
    shown = f"{alpha:g}" if number else repr(alpha)
    raise InvalidInputError(f"{prefix}alpha must be a positive number (got {shown}){why}", ["alpha"])


def _beyond_float32(alpha: float) -> str | None:
    """Why a finite alpha of 0 or above is not one float32 holds as a normal number (0 aside), else None."""
    if overflows_float32(alpha):  # merged, it overflowed float32;
        return f"alpha {_shown(alpha)} is beyond what float32 holds"  # written, it became inf
    if 0 < alpha < FLOAT32_TINY:
        return (f"alpha {alpha:g} is below what float32 holds (its smallest normal number is {FLOAT32_TINY:.2g}): a "
                "kohya file stores alphas in float32, where this one would lose its precision or be 0 (alpha = rank)")
    return None


def check_alpha(path: Path, alpha: object, where: str) -> float:
    """An alpha a file records (or a stored --alpha override): given_alpha's rule, but for 0, which a file may
    record (alpha = rank in kohya and diffusers files). ``where``: the file's key, or `alpha` (the parameter)."""
    # (a JSON integer may be beyond any float: math.isfinite and :g raised OverflowError on it)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or isinstance(alpha, float) and not math.isfinite(alpha):
        raise InvalidInputError(f"{path}: {where}: alpha {alpha!r} is not a finite number", ["alpha"])
    if alpha < 0:
        raise InvalidInputError(f"{path}: {where}: negative alpha {_shown(alpha)}", ["alpha"])
    if beyond := _beyond_float32(alpha):  # 1e-50 in a PEFT config was read, and its kohya export stored 0
        raise InvalidInputError(f"{path}: {where}: {beyond}", ["alpha"])
    return float(alpha)


def stored_alpha(path: Path, tensor, key: str) -> float:
    """The alpha a file's ``.alpha`` tensor (torch's or a HeaderTensor) holds, check_alpha's rule: one number, stored
    as a float or an integer (sd-scripts' ``torch.tensor(alpha)`` of an int); a boolean is no alpha (True was read as
    alpha 1, False as 0: alpha = rank)."""
    if tensor.numel() != 1:
        raise InvalidInputError(f"{path}: {key!r} must hold one number, has shape {tuple(tensor.shape)}")
    if str(tensor.dtype) == "torch.bool":
        raise InvalidInputError(f"{path}: {key}: alpha {bool(tensor.item())!r} is not a finite number (a boolean "
                                "tensor)", ["alpha"])
    return check_alpha(path, float(tensor.double().item()), key)


def _shown(number: int | float) -> str:
    """A number as messages show it (%g to 9 digits, which tell float32s apart: 3.4028236e+38 beyond its max,
    not 3.40282e+38), also an integer beyond any float."""
    if abs(number) <= sys.float_info.max:
        return f"{number:.9g}"
    return f"about {'-' if number < 0 else ''}1e+{int(math.log10(abs(number)))}"


_KNOWN_FINITE = contextvars.ContextVar("values_known_finite", default=False)


@contextlib.contextmanager
def values_known_finite(known: bool = True) -> Iterator[None]:
    """While reading an adapter whose bytes are known to have passed its readers' checks before (``known``; the
    registry's stamps say when), check_finite looks at nothing: on a 1.5 GiB adapter it reads every page."""
    token = _KNOWN_FINITE.set(known)
    try:
        yield
    finally:
        _KNOWN_FINITE.reset(token)


FINITE_BLOCK = 16 << 20
"""Values check_finite reduces at a time."""


def check_finite(path: Path, key: str, tensor: "torch.Tensor") -> None:
    if not tensor.is_floating_point() or tensor.is_meta or not tensor.numel() or _KNOWN_FINITE.get():
        return
    import torch  # (after the headers-only reads' return: st.header_only)

    flat = tensor.reshape(-1)
    # in blocks: a saved head mapped from its file (a 2 GiB lm_head) is never converted whole into anonymous memory
    for start in range(0, flat.numel(), FINITE_BLOCK):
        block = flat[start : start + FINITE_BLOCK]
        if block.element_size() == 1:  # float8: torch has neither isfinite nor aminmax for it; float16 holds its values
            block = block.to(torch.float16)
        # NaN propagates into both extremes and ±Inf is one: a single reduction, no mask (64 MiB of float32: 2 ms,
        # against 54 ms for isfinite().all())
        low, high = torch.aminmax(block)
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            raise InvalidInputError(f"{path}: tensor {key!r} contains NaN or Inf")


def check_derived(path: Path, name: str, what: str, tensor: "torch.Tensor") -> None:
    """A factor a reader composes from finite stored ones (a Tucker core contracted, AdaLoRA's E or VeRA's λs
    folded), refused where it overflows the dtype it is kept in: its message names the product, as no stored tensor
    holds NaN or Inf. Checked whatever the registry's stamps say (values_known_finite vouches for stored bytes, not
    for what this code composes of them), which costs little: a composed factor is out×r or r×in·k…."""
    if tensor.is_meta or not tensor.numel():
        return
    import torch  # (after the headers-only reads' return: st.header_only)

    if bool(torch.isfinite(tensor).all()):
        return
    raise InvalidInputError(f"{path}: module {name!r}: {what} goes beyond what "
                            f"{dtype_name(tensor.dtype)} holds (finite stored values whose product "
                            "overflows)")


def fmt_shape(shape) -> str:
    return "×".join(str(int(d)) for d in shape) or "scalar"


CONV1D_LAYERS = ("c_attn", "q_attn", "c_proj", "c_fc")
"""The names of transformers' Conv1D layers (GPT-2, OpenAI GPT, ImageGPT, Decision Transformer, CLVP: weights stored
in×out); every other layer PEFT gives lora_A/lora_B on a 2-D weight is an nn.Linear (or a raw parameter)."""


def conv1d_named(name: str) -> bool:
    return name.rpartition(".")[2] in CONV1D_LAYERS


def peft_fan_in_fan_out(configured: bool, name: str) -> bool:
    """A PEFT module's fan_in_fan_out: the config's one flag applies to the Conv1D layers only. PEFT decides it per
    layer (LoRA, AdaLoRA and VeRA alike): an nn.Linear is set false, with a warning, a Conv1D true, whatever the
    config says; a square nn.Linear read with a hand-set true was transposed. (A Conv1D whose config says false, as
    PEFT saves a GPT-2 adapter whose last wrapped layer is its lm_head, is found as one when bound to its base:
    check.fit_orientation; unbound, it is marked unsettled: formats.peft.settled_orientation.)"""
    return configured and conv1d_named(name)


def build_module(
    path: Path, name: str, A: "torch.Tensor", B: "torch.Tensor", *, a_key: str, b_key: str, alpha: float | None,
    rslora: bool = False, kind: ModuleKind | None = None, fan_in_fan_out: bool = False, extra_keys: tuple[str, ...] = (),
    magnitude: "torch.Tensor | None" = None, magnitude_key: str = "", stored: Iterable["torch.Tensor"] = (),
    lora_bias: "torch.Tensor | None" = None, bias_key: str = "",
) -> LoraModule:
    """A validated LoraModule from stored factors. ``kind`` None means linear or conv by the number of dims;
    ``alpha`` None means alpha = r (kohya's rule for a missing alpha); ``magnitude``: a DoRA module's, as stored
    (PEFT's shape for the kind: see ``magnitude_shape``); ``stored``: where a factor was composed on read, every
    tensor of the file the module is made of (its LoraModule.stored_dtype is theirs)."""
    def bad(why: str) -> InvalidInputError:
        return InvalidInputError(
            f"{path}: module {name!r}: {why} ({a_key} {fmt_shape(A.shape)}, {b_key} {fmt_shape(B.shape)})"
        )

    if kind is None:
        kind = "conv" if A.dim() >= 3 else "linear"
    if kind == "conv":  # Conv1d, Conv2d or Conv3d: A r×in×k…, B out×r×1…
        if A.dim() not in (3, 4, 5) or B.dim() != A.dim():
            raise bad("conv factors must both be 3-, 4- or 5-D (Conv1d, Conv2d, Conv3d)")
        if any(d != 1 for d in B.shape[2:]):
            raise bad(f"conv B must be out×r×{'×'.join('1' * (B.dim() - 2))}")
    elif A.dim() != 2 or B.dim() != 2:
        raise bad("factors must be 2-D matrices")
    if A.shape[0] != B.shape[1]:
        raise bad(f"rank mismatch: A has rank {A.shape[0]}, B has rank {B.shape[1]}")
    if A.shape[0] == 0 or any(d == 0 for d in (*A.shape, *B.shape)):
        raise bad("empty factor")
    if not (A.is_floating_point() and B.is_floating_point()):
        raise bad(f"factors must be floating point, not {A.dtype if not A.is_floating_point() else B.dtype}")
    check_finite(path, a_key, A)
    check_finite(path, b_key, B)
    if magnitude is not None:
        expected = magnitude_shape(kind, A.dim(), int(B.shape[0]))
        if tuple(magnitude.shape) != expected or not magnitude.is_floating_point():
            raise InvalidInputError(
                f"{path}: module {name!r}: DoRA magnitude {magnitude_key} is {fmt_shape(magnitude.shape)} "
                f"{dtype_name(magnitude.dtype)}, not {fmt_shape(expected)} floating point (one value "
                f"per output channel of {b_key} {fmt_shape(B.shape)})"
            )
        check_finite(path, magnitude_key, magnitude)
        magnitude = magnitude.reshape(-1)
        extra_keys = (*extra_keys, magnitude_key)
    if lora_bias is not None:
        if tuple(lora_bias.shape) != (int(B.shape[0]),) or not lora_bias.is_floating_point():
            raise InvalidInputError(
                f"{path}: module {name!r}: lora_bias {bias_key} is {fmt_shape(lora_bias.shape)} "
                f"{dtype_name(lora_bias.dtype)}, not {int(B.shape[0])} floating point (one value per "
                f"output of {b_key} {fmt_shape(B.shape)})"
            )
        check_finite(path, bias_key, lora_bias)
        extra_keys = (*extra_keys, bias_key)
    rank = int(A.shape[0])
    alpha = float(rank) if alpha is None else alpha
    return LoraModule(
        name=name, A=A, B=B, alpha=alpha, scale=lora_scale(alpha, rank, rslora), kind=kind,
        fan_in_fan_out=fan_in_fan_out, source_keys=(a_key, b_key, *extra_keys), magnitude=magnitude, lora_bias=lora_bias,
        stored_dtype=widest_dtype(*(t.dtype for t in stored)) if stored else None,
    )


def magnitude_shape(kind: ModuleKind, factor_dims: int, out: int) -> tuple[int, ...]:
    """How PEFT stores a DoRA magnitude: (out,) for Linear and Embedding, 1×out×1… for a Conv (its weight norm kept
    the conv's dims), ``factor_dims`` being the dims of its factors."""
    return (1, out, *[1] * (factor_dims - 2)) if kind == "conv" else (out,)


def pair_factors(path: Path, found: dict[str, dict[str, str]], first: str, second: str) -> None:
    """Every module needs both factors: raise naming the key whose partner is missing."""
    for module, parts in found.items():
        for have, need in ((first, second), (second, first)):
            if have in parts and need not in parts:
                raise InvalidInputError(f"{path}: {parts[have]!r} has no matching {need} tensor for module {module!r}")


class ModuleStream:
    """What a writer writes an adapter from: ``modules``, the adapter's real modules as they come (computed one at a
    time by loraops.algebra, or the adapter's own), while ``adapter.modules`` announces them up front (stand-ins
    without values do: names and layouts decide keys and refusals before any value exists).

    Iterating gives the modules one at a time, except the members of a group (``group_of``: its key, None for
    none), which come together once the last of the group (as ``adapter.modules`` counts them) has: a writer needs a
    whole group for what it writes of any member (PEFT's factors of a fused experts parameter, kohya's joined parts
    of a fused tensor). Groups are small (one layer's experts, a tensor's q, k and v) and come whole in name order.
    ``written`` then holds a stand-in of every module written (``keep``), in the announced order: the small facts
    (ranks, alphas) a config or header written after the tensors needs. A module announced but ``dropped`` by the
    Derivation that computes them (found empty) is left out of both; a group it leaves short comes without it."""

    def __init__(self, adapter: "Adapter", modules: Iterable[LoraModule],
                 group_of: Callable[[LoraModule], str | None] = lambda module: None) -> None:
        self.adapter, self.modules, self.group_of = adapter, modules, group_of
        self._kept: dict[str, LoraModule] = {}

    @property
    def dropped(self) -> set[str]:
        """The announced modules the computation dropped: known only once it has run (it fills them as it goes)."""
        return set(getattr(self.modules, "dropped", ()))

    def __iter__(self) -> Iterator[list[LoraModule]]:
        sizes = Counter(key for m in self.adapter.modules.values() if (key := self.group_of(m)) is not None)
        pending: dict[str, list[LoraModule]] = {}
        seen: set[str] = set()
        for module in self.modules:
            if module.name not in self.adapter.modules or module.name in seen:
                raise FormatError(f"{self.adapter.label}: module {module.name!r} was not announced, or came twice")
            seen.add(module.name)
            key = self.group_of(module)
            if key is None:
                yield [module]
                continue
            members = pending.setdefault(key, [])
            members.append(module)
            if len(members) == sizes[key]:
                yield pending.pop(key)
        dropped = self.dropped
        missing = next((name for name in self.adapter.modules if name not in seen and name not in dropped), None)
        if missing is not None:
            raise FormatError(f"{self.adapter.label}: module {missing!r} was announced and never came")
        yield from pending.values()  # (each short of members dropped)

    def keep(self, module: LoraModule) -> None:
        """Remember what was written of ``module`` (a stand-in), for ``written``."""
        self._kept[module.name] = module.stand_in()

    def written(self, order: Iterable[str]) -> dict[str, LoraModule]:
        """The stand-ins kept, in ``order`` (the names written, as the adapter announces them)."""
        return {name: self._kept[name] for name in order if name in self._kept}  # (not: dropped, or all its group)
