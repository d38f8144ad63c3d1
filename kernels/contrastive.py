"""Fused symmetric InfoNCE (CLIP's contrastive loss) whose B x B logits never exist in memory.

Forward, one pass over (row block, column block) tiles: `s * X_blk @ Y_blk.T` stays in SRAM; the
row log-sum-exp is accumulated online, and each row block writes one partial column
log-sum-exp per column (a (B / BLOCK_M) x B fp32 buffer, reduced afterwards) — the only
O(B^2 / BLOCK_M) memory. Backward, with G = dloss/dlogits:
    G_ij = c * (exp(L_ij - lse_row_i) + exp(L_ij - lse_col_j)) - c * 2 * q_ij,   c = grad / (2B)
    dX = s * G @ Y,  dY = s * G.T @ X,  ds = sum(G * X @ Y.T)
The softmax part is one kernel called twice, as (X, Y, lse_row, lse_col) for dX and as
(Y, X, lse_col, lse_row) for dY, since G.T has the same form; the target part (q: 1 - e on the
diagonal, e / B everywhere) is O(B D) and done in torch.

Distributed: each rank gathers all features, computes its own rows against all columns, and the
column/row log-sum-exps are combined across ranks (B floats each). The gradient of the global
loss with respect to this rank's features needs no further communication: it comes from this
rank's rows and columns alone, and the logit-scale gradient splits into per-rank shares that sum
to the global one. What each rank receives depends on how the caller reduces gradients across
ranks (`grad_reduction`):
- "mean" (default; what DeepSpeed and DDP do): world_size x (dL/d local features) and
  world_size x (this rank's share of dL/ds). After the data-parallel mean over ranks, every
  parameter upstream of the loss holds exactly the gradient of the global-batch loss — the same
  as one process over the whole batch, at any world size.
- "sum": dL/d local features and this rank's share of dL/ds, unscaled; the sum over ranks is the
  global gradient.
The returned value is the global loss on every rank, whatever the reduction.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from kernels._triton import HAS_TRITON, dot_in_fp32, dot_precision, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _row_tile(
        A,
        start,
        M,
        D,
        stride_am,
        stride_ad,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """Rows start .. start + BLOCK_M of A, whole feature rows (masked tails), ready for tl.dot."""
        offs_m = start + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < M
        mask_d = offs_d < D
        a = tl.load(
            A + offs_m[:, None] * stride_am + offs_d[None, :] * stride_ad,
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        if DOT_FP32:
            a = a.to(tl.float32)
        return offs_m, mask_m, offs_d, mask_d, a

    @triton.jit
    def _lse_fwd_kernel(
        A,
        B,
        scale_ptr,
        row_lse_ptr,
        col_part_ptr,
        M,
        N,
        D,
        stride_am,
        stride_ad,
        stride_bn,
        stride_bd,
        stride_pm,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_m, mask_m, offs_d, mask_d, a = _row_tile(
            A, pid * BLOCK_M, M, D, stride_am, stride_ad, BLOCK_M, BLOCK_D, DOT_FP32
        )
        s = tl.load(scale_ptr).to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n, mask_n, _, _, b = _row_tile(
                B, start_n, N, D, stride_bn, stride_bd, BLOCK_N, BLOCK_D, DOT_FP32
            )
            logits = tl.dot(a, tl.trans(b), input_precision=PRECISION) * s
            # rows: online log-sum-exp over all columns
            row_logits = tl.where(mask_n[None, :], logits, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(row_logits, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(row_logits - m_new[:, None]), 1)
            m_i = m_new
            # columns: this row block's partial log-sum-exp
            col_logits = tl.where(mask_m[:, None], logits, float("-inf"))
            c_max = tl.max(col_logits, 0)
            c_sum = tl.sum(tl.exp(col_logits - c_max[None, :]), 0)
            tl.store(col_part_ptr + pid * stride_pm + offs_n, c_max + tl.log(c_sum), mask=mask_n)
        tl.store(row_lse_ptr + offs_m, m_i + tl.log(l_i), mask=mask_m)

    @triton.jit
    def _softmax_grad_kernel(
        A,
        B,
        scale_ptr,
        lse_a_ptr,
        lse_b_ptr,
        dA,
        dscale_ptr,
        coef,
        M,
        N,
        D,
        stride_am,
        stride_ad,
        stride_bn,
        stride_bd,
        stride_gm,
        stride_gd,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        WANT_DSCALE: tl.constexpr,
    ):
        """dA = s * G @ B and, optionally, per-row sums of G * (A @ B.T), with
        G_ij = coef * (exp(L_ij - lse_a_i) + exp(L_ij - lse_b_j))."""
        pid = tl.program_id(0)
        offs_m, mask_m, offs_d, mask_d, a = _row_tile(
            A, pid * BLOCK_M, M, D, stride_am, stride_ad, BLOCK_M, BLOCK_D, DOT_FP32
        )
        s = tl.load(scale_ptr).to(tl.float32)
        lse_a = tl.load(lse_a_ptr + offs_m, mask=mask_m, other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        ds = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n, mask_n, _, _, b = _row_tile(
                B, start_n, N, D, stride_bn, stride_bd, BLOCK_N, BLOCK_D, DOT_FP32
            )
            dots = tl.dot(a, tl.trans(b), input_precision=PRECISION)
            logits = dots * s
            lse_b = tl.load(lse_b_ptr + offs_n, mask=mask_n, other=0.0)
            g = tl.exp(logits - lse_a[:, None]) + tl.exp(logits - lse_b[None, :])
            g = tl.where(mask_m[:, None] & mask_n[None, :], g * coef, 0.0)
            acc += tl.dot(g.to(b.dtype), b, input_precision=PRECISION)
            if WANT_DSCALE:
                ds += tl.sum(g * dots, 1)
        tl.store(
            dA + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
            (acc * s).to(dA.dtype.element_ty),
            mask=mask_m[:, None] & mask_d[None, :],
        )
        if WANT_DSCALE:
            tl.store(dscale_ptr + offs_m, ds, mask=mask_m)


MAX_D = 1024  # the kernels hold a whole feature row per tile


def _blocks(d: int) -> Tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(d))
    # keep the fp32 accumulator of the gradient kernel (BLOCK_M x BLOCK_D) within registers
    block_m = 64 if block_d <= 256 else 32
    return block_m, 64, block_d


def _lse_triton(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor):
    """(row log-sum-exp of s * a @ b.T, column log-sum-exp over a's rows), fp32."""
    m, d = a.shape
    n = b.shape[0]
    bm, bn, bd = _blocks(d)
    grid = (triton.cdiv(m, bm),)
    row = torch.empty(m, device=a.device, dtype=torch.float32)
    part = torch.empty(grid[0], n, device=a.device, dtype=torch.float32)
    _lse_fwd_kernel[grid](
        a,
        b,
        scale,
        row,
        part,
        m,
        n,
        d,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        part.stride(0),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        DOT_FP32=dot_in_fp32(a.dtype),
        PRECISION=dot_precision(a.dtype),
    )
    return row, torch.logsumexp(part, 0)


def _softmax_grad_triton(a, b, scale, lse_a, lse_b, coef: float, want_dscale: bool):
    m, d = a.shape
    n = b.shape[0]
    bm, bn, bd = _blocks(d)
    grid = (triton.cdiv(m, bm),)
    # fp32: the target part is subtracted afterwards, and the two nearly cancel for easy pairs
    da = torch.empty(a.shape, device=a.device, dtype=torch.float32)
    ds = torch.empty(m if want_dscale else 1, device=a.device, dtype=torch.float32)
    _softmax_grad_kernel[grid](
        a,
        b,
        scale,
        lse_a,
        lse_b,
        da,
        ds,
        coef,
        m,
        n,
        d,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        da.stride(0),
        da.stride(1),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        DOT_FP32=dot_in_fp32(a.dtype),
        PRECISION=dot_precision(a.dtype),
        WANT_DSCALE=want_dscale,
    )
    return da, (ds.sum() if want_dscale else None)


def _lse_torch(a, b, scale):
    logits = scale.float() * a.float() @ b.float().t()
    return torch.logsumexp(logits, 1), torch.logsumexp(logits, 0)


def _softmax_grad_torch(a, b, scale, lse_a, lse_b, coef: float, want_dscale: bool):
    dots = a.float() @ b.float().t()
    logits = scale.float() * dots
    g = coef * (torch.exp(logits - lse_a[:, None]) + torch.exp(logits - lse_b[None, :]))
    return scale.float() * g @ b.float(), ((g * dots).sum() if want_dscale else None)


def _gather(t: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.cat(out)


class _Contrastive(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, y, scale, label_smoothing: float, group, distributed: bool, grad_reduction: str
    ):
        fused = use_triton(x, y, scale)
        lse, grad = (
            (_lse_triton, _softmax_grad_triton) if fused else (_lse_torch, _softmax_grad_torch)
        )
        ctx.scale_shape, ctx.scale_dtype = scale.shape, scale.dtype
        scale = scale.detach().float().reshape(())
        if distributed:
            rank = dist.get_rank(group)
            xs, ys = _gather(x.detach(), group), _gather(y.detach(), group)
        else:
            rank, xs, ys = 0, x.detach(), y.detach()
        local, total = x.shape[0], xs.shape[0]
        row_lse, col_lse_part = lse(x, ys, scale)  # local rows vs every column
        if distributed:
            col_lse = torch.logsumexp(_gather(col_lse_part[None], group), 0)
            row_all = _gather(row_lse, group)
        else:
            col_lse, row_all = col_lse_part, row_lse
        mine = slice(rank * local, (rank + 1) * local)
        e = label_smoothing
        xf, yf = x.float(), y.float()
        xsum, ysum = xs.float().sum(0), ys.float().sum(0)
        diag = (xf * yf).sum(1)
        # cross-entropy terms: lse - (1 - e) * L_ii - e / B * sum_j L_ij, rows and columns
        rows = row_lse - scale * ((1 - e) * diag + e / total * (xf @ ysum))
        cols = col_lse[mine] - scale * ((1 - e) * diag + e / total * (yf @ xsum))
        loss = (rows.sum() + cols.sum()) / (2 * total)
        if distributed:
            dist.all_reduce(loss, group=group)
        ctx.save_for_backward(x, y, xs, ys, scale, row_lse, col_lse, row_all, xsum, ysum, diag)
        ctx.grad_fn_, ctx.mine, ctx.e, ctx.total = grad, mine, e, total
        # under a data-parallel mean, each rank's share must count world times to sum to the global
        # gradient
        ctx.grad_mult = (
            dist.get_world_size(group) if distributed and grad_reduction == "mean" else 1
        )
        return loss

    @staticmethod
    def backward(ctx, gout):
        x, y, xs, ys, scale, row_lse, col_lse, row_all, xsum, ysum, diag = ctx.saved_tensors
        grad, mine, e, total = ctx.grad_fn_, ctx.mine, ctx.e, ctx.total
        c = gout.float() * ctx.grad_mult / (2 * total)
        dx, ds = grad(x, ys, scale, row_lse, col_lse, float(c), True)
        dy, _ = grad(y, xs, scale, col_lse[mine], row_all, float(c), False)
        # the target part of G: -2c * ((1 - e) * identity + e / B * ones)
        t = 2 * c * scale
        dx = dx - t * ((1 - e) * y.float() + e / total * ysum)
        dy = dy - t * ((1 - e) * x.float() + e / total * xsum)
        ds = ds - 2 * c * ((1 - e) * diag.sum() + e / total * (x.float() @ ysum).sum())
        return (
            dx.to(x.dtype),
            dy.to(y.dtype),
            ds.reshape(ctx.scale_shape).to(ctx.scale_dtype),
            None,
            None,
            None,
            None,
        )


def contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    label_smoothing: float = 0.0,
    group: Optional[object] = None,
    distributed: Optional[bool] = None,
    grad_reduction: str = "mean",
) -> torch.Tensor:
    """Symmetric InfoNCE over the (global) batch; `logit_scale` is the multiplier s (exp of CLIP's
    learnable log-scale). `distributed=None` means: gather across `group` when a process group
    with more than one rank is initialised. Same value on every rank. `grad_reduction` says how
    the caller reduces parameter gradients across ranks, "mean" (DeepSpeed, DDP) or "sum": the
    gradients each rank receives are scaled so that this reduction yields the global-batch
    gradient (see the module docstring)."""
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(
            f"image and text features must both be B x D, got {tuple(image.shape)} and "
            f"{tuple(text.shape)}"
        )
    if image.dtype != text.dtype:
        raise ValueError(
            f"image and text features must share a dtype, got {image.dtype} and {text.dtype}"
        )
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must hold one value, got shape {tuple(logit_scale.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if grad_reduction not in ("mean", "sum"):
        raise ValueError(f"grad_reduction must be 'mean' or 'sum', got {grad_reduction!r}")
    if distributed is None:
        distributed = (
            dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        )
    if image.shape[1] > MAX_D and use_triton(image):
        raise ValueError(
            f"feature dimension {image.shape[1]} > {MAX_D}: project the features first"
        )
    return _Contrastive.apply(
        image, text, logit_scale, label_smoothing, group, distributed, grad_reduction
    )


class ContrastiveLoss(nn.Module):
    """CLIP's loss with its learnable temperature: s = exp(log_scale), clamped to `max_scale`."""

    def __init__(
        self,
        init_scale: float = 1 / 0.07,
        max_scale: float = 100.0,
        label_smoothing: float = 0.0,
        distributed: Optional[bool] = None,
        group=None,
        grad_reduction: str = "mean",
    ):
        super().__init__()
        # shape (1,), not a 0-d tensor: DeepSpeed's parameter broadcast cannot view 0-d tensors as
        # bytes
        self.log_scale = nn.Parameter(torch.tensor([float(init_scale)]).log())
        self.max_log_scale = float(torch.tensor(max_scale).log())
        self.label_smoothing, self.distributed, self.group = label_smoothing, distributed, group
        self.grad_reduction = grad_reduction

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scale = self.log_scale.clamp(max=self.max_log_scale).exp()
        return contrastive_loss(
            image,
            text,
            scale,
            self.label_smoothing,
            self.group,
            self.distributed,
            self.grad_reduction,
        )
