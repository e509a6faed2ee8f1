"""Where the time goes at batch 1: torch.profiler self-CPU time per op kind for the original model
and its compressed forms (a GLAD plan and a token-merging plan), 1 thread.

    python benchmarks/batch1_profile.py                 # the CIFAR-10 teacher in ../shared
    python benchmarks/batch1_profile.py --quick         # the built-in demo
    python benchmarks/batch1_profile.py --plan 2x=benchmarks/results/planner-1000/amd-paired-2x-run2.plan.json

Prints, per model, the total time of ``--calls`` forward passes and the ops that take most of it;
``--plan NAME=PATH`` (repeatable) profiles those plans instead of the built-in GLAD and
token-merging examples. ``ops_per_call`` counts every op the profiler saw, which at batch 1 is
what most of the time goes to.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


def profile(model: torch.nn.Module, x: torch.Tensor, calls: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode():
        for _ in range(5):
            model(x)  # warm up outside the profile
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                model(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "ms_per_call": total / 1e3 / calls,
        "ops_per_call": sum(e.count for e in events) // calls,
        "ops": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3),
                 "us_per_call": round(e.self_cpu_time_total / calls, 1), "count_per_call": e.count // calls}
                for e in ranked],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=f"local-dir:{SHARED / 'models' / 'cifar10-vit12-d96'}")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--plan", action="append", default=[], metavar="NAME=PATH", help="a plan.json to profile (repeatable)")
    args = p.parse_args()
    if args.quick:
        args.model, args.calls = "demo", 10
    torch.set_num_threads(1)

    from vitcompress.convert import convert
    from vitcompress.geometry import input_size
    from vitcompress.models import load_model
    from vitcompress.plan import tome_plan
    from vitcompress.plan_types import Plan, Reduction, load_plan

    model, _ = load_model(args.model)
    model.eval()
    g = model.patch_embed.grid_size
    if args.plan:
        chosen = {name: load_plan(path) for name, path in (spec.split("=", 1) for spec in args.plan)}
    else:
        chosen = {"glad": Plan(reductions=[Reduction(3, [g[0] // 2, 1])], num_blocks=len(model.blocks),
                               num_prefix_tokens=model.num_prefix_tokens, grid=(g[0], g[1])),
                  "tome": tome_plan(model, 6)}
    variants = {"original": model, **{name: convert(model, plan).eval() for name, plan in chosen.items()}}
    x = torch.randn(1, *input_size(model))
    plans = {"original": "none", **{name: plan.describe() for name, plan in chosen.items()}}
    report = {name: {"plan": plans[name], **profile(m, x, args.calls, args.top)} for name, m in variants.items()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
