"""The bf16-moment AdamW kernel on CUDA equals its torch reference (moments rounded to nearest, like torch)."""

import torch

from titan_dsv3.kernels.adamw_bf16_states import adamw_bf16_reference, adamw_bf16_step


def test_kernel_equals_reference_on_gpu():
    torch.manual_seed(0)
    n = 1_000_003
    p = torch.randn(n, device="cuda")
    g = torch.randn(n, device="cuda")
    m = (0.1 * torch.randn(n, device="cuda")).bfloat16()
    v = (0.01 * torch.rand(n, device="cuda")).bfloat16()
    scale = torch.tensor(3.0, device="cuda")
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=7)
    ref = [t.clone() for t in (p, m, v)]
    adamw_bf16_reference(ref[0], g, ref[1], ref[2], scale, **hp)
    adamw_bf16_step(p, g, m, v, scale, **hp)
    torch.testing.assert_close(p, ref[0], rtol=1e-6, atol=1e-7)
    # fp32 math may differ in the last bit before rounding; allow one bf16 ulp on a handful of elements
    assert (m.float() != ref[1].float()).float().mean() < 1e-3
    assert (v.float() != ref[2].float()).float().mean() < 1e-3


def test_master_kernel_equals_reference_on_gpu():
    from titan_dsv3.kernels.adamw_bf16_states import adamw_bf16_master_reference, adamw_bf16_master_step

    torch.manual_seed(1)
    n = 500_001
    master = torch.randn(n, device="cuda")
    w = master.bfloat16()
    g = torch.randn(n, device="cuda").bfloat16()
    m = (0.1 * torch.randn(n, device="cuda")).bfloat16()
    v = (0.01 * torch.rand(n, device="cuda")).bfloat16()
    scale = torch.tensor(2.0, device="cuda")
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3)
    ref = [t.clone() for t in (w, master, m, v)]
    adamw_bf16_master_reference(ref[0], ref[1], g, ref[2], ref[3], scale, **hp)
    adamw_bf16_master_step(w, master, g, m, v, scale, **hp)
    torch.testing.assert_close(master, ref[1], rtol=1e-6, atol=1e-7)
    assert (w.float() != ref[0].float()).float().mean() < 1e-3
