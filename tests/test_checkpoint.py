"""Atomicity of checkpoint saves, with a stand-in engine that can crash mid-save."""
from pathlib import Path

import pytest

from mmtrain.engine import checkpoint


class FakeEngine:
    def __init__(self, crash=False):
        self.crash = crash

    def save_checkpoint(self, root, tag, save_latest):
        assert not save_latest                      # the pointer is ours to move, last
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"half")
        if self.crash:
            raise OSError("disk full")


def save(root, step, crash=False, keep=2):
    return checkpoint.save(FakeEngine(crash), root, step, {"step": step}, {"world_size": 1}, keep)


def test_crash_during_save_keeps_latest_good(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 10)
    assert (root / "latest").read_text() == "step_00000010"
    with pytest.raises(OSError, match="disk full"):
        save(root, 20, crash=True)
    # the half-written save is not visible as a checkpoint; latest still names step 10
    assert (root / "latest").read_text() == "step_00000010"
    assert checkpoint.find_resume("auto", root) == (root, "step_00000010")
    assert (root / "step_00000020.partial").exists() and not (root / "step_00000020").exists()
    checkpoint.clean_partials(root)
    assert not (root / "step_00000020.partial").exists()


def test_keep_last_k_and_resave_same_step(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3, 4):
        save(root, s, keep=2)
    assert checkpoint.complete_tags(root) == ["step_00000003", "step_00000004"]
    save(root, 4, keep=2)                      # the same step again (after a crash and resume)
    assert checkpoint.complete_tags(root) == ["step_00000003", "step_00000004"]


def test_resume_choices(tmp_path):
    root = tmp_path / "checkpoints"
    assert checkpoint.find_resume("auto", root) is None
    save(root, 5)
    (root / "step_00000009").mkdir()           # a directory without the completion marker
    assert checkpoint.find_resume("auto", root) == (root, "step_00000005")
    assert checkpoint.find_resume("never", root) is None
    assert checkpoint.find_resume(str(root / "step_00000005"), root) == (root, "step_00000005")
    with pytest.raises(FileNotFoundError, match="not a complete mmtrain checkpoint"):
        checkpoint.find_resume(str(root / "step_00000009"), root)
    (root / "latest").write_text("step_00000009")
    with pytest.raises(FileNotFoundError, match="names 'step_00000009', which is not a complete checkpoint"):
        checkpoint.find_resume("auto", root)


def test_step_directories_without_markers_are_never_written_over(tmp_path):
    from tests.helpers import train

    run = tmp_path / "runs" / "r"
    train(run, ["train.steps=4", "checkpoint.every=2"], world=1)
    ckpts = run / "checkpoints"
    (ckpts / "latest").unlink()
    for marker in ckpts.glob("step_*/mmtrain.json"):
        marker.unlink()
    before = {p: p.stat().st_mtime_ns for p in ckpts.rglob("*") if p.is_file()}
    train(run, ["train.steps=4", "checkpoint.every=2"], world=1, expect=2)
    log = (tmp_path / "runs" / "r-logs" / "rank0.log").read_text()
    assert "holds step_00000002, step_00000004 but no complete checkpoint" in log
    assert {p: p.stat().st_mtime_ns for p in ckpts.rglob("*") if p.is_file()} == before       # untouched
    train(run, ["train.steps=4", "checkpoint.every=2", "run.resume=never"], world=1, expect=2)
    assert {p: p.stat().st_mtime_ns for p in ckpts.rglob("*") if p.is_file()} == before
