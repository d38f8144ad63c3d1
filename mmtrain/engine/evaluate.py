"""`mmtrain eval RUN_DIR --split val|test`: score a checkpoint on a held-out split, across ranks.

Loads the run's resolved config and a checkpoint (default: latest; pass the tag chosen on the
validation split for the final test score), consolidates its weights from the ZeRO shards, and
calls the recipe's `evaluate` (e.g. perplexity) and `score` (e.g. generation + BLEU/ROUGE/
Distinct). Writes RUN_DIR/eval_<split>_<tag>.json and predictions_<split>_<tag>.jsonl (rank 0).
Run it under torchrun/deepspeed/srun for several ranks, or plainly for one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from mmtrain.config import load_run_config
from mmtrain.engine import checkpoint, dist
from mmtrain.engine.export import consolidated_state_dict
from mmtrain.engine.trainer import DTYPES, seed_all
from mmtrain.recipes import recipe_class
from mmtrain.recipes.base import RunContext


def run_eval(run_dir: str, split: str = "val", tag: Optional[str] = None) -> dict:
    run = Path(run_dir)
    cfg = load_run_config(run)
    root = run / "checkpoints"
    found = checkpoint.find_resume(str(root / tag) if tag else "auto", root)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in {root}")
    root, tag = found
    env = dist.init(cfg.dist.backend, cfg.dist.timeout_s)
    dtype = DTYPES[cfg.deepspeed.precision] if env.device.type == "cuda" else torch.float32
    ctx = RunContext(rank=env.rank, world_size=env.world_size, device=env.device, dtype=dtype,
                     micro_batch_size=cfg.train.micro_batch_size, seed=cfg.run.seed, run_dir=run,
                     all_reduce_sum=dist.all_reduce_sum, all_gather=dist.all_gather,
                     gather_objects=dist.gather_objects)
    recipe = recipe_class(cfg.recipe.name)(cfg.recipe, ctx)
    seed_all(cfg.run.seed)
    model = recipe.build_model()
    missing, unexpected = model.load_state_dict(consolidated_state_dict(root, tag), strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise RuntimeError(f"checkpoint {root / tag} does not fit the recipe's model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.to(env.device, dtype).eval()
    metrics = recipe.evaluate(model, split)
    scores, rows = recipe.score(model, split)
    metrics.update(scores)
    result = {"split": split, "checkpoint": tag, **metrics}
    if env.is_main:
        (run / f"eval_{split}_{tag}.json").write_text(json.dumps(result, indent=2))
        with open(run / f"predictions_{split}_{tag}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    dist.shutdown()
    return result
