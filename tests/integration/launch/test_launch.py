"""Launch scripts: syntax, shellcheck, and the sbatch requeue flow against stand-ins for srun/scontrol."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import DEMO, REPO

SCRIPTS = sorted(
    str(p)
    for p in [
        *REPO.glob("launch/*.sh"),
        *REPO.glob("slurm/*.sbatch"),
        *REPO.glob("slurm/testing/*.sh"),
        REPO / ".ci/run",
    ]
)


def test_scripts_parse_and_pass_shellcheck():
    for s in SCRIPTS:
        subprocess.run(["bash", "-n", s], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    r = subprocess.run(["shellcheck", *SCRIPTS], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_train_sh_rejects_a_bad_config_before_launching(tmp_path):
    r = subprocess.run(
        ["bash", str(REPO / "launch/train.sh"), "--cpu", "2", str(DEMO), "train.stpes=3"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHON=sys.executable),
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert "unknown key 'train.stpes'; did you mean 'train.steps'" in r.stderr


@pytest.mark.heavy  # two real launches (launcher, 4 ranks): 55 s, `make test-all`
def test_two_launches_on_one_node_each_get_a_port_and_both_train(tmp_path):
    """launch/train.sh picks a free rendezvous port when MASTER_PORT is unset: two jobs on one node
    at once (it used 29512 for both: the second failed with "address already in use")."""
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    env["PYTHON"] = sys.executable
    procs = [
        subprocess.Popen(
            [
                "bash",
                str(REPO / "launch/train.sh"),
                "--cpu",
                "2",
                str(DEMO),
                f"run.out_dir={tmp_path}",
                f"run.name=job{i}",
                "train.steps=4",
                "log.progress=false",
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for i in (1, 2)
    ]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs), 1):
        assert p.returncode == 0, out[-3000:]
        assert "done: 4 steps" in (tmp_path / f"job{i}" / "train.log").read_text()
    ports = [out.split("--master_port=")[1].split()[0] for out in outs if "--master_port=" in out]
    assert len(set(ports)) == len(ports), ports


def fake_slurm_env(tmp_path, extra_env=None):
    """A job's environment under the stand-ins for srun/scontrol (tests/fake_slurm)."""
    env = dict(
        os.environ,
        PATH=f"{REPO / 'tests/fake_slurm'}:{os.environ['PATH']}",
        PYTHON=sys.executable,
        SLURM_JOB_ID="777",
        SLURM_JOB_NODELIST="node[01-02]",
        FAKE_NTASKS="2",
        FAKE_REQUEUED=str(tmp_path / "requeued"),
        OMP_NUM_THREADS="1",
    )
    return {k: v for k, v in {**env, **(extra_env or {})}.items() if v is not None}  # None: unset


SBATCH = ["bash", str(REPO / "slurm/train.sbatch")]


def run_sbatch(cmd, env):
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)


def sbatch_command(tmp_path, run_name, extra_env, overrides):
    env = fake_slurm_env(tmp_path, extra_env)
    over = [
        f"run.out_dir={tmp_path / 'runs'}",
        f"run.name={run_name}",
        "log.progress=false",
        *overrides,
    ]
    return [*SBATCH, str(DEMO), *over], env


def sbatch(tmp_path, run_name, extra_env, overrides):
    cmd, env = sbatch_command(tmp_path, run_name, extra_env, overrides)
    return run_sbatch(cmd, env)


