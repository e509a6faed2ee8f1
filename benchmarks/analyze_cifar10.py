"""Attention heterogeneity of the shared CIFAR-10 teacher: do the paper's two observations hold?

arXiv:2310.07664 observes that (1) attention maps are more alike across images in early layers
than in late ones (similarity falls with depth) and (2) attention maps are of lower rank in late
layers (rank falls with depth). This runs `analyze` on the 12-block CIFAR-10 ViT in
../shared/models with CIFAR-10 test images, prints the per-layer table, and checks both trends
with Spearman's rank correlation against the block index and the first-third vs last-third means
("falls" needs rho <= -0.6; a negative rho above that is reported as falling weakly).

    PYTHONPATH=src python benchmarks/analyze_cifar10.py --samples 256 --out vitcompress-out/cifar10-vit12-d96

Same as: vitcompress analyze local-dir:../shared/models/cifar10-vit12-d96 --data ../shared/data/cifar10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rich.console import Console
from rich.table import Table

from vitcompress.analyze import Analysis, analyze, save_analysis
from vitcompress.data import load_data
from vitcompress.models import load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def spearman(values: list[float]) -> float:
    """Spearman's rank correlation of ``values`` with their position (ties get average ranks)."""
    x = torch.arange(len(values), dtype=torch.float64)
    y = torch.tensor(values, dtype=torch.float64)
    order = y.argsort()
    ranks = torch.empty_like(y)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    for v in y.unique():  # average ranks over ties
        tied = y == v
        ranks[tied] = ranks[tied].mean()
    x, ranks = x - x.mean(), ranks - ranks.mean()
    return float((x * ranks).sum() / (x.norm() * ranks.norm()))


def trend(name: str, values: list[float]) -> str:
    third = max(1, len(values) // 3)
    first, last = sum(values[:third]) / third, sum(values[-third:]) / third
    rho = spearman(values)
    if rho <= -0.6 and last < first:
        verdict = "falls with depth"
    elif rho < 0 and last < first:
        verdict = "falls weakly (not monotonic)"
    else:
        verdict = "does NOT fall with depth"
    return (f"{name:<22} first {third} blocks {first:.3f} -> last {third} blocks {last:.3f}; "
            f"Spearman rho vs block index {rho:+.2f}: {verdict}")


def layer_table(result: Analysis) -> Table:
    """One row per block (`vitcompress analyze` prints the same measurements in its own table)."""
    table = Table(title=f"{result.model_id}: {result.samples} images, N = {result.num_tokens} tokens, {result.num_heads} heads")
    for header in ("block", "sim", "min", "KL", "r90", "r99", "eff.r", "r90/N", "recommendation"):
        table.add_column(header, justify="left" if header == "recommendation" else "right")
    for layer in result.layers:
        table.add_row(str(layer.index), f"{layer.similarity_mean:.3f}", f"{layer.similarity_min:.3f}", f"{layer.kl_mean:.3f}",
                      f"{layer.rank90_mean:.1f}", f"{layer.rank99_mean:.1f}", f"{layer.effective_rank_mean:.1f}",
                      f"{layer.rank90_norm:.3f}", layer.recommendation)
    return table


def report_trends(result: Analysis) -> None:
    layers = result.layers
    print(trend("similarity (mean)", [layer.similarity_mean for layer in layers]))
    print(trend("rank90 / N", [layer.rank90_norm for layer in layers]))
    print(trend("rank99 / N", [layer.rank99_norm for layer in layers]))
    print(trend("effective rank / N", [layer.effective_rank_norm for layer in layers]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "cifar10-vit12-d96"))
    parser.add_argument("--data", default=str(SHARED / "data" / "cifar10"))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("vitcompress-out") / "cifar10-vit12-d96")
    args = parser.parse_args()
    if not Path(args.model).is_dir() or not Path(args.data).exists():
        raise SystemExit(f"needs {args.model} and {args.data} (the ../shared folder beside the checkout)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model, spec = load_model(f"local-dir:{args.model}")
    data = load_data(args.data, split="test", data_config=spec.data_config, limit=args.samples)
    start = time.monotonic()
    result = analyze(model, data, samples=args.samples, batch_size=args.batch_size, num_workers=0,
                     model_id=Path(args.model).name, data_source=f"{args.data} [test]")
    seconds = time.monotonic() - start
    paths = save_analysis(result, args.out)
    Console().print(layer_table(result))
    print(f"static-attention candidates: {result.static_candidates() or 'none'}; "
          f"token-reduction candidates: {result.reduce_candidates() or 'none'}")
    report_trends(result)
    print(f"{result.samples} images in {seconds:.1f} s ({torch.get_num_threads()} torch threads); plot: {paths['plot']}")


if __name__ == "__main__":
    main()
