"""Fused BVIF variational step: z = mu_q + exp(0.5 * logvar_q) * eps and KL between diagonal Gaussians.

One kernel, `_vf_kernel`, one program per row (all leading dimensions flattened), the row walked
in BLOCK_D chunks; two switches say what a launch does with what it reads:
- FORWARD: write z and the per-row KL;
- BACKWARD: read dz (the incoming gradient of z) and the per-row dKL, write the four gradients.
Log-variances are clamped to [LOGVAR_MIN, LOGVAR_MAX] (see kernels.gaussian), with zero
gradient outside. With `seed=` instead of `eps=`, the noise is drawn by Philox in the kernel
from (seed, element index), drawn again identically wherever it is needed, so it is never
stored or read: the saving that matters in a bandwidth-bound kernel.

Passes over N x D tensors (R read, W written), counting noise as one read when it is passed:
- `variational_fusion` under autograd: forward (FORWARD) R mu_q, logvar_q, mu_p, logvar_p,
  eps; W z = 6; backward (BACKWARD) R the four, eps, dz; W four gradients = 10. 16 in all
  (14 seeded): z must exist before anything downstream can produce dz.
- `variational_fusion_step` (FORWARD and BACKWARD in one launch), for a caller that holds dz
  when it asks for z: R mu_q, logvar_q, mu_p, logvar_p, eps, dz; W z and the four gradients
  = 11, the minimum (10 seeded, below what ../shared/anchors.md counts as the minimum).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from kernels import gaussian
from kernels._triton import HAS_TRITON, use_triton
from kernels.gaussian import LOGVAR_MAX, LOGVAR_MIN

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_row(ptr, row, offs, mask, stride_r, stride_c):
        return tl.load(ptr + row * stride_r + offs * stride_c, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _vf_kernel(
        MQ,
        LQ,
        MP,
        LP,
        EPS,
        DZ,
        DKL,
        Z,
        KL,
        GMQ,
        GLQ,
        GMP,
        GLP,
        D,
        seed,
        s_mq_r,
        s_mq_c,
        s_lq_r,
        s_lq_c,
        s_mp_r,
        s_mp_c,
        s_lp_r,
        s_lp_c,
        s_e_r,
        s_e_c,
        s_dz_r,
        s_dz_c,
        LV_MIN: tl.constexpr,
        LV_MAX: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_EPS: tl.constexpr,
        PQ: tl.constexpr,
        FORWARD: tl.constexpr,
        BACKWARD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        kl = tl.zeros([BLOCK_D], tl.float32)
        if BACKWARD:
            dkl = tl.load(DKL + row).to(tl.float32)
        for start in range(0, D, BLOCK_D):
            offs = start + tl.arange(0, BLOCK_D)
            mask = offs < D
            out = row * D + offs
            mq = _load_row(MQ, row, offs, mask, s_mq_r, s_mq_c)
            lq_raw = _load_row(LQ, row, offs, mask, s_lq_r, s_lq_c)
            mp = _load_row(MP, row, offs, mask, s_mp_r, s_mp_c)
            lp_raw = _load_row(LP, row, offs, mask, s_lp_r, s_lp_c)
            lq = tl.minimum(tl.maximum(lq_raw, LV_MIN), LV_MAX)
            lp = tl.minimum(tl.maximum(lp_raw, LV_MIN), LV_MAX)
            if HAS_EPS:
                eps = _load_row(EPS, row, offs, mask, s_e_r, s_e_c)
            else:
                eps = tl.randn(seed, out.to(tl.int32))
            sigma_eps = tl.exp(0.5 * lq) * eps
            diff = mq - mp
            # KL(a || b) = 0.5 * (lb - la + (exp(la) + diff^2) * exp(-lb) - 1)
            if PQ:  # KL(p || q)
                la, lb = lp, lq
            else:  # KL(q || p)
                la, lb = lq, lp
            var_a = tl.exp(la)
            inv_b = tl.exp(-lb)
            if FORWARD:
                tl.store(Z + out, (mq + sigma_eps).to(Z.dtype.element_ty), mask=mask)
                term = lb - la + (var_a + diff * diff) * inv_b - 1.0
                kl += tl.where(mask, 0.5 * term, 0.0)
            if BACKWARD:
                dz = _load_row(DZ, row, offs, mask, s_dz_r, s_dz_c)
                g_a = 0.5 * (var_a * inv_b - 1.0)  # d KL / d la
                g_b = 0.5 * (1.0 - (var_a + diff * diff) * inv_b)  # d KL / d lb
                if PQ:
                    g_lq, g_lp = g_b, g_a
                else:
                    g_lq, g_lp = g_a, g_b
                g_mq = dkl * diff * inv_b + dz
                g_lq = dkl * g_lq + dz * 0.5 * sigma_eps
                g_lq = tl.where((lq_raw >= LV_MIN) & (lq_raw <= LV_MAX), g_lq, 0.0)
                g_lp = tl.where((lp_raw >= LV_MIN) & (lp_raw <= LV_MAX), dkl * g_lp, 0.0)
                tl.store(GMQ + out, g_mq.to(GMQ.dtype.element_ty), mask=mask)
                tl.store(GLQ + out, g_lq.to(GLQ.dtype.element_ty), mask=mask)
                tl.store(GMP + out, (-dkl * diff * inv_b).to(GMP.dtype.element_ty), mask=mask)
                tl.store(GLP + out, g_lp.to(GLP.dtype.element_ty), mask=mask)
        if FORWARD:
            tl.store(KL + row, tl.sum(kl, 0))


BLOCK_D = 1024


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, D) view (copy only when the leading dimensions cannot be flattened)."""
    return t.reshape(-1, t.shape[-1])


