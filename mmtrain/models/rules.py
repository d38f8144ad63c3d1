"""KDSL's interpretable rule base: conditions read off each example, rules mined by Monte Carlo
tree search, collaborative prediction with the large model.

A condition is a readable string: `image shows <label>` (the small MLLM's reading of the image, the
label's slug: `image shows payment_page`) or `dialogue contains <term>` (a content word of the
customer's last turn, case-folded; in Chinese or Japanese, a character pair: `dialogue contains
退款`; see mmtrain/text.py). Conditions are put in this one spelling wherever they are made or
read (mining, conditions_*.json, a hand-edited rules.json), so a rule fires whatever the case or
spacing of the names it was written with. A rule is
`IF all its conditions THEN label`, with its precision and support on the data it was scored on:

    {"task": "intent", "if": ["image shows logistics", "dialogue contains check"],
     "then": "track_package", "precision": 0.96, "support": 25}

The rule base is a JSON list of such rules, saved with the run; a person may edit it, and
`RuleBase.load` checks every rule (naming the one that is wrong) before it is used.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

from mmtrain.text import fold, slug, terms

CONDITION = re.compile(r"^\s*(image shows|dialogue contains)\s+(.+?)\s*$", re.I)
STOPWORDS = {
    "a",
    "an",
    "the",
    "i",
    "me",
    "my",
    "you",
    "your",
    "is",
    "are",
    "it",
    "this",
    "that",
    "to",
    "for",
    "of",
    "on",
    "in",
    "with",
    "and",
    "or",
    "can",
    "do",
    "does",
    "what",
    "there",
    "here",
    "please",
    "have",
    "be",
    "about",
    "going",
    "want",
    "hi",
    "hello",
    "good",
    "morning",
    "how",
    "help",
}


class RuleError(ValueError):
    pass


def dialogue_conditions(text: str) -> Set[str]:
    return {f"dialogue contains {w}" for w in terms(text) if w not in STOPWORDS}


def image_condition(label: str) -> str:
    return f"image shows {slug(label)}"


def canonical(condition: str) -> str:
    """A condition in its one spelling; RuleError when it is neither kind or its word is not one."""
    m = CONDITION.match(condition) if isinstance(condition, str) else None
    if not m:
        raise RuleError(
            f"condition {condition!r} is not 'image shows LABEL' or 'dialogue contains WORD'"
        )
    kind, word = m.group(1).lower(), m.group(2)
    if kind == "image shows":
        if not slug(word):
            raise RuleError(f"condition {condition!r}: the label has no letter or digit")
        return image_condition(word)
    if terms(word) != [fold(word)]:
        raise RuleError(
            f"condition {condition!r}: 'dialogue contains' takes one word (in Chinese or Japanese, "
            f"two characters), as it is matched against the words of the dialogue: {terms(word)}"
        )
    return f"dialogue contains {fold(word)}"


@dataclass
class Rule:
    task: str
    conditions: Tuple[str, ...]
    label: str
    precision: float = 0.0  # on the data it was last scored on (held-out data, after mining)
    support: int = 0
    mined: Optional[Dict[str, Any]] = None  # precision and support where it was mined, if rescored

    def matches(self, conds: Set[str]) -> bool:
        return all(c in conds for c in self.conditions)

    def to_json(self) -> dict:
        out = {
            "task": self.task,
            "if": list(self.conditions),
            "then": self.label,
            "precision": round(self.precision, 4),
            "support": self.support,
        }
        return {**out, "mined": self.mined} if self.mined else out

    def __str__(self) -> str:
        return (
            f"IF {' AND '.join(self.conditions)} THEN {self.task} = {self.label} "
            f"(precision {self.precision:.2f}, support {self.support})"
        )


def score_rule(
    conditions: Iterable[str], examples: Sequence[Tuple[Set[str], str]]
) -> Tuple[str, float, int]:
    """(majority label, precision, support) of a conjunction on (conditions, label) examples."""
    conds = tuple(conditions)
    labels = Counter(label for c, label in examples if all(x in c for x in conds))
    if not labels:
        return "", 0.0, 0
    label, hits = labels.most_common(1)[0]
    support = sum(labels.values())
    return label, hits / support, support


class RuleBase:
    def __init__(self, rules: List[Rule]):
        self.rules = rules

    def for_task(self, task: str) -> List[Rule]:
        return [r for r in self.rules if r.task == task]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([r.to_json() for r in self.rules], indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, labels: Optional[Dict[str, Sequence[str]]] = None) -> RuleBase:
        """Read and check a (possibly hand-edited) rule file; `labels` (task -> label set) checks
        the labels."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise RuleError(f"rule file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise RuleError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, list):
            raise RuleError(f"{path}: expected a JSON list of rules")
        rules = []
        for i, r in enumerate(raw):
            where = f"{path}: rule {i}"
            if not isinstance(r, dict) or not {"task", "if", "then"} <= set(r):
                raise RuleError(
                    f"{where}: needs 'task', 'if' (a list of conditions) and 'then' (a label)"
                )
            conds = r["if"] if isinstance(r["if"], list) else [r["if"]]
            if not conds:
                raise RuleError(f"{where}: 'if' is empty")
            try:
                conds = tuple(canonical(c) for c in conds)
            except RuleError as e:
                raise RuleError(f"{where}: {e}") from None
            label = r["then"]
            if labels is not None:
                label = _known_label(where, r["task"], label, labels)
            rules.append(
                Rule(
                    r["task"],
                    conds,
                    label,
                    float(r.get("precision", 1.0)),
                    int(r.get("support", 0)),
                    r.get("mined"),
                )
            )
        return cls(rules)

    def rescore(self, task_examples: Dict[str, Sequence[Tuple[Set[str], str]]]) -> RuleBase:
        """Precision and support of every rule on new data (its label kept, as a person wrote it);
        the figures it had before are kept as `mined` (the first ones, if rescored again)."""
        out = []
        for r in self.rules:
            ex = task_examples.get(r.task, [])
            covered = [label for c, label in ex if r.matches(c)]
            prec = sum(lbl == r.label for lbl in covered) / len(covered) if covered else 0.0
            before = r.mined or {"precision": round(r.precision, 4), "support": r.support}
            out.append(Rule(r.task, r.conditions, r.label, prec, len(covered), before))
        return RuleBase(out)


