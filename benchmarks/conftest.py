"""pytest configuration of the benchmarks (not part of `python -m pytest tests`; see benchmarks/README.md).

On a machine without CUDA the Triton kernels can only run in the interpreter, which the traffic
benchmark needs; it must be switched on before triton is first imported (torch does not import it).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .common import bench_device, bench_size  # noqa: E402
from .common import machine_info as describe  # noqa: E402


def pytest_benchmark_update_machine_info(config, machine_info):  # noqa: D103 (pytest-benchmark hook)
    name, _ = bench_size()
    machine_info["hrmloss_bench"] = dict(size=name, **describe(bench_device()))


@pytest.fixture(scope="session")
def device():
    return bench_device()


@pytest.fixture(scope="session")
def size():
    return bench_size()[1]
