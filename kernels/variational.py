"""Fused BVIF variational step: z = mu_q + exp(0.5 * logvar_q) * eps and KL between diagonal Gaussians.

One program per row (all leading dimensions flattened); the row is walked in BLOCK_D chunks.
Forward reads the four statistics (and eps, unless it is drawn in the kernel) and writes z and
the per-row KL; backward reads them again with dz and writes the four gradients. With
`seed=` instead of `eps=`, the noise is drawn by Philox in the kernel from (seed, element
index) and drawn again identically in the backward, so it is never stored or read — the
saving that matters in a bandwidth-bound kernel. Log-variances are clamped to
[LOGVAR_MIN, LOGVAR_MAX] (see kernels.reference), with zero gradient outside.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from kernels._triton import HAS_TRITON, use_triton
from kernels.reference import LOGVAR_MAX, LOGVAR_MIN

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_row(ptr, row, offs, mask, stride_r, stride_c):
        return tl.load(ptr + row * stride_r + offs * stride_c, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _vf_fwd_kernel(
        MQ,
        LQ,
        MP,
        LP,
        EPS,
        Z,
        KL,
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
        LV_MIN: tl.constexpr,
        LV_MAX: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_EPS: tl.constexpr,
        PQ: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        kl = tl.zeros([BLOCK_D], tl.float32)
        for start in range(0, D, BLOCK_D):
            offs = start + tl.arange(0, BLOCK_D)
            mask = offs < D
            mq = _load_row(MQ, row, offs, mask, s_mq_r, s_mq_c)
            lq = tl.minimum(
                tl.maximum(_load_row(LQ, row, offs, mask, s_lq_r, s_lq_c), LV_MIN), LV_MAX
            )
            mp = _load_row(MP, row, offs, mask, s_mp_r, s_mp_c)
            lp = tl.minimum(
                tl.maximum(_load_row(LP, row, offs, mask, s_lp_r, s_lp_c), LV_MIN), LV_MAX
            )
            if HAS_EPS:
                eps = _load_row(EPS, row, offs, mask, s_e_r, s_e_c)
            else:
                eps = tl.randn(seed, (row * D + offs).to(tl.int32))
            z = mq + tl.exp(0.5 * lq) * eps
            tl.store(Z + row * D + offs, z.to(Z.dtype.element_ty), mask=mask)
            diff = mq - mp
            if PQ:  # KL(p || q)
                term = lq - lp + (tl.exp(lp) + diff * diff) * tl.exp(-lq) - 1.0
            else:  # KL(q || p)
                term = lp - lq + (tl.exp(lq) + diff * diff) * tl.exp(-lp) - 1.0
            kl += tl.where(mask, 0.5 * term, 0.0)
        tl.store(KL + row, tl.sum(kl, 0))

    @triton.jit
    def _vf_bwd_kernel(
        MQ,
        LQ,
        MP,
        LP,
        EPS,
        DZ,
        DKL,
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
    ):
        row = tl.program_id(0).to(tl.int64)
        dkl = tl.load(DKL + row).to(tl.float32)
        for start in range(0, D, BLOCK_D):
            offs = start + tl.arange(0, BLOCK_D)
            mask = offs < D
            mq = _load_row(MQ, row, offs, mask, s_mq_r, s_mq_c)
            lq_raw = _load_row(LQ, row, offs, mask, s_lq_r, s_lq_c)
            mp = _load_row(MP, row, offs, mask, s_mp_r, s_mp_c)
            lp_raw = _load_row(LP, row, offs, mask, s_lp_r, s_lp_c)
            dz = _load_row(DZ, row, offs, mask, s_dz_r, s_dz_c)
            lq = tl.minimum(tl.maximum(lq_raw, LV_MIN), LV_MAX)
            lp = tl.minimum(tl.maximum(lp_raw, LV_MIN), LV_MAX)
            if HAS_EPS:
                eps = _load_row(EPS, row, offs, mask, s_e_r, s_e_c)
            else:
                eps = tl.randn(seed, (row * D + offs).to(tl.int32))
            diff = mq - mp
            if PQ:  # KL(p || q): a = p, b = q
                inv_b = tl.exp(-lq)
                g_mq = diff * inv_b
                g_mp = -diff * inv_b
                g_lp = 0.5 * (tl.exp(lp) * inv_b - 1.0)
                g_lq = 0.5 * (1.0 - (tl.exp(lp) + diff * diff) * inv_b)
            else:  # KL(q || p): a = q, b = p
                inv_b = tl.exp(-lp)
                g_mq = diff * inv_b
                g_mp = -diff * inv_b
                g_lq = 0.5 * (tl.exp(lq) * inv_b - 1.0)
                g_lp = 0.5 * (1.0 - (tl.exp(lq) + diff * diff) * inv_b)
            g_mq = dkl * g_mq + dz
            g_lq = dkl * g_lq + dz * 0.5 * tl.exp(0.5 * lq) * eps
            g_lq = tl.where((lq_raw >= LV_MIN) & (lq_raw <= LV_MAX), g_lq, 0.0)
            g_lp = tl.where((lp_raw >= LV_MIN) & (lp_raw <= LV_MAX), dkl * g_lp, 0.0)
            out = row * D + offs
            tl.store(GMQ + out, g_mq.to(GMQ.dtype.element_ty), mask=mask)
            tl.store(GLQ + out, g_lq.to(GLQ.dtype.element_ty), mask=mask)
            tl.store(GMP + out, (dkl * g_mp).to(GMP.dtype.element_ty), mask=mask)
            tl.store(GLP + out, g_lp.to(GLP.dtype.element_ty), mask=mask)


BLOCK_D = 1024


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, D) view (copy only when the leading dimensions cannot be flattened)."""
    return t.reshape(-1, t.shape[-1])


