"""Vocabulary-parallel hrm_loss (process_group) against the single-process loss and the float64 oracle.

One spawned gloo group per world size (2 and 4) runs every case in turn, so process start-up is paid
once per world size; the tests then read each case's per-rank results. Every rank of a case computes
the loss of its vocabulary shard and the gradient of its shard, and records the collectives it called
(forward and backward separately). The single-process loss on the concatenated vocabulary and the
float64 reference run here, in the pytest process.
"""
import math
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.distributed as dist

from hrmloss import HRMLoss, hrm_loss
from hrmloss.engine.distributed import AGREED
from hrmloss.engine.layout import PARTIAL, PARTIAL_MERGE
from tests._spawn import run_group
from tests.reference import reference_loss

IGNORE = -100
N_ROWS = 12
V_LOCAL = 6

# name -> case; options go to hrm_loss, the rest shapes the data (see _make_job)
CASES = {
    "forward_mean": dict(opts=dict(kl="forward")),
    "reverse_mean": dict(opts=dict(kl="reverse")),
    "jsd_mean": dict(opts=dict(kl="jsd", beta=0.3)),
    "forward_sum_T2": dict(opts=dict(kl="forward", reduction="sum", temperature=2.0, hrm=0.7)),
    "reverse_none_T05": dict(opts=dict(kl="reverse", reduction="none", temperature=0.5)),
    "jsd_none_T2": dict(opts=dict(kl="jsd", reduction="none", temperature=2.0, hrm=2.0)),
    "labels_in_last_shard": dict(opts=dict(kl="forward", temperature=1.5), labels="last_shard"),
    "bf16_forward": dict(opts=dict(kl="forward", temperature=1.5), dtype=torch.bfloat16),
    "bf16_jsd_sum": dict(opts=dict(kl="jsd", reduction="sum"), dtype=torch.bfloat16),
    "err_v_local": dict(opts=dict(kl="forward"), error="v_local"),
    "hrm0_reverse": dict(opts=dict(kl="reverse", hrm=0.0)),
    "shifted_3d_module": dict(opts=dict(kl="reverse", reduction="sum", temperature=2.0), shift=True,
                              module=True),
    "err_label_high": dict(opts=dict(kl="forward"), error="label_high"),
    "padded_vocab": dict(opts=dict(kl="jsd", temperature=2.0), mask="pad"),
    "empty_shard_rows": dict(opts=dict(kl="reverse", reduction="none", temperature=2.0), mask="empty"),
    "err_label_negative": dict(opts=dict(kl="jsd"), error="label_negative"),
    "inf_forward_kl": dict(opts=dict(kl="forward", reduction="none"), mask="inf"),
    "inf_reverse_kl": dict(opts=dict(kl="reverse", reduction="none"), mask="inf"),
    "all_ignored": dict(opts=dict(kl="jsd"), labels="ignored"),
    "err_labels_differ": dict(opts=dict(kl="forward"), error="labels_differ"),
    "triton_forward_T2": dict(opts=dict(kl="forward", temperature=2.0, backend="triton")),
    "triton_jsd_bf16_padded": dict(opts=dict(kl="jsd", reduction="none", backend="triton"),
                                   dtype=torch.bfloat16, mask="pad"),
    "triton_inf_in_underflowed_shard": dict(opts=dict(kl="forward", reduction="none", backend="triton"),
                                            mask="underflow"),
    "torch_inf_in_underflowed_shard": dict(opts=dict(kl="forward", reduction="none", backend="torch"),
                                           mask="underflow"),
    "smoothing_zloss_softcap": dict(opts=dict(kl="forward", temperature=2.0, label_smoothing=0.1,
                                              z_loss=1e-2, softcap=3.0)),
    "ref_grad_jsd_num_items": dict(opts=dict(kl="jsd", label_smoothing=0.2, num_items=7), ref_grad=True),
    "triton_smoothing_softcap_ref_grad": dict(opts=dict(kl="reverse", label_smoothing=0.1, softcap=2.0,
                                                        z_loss=1e-2, backend="triton"), ref_grad=True),
    "tp_subgroups_of_2": dict(opts=dict(kl="reverse", temperature=1.5), tp=2, worlds=(4,)),
    # a sparse teacher: top-K global ids of softmax(t), each rank handling the ids of its shard
    "topk_renorm_T2": dict(opts=dict(kl="forward", temperature=2.0, topk_mode="renorm"), topk=5),
    "topk_tail_reverse_none": dict(opts=dict(kl="reverse", topk_mode="tail", reduction="none"), topk=7),
    "triton_topk_tail_jsd_softcap": dict(opts=dict(kl="jsd", topk_mode="tail", softcap=3.0, backend="triton"),
                                         topk=4),
    # a reference of V - 3 classes (its last shard narrower), and per-token weights
    "truncate_jsd_weights": dict(opts=dict(kl="jsd", temperature=2.0, ref_vocab="truncate"), ref_cut=3,
                                 weights=True),
    "triton_truncate_forward": dict(opts=dict(kl="forward", ref_vocab="truncate", backend="triton"), ref_cut=3),
    # a weighted cross-entropy (0: pure distillation), on the dense and the sparse teacher
    "ce_weight0_jsd_smoothing": dict(opts=dict(kl="jsd", ce_weight=0.0, label_smoothing=0.1, z_loss=1e-2)),
    "triton_ce_weight_topk_renorm_both": dict(opts=dict(kl="reverse", topk_mode="renorm_both", ce_weight=0.4,
                                                        temperature=2.0, backend="triton"), topk=4),
    # no reference: the fused cross-entropy family alone (hrm and temperature unused)
    "no_ref_smoothing_zloss_softcap": dict(opts=dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0, hrm=0.7,
                                                     temperature=2.0), no_ref=True),
    "triton_no_ref_weights_none": dict(opts=dict(reduction="none", label_smoothing=0.2, backend="triton"),
                                       no_ref=True, weights=True),
}
ERRORS = {  # what every rank must raise: ValueError whose message holds this text
    "v_local": "V_local",
    "label_high": "labels contains",
    "label_negative": "labels contains -5",
    "labels_differ": "the same on every rank",
}
PAD = 2  # masked columns at the end of the global vocabulary for mask="pad"


