"""Probe fine-tunes: which of a few plans recovers best after a short fine-tune.

Training-free damage does not predict what fine-tuning recovers: static attention started from the
mean map costs tens of points of top-1 training-free on the CIFAR-10 teacher, yet it is what
fine-tuning is for. For each plan of a shortlist (``make_plan(..., shortlist=True)``), ``probe_plans``
converts the original, fine-tunes it for a few steps with the full fine-tune's recipe, and measures
KL(original || probed) on images held out of the training data the probe trains on. The plan with
the least damage after its probe is the one to fine-tune in full.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from vitcompress.convert import convert
from vitcompress.damage import DamageMeter
from vitcompress.errors import VitcompressError
from vitcompress.finetune import FinetuneConfig, finetune
from vitcompress.plan_types import Plan

Log = Callable[[str], None]


@dataclass(frozen=True)
class ProbeResult:
    """One plan's damage before and after its probe fine-tune (KL in nats, agreement in [0, 1])."""

    plan: Plan
    kl_free: float
    kl: float
    agreement: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.describe(), "kl_free": self.kl_free, "kl": self.kl, "agreement": self.agreement,
                "seconds": round(self.seconds, 1)}


def probe_config(config: FinetuneConfig, steps: int) -> FinetuneConfig:
    """The full fine-tune's recipe for ``steps`` steps, with no checkpoints and no resume."""
    if steps < 1:
        raise VitcompressError(f"--probe-steps must be at least 1 to probe (0 switches probing off), got {steps}")
    return dataclasses.replace(config, steps=int(steps), epochs=None, warmup_steps=None, workdir=None, resume=False,
                               checkpoint_every=0, progress=False)


def probe_plans(
    teacher: nn.Module,
    plans: Sequence[Plan],
    train: Any,
    held_out: torch.Tensor,
    config: FinetuneConfig,
    *,
    attention_means: Optional[Mapping[int, torch.Tensor]] = None,
    log: Optional[Log] = None,
) -> list[ProbeResult]:
    """Fine-tune each plan's conversion of ``teacher`` as ``config`` says (see ``probe_config``) on
    ``train`` and measure its damage on ``held_out`` images (which ``train`` must not contain)."""
    say = log or (lambda message: None)
    teacher.eval()
    meter = DamageMeter(teacher, held_out.to(next(teacher.parameters()).device), attention_means)
    results = []
    for k, plan in enumerate(plans):
        free = meter.whole(plan)
        student = convert(teacher, plan, attention_means)
        started = time.monotonic()
        finetune(student, teacher, train, None, config, log=lambda message: None)
        after = meter.of_model(student)
        results.append(ProbeResult(plan, free.kl, after.kl, after.agreement, time.monotonic() - started))
        say(f"probe {k + 1}/{len(plans)}: {plan.describe()}: KL {free.kl:.4f} training-free, {after.kl:.4f} after "
            f"{config.steps} steps")
    return results


def best_probed(results: Sequence[ProbeResult]) -> ProbeResult:
    """The least damaging plan after its probe (ties: the order given, i.e. the planner's)."""
    if not results:
        raise VitcompressError("no plans were probed")
    return min(enumerate(results), key=lambda item: (item[1].kl, item[0]))[1]


__all__ = ["ProbeResult", "best_probed", "probe_config", "probe_plans"]
