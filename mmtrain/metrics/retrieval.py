"""Image-text retrieval recall@k, pair i of the image and text sets being the match.

A query's match counts as retrieved at k when fewer than k other candidates score at least as
high as it: a candidate that ties with the match counts as ranked above it (ties never help), the
same rule in both directions (image -> text and text -> image). Written here rather than through
torchmetrics' RetrievalRecall, whose top-k leaves the order of tied scores to the sort.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch


def ranks_ahead(sim: torch.Tensor) -> List[int]:
    """Per query (row): how many candidates score at least as high as its match (the diagonal),
    the match itself not counted: 0 is first place, ties count against."""
    match = sim.diagonal().unsqueeze(1)
    return ((sim > match).sum(1) + (sim == match).sum(1) - 1).tolist()


def match_ranks(image: torch.Tensor, text: torch.Tensor) -> Tuple[List[int], List[int]]:
    """(image -> text, text -> image) `ranks_ahead` of each pair, for L2-normalised embeddings."""
    sim = image.float() @ text.float().t()
    return ranks_ahead(sim), ranks_ahead(sim.t())


def recalls(
    i2t: Sequence[int], t2i: Sequence[int], ks: Sequence[int] = (1, 5, 10)
) -> Dict[str, float]:
    """{'i2t_r@k', 't2i_r@k', 'mean_r@k', 'n', 'chance_r@1'} from each pair's `match_ranks`."""
    n = len(i2t)
    out: Dict[str, float] = {"n": float(n), "chance_r@1": 1.0 / n}
    for k in ks:
        out[f"i2t_r@{k}"] = sum(r < k for r in i2t) / n
        out[f"t2i_r@{k}"] = sum(r < k for r in t2i) / n
        out[f"mean_r@{k}"] = (out[f"i2t_r@{k}"] + out[f"t2i_r@{k}"]) / 2
    return out


def retrieval_recalls(
    image: torch.Tensor, text: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> Dict[str, float]:
    """Recall@k both ways for L2-normalised embeddings (see `recalls`)."""
    return recalls(*match_ranks(image, text), ks)
