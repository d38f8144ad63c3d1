"""Published configs at their real widths on the CPU: what tiny widths hide (head counts that do
not divide, projections between towers of different widths, tensors large enough to be
partitioned) shows here. The models have the published checkpoints' widths, head counts and
image geometry, random weights and one or two layers per stack; each run is 2 training steps
and an evaluation on 2 CPU ranks under the config's own ZeRO settings."""

from __future__ import annotations

import re

import pytest

from tests.helpers import REPO, scalars, train

# two steps and an evaluation at the end, in fp32 (these CPUs emulate bf16 matmuls, slowly)
SMOKE = [
    "recipe.data.workers=1",
    "train.steps=2",
    "log.every=1",
    "eval.every=0",
    "checkpoint.every=1000",
    "deepspeed.precision=fp32",
]


@pytest.fixture(scope="module")
def clip_l14_and_bert_base(tmp_path_factory):
    from mmtrain_testing.tiny import make_vikdf_towers_at_published_widths

    return make_vikdf_towers_at_published_widths(str(tmp_path_factory.mktemp("published")))


@pytest.mark.heavy
def test_vikdf_stage1_at_published_widths(tmp_path, clip_l14_and_bert_base, image_text_shards):
    m = clip_l14_and_bert_base
    run = tmp_path / "runs" / "stage1"
    train(
        run,
        [
            f"recipe.vision_path={m / 'clip'}",
            f"recipe.text_path={m / 'clip'}",
            f"recipe.bert_init={m / 'bert'}",
            "recipe.iqformer.layers=2",  # one self-attention and one cross-attention layer
            f"recipe.data.train={image_text_shards / 'train'}",
            f"recipe.data.val={image_text_shards / 'val'}",
            "recipe.data.mode=exact",
            "recipe.data.shuffle_buffer=16",
            "recipe.image_log_every=0",
            "train.micro_batch_size=4",
            *SMOKE,
        ],
        world=2,
        config=REPO / "configs" / "vikdf" / "stage1.yaml",
        timeout=900,
    )
    log = (run / "train.log").read_text()
    for name in ("tim", "mim", "mtm"):
        losses = scalars(run, f"loss/{name}")
        assert sorted(losses) == [1, 2] and all(v == v and v < 1e4 for v in losses.values())
    # the published config's zero_stage auto: the model states fit replicated, so stage 2
    assert "deepspeed.zero_stage=auto: stage 2" in log, log[-3000:]
    assert "eval at step 2" in log and "mean_r@1" in log

    from safetensors.torch import load_file

    from mmtrain.cli import main

    export = tmp_path / "export"
    assert main(["export", str(run), str(export)]) == 0
    state = load_file(export / "model.safetensors")
    assert state["iqformer.queries"].shape == (1, 32, 768)  # 32 knowledge vectors, bert-base wide


@pytest.mark.heavy
def test_vikdf_fusion_and_dialogue_at_llama_2_7b_width(tmp_path, clip_l14_and_bert_base):
    """Fusion into a frozen LLM 4,096 wide (replicated, as the config says), then dialogue from
    the fusion export, with the stage-1 IQ-Former at its published shape."""
    from safetensors.torch import load_file

    from mmtrain.cli import main
    from mmtrain.data.synth import synth
    from mmtrain.models.iqformer import IQFormer
    from mmtrain_testing.tiny import iqformer_config, make_llama_at_published_width

    m = clip_l14_and_bert_base
    llama = make_llama_at_published_width(str(tmp_path / "llama"))
    iq = iqformer_config("published", layers=2)
    IQFormer(iq).save_pretrained(tmp_path / "stage1" / "iqformer")
    synth("image-text", str(tmp_path / "it"), 40, seed=0)
    synth("dialogue", str(tmp_path / "dlg"), 40, seed=0)
    common = [
        f"recipe.llm_path={llama}",
        f"recipe.vision_path={m / 'clip'}",
        f"recipe.text_path={m / 'clip'}",
        f"recipe.stage1={tmp_path / 'stage1'}",
        "recipe.data.mode=exact",
        "train.micro_batch_size=2",
        *SMOKE,
    ]
    fusion = tmp_path / "runs" / "fusion"
    train(
        fusion,
        [
            *common,
            f"recipe.data.train={tmp_path / 'it' / 'train'}",
            f"recipe.data.val={tmp_path / 'it' / 'val'}",
        ],
        world=2,
        config=REPO / "configs" / "vikdf" / "stage2_fusion.yaml",
        timeout=900,
    )
    for name in ("ce", "recon", "kl"):
        losses = scalars(fusion, f"loss/{name}")
        assert sorted(losses) == [1, 2] and all(v == v and abs(v) < 1e4 for v in losses.values())
    log = (fusion / "train.log").read_text()
    assert "eval at step 2" in log and '"ppl"' in log
    export = tmp_path / "fusion-export"
    assert main(["export", str(fusion), str(export)]) == 0
    state = load_file(export / "model.safetensors")
    assert state["bvif.to_llm.weight"].shape == (4096, 768)  # knowledge -> 32 soft prompts
    assert state["bvif.placeholders"].shape == (32, 4096)  # the prior's 32 placeholders
    assert state["bvif.prior.weight"].shape == (2 * 768, 4096)
    assert not any(k.startswith("llm.") for k in state)  # the frozen LLM is not part of it

    dialogue = tmp_path / "runs" / "dialogue"
    train(
        dialogue,
        [
            *common,
            f"recipe.init_from={export}",
            f"recipe.data.train={tmp_path / 'dlg' / 'train'}",
            f"recipe.data.val={tmp_path / 'dlg' / 'val'}",
            "recipe.generation.max_new_tokens=8",
            "recipe.generation.num_beams=1",
        ],
        world=2,
        config=REPO / "configs" / "vikdf" / "stage2_dialogue.yaml",
        timeout=900,
    )
    losses = scalars(dialogue, "loss/ce")
    assert sorted(losses) == [1, 2] and all(0 < v < 1e4 for v in losses.values())
    assert "eval at step 2" in (dialogue / "train.log").read_text()


