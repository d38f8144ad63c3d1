"""Atomic checkpoints: DeepSpeed's state plus ours (step, data position, RNG), latest pointer last.

Layout of `RUN_DIR/checkpoints/`:
    step_00000100/          one complete checkpoint (DeepSpeed files + mmtrain_rank*.pt + mmtrain.json)
    step_00000200/
    latest                  the tag of the newest complete checkpoint (DeepSpeed's convention)
A save goes to `step_N.partial/`, then rank 0 renames it and only then rewrites `latest`
(write-to-temp + os.replace), so a crash at any moment leaves the previous checkpoint and its
pointer intact. The run directory must be on a filesystem every rank sees (as on any cluster).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from mmtrain.engine import dist

TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_tags(root: Path):
    """Tags of complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)
            and (p / "mmtrain.json").is_file()]
    return sorted(tags)


def save(engine, root: Path, step: int, rank_state: Dict[str, Any], info: Dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    env_rank = int(os.environ.get("RANK", "0"))
    tag = tag_for(step)
    partial_tag = tag + ".partial"
    partial = root / partial_tag
    if env_rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=partial_tag, save_latest=False)
    torch.save(rank_state, partial / f"mmtrain_rank{env_rank:05d}.pt")
    dist.barrier()
    final = root / tag
    if env_rank == 0:
        # the marker file written last inside the directory: a dir without it is never resumed from
        _write_atomic(partial / "mmtrain.json", json.dumps({"step": step, **info}, indent=2))
        if final.exists():                      # re-saving a step after a crash-and-resume
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomic(root / "latest", tag)
        best = read_pointer(root, "best")
        for old in complete_tags(root)[:-keep]:
            if old != best:
                shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return final


def read_pointer(root: Path, name: str) -> Optional[str]:
    path = root / name
    return path.read_text().strip() if path.is_file() else None


def mark_best(root: Path, step: int, metric: str, value: float) -> None:
    """Rank 0: checkpoints/best names the checkpoint of `step` (already saved); best.json says why."""
    _write_atomic(root / "best.json", json.dumps({"tag": tag_for(step), "step": step, metric: value}, indent=2))
    _write_atomic(root / "best", tag_for(step))


def find_resume(resume: str, root: Path) -> Optional[Tuple[Path, str]]:
    """(checkpoint root, tag) to resume from, or None for a fresh start."""
    if resume == "never":
        return None
    if resume != "auto":
        p = Path(resume)
        if p.name in ("best", "latest") and (p.parent / p.name).is_file():    # a pointer: follow it
            p = p.parent / (p.parent / p.name).read_text().strip()
        if not (p / "mmtrain.json").is_file():
            raise FileNotFoundError(f"run.resume={resume} is not a complete mmtrain checkpoint "
                                    f"(no mmtrain.json inside)")
        return p.parent, p.name
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (root / tag / "mmtrain.json").is_file():
            return root, tag
        raise FileNotFoundError(f"{latest} names '{tag}', which is not a complete checkpoint in {root}; "
                                f"set run.resume to one of {complete_tags(root) or 'none'} or 'never'")
    tags = complete_tags(root)
    return (root, tags[-1]) if tags else None


def load(engine, root: Path, tag: str, rank: int) -> Dict[str, Any]:
    """Loads DeepSpeed's state into `engine` and returns this rank's mmtrain state."""
    path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    own = root / tag / f"mmtrain_rank{rank:05d}.pt"
    if not own.is_file():
        raise FileNotFoundError(f"{own} is missing: was the checkpoint written with a different number of "
                                f"ranks? (resuming needs the same world size)")
    return torch.load(own, weights_only=False)


def clean_partials(root: Path) -> None:
    if root.is_dir():
        for p in root.glob("*.partial"):
            shutil.rmtree(p, ignore_errors=True)
