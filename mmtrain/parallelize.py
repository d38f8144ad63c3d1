"""What data parallelism under ZeRO-3 asks of a model, kept apart from the models themselves.

A recipe builds its model plainly, then applies what its parallel layout needs:

- `replicate_frozen(model, name)`: a frozen sub-module every rank keeps whole (BVIF's LLM
  without LoRA). ZeRO-3 partitions the parameters of registered sub-modules and gathers them
  around every forward; a frozen module used whole on every rank is faster replicated, and it
  stays out of checkpoints. The attribute still reads `model.<name>`.
- `keep_vision_in_graph(mllm, processor)`: ZeRO-3's parameter gathers are collectives, so every
  rank must touch the same parameters in the same order on every step. When one rank's
  micro-batch is text-only, the vision tower would be skipped there; this runs it on a small
  blank image right after the token embedding (where a batch with images runs it) and keeps its
  output in the loss at weight 0.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List

import torch
from torch import nn


def numel(p: torch.Tensor) -> int:
    """A parameter's full size, also when ZeRO-3 has partitioned it (its own numel() is 0 then)."""
    return int(getattr(p, "ds_numel", p.numel()))


def ndim(p: torch.Tensor) -> int:
    """A parameter's full number of dimensions, also when ZeRO-3 has partitioned it (then 1)."""
    return len(getattr(p, "ds_shape", p.shape))


def partitioned(p: torch.Tensor) -> bool:
    """Whether ZeRO-3 keeps only a partition of this parameter on each rank (not when it
    persists whole, below the persistence threshold)."""
    return hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False)


def held(p: torch.Tensor) -> int:
    """How many of a parameter's elements this rank holds: its partition under ZeRO-3, else all."""
    return p.ds_tensor.numel() if partitioned(p) else numel(p)


def partition_summary(model: nn.Module) -> Dict[str, int]:
    """Elements and tensors of `model`'s parameters, and how many of each this rank holds."""
    params = list(model.parameters())
    return {
        "elements": sum(numel(p) for p in params),
        "held": sum(held(p) for p in params),
        "tensors": len(params),
        "partitioned_tensors": sum(partitioned(p) for p in params),
    }


def checkpoint_activations(model: nn.Module) -> List[str]:
    """Activation (gradient) checkpointing, non-reentrant, in every transformers model inside
    `model` that supports it: each layer keeps only its input for the backward pass and runs its
    forward again there. Returns the names of the outermost models it turned on in.

    The recomputation runs with the peft adapters that were active in the forward pass: a model
    with one adapter per task routes each task's forward through its own (`use_adapter`), and
    the backward pass, after all of them, would otherwise recompute every task's layers with
    whichever adapter is active then (the task's LoRA gradients came out wrong).

    transformers checkpoints a layer only in training mode, so a frozen model kept in eval mode
    (BVIF's replicated LLM) keeps its activations."""
    from transformers import PreTrainedModel

    kwargs: Dict[str, Any] = {"use_reentrant": False}
    replay = _adapter_replay(model)
    if replay is not None:
        kwargs["context_fn"] = replay
    turned_on: List[str] = []
    for name, module in model.named_modules():
        if not (isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing):
            continue
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if not any(name == t or name.startswith(t + ".") for t in turned_on if t):
            turned_on.append(name)
    return turned_on


class _ActiveAdapters:
    """During a recomputation: the peft layers' active adapters as they were in the forward."""

    def __init__(self, layers: List[nn.Module], active: List[Any]):
        self.layers, self.active, self.saved = layers, active, []

    def __enter__(self):
        self.saved = [m._active_adapter for m in self.layers]
        for m, a in zip(self.layers, self.active):
            m._active_adapter = a

    def __exit__(self, *exc):
        for m, a in zip(self.layers, self.saved):
            m._active_adapter = a


