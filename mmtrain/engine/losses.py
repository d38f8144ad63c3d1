"""From a recipe's named losses to the one scalar the engine backpropagates.

Data parallelism (DeepSpeed, like DDP) *averages* gradients over ranks. A loss that is a mean
over this rank's samples is then the mean over the global batch, provided every rank holds the
same number of samples (it does). A loss that is a mean over items a batch holds in varying
numbers (answer tokens, masked positions) is not: two ranks with 10 and 30 tokens would weigh
their tokens 3:1. Such losses come as `GlobalMean(sum, count)`; here each becomes
    sum_local * world / count_global,
whose average over ranks is sum_global / count_global, the token mean of the global micro-batch
at any world size. The counts travel in the same all-reduce as the non-finite flag.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple, Union

import torch

from mmtrain.recipes.base import GlobalMean, StepOutput


def combine(
    losses: Dict[str, Union[torch.Tensor, GlobalMean]],
    weight: Callable[[str], float],
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    world: int,
    device: torch.device,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
    """(weighted total to backpropagate, each loss as this rank's share of its global value, a
    device flag: the total is non-finite on some rank). Collective: every rank calls it with the
    same loss names. Nothing is read on the host: the flag and the counts stay on the device (the
    engine reads the flags once per optimizer step)."""
    means = sorted(k for k, v in losses.items() if isinstance(v, GlobalMean))
    parts = {k: (v.total if k in means else v) for k, v in losses.items()}
    finite = torch.stack([torch.isfinite(v.detach()).all() for v in parts.values()]).all()
    local = [(~finite).to(device=device, dtype=torch.float64)]
    local += [torch.as_tensor(losses[k].count, dtype=torch.float64).to(device) for k in means]
    reduced = all_reduce_sum(torch.stack(local))
    for i, k in enumerate(means, start=1):
        n = reduced[i]
        scale = torch.where(n > 0, world / n.clamp(min=1), torch.zeros_like(n))
        parts[k] = parts[k] * scale.to(parts[k].dtype)
    total = sum(weight(k) * v for k, v in parts.items())
    return total, parts, reduced[0] > 0


class GradientGate:
    """Passes a micro-batch's gradients or replaces them by zeros, as a device flag says: a hook
    on every trainable parameter computes `where(open, grad, 0)`. A product would not do: the
    gradient of a non-finite micro-batch holds NaN, and NaN x 0 is NaN. An open gate passes the
    gradient bit for bit. This is how the engine drops a non-finite micro-batch without reading the
    flag on the host before its backward."""

    def __init__(self, params):
        self.open: Union[torch.Tensor, None] = None  # set before each backward; None: no gate
        self.handles = [p.register_hook(self._gate) for p in params if p.requires_grad]

    def _gate(self, grad: torch.Tensor) -> torch.Tensor:
        if self.open is None:
            return grad
        return torch.where(self.open.to(grad.device), grad, 0.0)


class Part(NamedTuple):
    """One backpropagated part of a micro-batch (the whole micro-batch for most recipes)."""

    total: torch.Tensor  # detached
    losses: Dict[str, torch.Tensor]
    out: StepOutput
    bad: torch.Tensor  # device flag: non-finite on some rank (its gradients were zeroed)


class Settled(NamedTuple):
    kept: List[Tuple[torch.Tensor, Dict[str, torch.Tensor], StepOutput]]  # per micro-batch
    dropped: List[Tuple[Dict[str, torch.Tensor], str]]  # each non-finite part: losses, what
    replace: int  # micro-batches to draw in place of non-finite ones


def settle(micro_batches: Sequence[Sequence[Part]], bad: Sequence[bool]) -> Settled:
    """Given each part's non-finite flag as read on the host (in order): what a step keeps. A
    one-part micro-batch that is not finite is replaced by the next; a non-finite part of a
    several-part micro-batch is dropped and the micro-batch counts (its other parts' gradients are
    in). A kept micro-batch is (sum of its parts' totals, their losses, their merged output)."""
    flags = iter(bad)
    kept, dropped, replace = [], [], 0
    for parts in micro_batches:
        good = []
        for part in parts:
            if next(flags):
                what = "part dropped" if len(parts) > 1 else "micro-batch skipped"
                dropped.append((part.losses, what))
            else:
                good.append(part)
        if len(parts) == 1 and not good:
            replace += 1
        elif good:
            losses = {k: v for p in good for k, v in p.losses.items()}
            kept.append(
                (sum(p.total for p in good), losses, StepOutput.merged([p.out for p in good]))
            )
    return Settled(kept, dropped, replace)
