"""KDSL: rules by hand, then the pipeline on 2 CPU ranks under ZeRO-3 -- decoupled post-training,
a small model's conditions and MCTS rules, collaborative prediction, few-shot adaptation."""

import json

import pytest

from mmtrain.config import ConfigError, load_config
from mmtrain.data.synth import synth
from mmtrain.models.rules import Rule, RuleBase, RuleError, combine, mine_rules, score_rule
from tests.helpers import REPO

CONFIG = REPO / "configs" / "demo" / "kdsl.yaml"


def test_mcts_finds_the_rule_that_explains_the_labels():
    examples = []
    for i in range(60):
        page = ["logistics", "payment", "product"][i % 3]
        ambiguous = i % 2 == 0
        conds = {
            f"image shows {page}",
            "dialogue contains check" if ambiguous else "dialogue contains cancel",
            f"dialogue contains w{i % 7}",
        }
        label = (
            {"logistics": "track_package", "payment": "payment_issue", "product": "product_detail"}[
                page
            ]
            if ambiguous
            else "cancel_order"
        )
        examples.append((conds, label))
    rules = mine_rules("intent", examples, iterations=600, min_support=3, min_precision=0.9, seed=0)
    as_text = {(r.conditions, r.label) for r in rules}
    assert (("dialogue contains cancel",), "cancel_order") in as_text
    assert (("dialogue contains check", "image shows logistics"), "track_package") in as_text
    assert all(r.precision >= 0.9 and r.support >= 3 for r in rules)
    for r in rules:  # precision and support are what they claim
        assert score_rule(r.conditions, examples)[1:] == (r.precision, r.support)


def test_init_from_without_lora_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="recipe.init_from names saved LoRA adapters"):
        load_config(
            CONFIG,
            [
                f"recipe.model_path={tmp_path}",
                f"recipe.data.train={tmp_path}",
                f"recipe.data.val={tmp_path}",
                "recipe.mode=joint",
                "recipe.lora.enabled=false",
                f"recipe.init_from={tmp_path}",
            ],
        )


def test_rule_file_is_checked_and_collaboration_overrides_or_votes(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            [
                {"task": "intent", "if": ["dialogue contains cancel"], "then": "cancel_order"},
                {"task": "intent", "if": ["the sky is blue"], "then": "cancel_order"},
            ]
        )
    )
    with pytest.raises(RuleError, match=r"rule 1: condition 'the sky is blue'"):
        RuleBase.load(bad)
    bad.write_text(json.dumps([{"task": "intent", "if": ["dialogue contains x"], "then": "fly"}]))
    with pytest.raises(RuleError, match="label 'fly' is not one of the intent labels"):
        RuleBase.load(bad, {"intent": ["cancel_order", "ask_price"]})
    strong = Rule("intent", ("dialogue contains cancel",), "cancel_order", 0.97, 10)
    weak = Rule("intent", ("dialogue contains price",), "ask_price", 0.6, 5)
    labels = ["ask_price", "cancel_order"]
    assert combine([0.9, 0.1], labels, [strong, weak], override=0.95, weight=0.5) == [0.0, 1.0]
    mixed = combine([0.2, 0.8], labels, [weak], override=0.95, weight=0.5)
    assert mixed == pytest.approx([0.5 * 0.2 + 0.5, 0.5 * 0.8])
    assert combine([0.2, 0.8], labels, [weak], override=0.95, weight=0.0) == [0.2, 0.8]
    never_right = Rule("intent", ("dialogue contains price",), "ask_price", 0.0, 3)  # held out
    assert combine([0.2, 0.8], labels, [never_right], override=0.95, weight=0.5) == [0.2, 0.8]


@pytest.fixture(scope="module")
def intent(tmp_path_factory):
    root = tmp_path_factory.mktemp("kdsl")
    synth("intent", str(root / "intent"), 400, seed=0)
    return root


# -- real labels and Chinese dialogues (issue 18, items 1 and 3) ----------------------------------


def zh_intents(split, n):
    from mmtrain.data.synth import samples

    return [s["json"] for s in samples("intent", n, 0, split, "zh")]


