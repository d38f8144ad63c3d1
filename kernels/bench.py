"""`python -m kernels.bench`: the fused kernels against torch eager, torch.compile and Inf-CL.

Prints first the bf16 matmul peak measured in this run (a plain `torch.matmul`), then one JSON
line per (kernel, implementation, shape): forward + backward time (median of timed iterations
after warm-up, CUDA events), peak memory above the inputs, and
- contrastive: useful TFLOP/s (6 B^2 D: the logits and the two gradient GEMMs), and for mmtrain
  the executed FLOPs (8 B^2 D; 10 deterministic), their TFLOP/s and their fraction of the
  measured matmul peak;
- variational: effective TB/s over the minimal traffic (4 inputs + noise + incoming gradient
  read, output + 4 gradients written: 11 passes), and the passes each implementation moves;
then one line of ratios against the peers measured in the same run (Inf-CL when `inf_cl` is
importable). Shapes are those of ../shared/anchors.md. On a machine without CUDA it runs a
tiny smoke pass (correctness of the plumbing only) and says the figures are not timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from kernels import reference
from kernels.contrastive import contrastive_loss, executed_flops
from kernels.variational import variational_fusion, variational_fusion_step


def _timed(fn: Callable[[], None], warmup: int, iters: int, cuda: bool) -> Dict[str, float]:
    for _ in range(warmup):
        fn()
    if not cuda:
        import time

        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return {"ms": statistics.median(times), "peak_extra_gib": None}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {
        "ms": statistics.median(times),
        "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
    }


def _inf_cl() -> Optional[Callable]:
    try:
        from inf_cl import cal_flash_loss
    except ImportError:
        return None

    def loss(x, y, s):
        labels = torch.arange(x.shape[0], device=x.device)
        return 0.5 * (cal_flash_loss(x, y, labels, s) + cal_flash_loss(y, x, labels, s))

    return loss


def matmul_peak(device, dtype, n: int, warmup: int, iters: int) -> dict:
    """TFLOP/s of one n x n x n `torch.matmul` in `dtype`: the peak the kernels are read against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    row = {"kernel": "matmul", "impl": "torch", "N": n, "dtype": str(dtype).split(".")[-1]}
    row.update(_timed(lambda: torch.matmul(a, b), warmup, iters, device.type == "cuda"))
    row["tflops"] = 2 * n**3 / (row["ms"] * 1e-3) / 1e12
    return row


def tile_configs(deterministic: bool) -> Dict[str, Optional[str]]:
    """The tiles the contrastive kernels ran with: the pinned configuration (deterministic), or
    what the autotuner chose in this process."""
    from kernels import contrastive as kc
    from kernels._triton import chosen_config

    if deterministic:
        return {"forward": str(kc.PINNED), "backward": str(kc.PINNED)}
    return {"forward": chosen_config(kc._fwd_kernel), "backward": chosen_config(kc._bwd_kernel)}


