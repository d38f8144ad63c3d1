"""Shards: writing, the public-format converters, the distributed resumable reader, corruption."""

import json

import pytest
import torch
from PIL import Image

from mmtrain.cli import main
from mmtrain.data.convert import convert
from mmtrain.data.images import ImageTransform
from mmtrain.data.reader import DataSection, Deal, SampleDecoder, build_loader, default_collate
from mmtrain.data.shards import DataError, read_manifest, write_shards
from mmtrain.data.synth import COLORS, synth
from tests.support.shards import corrupt_one_image, loader, write_plain


def epoch_keys(ld):
    return [k for _ in range(ld.steps_per_epoch) for k in next(ld)["key"]]


@pytest.mark.parametrize("kind", ["image-text", "dialogue", "keyphrase", "intent"])
def test_synth_round_trip_and_truthful_text(tmp_path, kind):
    ms = synth(kind, str(tmp_path / kind), 50, seed=3, max_count=15)
    assert {s: m["total"] for s, m in ms.items()} == {"train": 40, "val": 5, "test": 5}
    ld = build_loader(
        DataSection(workers=0),
        str(tmp_path / kind / "train"),
        SampleDecoder(ImageTransform(), need_image=True),
        default_collate,
        Deal(8),
    )
    keys, batch = [], None
    for _ in range(ld.steps_per_epoch):
        batch = next(ld)
        keys += batch["key"]
    assert len(keys) == 40 == len(set(keys))
    assert batch["image"].shape == (8, 3, 224, 224)
    meta = batch["meta"][0]
    if kind == "image-text":
        assert meta["color"] in batch["text"][0] and meta["shape"] in batch["text"][0]
    elif kind == "dialogue":
        assert meta["color"] in meta["response"] and meta["color"] not in " ".join(meta["context"])
    elif kind == "keyphrase":
        assert meta["keyphrases"][2] in meta["text"] and meta["keyphrases"][1] in COLORS
        assert meta["keyphrases"][1] not in meta["text"] and "Answer:" in meta["rationale"]
        metas = [m for b in [next(ld) for _ in range(ld.steps_per_epoch)] for m in b["meta"]]
        # some hard posts
        assert 0 < sum(m["keyphrases"][0] not in m["text"] for m in metas) < len(metas)
    else:
        assert meta["scene"] and meta["intent"] and meta["turns"][-1]["role"] == "user"


def test_keyphrase_test_split_has_unseen_keyphrases(tmp_path):
    synth("keyphrase", str(tmp_path / "kp"), 200, seed=0)

    def kps(split):
        ld = loader(tmp_path / "kp" / split, batch=1)
        return {
            k for _ in range(ld.steps_per_epoch) for m in next(ld)["meta"] for k in m["keyphrases"]
        }

    unseen = kps("test") - kps("train")
    assert {"star", "hexagon"} & unseen


def test_writer_never_writes_into_existing_data_or_leaves_debris(tmp_path):
    synth("image-text", str(tmp_path / "d"), 10)
    with pytest.raises(DataError, match="exists and is not empty"):
        synth("image-text", str(tmp_path / "d"), 10)
    with pytest.raises(DataError, match="no valid samples"):
        write_shards(iter([]), tmp_path / "empty", "dialogue")
    assert not (tmp_path / "empty").exists() and not list(tmp_path.glob(".empty*"))
    assert (
        main(["data", "synth", "--kind", "image-text", "--out", str(tmp_path / "d"), "--n", "5"])
        == 2
    )


def png(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path)


def jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def check(manifest, written, skipped, reasons):
    r = manifest["report"]
    assert (manifest["total"], r["written"], r["skipped"]) == (written, written, skipped)
    assert set(r["reasons"]) == reasons
    assert all({"file", "line", "reason"} <= set(e) for e in r["examples"])


def read_all(spec):
    ld = loader(
        spec, batch=1, shuffle_buffer=1, shuffle_shards=0
    )  # one shard, no window: file order
    return [next(ld) for _ in range(ld.steps_per_epoch)]


class Opts:
    sep, rationales = "<sep>", None


