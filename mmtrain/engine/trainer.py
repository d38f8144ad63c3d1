"""The one training loop. It knows DeepSpeed, checkpoints and logging; it never knows the method.

`recipe.step(model, batch)` gives named losses; the engine weights and sums them
(engine/losses.py), skips non-finite micro-batches, backpropagates, steps, logs, evaluates and
checkpoints on schedule, and answers Slurm's SIGTERM/SIGUSR1 by checkpointing and exiting with
REQUEUE_EXIT_CODE (engine/signals.py). Each of those decisions belongs to one component of
engine/components.py; `Trainer.train` only says in which order they are asked.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml

from mmtrain.config import Config, plan_global_batch, save_config, to_yaml
from mmtrain.engine import checkpoint, dist, signals
from mmtrain.engine.build import (
    DTYPES,
    build_model,
    build_recipe,
    partitioned_loading,
    seed_all,
)
from mmtrain.engine.components import (
    BadStepGuard,
    Checkpointer,
    MetricsAccumulator,
    StopPolicy,
    TooManyBadSteps,
)
from mmtrain.engine.heartbeat import Heartbeat, PeerLost, is_comm_error
from mmtrain.engine.losses import GradientGate, Part, combine, settle
from mmtrain.engine.monitor import Monitor, peak_memory_gib, peak_tflops, setup_logging
from mmtrain.engine.optim import (
    choose_zero_stage,
    deepspeed_config,
    param_groups,
    scheduler_factory,
    widest_hidden_size,
)
from mmtrain.engine.profiler import StepProfiler
from mmtrain.engine.runlock import RunDirBusy, RunLock
from mmtrain.engine.syncs import SyncCounter
from mmtrain.parallelize import (
    checkpoint_activations,
    clear_zero3_gradients,
    numel,
    partition_summary,
)
from mmtrain.recipes.base import DataStream, EvalResult, EvaluationStopped, Recipe, StepOutput

REQUEUE_EXIT_CODE = 85  # slurm/train.sbatch turns this into `scontrol requeue`

__all__ = ["REQUEUE_EXIT_CODE", "TooManyBadSteps", "Trainer", "train"]


def train(cfg: Config) -> int:
    return Trainer(cfg).train()


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        self.step = 0
        self.finished = False  # every step trained (not stopped early by a signal or a split)
        self.eval_pending = False  # an evaluation at self.step that a stop signal interrupted
        self.heartbeat = None  # started once the process group is (_start)
        self.lock = RunLock(self.run_dir)  # held by rank 0 while the run lives
        self.syncs = None  # a SyncCounter with log.count_host_syncs
        self.syncs_per_step: list = []  # each non-log step's count since the last log line
        self.shown_loss = float("nan")  # on the progress bar: the last logged loss/total
        self.steady = False  # this process's first step done (dist.step_timeout_s applies)
        # The run's parts, made once by _start (in this order) and never replaced after:
        self.found: Optional[tuple] = None  # (checkpoint root, tag) to resume from
        self.passed_over: List[str] = []  # damaged checkpoints resume=auto skipped (logged)
        self.env: Optional[dist.DistEnv] = None  # rank, world size, device
        self.log: Optional[logging.Logger] = None  # train.log (rank 0) and the terminal
        self.recipe: Optional[Recipe] = None
        self.engine = None  # DeepSpeed's engine around the recipe's model
        self.reshard = False  # the checkpoint was written by another number of ranks
        self.gate: Optional[GradientGate] = None  # zeroes a non-finite micro-batch's gradients
        self.data: Optional[DataStream] = None
        self.guard: Optional[BadStepGuard] = None
        self.metrics: Optional[MetricsAccumulator] = None
        self.checkpointer: Optional[Checkpointer] = None
        self.stop: Optional[StopPolicy] = None
        self.epoch = 0  # the data's epoch the recipe last heard of (on_epoch_end)
        self.monitor: Optional[Monitor] = None
        self.profiler: Optional[StepProfiler] = None

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> int:
        try:
            self._start()
            return self._loop()
        except BaseException as e:
            if self.heartbeat is not None and is_comm_error(e):
                raise PeerLost(self.heartbeat.explain(e)) from e
            raise
        finally:
            if self.heartbeat is not None:
                self.heartbeat.stop()
            self.lock.release()

    def _loop(self) -> int:
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

    # -- start-up ----------------------------------------------------------------------------
    def _start(self) -> None:
        """Process group, run directory, recipe, model under DeepSpeed, data, components, resume."""
        self.found, self.passed_over = self._find_resume()
        found = self.found
        d = self.cfg.dist
        self.env = env = dist.init(d.backend, d.timeout_s, d.socket_ifname, d.solo_timeout_s)
        # the global batch decided once, for this number of ranks (train.global_batch_size)
        self.cfg.train.grad_accum = plan_global_batch(self.cfg.train, env.world_size)
        self._prepare_run_dir()
        self.heartbeat = Heartbeat(
            env.rank, env.world_size, d.heartbeat_s, d.late_after_s, d.timeout_s
        )
        self.heartbeat.start(dist.gather_objects)
        self._build()
        seed_all(self.cfg.run.seed + 1 + env.rank)  # per-rank streams for dropout, masking, ...
        self._components()
        if found:
            self._resume(*found)
        self.epoch = self.data.epoch
        self.monitor = Monitor(
            self.run_dir,
            env.rank,
            self.cfg.train.steps,
            self.step,
            self.cfg.log.tensorboard,
            self.cfg.log.progress,
            self.cfg.log.backends,
            # the resolved config, for W&B / MLflow: made only where one of them will read it
            yaml.safe_load(to_yaml(self.cfg)) if self.cfg.log.backends and env.rank == 0 else None,
        )
        self.profiler = StepProfiler(
            self.cfg.log.profile_steps, self.cfg.log.profile_ranks, env.rank, self.run_dir
        )
        self.engine.train()
        if self.cfg.log.count_host_syncs:
            self.syncs = SyncCounter().install()

    def _find_resume(self) -> Tuple[Optional[tuple], List[str]]:
        """(checkpoint root and tag to resume from, or None; the damaged checkpoints passed over)."""
        cfg = self.cfg
        if cfg.run.resume == "never" and checkpoint.step_dirs(self.ckpt_root):
            raise FileExistsError(
                f"{self.run_dir} already holds checkpoints and run.resume=never would write over "
                f"them: choose a new run.name, or run.resume=auto to continue"
            )
        passed_over: List[str] = []
        found = checkpoint.find_resume(cfg.run.resume, self.ckpt_root, passed_over)
        if found:
            checkpoint.check_recipe(*found, cfg.recipe.name)
        return found, passed_over

    def _prepare_run_dir(self) -> None:
        env = self.env
        # one live run per directory: taken before anything is written (a live run's partial
        # save is not this run's to clean up)
        busy = dist.gather_objects(self.lock.acquire() if env.is_main else None)[0]
        if busy:
            raise RunDirBusy(
                f"{self.run_dir} belongs to a run that is still going ({busy}): wait for it to "
                f"end, stop it, or choose another run.name"
            )
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            checkpoint.clean_partials(self.ckpt_root)
        dist.barrier()
        self.log = setup_logging(self.run_dir, env.rank, self.cfg.log.console)
        tr = self.cfg.train
        self.log.info(
            "run directory: %s (world size %d, device %s; global batch %d = micro-batch %d x "
            "grad_accum %d x %d ranks)\nresolved config:\n%s",
            self.run_dir.resolve(),
            env.world_size,
            env.device,
            tr.micro_batch_size * tr.grad_accum * env.world_size,
            tr.micro_batch_size,
            tr.grad_accum,
            env.world_size,
            to_yaml(self.cfg),
        )
        for note in self.passed_over:
            self.log.warning(note)

    def _build(self) -> None:
        import deepspeed

        # torch warns on every ZeRO-3 collective that DeepSpeed still calls by its old name
        warnings.filterwarnings(
            "ignore",
            message=r".*is deprecated. Please use `torch.distributed",
            category=FutureWarning,
        )
        cfg, env = self.cfg, self.env
        on_cuda = env.device.type == "cuda"
        # A DeepSpeed config comes first: under ZeRO-3 the recipe loads its large models into
        # it. With zero_stage auto the model is built whole and counted, then the stage chosen.
        # The final config follows the model (auto sizes read its hidden size).
        auto = str(cfg.deepspeed.zero_stage) == "auto"
        loading = None if auto else deepspeed_config(cfg, env.world_size, on_cuda, built=False)
        self.recipe = build_recipe(
            cfg,
            env,
            DTYPES[cfg.deepspeed.precision],
            partitioned=partitioned_loading(cfg, loading),
            stop_requested=lambda: self.stop.signal(),  # (the StopPolicy is made below)
        )
        model = build_model(self.recipe, cfg.run.seed)
        if cfg.train.activation_checkpointing:
            self._checkpoint_activations(model)
        n_all, n_train = self._log_model_size(model)
        stage = self._auto_stage(n_all, n_train) if auto else None
        ds_conf = deepspeed_config(
            cfg,
            env.world_size,
            on_cuda,
            stage,
            widest_hidden_size(model),
            parts=self.recipe.backward_parts,
        )
        found = self.found
        self.reshard = bool(found) and checkpoint.saved_world(*found) != env.world_size
        if self.reshard:  # written by another number of ranks: its universal form
            ds_conf["checkpoint"] = {**ds_conf.get("checkpoint", {}), "load_universal": True}
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            config=ds_conf,
            model_parameters=param_groups(model, cfg.train.weight_decay),
            lr_scheduler=scheduler_factory(cfg),
        )
        self.gate = GradientGate(model.parameters())
        if ds_conf["zero_optimization"]["stage"] == 3:
            self._log_partitions(model, ds_conf)
        self.data = self.recipe.build_data()
        if not isinstance(self.data, DataStream):
            raise TypeError(
                f"{type(self.recipe).__name__}.build_data returned a {type(self.data).__name__}, "
                f"which lacks what mmtrain.recipes.base.DataStream declares"
            )

    def _log_model_size(self, model) -> tuple:
        """(parameters, trainable parameters), full sizes; logged with what this rank holds."""
        n_train = sum(numel(p) for p in model.parameters() if p.requires_grad)
        built = partition_summary(model)
        n_all = built["elements"]
        self.log.info(
            "model: %.2fM parameters, %.2fM trainable, %.2fM frozen; built with %.2fM (%.0f%%) "
            "on this rank",
            n_all / 1e6,
            n_train / 1e6,
            (n_all - n_train) / 1e6,
            built["held"] / 1e6,
            100 * built["held"] / max(1, n_all),
        )
        return n_all, n_train

    def _log_partitions(self, model, ds_conf) -> None:
        sharded = partition_summary(model)
        self.log.info(
            "ZeRO-3: %d of %d parameter tensors partitioned (persistence threshold %d); this "
            "rank holds %.2fM of %.2fM parameters (%.0f%%)",
            sharded["partitioned_tensors"],
            sharded["tensors"],
            ds_conf["zero_optimization"]["stage3_param_persistence_threshold"],
            sharded["held"] / 1e6,
            sharded["elements"] / 1e6,
            100 * sharded["held"] / max(1, sharded["elements"]),
        )

    def _auto_stage(self, n_all: int, n_train: int) -> int:
        env, precision = self.env, self.cfg.deepspeed.precision
        device_bytes = dist.device_memory(env)
        stage, est = choose_zero_stage(n_all, n_train, env.world_size, device_bytes, precision)
        self.log.info(
            "deepspeed.zero_stage=auto: stage %d (model states %.2f GiB per device at stage 2, "
            "%.2f GiB at stage 3; %.1f GiB on the device, half of it kept for activations)",
            stage,
            est["stage2"] / 2**30,
            est["stage3"] / 2**30,
            device_bytes / 2**30,
        )
        return stage

    def _checkpoint_activations(self, model) -> None:
        names = checkpoint_activations(model)
        if not names:
            self.log.warning(
                "train.activation_checkpointing: no transformers model in %s supports it; "
                "activations are kept",
                type(model).__name__,
            )
            return
        self.log.info(
            "activation checkpointing on in: %s", ", ".join(n or "(the model)" for n in names)
        )

    def _components(self) -> None:
        cfg, env = self.cfg, self.env
        self.guard = BadStepGuard(cfg.train.max_bad_steps, cfg.train.lr)
        self.metrics = MetricsAccumulator(
            cfg.log.every,
            cfg.train.steps,
            env.world_size,
            dist.all_reduce_sum,
            self.recipe.flops_per_sample(),
            peak_tflops(cfg.log.peak_tflops),
        )
        c = cfg.checkpoint
        self.checkpointer = Checkpointer(
            self.ckpt_root,
            c.every,
            cfg.train.steps,
            c.best_metric,
            c.best_mode,
            env.is_main,
            self._write_checkpoint,
            cfg.run.signal_lead_s,
        )
        self.stop = StopPolicy(
            lambda: signals.current().signum is not None,
            cfg.run.stop_after_steps,
            cfg.train.steps,
            lambda flag: dist.any_rank(flag, env.device),
        )

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
