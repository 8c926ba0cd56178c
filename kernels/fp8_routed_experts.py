"""Routed experts in FP8 with the route folded in: out_t = sum_k w_tk * expert_{e_tk}(x_t), forward and backward.

Why: around the FP8 expert FFN, models/moe.route_locally (GroupedExperts.routed) moves every token copy through
memory four more times. On bench6 (T = 16,384 tokens, K = 6 copies each, D = 2,048: an N x D tensor of the
N = 98,304 copies is 403 MB in bf16), per MoE layer:
- forward: the gather x_TD[order // K] writes the copies in expert order (403 MB) for the quantiser to read
  again; the outputs are put back in (token, k) order (index_copy: 403 MB read, 403 written) for the weighted
  sum (bmm);
- backward: the bmm's backward writes the weighted gradient of every copy (403 MB), index_copy's backward
  gathers it into expert order (403 read, 403 written), and the gather's backward scatter-adds dx into the
  tokens (atomic adds of 403 MB into a zero-filled T x D).
The FFN's passes already read their rows through a row map (fp8_grouped_gemm.experts_fwd / experts_bwd), so here:
- forward: the activation quantiser reads each copy's row straight from x (map: the token of padded row p);
  GEMM2 writes y in the padded layout (whole tiles, TMA stores on Hopper); one pass sums each token's K rows,
  out_t = sum_k w_tk y[pad(t, k)], in fp32 with one rounding;
- backward: one pass for the routing weights' gradient, dw_tk = <y[pad(t, k)], dout_t>; the activation quantiser
  forms each copy's gradient w_tk dout_t in fp32 as it reads dout's rows (no N x D tensor); dx in the padded
  layout, then the summing pass with unit weights, dx_t = sum_k dx[pad(t, k)] (no atomics).
About 3.2 GB a layer less traffic (the quantisers' gathered reads now hit the T x D source, 67 MB, K times):
predicted about 1 ms a layer on H100 at ~3 TB/s, 5 ms a bench6 step. Not yet timed. The trainer runs it with
float8.fuse_moe_route (float8.FP8RoutedExperts.routed); benchmarks/bench_routed_experts.py times one layer.

The same numbers as the unfused route on the same FFN, but for three roundings removed: the routed copy's
output gradient is w_tk dout_t in fp32 (the bmm's backward rounded it to bf16), the weighted sum of y and the sum
of dx run in fp32 (bmm with bf16 weights, bf16 atomics). The routing weights are read in their own dtype and get
their gradient in it.
Limits: fp8_grouped_gemm's (dim and hidden multiples of 128); weights (T, K) and order (T K,) as route_locally
builds them: order is the copies (t K + k) sorted by expert, counts the copies an expert, summing to T K (not
checked: a host sync; a copy the counts leave out gets no output and no gradient).
Legend: T tokens, K copies a token, N = T K copies, P padded rows, D dim, I hidden, E experts.
"""

import torch
import triton
import triton.language as tl

from titan_dsv3.kernels import require_same_device
from titan_dsv3.kernels.fp8_grouped_gemm import (
    _check,
    _Layout,
    experts_bwd,
    experts_fwd,
    fp8_grouped_swiglu_reference,
    saved_fakes,
)

_MAP_BLOCK = 1024  # padded rows a program of the map pass
_COMBINE_COLS = 512  # columns a program of the summing pass: (8 rows x 512) fp32 with 4 warps, 32 a thread


# ---- kernels ---------------------------------------------------------------------------------------------------


