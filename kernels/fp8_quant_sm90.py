"""Three of the FP8 expert FFN's quantisation passes (kernels/fp8_quant.py) in Gluon, with the transposes on the
bf16 inputs instead of the fp8 outputs: the SwiGLU backward, the activation quantiser and the weight quantiser.
The FFN calls them on Hopper while fp8_grouped_gemm.SM90_PASSES is set (the default): on bench6's shapes (H200,
stop 25) they take 0.446, 0.237 and 0.184 ms (a weight) against the Triton passes' 0.803, 0.289 and 0.292; a
torch copy of the SwiGLU backward's bytes takes 0.359.

The first two write a tile twice, scaled per row (1 x 128) and per column (128 x 1, transposed for the weight
gradients). Triton picks one register layout for the tile and moves the transposed fp8 outputs through shared
memory one byte at a time (`st.shared.b8`: 192 a thread in the SwiGLU backward, 128 in the activation quantiser;
sm_90, Triton 3.6): they run at 1.9 and 2.8 TB/s on bench6 (H200), where the row-only SwiGLU forward reaches
3.9. Gluon lets the kernel choose: the tile is read in ROWS (a thread holds 16 consecutive columns) and
quantised there per row, then in COLS (a thread holds 16 consecutive rows), where a column's amax stays inside a
warp and each thread stores 16 consecutive tokens of a transposed copy at once.
- The activation quantiser loads the tile in ROWS and converts the bf16 values to COLS (ldmatrix, 2 bytes an
  element): 79 registers with 8 warps, several blocks an SM. Its grid runs column blocks fastest, so the blocks
  in flight read whole rows of x: 0.273 ms with tiles fastest.
- The SwiGLU backward copies its three bf16 inputs (96 KiB) into shared memory by cp.async, all in flight at
  once, and reads them from there in 64-row ROWS chunks and 32-column COLS chunks, computing its elementwise
  math again in COLS. 100 registers with 8 warps, so two blocks share an SM and one's copies run under the
  other's arithmetic (about 33k warp instructions a tile, near its time at the memory's speed). Loaded whole
  into registers instead (16 warps, 128 registers, one block an SM) it took 0.564 ms: copies, then arithmetic,
  then stores, one after another (stop 25, benchmarks/RESULTS.md).
- The weight quantiser stages a 128x128 block the same way, takes its amax, and stores it row-major and
  transposed with one scale (the Triton one reaches 3.4 TB/s as one kernel, which was wrong from fp32 weights).

The Triton kernels' arguments and outputs (the grids' order differs), and the same arithmetic in the same order
(elementwise, and max reductions, whose order does not matter), so the same bits:
tests/gpu/test_fp8_grouped_gemm_gpu.py checks that. Compiled for sm_90 with Triton 3.6
(benchmarks/compile_kernels_sm90.py): no spill, no byte-wide shared stores
(tests/kernels/test_fp8_gemm_sm90_compile.py checks both).
Legend as fp8_quant: P padded rows, C columns, I hidden; a tile is 128 rows x 128 columns.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.runtime.jit import constexpr_function

from titan_dsv3.kernels import fp8_quant

# Triton 3.6 (the GPU machines) names the cp.async copy async_copy_global_to_shared; newer ones async_load
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # the same rename
TILE = fp8_quant.TILE
FP8_MAX = gl.constexpr(fp8_quant.FP8_MAX)  # fp8_quant's constants, as the kernels see them
EPS = gl.constexpr(fp8_quant._EPS)


@gluon.jit
def _swiglu_grads(dh, h1, h3):
    """dh1, dh3 and h from dh and the stored h1, h3 (fp32), as _swiglu_bwd_tile computes them (the sigmoid as
    tl.sigmoid writes it)."""
    sig = 1 / (1 + gl.exp(-h1))
    dh1 = dh * h3 * sig * (1.0 + h1 * (1.0 - sig))
    dh3 = dh * h1 * sig
    return dh1, dh3, h1 * sig * h3


@gluon.jit
def _e4m3(x, scale):
    return (x * (1.0 / scale)).to(gl.float8e4nv)  # fp8_quant._to_e4m3 on the GPU


@gluon.jit
def _store_rows(x, q_ptr, s_ptr, rows, cols, cb, n_cols):
    """x (128, 128) in ROWS -> e4m3 with one scale per row: q[rows, cols], s[rows, cb]."""
    scale = gl.maximum(gl.max(gl.abs(x), 1), EPS) / FP8_MAX
    gl.store(q_ptr + rows[:, None] * n_cols + cols[None, :], _e4m3(x, scale[:, None]))
    gl.store(s_ptr + rows * (n_cols // 128) + cb, scale)


@gluon.jit
def _store_cols(x, qt_ptr, st_ptr, rows, cols, tile, n_pad, n_cols):
    """x (128, 128) in COLS -> e4m3 with one scale per column, transposed: qt[cols, rows], st[tile, cols]."""
    scale = gl.maximum(gl.max(gl.abs(x), 0), EPS) / FP8_MAX
    gl.store(qt_ptr + cols[None, :].to(gl.int64) * n_pad + rows[:, None], _e4m3(x, scale[None, :]))
    gl.store(st_ptr + tile * n_cols + cols, scale)


@constexpr_function
def _rows_layout(num_warps):
    # 16 consecutive columns a thread (two 16-byte loads of bf16, one 16-byte store of fp8), a warp 4 x 128
    return gl.BlockedLayout([1, 16], [4, 8], [num_warps, 1], [1, 0])


@constexpr_function
def _cols_layout(num_warps):
    # 16 consecutive rows a thread, a warp 128 x 4: a column's amax needs no shared memory, and a thread's 16
    # tokens of a transposed copy leave in one 16-byte store
    return gl.BlockedLayout([16, 1], [8, 4], [1, num_warps], [0, 1])


@gluon.jit
def _tile_index(tile, cb, layout: gl.constexpr):
    """The padded rows and the columns of tile (tile, cb), as index vectors along layout's two axes."""
    rows = (tile * 128 + gl.arange(0, 128, layout=gl.SliceLayout(1, layout))).to(gl.int64)
    return rows, cb * 128 + gl.arange(0, 128, layout=gl.SliceLayout(0, layout))


