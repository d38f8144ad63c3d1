"""A training run's parts, built once: `build_run(cfg, lifeline) -> Run`, which `Trainer` trains.

In order: the checkpoint to resume from (chosen before any rank starts, so a wrong `run.resume`
fails at once), the process group, the batch plan (the global batch derived once, for this
number of ranks), the run directory (lock, config.yaml, train.log), the heartbeat, the stop
policy, the recipe and its model under DeepSpeed (`DeepSpeedPlan`: the one place DeepSpeed's
config is made, first for loading, then for the built model), the data, the components.
`Lifeline` holds what must be let go however the run ends (the directory's lock, the heartbeat)
and names a lost peer when a collective fails.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from mmtrain.config import Config, plan_global_batch, save_config, to_yaml
from mmtrain.engine import checkpoint, dist, signals
from mmtrain.engine.build import DTYPES, build_model, build_recipe, partitioned_loading, seed_all
from mmtrain.engine.components import BadStepGuard, MetricsAccumulator, StopPolicy
from mmtrain.engine.heartbeat import Heartbeat, PeerLost, is_comm_error
from mmtrain.engine.losses import GradientGate
from mmtrain.engine.monitor import setup_logging
from mmtrain.engine.optim import (
    choose_zero_stage,
    deepspeed_config,
    param_groups,
    scheduler_factory,
    widest_hidden_size,
)
from mmtrain.engine.profiler import StepProfiler
from mmtrain.engine.runlock import RunDirBusy, RunLock
from mmtrain.parallelize import checkpoint_activations, numel, partition_summary
from mmtrain.recipes.base import DataStream, Recipe

Found = Optional[Tuple[Path, str]]  # (checkpoints root, tag) to resume from


@dataclass(frozen=True)
class BatchPlan:
    """The global batch, derived once for this number of ranks (`train.global_batch_size` or
    `train.grad_accum`); the log line, DeepSpeed's config and the data loaders all read it."""

    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> BatchPlan:
        tr = cfg.train
        return cls(tr.micro_batch_size, plan_global_batch(tr, world_size), world_size)


@dataclass
class Run:
    """Everything `Trainer` trains with, made once by `build_run` and never replaced."""

    cfg: Config
    env: dist.DistEnv
    log: logging.Logger  # train.log (rank 0) and the terminal
    recipe: Recipe
    engine: Any  # DeepSpeed's engine around the recipe's model
    gate: GradientGate  # zeroes a non-finite micro-batch's gradients as they are made
    data: DataStream
    heartbeat: Heartbeat
    stop: StopPolicy
    guard: BadStepGuard
    metrics: MetricsAccumulator
    profiler: StepProfiler
    found: Found  # the checkpoint to resume from
    reshard: bool  # it was written by another number of ranks


class Lifeline:
    """What a run must let go however it ends: the run directory's lock (rank 0) and the heartbeat.
    As a context manager it releases both, and turns a failed collective into `PeerLost`, naming
    the rank or host the heartbeat last heard of."""

    def __init__(self, run_dir: Path):
        self.lock = RunLock(run_dir)
        self.heartbeat: Optional[Heartbeat] = None

    def __enter__(self) -> Lifeline:
        return self

    def __exit__(self, kind, error, tb) -> None:
        try:
            if self.heartbeat is not None:
                self.heartbeat.stop()
        finally:
            self.lock.release()
        if error is not None and self.heartbeat is not None and is_comm_error(error):
            raise PeerLost(self.heartbeat.explain(error)) from error


def build_run(cfg: Config, lifeline: Lifeline) -> Run:
    found, passed_over = find_resume(cfg)
    d = cfg.dist
    env = dist.init(d.backend, d.timeout_s, d.socket_ifname, d.solo_timeout_s)
    plan = BatchPlan.of(cfg, env.world_size)
    cfg.train.grad_accum = plan.grad_accum  # what config.yaml and the recipe's context read
    log = prepare_run_dir(cfg, env, plan, lifeline.lock, passed_over)
    lifeline.heartbeat = Heartbeat(
        env.rank, env.world_size, d.heartbeat_s, d.late_after_s, d.timeout_s
    )
    lifeline.heartbeat.start(dist.gather_objects)
    stop = StopPolicy(
        lambda: signals.current().signum is not None,
        cfg.run.stop_after_steps,
        cfg.train.steps,
        lambda flag: dist.any_rank(flag, env.device),
    )
    ds = DeepSpeedPlan(cfg, env, log)
    recipe = build_recipe(
        cfg,
        env,
        DTYPES[cfg.deepspeed.precision],
        partitioned=partitioned_loading(cfg, ds.for_loading()),
        stop_requested=stop.signal,
    )
    reshard = bool(found) and checkpoint.saved_world(*found) != env.world_size
    engine, gate = ds.initialize(recipe, reshard)
    data = recipe.build_data()
    if not isinstance(data, DataStream):
        raise TypeError(
            f"{type(recipe).__name__}.build_data returned a {type(data).__name__}, "
            f"which lacks what mmtrain.recipes.base.DataStream declares"
        )
    seed_all(cfg.run.seed + 1 + env.rank)  # per-rank streams for dropout, masking, ...
    return Run(
        cfg=cfg,
        env=env,
        log=log,
        recipe=recipe,
        engine=engine,
        gate=gate,
        data=data,
        heartbeat=lifeline.heartbeat,
        stop=stop,
        guard=BadStepGuard.of(cfg.train),
        metrics=MetricsAccumulator.of(
            cfg.log, cfg.train.steps, env.world_size, dist.all_reduce_sum, recipe
        ),
        profiler=StepProfiler(cfg.log.profile_steps, cfg.log.profile_ranks, env.rank, cfg.run_dir),
        found=found,
        reshard=reshard,
    )


