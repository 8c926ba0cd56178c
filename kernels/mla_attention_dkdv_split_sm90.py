"""The fused MLA attention's dk/dv kernel for Hopper (sm_90) in Gluon, for causal calls: each step split over two
warpgroups, one forming the probabilities, the other taking the products that accumulate dk and dv.

mla_attention_bwd_sm90.py (used with documents) gives each of its two warpgroups whole steps for 64 keys: 160
registers of accumulators each leave room for 32-query steps only, so S^T and dP^T are 64 x 32 products, and a
warpgroup's exponentials wait on its own products. Here a program owns 64 keys of one head and three partitions:
  the default warpgroup: S^T = k q^T and dP^T = v dO^T (64 x 64: 64-query steps), P^T = exp2(S^T scale - lse)
    with the causal mask, dS^T = P^T (dP^T - delta), both written to shared buffers (two of each); pipelined:
    step i's S^T and dP^T are issued first, and step i - 1's dS^T is formed and handed over while they run;
  a second warpgroup: dv += P^T dO, dk_nope += dS^T q_nope, dk_pe += dS^T q_pe, all operands in shared memory
    (160 registers of accumulators, the first warpgroup none);
  a loader warp: the program's k_nope | k_pe | v once, then each step's q_nope, q_pe, dO into a ring of STAGES
    slots both warpgroups release.
Each warpgroup has 320 of the step's 640 head-dim units of products. H100, B2 H16 (benchmarks/RESULTS.md):
S4096 0.744-0.746 ms against 0.791-0.793 for the other kernel, S8192 2.85-2.88 against 2.99-3.06; with
documents it is slower (3000-token documents, B4: 1.56-1.59 against 1.30-1.37), so the launcher keeps it for
causal calls. A first form that kept dv in the default warpgroup (P^T as its register operand, dS^T alone
handed over, no pipelining) took 0.881 ms. The products, operands and their order over the queries are the other
kernel's, so results are bit-equal to it (checked on H100: causal and document cases, S 127 to 8192).
Gluon has no interpreter: on CPU, tests/kernels/test_mla_sm90_compile.py compiles it.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from titan_dsv3.kernels.mla_attention_bwd_sm90 import (
    _issue_sdp,
    _load_query_steps,
    _probs,
    _query_ring,
    _step_rows,
    _store_dkdv,
    launch_dkdv,
)
from titan_dsv3.kernels.mla_attention_sm90 import (
    _load_three,
    _mma_layout,
)

_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # the partition's threads; 3.9: gl.barrier


# fmt: off
@gluon.jit
def _split_loader(qn_desc, qp_desc, do_desc, kn_desc, kp_desc, v_desc, kn, kp, v, k_bar, q_n, q_p, d_o, q_bar,
                  q_free, row0, key0, off_h, n_steps, qn_col, qp_col, do_col, kn_col, kp_col, v_col,
                  STAGES: gl.constexpr):
    """The keys once, then query step i's tiles into slot i % STAGES once both warpgroups released it."""
    _load_three(k_bar, row0 + key0, off_h, kn_desc, kn_col, kn, kp_desc, kp_col, kp, v_desc, v_col, v)
    _load_query_steps(qn_desc, qp_desc, do_desc, q_n, q_p, d_o, q_bar, q_free, row0 + key0, off_h, n_steps, qn_col,
                      qp_col, do_col, STAGES)


@gluon.jit
def _hand_over(buf_smem, ready, buf, ds):
    """dS^T of a step into its shared buffer (P^T went in before), then one arrive: the step is ready."""
    buf_smem.index(buf).store(ds)
    fence_async_shared()  # the generic-proxy stores, before the other warpgroup's wgmma reads them
    _cta_barrier()  # every thread's share stored before the one arrive
    mbarrier.arrive(ready.index(buf))


