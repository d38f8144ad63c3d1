"""What a user watches: TensorBoard scalars, a plain log file, a progress bar with ETA (rank 0)."""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path
from typing import Dict, Optional

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
    ):
        self.active = rank == 0
        self.writer = None
        self.bar = None
        if not self.active:
            return
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

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        if self.writer:
            self.writer.add_image(tag, img, step)

    def advance(self, n: int, postfix: Optional[Dict[str, float]] = None) -> None:
        if self.bar:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.writer:
            self.writer.flush()
            self.writer.close()
