"""Bytes per sample that the data workers ship to the training process (and it copies to the
device): the tensors of a collated micro-batch over its sample count, per recipe, at the demo
configs with tiny models and synthetic shards (the image size is the vision encoder's: 224 px
unless --image-size). Prints one JSON object.

    python benchmarks/h2d_bytes.py [--out DIR] [--image-size 224]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# recipe config -> (shard kind, overrides naming the tiny models under {m})
RECIPES = {
    "vikdf_stage1": (
        "image-text",
        ["recipe.vision_path={m}/clip", "recipe.text_path={m}/clip", "recipe.bert_init={m}/bert"],
    ),
    "dyncot": ("keyphrase", ["recipe.model_path={m}/qwen2vl"]),
    "kdsl": ("intent", ["recipe.model_path={m}/qwen2vl"]),
}


def tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from tensors(v)


def tensor_bytes(batch) -> int:
    """The bytes of a batch's tensors, a tensor that appears twice counted once (it crosses from
    the data worker once: pickling shares it)."""
    unique = {id(t): t for t in tensors(batch)}
    return sum(t.numel() * t.element_size() for t in unique.values())


def per_sample(recipe_name: str, data: Path, models: Path, batch: int) -> dict:
    from mmtrain.config import load_config
    from mmtrain.data.reader import DataSection, Deal, build_loader
    from mmtrain.engine import dist
    from mmtrain.engine.build import build_recipe

    kind, extra = RECIPES[recipe_name]
    cfg = load_config(
        REPO / "configs" / "demo" / f"{recipe_name}.yaml",
        [
            *(e.format(m=models) for e in extra),
            f"recipe.data.train={data / 'train'}",
            f"recipe.data.val={data / 'val'}",
            f"train.micro_batch_size={batch}",
        ],
    )
    env = dist.DistEnv(0, 1, 0, torch.device("cpu"))
    recipe = build_recipe(cfg, env, torch.float32)
    recipe.setup()
    decode, collate = recipe.pipeline()
    section = DataSection(workers=0)
    loader = build_loader(section, str(data / "train"), decode, collate, Deal(batch))
    got = next(loader)
    n = len(got["key"])
    return {
        "bytes_per_sample": round(tensor_bytes(got) / n),
        "tensors": {
            k: "x".join(map(str, v.shape)) + " " + str(v.dtype).replace("torch.", "")
            for k, v in got.items()
            if torch.is_tensor(v)
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="mmtrain-h2d-"))
    models = root / f"tiny-{args.image_size}"
    run = [sys.executable, "-m", "mmtrain.cli"]
    if not (models / "clip").is_dir():
        cmd = [*run, "models", "tiny", "--out", str(models), "--image-size", str(args.image_size)]
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    report = {"image_size": args.image_size, "micro_batch": args.batch, "recipes": {}}
    for name, (kind, _) in RECIPES.items():
        data = root / kind
        if not data.is_dir():
            cmd = [*run, "data", "synth", "--kind", kind, "--out", str(data), "--n", "40"]
            subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        report["recipes"][name] = per_sample(name, data, models, args.batch)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
