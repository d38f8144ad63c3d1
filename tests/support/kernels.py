"""Comparisons shared by the kernel tests (unit and 2-rank)."""

import torch
import torch.nn.functional as F

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
