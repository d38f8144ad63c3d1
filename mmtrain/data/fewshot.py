"""`mmtrain data fewshot`: k examples per label of one task, for few-shot (re)training.

Reads a shard set, optionally maps its labels to a new label set (`--relabel old=new,...`, e.g.
intents to coarser domains), keeps k examples per (new) label drawn with a seeded RNG, and writes
them as a new shard set. A label with fewer than k examples keeps all it has (and is reported).
"""

from __future__ import annotations

import json
import random
from typing import Dict, Optional

from mmtrain.data.shards import DataError, iter_shard, resolve, write_shards


def fewshot(
    src: str, out: str, k: int, task: str, seed: int = 0, relabel: Optional[Dict[str, str]] = None
) -> dict:
    if k < 1:
        raise DataError(f"--k must be >= 1, got {k}")
    paths, _, manifest = resolve(src)
    by_label: Dict[str, list] = {}
    for p in paths:
        for _, raw in iter_shard(p):
            meta = json.loads(raw.get("json", b"{}"))
            if task not in meta:
                raise DataError(f"{p}: sample {raw['__key__']} has no '{task}' field")
            label = (relabel or {}).get(meta[task], meta[task])
            meta[task] = label
            by_label.setdefault(label, []).append({**raw, "json": json.dumps(meta).encode()})
    rng = random.Random(seed)
    chosen, short = [], {}
    for label in sorted(by_label):
        items = sorted(by_label[label], key=lambda s: s["__key__"])
        if len(items) < k:
            short[label] = len(items)
        chosen += rng.sample(items, min(k, len(items)))
    chosen.sort(key=lambda s: s["__key__"])
    m = write_shards(
        iter(chosen),
        out,
        manifest.get("kind", "intent"),
        extra={
            "source": str(src),
            "fewshot": {
                "k": k,
                "task": task,
                "seed": seed,
                "relabel": relabel or {},
                "short": short,
            },
        },
    )
    return m
