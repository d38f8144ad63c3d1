"""KDSL: few-shot multimodal dialogue intent with a post-trained MLLM and a small model's rules.

Post-training (`mmtrain train`): each example (a page image and a customer-service dialogue) is
asked one question per task (`recipe.tasks`, e.g. scene and intent); the target is the label, the
loss on its tokens only. `recipe.mode=decoupled` gives every task its own LoRA adapter over the
frozen model, each trained only by its task's loss (no update shared across tasks);
`recipe.mode=joint` trains one adapter (or the full model) on both, the seesaw baseline; a single
task is `recipe.tasks=[intent]`. Prediction scores every label of a task (its tokens'
log-likelihood, softmax over the labels); evaluation reports weighted F1 per task and logs each
confusion matrix to TensorBoard.

Rules (`mmtrain kdsl mine`: mmtrain/tools/kdsl.py, mmtrain/models/rules.py): a small
MLLM post-trained the same way reads each example's image (its predicted scene: `image shows
logistics`), the dialogue gives `dialogue contains WORD` conditions, and MCTS mines `IF ... THEN
label` rules per task into rules.json, beside the conditions of the val/test examples. With
`recipe.rules` set, `mmtrain eval` also predicts collaboratively (rules + the large model), the
override threshold and the vote weight chosen per task on the validation split.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from mmtrain.data.reader import DataSection, pil_decode
from mmtrain.data.shards import DataError, iter_metas
from mmtrain.metrics.figures import confusion_figure, figure_image
from mmtrain.models.generation import pad_id
from mmtrain.models.lora import LoraSection
from mmtrain.models.mllm import MLLM, Prompter, collate_sequences, load_model, load_processor
from mmtrain.models.packing import padding_share
from mmtrain.models.rules import (
    Rule,
    RuleBase,
    RuleError,
    canonical,
    combine,
    dialogue_conditions,
)
from mmtrain.parallelize import keep_vision_in_graph
from mmtrain.recipes.base import EvalResult, GlobalMean, StepOutput
from mmtrain.recipes.common import ShardRecipe, gather_rows
from mmtrain.schema import ConfigError, RecipeConfig, bounded, choices, path_field
from mmtrain.text import slug

log = logging.getLogger("mmtrain")
UNKNOWN = "(not a label)"  # the gold class of a test row whose label is not in the label set


@dataclass
class MiningSection:
    iterations: int = 1500
    max_conditions: int = 2
    min_support: int = 3
    min_precision: float = 0.8
    max_rules: int = 50
    seed: int = 0
    # where a mined rule's precision and support are measured: "val" (held out: the small model
    # read the training images it was trained on, so there "image shows X" is nearly the gold
    # label and every rule looks ~1.0 precise), or "train" (where they were mined)
    precision_on: str = choices("val", "train", default="val")


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
    # decoupled: backpropagate each task's loss before the next task's forward (only one task's
    # graph alive at a time; the same gradients); false: one backward for all tasks
    backward_per_task: bool = True
    questions: Dict[str, str] = field(
        default_factory=lambda: {
            "scene": "What kind of page does the image show?",
            "intent": "What does the customer want?",
        }
    )
    # bounds on an image's pixels after resizing (Qwen2-VL-style processors; null: the model
    # directory's own, for Qwen2-VL up to ~16k image tokens; 802816 = 1024 tokens)
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    # task -> labels; empty: read from the shards
    labels: Dict[str, List[str]] = field(default_factory=dict)
    lora: LoraSection = field(default_factory=LoraSection)
    # > 0: each micro-batch's sequences packed into rows of at most this many tokens (a longer one
    # alone in its row), attention kept within each sample; 0: each padded to the longest
    pack_tokens: int = bounded(0, ge=0)
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
        self.cfg = cfg
        self.prompter = prompter

    def __call__(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "key": [it["key"] for it in items],
            "meta": [it["meta"] for it in items],
            "prompt": {},
        }
        first: List[Dict[str, torch.Tensor]] = []
        for t in self.cfg.tasks:
            prompts = [
                self.prompter.encode_prompt(
                    f"{dialogue_text(it['meta'])}\n{self.cfg.questions[t]}", it["image"]
                )
                for it in items
            ]
            # every task's prompt holds the same image: the tensors of the first task's, so that
            # they cross from the data worker once (shared, not copied per task)
            for p, f in zip(prompts, first):
                for k in ("pixel_values", "image_grid_thw"):
                    if k in p and k in f and torch.equal(p[k], f[k]):
                        p[k] = f[k]
            first = first or prompts
            out["prompt"][t] = prompts
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


class KDSL(ShardRecipe):
    Config = KDSLConfig

    def setup(self) -> None:
        c = self.cfg
        self.processor = load_processor(c.model_path, c.min_pixels, c.max_pixels)
        self.prompter = Prompter(self.processor)
        self.pad_id = pad_id(self.processor.tokenizer)
        unlisted = [t for t in c.tasks if not c.labels.get(t)]
        found = (
            self.ctx.from_rank0(
                lambda: self._labels_from_data(unlisted),
                f"reading the labels of {', '.join(unlisted)} from {c.data.train}",
            )
            if unlisted
            else {}
        )
        self.labels = {t: list(c.labels.get(t) or found[t]) for t in c.tasks}
        self.by_slug = {t: self._slugs(t, ls) for t, ls in self.labels.items()}
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

    def _labels_from_data(self, tasks: List[str]) -> Dict[str, List[str]]:
        """Each task's labels in the training split (one pass over its metadata), one per slug
        (`Logistics` and `logistics` are one label, spelled as most samples spell it), sorted by
        slug."""
        spellings: Dict[str, Dict[str, Counter]] = {t: {} for t in tasks}
        for p, key, meta in iter_metas(self.cfg.data.train):
            for task in tasks:
                if task not in meta or not slug(str(meta[task])):
                    raise DataError(
                        f"{p}: sample {key} has no '{task}' label (recipe.tasks={self.cfg.tasks})"
                    )
                spellings[task].setdefault(slug(meta[task]), Counter())[meta[task]] += 1
        return {t: [s[k].most_common(1)[0][0] for k in sorted(s)] for t, s in spellings.items()}

    @staticmethod
    def _slugs(task: str, labels: List[str]) -> Dict[str, str]:
        out: Dict[str, str] = {}
        for label in labels:
            if not slug(label):
                raise ConfigError(f"label {label!r} of task {task} has no letter or digit")
            if slug(label) in out:
                raise ConfigError(
                    f"labels {out[slug(label)]!r} and {label!r} of task {task} differ only in case "
                    f"or punctuation (both are {slug(label)!r}): keep one"
                )
            out[slug(label)] = label
        return out

    def label_of(self, task: str, raw: Any) -> Optional[str]:
        """The task's label that a sample's `raw` label names (by slug), or None."""
        return self.by_slug[task].get(slug(str(raw))) if raw is not None else None

    def build_model(self):
        c = self.cfg
        adapters = list(c.tasks) if c.mode == "decoupled" else ["default"]
        # saved adapters (init_from) may carry base weights (an adapted lm_head saves its layer):
        # peft copies them whole, so that model loads whole and is partitioned afterwards
        with self.ctx.partitioned() if not c.init_from else contextlib.nullcontext():
            model = MLLM(load_model(c.model_path, c.lora, adapters, c.init_from))
        return keep_vision_in_graph(model, self.processor)

    def _adapter(self, task: str) -> Optional[str]:
        return task if self.cfg.mode == "decoupled" else None

    def pipeline(self):
        return pil_decode, Collate(self.cfg, self.prompter)

    @property
    def backward_parts(self) -> int:
        per_task = self.cfg.mode == "decoupled" and self.cfg.backward_per_task
        return len(self.cfg.tasks) if per_task else 1

    def step_parts(self, model, batch):
        """Decoupled: one part per task (its adapter, its loss), backpropagated in turn."""
        if self.backward_parts == 1:
            yield self.step(model, batch)
            return
        for i, t in enumerate(self.cfg.tasks):
            yield self._task_step(model, batch, t, samples=len(batch["key"]) if i == 0 else 0)

    def step(self, model, batch) -> StepOutput:
        return StepOutput.merged(
            [
                self._task_step(model, batch, t, samples=len(batch["key"]) if i == 0 else 0)
                for i, t in enumerate(self.cfg.tasks)
            ]
        )

    def _task_step(self, model, batch, task: str, samples: int) -> StepOutput:
        answers = [
            self.label_ids[task][self._train_label(task, k, m)]
            for k, m in zip(batch["key"], batch["meta"])
        ]
        batch_t = collate_sequences(
            batch["prompt"][task], answers, self.pad_id, pack_tokens=self.cfg.pack_tokens
        )
        out = model("losses", batch_t, adapter=self._adapter(task))
        return StepOutput(
            losses={task: GlobalMean(out["loss_sum"], out["tokens"])},  # mean over answer tokens
            stats={f"padding_frac_{task}": padding_share(batch_t)},  # positions without a token
            samples=samples,
            tokens=out["tokens"],
            flops=out["flops"],
        )

    def _train_label(self, task: str, key: str, meta: Dict[str, Any]) -> str:
        label = self.label_of(task, meta.get(task))
        if label is None:
            raise DataError(
                f"training sample {key}: {task} label {meta.get(task)!r} is not one of "
                f"recipe.labels.{task} {self.labels[task]}"
            )
        return label

    # -- prediction ----------------------------------------------------------------------------
    def label_probs(
        self, model, prompts: Sequence[Dict[str, torch.Tensor]], task: str
    ) -> torch.Tensor:
        """[batch, labels] probabilities: softmax over each label's summed token log-likelihood."""
        labels = self.labels[task]
        reps = [p for p in prompts for _ in labels]
        answers = [self.label_ids[task][lbl] for _ in prompts for lbl in labels]
        batch = collate_sequences(reps, answers, self.pad_id)
        nll = model("losses", batch, adapter=self._adapter(task))["nll_sum"]
        return torch.softmax(-nll.float().view(len(prompts), len(labels)), dim=1).cpu()

    @torch.no_grad()
    def predict(self, model, split: str) -> List[Dict[str, Any]]:
        """Every example of the split once: its gold labels and the model's label distributions."""
        loader = self.eval_loader(split)
        tasks = self.cfg.tasks
        rows = []
        for batch in self.eval_batches(loader):
            probs = {t: self.label_probs(model, batch["prompt"][t], t) for t in tasks}
            for i, (key, meta) in enumerate(zip(batch["key"], batch["meta"])):
                rows.append(
                    {
                        "key": key,
                        "dialogue": last_user_turn(meta),
                        "gold": {t: meta.get(t) for t in tasks},
                        "probs": {t: probs[t][i].tolist() for t in tasks},
                    }
                )
        return gather_rows(self.ctx, rows)

    def _scores(self, rows, probs_key: str = "probs", figures: bool = False) -> EvalResult:
        """Weighted F1 and accuracy per task; with `figures`, each task's confusion matrix. A row
        whose gold label is not one of the task's labels (or missing) counts as an error: its gold
        class is an extra one, `(not a label)`, which the model never predicts; `{task}_unknown_gold`
        says how many there were."""
        out = EvalResult()
        for t in self.cfg.tasks:
            labels = self.labels[t]
            index = {label: i for i, label in enumerate(labels)}
            pred = [max(range(len(labels)), key=lambda j, r=r: r[probs_key][t][j]) for r in rows]
            gold = [index.get(self.label_of(t, r["gold"][t]), len(labels)) for r in rows]
            unknown = sum(g == len(labels) for g in gold)
            names = labels + [UNKNOWN] if unknown else labels
            out.metrics[f"{t}_wf1"] = weighted_f1(pred, gold, len(names))
            out.metrics[f"{t}_acc"] = sum(p == g for p, g in zip(pred, gold)) / max(1, len(gold))
            out.metrics[f"{t}_unknown_gold"] = unknown
            if figures:
                figure = confusion_figure(pred, gold, names, f"{t} ({len(gold)} examples)")
                out.images[f"confusion/{t}"] = figure_image(figure)
        return out

    @torch.no_grad()
    def evaluate(self, model, split: str = "val") -> EvalResult:
        if not self.cfg.data.val:
            return EvalResult()
        rows = self.predict(model, split)
        scores = self._scores(rows, figures=True)
        return EvalResult({"n": len(rows), **scores.metrics}, scores.images)

    @torch.no_grad()
    def score(self, model, split: str) -> EvalResult:
        """`mmtrain eval`: the model's weighted F1 per task; with `recipe.rules`, also the rules-and-
        model prediction, its parameters chosen on the validation split."""
        # bad rules: fail first
        rules = RuleBase.load(self.cfg.rules, self.labels) if self.cfg.rules else None
        rows = self.predict(model, split)
        scores = self._scores(rows, figures=True)
        metrics = {"n": len(rows), **scores.metrics}
        if rules is not None:
            val_rows = rows if split == "val" else self.predict(model, "val")
            params = self.choose_collab(val_rows, self.match_rules(rules, val_rows, "val"))
            self.apply_rules(rows, self.match_rules(rules, rows, split), params)
            with_rules = self._scores(rows, "probs_rules").metrics
            metrics.update({f"{k}_rules": v for k, v in with_rules.items()})
            metrics["collab"] = params
        return EvalResult(metrics, scores.images, rows)

    def _conditions(self, split: str) -> Dict[str, List[str]]:
        path = Path(self.cfg.rules).parent / f"conditions_{split}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: `mmtrain kdsl mine` writes the {split} examples' "
                f"conditions beside the rules"
            )
        try:
            return {k: [canonical(c) for c in v] for k, v in json.loads(path.read_text()).items()}
        except (ValueError, AttributeError, TypeError) as e:
            raise RuleError(f"{path}: not a map of sample keys to conditions ({e})") from None

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
                wf1 = self._scores(val_rows, "probs_rules").metrics[f"{t}_wf1"]
                scored.append((wf1, o, w))
            top = max(s[0] for s in scored)
            _, o, w = next(s for s in scored if s[0] == top)
            best[t] = {"override": o, "weight": w}
        return best

    def export_modules(self, model):
        return {"model": model.model}
