"""`make gpu-check`: everything a GPU can tell us, in one command, one report.

    python tests/gpu_check.py [--dry-run] [--out DIR] [--parts NAME ...] [--baseline PATH]

On one GPU (at most about 8 minutes) it runs, each part as its own process with its own time
limit, so that one failure or hang never hides the others:
  kernels     the kernel tests, natively (compiled and autotuned; tests/unit/kernels)
  kernel_bench  python -m kernels.bench at the anchor sizes: contrastive B = 16k / 65k / 131k at
              D = 512, variational 32k x 4,096, bf16, with the tile configurations chosen
  zero        mmtrain bench zero: the 267M step at ZeRO stage 0 / 2 / 3
  vikdf_stage1, vikdf_fusion  the VIKDF steps through the engine against
              ../shared/baselines/hf_eager_vikdf.py (when it is there)
  dyncot, kdsl  one published-width step of each (random weights at the released widths, one
              layer per stack, bf16, the published config's ZeRO settings, one GPU)
and writes DIR/report.json (every figure) and DIR/report.md (a table with the device, the date,
each figure and its ratio to ../shared/anchors.md's targets). `--dry-run` runs every part at tiny
sizes on the CPU (what `make test-all` checks: that each part starts and reports).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO.parent / "shared" / "baselines" / "hf_eager_vikdf.py"
MM = [sys.executable, "-m", "mmtrain.cli"]
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]

# ../shared/anchors.md, the targets (lower is better for ms and GiB, higher for the rest)
ANCHORS = {
    "contrastive/65536/ms": 40.0,
    "contrastive/65536/peak_extra_gib": 1.2,
    "contrastive/131072/ms": 160.0,
    "contrastive/131072/peak_extra_gib": 2.4,
    "variational/32768x4096/ms": 1.15,
    "zero/stage3_mmtrain/step_ms": 140.0,
    "zero/stage3_mmtrain/tokens_per_s": 117_000.0,
    "vikdf_stage1/ratio_to_hf_eager": 1.5,
    "vikdf_fusion/ratio_to_hf_eager": 1.3,
}
LOWER_IS_BETTER = ("ms", "gib")


def parts(dry: bool, baseline: Optional[Path]) -> Dict[str, dict]:
    """name -> the command and its time limit, full size or (dry) tiny on the CPU."""
    peer = ["--baseline", str(baseline)] if baseline and not dry else []
    tiny = ["--size", "tiny", "--steps", "2"]
    return {
        "kernels": dict(
            cmd=PYTEST + ["tests/unit/kernels"] + (["-k", "comparison or pinned"] if dry else []),
            timeout=150,
        ),
        "kernel_bench": dict(
            cmd=[sys.executable, "-m", "kernels.bench"]
            + ([] if dry else ["--sizes", "16384", "65536", "131072"]),
            timeout=120,
            env=dict(TRITON_INTERPRET="0"),
        ),
        "zero": dict(
            cmd=MM
            + ["bench", "zero"]
            + (tiny + ["--configs", "stage0", "stage3_mmtrain"] if dry else ["--steps", "12"]),
            timeout=150,
        ),
        **{
            f"vikdf_{part}": dict(
                cmd=MM
                + ["bench", f"vikdf-{part}", "--engine"]
                + (tiny + ["--batch-size", str(batch)] if dry else ["--steps", "8"])
                + peer,
                timeout=150,
            )
            for part, batch in (("stage1", 8), ("fusion", 4))
        },
        "dyncot": dict(cmd=MM + ["bench", "recipe", "dyncot"] + (tiny if dry else []), timeout=120),
        "kdsl": dict(cmd=MM + ["bench", "recipe", "kdsl"] + (tiny if dry else []), timeout=120),
    }


def json_lines(text: str) -> List[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def run_part(name: str, spec: dict, out: Path) -> dict:
    env = dict(os.environ, **spec.get("env", {}))
    start = time.monotonic()
    try:
        done = subprocess.run(
            spec["cmd"], cwd=REPO, env=env, capture_output=True, text=True, timeout=spec["timeout"]
        )
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout = "timed out", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else ""
        stderr = f"over its limit of {spec['timeout']} s"
    seconds = round(time.monotonic() - start, 1)
    (out / f"{name}.log").write_text(f"$ {' '.join(spec['cmd'])}\n{stdout}\n--- stderr\n{stderr}")
    result = {"part": name, "rc": rc, "seconds": seconds, "rows": json_lines(stdout)}
    if name == "kernels":
        summary = re.findall(r"(\d+) (passed|failed|skipped|error)", stdout)
        result["tests"] = {k: int(n) for n, k in summary}
    if rc != 0:
        result["error"] = (stderr or stdout)[-1500:]
    return result


def figures(results: List[dict]) -> Dict[str, float]:
    """The figures the anchors name, pulled from each part's JSON lines."""
    out: Dict[str, float] = {}
    for r in results:
        for row in r["rows"]:
            if r["part"] == "kernel_bench" and row.get("impl") == "mmtrain" and "ms" in row:
                shape = row.get("B") or f"{row.get('N')}x{row.get('D')}"
                out[f"{row['kernel']}/{shape}/ms"] = row["ms"]
                if row.get("peak_extra_gib") is not None:
                    out[f"{row['kernel']}/{shape}/peak_extra_gib"] = row["peak_extra_gib"]
            if r["part"] == "zero" and "step_ms" in row:
                out[f"zero/{row['config']}/step_ms"] = row["step_ms"]
                out[f"zero/{row['config']}/tokens_per_s"] = row["tokens_per_s"]
            if (
                r["part"].startswith("vikdf")
                and "ratio_samples_s_mmtrain_engine_over_hf_eager" in row
            ):
                out[f"{r['part']}/ratio_to_hf_eager"] = row[
                    "ratio_samples_s_mmtrain_engine_over_hf_eager"
                ]
            if r["part"] in ("vikdf_stage1", "vikdf_fusion", "dyncot", "kdsl") and "step_ms" in row:
                out[f"{r['part']}/step_ms"] = row["step_ms"]
                out[f"{r['part']}/samples_per_s"] = row["samples_per_s"]
                if row.get("peak_memory_gib") is not None:
                    out[f"{r['part']}/peak_memory_gib"] = row["peak_memory_gib"]
    return out


