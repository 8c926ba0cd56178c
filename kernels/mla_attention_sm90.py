"""The fused MLA attention's forward and dq kernels for Hopper (sm_90) in Gluon: TMA loads, asynchronous wgmma and
warp specialisation.

A program takes 128 query rows: two warpgroups of 64 rows, each in its own partition (so each runs at its own
pace and one's exponentials overlap the other's products), and a loader that brings each warpgroup's query
tiles (and dO) once, then every key block into a ring of STAGES slots both warpgroups read; a slot is refilled
when both have released it. Within a warpgroup, step j
  forward: issues S_j = q k_j^T, then O += P_{j-1} v_{j-1}, and forms P_j (online softmax) while the second runs;
  dq:      issues S_j and dP_j = dO v_j^T, then dq += dS_{j-1} k_{j-1}, and forms dS_j while that runs; before
           its first step it forms its rows' delta = rowsum(o dO) and stores them for the dk/dv kernels.
H200, B2 H16 S4096 (benchmarks/RESULTS.md): forward 0.315-0.33 ms against the Triton kernel's 0.40, dq 0.40-0.43
against 0.55. The same loop in one 8-warp partition (both warpgroups in step) ran no faster than Triton (forward
0.41-0.42 ms), nor did two dk/dv kernels built this way in stop 26 (0.80-0.82 ms against Triton's 0.79-0.82);
mla_attention_bwd_sm90.py's, 32-query steps streamed to two 64-key warpgroups, gains 4-12%, and 12-15% more with
each step's lse loaded a step ahead (stop 32).

Same inputs, masks (causal, and within documents given their bounds), scale and results as the Triton kernels
(mla_attention.sm90_kernels routes fp32, other head dims and other GPUs to those); the probabilities are rounded
to the input dtype before their products in both, so outputs agree to fp32 rounding order
(tests/gpu/test_mla_attention_gpu.py). With documents a program starts at the key block holding its first row's
document start; bench6's training step with document masking gained 1.5% from this (benchmarks/RESULTS.md).
Gluon has no interpreter: on CPU, tests/kernels/test_mla_sm90_compile.py compiles these for sm_90 (the builds:
mla_attention_sm90_builds.py).
Legend: HM query rows a warpgroup, BN key rows a block, DN / DR / DV the nope, rope and value head dims.
"""

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import constexpr_function

from titan_dsv3.kernels.mla_attention import _LOG2E

_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # 3.6: the latter only
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@constexpr_function
def _mma_layout(n, num_warps):
    # a wgmma accumulator (BM, n): warps stacked along M, 16 rows each
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


# fmt: off
@gluon.jit
def _ring_alloc(kn_desc, kp_desc, v_desc, STAGES: gl.constexpr):
    """STAGES slots of a key block's k_nope (BN, DN), k_pe (BN, DR) and v (BN, DV); a barrier a slot for the keys
    landing and one for the values, and two the warpgroups arrive on when done with them (count 2)."""
    BN: gl.constexpr = kn_desc.block_type.shape[0]
    kn = gl.allocate_shared_memory(kn_desc.dtype, [STAGES, BN, kn_desc.block_type.shape[1]], kn_desc.layout)
    kp = gl.allocate_shared_memory(kp_desc.dtype, [STAGES, BN, kp_desc.block_type.shape[1]], kp_desc.layout)
    v = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BN, v_desc.block_type.shape[1]], v_desc.layout)
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
        mbarrier.init(k_free.index(i), count=2)
        mbarrier.init(v_free.index(i), count=2)
    return kn, kp, v, k_bar, v_bar, k_free, v_free


@gluon.jit
def _ring_free(k_bar, v_bar, k_free, v_free, STAGES: gl.constexpr):
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bar.index(i))
        mbarrier.invalidate(v_bar.index(i))
        mbarrier.invalidate(k_free.index(i))
        mbarrier.invalidate(v_free.index(i))


@gluon.jit
def _query_tiles(qn_desc, qp_desc):
    """Both warpgroups' q_nope and q_pe tiles (2, HM, .) and a barrier each for their loads."""
    HM: gl.constexpr = qn_desc.block_type.shape[0]
    q_n = gl.allocate_shared_memory(qn_desc.dtype, [2, HM, qn_desc.block_type.shape[1]], qn_desc.layout)
    q_p = gl.allocate_shared_memory(qp_desc.dtype, [2, HM, qp_desc.block_type.shape[1]], qp_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bar.index(i), count=1)
    return q_n, q_p, q_bar


