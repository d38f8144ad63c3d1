"""The engine end to end on 2 CPU ranks under ZeRO-3 (gloo), launched the way srun does."""

import json
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from mmtrain.config import load_config
from mmtrain.engine.build import build_model
from mmtrain.engine.trainer import REQUEUE_EXIT_CODE
from mmtrain.recipes.base import RunContext
from mmtrain.recipes.toy_lm import ToyLM
from tests.helpers import DEMO, scalars, start_ranks, train, wait_all


def build_recipe_model(cfg):
    ctx = RunContext(
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        dtype=torch.float32,
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.run.seed,
        run_dir=cfg.run_dir,
    )
    return build_model(ToyLM(cfg.recipe, ctx), cfg.run.seed)  # as the engine builds it


def wait_for(path, text, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"'{text}' never appeared in {path}")


def test_zero3_trains_logs_checkpoints_and_exports(tmp_path):
    run = tmp_path / "runs" / "basic"
    train(
        run,
        [
            "train.steps=30",
            "checkpoint.every=10",
            "checkpoint.keep=2",
            "log.every=5",
            "eval.every=10",
            "recipe.freeze_embeddings=true",
        ],
    )
    loss = scalars(run, "loss/total")
    assert sorted(loss) == [5, 10, 15, 20, 25, 30]
    assert loss[30] < 0.5 * loss[5], loss
    for tag in (
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
        "train/tokens_per_s",
        "train/step_time_s",
        "train/peak_memory_gib",
        "loss/lm",
        "eval/loss",
        "eval/accuracy",
    ):
        assert scalars(run, tag), tag
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [10, 20, 30] and evals[-1]["accuracy"] > evals[0][
        "accuracy"
    ]
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000020", "step_00000030"]
    assert (ckpts / "latest").read_text() == "step_00000030"
    assert "step 30/30" in (run / "train.log").read_text()
    cfg = load_config(run / "config.yaml")
    assert cfg.recipe.freeze_embeddings and cfg.train.steps == 30

    from mmtrain.cli import main

    out = tmp_path / "export"
    assert main(["export", str(run), str(out)]) == 0
    state = load_file(out / "model.safetensors")
    init = build_recipe_model(cfg).state_dict()
    emb = "lm.model.embed_tokens.weight"
    assert torch.equal(state[emb], init[emb])  # frozen: untouched
    assert not torch.allclose(state["lm.lm_head.weight"], init["lm.lm_head.weight"])  # trained
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "lm")
    assert torch.equal(hf.lm_head.weight, state["lm.lm_head.weight"])
    assert main(["export", str(run), str(out)]) == 2  # never overwrites silently
    assert (out / "model.safetensors").exists()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = [
        "train.steps=12",
        "train.grad_accum=2",
        "recipe.dropout=0.1",
        "log.every=1",
        "checkpoint.every=100",
        "eval.at_end=true",
    ]
    straight, split = tmp_path / "runs" / "straight", tmp_path / "runs" / "split"
    train(straight, common)
    train(split, common + ["run.stop_after_steps=6"])
    assert (split / "checkpoints" / "latest").read_text() == "step_00000006"
    first = scalars(split, "loss/total")
    assert max(first) == 6
    # debris of a crashed save must not be picked up
    (split / "checkpoints" / "step_00000099.partial").mkdir()
    (split / "checkpoints" / "step_00000100").mkdir()
    train(split, common)  # run.resume=auto
    assert "resumed from" in (split / "train.log").read_text()
    a, b = scalars(straight, "loss/total"), scalars(split, "loss/total")
    assert [a[s] for s in range(7, 13)] == [b[s] for s in range(7, 13)]
    assert [a[s] for s in range(1, 7)] == [first[s] for s in range(1, 7)]
    ga, gb = scalars(straight, "train/grad_norm"), scalars(split, "train/grad_norm")
    assert [ga[s] for s in range(7, 13)] == [gb[s] for s in range(7, 13)]
    assert scalars(straight, "eval/loss") == scalars(split, "eval/loss")
    assert not (split / "checkpoints" / "step_00000099.partial").exists()


def start_long_run(run):
    """Two ranks on a run far too long to finish, returned once they have logged step 3."""
    over = [
        f"run.out_dir={run.parent}",
        f"run.name={run.name}",
        "log.progress=false",
        "log.every=1",
        "train.steps=100000",
        "checkpoint.every=0",
    ]
    procs = start_ranks(DEMO, over, run.parent / f"{run.name}-logs")
    wait_for(run / "train.log", "step 3/")
    return procs


