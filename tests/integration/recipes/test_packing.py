"""Sequence packing (`recipe.pack_tokens`) on CPU ranks under ZeRO-3 with every parameter
partitioned: a packed run trains as the padded run does (the losses step by step, the parameters
after the last step), at 1 and at 2 ranks, and a packed run stopped and resumed equals the
uninterrupted one. Dynamic CoT on posts half of which have no image, KDSL's two tasks, VIKDF's
dialogue. Tolerances: those of the world-size harness (the same sums in another order)."""

from __future__ import annotations

import re

import pytest

from mmtrain.data.synth import synth
from tests.helpers import REPO
from tests.support.shards import keyphrase_posts
from tests.support.stage2 import stage2_assets
from tests.world_size import Case, assert_invariant, run_layout

pytestmark = pytest.mark.heavy  # make test-all: about five minutes of 1- and 2-rank runs

LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-4
EVERY_TENSOR = ["deepspeed.param_persistence_threshold=0"]


def assert_every_tensor_partitioned(run):
    log = (run / "train.log").read_text()
    found = re.search(r"ZeRO-3: (\d+) of (\d+) parameter tensors partitioned", log)
    assert found and found.group(1) == found.group(2), log[-2000:]


def padded_packed(case, root, pack, worlds=(2,)):
    """The padded run on 2 ranks and the packed one on each of `worlds`."""
    padded = run_layout(case, root / "padded", 2)
    packed = {w: run_layout(case, root / f"packed{w}", w, extra=[pack]) for w in worlds}
    for t in (padded, *packed.values()):
        assert_every_tensor_partitioned(t.run)
    return padded, packed


@pytest.fixture(scope="module")
def mixed_posts(tmp_path_factory):
    """64 keyphrase posts, every second one without its image."""
    root = tmp_path_factory.mktemp("mixed")
    keyphrase_posts(root / "train", 64, without_image=lambda i: i % 2)
    return root


def test_dyncot_packed_trains_as_padded_at_one_and_two_ranks_and_resumes(
    mixed_posts, tiny_models, tmp_path
):
    case = Case(
        REPO / "configs" / "demo" / "dyncot.yaml",
        [
            f"recipe.model_path={tiny_models / 'qwen2vl'}",
            f"recipe.data.train={mixed_posts / 'train'}",
            "recipe.data.val=''",
            "recipe.strategy=sft",
            *EVERY_TENSOR,
        ],
        global_batch=8,
        steps=4,
        losses=("sft",),
    )
    pack = "recipe.pack_tokens=256"
    padded, packed = padded_packed(case, tmp_path / "runs", pack, worlds=(1, 2))
    stopped = tmp_path / "runs" / "resumed"
    run_layout(case, stopped, 2, extra=[pack, "run.stop_after_steps=2"], params=False)
    resumed = run_layout(case, stopped, 2, extra=[pack])
    assert "resumed from" in (stopped / "train.log").read_text()
    assert_invariant(
        padded,
        {"packed, 2 ranks": packed[2], "packed, 1 rank": packed[1]},
        range(1, 5),
        LOSS_RTOL,
        PARAM_ATOL,
        tmp_path / "dyncot.json",
    )
    assert_invariant(packed[2], {"packed, resumed": resumed}, range(3, 5), 0.0, 0.0, tmp_path / "r")
    from tests.helpers import scalars

    pad = scalars(padded.run, "stats/padding_frac")
    packed_pad = scalars(packed[2].run, "stats/padding_frac")
    assert max(packed_pad.values()) < min(pad.values())  # the point of it


def test_kdsl_packed_trains_as_padded(tiny_models, tmp_path):
    synth("intent", str(tmp_path / "intent"), 60, seed=0)
    case = Case(
        REPO / "configs" / "demo" / "kdsl.yaml",
        [
            f"recipe.model_path={tiny_models / 'qwen2vl'}",
            f"recipe.data.train={tmp_path / 'intent' / 'train'}",
            f"recipe.data.val={tmp_path / 'intent' / 'val'}",
            *EVERY_TENSOR,
        ],
        global_batch=8,
        steps=3,
        losses=("scene", "intent"),
    )
    padded, packed = padded_packed(case, tmp_path / "runs", "recipe.pack_tokens=512")
    assert_invariant(
        padded, {"packed": packed[2]}, range(1, 4), LOSS_RTOL, PARAM_ATOL, tmp_path / "kdsl.json"
    )


def test_vikdf_dialogue_packed_trains_as_padded(tiny_models, tmp_path):
    t, assets = tiny_models, stage2_assets(tmp_path / "assets", 80, dropout=0.0)
    case = Case(
        REPO / "configs" / "demo" / "vikdf_dialogue.yaml",
        [
            f"recipe.llm_path={t / 'llama'}",
            f"recipe.vision_path={t / 'clip'}",
            f"recipe.text_path={t / 'clip'}",
            f"recipe.stage1={assets / 'stage1'}",
            f"recipe.data.train={assets / 'dlg' / 'train'}",
            "recipe.data.val=''",
            *EVERY_TENSOR,
        ],
        global_batch=8,
        steps=3,
        losses=("ce",),
    )
    padded, packed = padded_packed(case, tmp_path / "runs", "recipe.pack_tokens=192")
    assert_invariant(
        padded, {"packed": packed[2]}, range(1, 4), LOSS_RTOL, PARAM_ATOL, tmp_path / "vikdf.json"
    )