def ratio_to_anchor(key: str, value: float) -> Optional[float]:
    """How far past its target a figure is: above 1 is better than the target."""
    target = ANCHORS.get(key)
    if target is None or not value:
        return None
    lower = key.endswith(LOWER_IS_BETTER)
    return round(target / value if lower else value / target, 3)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU, dry run (torch {torch.__version__}): the figures are not timings"


def markdown(report: dict) -> str:
    lines = [
        f"# gpu-check, {report['date']}",
        "",
        f"Device: {report['device']}. Commit {report['commit']}. "
        + ("Dry run at tiny sizes." if report["dry_run"] else ""),
        "",
        "| part | exit | seconds | note |",
        "|---|---|---|---|",
    ]
    for r in report["parts"]:
        note = json.dumps(r.get("tests", "")) if r["part"] == "kernels" else ""
        if "error" in r:
            note = (note + " " + r["error"].strip().splitlines()[-1][:120]).strip()
        lines.append(f"| {r['part']} | {r['rc']} | {r['seconds']} | {note} |")
    lines += [
        "",
        "| figure | value | anchor target | ratio (above 1: better) |",
        "|---|---|---|---|",
    ]
    for key, value in report["figures"].items():
        target = ANCHORS.get(key, "")
        ratio = None if report["dry_run"] else ratio_to_anchor(key, value)  # tiny sizes: no ratio
        lines.append(f"| {key} | {value:.4g} | {target} | {ratio if ratio is not None else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="every part at tiny sizes on the CPU")
    ap.add_argument("--out", type=Path, default=REPO / "gpu-check")
    ap.add_argument("--parts", nargs="+", help="a subset of the parts (default: all)")
    ap.add_argument("--baseline", type=Path, default=BASELINE if BASELINE.is_file() else None)
    args = ap.parse_args(argv)
    todo = parts(args.dry_run, args.baseline)
    unknown = set(args.parts or []) - set(todo)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {list(todo)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, spec in todo.items():
        if args.parts and name not in args.parts:
            continue
        print(f"gpu-check: {name} ...", flush=True)
        results.append(run_part(name, spec, args.out))
        r = results[-1]
        print(f"gpu-check: {name}: exit {r['rc']} in {r['seconds']} s", flush=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    found = figures(results)
    report = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(),
        "commit": commit or "unknown",
        "dry_run": args.dry_run,
        "parts": results,
        "figures": found,
        "ratios_to_anchors": {}
        if args.dry_run
        else {k: ratio_to_anchor(k, v) for k, v in found.items() if k in ANCHORS},
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
