"""Two hosts for real: a two-node Slurm cluster on this machine (`make test-multinode` brings it up
with `slurm/testing/cluster.sh up --nodes 2`: each node a network namespace with its own address,
slurmd and sshd). Runs across the two nodes must train as one node does at the same global batch,
through sbatch, torchrun's c10d rendezvous and the deepspeed launcher; a time-limit signal
requeues and resumes on two nodes; losing a node mid-step ends the survivors within a bound with a
message naming the lost rank and host, and the requeued job resumes on the node left.
Skipped unless MMTRAIN_TEST_NODES names such a cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import DEMO, REPO, free_port, scalars
from tests.support import slurm
from tests.support.slurm import job, log_has, start_now_when_requeued, wait_for
from tests.world_size import Case, Trained, assert_invariant, collect, layout_args, run_layout

pytestmark = [
    pytest.mark.multinode,
    pytest.mark.skipif(
        not os.environ.get("MMTRAIN_TEST_NODES"),
        reason="no two-node cluster (make test-multinode starts one)",
    ),
]

NODES = dict(p.split("=") for p in os.environ.get("MMTRAIN_TEST_NODES", "").split())
CLUSTER = Path(os.environ.get("MMTRAIN_TEST_CLUSTER", "/tmp/mmtrain-slurm2"))
CPU = ["--gpus-per-node=0", "--cpus-per-task=1"]
NET = ["dist.socket_ifname=eth0"]  # the nodes' names do not resolve: gloo is told its interface
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-4  # as the world-size harness (tests/integration/engine)

TOY = Case(DEMO, ["recipe.dropout=0.0", *NET], global_batch=16, steps=6, losses=("lm",))


def in_node(node: str, argv, **kw) -> subprocess.Popen:
    """A process inside a node's network namespace (what the node's own shell would start)."""
    netns = f"/run/netns/mmt-{node}"
    return subprocess.Popen(["nsenter", f"--net={netns}", *argv], **kw)


def sbatch(tmp_path, name, config, resources, overrides=(), env=None, sbatch_args=(), chdir=REPO):
    return slurm.sbatch(
        tmp_path, name, config, [*CPU, *resources], sbatch_args, overrides, env, chdir
    )


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The toy LM on this host's 2 ranks: what every multi-node layout must reproduce."""
    return run_layout(TOY, tmp_path_factory.mktemp("one") / "runs" / "w2", 2)


def assert_like_one_node(one_node: Trained, runs: dict, tmp_path) -> None:
    """Every run in `runs` trained the toy LM as one node's 2 ranks did: each loss at each step,
    and the parameters, within the world-size harness's tolerances."""
    steps = range(1, TOY.steps + 1)
    assert_invariant(one_node, runs, steps, LOSS_RTOL, PARAM_ATOL, tmp_path / "report.json")


def sbatch_layout(tmp_path, name, nodes: int, per_node: int, env=None) -> Trained:
    world = nodes * per_node
    jid = sbatch(
        tmp_path,
        name,
        DEMO,
        [f"--nodes={nodes}", f"--ntasks-per-node={per_node}"],
        [*TOY.overrides, *layout_args(TOY, world)],
        env,
    )
    run = tmp_path / "runs" / name
    state = wait_for(slurm.finished(jid), 400, jid=jid, story=slurm.story(tmp_path, jid, run))
    assert state["JobState"] == "COMPLETED" and state["NodeList"] == "node[1-2]", state
    return collect(TOY, run)


AUDIT = """
import os, sys
log = os.path.join(os.environ["MMTRAIN_AUDIT_DIR"], f"writes-{os.getpid()}.txt")
rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "-"
busy = [False]
def hook(event, args):
    if busy[0] or event not in ("open", "os.rename", "os.replace"):
        return
    path, write = None, False
    if event == "open":
        path, mode, flags = args
        write = bool(mode and any(c in str(mode) for c in "wax+")) or bool(flags and flags & 0o3)
    else:
        path, write = args[1], True
    if write and isinstance(path, (str, bytes, os.PathLike)):
        busy[0] = True
        try:
            with open(log, "a") as f:
                f.write(f"{os.environ.get('RANK', rank)}\\t{os.path.abspath(os.fsdecode(path))}\\n")
        finally:
            busy[0] = False
sys.addaudithook(hook)
"""


