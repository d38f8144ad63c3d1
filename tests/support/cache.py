"""Test assets built once per version of the code that builds them, for every later test run of
the same checkout: the tiny checkpoints take a minute or more to make (their LLM pretrains), and
`make test-all`, `make test-slurm` and `make test-multinode` each need them.

The key is a hash of the building code's source files and the torch and transformers versions;
a change to any of them builds anew (and removes the stale copy). The cache lives in the
checkout's `.cache/` (ignored by git, removed by `make clean`); each test session gets its own
copy, so no test can change what the next one reads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Sequence

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MMTRAIN_TEST_CACHE", REPO / ".cache" / "test-assets"))


def key(sources: Sequence[Path]) -> str:
    import torch
    import transformers

    h = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
    for path in sorted(sources):
        h.update(path.relative_to(REPO).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


_BUILDING: Dict[str, subprocess.Popen] = {}


def build_in_background(name: str, target: str, sources: Sequence[Path]) -> None:
    """Start building `name` with `target` ("module:function", called with the directory) in a
    process of its own, unless it is cached: the session's first tests run meanwhile, and
    `built_once` waits for it."""
    cached = CACHE / f"{name}-{key(sources)}"
    if cached.is_dir() or name in _BUILDING:
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    code = f"from tests.support.cache import _build; _build({target!r}, {str(cached)!r})"
    with open(CACHE / f".{name}.log", "wb") as log:
        _BUILDING[name] = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _build(target: str, cached: str) -> None:
    import importlib

    module, function = target.split(":")
    build = getattr(importlib.import_module(module), function)
    _publish(Path(cached), lambda d: build(str(d)))


def _publish(cached: Path, build: Callable[[Path], object]) -> None:
    """Build into a private directory, then rename it into place: whole or not at all."""
    for stale in cached.parent.glob(f"{cached.name.rsplit('-', 1)[0]}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    partial = cached.parent / f".{cached.name}.{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    build(partial)
    try:
        partial.rename(cached)  # a concurrent builder may have won
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)


def built_once(name: str, build: Callable[[Path], object], sources: Sequence[Path], dest: Path):
    """`build(directory)`'s output, copied to `dest`: built here only if no earlier run of this
    code built it (nor a background build of this session: `build_in_background`)."""
    cached = CACHE / f"{name}-{key(sources)}"
    if name in _BUILDING:
        _BUILDING.pop(name).wait()  # if it failed, the build below shows why
    if not cached.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        _publish(cached, build)
    shutil.copytree(cached, dest, symlinks=True)
    return dest
