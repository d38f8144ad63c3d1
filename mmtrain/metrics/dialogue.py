"""Dialogue generation metrics: BLEU-1/2 (corpus), ROUGE-L, Distinct-1/2 (corpus), perplexity.

Texts are lower-cased and stripped of punctuation first (methods.md). BLEU and ROUGE-L are
torchmetrics'; Distinct-n (unique n-grams / all n-grams over the corpus) is a torchmetrics
`Metric` of ours, since torchmetrics has none; its state (hashed n-grams) syncs across ranks.
"""

from __future__ import annotations

import re
import string
import zlib
from typing import Dict, List, Sequence

import torch
from torchmetrics import Metric
from torchmetrics.text import BLEUScore, ROUGEScore

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


class Distinct(Metric):
    """Distinct-n over a corpus: |unique n-grams| / |n-grams|."""

    full_state_update = False

    def __init__(self, n: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.n = n
        self.add_state("ngrams", default=[], dist_reduce_fx="cat")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str]) -> None:
        hashes = []
        for p in preds:
            toks = normalize(p).split()
            grams = [" ".join(toks[i : i + self.n]) for i in range(len(toks) - self.n + 1)]
            hashes += [zlib.crc32(g.encode()) for g in grams]
        self.ngrams.append(torch.tensor(hashes, dtype=torch.long))
        self.total += len(hashes)

    def compute(self) -> torch.Tensor:
        grams = (
            torch.cat(self.ngrams) if isinstance(self.ngrams, list) and self.ngrams else self.ngrams
        )
        if isinstance(grams, list) or grams.numel() == 0:
            return torch.tensor(0.0)
        return torch.tensor(float(grams.unique().numel()) / float(self.total))


def dialogue_scores(preds: List[str], refs: List[str]) -> Dict[str, float]:
    p = [normalize(x) for x in preds]
    r = [normalize(x) for x in refs]
    rouge = ROUGEScore(rouge_keys="rougeL")(p, r)["rougeL_fmeasure"]
    out = {
        "bleu1": float(BLEUScore(n_gram=1)(p, [[x] for x in r])),
        "bleu2": float(BLEUScore(n_gram=2)(p, [[x] for x in r])),
        "rougeL": float(rouge),
    }
    for n in (1, 2):
        d = Distinct(n)
        d.update(preds)
        out[f"distinct{n}"] = float(d.compute())
    return out
