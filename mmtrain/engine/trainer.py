"""The one training loop. It knows DeepSpeed, checkpoints and logging; it never knows the method.

`recipe.step(model, batch)` gives named losses; the engine weights and sums them
(engine/losses.py), skips non-finite micro-batches, backpropagates, steps, logs, evaluates and
checkpoints on schedule, and answers Slurm's SIGTERM/SIGUSR1 by checkpointing and exiting with
REQUEUE_EXIT_CODE (engine/signals.py). Each of those decisions belongs to one component of
engine/components.py; `Trainer.train` only says in which order they are asked.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, Tuple

import torch

from mmtrain.config import Config
from mmtrain.engine import checkpoint, dist, signals
from mmtrain.engine.components import Checkpointer, TooManyBadSteps
from mmtrain.engine.losses import Part, combine, settle
from mmtrain.engine.monitor import Monitor, peak_memory_gib
from mmtrain.engine.run import Lifeline, Run, build_run, resolved_config
from mmtrain.engine.syncs import SyncCounter
from mmtrain.parallelize import clear_zero3_gradients
from mmtrain.recipes.base import EvalResult, EvaluationStopped, StepOutput

REQUEUE_EXIT_CODE = 85  # slurm/train.sbatch turns this into `scontrol requeue`

__all__ = ["REQUEUE_EXIT_CODE", "TooManyBadSteps", "Trainer", "train", "train_run"]


def train(cfg: Config) -> int:
    return train_run(cfg)[0]


def train_run(cfg: Config) -> Tuple[int, bool]:
    """Build the run and train it: (exit code, whether every step trained). The run directory's
    lock and the heartbeat are let go however it ends (`Lifeline`)."""
    with Lifeline(cfg.run_dir) as lifeline:
        trainer = Trainer(build_run(cfg, lifeline))
        return trainer.train(), trainer.finished


class Trainer:
    """Trains a built `Run`: its state is what __init__ declares, its parts are the run's."""

    def __init__(self, run: Run):
        cfg, env = run.cfg, run.env
        self.cfg = cfg
        self.env = env
        self.log = run.log
        self.run_dir = cfg.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        self.recipe = run.recipe
        self.engine = run.engine
        self.gate = run.gate
        self.data = run.data
        self.heartbeat = run.heartbeat
        self.stop = run.stop
        self.guard = run.guard
        self.metrics = run.metrics
        self.profiler = run.profiler
        self.reshard = run.reshard  # the checkpoint was written by another number of ranks
        self.checkpointer = Checkpointer.of(
            cfg.checkpoint,
            self.ckpt_root,
            cfg.train.steps,
            env.is_main,
            self._write_checkpoint,
            cfg.run.signal_lead_s,
        )
        self.step = 0
        self.finished = False  # every step trained (not stopped early by a signal or a split)
        self.eval_pending = False  # an evaluation at self.step that a stop signal interrupted
        self.steady = False  # this process's first step done (dist.step_timeout_s applies)
        self.shown_loss = float("nan")  # on the progress bar: the last logged loss/total
        self.syncs_per_step: list = []  # each non-log step's count since the last log line
        if run.found:
            self._resume(*run.found)
        self.epoch = self.data.epoch  # the data's epoch the recipe last heard of (on_epoch_end)
        self.monitor = Monitor(
            self.run_dir,
            env.rank,
            cfg.train.steps,
            self.step,
            cfg.log.tensorboard,
            cfg.log.progress,
            cfg.log.backends,
            resolved_config(cfg, env),
        )
        self.engine.train()
        # with log.count_host_syncs: each step's host syncs, counted
        self.syncs = SyncCounter().install() if cfg.log.count_host_syncs else None

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> int:
        cfg, stop = self.cfg, self.stop
        try:
            if stop.signal():  # a signal while starting up
                return self._requeue()
            if self.eval_pending and self.step < cfg.train.steps and not self._evaluate():
                return self._requeue()  # the evaluation a stop interrupted, stopped again
            while self.step < cfg.train.steps:
                self.profiler.before_step(self.step + 1)
                grad_norm, lr = self._optimizer_step()
                self.profiler.after_step(self.step)
                if self.metrics.due(self.step):
                    self._log(grad_norm, lr)
                elif self.syncs is not None:
                    self.syncs_per_step.append(self.syncs.take())
                if self._eval_due() and not self._evaluate():
                    return self._requeue()
                if stop.heard_at_step:  # read with the step's flags (_read_step_flags)
                    return self._requeue()
                if stop.split_here(self.step):
                    self.log.info(
                        "run.stop_after_steps=%d reached: checkpointing and stopping",
                        cfg.run.stop_after_steps,
                    )
                    self.checkpointer.save(self.step)
                    return 0
                if self.checkpointer.due(self.step):
                    self.checkpointer.save(self.step)
                if self.syncs is not None:
                    self.syncs.take()  # a log line, an evaluation, a save: not the step's
            self.checkpointer.save_unless_saved(self.step)
            self.finished = True
            if cfg.eval.at_end and not self._evaluate():
                return self._requeue()
            self.log.info(
                "done: %d steps; checkpoints in %s; TensorBoard logs in %s",
                self.step,
                self.ckpt_root.resolve(),
                (self.run_dir / "tensorboard").resolve(),
            )
            return 0
        finally:
            if self.syncs is not None:
                self.syncs.uninstall()
            self.profiler.close()
            self.monitor.close()
            self.data.close()  # its workers now: left to the garbage collector, each costs 5 s

    def _optimizer_step(self):
        """grad_accum good micro-batches, then one update.

        Whether a micro-batch (or a part) is finite is decided on the device, on every rank alike
        (`combine`); a non-finite one's gradients are zeroed by the gate as they are made. The host
        reads those flags once, together with the stop flag, before the update: the step's one
        sync. A non-finite micro-batch is then counted and replaced by the next (checked the same
        way); a non-finite part of a several-part micro-batch is dropped, the micro-batch counts."""
        clear_zero3_gradients(self.engine)
        want, last = self.cfg.train.grad_accum, None
        while want:
            done = [self._micro_batch(self._next_batch()) for _ in range(want)]
            stop, *bad = self._read_step_flags([part.bad for parts in done for part in parts])
            kept, dropped, want = settle(done, bad)
            for losses, what in dropped:
                self.guard.bad_micro_batch(self.step + 1, losses, what)
            for last in kept:
                self.metrics.add(*last)
        self.stop.heard(stop)
        self.engine.step()
        self.step += 1
        self.heartbeat.beat(self.step)
        if not self.steady:
            self._steady_timeout()
        self.metrics.step_done()
        self.recipe.on_step_end()
        grad_norm = self.engine.get_global_grad_norm()
        self.guard.optimizer_step(self.step, self.engine.was_step_applied(), grad_norm)
        lr = self.engine.get_lr()[0]
        self._show(last[2] if last else StepOutput(losses={}), lr)
        return grad_norm, lr

    def _steady_timeout(self) -> None:
        """After this process's first step: the shorter collective timeout of a running job."""
        self.steady = True
        d = self.cfg.dist
        if (
            d.step_timeout_s
            and d.step_timeout_s != d.timeout_s
            and dist.set_timeout(d.step_timeout_s)
        ):
            self.heartbeat.timeout_now(d.step_timeout_s, "dist.step_timeout_s")
            self.log.info(
                "collective timeout from the first step on: dist.step_timeout_s=%d s "
                "(dist.timeout_s=%d s while starting)",
                d.step_timeout_s,
                d.timeout_s,
            )

    def _next_batch(self):
        batch = next(self.data)
        self._watch_epoch()
        return batch

    def _read_step_flags(self, flags):
        """The step's one host sync: (a stop signal on any rank, then each part's non-finite flag);
        one all-reduce (the stop flag) and one read of both."""
        signalled = torch.tensor([float(self.stop.signalled())], device=self.env.device)
        stop = dist.all_reduce_sum(signalled)
        values = torch.cat([stop, torch.stack(flags).to(stop.device, stop.dtype)]).tolist()
        return [values[0] > 0, *(v > 0 for v in values[1:])]

    def _micro_batch(self, batch):
        """Forward and backward of one micro-batch, part by part (`Recipe.step_parts`: each part
        backpropagated before the next is built). Returns its parts; a non-finite part's
        gradients are zeroed by the gate as they are made."""
        parts = self.recipe.backward_parts
        done = []
        for out in self.recipe.step_parts(self.engine, batch):
            total, losses, bad = combine(
                out.losses,
                self.recipe.loss_weight,
                dist.all_reduce_sum,
                self.env.world_size,
                self.env.device,
            )
            self.gate.open = ~bad
            # DeepSpeed divides by its accumulation steps, grad_accum x parts
            self.engine.backward(total * parts)
            done.append(Part(total.detach(), losses, out, bad))
        self.gate.open = None
        if len(done) != parts:
            raise RuntimeError(
                f"{type(self.recipe).__name__}.step_parts gave {len(done)} parts for a "
                f"micro-batch; its backward_parts declares {parts}"
            )
        return done

    def _eval_due(self) -> bool:
        every = self.cfg.eval.every
        return bool(every) and self.step % every == 0 and self.step < self.cfg.train.steps

    def _watch_epoch(self) -> None:
        """The recipe hears of a new epoch before it trains on the epoch's first micro-batch
        (called after the micro-batch is drawn, before it is trained on)."""
        if self.data.epoch != self.epoch:
            self.recipe.on_epoch_end(self.epoch, self.data.epoch)
            self.epoch = self.data.epoch

    def _show(self, out: StepOutput, lr: float) -> None:
        """The progress bar (the loss as of the last log line: reading this step's would cost a
        host sync) and this step's images."""
        self.monitor.advance(1, {"loss": self.shown_loss, "lr": lr})
        for tag, img in out.images.items():
            self.monitor.image(f"images/{tag}", img, self.step)

    def _log(self, grad_norm: Any, lr: float) -> None:
        """Collective: the scalars since the last log line, to TensorBoard and train.log."""
        values = self.metrics.reduce()
        self.shown_loss = values.get("loss/total", self.shown_loss)
        values.update(
            {
                "train/lr": lr,
                "train/peak_memory_gib": peak_memory_gib(self.env.device),
                "train/bad_steps": self.guard.total,
            }
        )
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        counts = self.data.stats()  # cumulative, summed over ranks
        if counts:
            totals = dist.all_reduce_sum(torch.tensor(list(counts.values()), dtype=torch.float64))
            values.update({f"data/{k}": v for k, v in zip(counts, totals.tolist())})
        values["train/epoch"] = self.data.epoch
        if self.syncs is not None and self.syncs_per_step:
            values["train/host_syncs_per_step"] = max(own for own, _ in self.syncs_per_step)
        self.monitor.scalars(self.step, values)
        line = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        self.log.info("step %d/%d %s", self.step, self.cfg.train.steps, line)
        if self.syncs is not None:
            self.log.info(
                "host syncs in each step since the last log line (log steps left out), as "
                "(mmtrain's, the libraries'): %s",
                self.syncs_per_step,
            )
            self.log.info("where (file:line, calls): %s", self.syncs.take_sites())
            self.syncs_per_step = []

    def _evaluate(self) -> bool:
        """Evaluate at this step; False if a stop signal interrupted it (between two of its
        batches), which leaves it pending: redone at this step after the requeue."""
        self.heartbeat.beat(self.step, "evaluating")
        self.log.info("evaluating at step %d", self.step)
        self.engine.eval()
        started = time.monotonic()
        try:
            result: EvalResult = self.recipe.evaluate(self.engine)
        except EvaluationStopped:
            self.eval_pending = True
            self.log.warning(
                "stop signal during the evaluation at step %d (%.1f s into it): it is redone "
                "after the requeue",
                self.step,
                time.monotonic() - started,
            )
            return False
        finally:
            self.engine.train()
        self.eval_pending = False
        for k, img in result.images.items():
            self.monitor.image(f"eval/{k}", img, self.step)
        metrics = result.metrics
        if metrics:
            numbers = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.monitor.scalars(self.step, numbers)
            self.log.info("eval at step %d: %s", self.step, json.dumps(metrics))
            if self.env.is_main:
                with open(self.run_dir / "eval.jsonl", "a") as f:
                    f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        self.checkpointer.consider(self.step, metrics)
        return True

    def _requeue(self) -> int:
        self.log.warning(
            "stop signal received: checkpointing at step %d, exiting for requeue", self.step
        )
        self.checkpointer.save_unless_saved(self.step)
        signals.current().ignore_further()
        return REQUEUE_EXIT_CODE

    # -- what a checkpoint holds beyond DeepSpeed's state -------------------------------------
    def _rank_state(self) -> Dict[str, Any]:
        return {
            "step": self.step,
            "bad_total": self.guard.total,
            "eval_pending": self.eval_pending,
            "data": self.data.state_dict(),
            "rng": checkpoint.rng_state(),
            "recipe": self.recipe.state_dict(),
        }

    def _write_checkpoint(self, step: int):
        self.heartbeat.beat(self.step, "saving a checkpoint")
        info = {"world_size": self.env.world_size, "recipe": self.cfg.recipe.name}
        return checkpoint.save(
            self.engine,
            self.ckpt_root,
            step,
            self.env.rank,
            self._rank_state(),
            info,
            self.cfg.checkpoint.keep,
            {"recipe": self.recipe.shared_state_dict()},
        )

    # -- resume ------------------------------------------------------------------------------
    def _resume(self, root, tag: str) -> None:
        env = self.env
        states = checkpoint.load(self.engine, root, tag, env.rank, env.world_size)
        shared = checkpoint.read_shared_state(root / tag).get("recipe") or {}
        self.step, self.guard.total = states[0]["step"], states[0]["bad_total"]
        self.eval_pending = states[0].get("eval_pending", False)
        if not self.reshard:
            self.data.load_state_dict(states[0]["data"])
            self.recipe.load_state_dict({**shared, **(states[0].get("recipe") or {})})
            checkpoint.set_rng_state(states[0]["rng"])
        else:
            self._reshard(states, shared)
        self.checkpointer.resumed(self.step)
        self.log.info("resumed from %s at step %d", root / tag, self.step)

    def _reshard(self, states, shared) -> None:
        env = self.env
        data = self.data.reshard_state([st["data"] for st in states], env.rank, env.world_size)
        self.data.load_state_dict(data)
        recipe_states = [st.get("recipe") or {} for st in states]
        own = self.recipe.reshard_state(recipe_states, env.rank, env.world_size)
        self.recipe.load_state_dict({**shared, **own})
        if env.rank < len(states):  # new ranks keep the fresh streams seeded above
            checkpoint.set_rng_state(states[env.rank]["rng"])
        self.log.info(
            "checkpoint written by %d ranks, resumed on %d (DeepSpeed universal checkpoint)",
            len(states),
            env.world_size,
        )
