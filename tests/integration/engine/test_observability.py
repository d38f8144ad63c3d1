"""What a run writes for the user to look at besides TensorBoard: a profiler trace of chosen steps
and a metrics file of every logged step."""

import json

import pytest

from tests.helpers import scalars, train


def test_profile_steps_write_a_trace_naming_the_models_modules_and_metrics_jsonl(tmp_path):
    run = tmp_path / "runs" / "observed"
    train(
        run,
        ["train.steps=6", "log.every=2", "log.profile_steps=[3, 4]", "eval.at_end=false"],
        world=1,
    )
    traces = sorted((run / "profile").glob("*.pt.trace.json"))
    assert [t.name for t in traces] == ["rank0.steps_3-4.pt.trace.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    modules = {n.split(": ", 1)[1].rsplit("_", 1)[0] for n in names if n.startswith("nn.Module: ")}
    assert {"Embedding", "Linear"} <= modules, sorted(modules)[:20]  # the toy LM's own layers
    assert any(n.startswith("aten::") for n in names)  # and the operators under them
    assert "profiler trace of steps 3-4 (rank 0)" in (run / "train.log").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    board = scalars(run, "loss/total")
    # the same figures (TensorBoard keeps them as float32)
    assert [r["loss/total"] for r in rows] == pytest.approx([board[s] for s in (2, 4, 6)], rel=1e-6)
