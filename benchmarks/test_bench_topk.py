"""A sparse teacher (ref_topk, K ids a token) against dense distillation at the same shapes: time, peak
memory and the teacher data each needs. The same loss family: CE + HRM * forward KL, T = 1.

    dense          hrm_loss(s, t, y): the teacher's (N, V) logits (what the teacher data must be)
    topk-renorm    hrm_loss(s, None, y, ref_topk=(ids, lps)): teacher renormalised over its top-K
    topk-tail      the same with topk_mode="tail": K + 1 outcomes, the student's exact rest mass
    naive-topk     eager PyTorch of "renorm": log_softmax of the student, gather at the ids, KL

K is HRMLOSS_BENCH_TOPK (default 64; 8 at the tiny size). teacher_bytes in the JSON: N V x element size
for dense, N K x 8 (int32 id + fp32 log-prob) for the top-k providers.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from ._runner import build, measure
from .common import bench_size, cases, loss_inputs, modes, reference_loss, too_large
from .providers import HRM, IGNORE, Unavailable

TOPK_PROVIDERS = ("dense", "topk-renorm", "topk-tail", "naive-topk")
_REF, _TOPK = {}, {}


def topk_k():
    return int(os.environ.get("HRMLOSS_BENCH_TOPK") or (8 if bench_size()[0] == "tiny" else 64))


def naive_topk(s, y, ids, lps):
    """The renorm loss as one would write it in PyTorch, in the dtype of the logits."""
    live = y != IGNORE
    n = live.sum().clamp(min=1)
    lq = F.log_softmax(s, -1).gather(-1, ids)
    lp = F.log_softmax(lps, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return (F.cross_entropy(s, y, ignore_index=IGNORE, reduction="sum") + HRM * torch.where(live, kl, 0.0).sum()) / n


def topk_provider(name, device):
    import hrmloss
    if name == "dense":
        return lambda s, t, y, ids, lps: hrmloss.hrm_loss(s, t, y, HRM, ignore_index=IGNORE)
    if name in ("topk-renorm", "topk-tail"):
        mode = name.split("-")[1]
        return lambda s, t, y, ids, lps: hrmloss.hrm_loss(s, None, y, HRM, ref_topk=(ids, lps), topk_mode=mode,
                                                          ignore_index=IGNORE)
    if name == "naive-topk":
        return lambda s, t, y, ids, lps: naive_topk(s, y, ids, lps)
    raise Unavailable(f"provider={name!r}: expected one of {TOPK_PROVIDERS}")


def topk_reference(s, y, ids, lps, tail, rows=256):
    """float64 CE + HRM * KL to the sparse teacher (renorm or tail), in chunks of rows."""
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, s.shape[0], rows):
        sc, yc, ic, lc = s[i:i + rows].double(), y[i:i + rows], ids[i:i + rows], lps[i:i + rows].double()
        lq = F.log_softmax(sc, -1)
        if tail:
            off = torch.ones_like(lq, dtype=torch.bool).scatter(-1, ic, False)
            lq_rest = torch.logsumexp(torch.where(off, lq, float("-inf")), -1)
            p_rest = (1 - lc.exp().sum(-1)).clamp(min=0)
            kl = (lc.exp() * (lc - lq.gather(-1, ic))).sum(-1) + torch.where(
                p_rest > 0, p_rest * (p_rest.log() - lq_rest), 0.0)
        else:
            lp = F.log_softmax(lc, -1)
            kl = (lp.exp() * (lp - lq.gather(-1, ic))).sum(-1)
        total += F.cross_entropy(sc, yc, ignore_index=IGNORE, reduction="sum")
        total += HRM * torch.where(yc != IGNORE, kl, 0.0).sum()
    return (total / (y != IGNORE).sum().clamp(min=1)).item()


@pytest.mark.parametrize("mode", modes())
@pytest.mark.parametrize("provider", TOPK_PROVIDERS)
@pytest.mark.parametrize("case", cases(), ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def test_topk(benchmark, device, size, case, provider, mode):
    n, v, dtype_name = case
    if too_large(n, v):
        pytest.skip(f"{n}x{v} above HRMLOSS_BENCH_MAX_ELEMS")
    K = topk_k()
    benchmark.group = f"topk K={K} {n}x{v} {dtype_name} {mode}"
    fn = build(topk_provider, provider, device)
    s0, t, y = loss_inputs(n, v, getattr(torch, dtype_name), device)
    if case not in _TOPK:
        lps, ids = torch.log_softmax(t.float(), -1).topk(K, -1)
        _TOPK[case] = (ids.int(), lps)
    ids, lps = _TOPK[case]
    key = (case, provider if provider == "topk-tail" else "renorm" if "topk" in provider else "dense")
    if key not in _REF:
        _REF[key] = reference_loss(s0, t, y) if key[1] == "dense" else \
            topk_reference(s0, y, ids.long(), lps, tail=provider == "topk-tail")
    teacher_bytes = t.numel() * t.element_size() if provider == "dense" else ids.numel() * 8
    info = dict(kind="topk", provider=provider, n=n, v=v, k=K, dtype=dtype_name, teacher_bytes=teacher_bytes,
                nvs_bytes=s0.numel() * s0.element_size())
    rtol = 1e-4 if dtype_name == "float32" else 2e-2
    measure(benchmark, fn, lambda: (s0.clone().requires_grad_(), t, y, ids, lps), mode, device, _REF[key], rtol,
            info, size)
