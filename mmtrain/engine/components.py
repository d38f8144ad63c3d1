"""The trainer's components. Each decides whether to act at a step and acts; none knows DeepSpeed
or the method being trained, so each is tested on its own, without ranks (tests/unit).

- `BadStepGuard`: non-finite losses and skipped (overflowing) optimizer steps; stops the run
  after `train.max_bad_steps` in a row.
- `MetricsAccumulator`: sums what each micro-batch reports, and at log steps reduces it over
  ranks into the logged scalars (losses, throughput, MFU, data counts).
- `Checkpointer`: when to save, and the best checkpoint by a validation metric.
- `StopPolicy`: a stop signal (Slurm's warning before a time limit) or `run.stop_after_steps`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from mmtrain.engine import checkpoint
from mmtrain.engine.monitor import peak_tflops
from mmtrain.recipes.base import StepOutput

log = logging.getLogger("mmtrain")
AllReduce = Callable[[torch.Tensor], torch.Tensor]


class TooManyBadSteps(RuntimeError):
    pass


class BadStepGuard:
    """Counts bad micro-batches (a non-finite loss on any rank: skipped, replaced by the next) and
    bad optimizer steps (DeepSpeed skipped the update: the gradients overflowed)."""

    def __init__(self, max_bad: int, lr: float):
        self.max_bad = max_bad
        self.lr = lr
        self.consecutive = 0  # bad in a row, reset by an applied optimizer step
        self.total = 0  # over the whole run (kept in the checkpoint)

    @classmethod
    def of(cls, train) -> BadStepGuard:
        """From the `train` section (max_bad_steps; lr, named when gradients overflow)."""
        return cls(train.max_bad_steps, train.lr)

    def bad_micro_batch(
        self, step: int, losses: Dict[str, torch.Tensor], what: str = "micro-batch skipped"
    ) -> None:
        self.consecutive += 1
        self.total += 1
        values = {k: float(v.detach()) for k, v in losses.items()}
        log.warning(
            "non-finite loss at step %d (%s); %s (%d in a row)",
            step,
            values,
            what,
            self.consecutive,
        )
        if self.consecutive >= self.max_bad:
            raise TooManyBadSteps(
                f"{self.consecutive} consecutive non-finite losses (train.max_bad_steps="
                f"{self.max_bad}) at step {step}: lower train.lr, check the data, or use "
                f"deepspeed.precision=fp32 to find the source"
            )

    def optimizer_step(self, step: int, applied: bool, grad_norm: Any) -> None:
        if applied:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        log.warning(
            "optimizer step %d skipped: non-finite gradients (norm %s) (%d bad in a row)",
            step,
            grad_norm,
            self.consecutive,
        )
        if self.consecutive >= self.max_bad:
            raise TooManyBadSteps(
                f"{self.consecutive} consecutive skipped optimizer steps, the gradients "
                f"overflowing (train.max_bad_steps={self.max_bad}) at step {step}: lower "
                f"train.lr (now {self.lr:g}), keep train.grad_clip on, or use "
                f"deepspeed.precision=fp32 to find the source"
            )


@dataclass
class _Sums:
    # loss/..., stats/...: tensors on the device or numbers, read at log steps only
    values: Dict[str, Any] = field(default_factory=dict)
    micro: int = 0
    samples: Any = 0.0
    tokens: Any = 0.0
    flops: Any = 0.0


def _detached(v: Any) -> Any:
    """A one-element tensor as a 0-d float64 one on its device; a number as a float."""
    return v.detach().to(torch.float64).reshape(()) if isinstance(v, torch.Tensor) else float(v)


class MetricsAccumulator:
    """Per-micro-batch sums since the last log line, reduced over ranks at log steps. What the
    recipe reports as tensors stays on the device until then (no host sync per micro-batch)."""

    def __init__(
        self,
        every: int,
        total_steps: int,
        world_size: int,
        all_reduce_sum: AllReduce,
        flops_per_sample: Optional[float] = None,
        peak_tflops: Optional[float] = None,
    ):
        self.every = every
        self.total_steps = total_steps
        self.world = world_size
        self.all_reduce_sum = all_reduce_sum
        self.flops_per_sample = flops_per_sample
        self.peak = peak_tflops
        self.sums = _Sums()
        self.steps = 0  # optimizer steps since the last log line
        self.t0 = time.perf_counter()

    @classmethod
    def of(cls, log_section, total_steps: int, world_size: int, all_reduce_sum, recipe):
        """From the `log` section (every, peak_tflops) and the recipe's FLOPs per sample."""
        return cls(
            log_section.every,
            total_steps,
            world_size,
            all_reduce_sum,
            recipe.flops_per_sample(),
            peak_tflops(log_section.peak_tflops),
        )

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def add(self, total: torch.Tensor, losses: Dict[str, torch.Tensor], out: StepOutput) -> None:
        """One good micro-batch: its losses (this rank's shares), stats and counts."""
        named = {"loss/total": total, **{f"loss/{k}": v for k, v in losses.items()}}
        named.update({f"stats/{k}": v for k, v in out.stats.items()})
        for k, v in named.items():
            self.sums.values[k] = self.sums.values.get(k, 0.0) + _detached(v)
        s = self.sums
        s.micro += 1
        s.samples = s.samples + _detached(out.samples)
        s.tokens = s.tokens + _detached(out.tokens)
        per_sample = (self.flops_per_sample or 0.0) * out.samples
        s.flops = s.flops + _detached(out.flops if out.flops is not None else per_sample)

    def step_done(self) -> None:
        self.steps += 1

    def reduce(self) -> Dict[str, float]:
        """Collective: the means over every rank's micro-batches since the last call, and the
        throughput over that time; then starts counting again. One host read."""
        s, keys = self.sums, sorted(self.sums.values)
        local = [s.values[k] for k in keys] + [s.micro, s.samples, s.tokens, s.flops]
        devices = [v.device for v in local if isinstance(v, torch.Tensor)]
        device = devices[0] if devices else torch.device("cpu")
        local = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in local])
        reduced = self.all_reduce_sum(local).tolist()
        micro, samples, tokens, flops = reduced[len(keys) :]
        elapsed = time.perf_counter() - self.t0
        values = {k: v / micro for k, v in zip(keys, reduced)}
        values.update(
            {
                "train/step_time_s": elapsed / max(1, self.steps),
                "train/samples_per_s": samples / elapsed,
                "train/tokens_per_s": tokens / elapsed,
            }
        )
        if flops and self.peak:
            tflops = flops / elapsed / self.world / 1e12
            values.update({"train/tflops_per_device": tflops, "train/mfu": tflops / self.peak})
        self.sums = _Sums()
        self.steps = 0
        self.t0 = time.perf_counter()
        return values


