"""One live run per run directory.

Rank 0 holds a POSIX record lock (`fcntl.lockf`) on RUN/.lock for the run's life and writes its
owner there (host, pid, start time). The kernel drops the lock when the process ends, however it
ends, so a crashed or killed run never blocks its own requeue; a second launch into a live run
fails before any rank trains or writes, naming the directory and the owner. A record lock is not
inherited by forked children (data workers) and works across hosts on NFS (through its lock
manager) and on Lustre mounted with `flock`; on a filesystem without locks the run says so once
and goes on unguarded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("mmtrain")

LOCK_NAME = ".lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirBusy(RuntimeError):
    """Another live process owns the run directory."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock: None when this process owns the directory now, else who does."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return self.owner()
            if e.errno in _NO_LOCKS:
                log.warning(
                    "the filesystem of %s does not lock files (%s): nothing stops a second "
                    "launch into this run directory",
                    self.path.parent,
                    os.strerror(e.errno),
                )
                return None
            raise
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        self._fd = fd  # never closed before release(): closing any descriptor drops the lock
        return None

    def owner(self) -> str:
        """The owner as its lock file says (read without taking the lock)."""
        try:
            me = json.loads(self.path.read_text())
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(me["since"]))
            return f"pid {me['pid']} on host {me['host']}, running since {since}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not yet written its name"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
