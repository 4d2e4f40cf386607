"""The objectives without a reference and with a weighted cross-entropy, against the float64 oracle:

- no reference (`hrm_loss(logits, None, labels)`, `linear_hrm_loss(hidden, weight, labels)`): the fused
  cross-entropy family (label smoothing, z-loss, soft cap, token weights) with no reference pass;
- `ce_weight`: loss = ce_weight ce + hrm kl + z, components unweighted, 0 = pure distillation, on the
  dense, top-k and fused-projection paths, as a number and as a 0-dim tensor, compiled without recompiles;
- `linear_hrm_loss(ref_softcap=)`: a reference given as hidden states capped like a Gemma-2 teacher.
(The vocabulary-parallel forms are cases of tests/test_distributed.py and tests/test_linear_distributed.py.)
"""
import math

import pytest
import torch
from torch._dynamo.utils import counters

import hrmloss
from hrmloss.engine.frontend import make_call
from hrmloss.engine.layout import KINDS
from .harness import BACKENDS, check, make, run
from .test_linear_distill import compare, grad_out, oracle, run as run_linear
from .test_linear_distill import make as make_linear
from .test_topk import make_topk

CE_FAMILY = [dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0), dict(reduction="sum", softcap=2.0),
             dict(reduction="none", label_smoothing=0.2, z_loss=1e-3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", CE_FAMILY, ids=str)
def test_no_reference_is_the_fused_cross_entropy_family(backend, opts):
    s, _, y = make((3, 5, 37), ignore=-100)
    go = torch.rand(3, 5) if opts.get("reduction") == "none" else None
    got = check(s, None, y, backend, grad_out=go, **opts)
    assert not got[2].any()  # kl = 0
    if opts is not CE_FAMILY[0]:
        return
    # hrm, kl and temperature have no reference to act on: the same result whatever they are
    again = check(s, None, y, backend, grad_out=go, hrm=3.0, kl="jsd", temperature=0.5, **opts)
    for a, b in zip(got[:5], again[:5]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_reference_with_token_weights(backend):
    s, _, y = make((4, 6, 29), ignore=-100, seed=3)
    w = torch.rand(4, 6) * 2
    check(s, None, y, backend, token_weights=w, label_smoothing=0.1)
    check(s, None, y, backend, token_weights=w, reduction="none", grad_out=torch.rand(4, 6))


def test_no_reference_reads_no_reference():
    # structure: no reference loads (has_ref False), no divergence gradient (hrm the number 0), no T path,
    # no JSD pass, whatever hrm / kl / temperature were given
    call = make_call(dict(hrm=torch.tensor(2.0), kl="jsd", temperature=2.0), torch.device("cpu"),
                     (torch.float32,), ref=False)
    assert not call.st.has_ref and call.st.hrm_zero and not call.st.scaled and not call.st.rest
    assert call.st.kind == KINDS.forward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_without_a_reference(backend, reduction):
    c = make_linear()
    go = grad_out(c, reduction)
    opts = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=3.0, token_weights=c["weights"])
    compare(run_linear(c, go, backend, 4, **opts), oracle(c, go, None, **opts))
    with pytest.raises(ValueError, match="incomplete reference"):
        hrmloss.linear_hrm_loss(c["hidden"], c["weight"], c["labels"], ref_weight=c["ref_weight"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl,ce_weight", [("forward", 0.0), ("jsd", 0.3), ("reverse", 2.5)])
def test_ce_weight_dense(backend, kl, ce_weight):
    # the oracle's ce, kl, z are unweighted, its loss ce_weight ce + hrm kl + z
    s, t, y = make((2, 5, 41), ignore=-100)
    opts = dict(hrm=0.6, kl=kl, temperature=1.5, label_smoothing=0.1, z_loss=1e-2, softcap=5.0)
    got = check(s, t, y, backend, ref_grad=True, ce_weight=ce_weight, **opts)
    torch.testing.assert_close(got[0], ce_weight * got[1] + 0.6 * got[2] + got[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,kl", [("renorm", "forward"), ("tail", "reverse")])
def test_ce_weight_sparse_teacher(backend, mode, kl):
    s, _, y, ids, lps = make_topk((2, 6, 40), 5)
    for ce_weight in (0.0, torch.tensor(0.4)):
        check(s, None, y, backend, hrm=0.7, kl=kl, ref_topk=(ids, lps), topk_mode=mode, ce_weight=ce_weight,
              z_loss=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pure_distillation_ignores_an_infinite_cross_entropy(backend):
    s, t, y = make((4, 16))
    y[:] = 3
    s[1, 3] = -math.inf  # the label has probability 0: ce = inf in row 1 (reverse KL stays finite)
    for ce_weight in (0.0, torch.tensor(0.0)):
        loss, ce, kl, z, grad, _ = run(s, t, y, backend, ce_weight=ce_weight, hrm=0.5, kl="reverse",
                                       reduction="none")
        assert math.isinf(ce[1]) and torch.isfinite(loss).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, 0.5 * kl)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher", ["hidden", "topk"])
def test_ce_weight_fused_projection(backend, teacher):
    c = make_linear()
    go = grad_out(c, "mean")
    if teacher == "hidden":
        t = c["ref_hidden"] @ c["ref_weight"].T
        refs, want_refs = dict(ref_hidden=c["ref_hidden"], ref_weight=c["ref_weight"]), dict()
    else:
        ids, lps = make_topk((2, 7, 40), 5, seed=1)[3:]
        t, refs = None, dict(ref_topk=(ids, lps))
        want_refs = refs
    for ce_weight in (0.0, torch.tensor(2.0)):
        opts = dict(hrm=0.5, kl="jsd", ce_weight=ce_weight, z_loss=1e-2)
        want = oracle(c, go, t, **want_refs, **{**opts, "ce_weight": float(ce_weight)})
        compare(run_linear(c, go, backend, 3, **refs, **opts), want)


class _Model(torch.nn.Module):
    def __init__(self, V=40):
        super().__init__()
        self.emb = torch.nn.Embedding(V, 12)
        self.head = torch.nn.Linear(12, V)

    def forward(self, x, ref, y, ce_weight):
        h = self.emb(x)
        dense = hrmloss.hrm_loss(self.head(h), ref, y, 0.5, ce_weight=ce_weight)
        return dense + hrmloss.linear_hrm_loss(h, self.head.weight, y, 0.5, bias=self.head.bias, ref_logits=ref,
                                               ce_weight=ce_weight, chunk_size=5)


def test_ce_weight_compiles_once():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = _Model()
    x, ref, y = torch.randint(0, 40, (2, 7)), torch.randn(2, 7, 40), torch.randint(0, 40, (2, 7))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for ce_weight in (1.0, 0.0, 0.4):
        ce_weight = torch.tensor(ce_weight)
        results = []
        for fn in (compiled, model):
            model.zero_grad()
            loss = fn(x, ref, y, ce_weight)
            loss.backward()
            results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


def test_ce_weight_checks():
    s, t, y = make((3, 7))
    with pytest.raises(ValueError, match="ce_weight=-1.0: expected a finite ce_weight >= 0"):
        hrmloss.hrm_loss(s, t, y, ce_weight=-1.0)
    with pytest.raises(ValueError, match=r"ce_weight=nan \(a tensor\)"):
        hrmloss.hrm_loss(s, t, y, ce_weight=torch.tensor(math.nan))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ref_softcap_of_a_reference_from_hidden_states(backend, reduction):
    c = make_linear()
    cap = 1.5
    t = c["ref_hidden"] @ c["ref_weight"].T
    go = grad_out(c, reduction)
    opts = dict(hrm=0.7, kl="forward", temperature=2.0, reduction=reduction, softcap=3.0)
    want = oracle(c, go, cap * torch.tanh(t / cap), **opts)
    forms = (dict(ref_hidden=c["ref_hidden"], ref_weight=c["ref_weight"]), dict(ref_logits=t))
    for refs in forms[:2 if reduction == "mean" else 1]:
        compare(run_linear(c, go, backend, 4, ref_softcap=cap, **refs, **opts), want)
    ids, lps = make_topk((2, 7, 40), 5, seed=1)[3:]
    with pytest.raises(ValueError, match="ref_softcap=1.5 without ref_logits or ref_hidden"):
        hrmloss.linear_hrm_loss(c["hidden"], c["weight"], c["labels"], ref_topk=(ids, lps), ref_softcap=cap)
    with pytest.raises(ValueError, match="ref_softcap=-1.0"):
        hrmloss.linear_hrm_loss(c["hidden"], c["weight"], c["labels"], ref_logits=t, ref_softcap=-1.0)
    with pytest.raises(TypeError, match="ref_softcap: expected None or a number"):
        hrmloss.linear_hrm_loss(c["hidden"], c["weight"], c["labels"], ref_logits=t, ref_softcap=torch.tensor(1.0))


def axolotl_normalize_topk_kl(s, ids, lps, T):
    """Axolotl's top-k forward KL with normalize_topk=True, written out: the student's logits at the ids
    divided by T and log-softmaxed over the K ids, the teacher's stored log-probs (renormalised at T)."""
    lq = torch.log_softmax(s.double().gather(-1, ids) / T, -1)
    return (lps.double().exp() * (lps.double() - lq)).sum(-1)


@pytest.mark.parametrize("backend,kl", [("torch", "forward"), ("torch", "reverse"), ("torch", "jsd"),
                                        ("triton", "jsd")])
def test_renorm_both_matches_the_oracle(backend, kl):
    s, _, y, ids, lps = make_topk((2, 6, 40), 5)
    check(s, None, y, backend, hrm=0.7, kl=kl, temperature=1.5, ref_topk=(ids, lps), topk_mode="renorm_both",
          softcap=6.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_renorm_both_is_axolotls_normalize_topk(backend):
    s, t, y, ids, _ = make_topk((3, 4, 30), 6, ignore=False)
    T = 2.0
    stored = torch.log_softmax(t.gather(-1, ids) / T, -1)      # Axolotl stores log-probs renormalised at T
    got = hrmloss.hrm_loss(s, None, y, ref_topk=(ids, stored * T), topk_mode="renorm_both", temperature=T,
                           reduction="none", return_components=True, backend=backend)
    torch.testing.assert_close(got.kl.double(), axolotl_normalize_topk_kl(s, ids, stored, T), rtol=1e-5, atol=1e-6)
    # the gradient of the divergence reaches the K ids only
    s1 = s.clone().requires_grad_()
    hrmloss.hrm_loss(s1, None, y, ref_topk=(ids, stored * T), topk_mode="renorm_both", temperature=T,
                     ce_weight=0.0, backend=backend).backward()
    off = torch.ones_like(s, dtype=torch.bool).scatter(-1, ids, False)
    assert not s1.grad[off].any() and s1.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_renorm_both_fused_projection(backend):
    c = make_linear()
    ids, lps = make_topk((2, 7, 40), 5, seed=1)[3:]
    go = grad_out(c, "none")
    opts = dict(hrm=0.5, kl="reverse", topk_mode="renorm_both", reduction="none", temperature=2.0)
    want = oracle(c, go, None, ref_topk=(ids, lps), **opts)
    compare(run_linear(c, go, backend, 3, ref_topk=(ids, lps), **opts), want)
