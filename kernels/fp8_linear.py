"""A linear in FP8 with one scale a tensor: y = x @ W^T, forward and backward, on torch._scaled_mm.

Built for the output head, bench6's largest GEMM: 102,400 x 2,048 over 16,384 tokens, 20.6 TFLOP a step in its
three GEMMs, about 25 ms of a 160 ms FP8 step on H200 (benchmarks/RESULTS.md, stop 23). torchao's float8 linear on
it made the step slower (0.92x bf16, 15 GiB more peak memory): its eager casts of the 16,384 x 102,400 logits
gradient (3.4 GB in bf16) ran as several passes with fp32 temporaries. Here each operand is quantised by one
Triton pass that writes the fp8 copies its GEMMs need, K-major (the only operand order Hopper's fp8 tensor cores
take):

- forward: x -> e4m3 (T x D) and W -> e4m3 (V x D), scale amax / 448 each; y = x8 @ W8^T with cuBLAS's fast
  accumulation (K = D, as torchao does for forward outputs);
- backward: dy -> fp8 (grad_dtype: e5m2 by default, scale amax / 57,344, the range torchao's tensorwise recipe
  gives gradients; the head's too, see below), written in both layouts by one pass: row-major (T x V) for
  dx = dy @ W (K = V) and transposed (V x T) for dW = dy^T @ x (K = T); both GEMMs accumulate without the fast
  path. x and W are saved as their transposed e4m3 copies (D x T, D x V), the K-major operands of those two
  GEMMs: for the head 200 MB for W and 32 MB for x (bf16 would keep 64 MB of x).

Measured on H100 (RESULTS.md, stop 34; `benchmarks/bench_fp8_head.py`): the head with its compiled loss 23.6 ms
against 32.2 in bf16 (1.36x); its three GEMMs 15.3 ms (1,350 TFLOP/s), the passes 4.1 ms (dy's amax 1.4, the
quantiser 2.7). bench6 end to end in FP8 from 1.105x to 1.156x bf16.

The head's gradient, (softmax - onehot) / tokens, runs e5m2. One step's gradient is held better by e4m3
(`benchmarks/fp8_grad_formats.py`: dx and dW errors about half e5m2's), but e4m3 flushes the smallest
probabilities to zero (up to 99.8% of the entries), and with it bench6's loss after 300 steps came out 1.7% and
3.7% above bf16's; with e5m2 -0.8% on average over three seeds.

Limits: T, D and V multiples of 16 (cuBLAS fp8); x bf16, fp16 or fp32, y and dx in x's dtype, dW in W's dtype; no
bias. Under TRITON_INTERPRET=1 the cast to fp8 is rounded by hand first (the interpreter's cast truncates
subnormals and carries), so the interpreter writes torch's bits. On CPU without it, torch's cast quantises (the
same bits) and the GEMMs run in fp32 on the dequantised operands (see _mm): the interpreter took minutes a step
of the debug model, CPU _scaled_mm 38 s a GEMM.
Legend: T tokens, D in features, V out features (the vocabulary for the head).
"""

import torch
import triton
import triton.language as tl

from titan_dsv3.kernels import require_same_device
from titan_dsv3.kernels.fp8_quant import _EPS, _INTERPRET, FP8_MAX

# (largest finite value, smallest normal, mantissa bits dropped from fp32) of each format
_FORMATS = {
    torch.float8_e4m3fn: (FP8_MAX, 2.0**-6, 20),
    torch.float8_e5m2: (57344.0, 2.0**-14, 21),
}
# 128 x 128 tiles, 8 warps: each transposed row written is 128 contiguous bytes
_BLOCK = dict(BM=128, BN=128)
_LAUNCH = dict(num_warps=8)


# ---- kernel ----------------------------------------------------------------------------------------------------