def _adapter_replay(model: nn.Module):
    """torch.utils.checkpoint's `context_fn` that replays the active peft adapters, or None."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        return None

    def context_fn():
        active = [m._active_adapter for m in layers]
        return contextlib.nullcontext(), _ActiveAdapters(layers, active)

    return context_fn


def replicate_frozen(model: nn.Module, name: str) -> nn.Module:
    """Unregister sub-module `name` (frozen) so ZeRO-3 never partitions it; returns `model`."""
    child = model._modules.pop(name)
    if any(p.requires_grad for p in child.parameters()):
        raise ValueError(f"replicate_frozen: {name} has trainable parameters")
    object.__setattr__(model, name, child)
    return model


def share_module(parent: nn.Module, name: str) -> nn.Module:
    """Unregister sub-module `name` of `parent`, still reachable as `parent.<name>`: it is
    registered elsewhere in the same model (a module used by two owners), and ZeRO-3 must see
    each parameter once. Returns `parent`."""
    child = parent._modules.pop(name)
    object.__setattr__(parent, name, child)
    return parent


def blank_image_inputs(processor) -> Dict[str, torch.Tensor]:
    """The vision inputs of one small blank image, for text-only batches."""
    from PIL import Image

    enc = processor.image_processor(images=[Image.new("RGB", (56, 56))], return_tensors="pt")
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def _tensor_sum(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.float().sum()
    if isinstance(x, dict) or hasattr(x, "values"):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        parts = [_tensor_sum(v) for v in x if v is not None]
        return sum(parts) if parts else torch.zeros(())
    return torch.zeros(())


class _VisionTouch:
    """The hooks of `keep_vision_in_graph` and what they share within one forward."""

    def __init__(self, mllm: nn.Module, blank: Dict[str, torch.Tensor]):
        self.mllm = mllm
        self.blank = blank
        self.pending = False
        self.ran_blank = False  # whether the last forward ran the tower on the blank image

    def before_forward(self, module, args, kwargs):
        batch = args[1] if len(args) > 1 else kwargs.get("batch", {})
        self.pending = "pixel_values" not in batch
        self.ran_blank = False

    def before_language_model(self, module, args, kwargs):
        if not self.pending:
            return
        self.pending = False
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError("keep_vision_in_graph: the language model was not given inputs_embeds")
        base, device = self.mllm.base_model(), embeds.device
        vision_dtype = next(p.dtype for n, p in base.named_parameters() if "vis" in n)
        blank = {
            k: (v.to(device, vision_dtype) if v.is_floating_point() else v.to(device))
            for k, v in self.blank.items()
        }
        # what the model itself uses of the tower (the projected features, `pooler_output`), so
        # that the backward runs through the same modules in the same order; the tower's hidden
        # states (returned too) would reach it around the merger or projector
        features = base.get_image_features(**blank, return_dict=True)
        out = _tensor_sum(getattr(features, "pooler_output", features))
        self.ran_blank = True
        return args, {**kwargs, "inputs_embeds": embeds + 0.0 * out.to(embeds.dtype)}


def keep_vision_in_graph(mllm: nn.Module, processor) -> nn.Module:
    """Hooks on an `MLLM` that run its vision tower on text-only batches; returns `mllm`.

    The tower runs, and joins the graph, where a batch with images runs it: after the input
    embeddings, into the language model's input (a pre-hook of `language_model` adds 0 x its
    output to `inputs_embeds`). Under ZeRO-3 every rank must gather the same parameters in the same
    order in every step, backward included, or DeepSpeed's trace of them breaks on one rank and
    not on the other, and the two then wait on each other's collectives for good. Before, a
    text-only batch added the tower's output to the loss: its backward then ran first, not last,
    out of step with a rank reading images (hidden while the tiny test models kept every tensor
    whole)."""
    touch = _VisionTouch(mllm, blank_image_inputs(processor))
    mllm.vision_touch = touch  # not a module: what the last forward did, for tests and debugging
    mllm.register_forward_pre_hook(touch.before_forward, with_kwargs=True)
    language = getattr(getattr(mllm.base_model(), "model", None), "language_model", None)
    if language is None:
        raise ValueError(
            f"keep_vision_in_graph: {type(mllm.base_model()).__name__} has no model.language_model "
            f"(the layout of transformers' image-text-to-text models) to run the vision tower before"
        )
    language.register_forward_pre_hook(touch.before_language_model, with_kwargs=True)
    return mllm


def clear_zero3_gradients(engine) -> None:
    """Zero ZeRO-3's gradient partitions before an accumulation window. DeepSpeed 0.19.8 copies a
    parameter's gradient into its partition at the window's first micro-step and adds at later
    ones, but only for parameters that get a gradient there: one that first gets a gradient in a
    later micro-step (a task's adapter under per-task backward, the second task's) is added onto
    the previous window's gradient. Measured: KDSL's intent loss at step 3 was 4.412 per task
    against 4.371 in one backward (and at ZeRO stage 0). A no-op outside ZeRO-3 and under
    optimizer offload (which keeps gradients elsewhere and skips parameters a window left
    unused)."""
    buffer = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
    if isinstance(buffer, torch.Tensor):
        buffer.zero_()
