"""How much does `analyze` cost compared with a plain forward pass over the same images?

Target: at most 3x the plain forward (deit_small at 224, random init, CPU). Prints the thread
count, ms/image for: the plain forward (timm's default fused attention), the forward with the
attention recorder on (unfused attention, maps captured and dropped), and the full analysis
(capture + streaming statistics; the SVDs run one matrix per thread), and the ratio to the plain forward.

Timed with `vitcompress.timing` (the timer of every vitcompress figure): the three run interleaved,
once each per round, the first one rotating; ms/image is the median over rounds and the ratio the
median of the per-round ratios.

    PYTHONPATH=src python benchmarks/analyze_speed.py                      # deit_small, 224, 64 images
    PYTHONPATH=src python benchmarks/analyze_speed.py --images 16 --threads 2
"""

from __future__ import annotations

import argparse

import timm
import torch

from vitcompress.analyze import AttentionRecorder, analyze
from vitcompress.timing import Stats, measure_interleaved, speedup, torch_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's current)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs all three once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    images = torch.randn(args.images, 3, args.img_size, args.img_size)
    batches = images.split(args.batch_size)

    def plain() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(batch)

    def recorded() -> None:
        with AttentionRecorder(model, keep=False), torch.inference_mode():
            for batch in batches:
                model(batch)

    def analysis() -> None:
        analyze(model, images, samples=args.images, batch_size=args.batch_size, progress=False)

    runners = {"plain": plain, "recorded": recorded, "analysis": analysis}
    with torch_threads(args.threads) as threads:
        seconds = measure_interleaved(runners, warmup=args.warmup, repeats=args.repeats)

    n = args.images
    ms = {name: Stats.of(samples).median / n * 1e3 for name, samples in seconds.items()}
    recorded_ratio = speedup(seconds["recorded"], seconds["plain"]).median  # per-round recorded / plain
    analysis_ratio = speedup(seconds["analysis"], seconds["plain"]).median
    print(f"model {args.model} (random init), {args.img_size}x{args.img_size}, {n} images, batch {args.batch_size}, "
          f"torch threads {threads} (SVDs: one matrix per thread, {threads} threads), "
          f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up")
    print(f"plain forward (fused attention): {ms['plain']:8.1f} ms/image")
    print(f"forward + attention capture:     {ms['recorded']:8.1f} ms/image  ({recorded_ratio:.2f}x plain)")
    print(f"full analysis:                   {ms['analysis']:8.1f} ms/image  ({analysis_ratio:.2f}x plain; target <= 3x)")


if __name__ == "__main__":
    main()
