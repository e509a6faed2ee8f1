"""GLAD: global aggregation pyramid (arXiv:2310.07664).

A learnable linear map over the token axis that turns the patch tokens into fewer tokens, so the
blocks after it run on a shorter sequence. It is initialised as a pyramid of average poolings of
the patch grid (adaptive-average-pooling semantics, so a 14x14 grid pools to 3x3 too), largest
scale first: ``scales=[7, 3, 1]`` on a 14x14 grid gives 49 + 9 + 1 = 59 tokens. Prefix tokens
(class, distillation, registers) pass through untouched.

Several stages can be stacked across depth. A later stage's input is the previous stage's output,
i.e. a list of grids (e.g. 7x7, 3x3, 1x1); the later stage is initialised by pooling only the
*finest* of those grids (the coarser input tokens start with weight 0). Why: the finest grid holds
all the spatial detail the coarser ones were pooled from, so pooling it gives each new token an
exact average over an image region, as in a single-stage pyramid; fine-tuning may still learn to
use the coarser tokens.

How the aggregation is parametrised (``mode``):

* ``linear``: a free learnable [M, N_in] matrix (the paper's GLAD);
* ``simplex``: each row a softmax over the input tokens the row starts from (its region), so every
  output token stays a convex mix of input tokens;
* ``adaptive``: content-adaptive. Each output token j has a learned query q_j that attends once over
  the input tokens' keys ``W_k x_i`` within its region, on top of the simplex logits:
  ``A[b] = softmax(logits + q k(x_b)^T / sqrt(d_k))``. The queries start at zero, so at
  initialisation the adaptive stage computes exactly the pooling pyramid; fine-tuning learns which
  tokens of a region matter for each image (an object patch over background), as token merging
  does from similarity, at ``N_in (C + M) d_k`` extra multiply-adds.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.errors import VitcompressError

Grid = tuple[int, int]
MODES = ("linear", "simplex", "adaptive")
ADAPTIVE_DIM = 16  # d_k of the adaptive stage's queries and keys: a few per head is enough to rank tokens


def pooling_matrix(grid: Grid, scale: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[scale*scale, H*W] matrix that adaptive-average-pools a row-major HxW token grid to scale x scale."""
    h, w = grid
    eye = torch.eye(h * w, dtype=dtype).reshape(h * w, 1, h, w)  # one image per input token
    pooled = F.adaptive_avg_pool2d(eye, scale)  # [H*W, 1, s, s]: contribution of each input token
    return pooled.reshape(h * w, scale * scale).t().contiguous()