# ---------------------------------------------------------------- data (built here, sent to ranks)

def _labels(case, world, v_local, n, gen):
    """Global ids, row i owned by shard i % world (every shard owns labels, none owns all of a row)."""
    shards = torch.arange(n) % world
    if case.get("labels") == "last_shard":
        shards = torch.full((n,), world - 1)
    top = v_local - PAD if case.get("mask") == "pad" else v_local
    y = shards * v_local + torch.randint(0, top, (n,), generator=gen)
    if case.get("mask") == "empty":
        y[[0, 2]] = torch.randint(0, (world - 1) * v_local, (2,), generator=gen)  # not in the empty shard
    y[[3, 7]] = IGNORE
    if case.get("labels") == "ignored":
        y[:] = IGNORE
    return y


def _apply_mask(case, s, t, world, v_local):
    """-inf entries: a padded vocabulary tail, a shard empty for some rows, or infinite divergences."""
    ninf = float("-inf")
    V = world * v_local
    if case.get("mask") == "pad":
        s[..., V - PAD:] = ninf
        t[..., V - PAD:] = ninf
    elif case.get("mask") == "empty":                     # last shard all -inf in rows 0 and 2
        s[[0, 2], V - v_local:] = ninf
        t[[0, 2], V - v_local:] = ninf
    elif case.get("mask") == "inf":
        t[0, 1] = ninf                                    # p = 0 < q: KL(q||p) = inf in row 0
        s[1, V - 1] = ninf                                # q = 0 < p: KL(p||q) = inf in row 1
        s[2, 2], t[2, 2] = ninf, ninf                     # both 0: finite
        t[4] = ninf                                       # no reference at all: every shard empty in t
    elif case.get("mask") == "underflow":                 # row 0: the last shard's share of the
        s[0, V - v_local:] -= 300                         # normalisers underflows to 0 in fp32, yet
        t[0, V - v_local:] -= 300                         # p > 0 faces q = 0 there: KL(p||q) = inf
        s[0, V - 2] = ninf


