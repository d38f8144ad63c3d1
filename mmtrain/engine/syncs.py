"""Counting host syncs: the places where the CPU waits for the device to hand it a value.

On a GPU every `.item()`, `.tolist()`, `bool(t)`, `float(t)` or `int(t)` of a device tensor
stalls the CPU thread until the device has caught up; under ZeRO-3 that thread also issues the
parameter prefetches, so each sync in the training step empties the pipeline. The engine's
budget is one sync per optimizer step outside log steps (the step's finiteness and stop flags,
read together); docs/design.md has it.

`log.count_host_syncs: true` wraps those Tensor methods for the run (any caller: the engine, the
recipe, DeepSpeed) and logs how many each optimizer step made. It works on CPU ranks, where the
calls cost nothing, so that the budget is tested without a GPU; on CUDA,
`torch.cuda.set_sync_debug_mode("warn")` names the real syncs as well.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")
# mmtrain's own code: the package (engine, recipes, models) and the kernels beside it
_OWN = tuple(
    str(Path(__file__).resolve().parents[i]) + "/" + d for i, d in ((2, "mmtrain"), (2, "kernels"))
)


class SyncCounter:
    """While installed, counts calls to the Tensor methods that read a value on the host."""

    def __init__(self) -> None:
        self.count = 0  # by mmtrain's own code (the budget is about these)
        self.others = 0  # by the libraries' (DeepSpeed's optimizer step, torch's)
        self.sites: Counter = Counter()  # "file:line" of each caller, since the last take()
        self._saved: dict = {}

    def install(self) -> SyncCounter:
        for name in _METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._counting(original))
        return self

    def uninstall(self) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}

    def _counting(self, original):
        counter = self

        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            path = caller.f_code.co_filename
            if path.startswith(_OWN):
                counter.count += 1
            else:
                counter.others += 1
            counter.sites[f"{path}:{caller.f_lineno}"] += 1
            return original(tensor, *args, **kwargs)

        return counted

    def take(self) -> tuple:
        """(mmtrain's count, the libraries' count) since the last call (the call sites are kept
        until `take_sites`)."""
        counts = (self.count, self.others)
        self.count = self.others = 0
        return counts

    def take_sites(self, top: int = 8) -> list:
        """The most frequent call sites since the last call, as (site, count), site shortened to
        the path from the package down ("mmtrain/engine/losses.py:33")."""
        sites, self.sites = self.sites, Counter()
        return [(_short(site), n) for site, n in sites.most_common(top)]


def _short(site: str) -> str:
    for root in ("site-packages/", "/mmtrain/"):
        if root in site:
            cut = site.index(root) + len(root)
            return ("mmtrain/" if root == "/mmtrain/" else "") + site[cut:]
    return site
