"""A micro-batch in parts (`Recipe.step_parts`): each part is backpropagated before the next part's
forward is built, a non-finite part's gradients are gated to zero and the part dropped alone, and
a non-finite one-part micro-batch is replaced (`engine.losses.settle`)."""

from __future__ import annotations

import pytest
import torch

from mmtrain.engine.dist import DistEnv
from mmtrain.engine.losses import GradientGate, settle
from mmtrain.engine.trainer import Trainer
from mmtrain.recipes.base import GlobalMean, StepOutput


class Engine:
    """Records each backward with whether the gradient gate was open for it."""

    def __init__(self, events, gate):
        self.events, self.gate = events, gate

    def backward(self, loss):
        self.events.append(("backward", round(float(loss), 4), bool(self.gate.open)))


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
    t.gate = GradientGate([])
    t.recipe, t.engine, t.step = recipe, Engine(events, t.gate), 0
    t.env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return t


def test_each_part_is_backpropagated_before_the_next_is_built():
    events = []
    parts = trainer(TwoTasks(events), events)._micro_batch(batch=None)
    # DeepSpeed divides each backward by grad_accum x parts: the engine multiplies by parts
    assert events == [
        ("forward", "scene"),
        ("backward", 2.0, True),
        ("forward", "intent"),
        ("backward", 4.0, True),
    ]
    kept, dropped, replace = settle([parts], [bool(p.bad) for p in parts])
    assert not dropped and replace == 0 and len(kept) == 1
    total, losses, out = kept[0]
    assert float(total) == 3.0 and set(losses) == {"scene", "intent"}
    assert (out.samples, out.tokens) == (2, 8)  # the micro-batch's samples, both parts' tokens


def test_a_non_finite_part_is_gated_and_dropped_and_the_micro_batch_kept():
    events = []
    parts = trainer(TwoTasks(events, bad="intent"), events)._micro_batch(batch=None)
    # both parts backpropagated (no host read before a backward), the bad one with the gate shut
    assert [e[2] for e in events if e[0] == "backward"] == [True, False]
    kept, dropped, replace = settle([parts], [bool(p.bad) for p in parts])
    assert replace == 0 and set(kept[0][1]) == {"scene"}
    assert [(set(losses), what) for losses, what in dropped] == [({"intent"}, "part dropped")]


def test_a_non_finite_one_part_micro_batch_is_replaced():
    events = []
    t = trainer(TwoTasks(events, parts=1, bad="scene"), events)
    t.recipe.step_parts = lambda model, batch: iter(
        [StepOutput(losses={"scene": torch.tensor(float("nan"))}, samples=2)]
    )
    bad = t._micro_batch(batch=None)
    good = trainer(TwoTasks(events, parts=1), events)
    good.recipe.step_parts = lambda model, batch: iter(
        [StepOutput(losses={"scene": torch.tensor(1.0)}, samples=2)]
    )
    fine = good._micro_batch(batch=None)
    kept, dropped, replace = settle([bad, fine], [True, False])
    assert replace == 1 and len(kept) == 1 and dropped[0][1] == "micro-batch skipped"


def test_the_gate_turns_a_nan_gradient_into_zeros_and_passes_a_finite_one_bit_for_bit():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16))
    gate = GradientGate([w])
    gate.open = torch.tensor(False)
    (w * float("nan")).sum().backward()
    assert torch.equal(w.grad, torch.zeros(3, dtype=torch.bfloat16))
    gate.open = torch.tensor(True)
    (w * torch.tensor([0.1, 0.2, 0.3], dtype=torch.bfloat16)).sum().backward()
    assert torch.equal(w.grad, torch.tensor([0.1, 0.2, 0.3], dtype=torch.bfloat16))


def test_a_recipe_that_yields_other_than_it_declares_is_named():
    events = []
    with pytest.raises(RuntimeError, match="step_parts gave 2 parts .* declares 3"):
        trainer(TwoTasks(events, parts=3), events)._micro_batch(batch=None)
