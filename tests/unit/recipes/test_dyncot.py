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
    t.record(["a"], [0.7])  # the next epoch's losses so far: this rank's own, saved apart
    restored = HardSampleTracker(t.cfg)
    restored.load_state_dict(json.loads(json.dumps(t.state_dict())), {"a": [0.7, 1]})
    assert restored.state_dict() == t.state_dict() and restored.pending == t.pending
    assert "pending" not in t.state_dict()  # the shared part holds no rank's own losses
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
    from mmtrain_testing.tiny import make_tiny_vlm

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


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava"])
def test_the_vocabulary_head_sees_only_the_answer_positions_and_the_losses_are_unchanged(
    tmp_path, kind
):
    """Logits over every position (the prompt and its image tokens, most of a sequence) were
    computed and dropped: at a 152k vocabulary they were most of a step's activation memory."""
    import torch
    from PIL import Image

    from mmtrain.models.lora import LoraSection
    from mmtrain.models.mllm import MLLM, Prompter, collate_sequences, load_model, load_processor
    from mmtrain_testing.tiny import make_tiny_vlm

    d = make_tiny_vlm(str(tmp_path / kind), kind)
    proc = load_processor(str(d))
    model = MLLM(load_model(str(d), LoraSection(enabled=False)))
    pr = Prompter(proc)
    prompts = [
        pr.encode_prompt("post : some circle art", Image.new("RGB", (200, 150), (220, 40, 40))),
        pr.encode_prompt("post : a longer text-only post about circles and art"),
    ]
    answers = [pr.encode_answer("circle; red; art"), pr.encode_answer("circle")]
    batch = collate_sequences(prompts, answers, proc.tokenizer.pad_token_id)
    seen = []
    head = model.base_model().get_output_embeddings()
    hook = head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    out = model("losses", batch)
    hook.remove()
    width = batch["input_ids"].shape[1]
    first = min(p["input_ids"].shape[1] for p in prompts)  # the first answer token's position
    assert seen == [width - first + 1]  # from the position that predicts it, to the end
    with torch.no_grad():  # the reference: every position's logits
        logits = model.model(**model._inputs(batch)).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2).float(), labels, ignore_index=-100, reduction="none"
    )
    counts = (labels != -100).sum(1)
    assert out["loss_sum"].item() == pytest.approx(ce.sum().item(), rel=1e-5)
    assert out["per_sample"].tolist() == pytest.approx((ce.sum(1) / counts).tolist(), rel=1e-5)


def test_a_generation_without_a_stop_token_counts_as_hitting_the_length_limit():
    """Evaluation reports how many generations ran into generation.max_new_tokens (their answer
    may be cut): there was no end-of-sequence or pad token before the limit."""
    assert until_stop([5, 6, 2, 0, 0], stops=(2, 0)) == ([5, 6], False)
    assert until_stop([5, 6, 7], stops=(2, 0)) == ([5, 6, 7], True)
    assert until_stop([2], stops=(2, 0)) == ([], False)


# -- real data: Unicode keyphrases and long chains of thought (issue 18, items 1 and 2) --------


def zh_samples(split, n):
    from mmtrain.data.synth import samples

    return [s["json"] for s in samples("keyphrase", n, 0, split, "zh")]


def test_chinese_and_accented_keyphrases_are_compared_not_dropped():
    assert normalize("圆形") == "圆 形" and normalize("Café Racers") == "café racer"
    text = "今天完成了我的圆形艺术作品！"
    m = KeyphraseF1(ks=(1, 3), train_keyphrases=["圆形", "艺术"])
    m.update([["圆形", "蓝色", "艺术"]], [["圆形", "红色", "艺术"]], [text])
    out = m.compute()
    assert out["f1@3"] == pytest.approx(2 / 3)  # 2 of 3 right
    assert out["n_present"] == 1 and out["present_f1@3"] == pytest.approx(0.8)  # 圆形, 艺术
    assert out["n_absent"] == 1 and out["absent_f1@3"] == 0.0  # 红色: only the image shows it
    assert out["unseen_f1@3"] == 0.0 and out["n_unseen"] == 1


