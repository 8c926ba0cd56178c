"""The FP8 head fused with its loss on CUDA: against its float64 reference, against the unfused path (fp8_linear
and the loss), and the gradient's fp8 copies in both layouts equal to torch's cast of the same softmax terms.

Bounds as in tests/kernels/test_fp8_head_loss.py, on bench6-like shapes (4,096 tokens x 2,048 -> 16,384).
"""

import pytest
import torch
import torch.nn.functional as F

from titan_dsv3.kernels import fp8_head_loss as H
from titan_dsv3.kernels.fp8_linear import fp8_linear


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _case(w_dtype=torch.bfloat16, t=4096, d=2048, v=16384):
    torch.manual_seed(0)
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, d, device="cuda") * 0.02).to(w_dtype).requires_grad_()
    labels = torch.randint(0, v, (t,), device="cuda")
    labels[::7] = H.IGNORE_INDEX
    return x, w, labels


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_against_reference_and_unfused(w_dtype):
    x, w, labels = _case(w_dtype)
    loss = H.fp8_head_cross_entropy(x, w, labels)
    dx, dw = torch.autograd.grad(loss / 4096, (x, w))
    ref_loss, ref_dx, ref_dw = H.head_cross_entropy_reference(x.detach(), w.detach(), labels, dsum=1 / 4096)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-4
    assert dw.dtype == w_dtype and _rel(dx, ref_dx) < 1e-2 and _rel(dw, ref_dw) < 1e-2
    z = fp8_linear(x, w, torch.float8_e5m2)
    unfused = F.cross_entropy(z.float(), labels, ignore_index=H.IGNORE_INDEX, reduction="sum")
    ux, uw = torch.autograd.grad(unfused / 4096, (x, w))
    assert abs(loss.item() - unfused.item()) / unfused.item() < 1e-5
    assert _rel(dx, ux) < 1e-2 and _rel(dw, uw) < 1e-2


@pytest.mark.parametrize("z_dtype", [torch.bfloat16, torch.float32])
def test_gradient_bits_both_layouts(z_dtype):
    """The kernel's fp8 gradient in both layouts against torch's cast of its own softmax terms (exp in fp32 on
    both sides; a few entries may round apart where the two exps differ in the last bit)."""
    torch.manual_seed(1)
    t, v = 1024, 8192
    z = (torch.randn(t, v, device="cuda") * 4).to(z_dtype)
    labels = torch.randint(0, v, (t,), device="cuda")
    labels[5] = H.IGNORE_INDEX
    lse, _ = H.row_losses(z, labels)
    g8, g8t = H.softmax_grad_fp8(z, lse, labels)
    g = torch.exp(z.float() - lse[:, None])
    g[torch.arange(t, device="cuda"), labels] -= 1.0
    g[5] = 0.0
    ref = (g * 57344.0).to(torch.float8_e5m2)
    apart = (g8.view(torch.uint8) != ref.view(torch.uint8)).float().mean().item()
    assert apart < 1e-3, apart
    assert torch.equal(g8t.view(torch.uint8), g8.t().contiguous().view(torch.uint8))
