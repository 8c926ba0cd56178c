"""The fused MLA attention's dk/dv kernel for Hopper (sm_90) in Gluon, causal and within documents: the key-side
half of the backward (kernels/mla_attention_bwd.py has the Triton kernels and the launcher that picks this one).

A program owns 128 keys of one head: two warpgroups of 64 keys, each in its own partition, the keys the wgmma's
M side. A 1-warp loader brings each warpgroup's k_nope | k_pe | v once, then streams the query side (q_nope,
q_pe, dO; 32 rows a step, from the program's first key to the end of its last key's document) through a ring of
STAGES slots both warpgroups read. A warpgroup's step:
  S^T = k q^T and dP^T = v dO^T from shared memory (64 x 32),
  P^T = exp2(S^T scale - lse), causal mask on the diagonal steps, keys before each query's document start masked,
  dv += P^T dO, with P^T as the register operand (only dO is read from shared memory),
  dS^T = P^T (dP^T - delta), dk_nope += dS^T q_nope, dk_pe += dS^T q_pe, dS^T again from registers;
pipelined: step i's S^T and dP^T are issued before step i - 1's dk products, and P^T_i, dS^T_i formed while
those run; each step's lse is loaded a step ahead. These are the Triton kernel's products, operand for operand,
in the same order, so results are bit-equal. H100, B2 H16 S4096 causal (benchmarks/RESULTS.md, stop 32): 0.694 ms
(0.812-0.821 with lse loaded in its own step). 64-row query steps would halve the shared-memory reads of S^T and
dP^T but need more registers than a warpgroup has beside the 160 of accumulators (ptxas spilled 1.1 KB and
serialised the wgmmas). Stops 30-32 moved the accumulators to a warpgroup of their own instead, fed by one (or
two) warpgroups forming P^T and dS^T into shared memory, for 64-query steps: 0.721-0.759 ms, the probability
warpgroup's exponentials and hand-over serial with its own S^T (Nsight Compute: the tensor pipe 49.6% busy).
Gluon has no interpreter: on CPU, tests/kernels/test_mla_sm90_compile.py compiles it.
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from titan_dsv3.kernels.mla_attention import _LOG2E
from titan_dsv3.kernels.mla_attention_sm90 import (
    _head_strides,
    _load_three,
    _mma_layout,
    _rows_desc,
    _store_rows,
)


# fmt: off
@gluon.jit
def _dkdv_loader(qn_desc, qp_desc, do_desc, kn_desc, kp_desc, v_desc, kn, kp, v, k_bar, q_n, q_p, d_o, q_bar,
                 q_free, row0, key0, off_h, n_steps, qn_col, qp_col, do_col, kn_col, kp_col, v_col,
                 STAGES: gl.constexpr):
    """Each warpgroup's key tiles, then query step i's tiles into slot i % STAGES once both warpgroups have
    released the step that was there."""
    HK: gl.constexpr = kn_desc.block_type.shape[0]
    for g in gl.static_range(2):
        _load_three(k_bar.index(g), row0 + key0 + g * HK, off_h, kn_desc, kn_col, kn.index(g), kp_desc, kp_col,
                    kp.index(g), v_desc, v_col, v.index(g))
    MQ: gl.constexpr = qn_desc.block_type.shape[0]
    for i in range(n_steps):
        slot = i % STAGES
        mbarrier.wait(q_free.index(slot), ((i // STAGES) & 1) ^ 1)
        _load_three(q_bar.index(slot), row0 + key0 + i * MQ, off_h, qn_desc, qn_col, q_n.index(slot), qp_desc,
                    qp_col, q_p.index(slot), do_desc, do_col, d_o.index(slot))


@gluon.jit
def _release(q_bar, q_free, i, STAGES: gl.constexpr):
    """Wait for query step i's loads and release its slot unread."""
    mbarrier.wait(q_bar.index(i % STAGES), (i // STAGES) & 1)
    mbarrier.arrive(q_free.index(i % STAGES))


@gluon.jit
def _issue_sdp(kn_g, kp_g, v_g, q_n, q_p, d_o, i, STAGES: gl.constexpr, s_l: gl.constexpr):
    """Issue query step i's S^T = k q^T (two products) and dP^T = v dO^T (64 x 32), asynchronous."""
    HK: gl.constexpr = kn_g.shape[0]
    MQ: gl.constexpr = q_n.shape[1]
    slot = i % STAGES
    s = warpgroup_mma(kn_g, q_n.index(slot).permute((1, 0)), gl.zeros([HK, MQ], gl.float32, s_l), use_acc=False,
                      is_async=True)
    s = warpgroup_mma(kp_g, q_p.index(slot).permute((1, 0)), s, is_async=True)
    dp = warpgroup_mma(v_g, d_o.index(slot).permute((1, 0)), gl.zeros([HK, MQ], gl.float32, s_l), use_acc=False,
                       is_async=True)
    return s, dp


@gluon.jit
def _probs(s, offs_k, first_key, start_q, lse_q, dstart_ptr, seqlen, qk_scale, s_l: gl.constexpr,
           HAS_DOC: gl.constexpr):
    """P^T (HK, MQ) fp32 of the step whose queries start at start_q, given their lse (inf past seqlen): 0 above
    the diagonal, before a query's document start (dstart_ptr: the row's) and for queries past seqlen."""
    HK: gl.constexpr = s.shape[0]
    MQ: gl.constexpr = s.shape[1]
    p = gl.exp2(s * qk_scale - lse_q[None, :])
    if start_q < first_key + HK:  # the diagonal crosses this step
        offs_q = start_q + gl.arange(0, MQ, layout=gl.SliceLayout(0, s_l))
        p = gl.where(offs_k[:, None] <= offs_q[None, :], p, 0.0)
    if HAS_DOC:  # keys before a query's document start
        dstart_q = _step_rows(dstart_ptr, start_q, seqlen, 0, MQ, s_l)
        p = gl.where(offs_k[:, None] >= dstart_q[None, :], p, 0.0)
    return p


@gluon.jit
def _step_rows(ptr, start_q, seqlen, other, MQ: gl.constexpr, s_l: gl.constexpr):
    """A query step's values of a per-row vector (lse, delta or the document starts; `other` past seqlen),
    (MQ,) in the scores' column layout."""
    offs_q = start_q + gl.arange(0, MQ, layout=gl.SliceLayout(0, s_l))
    return gl.load(ptr + offs_q, mask=offs_q < seqlen, other=other)


@gluon.jit
def _dkdv_steps_pipelined(kn_g, kp_g, v_g, q_n, q_p, d_o, q_bar, q_free, lse_ptr, delta_ptr, dstart_ptr, dkn, dkp,
                          dv, offs_k, first_key, key0, i0, i1, seqlen, qk_scale, STAGES: gl.constexpr,
                          s_l: gl.constexpr, HAS_DOC: gl.constexpr):
    """Query steps i0 .. i1 - 1 (at least one) of a warpgroup, pipelined: step i issues S^T_i and dP^T_i, then
    step i - 1's dk_nope and dk_pe products, and forms P^T_i and dS^T_i while those run (dv's product follows
    P^T_i). lse_ptr, delta_ptr: this head's rows; dstart_ptr: this batch row's."""
    MQ: gl.constexpr = q_n.shape[1]
    dtype: gl.constexpr = q_n.dtype
    ds_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dkn.type.layout, k_width=2)  # as above
    # step i0: S^T, dP^T and dv's product in full; dS^T kept as the next step's register operand
    mbarrier.wait(q_bar.index(i0 % STAGES), (i0 // STAGES) & 1)
    s, dp = _issue_sdp(kn_g, kp_g, v_g, q_n, q_p, d_o, i0, STAGES, s_l)
    lse_q = _step_rows(lse_ptr, key0 + i0 * MQ, seqlen, float("inf"), MQ, s_l)
    s, dp = warpgroup_mma_wait(0, deps=(s, dp))
    p = _probs(s, offs_k, first_key, key0 + i0 * MQ, lse_q, dstart_ptr, seqlen, qk_scale, s_l, HAS_DOC)
    delta_q = _step_rows(delta_ptr, key0 + i0 * MQ, seqlen, 0.0, MQ, s_l)
    # The next step's lse is loaded a step ahead: loaded in its own step, its L2 round trip stood between S^T
    # and the exponentials (H100 causal S4096: 0.694 ms against 0.812-0.821). delta is used after the dP^T wait,
    # by which time its load is back; prefetching it too grew ptxas's spill stack frame (112 to 120 B, 3.6).
    lse_next = _step_rows(lse_ptr, key0 + (i0 + 1) * MQ, seqlen, float("inf"), MQ, s_l)  # inf: P = 0 past seqlen
    p_op = gl.convert_layout(p.to(dtype), ds_op)
    dv = warpgroup_mma(p_op, d_o.index(i0 % STAGES), dv)
    ds = gl.convert_layout((p * (dp - delta_q[None, :])).to(dtype), ds_op)
    for i in range(i0 + 1, i1):
        prev = (i - 1) % STAGES
        slot = i % STAGES
        start_q = key0 + i * MQ
        mbarrier.wait(q_bar.index(slot), (i // STAGES) & 1)
        s_tok, dp_tok = _issue_sdp(kn_g, kp_g, v_g, q_n, q_p, d_o, i, STAGES, s_l)
        dkn_tok = warpgroup_mma(ds, q_n.index(prev), dkn, is_async=True)
        dkp_tok = warpgroup_mma(ds, q_p.index(prev), dkp, is_async=True)
        lse_q = lse_next
        lse_next = _step_rows(lse_ptr, start_q + MQ, seqlen, float("inf"), MQ, s_l)
        s = warpgroup_mma_wait(3, deps=(s_tok,))  # S^T_i done; dP^T_i and step i - 1's dk products may run
        p = _probs(s, offs_k, first_key, start_q, lse_q, dstart_ptr, seqlen, qk_scale, s_l, HAS_DOC)
        delta_q = _step_rows(delta_ptr, start_q, seqlen, 0.0, MQ, s_l)
        p_op = gl.convert_layout(p.to(dtype), ds_op)
        dv_tok = warpgroup_mma(p_op, d_o.index(slot), dv, is_async=True)
        dp = warpgroup_mma_wait(3, deps=(dp_tok,))  # dP^T_i done
        ds_next = (p * (dp - delta_q[None, :])).to(dtype)
        dkn, dkp, dv, ds, p_op = warpgroup_mma_wait(0, deps=(dkn_tok, dkp_tok, dv_tok, ds, p_op))
        mbarrier.arrive(q_free.index(prev))
        ds = gl.convert_layout(ds_next, ds_op)
    last = (i1 - 1) % STAGES
    dkn = warpgroup_mma(ds, q_n.index(last), dkn)
    dkp = warpgroup_mma(ds, q_p.index(last), dkp)
    mbarrier.arrive(q_free.index(last))
    return dkn, dkp, dv


@gluon.jit
def _store_dkdv(dkn, dkp, dv, dkn_ptr, dkp_ptr, dv_ptr, dkn_hs, dv_hs, row0, first_key, off_h, n_heads, seqlen,
                sm_scale, NW: gl.constexpr):
    """A warpgroup's dk_nope, dk_pe (both times the softmax scale) and dv (wgmma accumulators of NW warps) into rows
    first_key.. of head off_h. The layouts are rebuilt, not read off the tensors: Triton 3.6 cannot pass a
    tensor's layout on as an argument."""
    DR: gl.constexpr = dkp.shape[1]
    dn_l: gl.constexpr = _mma_layout(dkn.shape[1], NW)
    dr_l: gl.constexpr = _mma_layout(DR, NW)
    dv_l: gl.constexpr = _mma_layout(dv.shape[1], NW)
    _store_rows(dkn_ptr, dkn * sm_scale, row0, first_key, off_h, n_heads, seqlen, dkn_hs, dn_l)
    _store_rows(dkp_ptr, dkp * sm_scale, row0, first_key, off_h, n_heads, seqlen, DR, dr_l)
    _store_rows(dv_ptr, dv, row0, first_key, off_h, n_heads, seqlen, dv_hs, dv_l)


@gluon.jit
def _dkdv_consumer(kn, kp, v, k_bar, q_n, q_p, d_o, q_bar, q_free, lse_ptr, delta_ptr, dstart_ptr, dend_ptr,
                   dkn_ptr, dkp_ptr, dv_ptr, dkn_hs, dv_hs, pid_bh, row0, key0, off_h, n_steps, seqlen, n_heads,
                   sm_scale, qk_scale, G: gl.constexpr, STAGES: gl.constexpr, NW: gl.constexpr, HAS_DOC: gl.constexpr):
    """Warpgroup G: dk_nope, dk_pe (per head, fp32) and dv of keys key0 + 64 G .. + 63, over the query steps
    from its first key on to the end of its last key's document (of the sequence without documents),
    pipelined (_dkdv_steps_pipelined). Steps outside the range are waited for and
    released unread: a warpgroup that skipped a slot's fill would wait on a parity one phase ahead, which an
    mbarrier takes as the phase before and passes at once."""
    HK: gl.constexpr = kn.shape[1]
    DN: gl.constexpr = kn.shape[2]
    DR: gl.constexpr = kp.shape[2]
    DV: gl.constexpr = v.shape[2]
    MQ: gl.constexpr = q_n.shape[1]
    s_l: gl.constexpr = _mma_layout(MQ, NW)
    dn_l: gl.constexpr = _mma_layout(DN, NW)
    dr_l: gl.constexpr = _mma_layout(DR, NW)
    dv_l: gl.constexpr = _mma_layout(DV, NW)
    first_key = key0 + G * HK
    offs_k = first_key + gl.arange(0, HK, layout=gl.SliceLayout(1, s_l))
    kn_g = kn.index(G)
    kp_g = kp.index(G)
    v_g = v.index(G)
    dkn = gl.zeros([HK, DN], gl.float32, dn_l)
    dkp = gl.zeros([HK, DR], gl.float32, dr_l)
    dv = gl.zeros([HK, DV], gl.float32, dv_l)
    i0 = gl.minimum((G * HK) // MQ, n_steps)
    i1 = n_steps
    if HAS_DOC:  # queries from the end of the last key's document on see none of these keys
        i1 = gl.minimum(gl.cdiv(gl.load(dend_ptr + row0 + gl.minimum(first_key + HK, seqlen) - 1) - key0, MQ), i1)
    for i in range(i0):
        _release(q_bar, q_free, i, STAGES)
    mbarrier.wait(k_bar.index(G), 0)
    bh = pid_bh.to(gl.int64) * seqlen
    if i1 > i0:
        dkn, dkp, dv = _dkdv_steps_pipelined(kn_g, kp_g, v_g, q_n, q_p, d_o, q_bar, q_free, lse_ptr + bh,
                                             delta_ptr + bh, dstart_ptr + row0, dkn, dkp, dv, offs_k, first_key,
                                             key0, i0, i1, seqlen, qk_scale, STAGES, s_l, HAS_DOC)
    for i in range(gl.maximum(i0, i1), n_steps):
        _release(q_bar, q_free, i, STAGES)
    _store_dkdv(dkn, dkp, dv, dkn_ptr, dkp_ptr, dv_ptr, dkn_hs, dv_hs, row0, first_key, off_h, n_heads, seqlen,
                sm_scale, NW)


@gluon.jit
def _mla_bwd_dkdv_kernel_sm90(
    qn_desc, qp_desc, kn_desc, kp_desc, v_desc, do_desc, lse_ptr, delta_ptr, dstart_ptr, dend_ptr, dkn_ptr,
    dkp_ptr, dv_ptr, qn_col, qp_col, kn_col, kp_col, v_col, do_col, dkn_hs, dv_hs, seqlen, n_heads, sm_scale,
    qk_scale,
    STAGES: gl.constexpr, HAS_DOC: gl.constexpr, num_warps: gl.constexpr,
):
    """dk_nope (the input dtype), dk_pe (fp32, per head) and dv, contiguous (bsz, seqlen, heads, .), of 128
    keys: warpgroup 0 is the default partition, warpgroup 1 and the loader warp the workers. With documents
    (HAS_DOC; dstart, dend (bsz, seqlen) int32) the query steps end with the last key's document and are
    pipelined."""
    HK: gl.constexpr = kn_desc.block_type.shape[0]
    MQ: gl.constexpr = qn_desc.block_type.shape[0]
    dtype: gl.constexpr = qn_desc.dtype
    kn = gl.allocate_shared_memory(dtype, [2, HK, kn_desc.block_type.shape[1]], kn_desc.layout)
    kp = gl.allocate_shared_memory(dtype, [2, HK, kp_desc.block_type.shape[1]], kp_desc.layout)
    v = gl.allocate_shared_memory(dtype, [2, HK, v_desc.block_type.shape[1]], v_desc.layout)
    q_n = gl.allocate_shared_memory(dtype, [STAGES, MQ, qn_desc.block_type.shape[1]], qn_desc.layout)
    q_p = gl.allocate_shared_memory(dtype, [STAGES, MQ, qp_desc.block_type.shape[1]], qp_desc.layout)
    d_o = gl.allocate_shared_memory(dtype, [STAGES, MQ, do_desc.block_type.shape[1]], do_desc.layout)
    k_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for g in gl.static_range(2):
        mbarrier.init(k_bar.index(g), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_bar.index(i), count=1)
        mbarrier.init(q_free.index(i), count=2)
    pid_bh = gl.program_id(0)
    key0 = gl.program_id(1) * (2 * HK)  # key block 0 has the longest loop and starts first
    row0 = (pid_bh // n_heads) * seqlen
    off_h = pid_bh % n_heads
    q_end = seqlen
    if HAS_DOC:
        q_end = gl.load(dend_ptr + row0 + gl.minimum(key0 + 2 * HK, seqlen) - 1)
    n_steps = gl.cdiv(q_end - key0, MQ)
    gl.warp_specialize(
        [
            (_dkdv_consumer, (kn, kp, v, k_bar, q_n, q_p, d_o, q_bar, q_free, lse_ptr, delta_ptr, dstart_ptr,
                              dend_ptr, dkn_ptr, dkp_ptr, dv_ptr, dkn_hs, dv_hs, pid_bh, row0, key0, off_h, n_steps,
                              seqlen, n_heads, sm_scale, qk_scale, 0, STAGES, num_warps, HAS_DOC)),
            (_dkdv_consumer, (kn, kp, v, k_bar, q_n, q_p, d_o, q_bar, q_free, lse_ptr, delta_ptr, dstart_ptr,
                              dend_ptr, dkn_ptr, dkp_ptr, dv_ptr, dkn_hs, dv_hs, pid_bh, row0, key0, off_h, n_steps,
                              seqlen, n_heads, sm_scale, qk_scale, 1, STAGES, 4, HAS_DOC)),
            (_dkdv_loader, (qn_desc, qp_desc, do_desc, kn_desc, kp_desc, v_desc, kn, kp, v, k_bar, q_n, q_p, d_o,
                            q_bar, q_free, row0, key0, off_h, n_steps, qn_col, qp_col, do_col, kn_col, kp_col,
                            v_col, STAGES)),
        ],
        DKDV_WORKER_WARPS,
        DKDV_WORKER_REGS,
    )
    for g in gl.static_range(2):
        mbarrier.invalidate(k_bar.index(g))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(q_bar.index(i))
        mbarrier.invalidate(q_free.index(i))
# fmt: on


# ---- launcher ------------------------------------------------------------------------------------------------
# (query rows a step, ring slots). H200, B2 H16, in turn with the Triton kernel (ms, S4096 / S8192): this
# arrangement (warpgroup 0 the default partition at 232 registers, warpgroup 1 at 248, the loader warp at 24)
# with 4 slots 0.769-0.783 / 2.919-2.927, 3 slots 0.761-0.793 / 2.934-2.940; the loader as a 4-warp default
# partition and both warpgroups at 240: 3 slots 0.767-0.769 / 2.968-3.004, 4 slots 0.766-0.779 / 2.957-2.958
# (one call); as committed, in a later call: 0.771-0.776 / 2.977-3.047. Shared memory: the keys 80 KiB + 20 KiB
# a slot. The warpgroups' registers: the launch's pool is 12 warps x 168 = 64,512 a CTA, so the default
# partition gets what the workers leave: 232 beside [248, 24], 240 beside [240, 24] (their PTX's setmaxnreg).
# The pipelined steps (_dkdv_steps_pipelined) at [240, 24]: at [248, 24] ptxas (Triton 3.6) spilled 64-80 B, 7
# reloads a step in the default partition's loop (at [240, 24] 32 B, 2 reloads a step in one warpgroup's loop).
# H100, do_bench, in turn with the steps unpipelined (ms, two rounds; benchmarks/RESULTS.md): B4 S4096 3000-token
# documents 1.311-1.339 against 1.471-1.476, 512-token documents 0.276 against 0.294, 64-token 0.147 against
# 0.148-0.149; causal, 0.836-0.837 against 0.807-0.808 at S4096. With lse a step ahead (stop 32; ptxas spill
# stores, Triton 3.6: 260 B without documents, 72 before; 196 B with, 36 before): causal 0.694 against
# 0.812-0.821; 512-token documents 0.187-0.188 against 0.186-0.188, B4 S6000 3000-token documents 1.808-1.902
# against 1.791-1.795 (H100, two rounds each).
DKDV_CONFIG = (32, 4)
HALF_K = 64  # keys a warpgroup; a program takes two
DKDV_WORKER_WARPS = gl.constexpr([4, 1])
DKDV_WORKER_REGS = gl.constexpr([240, 24])


def mla_dkdv_sm90(
    do, q_nope, q_pe, k_nope, k_pe, v, lse, delta, scale: float, doc_bounds=None, config=None, into=None
):
    """dk_nope, dk_pe per head (fp32), dv of the causal attention (within documents with doc_bounds), as
    mla_attention_bwd._dkdv returns them, given the forward's lse and delta = rowsum(o * do); config (query rows
    a step, ring slots); into: views to write dk_nope and dv to (rows heads apart, as slices of one gradient)."""
    block_m, stages = config or DKDV_CONFIG
    bsz, seqlen, heads, nope = q_nope.shape
    dk_nope, dv = into or (torch.empty(bsz, seqlen, heads, d, device=v.device, dtype=v.dtype)
                           for d in (nope, v.shape[-1]))  # fmt: skip
    dk_pe_heads = torch.empty(bsz, seqlen, heads, q_pe.shape[-1], device=v.device, dtype=torch.float32)
    (qn, qn_c), (qp, qp_c), (dod, do_c) = (_rows_desc(t, block_m) for t in (q_nope, q_pe, do))
    (kn, kn_c), (kp, kp_c), (vd, v_c) = (_rows_desc(t, HALF_K) for t in (k_nope, k_pe, v))
    dstart, dend = (doc_bounds[0], doc_bounds[1]) if doc_bounds is not None else (lse, lse)  # lse: unused
    _mla_bwd_dkdv_kernel_sm90[(bsz * heads, triton.cdiv(seqlen, 2 * HALF_K))](
        qn, qp, kn, kp, vd, dod, lse, delta, dstart, dend, dk_nope, dk_pe_heads, dv, qn_c, qp_c, kn_c, kp_c, v_c,
        do_c, *_head_strides(dk_nope, dv), seqlen, heads, scale, scale * _LOG2E, STAGES=stages,
        HAS_DOC=doc_bounds is not None, num_warps=4,
    )  # fmt: skip
    return dk_nope, dk_pe_heads, dv
