"""Shards: writing, the public-format converters, the distributed resumable reader, corruption."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmtrain.data.synth import synth
from tests.support.shards import corrupt_one_image, loader, write_plain


def _rank_worker(rank, world, port, spec, out):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        ld = loader(spec, batch=3, rank=rank, world=world, workers=2)
        keys = []
        for _ in range(ld.steps_per_epoch * 2):  # two epochs, a collective each step
            keys.append(next(ld)["key"])
            dist.all_reduce(torch.ones(1))
        torch.save(keys, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_take_equal_steps_without_hanging(tmp_path):
    spec = write_plain(tmp_path, "uneven", [17, 2, 9])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(2, port, str(spec), str(tmp_path)), nprocs=2, join=True)
    k0, k1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert len(k0) == len(k1) == 8
    first = [k for b in k0[:4] + k1[:4] for k in b]
    assert len(first) == len(set(first)) == 24


def test_engine_trains_from_shards_logs_skips_and_resumes_exactly(tmp_path):
    from tests.helpers import REPO, scalars, train

    synth("image-text", str(tmp_path / "d"), 150, max_count=40)
    corrupt_one_image(sorted((tmp_path / "d" / "train").glob("*.tar"))[1])
    common = [
        "recipe.name=tests.shard_recipe:ShardColor",
        f"recipe.data.train={tmp_path / 'd' / 'train'}",
        "recipe.data.workers=2",
        "recipe.data.max_skip_fraction=0.1",
        "train.micro_batch_size=8",
        "train.steps=16",
        "train.lr=3e-3",
        "log.every=1",
        "checkpoint.every=100",
        "eval.at_end=false",
        "deepspeed.precision=fp32",
    ]
    straight, split = tmp_path / "runs" / "straight", tmp_path / "runs" / "split"
    base = REPO / "configs" / "base.yaml"
    train(straight, common, config=base)
    train(split, common + ["run.stop_after_steps=9"], config=base)
    train(split, common, config=base)
    a, b = scalars(straight, "loss/total"), scalars(split, "loss/total")
    # 120 // 2 // 8 = 7 steps/epoch
    assert [a[s] for s in range(10, 17)] == [b[s] for s in range(10, 17)]
    skipped = scalars(straight, "data/skipped")
    # counted, and kept on resume
    assert skipped[16] >= 1 and skipped == scalars(split, "data/skipped")
    assert scalars(straight, "data/seen")[16] == 16 * 8 * 2  # summed over both ranks
    assert scalars(straight, "train/epoch")[16] == 2
    assert sum(a[s] for s in range(14, 17)) < sum(a[s] for s in range(1, 4))