@triton.jit
def _route_map_kernel(
    row_src_ptr, order_ptr, weights_ptr, tok_ptr, pad_of_ptr, row_w_ptr, n_pad, K, BLOCK: tl.constexpr
):
    """For padded rows [pid * BLOCK, +BLOCK): the copy c = order[row_src[p]] they hold gives tok[p] = c // K,
    row_w[p] = weights[c] (fp32) and pad_of[c] = p; pad rows get tok -1 and weight 0."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = p < n_pad
    n = tl.load(row_src_ptr + p, mask=in_range, other=-1)
    real = n >= 0
    c = tl.load(order_ptr + n, mask=real, other=0).to(tl.int32)
    w = tl.load(weights_ptr + c, mask=real, other=0.0).to(tl.float32)
    tl.store(tok_ptr + p, tl.where(real, c // K, -1), mask=in_range)
    tl.store(row_w_ptr + p, tl.where(real, w, 0.0), mask=in_range)
    tl.store(pad_of_ptr + c, p, mask=real)


@triton.jit
def _token_rows(pad_of_ptr, t, K: tl.constexpr, KB: tl.constexpr):
    """The padded rows of token t's K copies (-1 where a copy has none), and the copies' mask, KB >= K wide."""
    ks = tl.arange(0, KB)
    rows = tl.load(pad_of_ptr + t * K + ks, mask=ks < K, other=-1).to(tl.int64)
    return rows, ks


@triton.jit
def _combine_kernel(
    y_ptr, pad_of_ptr, w_ptr, out_ptr, n_cols,
    K: tl.constexpr, KB: tl.constexpr, BC: tl.constexpr, WEIGHTED: tl.constexpr,
):  # fmt: skip
    """out[t, cols] = sum_k w[t K + k] y[pad_of[t K + k], cols] in fp32 (w = 1 without WEIGHTED); token t =
    program_id(0), column block program_id(1)."""
    t = tl.program_id(0).to(tl.int64)
    rows, ks = _token_rows(pad_of_ptr, t, K, KB)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] >= 0) & (cols[None, :] < n_cols)
    y = tl.load(y_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if WEIGHTED:
        y = y * tl.load(w_ptr + t * K + ks, mask=ks < K, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + t * n_cols + cols, tl.sum(y, 0).to(out_ptr.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _weights_grad_kernel(
    y_ptr, pad_of_ptr, dout_ptr, dw_ptr, n_cols, K: tl.constexpr, KB: tl.constexpr, BC: tl.constexpr
):
    """dw[t K + k] = <y[pad_of[t K + k]], dout[t]> in fp32, token t = program_id(0)."""
    t = tl.program_id(0).to(tl.int64)
    rows, ks = _token_rows(pad_of_ptr, t, K, KB)
    acc = tl.zeros([KB], tl.float32)
    for c0 in range(0, n_cols, BC):
        cols = c0 + tl.arange(0, BC)
        mask = (rows[:, None] >= 0) & (cols[None, :] < n_cols)
        y = tl.load(y_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dout_ptr + t * n_cols + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        acc += tl.sum(y * g[None, :], 1)
    tl.store(dw_ptr + t * K + ks, acc.to(dw_ptr.dtype.element_ty), mask=ks < K)


# ---- launchers -------------------------------------------------------------------------------------------------


def route_maps(lay, order_N: torch.Tensor, weights_TK: torch.Tensor):
    """(tok (P,), pad_of (N,), row_w (P,)): each padded row's token and routing weight, each copy's padded row."""
    n_pad, n, dev = lay.n_pad, order_N.numel(), order_N.device
    tok = torch.empty(n_pad, device=dev, dtype=torch.int32)
    pad_of = torch.full((n,), -1, device=dev, dtype=torch.int32)  # copies the counts leave out stay -1
    row_w = torch.empty(n_pad, device=dev, dtype=torch.float32)
    _route_map_kernel[(triton.cdiv(n_pad, _MAP_BLOCK),)](
        lay.row_src, order_N, weights_TK, tok, pad_of, row_w, n_pad, weights_TK.shape[1], BLOCK=_MAP_BLOCK
    )
    return tok, pad_of, row_w


def combine(y_PD: torch.Tensor, pad_of_N: torch.Tensor, weights_TK: torch.Tensor | None, topk: int, dtype):
    """(T, D) in dtype: each token's K rows of y summed, weighted by weights_TK when given."""
    n_cols, n_tok = y_PD.shape[1], pad_of_N.numel() // topk
    out = torch.empty(n_tok, n_cols, device=y_PD.device, dtype=dtype)
    if n_tok:
        grid = (n_tok, triton.cdiv(n_cols, _COMBINE_COLS))
        _combine_kernel[grid](
            y_PD, pad_of_N, pad_of_N if weights_TK is None else weights_TK, out, n_cols, K=topk,
            KB=triton.next_power_of_2(topk), BC=_COMBINE_COLS, WEIGHTED=weights_TK is not None, num_warps=4,
        )  # fmt: skip
    return out


