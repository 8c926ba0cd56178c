"""The FP8 expert FFN's GEMMs for Hopper (sm_90) in Gluon, Triton's lower-level language (explicit TMA, mbarriers,
asynchronous wgmma, warp specialisation): the scatter GEMM (GEMM1, the second GEMM, dh, dx) and the weight-gradient
GEMM.

With DeepSeek-V3 scaling each 128-deep slice of the contraction joins the fp32 accumulator through its own scales,
acc += (A_k B_k^T) * sa_k sb_k^T. The Triton kernels of kernels/fp8_grouped_gemm.py load by cp.async from every
warp and wait for each slice's wgmma at once; they ran bench6's five GEMMs in 7.44 ms on H200, 500-560 TFLOP/s.
Here, _gemm_scatter_kernel_sm90_ws and _wgrad_kernel_sm90_ws: persistent, one block a SM.
- A loader warp fills a ring of STAGES shared-memory slots by TMA, running ahead across tile boundaries (a tile is
  only 11-22 slices deep); the weight gradient's per-slice row and column scales come in the same slot.
- Two consumer warpgroups (setmaxnreg 240) issue slice i's wgmma, then rescale slice i-1 while it runs and hand its
  slot back (_ws_tile_acc, _wg_tile_acc).
- Output tiles leave by TMA from shared memory while the consumers start the next tile.
bench6's five GEMMs: 4.46 ms, 780-1,006 TFLOP/s (H200; cuBLAS's dense tensorwise FP8 GEMM: 1,204). Until stop 21
ptxas serialised every wgmma here (note C7514: the loop copied an in-flight product's registers) and they ran at
520-710; tests/kernels/test_fp8_gemm_sm90_compile.py now fails on any such note.

Same operands, scales and row maps as the Triton kernels (their docstrings), the same per-slice products summed in
the same order: results agree with them to fp32 rounding (tests/gpu/test_fp8_grouped_gemm_gpu.py). Gluon has no
interpreter, so on CPU the tests compile these for sm_90 (tests/kernels/test_fp8_gemm_sm90_compile.py).
Legend: BM x BN output tile (BN 128, B's scaling block), 128-deep slices, P padded rows, E experts, R x C a weight
gradient's shape.
"""

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import constexpr_function

# Triton 3.6 (the GPU machines) names the TMA load async_copy_global_to_shared; newer ones async_load
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global  # 3.6 has only the latter
SLICE_ROWS = 128  # contraction slice = scaling granularity
SLICE = gl.constexpr(SLICE_ROWS)  # the same, as the kernels see it


@constexpr_function
def _acc_layout(block_n, num_warps):
    # wgmma's accumulator: the warps stacked along M (16 rows each), one instruction spans the tile's N
    return gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, block_n, 32]
    )


# fmt: off
@gluon.jit
def _ring(a_desc, b_desc, STAGES: gl.constexpr):
    """The persistent kernels' TMA ring: STAGES slots of A and B slices, a `ready` barrier a slot (the loads
    landed) and an `empty` one (the consumers are done with it: one arrival, theirs, after their own barrier)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, SLICE], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, SLICE], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    return a_bufs, b_bufs, ready, empty


@gluon.jit
def _ring_free(ready, empty, STAGES: gl.constexpr):
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))


@gluon.jit
def _ring_fill(a_desc, b_desc, a_bufs, b_bufs, ready, empty, i, a_row, b_row, col, STAGES: gl.constexpr,
               EXTRA_BYTES: gl.constexpr):
    """Slice i of the stream into slot i % STAGES, once the consumers have released the slice before it there; a
    fresh barrier passes a wait for the phase before it, so the first STAGES slices do not wait. Returns the slot
    and its `ready` barrier, which also expects EXTRA_BYTES of loads the caller issues on it."""
    slot = i % STAGES
    bar = ready.index(slot)
    mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes + EXTRA_BYTES)
    _tma_load(a_desc, [a_row, col], bar, a_bufs.index(slot))
    _tma_load(b_desc, [b_row, col], bar, b_bufs.index(slot))
    return slot, bar


@gluon.jit
def _tma_store_tile(acc, out_desc, out_smem, row, col):
    """acc -> out[row:, col:] by TMA from shared memory: the consumers write the tile there and go on to the next
    tile's wgmmas while the copy runs (the global stores of the tile were about 2 us of every tile's 7.7-13 us,
    bench6 on H200); the copy before must have left the buffer first."""
    tma.store_wait(0)
    out_smem.store(acc.to(out_desc.dtype))
    fence_async_shared()
    _tma_store(out_desc, [row, col], out_smem)


@gluon.jit
def _ws_tile(tile, n_nt, tile_expert_ptr, BM: gl.constexpr, BN: gl.constexpr):
    """Output tile -> (row0, n0, expert), row-tile major: the tiles in flight at once share A rows and B."""
    row0 = (tile // n_nt) * BM
    return row0, (tile % n_nt) * BN, gl.load(tile_expert_ptr + row0 // SLICE)


@gluon.jit
def _ws_loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, tile_expert_ptr, n_tiles, n_nt, n_k, N_OUT,
               STAGES: gl.constexpr):
    """One warp: TMA loads of every slice of this program's tiles, up to STAGES ahead of the consumers."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    i = 0
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        row0, n0, e = _ws_tile(tile, n_nt, tile_expert_ptr, BM, BN)
        for k in range(n_k):
            _ring_fill(a_desc, b_desc, a_bufs, b_bufs, ready, empty, i, row0, e * N_OUT + n0, k * SLICE, STAGES, 0)
            i += 1


