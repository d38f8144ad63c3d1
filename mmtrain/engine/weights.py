"""A checkpoint's weights for evaluation: consolidated once, then loaded whole or partitioned.

`consolidate` turns a DeepSpeed checkpoint into one safetensors file beside it, written once by
rank 0 (parameters in the run's precision, buffers such as RoPE's `inv_freq` as trained, in
fp32) and reused by every later evaluation of that checkpoint. `load_whole` copies it into a
model that every rank holds whole, one tensor at a time (never a second copy of the model in
memory); `load_partitioned` into a model whose parameters ZeRO-3 partitions across the ranks,
a group of parameters gathered at a time, so no rank ever holds the whole model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import torch
from torch import nn

from mmtrain.engine import dist
from mmtrain.engine.build import DTYPES, TIED_HEADS

CACHE = "consolidated-{precision}.safetensors"
GATHER_ELEMENTS = 1 << 28  # parameters gathered at once while loading partitioned (~512 MiB bf16)


class WeightsError(RuntimeError):
    """A consolidated file that does not fit the model it is loaded into."""


def consolidated_state_dict(root: Path, tag: str) -> Dict[str, torch.Tensor]:
    tag_dir = root / tag
    if list(tag_dir.glob("*optim_states.pt")) and list(tag_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed's converter prints what it reads, a few lines per checkpoint, to stdout
        with contextlib.redirect_stdout(io.StringIO()) as said:
            state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        logging.getLogger("mmtrain").info("%s", said.getvalue().strip())
        return state
    # ZeRO stage 0: rank 0's model-states file holds the whole module
    return torch.load(
        tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )["module"]


def load_trained(model: torch.nn.Module, root: Path, tag: str) -> None:
    """Consolidated checkpoint weights into the recipe's model (tied weights may be stored once)."""
    missing, unexpected = model.load_state_dict(consolidated_state_dict(root, tag), strict=False)

    tied = {k for k in missing if k.endswith(TIED_HEADS)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"checkpoint {root / tag} does not match the recipe's model: "
            f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def buffer_names(tag_dir: Path) -> Set[str]:
    """The module's buffers, as DeepSpeed lists them in every model-states file it writes."""
    files = sorted(tag_dir.glob("*model_states.pt"), key=lambda f: f.stat().st_size)
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model-states file")
    states = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    return set(states.get("buffer_names") or ())


def _write(root: Path, tag: str, precision: str, path: Path) -> None:
    from safetensors.torch import save_file

    keep = buffer_names(root / tag)
    dtype = DTYPES[precision]
    state = consolidated_state_dict(root, tag)
    out = {}
    for name in list(state):
        t = state.pop(name)
        cast = t.is_floating_point() and name not in keep
        # independent contiguous copies: safetensors refuses tensors that share storage
        out[name] = t.to(dtype if cast else t.dtype, copy=True).contiguous()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(out, str(tmp), metadata={"format": "pt", "mmtrain_tag": tag})
    os.replace(tmp, path)


def consolidate(root: Path, tag: str, precision: str) -> Path:
    """The checkpoint's weights as CHECKPOINT/consolidated-<precision>.safetensors: written by
    rank 0 unless there already, while the other ranks wait (`dist.solo`: however long it
    takes). Collective."""
    path = root / tag / CACHE.format(precision=precision)

    def write() -> None:
        if not path.is_file():
            _write(root, tag, precision, path)

    try:
        dist.solo(write, f"consolidating {root / tag}")
    except RuntimeError as e:
        raise RuntimeError(f"could not consolidate {root / tag} into {path} ({e})") from None
    return path


def stored_bytes(path: Path) -> int:
    """Bytes of the weights in a safetensors file: the file less its 8-byte header length and
    its JSON header (the data region holds the tensors and nothing else)."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


def _targets(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every name a state dict may use for the model's parameters (tied ones under each of their
    names) and persistent buffers."""
    out: Dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and name not in mod._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = b
    return out


def _match(model: nn.Module, names: List[str], path: Path) -> Dict[str, torch.Tensor]:
    targets = _targets(model)
    missing = set(targets) - set(names)
    missing = {k for k in missing if not k.endswith(TIED_HEADS)}
    unexpected = set(names) - set(targets)
    if missing or unexpected:
        raise WeightsError(
            f"{path} does not match the recipe's model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return targets


def load_whole(model: nn.Module, path: Path) -> None:
    """The file's tensors copied into `model` (held whole on this rank) in place, each cast to the
    dtype and device of the tensor it replaces."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
        targets = _match(model, names, path)
        with torch.no_grad():
            for name in names:
                targets[name].copy_(f.get_tensor(name))


def _groups(named: List[Tuple[str, nn.Parameter]]) -> Iterator[List[Tuple[str, nn.Parameter]]]:
    """Parameters in groups of at most GATHER_ELEMENTS elements (one larger one alone)."""
    from mmtrain.parallelize import numel

    group: List[Tuple[str, nn.Parameter]] = []
    size = 0
    for name, p in named:
        if group and size + numel(p) > GATHER_ELEMENTS:
            yield group
            group, size = [], 0
        group.append((name, p))
        size += numel(p)
    if group:
        yield group


def load_partitioned(model: nn.Module, path: Path) -> None:
    """The file's tensors into a model whose parameters ZeRO-3 partitions: each group of
    parameters is gathered, rank 0 copies the file's values in, and DeepSpeed re-partitions them
    on the way out. Buffers (never partitioned) are copied on every rank. Collective."""
    import deepspeed
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
        targets = _match(model, names, path)
        stored_as: Dict[int, str] = {}  # a tied parameter is read under one of its names
        for name in names:
            stored_as.setdefault(id(targets[name]), name)
        params = [(n, p) for n, p in model.named_parameters() if id(p) in stored_as]
        with torch.no_grad():
            for group in _groups(params):
                with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=0):
                    if dist.is_main():
                        for _, p in group:
                            p.copy_(f.get_tensor(stored_as[id(p)]))
            for name in names:
                if not isinstance(targets[name], nn.Parameter):
                    targets[name].copy_(f.get_tensor(name))
