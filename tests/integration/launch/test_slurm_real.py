"""slurm/train.sbatch on a real one-node Slurm cluster (`make test-slurm` brings one up with
slurm/testing/cluster.sh): the toy LM on 2 CPU ranks through real sbatch/srun/scontrol/scancel.
Skipped unless SLURM_CONF names a running cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import DEMO, REPO, scalars, train
from tests.support import slurm
from tests.support.slurm import end, job, log_has, sbatch, start_now_when_requeued, wait_for

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        not os.environ.get("SLURM_CONF") or shutil.which("sbatch") is None,
        reason="no Slurm cluster (make test-slurm starts one)",
    ),
]


CPU = ["--nodes=1", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]


def submit(tmp_path, name, sbatch_args=(), overrides=()):
    """The toy LM on 2 CPU ranks of the one node (the environment as it is: OMP_NUM_THREADS=1
    exported, as in many HPC shells, must not matter)."""
    return sbatch(tmp_path, name, DEMO, CPU, sbatch_args, overrides)


def story(tmp_path, jid, run):
    return slurm.story(tmp_path, jid, run)


def test_a_run_trains_to_completion(tmp_path):
    jid = submit(tmp_path, "done", overrides=["train.steps=10"])
    state = wait_for(slurm.finished(jid), jid=jid)
    assert (
        state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0" and state["Restarts"] == "0"
    )
    assert "done: 10 steps" in (tmp_path / "runs" / "done" / "train.log").read_text()


def test_the_time_limit_signal_requeues_and_the_run_resumes_to_the_same_losses(tmp_path):
    # a 2-minute limit signalled 75 s ahead: the ranks train ~30 s (after ~15 s of start-up) before
    # each signal, which cuts 600 steps into several runs and leaves a minute for the checkpoint.
    # (With the signal less than a start-up before the limit, every run would checkpoint at its
    # first step and requeue again: Slurm here checks time limits within seconds.) Each step waits
    # 0.1 s, so that the 600 steps take a minute at least: on a fast machine they had ended in 40 s,
    # before the first signal.
    steps = 600
    args = [f"train.steps={steps}", "checkpoint.every=0", "log.every=1", "recipe.step_delay_s=0.1"]
    jid = submit(tmp_path, "limit", ["--time=2", "--signal=USR1@75"], args)
    try:
        state = wait_for(
            lambda: slurm.finished(jid)() or slurm.nudge(jid, time_limit="10"),
            timeout=900,
            jid=jid,
            story=story(tmp_path, jid, tmp_path / "runs" / "limit"),
        )
    finally:
        end(jid)
    restarts = int(state["Restarts"])
    run = tmp_path / "runs" / "limit"
    assert state["JobState"] == "COMPLETED" and restarts >= 1, (
        state,
        (run / "slurm.log").read_text(),
    )
    assert "stop signal received" in (run / "train.log").read_text()
    straight = tmp_path / "runs" / "straight"
    train(straight, args, world=2)
    chained, once = scalars(run, "loss/total"), scalars(straight, "loss/total")
    assert sorted(chained) == sorted(once) == list(range(1, steps + 1))
    assert [chained[s] for s in range(1, steps + 1)] == [once[s] for s in range(1, steps + 1)]


def test_scancel_leaves_the_job_cancelled(tmp_path):
    jid = submit(tmp_path, "cancel", overrides=["train.steps=100000"])
    run = tmp_path / "runs" / "cancel"
    wait_for(log_has(run, "step 3/"), jid=jid)
    subprocess.run(["scancel", jid], check=True)
    wait_for(lambda: job(jid).get("JobState") == "CANCELLED", 90)
    time.sleep(5)
    state = job(jid)
    assert state["JobState"] == "CANCELLED" and state["Restarts"] == "0"  # not back to PENDING
    assert "not requeueing: JobState=" in (run / "slurm.log").read_text()
    assert (run / "checkpoints" / "latest").is_file()


def test_an_outside_requeue_resumes_once(tmp_path):
    jid = submit(tmp_path, "outside", overrides=["train.steps=100000"])
    run = tmp_path / "runs" / "outside"
    wait_for(log_has(run, "step 3/"), jid=jid)
    subprocess.run(["scontrol", "requeue", jid], check=True)
    wait_for(start_now_when_requeued(jid, 1))
    wait_for(log_has(run, "resumed from"))
    assert job(jid)["Restarts"] == "1"
    end(jid)


def test_a_batch_shell_signal_reaches_the_ranks(tmp_path):
    # slurmctld signals at its first time-limit check (every 30 s) with at most N + 30 s left:
    # here 30-60 s into the job, once the ranks train, leaving them a minute to checkpoint. (The
    # old --time=1 @45 signalled 0-30 s in, while the batch shell still checked the config.)
    jid = submit(tmp_path, "bshell", ["--time=2", "--signal=B:USR1@60"], ["train.steps=100000"])
    run = tmp_path / "runs" / "bshell"
    wait_for(start_now_when_requeued(jid, 1), timeout=200, story=story(tmp_path, jid, run))
    log = (run / "slurm.log").read_text()
    assert "SIGUSR1 to the batch shell: passed to the ranks" in log and "requeueing job" in log
    assert "stop signal received: checkpointing" in (run / "train.log").read_text()
    end(jid)


def test_a_batch_shell_signal_before_the_ranks_start_requeues(tmp_path):
    """A batch-shell SIGUSR1 while the script still checks the config: it used to end the shell
    (bash's default for SIGUSR1) and the job failed; CI met it as a --signal=B:USR1 come early."""
    jid = submit(tmp_path, "bearly", overrides=["train.steps=100000"])
    run = tmp_path / "runs" / "bearly"
    checking = " -m mmtrain.cli config --get run_dir .*run.name=bearly"
    wait_for(lambda: subprocess.run(["pgrep", "-f", checking], capture_output=True).returncode == 0, jid=jid,
             every=0.1, story=story(tmp_path, jid, run))  # fmt: skip
    subprocess.run(["scancel", "--batch", "--signal=USR1", jid], check=True)
    wait_for(start_now_when_requeued(jid, 1), timeout=120, story=story(tmp_path, jid, run))
    log = (run / "slurm.log").read_text()
    assert "SIGUSR1 before the ranks started: nothing to checkpoint; requeueing job" in log, log
    end(jid)


def test_a_killed_rank_fails_the_job_without_requeue(tmp_path):
    jid = submit(tmp_path, "killed", overrides=["train.steps=100000"])
    run = tmp_path / "runs" / "killed"
    wait_for(log_has(run, "step 3/"), jid=jid)
    ranks = subprocess.run(
        ["pgrep", "-f", " -m mmtrain.cli train .*run.name=killed"], capture_output=True, text=True
    ).stdout.split()
    os.kill(int(ranks[-1]), signal.SIGKILL)
    state = wait_for(
        lambda: (
            job(jid).get("JobState") in ("FAILED", "COMPLETED", "CANCELLED", "PENDING") and job(jid)
        ),
        90,
    )
    assert state["JobState"] == "FAILED" and state["Restarts"] == "0", state


def rank_catches_usr1(pattern: str) -> bool:
    """A process whose command line matches `pattern` has a handler for SIGUSR1."""
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    for pid in found.split():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        caught = int(
            next(line for line in status.splitlines() if line.startswith("SigCgt:"))[7:], 16
        )
        if caught & (1 << (signal.SIGUSR1 - 1)):
            return True
    return False


def test_a_signal_while_the_ranks_start_up_checkpoints_and_requeues(tmp_path):
    jid = submit(tmp_path, "early", overrides=["train.steps=100000"])
    # a rank, not srun (whose command line holds the same words): before srun has started its
    # tasks, scancel's signal reaches no process and is lost; and a rank that catches USR1 has
    # passed `signals.install()`, the first thing `mmtrain train` does (until then the signal's
    # default action would end it). The import of torch, DeepSpeed and the model follows.
    rank = f"^{sys.executable} -m mmtrain.cli train .*run.name=early"
    wait_for(lambda: rank_catches_usr1(rank), every=0.1, jid=jid)
    subprocess.run(["scancel", "--signal=USR1", jid], check=True)  # still importing
    wait_for(start_now_when_requeued(jid, 1), timeout=120)
    assert (
        "stop signal received: checkpointing at step 0"
        in (tmp_path / "runs" / "early" / "train.log").read_text()
    )
    end(jid)


def test_a_pipeline_runs_every_stage_in_one_allocation(tmp_path):
    pipeline = tmp_path / "chain.yaml"
    pipeline.write_text(
        f"name: chain\nout_dir: {tmp_path / 'runs'}\n"
        "set: [train.steps=6, log.progress=false, eval.at_end=false]\n"
        f"stages:\n  first: {{train: {DEMO}, export: true}}\n"
        "  second: {train: "
        + str(DEMO)
        + ', set: ["recipe.model_path=${stages.first.export}/lm"]}\n'
        "  val: {eval: second, split: val, show: [accuracy]}\n"
    )
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run(
        ["sbatch", "--parsable", *CPU, f"--output={tmp_path}/slurm-%j.out", f"--chdir={REPO}",
         "--job-name=chain", str(REPO / "slurm/train.sbatch"), str(pipeline)],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    jid = out.stdout.strip().split(";")[0]
    state = wait_for(slurm.finished(jid), jid=jid)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", state
    root = tmp_path / "runs" / "chain"
    done = json.loads((root / "pipeline.json").read_text())["done"]
    assert list(done) == ["first", "second", "val"]
    assert "[3/3] val (eval):" in (root / f"slurm-{jid}-rank0.log").read_text()