@gluon.jit
def _mma_slice(a_bufs, b_bufs, ready, i, acc_l: gl.constexpr, STAGES: gl.constexpr):
    """Issue slice i of the ring's wgmma (asynchronous) once its loads have landed; use_acc=False: the zeros it is
    given are ignored (made here, so no zero tile stays live)."""
    BM: gl.constexpr = a_bufs.shape[1]
    BN: gl.constexpr = b_bufs.shape[1]
    slot = i % STAGES
    mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
    return warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)),
                         gl.zeros([BM, BN], gl.float32, acc_l), use_acc=False, is_async=True)


@gluon.jit
def _retire(acc, prod, scale, empty, i, PENDING: gl.constexpr, STAGES: gl.constexpr):
    """Wait for slice i's product (PENDING newer wgmma groups may still run), hand its slot back to the loader and
    add it to acc through its (BM, 1) or (BM, BN) scale."""
    done = warpgroup_mma_wait(num_outstanding=PENDING, deps=(prod,))
    mbarrier.arrive(empty.index(i % STAGES))
    # a second, already satisfied wait that takes the new acc pins the rescale here: left free, the compiler sank
    # it past the next slice's wgmma, so that product's registers were live twice and copied while in flight
    return warpgroup_mma_wait(num_outstanding=PENDING, deps=(acc + done * scale,))


@gluon.jit
def _slice_scale(sa_base, sa_offs, sb_base, sb_k, k):
    """Slice k's scale of a scatter tile, (BM, 1): its rows' scales times B's block scale."""
    return (gl.load(sa_base + k + sa_offs) * gl.load(sb_base + k * sb_k))[:, None]