def _strides(*ts):
    return [s for t in ts for s in (t.stride(0), t.stride(1))]


class _VariationalFusion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu_q, logvar_q, mu_p, logvar_p, eps, seed: int, pq: bool, reduction: str):
        shape = mu_q.shape
        mq, lq, mp, lp = (_rows(t) for t in (mu_q, logvar_q, mu_p, logvar_p))
        has_eps = eps is not None
        e = _rows(eps) if has_eps else mq  # a placeholder pointer when drawn
        n, d = mq.shape
        z = torch.empty((n, d), device=mq.device, dtype=mu_q.dtype)
        kl = torch.empty(n, device=mq.device, dtype=torch.float32)
        _vf_fwd_kernel[(n,)](
            mq,
            lq,
            mp,
            lp,
            e,
            z,
            kl,
            d,
            seed,
            *_strides(mq, lq, mp, lp, e),
            LV_MIN=LOGVAR_MIN,
            LV_MAX=LOGVAR_MAX,
            BLOCK_D=min(BLOCK_D, triton.next_power_of_2(d)),
            HAS_EPS=has_eps,
            PQ=pq,
        )
        ctx.save_for_backward(mq, lq, mp, lp, e)
        ctx.meta = (shape, seed, pq, reduction, has_eps, n)
        kl = kl.reshape(shape[:-1])
        return z.reshape(shape), _reduce(kl, reduction)

    @staticmethod
    def backward(ctx, dz, dkl):
        mq, lq, mp, lp, e = ctx.saved_tensors
        shape, seed, pq, reduction, has_eps, n = ctx.meta
        d = mq.shape[1]
        dz = _rows(dz if dz is not None else torch.zeros(shape, device=mq.device, dtype=mq.dtype))
        if dkl is None:
            dkl_rows = torch.zeros(n, device=mq.device, dtype=torch.float32)
        elif reduction == "mean":
            dkl_rows = (dkl.float() / n).expand(n).contiguous()
        elif reduction == "sum":
            dkl_rows = dkl.float().expand(n).contiguous()
        else:
            dkl_rows = dkl.float().reshape(n).contiguous()
        grads = [torch.empty((n, d), device=mq.device, dtype=t.dtype) for t in (mq, lq, mp, lp)]
        _vf_bwd_kernel[(n,)](
            mq,
            lq,
            mp,
            lp,
            e,
            dz,
            dkl_rows,
            *grads,
            d,
            seed,
            *_strides(mq, lq, mp, lp, e, dz),
            LV_MIN=LOGVAR_MIN,
            LV_MAX=LOGVAR_MAX,
            BLOCK_D=min(BLOCK_D, triton.next_power_of_2(d)),
            HAS_EPS=has_eps,
            PQ=pq,
        )
        return (*(g.reshape(shape) for g in grads), None, None, None, None)


def _reduce(kl: torch.Tensor, reduction: str) -> torch.Tensor:
    return kl.mean() if reduction == "mean" else kl.sum() if reduction == "sum" else kl


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
    if use_triton(*ts):
        return _VariationalFusion.apply(
            mu_q, logvar_q, mu_p, logvar_p, eps, int(seed or 0), direction == "pq", reduction
        )
    from kernels import reference

    if eps is None:
        g = torch.Generator(device=mu_q.device).manual_seed(int(seed))
        eps = torch.randn(mu_q.shape, generator=g, device=mu_q.device, dtype=torch.float32)
    return reference.variational_fusion(mu_q, logvar_q, mu_p, logvar_p, eps, direction, reduction)
