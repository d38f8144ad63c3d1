"""From a config to a recipe and its model, the same way for training, `mmtrain eval` and export."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import torch
from torch import nn

from mmtrain.config import Config
from mmtrain.engine import dist
from mmtrain.recipes import recipe_class
from mmtrain.recipes.base import Recipe, RunContext

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# an output head tied to the input embedding may be stored once, under the embedding's name
TIED_HEADS = ("lm_head.weight", "embed_out.weight")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def zero3_loading(ds_conf: Dict[str, Any]) -> Iterator[None]:
    """transformers models built inside (`from_pretrained`, `from_config`) are partitioned as they
    are built: transformers sees this ZeRO-3 config (HfDeepSpeedConfig), builds under
    `deepspeed.zero.Init` and loads each tensor into its partitions. Outside it, models load whole."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_conf)  # transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep


def partitioned_loading(cfg: Config, ds_conf: Optional[Dict[str, Any]]):
    """RunContext.partitioned of a training run: ZeRO-3 loading when the run trains under ZeRO-3
    with `deepspeed.sharded_init`, else a no-op."""
    stage = (ds_conf or {}).get("zero_optimization", {}).get("stage", 0)
    if stage == 3 and cfg.deepspeed.sharded_init:
        return lambda: zero3_loading(ds_conf)
    return contextlib.nullcontext


def build_recipe(
    cfg: Config,
    env: dist.DistEnv,
    dtype: torch.dtype,
    run_dir: Optional[Path] = None,
    partitioned=contextlib.nullcontext,
    stop_requested: Callable[[], bool] = lambda: False,
) -> Recipe:
    """The configured recipe, told about the run through its RunContext (collectives included;
    `partitioned`, `stop_requested`: see RunContext; plain for evaluation and export)."""
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
        from_rank0=dist.from_rank0,
        partitioned=partitioned,
        stop_requested=stop_requested,
    )
    return recipe_class(cfg.recipe.name)(cfg.recipe, ctx)


def build_model(recipe: Recipe, seed: int) -> nn.Module:
    """The recipe set up and its model built from `seed`: identical initial weights on every rank."""
    seed_all(seed)
    recipe.setup()
    return recipe.build_model()
