"""`vitcompress bench`: how much faster is it, really, and what did it cost?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from vitcompress.cli._app import app
from vitcompress.cli._common import (
    CheckpointOpt,
    DataOpt,
    ImageColumnOpt,
    LabelColumnOpt,
    ModelArg,
    RandomInitOpt,
    SplitOpt,
    WorkersOpt,
    check_output_file,
    handle_errors,
    model_or_demo,
    note,
    out,
    plain_note,
)
from vitcompress.errors import VitcompressError

if TYPE_CHECKING:
    from vitcompress.bench import BenchResult

# The library's defaults (bench.DEFAULT_WARMUP / DEFAULT_REPEATS; a test keeps them equal), spelled
# here so that `vitcompress --help` need not import torch.
DEFAULT_WARMUP = 3
DEFAULT_REPEATS = 10


@app.command("bench")
@handle_errors
def bench_command(
    model: ModelArg = None,
    baseline: Annotated[
        Optional[str],
        typer.Option(
            "--baseline",
            help="Compare against this model (any model name, or a vitcompress .safetensors). "
            "Default for a vitcompress .safetensors: its original, rebuilt from the file's metadata.",
        ),
    ] = None,
    checkpoint: CheckpointOpt = None,
    baseline_checkpoint: Annotated[
        Optional[str], typer.Option("--baseline-checkpoint", help="Local weights for the baseline / original model.")
    ] = None,
    random_init: RandomInitOpt = False,
    batch_size: Annotated[str, typer.Option("--batch-size", help="Batch sizes to time, comma-separated.")] = "1,32",
    threads: Annotated[
        Optional[int], typer.Option("--threads", help="CPU threads (torch.set_num_threads); default: torch's current.")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = "float32",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda (cuda:N).")] = "cpu",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile every model (compiled during warm-up).")] = False,
    channels_last: Annotated[
        bool, typer.Option("--channels-last", help="Channels-last inputs and patch-embedding weights.")
    ] = False,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed rounds before timing.")] = DEFAULT_WARMUP,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed rounds (each runs every model once).")] = DEFAULT_REPEATS,
    data: DataOpt = None,
    split: SplitOpt = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Evaluate on at most this many images (default: all).")] = None,
    workers: WorkersOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (progress stays on stderr).")] = False,
    csv_out: Annotated[
        Optional[Path], typer.Option("--out", help="Append one CSV row per model and batch size to this file.")
    ] = None,
) -> None:
    """Time a model (and its baseline) side by side: ms/image, images/s, speed-up, peak memory, FLOPs;
    with --data, top-1 and agreement with the baseline's predictions.

    A `.safetensors` written by vitcompress is compared with its original (random init is enough for
    timing; with --data the original's weights are loaded). Any two models can be compared with
    --baseline.
    """
    if csv_out is not None and csv_out.is_dir():
        raise VitcompressError(f"--out {csv_out} is a folder: give a .csv file path")
    check_output_file(csv_out, "--out")
    from vitcompress.bench import append_csv, attach_data, bench, entries_for, parse_batch_sizes, resolve_dtype

    parse_batch_sizes(batch_size), resolve_dtype(dtype)  # bad values fail before any model loads
    name = model_or_demo(model)
    entries = entries_for(
        name, baseline=baseline, checkpoint=checkpoint, baseline_checkpoint=baseline_checkpoint,
        random_init=random_init, need_weights=data is not None and not random_init, log=plain_note,
    )
    if data is not None:
        attach_data(entries, data, split=split, image_column=image_column, label_column=label_column, limit=limit,
                    log=plain_note)
    result = bench(
        entries,
        baseline=entries[0].name if len(entries) > 1 else None,
        batch_sizes=batch_size,
        device=device,
        threads=threads,
        dtype=dtype,
        compile=compile,
        channels_last=channels_last,
        warmup=warmup,
        repeats=repeats,
        num_workers=workers,
        progress=note,
    )
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
    else:
        out.print(result_table(result))
    if csv_out is not None:
        append_csv(result, csv_out)
        note(escape(f"appended {len(result.measurements)} row(s) to {csv_out}"))


# ---- output ----------------------------------------------------------------------------------
def result_table(result: BenchResult) -> Table:
    """The rich table `vitcompress bench` prints."""
    from vitcompress.flops import format_flops

    s = result.settings
    extras = [x for x, on in (("compiled", s["compile"]), ("channels-last", s["channels_last"])) if on]
    title = f"{s['device_name']} ({s['device']}), threads: {s['threads']}, {s['dtype']}" + "".join(f", {x}" for x in extras)
    mem = s["memory_method"] or "not measured on this platform"
    table = Table(
        title=title,
        caption=(
            f"median of {s['repeats']} interleaved timed rounds after {s['warmup']} warm-up; spread = interquartile range"
            + (f"; speed-up vs {escape(result.baseline)} = median of per-round time ratios" if result.baseline else "")
            + f"; FLOPs per image (1 MAC = 2 FLOPs); peak mem = weights + peak extra of one forward ({mem})"
        ),
    )
    for column in ("model", "batch", "ms/img", "spread", "img/s", "speed-up", "params", "FLOPs", "peak mem"):
        table.add_column(column, justify="left" if column == "model" else "right")
    has_acc = any(m.eval_images for m in result.models)
    if has_acc:
        table.add_column("top-1", justify="right")
        table.add_column("agreement", justify="right")
    for batch in s["batch_sizes"]:
        for m in (x for x in result.measurements if x.batch_size == batch):
            info = result.model(m.model)
            ms = m.ms_per_image
            row = [
                escape(m.model),  # names can hold brackets (paths), which rich would read as markup
                str(batch),
                f"{ms.median:.3f}",
                f"{ms.q25:.3f}-{ms.q75:.3f}",
                f"{m.images_per_s:.1f}",
                _speedup_text(m),
                f"{info.params / 1e6:.2f} M",
                format_flops(info.flops),
                "-" if m.peak_mem_bytes is None else f"{m.peak_mem_bytes / 2**20:.1f} MiB",
            ]
            if has_acc:
                row += [_pct(info.top1), _pct(info.agreement)]
            table.add_row(*row)
    return table


def _speedup_text(m: Any) -> str:
    if m.speedup is None:
        return "-"
    return f"{m.speedup:.2f}x ({m.speedup_q25:.2f}-{m.speedup_q75:.2f})"


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
