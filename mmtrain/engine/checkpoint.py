"""Atomic checkpoints: DeepSpeed's state plus ours (step, data position, RNG), latest pointer last.

Layout of `RUN_DIR/checkpoints/`:
    step_00000100/          one complete checkpoint (DeepSpeed files + mmtrain_rank*.pt + mmtrain.json)
    step_00000200/
    latest                  the tag of the newest complete checkpoint (DeepSpeed's convention)
A save goes to `step_N.partial/`, then rank 0 renames it and only then rewrites `latest`
(write-to-temp + os.replace), so a crash at any moment leaves the previous checkpoint and its
pointer intact. The run directory must be on a filesystem every rank sees (as on any cluster).
A checkpoint resumed on another number of ranks is first converted, once, to DeepSpeed's
universal form in `step_N/universal/`, from which any world size loads its own partitions.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mmtrain.engine import dist

TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> Dict[str, Any]:
    """This process's random states as plain JSON values (no pickle: a checkpoint cannot run code)."""
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [name, mt.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(mt, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.as_tensor(state["cuda"], dtype=torch.uint8))


SHARED_STATE = "mmtrain_shared.json"


def read_shared_state(tag_dir: Path) -> Dict[str, Any]:
    """What every rank had alike, saved once by rank 0 ({} in checkpoints before 2026-12-02, whose
    rank files each carry it)."""
    path = tag_dir / SHARED_STATE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e})") from None


