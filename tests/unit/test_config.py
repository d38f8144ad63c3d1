import textwrap
from pathlib import Path

import pytest

from mmtrain.config import ConfigError, load_config, load_run_config, save_config
from tests.helpers import DEMO


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_demo_config_resolves_with_base_and_overrides():
    cfg = load_config(DEMO, ["train.lr=0.5", "recipe.hidden_size=32"])
    assert cfg.train.lr == 0.5 and cfg.recipe.hidden_size == 32
    assert cfg.train.weight_decay == 0.05  # from configs/base.yaml
    assert cfg.deepspeed.precision == "fp32"  # the demo file overrides the base
    assert type(cfg.recipe).__name__ == "ToyLMConfig"


def test_base_chain_file_wins_over_base(tmp_path):
    write(tmp_path, "a.yaml", "train:\n  lr: 1.0\n  steps: 7\n")
    child = write(tmp_path, "b.yaml", "base: a.yaml\ntrain:\n  lr: 2.0\n")
    cfg = load_config(child)
    assert (cfg.train.lr, cfg.train.steps) == (2.0, 7)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", "unknown key 'train.lrr'; did you mean 'train.lr'"),
        ("trian.lr=1", "unknown key 'trian'; did you mean 'train'"),
        ("recipe.hiden_size=3", "did you mean 'recipe.hidden_size'"),
        ("train.steps=abc", "key 'train.steps' expects int"),
        (
            "deepspeed.precision=fp8",
            "'deepspeed.precision' must be one of ['bf16', 'fp16', 'fp32']",
        ),
        (
            "recipe.model_path=/no/such/dir",
            "key 'recipe.model_path': path does not exist: /no/such/dir",
        ),
        ("recipe.name=toylm", "unknown recipe 'recipe.name=toylm'; did you mean 'toy_lm'"),
        ("train.micro_batch_size=0", "'train.micro_batch_size' must be >= 1"),
        ("deepspeed.zero_stage=4", "'deepspeed.zero_stage' must be 0, 1, 2, 3 or auto, got '4'"),
        ("run.resume=/no/ckpt", "path does not exist: /no/ckpt"),
        ("train.lr", "is not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override])
    assert message in str(e.value)


@pytest.mark.chaos
@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lr=-1", "key 'train.lr' must be > 0, got -1.0"),
        ("train.grad_clip=-1", "key 'train.grad_clip' must be >= 0, got -1.0"),
        ("train.max_bad_steps=0", "key 'train.max_bad_steps' must be >= 1, got 0"),
        ("checkpoint.every=-1", "key 'checkpoint.every' must be >= 0, got -1"),
        ("dist.timeout_s=-1", "key 'dist.timeout_s' must be >= 1, got -1"),
        ("train.weight_decay=-1", "key 'train.weight_decay' must be >= 0, got -1.0"),
        ("train.eps=-1", "key 'train.eps' must be > 0, got -1.0"),
        ("train.warmup_ratio=1", "key 'train.warmup_ratio' must be >= 0 and < 1, got 1.0"),
        ("train.betas=[0.9,1.5]", "key 'train.betas' must hold two numbers in [0, 1)"),
        ("run.stop_after_steps=0", "key 'run.stop_after_steps' must be >= 1, got 0"),
    ],
)
def test_values_out_of_their_range_name_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override])
    assert message in str(e.value)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "recipe.data.max_skip_fraction=-1",
            "key 'recipe.data.max_skip_fraction' must be >= 0 and <= 1, got -1.0",
        ),
        ("recipe.data.workers=-1", "key 'recipe.data.workers' must be >= 0, got -1"),
    ],
)
def test_data_section_ranges(tmp_path, override, message):
    (tmp_path / "shards").mkdir()
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            [
                "recipe.name=tests.shard_recipe:ShardColor",
                f"recipe.data.train={tmp_path / 'shards'}",
                override,
            ],
        )
    assert message in str(e.value)


@pytest.mark.chaos
def test_shards_of_the_wrong_kind_empty_or_without_manifest_fail_before_any_rank_starts(tmp_path):
    from mmtrain.data.synth import synth

    synth("dialogue", str(tmp_path / "dlg"), 40, seed=0)
    (tmp_path / "bare").mkdir()
    recipe = ["recipe.name=tests.shard_recipe:ShardColor"]
    with pytest.raises(
        ConfigError,
        match=r"key 'recipe.data.train': .*dlg/train holds 'dialogue' shards, but "
        r"recipe tests.shard_recipe:ShardColor reads 'image-text' shards here",
    ):
        load_config(None, [*recipe, f"recipe.data.train={tmp_path / 'dlg' / 'train'}"])
    with pytest.raises(
        ConfigError, match=r"key 'recipe.data.val': .*bare/manifest.json is missing"
    ):
        load_config(None, [*recipe, f"recipe.data.val={tmp_path / 'bare'}"])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    bad = write(tmp_path, "bad.yaml", f"base: {DEMO}\ncheckpoint:\n  evrey: 5\n")
    with pytest.raises(
        ConfigError,
        match=r"config .*bad.yaml: unknown key 'checkpoint.evrey'; did you mean 'checkpoint.every'",
    ):
        load_config(bad)


def test_missing_file_and_base_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    child = write(tmp_path, "c.yaml", "base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone.yaml \(named as a base by .*c.yaml\)"):
        load_config(child)
    write(tmp_path, "x.yaml", "base: y.yaml\n")
    y = write(tmp_path, "y.yaml", "base: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(y)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(DEMO, ["train.lr=0.25", "recipe.lora.enabled=true"])
    (tmp_path / "r").mkdir()
    save_config(cfg, tmp_path / "r" / "config.yaml")
    again = load_run_config(tmp_path / "r")
    assert again == cfg
    with pytest.raises(ConfigError, match="not an mmtrain run directory"):
        load_run_config(tmp_path)


def test_cli_config_exits_2_with_one_line(capsys):
    from mmtrain.cli import main

    assert main(["config", str(DEMO), "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'train.lr'" in err[0]
    assert main(["config", str(DEMO), "train.lr=0.125"]) == 0
    assert "lr: 0.125" in capsys.readouterr().out


@pytest.mark.chaos
def test_a_run_directory_that_cannot_be_made_or_written_is_named_before_any_rank_starts(
    tmp_path, monkeypatch
):
    """Both used to pass the config check and then give each rank a 30-line traceback."""
    import os

    from mmtrain.config import check_run_dir

    (tmp_path / "afile").write_text("x")
    cfg = load_config(DEMO, [f"run.out_dir={tmp_path / 'afile'}"])
    with pytest.raises(ConfigError, match=r"run.out_dir.*cannot be made: .*afile is a file"):
        check_run_dir(cfg)
    ro = tmp_path / "ro"
    ro.mkdir()
    cfg = load_config(DEMO, [f"run.out_dir={ro / 'deeper'}"])
    check_run_dir(cfg)  # writable: fine
    # a read-only mount (root writes through file modes, so the mount is what stops it)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ro and access(p, mode))
    with pytest.raises(ConfigError, match=r"cannot be written: .*ro is read-only"):
        check_run_dir(cfg)
