"""No rank hangs, no rank silently disagrees (vocabulary-parallel and tensor-parallel calls, 2 gloo ranks).

Each case gives one rank an argument the other does not have (rejected on that rank only, or a value the
ranks must share); every rank must raise the same ValueError naming the argument and the rank, within the
group's hard timeout (a hang fails the test). After every fault the group still works: the next case's
call runs on the same group.
"""
import pytest
import torch

import hrmloss
from tests._spawn import run_group

N, V_LOCAL, H = 6, 5, 4


def _inputs(rank, world):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(N, V_LOCAL * world, generator=g)
    t = torch.randn(N, V_LOCAL * world, generator=g)
    y = torch.randint(0, V_LOCAL * world, (N,), generator=g)
    cols = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    lps, ids = torch.log_softmax(t, -1).topk(3, -1)
    return dict(s=s[:, cols].contiguous(), t=t[:, cols].contiguous(), y=y, ids=ids, lps=lps,
                h=torch.randn(N, H, generator=g), W=torch.randn(V_LOCAL * world, H, generator=g)[cols])


def _logits(d, **kw):
    import torch.distributed as dist
    return hrmloss.hrm_loss(d["s"], d["t"], d["y"], process_group=dist.group.WORLD, **kw)


def _linear(d, **kw):
    import torch.distributed as dist
    return hrmloss.linear_hrm_loss(d["h"], d["W"], d["y"], ref_logits=d["t"], process_group=dist.group.WORLD, **kw)


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
        d["s"], d["t"], d["y"].float() if r else d["y"], process_group=__import__("torch").distributed.group.WORLD),
        "rank 1 of 2 rejected labels"),
    "ref_topk_ids_differ": (lambda d, r: hrmloss.hrm_loss(
        d["s"], None, d["y"], ref_topk=(d["ids"].flip(-1) if r else d["ids"], d["lps"]),
        process_group=__import__("torch").distributed.group.WORLD), "ref_topk indices"),
    "token_weights_differ": (lambda d, r: _logits(d, token_weights=torch.ones(N) * (1 + r)), "token_weights"),
    "linear_hrm_negative_on_one_rank": (lambda d, r: _linear(d, hrm=-1.0 if r else 0.5), "rank 1 of 2 rejected hrm"),
    "linear_weight_dtype_on_one_rank": (lambda d, r: _linear(dict(d, W=d["W"].double() if r else d["W"])),
                                        "rank 1 of 2 rejected weight"),
    "linear_z_loss_differs": (lambda d, r: _linear(d, z_loss=1e-2 * r), "ranks disagree on z_loss"),
}


def _rank_main(rank, world, names):
    out = {}
    for name in names:
        d = _inputs(rank, world)
        try:
            FAULTS[name][0](d, rank)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
        out[name + "/after"] = float(_logits(d, hrm=0.5))  # the group still works
    return out


@pytest.fixture(scope="module")
def faults_run(tmp_path_factory):
    return run_group(2, _rank_main, list(FAULTS), tmp_path_factory.mktemp("faults"), timeout=120)


@pytest.mark.parametrize("name", FAULTS)
def test_every_rank_raises_the_same_named_error(faults_run, name):
    text = FAULTS[name][1]
    messages = [res[name] for res in faults_run]
    assert all(m is not None for m in messages), f"a rank did not raise: {messages}"
    assert messages[0] == messages[1], messages
    assert text in messages[0], messages[0]
    assert faults_run[0][name + "/after"] == faults_run[1][name + "/after"]
