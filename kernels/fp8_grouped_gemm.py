"""FP8 SwiGLU experts as grouped GEMMs with DeepSeek-V3 fine-grained scaling, forward and backward, in Triton.

DeepSeek-V3 section 3.3.2: e4m3 operands, activations scaled per 1x128 tile (one token, 128 channels), weights per
128x128 block, each 128-deep slice of the contraction rescaled into an fp32 accumulator. The weight-gradient GEMMs
contract over tokens, so their operands are scaled per 128x1 tile (128 tokens of one channel) instead.

Token groups of any size: the rows of each expert are padded to a multiple of 128 in a padded layout built on the
device (no host sync), so every 128-row tile belongs to one expert and every 128-token slice of a weight-gradient
contraction has one scale. Pad rows are zeros; the outputs are written back to the unpadded rows.

Fused stages (each reads its input once):
- activations -> fp8 row-scaled (for the next GEMM) and fp8 column-scaled transposed (saved for the weight grad);
- GEMM1 x @ [w1; w3]^T -> epilogue: h1, h3 kept in x's dtype for the backward, h = silu(h1) * h3 from those,
  quantised (on Hopper GEMM1 is the Gluon GEMM and the SwiGLU a pass over h1 | h3: bench6's forward 3.69 ->
  3.16 ms on H200);
- GEMM dh = dy @ w2 (P x I, dy's dtype), then one elementwise pass: SwiGLU backward, dh1 and dh3 quantised both
  ways, h recomputed from h1, h3 and quantised per 128 tokens for the w2 gradient. (As the GEMM's epilogue this pass
  held 255 registers and spilled, and the GEMM ran at 99 TFLOP/s on H200; the split costs a round trip of dh
  through memory, P x I x 4 bytes in bf16, and a transient P x I buffer);
- weights -> fp8 blocks in both orientations (K-major operands for the forward and for the input-gradient GEMMs).
Hopper's fp8 tensor cores take K-major operands only; each operand is stored that way once. On Hopper the scatter
and weight-gradient GEMMs (and GEMM1) run as the Gluon kernels of fp8_grouped_gemm_sm90.py (SM90_GEMMS); the
five scatter and weight-gradient GEMMs of bench6 take 7.44 ms in Triton and 4.46 ms in Gluon (H200).
The launchers' middle, experts_fwd / experts_bwd, reads and writes rows through row maps: fp8_routed_experts.py
runs it on token rows and the padded layout directly (the route folded in).

Limits: dim and hidden a multiple of 128; x bf16/fp16/fp32 (outputs in x's dtype); weight grads in the weights'
dtype. Saved for the backward: h1 | h3 (N x 2I, x's dtype), x column-quantised (N x D fp8), the fp8 weights
in their backward orientation (E x 3 x I x D bytes), instead of x, h1, h3 and h in bf16.
Legend: N token copies (rows, sorted by expert), P padded rows, D dim, I hidden, E experts, T 128-row tiles.
The quantisation passes (and their torch references) are in fp8_quant.py, with how the interpreter rounds.
"""

import torch
import triton
import triton.language as tl

from titan_dsv3.kernels import require_same_device
from titan_dsv3.kernels.fp8_quant import (
    _INTERPRET,
    TILE,
    _f32_empty,
    _fp8_empty,
    _qdq_blocks,
    _qdq_rows,
    _qdq_tokens,
    _quant_act,
    _quant_weights,
    _store_swiglu_q,
    _swiglu_bwd_quant,
    _swiglu_quant,
)

# ---- GEMMs ---------------------------------------------------------------------------------------------------
# Configs were compiled for sm_90 with triton 3.6 before the first GPU run: none spills inside its K loop; 128-row
# GEMM1 tiles, 256-wide output tiles and 4-warp variants did and were dropped.


