"""`mmtrain bench zero`: one training step of a Llama-style LM through the real engine, at each
ZeRO configuration the anchors compare, side by side in one run, as JSON lines.

Each configuration is a real `mmtrain train` of the toy-LM recipe (a fresh process, its own run
directory): DeepSpeed, the engine's loss and logging path, checkpoints off until the end. The
first half of the steps warms up; the engine's own throughput figures over the second half
(train.log) are reported, with each configuration's step time as a ratio to stage 0's.

Sizes: `267m` is the anchors' model (hidden 1,024, 12 layers, 16 heads, vocabulary 32,000,
batch 16 x 1,024 tokens, bf16: 266.9M parameters); `tiny` is a CPU smoke size.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
REPO_CONFIG = CONFIGS_DIR / "demo" / "toy_lm.yaml"

SIZES = {
    "267m": [
        "recipe.hidden_size=1024",
        "recipe.num_layers=12",
        "recipe.num_heads=16",
        "recipe.vocab_size=32000",
        "recipe.seq_len=1024",
        "train.micro_batch_size=16",
        "deepspeed.precision=bf16",
    ],
    "tiny": [
        "recipe.hidden_size=64",
        "recipe.num_layers=2",
        "recipe.num_heads=4",
        "recipe.vocab_size=256",
        "recipe.seq_len=64",
        "train.micro_batch_size=4",
        "deepspeed.precision=fp32",
    ],
}

# what the anchors measured (../shared/anchors.md), and mmtrain's own choices
CONFIGS = {
    "stage0": ["deepspeed.zero_stage=0"],
    "stage2": ["deepspeed.zero_stage=2"],
    "stage3_deepspeed_defaults": [
        "deepspeed.zero_stage=3",
        "deepspeed.reduce_bucket_size=500000000",
        "deepspeed.prefetch_bucket_size=50000000",
        "deepspeed.param_persistence_threshold=100000",
    ],
    "stage3_mmtrain": ["deepspeed.zero_stage=3"],  # sizes auto, from the hidden size
    "auto": ["deepspeed.zero_stage=auto"],
}

LOG_LINE = re.compile(r"step (\d+)/(\d+) (.*)$")


def last_window(log: str) -> Dict[str, float]:
    """The scalars of train.log's last `step N/N k=v ...` line."""
    found = None
    for line in log.splitlines():
        m = LOG_LINE.search(line)
        if m and m.group(1) == m.group(2):
            found = m.group(3)
    if found is None:
        raise RuntimeError("no final step line in train.log")
    return {k: float(v) for k, v in (kv.split("=", 1) for kv in found.split())}


def measure(
    config: Path,
    overrides: Sequence[str],
    out: Path,
    name: str,
    steps: int,
    ranks: int = 1,
) -> Dict[str, object]:
    """`mmtrain train CONFIG OVERRIDES` for 2 x steps//2 steps in OUT/NAME: the engine's own
    throughput over the second half (train.log's last line), or the error that ended it."""
    half = max(1, steps // 2)
    overrides = [
        *overrides,
        f"run.out_dir={out}",
        f"run.name={name}",
        f"train.steps={2 * half}",
        "train.warmup_ratio=0.0",
        f"log.every={half}",
        "log.progress=false",
        "log.console=false",
        "log.tensorboard=false",
        "eval.every=0",
        "eval.at_end=false",
        "checkpoint.every=0",
    ]
    launch = [sys.executable, "-m", "mmtrain.cli"]
    if ranks > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}"]
        launch += ["-m", "mmtrain.cli"]
    proc = subprocess.run(
        [*launch, "train", str(config), *overrides],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")),
    )
    log_path = out / name / "train.log"
    log = log_path.read_text() if log_path.is_file() else ""
    if proc.returncode != 0:
        return {"config": name, "error": (proc.stderr or log)[-2000:]}
    values = last_window(log)
    # the stage auto chose, else the one the resolved config (logged first) names
    stage = re.search(r"zero_stage=auto: stage (\d)", log) or re.search(r"zero_stage: '?(\d)", log)
    return {
        "config": name,
        "zero_stage": int(stage.group(1)) if stage else None,
        "step_ms": 1000 * values["train/step_time_s"],
        "samples_per_s": values["train/samples_per_s"],
        "tokens_per_s": values["train/tokens_per_s"],
        "mfu": values.get("train/mfu"),
        "peak_memory_gib": values.get("train/peak_memory_gib"),
        "measured_steps": half,
    }


def bench_zero(
    size: str = "267m",
    steps: int = 16,
    configs: Optional[List[str]] = None,
    ranks: int = 1,
    out_dir: Optional[str] = None,
) -> List[Dict[str, object]]:
    """Every configuration in one run, each line with its step time relative to stage 0."""
    names = configs or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    with tempfile.TemporaryDirectory(prefix="mmtrain-bench-", dir=out_dir) as tmp:
        rows = [
            measure(REPO_CONFIG, [*SIZES[size], *CONFIGS[n]], Path(tmp), n, steps, ranks)
            for n in names
        ]
    base = next((r for r in rows if r["config"] == "stage0" and "step_ms" in r), None)
    for r in rows:
        r["size"], r["ranks"] = size, ranks
        if base and "step_ms" in r:
            r["step_vs_stage0"] = r["step_ms"] / base["step_ms"]
    return rows


