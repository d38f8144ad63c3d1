"""Time to the first training step of Dynamic CoT and KDSL on 2 CPU ranks, at two sizes of the
training split: what a recipe derives from its data before training (a keyphrase vocabulary, a
label set) must not grow with the data. Prints one JSON object.

    python benchmarks/startup.py [--sizes 400 12000] [--out DIR]

For each recipe and size N (training samples): synthetic shards (`mmtrain data synth`, N / 0.8
samples in all), the demo config with tiny models, `train.steps=1`; it reports the seconds from
launching the two ranks to the first step's log line and the bytes each rank had read by then
(/proc/PID/io rchar), and the ratio of the largest size to the smallest.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ranks import REPO, start_ranks

RECIPES = {"dyncot": "keyphrase", "kdsl": "intent"}


def mmtrain(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mmtrain.cli", *args], check=True, cwd=REPO)


def bytes_read(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def first_step(recipe: str, data: Path, models: Path, run: Path) -> dict:
    """Launch 2 ranks, wait for `step 1/` in the run's log, stop them."""
    overrides = [
        f"recipe.model_path={models / 'qwen2vl'}",
        f"recipe.data.train={data / 'train'}",
        f"recipe.data.val={data / 'val'}",
        "train.steps=1",
        "log.every=1",
        "eval.at_end=false",
    ]
    start = time.monotonic()
    procs = start_ranks(REPO / "configs" / "demo" / f"{recipe}.yaml", overrides, run)
    log_file = run / "train.log"
    read = None
    while time.monotonic() - start < 900:
        if any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError(f"{recipe}: a rank failed; logs beside {run}")
        if log_file.is_file() and "INFO step 1/" in log_file.read_text():
            seconds = time.monotonic() - start
            read = [bytes_read(p.pid) for p in procs if p.poll() is None]
            break
        time.sleep(0.05)
    else:
        raise RuntimeError(f"{recipe}: no first step in 900 s")
    for p in procs:
        p.wait(300)
    return {"seconds_to_first_step": round(seconds, 2), "bytes_read_per_rank": read}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[400, 12000])
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="mmtrain-startup-"))
    models = root / "tiny"
    if not (models / "qwen2vl").is_dir():
        mmtrain("models", "tiny", "--out", str(models))
    report = {"world": 2, "device": "cpu", "recipes": {}}
    for recipe, kind in RECIPES.items():
        rows = {}
        for n in args.sizes:
            data = root / f"{kind}-{n}"
            if not data.is_dir():
                mmtrain("data", "synth", "--kind", kind, "--out", str(data), "--n", str(n * 5 // 4))
            rows[n] = first_step(recipe, data, models, root / "runs" / f"{recipe}-{n}")
        lo, hi = min(args.sizes), max(args.sizes)
        rows["ratio"] = round(
            rows[hi]["seconds_to_first_step"] / rows[lo]["seconds_to_first_step"], 3
        )
        report["recipes"][recipe] = rows
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
