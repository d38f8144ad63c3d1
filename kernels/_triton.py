"""When the Triton path can run, and the switches the CPU interpreter needs."""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # a CPU-only environment without triton: the torch fallbacks serve
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; otherwise torch."""
    if not HAS_TRITON:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in tensors)


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """fp32 tiles for fp32 inputs; half-precision tiles on the tensor cores otherwise, except
    bf16 under the interpreter, whose bf16 `tl.dot` is wrong (triton 3.9 + numpy 2.4: numpy has
    no bf16) and is cast to fp32 there. fp16 runs its real half-precision path in both."""
    return dtype == torch.float32 or (interpreting() and dtype == torch.bfloat16)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 switch for matmuls; half inputs use the tensor cores as they are."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
