"""linear_hrm_loss with an FSDP2-sharded lm_head (fully_shard, 2 gloo ranks) against the oracle.

The oracle is the same model under the same FSDP2 with nn.Linear + hrm_loss on its logits: the loss,
every gradient (as FSDP2 reduce-scatters and averages them) and the parameters after two optimizer steps
must be equal. A second, independent check runs the unsharded model in this process, one rank's batch
at a time, and averages the gradients (what data parallelism means) in float64.
"""
import pytest
import torch

from tests._spawn import run_group

H_IN, H, V, ROWS = 5, 8, 11, 6  # V odd: FSDP2 pads the last rank's rows
STEPS, LR = 2, 0.5

# opts go to both losses; mp: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); bias: lm_head bias;
# teacher: the reference's lm_head is a second FSDP2-sharded model (ref_hidden, ref_weight)
CASES = {
    "forward_mean_bias": dict(opts=dict(kl="forward", hrm=0.7), bias=True),
    "jsd_sum_T2": dict(opts=dict(kl="jsd", reduction="sum", temperature=2.0, label_smoothing=0.1)),
    "reverse_none": dict(opts=dict(kl="reverse", reduction="none")),
    "teacher_sharded": dict(opts=dict(kl="forward", hrm=0.5), teacher=True, bias=True),
    "bf16_mixed_precision": dict(opts=dict(kl="forward", hrm=0.5), mp=True, bias=True),
}


class _Net(torch.nn.Module):
    """A causal LM's shape: forward gives the last hidden states, the lm_head is applied by the loss."""

    def __init__(self, bias):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(H_IN, H), torch.nn.Tanh())
        self.lm_head = torch.nn.Linear(H, V, bias=bias)

    def forward(self, x):
        return self.body(x)


def _model(bias, seed):
    torch.manual_seed(seed)
    return _Net(bias)


