"""The run's parts, built once (engine/run.py): the batch plan, the lifeline that lets go of the
run directory and the heartbeat however a run ends, and components made from their sections."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mmtrain.config import CheckpointConfig, Config, ConfigError, LogConfig, TrainConfig
from mmtrain.engine.components import BadStepGuard, Checkpointer, MetricsAccumulator
from mmtrain.engine.heartbeat import PeerLost
from mmtrain.engine.run import BatchPlan, Lifeline


def plan(world, **train):
    cfg = SimpleNamespace(train=TrainConfig(**train))
    return BatchPlan.of(cfg, world)


def test_the_global_batch_is_derived_once_for_the_number_of_ranks():
    p = plan(4, micro_batch_size=2, global_batch_size=32)
    assert (p.grad_accum, p.global_batch) == (4, 32)
    assert plan(2, micro_batch_size=2, grad_accum=3).global_batch == 12
    with pytest.raises(ConfigError, match="global_batch_size=30 does not split over 4 ranks"):
        plan(4, micro_batch_size=2, global_batch_size=30)


class Beat:
    def __init__(self):
        self.stopped = False

    def stop(self):
        self.stopped = True

    def explain(self, error):
        return f"rank 1 on host b last heard 40 s ago ({error})"


def test_the_lifeline_lets_go_of_the_lock_and_heartbeat_and_names_a_lost_peer(tmp_path):
    with pytest.raises(PeerLost, match="rank 1 on host b last heard 40 s ago") as caught:
        with Lifeline(tmp_path) as line:
            assert line.lock.acquire() is None
            line.heartbeat = beat = Beat()
            raise RuntimeError("[gloo] Connection closed by peer")
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert beat.stopped
    assert Lifeline(tmp_path).lock.acquire() is None  # the lock was released


def test_the_lifeline_lets_other_errors_through_as_they_are(tmp_path):
    with pytest.raises(KeyError):
        with Lifeline(tmp_path) as line:
            line.heartbeat = Beat()
            raise KeyError("a bug, not a lost peer")
    with pytest.raises(RuntimeError, match="gloo"):  # before the heartbeat: nobody to name
        with Lifeline(tmp_path):
            raise RuntimeError("[gloo] Connection closed by peer")


def test_components_take_their_config_sections(tmp_path):
    cfg = Config.__new__(Config)  # only the sections read here
    cfg.checkpoint = CheckpointConfig(every=7, best_metric="ppl", best_mode="min")
    cfg.train = TrainConfig(max_bad_steps=5, lr=3e-4)
    cfg.log = LogConfig(every=4, peak_tflops=100.0)
    ckpt = Checkpointer.of(cfg.checkpoint, tmp_path, 30, True, lambda step: tmp_path, 60)
    assert (ckpt.every, ckpt.best_metric, ckpt.best_mode, ckpt.total_steps) == (7, "ppl", "min", 30)
    guard = BadStepGuard.of(cfg.train)
    assert (guard.max_bad, guard.lr) == (5, 3e-4)
    recipe = SimpleNamespace(flops_per_sample=lambda: 1e9)
    acc = MetricsAccumulator.of(cfg.log, 30, 2, lambda t: t, recipe)
    assert (acc.every, acc.world, acc.flops_per_sample, acc.peak) == (4, 2, 1e9, 100.0)
