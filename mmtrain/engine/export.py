"""`mmtrain export RUN_DIR OUT_DIR`: a training checkpoint -> files that load without mmtrain.

Writes
    OUT_DIR/model.safetensors    the whole recipe model, consolidated from the ZeRO shards (fp32)
    OUT_DIR/<name>/              each HF sub-module via `save_pretrained`; a peft-wrapped one as
                                 its LoRA adapter (peft format), `<name>-merged/` with --merge-lora
    OUT_DIR/config.yaml          the run's resolved config
Consolidation reads the checkpoint files (DeepSpeed's zero_to_fp32), so it needs no GPUs and no
process group, and LoRA adapters are never empty the way a ZeRO-3 `save_pretrained` of
un-gathered parameters is.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from mmtrain.config import load_run_config, save_config
from mmtrain.engine import checkpoint
from mmtrain.engine.build import TIED_HEADS, build_model, build_recipe
from mmtrain.engine.dist import DistEnv


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


def find_checkpoint(run_dir: Path, tag: Optional[str], overrides: Sequence[str] = ()):
    """(resolved config, checkpoint root, tag) of a run: `tag` or a pointer (best, latest), else latest.
    `overrides` (key=value) change the saved config for this use only (e.g. recipe.rules=...)."""
    if overrides:
        from mmtrain.config import ConfigError, load_config

        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(
                f"{run_dir} is not an mmtrain run directory: {run_dir / 'config.yaml'} is missing"
            )
        cfg = load_config(run_dir / "config.yaml", overrides)
    else:
        cfg = load_run_config(run_dir)
    root = run_dir / "checkpoints"
    found = checkpoint.find_resume(str(root / tag) if tag else "auto", root)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in {root}")
    checkpoint.check_recipe(*found, cfg.recipe.name)
    return (cfg, *found)


def load_trained(model: torch.nn.Module, root: Path, tag: str) -> None:
    """Consolidated checkpoint weights into the recipe's model (tied weights may be stored once)."""
    missing, unexpected = model.load_state_dict(consolidated_state_dict(root, tag), strict=False)

    tied = {k for k in missing if k.endswith(TIED_HEADS)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"checkpoint {root / tag} does not match the recipe's model: "
            f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def export(
    run_dir: str,
    out_dir: str,
    tag: Optional[str] = None,
    merge_lora: bool = False,
    overwrite: bool = False,
) -> Path:
    from peft import PeftModel
    from safetensors.torch import save_file

    run_dir, out = Path(run_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty; choose a new directory or pass --overwrite"
        )
    cfg, root, tag = find_checkpoint(run_dir, tag)
    recipe = build_recipe(
        cfg,
        DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")),
        torch.float32,
        run_dir,
    )
    model = build_model(recipe, cfg.run.seed)
    load_trained(model, root, tag)

    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    # safetensors refuses shared storage: write independent contiguous copies
    save_file(
        {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
        str(staging / "model.safetensors"),
        metadata={"format": "pt", "mmtrain_tag": tag},
    )
    written = {}
    for name, module in recipe.export_modules(model).items():
        module.save_pretrained(str(staging / name))
        written[name] = "peft-adapter" if isinstance(module, PeftModel) else "hf"
        if merge_lora and isinstance(module, PeftModel):
            module.merge_and_unload().save_pretrained(str(staging / f"{name}-merged"))
            written[f"{name}-merged"] = "hf"
    save_config(cfg, staging / "config.yaml")
    (staging / "export.json").write_text(
        json.dumps({"checkpoint": str((root / tag).resolve()), "modules": written}, indent=2)
    )
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out
