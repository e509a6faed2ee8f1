"""Distillation fine-tuning of a compressed ViT (the student) from the original one (the teacher).

The loss is a weighted sum of up to four terms (a weight of 0 switches a term off):

* ``ce``: cross-entropy on the labels (images without a label, -1, are ignored);
* ``kd``: knowledge distillation on the logits, ``T^2 KL(softmax(t/T) || softmax(s/T))``;
* ``attn``: the dynamic guidance of DGSSA (``guidance``). ``"output"`` (default): each static
  layer's per-image output is distilled from the teacher's dynamic attention output at that layer
  (``output_guidance_loss``), so each image's own attention behaviour reaches the student.
  ``"map"``: the row-wise ``KL(teacher || static)`` of the maps, averaged over images, heads and
  rows; its optimum over a dataset is the mean attention the static layers start from, so it only
  anchors them there. ``"none"``: off;
* ``feat`` (``feat_at``): ``"glad"``, at each GLAD output, the mean squared error between student
  and teacher on the prefix tokens and on the mean patch token (so it does not depend on the token
  count), divided by the teacher's mean square; ``"last-block"``, every token out of the last block
  against the teacher's last-block tokens passed through the same GLAD stages (a fixed target),
  relative per image as the ``"output"`` guidance.

Optimiser: AdamW (no weight decay on norms, biases, position/prefix tokens, static-attention logits
and GLAD weights, which decay toward a degenerate uniform/zero solution), linear warm-up then cosine,
gradient clipping, gradient accumulation, bf16 autocast on CUDA.

One process or many: under ``torchrun --nproc_per_node N`` the student is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU); each optimizer step uses one global batch of
``batch_size x world_size x accum_steps`` images, split across processes, and only rank 0 prints
and writes.

Exact resume: nothing random comes from a running RNG. Epoch ``e`` visits the images in a
permutation seeded by ``(seed, e)``; augmentation parameters are drawn per image from
``(seed, step, micro-batch)`` for the whole global batch, and the global RNG (dropout, drop-path)
is reseeded at every micro-batch. A checkpoint therefore only needs the weights, the optimizer state
and the step, and a resumed run makes the same updates as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitcompress._io import atomic_path
from vitcompress.bench import evaluate_top1
from vitcompress.distributed import (  # DistInfo ... default_device: re-exported, they used to live here
    DistInfo,
    all_reduce_sum,
    autocast,
    barrier,
    default_device,
    dist_info,
    init_distributed,
    reduce_device,
)
from vitcompress.errors import CheckpointFormatError, DataError, TrainingDivergedError, VitcompressError
from vitcompress.names import CHECKPOINT_FILE

CHECKPOINT_NAME = CHECKPOINT_FILE
CHECKPOINT_KIND = "vitcompress-finetune-checkpoint"
CHECKPOINT_VERSION = 1
GUIDANCE_CHOICES = ("output", "map", "none")
AUGMENT_CHOICES = ("auto", "flip-shift", "shift", "none")
FEAT_AT_CHOICES = ("glad", "last-block")
_LOSS_TERMS = ("ce", "kd", "attn", "feat")

Progress = Callable[[int, int, str], None]  # (optimizer steps done, steps in all, text)


@dataclass
class FinetuneConfig:
    """Fine-tuning settings. ``epochs`` or ``steps`` (optimizer steps) sets the length."""

    epochs: Optional[float] = None  # default: 1 epoch when neither epochs nor steps is set
    steps: Optional[int] = None
    lr: float = 2e-4
    min_lr_ratio: float = 0.01  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.05
    warmup_steps: Optional[int] = None  # default: 5% of the steps
    batch_size: int = 64  # images per process per forward (micro-batch)
    accum_steps: int = 1
    clip_grad: Optional[float] = 1.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: float = 2.0
    attn_weight: float = 1.0
    # Dynamic guidance of static layers: "output" distils each static layer's per-image output from
    # the teacher's attention output; "map" pulls the static map toward the teacher's per-image maps
    # (row-wise KL; its optimum is the mean map); "none" switches it off.
    guidance: str = "output"
    feat_weight: float = 0.0
    # Where the feature term compares: "glad", at each GLAD output, the prefix tokens and the mean
    # patch token; "last-block", every token out of the last block against the teacher's last-block
    # tokens passed through the same GLAD stages (each aggregated token gets the target of its region).
    feat_at: str = "glad"
    # Learning-rate multiplier of the parameters the conversion added (static attention logits, GLAD
    # aggregations): they start from an initialisation, not from training, and may need to move further.
    module_lr_scale: float = 1.0
    # flip-shift: random horizontal flip and translation by up to 1/8 of the side; auto: flip-shift,
    # except shift only on the demo digits (compress resolves it), where a mirrored digit is another digit.
    augment: str = "auto"
    seed: int = 0
    workdir: Optional[str] = None  # checkpoints go here; None: no checkpoints
    checkpoint_every: int = 200  # optimizer steps between checkpoints (0: only at epoch ends)
    resume: bool = False
    num_workers: Optional[int] = None
    eval_batch_size: Optional[int] = None
    amp: bool = True  # bf16 autocast when training on CUDA
    device: Optional[str] = None  # default: this process's GPU if there is one, else CPU
    progress: bool = True  # report progress to finetune(progress=...) (the CLI draws it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def validate(self) -> None:
        """Raise VitcompressError on settings that cannot work."""
        if self.epochs is not None and self.steps is not None:
            raise VitcompressError("give --epochs or --steps, not both")
        if self.epochs is not None and self.epochs <= 0 or self.steps is not None and self.steps <= 0:
            raise VitcompressError("--epochs/--steps must be positive")
        if self.batch_size < 1 or self.accum_steps < 1:
            raise VitcompressError("--batch-size and --accum-steps must be at least 1")
        if self.lr <= 0:
            raise VitcompressError(f"--lr must be positive, got {self.lr}")
        if self.module_lr_scale <= 0:
            raise VitcompressError(f"--module-lr-scale must be positive, got {self.module_lr_scale}")
        if self.kd_temperature <= 0:
            raise VitcompressError(f"--kd-temperature must be positive, got {self.kd_temperature}")
        weights = [self.ce_weight, self.kd_weight, self.attn_weight, self.feat_weight]
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise VitcompressError("loss weights must be >= 0 and at least one must be positive")
        if self.guidance not in GUIDANCE_CHOICES:
            raise VitcompressError(f"--guidance must be one of {', '.join(GUIDANCE_CHOICES)}, got '{self.guidance}'")
        if self.feat_at not in FEAT_AT_CHOICES:
            raise VitcompressError(f"--feat-at must be one of {', '.join(FEAT_AT_CHOICES)}, got '{self.feat_at}'")
        if self.augment not in AUGMENT_CHOICES:
            raise VitcompressError(f"--augment must be one of {', '.join(AUGMENT_CHOICES)}, got '{self.augment}'")


@dataclass
class FinetuneResult:
    """What a fine-tuning run did. ``history`` has one entry per finished epoch."""

    steps: int
    total_steps: int
    steps_per_epoch: int
    global_batch: int
    val_top1: Optional[float]
    history: list[dict[str, Any]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)  # total loss of every step (all processes)
    resumed_from: Optional[int] = None
    seconds: float = 0.0
    world_size: int = 1
    config: dict[str, Any] = field(default_factory=dict)  # the settings actually used

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("step_losses")
        return d


# ---- deterministic randomness ----------------------------------------------------------------
def _derived_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts; the same parts give the same seed on every run and rank."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(num_images: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch ``epoch`` visits the images."""
    g = torch.Generator().manual_seed(_derived_seed(seed, "epoch", epoch))
    return torch.randperm(num_images, generator=g).tolist()


