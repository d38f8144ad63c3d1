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

from typing import Callable, Dict, Tuple, Union

import torch

from mmtrain.recipes.base import GlobalMean


def combine(
    losses: Dict[str, Union[torch.Tensor, GlobalMean]],
    weight: Callable[[str], float],
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    world: int,
    device: torch.device,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], bool]:
    """(weighted total to backpropagate, each loss as this rank's share of its global value, whether
    the total is non-finite on any rank). Collective: every rank calls it with the same loss names."""
    means = sorted(k for k, v in losses.items() if isinstance(v, GlobalMean))
    parts = {k: (v.total if k in means else v) for k, v in losses.items()}
    finite = all(bool(torch.isfinite(v.detach()).all()) for v in parts.values())
    reduced = all_reduce_sum(
        torch.tensor(
            [float(not finite)] + [float(losses[k].count) for k in means],
            dtype=torch.float64,
            device=device,
        )
    ).tolist()
    for k, n in zip(means, reduced[1:]):
        parts[k] = parts[k] * (world / n) if n > 0 else parts[k] * 0.0
    total = sum(weight(k) * v for k, v in parts.items())
    return total, parts, reduced[0] > 0
