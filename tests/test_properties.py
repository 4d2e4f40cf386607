"""A property test (hypothesis): drawn shapes, dtypes, options, -inf entries, ignored tokens, token weights and
num_items, on both backends and both entry points, against the float64 oracle of tests/reference.py, or an
invalid input drawn on purpose and a ValueError naming it. Never a NaN that the oracle does not have.

Derandomized (the same examples on every run) and sized for CI: about 40 s under the Triton interpreter.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hrmloss
from .reference import reference_loss

INF = math.inf
# invalid inputs the test draws on purpose: argument -> a bad value (labels: one label out of range)
BAD = {"hrm": -0.5, "temperature": 1e-50, "beta": 1.0, "label_smoothing": 1.0, "z_loss": 1e39,
       "labels": None, "token_weights": None, "num_items": -2.0}


@st.composite
def cases(draw):
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 24)))
    case = dict(
        entry=draw(st.sampled_from(["logits", "logits", "linear"])),
        backend=draw(st.sampled_from(["torch", "triton"])),
        shape=shape,
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])),
        seed=draw(st.integers(0, 2 ** 16)),
        scale=draw(st.sampled_from([0.1, 1.0, 4.0, 30.0])),
        minus_inf=draw(st.sampled_from([0.0, 0.0, 0.25])),   # share of -inf logits (student, reference)
        ignored=draw(st.sampled_from([0.0, 0.3, 1.0])),       # share of ignored tokens
        weighted=draw(st.booleans()),
        num_items=draw(st.sampled_from([None, None, "number", "tensor"])),
        bad=draw(st.sampled_from([None] * 8 + sorted(BAD))),
        opts=dict(
            kl=draw(st.sampled_from(["forward", "reverse", "jsd"])),
            hrm=draw(st.sampled_from([0.0, 0.3, 1.0, 2.5])),
            temperature=draw(st.sampled_from([1.0, 0.5, 2.0])),
            beta=draw(st.sampled_from([0.1, 0.5, 0.9])),
            label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1])),
            z_loss=draw(st.sampled_from([0.0, 0.0, 1e-3])),
            softcap=draw(st.sampled_from([None, None, 5.0])),
            reduction=draw(st.sampled_from(["mean", "sum", "none"]))))
    if case["entry"] == "linear":
        case["dtype"] = torch.float32  # its GEMM rounds in the inputs' dtype: the oracle takes fp32 logits
    return case


def _inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    B, T, V = case["shape"]
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64) * case["scale"]
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * case["scale"]
    if case["minus_inf"]:
        s = s.masked_fill(torch.rand(s.shape, generator=g) < case["minus_inf"], -INF)
        t = t.masked_fill(torch.rand(t.shape, generator=g) < case["minus_inf"], -INF)
    y = torch.randint(0, V, (B, T), generator=g)
    y = y.masked_fill(torch.rand(y.shape, generator=g) < case["ignored"], -100)
    w = torch.rand(B, T, generator=g) * 2 if case["weighted"] else None
    return s.to(case["dtype"]), t.to(case["dtype"]), y, w


def _call(case, s, t, y, w, opts):
    """hrmloss's (loss, ce, kl, z) and d loss / d s (None for reduction "none": then ones as grad_output)."""
    if case["entry"] == "linear":  # logits s = hidden @ weight.T with an identity-like weight: s exactly
        hidden = s.reshape(-1, s.shape[-1]).float().nan_to_num(neginf=-1e4).reshape(s.shape).requires_grad_()
        weight = torch.eye(s.shape[-1])
        out = hrmloss.linear_hrm_loss(hidden, weight, y, ref_logits=t, token_weights=w, return_components=True,
                                      backend=case["backend"], **opts)
        leaf = hidden
    else:
        leaf = s.detach().requires_grad_()
        out = hrmloss.hrm_loss(leaf, t, y, token_weights=w, return_components=True, backend=case["backend"], **opts)
    out.loss.backward(torch.ones_like(out.loss))
    return out, leaf.grad


def _oracle(case, s, t, y, w, opts):
    s64 = s.double().requires_grad_()
    out = reference_loss(s64, t, y, token_weights=w, **opts)
    out[0].backward(torch.ones_like(out[0]))
    rows = reference_loss(s.double(), t, y, token_weights=w, **{**opts, "reduction": "none",
                                                                 "num_items": None})[0]
    return out, s64.grad, rows


def _agree(name, got, want, tol):
    got = got.double()
    assert not (got.isnan() & ~want.isnan()).any(), f"{name}: NaN where the oracle has {want}"
    inf = want.isinf()
    assert torch.equal(got[inf], want[inf]), f"{name}: {got[inf]} where the oracle is {want[inf]}"
    fin = want.isfinite()
    if fin.any():
        scale = max(1.0, want[fin].abs().max().item())
        torch.testing.assert_close(got[fin], want[fin], rtol=tol, atol=tol * scale, msg=name)


@settings(max_examples=200, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_both_backends_agree_with_the_oracle_or_name_the_bad_input(case):
    s, t, y, w = _inputs(case)
    opts = dict(case["opts"])
    live = y != -100
    if case["num_items"] == "number":
        opts["num_items"] = float(live.sum()) + 1.5
    elif case["num_items"] == "tensor":
        opts["num_items"] = torch.tensor(float(live.sum()) + 1.0)
    if "num_items" in opts and opts["reduction"] != "mean":
        del opts["num_items"]
    bad = case["bad"]
    if bad is not None:
        if bad == "labels":
            y = y.clone()
            y.view(-1)[0] = s.shape[-1]
        elif bad == "token_weights":
            w = torch.ones(y.shape)
            w.view(-1)[-1] = INF
        elif bad == "num_items":
            opts["num_items"], opts["reduction"] = torch.tensor(BAD[bad]), "mean"
        else:
            opts[bad] = BAD[bad]
        with pytest.raises(ValueError, match=bad):
            _call(case, s, t, y, w, opts)
        return
    if case["entry"] == "linear":
        s = s.nan_to_num(neginf=-1e4)  # what the linear entry's hidden states hold
    got, grad = _call(case, s, t, y, w, opts)
    want, want_grad, rows = _oracle(case, s, t, y, w, opts)
    tol = 2e-5 if case["dtype"] == torch.float32 else 2e-4
    for name, a, b in zip(("loss", "ce", "kl", "z"), got, want):
        _agree(name, a, b, tol * (1 + opts["hrm"] / opts["temperature"]))
    # the gradient where the oracle's is finite, in rows whose loss is finite (an infinite loss has no
    # meaningful gradient), to the rounding of the gradient's dtype
    assert not (grad.isnan() & want_grad.isfinite()).any(), "grad: NaN where the oracle's is finite"
    keep = rows.isfinite().reshape(-1)
    g, gw = grad.reshape(keep.shape[0], -1)[keep], want_grad.reshape(keep.shape[0], -1)[keep]
    fin = gw.isfinite()
    gtol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[grad.dtype]
    _agree("grad", torch.where(fin, g.double(), 0.0), torch.where(fin, gw, 0.0), gtol * (1 + 2 * opts["hrm"]))
