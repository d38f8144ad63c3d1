"""The trainer's components, each on its own: no ranks, no DeepSpeed, no model."""

import json

import pytest
import torch

from mmtrain.engine.components import (
    BadStepGuard,
    Checkpointer,
    MetricsAccumulator,
    StopPolicy,
    TooManyBadSteps,
)
from mmtrain.recipes.base import StepOutput

NAN = {"lm": torch.tensor(float("nan"))}


def test_bad_step_guard_stops_after_max_bad_in_a_row_and_an_applied_step_resets_the_count():
    guard = BadStepGuard(max_bad=3, lr=1e-3)
    guard.bad_micro_batch(1, NAN)
    guard.optimizer_step(1, applied=False, grad_norm=float("inf"))
    guard.optimizer_step(2, applied=True, grad_norm=1.0)  # resets the run of bad steps
    assert (guard.consecutive, guard.total) == (0, 2)
    guard.bad_micro_batch(3, NAN)
    guard.bad_micro_batch(3, NAN)
    with pytest.raises(TooManyBadSteps, match=r"3 consecutive non-finite losses \(train.max_bad"):
        guard.bad_micro_batch(3, NAN)
    assert guard.total == 5


def test_bad_step_guard_names_the_lr_when_updates_keep_overflowing():
    guard = BadStepGuard(max_bad=2, lr=1e6)
    guard.optimizer_step(1, applied=False, grad_norm=None)
    with pytest.raises(TooManyBadSteps, match=r"skipped optimizer steps.*train.lr \(now 1e\+06\)"):
        guard.optimizer_step(2, applied=False, grad_norm=None)


def micro(loss, samples=4, tokens=40, flops=None, stat=None):
    out = StepOutput(losses={}, samples=samples, tokens=tokens, flops=flops)
    if stat is not None:
        out.stats["scale"] = stat
    return torch.tensor(loss), {"lm": torch.tensor(loss)}, out


def test_metrics_are_means_over_micro_batches_and_ranks_and_throughput_counts_every_rank():
    two_ranks = lambda t: t * 2  # noqa: E731  (both ranks reported the same sums)
    acc = MetricsAccumulator(5, 12, 2, two_ranks, flops_per_sample=1e12, peak_tflops=10.0)
    acc.add(*micro(1.0, stat=3.0))
    acc.add(*micro(3.0, stat=5.0))
    acc.step_done()
    values = acc.reduce()
    assert values["loss/total"] == values["loss/lm"] == 2.0
    assert values["stats/scale"] == 4.0
    elapsed = 16 / values["train/samples_per_s"]  # 2 ranks x 2 micro-batches x 4 samples
    assert values["train/tokens_per_s"] == pytest.approx(160 / elapsed)
    assert values["train/step_time_s"] == pytest.approx(elapsed)
    # 16 samples x 1e12 FLOPs over 2 devices
    assert values["train/tflops_per_device"] == pytest.approx(8 / elapsed)
    assert values["train/mfu"] == pytest.approx(values["train/tflops_per_device"] / 10.0)
    assert acc.sums.micro == 0 and acc.steps == 0  # counting starts again


def test_metrics_prefer_a_micro_batchs_own_flops_and_log_on_schedule_and_at_the_end():
    acc = MetricsAccumulator(5, 12, 1, lambda t: t, flops_per_sample=1.0, peak_tflops=None)
    acc.add(*micro(1.0, samples=2, flops=7.0))
    acc.add(*micro(1.0, samples=2))
    assert acc.sums.flops == 9.0
    assert "train/mfu" not in acc.reduce()  # no peak known: no MFU
    assert [s for s in range(1, 13) if acc.due(s)] == [5, 10, 12]


def checkpointer(tmp_path, saved, mode="max", every=10):
    def write(step):
        saved.append(step)
        return tmp_path / f"step_{step}"

    return Checkpointer(tmp_path, every, 30, "acc", mode, True, write)


def test_checkpointer_saves_on_schedule_but_not_at_the_end_twice(tmp_path):
    saved = []
    c = checkpointer(tmp_path, saved)
    assert [s for s in range(1, 31) if c.due(s)] == [10, 20]  # the end is saved apart
    c.save(20)
    c.save_unless_saved(20)
    c.save_unless_saved(30)
    assert saved == [20, 30]


@pytest.mark.parametrize(
    "mode,values,best", [("max", [0.5, 0.4, 0.7], 0.7), ("min", [0.5, 0.6, 0.2], 0.2)]
)
def test_checkpointer_keeps_the_best_by_the_metric(tmp_path, mode, values, best):
    saved = []
    c = checkpointer(tmp_path, saved, mode)
    for step, v in zip([5, 10, 15], values):
        c.consider(step, {"acc": v, "n": 3})
    assert saved == [5, 15]  # the worse value at step 10 saved nothing
    assert (tmp_path / "best").read_text() == "step_00000015"
    assert json.loads((tmp_path / "best.json").read_text())["acc"] == best
    c.consider(20, {"n": 3})  # an evaluation without the metric: nothing
    assert saved == [5, 15]


def test_a_resumed_checkpointer_compares_with_the_best_before_the_resume(tmp_path):
    saved = []
    first = checkpointer(tmp_path, saved)
    first.consider(5, {"acc": 0.9})
    again = checkpointer(tmp_path, saved)
    again.resumed(10)
    again.consider(15, {"acc": 0.8})
    again.save_unless_saved(10)
    assert saved == [5]  # 0.8 is no better than 0.9; step 10 is the checkpoint resumed from


def test_stop_policy_asks_every_rank_and_splits_only_before_the_end():
    flag = {"set": False}
    asked = []

    def any_rank(x):
        asked.append(x)
        return x

    stop = StopPolicy(lambda: flag["set"], stop_after_steps=3, total_steps=5, any_rank=any_rank)
    assert not stop.signal()
    flag["set"] = True
    assert stop.signal() and asked == [False, True]
    assert [s for s in range(1, 6) if stop.split_here(s)] == [3, 4]
    assert not StopPolicy(lambda: False, None, 5, any_rank).split_here(3)