def rank_indices(perm: list[int], batch_size: int, world_size: int, rank: int, first_micro: int, num_micro: int) -> list[int]:
    """The images this rank loads for micro-batches ``first_micro .. first_micro + num_micro - 1``.

    Global micro-batch ``k`` is ``perm[k*B*W : (k+1)*B*W]``; rank ``r`` takes the ``r``-th slice of
    ``B`` images, so W processes with batch B see exactly what one process with batch B*W sees.
    """
    out: list[int] = []
    for k in range(first_micro, first_micro + num_micro):
        start = k * batch_size * world_size + rank * batch_size
        out.extend(perm[start : start + batch_size])
    return out


def augment_batch(images: torch.Tensor, mode: str, seed: int, step: int, micro: int, offset: int, global_count: int) -> torch.Tensor:
    """Random flip/translation, drawn per image of the global micro-batch, so it does not depend
    on how the batch is split across processes nor on where a run was resumed."""
    if mode == "none":
        return images
    if mode == "auto":
        mode = "flip-shift"
    g = torch.Generator().manual_seed(_derived_seed(seed, "augment", step, micro))
    _, _, h, w = images.shape
    pad = max(1, min(h, w) // 8)
    flips = torch.rand(global_count, generator=g) < 0.5
    shifts = torch.randint(0, 2 * pad + 1, (global_count, 2), generator=g)
    n = images.shape[0]
    flips, shifts = flips[offset : offset + n], shifts[offset : offset + n]
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    out = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts.tolist())])
    if mode == "flip-shift":
        mask = flips.to(out.device).view(-1, 1, 1, 1)
        out = torch.where(mask, out.flip(-1), out)
    return out


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- loss ------------------------------------------------------------------------------------
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))``, averaged over the batch."""
    t = temperature
    s_log = F.log_softmax(student_logits.float() / t, dim=-1)
    t_log = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * (t * t)


def attention_guidance_loss(static_probs: torch.Tensor, teacher_probs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise ``KL(teacher || static)`` averaged over images, heads and rows.

    static_probs: [H, N, N] (one matrix for every image); teacher_probs: [B, H, N, N].
    """
    p = teacher_probs.float()
    log_q = static_probs.float().clamp_min(eps).log().unsqueeze(0)
    kl = (p * (p.clamp_min(eps).log() - log_q)).sum(-1)
    return kl.mean()


