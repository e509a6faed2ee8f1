"""Process-group helpers with one process: everything is a no-op that returns its input.

(Two real processes are exercised by test_ddp.py.)"""

from __future__ import annotations

import torch

from vitcompress.distributed import (
    DistInfo,
    all_reduce_sum,
    autocast,
    barrier,
    default_device,
    dist_info,
    init_distributed,
    rank_shard,
    reduce_device,
    share,
)


def test_one_process(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed()
    assert info == dist_info() == DistInfo() and info.is_main and not info.enabled
    barrier()
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t and torch.equal(t, torch.tensor([1.0, 2.0]))
    obj = {"plan": [1, 2]}
    assert share(obj) is obj


def test_shards_devices_and_autocast() -> None:
    assert list(rank_shard(7, DistInfo(rank=1, world_size=3))) == [1, 4]
    assert list(rank_shard(3)) == [0, 1, 2]
    assert reduce_device(torch.device("cpu")) == torch.device("cpu")
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled()
