"""Who is alive, and who is late: a heartbeat over the process group's rendezvous store.

Every rank posts its progress (a counter, the step it last finished, what it is doing) to the
store every `dist.heartbeat_s` seconds, from a thread of its own. Rank 0 reads every rank's post;
the other ranks read rank 0's. A rank whose post has not changed for `dist.late_after_s` (its
process is stopped, dead, or its host is gone), or that stays a step behind the others for that
long (its main thread is stuck), is named in the log with its host, before the collective it
holds up times out. When a collective does fail, `explain` turns the error into a line that
names the lost rank (from the address in the error, or from whose posts stopped) and the setting
to change. The thread talks to the store over a connection of its own, with a short timeout, so
a dead peer never blocks the training thread.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Dict, List, Optional

log = logging.getLogger("mmtrain")

PEER_LOST_EXIT_CODE = 86  # a rank or host of the job is gone: slurm/train.sbatch probes the nodes
PREFIX = "mmtrain/heartbeat/"


def interface_address(ifname: str) -> Optional[str]:
    """The IPv4 address of a network interface (what gloo binds with GLOO_SOCKET_IFNAME)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def own_address(environ=os.environ) -> str:
    """The address this rank's peers reach it at: its gloo/NCCL interface's, else the one it
    routes to the master from."""
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        name = environ.get(key, "").split(",")[0].lstrip("=^")
        if name and interface_address(name):
            return interface_address(name)  # type: ignore[return-value]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((environ.get("MASTER_ADDR", "127.0.0.1"), 9))
            return s.getsockname()[0]
    except OSError:
        return "?"


@dataclass
class Peer:
    rank: int
    host: str
    addr: str
    pid: int
    # what the watcher saw: the last post, and when (its own monotonic clock) it last changed
    seq: int = -1
    step: int = 0
    doing: str = "starting"
    changed: float = field(default_factory=time.monotonic)
    warned: float = 0.0

    def name(self) -> str:
        return f"rank {self.rank} (host {self.host}, {self.addr}, pid {self.pid})"


