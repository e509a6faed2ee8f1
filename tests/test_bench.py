"""The measurement logic of vitcompress.bench: statistics, interleaving, speed-up, memory, JSON, CSV."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_vit
from vitcompress.bench import (
    BenchResult,
    _guarded,
    _RssProbe,
    CSV_COLUMNS,
    SCHEMA_VERSION,
    BenchEntry,
    append_csv,
    bench,
    evaluate_top1,
    parse_batch_sizes,
    predict,
)
from vitcompress.data import load_data
from vitcompress.errors import DataError, VitcompressError
from vitcompress.flops import count_flops


class Sleeper(nn.Module):
    """Takes at least ``seconds`` per call whatever the batch (time.sleep never returns early)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x.flatten(1)[:, :3] * self.scale


class Allocator(nn.Module):
    """Fills a fresh buffer of ``nbytes`` during forward: a known peak of extra memory."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.numel = nbytes // 4
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = torch.full((self.numel,), 1.0)  # writes every page, so they become resident
        return x.flatten(1)[:, :3] * self.scale + big[0]


def test_bench_measures_with_the_one_timer() -> None:
    """bench's statistics and timer are vitcompress.timing's (re-exported), not copies of them."""
    from vitcompress import timing
    from vitcompress.bench import Stats, interleaved_order, measure_interleaved, quantile, speedup

    assert (Stats, interleaved_order, measure_interleaved, quantile, speedup) == (
        timing.Stats, timing.interleaved_order, timing.measure_interleaved, timing.quantile, timing.speedup)


# ---- bench end to end ------------------------------------------------------------------------
def test_bench_with_sleeping_models() -> None:
    slow, fast = 0.024, 0.006
    entries = [BenchEntry("slow", Sleeper(slow), (3, 4, 4)), BenchEntry("fast", Sleeper(fast), (3, 4, 4))]
    result = bench(entries, batch_sizes=(1, 2), warmup=1, repeats=3, threads=1)
    assert result.baseline == "slow"
    for batch in (1, 2):
        s, f = result.measurement("slow", batch), result.measurement("fast", batch)
        # sleep never returns early: lower bounds hold on any machine, however loaded
        assert s.ms_per_image.min >= slow * 1000 / batch and f.ms_per_image.min >= fast * 1000 / batch
        assert s.speedup == 1.0 and f.speedup > 1.5  # true ratio 4; fast would need > 10 ms of delay to fail
        assert f.speedup_of_medians == pytest.approx(s.ms_per_image.median / f.ms_per_image.median)
        assert f.images_per_s == pytest.approx(batch * 1000 / (f.ms_per_image.median * batch))
        assert s.ms_per_image.n == 3


def test_bench_on_vits_reports_flops_params_and_accuracy() -> None:
    a, b = tiny_vit(), tiny_vit(depth=2)
    torch.manual_seed(1)
    images = torch.randn(10, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 4, -1, 0, 1, 2, 3])  # -1: unknown label, not scored
    data = [(images[:6], labels[:6]), (images[6:], labels[6:])]
    result = bench({"a": a, "b": b, "a2": a}, batch_sizes="1", warmup=0, repeats=2, data=data, threads=1)
    with torch.inference_mode():
        pa, pb = a(images).argmax(-1), b(images).argmax(-1)
    known = labels >= 0
    ra, rb = result.model("a"), result.model("b")
    assert ra.flops == count_flops(a) and rb.flops == count_flops(b) and ra.macs * 2 == ra.flops
    assert ra.params == sum(p.numel() for p in a.parameters()) and ra.weights_bytes >= 4 * ra.params
    assert ra.top1 == pytest.approx(float((pa[known] == labels[known]).float().mean()))
    assert rb.top1 == pytest.approx(float((pb[known] == labels[known]).float().mean()))
    assert rb.agreement == pytest.approx(float((pa == pb).float().mean()))
    assert ra.agreement == 1.0 and result.model("a2").agreement == 1.0
    assert ra.eval_images == 10 and ra.input_size == [3, 32, 32]


def test_single_model_has_no_baseline() -> None:
    result = bench({"only": tiny_vit()}, batch_sizes=(2,), warmup=0, repeats=1, threads=1)
    assert result.baseline is None
    assert result.measurements[0].speedup is None and result.models[0].agreement is None


def test_json_schema() -> None:
    result = bench({"a": tiny_vit(), "b": tiny_vit(depth=2)}, batch_sizes=(1, 2), warmup=0, repeats=2, threads=1)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["schema_version"] == SCHEMA_VERSION == 1
    assert set(d) == {"schema_version", "settings", "environment", "baseline", "models", "measurements"}
    assert set(d["settings"]) == {
        "device", "device_name", "threads", "dtype", "compile", "channels_last", "batch_sizes", "warmup", "repeats", "memory_method",
    }  # fmt: skip
    assert d["settings"]["threads"] == 1 and d["settings"]["batch_sizes"] == [1, 2] and d["settings"]["dtype"] == "float32"
    assert set(d["environment"]) >= {"torch", "timm", "vitcompress", "python", "platform", "timestamp"}
    assert set(d["models"][0]) == {
        "name", "params", "flops", "macs", "weights_bytes", "input_size", "top1", "agreement", "eval_images", "info",
    }  # fmt: skip
    assert [(m["model"], m["batch_size"]) for m in d["measurements"]] == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    m = d["measurements"][1]
    assert set(m) == {
        "model", "batch_size", "ms_per_image", "images_per_s", "speedup", "speedup_q25", "speedup_q75", "speedup_of_medians", "peak_mem_bytes",
        "peak_extra_bytes",
    }  # fmt: skip
    assert set(m["ms_per_image"]) == {"median", "q25", "q75", "min", "max", "mean", "n"}
    assert all(set(row) == set(CSV_COLUMNS) for row in result.rows())


def test_threads_are_set_and_restored() -> None:
    before = torch.get_num_threads()
    result = bench({"a": tiny_vit()}, batch_sizes=(1,), warmup=0, repeats=1, threads=1)
    assert result.settings["threads"] == 1
    assert torch.get_num_threads() == before


def test_dtype_and_channels_last_do_not_change_the_callers_model() -> None:
    model = tiny_vit()
    result = bench({"a": model}, batch_sizes=(2,), warmup=0, repeats=1, dtype="bfloat16", channels_last=True, threads=1)
    assert result.settings["dtype"] == "bfloat16" and result.settings["channels_last"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.patch_embed.proj.weight.is_contiguous()
    assert not list(model.buffers())
    assert result.model("a").weights_bytes == 2 * sum(p.numel() for p in model.parameters())  # 2 bytes each


@pytest.mark.skipif(not _RssProbe.available(), reason="peak RSS is measured through Linux /proc only")
def test_cpu_peak_memory_sees_a_known_allocation() -> None:
    nbytes = 48 * 2**20
    result = bench([BenchEntry("alloc", Allocator(nbytes), (3, 4, 4))], batch_sizes=(1,), warmup=1, repeats=1, threads=1)
    m = result.measurement("alloc", 1)
    assert result.settings["memory_method"].startswith("rss-hwm")
    assert m.peak_extra_bytes >= 0.95 * nbytes
    assert m.peak_mem_bytes == m.peak_extra_bytes + result.model("alloc").weights_bytes


# ---- the one evaluator ----------------------------------------------------------------------
DATA_CONFIG = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
               "crop_pct": 1.0, "crop_mode": "center"}


def test_evaluate_top1_matches_the_predictions() -> None:
    model = tiny_vit(num_classes=10).train()
    data = load_data("demo", split="test", data_config=DATA_CONFIG, limit=20)
    preds, labels = predict({"m": model}, data, batch_size=7, num_workers=0)
    assert model.training, "the model's mode is restored"
    assert preds["m"].shape == labels.shape == (20,)
    expected = float((preds["m"] == labels).float().mean())
    assert evaluate_top1(model, data, batch_size=7, num_workers=0) == pytest.approx(expected)
    assert evaluate_top1(model, data, batch_size=5, num_workers=0, limit=10) == pytest.approx(
        float((preds["m"][:10] == labels[:10]).float().mean()))
    assert model.training


def test_evaluate_top1_on_batches_and_without_labels() -> None:
    model = tiny_vit()
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        classes = model(images).argmax(-1)
    labels = classes.clone()
    labels[:2] = (labels[:2] + 1) % 5  # two wrong
    labels[5] = -1  # unknown: not scored
    assert evaluate_top1(model, [(images[:3], labels[:3]), (images[3:], labels[3:])]) == pytest.approx(3 / 5)
    assert evaluate_top1(model, [images]) is None  # image tensors alone carry no labels


# ---- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["1,x", "0", "", "1,,2", "-4", "3.5"])
def test_bad_batch_sizes(text: str) -> None:
    with pytest.raises(VitcompressError, match="--batch-size"):
        parse_batch_sizes(text)


def test_batch_sizes_parse() -> None:
    assert parse_batch_sizes("1, 32") == (1, 32)
    assert parse_batch_sizes("8,8,1") == (8, 1)
    assert parse_batch_sizes(4) == (4,) and parse_batch_sizes([2, 3]) == (2, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "float64"}, "--dtype float64: unknown dtype"),
        ({"device": "tpu"}, "--device tpu"),
        ({"device": "banana"}, "--device banana"),
        ({"threads": 0}, "--threads"),
        ({"repeats": 0}, "--repeats"),
        ({"warmup": -1}, "--warmup"),
        ({"baseline": "nope"}, "baseline 'nope'"),
        ({"batch_sizes": "a"}, "--batch-size"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(VitcompressError, match=message):
        bench({"a": tiny_vit()}, **{"warmup": 0, "repeats": 1, "batch_sizes": (1,), "threads": 1, **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_gpu() -> None:
    with pytest.raises(VitcompressError, match="no CUDA GPU"):
        bench({"a": tiny_vit()}, device="cuda", repeats=1, threads=1)


def test_unsupported_dtype_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'\nmore details')

    monkeypatch.setattr(torch.nn.functional, "linear", refuse)
    with pytest.raises(VitcompressError, match=r"--dtype float16 is not supported on cpu .*not implemented for 'Half'\): use float32"):
        bench({"a": tiny_vit()}, dtype="float16", repeats=1, threads=1)


def test_bad_model_lists_and_failures() -> None:
    with pytest.raises(VitcompressError, match="nothing to benchmark"):
        bench({})
    with pytest.raises(VitcompressError, match="unique"):
        bench([BenchEntry("a", tiny_vit()), BenchEntry("a", tiny_vit())])
    with pytest.raises(VitcompressError, match="not a torch nn.Module"):
        bench({"a": "deit_tiny"}, threads=1)  # type: ignore[dict-item]
    with pytest.raises(VitcompressError, match="input size"):
        bench({"a": Sleeper(0.0)}, threads=1)
    with pytest.raises(VitcompressError, match=r"model 'bad' failed to run \(RuntimeError"):
        bench([BenchEntry("bad", nn.Sequential(nn.Flatten(), nn.Linear(5, 2)), (3, 4, 4))], warmup=0, repeats=1, batch_sizes=(1,))


def test_failures_under_compile_carry_a_hint() -> None:
    with pytest.raises(VitcompressError, match=r"model 'm' failed to run \(ZeroDivisionError: division by zero\); try this$"):
        _guarded("m", lambda: 1 / 0, hint="; try this")


def test_data_of_the_wrong_size_is_a_data_error() -> None:
    data = [(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))]
    with pytest.raises(DataError, match="preprocess"):
        bench({"a": tiny_vit()}, batch_sizes=(1,), warmup=0, repeats=1, data=data, threads=1)


# ---- CSV -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_result() -> BenchResult:
    entries = [BenchEntry("slow", Sleeper(0.002), (3, 4, 4)), BenchEntry("fast", Sleeper(0.001), (3, 4, 4))]
    return bench(entries, batch_sizes=(1, 4), warmup=0, repeats=2, threads=1)


def test_csv_appends_with_one_header(tmp_path: Path, small_result: BenchResult) -> None:
    path = tmp_path / "sub" / "bench.csv"
    append_csv(small_result, path)
    append_csv(small_result, path)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS)
    assert len(lines) == 1 + 2 * 4 and lines.count(lines[0]) == 1
    rows = list(csv.DictReader(path.open()))
    assert [(r["model"], r["batch_size"]) for r in rows[:4]] == [("slow", "1"), ("fast", "1"), ("slow", "4"), ("fast", "4")]
    first = small_result.measurement("fast", 4)
    assert float(rows[3]["ms_per_image_median"]) == pytest.approx(first.ms_per_image.median)
    assert float(rows[3]["speedup"]) == pytest.approx(first.speedup)
    assert rows[3]["baseline"] == "slow" and rows[3]["top1"] == "" and rows[3]["dtype"] == "float32"


def test_csv_recovers_from_a_cut_line_and_refuses_foreign_files(tmp_path: Path, small_result: BenchResult) -> None:
    path = tmp_path / "bench.csv"
    append_csv(small_result, path)
    with path.open("a") as f:
        f.write("2026-01-01,cut-off-ro")  # a writer killed mid-line
    append_csv(small_result, path)
    rows = list(csv.DictReader(path.open()))
    assert [r["model"] for r in rows] == ["slow", "fast", "slow", "fast", "cut-off-ro", "slow", "fast", "slow", "fast"]

    foreign = tmp_path / "other.csv"
    foreign.write_text("a,b\n1,2\n")
    with pytest.raises(VitcompressError, match="other columns"):
        append_csv(small_result, foreign)
    assert foreign.read_text() == "a,b\n1,2\n"
    with pytest.raises(VitcompressError, match="is a folder"):
        append_csv(small_result, tmp_path)
