"""Pipelines read and checked without running anything: stage kinds, references to earlier
stages, every train stage's config validated before the first stage starts."""

import textwrap

import pytest

from mmtrain.cli import main
from mmtrain.pipeline import Pipeline, is_pipeline
from mmtrain.schema import ConfigError
from tests.helpers import DEMO


def write(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text).replace("DEMO", str(DEMO)))
    return path


TWO_STAGES = """
    name: chain
    out_dir: OUT
    set: [train.steps=4]
    stages:
      first: {train: DEMO, export: true, show: [loss]}
      second: {train: DEMO, set: ["recipe.model_path=${stages.first.export}/lm"]}
      val: {eval: second, split: val}
"""


def test_stages_name_earlier_outputs_and_every_config_is_checked_first(tmp_path):
    path = write(tmp_path, TWO_STAGES.replace("OUT", str(tmp_path / "runs")))
    p = Pipeline(path)
    p.check()  # first/export/lm does not exist yet: an earlier stage writes it
    first, second, val = p.stages
    assert [s.kind for s in p.stages] == ["train", "train", "eval"]
    assert second.spec["set"] == [
        f"recipe.model_path={tmp_path / 'runs' / 'chain' / 'first'}/export/lm"
    ]
    assert p.train_overrides(second)[0] == "train.steps=4"  # the pipeline's, then the stage's own
    assert f"run.out_dir={tmp_path / 'runs' / 'chain'}" in p.train_overrides(second)
    assert "run.name=second" in p.train_overrides(second)
    assert is_pipeline(path) and not is_pipeline(DEMO)


@pytest.mark.parametrize(
    "change,message",
    [
        (
            ("${stages.first.export}", "${stages.val.export}"),
            r"stage second: .*earlier stage: first",
        ),
        (
            ("{eval: second,", "{eval: nothing,"),
            r"stage val names 'nothing', which is not an earlier train",
        ),
        (("{eval: second,", "{eval: first, train: DEMO,"), r"stage val: name exactly one kind"),
        (("split: val}", "spilt: val}"), r"stage val: unknown keys \['spilt'\]"),
        (
            ("set: [train.steps=4]", "set: [train.stepz=4]"),
            r"stage first: .*unknown key 'train.stepz'",
        ),
        (
            ("first: {train: DEMO,", "first: {train: nowhere.yaml,"),
            r"stage first: config file not found",
        ),
    ],
)
def test_a_bad_pipeline_fails_before_any_stage_runs_naming_the_stage(tmp_path, change, message):
    text = TWO_STAGES.replace("OUT", str(tmp_path / "runs")).replace(*change)
    with pytest.raises(ConfigError, match=message):
        Pipeline(write(tmp_path, text)).check()


def test_a_referenced_path_no_stage_writes_must_exist(tmp_path):
    text = TWO_STAGES.replace("OUT", str(tmp_path / "runs")).replace(
        "${stages.first.export}/lm", str(tmp_path / "missing")
    )
    with pytest.raises(ConfigError, match=r"stage second: key 'recipe.model_path': path does not"):
        Pipeline(write(tmp_path, text)).check()


def test_mmtrain_config_shows_a_pipelines_stages(tmp_path, capsys):
    path = write(tmp_path, TWO_STAGES.replace("OUT", str(tmp_path / "runs")))
    assert main(["config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[1] first: train" in out and "[3] val: eval second" in out
    assert main(["config", str(path), "--get", "run_dir"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "runs" / "chain")
    assert main(["config", str(path), "stages.val.spilt=x"]) == 2
    assert "unknown keys ['spilt']" in capsys.readouterr().err


def test_command_line_overrides_change_the_pipeline_or_go_to_every_train_stage(tmp_path):
    path = write(tmp_path, TWO_STAGES.replace("OUT", str(tmp_path / "runs")))
    p = Pipeline(path, ["name=other", "train.lr=0.5", "stages.val.split=test"])
    assert p.root == tmp_path / "runs" / "other"
    first = p.stages[0]
    assert p.train_overrides(first)[:2] == ["train.steps=4", "train.lr=0.5"]
    assert p.stages[2].spec["split"] == "test"


@pytest.mark.parametrize(
    "path",
    sorted((DEMO.parents[1] / "pipelines").glob("*.yaml"))
    + sorted(DEMO.parent.glob("pipelines/*.yaml")),
    ids=lambda p: f"{p.parent.parent.name}/{p.name}",
)
def test_the_shipped_pipelines_read_and_name_only_earlier_stages(path):
    p = Pipeline(path)
    for stage in p.stages:
        if stage.kind == "train":
            assert p.config_path(stage).is_file(), stage.name
        elif stage.kind == "eval":
            p.stage(str(stage.spec["eval"]), stage)
    assert is_pipeline(path)
