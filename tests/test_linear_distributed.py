"""Vocabulary-parallel linear_hrm_loss (process_group) on 2 and 4 gloo ranks against one process.

Rank r holds rows [r V_l, (r+1) V_l) of the output weight (Megatron's column-parallel lm_head), of the
bias and of the reference's weight (or those columns of ref_logits); hidden states and labels are the
same on every rank. Each rank must get the loss of the whole vocabulary, the gradient of its own weight
rows and the full gradient of hidden (summed over the group inside the loss). A sparse teacher's ids and
the token weights are the same on every rank too; with ref_vocab="truncate" and a smaller reference, rank r
holds the reference's rows (columns) of the ids of its shard that the reference has.
"""
import pytest
import torch

import hrmloss
from tests._spawn import run_group

N_ROWS, H, H_REF, V_LOCAL = 12, 8, 6, 5

# options for linear_hrm_loss; "ref": "logits", "hidden" or "topk" (K global ids, K may exceed V_l); "bias";
# "dtype"; "ref_cut": the reference has V - ref_cut classes; "weights": token weights
CASES = {
    "forward_mean_ref_logits": dict(opts=dict(kl="forward", hrm=0.7), ref="logits", bias=True),
    "jsd_sum_ref_hidden_T2": dict(opts=dict(kl="jsd", beta=0.3, reduction="sum", temperature=2.0,
                                            label_smoothing=0.1, z_loss=1e-2), ref="hidden", bias=True),
    "reverse_none_ref_hidden": dict(opts=dict(kl="reverse", reduction="none", temperature=0.5), ref="hidden"),
    "bf16_forward_mean_module": dict(opts=dict(kl="forward", hrm=0.5), ref="hidden", dtype=torch.bfloat16,
                                     module=True),
    "topk_renorm_weights_mean": dict(opts=dict(kl="forward", hrm=0.8, temperature=2.0), ref="topk", topk=4,
                                     weights=True, bias=True),
    "topk_tail_jsd_none": dict(opts=dict(kl="jsd", topk_mode="tail", reduction="none"), ref="topk", topk=7),
    "truncate_logits_weights_sum": dict(opts=dict(kl="jsd", reduction="sum", ref_vocab="truncate"), ref="logits",
                                        ref_cut=3, weights=True),
    "ce_weight_topk_renorm_both": dict(opts=dict(kl="jsd", topk_mode="renorm_both", ce_weight=0.3, hrm=0.6),
                                       ref="topk", topk=4),
    "no_ref_smoothing_zloss_sum": dict(opts=dict(label_smoothing=0.1, z_loss=1e-2, reduction="sum"), ref="none",
                                       bias=True, weights=True),
    "truncate_hidden_none": dict(opts=dict(kl="forward", reduction="none", ref_vocab="truncate"), ref="hidden",
                                 ref_cut=3, bias=True),
}


def _make_job(name, case, world):
    g = torch.Generator().manual_seed(len(name) * 1000 + world)
    dtype = case.get("dtype", torch.float32)
    V = world * V_LOCAL
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)  # noqa: E731
    y = torch.randint(0, V, (2, N_ROWS // 2), generator=g)
    y[0, 1] = y[1, 4] = -100
    job = dict(opts=case["opts"], ref=case["ref"], module=bool(case.get("module")), labels=y,
               hidden=rand(2, N_ROWS // 2, H), weight=rand(V, H, scale=H ** -0.5 * 2),
               bias=rand(V) if case.get("bias") else None, ref_logits=rand(2, N_ROWS // 2, V, scale=2.0),
               ref_hidden=rand(2, N_ROWS // 2, H_REF), ref_weight=rand(V, H_REF, scale=H_REF ** -0.5 * 2),
               gout=torch.rand(y.shape, generator=g) + 0.5 if case["opts"].get("reduction") == "none" else None,
               v_ref=V - case.get("ref_cut", 0), opts_tensors={})
    if case.get("topk"):  # a teacher's top-k of its log-softmax, global ids
        lps, ids = torch.log_softmax(job["ref_logits"].float() * 2, -1).topk(case["topk"], -1)
        job["opts_tensors"]["ref_topk"] = (ids, lps)
    if case.get("weights"):
        job["opts_tensors"]["token_weights"] = torch.rand(y.shape, generator=g) * 2
    return job


def _loss(job, group=None, rank=0, world=1):
    """(loss components, grad hidden, grad weight, grad bias) on this rank's vocabulary rows."""
    rows = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL) if group is not None else slice(None)
    hidden = job["hidden"].clone().requires_grad_()
    weight = job["weight"][rows].clone().requires_grad_()
    bias = None if job["bias"] is None else job["bias"][rows].clone().requires_grad_()
    v_ref = job["v_ref"]  # the reference's rows of this shard's ids: all, fewer on the last ranks when cut
    ref_rows = slice(rows.start, min(rows.stop, v_ref)) if group is not None else slice(0, v_ref)
    ref = {"logits": dict(ref_logits=job["ref_logits"][..., ref_rows]),
           "hidden": dict(ref_hidden=job["ref_hidden"], ref_weight=job["ref_weight"][ref_rows]),
           "topk": {}, "none": {}}[job["ref"]]
    if job["module"]:
        out = hrmloss.LinearHRMLoss(**job["opts"], chunk_size=5, return_components=True, process_group=group)(
            hidden, weight, job["labels"], bias=bias, **ref, **job["opts_tensors"])
    else:
        out = hrmloss.linear_hrm_loss(hidden, weight, job["labels"], bias=bias, **ref, chunk_size=5,
                                      return_components=True, process_group=group, **job["opts"],
                                      **job["opts_tensors"])
    out.loss.backward(job["gout"])
    return (tuple(x.detach() for x in out), hidden.grad, weight.grad, None if bias is None else bias.grad)


def _rank_main(rank, world, jobs):
    import torch.distributed as dist
    return {name: _loss(job, dist.group.WORLD, rank, world) for name, job in jobs.items()}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def group_run(request, tmp_path_factory):
    world = request.param
    jobs = {name: _make_job(name, case, world) for name, case in CASES.items()}
    return world, jobs, run_group(world, _rank_main, jobs, tmp_path_factory.mktemp(f"linear{world}"))


@pytest.mark.parametrize("name", CASES)
def test_vocab_parallel_linear_matches_one_process(group_run, name):
    world, jobs, results = group_run
    values, g_hidden, g_weight, g_bias = _loss(jobs[name])
    bf16 = CASES[name].get("dtype") == torch.bfloat16
    tol = dict(rtol=2e-2, atol=2e-3) if bf16 else dict(rtol=1e-5, atol=2e-5)  # sums in another order
    for r, res in enumerate(results):
        got_values, got_hidden, got_weight, got_bias = res[name]
        for what, a, b in zip(("loss", "ce", "kl", "z"), got_values, values):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"rank {r} {what}")
        torch.testing.assert_close(got_hidden, g_hidden, **tol, msg=f"rank {r} grad of hidden")
        rows = slice(r * V_LOCAL, (r + 1) * V_LOCAL)
        assert got_weight.dtype == g_weight.dtype
        torch.testing.assert_close(got_weight, g_weight[rows], **tol, msg=f"rank {r} grad of weight")
        if g_bias is not None:
            torch.testing.assert_close(got_bias, g_bias[rows], **tol, msg=f"rank {r} grad of bias")
