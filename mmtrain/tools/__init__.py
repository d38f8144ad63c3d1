"""Tools beside training that a recipe adds: commands (`mmtrain kdsl ...`) and pipeline stage kinds
(`mine`, `seesaw`). Above the engine, beside cli.py and pipeline.py, which ask this package.

Each module here declares its own: `add_commands(sub)` (argparse sub-parsers) and `STAGES`
(stage name -> `tools.base.StageKind`). A recipe with tools adds its module to `MODULES`; no lower
layer names this one (recipes/ registers only recipes).
"""

from __future__ import annotations

from typing import Dict

from mmtrain.tools import kdsl
from mmtrain.tools.base import StageKind

MODULES = (kdsl,)


def add_commands(sub) -> None:
    """Every tools module's commands, on the command line's sub-parsers."""
    for module in MODULES:
        module.add_commands(sub)


def stage_kinds() -> Dict[str, StageKind]:
    """Every pipeline stage kind the tools modules declare, by name."""
    kinds: Dict[str, StageKind] = {}
    for module in MODULES:
        clash = set(kinds) & set(module.STAGES)
        if clash:
            raise ValueError(f"{module.__name__} declares stage kinds already declared: {clash}")
        kinds.update(module.STAGES)
    return kinds
