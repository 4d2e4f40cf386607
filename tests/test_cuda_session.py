"""The CUDA cases the GPU session runs besides tests/test_cuda.py's (benchmarks/session.py, stage
"correctness"): a sparse (top-k) teacher, JSD with a mixture below the smallest normal fp32, and the soft
cap's fast reciprocal (ex2.approx and rcp.approx, which the interpreter does not run), each against the
float64 reference. Skipped without a CUDA device and TRITON_INTERPRET=0."""
import math
import os

import pytest
import torch

from .harness import check
from .test_topk import check_topk, make_topk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA device and TRITON_INTERPRET=0")


def _cuda(*xs):
    return [x.cuda() for x in xs]


@pytest.mark.parametrize("mode", ["renorm", "tail"])
@pytest.mark.parametrize("kl", ["forward", "jsd"])
def test_session_topk_teacher(mode, kl):
    s, _t, y, ids, lps = make_topk((64, 32000), 64)
    check_topk(*_cuda(s, y, ids, lps), "triton", atol=1e-4, topk_mode=mode, kl=kl, hrm=0.5)


def test_session_jsd_subnormal_mixture():
    # column 0: p ~ 1.5e-38 (normal) facing q ~ e^-200 (0 in fp32), so m = beta p is subnormal in fp32;
    # the kernels floor m at the smallest normal fp32 so that p log(p / m) stays ~p, not ~1
    V = 4096
    s = torch.zeros(8, V)
    t = torch.zeros(8, V)
    s[:, 0] = -200.0
    t[:, 0] = math.log(1.5e-38 * (V - 1))
    y = torch.arange(1, 9)
    check(s, t, y, "triton@cuda", atol=2e-5, hrm=0.5, kl="jsd", beta=0.5, ref_grad=True)


@pytest.mark.parametrize("softcap", [5.0, 30.0])
@pytest.mark.parametrize("kl", ["forward", "jsd"])
def test_session_softcap_fast_reciprocal(softcap, kl):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 32000, generator=g) * 20   # spans the cap's linear part and both saturations
    t = torch.randn(64, 32000, generator=g) * 3
    y = torch.randint(0, 32000, (64,), generator=g)
    check(s, t, y, "triton@cuda", atol=2e-5, hrm=0.5, kl=kl, softcap=softcap, ref_grad=True)
