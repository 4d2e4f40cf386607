"""Global-memory bytes of the Triton kernels, counted in the Triton interpreter, in NVs.

NVs = bytes of one logits tensor. The design (docs/design.md §6) is 5 NVs forward + backward for hrmloss
(2 forward), the physical floor 3; a sparse teacher (hrmloss-triton-topk*, no t) 3 forward + backward plus
its K ids a row ("tail" reads them in both passes). Only Triton loads and stores are counted (not the
O(N K) torch maths of the sparse teacher): the PyTorch glue around
Liger's kernels (log_softmax of both logits, index_select of the counted rows, the sum of the two
gradients) is not, so its composed row is a lower bound.

Runs where the kernels run in the interpreter, i.e. with TRITON_INTERPRET=1 on CPU tensors (set by
benchmarks/conftest.py when there is no CUDA). The timings recorded for these entries are of the
interpreter and mean nothing.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from ._runner import MODES
from .common import bench_size, loss_inputs
from .providers import HRM, IGNORE

KERNELS = ("hrmloss-triton", "hrmloss-triton-topk", "hrmloss-triton-topk-tail", "liger-ce", "liger-kl", "liger")


def _traffic_shape():
    return (8, 1024) if bench_size()[0] == "tiny" else (64, 32000)


def _kernel(name):
    """fn(s, t, y) -> loss running only the named Triton kernels (and, for liger, its torch glue)."""
    if name == "hrmloss-triton":
        import hrmloss
        return lambda s, t, y: hrmloss.hrm_loss(s, t, y, HRM, ignore_index=IGNORE, backend="triton")
    if name.startswith("hrmloss-triton-topk"):  # a sparse teacher, the top-K of softmax(t) (K = 64; 8 tiny)
        import hrmloss
        k = 8 if bench_size()[0] == "tiny" else 64
        mode = "tail" if name.endswith("tail") else "renorm"

        def topk(s, t, y):
            lps, ids = torch.log_softmax(t.float(), -1).topk(k, -1)  # torch: not counted
            return hrmloss.hrm_loss(s, None, y, HRM, ref_topk=(ids, lps), topk_mode=mode, ignore_index=IGNORE,
                                    backend="triton")
        return topk
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError as e:
        pytest.skip(f"liger-kernel not installed ({e})")
    from .tools import interp_fixes  # noqa: F401 (Liger's kernels need it in the interpreter)
    if name == "liger-ce":
        return lambda s, t, y: LigerCrossEntropyLoss(ignore_index=IGNORE)(s, y)
    if name == "liger-kl":  # on log-probabilities made outside the counter's view by the caller
        return lambda s, t, y: LigerKLDIVLoss(reduction="batchmean", log_target=True)(s, t)
    from .providers import loss_provider
    return loss_provider("liger", torch.device("cuda"))  # the composed provider, device check passed


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_traffic(benchmark, kernel, mode, dtype_name):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("traffic is counted in the Triton interpreter: run with TRITON_INTERPRET=1")
    from .tools.traffic import count_traffic
    n, v = _traffic_shape()
    fn = _kernel(kernel)
    s0, t, y = loss_inputs(n, v, getattr(torch, dtype_name), torch.device("cpu"))
    if kernel == "liger-kl":
        s0, t = F.log_softmax(s0, -1), F.log_softmax(t, -1)
    benchmark.group = f"traffic {n}x{v} {dtype_name} {mode}"

    def step():
        s = s0.clone().requires_grad_()
        with count_traffic() as traffic:
            loss = fn(s, t, y)
            if mode == "forward+backward":
                loss.backward()
        return traffic

    traffic = benchmark.pedantic(step, rounds=1, iterations=1)
    nvs = s0.numel() * s0.element_size()
    assert traffic.launches > 0 and traffic.loaded > 0, traffic
    benchmark.extra_info.update(kind="traffic", provider=kernel, mode=mode, n=n, v=v, dtype=dtype_name,
                                nvs_bytes=nvs, loaded=traffic.loaded, stored=traffic.stored,
                                atomic=traffic.atomic, launches=traffic.launches,
                                traffic_nvs=traffic.total / nvs)
