"""Dynamic CoT: multimodal keyphrase prediction with a VLM (any local image-text-to-text model).

`recipe.strategy`:
- zero_shot: the prompt alone (train.steps=0; `mmtrain eval` then scores the base model);
- sft: target = the keyphrase list;
- cot (Fine-tune-CoT): target = `<think>` the teacher's rationale `</think>` then the keyphrases;
  rationales whose own answer misses every gold keyphrase are dropped (those samples keep the
  direct target) and counted;
- dynamic: direct targets, each sample's SFT loss tracked by sample key across all ranks; at each
  epoch end, samples whose loss has stayed above gamma (a value, or a quantile of all tracked
  losses) for `dynamic.patience` epochs train on their CoT target from then on. The table is part
  of each rank's checkpoint, so a resumed run makes the same decisions; each decision is logged
  and appended to RUN_DIR/dynamic_cot.jsonl.
Evaluation generates freely, parses an optional `<think>` rationale and the keyphrase list, and
reports F1@1/3/5 (all, present/absent, seen/unseen), how often the model reasons and how many
tokens it generates, and the split's keyphrase overlap with the training split.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from mmtrain.data.reader import DataSection, pil_decode
from mmtrain.data.shards import DataError, iter_metas
from mmtrain.metrics.keyphrase import (
    ANSWER_MARKER,
    KeyphraseError,
    KeyphraseF1,
    dedupe,
    normalize,
    overlap,
    parse_generation,
)
from mmtrain.models.generation import GenerationSection, pad_id
from mmtrain.models.lora import LoraSection
from mmtrain.models.mllm import MLLM, Prompter, collate_sequences, load_model, load_processor
from mmtrain.models.packing import padding_share
from mmtrain.parallelize import keep_vision_in_graph
from mmtrain.recipes.base import EvalResult, GlobalMean, StepOutput
from mmtrain.recipes.common import ShardRecipe, gather_rows
from mmtrain.schema import ConfigError, RecipeConfig, bounded, choices, path_field

log = logging.getLogger("mmtrain")


@dataclass
class DynamicSection:
    quantile: Optional[float] = 0.7  # gamma = this quantile of every tracked sample's latest loss
    gamma: float = 1.0  # the absolute threshold, used when quantile is null
    patience: int = 1  # epochs in a row above gamma before a sample switches
    warmup_epochs: int = 2  # epochs of direct training before the first decision (the first
    # epoch's losses mostly tell when a sample came, not how hard it is)
    detrend: bool = True  # with a quantile: track each loss minus the running mean training
    # loss when it was seen, so that samples met early in an epoch do not look harder (an
    # absolute gamma is compared with the raw losses)


@dataclass
class DynCoTConfig(RecipeConfig):
    name: str = "dyncot"
    # local image-text-to-text dir (Qwen2-VL, Llava, ...)
    model_path: str = path_field("", required=True)
    strategy: str = choices("zero_shot", "sft", "cot", "dynamic", default="sft")
    prompt: str = "Post: {text}\nGive the keyphrases of this post and its image, separated by '; '."
    system: Optional[str] = None
    separator: str = "; "
    think: List[str] = field(default_factory=lambda: ["<think>", "</think>"])
    lora: LoraSection = field(default_factory=LoraSection)
    dynamic: DynamicSection = field(default_factory=DynamicSection)
    # at least max_answer_tokens (checked): a chain of thought must have room to finish
    generation: GenerationSection = field(
        default_factory=lambda: GenerationSection(max_new_tokens=256)
    )
    max_answer_tokens: int = 256  # a longer CoT target loses the end of its reasoning
    # > 0: each micro-batch's sequences packed into rows of at most this many tokens (a longer one
    # alone in its row), attention kept within each sample; 0: each padded to the longest
    pack_tokens: int = bounded(0, ge=0)
    # bounds on an image's pixels after resizing (Qwen2-VL-style processors; null: the model
    # directory's own, for Qwen2-VL up to ~16k image tokens; 802816 = 1024 tokens)
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    loss_weights: Dict[str, float] = field(default_factory=lambda: {"sft": 1.0})
    data: DataSection = field(default_factory=DataSection)

    def data_kind(self) -> str:
        return "keyphrase"

    def check(self):
        q = self.dynamic.quantile
        if q is not None and not 0.0 < q < 1.0:
            raise ConfigError(
                f"recipe.dynamic.quantile={q} must lie in (0, 1), or be null to use recipe.dynamic.gamma"
            )
        if "{text}" not in self.prompt:
            raise ConfigError("recipe.prompt must contain {text}, where the post's text goes")
        if self.strategy != "zero_shot" and self.generation.max_new_tokens < self.max_answer_tokens:
            raise ConfigError(
                f"recipe.generation.max_new_tokens={self.generation.max_new_tokens} is below "
                f"recipe.max_answer_tokens={self.max_answer_tokens}: evaluation would cut off "
                f"answers as long as the ones the model is trained to give (a chain of thought "
                f"then never reaches its keyphrases); raise it, or lower max_answer_tokens"
            )


def rationale_parts(rationale: str):
    """(reasoning, its final answer text): the answer follows the last 'Answer:' (or '答案：')
    marker, if any."""
    m = list(re.finditer(ANSWER_MARKER, rationale, flags=re.I))
    if not m:
        return rationale.strip(), rationale
    return rationale[: m[-1].start()].strip(), rationale[m[-1].end() :]


def rationale_is_valid(rationale: str, gold: List[str]) -> bool:
    """False when the rationale's final answer misses every gold keyphrase (after stemming)."""
    answer = f" {normalize(rationale_parts(rationale)[1])} "
    return any(f" {g} " in answer for g in dedupe(gold))


