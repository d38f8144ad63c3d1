"""Figures for TensorBoard: a confusion matrix a person can read (class names on both axes, the
count in every cell), drawn by torchmetrics' own plotting on a matplotlib figure that never
touches pyplot's global state (no display, no backend switch)."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch


def confusion_figure(pred: Sequence[int], gold: Sequence[int], labels: Sequence[str], title: str):
    """A matplotlib Figure: rows the gold labels, columns the predicted ones, counts in cells."""
    from matplotlib.figure import Figure
    from torchmetrics.classification import MulticlassConfusionMatrix

    from mmtrain.metrics import on_rows

    n = len(labels)
    metric = on_rows(MulticlassConfusionMatrix, num_classes=n)
    if len(gold):
        metric.update(torch.tensor(list(pred)), torch.tensor(list(gold)))
    side = 1.6 + 0.55 * n
    fig = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    with warnings.catch_warnings():
        # torchmetrics hands matplotlib a torch tensor, whose __array__ predates numpy 2's `copy`
        # keyword: numpy's migration notice, about their interplay, not about this figure
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        metric.plot(ax=ax, labels=list(labels))
    ax.set_title(title)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    return fig


def figure_image(fig) -> torch.Tensor:
    """The figure rendered as a CHW float image in [0, 1] (what TensorBoard's add_image takes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0
