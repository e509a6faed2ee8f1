"""`vitcompress bench`: how much faster is it, really, and what did it cost?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.markup import escape
from rich.table import Table

from vitcompress.bench import DEFAULT_REPEATS, DEFAULT_WARMUP, BenchEntry, BenchResult, append_csv, bench
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
    handle_errors,
    model_or_demo,
    note,
    out,
)
from vitcompress.errors import ModelLoadError, VitcompressError
from vitcompress.flops import format_flops


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
    name = model_or_demo(model)
    need_weights = data is not None and not random_init
    entries = _entries(name, baseline, checkpoint, baseline_checkpoint, random_init, need_weights)
    if data is not None:
        _attach_data(entries, data, split, image_column, label_column, limit, workers)
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
        progress=note,
    )
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
    else:
        out.print(result_table(result))
    if csv_out is not None:
        append_csv(result, csv_out)
        note(escape(f"appended {len(result.measurements)} row(s) to {csv_out}"))


# ---- building the models ---------------------------------------------------------------------
def _is_export(name: str) -> bool:
    return name.endswith(".safetensors") and not name.startswith(("local-dir:", "hf-hub:"))


def _entries(
    name: str,
    baseline: Optional[str],
    checkpoint: Optional[str],
    baseline_checkpoint: Optional[str],
    random_init: bool,
    need_weights: bool,
) -> list[BenchEntry]:
    """[baseline, model] (the baseline first: speed-ups refer to it), or [model] alone."""
    if _is_export(name):
        if checkpoint is not None:
            raise VitcompressError("--checkpoint does not apply to a vitcompress .safetensors (it holds its weights)")
        main = _export_entry(name)
        if baseline is None:
            return [_original_entry(name, main, baseline_checkpoint, random_init, need_weights), main]
    else:
        main = _named_entry(name, checkpoint, random_init, "model")
    if baseline is None:
        if baseline_checkpoint is not None:
            raise VitcompressError("--baseline-checkpoint needs --baseline (or a vitcompress .safetensors model)")
        return [main]
    if _is_export(baseline):
        other = _export_entry(baseline)
    else:
        other = _named_entry(baseline, baseline_checkpoint, random_init, "baseline")
    if other.name == main.name:
        other.name = f"{other.name} (baseline)"
    return [other, main]


def _export_entry(path: str) -> BenchEntry:
    from vitcompress.export import load, read_metadata

    meta = read_metadata(path)
    model = load(path)
    cfg = meta.get("data_config") or (meta.get("model") or {}).get("data_config") or {}
    info = {"kind": "compressed", "source": path, "base_model": (meta.get("model") or {}).get("model_id")}
    for key in ("teacher_top1", "student_top1", "speedup"):
        if key in meta:
            info[f"recorded_{key}"] = meta[key]
    return BenchEntry(Path(path).name, model, _input_size(cfg, model), info=_with_config(info, cfg))


def _original_entry(
    path: str, compressed: BenchEntry, checkpoint: Optional[str], random_init: bool, need_weights: bool
) -> BenchEntry:
    """The model the file was compressed from: its architecture from the metadata; weights only
    when accuracy is wanted (they do not change the timing)."""
    from vitcompress.export import read_metadata
    from vitcompress.models import ModelSpec, build_model, load_model

    spec = ModelSpec.from_dict(read_metadata(path)["model"])
    label = f"{spec.model_id} (original)"
    if checkpoint is None and (not need_weights or spec.weights == "random"):
        note(escape(f"original of {Path(path).name}: {spec.architecture} with random weights (enough for timing)"))
        model, weights = build_model(spec), "random"
    else:
        if checkpoint is None and spec.weights == "checkpoint":
            raise VitcompressError(
                f"the original of {path} was loaded from a local checkpoint: pass it with --baseline-checkpoint PATH "
                "for accuracy, or --random-init to time only"
            )
        try:
            model, _ = load_model(spec.model_id, checkpoint=checkpoint, model_kwargs=spec.model_args)
        except ModelLoadError as exc:
            raise ModelLoadError(
                f"cannot load the original model's weights for accuracy ({exc}); pass --baseline-checkpoint PATH, "
                "or --random-init to time only"
            ) from None
        weights = "checkpoint" if checkpoint is not None else "pretrained"
    info = {"kind": "original", "source": spec.model_id, "architecture": spec.architecture, "weights": weights}
    cfg = spec.data_config or compressed.info.get("data_config") or {}
    return BenchEntry(label, model, _input_size(cfg, model), info=_with_config(info, cfg))


def _named_entry(name: str, checkpoint: Optional[str], random_init: bool, kind: str) -> BenchEntry:
    from vitcompress.models import load_model

    model, spec = load_model(name, checkpoint=checkpoint, random_init=random_init)
    info = {"kind": kind, "source": name, "architecture": spec.architecture, "weights": spec.weights}
    return BenchEntry(name, model, _input_size(spec.data_config, model), info=_with_config(info, spec.data_config))


def _with_config(info: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    return {**info, "data_config": dict(cfg)}


def _input_size(cfg: dict[str, Any], model: Any) -> tuple[int, int, int]:
    """The size the model runs at: its patch embedding's (authoritative), else the data config's."""
    from vitcompress.flops import model_input_size

    try:
        return model_input_size(model)
    except VitcompressError:
        if "input_size" in cfg:
            c, h, w = (int(v) for v in cfg["input_size"])
            return c, h, w
        raise


# ---- data ------------------------------------------------------------------------------------
class _Batches:
    """Re-iterable (images, labels) batches of an ImageData, with the loader settings we chose."""

    def __init__(self, data: Any, workers: Optional[int]) -> None:
        self.data, self.workers = data, workers

    def __iter__(self) -> Iterator[Any]:
        from vitcompress.bench import EVAL_BATCH_SIZE
        from vitcompress.data import make_loader

        return self.data.batches(make_loader(self.data, EVAL_BATCH_SIZE, num_workers=self.workers))


def _attach_data(
    entries: list[BenchEntry],
    source: str,
    split: Optional[str],
    image_column: Optional[str],
    label_column: Optional[str],
    limit: Optional[int],
    workers: Optional[int],
) -> None:
    """Each model gets the images preprocessed with its own data config (loaded once per config),
    in the same order, so that agreement compares predictions on the same images."""
    from vitcompress.data import load_data

    by_config: dict[str, _Batches] = {}
    for entry in entries:
        cfg = dict(entry.info.get("data_config") or {})
        cfg["input_size"] = list(entry.input_size or cfg.get("input_size", ()))  # what the model runs at
        key = json.dumps(cfg, sort_keys=True)
        if key not in by_config:
            loaded = load_data(
                source, split=split, data_config=cfg, image_column=image_column, label_column=label_column, limit=limit
            )
            note(escape(f"data: {loaded.source} split '{loaded.split}', {len(loaded)} images"))
            by_config[key] = _Batches(loaded, workers)
        entry.data = by_config[key]


# ---- output ----------------------------------------------------------------------------------
def result_table(result: BenchResult) -> Table:
    """The rich table `vitcompress bench` prints."""
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
