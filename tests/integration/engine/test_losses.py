"""engine.losses.combine: token means over the global batch, at any world size."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmtrain.engine.losses import combine
from mmtrain.recipes.base import GlobalMean

CPU = torch.device("cpu")


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