def writers(audit: Path, root: Path):
    """path -> the ranks that wrote it, for every file under `root` (from the audit hook's logs)."""
    by_path: dict = {}
    for f in audit.glob("writes-*.txt"):
        for line in f.read_text().splitlines():
            rank, path = line.split("\t", 1)
            if path.startswith(str(root)) and rank != "-":
                by_path.setdefault(path, set()).add(rank)
    return by_path


def test_two_nodes_train_as_one_node_does_and_no_file_has_two_writers(one_node, tmp_path):
    audit = tmp_path / "audit"
    (audit / "site").mkdir(parents=True)
    (audit / "site" / "sitecustomize.py").write_text(AUDIT)
    env = dict(os.environ, MMTRAIN_AUDIT_DIR=str(audit), PYTHONPATH=str(audit / "site"))
    t0 = time.time()
    two = sbatch_layout(tmp_path, "n2x1", 2, 1, env)
    print(f"2 nodes x 1 rank: {time.time() - t0:.0f} s")
    four = sbatch_layout(tmp_path, "n2x2", 2, 2)
    assert_like_one_node(one_node, {"2 nodes x 1 rank": two, "2 nodes x 2 ranks": four}, tmp_path)
    log = (two.run / "train.log").read_text()
    assert "world size 2" in log and "global batch 16 = micro-batch 8 x grad_accum 1 x 2" in log
    written = writers(audit, two.run)
    assert any(p.endswith("train.log") for p in written) and len(written) > 10, sorted(written)
    shared = {p: r for p, r in written.items() if len(r) > 1}
    assert not shared, f"files written by more than one rank: {shared}"
    triton = [p for p in writers(audit, Path.home()) if "triton" in p]
    assert not triton, f"Triton's cache in the shared home directory: {triton[:3]}"


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory, tiny_models, image_text_shards):
    """A directory laid out as `make demo` leaves the repository (data/tiny, data/synth/...), for
    the demo pipelines' relative paths."""
    from mmtrain.data.synth import synth

    root = tmp_path_factory.mktemp("demo")
    (root / "data" / "synth").mkdir(parents=True)
    (root / "data" / "tiny").symlink_to(tiny_models)
    (root / "data" / "synth" / "image-text").symlink_to(image_text_shards)
    synth("dialogue", str(root / "data" / "synth" / "dialogue"), 400, seed=0)
    return root


VIKDF = REPO / "configs" / "demo" / "pipelines" / "vikdf.yaml"
SHORT = ["stages.stage1.set=[train.steps=6]", "train.steps=4", "log.every=1", *NET]


def test_the_vikdf_demo_pipeline_on_two_nodes_trains_as_on_one(demo_data, tmp_path):
    from tests.helpers import start_ranks, wait_all

    here = tmp_path / "here"
    procs = start_ranks(VIKDF, [f"out_dir={here}", "name=vikdf", *SHORT], tmp_path / "logs", 2,
                        command="pipeline", cwd=demo_data)  # fmt: skip
    assert wait_all(procs, 600) == [0, 0], (tmp_path / "logs" / "rank0.log").read_text()[-3000:]
    jid = sbatch(tmp_path, "vikdf", VIKDF, ["--nodes=2", "--ntasks-per-node=1"], SHORT,
                 chdir=demo_data)  # fmt: skip
    there = tmp_path / "runs" / "vikdf"
    state = wait_for(slurm.finished(jid), 600, jid=jid, story=slurm.story(tmp_path, jid, there))
    assert state["JobState"] == "COMPLETED" and state["NodeList"] == "node[1-2]", state
    for stage, losses in {"stage1": "tim", "fusion": "ce", "dialogue": "ce"}.items():
        one, two = (
            scalars(here / "vikdf" / stage, "loss/total"),
            scalars(there / stage, "loss/total"),
        )
        assert sorted(one) == sorted(two) and len(one) >= 4, stage
        for s in one:
            assert two[s] == pytest.approx(one[s], rel=LOSS_RTOL), (stage, s)
        assert scalars(there / stage, f"loss/{losses}")
    figures = [
        json.loads((d / "pipeline.json").read_text())["done"]["dialogue_val"]["figures"]
        for d in (here / "vikdf", there)
    ]
    numbers = [{k: v for k, v in f.items() if isinstance(v, (int, float))} for f in figures]
    assert numbers[1] == pytest.approx(numbers[0], rel=1e-5) and numbers[0]["distinct1"] > 0


