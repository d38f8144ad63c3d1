"""The rule of mmtrain/metrics/__init__.py: metrics are computed on rows gathered from every rank
and never sync again (a second sync counted every row once per rank: Distinct-n came out divided
by the number of ranks, keyphrase and confusion-matrix counts multiplied by it)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch.distributed as torch_dist
from torchmetrics import Metric

from mmtrain.metrics import RowMetric, on_rows
from mmtrain.metrics.dialogue import Distinct, dialogue_scores, released_scores
from mmtrain.metrics.figures import confusion_figure
from mmtrain.metrics.keyphrase import KeyphraseF1
from tests.helpers import REPO, free_port


def _bindings(tree: ast.Module) -> dict:
    """Names bound by the file's imports, anywhere in it (function-local ones too) -> object."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                try:
                    out[a.asname or a.name] = getattr(importlib.import_module(node.module), a.name)
                except (ImportError, AttributeError):
                    pass
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = importlib.import_module(a.name)
    return out


def _resolve(func: ast.expr, names: dict):
    if isinstance(func, ast.Name):
        return names.get(func.id)
    if isinstance(func, ast.Attribute):
        owner = _resolve(func.value, names)
        return getattr(owner, func.attr, None) if owner is not None else None
    return None


def metric_constructions(root: Path):
    """(file:line, class) of every call in `root` that constructs a torchmetrics Metric directly."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        tree = ast.parse(path.read_text())
        names = {
            **vars(importlib.import_module(module.removesuffix(".__init__"))),
            **_bindings(tree),
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                cls = _resolve(node.func, names)
                if isinstance(cls, type) and issubclass(cls, Metric):
                    found.append((f"{path.relative_to(root.parent)}:{node.lineno}", cls))
    return found


def test_every_metric_in_mmtrain_is_built_not_to_sync():
    built = metric_constructions(REPO / "mmtrain")
    # the scan sees the constructions that exist (Distinct in dialogue_scores, KeyphraseF1 in
    # Dynamic CoT's score)
    assert {cls for _, cls in built} >= {Distinct, KeyphraseF1}, built
    direct = [
        f"{where}: {cls.__name__}(...)" for where, cls in built if not issubclass(cls, RowMetric)
    ]
    assert not direct, (
        "torchmetrics classes built directly (they would sync rows gathered from every rank "
        "again): use mmtrain.metrics.on_rows(Class, ...)\n" + "\n".join(direct)
    )


def test_the_scan_finds_a_direct_construction(tmp_path):
    pkg = tmp_path / "mmtrain_scan_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text(
        "def f():\n    from torchmetrics.text import BLEUScore\n    return BLEUScore(n_gram=1)\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        built = metric_constructions(pkg)
    finally:
        sys.path.remove(str(tmp_path))
    assert [w for w, _ in built] == ["mmtrain_scan_probe/bad.py:3"]


def test_asking_a_row_metric_to_sync_is_refused():
    with pytest.raises(ValueError, match="already gathered from every rank"):
        Distinct(1, sync_on_compute=True)
    from torchmetrics.text import BLEUScore

    with pytest.raises(ValueError, match="BLEUScore\\(dist_sync_on_step=True\\)"):
        on_rows(BLEUScore, dist_sync_on_step=True)


@pytest.fixture
def process_group(tmp_path, monkeypatch):
    """A process group of one rank (what every rank of an evaluation has), with every metric
    sync turned into an error."""
    torch_dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} synced its states on gathered rows")

    monkeypatch.setattr(Metric, "_sync_dist", refuse)
    yield
    torch_dist.destroy_process_group()


def test_no_figure_syncs_under_a_process_group(process_group):
    preds, refs = ["a cat sat", "a dog ran far"], [["the cat sat"], ["a dog ran"]]
    plain = dialogue_scores(preds, refs)
    assert plain["distinct1"] == pytest.approx(6 / 7)  # a cat sat a dog ran far: 6 unique of 7
    assert released_scores(preds, refs)["distinct1"] == pytest.approx(5 / 5)  # articles dropped
    kp = KeyphraseF1(ks=(1,))
    kp.update([["cat"], ["dog"]], [["cat"], ["bird"]], ["a cat", "a dog"])
    assert kp.compute()["n_all"] == 2.0
    fig = confusion_figure([0, 1, 1], [0, 1, 0], ["x", "y"], "t")
    counts = [int(t.get_text()) for t in fig.axes[0].texts if t.get_text().isdigit()]
    assert sum(counts) == 3
    assert torch_dist.get_world_size() == 1
