"""Atomicity of checkpoint saves, with a stand-in engine that can crash mid-save."""

import pytest


@pytest.mark.chaos
@pytest.mark.heavy
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
    assert {p: p.stat().st_mtime_ns for p in ckpts.rglob("*") if p.is_file()} == before  # untouched
    train(run, ["train.steps=4", "checkpoint.every=2", "run.resume=never"], world=1, expect=2)
    assert {p: p.stat().st_mtime_ns for p in ckpts.rglob("*") if p.is_file()} == before


def _cli(*args):
    import subprocess
    import sys

    from tests.helpers import REPO

    return subprocess.run(
        [sys.executable, "-m", "mmtrain.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


@pytest.mark.chaos
@pytest.mark.heavy
def test_damaged_checkpoints_are_named_verified_and_passed_over(tmp_path):
    from tests.helpers import train

    run = tmp_path / "runs" / "d"
    args = ["train.steps=4", "checkpoint.every=2", "checkpoint.keep=3"]
    train(run, args, world=1)
    ckpts = run / "checkpoints"
    assert _cli("ckpt", "verify", run).returncode == 0
    optim = next((ckpts / "step_00000004").glob("*optim_states.pt"))
    # a truncated optimizer shard
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    out = _cli("ckpt", "verify", run)
    assert out.returncode == 1 and "step_00000002: intact" in out.stdout
    assert f"step_00000004 (latest): DAMAGED: {optim}: damaged" in out.stdout
    train(run, ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=3"], world=1)  # resume=auto
    log = (run / "train.log").read_text()
    assert (
        f"checkpoint {ckpts / 'step_00000004'} is damaged, passed over for an earlier one: {optim}"
        in log
    )
    assert f"resumed from {ckpts / 'step_00000002'} at step 2" in log
    state = ckpts / "step_00000006" / "mmtrain_rank00000.json"
    state.write_text("{garbage")  # a damaged mmtrain state
    out = _cli("ckpt", "verify", run)
    assert out.returncode == 1 and f"{state} is damaged" in out.stdout
    (ckpts / "latest").write_text("step_00000099")  # a pointer to nothing
    train(run, ["train.steps=8"], world=1, expect=2)
    assert (
        "names 'step_00000099', which is not a complete checkpoint"
        in (tmp_path / "runs" / "d-logs" / "rank0.log").read_text()
    )
    # named, damaged: refused
    train(run, ["train.steps=8", "run.resume=step_00000006"], world=1, expect=2)
    train(run, ["train.steps=8", "run.resume=step_00000002"], world=1)  # the suggested form works
    assert f"resumed from {ckpts / 'step_00000002'} at step 2" in (run / "train.log").read_text()
