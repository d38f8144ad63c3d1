"""Each recipe's figures recomputed from a predictions file on one process (no process group),
with the metric classes and the definitions written out, as a user would check a reported number
offline. `tests/world_size.py` compares them with what `mmtrain eval` reported at every world size.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

Rows = List[Dict[str, Any]]
Images = Dict[str, bytes]  # TensorBoard tag -> PNG, what the evaluation wrote


def language_model(run: Path, rows: Rows, images: Images = None) -> Dict[str, Any]:
    """Toy LM: the mean next-token loss and accuracy over every predicted token."""
    tokens = sum(r["tokens"] for r in rows)
    return {
        "loss": sum(r["nll"] for r in rows) / tokens,
        "accuracy": sum(r["correct"] for r in rows) / tokens,
        "n": len(rows),
    }


def retrieval(run: Path, rows: Rows, images: Images = None) -> Dict[str, Any]:
    """VIKDF stage 1: recall@k both ways from each pair's rank (0 = first)."""
    n = len(rows)
    out: Dict[str, Any] = {"n": float(n), "chance_r@1": 1 / n}
    for k in (1, 5, 10):
        i2t = sum(r["i2t_rank"] < k for r in rows) / n
        t2i = sum(r["t2i_rank"] < k for r in rows) / n
        out.update({f"i2t_r@{k}": i2t, f"t2i_r@{k}": t2i, f"mean_r@{k}": (i2t + t2i) / 2})
    return out


def perplexity(run: Path, rows: Rows, images: Images = None) -> Dict[str, Any]:
    """VIKDF fusion: exp(total NLL / total target tokens)."""
    nll = sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows)
    return {"ppl": math.exp(nll), "nll": nll, "n": len(rows)}


def dialogue(run: Path, rows: Rows, images: Images = None) -> Dict[str, Any]:
    """VIKDF dialogue: perplexity, and BLEU, ROUGE-L, Distinct-1/2 of the generations."""
    from mmtrain.metrics.dialogue import Distinct, dialogue_scores

    preds = [r["prediction"] for r in rows]
    out = {
        **perplexity(run, rows, images),
        **dialogue_scores(preds, [r["references"] for r in rows]),
    }
    for n in (1, 2):  # Distinct written out: unique n-grams over all n-grams of the corpus
        d = Distinct(n)
        d.update(preds)
        assert float(d.compute()) == out[f"distinct{n}"]
    return out


def keyphrases(run: Path, rows: Rows, images: Images = None) -> Dict[str, Any]:
    """Dynamic CoT: F1@k (all, present/absent, seen/unseen) and the counts, with the training
    split's keyphrases read from its shards."""
    from mmtrain.config import load_run_config
    from mmtrain.data.shards import iter_metas
    from mmtrain.metrics.keyphrase import KeyphraseF1

    cfg = load_run_config(run)
    train = [k for _, _, meta in iter_metas(cfg.recipe.data.train) for k in meta["keyphrases"]]
    metric = KeyphraseF1(train_keyphrases=train)
    metric.update(
        [r["prediction"] for r in rows], [r["gold"] for r in rows], [r["text"] for r in rows]
    )
    return {**metric.compute(), "n": len(rows)}


def intents(run: Path, rows: Rows, images: Images) -> Dict[str, Any]:
    """KDSL: per task, weighted F1 and accuracy of the most probable label, with torchmetrics'
    classes; each confusion matrix counts every row once (`images`: the TensorBoard images the
    evaluation wrote, compared with the same figure drawn here)."""
    from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassF1Score

    from mmtrain.config import load_run_config
    from mmtrain.metrics.figures import confusion_figure, figure_image
    from mmtrain.recipes.base import RunContext
    from mmtrain.recipes.kdsl import KDSL, UNKNOWN

    cfg = load_run_config(run)
    recipe = KDSL(cfg.recipe, RunContext(0, 1, torch.device("cpu"), torch.float32, 1, 0, run))
    recipe.setup()  # the label sets, from the training split as training read them
    out: Dict[str, Any] = {"n": len(rows)}
    for t in cfg.recipe.tasks:
        labels = recipe.labels[t]
        pred = [int(np.argmax(r["probs"][t])) for r in rows]
        index = {label: i for i, label in enumerate(labels)}
        gold = [index.get(recipe.label_of(t, r["gold"][t]), len(labels)) for r in rows]
        unknown = sum(g == len(labels) for g in gold)
        n = len(labels) + (1 if unknown else 0)
        f1 = MulticlassF1Score(num_classes=n, average="weighted")
        f1.update(torch.tensor(pred), torch.tensor(gold))
        matrix = MulticlassConfusionMatrix(num_classes=n)
        matrix.update(torch.tensor(pred), torch.tensor(gold))
        assert int(matrix.compute().sum()) == len(rows)  # every row once, at any world size
        out[f"{t}_wf1"] = float(f1.compute())
        out[f"{t}_acc"] = sum(p == g for p, g in zip(pred, gold)) / len(rows)
        out[f"{t}_unknown_gold"] = unknown
        names = labels + [UNKNOWN] if unknown else labels
        drawn = figure_image(confusion_figure(pred, gold, names, f"{t} ({len(rows)} examples)"))
        assert_same_image(images[f"val/confusion/{t}"], drawn)
    return out


def assert_same_image(png: bytes, chw: torch.Tensor) -> None:
    """A TensorBoard PNG equals a CHW [0, 1] image to the 8-bit rounding TensorBoard applies."""
    from PIL import Image

    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    want = chw.permute(1, 2, 0).numpy() * 255
    assert got.shape == want.shape, (got.shape, want.shape)
    assert float(np.abs(got - want).max()) <= 1.0