def _qwen2_vl_run(tmp_path, shape, config, kind, overrides):
    from mmtrain.data.synth import synth
    from mmtrain_testing.tiny import make_tiny_vlm

    model = make_tiny_vlm(str(tmp_path / f"qwen2vl_{shape}"), shape=shape)
    synth(kind, str(tmp_path / kind), 40, seed=0)
    run = tmp_path / "runs" / shape
    train(
        run,
        [
            f"recipe.model_path={model}",
            f"recipe.data.train={tmp_path / kind / 'train'}",
            f"recipe.data.val={tmp_path / kind / 'val'}",
            "train.micro_batch_size=2",
            *SMOKE,
            *overrides,
        ],
        world=2,
        config=REPO / "configs" / config,
        timeout=900,
    )
    return run, (run / "train.log").read_text()


@pytest.mark.heavy
def test_dyncot_at_qwen2_vl_2b_widths(tmp_path):
    run, log = _qwen2_vl_run(
        tmp_path,
        "2b",
        "dyncot/qwen2vl_2b.yaml",
        "keyphrase",
        ["recipe.generation.max_new_tokens=24", "recipe.max_answer_tokens=24"],
    )
    losses = scalars(run, "loss/sft")
    assert sorted(losses) == [1, 2] and all(0 < v < 1e4 for v in losses.values())
    # LoRA on a frozen base: the base loaded partitioned, the adapters trained partitioned too
    built = re.search(r"built with [\d.]+M \((\d+)%\) on this rank", log)
    assert built and int(built.group(1)) < 60, log
    assert "eval at step 2" in log and '"f1@3"' in log


@pytest.mark.heavy
def test_kdsl_decoupled_at_qwen2_vl_7b_widths_with_activation_checkpointing(tmp_path):
    run, log = _qwen2_vl_run(tmp_path, "7b", "kdsl/qwen2vl_7b.yaml", "intent", [])
    for task in ("scene", "intent"):
        losses = scalars(run, f"loss/{task}")
        assert sorted(losses) == [1, 2] and all(0 < v < 1e4 for v in losses.values())
    assert "activation checkpointing on in: model.base_model.model" in log  # the config's choice
    built = re.search(r"built with [\d.]+M \((\d+)%\) on this rank", log)
    assert built and int(built.group(1)) < 60, log
    assert "eval at step 2" in log


@pytest.mark.heavy
def test_kdsl_small_model_at_qwen2_vl_2b_widths(tmp_path):
    """The small model of KDSL's pipeline: one task (scene), joint, LoRA on Qwen2-VL-2B widths."""
    run, log = _qwen2_vl_run(tmp_path, "2b", "kdsl/qwen2vl_2b_small.yaml", "intent", [])
    losses = scalars(run, "loss/scene")
    assert sorted(losses) == [1, 2] and all(0 < v < 1e4 for v in losses.values())
    assert not scalars_named(run, "loss/intent")  # the small model learns the scene task only
    built = re.search(r"built with [\d.]+M \((\d+)%\) on this rank", log)
    assert built and int(built.group(1)) < 60, log
    assert "eval at step 2" in log


def scalars_named(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [t for t in acc.Tags()["scalars"] if t == tag]
