"""`loraops combine`, `loraops resize`, `loraops export`: the adapter algebra on the command line."""
from __future__ import annotations

from typing import Iterable

import click

from .. import blocks
from . import DTYPE, FLOAT, INT, expect_output, one_line
from ..references import parse_weighted
from .render import METHODS, echo_json, echo_table, json_option, layer_kind, not_again

METHOD_HELP = ("cat (exact, ranks add up), linear / svd (weighted sum, --rank), ties, dare_ties, dare_linear, "
               "breadcrumbs, breadcrumbs_ties, della, della_linear, magnitude_prune, sce, nuslerp (two adapters, "
               "spherical), model_stock, multislerp (spherical, two or more)")

CONV_RANK_HELP = ("Rank of the k×k convolutions (kernel larger than 1×1; kohya's LoCon conv modules), --rank being the "
                  "others'; with --dynamic, their cap in place of --max-rank (default: the same rule for every module).")

DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda when available)."


def dtype_option(default: str):
    """--dtype of a written adapter (extract, combine, resize, export), its default said per command."""
    return click.option("--dtype", type=DTYPE,
                        help=f"dtype of the factors (default: {default}).")


block_weights_option = click.option(
    "--block-weights", multiple=True, metavar="W,W,...",
    help="Stable Diffusion LoRA block weights (sd-scripts' --lbws), once per adapter in order: 17 or 26 numbers (SD "
         "1.x/2.x) or 12 or 20 (SDXL), BASE (text encoders), then the IN, MID and OUT blocks; each block's ΔW is "
         "multiplied by its weight (and by the adapter's :WEIGHT). The LoRA Block Weight extension's preset names "
         "(ALL, NONE, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5) stand for its 17-weight SD 1.x/2.x lists.")

base_option = click.option("--base", metavar="BASE", help="Registered base the inputs are for (binds kohya names).")


