"""Attention heterogeneity across layers: the two observations behind arXiv:2310.07664.

For every block and head, over a sample of images, ``analyze`` measures

* **cross-image similarity** (``cosine_to_mean``): the mean, over images, of the cosine similarity
  between an image's flattened N x N attention-probability map and the mean map over the sample.
  Maps are non-negative, so it lies in [0, 1]; 1 means every image attends the same way, so a
  static attention matrix (DGSSA) can stand in for the dynamic one. Alongside it, ``kl_to_mean``
  is the mean KL divergence (nats, averaged over query rows) from an image's attention rows to the
  mean rows: what replacing the dynamic attention by the mean loses (it is the generalised
  Jensen-Shannon divergence of the sample, H(mean) - mean H);
* **rank**: per image, the number of singular values holding 90% and 99% of the spectral energy
  (sum of squared singular values) of the map, and the effective rank of Roy & Vetterli (exp of the
  entropy of the normalised singular values); averaged over images, and also given as a fraction
  of the token count N. A low rank means redundant tokens, which GLAD aggregates;
* the **mean attention map** per block ([H, N, N] probabilities), which DGSSA starts from.

Everything is accumulated in one streaming pass whose state does not depend on the sample count.
The mean map is only known at the end, yet the cosine to it is exact: with u_i = a_i / |a_i|,
sum_i cos(a_i, m) = <sum_i u_i, m> / |m|, so it is enough to keep sum_i a_i and sum_i u_i.
Likewise sum_i KL(a_i || m) = S H(m) - sum_i H(a_i) per row needs only the summed entropies.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from vitcompress._io import atomic_path, read_json, write_json_atomic
from vitcompress.data import iter_batches
from vitcompress.errors import DataError, UnsupportedModelError, VitcompressError
from vitcompress.geometry import vit_geometry
from vitcompress.names import ANALYSIS_JSON as JSON_NAME
from vitcompress.names import MEANS_FILE as MEANS_NAME
from vitcompress.names import PLOT_FILE as PLOT_NAME

SCHEMA = "vitcompress.analysis"
ANALYSIS_VERSION = 1
SIMILARITY_METRIC = "cosine_to_mean"
SIMILARITY_DESCRIPTION = (
    "mean over images of the cosine similarity between an image's flattened attention-probability "
    "map and the mean map over the sample (per head; in [0, 1], 1 = identical for every image)"
)
RANK_DESCRIPTION = (
    "rank90/rank99: singular values needed for 90%/99% of the spectral energy (sum of squared "
    "singular values) of one image's N x N map; effective_rank: exp of the entropy of the normalised "
    "singular values (Roy & Vetterli 2007); each averaged over images; *_norm = divided by N"
)
ENERGY_LEVELS = (0.90, 0.99)
PROGRESS_LABEL = "analyzing attention"

Progress = Callable[[int, int, str], None]  # (images done, images in all, text)

STATIC, REDUCE, KEEP = "static", "reduce", "keep"
RECOMMENDATION_TEXT = {
    STATIC: "static-attention candidate",
    REDUCE: "token-reduction candidate",
    KEEP: "keep",
}


# ---- thresholds and recommendations ---------------------------------------------------------
@dataclass(frozen=True)
class Thresholds:
    """When a layer is called a candidate for each compression.

    ``static_similarity``: a layer is a static-attention (DGSSA) candidate when the similarity of
    its heads, averaged, is at least this. ``reduce_rank90``: a layer is a token-reduction (GLAD)
    candidate when its rank90 / N, averaged over heads, is at most this.

    Why these defaults: at 0.25, 90% of the layer's attention energy lies in at most N/4
    directions, about the share of patch tokens a GLAD pyramid keeps (``[7, 3, 1]`` keeps 59 of
    196), so aggregating to that many tokens loses little. A similarity of 0.8 (1 = identical maps)
    marks attention clearly shared across images, not merely diffuse. Both are rules of thumb, not
    fitted values: they are printed and stored with the analysis and can be changed
    (``--static-threshold``, ``--rank-threshold``); the planner also reads the measurements.
    """

    static_similarity: float = 0.80
    reduce_rank90: float = 0.25

    def to_dict(self) -> dict[str, float]:
        return {"static_similarity": self.static_similarity, "reduce_rank90": self.reduce_rank90}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Thresholds":
        return cls(float(d["static_similarity"]), float(d["reduce_rank90"]))


def recommend(similarity: float, rank90_norm: float, thresholds: Thresholds | None = None) -> str:
    """'static', 'reduce' or 'keep' for a layer with this mean similarity and normalised rank90.

    Static attention wins when both apply: it removes the query-key product of the layer outright,
    while a low rank only says that the tokens *after* it could be aggregated.
    """
    t = thresholds or Thresholds()
    if similarity >= t.static_similarity:
        return STATIC
    if rank90_norm <= t.reduce_rank90:
        return REDUCE
    return KEEP


# ---- per-layer results ----------------------------------------------------------------------
@dataclass
class LayerAnalysis:
    """Statistics of one block (original index ``index``); lists hold one value per head."""

    index: int
    num_tokens: int
    similarity: list[float]
    kl_to_mean: list[float]
    rank90: list[float]  # mean number of singular values, not normalised
    rank99: list[float]
    effective_rank: list[float]
    recommendation: str = KEEP

    @property
    def similarity_mean(self) -> float:
        return _mean(self.similarity)

    @property
    def similarity_min(self) -> float:
        return min(self.similarity)

    @property
    def kl_mean(self) -> float:
        return _mean(self.kl_to_mean)

    @property
    def rank90_mean(self) -> float:
        return _mean(self.rank90)

    @property
    def rank99_mean(self) -> float:
        return _mean(self.rank99)

    @property
    def effective_rank_mean(self) -> float:
        return _mean(self.effective_rank)

    @property
    def rank90_norm(self) -> float:
        return self.rank90_mean / self.num_tokens

    @property
    def rank99_norm(self) -> float:
        return self.rank99_mean / self.num_tokens

    @property
    def effective_rank_norm(self) -> float:
        return self.effective_rank_mean / self.num_tokens

    def to_dict(self, thresholds: Thresholds) -> dict[str, Any]:
        return {
            "index": self.index,
            "recommendation": self.recommendation,
            "static_candidate": self.similarity_mean >= thresholds.static_similarity,
            "reduce_candidate": self.rank90_norm <= thresholds.reduce_rank90,
            "similarity": self.similarity_mean,
            "similarity_min": self.similarity_min,
            "kl_to_mean": self.kl_mean,
            "rank90": self.rank90_mean,
            "rank99": self.rank99_mean,
            "effective_rank": self.effective_rank_mean,
            "rank90_norm": self.rank90_norm,
            "rank99_norm": self.rank99_norm,
            "effective_rank_norm": self.effective_rank_norm,
            "heads": {
                "similarity": self.similarity,
                "kl_to_mean": self.kl_to_mean,
                "rank90": self.rank90,
                "rank99": self.rank99,
                "effective_rank": self.effective_rank,
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], num_tokens: int) -> "LayerAnalysis":
        heads = d["heads"]
        return cls(
            index=int(d["index"]),
            num_tokens=num_tokens,
            similarity=[float(v) for v in heads["similarity"]],
            kl_to_mean=[float(v) for v in heads["kl_to_mean"]],
            rank90=[float(v) for v in heads["rank90"]],
            rank99=[float(v) for v in heads["rank99"]],
            effective_rank=[float(v) for v in heads["effective_rank"]],
            recommendation=str(d.get("recommendation", KEEP)),
        )


@dataclass
class Analysis:
    """What ``analyze`` measured; ``attention_means`` ({block: [H, N, N]}) is stored beside the JSON."""

    model_id: str
    data_source: str
    samples: int
    num_tokens: int
    num_prefix_tokens: int
    grid: tuple[int, int]
    num_heads: int
    layers: list[LayerAnalysis]
    thresholds: Thresholds = field(default_factory=Thresholds)
    similarity_metric: str = SIMILARITY_METRIC
    attention_means: dict[int, Tensor] = field(default_factory=dict, repr=False)
    version: int = ANALYSIS_VERSION

    def recommendations(self) -> dict[int, str]:
        return {layer.index: layer.recommendation for layer in self.layers}

    def static_candidates(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.recommendation == STATIC]

    def reduce_candidates(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.recommendation == REDUCE]

    def apply_thresholds(self, thresholds: Thresholds) -> None:
        """Re-label every layer under new thresholds (the measurements do not change)."""
        self.thresholds = thresholds
        for layer in self.layers:
            layer.recommendation = recommend(layer.similarity_mean, layer.rank90_norm, thresholds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": self.version,
            "model": self.model_id,
            "data": self.data_source,
            "samples": self.samples,
            "num_tokens": self.num_tokens,
            "num_prefix_tokens": self.num_prefix_tokens,
            "grid": list(self.grid),
            "num_heads": self.num_heads,
            "num_layers": len(self.layers),
            "similarity_metric": self.similarity_metric,
            "similarity_description": SIMILARITY_DESCRIPTION,
            "rank_description": RANK_DESCRIPTION,
            "thresholds": self.thresholds.to_dict(),
            "recommendation_rule": (
                "static if similarity >= thresholds.static_similarity, else reduce if "
                "rank90_norm <= thresholds.reduce_rank90, else keep"
            ),
            "layers": [layer.to_dict(self.thresholds) for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Analysis":
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            raise VitcompressError("not a vitcompress analysis: expected a JSON object with schema 'vitcompress.analysis'")
        version = int(d.get("version", 0))
        if version > ANALYSIS_VERSION:
            raise VitcompressError(
                f"analysis format version {version} is newer than this vitcompress understands "
                f"({ANALYSIS_VERSION}): upgrade vitcompress"
            )
        try:
            num_tokens = int(d["num_tokens"])
            return cls(
                model_id=str(d["model"]),
                data_source=str(d["data"]),
                samples=int(d["samples"]),
                num_tokens=num_tokens,
                num_prefix_tokens=int(d["num_prefix_tokens"]),
                grid=(int(d["grid"][0]), int(d["grid"][1])),
                num_heads=int(d["num_heads"]),
                layers=[LayerAnalysis.from_dict(layer, num_tokens) for layer in d["layers"]],
                thresholds=Thresholds.from_dict(d["thresholds"]),
                similarity_metric=str(d["similarity_metric"]),
                version=version,
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise VitcompressError(f"analysis JSON is incomplete or malformed ({type(exc).__name__}: {exc}); rerun `vitcompress analyze`") from None


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


# ---- statistics -----------------------------------------------------------------------------
def spectral_ranks(maps: Tensor, levels: Sequence[float] = ENERGY_LEVELS) -> tuple[list[Tensor], Tensor]:
    """Energy ranks (one tensor per level) and effective rank of each N x N matrix in ``maps``.

    ``maps``: [..., N, N]. Energy rank at level q: the smallest k whose k largest squared singular
    values sum to at least q of the total. Effective rank: exp(H(p)), p = s / sum(s), where singular
    values below ``s_max * N * eps`` (the tolerance of ``torch.linalg.matrix_rank``) count as 0, so
    an exactly rank-k matrix with equal singular values has effective rank k, not k plus noise.
    """
    s = _svdvals(maps)  # descending
    energy = s.square()
    cumulative = energy.cumsum(-1)
    total = cumulative[..., -1:]
    ranks = [(cumulative < q * total).sum(-1).to(s.dtype) + 1 for q in levels]
    tol = s[..., :1] * s.shape[-1] * torch.finfo(s.dtype).eps
    s = torch.where(s > tol, s, torch.zeros_like(s))
    p = s / s.sum(-1, keepdim=True)
    effective = torch.exp(-torch.special.xlogy(p, p).sum(-1))
    return ranks, effective


def _svdvals(maps: Tensor) -> Tensor:
    """Singular values of a batch of matrices; on CPU, one matrix per thread.

    torch runs a batch of CPU SVDs one after the other, each on all of torch's threads; for small
    matrices MKL's threads gain little, and when the cores are shared with other processes the
    spinning OpenMP threads make it up to 100x slower (measured: 65x65 maps, 0.3 ms each on one
    thread, 25 ms each on two threads of a busy 2-core machine). So torch is set to one thread
    while the batch is split over a pool of as many Python threads as torch had (the SVD releases
    the GIL). The result is bit-identical to a plain ``torch.linalg.svdvals``.
    """
    threads = torch.get_num_threads()
    if maps.device.type != "cpu":
        return torch.linalg.svdvals(maps)
    flat = maps.reshape(-1, *maps.shape[-2:])
    torch.set_num_threads(1)
    try:
        if threads == 1 or flat.shape[0] < 2 * threads:
            values = torch.linalg.svdvals(flat)
        else:
            with ThreadPoolExecutor(threads) as pool:
                values = torch.cat(list(pool.map(torch.linalg.svdvals, flat.chunk(threads))))
    finally:
        torch.set_num_threads(threads)
    return values.reshape(*maps.shape[:-1])


class AttentionStats:
    """Streaming statistics of one layer's attention maps; state size is independent of the count.

    Feed ``update`` with [B, H, N, N] probabilities (rows sum to 1); read ``result()`` at the end.
    """

    def __init__(self, num_heads: int, num_tokens: int, device: torch.device | str = "cpu") -> None:
        self.num_heads, self.num_tokens = int(num_heads), int(num_tokens)
        shape = (self.num_heads, self.num_tokens, self.num_tokens)
        # float64 sums: thousands of float32 maps add up without losing the last digits.
        self.sum_maps = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sum_unit_maps = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sum_row_entropy = torch.zeros(self.num_heads, dtype=torch.float64, device=device)
        self.sum_ranks = torch.zeros(len(ENERGY_LEVELS) + 1, self.num_heads, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, probs: Tensor) -> None:
        if probs.dim() != 4 or tuple(probs.shape[1:]) != (self.num_heads, self.num_tokens, self.num_tokens):
            raise VitcompressError(
                f"attention maps of shape {tuple(probs.shape)} do not match "
                f"[batch, {self.num_heads}, {self.num_tokens}, {self.num_tokens}]"
            )
        a = probs.detach().to(self.sum_maps.device)
        if a.dtype not in (torch.float32, torch.float64):
            a = a.float()  # half/bfloat16 models: statistics in float32
        norms = torch.linalg.vector_norm(a, dim=(-2, -1))  # [B, H]; NaN/inf anywhere shows here
        if not bool(torch.isfinite(norms).all()):
            raise VitcompressError("attention maps hold NaN or inf values: the model's weights or inputs are broken")
        self.sum_maps += a.sum(0).double()
        self.sum_unit_maps += torch.einsum("bhij,bh->hij", a, norms.reciprocal()).double()
        self.sum_row_entropy -= torch.special.xlogy(a, a).sum((0, 2, 3)).double()
        ranks, effective = spectral_ranks(a)
        self.sum_ranks += torch.stack([*ranks, effective]).sum(1).double()
        self.count += int(a.shape[0])

    def state_nbytes(self) -> int:
        """Bytes held by the accumulator (constant: it does not grow with the number of maps)."""
        tensors = (self.sum_maps, self.sum_unit_maps, self.sum_row_entropy, self.sum_ranks)
        return sum(t.numel() * t.element_size() for t in tensors)

    def mean_map(self) -> Tensor:
        """Mean attention probabilities [H, N, N], float32; rows renormalised to sum exactly to 1."""
        self._require_data()
        mean = self.sum_maps / self.count
        return (mean / mean.sum(-1, keepdim=True)).float().cpu()

    def result(self) -> dict[str, Tensor]:
        """Per-head float64 tensors: similarity, kl_to_mean, rank90, rank99, effective_rank."""
        self._require_data()
        n, total = self.count, self.sum_maps
        flat_total = total.flatten(1)
        similarity = (self.sum_unit_maps.flatten(1) * flat_total).sum(1) / (n * torch.linalg.vector_norm(flat_total, dim=1))
        mean = total / n
        mean_entropy = -torch.special.xlogy(mean, mean).sum(-1).mean(-1)  # H(mean row), averaged over rows
        kl = mean_entropy - self.sum_row_entropy / (n * self.num_tokens)
        averages = self.sum_ranks / n
        return {
            "similarity": similarity.clamp(0.0, 1.0).cpu(),
            "kl_to_mean": kl.clamp_min(0.0).cpu(),
            "rank90": averages[0].cpu(),
            "rank99": averages[1].cpu(),
            "effective_rank": averages[2].cpu(),
        }

    def _require_data(self) -> None:
        if self.count == 0:
            raise DataError("no attention maps were recorded: the data gave no images")


# ---- capturing attention from a stock timm ViT ----------------------------------------------
class AttentionRecorder:
    """Record the attention probabilities of a stock timm ViT, without editing timm.

    Inside ``with AttentionRecorder(model) as rec:``, each forward stores ``rec.maps[i]`` =
    [B, H, N, N] probabilities of ``model.blocks[i]`` (the last forward only), and calls
    ``callback(i, probs)`` if given. ``keep=False`` stores nothing (for streaming consumers).
    Fused attention never builds the matrix, so it is switched off inside the context only and
    restored on exit. The probabilities are read where timm's ``Attention`` passes them to its
    attention dropout (after softmax and any mask, before dropout), so q_norm/k_norm, scale_norm
    and gates are all timm's own. With ``detach=False`` the maps keep their autograd graph.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[int] | None = None,
        detach: bool = True,
        *,
        keep: bool = True,
        callback: Callable[[int, Tensor], None] | None = None,
    ) -> None:
        from timm.layers import Attention

        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no `blocks`: attention can only be recorded from a timm VisionTransformer")
        indices = list(range(len(blocks))) if layers is None else [int(i) for i in layers]
        for i in indices:
            if not 0 <= i < len(blocks):
                raise VitcompressError(f"block {i} does not exist: the model has blocks 0..{len(blocks) - 1}")
            attn = getattr(blocks[i], "attn", None)
            if not isinstance(attn, Attention):
                raise UnsupportedModelError(
                    f"block {i} attention is a {type(attn).__name__}, not timm's Attention: its attention maps cannot be recorded"
                )
        self.model, self.layers, self.detach = model, indices, detach
        self.keep, self.callback = keep, callback
        self.maps: dict[int, Tensor] = {}
        self._handles: list[Any] = []
        self._saved_fused: dict[int, bool] = {}
        self._captured: dict[int, bool] = {}

    def __enter__(self) -> "AttentionRecorder":
        try:
            for i in self.layers:
                attn = self.model.blocks[i].attn
                self._saved_fused[i] = attn.fused_attn
                attn.fused_attn = False
                self._handles.append(attn.register_forward_pre_hook(self._starter(i)))
                self._handles.append(attn.attn_drop.register_forward_pre_hook(self._capturer(i)))
                self._handles.append(attn.register_forward_hook(self._checker(i)))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for i, fused in self._saved_fused.items():
            self.model.blocks[i].attn.fused_attn = fused
        self._saved_fused.clear()

    def _starter(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._captured[i] = False

        return hook

    def _capturer(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            probs = args[0].detach() if self.detach else args[0]
            self._captured[i] = True
            if self.keep:
                self.maps[i] = probs
            if self.callback is not None:
                self.callback(i, probs)

        return hook

    def _checker(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._captured.get(i, False):
                raise UnsupportedModelError(
                    f"block {i}: its Attention.forward did not pass attention probabilities through "
                    "attn_drop, so they cannot be recorded (an unsupported timm version or a patched module?)"
                )

        return hook


# ---- the analysis ---------------------------------------------------------------------------
def analyze(
    model: nn.Module,
    data: Any,
    *,
    samples: int = 256,
    batch_size: int = 32,
    model_id: str = "model",
    data_source: str = "",
    thresholds: Thresholds | None = None,
    num_workers: int | None = None,
    progress: Union[Progress, bool, None] = None,
) -> Analysis:
    """Measure attention similarity and rank of every block over ``samples`` images.

    ``data``: a ``vitcompress.data.ImageData`` (batched with ``batch_size``), a DataLoader or any
    iterable of ``(images, labels)`` batches or of image tensors [B, 3, H, W] (used as batched),
    or one image tensor (see ``vitcompress.data.iter_batches``). Uses at most ``samples`` images;
    the model runs in eval mode, on its own device, and is returned to its previous mode.
    ``progress(done, total, "analyzing attention")`` is called once before the first batch and
    after every batch (images done / to do); without it (or with a bool) nothing is reported.
    """
    if samples < 1:
        raise VitcompressError(f"--samples must be at least 1, got {samples}")
    geometry = vit_geometry(model)
    report = progress if callable(progress) and not isinstance(progress, bool) else None
    stats: dict[int, AttentionStats] = {}
    recorder = AttentionRecorder(model, keep=False, callback=lambda i, p: stats[i].update(p))  # validates blocks
    device = next(model.parameters()).device
    for i, block in enumerate(model.blocks):
        stats[i] = AttentionStats(int(block.attn.num_heads), geometry.num_tokens, device)

    was_training = model.training
    model.eval()
    try:
        total = min(samples, _length(data) or samples)
        if report is not None:
            report(0, total, PROGRESS_LABEL)
        advance = (lambda seen: report(seen, total, PROGRESS_LABEL)) if report is not None else (lambda seen: None)
        with recorder, torch.inference_mode():
            batches = (images for images, _ in iter_batches(data, batch_size, num_workers))
            seen = _feed(model, batches, samples, advance)
    finally:
        model.train(was_training)
    if seen == 0:
        raise DataError(f"no images to analyze in {data_source or 'the data'}")
    layers = [_layer_analysis(i, s) for i, s in stats.items()]
    analysis = Analysis(
        model_id=model_id,
        data_source=data_source,
        samples=seen,
        num_heads=int(model.blocks[0].attn.num_heads),
        layers=layers,
        attention_means={i: s.mean_map() for i, s in stats.items()},
        num_tokens=geometry.num_tokens,
        num_prefix_tokens=geometry.num_prefix_tokens,
        grid=geometry.grid,
    )
    analysis.apply_thresholds(thresholds or Thresholds())
    return analysis


def _feed(model: nn.Module, batches: Iterable[Tensor], samples: int, advance: Callable[[int], None]) -> int:
    """Run the model on up to ``samples`` images; return how many it saw (``advance(seen)`` after each batch)."""
    param = next(model.parameters())
    seen = 0
    for images in batches:
        images = images[: samples - seen]
        _check_images(model, images)
        model(images.to(device=param.device, dtype=param.dtype))
        seen += int(images.shape[0])
        advance(seen)
        if seen >= samples:
            break
    return seen


def _layer_analysis(index: int, stats: AttentionStats) -> LayerAnalysis:
    r = stats.result()
    return LayerAnalysis(
        index=index,
        num_tokens=stats.num_tokens,
        similarity=r["similarity"].tolist(),
        kl_to_mean=r["kl_to_mean"].tolist(),
        rank90=r["rank90"].tolist(),
        rank99=r["rank99"].tolist(),
        effective_rank=r["effective_rank"].tolist(),
    )


def _check_images(model: nn.Module, images: Tensor) -> None:
    expected = getattr(model.patch_embed, "img_size", None)
    if images.dim() != 4:
        raise DataError(f"expected image batches of shape [B, C, H, W], got {tuple(images.shape)}")
    if expected is not None and tuple(images.shape[-2:]) != tuple(expected):
        raise DataError(
            f"images are {images.shape[-2]}x{images.shape[-1]} but the model takes "
            f"{expected[0]}x{expected[1]}: preprocess them with the model's data config"
        )


def _length(data: Any) -> int | None:
    if isinstance(data, Tensor):
        return int(data.shape[0]) if data.dim() == 4 else 1
    dataset = getattr(data, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None  # type: ignore[arg-type]
    except TypeError:
        return None


# ---- files ----------------------------------------------------------------------------------
def save_analysis(analysis: Analysis, out_dir: str | Path) -> dict[str, Path]:
    """Write analysis.json, attention_means.safetensors and analysis.png (each atomically)."""
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "attention_means": out / MEANS_NAME, "plot": out / PLOT_NAME}
    if analysis.attention_means:
        tensors = {f"blocks.{i}": t.detach().float().cpu().contiguous() for i, t in analysis.attention_means.items()}
        meta = {"vitcompress": json.dumps({"schema": SCHEMA, "version": analysis.version, "model": analysis.model_id, "samples": analysis.samples})}
        with atomic_path(paths["attention_means"]) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    else:
        del paths["attention_means"]
    plot_analysis(analysis, paths["plot"])
    write_json_atomic(paths["json"], analysis.to_dict())
    return paths


def load_analysis(path: str | Path, *, load_means: bool = True) -> Analysis:
    """Read what ``save_analysis`` wrote (``path``: the folder or its analysis.json)."""
    path = Path(path).expanduser()
    json_path = path / JSON_NAME if path.is_dir() else path
    if not json_path.is_file():
        raise VitcompressError(f"no analysis at {json_path}: run `vitcompress analyze MODEL --out {json_path.parent}` first")
    raw = read_json(json_path, "rerun `vitcompress analyze`")
    analysis = Analysis.from_dict(raw)
    if load_means:
        analysis.attention_means = _load_means(json_path.parent / MEANS_NAME, analysis)
    return analysis


def _load_means(path: Path, analysis: Analysis) -> dict[int, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise VitcompressError(f"{path} is missing: rerun `vitcompress analyze` to write the attention means")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise VitcompressError(f"{path} is not a readable safetensors file ({exc}); rerun `vitcompress analyze`") from None
    means = {}
    n = analysis.num_tokens
    for key, tensor in tensors.items():
        if not key.startswith("blocks.") or not key[len("blocks.") :].isdigit():
            raise VitcompressError(f"{path}: unexpected tensor '{key}' (expected blocks.<index>)")
        if tensor.dim() != 3 or tuple(tensor.shape[1:]) != (n, n):
            raise VitcompressError(f"{path}: '{key}' has shape {tuple(tensor.shape)}, expected [heads, {n}, {n}]")
        means[int(key[len("blocks.") :])] = tensor
    return dict(sorted(means.items()))


def plot_analysis(analysis: Analysis, path: str | Path) -> Path:
    """One figure: similarity (top) and normalised ranks (bottom) against the block index."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    idx = [layer.index for layer in analysis.layers]
    t = analysis.thresholds
    fig = Figure(figsize=(8, 6.5), dpi=120, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    _shade_recommendations(top, analysis)
    _shade_recommendations(bottom, analysis)
    sim_mean = [layer.similarity_mean for layer in analysis.layers]
    sim_lo = [min(layer.similarity) for layer in analysis.layers]
    sim_hi = [max(layer.similarity) for layer in analysis.layers]
    top.fill_between(idx, sim_lo, sim_hi, color="tab:blue", alpha=0.2, label="range over heads")
    top.plot(idx, sim_mean, "o-", color="tab:blue", label="mean over heads")
    top.axhline(t.static_similarity, color="tab:green", ls="--", lw=1, label=f"static threshold {t.static_similarity:g}")
    top.set_ylabel("cross-image similarity\n(cosine to the mean map)")
    top.set_ylim(min(0.0, min(sim_lo)), 1.02)
    top.legend(loc="best", fontsize=8, framealpha=0.9)
    top.set_title(f"{analysis.model_id}: attention across layers ({analysis.samples} images, N = {analysis.num_tokens} tokens)", fontsize=10)

    ranks = {
        "rank90 / N": ([layer.rank90_norm for layer in analysis.layers], "o-", "tab:blue"),
        "rank99 / N": ([layer.rank99_norm for layer in analysis.layers], "s-", "tab:purple"),
        "effective rank / N": ([layer.effective_rank_norm for layer in analysis.layers], "^-", "tab:brown"),
    }
    for label, (values, marker, color) in ranks.items():
        bottom.plot(idx, values, marker, color=color, label=label)
    bottom.axhline(t.reduce_rank90, color="tab:orange", ls="--", lw=1, label=f"reduce threshold (rank90 / N) {t.reduce_rank90:g}")
    bottom.set_ylabel("attention rank / N\n(mean over heads and images)")
    # Zoom on the data (ranks are often a small fraction of N) but keep the threshold in view.
    top_value = max([t.reduce_rank90] + [v for values, _, _ in ranks.values() for v in values])
    bottom.set_ylim(0.0, min(1.02, top_value * 1.15 + 0.01))
    bottom.set_xlabel("block index  (green: static-attention candidate, orange: token-reduction candidate)")
    bottom.set_xticks(idx)
    bottom.legend(loc="best", fontsize=8, framealpha=0.9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _shade_recommendations(ax: Any, analysis: Analysis) -> None:
    colors = {STATIC: "tab:green", REDUCE: "tab:orange"}
    for layer in analysis.layers:
        if layer.recommendation in colors:
            ax.axvspan(layer.index - 0.5, layer.index + 0.5, color=colors[layer.recommendation], alpha=0.12, lw=0)
