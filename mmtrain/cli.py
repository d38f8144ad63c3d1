"""`mmtrain train|pipeline|config|eval|export|data|bench ...`: the command line.

Errors in user input exit 2 with one line."""

from __future__ import annotations

import os
import sys

# Triton compiles kernels into a cache: by default one per node in its temporary directory, not
# the home directory that every rank of every node shares (concurrent writers, slow NFS locks).
os.environ.setdefault(
    "TRITON_CACHE_DIR",
    os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mmtrain-triton-{os.getuid()}"),
)

if __name__ == "__main__" and sys.argv[1:2] in (["train"], ["pipeline"]):
    # before the slow imports below: a stop signal while a rank starts up is remembered, not fatal
    from mmtrain.engine import signals

    signals.install()

import argparse  # noqa: E402
import logging  # noqa: E402

from mmtrain import tools  # noqa: E402
from mmtrain.config import ConfigError, check_run_dir, load_config, to_yaml  # noqa: E402
from mmtrain.data.shards import DataError  # noqa: E402
from mmtrain.engine.checkpoint import CheckpointError, CheckpointWriteError  # noqa: E402
from mmtrain.engine.heartbeat import PEER_LOST_EXIT_CODE, PeerLost  # noqa: E402
from mmtrain.engine.runlock import RunDirBusy  # noqa: E402
from mmtrain.engine.weights import WeightsError  # noqa: E402
from mmtrain.models.rules import RuleError  # noqa: E402


def _pipelines(args):
    """The pipelines named on the command line (several run one after another in one launch),
    read and checked; the `key=value` arguments apply to each."""
    from mmtrain.pipeline import Pipeline

    files = [args.config, *[o for o in args.overrides if "=" not in o]]
    overrides = [o for o in args.overrides if "=" in o]
    pipelines = [Pipeline(f, overrides) for f in files]
    for p in pipelines:
        p.check()  # every stage's config, before any process group starts
    return pipelines


def _cmd_config(args) -> int:
    from mmtrain.pipeline import is_pipeline

    if is_pipeline(args.config):
        pipelines = _pipelines(args)
        if args.get == "run_dir":
            print(pipelines[0].root)
        elif args.get:
            raise ConfigError(f"--get {args.get}: a pipeline answers only --get run_dir")
        else:
            print("".join(p.describe() for p in pipelines), end="")
        return 0
    cfg = load_config(args.config, args.overrides)
    check_run_dir(cfg)  # the launch scripts' pre-check: before any rank starts
    if args.get == "run_dir":
        print(cfg.run_dir)
    elif args.get:
        from omegaconf import OmegaConf

        value = OmegaConf.select(OmegaConf.structured(cfg), args.get, default=None)
        if value is None:
            raise ConfigError(f"--get {args.get}: no such key")
        print(value)
    else:
        print(to_yaml(cfg), end="")
    return 0


def _until_done(work) -> int:
    """Run `work()` (training, a pipeline) to its exit code; the reason it failed, if it did, goes
    to train.log too; then the orderly shutdown of the process group."""
    from mmtrain.engine import dist, signals

    signals.current()  # installed at start-up already when run as `python -m mmtrain.cli train`
    try:
        code = work()  # an exception skips the shutdown: a dead peer would hang its barrier
    except BaseException as e:
        log = logging.getLogger("mmtrain")
        if log.handlers:  # train.log exists: the reason the run ended goes there too
            trace = not isinstance(e, (KeyboardInterrupt, PeerLost))
            log.error("run ended by %s: %s", type(e).__name__, e, exc_info=trace)
        raise
    finally:
        # the run is over: a stop signal now (a time limit's warning as the last step ends) has
        # nothing left to save and must not turn the exit code into 138 during shutdown
        signals.current().ignore_further()
    dist.shutdown()
    return code


def _cmd_train(args) -> int:
    from mmtrain.engine.trainer import train

    cfg = load_config(args.config, args.overrides)
    check_run_dir(cfg)
    return _until_done(lambda: train(cfg))


def _cmd_pipeline(args) -> int:
    from mmtrain.engine import dist

    pipelines = _pipelines(args)
    say = (lambda line: print(line, flush=True)) if dist.is_main() else (lambda line: None)

    def run_all() -> int:
        for p in pipelines:
            code = p.run(say)
            if code != 0:
                return code
        return 0

    return _until_done(run_all)