def until_stop(ids: List[int], stops) -> Tuple[List[int], bool]:
    """The generated ids before the first stop token, and whether there was none: the generation
    ran into the length limit (`recipe.generation.max_new_tokens`) and its answer may be cut."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i], False
    return ids, True


class HardSampleTracker:
    """Per-sample SFT losses by key; at each epoch end, decides which samples switch to CoT."""

    def __init__(self, cfg: DynamicSection):
        self.cfg = cfg
        self.epoch = 0
        self.pending: Dict[str, List[float]] = {}  # this rank, this epoch: key -> [sum, count]
        self.latest: Dict[str, float] = {}  # all ranks: key -> mean loss in its last measured epoch
        self.streak: Dict[str, int] = {}
        self.switched: set = set()
        self.history: List[Dict[str, Any]] = []
        self.running: Optional[float] = None  # EMA of the mean training loss (detrend)

    def record(self, keys: List[str], losses: List[float], mean: Optional[float] = None) -> None:
        """Track `losses` by key, detrended by the running mean after this step's `mean` (the mean over
        the global batch; by default the mean of `losses`)."""
        if mean is None and losses:
            mean = sum(losses) / len(losses)
        if mean is not None:
            self.running = mean if self.running is None else 0.9 * self.running + 0.1 * mean
        # an absolute gamma (quantile null) is a loss value, as in the paper: compared raw
        detrend = self.cfg.detrend and self.cfg.quantile is not None
        for k, v in zip(keys, losses):
            s = self.pending.setdefault(k, [0.0, 0])
            s[0] += float(v) - (self.running if detrend else 0.0)
            s[1] += 1

    def end_epoch(
        self, all_pending: List[Dict[str, List[float]]], new_epoch: int
    ) -> Dict[str, Any]:
        """Merge every rank's losses of the epoch (rank order, so every rank decides the same)."""
        merged: Dict[str, List[float]] = {}
        for part in all_pending:
            for k, (s, n) in part.items():
                m = merged.setdefault(k, [0.0, 0])
                m[0] += s
                m[1] += n
        for k, (s, n) in merged.items():
            self.latest[k] = s / n
        finished, self.epoch, self.pending = self.epoch, new_epoch, {}
        entry: Dict[str, Any] = {"epoch": finished, "tracked": len(self.latest)}
        if finished + 1 >= self.cfg.warmup_epochs and self.latest:
            values = torch.tensor(sorted(self.latest.values()), dtype=torch.float64)
            gamma = (
                float(torch.quantile(values, self.cfg.quantile))
                if self.cfg.quantile is not None
                else self.cfg.gamma
            )
            newly = []
            for k in sorted(merged):
                if k in self.switched:
                    continue
                self.streak[k] = self.streak.get(k, 0) + 1 if self.latest[k] > gamma else 0
                if self.streak[k] >= self.cfg.patience:
                    self.switched.add(k)
                    newly.append(k)
            entry.update(gamma=gamma, newly_switched=len(newly), examples=newly[:5])
        entry["switched"] = len(self.switched)
        entry["switched_frac"] = len(self.switched) / max(1, len(self.latest))
        self.history.append(entry)
        return entry

    def state_dict(self) -> Dict[str, Any]:
        """What every rank holds alike: the decisions so far and the losses they came from."""
        return {
            "epoch": self.epoch,
            "latest": self.latest,
            "streak": self.streak,
            "switched": sorted(self.switched),
            "history": self.history,
            "running": self.running,
        }

    def load_state_dict(self, state: Dict[str, Any], pending: Dict[str, List[float]]) -> None:
        """The shared state, and this rank's losses of the epoch so far."""
        self.epoch = state["epoch"]
        self.pending = {k: list(v) for k, v in pending.items()}
        self.latest = dict(state["latest"])
        self.streak = dict(state["streak"])
        self.switched = set(state["switched"])
        self.history = list(state["history"])
        self.running = state.get("running")


