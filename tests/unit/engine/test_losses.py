"""engine.losses.combine: token means over the global batch, at any world size."""

import pytest
import torch

from mmtrain.engine.losses import combine
from mmtrain.recipes.base import GlobalMean

CPU = torch.device("cpu")


def other_rank(*counts):
    """An all-reduce as seen from one rank whose peer reports `counts` (non-finite flag first)."""
    return lambda t: t + torch.tensor(counts, dtype=t.dtype)


def test_global_mean_is_divided_by_the_count_over_all_ranks_and_scaled_for_the_average():
    s = torch.tensor(6.0, requires_grad=True)
    total, parts, bad = combine(
        {"plain": torch.tensor(2.0), "tok": GlobalMean(s, 3)},
        lambda k: 0.5,
        other_rank(0.0, 9.0),
        world=2,
        device=CPU,
    )
    assert not bad
    assert parts["plain"].item() == 2.0  # a per-sample mean: as it is
    assert parts["tok"].item() == pytest.approx(6.0 * 2 / 12)  # 12 tokens over both ranks
    assert list(parts) == ["plain", "tok"] and total.item() == pytest.approx(0.5 * 2.0 + 0.5 * 1.0)
    total.backward()
    assert s.grad.item() == pytest.approx(0.5 * 2 / 12)


def test_no_item_anywhere_gives_zero_and_non_finite_anywhere_is_reported():
    _, parts, bad = combine(
        {"tok": GlobalMean(torch.tensor(0.0), 0)}, lambda k: 1.0, other_rank(0.0, 0.0), 2, CPU
    )
    assert parts["tok"].item() == 0.0 and not bad
    _, _, bad = combine(
        {"tok": GlobalMean(torch.tensor(1.0), 1)}, lambda k: 1.0, other_rank(1.0, 4.0), 2, CPU
    )
    assert bad  # the peer's loss was not finite
    _, _, bad = combine({"x": torch.tensor(float("nan"))}, lambda k: 1.0, lambda t: t, 1, CPU)
    assert bad
