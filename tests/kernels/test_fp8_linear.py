"""The FP8 linear's quantiser and op on CPU (Triton interpreter and CPU torch._scaled_mm; the CPU path without them).

The quantiser must write torch's cast bit for bit, in both layouts, for both formats, e4m3 and e5m2 subnormals and
signed zeros included. The op against its float64 reference on the dequantised operands: the GEMMs differ only by
summation order and the outputs' rounding (bf16: bound 1e-2). Against unquantised math, measured on these random
shapes: logits ~3.8%, dx and dW ~5.9% (the e5m2 gradient's 2 mantissa bits); bounds 5% and 8%.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from titan_dsv3.kernels.fp8_linear import (  # noqa: E402
    fp8_linear,
    fp8_linear_reference,
    quantise,
    quantise_reference,
)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("shape", [(48, 200), (130, 64), (1, 16)])
def test_quantise_bits(dtype, fmt, shape):
    torch.manual_seed(0)
    # ten decades below the largest entry: subnormals of both formats and values that flush to (signed) zero
    x = (torch.randn(*shape) * torch.logspace(-9, 0, shape[1])).to(dtype)
    q, qt, scale = quantise(x, fmt, both=True)
    ref, ref_scale = quantise_reference(x, fmt)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(qt.view(torch.uint8), ref.t().contiguous().view(torch.uint8))
    q1, none, _ = quantise(x, fmt)
    assert none is None and torch.equal(q1.view(torch.uint8), q.view(torch.uint8))


def test_cpu_path_writes_the_kernels_bits(monkeypatch):
    """Without the interpreter a CPU tensor is quantised by torch's cast: the same bits as the kernel."""
    from titan_dsv3.kernels import fp8_linear as L

    x = torch.randn(130, 200, dtype=torch.bfloat16) * torch.logspace(-9, 0, 200)
    kernel = quantise(x, torch.float8_e4m3fn, both=True)
    monkeypatch.setattr(L, "_INTERPRET", False)
    cpu = quantise(x, torch.float8_e4m3fn, both=True)
    assert torch.equal(kernel[2], cpu[2])  # the scale
    for a, b in zip(kernel[:2], cpu[:2]):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_cpu_gemms_match_scaled_mm(monkeypatch):
    """Without the interpreter the CPU op multiplies the dequantised operands in fp32: _scaled_mm's values up to
    summation order, forward and backward."""
    from titan_dsv3.kernels import fp8_linear as L

    torch.manual_seed(3)
    x = torch.randn(48, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(96, 64, requires_grad=True)
    g = torch.randn(48, 96, dtype=torch.bfloat16)
    outs = []
    for interpret in (True, False):
        monkeypatch.setattr(L, "_INTERPRET", interpret)
        y = fp8_linear(x, w)
        outs.append([y, *torch.autograd.grad(y, (x, w), g)])
    for a, b in zip(*outs):
        assert _rel(a, b) < 1e-2


def test_quantise_zeros_and_saturation():
    x = torch.zeros(16, 32)
    q, qt, _ = quantise(x, torch.float8_e5m2, both=True)
    assert not q.float().any() and not qt.float().any()
    x[3, 5], x[0, 0] = -7.0, 7.0  # the amax maps to the format's largest value, both signs
    q, _, scale = quantise(x, torch.float8_e4m3fn)
    assert q.float()[3, 5] == -448.0 and q.float()[0, 0] == 448.0 and scale.item() == pytest.approx(7 / 448)


@pytest.mark.parametrize("grad_dtype", [torch.float8_e5m2, torch.float8_e4m3fn])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_head_forward_backward(w_dtype, grad_dtype):
    torch.manual_seed(0)
    x = torch.randn(48, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(96, 64).to(w_dtype).requires_grad_()
    g = torch.randn(48, 96, dtype=torch.bfloat16)
    y = fp8_linear(x, w, grad_dtype)
    y.backward(g)
    assert y.dtype == x.grad.dtype == torch.bfloat16 and w.grad.dtype == w_dtype
    ry, rdx, rdw = fp8_linear_reference(x.detach(), w.detach(), g, grad_dtype)
    # the gradient's format shows in the bits: the other format's reference is further off
    other = torch.float8_e4m3fn if grad_dtype == torch.float8_e5m2 else torch.float8_e5m2
    assert _rel(x.grad, rdx) < _rel(x.grad, fp8_linear_reference(x.detach(), w.detach(), g, other)[1])
    for got, want in ((y, ry), (x.grad, rdx), (w.grad, rdw)):
        assert _rel(got, want) < 1e-2
    xd, wd, gd = x.detach().double(), w.detach().double(), g.double()
    assert _rel(y, xd @ wd.T) < 5e-2
    assert _rel(x.grad, gd @ wd) < 8e-2 and _rel(w.grad, gd.T @ xd) < 8e-2


def test_head_checks_and_compiles():
    x, w = torch.randn(40, 64), torch.randn(96, 64)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_linear(x, w)  # 40 tokens
    with pytest.raises(ValueError, match="features"):
        fp8_linear(torch.randn(48, 32), w)
    with pytest.raises(ValueError, match="grad_dtype"):
        fp8_linear(torch.randn(48, 64), w, torch.bfloat16)
    # opaque to torch.compile: the fakes give the shapes; a compiled block (FP8Linear, as the trainer compiles
    # them) gives eager's values and gradients
    from torch import nn

    from titan_dsv3.float8 import FP8Linear

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 128, bias=False), nn.ReLU(), nn.Linear(128, 64, bias=False))
    for lin in (block[0], block[2]):
        lin.__class__ = FP8Linear
    x = torch.randn(2, 24, 64, requires_grad=True)
    got = []
    for fn in (block, torch.compile(block, fullgraph=True)):
        y = fn(x)
        got.append([y, *torch.autograd.grad(y.square().sum(), (x, *block.parameters()))])
    assert all(torch.equal(a, b) for a, b in zip(*got))
    torch.library.opcheck(
        torch.ops.titan_dsv3.fp8_linear_fwd.default,
        (torch.randn(48, 64), torch.randn(96, 64), torch.float8_e5m2),
    )
