"""Bytes the Triton kernels move, counted under the interpreter, as multiples of NVs (docs/design.md §6)."""
import pytest
import torch

import hrmloss
from benchmarks.tools.traffic import count_traffic  # the project's measuring tools live in benchmarks/tools

# Small enough for the interpreter (16 rows x 8 blocks of the stats pass, 4 of the gradient pass), large enough that
# the O(N) row statistics stay far below the 0.05 NV slack of each bound (40 bytes a row against 32 KiB).
N, V = 16, 8192


def nvs(kl, with_backward, grad_output=None, ignore_every=None, dtype=torch.float32, ref_grad=False,
        **options):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, V, generator=g).to(dtype).requires_grad_(with_backward)
    t = torch.randn(N, V, generator=g).to(dtype).requires_grad_(ref_grad)
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    with count_traffic() as tr:
        loss = hrmloss.hrm_loss(s, t, y, 0.5, kl=kl, backend="triton", **options)
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


def test_options_cost_no_traffic():
    # soft cap, label smoothing and z-loss ride on the same passes
    total, tr = nvs("reverse", with_backward=True, softcap=30.0, label_smoothing=0.1, z_loss=1e-4)
    assert total <= 5.1, tr


def test_ref_gradient_writes_one_more_tensor():
    # the gradient to ref_logits is one more write in the same backward pass: 6 NVs, not a second pass
    total, tr = nvs("forward", with_backward=True, ref_grad=True)
    assert total <= 6.1, tr
