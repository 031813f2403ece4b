"""PEFT ``target_parameters``: LoRAs on raw parameters (PEFT 0.21's ``ParamWrapper``), as PEFT's ``all-linear`` makes
them for transformers 5's fused MoE experts (Mixtral, Qwen2/3-MoE, DeepSeek-V3 and the families converted like them).

transformers 5 holds a layer's experts as two 3-D parameters, ``experts.gate_up_proj`` (E×2I×H: expert e's gate rows,
then its up rows) and ``experts.down_proj`` (E×H×I), built on load from one tensor per expert (``experts.<e>.gate_proj``,
``up_proj``, ``down_proj``; Mixtral's ``w1``, ``w3``, ``w2``) by ``MergeModulelist(dim=0)`` + ``Concatenate(dim=1)``,
and saved that way again. PEFT wraps each targeted parameter in a ``ParamWrapper`` whose factors hold all experts:
``lora_A`` (E·r)×in, ``lora_B`` out×(E·r), and (``ParamWrapper.get_delta_weight``)

    delta[e] = s · B[:, e::E] @ A[e·r:(e+1)·r]         (out×in, the parameter's e-th slice; s = alpha/r or alpha/√r)

with r and alpha from rank_pattern/alpha_pattern matched against ``<module>.<parameter>``. So expert e's share is a
plain rank-r LoRA, split by rows into the expert's tensors on disk: that is how it is read here (``LoraModule.raw_parameter``
says which fused parameter a module came from). Two parameters of one module are nested wrappers, saved as
``experts.lora_A`` (outer) and ``experts.base_layer.lora_A`` (inner); PEFT wraps a module's parameters in their
definition order, so gate_up_proj is inside down_proj (checked against the shapes). A 2-D parameter named ``weight``
(Mixtral's router ``gate.weight``) is a plain LoRA on that module, as PEFT computes it (``Linear.get_delta_weight``).
The PEFT writer inverts this (``parameter_factors``), only where the wrapper layout holds the modules exactly
(``expert_layout``). A base that stores the experts fused on disk (gpt-oss, Qwen3-VL-MoE, Aria, GraniteMoE) has no
per-expert tensors: each share is bound to its part of the fused tensor instead (``bind_fused``).
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapter import Adapter, LoraModule
from ..errors import InvalidInputError, MismatchError, UnsupportedAdapterError
from . import common

if TYPE_CHECKING:
    import torch

    from .peft import ParsedKeys, ScaleConfig

# A fused experts parameter → the per-expert tensors its rows are, in row order (gate, then up).
FUSED_EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
NESTING = ("gate_up_proj", "down_proj")
"""Definition order in transformers' experts classes: PEFT's wrapping order, innermost first."""
EXPERTS_MODULE = "experts"
WRAPPED = ".base_layer"


def check_entries(path: Path, entries) -> list[str]:
    """The config's target_parameters, refused unless each is a fused experts parameter or a 2-D ``weight``."""
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise InvalidInputError(f"{path}: config target_parameters={entries!r} must be a list of parameter names")
    unmapped = [e for e in entries if e.rpartition(".")[2] not in (*FUSED_EXPERTS, "weight")]
    if unmapped:
        raise UnsupportedAdapterError(
            f"{path}: a LoRA on raw parameters loraops does not map (target_parameters: {', '.join(unmapped)}); it "
            f"handles only fused MoE experts ({', '.join(FUSED_EXPERTS)}) and 2-D weights"
        )
    return entries


def targets(entries: list[str], module: str, param: str) -> bool:
    """Does a target_parameters entry select ``<module>.<param>``? (PEFT: the key equals it or ends with ``.entry``.)"""
    key = f"{module}.{param}"
    return any(e.rpartition(".")[2] == param and (key == e or key.endswith(f".{e}")) for e in entries)


