"""`vitcompress compress`, `vitcompress finetune` and `vitcompress export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from vitcompress.cli._app import app
from vitcompress.plan_types import DEFAULT_CALIBRATION_IMAGES, SEARCH_IMAGES
from vitcompress.errors import VitcompressError
from vitcompress.cli._common import (
    AllowBelowOpt,
    CheckpointOpt,
    DataOpt,
    ImageColumnOpt,
    LabelColumnOpt,
    ModelArg,
    RandomInitOpt,
    RetimeOpt,
    SlowerAtBatch1Opt,
    WorkersOpt,
    check_output_file,
    check_output_folder,
    handle_errors,
    note,
    out,
)

# ---- options ---------------------------------------------------------------------------------
EpochsOpt = Annotated[Optional[float], typer.Option("--epochs", min=0, help="Fine-tuning epochs (default 1, 5 on the demo data; fractions allowed).")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", min=1, help="Fine-tuning optimizer steps, instead of --epochs.")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate of AdamW (default 2e-4).")]
FtBatchOpt = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Images per process per forward (default 64).")]
AccumOpt = Annotated[Optional[int], typer.Option("--accum-steps", min=1, help="Gradient accumulation steps (default 1).")]
CeOpt = Annotated[Optional[float], typer.Option("--ce-weight", min=0, help="Weight of label cross-entropy (default 1).")]
KdOpt = Annotated[Optional[float], typer.Option("--kd-weight", min=0, help="Weight of logit distillation (default 1).")]
KdTOpt = Annotated[Optional[float], typer.Option("--kd-temperature", help="Distillation temperature (default 2).")]
AttnOpt = Annotated[Optional[float], typer.Option("--attn-weight", min=0, help="Weight of the dynamic attention guidance (default 1).")]
GuidanceOpt = Annotated[Optional[str], typer.Option("--guidance", help="Dynamic guidance of static layers: output (distil each static layer's per-image output, default), map (KL to the teacher's maps) or none.")]
FeatOpt = Annotated[Optional[float], typer.Option("--feat-weight", min=0, help="Weight of the feature loss of GLAD plans (default 0).")]
FeatAtOpt = Annotated[Optional[str], typer.Option("--feat-at", help="Where the feature loss compares: glad (prefix and mean token at each GLAD output, default) or last-block (every token out of the last block against the teacher's, aggregated by the same stages).")]
AugmentOpt = Annotated[Optional[str], typer.Option("--augment", help="auto, flip-shift, shift or none (default auto: shift on the demo digits).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed of data order and augmentation (default 0).")]
WorkdirOpt = Annotated[Optional[Path], typer.Option("--workdir", help="Checkpoint folder (default ./vitcompress-out/<model>/finetune).")]
EveryOpt = Annotated[Optional[int], typer.Option("--checkpoint-every", min=0, help="Steps between checkpoints (default 200; epoch ends always).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="torch CPU threads per process (default: torch's).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
NoSpeedOpt = Annotated[bool, typer.Option("--no-speed", help="Skip the quick speed-up measurement.")]


def _overrides(**values: Any) -> dict[str, Any]:
    """The fine-tuning settings given on the command line (unset ones keep their defaults)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if v is not None}