def _known_label(where: str, task: str, label: str, labels: Dict[str, Sequence[str]]) -> str:
    """The task's label that `label` names (compared by slug: `Payment page` is `payment_page`)."""
    if task not in labels:
        raise RuleError(f"{where}: unknown task {task!r} (tasks: {sorted(labels)})")
    by_slug = {slug(x): x for x in labels[task]}
    if not isinstance(label, str) or slug(label) not in by_slug:
        raise RuleError(
            f"{where}: label {label!r} is not one of the {task} labels {sorted(labels[task])}"
        )
    return by_slug[slug(label)]


class _Node:
    __slots__ = ("conds", "children", "visits", "value", "untried")

    def __init__(self, conds: FrozenSet[str], untried: List[str]):
        self.conds = conds
        self.untried = untried
        self.children: Dict[str, _Node] = {}
        self.visits = 0
        self.value = 0.0


def mine_rules(
    task: str,
    examples: Sequence[Tuple[Set[str], str]],
    iterations: int = 2000,
    max_conditions: int = 2,
    min_support: int = 3,
    min_precision: float = 0.8,
    exploration: float = 1.0,
    seed: int = 0,
    max_rules: int = 50,
) -> List[Rule]:
    """Monte Carlo tree search over conjunctions of conditions.

    A node is a set of conditions; expanding adds one condition that co-occurs with the examples it
    covers; a rollout adds random further conditions up to `max_conditions`; the reward of a
    conjunction is its precision when its support reaches `min_support` (else 0), scaled by
    sqrt(support / n) so that general rules are preferred to narrow ones of equal precision; the
    reward is backed up along the path (UCT selection). Every conjunction scored on the way that
    clears `min_precision` and `min_support` is a candidate; the result keeps the best ones,
    dropping a rule whose conditions include another kept rule's with the same label.
    """
    rng = random.Random(seed)
    n = max(1, len(examples))
    cache: Dict[FrozenSet[str], Tuple[str, float, int]] = {}

    def covered_conditions(conds: FrozenSet[str]) -> List[str]:
        cnt = Counter(c for ex, _ in examples if conds <= ex for c in ex if c not in conds)
        return [c for c, k in sorted(cnt.items()) if k >= min_support]

    def reward(conds: FrozenSet[str]) -> float:
        if conds not in cache:
            cache[conds] = score_rule(sorted(conds), examples)
        label, prec, sup = cache[conds]
        return prec * math.sqrt(sup / n) if sup >= min_support and conds else 0.0

    root = _Node(frozenset(), covered_conditions(frozenset()))
    for _ in range(iterations):
        node, path = root, [root]
        while not node.untried and node.children and len(node.conds) < max_conditions:  # select
            node = _uct_child(node, exploration)
            path.append(node)
        if node.untried and len(node.conds) < max_conditions:  # expand
            c = node.untried.pop(rng.randrange(len(node.untried)))
            conds = node.conds | {c}
            child = _Node(conds, covered_conditions(conds) if len(conds) < max_conditions else [])
            node.children[c] = child
            node = child
            path.append(node)
        conds = set(node.conds)  # roll out
        while len(conds) < max_conditions and rng.random() < 0.5:
            options = covered_conditions(frozenset(conds))
            if not options:
                break
            conds.add(rng.choice(options))
        r = max(reward(node.conds), reward(frozenset(conds)))
        for p in path:  # back up
            p.visits += 1
            p.value += r
    return _best_rules(task, cache, min_support, min_precision, max_rules)


