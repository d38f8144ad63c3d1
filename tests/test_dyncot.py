"""Dynamic CoT keyphrase prediction: metrics by hand, the hard-sample tracker, the VLM loader
(Qwen2-VL- and Llava-style), and all four strategies on 2 CPU ranks under ZeRO-3."""

import json

import pytest
import torch

from mmtrain.data.shards import write_shards
from mmtrain.data.synth import synth
from mmtrain.metrics.keyphrase import KeyphraseF1, f1_at_k, normalize, overlap, parse_generation
from mmtrain.recipes.dyncot import DynamicSection, HardSampleTracker, rationale_is_valid
from tests.helpers import REPO, eval_ranks, scalars, train

CONFIG = REPO / "configs" / "demo" / "dyncot.yaml"


# -- metrics -----------------------------------------------------------------------------------


def test_f1_at_k_divides_precision_by_k_and_stems():
    assert normalize("Running Shoes") == normalize("run shoe") == "run shoe"
    # P = 1/3, not 1
    assert f1_at_k(["a"], ["a", "b"], 3) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert f1_at_k(["x", "a", "b"], ["a", "b"], 1) == 0.0
    m = KeyphraseF1(ks=(1, 3), train_keyphrases=["cats", "beach"])
    # text "my cats at the beach": 'cat' and 'beach' present, 'sunset' absent; 'sunset' unseen in
    # training
    m.update(
        [["Cats", "cat", "sunsets", "dog"]], [["cat", "beach", "sunset"]], ["my cats at the beach"]
    )
    r = m.compute()
    # de-duplicated after stemming: [cat, sunset, dog]; top-1: cat (1 correct): P=1, R=1/3
    assert r["f1@1"] == pytest.approx(0.5)
    # top-3: cat, sunset correct: P=2/3, R=2/3
    assert r["f1@3"] == pytest.approx(2 / 3)
    # present: gold [cat, beach], predicted present [cat]: @1 P=1, R=1/2
    assert r["present_f1@1"] == pytest.approx(2 / 3)
    # absent: gold [sunset], predicted absent [sunset, dog]: @1 P=1 R=1, @3 P=1/3 R=1
    assert r["absent_f1@1"] == pytest.approx(1.0) and r["absent_f1@3"] == pytest.approx(0.5)
    assert r["unseen_f1@1"] == pytest.approx(1.0) and r["n_unseen"] == 1
    assert overlap(["cat", "beach"], ["cats", "sunset", "beach", "dog"]) == 0.5


def test_parse_generation_and_rationale_filter():
    assert parse_generation("<think> red circles </think> circle; red") == (
        "red circles",
        ["circle", "red"],
    )
    assert parse_generation("circle, red.") == (None, ["circle", "red"])
    assert parse_generation("<think> never closed") == ("never closed", [])
    assert rationale_is_valid("It shows circles. Answer: circles; blue", ["circle", "red"])
    assert not rationale_is_valid("It shows a circle. Answer: blue; star", ["circle", "red"])


def test_tracker_switches_samples_above_gamma_for_patience_epochs():
    t = HardSampleTracker(
        DynamicSection(quantile=None, gamma=1.0, patience=2, warmup_epochs=1, detrend=False)
    )
    t.record(["a", "b"], [2.0, 0.5])
    t.end_epoch([t.pending, {"c": [3.0, 1]}], 1)  # another rank saw c
    assert t.switched == set() and t.streak == {"a": 1, "b": 0, "c": 1}
    t.record(["a", "b"], [1.5, 0.2])
    entry = t.end_epoch([t.pending, {"c": [0.4, 1]}], 2)
    assert t.switched == {"a"} and entry["switched_frac"] == pytest.approx(1 / 3)
    restored = HardSampleTracker(t.cfg)
    restored.load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert restored.state_dict() == t.state_dict()
    q = HardSampleTracker(DynamicSection(quantile=0.5, patience=1, warmup_epochs=1, detrend=False))
    q.end_epoch([{k: [float(i), 1] for i, k in enumerate("abcd")}], 1)
    assert q.switched == {"c", "d"}  # above the median 1.5
    d = HardSampleTracker(DynamicSection(quantile=0.5, patience=1, warmup_epochs=1))  # detrended:
    d.record(["a", "b"], [4.0, 2.0])  # running mean 3.0: a +1, b -1
    d.record(["c", "d"], [1.0, 3.0])  # running mean 0.9 * 3 + 0.1 * 2 = 2.9: c -1.9, d +0.1
    assert d.pending == {
        "a": [1.0, 1],
        "b": [-1.0, 1],
        "c": [pytest.approx(-1.9), 1],
        "d": [pytest.approx(0.1), 1],
    }