@gluon.jit
def _program_block(dstart_ptr, seqlen, n_heads, BM: gl.constexpr, BN: gl.constexpr, HAS_DOC: gl.constexpr):
    """This program's (batch x head), head, first query row and first row of its batch, and the key blocks
    its rows see, j0 .. n_blocks - 1: from the block holding its first row's document start (documents start in
    order, so no row of it starts earlier; 0 without documents) to the diagonal. The longest causal rows start
    first, heads fastest."""
    pid_bh = gl.program_id(0)
    start_m = (gl.num_programs(1) - 1 - gl.program_id(1)) * BM
    row0 = (pid_bh // n_heads) * seqlen
    n_blocks = gl.cdiv(gl.minimum(start_m + BM, seqlen), BN)
    if HAS_DOC:
        j0 = gl.load(dstart_ptr + row0 + start_m) // BN
    else:
        j0 = 0
    return pid_bh, pid_bh % n_heads, start_m, row0, j0, n_blocks


@gluon.jit
def _load_three(bar, row, off_h, a_desc, a_col, a, b_desc, b_col, b, c_desc, c_col, c):
    """Rows row.. of three (bsz x seqlen, heads x dim) views, head off_h, into a, b, c on one barrier."""
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes + c_desc.block_type.nbytes)
    _tma_load(a_desc, [row, off_h * a_col], bar, a)
    _tma_load(b_desc, [row, off_h * b_col], bar, b)
    _tma_load(c_desc, [row, off_h * c_col], bar, c)


