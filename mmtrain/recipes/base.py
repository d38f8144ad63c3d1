"""The contract between a training method (a recipe) and the engine.

A recipe builds its model (frozen parts marked with `requires_grad=False`), its data, and turns
one batch into named losses. It never touches DeepSpeed, the process group, logging or
checkpoints; the engine never knows which method it trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Protocol, Union

import torch
from torch import nn

from mmtrain.config import RecipeConfig
from mmtrain.data.reader import DataSection, ShardLoader, build_loader


@dataclass
class RunContext:
    """What a recipe may know about the run it is part of."""

    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype  # the precision the engine trains in
    micro_batch_size: int
    seed: int
    run_dir: Path
    grad_accum: int = 1  # micro-batches per optimizer step: the global batch is
    # micro_batch_size x grad_accum x world_size
    # Collectives without exposing the process group (see engine.dist); identity in a world of one.
    all_reduce_sum: Any = lambda t: t
    all_gather: Any = lambda t: t  # concatenates equal-shaped tensors of all ranks along dim 0
    gather_objects: Any = lambda o: [o]  # every rank's picklable object, in rank order


@dataclass
class GlobalMean:
    """A loss that is a mean over items a batch holds in varying numbers (answer tokens, masked
    positions): this rank's *sum* over its items and their count. The engine divides by the count
    over all ranks (one all-reduce per micro-step), so the loss is the mean over the items of the
    global micro-batch, whatever the world size. A plain tensor loss is a mean over this rank's
    samples, which is the same thing only when every sample weighs the same (fixed-size terms)."""

    total: torch.Tensor
    count: int


@dataclass
class StepOutput:
    # named scalar losses (weighted by the engine)
    losses: Dict[str, Union[torch.Tensor, GlobalMean]]
    stats: Dict[str, float] = field(default_factory=dict)  # extra scalars to log as they are
    # CHW images to log (rank 0, log steps)
    images: Dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 0  # samples in this micro-batch on this rank
    tokens: int = 0  # tokens processed (for tokens/s)
    flops: Optional[float] = None  # training FLOPs of this micro-batch, when they vary
    # per batch (else `Recipe.flops_per_sample`), for MFU


class ResumableIterator(Protocol):
    """A data stream whose position is part of the checkpoint."""

    def __iter__(self) -> Iterator[Any]: ...
    def __next__(self) -> Any: ...
    def state_dict(self) -> Dict[str, Any]: ...
    def load_state_dict(self, state: Dict[str, Any]) -> None: ...

    def reshard_state(self, states: List[Dict[str, Any]], rank: int, world: int) -> Dict[str, Any]:
        """This rank's state, from the `state_dict()`s of every rank of a run that had another
        number of ranks (resume on a different world size)."""


class Recipe:
    """Subclass, set `Config`, and implement `build_model`, `build_data` and `step`."""

    Config = RecipeConfig

    def __init__(self, cfg: RecipeConfig, ctx: RunContext):
        self.cfg = cfg
        self.ctx = ctx

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_data(self) -> ResumableIterator:
        raise NotImplementedError

    def loader(self, section: DataSection, spec: str, decode, collate) -> ShardLoader:
        """This rank's resumable loader over the shards `spec`, sized and dealt for this run."""
        c = self.ctx
        return build_loader(
            section,
            spec,
            c.micro_batch_size,
            decode,
            collate,
            c.rank,
            c.world_size,
            c.seed,
            c.grad_accum,
        )

    def step(self, model: nn.Module, batch: Any) -> StepOutput:
        """One micro-batch forward. `model` is callable like the module `build_model` returned."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str = "val") -> Dict[str, float]:
        """Metrics on held-out data (`val` during training), already reduced across ranks. Optional."""
        return {}

    def score(self, model: nn.Module, split: str):
        """Everything `mmtrain eval` reports: (metrics, per-sample prediction rows), e.g. generation.
        Default: the metrics of `evaluate`, no rows."""
        return self.evaluate(model, split), []

    def flops_per_sample(self) -> Optional[float]:
        """Training FLOPs per sample (forward + backward + frozen forwards), for MFU. Optional."""
        return None

    def export_modules(self, model: nn.Module) -> Dict[str, nn.Module]:
        """Sub-modules `mmtrain export` writes in HF/peft layout; default: HF/peft children."""
        from peft import PeftModel
        from transformers import PreTrainedModel

        return {
            name: m
            for name, m in model.named_children()
            if isinstance(m, (PreTrainedModel, PeftModel))
        }

    def state_dict(self) -> Dict[str, Any]:
        """What the recipe itself learns while training beyond the weights (e.g. per-sample loss
        tables), saved with each rank's checkpoint state. Optional."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def reshard_state(self, states: List[Dict[str, Any]], rank: int, world: int) -> Dict[str, Any]:
        """This rank's recipe state from the `state_dict()`s every rank of a run on another number of
        ranks saved. Default: identical states carry over; per-rank states must override this."""
        if any(st != states[0] for st in states[1:]):
            raise RuntimeError(
                f"recipe {self.cfg.name} keeps per-rank state and does not say how to re-shard "
                f"it onto {world} ranks: resume on {len(states)} ranks"
            )
        return states[0]

    def loss_weight(self, name: str) -> float:
        return float(self.cfg.loss_weights.get(name, 1.0))