def read_rank_state(tag_dir: Path, rank: int) -> Dict[str, Any]:
    """mmtrain's own state of one rank: JSON, never unpickled. A checkpoint of an older mmtrain
    (`.pt`) is read with torch's weights-only loader, which admits tensors and numpy arrays only."""
    own = tag_dir / f"mmtrain_rank{rank:05d}.json"
    if own.is_file():
        try:
            return json.loads(own.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{own} is damaged ({e})") from None
    legacy = own.with_suffix(".pt")
    if legacy.is_file():
        from numpy._core.multiarray import _reconstruct

        with torch.serialization.safe_globals(
            [np.ndarray, np.dtype, _reconstruct, type(np.dtype(np.uint32))]
        ):
            try:
                state = torch.load(legacy, weights_only=True)
            except Exception as e:
                raise CheckpointError(
                    f"{legacy} cannot be read as data only ({type(e).__name__}: "
                    f"{str(e).splitlines()[0]})"
                ) from None
        rng = state["rng"]
        rng["numpy"] = [rng["numpy"][0], rng["numpy"][1].tolist(), *rng["numpy"][2:]]
        rng["torch"] = rng["torch"].tolist()
        if "cuda" in rng:
            rng["cuda"] = rng["cuda"].tolist()
        rng["python"] = [rng["python"][0], list(rng["python"][1]), rng["python"][2]]
        return state
    raise CheckpointError(f"{own} is missing: {tag_dir} is incomplete")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing a file or damaged, with a message that names the file."""


def verify(tag_dir: Path, deep: bool = False) -> List[str]:
    """What is wrong with checkpoint `tag_dir`, one line per problem (none: it is intact as far as can
    be told without loading it). Every file is checked without unpickling anything: mmtrain's JSON
    parses, each of DeepSpeed's `.pt` files (zip archives) has its central directory, and one
    optimizer-state file per rank is there; `deep` also reads every byte against the archives' CRCs."""
    marker = tag_dir / "mmtrain.json"
    try:
        world = int(json.loads(marker.read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{marker}: not a readable completion marker ({type(e).__name__}: {e})"]
    problems = []
    for r in range(world):
        try:
            read_rank_state(tag_dir, r)
        except CheckpointError as e:
            problems.append(str(e))
    try:
        read_shared_state(tag_dir)
    except CheckpointError as e:
        problems.append(str(e))
    files = sorted(tag_dir.glob("*.pt"))
    optim = [f for f in files if f.name.endswith("optim_states.pt")]
    if optim and len(optim) != world:
        problems.append(f"{tag_dir}: {len(optim)} optimizer-state files for {world} ranks")
    for f in files:
        if f.name.startswith("mmtrain_rank"):
            continue
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip() if deep else None
            if bad:
                problems.append(f"{f}: member {bad} fails its CRC check")
        except (zipfile.BadZipFile, OSError) as e:
            problems.append(f"{f}: damaged ({e})")
    return problems


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_dirs(root: Path):
    """Every step_N directory, complete or not, oldest first."""
    return (
        sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name))
        if root.is_dir()
        else []
    )


def complete_tags(root: Path):
    """Tags of complete checkpoints (their completion marker written), oldest first."""
    return [t for t in step_dirs(root) if (root / t / "mmtrain.json").is_file()]


def save(
    engine,
    root: Path,
    step: int,
    rank: int,
    rank_state: Dict[str, Any],
    info: Dict[str, Any],
    keep: int,
    shared: Optional[Dict[str, Any]] = None,
) -> Path:
    """Collective: every rank calls it, with its own `rank_state`; rank 0 also writes `shared`
    (what every rank holds alike) once. Returns the final checkpoint directory."""
    tag = tag_for(step)
    partial_tag = tag + ".partial"
    partial = root / partial_tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
    dist.barrier()
    need, free = space_needed(root), shutil.disk_usage(root).free
    if dist.any_rank(need > free, torch.device("cpu")):  # every rank stops, or none
        raise CheckpointWriteError(
            f"not enough disk space for checkpoint {tag} in {root}: about {need / 2**30:.2f} "
            f"GiB needed (the size of the last one), {free / 2**30:.2f} GiB free; "
            f"{_intact(root)}; free space, or lower checkpoint.keep"
        )
    try:
        engine.save_checkpoint(str(root), tag=partial_tag, save_latest=False)
        _write_atomic(partial / f"mmtrain_rank{rank:05d}.json", json.dumps(rank_state))
        if rank == 0 and shared is not None:
            _write_atomic(partial / SHARED_STATE, json.dumps(shared))
    except (OSError, RuntimeError) as e:  # torch says "iostream error" / "unexpected pos" when full
        free = shutil.disk_usage(root).free
        full = (
            " The disk is full."
            if free < 2**20 or getattr(e, "errno", None) == errno.ENOSPC
            else ""
        )
        raise CheckpointWriteError(
            f"writing checkpoint {tag} to {partial} failed ({type(e).__name__}: {e}).{full} "
            f"{free / 2**30:.2f} GiB free there; {_intact(root)}"
        ) from e
    dist.barrier()
    final = root / tag
    if rank == 0:
        # the marker file written last inside the directory: a dir without it is never resumed from
        _write_atomic(partial / "mmtrain.json", json.dumps({"step": step, **info}, indent=2))
        if final.exists():  # re-saving a step after a crash-and-resume
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomic(root / "latest", tag)
        best = read_pointer(root, "best")
        for old in complete_tags(root)[:-keep]:
            if old != best:
                shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return final


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, most often); the previous one is intact."""


def space_needed(root: Path) -> int:
    """Bytes the next checkpoint will take: the size of the newest complete one (0 before the first)."""
    tags = complete_tags(root)
    if not tags:
        return 0
    newest = root / tags[-1]
    return sum(f.stat().st_size for f in newest.iterdir() if f.is_file())


def _intact(root: Path) -> str:
    latest = read_pointer(root, "latest")
    return (
        f"the previous checkpoint ({root / latest}) is intact"
        if latest
        else "no earlier checkpoint exists"
    )


def read_pointer(root: Path, name: str) -> Optional[str]:
    """The tag a pointer file (latest, best) names; None without one. Anything but a tag of this
    run (garbage bytes, a path such as ../../other/step_5) is refused, naming the file and the
    usable tags: a pointer is never followed outside the run."""
    path = root / name
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        tag = None
    if tag is None or not TAG_RE.match(tag):
        raise CheckpointError(
            f"{path} should name a checkpoint of this run (step_NNNNNNNN) but holds "
            f"{raw[:60]!r}; set run.resume to one of {complete_tags(root) or 'none'} or 'never' "
            f"(or write the right tag into it)"
        )
    return tag


def check_recipe(root: Path, tag: str, recipe: str) -> None:
    """Refuses a checkpoint that another recipe wrote (mmtrain.json records which)."""
    try:
        by = json.loads((root / tag / "mmtrain.json").read_text()).get("recipe")
    except (OSError, ValueError):
        return  # verify() reports a damaged marker
    if by and by != recipe:
        raise CheckpointError(
            f"checkpoint {root / tag} was written by recipe {by}, and this run's config is for "
            f"recipe {recipe}: use a checkpoint of a {recipe} run (or that run's own directory)"
        )


def mark_best(root: Path, step: int, metric: str, value: float) -> None:
    """Rank 0: checkpoints/best names the checkpoint of `step` (already saved); best.json says why."""
    _write_atomic(
        root / "best.json",
        json.dumps({"tag": tag_for(step), "step": step, metric: value}, indent=2),
    )
    _write_atomic(root / "best", tag_for(step))


def find_resume(
    resume: str, root: Path, skipped: Optional[List[str]] = None
) -> Optional[Tuple[Path, str]]:
    """(checkpoint root, tag) to resume from, or None for a fresh start. With "auto", a damaged newest
    checkpoint is passed over for the newest intact one; `skipped` collects why (to be logged)."""
    if resume == "never":
        return None
    if resume != "auto":
        p = Path(resume)
        # a tag of this run
        if not p.is_dir() and TAG_RE.match(resume) and (root / resume).is_dir():
            p = root / resume
        if p.name in ("best", "latest") and (p.parent / p.name).is_file():  # a pointer: follow it
            p = p.parent / read_pointer(p.parent, p.name)
        if not (p / "mmtrain.json").is_file():
            raise FileNotFoundError(
                f"run.resume={resume} is not a complete mmtrain checkpoint (no mmtrain.json inside)"
            )
        problems = verify(p)
        if problems:
            raise CheckpointError(
                f"run.resume={resume}: the checkpoint is damaged: {'; '.join(problems[:3])}"
            )
        return p.parent, p.name
    latest = root / "latest"
    tags = complete_tags(root)
    if latest.is_file():
        tag = read_pointer(root, "latest")
        if not (root / tag / "mmtrain.json").is_file():
            raise FileNotFoundError(
                f"{latest} names '{tag}', which is not a complete checkpoint in {root}; "
                f"set run.resume to one of {tags or 'none'} or 'never'"
            )
        tags = [t for t in tags if t <= tag]
    for tag in reversed(tags):
        problems = verify(root / tag)
        if not problems:
            return root, tag
        if skipped is not None:
            skipped.append(
                f"checkpoint {root / tag} is damaged, passed over for an earlier one: "
                f"{'; '.join(problems[:3])}"
            )
    if tags:
        raise CheckpointError(
            f"every checkpoint in {root} is damaged ({', '.join(tags)}); "
            f"`mmtrain ckpt verify {root.parent}` lists what is wrong"
        )
    if step_dirs(root):
        raise FileExistsError(
            f"{root} holds {', '.join(step_dirs(root))} but no complete checkpoint (no `latest`, "
            f"no mmtrain.json inside) to resume from: a run started here would write over them. "
            f"Move them away, or start a new run "
            f"with run.name=<another name>"
        )
    return None


def saved_world(root: Path, tag: str) -> int:
    """The number of ranks that wrote checkpoint `tag`."""
    return int(json.loads((root / tag / "mmtrain.json").read_text())["world_size"])


def universal(root: Path, tag: str) -> str:
    """Collective: the tag of `tag`'s DeepSpeed universal checkpoint (`tag/universal`), converted once by
    rank 0 with DeepSpeed's own `ds_to_universal` (written aside, then renamed: never half there)."""
    out = root / tag / "universal"

    def convert() -> None:
        if out.is_dir():
            return
        partial = root / tag / "universal.partial"
        shutil.rmtree(partial, ignore_errors=True)
        # the other ranks wait idle meanwhile
        workers = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(root / tag),
            "--output_folder",
            str(partial),
            "--num_extract_workers",
            workers,
            "--num_merge_workers",
            workers,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(
                f"converting {root / tag} to a universal checkpoint failed ({' '.join(cmd)}):\n"
                f"{done.stderr[-2000:]}"
            )
        os.replace(partial, out)

    dist.solo(convert, f"converting {root / tag} to a universal checkpoint")
    return f"{tag}/universal"


