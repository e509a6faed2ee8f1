"""The whole pipeline as one call: analyze -> plan -> convert -> fine-tune -> export.

``compress(...)`` is what ``vitcompress compress`` runs; ``continue_finetune(...)`` is what
``vitcompress finetune`` runs. Stages chain through the output folder
``./vitcompress-out/<model>/``: ``analysis.json`` (+ attention means) from ``analyze``,
``plan.json``, the fine-tuning work folder ``finetune/`` (checkpoints and ``run.json``, which holds
everything needed to continue the run) and the exported ``model.safetensors``.

Under ``torchrun`` every process runs ``compress``; rank 0 analyses and plans and sends the plan
and attention means to the others, all processes fine-tune together, and rank 0 measures and writes.

Messages go to ``log`` (default: printed on stderr). When ``log`` also has a
``progress(done, total, text)`` method (the CLI's ``note`` has), the analysis and the fine-tuning
report their progress through it. The exported file's ``speedup`` is ``timing.compare_speed``'s, run in a fresh process (``TimingWorker``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from vitcompress._io import read_json, write_json_atomic
from vitcompress.bench import evaluate_top1
from vitcompress.data import load_train_val
from vitcompress.data import random_subset as _random_subset  # the analysis / calibration sample
from vitcompress.distributed import barrier, default_device, dist_info, init_distributed, share
from vitcompress.errors import DataError, Interrupted, VitcompressError
from vitcompress.finetune import FinetuneConfig, FinetuneResult
from vitcompress.names import ANALYSIS_JSON, MODEL_FILE, OUTPUT_ROOT, PLAN_JSON, RUN_FILE, WORKDIR_NAME, model_slug, output_dir_for
from vitcompress.plan_types import DEFAULT_CALIBRATION_IMAGES, DEFAULT_METHOD, Plan, parse_budget
from vitcompress.timing import TimingWorker, setting_text

DEMO = "demo"
DEMO_EPOCHS = 5  # default fine-tuning length on the demo digits (1,438 training images)

Log = Callable[[str], None]
Progress = Callable[[int, int, str], None]


@dataclass
class CompressResult:
    """What ``compress``/``continue_finetune`` produced and measured."""

    output: Optional[Path]
    out_dir: Path
    model_id: str
    plan: Plan
    teacher_top1: Optional[float] = None
    student_top1_before: Optional[float] = None  # after conversion, before fine-tuning
    student_top1: Optional[float] = None
    speedup: Optional[dict[str, Any]] = None
    finetune: Optional[FinetuneResult] = None
    analysis_path: Optional[Path] = None
    workdir: Optional[Path] = None
    model: Optional[nn.Module] = field(default=None, repr=False)  # the compressed model (eval mode, CPU)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "out_dir": str(self.out_dir),
            "model": self.model_id,
            "plan": self.plan.to_dict(),
            "teacher_top1": self.teacher_top1,
            "student_top1_before_finetune": self.student_top1_before,
            "student_top1": self.student_top1,
            "speedup": self.speedup,
            "finetune": self.finetune.to_dict() if self.finetune else None,
            "analysis": str(self.analysis_path) if self.analysis_path else None,
            "workdir": str(self.workdir) if self.workdir else None,
        }


# ---- folders ---------------------------------------------------------------------------------
def find_latest_analysis(root: str | Path = OUTPUT_ROOT) -> Optional[Path]:
    """The most recently written ``<root>/*/analysis.json``, or None."""
    candidates = [p for p in Path(root).glob(f"*/{ANALYSIS_JSON}") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def find_latest_workdir(root: str | Path = OUTPUT_ROOT) -> Optional[Path]:
    """The most recently updated fine-tuning folder (``<root>/*/finetune/run.json``), or None."""
    candidates = [p.parent for p in Path(root).glob(f"*/{WORKDIR_NAME}/{RUN_FILE}") if p.is_file()]
    return max(candidates, key=_last_activity) if candidates else None


def _last_activity(workdir: Path) -> float:
    return max(p.stat().st_mtime for p in workdir.iterdir() if p.is_file())


