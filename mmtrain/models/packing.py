"""Sequence packing: a micro-batch's samples laid end to end in rows of a token budget, instead of
each padded to the longest.

`plan_rows(lengths, budget)` decides which samples share a row (first-fit decreasing; a sample
longer than the budget gets a row of its own). A packed batch carries `sample_index` (rows x
positions: the sample each token belongs to, -1 on padding); from it come the positions that
restart at 0 for every sample (`restarting_positions`), which transformers reads as packed
sequences when no attention mask is given (`masking_utils.find_packed_sequence_indices`: each
token attends only to the earlier tokens of its own sample), and the per-sample sums of a
per-token loss (`per_sample_sums`).
"""

from __future__ import annotations

from typing import List, Sequence

import torch


def plan_rows(lengths: Sequence[int], budget: int) -> List[List[int]]:
    """The samples of each row (indices into `lengths`), rows of at most `budget` tokens each:
    first-fit decreasing, each row's samples in their original order."""
    rows: List[List[int]] = []
    room: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return [sorted(r) for r in rows]


def restarting_positions(sample_index: torch.Tensor) -> torch.Tensor:
    """Each token's position within its sample (rows x positions); padding counts as a sample of
    its own, so that no real token attends to it."""
    rows, width = sample_index.shape
    arange = torch.arange(width, device=sample_index.device).expand(rows, width)
    starts = torch.ones_like(sample_index, dtype=torch.bool)
    starts[:, 1:] = sample_index[:, 1:] != sample_index[:, :-1]
    first = torch.where(starts, arange, torch.zeros_like(arange)).cummax(1).values
    return arange - first


def per_sample_sums(values: torch.Tensor, sample_index: torch.Tensor, n: int) -> torch.Tensor:
    """The sum of `values` over each sample's tokens: a tensor of `n` (samples absent from
    `sample_index` sum to 0; padding, index -1, to none)."""
    keep = sample_index >= 0
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    return out.index_add(0, sample_index[keep], values[keep])


def padding_share(batch) -> float:
    """The share of a collated batch's positions that hold no token: padding, packed or not. The
    batch's tensors are host tensors, read through numpy (which refuses a device tensor), so that
    no read here waits for the device."""
    index = batch.get("sample_index")
    real = (batch["attention_mask"] > 0 if index is None else index >= 0).numpy()
    return 1.0 - float(real.sum()) / max(1, real.size)
