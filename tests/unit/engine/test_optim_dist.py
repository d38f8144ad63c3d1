import math
import socket

import pytest
import torch

from mmtrain.config import ConfigError, load_config
from mmtrain.engine.dist import first_host, job_port
from mmtrain.engine.optim import (
    deepspeed_config,
    param_groups,
    warmup_cosine,
    widest_hidden_size,
)
from tests.helpers import DEMO


def test_warmup_then_cosine_to_floor():
    total, warm = 100, 10
    lrs = [warmup_cosine(s, total, warm, 0.1) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))  # rising warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # falling after
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[100] == pytest.approx(0.1)


def test_param_groups_skip_decay_on_norms_biases_and_frozen():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    m[2].weight.requires_grad_(False)
    groups = param_groups(m, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay == {id(m[0].weight)}
    assert no_decay == {id(m[0].bias), id(m[1].weight), id(m[1].bias), id(m[2].bias)}
    with pytest.raises(RuntimeError, match="no trainable parameters"):
        param_groups(torch.nn.Linear(2, 2).requires_grad_(False), 0.1)


def test_param_groups_and_counts_read_the_full_shape_of_a_partitioned_parameter():
    """Partitioned by ZeRO-3 as it loaded, a weight matrix is 1-d and empty on its rank: it used to
    lose its weight decay (and count 0 parameters)."""
    from mmtrain.parallelize import numel, partition_summary

    m = torch.nn.Linear(4, 6)
    for p in m.parameters():  # what deepspeed.zero.Init leaves on a rank of 2
        full = p.shape
        p.data = torch.empty(0)
        p.ds_shape, p.ds_numel, p.ds_tensor = full, full.numel(), torch.empty(full.numel() // 2)
    groups = param_groups(m, 0.1)
    assert [id(p) for p in groups[0]["params"]] == [id(m.weight)]
    assert [id(p) for p in groups[1]["params"]] == [id(m.bias)]
    assert numel(m.weight) == 24
    assert partition_summary(m) == {
        "elements": 30,
        "held": 15,
        "tensors": 2,
        "partitioned_tensors": 2,
    }


def test_deepspeed_config_from_ours():
    cfg = load_config(
        DEMO,
        [
            "deepspeed.zero_stage=3",
            "train.grad_accum=4",
            "deepspeed.precision=bf16",
            "deepspeed.extra={zero_optimization: {stage3_max_live_parameters: 7}}",
        ],
    )
    ds = deepspeed_config(cfg, world_size=8, on_cuda=True)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * 4 * 8
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == 7  # extra merged deep
    # torch's fused AdamW on CUDA: nothing to JIT-compile on 64 ranks at start-up
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["fused"]
    on_cpu = deepspeed_config(cfg, 1, on_cuda=False)["optimizer"]["params"]
    assert on_cpu["torch_adam"] is True and "fused" not in on_cpu
    deepspeeds = load_config(DEMO, ["deepspeed.optimizer=fused"])
    assert (
        deepspeed_config(deepspeeds, 1, on_cuda=True)["optimizer"]["params"]["torch_adam"] is False
    )


def test_zero3_sizes_follow_the_widest_hidden_size_unless_given():
    cfg = load_config(DEMO, ["deepspeed.zero_stage=3"])
    zero = deepspeed_config(cfg, 8, on_cuda=True, hidden=4096)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096 * 4096
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
    # norms, biases, rank-64 LoRA adapters (64 x 4096) stay whole; weight matrices do not
    assert zero["stage3_param_persistence_threshold"] == 64 * 4096
    small = deepspeed_config(cfg, 8, on_cuda=True, hidden=64)["zero_optimization"]
    assert small["reduce_bucket_size"] == small["stage3_prefetch_bucket_size"] == 1 << 20
    assert small["stage3_param_persistence_threshold"] == 100_000
    unknown = deepspeed_config(cfg, 8, on_cuda=True)["zero_optimization"]  # DeepSpeed's own
    assert (unknown["reduce_bucket_size"], unknown["stage3_param_persistence_threshold"]) == (
        500_000_000,
        100_000,
    )
    # the config that partitions a model as it loads persists nothing: the final one decides
    loading = deepspeed_config(cfg, 8, on_cuda=True, built=False)["zero_optimization"]
    assert loading["stage3_param_persistence_threshold"] == 0
    given = load_config(DEMO, ["deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=7"])
    for built in (True, False):
        zero = deepspeed_config(given, 8, on_cuda=True, hidden=4096, built=built)
        assert zero["zero_optimization"]["stage3_param_persistence_threshold"] == 7
    with pytest.raises(ConfigError, match="'deepspeed.reduce_bucket_size' must be auto or a whole"):
        load_config(DEMO, ["deepspeed.reduce_bucket_size=big"])


def test_widest_hidden_size_reads_the_transformers_configs_inside():
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    small = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, vocab_size=16)
    model = torch.nn.ModuleDict(
        {
            "bert": BertModel(BertConfig(hidden_size=8, **small)),
            "llm": LlamaForCausalLM(LlamaConfig(hidden_size=12, **small)),
            "head": torch.nn.Linear(3, 3),
        }
    )
    assert widest_hidden_size(model) == 12
    assert widest_hidden_size(torch.nn.Linear(3, 3)) is None


def test_zero_plus_plus_partitions_within_a_node():
    cfg = load_config(DEMO, ["deepspeed.zero_stage=3", "deepspeed.hpz_partition_size=8"])
    assert (
        deepspeed_config(cfg, 16, on_cuda=True)["zero_optimization"]["zero_hpz_partition_size"] == 8
    )
    with pytest.raises(
        ConfigError, match=r"hpz_partition_size' \(8\) must divide the number of ranks \(12\)"
    ):
        deepspeed_config(cfg, 12, on_cuda=True)
    with pytest.raises(ConfigError, match="needs deepspeed.zero_stage=3"):
        load_config(DEMO, ["deepspeed.zero_stage=2", "deepspeed.hpz_partition_size=8"])
    auto = load_config(DEMO, ["deepspeed.zero_stage=auto", "deepspeed.hpz_partition_size=8"])
    with pytest.raises(ConfigError, match="needs ZeRO stage 3; stage 2 was chosen"):
        deepspeed_config(auto, 16, on_cuda=True, stage=2)


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("gpu[003-005,9],cpu1", "gpu003"),
        ("node7", "node7"),
        ("a-b[10,12]", "a-b10"),
        ("a[01-02]b[1-2]", "a01b1"),
        ("n1,n2", "n1"),
        ("rack[1-2]-gpu[07,09],x", "rack1-gpu07"),
    ],
)
def test_first_host_of_slurm_nodelist(nodelist, first):
    assert first_host(nodelist) == first


