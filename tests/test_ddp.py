"""Two-process DistributedDataParallel fine-tuning (gloo, CPU) matches one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from vitcompress.convert import convert
from vitcompress.data import load_data
from vitcompress.finetune import FinetuneConfig, finetune
from vitcompress.plan import Plan, Reduction

from conftest import tiny_vit

DATA_CONFIG = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
               "crop_pct": 1.0, "crop_mode": "center"}
PLAN = Plan(static_layers=[0, 1], reductions=[Reduction(2, [2, 1])], num_blocks=4, num_prefix_tokens=1, grid=(4, 4))
STEPS = 4


def _config(batch_size: int, workdir: str) -> FinetuneConfig:
    # feat_weight 0: the feature loss is normalised by a per-process mean square, so it is the only
    # term whose two-process value is not exactly the one-process value.
    return FinetuneConfig(steps=STEPS, batch_size=batch_size, accum_steps=2, lr=1e-3, warmup_steps=1, num_workers=0,
                          progress=False, feat_weight=0.0, augment="flip-shift", workdir=workdir, checkpoint_every=2)


def _train(batch_size: int, workdir: str) -> tuple[torch.nn.Module, object]:
    torch.set_num_threads(1)
    teacher = tiny_vit(num_classes=10)
    student = convert(teacher, PLAN)
    train = load_data("demo", split="train", data_config=DATA_CONFIG, limit=64)
    val = load_data("demo", split="test", data_config=DATA_CONFIG, limit=30)
    result = finetune(student, teacher, train, val, _config(batch_size, workdir), log=lambda m: None)
    return student, result


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    import torch.distributed as dist
    from safetensors.torch import save_file

    try:
        student, result = _train(4, str(Path(out_dir) / "work"))  # finetune joins the group (gloo on CPU)
        state = {k: v.contiguous() for k, v in student.state_dict().items()}
        save_file(state, str(Path(out_dir) / f"rank{rank}.safetensors"))
        summary = {"losses": result.step_losses, "val_top1": result.val_top1, "world_size": result.world_size,
                   "global_batch": result.global_batch}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(summary))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    # fork: the children skip re-importing torch/timm (seconds each); a deadline guards against a hang.
    context = mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 180
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two-process run did not finish within 180 s")
    threads = torch.get_num_threads()
    try:
        single, single_result = _train(8, str(tmp_path / "single"))
    finally:
        torch.set_num_threads(threads)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["global_batch"] == 16 for r in ranks)
    assert single_result.global_batch == 16
    # Logged losses are averaged over processes: both ranks report the same values...
    assert ranks[0]["losses"] == ranks[1]["losses"]
    # ...which match the single process on the same global batches, step by step.
    assert ranks[0]["losses"] == pytest.approx(single_result.step_losses, rel=1e-5, abs=1e-6)
    assert ranks[0]["val_top1"] == single_result.val_top1
    # DDP keeps the replicas identical, and equal to the single-process weights.
    w0, w1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    ref = single.state_dict()
    for key in ref:
        assert torch.equal(w0[key], w1[key]), key
        assert (w0[key] - ref[key]).abs().max().item() < 1e-5, key
    # Only rank 0 wrote the checkpoint.
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["checkpoint.safetensors"]
