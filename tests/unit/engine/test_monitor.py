"""Where the logged scalars go: RUN_DIR/metrics.jsonl always (a resume drops what a dead run
logged past its checkpoint), and W&B / MLflow through the same interface when asked for."""

import json
import sys
import types

import pytest

from mmtrain.config import load_config
from mmtrain.engine.monitor import JsonlMetrics, Monitor
from mmtrain.schema import ConfigError
from tests.helpers import DEMO


def test_metrics_jsonl_one_line_per_log_step_and_a_resume_drops_the_lines_past_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlMetrics(path, start_step=0)
    for step in (10, 20, 30):
        sink.scalars(step, {"loss/total": 1.0 / step, "train/lr": 0.1})
    sink.close()
    resumed = JsonlMetrics(path, start_step=20)  # the checkpoint was at 20; 30 is lost work
    resumed.scalars(30, {"loss/total": 0.5})
    resumed.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[0]["loss/total"] == pytest.approx(0.1) and rows[-1]["loss/total"] == 0.5
    assert all("time" in r for r in rows)


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.append((name, a, k)) or self


def test_wandb_and_mlflow_get_the_same_scalars_through_one_interface(tmp_path, monkeypatch):
    wandb, mlflow = Recorder(), Recorder()
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=wandb.init))
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    run = tmp_path / "myrun"
    run.mkdir()
    config = {"train": {"lr": 0.001}, "run": {"name": "myrun"}}
    mon = Monitor(run, 0, 10, 0, False, False, ["wandb", "mlflow"], config)
    mon.scalars(5, {"loss/total": 2.0})
    mon.close()
    init = [c for c in wandb.calls if c[0] == "init"][0][2]
    assert init["name"] == "myrun" and init["config"] == config and init["resume"] == "allow"
    assert ("log", ({"loss/total": 2.0},), {"step": 5}) in wandb.calls
    assert ("finish", (), {}) in wandb.calls
    assert ("log_metrics", ({"loss/total": 2.0},), {"step": 5}) in mlflow.calls
    params = [c for c in mlflow.calls if c[0] == "log_params"][0][1][0]
    assert params == {"train.lr": "0.001", "run.name": "myrun"}
    assert ("end_run", (), {}) in mlflow.calls
    assert json.loads((run / "metrics.jsonl").read_text())["loss/total"] == 2.0
    quiet = Monitor(run, 1, 10, 0, False, False, ["wandb"], config)  # other ranks: nothing
    assert not quiet.sinks


def test_log_settings_are_checked_before_a_run_starts(monkeypatch):
    with pytest.raises(ConfigError, match=r"log.profile_steps.*\[10, 12\]"):
        load_config(DEMO, ["log.profile_steps=[5]"])
    with pytest.raises(ConfigError, match=r"log.profile_steps"):
        load_config(DEMO, ["log.profile_steps=[4, 2]"])
    with pytest.raises(ConfigError, match=r"log.backends' names \['neptune'\]"):
        load_config(DEMO, ["log.backends=[neptune]"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    with pytest.raises(ConfigError, match=r"not installed here: pip install wandb"):
        load_config(DEMO, ["log.backends=[wandb]"])
