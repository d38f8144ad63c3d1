"""Memory on real inputs: activation checkpointing lowers the measured peak of a training step."""

from __future__ import annotations

import pytest

from tests.helpers import scalars, train


@pytest.mark.heavy
def test_activation_checkpointing_lowers_peak_memory_and_changes_no_loss(tmp_path):
    # activations dominate: 8 layers over 1,024 tokens (eager attention keeps 4 x 1,024 x 1,024
    # scores a layer), a 256-wide model of 6.4M parameters
    peak, losses = {}, {}
    for on in (False, True):
        run = tmp_path / f"checkpointing_{on}"
        train(
            run,
            [
                "recipe.seq_len=1024",
                "recipe.hidden_size=256",
                "recipe.num_layers=8",
                "recipe.num_heads=4",
                "recipe.dropout=0.0",
                "train.micro_batch_size=4",
                "train.steps=2",
                "log.every=1",
                "eval.every=0",
                "eval.at_end=false",
                "checkpoint.every=1000",
                "deepspeed.zero_stage=0",
                f"train.activation_checkpointing={str(on).lower()}",
            ],
            world=1,
            timeout=600,
        )
        peak[on] = max(scalars(run, "train/peak_memory_gib").values())  # process peak RSS
        losses[on] = scalars(run, "loss/lm")
        if on:
            assert "activation checkpointing on in: lm" in (run / "train.log").read_text()
    print(f"peak RSS: {peak[False]:.2f} GiB without checkpointing, {peak[True]:.2f} GiB with")
    assert peak[True] < 0.8 * peak[False], peak
    assert losses[True] == losses[False]  # the same forward, run again in the backward


@pytest.mark.heavy
def test_activation_checkpointing_under_zero3_with_lora_changes_no_loss(tmp_path, tiny_models):
    """KDSL's Qwen2-VL with one LoRA adapter per task (the base frozen: its inputs need no
    gradient, which non-reentrant checkpointing allows), partitioned on 2 ranks. The backward
    pass used to recompute the scene task's layers through the intent adapter (intent's loss
    at step 2: 4.936 instead of 4.695)."""
    from mmtrain.data.synth import synth
    from tests.helpers import REPO

    synth("intent", str(tmp_path / "intent"), 40, seed=0)
    losses = {}
    for on in (False, True):
        run = tmp_path / f"checkpointing_{on}"
        train(
            run,
            [
                f"recipe.model_path={tiny_models / 'qwen2vl'}",
                f"recipe.data.train={tmp_path / 'intent' / 'train'}",
                f"recipe.data.val={tmp_path / 'intent' / 'val'}",
                "recipe.data.workers=0",
                "train.micro_batch_size=2",
                "train.steps=3",
                "log.every=1",
                "eval.every=0",
                "eval.at_end=false",
                "deepspeed.zero_stage=3",
                "deepspeed.precision=fp32",
                "deepspeed.param_persistence_threshold=0",
                # one backward of both tasks: the recomputation of the scene task then happens
                # while the intent adapter is active (per-task backward would hide the bug)
                "recipe.backward_per_task=false",
                f"train.activation_checkpointing={str(on).lower()}",
            ],
            world=2,
            config=REPO / "configs" / "demo" / "kdsl.yaml",
            timeout=600,
        )
        losses[on] = scalars(run, "loss/total")
        if on:
            assert (
                "activation checkpointing on in: model.base_model.model"
                in (run / "train.log").read_text()
            )
    assert sorted(losses[True]) == [1, 2, 3] and losses[True] == losses[False]
