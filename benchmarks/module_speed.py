"""How close does a static-attention block come to its FLOP-ideal speed-up?

Times one stock timm block (default: a middle block of deit_small_patch16_224, 197 tokens, dim
384, 6 heads; random init, weights do not change the timing) against the same block with its
attention replaced by a frozen ``DGSSA``, interleaved (``measure_interleaved``: rotating order,
garbage collector paused), at each batch size, on an explicit thread count. Prints JSON: per batch
size the medians, the measured speed-up (median of the per-round ratios, with quartiles), the
FLOP-ideal speed-up (multiply-adds of the dynamic block / the static block, ``BlockGeometry.macs``)
and measured / ideal.

    PYTHONPATH=src python benchmarks/module_speed.py                 # deit_small, batch 32 and 1, 1 thread
    PYTHONPATH=src python benchmarks/module_speed.py --threads 2 --batch-sizes 1
    PYTHONPATH=src python benchmarks/module_speed.py --quick         # tiny config: a smoke test, seconds

Run it on a quiet machine: other processes on the same cores make timings slower and noisier.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from typing import Any

import timm
import torch
from torch import nn

from vitcompress.timing import measure_interleaved, speedup
from vitcompress.cost import model_geometry
from vitcompress.modules import DGSSA

QUICK = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    p.add_argument("--block", type=int, default=None, help="block index (default: the middle block)")
    p.add_argument("--batch-sizes", default="32,1", help="comma-separated")
    p.add_argument("--threads", type=int, default=1, help="torch threads (explicit: timings depend on it)")
    p.add_argument("--warmup", type=int, default=3, help="untimed interleaved rounds")
    p.add_argument("--repeats", type=int, default=15, help="timed interleaved rounds")
    p.add_argument("--min-call-ms", type=float, default=20.0,
                   help="calls per sample are repeated to last about this long (short calls time poorly one by one)")
    p.add_argument("--quick", action="store_true", help="tiny model, batch 4 and 1, few rounds: a smoke test")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    if args.quick:
        args.batch_sizes, args.warmup, args.repeats, args.min_call_ms = "4,1", 1, 3, 2.0
    return args


def build_blocks(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(stock block, frozen-DGSSA block, description with the FLOP-ideal speed-up)."""
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, **(QUICK if args.quick else {})).eval()
    index = len(model.blocks) // 2 if args.block is None else args.block
    if not 0 <= index < len(model.blocks):
        sys.exit(f"--block {index} is out of range: {args.model} has blocks 0..{len(model.blocks) - 1}")
    geom = model_geometry(model)
    tokens = geom.num_tokens
    dynamic = model.blocks[index]
    static = copy.deepcopy(dynamic)
    static.attn = DGSSA(dynamic.attn, tokens).freeze()
    macs_dyn, macs_static = geom.blocks[index].macs(tokens), geom.blocks[index].macs(tokens, static=True)
    info = {
        "model": args.model + (" (quick: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()) + ")" if args.quick else ""),
        "block": index,
        "tokens": tokens,
        "embed_dim": geom.blocks[index].embed_dim,
        "num_heads": geom.blocks[index].num_heads,
        "macs_per_image": {"dynamic": macs_dyn, "static": macs_static},
        "flop_ideal_speedup": macs_dyn / macs_static,
    }
    return dynamic, static, info


def time_batch(dynamic: nn.Module, static: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved timing of both blocks on ``x``; seconds are per call."""
    with torch.inference_mode():
        dynamic(x)  # the first call is slow (allocations): size the repeats on a warm one
        one = measure_interleaved({"dynamic": lambda: dynamic(x)}, warmup=0, repeats=1)["dynamic"][0]
        calls = max(1, round(args.min_call_ms / 1e3 / max(one, 1e-9)))
        samples = measure_interleaved({"dynamic": lambda: dynamic(x), "static": lambda: static(x)},
                                      warmup=args.warmup, repeats=args.repeats, number=calls)
    per_call = samples  # seconds per call: measure_interleaved divides by number
    ratio = speedup(per_call["dynamic"], per_call["static"])
    return {
        "batch_size": int(x.shape[0]),
        "calls_per_sample": calls,
        "dynamic_ms": statistics.median(per_call["dynamic"]) * 1e3,
        "static_ms": statistics.median(per_call["static"]) * 1e3,
        "speedup": ratio.median,
        "speedup_q25": ratio.q25,
        "speedup_q75": ratio.q75,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dynamic, static, info = build_blocks(args)
    gen = torch.Generator().manual_seed(0)
    results = []
    for b in (int(s) for s in args.batch_sizes.split(",")):
        x = torch.randn(b, info["tokens"], info["embed_dim"], generator=gen)
        row = time_batch(dynamic, static, x, args)
        row["measured_over_ideal"] = row["speedup"] / info["flop_ideal_speedup"]
        results.append(row)
    out = {**info, "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
           "warmup": args.warmup, "repeats": args.repeats, "results": results}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
