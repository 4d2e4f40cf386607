"""hrmloss.integrations.trl.generalized_jsd_loss against TRL's own GKDTrainer.generalized_jsd_loss (TRL 1.16):
value and gradients (student and teacher), every beta regime, reduction, temperature, labels or none,
num_items_in_batch; and the one-line switch of GKDTrainer."""
import pytest
import torch

pytest.importorskip("trl")
GKDTrainer = pytest.importorskip("trl.experimental.gkd").GKDTrainer

from hrmloss.integrations.trl import generalized_jsd_loss  # noqa: E402

TRL_LOSS = GKDTrainer.__dict__["generalized_jsd_loss"]  # TRL's own (a staticmethod), saved before any switch


def inputs(B=2, T=6, V=37, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    t = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :2] = -100
    y[1, 4] = -100
    return s, t, y


def value_and_grads(fn, s, t, y, **kw):
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss = fn(s, t, y, **kw)
    loss.backward()
    return loss.detach().float(), s.grad, t.grad


CASES = [dict(beta=0.0), dict(beta=1.0), dict(beta=0.3, temperature=2.0), dict(beta=0.5, reduction="sum"),
         dict(beta=0.7, reduction="mean", temperature=0.7), dict(beta=0.0, reduction="mean"),
         dict(beta=0.4, num_items_in_batch=13), dict(beta=1.0, num_items_in_batch=torch.tensor(9)),
         dict(beta=0.5, no_labels=True), dict(beta=0.2, reduction="mean", no_labels=True),
         dict(beta=0.0, reduction="sum", no_labels=True)]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_equals_trl(case):
    case = dict(case)
    s, t, y = inputs()
    if case.pop("no_labels", False):
        y = None
    got = value_and_grads(generalized_jsd_loss, s, t, y, **case)
    want = value_and_grads(TRL_LOSS, s, t, y, **case)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_flattened_rows_and_bf16():
    s, t, y = inputs(dtype=torch.bfloat16)
    s, t, y = s.view(-1, s.shape[-1]), t.view(-1, t.shape[-1]), y.view(-1)  # as TRL's GOLD trainer calls it
    got = value_and_grads(generalized_jsd_loss, s, t, y, beta=0.5)
    want = value_and_grads(TRL_LOSS, s.float(), t.float(), y, beta=0.5)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=1e-3)


def test_one_line_switch_of_the_trainer(monkeypatch):
    s, t, y = inputs()
    want = TRL_LOSS(s, t, y, beta=0.3)
    monkeypatch.setattr(GKDTrainer, "generalized_jsd_loss", generalized_jsd_loss)
    trainer = object.__new__(GKDTrainer)  # the trainer calls self.generalized_jsd_loss(...)
    torch.testing.assert_close(trainer.generalized_jsd_loss(s, t, y, beta=0.3), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(GKDTrainer.generalized_jsd_loss(s, t, y, beta=0.3), want, rtol=1e-5, atol=1e-6)


def test_refusals():
    s, t, y = inputs()
    with pytest.raises(ValueError, match="reduction='none'"):
        generalized_jsd_loss(s, t, y, reduction="none")
    with pytest.raises(ValueError, match="beta=1.5"):
        generalized_jsd_loss(s, t, y, beta=1.5)