def test_a_gold_keyphrase_without_letters_is_an_error_naming_the_sample():
    from mmtrain.metrics.keyphrase import KeyphraseError

    m = KeyphraseF1()
    with pytest.raises(KeyphraseError, match=r"sample test/post-7: keyphrase '!!!'"):
        m.update([["art"]], [["art", "!!!"]], ["some art"], ["test/post-7"])
    m.update([["???", "art"]], [["art"]], ["some art"])  # a predicted one keeps its rank, no match
    assert m.compute()["f1@1"] == 0.0


def test_chinese_posts_overlap_rationales_and_full_width_answers():
    train, test = zh_samples("train", 200), zh_samples("test", 100)
    kps = [k for s in train for k in s["keyphrases"]]
    share = overlap(kps, [k for s in test for k in s["keyphrases"]])
    assert 0.5 < share < 0.95  # the test split has shapes never seen in training
    valid = sum(rationale_is_valid(s["rationale"], s["keyphrases"]) for s in train) / len(train)
    assert 0.8 < valid < 0.97  # 10% of the teacher's rationales are wrong, the rest are kept
    assert parse_generation("<think>图片里是圆形</think>圆形；红色；艺术", ";") == (
        "图片里是圆形",
        ["圆形", "红色", "艺术"],
    )
    assert parse_generation("想一想。答案：圆形，红色", ";")[1] == ["圆形", "红色"]


@pytest.fixture(scope="module")
def tiny_prompter(tmp_path_factory):
    from mmtrain.models.mllm import Prompter, load_processor
    from mmtrain_testing.tiny import make_tiny_vlm

    return Prompter(load_processor(str(make_tiny_vlm(str(tmp_path_factory.mktemp("vlm"))))))


def test_a_long_rationale_loses_its_reasoning_never_its_answer_or_end_of_turn(tiny_prompter):
    from mmtrain.recipes.dyncot import DynCoTConfig, Targets

    cfg = DynCoTConfig(model_path="x", max_answer_tokens=24)
    targets = Targets(cfg, tiny_prompter)
    long = "the image shows " + " and ".join(["two red circles"] * 20) + ". Answer: circle; red"
    sample = {"keyphrases": ["circle", "red", "art"], "rationale": long}
    out = targets(sample)
    decode = tiny_prompter.tok.decode
    assert out["status"] == "ok" and out["truncated"] and len(out["cot"]) == 24
    assert out["cot"][-len(out["direct"]) :] == out["direct"]  # the answer and end of turn, whole
    assert decode(out["cot"]).startswith("<think> the image shows two red circles")
    assert "</think> circle ; red ; art" in decode(out["cot"])
    cfg.max_answer_tokens = 4  # not even the answer fits: trained direct, never cut
    out = targets(sample)
    assert out["status"] == "too_long" and out["cot"] is None and out["over_cap"]
    assert out["direct"] == tiny_prompter.encode_answer("circle; red; art")


def test_generation_shorter_than_the_training_answers_is_refused():
    from mmtrain.config import ConfigError
    from mmtrain.models.generation import GenerationSection
    from mmtrain.recipes.dyncot import DynCoTConfig

    cfg = DynCoTConfig(
        model_path="x", max_answer_tokens=256, generation=GenerationSection(max_new_tokens=128)
    )
    with pytest.raises(
        ConfigError, match="max_new_tokens=128 is below recipe.max_answer_tokens=256"
    ):
        cfg.check()
    cfg.strategy = "zero_shot"  # trains nothing: no training length to match
    cfg.check()


