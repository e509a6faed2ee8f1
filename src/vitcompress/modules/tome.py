"""ToMe: token merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

Each block merges ``r`` of its tokens into others between the attention and the MLP, so every later
block (and the MLP of this one) runs on fewer tokens. Nothing is learned; a merged model can be
used as is or fine-tuned (all of it is differentiable).

Algorithm, per block and image (``bipartite_soft_matching`` + ``merge_wavg``):

1. The metric is, by default (``metric="tokens"``), the tokens themselves at the point where they
   are merged (after the block's attention): the tokens most alike in what gets averaged are the
   ones averaged. The paper's choice, the attention keys averaged over heads, is ``metric="keys"``
   (and what plans made before plan version 3 merge on); on the CIFAR-10 teacher the tokens
   damaged 25-34% less at the same schedule (docs/RESULTS.md, "What token merging matches on").
2. The tokens after the ``protected`` prefix (class, distillation, register tokens) are split
   alternately into set A (even positions) and set B (odd positions). Prefix tokens are never
   merged and stay first, in order: the head and pooling read them by position.
3. Each A token finds its most similar B token (cosine similarity of the metric). The ``r`` A tokens
   with the highest similarity are merged into their match (several may go to the same B token);
   ``r`` is clipped to the number of A tokens (0 when B is empty). Matching only across A and B
   makes it one batched matrix product, with no iterative clustering.
4. Merging averages the tokens weighted by their *size*, the number of original patches each one
   stands for; the new size is the sum. Sizes therefore always sum to the original token count.
   Tokens that nothing was merged into keep their exact values. The output order is: prefix,
   the unmerged A tokens (in their original order), then B.

Proportional attention: a token that stands for ``s`` patches should weigh as much as ``s`` copies
of one patch, so ``log(s)`` is added to the attention logits of every key. This is a float additive
mask [B, 1, 1, N] to ``scaled_dot_product_attention``, so the fused kernel is kept (timm's own
non-fused path is followed when ``attn.fused_attn`` is False). Without sizes (nothing merged yet)
no mask is passed and the block computes exactly what timm's block does. At batch 1 the per-op cost,
not the arithmetic, is what merging pays for, so the bias is computed once per change of the sizes
(``TokenSize.bias``) and a block that does not merge does not average its keys.

Patching (``patch_tome``): the blocks of a stock timm ``VisionTransformer`` keep all their modules
(``norm1``, ``attn``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``; so
LayerScale of DeiT-III is honoured) and their state-dict keys; only each block's ``__class__`` is
swapped for a subclass (one per base class) whose ``forward`` adds proportional attention and the
merge. Each patched block holds its ``tome_r`` (int). The current token sizes live in one
``TokenSize`` object shared by the model's blocks (``model.tome_state``); it is reset at the start
of every forward (a forward pre-hook on the model and on ``patch_embed``, so ``forward_features``
alone works too) and cleared after the model's forward. ``copy.deepcopy`` gives the copy its own
``TokenSize`` shared by its own blocks, and pickling (``torch.save(model)``) works.

Handing sizes over from another stage: a module that changes the token sequence during the forward
(e.g. a token-aggregation stage run from a block's forward pre-hook) must tell the later blocks how
many original patches its output tokens stand for, with ``set_token_size(block_or_model, size)``
(size [B, N_out, 1], prefix tokens included; ``token_size(...)`` reads the current one, None meaning
"all 1"). Every patched block, also one with ``tome_r == 0``, applies proportional attention when a
size is set; a block raises if the size does not match its token count (a stage forgot to hand its
sizes over).

Limits: blocks whose attention is not timm's standard ``Attention`` (e.g. static attention, DGSSA)
cannot merge (no keys) nor weigh keys by size (their attention is a fixed N x N matrix), so
``patch_tome`` refuses them with ``r > 0`` or after a merging block, and they raise at run time if
they get sizes. Attention masks, causal attention and gradient checkpointing are refused (the
per-forward size state would be wrong on recomputation). Matching is deterministic (ties go to the
earlier token: the ranks of a stable sort, counted from pairwise comparisons, which the ONNX exporter
can export where it has no stable sort); on CUDA the sums into one B token use atomic adds unless
``torch.use_deterministic_algorithms`` is on.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from vitcompress.errors import UnsupportedModelError, VitcompressError
from vitcompress.plan_types import SCHEDULE_KINDS, TOME_METRICS


# ----------------------------------------------------------------------------- pure tensor code


def max_merge(num_tokens: int, protected: int) -> int:
    """How many tokens bipartite matching can merge in a sequence of ``num_tokens`` (prefix included)."""
    rest = num_tokens - protected
    return (rest + 1) // 2 if rest >= 2 else 0  # all of A (ceil(rest/2)), if B is not empty


class TokenMerge:
    """The outcome of one matching: where each input token goes.

    ``dest`` [B, N] (int64): the output position of every input token (prefix, then the unmerged A
    tokens in their order, then B; a merged A token goes to its B match's position). ``rank``
    [B, Na]: each A token's place by descending similarity (ties by position), so the ``r`` first
    merge; ``best_b`` [B, Na]: each A token's most similar B token. Merging is then one scatter-add
    into the output positions (``merge_wavg``): at batch 1 the per-op cost, not the arithmetic, is
    what token merging pays for. ``r == 0`` (all tensors None) is the identity. Calling it sums
    tokens: [B, N, C] -> [B, N - r, C].
    """

    def __init__(self, protected: int, r: int, dest: Optional[Tensor] = None, rank: Optional[Tensor] = None,
                 best_b: Optional[Tensor] = None) -> None:
        self.protected = protected
        self.r = r
        self.dest = dest
        self.rank = rank
        self.best_b = best_b

    @property
    def merged_a(self) -> Optional[Tensor]:
        """[B, r]: positions in set A of the tokens merged away, most similar first."""
        return None if self.rank is None else self.rank.argsort(dim=1)[:, : self.r]  # ranks are distinct

    @property
    def dst_b(self) -> Optional[Tensor]:
        """[B, r]: the position in set B each merged A token goes to."""
        return None if self.best_b is None else self.best_b.gather(1, self.merged_a)

    def _index(self, channels: int) -> Tensor:
        return self.dest.unsqueeze(-1).expand(-1, -1, channels)  # type: ignore[union-attr]

    def _out_shape(self, x: Tensor) -> tuple[int, int, int]:
        return x.shape[0], x.shape[1] - self.r, x.shape[-1]

    def __call__(self, x: Tensor) -> Tensor:
        """Sum each merged A token into its B match: [B, N, C] -> [B, N - r, C]."""
        if self.r == 0:
            return x
        return x.new_zeros(self._out_shape(x)).scatter_add(1, self._index(x.shape[-1]), x)

    def received(self, x: Tensor) -> Tensor:
        """[B, N - r, 1] bool: True where another token was merged into this output token."""
        hits = torch.zeros(self._out_shape(x)[:2], dtype=torch.int64, device=x.device)
        return (hits.scatter_add(1, self.dest, torch.ones_like(self.dest)) > 1).unsqueeze(-1)  # type: ignore[arg-type]

    def drop(self, x: Tensor) -> Tensor:
        """The output layout without the sums: the merged A tokens are just dropped."""
        if self.r == 0:
            return x
        stays = torch.ones_like(self.dest, dtype=torch.bool).scatter(  # type: ignore[arg-type]
            1, self.merged_a * 2 + self.protected, False)  # type: ignore[operator]
        return x[stays].reshape(self._out_shape(x))


def bipartite_soft_matching(metric: Tensor, r: int, protected: int = 1) -> TokenMerge:
    """Match tokens for merging (see the module docstring).

    Args:
        metric: [B, N, C] per-token features (keys averaged over heads); only their direction counts.
        r: how many tokens to remove; clipped to what can be merged, ``r <= 0`` is the identity.
        protected: leading prefix tokens that are never merged.

    Returns: a ``TokenMerge``; ``merge_wavg(merge, x, size)`` applies it to tokens with sizes.
    """
    B, N = metric.shape[:2]
    r = min(int(r), max_merge(N, protected))
    if r <= 0:
        return TokenMerge(protected, 0)
    with torch.no_grad():  # a discrete choice: no gradient flows through it
        # float32 at least: bf16 similarities tie often, which would make the choice arbitrary.
        unit = F.normalize(_as(metric[:, protected:], torch.promote_types(metric.dtype, torch.float32)), dim=-1)
        best_score, best_b = torch.bmm(unit[:, ::2], unit[:, 1::2].transpose(1, 2)).max(dim=-1)  # [B, Na]
        rank = descending_rank(best_score)
        # Unmerged A tokens keep their order (their rank among those kept); merged ones go to their match.
        kept = rank >= r
        first_b = protected + rank.shape[1] - r
        a_dest = torch.where(kept, kept.to(torch.int64).cumsum(1) + (protected - 1), best_b + first_b)
        dest = _layout(N, protected, r, metric.device).expand(B, N).clone()
        dest[:, protected::2] = a_dest
    return TokenMerge(protected, r, dest, rank, best_b)


def descending_rank(score: Tensor) -> Tensor:
    """[B, K] -> [B, K] int64: each entry's place when ``score`` is sorted in descending order, ties
    broken by position (the ranks a stable sort gives). Counted from pairwise comparisons rather than
    sorted: K is small (half the tokens), and the ONNX exporter has no stable sort."""
    mine, theirs = score.unsqueeze(-1), score.unsqueeze(-2)
    return ((theirs > mine) | ((theirs == mine) & _earlier(score.shape[-1], score.device))).sum(dim=-1)


_EARLIER: dict[tuple[int, torch.device], Tensor] = {}


def _earlier(k: int, device: torch.device) -> Tensor:
    """[K, K] bool, [i, j] True where j comes before i; kept per shape (two ops per call otherwise)."""
    if (k, device) not in _EARLIER:
        _EARLIER[k, device] = torch.ones(k, k, dtype=torch.bool, device=device).tril(-1)
    return _EARLIER[k, device]


_LAYOUTS: dict[tuple[int, int, int, torch.device], Tensor] = {}


def _layout(num_tokens: int, protected: int, r: int, device: torch.device) -> Tensor:
    """[1, N]: the output positions of the prefix and the B tokens (the same for every image);
    the A entries are filled per image. Kept per shape: building it is several small ops per call."""
    key = (num_tokens, protected, r, device)
    if key not in _LAYOUTS:
        b_count = (num_tokens - protected) // 2
        first_b = num_tokens - r - b_count
        layout = torch.zeros(num_tokens, dtype=torch.int64)
        layout[:protected] = torch.arange(protected)
        layout[protected + 1::2] = torch.arange(first_b, first_b + b_count)
        _LAYOUTS[key] = layout.to(device)[None]
    return _LAYOUTS[key]


def merge_wavg(merge: TokenMerge, x: Tensor, size: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Merge tokens ``x`` [B, N, C] as size-weighted means; returns (x [B, N-r, C], size [B, N-r, 1]).

    ``size`` [B, N, 1] counts the original patches behind each token (None: all 1). The new size is
    the sum of the merged sizes. Sizes and means are computed in float32 at least (sizes are integers
    that bf16 cannot hold beyond 256); the means are returned in x's dtype. With ``merge.r == 0`` both inputs are
    returned as they are. Tokens nothing was merged into keep their exact values: each token is
    weighted by its share ``s / S`` of its output token's size, which is exactly 1 when it is alone.
    """
    if merge.r == 0:
        return x, size
    work = torch.promote_types(torch.promote_types(x.dtype, torch.float32), torch.float32 if size is None else size.dtype)
    B, N, C = x.shape
    size = x.new_ones(B, N, 1, dtype=work) if size is None else _as(size, work)
    into = merge.dest.unsqueeze(-1)  # type: ignore[union-attr]
    new_size = size.new_zeros(B, N - merge.r, 1).scatter_add(1, into, size)
    share = size / new_size.gather(1, into)
    out = share.new_zeros(B, N - merge.r, C).scatter_add(1, into.expand(-1, -1, C), _as(x, work) * share)
    return _as(out, x.dtype), new_size


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)`` without the call when it would change nothing (one op less at batch 1)."""
    return x if x.dtype == dtype else x.to(dtype)


def proportional_attention(attn: nn.Module, x: Tensor, size: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """timm ``Attention`` forward with ``log(size)`` added to every key's logits.

    Uses the module's own ``qkv``/``q_norm``/``k_norm``/``norm``/``gate``/``proj`` and dropouts, and
    follows its ``fused_attn`` choice. Returns (output [B, N, C], metric = keys averaged over heads
    [B, N, head_dim]). ``size=None`` computes exactly timm's attention.
    """
    return _attend(attn, x, None if size is None else size_bias(size), True)  # type: ignore[return-value]


def size_bias(size: Tensor) -> Tensor:
    """The proportional-attention logit offset of each key, ``log(size)``: [B, N, 1] -> [B, 1, 1, N]."""
    return size.log().reshape(size.shape[0], 1, 1, size.shape[1])


def _attend(attn: nn.Module, x: Tensor, bias: Optional[Tensor], with_metric: bool) -> tuple[Tensor, Optional[Tensor]]:
    """``proportional_attention`` from a ready bias; the metric only when asked (a block that does
    not merge skips averaging its keys: at batch 1 every op counts)."""
    B, N, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    if attn.fused_attn:
        dropout = attn.attn_drop.p if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=attn.scale)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(B, N, heads * head_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), (k.mean(dim=1) if with_metric else None)


# ----------------------------------------------------------------------------- schedules


def r_schedule(depth: int, r: int, num_tokens: int, num_prefix_tokens: int, kind: str = "constant") -> list[int]:
    """Tokens to merge per block: ``r`` in every block ("constant"), or a linear ramp from ``2r`` down
    to 0 with the same total ("decreasing"); each clipped to what the block can merge, so at least
    ``num_prefix_tokens + 1`` tokens remain. ``num_tokens`` includes the prefix tokens.
    """
    if r < 0:
        raise VitcompressError(f"a merge schedule needs r >= 0, got r={r}")
    return merge_schedule(depth, depth * r, num_tokens, num_prefix_tokens, kind=kind)


def merge_schedule(depth: int, total: int, num_tokens: int, num_prefix_tokens: int, kind: str = "constant") -> list[int]:
    """Tokens to merge per block, ``total`` in all before clipping: as even as integers allow
    ("constant": ``total // depth`` per block, one more in the first ``total % depth`` blocks), a
    linear ramp down to 0 ("decreasing"), or as even as possible over every second or third block
    only ("every-2", "every-3", ...: blocks 0, 2, 4, ... or 0, 3, 6, ...). ``r_schedule`` is the case ``total = depth * r``; any
    total gives the planner a schedule for every token count, not only multiples of the depth.
    Each block's count is clipped as in ``r_schedule``.
    """
    _check_counts(num_tokens, num_prefix_tokens)
    if depth < 1 or total < 0:
        raise VitcompressError(f"a merge schedule needs depth >= 1 and total >= 0, got depth={depth}, total={total}")
    if kind == "constant":
        wanted = _even(total, depth)
    elif kind.startswith("every-") and kind in SCHEDULE_KINDS:
        step = int(kind[len("every-"):])
        spread = iter(_even(total, len(range(0, depth, step))))
        wanted = [next(spread) if i % step == 0 else 0 for i in range(depth)]
    elif kind == "decreasing":
        wanted = _linear_ramp(depth, total)
    else:
        raise VitcompressError(f"unknown merge schedule {kind!r}: use one of {', '.join(SCHEDULE_KINDS)}")
    schedule, n = [], num_tokens
    for want in wanted:
        schedule.append(min(want, max_merge(n, num_prefix_tokens)))
        n -= schedule[-1]
    return schedule


def _even(total: int, blocks: int) -> list[int]:
    """``total`` over ``blocks`` as evenly as integers allow, the larger counts first."""
    per, extra = divmod(total, blocks)
    return [per + (i < extra) for i in range(blocks)]


def _linear_ramp(depth: int, total: int) -> list[int]:
    """Integers following (2 total / depth) * (depth-1-i)/(depth-1) whose running sums are the rounded
    exact running sums (so they add up to exactly ``total``; computed in integers, no float rounding)."""
    if depth == 1:
        return [total]
    d = depth - 1
    # running sum of the first k+1 ramp values = total * (2(k+1)d - k(k+1)) / (depth d), rounded half up
    den = depth * d
    sums = [(2 * total * (2 * (k + 1) * d - k * (k + 1)) + den) // (2 * den) for k in range(depth)]
    return [s - p for s, p in zip(sums, [0] + sums[:-1])]


def tokens_after(schedule: Sequence[int], num_tokens: int, num_prefix_tokens: int) -> list[int]:
    """Tokens each block runs on (before its own merge), as the patched model computes them."""
    _check_counts(num_tokens, num_prefix_tokens)
    counts, n = [], num_tokens
    for r in schedule:
        counts.append(n)
        n -= min(max(int(r), 0), max_merge(n, num_prefix_tokens))
    return counts


def _check_counts(num_tokens: int, num_prefix_tokens: int) -> None:
    if num_prefix_tokens < 0 or num_tokens <= num_prefix_tokens:
        raise VitcompressError(
            f"need more tokens ({num_tokens}) than prefix tokens ({num_prefix_tokens}) and no negative prefix"
        )


# ----------------------------------------------------------------------------- per-forward state


class TokenSize:
    """Current token sizes of one model's forward ([B, N, 1] or None = all 1), shared by its blocks."""

    def __init__(self, num_prefix_tokens: int) -> None:
        self.num_prefix_tokens = num_prefix_tokens
        self.size = None

    @property
    def size(self) -> Optional[Tensor]:
        return self._size

    @size.setter
    def size(self, size: Optional[Tensor]) -> None:
        self._size = size
        self._bias: Optional[Tensor] = None

    def bias(self) -> Optional[Tensor]:
        """``size_bias`` of the current sizes (None without sizes), computed once per change of the
        sizes rather than in every block that reads them."""
        if self._bias is None and self._size is not None:
            self._bias = size_bias(self._size)
        return self._bias

    def reset(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: a new forward starts with one patch per token."""
        if getattr(module, "grad_checkpointing", False) and module.training and torch.is_grad_enabled():
            raise VitcompressError(
                "token merging keeps per-forward state that gradient checkpointing would recompute wrongly: "
                "call model.set_grad_checkpointing(False)"
            )
        self.size = None

    def clear(self, module: nn.Module, args: tuple, output: object) -> None:
        """Forward hook: drop the last sizes so no stale tensor outlives the forward (or gets copied)."""
        self.size = None


StateHolder = Union[nn.Module, TokenSize]


def _state_of(holder: StateHolder) -> TokenSize:
    state = holder if isinstance(holder, TokenSize) else getattr(holder, "tome_state", None)
    if not isinstance(state, TokenSize):
        raise VitcompressError(
            f"{type(holder).__name__} is not patched for token merging: call patch_tome(model, ...) first"
        )
    return state


def set_token_size(holder: StateHolder, size: Optional[Tensor]) -> None:
    """Tell the blocks that run next how many original patches each token stands for.

    ``holder``: the patched model, one of its patched blocks, or its ``TokenSize``. ``size``:
    [B, N, 1] (prefix tokens included) or None for "all 1". Call it during the forward, right after
    the token sequence changed; the next forward starts over from None.
    """
    if size is not None and (size.dim() != 3 or size.shape[-1] != 1):
        raise VitcompressError(f"token sizes must have shape [B, N, 1], got {list(size.shape)}")
    _state_of(holder).size = size


def token_size(holder: StateHolder) -> Optional[Tensor]:
    """The token sizes the next patched block will use ([B, N, 1], or None = all 1)."""
    return _state_of(holder).size


# ----------------------------------------------------------------------------- block patch


def is_standard_attention(attn: nn.Module) -> bool:
    """True for timm's ``Attention`` (or a subclass keeping its forward): what merging can use."""
    return isinstance(attn, Attention) and type(attn).forward is Attention.forward and isinstance(attn.qkv, nn.Linear)


class _ToMeBlock:
    """Mixin placed before a timm ``Block`` class; ``patch_tome`` sets ``tome_r`` and ``tome_state``."""

    _tome_base: type
    tome_r: int
    tome_metric: str
    tome_state: TokenSize

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise VitcompressError(
                "a token-merging block cannot apply attn_mask/is_causal (tokens move): call the model without them"
            )
        state = self.tome_state
        size = state.size
        if size is not None and tuple(size.shape[:2]) != tuple(x.shape[:2]):
            raise VitcompressError(
                f"token sizes are for {list(size.shape[:2])} tokens but this block got {list(x.shape[:2])}: "
                f"a stage that changes the tokens must hand over their sizes with set_token_size"
            )
        on_keys = self.tome_r > 0 and self.tome_metric == "keys"
        if is_standard_attention(self.attn):
            x_attn, keys = _attend(self.attn, self.norm1(x), state.bias(), on_keys)
        elif size is None and self.tome_r == 0:
            x_attn, keys = self.attn(self.norm1(x)), None
        else:
            raise VitcompressError(
                f"{type(self.attn).__name__} cannot merge tokens nor weigh them by size: "
                f"give this block r=0 and merge only after the last such block"
            )
        x = x + self.drop_path1(self.ls1(x_attn))
        if self.tome_r > 0:
            merge = bipartite_soft_matching(keys if on_keys else x, self.tome_r, state.num_prefix_tokens)
            x, state.size = merge_wavg(merge, x, size)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def extra_repr(self) -> str:
        return f"tome_r={self.tome_r}, tome_metric={self.tome_metric}"

    def __reduce_ex__(self, protocol: int):  # type: ignore[no-untyped-def]
        # The patched class is made at run time, so pickle cannot find it by name: rebuild it from
        # the base class instead (copy.deepcopy goes through here too).
        return _rebuild_block, (type(self)._tome_base,), self.__getstate__()


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(base: type) -> type:
    if base not in _PATCHED_CLASSES:
        name = f"ToMe{base.__name__}"
        namespace = {"__module__": __name__, "__qualname__": name, "_tome_base": base}
        _PATCHED_CLASSES[base] = type(name, (_ToMeBlock, base), namespace)
    return _PATCHED_CLASSES[base]


def _rebuild_block(base: type) -> nn.Module:
    return _patched_class(base).__new__(_patched_class(base))


def _base_class(block: nn.Module) -> type:
    return type(block)._tome_base if isinstance(block, _ToMeBlock) else type(block)


def is_patched(model_or_block: nn.Module) -> bool:
    """True if this block, or any block of this model, is patched for token merging."""
    if isinstance(model_or_block, _ToMeBlock):
        return True
    return any(isinstance(b, _ToMeBlock) for b in getattr(model_or_block, "blocks", ()))


def tome_schedule(model: nn.Module) -> list[int]:
    """Tokens merged per block (0 for a block that is not patched)."""
    return [int(b.tome_r) if isinstance(b, _ToMeBlock) else 0 for b in _blocks_of(model)]


def patch_tome(model: nn.Module, r_per_block: Sequence[int], metric: str = "tokens") -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place to merge ``r_per_block[i]`` tokens in block ``i``,
    matching them on ``metric`` (one of ``TOME_METRICS``, see the module docstring).

    Every block is patched (also those with r = 0: they apply proportional attention once sizes
    exist). Calling it again on a patched model only changes the schedule and metric. Returns the model.
    """
    if metric not in TOME_METRICS:
        raise VitcompressError(f"token merging metric {metric!r} is not one of {', '.join(TOME_METRICS)}")
    blocks = _blocks_of(model)
    schedule = _check_schedule(blocks, r_per_block)
    state = getattr(model, "tome_state", None)
    if not isinstance(state, TokenSize):
        state = TokenSize(int(getattr(model, "num_prefix_tokens", 0)))
        model.tome_state = state
        model.register_forward_pre_hook(state.reset)
        model.register_forward_hook(state.clear)
        if isinstance(getattr(model, "patch_embed", None), nn.Module):  # forward_features called alone
            model.patch_embed.register_forward_pre_hook(state.reset)
    for block, r in zip(blocks, schedule):
        block.__class__ = _patched_class(_base_class(block))
        block.tome_r = r
        block.tome_metric = metric
        block.tome_state = state
    return model


def _blocks_of(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not hasattr(model, "num_prefix_tokens"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a timm VisionTransformer (needs blocks and num_prefix_tokens): "
            f"token merging patches timm ViTs only"
        )
    return list(blocks)


def _check_schedule(blocks: list[nn.Module], r_per_block: Sequence[int]) -> list[int]:
    schedule = [int(r) for r in r_per_block]
    if len(schedule) != len(blocks) or any(r < 0 for r in schedule):
        raise VitcompressError(
            f"merge schedule {schedule} must give one r >= 0 for each of the model's {len(blocks)} blocks"
        )
    merged_before = False
    for i, (block, r) in enumerate(zip(blocks, schedule)):
        if _base_class(block).forward is not Block.forward:
            raise UnsupportedModelError(
                f"block {i} is a {_base_class(block).__name__}, not timm's pre-norm Block: "
                f"token merging supports that block only"
            )
        if not is_standard_attention(block.attn) and (r > 0 or merged_before):
            raise UnsupportedModelError(
                f"block {i} has {type(block.attn).__name__} attention, which needs a fixed token count: "
                f"merge tokens (r > 0) only in blocks after the last such block"
            )
        merged_before = merged_before or r > 0
    return schedule


__all__ = [
    "SCHEDULE_KINDS",
    "TOME_METRICS",
    "TokenMerge",
    "TokenSize",
    "bipartite_soft_matching",
    "is_patched",
    "is_standard_attention",
    "max_merge",
    "merge_schedule",
    "merge_wavg",
    "patch_tome",
    "proportional_attention",
    "r_schedule",
    "set_token_size",
    "token_size",
    "tokens_after",
    "tome_schedule",
]
