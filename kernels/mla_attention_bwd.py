"""Backward of the fused MLA attention (kernels/mla_attention.py): Triton kernels and their launcher.

Two kernels after a row-sum pass (delta = rowsum(o * do)): dk/dv per key block, looping over the query blocks
that see it, and dq per query block, looping over its key blocks. Each recomputes the probabilities from the
forward's log-sum-exp, so the backward does 7 matmuls where a single pass would do 5; one fused kernel needed
more registers than either (spills on sm_90), and the dq accumulation across key blocks would need atomics.
No atomics: results are deterministic. Storing dS from the dk/dv pass for a dq GEMM was measured slower (H200,
benchmarks/RESULTS.md). On Hopper (mla_attention.SM90) the Gluon dq kernel of mla_attention_sm90.py runs first
and forms delta itself (no row-sum pass), then dk/dv from mla_attention_bwd_sm90.py. See the forward's file for
shapes, masks and scope.
"""

import torch
import triton
import triton.language as tl

from titan_dsv3.kernels.mla_attention import (
    _INTERPRET,
    _LOG2E,
    _key_block_scores,
    _last_dim_contiguous,
    _query_block,
    _strides,
    sm90_kernels,
)


# fmt: off
@triton.jit
def _bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr, so_b, so_s, so_h, sdo_b, sdo_s, sdo_h, seqlen, n_heads,
    DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(o * do), the softmax-backward term shared by every key of a row."""
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seqlen
    offs_dv = tl.arange(0, DV)
    o = tl.load(o_ptr + off_b * so_b + off_h * so_h + offs_m[:, None] * so_s + offs_dv[None, :], mask=m_ok[:, None])
    do = tl.load(
        do_ptr + off_b * sdo_b + off_h * sdo_h + offs_m[:, None] * sdo_s + offs_dv[None, :], mask=m_ok[:, None]
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * seqlen + offs_m, delta, mask=m_ok)


@triton.jit
def _head_sum_kernel(x_ptr, out_ptr, rows, H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """out[r, :] = sum over h of x[r, h, :] for (rows, H, D) fp32 x, stored in out's dtype: the shared rope key's
    gradient from the per-head ones in one pass. H100, B2 S4096 H16 (do_bench, benchmarks/RESULTS.md):
    0.0235-0.0241 ms against 0.0248 for torch's sum over the middle dim and its cast (two kernels)."""
    offs_r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs = tl.arange(0, H * D)
    r_ok = offs_r < rows
    x = tl.load(x_ptr + offs_r.to(tl.int64)[:, None] * (H * D) + offs[None, :], mask=r_ok[:, None], other=0.0)
    total = tl.sum(tl.reshape(x, (BLOCK, H, D)), 1)
    offs_d = tl.arange(0, D)
    tl.store(out_ptr + offs_r.to(tl.int64)[:, None] * D + offs_d[None, :], total.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None])


@triton.jit
def _bwd_dkdv_inner(
    dkn, dkp, dv, kn, kp, v, qn_base, qp_base, do_base, lse_base, delta_base, dstart_base,
    sqn_s, sqp_s, sdo_s, offs_n, lo, hi, seqlen, qk_scale,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DOC: tl.constexpr,
):
    """Accumulate dk, dv of one key block over query blocks [lo, hi); everything transposed (keys x queries)."""
    offs_dn = tl.arange(0, DN)
    offs_dr = tl.arange(0, DR)
    offs_dv = tl.arange(0, DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seqlen
        qnT = tl.load(qn_base + offs_m[None, :] * sqn_s + offs_dn[:, None], mask=m_ok[None, :], other=0.0)
        qpT = tl.load(qp_base + offs_m[None, :] * sqp_s + offs_dr[:, None], mask=m_ok[None, :], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))  # rows past the end: p = 0
        sT = tl.dot(kn, qnT)
        sT = tl.dot(kp, qpT, sT)  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(sT * qk_scale - lse[None, :])
        pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        if HAS_DOC:
            dstart = tl.load(dstart_base + offs_m, mask=m_ok, other=0)
            pT = tl.where(offs_n[:, None] >= dstart[None, :], pT, 0.0)
        do = tl.load(do_base + offs_m[:, None] * sdo_s + offs_dv[None, :], mask=m_ok[:, None], other=0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do))
        dsT = (pT * (dpT - delta[None, :])).to(qnT.dtype)
        dkn = tl.dot(dsT, tl.trans(qnT), dkn)
        dkp = tl.dot(dsT, tl.trans(qpT), dkp)
    return dkn, dkp, dv


