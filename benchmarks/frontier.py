"""The accuracy-vs-speed frontier: our methods against token merging, measured in one run.

    python benchmarks/frontier.py                      # the shared CIFAR-10 teacher (../shared), ~1 h on 2 cores
    python benchmarks/frontier.py --quick              # the built-in demo, a few minutes

For every target speed-up (1.5x, 2x, 2.5x, 3x) and every method (``auto``, what ``compress`` ships;
``tome``, token merging as its authors publish it, matching on the attention keys
(``--tome-metric``); ``dgssa-glad``, ours without token merging; and the ablations ``dgssa`` and
``glad`` alone), the planner chooses the plan (damage measured on training images, speed measured
at batch 32 with ``--threads``; for token merging this chooses r by measured speed-up). ``auto``'s
token-merging plans match on the tokens (vitcompress's default), so ``auto`` against ``tome`` is
what the package adds over token merging as a user would otherwise run it. Each plan is evaluated
training-free; the plans of ``--finetune-methods`` (``auto`` and token merging by default; the
other rows reuse them when they chose the same plan) also after the same fine-tune (``--steps`` distillation steps, the
recipe of ``vitcompress compress``); one extra row fine-tunes our 2x plan's static layers from uniform attention instead of the mean map (does
inheriting the dynamic attention matter?). Then every model is timed in ONE interleaved ``bench``
run with the original (batch 32 and batch 1, ``--threads``), so all speed-ups compare.

Selection never looks at the test split: plans are chosen on calibration images from the training
split, and a validation slice held out of the training split (``--val-images``) is reported beside
the test top-1 (``val_top1``) for any choice made from this table.

Writes ``--out``/frontier.json (rows: method, variant, target_speedup, finetune_steps, top1,
val_top1, speedup, speedup_q25, speedup_q75, batch_size, threads, reached, plan), frontier.csv,
frontier.md (the table in the README) and frontier.png (top-1 against measured speed-up at batch 32, one line per method and training
mode).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEACHER = SHARED / "models" / "cifar10-vit12-d96"
DATA = SHARED / "data" / "cifar10"
METHODS = ("dgssa-glad", "tome", "auto", "glad", "dgssa")
COLUMNS = ["method", "variant", "target_speedup", "finetune_steps", "top1", "val_top1", "speedup", "speedup_q25",
           "speedup_q75", "batch_size", "threads", "reached", "plan"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=f"local-dir:{TEACHER}")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--speedups", default="1.5,2,2.5,3", help="target speed-ups, comma-separated")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=200,
                   help="fine-tuning steps for every fine-tuned row (0: training-free only); 200 x 64 images keeps the "
                        "whole run near an hour on 2 CPU cores")
    p.add_argument("--tome-metric", default="keys", choices=("keys", "tokens"),
                   help="what the tome baseline's merging matches on: keys, as its authors publish it (default), "
                        "or tokens, vitcompress's default")
    p.add_argument("--finetune-methods", default="auto,tome",
                   help="methods whose plans are fine-tuned (the others get training-free rows; a method whose "
                        "plans equal another's shares its fine-tuned rows)")
    p.add_argument("--batch-size", type=int, default=64, help="fine-tuning batch size")
    p.add_argument("--threads", type=int, default=1, help="torch threads for every timing (stated in every row)")
    p.add_argument("--train-threads", type=int, default=1,
                   help="torch threads while fine-tuning and evaluating (2 threads on a busy 2-core machine is far slower)")
    p.add_argument("--val-images", type=int, default=1000, help="validation slice held out of the training split")
    p.add_argument("--calibration-images", type=int, default=256)
    p.add_argument("--analysis-samples", type=int, default=256, help="training images the attention analysis uses")
    p.add_argument("--repeats", type=int, default=30, help="timed rounds of the final bench run")
    p.add_argument("--plan-seconds", type=float, default=1.5, help="seconds the planner times each candidate for")
    p.add_argument("--no-uniform-ablation", action="store_true")
    p.add_argument("--quick", action="store_true", help="the built-in demo model and data, 2x only, 20 steps")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--render", metavar="FRONTIER_JSON", help="only re-write the CSV, table and plot of an earlier run")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.data, args.speedups = "demo", "demo", "2"
        args.methods = args.finetune_methods = "auto,dgssa-glad,tome"
        args.steps, args.val_images, args.calibration_images, args.repeats = min(args.steps, 20), 200, 64, 3
        args.analysis_samples = 64
    return args


@dataclasses.dataclass
class Entry:
    """One compressed model of the frontier."""

    method: str
    variant: str
    target: float
    plan: Any
    model: torch.nn.Module
    trained: bool = False
    top1: Optional[float] = None
    val_top1: Optional[float] = None


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        from vitcompress._io import read_json

        report = read_json(args.render, "run benchmarks/frontier.py again")
        _write(Path(args.out), report)
        return report
    from vitcompress.analyze import analyze
    from vitcompress.bench import evaluate_top1
    from vitcompress.pipeline import calibration_images

    started = time.monotonic()
    torch.set_num_threads(args.train_threads)
    teacher, train, val, val_batches, test_batches = load_setup(args.model, args.data, args.val_images)
    analysis = analyze(teacher, train, samples=args.analysis_samples, model_id=args.model, data_source=f"{args.data} [train]")
    calib = calibration_images(train, args.calibration_images)
    report: dict[str, Any] = {
        "teacher": {"top1": evaluate_top1(teacher, test_batches), "val_top1": evaluate_top1(teacher, val_batches)},
        "settings": {k: v for k, v in vars(args).items()},
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads for training, "
                   f"torch {torch.__version__}, python {platform.python_version()}",
    }
    _log(f"teacher: test top-1 {report['teacher']['top1']:.4f}, val top-1 {report['teacher']['val_top1']:.4f}")
    entries = _plan_all(args, teacher, analysis, calib)
    scores: dict[tuple[str, str], tuple[float, float]] = {}  # methods that chose the same plan share it
    for e in entries:
        key = (_plan_key(e.plan), e.variant)
        if key not in scores:
            scores[key] = (evaluate_top1(e.model, test_batches), evaluate_top1(e.model, val_batches))
        e.top1, e.val_top1 = scores[key]
        _log(f"{e.method} {e.target}x {e.variant}: training-free test {e.top1:.4f}, val {e.val_top1:.4f}")
    free = [dataclasses.replace(e) for e in entries]
    trained = _finetune_all(args, entries, teacher, train, val_batches, test_batches) if args.steps > 0 else []
    speeds = _time_all(args, teacher, entries)
    rows = _rows(args, free, trained, speeds)
    report.update(rows=rows, seconds=time.monotonic() - started)
    _write(Path(args.out), report)
    _log(f"done in {report['seconds'] / 60:.1f} min")
    return report


def load_setup(model: str, data: str, val_images: int) -> tuple[Any, Any, Any, list, list]:
    """The teacher (eval mode), the training split minus a validation slice, that slice, and the
    validation and test images decoded once as batches: what every benchmark here starts from."""
    from vitcompress.data import load_train_val, train_val_split
    from vitcompress.models import load_model

    teacher, spec = load_model(model)
    teacher.eval()
    train_all, test = load_train_val(data, spec.data_config, log=_log)
    train, val = train_val_split(train_all, val_images, seed=0)
    _log(f"{len(train)} training images, {len(val)} validation images (held out of train), {len(test)} test images")
    return teacher, train, val, _cached(val), _cached(test)


def calibration_setup(model: str, data: str) -> tuple[Any, Any]:
    """The teacher (eval mode) and a ``DamageMeter`` on `compress`'s calibration sample of the
    training split: what the training-free benchmarks start from."""
    from vitcompress.damage import DamageMeter
    from vitcompress.data import load_train_val
    from vitcompress.models import load_model
    from vitcompress.pipeline import calibration_images
    from vitcompress.plan_types import DEFAULT_CALIBRATION_IMAGES

    teacher, spec = load_model(model)
    teacher.eval()
    train, _ = load_train_val(data, spec.data_config)
    return teacher, DamageMeter(teacher, calibration_images(train, DEFAULT_CALIBRATION_IMAGES))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cached(data: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The images decoded once, as (images, labels) batches that every evaluation reuses."""
    from vitcompress.data import iter_batches

    return [(x, y) for x, y in iter_batches(data, 256)]


