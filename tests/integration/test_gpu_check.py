"""`make gpu-check DRY_RUN=1`: every part of the GPU check starts and reports on the CPU, at tiny
sizes, so that the first GPU session spends its minutes measuring, not fixing plumbing."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

PARTS = ["kernels", "kernel_bench", "zero", "vikdf_stage1", "vikdf_fusion", "dyncot", "kdsl"]


@pytest.mark.heavy  # make test-all (about 2 minutes)
def test_gpu_check_dry_run_runs_every_part_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu-check"
    done = subprocess.run(
        [
            "make",
            "-s",
            "gpu-check",
            "DRY_RUN=1",
            f"GPU_PY={sys.executable}",
            f"GPU_CHECK_OUT={out}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [p["part"] for p in report["parts"]] == PARTS
    assert all(p["rc"] == 0 and p["rows"] or p["part"] == "kernels" for p in report["parts"])
    assert report["parts"][0]["tests"]["passed"] > 0 and "failed" not in report["parts"][0]["tests"]
    figures = report["figures"]
    for key in (
        "zero/stage3_mmtrain/step_ms",
        "dyncot/step_ms",
        "kdsl/step_ms",
        "vikdf_stage1/samples_per_s",
        "vikdf_fusion/samples_per_s",
    ):
        assert figures[key] > 0, key
    assert any(k.startswith("contrastive/") for k in figures)
    assert report["dry_run"] and not report["ratios_to_anchors"]  # tiny sizes: no ratio claimed
    table = (out / "report.md").read_text()
    assert "| figure | value | anchor target |" in table and report["date"] in table
