"""HRMDistillTrainer on teacher data as people store it: hrmloss's teacher_topk_* columns with the Trainer's
default remove_unused_columns=True (the README's line), and Axolotl / vLLM's target_token_ids /
target_logprobs / target_mask, against Axolotl's forward-KL formula written out in float64."""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hrmloss.integrations.transformers import HRMDistillTrainer, stored_topk  # noqa: E402

from .test_hf import V, args, collate, dataset, direct, tiny_llama  # noqa: E402


def test_readme_topk_line_with_the_default_remove_unused_columns(tmp_path):
    teacher, model = tiny_llama(1), tiny_llama(2)
    data = dataset(teacher=teacher)
    want = direct(model, collate(data.rows), None, hrm=0.5)
    training_args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, learning_rate=0.0,
                                                   per_device_train_batch_size=8, report_to="none", use_cpu=True,
                                                   logging_steps=1, save_strategy="no", disable_tqdm=True)
    assert training_args.remove_unused_columns
    trainer = HRMDistillTrainer(model, training_args, train_dataset=data, hrm=0.5)  # as the README writes it
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["kl"] == pytest.approx(float(want.kl), rel=1e-4) and log["kl"] > 0


def test_missing_teacher_columns_say_what_to_do(tmp_path):
    data = dataset()
    trainer = HRMDistillTrainer(tiny_llama(2), args(tmp_path), train_dataset=data, data_collator=collate)
    with pytest.raises(ValueError, match="expected teacher_model=..., or a dataset with the columns"):
        trainer.train()


def axolotl_rows(teacher, n, K, T, seed=0):
    """test_hf's rows with Axolotl's columns: the teacher's top-K at temperature T, renormalised over the K
    ids; a few padding entries per position (target_mask 0, the id 0 and a garbage log-prob)."""
    g = torch.Generator().manual_seed(seed)
    rows = dataset(n=n).rows
    for row in rows:
        with torch.no_grad():
            top = (teacher(input_ids=row["input_ids"][None]).logits[0].float() / T).topk(K, -1)
        mask = torch.rand(top.indices.shape, generator=g) > 0.3
        mask[:, 0] = True
        lps = torch.log_softmax(top.values.masked_fill(~mask, float("-inf")), -1)
        row.update(target_token_ids=torch.where(mask, top.indices, 0),
                   target_logprobs=torch.where(mask, lps, -7.0), target_mask=mask.long())
    return rows


def axolotl_forward_kl(student_logits, batch, T, hrm):
    """ce + hrm * KL as Axolotl's top-k forward KL defines it (student log-softmax over the vocabulary at
    T, gathered at the ids; the teacher's stored probabilities at valid entries), per counted token."""
    s = student_logits[:, :-1].double()
    y = batch["labels"][:, 1:]
    ids, lps, mask = (batch[k][:, :-1] for k in ("target_token_ids", "target_logprobs", "target_mask"))
    lq = torch.log_softmax(s / T, -1).gather(-1, ids)
    kl = torch.where(mask.bool(), lps.double().exp() * (lps.double() - lq), 0.0).sum(-1)
    live = y != -100
    ce = F.cross_entropy(s.reshape(-1, V), y.reshape(-1), reduction="none").view(y.shape)
    return ((ce + hrm * kl) * live).sum() / live.sum(), (kl * live).sum() / live.sum()


@pytest.mark.parametrize("fused", [True, False])
def test_axolotl_columns_equal_axolotl_forward_kl(tmp_path, fused):
    teacher, student = tiny_llama(1), tiny_llama(2)
    T, hrm = 2.0, 0.7
    batch = collate(axolotl_rows(teacher, 4, K=6, T=T))
    with torch.no_grad():
        want_loss, want_kl = axolotl_forward_kl(student(input_ids=batch["input_ids"]).logits, batch, T, hrm)
    trainer = HRMDistillTrainer(student, args(tmp_path), hrm=hrm, fused=fused, target_temperature=T,
                                loss_options=dict(temperature=T))
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(batch))
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=1e-6)
    assert want_kl > 0


def test_padding_entries_get_distinct_ids_and_an_all_padding_position_must_be_ignored():
    ids = torch.tensor([[[3, 0, 0, 1], [5, 5, 5, 5]]])
    lps = torch.log(torch.tensor([[[0.5, 0.1, 0.1, 0.4], [1.0, 0.1, 0.1, 0.1]]]))
    mask = torch.tensor([[[1, 0, 0, 1], [0, 0, 0, 0]]])
    batch = dict(target_token_ids=ids[:, [0, 1, 0]], target_logprobs=lps[:, [0, 1, 0]],
                 target_mask=mask[:, [0, 1, 0]])
    got_ids, got_lps = stored_topk(dict(batch), torch.tensor([[7, -100]]))
    assert got_ids[0, 0].tolist() == [3, 0, 2, 1] and got_lps[0, 0, 1:3].isneginf().all()
    assert len(set(got_ids[0, 1].tolist())) == 4 and got_lps[0, 1].exp().sum() == 1  # a stand-in, not counted
    with pytest.raises(ValueError, match="target_mask: a position with a counted label"):
        stored_topk(dict(batch), torch.tensor([[7, 8]]))
