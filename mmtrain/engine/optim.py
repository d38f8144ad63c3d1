"""AdamW parameter groups, the warm-up + cosine schedule, and the DeepSpeed config we generate."""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from mmtrain.config import Config, ConfigError
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


def widest_hidden_size(model: nn.Module) -> Optional[int]:
    """The largest `hidden_size` among the transformers configs inside `model` (a multimodal
    config's text and vision configs included); None if it holds no transformers model."""
    sizes = []
    for m in model.modules():
        conf = getattr(m, "config", None)
        for c in (conf, getattr(conf, "text_config", None), getattr(conf, "vision_config", None)):
            h = getattr(c, "hidden_size", None)
            if isinstance(h, int):
                sizes.append(h)
    return max(sizes) if sizes else None


DEEPSPEED_DEFAULTS = {"reduce": 500_000_000, "prefetch": 50_000_000, "persistence": 100_000}


def zero_sizes(cfg: Config, hidden: Optional[int], built: bool = True) -> Dict[str, int]:
    """Bucket sizes and persistence threshold (elements). `auto` ones follow the widest hidden
    size h: buckets as transformers' DeepSpeed integration fills its `auto` (reduce h*h,
    prefetch 0.9*h*h; at least 2**20 elements, smaller ones only add calls); persistence 64*h,
    at least DeepSpeed's 1e5: every tensor narrower than a weight matrix stays whole (norms,
    biases, LoRA adapters up to rank 64, soft prompts), every weight matrix is partitioned.
    DeepSpeed's defaults when there is no h. Before the model is `built` (the config that
    partitions it as it loads) an auto threshold is 0: DeepSpeed never partitions a persisted
    parameter again, so the threshold chosen afterwards decides."""
    ds = cfg.deepspeed
    rules = {
        "reduce": (ds.reduce_bucket_size, lambda h: max(h * h, 1 << 20)),
        "prefetch": (ds.prefetch_bucket_size, lambda h: max(int(0.9 * h * h), 1 << 20)),
        "persistence": (ds.param_persistence_threshold, lambda h: max(64 * h, 100_000)),
    }
    out = {}
    for key, (value, rule) in rules.items():
        if str(value) != "auto":
            out[key] = int(value)
        elif key == "persistence" and not built:
            out[key] = 0
        else:
            out[key] = rule(hidden) if hidden else DEEPSPEED_DEFAULTS[key]
    return out


def reduction_dtypes(precision: str, stage: int, reduce: str, accum: str) -> Tuple[str, str]:
    """(the dtype gradients are reduced in, the dtype they are accumulated in) for a run in
    `precision` at ZeRO `stage`, from the config's choices (auto: fp32 for bf16 runs, except the
    accumulation at stage 0, where DeepSpeed accumulates in the model's dtype only)."""
    bf16 = precision == "bf16"
    reduce = ("fp32" if bf16 else precision) if reduce == "auto" else reduce
    accum = ("fp32" if bf16 and stage >= 1 else precision) if accum == "auto" else accum
    if stage == 0 and accum != precision:
        raise ConfigError(
            f"key 'deepspeed.grad_accum_dtype' ({accum}) must be the training precision "
            f"({precision}) at ZeRO stage 0: DeepSpeed accumulates in the model's dtype there; "
            "use stage 1-3 or grad_accum_dtype=auto"
        )
    if precision == "fp32" and (reduce, accum) != ("fp32", "fp32"):
        raise ConfigError(
            "keys 'deepspeed.grad_reduce_dtype'/'grad_accum_dtype' narrower than the fp32 "
            f"training precision ({reduce}/{accum}): set them to auto or fp32"
        )
    return reduce, accum


def deepspeed_config(
    cfg: Config,
    world_size: int,
    on_cuda: bool,
    stage: Optional[int] = None,
    hidden: Optional[int] = None,
    built: bool = True,
    parts: int = 1,
) -> Dict[str, Any]:
    """DeepSpeed's config from ours; `stage` is the ZeRO stage when the config says auto;
    `hidden` the model's widest hidden size (for auto sizes); `built`: see zero_sizes; `parts`:
    the backward passes of a micro-batch (Recipe.backward_parts), each a DeepSpeed micro-step."""
    ds, tr = cfg.deepspeed, cfg.train
    if stage is None:
        if str(ds.zero_stage) == "auto":
            raise ValueError(
                "deepspeed.zero_stage=auto: choose the stage first (choose_zero_stage)"
            )
        stage = int(ds.zero_stage)
    reduce, accum = reduction_dtypes(ds.precision, stage, ds.grad_reduce_dtype, ds.grad_accum_dtype)
    conf: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum * parts,
        # the trainer owns the boundary: one engine.step() per optimizer step, after it has read
        # which micro-batches were finite (a non-finite one is replaced before the update)
        "managed_gradient_accumulation": False,
        "train_batch_size": tr.micro_batch_size * tr.grad_accum * parts * world_size,
        "gradient_clipping": tr.grad_clip,
        "zero_optimization": _zero_section(cfg, world_size, on_cuda, stage, hidden, built),
        "communication_data_type": reduce,
        "data_types": {"grad_accum_dtype": accum},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "optimizer": _optimizer_section(cfg, on_cuda),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # mmtrain logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    return _deep_merge(conf, ds.extra)


def _zero_section(
    cfg: Config, world_size: int, on_cuda: bool, stage: int, hidden: Optional[int], built: bool
) -> Dict[str, Any]:
    """DeepSpeed's `zero_optimization`: the stage, its buckets and thresholds, ZeRO++, offload."""
    ds = cfg.deepspeed
    sizes = zero_sizes(cfg, hidden, built)
    zero: Dict[str, Any] = {
        "stage": stage,
        # DeepSpeed overlaps stage 1's reduction only where it owns the accumulation boundary
        "overlap_comm": ds.overlap_comm and on_cuda and stage >= 2,
        "contiguous_gradients": True,
        "reduce_bucket_size": sizes["reduce"],
    }
    if stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": sizes["prefetch"],
                "stage3_param_persistence_threshold": sizes["persistence"],
                # lets `save_16bit_model` and LoRA export gather full weights
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
        if ds.hpz_partition_size > 1:
            if world_size % ds.hpz_partition_size:
                raise ConfigError(
                    f"key 'deepspeed.hpz_partition_size' ({ds.hpz_partition_size}) must divide "
                    f"the number of ranks ({world_size}); set it to the GPUs per node"
                )
            zero["zero_hpz_partition_size"] = ds.hpz_partition_size
    elif ds.hpz_partition_size > 1:
        raise ConfigError(
            f"key 'deepspeed.hpz_partition_size' (ZeRO++) needs ZeRO stage 3; stage {stage} "
            "was chosen"
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if ds.offload_params and stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    return zero


def _optimizer_section(cfg: Config, on_cuda: bool) -> Dict[str, Any]:
    """AdamW as `deepspeed.optimizer` asks: torch's fused kernel, DeepSpeed's FusedAdam, or foreach."""
    ds, tr = cfg.deepspeed, cfg.train
    optimizer = ds.optimizer if ds.optimizer != "auto" else "torch_fused" if on_cuda else "torch"
    return {
        "type": "AdamW",
        "params": {
            "lr": tr.lr,
            "betas": list(tr.betas),
            "eps": tr.eps,
            "weight_decay": tr.weight_decay,
            "torch_adam": optimizer != "fused",
            **({"fused": True} if optimizer == "torch_fused" else {}),
        },
    }
