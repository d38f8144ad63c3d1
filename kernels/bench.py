"""`python -m kernels.bench`: the fused kernels against torch eager, torch.compile and Inf-CL.

Prints one JSON line per (kernel, implementation, shape): forward + backward time (median of
timed iterations after warm-up, CUDA events), peak memory above the inputs, and useful
TFLOP/s (contrastive: 6 * B * B * D) or effective TB/s (variational: 4 inputs + noise +
incoming gradient read, output + 4 gradients written), then one line of ratios against the
peers measured in the same run. Shapes are those of ../shared/anchors.md. On a machine without
CUDA it runs a tiny smoke pass (correctness of the plumbing only) and says the figures are not
timings.
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
from kernels.contrastive import contrastive_loss
from kernels.variational import variational_fusion


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


def bench_contrastive(
    sizes: List[int], d: int, dtype, device, warmup: int, iters: int
) -> List[dict]:
    impls = {
        "mmtrain": contrastive_loss,
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
    minimal_bytes = 11 * n * d * ins[0].element_size()
    rows = []
    for name, fn in impls.items():

        def step(fn=fn):
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
        rows.append(row)
    return rows


def ratios(rows: List[dict]) -> dict:
    """Speed-ups of mmtrain over each peer at each shape, from this run's own measurements."""
    out = {}
    for r in rows:
        if r["impl"].startswith("mmtrain") or "ms" not in r:
            continue
        shape = {k: r[k] for k in ("B", "N", "D") if k in r}
        ours = next(
            (
                m
                for m in rows
                if m["impl"] == "mmtrain"
                and m["kernel"] == r["kernel"]
                and all(m.get(k) == v for k, v in shape.items())
                and "ms" in m
            ),
            None,
        )
        if ours:
            key = f"{r['kernel']}/{'x'.join(str(v) for v in shape.values())}/{r['impl']}"
            out[key] = round(r["ms"] / ours["ms"], 3)
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
    else:
        sizes, vshape, note = [64], (64, 128), "CPU smoke pass: the figures are not timings"
        args.iters, args.warmup = 1, 1
    print(json.dumps({"device": note, "torch": torch.__version__}), flush=True)
    rows = []
    if args.kernel in ("contrastive", "all"):
        rows += bench_contrastive(sizes, args.dim, dtype, device, args.warmup, args.iters)
    if args.kernel in ("variational", "all"):
        rows += bench_variational(*vshape, dtype, device, args.warmup, args.iters)
    for r in rows:
        print(json.dumps(r), flush=True)
    print(json.dumps(ratios(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