def output_guidance_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-image distillation of a static layer: the mean squared error between the static
    attention's output and the teacher's dynamic attention output at that layer, over the teacher's
    mean square, per image, averaged over images. Unlike a loss on the maps (whose optimum is the
    batch-mean map the static logits start from), its gradient carries each image's own behaviour."""
    t = teacher_out.float()
    # Per image, then averaged: processes of a DDP run with equal batches average to the same loss.
    per_image = (student_out.float() - t).pow(2).flatten(1).mean(1) / (t.pow(2).flatten(1).mean(1) + eps)
    return per_image.mean()


def feature_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, num_prefix_tokens: int, eps: float = 1e-8) -> torch.Tensor:
    """MSE on the prefix tokens and the mean patch token, over the teacher's mean square."""
    s = _token_summary(student_tokens.float(), num_prefix_tokens)
    t = _token_summary(teacher_tokens.float(), num_prefix_tokens)
    return F.mse_loss(s, t) / (t.pow(2).mean() + eps)


def _token_summary(x: torch.Tensor, p: int) -> torch.Tensor:
    return torch.cat([x[:, :p], x[:, p:].mean(dim=1, keepdim=True)], dim=1)


class _Guidance:
    """Hooks that collect what the attention and feature terms need from one forward of each model."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: FinetuneConfig, log: Callable[[str], None]):
        from vitcompress.convert import glad_modules, static_attention_modules

        self.prefix = int(getattr(teacher, "num_prefix_tokens", 1))
        full = self.prefix + int(math.prod(teacher.patch_embed.grid_size))
        static = static_attention_modules(student) if cfg.attn_weight > 0 else {}
        # Layers after a token reduction run on other tokens than the teacher's: nothing to match.
        self.static = {i: m for i, m in static.items() if m.num_tokens == full}
        skipped = sorted(set(static) - set(self.static))
        if skipped:
            log(f"attention guidance skips static layers {skipped}: they run on aggregated tokens")
        if cfg.guidance == "none":
            self.static = {}
        self.mode = cfg.guidance
        self.glads = glad_modules(student) if cfg.feat_weight > 0 else {}
        self.feat_at = cfg.feat_at
        self.student_feats: dict[int, torch.Tensor] = {}
        self.teacher_feats: dict[int, torch.Tensor] = {}
        self.student_attn: dict[int, torch.Tensor] = {}
        self.teacher_attn: dict[int, torch.Tensor] = {}
        self._student = student
        self._handles: list[Any] = []
        self._teacher = teacher
        self._recorder: Any = None

    def __enter__(self) -> "_Guidance":
        if self.glads and self.feat_at == "last-block":
            last = len(self._teacher.blocks) - 1
            self._handles.append(self._student.blocks[last].register_forward_hook(self._keep(self.student_feats, last, output=True)))
            self._handles.append(self._teacher.blocks[last].register_forward_hook(self._keep(self.teacher_feats, last, output=True)))
        for i, glad in self.glads.items() if self.feat_at == "glad" else ():
            self._handles.append(glad.register_forward_hook(self._keep(self.student_feats, i, output=True)))
            self._handles.append(self._teacher.blocks[i].register_forward_pre_hook(self._keep(self.teacher_feats, i)))
        if self.static and self.mode == "output":
            for i, m in self.static.items():
                self._handles.append(m.register_forward_hook(self._keep(self.student_attn, i, output=True)))
                self._handles.append(self._teacher.blocks[i].attn.register_forward_hook(self._keep(self.teacher_attn, i, output=True)))
        elif self.static:
            from vitcompress.analyze import AttentionRecorder

            self._recorder = AttentionRecorder(self._teacher, layers=sorted(self.static))
            self._recorder.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._recorder is not None:
            self._recorder.__exit__(*exc)
            self._recorder = None

    @staticmethod
    def _keep(store: dict[int, torch.Tensor], i: int, output: bool = False) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, *rest: Any) -> None:
            store[i] = rest[0] if output else args[0]

        return hook

    def attn_loss(self) -> Optional[torch.Tensor]:
        if not self.static:
            return None
        if self.mode == "output":
            losses = [output_guidance_loss(self.student_attn[i], self.teacher_attn[i].detach()) for i in self.static]
        else:
            losses = [attention_guidance_loss(m.attention(), self._recorder.maps[i][:, list(m.static_heads)])
                      for i, m in self.static.items()]
        return torch.stack(losses).mean()

    def feat_loss(self) -> Optional[torch.Tensor]:
        if not self.glads:
            return None
        if self.feat_at == "last-block":
            (last, student_tokens), = self.student_feats.items()
            with torch.no_grad():  # a target: the stages' weights learn from the student side only
                target = self.teacher_feats[last]
                for i in sorted(self.glads):
                    target = self.glads[i](target)
            return output_guidance_loss(student_tokens, target)
        losses = [feature_loss(self.student_feats[i], self.teacher_feats[i].detach(), self.prefix) for i in self.glads]
        return torch.stack(losses).mean()


# ---- checkpoints -----------------------------------------------------------------------------
def checkpoint_path(workdir: str | os.PathLike) -> Path:
    return Path(workdir) / CHECKPOINT_NAME


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Weights, optimizer state and ``state`` (JSON) in one safetensors file, written atomically."""
    from safetensors.torch import save_file

    from vitcompress.export import state_tensors

    tensors = {f"model.{k}": v for k, v in state_tensors(model.state_dict()).items()}
    for index, param_state in optimizer.state_dict()["state"].items():
        for name, value in param_state.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
    meta = {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, **state}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"vitcompress_checkpoint": json.dumps(meta)})


