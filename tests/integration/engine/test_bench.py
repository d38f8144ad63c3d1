"""`mmtrain bench zero` and `bench vikdf-stage1 --engine`: the benchmarks that train through the
real engine, at their CPU smoke sizes (GPU figures go in docs/measurements.md when a GPU is lent)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.heavy


def bench(*args: str):
    out = subprocess.run(
        [sys.executable, "-m", "mmtrain.cli", "bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_zero_stages_side_by_side_through_the_engine():
    rows = bench("zero", "--size", "tiny", "--steps", "4")
    by = {r["config"]: r for r in rows}
    assert list(by) == ["stage0", "stage2", "stage3_deepspeed_defaults", "stage3_mmtrain", "auto"]
    stages = {k: r["zero_stage"] for k, r in by.items()}
    assert stages == {
        "stage0": 0,
        "stage2": 2,
        "stage3_deepspeed_defaults": 3,
        "stage3_mmtrain": 3,
        "auto": 2,  # a tiny model fits: auto chooses stage 2
    }
    for r in rows:
        assert r["measured_steps"] == 2 and r["step_ms"] > 0 and r["tokens_per_s"] > 0, r
        # the toy LM's batch: 4 sequences of 64 tokens a step
        assert r["tokens_per_s"] == pytest.approx(4 * 64 / (r["step_ms"] / 1000), rel=0.05), r
    assert by["stage0"]["step_vs_stage0"] == 1.0
    assert all(r["step_vs_stage0"] > 0 for r in rows)


def test_vikdf_stage1_through_the_engine():
    (row,) = bench(
        "vikdf-stage1", "--engine", "--size", "tiny", "--steps", "4", "--batch-size", "8"
    )
    assert row["kind"] == "stage1_mmtrain_engine" and row["zero_stage"] == 3, row
    assert row["samples_per_s"] == pytest.approx(8 / (row["step_ms"] / 1000), rel=0.05), row


def test_vikdf_fusion_through_the_engine():
    (row,) = bench(
        "vikdf-fusion", "--engine", "--size", "tiny", "--steps", "4", "--batch-size", "4"
    )
    assert row["kind"] == "fusion_mmtrain_engine" and row["zero_stage"] == 3, row
    assert row["samples_per_s"] == pytest.approx(4 / (row["step_ms"] / 1000), rel=0.05), row


def test_a_configuration_that_fails_is_reported_not_hidden(tmp_path):
    from mmtrain.bench.engine import measure

    row = measure(
        REPO / "configs" / "demo" / "toy_lm.yaml",
        ["recipe.hidden_size=63"],  # not divisible by the 4 heads
        tmp_path,
        "broken",
        2,
    )
    assert set(row) == {"config", "error"} and row["error"], row
