"""A rank that stops answering (SIGSTOP: a deadlock, a stuck filesystem, a dying host) is named
within dist.late_after_s, and once the first step is done the job ends within the steady-state
collective timeout (dist.step_timeout_s), not the start-up one (dist.timeout_s)."""

import signal
import time

import pytest

from mmtrain.engine.heartbeat import PEER_LOST_EXIT_CODE
from tests.helpers import DEMO, start_ranks


@pytest.mark.chaos
@pytest.mark.heavy
def test_a_stopped_rank_is_named_and_ends_the_job_within_the_step_timeout(tmp_path):
    run = tmp_path / "runs" / "hung"
    ranks = start_ranks(
        DEMO,
        [
            f"run.out_dir={run.parent}",
            "run.name=hung",
            "train.steps=100000",
            "log.every=1",
            "checkpoint.every=0",
            "log.progress=false",
            "dist.timeout_s=900",  # the start-up timeout: the job must not wait for it
            "dist.step_timeout_s=15",
            "dist.heartbeat_s=1",
            "dist.late_after_s=4",
        ],
        tmp_path / "logs",
    )
    deadline = time.time() + 180
    while "step 3/" not in (
        (run / "train.log").read_text() if run.joinpath("train.log").exists() else ""
    ):
        assert time.time() < deadline, "the run did not reach step 3"
        time.sleep(0.3)
    ranks[1].send_signal(signal.SIGSTOP)
    stopped = time.time()
    try:
        code = ranks[0].wait(timeout=240)
    finally:
        ranks[1].send_signal(signal.SIGCONT)
        ranks[1].kill()
    took = time.time() - stopped
    log = (run / "train.log").read_text()
    assert "collective timeout from the first step on: dist.step_timeout_s=15 s" in log
    assert "rank 1 (host " in log and "has not been heard from" in log, log[-3000:]
    assert "waits for it up to dist.step_timeout_s=15 s" in log
    assert code == PEER_LOST_EXIT_CODE, log[-3000:]
    assert took < 60, took  # 900 s with the start-up timeout
    print(f"rank 1 stopped: named in the log, the job ended after {took:.0f} s (exit {code})")