def _make_job(name, case, world):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + world)
    dtype = case.get("dtype", torch.float32)
    n, v_local = N_ROWS, V_LOCAL
    lead = (2, n // 2 + 1) if case.get("shift") else (n,)
    V = world * v_local
    s = (2 * torch.randn(*lead, V, generator=gen)).to(dtype)
    t = (s.float() + torch.randn(*lead, V, generator=gen)).to(dtype)
    y = _labels(case, world, v_local, n, gen)
    if case.get("shift"):  # causal LM: logits[:, :-1] scored against the next tokens
        y = y.view(2, n // 2)
    _apply_mask(case, s, t, world, v_local)
    opts = dict(case["opts"])
    if case.get("topk"):
        lps, ids = torch.log_softmax(t.float(), -1).topk(case["topk"], -1)
        opts["ref_topk"] = (ids, lps)
    if case.get("ref_cut"):
        t = t[..., :V - case["ref_cut"]].contiguous()
    if case.get("weights"):
        opts["token_weights"] = torch.rand(y.shape, generator=gen) * 2
    tp = case.get("tp", world)
    bounds = [((r % tp) * v_local, (r % tp + 1) * v_local) for r in range(world)]
    labels = [y] * world
    error = case.get("error")
    if error == "v_local":                              # the last rank holds one column more
        s, t = torch.cat((s, s[..., :1]), -1), torch.cat((t, t[..., :1]), -1)
        bounds[-1] = (bounds[-1][0], bounds[-1][1] + 1)
    elif error == "label_high":
        y[5] = V
    elif error == "label_negative":
        y[5] = -5
    elif error == "labels_differ":                      # rank 0 saw the batch in another order
        labels[0] = y.roll(1)
    if tp != world:  # data of one TP group of tp ranks: a vocabulary of tp * v_local
        s, t = s[..., :tp * v_local].contiguous(), t[..., :tp * v_local].contiguous()
        labels = [torch.where(x == IGNORE, x, x % (tp * v_local)) for x in labels]
    gout = torch.rand(y.shape, generator=gen) + 0.5 if case["opts"].get("reduction") == "none" else None
    return dict(kind="loss", opts=opts, s=s, t=t, labels=labels, bounds=bounds,
                shift=bool(case.get("shift")), module=bool(case.get("module")), tp=tp, gout=gout,
                pad=PAD if case.get("mask") == "pad" else 0, ref_grad=bool(case.get("ref_grad")),
                no_ref=bool(case.get("no_ref")))


def _tiny_model(V, dim):
    return torch.nn.Sequential(torch.nn.Embedding(V, dim), torch.nn.Linear(dim, V))


def _make_ddp_job():
    """3 SGD steps of a tiny LM on global batches of 4 sequences; rank r trains on sequences 2r, 2r+1."""
    gen = torch.Generator().manual_seed(7)
    V, dim, T = 16, 8, 6
    model = _tiny_model(V, dim)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    batches = []
    for _ in range(3):
        x = torch.randint(0, V, (4, T), generator=gen)
        y = torch.randint(0, V, (4, T), generator=gen)
        y[2:, :2] = IGNORE                 # uneven counted tokens: rank 1 has 4 fewer than rank 0
        ref = torch.randn(4, T, V, generator=gen)
        batches.append((x, ref, y))
    opts = dict(kl="forward", hrm=0.5, temperature=2.0)
    return dict(kind="ddp", V=V, dim=dim, init=model.state_dict(), batches=batches, lr=0.5, opts=opts)


# ---------------------------------------------------------------- what each rank runs

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single",
                "broadcast", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
                "send", "recv", "isend", "irecv")


class _CollectiveLog:
    """Records (name, numel) of every torch.distributed collective called inside the `with` block."""

    def __enter__(self):
        self.calls, self._saved = [], {name: getattr(dist, name) for name in _COLLECTIVES}
        for name, fn in self._saved.items():
            def logged(tensor, *args, _name=name, _fn=fn, **kwargs):
                self.calls.append((_name, tensor.numel() if isinstance(tensor, torch.Tensor) else -1))
                return _fn(tensor, *args, **kwargs)
            setattr(dist, name, logged)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _loss_job(rank, world, job, group):
    lo, hi = job["bounds"][rank]
    local = job["s"][..., lo:hi].clone().requires_grad_()
    ref_local = job["t"][..., lo:hi].clone().requires_grad_(job["ref_grad"])
    x, ref = (local[:, :-1], ref_local[:, :-1]) if job["shift"] else (local, ref_local)
    if "ref_topk" in job["opts"] or job["no_ref"]:
        ref = None
    try:
        with _CollectiveLog() as fwd:
            if job["module"]:
                opts = {k: v for k, v in job["opts"].items() if k != "num_items"}
                out = HRMLoss(**opts, return_components=True, process_group=group)(
                    x, ref, job["labels"][rank], num_items=job["opts"].get("num_items"))
            else:
                out = hrm_loss(x, ref, job["labels"][rank], **job["opts"], return_components=True,
                               process_group=group)
        with _CollectiveLog() as bwd:
            out.loss.backward(job["gout"])
    except ValueError as e:
        return dict(error=str(e))
    return dict(out=tuple(v.detach() for v in out), grad=local.grad, ref_grad=ref_local.grad,
                fwd=fwd.calls, bwd=bwd.calls)


def _ddp_job(rank, world, job):
    from torch.nn.parallel import DistributedDataParallel
    model = _tiny_model(job["V"], job["dim"])
    model.load_state_dict(job["init"])
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=job["lr"])
    for x, ref, y in job["batches"]:
        half = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
        # sum over this rank's tokens / the global count; DDP averages gradients over ranks, so
        # multiply by world: the gradient is then that of the mean over the global batch
        n_global = (y != IGNORE).sum().clamp(min=1)
        loss = hrm_loss(ddp(x[half]), ref[half], y[half], reduction="sum", **job["opts"]) * world / n_global
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank_main(rank, world, jobs):
    groups = {}
    out = {}
    for name, job in jobs.items():
        if job["kind"] == "ddp":
            out[name] = _ddp_job(rank, world, job)
            continue
        if job["tp"] not in groups:  # every rank creates the same subgroups in the same order
            groups[job["tp"]] = dist.group.WORLD if job["tp"] == world else \
                dist.new_subgroups(group_size=job["tp"])[0]
        try:
            out[name] = _loss_job(rank, world, job, groups[job["tp"]])
        except Exception as e:
            raise RuntimeError(f"case {name!r} failed on rank {rank}") from e
    return out


