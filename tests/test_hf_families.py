"""HRMDistillTrainer's objective on tiny Gemma-2, Granite, Llama and Qwen-2 models built from configs: each
model's own logits (soft cap, logit scaling) in the fused and the unfused path, student and teacher each
with its own config, against the float64 oracle on the models' own logits (value and gradient)."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hrmloss.integrations.transformers import HRMDistillTrainer, compute_loss_func, head_transform  # noqa: E402

from .reference import reference_loss  # noqa: E402
from .test_hf import args, collate, dataset  # noqa: E402

V = 48  # test_hf's vocabulary
SIZES = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)
FAMILIES = {  # caps and scales small enough to change these models' logits a lot
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        head_dim=16, final_logit_softcapping=1.5, **SIZES)),
    "granite": lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(logits_scaling=3.0, **SIZES)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES)),
}


def model(family, seed):
    torch.manual_seed(seed)
    return FAMILIES[family]()


def oracle(student, teacher, batch, **opts):
    """The float64 objective of the models' own logits; the student's parameter gradients by autograd."""
    student.zero_grad()
    ids = batch["input_ids"]
    with torch.no_grad():
        t = teacher(input_ids=ids).logits[:, :-1]
    s = student(input_ids=ids).logits[:, :-1]
    out = reference_loss(s, t, batch["labels"][:, 1:], **opts)
    out[0].backward()
    return [x.detach() for x in out], [p.grad.clone() for p in student.parameters()]


def trainer_loss(tmp_path, student, teacher, batch, fused, **opts):
    student.zero_grad()
    trainer = HRMDistillTrainer(model=student, args=args(tmp_path), teacher_model=teacher, fused=fused,
                                hrm=opts.pop("hrm"), loss_options=opts)
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    return trainer, loss.detach(), [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("pair", [("gemma2", "gemma2"), ("granite", "granite"), ("gemma2", "granite"),
                                  ("llama", "qwen2")])
def test_the_models_own_objective(tmp_path, pair, fused):
    student, teacher = model(pair[0], 2), model(pair[1], 1)
    batch = collate(dataset(n=4).rows)
    opts = dict(hrm=0.7, kl="jsd", beta=0.3, temperature=1.5)
    want, want_grads = oracle(student, teacher, batch, **opts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every head here is reproduced: no fallback warning
        trainer, got, got_grads = trainer_loss(tmp_path, student, teacher, batch, fused, **opts)
    assert (trainer._heads["student"] is not None) == fused and (trainer._heads["teacher"] is not None) == fused
    torch.testing.assert_close(got.double(), want[0], rtol=2e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)


def test_transforms_read_from_configs():
    assert head_transform(model("gemma2", 0)) == (None, 1.5)
    assert head_transform(model("granite", 0)) == (pytest.approx(1 / 3), None)
    assert head_transform(model("llama", 0)) == (None, None)


class DoubledLlama(transformers.LlamaForCausalLM):
    """A head the trainer cannot know: logits = 2 lm_head(h)."""

    def forward(self, *a, **kw):
        out = super().forward(*a, **kw)
        out.logits = 2 * out.logits
        return out


def test_unknown_head_falls_back_with_a_warning(tmp_path):
    torch.manual_seed(2)
    student = DoubledLlama(transformers.LlamaConfig(**SIZES))
    teacher = model("gemma2", 1)
    batch = collate(dataset(n=4).rows)
    want, want_grads = oracle(student, teacher, batch, hrm=0.5)
    with pytest.warns(UserWarning, match="student's logits are not") as record:
        trainer, got, got_grads = trainer_loss(tmp_path, student, teacher, batch, True, hrm=0.5)
    assert len(record) == 1 and trainer._heads["student"] is None
    torch.testing.assert_close(got.double(), want[0], rtol=2e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)


def test_softcap_on_a_capped_model(tmp_path):
    gemma = model("gemma2", 0)
    with pytest.warns(UserWarning, match="caps its logits already"):
        compute_loss_func(model=gemma, softcap=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        HRMDistillTrainer(model=gemma, args=args(tmp_path), teacher_model=model("gemma2", 1),
                          loss_options=dict(softcap=30.0))
