"""Image-text retrieval recall@k (torchmetrics), pair i of the image and text sets being the match."""

from __future__ import annotations

from typing import Dict, Sequence

import torch
from torchmetrics.retrieval import RetrievalRecall


def _recall(sim: torch.Tensor, k: int) -> float:
    """Mean over queries (rows) of whether the matching column is in the top k."""
    n = sim.shape[0]
    metric = RetrievalRecall(top_k=k)
    indexes = torch.arange(n).repeat_interleave(sim.shape[1])
    target = torch.eye(n, sim.shape[1], dtype=torch.bool).flatten()
    return float(metric(sim.flatten().float().cpu(), target, indexes=indexes))


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
