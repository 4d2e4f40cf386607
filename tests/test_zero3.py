"""linear_hrm_loss under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), where DeepSpeed is installed.

CI does not install DeepSpeed (its first `initialize` on a CPU JIT-compiles a C++ communication op, ~5 min
on 2 cores), so this test is skipped there; docs/distributed.md says what was run. Outside its module's
forward a ZeRO-3 weight is a 0-element placeholder: linear_hrm_loss refuses it by name, and
`hrmloss.inside_forward(lm_head, ...)` runs the loss as lm_head's forward, so that ZeRO-3 gathers the weight
for the forward and the backward and partitions its gradient. The loss and the parameters after two steps
must equal those of nn.Linear + hrm_loss under the same ZeRO-3.
"""
import os

import pytest
import torch

from tests._spawn import run_group

pytest.importorskip("deepspeed")

STEPS = 2
OPTS = dict(kl="forward", hrm=0.7)


def _train(fused, rank):
    import deepspeed

    import hrmloss
    from tests.test_fsdp import _data, _model
    model = _model(True, 0)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                      optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    head = engine.module.lm_head
    x, y, t, _ = _data(rank)
    losses, refused = [], None
    for _ in range(STEPS):
        h = engine(x)
        if fused:
            try:
                hrmloss.linear_hrm_loss(h, head.weight, y, bias=head.bias, ref_logits=t, **OPTS)
            except ValueError as e:
                refused = str(e)
            loss = hrmloss.inside_forward(head, lambda hh: hrmloss.linear_hrm_loss(
                hh, head.weight, y, bias=head.bias, ref_logits=t, chunk_size=4, **OPTS), h)
        else:
            loss = hrmloss.hrm_loss(head(h), t, y, **OPTS)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        params = [p.detach().clone() for p in engine.module.parameters()]
    return losses, params, refused


def _rank_main(rank, world, _):
    for key, value in dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(key, str(value))
    return {mode: _train(mode == "fused", rank) for mode in ("fused", "oracle")}


def test_fused_projection_under_zero3_equals_nn_linear(tmp_path):
    results = run_group(2, _rank_main, None, tmp_path, timeout=600)
    for rank, res in enumerate(results):
        (f_losses, f_params, refused), (o_losses, o_params, _) = res["fused"], res["oracle"]
        assert refused is not None and "ZeRO-3" in refused and refused.startswith("weight:")
        for a, b in zip(f_losses, o_losses):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for k, (a, b) in enumerate(zip(f_params, o_params)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"rank {rank} parameter {k}")
