"""Rendering for the CLI: human tables, or JSON from pydantic records / plain data."""
from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

import click

from ..adapter import DORA_NOTE, LORA_BIAS_NOTE, METHOD_NOTES, PRODUCT_NOTES
from ..adapter import METHOD_NAMES as METHODS  # noqa: F401 - list and register say it
from ..adapter import PRODUCT_NAMES as PRODUCTS  # noqa: F401 - list and register say it
from ..fsutil import human_bytes  # noqa: F401 - the commands' sizes
from . import one_line


def to_jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    return value


def echo_json(value: Any) -> None:
    click.echo(json.dumps(to_jsonable(value), indent=2, sort_keys=False))


def json_option(what: str):
    """Every command's --json (passed as ``as_json``): it prints ``what`` (a record of loraops.records, or a list of
    them) with echo_json, in place of the text; an error is still the one line on stderr, after the JSON a command
    that refuses its result (check, verify) printed."""
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON.")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain left-aligned text table (numbers right-aligned), each cell on its line: a control character in it (a
    newline or an ESC in a file name) shown escaped, as in error lines."""
    rows = [["" if cell is None else one_line(str(cell)) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def fmt(row: Sequence[str]) -> str:
        cells = []
        for cell, width in zip(row, widths, strict=True):
            numeric = cell.replace(".", "", 1).replace("-", "", 1).isdigit()
            cells.append(cell.rjust(width) if numeric else cell.ljust(width))
        return "  ".join(cells).rstrip()

    lines = [fmt(list(headers)), fmt(["-" * w for w in widths])]
    lines += [fmt(row) for row in rows]
    return "\n".join(lines)


def echo_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    click.echo(table(headers, rows))


def component_marks(components: Sequence[str | None]) -> list[str]:
    """What merge's summary and `base show`'s lineage say after each adapter of a merge that sent some to a Wan 2.2
    pipeline's second transformer (--transformer-2): " (transformer_2)" after those, " (transformer)" after the others,
    which bound to the pipeline (a Wan LoRA: its transformer/); nothing in any other merge."""
    if not any(components):
        return [""] * len(components)
    return [f" ({component or 'transformer'})" for component in components]


def echo_base_changed(*names: str | None) -> None:
    """merge, subtract and extract: a registered base named (or found at the path given) whose files changed since it
    was registered (merging.record_read)."""
    for name in filter(None, names):
        click.echo(f"note: the files of registered base {name} changed since it was registered; what was read is "
                   "recorded as a base of its own (by its fingerprint), and the lineage names it")


def scale_mode(record) -> str:
    """How `show` and `inspect` say an adapter's (an AdapterRecord's or InspectReport's) scales are made."""
    if "adalora" in record.methods:
        return "AdaLoRA (lora_alpha/(init_r + 1e-5), as PEFT's ranknum)"
    # (a LyCORIS LoKr module whose factors are stored whole has no r: its scale is 1; PEFT's keeps alpha/r, its config's)
    whole = record.format != "peft" and any(m.kind == "lokr" and m.rank is None for m in record.modules)
    return ("rsLoRA (alpha/sqrt(r))" if record.scale_mode == "rslora" else "classic (alpha/r)") + \
        ("; 1 for LoKr factors stored whole, as LyCORIS" if whole else "")


UNBOUND_NOTES = {"vera": " (not bound to a base, the `in` column is vera_A's width)",
                 "adalora": " (not bound to a base, a Conv2d's module reads as a linear one of in·kh·kw inputs)"}
BASE_REMOVED_NOTE = (" (its base was removed: the rows are as bound to it; writing, resizing or combining it needs "
                     "--base)")


def rows_read_unbound(record, method: str) -> bool:
    """Are the module rows of ``record`` what the adapter's file gives without a base (UNBOUND_NOTES says how)? Not
    those a registered adapter kept when its base was removed (`base rm --force`): an AdaLoRA conv's kind, VeRA
    modules' own widths. (Bound rows that read the same, Linear layers as wide as vera_A, are both.)"""
    if method == "adalora":
        return all(m.kind != "conv" for m in record.modules)
    return len({m.in_features for m in record.modules}) <= 1


def variants(record, lora_bias: bool = False) -> list[tuple[str, str]]:
    """The `variant` lines `show` and `inspect` give an adapter (an AdapterRecord or InspectReport): DoRA, PEFT
    lora_bias (which the registry does not record: ``lora_bias``), LoHa/LoKr modules, AdaLoRA/VeRA modules."""
    lines = [DORA_NOTE] if record.dora else []
    if lora_bias:
        lines.append(LORA_BIAS_NOTE)
    if record.products:
        lines.append("; ".join(PRODUCT_NOTES[p] for p in record.products)
                     + " (merged exactly; resize --rank K makes a LoRA of it)")
    unbound = getattr(record, "base", None) is None  # (an inspected file never is; a registered one with a base is)
    lines += [METHOD_NOTES[m] + ("" if not unbound else UNBOUND_NOTES[m] if rows_read_unbound(record, m)
                                 else BASE_REMOVED_NOTE) + " (merged exactly; export writes that LoRA)"
              for m in record.methods]
    return [("variant", line) for line in lines]


def number(value: float | None, modules: int | None = None, spread: Iterable[float | None] = ()) -> str:
    """A rank/alpha for humans: 'mixed' when modules differ (None), with the range of ``spread`` (the modules' values,
    where the caller has them: 'mixed (2–16)'), '-' when there are none (``modules`` 0: an adapter of PEFT trainable
    tokens alone)."""
    if value is None:
        known = sorted({v for v in spread if v is not None})
        return "-" if modules == 0 else f"mixed ({known[0]:g}–{known[-1]:g})" if len(known) > 1 else "mixed"
    return f"{value:g}"


def rank_alpha(record) -> tuple[str, str]:
    """The rank and alpha `inspect`, `show` and `register` give an adapter (an InspectReport or AdapterRecord with its
    modules): where modules differ, their range ('mixed (2–16)'; `list` has it from Reader.spans)."""
    modules = record.modules
    return (number(record.rank, len(modules), (m.rank for m in modules)),
            number(record.alpha, len(modules), (m.alpha for m in modules)))


def echo_fields(fields: Sequence[tuple[str, Any]]) -> None:
    """Aligned `key  value` lines, a value's control characters shown escaped (as table's cells)."""
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        click.echo(f"{key.ljust(width)}  {one_line(str(value))}")


def layer_kind(kind: str, kernel: Sequence[int] | None) -> str:
    """A layer kind for a table, a convolution's with its kernel (conv1x1, conv3x3): the kernel says which rank
    (--rank or --conv-rank) the conv takes."""
    return f"{kind}{'x'.join(map(str, kernel))}" if kernel else kind


def echo_modules(modules: Sequence[Any]) -> None:
    """The per-module table shared by `inspect` and `show` (ModuleRecord rows)."""
    echo_table(
        ["module", "kind", "rank", "alpha", "scale", "in", "out"],
        [(m.name, layer_kind(m.kind, m.kernel), "-" if m.rank is None else m.rank, f"{m.alpha:g}", f"{m.scale:.6g}", m.in_features, m.out_features) for m in modules],
    )


def not_again(asked: str | None, recorded: str, what: str) -> str:
    """The note for a --name that the registry did not use because the thing is already recorded under another
    (one record per identity: an adapter's bytes, a model's fingerprint), else ""."""
    if asked is None or asked == recorded:
        return ""
    return f"; not registered again as {asked!r}: one record per {what}, under its first name"
