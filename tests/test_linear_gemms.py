"""linear_hrm_loss's GEMMs: their dtypes and FLOPs (a dispatch mode records every matmul-family op), the
weight gradient's accuracy over many chunks, autocast's mixed dtypes, torch.compile, and memory."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hrmloss

from .memtrack import peak_bytes
from .reference import reference_loss

_ATEN = torch.ops.aten
# the matmul family as the dispatcher sees it (matmul, linear, einsum decompose into these)
GEMM_OPS = {_ATEN.mm, _ATEN.addmm, _ATEN.addmm_, _ATEN.bmm, _ATEN.baddbmm, _ATEN.baddbmm_, _ATEN.addbmm,
            _ATEN.addbmm_, _ATEN.mv, _ATEN.addmv, _ATEN.addmv_, _ATEN.dot, _ATEN._addmm_activation, _ATEN.matmul,
            _ATEN.linear}


class GemmLog(TorchDispatchMode):
    """Records (op name, operand dtypes, FLOPs = 2 M N K) of every matmul-family op run under it, and every
    copy that turns a low-precision tensor of more than `big` elements into fp32."""

    def __init__(self, big):
        super().__init__()
        self.gemms, self.upcasts, self.big = [], [], big

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in GEMM_OPS:
            mats = [x for x in args if isinstance(x, torch.Tensor) and x.dim() >= 2][-2:]
            (m, k), n = mats[0].shape[-2:], mats[1].shape[-1]
            self.gemms.append((str(func), tuple(x.dtype for x in mats), 2 * m * n * k))
        ins = [x for x in tree_leaves(args) if isinstance(x, torch.Tensor)]
        outs = [x for x in tree_leaves(out) if isinstance(x, torch.Tensor)]
        if (func.overloadpacket in (_ATEN._to_copy, _ATEN.copy_, _ATEN.to) and ins and outs
                and ins[-1].dtype in (torch.bfloat16, torch.float16) and outs[0].dtype == torch.float32
                and ins[-1].numel() > self.big):
            self.upcasts.append((str(func), tuple(ins[-1].shape)))
        return out


def _case(N=96, H=32, V=160, H_ref=24, dtype=torch.bfloat16, seed=0, bias=False, logit_std=3.0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)  # noqa: E731
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = -100
    return dict(hidden=rand(N, H).requires_grad_(),
                weight=rand(V, H, scale=H ** -0.5 * logit_std).requires_grad_(),
                bias=rand(V).requires_grad_() if bias else None, labels=labels,
                ref_hidden=rand(N, H_ref), ref_weight=rand(V, H_ref, scale=H_ref ** -0.5 * logit_std))


def _topk(case, K=4, seed=1):
    """A sparse teacher for the case's labels: the top-K ids and log-probs of random teacher logits."""
    N, V = case["labels"].shape[0], case["weight"].shape[0]
    g = torch.Generator().manual_seed(seed)
    lps, ids = torch.log_softmax(torch.randn(N, V, generator=g) * 2, -1).topk(K, -1)
    return ids, lps


def _run(case, backward=True, **opts):
    """The loss of the case (reference from hidden states, unless opts hold a sparse teacher, ref_topk)."""
    refs = {} if "ref_topk" in opts else dict(ref_hidden=case["ref_hidden"], ref_weight=case["ref_weight"])
    out = hrmloss.linear_hrm_loss(case["hidden"], case["weight"], case["labels"], 0.5, bias=case["bias"],
                                  backend="torch", **refs, **opts)
    if backward:
        out.sum().backward()
    return out