# ---------------------------------------------------------------- fixtures and checks

@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def group_run(request, tmp_path_factory):
    """(world, jobs, per-rank results) of one spawned gloo group running every case."""
    world = request.param
    jobs = {name: _make_job(name, case, world) for name, case in CASES.items()
            if world in case.get("worlds", (2, 4))}
    if world == 2:
        jobs["ddp"] = _make_ddp_job()
    results = run_group(world, _rank_main, jobs, tmp_path_factory.mktemp(f"world{world}"))
    return world, jobs, results


def _single_process(job):
    """The loss, components and gradients of the same job on the whole vocabulary in one process."""
    s = job["s"].clone().requires_grad_()
    t = job["t"].clone().requires_grad_(job["ref_grad"])
    x, ref = (s[:, :-1], t[:, :-1]) if job["shift"] else (s, t)
    if "ref_topk" in job["opts"] or job["no_ref"]:
        ref = None
    out = hrm_loss(x, ref, job["labels"][0], **job["opts"], return_components=True)
    out.loss.backward(job["gout"])
    return out, s.grad, t.grad


def _reference(job):
    """float64 oracle (loss, ce, kl, z) and gradients; the padded tail is dropped (it adds nothing)."""
    keep = job["s"].shape[-1] - job["pad"]
    s = job["s"][..., :keep].double().requires_grad_()
    t = job["t"][..., :keep].double().requires_grad_(job["ref_grad"])
    x, ref = (s[:, :-1], t[:, :-1]) if job["shift"] else (s, t)
    if "ref_topk" in job["opts"] or job["no_ref"]:
        ref = None
    ref_opts = {k: v for k, v in job["opts"].items() if k != "backend"}
    out = reference_loss(x, ref, job["labels"][0], ignore_index=IGNORE, **ref_opts)
    out[0].backward(None if job["gout"] is None else job["gout"].double())
    pad = torch.zeros(*s.shape[:-1], job["pad"], dtype=s.dtype)
    return out, torch.cat((s.grad, pad), -1), None if t.grad is None else torch.cat((t.grad, pad), -1)