class Targets:
    """A sample's two possible answers as token ids, within `recipe.max_answer_tokens`: a long
    chain of thought loses the end of its reasoning, never `</think>`, the keyphrases or the end of
    turn. A direct answer is never cut (one longer than the cap is kept whole and counted)."""

    def __init__(self, cfg: DynCoTConfig, prompter: Prompter):
        self.cfg = cfg
        self.prompter = prompter

    def __call__(self, meta: Dict[str, Any]) -> Dict[str, Any]:
        c, encode = self.cfg, self.prompter.encode_answer
        text = c.separator.join(meta["keyphrases"])
        direct = encode(text)
        lead, end = self.template_tokens
        # 1 on the keyphrase tokens: the hardness signal, without the chat template's tokens
        scored = [0] * lead + [1] * max(0, len(direct) - lead - end) + [0] * end
        out = {
            "scored": scored[: len(direct)],
            "direct": direct,
            "cot": None,
            "truncated": False,
            "over_cap": len(direct) > c.max_answer_tokens,
        }
        rationale = meta.get("rationale")
        if not rationale or not rationale_is_valid(rationale, meta["keyphrases"]):
            return {**out, "status": "missing" if not rationale else "dropped"}
        reasoning = rationale_parts(rationale)[0]
        cot = encode(self.cot_text(reasoning, text))
        if len(cot) > c.max_answer_tokens:
            cot = self.shorten(reasoning, text)
            if cot is None:  # not even an empty rationale fits: train on the direct answer
                return {**out, "status": "too_long"}
            out["truncated"] = True
        return {**out, "cot": cot, "status": "ok"}

    @functools.cached_property
    def template_tokens(self) -> Tuple[int, int]:
        """How many tokens of an encoded answer are the chat template's: before the answer text
        and after it (the end of turn)."""
        return self._count(self.prompter.answer_lead), self._count(self.prompter.end_of_turn)

    def _count(self, text: str) -> int:
        return len(self.prompter.tok(text, add_special_tokens=False)["input_ids"]) if text else 0

    def cot_text(self, reasoning: str, answer: str) -> str:
        return f"{self.cfg.think[0]} {reasoning} {self.cfg.think[1]} {answer}"

    def shorten(self, reasoning: str, answer: str) -> Optional[List[int]]:
        """The CoT target with the reasoning cut (by tokens) until the whole fits the cap."""
        tok, limit = self.prompter.tok, self.cfg.max_answer_tokens
        words = tok(reasoning, add_special_tokens=False)["input_ids"]
        room = limit - len(self.prompter.encode_answer(self.cot_text("", answer)))
        while room > 0:  # re-encoding may merge tokens at the cut: step back until it fits
            cut = tok.decode(words[:room], skip_special_tokens=True).strip()
            ids = self.prompter.encode_answer(self.cot_text(cut, answer))
            if len(ids) <= limit:
                return ids
            room -= max(1, len(ids) - limit)
        return None