def _strides(*ts):
    return [s for t in ts for s in (t.stride(0), t.stride(1))]


def _launch(stats, eps, seed: int, pq: bool, dz=None, dkl_rows=None, forward=True):
    """Runs `_vf_kernel` over (rows, D) views; returns (z, kl rows) and/or the four gradients."""
    mq, lq, mp, lp = stats
    n, d = mq.shape
    has_eps = eps is not None
    e = eps if has_eps else mq  # a placeholder pointer when the noise is drawn
    backward = dz is not None
    z = torch.empty((n, d), device=mq.device, dtype=mq.dtype) if forward else mq
    kl = torch.empty(n, device=mq.device, dtype=torch.float32) if forward else mq
    grads = (
        [torch.empty((n, d), device=mq.device, dtype=t.dtype) for t in stats] if backward else []
    )
    g = grads or [mq] * 4
    dz, dkl_rows = (dz, dkl_rows) if backward else (mq, mq)  # placeholders when not read
    _vf_kernel[(n,)](
        mq, lq, mp, lp, e, dz, dkl_rows,
        z, kl, *g, d, seed, *_strides(mq, lq, mp, lp, e, dz),
        LV_MIN=LOGVAR_MIN, LV_MAX=LOGVAR_MAX, BLOCK_D=min(BLOCK_D, triton.next_power_of_2(d)),
        HAS_EPS=has_eps, PQ=pq, FORWARD=forward, BACKWARD=backward,
    )  # fmt: skip
    return (z, kl) if forward else None, grads


def _dkl_rows(dkl, n: int, reduction: str, device) -> torch.Tensor:
    """The incoming gradient of the reduced KL, per row."""
    if dkl is None:
        return torch.zeros(n, device=device, dtype=torch.float32)
    dkl = torch.as_tensor(dkl, device=device, dtype=torch.float32)
    if reduction == "mean":
        return (dkl / n).expand(n).contiguous()
    if reduction == "sum":
        return dkl.expand(n).contiguous()
    return dkl.reshape(n).contiguous()


class _VariationalFusion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu_q, logvar_q, mu_p, logvar_p, eps, seed: int, pq: bool, reduction: str):
        shape = mu_q.shape
        stats = [_rows(t) for t in (mu_q, logvar_q, mu_p, logvar_p)]
        e = _rows(eps) if eps is not None else None
        (z, kl), _ = _launch(stats, e, seed, pq)
        ctx.save_for_backward(*stats, *([e] if e is not None else []))
        ctx.meta = (shape, seed, pq, reduction)
        return z.reshape(shape), _reduce(kl.reshape(shape[:-1]), reduction)

    @staticmethod
    def backward(ctx, dz, dkl):
        shape, seed, pq, reduction = ctx.meta
        stats, e = ctx.saved_tensors[:4], (ctx.saved_tensors[4:] or [None])[0]
        n = stats[0].shape[0]
        if dz is None:
            dz = torch.zeros(shape, device=stats[0].device, dtype=stats[0].dtype)
        dkl_rows = _dkl_rows(dkl, n, reduction, stats[0].device)
        _, grads = _launch(stats, e, seed, pq, dz=_rows(dz), dkl_rows=dkl_rows, forward=False)
        return (*(g.reshape(shape) for g in grads), None, None, None, None)


def _reduce(kl: torch.Tensor, reduction: str) -> torch.Tensor:
    return kl.mean() if reduction == "mean" else kl.sum() if reduction == "sum" else kl