def _plan_all(args: argparse.Namespace, teacher: Any, analysis: Any, calib: torch.Tensor) -> list[Entry]:
    """A plan for every (method, target) and the converted model; the uniform-init ablation."""
    import warnings

    from vitcompress.convert import convert
    from vitcompress.damage import DamageMeter
    from vitcompress.plan import Deployment, make_plan
    from vitcompress.plan_types import DEFAULT_TOME_METRIC

    torch.set_num_threads(args.threads)  # the planner times candidates: the deployment's threads
    # The frontier compares at batch 32 (batch-1 speed-ups are reported beside it): no batch-1 floor,
    # so token merging is chosen as its authors use it, by its speed at the batch compared.
    deployment = Deployment(device="cpu", batch_size=32, threads=args.threads, seconds=args.plan_seconds,
                            batch1_floor=None)
    meter = DamageMeter(teacher, calib, analysis.attention_means)  # one meter: each change measured once
    entries = []
    for method in args.methods.split(","):
        for target in (float(s) for s in args.speedups.split(",")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an unreachable target is a row that says so
                metric = args.tome_metric if method == "tome" else DEFAULT_TOME_METRIC
                plan = make_plan(teacher, analysis, target, method=method, calibration=meter,
                                 attention_means=analysis.attention_means, deployment=deployment,
                                 tome_metric=metric, log=_log)
            _log(f"{method} {target}x: {plan.describe()} (measured {plan.measured.get('speedup') or 0:.2f}x)")
            entries.append(Entry(method, "mean-init", target, plan, convert(teacher, plan, analysis.attention_means)))
    base = next((e for e in entries if e.method == "dgssa-glad" and e.target == 2.0), None)
    if base is not None and not args.no_uniform_ablation:
        # Does inheriting the dynamic attention matter? The 2x plan with static attention in the
        # first two blocks (if it has none), started from the mean map and from uniform attention.
        plan = dataclasses.replace(base.plan, static_layers=base.plan.static_layers or _first_static(base.plan))
        for variant, means in (("static-mean-init", analysis.attention_means), ("static-uniform-init", None)):
            entries.append(Entry("dgssa-glad", variant, 2.0, plan, convert(teacher, plan, means)))
    torch.set_num_threads(args.train_threads)
    return entries


def _first_static(plan: Any) -> list[int]:
    first = plan.reductions[0].before_block if plan.reductions else plan.num_blocks
    return list(range(min(2, first)))


def _finetune_all(args: argparse.Namespace, entries: list[Entry], teacher: Any, train: Any, val_batches: Any,
                  test_batches: Any) -> list[Entry]:
    from vitcompress.bench import evaluate_top1
    from vitcompress.finetune import FinetuneConfig, finetune

    trained, done_by_key = [], {}
    tuned = set(args.finetune_methods.split(","))
    todo = [e for e in entries if e.method in tuned and (e.plan.measured.get("budget_met") or e.variant != "mean-init")]
    keys = {(_plan_key(e.plan), e.variant) for e in todo}
    shared = [e for e in entries if e.method not in tuned and (_plan_key(e.plan), e.variant) in keys]
    todo += shared  # same plan as a fine-tuned one: its rows reuse that model
    for k, e in enumerate(todo):
        key = (_plan_key(e.plan), e.variant)
        if key not in done_by_key:
            _log(f"[{k + 1}/{len(todo)}] fine-tuning {e.method} {e.target}x {e.variant} ({e.plan.describe()}) for {args.steps} steps")
            config = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, num_workers=1, progress=False,
                                    augment="shift" if args.quick else "flip-shift")
            finetune(e.model, teacher, train, None, config, log=lambda m: None)
            e.model.eval()
            done_by_key[key] = (e.model, evaluate_top1(e.model, test_batches), evaluate_top1(e.model, val_batches))
            _log(f"   test top-1 {done_by_key[key][1]:.4f}, val top-1 {done_by_key[key][2]:.4f}")
        model, top1, val_top1 = done_by_key[key]
        trained.append(dataclasses.replace(e, model=model, trained=True, top1=top1, val_top1=val_top1))
    return trained


