"""Module ablation: variants of one plan fine-tuned the same way, with token merging, in one run.

    python benchmarks/ablation.py --target 2 --steps 100 --out benchmarks/results
    python benchmarks/ablation.py --variants glad-linear,glad-adaptive --steps 20   # a subset

Each variant starts from the plan a method chose at ``--target`` in an earlier frontier run
(``--plans``, default benchmarks/results/frontier-intel/frontier.json, the run whose dgssa-glad plans docs/RESULTS.md ablates: the plans are data, so the variants differ
only in what the variant changes), converts the teacher, fine-tunes it for ``--steps`` steps with the
``vitcompress compress`` recipe (plus the variant's recipe change), and reports top-1 on the
validation slice held out of the training split (what choices are made on) and on the test split
(reported only). Then every model is timed with the original in ONE interleaved ``bench`` run
(batch 32 and 1, ``--threads``).

Writes ``--out``/ablation-<target>x.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import DATA, TEACHER, load_setup  # noqa: E402  (the same data handling as the frontier)

# name: (method whose plan it starts from, plan changes, fine-tuning changes)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "tome": ("tome", {}, {}),
    "glad-linear": ("glad", {}, {}),
    "glad-simplex": ("glad", {"glad_mode": "simplex"}, {}),
    "glad-adaptive": ("glad", {"glad_mode": "adaptive"}, {}),
    "glad-linear-lr10": ("glad", {}, {"module_lr_scale": 10.0}),
    "glad-adaptive-lr10": ("glad", {"glad_mode": "adaptive"}, {"module_lr_scale": 10.0}),
    "glad-proportional": ("glad", {"proportional_attention": True}, {}),
    "glad-feat": ("glad", {}, {"feat_weight": 1.0}),
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=f"local-dir:{TEACHER}")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--plans", default="benchmarks/results/frontier-intel/frontier.json", help="frontier.json the base plans come from")
    p.add_argument("--target", type=float, default=2.0)
    p.add_argument("--variants", default="tome,glad-linear,glad-simplex,glad-adaptive,glad-adaptive-lr10,glad-linear-lr10")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads for timing and training")
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default="benchmarks/results")
    return p.parse_args(argv)


def base_plan(report: dict[str, Any], method: str, target: float) -> dict[str, Any]:
    """The plan ``method`` chose at ``target`` in a frontier report."""
    for row in report["rows"]:
        if row["method"] == method and row["target_speedup"] == target and row["variant"] == "mean-init":
            return row["plan"]
    raise SystemExit(f"{method} has no plan at {target}x in the frontier report: run benchmarks/frontier.py")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    from vitcompress._io import read_json, write_json_atomic, write_text_atomic
    from vitcompress.bench import bench, evaluate_top1
    from vitcompress.convert import convert
    from vitcompress.finetune import FinetuneConfig, finetune
    from vitcompress.plan_types import Plan

    started = time.monotonic()
    torch.set_num_threads(args.threads)
    frontier = read_json(args.plans, "run benchmarks/frontier.py first")
    teacher, train, val, val_batches, test_batches = load_setup(args.model, args.data, args.val_images)
    rows, models = [], {"original": teacher}
    converted = {}  # all converted before any fine-tune (fine-tuning freezes the teacher's parameters)
    for name in args.variants.split(","):
        method, plan_changes, recipe = VARIANTS[name]
        plan = Plan.from_dict({**base_plan(frontier, method, args.target), **plan_changes})
        converted[name] = (plan, convert(teacher, plan))
    for name, (plan, model) in converted.items():
        _, plan_changes, recipe = VARIANTS[name]
        free = evaluate_top1(model, val_batches)
        config = dataclasses.replace(FinetuneConfig(steps=args.steps, batch_size=args.batch_size, num_workers=1,
                                                    progress=False, augment="flip-shift"), **recipe)
        t0 = time.monotonic()
        finetune(model, teacher, train, None, config, log=lambda m: None)
        model.eval()
        row = {"variant": name, "plan": plan.describe(), "plan_changes": plan_changes, "recipe": recipe,
               "val_top1_free": free, "val_top1": evaluate_top1(model, val_batches),
               "top1": evaluate_top1(model, test_batches), "train_seconds": time.monotonic() - t0}
        _log(f"{name}: val {row['val_top1_free']:.4f} -> {row['val_top1']:.4f}, test {row['top1']:.4f} "
             f"({row['train_seconds']:.0f} s)")
        rows.append(row)
        models[name] = model
    result = bench(models, baseline="original", batch_sizes=(1, 32), threads=args.threads, repeats=args.repeats,
                   progress=_log)
    speeds = {(m.model, m.batch_size): m for m in result.measurements}
    for row in rows:
        for batch in (32, 1):
            m = speeds[(row["variant"], batch)]
            row[f"speedup_b{batch}"], row[f"speedup_b{batch}_iqr"] = m.speedup, [m.speedup_q25, m.speedup_q75]
    report = {"target": args.target, "steps": args.steps, "threads": args.threads, "torch": torch.__version__,
              "teacher": {"val_top1": evaluate_top1(teacher, val_batches), "top1": evaluate_top1(teacher, test_batches)},
              "rows": rows, "seconds": time.monotonic() - started, "settings": vars(args)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ablation-{args.target:g}x"
    write_json_atomic(out / f"{stem}.json", report)
    write_text_atomic(out / f"{stem}.md", render(report))
    _log(render(report))
    return report


def render(report: dict[str, Any]) -> str:
    t = report["teacher"]
    lines = [f"Teacher: val {t['val_top1']:.2%}, test {t['top1']:.2%}. {report['steps']} fine-tuning steps, "
             f"{report['threads']} thread(s).", "",
             "| variant | plan | val top-1 training-free | val top-1 | test top-1 | speed-up b32 | speed-up b1 |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {r['plan']} | {r['val_top1_free']:.2%} | {r['val_top1']:.2%} | "
                     f"{r['top1']:.2%} | {r['speedup_b32']:.2f}x | {r['speedup_b1']:.2f}x |")
    return "\n".join(lines) + "\n"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
