"""The speed table: DeiT originals against training-free conversions at several budgets, on this CPU.

For each model (random init: weights do not change the timing) and each budget, the planner
(`vitcompress.plan.make_plan`, no analysis: static layers in depth order) picks static-attention
layers and token reductions, and `vitcompress.convert.convert` applies them (uniform static
attention, pyramid-pooling aggregation: no training). Then `vitcompress.bench` times the original
and all its conversions side by side, interleaved, at each batch size, with the thread count set
explicitly. Printed: the full bench table per model, then one summary table with the planner's
prediction next to the measured speed-up.

    PYTHONPATH=src python benchmarks/speed.py                                  # the full table
    PYTHONPATH=src python benchmarks/speed.py --models deit_tiny --budgets 2x --batch-sizes 1 --repeats 3
    PYTHONPATH=src python benchmarks/speed.py --threads 2 --json speed.json --out speed.csv

Full table (3 models x 4 variants x 2 batch sizes, 2 warm-up + 10 timed rounds, 2 threads):
a few minutes on a quiet 2-core CPU; deit_base at batch 32 dominates. Run it on a quiet machine:
other processes on the same cores make multi-threaded timings slower and much noisier.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

import torch

ALIASES = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224", "deit_base": "deit_base_patch16_224"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="deit_tiny,deit_small,deit_base", help="comma-separated timm names or deit_* aliases")
    p.add_argument("--budgets", default="1.5x,2x,2.5x", help="comma-separated planner budgets")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core torch sees)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--no-calibrate", action="store_true", help="plan from FLOPs instead of timing the candidates")
    p.add_argument("--plan-batch-size", type=int, default=32, help="batch size the planner times candidates at")
    p.add_argument("--json", dest="json_path", default=None, help="write every bench result and plan to this JSON file")
    p.add_argument("--out", default=None, help="append the bench rows to this CSV file")
    return p.parse_args(argv)


def require_pipeline() -> tuple[Any, Any]:
    """make_plan and convert, or a clear exit when this checkout does not have them yet."""
    try:
        from vitcompress.convert import convert
        from vitcompress.plan import make_plan
    except ImportError as exc:
        sys.exit(f"benchmarks/speed.py needs vitcompress.plan.make_plan and vitcompress.convert.convert: {exc}")
    return make_plan, convert


def convert_all(model: torch.nn.Module, budgets: list[str], args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """{budget: (converted model, plan)} planned for this machine and thread count."""
    make_plan, convert = require_pipeline()
    from vitcompress.plan import Deployment

    out = {}
    for budget in budgets:
        start = time.monotonic()  # a wall-clock note on planning, not a measurement (bench measures)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = make_plan(
                model, None, budget, measure_speed=not args.no_calibrate,
                deployment=Deployment(device="cpu", batch_size=args.plan_batch_size, threads=threads),
            )
        for w in caught:
            print(f"  planner warning ({budget}): {w.message}", file=sys.stderr)
        out[budget] = (convert(model, plan).eval(), plan)
        print(f"  planned {budget} in {time.monotonic() - start:.1f} s: {describe(plan)}", file=sys.stderr)
    return out


def describe(plan: Any) -> str:
    static = ",".join(str(i) for i in plan.static_layers) or "none"
    stages = "; ".join(f"before block {r.before_block}: {r.keep_tokens} tokens {r.scales}" for r in plan.reductions) or "none"
    return f"static layers [{static}], reductions [{stages}]"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from vitcompress.bench import append_csv, bench, parse_batch_sizes

    require_pipeline()  # fail before any work if the planner or converter is missing
    console = Console()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)  # the planner calibrates with the same threads bench times with
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    console.print(
        f"torch {torch.__version__}, threads: {threads} (torch.set_num_threads; {os.cpu_count()} cores visible), "
        f"batch sizes {list(batch_sizes)}, {args.warmup} warm-up + {args.repeats} timed rounds, img {args.img_size}"
    )
    import timm

    summary = Table(title=f"Training-free conversions on CPU, threads: {threads} (speed-up vs the original: median of per-round ratios, IQR)")
    columns = ["model", "budget", "plan", "planner", "GFLOPs", "planner GFLOPs", "params"]
    for column in columns + [f"speed-up b{b}" for b in batch_sizes]:
        summary.add_column(column, justify="left" if column in ("model", "plan") else "right")
    dump: list[dict[str, Any]] = []
    started = time.monotonic()
    for alias in [m.strip() for m in args.models.split(",") if m.strip()]:
        name = ALIASES.get(alias, alias)
        print(f"{alias}: planning {', '.join(budgets)}", file=sys.stderr)
        original = timm.create_model(name, pretrained=False, img_size=args.img_size).eval()
        variants = convert_all(original, budgets, args, threads)
        models = {"original": original, **{b: m for b, (m, _) in variants.items()}}
        result = bench(
            models, baseline="original", batch_sizes=batch_sizes, threads=threads, warmup=args.warmup,
            repeats=args.repeats, progress=lambda s: print(f"  {s}", file=sys.stderr),
        )
        console.print(bench_table(result, f"{alias} at {args.img_size}"))
        add_summary_rows(summary, alias, result, variants, batch_sizes)
        dump.append({"model": name, "bench": result.to_dict(), "plans": {b: p.to_dict() for b, (_, p) in variants.items()}})
        if args.out:
            append_csv(renamed(result, alias), args.out)
    console.print(summary)
    console.print(f"total {time.monotonic() - started:.0f} s")
    if args.json_path:
        from vitcompress._io import write_json_atomic

        write_json_atomic(args.json_path, {"threads": threads, "results": dump})


def bench_table(result: Any, title: str) -> Any:
    """One row per variant and batch size of a `vitcompress.bench` result (the CLI prints a fuller one)."""
    from rich.markup import escape
    from rich.table import Table

    from vitcompress.flops import format_flops

    s = result.settings
    table = Table(title=f"{title}: {s['device_name']} ({s['device']}), threads {s['threads']}, {s['dtype']}",
                  caption=f"median of {s['repeats']} interleaved timed rounds after {s['warmup']} warm-up; "
                          "speed-up = median of per-round time ratios (IQR)")
    for column in ("model", "batch", "ms/img", "spread", "img/s", "speed-up", "params", "FLOPs", "peak mem"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for batch in s["batch_sizes"]:
        for m in (x for x in result.measurements if x.batch_size == batch):
            info = result.model(m.model)
            ms = m.ms_per_image
            speed = "-" if m.speedup is None else f"{m.speedup:.2f}x ({m.speedup_q25:.2f}-{m.speedup_q75:.2f})"
            memory = "-" if m.peak_mem_bytes is None else f"{m.peak_mem_bytes / 2**20:.1f} MiB"
            table.add_row(escape(m.model), str(batch), f"{ms.median:.3f}", f"{ms.q25:.3f}-{ms.q75:.3f}",
                          f"{m.images_per_s:.1f}", speed, f"{info.params / 1e6:.2f} M", format_flops(info.flops), memory)
    return table


def renamed(result: Any, alias: str) -> Any:
    """The same result with model names prefixed by the base model (`deit_tiny/2x`), for the CSV."""
    import copy

    out = copy.deepcopy(result)
    for m in out.models:
        m.name = f"{alias}/{m.name}"
    for m in out.measurements:
        m.model = f"{alias}/{m.model}"
    out.baseline = f"{alias}/{result.baseline}"
    return out


def add_summary_rows(table: Any, alias: str, result: Any, variants: dict[str, Any], batch_sizes: tuple[int, ...]) -> None:
    from rich.markup import escape

    for name in ["original", *variants]:
        info = result.model(name)
        plan = variants[name][1] if name in variants else None
        predicted = "-"
        if plan is not None:  # what the planner judged the plan on: its measured speed-up (timing.compare_speed) when timed
            from vitcompress.plan import plan_speedup

            kind = "measured" if plan.measured.get("speedup") is not None else "predicted"
            predicted = f"{plan_speedup(plan):.2f}x {kind}"
        planner_flops = f"{plan.predicted['flops'] / 1e9:.2f}" if plan is not None and "flops" in plan.predicted else "-"
        row = [alias, name, describe(plan) if plan is not None else "-", predicted, f"{info.flops / 1e9:.2f}", planner_flops, f"{info.params / 1e6:.1f} M"]
        for b in batch_sizes:
            m = result.measurement(name, b)
            row.append(f"{m.speedup:.2f}x ({m.speedup_q25:.2f}-{m.speedup_q75:.2f})")
        table.add_row(*(escape(cell) for cell in row))  # "[...]" in plan descriptions is not markup


if __name__ == "__main__":
    main()