def _set_threads(threads: Optional[int]) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@app.command("compress")
@handle_errors
def compress_command(
    model: ModelArg = None,
    budget: Annotated[str, typer.Option("--budget", help="Target speed-up (2x, 1.5x) or latency share (50%).")] = "2x",
    data: DataOpt = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Training split (default: train).")] = None,
    val_split: Annotated[Optional[str], typer.Option("--val-split", help="Held-out split for top-1 (default: test/validation, else 10% of the data).")] = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    analysis: Annotated[Optional[Path], typer.Option("--analysis", help="Use this analysis (folder or analysis.json) instead of analyzing.")] = None,
    plan: Annotated[Optional[Path], typer.Option("--plan", help="Use this plan.json instead of planning.")] = None,
    no_finetune: Annotated[bool, typer.Option("--no-finetune", help="Export the converted model without fine-tuning.")] = False,
    epochs: EpochsOpt = None,
    steps: StepsOpt = None,
    lr: LrOpt = None,
    batch_size: FtBatchOpt = None,
    accum_steps: AccumOpt = None,
    ce_weight: CeOpt = None,
    kd_weight: KdOpt = None,
    kd_temperature: KdTOpt = None,
    attn_weight: AttnOpt = None,
    guidance: GuidanceOpt = None,
    feat_weight: FeatOpt = None,
    feat_at: FeatAtOpt = None,
    augment: AugmentOpt = None,
    seed: SeedOpt = None,
    workdir: WorkdirOpt = None,
    checkpoint_every: EveryOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in the work folder.")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file (default ./vitcompress-out/<model>/model.safetensors).")] = None,
    force: ForceOpt = False,
    method: Annotated[str, typer.Option("--method", help="auto (default: search every method, keep the best measured), dgssa-glad (static attention + token aggregation), dgssa, glad or tome (token merging).")] = "auto",
    tome_r: Annotated[Optional[int], typer.Option("--tome-r", min=1, help="Token merging with r tokens merged per block (implies --method tome; skips planning).")] = None,
    calibration_images: Annotated[int, typer.Option("--calibration-images", min=0, help=f"Training images the planner measures damage on (its search uses the first {SEARCH_IMAGES}; 0: analysis proxy).")] = DEFAULT_CALIBRATION_IMAGES,
    plan_batch_size: Annotated[int, typer.Option("--plan-batch-size", min=1, help="Batch size the planner times candidates at (the deployment's).")] = 32,
    allow_below_budget: AllowBelowOpt = False,
    allow_slower_at_batch_1: SlowerAtBatch1Opt = False,
    retime: RetimeOpt = False,
    probe_steps: Annotated[int, typer.Option("--probe-steps", min=0, help="Probe-fine-tune the best plan of each family (static attention, GLAD, both, token merging) for this many steps and keep the one least damaged after it (0: choose on training-free damage).")] = 0,
    no_calibrate: Annotated[bool, typer.Option("--no-calibrate", help="Plan from FLOPs only (no timing).")] = False,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Images for the attention analysis.")] = 256,
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Where to fine-tune and where the planner and the final measurement time the model: cpu or cuda[:N] (default: this process's GPU if there is one, else the CPU).")] = None,
    no_speed: NoSpeedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Analyze, plan, convert, fine-tune and export in one go.

    With no model, continues from the newest analysis in ./vitcompress-out (made by `vitcompress analyze MODEL`), or runs on the built-in demo. Under `torchrun --nproc_per_node N` fine-tuning runs on N processes (DDP).
    """
    _check_compress_args(budget, method, plan, tome_r, output, workdir)  # before torch loads
    from vitcompress.finetune import FinetuneConfig
    from vitcompress.pipeline import compress

    _set_threads(threads)
    config = FinetuneConfig(**_overrides(
        epochs=epochs, steps=steps, lr=lr, batch_size=batch_size, accum_steps=accum_steps, ce_weight=ce_weight,
        kd_weight=kd_weight, kd_temperature=kd_temperature, attn_weight=attn_weight, guidance=guidance,
        feat_weight=feat_weight, feat_at=feat_at, augment=augment, seed=seed, workdir=workdir, checkpoint_every=checkpoint_every, num_workers=workers,
        device=device,
    ), resume=resume)
    from vitcompress.pipeline import PlanOptions

    planning = PlanOptions(method="tome" if tome_r is not None else method, calibration_images=calibration_images,
                           batch_size=plan_batch_size, threads=threads, probe_steps=probe_steps,
                           batch1_floor=None if allow_slower_at_batch_1 else 1.0, allow_below_budget=allow_below_budget,
                           reuse_timings=not retime)
    result = compress(
        model, budget, data=data, split=split, val_split=val_split, image_column=image_column, label_column=label_column,
        analysis=analysis, plan=plan, finetune=not no_finetune, config=config, output=output, force=force,
        calibrate=not no_calibrate, samples=samples, planning=planning, tome_r=tome_r, checkpoint=checkpoint,
        random_init=random_init, measure_speed=not no_speed, log=note,
    )
    _print_result(result, as_json)


@app.command("finetune")
@handle_errors
def finetune_command(
    workdir: Annotated[Optional[Path], typer.Argument(help="A run's work folder (default: the newest under ./vitcompress-out).", show_default=False)] = None,
    epochs: EpochsOpt = None,
    steps: StepsOpt = None,
    lr: LrOpt = None,
    batch_size: FtBatchOpt = None,
    accum_steps: AccumOpt = None,
    ce_weight: CeOpt = None,
    kd_weight: KdOpt = None,
    kd_temperature: KdTOpt = None,
    attn_weight: AttnOpt = None,
    feat_weight: FeatOpt = None,
    feat_at: FeatAtOpt = None,
    checkpoint_every: EveryOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file (default: the run's own).")] = None,
    force: ForceOpt = False,
    workers: WorkersOpt = None,
    threads: ThreadsOpt = None,
    no_speed: NoSpeedOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Continue a fine-tuning run from its last checkpoint (e.g. with more --epochs), then export.

    Options given here replace the run's settings; changing --batch-size, --accum-steps or the number of processes is refused, since the data order would no longer match.
    """
    check_output_file(output, "--output")
    from vitcompress.pipeline import continue_finetune

    _set_threads(threads)
    overrides = _overrides(
        epochs=epochs, steps=steps, lr=lr, batch_size=batch_size, accum_steps=accum_steps, ce_weight=ce_weight,
        kd_weight=kd_weight, kd_temperature=kd_temperature, attn_weight=attn_weight, feat_weight=feat_weight, feat_at=feat_at,
        checkpoint_every=checkpoint_every, num_workers=workers,
    )
    result = continue_finetune(workdir, overrides=overrides, output=output, force=force, measure_speed=not no_speed, log=note)
    _print_result(result, as_json)


@app.command("export")
@handle_errors
def export_command(
    model_file: Annotated[Path, typer.Argument(help="A .safetensors file written by `vitcompress compress`.", show_default=False)],
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help="ONNX output (default: MODEL_FILE with .onnx).")] = None,
    opset: Annotated[int, typer.Option("--opset", min=13, help="ONNX opset version.")] = 17,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the onnxruntime comparison with PyTorch.")] = False,
    force: ForceOpt = False,
) -> None:
    """Write a compressed model as ONNX (dynamic batch axis), checked against PyTorch with onnxruntime."""
    target = onnx or model_file.with_suffix(".onnx")
    check_output_file(target, "--onnx")
    from vitcompress.export import check_writable, export_onnx, load

    check_writable(target, force, "ONNX output")  # before the model is rebuilt
    model = load(model_file)
    result = export_onnx(model, target, opset=opset, force=force, check=not no_check)
    if result["max_abs_diff"] is None:
        note("onnxruntime is not installed: the graph was not checked (pip install onnxruntime)" if not no_check else "not checked (--no-check)")
        out.print(f"wrote {target}")
    else:
        out.print(f"wrote {target} (max |onnx - torch| = {result['max_abs_diff']:.1e} on batches {result['checked_batches']})")


