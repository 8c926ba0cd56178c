"""Fused multi-head latent attention (MLA) for DeepSeek-V3 shapes: forward and backward in Triton.

Scores are q_nope . k_nope + q_pe . k_pe, with the RoPE key k_pe one vector per token shared by every head
(bsz, seqlen, 1, rope): the kernels read it from that one copy, never from a per-head expansion, and the backward
returns its gradient summed over heads. Causal, optionally also within documents of a packed row (doc_ids).
Flash-attention style: the forward keeps a running max and sum (base-2 exponentials, the scale folded into
log2(e)) and saves the log-sum-exp per row. The backward (kernels/mla_attention_bwd.py) recomputes the
probabilities twice: per key block for dk/dv, and per query block for dq; no atomics, results are deterministic.
Longest causal loops start first. On Hopper the forward and dq run as the warp-specialised Gluon kernels of
mla_attention_sm90.py instead (SM90 below), with or without documents, and dk/dv as the one of
mla_attention_bwd_sm90.py; there the dq kernel also forms the row sums delta, so the backward has no separate
pass for them. The model calls mla_attention_rope.py, which takes q before RoPE and kv whole.

Scope and limits:
- q_nope, k_nope: (bsz, seqlen, heads, nope); q_pe: (bsz, seqlen, heads, rope); k_pe: (bsz, seqlen, 1 or heads,
  rope); v: (bsz, seqlen, heads, v_dim). Head dims powers of two (>= 16 on GPU: tensor-core tiles); nope 128,
  rope 64, v 128 for DeepSeek-V2/V3. Any strides with a contiguous last dim (views of the projections are fine).
- doc_ids (bsz, seqlen) integer, non-decreasing along each row (documents packed one after another, as the
  data loader writes them); a position attends only to earlier positions with the same id. The kernels take
  each position's document bounds (document_bounds), computed once a step by the model, or here per call.
- fp16 / bf16 on CUDA (fp32 accumulation, probabilities cast to the input dtype before the PV product, as every
  flash kernel does); fp32 works too (tf32 dots on GPU, exact under TRITON_INTERPRET=1, which the CPU tests use).
- The softmax scale is the caller's (it includes the YaRN mscale). Dropout, bias and sliding windows: not here.
Autotuning is keyed on the head dims and the masking mode, not on seqlen: the first call at a given head shape
picks the config for all later calls.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from titan_dsv3.kernels import require_same_device

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
# Masked scores: finite, so a row whose first key block is fully masked keeps a finite running max; its bogus
# sum is multiplied by exp2(-1e30 - real max) = 0 at the diagonal block, which every row reaches.
_MASKED = tl.constexpr(-1.0e30)


# ---- forward -------------------------------------------------------------------------------------------------


@triton.jit
def _key_block_scores(
    qn, qp, kn_base, kp_base, skn_s, skp_s, offs_n, n_ok, DN: tl.constexpr, DR: tl.constexpr
):
    """q.k of a query block with one key block (BLOCK_M, BLOCK_N), unscaled; also the key block's nope part and
    the rope key shared by all heads, loaded transposed as (DN, BLOCK_N) and (DR, BLOCK_N) for the dq products."""
    offs_dn = tl.arange(0, DN)
    offs_dr = tl.arange(0, DR)
    knT = tl.load(kn_base + offs_n[None, :] * skn_s + offs_dn[:, None], mask=n_ok[None, :], other=0.0)
    kpT = tl.load(kp_base + offs_n[None, :] * skp_s + offs_dr[:, None], mask=n_ok[None, :], other=0.0)
    s = tl.dot(qn, knT)
    return tl.dot(qp, kpT, s), knT, kpT


# fmt: off
@triton.jit
def _query_block(
    qn_ptr, qp_ptr, dstart_ptr, sqn_b, sqn_s, sqn_h, sqp_b, sqp_s, sqp_h, seqlen, n_heads,
    DN: tl.constexpr, DR: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """This program's batch, head and query block, for the kernels that loop over key blocks (forward, dq). Heads
    vary fastest and query blocks run last-to-first: the longest causal rows start first. Returns off_b, off_h,
    the block's first row, its rows (BLOCK_M,) and their mask, q_nope (BLOCK_M, DN), q_pe (BLOCK_M, DR), each row's
    document start (the row itself without documents) and the first key block any of its rows sees."""
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    start = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    offs_m = start + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seqlen
    qn_base = qn_ptr + off_b * sqn_b + off_h * sqn_h
    qp_base = qp_ptr + off_b * sqp_b + off_h * sqp_h
    qn = tl.load(qn_base + offs_m[:, None] * sqn_s + tl.arange(0, DN)[None, :], mask=m_ok[:, None], other=0.0)
    qp = tl.load(qp_base + offs_m[:, None] * sqp_s + tl.arange(0, DR)[None, :], mask=m_ok[:, None], other=0.0)
    if HAS_DOC:
        dstart_m = tl.load(dstart_ptr + off_b * seqlen + offs_m, mask=m_ok, other=0)
        lo = (tl.load(dstart_ptr + off_b * seqlen + start) // BLOCK_N) * BLOCK_N
    else:
        dstart_m = offs_m
        lo = 0
    return off_b, off_h, start, offs_m, m_ok, qn, qp, dstart_m, lo


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, qn, qp, kn_base, kp_base, v_base, skn_s, skp_s, sv_s,
    offs_m, dstart_m, lo, hi, seqlen, qk_scale,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
):
    offs_dv = tl.arange(0, DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen
        s, _, _ = _key_block_scores(qn, qp, kn_base, kp_base, skn_s, skp_s, offs_n, n_ok, DN, DR)
        s = s * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
        if CAUSAL:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, _MASKED)
        if HAS_DOC:
            s = tl.where(offs_n[None, :] >= dstart_m[:, None], s, _MASKED)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * sv_s + offs_dv[None, :], mask=n_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i

# fmt: on


def _fwd_configs():
    if _INTERPRET:  # two key blocks per diagonal query block, as on GPU
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # (query block, key block, warps, stages); the key block divides the query block. Measured on H200 (B2 H16
    # S4096, benchmarks/RESULTS.md): causal 128 x 64 w8 s3 0.39 ms, 128 x 128 w8 s2 0.42, 64 x 64 w4 s2 0.46;
    # with documents 64 x 32 w4 s3 0.178 ms, 64 x 64 w4 s2 0.180 (4 warps and <= 104 KiB: two blocks a SM).
    shapes = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# fmt: off
@triton.autotune(configs=_fwd_configs(), key=["DN", "DR", "DV", "HAS_DOC"])
@triton.jit(do_not_specialize=["seqlen", "n_heads"])
def _mla_fwd_kernel(
    qn_ptr, qp_ptr, kn_ptr, kp_ptr, v_ptr, o_ptr, lse_ptr, dstart_ptr,
    sqn_b, sqn_s, sqn_h, sqp_b, sqp_s, sqp_h, skn_b, skn_s, skn_h, skp_b, skp_s, skp_h,
    sv_b, sv_s, sv_h, so_b, so_s, so_h,
    seqlen, n_heads, qk_scale,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, HAS_DOC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Output and base-2 log-sum-exp of one query block (_query_block), over the key blocks it sees."""
    off_b, off_h, start_m, offs_m, m_ok, qn, qp, dstart_m, lo = _query_block(
        qn_ptr, qp_ptr, dstart_ptr, sqn_b, sqn_s, sqn_h, sqp_b, sqp_s, sqp_h, seqlen, n_heads,
        DN, DR, HAS_DOC, BLOCK_M, BLOCK_N,
    )
    kn_base = kn_ptr + off_b * skn_b + off_h * skn_h
    kp_base = kp_ptr + off_b * skp_b + off_h * skp_h  # skp_h = 0: one rope key for all heads
    v_base = v_ptr + off_b * sv_b + off_h * sv_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    # key blocks left of the diagonal need no causal mask; then the diagonal block(s)
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, qn, qp, kn_base, kp_base, v_base, skn_s, skp_s, sv_s, offs_m, dstart_m,
        lo, start_m, seqlen, qk_scale, DN, DR, DV, BLOCK_N, False, HAS_DOC,
    )
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, qn, qp, kn_base, kp_base, v_base, skn_s, skp_s, sv_s, offs_m, dstart_m,
        start_m, tl.minimum(start_m + BLOCK_M, seqlen), seqlen, qk_scale, DN, DR, DV, BLOCK_N, True, HAS_DOC,
    )
    acc = acc / l_i[:, None]
    o_base = o_ptr + off_b * so_b + off_h * so_h
    offs_dv = tl.arange(0, DV)
    tl.store(o_base + offs_m[:, None] * so_s + offs_dv[None, :], acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None])
    tl.store(lse_ptr + tl.program_id(0).to(tl.int64) * seqlen + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)


