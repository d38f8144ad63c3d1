"""Two (or more) `mmtrain train` ranks on this machine, as the benchmarks launch them: rank
environment, one log file per rank beside the run directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

REPO = Path(__file__).resolve().parents[1]


def start_ranks(config: Path, overrides: Sequence[str], run: Path, world: int = 2, port: int = 0):
    """The ranks of `mmtrain train CONFIG OVERRIDES` (`run.out_dir`/`run.name` from `run`), their
    output in RUN.rankN.log."""
    run.parent.mkdir(parents=True, exist_ok=True)
    port = port or 29500 + os.getpid() % 1000
    args = [
        "train",
        str(config),
        *overrides,
        f"run.out_dir={run.parent}",
        f"run.name={run.name}",
        "log.progress=false",
    ]
    procs: List[subprocess.Popen] = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        log = open(run.parent / f"{run.name}.rank{rank}.log", "wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "mmtrain.cli", *args],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return procs