@pytest.mark.parametrize("reduction,student,reference", [("mean", 3, 1), ("sum", 3, 1), ("none", 4, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemms_run_in_bf16_with_the_expected_flops(reduction, student, reference, bias):
    # "mean" / "sum": logits, grad of hidden, grad of weight + the reference's logits; "none" recomputes
    # both logits in the backward (documented). Chunks of 40 rows: 3 chunks, the last one ragged.
    case = _case(bias=bias)
    N, H, V, H_ref = 96, 32, 160, 24
    with GemmLog(big=N) as log:
        _run(case, reduction=reduction, chunk_size=40)
    assert log.gemms, "no GEMM recorded"
    assert {dtypes for _, dtypes, _ in log.gemms} == {(torch.bfloat16, torch.bfloat16)}, log.gemms
    assert sum(f for _, _, f in log.gemms) == student * 2 * N * H * V + reference * 2 * N * H_ref * V
    assert log.upcasts == [], log.upcasts  # no fp32 copy of hidden, weight, ds or the logits outside the passes
    assert case["weight"].grad.dtype == torch.bfloat16 and case["hidden"].grad.dtype == torch.bfloat16


@pytest.mark.parametrize("reduction,student", [("mean", 3), ("none", 4)])
def test_sparse_teacher_runs_the_student_gemms_only(reduction, student):
    # no reference GEMM; the teacher's (N, K) values and the student's logits at its ids are the only extra
    # work (the (c, K) gathers are upcast, nothing of the size of a chunk of logits, hidden or weight)
    case = _case(bias=True)
    N, H, V, K = 96, 32, 160, 4
    weights = torch.rand(N, generator=torch.Generator().manual_seed(2))
    with GemmLog(big=N * K) as log:
        _run(case, reduction=reduction, chunk_size=40, ref_topk=_topk(case, K), topk_mode="tail", kl="jsd",
             token_weights=weights)
    assert {dtypes for _, dtypes, _ in log.gemms} == {(torch.bfloat16, torch.bfloat16)}, log.gemms
    assert sum(f for _, _, f in log.gemms) == student * 2 * N * H * V
    assert log.upcasts == [], log.upcasts


def test_truncated_reference_multiplies_only_the_students_vocabulary():
    # ref_vocab="truncate" with a reference of V + 17 classes: its GEMM uses its first V rows only
    case = _case()
    N, H, V, H_ref = 96, 32, 160, 24
    case["ref_weight"] = torch.cat((case["ref_weight"], torch.randn(17, H_ref).bfloat16()))
    with GemmLog(big=N) as log:
        _run(case, chunk_size=40, ref_vocab="truncate")
    assert {dtypes for _, dtypes, _ in log.gemms} == {(torch.bfloat16, torch.bfloat16)}, log.gemms
    assert sum(f for _, _, f in log.gemms) == 3 * 2 * N * H * V + 2 * N * H_ref * V
    assert log.upcasts == [], log.upcasts


def test_fp32_inputs_accumulate_with_in_place_gemms():
    case = _case(dtype=torch.float32)
    N, H, V, H_ref = 96, 32, 160, 24
    with GemmLog(big=N) as log:
        _run(case, chunk_size=40)
    assert sum(f for _, _, f in log.gemms) == 3 * 2 * N * H * V + 2 * N * H_ref * V
    assert any("addmm_" in name for name, _, _ in log.gemms)


def test_frozen_weight_or_no_grad_skip_the_gradient_gemms():
    case = _case()
    N, H, V, H_ref = 96, 32, 160, 24
    case["weight"].requires_grad_(False)
    with GemmLog(big=N) as log:
        _run(case, chunk_size=40)
    assert sum(f for _, _, f in log.gemms) == 2 * 2 * N * H * V + 2 * N * H_ref * V
    with GemmLog(big=N) as log, torch.no_grad():
        _run(case, backward=False, chunk_size=40)
    assert sum(f for _, _, f in log.gemms) == 2 * N * H * V + 2 * N * H_ref * V


def _weight_grad_error(chunks, naive=False, **opts):
    """Relative Frobenius error of the bf16 weight gradient against float64 on the same bf16 inputs:
    N = 16 * chunks tokens in chunks of 16, logits ~ N(0, 1); naive: bf16 logits, hrm_loss, autograd."""
    case = _case(N=16 * chunks, H=64, V=256, H_ref=64, seed=3, logit_std=1.0)
    if naive:
        t = case["ref_hidden"] @ case["ref_weight"].T
        hrmloss.hrm_loss(case["hidden"] @ case["weight"].T, t, case["labels"], 0.5, backend="torch").backward()
    else:
        _run(case, chunk_size=16, **opts)
    w64 = case["weight"].detach().double().requires_grad_()
    s = case["hidden"].detach().double() @ w64.T
    t = case["ref_hidden"].double() @ case["ref_weight"].double().T
    reference_loss(s, t, case["labels"], hrm=0.5)[0].backward()
    got = case["weight"].grad.double()
    return float((got - w64.grad).norm() / w64.grad.norm())


def test_weight_gradient_accuracy_over_64_chunks():
    # docs/linear.md quotes these numbers. Most of the error is bf16's: the logits GEMM's bf16 output and
    # ds and the result rounded to bf16, as in the naive bf16 composition (one GEMM, no chunks). The fp32
    # accumulator adds little to it (on a CPU, each chunk's bf16 GEMM output is rounded once); a bf16
    # accumulator rounds the running sum at every chunk, so its error grows with the chunk count.
    naive = _weight_grad_error(64, naive=True)
    fp32_acc = _weight_grad_error(64)
    bf16_acc = _weight_grad_error(64, grad_acc_dtype=torch.bfloat16)
    print(f"weight-gradient error, 64 chunks: fp32 accumulator {fp32_acc:.2e}, bf16 accumulator {bf16_acc:.2e}, "
          f"naive bf16 (one GEMM) {naive:.2e}")
    assert fp32_acc <= 5e-3 and fp32_acc <= naive + 1e-3
    assert fp32_acc < bf16_acc <= 2e-2


def test_grad_acc_dtype_is_checked():
    case = _case(dtype=torch.float32)
    with pytest.raises(ValueError, match="grad_acc_dtype=torch.bfloat16"):
        _run(case, grad_acc_dtype=torch.bfloat16)  # fp32 GEMMs: only an fp32 accumulator
    with pytest.raises(TypeError, match="chunk_bytes"):
        _run(case, chunk_bytes=1.5)
    with pytest.raises(ValueError, match="chunk_bytes=0"):
        _run(case, chunk_bytes=0)


def test_chunk_bytes_sets_the_chunk_and_chunk_size_wins():
    # 2 buffers (s, then ds in place, and t) of V = 160 bf16 = 640 bytes a row: 40 rows fit in 25600 bytes
    # -> 3 chunks of the logits GEMM (+ 3 of the reference's) in the forward
    case = _case()
    with GemmLog(big=96) as log, torch.no_grad():
        _run(case, backward=False, chunk_bytes=40 * 640)
    assert len(log.gemms) == 6
    with GemmLog(big=96) as log, torch.no_grad():
        _run(case, backward=False, chunk_bytes=40 * 640, chunk_size=96)
    assert len(log.gemms) == 2


@pytest.mark.parametrize("hidden_dtype,weight_dtype,teacher", [(torch.bfloat16, torch.float32, "hidden"),
                                                               (torch.float32, torch.bfloat16, "hidden"),
                                                               (torch.float32, torch.bfloat16, "topk")])
def test_autocast_mixed_dtypes_compute_in_autocast_dtype(hidden_dtype, weight_dtype, teacher):
    base = _case(dtype=torch.float32, seed=5, bias=True)
    case = dict(base, hidden=base["hidden"].detach().to(hidden_dtype).requires_grad_(),
                weight=base["weight"].detach().to(weight_dtype).requires_grad_(),
                bias=base["bias"].detach().to(weight_dtype).requires_grad_())
    sparse = dict(ref_topk=_topk(base), token_weights=torch.rand(96)) if teacher == "topk" else {}
    with pytest.raises(TypeError, match="autocast"):
        _run(case, **sparse)
    with torch.autocast("cpu", dtype=torch.bfloat16), GemmLog(big=96 * 4) as log:
        loss = _run(case, chunk_size=40, **sparse)
    assert {dtypes for _, dtypes, _ in log.gemms} == {(torch.bfloat16, torch.bfloat16)}
    assert (case["hidden"].grad.dtype, case["weight"].grad.dtype, case["bias"].grad.dtype) == \
        (hidden_dtype, weight_dtype, weight_dtype)
    # the same GEMMs on tensors cast to bf16 by hand give the same loss and gradients
    cast = dict(base, **{k: base[k].detach().bfloat16().requires_grad_() for k in ("hidden", "weight", "bias")},
                ref_hidden=base["ref_hidden"].bfloat16(), ref_weight=base["ref_weight"].bfloat16())
    want = _run(cast, chunk_size=40, **sparse)
    torch.testing.assert_close(loss, want)
    for k in ("hidden", "weight", "bias"):
        torch.testing.assert_close(case[k].grad.float(), cast[k].grad.float(), rtol=1e-2, atol=1e-4)


class _Model(torch.nn.Module):
    def __init__(self, V=40, H=16):
        super().__init__()
        self.embed = torch.nn.Embedding(V, H)
        self.head = torch.nn.Linear(H, V)

    def forward(self, x, ref, y, hrm, temperature, reduction, weights=None):
        h = torch.tanh(self.embed(x))
        teacher = dict(ref_topk=ref) if isinstance(ref, tuple) else dict(ref_logits=ref)
        loss = hrmloss.linear_hrm_loss(h, self.head.weight, y, hrm, bias=self.head.bias, **teacher,
                                       token_weights=weights, temperature=temperature, reduction=reduction,
                                       chunk_size=5)
        return loss.sum()


@pytest.mark.parametrize("reduction,as_tensor,teacher", [("mean", True, "logits"), ("none", True, "logits"),
                                                         ("mean", False, "logits"), ("mean", True, "topk"),
                                                         ("none", True, "topk")])
def test_compiled_model_ending_in_the_loss_matches_eager_without_recompiles(reduction, as_tensor, teacher):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = _Model()
    x, ref, y = torch.randint(0, 40, (2, 7)), torch.randn(2, 7, 40), torch.randint(0, 40, (2, 7))
    y[0, :2] = -100
    weights = None
    if teacher == "topk":  # a sparse teacher (renorm, forward KL) and token weights
        lps, ids = torch.log_softmax(ref * 2, -1).topk(4, -1)
        ref, weights = (ids, lps), torch.rand(2, 7)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for hrm, temperature in ((0.5, 1.5), (0.7, 2.0), (2.0, 0.7)):
        if as_tensor:
            hrm, temperature = torch.tensor(hrm), torch.tensor(temperature)
        results = []
        for fn in (compiled, model):
            model.zero_grad()
            loss = fn(x, ref, y, hrm, temperature, reduction, weights)
            loss.backward()
            results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # new values of hrm and temperature never recompile: one graph for 0-dim tensors; Python floats are
    # specialised by dynamo on the first value it sees, then made symbolic (as for hrm_loss)
    assert counters["stats"]["unique_graphs"] == (1 if as_tensor else 2)


@pytest.mark.parametrize("acc", [None, torch.bfloat16])
def test_peak_memory_quarter_of_naive_bf16_with_a_reference_from_hidden_states(acc):
    # bf16, reference given as hidden + weight; tests/test_linear.py checks fp32 with reference logits.
    # The fused peak is the chunk buffers + the accumulator (4 V H bytes, + 2 V H for the bf16 result;
    # 2 V H with a bf16 accumulator) + the (N, H) gradient of hidden; the naive one ~3 N V x 2 bytes +
    # 2 V H: a quarter of it as long as N is several times H (here N = 32 H).
    N, H, V = 4096, 128, 16000
    case = _case(N=N, H=H, V=V, H_ref=H, seed=7)
    h, w, y = case["hidden"], case["weight"], case["labels"]

    def naive():
        t = case["ref_hidden"] @ case["ref_weight"].T
        hrmloss.hrm_loss(h @ w.T, t, y, 0.5, backend="torch").backward()

    def fused():
        _run(case, grad_acc_dtype=acc)
    peaks = {}
    for name, fn in (("fused", fused), ("naive", naive)):
        h.grad = w.grad = None
        peaks[name] = peak_bytes(fn)
    ratio = peaks["fused"] / peaks["naive"]
    print(f"bf16 peak above inputs: fused {peaks['fused'] / 2**20:.1f} MiB, naive {peaks['naive'] / 2**20:.1f} MiB,"
          f" ratio {ratio:.3f}")
    assert ratio <= 0.25


# ---------------------------------------------------------------------------------------------------------
# CUDA only (skipped without a GPU): the fp32-output GEMM and the peak at the issue's shape

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_weight_gradient_uses_the_fp32_output_gemm_and_stays_accurate():
    case = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _case(N=1024, H=64, V=256, H_ref=64,
                                                                                  seed=3).items()}
    case["hidden"] = case["hidden"].detach().requires_grad_()
    case["weight"] = case["weight"].detach().requires_grad_()
    with GemmLog(big=1024) as log:
        hrmloss.linear_hrm_loss(case["hidden"], case["weight"], case["labels"], 0.5, ref_hidden=case["ref_hidden"],
                                ref_weight=case["ref_weight"], chunk_size=16).backward()
    names = {name for name, _, _ in log.gemms}
    assert any("addmm.dtype" in n for n in names), names
    assert log.upcasts == []


@cuda
@pytest.mark.parametrize("acc,limit_gib", [(None, 3.0), (torch.bfloat16, 2.5)])
def test_cuda_peak_at_the_issue_shape(acc, limit_gib):
    # N = 8192, H = 4096, V = 128256, bf16, reference as hidden + weight: the fp32 accumulator (1.96 GiB) and
    # the bf16 gradient (0.98 GiB) dominate; a bf16 accumulator is scaled in place.
    N, H, V = 8192, 4096, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).bfloat16()  # noqa: E731
    h, w = make(N, H).requires_grad_(), make(V, H, scale=H ** -0.5).requires_grad_()
    ht, wt, y = make(N, H), make(V, H, scale=H ** -0.5), torch.randint(0, V, (N,), device="cuda", generator=g)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    hrmloss.linear_hrm_loss(h, w, y, 0.5, ref_hidden=ht, ref_weight=wt, grad_acc_dtype=acc).backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    print(f"peak above inputs {peak:.2f} GiB (accumulator {acc or torch.float32})")
    assert peak <= limit_gib
