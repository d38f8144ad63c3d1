"""Padded vs packed micro-batches (`recipe.pack_tokens`): Dynamic CoT trained with chains of thought
of 10 to 400 tokens on 2 CPU ranks (ZeRO-3, the demo's tiny Qwen2-VL). Prints one JSON object.

    python benchmarks/packing.py [--steps 10] [--pack 1024] [--out DIR]

Keyphrase posts (synthetic, every second one without its image) whose rationales are drawn from
10 to 400 words (`recipe.strategy=cot` trains the rationale and the answer), the same run padded
and packed: for each, the share of the micro-batches' positions that hold no token
(`stats/padding_frac`), the trained (answer) tokens per second (`train/tokens_per_s`) and the
step time, means over the steps after the first two (start-up); and the ratios, packed against
padded (the same samples in every step: the losses agree step by step). Then the model alone
(`model_step_only`: forward and backward of micro-batches of the same kind of posts in this
process, padded and packed at the budget and at twice it), which shows what packing saves of
the compute where the 2-rank step at these tiny widths is mostly the engine's own overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ranks import REPO, start_ranks

FILLER = "the post shows a small drawing and some words about it".split()


def mmtrain(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mmtrain.cli", *args], check=True, cwd=REPO)


def posts(n: int, seed: int = 0) -> list:
    """`n` posts with rationales of 10 to 400 words before their answer; every second one
    without its image."""
    from mmtrain.data.synth import keyphrase

    rng = random.Random(seed)
    samples = []
    for i in range(n):
        s = keyphrase(random.Random(f"post/{i}"), "train")
        words = rng.randint(10, 400)
        reasoning = " ".join(FILLER[j % len(FILLER)] for j in range(words))
        s["json"]["rationale"] = f"{reasoning}. Answer: {'; '.join(s['json']['keyphrases'])}"
        if i % 2:
            s.pop("jpg")
        samples.append({"__key__": f"p{i:05d}", **s})
    return samples


def model_step(models: Path, budgets, batches: int = 6, micro: int = 8) -> dict:
    """The model alone, in this process (no ranks, no data loading): forward and backward of the
    same micro-batches of these posts (prompt with its image, the rationale and the answer as the
    target), padded and packed at each budget. Milliseconds per micro-batch, padding share."""
    import io
    import time

    from PIL import Image

    from mmtrain.models.lora import LoraSection
    from mmtrain.models.mllm import MLLM, Prompter, collate_sequences, load_model, load_processor
    from mmtrain.models.packing import padding_share
    from mmtrain.parallelize import keep_vision_in_graph

    d = str(models / "qwen2vl")
    proc = load_processor(d)
    pr = Prompter(proc)
    model = keep_vision_in_graph(MLLM(load_model(d, LoraSection(enabled=False))), proc)
    data = []
    samples = posts(batches * micro, seed=1)
    for b in range(batches):
        prompts, answers = [], []
        for s in samples[b * micro : (b + 1) * micro]:
            image = Image.open(io.BytesIO(s["jpg"])).convert("RGB") if "jpg" in s else None
            prompts.append(pr.encode_prompt(f"Post: {s['json']['text']}", image))
            answers.append(pr.encode_answer(s["json"]["rationale"]))
        data.append((prompts, answers))
    pad, out = proc.tokenizer.pad_token_id, {}
    for budget in (0, *budgets):
        batched = [collate_sequences(p, a, pad, pack_tokens=budget) for p, a in data]
        model("losses", batched[0])["loss_sum"].backward()  # warm-up
        started = time.perf_counter()
        for b in batched:
            model("losses", b)["loss_sum"].backward()
        ms = (time.perf_counter() - started) / len(batched) * 1e3
        share = sum(padding_share(b) for b in batched) / len(batched)
        out[str(budget)] = {"ms_per_micro_batch": round(ms, 1), "padding_frac": round(share, 4)}
    for budget in budgets:
        out[str(budget)]["speedup"] = round(
            out["0"]["ms_per_micro_batch"] / out[str(budget)]["ms_per_micro_batch"], 3
        )
    return out


def write_posts(out: Path, n: int) -> None:
    from mmtrain.data.shards import write_shards

    write_shards(iter(posts(n)), out / "train", "keyphrase", max_count=64)


def train(run: Path, data: Path, models: Path, steps: int, pack: int) -> dict:
    overrides = [
        f"recipe.model_path={models / 'qwen2vl'}",
        f"recipe.data.train={data / 'train'}",
        "recipe.data.val=''",
        "recipe.strategy=cot",
        "recipe.max_answer_tokens=1024",
        "recipe.generation.max_new_tokens=1024",
        f"recipe.pack_tokens={pack}",
        "deepspeed.zero_stage=3",
        f"train.steps={steps}",
        "log.every=1",
        "eval.at_end=false",
        "checkpoint.every=0",
    ]
    port = 29500 + (os.getpid() + pack) % 1000
    procs = start_ranks(REPO / "configs" / "demo" / "dyncot.yaml", overrides, run, port=port)
    started = time.monotonic()
    if any(p.wait(1800) for p in procs):
        raise RuntimeError(f"a rank failed; logs beside {run}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if r["step"] > 2]
    return {
        "pack_tokens": pack,
        "padding_frac": round(statistics.mean(r["stats/padding_frac"] for r in steady), 4),
        "tokens_per_s": round(statistics.mean(r["train/tokens_per_s"] for r in steady), 1),
        "step_time_s": round(statistics.mean(r["train/step_time_s"] for r in steady), 3),
        "wall_s": round(time.monotonic() - started, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pack", type=int, default=512, help="recipe.pack_tokens of the packed run")
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="mmtrain-packing-"))
    models = root / "tiny"
    if not (models / "qwen2vl").is_dir():
        mmtrain("models", "tiny", "--out", str(models))
    data = root / "posts"
    if not (data / "train").is_dir():
        write_posts(data, 8 * 2 * (args.steps + 2))
    padded = train(root / "runs" / "padded", data, models, args.steps, 0)
    packed = train(root / "runs" / "packed", data, models, args.steps, args.pack)
    report = {
        "world": 2,
        "device": "cpu",
        "recipe": "dyncot (strategy cot, rationales 10-400 words, half the posts text-only)",
        "micro_batch_size": 8,
        "padded": padded,
        "packed": packed,
        "tokens_per_s_ratio": round(packed["tokens_per_s"] / padded["tokens_per_s"], 3),
        "step_time_ratio": round(padded["step_time_s"] / packed["step_time_s"], 3),
        "model_step_only": model_step(models, sorted({args.pack, 2 * args.pack})),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
