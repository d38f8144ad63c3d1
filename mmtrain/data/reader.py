"""The distributed, resumable shard reader every recipe uses.

Two modes (`DataSection.mode`):
- exact: every epoch, the shard order is shuffled (seed, epoch); the concatenated samples are
  cut into one contiguous range per rank (total // world samples each; the remainder, fewer
  than `world` samples, sits out that epoch), each range into one chunk per data worker, and
  each worker shuffles its chunk through a seeded buffer. So every sample is seen at most once
  per epoch, every rank takes the same number of steps (no hang on uneven shards), each rank
  reads only its own part of the data, and the whole order is a function of (seed, epoch,
  world, workers): a resumed run sees exactly the remaining batches of the interrupted one.
- eval: like exact, but every sample is seen exactly once: the ranks' parts are total / world
  rounded up and the last batches are filled with repeats, which evaluation drops by sample key.
- resampled: each worker draws shards at random with replacement, forever, and the epoch is a
  fixed number of steps (`steps_per_epoch`), as open_clip does for large corpora. Resuming
  continues with a fresh random stream rather than the same one.

Batch b of a rank comes from data worker b % workers; after a resume at batch p, worker k
takes the role of worker (k + p) % workers, so that the DataLoader's round-robin still yields
batches p, p+1, ... in order. Corrupt samples are replaced by a copy of another sample of the
same batch (fixed batch shapes) and counted; unreadable or truncated shards count their
missing samples too; `data/skipped` reaches the logs, and more than `max_skip_fraction` of the
samples seen stops the run with an error naming the shards.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmtrain.config import choices, shards_field
from mmtrain.data.shards import DataError, iter_shard, resolve


@dataclass
class DataSection:
    """The data part of a recipe's config."""
    train: str = shards_field()        # shard dir or brace pattern (dir/x-{000000..000009}.tar)
    val: str = shards_field()
    mode: str = choices("exact", "resampled", "eval", default="exact")
    workers: int = 2                   # DataLoader processes per rank
    shuffle_buffer: int = 1000
    steps_per_epoch: Optional[int] = None   # resampled mode: steps per rank per epoch
    max_skip_fraction: float = 0.01    # corrupt/unreadable samples tolerated before the run stops


