"""A pipeline on 2 ranks in one launch: train -> export -> train from the export -> eval; a stage
stopped part-way resumes at the next launch; finished stages are never run again."""

import json
import textwrap

from tests.helpers import DEMO, start_ranks, wait_all

PIPELINE = """
    name: chain
    out_dir: OUT
    set: [train.steps=4, train.micro_batch_size=4, checkpoint.every=2, eval.at_end=false]
    stages:
      first: {train: DEMO, export: true}
      second: {train: DEMO, set: ["recipe.model_path=${stages.first.export}/lm"]}
      val: {eval: second, split: val, show: [loss, accuracy]}
"""


def launch(path, logdir, *overrides):
    procs = start_ranks(path, list(overrides), logdir, command="pipeline")
    codes = wait_all(procs, timeout=300)
    out = (logdir / "rank0.log").read_text()
    assert codes == [0, 0], out[-3000:] + (logdir / "rank1.log").read_text()[-2000:]
    return out


def test_a_pipeline_runs_in_one_launch_resumes_a_stopped_stage_and_skips_finished_ones(tmp_path):
    path = tmp_path / "chain.yaml"
    path.write_text(
        textwrap.dedent(PIPELINE).replace("OUT", str(tmp_path / "runs")).replace("DEMO", str(DEMO))
    )
    root = tmp_path / "runs" / "chain"

    # the first launch stops the first stage at step 2 (checkpointed) and ends there
    first = launch(path, tmp_path / "l1", "set=[train.steps=4,run.stop_after_steps=2]")
    assert "[1/3] first (train): stopped" in first
    assert not (root / "pipeline.json").exists()

    # the second resumes it, exports it, trains the second stage from the export, evaluates
    second = launch(path, tmp_path / "l2")
    log = (root / "first" / "train.log").read_text()
    assert f"resumed from {root / 'first' / 'checkpoints' / 'step_00000002'} at step 2" in log
    assert "[1/3] first (train):" in second and "[3/3] val (eval):" in second
    assert (root / "first" / "export" / "lm" / "config.json").is_file()
    saved = (root / "second" / "config.yaml").read_text()
    assert f"model_path: {root / 'first' / 'export' / 'lm'}" in saved
    done = json.loads((root / "pipeline.json").read_text())["done"]
    assert list(done) == ["first", "second", "val"]
    assert 0 < done["val"]["figures"]["accuracy"] <= 1
    assert f"loss {done['val']['figures']['loss']:.4g}" in second  # the figures it was told to show
    assert (root / "second" / "eval_val_step_00000004.json").is_file()

    # the third has nothing left to do
    third = launch(path, tmp_path / "l3")
    assert third.count("done before, skipped") == 3
