"""Side-by-side speed, memory, FLOPs and accuracy of models, measured so that the figures can be trusted.

How it measures (the README's "How bench measures" says the same for users):

* Each model gets a fixed random input of its own size at each batch size. Only ``model(x)`` is
  timed (``torch.inference_mode``, ``torch.cuda.synchronize`` on GPU after every call); no data
  loading, no host-device copies.
* The timing is ``vitcompress.timing``'s, the one timer every "measured" figure of vitcompress
  comes from: warm-up rounds, then ``repeats`` timed rounds, each round running every model once,
  with the starting model rotated each round (A B, B A, A B, ...), so that machine drift and order
  effects hit all models alike. The garbage collector is paused while timing.
* Per model and batch size: ms per image (median, quartiles, min, max over the timed rounds),
  images/s (batch / median batch time), and the speed-up against the baseline: the median over
  rounds of (baseline time / model time) within the same round, with the quartiles of those
  paired ratios as its spread (the ratio of the two median times is kept too, as
  ``speedup_of_medians``; the two agree closely on a steady machine).
* Peak memory = the model's weights (parameters + buffers) + the peak extra memory one forward
  pass takes at that batch size (activations, workspace). On GPU the extra comes from the CUDA
  allocator's peak statistics; on CPU from the process's peak resident set size (Linux
  ``VmHWM``, reset through ``/proc/self/clear_refs``) over the RSS just before the call, after
  ``malloc_trim`` returned freed heap memory to the system so that reused memory is counted.
  Measured after warm-up (compilation and one-time library buffers excluded), max of 3 calls.
  Elsewhere than Linux it is not measured (``null``).
* FLOPs per image come from ``vitcompress.flops.count_flops`` (batch 1, attention included).
* With ``data``, every model classifies the same images (not timed): top-1 (when labels are
  known) and agreement = the share of images where its top class equals the baseline's. The
  prediction loop is ``predict``, the same one ``evaluate_top1`` (fine-tuning, ``compress``) uses.

``entries_for`` builds the entries ``vitcompress bench`` measures from model names and exported
files (a compressed file is compared with its original, rebuilt from the file's metadata), and
``attach_data`` gives each entry the images preprocessed for it.

``BenchResult.to_dict()`` schema (``schema_version`` 1)::

    {"schema_version": 1,
     "settings": {"device", "device_name", "threads", "dtype", "compile", "channels_last",
                  "batch_sizes", "warmup", "repeats", "memory_method"},
     "environment": {"torch", "timm", "vitcompress", "python", "platform", "cpu_count", "timestamp"},
     "baseline": name or null,
     "models": [{"name", "params", "flops" (per image), "macs", "weights_bytes", "input_size",
                 "top1", "agreement", "eval_images", "info"}],
     "measurements": [{"model", "batch_size", "ms_per_image": {"median", "q25", "q75", "min",
                       "max", "mean", "n"}, "images_per_s", "speedup", "speedup_q25",
                       "speedup_q75", "speedup_of_medians", "peak_mem_bytes", "peak_extra_bytes"}]}
"""

from __future__ import annotations

import contextlib
import copy
import csv
import ctypes
import ctypes.util
import datetime as _dt
import gc
import io
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from vitcompress.data import ImageData, iter_batches
from vitcompress.distributed import all_reduce_sum, autocast, default_device, dist_info, rank_shard, reduce_device
from vitcompress.errors import DataError, ModelLoadError, VitcompressError
from vitcompress.flops import count_flops
from vitcompress.geometry import input_size as geometry_input_size
from vitcompress.timing import Stats, device_name, device_sync, gc_paused, interleaved_order, measure_interleaved, quantile, speedup, torch_threads

SCHEMA_VERSION = 1
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_WARMUP = 3
DEFAULT_REPEATS = 10
MEMORY_PROBES = 3  # memory is the max over this many calls: allocator noise only lowers a single reading
EVAL_BATCH_SIZE = 64
Log = Callable[[str], None]