def _check_compress_args(budget: str, method: str, plan: Optional[Path], tome_r: Optional[int], output: Optional[Path],
                         workdir: Optional[Path]) -> None:
    """What can be checked from the arguments alone, at once: budget, method, plan file, output paths."""
    from vitcompress.plan_types import METHODS, Budget, load_plan

    if plan is None and tome_r is None:
        Budget.parse(budget)
    if method not in METHODS:
        raise VitcompressError(f"--method {method!r} is not one of {', '.join(METHODS)}: choose one of them "
                               "(see `vitcompress compress --help`)")
    if plan is not None:
        load_plan(plan)  # a missing, cut-off or inconsistent plan file fails before any work
    check_output_file(output, "--output")
    check_output_folder(workdir, "--workdir")


def _print_result(result: Any, as_json: bool) -> None:
    from vitcompress.finetune import dist_info
    from vitcompress.timing import setting_text

    if not dist_info().is_main:
        return  # under torchrun, rank 0 reports
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    table = Table(title=f"{result.model_id} compressed", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    plan = result.plan
    table.add_row("static attention (DGSSA)", f"blocks {plan.static_layers}" if plan.static_layers else "none")
    glad = ", ".join(f"before block {r.before_block}: {r.scales}" for r in plan.reductions)
    table.add_row("token aggregation (GLAD)", glad or "none")
    if any(plan.merges()):
        table.add_row("token merging (r per block)", str(plan.merges()))
    table.add_row("teacher top-1", _pct(result.teacher_top1))
    table.add_row("student top-1 (converted)", _pct(result.student_top1_before))
    if result.finetune is not None:
        ft = result.finetune
        table.add_row("student top-1 (fine-tuned)", f"{_pct(result.student_top1)} after {ft.steps} steps ({ft.steps / ft.steps_per_epoch:.2f} epochs)")
    if result.speedup:
        s = result.speedup
        spread = f", quartiles {s['speedup_q25']:.2f}-{s['speedup_q75']:.2f}" if "speedup_q25" in s else ""
        table.add_row("measured speed-up", f"{s['speedup']:.2f}x ({setting_text(s.get('batch_size'), s.get('threads'), s.get('device'))}{spread})")
    table.add_row("output", str(result.output))
    out.print(table)


def _pct(value: Optional[float]) -> str:
    return "n/a (no labels)" if value is None else f"{100 * value:.2f}%"