@gluon.jit(do_not_specialize=["n_experts"])
def _quant_act_kernel_sm90(
    x_ptr, row_src_ptr, row_w_ptr, tile_expert_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, n_pad, n_cols, n_experts,
    num_warps: gl.constexpr, WEIGHTED: gl.constexpr = False,
):  # fmt: skip
    """fp8_quant._quant_act_kernel: the rows of 128-row padded tile program_id(1), column block program_id(0),
    gathered (zeros for pad rows), with WEIGHTED times their row weights, and quantised both ways. Column blocks
    run fastest, so the blocks in flight read whole rows of x (0.237 ms on bench6 against 0.273 with tiles
    fastest; H200, stop 25). The weights multiply in each layout after the bf16 tile's conversion (the same
    fp32 products both ways, and half the shared-memory bytes of converting the fp32 products)."""
    ROWS: gl.constexpr = _rows_layout(num_warps)
    COLS: gl.constexpr = _cols_layout(num_warps)
    tile = gl.program_id(1)
    cb = gl.program_id(0)
    if gl.load(tile_expert_ptr + tile) >= n_experts:
        return  # beyond the last expert's padded rows
    rows, cols = _tile_index(tile, cb, ROWS)
    src = gl.load(row_src_ptr + rows).to(gl.int64)
    x = gl.load(x_ptr + src[:, None] * n_cols + cols[None, :], mask=src[:, None] >= 0, other=0.0)
    x_r = x.to(gl.float32)
    if WEIGHTED:
        x_r = x_r * gl.load(row_w_ptr + rows)[:, None]
    _store_rows(x_r, q_ptr, s_ptr, rows, cols, cb, n_cols)
    rows_t, cols_t = _tile_index(tile, cb, COLS)
    x_t = gl.convert_layout(x, COLS).to(gl.float32)
    if WEIGHTED:
        x_t = x_t * gl.load(row_w_ptr + rows_t)[:, None]
    _store_cols(x_t, qt_ptr, st_ptr, rows_t, cols_t, tile, n_pad, n_cols)


@gluon.jit
def _copies_landed():
    """After a block's cp.async copies: wait for this thread's, then for every thread's (each thread reads chunks
    that others copied)."""
    async_copy.commit_group()
    async_copy.wait_group(0)
    _cta_barrier()


@constexpr_function
def _staged_layout():
    # a tile's rows (128 bf16, 256 B) in 16-byte chunks, the chunk index XORed with (row / 16) % 4: the 8 lanes of
    # a COLS warp that read one column 16 rows apart fall in 4 bank groups (2-way conflicts, not 8-way), while a
    # ROWS warp reads whole 16-byte chunks. A slice must keep whole patterns: 64 rows, 32 columns
    return gl.SwizzledSharedLayout(8, 16, 4, [1, 0])