@gluon.jit
def _load_keys(kn_desc, kp_desc, v_desc, kn, kp, v, k_bar, v_bar, k_free, v_free, row0, off_h, j0, n_blocks,
               kn_col, kp_col, v_col, STAGES: gl.constexpr):
    """The loader's loop: key block j0 + i's tiles into slot i % STAGES once both warpgroups have released the
    block that was there (a fresh barrier passes the wait for the phase before it)."""
    BN: gl.constexpr = kn_desc.block_type.shape[0]
    for i in range(n_blocks - j0):
        slot = i % STAGES
        phase = ((i // STAGES) & 1) ^ 1
        row = row0 + (j0 + i) * BN
        mbarrier.wait(k_free.index(slot), phase)
        kb = k_bar.index(slot)
        mbarrier.expect(kb, kn_desc.block_type.nbytes + kp_desc.block_type.nbytes)
        _tma_load(kn_desc, [row, off_h * kn_col], kb, kn.index(slot))
        _tma_load(kp_desc, [row, off_h * kp_col], kb, kp.index(slot))
        mbarrier.wait(v_free.index(slot), phase)
        vb = v_bar.index(slot)
        mbarrier.expect(vb, v_desc.block_type.nbytes)
        _tma_load(v_desc, [row, off_h * v_col], vb, v.index(slot))


@gluon.jit
def _scores(q_n, q_p, kn, kp, k_bar, j, s_l: gl.constexpr, STAGES: gl.constexpr):
    """Issue S_j = q_nope k_nope^T + q_pe k_pe^T (HM, BN), asynchronous, once block j's keys have landed."""
    HM: gl.constexpr = q_n.shape[0]
    BN: gl.constexpr = kn.shape[1]
    slot = j % STAGES
    mbarrier.wait(k_bar.index(slot), (j // STAGES) & 1)
    s = warpgroup_mma(q_n, kn.index(slot).permute((1, 0)), gl.zeros([HM, BN], gl.float32, s_l), use_acc=False,
                      is_async=True)
    return warpgroup_mma(q_p, kp.index(slot).permute((1, 0)), s, is_async=True)


@gluon.jit
def _dp(d_o, v, v_bar, j, s_l: gl.constexpr, STAGES: gl.constexpr):
    """Issue dP_j = dO v_j^T (HM, BN), asynchronous, once block j's values have landed."""
    HM: gl.constexpr = d_o.shape[0]
    BN: gl.constexpr = v.shape[1]
    slot = j % STAGES
    mbarrier.wait(v_bar.index(slot), (j // STAGES) & 1)
    return warpgroup_mma(d_o, v.index(slot).permute((1, 0)), gl.zeros([HM, BN], gl.float32, s_l), use_acc=False,
                         is_async=True)


@gluon.jit
def _causal(s, start_m, start_n, fill, s_l: gl.constexpr):
    """s (rows from start_m, keys from start_n) with the keys after their query set to fill, on blocks the
    diagonal crosses."""
    HM: gl.constexpr = s.shape[0]
    BN: gl.constexpr = s.shape[1]
    if start_n + BN > start_m:
        offs_m = start_m + gl.arange(0, HM, layout=gl.SliceLayout(1, s_l))
        offs_n = start_n + gl.arange(0, BN, layout=gl.SliceLayout(0, s_l))
        s = gl.where(offs_m[:, None] >= offs_n[None, :], s, fill)
    return s


@gluon.jit
def _row_doc_starts(dstart_ptr, row0, first, seqlen, HM: gl.constexpr, s_l: gl.constexpr, HAS_DOC: gl.constexpr):
    """Each of a warpgroup's rows' document start (HM,), in the scores' row layout; the rows themselves without
    documents (unused then)."""
    offs_m = first + gl.arange(0, HM, layout=gl.SliceLayout(1, s_l))
    if HAS_DOC:
        return gl.load(dstart_ptr + row0 + offs_m, mask=offs_m < seqlen, other=0)
    return offs_m


@gluon.jit
def _documents(s, dstart_m, start_n, fill, s_l: gl.constexpr, HAS_DOC: gl.constexpr):
    """s (keys from start_n) with the keys before each row's document start set to fill, with documents."""
    if HAS_DOC:
        offs_n = start_n + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s_l))
        s = gl.where(offs_n[None, :] >= dstart_m[:, None], s, fill)
    return s


@gluon.jit
def _store_rows(ptr, acc, row0, start_m, off_h, n_heads, seqlen, head_stride, acc_l: gl.constexpr):
    """acc (HM, D) -> rows start_m.. of head off_h of a (bsz, seqlen, heads, D) view whose heads are head_stride
    apart and rows n_heads heads apart (D for a contiguous tensor; more for the slice of a fused gradient)."""
    HM: gl.constexpr = acc.shape[0]
    D: gl.constexpr = acc.shape[1]
    offs_m = start_m + gl.arange(0, HM, layout=gl.SliceLayout(1, acc_l))
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, acc_l))
    rows = ((row0 + offs_m).to(gl.int64) * n_heads + off_h) * head_stride
    gl.store(ptr + rows[:, None] + offs_d[None, :], acc.to(ptr.dtype.element_ty), mask=(offs_m < seqlen)[:, None])


# ---- forward -------------------------------------------------------------------------------------------------


@gluon.jit
def _fwd_loader(qn_desc, qp_desc, kn_desc, kp_desc, v_desc, q_n, q_p, q_bar, kn, kp, v, k_bar, v_bar, k_free,
                v_free, row0, start_m, off_h, j0, n_blocks, qn_col, qp_col, kn_col, kp_col, v_col,
                STAGES: gl.constexpr):
    """The default partition (4 warps at 24 registers; one thread issues the copies): each warpgroup's query
    tiles, then the key blocks."""
    HM: gl.constexpr = qn_desc.block_type.shape[0]
    for g in gl.static_range(2):
        bar = q_bar.index(g)
        mbarrier.expect(bar, qn_desc.block_type.nbytes + qp_desc.block_type.nbytes)
        _tma_load(qn_desc, [row0 + start_m + g * HM, off_h * qn_col], bar, q_n.index(g))
        _tma_load(qp_desc, [row0 + start_m + g * HM, off_h * qp_col], bar, q_p.index(g))
    _load_keys(kn_desc, kp_desc, v_desc, kn, kp, v, k_bar, v_bar, k_free, v_free, row0, off_h, j0, n_blocks,
               kn_col, kp_col, v_col, STAGES)


@gluon.jit
def _fwd_consumer(q_n, q_p, q_bar, kn, kp, v, k_bar, v_bar, k_free, v_free, o_ptr, lse_ptr, dstart_ptr, pid_bh,
                  row0, start_m, off_h, j0, n_blocks, seqlen, n_heads, qk_scale, G: gl.constexpr,
                  STAGES: gl.constexpr, NW: gl.constexpr, HAS_DOC: gl.constexpr):
    """Warpgroup G: the online softmax of query rows start_m + 64 G .. + 63 over key blocks j0 .. n_blocks - 1
    (step i takes block j0 + i from slot i % STAGES). Step i issues S_i, then O += P_{i-1} v_{i-1}, and forms
    P_i while the second runs; each slot's keys and values are released as their products finish. Keys before
    a row's document start score -1e30, not -inf: a row whose first block holds none of its keys keeps a finite
    running max, and its bogus sum is scaled by exp2(-1e30 - max) = 0 at the block that holds its own key."""
    HM: gl.constexpr = q_n.shape[1]
    BN: gl.constexpr = kn.shape[1]
    DV: gl.constexpr = v.shape[2]
    s_l: gl.constexpr = _mma_layout(BN, NW)
    o_l: gl.constexpr = _mma_layout(DV, NW)
    p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_l, k_width=2)
    dtype: gl.constexpr = q_n.dtype
    qn = q_n.index(G)
    qp = q_p.index(G)
    first = start_m + G * HM
    dstart_m = _row_doc_starts(dstart_ptr, row0, first, seqlen, HM, s_l, HAS_DOC)
    mbarrier.wait(q_bar.index(G), 0)
    # block j0: every row sees a key at or before itself in it, so the running max is finite from here on
    s = warpgroup_mma_wait(0, deps=(_scores(qn, qp, kn, kp, k_bar, 0, s_l, STAGES),))
    mbarrier.arrive(k_free.index(0))
    s = _documents(s * qk_scale, dstart_m, j0 * BN, -1.0e30, s_l, HAS_DOC)
    s = _causal(s, first, j0 * BN, float("-inf"), s_l)
    m_i = gl.max(s, 1)
    p = gl.exp2(s - m_i[:, None])
    l_i = gl.sum(p, 1)
    o = gl.zeros([HM, DV], gl.float32, o_l)
    n = n_blocks - j0
    for i in range(1, n):
        s_tok = _scores(qn, qp, kn, kp, k_bar, i, s_l, STAGES)
        prev = (i - 1) % STAGES
        mbarrier.wait(v_bar.index(prev), ((i - 1) // STAGES) & 1)
        p_op = gl.convert_layout(p.to(dtype), p_l)
        o_tok = warpgroup_mma(p_op, v.index(prev), o, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s_tok,))  # S_i done; P_{i-1} v_{i-1} may still run
        mbarrier.arrive(k_free.index(i % STAGES))
        s = _documents(s * qk_scale, dstart_m, (j0 + i) * BN, -1.0e30, s_l, HAS_DOC)
        s = _causal(s, first, (j0 + i) * BN, float("-inf"), s_l)
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        o, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
        mbarrier.arrive(v_free.index(prev))
        o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
    last = (n - 1) % STAGES
    mbarrier.wait(v_bar.index(last), ((n - 1) // STAGES) & 1)
    o = warpgroup_mma(gl.convert_layout(p.to(dtype), p_l), v.index(last), o)
    o = o / gl.convert_layout(l_i, gl.SliceLayout(1, o_l))[:, None]
    _store_rows(o_ptr, o, row0, first, off_h, n_heads, seqlen, o.shape[1], o_l)
    offs_r = first + gl.arange(0, HM, layout=gl.SliceLayout(1, s_l))
    gl.store(lse_ptr + pid_bh.to(gl.int64) * seqlen + offs_r, m_i + gl.log2(l_i), mask=offs_r < seqlen)


@gluon.jit
def _mla_fwd_kernel_sm90(
    qn_desc, qp_desc, kn_desc, kp_desc, v_desc, o_ptr, lse_ptr, dstart_ptr,
    qn_col, qp_col, kn_col, kp_col, v_col, seqlen, n_heads, qk_scale,
    STAGES: gl.constexpr, HAS_DOC: gl.constexpr, num_warps: gl.constexpr,
):
    """Output and base-2 log-sum-exp (qk_scale includes log2(e)) of a block of 128 query rows: two warpgroups of
    64 rows (qn_desc's block) in their own partitions, sharing the key blocks a loader partition brings. Keys past
    seqlen only occur where the causal mask removes them."""
    HM: gl.constexpr = qn_desc.block_type.shape[0]
    BN: gl.constexpr = kn_desc.block_type.shape[0]
    q_n, q_p, q_bar = _query_tiles(qn_desc, qp_desc)
    kn, kp, v, k_bar, v_bar, k_free, v_free = _ring_alloc(kn_desc, kp_desc, v_desc, STAGES)
    pid_bh, off_h, start_m, row0, j0, n_blocks = _program_block(dstart_ptr, seqlen, n_heads, 2 * HM, BN, HAS_DOC)
    gl.warp_specialize(
        [
            (_fwd_loader, (qn_desc, qp_desc, kn_desc, kp_desc, v_desc, q_n, q_p, q_bar, kn, kp, v, k_bar, v_bar,
                           k_free, v_free, row0, start_m, off_h, j0, n_blocks, qn_col, qp_col, kn_col, kp_col,
                           v_col, STAGES)),
            (_fwd_consumer, (q_n, q_p, q_bar, kn, kp, v, k_bar, v_bar, k_free, v_free, o_ptr, lse_ptr, dstart_ptr,
                             pid_bh, row0, start_m, off_h, j0, n_blocks, seqlen, n_heads, qk_scale, 0, STAGES, 4,
                             HAS_DOC)),
            (_fwd_consumer, (q_n, q_p, q_bar, kn, kp, v, k_bar, v_bar, k_free, v_free, o_ptr, lse_ptr, dstart_ptr,
                             pid_bh, row0, start_m, off_h, j0, n_blocks, seqlen, n_heads, qk_scale, 1, STAGES, 4,
                             HAS_DOC)),
        ],
        FWD_WORKER_WARPS,
        FWD_WORKER_REGS,
    )
    _ring_free(k_bar, v_bar, k_free, v_free, STAGES)


# ---- dq ------------------------------------------------------------------------------------------------------


@gluon.jit
def _dq_loader(qn_desc, qp_desc, do_desc, kn_desc, kp_desc, v_desc, q_n, q_p, d_o, q_bar, kn, kp, v, k_bar, v_bar,
               k_free, v_free, row0, start_m, off_h, j0, n_blocks, qn_col, qp_col, do_col, kn_col, kp_col, v_col,
               STAGES: gl.constexpr):
    """One warp: each warpgroup's query and dO tiles, then the key blocks."""
    HM: gl.constexpr = qn_desc.block_type.shape[0]
    for g in gl.static_range(2):
        _load_three(q_bar.index(g), row0 + start_m + g * HM, off_h, qn_desc, qn_col, q_n.index(g), qp_desc, qp_col,
                    q_p.index(g), do_desc, do_col, d_o.index(g))
    _load_keys(kn_desc, kp_desc, v_desc, kn, kp, v, k_bar, v_bar, k_free, v_free, row0, off_h, j0, n_blocks,
               kn_col, kp_col, v_col, STAGES)


@gluon.jit
def _ds(s, dp, lse, delta, dstart_m, start_m, start_n, qk_scale, s_l: gl.constexpr, dtype: gl.constexpr,
        HAS_DOC: gl.constexpr):
    """dS = P (dP - delta) of one block in the input dtype (as the dq product takes it); P = 0 above the
    diagonal, before the row's document start and on rows past seqlen (their lse is inf)."""
    p = _documents(gl.exp2(s * qk_scale - lse[:, None]), dstart_m, start_n, 0.0, s_l, HAS_DOC)
    p = _causal(p, start_m, start_n, 0.0, s_l)
    return (p * (dp - delta[:, None])).to(dtype)


@constexpr_function
def _rows_layout(dv, num_warps):
    # (rows, dv) with 16 bytes of bf16 a thread along a row: what the dq kernel reads o in
    return gl.BlockedLayout([1, 8], [32 * 8 // dv, dv // 8], [num_warps, 1], [1, 0])


@gluon.jit
def _load_o(o_ptr, so_b, so_s, so_h, pid_bh, off_h, first, seqlen, n_heads, HM: gl.constexpr, DV: gl.constexpr,
            NW: gl.constexpr):
    """A warpgroup's rows of the forward's output o (HM, DV), 16-byte loads, zero past seqlen."""
    ld_l: gl.constexpr = _rows_layout(DV, NW)
    offs_m = first + gl.arange(0, HM, layout=gl.SliceLayout(1, ld_l))
    offs_d = gl.arange(0, DV, layout=gl.SliceLayout(0, ld_l))
    base = o_ptr + (pid_bh // n_heads).to(gl.int64) * so_b + off_h * so_h
    return gl.load(base + offs_m.to(gl.int64)[:, None] * so_s + offs_d[None, :], mask=(offs_m < seqlen)[:, None],
                   other=0.0)


@gluon.jit
def _row_delta(o, d_o, delta_ptr, pid_bh, first, seqlen, s_l: gl.constexpr):
    """delta = rowsum(o * dO) of a warpgroup's rows (HM,) in the scores' row layout, also stored (bsz, heads,
    seqlen) for the dk/dv kernel; dO from its tile in shared memory."""
    HM: gl.constexpr = o.shape[0]
    ld_l: gl.constexpr = o.type.layout
    offs_m = first + gl.arange(0, HM, layout=gl.SliceLayout(1, ld_l))
    delta = gl.sum(o.to(gl.float32) * d_o.load(ld_l).to(gl.float32), axis=1)
    gl.store(delta_ptr + pid_bh.to(gl.int64) * seqlen + offs_m, delta, mask=offs_m < seqlen)
    return gl.convert_layout(delta, gl.SliceLayout(1, s_l))


@gluon.jit
def _dq_consumer(q_n, q_p, d_o, q_bar, kn, kp, v, k_bar, v_bar, k_free, v_free, lse_ptr, o_ptr, so_b, so_s, so_h,
                 delta_ptr, dstart_ptr, dqn_ptr, dqp_ptr, cs_ptr, dqn_hs, dqp_hs, pid_bh, row0, start_m, off_h, j0,
                 n_blocks, seqlen, n_heads, sm_scale, qk_scale, G: gl.constexpr, STAGES: gl.constexpr,
                 NW: gl.constexpr, HAS_DOC: gl.constexpr, UNROTATE: gl.constexpr):
    """Warpgroup G: dq of query rows start_m + 64 G .. + 63 over key blocks j0 .. n_blocks - 1, and their
    delta = rowsum(o * dO) (stored for the dk/dv kernel, which runs after). Step i issues S_i and dP_i, then
    dq += dS_{i-1} k_{i-1}, and forms dS_i while that runs. UNROTATE: dq_pe is stored as the gradient of q_pe
    before RoPE (cs_ptr: the (seqlen, rope / 2, 2) fp32 cos / sin table)."""
    HM: gl.constexpr = q_n.shape[1]
    DN: gl.constexpr = q_n.shape[2]
    DR: gl.constexpr = q_p.shape[2]
    BN: gl.constexpr = kn.shape[1]
    s_l: gl.constexpr = _mma_layout(BN, NW)
    dqn_l: gl.constexpr = _mma_layout(DN, NW)
    dqp_l: gl.constexpr = _mma_layout(DR, NW)
    dsn_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dqn_l, k_width=2)
    dsp_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dqp_l, k_width=2)
    dtype: gl.constexpr = q_n.dtype
    qn = q_n.index(G)
    qp = q_p.index(G)
    do = d_o.index(G)
    first = start_m + G * HM
    offs_m = first + gl.arange(0, HM, layout=gl.SliceLayout(1, s_l))
    m_ok = offs_m < seqlen
    lse = gl.load(lse_ptr + pid_bh.to(gl.int64) * seqlen + offs_m, mask=m_ok, other=float("inf"))
    dstart_m = _row_doc_starts(dstart_ptr, row0, first, seqlen, HM, s_l, HAS_DOC)
    o = _load_o(o_ptr, so_b, so_s, so_h, pid_bh, off_h, first, seqlen, n_heads, HM, do.shape[1], NW)  # in flight
    mbarrier.wait(q_bar.index(G), 0)
    s_tok = _scores(qn, qp, kn, kp, k_bar, 0, s_l, STAGES)
    dp_tok = _dp(do, v, v_bar, 0, s_l, STAGES)
    delta = _row_delta(o, do, delta_ptr, pid_bh, first, seqlen, s_l)
    s, dp = warpgroup_mma_wait(0, deps=(s_tok, dp_tok))
    mbarrier.arrive(v_free.index(0))
    ds = _ds(s, dp, lse, delta, dstart_m, first, j0 * BN, qk_scale, s_l, dtype, HAS_DOC)
    dsn = gl.convert_layout(ds, dsn_l)
    dsp = gl.convert_layout(ds, dsp_l)
    dqn = gl.zeros([HM, DN], gl.float32, dqn_l)
    dqp = gl.zeros([HM, DR], gl.float32, dqp_l)
    n = n_blocks - j0
    for i in range(1, n):
        prev = (i - 1) % STAGES
        s_tok = _scores(qn, qp, kn, kp, k_bar, i, s_l, STAGES)
        dp_tok = _dp(do, v, v_bar, i, s_l, STAGES)
        dqn_tok = warpgroup_mma(dsn, kn.index(prev), dqn, is_async=True)
        dqp_tok = warpgroup_mma(dsp, kp.index(prev), dqp, is_async=True)
        s, dp = warpgroup_mma_wait(2, deps=(s_tok, dp_tok))  # block i-1's dq products may still run
        mbarrier.arrive(v_free.index(i % STAGES))
        ds = _ds(s, dp, lse, delta, dstart_m, first, (j0 + i) * BN, qk_scale, s_l, dtype, HAS_DOC)
        dqn, dqp, dsn, dsp = warpgroup_mma_wait(0, deps=(dqn_tok, dqp_tok, dsn, dsp))
        mbarrier.arrive(k_free.index(prev))
        dsn = gl.convert_layout(ds, dsn_l)
        dsp = gl.convert_layout(ds, dsp_l)
    last = (n - 1) % STAGES
    dqn = warpgroup_mma(dsn, kn.index(last), dqn)
    dqp = warpgroup_mma(dsp, kp.index(last), dqp)
    dqp = dqp * sm_scale
    if UNROTATE:
        dqp = _unrotate(dqp, cs_ptr, first, seqlen, dqp_l)
    _store_rows(dqn_ptr, dqn * sm_scale, row0, first, off_h, n_heads, seqlen, dqn_hs, dqn_l)
    _store_rows(dqp_ptr, dqp, row0, first, off_h, n_heads, seqlen, dqp_hs, dqp_l)


@gluon.jit
def _unrotate(g, cs_ptr, start_m, seqlen, g_l: gl.constexpr):
    """g (HM, R) fp32, the gradient wrt RoPE's output of rows start_m.., times the rotation's transpose: the
    gradient wrt its input (the table may carry YaRN's mscale: the transpose, not the inverse). Pairs
    (2i, 2i + 1) turn by each row's angle (models/rope.py): y0 = x0 c - x1 s, y1 = x0 s + x1 c, so
    dx0 = dy0 c + dy1 s, dx1 = dy1 c - dy0 s. The accumulator layout holds each pair in one thread, so the split
    is register-local."""
    HM: gl.constexpr = g.shape[0]
    R: gl.constexpr = g.shape[1]
    g0, g1 = gl.split(gl.reshape(g, [HM, R // 2, 2]))
    pair_l: gl.constexpr = g0.type.layout
    offs_m = start_m + gl.arange(0, HM, layout=gl.SliceLayout(1, pair_l))
    offs_p = gl.arange(0, R // 2, layout=gl.SliceLayout(0, pair_l))
    at = cs_ptr + (offs_m[:, None] * (R // 2) + offs_p[None, :]) * 2
    ok = (offs_m < seqlen)[:, None]
    c = gl.load(at, mask=ok, other=0.0)
    s = gl.load(at + 1, mask=ok, other=0.0)
    return gl.convert_layout(gl.reshape(gl.join(g0 * c + g1 * s, g1 * c - g0 * s), [HM, R]), g_l)


@gluon.jit
def _mla_bwd_dq_kernel_sm90(
    qn_desc, qp_desc, kn_desc, kp_desc, v_desc, do_desc, lse_ptr, o_ptr, delta_ptr, dstart_ptr, dqn_ptr,
    dqp_ptr, cs_ptr, qn_col, qp_col, kn_col, kp_col, v_col, do_col, so_b, so_s, so_h, dqn_hs, dqp_hs, seqlen,
    n_heads, sm_scale, qk_scale,
    STAGES: gl.constexpr, HAS_DOC: gl.constexpr, UNROTATE: gl.constexpr, num_warps: gl.constexpr,
):
    """dq_nope, dq_pe ((bsz, seqlen, heads, .) views, heads dqn_hs / dqp_hs apart) of 128 query rows:
    dS = P (dP - delta), dq = sm_scale dS k, with delta = rowsum(o * dO) formed here and stored (bsz, heads,
    seqlen); two warpgroups of 64 rows as in the forward, with a 1-warp loader here."""
    HM: gl.constexpr = qn_desc.block_type.shape[0]
    BN: gl.constexpr = kn_desc.block_type.shape[0]
    dtype: gl.constexpr = qn_desc.dtype
    q_n, q_p, q_bar = _query_tiles(qn_desc, qp_desc)
    d_o = gl.allocate_shared_memory(dtype, [2, HM, do_desc.block_type.shape[1]], do_desc.layout)
    kn, kp, v, k_bar, v_bar, k_free, v_free = _ring_alloc(kn_desc, kp_desc, v_desc, STAGES)
    pid_bh, off_h, start_m, row0, j0, n_blocks = _program_block(dstart_ptr, seqlen, n_heads, 2 * HM, BN, HAS_DOC)
    gl.warp_specialize(
        [
            (_dq_consumer, (q_n, q_p, d_o, q_bar, kn, kp, v, k_bar, v_bar, k_free, v_free, lse_ptr, o_ptr, so_b,
                            so_s, so_h, delta_ptr, dstart_ptr, dqn_ptr, dqp_ptr, cs_ptr, dqn_hs, dqp_hs, pid_bh,
                            row0, start_m, off_h, j0, n_blocks, seqlen, n_heads, sm_scale, qk_scale, 0, STAGES,
                            num_warps, HAS_DOC, UNROTATE)),
            (_dq_consumer, (q_n, q_p, d_o, q_bar, kn, kp, v, k_bar, v_bar, k_free, v_free, lse_ptr, o_ptr, so_b,
                            so_s, so_h, delta_ptr, dstart_ptr, dqn_ptr, dqp_ptr, cs_ptr, dqn_hs, dqp_hs, pid_bh,
                            row0, start_m, off_h, j0, n_blocks, seqlen, n_heads, sm_scale, qk_scale, 1, STAGES, 4,
                            HAS_DOC, UNROTATE)),
            (_dq_loader, (qn_desc, qp_desc, do_desc, kn_desc, kp_desc, v_desc, q_n, q_p, d_o, q_bar, kn, kp, v,
                          k_bar, v_bar, k_free, v_free, row0, start_m, off_h, j0, n_blocks, qn_col, qp_col, do_col,
                          kn_col, kp_col, v_col, STAGES)),
        ],
        DQ_WORKER_WARPS,
        DQ_WORKER_REGS,
    )
    _ring_free(k_bar, v_bar, k_free, v_free, STAGES)
# fmt: on


# ---- launchers -----------------------------------------------------------------------------------------------
# (key block, ring slots), measured on H200 at B2 H16 S4096: forward (128, 2) 0.326-0.332 ms, (64, 3) 0.349,
# (64, 4) 0.348; dq (64, 3) 0.430, (32, 4) 0.485, (32, 6) 0.493, (64, 2) 0.562. Shared memory: the forward's
# query tiles 48 KiB + 80 KiB a 128-key slot; the dq kernel's query and dO tiles 80 KiB + 40 KiB a 64-key slot.
FWD_CONFIG = (128, 2)
DQ_CONFIG = (64, 3)
HALF_M = 64  # query rows a warpgroup; a program takes two
# Worker partitions and their registers a thread; the default partition (4 warps) gets what the workers leave of
# the launch's pool, 12 warps x 168 = 64,512 (a 1-warp worker takes a whole warpgroup's share, 128 x its count):
# with dq's [224, 32] the default warpgroup runs at 248 (its PTX: setmaxnreg.inc 256, then .dec 248), not 256.
# A request past the pool would wait for ever. H200, B2 H16 (ms):
# - forward: the loader as the default partition (24 registers), both warpgroups workers at 240; against a
#   warpgroup as the default (248), the other at 224 (64 B of spill) and a 1-warp loader at 32: S4096 0.316-0.327
#   against 0.330-0.331, S8192 1.222-1.232 against 1.300-1.304.
# - dq: the second arrangement, 0.430-0.434 against 0.443-0.447 (S8192 1.681-1.686 against 1.705-1.727).
FWD_WORKER_WARPS = gl.constexpr([4, 4])
FWD_WORKER_REGS = gl.constexpr([240, 240])
DQ_WORKER_WARPS = gl.constexpr([4, 1])
DQ_WORKER_REGS = gl.constexpr([224, 32])


@functools.cache
def _smem_layout(rows: int, dim: int, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for([rows, dim], _GL_DTYPES[dtype])  # about 7 us a call


def _rows_desc(t: torch.Tensor, block_rows: int) -> tuple[TensorDescriptor, int]:
    """A (bsz, seqlen, heads, dim) view as TMA reads it: rows are (batch, position) of the underlying buffer,
    columns (head, dim), and head h's tile starts at column h * the returned stride (0 for a shared head)."""
    bsz, seqlen, heads, dim = t.shape
    row_stride, head_stride = t.stride(1), (t.stride(2) if heads > 1 else 0)
    cols = (heads - 1) * head_stride + dim
    flat = t.as_strided((bsz * seqlen, cols), (row_stride, 1))
    desc = TensorDescriptor(
        flat, [bsz * seqlen, cols], [row_stride, 1], [block_rows, dim], _smem_layout(block_rows, dim, t.dtype)
    )
    return desc, head_stride


def usable(*ts: torch.Tensor) -> bool:
    """Whether TMA can read these (bsz, seqlen, heads, dim) views as _rows_desc does: fp16 / bf16, the last dim
    contiguous, rows evenly spaced across the batch, 16-byte aligned starts and strides."""
    for t in ts:
        bsz, seqlen, heads, _ = t.shape
        es = t.element_size()
        if t.dtype not in _GL_DTYPES or t.stride(3) != 1 or (bsz > 1 and t.stride(0) != seqlen * t.stride(1)):
            return False
        if t.data_ptr() % 16 or (t.stride(1) * es) % 16 or (heads > 1 and (t.stride(2) * es) % 16):
            return False
    return True


def mla_fwd_sm90(q_nope, q_pe, k_nope, k_pe, v, scale: float, doc_bounds=None, config=None):
    """Causal forward (within documents given doc_bounds, mla_attention.document_bounds): out (bsz, seqlen,
    heads, v_dim) and the base-2 log-sum-exp (bsz, heads, seqlen) fp32, as mla_attention._mla_fwd returns them;
    config (key block, ring slots)."""
    block_n, stages = config or FWD_CONFIG
    bsz, seqlen, heads, _ = q_nope.shape
    out = torch.empty(bsz, seqlen, heads, v.shape[-1], device=v.device, dtype=v.dtype)
    lse = torch.empty(bsz, heads, seqlen, device=v.device, dtype=torch.float32)
    (qn, qn_c), (qp, qp_c) = (_rows_desc(t, HALF_M) for t in (q_nope, q_pe))
    (kn, kn_c), (kp, kp_c), (vd, v_c) = (_rows_desc(t, block_n) for t in (k_nope, k_pe, v))
    dstart = doc_bounds[0] if doc_bounds is not None else lse  # lse: unused
    _mla_fwd_kernel_sm90[(bsz * heads, triton.cdiv(seqlen, 2 * HALF_M))](
        qn, qp, kn, kp, vd, out, lse, dstart, qn_c, qp_c, kn_c, kp_c, v_c, seqlen, heads, scale * _LOG2E,
        STAGES=stages, HAS_DOC=doc_bounds is not None, num_warps=4,
    )  # fmt: skip
    return out, lse


def mla_dq_sm90(
    do,
    q_nope,
    q_pe,
    k_nope,
    k_pe,
    v,
    out,
    lse,
    scale: float,
    doc_bounds=None,
    config=None,
    into=None,
    cos_sin=None,
):
    """dq_nope, dq_pe (contiguous, the inputs' dtype) of the causal attention (within documents given
    doc_bounds), given the forward's output and lse, and delta = rowsum(out * do) (bsz, heads, seqlen) fp32, which
    the kernel forms on the way (returned third: the dk/dv kernels take it); config (key block, ring slots).
    into: two (bsz, seqlen, heads, .) views to write dq to instead (rows heads apart, as slices of one gradient);
    cos_sin: q_pe was rotated by this table, and dq_pe is the gradient before the rotation."""
    block_n, stages = config or DQ_CONFIG
    bsz, seqlen, heads, nope = q_nope.shape
    dq_nope, dq_pe = into or (torch.empty(bsz, seqlen, heads, d, device=v.device, dtype=q_nope.dtype)
                              for d in (nope, q_pe.shape[-1]))  # fmt: skip
    hs = _head_strides(dq_nope, dq_pe)
    (qn, qn_c), (qp, qp_c), (dod, do_c) = (_rows_desc(t, HALF_M) for t in (q_nope, q_pe, do))
    (kn, kn_c), (kp, kp_c), (vd, v_c) = (_rows_desc(t, block_n) for t in (k_nope, k_pe, v))
    dstart = doc_bounds[0] if doc_bounds is not None else lse  # lse: unused
    cs = cos_sin if cos_sin is not None else lse  # lse: unused
    if out.stride(3) != 1:
        raise ValueError(f"attention output strides {out.stride()}: its last dim must be contiguous")
    delta = torch.empty_like(lse)
    _mla_bwd_dq_kernel_sm90[(bsz * heads, triton.cdiv(seqlen, 2 * HALF_M))](
        qn, qp, kn, kp, vd, dod, lse, out, delta, dstart, dq_nope, dq_pe, cs, qn_c, qp_c, kn_c, kp_c, v_c, do_c,
        *out.stride()[:3], *hs, seqlen, heads, scale, scale * _LOG2E, STAGES=stages, HAS_DOC=doc_bounds is not None,
        UNROTATE=cos_sin is not None, num_warps=4,
    )  # fmt: skip
    return dq_nope, dq_pe, delta


def _head_strides(*outs: torch.Tensor) -> list[int]:
    """Each output's head stride, checking the layout the kernels' stores assume (rows heads apart)."""
    for t in outs:
        bsz, seqlen, heads, dim = t.shape
        if t.stride(3) != 1 or t.stride(1) != heads * t.stride(2) or t.stride(0) != seqlen * t.stride(1):
            raise ValueError(f"gradient view {tuple(t.shape)} strides {t.stride()}: rows must be heads apart")
    return [t.stride(2) for t in outs]