def pattern_name(cfg: "ScaleConfig", module: str) -> str:
    """The name PEFT matches rank_pattern/alpha_pattern keys against: ``<module>.weight`` for a module whose weight is
    a target parameter, else the module's name."""
    return f"{module}.weight" if targets(cfg.target_parameters, module, "weight") else module


def mark_weight_targets(modules: dict[str, LoraModule], cfg: "ScaleConfig | None") -> dict[str, LoraModule]:
    """Modules whose 2-D ``weight`` is a target parameter, marked as such: PEFT adds their B·A to the parameter as
    stored, so a GPT-2 Conv1D's is not transposed as a LoRA on the module would be (whatever fan_in_fan_out the
    config, or the model class it records, gives its Conv1D-named layers)."""
    if cfg is None or not cfg.target_parameters:
        return modules
    return {name: replace(m, raw_parameter=(f"{name}.weight", 0, 1), fan_in_fan_out=False)
            if targets(cfg.target_parameters, name, "weight") else m for name, m in modules.items()}


def unwrap(name: str) -> tuple[str, int]:
    """(module, nesting depth) of a factor group's name: ``m.experts.base_layer`` → (``m.experts``, 1)."""
    depth = 0
    while name.endswith(WRAPPED):
        name, depth = name[: -len(WRAPPED)], depth + 1
    return name, depth


def split_experts(
    path: Path, parsed: "ParsedKeys", tensors: dict[str, "torch.Tensor"], cfg: "ScaleConfig | None",
) -> dict[str, LoraModule]:
    """Per-expert modules for every fused-experts ParamWrapper chain in ``parsed`` (whose groups are removed from it).
    Anything nested or named like an experts module that this cannot map exactly is refused."""
    if cfg is None or not cfg.target_parameters:
        return {}
    chains: dict[str, dict[int, dict[str, str]]] = {}
    for name in list(parsed.factors):
        module, depth = unwrap(name)
        if depth or module.rpartition(".")[2] == EXPERTS_MODULE:
            chains.setdefault(module, {})[depth] = parsed.factors.pop(name)
    modules: dict[str, LoraModule] = {}
    for module, levels in sorted(chains.items()):
        params = [p for p in NESTING if targets(cfg.target_parameters, module, p)]
        keys = [parts["A"] for _, parts in sorted(levels.items())]
        if module.rpartition(".")[2] != EXPERTS_MODULE or sorted(levels) != list(range(len(params))):
            raise UnsupportedAdapterError(
                f"{path}: {len(levels)} nested LoRA(s) on parameters of {module!r} ({', '.join(keys)}) that loraops "
                f"cannot tell apart; it maps target_parameters {' and '.join(NESTING)} of a fused MoE 'experts' module"
            )
        # depth 0 is the outermost wrapper: the last parameter PEFT wrapped
        factors = {p: levels[len(params) - 1 - i] for i, p in enumerate(params)}
        modules.update(_experts_of(path, module, factors, tensors, cfg))
    return modules


