"""linear_hrm_loss / LinearHRMLoss against a float64 oracle (matmul + tests/reference.py), and its memory."""
import pytest
import torch

import hrmloss
from hrmloss.engine.chunked import chunk_bounds, chunk_rows

from .memtrack import StorageTracker, peak_bytes
from .reference import reference_loss

BACKENDS = ["torch", "triton"]
KLS = ["forward", "reverse", "jsd"]
REDUCTIONS = ["mean", "sum", "none"]


def make_case(B=2, T=13, H=16, V=40, H_ref=12, dtype=torch.float32, bias=True, ignore_index=-100, seed=0):
    """Student (hidden, weight, bias), both reference forms and labels with a few ignored tokens."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)  # noqa: E731
    case = dict(
        hidden=rand(B, T, H).requires_grad_(),
        weight=rand(V, H, scale=H ** -0.5 * 3).requires_grad_(),
        bias=rand(V).requires_grad_() if bias else None,
        ref_hidden=rand(B, T, H_ref),
        ref_weight=rand(V, H_ref, scale=H_ref ** -0.5 * 3),
        ref_bias=rand(V),
        labels=torch.randint(0, V, (B, T), generator=g),
    )
    case["labels"].view(-1)[::5] = ignore_index
    case["ref_logits"] = rand(B, T, V, scale=2.0)
    for k in ("ref_hidden", "ref_weight", "ref_logits"):
        case[k].requires_grad_()  # the reference side must stay a constant even so
    return case


def ref_kwargs(case, form):
    if form == "logits":
        return dict(ref_logits=case["ref_logits"])
    return dict(ref_hidden=case["ref_hidden"], ref_weight=case["ref_weight"], ref_bias=case["ref_bias"])


def oracle(case, form, grad_out, **opts):
    """float64 (loss, ce, kl) and the gradients of (hidden, weight, bias) for sum(loss * grad_out)."""
    leaves = [case[k].detach().double().requires_grad_() if case[k] is not None else None
              for k in ("hidden", "weight", "bias")]
    h, w, b = leaves
    s = h @ w.T + (b if b is not None else 0)
    if form == "logits":
        t = case["ref_logits"].detach().double()
    else:
        t = (case["ref_hidden"].detach().double() @ case["ref_weight"].detach().double().T
             + case["ref_bias"].double())
    out = reference_loss(s, t, case["labels"], **opts)
    (out[0] * grad_out.double()).sum().backward()
    return out, [None if x is None else x.grad for x in leaves]


def run(case, form, grad_out, backend, **opts):
    """linear_hrm_loss components and the gradients it gives (hidden, weight, bias)."""
    for k in ("hidden", "weight", "bias"):
        if case[k] is not None:
            case[k].grad = None
    out = hrmloss.linear_hrm_loss(case["hidden"], case["weight"], case["labels"], bias=case["bias"],
                                  return_components=True, backend=backend, **ref_kwargs(case, form), **opts)
    (out.loss * grad_out).sum().backward()
    return out, [None if case[k] is None else case[k].grad for k in ("hidden", "weight", "bias")]


def grad_out_for(case, reduction, seed=1):
    """A scalar for mean/sum; per-token weights (some zero, some negative) for "none"."""
    if reduction != "none":
        return torch.tensor(1.7)
    g = torch.randn(case["labels"].shape, generator=torch.Generator().manual_seed(seed))
    g.view(-1)[1::7] = 0.0
    return g


def assert_close_all(got, want, atol=1e-5, rtol=1e-4):
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["logits", "hidden"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kl", KLS)
def test_matches_float64_oracle(backend, form, reduction, kl):
    # N = 26 rows in chunks of 8: a ragged last chunk of 2; temperature != 1 exercises the scaled path
    case = make_case(bias=form == "hidden")
    opts = dict(hrm=0.7, kl=kl, beta=0.3, temperature=1.5, reduction=reduction)
    go = grad_out_for(case, reduction)
    out, grads = run(case, form, go, backend, chunk_size=8, **opts)
    want, want_grads = oracle(case, form, go, **opts)
    assert out.loss.dtype == torch.float32 and out.loss.shape == want[0].shape
    assert_close_all(out, want)
    assert_close_all(grads, want_grads)
    assert case["ref_logits"].grad is None and case["ref_weight"].grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_options_match_oracle(backend, reduction):
    # label smoothing, z-loss and soft cap reach the core passes per chunk unchanged
    case = make_case(bias=True, seed=3)
    opts = dict(hrm=0.4, kl="reverse", reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=3.0)
    go = grad_out_for(case, reduction)
    out, grads = run(case, "hidden", go, backend, chunk_size=7, **opts)
    want, want_grads = oracle(case, "hidden", go, **opts)
    assert out.z > 0 if reduction == "mean" else (out.z > 0).any()
    assert_close_all(out, want)
    assert_close_all(grads, want_grads)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_two_micro_batches_equal_one_batch(as_tensor):
    case = make_case(seed=4)
    n = int((case["labels"] != -100).sum())
    go = torch.tensor(1.0)
    full, full_grads = run(case, "logits", go, "torch", hrm=0.5)
    grads = None
    parts = []
    for i in (0, 1):
        sub = dict(case, hidden=case["hidden"].detach()[i:i + 1].requires_grad_(), labels=case["labels"][i:i + 1],
                   ref_logits=case["ref_logits"][i:i + 1])
        out, g = run(sub, "logits", go, "torch", hrm=0.5, num_items=torch.tensor(n) if as_tensor else n)
        parts.append(out)
        grads = g[1:] if grads is None else [a + b for a, b in zip(grads, g[1:])]
    for k in range(4):
        torch.testing.assert_close(parts[0][k] + parts[1][k], full[k], atol=1e-6, rtol=1e-6)
    for a, b in zip(grads, full_grads[1:]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# N = 26: one row a chunk, ragged chunks of 5, exactly N, more than N, automatic. The interpreter is slow:
# chunk 1 and automatic cover the Triton launch shapes.
CHUNK_CASES = [("torch", c) for c in (1, 5, 26, 1000, None)] + [("triton", c) for c in (1, None)]


@pytest.mark.parametrize("backend,chunk_size", CHUNK_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_chunk_sizes_and_bias(backend, chunk_size, bias):
    case = make_case(bias=bias, seed=2)
    go = grad_out_for(case, "none")
    out, grads = run(case, "hidden", go, backend, hrm=0.5, reduction="none", chunk_size=chunk_size)
    want, want_grads = oracle(case, "hidden", go, hrm=0.5, reduction="none")
    assert_close_all(out, want)
    assert_close_all(grads, want_grads)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_shifted_views_straddling_chunks(reduction):
    # hidden[:, :-1] and ref_logits[:, :-1] are not flat: chunks of 5 straddle the batch boundary (T = 12)
    case = make_case(T=13, seed=3)
    shifted = dict(case, hidden=case["hidden"][:, :-1], labels=case["labels"][:, 1:],
                   ref_logits=case["ref_logits"][:, :-1])
    go = grad_out_for(shifted, reduction)
    case["hidden"].grad = case["weight"].grad = case["bias"].grad = None
    out = hrmloss.linear_hrm_loss(shifted["hidden"], case["weight"], shifted["labels"], 0.6, bias=case["bias"],
                                  ref_logits=shifted["ref_logits"], reduction=reduction, chunk_size=5,
                                  return_components=True)
    (out.loss * go).sum().backward()
    want, want_grads = oracle(dict(shifted, hidden=shifted["hidden"].detach()), "logits", go, hrm=0.6,
                              reduction=reduction)
    assert_close_all(out, want)
    torch.testing.assert_close(case["hidden"].grad[:, :-1].double(), want_grads[0], atol=1e-5, rtol=1e-4)
    assert case["hidden"].grad[:, -1].abs().max() == 0
    assert_close_all([case["weight"].grad, case["bias"].grad], want_grads[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index(backend):
    # a custom ignore_index inside [0, V): those tokens count nowhere; an all-ignored batch gives 0, no NaN
    case = make_case(ignore_index=3, seed=4)
    go = grad_out_for(case, "mean")
    out, grads = run(case, "logits", go, backend, ignore_index=3, chunk_size=7)
    want, want_grads = oracle(case, "logits", go, ignore_index=3)
    assert_close_all(out, want)
    assert_close_all(grads, want_grads)
    case["labels"].fill_(3)
    out, grads = run(case, "logits", go, backend, ignore_index=3, chunk_size=7)
    assert all(x.item() == 0 for x in out)
    assert all(g.abs().max() == 0 for g in grads)


def test_bf16_inputs_accumulate_grad_weight_in_fp32():
    # 256 tokens one per chunk: grad_weight is a sum of 256 rank-1 terms. Accumulated in bf16 it would
    # lose ~sqrt(256) roundings; in fp32 its error must be that of a single bf16 GEMM (the naive path).
    case = make_case(B=2, T=128, H=32, V=64, dtype=torch.bfloat16, seed=5)
    go = grad_out_for(case, "sum")
    out, grads = run(case, "hidden", go, "torch", hrm=0.5, reduction="sum", chunk_size=1)
    want, want_grads = oracle(case, "hidden", go, hrm=0.5, reduction="sum")
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3 and out.loss.dtype == torch.float32
    # the naive composition in bf16: logits by matmul, hrm_loss, autograd
    h, w, b = (case[k].detach().requires_grad_() for k in ("hidden", "weight", "bias"))
    t = case["ref_hidden"] @ case["ref_weight"].T + case["ref_bias"]
    naive = hrmloss.hrm_loss(torch.addmm(b, h.view(-1, 32), w.T).view(2, 128, 64), t, case["labels"], 0.5,
                             reduction="sum", backend="torch")
    (naive * go).backward()
    for got, bf16, exact in zip(grads, (h.grad, w.grad, b.grad), want_grads):
        err, naive_err = ((x.double() - exact).abs().max().item() for x in (got, bf16))
        assert err <= 1.5 * naive_err + 1e-3 * exact.abs().max().item(), (err, naive_err)
    torch.testing.assert_close(out.loss.double(), naive.double(), rtol=2e-3, atol=0)


def test_module_matches_function_and_validates_at_construction():
    case = make_case(seed=6)
    crit = hrmloss.LinearHRMLoss(hrm=0.5, kl="reverse", chunk_size=4)
    assert "kl='reverse'" in repr(crit)
    a = crit(case["hidden"], case["weight"], case["labels"], bias=case["bias"], ref_logits=case["ref_logits"])
    b = hrmloss.linear_hrm_loss(case["hidden"], case["weight"], case["labels"], 0.5, bias=case["bias"],
                                ref_logits=case["ref_logits"], kl="reverse")
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="kl="):
        hrmloss.LinearHRMLoss(kl="kld")
    with pytest.raises(TypeError, match="chunk"):
        hrmloss.LinearHRMLoss(chunk=4)
    with pytest.raises(ValueError, match="chunk_size"):
        hrmloss.LinearHRMLoss(chunk_size=0)


def test_frozen_weight_and_no_grad():
    case = make_case(seed=7)
    case["weight"].requires_grad_(False)
    case["bias"] = None
    go = grad_out_for(case, "mean")
    out, grads = run(case, "logits", go, "torch", chunk_size=6)
    want, want_grads = oracle(case, "logits", go)
    assert_close_all(out[:1], want[:1])
    torch.testing.assert_close(grads[0].double(), want_grads[0], atol=1e-5, rtol=1e-4)
    assert grads[1] is None
    with torch.no_grad():
        loss = hrmloss.linear_hrm_loss(case["hidden"], case["weight"], case["labels"],
                                       ref_logits=case["ref_logits"])
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), want[0], atol=1e-5, rtol=1e-4)


def test_second_backward():
    case = make_case(seed=8)
    args = (case["hidden"], case["weight"], case["labels"])
    loss = hrmloss.linear_hrm_loss(*args, ref_logits=case["ref_logits"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    # "none" recomputes in the backward, so a retained graph gives the same gradient twice
    case["hidden"].grad = None
    rows = hrmloss.linear_hrm_loss(*args, ref_logits=case["ref_logits"], reduction="none")
    first = torch.autograd.grad(rows.sum(), case["hidden"], retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(rows.sum(), case["hidden"])[0], first)


def test_bad_arguments_raise_before_compute():
    c = make_case(seed=9)
    h, w, y, t = c["hidden"], c["weight"], c["labels"], c["ref_logits"]
    call = hrmloss.linear_hrm_loss
    with pytest.raises(ValueError, match="weight.shape"):        # H mismatch
        call(h, torch.randn(40, 17), y, ref_logits=t)
    with pytest.raises(ValueError, match="ref_logits.shape"):    # V mismatch between weight and ref_logits
        call(h, w, y, ref_logits=t[..., :-1])
    with pytest.raises(ValueError, match="ref_weight.shape"):    # V mismatch between weight and ref_weight
        call(h, w, y, ref_hidden=c["ref_hidden"], ref_weight=c["ref_weight"][:-1])
    with pytest.raises(ValueError, match="ref_weight.shape"):    # H_ref mismatch
        call(h, w, y, ref_hidden=c["ref_hidden"], ref_weight=torch.randn(40, 5))
    with pytest.raises(ValueError, match="ref_hidden.shape"):
        call(h, w, y, ref_hidden=c["ref_hidden"][:, 1:], ref_weight=c["ref_weight"])
    with pytest.raises(ValueError, match="exactly one"):
        call(h, w, y, ref_logits=t, ref_hidden=c["ref_hidden"], ref_weight=c["ref_weight"])
    # no reference at all is the fused CE (issue 21); half of one is still an error
    with pytest.raises(ValueError, match="incomplete reference"):
        call(h, w, y, ref_hidden=c["ref_hidden"])
    with pytest.raises(ValueError, match="bias.shape"):
        call(h, w, y, bias=torch.zeros(39), ref_logits=t)
    with pytest.raises(ValueError, match="labels.shape"):
        call(h, w, y[:, 1:], ref_logits=t)
    with pytest.raises(ValueError, match="labels contains 40"):
        call(h, w, torch.full_like(y, 40), ref_logits=t)
    with pytest.raises(TypeError, match="weight.dtype"):
        call(h, w.double(), y, ref_logits=t)
    with pytest.raises(TypeError, match="weight.dtype"):
        call(h, w.detach().bfloat16(), y, ref_logits=t)
    with pytest.raises(TypeError, match="labels.dtype"):
        call(h, w, y.float(), ref_logits=t)
    with pytest.raises(TypeError, match="ref_logits"):
        call(h, w, y, ref_logits=t.detach().numpy())
    with pytest.raises(ValueError, match="chunk_size=0"):
        call(h, w, y, ref_logits=t, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size=True"):
        call(h, w, y, ref_logits=t, chunk_size=True)
    with pytest.raises(ValueError, match="reduction="):
        call(h, w, y, ref_logits=t, reduction="avg")
    with pytest.raises(ValueError, match="device"):
        call(h, w, y, ref_logits=t.to("meta"))


def test_chunk_rows_from_the_memory_budget():
    fp32_two = 2 * 4 * 32000                                       # s and ds in fp32 at V = 32000
    assert chunk_rows(10, 32000, fp32_two, "cpu", chunk_bytes=2**30) == 10  # at most N
    assert chunk_rows(10**6, 32000, fp32_two, "cpu", chunk_bytes=100 * fp32_two) == 100   # < 128 rows: as is
    assert chunk_rows(10**6, 32000, fp32_two, "cpu", chunk_bytes=300 * fp32_two) == 256   # a multiple of 64
    assert chunk_rows(10**6, 10**9, 2 * 4 * 10**9, "cpu", chunk_bytes=2**30) == 1          # at least one row
    assert chunk_rows(8192, 128256, 2 * 2 * 128256, "cuda") == 1024  # 512 MiB: s and t in bf16 at V = 128256
    # CPU default: N / 8 rows, at most 64 MiB, in whole compiled calls of 2^22 // 32000 = 131 rows (>= 1)
    assert chunk_rows(4096, 32000, fp32_two, "cpu") == 262         # 64 MiB: 262 rows = 2 calls
    assert chunk_rows(1024, 32000, fp32_two, "cpu") == 131         # N / 8 = 128 rows: one call
    assert chunk_rows(2048, 32000, fp32_two, "cpu") == 262         # N / 8 = 256 rows: nearer two calls
    assert chunk_rows(512, 32000, fp32_two, "cpu") == 131          # N / 8 = 64 rows: at least one call


def test_chunk_bounds_join_a_short_last_chunk():
    assert chunk_bounds(10, 4) == ((0, 4), (4, 8), (8, 10))
    assert chunk_bounds(10, 4, min_last=3) == ((0, 4), (4, 10))
    assert chunk_bounds(3, 4, min_last=5) == ((0, 3),)


def test_storage_tracker_counts_live_bytes():
    x = torch.ones(256, 1024)                # 1 MiB, created before: never counted

    def f():
        y = x * 2                            # +1 MiB
        z = y + 1                            # +1 MiB (peak 2)
        del y
        x.mul_(1.0)                          # in place on a pre-existing storage: +0
        w = z.view(-1)[: 1024].clone()       # +4 KiB
        return w.sum() + z.sum()
    assert peak_bytes(f) == 2 * 2**20
    with StorageTracker() as tracker:
        kept = f()
    assert tracker.current == kept.untyped_storage().nbytes()  # everything but the result was freed


@pytest.mark.parametrize("form,reduction", [("logits", "mean"), ("hidden", "none")])
def test_peak_memory_does_not_grow_as_tokens_x_vocab(form, reduction):
    # Doubling N adds the (N, H) gradient of hidden and O(N) vectors, never N x V (V = 2048 >> H = 16).
    def peak(n):
        case = make_case(B=1, T=n, H=16, V=2048, H_ref=16, seed=10)
        args = (case["hidden"], case["weight"], case["labels"])

        def step():
            loss = hrmloss.linear_hrm_loss(*args, bias=case["bias"], **ref_kwargs(case, form), reduction=reduction,
                                           chunk_size=32, backend="torch")
            (loss.sum() if reduction == "none" else loss).backward()
        return peak_bytes(step)
    growth = peak(512) - peak(256)
    assert growth <= 256 * (16 * 4 + 64)      # bytes per added token: its hidden gradient + a few fp32 scalars


def test_peak_memory_quarter_of_naive():
    # The setting: N = 4096, H = 1024, V = 32000, fp32, CPU, reference given as logits (an input).
    # Naive: logits = hidden @ weight.T (N x V) then hrm_loss; fused: chunks of 32 MiB of logits.
    N, H, V = 4096, 1024, 32000
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.03).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    ref_logits = torch.randn(N, V, generator=g)

    def naive():
        hrmloss.hrm_loss(hidden @ weight.T, ref_logits, labels, 0.5, backend="torch").backward()

    def fused():
        hrmloss.linear_hrm_loss(hidden, weight, labels, 0.5, ref_logits=ref_logits, backend="torch").backward()
    peaks = {}
    for name, fn in (("fused", fused), ("naive", naive)):
        hidden.grad = weight.grad = None
        peaks[name] = peak_bytes(fn)
        grads = (hidden.grad.clone(), weight.grad.clone())
        peaks.setdefault("grads", []).append(grads)
    (fh, fw), (nh, nw) = peaks.pop("grads")
    torch.testing.assert_close(fh, nh, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(fw, nw, atol=1e-6, rtol=1e-4)
    ratio = peaks["fused"] / peaks["naive"]
    print(f"peak above inputs: fused {peaks['fused'] / 2**20:.0f} MiB, naive {peaks['naive'] / 2**20:.0f} MiB, "
          f"ratio {ratio:.3f}")
    assert ratio <= 0.25
