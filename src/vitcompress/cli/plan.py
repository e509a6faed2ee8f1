"""`vitcompress plan`: choose static layers and token reductions for a speed-up budget."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from vitcompress.cli._app import app
from vitcompress.cli._common import (
    BatchSizeOpt,
    CheckpointOpt,
    ModelArg,
    NumClassesOpt,
    RandomInitOpt,
    fail,
    handle_errors,
    model_or_demo,
    note,
    out,
)

BudgetOpt = Annotated[
    str, typer.Option("--budget", help="Target: a speed-up (2x, 1.5x) or a share of the original cost (50%).")
]
AnalysisOpt = Annotated[
    Optional[Path],
    typer.Option("--analysis", help="An analysis (folder or analysis.json) to plan from (default: the one in --out, if any)."),
]
NoCalibrateOpt = Annotated[
    bool, typer.Option("--no-calibrate", help="Predict from FLOPs alone instead of timing the model's parts (a few seconds).")
]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads to calibrate with (default: torch's).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Folder for plan.json (default ./vitcompress-out/<model>/).")]
AllowBelowOpt = Annotated[
    bool,
    typer.Option("--allow-below-budget", help="If the budget cannot be met, write the fastest plan anyway (exit 0)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the plan as JSON instead of a table.")]


@app.command("plan")
@handle_errors
def plan_command(
    model: ModelArg = None,
    budget: BudgetOpt = "2x",
    analysis: AnalysisOpt = None,
    no_calibrate: NoCalibrateOpt = False,
    batch_size: BatchSizeOpt = 32,
    threads: ThreadsOpt = None,
    out_dir: OutOpt = None,
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    num_classes: NumClassesOpt = None,
    allow_below_budget: AllowBelowOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Plan which blocks get static attention and where tokens are aggregated to meet --budget.

    Prints the plan (per block: kind, tokens, predicted cost) and writes plan.json. With
    calibration the chosen plan is also converted and timed against the original model, and the
    plan is judged on that measured speed-up (see make_plan). When the
    budget cannot be met it shows the fastest plan and exits with code 2, unless
    --allow-below-budget (then that plan is written).
    """
    from vitcompress.models import load_model
    from vitcompress.pipeline import output_dir_for
    from vitcompress.plan import make_plan, parse_budget, save_plan, unreachable_message

    parse_budget(budget)  # a bad budget fails before the model loads
    name = model_or_demo(model)
    net, _ = load_model(name, checkpoint=checkpoint, random_init=random_init, num_classes=num_classes)
    folder = out_dir if out_dir is not None else output_dir_for(name)
    recorded = _find_analysis(analysis, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the unreachable budget is reported below
        plan = make_plan(
            net, recorded, budget, calibrate=not no_calibrate, batch_size=batch_size, threads=threads, log=note
        )
    met = bool(plan.predicted["budget_met"])
    if as_json:
        out.print_json(json.dumps(plan.to_dict()))
    else:
        _print_plan(name, plan, recorded)
    if not met and not allow_below_budget:
        fail(f"{unreachable_message(plan)}: ask for a smaller budget, or pass --allow-below-budget to write this plan")
    path = save_plan(plan, folder / "plan.json")
    if not met:
        note(f"[yellow]warning:[/] {unreachable_message(plan)}; writing it anyway (--allow-below-budget)")
    note(f"plan written to {path}")


def _find_analysis(analysis: Optional[Path], folder: Path) -> Any:
    """The analysis to plan from: --analysis, else the one in the output folder, else None."""
    from vitcompress.analyze import load_analysis

    if analysis is not None:
        result = load_analysis(analysis, load_means=False)
        note(f"planning from the analysis in {analysis}")
        return result
    if (folder / "analysis.json").is_file():
        note(f"planning from the analysis in {folder / 'analysis.json'} (pass --analysis to use another)")
        return load_analysis(folder, load_means=False)
    note(
        f"no analysis in {folder}/: planning without one (static attention in the first layers); "
        f"run `vitcompress analyze` first for a plan that follows the model's own attention"
    )
    return None


def _print_plan(name: str, plan: Any, analysis: Any) -> None:
    p = plan.predicted
    calibrated = bool(p.get("calibrated"))
    table = Table(title=f"plan for {name}: budget {plan.budget}")
    for column in ("block", "kind", "tokens", "GFLOPs/img") + (("ms/batch",) if calibrated else ()):
        table.add_column(column, justify="right" if column not in ("kind",) else "left")
    if analysis is not None:
        table.add_column("similarity", justify="right")
        table.add_column("rank90/N", justify="right")
    layers = {layer.index: layer for layer in getattr(analysis, "layers", [])}
    glads = {r.before_block: (k, r) for k, r in enumerate(plan.reductions)}
    previous = plan.num_prefix_tokens + plan.grid[0] * plan.grid[1]
    for i in range(plan.num_blocks):
        if i in glads:
            k, r = glads[i]
            row = ["", f"[cyan]GLAD {r.scales}[/]", f"{previous} -> {plan.tokens_per_block()[i]}", _g(p["glad_flops"][k])]
            row += [_ms(p["glad_ms"][k])] if calibrated else []
            table.add_row(*row, *([""] * 2 if analysis is not None else []))
        kind = p["block_kinds"][i]
        row = [str(i), "[green]static[/]" if kind == "static" else "dynamic", str(p["tokens_per_block"][i]), _g(p["block_flops"][i])]
        row += [_ms(p["block_ms"][i])] if calibrated else []
        if analysis is not None:
            layer = layers.get(i)
            row += [f"{layer.similarity_mean:.3f}", f"{layer.rank90_norm:.3f}"] if layer is not None else ["-", "-"]
        table.add_row(*row)
        previous = p["tokens_per_block"][i]
    out.print(table)
    out.print(
        f"FLOPs/image: {_g(p['base_flops'])} -> {_g(p['flops'])} G ({p['flop_speedup']:.2f}x); "
        f"params: {p['base_params'] / 1e6:.3f} -> {p['params'] / 1e6:.3f} M",
        highlight=False,
        soft_wrap=True,
    )
    if calibrated:
        out.print(
            f"latency per batch of {p['batch_size']} on {p['device']}, {p['threads']} threads: "
            f"{p['base_latency_ms']:.1f} -> {p['latency_ms']:.1f} ms ({p['latency_speedup']:.2f}x)",
            highlight=False,
            soft_wrap=True,
        )
    status = "[green]met[/]" if p["budget_met"] else "[red]NOT met[/]"
    if p.get("verified"):
        # The plan is judged on the measured figure; the calibrated latency prediction is shown beside it.
        out.print(
            f"verified speed-up {p['measured_speedup']:.2f}x measured (converted vs original model, interleaved; "
            f"calibrated latency predicted {p['latency_speedup']:.2f}x, "
            f"{len(p.get('verification', []))} plan(s) timed); budget {plan.budget} ({p['target_speedup']:.2f}x): {status}",
            soft_wrap=True,
        )
    else:
        source = "calibrated latency" if calibrated else "FLOPs (--no-calibrate)"
        out.print(
            f"predicted speed-up {p['speedup']:.2f}x from {source}; budget {plan.budget} ({p['target_speedup']:.2f}x): {status}",
            soft_wrap=True,
        )
    out.print(f"[dim]{p['selection']}[/]", highlight=False, soft_wrap=True)


def _g(flops: float) -> str:
    return f"{flops / 1e9:.3f}"


def _ms(ms: float) -> str:
    return f"{ms:.1f}"