def test_a_training_keyphrase_without_letters_stops_the_run_naming_shard_and_sample(tmp_path):
    from types import SimpleNamespace

    from mmtrain.data.shards import DataError, write_shards
    from mmtrain.recipes.dyncot import DynCoT

    good = {"text": "some art", "keyphrases": ["art"]}
    samples = [
        {"__key__": "post-1", "json": good},
        {"__key__": "post-2", "json": {**good, "keyphrases": ["art", "？！"]}},
    ]
    write_shards(samples, tmp_path / "train", "keyphrase")
    recipe = DynCoT.__new__(DynCoT)
    recipe.cfg = SimpleNamespace(data=SimpleNamespace(train=str(tmp_path / "train")))
    recipe.ctx = SimpleNamespace(from_rank0=lambda work, what: work())  # a world of one
    with pytest.raises(DataError, match=r"sample post-2: keyphrase '？！' has no letter or digit"):
        _ = recipe.train_scan


# -- the hardness signal (issue 19, item 5) -------------------------------------------------------


def test_hardness_is_the_loss_on_the_keyphrase_tokens_alone(tiny_prompter, tmp_path):
    import torch

    from mmtrain.models.lora import LoraSection
    from mmtrain.models.mllm import MLLM, collate_sequences, load_model
    from mmtrain.recipes.dyncot import DynCoTConfig, Targets
    from mmtrain_testing.tiny import make_tiny_vlm

    t = Targets(DynCoTConfig(model_path="x"), tiny_prompter)(
        {"keyphrases": ["circle", "red", "art"]}
    )
    ids, scored = t["direct"], t["scored"]
    kept = [i for i, m in zip(ids, scored) if m]
    assert tiny_prompter.tok.decode(kept) == "circle ; red ; art"  # no end-of-turn token
    assert len(kept) < len(ids)
    torch.manual_seed(0)
    model = MLLM(load_model(str(make_tiny_vlm(str(tmp_path / "m"))), LoraSection(enabled=False)))
    prompt = tiny_prompter.encode_prompt("post : some circle art")
    batch = collate_sequences([prompt], [ids], 0, scored=[scored])
    out = model("losses", batch)
    logits = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits[0, :-1]
    per_token = torch.nn.functional.cross_entropy(
        logits, batch["input_ids"][0, 1:], reduction="none"
    )
    mask = batch["scored"][0, 1:].bool()
    assert float(out["per_sample_scored"][0]) == pytest.approx(float(per_token[mask].mean()), 1e-5)
    assert float(out["per_sample"][0]) != pytest.approx(float(out["per_sample_scored"][0]))


def test_an_absolute_gamma_is_compared_with_raw_losses_a_quantile_with_detrended_ones():
    raw = HardSampleTracker(DynamicSection(quantile=None, gamma=1.5, detrend=True))
    raw.record(["a", "b"], [1.0, 2.0])
    assert raw.pending == {"a": [1.0, 1], "b": [2.0, 1]}  # the paper's gamma: a loss value
    detrended = HardSampleTracker(DynamicSection(quantile=0.7, detrend=True))
    detrended.record(["a", "b"], [1.0, 2.0])
    assert detrended.pending == {"a": [-0.5, 1], "b": [0.5, 1]}  # minus the running mean, 1.5


def test_max_pixels_bounds_the_image_tokens_of_a_qwen2_vl_processor(tmp_path):
    """Issue 15 (memory on real inputs): a 1080p screenshot is ~2.6k image tokens at Qwen2-VL's
    default bounds; `recipe.max_pixels` caps them."""
    from PIL import Image

    from mmtrain.models.mllm import load_processor
    from mmtrain_testing.tiny import make_tiny_vlm

    qwen = str(make_tiny_vlm(str(tmp_path / "qwen")))
    image = Image.new("RGB", (400, 300))

    def patches(proc):
        return int(
            proc.image_processor(images=[image], return_tensors="pt")["image_grid_thw"].prod()
        )

    assert patches(load_processor(qwen)) == 48  # the directory's own bound: 112 x 112 pixels
    assert patches(load_processor(qwen, max_pixels=56 * 56)) == 8
    with pytest.raises(ValueError, match="min_pixels=10000 is above recipe.max_pixels=3136"):
        load_processor(qwen, min_pixels=10_000, max_pixels=56 * 56)
    llava = str(make_tiny_vlm(str(tmp_path / "llava"), "llava"))
    with pytest.raises(ValueError, match="resize by pixel count"):
        load_processor(llava, max_pixels=56 * 56)
