"""Few rows, long vocabularies: the Triton launcher splits the vocabulary over a second grid axis and the
split rows' partial statistics merge on the device (stats.merge_partial, shared with distributed.py).

On the CPU the interpreter reports one multiprocessor, so the tests that run split programs say how many
multiprocessors to pretend (the split is a function of N, V and that count).
"""
import math

import pytest
import torch

from hrmloss.engine import stats

from hrmloss.kernels import launch
from hrmloss.engine.layout import PARTIAL
from .harness import check, close, make, run

pytest.importorskip("triton")


def test_splits_only_when_rows_do_not_fill_the_machine():
    assert launch.vocab_splits(16384, 128256, 2048, 132) == (1, 129024)  # enough rows: one range a row
    for n, v in [(256, 128256), (8, 262144), (1, 65536)]:
        splits, cols = launch.vocab_splits(n, v, 2048, 132)
        assert splits > 1 and cols % 2048 == 0 and (splits - 1) * cols < v <= splits * cols
        assert cols >= launch.MIN_SPLIT_BLOCKS * 2048
    # never ranges of fewer than MIN_SPLIT_BLOCKS blocks: a short row stays whole
    assert launch.vocab_splits(4, 4 * 2048, 2048, 132)[0] == 1


@pytest.fixture
def split(monkeypatch):
    """Pretend a 64-multiprocessor device and allow one-block ranges: (6, 5000) fp32 rows split in 3
    ranges for the reading passes (blocks of 1024) and in 2 for the gradient (blocks of 2048)."""
    monkeypatch.setattr(launch, "multiprocessor_count", lambda device: 64)
    monkeypatch.setattr(launch, "MIN_SPLIT_BLOCKS", 1)
    assert launch.vocab_splits(6, 5000, 1024, 64)[0] == 3


@pytest.mark.parametrize("kl,temperature", [("forward", 1.0), ("reverse", 2.0), ("jsd", 0.5)])
def test_split_rows_match_the_reference(split, kl, temperature):
    s, t, y = make((2, 3, 5000), ignore=-100)
    y[0, 1], y[1, 0], y[1, 2] = 4999, 2048, 3071   # labels in the last and middle ranges
    check(s, t, y, "triton", hrm=0.5, kl=kl, temperature=temperature, label_smoothing=0.1, z_loss=1e-3,
          ref_grad=True, reduction="none", grad_out=torch.rand(2, 3))


@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
def test_split_with_an_empty_range_and_infinite_divergence(split, kl):
    # the first range (columns 0..2047) is -inf in both logits: an empty range merges as nothing;
    # a reference -inf facing a finite student in the last range makes the reverse KL +inf
    s, t, y = make((4, 5000))
    s[:, :2048], t[:, :2048] = -math.inf, -math.inf
    y = y.clamp(min=2048)
    t[1, 4500] = -math.inf
    loss, ce, k, _, grad, _ = run(s, t, y, "triton", hrm=0.5, kl=kl, reduction="none")
    _, rce, rk, _, rgrad, _ = run(s[:, 2048:], t[:, 2048:], y - 2048, "torch", hrm=0.5, kl=kl, reduction="none")
    close(ce, rce)
    if kl == "reverse":
        assert math.isinf(k[1]) and k[1] > 0
        keep = torch.tensor([True, False, True, True])
        close(k[keep], rk[keep])
    else:
        close(k, rk)
        close(grad[:, 2048:], rgrad)
        assert (grad[:, :2048] == 0).all()


def test_split_equals_unsplit(monkeypatch):
    s, t, y = make((5, 5000), ignore=-100)
    whole = run(s, t, y, "triton", hrm=0.5, reduction="none")
    monkeypatch.setattr(launch, "multiprocessor_count", lambda device: 64)
    monkeypatch.setattr(launch, "MIN_SPLIT_BLOCKS", 1)
    parts = run(s, t, y, "triton", hrm=0.5, reduction="none")
    for a, b in zip(whole, parts):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_merge_partial_of_ranges_equals_the_whole_row():
    # merge_partial over a dimension (the launcher's use) gives the statistics of the whole row, with an
    # empty range (row 0: the student is -inf there, so the forward KL is +inf)
    from hrmloss.engine import torch_passes
    from hrmloss.engine.options import LossOptions
    s, t, y = make((4, 90))
    s[0, :30] = -math.inf
    opts = LossOptions(temperature=2.0)
    params, st = opts.params(torch.device("cpu"), torch.float32), opts.structure()
    whole = torch_passes.row_stats(s[None], t[None], y, params, st)
    ranges = [torch_passes.row_stats(s[None, :, i:i + 30].contiguous(), t[None, :, i:i + 30].contiguous(), y,
                               params, st, vocab_start=i) for i in (0, 30, 60)]
    merged = stats.merge_partial(torch.stack(ranges, 1), lambda x: x.amax(1, keepdim=True),
                                 lambda x: x.sum(1))
    assert merged[0, PARTIAL.ep] == math.inf
    torch.testing.assert_close(merged, whole, rtol=1e-5, atol=1e-5)
