"""Rank processes forked from one interpreter that has already imported the heavy libraries.

Every multi-rank test starts fresh `python -m mmtrain.cli` processes, and on the 2-core CI
machine each spent 6-12 s importing torch, DeepSpeed and transformers before its first line of
mmtrain ran; a test suite starts several hundred of them. This server imports those libraries
once (never mmtrain or its kernels: what they read from the environment at import, such as
TRITON_INTERPRET when a kernel is defined, comes from each test's) and forks one child per rank,
which then runs `python -m MODULE ARGS` as a new process would: its own environment, working
directory, argv, log file and process id, and interpreter shutdown. The ranks stay separate
processes that meet only through torch.distributed, as under srun; the launchers themselves
(torchrun, the deepspeed launcher, sbatch) are still started for real by their own tests.

Protocol: one JSON line per connection on a Unix socket, answered with the child's pid; the server
writes each child's exit status (Popen's convention: -N for signal N) to the request's exit file
when it reaps it. `Forked` is the test side's Popen.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

PRELOAD = (
    "torch",
    "torch.distributed",
    "deepspeed",
    "deepspeed.runtime.engine",
    "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.zero.muon.muon_optimizer",  # imported by ZeRO's optimizer check: 2 s
    "transformers",
    "transformers.utils.type_validators",
    "transformers.models.llama.modeling_llama",
    "transformers.models.clip.modeling_clip",
    "transformers.models.bert.modeling_bert",
    "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "peft",
    "omegaconf",
    "webdataset",
    "torch.utils.tensorboard",
)


class Forked:
    """A rank forked by the server: the part of `subprocess.Popen` the tests use."""

    def __init__(self, pid: int, exit_file: Path, args: List[str]):
        self.pid, self.args, self._exit_file = pid, args, exit_file
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None and self._exit_file.exists():
            self.returncode = int(self._exit_file.read_text())
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Client:
    """Starts the server on first use (one per test process) and asks it for ranks."""

    def __init__(self, directory: Path):
        self.path = directory / "forkserver.sock"
        self.server: Optional[subprocess.Popen] = None
        self.started = 0

    def _start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.server = subprocess.Popen(
            [sys.executable, "-m", "tests.support.forkserver", str(self.path), str(os.getpid())],
            env=env,
            cwd=Path(__file__).resolve().parents[2],
        )
        deadline = time.monotonic() + 300
        while not self.path.exists():
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fork server did not start (exit {self.server.poll()})")
            time.sleep(0.1)

    def start(
        self,
        module: str,
        args: List[str],
        env: Dict[str, str],
        cwd: Path,
        log: Path,
        stdout: Optional[Path] = None,
    ) -> Forked:
        """`python -m MODULE ARGS` forked; stderr (and stdout unless given apart) appended to log."""
        if self.server is None or self.server.poll() is not None:
            self._start()
        self.started += 1
        exit_file = self.path.parent / f"{self.started}.exit"
        request = dict(module=module, args=args, env=env, cwd=str(cwd), log=str(log))
        request["stdout"] = str(stdout or log)
        request["exit_file"] = str(exit_file)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.path))
            s.sendall(json.dumps(request).encode() + b"\n")
            pid = int(s.makefile().readline())
        return Forked(pid, exit_file, [module, *args])

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(timeout=30)


def _child(request: dict) -> None:
    """In the forked child: become `python -m MODULE ARGS` and never return."""
    code = 1
    try:
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for target, path in ((1, request["stdout"]), (2, request["log"])):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, target)
            os.close(fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # line-buffered, as PYTHONUNBUFFERED
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [request["module"], *request["args"]]
        sys.path[0] = request["cwd"]
        import runpy

        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        # what interpreter shutdown does: exit handlers (torch.distributed, TensorBoard writers)
        # and flushed logs
        import atexit
        import logging

        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve(path: Path, parent: int) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path) + ".tmp")
    os.rename(str(path) + ".tmp", path)  # clients wait for the name: bound means ready
    listener.listen(16)
    exits: Dict[int, str] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while os.getppid() == parent:
        ready, _, _ = select.select([listener], [], [], 0.1)
        if ready:
            conn, _ = listener.accept()
            with conn:
                request = json.loads(conn.makefile().readline())
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    conn.close()
                    _child(request)
                exits[pid] = request["exit_file"]
                conn.sendall(f"{pid}\n".encode())
        while exits:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(status)
            tmp = exits[pid] + ".tmp"
            Path(tmp).write_text(str(code))
            os.rename(tmp, exits.pop(pid))


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