def _cmd_ckpt_verify(args) -> int:
    """One line per checkpoint (intact, or what is wrong); exit 1 when any is damaged."""
    from pathlib import Path

    from mmtrain.engine import checkpoint

    root = Path(args.run_dir) / "checkpoints"
    tags = checkpoint.step_dirs(root)
    if not tags:
        raise FileNotFoundError(f"no checkpoints in {root}")
    latest = checkpoint.read_pointer(root, "latest")
    damaged = 0
    for tag in tags:
        if not (root / tag / "mmtrain.json").is_file():
            print(f"{tag}: incomplete (no mmtrain.json: a save that never finished)")
            continue
        problems = checkpoint.verify(root / tag, deep=args.deep)
        damaged += bool(problems)
        mark = " (latest)" if tag == latest else ""
        print(f"{tag}{mark}: " + ("intact" if not problems else "DAMAGED: " + "; ".join(problems)))
    if latest and latest not in tags:
        print(f"latest names {latest}, which does not exist")
        damaged += 1
    return 1 if damaged else 0


def _cmd_export(args) -> int:
    from mmtrain.engine.export import export

    out = export(
        args.run_dir,
        args.out_dir,
        tag=args.tag,
        merge_lora=args.merge_lora,
        overwrite=args.overwrite,
    )
    print(f"exported to {out}")
    return 0


def _cmd_eval(args) -> int:
    import json

    from mmtrain.engine import dist
    from mmtrain.engine.evaluate import run_eval

    if dist.is_main():  # what was loaded, and how, on the terminal
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("mmtrain eval: %(message)s"))
        logging.getLogger("mmtrain").addHandler(handler)
        logging.getLogger("mmtrain").setLevel(logging.INFO)
    overrides = list(args.set or ())
    if args.placement:
        overrides.append(f"eval.placement={args.placement}")
    result = run_eval(args.run_dir, args.split, args.tag, overrides)
    dist.shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


def _cmd_data(args) -> int:
    import json

    if args.data_cmd == "synth":
        from mmtrain.data.synth import synth

        manifests = synth(args.kind, args.out, args.n, args.seed, args.max_count, args.lang)
        for split, m in manifests.items():
            print(f"{args.out}/{split}: {m['total']} samples in {len(m['shards'])} shards")
    elif args.data_cmd == "convert":
        from mmtrain.data.convert import convert

        m = convert(
            args.fmt, args.input, args.out, args.image_root, args, args.max_count, args.max_size
        )
        r = m["report"]
        print(
            f"{args.out}: {m['total']} samples in {len(m['shards'])} shards; skipped {r['skipped']} of "
            f"{r['read']} records {r['reasons'] or ''}"
        )
        for ex in r["examples"][:10]:
            print(f"  skipped {ex['file']}:{ex['line']}: {ex['reason']}")
    elif args.data_cmd == "index":
        from mmtrain.data.shards import index_shards

        m = index_shards(args.dir, args.kind)
        print(f"{args.dir}/manifest.json: {m['total']} samples in {len(m['shards'])} shards")
    elif args.data_cmd == "fewshot":
        from mmtrain.data.fewshot import fewshot

        relabel = (
            dict(pair.split("=", 1) for pair in args.relabel.split(",")) if args.relabel else None
        )
        m = fewshot(args.src, args.out, args.k, args.task, args.seed, relabel)
        print(
            f"{args.out}: {m['total']} samples ({args.k} per {args.task} label)"
            + (f"; fewer for {m['fewshot']['short']}" if m["fewshot"]["short"] else "")
        )
    elif args.data_cmd == "inspect":
        from mmtrain.data.shards import iter_shard, resolve

        paths, counts, manifest = resolve(args.shards)
        print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}, indent=2))
        for _, sample in iter_shard(paths[0], 0, args.n):
            print(
                {
                    k: (
                        v[:200].decode("utf-8", "replace")
                        if k in ("json", "txt")
                        else f"<{len(v)} bytes>"
                        if isinstance(v, bytes)
                        else v
                    )
                    for k, v in sample.items()
                }
            )
    return 0


