"""`python -m kernels.compile_check`: compiles every GPU configuration for an H100, no GPU needed.

The interpreter runs the kernels' arithmetic on a CPU but not the GPU compiler, so a kernel can
pass every test and still fail to compile for a GPU, or spill registers there. This compiles
each autotune configuration of each kernel ahead of time for `--arch` (sm_90 by default) with
Triton's bundled ptxas, and prints one JSON line per (kernel, dtype, configuration): registers
per thread, local-memory (spill) bytes per thread, shared memory, and whether the tensor-core
dots became Hopper's wgmma. Exit status 1 when any configuration fails to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _resources(cubin: bytes, cuobjdump: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True
        )
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", out.stdout, re.S)
    if not found:
        return {}
    return {"registers": int(found.group(1)), "spill_bytes": int(found.group(2))}


def _signature(fn, constexprs: dict, pointers: dict, floats: set) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def jobs(dtype: str):
    """(kernel name, jit function, signature, constexprs, num_warps, num_stages) to compile."""
    import kernels.contrastive as kc
    import kernels.variational as kv

    dot_fp32 = dtype == "fp32"
    floats = {"t_diag", "t_all", "coef", "g_scale"}
    for cfg in kc._configs(kc.FORWARD_TILES):
        const = dict(cfg.kwargs, DOT_FP32=dot_fp32, PRECISION="tf32")
        ptrs = {n: f"*{dtype}" for n in ("A", "B")}
        ptrs.update({n: "*fp32" for n in kc._fwd_kernel.fn.arg_names if n.endswith("_ptr")})
        sig = _signature(kc._fwd_kernel.fn, const, ptrs, floats)
        yield "contrastive_forward", kc._fwd_kernel.fn, sig, const, cfg.num_warps, cfg.num_stages
    for cfg in kc._configs(kc.BACKWARD_TILES):
        const = dict(cfg.kwargs, DOT_FP32=dot_fp32, PRECISION="tf32", ATOMIC_DB=True)
        ptrs = {n: f"*{dtype}" for n in ("A", "B")}
        ptrs.update({n: "*fp32" for n in ("dA", "dB")})
        ptrs.update({n: "*fp32" for n in kc._bwd_kernel.fn.arg_names if n.endswith("_ptr")})
        sig = _signature(kc._bwd_kernel.fn, const, ptrs, floats)
        yield "contrastive_backward", kc._bwd_kernel.fn, sig, const, cfg.num_warps, cfg.num_stages
    for fwd, bwd in ((True, False), (False, True), (True, True)):
        const = dict(
            LV_MIN=kv.LOGVAR_MIN, LV_MAX=kv.LOGVAR_MAX, BLOCK_D=kv.BLOCK_D, HAS_EPS=False,
            PQ=False, FORWARD=fwd, BACKWARD=bwd,
        )  # fmt: skip
        tensors = ("MQ", "LQ", "MP", "LP", "EPS", "DZ", "Z", "GMQ", "GLQ", "GMP", "GLP")
        ptrs = {n: f"*{dtype}" for n in tensors}
        ptrs.update({"DKL": "*fp32", "KL": "*fp32"})
        sig = _signature(kv._vf_kernel, const, ptrs, set())
        name = "variational_" + ("step" if fwd and bwd else "forward" if fwd else "backward")
        yield name, kv._vf_kernel, sig, const, 4, 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kernels.compile_check", description=__doc__.split("\n")[0]
    )
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100)")
    p.add_argument("--dtype", nargs="*", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the check compiles for the GPU", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for dtype in args.dtype:
        for name, fn, sig, const, warps, stages in jobs(dtype):
            row = {"kernel": name, "dtype": dtype, "num_warps": warps, "num_stages": stages}
            row.update({k: v for k, v in const.items() if k.startswith("BLOCK")})
            try:
                compiled = triton.compile(
                    ASTSource(fn=fn, signature=sig, constexprs=const),
                    target=target,
                    options=dict(num_warps=warps, num_stages=stages),
                )
            except Exception as exc:  # noqa: BLE001 - reported per configuration
                failed += 1
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            else:
                row.update(_resources(compiled.asm["cubin"], cuobjdump))
                row["shared_bytes"] = compiled.metadata.shared
                row["wgmma"] = "wgmma" in compiled.asm["ptx"]
            print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
