"""What a user watches (rank 0): a plain log file, a progress bar with ETA, and the logged scalars
in TensorBoard, in RUN_DIR/metrics.jsonl (always) and in Weights & Biases or MLflow when
`log.backends` asks for them, all through one interface (`MetricsSink`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence

import torch

# dense bf16 tensor-core peak per device, TFLOP/s (vendor spec sheets)
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A6000": 155.0,
    "V100": 125.0,
}


def peak_tflops(configured: Optional[float]) -> Optional[float]:
    if configured:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB (RSS)


class _TqdmSafeHandler(logging.StreamHandler):
    """Writes through tqdm so that log lines do not tear the progress bar."""

    def __init__(self):
        super().__init__(sys.stderr)

    def emit(self, record):
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(run_dir: Path, rank: int, console: bool = True) -> logging.Logger:
    """The "mmtrain" logger: rank 0 to the terminal (INFO, or WARNING without `console`) and to
    run_dir/train.log; other ranks their warnings to the terminal and to run_dir/logs/rankN.log
    (made at the first one). One writer per file: on a shared filesystem two ranks appending to
    one file interleave and can lose lines."""
    log = logging.getLogger("mmtrain")
    log.setLevel(logging.INFO)
    for h in list(log.handlers):  # a run before this one in the same process (a pipeline)
        h.close()
        log.removeHandler(h)
    log.propagate = False
    fmt = logging.Formatter(
        f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"
    )
    stream = _TqdmSafeHandler()
    stream.setFormatter(fmt)
    stream.setLevel(logging.INFO if rank == 0 and console else logging.WARNING)
    log.addHandler(stream)
    if rank == 0:
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setLevel(logging.INFO)
    else:
        (run_dir / "logs").mkdir(exist_ok=True)
        fh = logging.FileHandler(run_dir / "logs" / f"rank{rank:05d}.log", delay=True)
        fh.setLevel(logging.WARNING)
    fh.setFormatter(fmt)
    log.addHandler(fh)
    return log


class MetricsSink(Protocol):
    """Where logged scalars go besides TensorBoard: one call per log step, one at the end."""

    def scalars(self, step: int, values: Dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlMetrics:
    """RUN_DIR/metrics.jsonl: one line per logged step, `{"step", "time", tag: value, ...}`, for
    pandas or a spreadsheet (`pd.read_json(path, lines=True)`). A resumed run first drops the
    lines past its checkpoint, as TensorBoard's purge does, so no step appears twice."""

    def __init__(self, path: Path, start_step: int):
        if start_step and path.is_file():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step
            ]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self.file = open(path, "a")

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        row = {"step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _stable_id(run_dir: Path) -> str:
    """One id per run directory: a resumed run continues the same W&B / MLflow run."""
    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]


class WandbMetrics:
    """Weights & Biases (`log.backends: [wandb]`): project from WANDB_PROJECT (default mmtrain),
    the run named as the run directory, resumed across requeues; offline with WANDB_MODE=offline."""

    def __init__(self, run_dir: Path, name: str, config: Dict[str, Any]):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "mmtrain"),
            name=name,
            id=_stable_id(run_dir),
            resume="allow",
            dir=str(run_dir),
            config=config,
        )

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowMetrics:
    """MLflow (`log.backends: [mlflow]`): MLFLOW_TRACKING_URI (default RUN_DIR/mlruns, a local
    store), experiment MLFLOW_EXPERIMENT_NAME (default mmtrain), the config as parameters."""

    def __init__(self, run_dir: Path, name: str, config: Dict[str, Any]):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(
            os.environ.get("MLFLOW_TRACKING_URI", (run_dir / "mlruns").resolve().as_uri())
        )
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "mmtrain"))
        mlflow.start_run(run_name=name, tags={"mmtrain.run_id": _stable_id(run_dir)})
        mlflow.log_params({k: str(v)[:250] for k, v in _flat(config).items()})

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flat(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


BACKENDS = {"wandb": WandbMetrics, "mlflow": MlflowMetrics}


class Monitor:
    """Rank 0 writes; other ranks make the same calls and nothing happens."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        total_steps: int,
        start_step: int,
        tensorboard: bool,
        progress: bool,
        backends: Sequence[str] = (),
        config: Optional[Dict[str, Any]] = None,
    ):
        self.active = rank == 0
        self.writer = None
        self.bar = None
        self.sinks: List[MetricsSink] = []
        if not self.active:
            return
        self.sinks.append(JsonlMetrics(run_dir / "metrics.jsonl", start_step))
        for name in backends:
            self.sinks.append(BACKENDS[name](run_dir, run_dir.name, config or {}))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops what a dead run logged past its checkpoint (no step shown twice)
            self.writer = SummaryWriter(
                str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
            )
        self._last = time.perf_counter()

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        for sink in self.sinks:
            sink.scalars(step, values)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        if self.writer:
            self.writer.add_image(tag, img, step)

    def advance(self, n: int, postfix: Optional[Dict[str, float]] = None) -> None:
        if self.bar:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        if self.bar:
            self.bar.close()
        if self.writer:
            self.writer.flush()
            self.writer.close()
