"""SIGUSR2 makes a running rank print every thread's stack and go on (engine/signals.py)."""

import signal
import subprocess
import sys
import time

from tests.helpers import REPO

RANK = """
import sys, threading, time
from mmtrain.engine import signals
signals.install()
def waiting_in_a_collective():
    time.sleep(30)
threading.Thread(target=waiting_in_a_collective, daemon=True).start()
print("ready", flush=True)
time.sleep(4)
print("still running", flush=True)
"""


def test_usr2_prints_every_threads_stack_and_the_rank_goes_on():
    p = subprocess.Popen(
        [sys.executable, "-c", RANK], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    p.send_signal(signal.SIGUSR2)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "still running" in out
    assert "waiting_in_a_collective" in err and "Current thread" in err
