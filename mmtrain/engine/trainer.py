"""The one training loop. It knows DeepSpeed, checkpoints and logging; it never knows the method.

recipe.step(model, batch) -> named losses; the engine weights and sums them, skips non-finite
steps, backpropagates, steps, logs, evaluates and checkpoints on schedule, and answers Slurm's
SIGTERM/SIGUSR1 by checkpointing and exiting with REQUEUE_EXIT_CODE (engine/signals.py).
"""

from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from mmtrain.config import Config, save_config, to_yaml
from mmtrain.engine import checkpoint, dist, signals
from mmtrain.engine.losses import combine
from mmtrain.engine.monitor import Monitor, peak_memory_gib, peak_tflops, setup_logging
from mmtrain.engine.optim import deepspeed_config, param_groups, scheduler_factory
from mmtrain.recipes import recipe_class
from mmtrain.recipes.base import RunContext

REQUEUE_EXIT_CODE = 85  # slurm/train.sbatch turns this into `scontrol requeue`
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TooManyBadSteps(RuntimeError):
    pass


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_recipe(
    cfg: Config, env: dist.DistEnv, dtype: torch.dtype, run_dir: Optional[Path] = None
):
    """The configured recipe, told about the run through its RunContext (collectives included)."""
    ctx = RunContext(
        rank=env.rank,
        world_size=env.world_size,
        device=env.device,
        dtype=dtype,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.run.seed,
        run_dir=run_dir or cfg.run_dir,
        grad_accum=cfg.train.grad_accum,
        all_reduce_sum=dist.all_reduce_sum,
        all_gather=dist.all_gather,
        gather_objects=dist.gather_objects,
    )
    return recipe_class(cfg.recipe.name)(cfg.recipe, ctx)


