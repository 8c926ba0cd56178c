"""The output head fused with its cross-entropy in FP8: sum over tokens of CE(x @ W^T, labels), forward and backward.

Why: with the head on kernels/fp8_linear.py and the loss compiled apart (float8.output_head), bench6's head spends
about 8.3 ms a step in passes over its 16,384 x 102,400 logits (H100, benchmarks/RESULTS.md stop 34): the loss's
forward (2.2 ms) and backward (2.4, writing a 3.4 GB bf16 gradient), the gradient's amax (1.4) and its quantiser
(about 2.3 of 2.7). Here:
- forward: x and W to e4m3 and logits = x8 @ W8^T in x's dtype, as fp8_linear does; then one pass over the
  logits, a program a row: the row's logsumexp (lse) and its loss, lse - the target's logit (0 where the label is
  IGNORE_INDEX);
- backward, given dsum (the loss sum's gradient): one pass reads each 128 x 128 tile of logits and writes the
  gradient dsum x (softmax - onehot) straight to e5m2, in both layouts the two GEMMs take (as fp8_linear's
  quantiser writes them). |softmax - onehot| <= 1, so the scale is fixed: the tile is multiplied by e5m2's
  largest value and dsum goes into the GEMMs' scale. No amax pass and no bf16 gradient.
The same format as float8.output_head's gradient (e5m2: with e4m3 bench6's loss drifted 1.7-3.7% above bf16's).
Predicted on H100: 3.4 GB read (about 1.1 ms) and 3.4 GB read + 3.4 GB written (about 2.0 ms) in place of
8.3 ms, the head with its loss from 23.6 to about 18.5 ms, bench6 in FP8 from 1.156x to about 1.19x bf16; and
3.4 GB less at the peak (no bf16 gradient beside its fp8 copies). Not yet timed (`benchmarks/bench_fp8_head.py`
has the row). float8.fuse_head_loss runs it: the head (float8.FP8FusedHead) hands the loss its input and weight
(optim/losses.HeadInput) in place of logits.

Limits: fp8_linear's (T, D, V multiples of 16; no bias); labels int64 (T,), each in [0, V) or IGNORE_INDEX (not
checked on the device: that would cost a host sync). dx in x's dtype, dW in W's dtype.
Legend: T tokens, D model dim, V vocabulary.
"""

import torch
import triton
import triton.language as tl

from titan_dsv3.kernels import require_same_device
from titan_dsv3.kernels.fp8_linear import (
    _FORMATS,
    _check,
    _fake_saved,
    _grad_gemms,
    _linear_fwd,
    _store_fp8,
    _tile,
    _torch_path,
    fp8_tiles,
    quantise_reference,
)

IGNORE_INDEX = -100  # titan_dsv3.optim.losses.IGNORE_INDEX (kernels do not import the trainer)
GRAD_DTYPE = torch.float8_e5m2
_ROW_BLOCK = 2048  # logits a step of the row pass: 50 steps a bench6 row
# The gradient pass: fp8_linear's 128 x 128 tiles with 16 warps. Compiled for sm_90 (benchmarks/
# compile_kernels_sm90.py) it holds the fp32 tile and its softmax terms in 99 registers with Triton 3.6 (the GPU
# machines'), 90 with 3.9: one block of 16 warps an SM; with 8 warps 200 (3.6) left one block of 8.
_GRAD_LAUNCH = dict(num_warps=16)


# ---- kernels ---------------------------------------------------------------------------------------------------


@triton.jit
def _row_loss_kernel(z_ptr, labels_ptr, lse_ptr, loss_ptr, V, IGNORE: tl.constexpr, BV: tl.constexpr):
    """lse and loss of one row of the logits z (T x V), by an online logsumexp over BV-wide steps, lane-wise."""
    row = tl.program_id(0).to(tl.int64)
    m = tl.full([BV], -1e30, tl.float32)  # finite: masked lanes (-inf) then add exp(-inf) = 0, never a NaN
    s = tl.zeros([BV], tl.float32)
    for start in range(0, V, BV):
        offs = start + tl.arange(0, BV)
        z = tl.load(z_ptr + row * V + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    top = tl.max(m, 0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), 0))
    label = tl.load(labels_ptr + row)
    valid = label != IGNORE
    target = tl.load(z_ptr + row * V + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))


