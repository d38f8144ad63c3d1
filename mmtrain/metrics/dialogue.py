"""Dialogue generation metrics, in two definitions (`recipe.metrics` of vikdf_fuse):

`mmtrain` (the default): hypotheses and references lower-cased, punctuation removed, split on
whitespace; BLEU-1/2 corpus-level (torchmetrics: clipped n-gram precision against all references
of a response, brevity penalty from the reference length closest to each hypothesis);
ROUGE-L F1 (beta 1, torchmetrics, the best reference of each response), averaged over responses;
Distinct-1/2 over the corpus (unique n-grams / all n-grams); perplexity = exp(total NLL / total
target tokens).

`released`: what the VIKDF authors' released evaluation computes (nlg-eval on top of
pycocoevalcap), rebuilt from its formulas since neither package installs here:
- text: hypotheses drop emoji and a few stray symbols, are word-tokenised (nltk's
  `word_tokenize`, punctuation kept as tokens), lower-cased, and cut at a `[`; references are
  stripped and word-tokenised but keep their case (as released). nltk's English sentence model
  (punkt) is used when installed; without it, sentences are split by an untrained Punkt, which
  differs only after abbreviations such as "Mr." (the results say which, `released_punkt`).
- BLEU-n: pycocoevalcap's corpus BLEU, option "closest": clipped counts summed over the corpus
  with +1e-15 / +1e-9 smoothing, the brevity penalty from each hypothesis's closest reference
  length (ties: the shorter one).
- ROUGE-L: pycocoevalcap's, per response: LCS precision and recall, each the best over its
  references, F with beta = 1.2; averaged over responses. Tokens are split on single spaces.
- Distinct-n: on the raw hypotheses lower-cased, with punctuation and the articles a/an/the
  removed; unique / all n-grams over the corpus (0 for no n-gram).
- perplexity: exp of the mean over responses of each response's mean token NLL.

Both take several references per response: a test set's `responses` list (the first one is the
training target), e.g. one per annotator.
"""

from __future__ import annotations

import math
import re
import string
import zlib
from collections import Counter
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import torch
from torchmetrics.text import BLEUScore, ROUGEScore

from mmtrain.metrics import RowMetric, on_rows

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


class Distinct(RowMetric):
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


