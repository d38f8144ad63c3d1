"""The Slurm test harness fails at once on a job that can never start, naming why."""

import time

import pytest

from tests.support import slurm


def test_a_job_pending_for_a_reason_that_never_clears_fails_the_wait_at_once(monkeypatch):
    monkeypatch.setattr(
        slurm, "job", lambda jid: {"JobState": "PENDING", "Reason": "PartitionConfig"}
    )
    t0 = time.time()
    with pytest.raises(slurm.PendingForever, match="Reason=PartitionConfig, which never clears"):
        slurm.wait_for(lambda: False, timeout=60, jid="7")
    assert time.time() - t0 < 5


def test_a_job_waiting_for_resources_is_waited_for(monkeypatch):
    states = iter(
        [{"JobState": "PENDING", "Reason": "Resources"}] * 3 + [{"JobState": "COMPLETED"}] * 5
    )
    monkeypatch.setattr(slurm, "job", lambda jid: next(states))
    assert (
        slurm.wait_for(slurm.finished("7"), timeout=10, every=0.01, jid="7")["JobState"]
        == "COMPLETED"
    )
