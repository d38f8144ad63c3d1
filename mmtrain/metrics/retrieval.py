"""Image-text retrieval recall@k, pair i of the image and text sets being the match.

A query's match counts as retrieved at k when fewer than k other candidates score at least as
high as it: a candidate that ties with the match counts as ranked above it (ties never help), the
same rule in both directions (image -> text and text -> image). Written here rather than through
torchmetrics' RetrievalRecall, whose top-k leaves the order of tied scores to the sort.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch


def _recall(sim: torch.Tensor, k: int) -> float:
    """Mean over queries (rows) of whether the matching column (the diagonal) is in the top k."""
    match = sim.diagonal().unsqueeze(1)
    ahead = (sim > match).sum(1) + (sim == match).sum(1) - 1  # the match itself is not ahead
    return float((ahead < k).float().mean())


def retrieval_recalls(
    image: torch.Tensor, text: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> Dict[str, float]:
    """{'i2t_r@k', 't2i_r@k', 'mean_r@k', 'n', 'chance_r@1'} for L2-normalised embeddings."""
    sim = image.float() @ text.float().t()
    out: Dict[str, float] = {"n": float(sim.shape[0]), "chance_r@1": 1.0 / sim.shape[0]}
    for k in ks:
        out[f"i2t_r@{k}"] = _recall(sim, k)
        out[f"t2i_r@{k}"] = _recall(sim.t(), k)
        out[f"mean_r@{k}"] = (out[f"i2t_r@{k}"] + out[f"t2i_r@{k}"]) / 2
    return out
