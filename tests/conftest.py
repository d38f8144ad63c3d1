"""Shared test set-up. TRITON_INTERPRET must be set before any @triton.jit is defined."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny CLIP/BERT/Llama checkpoints (`mmtrain models tiny`), made once for the whole session."""
    from mmtrain.testing.tiny import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("models") / "tiny"))


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


@pytest.fixture(scope="session")
def stage1_run(tmp_path_factory, tiny_models, image_text_shards):
    """A VIKDF stage-1 run (160 steps, 2 ranks) and its export, for the tests that need a trained
    IQ-Former."""
    from mmtrain.cli import main
    from tests.helpers import REPO, train

    root = tmp_path_factory.mktemp("stage1")
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
            "train.steps=160",
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


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "heavy: long multi-rank groups (4 ranks, every recipe): `make test-all` only"
    )
    config.addinivalue_line(
        "markers", "slurm: against a real Slurm cluster (`make test-slurm` starts one)"
    )
    config.addinivalue_line(
        "markers",
        "chaos: the fault battery (damaged checkpoints, full disks, signals, bad "
        "data): `make chaos`",
    )
