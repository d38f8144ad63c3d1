"""A run directory has one owner, and ranks do not outlive their launcher (issue 29, items 1-2)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import DEMO, REPO, free_port, start_ranks, wait_all


def wait_for(path, text: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s")


def ranks_alive(name: str) -> list:
    out = subprocess.run(["pgrep", "-f", f"run.name={name}( |$)"], capture_output=True, text=True)
    return out.stdout.split()


def gone_within(name: str, seconds: float) -> float:
    """Seconds until no rank of run `name` is left; fails after `seconds`."""
    t0 = time.time()
    while ranks_alive(name):
        assert time.time() - t0 < seconds, (
            f"ranks still alive after {seconds} s: {ranks_alive(name)}"
        )
        time.sleep(0.2)
    return time.time() - t0


@pytest.mark.chaos
@pytest.mark.heavy
def test_a_second_launch_into_a_live_run_fails_at_once_and_leaves_the_first_untouched(tmp_path):
    run = tmp_path / "runs" / "one"
    common = [f"run.out_dir={run.parent}", "run.name=one", "log.progress=false", "log.every=1"]
    first = start_ranks(
        DEMO, [*common, "train.steps=30", "checkpoint.every=10"], tmp_path / "first-logs"
    )
    wait_for(run / "train.log", "step 3/")
    t0 = time.time()
    # another config into the same directory: it would have saved over the first's checkpoints
    second = start_ranks(DEMO, [*common, "train.steps=7"], tmp_path / "second-logs")
    assert wait_all(second, timeout=120) == [2, 2]
    refused = time.time() - t0
    said = (tmp_path / "second-logs" / "rank0.log").read_text()
    assert f"error: {run} belongs to a run that is still going (pid " in said, said[-2000:]
    assert "choose another run.name" in said
    assert wait_all(first, timeout=300) == [0, 0]
    assert "train:\n  steps: 30" in (run / "config.yaml").read_text().replace("'", "")
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss/total")]
    assert steps == list(range(1, 31)), steps  # every step once: no second writer
    assert (run / "checkpoints" / "latest").read_text() == "step_00000030"
    assert "step 7/7" not in (run / "train.log").read_text()
    print(f"second launch refused after {refused:.1f} s")


def _launch(cmd, tmp_path, name):
    env = dict(os.environ, PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    args = [
        str(DEMO),
        f"run.out_dir={tmp_path / 'runs'}",
        f"run.name={name}",
        "train.steps=100000",
        "log.every=1",
        "checkpoint.every=0",
        "log.progress=false",
    ]
    p = subprocess.Popen(
        [*cmd, *args], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for(tmp_path / "runs" / name / "train.log", "step 3/")
    return p


@pytest.mark.chaos
@pytest.mark.heavy
def test_ranks_stop_when_train_sh_is_killed(tmp_path):
    """kill -9 of launch/train.sh (an OOM kill, a job manager): the ranks used to train on."""
    p = _launch(["bash", str(REPO / "launch/train.sh"), "--cpu", "2"], tmp_path, "k9sh")
    p.send_signal(signal.SIGKILL)
    took = gone_within("k9sh", 15)
    log = (tmp_path / "runs" / "k9sh" / "train.log").read_text()
    assert "stop signal received: checkpointing" in log
    print(f"train.sh killed: ranks gone after {took:.1f} s")


@pytest.mark.chaos
@pytest.mark.heavy
def test_ranks_stop_when_torchrun_is_killed(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    port = ["--master_port", str(free_port()), "-m", "mmtrain.cli", "train"]
    p = _launch([*torchrun, *port], tmp_path, "k9tr")
    p.send_signal(signal.SIGKILL)
    took = gone_within("k9tr", 15)
    assert "stop signal received" in (tmp_path / "runs" / "k9tr" / "train.log").read_text()
    print(f"torchrun killed: ranks gone after {took:.1f} s")


@pytest.mark.chaos
@pytest.mark.heavy
def test_sigterm_to_torchrun_checkpoints_the_ranks_but_torchrun_exits_1(tmp_path):
    """What docs/operations.md says of torchrun and SIGTERM: torchrun forwards it, the ranks finish the
    step, checkpoint and exit 85, and torchrun itself exits 1 (its agent's SignalException)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    port = ["--master_port", str(free_port()), "-m", "mmtrain.cli", "train"]
    p = _launch([*torchrun, *port], tmp_path, "termtr")
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 1
    run = tmp_path / "runs" / "termtr"
    assert "stop signal received: checkpointing" in (run / "train.log").read_text()
    assert (run / "checkpoints" / "latest").is_file()
    assert not ranks_alive("termtr")
