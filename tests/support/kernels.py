"""Comparisons shared by the kernel tests (unit and 2-rank).

`close(a, b, dtype, reduction)` allows `max |a - b| <= tolerance(dtype, reduction) * max |b|`
(plus a floor of 1e-12 for an all-zero reference): each tensor is judged on its own scale, so a
gradient of magnitude 1e-4 gets a bound of the same order, never an absolute 1e-2 that an
all-zero gradient would pass. The tolerance has two parts:
- the output's rounding: the kernel and the reference each round to `dtype` at the end, an
  element of magnitude m by up to m x eps / 2 each way, so two ulps at the tensor's largest
  element (2 x eps: bf16 1.6e-2, fp16 2.0e-3, fp32 2.4e-7) cover both;
- the accumulation: both sum in fp32 in a different order; the difference grows as
  sqrt(reduction length) x fp32 eps (random-walk rounding), with a factor 8 of margin
  (reduction 4,096: 6.1e-5).
`mutations(g)` are the wrong answers the helper must reject at every tested dtype and size: an
all-zero gradient, a doubled one, and the gradient of the other input (the transposed logits).
"""

import math

import pytest
import torch
import torch.nn.functional as F

FLOOR = 1e-12

# Where the kernel tests run: natively on a GPU when there is one (tests/unit/kernels/conftest.py
# makes it torch's default device there), else under the Triton interpreter on the CPU
# (tests/conftest.py sets TRITON_INTERPRET=1 only on a machine without CUDA).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
interpreter_only = pytest.mark.skipif(
    DEVICE == "cuda", reason="counts what the Triton interpreter executes (CPU machines)"
)


def gen(seed: int) -> torch.Generator:
    """A seeded generator on the tests' device (the values differ between devices)."""
    return torch.Generator(device=DEVICE).manual_seed(seed)


def tolerance(dtype: torch.dtype, reduction: int = 1) -> float:
    rounding = 2 * torch.finfo(dtype).eps
    accumulation = 8 * torch.finfo(torch.float32).eps * math.sqrt(max(1, reduction))
    return rounding + accumulation


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b| (the figure `close` bounds)."""
    a, b = a.float(), b.float()
    return (a - b).abs().max().item() / max(b.abs().max().item(), FLOOR)


def close(
    a: torch.Tensor,
    b: torch.Tensor,
    dtype: torch.dtype,
    reduction: int = 1,
    at_least: float = 0.0,
) -> None:
    """`at_least`: a scale for a reference that is 0 by cancellation (a loss of one pair: its
    logits, of size s, cancel), whose rounding is that of the terms, not of the result."""
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    a, b = a.float(), b.float()
    scale = max(b.abs().max().item(), at_least)
    err = (a - b).abs().max().item()
    bound = tolerance(dtype, reduction) * scale + FLOOR
    assert err <= bound, (
        f"max |a - b| = {err:.3g} > {bound:.3g} = {tolerance(dtype, reduction):.2g} x max |b| "
        f"({scale:.3g}), {dtype}, reduction {reduction}"
    )


def mutations(g: torch.Tensor, other: torch.Tensor):
    """(name, wrong gradient) pairs that `close` must reject against `g`."""
    return [("zero", torch.zeros_like(g)), ("doubled", 2 * g), ("transposed", other)]


def assert_rejects_mutations(g, other, dtype, reduction: int, where: str) -> None:
    """`close` accepts `g` rounded to `dtype` and rejects each of its mutations."""
    close(g.to(dtype), g, dtype, reduction)  # the rounding alone passes
    for name, wrong in mutations(g, other):
        try:
            close(wrong.to(dtype), g, dtype, reduction)
        except AssertionError:
            continue
        raise AssertionError(f"a {name} gradient passed the comparison at {dtype}, {where}")


def feats(b, d, dtype, seed=0, transpose=False):
    x = F.normalize(torch.randn(b, d, generator=gen(seed), device=DEVICE), dim=-1)
    if transpose:  # the same values through a non-contiguous (column-major) view
        x = x.t().contiguous().t()
    return x.to(dtype).requires_grad_()
