"""The shard reader's samples/s against plain webdataset doing the same work, on one pinned core.
Prints one JSON object.

    python benchmarks/reader_vs_webdataset.py [--samples 1024] [--batch 64]

Both read the same tar shards of 256 x 256 JPEGs and resize and crop them to 224 px with
mmtrain's `ImageTransform` (what the workers do: uint8 out, normalised later on the device),
batched by 64 and stacked, in one process pinned to one core with one torch thread:
- mmtrain: `ShardLoader` in exact mode (shuffled windows, seek reads, skip accounting);
- webdataset: `WebDataset(urls).map(decode).batched(64)` in file order, no shuffle;
- webdataset_fp32: the same, normalising on the host as mmtrain's workers did before
  2026-12-02 (fp32 pixels: 4 times the bytes to ship).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmtrain.data.images import ImageTransform
from mmtrain.data.reader import DataSection, Deal, SampleDecoder, build_loader, default_collate
from mmtrain.data.shards import write_shards


def make_shards(out: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    # smooth random pictures (noise upsampled): JPEG sizes like photos', not like flat colour
    base = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)

    def samples():
        for i in range(n):
            im = Image.fromarray(base[i]).resize((256, 256), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            yield {"__key__": f"{i:09d}", "jpg": buf.getvalue(), "json": {"caption": f"p{i}"}}

    write_shards(samples(), out, "image-text", max_count=256)
    return out


def rate(batches, batch: int, count: int) -> float:
    it = iter(batches)
    next(it)  # warm-up: the first batch opens the shards
    start = time.perf_counter()
    for _ in range(count):
        b = next(it)
        assert b.shape[0] == batch
    return count * batch / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    root = args.out or Path(tempfile.mkdtemp(prefix="mmtrain-reader-"))
    shards = root / "jpegs"
    if not shards.is_dir():
        make_shards(shards, args.samples)
    transform = ImageTransform(resize=224, crop=224)
    count = args.samples // args.batch - 2  # batches timed, after the warm-up one

    def ours():
        loader = build_loader(
            DataSection(workers=0, max_image_pixels=0),
            str(shards),
            SampleDecoder(transform, need_image=True),
            default_collate,
            Deal(args.batch),
        )
        while True:
            yield next(loader)["image"]

    def webdataset(normalize: bool):
        import webdataset as wds

        urls = [str(p) for p in sorted(shards.glob("*.tar"))]

        def decode(s):
            x = transform.load(s["jpg"])
            return transform.normalize(x) if normalize else x

        while True:
            ds = wds.WebDataset(urls, shardshuffle=False).map(decode)
            ds = ds.batched(args.batch, collation_fn=torch.stack)
            yield from ds

    figures = {}
    for name, make in [
        ("mmtrain", ours),
        ("webdataset", lambda: webdataset(False)),
        ("webdataset_fp32", lambda: webdataset(True)),
    ]:
        figures[name] = round(max(rate(make(), args.batch, count) for _ in range(2)), 1)
    report = {
        "samples_per_s": figures,
        "ratio_to_webdataset": round(figures["mmtrain"] / figures["webdataset"], 3),
        "ratio_to_webdataset_fp32": round(figures["mmtrain"] / figures["webdataset_fp32"], 3),
        "bytes_per_image": {"uint8": 3 * 224 * 224, "fp32": 4 * 3 * 224 * 224},
        "image": "256 x 256 JPEG (q 90) -> 224 x 224",
        "cores": 1,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
