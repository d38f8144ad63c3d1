"""engine/weights.py: a checkpoint consolidated once for evaluation, and loaded back whole."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmtrain.engine import weights


class Net(nn.Module):
    """A linear layer, a tied output head, a persistent buffer (kept in fp32) and a
    non-persistent one (never stored)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.BatchNorm1d(6)
        self.register_buffer("inv_freq", torch.rand(3), persistent=False)


def stage0_checkpoint(root, model, tag="step_00000002"):
    """A checkpoint as DeepSpeed writes it at ZeRO stage 0: the module and its buffer names."""
    (root / tag).mkdir(parents=True)
    buffers = [n for n, _ in model.named_buffers() if n != "inv_freq"]
    torch.save(
        {"module": model.state_dict(), "buffer_names": buffers},
        root / tag / "mp_rank_00_model_states.pt",
    )
    return tag


def test_consolidated_once_in_the_run_precision_with_buffers_as_trained(tmp_path):
    torch.manual_seed(0)
    trained = Net()
    trained.norm.running_mean.uniform_()  # fp32 values bf16 would round
    tag = stage0_checkpoint(tmp_path, trained)
    path = weights.consolidate(tmp_path, tag, "bf16")
    assert path == tmp_path / tag / "consolidated-bf16.safetensors"
    from safetensors.torch import load_file

    stored = load_file(str(path))
    assert stored["proj.weight"].dtype == torch.bfloat16
    assert stored["norm.running_mean"].dtype == torch.float32
    assert torch.equal(stored["norm.running_mean"], trained.norm.running_mean)
    assert stored["norm.num_batches_tracked"].dtype == torch.int64
    assert "inv_freq" not in stored
    written = path.stat().st_mtime_ns
    assert weights.consolidate(tmp_path, tag, "bf16") == path
    assert path.stat().st_mtime_ns == written  # reused, not written again
    assert weights.stored_bytes(path) == sum(t.numel() * t.element_size() for t in stored.values())

    fresh = Net()
    keep = fresh.inv_freq.clone()
    weights.load_whole(fresh, path)
    assert torch.equal(fresh.proj.weight, trained.proj.weight.to(torch.bfloat16).float())
    assert fresh.head.weight is fresh.embed.weight  # still tied
    assert torch.equal(fresh.norm.running_mean, trained.norm.running_mean)
    assert torch.equal(fresh.inv_freq, keep)


def test_a_file_that_does_not_fit_the_model_names_what_differs(tmp_path):
    tag = stage0_checkpoint(tmp_path, Net())
    path = weights.consolidate(tmp_path, tag, "fp32")

    class Other(Net):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(weights.WeightsError, match=r"missing \['extra.bias', 'extra.weight'\]"):
        weights.load_whole(Other(), path)


def test_a_checkpoint_that_cannot_be_consolidated_says_so_and_writes_nothing(tmp_path):
    (tmp_path / "step_00000001").mkdir()
    with pytest.raises(RuntimeError, match="could not consolidate .*no DeepSpeed model-states"):
        weights.consolidate(tmp_path, "step_00000001", "bf16")
    assert list((tmp_path / "step_00000001").iterdir()) == []
