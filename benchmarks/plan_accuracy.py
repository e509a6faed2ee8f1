"""Does the speed-up the planner measured hold when ``vitcompress bench`` measures the plan?

For each budget: make the plan (``make_plan``: damage measured on ``--data`` calibration images
when given, else the analysis-free proxy; speed timed on the stated deployment), convert the
model, then time the converted model against the original with ``vitcompress.bench.bench`` (the
``bench`` command's own measurement: warm-up, interleaved rounds, median paired ratio) on the same
device, batch size and thread count. Prints one JSON object per budget: the plan, the planner's
measured speed-up, bench's speed-up and their relative difference (target: within 5%), then a
summary object.

    PYTHONPATH=src python benchmarks/plan_accuracy.py                          # deit_small @ 224, random init, 1 thread
    PYTHONPATH=src python benchmarks/plan_accuracy.py --threads 4 --method auto --budgets 2x
    PYTHONPATH=src python benchmarks/plan_accuracy.py --data imagenette --model deit_small
    PYTHONPATH=src python benchmarks/plan_accuracy.py --quick                  # demo model, one budget: seconds

Both measurements need a quiet machine: other processes on the same cores make them disagree for
reasons that are not the planner's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from typing import Any, Optional

import torch

from vitcompress.bench import bench
from vitcompress.convert import convert
from vitcompress.models import load_model
from vitcompress.plan import Deployment, make_plan
from vitcompress.plan_types import DEFAULT_METHOD, METHODS, Budget

TARGET = 0.05  # the planner's measured speed-up should be within 5% of bench's


def _calibration(data: Optional[str], spec: Any, count: int) -> Optional[torch.Tensor]:
    if data is None:
        return None
    from vitcompress.pipeline import calibration_images, load_train_val

    train, _ = load_train_val(data, spec.data_config, log=lambda message: print(message, file=sys.stderr))
    return calibration_images(train, count)


def _row(budget: str, plan: Any, bench_speedup: float, bench_q: tuple[float, float], plan_s: float, bench_s: float,
         caught: list[str]) -> dict[str, Any]:
    m, p = plan.measured, plan.predicted
    planner = m.get("speedup")
    diff = None if planner is None else (planner - bench_speedup) / bench_speedup
    return {
        "budget": budget,
        "target_speedup": Budget.parse(budget).speedup,
        "plan": plan.describe(),
        "method": plan.method,
        "static_layers": plan.static_layers,
        "reductions": [[r.before_block, r.scales] for r in plan.reductions],
        "merge_r": plan.merges(),
        "tokens_per_block": plan.tokens_per_block(),
        "flop_speedup": p["flop_speedup"],
        "planner_predicted_speedup": p["speedup"],
        "planner_measured_speedup": planner,
        "planner_speedup_quartiles": [m["speed"]["speedup_q25"], m["speed"]["speedup_q75"]] if m.get("speed") else None,
        "bench_speedup": bench_speedup,
        "bench_speedup_quartiles": list(bench_q),
        "relative_difference": diff,
        "within_target": None if diff is None else abs(diff) <= TARGET,
        "budget_met": m["budget_met"],
        "near_tie": m["near_tie"],
        "damage": m.get("damage"),
        "damage_source": p["damage_source"],
        "timed_candidates": len(m.get("timed", [])),
        "planning_seconds": plan_s,
        "bench_seconds": bench_s,
        "warnings": caught,
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deit_small_patch16_224", help="model name (random init unless --pretrained)")
    ap.add_argument("--pretrained", action="store_true", help="load the model's weights (default: random init)")
    ap.add_argument("--budgets", default="1.5x,2x,2.5x", help="comma-separated budgets")
    ap.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS)
    ap.add_argument("--data", default=None, help="calibration data (training split) to measure damage on; default: the proxy")
    ap.add_argument("--calibration-images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both measurements (explicit: default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=1.5, help="the planner's timing per candidate")
    ap.add_argument("--repeats", type=int, default=20, help="bench's timed rounds")
    ap.add_argument("--warmup", type=int, default=3, help="bench's warm-up rounds")
    ap.add_argument("--quick", action="store_true", help="the demo model and one budget (a smoke test)")
    ap.add_argument("--json", default=None, help="also write every result to this file")
    args = ap.parse_args(argv)

    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    name, random_init = args.model, not args.pretrained
    if args.quick:
        name, random_init, budgets = "demo", False, ["1.5x"]
        args.batch_size, args.seconds, args.repeats = min(args.batch_size, 8), min(args.seconds, 0.3), min(args.repeats, 10)
        args.calibration_images = min(args.calibration_images, 32)
        args.data = args.data or "demo"
    for b in budgets:
        Budget.parse(b)
    torch.set_num_threads(args.threads)  # damage measurement too: no oversubscribed cores between timings
    torch.manual_seed(0)
    model, spec = load_model(name, random_init=random_init and name != "demo")
    calibration = _calibration(args.data, spec, args.calibration_images)
    deployment = Deployment(device=args.device, batch_size=args.batch_size, threads=args.threads, seconds=args.seconds)
    header = {
        "model": name, "weights": spec.weights, "method": args.method, "batch_size": args.batch_size,
        "threads": args.threads, "device": args.device, "data": args.data,
        "calibration_images": None if calibration is None else int(calibration.shape[0]),
        "torch": torch.__version__, "target_relative_difference": TARGET,
    }
    print(json.dumps({"settings": header}), flush=True)

    rows = []
    for budget in budgets:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = make_plan(model, None, budget, method=args.method, calibration=calibration, deployment=deployment,
                             log=lambda message: print(f"  {message}", file=sys.stderr))
        plan_s = time.perf_counter() - start
        compressed = convert(model, plan)
        start = time.perf_counter()
        result = bench({"original": model, "compressed": compressed}, baseline="original", batch_sizes=(args.batch_size,),
                       device=args.device, threads=args.threads, warmup=args.warmup, repeats=args.repeats)
        bench_s = time.perf_counter() - start
        measured = result.measurement("compressed", args.batch_size)
        row = _row(budget, plan, float(measured.speedup), (float(measured.speedup_q25), float(measured.speedup_q75)),
                   plan_s, bench_s, [str(w.message) for w in caught])
        rows.append(row)
        print(json.dumps(row), flush=True)

    diffs = [abs(r["relative_difference"]) for r in rows if r["relative_difference"] is not None]
    summary = {
        "summary": {
            "budgets": budgets,
            "max_abs_relative_difference": max(diffs) if diffs else None,
            "all_within_target": bool(diffs) and all(d <= TARGET for d in diffs),
        }
    }
    print(json.dumps(summary), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": header, "results": rows, **summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
