"""Does a block's time follow its token count, and does the planner's latency table predict plans?

    python benchmarks/token_count_latency.py            # the CIFAR-10 teacher, batch 32, 1 thread, ~2 min
    python benchmarks/token_count_latency.py --plan 'r=[17,0,0,16,0,0,16,0,0,8,0,0]' --plan 'r=[18,0,0,17,0,0,15,0,0,7,0,0]'

Times the teacher's first block's attention and MLP halves (``cost.block_halves``) at every token
count from 1 to the original's with ``timing.time_token_counts`` (the planner's latency table,
in the timing process), prints milliseconds per batch and per token, then for each token-merging
plan (``--plan 'r=[...]'``, default: the every-3 pairs of docs/RESULTS.md) its FLOP speed-up,
its table speed-up (``cost.table_speedup``) and its measured speed-up (``TimingWorker.compare``,
``--seconds`` each), so the two predictions can be compared with the measurement.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vitcompress.convert import convert
from vitcompress.cost import LatencyTable, block_halves, flop_speedup, model_geometry, table_speedup
from vitcompress.geometry import input_size
from vitcompress.models import load_model
from vitcompress.plan_types import Plan
from vitcompress.timing import TimingWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import TEACHER  # noqa: E402

DEFAULT_PLANS = [
    "r=[17,0,0,16,0,0,16,0,0,8,0,0]",  # 65 -> 48 -> 32 -> 16 -> 8 tokens
    "r=[18,0,0,17,0,0,15,0,0,7,0,0]",  # 65 -> 47 -> 30 -> 15 -> 8
    "r=[22,0,0,21,0,0,11,0,0,5,0,0]",
    "r=[23,0,0,21,0,0,10,0,0,5,0,0]",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", action="append", help="a token-merging schedule, 'r=[...]' (repeatable)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table-seconds", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=6.0, help="timing of each plan against the original")
    ap.add_argument("--json", type=Path, help="write the table and the plans' figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher, _ = load_model(f"local-dir:{TEACHER}")
    teacher.eval()
    geom = model_geometry(teacher)
    counts = list(range(1, geom.num_tokens + 1))
    with TimingWorker(on_fallback=print) as worker:
        seconds = worker.time_token_counts(block_halves(teacher.blocks[0]), geom.embed_dim, counts,
                                           batch_size=args.batch_size, threads=args.threads, seconds=args.table_seconds)
        table = LatencyTable(attention=seconds["attention"], mlp=seconds["mlp"])
        print(f"block 0, batch {args.batch_size}, {args.threads} thread(s): ms per call (us per token)")
        print("tokens | attention | mlp | block")
        for n in counts:
            a, m = 1e3 * table.attention[n], 1e3 * table.mlp[n]
            print(f"{n} | {a:.3f} ({1e3 * a / n:.0f}) | {m:.3f} ({1e3 * m / n:.0f}) | {a + m:.3f} ({1e3 * (a + m) / n:.0f})")
        rows = []
        print("\nplan | FLOP speed-up | table speed-up | measured (quartiles)")
        for text in args.plan or DEFAULT_PLANS:
            merges = json.loads(text.split("=", 1)[1])
            plan = Plan(num_blocks=geom.depth, num_prefix_tokens=geom.num_prefix_tokens, grid=geom.grid,
                        merge_r=merges, method="tome")
            student = convert(teacher, plan).eval()
            measured = worker.compare(teacher, student, input_size(teacher), batch_size=args.batch_size,
                                      threads=args.threads, seconds=args.seconds)
            row = {"merge_r": merges, "tokens": plan.tokens_per_block(), "flop_speedup": flop_speedup(geom, plan),
                   "table_speedup": table_speedup(geom, plan, table), "measured": measured.to_dict()}
            rows.append(row)
            print(f"{text} | {row['flop_speedup']:.2f}x | {row['table_speedup']:.2f}x | {measured.speedup:.2f}x "
                  f"({measured.speedup_q25:.2f}-{measured.speedup_q75:.2f})", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"attention_s": table.attention, "mlp_s": table.mlp, "plans": rows}, indent=1))


if __name__ == "__main__":
    main()