def _time_all(args: argparse.Namespace, teacher: Any, entries: list[Entry]) -> dict[tuple[str, int], Any]:
    """Every distinct plan timed with the original, in one interleaved bench run."""
    from vitcompress.bench import bench

    models = {"original": teacher}
    for e in entries:
        models.setdefault(_plan_key(e.plan), e.model)
    result = bench(models, baseline="original", batch_sizes=(1, 32), threads=args.threads,
                   repeats=args.repeats, progress=_log)
    return {(m.model, m.batch_size): m for m in result.measurements}


def _plan_key(plan: Any) -> str:
    return plan.describe()


def _rows(args: argparse.Namespace, free: list[Entry], trained: list[Entry], speeds: dict) -> list[dict[str, Any]]:
    rows = []
    for e in free + trained:
        for batch in (32, 1):
            m = speeds.get((_plan_key(e.plan), batch))
            rows.append({
                "method": e.method, "variant": e.variant, "target_speedup": e.target,
                "finetune_steps": args.steps if e.trained else 0, "top1": e.top1, "val_top1": e.val_top1,
                "speedup": m.speedup if m else None, "speedup_q25": m.speedup_q25 if m else None,
                "speedup_q75": m.speedup_q75 if m else None, "batch_size": batch, "threads": args.threads,
                "reached": bool(m is not None and m.speedup >= e.target * 0.97) if batch == 32 else None,
                "planner_speedup": e.plan.measured.get("speedup"), "planner_budget_met": e.plan.measured.get("budget_met"),
                "plan": e.plan.to_dict(),
            })
    return rows


