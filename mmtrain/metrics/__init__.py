"""Evaluation metrics: retrieval, dialogue generation, keyphrases, classification figures.

One rule for every figure mmtrain reports: **a metric is computed on rows gathered from every
rank, and never syncs again.** Each rank evaluates its share of the split, the per-sample rows
are gathered to every rank (`mmtrain.recipes.common.gather_rows`: one row per sample key, sorted
by key, so the same rows in the same order at any world size), and the figures are computed from
those rows. A torchmetrics `Metric` syncs its states across ranks in `compute()` by default; on
gathered rows that second sync sums or concatenates every rank's copy of the same rows: counts
grow with the number of ranks and Distinct-n (unique over all n-grams) shrinks by it. So:

- mmtrain's own metrics derive from `RowMetric`, which cannot sync;
- a torchmetrics class is built with `on_rows(Class, ...)` (`sync_on_compute=False`).

`tests/unit/metrics/test_row_rule.py` fails on a `Metric` built any other way in `mmtrain/`, and
on any metric that syncs while a process group is up.
"""

from __future__ import annotations

from typing import Any, Type, TypeVar

from torchmetrics import Metric

M = TypeVar("M", bound=Metric)

_SYNC_KEYS = ("sync_on_compute", "dist_sync_on_step")


def _no_sync(cls: type, kwargs: dict) -> dict:
    for key in _SYNC_KEYS:
        if kwargs.pop(key, False):
            raise ValueError(
                f"{cls.__name__}({key}=True): mmtrain computes metrics on rows already gathered "
                f"from every rank (mmtrain/metrics/__init__.py); a sync would count them again"
            )
    return {**kwargs, "sync_on_compute": False, "dist_sync_on_step": False}


def on_rows(cls: Type[M], *args: Any, **kwargs: Any) -> M:
    """A torchmetrics `cls` for rows gathered from every rank: it computes without syncing."""
    return cls(*args, **_no_sync(cls, kwargs))


class RowMetric(Metric):
    """Base of mmtrain's own metrics: updated with rows gathered from every rank, so `compute()`
    never syncs (see the module's rule)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**_no_sync(type(self), kwargs))
