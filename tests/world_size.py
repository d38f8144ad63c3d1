"""The world-size invariance harness: one config at one global batch, trained on different numbers
of ranks, must train the same (the losses step by step, the parameters after N steps).

A layout is (world, grad_accum): the micro-batch is global_batch / (world x grad_accum). The data
is the same at every layout by construction, not fed by the harness: the shard reader deals each
optimizer step the same global batch at any world size (`mmtrain.data.reader`), and the toy LM's
token stream is a function of the global sample index. Runs are fp32 under ZeRO-3 with dropout
off (per-rank random streams are the one thing that cannot be the same at two world sizes).
Any recipe uses it: give its config, its overrides and the losses it logs.

Evaluation has its own half (`assert_evaluates_the_same`): one checkpoint scored by `mmtrain eval`
at 1, 2 and 4 ranks, the model whole on every rank and partitioned over them, gives the same
figures, the same predictions file and the same TensorBoard images, and those figures are what
the metric definitions give when recomputed on one process from the predictions file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import pytest
import torch

from tests.helpers import eval_ranks, scalars, train

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
    return collect(case, run, params)


def collect(case: Case, run: Path, params: bool = True) -> Trained:
    """What a finished run of `case` trained (however it was launched): its logged losses, and
    with `params` its exported fp32 parameters."""
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


def assert_close(got, want, where: str) -> None:
    """Equal structures; numbers equal to fp32 rounding (another order of the same sums)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (
            f"{where}: keys {sorted(got) if isinstance(got, dict) else got} != {sorted(want)}"
        )
        for k in want:
            assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: lengths differ"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


# (world, placement) of every evaluation of one checkpoint; the first is the reference. One, two
# and four ranks, both placements: rows gathered once too often show at any world size above one,
# in either placement, and a partitioned generation (ZeRO-3 `synced_gpus`) most at four.
EVAL_LAYOUTS = ((1, "replica"), (2, "replica"), (4, "sharded"))


@dataclass
class Evaluated:
    result: Dict[str, Any]  # what `mmtrain eval` printed (= eval_val_<tag>.json)
    rows: List[Dict[str, Any]]  # predictions_val_<tag>.jsonl
    images: Dict[str, bytes]  # the TensorBoard images this evaluation wrote: tag -> PNG


def evaluate_layout(run: Path, world: int, placement: str) -> Evaluated:
    """`mmtrain eval RUN --split val` on `world` ranks with `placement`; asserts the share of the
    parameters each rank held."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = run / "tensorboard"
    before = set(board.glob("events.*"))
    result, log = eval_ranks(
        run, "--split", "val", "--placement", placement, world=world, stderr=True
    )
    share = re.search(rf"\({placement}\): [\d.]+M parameters, [\d.]+M \((\d+)%\) on this rank", log)
    assert share, log[-2000:]
    if placement == "replica":
        assert int(share.group(1)) == 100, share.group(0)
    else:  # an equal share each, and a little padding
        assert int(share.group(1)) <= 100 / world + 5, share.group(0)
    predictions = run / f"predictions_val_{result['checkpoint']}.jsonl"
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    images = {}
    for events in sorted(set(board.glob("events.*")) - before):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            images[tag] = acc.Images(tag)[-1].encoded_image_string
    return Evaluated(result, rows, images)


def assert_evaluates_the_same(
    run: Path,
    rescore: Callable[[Path, List[Dict[str, Any]], Dict[str, bytes]], Dict[str, Any]],
    layouts: Sequence[Tuple[int, str]] = EVAL_LAYOUTS,
) -> Dict[str, Evaluated]:
    """`run`'s latest checkpoint evaluated at every layout (EVAL_LAYOUTS): the same figures (every key),
    the same rows in the same order and the same images; `rescore(run, rows, images)` (the figures
    from the predictions file, on this one process; tests/support/rescore.py) gives the reported
    ones."""
    done = {f"{w} ranks, {p}": evaluate_layout(run, w, p) for w, p in layouts}
    name, ref = next(iter(done.items()))
    assert ref.rows, "the evaluation wrote no per-sample rows to its predictions file"
    for other, e in done.items():
        assert_close(e.result, ref.result, f"{other} vs {name}: figures")
        assert_close(e.rows, ref.rows, f"{other} vs {name}: predictions")
        assert e.images.keys() == ref.images.keys(), other
        for tag in ref.images:
            assert e.images[tag] == ref.images[tag], f"{other} vs {name}: image {tag}"
    offline = rescore(run, ref.rows, ref.images)
    assert offline, "nothing recomputed"
    assert_close({k: ref.result[k] for k in offline}, offline, "recomputed from the predictions")
    print(f"evaluation at any world size, {run.name}:", json.dumps(ref.result)[:2000])
    return done
