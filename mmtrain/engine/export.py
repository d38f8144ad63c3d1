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

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from mmtrain.config import save_config
from mmtrain.engine.build import build_model, build_recipe
from mmtrain.engine.checkpoint import find_checkpoint
from mmtrain.engine.dist import DistEnv
from mmtrain.engine.weights import load_trained


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
