"""Driving a real Slurm cluster from the tests (slurm/testing/cluster.sh brings one up): submit
slurm/train.sbatch, read a job's state, wait with a deadline that turns a hang into a failure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from tests.helpers import REPO

# Why a job can be PENDING that no amount of waiting clears (the request does not fit the
# partition or the nodes as configured): a test waiting on such a job fails at once, with the
# reason, instead of at its timeout. (A cluster sized with `nproc` under OMP_NUM_THREADS=1 had
# CPUs=1, and every 2-task job waited with PartitionConfig until the timeouts, 13 minutes.)
NEVER_CLEARS = {
    "PartitionConfig",
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "BadConstraints",
    "InvalidAccount",
    "InvalidQOS",
    "ReqNodeNotAvail",  # a node the job asked for by name is down: not in these tests' clusters
}


class PendingForever(AssertionError):
    """A job pending for a reason that cannot clear."""


def job(jid: str) -> dict:
    """JobState, Reason, Restarts, ExitCode, NodeList, NumNodes of a job (Slurm keeps finished jobs
    for MinJobAge)."""
    text = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True).stdout
    return dict(re.findall(r"\b(JobState|Reason|Restarts|ExitCode|NodeList|NumNodes)=(\S+)", text))


def check_pending(jid: str) -> None:
    j = job(jid)
    if j.get("JobState") == "PENDING" and j.get("Reason", "").split(",")[0] in NEVER_CLEARS:
        raise PendingForever(
            f"job {jid} is PENDING with Reason={j['Reason']}, which never clears: the request does "
            f"not fit the cluster ({j}); `scontrol show job {jid}` and slurm.conf say why"
        )


def wait_for(
    what: Callable,
    timeout: float = 240,
    every: float = 0.5,
    story: Optional[Callable[[], str]] = None,
    jid: Optional[str] = None,
):
    """Poll `what()` until it is true; on a timeout, `story()` (the job's state and logs) says why.
    With `jid`, a job pending for a reason that cannot clear fails the wait at once."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = what()
        if got:
            return got
        if jid:
            check_pending(jid)
        time.sleep(every)
    raise AssertionError(
        f"timed out waiting for {what.__doc__ or what}" + (f"\n{story()}" if story else "")
    )


def finished(jid: str) -> Callable:
    def done():
        """the job to end"""
        j = job(jid)
        return (
            j.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT") and j
        )

    return done


def start_now_when_requeued(jid: str, restarts: int) -> Callable:
    """A requeued job waits before it may start again; the tests cut that to 5 s (sooner, the old
    incarnation's credential may still be revoked: "Killing non-startable batch job")."""

    def requeued():
        """the job to be requeued"""
        j = job(jid)
        if int(j.get("Restarts", 0)) < restarts:
            return None
        if j.get("JobState") == "PENDING":
            time.sleep(5)
            subprocess.run(
                ["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True
            )
        return j  # requeued, and maybe already running again (Slurm here restarts within ~11 s)

    return requeued


def nudge(jid: str, time_limit: str = "") -> bool:
    """A requeued job that waits to start again is told to start now (after 5 s: sooner, the old
    incarnation's credential may still be revoked), and with `time_limit` given a new time limit:
    this cluster signals a requeued incarnation of a `--time=2` job again within its first
    seconds (measured: every restart checkpointed at its first step, 30 s apart), so the tests
    let the requeued run finish. Always False: for `wait_for(finished or nudge)`."""
    j = job(jid)
    restarted = int(j.get("Restarts", 0)) >= 1
    if restarted and time_limit and jid not in _EXTENDED:  # running or pending: either takes it
        subprocess.run(["scontrol", "update", f"JobId={jid}", f"TimeLimit={time_limit}"],
                       capture_output=True)  # fmt: skip
        _EXTENDED.add(jid)
    if j.get("JobState") == "PENDING" and restarted:
        time.sleep(5)
        subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True)
    return False


_EXTENDED: set = set()


def end(jid: str) -> None:
    subprocess.run(["scancel", jid], capture_output=True)
    wait_for(lambda: job(jid).get("JobState") in ("CANCELLED", "COMPLETED", "FAILED"), 60)


def story(out_dir: Path, jid: str, run: Path) -> Callable[[], str]:
    """What a failed wait shows: the job's state and the ends of its logs."""

    def tell():
        logs = [
            out_dir / f"slurm-{jid}.out",
            run / "slurm.log",
            *sorted(run.glob("slurm-*-rank*.log")),
        ]
        tails = [f"--- {p.name}:\n{p.read_text()[-1500:]}" for p in logs if p.exists()]
        return "\n".join([f"job {jid}: {job(jid)}", *tails])

    return tell


def log_has(run: Path, text: str) -> Callable:
    path = run / "train.log"

    def has():
        """train.log to say the text"""
        return path.exists() and text in path.read_text()

    return has


def sbatch(
    out_dir: Path,
    name: str,
    config: Path,
    resources: Sequence[str],
    sbatch_args: Sequence[str] = (),
    overrides: Sequence[str] = (),
    env: Optional[dict] = None,
    chdir: Path = REPO,
) -> str:
    """Submit slurm/train.sbatch CONFIG with run.out_dir=out_dir/runs, run.name=name (a pipeline:
    out_dir=out_dir/runs, name=name); the job id."""
    env = dict(os.environ if env is None else env, PYTHON=sys.executable)
    pipeline = "stages:" in Path(config).read_text()
    where = ["out_dir=", "name="] if pipeline else ["run.out_dir=", "run.name="]
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            *resources,
            f"--output={out_dir}/slurm-%j.out",
            f"--chdir={chdir}",
            f"--job-name={name}",
            *sbatch_args,
            str(REPO / "slurm/train.sbatch"),
            str(config),
            f"{where[0]}{out_dir / 'runs'}",
            f"{where[1]}{name}",
            "log.progress=false",
            "log.every=1",
            *overrides,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return out.stdout.strip().split(";")[0]