def main(size: str, steps: int, configs: Optional[List[str]], ranks: int) -> int:
    rows = bench_zero(size, steps, configs, ranks)
    for r in rows:
        print(json.dumps(r))
    return 1 if any("error" in r for r in rows) else 0


def bench_vikdf_stage1(
    size: str = "published",
    steps: int = 8,
    batch: int = 128,
    ranks: int = 1,
    out_dir: Optional[str] = None,
) -> Dict[str, object]:
    """VIKDF stage 1 as users run it: configs/vikdf/stage1.yaml through the engine (DeepSpeed
    at the config's ZeRO stage, bf16 with fp32 master weights, the WebDataset reader decoding
    and augmenting synthetic 224-px JPEGs), over random CLIP ViT-L/14 and bert-base weights at
    full depth with CLIP's vocabulary size. `tiny`: the demo config and models (CPU smoke)."""
    from mmtrain.data.synth import synth
    from mmtrain_testing.tiny import make_tiny_vikdf_towers, make_vikdf_towers_at_published_widths

    with tempfile.TemporaryDirectory(prefix="mmtrain-bench-", dir=out_dir) as tmp:
        root = Path(tmp)
        if size == "published":
            models = make_vikdf_towers_at_published_widths(
                str(root / "models"), full_depth=True, vocab_size=49408
            )
            config = CONFIGS_DIR / "vikdf" / "stage1.yaml"
            extra = ["recipe.data.workers=8"]
        else:
            models = make_tiny_vikdf_towers(str(root / "models"))
            config = CONFIGS_DIR / "demo" / "vikdf_stage1.yaml"
            extra = ["recipe.data.workers=1", "deepspeed.precision=fp32"]
        synth("image-text", str(root / "data"), max(64, 2 * batch), seed=0)
        row = measure(
            config,
            [
                f"recipe.vision_path={models / 'clip'}",
                f"recipe.text_path={models / 'clip'}",
                f"recipe.bert_init={models / 'bert'}",
                f"recipe.data.train={root / 'data' / 'train'}",
                f"recipe.data.val={root / 'data' / 'val'}",
                "recipe.data.mode=resampled",
                "recipe.data.steps_per_epoch=100",
                "recipe.image_log_every=0",
                f"train.micro_batch_size={batch // ranks}",
                *extra,
            ],
            root / "runs",
            "vikdf_stage1",
            steps,
            ranks,
        )
    return {"kind": "stage1_mmtrain_engine", "size": size, "B": batch, "ranks": ranks, **row}


# `bench recipe`: (config at published width, demo config, shard kind, model shape, overrides)
RECIPES = {
    "dyncot": ("dyncot/qwen2vl_2b.yaml", "demo/dyncot.yaml", "keyphrase", "2b", []),
    "kdsl": ("kdsl/qwen2vl_7b.yaml", "demo/kdsl.yaml", "intent", "7b", []),
}


def bench_recipe(
    name: str, size: str = "published", steps: int = 8, batch: int = 2, out_dir=None
) -> Dict[str, object]:
    """One recipe's training step through the engine on one process: `published`, its published
    config (bf16, its ZeRO settings) over a random Qwen2-VL at the released checkpoint's widths
    with one layer per stack; `tiny`, the demo config and a tiny model (CPU smoke)."""
    from mmtrain.data.synth import synth
    from mmtrain_testing.tiny import make_tiny_vlm

    published, demo, kind, shape, extra = RECIPES[name]
    with tempfile.TemporaryDirectory(prefix="mmtrain-bench-", dir=out_dir) as tmp:
        root = Path(tmp)
        model = make_tiny_vlm(str(root / "model"), shape=shape if size == "published" else None)
        synth(kind, str(root / "data"), max(40, 8 * batch), seed=0)
        config = CONFIGS_DIR / (published if size == "published" else demo)
        if size != "published":
            extra = [*extra, "deepspeed.precision=fp32"]
        row = measure(
            config,
            [
                f"recipe.model_path={model}",
                f"recipe.data.train={root / 'data' / 'train'}",
                f"recipe.data.val={root / 'data' / 'val'}",
                "recipe.data.workers=1",
                f"train.micro_batch_size={batch}",
                *extra,
            ],
            root / "runs",
            name,
            steps,
        )
    return {"kind": f"{name}_mmtrain_engine", "size": size, "B": batch, **row}


def main_recipe(name: str, size: str, steps: int, batch: int) -> int:
    row = bench_recipe(name, size, steps, batch)
    print(json.dumps(row))
    return 1 if "error" in row else 0