@triton.jit
def _grad_kernel(
    z_ptr, lse_ptr, labels_ptr, q_ptr, qt_ptr, M, N,
    IGNORE: tl.constexpr, MAX: tl.constexpr, MIN_NORMAL: tl.constexpr, DROP: tl.constexpr,
    BOTH: tl.constexpr, EXACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """MAX x (softmax - onehot) of a BM x BN tile of the logits z (M x N) to fp8, row-major into q and with BOTH
    transposed into qt; rows whose label is IGNORE are zeros. Tiles in fp8_linear._quant_kernel's order."""
    rows, cols, mask = _tile(M, N, BM, BN)
    z = tl.load(z_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=rows < M, other=0.0)
    label = tl.load(labels_ptr + rows, mask=rows < M, other=IGNORE)
    g = tl.exp(z - lse[:, None]) - (cols[None, :] == label[:, None]).to(tl.float32)
    g = tl.where((label != IGNORE)[:, None], g, 0.0)
    _store_fp8(g * MAX, q_ptr, qt_ptr, rows, cols, mask, M, N, MAX, MIN_NORMAL, DROP, BOTH, EXACT)


# ---- launchers -------------------------------------------------------------------------------------------------


def row_losses(z_TV: torch.Tensor, labels_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse (T,), loss (T,)) in fp32 of the logits z: loss = lse - z[label], 0 where the label is IGNORE_INDEX."""
    t, v = z_TV.shape
    if _torch_path(z_TV):
        return _row_losses_torch(z_TV.float(), labels_T)
    lse = torch.empty(t, device=z_TV.device, dtype=torch.float32)
    loss = torch.empty_like(lse)
    if t:
        _row_loss_kernel[(t,)](z_TV, labels_T, lse, loss, v, IGNORE=IGNORE_INDEX, BV=_ROW_BLOCK, num_warps=8)
    return lse, loss


def softmax_grad_fp8(z_TV: torch.Tensor, lse_T: torch.Tensor, labels_T: torch.Tensor):
    """(g8 (T x V), g8t (V x T)): e5m2 copies of MAX x (softmax - onehot), dequantised by 1 / MAX."""
    if _torch_path(z_TV):
        g8 = (_softmax_grad_torch(z_TV.float(), lse_T, labels_T) * _FORMATS[GRAD_DTYPE][0]).to(GRAD_DTYPE)
        return g8, g8.t().contiguous()
    return fp8_tiles(
        _grad_kernel, z_TV, GRAD_DTYPE, True, _GRAD_LAUNCH, z_TV, lse_T, labels_T, IGNORE=IGNORE_INDEX
    )


def _row_losses_torch(z_TV: torch.Tensor, labels_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """row_losses in torch, in z's dtype (the CPU path in fp32, the reference in float64)."""
    lse = torch.logsumexp(z_TV, dim=1)
    valid = labels_T != IGNORE_INDEX
    target = z_TV.gather(1, torch.where(valid, labels_T, 0)[:, None])[:, 0]
    return lse, torch.where(valid, lse - target, 0.0)


def _softmax_grad_torch(z_TV: torch.Tensor, lse_T: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
    """softmax - onehot in z's dtype, zero rows where the label is IGNORE_INDEX."""
    g = torch.exp(z_TV - lse_T[:, None])
    valid = labels_T != IGNORE_INDEX
    g[valid, labels_T[valid]] -= 1.0
    g[~valid] = 0.0
    return g


# ---- custom ops and autograd -----------------------------------------------------------------------------------
# Opaque to torch.compile; no `from __future__ import annotations` here (torch.library reads the annotations).


@torch.library.custom_op("titan_dsv3::fp8_head_ce_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    z, x8t, sx, w8t, sw = _linear_fwd(x, w)
    lse, loss = row_losses(z, labels)
    return [loss.sum(), z, lse, x8t, sx, w8t, sw]


@_fwd_op.register_fake
def _(x, w, labels):
    t, v = x.shape[0], w.shape[0]
    loss = x.new_empty((), dtype=torch.float32)
    return [loss, x.new_empty(t, v), x.new_empty(t, dtype=torch.float32), *_fake_saved(x, w)]


@torch.library.custom_op("titan_dsv3::fp8_head_ce_bwd", mutates_args=())
def _bwd_op(
    dsum: torch.Tensor,
    z: torch.Tensor,
    lse: torch.Tensor,
    labels: torch.Tensor,
    x8t: torch.Tensor,
    sx: torch.Tensor,
    w8t: torch.Tensor,
    sw: torch.Tensor,
    w_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    g8, g8t = softmax_grad_fp8(z, lse, labels)
    sg = dsum.float() / _FORMATS[GRAD_DTYPE][0]  # the gradient = g8 x sg
    return _grad_gemms(g8, g8t, sg, x8t, sx, w8t, sw, z.dtype, w_dtype)


@_bwd_op.register_fake
def _(dsum, z, lse, labels, x8t, sx, w8t, sw, w_dtype):
    return z.new_empty(z.shape[0], x8t.shape[0]), z.new_empty(z.shape[1], x8t.shape[0], dtype=w_dtype)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], output[2], inputs[2], *output[3:])
    ctx.w_dtype = inputs[1].dtype


def _backward(ctx, grads):
    if grads[0] is None:
        return None, None, None
    return *_bwd_op(grads[0], *ctx.saved_tensors, ctx.w_dtype), None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fp8_head_cross_entropy(x_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of cross-entropy(x @ W^T, labels) in fp32 (IGNORE_INDEX labels count 0), the head's GEMMs in
    FP8 (e4m3 operands, e5m2 gradient); differentiable in x and W."""
    _check(x_TD, w_VD)
    require_same_device("x", x_TD, labels=labels_T)
    if labels_T.shape != (x_TD.shape[0],) or labels_T.dtype != torch.int64:
        raise ValueError(f"fp8_head_cross_entropy: labels must be int64 of shape ({x_TD.shape[0]},), got "
                         f"{labels_T.dtype} {tuple(labels_T.shape)}")  # fmt: skip
    return _fwd_op(x_TD.contiguous(), w_VD.contiguous(), labels_T.contiguous())[0]


# ---- reference -------------------------------------------------------------------------------------------------


def head_cross_entropy_reference(x_TD, w_VD, labels_T, dsum=1.0):
    """(loss sum, dx, dW) in float64 on the dequantised operands, the logits rounded to x's dtype as the op's are,
    the gradient dsum x (softmax - onehot) quantised with the op's fixed scale."""

    def dq(t):
        q, scale = quantise_reference(t, torch.float8_e4m3fn)
        return q.double() * scale.double()

    x, w = dq(x_TD), dq(w_VD)
    z = (x @ w.T).to(x_TD.dtype).double()
    lse, loss = _row_losses_torch(z, labels_T)
    max_ = _FORMATS[GRAD_DTYPE][0]
    g = (_softmax_grad_torch(z, lse, labels_T) * max_).float().to(GRAD_DTYPE).double() * (dsum / max_)
    return loss.sum(), (g @ w).to(x_TD.dtype), (g.T @ x).to(w_VD.dtype)