@triton.jit
def _bwd_dq_inner(
    dqn, dqp, qn, qp, do, lse, delta, kn_base, kp_base, v_base, skn_s, skp_s, sv_s,
    offs_m, dstart_m, lo, hi, seqlen, qk_scale,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
):
    """Accumulate dq of one query block over key blocks [lo, hi)."""
    offs_dv = tl.arange(0, DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen
        s, knT, kpT = _key_block_scores(qn, qp, kn_base, kp_base, skn_s, skp_s, offs_n, n_ok, DN, DR)
        vT = tl.load(v_base + offs_n[None, :] * sv_s + offs_dv[:, None], mask=n_ok[None, :], other=0.0)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if CAUSAL:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        if HAS_DOC:
            p = tl.where(offs_n[None, :] >= dstart_m[:, None], p, 0.0)
        dp = tl.dot(do, vT)
        ds = (p * (dp - delta[:, None])).to(knT.dtype)
        dqn = tl.dot(ds, tl.trans(knT), dqn)
        dqp = tl.dot(ds, tl.trans(kpT), dqp)
    return dqn, dqp
# fmt: on


def _configs(shapes, interpret_shape):
    """(BLOCK_M, BLOCK_N, warps, stages) -> configs; one small one under the interpreter."""
    if _INTERPRET:
        shapes = [(*interpret_shape, 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# (query block, key block, warps, stages). dk + dv take 320 fp32 accumulator columns per key row. Measured on H200
# (B2 H16 S4096, benchmarks/RESULTS.md), one loop: causal 32 x 64 w4 s3 0.81 ms, 32 x 128 w8 s3 0.84, 32 x 64 w4
# s2 0.86 (then 16 x 64 w4 s3 0.94, 64 x 128 w8 s2 1.07, 64 x 64 w8 s3 1.45, 32 x 64 w4 s4 1.33); with documents
# 32 x 64 w4 s3 0.30 ms. The two-loop kernel's best was 64 x 128 w8 s2, 0.93 ms.
_DKDV_SHAPES = [(32, 64, 4, 3), (32, 128, 8, 3), (32, 64, 4, 2)]
# dq: the key block divides the query block (the diagonal loop walks the query block's own keys). Measured: causal
# 128 x 32 w8 s3 0.55 ms, 64 x 32 w4 s3 0.55, 64 x 32 w4 s2 0.65; with documents 64 x 32 w4 s3 0.19 ms, 128 x 32
# w8 s3 0.22.
_DQ_SHAPES = [(128, 32, 8, 3), (64, 32, 4, 3), (64, 32, 4, 2)]


# fmt: off
@triton.autotune(configs=_configs(_DKDV_SHAPES, (16, 32)), key=["DN", "DR", "DV", "HAS_DOC"])
@triton.jit(do_not_specialize=["seqlen", "n_heads"])
def _mla_bwd_dkdv_kernel(
    qn_ptr, qp_ptr, kn_ptr, kp_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dstart_ptr, dend_ptr,
    dkn_ptr, dkp_ptr, dv_ptr,
    sqn_b, sqn_s, sqn_h, sqp_b, sqp_s, sqp_h, skn_b, skn_s, skn_h, skp_b, skp_s, skp_h,
    sv_b, sv_s, sv_h, sdo_b, sdo_s, sdo_h,
    seqlen, n_heads, sm_scale, qk_scale,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, HAS_DOC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk_nope, dk_pe (per head, fp32), dv of one key block, looping over the query blocks that see it.
    Outputs contiguous (bsz, seqlen, heads, dim). Key block 0 has the longest loop and starts first."""
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    start = tl.program_id(1) * BLOCK_N
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < seqlen
    offs_dn = tl.arange(0, DN)
    offs_dr = tl.arange(0, DR)
    offs_dv = tl.arange(0, DV)
    kn_base = kn_ptr + off_b * skn_b + off_h * skn_h
    kp_base = kp_ptr + off_b * skp_b + off_h * skp_h
    v_base = v_ptr + off_b * sv_b + off_h * sv_h
    kn = tl.load(kn_base + offs_n[:, None] * skn_s + offs_dn[None, :], mask=n_ok[:, None], other=0.0)
    kp = tl.load(kp_base + offs_n[:, None] * skp_s + offs_dr[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * sv_s + offs_dv[None, :], mask=n_ok[:, None], other=0.0)
    qn_base = qn_ptr + off_b * sqn_b + off_h * sqn_h
    qp_base = qp_ptr + off_b * sqp_b + off_h * sqp_h
    do_base = do_ptr + off_b * sdo_b + off_h * sdo_h
    lse_base = lse_ptr + pid_bh.to(tl.int64) * seqlen
    delta_base = delta_ptr + pid_bh.to(tl.int64) * seqlen
    dstart_base = dstart_ptr + off_b * seqlen
    dkn = tl.zeros([BLOCK_N, DN], tl.float32)
    dkp = tl.zeros([BLOCK_N, DR], tl.float32)
    dv = tl.zeros([BLOCK_N, DV], tl.float32)
    end = tl.minimum(start + BLOCK_N, seqlen)
    if HAS_DOC:  # queries after the last key's document cannot see this block
        hi = tl.load(dend_ptr + off_b * seqlen + end - 1)
    else:
        hi = seqlen
    # One loop with the causal mask on every query block. Split into the diagonal blocks and the ones below
    # (as the forward and dq kernels are), this kernel had every wgmma serialised by ptxas with triton 3.6
    # (C7511: the second loop's entry set accumulator registers while the first loop's last dots were in flight).
    dkn, dkp, dv = _bwd_dkdv_inner(
        dkn, dkp, dv, kn, kp, v, qn_base, qp_base, do_base, lse_base, delta_base, dstart_base,
        sqn_s, sqp_s, sdo_s, offs_n, start, hi, seqlen, qk_scale, DN, DR, DV, BLOCK_M, HAS_DOC,
    )
    row = (off_b * seqlen + offs_n) * n_heads.to(tl.int64) + off_h  # row of (bsz, seqlen, heads, .)
    tl.store(dkn_ptr + row[:, None] * DN + offs_dn[None, :], (dkn * sm_scale).to(dkn_ptr.dtype.element_ty),
             mask=n_ok[:, None])
    tl.store(dkp_ptr + row[:, None] * DR + offs_dr[None, :], dkp * sm_scale, mask=n_ok[:, None])
    tl.store(dv_ptr + row[:, None] * DV + offs_dv[None, :], dv.to(dv_ptr.dtype.element_ty), mask=n_ok[:, None])



@triton.autotune(configs=_configs(_DQ_SHAPES, (32, 16)), key=["DN", "DR", "DV", "HAS_DOC"])
@triton.jit(do_not_specialize=["seqlen", "n_heads"])
def _mla_bwd_dq_kernel(
    qn_ptr, qp_ptr, kn_ptr, kp_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dstart_ptr, dqn_ptr, dqp_ptr,
    sqn_b, sqn_s, sqn_h, sqp_b, sqp_s, sqp_h, skn_b, skn_s, skn_h, skp_b, skp_s, skp_h,
    sv_b, sv_s, sv_h, sdo_b, sdo_s, sdo_h,
    seqlen, n_heads, sm_scale, qk_scale,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, HAS_DOC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq_nope, dq_pe of one query block, looping over the key blocks it sees; the last block starts first."""
    off_b, off_h, start, offs_m, m_ok, qn, qp, dstart_m, lo = _query_block(
        qn_ptr, qp_ptr, dstart_ptr, sqn_b, sqn_s, sqn_h, sqp_b, sqp_s, sqp_h, seqlen, n_heads,
        DN, DR, HAS_DOC, BLOCK_M, BLOCK_N,
    )
    offs_dn = tl.arange(0, DN)
    offs_dr = tl.arange(0, DR)
    offs_dv = tl.arange(0, DV)
    do_base = do_ptr + off_b * sdo_b + off_h * sdo_h
    do = tl.load(do_base + offs_m[:, None] * sdo_s + offs_dv[None, :], mask=m_ok[:, None], other=0.0)
    bh = tl.program_id(0).to(tl.int64) * seqlen
    lse = tl.load(lse_ptr + bh + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_ptr + bh + offs_m, mask=m_ok, other=0.0)
    kn_base = kn_ptr + off_b * skn_b + off_h * skn_h
    kp_base = kp_ptr + off_b * skp_b + off_h * skp_h
    v_base = v_ptr + off_b * sv_b + off_h * sv_h
    dqn = tl.zeros([BLOCK_M, DN], tl.float32)
    dqp = tl.zeros([BLOCK_M, DR], tl.float32)
    # key blocks left of the diagonal, then the diagonal ones (causal mask)
    dqn, dqp = _bwd_dq_inner(
        dqn, dqp, qn, qp, do, lse, delta, kn_base, kp_base, v_base, skn_s, skp_s, sv_s, offs_m, dstart_m,
        lo, start, seqlen, qk_scale, DN, DR, DV, BLOCK_N, False, HAS_DOC,
    )
    dqn, dqp = _bwd_dq_inner(
        dqn, dqp, qn, qp, do, lse, delta, kn_base, kp_base, v_base, skn_s, skp_s, sv_s, offs_m, dstart_m,
        start, tl.minimum(start + BLOCK_M, seqlen), seqlen, qk_scale, DN, DR, DV, BLOCK_N, True, HAS_DOC,
    )
    row = (off_b * seqlen + offs_m) * n_heads.to(tl.int64) + off_h
    tl.store(dqn_ptr + row[:, None] * DN + offs_dn[None, :], (dqn * sm_scale).to(dqn_ptr.dtype.element_ty),
             mask=m_ok[:, None])
    tl.store(dqp_ptr + row[:, None] * DR + offs_dr[None, :], (dqp * sm_scale).to(dqp_ptr.dtype.element_ty),
             mask=m_ok[:, None])


# fmt: on


def mla_backward(do, q_nope, q_pe, k_nope, k_pe, v, out, lse, doc_bounds, scale, into=None, cos_sin=None):
    """Launcher: returns dq_nope, dq_pe, dk_nope, dk_pe (summed over heads when shared), dv. into: views to
    write dq_nope, dq_pe, dk_nope, dv to (slices of the projections' gradients, mla_attention_rope.py), with
    cos_sin the table q_pe was rotated by: dq_pe is then the gradient before the rotation."""
    do, out = _last_dim_contiguous(do), _last_dim_contiguous(out)  # both kernels that read o assume this
    q_nope, q_pe, k_nope, k_pe, v = (_last_dim_contiguous(t) for t in (q_nope, q_pe, k_nope, k_pe, v))
    bsz, seqlen, heads, _ = q_nope.shape
    dim_v = v.shape[-1]
    sm90 = sm90_kernels(q_nope, q_pe, k_nope, k_pe, v, do)
    if sm90 is not None:  # Hopper: the Gluon dq kernel (which also forms delta), then dk/dv
        dq_nope, dq_pe, delta = sm90.mla_dq_sm90(
            do, q_nope, q_pe, k_nope, k_pe, v, out, lse, scale, doc_bounds, into=into and into[:2],
            cos_sin=cos_sin,
        )  # fmt: skip
        # dk/dv: two warpgroups with whole steps, causal or with documents. With each step's lse loaded a step
        # ahead it beat the kernel that split a step over a probability and a dk/dv warpgroup (H100, B2 H16
        # S4096 causal: 0.694 ms against 0.721-0.748; benchmarks/RESULTS.md, stop 32), which was then removed.
        from titan_dsv3.kernels.mla_attention_bwd_sm90 import mla_dkdv_sm90

        dk_nope, dk_pe_heads, dv = mla_dkdv_sm90(
            do, q_nope, q_pe, k_nope, k_pe, v, lse, delta, scale, doc_bounds, into=into and (into[2], into[3])
        )
    else:
        delta = torch.empty_like(lse)
        _bwd_preprocess_kernel[(bsz * heads, triton.cdiv(seqlen, 64))](
            out, do, delta, *_strides(out), *_strides(do), seqlen, heads, DV=dim_v, BLOCK_M=64
        )
        dk_nope, dk_pe_heads, dv = _dkdv(do, q_nope, q_pe, k_nope, k_pe, v, lse, delta, doc_bounds, scale)
        dq_nope, dq_pe = _dq(do, q_nope, q_pe, k_nope, k_pe, v, lse, delta, doc_bounds, scale)
        if into is not None:  # the Triton kernels store contiguous tensors: copy them in
            from titan_dsv3.models.rope import apply_rope

            if cos_sin is not None:  # RoPE's transpose: the same turn by the negated angle (not the inverse:
                dq_pe = apply_rope(dq_pe, cos_sin * cos_sin.new_tensor([1.0, -1.0]))  # the table has mscale)
            for dst, src in zip(into, (dq_nope, dq_pe, dk_nope, dv)):
                dst.copy_(src)
            dq_nope, dq_pe, dk_nope, dv = into
    if k_pe.shape[2] == 1:
        dk_pe = _head_sum(dk_pe_heads, k_pe.dtype)
    else:
        dk_pe = dk_pe_heads.to(k_pe.dtype)
    return dq_nope, dq_pe, dk_nope, dk_pe, dv


def _head_sum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(bsz, seqlen, heads, d) fp32 contiguous -> its sum over heads (bsz, seqlen, 1, d) in dtype."""
    bsz, seqlen, heads, d = x.shape
    if heads & (heads - 1) or d & (d - 1):  # tl.arange wants powers of two
        return x.sum(dim=2, keepdim=True).to(dtype)
    out = torch.empty(bsz, seqlen, 1, d, device=x.device, dtype=dtype)
    block = max(1, 4096 // (heads * d))  # 16 KiB of fp32 a program
    _head_sum_kernel[(triton.cdiv(bsz * seqlen, block),)](x, out, bsz * seqlen, H=heads, D=d, BLOCK=block)
    return out


def _launch_args(do, q_nope, q_pe, k_nope, k_pe, v, lse, doc_bounds):
    """The document bounds (or stand-ins), strides and constants both Triton backward kernels take."""
    dstart, dend = (doc_bounds[0], doc_bounds[1]) if doc_bounds is not None else (lse, lse)  # lse: unused
    strides = [s for t in (q_nope, q_pe, k_nope, k_pe, v, do) for s in _strides(t)]
    consts = dict(DN=q_nope.shape[-1], DR=q_pe.shape[-1], DV=v.shape[-1], HAS_DOC=doc_bounds is not None)
    return dstart, dend, strides, consts


def _dkdv(do, q_nope, q_pe, k_nope, k_pe, v, lse, delta, doc_bounds, scale):
    """The dk/dv kernel: dk_nope, dk_pe per head (fp32), dv."""
    bsz, seqlen, heads, nope = q_nope.shape
    dk_nope = torch.empty(bsz, seqlen, heads, nope, device=v.device, dtype=k_nope.dtype)
    dk_pe_heads = torch.empty(bsz, seqlen, heads, q_pe.shape[-1], device=v.device, dtype=torch.float32)
    dv = torch.empty(bsz, seqlen, heads, v.shape[-1], device=v.device, dtype=v.dtype)
    dstart, dend, strides, consts = _launch_args(do, q_nope, q_pe, k_nope, k_pe, v, lse, doc_bounds)
    _mla_bwd_dkdv_kernel[lambda meta: (bsz * heads, triton.cdiv(seqlen, meta["BLOCK_N"]))](
        q_nope, q_pe, k_nope, k_pe, v, do, lse, delta, dstart, dend, dk_nope, dk_pe_heads, dv,
        *strides, seqlen, heads, scale, scale * _LOG2E, **consts,
    )  # fmt: skip
    return dk_nope, dk_pe_heads, dv


def _dq(do, q_nope, q_pe, k_nope, k_pe, v, lse, delta, doc_bounds, scale):
    """The Triton dq kernel: dq_nope, dq_pe."""
    bsz, seqlen, heads, nope = q_nope.shape
    dq_nope = torch.empty(bsz, seqlen, heads, nope, device=v.device, dtype=q_nope.dtype)
    dq_pe = torch.empty(bsz, seqlen, heads, q_pe.shape[-1], device=v.device, dtype=q_pe.dtype)
    dstart, _, strides, consts = _launch_args(do, q_nope, q_pe, k_nope, k_pe, v, lse, doc_bounds)
    _mla_bwd_dq_kernel[lambda meta: (bsz * heads, triton.cdiv(seqlen, meta["BLOCK_M"]))](
        q_nope, q_pe, k_nope, k_pe, v, do, lse, delta, dstart, dq_nope, dq_pe,
        *strides, seqlen, heads, scale, scale * _LOG2E, **consts,
    )  # fmt: skip
    return dq_nope, dq_pe
