"""A micro-batch in parts (`Recipe.step_parts`): each part is backpropagated before the next part's
forward is built, counted as a DeepSpeed micro-step, and a non-finite part is dropped alone."""

from __future__ import annotations

import pytest
import torch

from mmtrain.engine.components import BadStepGuard
from mmtrain.engine.dist import DistEnv
from mmtrain.engine.trainer import Trainer
from mmtrain.recipes.base import GlobalMean, StepOutput


class Engine:
    def __init__(self, events):
        self.events = events

    def backward(self, loss):
        self.events.append(("backward", round(float(loss), 4)))

    def step(self):
        self.events.append(("step",))


class TwoTasks:
    """Two parts; `bad` names a task whose loss is NaN."""

    def __init__(self, events, parts=2, bad=None):
        self.events, self.parts, self.bad = events, parts, bad

    @property
    def backward_parts(self):
        return self.parts

    def loss_weight(self, name):
        return 1.0

    def step_parts(self, model, batch):
        for i, task in enumerate(("scene", "intent")):
            self.events.append(("forward", task))
            loss = torch.tensor(float("nan") if task == self.bad else 1.0 + i)
            yield StepOutput(
                losses={task: GlobalMean(loss * 4, 4)}, samples=2 if i == 0 else 0, tokens=4
            )


def trainer(recipe, events) -> Trainer:
    t = Trainer.__new__(Trainer)
    t.recipe, t.engine, t.step = recipe, Engine(events), 0
    t.env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    t.guard = BadStepGuard(max_bad=5, lr=1e-3)
    return t


def test_each_part_is_backpropagated_before_the_next_is_built():
    events = []
    total, losses, out = trainer(TwoTasks(events), events)._micro_batch(batch=None)
    # DeepSpeed divides each backward by grad_accum x parts: the engine multiplies by parts
    assert events == [
        ("forward", "scene"),
        ("backward", 2.0),
        ("step",),
        ("forward", "intent"),
        ("backward", 4.0),
        ("step",),
    ]
    assert float(total) == 3.0 and set(losses) == {"scene", "intent"}
    assert (out.samples, out.tokens) == (2, 8)  # the micro-batch's samples, both parts' tokens


def test_a_non_finite_part_is_dropped_and_the_micro_batch_kept():
    events = []
    t = trainer(TwoTasks(events, bad="intent"), events)
    total, losses, out = t._micro_batch(batch=None)
    assert [e for e in events if e[0] == "backward"] == [("backward", 2.0)]
    assert events.count(("step",)) == 2  # DeepSpeed still counts both micro-steps
    assert set(losses) == {"scene"} and t.guard.total == 1


def test_a_recipe_that_yields_other_than_it_declares_is_named():
    events = []
    with pytest.raises(RuntimeError, match="step_parts gave 2 parts .* declares 3"):
        trainer(TwoTasks(events, parts=3), events)._micro_batch(batch=None)
