"""Value options as runtime scalars: 0-dim tensors equal numbers, new values never recompile, checks
without a host sync, hrm = 0 as a tensor, check_finite, float64 results."""
import math

import pytest
import torch
from torch._dynamo.utils import counters

import hrmloss
from .harness import BACKENDS, make, run

VALUES = dict(hrm=0.7, temperature=1.7, beta=0.3, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, ce_weight=0.6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_tensor_values_equal_numbers(backend, kl, dtype):
    s, t, y = make((3, 5, 97), ignore=-100)
    as_tensors = {k: torch.tensor(v, dtype=dtype) for k, v in VALUES.items()}
    want = run(s, t, y, backend, kl=kl, **VALUES)
    got = run(s, t, y, backend, kl=kl, **as_tensors)
    # a bf16 tensor holds the value rounded to bf16: compare with numbers rounded the same way
    if dtype == torch.bfloat16:
        want = run(s, t, y, backend, kl=kl, **{k: float(v) for k, v in as_tensors.items()})
    for a, b in zip(got, want):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_one_as_a_tensor_takes_the_scaled_path_with_the_same_result(backend):
    s, t, y = make((4, 33))
    for a, b in zip(run(s, t, y, backend, hrm=0.5, temperature=torch.tensor(1.0)),
                    run(s, t, y, backend, hrm=0.5, temperature=1.0)):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_hrm_zero_tensor_ignores_an_infinite_divergence(backend, kl):
    # the reference is -inf where the student is finite (reverse KL = +inf), and the reverse (forward
    # KL = +inf): with hrm = 0, as a number or a tensor, loss and gradients stay finite
    s, t, y = make((4, 16))
    t[:, 3] = -math.inf
    s[:, 5] = -math.inf
    y[:] = 0
    for hrm in (0.0, torch.tensor(0.0)):
        loss, ce, kl_value, _, grad, ref_grad = run(s, t, y, backend, hrm=hrm, kl=kl, ref_grad=True)
        assert kl_value.isinf()
        assert torch.isfinite(loss) and torch.equal(loss, ce)
        assert torch.isfinite(grad).all() and torch.isfinite(ref_grad).all()
        assert not ref_grad.any()


BAD = [
    (dict(hrm=torch.tensor(-1.0)), ValueError, r"hrm=-1\.0 \(a tensor\)"),
    (dict(hrm=torch.tensor(math.nan)), ValueError, "hrm=nan"),
    (dict(temperature=torch.tensor(0.0)), ValueError, "temperature"),
    (dict(beta=torch.tensor(1.0)), ValueError, "beta"),
    (dict(label_smoothing=torch.tensor(1.0)), ValueError, "label_smoothing"),
    (dict(z_loss=torch.tensor(-0.5)), ValueError, "z_loss"),
    (dict(softcap=torch.tensor(0.0)), ValueError, "softcap"),
    (dict(ce_weight=torch.tensor(-0.5)), ValueError, "ce_weight"),
    (dict(hrm=torch.tensor([0.5, 0.5])), TypeError, "hrm: expected a number or a 0-dim float tensor"),
    (dict(hrm=torch.tensor(1)), TypeError, "hrm"),
    (dict(temperature=torch.tensor(2.0, device="meta")), ValueError, "temperature is a tensor on meta"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,exc,text", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_tensor_values_raise_before_any_pass(backend, kwargs, exc, text, no_launch):
    s, t, y = make((3, 7))
    with pytest.raises(exc, match=text):
        hrmloss.hrm_loss(s, t, y, backend=backend, **kwargs)


def test_a_tensor_value_scheduled_in_place_in_a_module():
    s, t, y = make((4, 20))
    hrm = torch.tensor(0.0)
    criterion = hrmloss.HRMLoss(hrm=hrm)
    for value in (0.0, 0.5, 2.0):
        hrm.fill_(value)
        torch.testing.assert_close(criterion(s, t, y), hrmloss.hrm_loss(s, t, y, value))


class _Model(torch.nn.Module):
    def __init__(self, V=40):
        super().__init__()
        self.proj = torch.nn.Linear(16, V)

    def forward(self, x, ref, y, hrm, temperature):
        return hrmloss.hrm_loss(self.proj(x), ref, y, hrm, temperature=temperature, kl="forward")


def _compiles(values, as_tensor):
    """(number of dynamo compilations, max |compiled - eager|) over calls with (hrm, temperature) pairs."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = _Model()
    x, ref, y = torch.randn(6, 16), torch.randn(6, 40), torch.randint(0, 40, (6,))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    worst = 0.0
    for hrm, temp in values:
        if as_tensor:
            hrm, temp = torch.tensor(hrm), torch.tensor(temp)
        got, want = compiled(x, ref, y, hrm, temp), model(x, ref, y, hrm, temp)
        worst = max(worst, (got - want).abs().item())
    return counters["stats"]["unique_graphs"], worst


PAIRS = [(0.1, 0.5), (0.5, 1.5), (1.0, 2.0), (2.0, 3.0), (10.0, 4.0)]


def test_new_values_never_recompile_a_compiled_model():
    # five hrm and five temperature values: one graph for 0-dim tensors; Python floats are specialised
    # by dynamo on the first value it sees, then made symbolic: at most two graphs
    n, err = _compiles(PAIRS, as_tensor=True)
    assert n == 1 and err < 1e-5
    n, err = _compiles(PAIRS, as_tensor=False)
    assert n <= 2 and err < 1e-5
    n, err = _compiles([(h, 1.5) for h, _ in PAIRS], as_tensor=False)  # an hrm schedule alone
    assert n <= 2 and err < 1e-5


def test_the_compiled_cpu_path_does_not_recompile_for_new_values(small_chunks):
    from hrmloss.engine import torch_compiled
    torch._dynamo.reset()
    counters.clear()
    s, t, y = make((8, 96))
    s.requires_grad_()
    graphs = []
    for hrm, temp, smoothing in ((0.3, 1.5, 0.0), (0.7, 2.5, 0.1), (4.0, 0.7, 0.2)):
        loss = hrmloss.hrm_loss(s, t, y, hrm, temperature=temp, label_smoothing=smoothing, backend="torch")
        loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert torch_compiled._state["fns"] and not torch_compiled._state["failed"]
    assert graphs[0] == 2 and graphs[-1] == graphs[0], graphs  # the stats and grad chunks, compiled once


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_names_the_row(backend):
    s, t, y = make((5, 12))
    s[3, 4] = math.nan
    assert hrmloss.hrm_loss(s, t, y, backend=backend, reduction="none")[3].isnan()  # default: NaN, no check
    with pytest.raises(ValueError, match="ce is NaN at row 3"):
        hrmloss.hrm_loss(s, t, y, backend=backend, check_finite=True)
    s[3, 4] = 0.0
    t[1, 2] = math.inf
    with pytest.raises(ValueError, match="kl is NaN at row 1"):
        hrmloss.hrm_loss(s, t, y, backend=backend, check_finite=True)
    y[1] = -100  # an ignored row is never read
    assert torch.isfinite(hrmloss.hrm_loss(s, t, y, backend=backend, check_finite=True))


def test_float64_logits_give_a_float64_loss():
    s, t, y = make((3, 9))
    out = hrmloss.hrm_loss(s.double(), t.double(), y, backend="torch", return_components=True)
    assert all(x.dtype == torch.float64 for x in out)
    out = hrmloss.hrm_loss(s, t, y, backend="torch", return_components=True)
    assert all(x.dtype == torch.float32 for x in out)


def test_params_layout_names_every_value_option():
    # the kernels read the values by their PARAMS index: the layout must list exactly the value options
    import dataclasses
    from hrmloss.engine.layout import PARAMS
    from hrmloss.engine.options import LossOptions
    values = [f.name for f in dataclasses.fields(LossOptions) if "range" in f.metadata]
    assert sorted(PARAMS) == sorted(values)
    opts = LossOptions(**VALUES)
    params = opts.params(torch.device("cpu"), torch.float32)
    assert [params[PARAMS.index(k)].item() for k in VALUES] == pytest.approx(list(VALUES.values()))