_END = object()


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buf: List[Any] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(len(buf))
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """Yields this rank's collated batches for one epoch, starting `start_batch` batches in."""

    def __init__(self, spec: str, batch_size: int, decode: Callable[[dict], Any],
                 collate: Callable[[List[Any]], Dict[str, Any]], rank: int, world: int, seed: int,
                 mode: str = "exact", shuffle_buffer: int = 1000, steps_per_epoch: Optional[int] = None):
        self.paths, self.counts, self.manifest = resolve(spec)
        self.spec, self.batch_size, self.decode, self.collate = spec, batch_size, decode, collate
        self.rank, self.world, self.seed, self.mode, self.shuffle_buffer = rank, world, seed, mode, shuffle_buffer
        total = sum(self.counts)
        if mode in ("exact", "eval"):
            if mode == "exact":
                self.per_rank = total // world
                self.batches_per_epoch = self.per_rank // batch_size
            else:                             # every sample once; the tail padded with repeats
                self.per_rank = -(-total // world)
                self.batches_per_epoch = -(-self.per_rank // batch_size)
            if self.batches_per_epoch == 0:
                raise DataError(f"{spec}: {total} samples cannot fill one batch of {batch_size} on each of "
                                f"{world} ranks")
        elif mode == "resampled":
            if not steps_per_epoch:
                raise DataError("data.mode=resampled needs data.steps_per_epoch (steps per rank per epoch)")
            self.per_rank, self.batches_per_epoch = None, steps_per_epoch
        else:
            raise DataError(f"data.mode must be 'exact', 'resampled' or 'eval', got {mode!r}")
        self.epoch = 0
        self.start_batch = 0

    # -- which batches and samples belong to a worker
    def _worker_batches(self, logical: int, workers: int) -> int:
        return len(range(logical, self.batches_per_epoch, workers))

    def _raw_exact(self, logical: int, workers: int, errors: List[str]) -> Iterator[dict]:
        order = list(range(len(self.paths)))
        random.Random(f"{self.seed}/shards/{self.epoch}").shuffle(order)
        before = sum(self._worker_batches(j, workers) for j in range(logical)) * self.batch_size
        lo = self.rank * self.per_rank + before
        hi = lo + self._worker_batches(logical, workers) * self.batch_size
        if self.mode == "eval":               # the padded tail does not exist: the stream just ends
            hi = min(hi, (self.rank + 1) * self.per_rank, sum(self.counts))
        pos = 0
        for i in order:
            n = self.counts[i]
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                got = 0
                for _, sample in iter_shard(self.paths[i], a - pos, b - pos, errors):
                    got += 1
                    yield sample
                for _ in range((b - a) - got):               # lost to a truncated/unreadable shard
                    yield None
            pos += n
            if pos >= hi:
                return

    def _raw_resampled(self, logical: int, errors: List[str]) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}/resampled/{self.rank}/{logical}/{self.epoch}/{self.start_batch}")
        while True:
            i = rng.randrange(len(self.paths))
            got = 0
            for _, sample in iter_shard(self.paths[i], 0, None, errors):
                got += 1
                yield sample
            for _ in range(self.counts[i] - got):
                yield None

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info else (0, 1)
        logical = (physical + self.start_batch) % workers
        mine = self._worker_batches(logical, workers)
        done = len(range(logical, self.start_batch, workers))     # this role's batches already consumed
        errors: List[str] = []
        raw = (self._raw_resampled(logical, errors) if self.mode == "resampled"
               else self._raw_exact(logical, workers, errors))
        rng = random.Random(f"{self.seed}/buffer/{self.epoch}/{self.rank}/{logical}/"
                            f"{self.start_batch if self.mode == 'resampled' else 0}")
        stream = _shuffled(raw, self.shuffle_buffer, rng)
        skipped = seen = 0
        last_good: Optional[List[Any]] = None
        for b in range(mine):
            if b < done:                                          # consumed before the resume
                if self.mode != "resampled":                      # read past it, without decoding
                    for _ in range(self.batch_size):
                        next(stream, None)
                continue
            chunk = [next(stream, _END) for _ in range(self.batch_size)]
            chunk = [x for x in chunk if x is not _END]           # eval mode: past the end, padding
            items, bad = [], 0
            for raw_sample in chunk:
                if raw_sample is None:
                    bad += 1
                    continue
                try:
                    items.append(self.decode(raw_sample))
                except Exception as e:  # a corrupt sample: counted, replaced below
                    bad += 1
                    if len(errors) < 5:
                        errors.append(f"{raw_sample.get('__url__', '?')} sample {raw_sample.get('__key__', '?')}: "
                                      f"{type(e).__name__}: {e}")
            skipped += bad
            seen += len(chunk)
            if not items:
                if last_good is None:
                    raise DataError(f"rank {self.rank} data worker {logical}: no readable sample in a whole batch "
                                    f"of {self.spec}; first problems: {errors[:3]}")
                items = last_good
            items = items + [items[k % len(items)] for k in range(self.batch_size - len(items))]
            last_good = items
            batch = self.collate(items)
            batch["_data"] = {"worker": physical, "skipped": skipped, "seen": seen, "errors": errors[:3]}
            yield batch


class ShardLoader:
    """An endless iterator of batches over epochs, whose position is part of the checkpoint."""

    def __init__(self, stream: ShardStream, workers: int = 2, max_skip_fraction: float = 0.01):
        self.stream, self.workers, self.max_skip_fraction = stream, workers, max_skip_fraction
        self.epoch = 0
        self.position = 0                  # batches consumed in this epoch
        self._skipped_before = self._seen_before = 0
        self._skipped: Dict[int, int] = {}
        self._seen: Dict[int, int] = {}
        self._it = None

    @property
    def steps_per_epoch(self) -> int:
        return self.stream.batches_per_epoch

    def _start(self) -> None:
        self.stream.epoch, self.stream.start_batch = self.epoch, self.position
        self._skipped_before += sum(self._skipped.values())
        self._seen_before += sum(self._seen.values())
        self._skipped, self._seen = {}, {}
        # Its own generator: a DataLoader draws its workers' base seed from the global torch RNG
        # otherwise, and a resumed run (which opens one at its first batch) would shift the
        # training RNG stream (dropout, sampling) against the uninterrupted run.
        gen = torch.Generator().manual_seed(hash((self.stream.seed, self.epoch, self.position)) % 2**62)
        self._it = iter(DataLoader(self.stream, batch_size=None, num_workers=self.workers,
                                   prefetch_factor=4 if self.workers else None, generator=gen))

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._start()
            batch = next(self._it)
        info = batch.pop("_data")
        self._skipped[info["worker"]], self._seen[info["worker"]] = info["skipped"], info["seen"]
        self.position += 1
        skipped, seen = self.skipped, self.seen
        if seen and skipped / seen > self.max_skip_fraction:
            raise DataError(f"{skipped} of {seen} samples unreadable in {self.stream.spec} "
                            f"(> data.max_skip_fraction={self.max_skip_fraction}); e.g. {info['errors']}")
        return batch

    @property
    def skipped(self) -> int:
        return self._skipped_before + sum(self._skipped.values())

    @property
    def seen(self) -> int:
        return self._seen_before + sum(self._seen.values())

    def stats(self) -> Dict[str, float]:
        """Cumulative counts of this rank (the engine sums them over ranks as data/<name>)."""
        return {"skipped": self.skipped, "seen": self.seen}

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "workers": self.workers,
                "skipped": self.skipped, "seen": self.seen}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["workers"] != self.workers:
            warnings.warn(f"data workers changed from {state['workers']} to {self.workers}: the resumed epoch "
                          f"will not see exactly the remaining samples")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._skipped_before, self._seen_before = int(state["skipped"]), int(state["seen"])
        self._skipped, self._seen = {}, {}
        self._it = None


