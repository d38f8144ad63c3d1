"""KDSL's interpretable rule base: conditions read off each example, rules mined by Monte Carlo
tree search, collaborative prediction with the large model.

A condition is a readable string: `image shows <word>` (from the small MLLM's description of the
image) or `dialogue contains <word>` (a content word of the customer's last turn). A rule is
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
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

CONDITION = re.compile(r"^(image shows|dialogue contains) ([a-z0-9_]+)$")
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
    return {
        f"dialogue contains {w}"
        for w in re.findall(r"[a-z0-9_]+", text.lower())
        if w not in STOPWORDS
    }


def image_conditions(description: str) -> Set[str]:
    return {
        f"image shows {w}"
        for w in re.findall(r"[a-z0-9_]+", description.lower())
        if w not in STOPWORDS
    }


@dataclass
class Rule:
    task: str
    conditions: Tuple[str, ...]
    label: str
    precision: float = 0.0
    support: int = 0

    def matches(self, conds: Set[str]) -> bool:
        return all(c in conds for c in self.conditions)

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "if": list(self.conditions),
            "then": self.label,
            "precision": round(self.precision, 4),
            "support": self.support,
        }

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
            for c in conds:
                if not isinstance(c, str) or not CONDITION.match(c.strip().lower()):
                    raise RuleError(
                        f"{where}: condition {c!r} is not 'image shows WORD' or 'dialogue contains WORD'"
                    )
            if labels is not None:
                if r["task"] not in labels:
                    raise RuleError(
                        f"{where}: unknown task {r['task']!r} (tasks: {sorted(labels)})"
                    )
                if r["then"] not in labels[r["task"]]:
                    raise RuleError(
                        f"{where}: label {r['then']!r} is not one of the {r['task']} labels "
                        f"{sorted(labels[r['task']])}"
                    )
            rules.append(
                Rule(
                    r["task"],
                    tuple(c.strip().lower() for c in conds),
                    r["then"],
                    float(r.get("precision", 1.0)),
                    int(r.get("support", 0)),
                )
            )
        return cls(rules)

    def rescore(self, task_examples: Dict[str, Sequence[Tuple[Set[str], str]]]) -> RuleBase:
        """Precision and support of every rule on new data (its label kept, as a person wrote it)."""
        out = []
        for r in self.rules:
            ex = task_examples.get(r.task, [])
            covered = [label for c, label in ex if r.matches(c)]
            prec = sum(lbl == r.label for lbl in covered) / len(covered) if covered else 0.0
            out.append(Rule(r.task, r.conditions, r.label, prec, len(covered)))
        return RuleBase(out)


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
    return [(1 - weight) * p + weight * v / total for p, v in zip(probs, vote)]
