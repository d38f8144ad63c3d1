"""engine.losses.combine: token means over the global batch, at any world size."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmtrain.engine.losses import combine
from mmtrain.recipes.base import GlobalMean

CPU = torch.device("cpu")


def other_rank(*counts):
    """An all-reduce as seen from one rank whose peer reports `counts` (non-finite flag first)."""
    return lambda t: t + torch.tensor(counts, dtype=t.dtype)


def test_global_mean_is_divided_by_the_count_over_all_ranks_and_scaled_for_the_average():
    s = torch.tensor(6.0, requires_grad=True)
    total, parts, bad = combine(
        {"plain": torch.tensor(2.0), "tok": GlobalMean(s, 3)},
        lambda k: 0.5,
        other_rank(0.0, 9.0),
        world=2,
        device=CPU,
    )
    assert not bad
    assert parts["plain"].item() == 2.0  # a per-sample mean: as it is
    assert parts["tok"].item() == pytest.approx(6.0 * 2 / 12)  # 12 tokens over both ranks
    assert list(parts) == ["plain", "tok"] and total.item() == pytest.approx(0.5 * 2.0 + 0.5 * 1.0)
    total.backward()
    assert s.grad.item() == pytest.approx(0.5 * 2 / 12)


def test_no_item_anywhere_gives_zero_and_non_finite_anywhere_is_reported():
    _, parts, bad = combine(
        {"tok": GlobalMean(torch.tensor(0.0), 0)}, lambda k: 1.0, other_rank(0.0, 0.0), 2, CPU
    )
    assert parts["tok"].item() == 0.0 and not bad
    _, _, bad = combine(
        {"tok": GlobalMean(torch.tensor(1.0), 1)}, lambda k: 1.0, other_rank(1.0, 4.0), 2, CPU
    )
    assert bad  # the peer's loss was not finite
    _, _, bad = combine({"x": torch.tensor(float("nan"))}, lambda k: 1.0, lambda t: t, 1, CPU)
    assert bad


def _token_mean_worker(rank, world, port):
    """Two ranks holding 2 and 6 answer tokens: after the data-parallel mean, the gradient of the token
    mean over all 8 tokens, as one process computes it (a per-rank mean would weigh them 3:1)."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.manual_seed(0)
        w = torch.randn(4, requires_grad=True)
        x = torch.randn(8, 4)
        (x @ w).pow(2).mean().backward()  # one process, all 8 tokens
        ref, w.grad = w.grad.clone(), None
        mine = x[:2] if rank == 0 else x[2:]

        def all_reduce(t):
            dist.all_reduce(t)
            return t

        total, _, _ = combine(
            {"tok": GlobalMean((mine @ w).pow(2).sum(), len(mine))},
            lambda k: 1.0,
            all_reduce,
            world,
            CPU,
        )
        total.backward()
        dist.all_reduce(w.grad)
        torch.testing.assert_close(w.grad / world, ref)
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_unequal_token_counts_get_the_global_token_mean_gradient():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_token_mean_worker, args=(2, port), nprocs=2, join=True)
