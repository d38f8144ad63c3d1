"""The layer every shard-reading recipe stands on: `ShardRecipe` and `gather_rows`.

A recipe whose config has a `data: DataSection` says how a raw sample is decoded and how a
micro-batch is collated (`pipeline`); `ShardRecipe` then gives it the training stream, a loader
over any held-out split (every sample once, or in equal shares for tensors gathered across
ranks), and the gathering of per-sample rows from all ranks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterator, List, Tuple

from mmtrain.data.reader import DataSection, ShardLoader, build_loader, split_spec
from mmtrain.recipes.base import Recipe, RunContext, stop_if_requested


def gather_rows(ctx: RunContext, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every rank's rows, one per sample key (an evaluation loader may repeat a sample to even
    out the ranks' shares), sorted by key."""
    merged = {r["key"]: r for part in ctx.gather_objects(rows) for r in part}
    return [merged[k] for k in sorted(merged)]


class ShardRecipe(Recipe):
    """A recipe over WebDataset shards (`self.cfg.data` is a DataSection)."""

    def __init__(self, cfg, ctx: RunContext):
        super().__init__(cfg, ctx)
        self.train_data: ShardLoader | None = None  # set by build_data

    def pipeline(self) -> Tuple[Callable, Callable]:
        """(decode: raw tar sample -> item, collate: items -> micro-batch); both run in the data
        workers."""
        raise NotImplementedError

    def loader(self, section: DataSection, spec: str) -> ShardLoader:
        """This rank's resumable loader over the shards `spec`, sized and dealt for this run."""
        decode, collate = self.pipeline()
        return build_loader(section, spec, decode, collate, self.ctx.deal)

    def build_data(self) -> ShardLoader:
        self.train_data = self.loader(self.cfg.data, self.cfg.data.train)
        return self.train_data

    @property
    def epoch(self) -> int:
        """The training stream's epoch (0 before `build_data`, e.g. under `mmtrain eval`)."""
        return self.train_data.epoch if self.train_data is not None else 0

    def eval_batches(self, loader: ShardLoader) -> Iterator[Dict[str, Any]]:
        """Every batch of one pass of `loader`. Before each, a stop signal on any rank ends the
        evaluation (`stop_if_requested`: collective, as the batches' forwards are)."""
        for _ in range(loader.steps_per_epoch):
            stop_if_requested(self.ctx)
            yield next(loader)

    def eval_loader(self, split: str, mode: str = "eval") -> ShardLoader:
        """One pass over `split` (the shards beside `data.val`), unshuffled. mode "eval": every
        sample once, ranks' shares differing by at most a batch; "exact": equal shares (for
        tensors gathered across ranks), a few samples repeated."""
        section = dataclasses.replace(self.cfg.data, mode=mode, shuffle_buffer=1, shuffle_shards=0)
        return self.loader(section, split_spec(self.cfg.data.val, split))
