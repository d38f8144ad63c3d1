"""What a tools module declares: `StageKind`, a pipeline stage kind of its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Sequence


@dataclass
class StageKind:
    """A pipeline stage kind a recipe adds (a tools module's `STAGES`; mmtrain/pipeline.py runs it):
    `run(stage, pipeline, check)` checks the stage's references
    (`check=True`, before anything runs) or runs it and returns its figures (a "text" figure is
    printed whole, e.g. a table); `keys`: the stage's own YAML keys besides the kind's."""

    run: Callable[..., Dict[str, Any]]
    keys: Sequence[str] = ()
