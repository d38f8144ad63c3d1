"""bf16 training reduces and accumulates its gradients in fp32 by default
(`deepspeed.grad_reduce_dtype` / `grad_accum_dtype`, engine.optim.reduction_dtypes)."""

import pytest
import torch
from torch import nn

from mmtrain.config import load_config
from mmtrain.engine import dist
from mmtrain.engine.optim import deepspeed_config
from tests.helpers import DEMO

MICRO_STEPS, WIDTH = 16, 256


def accumulated_error(accum: str) -> float:
    """Relative error of the weight gradient DeepSpeed accumulates over 16 bf16 micro-steps
    (ZeRO-2, one rank), against the same sum in fp64 from the same bf16 weights and inputs."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    cfg = load_config(
        DEMO,
        [
            "deepspeed.precision=bf16",
            "deepspeed.zero_stage=2",
            f"deepspeed.grad_accum_dtype={accum}",
            f"train.grad_accum={MICRO_STEPS}",
            "train.micro_batch_size=8",
        ],
    )
    conf = deepspeed_config(cfg, 1, on_cuda=False, stage=2, hidden=WIDTH)
    torch.manual_seed(0)
    model = nn.Linear(WIDTH, WIDTH, bias=False)
    engine, *_ = deepspeed.initialize(model=model, config=conf, model_parameters=model.parameters())
    # inputs with a common offset: each micro-step's gradient has the same sign pattern, so the
    # running sum grows and a bf16 sum drops its low bits, as sums over many micro-steps do
    xs = [torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(i)) + 1 for i in range(16)]
    weight = engine.module.weight.detach().double()
    exact = torch.zeros_like(weight)
    for x in xs:
        # as the trainer does: backward after backward, the one engine.step() after the last
        engine.backward(engine(x.bfloat16()).float().pow(2).mean())
        w = weight.clone().requires_grad_()
        (x.bfloat16().double() @ w.T).pow(2).mean().backward()
        exact += w.grad / MICRO_STEPS  # DeepSpeed scales each micro-step's loss by 1/16
    # the trainer owns the accumulation boundary: the gradient is final when engine.step() hands
    # it to the optimizer, and read there
    seen, update = {}, engine.optimizer.step

    def read_then_update(*args, **kwargs):
        seen["grad"] = safe_get_full_grad(engine.module.weight).double()
        return update(*args, **kwargs)

    engine.optimizer.step = read_then_update
    engine.step()
    got = seen["grad"]
    engine.destroy()
    return float((got - exact).norm() / exact.norm())


@pytest.fixture
def one_rank():
    env = dist.init("gloo", 60)
    yield env
    dist.shutdown()


def test_fp32_accumulation_by_default_is_closer_to_the_exact_sum_than_bf16(one_rank, capsys):
    default, narrow = accumulated_error("auto"), accumulated_error("bf16")
    with capsys.disabled():
        print(f"\ngradient error over {MICRO_STEPS} bf16 micro-steps: fp32 accumulation "
              f"{default:.2e}, bf16 {narrow:.2e} ({narrow / default:.1f}x)")  # fmt: skip
    assert narrow > 3 * default, (default, narrow)


def test_the_config_names_the_dtypes_deepspeed_gets():
    def conf(*over, stage=3):
        return deepspeed_config(load_config(DEMO, list(over)), 2, False, stage=stage, hidden=64)

    bf16 = conf("deepspeed.precision=bf16")
    assert (bf16["communication_data_type"], bf16["data_types"]["grad_accum_dtype"]) == (
        "fp32",
        "fp32",
    )
    stage0 = conf("deepspeed.precision=bf16", stage=0)  # DeepSpeed accumulates in bf16 there
    assert (stage0["communication_data_type"], stage0["data_types"]["grad_accum_dtype"]) == (
        "fp32",
        "bf16",
    )
    fp16 = conf("deepspeed.precision=fp16")
    assert fp16["communication_data_type"] == fp16["data_types"]["grad_accum_dtype"] == "fp16"
    with pytest.raises(Exception, match="grad_accum_dtype.*must be the training precision"):
        conf("deepspeed.precision=bf16", "deepspeed.grad_accum_dtype=fp32", stage=0)
    with pytest.raises(Exception, match="narrower than the fp32 training precision"):
        conf("deepspeed.precision=fp32", "deepspeed.grad_reduce_dtype=bf16")