def _value_atol(job):
    """fp32 rounding of a per-token value built from terms as large as the scaled logits and lse:
    kl = E_q[u - w] - lse_u + lse_w cancels terms of size ~ max |x / T| + log V, in either process."""
    x = torch.cat((job["s"].float().flatten(), job["t"].float().flatten()))
    scale = x[x.isfinite()].abs().max() / min(job["opts"].get("temperature", 1.0), 1.0)
    return 8 * 2 ** -24 * float(scale + math.log(x.numel() / job["labels"][0].numel()))


def _grad_tol(dtype):
    return dict(rtol=2 ** -7, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)


def _case_names(kind):
    def wanted(case):
        return ("error" in case) == (kind == "error")
    return [name for name, case in CASES.items() if wanted(case)]


def _case(group_run, name):
    """(world, the case's job, every rank's results), skipping a case this world size does not run."""
    world, jobs, results = group_run
    if name not in jobs:
        pytest.skip(f"{name} runs only for world sizes {CASES[name]['worlds']}")
    return world, jobs[name], results


@pytest.mark.parametrize("name", _case_names("loss"))
def test_vocab_parallel_matches_single_process(group_run, name):
    world, job, results = _case(group_run, name)
    expected, grad, ref_grad = _single_process(job)
    tp = job["tp"]
    for r, res in enumerate(results):
        got = res[name]
        assert "error" not in got, f"rank {r}: {got.get('error')}"
        assert len(got["out"]) == len(expected)
        for what, a, b in zip(expected._fields, got["out"], expected):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=_value_atol(job), equal_nan=True,
                                       msg=f"rank {r} {what}")
    for g in range(world // tp):  # each tensor-parallel group's shards, concatenated over the vocabulary
        for key, want in (("grad", grad), ("ref_grad", ref_grad)):
            shards = [results[r][name][key] for r in range(g * tp, (g + 1) * tp)]
            if want is None:
                assert all(x is None for x in shards), key
                continue
            torch.testing.assert_close(torch.cat(shards, -1), want, equal_nan=True, **_grad_tol(want.dtype),
                                       msg=key)


# -inf layouts the oracle cannot express (its kl_div gives NaN for 0 * log 0): single-process check only
_REFERENCE_CASES = [n for n in _case_names("loss")
                    if CASES[n].get("mask") not in ("empty", "inf", "underflow")]


@pytest.mark.parametrize("name", _REFERENCE_CASES)
def test_vocab_parallel_matches_float64_reference(group_run, name):
    world, job, results = _case(group_run, name)
    values, grad, ref_grad = _reference(job)
    tp = job["tp"]
    for r, res in enumerate(results):
        assert len(res[name]["out"]) == len(values)
        for what, a, b in zip(("loss", "ce", "kl", "z"), res[name]["out"], values):
            torch.testing.assert_close(a.double(), b.detach(), rtol=1e-5, atol=_value_atol(job),
                                       msg=f"rank {r} {what}")
    for key, want in (("grad", grad), ("ref_grad", ref_grad)):
        if want is not None:
            got = torch.cat([results[r][name][key] for r in range(tp)], -1)
            torch.testing.assert_close(got.double(), want, **_grad_tol(got.dtype), msg=key)


def test_infinite_divergence_survives_an_underflowed_shard(group_run):
    # the shard's weight exp(lse_r - lse) is 0 in fp32 but its E_p[w - u] is +inf: the merge keeps inf
    world, jobs, results = group_run
    for r, res in enumerate(results):
        for backend in ("triton", "torch"):
            kl = res[f"{backend}_inf_in_underflowed_shard"]["out"][2]
            assert kl[0] == float("inf") and torch.isfinite(kl[1:]).all(), f"{backend}, rank {r}: {kl}"


@pytest.mark.parametrize("name", _case_names("loss"))
def test_collectives_are_few_small_all_reduces_and_none_in_backward(group_run, name):
    world, job, results = _case(group_run, name)
    n = job["labels"][0].numel()
    n_lse = sum(1 for rule in PARTIAL_MERGE.values() if rule == "lse")
    check = job["tp"] * (1 + len(AGREED))  # a row per rank of the group: its status word, what must agree
    expected = [("all_reduce", check), ("all_reduce", n_lse * n), ("all_reduce", len(PARTIAL) * n)]
    if "ref_topk" in job["opts"]:  # every id's student logit, from the shard that owns it
        expected.append(("all_reduce", job["opts"]["ref_topk"][0].shape[-1] * n))
    elif job["opts"].get("kl", "forward") == "jsd" and not job["no_ref"]:  # no reference: no JSD pass
        expected.append(("all_reduce", 2 * n))
    for r, res in enumerate(results):
        assert res[name]["fwd"] == expected, f"rank {r}"
        assert res[name]["bwd"] == [], f"rank {r}"


@pytest.mark.parametrize("name", _case_names("error"))
def test_disagreement_raises_on_every_rank(group_run, name):
    world, jobs, results = group_run
    text = ERRORS[CASES[name]["error"]]
    for r, res in enumerate(results):
        assert "error" in res[name], f"rank {r} did not raise"
        assert text in res[name]["error"], f"rank {r}: {res[name]['error']}"


def test_ddp_training_matches_single_process(group_run):
    world, jobs, results = group_run
    if world != 2:
        pytest.skip("the data-parallel run uses 2 ranks")
    job = jobs["ddp"]
    model = _tiny_model(job["V"], job["dim"])
    model.load_state_dict(job["init"])
    opt = torch.optim.SGD(model.parameters(), lr=job["lr"])
    for x, ref, y in job["batches"]:
        loss = hrm_loss(model(x), ref, y, reduction="mean", **job["opts"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = model.state_dict()
    moved = max(float((final[k] - job["init"][k]).abs().max()) for k in final)
    assert moved > 1e-2, "training did not change the parameters: the comparison would be empty"
    for r, res in enumerate(results):
        for k in final:
            torch.testing.assert_close(res["ddp"][k], final[k], rtol=1e-5, atol=1e-6, msg=f"rank {r} {k}")


def test_process_group_of_wrong_type_is_a_type_error():
    s, y = torch.randn(3, 8), torch.tensor([1, 2, 3])
    with pytest.raises(TypeError, match="process_group"):
        hrm_loss(s, s, y, process_group="tp")
    with pytest.raises(TypeError, match="process_group"):
        HRMLoss(process_group=0)


def test_example_script_runs():
    # docs/examples/vocab_parallel.py checks its own results against the unsharded model on every rank
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "docs", "examples", "vocab_parallel.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=150, cwd=root,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "both equal the unsharded loss and gradients" in done.stdout
