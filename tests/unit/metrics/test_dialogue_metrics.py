"""Dialogue metrics against hand-computed values."""

import pytest

from mmtrain.metrics.dialogue import Distinct, dialogue_scores, normalize


def test_bleu_rouge_on_a_hand_checked_pair():
    s = dialogue_scores(["The cat sat on the mat."], ["the cat is on the mat"])
    # unigrams: the x2, cat, on, mat match of 6 -> 5/6; bigrams: "the cat", "on the", "the mat" of 5
    # -> 3/5
    assert s["bleu1"] == pytest.approx(5 / 6, abs=1e-4)
    assert s["bleu2"] == pytest.approx((5 / 6 * 3 / 5) ** 0.5, abs=1e-4)
    # LCS "the cat on the mat" = 5 of 6 both ways
    assert s["rougeL"] == pytest.approx(5 / 6, abs=1e-4)


def test_bleu_brevity_penalty():
    s = dialogue_scores(["the cat"], ["the cat is on the mat"])
    # precision 1, BP exp(1 - r/c)
    assert s["bleu1"] == pytest.approx(2.718281828 ** (1 - 6 / 2), abs=1e-4)


def test_distinct_is_corpus_level_after_normalisation():
    d1, d2 = Distinct(1), Distinct(2)
    d1.update(["A b, a!"])
    d1.update(["b c."])
    d2.update(["A b, a!", "b c."])
    assert float(d1.compute()) == pytest.approx(3 / 5)  # a b a b c
    assert float(d2.compute()) == pytest.approx(3 / 3)  # "a b", "b a", "b c"
    assert normalize("Hello, World!!") == "hello world"
    assert float(Distinct(2).compute()) == 0.0
