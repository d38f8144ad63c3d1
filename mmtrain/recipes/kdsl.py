"""KDSL: few-shot multimodal dialogue intent with a post-trained MLLM and a small model's rules.

Post-training (`mmtrain train`): each example (a page image and a customer-service dialogue) is
asked one question per task (`recipe.tasks`, e.g. scene and intent); the target is the label, the
loss on its tokens only. `recipe.mode=decoupled` gives every task its own LoRA adapter over the
frozen model, each trained only by its task's loss (no update shared across tasks);
`recipe.mode=joint` trains one adapter (or the full model) on both, the seesaw baseline; a single
task is `recipe.tasks=[intent]`. Prediction scores every label of a task (its tokens'
log-likelihood, softmax over the labels); evaluation reports weighted F1 per task and logs each
confusion matrix to TensorBoard.

Rules (`mmtrain kdsl mine`, see mmtrain/models/rules.py): a small MLLM post-trained the same way
reads each example's image (its predicted scene: `image shows logistics`), the dialogue gives
`dialogue contains WORD` conditions, and MCTS mines `IF ... THEN label` rules per task into
rules.json, beside the conditions of the val/test examples. With `recipe.rules` set, `mmtrain
eval` also predicts collaboratively (rules + the large model), the override threshold and the
vote weight chosen per task on the validation split.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from mmtrain.config import ConfigError, RecipeConfig, choices, path_field
from mmtrain.data.reader import DataSection, pil_decode, split_spec
from mmtrain.data.shards import iter_metas
from mmtrain.models.mllm import (
    MLLM,
    LoraSection,
    Prompter,
    blank_image_inputs,
    collate_sequences,
    load_model,
    load_processor,
)
from mmtrain.models.rules import Rule, RuleBase, combine, dialogue_conditions
from mmtrain.recipes.base import GlobalMean, Recipe, StepOutput

log = logging.getLogger("mmtrain")


@dataclass
class MiningSection:
    iterations: int = 1500
    max_conditions: int = 2
    min_support: int = 3
    min_precision: float = 0.8
    max_rules: int = 50
    seed: int = 0


@dataclass
class CollabSection:
    # 1.01: never override
    overrides: List[float] = field(default_factory=lambda: [0.9, 0.95, 0.99, 1.01])
    weights: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])


@dataclass
class KDSLConfig(RecipeConfig):
    name: str = "kdsl"
    # local image-text-to-text model dir (Qwen2-VL, ...)
    model_path: str = path_field("", required=True)
    tasks: List[str] = field(default_factory=lambda: ["scene", "intent"])
    mode: str = choices("decoupled", "joint", default="decoupled")
    questions: Dict[str, str] = field(
        default_factory=lambda: {
            "scene": "What kind of page does the image show?",
            "intent": "What does the customer want?",
        }
    )
    # task -> labels; empty: read from the shards
    labels: Dict[str, List[str]] = field(default_factory=dict)
    lora: LoraSection = field(default_factory=LoraSection)
    # adapters of an earlier run's export (few-shot adaptation)
    init_from: Optional[str] = path_field(None)
    # rules.json for collaborative prediction in `mmtrain eval`
    rules: Optional[str] = path_field(None)
    mining: MiningSection = field(default_factory=MiningSection)
    collab: CollabSection = field(default_factory=CollabSection)
    data: DataSection = field(default_factory=DataSection)

    def data_kind(self) -> str:
        return "intent"

    def check(self):
        if not self.tasks:
            raise ConfigError(
                "recipe.tasks is empty: name at least one task (e.g. [scene, intent])"
            )
        missing = [t for t in self.tasks if t not in self.questions]
        if missing:
            raise ConfigError(f"recipe.questions has no question for task(s) {missing}")
        if self.mode == "decoupled" and not self.lora.enabled:
            raise ConfigError(
                "recipe.mode=decoupled needs recipe.lora.enabled=true (one adapter per task)"
            )
        if self.init_from and not self.lora.enabled:
            raise ConfigError(
                "recipe.init_from names saved LoRA adapters: it needs recipe.lora.enabled=true"
            )


def dialogue_text(meta: Dict[str, Any]) -> str:
    return "\n".join(f"{t['role']} : {t['text']}" for t in meta["turns"])


def last_user_turn(meta: Dict[str, Any]) -> str:
    return next((t["text"] for t in reversed(meta["turns"]) if t["role"] == "user"), "")


class Collate:
    def __init__(self, cfg: KDSLConfig, prompter: Prompter):
        self.cfg, self.prompter = cfg, prompter

    def __call__(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "key": [it["key"] for it in items],
            "meta": [it["meta"] for it in items],
            "prompt": {},
        }
        for t in self.cfg.tasks:
            out["prompt"][t] = [
                self.prompter.encode_prompt(
                    f"{dialogue_text(it['meta'])}\n{self.cfg.questions[t]}", it["image"]
                )
                for it in items
            ]
        return out


def weighted_f1(pred: List[int], gold: List[int], n: int) -> float:
    from torchmetrics.functional.classification import multiclass_f1_score

    if not gold:
        return 0.0
    return float(
        multiclass_f1_score(
            torch.tensor(pred), torch.tensor(gold), num_classes=n, average="weighted"
        )
    )


def confusion_image(pred: List[int], gold: List[int], n: int, cell: int = 12) -> torch.Tensor:
    """Row-normalised confusion matrix (rows: gold, columns: predicted) as a CHW image in [0, 1]."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    m = multiclass_confusion_matrix(torch.tensor(pred), torch.tensor(gold), num_classes=n).float()
    m = m / m.sum(1, keepdim=True).clamp(min=1)
    return (
        m.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[None].expand(3, -1, -1).contiguous()
    )