def test_signal_on_one_rank_checkpoints_all_and_exits_for_requeue(tmp_path):
    run = tmp_path / "runs" / "sig"
    procs = start_long_run(run)
    procs[1].send_signal(signal.SIGUSR1)  # Slurm's warning, seen by one rank only
    assert wait_all(procs, timeout=60) == [REQUEUE_EXIT_CODE] * 2
    tag = (run / "checkpoints" / "latest").read_text()
    step = json.loads((run / "checkpoints" / tag / "mmtrain.json").read_text())["step"]
    assert step >= 3
    train(run, ["train.steps=100000", f"run.stop_after_steps={step + 2}", "checkpoint.every=0"])
    assert (
        f"resumed from {run / 'checkpoints' / tag} at step {step}"
        in (run / "train.log").read_text()
    )


def test_dead_rank_fails_the_others_quickly(tmp_path):
    procs = start_long_run(tmp_path / "runs" / "dead")
    procs[1].kill()
    t0 = time.time()
    code = procs[0].wait(timeout=60)
    assert code != 0 and time.time() - t0 < 60


@pytest.mark.chaos
def test_nonfinite_loss_is_skipped_then_stops_the_run(tmp_path):
    run = tmp_path / "runs" / "nan"
    train(run, ["train.steps=6", "log.every=1", "recipe.inject_nan_at_calls=[3]"], world=1)
    bad = scalars(run, "train/bad_steps")
    assert bad[6] == 1 and bad[1] == 0
    assert all(v == v for v in scalars(run, "loss/total").values())  # no NaN reached the log
    run2 = tmp_path / "runs" / "nan2"
    train(
        run2,
        ["train.steps=6", "train.max_bad_steps=3", "recipe.inject_nan_at_calls=[2,3,4,5]"],
        world=1,
        expect=1,
    )
    log = (tmp_path / "runs" / "nan2-logs" / "rank0.log").read_text()
    assert "3 consecutive non-finite losses (train.max_bad_steps=3)" in log


@pytest.mark.chaos
def test_overflowing_gradients_count_as_bad_steps_and_stop_the_run(tmp_path):
    """lr 1e6: finite losses, but after the first steps the gradients overflow and DeepSpeed skips every
    update; that used to end "done" with exit 0 and train/bad_steps 0."""
    run = tmp_path / "runs" / "overflow"
    train(
        run,
        ["train.steps=20", "train.lr=1e6", "train.max_bad_steps=3", "log.every=1"],
        world=1,
        expect=1,
    )
    log = (tmp_path / "runs" / "overflow-logs" / "rank0.log").read_text()
    assert (
        "3 consecutive skipped optimizer steps, the gradients overflowing (train.max_bad_steps=3)"
        in log
    )
    assert "optimizer step 3 skipped: non-finite gradients" in log and "done:" not in log
    assert max(scalars(run, "train/bad_steps").values()) >= 1