def test_convert_image_caption_jsonl_skips_and_reports(tmp_path):
    png(tmp_path / "img" / "a.png")
    png(tmp_path / "img" / "b.jpg")
    (tmp_path / "img" / "broken.jpg").write_bytes(b"not an image")
    jsonl(
        tmp_path / "caps.jsonl",
        [
            {"image": "img/a.png", "caption": "a red box"},
            {"image": "img/b.jpg", "caption": "another red box"},
            {"image": "img/missing.jpg", "caption": "x"},
            {"image": "img/broken.jpg", "caption": "y"},
            "{not json",
            {"image": "img/a.png"},
        ],
    )
    m = convert(
        "image-caption-jsonl", [str(tmp_path / "caps.jsonl")], str(tmp_path / "out"), opts=Opts
    )
    check(m, 2, 4, {"missing image", "unreadable image", "malformed JSON", "missing field"})
    ex = {e["line"]: e["reason"] for e in m["report"]["examples"]}
    assert "missing.jpg" in ex[3] and ex[5].startswith("malformed JSON")
    batches = read_all(tmp_path / "out")
    assert [b["text"][0] for b in batches] == ["a red box", "another red box"]


def test_convert_coco(tmp_path):
    png(tmp_path / "val2017" / "000001.jpg")
    coco = {
        "images": [{"id": 1, "file_name": "000001.jpg"}],
        "annotations": [
            {"image_id": 1, "caption": "a cat"},
            {"image_id": 1, "caption": "a red cat"},
            {"image_id": 9, "caption": "orphan"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    m = convert(
        "coco",
        [str(tmp_path / "captions.json")],
        str(tmp_path / "out"),
        image_root=str(tmp_path / "val2017"),
        opts=Opts,
    )
    check(m, 2, 1, {"unknown image_id"})
    assert sorted(b["text"][0] for b in read_all(tmp_path / "out")) == ["a cat", "a red cat"]


def test_convert_dialogue_reddit_and_image_chat(tmp_path):
    png(tmp_path / "images" / "abc123.jpg")
    jsonl(
        tmp_path / "d.jsonl",
        [
            {"context": ["hi", "what's up?"], "response": "not much"},
            {
                "image_hash": "images/abc123",
                "dialog": [["Happy", "nice photo"], ["Sad", "I miss it"]],
            },
            {"context": [], "response": "x"},
            {"dialog": [["A", "only one"]]},
        ],
    )
    m = convert("dialogue-jsonl", [str(tmp_path / "d.jsonl")], str(tmp_path / "out"), opts=Opts)
    check(m, 2, 2, {"missing field", "malformed dialog"})
    metas = [b["meta"][0] for b in read_all(tmp_path / "out")]
    assert metas[0] == {"context": ["hi", "what's up?"], "response": "not much"}
    assert metas[1] == {"context": ["nice photo"], "response": "I miss it"}


def test_convert_keyphrase_lines_and_jsonl_with_rationales(tmp_path):
    png(tmp_path / "p1.jpg")
    (tmp_path / "posts.txt").write_text(
        "sunny day at the beach<sep>beach;summer<sep>p1.jpg\n"
        "bad line without fields\n"
        "no kps here<sep> <sep>p1.jpg\n"
    )
    jsonl(
        tmp_path / "r.jsonl",
        [{"id": "1", "rationale": "The photo shows sand. Answer: beach; summer"}],
    )
    Opts.rationales = str(tmp_path / "r.jsonl")
    try:
        m = convert(
            "keyphrase-lines", [str(tmp_path / "posts.txt")], str(tmp_path / "lines"), opts=Opts
        )
    finally:
        Opts.rationales = None
    check(m, 1, 2, {"malformed line", "missing keyphrases"})
    meta = read_all(tmp_path / "lines")[0]["meta"][0]
    assert meta == {
        "text": "sunny day at the beach",
        "keyphrases": ["beach", "summer"],
        "rationale": "The photo shows sand. Answer: beach; summer",
    }
    jsonl(
        tmp_path / "posts.jsonl",
        [
            {"text": "t", "keyphrases": "a;b", "image": "p1.jpg"},
            {"text": "u", "keyphrases": ["c"], "image": "p1.jpg", "rationale": "why"},
        ],
    )
    m = convert("keyphrase-jsonl", [str(tmp_path / "posts.jsonl")], str(tmp_path / "js"), opts=Opts)
    check(m, 2, 0, set())
    assert [b["meta"][0]["keyphrases"] for b in read_all(tmp_path / "js")] == [["a", "b"], ["c"]]


def test_convert_llava_intent(tmp_path):
    png(tmp_path / "s.png")
    recs = [
        {
            "id": "1",
            "image": "s.png",
            "scene": "logistics",
            "intent": "track_package",
            "conversations": [
                {"from": "human", "value": "<image>\nWhere is my parcel?"},
                {"from": "gpt", "value": "Let me check."},
            ],
        },
        {"id": "2", "image": "s.png", "conversations": [{"from": "human", "value": "hi"}]},
    ]
    (tmp_path / "intent.json").write_text(json.dumps(recs))
    m = convert("llava-intent", [str(tmp_path / "intent.json")], str(tmp_path / "out"), opts=Opts)
    check(m, 1, 1, {"missing field"})
    meta = read_all(tmp_path / "out")[0]["meta"][0]
    assert (
        meta["turns"][0] == {"role": "user", "text": "Where is my parcel?"}
        and meta["scene"] == "logistics"
    )


def test_convert_with_no_valid_sample_writes_nothing(tmp_path):
    jsonl(tmp_path / "caps.jsonl", [{"image": "nope.jpg", "caption": "x"}])
    with pytest.raises(
        DataError, match=r"no valid samples in 1 records .*caps.jsonl:1: missing image"
    ):
        convert(
            "image-caption-jsonl", [str(tmp_path / "caps.jsonl")], str(tmp_path / "out"), opts=Opts
        )
    assert not (tmp_path / "out").exists()
    assert (
        main(
            [
                "data",
                "convert",
                "--from",
                "coco",
                "--input",
                str(tmp_path / "nope.json"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


def test_two_ranks_two_workers_uneven_shards_exact_epoch(tmp_path):
    spec = write_plain(tmp_path, "uneven", [23, 5, 14])  # 42 samples
    per_rank = {}
    for rank in range(2):
        ld = loader(spec, batch=4, rank=rank, world=2, workers=2)
        assert ld.steps_per_epoch == 5  # 21 per rank -> 5 batches of 4
        per_rank[rank] = epoch_keys(ld)
    a, b = per_rank[0], per_rank[1]
    assert len(a) == len(b) == 20 and len(set(a)) == 20 and len(set(b)) == 20
    assert not set(a) & set(b)  # no sample twice in the epoch


def test_resume_sees_exactly_the_remaining_batches(tmp_path):
    spec = write_plain(tmp_path, "r", [13, 7, 11])
    straight = loader(spec, batch=3, workers=2, seed=5)
    want = [next(straight)["key"] for _ in range(17)]  # crosses into epoch 2
    first = loader(spec, batch=3, workers=2, seed=5)
    got = [next(first)["key"] for _ in range(7)]
    state = first.state_dict()
    resumed = loader(spec, batch=3, workers=2, seed=5)
    resumed.load_state_dict(state)
    got += [next(resumed)["key"] for _ in range(10)]
    assert got == want
    other = loader(spec, batch=3, workers=2, seed=6)
    assert [next(other)["key"] for _ in range(3)] != want[:3]  # the seed matters


def test_data_workers_start_once_and_serve_every_epoch(tmp_path):
    """Persistent workers: a new epoch (and its plan, through shared memory) costs no fork."""
    spec = write_plain(tmp_path, "p", [13, 7, 11])
    ld = loader(spec, batch=3, workers=2, seed=5)
    next(ld)
    pids = [w.pid for w in ld._it._workers]
    epochs = []
    for _ in range(3 * ld.steps_per_epoch):
        epochs.append(ld.epoch)
        next(ld)
    assert set(epochs) == {0, 1, 2} and [w.pid for w in ld._it._workers] == pids
    ld.close()  # stopped on request, and started again (new workers) where it left off
    assert ld._it is None and next(ld)["key"]


# (world, micro_batch_size, grad_accum, workers): four ways to make a global batch of 8
LAYOUTS = [(1, 8, 1, 0), (2, 4, 1, 2), (4, 2, 1, 1), (1, 4, 2, 2), (2, 2, 2, 0)]


def global_batches(spec, world, batch, ga, workers, steps, states=None, **kw):
    """The samples of each optimizer step, over all ranks: {step: sorted keys}; and each rank's state."""
    lds = [
        loader(spec, batch=batch, rank=r, world=world, workers=workers, grad_accum=ga, seed=3, **kw)
        for r in range(world)
    ]
    if states is not None:
        for r, ld in enumerate(lds):
            ld.load_state_dict(ld.reshard_state(states, r, world))
    out = []
    for _ in range(steps):
        out.append(sorted(k for ld in lds for _ in range(ga) for k in next(ld)["key"]))
    return out, [ld.state_dict() for ld in lds]


def test_global_batches_do_not_depend_on_world_size_accumulation_or_workers(tmp_path):
    spec = write_plain(tmp_path, "u", [23, 5, 30, 9])  # 67 samples: 8 steps of 8, 3 sit out
    runs = [
        global_batches(spec, w, b, ga, wk, 10, shuffle_buffer=20)[0] for w, b, ga, wk in LAYOUTS
    ]
    for other in runs[1:]:
        assert other == runs[0]
    epoch = [k for batch in runs[0][:8] for k in batch]
    assert len(epoch) == len(set(epoch)) == 64  # each sample at most once per epoch
    assert runs[0][8:] != runs[0][:2]  # epoch 2 is dealt anew
    assert runs[0][0] != sorted(f"{i:09d}" for i in range(8))  # shuffled, not file order


@pytest.mark.parametrize(
    "before,after",
    [((2, 4, 1, 2), (1, 8, 1, 0)), ((1, 8, 1, 0), (4, 2, 1, 1)), ((2, 4, 1, 2), (1, 4, 2, 2))],
)
def test_resume_on_another_world_size_continues_the_epoch(tmp_path, before, after):
    spec = write_plain(tmp_path, "u", [23, 5, 30, 9])
    want, _ = global_batches(spec, *before, 11, shuffle_buffer=20)  # crosses into epoch 2
    first, states = global_batches(spec, *before, 5, shuffle_buffer=20)
    rest, _ = global_batches(spec, *after, 6, states=states, shuffle_buffer=20)
    assert first + rest == want


def test_shard_index_reads_what_webdataset_reads_and_stops_at_a_cut(tmp_path):
    from mmtrain.data.shards import ShardIndex, iter_shard

    synth("image-text", str(tmp_path / "d"), 60, max_count=30)
    shard = sorted((tmp_path / "d" / "train").glob("*.tar"))[0]
    streamed = [s for _, s in iter_shard(shard)]
    index = ShardIndex(shard)
    assert len(index) == len(streamed) and index.error is None
    assert [s for _, s in index.read([5, 0, 7])] == [streamed[5], streamed[0], streamed[7]]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    cut = ShardIndex(shard)
    assert 0 < len(cut) < len(streamed) and "cut off" in cut.error
    assert [s for _, s in cut.read(range(len(cut)))] == streamed[: len(cut)]


def test_resume_with_another_global_batch_is_refused_by_name(tmp_path):
    spec = write_plain(tmp_path, "u", [40])
    _, states = global_batches(spec, 2, 4, 1, 0, 2)
    ld = loader(spec, batch=4, world=1)
    with pytest.raises(
        DataError, match=r"global batch of 8 samples .* this run has 4 .*set train.grad_accum"
    ):
        ld.load_state_dict(ld.reshard_state(states, 0, 1))
    same_world = loader(spec, batch=2, rank=0, world=2)  # the micro-batch alone changed
    with pytest.raises(DataError, match=r"global batch of 8 samples .* this run has 4 "):
        same_world.load_state_dict(states[0])


def test_resampled_mode_fixed_steps(tmp_path):
    spec = write_plain(tmp_path, "r", [6, 3])
    ld = loader(spec, batch=4, workers=2, mode="resampled", steps_per_epoch=5)
    for _ in range(5):
        assert len(next(ld)["key"]) == 4
    assert ld.epoch == 0 and next(ld) and ld.epoch == 1
    with pytest.raises(DataError, match="needs data.steps_per_epoch"):
        loader(spec, mode="resampled")


@pytest.mark.chaos
def test_corrupt_sample_and_truncated_shard_are_counted_then_stop_the_run(tmp_path):
    synth("image-text", str(tmp_path / "d"), 100, max_count=20)
    train = tmp_path / "d" / "train"
    shards = sorted(train.glob("*.tar"))
    corrupt_one_image(shards[0])
    size = shards[1].stat().st_size
    with open(shards[1], "r+b") as f:  # cut a shard in the middle
        f.truncate(size // 2)
    kw = dict(workers=2, shuffle_buffer=4)
    dec = SampleDecoder(ImageTransform(resize=32, crop=32), need_image=True)
    ld = build_loader(
        DataSection(max_skip_fraction=0.5, **kw), str(train), dec, default_collate, Deal(8)
    )
    sizes = [next(ld)["image"].shape[0] for _ in range(ld.steps_per_epoch)]
    assert sizes == [8] * 10  # fixed shapes, fixed steps
    assert 1 + 5 <= ld.skipped <= 1 + 15 and ld.stats() == {"skipped": ld.skipped, "seen": 80}
    strict = build_loader(
        DataSection(max_skip_fraction=0.01, skip_window=8, **kw),
        str(train),
        dec,
        default_collate,
        Deal(8),
    )
    with pytest.raises(
        DataError, match=r"samples unreadable in .*train \(> data.max_skip_fraction=0.01\)"
    ):
        for _ in range(10):
            next(strict)


class FailOn:
    """Decodes plain samples, raising for the keys given (a corrupt sample)."""

    def __init__(self, bad):
        self.bad = set(bad)

    def __call__(self, raw):
        if raw["__key__"] in self.bad:
            raise ValueError("cannot identify image file")
        return {"key": raw["__key__"]}


@pytest.mark.chaos
def test_a_realistic_corrupt_rate_does_not_stop_the_run_and_a_high_one_does_with_rate_and_count(
    tmp_path,
):
    spec = write_plain(tmp_path, "web", [800, 800])
    first = [f"{i:09d}" for i in range(0, 1600, 200)]  # 8 of 1,600 (0.5%), spread out
    ld = build_loader(
        DataSection(workers=0, shuffle_buffer=64),
        str(spec),
        FailOn(first),
        default_collate,
        Deal(64),
    )
    for _ in range(ld.steps_per_epoch):  # one in the first batch already
        next(ld)
    assert ld.skipped == 8 and ld.seen == 1600
    bad = [f"{i:09d}" for i in range(0, 1600, 40)]  # 40 of 1,600 (2.5%)
    ld = build_loader(
        DataSection(workers=0, shuffle_buffer=64),
        str(spec),
        FailOn(bad),
        default_collate,
        Deal(64),
    )
    with pytest.raises(
        DataError,
        match=r"^1[1-9] of \d+ samples unreadable .*max_skip_fraction=0.01\): 2\.\d+% of the "
        r"samples seen on rank 0, judged over at least data.skip_window=1000",
    ):
        for _ in range(ld.steps_per_epoch):
            next(ld)


@pytest.mark.chaos
def test_a_sample_missing_a_part_is_skipped_and_counted_not_a_crash(tmp_path):
    samples = [{"__key__": f"{i:09d}", "json": {"i": i}, "txt": f"caption {i}"} for i in range(16)]
    del samples[15]["txt"]  # the caption lost with the tar's end
    write_shards(iter(samples), tmp_path / "cut", "image-text", max_count=16)
    ld = build_loader(
        DataSection(workers=0, shuffle_buffer=1, max_skip_fraction=0.5),
        str(tmp_path / "cut"),
        SampleDecoder(),
        default_collate,
        Deal(8),
    )
    batches = [next(ld) for _ in range(ld.steps_per_epoch)]
    assert [len(b["text"]) for b in batches] == [8, 8] and ld.skipped == 1
    assert "000000015" not in [k for b in batches for k in b["key"]]


def test_bad_shard_specs_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="manifest.json is missing"):
        loader(tmp_path)
    spec = write_plain(tmp_path, "s", [4])
    with pytest.raises(DataError, match=r"shard not found: .*dialogue-000001.tar \(and 2 more\)"):
        loader(f"{spec}/dialogue-{{000000..000003}}.tar")
    with pytest.raises(DataError, match="cannot fill one global batch of 6"):
        loader(spec, batch=3, world=2)
    (spec / "manifest.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(spec)


def test_image_transform_matches_the_hf_processor(tmp_path):
    import numpy as np
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56})
    proc.save_pretrained(tmp_path)
    ours = ImageTransform.from_pretrained(str(tmp_path), fast=False)
    assert (ours.resize, ours.crop) == (64, 56)
    for shape in [(90, 130, 3), (130, 90, 3), (64, 64, 3)]:
        im = Image.fromarray((np.random.default_rng(0).random(shape) * 255).astype("uint8"))
        want = proc(images=im, return_tensors="pt")["pixel_values"][0]
        got = ours(im)
        assert got.dtype == torch.uint8  # what the workers ship: normalised on the device
        torch.testing.assert_close(ours.normalize(got), want, atol=1e-5, rtol=1e-5)


def test_bench_data_reports_throughput(tmp_path, capsys):
    synth("image-text", str(tmp_path / "d"), 60)
    assert (
        main(
            [
                "bench",
                "data",
                str(tmp_path / "d" / "train"),
                "--workers",
                "0",
                "--batch-size",
                "8",
                "--batches",
                "3",
            ]
        )
        == 0
    )
    row = json.loads(capsys.readouterr().out)
    assert row["samples_per_s"] > 0 and row["workers"] == 0


def test_reading_leaves_the_training_rng_alone(tmp_path):
    """A resumed run opens its DataLoader at another point of the RNG stream than the uninterrupted
    one; if opening it drew from the global RNG, dropout and sampling would diverge after a resume."""
    spec = write_plain(tmp_path, "rng", [12])
    ld = loader(spec, batch=2, workers=2)
    before = torch.get_rng_state()
    next(ld)
    assert torch.equal(before, torch.get_rng_state())


def test_eval_mode_sees_every_sample_once_with_equal_steps(tmp_path):
    spec = write_plain(tmp_path, "ev", [13, 10])  # 23 samples over 2 ranks
    seen = []
    for rank in range(2):
        ld = loader(spec, batch=4, rank=rank, world=2, workers=2, mode="eval")
        assert ld.steps_per_epoch == 3  # ceil(ceil(23 / 2) / 4)
        batches = [next(ld)["key"] for _ in range(3)]
        assert all(len(b) == 4 for b in batches) and ld.skipped == 0
        seen += [k for b in batches for k in b]
    assert len(set(seen)) == 23 and len(seen) == 24  # one repeat fills the last batch


def test_close_stops_the_workers_at_once_and_reading_continues_where_it_stopped(tmp_path):
    """A loader held in a reference cycle (as a trainer holds it) and left to the garbage
    collector took 5 s per worker to stop: the pipeline paid it between every two stages."""
    import multiprocessing
    import time

    spec = write_plain(tmp_path, "c", [13, 7, 11])
    straight = loader(spec, batch=3, workers=2, seed=5)
    want = [next(straight)["key"] for _ in range(9)]
    straight.close()
    ld = loader(spec, batch=3, workers=2, seed=5)
    ld.cycle = ld  # as in a trainer: only the garbage collector would free it
    got = [next(ld)["key"] for _ in range(4)]
    assert len(multiprocessing.active_children()) == 2
    t0 = time.perf_counter()
    ld.close()
    assert time.perf_counter() - t0 < 2.0
    assert multiprocessing.active_children() == []
    got += [next(ld)["key"] for _ in range(5)]  # new workers, from the next batch on
    ld.close()
    assert got == want


@pytest.mark.chaos
def test_shards_changed_between_stop_and_resume_are_refused_or_start_the_next_epoch(
    tmp_path, caplog
):
    """Two shards added and the directory re-indexed used to resume silently: one sample twice,
    another never, 25 steps an epoch became 31."""
    import shutil

    spec = write_plain(tmp_path, "grow", [12, 12])
    first = loader(spec, batch=4, seed=1)
    seen = [k for _ in range(3) for k in next(first)["key"]]
    state = first.state_dict()
    more = write_plain(tmp_path, "more", [12, 12, 12])  # the same 24 samples and 12 new ones
    shutil.rmtree(spec)
    shutil.copytree(more, spec)
    with pytest.raises(
        DataError,
        match=r"the shards changed since the checkpoint: 2 shards, 24 samples then, 3 and 36 now; "
        r"resuming would mix two epoch plans in epoch 0.*recipe.data.on_change=next_epoch",
    ):
        loader(spec, batch=4, seed=1).load_state_dict(state)
    resumed = loader(spec, batch=4, seed=1, on_change="next_epoch")
    with caplog.at_level("WARNING", logger="mmtrain"):
        resumed.load_state_dict(state)
    assert "the rest of epoch 0 is skipped (3 of its 6 batches done)" in caplog.text
    assert resumed.epoch == 1 and resumed.steps_per_epoch == 9  # the new plan, from its start
    assert len(set(epoch_keys(resumed))) == 36 and len(seen) == 12
    unchanged = loader(more, batch=4, seed=1)
    unchanged.load_state_dict(loader(more, batch=4, seed=1).state_dict())  # same shards: fine


def test_tars_the_manifest_does_not_list_are_named_at_start_up(tmp_path, caplog):
    import shutil

    spec = write_plain(tmp_path, "extra", [8, 8])
    shutil.copy(spec / sorted(p.name for p in spec.glob("*.tar"))[0], spec / "zz-new.tar")
    with caplog.at_level("WARNING", logger="mmtrain"):
        loader(spec, batch=4)
    assert "1 tar(s) in the directory are not in its manifest and are not read: zz-new.tar" in (
        caplog.text
    )


def test_metadata_is_read_without_the_images(tmp_path):
    """What a recipe derives from its training split (a vocabulary, a label set) reads the tar
    headers and the json members alone: the images, most of a shard's bytes, are seeked over,
    and no read-ahead buffer pulls them in around the headers (issue 30)."""
    from mmtrain.data.shards import iter_metas

    n, image = 96, bytes(64 << 10)  # 64 KiB a sample: never decoded, so any bytes do
    samples = (
        {"__key__": f"{i:09d}", "jpg": image, "json": {"label": f"l{i % 3}"}} for i in range(n)
    )
    write_shards(samples, tmp_path / "big", "intent", max_count=32)

    def bytes_read():
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar")).split()[1])

    before = bytes_read()
    metas = [(key, meta["label"]) for _, key, meta in iter_metas(tmp_path / "big")]
    read = bytes_read() - before
    assert metas == [(f"{i:09d}", f"l{i % 3}") for i in range(n)]
    # the headers (with their pax records, about 3 KiB a sample) and the json: 5% of the images
    assert read < 0.1 * n * len(image), (
        f"{read / 2**20:.2f} MiB read, images {n * len(image) / 2**20:.1f} MiB"
    )


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_tar_header_scan_agrees_with_tarfile(tmp_path, fmt):
    """The shard index's own header reader finds every regular file where tarfile does: long and
    non-ASCII names, ustar prefixes, directories and links skipped, in each format writers use."""
    import io
    import os
    import tarfile

    from mmtrain.data.shards import TarFormatError, tar_members

    fmts = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
    names = ["a.jpg", "d" * 90 + "/" + "k" * 60 + ".json", "caf\u00e9-\u56fe.txt", "z" * 99 + ".x"]
    if fmt == "ustar":
        names = [n for n in names if n.isascii() and len(n.split("/")[-1]) < 100]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmts[fmt]) as tf:
        d = tarfile.TarInfo("adir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for i, name in enumerate(names):
            data = bytes([i]) * (700 * i + 3)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("alink")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tf.addfile(link)
    with tarfile.open(path) as tf:
        want = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    fd = os.open(path, os.O_RDONLY)
    try:
        assert list(tar_members(fd, os.fstat(fd).st_size)) == want
        cut = want[-1][1] + 10  # inside the last member's data
        with pytest.raises(TarFormatError, match="cut off"):
            list(tar_members(fd, cut))
    finally:
        os.close(fd)
    path.write_bytes(b"not a tar" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(TarFormatError, match="not a tar header"):
            list(tar_members(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)