def train(cfg: Config) -> int:
    import deepspeed

    # torch warns on every ZeRO-3 collective that DeepSpeed still calls by its old name
    warnings.filterwarnings(
        "ignore", message=r".*is deprecated. Please use `torch.distributed", category=FutureWarning
    )

    run_dir = cfg.run_dir
    ckpt_root = run_dir / "checkpoints"
    if cfg.run.resume == "never" and checkpoint.step_dirs(ckpt_root):
        raise FileExistsError(
            f"{run_dir} already holds checkpoints and run.resume=never would write over them: "
            f"choose a new run.name, or run.resume=auto to continue"
        )
    passed_over: list = []  # damaged checkpoints resume=auto skipped, logged below
    found = checkpoint.find_resume(cfg.run.resume, ckpt_root, passed_over)
    env = dist.init(cfg.dist.backend, cfg.dist.timeout_s)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        checkpoint.clean_partials(ckpt_root)
    dist.barrier()
    log = setup_logging(run_dir, env.rank)
    log.info(
        "run directory: %s (world size %d, device %s)\nresolved config:\n%s",
        run_dir.resolve(),
        env.world_size,
        env.device,
        to_yaml(cfg),
    )
    for note in passed_over:
        log.warning(note)

    recipe = build_recipe(cfg, env, DTYPES[cfg.deepspeed.precision])
    seed_all(cfg.run.seed)  # identical initial weights on every rank
    model = recipe.build_model()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info(
        "model: %.2fM parameters, %.2fM trainable, %.2fM frozen",
        n_all / 1e6,
        n_train / 1e6,
        (n_all - n_train) / 1e6,
    )
    ds_conf = deepspeed_config(cfg, env.world_size, env.device.type == "cuda")
    reshard = bool(found) and checkpoint.saved_world(*found) != env.world_size
    if reshard:  # written by another number of ranks: its universal form
        ds_conf["checkpoint"] = {**ds_conf.get("checkpoint", {}), "load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        config=ds_conf,
        model_parameters=param_groups(model, cfg.train.weight_decay),
        lr_scheduler=scheduler_factory(cfg),
    )
    data = recipe.build_data()
    seed_all(cfg.run.seed + 1 + env.rank)  # per-rank streams for dropout, masking, ...

    step, bad_total = 0, 0
    if found:
        root, tag = found
        states = checkpoint.load(engine, root, tag, env.rank, env.world_size)
        step, bad_total = states[0]["step"], states[0]["bad_total"]
        if not reshard:
            data.load_state_dict(states[0]["data"])
            recipe.load_state_dict(states[0].get("recipe") or {})
            checkpoint.set_rng_state(states[0]["rng"])
        else:
            data.load_state_dict(
                data.reshard_state([st["data"] for st in states], env.rank, env.world_size)
            )
            recipe.load_state_dict(
                recipe.reshard_state(
                    [st.get("recipe") or {} for st in states], env.rank, env.world_size
                )
            )
            if env.rank < len(states):  # new ranks keep the fresh streams seeded above
                checkpoint.set_rng_state(states[env.rank]["rng"])
            log.info(
                "checkpoint written by %d ranks, resumed on %d (DeepSpeed universal checkpoint)",
                len(states),
                env.world_size,
            )
        log.info("resumed from %s at step %d", root / tag, step)

    def save() -> None:
        rank_state = {
            "step": step,
            "bad_total": bad_total,
            "data": data.state_dict(),
            "rng": checkpoint.rng_state(),
            "recipe": recipe.state_dict(),
        }
        path = checkpoint.save(
            engine,
            ckpt_root,
            step,
            rank_state,
            {"world_size": env.world_size, "recipe": cfg.recipe.name},
            cfg.checkpoint.keep,
        )
        log.info("checkpoint saved: %s", path)

    best_value = None

    def evaluate() -> None:
        nonlocal last_save, best_value
        engine.eval()
        metrics = recipe.evaluate(engine)
        engine.train()
        for k in [
            k for k, v in metrics.items() if isinstance(v, torch.Tensor)
        ]:  # images (e.g. confusion)
            monitor.image(f"eval/{k}", metrics.pop(k), step)
        if metrics:
            monitor.scalars(
                step, {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            )
            log.info("eval at step %d: %s", step, json.dumps(metrics))
            if env.is_main:
                with open(run_dir / "eval.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
        name = cfg.checkpoint.best_metric
        if name and name in metrics:  # model selection on the validation split
            value = metrics[name]
            if best_value is None or (
                value < best_value if cfg.checkpoint.best_mode == "min" else value > best_value
            ):
                best_value = value
                if last_save != step:
                    save()
                    last_save = step
                if env.is_main:
                    checkpoint.mark_best(ckpt_root, step, name, value)
                log.info("best %s so far: %.6g at step %d (checkpoints/best)", name, value, step)

    stop = signals.current()
    monitor = Monitor(
        run_dir, env.rank, cfg.train.steps, step, cfg.log.tensorboard, cfg.log.progress
    )
    peak = peak_tflops(cfg.log.peak_tflops)
    flops_per_sample = recipe.flops_per_sample()
    ga = cfg.train.grad_accum
    sums: Dict[str, float] = {}  # metric sums since the last log line
    consecutive_bad = 0
    t_log = time.perf_counter()
    steps_since_log = 0
    last_save = step if found else -1
    if found and cfg.checkpoint.best_metric:  # keep comparing against the best before the resume
        info = ckpt_root / "best.json"
        if info.is_file():
            best_value = json.loads(info.read_text()).get(cfg.checkpoint.best_metric)
    exit_code = 0
    engine.train()

    def requeue() -> int:
        log.warning("stop signal received: checkpointing at step %d, exiting for requeue", step)
        save()
        stop.ignore_further()
        return REQUEUE_EXIT_CODE

    try:
        if dist.any_rank(stop.signum is not None, env.device):  # a signal while starting up
            return requeue()
        while step < cfg.train.steps:
            good = 0
            while good < ga:  # a non-finite micro-batch is replaced, not counted
                out = recipe.step(engine, next(data))
                total, losses, bad = combine(
                    out.losses, recipe.loss_weight, dist.all_reduce_sum, env.world_size, env.device
                )
                if bad:
                    consecutive_bad += 1
                    bad_total += 1
                    log.warning(
                        "non-finite loss at step %d (%s); micro-batch skipped (%d in a row)",
                        step + 1,
                        {k: float(v.detach()) for k, v in losses.items()},
                        consecutive_bad,
                    )
                    if consecutive_bad >= cfg.train.max_bad_steps:
                        raise TooManyBadSteps(
                            f"{consecutive_bad} consecutive non-finite losses (train.max_bad_steps="
                            f"{cfg.train.max_bad_steps}) at step {step + 1}: lower train.lr, "
                            f"check the data, or use deepspeed.precision=fp32 to find the source"
                        )
                    continue
                engine.backward(total)
                engine.step()
                good += 1
                for k, v in {
                    "loss/total": total,
                    **{f"loss/{k}": v for k, v in losses.items()},
                }.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                for k, v in out.stats.items():
                    sums[f"stats/{k}"] = sums.get(f"stats/{k}", 0.0) + float(v)
                sums["_micro"] = sums.get("_micro", 0.0) + 1
                sums["_samples"] = sums.get("_samples", 0.0) + out.samples
                sums["_tokens"] = sums.get("_tokens", 0.0) + out.tokens
                sums["_flops"] = sums.get("_flops", 0.0) + (
                    out.flops if out.flops is not None else (flops_per_sample or 0.0) * out.samples
                )
            step += 1
            steps_since_log += 1
            grad_norm = engine.get_global_grad_norm()
            if engine.was_step_applied():
                consecutive_bad = 0
            else:  # DeepSpeed skipped the update: the gradients overflowed
                consecutive_bad += 1
                bad_total += 1
                log.warning(
                    "optimizer step %d skipped: non-finite gradients (norm %s) (%d bad in a row)",
                    step,
                    grad_norm,
                    consecutive_bad,
                )
                if consecutive_bad >= cfg.train.max_bad_steps:
                    raise TooManyBadSteps(
                        f"{consecutive_bad} consecutive skipped optimizer steps, the gradients overflowing "
                        f"(train.max_bad_steps={cfg.train.max_bad_steps}) at step {step}: lower train.lr "
                        f"(now {cfg.train.lr:g}), keep train.grad_clip on, or use "
                        f"deepspeed.precision=fp32 to find the source"
                    )
            lr = engine.get_lr()[0]
            monitor.advance(1, {"loss": float(total.detach()), "lr": lr})
            for tag, img in out.images.items():
                monitor.image(f"images/{tag}", img, step)

            if step % cfg.log.every == 0 or step == cfg.train.steps:
                keys = sorted(sums)
                reduced = dist.all_reduce_sum(
                    torch.tensor([sums[k] for k in keys], dtype=torch.float64)
                )
                agg = dict(zip(keys, reduced.tolist()))
                elapsed = time.perf_counter() - t_log
                micro = agg.pop("_micro")
                samples, tokens, flops = agg.pop("_samples"), agg.pop("_tokens"), agg.pop("_flops")
                values = {k: v / micro for k, v in agg.items()}
                values.update(
                    {
                        "train/lr": lr,
                        "train/step_time_s": elapsed / steps_since_log,
                        "train/samples_per_s": samples / elapsed,
                        "train/tokens_per_s": tokens / elapsed,
                        "train/peak_memory_gib": peak_memory_gib(env.device),
                        "train/bad_steps": bad_total,
                    }
                )
                if grad_norm is not None:
                    values["train/grad_norm"] = float(grad_norm)
                if flops and peak:
                    tflops = flops / elapsed / env.world_size / 1e12
                    values.update({"train/tflops_per_device": tflops, "train/mfu": tflops / peak})
                data_stats = getattr(data, "stats", dict)()  # cumulative counts, summed over ranks
                if data_stats:
                    totals = dist.all_reduce_sum(
                        torch.tensor(list(data_stats.values()), dtype=torch.float64)
                    )
                    values.update({f"data/{k}": v for k, v in zip(data_stats, totals.tolist())})
                if hasattr(data, "epoch"):
                    values["train/epoch"] = data.epoch
                monitor.scalars(step, values)
                log.info(
                    "step %d/%d %s",
                    step,
                    cfg.train.steps,
                    " ".join(f"{k}={v:.4g}" for k, v in values.items()),
                )
                sums.clear()
                steps_since_log = 0
                t_log = time.perf_counter()

            if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                evaluate()
            if dist.any_rank(stop.signum is not None, env.device):
                return requeue()
            if (
                cfg.run.stop_after_steps
                and step >= cfg.run.stop_after_steps
                and step < cfg.train.steps
            ):
                log.info(
                    "run.stop_after_steps=%d reached: checkpointing and stopping",
                    cfg.run.stop_after_steps,
                )
                save()
                return 0
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
                save()
                last_save = step
        if last_save != step:
            save()
            last_save = step
        if cfg.eval.at_end:
            evaluate()
        log.info(
            "done: %d steps; checkpoints in %s; TensorBoard logs in %s",
            step,
            ckpt_root.resolve(),
            (run_dir / "tensorboard").resolve(),
        )
        return exit_code
    finally:
        monitor.close()