def read_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, state) of a fine-tuning checkpoint; CheckpointFormatError if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw = (f.metadata() or {}).get("vitcompress_checkpoint")
            if raw is None:
                raise CheckpointFormatError(f"{path} is not a vitcompress fine-tuning checkpoint")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointFormatError:
        raise
    except Exception as exc:
        raise CheckpointFormatError(
            f"{path} cannot be read ({exc}): delete it to start over, or point --workdir elsewhere"
        ) from None
    meta = _checkpoint_meta(raw, path)
    if meta.get("kind") != CHECKPOINT_KIND or int(meta.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointFormatError(f"{path}: unknown or newer checkpoint format; upgrade vitcompress")
    return tensors, meta


_CHECKPOINT_META_LIMIT = 8 * 1024 * 1024  # the state (losses, history, config) is kilobytes


def _checkpoint_meta(raw: str, path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's state: JSON data (parsed, never evaluated), refused when oversized or garbled."""
    if len(raw) > _CHECKPOINT_META_LIMIT:
        raise CheckpointFormatError(f"{path}: its metadata is {len(raw) / 2**20:.1f} MB, far more than a checkpoint holds: "
                                    "refusing to parse it; delete it to start over")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"{path}: its checkpoint metadata is not a JSON object; delete it to start over")
    return meta


def checkpoint_step(path: str | os.PathLike) -> Optional[int]:
    """The step a checkpoint was saved at (its metadata only, no tensors read), or None if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("vitcompress_checkpoint")
        return int(_checkpoint_meta(raw, path)["step"]) if raw is not None else None
    except Exception:
        return None


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, Any]:
    tensors, meta = read_checkpoint(path, device)
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointFormatError(
            f"{path} does not fit this model ({first}): it is from another plan or model; "
            "use another --workdir or start without --resume"
        ) from None
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": optimizer.state_dict()["param_groups"]})
    return meta


# ---- the training loop -----------------------------------------------------------------------
def _param_groups(model: nn.Module, weight_decay: float, module_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: decayed weights, undecayed ones (norms, biases, tokens), and the parameters
    the conversion added (undecayed: decay pulls them toward a degenerate uniform/zero solution;
    ``lr_scale`` times the learning rate)."""
    from vitcompress.convert import glad_modules, static_attention_modules

    added = [m.logits for m in static_attention_modules(model).values()]
    added += [p for m in glad_modules(model).values() for p in m.parameters()]
    added_ids = {id(p) for p in added}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in added_ids:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or leaf in ("pos_embed", "cls_token", "dist_token", "reg_token"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
            {"params": [p for p in added if p.requires_grad], "weight_decay": 0.0, "lr_scale": module_lr_scale}]


def _total_steps(cfg: FinetuneConfig, steps_per_epoch: int) -> int:
    if cfg.steps is not None:
        return int(cfg.steps)
    epochs = 1.0 if cfg.epochs is None else float(cfg.epochs)
    return max(1, round(epochs * steps_per_epoch))


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    train_data: Any,
    val_data: Any = None,
    config: Optional[FinetuneConfig] = None,
    *,
    log: Optional[Callable[[str], None]] = None,
    callback: Optional[Callable[[int, dict[str, float]], None]] = None,
    progress: Optional[Progress] = None,
) -> FinetuneResult:
    """Fine-tune ``student`` (a converted model) in place by distillation from ``teacher``.

    Args:
        student: the compressed model (``convert`` output); trained in place.
        teacher: the original model; frozen, eval mode.
        train_data: an ``ImageData`` with deterministic (eval) preprocessing; augmentation is done
            here (``config.augment``) so that a resumed run is exact.
        val_data: an ``ImageData`` for top-1 after each epoch (None: no evaluation).
        config: settings; see ``FinetuneConfig``.
        log: where rank 0's messages go (default: printed on stderr).
        callback: called on every process after each optimizer step with (step, loss terms).
        progress: on rank 0, when ``config.progress``, called as ``progress(step, total_steps,
            "epoch E: loss ... img/s")`` at the start and after each optimizer step (the CLI draws
            a bar or a line every 5% from it); None: nothing is reported.

    Under torchrun, call ``init_distributed()`` first (``finetune`` does it if needed); every
    process must call ``finetune`` with the same arguments.
    """
    cfg = config or FinetuneConfig()
    cfg.validate()
    info = init_distributed()
    log = log or _print_stderr
    main_log = log if info.is_main else (lambda message: None)
    report = progress if (progress is not None and cfg.progress and info.is_main) else None
    device = torch.device(cfg.device) if cfg.device else default_device(info)
    run = _Run(student, teacher, train_data, val_data, cfg, info, device, main_log)
    return run.train(callback, report)


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)