def weights_grad(y_PD: torch.Tensor, pad_of_N: torch.Tensor, dout_TD: torch.Tensor, topk: int, dtype):
    """(T, K) in dtype: <y of copy (t, k), dout_t>."""
    n_tok = dout_TD.shape[0]
    dw = torch.empty(n_tok, topk, device=dout_TD.device, dtype=dtype)
    if n_tok:
        _weights_grad_kernel[(n_tok,)](
            y_PD, pad_of_N, dout_TD, dw, dout_TD.shape[1], K=topk, KB=triton.next_power_of_2(topk),
            BC=_COMBINE_COLS, num_warps=4,
        )  # fmt: skip
    return dw


def _routed_fwd(x, weights, order, counts_E, w1, w2, w3):
    """Launcher: out (T, D) and what the backward needs."""
    n_tok, topk = weights.shape
    lay = _Layout(counts_E, n_tok * topk)
    tok, pad_of, row_w = route_maps(lay, order, weights)
    y = torch.empty(lay.n_pad, x.shape[1], device=x.device, dtype=x.dtype)
    saved = experts_fwd(x, lay, tok, w1, w2, w3, y, lay.identity)
    out = combine(y, pad_of, weights, topk, x.dtype)
    return out, lay.packed, tok, pad_of, row_w, y, *saved


def _routed_bwd(dout, packed, tok, pad_of, row_w, y, xqt, xst, h13, w13tq, w13s, w2tq, w2s, topk, w_dtypes):
    """Launcher: dx (T, D), d weights (T, K), dw1, dw2, dw3."""
    dout = dout.contiguous()
    lay = _Layout.from_packed(packed, w2tq.shape[0], pad_of.numel())
    d_weights = weights_grad(y, pad_of, dout, topk, w_dtypes[0])
    dx_PD = torch.empty(lay.n_pad, dout.shape[1], device=dout.device, dtype=dout.dtype)
    saved = (xqt, xst, h13, w13tq, w13s, w2tq, w2s)
    dws = experts_bwd(dout, lay, tok, row_w, *saved, w_dtypes[1], dx_PD, lay.identity)
    return combine(dx_PD, pad_of, None, topk, dout.dtype), d_weights, *dws


# ---- custom ops and autograd -----------------------------------------------------------------------------------
# Opaque to torch.compile; no `from __future__ import annotations` here (torch.library reads the annotations).


@torch.library.custom_op("titan_dsv3::fp8_routed_experts_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, counts_E: torch.Tensor, w1: torch.Tensor,
    w2: torch.Tensor, w3: torch.Tensor,
) -> list[torch.Tensor]:  # fmt: skip
    return list(_routed_fwd(x, weights, order, counts_E, w1, w2, w3))


@_fwd_op.register_fake
def _(x, weights, order, counts_E, w1, w2, w3):
    n = order.numel()
    packed, *saved = saved_fakes(x, n, w1)
    n_pad = saved[1].shape[0] * 128  # xst: (P / 128, D)

    def i32(*s):
        return x.new_empty(*s, dtype=torch.int32)

    row_w, y = x.new_empty(n_pad, dtype=torch.float32), x.new_empty(n_pad, x.shape[1])
    return [x.new_empty(x.shape), packed, i32(n_pad), i32(n), row_w, y, *saved]


