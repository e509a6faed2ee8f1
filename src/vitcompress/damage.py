"""How much a converted model departs from the original, measured on calibration images.

Damage is one unit for every kind of change: the mean KL(original || converted) of the class
distributions over calibration images (from the *training* split: never the split that reports
accuracy), with the agreement of the top classes beside it. Changes that only touch block ``i``
onward (a static layer, a GLAD stage) are measured from the original's cached input to block
``i``, so a part costs only the blocks after it.

Per image the KL is heavy-tailed (on the CIFAR-10 teacher's 2.5x merging plans its standard
deviation is 1.6x its mean): on 256 images a plan's KL has a standard error of about 10%, so two
plans 10% apart are one standard error apart. ``compare`` therefore decides between two plans on
the paired per-image difference, first on the search sample and, while that is within
``SIGNIFICANT`` standard errors, on every calibration image.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.convert import convert
from vitcompress.errors import VitcompressError
from vitcompress.plan_types import SEARCH_IMAGES, Plan


# Standard errors a paired difference of damage must exceed to say one plan damages less.
SIGNIFICANT = 2.0


@dataclass(frozen=True)
class Damage:
    """KL(original || converted) of the logits' softmax (nats, mean over images), top-1 agreement,
    and the standard error of that mean KL."""

    kl: float
    agreement: float
    images: int
    kl_se: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {"kl": self.kl, "kl_se": self.kl_se, "agreement": self.agreement, "images": self.images}


@dataclass(frozen=True)
class Difference:
    """Damage of plan a minus damage of plan b (KL, paired over the same images) and its standard error."""

    kl: float
    se: float
    images: int

    @property
    def decided(self) -> bool:
        """Whether the difference exceeds ``SIGNIFICANT`` standard errors (an exact 0 never does)."""
        return abs(self.kl) > SIGNIFICANT * self.se

    @property
    def b_less_damaging(self) -> bool:
        """Whether plan b is measurably less damaging than plan a (what the planner moves on)."""
        return self.decided and self.kl > 0


class DamageMeter:
    """Measures ``Damage`` of plans on ``images`` against ``model`` (the original, eval mode).

    ``attention_means`` initialise static layers as ``convert`` does. The original's log-probabilities
    and each block's input are computed once; ``part_images`` of the images (the first ones) are
    used for the cached single-change measurements (``from_block``), all of them for whole plans
    unless ``whole`` is asked for fewer: the planner's search uses the first ``search_images``, and
    ``compare`` all of them only where those do not decide.
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        attention_means: Optional[Mapping[int, torch.Tensor]] = None,
        *,
        batch_size: int = 64,
        part_images: int = 128,
        search_images: int = SEARCH_IMAGES,
    ) -> None:
        _check_images(model, images)
        self.model = model.eval()
        self.means = attention_means
        self.batch_size = int(batch_size)
        ref = next(model.parameters())
        self.images = images.to(device=ref.device, dtype=ref.dtype)
        self.part_count = min(int(part_images), self.images.shape[0])
        self.search_count = min(int(search_images), self.images.shape[0])
        self.reference = self._log_probs(self.model, self.images)
        self.block_inputs = self._block_inputs(self.images[: self.part_count])
        self._memo: dict[tuple[str, int], Damage] = {}  # from_block: (plan, first block) -> damage
        self._per_image: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # whole plans: (KL, agreement) per image

    @torch.inference_mode()
    def _log_probs(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        # float64: the KL of two close distributions cancels almost entirely, and float32
        # log-probabilities would leave rounding noise of the size of a small change's damage.
        outs = [model(chunk).double().log_softmax(-1) for chunk in images.split(self.batch_size)]
        return torch.cat(outs)

    @torch.inference_mode()
    def _block_inputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The original's input to every block on ``images``: [block][N, tokens, C]."""
        stored: list[list[torch.Tensor]] = [[] for _ in self.model.blocks]
        handles = [blk.register_forward_pre_hook(_keeper(stored[i])) for i, blk in enumerate(self.model.blocks)]
        try:
            for chunk in images.split(self.batch_size):
                self.model(chunk)
        finally:
            for h in handles:
                h.remove()
        return [torch.cat(parts) for parts in stored]

    @property
    def count(self) -> int:
        """How many calibration images the meter holds."""
        return int(self.images.shape[0])

    def whole(self, plan: Plan, images: Optional[int] = None) -> Damage:
        """Damage of the model converted with ``plan`` on the first ``images`` calibration images
        (default: every one); memoised per image, so a larger count measures only the images added."""
        return _summary(*self._whole_per_image(plan, self.count if images is None else min(int(images), self.count)))

    def difference(self, a: Plan, b: Plan, images: Optional[int] = None) -> Difference:
        """Damage of ``a`` minus damage of ``b``, paired per image over the first ``images``
        calibration images (default: every one)."""
        count = self.count if images is None else min(int(images), self.count)
        (kl_a, _), (kl_b, _) = self._whole_per_image(a, count), self._whole_per_image(b, count)
        return Difference(*_mean_se(kl_a - kl_b), count)

    def compare(self, a: Plan, b: Plan) -> Difference:
        """``difference(a, b)`` on the search sample, and on every calibration image when that is
        within ``SIGNIFICANT`` standard errors."""
        for count in sorted({self.search_count, self.count}):
            difference = self.difference(a, b, count)
            if difference.decided:
                break
        return difference

    def _whole_per_image(self, plan: Plan, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = _plan_key(plan)
        done = self._per_image.get(key)
        have = 0 if done is None else done[0].shape[0]
        if have < count:
            student = convert(self.model, plan, self.means).eval()
            kl, agree = _per_image(self.reference[have:count], self._log_probs(student, self.images[have:count]))
            done = (kl, agree) if done is None else (torch.cat([done[0], kl]), torch.cat([done[1], agree]))
            self._per_image[key] = done
        return done[0][:count], done[1][:count]  # type: ignore[index]

    def of_model(self, student: nn.Module) -> Damage:
        """Damage of an already converted (e.g. fine-tuned) model, on every calibration image."""
        was_training = student.training
        try:
            return _summary(*_per_image(self.reference, self._log_probs(student.eval(), self.images)))
        finally:
            student.train(was_training)

    def from_block(self, plan: Plan, first_block: int) -> Damage:
        """Damage of ``plan`` when it changes nothing before ``first_block``: the converted blocks
        run from the original's cached input to that block (on the first ``part_images`` images).
        Memoised, so planning several budgets with one meter measures each change once."""
        key = (_plan_key(plan), int(first_block))
        if key not in self._memo:
            self._memo[key] = self._from_block(plan, int(first_block))
        return self._memo[key]

    @torch.inference_mode()
    def _from_block(self, plan: Plan, first_block: int) -> Damage:
        student = convert(self.model, plan, self.means).eval()
        x_all = self.block_inputs[first_block]
        outs = []
        state = getattr(student, "tome_state", None)  # token merging: sizes start over per batch,
        for x in x_all.split(self.batch_size):  # as the model's own forward pre-hook does
            if state is not None:
                state.size = None
            for blk in student.blocks[first_block:]:
                x = blk(x)
            outs.append(student.forward_head(student.norm(x)).double().log_softmax(-1))
        if state is not None:
            state.size = None
        return _summary(*_per_image(self.reference[: self.part_count], torch.cat(outs)))


def _plan_key(plan: Plan) -> str:
    """What a plan changes (not what was predicted or measured about it)."""
    d = plan.to_dict()
    return json.dumps({k: d[k] for k in ("static_layers", "reductions", "merge_r", "tome_metric", "proportional_attention", "glad_init", "glad_mode")})


def _check_images(model: nn.Module, images: torch.Tensor) -> None:
    """Refuse calibration images the model cannot take, saying what it takes."""
    from vitcompress.geometry import input_size

    expected = input_size(model)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise VitcompressError(f"calibration images must be a [N, C, H, W] batch of N >= 1 images, got {shape}")
    if tuple(images.shape[1:]) != expected:
        raise VitcompressError(
            f"calibration images are {list(images.shape[1:])} (C, H, W) but the model takes {list(expected)}: "
            f"preprocess them with the model's data config"
        )
    if not images.is_floating_point():
        raise VitcompressError(
            f"calibration images are {images.dtype}, not floating point: pass preprocessed (normalised) float images"
        )
    if not bool(torch.isfinite(images).all()):
        raise VitcompressError("calibration images hold NaN or infinite values")


def _keeper(store: list[torch.Tensor]):  # type: ignore[no-untyped-def]
    def hook(module: nn.Module, args: tuple) -> None:
        store.append(args[0].detach().clone())

    return hook


def _per_image(reference: torch.Tensor, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(original || converted) and top-1 agreement (0/1) of each image."""
    kl = F.kl_div(log_probs, reference, log_target=True, reduction="none").sum(-1)
    agree = (log_probs.argmax(-1) == reference.argmax(-1)).double()
    return kl, agree


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    n = values.shape[0]
    se = float(values.std()) / math.sqrt(n) if n > 1 else 0.0
    return float(values.mean()), se


def _summary(kl: torch.Tensor, agree: torch.Tensor) -> Damage:
    mean, se = _mean_se(kl)
    return Damage(mean, float(agree.mean()), int(kl.shape[0]), se)


__all__ = ["SIGNIFICANT", "Damage", "DamageMeter", "Difference"]