def test_best_checkpoint_is_chosen_on_validation_and_kept(tmp_path):
    run = tmp_path / "runs" / "best"
    # "best" = the highest loss, so that the chosen checkpoint is an early one that keep=1 would
    # prune
    train(
        run,
        [
            "train.steps=12",
            "eval.every=3",
            "checkpoint.every=0",
            "checkpoint.keep=1",
            "checkpoint.best_metric=loss",
            "checkpoint.best_mode=max",
            "train.lr=3e-3",
        ],
        world=1,
    )
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    best = max(evals, key=lambda e: e["loss"])
    assert best["step"] == 3 and (run / "checkpoints" / "latest").read_text() == "step_00000012"
    ckpts = run / "checkpoints"
    assert (ckpts / "best").read_text() == f"step_{best['step']:08d}"
    assert json.loads((ckpts / "best.json").read_text())["loss"] == best["loss"]
    assert (ckpts / f"step_{best['step']:08d}").is_dir()  # kept despite keep=1
    import subprocess
    import sys

    from tests.helpers import REPO

    out = subprocess.run(
        [sys.executable, "-m", "mmtrain.cli", "eval", str(run), "--tag", "best"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["checkpoint"] == f"step_{best['step']:08d}" and result["loss"] == pytest.approx(
        best["loss"], rel=1e-5
    )
    # consolidated once, beside the checkpoint, for every later evaluation of it
    assert (ckpts / f"step_{best['step']:08d}" / "consolidated-fp32.safetensors").is_file()


@pytest.mark.chaos
@pytest.mark.heavy
def test_the_error_that_ends_a_run_is_in_train_log_and_tensorboard_shows_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "runs" / "crash"
    args = ["train.steps=8", "log.every=1", "checkpoint.every=3", "train.max_bad_steps=2"]
    train(run, args + ["recipe.inject_nan_at_calls=[6,7]"], world=2, expect=1)  # dies in step 6
    log = (run / "train.log").read_text()
    assert "ERROR run ended by TooManyBadSteps: 2 consecutive non-finite losses" in log
    # both ranks said why, each in its own file (one writer per file)
    assert "Traceback" in log and log.count("run ended by TooManyBadSteps") == 1
    other = (run / "logs" / "rank00001.log").read_text()
    assert other.count("[rank1] ERROR run ended by TooManyBadSteps") == 1
    assert max(scalars(run, "loss/total")) == 5  # steps 4, 5 logged past checkpoint 3
    train(run, args, world=2)  # resumed from step 3
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/total")] == list(range(1, 9))


def wait_for_line(path, text, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s")


@pytest.mark.heavy  # two long evaluations (about a minute): make test-all
def test_a_stop_during_evaluation_exits_in_seconds_and_the_resumed_run_evaluates_the_same(
    tmp_path,
):
    # one evaluation, at step 2, of 1,000 toy batches (10-40 s on 2 CPU ranks)
    common = ["train.steps=3", "eval.every=2", "eval.at_end=false", "recipe.eval_batches=1000",
              "checkpoint.every=0", "log.every=1", "recipe.dropout=0.0"]  # fmt: skip
    straight = tmp_path / "runs" / "straight"
    train(straight, common, timeout=600)
    stamps = [
        line[:19]
        for line in (straight / "train.log").read_text().splitlines()
        if "evaluating at step 2" in line or "eval at step 2:" in line
    ]
    took = [time.mktime(time.strptime(s, "%Y-%m-%d %H:%M:%S")) for s in stamps]
    evaluation_s = took[1] - took[0]

    run = tmp_path / "runs" / "stopped"
    over = [f"run.out_dir={run.parent}", "run.name=stopped", "log.progress=false", *common]
    procs = start_ranks(DEMO, over, tmp_path / "logs")
    wait_for_line(run / "train.log", "evaluating at step 2")
    t0 = time.time()
    procs[1].send_signal(signal.SIGUSR1)  # one rank only, as Slurm's warning may land
    assert wait_all(procs, timeout=300) == [REQUEUE_EXIT_CODE] * 2
    stopped_s = time.time() - t0
    print(f"evaluation {evaluation_s:.0f} s; stopped {stopped_s:.1f} s after the signal")
    assert evaluation_s >= 5 and stopped_s < evaluation_s / 2, (evaluation_s, stopped_s)
    log = (run / "train.log").read_text()
    assert "stop signal during the evaluation at step 2" in log
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not (run / "eval.jsonl").exists()

    train(run, common, timeout=600)  # the requeued job: the evaluation at step 2 again, step 3
    assert "resumed from" in (run / "train.log").read_text()
    figures = [json.loads(p.read_text()) for p in (straight / "eval.jsonl", run / "eval.jsonl")]
    assert figures[1] == figures[0] and figures[0]["step"] == 2
    assert scalars(run, "loss/lm")[3] == scalars(straight, "loss/lm")[3]


@pytest.mark.heavy  # a resume whose conversion is made to outlast the collective timeout: 40 s
def test_rank0_work_longer_than_the_collective_timeout_does_not_end_the_run(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "solo"
    train(run, ["train.steps=4", "run.stop_after_steps=2", "checkpoint.every=0"], world=1)
    # resumed on 2 ranks: rank 0 converts the checkpoint to its universal form while rank 1
    # waits; the conversion is made to take three times the collective timeout
    monkeypatch.setenv("MMTRAIN_SLOW_RANK0_S", "15")
    train(run, ["train.steps=4", "dist.timeout_s=5", "checkpoint.every=0"], timeout=300)
    log = (run / "train.log").read_text()
    assert "checkpoint written by 1 ranks, resumed on 2" in log and "done: 4 steps" in log
