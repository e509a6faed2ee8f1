"""The old-against-new planner table of docs/RESULTS.md, from the reports of `planner_1000.sh`.

    bash benchmarks/planner_1000.sh /tmp/p1000 "auto 2x" "old 2x benchmarks/results/planner-1000/old-planner-2x.plan.json"
    python benchmarks/planner_table.py /tmp/p1000 --out benchmarks/results/planner-1000

For every report (OUT/<name>.json, written by `finetune_cifar10.py`) it reads the plan from the
run's run.json, measures its training-free damage the way the planner does (KL of the original's
predictions to the converted model's on the same 256 calibration images of the training split,
`compress`'s sample), and writes one row: the plan, that damage, test top-1 before and after the
fine-tune, and the speed-ups (the planner's, the exported file's; batch 32, 1 thread). The old
planner records no measured damage, so measuring all plans here puts them on one scale. Test
top-1 is reported only: nothing here chooses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
CALIBRATION_IMAGES = 256  # compress's default (PlanOptions.calibration_images)


def _run_json(report_path: Path) -> dict[str, Any]:
    from vitcompress._io import read_json

    runs = sorted((report_path.parent / f"work-{report_path.stem}").glob("*/finetune/run.json"))
    if not runs:
        raise SystemExit(f"no run.json for {report_path}: was it written by planner_1000.sh?")
    return read_json(runs[-1], "rerun planner_1000.sh for this run")


def _means(root: Path) -> Optional[dict[int, torch.Tensor]]:
    """Attention means of the teacher from any run's analysis (static layers start from them)."""
    from vitcompress.analyze import load_analysis

    found = sorted(root.glob("work-*/*/analysis.json"))
    return load_analysis(found[0]).attention_means if found else None


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", help="the OUT folder of planner_1000.sh")
    parser.add_argument("--model", default=f"local-dir:{SHARED / 'models' / 'cifar10-vit12-d96'}")
    parser.add_argument("--data", default=str(SHARED / "data" / "cifar10"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="folder for table.md, table.json and the reports")
    args = parser.parse_args()

    from vitcompress.damage import DamageMeter
    from vitcompress.data import load_train_val
    from vitcompress.models import load_model
    from vitcompress.pipeline import calibration_images
    from vitcompress.plan_types import Plan

    torch.set_num_threads(args.threads)
    root = Path(args.reports)
    reports = sorted(p for p in root.glob("*.json") if p.stat().st_size > 0)
    teacher, spec = load_model(args.model)
    train, _ = load_train_val(args.data, spec.data_config)
    meter = DamageMeter(teacher.eval(), calibration_images(train, CALIBRATION_IMAGES), _means(root))
    rows = []
    for path in reports:
        report = json.loads(path.read_text())
        plan = Plan.from_dict(_run_json(path)["plan"])
        damage = meter.whole(plan)
        measured = report["plan"].get("measured") or {}
        rows.append({
            "run": path.stem, "budget": report["budget"], "plan": plan.describe(), "method": plan.method,
            "kl": damage.kl, "agreement": damage.agreement,
            "teacher_top1": report["teacher_top1"], "top1_before": report["student_top1_before_finetune"],
            "top1": report["student_top1"], "steps": (report.get("finetune") or {}).get("steps"),
            "planner_speedup": measured.get("speedup"), "file_speedup": report["speedup"]["speedup"],
            "batch1_speedup": (measured.get("batch1") or {}).get("speedup"),
        })
        print(f"{path.stem}: {plan.describe()}: KL {damage.kl:.4f}", file=sys.stderr, flush=True)
    lines = ["| run | budget | plan | KL (256 train images) | top-1 before | top-1 after | vs teacher | planner speed-up | file speed-up | batch 1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        planner = "-" if r["planner_speedup"] is None else f"{r['planner_speedup']:.2f}x"
        single = "-" if r["batch1_speedup"] is None else f"{r['batch1_speedup']:.2f}x"
        lines.append(f"| {r['run']} | {r['budget']} | {r['plan']} | {r['kl']:.4f} | {_pct(r['top1_before'])} | {_pct(r['top1'])} | "
                     f"{100 * (r['top1'] - r['teacher_top1']):+.2f} pt | {planner} | {r['file_speedup']:.2f}x | {single} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(table + "\n")
        (out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
        for path in reports:
            shutil.copyfile(path, out / f"{path.stem}.report.json")


if __name__ == "__main__":
    main()
