"""Dialogue metrics against hand-computed values."""

import math

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


# -- several references, and the VIKDF authors' released definitions (issue 18, item 5) ----------


def test_every_reference_of_a_response_counts():
    out = dialogue_scores(["the dog runs"], [["a cat sleeps", "the dog runs"]])
    assert out["bleu1"] == pytest.approx(1.0) and out["rougeL"] == pytest.approx(1.0)
    one = dialogue_scores(["the dog runs"], ["a cat sleeps"])  # a plain string: one reference
    assert one["bleu1"] == 0.0


def test_released_bleu_by_hand_repeated_words_empty_hypothesis_no_4gram():
    from mmtrain.metrics.dialogue import coco_bleu

    # "the cat the cat": unigrams clipped to 1 each (2 of 4), bigram "the cat" once (1 of 3);
    # reference lengths 4 + 2 (the empty hypothesis's closest) against 4: brevity exp(1 - 6/4)
    b = coco_bleu(["the cat the cat", ""], [["the cat is here", "a cat"], ["hello there"]])
    bp = math.exp(1 - 6 / 4)
    assert b[0] == pytest.approx(0.5 * bp) and b[1] == pytest.approx((0.5 / 3) ** 0.5 * bp)
    assert b[3] < 1e-6  # no 4-gram matched: only the 1e-15 smoothing is left


def test_released_bleu_takes_the_shorter_of_two_equally_close_references():
    from mmtrain.metrics.dialogue import coco_bleu

    # lengths 2 and 4 are both 1 away from 3: the shorter one, so no brevity penalty
    assert coco_bleu(["a b c"], [["a b", "a b c d"]])[0] == pytest.approx(1.0)


def test_released_rouge_l_beta_1_2_best_precision_and_recall_over_references():
    from mmtrain.metrics.dialogue import coco_rouge_l

    # LCS 3 with both references: P = 3/5 (either), R = max(3/3, 3/6) = 1
    p, r = 3 / 5, 1.0
    f = (1 + 1.2**2) * p * r / (r + 1.2**2 * p)
    hyps = ["the cat sat on mat", ""]
    refs = [["the cat sat", "a cat on the mat too"], ["anything"]]
    assert coco_rouge_l(hyps, refs) == pytest.approx((f + 0.0) / 2)  # the empty one scores 0


def test_released_text_distinct_and_perplexity():
    from mmtrain.metrics.dialogue import perplexity, released_distinct, released_texts

    # hypotheses lower-cased and cut at "[", references keep their case (as released)
    assert released_texts(["Hello, World! [SEP] junk"], [["Hello, World!"]]) == (
        ["hello , world !"],
        [["Hello , World !"]],
    )
    # punctuation and the articles go first: "cat cat" and "dog"
    assert released_distinct(["The cat, the cat!", "a dog"]) == (2 / 3, 1.0)
    assert released_distinct(["", "!!"]) == (0.0, 0.0)
    assert perplexity([1.0, 6.0], [1, 3]) == pytest.approx(math.exp(7 / 4))  # per token
    assert perplexity([1.0, 6.0], [1, 3], released=True) == pytest.approx(math.exp(1.5))
