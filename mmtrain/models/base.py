"""`EntryPoints`: a model with several named entry points, each a method with its own signature.

A recipe calls `model("embed", ...)` rather than a method directly: the call goes through
`forward`, so whatever wraps the module (DeepSpeed's engine, with the ZeRO-3 parameter gathers
it runs around a forward; hooks) wraps every entry point the same way.
"""

from __future__ import annotations

from typing import Any, Tuple

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