# ---- one run per folder, and Ctrl-C ----------------------------------------------------------
@contextlib.contextmanager
def _guarded(folder: str | Path, is_main: bool, work_folder: bool = True) -> Iterator[None]:
    """Hold ``folder``'s lock (rank 0; another live run there stops at once, a dead one's lock is
    taken over) and turn a Ctrl-C into ``Interrupted`` saying what was kept and how to resume."""
    from vitcompress._lock import exclusive

    # Only the locked run writes into a work folder: what a killed run left half-written there goes.
    lock = exclusive(folder, "work folder" if work_folder else "output folder", remove_temporaries=work_folder)
    with lock if is_main else contextlib.nullcontext():
        try:
            yield
        except Interrupted:
            raise
        except KeyboardInterrupt:
            hint = _resume_hint(Path(folder)) if work_folder else "no model file was written: run the command again"
            raise Interrupted(hint) from None


def _resume_hint(folder: Path) -> str:
    from vitcompress.finetune import checkpoint_path, checkpoint_step

    step = checkpoint_step(checkpoint_path(folder)) if checkpoint_path(folder).is_file() else None
    if step is not None and (folder / RUN_FILE).is_file():
        return (f"no model file was written; the last checkpoint (step {step}) is in {folder}: resume with "
                f"`vitcompress finetune {folder}` (or the same command with --resume)")
    if (folder / RUN_FILE).is_file():
        return (f"no model file was written and no checkpoint yet: `vitcompress finetune {folder}` starts the "
                "fine-tuning again")
    return "stopped before fine-tuning started; no model file was written: run the command again"


def _check_trainable(train: Any, teacher: nn.Module, cfg: FinetuneConfig, info: Any) -> None:
    from vitcompress.data import check_trainable

    check_trainable(train, num_classes=int(teacher.num_classes), batch_size=cfg.batch_size,
                    global_batch=cfg.batch_size * cfg.accum_steps * info.world_size)


# ---- the pipeline ----------------------------------------------------------------------------
@dataclass
class _Inputs:
    """What compress resolved from its arguments (and from an earlier analysis)."""

    model_id: str
    data: str
    analysis_path: Optional[Path]
    out_dir: Path


def _resolve_inputs(model: Optional[str], data: Optional[str], analysis: Optional[str | Path], plan: Any, out_root: Path, log: Log) -> _Inputs:
    from vitcompress.analyze import load_analysis

    analysis_path = Path(analysis) if analysis is not None else None
    if analysis_path is not None and analysis_path.is_dir():
        analysis_path = analysis_path / ANALYSIS_JSON
    if analysis_path is None and model is None and plan is None:
        analysis_path = find_latest_analysis(out_root)
        if analysis_path is None:
            log(f"no model named and no analysis in {out_root}/: running on the built-in demo model and data")
        else:
            log(f"continuing from the latest analysis: {analysis_path}")
    recorded = load_analysis(analysis_path, load_means=False) if analysis_path is not None else None
    if recorded is not None and model is not None and model != recorded.model_id:
        log(f"note: the analysis in {analysis_path} was made for '{recorded.model_id}', not '{model}'")
    model_id = model or (recorded.model_id if recorded is not None else DEMO)
    if data is None and recorded is not None and recorded.data_source:
        data = _source_of(recorded.data_source)
        log(f"using the analysis' images: --data {data}")
    if data is None:
        if model_id != DEMO:
            raise DataError(f"fine-tuning '{model_id}' needs images: pass --data (a folder, parquet files or a dataset id)")
        data = DEMO
    return _Inputs(model_id, data, analysis_path, output_dir_for(model_id, out_root))


def _source_of(recorded: str) -> str:
    """The --data value inside an analysis' data description (``"demo [test]"`` -> ``"demo"``)."""
    match = re.fullmatch(r"(.*?) \[.*\]", recorded.strip())
    return match.group(1) if match else recorded.strip()


def _load_teacher(model_id: str, checkpoint: Optional[str], random_init: bool, seed: int) -> tuple[nn.Module, Any]:
    from vitcompress.models import load_model

    if random_init:
        torch.manual_seed(seed)  # a reproducible random teacher, so `vitcompress finetune` can rebuild it
    return load_model(model_id, checkpoint=checkpoint, random_init=random_init)


