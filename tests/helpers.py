"""Launch mmtrain ranks as separate processes, the way `srun` does (one task per rank)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from mmtrain.engine import signals

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo" / "toy_lm.yaml"
FORK = os.environ.get("MMTRAIN_TEST_FORK", "1") != "0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: str) -> Dict[str, str]:
    """This process's environment plus what a launcher gives rank `rank` of `world` on this host.
    With fewer GPUs than ranks (a one-GPU machine, or none) the ranks are CPU ranks: the GPUs are
    hidden from them, DeepSpeed uses its CPU accelerator, the process group gloo, and the kernels
    the Triton interpreter, consistently (never two ranks sharing cuda:0 under NCCL)."""
    cpu = torch.cuda.device_count() < world
    hide = dict(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", TRITON_INTERPRET="1") if cpu else {}
    return dict(
        os.environ,
        **hide,
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )


def start_ranks(
    config: Path,
    overrides: Sequence[str],
    logdir: Path,
    world: int = 2,
    command: str = "train",
    cwd: Path = REPO,
    fork: bool = FORK,
) -> List[subprocess.Popen]:
    """`mmtrain COMMAND CONFIG OVERRIDES` as `world` rank processes; logs in logdir/rank*.log.
    With `fork` (the default unless MMTRAIN_TEST_FORK=0) each rank is forked from a server that has
    already imported the heavy libraries (tests/support/forkserver.py), else started with Popen."""
    logdir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = rank_env(rank, world, port)
        log = logdir / f"rank{rank}.log"
        args = [command, str(config), *overrides]
        if fork:
            procs.append(_forkserver().start("mmtrain.cli", args, env, cwd, log))
            continue
        with open(log, "ab") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mmtrain.cli", *args],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                )
            )
    return procs


_FORKSERVER = None


def _forkserver():
    """This test process's fork server (tests/support/forkserver.py), started on first use."""
    global _FORKSERVER
    if _FORKSERVER is None:
        import atexit
        import tempfile

        from tests.support.forkserver import Client

        _FORKSERVER = Client(Path(tempfile.mkdtemp(prefix="mmtrain-forkserver-")))
        atexit.register(_FORKSERVER.close)
    return _FORKSERVER


def wait_all(procs: List[subprocess.Popen], timeout: float = 240) -> List[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            # what each rank was doing: its threads' stacks go to its log (engine/signals.py)
            for q in procs:
                if q.poll() is None:
                    q.send_signal(signals.STACKS)
            time.sleep(3)
            for q in procs:
                q.kill()
            raise
    return codes


def train(
    run_dir: Path,
    overrides: Sequence[str] = (),
    world: int = 2,
    config: Path = DEMO,
    expect: int = 0,
    timeout: float = 240,
) -> List[int]:
    """Train to completion; asserts every rank exits with `expect`, showing the logs if not."""
    over = [
        f"run.out_dir={run_dir.parent}",
        f"run.name={run_dir.name}",
        "log.progress=false",
        *overrides,
    ]
    logdir = run_dir.parent / f"{run_dir.name}-logs"
    try:
        codes = wait_all(start_ranks(config, over, logdir, world), timeout)
    except subprocess.TimeoutExpired:
        # a hang: wait_all had every rank print its threads' stacks into its log; show them
        logs = "\n".join(
            f"--- rank {r}:\n" + (logdir / f"rank{r}.log").read_text()[-6000:] for r in range(world)
        )
        raise AssertionError(f"the ranks did not finish in {timeout:.0f} s:\n{logs}") from None
    if any(c != expect for c in codes):
        logs = "\n".join((logdir / f"rank{r}.log").read_text()[-3000:] for r in range(world))
        raise AssertionError(f"exit codes {codes}, expected {expect}:\n{logs}")
    return codes


def scalars(run_dir: Path, tag: str) -> Dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def cli_ranks(*args: str, world: int = 2, stderr: bool = False, timeout: float = 300):
    """`mmtrain ARGS` on `world` ranks (a process each, as torchrun starts them; forked as in
    `start_ranks`); asserts success, returns the ranks' stdout (and stderr), rank by rank."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmtrain-cli-") as tmp:
        port, procs, outs, errs = str(free_port()), [], [], []
        for rank in range(world):
            env = rank_env(rank, world, port)
            outs.append(Path(tmp) / f"rank{rank}.out")
            errs.append(Path(tmp) / f"rank{rank}.err")
            if FORK:
                procs.append(
                    _forkserver().start("mmtrain.cli", list(args), env, REPO, errs[-1], outs[-1])
                )
            else:
                with open(outs[-1], "wb") as o, open(errs[-1], "wb") as e:
                    cmd = [sys.executable, "-m", "mmtrain.cli", *args]
                    procs.append(subprocess.Popen(cmd, env=env, stdout=o, stderr=e, cwd=REPO))
        codes = wait_all(procs, timeout)
        out = "".join(p.read_text() for p in outs)
        err = "".join(p.read_text() for p in errs)
    assert codes == [0] * world, f"exit codes {codes}:\n{err[-3000:]}"
    return (out, err) if stderr else out


def eval_ranks(run_dir: Path, *args: str, world: int = 2, stderr: bool = False):
    """`mmtrain eval RUN_DIR ARGS` on `world` ranks; returns the printed result (and stderr)."""
    import json

    out, err = cli_ranks("eval", str(run_dir), *args, world=world, stderr=True)
    result = json.loads(out.strip().splitlines()[-1])
    return (result, err) if stderr else result
