from mmtrain.engine.dist import job_port, resolve_env


def test_slurm_variables_map_to_torch_distributed():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[12-13]",
        "SLURM_JOB_ID": "4242",
    }
    resolve_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == (
        "5",
        "16",
        "1",
        "gpu12",
    )
    # below 32768
    assert env["MASTER_PORT"] == str(job_port(4242)) and 15000 <= job_port(4242) < 30000
    requeued = {
        **{k: v for k, v in env.items() if k.startswith("SLURM_")},
        "SLURM_RESTART_COUNT": "2",
    }
    resolve_env(requeued)  # a requeued job does not reuse the old port
    assert requeued["MASTER_PORT"] == str(job_port(4242, 2)) != env["MASTER_PORT"]
    torchrun = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }
    resolve_env(torchrun)  # a launcher's own variables win
    assert (torchrun["RANK"], torchrun["WORLD_SIZE"]) == ("3", "4")
    single = {}
    resolve_env(single)
    assert (single["RANK"], single["WORLD_SIZE"], single["LOCAL_RANK"]) == ("0", "1", "0")


def test_in_process_init_leaves_no_rank_variables_behind(monkeypatch):
    """A single-process run inside a test or notebook must not make later launches inherit RANK=0."""
    import os

    from mmtrain.engine import dist

    for k in dist.DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    env = dist.init("gloo", 60)
    assert (env.rank, env.world_size) == (0, 1) and os.environ["WORLD_SIZE"] == "1"
    dist.shutdown()
    assert not any(k in os.environ for k in dist.DIST_VARS)