@gluon.jit
def _split_probs(kn, kp, v, k_bar, q_n, q_p, d_o, q_bar, q_free, pt_buf, ds_buf, ready, free, lse_ptr, delta_ptr,
                 dstart_ptr, pid_bh, row0, key0, n_steps, seqlen, qk_scale, STAGES: gl.constexpr, NW: gl.constexpr,
                 HAS_DOC: gl.constexpr):
    """The default warpgroup: each step's P^T and dS^T into the shared buffers, pipelined: step i's S^T and dP^T
    are issued first, and step i - 1's dS^T formed and handed over while they run."""
    HK: gl.constexpr = kn.shape[0]
    MQ: gl.constexpr = q_n.shape[1]
    dtype: gl.constexpr = q_n.dtype
    s_l: gl.constexpr = _mma_layout(MQ, NW)
    offs_k = key0 + gl.arange(0, HK, layout=gl.SliceLayout(1, s_l))
    bh = pid_bh.to(gl.int64) * seqlen
    lse_ptr += bh
    delta_ptr += bh
    dstart_ptr += row0
    p_prev = gl.zeros([HK, MQ], gl.float32, s_l)  # step i - 1's P^T and dP^T - delta
    d_prev = gl.zeros([HK, MQ], gl.float32, s_l)
    mbarrier.wait(k_bar, 0)
    for i in range(n_steps):
        slot = i % STAGES
        buf = i % 2
        start_q = key0 + i * MQ
        mbarrier.wait(q_bar.index(slot), (i // STAGES) & 1)
        s_tok, dp_tok = _issue_sdp(kn, kp, v, q_n, q_p, d_o, i, STAGES, s_l)
        lse_q = _step_rows(lse_ptr, start_q, seqlen, float("inf"), MQ, s_l)  # inf: P = 0 past seqlen
        delta_q = _step_rows(delta_ptr, start_q, seqlen, 0.0, MQ, s_l)
        if i > 0:
            _hand_over(ds_buf, ready, 1 - buf, (p_prev * d_prev).to(dtype))
        s = warpgroup_mma_wait(1, deps=(s_tok,))  # S^T_i done; dP^T_i may still run
        p = _probs(s, offs_k, key0, start_q, lse_q, dstart_ptr, seqlen, qk_scale, s_l, HAS_DOC)
        mbarrier.wait(free.index(buf), ((i // 2) & 1) ^ 1)  # the dk/dv warpgroup is done with step i - 2's
        pt_buf.index(buf).store(p.to(dtype))
        dp = warpgroup_mma_wait(0, deps=(dp_tok,))
        mbarrier.arrive(q_free.index(slot))  # this warpgroup's reads of step i's tiles are done
        p_prev = p
        d_prev = dp - delta_q[None, :]
    if n_steps > 0:
        _hand_over(ds_buf, ready, (n_steps - 1) % 2, (p_prev * d_prev).to(dtype))


@gluon.jit
def _split_dkdv(d_o, q_n, q_p, q_bar, q_free, pt_buf, ds_buf, ready, free, dkn_ptr, dkp_ptr, dv_ptr, dkn_hs, dv_hs,
                row0, key0, off_h, n_steps, seqlen, n_heads, sm_scale, STAGES: gl.constexpr, NW: gl.constexpr):
    """The second warpgroup: dv += P^T dO, dk_nope += dS^T q_nope, dk_pe += dS^T q_pe a step, P^T and dS^T from
    the shared buffers; stores dk (times the softmax scale) and dv."""
    HK: gl.constexpr = ds_buf.shape[1]
    DN: gl.constexpr = q_n.shape[2]
    DR: gl.constexpr = q_p.shape[2]
    DV: gl.constexpr = d_o.shape[2]
    dn_l: gl.constexpr = _mma_layout(DN, NW)
    dr_l: gl.constexpr = _mma_layout(DR, NW)
    dv_l: gl.constexpr = _mma_layout(DV, NW)
    dkn = gl.zeros([HK, DN], gl.float32, dn_l)
    dkp = gl.zeros([HK, DR], gl.float32, dr_l)
    dv = gl.zeros([HK, DV], gl.float32, dv_l)
    for i in range(n_steps):
        slot = i % STAGES
        buf = i % 2
        mbarrier.wait(q_bar.index(slot), (i // STAGES) & 1)
        mbarrier.wait(ready.index(buf), (i // 2) & 1)
        dv_tok = warpgroup_mma(pt_buf.index(buf), d_o.index(slot), dv, is_async=True)
        dkn_tok = warpgroup_mma(ds_buf.index(buf), q_n.index(slot), dkn, is_async=True)
        dkp_tok = warpgroup_mma(ds_buf.index(buf), q_p.index(slot), dkp, is_async=True)
        dv, dkn, dkp = warpgroup_mma_wait(0, deps=(dv_tok, dkn_tok, dkp_tok))
        mbarrier.arrive(free.index(buf))
        mbarrier.arrive(q_free.index(slot))
    _store_dkdv(dkn, dkp, dv, dkn_ptr, dkp_ptr, dv_ptr, dkn_hs, dv_hs, row0, key0, off_h, n_heads, seqlen, sm_scale,
                NW)


@gluon.jit
def _mla_bwd_dkdv_split_kernel_sm90(
    qn_desc, qp_desc, kn_desc, kp_desc, v_desc, do_desc, lse_ptr, delta_ptr, dstart_ptr, dend_ptr, dkn_ptr,
    dkp_ptr, dv_ptr, qn_col, qp_col, kn_col, kp_col, v_col, do_col, dkn_hs, dv_hs, seqlen, n_heads, sm_scale,
    qk_scale,
    STAGES: gl.constexpr, HAS_DOC: gl.constexpr, num_warps: gl.constexpr,
):
    """dk_nope (the input dtype), dk_pe (fp32, per head) and dv, (bsz, seqlen, heads, .) with rows heads apart,
    of 64 keys; with documents (HAS_DOC; dstart, dend (bsz, seqlen) int32) the steps end with the last key's
    document."""
    HK: gl.constexpr = kn_desc.block_type.shape[0]
    MQ: gl.constexpr = qn_desc.block_type.shape[0]
    dtype: gl.constexpr = qn_desc.dtype
    kn = gl.allocate_shared_memory(dtype, [HK, kn_desc.block_type.shape[1]], kn_desc.layout)
    kp = gl.allocate_shared_memory(dtype, [HK, kp_desc.block_type.shape[1]], kp_desc.layout)
    v = gl.allocate_shared_memory(dtype, [HK, v_desc.block_type.shape[1]], v_desc.layout)
    q_n, q_p, d_o = _query_ring(qn_desc, qp_desc, do_desc, STAGES)
    ds_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HK, MQ], dtype)
    pt_buf = gl.allocate_shared_memory(dtype, [2, HK, MQ], ds_l)
    ds_buf = gl.allocate_shared_memory(dtype, [2, HK, MQ], ds_l)
    k_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(k_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_bar.index(i), count=1)
        mbarrier.init(q_free.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(free.index(i), count=1)
    pid_bh = gl.program_id(0)
    key0 = gl.program_id(1) * HK  # key block 0 has the longest loop and starts first
    row0 = (pid_bh // n_heads) * seqlen
    off_h = pid_bh % n_heads
    q_end = seqlen
    if HAS_DOC:  # queries from the end of the last key's document on see none of these keys
        q_end = gl.load(dend_ptr + row0 + gl.minimum(key0 + HK, seqlen) - 1)
    n_steps = gl.cdiv(q_end - key0, MQ)
    gl.warp_specialize(
        [
            (_split_probs, (kn, kp, v, k_bar, q_n, q_p, d_o, q_bar, q_free, pt_buf, ds_buf, ready, free, lse_ptr,
                            delta_ptr, dstart_ptr, pid_bh, row0, key0, n_steps, seqlen, qk_scale, STAGES, num_warps,
                            HAS_DOC)),
            (_split_dkdv, (d_o, q_n, q_p, q_bar, q_free, pt_buf, ds_buf, ready, free, dkn_ptr, dkp_ptr, dv_ptr,
                           dkn_hs, dv_hs, row0, key0, off_h, n_steps, seqlen, n_heads, sm_scale, STAGES, 4)),
            (_split_loader, (qn_desc, qp_desc, do_desc, kn_desc, kp_desc, v_desc, kn, kp, v, k_bar, q_n, q_p, d_o,
                             q_bar, q_free, row0, key0, off_h, n_steps, qn_col, qp_col, do_col, kn_col, kp_col,
                             v_col, STAGES)),
        ],
        SPLIT_WORKER_WARPS,
        SPLIT_WORKER_REGS,
    )
    mbarrier.invalidate(k_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(q_bar.index(i))
        mbarrier.invalidate(q_free.index(i))
    for i in gl.static_range(2):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(free.index(i))
# fmt: on


# ---- launcher ------------------------------------------------------------------------------------------------
# (query rows a step, ring slots). Shared memory: the keys 40 KiB, 40 KiB a slot, P^T and dS^T 32 KiB: 197 KiB
# with 3 slots (4 would not fit). H100, B2 H16 S4096: 3 slots 0.744-0.746 ms, 2 slots 0.981-0.982 (the dk/dv
# warpgroup releases a step about one step behind the first, so 2 slots starve the loader).
SPLIT_CONFIG = (64, 3)
SPLIT_K = 64  # keys a program
# The dk/dv warpgroup and the loader warp; the default warpgroup gets what they leave of the 12 x 168 pool: 256
# (ptxas: no spill in any partition, Triton 3.6).
SPLIT_WORKER_WARPS = gl.constexpr([4, 1])
SPLIT_WORKER_REGS = gl.constexpr([208, 40])


def mla_dkdv_split_sm90(
    do, q_nope, q_pe, k_nope, k_pe, v, lse, delta, scale: float, doc_bounds=None, config=None, into=None
):
    """As mla_attention_bwd_sm90.mla_dkdv_sm90: dk_nope, dk_pe per head (fp32), dv; config (query rows a step,
    ring slots); into: views to write dk_nope and dv to."""
    block_m, stages = config or SPLIT_CONFIG
    return launch_dkdv(_mla_bwd_dkdv_split_kernel_sm90, SPLIT_K, SPLIT_K, block_m, stages, do, q_nope, q_pe, k_nope,
                       k_pe, v, lse, delta, scale, doc_bounds, into)  # fmt: skip