def _check(mu_q, logvar_q, mu_p, logvar_p, eps, seed, direction, reduction):
    ts = (mu_q, logvar_q, mu_p, logvar_p)
    if any(t.shape != mu_q.shape for t in ts) or (eps is not None and eps.shape != mu_q.shape):
        raise ValueError(
            f"mu_q, logvar_q, mu_p, logvar_p (and eps) must share a shape, got "
            f"{[tuple(t.shape) for t in ts]}"
        )
    if direction not in ("qp", "pq"):
        raise ValueError(f"direction must be 'qp' or 'pq', got {direction!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if (eps is None) == (seed is None):
        raise ValueError("pass exactly one of eps (the noise) or seed (noise drawn in the kernel)")
    if eps is None and mu_q.numel() >= 2**31:
        raise ValueError(
            "seeded noise indexes elements with int32: more than 2^31 elements, pass eps instead"
        )


def _torch_noise(mu_q, eps, seed):
    if eps is not None:
        return eps
    g = torch.Generator(device=mu_q.device).manual_seed(int(seed))
    return torch.randn(mu_q.shape, generator=g, device=mu_q.device, dtype=torch.float32)


def variational_fusion(
    mu_q: torch.Tensor,
    logvar_q: torch.Tensor,
    mu_p: torch.Tensor,
    logvar_p: torch.Tensor,
    eps: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    direction: str = "qp",
    reduction: str = "mean",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(z, kl): z = mu_q + exp(0.5 logvar_q) * eps (in mu_q's dtype) and KL(q||p) (direction='qp')
    or KL(p||q) ('pq'), summed over the last dimension and reduced over the rest ('mean', 'sum'
    or 'none'; fp32). Pass the noise as `eps`, or a `seed` to draw it in the kernel (reproducible
    for a seed; a different stream from torch.randn)."""
    _check(mu_q, logvar_q, mu_p, logvar_p, eps, seed, direction, reduction)
    if use_triton(mu_q, logvar_q, mu_p, logvar_p):
        return _VariationalFusion.apply(
            mu_q, logvar_q, mu_p, logvar_p, eps, int(seed or 0), direction == "pq", reduction
        )
    eps = _torch_noise(mu_q, eps, seed)
    return gaussian.variational_fusion(mu_q, logvar_q, mu_p, logvar_p, eps, direction, reduction)


def variational_fusion_step(
    mu_q: torch.Tensor,
    logvar_q: torch.Tensor,
    mu_p: torch.Tensor,
    logvar_p: torch.Tensor,
    grad_z: torch.Tensor,
    eps: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    grad_kl: Union[float, torch.Tensor] = 1.0,
    direction: str = "qp",
    reduction: str = "mean",
) -> Tuple[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Forward and backward of `variational_fusion` in one pass over the inputs, for a caller that
    holds the incoming gradient of z (`grad_z`) and of the reduced KL (`grad_kl`: the KL's weight
    in the loss) when it asks for z. Returns (z, kl, (d mu_q, d logvar_q, d mu_p, d logvar_p)),
    the same values as `variational_fusion` followed by `backward`; no autograd graph. 11 passes
    over N x D tensors (10 with `seed`): see the module docstring."""
    _check(mu_q, logvar_q, mu_p, logvar_p, eps, seed, direction, reduction)
    if grad_z.shape != mu_q.shape:
        raise ValueError(
            f"grad_z must have the shape of z {tuple(mu_q.shape)}, got {tuple(grad_z.shape)}"
        )
    shape = mu_q.shape
    if use_triton(mu_q, logvar_q, mu_p, logvar_p, grad_z):
        stats = [_rows(t.detach()) for t in (mu_q, logvar_q, mu_p, logvar_p)]
        n = stats[0].shape[0]
        (z, kl), grads = _launch(
            stats,
            _rows(eps) if eps is not None else None,
            int(seed or 0),
            direction == "pq",
            dz=_rows(grad_z),
            dkl_rows=_dkl_rows(grad_kl, n, reduction, mu_q.device),
        )
        kl = _reduce(kl.reshape(shape[:-1]), reduction)
        return z.reshape(shape), kl, tuple(g.reshape(shape) for g in grads)
    ins = [t.detach().requires_grad_() for t in (mu_q, logvar_q, mu_p, logvar_p)]
    with torch.enable_grad():
        z, kl = gaussian.variational_fusion(
            *ins, _torch_noise(mu_q, eps, seed), direction, reduction
        )
        grad_kl = torch.as_tensor(grad_kl, dtype=kl.dtype, device=kl.device).expand_as(kl)
        grads = torch.autograd.grad([z, kl], ins, [grad_z.to(z.dtype), grad_kl])
    return z.detach(), kl.detach(), grads