def _cmd_models(args) -> int:
    from mmtrain_testing.tiny import make_tiny

    out = make_tiny(args.out, image_size=args.image_size, width=args.width)
    print(f"tiny models in {out}: clip/ (towers, processor, tokenizer), bert/, llama/, qwen2vl/")
    return 0


def _cmd_bench(args) -> int:
    import json

    if args.bench_cmd in ("vikdf-stage1", "vikdf-fusion") and args.engine:
        from mmtrain.bench.engine import main_vikdf

        which = args.bench_cmd.split("-")[1]
        return main_vikdf(which, args.size, args.steps, args.batch_size, args.ranks, args.baseline)
    if args.bench_cmd == "vikdf-stage1":
        from mmtrain.bench.vikdf import main as bench_stage1

        return bench_stage1(args.batch_size, not args.no_compile, args.baseline)
    if args.bench_cmd == "recipe":
        from mmtrain.bench.engine import main_recipe

        return main_recipe(args.recipe, args.size, args.steps, args.batch_size)
    if args.bench_cmd == "zero":
        from mmtrain.bench.engine import main as bench_zero

        return bench_zero(args.size, args.steps, args.configs, args.ranks)
    if args.bench_cmd == "vikdf-fusion":
        from mmtrain.bench.vikdf import main_fusion

        return main_fusion(args.batch_size, args.compile, args.baseline)
    from mmtrain.bench.data import bench_data

    print(
        json.dumps(
            bench_data(
                args.shards,
                args.workers,
                args.batch_size,
                args.batches,
                args.size,
                not args.no_fast,
            )
        )
    )
    return 0


def _add_run_commands(sub) -> None:
    """train, config, export, ckpt verify, eval."""
    for name, fn, help_ in (
        ("train", _cmd_train, "train a recipe (run under deepspeed/torchrun/srun)"),
        (
            "pipeline",
            _cmd_pipeline,
            "run pipelines of stages in one launch: PIPELINE [PIPELINE ...] [key=value ...]",
        ),
        ("config", _cmd_config, "print the resolved, validated config (or a pipeline's stages)"),
    ):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML file (may name base files with `base:`)")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4")
        sp.set_defaults(fn=fn)
        if name == "config":
            sp.add_argument(
                "--get", metavar="KEY", help="print one value (a dotted key, or run_dir)"
            )

    sp = sub.add_parser(
        "export", help="consolidate a checkpoint into safetensors / HF / peft layouts"
    )
    sp.add_argument("run_dir")
    sp.add_argument("out_dir")
    sp.add_argument("--tag", help="checkpoint tag (default: latest)")
    sp.add_argument("--merge-lora", action="store_true", help="also write LoRA-merged HF models")
    sp.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    sp.set_defaults(fn=_cmd_export)

    ck = sub.add_parser("ckpt", help="checkpoints: verify")
    csub = ck.add_subparsers(dest="ckpt_cmd", required=True)
    sp = csub.add_parser(
        "verify", help="check every checkpoint of a run without loading (or training) it"
    )
    sp.add_argument("run_dir")
    sp.add_argument(
        "--deep", action="store_true", help="also read every byte against the archives' CRCs"
    )
    sp.set_defaults(fn=_cmd_ckpt_verify)

    sp = sub.add_parser(
        "eval", help="score a run's checkpoint on a held-out split (val, or test once at the end)"
    )
    sp.add_argument("run_dir")
    sp.add_argument("--split", default="val")
    sp.add_argument("--tag", help="checkpoint tag (default: latest)")
    sp.add_argument(
        "--placement",
        choices=("auto", "replica", "sharded"),
        help="the whole model on every rank, or partitioned over the ranks by ZeRO-3 (for a model "
        "one device cannot hold); default: the config's eval.placement (auto)",
    )
    sp.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="change the run's saved config for this evaluation only (repeatable)",
    )
    sp.set_defaults(fn=_cmd_eval)