def _data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, ROWS // 2, H_IN, generator=g)
    y = torch.randint(0, V, (2, ROWS // 2), generator=g)
    y[0, 1] = -100
    t = torch.randn(2, ROWS // 2, V, generator=g) * 2
    gout = torch.rand(2, ROWS // 2, generator=g) + 0.5
    return x, y, t, gout


def _step_loss(fused, model, teacher, x, y, t, case):
    import hrmloss
    opts = case["opts"]
    h = model(x)
    if teacher is not None:
        with torch.no_grad():
            th = teacher(x)
        if fused:
            return hrmloss.linear_hrm_loss(h, model.lm_head.weight, y, bias=model.lm_head.bias, ref_hidden=th,
                                           ref_weight=teacher.lm_head.weight, ref_bias=teacher.lm_head.bias,
                                           chunk_size=4, **opts)
        with torch.no_grad():
            t = teacher.lm_head(th)
    if fused:
        return hrmloss.linear_hrm_loss(h, model.lm_head.weight, y, bias=model.lm_head.bias, ref_logits=t, chunk_size=4,
                                       **opts)
    return hrmloss.hrm_loss(model.lm_head(h), t, y, **opts)


def _train(fused, case, rank):
    """(losses, per-step gradients, final parameters), full tensors, of one rank."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    from hrmloss.engine import chunked
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if case.get("mp") \
        else MixedPrecisionPolicy()
    model = _model(case.get("bias", False), 0)
    teacher = _model(True, 1) if case.get("teacher") else None
    for m in (model, teacher):
        if m is not None:
            fully_shard(m.body, mp_policy=mp)
            fully_shard(m.lm_head, mp_policy=mp)
            fully_shard(m, mp_policy=mp)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y, t, gout = _data(rank)
    seen = []  # the weights the fused loss multiplied: dtype, shape, and whether FSDP2 had unsharded them
    original = chunked.forward

    def spy(plan, tensors, *a, **k):
        seen.append((tensors[1].dtype, tuple(tensors[1].shape), isinstance(tensors[1], DTensor)))
        return original(plan, tensors, *a, **k)
    chunked.forward = spy
    losses, grads = [], []
    try:
        for _ in range(STEPS):
            loss = _step_loss(fused, model, teacher, x, y, t, case)
            assert isinstance(model.lm_head.weight, DTensor)  # resharded after the forward: no copy kept
            loss.backward(gout.to(loss.dtype) if loss.dim() else None)
            grads.append([p.grad.full_tensor() for p in model.parameters()])
            assert all(isinstance(p, DTensor) for p in model.parameters())
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
    finally:
        chunked.forward = original
    return losses, grads, [p.detach().full_tensor() for p in model.parameters()], seen


def _rank_main(rank, world, cases):
    return {name: {mode: _train(mode == "fused", case, rank) for mode in ("fused", "oracle")}
            for name, case in cases.items()}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return run_group(2, _rank_main, CASES, tmp_path_factory.mktemp("fsdp"), timeout=240)


def _tol(case):
    return dict(rtol=2e-2, atol=2e-3) if case.get("mp") else dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_fused_projection_under_fsdp2_equals_nn_linear(fsdp_run, name):
    case = CASES[name]
    for rank, res in enumerate(fsdp_run):
        fused, oracle = res[name]["fused"], res[name]["oracle"]
        for step, (a, b) in enumerate(zip(fused[0], oracle[0])):
            torch.testing.assert_close(a, b, **_tol(case), msg=f"rank {rank} step {step} loss")
        for step, (ga, gb) in enumerate(zip(fused[1], oracle[1])):
            for k, (a, b) in enumerate(zip(ga, gb)):
                torch.testing.assert_close(a, b, **_tol(case), msg=f"rank {rank} step {step} grad {k}")
        for k, (a, b) in enumerate(zip(fused[2], oracle[2])):
            torch.testing.assert_close(a, b, **_tol(case), msg=f"rank {rank} parameter {k} after the steps")
        # one unsharded weight per call, in param_dtype, a plain tensor (FSDP2's all-gather output)
        dtype = torch.bfloat16 if case.get("mp") else torch.float32
        assert fused[3] == [(dtype, (V, H), False)] * STEPS
    for k, (a, b) in enumerate(zip(fsdp_run[0][name]["fused"][2], fsdp_run[1][name]["fused"][2])):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"parameter {k} differs across ranks")


def _data_parallel_reference(case):
    """The first step's loss per rank and the rank-averaged gradients, unsharded, in float64."""
    import hrmloss
    model = _model(case.get("bias", False), 0).double()
    teacher = _model(True, 1).double() if case.get("teacher") else None
    losses, grads = [], None
    for rank in range(2):
        x, y, t, gout = _data(rank)
        x, t = x.double(), t.double()
        if teacher is not None:
            with torch.no_grad():
                t = teacher.lm_head(teacher(x))
        opts = dict(case["opts"], backend="torch")
        loss = hrmloss.hrm_loss(model.lm_head(model(x)), t, y, **opts)
        model.zero_grad()
        loss.backward(gout.double() if loss.dim() else None)
        g = [p.grad.clone() / 2 for p in model.parameters()]
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        losses.append(loss.detach())
    return losses, grads


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.get("mp")])
def test_fsdp2_gradients_are_the_data_parallel_average(fsdp_run, name):
    losses, grads = _data_parallel_reference(CASES[name])
    for rank, res in enumerate(fsdp_run):
        fused = res[name]["fused"]
        torch.testing.assert_close(fused[0][0].double(), losses[rank], rtol=1e-5, atol=1e-6)
        for k, (a, b) in enumerate(zip(fused[1][0], grads)):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=f"rank {rank} grad {k}")


# ---------------------------------------------------------------- 2-D mesh: FSDP over "dp" x TP over "tp"

OPTS_2D = dict(kl="jsd", hrm=0.6, temperature=2.0)


def _train_2d(fused, rank):
    """4 ranks, mesh (dp=2, tp=2): the lm_head ColwiseParallel over tp (V = 11: uneven shards), every module
    fully_shard over dp; the fused loss against nn.Linear + hrm_loss on the Shard(-1) DTensor logits."""
    import hrmloss
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = _model(True, 0)
    parallelize_module(model.lm_head, mesh["tp"], ColwiseParallel(use_local_output=False))
    for m in (model.body, model.lm_head, model):
        fully_shard(m, mesh=mesh["dp"])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y, t, _ = _data(mesh["dp"].get_local_rank())  # the tp ranks of one dp rank share its batch
    losses, grads = [], []
    for _ in range(STEPS):
        h = model(x)
        if fused:
            loss = hrmloss.linear_hrm_loss(h, model.lm_head.weight, y, bias=model.lm_head.bias, ref_logits=t,
                                           chunk_size=4, **OPTS_2D)
        else:
            logits = model.lm_head(h)
            assert isinstance(logits, DTensor)
            loss = hrmloss.hrm_loss(logits, t, y, **OPTS_2D)
        loss.backward()
        assert all(isinstance(p, DTensor) and p.device_mesh.ndim == 2  # FSDP over TP: (dp, tp) DTensors
                   for p in model.lm_head.parameters())
        grads.append([p.grad.full_tensor() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses, grads, [p.detach().full_tensor() for p in model.parameters()]


def _rank_main_2d(rank, world, _):
    return {mode: _train_2d(mode == "fused", rank) for mode in ("fused", "oracle")}


def test_fsdp_x_tp_2d_mesh_equals_nn_linear_and_data_parallel(tmp_path):
    results = run_group(4, _rank_main_2d, None, tmp_path, timeout=240)
    losses, grads = _data_parallel_reference(dict(opts=OPTS_2D, bias=True))
    for rank, res in enumerate(results):
        dp = rank // 2
        for mode in ("fused", "oracle"):
            got_losses, got_grads, _ = res[mode]
            torch.testing.assert_close(got_losses[0].double(), losses[dp], rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank} {mode} loss")
            for k, (a, b) in enumerate(zip(got_grads[0], grads)):
                torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {mode} grad {k}")
        for k, (a, b) in enumerate(zip(res["fused"][2], res["oracle"][2])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"rank {rank} parameter {k} after the steps")
