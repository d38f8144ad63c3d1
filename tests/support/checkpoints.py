"""A stand-in DeepSpeed engine that writes (or crashes while writing) a checkpoint file."""

from pathlib import Path

import torch

from mmtrain.engine import checkpoint


class FakeEngine:
    def __init__(self, crash=False):
        self.crash = crash

    def save_checkpoint(self, root, tag, save_latest):
        assert not save_latest  # the pointer is ours to move, last
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        if self.crash:
            (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"half")
            raise OSError("disk full")
        torch.save({"module": None}, d / "zero_pp_rank_0_mp_rank_00_model_states.pt")


def save(root, step, crash=False, keep=2):
    return checkpoint.save(
        FakeEngine(crash), root, step, 0, {"step": step}, {"world_size": 1}, keep
    )
