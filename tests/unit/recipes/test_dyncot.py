"""Dynamic CoT keyphrase prediction: metrics by hand, the hard-sample tracker, the VLM loader
(Qwen2-VL- and Llava-style), and all four strategies on 2 CPU ranks under ZeRO-3."""

import json

import pytest

from mmtrain.metrics.keyphrase import KeyphraseF1, f1_at_k, normalize, overlap, parse_generation
from mmtrain.recipes.dyncot import (
    DynamicSection,
    HardSampleTracker,
    rationale_is_valid,
    until_stop,
)


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


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava"])
def test_mllm_loads_trains_answer_tokens_only_and_runs_vision_on_text_only_batches(tmp_path, kind):
    from PIL import Image

    from mmtrain.models.lora import LoraSection
    from mmtrain.models.mllm import MLLM, Prompter, collate_sequences, load_model, load_processor
    from mmtrain.parallelize import keep_vision_in_graph
    from mmtrain.testing.tiny import make_tiny_vlm

    d = make_tiny_vlm(str(tmp_path / kind), kind)
    proc = load_processor(str(d))
    model = keep_vision_in_graph(MLLM(load_model(str(d), LoraSection(enabled=False))), proc)
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
    out = model("losses", batch)
    assert out["per_sample"].shape == (2,) and not model.vision_touch.ran_blank
    out["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = model("losses", collate_sequences([text_only], [answer], proc.tokenizer.pad_token_id))
    assert model.vision_touch.ran_blank  # the vision tower ran on the blank image
    out["loss"].backward()
    # the same parameters get gradients as on a batch with images: ZeRO-3's reductions line up
    assert {n for n, p in model.named_parameters() if p.grad is not None} == with_grad
    assert any("vis" in n for n in with_grad)


def test_a_generation_without_a_stop_token_counts_as_hitting_the_length_limit():
    """Evaluation reports how many generations ran into generation.max_new_tokens (their answer
    may be cut): there was no end-of-sequence or pad token before the limit."""
    assert until_stop([5, 6, 2, 0, 0], stops=(2, 0)) == ([5, 6], False)
    assert until_stop([5, 6, 7], stops=(2, 0)) == ([5, 6, 7], True)
    assert until_stop([2], stops=(2, 0)) == ([], False)
