"""`loraops extract`: a LoRA adapter from the difference between a fine-tuned model and its base."""
from __future__ import annotations

import click

from . import FLOAT, INT, expect_output
from .algebra import CONV_RANK_HELP, compute_options, dtype_option, echo_capped, echo_saved
from .render import echo_base_changed, echo_json, echo_table, human_bytes, json_option, layer_kind


def _names(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:  # taken as absent, "--modules ," extracted every module
        from ..errors import InvalidInputError

        raise InvalidInputError(f"{option} {text!r} names no module: give comma-separated module names")
    return names


@click.command()
@click.option("--base", "base", required=True, metavar="MODEL", help="The base model: a registered base, an HF folder or a .safetensors checkpoint.")
@click.option("--tuned", required=True, metavar="MODEL", help="The fine-tuned model (same tensor names and shapes).")
@click.option("--rank", type=INT, help="Rank of every module (of all but the k×k convolutions with --conv-rank).")
@click.option("--dynamic", type=click.Choice(["sv_ratio", "sv_cumulative", "sv_fro"]), help="kohya's dynamic rank rule, per module.")
@click.option("--param", type=FLOAT, help="The dynamic rule's parameter (sv_ratio ≥ 1; sv_cumulative, sv_fro in (0, 1]).")
@click.option("--max-rank", type=INT, help="Cap of the dynamic rank.")
@click.option("--conv-rank", type=INT, help=CONV_RANK_HELP)
@click.option("--modules", metavar="NAMES", help="Comma-separated module names to extract (default: every 2-D and conv weight that differs, embeddings left out).")
@click.option("--save-module", "save_modules", metavar="NAMES", help="Comma-separated modules stored whole (PEFT modules_to_save).")
@click.option("--alpha", type=FLOAT, help="LoRA alpha of every module (default: its rank, so scale 1).")
@dtype_option("the tuned model's")
@click.option("--keep-rounding", is_flag=True, help="Also extract tensors that differ only by the rounding between the two models' dtypes (left out by default).")
@compute_options
@click.option("--name", help="Registry name of the result (default: TUNED-rK or TUNED-RULEP).")
@click.option("-o", "--output", type=click.Path(), help="Also write the adapter here (PEFT folder, or kohya .safetensors).")
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya"]), help="Output layout (default peft; kohya for a single-file SD/SDXL/FLUX/SD3 checkpoint).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@json_option("the DerivedRecord (registry record + ExtractReport)")
def extract(base, tuned, rank, dynamic, param, max_rank, conv_rank, modules, save_modules, alpha, dtype, keep_rounding, device,
            precise, name, output, fmt, force, as_json) -> None:
    """Extract the LoRA adapter of TUNED − BASE (a truncated SVD of each weight's difference), registered against
    the base with its lineage."""
    from .. import derive

    expect_output(output)
    result = derive.extract(base, tuned, rank=rank, dynamic=dynamic, param=param, max_rank=max_rank, conv_rank=conv_rank,
                            alpha=alpha,
                            modules=_names(modules, "--modules"), save_modules=_names(save_modules, "--save-module"), device=device, precise=precise,
                            dtype=dtype, keep_rounding=keep_rounding, name=name, output=output, fmt=fmt, force=force)
    if as_json:
        echo_json(result)
        return
    report = result.report
    echo_table(
        ["module", "kind", "shape", "rank", "alpha", "error", "fro kept"],
        [(m.name, layer_kind(m.kind, m.shape[2:] if m.kind == "conv" else None), "×".join(map(str, m.shape)), m.rank,
          f"{m.alpha:g}", f"{m.error:.2e}", f"{m.fro_retained:.2%}") for m in report.modules],
    )
    if report.modules:
        click.echo(f"average: relative error {report.error_mean:.2e} (max {report.error_max:.2e}), fro kept "
                   f"{report.fro_retained_mean:.2%}")
    count = "1 module" if len(report.modules) == 1 else f"{len(report.modules)} modules"
    click.echo(f"{count}, {report.parameters:,} parameters ({report.dtype}); {report.identical} "
               f"tensors identical; {report.precision} on {report.device}, {report.seconds:.2f} s, peak RSS "
               f"{human_bytes(report.peak_rss_bytes)}")
    echo_capped(report, ((m.rank, m.spatial) for m in report.modules), "min(out, in)")
    if report.saved:
        click.echo(f"stored whole (modules_to_save): {', '.join(report.saved)}")
    if report.skipped:
        worst = max(report.skipped, key=lambda s: s.max_abs_diff)
        kinds = sorted({s.reason for s in report.skipped})
        count = "1 tensor that differs" if len(report.skipped) == 1 else f"{len(report.skipped)} tensors that differ"
        click.echo(f"not extracted: {count} ({', '.join(kinds)}); largest |Δ| {worst.max_abs_diff:.3g} in "
                   f"{worst.name}; keep them with --save-module (embeddings, weights: --modules)")
    for head, embeddings in report.untied_heads.items():
        how = "stored whole" if head in report.saved else "extracted as its change from those embeddings"
        click.echo(f"{head}: tied to {embeddings} in {report.base_ref}, stored apart in {report.tuned_ref}: {how} "
                   "(a merge unties it)")
    if report.rounding:
        worst = max(report.rounding, key=lambda s: s.max_abs_diff)
        count = "1 tensor" if len(report.rounding) == 1 else f"{len(report.rounding)} tensors"
        adds = len(report.rounding_targets)  # the others are no targets (norms, outside --modules…) either way
        hint = ("" if not adds else "; --keep-rounding extracts them" if adds == len(report.rounding)
                else f"; --keep-rounding extracts {adds} of them")
        click.echo(f"not extracted: {count} that differ only by the rounding between the models' dtypes "
                   f"({', '.join(sorted({s.reason for s in report.rounding}))}); largest |Δ| {worst.max_abs_diff:.3g} "
                   f"in {worst.name}{hint}")
    if report.peft_names and fmt != "kohya":
        shown = ", ".join(f"{saved} → {memory}" for saved, memory in list(report.peft_names.items())[:3])
        more = f" (+{len(report.peft_names) - 3} more)" if len(report.peft_names) > 3 else ""
        click.echo(f"PEFT names as transformers loads the base: {shown}{more}")
    for warning in report.warnings if fmt != "kohya" else ():
        click.echo(f"warning: {warning}", err=True)
    echo_base_changed(*report.base_changed)
    echo_saved(result, name)