@gluon.jit
def _ws_tile_acc(a_bufs, b_bufs, ready, empty, i, n_k, sa_base, sa_offs, sb_base, sb_k, acc_l: gl.constexpr,
                 STAGES: gl.constexpr):
    """acc (BM, BN) of one scatter tile from ring slices i .. i + n_k - 1 (n_k >= 1), slice k's scale
    sa_base[k + sa_offs] * sb_base[k sb_k]. Each slice's wgmma runs while the slice before it is rescaled. The
    loop is unrolled by two, so the two products in flight alternate between two fixed register sets (p0: even
    slices, p1: odd): with one `prev = cur` carried across the loop, the copy of an in-flight product made ptxas
    serialise every wgmma of the kernel (its note C7514; Triton 3.6 for sm_90)."""
    BM: gl.constexpr = a_bufs.shape[1]
    BN: gl.constexpr = b_bufs.shape[1]
    acc = gl.zeros([BM, BN], gl.float32, acc_l)
    s0 = _slice_scale(sa_base, sa_offs, sb_base, sb_k, 0)
    p0 = _mma_slice(a_bufs, b_bufs, ready, i, acc_l, STAGES)
    for k in range(1, n_k - 1, 2):
        s1 = _slice_scale(sa_base, sa_offs, sb_base, sb_k, k)
        p1 = _mma_slice(a_bufs, b_bufs, ready, i + k, acc_l, STAGES)
        acc = _retire(acc, p0, s0, empty, i + k - 1, 1, STAGES)
        s0 = _slice_scale(sa_base, sa_offs, sb_base, sb_k, k + 1)
        p0 = _mma_slice(a_bufs, b_bufs, ready, i + k + 1, acc_l, STAGES)
        acc = _retire(acc, p1, s1, empty, i + k, 1, STAGES)
    if n_k % 2 == 0:  # slice n_k - 1 is left over
        s1 = _slice_scale(sa_base, sa_offs, sb_base, sb_k, n_k - 1)
        p1 = _mma_slice(a_bufs, b_bufs, ready, i + n_k - 1, acc_l, STAGES)
        acc = _retire(acc, p0, s0, empty, i + n_k - 2, 1, STAGES)
        acc = _retire(acc, p1, s1, empty, i + n_k - 1, 0, STAGES)
    else:
        acc = _retire(acc, p0, s0, empty, i + n_k - 1, 0, STAGES)
    return acc


@gluon.jit
def _ws_consumer(a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, tile_expert_ptr, row_src_ptr, out_ptr, out_desc,
                 out_smem, n_tiles, n_nt, n_k, N_OUT, sb_e, sb_n, sb_k, STAGES: gl.constexpr, BM: gl.constexpr,
                 BN: gl.constexpr, num_warps: gl.constexpr):
    """The default warps: wgmma, rescale and store of every tile (_ws_tile_acc)."""
    acc_l: gl.constexpr = _acc_layout(BN, num_warps)
    sa_offs = gl.arange(0, BM, layout=gl.SliceLayout(1, acc_l)) * n_k
    i = 0
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        row0, n0, e = _ws_tile(tile, n_nt, tile_expert_ptr, BM, BN)
        sa_base = sa_ptr + row0.to(gl.int64) * n_k
        sb_base = sb_ptr + e * sb_e + (n0 // SLICE) * sb_n
        acc = _ws_tile_acc(a_bufs, b_bufs, ready, empty, i, n_k, sa_base, sa_offs, sb_base, sb_k, acc_l, STAGES)
        i += n_k
        # a tile's real rows go to consecutive rows (its expert's), the padding last: all real -> one TMA box
        last = gl.load(row_src_ptr + row0 + BM - 1)
        if last >= 0:
            _tma_store_tile(acc, out_desc, out_smem, last - (BM - 1), n0)
        else:  # an expert's last, partly padded tile: row by row, straight from the accumulator's layout (a
            # conversion to a coalesced one would take shared memory beside the ring and the TMA buffer)
            rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, acc_l))
            cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_l))
            src = gl.load(row_src_ptr + rows)
            dst = out_ptr + src.to(gl.int64)[:, None] * N_OUT + cols[None, :]
            gl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=(src[:, None] >= 0) & (cols[None, :] < N_OUT))
    tma.store_wait(0)