@gluon.jit(do_not_specialize=["n_experts"])
def _swiglu_bwd_quant_kernel_sm90(
    dh_ptr, h13_ptr, tile_expert_ptr, gq_ptr, gs_ptr, gqt_ptr, gst_ptr, hqt_ptr, hst_ptr, n_pad, n_experts,
    HIDDEN, num_warps: gl.constexpr,
):  # fmt: skip
    """fp8_quant._swiglu_bwd_quant_kernel: tile program_id(1), hidden block program_id(0), its inputs staged in
    shared memory (the module's docstring)."""
    ROWS: gl.constexpr = _rows_layout(num_warps)
    COLS: gl.constexpr = _cols_layout(num_warps)
    SMEM: gl.constexpr = _staged_layout()
    RCH: gl.constexpr = 64  # rows of a ROWS chunk
    CCH: gl.constexpr = 4 * num_warps  # columns of a COLS chunk: one COLS layout's width, 32 with 8 warps
    tile = gl.program_id(1)
    cb = gl.program_id(0)
    if gl.load(tile_expert_ptr + tile) >= n_experts:
        return  # beyond the last expert's padded rows
    rows, cols = _tile_index(tile, cb, ROWS)
    dh_s = gl.allocate_shared_memory(dh_ptr.dtype.element_ty, [128, 128], SMEM)
    h1_s = gl.allocate_shared_memory(h13_ptr.dtype.element_ty, [128, 128], SMEM)
    h3_s = gl.allocate_shared_memory(h13_ptr.dtype.element_ty, [128, 128], SMEM)
    h13_ptrs = h13_ptr + rows[:, None] * (2 * HIDDEN) + cols[None, :]
    _cp_async(dh_s, dh_ptr + rows[:, None] * HIDDEN + cols[None, :])
    _cp_async(h1_s, h13_ptrs)
    _cp_async(h3_s, h13_ptrs + HIDDEN)
    _copies_landed()
    chunk_rows = gl.arange(0, RCH, layout=gl.SliceLayout(1, ROWS)).to(gl.int64)
    for r in gl.static_range(0, 128, RCH):
        dh1, dh3, _ = _swiglu_grads(
            dh_s.slice(r, RCH).load(ROWS).to(gl.float32),
            h1_s.slice(r, RCH).load(ROWS).to(gl.float32),
            h3_s.slice(r, RCH).load(ROWS).to(gl.float32),
        )
        rows_c = tile * 128 + r + chunk_rows
        _store_rows(dh1, gq_ptr, gs_ptr, rows_c, cols, cb, 2 * HIDDEN)
        _store_rows(dh3, gq_ptr, gs_ptr, rows_c, cols + HIDDEN, cb + HIDDEN // 128, 2 * HIDDEN)
    rows_t = (tile * 128 + gl.arange(0, 128, layout=gl.SliceLayout(1, COLS))).to(gl.int64)
    chunk_cols = gl.arange(0, CCH, layout=gl.SliceLayout(0, COLS))
    for c in gl.static_range(0, 128, CCH):
        dh1, dh3, h = _swiglu_grads(
            dh_s.slice(c, CCH, dim=1).load(COLS).to(gl.float32),
            h1_s.slice(c, CCH, dim=1).load(COLS).to(gl.float32),
            h3_s.slice(c, CCH, dim=1).load(COLS).to(gl.float32),
        )
        cols_t = cb * 128 + c + chunk_cols
        _store_cols(h, hqt_ptr, hst_ptr, rows_t, cols_t, tile, n_pad, HIDDEN)
        _store_cols(dh1, gqt_ptr, gst_ptr, rows_t, cols_t, tile, n_pad, 2 * HIDDEN)
        _store_cols(dh3, gqt_ptr, gst_ptr, rows_t, cols_t + HIDDEN, tile, n_pad, 2 * HIDDEN)


@gluon.jit
def _quant_weight_kernel_sm90(
    w_ptr, q_ptr, qt_ptr, s_ptr, n_rows, n_cols, rows_total, row_off, num_warps: gl.constexpr
):
    """fp8_quant._quant_weight_kernel: 128x128 block (row block program_id(1), column block program_id(0)) of
    expert program_id(2)'s weight, staged in shared memory by cp.async; its amax, then q in ROWS and the
    transposed qt in COLS chunks, both by 16-byte stores."""
    ROWS: gl.constexpr = _rows_layout(num_warps)
    COLS: gl.constexpr = _cols_layout(num_warps)
    RCH: gl.constexpr = 64
    CCH: gl.constexpr = 4 * num_warps
    cb = gl.program_id(0)
    rb = gl.program_id(1)
    e = gl.program_id(2).to(gl.int64)
    w_s = gl.allocate_shared_memory(w_ptr.dtype.element_ty, [128, 128], _staged_layout())
    rows, cols = _tile_index(rb, cb, ROWS)
    _cp_async(w_s, w_ptr + e * n_rows * n_cols + rows[:, None] * n_cols + cols[None, :])
    _copies_landed()
    amax = gl.max(gl.max(gl.abs(w_s.slice(0, RCH).load(ROWS).to(gl.float32)), 1), 0)
    amax = gl.maximum(amax, gl.max(gl.max(gl.abs(w_s.slice(RCH, RCH).load(ROWS).to(gl.float32)), 1), 0))
    scale = gl.maximum(amax, EPS) / FP8_MAX
    q_base = q_ptr + e * rows_total * n_cols + row_off * n_cols
    chunk_rows = gl.arange(0, RCH, layout=gl.SliceLayout(1, ROWS))
    for r in gl.static_range(0, 128, RCH):
        q_rows = rb * 128 + r + chunk_rows
        gl.store(
            q_base + q_rows[:, None] * n_cols + cols[None, :],
            _e4m3(w_s.slice(r, RCH).load(ROWS).to(gl.float32), scale),
        )
    qt_base = qt_ptr + e * rows_total * n_cols + row_off
    rows_t = rb * 128 + gl.arange(0, 128, layout=gl.SliceLayout(1, COLS))
    chunk_cols = gl.arange(0, CCH, layout=gl.SliceLayout(0, COLS))
    for c in gl.static_range(0, 128, CCH):
        cols_t = cb * 128 + c + chunk_cols
        w_t = w_s.slice(c, CCH, dim=1).load(COLS).to(gl.float32)
        gl.store(qt_base + cols_t[None, :] * rows_total + rows_t[:, None], _e4m3(w_t, scale))
    gl.store(s_ptr + (e * (rows_total // 128) + row_off // 128 + rb) * (n_cols // 128) + cb, scale)


# ---- launchers (fp8_quant's contracts) -------------------------------------------------------------------------


def quant_act_sm90(x: torch.Tensor, lay, rows=None, row_w=None, num_warps: int = 8):
    """fp8_quant._quant_act's contract: (N, C) -> q (P, C), s (P, C/128), qt (C, P), st (P/128, C)."""
    n_cols, n_pad = x.shape[1], lay.n_pad
    q, s, qt, st = fp8_quant._both_ways_empty(n_pad, n_cols, x.device)
    rows = lay.row_src if rows is None else rows
    _quant_act_kernel_sm90[(n_cols // TILE, n_pad // TILE)](
        x, rows, rows if row_w is None else row_w, lay.tile_expert, q, s, qt, st, n_pad, n_cols, lay.n_exp,
        num_warps=num_warps, WEIGHTED=row_w is not None,
    )  # fmt: skip
    return q, s, qt, st


def swiglu_bwd_quant_sm90(dh: torch.Tensor, h13: torch.Tensor, lay, num_warps: int = 8):
    """fp8_quant._swiglu_bwd_quant's contract: dh (P, I) and h1 | h3 (P, 2I) -> gq, gs, gqt, gst, hqt, hst."""
    n_pad, hidden = lay.n_pad, dh.shape[1]
    gq, gs, gqt, gst, hqt, hst = fp8_quant._swiglu_bwd_empty(n_pad, hidden, dh.device)
    _swiglu_bwd_quant_kernel_sm90[(hidden // TILE, n_pad // TILE)](
        dh, h13, lay.tile_expert, gq, gs, gqt, gst, hqt, hst, n_pad, lay.n_exp, hidden, num_warps=num_warps
    )
    return gq, gs, gqt, gst, hqt, hst


def quant_weights_sm90(*ws: torch.Tensor, num_warps: int = 8):
    """fp8_quant._quant_weights' contract: ws (E, R_i, C) stacked along rows -> q (E, R, C), qt (E, C, R), block
    scales (E, R/128, C/128)."""
    (q, qt, s), parts = fp8_quant._stacked_weights_empty(ws)
    rows, n_cols = q.shape[1], q.shape[2]
    for w, off in parts:
        grid, w = (n_cols // TILE, w.shape[1] // TILE, w.shape[0]), w.contiguous()
        _quant_weight_kernel_sm90[grid](w, q, qt, s, w.shape[1], n_cols, rows, off, num_warps=num_warps)
    return q, qt, s
