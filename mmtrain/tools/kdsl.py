"""KDSL's tools beside training: `mmtrain kdsl mine` (the small model's rules) and `mmtrain kdsl
seesaw` (the weighted-F1 table of several evaluated runs). `add_commands` registers both with
the command line and `STAGES` with pipelines (mmtrain/tools/__init__.py lists this module)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mmtrain.data.shards import iter_metas
from mmtrain.engine import dist
from mmtrain.engine.evaluate import load_run
from mmtrain.models.rules import RuleBase, dialogue_conditions, image_condition, mine_rules
from mmtrain.schema import ConfigError
from mmtrain.tools.base import StageKind

Conditions = Dict[str, Dict[str, List[str]]]  # split -> sample key -> conditions


def read_conditions(recipe, model, root: Path, image_task: str) -> Conditions:
    """Each example's conditions per split: what the small model says the image shows (its
    most probable `image_task` label) and the words of the dialogue."""
    recipe.cfg.tasks = [image_task]
    recipe.cfg.data.train, recipe.cfg.data.val = str(root / "train"), str(root / "val")
    labels = recipe.labels[image_task]
    conditions: Conditions = {}
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            continue
        conditions[split] = {}
        for r in recipe.predict(model, split):
            probs = r["probs"][image_task]
            seen = labels[max(range(len(labels)), key=lambda j: probs[j])]
            conds = {image_condition(seen)} | dialogue_conditions(r["dialogue"])
            conditions[split][r["key"]] = sorted(conds)
    return conditions


def split_examples(conditions: Conditions, root: Path, tasks: Sequence[str], split: str):
    """task -> [(conditions, label)] of a split (empty when the split has no conditions)."""
    if split not in conditions:
        return {t: [] for t in tasks}
    metas = {key: meta for _, key, meta in iter_metas(root / split)}
    conds = conditions[split]
    return {t: [(set(conds[k]), metas[k][t]) for k in conds if t in metas[k]] for t in tasks}


def mine_or_rescore(examples, tasks: Sequence[str], mining, rescore: Optional[str]) -> RuleBase:
    if rescore:
        return RuleBase.load(rescore).rescore(examples)
    m = mining
    return RuleBase(
        [
            rule
            for t in tasks
            for rule in mine_rules(
                t,
                examples[t],
                m.iterations,
                m.max_conditions,
                m.min_support,
                m.min_precision,
                seed=m.seed,
                max_rules=m.max_rules,
            )
        ]
    )


def held_out_precision(base: RuleBase, val_examples) -> Tuple[RuleBase, Dict[str, int]]:
    """Each mined rule's precision and support on the validation split (its training figures kept
    as `mined`); a rule that no validation example satisfies cannot be judged and is dropped."""
    if not any(val_examples.values()):
        raise ConfigError(
            "recipe.mining.precision_on=val, but the data has no val split with conditions: add "
            "one, or set recipe.mining.precision_on=train (the training split, where the small "
            "model saw the images: precision there is optimistic)"
        )
    scored = base.rescore(val_examples)
    return RuleBase([r for r in scored.rules if r.support > 0]), {
        t: len(e) for t, e in val_examples.items()
    }


def mine(
    small_run: str,
    out_dir: str,
    data_root: Optional[str] = None,
    tasks: Sequence[str] = ("scene", "intent"),
    image_task: str = "scene",
    rescore: Optional[str] = None,
    tag: Optional[str] = None,
) -> Path:
    """Read conditions with a post-trained small model (a KDSL run with `image_task`), then mine
    rules per task on the training split with MCTS, or with `rescore`, re-score an existing rule
    file on it. Writes OUT/rules.json, OUT/conditions_{train,val,test}.json and OUT/mining.json."""
    out = Path(out_dir)
    if (out / "rules.json").exists():
        raise FileExistsError(
            f"{out / 'rules.json'} exists: choose another --out (nothing was overwritten)"
        )
    cfg, recipe, model, tag, env = load_run(small_run, tag)
    if image_task not in recipe.cfg.tasks:
        raise ConfigError(
            f"the small run {small_run} was post-trained on {recipe.cfg.tasks}, not on "
            f"--image-task {image_task}"
        )
    root = Path(data_root) if data_root else Path(recipe.cfg.data.train).parent
    conditions = read_conditions(recipe, model, root, image_task)
    examples = split_examples(conditions, root, tasks, "train")
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for split, conds in conditions.items():
            (out / f"conditions_{split}.json").write_text(json.dumps(conds, ensure_ascii=False))
        base = mine_or_rescore(examples, tasks, cfg.recipe.mining, rescore)
        mined = len(base.rules)
        held_out = cfg.recipe.mining.precision_on == "val" and not rescore
        if held_out:
            base, scored_on = held_out_precision(
                base, split_examples(conditions, root, tasks, "val")
            )
        base.save(out / "rules.json")
        report = {
            "small_run": str(small_run),
            "checkpoint": tag,
            "data": str(root),
            "rescored": rescore,
            "examples": {t: len(e) for t, e in examples.items()},
            "mined": mined,
            "rules": len(base.rules),
            "precision_on": "val" if held_out else "train",
            "mining": vars(cfg.recipe.mining),
        }
        if held_out:
            report["val_examples"] = scored_on
        (out / "mining.json").write_text(json.dumps(report, indent=2))
    dist.barrier()
    return out / "rules.json"


def seesaw(named_runs: Sequence[str], split: str = "test") -> str:
    """A markdown table of weighted F1 per task from each run's latest `mmtrain eval` on `split`;
    a run evaluated with rules adds its '+ rules' row. NAME=RUN_DIR pairs, in the order given."""
    tasks = ["scene", "intent"]
    rows: List[Tuple[str, Dict[str, Any]]] = []
    for item in named_runs:
        name, _, run = item.partition("=")
        files = sorted(Path(run).glob(f"eval_{split}_*.json"), key=lambda f: f.stat().st_mtime)
        if not files:
            raise FileNotFoundError(
                f"{run}: no eval_{split}_*.json; run `mmtrain eval {run} --split {split}` first"
            )
        res = json.loads(files[-1].read_text())
        rows.append((name, {t: res.get(f"{t}_wf1") for t in tasks}))
        if any(f"{t}_wf1_rules" in res for t in tasks):
            rows.append((f"{name} + rules", {t: res.get(f"{t}_wf1_rules") for t in tasks}))
    lines = [f"| setting ({split}) | " + " | ".join(f"{t} weighted F1" for t in tasks) + " |"]
    lines.append("|---|" + "---|" * len(tasks))
    for name, vals in rows:
        cells = ["-" if vals[t] is None else f"{100 * vals[t]:.2f}" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _run(args) -> int:
    if args.kdsl_cmd == "mine":
        path = mine(
            args.small_run, args.out, args.data, args.tasks, args.image_task, args.rescore, args.tag
        )
        if dist.is_main():
            for rule in RuleBase.load(str(path)).rules:
                print(rule)
        dist.shutdown()
        return 0
    table = seesaw(args.runs, args.split)
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
    return 0


def add_commands(sub) -> None:
    """`mmtrain kdsl mine|seesaw`, on the command line's sub-parsers."""
    kd = sub.add_parser("kdsl", help="KDSL: mine rules with a small model; the seesaw table")
    kd.set_defaults(fn=_run)
    ksub = kd.add_subparsers(dest="kdsl_cmd", required=True)
    sp = ksub.add_parser(
        "mine",
        help="conditions from a post-trained small model's run, MCTS rules -> OUT/rules.json",
    )
    sp.add_argument("small_run", help="a KDSL run of the small MLLM post-trained on --image-task")
    sp.add_argument("--out", required=True, help="directory for rules.json and the conditions")
    sp.add_argument("--data", help="shard root with train/ val/ test/ (default: the run's data)")
    sp.add_argument("--tasks", nargs="+", default=["scene", "intent"])
    sp.add_argument(
        "--image-task",
        default="scene",
        help="the small model's task whose answer says what the image shows",
    )
    sp.add_argument("--rescore", help="an existing rules.json to re-score on --data instead")
    sp.add_argument("--tag", help="checkpoint tag of the small run (default: latest)")
    sp = ksub.add_parser(
        "seesaw", help="weighted F1 per task of several evaluated runs, as a markdown table"
    )
    sp.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR")
    sp.add_argument("--split", default="test")
    sp.add_argument("--out", help="also write the table here")


