"""Profiling on demand: a torch profiler trace of chosen optimizer steps (`log.profile_steps`) on
chosen ranks (`log.profile_ranks`), written to RUN_DIR/profile/rankN.steps_A-B.pt.trace.json.

The trace holds the host (and, on a GPU, the device) activity of those steps, with the model's
modules as named ranges (`nn.Module: Linear_0`, from the Python stacks) and tensor shapes. Open it
in TensorBoard's profiler plugin (`pip install torch-tb-profiler`, then `tensorboard --logdir
RUN_DIR/profile`) or at https://ui.perfetto.dev (drag the file in)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger("mmtrain")


class StepProfiler:
    """Starts before the first chosen step, stops after the last, writes the trace; a no-op on the
    other ranks and when no steps are chosen."""

    def __init__(self, steps: Sequence[int], ranks: Sequence[int], rank: int, run_dir: Path):
        self.first, self.last = (int(steps[0]), int(steps[-1])) if steps else (0, -1)
        self.active = bool(steps) and rank in ranks
        self.rank, self.out = rank, Path(run_dir) / "profile"
        self.prof: Optional[torch.profiler.profile] = None
        self._from = 0  # the step the running trace started at

    def before_step(self, step: int) -> None:
        """`step`: the optimizer step about to run (1-based, as the log counts)."""
        if self.active and self.prof is None and self.first <= step <= self.last:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(
                activities=activities, record_shapes=True, with_stack=True, profile_memory=True
            )
            self.prof.start()
            self._from = step

    def after_step(self, step: int) -> None:
        if self.prof is not None and step >= self.last:
            self._write(step)

    def close(self) -> None:
        """The run ended inside the window (a stop signal): what was recorded is still written."""
        if self.prof is not None:
            self._write(None)

    def _write(self, step: Optional[int]) -> None:
        prof, self.prof = self.prof, None
        prof.stop()
        self.out.mkdir(parents=True, exist_ok=True)
        to = step if step is not None else "end"
        path = self.out / f"rank{self.rank}.steps_{self._from}-{to}.pt.trace.json"
        prof.export_chrome_trace(str(path))
        log.info(
            "profiler trace of steps %s-%s (rank %d): %s (TensorBoard's profiler plugin, or "
            "ui.perfetto.dev)",
            self._from,
            to,
            self.rank,
            path,
        )
