"""hrmloss.integrations.transformers on CPU with tiny LlamaForCausalLM models built from a config (no download)."""
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import hrmloss  # noqa: E402
from hrmloss.integrations.transformers import HRMDistillTrainer, compute_loss_func  # noqa: E402

V, T = 48, 12


def tiny_llama(seed, vocab=V, hidden=32):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def dataset(n=8, teacher=None, K=6, seed=0):
    """Sequences of a simple repeating pattern (learnable), labels with a masked prompt, and the teacher's
    top-K log-probs per position when a teacher is given."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = torch.randint(0, V, (1,), generator=g)
        ids = (start + 3 * torch.arange(T)) % V
        labels = ids.clone()
        labels[:3] = -100
        row = dict(input_ids=ids, attention_mask=torch.ones(T, dtype=torch.long), labels=labels)
        if teacher is not None:
            with torch.no_grad():
                lp = torch.log_softmax(teacher(input_ids=ids[None]).logits[0].float(), -1)
            top = lp.topk(K, -1)
            row.update(teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values)
        rows.append(row)
    return Rows(rows)


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=1,
                learning_rate=0.5, max_steps=1, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                remove_unused_columns=False, seed=0, lr_scheduler_type="constant", disable_tqdm=True)
    return transformers.TrainingArguments(**{**base, **kw})


def sgd(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr), None


def train(tmp_path, model, data, **kw):
    opts = {k: kw.pop(k) for k in ("teacher_model", "hrm", "loss_options", "fused") if k in kw}
    a = args(tmp_path, **kw)
    trainer = HRMDistillTrainer(model=model, args=a, train_dataset=data, data_collator=collate,
                                optimizers=sgd(model, a.learning_rate), **opts)
    trainer.train()
    return trainer


def direct(model, batch, teacher=None, **opts):
    """The loss components of one batch computed directly with hrm_loss on materialised logits."""
    with torch.no_grad():
        s = model(input_ids=batch["input_ids"]).logits[:, :-1]
        kw = {}
        if teacher is not None:
            kw["ref_logits"] = teacher(input_ids=batch["input_ids"]).logits[:, :-1]
        else:
            kw["ref_topk"] = (batch["teacher_topk_ids"][:, :-1], batch["teacher_topk_logprobs"][:, :-1])
        return hrmloss.hrm_loss(s, kw.pop("ref_logits", None), batch["labels"][:, 1:], return_components=True,
                                **kw, **opts)


@pytest.mark.parametrize("source", ["teacher_model", "topk"])
@pytest.mark.parametrize("fused", [True, False])
def test_logged_components_equal_a_direct_computation(tmp_path, source, fused):
    teacher = tiny_llama(1)
    student = tiny_llama(2)
    data = dataset(teacher=teacher if source == "topk" else None)
    want = direct(student, collate(data.rows), teacher if source == "teacher_model" else None, hrm=0.5,
                  kl="jsd", beta=0.3) if source == "teacher_model" else \
        direct(student, collate(data.rows), None, hrm=0.5, topk_mode="tail")
    opts = dict(kl="jsd", beta=0.3) if source == "teacher_model" else dict(topk_mode="tail")
    trainer = train(tmp_path, student, data, hrm=0.5, loss_options=opts, fused=fused,
                    teacher_model=teacher if source == "teacher_model" else None)
    log = trainer.state.log_history[0]
    assert log["ce"] == pytest.approx(float(want.ce), rel=1e-4)
    assert log["kl"] == pytest.approx(float(want.kl), rel=1e-4)
    assert log["loss"] == pytest.approx(float(want.loss), rel=1e-4)


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    teacher = tiny_llama(1)
    data = dataset(teacher=teacher)
    data.rows[0]["labels"][:8] = -100  # micro-batches with different numbers of counted tokens
    params = []
    for bs, ga in ((8, 1), (2, 4)):
        student = tiny_llama(2)
        train(tmp_path / f"{bs}", student, data, hrm=0.5, per_device_train_batch_size=bs,
              gradient_accumulation_steps=ga)
        params.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    moved = (params[0] - torch.cat([p.detach().flatten() for p in tiny_llama(2).parameters()])).abs().max()
    assert moved > 1e-3
    torch.testing.assert_close(params[1], params[0], rtol=1e-5, atol=1e-6)


def test_loss_falls(tmp_path):
    teacher = tiny_llama(1)
    student = tiny_llama(2)
    trainer = train(tmp_path, student, dataset(n=16), teacher_model=teacher, hrm=0.1, max_steps=12,
                    per_device_train_batch_size=16)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0], losses


def test_teacher_of_another_vocabulary_size(tmp_path):
    teacher = tiny_llama(1, vocab=V + 5)  # padded lm_head rows, as model pairs of one tokenizer have
    student = tiny_llama(2)
    data = dataset()
    with pytest.raises(ValueError, match="ref_vocab"):
        train(tmp_path, tiny_llama(2), data, teacher_model=teacher)
    trainer = train(tmp_path, student, data, teacher_model=teacher, loss_options=dict(ref_vocab="truncate"))
    assert trainer.state.log_history[0]["kl"] > 0


def test_compute_loss_func_drop_in(tmp_path):
    data = dataset()
    model = tiny_llama(2)
    batch = collate(data.rows)
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(input_ids=batch["input_ids"]).logits[:, :-1].reshape(-1, V),
                                                 batch["labels"][:, 1:].reshape(-1))
    trainer = transformers.Trainer(model=model, args=args(tmp_path), train_dataset=data, data_collator=collate,
                                   compute_loss_func=compute_loss_func(label_smoothing=0.0),
                                   optimizers=sgd(model, 0.5))
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(float(want), rel=1e-4)


def test_example_stores_topk_and_trains(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "docs", "examples", "distill_topk.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
    done = subprocess.run([sys.executable, script, "--out", str(tmp_path), "--steps", "12", "--sequences", "64"], capture_output=True, text=True,
                          timeout=300, cwd=root, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "loss fell" in done.stdout