# -- as pipeline stages (mmtrain/pipeline.py) ----------------------------------------------------
def _mine_stage(stage, pipeline, check: bool) -> Dict[str, Any]:
    """`{mine: SMALL_STAGE, tasks: [...], image_task: scene, data: DIR}`: rules.json in the
    stage's directory, from the small model trained by stage SMALL_STAGE."""
    import shutil

    small = pipeline.stage(str(stage.spec["mine"]), stage)
    if check:
        return {}
    if dist.is_main() and stage.dir.exists():  # a mining that stopped half-way
        shutil.rmtree(stage.dir)
    dist.barrier()
    spec = stage.spec
    tasks = list(spec.get("tasks") or ("scene", "intent"))
    path = mine(
        str(small.dir), str(stage.dir), spec.get("data"), tasks, spec.get("image_task", "scene")
    )
    rules = RuleBase.load(str(path)).rules if dist.is_main() else []
    shown = "\n".join(str(r) for r in rules[:5])
    return {
        "rules": len(rules),
        "text": f"{shown}\n... {len(rules)} rules in {path}" if rules else "",
    }


def _seesaw_stage(stage, pipeline, check: bool) -> Dict[str, Any]:
    """`{seesaw: {LABEL: STAGE, ...}, split: test}`: the table of the stages' latest evaluations
    on `split`, written to seesaw.md in the stage's directory."""
    runs = {label: pipeline.stage(str(name), stage) for label, name in stage.spec["seesaw"].items()}
    if check:
        return {}
    table = seesaw(
        [f"{label}={run.dir}" for label, run in runs.items()], stage.spec.get("split", "test")
    )
    if dist.is_main():
        stage.dir.mkdir(parents=True, exist_ok=True)
        (stage.dir / "seesaw.md").write_text(table)
    return {"text": table}


STAGES = {
    "mine": StageKind(_mine_stage, keys=("tasks", "image_task", "data")),
    "seesaw": StageKind(_seesaw_stage, keys=("split",)),
}
