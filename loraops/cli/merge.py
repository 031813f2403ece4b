"""`loraops merge` and `loraops subtract`: adapters into (or out of) base weights, streamed to a new model."""
from __future__ import annotations

import click

from .. import blocks
from . import DTYPE, expect_output
from .algebra import DEVICE_HELP, block_weights_option
from .render import component_marks, echo_base_changed, echo_json, human_bytes, json_option, not_again

transformer_2_option = click.option(
    "--transformer-2", "transformer_2", multiple=True, metavar="REF[:WEIGHT]",
    help="An adapter for the second transformer of a Wan 2.2 pipeline folder (transformer_2/, the low-noise expert; "
         "diffusers' load_into_transformer_2), repeatable; the REF[:WEIGHT] arguments go to its transformer/.")


def _options(fn):
    """The options merge and subtract share."""
    for option in reversed([
        click.option("-o", "--output", required=True, type=click.Path(), help="Output folder (or .safetensors file for a single-file model)."),
        click.option("--dtype", type=DTYPE, help="Output dtype of the floating tensors (default: as stored)."),
        click.option("--device", default="auto", show_default=True, help=DEVICE_HELP),
        click.option("--precise", is_flag=True, help="Accumulate in float64 instead of float32 (still rounded once)."),
        click.option("--force", is_flag=True, help="Replace an existing output."),
        click.option("--name", help="Registry name for the output (default: its folder or file name)."),
        click.option("--no-record", is_flag=True, help="Do not record the output in the registry (skips fingerprinting it; references are still looked up)."),
        json_option("the MergeReport"),
    ]):
        fn = option(fn)
    return fn


@click.command()
@click.argument("adapters", nargs=-1, metavar="[REF[:WEIGHT]]...")
@click.option("--into", "base", required=True, metavar="BASE", help="Base model: registered base or path.")
@transformer_2_option
@block_weights_option
@_options
def merge(adapters, base, transformer_2, block_weights, output, dtype, device, precise, force, name, no_record,
          as_json) -> None:
    """Merge adapters into a base: W' = W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ, rounded once. REF is a registry reference or a path; a
    trailing :WEIGHT weights it (default 1, negative negates). An FP8 base (fine-grained, as DeepSeek-V3) stays FP8 with
    new block scales, or comes out dequantized with --dtype; with no adapters, --dtype alone converts the base."""
    from .. import merging

    expect_output(output, not no_record)
    report = merging.merge(base, adapters, output, name=name, record=not no_record, dtype=dtype, device=device,
                          precise=precise, force=force, block_weights=block_weights, transformer_2=transformer_2)
    _render(report, as_json, name)


@click.command()
@click.argument("adapters", nargs=-1, metavar="REF[:WEIGHT]...")
@click.option("--from", "model", required=True, metavar="MODEL", help="Merged model: registered base or path.")
@click.option("--exact", is_flag=True, help="Rebuild from the recorded pristine base instead of subtracting (bit-exact).")
@transformer_2_option
@block_weights_option
@_options
def subtract(adapters, model, exact, transformer_2, block_weights, output, dtype, device, precise, force, name,
             no_record, as_json) -> None:
    """Subtract adapters from a merged model: W − Σ wᵢ·sᵢ·Bᵢ·Aᵢ, and report the residual left. In bf16/fp16 a
    merge+subtract round trip is never bit-exact; --exact restores the recorded base instead."""
    from .. import merging

    if not adapters and not transformer_2:
        raise click.UsageError("give the adapters to subtract (REF[:WEIGHT]...), or --transformer-2 ones")
    expect_output(output, not no_record)
    report = merging.subtract(model, adapters, output, exact=exact, name=name, record=not no_record, dtype=dtype,
                             device=device, precise=precise, force=force, block_weights=block_weights,
                             transformer_2=transformer_2)
    _render(report, as_json, name)


def _render(report, as_json: bool, name: str | None) -> None:
    if as_json:
        echo_json(report)
        return
    verb = {"merge": "merged", "subtract": "subtracted", "restore": "restored"}[report.operation]
    marks = component_marks([a.component for a in report.adapters])
    adapters = ", ".join(f"{a.ref}:{a.weight:g}{blocks.text(a.block_weights)}{mark}"
                         for a, mark in zip(report.adapters, marks, strict=True))
    if report.operation == "restore":
        adapters = report.base_path + (f" + {adapters}" if adapters else "")
    rate = report.bytes_written / report.seconds if report.seconds else 0
    click.echo(
        f"{verb} {adapters or 'nothing'} → {report.output}: {report.tensors_merged} tensors "
        f"{'merged' if report.operation == 'merge' else 'changed'}, "
        f"{report.tensors_copied} copied" + (f", {report.tensors_replaced} replaced" if report.tensors_replaced else "")
        + (f", {report.tensors_converted} converted" if report.tensors_converted else "")
        + f"; {human_bytes(report.bytes_written)} in {report.seconds:.2f} s ({human_bytes(rate)}/s), "
        f"{report.dtype} on {report.device}, peak memory {human_bytes(report.peak_rss_bytes)}"
    )
    if report.heads_untied:
        click.echo(f"untied {', '.join(report.heads_untied)} from the input embeddings (the adapters change one "
                   "without the other): written as its own tensor, config.json says tie_word_embeddings: false")
    if report.files_left_out:
        click.echo(f"left out {', '.join(report.files_left_out)}: other copies of the base's weights, not merged")
    if report.residual is not None:
        r = report.residual
        if report.operation == "restore":
            click.echo(r.note)
        elif r.compared_to is not None and r.elements_differing is not None:
            click.echo(f"residual vs {r.compared_to}: {r.elements_differing:,} of {r.elements:,} elements differ "
                       f"(max |Δ| {r.max_abs_diff:.3g}); {r.note}")
        else:
            click.echo(f"residual: largest rounding {r.rounding_max_abs:.3g}; {r.note}")
    echo_base_changed(report.base_changed)
    if report.already_registered:
        click.echo(f"{report.output} holds the same weights as the registered base {report.name} (fingerprint "
                   f"{report.fingerprint[:12]}): not registered again"
                   + ("" if name in (None, report.name) else
                      f" as {name!r} (one record per model, under its first name)"))
    elif report.name:
        click.echo(f"recorded as base {report.name} (fingerprint {report.fingerprint[:12]})"
                   + not_again(name, report.name, "model (its fingerprint)"))