def output_options(fn):
    """The options every algebra command shares for where its result goes."""
    options = [
        base_option,
        click.option("--name", help="Registry name of the result (default: from the inputs and the operation)."),
        click.option("-o", "--output", type=click.Path(), help="Also write the result here (PEFT folder, or .safetensors)."),
        click.option("--format", "fmt", type=click.Choice(["peft", "kohya", "diffusers"]),
                     help="Output layout (default: the inputs' format when they share one, else peft)."),
        click.option("--force", is_flag=True, help="Replace an existing output."),
        json_option("the DerivedRecord (registry record + report)"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def compute_options(fn):
    fn = click.option("--precise", is_flag=True, help="Compute in float64 (and re-factorize a dense delta by an exact SVD, never the randomized one).")(fn)
    return click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)(fn)


def echo_saved(result, name: str | None) -> None:
    """The result's registration line; ``name``: the --name asked for (said when an identical adapter holds
    another, as `register` says it)."""
    record = result.adapter
    state = "registered" if result.new else "already registered as"
    wrote = f"; wrote {one_line(result.output)}" if result.output else ""
    click.echo(f"{state} {record.ref} (id {record.id}, sha256 {record.sha256[:12]}), base "
               f"{record.base.name if record.base else '-'}" + wrote
               + ("" if result.new else not_again(name, record.name, "adapter")))


def echo_same_delta(source: str, why: str) -> None:
    """A note, not a refusal: the result's ΔW is its input's (registered as another adapter where its factors
    differ)."""
    click.echo(f"note: the result has the same ΔW as {source} ({why})")


def echo_capped(report, ranks: Iterable[tuple[int, bool]], ceiling: str) -> None:
    """One line for each fixed rank (--rank, --conv-rank) above the largest rank any module it ranks got (extract,
    resize, combine; extract's and resize's default name follows the ranks got: derive.rank_name). ``ranks``: (rank
    got, whether a k×k convolution) of every module; ``ceiling``: what bounds a module's rank."""
    if getattr(report, "dynamic", None) is not None:  # (a combine has no dynamic rule)
        return
    ranks = list(ranks)
    separate = report.conv_rank is not None
    for option, rank, which, modules in (("--rank", report.rank, "module", None if not separate else False),
                                         ("--conv-rank", report.conv_rank, "k×k convolution", True)):
        largest = max((r for r, spatial in ranks if modules in (None, spatial)), default=None)
        if rank is not None and largest is not None and largest < rank:
            click.echo(f"{option} {rank} capped: no {which} is larger than rank {largest} ({ceiling})")


def percent(value: float | None) -> str:
    """A share for the resize table; '-' when unknown (sum(S) kept after a randomized SVD)."""
    return "-" if value is None else f"{value:.2%}"


RECIPE_OWNS = ("inputs", "method", "density", "gamma", "epsilon", "rescale", "rescale_norm", "select_topk", "flatten",
               "row_wise", "filter_wise", "normalize", "lambda_", "normalize_weights", "eps")
"""combine's arguments a recipe gives: given beside --recipe, they are refused (the recipe is the one description of
the combination; its lineage says what was computed)."""


def recipe_arguments(ctx: click.Context, path: str):
    """The recipe at ``path``, after refusing the options it replaces."""
    from .. import derive
    from ..recipe import read_recipe

    for name in RECIPE_OWNS:
        if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
            option = next(p for p in ctx.command.params if p.name == name)
            shown = "the adapters (REF[:WEIGHT])" if name == "inputs" else "/".join(option.opts[-1:] + option.secondary_opts)
            raise click.UsageError(f"{shown} given with --recipe: the recipe gives the adapters, the method and its "
                                   "parameters (edit the recipe instead)")
    return read_recipe(path, derive.registered_base_folders)


@click.command()
@click.argument("inputs", nargs=-1, metavar="REF[:WEIGHT]...")
@click.option("--recipe", type=click.Path(dir_okay=False),
              help="A mergekit YAML configuration (merge_method, models with per-model weight/density/gamma/epsilon, "
                   "parameters, base_model, dtype, out_dtype) in place of the adapters, --method and its parameters.")
@click.option("-m", "--method", default="cat", show_default=True, help=METHOD_HELP + ".")
@click.option("--rank", type=INT, help="Output rank (linear/svd, nuslerp, model_stock, multislerp: default Σ ranks, "
                                       "lossless; element-wise, sce: largest input rank).")
@click.option("--conv-rank", type=INT, help="Output rank of the k×k convolutions (kernel larger than 1×1; sd-scripts' "
                                            "svd_merge_lora.py --new_conv_rank), --rank being the others'.")
@click.option("--density", type=FLOAT, help="Element-wise methods: fraction of each delta kept, in (0, 1].")
@click.option("--gamma", type=FLOAT,
              help="breadcrumbs*: fraction of each delta's largest-magnitude entries dropped (default 0.01, "
                   "lowered to 1 − density where it does not fit; a gamma given must fit: gamma + density ≤ 1).")
@click.option("--epsilon", type=FLOAT,
              help="della*: keep probabilities run from density − epsilon (smallest in a row) to density + epsilon "
                   "(largest), inside (0, 1) (default 0.15).")
@click.option("--seed", type=INT, help="dare_*, della*: seed of the random masks (default 0).")
@click.option("--rescale/--no-rescale", default=None,
              help="dare_*, della*: divide the kept entries by their keep probability (DARE's 1/density, DELLA's 1/p; "
                   "default on, the papers' and mergekit 2024's; --no-rescale is mergekit's rescale: false).")
@click.option("--rescale-norm", type=click.Choice(["l1", "l2", "linf"]),
              help="mergekit's methods (ties, dare_*, breadcrumbs*, della*): multiply each sparsified delta by "
                   "‖delta‖/‖sparsified‖ in this norm, per module (mergekit's current rescale, per tensor; its "
                   "rescale: true is l1); for dare_* and della* in place of the division by the keep probability.")
@click.option("--consensus", type=click.Choice(["sum", "count"]),
              help="Sign-elected methods (ties, dare_ties, breadcrumbs_ties, della, sce): elect each entry's sign from "
                   "the weighted sum of the deltas (sum, the default, TIES') or from a count of their signs (count).")
@click.option("--select-topk", type=FLOAT,
              help="sce: fraction of the entries kept, those whose weighted deltas vary most across the inputs, in "
                   "(0, 1] (default 1: all).")
@click.option("--flatten/--no-flatten", default=None,
              help="nuslerp: interpolate each module's delta as one vector (default), or each row of the base weight "
                   "(--no-flatten).")
@click.option("--row-wise", is_flag=True, default=None,
              help="nuslerp --no-flatten: interpolate each column of the base weight instead (mergekit's "
                   "nuslerp_row_wise: vectors along its first dimension).")
@click.option("--filter-wise", is_flag=True, default=None,
              help="model_stock: one interpolation ratio per row of the base weight (output channel) instead of one "
                   "per module.")
@click.option("--normalize/--no-normalize", default=None,
              help="Element-wise methods: divide by the weights of the inputs that contribute to each entry "
                   "(default: on for ties and della, off for the others, as mergekit; PEFT's *_svd methods always "
                   "divide).")
@click.option("--lambda", "lambda_", type=FLOAT,
              help="mergekit's methods (ties, dare_*, breadcrumbs*, della*): scale of the mixed result, applied after "
                   "--normalize (default 1).")
@click.option("--normalize-weights/--no-normalize-weights", default=None,
              help="multislerp: divide the weights by their sum (default on, as mergekit).")
@click.option("--eps", type=FLOAT,
              help="multislerp: mergekit's eps, added to each delta's norm (default 1e-8; 0: none).")
@block_weights_option
@dtype_option("the inputs' widest")
@compute_options
@output_options
@click.pass_context
def combine(ctx, inputs, recipe, method, rank, conv_rank, density, gamma, epsilon, seed, rescale, rescale_norm, consensus,
            select_topk, flatten, row_wise, filter_wise, normalize, lambda_, normalize_weights, eps, block_weights, dtype,
            device, precise, base, output, fmt, force, name, as_json) -> None:
    """Combine adapters (each REF a registry reference or a path, optionally :WEIGHT, default 1) into one,
    registered with its lineage; or the adapters of a mergekit recipe (--recipe)."""
    from .. import derive
    from ..ops.combine import rank_ceiling

    expect_output(output)

    given = (("density", density), ("gamma", gamma), ("epsilon", epsilon), ("seed", seed), ("rescale", rescale),
             ("rescale_norm", rescale_norm), ("consensus", consensus), ("select_topk", select_topk),
             ("flatten", flatten), ("row_wise", row_wise), ("filter_wise", filter_wise), ("normalize", normalize),
             ("lambda", lambda_), ("normalize_weights", normalize_weights), ("eps", eps))
    params = {key: value for key, value in given if value is not None}
    refs, base_model, source = None, None, None
    if recipe is not None:
        read = recipe_arguments(ctx, recipe)
        method, refs, base_model, source = read.method, read.inputs, read.base_model, read.source
        precise = precise or read.precise
        params = {**read.params, **params}  # params holds only what no recipe gives (seed, consensus)
        if None not in (dtype, read.dtype) and dtype != read.dtype:
            raise click.UsageError(f"--dtype {dtype} given with --recipe, whose out_dtype writes {read.dtype}: give "
                                   "one (edit the recipe or drop --dtype)")
        dtype = dtype or read.dtype
    elif not inputs:
        raise click.UsageError("give the adapters to combine (REF[:WEIGHT]...), or --recipe")
    result = derive.combine(refs or [parse_weighted(text) for text in inputs], method, params, rank=rank,
                            device=device, precise=precise, name=name, output=output, fmt=fmt, force=force, base=base,
                            base_model=base_model, conv_rank=conv_rank, dtype=dtype, block_weights=block_weights,
                            recipe=source)
    if as_json:
        echo_json(result)
        return
    report = result.report
    ranks = sorted({m.rank for m in report.modules})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    inputs_text = ", ".join(f"{i.ref}×{i.weight:g}{blocks.text(i.block_weights)}" for i in report.inputs)
    params_text = ", ".join(f"{k}={v}" for k, v in report.params.items())
    click.echo(f"{method}{f'({params_text})' if params_text else ''} of {inputs_text}")
    click.echo(f"{len(report.modules)} modules, rank {rank_text}, {report.parameters:,} parameters, {report.precision} on {report.device}, {report.seconds:.2f} s")
    click.echo(f"re-factorization error (relative Frobenius): max {report.error_max:.3g}, mean {report.error_mean:.3g}")
    echo_capped(report, ((m.rank, m.spatial) for m in report.modules), rank_ceiling(method))
    if method == "cat" and [(i.weight, i.block_weights) for i in report.inputs] == [(1, None)]:
        echo_same_delta(report.inputs[0].ref, "a cat of one adapter at weight 1")
    echo_saved(result, name)


@click.command()
@click.argument("ref")
@click.option("--rank", type=INT, help="New rank of every module (of all but the k×k convolutions with --conv-rank; rank can only go down).")
@click.option("--dynamic", type=click.Choice(["sv_ratio", "sv_cumulative", "sv_fro"]), help="kohya's dynamic rank rule.")
@click.option("--param", type=FLOAT, help="The dynamic rule's parameter (sv_ratio ≥ 1; sv_cumulative, sv_fro in (0, 1]).")
@click.option("--max-rank", type=INT, help="Cap of the dynamic rank.")
@click.option("--conv-rank", type=INT, help=CONV_RANK_HELP)
@dtype_option("the adapter's")
@compute_options
@output_options
def resize(ref, rank, dynamic, param, max_rank, conv_rank, dtype, device, precise, base, output, fmt, force, name,
           as_json) -> None:
    """Lower an adapter's rank (REF a registry reference or a path), keeping each module's scale (best low-rank
    approximation of every delta); the result is registered with its lineage."""
    from .. import derive

    expect_output(output)
    result = derive.resize(ref, rank=rank, dynamic=dynamic, param=param, max_rank=max_rank, conv_rank=conv_rank,
                           device=device,
                           precise=precise, name=name, output=output, fmt=fmt, force=force, base=base, dtype=dtype)
    if as_json:
        echo_json(result)
        return
    report = result.report
    echo_table(
        ["module", "kind", "rank", "new", "alpha", "fro kept", "sum(S) kept"],
        [(m.name, layer_kind(m.kind, m.kernel), m.rank_before, m.rank_after, f"{m.alpha_after:g}", f"{m.fro_retained:.2%}",
          percent(m.sum_retained)) for m in report.modules],
    )
    click.echo(f"average: fro kept {report.fro_retained_mean:.2%}, sum(S) kept {percent(report.sum_retained_mean)}; "
               f"parameters {report.parameters_before:,} → {report.parameters_after:,}; "
               f"{report.precision} on {report.device}, {report.seconds:.2f} s")
    echo_capped(report, ((m.rank_after, m.spatial) for m in report.modules), "min(its rank, out, in)")
    # a LoHa/LoKr module's rank is its product's r, not its ΔW's: kept, its ΔW may still be cut (fro kept < 1)
    if all(m.rank_after == m.rank_before and m.fro_retained >= 1 - 1e-6 for m in report.modules):
        echo_same_delta(result.adapter.lineage.inputs[0].ref, "every module keeps its rank; up to rounding")
    echo_saved(result, name)


@click.command()
@click.argument("ref")
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya", "diffusers"]), required=True, help="Output layout.")
@click.option("-o", "--output", type=click.Path(), required=True, help="Destination (PEFT folder, or .safetensors).")
@dtype_option("as stored")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@base_option
@json_option("the ExportReport")
def export(ref, fmt, output, dtype, force, base, as_json) -> None:
    """Write an adapter (registry reference or path) in another layout, same deltas. An unregistered kohya file
    needs --base to be written as PEFT (and a VeRA file in any layout). PEFT AdaLoRA and VeRA adapters are written as
    the plain LoRA they equal."""
    from .. import derive

    expect_output(output)
    report = derive.export(ref, fmt, output, force=force, base=base, dtype=dtype)
    if as_json:
        echo_json(report)
        return
    if report.left_out:
        click.echo(f"left out {', '.join(report.left_out)}: PEFT's saved embedding layer (save_embedding_layers), the "
                   "base's own values, which replace nothing")
    plain = " and ".join(METHODS[m] for m in report.plain_lora_of)
    note = (f": a plain LoRA with the {plain} adapter's ΔW (another adapter, of another identity; `register` it to "
            "record it)") if plain else ""
    click.echo(f"wrote {one_line(report.output)}{note}")
