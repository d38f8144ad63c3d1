"""Shuffle quality at a cluster-sized global batch (issue 30).

Web shards are usually written in source order: here each shard holds one class of a synthetic
label, which is the worst case for a reader that cuts global batches out of consecutive samples.
With G = 1,024 (micro-batch 64 x grad_accum 8 x 2 ranks) and the default data settings, every
global batch must still mix many shards, and two epochs must pair the samples differently.
"""

import json
import statistics

import pytest

from mmtrain.data.reader import DataSection, Deal, SampleDecoder, build_loader, default_collate
from mmtrain.data.shards import write_shards

SHARDS, PER_SHARD = 32, 1000
MICRO, ACCUM, WORLD = 64, 8, 2  # G = 1,024


def source_ordered(path):
    samples = (
        {"__key__": f"{i:09d}", "json": {"label": i // PER_SHARD}}
        for i in range(SHARDS * PER_SHARD)
    )
    write_shards(samples, path, "dialogue", max_count=PER_SHARD)
    return path


def global_batches(spec, epochs):
    """epoch -> [set of sample keys of each global batch], and the shards (labels) of each."""
    loaders = [
        build_loader(
            DataSection(workers=0),  # the defaults, but read in this process
            str(spec),
            SampleDecoder(),
            default_collate,
            Deal(MICRO, rank=r, world_size=WORLD, seed=0, grad_accum=ACCUM),
        )
        for r in range(WORLD)
    ]
    steps = loaders[0].steps_per_epoch // ACCUM
    out = []
    for _ in range(epochs):
        batches = []
        for _ in range(steps):
            items = [
                (key, meta["label"])
                for ld in loaders
                for _ in range(ACCUM)
                for b in [next(ld)]
                for key, meta in zip(b["key"], b["meta"])
            ]
            assert len(items) == MICRO * ACCUM * WORLD
            batches.append(items)
        out.append(batches)
    return out


@pytest.mark.heavy  # make test-all (9 s: 64,000 samples read)
def test_global_batches_mix_many_shards_and_change_between_epochs(tmp_path):
    spec = source_ordered(tmp_path / "sorted")
    first, second = global_batches(spec, epochs=2)
    shards = [len({label for _, label in batch}) for batch in first + second]
    # a rank's part of a step: its micro-batches, the contrastive loss's negatives
    per_micro = [
        len({label for _, label in batch[i : i + MICRO]})
        for batch in first
        for i in range(0, len(batch), MICRO)
    ]
    # how often two samples met in one global batch in epoch 0 and met again in epoch 1
    where = {key: s for s, batch in enumerate(first) for key, _ in batch}
    again = statistics.mean(
        max(sum(1 for key, _ in batch if where.get(key) == s) for s in range(len(first)))
        / len(batch)
        for batch in second
    )
    report = {
        "global_batch": MICRO * ACCUM * WORLD,
        "shards": SHARDS,
        "samples_per_shard": PER_SHARD,
        "mean_shards_per_global_batch": statistics.mean(shards),
        "min_shards_per_global_batch": min(shards),
        "mean_shards_per_micro_batch": statistics.mean(per_micro),
        "largest_share_of_an_epoch1_batch_from_one_epoch0_batch": round(again, 3),
    }
    print(json.dumps(report))
    # G consecutive samples would hold 2 (at most 3) shards; the default window spans 16
    assert report["mean_shards_per_global_batch"] >= 12, report
    assert report["min_shards_per_global_batch"] >= 8, report
    assert report["mean_shards_per_micro_batch"] >= 8, report
    # a batch of epoch 1 shares at most a small part with any one batch of epoch 0
    assert again < 0.25, report
    # every sample at most once per epoch
    for epoch in (first, second):
        keys = [key for batch in epoch for key, _ in batch]
        assert len(keys) == len(set(keys))