def pyramid_init(in_grids: Sequence[Grid], scales: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Initial GLAD weight [M, N_in]: pooling pyramid of the first (finest) input grid, zeros for the rest."""
    finest = in_grids[0]
    pooled = torch.cat([pooling_matrix(finest, s, dtype) for s in scales], dim=0)
    rest = sum(h * w for h, w in in_grids[1:])
    return torch.cat([pooled, pooled.new_zeros(pooled.shape[0], rest)], dim=1)


class GLAD(nn.Module):
    """Maps [B, P + N_in, C] to [B, P + M, C]: prefix tokens kept, patch tokens linearly aggregated.

    Args:
        num_prefix_tokens: P, the class/distillation/register tokens at the front (passed through).
        in_grids: the grids whose row-major tokens make up the N_in input patch tokens, finest
            first: ``[(14, 14)]`` for the first stage, the previous stage's ``out_grids`` after.
        scales: side lengths of the output pyramid, strictly decreasing, each at most the finest
            input grid's shorter side; M = sum(s * s).
        mode: ``linear`` (parameter ``weight`` [M, N_in]), ``simplex`` (parameter ``logits``
            [M, N_in], rows softmax-normalised over their region) or ``adaptive`` (``logits`` plus
            ``query`` [M, d_k] and ``key`` [d_k, C]); see the module docstring.
        dim: the token width C (needed by ``adaptive`` only).
        device, dtype: of the parameters (default: CPU, the default dtype).

    Every mode starts as the same aggregation: rows of the initial weight sum to 1.
    """

    def __init__(
        self,
        num_prefix_tokens: int,
        in_grids: Sequence[Grid],
        scales: Sequence[int],
        *,
        mode: str = "linear",
        dim: Optional[int] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.in_grids: list[Grid] = [(int(h), int(w)) for h, w in in_grids]
        self.scales: list[int] = [int(s) for s in scales]
        _check_pyramid(self.num_prefix_tokens, self.in_grids, self.scales)
        if mode not in MODES:
            raise VitcompressError(f"GLAD mode {mode!r} is not one of {', '.join(MODES)}")
        if mode == "adaptive" and not dim:
            raise VitcompressError("an adaptive GLAD stage needs the token width: GLAD(..., mode='adaptive', dim=C)")
        self.mode = mode
        self.in_tokens = sum(h * w for h, w in self.in_grids)
        self.out_tokens = sum(s * s for s in self.scales)
        # Built in float64 and cast once, so a float64 model gets exact 1/k weights (not float32 ones).
        init = pyramid_init(self.in_grids, self.scales, torch.float64)
        dtype = dtype or torch.get_default_dtype()
        # Which input tokens each output token pools, fixed at the pyramid: what its size (the
        # number of original patches it stands for) is computed from. Not saved: derived.
        self.register_buffer("support", (init > 0).to(device=device, dtype=dtype), persistent=False)
        if mode == "linear":
            self.weight = nn.Parameter(init.to(device=device, dtype=dtype))
        else:
            self.logits = nn.Parameter(torch.zeros_like(init, device=device, dtype=dtype))
            # Where each row's softmax may put weight: the pyramid region, or every token after an
            # attention init. Saved (it is not derivable from the plan alone).
            self.register_buffer("domain", (init > 0).to(device=device, dtype=dtype))
            self._set_rows(init)
        if mode == "adaptive":
            d_k = ADAPTIVE_DIM
            self.query = nn.Parameter(torch.zeros(self.out_tokens, d_k, device=device, dtype=dtype))
            # Random keys and zero queries: the scores start at 0 (the pyramid) and still get gradients.
            self.key = nn.Parameter(torch.randn(d_k, int(dim), device=device, dtype=dtype) / math.sqrt(int(dim)))

    def _set_rows(self, rows: torch.Tensor) -> None:
        """Make the aggregation equal ``rows`` [M, N_in] (each summing to 1): the weight itself, or
        logits whose softmax over the ``domain`` is ``rows`` (the domain: where ``rows`` is non-zero)."""
        with torch.no_grad():
            if self.mode == "linear":
                self.weight.copy_(rows.to(self.weight.dtype))
                return
            self.domain.copy_((rows > 0).to(self.domain.dtype))
            logits = torch.log(rows.clamp_min(torch.finfo(torch.float64).tiny))
            self.logits.copy_(logits.to(self.logits.dtype))

    def _masked_logits(self) -> torch.Tensor:
        """The logits with -inf outside each row's domain (so its softmax is exactly 0 there)."""
        return self.logits.masked_fill(self.domain == 0, float("-inf"))

    def aggregation(self) -> torch.Tensor:
        """The fixed part of the aggregation [M, N_in]: the weight, or the rows' softmax."""
        if self.mode == "linear":
            return self.weight
        return torch.softmax(self._masked_logits(), dim=-1)

    @property
    def out_grids(self) -> list[Grid]:
        """The output patch tokens as grids (input of a later stage)."""
        return [(s, s) for s in self.scales]

    def init_from_attention(self, mean_attention: torch.Tensor) -> None:
        """Start each output token as an attention-weighted mix of the input tokens instead of a
        plain average: row j becomes the mean, over the query patches ``q`` that token j pools, of
        the layer's mean attention ``A[q, patches]`` (averaged over heads, renormalised over the
        patches). It inherits the dynamic pattern as static attention does. First stage only
        (``mean_attention`` [H, P + N_in, P + N_in] measured on the original tokens)."""
        P, n = self.num_prefix_tokens, self.in_tokens
        if len(self.in_grids) != 1 or tuple(mean_attention.shape[-2:]) != (P + n, P + n):
            raise VitcompressError(
                f"attention init needs the first stage and a [heads, {P + n}, {P + n}] mean attention, got "
                f"{list(mean_attention.shape)} for input grids {self.in_grids}: use the pooling init"
            )
        rows = mean_attention.double().mean(0)[P:, P:]  # [N_in, N_in] query patch -> key patch
        rows = rows / rows.sum(-1, keepdim=True).clamp_min(1e-12)
        pool = self.support.double() / self.support.double().sum(-1, keepdim=True)  # uniform over the region
        self._set_rows(pool @ rows)

    def out_size(self, in_size: torch.Tensor) -> torch.Tensor:
        """Sizes [B, P + M, 1] of the output tokens (original patches each stands for), from the
        input tokens' sizes [B, P + N_in, 1]; prefix tokens keep theirs."""
        P = self.num_prefix_tokens
        pooled = torch.matmul(self.support.to(in_size.dtype), in_size[:, P:])
        return torch.cat([in_size[:, :P], pooled], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        P = self.num_prefix_tokens
        if x.shape[1] != P + self.in_tokens:
            raise VitcompressError(
                f"token aggregation (GLAD) expects {P} prefix + {self.in_tokens} patch tokens but got "
                f"{x.shape[1]} tokens: feed images of the size the model was converted for"
            )
        prefix, patches = x[:, :P], x[:, P:]
        if self.mode == "adaptive":
            keys = torch.matmul(patches, self.key.t())  # [B, N_in, d_k]
            scores = torch.matmul(self.query, keys.transpose(1, 2)) / math.sqrt(self.query.shape[-1])
            weights = torch.softmax(self._masked_logits() + scores, dim=-1)  # [B, M, N_in], per image
        else:
            weights = self.aggregation()  # [M, N_in], shared by every image
        pooled = torch.matmul(weights, patches)  # [.., M, N_in] @ [B, N_in, C] -> [B, M, C]
        return torch.cat([prefix, pooled], dim=1)

    def extra_repr(self) -> str:
        return (f"num_prefix_tokens={self.num_prefix_tokens}, in_grids={self.in_grids}, scales={self.scales}, "
                f"mode={self.mode}")


def _check_pyramid(num_prefix_tokens: int, in_grids: list[Grid], scales: list[int]) -> None:
    if num_prefix_tokens < 0:
        raise VitcompressError(f"number of prefix tokens must be >= 0, got {num_prefix_tokens}")
    if not in_grids or any(h < 1 or w < 1 for h, w in in_grids):
        raise VitcompressError(f"GLAD input grids must be non-empty positive sizes, got {in_grids}")
    if not scales:
        raise VitcompressError("a GLAD stage needs at least one pyramid scale, e.g. [7, 3, 1]")
    side = min(in_grids[0])
    if any(s < 1 or s > side for s in scales) or any(a <= b for a, b in zip(scales, scales[1:])):
        raise VitcompressError(
            f"pyramid scales {scales} must be strictly decreasing (largest first), each between 1 and "
            f"{side} (the input grid is {in_grids[0][0]}x{in_grids[0][1]})"
        )


__all__ = ["ADAPTIVE_DIM", "GLAD", "MODES", "pooling_matrix", "pyramid_init"]
