"""engine.runlock: one live run per run directory, owned by a process, freed when it ends."""

import os
import socket
import subprocess
import sys

from mmtrain.engine.runlock import RunLock

TRY = (
    "import sys; from mmtrain.engine.runlock import RunLock; "
    "print(RunLock(sys.argv[1]).acquire() or 'acquired')"
)


def other_process_tries(run_dir) -> str:
    """What a second process gets (a record lock never conflicts within one process)."""
    out = subprocess.run(
        [sys.executable, "-c", TRY, str(run_dir)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_a_second_process_is_told_who_owns_the_directory_until_the_owner_lets_go(tmp_path):
    lock = RunLock(tmp_path / "run")
    assert lock.acquire() is None  # the directory is made for the lock file
    said = other_process_tries(tmp_path / "run")
    assert f"pid {os.getpid()} on host {socket.gethostname()}, running since 20" in said
    lock.release()
    assert other_process_tries(tmp_path / "run") == "acquired"  # and that process ended: free


def test_a_killed_owner_leaves_the_directory_free(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            TRY + "; import time; sys.stdout.flush(); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "acquired"
    assert "pid" in other_process_tries(tmp_path)
    holder.kill()
    holder.wait()
    assert other_process_tries(tmp_path) == "acquired"