def load(engine, root: Path, tag: str, rank: int, world: int) -> List[Dict[str, Any]]:
    """Loads DeepSpeed's state into `engine` and returns the mmtrain states to continue from: this
    rank's alone (same world size), or every saved rank's, in rank order, when the checkpoint was
    written by another number of ranks; DeepSpeed's state then comes from its universal form, with
    the optimizer state re-partitioned over this world."""
    old_world = saved_world(root, tag)
    ds_tag = tag if old_world == world else universal(root, tag)
    # the torch AdamW under ZeRO
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    decay = [g["weight_decay"] for g in optimizer.param_groups]
    try:
        path, _ = engine.load_checkpoint(
            str(root), tag=ds_tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    except Exception as e:
        raise CheckpointError(
            f"DeepSpeed could not load checkpoint {root / ds_tag} ({type(e).__name__}: {e}); "
            f"`mmtrain ckpt verify {root.parent} --deep` checks every file, and "
            f"run.resume=<an earlier step_N> resumes from another"
        ) from e
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {root / ds_tag}")
    if ds_tag != tag:
        # Two slips of DeepSpeed's ZeRO-3 universal loader (0.19.8, stage3.py), each changing the
        # run:
        # every parameter group gets the hyperparameters of the first (biases and norms would be
        # decayed), and every group's Adam state shares one `step` tensor, which AdamW increments in
        # place once per group (bias correction would run ahead).
        for g, wd in zip(optimizer.param_groups, decay):
            g["weight_decay"] = wd
        for st in optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
    return [
        read_rank_state(root / tag, r) for r in ([rank] if old_world == world else range(old_world))
    ]


def clean_partials(root: Path) -> None:
    if root.is_dir():
        for p in root.glob("*.partial"):
            shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(run_dir: Path, tag: Optional[str], overrides: Sequence[str] = ()):
    """(resolved config, checkpoint root, tag) of a run: `tag` or a pointer (best, latest), else latest.
    `overrides` (key=value) change the saved config for this use only (e.g. recipe.rules=...)."""
    from mmtrain.config import ConfigError, load_config, load_run_config

    if overrides:
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(
                f"{run_dir} is not an mmtrain run directory: {run_dir / 'config.yaml'} is missing"
            )
        cfg = load_config(run_dir / "config.yaml", overrides)
    else:
        cfg = load_run_config(run_dir)
    root = run_dir / "checkpoints"
    found = find_resume(str(root / tag) if tag else "auto", root)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in {root}")
    check_recipe(*found, cfg.recipe.name)
    return (cfg, *found)
