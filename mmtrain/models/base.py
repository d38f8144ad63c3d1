"""`EntryPoints`: a model with several named entry points, each a method with its own signature;
`to_precision`: a module's weights in a precision, its buffers left as they are.

A recipe calls `model("embed", ...)` rather than a method directly: the call goes through
`forward`, so whatever wraps the module (DeepSpeed's engine, with the ZeRO-3 parameter gathers
it runs around a forward; hooks) wraps every entry point the same way.
"""

from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import nn


class EntryPoints(nn.Module):
    """Subclass, name the public methods in `entry_points`, and call `model(name, ...)`."""

    entry_points: Tuple[str, ...] = ()

    def forward(self, entry: str, *args: Any, **kwargs: Any) -> Any:
        if entry not in self.entry_points:
            raise ValueError(
                f"{type(self).__name__} has no entry point {entry!r} (it has {self.entry_points})"
            )
        return getattr(self, entry)(*args, **kwargs)


def to_precision(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`module` on `device` with its floating-point *parameters* in `dtype`; buffers keep theirs.
    `module.to(device, dtype)` also casts buffers: RoPE's `inv_freq` in bf16 is off by up to
    0.4%, which thousands of positions turn into wrong rotations (training never casts it).
    Cast before the move, so that the device receives the weights in `dtype` only."""
    for p in module.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return module.to(device)
