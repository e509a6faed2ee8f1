"""analyze: attention capture, exact streaming statistics, files, recommendations."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from torch import nn

from vitcompress.analyze import (
    ANALYSIS_VERSION,
    AttentionRecorder,
    AttentionStats,
    Thresholds,
    analyze,
    load_analysis,
    recommend,
    save_analysis,
    spectral_ranks,
)
from vitcompress.analyze import _svdvals  # noqa: PLC2701 - tested directly: it must be exact
from vitcompress.errors import DataError, UnsupportedModelError, VitcompressError


def tiny_vit(name: str = "deit_tiny_patch16_224", seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    args = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    args.update(kwargs)
    return timm.create_model(name, **args).eval()


def images(count: int, seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def hand_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) recomputed from a timm Attention's own weights (q_norm/k_norm included)."""
    B, N, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


def uniform_attention_vit() -> nn.Module:
    """A ViT whose queries and keys are all zero, so every attention row is exactly uniform."""
    model = tiny_vit()
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.attn_dim
            block.attn.qkv.weight[: 2 * dim].zero_()
            block.attn.qkv.bias[: 2 * dim].zero_()
    return model


def permuted(m: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Permute rows and columns: singular values (and row sums) unchanged."""
    n = m.shape[-1]
    rows, cols = torch.randperm(n, generator=gen), torch.randperm(n, generator=gen)
    return m[rows][:, cols]


def group_map(row_groups: list[int], n: int) -> torch.Tensor:
    """Row-stochastic map: the rows of group j all attend to token j only.

    Its singular values are sqrt(|group j|) (disjoint supports), so they are known exactly.
    """
    m = torch.zeros(n, n, dtype=torch.float64)
    start = 0
    for j, size in enumerate(row_groups):
        m[start : start + size, j] = 1.0
        start += size
    return m


def entropy_rank(singular_values: list[float]) -> float:
    total = sum(singular_values)
    return math.exp(-sum(s / total * math.log(s / total) for s in singular_values))


def state_size(stats: AttentionStats) -> int:
    """Everything the accumulator holds: tensor bytes plus the length of any container."""
    size = 0
    for value in vars(stats).values():
        if isinstance(value, torch.Tensor):
            size += value.numel() * value.element_size()
        elif isinstance(value, (list, dict, tuple, set)):
            size += 10**9 + len(value)  # a container would be a per-sample leak: make it show
    return size


# ---- capture -------------------------------------------------------------------------------
@pytest.mark.parametrize("qk_norm", [False, True])
def test_recorded_map_equals_attention_recomputed_from_q_and_k(qk_norm):
    model = tiny_vit(qk_norm=qk_norm)
    block = model.blocks[2]
    block.attn.fused_attn = True
    inputs = {}
    block.attn.register_forward_pre_hook(lambda m, args: inputs.__setitem__("x", args[0]))
    with AttentionRecorder(model, layers=[2]) as rec, torch.no_grad():
        model(images(3))
        assert block.attn.fused_attn is False
    expected = hand_attention(block.attn, inputs["x"]).detach()
    assert set(rec.maps) == {2}
    assert rec.maps[2].shape == (3, 4, 17, 17)
    torch.testing.assert_close(rec.maps[2], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec.maps[2].sum(-1), torch.ones(3, 4, 17))
    assert block.attn.fused_attn is True  # restored on exit


def test_recorder_removes_its_hooks_and_restores_on_error():
    model = tiny_vit()
    fused = [blk.attn.fused_attn for blk in model.blocks]
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionRecorder(model) as rec:
            model(images(1))
            raise RuntimeError("boom")
    assert [blk.attn.fused_attn for blk in model.blocks] == fused
    before = {i: t.clone() for i, t in rec.maps.items()}
    model(images(2, seed=5))  # outside the context: nothing recorded any more
    assert all(torch.equal(rec.maps[i], before[i]) for i in before)
    assert all(not blk.attn._forward_hooks and not blk.attn._forward_pre_hooks for blk in model.blocks)


def test_recorder_keeps_the_graph_when_asked():
    model = tiny_vit().train()
    with AttentionRecorder(model, layers=[0], detach=False) as rec:
        model(images(2)).sum().backward()
    assert rec.maps[0].requires_grad
    with AttentionRecorder(model, layers=[0]) as rec:
        model(images(2))
    assert not rec.maps[0].requires_grad


def test_recorder_callback_streams_without_keeping():
    model = tiny_vit()
    seen = []
    with AttentionRecorder(model, keep=False, callback=lambda i, p: seen.append((i, tuple(p.shape)))) as rec:
        model(images(2))
    assert rec.maps == {}
    assert seen == [(i, (2, 4, 17, 17)) for i in range(4)]


def test_recorder_refuses_what_it_cannot_record():
    model = tiny_vit()
    with pytest.raises(VitcompressError, match="block 9 does not exist"):
        AttentionRecorder(model, layers=[9])
    model.blocks[1].attn = nn.Identity()
    with pytest.raises(UnsupportedModelError, match="block 1 attention is a Identity"):
        AttentionRecorder(model)
    with pytest.raises(UnsupportedModelError, match="no `blocks`"):
        AttentionRecorder(nn.Linear(2, 2))


def test_recorder_notices_a_forward_that_bypasses_the_probabilities():
    model = tiny_vit()

    class Bypass(nn.Module):  # stands in for a timm change: probabilities never reach attn_drop
        def forward(self, x, attn_mask=None, is_causal=False):
            return x

    model.blocks[0].attn.forward = Bypass().forward
    with pytest.raises(UnsupportedModelError, match="block 0: its Attention.forward did not pass"):
        with AttentionRecorder(model):
            model(images(1))


# ---- statistics: exact answers ---------------------------------------------------------------
def test_uniform_maps_have_similarity_one_and_rank_one():
    n, heads = 16, 3
    stats = AttentionStats(heads, n)
    stats.update(torch.full((5, heads, n, n), 1.0 / n))
    r = stats.result()
    torch.testing.assert_close(r["similarity"], torch.ones(heads, dtype=torch.float64))
    torch.testing.assert_close(r["kl_to_mean"], torch.zeros(heads, dtype=torch.float64), atol=1e-6, rtol=0)
    for key in ("rank90", "rank99", "effective_rank"):
        torch.testing.assert_close(r[key], torch.ones(heads, dtype=torch.float64), msg=key)
    torch.testing.assert_close(stats.mean_map(), torch.full((heads, n, n), 1.0 / n))


def test_ranks_of_maps_with_known_singular_values():
    n = 16
    gen = torch.Generator().manual_seed(0)
    # rows grouped 10/4/1/1 -> singular values sqrt(10), 2, 1, 1; energies 10, 4, 1, 1 of 16:
    # 90% of 16 = 14.4 needs 3 of them, 99% = 15.84 needs all 4.
    uneven = group_map([10, 4, 1, 1] + [0] * 12, n)
    # four uniform 4x4 blocks -> four singular values equal to 1: every rank is exactly 4.
    blocks = torch.block_diag(*[torch.full((4, 4), 0.25, dtype=torch.float64)] * 4)
    maps = torch.stack([torch.stack([permuted(uneven, gen), permuted(blocks, gen)]) for _ in range(6)])
    stats = AttentionStats(2, n)
    for chunk in maps.split([1, 2, 3]):
        stats.update(chunk)
    r = stats.result()
    expected_effective = entropy_rank([math.sqrt(10), 2.0, 1.0, 1.0])
    torch.testing.assert_close(r["rank90"], torch.tensor([3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(r["rank99"], torch.tensor([4.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(r["effective_rank"], torch.tensor([expected_effective, 4.0], dtype=torch.float64))


def test_spectral_ranks_in_float32_ignore_rounding_noise():
    blocks = torch.block_diag(*[torch.full((3, 3), 1 / 3)] * 5)  # rank 5, equal singular values
    (rank90, rank99), effective = spectral_ranks(blocks[None])
    assert rank90.item() == 5 and rank99.item() == 5
    assert effective.item() == pytest.approx(5.0, abs=1e-4)


def test_disjoint_maps_have_known_similarity_and_divergence():
    n = 8
    eye = torch.eye(n, dtype=torch.float64)
    shifted = torch.roll(eye, 1, dims=1)  # no entry in common with eye
    stats = AttentionStats(1, n)
    stats.update(torch.stack([eye, shifted])[:, None])
    r = stats.result()
    # mean m = (a1 + a2) / 2: cos(a1, m) = (n/2) / (sqrt(n) sqrt(n/2)) = 1/sqrt(2)
    assert r["similarity"].item() == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    # every row of m is half/half on two tokens: KL(one-hot || m row) = log 2
    assert r["kl_to_mean"].item() == pytest.approx(math.log(2), abs=1e-12)


def test_streaming_statistics_equal_the_direct_computation():
    gen = torch.Generator().manual_seed(3)
    maps = (torch.randn(11, 2, 9, 9, generator=gen, dtype=torch.float64) * 2).softmax(-1)
    stats = AttentionStats(2, 9)
    for chunk in maps.split([4, 1, 6]):
        stats.update(chunk)
    r = stats.result()
    mean = maps.mean(0)
    flat, flat_mean = maps.flatten(2), mean.flatten(1)
    cos = (flat * flat_mean).sum(-1) / (flat.norm(dim=-1) * flat_mean.norm(dim=-1))
    kl = (maps * (maps.log() - mean.log())).sum(-1).mean(-1)  # per image and head, mean over rows
    torch.testing.assert_close(r["similarity"], cos.mean(0))
    torch.testing.assert_close(r["kl_to_mean"], kl.mean(0))
    torch.testing.assert_close(stats.mean_map(), mean.float())
    s2 = torch.linalg.svdvals(maps).square()
    share = s2.cumsum(-1) / s2.sum(-1, keepdim=True)
    rank90 = (share < 0.9).sum(-1) + 1
    torch.testing.assert_close(r["rank90"], rank90.double().mean(0))


def test_accumulator_state_does_not_grow_with_samples():
    gen = torch.Generator().manual_seed(0)
    stats = AttentionStats(2, 10)
    empty = state_size(stats)
    sizes = {}
    for done in range(0, 512, 64):
        stats.update(torch.rand(64, 2, 10, 10, generator=gen).softmax(-1))
        sizes[done + 64] = state_size(stats)
    assert stats.count == 512
    assert set(sizes.values()) == {empty} and empty == stats.state_nbytes() < 10**9


def test_analysis_memory_is_flat_from_64_to_512_samples(monkeypatch):
    """End to end: every accumulator `analyze` creates keeps one size whatever the sample count."""
    sizes: dict[int, set[int]] = {64: set(), 512: set()}
    original = AttentionStats.update
    current = {"samples": 0}

    def watched(self, probs):
        original(self, probs)
        sizes[current["samples"]].add(state_size(self))

    monkeypatch.setattr(AttentionStats, "update", watched)
    model = tiny_vit(depth=2, img_size=16)
    for samples in (64, 512):
        current["samples"] = samples
        result = analyze(model, images(samples, size=16), samples=samples, batch_size=64, progress=False)
        assert result.samples == samples
    assert sizes[64] == sizes[512] and len(sizes[64]) == 1


# ---- end to end ------------------------------------------------------------------------------
def test_forced_uniform_attention_end_to_end():
    model = uniform_attention_vit()
    result = analyze(model, images(10), samples=10, batch_size=4, progress=False)
    assert result.samples == 10 and result.num_tokens == 17
    for layer in result.layers:
        assert layer.similarity == pytest.approx([1.0] * 4, abs=1e-6)
        assert layer.kl_to_mean == pytest.approx([0.0] * 4, abs=1e-6)
        assert layer.rank90 == [1.0] * 4 and layer.rank99 == [1.0] * 4
        assert layer.effective_rank == pytest.approx([1.0] * 4, abs=1e-6)
        assert layer.recommendation == "static"
    for mean in result.attention_means.values():
        torch.testing.assert_close(mean, torch.full((4, 17, 17), 1 / 17))


def test_analysis_equals_statistics_of_the_recorded_maps():
    model = tiny_vit()
    x = images(7)
    with AttentionRecorder(model) as rec, torch.no_grad():
        model(x)
    result = analyze(model, x, samples=7, batch_size=7, progress=False)  # same batch: same maps, bit for bit
    for i, maps in rec.maps.items():
        direct = AttentionStats(4, 17)
        direct.update(maps)
        r = direct.result()
        layer = result.layers[i]
        assert layer.similarity == pytest.approx(r["similarity"].tolist(), abs=1e-6)
        assert layer.rank90 == pytest.approx(r["rank90"].tolist(), abs=1e-9)
        assert layer.effective_rank == pytest.approx(r["effective_rank"].tolist(), abs=1e-4)
        torch.testing.assert_close(result.attention_means[i], maps.double().mean(0).float())


@pytest.mark.parametrize(
    "name, kwargs, prefix, heads",
    [
        ("deit_tiny_patch16_224", {"embed_dim": 192, "num_heads": 3}, 1, 3),
        ("deit_small_patch16_224", {"embed_dim": 384, "num_heads": 6}, 1, 6),
        ("deit_base_patch16_224", {"embed_dim": 768, "num_heads": 12}, 1, 12),
        ("deit_tiny_distilled_patch16_224", {}, 2, 4),
        ("vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}, 0, 4),
        ("vit_small_patch16_224", {"reg_tokens": 4, "global_pool": "avg"}, 5, 4),
        ("deit3_small_patch16_224", {}, 1, 4),
    ],
)
def test_model_variants(name, kwargs, prefix, heads):
    args = {"depth": 2, **kwargs}
    if "num_heads" not in kwargs:
        args.setdefault("embed_dim", 64)
        args["num_heads"] = 4
    model = tiny_vit(name, **args)
    result = analyze(model, images(3), samples=3, progress=False)
    n = prefix + 16
    assert (result.num_prefix_tokens, result.num_tokens, result.grid, result.num_heads) == (prefix, n, (4, 4), heads)
    assert sorted(result.attention_means) == [0, 1]
    for layer in result.layers:
        assert all(0.0 <= s <= 1.0 for s in layer.similarity)
        assert all(1 <= r90 <= r99 <= n for r90, r99 in zip(layer.rank90, layer.rank99))
        assert all(1 - 1e-6 <= e <= n for e in layer.effective_rank)
        mean = result.attention_means[layer.index]
        assert mean.shape == (heads, n, n)
        torch.testing.assert_close(mean.sum(-1), torch.ones(heads, n))


def test_data_forms_and_sample_limit():
    model = tiny_vit(depth=1)
    x = images(9)
    by_tensor = analyze(model, x, samples=5, batch_size=2, progress=False)
    by_pairs = analyze(model, [(x[:4], torch.zeros(4)), (x[4:], torch.zeros(5))], samples=5, progress=False)
    by_images = analyze(model, [x[:3], x[3:]], samples=5, progress=False)
    assert by_tensor.samples == by_pairs.samples == by_images.samples == 5
    assert by_pairs.layers[0].similarity == pytest.approx(by_tensor.layers[0].similarity, abs=1e-6)
    assert by_images.layers[0].effective_rank == pytest.approx(by_tensor.layers[0].effective_rank, abs=1e-4)
    fewer = analyze(model, x[:2], samples=5, progress=False)
    assert fewer.samples == 2


def test_image_data_from_the_data_module():
    from vitcompress.data import load_data

    model = tiny_vit(depth=1)
    data = load_data("demo", data_config={"input_size": (3, 32, 32), "crop_pct": 1.0}, limit=6)
    result = analyze(model, data, samples=6, batch_size=4, num_workers=0, progress=False, data_source="demo")
    assert result.samples == 6 and result.data_source == "demo"


def test_progress_is_reported_through_the_callback():
    calls: list[tuple[int, int, str]] = []
    analyze(tiny_vit(depth=1), images(10), samples=7, batch_size=3, progress=lambda *a: calls.append(a))
    assert calls == [(0, 7, "analyzing attention"), (3, 7, "analyzing attention"), (6, 7, "analyzing attention"),
                     (7, 7, "analyzing attention")]


def test_mode_and_fused_attention_are_restored():
    model = tiny_vit(depth=1).train()
    model.blocks[0].attn.fused_attn = True
    analyze(model, images(2), samples=2, progress=False)
    assert model.training and model.blocks[0].attn.fused_attn is True


def test_input_errors():
    model = tiny_vit(depth=1)
    with pytest.raises(DataError, match="images are 48x48 but the model takes 32x32"):
        analyze(model, images(2, size=48), progress=False)
    with pytest.raises(DataError, match="no images"):
        analyze(model, [], progress=False)
    with pytest.raises(VitcompressError, match="--samples must be at least 1"):
        analyze(model, images(2), samples=0, progress=False)
    with pytest.raises(DataError, match="cannot read a batch of type str"):
        analyze(model, ["not an image"], progress=False)
    with pytest.raises(VitcompressError, match="NaN or inf"):
        AttentionStats(1, 2).update(torch.full((1, 1, 2, 2), float("nan")))


# ---- recommendations -------------------------------------------------------------------------
def test_recommend_thresholds_are_inclusive_and_static_wins():
    t = Thresholds(static_similarity=0.8, reduce_rank90=0.25)
    assert recommend(0.8, 0.9, t) == "static"
    assert recommend(0.8, 0.1, t) == "static"
    assert recommend(0.79, 0.25, t) == "reduce"
    assert recommend(0.79, 0.26, t) == "keep"


def test_apply_thresholds_relabels_layers():
    result = analyze(tiny_vit(depth=2), images(4), samples=4, progress=False)
    result.apply_thresholds(Thresholds(static_similarity=0.0, reduce_rank90=0.0))
    assert result.static_candidates() == [0, 1]
    result.apply_thresholds(Thresholds(static_similarity=1.1, reduce_rank90=1.0))
    assert result.reduce_candidates() == [0, 1] and result.static_candidates() == []
    result.apply_thresholds(Thresholds(static_similarity=1.1, reduce_rank90=0.0))
    assert set(result.recommendations().values()) == {"keep"}


# ---- files -----------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    result = analyze(tiny_vit(), images(5), samples=5, model_id="tiny", data_source="noise", progress=False)
    paths = save_analysis(result, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"analysis.json", "attention_means.safetensors", "analysis.png"}
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads(paths["json"].read_text())
    assert raw["schema"] == "vitcompress.analysis" and raw["version"] == ANALYSIS_VERSION
    assert raw["similarity_metric"] == "cosine_to_mean" and raw["thresholds"] == Thresholds().to_dict()
    assert [layer["index"] for layer in raw["layers"]] == [0, 1, 2, 3]
    loaded = load_analysis(tmp_path / "out")
    assert loaded.to_dict() == result.to_dict()
    assert sorted(loaded.attention_means) == [0, 1, 2, 3]
    for i, mean in result.attention_means.items():
        assert torch.equal(loaded.attention_means[i], mean)
    assert load_analysis(paths["json"], load_means=False).attention_means == {}


def test_load_errors(tmp_path):
    with pytest.raises(VitcompressError, match="no analysis at"):
        load_analysis(tmp_path)
    result = analyze(tiny_vit(depth=1), images(2), samples=2, progress=False)
    paths = save_analysis(result, tmp_path)
    raw = json.loads(paths["json"].read_text())
    paths["json"].write_text(json.dumps({**raw, "version": ANALYSIS_VERSION + 1}))
    with pytest.raises(VitcompressError, match="newer than this vitcompress"):
        load_analysis(tmp_path)
    paths["json"].write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(VitcompressError, match="not a vitcompress analysis"):
        load_analysis(tmp_path)
    paths["json"].write_text("{")
    with pytest.raises(VitcompressError, match="not valid JSON"):
        load_analysis(tmp_path)
    paths["json"].write_text(json.dumps(raw))
    paths["attention_means"].unlink()
    with pytest.raises(VitcompressError, match="attention_means.safetensors is missing"):
        load_analysis(tmp_path)


def test_threaded_svd_is_bit_identical_and_restores_threads():
    maps = torch.rand(5, 3, 12, 12, generator=torch.Generator().manual_seed(0)).softmax(-1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pooled = _svdvals(maps)  # 15 matrices over a pool of 2 threads
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert torch.equal(pooled, torch.linalg.svdvals(maps))
    finally:
        torch.set_num_threads(threads)
