"""The heartbeat's judgement without ranks: who is late, and which rank a failed collective names."""

from __future__ import annotations

import pytest

from mmtrain.engine.heartbeat import Heartbeat, Peer, is_comm_error


def watcher(world: int = 3) -> Heartbeat:
    hb = Heartbeat(rank=0, world=world, every_s=1, late_after_s=10, timeout_s=300)
    hb.peers = {
        r: Peer(r, f"node{r + 1}", f"10.0.0.{11 + r}", 100 + r, seq=1, changed=0.0)
        for r in range(world)
    }
    hb.reached = {0: 0.0}
    return hb


def test_a_rank_unheard_for_late_after_s_is_named_with_its_host():
    hb = watcher()
    hb.peers[1].changed = 95.0  # posted 5 s ago
    hb.peers[2].changed = 80.0  # 20 s ago
    late = hb.late(now=100.0)
    assert len(late) == 1 and late[0].startswith("rank 2 (host node3, 10.0.0.13, pid 102) has not")


def test_a_rank_a_step_behind_for_late_after_s_is_stuck():
    hb = watcher()
    for p in hb.peers.values():
        p.changed = 99.0  # every thread alive
    hb.peers[1].step, hb.peers[2].step, hb.step = 7, 8, 8
    assert hb.late(now=100.0) == []  # rank 1 only just fell behind (step 8 reached now)
    for p in hb.peers.values():
        p.changed = 110.0  # still posting, rank 1 still at step 7
    late = hb.late(now=111.0)
    assert len(late) == 1 and "rank 1 (host node2" in late[0] and "still at step 7" in late[0]
    hb.peers[1].step = 8
    assert hb.late(now=112.0) == []


def test_a_failed_collective_names_the_rank_at_the_address_in_the_error():
    hb = watcher()
    err = RuntimeError(
        "[../gloo/transport/tcp/pair.cc:537] Read error [10.0.0.13]:52936: Connection reset by peer"
    )
    said = hb.explain(err)
    assert said.startswith("lost rank 2 (host node3, 10.0.0.13, pid 102)")
    assert "Connection reset by peer" in said and "requeued" in said


def test_a_timeout_names_the_setting():
    hb = watcher()
    hb.peers[1].changed = -50.0
    said = hb.explain(RuntimeError("Timed out waiting 300000ms for recv operation to complete"))
    assert "rank 1 (host node2" in said and "raise dist.timeout_s" in said


@pytest.mark.parametrize(
    "error,comm",
    [
        (RuntimeError("[gloo/transport/tcp/pair.cc] Connection closed by peer [1.2.3.4]:5"), True),
        (RuntimeError("NCCL communicator was aborted"), True),
        (RuntimeError("CUDA out of memory"), False),
        (ValueError("bad config"), False),
    ],
)
def test_what_counts_as_a_lost_peer(error, comm):
    assert is_comm_error(error) is comm
