"""Does a short probe fine-tune predict the full fine-tune better than training-free damage?

    python benchmarks/probe_correlation.py --probe-steps 30 --steps 150 --out benchmarks/results

For a set of plans near one speed (``PLANS``: token merging, GLAD at several depths and pyramids,
static attention before GLAD, static attention plus token merging), on the CIFAR-10 teacher:

* training-free damage: KL(original || converted) on a validation slice held out of the training split;
* post-probe damage: the same KL after a ``--probe-steps`` fine-tune (``vitcompress.probe``, the
  recipe of ``compress``);
* the outcome: validation top-1 after a full ``--steps`` fine-tune (started over, its own schedule),
  with test top-1 reported beside it (never used to choose).

Prints and writes (``--out``/probe-correlation.json and .md) the Spearman rank correlation of each
damage with the outcome (damage against top-1: -1 would be a perfect predictor).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import DATA, TEACHER, load_setup  # noqa: E402

# Plans of the 12-block, 8x8-grid teacher, all between about 1.9x and 2.3x in FLOPs.
PLANS: dict[str, dict[str, Any]] = {
    "tome-decreasing": {"merge_r": [10, 9, 8, 8, 6, 5, 5, 4, 2, 2, 1, 0]},
    "tome-constant": {"merge_r": [5] * 12},
    "glad-b3-4x4+1": {"reductions": [{"before_block": 3, "scales": [4, 1]}]},
    "glad-b2-5x5+1": {"reductions": [{"before_block": 2, "scales": [5, 1]}]},
    "glad-b2-6x6+1-b6-3x3+1": {"reductions": [{"before_block": 2, "scales": [6, 1]}, {"before_block": 6, "scales": [3, 1]}]},
    "static-01-glad-b3-4x4+1": {"static_layers": [0, 1], "reductions": [{"before_block": 3, "scales": [4, 1]}]},
    "static-0-tome": {"static_layers": [0], "merge_r": [0, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0]},
}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 0.0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=f"local-dir:{TEACHER}")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--plans", default=",".join(PLANS))
    p.add_argument("--probe-steps", type=int, default=30)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--out", default="benchmarks/results")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    from vitcompress._io import write_json_atomic, write_text_atomic
    from vitcompress.analyze import analyze
    from vitcompress.bench import evaluate_top1
    from vitcompress.convert import convert
    from vitcompress.cost import flop_speedup, model_geometry
    from vitcompress.finetune import FinetuneConfig, finetune
    from vitcompress.pipeline import calibration_images
    from vitcompress.plan_types import Plan
    from vitcompress.probe import probe_config, probe_plans

    started = time.monotonic()
    torch.set_num_threads(args.threads)
    teacher, train, val, val_batches, test_batches = load_setup(args.model, args.data, args.val_images)
    val_images = calibration_images(val, len(val))
    means = analyze(teacher, train, samples=256).attention_means  # static layers start from the mean map
    geom = model_geometry(teacher)
    base = {"num_blocks": geom.depth, "num_prefix_tokens": geom.num_prefix_tokens, "grid": list(geom.grid)}
    plans = {name: Plan.from_dict({"static_layers": [], **base, **PLANS[name]}) for name in args.plans.split(",")}
    config = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, num_workers=1, progress=False, augment="flip-shift")
    probes = probe_plans(teacher, list(plans.values()), train, val_images, probe_config(config, args.probe_steps),
                         attention_means=means, log=_log)
    rows = []
    for (name, plan), probe in zip(plans.items(), probes):
        student = convert(teacher, plan, means)
        finetune(student, teacher, train, None, config, log=lambda m: None)
        student.eval()
        row = {"plan": name, "describe": plan.describe(), "flop_speedup": flop_speedup(geom, plan),
               "kl_free": probe.kl_free, "kl_probe": probe.kl, "val_top1": evaluate_top1(student, val_batches),
               "top1": evaluate_top1(student, test_batches)}
        _log(f"{name}: KL {row['kl_free']:.4f} free, {row['kl_probe']:.4f} probed; val top-1 {row['val_top1']:.4f} "
             f"after {args.steps} steps (test {row['top1']:.4f})")
        rows.append(row)
    outcome = [r["val_top1"] for r in rows]
    report = {
        "rows": rows, "probe_steps": args.probe_steps, "steps": args.steps, "threads": args.threads,
        "spearman_free": spearman([r["kl_free"] for r in rows], outcome),
        "spearman_probe": spearman([r["kl_probe"] for r in rows], outcome),
        "seconds": time.monotonic() - started, "settings": vars(args),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "probe-correlation.json", report)
    write_text_atomic(out / "probe-correlation.md", render(report))
    _log(render(report))
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"| plan | FLOP speed-up | KL training-free | KL after {report['probe_steps']} probe steps | "
             f"val top-1 after {report['steps']} steps | test top-1 |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['describe']} | {r['flop_speedup']:.2f}x | {r['kl_free']:.4f} | {r['kl_probe']:.4f} | "
                     f"{r['val_top1']:.2%} | {r['top1']:.2%} |")
    lines += ["", f"Spearman rank correlation with validation top-1 after the full fine-tune: training-free KL "
                  f"{report['spearman_free']:+.2f}, post-probe KL {report['spearman_probe']:+.2f} (-1: a perfect predictor)."]
    return "\n".join(lines) + "\n"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