def test_torchrun_across_two_hosts_with_c10d_rendezvous(one_node, tmp_path):
    run = tmp_path / "runs" / "torchrun"
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [
        in_node(
            node,
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint={NODES['node1']}:{port}",
                "--rdzv-id=toy",
                # the nodes' names do not resolve: each is told its address, and the endpoint's
                # host that it serves the rendezvous
                f"--local-addr={NODES[node]}",
                f"--rdzv-conf=is_host={int(node == 'node1')}",
                "-m",
                "mmtrain.cli",
                "train",
                str(DEMO),
                f"run.out_dir={run.parent}",
                f"run.name={run.name}",
                "log.progress=false",
                *TOY.overrides,
                *layout_args(TOY, 2),
            ],
            env=env,
            cwd=REPO,
            stdout=open(tmp_path / f"{node}.log", "wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for node in ("node1", "node2")
    ]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], (tmp_path / "node2.log").read_text()[-3000:]
    assert_like_one_node(one_node, {"torchrun, 2 hosts": collect(TOY, run)}, tmp_path)


def test_the_deepspeed_launcher_across_two_hosts(one_node, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"{addr} slots=1\n" for addr in NODES.values()))
    run = tmp_path / "runs" / "hostfile"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PATH=f"{os.environ['MMTRAIN_TEST_SSH_PATH']}:{os.environ['PATH']}",  # ssh to the nodes
        GLOO_SOCKET_IFNAME="eth0",  # travels to the other host through launch/train.sh
    )
    done = subprocess.run(
        ["bash", "launch/train.sh", "--cpu", "1", "--hostfile", str(hostfile), str(DEMO),
         f"run.out_dir={run.parent}", f"run.name={run.name}", "log.progress=false",
         *TOY.overrides, *layout_args(TOY, 2)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Running on the following workers" in done.stdout + done.stderr
    assert_like_one_node(one_node, {"deepspeed launcher, 2 hosts": collect(TOY, run)}, tmp_path)


def test_the_time_limit_signal_requeues_and_resumes_on_two_nodes(tmp_path):
    # a 2-minute limit signalled 75 s ahead (Slurm here checks limits within seconds): each run
    # trains ~30 s after its start-up, so 300 steps take more than one (each step waits 0.2 s, so
    # that they do however fast the machine); the losses are the uninterrupted ones
    steps = 300
    args = [*NET, f"train.steps={steps}", "checkpoint.every=0", "train.micro_batch_size=8"]
    args += ["log.every=1", "recipe.step_delay_s=0.2"]
    jid = sbatch(tmp_path, "limit", DEMO, ["--nodes=2", "--ntasks-per-node=1"], args,
                 sbatch_args=["--time=2", "--signal=USR1@75"])  # fmt: skip
    run = tmp_path / "runs" / "limit"
    try:
        state = wait_for(
            lambda: slurm.finished(jid)() or slurm.nudge(jid, time_limit="10"),
            timeout=900,
            jid=jid,
            story=slurm.story(tmp_path, jid, run),
        )
    finally:
        slurm.end(jid)
    restarts = int(state["Restarts"])
    assert state["JobState"] == "COMPLETED" and restarts >= 1, state
    log = (run / "train.log").read_text()
    assert "stop signal received" in log and log.count("world size 2") == restarts + 1
    from tests.helpers import train

    straight = tmp_path / "runs" / "straight"
    train(straight, args, world=2)
    chained, once = scalars(run, "loss/total"), scalars(straight, "loss/total")
    assert sorted(chained) == sorted(once) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert chained[s] == pytest.approx(once[s], rel=LOSS_RTOL), s


def kill_node(node: str) -> None:
    """Every process of a node (its slurmd, the job's step daemons, the ranks): a node lost."""
    pids = subprocess.run(
        ["ip", "netns", "pids", f"mmt-{node}"], capture_output=True, text=True
    ).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def restore_node(node: str) -> None:
    """The node back: its slurmd and sshd again, and returned to service."""
    subprocess.run(
        ["bash", str(REPO / "slurm/testing/cluster.sh"), "node-up", "--nodes", "2"],
        env=dict(os.environ, MMTRAIN_NODE=node),
        check=True,
    )

    def idle():
        """the node to be in service again (idle, or already running the requeued job)"""
        state = subprocess.run(
            ["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True, text=True
        )
        if state.stdout.strip() in ("idle", "alloc", "mix"):
            return True
        subprocess.run(
            ["scontrol", "update", f"NodeName={node}", "State=RESUME"], capture_output=True
        )
        return False

    wait_for(idle, timeout=120, every=2)


LOSS_ARGS = [
    *NET,
    "train.micro_batch_size=8",
    "train.global_batch_size=16",  # 2 ranks x 8, or 1 rank x 8 x grad_accum 2
    "checkpoint.every=20",
    "dist.timeout_s=30",
    "dist.heartbeat_s=1",
    "dist.late_after_s=5",
]


def lose_node2_mid_run(tmp_path, name, resources, env=None, steps=200):
    """Start a 2-node job, kill node2 once a checkpoint exists; the job id, its run, and how long
    rank 0 took to exit naming the lost rank."""
    jid = sbatch(tmp_path, name, DEMO, resources, [*LOSS_ARGS, f"train.steps={steps}"], env)
    run = tmp_path / "runs" / name
    wait_for(
        log_has(run, "checkpoint saved: "), 300, jid=jid, story=slurm.story(tmp_path, jid, run)
    )
    assert job(jid)["NodeList"] == "node[1-2]", job(jid)
    t0 = time.time()
    kill_node("node2")
    rank0 = next(run.glob("slurm-*-rank0.log"))
    wait_for(
        lambda: "mmtrain train: error: " in rank0.read_text(),
        90,
        story=slurm.story(tmp_path, jid, run),
    )
    said = rank0.read_text()
    assert "rank 1 (host node2, 10.241.7.12" in said, said[-2000:]
    return jid, run, time.time() - t0, t0


def test_losing_a_node_names_it_and_the_job_goes_on_with_the_node_left(tmp_path):
    """--no-kill and MMTRAIN_MIN_NODES=1: the batch script starts the ranks again on the node that
    answers, in the same allocation, from the latest checkpoint, at the same global batch."""
    env = dict(os.environ, MMTRAIN_MIN_NODES="1")
    try:
        jid, run, detected, t0 = lose_node2_mid_run(
            tmp_path, "shrink", ["--nodes=2", "--ntasks-per-node=1", "--no-kill"], env
        )
        state = wait_for(slurm.finished(jid), 400, story=slurm.story(tmp_path, jid, run))
        print(f"node lost -> rank 0 exits naming it: {detected:.1f} s; -> done on one node: "
              f"{time.time() - t0:.0f} s")  # fmt: skip
        assert state["JobState"] == "COMPLETED" and state["Restarts"] == "0", state
        log = (run / "train.log").read_text()
        assert "checkpoint written by 2 ranks, resumed on 1" in log
        assert "global batch 16 = micro-batch 8 x grad_accum 2 x 1 ranks" in log
        assert "done: 200 steps" in log
        assert (
            "the ranks start again on node1 (MMTRAIN_MIN_NODES=1)"
            in (run / "slurm.log").read_text()
        )
    finally:
        slurm.end(jid)
        restore_node("node2")


def test_losing_a_node_requeues_the_job_which_resumes_on_two_nodes(tmp_path):
    """By default Slurm requeues a job whose node failed; it resumes from the latest checkpoint once
    two nodes are there again."""
    try:
        jid, run, detected, t0 = lose_node2_mid_run(
            tmp_path, "requeue", ["--nodes=2", "--ntasks-per-node=1"], steps=120
        )
        wait_for(
            lambda: job(jid).get("JobState") == "PENDING",
            180,
            story=slurm.story(tmp_path, jid, run),
        )
        requeued = time.time() - t0
        restore_node("node2")
        wait_for(start_now_when_requeued(jid, 1), 120)
        state = wait_for(slurm.finished(jid), 400, story=slurm.story(tmp_path, jid, run))
        print(f"node lost -> rank 0 exits: {detected:.1f} s; -> requeued: {requeued:.0f} s; "
              f"-> done on two nodes: {time.time() - t0:.0f} s")  # fmt: skip
        assert state["JobState"] == "COMPLETED" and int(state["Restarts"]) >= 1, state
        log = (run / "train.log").read_text()
        assert "resumed from" in log and log.count("world size 2") >= 2 and "done: 120 steps" in log
    finally:
        slurm.end(jid)
        restore_node("node2")
