"""The FP8 expert FFN's quantisation passes (Triton): DeepSeek-V3's e4m3 scaling of activations per 1x128 tile
(and per 128x1 for the weight gradients' token contraction), of weights per 128x128 block, and the SwiGLU
forward and backward fused with the quantisations of their outputs. Memory-bound; kernels/fp8_grouped_gemm.py
runs them around its GEMMs, in its padded layout (each expert's rows padded to a multiple of 128).

Measured alone on bench6's shapes (H200, 2026-12-01, benchmarks/RESULTS.md, stop 22): the SwiGLU backward 0.80 ms
(1.9 TB/s), the activation quantiser 0.289 ms (2.8 TB/s), the SwiGLU forward 0.18 ms (3.9 TB/s), the weight
quantiser 0.213 ms per weight (3.5 TB/s) as one kernel; as two (stop 25: the one kernel wrote wrong transposed
bytes from fp32 weights) 0.292 ms. On Hopper the FFN runs Gluon versions of all but the SwiGLU forward
(fp8_quant_sm90.py). Persistent grids whose loops copy the next tile into shared memory
(cp.async) while this one is computed measured slower (SwiGLU backward 1.035 ms, activation quantiser 0.378 ms;
stop 23) and were removed.

Under TRITON_INTERPRET=1 the fp32 -> e4m3 cast is rounded by hand first (the interpreter's own cast is wrong when
rounding carries into the exponent) and e4m3 subnormals (< 2^-6 after scaling) are flushed to zero. The torch
references (_qdq_*) quantise and dequantise with torch's cast.
Legend: P padded rows, I hidden, E experts; scales: `s` row-wise (P, C/128), `st` token-wise (P/128, C).
"""

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FP8_MAX = 448.0  # largest finite e4m3fn value
TILE = 128  # scaling granularity and row-tile size
_EPS = 1e-12  # amax floor: an all-zero tile gets a tiny scale and quantises to zeros
# Warps of the passes, timed alone on bench6's shapes (H200, 2026-12-01, `bench_kernels.py --passes`, after the cast
# lost its clamp and its per-element division): SwiGLU backward 1.98 / 0.797 / 0.908 ms with 4 / 8 / 16 warps (255
# registers a thread with 8: one CTA an SM; 128 with 16); activation quantiser 0.289 / 0.318 / 0.389; weight
# quantiser 0.213 / 0.270 / 0.264 (with 8 warps it now takes 129 registers, one CTA an SM where 128 allowed two;
# with 4, 255 and an 8 B spill, yet the fastest). Register caps that fit more CTAs an SM bought nothing (stop 23:
# weight 0.211 with 16 warps at 64 registers, activation 0.300 with 8 at 80, SwiGLU backward 1.133 with 8 at 128).
_BWD_LAUNCH = dict(num_warps=8)  # launch options of each pass
_ACT_LAUNCH = dict(num_warps=4)
_WEIGHT_LAUNCH = dict(num_warps=4)
_FP8_MAX_C = tl.constexpr(FP8_MAX)  # the same two, as the kernels see them
_EPS_C = tl.constexpr(_EPS)


@triton.jit
def _to_e4m3(x, scale, EXACT: tl.constexpr):
    """x / scale -> e4m3, round to nearest even (scale broadcasts against x; |x| / scale <= 448 up to rounding)."""
    if EXACT:
        # the interpreter: exact division, then 3 mantissa bits kept by integer rounding (its cast has nothing left
        # to round)
        x = tl.minimum(tl.maximum(x / scale, -_FP8_MAX_C), _FP8_MAX_C)
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 = 0xFFF00000
        x = tl.where(tl.abs(x) < 0.015625, 0.0, bits.to(tl.float32, bitcast=True))
    else:
        # one multiply an element: the reciprocal is taken once a row (or column) of scales, where x / scale
        # (div.full.f32) cost its range checks and scaling for every element. No clamp: the cast is
        # cvt.rn.satfinite, which saturates at +-448 and keeps NaN a NaN (the clamp had turned NaN into -448).
        # Together (sm_90, Triton 3.6, SASS instructions a thread at the same warps): SwiGLU backward 5,688 ->
        # 4,424, activation quantiser 3,112 -> 2,008, weight quantiser 1,248 -> 744.
        x = x * (1.0 / scale)
    return x.to(tl.float8e4nv)


