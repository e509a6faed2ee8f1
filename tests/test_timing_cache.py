"""The timing cache: what one run measured, the next run on this machine reuses."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from conftest import tiny_vit
from vitcompress.cost import model_geometry
from vitcompress.plan import Deployment, Plan
from vitcompress.timing import SpeedComparison
from vitcompress.timing_cache import (
    CACHE_ENV,
    TimingCache,
    architecture_hash,
    cache_root,
    source_hash,
    timing_context,
)

PLAN = importlib.import_module("vitcompress.plan")
CONTEXT = {"device": "cpu", "threads": 1, "architecture": "abc"}
REQUEST = {"what": "plan", "batch_size": 4, "plan": {"merge_r": [2, 1]}}


def test_a_stored_timing_is_read_by_the_next_run(tmp_path: Path) -> None:
    first = TimingCache(tmp_path, CONTEXT)
    assert len(first) == 0 and first.get(REQUEST) is None
    first.put(REQUEST, {"speedup": 1.5})
    assert (first.hits, first.misses, first.stored) == (0, 1, 1)
    second = TimingCache(tmp_path, CONTEXT)
    assert len(second) == 1 and second.get(REQUEST) == {"speedup": 1.5} and second.hits == 1
    assert second.get({**REQUEST, "batch_size": 1}) is None  # another request: not stored
    # The key is canonical: the same request with its fields in another order is the same entry.
    assert second.get(dict(reversed(list(REQUEST.items())))) == {"speedup": 1.5}


def test_another_context_has_a_cache_of_its_own(tmp_path: Path) -> None:
    TimingCache(tmp_path, CONTEXT).put(REQUEST, {"speedup": 1.5})
    other = TimingCache(tmp_path, {**CONTEXT, "threads": 2})
    assert other.path != TimingCache(tmp_path, CONTEXT).path and other.get(REQUEST) is None


def test_retime_reads_nothing_but_stores_what_it_measures(tmp_path: Path) -> None:
    TimingCache(tmp_path, CONTEXT).put(REQUEST, {"speedup": 1.5})
    fresh = TimingCache(tmp_path, CONTEXT, reuse=False)
    assert fresh.get(REQUEST) is None and (fresh.hits, fresh.misses) == (0, 1)
    fresh.put(REQUEST, {"speedup": 1.6})
    assert TimingCache(tmp_path, CONTEXT).get(REQUEST) == {"speedup": 1.6}


def test_two_runs_writing_at_once_keep_each_others_entries(tmp_path: Path) -> None:
    a, b = TimingCache(tmp_path, CONTEXT), TimingCache(tmp_path, CONTEXT)  # both read an empty cache
    a.put(REQUEST, {"speedup": 1.5})
    b.put({**REQUEST, "batch_size": 1}, {"speedup": 0.9})
    again = TimingCache(tmp_path, CONTEXT)
    assert again.get(REQUEST) == {"speedup": 1.5} and again.get({**REQUEST, "batch_size": 1}) == {"speedup": 0.9}


@pytest.mark.parametrize("content", ["{not json", json.dumps([1, 2]), json.dumps({"version": 1, "context": {"x": 1}, "entries": {}}),
                                     json.dumps({"version": 1, "context": CONTEXT, "entries": [1]})],
                         ids=["corrupt", "not-an-object", "another-context", "bad-entries"])
def test_an_unreadable_cache_is_set_aside_with_a_note_and_rebuilt(tmp_path: Path, content: str) -> None:
    notes: list[str] = []
    path = TimingCache(tmp_path, CONTEXT).path
    path.parent.mkdir(parents=True)
    path.write_text(content)
    cache = TimingCache(tmp_path, CONTEXT, say=notes.append)
    assert len(cache) == 0 and len(notes) == 1 and notes[0].startswith("note: timing cache set aside:")
    assert str(path) in notes[0] and "\n" not in notes[0]
    cache.put(REQUEST, {"speedup": 1.5})
    assert TimingCache(tmp_path, CONTEXT).get(REQUEST) == {"speedup": 1.5}


def test_a_cache_that_cannot_be_written_says_so_once_and_the_run_goes_on(tmp_path: Path) -> None:
    folder = tmp_path / "a-file"  # where the cache folder should be, a file: no folder can be made
    folder.write_text("")
    notes: list[str] = []
    cache = TimingCache(folder, CONTEXT, say=notes.append)
    cache.put(REQUEST, {"speedup": 1.5})
    cache.put({**REQUEST, "batch_size": 1}, {"speedup": 0.9})
    assert len(notes) == 1 and "cannot write the timing cache" in notes[0] and CACHE_ENV in notes[0]
    assert cache.stored == 0 and cache.get(REQUEST) == {"speedup": 1.5}  # kept for this run


def test_an_interrupted_write_leaves_the_previous_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = TimingCache(tmp_path, CONTEXT)
    cache.put(REQUEST, {"speedup": 1.5})
    before = cache.path.read_text()
    real = Path.write_text

    def half_then_interrupted(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.put({**REQUEST, "batch_size": 1}, {"speedup": 0.9})
    monkeypatch.undo()
    assert cache.path.read_text() == before and [p.name for p in cache.path.parent.iterdir()] == [cache.path.name]


def test_the_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "vitcompress"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "vitcompress"


def test_the_architecture_not_the_weights_names_the_context() -> None:
    a, b = tiny_vit(), tiny_vit()
    for p in b.parameters():
        p.data.add_(1.0)
    assert architecture_hash(a, (3, 32, 32)) == architecture_hash(b, (3, 32, 32))
    assert architecture_hash(a, (3, 32, 32)) != architecture_hash(a, (3, 64, 64))
    assert architecture_hash(a, (3, 32, 32)) != architecture_hash(tiny_vit(depth=3), (3, 32, 32))
    assert architecture_hash(a, (3, 32, 32)) != architecture_hash(a.half(), (3, 32, 32))
    context = timing_context(tiny_vit(), (3, 32, 32), "cpu", 1)
    assert context["threads"] == 1 and context["vitcompress_source"] == source_hash() and context["device_name"]
    assert json.loads(json.dumps(context)) == context  # compared after a JSON round trip


# ---- the planner's timings through the cache ---------------------------------------------------
def _speed(s: float, spread: float = 0.01) -> SpeedComparison:
    return SpeedComparison(speedup=s, speedup_q25=s * (1 - spread), speedup_q75=s * (1 + spread), baseline_ms=10.0,
                           model_ms=10.0 / s, batch_size=4, rounds=10, threads=1, device="cpu")


def test_the_planner_reuses_a_timing_and_keeps_no_busy_one(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_vit()
    geom = model_geometry(model)
    calls: list[float] = []
    spreads = iter([0.01, 0.5, 0.01, 0.01])  # the second plan is first timed on a busy machine

    def fake(baseline, student, size, **kwargs):
        calls.append(kwargs["seconds"])
        return _speed(1.2 + 0.1 * len(calls), next(spreads))

    monkeypatch.setattr(PLAN, "compare_speed", fake)
    deploy = Deployment(batch_size=4, threads=1, seconds=0.01)
    quiet = PLAN._plan(geom, "tome", merges=[2, 1, 0, 0])
    busy = PLAN._plan(geom, "tome", merges=[3, 1, 0, 0])
    first = PLAN._Speeds(model, deploy, None)
    with first.worker:
        assert first.measure(quiet).speedup == pytest.approx(1.3) and first.measure(busy).speedup == pytest.approx(1.4)
    assert first.cache.stored == 1  # the busy timing (quartiles 50% apart) is not kept
    second = PLAN._Speeds(model, deploy, None)
    with second.worker:
        assert second.measure(quiet) == first.measure(quiet)  # from the cache: nothing timed
        assert len(calls) == 2
        again = Plan.from_dict({**quiet.to_dict(), "budget": "9x", "method": "auto"})  # the same structure
        assert second.measure(again).speedup == pytest.approx(1.3) and len(calls) == 2
        second.measure(quiet, seconds=0.04)  # a longer timing is another request
        second.measure(busy)
    assert calls == [0.01, 0.01, 0.04, 0.01] and second.cache.hits == 2


def test_the_latency_table_is_reused_with_integer_token_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_vit()
    geom = model_geometry(model)
    calls = []

    def fake_table(self, halves, width, counts, **kwargs):
        calls.append(sorted(counts))
        return {"attention": {n: 1e-3 * n for n in counts}, "mlp": {n: 2e-3 * n for n in counts}}

    monkeypatch.setattr(PLAN.TimingWorker, "time_token_counts", fake_table)
    deploy = Deployment(batch_size=4, threads=1, seconds=0.01)
    tables = [PLAN._latency_table(PLAN._Speeds(model, deploy, None), geom, [17, 9, 17, 5]) for _ in range(2)]
    assert len(calls) == 1 and tables[0] == tables[1] and sorted(tables[1].attention) == [5, 9, 17]
    assert tables[1].mlp[9] == pytest.approx(0.018)
    PLAN._latency_table(PLAN._Speeds(model, deploy, None, reuse_timings=False), geom, [17, 9, 5])
    PLAN._latency_table(PLAN._Speeds(model, deploy, None), geom, [17, 9])  # other token counts: another table
    assert len(calls) == 3


def test_an_entry_edited_out_of_shape_is_timed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_vit()
    geom = model_geometry(model)
    calls = []

    def fake(baseline, student, size, **kwargs):
        calls.append(1)
        return _speed(1.3)

    monkeypatch.setattr(PLAN, "compare_speed", fake)
    monkeypatch.setattr(PLAN.TimingWorker, "time_token_counts",
                        lambda self, halves, width, counts, **kw: calls.append(2) or {"attention": {n: 1.0 for n in counts},
                                                                                      "mlp": {n: 2.0 for n in counts}})
    deploy = Deployment(batch_size=4, threads=1, seconds=0.01)
    plan = PLAN._plan(geom, "tome", merges=[2, 1, 0, 0])
    first = PLAN._Speeds(model, deploy, None)
    first.measure(plan)
    PLAN._latency_table(first, geom, [17, 9])
    path = first.cache.path
    data = json.loads(path.read_text())
    data["entries"] = {key: ({"speedup": "fast"} if '"plan"' in key else {"attention": [1, 2]}) for key in data["entries"]}
    path.write_text(json.dumps(data))
    second = PLAN._Speeds(model, deploy, None)
    assert second.measure(plan).speedup == pytest.approx(1.3)
    assert PLAN._latency_table(second, geom, [17, 9]).mlp == {9: 2.0, 17: 2.0}
    assert calls == [1, 2, 1, 2]  # both timed again
