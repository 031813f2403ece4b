"""`loraops inspect PATH`: describe an adapter file or folder (no registry needed)."""
from __future__ import annotations

import click

from . import FLOAT
from ..adapter import token_rows_phrase
from .render import echo_json, echo_modules, human_bytes, json_option, rank_alpha, scale_mode, variants

METADATA_SHOWN = 12
VALUE_WIDTH = 60
BASE_KEYS = ("ss_sd_model_name", "modelspec.architecture")
"""Where a kohya file names the model it was trained on (sd-scripts' metadata), for the `base model` line: the first
12 metadata keys shown rarely reach them."""


@click.command()
@click.argument("path", type=click.Path())
@click.option("--alpha", type=FLOAT, help="LoRA alpha: for a bare PEFT .safetensors that does not record one, or replacing the one a file records.")
@json_option("the InspectReport record")
def inspect(path: str, alpha: float | None, as_json: bool) -> None:
    """Show an adapter's format, modules, ranks, alphas, scales, dtype, parameters and metadata."""
    from ..inspect import inspect_path

    report = inspect_path(path, alpha=alpha)
    if as_json:
        echo_json(report)
        return
    summary = [
        ("path", report.path),
        ("format", report.format + ("" if report.names_resolved else " (kohya names, resolved against a base on use)")),
        ("identity", report.identity),
        ("size", human_bytes(report.size)),
        ("dtype", report.dtype),
        ("modules", str(report.num_modules)),
        *zip(("rank", "alpha"), rank_alpha(report), strict=True),
        ("scale mode", scale_mode(report)),
        *variants(report, report.lora_bias),
        ("targets", (", ".join(report.target_modules) or "-") if report.names_resolved
         else f"{report.num_modules} kohya names"),
        ("parameters", f"{report.num_parameters:,}"),
        ("base model", report.base_model or next((f"{report.metadata[k]} (metadata {k})" for k in BASE_KEYS
                                                  if report.metadata.get(k)), "-")),
    ]
    summary += [("tokens", token_rows_phrase(name, indices)) for name, indices in report.trainable_tokens.items()]
    if report.full_tensors:
        summary.append(("full tensors", ", ".join(report.full_tensors)))
    width = max(len(k) for k, _ in summary)
    for key, value in summary:
        click.echo(f"{key.ljust(width)}  {value}")
    if report.metadata:
        click.echo("metadata:")
        for key, value in sorted(report.metadata.items())[:METADATA_SHOWN]:
            value = value if len(value) <= VALUE_WIDTH else value[: VALUE_WIDTH - 1] + "…"
            click.echo(f"  {key} = {value}")
        if len(report.metadata) > METADATA_SHOWN:
            click.echo(f"  … {len(report.metadata) - METADATA_SHOWN} more (see --json)")
    if report.modules:  # (as show: an adapter of PEFT trainable tokens alone has no LoRA module to tabulate)
        click.echo()
        echo_modules(report.modules)
