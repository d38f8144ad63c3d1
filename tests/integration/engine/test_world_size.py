"""Same training at any world size, and resume on another number of ranks (2 and 4 CPU ranks).

The fast suite runs the toy LM at 1 and 2 ranks and its resumes 2 -> 1 and 1 -> 2; the heavy
group (`make test-all`) runs the harness for every recipe at 1, 2 and 4 ranks.
"""

from __future__ import annotations

import json
import re

import pytest

from mmtrain.data.synth import synth
from tests.helpers import DEMO, REPO, scalars
from tests.support import rescore
from tests.support.stage2 import stage2_assets
from tests.world_size import Case, assert_evaluates_the_same, assert_invariant, run_layout

# Tolerances: fp32 throughout; the same sums are taken in another order at another world size
# (ZeRO's reduce-scatter, the global contrastive loss's gathers), so the last bits differ; Adam
# turns those into parameter differences of up to ~1e-5 after a few steps at lr ~2e-3.
LOSS_RTOL = 1e-5


PARAM_ATOL = 1e-4


TOY = Case(DEMO, ["recipe.dropout=0.0"], global_batch=16, steps=6, losses=("lm",))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy LM trained straight through at 1 and at 2 ranks, for every test below to compare with."""
    root = tmp_path_factory.mktemp("toy")
    return {world: run_layout(TOY, root / "runs" / f"w{world}", world) for world in (1, 2)}


def test_toy_lm_trains_the_same_on_one_and_two_ranks(toy, tmp_path):
    accum = run_layout(TOY, tmp_path / "runs" / "w1ga2", 1, grad_accum=2)
    assert_invariant(
        toy[1],
        {"2 ranks": toy[2], "1 rank, grad_accum 2": accum},
        range(1, 7),
        LOSS_RTOL,
        PARAM_ATOL,
        tmp_path / "report.json",
    )
    assert toy[1].losses["lm"][6] < toy[1].losses["lm"][1]  # it trains


def test_toy_lm_evaluates_the_same_on_one_and_two_ranks(toy):
    """The 2-rank run's checkpoint scored on 1 and 2 ranks: the same loss, accuracy, count and
    rows, which are the mean over the rows' tokens (the heavy group adds 4 ranks and sharding)."""
    done = assert_evaluates_the_same(
        toy[2].run, rescore.language_model, [(1, "replica"), (2, "replica")]
    )
    assert next(iter(done.values())).result["n"] == 4 * 8  # eval_batches x micro-batch samples


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks_continues_the_same_run(toy, tmp_path, before, after):
    run = tmp_path / "runs" / f"{before}to{after}"
    run_layout(TOY, run, before, extra=["run.stop_after_steps=3"], params=False)
    resumed = run_layout(TOY, run, after)  # run.resume=auto, another world size
    log = (run / "train.log").read_text()
    assert (
        f"checkpoint written by {before} ranks, resumed on {after}" in log and "resumed from" in log
    )
    assert (run / "checkpoints" / "step_00000003" / "universal").is_dir()
    assert_invariant(
        toy[after],
        {f"{before} -> {after} ranks": resumed},
        range(4, 7),
        LOSS_RTOL,
        PARAM_ATOL,
        tmp_path / "report.json",
    )


# Every tensor partitioned (at tiny widths the default threshold keeps them all whole on every
# rank), with small buckets: parameters read outside their module's forward (attention out_proj,
# learned queries and placeholders concatenated directly) would be read partitioned here, empty.
EVERYTHING_PARTITIONED = [
    "deepspeed.param_persistence_threshold=0",
    "deepspeed.reduce_bucket_size=20000",
    "deepspeed.prefetch_bucket_size=10000",
]