@pytest.mark.heavy  # 25 s; the engine-level requeue stays in make test, the real one in test-slurm
def test_sbatch_requeues_after_signal_and_resumes(tmp_path):
    run = tmp_path / "runs" / "slurm"
    over = ["train.steps=100000", "log.every=1", "checkpoint.every=0"]
    r = sbatch(
        tmp_path,
        "slurm",
        {"FAKE_SIGNAL_AFTER": "step 2/", "FAKE_WATCH": str(run / "train.log")},
        over,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "requeued").read_text().split() == ["777"]
    assert "ranks exited with 85" in (run / "slurm.log").read_text()
    assert (run / "slurm-777-rank0.log").exists() and (run / "slurm-777-rank1.log").exists()
    step = int((run / "checkpoints" / "latest").read_text().split("_")[1])
    # the requeued job (Slurm counts the restart) resumes where the first one stopped
    r = sbatch(
        tmp_path,
        "slurm",
        {"SLURM_RESTART_COUNT": "1"},
        ["train.steps=100000", f"run.stop_after_steps={step + 1}"],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"at step {step}" in (run / "train.log").read_text()
    assert (tmp_path / "requeued").read_text().split() == ["777"]  # not requeued again


@pytest.mark.chaos
@pytest.mark.heavy
def test_sigterm_to_train_sh_checkpoints_and_stops_every_rank(tmp_path):
    """SIGTERM to the launcher used to end it at once while both ranks trained on to the end."""
    import signal
    import time

    from tests.helpers import free_port

    run = tmp_path / "runs" / "term"
    env = dict(os.environ, PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    p = subprocess.Popen(
        [
            "bash",
            str(REPO / "launch/train.sh"),
            "--cpu",
            "2",
            str(DEMO),
            f"run.out_dir={tmp_path / 'runs'}",
            "run.name=term",
            "train.steps=100000",
            "log.every=1",
            "checkpoint.every=0",
            "log.progress=false",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 180
    while time.time() < deadline and "step 3/" not in (
        (run / "train.log").read_text() if (run / "train.log").exists() else ""
    ):
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0].decode()
    assert p.returncode == 85, out[-3000:]  # the ranks' requeue code
    assert "stop signal received: checkpointing" in (run / "train.log").read_text()
    assert (run / "checkpoints" / "latest").is_file()
    left = subprocess.run(
        ["pgrep", "-f", "run.name=term"], capture_output=True, text=True
    ).stdout.split()
    assert not left, f"ranks still running: {left}"


@pytest.mark.chaos
@pytest.mark.heavy
def test_sbatch_leaves_a_cancelled_job_cancelled(tmp_path):
    """scancel: the ranks checkpoint and exit 85, but the job is CANCELLED: no requeue (it used to
    go back to PENDING)."""
    run = tmp_path / "runs" / "cancel"
    r = sbatch(
        tmp_path,
        "cancel",
        {
            "FAKE_SIGNAL_AFTER": "step 2/",
            "FAKE_WATCH": str(run / "train.log"),
            "FAKE_JOB_STATE": "CANCELLED",
        },
        ["train.steps=100000", "log.every=1"],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "requeued").exists()
    assert "checkpointed; not requeueing: JobState=CANCELLED" in (run / "slurm.log").read_text()
    assert (run / "checkpoints" / "latest").is_file()


@pytest.mark.chaos
@pytest.mark.heavy
def test_sbatch_passes_a_batch_shell_usr1_to_the_ranks(tmp_path):
    """--signal=B:USR1@N signals the batch shell alone, which had no trap and died."""
    import signal
    import time

    run = tmp_path / "runs" / "b"
    cmd, env = sbatch_command(tmp_path, "b", {}, ["train.steps=100000", "log.every=1"])
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline and "step 2/" not in (
        (run / "train.log").read_text() if (run / "train.log").exists() else ""
    ):
        time.sleep(0.3)
    p.send_signal(signal.SIGUSR1)
    out = p.communicate(timeout=120)[0].decode()
    assert p.returncode == 0, out[-3000:]
    assert (tmp_path / "requeued").read_text().split() == ["777"]
    assert "SIGUSR1 to the batch shell: passed to the ranks" in (run / "slurm.log").read_text()


@pytest.mark.chaos
@pytest.mark.heavy
def test_a_batch_shell_usr1_before_the_ranks_start_requeues_without_starting_them(tmp_path):
    """A --signal=B:USR1 while the batch shell still checks the config (seconds: the imports) used
    to kill the shell, bash's default for SIGUSR1, and the job failed instead of being requeued."""
    import signal
    import time

    run = tmp_path / "runs" / "b0"
    cmd, env = sbatch_command(tmp_path, "b0", {}, ["train.steps=100000"])
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(0.5)
    p.send_signal(signal.SIGUSR1)
    out = p.communicate(timeout=120)[0].decode()
    assert p.returncode == 0, out[-3000:]
    assert (tmp_path / "requeued").read_text().split() == ["777"]
    log = (run / "slurm.log").read_text()
    assert "SIGUSR1 before the ranks started: nothing to checkpoint" in log
    assert "requeueing job 777" in log
    assert not list(run.glob("slurm-777-rank*.log"))  # no rank was started


@pytest.mark.chaos
@pytest.mark.heavy
def test_a_signal_during_start_up_checkpoints_and_requeues(tmp_path):
    """A SIGUSR1 one second after the ranks start (still importing): it used to kill them (exit 138)."""
    run = tmp_path / "runs" / "early"
    r = sbatch(tmp_path, "early", {"FAKE_SIGNAL_DELAY": "1"}, ["train.steps=100000"])
    assert r.returncode == 0, (
        r.stdout + r.stderr + (run / "slurm-777-rank0.log").read_text()[-2000:]
    )
    assert "stop signal received: checkpointing at step 0" in (run / "train.log").read_text()
    assert (tmp_path / "requeued").read_text().split() == ["777"]


@pytest.mark.chaos
@pytest.mark.heavy
def test_sbatch_gives_ranks_one_thread_per_cpu_slurm_gave_them(tmp_path):
    r = sbatch(
        tmp_path,
        "omp",
        {
            "OMP_NUM_THREADS": None,
            "SLURM_CPUS_PER_TASK": "1",
            "FAKE_ENV_LOG": str(tmp_path / "env"),
        },
        ["train.steps=1"],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "env").read_text().split() == ["OMP_NUM_THREADS=1"]  # it was always 8


@pytest.mark.chaos
@pytest.mark.heavy
def test_a_signal_as_the_run_ends_does_not_fail_the_job(tmp_path):
    """A time limit's warning that lands while the ranks shut down after the last step (seen on a
    real cluster: exit 138, job FAILED): the run is complete, the job ends 0."""
    run = tmp_path / "runs" / "late"
    r = sbatch(
        tmp_path,
        "late",
        {
            "FAKE_SIGNAL_AFTER": "done:",
            "FAKE_WATCH": str(run / "train.log"),
            "FAKE_SIGNAL_REPEAT": "1",
        },
        ["train.steps=3"],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (
        "ranks exited with 0" in (run / "slurm.log").read_text()
        and not (tmp_path / "requeued").exists()
    )


@pytest.mark.heavy  # make test-all: keeps `make test` under 10 minutes
def test_sbatch_runs_a_pipeline_and_a_requeued_job_resumes_its_stage(tmp_path):
    """A pipeline under slurm/train.sbatch: the time-limit signal stops the running stage
    (checkpointed, exit 85, requeued); the requeued job skips nothing it has not finished and
    resumes that stage, then runs the rest."""
    root = tmp_path / "runs" / "chain"
    pipeline = tmp_path / "chain.yaml"
    pipeline.write_text(
        f"name: chain\nout_dir: {tmp_path / 'runs'}\n"
        "set: [train.steps=100000, log.every=1, checkpoint.every=0, eval.at_end=false]\n"
        f"stages:\n  first: {{train: {DEMO}}}\n  val: {{eval: first, split: val}}\n"
    )
    watch = {"FAKE_SIGNAL_AFTER": "step 2/", "FAKE_WATCH": str(root / "first" / "train.log")}
    r = run_sbatch([*SBATCH, str(pipeline)], fake_slurm_env(tmp_path, watch))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "requeued").read_text().split() == ["777"]
    assert "[1/2] first (train): stopped (exit 85)" in (root / "slurm-777-rank0.log").read_text()
    step = int((root / "first" / "checkpoints" / "latest").read_text().split("_")[1])
    again = [*SBATCH, str(pipeline), f"set=[train.steps={step + 2},log.every=1,eval.at_end=false]"]
    r = run_sbatch(again, fake_slurm_env(tmp_path, {"SLURM_RESTART_COUNT": "1"}))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (
        f"resumed from {root / 'first' / 'checkpoints'}"
        in (root / "first" / "train.log").read_text()
    )
    assert list(json.loads((root / "pipeline.json").read_text())["done"]) == ["first", "val"]
    assert (tmp_path / "requeued").read_text().split() == ["777"]  # not requeued again