def _as_lists(refs: Sequence[str | Sequence[str]]) -> List[List[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in refs]


def dialogue_scores(preds: List[str], refs: Sequence[str | Sequence[str]]) -> Dict[str, float]:
    """The default definitions; `refs[i]` is the reference of response i, or a list of them."""
    p = [normalize(x) for x in preds]
    r = [[normalize(x) for x in rs] for rs in _as_lists(refs)]
    rouge = on_rows(ROUGEScore, rouge_keys="rougeL", accumulate="best")(p, r)["rougeL_fmeasure"]
    out = {
        "bleu1": float(on_rows(BLEUScore, n_gram=1)(p, r)),
        "bleu2": float(on_rows(BLEUScore, n_gram=2)(p, r)),
        "rougeL": float(rouge),
    }
    for n in (1, 2):
        d = Distinct(n)
        d.update(preds)
        out[f"distinct{n}"] = float(d.compute())
    return out


# -- the released definitions -----------------------------------------------------------------
_EMOJI = re.compile(
    "[\U0001f600-\U0001f64f\U0001f300-\U0001f5ff\U0001f680-\U0001f6ff\U0001f1e0-\U0001f1ff]+"
)
_STRAY = re.compile(
    "[\ufffd\ufe0f\u203c\u3010\u3011\u300a\u166d\u200c\u202a\u202c\u2049\u20e3\u300b\u300c\u3030"
    "\u065f\u0099\u0f3a\u0f3b\uf610\ufffc]"
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@lru_cache(maxsize=1)
def _sentences():
    """(nltk's English sentence splitter, whether it is the trained one)."""
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return (lambda text: nltk.tokenize.sent_tokenize(text, "english")), True
    except LookupError:
        return PunktSentenceTokenizer().tokenize, False


def word_tokens(text: str) -> List[str]:
    """nltk's `word_tokenize` (sentences, then the Treebank-style word tokenizer)."""
    from nltk.tokenize import NLTKWordTokenizer

    split, _ = _sentences()
    tok = NLTKWordTokenizer()
    return [w for sentence in split(text) for w in tok.tokenize(sentence)]


def released_texts(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> Tuple[list, list]:
    """Hypotheses and references as the released evaluation prepares them for BLEU and ROUGE-L."""
    hyps = []
    for p in preds:
        p = _STRAY.sub("", _EMOJI.sub("", p)).encode("utf-8", "ignore").decode("utf-8")
        p = re.sub(r"\[.*$", "", " ".join(word_tokens(p)).lower())
        hyps.append(p.replace("\ufffd", "").strip())
    return hyps, [[" ".join(word_tokens(r.strip())) for r in rs] for rs in refs]


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(
        tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)
    )


def coco_bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4) -> List[float]:
    """pycocoevalcap's corpus BLEU-1..n (option "closest")."""
    tiny, small = 1e-15, 1e-9
    testlen = reflen = 0
    guess, correct = [0] * n, [0] * n
    for hyp, rs in zip(hyps, refs):
        words = hyp.split()
        best: Counter = Counter()
        for r in rs:
            best |= _ngrams(r.split(), n)  # the per-n-gram maximum over the references
        closest = min((abs(len(r.split()) - len(words)), len(r.split())) for r in rs)[1]
        testlen, reflen = testlen + len(words), reflen + closest
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(best[gram], count)
    bleus, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        bleus.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        bleus = [b * math.exp(1 - 1 / ratio) for b in bleus]
    return bleus


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def coco_rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """pycocoevalcap's ROUGE-L: per response, the best LCS precision and the best LCS recall over
    its references, F_beta; the mean over responses."""
    scores = []
    for hyp, rs in zip(hyps, refs):
        c = hyp.split(" ")
        lcs = [_lcs(r.split(" "), c) for r in rs]
        prec = max(x / len(c) for x in lcs)
        rec = max(x / len(r.split(" ")) for x, r in zip(lcs, rs))
        f = (1 + beta**2) * prec * rec / (rec + beta**2 * prec) if prec and rec else 0.0
        scores.append(f)
    return sum(scores) / len(scores) if scores else 0.0


def released_distinct(preds: Sequence[str]) -> Tuple[float, float]:
    uni, bi = Counter(), Counter()
    for p in preds:
        words = _ARTICLES.sub(" ", _PUNCT.sub(" ", p.lower())).split()
        uni.update(words)
        bi.update(zip(words, words[1:]))
    total1, total2 = sum(uni.values()), sum(bi.values())
    return (len(uni) / total1 if total1 else 0.0, len(bi) / total2 if total2 else 0.0)


def released_scores(preds: List[str], refs: Sequence[str | Sequence[str]]) -> Dict[str, float]:
    """The released definitions of BLEU-1/2, ROUGE-L and Distinct-1/2 (as fractions)."""
    hyps, rs = released_texts(preds, _as_lists(refs))
    bleu = coco_bleu(hyps, rs)
    d1, d2 = released_distinct(preds)
    return {
        "bleu1": bleu[0],
        "bleu2": bleu[1],
        "rougeL": coco_rouge_l(hyps, rs),
        "distinct1": d1,
        "distinct2": d2,
        "released_punkt": float(_sentences()[1]),  # 1: nltk's trained English sentence model
    }


def perplexity(nll: Sequence[float], tokens: Sequence[int], released: bool = False) -> float:
    """exp(total NLL / total tokens); `released`: exp(mean over responses of NLL / tokens)."""
    if released:
        return math.exp(sum(x / t for x, t in zip(nll, tokens)) / max(1, len(nll)))
    return math.exp(sum(nll) / max(1, sum(tokens)))
