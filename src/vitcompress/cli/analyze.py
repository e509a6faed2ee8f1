"""`vitcompress analyze`: where is attention the same for every image, and where is it low-rank?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich import box
from rich.table import Table

from vitcompress.cli._app import app
from vitcompress.cli._common import (
    BatchSizeOpt,
    CheckpointOpt,
    DataOpt,
    ImageColumnOpt,
    LabelColumnOpt,
    ModelArg,
    NumClassesOpt,
    RandomInitOpt,
    SplitOpt,
    WorkersOpt,
    check_output_folder,
    handle_errors,
    model_or_demo,
    note,
    out,
)
from vitcompress.names import output_dir_for as default_out_dir

if TYPE_CHECKING:
    from vitcompress.analyze import Analysis

# analyze.Thresholds()'s defaults (a test keeps them equal), spelled here so that `--help` needs no torch.
DEFAULT_STATIC_SIMILARITY = 0.80
DEFAULT_REDUCE_RANK90 = 0.25
_STYLE = {"static": "green", "reduce": "yellow", "keep": "default"}
# Table labels (the column is "candidate for"); the JSON keeps static / reduce / keep.
_LABEL = {"static": "static attention", "reduce": "token reduction", "keep": "- (keep)"}


@app.command("analyze")
@handle_errors
def analyze_command(
    model: ModelArg = None,
    checkpoint: CheckpointOpt = None,
    random_init: RandomInitOpt = False,
    num_classes: NumClassesOpt = None,
    data: DataOpt = None,
    split: SplitOpt = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Images to analyze (a fixed random subset of the split).")] = 256,
    batch_size: BatchSizeOpt = 32,
    workers: WorkersOpt = None,
    out_dir: Annotated[
        Optional[Path],
        typer.Option("--out", help="Folder for analysis.json, attention_means.safetensors and analysis.png "
                     "[default: ./vitcompress-out/<model>/]", show_default=False),
    ] = None,
    static_threshold: Annotated[
        float, typer.Option("--static-threshold", min=0.0, max=1.0,
                            help="Static-attention candidate when the layer's mean similarity is at least this.")
    ] = DEFAULT_STATIC_SIMILARITY,
    rank_threshold: Annotated[
        float, typer.Option("--rank-threshold", min=0.0, max=1.0,
                            help="Token-reduction candidate when the layer's mean rank90 / N is at most this.")
    ] = DEFAULT_REDUCE_RANK90,
    as_json: Annotated[bool, typer.Option("--json", help="Print the analysis as JSON on stdout instead of a table.")] = False,
) -> None:
    """Measure, per layer and head, how similar attention maps are across images and how low their
    rank is; recommend static attention (similar) or token reduction (low rank) per layer.

    Writes analysis.json, attention_means.safetensors (what static attention starts from) and
    analysis.png to --out.
    """
    check_output_folder(out_dir, "--out")  # before torch, timm and any work
    from vitcompress.analyze import Thresholds, analyze, save_analysis
    from vitcompress.data import load_data
    from vitcompress.models import load_model

    name = model_or_demo(model)
    net, spec = load_model(name, checkpoint=checkpoint, random_init=random_init, num_classes=num_classes)
    if data is None:
        note("no --data: using the built-in [bold]demo[/] images")
        data = "demo"
    if spec.weights == "random":
        note("random weights: the attention statistics describe an untrained model")
    images = load_data(
        data, split=split, data_config=spec.data_config, image_column=image_column, label_column=label_column, limit=samples
    )
    note(f"analyzing {name} on {min(samples, len(images))} images of {data} (split: {images.split})")
    result = analyze(
        net,
        images,
        samples=samples,
        batch_size=batch_size,
        model_id=name,
        data_source=f"{data} [{images.split}]",
        thresholds=Thresholds(static_similarity=static_threshold, reduce_rank90=rank_threshold),
        num_workers=workers,
        progress=note.progress,
    )
    if images.skipped:
        note(f"skipped {images.skipped} unreadable image(s)")
    if result.samples < samples:
        note(f"only {result.samples} images were available (asked for {samples})")
    paths = save_analysis(result, out_dir if out_dir is not None else default_out_dir(name))
    if as_json:
        report = {**result.to_dict(), "files": {key: str(path) for key, path in paths.items()}}
        typer.echo(json.dumps(report, indent=2))
    else:
        out.print(analysis_table(result))
        out.print(summary_line(result), highlight=False)
    for key, path in paths.items():
        note(f"wrote {path}")


def analysis_table(result: Analysis) -> Table:
    """One row per block; narrow enough for an 80-column terminal."""
    n, t = result.num_tokens, result.thresholds
    table = Table(
        title=f"Attention across layers: {result.model_id}\n{result.samples} images, N = {n} tokens, {result.num_heads} heads",
        caption=(
            f"sim: {result.similarity_metric}, mean and min over heads. KL: nats from each image's attention rows "
            f"to the mean rows. r90/r99: singular values holding 90%/99% of the energy; eff.r: effective rank "
            f"(means over heads and images).\n"
            f"Thresholds: static-attention candidate if sim >= {t.static_similarity:g}; "
            f"token-reduction candidate if r90/N <= {t.reduce_rank90:g}."
        ),
        box=box.SIMPLE_HEAD,
        caption_justify="left",
    )
    for header in ("block", "sim", "min", "KL", "r90", "r99", "eff.r", "r90/N"):
        table.add_column(header, justify="right")
    table.add_column("candidate for")
    for layer in result.layers:
        style = _STYLE[layer.recommendation]
        table.add_row(
            str(layer.index),
            f"{layer.similarity_mean:.3f}",
            f"{layer.similarity_min:.3f}",
            f"{layer.kl_mean:.3f}",
            f"{layer.rank90_mean:.1f}",
            f"{layer.rank99_mean:.1f}",
            f"{layer.effective_rank_mean:.1f}",
            f"{layer.rank90_norm:.3f}",
            f"[{style}]{_LABEL[layer.recommendation]}[/]",
        )
    return table


def summary_line(result: Analysis) -> str:
    def blocks(indices: list[int]) -> str:
        return ", ".join(map(str, indices)) if indices else "none"

    return (
        f"static-attention candidates: {blocks(result.static_candidates())}; "
        f"token-reduction candidates: {blocks(result.reduce_candidates())}"
    )