# ---- argument checking -----------------------------------------------------------------------
def parse_batch_sizes(text: Union[str, int, Sequence[int]]) -> tuple[int, ...]:
    """``"1,32"`` (or ``32`` or ``[1, 32]``) -> ``(1, 32)``; VitcompressError if it does not parse."""
    if isinstance(text, int):
        items: list[Any] = [text]
    elif isinstance(text, str):
        items = [t.strip() for t in text.split(",")]
    else:
        items = list(text)
    try:
        sizes = tuple(int(t) for t in items)
    except (TypeError, ValueError):
        raise VitcompressError(f"--batch-size {text!r}: give positive integers separated by commas, e.g. 1,32") from None
    if not sizes or any(b < 1 for b in sizes):
        raise VitcompressError(f"--batch-size {text!r}: give positive integers separated by commas, e.g. 1,32")
    return tuple(dict.fromkeys(sizes))  # drop repeats, keep order


def resolve_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    """``"float32"|"bfloat16"|"float16"`` -> torch dtype; VitcompressError for anything else."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if isinstance(name, str) and name.strip().lower() in DTYPES:
        return DTYPES[name.strip().lower()]
    raise VitcompressError(f"--dtype {name}: unknown dtype; use one of {', '.join(DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def resolve_device(name: Union[str, torch.device]) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"``; VitcompressError when it does not exist here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise VitcompressError(f"--device {name}: unknown device; use cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VitcompressError("--device cuda: no CUDA GPU is visible to this torch: use --device cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise VitcompressError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise VitcompressError(f"--device {name}: unsupported device type; use cpu or cuda")
    return device


def check_dtype_supported(device: torch.device, dtype: torch.dtype) -> None:
    """Run the ops a ViT needs once in ``dtype`` on ``device``; VitcompressError if this torch cannot."""
    name = dtype_name(dtype)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise VitcompressError(f"--dtype bfloat16 is not supported by this GPU ({torch.cuda.get_device_name(device)}): use float16 or float32")
    try:
        with torch.inference_mode():
            x = torch.randn(1, 3, 8, 8, device=device).to(dtype)
            y = nn.functional.conv2d(x, torch.randn(4, 3, 2, 2, device=device).to(dtype), stride=2)
            t = y.flatten(2).transpose(1, 2)  # [1, 16, 4]
            t = nn.functional.layer_norm(t, (4,))
            t = nn.functional.linear(t, torch.randn(4, 4, device=device).to(dtype))
            q = t.reshape(1, 1, 16, 4)
            t = nn.functional.scaled_dot_product_attention(q, q, q)
            nn.functional.gelu(t).softmax(-1).float().sum().item()
    except (RuntimeError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VitcompressError(f"--dtype {name} is not supported on {device.type} by this torch ({first}): use float32") from None


# ---- memory ----------------------------------------------------------------------------------
class _RssProbe:
    """Peak RSS increase of one call on Linux: trim the heap, reset VmHWM, call, read VmHWM."""

    method = "rss-hwm"

    def __init__(self) -> None:
        self._trim = _malloc_trim()
        if self._trim is None:
            self.method = "rss-hwm (no malloc_trim: may undercount)"

    @staticmethod
    def available() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return _status_bytes("VmHWM") is not None
        except OSError:
            return False

    def extra_bytes(self, fn: Callable[[], Any]) -> int:
        if self._trim is not None:
            self._trim(0)  # freed heap pages go back to the OS, so reusing them shows as RSS growth
        before = _status_bytes("VmRSS") or 0
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        out = fn()
        peak = _status_bytes("VmHWM") or 0
        del out
        return max(0, peak - before)


class _CudaProbe:
    method = "cuda-allocator"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def extra_bytes(self, fn: Callable[[], Any]) -> int:
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = fn()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del out
        return max(0, peak - before)


def _status_bytes(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def _memory_probe(device: torch.device) -> Optional[Union[_RssProbe, _CudaProbe]]:
    if device.type == "cuda":
        return _CudaProbe(device)
    return _RssProbe() if _RssProbe.available() else None


# ---- inputs to bench -------------------------------------------------------------------------
@dataclass
class BenchEntry:
    """One model to measure.

    ``input_size`` (C, H, W) defaults to what ``geometry.input_size`` finds; ``data`` overrides
    ``bench(data=...)`` for this model (e.g. the same images preprocessed for another input size);
    ``info`` is copied into the JSON as is (where the model came from, its weights, ...).
    """

    name: str
    model: nn.Module
    input_size: Optional[tuple[int, int, int]] = None
    data: Any = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelResult:
    name: str
    params: int
    flops: int
    macs: int
    weights_bytes: int
    input_size: list[int]
    top1: Optional[float] = None
    agreement: Optional[float] = None
    eval_images: Optional[int] = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Measurement:
    model: str
    batch_size: int
    ms_per_image: Stats
    images_per_s: float
    speedup: Optional[float]
    speedup_q25: Optional[float]
    speedup_q75: Optional[float]
    speedup_of_medians: Optional[float]
    peak_mem_bytes: Optional[int]
    peak_extra_bytes: Optional[int]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ms_per_image"] = self.ms_per_image.to_dict()
        return d


@dataclass
class BenchResult:
    settings: dict[str, Any]
    environment: dict[str, Any]
    baseline: Optional[str]
    models: list[ModelResult]
    measurements: list[Measurement]

    def model(self, name: str) -> ModelResult:
        return next(m for m in self.models if m.name == name)

    def measurement(self, name: str, batch_size: int) -> Measurement:
        return next(m for m in self.measurements if m.model == name and m.batch_size == batch_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; see the module docstring for the schema (``schema_version``)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "settings": dict(self.settings),
            "environment": dict(self.environment),
            "baseline": self.baseline,
            "models": [asdict(m) for m in self.models],
            "measurements": [m.to_dict() for m in self.measurements],
        }

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per (model, batch size): the CSV columns (``CSV_COLUMNS``)."""
        rows = []
        for m in self.measurements:
            info = self.model(m.model)
            rows.append(
                {
                    "timestamp": self.environment["timestamp"],
                    "model": m.model,
                    "baseline": self.baseline or "",
                    "batch_size": m.batch_size,
                    "device": self.settings["device"],
                    "device_name": self.settings["device_name"],
                    "threads": self.settings["threads"],
                    "dtype": self.settings["dtype"],
                    "compile": self.settings["compile"],
                    "channels_last": self.settings["channels_last"],
                    "ms_per_image_median": m.ms_per_image.median,
                    "ms_per_image_q25": m.ms_per_image.q25,
                    "ms_per_image_q75": m.ms_per_image.q75,
                    "ms_per_image_min": m.ms_per_image.min,
                    "ms_per_image_max": m.ms_per_image.max,
                    "images_per_s": m.images_per_s,
                    "speedup": m.speedup,
                    "params": info.params,
                    "flops": info.flops,
                    "peak_mem_bytes": m.peak_mem_bytes,
                    "top1": info.top1,
                    "agreement": info.agreement,
                    "warmup": self.settings["warmup"],
                    "repeats": self.settings["repeats"],
                    "torch_version": self.environment["torch"],
                    "vitcompress_version": self.environment["vitcompress"],
                }
            )
        return rows


