"""KDSL: rules by hand, then the pipeline on 2 CPU ranks under ZeRO-3 -- decoupled post-training,
a small model's conditions and MCTS rules, collaborative prediction, few-shot adaptation."""

import json

import pytest

from mmtrain.config import load_run_config
from mmtrain.data.synth import synth
from tests.helpers import REPO, cli_ranks, eval_ranks, train

CONFIG = REPO / "configs" / "demo" / "kdsl.yaml"


@pytest.fixture(scope="module")
def intent(tmp_path_factory):
    root = tmp_path_factory.mktemp("kdsl")
    synth("intent", str(root / "intent"), 400, seed=0)
    return root


@pytest.mark.heavy  # 85-105 s: the fast suite keeps its 10 minutes (make demo runs this pipeline too)
def test_pipeline_posttrain_mine_collaborate_adapt(intent, tiny_models, tmp_path):
    from mmtrain.cli import main

    data = [
        f"recipe.model_path={tiny_models / 'qwen2vl'}",
        f"recipe.data.train={intent / 'intent' / 'train'}",
        f"recipe.data.val={intent / 'intent' / 'val'}",
    ]
    large, small = tmp_path / "runs" / "large", tmp_path / "runs" / "small"
    train(large, data + ["train.steps=60"], config=CONFIG)
    train(
        small, data + ["train.steps=30", "recipe.tasks=[scene]", "recipe.mode=joint"], config=CONFIG
    )
    final = json.loads((large / "eval.jsonl").read_text().splitlines()[-1])
    assert final["n"] == 40 and final["scene_acc"] > 0.35  # chance 0.2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(large / "tensorboard"))
    acc.Reload()
    assert {"eval/confusion/scene", "eval/confusion/intent"} <= set(acc.Tags()["images"])

    # the small model reads conditions; MCTS mines the rule base (a person can read and edit it)
    rules_dir = tmp_path / "rules"
    # 2 ranks read conditions
    printed = cli_ranks("kdsl", "mine", str(small), "--out", str(rules_dir))
    rules = json.loads((rules_dir / "rules.json").read_text())
    assert rules and all({"task", "if", "then", "precision", "support"} <= set(r) for r in rules)
    # mined on the training split, precision and support measured on the validation split
    assert all(r["mined"]["precision"] >= 0.8 and r["mined"]["support"] >= 3 for r in rules)
    assert all(r["support"] >= 1 and 0.0 <= r["precision"] <= 1.0 for r in rules)
    assert json.loads((rules_dir / "mining.json").read_text())["precision_on"] == "val"
    assert printed.count("IF ") == len(rules)  # printed once, by rank 0
    assert {"train", "val", "test"} <= {
        p.stem.split("_")[1] for p in rules_dir.glob("conditions_*.json")
    }
    assert main(["kdsl", "mine", str(small), "--out", str(rules_dir)]) == 2  # never overwrites

    # collaborative prediction, its mix chosen on the validation split: at least the model alone
    both = eval_ranks(large, "--split", "val", "--set", f"recipe.rules={rules_dir / 'rules.json'}")
    for t in ("scene", "intent"):
        assert both[f"{t}_wf1_rules"] >= both[f"{t}_wf1"] - 1e-9, both
    assert set(both["collab"]) == {"scene", "intent"}

    # a hand-written rule is loaded and used: every 'cancel' dialogue becomes cancel_order
    hand = tmp_path / "hand"
    hand.mkdir()
    for f in rules_dir.glob("conditions_*.json"):
        (hand / f.name).write_text(f.read_text())
    (hand / "rules.json").write_text(
        json.dumps(
            [
                {
                    "task": "intent",
                    "if": ["dialogue contains cancel"],
                    "then": "cancel_order",
                    "precision": 1.0,
                    "support": 1,
                }
            ]
        )
    )
    eval_ranks(
        large,
        "--split",
        "test",
        "--set",
        f"recipe.rules={hand / 'rules.json'}",
        "--set",
        "recipe.collab.overrides=[0.99]",
    )
    rows = [
        json.loads(x) for x in next(large.glob("predictions_test_*.jsonl")).read_text().splitlines()
    ]
    cancel = [r for r in rows if "cancel" in r["dialogue"].lower()]
    assert cancel and all(
        r["probs_rules"]["intent"][1] == 1.0 and r["rules_fired"]["intent"] for r in cancel
    )
    assert load_run_config(large).recipe.rules is None  # --set changed the evaluation, not the run

    # few-shot adaptation to a new label set (intents -> domains), then the rules re-scored on it
    domains = (
        "track_package=logistics,refund_status=refund,cancel_order=refund,payment_issue=payment,"
        "ask_price=product,product_detail=product,other_app_issue=other_app"
    )
    new = tmp_path / "new"
    for split, k in (("train", 4), ("val", 100), ("test", 100)):
        assert (
            main(
                [
                    "data",
                    "fewshot",
                    str(intent / "intent" / split),
                    str(new / split),
                    "--k",
                    str(k),
                    "--task",
                    "intent",
                    "--relabel",
                    domains,
                ]
            )
            == 0
        )
    assert main(["export", str(large), str(tmp_path / "large_x")]) == 0
    adapted = tmp_path / "runs" / "adapted"
    train(
        adapted,
        [
            f"recipe.model_path={tiny_models / 'qwen2vl'}",
            f"recipe.data.train={new / 'train'}",
            f"recipe.data.val={new / 'val'}",
            f"recipe.init_from={tmp_path / 'large_x' / 'model'}",
            "train.steps=4",
            "train.micro_batch_size=4",
        ],
        config=CONFIG,
    )
    final = json.loads((adapted / "eval.jsonl").read_text().splitlines()[-1])
    assert "intent_wf1" in final and final["n"] == 40
    assert (
        main(
            [
                "kdsl",
                "mine",
                str(small),
                "--data",
                str(new),
                "--rescore",
                str(rules_dir / "rules.json"),
                "--out",
                str(tmp_path / "rules_new"),
            ]
        )
        == 0
    )
    rescored = json.loads((tmp_path / "rules_new" / "rules.json").read_text())
    old_intents = [r for r in rescored if r["task"] == "intent"]
    # old labels gone
    assert len(rescored) == len(rules) and all(r["precision"] == 0.0 for r in old_intents)

    table = tmp_path / "seesaw.md"  # from the latest test evaluation (the hand rule's)
    assert main(["kdsl", "seesaw", f"decoupled={large}", "--out", str(table)]) == 0
    text = table.read_text()
    assert "| decoupled |" in text and "| decoupled + rules |" in text
