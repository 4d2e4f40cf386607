"""DTensor inputs on a 1-D tensor-parallel mesh (2 gloo ranks) against the single-process loss, and rank faults.

hrm_loss takes logits that are DTensors Shard(-1) (ColwiseParallel's output), the reference sharded the
same way, replicated, or a plain tensor, labels plain or Replicate; linear_hrm_loss takes a weight Shard(0)
over the mesh (a ColwiseParallel lm_head's) as a vocabulary shard. Every case runs on V even and uneven
over the ranks; each rank must get the single-process loss, and gradients that are DTensors of the
inputs' placements whose full tensors are the single-process gradients. The same group then runs the rank
faults of the vocabulary-parallel path (one spawn for both).
"""
import pytest
import torch

import hrmloss
from tests._spawn import run_group

ROWS, H = 6, 8

# logits cases: ref "shard" (Shard(-1) DTensor), "replicate" (Replicate DTensor), "plain" (whole tensor),
# "topk" (a sparse teacher); labels_dt: labels as a Replicate DTensor; ref_cut: a reference of V - ref_cut
CASES = {
    "even_forward_ref_shard": dict(V=12, ref="shard", opts=dict(kl="forward", hrm=0.7)),
    "uneven_jsd_none_ref_replicate": dict(V=13, ref="replicate", labels_dt=True, weights=True,
                                          opts=dict(kl="jsd", reduction="none", temperature=2.0)),
    "uneven_reverse_sum_plain_ref": dict(V=11, ref="plain", opts=dict(kl="reverse", reduction="sum",
                                                                      label_smoothing=0.1, z_loss=1e-2)),
    "uneven_topk_renorm": dict(V=13, ref="topk", topk=4, opts=dict(kl="forward", temperature=2.0)),
    "uneven_truncate_plain_ref": dict(V=13, ref="plain", ref_cut=3, opts=dict(kl="forward",
                                                                               ref_vocab="truncate")),
    # V_ref = 6: rank 1's shard (ids 7..12) has no reference column, and adds nothing to the divergence
    "truncate_rank_without_reference": dict(V=13, ref="replicate", ref_cut=7, opts=dict(
        kl="reverse", ref_vocab="truncate", backend="torch")),
    "triton_truncate_rank_without_reference": dict(V=13, ref="plain", ref_cut=7, opts=dict(
        kl="jsd", ref_vocab="truncate", backend="triton")),
}
# linear_hrm_loss cases: weight distributed Shard(0), or a ColwiseParallel nn.Linear's parameters
LINEAR_CASES = {
    "linear_even_ref_logits": dict(V=12, opts=dict(kl="forward", hrm=0.5), ref="logits"),
    "linear_uneven_bias_ref_weight": dict(V=13, bias=True, opts=dict(kl="jsd", reduction="sum"), ref="weight"),
    "colwise_lm_head_uneven": dict(V=11, bias=True, colwise=True, opts=dict(kl="reverse", hrm=0.3), ref="logits"),
    "linear_truncate_rank_without_reference": dict(V=13, ref="weight", ref_cut=7, opts=dict(
        kl="forward", ref_vocab="truncate", reduction="none")),
}


