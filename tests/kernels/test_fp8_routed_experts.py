"""The routed experts with the route folded into the FP8 op (kernels/fp8_routed_experts.py; Triton, interpreted on
CPU) against the dequantised reference, against the unfused route (GroupedExperts.routed on FP8GroupedExperts:
gather, the FP8 FFN, index_copy, bmm) and through the MoE layer (float8.fuse_moe_route's FP8RoutedExperts).

In fp32 the unfused route and the fused op do the same arithmetic but for summation order (the weighted sum, the
sum of dx over copies): the expert weights' gradients are equal bit for bit, the rest within 1e-6. Against the
dequantised reference the bounds of tests/kernels/test_fp8_grouped_gemm.py (1e-3 relative Frobenius).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from titan_dsv3.float8 import FP8RoutedExperts  # noqa: E402
from titan_dsv3.kernels import fp8_routed_experts as R  # noqa: E402
from titan_dsv3.models.moe import GroupedExperts  # noqa: E402

DIM, HIDDEN = 256, 128


def _case(n_tok, n_exp, topk, seed=0, skew=0.0):
    """x, routing weights, order, counts, [w1, w2, w3], dout, as route_locally builds them (fp32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tok, DIM, generator=g)
    scores = torch.randn(n_tok, n_exp, generator=g) + skew * torch.arange(n_exp)
    weights, ids = torch.softmax(scores, -1).topk(topk, dim=1)
    order = ids.flatten().argsort(stable=True)
    counts = torch.bincount(ids.flatten(), minlength=n_exp)
    ws = [
        torch.randn(n_exp, HIDDEN, DIM, generator=g) * DIM**-0.5,
        torch.randn(n_exp, DIM, HIDDEN, generator=g) * HIDDEN**-0.5,
        torch.randn(n_exp, HIDDEN, DIM, generator=g) * DIM**-0.5,
    ]
    return x, weights, order, counts, ws, torch.randn(n_tok, DIM, generator=g)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def _experts(ws, cls):
    m = GroupedExperts(ws[0].shape[0], DIM, HIDDEN)
    with torch.no_grad():
        for p, w in zip((m.w1, m.w2, m.w3), ws):
            p.copy_(w)
    m.__class__ = cls
    return m


def _run(module, route, x, weights, order, counts, dout):
    """[out, dx, d weights, dw1, dw2, dw3] of route(module, x, weights, order, counts)."""
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = route(module, x, weights, order, counts)
    grads = torch.autograd.grad(out, [x, weights, module.w1, module.w2, module.w3], dout)
    return [out.detach(), *grads]


@pytest.mark.parametrize(
    "n_tok, n_exp, topk, skew",
    [(70, 4, 3, 0.0), (130, 5, 2, 2.0), (1, 3, 2, 0.0), (9, 2, 1, 0.0)],
    ids=["spread", "crowded-empty-experts", "one-token", "top-1"],
)
def test_matches_unfused_route_and_reference(n_tok, n_exp, topk, skew):
    x, weights, order, counts, ws, dout = _case(n_tok, n_exp, topk, seed=n_tok, skew=skew)
    fp8 = _experts(ws, FP8RoutedExperts)
    got = _run(fp8, FP8RoutedExperts.routed, x, weights, order, counts, dout)
    unfused = _run(fp8, GroupedExperts.routed, x, weights, order, counts, dout)
    ref = R.fp8_routed_experts_reference(x, weights, order, counts, *ws, dout)
    if skew:
        assert (counts == 0).any()  # an expert without copies
    for name, g, u, r in zip(("out", "dx", "d weights", "dw1", "dw2", "dw3"), got, unfused, ref):
        assert g.shape == u.shape == r.shape and g.dtype == u.dtype == r.dtype, name
        if name.startswith("dw"):
            assert torch.equal(g, u), name  # the same FFN on the same rows
        else:
            assert _rel(g, u) < 1e-6, (name, _rel(g, u))
        assert _rel(g, r) < 1e-3, (name, _rel(g, r))


def test_moe_layer_routes_through_the_fused_op(monkeypatch):
    """MoE.forward -> route_locally -> experts.routed: with float8.fuse_moe_route's class the call runs the fused
    op (not the gather and the FFN), with the same output as the unfused route."""
    from titan_dsv3.models.args import ModelArgs
    from titan_dsv3.models.moe import MoE

    args = ModelArgs(
        dim=DIM, moe_inter_dim=HIDDEN, n_routed_experts=4, n_activated_experts=2, n_shared_experts=1,
        n_expert_groups=1, n_limited_groups=1,
    )  # fmt: skip
    torch.manual_seed(0)
    moe = MoE(args)
    moe.init_weights(0.05)
    moe.experts.__class__ = FP8RoutedExperts
    calls = []
    fused = R.fp8_routed_experts
    monkeypatch.setattr(R, "fp8_routed_experts", lambda *a: calls.append(1) or fused(*a))
    x = torch.randn(2, 5, DIM)
    out = moe(x)
    assert calls == [1]
    monkeypatch.setattr(FP8RoutedExperts, "routed", GroupedExperts.routed)
    torch.testing.assert_close(out, moe(x), rtol=1e-5, atol=1e-6)


def test_traced_by_compile():
    x, weights, order, counts, ws, dout = _case(40, 3, 2, seed=5)
    fp8 = _experts(ws, FP8RoutedExperts)

    def route(m, *a):
        return FP8RoutedExperts.routed(m, *a) * 2

    compiled = torch.compile(route, backend="aot_eager", fullgraph=True)
    got, want = (_run(fp8, f, x, weights, order, counts, dout) for f in (compiled, route))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_opcheck():
    """Schema, fake and autograd registration. (Not opcheck's eager-vs-traced comparison: the saved padded buffers
    hold unwritten rows past the last expert; test_traced_by_compile compares what is read.)"""
    x, weights, order, counts, ws, _ = _case(20, 3, 2, seed=6)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(R._fwd_op, (x, weights, order, counts, *ws), test_utils=tests)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("weights_rows", r"x \(20, 256\) and weights \(19, 2\)"),
        ("order_short", "order torch.int64 \\(39,\\): expected the 40 copies"),
        ("order_float", "order torch.float32"),
        ("counts_short", "counts has 2 experts, the weights 3"),
    ],
)
def test_bad_inputs_get_one_line_errors(bad, match):
    x, weights, order, counts, ws, _ = _case(20, 3, 2, seed=7)
    if bad == "weights_rows":
        weights = weights[:19]
    elif bad == "order_short":
        order = order[:39]
    elif bad == "order_float":
        order = order.float()
    else:
        counts = counts[:2]
    with pytest.raises(ValueError, match=match):
        R.fp8_routed_experts(x, weights, order, counts, *ws)