# ---- launchers -----------------------------------------------------------------------------------------------


def document_bounds(doc_ids: torch.Tensor) -> torch.Tensor:
    """(2, bsz, seqlen) int32: the first position and one past the last position of each position's document.
    A dozen small ops: a model computes it once a step and hands it to every layer (doc_bounds=)."""
    bsz, seqlen = doc_ids.shape
    pos = torch.arange(seqlen, device=doc_ids.device, dtype=torch.int32).expand(bsz, seqlen)
    change = doc_ids[:, 1:] != doc_ids[:, :-1]  # (bsz, seqlen - 1): a new document starts at i + 1
    starts_here = torch.cat([torch.ones_like(change[:, :1]), change], dim=1)
    ends_here = torch.cat([change, torch.ones_like(change[:, :1])], dim=1)
    start = torch.where(starts_here, pos, 0).cummax(dim=1).values
    end = torch.where(ends_here, pos + 1, seqlen).flip(1).cummin(dim=1).values.flip(1)
    return torch.stack([start, end]).to(torch.int32)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(q_nope, q_pe, k_nope, k_pe, v) -> None:
    on_device = q_nope.is_cuda or _INTERPRET
    if not on_device:
        raise ValueError(
            "mla_attention runs on CUDA (or under TRITON_INTERPRET=1); use mla_attention_reference"
        )
    bsz, seqlen, heads, nope = q_nope.shape
    rope = q_pe.shape[-1]
    if q_pe.shape[:3] != (bsz, seqlen, heads) or k_nope.shape != q_nope.shape:
        raise ValueError(
            f"shapes q_nope {tuple(q_nope.shape)}, q_pe {tuple(q_pe.shape)}, k_nope {tuple(k_nope.shape)}"
        )
    if k_pe.shape not in ((bsz, seqlen, 1, rope), (bsz, seqlen, heads, rope)):
        raise ValueError(f"k_pe {tuple(k_pe.shape)}: expected ({bsz}, {seqlen}, 1 or {heads}, {rope})")
    if v.shape[:3] != (bsz, seqlen, heads):
        raise ValueError(f"v {tuple(v.shape)} does not match q {tuple(q_nope.shape)}")
    for name, d in (("nope", nope), ("rope", rope), ("v", v.shape[-1])):
        if d & (d - 1) or (d < 16 and not _INTERPRET):
            raise ValueError(f"{name} head dim {d}: the kernel needs a power of two >= 16")
    if len({t.dtype for t in (q_nope, q_pe, k_nope, k_pe, v)}) != 1:
        raise ValueError("q, k, v must share one dtype")
    require_same_device("q", q_nope, q_pe=q_pe, k_nope=k_nope, k_pe=k_pe, v=v)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, seq, head) strides of a (bsz, seqlen, heads, dim) tensor; a broadcast head has stride 0."""
    return t.stride(0), t.stride(1), (t.stride(2) if t.shape[2] > 1 else 0)


# Hopper: the Gluon forward and dq kernels of mla_attention_sm90.py and the dk/dv kernel of
# mla_attention_bwd_sm90.py (TMA, asynchronous wgmma; the same results to fp32 rounding order, dk/dv
# bit-equal). H200, B2 H16 S4096: forward 0.29-0.33 ms against Triton's 0.40, dq 0.39-0.43 against 0.55, dk/dv
# 0.76-0.79 against 0.80-0.83; H100, dk/dv with lse loaded a step ahead 0.694 (benchmarks/RESULTS.md, stop 32).
# False keeps the Triton kernels (the GPU test compares the two).
SM90 = True


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def sm90_kernels(*ts):
    """mla_attention_sm90 when the Gluon kernels take this call (Hopper, SM90, bf16/fp16 views TMA can read,
    DeepSeek-V2/V3's head dims: nope 128, rope 64, v 128, the ones tested), else None."""
    t = ts[0]
    if not (SM90 and t.is_cuda and not _INTERPRET):
        return None
    if _capability(t.device.index) != (9, 0):
        return None
    if (t.shape[-1], ts[1].shape[-1], ts[-1].shape[-1]) != (128, 64, 128):
        return None
    from titan_dsv3.kernels import mla_attention_sm90

    return mla_attention_sm90 if mla_attention_sm90.usable(*ts) else None


def _mla_fwd(q_nope, q_pe, k_nope, k_pe, v, doc_bounds, scale):
    """Launcher: returns out (bsz, seqlen, heads, v_dim) and the base-2 log-sum-exp (bsz, heads, seqlen) fp32."""
    q_nope, q_pe, k_nope, k_pe, v = (_last_dim_contiguous(t) for t in (q_nope, q_pe, k_nope, k_pe, v))
    _check(q_nope, q_pe, k_nope, k_pe, v)
    sm90 = sm90_kernels(q_nope, q_pe, k_nope, k_pe, v)
    if sm90 is not None:
        return sm90.mla_fwd_sm90(q_nope, q_pe, k_nope, k_pe, v, scale, doc_bounds)
    bsz, seqlen, heads, nope = q_nope.shape
    out = torch.empty(bsz, seqlen, heads, v.shape[-1], device=v.device, dtype=v.dtype)
    lse = torch.empty(bsz, heads, seqlen, device=v.device, dtype=torch.float32)
    dstart = doc_bounds[0] if doc_bounds is not None else lse  # lse: unused
    grid = lambda meta: (bsz * heads, triton.cdiv(seqlen, meta["BLOCK_M"]))  # noqa: E731
    _mla_fwd_kernel[grid](
        q_nope, q_pe, k_nope, k_pe, v, out, lse, dstart,
        *_strides(q_nope), *_strides(q_pe), *_strides(k_nope), *_strides(k_pe), *_strides(v), *_strides(out),
        seqlen, heads, scale * _LOG2E,
        DN=nope, DR=q_pe.shape[-1], DV=v.shape[-1], HAS_DOC=doc_bounds is not None,
    )  # fmt: skip
    return out, lse


# ---- custom op and autograd ----------------------------------------------------------------------------------
# Opaque to torch.compile (traced around through the fakes); no `from __future__ import annotations` in this
# file, because torch.library reads the signatures' annotations to build the op schema.


@torch.library.custom_op("titan_dsv3::mla_attention_fwd", mutates_args=())
def _mla_fwd_op(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    k_nope: torch.Tensor,
    k_pe: torch.Tensor,
    v: torch.Tensor,
    doc_bounds: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _mla_fwd(q_nope, q_pe, k_nope, k_pe, v, doc_bounds, scale)


@_mla_fwd_op.register_fake
def _(q_nope, q_pe, k_nope, k_pe, v, doc_bounds, scale):
    bsz, seqlen, heads, _ = q_nope.shape
    out = v.new_empty(bsz, seqlen, heads, v.shape[-1])
    return out, q_nope.new_empty(bsz, heads, seqlen, dtype=torch.float32)


@torch.library.custom_op("titan_dsv3::mla_attention_bwd", mutates_args=())
def _mla_bwd_op(
    do: torch.Tensor,
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    k_nope: torch.Tensor,
    k_pe: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    doc_bounds: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from titan_dsv3.kernels.mla_attention_bwd import mla_backward  # that file imports this one's helpers

    return mla_backward(do, q_nope, q_pe, k_nope, k_pe, v, out, lse, doc_bounds, scale)


@_mla_bwd_op.register_fake
def _(do, q_nope, q_pe, k_nope, k_pe, v, out, lse, doc_bounds, scale):
    def fresh(t):
        return t.new_empty(t.shape)

    return fresh(q_nope), fresh(q_pe), fresh(k_nope), fresh(k_pe), fresh(v)


def _setup_context(ctx, inputs, output):
    q_nope, q_pe, k_nope, k_pe, v, doc_bounds, scale = inputs
    out, lse = output
    ctx.save_for_backward(q_nope, q_pe, k_nope, k_pe, v, out, lse, doc_bounds)
    ctx.scale = scale


def _backward(ctx, d_out, _d_lse):
    q_nope, q_pe, k_nope, k_pe, v, out, lse, doc_bounds = ctx.saved_tensors
    grads = _mla_bwd_op(d_out, q_nope, q_pe, k_nope, k_pe, v, out, lse, doc_bounds, ctx.scale)
    return (*grads, None, None)


_mla_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerMLA(torch.autograd.Function):
    """The same launchers outside torch.compile, without the custom op's dispatch: the op's layers (its
    autograd wrapper, the dispatcher's Python kernels, the output aliasing check) cost about 70 us of host time a
    forward + backward on the CPU machine, where the GPU work of a B2 H16 S4096 call is 1.5 ms."""

    @staticmethod
    def forward(ctx, q_nope, q_pe, k_nope, k_pe, v, doc_bounds, scale):
        out, lse = _mla_fwd(q_nope, q_pe, k_nope, k_pe, v, doc_bounds, scale)
        _setup_context(ctx, (q_nope, q_pe, k_nope, k_pe, v, doc_bounds, scale), (out, lse))
        return out

    @staticmethod
    def backward(ctx, d_out):
        from titan_dsv3.kernels.mla_attention_bwd import mla_backward

        q_nope, q_pe, k_nope, k_pe, v, out, lse, doc_bounds = ctx.saved_tensors
        grads = mla_backward(d_out, q_nope, q_pe, k_nope, k_pe, v, out, lse, doc_bounds, ctx.scale)
        return (*grads, None, None)


def _split_pow2(d: int) -> int:
    """Split point of a per-head qk dim into two power-of-two parts (192 -> 128 + 64)."""
    first = 1 << (d.bit_length() - 1)
    return first // 2 if first == d else first


def _as_parts(q, k, k_pe, q_pe):
    if k_pe is None:  # full per-head k: any power-of-two split computes the same dot product
        nope = _split_pow2(k.shape[-1])
        k, k_pe = k[..., :nope], k[..., nope:]
    if q_pe is None:
        q, q_pe = q[..., : k.shape[-1]], q[..., k.shape[-1] :]
    return q, q_pe, k, k_pe


def mla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    doc_ids: torch.Tensor | None = None,
    k_pe: torch.Tensor | None = None,
    q_pe: torch.Tensor | None = None,
    doc_bounds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (document-masked when doc_ids or doc_bounds is given) attention; returns (bsz, seqlen, heads, v_dim).

    With k_pe (bsz, seqlen, 1, rope): k is k_nope (bsz, seqlen, heads, nope) and q is either the full
    (.., nope + rope) query or, with q_pe given, q_nope. Without k_pe: q, k are full per-head (.., qk_dim).
    doc_bounds: document_bounds(doc_ids), computed once for many calls; doc_ids alone computes it here.
    """
    q_nope, q_pe, k_nope, k_pe = _as_parts(q, k, k_pe, q_pe)
    if doc_bounds is None and doc_ids is not None:
        doc_bounds = document_bounds(doc_ids)
    want = (2, *q_nope.shape[:2])
    if doc_bounds is not None and (tuple(doc_bounds.shape) != want or doc_bounds.dtype != torch.int32):
        raise ValueError(
            f"doc_bounds {tuple(doc_bounds.shape)} {doc_bounds.dtype}: expected {want} int32, as "
            "document_bounds(doc_ids) returns (pass doc_ids= for the ids themselves)"
        )
    require_same_device("q", q_nope, doc_bounds=doc_bounds)
    # The custom op under torch.compile (traced around through its fakes) and under a dispatch mode: selective
    # activation checkpointing sees it as one op and keeps its output, where it would rerun the autograd.Function.
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        out, _ = _mla_fwd_op(q_nope, q_pe, k_nope, k_pe, v, doc_bounds, float(scale))
        return out
    return _EagerMLA.apply(q_nope, q_pe, k_nope, k_pe, v, doc_bounds, float(scale))


def mla_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    doc_ids: torch.Tensor | None = None,
    k_pe: torch.Tensor | None = None,
    q_pe: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same attention in plain torch, in the inputs' dtype (pass float64 tensors for a reference)."""
    q_nope, q_pe, k_nope, k_pe = _as_parts(q, k, k_pe, q_pe)
    heads = q_nope.shape[2]
    q = torch.cat([q_nope, q_pe], dim=-1)  # (bsz, seqlen, heads, qk_dim)
    k = torch.cat([k_nope, k_pe.expand(-1, -1, heads, -1)], dim=-1)
    seqlen = q.shape[1]
    scores = torch.einsum("bmhd,bnhd->bhmn", q, k) * scale
    keep = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
    if doc_ids is not None:
        keep = keep & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])  # (bsz, 1, seqlen, seqlen)
    probs = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhmn,bnhd->bmhd", probs, v)


def attention_flops(
    bsz: int, seqlen: int, heads: int, qk_dim: int, v_dim: int, backward: bool = True
) -> float:
    """Matmul FLOPs of causal attention (half the square): 2 GEMMs forward, 5 backward (one recomputes QK)."""
    pairs = bsz * heads * seqlen * seqlen / 2
    fwd = 2 * pairs * (qk_dim + v_dim)
    return fwd + (2 * pairs * (2 * qk_dim + 2 * v_dim + qk_dim) if backward else 0.0)
