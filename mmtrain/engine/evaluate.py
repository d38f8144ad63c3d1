"""`mmtrain eval RUN_DIR --split val|test`: score a checkpoint on a held-out split, across ranks.

Loads the run's resolved config and a checkpoint (default: latest; pass the tag chosen on the
validation split for the final test score), consolidates its weights from the ZeRO shards, and
calls the recipe's `score` (e.g. perplexity, generation + BLEU/ROUGE/Distinct). Writes
RUN_DIR/eval_<split>_<tag>.json and predictions_<split>_<tag>.jsonl (rank 0).
Run it under torchrun/deepspeed/srun for several ranks, or plainly for one. `--set key=value`
changes the saved config for this evaluation only (e.g. `--set recipe.rules=rules/rules.json`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from mmtrain.engine import checkpoint, dist
from mmtrain.engine.build import DTYPES, build_model, build_recipe
from mmtrain.engine.export import find_checkpoint, load_trained
from mmtrain.models.base import to_precision


def load_run(run_dir: str, tag: Optional[str] = None, overrides: Sequence[str] = ()):
    """(config, recipe, model in eval mode, tag, dist env) of a run's checkpoint, on this
    process's device."""
    run = Path(run_dir)
    cfg, root, tag = find_checkpoint(run, tag, overrides)
    env = dist.init(cfg.dist.backend, cfg.dist.timeout_s)
    dtype = DTYPES[cfg.deepspeed.precision] if env.device.type == "cuda" else torch.float32
    recipe = build_recipe(cfg, env, dtype, run)
    model = build_model(recipe, cfg.run.seed)
    load_trained(model, root, tag)
    to_precision(model, env.device, dtype).eval()
    return cfg, recipe, model, tag, env


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
