"""The vocabulary every config section is written in; it imports nothing from mmtrain.

`ConfigError` (a problem with a message that names the key or file at fault), the field helpers
(`choices`, `bounded`, `path_field`, `shards_field`: the rules `mmtrain.config.validate` checks
before any process starts) and `RecipeConfig`, the base of every recipe's section. Each section
lives beside the code that reads it (`DataSection` in mmtrain.data.reader, `LoraSection` in
mmtrain.models.lora, ...); mmtrain.config assembles them into one `Config` and loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key or file at fault."""


def choices(*allowed: str, default: str):
    """A string field restricted to `allowed` (checked in `validate`)."""
    return field(default=default, metadata={"choices": allowed})


def bounded(
    default: Any,
    ge: Optional[float] = None,
    gt: Optional[float] = None,
    le: Optional[float] = None,
    lt: Optional[float] = None,
    note: str = "",
):
    """A number restricted to a range (checked in `validate`, which names key, value and range)."""
    return field(default=default, metadata={"range": (ge, gt, le, lt), "note": note})


def out_of_range(value: Any, bounds) -> Optional[str]:
    """The range `value` breaks, written out (e.g. '> 0'), or None when it is inside."""
    ge, gt, le, lt = bounds
    rules = [
        (ge, ">=", lambda v, b: v >= b),
        (gt, ">", lambda v, b: v > b),
        (le, "<=", lambda v, b: v <= b),
        (lt, "<", lambda v, b: v < b),
    ]
    if value is None:
        return None
    if any(b is not None and not ok(value, b) for b, _, ok in rules):
        return " and ".join(f"{op} {b:g}" for b, op, _ in rules if b is not None)
    return None


def path_field(default: Optional[str] = None, must_exist: bool = True, required: bool = False):
    """A filesystem path; when set and `must_exist`, it must exist before the run starts."""
    return field(default=default, metadata={"path": must_exist, "required": required})


def shards_field(default: str = ""):
    """A shard directory or brace pattern; a directory must exist before the run starts."""
    return field(default=default, metadata={"shards": True})


@dataclass
class RecipeConfig:
    """Base of every recipe's own config; `name` selects the recipe."""

    name: str = "toy_lm"
    # Weight of each named loss in the total; a name missing here has weight 1.
    loss_weights: Dict[str, float] = field(default_factory=dict)

    def data_kind(self) -> Optional[str]:
        """The kind of shards (manifest `kind`) this recipe's data sections must hold; None: any."""
        return None
