"""Fused symmetric InfoNCE (CLIP's contrastive loss) whose B x B logits never exist in memory.

With L = s * X @ Y.T (B x B, never stored), c = dloss / (2B) and label smoothing e:
    loss = ( sum_i lse_row_i + sum_j lse_col_j - 2 * sum_i t_i ) / (2B),
    t_i  = (1 - e) * L_ii + e / B * sum_j L_ij,
    G    = dloss/dL = c * (exp(L - lse_row) + exp(L - lse_col)) - 2c * ((1 - e) * I + e / B),
    dX = s * G @ Y,   dY = s * G.T @ X,   ds = sum(G * X @ Y.T).

Forward, one pass (2 B^2 D FLOPs): P persistent programs each walk their own row blocks against
every column block, tile by tile; a logit tile is accumulated over D in BLOCK_D chunks (any D),
the row log-sum-exp and t_i are accumulated online, and each program merges its tiles' column
log-sum-exps into its own row of a P x B buffer, which a small kernel reduces to lse_col.
Every program always owns the same row of that buffer and walks its rows in the same order, so
the result is deterministic, and its size does not grow with B / BLOCK_M.

Backward, one recompute (6 B^2 D FLOPs): a program owns a block of X's rows; for each column
block it recomputes the logit tile once, forms G (the target part included) and adds G @ Y_blk
into its own rows of dX (plain fp32 loads and stores: nobody else writes them) and
G.T @ X_blk into dY with fp32 atomic adds. So a forward and backward execute 8 B^2 D FLOPs
against the 6 B^2 D of useful work (the logits and the two gradient GEMMs). `executed_flops`
says it for any configuration.

Atomic adds make dY's last bits depend on the order in which programs finish on a GPU.
`deterministic=True` computes dY instead in a second pass of the same kernel with the roles of
X and Y swapped (G.T has the same form): bitwise reproducible, 10 B^2 D FLOPs. Under the CPU
interpreter programs run in order, so both paths are deterministic there.

Peak memory above the inputs (bytes; es = input element size; P = forward programs; see
`peak_extra_bytes`): max of
    forward:  4 B (P + 3)                       row lse, t, column partials, column lse
    backward: 8 B + 8 B D + 2 B D es + B / 8    saved lse, fp32 dX and dY, dX and dY in es
                                                (no copies for fp32 inputs), partial ds
— O(B) in B at fixed D. (Inf-CL's target; the first design kept (B / BLOCK_M) x B partials.)

Tiles: BLOCK_M x BLOCK_N logits with BLOCK_D chunks of the features, fp32 accumulation;
`@triton.autotune` over BLOCK_M/N/D, num_warps and num_stages on a GPU (keyed on B and D),
one small fixed configuration under the interpreter (several configurations fail there).

Distributed: each rank gathers all features, computes its own rows against all columns, and the
column/row log-sum-exps are combined across ranks (B floats each). The gradient of the global
loss with respect to this rank's features needs no further communication: dX from its rows
against all columns, dY from all rows against its columns (two passes of the one kernel,
10 Bl B D FLOPs per rank; the alternative, one pass plus a reduce-scatter of a B x D fp32
buffer, trades that recompute for communication). The logit-scale gradient splits into
per-rank shares that sum to the global one. What each rank receives depends on how the caller
reduces gradients across ranks (`grad_reduction`):
- "mean" (default; what DeepSpeed and DDP do): world_size x (dL/d local features) and
  world_size x (this rank's share of dL/ds). After the data-parallel mean over ranks, every
  parameter upstream of the loss holds exactly the gradient of the global-batch loss — the same
  as one process over the whole batch, at any world size.
- "sum": dL/d local features and this rank's share of dL/ds, unscaled; the sum over ranks is the
  global gradient.
The returned value is the global loss on every rank, whatever the reduction.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from kernels._triton import (
    HAS_TRITON,
    check_tensor_cores,
    dot_in_fp32,
    dot_precision,
    interpreting,
    launch,
    use_triton,
)

# the interpreter's one configuration: small tiles, so that the tests walk several row, column
# and feature blocks at small shapes
INTERPRETER_BLOCKS = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=16)
MIN_BLOCK_M = 32  # the smallest BLOCK_M of any configuration: sizes the per-program buffers


# GPU candidates, chosen without a GPU by what compiles for sm_90 without register spills
# (cuobjdump's resource usage, triton 3.9): BLOCK_D = 32 with 8 warps keeps the fp32 logit tile,
# its exponentials and the gradient chunks in registers. (128, 128, 32) spills a little but
# feeds the largest tensor-core instructions; autotuning decides on the GPU.
FORWARD_TILES = [(128, 64, 32, 8), (64, 128, 32, 8), (64, 128, 64, 8), (64, 64, 64, 8),
                 (64, 64, 32, 4), (128, 128, 32, 8)]  # fmt: skip
BACKWARD_TILES = [(128, 64, 32, 8), (64, 128, 32, 8), (64, 64, 32, 8), (64, 64, 32, 4),
                  (64, 64, 64, 8), (128, 128, 32, 8)]  # fmt: skip
# deterministic=True on a GPU: this one configuration (in both tile lists), never the autotuner's
# timed pick, so that two runs, or two ranks, compute the same bits
PINNED = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, num_warps=4, num_stages=2)


def _configs(tiles):
    if interpreting():
        return [triton.Config(dict(INTERPRETER_BLOCKS), num_warps=4, num_stages=1)]
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd), num_warps=w, num_stages=st)
        for bm, bn, bd, w in tiles
        for st in (2, 3)
    ]


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _chunk(ptr, offs_r, mask_r, offs_d, mask_d, stride_r, stride_d):
        """Rows offs_r, features offs_d of a 2-D tensor (masked lanes 0)."""
        return tl.load(
            ptr + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d,
            mask=mask_r[:, None] & mask_d[None, :],
            other=0.0,
        )

    @triton.jit
    def _logit_tile(
        A,
        B,
        offs_m,
        mask_m,
        offs_n,
        mask_n,
        D,
        stride_am,
        stride_ad,
        stride_bn,
        stride_bd,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """A[offs_m] @ B[offs_n].T in fp32, the features walked in BLOCK_D chunks."""
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for start_d in range(0, D, BLOCK_D):
            offs_d = start_d + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            a = _chunk(A, offs_m, mask_m, offs_d, mask_d, stride_am, stride_ad)
            b = _chunk(B, offs_n, mask_n, offs_d, mask_d, stride_bn, stride_bd)
            if DOT_FP32:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
        return acc

    @triton.autotune(configs=_configs(FORWARD_TILES), key=["M", "N", "D"])
    @triton.jit
    def _fwd_kernel(
        A,
        B,
        scale_ptr,
        row_lse_ptr,
        target_ptr,
        col_part_ptr,
        bsum_ptr,
        M,
        N,
        D,
        a_offset,
        t_diag,
        t_all,
        stride_am,
        stride_ad,
        stride_bn,
        stride_bd,
        stride_pp,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Per row of A: lse over all columns and t = t_diag * L_ii + t_all * sum_j L_ij; per
        program: the log-sum-exp of each column over the rows it walked (its row of col_part)."""
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        s = tl.load(scale_ptr).to(tl.float32)
        part = col_part_ptr + pid * stride_pp
        for start_n in range(0, N, BLOCK_N):  # idempotent: this program's columns start empty
            offs_n = start_n + tl.arange(0, BLOCK_N)
            tl.store(part + offs_n, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=offs_n < N)
        for block in range(pid, tl.cdiv(M, BLOCK_M), programs):
            tl.debug_barrier()  # the program's earlier stores to `part` are seen by all its threads
            offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            # t = s * <a_i, t_diag * b_(i + a_offset) + t_all * sum_j b_j>: O(BLOCK_M D), no tiles
            t_i = tl.zeros([BLOCK_M], tl.float32)
            mask_diag = mask_m & (offs_m + a_offset < N)
            for start_d in range(0, D, BLOCK_D):
                offs_d = start_d + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                a = _chunk(A, offs_m, mask_m, offs_d, mask_d, stride_am, stride_ad).to(tl.float32)
                b = _chunk(B, offs_m + a_offset, mask_diag, offs_d, mask_d, stride_bn, stride_bd)
                b = b.to(tl.float32)
                bsum = tl.load(bsum_ptr + offs_d, mask=mask_d, other=0.0)
                t_i += tl.sum(a * (t_diag * b + t_all * bsum[None, :]), 1)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            for start_n in range(0, N, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                mask_n = offs_n < N
                logits = s * _logit_tile(
                    A, B, offs_m, mask_m, offs_n, mask_n, D, stride_am, stride_ad, stride_bn,
                    stride_bd, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PRECISION,
                )  # fmt: skip
                # one mask for both directions: padded rows and columns get a finite floor (their
                # own results are never stored; -inf would make them NaN), exp() of which is 0
                logits = tl.where(mask_m[:, None] & mask_n[None, :], logits, -1.0e30)
                # rows: online log-sum-exp over every column
                m_new = tl.maximum(m_i, tl.max(logits, 1))
                l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
                m_i = m_new
                # columns: merge this tile's log-sum-exp into the program's running one
                c_max = tl.max(logits, 0)
                tile = c_max + tl.log(tl.sum(tl.exp(logits - c_max[None, :]), 0))
                old = tl.load(part + offs_n, mask=mask_n, other=0.0)
                top = tl.maximum(old, tile)
                merged = top + tl.log(tl.exp(old - top) + tl.exp(tile - top))
                tl.store(part + offs_n, merged, mask=mask_n)
            tl.store(row_lse_ptr + offs_m, m_i + tl.log(l_i), mask=mask_m)
            tl.store(target_ptr + offs_m, s * t_i, mask=mask_m)

    @triton.jit
    def _lse_rows_kernel(part_ptr, out_ptr, P, N, stride_pp, BLOCK_N: tl.constexpr):
        """out_j = log-sum-exp over the P rows of the column partials (in a fixed order)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for p in range(0, P):
            v = tl.load(part_ptr + p * stride_pp + offs_n, mask=mask_n, other=0.0)
            top = tl.maximum(m, v)
            safe = tl.where(top == float("-inf"), 0.0, top)  # a column no program reached yet
            acc = acc * tl.exp(m - safe) + tl.exp(v - safe)
            m = top
        tl.store(out_ptr + offs_n, m + tl.log(acc), mask=mask_n)

    @triton.autotune(
        configs=_configs(BACKWARD_TILES), key=["M", "N", "D"], reset_to_zero=["dA", "dB", "ds_ptr"]
    )
    @triton.jit
    def _bwd_kernel(
        A,
        B,
        scale_ptr,
        lse_a_ptr,
        lse_b_ptr,
        dA,
        dB,
        ds_ptr,
        coef,
        t_diag,
        t_all,
        g_scale,
        M,
        N,
        D,
        a_offset,
        stride_am,
        stride_ad,
        stride_bn,
        stride_bd,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        ATOMIC_DB: tl.constexpr,
    ):
        """For this program's rows of A, with G_ij = coef * (exp(L_ij - lse_a_i) + exp(L_ij -
        lse_b_j)) - t_diag * [a_offset + i == j] - t_all: dA += s * G @ B (its own rows, fp32,
        contiguous M x D), and with ATOMIC_DB also dB += s * G.T @ A (atomics, N x D); ds_ptr[pid]
        = sum(G * A @ B.T). Each logit tile is computed once. A half-precision G is cast from
        G * g_scale (a power of two that brings its largest entry near 2**14): G's entries are
        about coef / B, which fp16 would flush to zero at large B; the dot's fp32 result is
        divided by g_scale again, exactly."""
        pid = tl.program_id(0)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        s = tl.load(scale_ptr).to(tl.float32)
        lse_a = tl.load(lse_a_ptr + offs_m, mask=mask_m, other=0.0)
        ds = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            logits = s * _logit_tile(
                A, B, offs_m, mask_m, offs_n, mask_n, D, stride_am, stride_ad, stride_bn,
                stride_bd, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, PRECISION,
            )  # fmt: skip
            lse_b = tl.load(lse_b_ptr + offs_n, mask=mask_n, other=0.0)
            g = coef * (tl.exp(logits - lse_a[:, None]) + tl.exp(logits - lse_b[None, :]))
            g -= tl.where((offs_m[:, None] + a_offset) == offs_n[None, :], t_diag, 0.0) + t_all
            g = tl.where(mask_m[:, None] & mask_n[None, :], g, 0.0)
            ds += tl.sum(g * logits, 1)  # sum(G * dots) = sum(G * logits) / s, divided at the end
            if DOT_FP32:
                g_dot = g
            else:
                g_dot = (g * g_scale).to(A.dtype.element_ty)
            for start_d in range(0, D, BLOCK_D):
                offs_d = start_d + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                b = _chunk(B, offs_n, mask_n, offs_d, mask_d, stride_bn, stride_bd)
                if DOT_FP32:
                    b = b.to(tl.float32)
                da_ptr = dA + offs_m[:, None] * D + offs_d[None, :]
                da_mask = mask_m[:, None] & mask_d[None, :]
                da = tl.load(da_ptr, mask=da_mask, other=0.0)
                da += (s / g_scale) * tl.dot(g_dot, b, input_precision=PRECISION)
                tl.store(da_ptr, da, mask=da_mask)
                if ATOMIC_DB:
                    a = _chunk(A, offs_m, mask_m, offs_d, mask_d, stride_am, stride_ad)
                    if DOT_FP32:
                        a = a.to(tl.float32)
                    db = (s / g_scale) * tl.dot(tl.trans(g_dot), a, input_precision=PRECISION)
                    tl.atomic_add(
                        dB + offs_n[:, None] * D + offs_d[None, :],
                        db,
                        mask=mask_n[:, None] & mask_d[None, :],
                    )
            tl.debug_barrier()  # this tile's stores to dA are seen by every thread of the next
        tl.store(ds_ptr + pid, tl.sum(ds, 0) / s)


def forward_programs(m: int, device: torch.device) -> int:
    """How many persistent programs the forward runs (rows of its column-partial buffer)."""
    if device.type == "cuda":
        limit = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        limit = 4  # the interpreter: few, so that each program walks several row blocks
    return max(1, min(limit, math.ceil(m / MIN_BLOCK_M)))


def peak_extra_bytes(b: int, d: int, element_size: int, programs: int) -> int:
    """The fused path's peak memory above its inputs for one forward and backward (one process):
    the larger of the forward's (row lse, t, P column partials, column lse) and the backward's
    (saved lse, fp32 dX and dY, their copies in the inputs' dtype unless that is fp32). O(B) at
    fixed D and P."""
    forward = 4 * b * (programs + 3)
    partial_ds = 4 * math.ceil(b / MIN_BLOCK_M)
    backward = 8 * b + 8 * b * d + (2 * b * d * element_size if element_size != 4 else 0)
    backward += partial_ds
    return max(forward, backward)


def executed_flops(b: int, d: int, deterministic: bool = False) -> int:
    """FLOPs a forward and backward execute over a B x D batch (one process): the logits once
    forward, once in the backward, and the two gradient GEMMs; a second recompute when
    deterministic."""
    return (10 if deterministic else 8) * b * b * d


def _lse_triton(a, b, scale, a_offset: int, t_diag: float, t_all: float, pinned: bool = False):
    """(row lse, target term t, column lse over a's rows) of s * a @ b.T, fp32; `pinned`: the
    PINNED configuration instead of the autotuner's."""
    m, d = a.shape
    n = b.shape[0]
    programs = forward_programs(m, a.device)
    row = torch.empty(m, device=a.device, dtype=torch.float32)
    target = torch.empty(m, device=a.device, dtype=torch.float32)
    part = torch.empty(programs, n, device=a.device, dtype=torch.float32)
    bsum = b.sum(0, dtype=torch.float32)
    args = (
        a, b, scale, row, target, part, bsum, m, n, d, a_offset, t_diag, t_all,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), part.stride(0),
    )  # fmt: skip
    kwargs = dict(DOT_FP32=dot_in_fp32(a.dtype), PRECISION=dot_precision(a.dtype))
    launch(_fwd_kernel, (programs,), args, kwargs, PINNED if pinned else None)
    col = torch.empty(n, device=a.device, dtype=torch.float32)
    block = 128
    _lse_rows_kernel[(triton.cdiv(n, block),)](
        part, col, programs, n, part.stride(0), BLOCK_N=block
    )
    return row, target, col


def _grad_triton(
    a, b, scale, lse_a, lse_b, coef, t_diag, t_all, a_offset: int, both: bool, pinned: bool = False
):
    """(dA, dB or None, ds) in fp32: dA = s * G @ b, dB = s * G.T @ a (when `both`, from the same
    logit tiles), ds = sum(G * a @ b.T)."""
    m, d = a.shape
    n = b.shape[0]
    da = torch.zeros(m, d, device=a.device, dtype=torch.float32)
    db = torch.zeros(n, d, device=a.device, dtype=torch.float32) if both else da
    ds = torch.zeros(triton.cdiv(m, MIN_BLOCK_M), device=a.device, dtype=torch.float32)
    dot_fp32 = dot_in_fp32(a.dtype)
    # |G| <= 2 coef + t_diag + t_all; scaled so that bound is about 2**14 (fp16's largest is 65504)
    g_scale = 1.0 if dot_fp32 else 2.0 ** (14 - math.ceil(math.log2(2 * coef + t_diag + t_all)))
    args = (
        a, b, scale, lse_a, lse_b, da, db, ds, coef, t_diag, t_all, g_scale, m, n, d, a_offset,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
    )  # fmt: skip
    kwargs = dict(DOT_FP32=dot_fp32, PRECISION=dot_precision(a.dtype), ATOMIC_DB=both)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    launch(_bwd_kernel, grid, args, kwargs, PINNED if pinned else None)
    return da, (db if both else None), ds.sum()


def _lse_torch(a, b, scale, a_offset: int, t_diag: float, t_all: float):
    logits = scale.float() * a.float() @ b.float().t()
    diag = torch.arange(a.shape[0], device=a.device) + a_offset
    target = t_diag * logits.gather(1, diag[:, None])[:, 0] + t_all * logits.sum(1)
    return torch.logsumexp(logits, 1), target, torch.logsumexp(logits, 0)


def _grad_torch(a, b, scale, lse_a, lse_b, coef, t_diag, t_all, a_offset: int, both: bool):
    dots = a.float() @ b.float().t()
    logits = scale.float() * dots
    g = coef * (torch.exp(logits - lse_a[:, None]) + torch.exp(logits - lse_b[None, :])) - t_all
    rows = torch.arange(a.shape[0], device=a.device)
    g[rows, rows + a_offset] -= t_diag
    db = scale.float() * g.t() @ a.float() if both else None
    return scale.float() * g @ b.float(), db, (g * dots).sum()


def _gather(t: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.cat(out)


class _Contrastive(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        y,
        scale,
        label_smoothing: float,
        group,
        distributed: bool,
        grad_reduction: str,
        deterministic: bool,
    ):
        fused = use_triton(x, y, scale)
        if fused:  # deterministic: one pinned configuration, not each process's timed pick
            lse = functools.partial(_lse_triton, pinned=deterministic)
            grad = functools.partial(_grad_triton, pinned=deterministic)
        else:
            lse, grad = _lse_torch, _grad_torch
        ctx.scale_shape, ctx.scale_dtype = scale.shape, scale.dtype
        scale = scale.detach().float().reshape(())
        if distributed:
            rank = dist.get_rank(group)
            xs, ys = _gather(x.detach(), group), _gather(y.detach(), group)
        else:
            rank, xs, ys = 0, x.detach(), y.detach()
        local, total = x.shape[0], xs.shape[0]
        e = label_smoothing
        # local rows against every column; t = (1 - e) L_ii + e / B sum_j L_ij for those rows
        row_lse, target, col_lse = lse(x, ys, scale, rank * local, 1 - e, e / total)
        if distributed:
            col_lse = torch.logsumexp(_gather(col_lse[None], group), 0)
            row_all = _gather(row_lse, group)
        else:
            row_all = row_lse
        mine = slice(rank * local, (rank + 1) * local)
        # summed over ranks, the target terms of the rows equal those of the columns
        loss = (row_lse.sum() + col_lse[mine].sum() - 2 * target.sum()) / (2 * total)
        if distributed:
            dist.all_reduce(loss, group=group)
        ctx.save_for_backward(x, y, xs, ys, scale, row_lse, col_lse, row_all)
        ctx.grad_fn_, ctx.e, ctx.total, ctx.offset = grad, e, total, rank * local
        ctx.one_pass = not distributed and not deterministic
        # under a data-parallel mean, each rank's share must count world times to sum to the global
        # gradient
        ctx.grad_mult = (
            dist.get_world_size(group) if distributed and grad_reduction == "mean" else 1
        )
        return loss

    @staticmethod
    def backward(ctx, gout):
        x, y, xs, ys, scale, row_lse, col_lse, row_all = ctx.saved_tensors
        grad, e, total, offset = ctx.grad_fn_, ctx.e, ctx.total, ctx.offset
        # every gradient is linear in gout: computed for gout = 1 and scaled on the device after,
        # so the backward reads nothing on the host
        c = ctx.grad_mult / (2 * total)
        t_diag, t_all = 2 * c * (1 - e), 2 * c * e / total
        mine = slice(offset, offset + x.shape[0])
        # this rank's rows against every column: dX (and, in one process, dY from the same tiles)
        dx, dy, ds = grad(x, ys, scale, row_lse, col_lse, c, t_diag, t_all, offset, ctx.one_pass)
        if dy is None:  # every row against this rank's columns: G.T has the same form
            dy, _, _ = grad(y, xs, scale, col_lse[mine], row_all, c, t_diag, t_all, offset, False)
        g = gout.float()  # in place: the backward's peak memory stays as its formula says
        return (
            dx.mul_(g).to(x.dtype),
            dy.mul_(g).to(y.dtype),
            ds.mul_(g).reshape(ctx.scale_shape).to(ctx.scale_dtype),
            None,
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
    deterministic: bool = False,
) -> torch.Tensor:
    """Symmetric InfoNCE over the (global) batch; `logit_scale` is the multiplier s (exp of CLIP's
    learnable log-scale). `distributed=None` means: gather across `group` when a process group
    with more than one rank is initialised. Same value on every rank. `grad_reduction` says how
    the caller reduces parameter gradients across ranks, "mean" (DeepSpeed, DDP) or "sum": the
    gradients each rank receives are scaled so that this reduction yields the global-batch
    gradient (see the module docstring). `deterministic=True`: no atomic adds in the backward
    (bitwise reproducible on a GPU, one more recompute)."""
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
    check_tensor_cores(image)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if grad_reduction not in ("mean", "sum"):
        raise ValueError(f"grad_reduction must be 'mean' or 'sum', got {grad_reduction!r}")
    if distributed is None:
        distributed = (
            dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        )
    world = dist.get_world_size(group) if distributed else 1
    if image.shape[0] * world * image.shape[1] >= 2**31 and use_triton(image):
        raise ValueError(
            f"the kernels index B x D = {image.shape[0] * world} x {image.shape[1]} features with "
            "int32: keep the global batch times the feature width under 2^31"
        )
    return _Contrastive.apply(
        image, text, logit_scale, label_smoothing, group, distributed, grad_reduction, deterministic
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
        deterministic: bool = False,
    ):
        super().__init__()
        # shape (1,), not a 0-d tensor: DeepSpeed's parameter broadcast cannot view 0-d tensors as
        # bytes
        self.log_scale = nn.Parameter(torch.tensor([float(init_scale)]).log())
        self.max_log_scale = float(torch.tensor(max_scale).log())
        self.label_smoothing, self.distributed, self.group = label_smoothing, distributed, group
        self.grad_reduction, self.deterministic = grad_reduction, deterministic

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
            self.deterministic,
        )
