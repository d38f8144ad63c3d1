"""`mmtrain eval RUN_DIR --split val|test`: score a checkpoint on a held-out split, across ranks.

Loads the run's resolved config and a checkpoint (default: latest; pass the tag chosen on the
validation split for the final test score), consolidates its weights from the ZeRO shards once
(engine/weights.py: rank 0 writes CHECKPOINT/consolidated-<precision>.safetensors, reused after),
loads them whole on every rank or partitioned over the ranks (`eval.placement`), and
calls the recipe's `score` (e.g. perplexity, generation + BLEU/ROUGE/Distinct). Writes
RUN_DIR/eval_<split>_<tag>.json and predictions_<split>_<tag>.jsonl (rank 0).
Run it under torchrun/deepspeed/srun for several ranks, or plainly for one. `--set key=value`
changes the saved config for this evaluation only (e.g. `--set recipe.rules=rules/rules.json`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from mmtrain.engine import checkpoint, dist, weights
from mmtrain.engine.build import DTYPES, build_model, build_recipe, zero3_loading
from mmtrain.engine.optim import deepspeed_config, widest_hidden_size
from mmtrain.models.base import to_precision
from mmtrain.parallelize import partition_summary

log = logging.getLogger("mmtrain")


def choose_placement(placement: str, weight_bytes: int, env: dist.DistEnv) -> str:
    """eval.placement=auto: the whole model on every rank when its weights take at most half of a
    device (the rest for activations and generation's cache), else partitioned over the ranks."""
    if placement != "auto":
        return placement
    if env.world_size == 1 or weight_bytes <= 0.5 * dist.device_memory(env):
        return "replica"
    return "sharded"


def load_run(run_dir: str, tag: Optional[str] = None, overrides: Sequence[str] = ()):
    """(config, recipe, model in eval mode, tag, dist env) of a run's checkpoint, on this
    process's device: whole on every rank, or partitioned over the ranks under ZeRO-3 (then the
    model is the DeepSpeed engine, and every forward is collective)."""
    run = Path(run_dir)
    cfg, root, tag = checkpoint.find_checkpoint(run, tag, overrides)
    d = cfg.dist
    env = dist.init(d.backend, d.timeout_s, d.socket_ifname, d.solo_timeout_s)
    # the run's precision on GPUs; fp32 on CPUs, where bf16 matmuls are slow and inexact
    precision = cfg.deepspeed.precision if env.device.type == "cuda" else "fp32"
    stored = weights.consolidate(root, tag, precision)
    placement = choose_placement(cfg.eval.placement, weights.stored_bytes(stored), env)
    load = _sharded if placement == "sharded" else _whole
    recipe, model = load(cfg, env, precision, run, stored)
    held = partition_summary(model)
    log.info(
        "evaluating %s (%s): %.2fM parameters, %.2fM (%.0f%%) on this rank",
        root / tag,
        placement,
        held["elements"] / 1e6,
        held["held"] / 1e6,
        100 * held["held"] / max(1, held["elements"]),
    )
    model.eval()  # DeepSpeed's engine returns None from eval()
    return cfg, recipe, model, tag, env


def _whole(cfg, env, precision, run, stored):
    """The recipe's model built whole on this rank, in `precision` (buffers as they are), and the
    weights copied in."""
    recipe = build_recipe(cfg, env, DTYPES[precision], run)
    model = to_precision(build_model(recipe, cfg.run.seed), env.device, DTYPES[precision])
    weights.load_whole(model, stored)
    return recipe, model


def _sharded(cfg, env, precision, run, stored):
    """The recipe's model built partitioned (large HF models partitioned as they load, the rest by
    deepspeed.initialize) under an optimizer-free ZeRO-3 engine, and the weights loaded into its
    partitions."""
    import deepspeed

    def config(**kw):
        conf = deepspeed_config(cfg, env.world_size, env.device.type == "cuda", stage=3, **kw)
        conf.pop("optimizer")
        conf["bf16"] = {"enabled": precision == "bf16"}
        conf["fp16"] = {"enabled": precision == "fp16"}
        return conf

    loading = config(built=False)
    recipe = build_recipe(
        cfg, env, DTYPES[precision], run, partitioned=lambda: zero3_loading(loading)
    )
    model = build_model(recipe, cfg.run.seed)
    conf = config(hidden=widest_hidden_size(model))
    engine, *_ = deepspeed.initialize(model=model, config=conf)
    weights.load_partitioned(engine.module, stored)
    return recipe, engine


def to_tensorboard(run: Path, split: str, tag: str, scored) -> None:
    """The scores and figures (e.g. confusion matrices) in the run's TensorBoard, as
    `<split>/<name>` at the checkpoint's step."""
    from torch.utils.tensorboard import SummaryWriter

    numbered = checkpoint.TAG_RE.match(tag)
    step = int(numbered.group(1)) if numbered else 0
    with SummaryWriter(str(run / "tensorboard")) as writer:
        for k, v in scored.metrics.items():
            if isinstance(v, (int, float)):
                writer.add_scalar(f"{split}/{k}", v, step)
        for k, img in scored.images.items():
            writer.add_image(f"{split}/{k}", img, step)


def run_eval(
    run_dir: str, split: str = "val", tag: Optional[str] = None, overrides: Sequence[str] = ()
) -> dict:
    run = Path(run_dir)
    cfg, recipe, model, tag, env = load_run(run_dir, tag, overrides)
    scored = recipe.score(model, split)
    result = {"split": split, "checkpoint": tag, **scored.metrics}
    if env.is_main and cfg.log.tensorboard:
        to_tensorboard(run, split, tag, scored)
    if env.is_main:
        (run / f"eval_{split}_{tag}.json").write_text(json.dumps(result, indent=2))
        with open(run / f"predictions_{split}_{tag}.jsonl", "w") as f:
            for r in scored.rows:
                f.write(json.dumps(r) + "\n")
    return result