def bench_contrastive(
    sizes: List[int], d: int, dtype, device, warmup: int, iters: int, peak_tflops: float
) -> List[dict]:
    impls = {
        "mmtrain": contrastive_loss,
        "mmtrain_deterministic": lambda x, y, s: contrastive_loss(x, y, s, deterministic=True),
        "torch_eager": reference.contrastive_loss,
        "torch_compile": torch.compile(reference.contrastive_loss),
    }
    if (inf := _inf_cl()) is not None:
        impls["inf_cl"] = inf
    rows = []
    for b in sizes:
        x = F.normalize(torch.randn(b, d, device=device), dim=-1).to(dtype).requires_grad_()
        y = F.normalize(torch.randn(b, d, device=device), dim=-1).to(dtype).requires_grad_()
        s = torch.tensor(1 / 0.07, device=device, requires_grad=True)
        for name, fn in impls.items():
            row = {
                "kernel": "contrastive",
                "impl": name,
                "B": b,
                "D": d,
                "dtype": str(dtype).split(".")[-1],
            }

            def step(fn=fn, x=x, y=y, s=s):
                x.grad = y.grad = s.grad = None
                fn(x, y, s).backward()

            try:
                row.update(_timed(step, warmup, iters, device.type == "cuda"))
                row["useful_tflops"] = 6 * b * b * d / (row["ms"] * 1e-3) / 1e12
                if name.startswith("mmtrain"):
                    flops = executed_flops(b, d, deterministic=name != "mmtrain")
                    row["executed_flops"] = flops
                    row["executed_tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                    row["fraction_of_matmul_peak"] = row["executed_tflops"] / peak_tflops
                    row["configs"] = tile_configs(deterministic=name != "mmtrain")
            except torch.OutOfMemoryError:
                row["status"] = "out of memory"
            torch.cuda.empty_cache() if device.type == "cuda" else None
            rows.append(row)
    return rows


def bench_variational(n: int, d: int, dtype, device, warmup: int, iters: int) -> List[dict]:
    ins = [torch.randn(n, d, device=device, dtype=dtype).requires_grad_() for _ in range(4)]
    eps = torch.randn(n, d, device=device, dtype=dtype)
    dz = torch.randn(n, d, device=device, dtype=dtype)
    impls = {
        "mmtrain": lambda: variational_fusion(*ins, eps=eps),
        "mmtrain_seeded": lambda: variational_fusion(*ins, seed=1234),
        "torch_eager": lambda: reference.variational_fusion(*ins, eps),
    }
    compiled = torch.compile(reference.variational_fusion)
    impls["torch_compile"] = lambda: compiled(*ins, eps)
    # one launch when dz is at hand (variational_fusion_step): no autograd graph
    fused = {
        "mmtrain_step": lambda: variational_fusion_step(*ins, dz, eps=eps),
        "mmtrain_step_seeded": lambda: variational_fusion_step(*ins, dz, seed=1234),
    }
    passes = {"mmtrain": 16, "mmtrain_seeded": 14, "mmtrain_step": 11, "mmtrain_step_seeded": 10}
    minimal_bytes = 11 * n * d * ins[0].element_size()
    rows = []
    for name, fn in {**impls, **fused}.items():

        def step(fn=fn, name=name):
            if name in fused:
                fn()
                return
            for t in ins:
                t.grad = None
            z, kl = fn()
            torch.autograd.backward([z, kl], [dz, torch.ones_like(kl)])

        row = {
            "kernel": "variational",
            "impl": name,
            "N": n,
            "D": d,
            "dtype": str(dtype).split(".")[-1],
        }
        row.update(_timed(step, warmup, iters, device.type == "cuda"))
        row["effective_tbps"] = minimal_bytes / (row["ms"] * 1e-3) / 1e12
        if name in passes:
            row["passes"] = passes[name]
        rows.append(row)
    return rows


def ratios(rows: List[dict]) -> dict:
    """Speed-ups of each mmtrain variant over each peer at each shape, from this run's own
    measurements (peer ms / mmtrain ms: above 1, mmtrain is faster)."""
    out = {}
    timed = [r for r in rows if "ms" in r and r["kernel"] != "matmul"]
    for peer in (r for r in timed if not r["impl"].startswith("mmtrain")):
        shape = {k: peer[k] for k in ("B", "N", "D") if k in peer}
        for ours in timed:
            same = ours["kernel"] == peer["kernel"] and all(
                ours.get(k) == v for k, v in shape.items()
            )
            if same and ours["impl"].startswith("mmtrain"):
                where = "x".join(str(v) for v in shape.values())
                key = f"{peer['kernel']}/{where}/{peer['impl']}/{ours['impl']}"
                out[key] = round(peer["ms"] / ours["ms"], 3)
    return {"ratios_peer_ms_over_mmtrain_ms": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--kernel", choices=["contrastive", "variational", "all"], default="all")
    p.add_argument("--sizes", type=int, nargs="*", default=[8192, 32768, 65536, 131072])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        sizes, vshape, note = args.sizes, (32768, 4096), torch.cuda.get_device_name()
        peak_n = 8192
    else:
        sizes, vshape, note = [64], (64, 128), "CPU smoke pass: the figures are not timings"
        args.iters, args.warmup, peak_n = 1, 1, 256
    print(json.dumps({"device": note, "torch": torch.__version__}), flush=True)
    peak = matmul_peak(device, dtype, peak_n, args.warmup, args.iters)
    print(json.dumps(peak), flush=True)
    rows = []
    if args.kernel in ("contrastive", "all"):
        rows += bench_contrastive(
            sizes, args.dim, dtype, device, args.warmup, args.iters, peak["tflops"]
        )
    if args.kernel in ("variational", "all"):
        rows += bench_variational(*vshape, dtype, device, args.warmup, args.iters)
    for r in rows:
        print(json.dumps(r), flush=True)
    print(json.dumps(ratios(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
