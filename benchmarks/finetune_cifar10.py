"""Compress the CIFAR-10 ViT (12 blocks, dim 96) at a budget, fine-tune, and report top-1 and speed-up.

Needs the shared teacher and data (not part of the repository):

    python benchmarks/finetune_cifar10.py --threads 1 --budget 2x --steps 1000

It runs the same pipeline as `vitcompress compress` (analysis on 256 training images, calibrated
plan, conversion, distillation fine-tuning on the 50k training images, quick interleaved timing)
and prints one JSON object with every figure and the settings that produced it. Equivalent CLI:

    vitcompress compress local-dir:/work/shared/models/cifar10-vit12-d96 --data /work/shared/data/cifar10 \\
        --val-split test --budget 2x --steps 1000 --threads 1 --output OUT.safetensors
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


class StderrLog:
    """Messages on stderr, and `compress`'s progress (analysis, fine-tuning) as a line every 5%."""

    def __init__(self) -> None:
        self._shown: tuple[int, int] = (-1, -1)

    def __call__(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def progress(self, done: int, total: int, text: str) -> None:
        bucket = (total, done * 20 // max(total, 1))
        if bucket != self._shown and done > 0:
            self._shown = bucket
            label, _, info = text.partition(": ")
            self(f"{label} {done}/{total}" + (f": {info}" if info else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=f"local-dir:{SHARED / 'models' / 'cifar10-vit12-d96'}")
    parser.add_argument("--data", default=str(SHARED / "data" / "cifar10"))
    parser.add_argument("--budget", default="2x")
    parser.add_argument("--method", default=None, help="planning method (default: compress's default, auto)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None)
    length.add_argument("--steps", type=int, default=None)
    parser.add_argument("--plan", default=None, help="a plan.json to use instead of planning for --budget")
    parser.add_argument("--analysis", default=None, help="an analysis folder to use instead of analyzing")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (set explicitly: timings depend on it; on a busy shared 2-core machine 1 is faster)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--out-root", default="vitcompress-out/bench-cifar10")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    from vitcompress.finetune import FinetuneConfig
    from vitcompress.pipeline import PlanOptions, compress

    torch.set_num_threads(args.threads)
    settings = {"batch_size": args.batch_size, "num_workers": args.workers, "resume": args.resume,
                "progress": not args.no_progress, "checkpoint_every": 100}
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    if args.steps is not None:
        settings["steps"] = args.steps
    if args.lr is not None:
        settings["lr"] = args.lr
    config = FinetuneConfig(**settings)
    out_root = Path(args.out_root)
    planning = PlanOptions(method=args.method) if args.method else PlanOptions()
    started = time.monotonic()
    result = compress(args.model, args.budget, data=args.data, val_split="test", config=config, plan=args.plan, analysis=args.analysis,
                      planning=planning,
                      out_root=out_root, output=out_root / "model.safetensors", force=True, log=StderrLog())
    report = {
        "model": args.model,
        "data": args.data,
        "budget": args.budget,
        "teacher_top1": result.teacher_top1,
        "student_top1_before_finetune": result.student_top1_before,
        "student_top1": result.student_top1,
        "speedup": result.speedup,
        "plan": {"method": result.plan.method, "describe": result.plan.describe(),
                 "static_layers": result.plan.static_layers,
                 "reductions": [[r.before_block, r.scales] for r in result.plan.reductions],
                 "predicted_speedup": result.plan.predicted.get("speedup"),
                 "measured": result.plan.measured},
        "finetune": result.finetune.to_dict() if result.finetune else None,
        "threads": torch.get_num_threads(),
        "wall_seconds": time.monotonic() - started,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "output": str(result.output),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
