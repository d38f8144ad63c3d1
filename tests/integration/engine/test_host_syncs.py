"""The host-sync budget: outside log steps, mmtrain's own code reads one value from the device per
optimizer step (the step's non-finite flags with the stop flag), whatever the recipe, the number of
micro-batches or the parts of a micro-batch. Counted on 2 CPU ranks with `log.count_host_syncs`
(engine/syncs.py wraps Tensor.item, tolist, __bool__, __float__ and __int__).

Measured before (toy LM, grad_accum 2): 10 of mmtrain's own per step (the finiteness check and the
count all-reduce read per micro-step, every loss read for logging per micro-step, the stop flag,
the progress bar's loss) beside the libraries' 3 (DeepSpeed's grad-norm check, torch's Adam step
counter)."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import List, Tuple

import pytest

from mmtrain.data.synth import synth
from tests.helpers import REPO, scalars, train
from tests.support.stage2 import stage2_assets

LINE = re.compile(r"as \(mmtrain's, the libraries'\): (\[.*\])")


def syncs_per_step(run: Path) -> List[Tuple[int, int]]:
    """Every non-log step's (mmtrain's, the libraries') syncs, in order, from train.log."""
    steps = []
    for match in LINE.finditer((run / "train.log").read_text()):
        steps += ast.literal_eval(match.group(1))
    return steps


COUNT = [
    "log.count_host_syncs=true",
    "log.every=4",
    "eval.every=0",
    "eval.at_end=false",
    "checkpoint.every=0",
    "train.grad_accum=2",
]


def assert_one_per_step(run: Path, steps: int) -> None:
    counted = syncs_per_step(run)
    assert len(counted) == len([s for s in range(1, steps) if s % 4]), counted  # log steps: out
    # the first step also holds start-up work (DeepSpeed's first partitioning reads)
    assert [own for own, _ in counted[1:]] == [1] * (len(counted) - 1), counted


@pytest.mark.heavy  # make test-all (15 s): `make test` measured 9 min 54 s without it
def test_toy_lm_reads_the_device_once_per_step_and_a_bad_micro_batch_costs_only_its_step(
    tmp_path,
):
    run = tmp_path / "runs" / "toy"
    # the 5th micro-batch (step 3) is not finite: replaced, counted, and read again
    train(run, [*COUNT, "train.steps=9", "recipe.inject_nan_at_calls=[5]"])
    counted = [own for own, _ in syncs_per_step(run)]  # steps 1, 2, 3, 5, 6, 7 (4, 8, 9 log)
    assert counted[2] > 1 and counted[1:2] + counted[3:] == [1] * 4, counted
    assert scalars(run, "train/bad_steps")[4] == 1  # counted once, as before
    assert scalars(run, "train/host_syncs_per_step")[8] == 1


@pytest.mark.heavy
def test_every_recipe_reads_the_device_once_per_step(tmp_path, tiny_models, image_text_shards):
    """Stage 1 (global contrastive loss), fusion and dialogue (BVIF, LoRA), Dynamic CoT (per-sample
    hardness) and KDSL (one backward per task: two parts a micro-batch), 6 steps of 2 micro-batches
    each on 2 ranks; Dynamic CoT and dialogue packed too (`recipe.pack_tokens`)."""
    t = tiny_models
    synth("keyphrase", str(tmp_path / "kp"), 100, seed=0)
    synth("intent", str(tmp_path / "intent"), 100, seed=0)
    stage2 = stage2_assets(tmp_path / "stage2", 100)
    llm = [
        f"recipe.llm_path={t / 'llama'}",
        f"recipe.vision_path={t / 'clip'}",
        f"recipe.text_path={t / 'clip'}",
        f"recipe.stage1={stage2 / 'stage1'}",
    ]
    cases = {
        "vikdf_fusion": [
            *llm,
            f"recipe.data.train={stage2 / 'it' / 'train'}",
            f"recipe.data.val={stage2 / 'it' / 'val'}",
        ],
        "vikdf_dialogue": [
            *llm,
            f"recipe.data.train={stage2 / 'dlg' / 'train'}",
            f"recipe.data.val={stage2 / 'dlg' / 'val'}",
        ],
        "vikdf_stage1": [
            f"recipe.vision_path={t / 'clip'}",
            f"recipe.text_path={t / 'clip'}",
            f"recipe.bert_init={t / 'bert'}",
            f"recipe.data.train={image_text_shards / 'train'}",
            f"recipe.data.val={image_text_shards / 'val'}",
            "recipe.image_log_every=0",
        ],
        "dyncot": [
            f"recipe.model_path={t / 'qwen2vl'}",
            f"recipe.data.train={tmp_path / 'kp' / 'train'}",
            f"recipe.data.val={tmp_path / 'kp' / 'val'}",
            "recipe.dynamic.warmup_epochs=1",
        ],
        "kdsl": [
            f"recipe.model_path={t / 'qwen2vl'}",
            f"recipe.data.train={tmp_path / 'intent' / 'train'}",
            f"recipe.data.val={tmp_path / 'intent' / 'val'}",
        ],
    }
    cases["dyncot_packed"] = [*cases["dyncot"], "recipe.pack_tokens=256"]
    cases["vikdf_dialogue_packed"] = [*cases["vikdf_dialogue"], "recipe.pack_tokens=192"]
    for name, overrides in cases.items():
        run = tmp_path / "runs" / name
        train(
            run,
            [*overrides, *COUNT, "train.steps=6", "train.micro_batch_size=4"],
            config=REPO / "configs" / "demo" / f"{name.removesuffix('_packed')}.yaml",
            timeout=600,
        )
        assert_one_per_step(run, 6)