class Heartbeat:
    """`start()` (collective) learns every rank's host and address and starts the thread;
    `beat(step, doing)` records progress (cheap: the thread posts it); `stop()` ends it."""

    def __init__(self, rank: int, world: int, every_s: float, late_after_s: float, timeout_s: int):
        self.rank, self.world = rank, world
        self.every, self.late_after, self.timeout_s = every_s, late_after_s, timeout_s
        self.setting = "dist.timeout_s"  # the key that sets the collective timeout now
        self.step, self.doing, self.seq = 0, "starting", 0
        self.peers: Dict[int, Peer] = {}
        self.reached: Dict[int, float] = {
            0: time.monotonic()
        }  # step -> when a rank first got there
        self.store_lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._store = None

    # -- the training thread's side ---------------------------------------------------------
    def start(self, gather_objects) -> None:
        me = {"host": socket.gethostname(), "addr": own_address(), "pid": os.getpid()}
        self.peers = {
            r: Peer(r, p["host"], p["addr"], p["pid"]) for r, p in enumerate(gather_objects(me))
        }
        if self.world == 1 or self.every <= 0:
            return
        from torch.distributed import TCPStore

        self._store = TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=max(5.0, 3 * self.every)),
            wait_for_workers=False,
        )
        self._post()
        self._thread = threading.Thread(target=self._run, name="mmtrain-heartbeat", daemon=True)
        self._thread.start()

    def beat(self, step: int, doing: str = "training") -> None:
        self.step, self.doing = step, doing

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.every + 1)

    # -- the thread ------------------------------------------------------------------------
    def _post(self) -> None:
        self.seq += 1
        value = json.dumps({"seq": self.seq, "step": self.step, "doing": self.doing})
        self._store.set(f"{PREFIX}{self.rank}", value)

    def _run(self) -> None:
        watched = list(range(self.world)) if self.rank == 0 else [0]
        watched = [r for r in watched if r != self.rank]
        while not self._stop.wait(self.every):
            try:
                self._post()
                keys = [f"{PREFIX}{r}" for r in watched]
                posts = self._store.multi_get(keys) if keys else []
            except Exception as e:  # the store lives in rank 0's process (or the launcher's)
                if self.store_lost is None:
                    self.store_lost = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    log.error(
                        "heartbeat: lost the rendezvous store at %s:%s, which %s hosts (%s)",
                        os.environ.get("MASTER_ADDR"),
                        os.environ.get("MASTER_PORT"),
                        self.peers[0].name() if 0 in self.peers else "rank 0",
                        self.store_lost,
                    )
                continue
            now = time.monotonic()
            for r, raw in zip(watched, posts):
                self._saw(self.peers[r], json.loads(bytes(raw).decode()), now)
            self._warn_late(now)

    def _saw(self, p: Peer, post: dict, now: float) -> None:
        if post["seq"] != p.seq:
            p.seq, p.changed, p.doing = post["seq"], now, post["doing"]
        p.step = post["step"]

    def late(self, now: Optional[float] = None) -> List[str]:
        """Who is late now, one phrase each: unheard for late_after_s, or still at a step that
        another rank finished more than late_after_s ago."""
        now = time.monotonic() if now is None else now
        ahead = max([self.step] + [p.step for p in self.peers.values() if p.rank != self.rank])
        for s in range(max(self.reached) + 1, ahead + 1):
            self.reached[s] = now
        out = []
        for p in self.peers.values():
            if p.rank == self.rank or p.seq < 0:
                continue
            if now - p.changed > self.late_after:
                out.append(
                    f"{p.name()} has not been heard from for {now - p.changed:.0f} s (last: "
                    f"step {p.step}, {p.doing}): its process is stopped or dead, or its host is "
                    f"unreachable"
                )
            elif p.step < ahead and now - self.reached[p.step + 1] > self.late_after:
                out.append(
                    f"{p.name()} is still at step {p.step} ({p.doing}) "
                    f"{now - self.reached[p.step + 1]:.0f} s after another rank finished step "
                    f"{p.step + 1}: it is stuck"
                )
        return out

    def _warn_late(self, now: float) -> None:
        for phrase in self.late(now):
            rank = int(phrase.split()[1])
            p = self.peers[rank]
            if now - p.warned >= self.late_after:
                p.warned = now
                log.warning(
                    "%s; the job waits for it up to %s=%d s, then stops",
                    phrase,
                    self.setting,
                    self.timeout_s,
                )

    def timeout_now(self, seconds: int, setting: str) -> None:
        """The collective timeout changed (the first step done): name the right key from now on."""
        self.timeout_s, self.setting = seconds, setting

    # -- after a failed collective ---------------------------------------------------------
    def explain(self, error: BaseException) -> str:
        """One line: which rank(s) the failure points at, and what to change."""
        text = str(error)
        by_addr: Dict[str, List[Peer]] = {}
        for p in self.peers.values():
            by_addr.setdefault(p.addr, []).append(p)
        named = {
            p.rank: p
            for addr in re.findall(r"(\d+\.\d+\.\d+\.\d+)\]?:\d+", text)
            for p in by_addr.get(addr, [])
            if p.rank != self.rank
        }
        late = self.late()
        gist = text.strip().splitlines()[-1][:300] if text.strip() else type(error).__name__
        if "timed out" in text.lower() or "timeout" in text.lower():
            fix = (
                f"a collective waited {self.setting}={self.timeout_s} s; if that rank was only "
                f"slow (a long save or evaluation), raise {self.setting}"
            )
        else:
            fix = "the job stops; a Slurm job whose node failed is requeued"
        parts = [f"lost {', '.join(p.name() for p in named.values())}"] if named else []
        parts += late
        if self.store_lost:
            parts.append(f"the rendezvous store (rank 0's process) is gone ({self.store_lost})")
        who = (
            "; ".join(parts) if parts else "a peer rank (none named by the error or the heartbeat)"
        )
        return f"{who}: {gist}; {fix}"


def is_comm_error(error: BaseException) -> bool:
    """A failed collective or rendezvous (a peer gone or late), as opposed to a bug or bad input."""
    import torch.distributed as tdist

    if isinstance(error, getattr(tdist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text
        for s in (
            "gloo",
            "Gloo",
            "NCCL",
            "Connection closed by peer",
            "Connection reset by peer",
            "Timed out waiting",
            "Broken pipe",
        )
    )


class PeerLost(RuntimeError):
    """A rank or host of the job is gone or stuck; the message names it (Heartbeat.explain)."""
