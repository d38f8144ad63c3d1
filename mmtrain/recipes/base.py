"""The contract between a training method (a recipe) and the engine.

A recipe builds its model (frozen parts marked with `requires_grad=False`) and its data stream,
and turns one micro-batch into named losses. It never touches DeepSpeed, the process group,
logging or checkpoints; the engine never knows which method it trains.

The engine calls, in this order:
    recipe = Recipe(cfg, ctx); recipe.setup()            # tokenizers, frozen towers, label sets
    model = recipe.build_model(); data = recipe.build_data()
    per micro-batch:    recipe.step(model, next(data)) -> StepOutput
    per optimizer step: recipe.on_step_end()
    when data.epoch moves on (before that micro-batch's step): recipe.on_epoch_end(finished, new)
    on schedule:        recipe.evaluate(model) -> EvalResult
    checkpoints:        recipe.state_dict() (each rank's own) / shared_state_dict() (the same on
                        every rank: saved once) / load_state_dict() / reshard_state()
The hooks are collective: every rank calls them at the same point, so they may all-reduce.
`mmtrain eval` calls `recipe.score(model, split)` on a plain (unsharded) model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterator,
    List,
    Optional,
    Protocol,
    Sequence,
    Union,
    runtime_checkable,
)

import torch
from torch import nn

from mmtrain.data.reader import Deal
from mmtrain.schema import RecipeConfig


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
    # micro-batches per optimizer step: the global batch is micro_batch_size x grad_accum x world
    grad_accum: int = 1
    # Collectives without exposing the process group (see engine.dist); identity in a world of one.
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    # concatenates equal-shaped tensors of all ranks along dim 0
    all_gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    # every rank's picklable object, in rank order
    gather_objects: Callable[[Any], List[Any]] = lambda o: [o]
    # `with ctx.partitioned():` around loading the large *trained* models (transformers'
    # `from_pretrained` / `from_config`, and their peft adapters): under ZeRO-3 they are
    # partitioned as they load, so no rank ever holds their full weights; elsewhere a no-op.
    # Frozen models every rank keeps whole, and modules whose weights you copy by hand, are built
    # outside it (they are plain modules until the engine hands the model to DeepSpeed).
    partitioned: Callable[[], ContextManager] = contextlib.nullcontext
    # Collective: has a stop signal (the job's time limit, a preemption) reached any rank? Every
    # evaluation loop asks between its batches (`stop_if_requested`), on every rank alike, so
    # that a requeue never waits for a long evaluation or generation to finish.
    stop_requested: Callable[[], bool] = lambda: False
    # Collective: `from_rank0(work, what)` runs `work()` on rank 0 alone and returns its picklable
    # result on every rank: for what a recipe derives from its data before training (a
    # vocabulary, a label set), read once rather than once per rank.
    from_rank0: Callable[[Callable[[], Any], str], Any] = lambda work, what: work()

    @property
    def deal(self) -> Deal:
        """How the run deals its global batches to this rank (for `data.reader.build_loader`)."""
        return Deal(self.micro_batch_size, self.rank, self.world_size, self.seed, self.grad_accum)


class EvaluationStopped(Exception):
    """A stop signal arrived during an evaluation: the trainer checkpoints, exits for requeue and
    evaluates again at that step after resuming."""


def stop_if_requested(ctx: RunContext) -> None:
    """Between two evaluation batches (collective): raise EvaluationStopped on a stop signal."""
    if ctx.stop_requested():
        raise EvaluationStopped()


@dataclass
class GlobalMean:
    """A loss that is a mean over items a batch holds in varying numbers (answer tokens, masked
    positions): this rank's *sum* over its items and their count. The engine divides by the count
    over all ranks (one all-reduce per micro-step), so the loss is the mean over the items of the
    global micro-batch, whatever the world size. A plain tensor loss is a mean over this rank's
    samples, which is the same thing only when every sample weighs the same (fixed-size terms)."""

    total: torch.Tensor
    count: Union[int, torch.Tensor]  # a tensor stays on the device (no host sync)


class Batch:
    """Base of a recipe's typed micro-batch (a dataclass its collate returns in the data workers).
    The loader pins what it hands over when batches go to a GPU: `pin_memory` pins every tensor
    field, and those of nested batches, so the recipe's copies to the device can be asynchronous."""

    def pin_memory(self):
        def pinned(v):
            if isinstance(v, (torch.Tensor, Batch)):
                return v.pin_memory()
            return v

        return dataclasses.replace(
            self, **{f.name: pinned(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )


@dataclass
class StepOutput:
    # named scalar losses (weighted by the engine)
    losses: Dict[str, Union[torch.Tensor, GlobalMean]]
    # extra scalars to log as they are. Stats and counts may be device tensors: the engine sums
    # them on the device and reads them at log steps (a float() here would be a host sync)
    stats: Dict[str, Union[float, torch.Tensor]] = field(default_factory=dict)
    # CHW images in [0, 1] to log (rank 0, log steps)
    images: Dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 0  # samples in this micro-batch on this rank
    tokens: Union[int, torch.Tensor] = 0  # tokens processed (for tokens/s)
    # training FLOPs of this micro-batch when they vary per batch (else
    # `Recipe.flops_per_sample`), for MFU
    flops: Optional[float] = None

    @classmethod
    def merged(cls, parts: Sequence[StepOutput]) -> StepOutput:
        """Parts of one micro-batch (`Recipe.step_parts`) as one output: their losses, stats and
        images together; samples, tokens and FLOPs summed."""
        flops = [o.flops for o in parts if o.flops is not None]
        return cls(
            losses={k: v for o in parts for k, v in o.losses.items()},
            stats={k: v for o in parts for k, v in o.stats.items()},
            images={k: v for o in parts for k, v in o.images.items()},
            samples=sum(o.samples for o in parts),
            tokens=sum(o.tokens for o in parts),
            flops=sum(flops) if flops else None,
        )


@dataclass
class EvalResult:
    """What an evaluation gives: scalar metrics (reduced over ranks; logged, written to
    eval.jsonl, used for model selection), CHW images in [0, 1] for TensorBoard (e.g. confusion
    matrices), and per-sample rows (`mmtrain eval` writes them to predictions_*.jsonl)."""

    metrics: Dict[str, Any] = field(default_factory=dict)
    images: Dict[str, torch.Tensor] = field(default_factory=dict)
    rows: List[Dict[str, Any]] = field(default_factory=list)


@runtime_checkable
class DataStream(Protocol):
    """The training data a recipe's `build_data` returns: endless micro-batches whose position is
    part of each rank's checkpoint (`mmtrain.data.reader.ShardLoader` is the shard one)."""

    epoch: int  # passes over the data completed before the current batch

    def __iter__(self) -> Iterator[Any]: ...

    def __next__(self) -> Any: ...

    def stats(self) -> Dict[str, float]:
        """Cumulative counts to log, summed over ranks by the engine (e.g. skipped samples)."""

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...

    def reshard_state(self, states: List[Dict[str, Any]], rank: int, world: int) -> Dict[str, Any]:
        """This rank's state, from the `state_dict()`s of every rank of a run that had another
        number of ranks (resume on a different world size)."""

    def close(self) -> None:
        """Stop any background workers (the engine calls it when training ends); iterating again
        starts them anew."""


class Recipe:
    """Subclass, set `Config`, and implement `build_model`, `build_data` and `step`; a recipe over
    shards starts from `mmtrain.recipes.common.ShardRecipe`."""

    Config = RecipeConfig

    def __init__(self, cfg: RecipeConfig, ctx: RunContext):
        self.cfg = cfg
        self.ctx = ctx

    # -- building --------------------------------------------------------------------------
    def setup(self) -> None:
        """Load what both the model and the data need (tokenizers, frozen towers, label sets)."""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_data(self) -> DataStream:
        raise NotImplementedError

    # -- training --------------------------------------------------------------------------
    def step(self, model: nn.Module, batch: Any) -> StepOutput:
        """One micro-batch forward. `model` is callable like the module `build_model` returned."""
        raise NotImplementedError

    @property
    def backward_parts(self) -> int:
        """How many parts `step_parts` yields for every micro-batch (the same on every rank)."""
        return 1

    def step_parts(self, model: nn.Module, batch: Any) -> Iterator[StepOutput]:
        """One micro-batch as `backward_parts` forwards (e.g. one per task), each backpropagated
        by the engine before the next is built, so only one part's graph is alive at a time.
        Count `samples` in one part only. Default: the one part `step` gives."""
        yield self.step(model, batch)

    def on_step_end(self) -> None:
        """After each optimizer step (collective: every rank calls it)."""

    def on_epoch_end(self, finished: int, new: int) -> None:
        """The data stream moved from epoch `finished` to `new` (collective), before the step of
        the new epoch's first micro-batch."""

    def loss_weight(self, name: str) -> float:
        return float(self.cfg.loss_weights.get(name, 1.0))

    def flops_per_sample(self) -> Optional[float]:
        """Training FLOPs per sample (forward + backward + frozen forwards), for MFU. Optional."""
        return None

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, split: str = "val") -> EvalResult:
        """Held-out metrics during training (`val`), already reduced across ranks. Optional."""
        return EvalResult()

    def score(self, model: nn.Module, split: str) -> EvalResult:
        """Everything `mmtrain eval` reports, with per-sample rows (e.g. generations). Default:
        what `evaluate` gives."""
        return self.evaluate(model, split)

    def export_modules(self, model: nn.Module) -> Dict[str, nn.Module]:
        """Sub-modules `mmtrain export` writes in HF/peft layout; default: HF/peft children."""
        from peft import PeftModel
        from transformers import PreTrainedModel

        kinds = (PreTrainedModel, PeftModel)
        return {name: m for name, m in model.named_children() if isinstance(m, kinds)}

    # -- state beyond the weights ----------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """What this rank of the recipe learns while training beyond the weights (e.g. its part of a
        per-sample loss table), saved with each rank's checkpoint state. Optional."""
        return {}

    def shared_state_dict(self) -> Dict[str, Any]:
        """What the recipe learns that is the same on every rank (e.g. decisions taken from every
        rank's losses): rank 0 saves it once per checkpoint, so that a checkpoint's size does not
        grow with the number of ranks. Optional."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """`state`: the shared state with this rank's own on top (`{**shared, **own}`)."""

    def reshard_state(self, states: List[Dict[str, Any]], rank: int, world: int) -> Dict[str, Any]:
        """This rank's recipe state from the `state_dict()`s every rank of a run on another number of
        ranks saved. Default: identical states carry over; per-rank states must override this."""
        if any(st != states[0] for st in states[1:]):
            raise RuntimeError(
                f"recipe {self.cfg.name} keeps per-rank state and does not say how to re-shard "
                f"it onto {world} ranks: resume on {len(states)} ranks"
            )
        return states[0]
