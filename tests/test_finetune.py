"""Distillation fine-tuning: loss terms, schedule, data order, checkpoints and exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vitcompress.bench import evaluate_top1
from vitcompress.convert import convert, static_attention_modules
from vitcompress.data import load_data
from vitcompress.errors import CheckpointFormatError, VitcompressError
from vitcompress.finetune import (
    FinetuneConfig,
    attention_guidance_loss,
    augment_batch,
    checkpoint_path,
    epoch_permutation,
    feature_loss,
    finetune,
    kd_loss,
    lr_at,
    rank_indices,
    read_checkpoint,
)
from vitcompress.plan import Plan, Reduction

from conftest import tiny_vit

DATA_CONFIG = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
               "crop_pct": 1.0, "crop_mode": "center"}
PLAN = Plan(static_layers=[0, 1], reductions=[Reduction(2, [2, 1])], num_blocks=4, num_prefix_tokens=1, grid=(4, 4))


def make_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher = tiny_vit(num_classes=10)
    return teacher, convert(teacher, PLAN)


def digits(split: str, limit: int) -> object:
    return load_data("demo", split=split, data_config=DATA_CONFIG, limit=limit)


def quick_config(**overrides: object) -> FinetuneConfig:
    base = dict(steps=4, batch_size=8, num_workers=0, progress=False, lr=1e-3, warmup_steps=1, feat_weight=1.0)
    return FinetuneConfig(**{**base, **overrides})  # type: ignore[arg-type]


def quiet(message: str) -> None:
    pass


# ---- loss terms ------------------------------------------------------------------------------
def test_kd_loss_matches_formula() -> None:
    torch.manual_seed(0)
    s, t, temp = torch.randn(4, 7), torch.randn(4, 7), 3.0
    p = F.softmax(t / temp, -1)
    expected = (p * (p.log() - F.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    assert torch.allclose(kd_loss(s, t, temp), expected, atol=1e-6)
    assert kd_loss(t, t, temp).abs().item() < 1e-6


def test_attention_guidance_loss_is_rowwise_kl() -> None:
    torch.manual_seed(0)
    static = torch.randn(2, 5, 5).softmax(-1)
    teacher = torch.randn(3, 2, 5, 5).softmax(-1)
    expected = 0.0
    for b in range(3):
        for h in range(2):
            for i in range(5):
                p, q = teacher[b, h, i], static[h, i]
                expected += float((p * (p / q).log()).sum())
    expected /= 3 * 2 * 5
    assert math.isclose(attention_guidance_loss(static, teacher).item(), expected, rel_tol=1e-5)
    same = static.unsqueeze(0).expand(3, -1, -1, -1)
    assert attention_guidance_loss(static, same).abs().item() < 1e-6


def test_attention_guidance_minimum_is_the_mean_map() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(6, 2, 4, 4).softmax(-1)
    mean = teacher.mean(0)
    at_mean = attention_guidance_loss(mean, teacher)
    for _ in range(5):
        other = (mean.log() + 0.3 * torch.randn_like(mean)).softmax(-1)
        assert attention_guidance_loss(other, teacher) > at_mean


def test_feature_loss() -> None:
    torch.manual_seed(0)
    t = torch.randn(2, 1 + 5, 8)
    assert feature_loss(t, t, 1).item() == 0.0
    # Only the prefix tokens and the mean patch token count: a different token count is fine.
    s = torch.cat([t[:, :1], t[:, 1:].mean(1, keepdim=True).expand(-1, 3, -1)], 1)
    assert feature_loss(s, t, 1).abs().item() < 1e-7
    shifted = t + 1.0
    expected = F.mse_loss(torch.cat([shifted[:, :1], shifted[:, 1:].mean(1, keepdim=True)], 1),
                          torch.cat([t[:, :1], t[:, 1:].mean(1, keepdim=True)], 1))
    denominator = torch.cat([t[:, :1], t[:, 1:].mean(1, keepdim=True)], 1).pow(2).mean()
    assert math.isclose(feature_loss(shifted, t, 1).item(), (expected / denominator).item(), rel_tol=1e-5)


def test_last_block_feature_target_is_the_teachers_last_tokens_through_the_same_stages() -> None:
    from vitcompress.convert import glad_modules
    from vitcompress.finetune import _Guidance, output_guidance_loss

    torch.manual_seed(0)
    teacher = tiny_vit(num_classes=10).eval()
    plan = Plan(static_layers=[], reductions=[Reduction(1, [3, 1]), Reduction(3, [2, 1])], num_blocks=4, grid=(4, 4))
    student = convert(teacher, plan).eval()
    x = torch.randn(3, 3, 32, 32)
    with _Guidance(student, teacher, quick_config(feat_at="last-block"), quiet) as guidance:
        student(x), teacher(x)
        loss = guidance.feat_loss()
    outs: dict[str, torch.Tensor] = {}
    hooks = [m.blocks[-1].register_forward_hook(lambda mod, a, out, k=k: outs.__setitem__(k, out))
             for k, m in (("student", student), ("teacher", teacher))]
    student(x), teacher(x)
    for h in hooks:
        h.remove()
    first, second = glad_modules(student)[1], glad_modules(student)[3]
    target = second(first(outs["teacher"])).detach()  # [B, 1 + 4 + 1, C]: one target per aggregated token
    assert target.shape == outs["student"].shape == (3, 1 + 5, 32)
    expected = output_guidance_loss(outs["student"], target)
    torch.testing.assert_close(loss, expected)
    # The target is fixed: the stages' weights get the gradient of the student side only.
    grads = [torch.autograd.grad(value, [first.weight, second.weight]) for value in (loss, expected)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
    with pytest.raises(VitcompressError, match="--feat-at"):
        quick_config(feat_at="output").validate()


# ---- schedule, order, augmentation -----------------------------------------------------------
def test_lr_schedule() -> None:
    lrs = [lr_at(s, 20, 4, 1.0, 0.01) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert math.isclose(lr_at(20, 20, 4, 1.0, 0.01), 0.01)
    assert lr_at(0, 10, 0, 1.0, 0.0) == 1.0


def test_data_order() -> None:
    perm = epoch_permutation(50, seed=3, epoch=1)
    assert sorted(perm) == list(range(50)) and perm == epoch_permutation(50, 3, 1)
    assert perm != epoch_permutation(50, 3, 2)
    # Two processes with batch 4 see, micro-batch by micro-batch, what one process with batch 8 sees.
    one = rank_indices(perm, 8, 1, 0, 0, 3)
    r0, r1 = rank_indices(perm, 4, 2, 0, 0, 3), rank_indices(perm, 4, 2, 1, 0, 3)
    for k in range(3):
        assert one[8 * k : 8 * k + 8] == r0[4 * k : 4 * k + 4] + r1[4 * k : 4 * k + 4]
    # Resuming at micro-batch 2 continues the same order.
    assert rank_indices(perm, 8, 1, 0, 2, 1) == one[16:24]


def test_augmentation_does_not_depend_on_the_split() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 16, 16)
    whole = augment_batch(x, "flip-shift", 0, 5, 1, 0, 6)
    halves = torch.cat([augment_batch(x[:3], "flip-shift", 0, 5, 1, 0, 6), augment_batch(x[3:], "flip-shift", 0, 5, 1, 3, 6)])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, augment_batch(x, "flip-shift", 0, 6, 1, 0, 6))
    assert torch.equal(augment_batch(x, "none", 0, 5, 1, 0, 6), x)
    # A shift moves pixels, it does not invent them: each output row is a (reflect-padded) input row.
    shifted = augment_batch(x, "shift", 1, 0, 0, 0, 6)
    assert shifted.shape == x.shape


def test_config_validation() -> None:
    with pytest.raises(VitcompressError, match="not both"):
        FinetuneConfig(epochs=1, steps=3).validate()
    with pytest.raises(VitcompressError, match="at least one"):
        FinetuneConfig(ce_weight=0, kd_weight=0, attn_weight=0, feat_weight=0).validate()
    with pytest.raises(VitcompressError, match="augment"):
        FinetuneConfig(augment="rotate").validate()


# ---- training --------------------------------------------------------------------------------
def test_attention_guidance_pulls_static_attention_to_teacher() -> None:
    teacher = tiny_vit(num_classes=10)
    with torch.no_grad():  # sharpen the random teacher's attention: far from the uniform start
        for blk in teacher.blocks:
            blk.attn.qkv.weight[: 2 * 32] *= 4.0
    student = convert(teacher, PLAN)  # static layers start uniform (no means)
    train = digits("train", 64)
    start = {i: m.attention().detach().clone() for i, m in static_attention_modules(student).items()}
    frozen = teacher.blocks[0].attn.qkv.weight.clone()
    cfg = quick_config(steps=6, ce_weight=0, kd_weight=0, feat_weight=0, lr=5e-2, guidance="map")
    losses: list[float] = []
    finetune(student, teacher, train, None, cfg, log=quiet, callback=lambda step, terms: losses.append(terms["attn"]))
    assert losses[-1] < losses[0]
    for i, m in static_attention_modules(student).items():
        assert not torch.allclose(m.attention(), start[i])
    # The teacher is left as it was: unchanged, no gradients, its requires_grad flags untouched
    # (a model converted from it afterwards must train all of its weights).
    assert all(p.requires_grad and p.grad is None for p in teacher.parameters())
    assert torch.equal(teacher.blocks[0].attn.qkv.weight, frozen)
    second = convert(teacher, PLAN)
    before = second.blocks[-1].mlp.fc1.weight.clone()
    finetune(second, teacher, train, None, quick_config(steps=2, lr=5e-2), log=quiet)
    assert not torch.equal(second.blocks[-1].mlp.fc1.weight, before)


def test_result_and_history() -> None:
    teacher, student = make_pair()
    train, val = digits("train", 48), digits("test", 20)
    steps: list[tuple[int, int, str]] = []
    messages: list[str] = []
    result = finetune(student, teacher, train, val, quick_config(steps=8, batch_size=8, accum_steps=2, progress=True),
                      log=messages.append, progress=lambda done, total, text: steps.append((done, total, text)))
    # progress: once at the start, then after every optimizer step; epoch summaries go to the log
    assert [(done, total) for done, total, _ in steps] == [(i, 8) for i in range(9)]
    assert steps[0][2] == "epoch 1" and steps[-1][2].startswith("epoch 3: loss ") and "img/s" in steps[-1][2]
    assert sum(m.startswith("epoch ") for m in messages) == 3
    assert result.steps == 8 and result.steps_per_epoch == 3 and result.global_batch == 16
    assert [h["epoch"] for h in result.history] == [1, 2, 3]  # 3 + 3 + 2 steps
    assert len(result.step_losses) == 8 and all(math.isfinite(v) for v in result.step_losses)
    assert result.val_top1 == result.history[-1]["val_top1"]
    assert result.val_top1 == evaluate_top1(student, val, batch_size=7, num_workers=0)
    assert student.training  # left as it was trained


def _run(workdir: Path, stop_at: int | None = None, **overrides: object) -> tuple[torch.nn.Module, object]:
    teacher, student = make_pair()
    train, val = digits("train", 48), digits("test", 16)

    def interrupt(step: int, terms: dict) -> None:
        if stop_at is not None and step == stop_at:
            raise KeyboardInterrupt

    settings = {"steps": 8, "accum_steps": 2, "workdir": str(workdir), "checkpoint_every": 2, **overrides}
    cfg = quick_config(**settings)
    result = finetune(student, teacher, train, val, cfg, log=quiet, callback=interrupt)
    return student, result


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    reference, ref_result = _run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", stop_at=5)  # killed after step 5: the last checkpoint is step 4
    _, meta = read_checkpoint(checkpoint_path(tmp_path / "b"))
    assert meta["step"] == 4
    resumed, result = _run(tmp_path / "b", resume=True)
    assert result.resumed_from == 4
    ref_state, state = reference.state_dict(), resumed.state_dict()
    assert ref_state.keys() == state.keys()
    worst = max((ref_state[k] - state[k]).abs().max().item() for k in ref_state)
    assert worst <= 1e-6
    assert result.step_losses == pytest.approx(ref_result.step_losses, abs=1e-6)
    assert [h["val_top1"] for h in result.history] == [h["val_top1"] for h in ref_result.history]


def test_checkpoint_is_safetensors_with_optimizer_state(tmp_path: Path) -> None:
    _, result = _run(tmp_path, steps=3)
    tensors, meta = read_checkpoint(checkpoint_path(tmp_path))
    assert meta["step"] == 3 and meta["global_batch"] == 16
    assert any(k.startswith("optim.") and k.endswith("exp_avg") for k in tensors)
    assert any(k == "model.blocks.0.attn.logits" for k in tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]  # atomic: no temporary left


def test_resume_with_another_batch_is_refused(tmp_path: Path) -> None:
    _run(tmp_path, steps=2)
    with pytest.raises(VitcompressError, match="same --batch-size"):
        _run(tmp_path, resume=True, batch_size=4)


def test_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(checkpoint_path(tmp_path)))
    with pytest.raises(CheckpointFormatError, match="not a vitcompress fine-tuning checkpoint"):
        _run(tmp_path, resume=True)


def test_too_little_data_is_a_clear_error() -> None:
    teacher, student = make_pair()
    with pytest.raises(VitcompressError, match="lower --batch-size"):
        finetune(student, teacher, digits("train", 6), None, quick_config(batch_size=8), log=quiet)


def test_output_guidance_loss_is_relative_mse() -> None:
    from vitcompress.finetune import output_guidance_loss

    t = torch.randn(4, 17, 32)
    assert float(output_guidance_loss(t, t)) == 0.0
    s = t + 0.1 * torch.randn_like(t)
    expected = torch.stack([F.mse_loss(s[i], t[i]) / t[i].pow(2).mean() for i in range(4)]).mean()
    torch.testing.assert_close(output_guidance_loss(s, t), expected)
    # an image's term does not depend on the others in its batch (DDP shards average exactly)
    torch.testing.assert_close(output_guidance_loss(s, t), (output_guidance_loss(s[:2], t[:2]) + output_guidance_loss(s[2:], t[2:])) / 2)


@pytest.mark.parametrize("guidance", ["output", "map"])
def test_guidance_trains_the_static_logits_toward_the_teacher(guidance: str) -> None:
    teacher = tiny_vit(num_classes=10)
    with torch.no_grad():
        for blk in teacher.blocks:
            blk.attn.qkv.weight[: 2 * 32] *= 4.0
    student = convert(teacher, PLAN)
    start = {i: m.logits.detach().clone() for i, m in static_attention_modules(student).items()}
    lr = 5e-2 if guidance == "map" else 1e-4  # the output term also trains v/proj: a gentler rate
    cfg = quick_config(steps=6, ce_weight=0, kd_weight=0, feat_weight=0, lr=lr, guidance=guidance)
    losses: list[float] = []
    finetune(student, teacher, digits("train", 64), None, cfg, log=quiet,
             callback=lambda step, terms: losses.append(terms["attn"]))
    assert losses[-1] < losses[0]
    assert all(not torch.equal(m.logits, start[i]) for i, m in static_attention_modules(student).items())


def test_no_guidance_leaves_the_attention_term_out() -> None:
    teacher, student = make_pair()
    terms: list[dict] = []
    finetune(student, teacher, digits("train", 32), None, quick_config(steps=2, guidance="none", feat_weight=0),
             log=quiet, callback=lambda step, t: terms.append(t))
    assert all(t["attn"] == 0.0 for t in terms)
    with pytest.raises(VitcompressError, match="--guidance"):
        quick_config(guidance="maps").validate()


def test_added_parameters_get_their_own_learning_rate_and_no_decay() -> None:
    from vitcompress.finetune import _param_groups

    torch.manual_seed(0)
    teacher = tiny_vit("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
    plan = Plan(static_layers=[0], reductions=[Reduction(1, [2, 1])], num_blocks=3, grid=(4, 4), glad_mode="adaptive")
    student = convert(teacher, plan)
    groups = _param_groups(student, 0.05, module_lr_scale=10.0)
    added = {id(p) for p in groups[2]["params"]}
    glad = student.blocks[1].glad
    expected = {id(student.blocks[0].attn.logits), id(glad.logits), id(glad.query), id(glad.key)}
    assert added == expected
    assert groups[2]["lr_scale"] == 10.0 and groups[2]["weight_decay"] == 0.0
    every = [id(p) for g in groups for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in student.parameters() if p.requires_grad)  # each exactly once