def _add_convert_command(dsub) -> None:
    """`mmtrain data convert --from FORMAT ...`."""
    sp = dsub.add_parser("convert", help="shards from a public dataset format")
    sp.add_argument(
        "--from",
        dest="fmt",
        required=True,
        choices=[
            "image-caption-jsonl",
            "coco",
            "dialogue-jsonl",
            "keyphrase-lines",
            "keyphrase-jsonl",
            "llava-intent",
        ],
    )
    sp.add_argument("--input", required=True, nargs="+", help="input file(s)")
    sp.add_argument(
        "--out", required=True, help="output shard directory (must not exist or be empty)"
    )
    sp.add_argument(
        "--image-root", help="where image paths are relative to (default: the input's directory)"
    )
    sp.add_argument("--sep", default="<sep>", help="field separator of keyphrase-lines")
    sp.add_argument(
        "--rationales", help="JSONL of teacher rationales {'id' or line number, 'rationale'}"
    )
    sp.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    sp.add_argument("--max-size", type=float, default=1e9, help="bytes per shard")


def _add_data_commands(sub) -> None:
    """`mmtrain data synth|convert|index|fewshot|inspect`."""
    data = sub.add_parser("data", help="write, convert and inspect WebDataset shards")
    data.set_defaults(fn=_cmd_data)
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    sp = dsub.add_parser(
        "synth", help="procedurally drawn data for the demo and tests (train/val/test)"
    )
    sp.add_argument(
        "--kind", required=True, choices=["image-text", "dialogue", "keyphrase", "intent"]
    )
    sp.add_argument("--out", required=True)
    sp.add_argument("--n", type=int, default=1000)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    sp.add_argument(
        "--lang",
        default="en",
        choices=["en", "zh"],
        help="zh: Chinese posts, keyphrases, rationales and dialogues (keyphrase and intent kinds), "
        "with labels spelled as real data spells them ('Payment page')",
    )
    _add_convert_command(dsub)
    sp = dsub.add_parser("index", help="write manifest.json for shards made elsewhere")
    sp.add_argument("dir")
    sp.add_argument(
        "--kind", required=True, choices=["image-text", "dialogue", "keyphrase", "intent"]
    )
    sp = dsub.add_parser(
        "fewshot", help="k examples per label of one task (optionally relabelled) as new shards"
    )
    sp.add_argument("src")
    sp.add_argument("out")
    sp.add_argument("--k", type=int, required=True)
    sp.add_argument("--task", required=True, help="the label field, e.g. intent")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--relabel", help="old=new,old2=new2: map labels to a new label set")
    sp = dsub.add_parser("inspect", help="print a shard set's manifest and first samples")
    sp.add_argument("shards")
    sp.add_argument("--n", type=int, default=3)


def _cmd_config_reference(args) -> int:
    from mmtrain.reference import reference

    text = reference()
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


def _add_tool_commands(sub) -> None:
    """`mmtrain models tiny`, `mmtrain bench ...` and `mmtrain config-reference`."""
    sp = sub.add_parser(
        "config-reference", help="every config key, from the code (writes docs/configs.md)"
    )
    sp.add_argument("--out", help="write it to this file (default: print it)")
    sp.set_defaults(fn=_cmd_config_reference)
    models = sub.add_parser(
        "models", help="tiny random models for demos and tests (saved with save_pretrained)"
    )
    msub = models.add_subparsers(dest="models_cmd", required=True)
    sp = msub.add_parser("tiny")
    sp.add_argument("--out", required=True)
    sp.add_argument("--image-size", type=int, default=64)
    sp.add_argument("--width", type=int, default=64)
    sp.set_defaults(fn=_cmd_models)

    _add_bench_commands(sub)


