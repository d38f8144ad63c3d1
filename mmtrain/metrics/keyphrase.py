"""Keyphrase metrics: F1@k after Porter stemming, broken down into present/absent and seen/unseen.

Definitions (the usual ones for keyphrase generation, made explicit):
- normalise: the words of `mmtrain.text` (NFKC, case-folded, any script; each Chinese/Japanese
  character a word of its own), each ASCII word Porter-stemmed (nltk; the stemmer is for English,
  so `café` and `手机` stay as written), re-joined by spaces. A gold phrase with no letter or
  digit is an error naming its sample; a predicted one keeps its rank and matches nothing.
  Predictions are de-duplicated after normalising, keeping the first occurrence (the model's
  order is its rank).
- F1@k of one sample: the top k predictions; P = correct / k (k, not the number predicted, so a
  model that predicts fewer is not rewarded), R = correct / |gold|, F1 = 2PR / (P + R); averaged
  over samples (macro).
- present / absent: a keyphrase is present when its stemmed words occur contiguously in the
  stemmed post text. For the present (absent) score, both the gold and the predicted lists keep
  only their present (absent) phrases, and samples without any such gold phrase are left out.
- seen / unseen: likewise, split by whether the phrase occurs among the training keyphrases.
- overlap: the fraction of a split's gold keyphrases (occurrences) seen in the training split;
  the paper stresses that public benchmarks overlap train and test far more than production.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Sequence, Set

import torch

from mmtrain.metrics import RowMetric
from mmtrain.text import words


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


@lru_cache(maxsize=200_000)
def normalize(phrase: str) -> str:
    stem = _stemmer().stem
    return " ".join(stem(w) if w.isascii() else w for w in words(phrase))


class KeyphraseError(ValueError):
    """A gold keyphrase that cannot be compared (nothing left after normalising)."""


def dedupe(phrases: Iterable[str]) -> List[str]:
    """Gold phrases, normalised, each once. Raises KeyphraseError for one with no letter or digit
    (the caller names the sample)."""
    out, seen = [], set()
    for p in phrases:
        n = normalize(p)
        if not n:
            raise KeyphraseError(f"keyphrase {p!r} has no letter or digit")
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def ranked(predictions: Iterable[str]) -> List[str]:
    """Predicted phrases, normalised, each once, in the model's order; one with no letter or digit
    keeps its place (it counts against P@k) and matches nothing."""
    out, seen = [], set()
    for i, p in enumerate(predictions):
        n = normalize(p) or f"\0unreadable {i}"
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def is_present(norm_phrase: str, norm_text: str) -> bool:
    return f" {norm_phrase} " in f" {norm_text} "


def f1_at_k(pred: Sequence[str], gold: Sequence[str], k: int) -> float:
    """Both lists already normalised and de-duplicated."""
    if not gold:
        return 0.0
    correct = len(set(pred[:k]) & set(gold))
    if not correct:
        return 0.0
    p, r = correct / k, correct / len(gold)
    return 2 * p * r / (p + r)


class KeyphraseF1(RowMetric):
    """F1@k (k in `ks`) overall, present/absent and (given `train_keyphrases`) seen/unseen.

    update(preds, targets, texts): lists of keyphrase lists and the posts' texts.
    compute(): {"f1@3": ..., "present_f1@3": ..., "unseen_f1@5": ..., "n_absent": ...}.
    """

    full_state_update = False

    def __init__(
        self,
        ks: Sequence[int] = (1, 3, 5),
        train_keyphrases: Optional[Iterable[str]] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        self.seen: Optional[Set[str]] = (
            {normalize(p) for p in train_keyphrases} if train_keyphrases is not None else None
        )
        self.groups = ["", "present_", "absent_"] + (
            ["seen_", "unseen_"] if self.seen is not None else []
        )
        for g in self.groups:
            self.add_state(
                f"{g}sum",
                default=torch.zeros(len(self.ks), dtype=torch.float64),
                dist_reduce_fx="sum",
            )
            self.add_state(
                f"{g}n", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum"
            )

    def _filters(self, norm_text: str):
        yield "", lambda p: True
        yield "present_", lambda p: is_present(p, norm_text)
        yield "absent_", lambda p: not is_present(p, norm_text)
        if self.seen is not None:
            yield "seen_", lambda p: p in self.seen
            yield "unseen_", lambda p: p not in self.seen

    def update(
        self,
        preds: List[List[str]],
        targets: List[List[str]],
        texts: List[str],
        keys: Optional[List[str]] = None,
    ) -> None:
        """`keys` name the samples in errors."""
        for i, (pred, gold, text) in enumerate(zip(preds, targets, texts)):
            try:
                gold = dedupe(gold)
            except KeyphraseError as e:
                raise KeyphraseError(f"sample {keys[i] if keys else i}: {e}") from None
            pred, norm_text = ranked(pred), normalize(text)
            for group, keep in self._filters(norm_text):
                g = [p for p in gold if keep(p)]
                if not g:
                    continue
                pr = [p for p in pred if keep(p)]
                scores = torch.tensor([f1_at_k(pr, g, k) for k in self.ks], dtype=torch.float64)
                setattr(self, f"{group}sum", getattr(self, f"{group}sum") + scores)
                setattr(self, f"{group}n", getattr(self, f"{group}n") + 1)

    def compute(self) -> Dict[str, float]:
        out = {}
        for g in self.groups:
            n = float(getattr(self, f"{g}n"))
            out[f"n_{g.rstrip('_') or 'all'}"] = n
            for k, s in zip(self.ks, getattr(self, f"{g}sum").tolist()):
                out[f"{g}f1@{k}"] = s / n if n else 0.0
        return out


def overlap(train_keyphrases: Iterable[str], split_keyphrases: Iterable[str]) -> float:
    """Fraction of the split's keyphrase occurrences that also occur among the training keyphrases."""
    seen = {normalize(p) for p in train_keyphrases}
    split = [n for n in map(normalize, split_keyphrases) if n]
    return sum(p in seen for p in split) / len(split) if split else 0.0


ANSWER_MARKER = r"(?:answer|答案)\s*[:：]"  # where a rationale's final answer starts


def parse_generation(text: str, sep: str = ";"):
    """Generated text -> (rationale or None, keyphrases). `<think>...</think>` before the answer is
    the rationale; an 'Answer:' (or '答案：') marker, if any, starts the list; phrases split on
    `sep` (or commas). Full-width forms are read as their ASCII ones first (`；`, `，`: NFKC)."""
    text = unicodedata.normalize("NFKC", text)
    rationale = None
    m = re.search(r"<\s*think\s*>(.*?)<\s*/\s*think\s*>", text, flags=re.S | re.I)
    if m:
        rationale, text = m.group(1).strip(), text[m.end() :]
    elif re.search(r"<\s*think\s*>", text, flags=re.I):  # opened, never closed: all reasoning
        rationale, text = re.split(r"<\s*think\s*>", text, maxsplit=1, flags=re.I)[1].strip(), ""
    m = re.search(ANSWER_MARKER, text, flags=re.I)
    if m:
        text = text[m.end() :]
    parts = re.split(re.escape(sep) if sep in text else ",", text)
    return rationale, [p.strip(" .\n\t") for p in parts if p.strip(" .\n\t")]
