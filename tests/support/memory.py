"""Peak bytes of tensor storage allocated by torch operations, on any device (CPU included).

A TorchDispatchMode sees every tensor an operation creates; a storage counts from the first
tensor seen on it until the last tensor on it is gone. What Triton's interpreter copies into
numpy is not counted: on a GPU those are the kernels' own registers and shared memory.
"""

from __future__ import annotations

import weakref
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakAllocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: Dict[int, list] = {}  # storage address -> [bytes, live tensor count]

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view, an in-place result or `set_`: no new memory
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            key = t.untyped_storage().data_ptr()
            if key not in self._live:
                self._live[key] = [t.untyped_storage().nbytes(), 0]
                self.current += self._live[key][0]
                self.peak = max(self.peak, self.current)
            self._live[key][1] += 1
            weakref.finalize(t, self._release, key)
        return out
