"""label_smoothing, z_loss, softcap, the gradient to ref_logits, num_items, autocast and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import hrmloss
from .harness import BACKENDS, check, close, make, run, truth

OPTION_SETS = [
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(softcap=4.0),
    dict(label_smoothing=0.2, z_loss=1e-2, softcap=5.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=str)
@pytest.mark.parametrize("kl,temperature", [("forward", 1.0), ("reverse", 2.0), ("jsd", 0.5)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_option_alone_and_combined(backend, opts, kl, temperature, reduction):
    s, t, y = make((3, 5, 83), ignore=-100)
    grad_out = torch.rand(3, 5) if reduction == "none" else None
    check(s, t, y, backend, hrm=0.5, kl=kl, temperature=temperature, reduction=reduction,
          grad_out=grad_out, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_smoothing_matches_cross_entropy(backend):
    # with hrm = 0 the loss is exactly F.cross_entropy(..., label_smoothing=eps), custom ignore_index
    s, t, y = make((9, 40), ignore=3)
    got = hrmloss.hrm_loss(s, t, y, 0.0, label_smoothing=0.3, ignore_index=3, backend=backend)
    close(got, F.cross_entropy(s.double(), y, label_smoothing=0.3, ignore_index=3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_options_in_low_precision(backend, dtype):
    s, t, y = make((6, 300), dtype=dtype, ref_dtype=torch.bfloat16)
    check(s, t, y, backend, atol=1e-2, hrm=0.5, label_smoothing=0.1, z_loss=1e-3, softcap=10.0,
          ref_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_ref_logits_gradient(backend, kl, temperature):
    s, t, y = make((2, 7, 61), ignore=-100)
    check(s, t, y, backend, hrm=0.7, kl=kl, beta=0.3, temperature=temperature, ref_grad=True,
          grad_out=torch.tensor(1.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ref_logits_gradient_per_token_and_hrm_zero(backend):
    s, t, y = make((4, 6, 50), ignore=-100)
    check(s, t, y, backend, hrm=2.0, kl="reverse", reduction="none", ref_grad=True, grad_out=torch.rand(4, 6))
    got = run(s, t, y, backend, hrm=0.0, ref_grad=True)  # the reference does not depend on t at all
    assert got[5].shape == t.shape and (got[5] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ref_gradient_with_shifted_views(backend):
    s, t, y = make((2, 9, 120))
    check(s[:, :-1], t[:, :-1], y[:, 1:], backend, hrm=0.5, kl="jsd", ref_grad=True, softcap=3.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_two_micro_batches_equal_one_batch(backend, as_tensor):
    s, t, y = make((4, 6, 50), ignore=-100)
    y[0, :4] = -100  # micro-batches with different counts of counted tokens
    n = int((y != -100).sum())
    num_items = torch.tensor(n) if as_tensor else n
    big = s.clone().requires_grad_(True)
    full = hrmloss.hrm_loss(big, t, y, 0.5, backend=backend, return_components=True)
    full.loss.backward()
    small = s.clone().requires_grad_(True)
    total = [hrmloss.hrm_loss(small[i:i + 2], t[i:i + 2], y[i:i + 2], 0.5, backend=backend,
                              num_items=num_items, return_components=True) for i in (0, 2)]
    (total[0].loss + total[1].loss).backward()
    for k in range(4):
        close(total[0][k] + total[1][k], full[k], atol=1e-6)
    close(small.grad, big.grad, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_field_and_sum(backend):
    s, t, y = make((5, 30), ignore=-100)
    out = hrmloss.hrm_loss(s, t, y, 0.5, z_loss=0.01, return_components=True, backend=backend)
    close(out.loss, out.ce + 0.5 * out.kl + out.z, atol=1e-6)
    assert out.z > 0
    assert hrmloss.hrm_loss(s, t, y, return_components=True, backend=backend).z == 0


BAD = [
    (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
    (dict(z_loss=-1e-4), ValueError, "z_loss"),
    (dict(z_loss="0.1"), TypeError, "z_loss"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-3.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(num_items=0), ValueError, "num_items"),
    (dict(num_items=-2.5), ValueError, "num_items"),   # a float is a weight sum (issue 20): >= 0
    (dict(num_items="3"), TypeError, "num_items"),
    (dict(num_items=torch.ones(2)), ValueError, "num_items"),
    (dict(num_items=4, reduction="sum"), ValueError, "num_items"),
]


@pytest.mark.parametrize("kwargs,exc,text", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_option_values(kwargs, exc, text):
    s, t, y = make((4, 10))
    with pytest.raises(exc, match=text):
        hrmloss.hrm_loss(s, t, y, **kwargs)
    if "num_items" not in kwargs:
        with pytest.raises(exc, match=text):
            hrmloss.HRMLoss(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_computes_and_returns_fp32(backend):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 40)
    h, y = torch.randn(12, 16), torch.randint(0, 40, (12,))
    t = torch.randn(12, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = lin(h)
        assert s.dtype == torch.bfloat16
        out = hrmloss.hrm_loss(s, t, y, 0.5, label_smoothing=0.1, return_components=True, backend=backend)
    assert all(x.dtype == torch.float32 for x in out)
    out.loss.backward()
    assert lin.weight.grad.dtype == torch.float32
    ref = truth(s.detach(), t, y, hrm=0.5, label_smoothing=0.1)  # same bf16 logits, float64 math
    close(out.loss, ref[0], atol=1e-5)


def test_torch_compile_fullgraph_forward_and_backward():
    # model + loss compiled whole (fullgraph: a graph break raises); AOTAutograd compiles the backward,
    # in which the gradient op must appear. CPU: the torch backend under inductor.
    from torch._dynamo.testing import AotEagerAndRecordGraphs
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))
    ref_model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))
    x, y = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    y[0, :2] = -100

    def loss_fn(model, x, y):
        with torch.no_grad():
            t = ref_model(x)
        return hrmloss.hrm_loss(model(x), t, y, 0.5, kl="reverse", label_smoothing=0.1, z_loss=1e-3,
                                softcap=20.0, return_components=True)

    def step(fn):
        model.zero_grad()
        out = fn(model, x, y)
        out.loss.backward()
        return [o.detach() for o in out] + [p.grad.clone() for p in model.parameters()]

    eager = step(loss_fn)
    torch._dynamo.reset()
    recorder = AotEagerAndRecordGraphs()
    step(torch.compile(loss_fn, fullgraph=True, backend=recorder))
    fw = "".join(g.print_readable(print_output=False) for g in recorder.fw_graphs)
    bw = "".join(g.print_readable(print_output=False) for g in recorder.bw_graphs)
    assert "hrmloss.row_stats" in fw and "hrmloss.grad" in bw
    torch._dynamo.reset()
    for a, b in zip(step(torch.compile(loss_fn, fullgraph=True)), eager):
        close(a, b, atol=1e-5)
