"""Shared test set-up. TRITON_INTERPRET must be set before any @triton.jit is defined: on a
machine without CUDA the kernels run under the interpreter; with CUDA they run natively (the
kernel tests put their tensors on the GPU, tests/unit/kernels/conftest.py), and DeepSpeed uses
the CUDA accelerator in this process. Test ranks started as processes run on the CPU with gloo
whenever there are fewer GPUs than ranks (tests/helpers.py: rank_env)."""

import os

import torch

if torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# what the tiny checkpoints are built from: a change to any of these builds them anew
TINY_SOURCES = [
    *(REPO / "mmtrain" / "testing").glob("*.py"),
    REPO / "mmtrain" / "data" / "synth.py",
]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny CLIP/BERT/Llama/Qwen2-VL checkpoints (`mmtrain models tiny`), made once per version of
    the code that makes them (tests/support/cache.py), copied for this session."""
    from mmtrain_testing.tiny import make_tiny
    from tests.support.cache import built_once

    dest = tmp_path_factory.mktemp("models") / "tiny"
    return built_once("tiny", lambda d: make_tiny(str(d)), TINY_SOURCES, dest)


def pytest_collection_finish(session):
    """A session that will need the tiny checkpoints and has none cached starts building them
    now, beside its first tests (most of which do not use them)."""
    if any("tiny_models" in getattr(item, "fixturenames", ()) for item in session.items):
        from tests.support.cache import build_in_background

        build_in_background("tiny", "mmtrain_testing.tiny:make_tiny", TINY_SOURCES)


@pytest.fixture(scope="session")
def image_text_shards(tmp_path_factory):
    from mmtrain.data.synth import synth

    root = tmp_path_factory.mktemp("it")
    synth("image-text", str(root), 1500, seed=0)
    return root


@pytest.fixture(scope="module")
def stage1_assets(tmp_path_factory, tiny_models, image_text_shards):
    """The tiny models and the image-text shards in one directory, as the stage-1 configs name them."""
    root = tmp_path_factory.mktemp("vikdf")
    (root / "tiny").symlink_to(tiny_models)
    (root / "it").symlink_to(image_text_shards)
    return root


def _stage1(root, tiny_models, image_text_shards, steps: int):
    """A VIKDF stage-1 run of `steps` steps on 2 ranks under `root`, and its export."""
    from mmtrain.cli import main
    from tests.helpers import REPO, train

    run = root / "runs" / "s1"
    t = tiny_models
    train(
        run,
        [
            f"recipe.vision_path={t / 'clip'}",
            f"recipe.text_path={t / 'clip'}",
            f"recipe.bert_init={t / 'bert'}",
            f"recipe.data.train={image_text_shards / 'train'}",
            f"recipe.data.val={image_text_shards / 'val'}",
            f"train.steps={steps}",
            "train.warmup_ratio=0.05",
            "eval.every=0",
            "checkpoint.every=0",
            "recipe.image_log_every=50",
            "log.every=20",
        ],
        config=REPO / "configs" / "demo" / "vikdf_stage1.yaml",
    )
    assert main(["export", str(run), str(root / "export")]) == 0
    return run, root / "export"


@pytest.fixture(scope="session")
def stage1_run(tmp_path_factory, tiny_models, image_text_shards):
    """A VIKDF stage-1 run (100 steps, 2 ranks: R@1 ten times chance) and its export, for the
    tests that need a trained IQ-Former."""
    return _stage1(tmp_path_factory.mktemp("stage1"), tiny_models, image_text_shards, 100)


@pytest.fixture(scope="session")
def stage1_run_longer(tmp_path_factory, tiny_models, image_text_shards):
    """The same stage 1 trained 160 steps, for the test whose effect needs a better IQ-Former:
    after 100 steps the dialogue perplexity with image knowledge equals the one without
    (1.5180 vs 1.5183, CI 2026-12-01); after 160 the knowledge helps (see the test)."""
    return _stage1(tmp_path_factory.mktemp("stage1_160"), tiny_models, image_text_shards, 160)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "heavy: long multi-rank groups (4 ranks, every recipe): `make test-all` only"
    )
    config.addinivalue_line(
        "markers", "slurm: against a real Slurm cluster (`make test-slurm` starts one)"
    )
    config.addinivalue_line(
        "markers",
        "multinode: across two hosts, each a network namespace of this machine, with a two-node "
        "Slurm cluster (`make test-multinode` starts one)",
    )
    config.addinivalue_line(
        "markers",
        "chaos: the fault battery (damaged checkpoints, full disks, signals, bad "
        "data): `make chaos`",
    )
