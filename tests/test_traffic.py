"""Bytes the Triton kernels move, counted under the interpreter, as multiples of NVs (DESIGN.md §3)."""
import pytest
import torch

import hrmloss
from .traffic import count_traffic

N, V = 64, 32768


def nvs(kl, with_backward, grad_output=None, ignore_every=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, V, generator=g).to(dtype).requires_grad_(with_backward)
    t = torch.randn(N, V, generator=g).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    with count_traffic() as tr:
        loss = hrmloss.hrm_loss(s, t, y, 0.5, kl=kl, backend="triton")
        if with_backward:
            loss.backward(grad_output)
    return tr.total / s.numel() / s.element_size(), tr


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_forward_reads_each_tensor_once(kl):
    total, tr = nvs(kl, with_backward=False)
    assert total <= 2.05, tr
    assert tr.stored < 0.01 * N * V * 4


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_forward_backward_five_nvs(kl):
    total, tr = nvs(kl, with_backward=True, grad_output=torch.tensor(2.5))
    assert total <= 5.1, tr


def test_jsd_needs_one_more_forward_pass():
    assert nvs("jsd", with_backward=False)[0] <= 4.05
    assert nvs("jsd", with_backward=True)[0] <= 7.1


def test_bf16_counts_in_its_own_bytes():
    assert nvs("forward", with_backward=True, dtype=torch.bfloat16)[0] <= 5.1


def test_ignored_rows_are_not_read():
    # a third of the rows ignored: forward reads 2/3 of 2 NVs, backward reads 2/3 of 2 and writes all
    total, tr = nvs("forward", with_backward=True, ignore_every=3)
    live = 1 - len(range(0, N, 3)) / N
    assert total <= 4 * live + 1 + 0.05, tr