def _experts_of(path: Path, module: str, factors: dict[str, dict[str, str]], tensors, cfg: "ScaleConfig"):
    shapes = {}
    for param, parts in factors.items():
        A, B = tensors[parts["A"]], tensors[parts["B"]]
        r = cfg.rank_for(f"{module}.{param}")
        blocks = len(FUSED_EXPERTS[param])
        if (A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0] or A.shape[0] % r or B.shape[0] % blocks
                or not A.shape[0]):
            raise InvalidInputError(
                f"{path}: {parts['A']} {common.fmt_shape(A.shape)} and {parts['B']} {common.fmt_shape(B.shape)} are not "
                f"a LoRA on the fused experts parameter {module}.{param} of rank {r} per expert"
            )
        shapes[param] = (A.shape[0] // r, int(A.shape[1]), int(B.shape[0]))
    if len(shapes) == 2:
        (e1, in1, out1), (e2, in2, out2) = shapes["gate_up_proj"], shapes["down_proj"]
        if e1 != e2 or out1 != 2 * in2 or in1 != out2:
            raise UnsupportedAdapterError(
                f"{path}: the nested LoRAs on {module!r} do not have the shapes of gate_up_proj (inner: "
                f"{e1} experts, {in1}→{out1}) and down_proj (outer: {e2} experts, {in2}→{out2}); refusing to guess "
                "which is which"
            )
    for param, parts in factors.items():
        A, B = tensors[parts["A"]], tensors[parts["B"]]
        experts = shapes[param][0]
        r = A.shape[0] // experts
        alpha = cfg.alpha_for(f"{module}.{param}")
        if alpha is None:
            raise InvalidInputError(f"{path}: no lora_alpha for {module}.{param}; {common.ALPHA_WANTED}")
        pieces = FUSED_EXPERTS[param]
        rows = B.shape[0] // len(pieces)
        for e in range(experts):
            A_e, B_e = A[e * r:(e + 1) * r], B[:, e::experts]  # B's columns are (rank, expert) with expert fastest
            for i, piece in enumerate(pieces):
                name = f"{module}.{e}.{piece}"
                built = common.build_module(
                    path, name, A_e.contiguous(), B_e[i * rows:(i + 1) * rows].contiguous(), a_key=parts["A"],
                    b_key=parts["B"], alpha=alpha, rslora=cfg.rslora,
                )
                yield name, replace(built, raw_parameter=(f"{module}.{param}", e, experts))


# A MoE layer's router, beside its experts module: one row (a logit) per expert (Qwen2/3-MoE, Mixtral, DeepSeek-V3:
# mlp.gate; gpt-oss, PhiMoE as transformers 5 holds it: mlp.router)
ROUTERS = ("gate.weight", "router.weight")


def first_share(module: LoraModule) -> bool:
    """Is ``module`` expert 0's share of a LoRA on a fused experts parameter? However many experts the config's r
    splits the factors into: one (r E times too large) too, which LoraModule.experts cannot tell from no share."""
    return (module.raw_parameter is not None and module.raw_parameter[1] == 0
            and module.raw_parameter[0].rpartition(".")[2] in FUSED_EXPERTS)


def refuse_miscounted(path: Path, modules: dict[str, LoraModule], full: dict[str, "torch.Tensor"]) -> None:
    """The experts a fused parameter's factors split into (E·r rows, r from the config) against its layer's router
    saved whole beside it (modules_to_save), whose rows are the model's experts: another count means the config's r
    is not the one PEFT trained with, and PEFT cannot load the file (it builds E·r rows from the model's E). What
    check does against a base's expert tensors (check.expert_count_mismatches), here without one."""
    for m in modules.values():
        if first_share(m):
            parameter, _, experts = m.raw_parameter
            parent = parameter.rpartition(f".{EXPERTS_MODULE}.")[0]
            router = next((f"{parent}.{r}" for r in ROUTERS if f"{parent}.{r}" in full), None)
            rows = None if router is None or full[router].dim() != 2 else int(full[router].shape[0])
            if rows is not None and rows != experts:
                raise InvalidInputError(
                    f"{path}: config r={m.rank} splits the LoRA on {parameter} into {experts} expert"
                    f"{'s' * (experts > 1)}, but the router {router} saved whole beside it has {rows} (its rows): r is "
                    "not the rank it was trained with, and PEFT cannot load the file")


# -- bases that store the experts fused ------------------------------------------------------------------------

# Where a base that stores every expert of a parameter in one 3-D tensor keeps it, relative to the experts module's
# parent: under transformers' in-memory name (gpt-oss, Qwen3-VL-MoE, a model saved fused), or under the names its
# conversion_mapping.py loads as that parameter and saves back (aria_text: experts.fc1.weight; granitemoe, also
# GraniteMoeShared/Hybrid: input_linear.weight).
STORED_AS = {"gate_up_proj": ("experts.gate_up_proj", "experts.fc1.weight", "input_linear.weight"),
             "down_proj": ("experts.down_proj", "experts.fc2.weight", "output_linear.weight")}
PIECES = {piece: (param, i) for param, pieces in FUSED_EXPERTS.items() for i, piece in enumerate(pieces)}
PIECE_RE = re.compile(rf"^(?P<parent>.+)\.{EXPERTS_MODULE}\.(?P<e>\d+)\.(?P<piece>{'|'.join(PIECES)})$")


def _stored(parent: str, param: str, manifest) -> str | None:
    return next((f"{parent}.{name}" for name in STORED_AS[param]
                 if len(getattr(manifest.get(f"{parent}.{name}"), "shape", ())) == 3), None)


def stored_fused(module: str, manifest) -> tuple[str, str, int, str] | None:
    """(parent, base tensor, expert, piece) for an expert's module ``<parent>.experts.<e>.<piece>`` whose parameter
    the base stores for all experts as one 3-D tensor, else None."""
    m = PIECE_RE.match(module)
    tensor = m and _stored(m["parent"], PIECES[m["piece"]][0], manifest)
    return (m["parent"], tensor, int(m["e"]), m["piece"]) if tensor else None


def bind_fused(module: LoraModule, manifest) -> LoraModule:
    """An expert's share bound to its part of the base tensor that stores the parameter of all experts (E×X×Y, seen
    as (E·X)×Y rows, see ``LoraModule.fused``): its rows of expert e's slice when the base stores it out×in (as
    transformers holds gate_up_proj of most families), else the slice's rows (its inputs) and its block of columns,
    transposed (gpt-oss, Aria, Qwen3-VL-MoE as published: what PEFT's einsum gives for an ``is_transposed``
    parameter). PEFT's out index is the stored one, so a piece is the block of the B rows it was read from: gpt-oss's
    interleaved gate and up columns need no rule. Unbound (not in base) where the base has no such tensor."""
    found = None if f"{module.name}.weight" in manifest else stored_fused(module.name, manifest)
    if found is None:
        return replace(module, fused=None, fused_columns=None, fan_in_fan_out=False)
    parent, tensor, e, piece = found
    param, index = PIECES[piece]
    pieces = len(FUSED_EXPERTS[param])
    experts, X, Y = manifest[tensor].shape
    if _in_by_out(parent, tensor, module.out_features * pieces, module.in_features, manifest):
        return replace(module, fused=(tensor, e * X, X, experts * X), fused_columns=(index * Y // pieces, Y // pieces),
                       fan_in_fan_out=True)
    rows = X // pieces
    return replace(module, fused=(tensor, e * X + index * rows, rows, experts * X), fused_columns=None,
                   fan_in_fan_out=False)


def _in_by_out(parent: str, tensor: str, out: int, in_: int, manifest) -> bool:
    """Does the base store this layer's experts in×out? Read off its two tensors: in×out they are gate_up E×H×2I and
    down E×I×H, out×in E×2I×H and E×H×I — never both, which would need H = 2H (gpt-oss-20b's down_proj alone is
    square). With one of them, off the parameter's shape (out×in = the module's, pieces joined)."""
    gate_up, down = (_stored(parent, param, manifest) for param in NESTING)
    if gate_up and down:
        (_, a, b), (_, c, d) = manifest[gate_up].shape, manifest[down].shape
        if (a, b) in ((d, 2 * c), (2 * d, c)):
            return (a, b) == (d, 2 * c)
    shape = tuple(manifest[tensor].shape[1:])
    if shape == (in_, out) == (out, in_):
        raise MismatchError(f"{tensor} is square and its layer has no other fused experts tensor to tell whether it is "
                            "stored out×in or in×out")
    return shape == (in_, out)


def why_unstored(module: str, manifest) -> str | None:
    """Why an expert's module has no tensor in the base, where the base stores it quantized (gpt-oss's MXFP4
    ``experts.gate_up_proj_blocks``/``_scales``)."""
    m = PIECE_RE.match(module)
    blocks = m and f"{m['parent']}.{EXPERTS_MODULE}.{PIECES[m['piece']][0]}_blocks"
    if blocks not in manifest:
        return None
    return f"quantized: stored as {blocks} and _scales (MXFP4); merge into a bf16 copy of the base"


# -- writing ---------------------------------------------------------------------------------------------------


def parameter_group(module: LoraModule) -> str | None:
    """The fused parameter whose PEFT factors hold ``module`` with the other experts' shares (None: an expert's share of
    none, written by itself)."""
    return module.raw_parameter[0] if module.experts > 1 else None


def expert_shares(label: str, modules: dict[str, LoraModule]) -> dict[str, dict[tuple[int, str], LoraModule]]:
    """Fused parameter → {(expert, piece): module} for every expert share in ``modules`` (under the adapter's own
    names; their names alone are checked)."""
    groups: dict[str, dict[tuple[int, str], LoraModule]] = {}
    for m in modules.values():
        if m.experts == 1:
            continue
        parameter, e, _ = m.raw_parameter
        owner, _, param = parameter.rpartition(".")
        piece = m.name.rpartition(".")[2]
        if m.name != f"{owner}.{e}.{piece}" or piece not in FUSED_EXPERTS.get(param, ()):
            raise _inexpressible(label, parameter, f"its module {m.name!r} is not expert {e}'s share of it")
        groups.setdefault(parameter, {})[(e, piece)] = m
    return groups


def expert_layout(label: str, modules: dict[str, LoraModule]) -> dict[str, dict[tuple[int, str], LoraModule]]:
    """``expert_shares``, refused unless PEFT's wrapper holds them exactly: every expert present, one rank and one
    scale per fused parameter, and an expert's gate and up sharing one A (its block of the wrapper's lora_A)."""
    groups = expert_shares(label, modules)
    for parameter, shares in groups.items():
        pieces = FUSED_EXPERTS[parameter.rpartition(".")[2]]
        experts = {m.experts for m in shares.values()}
        count = experts.pop()
        if experts or len(shares) != count * len(pieces):
            raise _inexpressible(label, parameter, f"{len(shares)} of its {count * len(pieces)} expert modules are here "
                                                   "(PEFT's wrapper holds every expert)")
        if len({(m.rank, m.scale) for m in shares.values()}) > 1:
            raise _inexpressible(label, parameter, "its experts have different ranks or alphas (PEFT's wrapper has one)")
        # (bound to a base that stores the experts fused, a share is transposed or a part: its factors are PEFT's still)
        if any(m.kind != "linear" for m in shares.values()) or any(
                len({(m.A.shape, m.B.shape) for (_, p), m in shares.items() if p == piece}) > 1 for piece in pieces):
            raise _inexpressible(label, parameter, "its experts' factors do not have one shape")
        for e in range(count):
            first, *others = (shares[(e, piece)] for piece in pieces)
            if any(not torch_equal(first.A, m.A) for m in others):
                raise _inexpressible(label, parameter, f"expert {e}'s {' and '.join(pieces)} do not share one A")
    return groups


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _inexpressible(label: str, parameter: str, why: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(f"{label}: cannot write the LoRA on {parameter} as PEFT target_parameters: {why}")


def parameter_patterns(label: str, modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
    """``<module>.<parameter>`` → a module with that raw parameter's rank and scale (for rank_pattern and
    alpha_pattern), for the raw-parameter modules among ``modules`` (stand-ins do: no value is read). Sorted, they
    are the config's target_parameters."""
    patterns = {f"{m.name}.weight": m for m in modules.values() if m.raw_parameter is not None and m.experts == 1}
    for parameter, shares in expert_shares(label, modules).items():
        patterns[parameter] = shares[(0, FUSED_EXPERTS[parameter.rpartition(".")[2]][0])]
    return patterns


def parameter_factors(label: str, modules: dict[str, LoraModule], parameters: set[str]) -> dict[str, tuple]:
    """What PEFT saves for the raw-parameter modules among ``modules`` (a 2-D weight's, or every expert's share of
    fused parameters, checked by ``expert_layout``): the key's module part → (lora_A, lora_B). A fused parameter's
    lora_A stacks the experts' A, its lora_B's columns are (rank, expert) with the expert fastest, gate rows then up
    rows (the reader's inverse); two parameters of one module (``parameters``: every fused parameter the adapter
    has) nest as PEFT wraps them (gate_up_proj inside); a 2-D weight is a plain LoRA on its module."""
    import torch

    factors = {m.name: (m.A, m.B) for m in modules.values() if m.raw_parameter is not None and m.experts == 1}
    for parameter, shares in expert_layout(label, modules).items():
        owner, _, param = parameter.rpartition(".")
        pieces, count = FUSED_EXPERTS[param], next(iter(shares.values())).experts
        nested = [p for p in NESTING if f"{owner}.{p}" in parameters]
        A = torch.cat([shares[(e, pieces[0])].A for e in range(count)])
        B = torch.stack([torch.cat([shares[(e, piece)].B for piece in pieces]) for e in range(count)], dim=2)
        factors[owner + WRAPPED * (len(nested) - 1 - nested.index(param))] = (A, B.reshape(B.shape[0], -1))
    return factors


# -- resize and combine ----------------------------------------------------------------------------------------

Halves = dict[str, tuple[int, LoraModule, str]]
"""joined module (the gate's name) → (the gate's rows, the up module, the up module's own name)"""


def join_gate_up(adapter: "Adapter") -> tuple["Adapter", Halves]:
    """Each expert's gate and up modules (one shared A: their block of the wrapper's lora_A) as one module on their
    stacked rows [gate; up], under the gate's name: resize and combine then factorize them jointly, and
    ``split_gate_up`` gives back a gate and an up that still share one A, as PEFT's wrapper needs. Refused (one
    line) where the adapter is no exact wrapper layout to begin with (``expert_layout``)."""
    import torch

    own = adapter.with_own_names()
    bound = {mine: name for name, mine in adapter.own_names.items()}
    modules, halves = dict(adapter.modules), {}
    for parameter, shares in expert_layout(adapter.label, own.modules).items():
        pieces = FUSED_EXPERTS[parameter.rpartition(".")[2]]
        if len(pieces) == 1:
            continue
        for e in sorted({e for e, _ in shares}):
            gate, up = (adapter.modules[bound.get(shares[(e, p)].name, shares[(e, p)].name)] for p in pieces)
            modules[gate.name] = replace(gate, B=torch.cat([gate.B, up.B]))
            del modules[up.name]
            halves[gate.name] = (gate.out_features, up, shares[(e, pieces[1])].name)
    return replace(adapter, modules=modules), halves


def split_gate_up(adapter: "Adapter", halves: Halves) -> "Adapter":
    """``join_gate_up`` undone on a result: the joined module's rows back into the gate and the up module, one A."""
    if not halves:
        return adapter
    own_names = dict(adapter.own_names)
    for _, up, up_own in halves.values():
        if up_own != up.name:
            own_names[up.name] = up_own
    modules = {m.name: m for joined in adapter.modules.values() for m in split_joined(joined, halves)}
    return replace(adapter, modules=dict(sorted(modules.items())), own_names=own_names)


def split_joined(module: LoraModule, halves: Halves) -> list[LoraModule]:
    """One module of a result: a joined one split back into its gate and its up module (see split_gate_up)."""
    if module.name not in halves:
        return [module]
    rows, up, _ = halves[module.name]
    # the up module keeps its own binding (its part of a fused base tensor is not the gate's)
    return [replace(module, B=module.B[:rows].contiguous()),
            replace(module, name=up.name, B=module.B[rows:].contiguous(), fused=up.fused, fused_columns=up.fused_columns)]
