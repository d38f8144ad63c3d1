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
import kernels.variational as kv
from kernels import reference
from kernels._triton import use_triton
from tests.helpers import REPO

# bf16: inputs carry ~3 significant digits; the kernels accumulate in fp32, so the errors are the
# rounding of inputs/outputs. Relative to the largest value of each tensor:
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def close(a, b, dtype):
    a, b = a.float(), b.float()
    scale = max(1.0, b.abs().max().item())
    torch.testing.assert_close(a / scale, b / scale, **TOL[dtype])


def feats(b, d, dtype, seed=0, transpose=False):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    if transpose:  # the same values through a non-contiguous (column-major) view
        x = x.t().contiguous().t()
    return x.to(dtype).requires_grad_()


@pytest.fixture
def spy(monkeypatch):
    """Counts calls into the Triton paths, so a silent fallback to torch fails the test."""
    calls = {"lse": 0, "grad": 0}
    lse, grad = kc._lse_triton, kc._softmax_grad_triton

    def lse_spy(*a, **k):
        calls["lse"] += 1
        return lse(*a, **k)

    def grad_spy(*a, **k):
        calls["grad"] += 1
        return grad(*a, **k)

    monkeypatch.setattr(kc, "_lse_triton", lse_spy)
    monkeypatch.setattr(kc, "_softmax_grad_triton", grad_spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "b,d,smoothing", [(1, 8, 0.0), (37, 24, 0.0), (70, 33, 0.1), (130, 64, 0.0), (65, 100, 0.2)]
)
def test_contrastive_matches_reference(spy, dtype, b, d, smoothing):
    x, y = feats(b, d, dtype, 1), feats(b, d, dtype, 2, transpose=True)
    s = torch.tensor(14.2857, requires_grad=True)
    loss = kc.contrastive_loss(x, y, s, smoothing)
    loss.backward()
    got = (loss.detach(), x.grad, y.grad, s.grad)
    x.grad = y.grad = s.grad = None
    ref = reference.contrastive_loss(x, y, s, smoothing)
    ref.backward()
    assert spy == {"lse": 1, "grad": 2}
    close(got[0], ref.detach(), dtype)
    for g, r in zip(got[1:], (x.grad, y.grad, s.grad)):
        assert g.dtype == r.dtype
        close(g, r, dtype)


def test_contrastive_noncontiguous_strided_views(spy):
    base = feats(80, 48, torch.float32, 3)
    x = base[::2].detach().requires_grad_()  # row stride 96
    yfull = feats(40, 96, torch.float32, 4)
    y = yfull[:, ::2].detach().requires_grad_()  # column stride 2
    assert not x.is_contiguous() or not y.is_contiguous()
    s = torch.tensor(10.0)
    kc.contrastive_loss(x, y, s).backward()
    gx, gy = x.grad, y.grad
    x2, y2 = x.detach().contiguous().requires_grad_(), y.detach().contiguous().requires_grad_()
    reference.contrastive_loss(x2, y2, s).backward()
    close(gx, x2.grad, torch.float32)
    close(gy, y2.grad, torch.float32)


def test_module_learns_log_scale_and_torch_fallback_agrees(monkeypatch):
    x, y = feats(33, 16, torch.float32, 5), feats(33, 16, torch.float32, 6)
    mod = kc.ContrastiveLoss(init_scale=1 / 0.07)
    mod(x, y).backward()
    g_kernel = mod.log_scale.grad.clone()
    ref_scale = mod.log_scale.detach().clone().requires_grad_()
    reference.contrastive_loss(x, y, ref_scale.exp()).backward()
    close(g_kernel, ref_scale.grad, torch.float32)
    assert g_kernel.abs() > 0
    monkeypatch.setattr(kc, "use_triton", lambda *t: False)  # a CPU without the interpreter
    mod.log_scale.grad = None
    mod(x, y).backward()
    close(mod.log_scale.grad, g_kernel, torch.float32)


def test_contrastive_rejects_bad_input():
    s = torch.tensor(1.0)
    with pytest.raises(ValueError, match="must both be B x D"):
        kc.contrastive_loss(torch.randn(4, 8), torch.randn(5, 8), s)
    with pytest.raises(ValueError, match="share a dtype"):
        kc.contrastive_loss(torch.randn(4, 8), torch.randn(4, 8).bfloat16(), s)
    with pytest.raises(ValueError, match="logit_scale must hold one value"):
        kc.contrastive_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2))


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


# ----------------------------------------------------------------------------- variational


