"""How mmtrain reads words out of text in any script: one definition for the keyphrase metrics,
the KDSL rule conditions and label names.

- Text is NFKC-normalised and case-folded first: full-width letters, digits and punctuation
  (`Ｐａｙ`, `；`) become their usual forms, `Straße` matches `strasse`, `É` matches `é`.
- A word is a run of letters, digits and combining marks (`café`, `naïve`, `covid19`, `ünïcödé`
  are one word each; accents are kept).
- Chinese, Japanese kana and Korean-Hanja-style ideographs (`CJK` below) have no spaces between
  words and no dictionary here, so each such character is a word of its own (`words`): a
  keyphrase then matches exactly when its characters appear in order, which is how Chinese
  keyphrase benchmarks compare phrases. For rule conditions (`terms`) a run of such characters
  gives its character bigrams instead (most Chinese words are two characters: `退款`, `物流`).
- Hangul is written with spaces, so it is read like any other script.
"""

from __future__ import annotations

import re
import unicodedata
from typing import List

# CJK ideographs (with extension A and the compatibility block), kana (incl. the half-width forms)
CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f"
_CJK_CHAR = re.compile(f"[{CJK}]")
_CJK_SPLIT = re.compile(f"([{CJK}]+)")


def fold(text: str) -> str:
    """NFKC, then case folding."""
    return unicodedata.normalize("NFKC", text).casefold()


def _in_word(
    ch: str,
) -> bool:  # a letter, a digit or a combining mark (Devanagari vowel signs, ...)
    return unicodedata.category(ch)[0] in "LNM"


def _split(folded: str) -> List[str]:
    """Runs of word characters of a text without CJK."""
    out, cur = [], []
    for ch in folded:
        if _in_word(ch):
            cur.append(ch)
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


def words(text: str) -> List[str]:
    """The words of `text`, folded; every CJK character is a word."""
    out: List[str] = []
    for part in _CJK_SPLIT.split(fold(text)):
        out += list(part) if _CJK_CHAR.match(part) else _split(part)
    return out


def is_cjk(word: str) -> bool:
    return bool(_CJK_CHAR.match(word))


def terms(text: str) -> List[str]:
    """Words for matching conditions: as `words`, but a run of CJK characters gives its character
    bigrams (a single character alone)."""
    out: List[str] = []
    for part in _CJK_SPLIT.split(fold(text)):
        if not _CJK_CHAR.match(part):
            out += _split(part)
        elif len(part) == 1:
            out.append(part)
        else:
            out += [part[i : i + 2] for i in range(len(part) - 1)]
    return out


def slug(name: str) -> str:
    """One spelling of a name for files and matching: folded, runs of anything but letters and
    digits as one "_" ("Payment page" -> "payment_page", "Logistics" -> "logistics", "物流" ->
    "物流"); empty when the name has no letter or digit."""
    return "_".join(_split(fold(name)))