@triton.jit
def _round_exact(y, MAX: tl.constexpr, MIN_NORMAL: tl.constexpr, DROP: tl.constexpr):
    """Round fp32 y (|y| <= MAX) to the fp8 grid, nearest even, in fp32 arithmetic: the interpreter's own cast is
    wrong for subnormals and when rounding carries. Normals keep 23 - DROP mantissa bits; below MIN_NORMAL the
    grid step is MIN_NORMAL / 2^(23 - DROP), to which adding and taking away 1.5 x MIN_NORMAL x 2^DROP rounds."""
    bits = y.to(tl.int32, bitcast=True)
    normal = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) & -(1 << DROP)
    magic = MIN_NORMAL * 1.5 * (1 << DROP)
    sub = ((tl.abs(y) + magic) - magic).to(tl.int32, bitcast=True) | (bits & -(1 << 31))  # y's sign, -0 too
    r = tl.where(tl.abs(y) < MIN_NORMAL, sub, normal).to(tl.float32, bitcast=True)
    return tl.minimum(tl.maximum(r, -MAX), MAX)


@triton.jit
def _quant_kernel(
    x_ptr, inv_ptr, q_ptr, qt_ptr, M, N,
    MAX: tl.constexpr, MIN_NORMAL: tl.constexpr, DROP: tl.constexpr,
    BOTH: tl.constexpr, EXACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """q = fp8(x * inv) for a BM x BN tile of x (M x N); with BOTH also q^T into qt (N x M). Tiles of one column
    block run one after another, so the transposed rows they write meet in L2."""
    rows, cols, mask = _tile(M, N, BM, BN)
    x = tl.load(x_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # |y| <= MAX: inv = MAX / amax, divided once by torch (the reference's exact division)
    _store_fp8(
        x * tl.load(inv_ptr), q_ptr, qt_ptr, rows, cols, mask, M, N, MAX, MIN_NORMAL, DROP, BOTH, EXACT
    )


@triton.jit
def _tile(M, N, BM: tl.constexpr, BN: tl.constexpr):
    """(rows, cols (int64), in-bounds mask) of this program's BM x BN tile of an M x N matrix, the tiles of one
    column block on consecutive programs."""
    n_m = tl.cdiv(M, BM)
    pid = tl.program_id(0)
    offs_m = (pid % n_m) * BM + tl.arange(0, BM)
    offs_n = (pid // n_m) * BN + tl.arange(0, BN)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    return offs_m.to(tl.int64), offs_n.to(tl.int64), mask


@triton.jit
def _store_fp8(
    y, q_ptr, qt_ptr, rows, cols, mask, M, N,
    MAX: tl.constexpr, MIN_NORMAL: tl.constexpr, DROP: tl.constexpr, BOTH: tl.constexpr, EXACT: tl.constexpr,
):  # fmt: skip
    """Cast the fp32 tile y (|y| <= MAX) to q's fp8 format and store it at (rows, cols) of q (M x N), with BOTH
    also transposed into qt (N x M)."""
    if EXACT:
        y = _round_exact(y, MAX, MIN_NORMAL, DROP)
    # e4m3fn or e5m2, chosen by q's pointer type; on sm_90 a cvt.rn.satfinite
    q = y.to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + rows[:, None] * N + cols[None, :], q, mask=mask)
    if BOTH:
        tl.store(qt_ptr + cols[:, None] * M + rows[None, :], tl.trans(q), mask=tl.trans(mask))


# ---- launchers -------------------------------------------------------------------------------------------------


def _inverse_scale(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(inv, scale): q = x * inv in fp8, x ~ q * scale; one amax pass, no host sync."""
    amax = torch.linalg.vector_norm(x, float("inf")).float().clamp(min=_EPS)
    inv = _FORMATS[dtype][0] / amax
    return inv, inv.reciprocal()


def _torch_path(t: torch.Tensor) -> bool:
    """A CPU tensor without the interpreter: torch quantises and multiplies (see the module docstring)."""
    return t.device.type == "cpu" and not _INTERPRET


def quantise(x: torch.Tensor, dtype: torch.dtype, both: bool = False):
    """x (M x N) -> (q (M x N), q^T (N x M) contiguous or None, scale): one scale for the tensor, amax / MAX."""
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"quantise takes a contiguous 2-D tensor, got shape {tuple(x.shape)}")
    if _torch_path(x):  # torch's cast: the kernel's bits (tests), without Triton
        q, scale = quantise_reference(x, dtype)
        return q, (q.t().contiguous() if both else None), scale
    inv, scale = _inverse_scale(x, dtype)
    q, qt = fp8_tiles(_quant_kernel, x, dtype, both, _LAUNCH, x, inv)
    return q, qt, scale


def fp8_tiles(kernel, src: torch.Tensor, dtype: torch.dtype, both: bool, launch: dict, *args, **consts):
    """Launch a tile kernel that writes an fp8 copy of an M x N result (src's shape) through _store_fp8: kernel(
    *args, q, qt, M, N, MAX, MIN_NORMAL, DROP, BOTH, EXACT, **consts, BM, BN). Returns (q, q^T contiguous or
    None). fp32 sources: the kernels' transposed store of whole fp32 tiles wrote wrong bytes on H100 (Triton 3.6,
    as the weight quantiser's did on H200, RESULTS stop 25); their transposed copy is torch's, a 2-byte pass more."""
    m, n = src.shape
    in_kernel = both and src.dtype != torch.float32
    q = torch.empty(m, n, device=src.device, dtype=dtype)
    qt = torch.empty(n, m, device=src.device, dtype=dtype) if in_kernel else q
    max_, min_normal, drop = _FORMATS[dtype]
    grid = (triton.cdiv(m, _BLOCK["BM"]) * triton.cdiv(n, _BLOCK["BN"]),)
    if grid[0]:
        kernel[grid](
            *args, q, qt, m, n, MAX=max_, MIN_NORMAL=min_normal, DROP=drop, BOTH=in_kernel, EXACT=_INTERPRET,
            **consts, **_BLOCK, **launch,
        )  # fmt: skip
    if not both:
        return q, None
    return q, (qt if in_kernel else q.t().contiguous())


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    require_same_device("x", x, w=w)
    (t, d), (v, dw) = x.shape, w.shape
    if d != dw:
        raise ValueError(f"fp8_linear: x has {d} features, the weight {dw}")
    if t % 16 or d % 16 or v % 16:
        raise ValueError(f"fp8_linear: tokens ({t}), in ({d}) and out features ({v}) must be multiples of 16")


def _mm(a, b, scale_a, scale_b, out_dtype, fast_accum=False):
    """a @ b on fp8 operands (a row-major, b column-major) with one scale each, out in out_dtype. On CPU without the
    interpreter, fp32 matmul of the dequantised operands (each fp8 product is exact in fp32; only the summation
    order differs): CPU torch._scaled_mm took 38 s for one 2,048 x 256 x 2,048 GEMM (torch 2.13)."""
    if _torch_path(a):
        return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)
    return torch._scaled_mm(
        a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=fast_accum
    )


def _linear_fwd(x_TD: torch.Tensor, w_VD: torch.Tensor):
    # the transposed copies are saved, K-major for the backward: x^T (D x T) for dW, W^T (D x V) for dx
    x8, x8t, sx = quantise(x_TD, torch.float8_e4m3fn, both=True)
    w8, w8t, sw = quantise(w_VD, torch.float8_e4m3fn, both=True)
    y_TV = _mm(x8, w8.t(), sx, sw, x_TD.dtype, fast_accum=True)
    return y_TV, x8t, sx, w8t, sw


def _grad_gemms(g8_TV, g8t_VT, sg, x8t_DT, sx, w8t_DV, sw, dx_dtype, w_dtype):
    """(dx = dy @ W, dW = dy^T @ x) from dy's fp8 copies (dy = g8 x sg) and the forward's saved ones."""
    dx_TD = _mm(g8_TV, w8t_DV.t(), sg, sw, dx_dtype)
    dw_VD = _mm(g8t_VT, x8t_DT.t(), sg, sx, w_dtype)
    return dx_TD, dw_VD


def _linear_bwd(dy_TV, x8t_DT, sx, w8t_DV, sw, w_dtype, grad_dtype):
    g8, g8t, sg = quantise(dy_TV.contiguous(), grad_dtype, both=True)
    return _grad_gemms(g8, g8t, sg, x8t_DT, sx, w8t_DV, sw, dy_TV.dtype, w_dtype)


def _fake_saved(x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    """Fakes of what _linear_fwd saves: x^T and W^T in e4m3 with their scales."""
    (t, d), v = x.shape, w.shape[0]
    scale = x.new_empty((), dtype=torch.float32)
    fp8 = torch.float8_e4m3fn
    return [x.new_empty(d, t, dtype=fp8), scale, x.new_empty(d, v, dtype=fp8), scale.clone()]


# ---- custom ops and autograd -----------------------------------------------------------------------------------
# Opaque to torch.compile; no `from __future__ import annotations` here (torch.library reads the annotations).


@torch.library.custom_op("titan_dsv3::fp8_linear_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, w: torch.Tensor, grad_dtype: torch.dtype) -> list[torch.Tensor]:
    return list(_linear_fwd(x, w))  # grad_dtype: for the backward (setup_context keeps it)


@_fwd_op.register_fake
def _(x, w, grad_dtype):
    return [x.new_empty(x.shape[0], w.shape[0]), *_fake_saved(x, w)]


@torch.library.custom_op("titan_dsv3::fp8_linear_bwd", mutates_args=())
def _bwd_op(
    g: torch.Tensor,
    x8t: torch.Tensor,
    sx: torch.Tensor,
    w8t: torch.Tensor,
    sw: torch.Tensor,
    w_dtype: torch.dtype,
    grad_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _linear_bwd(g, x8t, sx, w8t, sw, w_dtype, grad_dtype)


@_bwd_op.register_fake
def _(g, x8t, sx, w8t, sw, w_dtype, grad_dtype):
    return g.new_empty(g.shape[0], x8t.shape[0]), g.new_empty(g.shape[1], x8t.shape[0], dtype=w_dtype)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # the saved copies never get a gradient: no zero-filled ones
    ctx.save_for_backward(*output[1:])
    ctx.w_dtype, ctx.grad_dtype = inputs[1].dtype, inputs[2]


def _backward(ctx, grads):
    if grads[0] is None:
        return None, None, None
    return *_bwd_op(grads[0], *ctx.saved_tensors, ctx.w_dtype, ctx.grad_dtype), None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fp8_linear(
    x_TD: torch.Tensor, w_VD: torch.Tensor, grad_dtype: torch.dtype = torch.float8_e5m2
) -> torch.Tensor:
    """y (T x V) = x @ W^T with e4m3 operands forward and dy in grad_dtype backward; differentiable in both."""
    _check(x_TD, w_VD)
    if grad_dtype not in _FORMATS:
        raise ValueError(f"fp8_linear: grad_dtype {grad_dtype} is not one of {list(_FORMATS)}")
    return _fwd_op(x_TD.contiguous(), w_VD.contiguous(), grad_dtype)[0]


# ---- reference -------------------------------------------------------------------------------------------------


def quantise_reference(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with torch's cast: the bits quantise writes."""
    inv, scale = _inverse_scale(x, dtype)
    fp8_max = _FORMATS[dtype][0]
    return (x.float() * inv).clamp(-fp8_max, fp8_max).to(dtype), scale


def fp8_linear_reference(x_TD, w_VD, dy_TV=None, grad_dtype=torch.float8_e5m2):
    """The same computation in float64 on the dequantised operands: y, or (y, dx, dW) given dy.
    Differs from the op only by the GEMMs' accumulation order and the outputs' rounding."""

    def dq(t, dtype):
        q, scale = quantise_reference(t, dtype)
        return q.double() * scale.double()

    x, w = dq(x_TD, torch.float8_e4m3fn), dq(w_VD, torch.float8_e4m3fn)
    y = (x @ w.T).to(x_TD.dtype)
    if dy_TV is None:
        return y
    g = dq(dy_TV, grad_dtype)
    return y, (g @ w).to(x_TD.dtype), (g.T @ x).to(w_VD.dtype)