class Collate:
    """Runs in the data workers: the chat-templated prompt (with image) and both possible targets."""

    def __init__(self, cfg: DynCoTConfig, prompter: Prompter):
        self.cfg = cfg
        self.prompter = prompter
        self.targets = Targets(cfg, prompter)

    def __call__(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        fields = ["key", "prompt", "direct", "scored", "cot", "rationale", "truncated", "over_cap"]
        out: Dict[str, Any] = {k: [] for k in fields + ["keyphrases", "text"]}
        for it in items:
            meta = it["meta"]
            t = self.targets(meta)
            out["key"].append(it["key"])
            out["prompt"].append(
                self.prompter.encode_prompt(self.cfg.prompt.format(text=meta["text"]), it["image"])
            )
            for k in ("direct", "scored", "cot", "truncated", "over_cap"):
                out[k].append(t[k])
            out["rationale"].append(t["status"])
            out["keyphrases"].append(meta["keyphrases"])
            out["text"].append(meta["text"])
        return out


class DynCoT(ShardRecipe):
    Config = DynCoTConfig

    def __init__(self, cfg: DynCoTConfig, ctx):
        super().__init__(cfg, ctx)
        self.tracker = HardSampleTracker(cfg.dynamic)
        # this optimizer step's micro-batches: the keys trained direct and their losses (device)
        self._step_keys: List[str] = []
        self._step_losses: List[torch.Tensor] = []
        self._unread: List[Any] = []  # finished steps' (keys, losses, global sum and count)

    def setup(self) -> None:
        c = self.cfg
        self.processor = load_processor(c.model_path, c.min_pixels, c.max_pixels)
        self.prompter = Prompter(self.processor, self.cfg.system)
        self.pad_id = pad_id(self.processor.tokenizer)

    def build_model(self):
        with self.ctx.partitioned():
            model = MLLM(load_model(self.cfg.model_path, self.cfg.lora))
        return keep_vision_in_graph(model, self.processor)

    def pipeline(self):
        return pil_decode, Collate(self.cfg, self.prompter)

    def build_data(self):
        if self.cfg.strategy != "zero_shot":
            log.info("keyphrase training data: %s", json.dumps(self.train_scan))
        return super().build_data()

    @functools.cached_property
    def train_scan(self) -> Dict[str, Any]:
        """Training keyphrases (for seen/unseen and overlap) and the rationale counts: collective,
        read once, by rank 0, from the samples' metadata alone."""
        return self.ctx.from_rank0(
            self._scan_train, f"reading the metadata of {self.cfg.data.train}"
        )

    def _scan_train(self) -> Dict[str, Any]:
        kps, counts = [], {"samples": 0, "rationales": 0, "rationales_dropped": 0}
        for path, key, meta in iter_metas(self.cfg.data.train):
            if not meta:
                continue
            try:
                dedupe(meta.get("keyphrases", []))
            except KeyphraseError as e:
                raise DataError(f"{path}: sample {key}: {e}") from None
            kps += meta.get("keyphrases", [])
            counts["samples"] += 1
            if meta.get("rationale"):
                counts["rationales"] += 1
                counts["rationales_dropped"] += not rationale_is_valid(
                    meta["rationale"], meta["keyphrases"]
                )
        return {**counts, "keyphrases": kps}

    # -- training ------------------------------------------------------------------------------
    def _use_cot(self, key: str, cot: Optional[List[int]]) -> bool:
        if cot is None:
            return False
        strategy = self.cfg.strategy
        return strategy == "cot" or (strategy == "dynamic" and key in self.tracker.switched)

    def step(self, model, batch) -> StepOutput:
        c = self.cfg
        if c.strategy == "zero_shot":
            raise ConfigError(
                "recipe.strategy=zero_shot trains nothing: run it with train.steps=0 and score it "
                "with `mmtrain eval`"
            )
        use = [self._use_cot(k, cot) for k, cot in zip(batch["key"], batch["cot"])]
        answers = [cot if u else d for u, cot, d in zip(use, batch["cot"], batch["direct"])]
        scored = [[0] * len(a) if u else m for u, a, m in zip(use, answers, batch["scored"])]
        sequences = collate_sequences(
            batch["prompt"], answers, self.pad_id, scored=scored, pack_tokens=c.pack_tokens
        )
        out = model("losses", sequences)
        if c.strategy == "dynamic":  # hardness: the loss on the keyphrase tokens alone
            direct = [i for i, u in enumerate(use) if not u]
            self._step_keys += [batch["key"][i] for i in direct]
            self._step_losses.append(out["per_sample_scored"][direct])  # read at the epoch end
        n = len(use)
        stats = {
            "cot_frac": sum(use) / n,
            "rationale_dropped_frac": sum(s == "dropped" for s in batch["rationale"]) / n,
            # targets that met recipe.max_answer_tokens: CoT ones with their reasoning cut (or,
            # when even the answer left no room, trained direct), direct ones kept whole
            "cot_truncated_frac": sum(u and t for u, t in zip(use, batch["truncated"])) / n,
            "rationale_too_long_frac": sum(s == "too_long" for s in batch["rationale"]) / n,
            "answer_over_cap_frac": sum(batch["over_cap"]) / n,
            "padding_frac": padding_share(sequences),  # positions without a token
        }
        if c.strategy == "dynamic":
            stats["switched_frac"] = len(self.tracker.switched) / max(1, len(self.tracker.latest))
        return StepOutput(
            losses={"sft": GlobalMean(out["loss_sum"], out["tokens"])},
            stats=stats,
            samples=n,
            tokens=out["tokens"],
            flops=out["flops"],
        )

    def on_step_end(self) -> None:
        """The step's per-sample losses into the tracker, detrended by a running mean of the global
        batch's loss (one all-reduce): the same at any world size."""
        if self.cfg.strategy != "dynamic":
            return
        losses = torch.cat([t.to(torch.float64) for t in self._step_losses])
        n = torch.tensor([float(len(self._step_keys))], dtype=torch.float64).to(losses.device)
        both = self.ctx.all_reduce_sum(torch.cat([losses.sum().reshape(1), n]))
        self._unread.append((self._step_keys, losses, both))  # on the device until _read
        self._step_keys, self._step_losses = [], []

    def _read(self) -> None:
        """The steps' per-sample losses and global means into the tracker, in order: one host read
        for all the steps since the last (at an epoch end or a checkpoint)."""
        if not self._unread:
            return
        values = torch.cat([torch.cat([v, b]) for _, v, b in self._unread]).tolist()
        for keys, v, _ in self._unread:
            losses, (total, n), values = (
                values[: len(v)],
                values[len(v) : len(v) + 2],
                values[len(v) + 2 :],
            )
            self.tracker.record(keys, losses, total / n if n else None)
        self._unread = []

    def on_epoch_end(self, finished: int, new: int) -> None:
        """Every rank's losses of the epoch merged; the samples that stayed hard switch to CoT."""
        if self.cfg.strategy != "dynamic":
            return
        self._read()
        entry = self.tracker.end_epoch(self.ctx.gather_objects(self.tracker.pending), new)
        log.info("dynamic CoT after epoch %d: %s", entry["epoch"], json.dumps(entry))
        if self.ctx.rank == 0 and self.ctx.run_dir:
            with open(Path(self.ctx.run_dir) / "dynamic_cot.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    # The loss table's checkpoint: the decisions and the losses they came from are the same on
    # every rank and saved once (shared); each rank saves only its own losses of the epoch so far,
    # so the checkpoint does not grow with the number of ranks.
    def state_dict(self) -> Dict[str, Any]:
        if self.cfg.strategy != "dynamic":
            return {}
        self._read()
        return {"pending": self.tracker.pending}

    def shared_state_dict(self) -> Dict[str, Any]:
        return {"tracker": self.tracker.state_dict()} if self.cfg.strategy == "dynamic" else {}

    def reshard_state(self, states: List[Dict[str, Any]], rank: int, world: int) -> Dict[str, Any]:
        """This epoch's per-key losses onto another number of ranks: kept whole on rank 0 (they are
        merged at the epoch end). A checkpoint before 2026-12-02 carries the shared part in every
        rank's state, with its losses inside."""
        if not states[0]:
            return {}
        parts = [s["tracker"]["pending"] if "tracker" in s else s["pending"] for s in states]
        pending: Dict[str, List[float]] = {}
        for part in parts if rank == 0 else []:
            for k, (total, n) in part.items():
                p = pending.setdefault(k, [0.0, 0])
                p[0], p[1] = p[0] + total, p[1] + n
        shared = {"tracker": states[0]["tracker"]} if "tracker" in states[0] else {}
        return {**shared, "pending": pending}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "tracker" in state:
            tracker = state["tracker"]
            self.tracker.load_state_dict(tracker, state.get("pending", tracker.get("pending", {})))

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, model, split: str = "val") -> EvalResult:
        return self.score(model, split) if self.cfg.data.val else EvalResult()

    @torch.no_grad()
    def score(self, model, split: str) -> EvalResult:
        """Generate for every post of the split (each rank its part), parse, gather, score."""
        rows = gather_rows(self.ctx, self._generate(model, split))
        train_kps = self.train_scan["keyphrases"]
        metric = KeyphraseF1(train_keyphrases=train_kps)
        metric.update(
            [r["prediction"] for r in rows],
            [r["gold"] for r in rows],
            [r["text"] for r in rows],
            [f"{split}/{r['key']}" for r in rows],
        )
        metrics = {k: float(v) for k, v in metric.compute().items()}
        n = max(1, len(rows))
        metrics.update(
            {
                "n": len(rows),
                "think_rate": sum(r["rationale"] is not None for r in rows) / n,
                "mean_gen_tokens": sum(r["gen_tokens"] for r in rows) / n,
                # generations still going at generation.max_new_tokens: their answer may be cut
                "hit_length_limit": sum(r["hit_length_limit"] for r in rows),
                "kp_overlap_with_train": overlap(train_kps, [k for r in rows for k in r["gold"]]),
            }
        )
        return EvalResult(metrics, rows=rows)

    def _generate(self, model, split: str) -> List[Dict[str, Any]]:
        """This rank's rows: each post's generation, its rationale and keyphrases parsed."""
        loader = self.eval_loader(split)
        gen = {
            **self.cfg.generation.kwargs(),
            "pad_token_id": self.pad_id,
            "synced_gpus": self.ctx.world_size > 1,
        }
        tok = self.processor.tokenizer
        rows = []
        for batch in self.eval_batches(loader):
            prompts = collate_sequences(batch["prompt"], None, self.pad_id, left_pad=True)
            new = model("generate", prompts, **gen).tolist()
            for key, text, gold, ids in zip(batch["key"], batch["text"], batch["keyphrases"], new):
                ids, cut_off = until_stop(ids, (tok.eos_token_id, self.pad_id))
                prediction = tok.decode(ids, skip_special_tokens=True)
                rationale, kps = parse_generation(prediction, self.cfg.separator.strip())
                rows.append(
                    {
                        "key": key,
                        "text": text,
                        "gold": gold,
                        "prediction": kps,
                        "rationale": rationale,
                        "generated": prediction,
                        "gen_tokens": len(ids),
                        "hit_length_limit": cut_off,
                    }
                )
        return rows

    def export_modules(self, model):
        return {"model": model.model}
