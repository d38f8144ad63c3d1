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
    from mmtrain.models.tiny import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("models") / "tiny"))