def _uct_child(node: _Node, exploration: float) -> _Node:
    """The child with the best upper confidence bound (UCT)."""

    def bound(ch: _Node) -> float:
        visits = ch.visits or 1
        return ch.value / visits + exploration * math.sqrt(math.log(node.visits + 1) / visits)

    return max(node.children.values(), key=bound)


def _best_rules(task: str, scored, min_support: int, min_precision: float, max_rules: int):
    """The scored conjunctions that clear both thresholds, best first, without a rule whose
    conditions include those of a kept rule with the same label."""
    candidates = [
        Rule(task, tuple(sorted(conds)), label, prec, sup)
        for conds, (label, prec, sup) in scored.items()
        if conds and sup >= min_support and prec >= min_precision
    ]
    candidates.sort(key=lambda r: (-r.precision, -r.support, len(r.conditions), r.conditions))
    kept: List[Rule] = []
    for r in candidates:
        if any(k.label == r.label and set(k.conditions) <= set(r.conditions) for k in kept):
            continue
        kept.append(r)
        if len(kept) >= max_rules:
            break
    return kept


def combine(
    probs: Sequence[float],
    labels: Sequence[str],
    matched: Sequence[Rule],
    override: float,
    weight: float,
) -> List[float]:
    """Collaborative prediction for one example: a matched rule with precision >= `override` decides
    (the most precise one); otherwise the large model's distribution mixed with the rules' vote
    (precision-weighted, normalised) at `weight`."""
    index = {lbl: i for i, lbl in enumerate(labels)}
    matched = [r for r in matched if r.label in index]
    strong = [r for r in matched if r.precision >= override]
    if strong:
        best = max(strong, key=lambda r: (r.precision, r.support))
        return [1.0 if lbl == best.label else 0.0 for lbl in labels]
    if not matched or weight <= 0:
        return list(probs)
    vote = [0.0] * len(labels)
    for r in matched:
        vote[index[r.label]] += r.precision
    total = sum(vote)
    if total <= 0:  # only rules that were never right on the data they were scored on
        return list(probs)
    return [(1 - weight) * p + weight * v / total for p, v in zip(probs, vote)]
