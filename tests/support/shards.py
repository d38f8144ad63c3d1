"""Small shard sets and loaders shared by the data tests (unit and 2-rank)."""

import io
import json
import tarfile

from mmtrain.data.images import ImageTransform
from mmtrain.data.reader import DataSection, Deal, SampleDecoder, build_loader, default_collate
from mmtrain.data.shards import write_shards


def loader(spec, batch=4, rank=0, world=1, workers=0, seed=0, shuffle_buffer=8, grad_accum=1, **kw):
    return build_loader(
        DataSection(workers=workers, shuffle_buffer=shuffle_buffer, **kw),
        str(spec),
        SampleDecoder(ImageTransform(resize=32, crop=32), need_image=False),
        default_collate,
        Deal(batch, rank=rank, world_size=world, seed=seed, grad_accum=grad_accum),
    )


def write_plain(tmp_path, name, counts):
    """A shard set of tiny text samples with the given per-shard counts."""
    out = tmp_path / name
    samples = ({"__key__": f"{i:09d}", "json": {"i": i}} for i in range(sum(counts)))
    m = write_shards(samples, out, "dialogue", max_count=max(counts))
    if [s["samples"] for s in m["shards"]] != counts:  # re-cut to the exact uneven sizes
        import shutil

        shutil.rmtree(out)
        out.mkdir()
        i = 0
        shards = []
        for n, c in enumerate(counts):
            write_shards(
                ({"__key__": f"{j:09d}", "json": {"i": j}} for j in range(i, i + c)),
                tmp_path / f"part{n}",
                "dialogue",
                max_count=c,
            )
            src = tmp_path / f"part{n}" / "dialogue-000000.tar"
            src.rename(out / f"dialogue-{n:06d}.tar")
            shards.append({"name": f"dialogue-{n:06d}.tar", "samples": c})
            i += c
        (out / "manifest.json").write_text(
            json.dumps(
                {"schema_version": 1, "kind": "dialogue", "total": sum(counts), "shards": shards}
            )
        )
    return out


def corrupt_one_image(shard):
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(shard, "w") as tf:
        for i, (m, data) in enumerate(members):
            if m.name.endswith(".jpg") and i < 3:
                data = b"\xff\xd8garbage"
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


def keyphrase_posts(out, n: int, without_image) -> None:
    """`n` synthetic keyphrase posts as shards of 16 in `out`; those whose index `without_image(i)`
    picks have no image."""
    import random

    from mmtrain.data.synth import keyphrase

    samples = []
    for i in range(n):
        s = keyphrase(random.Random(i), "train")
        if without_image(i):
            s.pop("jpg")
        samples.append({"__key__": f"s{i:04d}", **s})
    write_shards(iter(samples), out, "keyphrase", max_count=16)