def stats(shape, dtype, seed=0, transpose=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(4):
        t = torch.randn(shape, generator=g) * (2.0 if i % 2 else 1.0)
        if transpose:
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        out.append(t.to(dtype).requires_grad_())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,direction,reduction",
    [
        ((1, 1), "qp", "mean"),
        ((5, 7, 33), "qp", "mean"),
        ((9, 1500), "pq", "sum"),
        ((6, 100), "qp", "none"),
    ],
)
def test_variational_matches_reference(dtype, shape, direction, reduction):
    ins = stats(shape, dtype, 1, transpose=len(shape) == 2 and shape[0] > 1)
    with torch.no_grad():
        ins[1][(0,) * len(shape)] = -45.0  # below LOGVAR_MIN: clamped, zero gradient
        ins[3][(-1,) * len(shape)] = 25.0  # above LOGVAR_MAX
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    z, kl = kv.variational_fusion(*ins, eps=eps, direction=direction, reduction=reduction)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    wk = torch.randn(kl.shape, generator=torch.Generator().manual_seed(4))
    ((z.float() * w).sum() + (kl * wk).sum()).backward()
    got = [z.detach(), kl.detach()] + [t.grad for t in ins]
    for t in ins:
        t.grad = None
    zr, klr = reference.variational_fusion(*ins, eps, direction, reduction)
    ((zr.float() * w).sum() + (klr * wk).sum()).backward()
    assert z.dtype == dtype and kl.dtype == torch.float32
    for g, r in zip(got, [zr.detach(), klr.detach()] + [t.grad for t in ins]):
        close(g, r, dtype)
    assert ins[1].grad[(0,) * len(shape)] == 0 and ins[3].grad[(-1,) * len(shape)] == 0


def test_variational_seeded_noise_is_reproducible_and_standard_normal():
    mu, lv = torch.zeros(128, 300), torch.zeros(128, 300)
    z1, _ = kv.variational_fusion(mu, lv, mu, lv, seed=3)
    z2, _ = kv.variational_fusion(mu, lv, mu, lv, seed=3)
    z3, _ = kv.variational_fusion(mu, lv, mu, lv, seed=4)
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    assert abs(z1.mean().item()) < 0.02 and abs(z1.std().item() - 1) < 0.02


def test_variational_seeded_backward_uses_the_same_noise():
    mq, lq, mp, lp = stats((16, 50), torch.float32, 5)
    z, kl = kv.variational_fusion(mq, lq, mp, lp, seed=11)
    (z.sum() + kl).backward()
    eps = (
        (z - mq) / torch.exp(0.5 * lq.clamp(reference.LOGVAR_MIN, reference.LOGVAR_MAX))
    ).detach()
    got = [t.grad for t in (mq, lq, mp, lp)]
    for t in (mq, lq, mp, lp):
        t.grad = None
    zr, klr = reference.variational_fusion(mq, lq, mp, lp, eps)
    (zr.sum() + klr).backward()
    for g, t in zip(got, (mq, lq, mp, lp)):
        close(g, t.grad, torch.float32)


def test_variational_rejects_bad_input():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="exactly one of eps"):
        kv.variational_fusion(a, a, a, a)
    with pytest.raises(ValueError, match="share a shape"):
        kv.variational_fusion(a, a, a, torch.zeros(2, 4), seed=0)
    with pytest.raises(ValueError, match="direction must be"):
        kv.variational_fusion(a, a, a, a, seed=0, direction="qq")


# ----------------------------------------------------------------------------- GPU and packaging


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: the native bf16 tensor-core path"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_gpu_path_matches_reference(dtype):
    b, d = 4099, 512
    x = F.normalize(torch.randn(b, d, device="cuda"), dim=-1).to(dtype).requires_grad_()
    y = F.normalize(torch.randn(b, d, device="cuda"), dim=-1).to(dtype).requires_grad_()
    s = torch.tensor(14.0, device="cuda", requires_grad=True)
    loss = kc.contrastive_loss(x, y, s, 0.1)
    loss.backward()
    got = (loss.detach(), x.grad, y.grad, s.grad)
    x.grad = y.grad = s.grad = None
    ref = reference.contrastive_loss(x, y, s, 0.1)
    ref.backward()
    tol = torch.float32 if dtype == torch.float32 else torch.bfloat16
    for g, r in zip(got, (ref.detach(), x.grad, y.grad, s.grad)):
        close(g, r, tol)


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
    impls = {(r["kernel"], r["impl"]) for r in rows[1:-1]}
    assert {
        ("contrastive", "mmtrain"),
        ("contrastive", "torch_compile"),
        ("variational", "mmtrain_seeded"),
    } <= impls
    assert all(r["ms"] > 0 for r in rows[1:-1])
    assert "contrastive/64x512/torch_eager" in rows[-1]["ratios_peer_ms_over_mmtrain_ms"]


def test_kernels_package_is_standalone():
    import pathlib

    for f in pathlib.Path(kc.__file__).parent.glob("*.py"):
        for line in f.read_text().splitlines():
            assert not line.lstrip().startswith(("import mmtrain", "from mmtrain")), (
                f"{f.name}: {line}"
            )