class KDSL(Recipe):
    Config = KDSLConfig

    def _setup(self):
        if hasattr(self, "processor"):
            return
        c = self.cfg
        self.processor = load_processor(c.model_path)
        self.prompter = Prompter(self.processor)
        tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.labels = {
            t: list(c.labels[t]) if c.labels.get(t) else self._labels_from_data(t) for t in c.tasks
        }
        self.label_ids = {
            t: {lbl: self.prompter.encode_answer(lbl) for lbl in ls}
            for t, ls in self.labels.items()
        }
        for t, ids in self.label_ids.items():
            seen: Dict[tuple, str] = {}
            for lbl, x in ids.items():
                if tuple(x) in seen:
                    raise ConfigError(
                        f"labels {seen[tuple(x)]!r} and {lbl!r} of task {t} tokenize alike "
                        f"for {c.model_path}: they cannot be told apart"
                    )
                seen[tuple(x)] = lbl

    def _labels_from_data(self, task: str) -> List[str]:
        labels = set()
        for p, key, meta in iter_metas(self.cfg.data.train):
            if task not in meta:
                raise ConfigError(
                    f"{p}: sample {key} has no '{task}' label (recipe.tasks={self.cfg.tasks})"
                )
            labels.add(meta[task])
        return sorted(labels)

    def build_model(self):
        self._setup()
        c = self.cfg
        adapters = list(c.tasks) if c.mode == "decoupled" else ["default"]
        return MLLM(
            load_model(c.model_path, c.lora, adapters, c.init_from),
            blank_image_inputs(self.processor),
        )

    def _adapter(self, task: str) -> Optional[str]:
        return task if self.cfg.mode == "decoupled" else None

    def _loader(self, spec: str, section: DataSection):
        self._setup()
        return self.loader(section, spec, pil_decode, Collate(self.cfg, self.prompter))

    def build_data(self):
        return self._loader(self.cfg.data.train, self.cfg.data)

    def step(self, model, batch) -> StepOutput:
        losses, tokens, flops = {}, 0, 0.0
        for t in self.cfg.tasks:
            answers = [self.label_ids[t][m[t]] for m in batch["meta"]]
            out = model(
                collate_sequences(batch["prompt"][t], answers, self.pad_id),
                adapter=self._adapter(t),
            )
            losses[t] = GlobalMean(out["loss_sum"], out["tokens"])  # a mean over answer tokens
            tokens += out["tokens"]
            flops += out["flops"]
        return StepOutput(losses=losses, samples=len(batch["key"]), tokens=tokens, flops=flops)

    # -- prediction ----------------------------------------------------------------------------
    def label_probs(
        self, model, prompts: Sequence[Dict[str, torch.Tensor]], task: str
    ) -> torch.Tensor:
        """[batch, labels] probabilities: softmax over each label's summed token log-likelihood."""
        labels = self.labels[task]
        reps = [p for p in prompts for _ in labels]
        answers = [self.label_ids[task][lbl] for _ in prompts for lbl in labels]
        nll = model(collate_sequences(reps, answers, self.pad_id), adapter=self._adapter(task))[
            "nll_sum"
        ]
        return torch.softmax(-nll.float().view(len(prompts), len(labels)), dim=1).cpu()

    @torch.no_grad()
    def predict(self, model, split: str) -> List[Dict[str, Any]]:
        """Every example of the split once: its gold labels and the model's label distributions."""
        section = DataSection(**{**vars(self.cfg.data), "mode": "eval", "shuffle_buffer": 1})
        loader = self._loader(split_spec(self.cfg.data.val, split), section)
        rows = []
        for _ in range(loader.steps_per_epoch):
            batch = next(loader)
            probs = {t: self.label_probs(model, batch["prompt"][t], t) for t in self.cfg.tasks}
            for i, (key, meta) in enumerate(zip(batch["key"], batch["meta"])):
                rows.append(
                    {
                        "key": key,
                        "dialogue": last_user_turn(meta),
                        "gold": {t: meta.get(t) for t in self.cfg.tasks},
                        "probs": {t: probs[t][i].tolist() for t in self.cfg.tasks},
                    }
                )
        return sorted(
            {r["key"]: r for part in self.ctx.gather_objects(rows) for r in part}.values(),
            key=lambda r: r["key"],
        )

    def _scores(self, rows, probs_key: str = "probs") -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for t in self.cfg.tasks:
            labels = self.labels[t]
            keep = [r for r in rows if r["gold"][t] in labels]
            pred = [max(range(len(labels)), key=lambda j: r[probs_key][t][j]) for r in keep]
            gold = [labels.index(r["gold"][t]) for r in keep]
            out[f"{t}_wf1"] = weighted_f1(pred, gold, len(labels))
            out[f"{t}_acc"] = sum(p == g for p, g in zip(pred, gold)) / max(1, len(gold))
            out[f"_confusion_{t}"] = (pred, gold, len(labels))
        return out

    @torch.no_grad()
    def evaluate(self, model, split: str = "val") -> Dict[str, Any]:
        if not self.cfg.data.val:
            return {}
        self._setup()
        rows = self.predict(model, split)
        scores = self._scores(rows)
        metrics: Dict[str, Any] = {"n": len(rows)}
        for k, v in scores.items():
            if k.startswith("_confusion_"):
                # an image: TensorBoard
                metrics[f"confusion/{k[len('_confusion_') :]}"] = confusion_image(*v)
            else:
                metrics[k] = v
        return metrics

    @torch.no_grad()
    def score(self, model, split: str):
        """`mmtrain eval`: the model's weighted F1 per task; with `recipe.rules`, also the rules-and-
        model prediction, its parameters chosen on the validation split."""
        self._setup()
        # bad rules: fail first
        rules = RuleBase.load(self.cfg.rules, self.labels) if self.cfg.rules else None
        rows = self.predict(model, split)
        metrics = {
            "n": len(rows),
            **{k: v for k, v in self._scores(rows).items() if not k.startswith("_")},
        }
        if rules is not None:
            val_rows = rows if split == "val" else self.predict(model, "val")
            params = self.choose_collab(val_rows, self.match_rules(rules, val_rows, "val"))
            self.apply_rules(rows, self.match_rules(rules, rows, split), params)
            metrics.update(
                {
                    f"{k}_rules": v
                    for k, v in self._scores(rows, "probs_rules").items()
                    if not k.startswith("_")
                }
            )
            metrics["collab"] = params
        return metrics, rows

    def _conditions(self, split: str) -> Dict[str, List[str]]:
        path = Path(self.cfg.rules).parent / f"conditions_{split}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: `mmtrain kdsl mine` writes the {split} examples' "
                f"conditions beside the rules"
            )
        return json.loads(path.read_text())

    def match_rules(self, rules: RuleBase, rows, split: str) -> List[Dict[str, List[Rule]]]:
        """Per row and task, the rules its conditions satisfy (image conditions from `kdsl mine`, the
        dialogue's words); each row also records them as text (`rules_fired`)."""
        conds = self._conditions(split)
        matched = []
        for r in rows:
            have = set(conds.get(r["key"], [])) | dialogue_conditions(r["dialogue"])
            matched.append(
                {t: [x for x in rules.for_task(t) if x.matches(have)] for t in self.cfg.tasks}
            )
            r["rules_fired"] = {t: [str(x) for x in m] for t, m in matched[-1].items()}
        return matched

    def apply_rules(
        self, rows, matched: List[Dict[str, List[Rule]]], params: Dict[str, Dict[str, float]]
    ) -> None:
        for r, m in zip(rows, matched):
            r["probs_rules"] = {
                t: combine(r["probs"][t], self.labels[t], m[t], **params[t]) for t in self.cfg.tasks
            }

    def choose_collab(
        self, val_rows, matched: List[Dict[str, List[Rule]]]
    ) -> Dict[str, Dict[str, float]]:
        """Per task, the (override threshold, vote weight) with the best validation weighted F1
        (ties: the smaller weight and the higher threshold, i.e. the least rule influence)."""
        best: Dict[str, Dict[str, float]] = {}
        for t in self.cfg.tasks:
            grid = [
                (o, w)
                for w in sorted(self.cfg.collab.weights)
                for o in sorted(self.cfg.collab.overrides, reverse=True)
            ]
            scored = []
            for o, w in grid:
                params = {x: {"override": 2.0, "weight": 0.0} for x in self.cfg.tasks}
                params[t] = {"override": o, "weight": w}
                self.apply_rules(val_rows, matched, params)
                scored.append((self._scores(val_rows, "probs_rules")[f"{t}_wf1"], o, w))
            top = max(s[0] for s in scored)
            _, o, w = next(s for s in scored if s[0] == top)
            best[t] = {"override": o, "weight": w}
        return best

    def export_modules(self, model):
        return {"model": model.model}


