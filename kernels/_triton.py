"""When the Triton path can run, and the switches the CPU interpreter needs."""

from __future__ import annotations

import os
from typing import Dict, Optional

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


def capability(device) -> tuple:
    """The GPU's compute capability (a function of its own, for the tests to stand in for)."""
    return torch.cuda.get_device_capability(device)


def check_tensor_cores(*tensors: torch.Tensor) -> None:
    """bf16 `tl.dot` needs bf16 tensor cores (compute capability 8.0, Ampere, or newer): on an
    older GPU say so in one line, naming the dtype and the fix, before Triton fails to compile."""
    for t in tensors:
        if t.is_cuda and t.dtype == torch.bfloat16:
            major, minor = capability(t.device)
            if major < 8:
                raise ValueError(
                    f"bf16 features on a GPU of compute capability {major}.{minor}, whose tensor "
                    f"cores have no bf16 (8.0, Ampere, or newer needed): train in fp16 "
                    f"(deepspeed.precision=fp16) or fp32 on this GPU"
                )


def launch(kernel, grid, args, kwargs, pinned: Optional[Dict[str, int]] = None) -> None:
    """Runs an autotuned kernel; with `pinned` (deterministic=True on a GPU) it runs that one
    configuration instead of the autotuner's pick, which each process times for itself and so
    can differ between runs and ranks (and so can the last bits of a result)."""
    if pinned is None or interpreting():  # the interpreter has one configuration anyway
        kernel[grid](*args, **kwargs)
        return
    meta = dict(pinned)
    kernel.fn[grid(meta) if callable(grid) else grid](*args, **kwargs, **meta)


def chosen_config(kernel) -> Optional[str]:
    """The configuration the autotuner chose in this process (None before its first run)."""
    best = getattr(kernel, "best_config", None)
    return str(best) if best is not None else None


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
