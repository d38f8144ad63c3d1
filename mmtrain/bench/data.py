"""`mmtrain bench data SHARDS`: samples/s of read + decode + transform + collate, per data worker."""

from __future__ import annotations

import os
import time
from typing import Any, Dict

from mmtrain.data.images import ImageTransform
from mmtrain.data.reader import DataSection, Deal, SampleDecoder, build_loader, default_collate


def bench_data(
    spec: str,
    workers: int = 1,
    batch_size: int = 64,
    batches: int = 20,
    size: int = 224,
    fast: bool = True,
) -> Dict[str, Any]:
    section = DataSection(
        mode="resampled", workers=workers, shuffle_buffer=256, steps_per_epoch=10**9
    )
    decode = SampleDecoder(ImageTransform(resize=size, crop=size, fast=fast), need_image=True)
    loader = build_loader(section, spec, decode, default_collate, Deal(batch_size))
    for _ in range(max(2, workers)):  # warm-up: worker start and first shards
        next(loader)
    t = time.perf_counter()
    for _ in range(batches):
        next(loader)
    elapsed = time.perf_counter() - t
    rate = batches * batch_size / elapsed
    return {
        "shards": spec,
        "workers": workers,
        "batch_size": batch_size,
        "image_size": size,
        "samples_per_s": round(rate, 1),
        "samples_per_s_per_worker": round(rate / max(1, workers), 1),
        "cpu_cores": os.cpu_count(),
        "fast_jpeg_draft": fast,
    }
