"""Dynamic CoT keyphrase prediction: metrics by hand, the hard-sample tracker, the VLM loader
(Qwen2-VL- and Llava-style), and all four strategies on 2 CPU ranks under ZeRO-3."""

import json

import pytest
import torch

from mmtrain.data.synth import synth
from tests.helpers import REPO, eval_ranks, scalars, train
from tests.support.shards import keyphrase_posts

CONFIG = REPO / "configs" / "demo" / "dyncot.yaml"


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


@pytest.mark.heavy  # make test-all (48 s): the world-size harness also runs the loss table
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


@pytest.mark.heavy  # make test-all: keeps `make test` under 10 minutes
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
    assert 0 <= result["hit_length_limit"] <= result["n"]
    rows = [
        json.loads(line)
        for line in (cot / "predictions_test_step_00000004.jsonl").read_text().splitlines()
    ]
    assert len({r["key"] for r in rows}) == 60 and all("generated" in r for r in rows)


def test_ranks_switching_between_text_only_and_image_batches_do_not_hang(kp, tiny_models, tmp_path):
    """Every second post without its image, 4 a micro-batch per rank, every tensor partitioned: a
    rank's micro-batch is now and then text-only while the other's has images. The vision tower
    ran for a text-only batch, but its backward came first instead of last; DeepSpeed's trace of
    the gathers then broke on one rank only, and at step 4 the ranks waited on each other's
    collectives until the timeout. Now it runs into the language model's input, as images do."""
    keyphrase_posts(tmp_path / "mixed", 64, without_image=lambda i: i % 2)
    run = tmp_path / "runs" / "switching"
    train(
        run,
        common(
            kp,
            tiny_models,
            f"recipe.data.train={tmp_path / 'mixed'}",
            "recipe.strategy=sft",
            "train.micro_batch_size=4",
            "train.steps=6",
            "log.every=1",
            "eval.at_end=false",
            "deepspeed.param_persistence_threshold=0",
            "deepspeed.precision=fp32",
        ),
        config=CONFIG,
        timeout=150,
    )
    assert sorted(scalars(run, "loss/sft")) == [1, 2, 3, 4, 5, 6]


def test_text_only_rank_does_not_hang_zero3_and_lora_exports(kp, tiny_models, tmp_path):
    """Rank 0 reads only posts with images, rank 1 only text-only posts (2 equal shards, exact mode)."""
    keyphrase_posts(tmp_path / "mixed", 32, without_image=lambda i: i >= 16)
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
            "recipe.data.shuffle_shards=0",
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
