"""Which GPU a rank binds, under every launcher: the index handed to `init_process_group`
(device_id), to `torch.cuda.set_device` and to DeepSpeed (LOCAL_RANK, which DeepSpeed's engine and
zero.Init read as a device index) is a device the rank can see. No GPU needed: CUDA is faked."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as tdist

from mmtrain.engine import dist

GPUS = [str(i) for i in range(8)]


@pytest.fixture(autouse=True)
def environment():
    """dist.init writes RANK, LOCAL_RANK, ... into os.environ: each test's are undone."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def start(monkeypatch, environ: dict, visible: int) -> dict:
    """dist.init under `environ` with `visible` CUDA devices; what each party was given."""
    seen: dict = {}
    for k in [*dist.DIST_VARS, "MMTRAIN_NODE_LOCAL_RANK", "LOCAL_WORLD_SIZE"]:
        monkeypatch.delenv(k, raising=False)
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("set_device", d.index))
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)

    def init_process_group(backend, **kw):
        seen["backend"] = backend
        seen["device_id"] = kw["device_id"].index if kw.get("device_id") is not None else None

    def init_distributed(**kw):
        seen["deepspeed LOCAL_RANK"] = int(os.environ["LOCAL_RANK"])

    import deepspeed

    monkeypatch.setattr(tdist, "init_process_group", init_process_group)
    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    env = dist.init("auto", 60)
    seen["device"] = env.device.index
    return seen


def bound(seen: dict) -> int:
    """The one index every party was given (asserts they agree)."""
    indices = {seen[k] for k in ("set_device", "device_id", "deepspeed LOCAL_RANK", "device")}
    assert len(indices) == 1, seen
    assert seen["backend"] == "nccl"
    return indices.pop()


SLURM = {
    "SLURM_PROCID": "11",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "3",
    "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_JOB_NODELIST": "gpu[1-2]",
    "SLURM_JOB_ID": "7",
}


@pytest.mark.parametrize(
    "launcher,environ,visible,index",
    [
        # srun --gpus-per-task=1 (or --gpu-bind=single:1): each task sees only its own GPU
        ("srun, one GPU per task", {**SLURM, "CUDA_VISIBLE_DEVICES": "3"}, 1, 0),
        ("srun, every GPU visible", {**SLURM, "CUDA_VISIBLE_DEVICES": ",".join(GPUS)}, 8, 3),
        (
            "srun, 2 GPUs per task",
            {**SLURM, "SLURM_NTASKS_PER_NODE": "4", "SLURM_LOCALID": "3"},
            2,
            1,
        ),
        (
            "torchrun --nnodes 2",
            {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"},
            8,
            3,
        ),
        (
            "deepspeed launcher, second node",
            {
                "RANK": "11",
                "WORLD_SIZE": "16",
                "LOCAL_RANK": "3",
                "CUDA_VISIBLE_DEVICES": ",".join(GPUS),
            },
            8,
            3,
        ),
        # sets RANK and WORLD_SIZE only: not cuda:9 on the second node
        ("RANK only, 8 per node", {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, 8, 1),
        ("RANK only", {"RANK": "9", "WORLD_SIZE": "16"}, 8, 1),
        (
            "RANK only, Open MPI",
            {"RANK": "9", "WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
            8,
            1,
        ),
        ("srun under torchrun's variables", {**SLURM, "RANK": "11", "WORLD_SIZE": "16"}, 1, 0),
    ],
)
def test_every_launcher_binds_a_visible_device(monkeypatch, launcher, environ, visible, index):
    seen = start(monkeypatch, environ, visible)
    assert bound(seen) == index, launcher
    assert 0 <= index < visible
    local = environ.get("LOCAL_RANK") or environ.get("SLURM_LOCALID")
    if local:  # the launcher's node-local rank is kept
        assert os.environ["MMTRAIN_NODE_LOCAL_RANK"] == local


def test_socket_ifname_goes_to_gloo_and_nccl_unless_set(monkeypatch):
    environ = {"NCCL_SOCKET_IFNAME": "ib0"}
    dist.use_interface("eth1", environ)
    assert environ == {"NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "eth1"}
    untouched: dict = {}
    dist.use_interface("", untouched)
    assert untouched == {}