def _data(name, V):
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    s = torch.randn(2, ROWS // 2, V, generator=g) * 2
    t = torch.randn(2, ROWS // 2, V, generator=g) * 2
    y = torch.randint(0, V, (2, ROWS // 2), generator=g)
    y[1, 0] = -100
    return dict(s=s, t=t, y=y, w=torch.rand(y.shape, generator=g) * 2, gout=torch.rand(y.shape, generator=g) + .5,
                h=torch.randn(2, ROWS // 2, H, generator=g), W=torch.randn(V, H, generator=g) * H ** -0.5 * 2,
                b=torch.randn(V, generator=g), W_ref=torch.randn(V, H, generator=g) * H ** -0.5 * 2)


def _extras(case, d):
    ex = {}
    if case.get("weights"):
        ex["token_weights"] = d["w"]
    if case.get("ref") == "topk":
        lps, ids = torch.log_softmax(d["t"], -1).topk(case["topk"], -1)
        ex["ref_topk"] = (ids, lps)
    return ex


def _logits_case(case, d, mesh):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    s = distribute_tensor(d["s"].clone(), mesh, [Shard(-1)]).requires_grad_()
    t = d["t"][..., :case["V"] - case.get("ref_cut", 0)]
    ref = {"shard": lambda: distribute_tensor(t, mesh, [Shard(-1)]),
           "replicate": lambda: distribute_tensor(t, mesh, [Replicate()]),
           "plain": lambda: t, "topk": lambda: None}[case["ref"]]()
    y = distribute_tensor(d["y"], mesh, [Replicate()]) if case.get("labels_dt") else d["y"]
    out = hrmloss.hrm_loss(s, ref, y, return_components=True, **case["opts"], **_extras(case, d))
    assert not isinstance(out.loss, DTensor)
    out.loss.backward(d["gout"] if out.loss.dim() else None)
    assert isinstance(s.grad, DTensor) and tuple(s.grad.placements) == (Shard(2),)
    return tuple(x.detach() for x in out), (s.grad.full_tensor(),)


def _linear_ref(case, d):
    v_ref = case["V"] - case.get("ref_cut", 0)
    if case["ref"] == "logits":
        return dict(ref_logits=d["t"][..., :v_ref])
    return dict(ref_hidden=d["h"] * 0.5, ref_weight=d["W_ref"][:v_ref])


def _linear_case(case, d, mesh):
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    h = d["h"].clone().requires_grad_()
    if case.get("colwise"):
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
        head = torch.nn.Linear(H, case["V"], bias=True)
        with torch.no_grad():
            head.weight.copy_(d["W"])
            head.bias.copy_(d["b"])
        head = parallelize_module(head, mesh, ColwiseParallel())
        W, b = head.weight, head.bias
    else:
        W = torch.nn.Parameter(distribute_tensor(d["W"], mesh, [Shard(0)]))
        b = torch.nn.Parameter(distribute_tensor(d["b"], mesh, [Shard(0)])) if case.get("bias") else None
    out = hrmloss.linear_hrm_loss(h, W, d["y"], bias=b, chunk_size=4, return_components=True,
                                  **_linear_ref(case, d), **case["opts"])
    out.loss.backward(d["gout"] if out.loss.dim() else None)
    assert isinstance(W.grad, DTensor) and tuple(W.grad.placements) == (Shard(0),)
    grads = (h.grad, W.grad.full_tensor()) + (() if b is None else (b.grad.full_tensor(),))
    return tuple(x.detach() for x in out), grads


# ---------------------------------------------------------------- rank faults (the same 2-rank group)
# Each case gives one rank an argument the other does not have (rejected on that rank only, or a value the
# ranks must share); every rank must raise the same ValueError naming the argument and the rank, within the
# group's hard timeout (a hang fails the test). After every fault the group still works.

F_ROWS, F_V_LOCAL, F_H = 6, 5, 4


def _fault_inputs(rank, world):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(F_ROWS, F_V_LOCAL * world, generator=g)
    t = torch.randn(F_ROWS, F_V_LOCAL * world, generator=g)
    y = torch.randint(0, F_V_LOCAL * world, (F_ROWS,), generator=g)
    cols = slice(rank * F_V_LOCAL, (rank + 1) * F_V_LOCAL)
    lps, ids = torch.log_softmax(t, -1).topk(3, -1)
    return dict(s=s[:, cols].contiguous(), t=t[:, cols].contiguous(), y=y, ids=ids, lps=lps,
                h=torch.randn(F_ROWS, F_H, generator=g), W=torch.randn(F_V_LOCAL * world, F_H, generator=g)[cols])


def _world():
    import torch.distributed as dist
    return dist.group.WORLD


def _logits(d, **kw):
    return hrmloss.hrm_loss(d["s"], d["t"], d["y"], process_group=_world(), **kw)


def _linear(d, **kw):
    return hrmloss.linear_hrm_loss(d["h"], d["W"], d["y"], ref_logits=d["t"], process_group=_world(), **kw)


# name -> (what rank 1 does differently, the text every rank's error holds)
FAULTS = {
    "hrm_negative_on_one_rank": (lambda d, r: _logits(d, hrm=-1.0 if r else 0.5), "rank 1 of 2 rejected hrm"),
    "hrm_differs": (lambda d, r: _logits(d, hrm=1.0 if r else 0.5), "ranks disagree on hrm"),
    "tensor_hrm_out_of_range_on_one_rank": (
        lambda d, r: _logits(d, hrm=torch.tensor(-1.0 if r else 0.5)), "ranks disagree on hrm"),
    "temperature_differs": (lambda d, r: _logits(d, temperature=2.0 if r else 1.5), "ranks disagree on temperature"),
    "softcap_on_one_rank": (lambda d, r: _logits(d, softcap=3.0 if r else None), "ranks disagree on the options"),
    "num_items_differs": (lambda d, r: _logits(d, num_items=5 + r), "ranks disagree on num_items"),
    "labels_dtype_on_one_rank": (lambda d, r: hrmloss.hrm_loss(
        d["s"], d["t"], d["y"].float() if r else d["y"], process_group=_world()),
        "rank 1 of 2 rejected labels"),
    "ref_topk_ids_differ": (lambda d, r: hrmloss.hrm_loss(
        d["s"], None, d["y"], ref_topk=(d["ids"].flip(-1) if r else d["ids"], d["lps"]),
        process_group=_world()), "ref_topk indices"),
    "token_weights_differ": (lambda d, r: _logits(d, token_weights=torch.ones(F_ROWS) * (1 + r)), "token_weights"),
    "linear_hrm_negative_on_one_rank": (lambda d, r: _linear(d, hrm=-1.0 if r else 0.5), "rank 1 of 2 rejected hrm"),
    "linear_weight_dtype_on_one_rank": (lambda d, r: _linear(dict(d, W=d["W"].double() if r else d["W"])),
                                        "rank 1 of 2 rejected weight"),
    "linear_z_loss_differs": (lambda d, r: _linear(d, z_loss=1e-2 * r), "ranks disagree on z_loss"),
}


def _faults(rank, world):
    out = {}
    for name in FAULTS:
        d = _fault_inputs(rank, world)
        try:
            FAULTS[name][0](d, rank)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
        out[name + "/after"] = float(_logits(d, hrm=0.5))  # the group still works
    return out


def _rank_main(rank, world, payload):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    out = {}
    for name, case in CASES.items():
        out[name] = _logits_case(case, _data(name, case["V"]), mesh)
    for name, case in LINEAR_CASES.items():
        out[name] = _linear_case(case, _data(name, case["V"]), mesh)
    try:  # the group is the mesh's: a second one is an error, on every rank before any collective
        from torch.distributed.tensor import Shard, distribute_tensor
        import torch.distributed as dist
        d = _data("err", 12)
        hrmloss.hrm_loss(distribute_tensor(d["s"], mesh, [Shard(-1)]), d["t"], d["y"], process_group=dist.group.WORLD)
        out["err_group"] = None
    except ValueError as e:
        out["err_group"] = str(e)
    out["faults"] = _faults(rank, world)
    return out


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    return run_group(2, _rank_main, None, tmp_path_factory.mktemp("tp"), timeout=200)


def _single(case, d):
    s = d["s"].clone().requires_grad_()
    ref = None if case["ref"] == "topk" else d["t"][..., :case["V"] - case.get("ref_cut", 0)]
    out = hrmloss.hrm_loss(s, ref, d["y"], return_components=True, **case["opts"], **_extras(case, d))
    out.loss.backward(d["gout"] if out.loss.dim() else None)
    return tuple(x.detach() for x in out), (s.grad,)


def _single_linear(case, d):
    h, W = d["h"].clone().requires_grad_(), d["W"].clone().requires_grad_()
    b = d["b"].clone().requires_grad_() if case.get("bias") else None
    out = hrmloss.linear_hrm_loss(h, W, d["y"], bias=b, chunk_size=4, return_components=True,
                                  **_linear_ref(case, d), **case["opts"])
    out.loss.backward(d["gout"] if out.loss.dim() else None)
    return tuple(x.detach() for x in out), (h.grad, W.grad) + (() if b is None else (b.grad,))


@pytest.mark.parametrize("name", list(CASES) + list(LINEAR_CASES))
def test_dtensor_vocabulary_shards_match_one_process(tp_run, name):
    case = CASES.get(name) or LINEAR_CASES[name]
    want = (_single if name in CASES else _single_linear)(case, _data(name, case["V"]))
    for rank, res in enumerate(tp_run):
        values, grads = res[name]
        for what, a, b in zip(("loss", "ce", "kl", "z"), values, want[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"rank {rank} {what}")
        for k, (a, b) in enumerate(zip(grads, want[1])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=f"rank {rank} gradient {k}")


def test_process_group_with_dtensor_logits_is_an_error(tp_run):
    for res in tp_run:
        assert res["err_group"] is not None and "the mesh gives the group" in res["err_group"]


@pytest.mark.parametrize("name", FAULTS)
def test_every_rank_raises_the_same_named_error(tp_run, name):
    text = FAULTS[name][1]
    faults = [res["faults"] for res in tp_run]
    messages = [res[name] for res in faults]
    assert all(m is not None for m in messages), f"a rank did not raise: {messages}"
    assert messages[0] == messages[1], messages
    assert text in messages[0], messages[0]
    assert faults[0][name + "/after"] == faults[1][name + "/after"]