@torch.library.custom_op("titan_dsv3::fp8_routed_experts_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor, packed: torch.Tensor, tok: torch.Tensor, pad_of: torch.Tensor, row_w: torch.Tensor,
    y: torch.Tensor, xqt: torch.Tensor, xst: torch.Tensor, h13: torch.Tensor, w13tq: torch.Tensor,
    w13s: torch.Tensor, w2tq: torch.Tensor, w2s: torch.Tensor, topk: int, weights_dtype: torch.dtype,
    w_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    saved = (xqt, xst, h13, w13tq, w13s, w2tq, w2s)
    return _routed_bwd(dout, packed, tok, pad_of, row_w, y, *saved, topk, (weights_dtype, w_dtype))


@_bwd_op.register_fake
def _(dout, packed, tok, pad_of, row_w, y, xqt, xst, h13, w13tq, w13s, w2tq, w2s, topk, weights_dtype, w_dtype):  # fmt: skip
    n_exp, hidden, dim = w2tq.shape
    dw13 = [dout.new_empty(n_exp, hidden, dim, dtype=w_dtype) for _ in range(2)]
    dw2 = dout.new_empty(n_exp, dim, hidden, dtype=w_dtype)
    return (
        dout.new_empty(dout.shape),
        dout.new_empty(dout.shape[0], topk, dtype=weights_dtype),
        dw13[0],
        dw2,
        dw13[1],
    )


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    # the saved outputs never get a gradient: no zero-filled ones (fp8_grouped_gemm: 700 MB of fills)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[1:])
    ctx.topk, ctx.weights_dtype, ctx.w_dtype = inputs[1].shape[1], inputs[1].dtype, inputs[4].dtype


def _backward(ctx, grads):
    if grads[0] is None:
        return (None,) * 7
    dx, d_weights, *dws = _bwd_op(grads[0], *ctx.saved_tensors, ctx.topk, ctx.weights_dtype, ctx.w_dtype)
    return dx, d_weights, None, None, *dws


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fp8_routed_experts(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    order_N: torch.Tensor,
    counts_E: torch.Tensor,
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
) -> torch.Tensor:
    """sum_k weights[t, k] * expert(copy t K + k)(x_t) for every token t, the experts in FP8 (fp8_grouped_swiglu's
    math); order_N lists the copies sorted by expert, counts_E the copies of each. Differentiable in x, the
    routing weights and the three expert weights."""
    if x_TD.dim() != 2 or weights_TK.dim() != 2 or weights_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(
            f"fp8_routed_experts: x {tuple(x_TD.shape)} and weights {tuple(weights_TK.shape)}: expected (T, D) "
            "and (T, K)"
        )
    if order_N.shape != (weights_TK.numel(),) or order_N.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"fp8_routed_experts: order {order_N.dtype} {tuple(order_N.shape)}: expected the {weights_TK.numel()} "
            "copies' indices (int32 or int64), sorted by expert"
        )
    _check(x_TD, counts_E, w1_EID, w2_EDI, w3_EID, n_rows=order_N.numel())
    require_same_device("x", x_TD, weights=weights_TK, order=order_N)
    args = (x_TD, weights_TK, order_N, counts_E, w1_EID, w2_EDI, w3_EID)
    return _fwd_op(*(t.contiguous() for t in args))[0]


# ---- reference -------------------------------------------------------------------------------------------------


def fp8_routed_experts_reference(x_TD, weights_TK, order_N, counts_E, w1_EID, w2_EDI, w3_EID, dout_TD=None):
    """The same in dequantised fp32 torch math (fp8_grouped_swiglu_reference on the copies in expert order): out,
    or (out, dx, d weights, dw1, dw2, dw3) when dout is given."""
    topk = weights_TK.shape[1]
    tok_N = order_N // topk
    w_N = weights_TK.flatten()[order_N].float()[:, None]
    x_N = x_TD[tok_N]

    def per_token(rows_N):
        return torch.zeros(x_TD.shape, device=x_TD.device).index_add_(0, tok_N, rows_N.float())

    if dout_TD is None:
        y = fp8_grouped_swiglu_reference(x_N, counts_E, w1_EID, w2_EDI, w3_EID)
        return per_token(y * w_N).to(x_TD.dtype)
    g_N = dout_TD[tok_N].float()
    y, dx, dw1, dw2, dw3 = fp8_grouped_swiglu_reference(x_N, counts_E, w1_EID, w2_EDI, w3_EID, g_N * w_N)
    d_weights = torch.empty(weights_TK.numel(), device=x_TD.device)
    d_weights.index_copy_(0, order_N, (y.float() * g_N).sum(1))
    out, dx = per_token(y.float() * w_N).to(x_TD.dtype), per_token(dx).to(x_TD.dtype)
    return out, dx, d_weights.view_as(weights_TK).to(weights_TK.dtype), dw1, dw2, dw3
