"""Atomicity of checkpoint saves, with a stand-in engine that can crash mid-save."""

from pathlib import Path

import pytest
import torch

from mmtrain.engine import checkpoint
from tests.support.checkpoints import FakeEngine, save


@pytest.mark.chaos
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


@pytest.mark.chaos
def test_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save(root, 10)

    class FullDisk(FakeEngine):
        def save_checkpoint(self, root, tag, save_latest):
            (Path(root) / tag).mkdir(parents=True, exist_ok=True)
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    with pytest.raises(
        checkpoint.CheckpointWriteError,
        match=r"writing checkpoint step_00000020 to .*step_00000020"
        r".partial failed \(RuntimeError: .*unexpected pos.*\). .* GiB free there; the previous "
        r"checkpoint \(.*step_00000010\) is intact",
    ):
        checkpoint.save(FullDisk(), root, 20, 0, {"step": 20}, {"world_size": 1}, 2)
    assert checkpoint.find_resume("auto", root) == (root, "step_00000010")
    usage = type("Usage", (), {"free": 10})  # 10 bytes left: known too small
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage)
    with pytest.raises(
        checkpoint.CheckpointWriteError,
        match=r"not enough disk space for checkpoint step_00000030 in "
        r".*: about 0.00 GiB needed \(the size of the last one\), 0.00 GiB free; the previous "
        r"checkpoint .* is intact; free space, or lower checkpoint.keep",
    ):
        save(root, 30)
    assert (
        not (root / "step_00000030.partial").exists()
        and (root / "latest").read_text() == "step_00000010"
    )


def test_keep_last_k_and_resave_same_step(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3, 4):
        save(root, s, keep=2)
    assert checkpoint.complete_tags(root) == ["step_00000003", "step_00000004"]
    save(root, 4, keep=2)  # the same step again (after a crash and resume)
    assert checkpoint.complete_tags(root) == ["step_00000003", "step_00000004"]


def test_resume_choices(tmp_path):
    root = tmp_path / "checkpoints"
    assert checkpoint.find_resume("auto", root) is None
    save(root, 5)
    (root / "step_00000009").mkdir()  # a directory without the completion marker
    assert checkpoint.find_resume("auto", root) == (root, "step_00000005")
    assert checkpoint.find_resume("never", root) is None
    assert checkpoint.find_resume(str(root / "step_00000005"), root) == (root, "step_00000005")
    with pytest.raises(FileNotFoundError, match="not a complete mmtrain checkpoint"):
        checkpoint.find_resume(str(root / "step_00000009"), root)
    (root / "latest").write_text("step_00000009")
    with pytest.raises(
        FileNotFoundError, match="names 'step_00000009', which is not a complete checkpoint"
    ):
        checkpoint.find_resume("auto", root)


@pytest.mark.chaos
def test_mmtrain_state_is_json_and_a_crafted_pickle_never_runs(tmp_path):
    """mmtrain's per-rank state used to be unpickled on resume: a crafted file ran a shell command."""
    import json
    import os

    from mmtrain.engine.checkpoint import CheckpointError, read_rank_state

    root = tmp_path / "checkpoints"
    save(root, 3)
    tag = root / "step_00000003"
    assert json.loads((tag / "mmtrain_rank00000.json").read_text()) == {"step": 3}
    (tag / "mmtrain_rank00000.json").unlink()

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    torch.save({"rng": Payload()}, tag / "mmtrain_rank00000.pt")  # an older mmtrain's file name
    with pytest.raises(CheckpointError, match=r"mmtrain_rank00000.pt cannot be read as data only"):
        read_rank_state(tag, 0)
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.find_resume("auto", root)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.chaos
@pytest.mark.parametrize(
    "pointer",
    [b"\xff\xfe\x00garbage", b"../../other/step_00000005", b"/etc/passwd"],
    ids=["garbage bytes", "a path outside the run", "an absolute path"],
)
def test_a_latest_that_is_not_a_tag_is_refused_naming_the_file_and_the_tags(tmp_path, pointer):
    """Garbage bytes used to end in a UnicodeDecodeError naming no file, and a path outside the
    run in "no latest"."""
    root = tmp_path / "checkpoints"
    save(root, 10)
    (root / "latest").write_bytes(pointer)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.find_resume("auto", root)
    said = str(e.value)
    assert f"{root / 'latest'} should name a checkpoint of this run" in said
    assert "one of ['step_00000010']" in said and repr(pointer)[:20] in said


@pytest.mark.chaos
def test_a_checkpoint_of_another_recipe_is_refused_naming_both(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 10)
    marker = root / "step_00000010" / "mmtrain.json"
    marker.write_text(marker.read_text().replace("}", ', "recipe": "kdsl"}', 1))
    checkpoint.check_recipe(root, "step_00000010", "kdsl")  # its own: fine
    with pytest.raises(checkpoint.CheckpointError, match="written by recipe kdsl, and this run's"):
        checkpoint.check_recipe(root, "step_00000010", "toy_lm")
