"""One benchmark measurement: value check, first call (compile) time, peak memory, timed rounds.

Timing is pytest-benchmark's `pedantic` mode: fresh inputs for every round from `setup` (outside the
timer), one call per round, median and interquartile range reported.
"""
import math
import time

import pytest
import torch

from .common import peak_bytes
from .providers import Unavailable

MODES = ("forward", "forward+backward")


def build(factory, *args):
    try:
        return factory(*args)
    except Unavailable as e:
        pytest.skip(str(e))


def measure(benchmark, fn, setup, mode, device, reference, rtol, info, size):
    """Time `fn(*setup())` (and its backward), check its value against `reference`, record extra_info.

    setup() -> tuple of fresh inputs; fn(*inputs) -> scalar loss. The loss of the first call must match
    `reference` (the float64 value) within rtol, else the benchmark fails: a faster wrong loss is no win.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(*inputs):
        loss = fn(*inputs)
        if mode == "forward+backward":
            loss.backward()
        sync()
        return loss

    t0 = time.perf_counter()
    loss = step(*setup())  # compiles, for the compiled providers
    first = time.perf_counter() - t0
    value = float(loss.detach())
    if not math.isclose(value, reference, rel_tol=rtol, abs_tol=rtol):
        pytest.fail(f"{info['provider']}: loss {value!r}, float64 reference {reference!r} (rtol {rtol})")
    del loss
    inputs = setup()
    peak = peak_bytes(lambda: step(*inputs), device)
    del inputs
    benchmark.extra_info.update(info, mode=mode, loss=value, reference=reference, first_call_s=first,
                                peak_bytes=peak, peak_nvs=peak / info["nvs_bytes"])
    benchmark.pedantic(step, setup=lambda: (setup(), {}), rounds=size["rounds"],
                       warmup_rounds=size["warmup"], iterations=1)
