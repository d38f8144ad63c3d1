"""From a config to a recipe and its model, the same way for training, `mmtrain eval` and export."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from mmtrain.config import Config
from mmtrain.engine import dist
from mmtrain.recipes import recipe_class
from mmtrain.recipes.base import Recipe, RunContext

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_recipe(
    cfg: Config, env: dist.DistEnv, dtype: torch.dtype, run_dir: Optional[Path] = None
) -> Recipe:
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


def build_model(recipe: Recipe, seed: int) -> nn.Module:
    """The recipe set up and its model built from `seed`: identical initial weights on every rank."""
    seed_all(seed)
    recipe.setup()
    return recipe.build_model()