def test_rules_are_mined_from_chinese_dialogues_and_labels_with_spaces():
    from mmtrain.models.rules import dialogue_conditions, image_condition

    examples = [
        ({image_condition(s["scene"])} | dialogue_conditions(s["turns"][-1]["text"]), s["intent"])
        for s in zh_intents("train", 300)
    ]
    assert "dialogue contains 取消" in examples[0][0] | dialogue_conditions("我要取消订单。")
    assert any("image shows payment_page" in c for c, _ in examples)
    rules = mine_rules("intent", examples, iterations=800, min_support=3, min_precision=0.9)
    found = {(r.conditions, r.label) for r in rules}
    assert (("dialogue contains 取消",), "Cancel order") in found
    assert any(
        "image shows logistics" in conds and label == "Track package" for conds, label in found
    )


def test_a_hand_written_rule_fires_whatever_the_case_and_spacing_of_its_names(tmp_path):
    from mmtrain.models.rules import dialogue_conditions, image_condition

    f = tmp_path / "rules.json"
    rule = {"task": "scene", "if": ["Image shows Payment Page", "dialogue contains REFUND"]}
    f.write_text(json.dumps([{**rule, "then": "payment page"}], ensure_ascii=False))
    (r,) = RuleBase.load(f, {"scene": ["Payment page", "Logistics"]}).rules
    assert r.label == "Payment page"  # the label set's own spelling
    seen = {image_condition("Payment page")} | dialogue_conditions("I want a Refund!")
    assert r.matches(seen)
    f.write_text(json.dumps([{**rule, "if": ["dialogue contains 我要退款"], "then": "Logistics"}]))
    with pytest.raises(RuleError, match="takes one word"):
        RuleBase.load(f)


def kdsl_scorer(labels):
    """A KDSL recipe with just what scoring reads (no model)."""
    from types import SimpleNamespace

    from mmtrain.recipes.kdsl import KDSL

    r = KDSL.__new__(KDSL)
    r.cfg = SimpleNamespace(tasks=["scene"])
    r.labels = {"scene": labels}
    r.by_slug = {"scene": KDSL._slugs("scene", labels)}
    return r


def test_gold_labels_outside_the_label_set_count_as_errors_and_are_reported():
    r = kdsl_scorer(["Logistics", "Payment page"])
    row = lambda gold, p: {"gold": {"scene": gold}, "probs": {"scene": p}}  # noqa: E731
    rows = [row("logistics", [0.9, 0.1]), row("Payment page", [0.2, 0.8])]
    assert r._scores(rows).metrics == {"scene_wf1": 1.0, "scene_acc": 1.0, "scene_unknown_gold": 0}
    rows.append(row("Coupon page", [0.9, 0.1]))  # not a label: an error, not a dropped row
    out = r._scores(rows, figures=True)
    assert out.metrics["scene_unknown_gold"] == 1 and out.metrics["scene_acc"] == pytest.approx(
        2 / 3
    )
    # weighted F1: logistics (F1 2/3: one of its two predictions wrong), payment (1), unknown (0)
    assert out.metrics["scene_wf1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    with pytest.raises(ConfigError, match="differ only in case"):
        kdsl_scorer(["Logistics", "logistics"])


def test_rule_precision_is_measured_on_held_out_data():
    from mmtrain.tools.kdsl import held_out_precision

    a = Rule("scene", ("image shows logistics",), "Logistics", 1.0, 40)
    b = Rule("scene", ("dialogue contains parcel",), "Logistics", 1.0, 5)
    val = {
        "scene": [({"image shows logistics"}, "Logistics")] * 3
        + [({"image shows logistics"}, "Refund")]
    }
    base, counts = held_out_precision(RuleBase([a, b]), val)
    (kept,) = base.rules  # b: no validation example to judge it by
    assert (kept.precision, kept.support) == (0.75, 4)
    assert kept.mined == {"precision": 1.0, "support": 40} and counts == {"scene": 4}
    assert kept.to_json()["mined"] == {"precision": 1.0, "support": 40}
    with pytest.raises(ConfigError, match="precision_on=val, but the data has no val split"):
        held_out_precision(RuleBase([a]), {"scene": []})