def test_job_ports_stay_below_the_ephemeral_range_and_spread():
    ports = [job_port(j) for j in range(1000, 1000 + 20000 * 50, 20000)]  # ids 20,000 apart
    assert all(15000 <= p < 30000 for p in ports) and len(set(ports)) == len(ports)
    assert len({job_port(j) for j in range(5000, 5100)}) >= 99  # neighbours rarely collide
    with socket.socket() as s:  # taken on this host: skipped
        s.bind(("", job_port(77, 0)))
        s.listen()
        assert job_port(77, 0, probe=True) != job_port(77, 0)


def test_frozen_and_evaluated_models_keep_fp32_buffers_in_bf16():
    """`module.to(device, bf16)` rounded RoPE's inv_freq to bf16 in BVIF's frozen LLM and in
    `mmtrain eval`; DeepSpeed keeps buffers fp32 in training, so evaluation differed from it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmtrain.models.base import to_precision

    lm = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    )  # fmt: skip
    inv_freq = lm.model.rotary_emb.inv_freq.clone()
    to_precision(lm, torch.device("cpu"), torch.bfloat16)
    assert lm.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert lm.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(lm.model.rotary_emb.inv_freq, inv_freq)
    assert not torch.equal(inv_freq.to(torch.bfloat16).float(), inv_freq)  # what .to() did


def test_zero_stage_auto_replicates_what_fits_and_partitions_what_does_not():
    from mmtrain.engine.optim import choose_zero_stage

    gib = 2**30
    # a bert-base IQ-Former with heads (~120M, all trained) on 80 GB GPUs x 8: stage 2
    stage, est = choose_zero_stage(120e6, 120e6, 8, 80 * gib, "bf16")
    assert stage == 2 and est["stage2"] == 2 * 120e6 + 14 * 120e6 / 8
    # Qwen2-VL-7B with LoRA (8.3B, 20M trained): 16.6 GB of weights replicated still fit: 2
    assert choose_zero_stage(8.3e9, 20e6, 8, 80 * gib, "bf16")[0] == 2
    # full fine-tuning of the same: 16.6 GB + 14 x 8.3B / 8 = 31.1 GB, under half of 80 GB: 2 ...
    stage, est = choose_zero_stage(8.3e9, 8.3e9, 8, 80 * gib, "bf16")
    assert est["stage2"] == pytest.approx(2 * 8.3e9 + 14 * 8.3e9 / 8)
    assert stage == 2
    # ... and 3 on 40 GB GPUs, or for a 72B model anywhere
    assert choose_zero_stage(8.3e9, 8.3e9, 8, 40 * gib, "bf16")[0] == 3
    assert choose_zero_stage(72e9, 72e9, 64, 80 * gib, "bf16")[0] == 3
    # fp32: 4-byte weights and gradients, no separate master copy
    assert choose_zero_stage(1e6, 1e6, 2, 1 * gib, "fp32")[1]["stage3"] == (4 + 12) * 1e6 / 2


def test_deepspeed_config_needs_the_stage_chosen_when_auto():
    cfg = load_config(DEMO, ["deepspeed.zero_stage=auto"])
    with pytest.raises(ValueError, match="choose the stage first"):
        deepspeed_config(cfg, 2, on_cuda=False)
    assert deepspeed_config(cfg, 2, on_cuda=False, stage=2)["zero_optimization"]["stage"] == 2
    conf = deepspeed_config(load_config(DEMO, ["deepspeed.zero_stage=3"]), 2, on_cuda=False)
    assert conf["zero_optimization"]["stage"] == 3  # a number in YAML or on the command line
    assert "stage3_param_persistence_threshold" in conf["zero_optimization"]