class _Run:
    """State of one fine-tuning run; split out of ``finetune`` to keep each piece short."""

    def __init__(self, student: nn.Module, teacher: nn.Module, train_data: Any, val_data: Any, cfg: FinetuneConfig, info: DistInfo, device: torch.device, log: Callable[[str], None]):
        self.cfg, self.info, self.device, self.log = cfg, info, device, log
        self.student = student.to(device).train()
        # Not frozen in place (its forward runs under no_grad): a model converted from this teacher
        # later would copy frozen weights and silently train only the new modules.
        self.teacher = teacher.to(device).eval()
        self.train_data, self.val_data = train_data, val_data
        self.micro_global = cfg.batch_size * info.world_size
        self.global_batch = self.micro_global * cfg.accum_steps
        self.steps_per_epoch = len(train_data) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the training split has {len(train_data)} images, fewer than one global batch "
                f"({cfg.batch_size} x {info.world_size} processes x {cfg.accum_steps} accumulation): lower --batch-size"
            )
        self.total_steps = _total_steps(cfg, self.steps_per_epoch)
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(0.05 * self.total_steps)
        self.optimizer = torch.optim.AdamW(_param_groups(self.student, cfg.weight_decay, cfg.module_lr_scale), lr=cfg.lr)
        self.model: nn.Module = self.student
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.student, device_ids=ids)
        self.history: list[dict[str, Any]] = []
        self.step_losses: list[float] = []
        self.step = 0
        self.resumed_from: Optional[int] = None
        self._epoch_sums = torch.zeros(len(_LOSS_TERMS) + 1, dtype=torch.float64)
        self._epoch_steps = 0

    # -- resume / save --
    def _ckpt(self) -> Optional[Path]:
        return checkpoint_path(self.cfg.workdir) if self.cfg.workdir else None

    def maybe_resume(self) -> None:
        path = self._ckpt()
        if path is None or not path.exists():
            if self.cfg.resume:
                self.log(f"--resume: no checkpoint in {self.cfg.workdir}; starting from the beginning")
            return
        if not self.cfg.resume:
            self.log(f"{path} exists but --resume was not given: starting over (it will be replaced)")
            return
        meta = _restore(path, self.student, self.optimizer, self.device)
        if int(meta["global_batch"]) != self.global_batch or int(meta["seed"]) != self.cfg.seed:
            raise VitcompressError(
                f"{path} was made with a global batch of {meta['global_batch']} and seed {meta['seed']}, "
                f"this run has {self.global_batch} and {self.cfg.seed}: resume with the same --batch-size, "
                "--accum-steps, number of processes and --seed"
            )
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))
        self.step_losses = [float(x) for x in meta.get("step_losses", [])]
        sums = meta.get("epoch_sums")
        if sums is not None:
            self._epoch_sums = torch.tensor(sums, dtype=torch.float64)
            self._epoch_steps = int(meta.get("epoch_steps", 0))
        self.resumed_from = self.step
        self.log(f"resumed from {path} at step {self.step}/{self.total_steps}")

    def save(self) -> None:
        path = self._ckpt()
        if path is None or not self.info.is_main:
            return
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "global_batch": self.global_batch,
            "seed": self.cfg.seed,
            "world_size": self.info.world_size,
            "config": self.cfg.to_dict(),
            "history": self.history,
            "step_losses": self.step_losses,
            "epoch_sums": self._epoch_sums.tolist(),
            "epoch_steps": self._epoch_steps,
        }
        save_checkpoint(path, self.student, self.optimizer, state)

    # -- data --
    def _batches(self, epoch: int, first_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from vitcompress.data import make_loader

        perm = epoch_permutation(len(self.train_data), self.cfg.seed, epoch)
        accum = self.cfg.accum_steps
        indices = rank_indices(
            perm, self.cfg.batch_size, self.info.world_size, self.info.rank,
            first_step * accum, (self.steps_per_epoch - first_step) * accum,
        )
        loader = make_loader(self.train_data, self.cfg.batch_size, sampler=indices, num_workers=self.cfg.num_workers)
        return iter(self.train_data.batches(loader))

    # -- one step --
    def _micro_step(self, guidance: _Guidance, images: torch.Tensor, labels: torch.Tensor, micro: int) -> torch.Tensor:
        cfg = self.cfg
        torch.manual_seed(_derived_seed(cfg.seed, "rng", self.step, micro, self.info.rank))
        images = augment_batch(images, cfg.augment, cfg.seed, self.step, micro, self.info.rank * cfg.batch_size, self.micro_global)
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device)
        with autocast(self.device, cfg.amp):
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            student_logits = self.model(images)
        terms = torch.zeros(len(_LOSS_TERMS), device=self.device)
        total = student_logits.new_zeros((), dtype=torch.float32)
        parts = {
            "ce": self._ce(student_logits, labels) if cfg.ce_weight > 0 else None,
            "kd": kd_loss(student_logits, teacher_logits, cfg.kd_temperature) if cfg.kd_weight > 0 else None,
            "attn": guidance.attn_loss(),
            "feat": guidance.feat_loss(),
        }
        weights = {"ce": cfg.ce_weight, "kd": cfg.kd_weight, "attn": cfg.attn_weight, "feat": cfg.feat_weight}
        for k, name in enumerate(_LOSS_TERMS):
            if parts[name] is not None:
                total = total + weights[name] * parts[name]
                terms[k] = parts[name].detach()
        (total / cfg.accum_steps).backward()
        return torch.cat([terms, total.detach().view(1)]).double().cpu() / cfg.accum_steps

    @staticmethod
    def _ce(logits: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
        if not bool((labels >= 0).any()):
            return None
        return F.cross_entropy(logits.float(), labels, ignore_index=-1)

    def _optimizer_step(self, guidance: _Guidance, batches: Iterator) -> torch.Tensor:
        cfg = self.cfg
        lr = lr_at(self.step, self.total_steps, self.warmup, cfg.lr, cfg.lr * cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(_LOSS_TERMS) + 1, dtype=torch.float64)
        for micro in range(cfg.accum_steps):
            try:
                images, labels = next(batches)
            except StopIteration:
                raise DataError("a whole batch of training images was unreadable: check the dataset") from None
            last = micro == cfg.accum_steps - 1
            sync = self.model.no_sync() if self.info.enabled and not last else contextlib.nullcontext()
            with sync:
                sums += self._micro_step(guidance, images, labels, micro)
        if cfg.clip_grad:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.clip_grad)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.student.parameters() if p.grad is not None])
        sums = all_reduce_sum(sums.to(reduce_device(self.device))).cpu() / self.info.world_size
        self._check_finite(sums, grad_norm)  # before the step: the weights (and every checkpoint) stay good
        self.optimizer.step()
        return sums

    def _check_finite(self, sums: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Stop at the first NaN/inf loss or gradient (the same on every process: both are reduced)."""
        loss_ok = bool(torch.isfinite(sums).all())
        if loss_ok and bool(torch.isfinite(grad_norm)):
            return
        cfg = self.cfg
        what = f"the gradient norm is {float(grad_norm)}" if loss_ok else f"the loss is {float(sums[-1])}"
        terms = ", ".join(f"{name} {float(sums[k]):.3g}" for k, name in enumerate(_LOSS_TERMS) if name in _active_terms(cfg))
        amp = self.device.type == "cuda" and cfg.amp
        precision = "bfloat16 autocast (AMP) overflowing" if amp else "the float32 weights overflowing"
        path = self._ckpt()
        step = checkpoint_step(path) if path is not None and path.is_file() else None
        kept = (f"the last good checkpoint (step {step}) is kept in {cfg.workdir}" if step is not None
                else "no checkpoint had been written yet")
        raise TrainingDivergedError(
            f"fine-tuning diverged at step {self.step + 1} of {self.total_steps}: {what} ({terms}); likely cause: "
            f"too high a learning rate (--lr {cfg.lr:g}; the default is 2e-4: try 10x lower) or {precision}; "
            f"{kept}; no model file was written"
        )

    # -- the loop --
    def train(self, callback: Optional[Callable[[int, dict[str, float]], None]], progress: Optional[Progress] = None) -> FinetuneResult:
        self.maybe_resume()
        started = time.perf_counter()
        first = self.step
        self.log(
            f"fine-tuning {self.total_steps} steps ({self.total_steps / self.steps_per_epoch:.2f} epochs of "
            f"{self.steps_per_epoch} steps, global batch {self.global_batch}, {self.info.world_size} process(es), "
            f"device {self.device})"
        )
        guidance = _Guidance(self.student, self.teacher, self.cfg, self.log)
        report = progress or (lambda done, total, text: None)
        report(self.step, self.total_steps, f"epoch {self.step // self.steps_per_epoch + 1}")
        batches: Optional[Iterator] = None
        with guidance:
            while self.step < self.total_steps:
                epoch, pos = divmod(self.step, self.steps_per_epoch)
                if pos == 0 or batches is None:
                    batches = self._batches(epoch, pos)
                sums = self._optimizer_step(guidance, batches)
                self._after_step(sums, epoch, report, started, first, callback)
                if (self.step % self.steps_per_epoch == 0) or self.step == self.total_steps:
                    self._end_epoch(epoch)
                    batches = None
                elif self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self.save()
        barrier()
        val = self.history[-1].get("val_top1") if self.history else None
        return FinetuneResult(
            steps=self.step, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
            global_batch=self.global_batch, val_top1=val, history=self.history, step_losses=self.step_losses,
            resumed_from=self.resumed_from, seconds=time.perf_counter() - started, world_size=self.info.world_size,
            config=self.cfg.to_dict(),
        )

    def _after_step(self, sums: torch.Tensor, epoch: int, report: Progress, started: float, first: int, callback: Any) -> None:
        self.step += 1
        self.step_losses.append(float(sums[-1]))
        self._epoch_sums += sums
        self._epoch_steps += 1
        terms = {name: float(sums[k]) for k, name in enumerate(_LOSS_TERMS)}
        terms["loss"] = float(sums[-1])
        elapsed = max(time.perf_counter() - started, 1e-9)
        rate = (self.step - first) * self.global_batch / elapsed
        lr = self.optimizer.param_groups[0]["lr"]
        shown = " ".join(f"{k} {terms[k]:.3f}" for k in _active_terms(self.cfg))
        report(self.step, self.total_steps, f"epoch {epoch + 1}: loss {terms['loss']:.3f} ({shown}) lr {lr:.2e} {rate:.0f} img/s")
        if callback is not None:
            callback(self.step, terms)

    def _end_epoch(self, epoch: int) -> None:
        eval_bs = self.cfg.eval_batch_size or max(self.cfg.batch_size, 64)
        top1 = None
        if self.val_data is not None:
            top1 = evaluate_top1(self.student, self.val_data, batch_size=eval_bs, device=self.device, num_workers=self.cfg.num_workers)
        n = max(self._epoch_steps, 1)
        means = {name: float(self._epoch_sums[k]) / n for k, name in enumerate(_LOSS_TERMS)}
        entry = {
            "epoch": epoch + 1, "step": self.step, "loss": float(self._epoch_sums[-1]) / n,
            **{k: means[k] for k in _active_terms(self.cfg)}, "val_top1": top1,
        }
        self.history.append(entry)
        self._epoch_sums.zero_()
        self._epoch_steps = 0
        acc = f", val top-1 {top1:.4f}" if top1 is not None else ""
        self.log(f"epoch {epoch + 1} (step {self.step}): loss {entry['loss']:.4f}{acc}")
        self.save()


def _active_terms(cfg: FinetuneConfig) -> list[str]:
    weights = {"ce": cfg.ce_weight, "kd": cfg.kd_weight, "attn": cfg.attn_weight, "feat": cfg.feat_weight}
    return [k for k in _LOSS_TERMS if weights[k] > 0]


__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "DistInfo",
    "attention_guidance_loss",
    "output_guidance_loss",
    "augment_batch",
    "barrier",
    "checkpoint_path",
    "dist_info",
    "epoch_permutation",
    "feature_loss",
    "finetune",
    "init_distributed",
    "kd_loss",
    "lr_at",
    "rank_indices",
    "read_checkpoint",
    "save_checkpoint",
]
