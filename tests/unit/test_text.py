"""mmtrain.text: words in any script, one slug per name (issue 18, item 1)."""

from mmtrain.text import slug, terms, words


def test_words_keep_accents_fold_width_and_case_and_split_cjk_by_character():
    assert words("Café naïve Straße ＰＡＹ covid19") == [
        "café",
        "naïve",
        "strasse",
        "pay",
        "covid19",
    ]
    assert words("今天的手机壳，很好!") == ["今", "天", "的", "手", "机", "壳", "很", "好"]
    assert words("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]  # vowel signs are part of the word
    assert words("...!!!") == []


def test_terms_read_chinese_as_character_pairs():
    assert terms("我要退款 please") == ["我要", "要退", "退款", "please"]
    assert terms("退") == ["退"]


def test_slug_is_one_spelling_for_case_spaces_and_punctuation():
    assert slug("Payment page") == slug("payment_page") == slug(" PAYMENT-page! ") == "payment_page"
    assert slug("物流") == "物流" and slug("Other app") == "other_app"
    assert slug("???") == ""
