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


@pytest.fixture(scope="module")
def intent(tmp_path_factory):
    root = tmp_path_factory.mktemp("kdsl")
    synth("intent", str(root / "intent"), 400, seed=0)
    return root