def main_vikdf(
    which: str, size: str, steps: int, batch: int, ranks: int, baseline: Optional[str]
) -> int:
    """`bench vikdf-stage1|vikdf-fusion --engine`: our step through the engine, then (with
    `baseline`, on a GPU) the peer's plain-HF step at the same batch in a fresh process, and the
    ratio of samples/s (targets: 1.5x for stage 1, 1.3x for fusion)."""
    if which == "stage1":
        return side_by_side(bench_vikdf_stage1(size, steps, batch, ranks), baseline, "stage1", 1.5)
    return side_by_side(bench_vikdf_fusion(size, steps, batch, ranks), baseline, "stage2", 1.3)


def _fusion_models(size: str, root: Path):
    """(towers dir, LLM dir, IQ-Former config, run config, overrides) of the fusion bench."""
    import torch

    from mmtrain_testing.tiny import (
        iqformer_config,
        make_llama_at_published_width,
        make_tiny_llama,
        make_tiny_vikdf_towers,
        make_vikdf_towers_at_published_widths,
    )

    if size != "published":
        towers = make_tiny_vikdf_towers(str(root / "towers"))
        llm = make_tiny_llama(str(root / "llama"))
        extra = ["recipe.data.workers=1", "deepspeed.precision=fp32"]
        return (
            towers,
            llm,
            iqformer_config("tiny"),
            CONFIGS_DIR / "demo" / "vikdf_fusion.yaml",
            extra,
        )
    towers = make_vikdf_towers_at_published_widths(
        str(root / "towers"), full_depth=True, vocab_size=49408
    )
    llm = make_llama_at_published_width(
        str(root / "llama"),
        layers=32,
        vocab_size=32000,
        dtype=torch.bfloat16,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    config = CONFIGS_DIR / "vikdf" / "stage2_fusion.yaml"
    return towers, llm, iqformer_config("published"), config, ["recipe.data.workers=8"]


def bench_vikdf_fusion(
    size: str = "published",
    steps: int = 8,
    batch: int = 8,
    ranks: int = 1,
    out_dir: Optional[str] = None,
) -> Dict[str, object]:
    """BVIF fusion as users run it: configs/vikdf/stage2_fusion.yaml through the engine (the
    frozen LLM replicated, the IQ-Former and BVIF heads under ZeRO-3, both BVIF directions, the
    frozen towers, the shard reader), over a random Llama-2-7B-shaped LLM (32 layers), a
    published-shape IQ-Former and CLIP ViT-L/14 towers. `tiny`: the demo config's sizes (CPU).
    Samples/s is the comparable figure: the step reads every caption twice (knowledge -> text and
    text -> knowledge), the peer's once."""
    from mmtrain.data.synth import synth
    from mmtrain.models.iqformer import IQFormer

    with tempfile.TemporaryDirectory(prefix="mmtrain-bench-", dir=out_dir) as tmp:
        root = Path(tmp)
        towers, llm, iq, config, extra = _fusion_models(size, root)
        IQFormer(iq).save_pretrained(root / "stage1" / "iqformer")
        synth("image-text", str(root / "data"), max(64, 2 * batch), seed=0)
        row = measure(
            config,
            [
                f"recipe.llm_path={llm}",
                f"recipe.stage1={root / 'stage1'}",
                f"recipe.vision_path={towers / 'clip'}",
                f"recipe.text_path={towers / 'clip'}",
                f"recipe.data.train={root / 'data' / 'train'}",
                f"recipe.data.val={root / 'data' / 'val'}",
                "recipe.data.mode=resampled",
                "recipe.data.steps_per_epoch=100",
                f"train.micro_batch_size={batch // ranks}",
                *extra,
            ],
            root / "runs",
            "vikdf_fusion",
            steps,
            ranks,
        )
    return {"kind": "fusion_mmtrain_engine", "size": size, "B": batch, "ranks": ranks, **row}


def _peer(baseline: str, part: str, batch: int) -> Dict[str, object]:
    """The peer's plain-HF step `part` of baseline file, in a fresh process; samples/s added."""
    code = (
        "import importlib.util, sys; s = importlib.util.spec_from_file_location('b', sys.argv[1]); "
        "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
        "getattr(m, sys.argv[2])(int(sys.argv[3]))"
    )
    peer = subprocess.run(
        [sys.executable, "-c", code, baseline, part, str(batch)], capture_output=True, text=True
    )
    if peer.returncode != 0:
        return {"kind": f"{part}_hf_eager", "error": peer.stderr[-2000:]}
    theirs = json.loads(peer.stdout.strip().splitlines()[-1])
    theirs.setdefault("samples_s", theirs["B"] / (theirs["step_ms"] / 1000))
    return theirs


def side_by_side(ours: Dict[str, object], baseline: Optional[str], part: str, target: float) -> int:
    """Print our row, then (with `baseline`) the peer's and the ratio of samples/s."""
    print(json.dumps(ours), flush=True)
    if "error" in ours:
        return 1
    if baseline:
        theirs = _peer(baseline, part, int(ours["B"]))
        print(json.dumps(theirs), flush=True)
        if "error" in theirs:
            return 1
        ratio = ours["samples_per_s"] / theirs["samples_s"]
        print(json.dumps({"ratio_samples_s_mmtrain_engine_over_hf_eager": ratio, "target": target}))
    return 0
