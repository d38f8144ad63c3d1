"""AdamW parameter groups, the warm-up + cosine schedule, and the DeepSpeed config we generate."""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from mmtrain.config import Config
from mmtrain.parallelize import ndim


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Trainable parameters only; no weight decay on biases, norms and other 1-d tensors (by their
    full shape: a partitioned parameter is 1-d)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if ndim(p) < 2 or "norm" in name.lower() else decay).append(p)
    if not decay and not no_decay:
        raise RuntimeError(
            "the recipe's model has no trainable parameters (all requires_grad=False)"
        )
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1 over `warmup` steps, then cosine to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler_factory(cfg: Config):
    total, warmup = cfg.train.steps, int(cfg.train.warmup_ratio * cfg.train.steps)

    def build(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, total, warmup, cfg.train.min_lr_ratio)
        )

    return build


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def choose_zero_stage(
    n_params: int, n_trainable: int, world_size: int, device_bytes: float, precision: str
) -> Tuple[int, Dict[str, float]]:
    """`deepspeed.zero_stage: auto`: stage 2 when the model states of stage 2 (the weights whole
    on every device; gradients, master weights and Adam moments of what trains partitioned) take
    at most half of a device's memory, the other half left for activations; else stage 3.
    Returns the stage and the estimates (bytes per device), as in DeepSpeed's
    `estimate_zero2/3_model_states_mem_needs` without offload."""
    weight = 4 if precision == "fp32" else 2
    # gradients in the training precision; fp32 master weights (not for fp32) and two moments
    per_trained = weight + (8 if precision == "fp32" else 12)
    stage2 = weight * n_params + per_trained * n_trainable / world_size
    stage3 = (weight * n_params + per_trained * n_trainable) / world_size
    stage = 2 if stage2 <= 0.5 * device_bytes else 3
    return stage, {"stage2": stage2, "stage3": stage3, "device": device_bytes}


def deepspeed_config(
    cfg: Config, world_size: int, on_cuda: bool, stage: Optional[int] = None
) -> Dict[str, Any]:
    """DeepSpeed's config from ours; `stage` is the ZeRO stage when the config says auto."""
    ds, tr = cfg.deepspeed, cfg.train
    if stage is None:
        if str(ds.zero_stage) == "auto":
            raise ValueError(
                "deepspeed.zero_stage=auto: choose the stage first (choose_zero_stage)"
            )
        stage = int(ds.zero_stage)
    use_fused = ds.optimizer == "fused" or (ds.optimizer == "auto" and on_cuda)
    zero: Dict[str, Any] = {
        "stage": stage,
        "overlap_comm": ds.overlap_comm and on_cuda,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": ds.prefetch_bucket_size,
                "stage3_param_persistence_threshold": ds.param_persistence_threshold,
                # lets `save_16bit_model` and LoRA export gather full weights
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if ds.offload_params and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    conf: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum,
        "train_batch_size": tr.micro_batch_size * tr.grad_accum * world_size,
        "gradient_clipping": tr.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": tr.lr,
                "betas": list(tr.betas),
                "eps": tr.eps,
                "weight_decay": tr.weight_decay,
                "torch_adam": not use_fused,
            },
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # mmtrain logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    return _deep_merge(conf, ds.extra)
