"""Stop signals. SIGTERM and SIGUSR1 (what Slurm sends before a time limit, on preemption, or what
launch/train.sh forwards) ask the run to finish its step, checkpoint and exit for requeue.

`install()` comes first in `mmtrain train`, before the slow imports and the model load, so a
signal during start-up is remembered (the run checkpoints as soon as it can) instead of killing
the rank. Once a rank has decided to exit, `StopFlag.ignore_further()` ignores both signals at the
OS level, which outlives Python's own handlers: a late SIGTERM during interpreter shutdown (srun's
--kill-on-bad-exit sends one when the first rank exits 85) can no longer turn the exit into 143.
SIGUSR2 prints every thread's stack to the rank's log (faulthandler) and the rank goes on.

A rank started by a launcher (torchrun, the deepspeed launcher, launch/train.sh) asks the kernel
for SIGTERM when the launcher dies (`die_with_parent`): a launcher killed with SIGKILL (an OOM
kill, a job manager) used to leave its ranks training; now they checkpoint at their next step and
exit, as for any stop signal.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    def __init__(self):
        self.signum: Optional[int] = None
        for s in SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def ignore_further(self) -> None:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


_current: Optional[StopFlag] = None


STACKS = signal.SIGUSR2  # `kill -USR2 PID`: every thread's Python stack to the rank's stderr


def install() -> StopFlag:
    """A fresh flag with its handlers installed (the start of a run), and SIGUSR2 set to print
    every thread's stack without stopping the rank: what a hung rank is doing, from outside. A rank
    of a launcher (LOCAL_RANK set) also dies with it."""
    global _current
    _current = StopFlag()
    faulthandler.register(STACKS, file=sys.stderr, all_threads=True, chain=False)
    if "LOCAL_RANK" in os.environ:  # not a run started by hand, which `nohup` keeps alive
        die_with_parent()
    return _current


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Have the kernel send `signum` to this process when its parent dies (Linux); True if set.
    A parent gone before the request (this process already adopted by init) sends it now."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:
        os.kill(os.getpid(), signum)
    return True


def current() -> StopFlag:
    """The flag of this run (installed now if `install` was not called)."""
    return _current or install()