@gluon.jit(do_not_specialize=["n_experts"])
def _gemm_scatter_kernel_sm90_ws(
    a_desc, sa_ptr, b_desc, sb_ptr, tile_expert_ptr, pend_ptr, row_src_ptr, out_ptr, out_desc, n_experts, K,
    N_OUT, sb_e, sb_n, sb_k, STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    """_gemm_scatter_kernel's product (fp8_grouped_gemm.py), persistent and warp-specialised: a loader warp keeps
    the TMA ring STAGES slices ahead across tile boundaries (a tile is only 11-22 slices deep here), so the next
    tile's operands arrive while this one's epilogue runs; the default warps compute and store (by TMA, but for
    an expert's partly padded last tile)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    n_nt = N_OUT // BN
    n_k = K // SLICE
    # the real experts' padded rows end at pend[E-1] (a multiple of 128): the tail tiles have no expert
    n_tiles = gl.load(pend_ptr + n_experts - 1) // BM * n_nt
    a_bufs, b_bufs, ready, empty = _ring(a_desc, b_desc, STAGES)
    out_smem = gl.allocate_shared_memory(out_desc.dtype, [BM, BN], out_desc.layout)
    gl.warp_specialize(
        [
            (_ws_consumer, (a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, tile_expert_ptr, row_src_ptr, out_ptr,
                            out_desc, out_smem, n_tiles, n_nt, n_k, N_OUT, sb_e, sb_n, sb_k, STAGES, BM, BN,
                            num_warps)),
            (_ws_loader, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, tile_expert_ptr, n_tiles, n_nt, n_k,
                          N_OUT, STAGES)),
        ],
        [1],
        [40],
    )
    _ring_free(ready, empty, STAGES)


@gluon.jit
def _wg_tile(tile, n_rt, n_ct, pstart_ptr, pend_ptr, BM: gl.constexpr, BN: gl.constexpr):
    """Weight-gradient tile -> (expert, r0, c0, first padded token, slices), the expert slowest: its operand
    slices stay in L2 while its tiles run."""
    e = tile // (n_rt * n_ct)
    rc = tile % (n_rt * n_ct)
    p0 = gl.load(pstart_ptr + e)
    return e, (rc // n_ct) * BM, (rc % n_ct) * BN, p0, (gl.load(pend_ptr + e) - p0) // SLICE


@gluon.jit
def _wg_loader(a_desc, b_desc, sa_desc, sb_desc, a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, pstart_ptr,
               pend_ptr, n_tiles, n_rt, n_ct, R, C, STAGES: gl.constexpr):
    """_ws_loader for the weight-gradient tiles (each expert's own number of slices, none without tokens); a
    slice's row and column scales (BM and BN fp32, contiguous in the (P/128, R) and (P/128, C) tables) come by
    TMA into the same slot, under the same barrier."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    i = 0
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        e, r0, c0, p0, n_k = _wg_tile(tile, n_rt, n_ct, pstart_ptr, pend_ptr, BM, BN)
        for k in range(n_k):
            slot, bar = _ring_fill(
                a_desc, b_desc, a_bufs, b_bufs, ready, empty, i, r0, c0, p0 + k * SLICE, STAGES, 4 * (BM + BN)
            )
            kb = p0 // SLICE + k
            _tma_load(sa_desc, [kb * R + r0], bar, sa_bufs.index(slot))
            _tma_load(sb_desc, [kb * C + c0], bar, sb_bufs.index(slot))
            i += 1


@gluon.jit
def _retire_smem(acc, prod, sa_bufs, sb_bufs, empty, i, PENDING: gl.constexpr, STAGES: gl.constexpr):
    """_retire with slice i's row and column scales read from its ring slot (they landed with its operands),
    straight into the accumulator's row and column layouts: no global load, no layout conversion (which put a
    CTA barrier and a shared-memory round trip into every slice)."""
    acc_l: gl.constexpr = acc.type.layout
    slot = i % STAGES
    done = warpgroup_mma_wait(num_outstanding=PENDING, deps=(prod,))
    sa = sa_bufs.index(slot).load(gl.SliceLayout(1, acc_l))
    sb = sb_bufs.index(slot).load(gl.SliceLayout(0, acc_l))
    acc = warpgroup_mma_wait(num_outstanding=PENDING, deps=(acc + done * sa[:, None] * sb[None, :],))
    mbarrier.arrive(empty.index(slot))
    return acc


@gluon.jit
def _wg_tile_acc(a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, i, n_k, acc_l: gl.constexpr,
                 STAGES: gl.constexpr):
    """acc (BM, BN) of one weight-gradient tile from ring slices i .. i + n_k - 1 (n_k >= 1), unrolled by two as
    _ws_tile_acc."""
    BM: gl.constexpr = a_bufs.shape[1]
    BN: gl.constexpr = b_bufs.shape[1]
    acc = gl.zeros([BM, BN], gl.float32, acc_l)
    p0 = _mma_slice(a_bufs, b_bufs, ready, i, acc_l, STAGES)
    for k in range(1, n_k - 1, 2):
        p1 = _mma_slice(a_bufs, b_bufs, ready, i + k, acc_l, STAGES)
        acc = _retire_smem(acc, p0, sa_bufs, sb_bufs, empty, i + k - 1, 1, STAGES)
        p0 = _mma_slice(a_bufs, b_bufs, ready, i + k + 1, acc_l, STAGES)
        acc = _retire_smem(acc, p1, sa_bufs, sb_bufs, empty, i + k, 1, STAGES)
    if n_k % 2 == 0:
        p1 = _mma_slice(a_bufs, b_bufs, ready, i + n_k - 1, acc_l, STAGES)
        acc = _retire_smem(acc, p0, sa_bufs, sb_bufs, empty, i + n_k - 2, 1, STAGES)
        acc = _retire_smem(acc, p1, sa_bufs, sb_bufs, empty, i + n_k - 1, 0, STAGES)
    else:
        acc = _retire_smem(acc, p0, sa_bufs, sb_bufs, empty, i + n_k - 1, 0, STAGES)
    return acc


@gluon.jit
def _wg_consumer(a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, pstart_ptr, pend_ptr, out_desc, out2_desc,
                 out_smem, n_tiles, n_rt, n_ct, R, C, R_SPLIT, STAGES: gl.constexpr, BM: gl.constexpr,
                 BN: gl.constexpr, num_warps: gl.constexpr):
    """_wg_tile_acc for every tile of this program, stored by TMA; an expert without tokens gets zeros."""
    acc_l: gl.constexpr = _acc_layout(BN, num_warps)
    i = 0
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        e, r0, c0, p0, n_k = _wg_tile(tile, n_rt, n_ct, pstart_ptr, pend_ptr, BM, BN)
        if n_k > 0:
            acc = _wg_tile_acc(a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, i, n_k, acc_l, STAGES)
        else:
            acc = gl.zeros([BM, BN], gl.float32, acc_l)
        i += n_k
        if r0 < R_SPLIT:  # out, out2 as (E R_SPLIT, C) and (E (R - R_SPLIT), C)
            _tma_store_tile(acc, out_desc, out_smem, e * R_SPLIT + r0, c0)
        else:
            _tma_store_tile(acc, out2_desc, out_smem, e * (R - R_SPLIT) + r0 - R_SPLIT, c0)
    tma.store_wait(0)


@gluon.jit
def _wgrad_kernel_sm90_ws(
    a_desc, sa_desc, b_desc, sb_desc, pstart_ptr, pend_ptr, out_desc, out2_desc, R, C, R_SPLIT, n_experts,
    STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    """_wgrad_kernel's product (out_e = A[:, rows of e] @ B[:, rows of e]^T over each expert's padded tokens,
    one scale per channel and 128 tokens, the scale tables (P/128, R) and (P/128, C) flattened; rows >= R_SPLIT
    into out2; zeros for an expert without tokens), persistent and warp-specialised as
    _gemm_scatter_kernel_sm90_ws."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    n_rt = R // BM
    n_ct = C // BN
    a_bufs, b_bufs, ready, empty = _ring(a_desc, b_desc, STAGES)
    sa_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BM], sa_desc.layout)
    sb_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BN], sb_desc.layout)
    out_smem = gl.allocate_shared_memory(out_desc.dtype, [BM, BN], out_desc.layout)
    n_tiles = n_experts * n_rt * n_ct
    gl.warp_specialize(
        [
            (_wg_consumer, (a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty, pstart_ptr, pend_ptr, out_desc,
                            out2_desc, out_smem, n_tiles, n_rt, n_ct, R, C, R_SPLIT, STAGES, BM, BN, num_warps)),
            (_wg_loader, (a_desc, b_desc, sa_desc, sb_desc, a_bufs, b_bufs, sa_bufs, sb_bufs, ready, empty,
                          pstart_ptr, pend_ptr, n_tiles, n_rt, n_ct, R, C, STAGES)),
        ],
        [1],
        [40],
    )
    _ring_free(ready, empty, STAGES)


# fmt: on


# ---- launcher ------------------------------------------------------------------------------------------------
# Tile config (BM, consumer warps, stages); BN is B's 128-wide scaling block: 128 x 128 tiles, two consumer
# warpgroups (240 registers by setmaxnreg) and a loader warp, one persistent block a SM
SCATTER_CONFIG = (128, 8, 4)
WGRAD_CONFIG = (128, 8, 4)


_SMEM_BYTES = 220 * 1024  # of the 227 KiB a block may have on sm_90, with room for the barriers


def _stages(stages: int, bm: int, out: torch.Tensor) -> int:
    """At most `stages` ring slots (A, B and 1 KiB of scales each) beside the TMA output tile: with 128-row tiles
    5 with bf16 outputs, 4 with fp32 (the scatter kernel has no scales; counting them costs it no slot here)."""
    slot = (bm + SLICE_ROWS) * SLICE_ROWS + 1024
    return min(stages, (_SMEM_BYTES - bm * SLICE_ROWS * out.element_size()) // slot)


@functools.cache
def _n_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _desc(t: torch.Tensor, block_rows: int) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, SLICE_ROWS], gl.float8e4nv)
    return TensorDescriptor.from_tensor(t, [block_rows, SLICE_ROWS], layout)


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


def _out_desc(t: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """A 2-D output (rows, cols) as TMA store boxes of block_rows x 128."""
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, SLICE_ROWS], _GL_DTYPES[t.dtype])
    return TensorDescriptor.from_tensor(t, [block_rows, SLICE_ROWS], layout)


def gemm_scatter_sm90(
    a, sa, b, sb, tile_expert, pend, row_src, out, n_experts, K, N_OUT, sb_e, sb_n, sb_k, config=None
) -> None:
    """_gemm_scatter_kernel's contract: a (P, K) fp8, b (E, N_OUT, K) fp8; writes out[row_src[p]] for the rows of
    the experts' padded ranges (pend: where each ends)."""
    bm, warps, stages = config or SCATTER_CONFIG
    _gemm_scatter_kernel_sm90_ws[(_n_sms(a.device),)](
        _desc(a, bm), sa, _desc(b.reshape(-1, K), SLICE_ROWS), sb, tile_expert, pend, row_src, out,
        _out_desc(out, bm), n_experts, K, N_OUT, sb_e, sb_n, sb_k, STAGES=_stages(stages, bm, out), num_warps=warps,
    )  # fmt: skip


def _scale_desc(t: torch.Tensor, block: int) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    return TensorDescriptor.from_tensor(t.reshape(-1), [block], layout)


def descriptor_types(bm: int) -> dict[str, str]:
    """The descriptor arguments' types as the JIT derives them at launch, with BM-row A and output tiles: what a
    compile without a GPU needs (tests/kernels/test_fp8_gemm_sm90_compile.py, benchmarks/compile_kernels_sm90.py)."""
    from triton.runtime.jit import mangle_type

    def fp8(rows: int) -> str:
        return mangle_type(_desc(torch.empty(1024, 1024, dtype=torch.float8_e4m3fn), rows))

    def scales(block: int) -> str:
        return mangle_type(_scale_desc(torch.empty(64, 1024), block))

    out = mangle_type(_out_desc(torch.empty(1024, 1024, dtype=torch.bfloat16), bm))
    return {"a_desc": fp8(bm), "b_desc": fp8(SLICE_ROWS), "sa_desc": scales(bm), "sb_desc": scales(SLICE_ROWS),
            "out_desc": out, "out2_desc": out}  # fmt: skip


def wgrad_sm90(a, sa, b, sb, lay, out, out2, R, C, R_SPLIT, config=None) -> None:
    """_wgrad_kernel's contract: a (R, P) and b (C, P) fp8, scales (P/128, R) and (P/128, C); out_e (R_SPLIT, C),
    out2_e (R - R_SPLIT, C)."""
    bm, warps, stages = config or WGRAD_CONFIG
    _wgrad_kernel_sm90_ws[(_n_sms(a.device),)](
        _desc(a, bm), _scale_desc(sa, bm), _desc(b, SLICE_ROWS), _scale_desc(sb, SLICE_ROWS), lay.pstart, lay.pend,
        _out_desc(out.reshape(-1, C), bm), _out_desc(out2.reshape(-1, C), bm), R, C, R_SPLIT, lay.n_exp,
        STAGES=_stages(stages, bm, out), num_warps=warps,
    )  # fmt: skip