def find_resume(cfg: Config) -> Tuple[Found, List[str]]:
    """(checkpoint root and tag to resume from, or None; the damaged checkpoints passed over)."""
    root = cfg.run_dir / "checkpoints"
    if cfg.run.resume == "never" and checkpoint.step_dirs(root):
        raise FileExistsError(
            f"{cfg.run_dir} already holds checkpoints and run.resume=never would write over "
            f"them: choose a new run.name, or run.resume=auto to continue"
        )
    passed_over: List[str] = []
    found = checkpoint.find_resume(cfg.run.resume, root, passed_over)
    if found:
        checkpoint.check_recipe(*found, cfg.recipe.name)
    return found, passed_over


def prepare_run_dir(
    cfg: Config, env: dist.DistEnv, plan: BatchPlan, lock: RunLock, passed_over: List[str]
) -> logging.Logger:
    """The run directory, taken by this run (one live run per directory: taken before anything is
    written, for a live run's partial save is not this run's to clean up), with its config.yaml;
    the logger of train.log, which starts with the run's shape and resolved config."""
    busy = dist.gather_objects(lock.acquire() if env.is_main else None)[0]
    if busy:
        raise RunDirBusy(
            f"{cfg.run_dir} belongs to a run that is still going ({busy}): wait for it to "
            f"end, stop it, or choose another run.name"
        )
    if env.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")
        checkpoint.clean_partials(cfg.run_dir / "checkpoints")
    dist.barrier()
    log = setup_logging(cfg.run_dir, env.rank, cfg.log.console)
    log.info(
        "run directory: %s (world size %d, device %s; global batch %d = micro-batch %d x "
        "grad_accum %d x %d ranks)\nresolved config:\n%s",
        cfg.run_dir.resolve(),
        env.world_size,
        env.device,
        plan.global_batch,
        plan.micro_batch_size,
        plan.grad_accum,
        env.world_size,
        to_yaml(cfg),
    )
    for note in passed_over:
        log.warning(note)
    return log


def resolved_config(cfg: Config, env: dist.DistEnv) -> Optional[Dict[str, Any]]:
    """The resolved config for W&B / MLflow: made only where one of them will read it."""
    return yaml.safe_load(to_yaml(cfg)) if cfg.log.backends and env.rank == 0 else None


class DeepSpeedPlan:
    """DeepSpeed's config, made in this one place: first for loading (under ZeRO-3 the recipe loads
    its large models partitioned into it), then for the built model (auto sizes read its hidden
    size; `zero_stage=auto` is chosen from its size; a checkpoint of another world size is read in
    its universal form)."""

    def __init__(self, cfg: Config, env: dist.DistEnv, log: logging.Logger):
        self.cfg, self.env, self.log = cfg, env, log
        self.on_cuda = env.device.type == "cuda"
        self.auto = str(cfg.deepspeed.zero_stage) == "auto"

    def for_loading(self) -> Optional[Dict[str, Any]]:
        """The config the recipe's models load under; None with zero_stage auto (the model is
        built whole and counted first)."""
        if self.auto:
            return None
        return deepspeed_config(self.cfg, self.env.world_size, self.on_cuda, built=False)

    def final(self, model, parts: int, reshard: bool) -> Dict[str, Any]:
        n_all, n_train = self._log_model_size(model)
        stage = self._auto_stage(n_all, n_train) if self.auto else None
        conf = deepspeed_config(
            self.cfg,
            self.env.world_size,
            self.on_cuda,
            stage,
            widest_hidden_size(model),
            parts=parts,
        )
        if reshard:  # written by another number of ranks: its universal form
            conf["checkpoint"] = {**conf.get("checkpoint", {}), "load_universal": True}
        return conf

    def initialize(self, recipe: Recipe, reshard: bool):
        """(DeepSpeed's engine around the recipe's model, the model's gradient gate)."""
        import deepspeed

        # torch warns on every ZeRO-3 collective that DeepSpeed still calls by its old name
        warnings.filterwarnings(
            "ignore",
            message=r".*is deprecated. Please use `torch.distributed",
            category=FutureWarning,
        )
        cfg = self.cfg
        model = build_model(recipe, cfg.run.seed)
        if cfg.train.activation_checkpointing:
            self._checkpoint_activations(model)
        conf = self.final(model, recipe.backward_parts, reshard)
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            config=conf,
            model_parameters=param_groups(model, cfg.train.weight_decay),
            lr_scheduler=scheduler_factory(cfg),
        )
        if conf["zero_optimization"]["stage"] == 3:
            self._log_partitions(model, conf)
        return engine, GradientGate(model.parameters())

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

    def _log_partitions(self, model, conf) -> None:
        sharded = partition_summary(model)
        self.log.info(
            "ZeRO-3: %d of %d parameter tensors partitioned (persistence threshold %d); this "
            "rank holds %.2fM of %.2fM parameters (%.0f%%)",
            sharded["partitioned_tensors"],
            sharded["tensors"],
            conf["zero_optimization"]["stage3_param_persistence_threshold"],
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
