"""How well does the planner's predicted speed-up match the converted model's measured one?

For each budget: plan (random-init model, no analysis, latency calibration unless --no-calibrate),
convert, then time the original and the converted model side by side at the same batch size
and thread count (interleaved rounds, the order alternating each round), and print the
predicted vs measured speed-up and the error. FLOPs (``vitcompress.flops.count_flops``) and
parameters of the converted model are counted and compared with the plan's predictions.

    PYTHONPATH=src python benchmarks/plan_accuracy.py --threads 2
    PYTHONPATH=src python benchmarks/plan_accuracy.py --model deit_small_patch16_224 --budgets 1.5x,2x,2.5x

Timings need a quiet machine: other processes competing for the cores make both the
calibration and the measurement noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import timm
import torch

from vitcompress.convert import convert
from vitcompress.flops import count_flops
from vitcompress.plan import make_plan, parse_budget


def measure(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Seconds per batch of each model over ``repeats`` interleaved rounds (order alternating)."""
    names = list(models)
    with torch.inference_mode():
        for name in names:  # warm-up
            models[name](x)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                models[name](x)
                times[name].append(time.perf_counter() - start)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deit_small_patch16_224", help="timm architecture (random init)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--budgets", default="1.5x,2x,2.5x")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds per budget")
    ap.add_argument("--no-calibrate", action="store_true", help="plan from FLOPs only")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    base_flops = count_flops(model)
    base_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} @ {args.img_size}, random init; batch {args.batch_size}; torch threads {threads}; "
          f"torch {torch.__version__}, timm {timm.__version__}; calibrate={not args.no_calibrate}")
    print(f"original: {base_flops / 1e9:.3f} GFLOPs/image, {base_params / 1e6:.3f} M params")

    rows = []
    for budget in [b.strip() for b in args.budgets.split(",") if b.strip()]:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = make_plan(model, None, budget, calibrate=not args.no_calibrate, batch_size=args.batch_size, threads=threads)
        plan_s = time.perf_counter() - start
        torch.set_num_threads(threads)
        compressed = convert(model, plan)
        flops = count_flops(compressed)
        params = sum(p.numel() for p in compressed.parameters())
        times = measure({"original": model, "compressed": compressed}, x, args.repeats)
        t0, t1 = statistics.median(times["original"]), statistics.median(times["compressed"])
        # Median of the per-round ratios: the two models of one round ran back to back, so a change
        # in machine load between rounds cancels out (the ratio of medians is printed too).
        paired = [o / c for o, c in zip(times["original"], times["compressed"])]
        measured = statistics.median(paired)
        p = plan.predicted
        row = {
            "budget": budget,
            "target": parse_budget(budget),
            "static_layers": plan.static_layers,
            "reductions": [[r.before_block, r.scales] for r in plan.reductions],
            "tokens_per_block": plan.tokens_per_block(),
            "predicted_speedup": p["speedup"],
            "predicted_flop_speedup": p["flop_speedup"],
            "measured_speedup": measured,
            "measured_speedup_ratio_of_medians": t0 / t1,
            "paired_ratios": paired,
            "error_pct": 100 * (p["speedup"] - measured) / measured,
            "original_ms": t0 * 1e3,
            "compressed_ms": t1 * 1e3,
            "original_img_per_s": args.batch_size / t0,
            "compressed_img_per_s": args.batch_size / t1,
            "predicted_flops": p["flops"],
            "counted_flops": flops,
            "predicted_params": p["params"],
            "counted_params": params,
            "budget_met": p["budget_met"],
            "planning_seconds": plan_s,
            "warnings": [str(w.message) for w in caught],
            "times_s": times,
        }
        rows.append(row)
        print(f"\n{budget}: static {plan.static_layers}, reductions {row['reductions']}, tokens {row['tokens_per_block']} "
              f"(planned in {plan_s:.1f} s)")
        print(f"  original   {t0 * 1e3:9.1f} ms/batch  {args.batch_size / t0:7.2f} img/s   rounds (ms) {[round(t * 1e3) for t in times['original']]}")
        print(f"  compressed {t1 * 1e3:9.1f} ms/batch  {args.batch_size / t1:7.2f} img/s   rounds (ms) {[round(t * 1e3) for t in times['compressed']]}")
        print(f"  speed-up predicted {p['speedup']:.3f}x (FLOPs alone {p['flop_speedup']:.3f}x), measured {measured:.3f}x "
              f"(median of per-round ratios {[round(v, 3) for v in paired]}; ratio of medians {t0 / t1:.3f}x), "
              f"error {row['error_pct']:+.1f}%")
        print(f"  FLOPs predicted {p['flops']:,} counted {flops:,} ({'match' if p['flops'] == flops else 'MISMATCH'}); "
              f"params predicted {p['params']:,} counted {params:,} ({'match' if p['params'] == params else 'MISMATCH'})")
        for w in row["warnings"]:
            print(f"  warning: {w}")

    print(f"\n| budget | static layers | reductions (before block: scales) | GFLOPs | params (M) | predicted | measured | error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        red = ", ".join(f"{b}: {s}" for b, s in r["reductions"]) or "-"
        print(f"| {r['budget']} | {r['static_layers']} | {red} | {r['counted_flops'] / 1e9:.3f} | {r['counted_params'] / 1e6:.3f} | "
              f"{r['predicted_speedup']:.2f}x | {r['measured_speedup']:.2f}x | {r['error_pct']:+.1f}% |")
    print(f"(original: {base_flops / 1e9:.3f} GFLOPs, {base_params / 1e6:.3f} M params; batch {args.batch_size}, {threads} threads)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "img_size": args.img_size, "batch_size": args.batch_size, "threads": threads,
                       "base_flops": base_flops, "base_params": base_params, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
