"""The kernel tests' device: torch's default device is the GPU on a machine with CUDA, so that the
same tests run the compiled, autotuned kernels there; on a CPU machine they stay on the CPU, under
the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 only without CUDA)."""

import pytest
import torch

from tests.support.kernels import DEVICE


@pytest.fixture(autouse=True)
def kernel_device():
    if DEVICE == "cpu":
        yield
        return
    torch.set_default_device(DEVICE)
    try:
        yield
    finally:
        torch.set_default_device("cpu")
