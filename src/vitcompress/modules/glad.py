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
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.errors import VitcompressError

Grid = tuple[int, int]


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
        device, dtype: of ``weight`` (default: CPU, the default dtype).
        scales: side lengths of the output pyramid, strictly decreasing, each at most the finest
            input grid's shorter side; M = sum(s * s).

    Parameter ``weight`` [M, N_in] (learnable); rows of the initial weight sum to 1.
    """

    def __init__(
        self,
        num_prefix_tokens: int,
        in_grids: Sequence[Grid],
        scales: Sequence[int],
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.in_grids: list[Grid] = [(int(h), int(w)) for h, w in in_grids]
        self.scales: list[int] = [int(s) for s in scales]
        _check_pyramid(self.num_prefix_tokens, self.in_grids, self.scales)
        self.in_tokens = sum(h * w for h, w in self.in_grids)
        self.out_tokens = sum(s * s for s in self.scales)
        # Built in float64 and cast once, so a float64 model gets exact 1/k weights (not float32 ones).
        init = pyramid_init(self.in_grids, self.scales, torch.float64)
        self.weight = nn.Parameter(init.to(device=device, dtype=dtype or torch.get_default_dtype()))
        # Which input tokens each output token pools, fixed at the pyramid: what its size (the
        # number of original patches it stands for) is computed from. Not saved: derived.
        self.register_buffer("support", (init > 0).to(self.weight.dtype), persistent=False)

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
        with torch.no_grad():
            self.weight.copy_((pool @ rows).to(self.weight.dtype))

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
        pooled = torch.matmul(self.weight, patches)  # [M, N_in] @ [B, N_in, C] -> [B, M, C]
        return torch.cat([prefix, pooled], dim=1)

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}, in_grids={self.in_grids}, scales={self.scales}"


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


__all__ = ["GLAD", "pooling_matrix", "pyramid_init"]
