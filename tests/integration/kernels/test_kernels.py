"""Fused kernels against their plain-torch references, under the Triton CPU interpreter
(TRITON_INTERPRET=1, set in conftest): loss and gradients, fp32 tight and bf16 within the
tolerances documented here, odd shapes, non-contiguous inputs, determinism, 2-rank equivalence."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import kernels.contrastive as kc
from kernels import reference
from kernels._triton import use_triton
from tests.helpers import REPO
from tests.support.kernels import close, feats


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank, world, port, smoothing):
    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        total, d = 22, 40  # 11 rows per rank
        X, Y = feats(total, d, torch.float32, 7), feats(total, d, torch.float32, 8)
        s_ref = torch.tensor(12.0, requires_grad=True)
        ref = reference.contrastive_loss(X, Y, s_ref, smoothing)
        ref.backward()
        mine = slice(rank * total // world, (rank + 1) * total // world)
        x = X.detach()[mine].clone().requires_grad_()
        y = Y.detach()[mine].clone().requires_grad_()
        s = torch.tensor(12.0, requires_grad=True)
        assert use_triton(x, y, s)
        loss = kc.contrastive_loss(x, y, s, smoothing, grad_reduction="sum")
        loss.backward()
        close(loss.detach(), ref.detach(), torch.float32)  # the global loss on every rank
        close(x.grad, X.grad[mine], torch.float32)  # "sum": exact global gradients
        close(y.grad, Y.grad[mine], torch.float32)
        ds = s.grad.clone()
        dist.all_reduce(ds)  # shares sum to the global one
        close(ds, s_ref.grad, torch.float32)
    finally:
        dist.destroy_process_group()


def _towers(distributed):
    """Two linear 'towers' into the loss, with CLIP's learnable temperature, seeded alike everywhere."""
    torch.manual_seed(0)
    return (
        torch.nn.Linear(24, 16),
        torch.nn.Linear(24, 16),
        kc.ContrastiveLoss(init_scale=10.0, distributed=distributed),
    )


def _tower_grads(img, txt, loss_mod, a, b):
    loss = loss_mod(F.normalize(img(a), dim=-1), F.normalize(txt(b), dim=-1))
    loss.backward()
    return loss.detach(), [p.grad.clone() for m in (img, txt, loss_mod) for p in m.parameters()]


def _data_parallel_worker(rank, world, port):
    """What DeepSpeed/DDP do: each rank its slice of the batch, parameter gradients averaged."""
    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        g = torch.Generator().manual_seed(5)
        A, B = torch.randn(16, 24, generator=g), torch.randn(16, 24, generator=g)
        ref_loss, ref = _tower_grads(*_towers(False), A, B)  # one process, the whole batch
        mine = slice(rank * 16 // world, (rank + 1) * 16 // world)
        loss, got = _tower_grads(*_towers(None), A[mine], B[mine])
        for t in got:
            dist.all_reduce(t)
            t /= world  # the data-parallel mean
        close(loss, ref_loss, torch.float32)
        for t, r in zip(got, ref):  # weights, biases and the log-scale: global gradients
            close(t, r, torch.float32)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_contrastive_two_ranks_equal_one_process(smoothing):
    mp.spawn(_distributed_worker, args=(2, _free_port(), smoothing), nprocs=2, join=True)


def test_contrastive_parameter_gradients_after_data_parallel_mean_equal_one_process():
    """The bug this guards against: with per-rank feature gradients left unscaled, the averaged
    parameter gradients were exactly 1 / world of the single-process ones."""
    mp.spawn(_data_parallel_worker, args=(2, _free_port()), nprocs=2, join=True)


@pytest.mark.heavy  # make test-all (25 s); make gpu-check DRY_RUN=1 runs the bench too
def test_bench_smoke_prints_json_lines():
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "kernels.bench"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, TRITON_INTERPRET="0"),
        cwd=REPO,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert "not timings" in rows[0]["device"]
    assert rows[1]["kernel"] == "matmul" and rows[1]["tflops"] > 0  # the peak, measured first
    by_impl = {(r["kernel"], r["impl"]): r for r in rows[2:-1]}
    assert {
        ("contrastive", "mmtrain"),
        ("contrastive", "mmtrain_deterministic"),
        ("contrastive", "torch_compile"),
        ("variational", "mmtrain_seeded"),
        ("variational", "mmtrain_step"),
    } <= set(by_impl)
    assert all(r["ms"] > 0 for r in rows[2:-1])
    ours = by_impl[("contrastive", "mmtrain")]
    assert ours["executed_flops"] == 8 * 64 * 64 * 512
    assert ours["fraction_of_matmul_peak"] == ours["executed_tflops"] / rows[1]["tflops"]
    assert by_impl[("variational", "mmtrain_step")]["passes"] == 11
    ratios = rows[-1]["ratios_peer_ms_over_mmtrain_ms"]
    assert "contrastive/64x512/torch_eager/mmtrain" in ratios
    assert "variational/64x128/torch_compile/mmtrain_step" in ratios
