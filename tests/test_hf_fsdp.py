"""HRMDistillTrainer and compute_loss_func with the model sharded by FSDP2 (fully_shard) on 2 gloo ranks.

Accelerate does not shard on CPU ranks: with `fsdp="full_shard"` and `fsdp_version=2` it runs DDP
(distributed_type MULTI_CPU, a DistributedDataParallel model, plain parameters; docs/distributed.md). So each
rank shards the tiny Llama itself (fully_shard per decoder layer, then the root) and hands it to a Trainer
that does not wrap it (no launcher environment: distributed_type NO; FSDP2 reduces the gradients). A
callback asserts that the parameters are DTensors at every step. Each rank trains on its own batch; the
parameters after the steps must equal those of the oracle under the same FSDP2 (the model's forward + hrm_loss
on its logits: fused=False; for compute_loss_func, the model's own cross-entropy), and `ce` and `kl` are logged.
"""
import pytest
import torch

from tests._spawn import run_group

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

STEPS = 2
# name -> (trainer kind, the run under test, the oracle run)
CASES = {
    "teacher_model": ("distill", dict(fused=True, source="teacher"), dict(fused=False, source="teacher")),
    "stored_topk": ("distill", dict(fused=True, source="topk"), dict(fused=False, source="topk")),
    "compute_loss_func": ("plain", dict(loss_func=True), dict(loss_func=False)),
}


def _shard(model):
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _train(kind, run, rank, out_dir):
    import transformers
    from torch.distributed.tensor import DTensor

    from hrmloss.integrations.transformers import HRMDistillTrainer, compute_loss_func
    from tests.test_hf import args, collate, dataset, tiny_llama
    student = _shard(tiny_llama(2))
    teacher = tiny_llama(1)
    data = dataset(n=4 * STEPS, teacher=teacher if run.get("source") == "topk" else None, seed=rank)
    seen = []

    class DTensorCheck(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, a, state, control, model=None, **kw):
            seen.append(all(isinstance(p, DTensor) and isinstance(p.grad, DTensor) for p in student.parameters()))

    a = args(out_dir, per_device_train_batch_size=4, max_steps=STEPS, learning_rate=0.5)
    opt = (torch.optim.SGD(student.parameters(), lr=0.5), None)
    common = dict(model=student, args=a, train_dataset=data, data_collator=collate, optimizers=opt,
                  callbacks=[DTensorCheck()])
    if kind == "distill":
        trainer = HRMDistillTrainer(**common, hrm=0.5, fused=run["fused"], loss_options=dict(kl="jsd"),
                                    teacher_model=_shard(teacher) if run["source"] == "teacher" else None)
    else:
        trainer = transformers.Trainer(**common, compute_loss_func=compute_loss_func() if run["loss_func"] else None)
    assert str(trainer.accelerator.distributed_type) == "DistributedType.NO" and trainer.model is student
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return dict(params=[p.detach().full_tensor() for p in student.parameters()], dtensors=seen, logs=logs)


def _rank_main(rank, world, out_dir):
    return {name: [_train(kind, run, rank, f"{out_dir}/{name}{k}r{rank}") for k, run in enumerate((a, b))]
            for name, (kind, a, b) in CASES.items()}


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_fsdp")
    return run_group(2, _rank_main, str(d), d, timeout=240)


@pytest.mark.parametrize("name", CASES)
def test_trainer_under_fsdp2_updates_like_the_oracle(hf_run, name):
    from tests.test_hf import tiny_llama
    start = [p.detach() for p in tiny_llama(2).parameters()]
    for rank, res in enumerate(hf_run):
        got, want = res[name]
        assert got["dtensors"] == [True] * STEPS and want["dtensors"] == [True] * STEPS
        moved = max(float((a - b).abs().max()) for a, b in zip(got["params"], start))
        assert moved > 1e-3, "training did not move the parameters"
        for k, (a, b) in enumerate(zip(got["params"], want["params"])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"rank {rank} parameter {k}")
        if CASES[name][0] == "distill":
            assert len(got["logs"]) == STEPS and all("ce" in h and "kl" in h for h in got["logs"])
            for g, w in zip(got["logs"], want["logs"]):
                assert g["ce"] == pytest.approx(w["ce"], rel=1e-4) and g["kl"] == pytest.approx(w["kl"], rel=1e-4)
    for k, (a, b) in enumerate(zip(hf_run[0][name][0]["params"], hf_run[1][name][0]["params"])):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"parameter {k} differs across ranks")
