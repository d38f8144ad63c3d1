"""Process-group start-up for every launcher mmtrain supports.

- `deepspeed` and `torchrun` set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
- Slurm's `srun` (one task per GPU) sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; we map them.
- A plain `python` run is a world of one.
NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, Optional, TypeVar

import torch
import torch.distributed as tdist

log = logging.getLogger("mmtrain")
T = TypeVar("T")


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist: 'gpu[003-005,9],cpu1' -> 'gpu003', 'a[01-02]b[1-2]' -> 'a01b1'."""
    text, depth, end = nodelist.strip(), 0, None
    for i, ch in enumerate(text):  # the first host expression ends at a top-level comma
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or (ch == "," and depth == 0):
            end = i
            break
    expr = text[:end]
    host = re.sub(r"\[([^\[\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], expr)
    if not host or depth < 0 or any(c in host for c in "[],"):
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    return host


PORT_BASE, PORT_SPAN = 15000, 15000  # 15000-29999: below Linux's ephemeral range (32768-60999)


def job_port(job: int, restart: int = 0, probe: bool = False) -> int:
    """The rendezvous port of a Slurm job: a hash of (job id, restart count) into PORT_BASE + [0,
    PORT_SPAN), so neighbouring or evenly spaced job ids do not collide and a requeued job does not
    wait for its old port. `probe` (on the master host only: slurm/train.sbatch) moves on to the next
    port while the chosen one is taken there."""
    h = int(hashlib.sha256(f"{job}/{restart}".encode()).hexdigest(), 16) % PORT_SPAN
    for k in range(PORT_SPAN if probe else 1):
        port = PORT_BASE + (h + k) % PORT_SPAN
        if not probe:
            return port
        with socket.socket() as s:
            try:
                s.bind(("", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in {PORT_BASE}-{PORT_BASE + PORT_SPAN - 1}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_env(environ=os.environ) -> None:
    """Fill the torch.distributed variables from Slurm, or for a single process. LOCAL_RANK, when
    the launcher gives none, comes from the node-local rank it does give (Slurm's SLURM_LOCALID,
    Open MPI's), else from RANK modulo LOCAL_WORLD_SIZE; `bind_device` later maps it to a visible
    device."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        if "LOCAL_RANK" not in environ:
            environ["LOCAL_RANK"] = _node_local_rank(environ)
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        environ["RANK"] = environ["SLURM_PROCID"]
        environ["WORLD_SIZE"] = environ["SLURM_NTASKS"]
        environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in environ:
            environ["MASTER_ADDR"] = first_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        # slurm/train.sbatch exports the port it probed on the master host; a bare srun gets the
        # same hash of the job id and restart count on every rank
        job, restart = (
            int(environ.get("SLURM_JOB_ID", "0")),
            int(environ.get("SLURM_RESTART_COUNT", "0")),
        )
        environ.setdefault("MASTER_PORT", str(job_port(job, restart)))
    else:
        environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        environ.setdefault("MASTER_ADDR", "127.0.0.1")
        environ.setdefault("MASTER_PORT", str(_free_port()))
    environ.setdefault("MASTER_ADDR", "127.0.0.1")
    environ.setdefault("MASTER_PORT", "29500")


def _node_local_rank(environ) -> str:
    for key in ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        if key in environ:
            return environ[key]
    per_node = int(environ.get("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"]))
    return str(int(environ["RANK"]) % max(1, per_node))


def bind_device(environ, visible: int) -> int:
    """The index, among the `visible` CUDA devices, of the one this rank uses, written back to
    LOCAL_RANK (DeepSpeed reads LOCAL_RANK as a device index: its engine, zero.Init and its
    process-group start). Where every local rank sees every GPU (torchrun, the deepspeed
    launcher, srun without binding) it is the node-local rank; where each task is shown only its
    own GPU(s) (srun --gpus-per-task=1, --gpu-bind=single:1) the local rank modulo what it sees,
    i.e. its one GPU. The launcher's node-local rank stays in MMTRAIN_NODE_LOCAL_RANK."""
    local = int(environ.setdefault("MMTRAIN_NODE_LOCAL_RANK", environ["LOCAL_RANK"]))
    index = local % visible
    environ["LOCAL_RANK"] = str(index)
    return index


NETWORK_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def use_interface(ifname, environ=os.environ) -> None:
    """`dist.socket_ifname`: the network interface gloo and NCCL connect over (e.g. ib0, eth0),
    unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are already set (those win)."""
    if ifname:
        for key in NETWORK_ENV:
            environ.setdefault(key, ifname)


_ADDED_ENV: list = []  # the variables init() set itself, removed again by shutdown()

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init(
    backend: str = "auto", timeout_s: int = 1800, socket_ifname: str = "", solo_timeout_s: int = 0
) -> DistEnv:
    """The process group (one per process, started once), over `backend` ("auto": NCCL on CUDA,
    else gloo), on the device `bind_device` picks; `solo_timeout_s`: see `solo`."""
    global SOLO_TIMEOUT_S
    SOLO_TIMEOUT_S = solo_timeout_s or SOLO_TIMEOUT_S
    before = {k for k in DIST_VARS if k in os.environ}
    resolve_env()
    use_interface(socket_ifname)
    _ADDED_ENV[:] = [k for k in DIST_VARS if k in os.environ and k not in before]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", bind_device(os.environ, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU ranks at every start
        # (~35 s); gloo is enough for CPU runs, so skip the build.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    local = int(os.environ["LOCAL_RANK"])
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    import deepspeed

    if not tdist.is_initialized():
        # started here, not by DeepSpeed, whose start binds the device LOCAL_RANK names
        tdist.init_process_group(
            backend,
            timeout=timedelta(seconds=timeout_s),
            rank=rank,
            world_size=world,
            device_id=device if device.type == "cuda" and world > 1 else None,
        )
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistEnv(rank, world, local, device)


def _multi_rank() -> bool:
    return tdist.is_initialized() and tdist.get_world_size() > 1


def _comm_device(t: torch.Tensor) -> torch.device:
    """NCCL needs CUDA tensors; gloo takes them where they are."""
    return (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else t.device
    )


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum across ranks (a no-op in a world of one); returns a tensor on t's device."""
    if not _multi_rank():
        return t
    buf = t.to(_comm_device(t)).clone()
    tdist.all_reduce(buf)
    return buf.to(t.device)


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0 (no gradient)."""
    if not _multi_rank():
        return t
    dev = _comm_device(t)
    parts = [torch.empty_like(t, device=dev) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, t.to(dev).contiguous())
    return torch.cat(parts).to(t.device)


def gather_objects(obj):
    """Every rank's picklable object, in rank order (a list of one in a world of one)."""
    if not _multi_rank():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def is_main() -> bool:
    """Rank 0, or the only process; before the process group starts, as the launcher says
    (RANK from deepspeed/torchrun, SLURM_PROCID from srun)."""
    if tdist.is_initialized():
        return tdist.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def device_memory(env: DistEnv) -> float:
    """Bytes of memory one rank may count on: its GPU's, or on CPU the host's shared by the local
    ranks."""
    if env.device.type == "cuda":
        return float(torch.cuda.get_device_properties(env.device).total_memory)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host / int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))


def set_timeout(seconds: int) -> bool:
    """The default process group's collective timeout from now on (torch's `_set_pg_timeout`,
    as torchtitan shortens it after the first step); False where this torch lacks it."""
    if not _multi_rank():
        return False
    from torch.distributed import distributed_c10d

    if not hasattr(distributed_c10d, "_set_pg_timeout"):
        return False
    distributed_c10d._set_pg_timeout(timedelta(seconds=seconds))
    return True


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


# Work one rank does for all (a universal conversion, a consolidation, an export) can outlast
# the collective timeout (dist.timeout_s, which the watchdog enforces on every collective): the
# others wait for it in a gloo group of their own, with this timeout instead (dist.solo_timeout_s).
SOLO_TIMEOUT_S = 6 * 3600
_solo_group: Optional[Any] = None  # made at the first `solo` of a multi-rank run


def solo(work: Callable[[], T], what: str, progress_s: float = 60.0) -> Optional[T]:
    """Collective: `work()` on rank 0 while the other ranks wait, whatever the collective timeout,
    saying every `progress_s` that they are waiting; rank 0's result (None elsewhere). If it
    fails, every rank raises, naming `what` and rank 0's error. MMTRAIN_SLOW_RANK0_S (tests)
    makes rank 0 sleep that long first."""
    global _solo_group
    failed, result = "", None
    if is_main():
        time.sleep(float(os.environ.get("MMTRAIN_SLOW_RANK0_S", "0")))
        try:
            result = work()
        except Exception as e:  # the others must hear of it, not wait for the timeout
            failed = f"{type(e).__name__}: {e}"
    if _multi_rank():
        if _solo_group is None:
            timeout = timedelta(seconds=SOLO_TIMEOUT_S)
            _solo_group = tdist.new_group(backend="gloo", timeout=timeout)
        flag = torch.tensor([1 if failed else 0])
        pending = tdist.all_reduce(flag, group=_solo_group, async_op=True)
        started = time.monotonic()
        while not pending.is_completed():
            time.sleep(min(1.0, progress_s))
            waited = time.monotonic() - started
            if waited // progress_s != (waited - 1.0) // progress_s:
                log.info("waiting for rank 0: %s (%.0f s so far)", what, waited)
        pending.wait()
        if int(flag) and not failed:
            failed = "see rank 0's log"
    if failed:
        raise RuntimeError(f"{what} failed on rank 0: {failed}")
    return result


def from_rank0(work: Callable[[], T], what: str) -> T:
    """Collective: `work()` done once, on rank 0, and its (picklable) result on every rank, e.g.
    what a recipe derives from the training split, which 64 ranks would otherwise read 64 times.
    The others wait as in `solo`, whatever the collective timeout. If `work` raises, every rank
    raises the same exception (a bad sample's DataError stays one, with its message)."""
    box: List[Any] = [None, None]  # the result, or the error

    def run() -> None:
        try:
            box[0] = work()
        except Exception as e:  # pickled over to the others
            box[1] = e

    solo(run, what)
    if _multi_rank():
        tdist.broadcast_object_list(box, src=0, group=_solo_group)
    if box[1] is not None:
        raise box[1]
    return box[0]


def shutdown() -> None:
    """Orderly exit: without it gloo's threads can abort the process at interpreter exit."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
    # In-process use (tests, notebooks): a later launch from this process must not inherit a
    # RANK=0 / WORLD_SIZE=1 that only described this process.
    for k in _ADDED_ENV:
        os.environ.pop(k, None)
    _ADDED_ENV.clear()