CSV_COLUMNS = [
    "timestamp", "model", "baseline", "batch_size", "device", "device_name", "threads", "dtype", "compile",
    "channels_last", "ms_per_image_median", "ms_per_image_q25", "ms_per_image_q75", "ms_per_image_min",
    "ms_per_image_max", "images_per_s", "speedup", "params", "flops", "peak_mem_bytes", "top1", "agreement",
    "warmup", "repeats", "torch_version", "vitcompress_version",
]  # fmt: skip


# ---- bench -----------------------------------------------------------------------------------
def bench(
    models: Union[Mapping[str, nn.Module], Sequence[BenchEntry]],
    *,
    baseline: Optional[str] = None,
    batch_sizes: Union[str, Sequence[int]] = (1, 32),
    device: Union[str, torch.device] = "cpu",
    threads: Optional[int] = None,
    dtype: Union[str, torch.dtype] = "float32",
    compile: bool = False,
    channels_last: bool = False,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    data: Any = None,
    num_workers: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> BenchResult:
    """Measure ``models`` side by side; see the module docstring for the method and the result.

    Args:
        models: ``{name: module}`` or ``BenchEntry`` items. Modules are put in eval mode; they are
            copied (not changed) when ``device``, ``dtype`` or ``channels_last`` needs a conversion.
        baseline: the name speed-ups and agreement refer to (default: the first model when there
            are several; none for a single model).
        batch_sizes: e.g. ``(1, 32)`` or ``"1,32"``.
        threads: ``torch.set_num_threads`` during the run (restored after); None keeps the current.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        warmup, repeats: untimed rounds, then timed rounds (every model once per round). The first
            warm-up round always runs (it surfaces a failing model before any timing).
        compile: ``torch.compile`` every model (compilation happens during warm-up).
        channels_last: channels-last inputs and conv weights (the patch embedding).
        data: images for top-1/agreement: a ``vitcompress.data.ImageData``, a DataLoader or any
            re-iterable of ``(images, labels)`` batches (labels < 0 mean unknown).
        num_workers: DataLoader worker processes for ``ImageData`` (default: up to 4).
        progress: called with short status lines (the CLI prints them on stderr).

    Raises VitcompressError for arguments that cannot work here (unknown dtype, no GPU, ...).
    """
    entries = _checked_entries(models)
    names = [e.name for e in entries]
    if baseline is None and len(entries) > 1:
        baseline = names[0]
    if baseline is not None and baseline not in names:
        raise VitcompressError(f"baseline {baseline!r} is not one of the models ({', '.join(names)})")
    sizes = parse_batch_sizes(batch_sizes)
    if warmup < 0 or repeats < 1:
        raise VitcompressError(f"--warmup must be >= 0 and --repeats >= 1 (got {warmup} and {repeats})")
    if threads is not None and threads < 1:
        raise VitcompressError(f"--threads must be at least 1, got {threads}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    check_dtype_supported(dev, dt)
    say = progress or (lambda message: None)

    with torch_threads(threads):
        prepared = {e.name: _prepare(e.model, dev, dt, channels_last) for e in entries}
        input_sizes = {e.name: e.input_size or geometry_input_size(e.model) for e in entries}
        say("counting FLOPs")
        results = [_guarded(e.name, _model_result, e, prepared[e.name], input_sizes[e.name]) for e in entries]
        runnable = {name: _maybe_compile(m, name, compile) for name, m in prepared.items()}
        run = _Run(dev, dt, channels_last, warmup, repeats, baseline, _memory_probe(dev), compile, say, num_workers)
        if data is not None or any(e.data is not None for e in entries):
            say("evaluating on the data")  # before timing, so that a data problem shows at once
            _evaluate(entries, prepared, input_sizes, data, run, results)
        gc.collect()  # once: a full collection takes ~0.3 s with torch loaded, too slow per batch size
        measurements: list[Measurement] = []
        for batch in sizes:
            measurements += _measure_batch(run, runnable, prepared, input_sizes, batch)
        settings = {
            "device": str(dev),
            "device_name": device_name(dev),
            "threads": torch.get_num_threads(),
            "dtype": dtype_name(dt),
            "compile": bool(compile),
            "channels_last": bool(channels_last),
            "batch_sizes": list(sizes),
            "warmup": int(warmup),
            "repeats": int(repeats),
            "memory_method": run.probe.method if run.probe is not None else None,
        }
    return BenchResult(settings, _environment(), baseline, results, measurements)


def _checked_entries(models: Union[Mapping[str, nn.Module], Sequence[BenchEntry]]) -> list[BenchEntry]:
    if isinstance(models, Mapping):
        entries = [BenchEntry(str(k), v) for k, v in models.items()]
    else:
        entries = list(models)
    if not entries:
        raise VitcompressError("nothing to benchmark: give at least one model")
    names = [e.name for e in entries]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise VitcompressError(f"model names must be unique and non-empty, got {names}")
    for e in entries:
        if not isinstance(e.model, nn.Module):
            raise VitcompressError(f"model {e.name!r} is a {type(e.model).__name__}, not a torch nn.Module")
    return entries


def _prepare(model: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    """The model on ``device`` in ``dtype`` (a copy when that changes anything), eval mode."""
    tensors = list(model.parameters()) + list(model.buffers())
    needs_copy = channels_last or any(
        t.device != device or (t.is_floating_point() and t.dtype != dtype) for t in tensors
    )
    if needs_copy:
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)  # only 4-D weights change
    return model.eval()


def _maybe_compile(model: nn.Module, name: str, compile: bool) -> nn.Module:
    if not compile:
        return model
    try:
        return torch.compile(model, dynamic=False)  # type: ignore[return-value]
    except Exception as exc:  # torch.compile raises many types; the user can only turn it off
        raise VitcompressError(f"torch.compile failed for {name} ({_first_line(exc)}): run without --compile") from None


def _model_result(entry: BenchEntry, model: nn.Module, input_size: tuple[int, int, int]) -> ModelResult:
    flops = count_flops(model, (1, *input_size))
    unique = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return ModelResult(
        name=entry.name,
        params=sum(p.numel() for p in model.parameters()),
        flops=flops,
        macs=flops // 2,
        weights_bytes=sum(t.numel() * t.element_size() for t in unique.values()),
        input_size=list(input_size),
        info=dict(entry.info),
    )


def _input(batch: int, size: tuple[int, int, int], run: _Run) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return _to_run(torch.randn(batch, *size, generator=g), run)


def _to_run(x: torch.Tensor, run: _Run) -> torch.Tensor:
    x = x.to(device=run.device, dtype=run.dtype)
    return x.contiguous(memory_format=torch.channels_last) if run.channels_last else x


@dataclass
class _Run:
    """The settings of one bench run, as the helpers below need them."""

    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    warmup: int
    repeats: int
    baseline: Optional[str]
    probe: Optional[Union[_RssProbe, _CudaProbe]]
    compiled: bool
    say: Callable[[str], None]
    num_workers: Optional[int] = None


def _measure_batch(
    run: _Run,
    runnable: Mapping[str, nn.Module],
    prepared: Mapping[str, nn.Module],
    input_sizes: Mapping[str, tuple[int, int, int]],
    batch: int,
) -> list[Measurement]:
    inputs = {name: _input(batch, input_sizes[name], run) for name in runnable}
    runners = {name: _runner(runnable[name], inputs[name], name) for name in runnable}
    sync = device_sync(run.device)
    run.say(f"batch {batch}: {run.warmup} warm-up + {run.repeats} timed rounds of {len(runners)} model(s)")
    hint = "; torch.compile may be the cause: try without --compile" if run.compiled else ""
    with torch.inference_mode():
        for name, fn in runners.items():  # the first warm-up round: a failing model is named before any timing
            _guarded(name, fn, hint=hint)
        seconds = measure_interleaved(runners, warmup=max(0, run.warmup - 1), repeats=run.repeats, sync=sync)
        with gc_paused():
            extra = {name: _peak_extra(run.probe, fn) for name, fn in runners.items()}
    return [_measurement(name, batch, seconds, extra[name], _weights_bytes(prepared[name]), run.baseline) for name in seconds]


def _measurement(
    name: str, batch: int, seconds: Mapping[str, list[float]], extra: Optional[int], weights: int, baseline: Optional[str]
) -> Measurement:
    samples = seconds[name]
    per_image_ms = [s * 1000.0 / batch for s in samples]
    ratio = speedup(seconds[baseline], samples) if baseline is not None else None
    of_medians = Stats.of(seconds[baseline]).median / Stats.of(samples).median if baseline is not None else None
    return Measurement(
        model=name,
        batch_size=batch,
        ms_per_image=Stats.of(per_image_ms),
        images_per_s=batch / Stats.of(samples).median,
        speedup=ratio.median if ratio else None,
        speedup_q25=ratio.q25 if ratio else None,
        speedup_q75=ratio.q75 if ratio else None,
        speedup_of_medians=of_medians,
        peak_mem_bytes=None if extra is None else weights + extra,
        peak_extra_bytes=extra,
    )


def _runner(model: nn.Module, x: torch.Tensor, name: str) -> Callable[[], Any]:
    def run() -> Any:
        return model(x)

    run.__name__ = f"run_{name}"
    return run


def _guarded(name: str, fn: Callable[..., Any], *args: Any, hint: str = "") -> Any:
    """Call ``fn``; if the model itself fails, say which one and why, in one line."""
    try:
        return fn(*args)
    except VitcompressError:
        raise
    except Exception as exc:
        raise VitcompressError(f"model {name!r} failed to run ({type(exc).__name__}: {_first_line(exc)}){hint}") from None


def _peak_extra(probe: Optional[Union[_RssProbe, _CudaProbe]], fn: Callable[[], Any]) -> Optional[int]:
    if probe is None:
        return None
    return max(probe.extra_bytes(fn) for _ in range(MEMORY_PROBES))


def _weights_bytes(model: nn.Module) -> int:
    unique = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---- accuracy --------------------------------------------------------------------------------
def predict(
    models: Mapping[str, nn.Module],
    data: Any,
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    num_workers: Optional[int] = None,
    indices: Optional[Sequence[int]] = None,
    to_input: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    input_sizes: Optional[Mapping[str, Sequence[int]]] = None,
    amp: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The top class of every model for the same images, in one pass over ``data``.

    ``data``: anything ``vitcompress.data.iter_batches`` reads (``indices`` picks images of an
    ``ImageData``). ``to_input`` moves a batch to the models (default: the first model's device).
    With ``input_sizes`` ({name: (C, H, W)}) images of another size are a DataError. ``amp``:
    bf16 autocast on CUDA. Returns ``({name: classes [n]}, labels [n])``, labels -1 where unknown;
    the models are left in the mode they were in.
    """
    if to_input is None:
        ref = next(iter(models.values())).parameters()
        device = next(ref).device
        to_input = lambda x: x.to(device)  # noqa: E731
    preds: dict[str, list[torch.Tensor]] = {n: [] for n in models}
    labels: list[torch.Tensor] = []
    modes = {n: m.training for n, m in models.items()}
    try:
        for m in models.values():
            m.eval()
        with torch.no_grad():  # not inference_mode: cached tensors of eval-mode modules stay usable for training
            for images, lab in iter_batches(data, batch_size, num_workers, indices=indices):
                x = to_input(images)
                for name, model in models.items():
                    expected = (input_sizes or {}).get(name)
                    if expected is not None and tuple(images.shape[1:]) != tuple(expected):
                        raise DataError(
                            f"images are {tuple(images.shape[1:])} but {name} takes {tuple(expected)}: "
                            "preprocess the data with that model's data config"
                        )
                    with autocast(x.device, amp):
                        logits = model(x)
                    preds[name].append(logits.float().argmax(dim=-1).cpu())
                labels.append(lab)
    finally:
        for n, m in models.items():
            m.train(modes[n])
    if not labels:
        return {n: torch.empty(0, dtype=torch.long) for n in models}, torch.empty(0, dtype=torch.long)
    return {n: torch.cat(p) for n, p in preds.items()}, torch.cat(labels)


def evaluate_top1(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    num_workers: Optional[int] = None,
    limit: Optional[int] = None,
) -> Optional[float]:
    """Top-1 accuracy of ``model`` on ``data`` (an ``ImageData``, or any data ``predict`` reads),
    shared across processes under torchrun (each process scores its share of an ``ImageData``).

    Runs on ``device`` (default: this process's GPU, else the CPU), bf16 autocast on CUDA.
    Returns None when the data has no labels. The model is left in the mode it was in.
    """
    if not getattr(data, "has_labels", True):
        return None
    info = dist_info()
    dev = torch.device(device) if device is not None else default_device(info)
    indices = None
    if isinstance(data, ImageData):  # each process scores every world_size-th image
        count = len(data) if limit is None else min(limit, len(data))
        indices = list(rank_shard(count, info))
    preds, labels = predict({"model": model}, data, batch_size=batch_size, num_workers=num_workers, indices=indices,
                            to_input=lambda x: x.to(dev), amp=True)
    known = labels >= 0
    counts = torch.tensor([float((preds["model"][known] == labels[known]).sum()), float(known.sum())], dtype=torch.float64)
    counts = all_reduce_sum(counts.to(reduce_device(dev))).cpu()
    return float(counts[0] / counts[1]) if counts[1] > 0 else None


def _evaluate(
    entries: Sequence[BenchEntry],
    prepared: Mapping[str, nn.Module],
    input_sizes: Mapping[str, tuple[int, int, int]],
    data: Any,
    run: _Run,
    results: Sequence[ModelResult],
) -> None:
    """Fill top-1 / agreement / eval_images in ``results``. Models sharing a data object share its
    batches (decoded once)."""
    groups: dict[int, tuple[Any, list[str]]] = {}
    for e in entries:
        d = e.data if e.data is not None else data
        if d is not None:
            groups.setdefault(id(d), (d, []))[1].append(e.name)
    preds: dict[str, torch.Tensor] = {}
    labels: dict[str, torch.Tensor] = {}
    for d, names in groups.values():
        p, lab = predict({n: prepared[n] for n in names}, d, num_workers=run.num_workers,
                         to_input=lambda x: _to_run(x, run), input_sizes=input_sizes)
        if lab.numel() == 0:
            raise DataError("the data has no images to evaluate on")
        preds.update(p)
        labels.update({n: lab for n in names})
    by_name = {r.name: r for r in results}
    for name, p in preds.items():
        r = by_name[name]
        r.eval_images = int(p.numel())
        known = labels[name] >= 0
        scored = int(known.sum())  # exact fractions (a float32 mean would print 0.6967999935)
        r.top1 = int((p[known] == labels[name][known]).sum()) / scored if scored else None
        base = preds.get(run.baseline or "")
        if base is not None and base.numel() == p.numel():
            r.agreement = int((p == base).sum()) / p.numel()


# ---- building entries from names and files --------------------------------------------------
def is_export(name: str) -> bool:
    """Whether ``name`` is a vitcompress ``.safetensors`` file (not a local-dir: or hf-hub: model)."""
    return name.endswith(".safetensors") and not name.startswith(("local-dir:", "hf-hub:"))


def entries_for(
    model: str,
    *,
    baseline: Optional[str] = None,
    checkpoint: Optional[str] = None,
    baseline_checkpoint: Optional[str] = None,
    random_init: bool = False,
    need_weights: bool = False,
    log: Optional[Log] = None,
) -> list[BenchEntry]:
    """The models ``vitcompress bench MODEL [--baseline B]`` measures: ``[baseline, model]`` (the
    baseline first: speed-ups refer to it), or ``[model]`` alone.

    ``model``/``baseline``: any model name ``load_model`` takes, or a vitcompress ``.safetensors``.
    A compressed file without ``baseline`` is compared with its original, rebuilt from the file's
    metadata: random weights (enough for timing) unless ``need_weights`` (accuracy), then the
    original's weights (``baseline_checkpoint``, else its pretrained or local-dir weights).
    Each entry's ``info`` holds where it came from and its ``data_config``. ``log`` gets notes.
    """
    say = log or (lambda message: None)
    if is_export(model):
        if checkpoint is not None:
            raise VitcompressError("--checkpoint does not apply to a vitcompress .safetensors (it holds its weights)")
        main = _export_entry(model)
        if baseline is None:
            return [_original_entry(model, main, baseline_checkpoint, random_init, need_weights, say), main]
    else:
        main = _named_entry(model, checkpoint, random_init, "model")
    if baseline is None:
        if baseline_checkpoint is not None:
            raise VitcompressError("--baseline-checkpoint needs --baseline (or a vitcompress .safetensors model)")
        return [main]
    if is_export(baseline):
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
    return BenchEntry(Path(path).name, model, geometry_input_size(model, cfg), info=_with_config(info, cfg))


def _original_entry(
    path: str, compressed: BenchEntry, checkpoint: Optional[str], random_init: bool, need_weights: bool, say: Log
) -> BenchEntry:
    """The model the file was compressed from: its architecture from the metadata; weights only
    when accuracy is wanted (they do not change the timing)."""
    from vitcompress.export import read_metadata
    from vitcompress.models import ModelSpec, build_model, check_spec, load_model

    spec = ModelSpec.from_dict(read_metadata(path)["model"])  # load() has checked it is complete
    check_spec(spec)  # a file's description may not make us download, read or import anything
    label = f"{spec.model_id} (original)"
    if checkpoint is None and (not need_weights or spec.weights == "random"):
        say(f"original of {Path(path).name}: {spec.architecture} with random weights (enough for timing)")
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
    return BenchEntry(label, model, geometry_input_size(model, cfg), info=_with_config(info, cfg))


def _named_entry(name: str, checkpoint: Optional[str], random_init: bool, kind: str) -> BenchEntry:
    from vitcompress.models import load_model

    model, spec = load_model(name, checkpoint=checkpoint, random_init=random_init)
    info = {"kind": kind, "source": name, "architecture": spec.architecture, "weights": spec.weights}
    return BenchEntry(name, model, geometry_input_size(model, spec.data_config), info=_with_config(info, spec.data_config))


def _with_config(info: dict[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {**info, "data_config": dict(cfg)}


def attach_data(
    entries: Sequence[BenchEntry],
    source: str,
    *,
    split: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    limit: Optional[int] = None,
    log: Optional[Log] = None,
) -> None:
    """Give each entry the images of ``source`` preprocessed with its own data config (loaded once
    per config), in the same order, so that agreement compares predictions on the same images."""
    from vitcompress.data import load_data

    say = log or (lambda message: None)
    by_config: dict[str, Any] = {}
    for entry in entries:
        cfg = dict(entry.info.get("data_config") or {})
        cfg["input_size"] = list(entry.input_size or cfg.get("input_size", ()))  # what the model runs at
        key = json.dumps(cfg, sort_keys=True)
        if key not in by_config:
            loaded = load_data(
                source, split=split, data_config=cfg, image_column=image_column, label_column=label_column, limit=limit
            )
            say(f"data: {loaded.source} split '{loaded.split}', {len(loaded)} images")
            by_config[key] = loaded
        entry.data = by_config[key]


# ---- environment -----------------------------------------------------------------------------
def _environment() -> dict[str, Any]:
    import timm

    from vitcompress.export import vitcompress_version

    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "vitcompress": vitcompress_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ---- CSV -------------------------------------------------------------------------------------
def append_csv(result: BenchResult, path: Union[str, os.PathLike]) -> Path:
    """Append one row per (model, batch size) to ``path``; the header is written only to a new file.

    Not ``atomic_path``: that replaces the file, which would lose rows appended concurrently by
    another run. Instead the rows go in one ``write`` under an exclusive lock (where ``fcntl``
    exists), so earlier rows are never rewritten and concurrent runs do not interleave lines.
    Raises VitcompressError if the file exists with other columns (e.g. from another tool).
    """
    target = Path(path)
    if target.is_dir():
        raise VitcompressError(f"--out {target} is a folder: give a .csv file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    rows = [{k: ("" if v is None else v) for k, v in row.items()} for row in result.rows()]
    with open(target, "a+", newline="", encoding="utf-8") as f, _locked(f):
        f.seek(0)
        header = f.readline()
        prefix = ""
        if header:
            existing = next(csv.reader([header]))
            if existing != CSV_COLUMNS:
                raise VitcompressError(
                    f"--out {target} exists with other columns than vitcompress bench writes: choose a new file"
                )
            f.seek(0, os.SEEK_END)
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                prefix = "\n"  # a previous writer died mid-line: start on a fresh line
        else:
            writer.writeheader()
        writer.writerows(rows)
        f.seek(0, os.SEEK_END)
        f.write(prefix + buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())
    return target


@contextlib.contextmanager
def _locked(f: Any) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; appends are still one write each
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


__all__ = [
    "BenchEntry", "BenchResult", "CSV_COLUMNS", "DEFAULT_REPEATS", "DEFAULT_WARMUP", "DTYPES", "EVAL_BATCH_SIZE",
    "Measurement", "ModelResult", "SCHEMA_VERSION", "append_csv", "attach_data", "bench", "check_dtype_supported",
    "entries_for", "evaluate_top1", "is_export", "parse_batch_sizes", "predict", "resolve_device", "resolve_dtype",
    # the statistics and timer bench measures with, re-exported from vitcompress.timing
    "Stats", "interleaved_order", "measure_interleaved", "quantile", "speedup",
]  # fmt: skip