def _add_bench_commands(sub) -> None:
    """`mmtrain bench data|zero|recipe|vikdf-stage1|vikdf-fusion`."""
    bench = sub.add_parser("bench", help="throughput benchmarks")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    sp = bsub.add_parser("data", help="samples/s of read + decode + transform + collate")
    sp.add_argument("shards")
    sp.add_argument("--workers", type=int, default=1)
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--batches", type=int, default=20)
    sp.add_argument("--size", type=int, default=224)
    sp.add_argument("--no-fast", action="store_true", help="decode JPEGs at full size")
    sp.set_defaults(fn=_cmd_bench)
    sp = bsub.add_parser(
        "zero",
        help="a 267M Llama-style LM's step through the engine at ZeRO stage 0, 2, 3 (DeepSpeed's "
        "defaults), 3 (mmtrain's sizes) and auto, side by side (GPU; --size tiny on CPU)",
    )
    sp.add_argument("--size", choices=("267m", "tiny"), default="267m")
    sp.add_argument("--steps", type=int, default=16, help="half warm up, half measured")
    sp.add_argument("--ranks", type=int, default=1, help="processes (GPUs) per configuration")
    sp.add_argument(
        "--configs",
        nargs="+",
        help="stage0 stage2 stage3_deepspeed_defaults stage3_mmtrain auto (default: all)",
    )
    sp.set_defaults(fn=_cmd_bench)
    sp = bsub.add_parser(
        "vikdf-stage1", help="samples/s and MFU of a published-size stage-1 step (GPU)"
    )
    sp.add_argument("--batch-size", type=int, default=128)
    sp.add_argument("--no-compile", action="store_true", help="run the frozen towers eagerly")
    _engine_arguments(sp, "configs/vikdf/stage1.yaml", "full-depth CLIP-L/14 and bert-base")
    sp.add_argument("--baseline", help="path of hf_eager_vikdf.py, run side by side for the ratio")
    sp.set_defaults(fn=_cmd_bench)
    sp = bsub.add_parser(
        "recipe",
        help="a Dynamic CoT or KDSL step through the engine on one process, at the published "
        "config's widths (random Qwen2-VL-2B/7B-wide weights, one layer per stack; GPU)",
    )
    sp.add_argument("recipe", choices=("dyncot", "kdsl"))
    sp.add_argument("--size", choices=("published", "tiny"), default="published")
    sp.add_argument("--steps", type=int, default=8, help="half warm up, half measured")
    sp.add_argument("--batch-size", type=int, default=2)
    sp.set_defaults(fn=_cmd_bench)
    sp = bsub.add_parser(
        "vikdf-fusion", help="tokens/s and MFU of a BVIF fusion step, frozen 7B-shaped LLM (GPU)"
    )
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--compile", action="store_true", help="torch.compile the frozen LLM's forward")
    _engine_arguments(sp, "configs/vikdf/stage2_fusion.yaml", "a 32-layer Llama-2-7B-shaped LLM")
    sp.add_argument("--baseline", help="path of hf_eager_vikdf.py, run side by side for the ratio")
    sp.set_defaults(fn=_cmd_bench)


def _engine_arguments(sp, config: str, models: str) -> None:
    sp.add_argument(
        "--engine",
        action="store_true",
        help=f"through `mmtrain train` with {config} (DeepSpeed, the data reader), {models} "
        "with random weights, synthetic shards; compared by samples/s",
    )
    sp.add_argument("--size", choices=("published", "tiny"), default="published")
    sp.add_argument("--steps", type=int, default=8, help="--engine: half warm up, half measured")
    sp.add_argument("--ranks", type=int, default=1, help="--engine: processes (GPUs)")


def _quiet_libraries() -> None:
    """What libraries print that a user can do nothing about, turned off at its source, each by
    the library's own switch or by category and module (never every warning):
    - transformers' "Loading weights" / "Writing model shards" bars, one per from_pretrained or
      save_pretrained on every rank: transformers' own switch;
    - DeepSpeed's notice that it chose the CPU accelerator (on a machine without GPUs, the only
      choice), logged at WARNING by deepspeed.accelerator on every rank and every start."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").addFilter(
        lambda r: "Setting accelerator to CPU" not in r.getMessage()
    )


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local directories only
    _quiet_libraries()
    p = argparse.ArgumentParser(prog="mmtrain", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    _add_run_commands(sub)
    _add_data_commands(sub)
    _add_tool_commands(sub)
    tools.add_commands(sub)  # a recipe's own tools (e.g. `mmtrain kdsl`)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except PeerLost as e:  # a rank or host is gone or stuck: named, and its own exit code
        print(f"mmtrain {args.cmd}: error: {e}", file=sys.stderr)
        return PEER_LOST_EXIT_CODE
    except (
        ConfigError,
        DataError,
        FileNotFoundError,
        FileExistsError,
        RuleError,
        WeightsError,
        CheckpointError,
        CheckpointWriteError,
        RunDirBusy,
    ) as e:
        print(f"mmtrain {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