# fmt: off
@triton.jit
def _rows_mainloop(
    a_ptr, sa_ptr, b_ptr, sb_ptr, offs_m, offs_n, e, K, n_out, b3_off, sb_e, sb_n, sb_k,
    TWO_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """acc = A[rows] @ B_e[offs_n]^T with per-(row, 128-k) and per-(128-n, 128-k) scales; TWO_B also returns
    the product with the rows b3_off further down B (w3 beside w1)."""
    offs_k = tl.arange(0, 128)
    n_ok = offs_n < n_out
    a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + e * n_out * K + offs_n[:, None] * K + offs_k[None, :]
    sa_ptrs = sa_ptr + offs_m * (K // 128)
    sb_ptrs = sb_ptr + e * sb_e + (offs_n // 128) * sb_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in range(0, K // 128):
        a = tl.load(a_ptrs)
        sa = tl.load(sa_ptrs + kb)
        b = tl.load(b_ptrs, mask=n_ok[:, None], other=0.0)
        sb = tl.load(sb_ptrs + kb * sb_k, mask=n_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb[None, :])
        if TWO_B:
            b3 = tl.load(b_ptrs + b3_off * K)
            sb3 = tl.load(sb_ptrs + (b3_off // 128) * sb_n + kb * sb_k)
            acc3 += tl.dot(a, tl.trans(b3)) * (sa[:, None] * sb3[None, :])
        a_ptrs += 128
        b_ptrs += 128
    return acc, acc3


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s) for m, w, s in ((64, 8, 3), (64, 8, 4))
    ] if not _INTERPRET else [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1)],
    key=["K", "HIDDEN"],
)
@triton.jit(do_not_specialize=["n_experts"])
def _gemm_swiglu_fwd_kernel(
    a_ptr, sa_ptr, w_ptr, sw_ptr, tile_expert_ptr, h13_ptr, hq_ptr, hs_ptr, n_experts, K, HIDDEN,
    EXACT: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """h1 | h3 = x @ [w1; w3]^T for one (BLOCK_M-row, 128-hidden) tile; stores h1, h3 (P, 2I) for the backward
    and h = silu(h1) * h3 row-quantised (P, I) for the second GEMM. 64-row tiles keep the two accumulators and
    their per-slice products in registers (128 rows spill on sm_90)."""
    row0 = tl.program_id(1) * BLOCK_M
    e = tl.load(tile_expert_ptr + row0 // 128)
    if e >= n_experts:
        return
    e = e.to(tl.int64)
    offs_m = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(0) * 128 + tl.arange(0, 128)
    n_kb = K // 128
    h1, h3 = _rows_mainloop(
        a_ptr, sa_ptr, w_ptr, sw_ptr, offs_m, offs_n, e, K, 2 * HIDDEN, HIDDEN,
        2 * HIDDEN // 128 * n_kb, n_kb, 1, True, BLOCK_M, 128,
    )
    h13_ptrs = h13_ptr + offs_m[:, None] * (2 * HIDDEN) + offs_n[None, :]
    h1 = h1.to(h13_ptr.dtype.element_ty)
    h3 = h3.to(h13_ptr.dtype.element_ty)
    tl.store(h13_ptrs, h1)
    tl.store(h13_ptrs + HIDDEN, h3)
    _store_swiglu_q(h1.to(tl.float32), h3.to(tl.float32), hq_ptr, hs_ptr, offs_m, tl.program_id(0), HIDDEN, EXACT)


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": m, "BLOCK_N": 128}, num_warps=w, num_stages=s)
        for m, w, s in ((128, 8, 4), (128, 8, 3), (64, 4, 3), (64, 4, 4))
    ] if not _INTERPRET else [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=4, num_stages=1)],
    key=["K", "N_OUT"],
)
@triton.jit(do_not_specialize=["n_experts"])
def _gemm_scatter_kernel(
    a_ptr, sa_ptr, b_ptr, sb_ptr, tile_expert_ptr, row_src_ptr, out_ptr, n_experts, K, N_OUT,
    sb_e, sb_n, sb_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[row_src[p]] = A[p] @ B_e^T for the real rows of BLOCK_M padded rows (second GEMM, and dx)."""
    row0 = tl.program_id(1) * BLOCK_M
    e = tl.load(tile_expert_ptr + row0 // 128)
    if e >= n_experts:
        return
    offs_m = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc, _ = _rows_mainloop(
        a_ptr, sa_ptr, b_ptr, sb_ptr, offs_m, offs_n, e.to(tl.int64), K, N_OUT, 0, sb_e, sb_n, sb_k,
        False, BLOCK_M, BLOCK_N,
    )
    src = tl.load(row_src_ptr + offs_m).to(tl.int64)
    mask = (src[:, None] >= 0) & (offs_n[None, :] < N_OUT)
    tl.store(out_ptr + src[:, None] * N_OUT + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# 64-row 4-warp tiles fit 2 blocks a SM (202 registers), 3 with maxnreg 168 (32 B of spill): one block's per-slice
# rescale runs during another's wgmma. bench6's FFN on H200: 5.30 ms (128 rows, 8 warps) -> 3.37 -> 3.17 ms
@triton.autotune(
    configs=[
        triton.Config({"BLOCK_R": r}, num_warps=w, num_stages=s, maxnreg=n)
        for r, w, s, n in ((128, 8, 4, None), (128, 8, 3, None), (64, 4, 3, None), (64, 4, 4, None), (64, 4, 3, 168))
    ] if not _INTERPRET else [triton.Config({"BLOCK_R": 128}, num_warps=4, num_stages=1)],
    key=["R", "C"],
)
@triton.jit
def _wgrad_kernel(
    a_ptr, sa_ptr, b_ptr, sb_ptr, pstart_ptr, pend_ptr, out_ptr, out2_ptr, n_pad, R, C, R_SPLIT,
    BLOCK_R: tl.constexpr,
):
    """out_e = A[:, rows of e] @ B[:, rows of e]^T over the expert's padded token range (both operands stored
    transposed, tokens contiguous, one scale per channel and 128 tokens in (P/128, R) and (P/128, C) tables);
    rows >= R_SPLIT go to out2."""
    # the expert is the slowest grid axis: its tiles run together, so its operand slices (7.4 MB for bench6's
    # dW1|dW3) are read from DRAM about once and then from L2; with the expert fastest, the 64 experts' tiles
    # in flight at once overflowed L2 and each A slice was read again for every column tile
    e = tl.program_id(2).to(tl.int64)
    offs_r = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_c = (tl.program_id(0) * 128 + tl.arange(0, 128)).to(tl.int64)
    offs_k = tl.arange(0, 128)
    p0 = tl.multiple_of(tl.load(pstart_ptr + e), 128)  # padded groups: 128-aligned, so loads vectorise
    p1 = tl.load(pend_ptr + e)
    a_ptrs = a_ptr + offs_r[:, None] * n_pad + p0 + offs_k[None, :]
    b_ptrs = b_ptr + offs_c[:, None] * n_pad + p0 + offs_k[None, :]
    sa_ptrs = sa_ptr + (p0 // 128) * R + offs_r  # scale tables (P/128, R) and (P/128, C)
    sb_ptrs = sb_ptr + (p0 // 128) * C + offs_c
    acc = tl.zeros([BLOCK_R, 128], tl.float32)
    for kb in range(0, (p1 - p0) // 128):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        sa = tl.load(sa_ptrs + kb * R)
        sb = tl.load(sb_ptrs + kb * C)
        acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb[None, :])
        a_ptrs += 128
        b_ptrs += 128
    if tl.program_id(1) * BLOCK_R < R_SPLIT:
        dst = out_ptr + e * R_SPLIT * C + offs_r[:, None] * C + offs_c[None, :]
    else:
        dst = out2_ptr + e * (R - R_SPLIT) * C + (offs_r[:, None] - R_SPLIT) * C + offs_c[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty))
# fmt: on


# ---- launchers -----------------------------------------------------------------------------------------------


@triton.jit
def _layout_kernel(counts_ptr, out_ptr, n_exp, n_rows, n_pad, EB: tl.constexpr, BLOCK: tl.constexpr):
    """The padded layout of _Layout for padded rows [pid * BLOCK, +BLOCK), into out = [row_src | identity |
    tile_expert | pstart | pend] (int32). Every program scans the E counts itself (E <= EB)."""
    offs_e = tl.arange(0, EB)
    counts = tl.maximum(tl.load(counts_ptr + offs_e, mask=offs_e < n_exp, other=0).to(tl.int32), 0)
    # counts that claim more than the n_rows rows there are: the rows past n_rows are dropped (an expert keeps the
    # rows up to n_rows), so that no kernel reads or writes outside x, y, dx and the padded buffers (n_pad bounds
    # the layout only when the counts sum to at most n_rows; checking that they sum to it would cost a host sync)
    counts = tl.minimum(counts, tl.maximum(n_rows - (tl.cumsum(counts, 0) - counts), 0))
    padded = (counts + 127) // 128 * 128
    pend = tl.cumsum(padded, 0)
    pstart = pend - padded
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = p < n_pad
    # the experts that end at or before each padded row are those before its expert (pend is nondecreasing): their
    # number is the row's expert (E past the last expert's rows), the largest of their ends its expert's pstart,
    # the sum of their counts its expert's first source row
    before = (pend[None, :] <= p[:, None]) & (offs_e[None, :] < n_exp)  # (BLOCK, EB)
    e = tl.sum(before.to(tl.int32), 1)
    local = p - tl.max(tl.where(before, pend[None, :], 0), 1)
    first = tl.sum(tl.where(before, counts[None, :], 0), 1)
    real = (pstart[None, :] <= p[:, None]) & (p[:, None] < pstart[None, :] + counts[None, :])
    row_src = tl.where(tl.max(real.to(tl.int32), 1) > 0, first + local, -1)
    tl.store(out_ptr + p, row_src, mask=in_range)
    tl.store(out_ptr + n_pad + p, p, mask=in_range)
    tl.store(out_ptr + 2 * n_pad + p // 128, e, mask=in_range & (p % 128 == 0))
    if tl.program_id(0) == 0:
        tail = out_ptr + 2 * n_pad + n_pad // 128
        tl.store(tail + offs_e, pstart, mask=offs_e < n_exp)
        tl.store(tail + n_exp + offs_e, pend, mask=offs_e < n_exp)


class _Layout:
    """The padded layout, built on the device by one kernel (P is a static bound: no host sync).

    row_src (P,) source row of each padded row or -1; identity (P,) each padded row itself (for GEMMs whose
    output stays padded); tile_expert (T,) expert of each 128-row tile, E past the last expert; pstart, pend (E,)
    padded row range of each expert. All five are views of one int32 tensor, `packed`, which the forward saves
    so that the backward does not build the layout again. (Built with torch ops it took 55 small kernels in the
    forward and the backward together; without them bench6's FFN went from 7.68 to 7.57 ms by events, H200.)
    """

    def __init__(self, counts_E: torch.Tensor, n_rows: int):
        n_exp = counts_E.numel()
        n_pad = _padded_rows(n_rows, n_exp)
        packed = torch.empty(2 * n_pad + n_pad // TILE + 2 * n_exp, device=counts_E.device, dtype=torch.int32)
        eb = max(16, triton.next_power_of_2(n_exp))
        block = max(16, min(1024, 4096 // eb))  # (BLOCK, EB) compares of 4K elements: 32 a thread
        _layout_kernel[(triton.cdiv(n_pad, block),)](
            counts_E, packed, n_exp, n_rows, n_pad, EB=eb, BLOCK=block
        )
        self._unpack(packed, n_exp, n_pad)

    @classmethod
    def from_packed(cls, packed: torch.Tensor, n_exp: int, n_rows: int) -> "_Layout":
        lay = cls.__new__(cls)
        lay._unpack(packed, n_exp, _padded_rows(n_rows, n_exp))
        return lay

    def _unpack(self, packed: torch.Tensor, n_exp: int, n_pad: int) -> None:
        self.packed, self.n_exp, self.n_pad = packed, n_exp, n_pad
        self.row_src, self.identity, rest = packed.split([n_pad, n_pad, n_pad // TILE + 2 * n_exp])
        self.tile_expert, self.pstart, self.pend = rest.split([n_pad // TILE, n_exp, n_exp])


# The scatter and weight-gradient GEMMs on Hopper: the persistent warp-specialised Gluon kernels of
# fp8_grouped_gemm_sm90.py; False keeps the Triton kernels (the tests compare the two)
SM90_GEMMS = True
# The activation and weight quantisers and the SwiGLU backward on Hopper in Gluon (fp8_quant_sm90.py: the same
# bits, the transposes on the bf16 inputs). H200, bench6 shapes (stop 25): SwiGLU backward 0.446 ms against
# Triton's 0.802, activation quantiser 0.237 against 0.289, weight quantiser 0.184 against 0.215 a weight
# (bench_kernels.py --passes); bench_kernels.py --triton-passes turns it off.
SM90_PASSES = True


def _hopper(t: torch.Tensor) -> bool:
    return t.is_cuda and not _INTERPRET and torch.cuda.get_device_capability(t.device) == (9, 0)


def _sm90(t: torch.Tensor):
    """The sm_90 GEMM module when t lives on a Hopper GPU and SM90_GEMMS is set, else None."""
    if not (SM90_GEMMS and _hopper(t)):
        return None
    from titan_dsv3.kernels import fp8_grouped_gemm_sm90

    return fp8_grouped_gemm_sm90


def _quantise_act(x: torch.Tensor, lay, rows=None, row_w=None):
    """fp8_quant._quant_act, on Hopper with SM90_PASSES by the Gluon pass."""
    if SM90_PASSES and _hopper(x):
        from titan_dsv3.kernels.fp8_quant_sm90 import quant_act_sm90

        return quant_act_sm90(x, lay, rows, row_w)
    return _quant_act(x, lay, rows, row_w)


def _quantise_weights(*ws: torch.Tensor):
    """fp8_quant._quant_weights, on Hopper with SM90_PASSES by the Gluon pass."""
    if SM90_PASSES and _hopper(ws[0]):
        from titan_dsv3.kernels.fp8_quant_sm90 import quant_weights_sm90

        return quant_weights_sm90(*ws)
    return _quant_weights(*ws)


def _swiglu_bwd_quantise(dh: torch.Tensor, h13: torch.Tensor, lay):
    """fp8_quant._swiglu_bwd_quant, on Hopper with SM90_PASSES by the Gluon pass."""
    if SM90_PASSES and _hopper(dh):
        from titan_dsv3.kernels.fp8_quant_sm90 import swiglu_bwd_quant_sm90

        return swiglu_bwd_quant_sm90(dh, h13, lay)
    return _swiglu_bwd_quant(dh, h13, lay)


def _gemm_scatter(a, sa, b, sb, lay, row_src, out, K, N_OUT, sb_e, sb_n, sb_k) -> None:
    """out[row_src[p]] = A[p] @ B_e^T (_gemm_scatter_kernel), on Hopper by the Gluon kernel."""
    sm90, n_exp = _sm90(a), lay.n_exp
    if sm90 is not None:
        sm90.gemm_scatter_sm90(
            a, sa, b, sb, lay.tile_expert, lay.pend, row_src, out, n_exp, K, N_OUT, sb_e, sb_n, sb_k
        )
        return
    _gemm_scatter_kernel[lambda meta: (triton.cdiv(N_OUT, meta["BLOCK_N"]), a.shape[0] // meta["BLOCK_M"])](
        a, sa, b, sb, lay.tile_expert, row_src, out, n_exp, K, N_OUT, sb_e, sb_n, sb_k
    )


def _wgrad(a, sa, b, sb, lay, out, out2, R, C, R_SPLIT) -> None:
    """out_e | out2_e = A_e @ B_e^T over each expert's tokens (_wgrad_kernel), on Hopper by the Gluon kernel."""
    sm90 = _sm90(a)
    if sm90 is not None:
        sm90.wgrad_sm90(a, sa, b, sb, lay, out, out2, R, C, R_SPLIT)
        return
    _wgrad_kernel[lambda meta: (C // TILE, R // meta["BLOCK_R"], lay.n_exp)](
        a, sa, b, sb, lay.pstart, lay.pend, out, out2, lay.n_pad, R, C, R_SPLIT
    )


def _padded_rows(n_rows: int, n_exp: int) -> int:
    return triton.cdiv(n_rows, TILE) * TILE + n_exp * TILE


def _check(x, counts_E, w1, w2, w3, n_rows: int | None = None) -> None:
    """Shapes, devices and dtypes; n_rows: the rows the layout pads (x's unless given)."""
    if not (x.is_cuda or _INTERPRET):
        raise ValueError("fp8_grouped_swiglu runs on CUDA (or under TRITON_INTERPRET=1); use the reference")
    n_exp, hidden, dim = w1.shape
    if w3.shape != w1.shape or w2.shape != (n_exp, dim, hidden) or x.dim() != 2 or x.shape[1] != dim:
        shapes = [tuple(t.shape) for t in (x, w1, w2, w3)]
        raise ValueError(f"shapes x, w1, w2, w3 = {shapes}: expected (N, D), (E, I, D), (E, D, I), (E, I, D)")
    if dim % TILE or hidden % TILE:
        raise ValueError(
            f"dim {dim} and hidden {hidden} must be multiples of {TILE} (the FP8 scaling blocks)"
        )
    if counts_E.numel() != n_exp:
        raise ValueError(f"counts has {counts_E.numel()} experts, the weights {n_exp}")
    what = f"x has {x.shape[0]} rows" if n_rows is None else f"{n_rows} token copies"
    n_rows = x.shape[0] if n_rows is None else n_rows
    tiles = _padded_rows(n_rows, n_exp) // TILE
    if tiles > 65535:  # the passes' grids run 128-row tiles along their second axis (at most 65,535 blocks)
        raise ValueError(
            f"{what} and {n_exp} experts: {tiles} padded 128-row tiles, past the passes' 65,535; "
            "split the tokens into calls of at most 8,388,480 - 128 x E rows"
        )
    require_same_device("x", x, counts=counts_E, w1=w1, w2=w2, w3=w3)
    if counts_E.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"counts dtype {counts_E.dtype}: expected int32 or int64 token counts")


def _swiglu_fwd(x, counts_E, w1, w2, w3):
    """Launcher: y (N, D) and what the backward needs (the layout, fp8 copies, h1 | h3)."""
    _check(x, counts_E, w1, w2, w3)
    x = x.contiguous()
    lay = _Layout(counts_E, x.shape[0])
    y = torch.empty_like(x)
    return y, lay.packed, *experts_fwd(x, lay, lay.row_src, w1, w2, w3, y, lay.row_src)


def experts_fwd(x, lay, x_rows, w1, w2, w3, y, y_rows):
    """The experts on padded row p = x[x_rows[p]] (-1: a zero pad row), each output row written to y[y_rows[p]]
    (pad rows: not written). Returns what the backward needs: xqt, xst, h13, w13tq, w13s, w2tq, w2s."""
    n_pad, dev, dim = lay.n_pad, x.device, x.shape[1]
    n_exp, hidden, _ = w1.shape
    w13q, w13tq, w13s = _quantise_weights(w1, w3)  # (E, 2I, D), (E, D, 2I), (E, 2I/128, D/128)
    w2q, w2tq, w2s = _quantise_weights(w2)  # (E, D, I), (E, I, D), (E, D/128, I/128)
    xq, xs, xqt, xst = _quantise_act(x, lay, x_rows)
    h13 = torch.empty(n_pad, 2 * hidden, device=dev, dtype=x.dtype)
    if _sm90(x) is not None:
        # Hopper: GEMM1 is the Gluon GEMM writing h1 | h3, then the SwiGLU and h's quantisation as a pass over
        # them (H200, bench6: the forward 3.69 -> 3.16 ms against the Triton GEMM with the SwiGLU epilogue)
        n_db = dim // TILE
        n_hb = 2 * hidden // TILE
        _gemm_scatter(xq, xs, w13q, w13s, lay, lay.identity, h13, dim, 2 * hidden, n_hb * n_db, n_db, 1)
        hq, hs = _swiglu_quant(h13, lay, hidden)
    else:
        hq, hs = _fp8_empty(n_pad, hidden, device=dev), _f32_empty(n_pad, hidden // TILE, device=dev)
        _gemm_swiglu_fwd_kernel[lambda meta: (hidden // TILE, n_pad // meta["BLOCK_M"])](
            xq, xs, w13q, w13s, lay.tile_expert, h13, hq, hs, n_exp, dim, hidden, EXACT=_INTERPRET,
        )  # fmt: skip
    n_kb, n_nb = hidden // TILE, dim // TILE
    _gemm_scatter(hq, hs, w2q, w2s, lay, y_rows, y, hidden, dim, n_nb * n_kb, n_kb, 1)
    return xqt, xst, h13, w13tq, w13s, w2tq, w2s


def _swiglu_bwd(dy, packed, xqt, xst, h13, w13tq, w13s, w2tq, w2s, w_dtype):
    """Launcher: dx (N, D), dw1, dw2, dw3 (in w_dtype); packed is the forward's _Layout.packed."""
    dy = dy.contiguous()
    lay = _Layout.from_packed(packed, w2tq.shape[0], dy.shape[0])
    dx = torch.empty_like(dy)
    saved = (xqt, xst, h13, w13tq, w13s, w2tq, w2s)
    return dx, *experts_bwd(dy, lay, lay.row_src, None, *saved, w_dtype, dx, lay.row_src)


def experts_bwd(dy, lay, dy_rows, dy_w, xqt, xst, h13, w13tq, w13s, w2tq, w2s, w_dtype, dx, dx_rows):
    """experts_fwd's backward: padded row p's output gradient is dy[dy_rows[p]] (times dy_w[p], fp32, when
    given); its input gradient goes to dx[dx_rows[p]]. Returns dw1, dw2, dw3 (in w_dtype)."""
    n_exp, hidden, dim = w2tq.shape[0], w2tq.shape[1], dy.shape[1]
    n_pad, dev = lay.n_pad, dy.device
    dyq, dys, dyqt, dyst = _quantise_act(dy, lay, dy_rows, dy_w)
    n_ib, n_db = hidden // TILE, dim // TILE
    # dh = dy @ w2 into the padded rows (the identity as row map: pad rows of dy are zeros, so are theirs), in
    # dy's dtype (bf16: half the bytes of fp32 through memory; dh1 and dh3 are quantised to fp8 right after),
    # then the SwiGLU backward as its own pass: on bench6 shapes (H200) about 1.1 ms of GEMM + 1.19 ms of pass
    # against 5.8 ms for the GEMM with the epilogue fused (255 registers, spilled). B = w2^T (E, I, D); the scale
    # of its block (i, d) is w2s[e, d, i].
    dh = torch.empty(n_pad, hidden, device=dev, dtype=dy.dtype)
    _gemm_scatter(dyq, dys, w2tq, w2s, lay, lay.identity, dh, dim, hidden, n_db * n_ib, 1, n_ib)
    gq, gs, gqt, gst, hqt, hst = _swiglu_bwd_quantise(dh, h13, lay)
    # B = [w1; w3]^T (E, D, 2I); the scale of its block (d, j) is w13s[e, j, d]
    _gemm_scatter(gq, gs, w13tq, w13s, lay, dx_rows, dx, 2 * hidden, dim, 2 * n_ib * n_db, 1, n_db)
    dw1 = torch.empty(n_exp, hidden, dim, device=dev, dtype=w_dtype)
    dw3 = torch.empty_like(dw1)
    dw2 = torch.empty(n_exp, dim, hidden, device=dev, dtype=w_dtype)
    _wgrad(gqt, gst, xqt, xst, lay, dw1, dw3, 2 * hidden, dim, hidden)
    _wgrad(dyqt, dyst, hqt, hst, lay, dw2, dw2, dim, hidden, dim)
    return dw1, dw2, dw3


# ---- custom ops and autograd ---------------------------------------------------------------------------------
# Opaque to torch.compile; no `from __future__ import annotations` here (torch.library reads the annotations).


@torch.library.custom_op("titan_dsv3::fp8_grouped_swiglu_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor, counts_E: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> list[torch.Tensor]:
    return list(_swiglu_fwd(x, counts_E, w1, w2, w3))


@_fwd_op.register_fake
def _(x, counts_E, w1, w2, w3):
    return [x.new_empty(x.shape), *saved_fakes(x, x.shape[0], w1)]


def saved_fakes(x, n_rows, w1):
    """Fakes of the layout (packed) and of experts_fwd's saved tensors, for n_rows rows through the experts."""
    dim = x.shape[1]
    n_exp, hidden, _ = w1.shape
    n_pad = _padded_rows(n_rows, n_exp)

    def fp8(*s):
        return x.new_empty(*s, dtype=torch.float8_e4m3fn)

    def f32(*s):
        return x.new_empty(*s, dtype=torch.float32)

    return [
        x.new_empty(2 * n_pad + n_pad // TILE + 2 * n_exp, dtype=torch.int32),
        fp8(dim, n_pad), f32(n_pad // TILE, dim), x.new_empty(n_pad, 2 * hidden),
        fp8(n_exp, dim, 2 * hidden), f32(n_exp, 2 * hidden // TILE, dim // TILE),
        fp8(n_exp, hidden, dim), f32(n_exp, dim // TILE, hidden // TILE),
    ]  # fmt: skip


@torch.library.custom_op("titan_dsv3::fp8_grouped_swiglu_bwd", mutates_args=())
def _bwd_op(
    dy: torch.Tensor, packed: torch.Tensor, xqt: torch.Tensor, xst: torch.Tensor, h13: torch.Tensor,
    w13tq: torch.Tensor, w13s: torch.Tensor, w2tq: torch.Tensor, w2s: torch.Tensor, w_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return _swiglu_bwd(dy, packed, xqt, xst, h13, w13tq, w13s, w2tq, w2s, w_dtype)


@_bwd_op.register_fake
def _(dy, packed, xqt, xst, h13, w13tq, w13s, w2tq, w2s, w_dtype):
    n_exp, hidden, dim = w2tq.shape
    dw1 = dy.new_empty(n_exp, hidden, dim, dtype=w_dtype)
    return dy.new_empty(dy.shape), dw1, dy.new_empty(n_exp, dim, hidden, dtype=w_dtype), torch.empty_like(dw1)


def _setup_context(ctx, inputs, output):
    w1 = inputs[2]
    ctx.mark_non_differentiable(*output[1:])
    # the saved outputs never get a gradient: without this autograd hands backward zero-filled ones, about 700 MB
    # of fp8 and bf16 fills on bench6 shapes (0.41 ms of the FFN's 13.7 on H200)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[1:])  # the layout (packed), the fp8 copies, h1 | h3
    ctx.w_dtype = w1.dtype


def _backward(ctx, grads):
    dx, dw1, dw2, dw3 = _bwd_op(grads[0], *ctx.saved_tensors, ctx.w_dtype)  # grads[0]: of y; the rest None
    return dx, None, dw1, dw2, dw3


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def fp8_grouped_swiglu(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    w1_EID: torch.Tensor,
    w2_EDI: torch.Tensor,
    w3_EID: torch.Tensor,
) -> torch.Tensor:
    """SwiGLU experts w2(silu(w1 x) * w3 x) over token groups (x sorted by expert, counts on device), in FP8.

    Same contract as models.moe.grouped_swiglu; differentiable in x and the three weights. The counts should sum
    to N; that is not checked (it would cost a host sync). Rows they claim past N are dropped, so nothing outside
    the op's tensors is read or written; rows of x past their sum get no y (and no dx) written.
    """
    return _fwd_op(x_ND, counts_E, w1_EID, w2_EDI, w3_EID)[0]


# ---- reference -----------------------------------------------------------------------------------------------


def fp8_grouped_swiglu_reference(x_ND, counts_E, w1_EID, w2_EDI, w3_EID, dy_ND=None):
    """The same computation in dequantised fp32 torch math, one expert at a time (host sync on the counts).

    Returns y, or (y, dx, dw1, dw2, dw3) when dy is given, quantising where the kernels do: x, h, dy, dh1 | dh3
    per 1x128 (and per 128x1 for the weight gradients), weights per 128x128; h1, h3 and dh rounded to x's dtype
    as the kernels store them, and h computed from h1, h3 so rounded (forward and backward, as in the kernels).
    """
    outs = {k: [] for k in ("y", "dx", "dw1", "dw2", "dw3")}
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        x = x_ND[start : start + n].float()
        if n == 0:  # an empty group: nothing out, zero weight gradients
            for k, w in (("dw1", w1_EID), ("dw2", w2_EDI), ("dw3", w3_EID)):
                outs[k].append(torch.zeros(w.shape[1:], device=w.device))
            continue
        w1, w2, w3 = (_qdq_blocks(w[e]) for w in (w1_EID, w2_EDI, w3_EID))
        xq = _qdq_rows(x)
        h1, h3 = (xq @ w1.T).to(x_ND.dtype).float(), (xq @ w3.T).to(x_ND.dtype).float()  # as stored
        h = torch.nn.functional.silu(h1) * h3
        outs["y"].append(_qdq_rows(h) @ w2.T)
        if dy_ND is not None:
            dy = dy_ND[start : start + n].float()
            dh = (_qdq_rows(dy) @ w2).to(x_ND.dtype).float()  # as the dh GEMM writes it
            sig = torch.sigmoid(h1)
            h = h1 * sig * h3
            dh13 = torch.cat([dh * h3 * sig * (1 + h1 * (1 - sig)), dh * h1 * sig], dim=1)
            outs["dx"].append(_qdq_rows(dh13) @ torch.cat([w1, w3], dim=0))
            dw13 = _qdq_tokens(dh13).T @ _qdq_tokens(x)
            outs["dw1"].append(dw13[: w1.shape[0]])
            outs["dw3"].append(dw13[w1.shape[0] :])
            outs["dw2"].append(_qdq_tokens(dy).T @ _qdq_tokens(h))
        start += n
    y = torch.cat(outs["y"]).to(x_ND.dtype) if outs["y"] else x_ND.new_zeros(0, w2_EDI.shape[1])
    if dy_ND is None:
        return y
    dx = torch.cat(outs["dx"]).to(x_ND.dtype) if outs["dx"] else torch.zeros_like(x_ND)
    dws = [torch.stack(outs[k]).to(w1_EID.dtype) for k in ("dw1", "dw2", "dw3")]
    return (y, dx, *dws)


def grouped_swiglu_flops(n_rows: int, dim: int, hidden: int, backward: bool = True) -> float:
    """Matmul FLOPs of the expert FFN: 3 GEMMs forward, 6 backward."""
    return 2.0 * n_rows * dim * hidden * (9 if backward else 3)