def _write(out: Path, report: dict[str, Any]) -> None:
    from vitcompress._io import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "frontier.json", report)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in report["rows"]:
        writer.writerow({**{c: ("" if row[c] is None else row[c]) for c in COLUMNS}, "plan": _describe(row["plan"])})
    write_text_atomic(out / "frontier.csv", table.getvalue())
    write_text_atomic(out / "frontier.md", markdown_table(report) + "\n" + head_to_head(report))
    _plot(out / "frontier.png", report)
    _log(f"wrote {out / 'frontier.json'}, frontier.csv, frontier.md and frontier.png")


def markdown_table(report: dict[str, Any]) -> str:
    """The frontier as a markdown table: one line per (method, target, variant), top-1 training-free
    and fine-tuned, measured speed-up at batch 32 and batch 1."""
    cells: dict[tuple, dict[str, Any]] = {}
    for r in report["rows"]:
        key = (r["target_speedup"], r["method"], r["variant"])
        c = cells.setdefault(key, {"plan": _describe(r["plan"])})
        c["free" if not r["finetune_steps"] else "tuned"] = r["top1"]
        c[f"b{r['batch_size']}"] = r["speedup"]
        if r["batch_size"] == 32:
            c["reached"] = r["reached"]
    steps = report["settings"]["steps"]
    teacher = report["teacher"]["top1"]
    lines = [f"| target | method | variant | plan | top-1 training-free | top-1 after {steps} steps | speed-up b32 | speed-up b1 |",
             "|---|---|---|---|---|---|---|---|",
             f"| - | original | - | - | {100 * teacher:.2f}% | - | 1.00x | 1.00x |"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    for (target, method, variant), c in sorted(cells.items()):
        reach = "" if c.get("reached") else " (not reached)"
        lines.append(f"| {target:g}x | {method} | {variant} | {c['plan']} | {pct(c.get('free'))} | {pct(c.get('tuned'))} | "
                     f"{c.get('b32', 0):.2f}x{reach} | {c.get('b1', 0):.2f}x |")
    return "\n".join(lines) + "\n"


def interpolate(points: list[tuple[float, float]], x: float) -> Optional[float]:
    """y at ``x`` on the line through ``points`` (x, y), or None outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1] if len(points) == 1 and points[0][0] == x else None


def _fine_tuned_curves(report: dict[str, Any]) -> tuple[Optional[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """Ours' name (``auto``, else ``dgssa-glad``), our fine-tuned batch-32 rows (one per plan) and
    token merging's, fastest last."""
    tuned = [r for r in report["rows"] if r["finetune_steps"] and r["batch_size"] == 32 and r["variant"] == "mean-init"
             and r["speedup"] is not None]
    ours_name = next((m for m in ("auto", "dgssa-glad") if any(r["method"] == m for r in tuned)), None)
    tome = sorted((r for r in tuned if r["method"] == "tome"), key=lambda r: r["speedup"])
    ours = sorted({_describe(r["plan"]): r for r in tuned if r["method"] == ours_name}.values(), key=lambda r: r["speedup"])
    return ours_name, ours, tome


def head_to_head(report: dict[str, Any]) -> str:
    """Ours (``auto``, else ``dgssa-glad``) against token merging, both fine-tuned, at batch 32: at
    each of token merging's measured speed-ups, our top-1 on test and validation interpolated
    linearly between our measured points ("not covered" outside them); then both interpolated at
    each target speed-up (issue 13 asks for every speed-up from 1.5x to 3x, not only where token
    merging's points happen to fall)."""
    ours_name, ours, tome = _fine_tuned_curves(report)
    if ours_name is None or not tome:
        return ""
    lines = [f"At token merging's measured speed-ups (batch 32), {ours_name} interpolated between its own points "
             f"(both fine-tuned {report['settings']['steps']} steps):", "",
             f"| speed-up | token merging test / val | {ours_name} test / val (interpolated) | difference test / val |",
             "|---|---|---|---|"]
    lines += [_compared(r["speedup"], (r["top1"], r["val_top1"]), _top1_at(ours, r["speedup"])) for r in tome]
    targets = sorted({float(r["target_speedup"]) for r in report["rows"] if r.get("target_speedup") is not None})
    lines += ["", "Both interpolated at each target speed-up (measured, batch 32):", "",
              f"| speed-up | token merging test / val | {ours_name} test / val | difference test / val |", "|---|---|---|---|"]
    lines += [_compared(x, _top1_at(tome, x), _top1_at(ours, x)) for x in targets]
    return "\n".join(lines) + "\n"


Top1 = tuple[Optional[float], Optional[float]]  # test, validation


def _top1_at(rows: list[dict[str, Any]], speedup: float) -> Top1:
    """Test and validation top-1 interpolated at ``speedup`` between ``rows``' measured points."""
    return tuple(interpolate([(r["speedup"], r[key]) for r in rows], speedup) for key in ("top1", "val_top1"))  # type: ignore[return-value]


def _compared(speedup: float, theirs: Top1, mine: Top1) -> str:
    """One table line: token merging's and our top-1 at ``speedup``, and the difference."""
    pair = lambda t, v: "not covered" if t is None or v is None else f"{100 * t:.2f}% / {100 * v:.2f}%"  # noqa: E731
    covered = None not in (*theirs, *mine)
    diff = f"{100 * (mine[0] - theirs[0]):+.2f} / {100 * (mine[1] - theirs[1]):+.2f} pt" if covered else "-"  # type: ignore[operator]
    return f"| {speedup:.2f}x | {pair(*theirs)} | {pair(*mine)} | {diff} |"


def _describe(plan: dict[str, Any]) -> str:
    from vitcompress.plan_types import Plan

    return Plan.from_dict(plan).describe()


def _plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in report["rows"]:
        if r["batch_size"] == 32 and r["speedup"] is not None and r["variant"] == "mean-init":
            lines.setdefault((r["method"], r["finetune_steps"]), []).append((r["speedup"], r["top1"]))
    for (method, steps), points in sorted(lines.items()):
        points.sort()
        style = "-" if steps else "--"
        label = f"{method}, " + (f"fine-tuned {steps} steps" if steps else "training-free")
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], style, marker="o", label=label)
    ax.axhline(100 * report["teacher"]["top1"], color="gray", lw=0.8, label="original")
    ax.set_xlabel("measured speed-up (batch 32, %d thread%s)" % (report["settings"]["threads"],
                                                                 "" if report["settings"]["threads"] == 1 else "s"))
    ax.set_ylabel("top-1 (%) on the test split")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
