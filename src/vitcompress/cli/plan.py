"""`vitcompress plan`: choose static layers and token reductions for a speed-up budget."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from vitcompress.cli._app import app
from vitcompress.plan_types import DEFAULT_CALIBRATION_IMAGES, SEARCH_IMAGES
from vitcompress.cli._common import (
    AllowBelowOpt,
    BatchSizeOpt,
    CheckpointOpt,
    DataOpt,
    ModelArg,
    NumClassesOpt,
    RandomInitOpt,
    RetimeOpt,
    SlowerAtBatch1Opt,
    check_output_folder,
    fail,
    handle_errors,
    model_or_demo,
    note,
    out,
)

BudgetOpt = Annotated[
    str, typer.Option("--budget", help="Target: a speed-up (2x, 1.5x) or a share of the original cost (50%).")
]
MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        help="What to search: auto (default: every method, keep what measures best), dgssa-glad (static "
        "attention + token aggregation), dgssa, glad or tome (token merging).",
    ),
]
AnalysisOpt = Annotated[
    Optional[Path],
    typer.Option("--analysis", help="An analysis (folder or analysis.json) to plan from (default: the one in --out, if any)."),
]
NoCalibrateOpt = Annotated[
    bool, typer.Option("--no-calibrate", help="Do not time candidates: predict the speed-up from FLOPs alone.")
]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads to time with (default: torch's).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="Where the model will run, which candidates are timed on: cpu or cuda.")]
CalibOpt = Annotated[
    int,
    typer.Option("--calibration-images", min=0,
                 help="Training images to measure damage on (KL to the original): the search ranks candidates on the "
                 f"first {SEARCH_IMAGES}, neighbouring plans are told apart on all of them; 0: use the analysis proxy."),
]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Folder for plan.json (default ./vitcompress-out/<model>/).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the plan as JSON instead of a table.")]


@app.command("plan")
@handle_errors
def plan_command(
    model: ModelArg = None,
    budget: BudgetOpt = "2x",
    method: MethodOpt = "auto",
    data: DataOpt = None,
    calibration_images: CalibOpt = DEFAULT_CALIBRATION_IMAGES,
    analysis: AnalysisOpt = None,
    no_calibrate: NoCalibrateOpt = False,
    batch_size: BatchSizeOpt = 32,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    out_dir: OutOpt = None,
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    num_classes: NumClassesOpt = None,
    allow_below_budget: AllowBelowOpt = False,
    allow_slower_at_batch_1: SlowerAtBatch1Opt = False,
    retime: RetimeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Choose what to compress so that the measured speed-up meets --budget at the least damage.

    Damage is measured on --calibration-images images of the training split of --data (the model's
    own demo data for the demo): KL between the original's and the candidate's predictions. Speed
    is measured: the candidates that could be chosen are converted and timed against the original
    on --device at --batch-size with --threads. Prints the plan (per block: kind, tokens, FLOPs,
    measured damage of each change) and writes plan.json. The chosen plan is also timed at batch 1:
    one slower than the original there is set aside for the best plan that is not (unless
    --allow-slower-at-batch-1). Timings this machine stored for the same model and deployment are
    reused, so the same command gives the same plan (--retime: time afresh). When the budget cannot be met it shows
    the fastest plan and exits with code 2, unless --allow-below-budget.
    """
    from vitcompress.plan_types import METHODS, Budget

    Budget.parse(budget)  # a bad budget, method or folder fails before torch, timm and the model load
    if method not in METHODS:
        fail(f"--method {method!r} is not one of {', '.join(METHODS)}: choose one of them (see `vitcompress plan --help`)")
    check_output_folder(out_dir, "--out")

    from vitcompress.models import load_model
    from vitcompress.names import PLAN_JSON, output_dir_for
    from vitcompress.plan import Deployment, budget_met, make_plan, save_plan, unreachable_message

    name = model_or_demo(model)
    net, spec = load_model(name, checkpoint=checkpoint, random_init=random_init, num_classes=num_classes)
    folder = out_dir if out_dir is not None else output_dir_for(name)
    calibration = _calibration(name, data, spec, calibration_images)  # bad --data fails before any note
    recorded = _find_analysis(analysis, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the unreachable budget is reported below
        plan = make_plan(
            net, recorded, budget, method=method, calibration=calibration,
            attention_means=getattr(recorded, "attention_means", None),
            deployment=Deployment(device=device, batch_size=batch_size, threads=threads,
                                  batch1_floor=None if allow_slower_at_batch_1 else 1.0),
            measure_speed=not no_calibrate, reuse_timings=not retime, log=note,
        )
    met = budget_met(plan)
    if as_json:
        out.print_json(json.dumps(plan.to_dict()))
    else:
        _print_plan(name, plan, recorded)
    if not met and not allow_below_budget:
        fail(f"{unreachable_message(plan)}: ask for a smaller budget, or pass --allow-below-budget to write this plan")
    path = save_plan(plan, folder / PLAN_JSON)
    if not met:
        note(f"[yellow]warning:[/] {unreachable_message(plan)}; writing it anyway (--allow-below-budget)")
    note(f"plan written to {path}")


def _calibration(name: str, data: Optional[str], spec: Any, count: int) -> Any:
    """Calibration images from the training split (the demo's own data for the demo), or None."""
    if count == 0:
        note("--calibration-images 0: damage from the analysis proxy, not measured")
        return None
    source = data if data is not None else ("demo" if name == "demo" else None)
    if source is None:
        note("no --data: damage from the analysis proxy (pass --data to measure it on training images)")
        return None
    from vitcompress.pipeline import calibration_images, load_train_val

    train, _ = load_train_val(source, spec.data_config, log=note)
    images = calibration_images(train, count)
    note(f"calibration images: {images.shape[0]} of {train.source} (split '{train.split}')")
    return images


def _find_analysis(analysis: Optional[Path], folder: Path) -> Any:
    """The analysis to plan from: --analysis, else the one in the output folder, else None."""
    from vitcompress.analyze import load_analysis

    if analysis is not None:
        result = load_analysis(analysis)
        note(f"planning from the analysis in {analysis}")
        return result
    from vitcompress.names import ANALYSIS_JSON

    if (folder / ANALYSIS_JSON).is_file():
        note(f"planning from the analysis in {folder / ANALYSIS_JSON} (pass --analysis to use another)")
        return load_analysis(folder)
    note(
        f"no analysis in {folder}/: planning without one (static attention in the first layers); "
        f"run `vitcompress analyze` first for a plan that follows the model's own attention"
    )
    return None


def _print_plan(name: str, plan: Any, analysis: Any) -> None:
    from vitcompress.plan import noisy_timing_message
    from vitcompress.timing import setting_text

    p, m = plan.predicted, plan.measured
    table = Table(title=f"plan for {name}: budget {plan.budget} ({plan.method})")
    for column in ("block", "kind", "tokens", "merge", "GFLOPs/img", "damage (KL)"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    if analysis is not None:
        table.add_column("similarity", justify="right")
    layers = {layer.index: layer for layer in getattr(analysis, "layers", [])}
    glads = {r.before_block: r for r in plan.reductions}
    damage = {d["change"]: d["kl"] for d in m.get("part_damage", [])}
    previous = plan.num_prefix_tokens + plan.grid[0] * plan.grid[1]
    for i in range(plan.num_blocks):
        if i in glads:
            r = glads[i]
            kl = damage.get(f"GLAD {list(r.scales)} before block {i}")
            table.add_row("", f"[cyan]GLAD {r.scales}[/]", f"{previous} -> {p['tokens_per_block'][i]}", "", "",
                          _kl(kl), *([""] if analysis is not None else []))
        kind = p["block_kinds"][i]
        kl = damage.get(f"static attention in block {i}") if kind == "static" else None
        row = [str(i), "[green]static[/]" if kind == "static" else "dynamic", str(p["tokens_per_block"][i]),
               str(p["merge_r"][i] or ""), _g(p["block_flops"][i]), _kl(kl)]
        if analysis is not None:
            layer = layers.get(i)
            row.append(f"{layer.similarity_mean:.3f}" if layer is not None else "-")
        table.add_row(*row)
        previous = p["tokens_per_block"][i] - p["merge_r"][i]
    out.print(table)
    _say(f"FLOPs/image: {_g(p['base_flops'])} -> {_g(p['flops'])} G ({p['flop_speedup']:.2f}x); "
         f"params: {p['base_params'] / 1e6:.3f} -> {p['params'] / 1e6:.3f} M")
    whole = m.get("damage")
    _say(f"damage: {p['damage_estimate']:.4f} estimated ({p['damage_source']})"
         + (f", {whole['kl']:.4f} measured on the whole plan (KL), top-1 agreement {100 * whole['agreement']:.1f}% "
            f"on {whole['images']} images" if whole else ""))
    status = "[green]met[/]" if m["budget_met"] else "[red]NOT met[/]"
    if m.get("speedup") is not None:
        d, s = m["deployment"], m["speed"]
        _say(f"speed-up: {p['speedup']:.2f}x predicted, {m['speedup']:.2f}x measured (quartiles {s['speedup_q25']:.2f}-"
             f"{s['speedup_q75']:.2f}; {setting_text(d['batch_size'], d['threads'], d['device'])}; "
             f"{len(m['timed'])} candidate(s) timed); budget {plan.budget} ({p['target_speedup']:.2f}x): {status}")
        for tie in m.get("near_ties", []):
            _say(f"[yellow]near-tie:[/] {tie['plan']} is less damaging (KL {tie['kl_less']:.4f} less, standard error "
                 f"{tie['kl_less_se']:.4f}, on {tie['images']} images) but timed {tie['speedup']:.2f}x "
                 f"(upper quartile {tie['speedup_q75']:.2f}x): the timing decided, a fresh timing (--retime) may choose it")
        if m.get("near_tie") and not m.get("near_ties"):
            _say("[yellow]note:[/] the measured speed-up is within timing noise of the budget: a fresh timing (--retime) "
                 "may choose another plan")
        timings = m.get("timings")
        if timings and timings["reused"]:
            _say(f"timings: {timings['reused']} reused from this machine's timing cache, {timings['measured']} measured "
                 f"({timings['cache']}; --retime measures afresh)")
        noisy = noisy_timing_message(plan)
        if noisy:
            _say(f"[yellow]warning:[/] {noisy}")
        for other in m.get("slower_at_batch1", []):
            _say(f"set aside: {other['plan']} ({other['speedup']:.2f}x at batch {d['batch_size']}, "
                 f"{other['batch1_speedup']:.2f}x at batch 1, upper quartile {other['batch1_speedup_q75']:.2f}x: "
                 f"slower than the original on single images)")
        single = m.get("batch1")
        if single and d["batch_size"] != 1:
            _say(f"at batch 1: {single['speedup']:.2f}x measured (quartiles {single['speedup_q25']:.2f}-"
                 f"{single['speedup_q75']:.2f})" + _batch1_verdict(m, single))
    else:
        _say(f"speed-up: {p['speedup']:.2f}x predicted from FLOPs (not timed); budget {plan.budget} "
             f"({p['target_speedup']:.2f}x): {status}")
    out.print(f"[dim]{p['candidates']} candidates; {p['selection']}[/]", highlight=False, soft_wrap=True)


def _batch1_verdict(measured: dict, single: dict) -> str:
    if measured.get("batch1_within_spread"):
        return (": within the timing's spread of the original, so not measurably slower and kept "
                "[yellow](a fresh timing, --retime, may measure it either side of 1.00x)[/]")
    if single["speedup"] < 1.0:
        return " [yellow](slower than the original: plan with --batch-size 1 to serve single images)[/]"
    return ""


def _say(text: str) -> None:
    out.print(text, highlight=False, soft_wrap=True)


def _kl(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4f}"


def _g(flops: float) -> str:
    return f"{flops / 1e9:.3f}"