# -- the loader --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava"])
def test_mllm_loads_trains_answer_tokens_only_and_runs_vision_on_text_only_batches(tmp_path, kind):
    from PIL import Image

    from mmtrain.models.mllm import (
        MLLM,
        LoraSection,
        Prompter,
        blank_image_inputs,
        collate_sequences,
        load_model,
        load_processor,
    )
    from mmtrain.testing.tiny import make_tiny_vlm

    d = make_tiny_vlm(str(tmp_path / kind), kind)
    proc = load_processor(str(d))
    model = MLLM(load_model(str(d), LoraSection(enabled=False)), blank_image_inputs(proc))
    pr = Prompter(proc)
    with_image = pr.encode_prompt(
        "post : some circle art", Image.new("RGB", (200, 150), (220, 40, 40))
    )
    text_only = pr.encode_prompt("post : some circle art")
    answer = pr.encode_answer("circle; red; art")
    batch = collate_sequences(
        [with_image, text_only], [answer, answer], proc.tokenizer.pad_token_id
    )
    assert (batch["labels"] != -100).sum(1).tolist() == [len(answer)] * 2  # loss on the answer only
    assert batch["labels"][0, with_image["input_ids"].shape[1] :][: len(answer)].tolist() == answer
    out = model(batch)
    assert out["per_sample"].shape == (2,) and model._blank_out is None
    out["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = model(collate_sequences([text_only], [answer], proc.tokenizer.pad_token_id))
    assert model._blank_out is not None  # the vision tower ran on the blank image
    out["loss"].backward()
    # the same parameters get gradients as on a batch with images: ZeRO-3's reductions line up
    assert {n for n, p in model.named_parameters() if p.grad is not None} == with_grad
    assert any("vis" in n for n in with_grad)


# -- the recipe on 2 ranks -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def kp(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("dyncot")
    synth("keyphrase", str(root / "kp"), 600, seed=0)
    return root


def common(kp, tiny, *extra):
    return [
        f"recipe.model_path={tiny / 'qwen2vl'}",
        f"recipe.data.train={kp / 'kp' / 'train'}",
        f"recipe.data.val={kp / 'kp' / 'val'}",
        *extra,
    ]


def test_dynamic_switches_some_samples_and_resume_keeps_the_loss_table(kp, tiny_models, tmp_path):
    # 480 training posts, 8 per rank per step: 30 steps an epoch; with warmup_epochs=1 the first
    # decision comes after epoch 1, i.e. at step 31. Run b stops at step 20 and resumes.
    args = common(
        kp,
        tiny_models,
        "train.steps=36",
        "log.every=1",
        "eval.at_end=false",
        "checkpoint.every=1000",
        "recipe.dynamic.warmup_epochs=1",
    )
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    train(a, args, config=CONFIG)
    train(b, args + ["run.stop_after_steps=20"], config=CONFIG)
    assert not (b / "dynamic_cot.jsonl").exists()  # no epoch end yet
    train(b, args, config=CONFIG)
    decisions = [json.loads(line) for line in (a / "dynamic_cot.jsonl").read_text().splitlines()]
    assert [d["epoch"] for d in decisions] == [0] and "gamma" in decisions[0]
    assert 0 < decisions[0]["switched"] < decisions[0]["tracked"] == 480
    assert decisions[0]["newly_switched"] == decisions[0]["switched"]
    assert (b / "dynamic_cot.jsonl").read_text() == (
        a / "dynamic_cot.jsonl"
    ).read_text()  # same decisions
    la, lb = scalars(a, "loss/sft"), scalars(b, "loss/sft")
    assert [la[s] for s in range(21, 37)] == [lb[s] for s in range(21, 37)]
    assert scalars(a, "stats/switched_frac")[36] == pytest.approx(decisions[0]["switched_frac"])
    cot = scalars(a, "stats/cot_frac")
    assert all(cot[s] == 0 for s in range(1, 31)) and sum(cot[s] for s in range(31, 37)) > 0


def test_sft_beats_zero_shot_and_cot_trains_on_filtered_rationales(kp, tiny_models, tmp_path):
    zero = tmp_path / "runs" / "zero"
    train(
        zero, common(kp, tiny_models, "recipe.strategy=zero_shot", "train.steps=0"), config=CONFIG
    )
    sft = tmp_path / "runs" / "sft"
    train(sft, common(kp, tiny_models, "recipe.strategy=sft", "train.steps=60"), config=CONFIG)
    f_zero = json.loads((zero / "eval.jsonl").read_text().splitlines()[-1])
    f_sft = json.loads((sft / "eval.jsonl").read_text().splitlines()[-1])
    assert f_sft["f1@3"] > f_zero["f1@3"] + 0.1, (f_zero["f1@3"], f_sft["f1@3"])
    assert f_sft["n"] == 60 and f_sft["kp_overlap_with_train"] == 1.0

    cot = tmp_path / "runs" / "cot"
    train(
        cot,
        common(
            kp,
            tiny_models,
            "recipe.strategy=cot",
            "train.steps=4",
            "log.every=1",
            "recipe.data.workers=2",
        ),
        config=CONFIG,
    )
    frac = scalars(cot, "stats/cot_frac")
    dropped = scalars(cot, "stats/rationale_dropped_frac")
    assert all(abs(frac[s] + dropped[s] - 1) < 1e-6 for s in frac)  # every valid rationale is used
    assert any(v > 0 for v in dropped.values())  # ~10% are wrong and dropped
    log = (cot / "train.log").read_text()
    assert '"rationales_dropped": ' in log and '"rationales": 480' in log
    result = eval_ranks(cot, "--split", "test")
    assert result["n"] == 60 and result["n_unseen"] > 0 and result["kp_overlap_with_train"] < 1.0
    assert {"think_rate", "mean_gen_tokens", "unseen_f1@3", "absent_f1@5"} <= set(result)
    rows = [
        json.loads(line)
        for line in (cot / "predictions_test_step_00000004.jsonl").read_text().splitlines()
    ]
    assert len({r["key"] for r in rows}) == 60 and all("generated" in r for r in rows)


def test_text_only_rank_does_not_hang_zero3_and_lora_exports(kp, tiny_models, tmp_path):
    """Rank 0 reads only posts with images, rank 1 only text-only posts (2 equal shards, exact mode)."""
    import random

    from mmtrain.data.synth import keyphrase

    samples = []
    for i in range(32):
        s = keyphrase(random.Random(i), "train")
        if i >= 16:
            s.pop("jpg")
        samples.append({"__key__": f"s{i:04d}", **s})
    write_shards(iter(samples), tmp_path / "mixed", "keyphrase", max_count=16)
    lora = "recipe.lora={enabled: true, r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"
    run = tmp_path / "runs" / "mixed"
    train(
        run,
        common(
            kp,
            tiny_models,
            f"recipe.data.train={tmp_path / 'mixed'}",
            "recipe.strategy=sft",
            "train.steps=4",
            "eval.at_end=false",
            lora,
            "recipe.data.shuffle_buffer=1",
        ),
        config=CONFIG,
        timeout=180,
    )
    assert len(scalars(run, "loss/sft")) >= 1
    from mmtrain.cli import main

    assert main(["export", str(run), str(tmp_path / "x")]) == 0
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_models / "qwen2vl")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "x" / "model")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in peft_model.named_parameters())
    assert torch.isfinite(torch.tensor(scalars(run, "loss/sft")[4]))
