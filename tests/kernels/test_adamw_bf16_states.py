"""AdamW with bf16 moments: the Triton kernel (interpreted on CPU) equals its torch reference, and the optimizer
tracks torch's fp32-state AdamW closely."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from titan_dsv3.kernels import adamw_bf16_states as K  # noqa: E402
from titan_dsv3.optim.adamw_bf16 import AdamWBF16States  # noqa: E402

HP = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("n", [1, 77, 2048 + 5])
def test_kernel_equals_reference(n):
    torch.manual_seed(n)
    p = torch.randn(n)
    g = torch.randn(n)
    m = (0.1 * torch.randn(n)).bfloat16()
    v = (0.01 * torch.rand(n)).bfloat16()
    scale = torch.tensor(2.5)
    ref = [t.clone() for t in (p, m, v)]
    K.adamw_bf16_reference(ref[0], g, ref[1], ref[2], scale, step=3, **HP)
    K.adamw_bf16_step(p, g, m, v, scale, step=3, **HP)
    torch.testing.assert_close(p, ref[0], rtol=1e-6, atol=1e-7)
    # one bf16 ulp: Triton's interpreter converts fp32 -> bf16 by truncation, the GPU and torch round to nearest
    torch.testing.assert_close(m.float(), ref[1].float(), rtol=2**-7, atol=1e-30)
    torch.testing.assert_close(v.float(), ref[2].float(), rtol=2**-7, atol=1e-30)


def test_optimizer_tracks_fp32_adamw():
    torch.manual_seed(0)
    w0 = torch.randn(64, 32)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_a = AdamWBF16States([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt_b = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(20):
        g = torch.randn(64, 32)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert opt_a.state[a]["exp_avg"].dtype == torch.bfloat16
    moved = (b - w0).abs().mean()
    # bf16 moments (8-bit mantissa) change each update by well under 1%; 20 steps stay within 1% of the motion
    assert (a - b).abs().mean() < 0.01 * moved


def test_grad_scale_divides_gradients():
    torch.manual_seed(1)
    a, b = torch.nn.Parameter(torch.randn(10)), None
    b = torch.nn.Parameter(a.detach().clone())
    oa, ob = AdamWBF16States([a], lr=0.1), AdamWBF16States([b], lr=0.1)
    g = torch.randn(10) * 7
    a.grad, b.grad = g.clone(), g / 4
    oa.grad_scale = torch.tensor(4.0)
    oa.step()
    ob.step()
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n", [5, 2048 + 3])
def test_master_kernel_equals_reference(n):
    torch.manual_seed(n)
    master = torch.randn(n)
    w = master.bfloat16()
    g = torch.randn(n).bfloat16()
    m = (0.1 * torch.randn(n)).bfloat16()
    v = (0.01 * torch.rand(n)).bfloat16()
    scale = torch.tensor(1.5)
    ref = [t.clone() for t in (w, master, m, v)]
    K.adamw_bf16_master_reference(ref[0], ref[1], g, ref[2], ref[3], scale, step=2, **HP)
    K.adamw_bf16_master_step(w, master, g, m, v, scale, step=2, **HP)
    torch.testing.assert_close(master, ref[1], rtol=1e-6, atol=1e-7)
    for got, want in ((w, ref[0]), (m, ref[2]), (v, ref[3])):  # one bf16 ulp (interpreter truncates)
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-30)


def test_bf16_weights_keep_fp32_masters():
    torch.manual_seed(2)
    w0 = torch.randn(32, 16)
    a = torch.nn.Parameter(w0.clone().bfloat16())
    b = torch.nn.Parameter(w0.bfloat16().float())  # the master starts from the bf16 weight
    oa = AdamWBF16States([a], lr=1e-3, betas=(0.9, 0.95))
    ob = AdamWBF16States([b], lr=1e-3, betas=(0.9, 0.95))
    for _ in range(10):
        g = torch.randn(32, 16).bfloat16()
        a.grad, b.grad = g.clone(), g.float()
        oa.step()
        ob.step()
    master = oa.state[a]["master"]
    assert master.dtype == torch.float32 and a.dtype == torch.bfloat16
    # lr 1e-3 updates are below bf16 resolution for |w| ~ 1: the master accumulates them, the weight is its rounding
    torch.testing.assert_close(master, b.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.detach(), master.bfloat16())
    assert not torch.equal(master, w0.bfloat16().float())


def test_state_dict_round_trip_keeps_state_dtypes():
    a = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = AdamWBF16States([a], lr=1e-3)
    a.grad = torch.randn(8).bfloat16()
    opt.step()
    sd = opt.state_dict()
    b = torch.nn.Parameter(a.detach().clone())
    opt2 = AdamWBF16States([b], lr=1e-3)
    opt2.load_state_dict(sd)
    st, st2 = opt.state[a], opt2.state[b]
    assert st2["master"].dtype == torch.float32 and st2["exp_avg"].dtype == torch.bfloat16
    for key in ("master", "exp_avg", "exp_avg_sq"):
        assert torch.equal(st[key], st2[key])


def test_launchers_refuse_tensors_they_cannot_read_safely():
    """The kernels read every tensor by raw pointer for as many elements as the weight has: a shorter moment, or
    grad_scale on another device, is refused with the argument named instead of read out of bounds."""
    p, g, m = torch.randn(10), torch.randn(10), torch.zeros(10, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="v \\(9,\\) on cpu against p \\(10,\\)"):
        K.adamw_bf16_step(p, g, m, torch.zeros(9, dtype=torch.bfloat16), torch.tensor(1.0), step=1, **HP)
    with pytest.raises(ValueError, match="grad_scale \\(\\) on meta"):
        K.adamw_bf16_master_step(
            p.bfloat16(), p, g.bfloat16(), m, m.clone(), torch.tensor(1.0, device="meta"), step=1, **HP
        )