def suggested_signal_lead(save_s: float) -> int:
    """Seconds of warning before the time limit that leave room for a save of `save_s` seconds:
    twice it (the save may start just after a step or an evaluation batch began), plus a minute
    for that step or batch and the exit."""
    return math.ceil(2 * save_s + 60)


class Checkpointer:
    """Saves on schedule (`checkpoint.every`), at the end, and when a validation metric improves
    (`checkpoint.best_metric`: checkpoints/best names that checkpoint, best.json says why).
    `write(step)` saves everything at `step` (collective) and returns the directory."""

    def __init__(
        self,
        root: Path,
        every: int,
        total_steps: int,
        best_metric: str,
        best_mode: str,
        is_main: bool,
        write: Callable[[int], Path],
        signal_lead_s: float = 180,
    ):
        self.root = root
        self.every = every
        self.total_steps = total_steps
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.is_main = is_main
        self.write = write
        self.signal_lead_s = signal_lead_s
        self.last_save = -1
        self.best: Optional[float] = None

    @classmethod
    def of(cls, section, root: Path, total_steps: int, is_main: bool, write, signal_lead_s: float):
        """From the `checkpoint` section (every, best_metric, best_mode)."""
        c = section
        return cls(
            root, c.every, total_steps, c.best_metric, c.best_mode, is_main, write, signal_lead_s
        )

    def resumed(self, step: int) -> None:
        """Resumed from the checkpoint of `step`: it exists; the best so far is in best.json."""
        self.last_save = step
        info = self.root / "best.json"
        if self.best_metric and info.is_file():
            self.best = json.loads(info.read_text()).get(self.best_metric)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step < self.total_steps

    def save(self, step: int) -> None:
        started = time.monotonic()
        path = self.write(step)
        self.last_save = step
        took = time.monotonic() - started
        log.info("checkpoint saved: %s (%.1f s)", path, took)
        if took > self.signal_lead_s / 2:
            log.warning(
                "that save took %.0f s, more than half of the %d s between the stop signal and "
                "the time limit (run.signal_lead_s): a save after a late signal may not finish; "
                "ask for the signal earlier (sbatch --signal=B:USR1@%d) and set "
                "run.signal_lead_s to match",
                took,
                self.signal_lead_s,
                suggested_signal_lead(took),
            )

    def save_unless_saved(self, step: int) -> None:
        if self.last_save != step:
            self.save(step)

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.best_mode == "min" else value > self.best

    def consider(self, step: int, metrics: Dict[str, Any]) -> None:
        """Model selection: a better `best_metric` saves (if not saved at this step) and marks."""
        name = self.best_metric
        if not name or name not in metrics or not self._better(metrics[name]):
            return
        self.best = metrics[name]
        self.save_unless_saved(step)
        if self.is_main:
            checkpoint.mark_best(self.root, step, name, self.best)
        log.info("best %s so far: %.6g at step %d (checkpoints/best)", name, self.best, step)


class StopPolicy:
    """Whether to stop after a step: a stop signal on any rank (checkpoint, exit for requeue), or
    `run.stop_after_steps` reached before the end (checkpoint, exit 0)."""

    def __init__(
        self,
        signalled: Callable[[], bool],
        stop_after_steps: Optional[int],
        total_steps: int,
        any_rank: Callable[[bool], bool],
    ):
        self.signalled = signalled
        self.any_rank = any_rank
        self.stop_after = stop_after_steps
        self.total_steps = total_steps
        self.heard_at_step = False  # a signal on any rank, as read with the last step's flags

    def signal(self) -> bool:
        """Collective: a stop signal reached any rank."""
        return self.any_rank(self.signalled())

    def heard(self, any_rank: bool) -> None:
        """The training step read the stop flag with its own (one host sync for both)."""
        self.heard_at_step = any_rank

    def split_here(self, step: int) -> bool:
        return bool(self.stop_after) and self.stop_after <= step < self.total_steps
