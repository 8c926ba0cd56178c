"""The EP route's combine (parallel/expert_parallel.py: sum_copies): copies computed in expert order summed into their
rows, weighted or not, with empty slots; against the zero-fill + index_copy + sum it replaced, in float64, and its
gradients against autograd's numerical check."""

from __future__ import annotations

import pytest
import torch

from titan_dsv3.parallel.expert_parallel import sum_copies

R, S, D = 7, 3, 5


def zero_fill_reference(y_MD, w_RS, cell_M):
    weighted = y_MD if w_RS is None else y_MD * w_RS.flatten()[cell_M][:, None]
    slots = torch.zeros(R * S, D, dtype=y_MD.dtype).index_copy(0, cell_M, weighted)
    return slots.view(R, S, D).sum(1)


@pytest.mark.parametrize("weighted", [True, False])
def test_sum_copies_matches_the_zero_filled_slots(weighted):
    torch.manual_seed(0)
    cell_M = torch.randperm(R * S)[:13]  # 13 of 21 slots hold a copy, in a shuffled (expert-like) order
    y = torch.randn(cell_M.numel(), D, dtype=torch.float64, requires_grad=True)
    w = torch.rand(R, S, dtype=torch.float64, requires_grad=True) if weighted else None
    inputs = (y, w) if weighted else (y,)

    def ours(*t):
        return sum_copies(t[0], t[1] if weighted else None, cell_M, R, S)

    def ref(*t):
        return zero_fill_reference(t[0], t[1] if weighted else None, cell_M)

    assert torch.equal(ours(*inputs), ref(*inputs))
    g = torch.randn(R, D, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad((ours(*inputs) * g).sum(), inputs),
        torch.autograd.grad((ref(*inputs) * g).sum(), inputs),
        strict=True,
    ):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(ours, inputs)


def test_sum_copies_of_no_rows():
    y = torch.zeros(0, D, requires_grad=True)
    out = sum_copies(y, torch.zeros(0, S), torch.zeros(0, dtype=torch.long), 0, S)
    assert out.shape == (0, D)
    out.sum().backward()
    assert y.grad.shape == (0, D)
