"""The distributed, resumable shard reader every recipe uses.

Three modes (`DataSection.mode`):
- exact: every epoch, the shard order is shuffled (seed, epoch) and the concatenated samples are
  cut into *global* batches of G = micro_batch x grad_accum x world samples (one optimizer step
  of the whole job; the remainder, fewer than G samples, sits out that epoch). Consecutive
  global batches form shuffle windows of at least `shuffle_buffer` samples *and* at least
  `shuffle_shards` shards' worth of samples (rounded up to whole global batches), and a seeded
  permutation of each window (seed, epoch, window) deals its samples to its batches: however
  large G grows, a global batch draws from about `shuffle_shards` shards (more when G spans more),
  never from the one or two that G consecutive samples would hold. Which samples make up global
  batch s is therefore a function of (seed, epoch, G, shuffle_buffer, shuffle_shards) alone, not
  of the world size or the data workers: runs at 1, 2 or 8 ranks with the same global batch see
  the same batches, and a run resumed on another number of ranks (same G) continues with exactly
  the remaining batches of the epoch. The global batch's samples, in the window's permuted order,
  are cut into micro-batches, micro-batch k of the step going to rank k // grad_accum: each
  micro-batch (the contrastive loss's in-batch negatives) mixes the window's shards too, and the
  micro-batches of a step are the same at any world size with the same micro-batch size. Every
  sample is seen at most once per epoch and every rank takes the same number of steps (no hang on
  uneven shards).
- eval: every sample exactly once: rank r reads the r-th contiguous part (total / world rounded
  up); the last batches are filled with repeats, which evaluation drops by sample key.
- resampled: each worker draws shards at random with replacement, forever, and the epoch is a
  fixed number of steps (`steps_per_epoch`), as open_clip does for large corpora. Resuming
  continues with a fresh random stream rather than the same one.

Batch b of a rank (its b-th micro-batch of the epoch) comes from data worker
(b - start) % workers, where start is the batch the stream was (re)started at, so the
DataLoader's round-robin yields batches start, start+1, ... in order; what a batch holds never
depends on the worker that reads it. Corrupt samples are replaced by a copy of another sample of
the same batch (fixed batch shapes) and counted; unreadable or truncated shards count their
missing samples too; `data/skipped` reaches the logs, and more than `max_skip_fraction` of the
samples seen stops the run with an error naming the shards.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmtrain.data.shards import DataError, iter_shard, resolve, shard_index
from mmtrain.schema import bounded, choices, shards_field

log = logging.getLogger("mmtrain")


@dataclass
class DataSection:
    """The data part of a recipe's config."""

    train: str = shards_field()  # shard dir or brace pattern (dir/x-{000000..000009}.tar)
    val: str = shards_field()
    mode: str = choices("exact", "resampled", "eval", default="exact")
    workers: int = bounded(2, ge=0)  # DataLoader processes per rank (0: in the training process)
    # exact: samples per shuffle window at least; resampled: per-worker buffer
    shuffle_buffer: int = bounded(1000, ge=1)
    # exact: a shuffle window spans at least this many shards (by their mean size), so that every
    # global batch mixes about as many shards at any global batch size. The cost: a data worker
    # reads each batch by seeking into up to this many shards (one open file at a time, each
    # shard's tar headers indexed once per worker and epoch) instead of a run of one shard.
    # 0: windows of `shuffle_buffer` samples alone
    shuffle_shards: int = bounded(16, ge=0)
    steps_per_epoch: Optional[int] = bounded(None, ge=1)  # resampled mode: steps per rank per epoch
    # corrupt/unreadable samples tolerated before the run stops, judged over at least
    # `skip_window` samples (a fraction of the first few batches means little)
    max_skip_fraction: float = bounded(0.01, ge=0, le=1)
    skip_window: int = bounded(1000, ge=1)
    # an image larger than this (width x height, read from its header before any pixel is
    # decoded) is a skipped sample. Every image is resized to the model's input, so a source far
    # above it only costs a worker memory: 50M pixels (a 48 MP photo passes) is 150 MB decoded,
    # where PIL's own limit (179M) lets a 13,000 x 13,000 PNG take 1.1 GB. 0: PIL's limit alone
    max_image_pixels: int = bounded(50_000_000, ge=0)
    # the training shards differ from those the checkpoint was trained on (names, sizes, sample
    # counts): error (stop, naming the change), or next_epoch (skip the rest of the interrupted
    # epoch and plan the next one over the new shards: two plans never meet in one epoch)
    on_change: str = choices("error", "next_epoch", default="error")


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
    """Yields this rank's collated micro-batches for one epoch, starting `start_batch` batches in."""

    def __init__(
        self,
        spec: str,
        batch_size: int,
        decode: Callable[[dict], Any],
        collate: Callable[[List[Any]], Dict[str, Any]],
        rank: int,
        world: int,
        seed: int,
        mode: str = "exact",
        shuffle_buffer: int = 1000,
        steps_per_epoch: Optional[int] = None,
        grad_accum: int = 1,
        shuffle_shards: int = 0,
    ):
        self.paths, self.counts, self.manifest = resolve(spec)
        self.spec = spec
        self.batch_size = batch_size
        self.decode = decode
        self.collate = collate
        self.rank, self.world, self.seed, self.mode, self.shuffle_buffer = (
            rank,
            world,
            seed,
            mode,
            shuffle_buffer,
        )
        self.grad_accum = grad_accum
        self.global_batch = batch_size * grad_accum * world
        total = sum(self.counts)
        if mode == "exact":
            self.steps = total // self.global_batch  # optimizer steps per epoch
            self.batches_per_epoch = self.steps * grad_accum
            span = max(shuffle_buffer, -(-shuffle_shards * total // len(self.counts)))
            self.window_steps = max(1, -(-span // self.global_batch))
            if self.steps == 0:
                raise DataError(
                    f"{spec}: {total} samples cannot fill one global batch of {self.global_batch} "
                    f"(micro_batch_size {batch_size} x grad_accum {grad_accum} x {world} ranks)"
                )
        elif mode == "eval":  # every sample once; the tail padded with repeats
            self.per_rank = -(-total // world)
            self.batches_per_epoch = -(-self.per_rank // batch_size)
        elif mode == "resampled":
            if not steps_per_epoch:
                raise DataError(
                    "data.mode=resampled needs data.steps_per_epoch (steps per rank per epoch)"
                )
            self.batches_per_epoch = steps_per_epoch
        else:
            raise DataError(f"data.mode must be 'exact', 'resampled' or 'eval', got {mode!r}")
        self.epoch = 0
        self.start_batch = 0
        # (epoch, start_batch) in shared memory: persistent data workers read the next pass's
        # plan from it when the loader starts them on it (`ShardLoader._start`)
        self.plan = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._fingerprint: Optional[Dict[str, Any]] = None
        self._live: Optional[tuple] = None  # resampled: a worker's endless stream, its errors

    def unlisted_tars(self) -> List[str]:
        """Tars beside the shards that the manifest does not list (a directory spec only)."""
        if not Path(self.spec).is_dir():
            return []
        listed = {p.name for p in self.paths}
        return sorted(t.name for t in Path(self.spec).glob("*.tar") if t.name not in listed)

    def fingerprint(self) -> Dict[str, Any]:
        """What the epoch plan is made of: each shard's name, size and sample count (a hash),
        with the totals to say what changed. Taken once (a stat per shard), as the plan is."""
        if self._fingerprint is None:
            shards = [(p.name, p.stat().st_size, n) for p, n in zip(self.paths, self.counts)]
            digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]
            self._fingerprint = {"hash": digest, "shards": len(shards), "samples": sum(self.counts)}
        return self._fingerprint

    # -- which samples a batch holds: positions in the epoch's shard-shuffled concatenation
    def _shard_order(self) -> List[int]:
        order = list(range(len(self.paths)))
        random.Random(f"{self.seed}/shards/{self.epoch}").shuffle(order)
        return order

    def _window(self, w: int) -> List[int]:
        """The permutation of window w's samples (positions relative to the window's first)."""
        steps = min(self.window_steps, self.steps - w * self.window_steps)
        perm = list(range(steps * self.global_batch))
        random.Random(f"{self.seed}/window/{self.epoch}/{w}").shuffle(perm)
        return perm

    def _group(self, b: int):
        """The shuffle window of batch b (exact mode; None otherwise)."""
        return b // (self.window_steps * self.grad_accum) if self.mode == "exact" else None

    def _positions(self, b: int, window: Optional[List[int]]) -> List[int]:
        """Sample positions of this rank's batch b (padded with repeats in eval mode)."""
        if self.mode == "eval":
            total = sum(self.counts)
            lo = self.rank * self.per_rank + b * self.batch_size
            hi = min(lo + self.batch_size, (self.rank + 1) * self.per_rank, total)
            pos = list(range(lo, hi)) or [min(lo, total) - 1]
            return pos + [pos[k % len(pos)] for k in range(self.batch_size - len(pos))]
        step, micro = divmod(b, self.grad_accum)
        w, j = divmod(step, self.window_steps)
        k = self.rank * self.grad_accum + micro  # this micro-batch's place in the step
        first = j * self.global_batch + k * self.batch_size
        part = sorted(window[first : first + self.batch_size])  # in position order: reads ahead
        return [w * self.window_steps * self.global_batch + p for p in part]

    def _read(
        self, positions: List[int], order: List[int], starts: List[int], errors: List[str]
    ) -> Dict[int, Any]:
        """Raw samples at `positions` (sorted), None where a shard lost them; each sample read by seeking to
        it (`ShardIndex`), so a rank reads only what it uses. Shard order[s] starts at position starts[s]."""
        out: Dict[int, Any] = {}
        k = 0
        while k < len(positions):
            s = bisect.bisect_right(starts, positions[k]) - 1
            end = starts[s] + self.counts[order[s]]
            mine = positions[k : bisect.bisect_left(positions, end, k)]
            k += len(mine)
            try:
                index = shard_index(self.paths[order[s]])
            except OSError as e:  # unreadable: all its samples are lost
                errors.append(f"{self.paths[order[s]]}: {e}")
                index = None
            if index is not None:
                if index.error and len(index) < self.counts[order[s]] and index.error not in errors:
                    errors.append(index.error)
                for idx, sample in index.read(sorted({p - starts[s] for p in mine})):
                    out[starts[s] + idx] = sample
            for p in mine:
                out.setdefault(p, None)  # lost to a truncated/unreadable shard
        return out

    def _planned(self, mine: range, errors: List[str]) -> Iterator[List[Any]]:
        """Raw samples of each of this worker's batches, in order."""
        order = self._shard_order()
        # the first position of each shard
        starts = [0, *itertools.accumulate(self.counts[i] for i in order)][:-1]
        w, window = None, None
        for b in mine:  # one batch read at a time: a window can hold many shards' samples
            if self._group(b) != w:
                w = self._group(b)
                window = self._window(w) if w is not None else None
            positions = self._positions(b, window)
            raw = self._read(sorted(set(positions)), order, starts, errors)
            yield [raw[p] for p in positions]

    def _resampled(self, worker: int, errors: List[str]) -> Iterator[List[Any]]:
        rng = random.Random(
            f"{self.seed}/resampled/{self.rank}/{worker}/{self.epoch}/{self.start_batch}"
        )

        def raw():
            while True:
                i = rng.randrange(len(self.paths))
                got = 0
                for _, sample in iter_shard(self.paths[i], 0, None, errors):
                    got += 1
                    yield sample
                for _ in range(self.counts[i] - got):
                    yield None

        stream = _shuffled(
            raw(), self.shuffle_buffer, random.Random(f"{self.seed}/buffer/{rng.random()}")
        )
        while True:
            yield [next(stream) for _ in range(self.batch_size)]

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        self.epoch, self.start_batch = (int(v) for v in self.plan)
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = range(self.start_batch + physical, self.batches_per_epoch, workers)
        errors: List[str] = []
        if self.mode == "resampled":
            # one endless stream per worker, kept across epochs (by a persistent worker): its
            # shuffle buffer is filled once, not once per epoch
            if self._live is None:
                self._live = (self._resampled(physical, errors), errors)
            chunks, errors = self._live
        else:
            chunks = self._planned(mine, errors)
        skipped = seen = 0
        last_good: Optional[List[Any]] = None
        for _, chunk in zip(mine, chunks):
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
                        errors.append(
                            f"{raw_sample.get('__url__', '?')} sample {raw_sample.get('__key__', '?')}: "
                            f"{type(e).__name__}: {e}"
                        )
            fields = set().union(*(it.keys() for it in items)) if items else set()
            # incomplete (e.g. a cut-off tar)
            for it in [it for it in items if it.keys() != fields]:
                bad += 1
                items.remove(it)
                if len(errors) < 5:
                    errors.append(f"sample {it.get('key', '?')} lacks {sorted(fields - it.keys())}")
            skipped += bad
            seen += len(chunk)
            if not items:
                if last_good is None:
                    raise DataError(
                        f"rank {self.rank} data worker {physical}: no readable sample in a whole batch "
                        f"of {self.spec}; first problems: {errors[:3]}"
                    )
                items = last_good
            items = items + [items[k % len(items)] for k in range(self.batch_size - len(items))]
            last_good = items
            # the batch (whatever the collate makes: a dict, a typed batch) and what was read for it
            info = {"worker": physical, "skipped": skipped, "seen": seen, "errors": errors[:3]}
            yield self.collate(items), info


class ShardLoader:
    """An endless iterator of batches over epochs, whose position is part of the checkpoint."""

    def __init__(
        self,
        stream: ShardStream,
        workers: int = 2,
        max_skip_fraction: float = 0.01,
        skip_window: int = 1000,
        on_change: str = "error",
    ):
        self.stream = stream
        self.on_change = on_change
        self.workers = workers
        self.max_skip_fraction = max_skip_fraction
        self.skip_window = skip_window
        self.epoch = 0
        self.position = 0  # batches consumed in this epoch
        self._skipped_before = self._seen_before = 0
        self._skipped: Dict[int, int] = {}
        self._seen: Dict[int, int] = {}
        self._it = None
        self._loader: Optional[DataLoader] = None

    @property
    def steps_per_epoch(self) -> int:
        return self.stream.batches_per_epoch

    def _start(self) -> None:
        """Starts a pass at (epoch, position). The data workers are started once and kept
        (persistent): each new pass (an epoch, a resume) tells them its plan through shared
        memory, so an epoch costs no fork and each worker keeps its shard indexes. On CUDA,
        batches come in pinned memory, for asynchronous (`non_blocking`) copies to the GPU."""
        self.stream.plan[0], self.stream.plan[1] = self.epoch, self.position
        self._skipped_before += sum(self._skipped.values())
        self._seen_before += sum(self._seen.values())
        self._skipped = {}
        self._seen = {}
        if self._loader is None:
            # Its own generator: a DataLoader draws its workers' base seed from the global torch
            # RNG otherwise, and a resumed run (which opens one at its first batch) would shift
            # the training RNG stream (dropout, sampling) against the uninterrupted run.
            gen = torch.Generator().manual_seed(hash((self.stream.seed, self.stream.rank)) % 2**62)
            self._loader = DataLoader(
                self.stream,
                batch_size=None,
                num_workers=self.workers,
                prefetch_factor=4 if self.workers else None,
                persistent_workers=self.workers > 0,
                pin_memory=torch.cuda.is_available(),
                generator=gen,
            )
        self._it = iter(self._loader)

    def __iter__(self):
        return self

    def close(self) -> None:
        """Stop the worker processes now (the next batch starts them again where this left off).
        Left to the garbage collector, a loader in a reference cycle can lose its queues first and
        then waits 5 s per worker for one that never hears it should stop."""
        it, self._it, self._loader = self._it, None, None
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's iterator with workers
        if shutdown is not None:
            shutdown()

    def __next__(self) -> Any:
        if self._it is None:
            self._start()
        try:
            batch, info = next(self._it)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._start()
            batch, info = next(self._it)
        self._skipped[info["worker"]], self._seen[info["worker"]] = info["skipped"], info["seen"]
        self.position += 1
        skipped, seen = self.skipped, self.seen
        # a rate, once it means something
        if skipped > self.max_skip_fraction * max(seen, self.skip_window):
            raise DataError(
                f"{skipped} of {seen} samples unreadable in {self.stream.spec} "
                f"(> data.max_skip_fraction={self.max_skip_fraction}): {skipped / seen:.2%} of the samples "
                f"seen on rank {self.stream.rank}, judged over at least data.skip_window="
                f"{self.skip_window} samples; e.g. {info['errors']}"
            )
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
        st = self.stream
        return {
            "epoch": self.epoch,
            "position": self.position,
            "workers": self.workers,
            "mode": st.mode,
            "world": st.world,
            "grad_accum": st.grad_accum,
            "global_batch": st.global_batch,
            "skipped": self.skipped,
            "seen": self.seen,
            "shards": st.fingerprint(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """This rank's saved position. Another number of workers changes nothing (what a batch holds
        does not depend on the worker that reads it); in exact mode the global batch must match."""
        st = self.stream
        if st.mode == "exact" and state.get("global_batch", st.global_batch) != st.global_batch:
            raise DataError(
                f"{st.spec}: the checkpoint was trained with a global batch of "
                f"{state['global_batch']} samples ({state['world']} ranks x grad_accum "
                f"{state['grad_accum']}), this run has {st.global_batch} "
                f"({st.world} ranks x micro_batch_size {st.batch_size} x grad_accum {st.grad_accum}): set "
                f"train.grad_accum (or train.micro_batch_size) so that the global batch stays "
                f"{state['global_batch']}, and the run continues with exactly the remaining batches"
            )
        # whole optimizer steps
        steps = int(state["position"]) // int(state.get("grad_accum", st.grad_accum))
        self.epoch = int(state["epoch"])
        self.position = steps * st.grad_accum
        then, now = state.get("shards"), st.fingerprint()
        if then and then["hash"] != now["hash"]:  # (checkpoints before 2026-12-02 have none)
            change = (
                f"{st.spec}: the shards changed since the checkpoint: {then['shards']} shards, "
                f"{then['samples']} samples then, {now['shards']} and {now['samples']} now"
            )
            if self.on_change == "error":
                raise DataError(
                    f"{change}; resuming would mix two epoch plans in epoch {self.epoch}. Restore "
                    f"the shards, or set recipe.data.on_change=next_epoch to skip the rest of this "
                    f"epoch and plan the next one over the new shards"
                )
            log.warning(
                "%s; recipe.data.on_change=next_epoch: the rest of epoch %d is skipped (%d of "
                "its %d batches done), epoch %d is planned over the new shards",
                change,
                self.epoch,
                self.position,
                then["samples"] // st.global_batch * st.grad_accum,  # the old plan's
                self.epoch + 1,
            )
            self.epoch, self.position = self.epoch + 1, 0
        self._skipped_before = int(state["skipped"])
        self._seen_before = int(state["seen"])
        self._skipped = {}
        self._seen = {}
        self._it = None

    def reshard_state(self, states: List[Dict[str, Any]], rank: int, world: int) -> Dict[str, Any]:
        """This rank's state from the states every rank of a run on another number of ranks saved:
        the same position (they all stood at the same step), the skip counts carried by rank 0."""
        state = dict(states[0])
        if len({(int(s["epoch"]), int(s["position"])) for s in states}) != 1:
            raise DataError(
                f"{self.stream.spec}: the saved ranks stand at different data positions "
                f"{[(s['epoch'], s['position']) for s in states]}: the checkpoint is inconsistent"
            )
        state["skipped"] = sum(int(s["skipped"]) for s in states) if rank == 0 else 0
        state["seen"] = sum(int(s["seen"]) for s in states) if rank == 0 else 0
        return state


@dataclass(frozen=True)
class Deal:
    """How a run deals its global batches to this rank: the micro-batch size, this rank of
    `world_size`, the seed of the shuffles, and the micro-batches of one optimizer step (a run's
    `RunContext.deal`)."""

    micro_batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    grad_accum: int = 1


def build_loader(section: DataSection, spec: str, decode, collate, deal: Deal) -> ShardLoader:
    """This rank's resumable loader over the shards `spec`: `decode` (raw tar sample -> item) and
    `collate` (items -> micro-batch) run in the data workers `section` sets."""
    from mmtrain.data.images import PixelLimit

    stream = ShardStream(
        spec,
        deal.micro_batch_size,
        PixelLimit(decode, section.max_image_pixels) if section.max_image_pixels else decode,
        collate,
        deal.rank,
        deal.world_size,
        deal.seed,
        section.mode,
        section.shuffle_buffer,
        section.steps_per_epoch,
        deal.grad_accum,
        section.shuffle_shards,
    )
    if deal.rank == 0:
        unlisted = stream.unlisted_tars()
        if unlisted:
            log.warning(
                "%s: %d tar(s) in the directory are not in its manifest and are not read: %s; "
                "`mmtrain data index` writes a manifest that lists them",
                spec,
                len(unlisted),
                ", ".join(unlisted[:5]) + (" ..." if len(unlisted) > 5 else ""),
            )
    return ShardLoader(
        stream, section.workers, section.max_skip_fraction, section.skip_window, section.on_change
    )


class SampleDecoder:
    """Raw tar sample -> {"key", "meta" (the json), "text" (txt), "image" (a tensor, when a
    transform is given)}."""

    def __init__(self, transform=None, need_image: bool = False):
        self.transform = transform
        self.need_image = need_image

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

    from mmtrain.data.images import image_bytes, to_rgb

    data = image_bytes(raw)
    return {
        "key": raw["__key__"],
        "meta": json.loads(raw["json"]) if "json" in raw else {},
        "image": to_rgb(Image.open(io.BytesIO(data))) if data is not None else None,
    }


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
