"""How much does `analyze` cost compared with a plain forward pass over the same images?

Target: at most 3x the plain forward (deit_small at 224, random init, CPU). Prints the thread
count, ms/image for: the plain forward (timm's default fused attention), the forward with the
attention recorder on (unfused attention, maps captured and dropped), and the full analysis
(capture + streaming statistics; the SVDs run one matrix per thread), and the ratio to the plain forward.

    PYTHONPATH=src python benchmarks/analyze_speed.py                      # deit_small, 224, 64 images
    PYTHONPATH=src python benchmarks/analyze_speed.py --images 16 --threads 2
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from vitcompress.analyze import AttentionRecorder, analyze


def timed(fn, repeats: int) -> float:
    """Best of ``repeats`` wall-clock runs, in seconds (the least disturbed by other processes)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's current)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is reported")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

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

    with torch.inference_mode():
        model(batches[0])  # warm-up: allocator, kernels
    t_plain = timed(plain, args.repeats)
    t_recorded = timed(recorded, args.repeats)
    t_analysis = timed(analysis, args.repeats)

    n = args.images
    print(f"model {args.model} (random init), {args.img_size}x{args.img_size}, {n} images, batch {args.batch_size}, "
          f"torch threads {threads} (SVDs: one matrix per thread, {threads} threads), best of {args.repeats}")
    print(f"plain forward (fused attention): {t_plain / n * 1e3:8.1f} ms/image")
    print(f"forward + attention capture:     {t_recorded / n * 1e3:8.1f} ms/image  ({t_recorded / t_plain:.2f}x plain)")
    print(f"full analysis:                   {t_analysis / n * 1e3:8.1f} ms/image  ({t_analysis / t_plain:.2f}x plain; target <= 3x)")


if __name__ == "__main__":
    main()