# -- the small model's rules, and the seesaw table ----------------------------------------------


def mine(
    small_run: str,
    out_dir: str,
    data_root: Optional[str] = None,
    tasks: Sequence[str] = ("scene", "intent"),
    image_task: str = "scene",
    rescore: Optional[str] = None,
    tag: Optional[str] = None,
) -> Path:
    """Read conditions with a post-trained small model (a KDSL run with `image_task`), then mine rules
    per task on the training split with MCTS, or with `rescore`, re-score an existing rule file on
    it. Writes OUT/rules.json, OUT/conditions_{train,val,test}.json and OUT/mining.json."""
    from mmtrain.engine import dist
    from mmtrain.engine.evaluate import load_run
    from mmtrain.models.rules import mine_rules

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
    recipe.cfg.tasks = [image_task]
    recipe.cfg.data.train, recipe.cfg.data.val = str(root / "train"), str(root / "val")
    conditions, examples = {}, {}
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            continue
        rows = recipe.predict(model, split)
        labels = recipe.labels[image_task]
        conditions[split] = {}
        for r in rows:
            seen = labels[max(range(len(labels)), key=lambda j: r["probs"][image_task][j])]
            conditions[split][r["key"]] = sorted(
                {f"image shows {seen}"} | dialogue_conditions(r["dialogue"])
            )
        if split == "train":
            metas = {key: meta for _, key, meta in iter_metas(root / "train")}
            examples = {
                t: [
                    (set(conditions["train"][k]), metas[k][t])
                    for k in conditions["train"]
                    if t in metas[k]
                ]
                for t in tasks
            }
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for split, conds in conditions.items():
            (out / f"conditions_{split}.json").write_text(json.dumps(conds))
        m = cfg.recipe.mining
        if rescore:
            base = RuleBase.load(rescore).rescore(examples)
        else:
            base = RuleBase(
                [
                    r
                    for t in tasks
                    for r in mine_rules(
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
        base.save(out / "rules.json")
        (out / "mining.json").write_text(
            json.dumps(
                {
                    "small_run": str(small_run),
                    "checkpoint": tag,
                    "data": str(root),
                    "rescored": rescore,
                    "examples": {t: len(e) for t, e in examples.items()},
                    "rules": len(base.rules),
                    "mining": vars(m),
                },
                indent=2,
            )
        )
        for r in base.rules:
            print(r)
    dist.shutdown()
    return out / "rules.json"


def seesaw(named_runs: Sequence[str], split: str = "test") -> str:
    """A markdown table of weighted F1 per task from each run's latest `mmtrain eval` on `split`;
    a run evaluated with rules adds its '+ rules' row. NAME=RUN_DIR pairs, in the order given."""
    lines, tasks = [], ["scene", "intent"]
    rows = []
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
    lines.append(f"| setting ({split}) | " + " | ".join(f"{t} weighted F1" for t in tasks) + " |")
    lines.append("|---|" + "---|" * len(tasks))
    for name, vals in rows:
        lines.append(
            f"| {name} | "
            + " | ".join("-" if vals[t] is None else f"{100 * vals[t]:.2f}" for t in tasks)
            + " |"
        )
    return "\n".join(lines) + "\n"
