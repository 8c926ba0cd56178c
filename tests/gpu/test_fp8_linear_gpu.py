"""The FP8 linear (the output head's) on CUDA: the quantiser's bits (Triton, compiled for the GPU) against torch's
cast, and the op against its float64 reference on dequantised operands and against bf16 math.

Against the reference the op differs by cuBLAS's accumulation (fast accumulation in the forward, K = dim) and the
outputs' rounding to bf16: bound 1e-2 relative Frobenius error. Against bf16 math: FP8 error, < 8% (e4m3 operands
about 3-4%, an e5m2 gradient about 6%; see tests/kernels/test_fp8_linear.py).
"""

import pytest
import torch

from titan_dsv3.kernels.fp8_linear import (
    fp8_linear,
    fp8_linear_reference,
    quantise,
    quantise_reference,
)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("shape", [(16384, 2048), (1000, 300), (256, 4096)])
def test_quantise_bits(dtype, fmt, shape):
    """Row-major and transposed copies both equal torch's cast, bit for bit (an fp32 source included: an earlier
    Triton kernel storing a block both ways wrote wrong transposed bytes from fp32 on H200)."""
    torch.manual_seed(0)
    x = (torch.randn(*shape, device="cuda") * torch.logspace(-8, 0, shape[1], device="cuda")).to(dtype)
    q, qt, scale = quantise(x, fmt, both=True)
    ref, ref_scale = quantise_reference(x, fmt)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(qt.view(torch.uint8), ref.t().contiguous().view(torch.uint8))


@pytest.mark.parametrize("grad_dtype", [torch.float8_e5m2, torch.float8_e4m3fn])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_head_against_references(w_dtype, grad_dtype):
    torch.manual_seed(0)
    t, d, v = 4096, 2048, 8192
    x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, d, device="cuda") * 0.02).to(w_dtype).requires_grad_()
    g = torch.randn(t, v, device="cuda", dtype=torch.bfloat16)
    y = fp8_linear(x, w, grad_dtype)
    y.backward(g)
    assert y.dtype == x.grad.dtype == torch.bfloat16 and w.grad.dtype == w_dtype
    ry, rdx, rdw = fp8_linear_reference(x.detach(), w.detach(), g, grad_dtype)
    for got, want in ((y, ry), (x.grad, rdx), (w.grad, rdw)):
        assert _rel(got, want) < 1e-2
    xd, wd, gd = x.detach().double(), w.detach().double(), g.double()
    for got, want in ((y, xd @ wd.T), (x.grad, gd @ wd), (w.grad, gd.T @ xd)):
        assert _rel(got, want) < 8e-2
