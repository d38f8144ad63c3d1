"""The world-size invariance harness: one config at one global batch, trained on different numbers
of ranks, must train the same (the losses step by step, the parameters after N steps).

A layout is (world, grad_accum): the micro-batch is global_batch / (world x grad_accum). The data
is the same at every layout by construction, not fed by the harness: the shard reader deals each
optimizer step the same global batch at any world size (`mmtrain.data.reader`), and the toy LM's
token stream is a function of the global sample index. Runs are fp32 under ZeRO-3 with dropout
off (per-rank random streams are the one thing that cannot be the same at two world sizes).
Any recipe uses it: give its config, its overrides and the losses it logs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from tests.helpers import scalars, train

# Adam divides each gradient element by its own running magnitude: an element whose gradient is
# tiny (zero in exact arithmetic, as for attention key biases, or a cancellation at initialisation,
# as for TIM's heads while every caption still looks alike) moves by up to lr per step in the
# direction of its roundoff, and the roundoff differs at another world size (the same sums in
# another order). The harness runs AdamW with eps = 1e-3, under which such elements move in
# proportion to their gradient, so the comparison sees the gradients, not their amplified noise.
ADAM_EPS = 1e-3


@dataclass
class Case:
    config: Path
    overrides: List[str]
    global_batch: int
    steps: int
    losses: Sequence[str]  # the loss names the recipe logs (loss/<name>)
    timeout: float = 600


@dataclass
class Trained:
    run: Path
    losses: Dict[str, Dict[int, float]]  # loss/<name> -> step -> value
    params: Dict[str, torch.Tensor] = field(default_factory=dict)


def layout_args(case: Case, world: int, grad_accum: int = 1) -> List[str]:
    mb, rest = divmod(case.global_batch, world * grad_accum)
    assert rest == 0, (
        f"global batch {case.global_batch} does not split over {world} ranks x {grad_accum}"
    )
    return [
        f"train.micro_batch_size={mb}",
        f"train.grad_accum={grad_accum}",
        f"train.steps={case.steps}",
        "deepspeed.precision=fp32",
        "deepspeed.zero_stage=3",
        f"train.eps={ADAM_EPS}",
        "log.every=1",
        "eval.every=0",
        "eval.at_end=false",
        "checkpoint.every=1000",
        "checkpoint.keep=3",
    ]


def run_layout(
    case: Case,
    run: Path,
    world: int,
    grad_accum: int = 1,
    extra: Sequence[str] = (),
    params: bool = True,
) -> Trained:
    """Train `case` on `world` ranks; its logged losses and (exported, fp32) parameters."""
    train(
        run,
        [*case.overrides, *layout_args(case, world, grad_accum), *extra],
        world=world,
        config=case.config,
        timeout=case.timeout,
    )
    out = Trained(run, {name: scalars(run, f"loss/{name}") for name in ("total", *case.losses)})
    if params:
        from safetensors.torch import load_file

        from mmtrain.cli import main

        assert main(["export", str(run), str(run.parent / f"{run.name}-export")]) == 0
        out.params = load_file(run.parent / f"{run.name}-export" / "model.safetensors")
    return out


def differences(a: Trained, b: Trained, steps: Sequence[int]) -> Tuple[float, float]:
    """(largest relative difference of any logged loss at `steps`, largest absolute difference of
    any parameter), after checking that both logged every loss at every step and hold the same tensors."""
    loss_diff = 0.0
    for name, va in a.losses.items():
        vb = b.losses[name]
        for s in steps:
            assert s in va and s in vb, (
                f"loss/{name} not logged at step {s}: {sorted(va)} / {sorted(vb)}"
            )
            loss_diff = max(loss_diff, abs(va[s] - vb[s]) / max(abs(va[s]), 1e-6))
    param_diff = 0.0
    if a.params or b.params:
        assert sorted(a.params) == sorted(b.params)
        for k, t in a.params.items():
            param_diff = max(param_diff, float((t.float() - b.params[k].float()).abs().max()))
    return loss_diff, param_diff


def assert_invariant(
    reference: Trained,
    others: Dict[str, Trained],
    steps: Sequence[int],
    loss_rtol: float,
    param_atol: float,
    report: Path,
) -> Dict[str, Tuple[float, float]]:
    """Every run in `others` trains as `reference` did; the measured differences go to `report`."""
    measured = {name: differences(reference, t, steps) for name, t in others.items()}
    report.write_text(
        json.dumps(
            {k: {"loss_rel": v[0], "param_abs": v[1]} for k, v in measured.items()}, indent=2
        )
    )
    print(f"world-size invariance, {reference.run.name}:", json.dumps(measured))
    for name, (dl, dp) in measured.items():
        assert dl <= loss_rtol, f"{name}: losses differ by {dl:.3g} (relative) > {loss_rtol}"
        assert dp <= param_atol, f"{name}: parameters differ by {dp:.3g} > {param_atol}"
    return measured