def invariant_at_1_2_4(case: Case, root, rescorer, steps=None):
    """1, 2 and 4 ranks train the same, the 4 with every parameter partitioned; that run's
    checkpoint evaluates (generation included) to the same figures and rows at 1, 2 and 4 ranks,
    whole and partitioned, and `rescorer` recomputes them from its rows."""
    runs = {w: run_layout(case, root / "runs" / f"w{w}", w) for w in (1, 2)}
    runs[4] = run_layout(case, root / "runs" / "w4part", 4, extra=EVERYTHING_PARTITIONED)
    held = re.search(
        r"ZeRO-3: (\d+) of (\d+) parameter tensors partitioned",
        (runs[4].run / "train.log").read_text(),
    )
    assert held and held.group(1) == held.group(2), held and held.group(0)
    assert_evaluates_the_same(runs[4].run, rescorer)
    return runs, assert_invariant(
        runs[1],
        {"2 ranks": runs[2], "4 ranks, every tensor partitioned": runs[4]},
        steps or range(1, case.steps + 1),
        LOSS_RTOL,
        PARAM_ATOL,
        root / "report.json",
    )


@pytest.mark.heavy
def test_toy_lm_at_four_ranks(tmp_path):
    invariant_at_1_2_4(TOY, tmp_path, rescore.language_model)


@pytest.mark.heavy
def test_vikdf_stage1_global_tim_negatives(tmp_path, tiny_models, image_text_shards):
    t = tiny_models
    case = Case(
        REPO / "configs" / "demo" / "vikdf_stage1.yaml",
        [
            f"recipe.vision_path={t / 'clip'}",
            f"recipe.text_path={t / 'clip'}",
            f"recipe.bert_init={t / 'bert'}",
            f"recipe.data.train={image_text_shards / 'train'}",
            f"recipe.data.val={image_text_shards / 'val'}",
            "recipe.data.workers=1",
            "recipe.image_log_every=0",
        ],
        global_batch=16,
        steps=4,
        losses=("tim", "mim", "mtm"),
    )
    invariant_at_1_2_4(case, tmp_path, rescore.retrieval)


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2ws")
    return stage2_assets(root, 200, dropout=0.0)


@pytest.mark.heavy
@pytest.mark.parametrize("phase", ["fusion", "dialogue"])
def test_vikdf_fusion_and_dialogue(tmp_path, tiny_models, stage2, phase):
    t = tiny_models
    data = stage2 / ("it" if phase == "fusion" else "dlg")
    case = Case(
        REPO / "configs" / "demo" / f"vikdf_{phase}.yaml",
        [
            f"recipe.llm_path={t / 'llama'}",
            f"recipe.vision_path={t / 'clip'}",
            f"recipe.text_path={t / 'clip'}",
            f"recipe.stage1={stage2 / 'stage1'}",
            f"recipe.data.train={data / 'train'}",
            f"recipe.data.val={data / 'val'}",
            "recipe.data.workers=1",
        ],
        global_batch=16,
        steps=4,
        losses=("ce", "recon", "kl") if phase == "fusion" else ("ce",),
    )
    invariant_at_1_2_4(
        case, tmp_path, rescore.perplexity if phase == "fusion" else rescore.dialogue
    )