def build_loader(section: DataSection, spec: str, batch_size: int, decode, collate, rank: int, world: int,
                 seed: int) -> ShardLoader:
    stream = ShardStream(spec, batch_size, decode, collate, rank, world, seed, section.mode,
                         section.shuffle_buffer, section.steps_per_epoch)
    return ShardLoader(stream, section.workers, section.max_skip_fraction)


class SampleDecoder:
    """Raw tar sample -> {"key", "meta" (the json), "text" (txt), "image" (tensor, when a transform is given)}."""

    def __init__(self, transform=None, need_image: bool = False):
        self.transform, self.need_image = transform, need_image

    def __call__(self, raw: Dict[str, Any]) -> Dict[str, Any]:
        import json

        from mmtrain.data.images import image_bytes

        out: Dict[str, Any] = {"key": raw["__key__"]}
        out["meta"] = json.loads(raw["json"]) if "json" in raw else {}
        if "txt" in raw:
            out["text"] = raw["txt"].decode("utf-8")
        img = image_bytes(raw)
        if img is not None and self.transform is not None:
            out["image"] = self.transform.load(img)
        elif self.need_image:
            raise DataError(f"sample {raw['__key__']} has no image")
        return out


def pil_decode(raw: Dict[str, Any]) -> Dict[str, Any]:
    """Raw tar sample -> {"key", "meta" (the json), "image" (a PIL RGB image, or None when the sample
    has none)}: for recipes whose processor (e.g. a VLM's) resizes and normalises images itself."""
    import io
    import json

    from PIL import Image

    from mmtrain.data.images import image_bytes

    data = image_bytes(raw)
    return {"key": raw["__key__"], "meta": json.loads(raw["json"]) if "json" in raw else {},
            "image": Image.open(io.BytesIO(data)).convert("RGB") if data is not None else None}


def split_spec(val_spec: str, split: str) -> str:
    """The shards of `split` beside the validation shards (`.../val` -> `.../test`)."""
    from pathlib import Path

    return val_spec if split == "val" else str(Path(val_spec).parent / split)


def default_collate(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stacks tensors, keeps everything else as lists."""
    out: Dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out