@dataclass
class PlanOptions:
    """How ``compress`` plans: the method, the calibration images (from the training split) that
    damage is measured on, and the deployment candidates are timed for."""

    method: str = DEFAULT_METHOD
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    measure_speed: bool = True
    batch_size: int = 32
    threads: Optional[int] = None
    device: Optional[str] = None  # default: where the model is fine-tuned
    batch1_floor: Optional[float] = 1.0  # the least batch-1 speed-up the chosen plan's upper quartile must reach (None: not checked)
    # Steps of the probe fine-tune of each family's best plan (0: choose on training-free damage).
    probe_steps: int = 0
    # When no plan meets the budget: go on with the fastest one (with a warning) instead of failing
    # before anything is fine-tuned or written, as `vitcompress plan` does.
    allow_below_budget: bool = False
    # Reuse the timings this machine stored for this model and deployment (False: ``--retime``).
    reuse_timings: bool = True


PROBE_IMAGES = 512  # training images held out of the probes' training data, to measure them on


def _analysis_and_plan(
    teacher: nn.Module, train: Any, inputs: _Inputs, budget: Any, plan: Any, options: PlanOptions, samples: int,
    log: Log, progress: Optional[Progress], cfg: Optional[FinetuneConfig] = None,
) -> tuple[Plan, Optional[dict[int, torch.Tensor]], Optional[Path]]:
    """On rank 0: load or run the analysis, load or make the plan, save both."""
    from vitcompress.analyze import analyze, load_analysis, save_analysis
    from vitcompress.plan import load_plan

    means = None
    analysis_path = inputs.analysis_path
    if isinstance(plan, Plan) or plan is not None:
        loaded = plan if isinstance(plan, Plan) else load_plan(plan)
        from vitcompress.convert import validate_plan

        validate_plan(teacher, loaded)  # a plan for another model fails before any note or file
        if analysis_path is not None:
            means = load_analysis(analysis_path).attention_means
        else:
            log("a plan was given without an analysis: static layers start from uniform attention")
        return loaded, means, analysis_path
    if analysis_path is not None:
        result = load_analysis(analysis_path)
    else:
        sample = _random_subset(train, samples)  # a class-sorted folder's first images would be one class
        log(f"analyzing attention on {len(sample)} images of {train.source} (split '{train.split}')")
        result = analyze(teacher, sample, samples=samples, model_id=inputs.model_id,
                         data_source=f"{inputs.data} [{train.split}]", progress=progress)
        analysis_path = save_analysis(result, inputs.out_dir)["json"]
        log(f"analysis written to {analysis_path}")
    from vitcompress.plan import Deployment, budget_met, make_plan, plan_speedup, save_plan, unreachable_message

    calibration = calibration_images(train, options.calibration_images)
    deployment = Deployment(device=options.device or str(next(teacher.parameters()).device),
                            batch_size=options.batch_size, threads=options.threads, batch1_floor=options.batch1_floor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unreachable budget is reported below, on one line
        made = make_plan(teacher, result, budget, method=options.method, calibration=calibration,
                         attention_means=result.attention_means, deployment=deployment,
                         measure_speed=options.measure_speed, shortlist=options.probe_steps > 0,
                         reuse_timings=options.reuse_timings, log=log)
    if options.probe_steps > 0:
        made = _probe(teacher, made, train, options.probe_steps, cfg or FinetuneConfig(), result.attention_means, log)
    if not budget_met(made):
        if not options.allow_below_budget:
            raise VitcompressError(f"{unreachable_message(made)}: ask for a smaller budget, or pass "
                                   f"--allow-below-budget to compress with this plan")
        log(f"warning: {unreachable_message(made)}; going on with it (--allow-below-budget)")
    path = save_plan(made, inputs.out_dir / PLAN_JSON)
    kind = "measured" if made.measured.get("speedup") is not None else "predicted"
    log(f"plan written to {path}: {made.describe()}, {kind} speed-up {plan_speedup(made):.2f}x")
    return made, result.attention_means, analysis_path


def _probe(teacher: nn.Module, made: Plan, train: Any, steps: int, cfg: FinetuneConfig,
           means: Optional[dict[int, torch.Tensor]], log: Log) -> Plan:
    """Probe-fine-tune the plan and its shortlist (each other family's best plan that meets the
    budget) and keep the one least damaged after its probe, with the probe's figures recorded."""
    from vitcompress.data import train_val_split
    from vitcompress.probe import best_probed, probe_config, probe_plans

    plans = [made] + [Plan.from_dict(d) for d in made.measured.pop("shortlist", [])]
    if len(plans) < 2:
        log("probe: no other family meets the budget; nothing to choose between")
        return made
    rest, held = train_val_split(train, min(PROBE_IMAGES, max(1, len(train) // 10)), seed=1)
    held_images = calibration_images(held, len(held))
    log(f"probing {len(plans)} plans: {steps} fine-tuning steps each, damage on {len(held)} held-out training images")
    results = probe_plans(teacher, plans, rest, held_images, probe_config(cfg, steps), attention_means=means, log=log)
    chosen = best_probed(results)
    chosen.plan.measured["probe"] = {"steps": steps, "images": len(held), "chosen": chosen.plan.describe(),
                                     "results": [r.to_dict() for r in results]}
    if chosen.plan is not made:
        log(f"probe: {chosen.plan.describe()} recovers best (KL {chosen.kl:.4f} against {results[0].kl:.4f})")
    return chosen.plan


def calibration_images(train: Any, count: int) -> Optional[torch.Tensor]:
    """A fixed random sample of the training split as one image batch (None for count 0)."""
    if count <= 0:
        return None
    from vitcompress.data import iter_batches

    images = [batch for batch, _ in iter_batches(_random_subset(train, count), 64)]
    if not images:
        raise DataError(f"no readable images in {train.source} to calibrate the planner on")
    return torch.cat(images)


def compress(
    model: Optional[str] = None,
    budget: str | float = "2x",
    *,
    data: Optional[str] = None,
    split: Optional[str] = None,
    val_split: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    analysis: Optional[str | Path] = None,
    plan: Optional[str | Path | Plan] = None,
    finetune: bool = True,
    config: Optional[FinetuneConfig] = None,
    output: Optional[str | Path] = None,
    force: bool = False,
    calibrate: bool = True,
    samples: int = 256,
    planning: Optional[PlanOptions] = None,
    tome_r: Optional[int] = None,
    progress: Optional[Progress] = None,
    checkpoint: Optional[str] = None,
    random_init: bool = False,
    out_root: str | Path = OUTPUT_ROOT,
    measure_speed: bool = True,
    log: Optional[Log] = None,
) -> CompressResult:
    """Compress a timm ViT end to end and write one ``.safetensors`` file.

    With no ``model``, ``analysis`` or ``plan``, continues from the newest analysis in
    ``out_root`` (saying which), or runs on the built-in demo. ``analysis`` (a folder or its
    ``analysis.json``) skips the analysis; ``plan`` (a ``plan.json`` or a ``Plan``) skips planning.
    ``config`` sets fine-tuning (``finetune=False`` exports the converted model as is); with
    ``config.resume`` and a previous run in the work folder, that run's plan is reused and
    fine-tuning continues from its last checkpoint. ``output`` defaults to
    ``<out_root>/<model>/model.safetensors`` and is not overwritten unless ``force``.
    ``planning`` (``PlanOptions``) sets the method, calibration images and timing deployment;
    ``tome_r`` fixes a token-merging plan (no search). ``progress(done, total, text)`` follows the
    analysis and fine-tuning (default: ``log.progress`` if the log has one).
    """
    from vitcompress.convert import convert
    from vitcompress.export import check_writable

    info = init_distributed()
    progress = _progress_of(log, info.is_main, progress)
    log = _rank0_log(log, info.is_main)
    cfg = dataclasses.replace(config) if config is not None else FinetuneConfig()
    cfg.validate()
    if cfg.device is not None:
        from vitcompress.bench import resolve_device

        resolve_device(cfg.device)  # a device that is not here fails now, not after the analysis
    if plan is None and tome_r is None:
        parse_budget(budget)  # a bad budget fails now, not after the analysis
    out_root = Path(out_root)
    inputs = _resolve_inputs(model, data, analysis, plan, out_root, log)
    output_path = Path(output) if output is not None else inputs.out_dir / MODEL_FILE
    check_writable(output_path, force)  # before any long work
    if cfg.workdir is None:
        cfg.workdir = str(inputs.out_dir / WORKDIR_NAME)
    if cfg.augment == "auto":
        cfg.augment = "shift" if inputs.data == DEMO else "flip-shift"  # a mirrored digit is another digit
    if inputs.data == DEMO and cfg.epochs is None and cfg.steps is None:
        cfg.epochs = DEMO_EPOCHS  # 22 steps each: one epoch leaves accuracy on the table
    # One run per work folder (rank 0 holds its lock); a Ctrl-C says where the run can be resumed.
    with _guarded(cfg.workdir if finetune else inputs.out_dir, info.is_main, work_folder=finetune):
        previous = _previous_run(cfg, finetune, log)
        if previous is not None:
            return _continue(previous, cfg, output_path, force, measure_speed, log, progress)

        teacher, spec = _load_teacher(inputs.model_id, checkpoint, random_init, cfg.seed)
        train, val = load_train_val(inputs.data, spec.data_config, split=split, val_split=val_split,
                                    image_column=image_column, label_column=label_column, log=log)
        if finetune:
            _check_trainable(train, teacher, cfg, info)  # before the analysis and plan are written
        if tome_r is not None:
            from vitcompress.plan import tome_plan

            plan = tome_plan(teacher, tome_r)  # a fixed schedule: nothing to search
            plan.budget = None
            log(f"--tome-r {tome_r}: {plan.describe()}")
        if info.is_main:
            options = dataclasses.replace(planning) if planning is not None else PlanOptions()
            options.measure_speed = options.measure_speed and calibrate
            if options.device is None:  # time where the model will be fine-tuned and measured
                options.device = cfg.device or str(default_device(info))
            if options.probe_steps > 0 and info.enabled:
                log("--probe-steps: probing runs in one process; skipped under torchrun (plan first, then pass --plan)")
                options.probe_steps = 0
            plan_obj, means, analysis_path = _analysis_and_plan(
                teacher, train, inputs, budget, plan, options, samples, log, progress if cfg.progress else None, cfg)
            shared = (plan_obj.to_dict(), means, str(analysis_path) if analysis_path else None)
        else:
            shared = None
        plan_dict, means, analysis_str = share(shared)
        plan_obj = Plan.from_dict(plan_dict)
        student = convert(teacher, plan_obj, means)
        run = {
            "model": inputs.model_id, "checkpoint": checkpoint, "random_init": random_init, "spec": spec.to_dict(),
            "plan": plan_obj.to_dict(), "budget": str(budget), "data": inputs.data, "split": split, "val_split": val_split,
            "image_column": image_column, "label_column": label_column, "analysis": analysis_str,
        }
        result = CompressResult(output_path, inputs.out_dir, inputs.model_id, plan_obj,
                                analysis_path=Path(analysis_str) if analysis_str else None)
        return _train_measure_export(teacher, student, spec, train, val, run, cfg, finetune, result, force, measure_speed, log,
                                     progress)


def _rank0_log(log: Optional[Log], is_main: bool) -> Log:
    if not is_main:
        return lambda message: None
    if log is not None:
        return log
    return lambda message: print(message, file=sys.stderr, flush=True)


def _progress_of(log: Optional[Log], is_main: bool, progress: Optional[Progress] = None) -> Optional[Progress]:
    """The progress callback: ``progress``, else ``log.progress`` if the log has one; rank 0 only."""
    if not is_main:
        return None
    return progress if progress is not None else getattr(log, "progress", None)


def _previous_run(cfg: FinetuneConfig, finetune: bool, log: Log) -> Optional[dict[str, Any]]:
    """The run.json of the work folder when resuming a run that has a checkpoint."""
    from vitcompress.finetune import checkpoint_path

    run_file = Path(cfg.workdir) / RUN_FILE  # type: ignore[arg-type]
    if not (finetune and cfg.resume and run_file.is_file() and checkpoint_path(cfg.workdir).is_file()):  # type: ignore[arg-type]
        return None
    log(f"--resume: continuing the run in {cfg.workdir} with its own plan (analysis and planning skipped)")
    return read_json(run_file, "start a new run without --resume")


def _train_measure_export(
    teacher: nn.Module, student: nn.Module, spec: Any, train: Any, val: Any, run: dict[str, Any], cfg: FinetuneConfig,
    do_finetune: bool, result: CompressResult, force: bool, measure_speed: bool, log: Log, progress: Optional[Progress] = None,
) -> CompressResult:
    from vitcompress.export import export
    from vitcompress.finetune import finetune

    info = dist_info()
    device = torch.device(cfg.device) if cfg.device else default_device(info)
    teacher.to(device)
    eval_bs = cfg.eval_batch_size or max(cfg.batch_size, 64)
    eval_kw = {"batch_size": eval_bs, "device": device, "num_workers": cfg.num_workers}
    if "teacher_top1" in run:
        result.teacher_top1, result.student_top1_before = run["teacher_top1"], run.get("student_top1_before")
    else:
        result.teacher_top1 = evaluate_top1(teacher, val, **eval_kw)
        result.student_top1_before = evaluate_top1(student.to(device), val, **eval_kw)
        run.update(teacher_top1=result.teacher_top1, student_top1_before=result.student_top1_before)
        log(f"top-1 on {val.source} (split '{val.split}'): teacher {_pct(result.teacher_top1)}, "
            f"converted student before fine-tuning {_pct(result.student_top1_before)}")
    result.student_top1 = result.student_top1_before
    if do_finetune:
        result.workdir = Path(cfg.workdir)  # type: ignore[arg-type]
        if info.is_main:
            write_json_atomic(result.workdir / RUN_FILE, {**run, "config": cfg.to_dict(), "output": str(result.output)})
        result.finetune = finetune(student, teacher, train, val, cfg, log=log, progress=progress if cfg.progress else None)
        if result.finetune.val_top1 is not None:
            result.student_top1 = result.finetune.val_top1
    if info.is_main:
        _measure_and_export(teacher, student, spec, run, cfg, result, force, measure_speed, device, log, export)
    barrier()
    result.model = student.cpu().eval()
    return result


def _measure_and_export(teacher: nn.Module, student: nn.Module, spec: Any, run: dict[str, Any], cfg: FinetuneConfig,
                        result: CompressResult, force: bool, measure_speed: bool, device: torch.device, log: Log, export: Any) -> None:
    from vitcompress.geometry import input_size as geometry_input_size

    student.eval()
    input_size = geometry_input_size(student, spec.data_config)
    if measure_speed:
        # Timed as the planner timed it (the plan's deployment: batch size and threads, in a fresh
        # process: this one has just fine-tuned), so the speed-up stored in the file compares with
        # the one the plan printed and with `bench`'s.
        deployment = result.plan.measured.get("deployment") or {}
        with TimingWorker(on_fallback=log) as worker:
            result.speedup = worker.compare(teacher, student, input_size, device=device,
                                            batch_size=int(deployment.get("batch_size", 32)),
                                            threads=deployment.get("threads")).to_dict()
        s = result.speedup
        log(f"speed-up {s['speedup']:.2f}x ({setting_text(s.get('batch_size'), s.get('threads'), s.get('device'))})")
    metadata = {
        "model": spec.to_dict(),
        "data_config": spec.data_config,
        "plan": result.plan.to_dict(),
        "teacher_top1": result.teacher_top1,
        "student_top1": result.student_top1,
        "student_top1_before_finetune": result.student_top1_before,
        "speedup": result.speedup,
        "data": {"source": run["data"], "split": run.get("split"), "val_split": run.get("val_split")},
        "finetune": result.finetune.to_dict() if result.finetune else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    export(student.cpu(), result.output, metadata, force=force)
    log(f"wrote {result.output}")


def _pct(value: Optional[float]) -> str:
    return "n/a (no labels)" if value is None else f"{100 * value:.2f}%"


# ---- continuing a run ------------------------------------------------------------------------
def continue_finetune(
    workdir: Optional[str | Path] = None,
    *,
    overrides: Optional[dict[str, Any]] = None,
    output: Optional[str | Path] = None,
    force: bool = False,
    out_root: str | Path = OUTPUT_ROOT,
    measure_speed: bool = True,
    log: Optional[Log] = None,
    progress: Optional[Progress] = None,
) -> CompressResult:
    """Continue the fine-tuning run in ``workdir`` (default: the newest one under ``out_root``)
    from its last checkpoint, then export.

    ``overrides`` changes ``FinetuneConfig`` fields of the run, e.g. ``{"epochs": 3}`` to train
    longer (giving ``epochs`` drops the run's ``steps`` and the reverse). The output defaults to
    the run's own output, which is only replaced with ``force``. ``progress(step, total, text)``
    (default: ``log.progress`` if the log has one) follows the fine-tuning.
    """
    info = init_distributed()
    progress = _progress_of(log, info.is_main, progress)
    log = _rank0_log(log, info.is_main)
    folder = Path(workdir) if workdir is not None else find_latest_workdir(out_root)
    if folder is None:
        raise VitcompressError(f"no fine-tuning run under {out_root}/: start one with `vitcompress compress`")
    run_file = folder / RUN_FILE
    if not folder.is_dir():
        raise VitcompressError(f"{folder}: no such folder: give a run's work folder (e.g. vitcompress-out/MODEL/finetune)")
    if not run_file.is_file():
        raise VitcompressError(f"{folder} holds no {RUN_FILE}: it is not a vitcompress fine-tuning folder")
    run = read_json(run_file, "start a new run with `vitcompress compress`")
    missing = [key for key in ("model", "plan", "data", "config", "output") if not isinstance(run, dict) or key not in run]
    if missing:
        raise VitcompressError(f"{run_file} lacks {', '.join(missing)}: it is not a whole vitcompress run file; "
                               "start a new run with `vitcompress compress`")
    if workdir is None:
        log(f"continuing the latest run: {folder}")
    cfg = FinetuneConfig.from_dict({**run["config"], **_length_overrides(overrides or {})})
    cfg.workdir, cfg.resume = str(folder), True
    if cfg.augment == "auto":
        cfg.augment = "shift" if run["data"] == DEMO else "flip-shift"
    cfg.validate()
    output_path = Path(output) if output is not None else Path(run["output"])
    from vitcompress.export import check_writable

    check_writable(output_path, force)
    with _guarded(folder, info.is_main):  # one run per work folder; a Ctrl-C says how to resume
        return _continue(run, cfg, output_path, force, measure_speed, log, progress)


def _length_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """A new length replaces the old one: --epochs clears the run's steps and the reverse."""
    out = dict(overrides)
    if out.get("epochs") is not None and "steps" not in out:
        out["steps"] = None
    if out.get("steps") is not None and "epochs" not in out:
        out["epochs"] = None
    return out


def _continue(run: dict[str, Any], cfg: FinetuneConfig, output: Path, force: bool, measure_speed: bool, log: Log,
              progress: Optional[Progress] = None) -> CompressResult:
    from vitcompress.convert import convert
    from vitcompress.finetune import checkpoint_path

    if not checkpoint_path(cfg.workdir).is_file():  # type: ignore[arg-type]
        log(f"no checkpoint in {cfg.workdir} yet: fine-tuning starts from the converted model")
    teacher, spec = _load_teacher(run["model"], run.get("checkpoint"), bool(run.get("random_init")), int(run["config"].get("seed", 0)))
    plan = Plan.from_dict(run["plan"])
    means = None
    if not checkpoint_path(cfg.workdir).is_file() and run.get("analysis"):  # type: ignore[arg-type]
        from vitcompress.analyze import load_analysis

        means = load_analysis(run["analysis"]).attention_means
    # With a checkpoint, static layers may start uniform: the checkpoint holds their trained logits.
    student = convert(teacher, plan, means)
    train, val = load_train_val(run["data"], spec.data_config, split=run.get("split"), val_split=run.get("val_split"),
                                image_column=run.get("image_column"), label_column=run.get("label_column"), log=log)
    _check_trainable(train, teacher, cfg, dist_info())
    analysis = run.get("analysis")
    result = CompressResult(output, output.parent, run["model"], plan, analysis_path=Path(analysis) if analysis else None)
    return _train_measure_export(teacher, student, spec, train, val, run, cfg, True, result, force, measure_speed, log,
                                 progress)


__all__ = [
    "CompressResult",
    "OUTPUT_ROOT",
    "compress",
    "continue_finetune",
    "find_latest_analysis",
    "find_latest_workdir",
    "model_slug",
    "output_dir_for",
]