@pytest.mark.heavy
def test_dyncot_dynamic_loss_table_and_decisions(tmp_path, tiny_models):
    synth("keyphrase", str(tmp_path / "kp"), 100, seed=0)  # 80 training posts: 5 steps an epoch
    case = Case(
        REPO / "configs" / "demo" / "dyncot.yaml",
        [
            f"recipe.model_path={tiny_models / 'qwen2vl'}",
            f"recipe.data.train={tmp_path / 'kp' / 'train'}",
            f"recipe.data.val={tmp_path / 'kp' / 'val'}",
            "recipe.dynamic.warmup_epochs=1",
        ],
        global_batch=16,
        steps=7,
        losses=("sft",),
    )
    runs, _ = invariant_at_1_2_4(case, tmp_path, rescore.keyphrases)
    decisions = {
        w: [json.loads(line) for line in (r.run / "dynamic_cot.jsonl").read_text().splitlines()]
        for w, r in runs.items()
    }
    switched = {w: switched_keys(r.run) for w, r in runs.items()}
    assert 0 < len(switched[1]) < 80 and switched[1] == switched[2] == switched[4]  # the same posts
    for w in (2, 4):
        assert [d["newly_switched"] for d in decisions[w]] == [
            d["newly_switched"] for d in decisions[1]
        ]
        assert [d["gamma"] for d in decisions[w]] == pytest.approx(
            [d["gamma"] for d in decisions[1]], rel=1e-5
        )
    assert sum(scalars(runs[1].run, "stats/cot_frac")[s] for s in (6, 7)) > 0  # the decision acts
    # the loss table's checkpoint does not grow with the ranks: the shared part is saved once
    sizes = {w: loss_table_bytes(runs[w].run) for w in (2, 4)}
    assert sizes[4] == pytest.approx(sizes[2], rel=0.10), sizes
    # preempted on 2 ranks in the middle of the first epoch, resumed on 4: the loss table of the
    # epoch so far is re-sharded, and the decision at its end is the uninterrupted run's
    run = tmp_path / "runs" / "2to4"
    run_layout(case, run, 2, extra=["run.stop_after_steps=3"], params=False)
    resumed = run_layout(case, run, 4)
    assert "checkpoint written by 2 ranks, resumed on 4" in (run / "train.log").read_text()
    assert switched_keys(run) == switched[1]
    assert_invariant(
        runs[4],
        {"2 -> 4 ranks": resumed},
        range(4, 8),
        LOSS_RTOL,
        PARAM_ATOL,
        tmp_path / "resume.json",
    )


def switched_keys(run):
    """The posts a Dynamic CoT run switched to CoT, from its last checkpoint (the shared state)."""
    from mmtrain.engine.checkpoint import read_shared_state

    tag = (run / "checkpoints" / "latest").read_text().strip()
    return set(read_shared_state(run / "checkpoints" / tag)["recipe"]["tracker"]["switched"])


def loss_table_bytes(run):
    """Bytes of the recipe state in a run's last checkpoint: every rank's own plus the shared."""
    from mmtrain.engine.checkpoint import read_rank_state, read_shared_state, saved_world

    root = run / "checkpoints"
    tag = (root / "latest").read_text().strip()
    own = [read_rank_state(root / tag, r)["recipe"] for r in range(saved_world(root, tag))]
    shared = read_shared_state(root / tag).get("recipe", {})
    return sum(len(json.dumps(s)) for s in own) + len(json.dumps(shared))


@pytest.mark.heavy
def test_kdsl_per_task_adapters(tmp_path, tiny_models):
    synth("intent", str(tmp_path / "intent"), 100, seed=0)
    case = Case(
        REPO / "configs" / "demo" / "kdsl.yaml",
        [
            f"recipe.model_path={tiny_models / 'qwen2vl'}",
            f"recipe.data.train={tmp_path / 'intent' / 'train'}",
            f"recipe.data.val={tmp_path / 'intent' / 'val'}",
        ],
        global_batch=16,
        steps=4,
        losses=("scene", "intent"),
    )
    runs, _ = invariant_at_1_2_4(case, tmp_path, rescore.intents)
    # each task backpropagated before the next task's forward (the default) trains exactly as one
    # backward of both, with grad_accum 2 as well (DeepSpeed counts 2 x 2 micro-steps a step)
    one_backward = run_layout(
        case, tmp_path / "runs" / "w2joint", 2, extra=["recipe.backward_per_task=false"]
    )
    accum = run_layout(case, tmp_path / "runs" / "w2ga2", 2, grad_accum=2)
    assert_invariant(
        runs[2],
        {"2 ranks, one backward": one_backward, "2 ranks, per task, grad_accum 2": accum},
        range(1, case.steps + 1),
        LOSS_RTOL,
        PARAM_ATOL,
        tmp_path / "per_task.json",
    )