@triton.jit
def _quant_rows(x, EXACT: tl.constexpr):
    """(R, 128) fp32 -> e4m3 with one scale per row (dequantised value = q * scale)."""
    scale = tl.maximum(tl.max(tl.abs(x), 1), _EPS_C) / _FP8_MAX_C
    return _to_e4m3(x, scale[:, None], EXACT), scale


@triton.jit
def _quant_cols(x, EXACT: tl.constexpr):
    """(128, C) fp32 -> e4m3 with one scale per column."""
    scale = tl.maximum(tl.max(tl.abs(x), 0), _EPS_C) / _FP8_MAX_C
    return _to_e4m3(x, scale[None, :], EXACT), scale


@triton.jit
def _store_both(
    x, q_ptr, s_ptr, qt_ptr, st_ptr, offs_p, offs_c, cb, tile, n_pad, n_cols, EXACT: tl.constexpr
):
    """Quantise the (128 rows, 128 cols) tile of column block cb twice: row-scaled into q (P, cols) and
    s (P, cols/128), and column-scaled transposed into qt (cols, P) and st (P/128, cols)."""
    q, s = _quant_rows(x, EXACT)
    tl.store(q_ptr + offs_p[:, None] * n_cols + offs_c[None, :], q)
    tl.store(s_ptr + offs_p * (n_cols // 128) + cb, s)
    qt, st = _quant_cols(x, EXACT)
    tl.store(qt_ptr + offs_c[None, :].to(tl.int64) * n_pad + offs_p[:, None], qt)  # (2I x P can pass 2^31)
    tl.store(st_ptr + tile * n_cols + offs_c, st)


# fmt: off
@triton.jit
def _quant_act_tile(
    x_ptr, row_src_ptr, row_w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, tile, cb, n_pad, n_cols, EXACT: tl.constexpr,
    WEIGHTED: tl.constexpr,
):
    """Gather the rows of 128-row padded tile `tile`, column block cb (zeros for pad rows), with WEIGHTED each
    multiplied by its fp32 row weight row_w[p], and quantise both ways."""
    offs_p = (tile * 128 + tl.arange(0, 128)).to(tl.int64)
    offs_c = cb * 128 + tl.arange(0, 128)
    src = tl.load(row_src_ptr + offs_p).to(tl.int64)
    x = tl.load(x_ptr + src[:, None] * n_cols + offs_c[None, :], mask=src[:, None] >= 0, other=0.0).to(tl.float32)
    if WEIGHTED:
        x = x * tl.load(row_w_ptr + offs_p)[:, None]
    _store_both(x, q_ptr, s_ptr, qt_ptr, st_ptr, offs_p, offs_c, cb, tile, n_pad, n_cols, EXACT)


@triton.jit(do_not_specialize=["n_experts"])
def _quant_act_kernel(
    x_ptr, row_src_ptr, row_w_ptr, tile_expert_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, n_pad, n_cols, n_experts,
    EXACT: tl.constexpr, WEIGHTED: tl.constexpr = False,
):
    """_quant_act_tile of tile (program_id(0), program_id(1)); tiles past the last expert return at once."""
    tile = tl.program_id(0)
    if tl.load(tile_expert_ptr + tile) >= n_experts:
        return  # beyond the last expert's padded rows
    _quant_act_tile(
        x_ptr, row_src_ptr, row_w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, tile, tl.program_id(1), n_pad, n_cols, EXACT,
        WEIGHTED,
    )


@triton.jit
def _weight_block(w_ptr, n_rows, n_cols, EXACT: tl.constexpr):
    """Block (program_id(1), program_id(2)) of expert program_id(0)'s w (E, R, C) -> e4m3 with one scale:
    (expert, its rows, its columns, the block, the scale)."""
    e = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * 128 + tl.arange(0, 128)
    offs_c = tl.program_id(2) * 128 + tl.arange(0, 128)
    w = tl.load(w_ptr + e * n_rows * n_cols + offs_r[:, None] * n_cols + offs_c[None, :]).to(tl.float32)
    scale = tl.maximum(tl.max(tl.max(tl.abs(w), 1), 0), _EPS_C) / _FP8_MAX_C
    return e, offs_r, offs_c, _to_e4m3(w, scale, EXACT), scale


@triton.jit
def _quant_weight_kernel(w_ptr, q_ptr, s_ptr, n_rows, n_cols, rows_total, row_off, EXACT: tl.constexpr):
    """One 128x128 block of w (E, R, C) -> q (E, R_total, C) at row_off and its scale s (E, R_total/128, C/128)."""
    e, offs_r, offs_c, q, scale = _weight_block(w_ptr, n_rows, n_cols, EXACT)
    rows = row_off + offs_r
    tl.store(q_ptr + e * rows_total * n_cols + rows[:, None] * n_cols + offs_c[None, :], q)
    row_block = row_off // 128 + tl.program_id(1)
    tl.store(s_ptr + (e * (rows_total // 128) + row_block) * (n_cols // 128) + tl.program_id(2), scale)


@triton.jit
def _quant_weight_t_kernel(w_ptr, qt_ptr, n_rows, n_cols, rows_total, row_off, EXACT: tl.constexpr):
    """The same block transposed into qt (E, C, R_total). Its own kernel: with both stores of one block in one
    kernel, Triton 3.6 for sm_90 wrote wrong and missing qt bytes from fp32 weights (bf16 ones were right;
    H200, stop 25)."""
    e, offs_r, offs_c, q, _ = _weight_block(w_ptr, n_rows, n_cols, EXACT)
    rows = row_off + offs_r
    tl.store(qt_ptr + e * rows_total * n_cols + offs_c[None, :] * rows_total + rows[:, None], q)
# fmt: on


@triton.jit
def _store_swiglu_q(h1, h3, hq_ptr, hs_ptr, offs_m, nb, HIDDEN, EXACT: tl.constexpr):
    """h = silu(h1) * h3 of rows offs_m, hidden block nb (128 wide), row-quantised into hq (P, I) and hs
    (P, I/128). h1, h3 are the values as stored for the backward (x's dtype), which recomputes h the same way."""
    hq, hs = _quant_rows(h1 * tl.sigmoid(h1) * h3, EXACT)
    tl.store(hq_ptr + offs_m[:, None] * HIDDEN + nb * 128 + tl.arange(0, 128)[None, :], hq)
    tl.store(hs_ptr + offs_m * (HIDDEN // 128) + nb, hs)


# fmt: off
@triton.jit(do_not_specialize=["n_experts"])
def _swiglu_quant_kernel(h13_ptr, tile_expert_ptr, hq_ptr, hs_ptr, n_experts, HIDDEN, EXACT: tl.constexpr):
    """h = silu(h1) * h3 row-quantised for one (128-row, 128-hidden) tile of the stored h1 | h3 (P, 2I): the
    forward's SwiGLU where GEMM1 is a plain GEMM (Hopper)."""
    tile = tl.program_id(1)
    if tl.load(tile_expert_ptr + tile) >= n_experts:
        return
    offs_m = (tile * 128 + tl.arange(0, 128)).to(tl.int64)
    offs_n = tl.program_id(0) * 128 + tl.arange(0, 128)
    h13_ptrs = h13_ptr + offs_m[:, None] * (2 * HIDDEN) + offs_n[None, :]
    h1 = tl.load(h13_ptrs).to(tl.float32)
    h3 = tl.load(h13_ptrs + HIDDEN).to(tl.float32)
    _store_swiglu_q(h1, h3, hq_ptr, hs_ptr, offs_m, tl.program_id(0), HIDDEN, EXACT)


@triton.jit
def _swiglu_bwd_tile(
    dh_ptr, h13_ptr, gq_ptr, gs_ptr, gqt_ptr, gst_ptr, hqt_ptr, hst_ptr, tile, cb, n_pad, HIDDEN,
    EXACT: tl.constexpr,
):
    """SwiGLU backward of one (128-row, 128-hidden) tile (row tile `tile`, hidden block cb) from dh = dy @ w2 (P, I;
    dy's dtype) and the stored h1, h3: dh1, dh3 quantised row-wise into (P, 2I) and column-wise transposed into
    (2I, P); h = silu(h1) * h3 recomputed and column-quantised transposed into (I, P) for the w2 gradient."""
    offs_m = (tile * 128 + tl.arange(0, 128)).to(tl.int64)
    offs_n = cb * 128 + tl.arange(0, 128)
    dh = tl.load(dh_ptr + offs_m[:, None] * HIDDEN + offs_n[None, :]).to(tl.float32)
    h13_ptrs = h13_ptr + offs_m[:, None] * (2 * HIDDEN) + offs_n[None, :]
    h1 = tl.load(h13_ptrs).to(tl.float32)
    h3 = tl.load(h13_ptrs + HIDDEN).to(tl.float32)
    sig = tl.sigmoid(h1)
    # the three outputs first, so that only they (not dh, h1, h3 and sig as well) live through the quantisations
    dh1 = dh * h3 * sig * (1.0 + h1 * (1.0 - sig))
    dh3 = dh * h1 * sig
    h = h1 * sig * h3
    hqt, hst = _quant_cols(h, EXACT)
    tl.store(hqt_ptr + offs_n[None, :].to(tl.int64) * n_pad + offs_m[:, None], hqt)
    tl.store(hst_ptr + tile * HIDDEN + offs_n, hst)
    _store_both(dh1, gq_ptr, gs_ptr, gqt_ptr, gst_ptr, offs_m, offs_n, cb, tile, n_pad, 2 * HIDDEN, EXACT)
    _store_both(
        dh3, gq_ptr, gs_ptr, gqt_ptr, gst_ptr, offs_m, offs_n + HIDDEN, cb + HIDDEN // 128, tile, n_pad,
        2 * HIDDEN, EXACT,
    )


@triton.jit(do_not_specialize=["n_experts"])
def _swiglu_bwd_quant_kernel(
    dh_ptr, h13_ptr, tile_expert_ptr, gq_ptr, gs_ptr, gqt_ptr, gst_ptr, hqt_ptr, hst_ptr, n_pad, n_experts,
    HIDDEN, EXACT: tl.constexpr,
):
    """_swiglu_bwd_tile of tile (program_id(1), program_id(0)); tiles past the last expert return at once."""
    tile = tl.program_id(1)
    if tl.load(tile_expert_ptr + tile) >= n_experts:
        return
    _swiglu_bwd_tile(
        dh_ptr, h13_ptr, gq_ptr, gs_ptr, gqt_ptr, gst_ptr, hqt_ptr, hst_ptr, tile, tl.program_id(0), n_pad, HIDDEN,
        EXACT,
    )
# fmt: on


# ---- launchers -----------------------------------------------------------------------------------------------
# `lay` is fp8_grouped_gemm._Layout: n_pad, n_exp, row_src (P,), tile_expert (P/128,)


def _fp8_empty(*shape, device):
    return torch.empty(*shape, device=device, dtype=torch.float8_e4m3fn)


def _f32_empty(*shape, device):
    return torch.empty(*shape, device=device, dtype=torch.float32)


def _both_ways_empty(n_pad: int, n_cols: int, device):
    """The outputs of a pass that quantises (P, C) both ways: q (P, C), s (P, C/128), qt (C, P), st (P/128, C)."""
    q, s = _fp8_empty(n_pad, n_cols, device=device), _f32_empty(n_pad, n_cols // TILE, device=device)
    return q, s, _fp8_empty(n_cols, n_pad, device=device), _f32_empty(n_pad // TILE, n_cols, device=device)


def _swiglu_bwd_empty(n_pad: int, hidden: int, device):
    """The SwiGLU backward's outputs: dh1 | dh3 both ways (gq, gs, gqt, gst), h column-scaled (hqt, hst)."""
    hqt, hst = _fp8_empty(hidden, n_pad, device=device), _f32_empty(n_pad // TILE, hidden, device=device)
    return (*_both_ways_empty(n_pad, 2 * hidden, device), hqt, hst)


def _quant_act(x: torch.Tensor, lay, rows: torch.Tensor | None = None, row_w: torch.Tensor | None = None):
    """(N, C) -> fp8 (P, C) + scales (P, C/128), and fp8 (C, P) + scales (P/128, C), in the padded layout: padded
    row p is x[rows[p]] (rows: lay.row_src unless given; -1 a pad row), times row_w[p] (fp32, P) when given."""
    n_cols, dev, n_pad = x.shape[1], x.device, lay.n_pad
    q, s, qt, st = _both_ways_empty(n_pad, n_cols, dev)
    grid = (n_pad // TILE, n_cols // TILE)
    rows = lay.row_src if rows is None else rows
    _quant_act_kernel[grid](
        x, rows, rows if row_w is None else row_w, lay.tile_expert, q, s, qt, st, n_pad, n_cols, lay.n_exp,
        EXACT=_INTERPRET, WEIGHTED=row_w is not None, **_ACT_LAUNCH,
    )  # fmt: skip
    return q, s, qt, st


def _stacked_weights_empty(ws):
    """The outputs for ws (E, R_i, C) stacked along rows: fp8 (E, R, C), its transpose (E, C, R), block scales
    (E, R/128, C/128); and each w with its first row there."""
    n_exp, _, n_cols = ws[0].shape
    rows, dev = sum(w.shape[1] for w in ws), ws[0].device
    q, qt = _fp8_empty(n_exp, rows, n_cols, device=dev), _fp8_empty(n_exp, n_cols, rows, device=dev)
    offsets = [sum(w.shape[1] for w in ws[:i]) for i in range(len(ws))]
    return (q, qt, _f32_empty(n_exp, rows // TILE, n_cols // TILE, device=dev)), list(zip(ws, offsets))


def _quant_weights(*ws: torch.Tensor):
    """Stack ws (E, R_i, C) along rows -> fp8 (E, R, C), its transpose (E, C, R), block scales (E, R/128, C/128)."""
    (q, qt, s), parts = _stacked_weights_empty(ws)
    rows, n_cols = q.shape[1], q.shape[2]
    for w, off in parts:
        grid, w = (w.shape[0], w.shape[1] // TILE, n_cols // TILE), w.contiguous()
        _quant_weight_kernel[grid](w, q, s, w.shape[1], n_cols, rows, off, EXACT=_INTERPRET, **_WEIGHT_LAUNCH)
        _quant_weight_t_kernel[grid](w, qt, w.shape[1], n_cols, rows, off, EXACT=_INTERPRET, **_WEIGHT_LAUNCH)
    return q, qt, s


def _swiglu_quant(h13: torch.Tensor, lay, hidden: int):
    """h1 | h3 (P, 2I) -> h = silu(h1) * h3 row-quantised: fp8 (P, I), scales (P, I/128)."""
    n_pad, dev = lay.n_pad, h13.device
    hq, hs = _fp8_empty(n_pad, hidden, device=dev), _f32_empty(n_pad, hidden // TILE, device=dev)
    _swiglu_quant_kernel[(hidden // TILE, n_pad // TILE)](
        h13, lay.tile_expert, hq, hs, lay.n_exp, hidden, EXACT=_INTERPRET, num_warps=8
    )
    return hq, hs


def _swiglu_bwd_quant(dh: torch.Tensor, h13: torch.Tensor, lay):
    """dh (P, I) and h1 | h3 (P, 2I) -> dh1 | dh3 row-quantised (P, 2I) + (P, 2I/128) and token-quantised
    transposed (2I, P) + (P/128, 2I), and h token-quantised transposed (I, P) + (P/128, I)."""
    n_pad, hidden = lay.n_pad, dh.shape[1]
    gq, gs, gqt, gst, hqt, hst = _swiglu_bwd_empty(n_pad, hidden, dh.device)
    _swiglu_bwd_quant_kernel[(hidden // TILE, n_pad // TILE)](
        dh, h13, lay.tile_expert, gq, gs, gqt, gst, hqt, hst, n_pad, lay.n_exp, hidden, EXACT=_INTERPRET,
        **_BWD_LAUNCH,
    )  # fmt: skip
    return gq, gs, gqt, gst, hqt, hst


# ---- torch references ----------------------------------------------------------------------------------------


def _qdq(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Quantise-dequantise with one scale over `dims` of t (fp32 math, torch's round-to-nearest cast)."""
    scale = t.abs().amax(dim=dims, keepdim=True).clamp(min=_EPS) / FP8_MAX
    return (t / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


def _qdq_rows(t: torch.Tensor) -> torch.Tensor:  # (n, C): 1 x 128 tiles
    return _qdq(t.float().unflatten(1, (-1, TILE)), (2,)).flatten(1)


def _qdq_tokens(t: torch.Tensor) -> torch.Tensor:  # (n, C): 128 x 1 tiles from the group's first row
    n = t.shape[0]
    padded = torch.nn.functional.pad(t.float(), (0, 0, 0, -n % TILE))
    return _qdq(padded.unflatten(0, (-1, TILE)), (1,)).flatten(0, 1)[:n]


def _qdq_blocks(w: torch.Tensor) -> torch.Tensor:  # (R, C): 128 x 128 blocks
    r, c = w.shape
    return _qdq(w.float().reshape(r // TILE, TILE, c // TILE, TILE), (1, 3)).reshape(r, c)
