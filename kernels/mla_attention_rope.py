"""The fused MLA attention taking the projections as the model makes them: q before RoPE (bsz, seqlen, heads,
nope + rope) and kv (bsz, seqlen, heads, nope + v), returning their gradients whole.

Called on views (q_nope, rotated q_pe, k_nope, v), the attention's backward hands autograd four gradients that
it then concatenates (and, for q_pe, rotates back) into the projections' gradients: on the H200 at B2 H16 S4096
those copies took 0.096 ms of the compiled chain's 1.70 (benchmarks/RESULTS.md). Here the RoPE of q_pe is one
pass ahead of the kernels (its rotated copy is what TMA reads and the backward reuses), and on Hopper the backward
kernels store straight into slices of one dq and one dkv, the dq kernel rotating dq_pe back in its epilogue
(mla_attention_sm90._unrotate). Elsewhere the slices are filled by copies after the kernels. The shared rope key
k_pe (bsz, seqlen, 1, rope) comes rotated (it is one vector a token; the model rotates it).

Layout and tables as models/rope.py: pairs (2i, 2i + 1) of the rope dims turn by angle pos * theta_i; cos_sin
(seqlen, rope / 2, 2) fp32, row p for position p.
"""

import torch
import triton
import triton.language as tl

from titan_dsv3.kernels import require_same_device
from titan_dsv3.kernels.mla_attention import _INTERPRET, _mla_fwd, document_bounds


@triton.jit
def _rope_kernel(x_ptr, cs_ptr, out_ptr, sx_b, sx_s, sx_h, seqlen, n_heads,
                 ROPE: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    """One (batch, position): every head's rope dims, read and written as contiguous rows (16-byte accesses), the
    pairs (x0, x1) -> (x0 c - x1 s, x0 s + x1 c) split apart in registers. Reading each pair's halves by stride-2
    loads instead ran at 0.44 TB/s (0.077 ms at B2 H16 S4096, H200)."""
    HALF: tl.constexpr = ROPE // 2
    row = tl.program_id(0)
    b = row // seqlen
    pos = row % seqlen
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, ROPE)
    h_ok = (offs_h < n_heads)[:, None]
    src = x_ptr + b.to(tl.int64) * sx_b + pos * sx_s + offs_h[:, None] * sx_h + offs_d[None, :]
    x0, x1 = tl.split(tl.reshape(tl.load(src, mask=h_ok, other=0.0).to(tl.float32), (BLOCK_H, HALF, 2)))
    cs = tl.reshape(tl.load(cs_ptr + pos * ROPE + tl.arange(0, ROPE)), (HALF, 2))
    c, s = tl.split(cs)
    c, s = c[None, :], s[None, :]
    y = tl.reshape(tl.join(x0 * c - x1 * s, x0 * s + x1 * c), (BLOCK_H, ROPE))
    dst = out_ptr + (row.to(tl.int64) * n_heads + offs_h[:, None]) * ROPE + offs_d[None, :]
    tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=h_ok)


def rope_rotate(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x (bsz, seqlen, heads, rope), any strides with a contiguous last dim, rotated into a contiguous tensor
    (the torch reference: models.rope.apply_rope)."""
    bsz, seqlen, heads, rope = x.shape
    out = torch.empty(bsz, seqlen, heads, rope, device=x.device, dtype=x.dtype)
    _rope_kernel[(bsz * seqlen,)](
        x, cos_sin, out, x.stride(0), x.stride(1), x.stride(2), seqlen, heads,
        ROPE=rope, BLOCK_H=triton.next_power_of_2(heads),
    )  # fmt: skip
    return out


def _forward(q, kv, k_pe, cos_sin, doc_bounds, scale, nope):
    q_pe = rope_rotate(q[..., nope:], cos_sin)
    out, lse = _mla_fwd(q[..., :nope], q_pe, kv[..., :nope], k_pe, kv[..., nope:], doc_bounds, scale)
    return out, lse, q_pe


def _backward(do, q, q_pe, kv, k_pe, out, lse, cos_sin, doc_bounds, scale, nope):
    from titan_dsv3.kernels.mla_attention_bwd import mla_backward

    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dkv = torch.empty(kv.shape, device=kv.device, dtype=kv.dtype)
    into = (dq[..., :nope], dq[..., nope:], dkv[..., :nope], dkv[..., nope:])
    grads = mla_backward(
        do,
        q[..., :nope],
        q_pe,
        kv[..., :nope],
        k_pe,
        kv[..., nope:],
        out,
        lse,
        doc_bounds,
        scale,
        into,
        cos_sin,
    )
    return dq, dkv, grads[3]


# ---- custom op (torch.compile, dispatch modes) and autograd.Function (eager) -----------------------------------
# No `from __future__ import annotations` here: torch.library reads the annotations to build the schemas.


@torch.library.custom_op("titan_dsv3::mla_attention_rope_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    kv: torch.Tensor,
    k_pe: torch.Tensor,
    cos_sin: torch.Tensor,
    doc_bounds: torch.Tensor | None,
    scale: float,
    nope: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q, kv, k_pe, cos_sin, doc_bounds, scale, nope)


@_fwd_op.register_fake
def _(q, kv, k_pe, cos_sin, doc_bounds, scale, nope):
    bsz, seqlen, heads, _ = q.shape
    out = kv.new_empty(bsz, seqlen, heads, kv.shape[-1] - nope)
    lse = q.new_empty(bsz, heads, seqlen, dtype=torch.float32)
    return out, lse, q.new_empty(bsz, seqlen, heads, q.shape[-1] - nope)


@torch.library.custom_op("titan_dsv3::mla_attention_rope_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    k_pe: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cos_sin: torch.Tensor,
    doc_bounds: torch.Tensor | None,
    scale: float,
    nope: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, q_pe, kv, k_pe, out, lse, cos_sin, doc_bounds, scale, nope)


@_bwd_op.register_fake
def _(do, q, q_pe, kv, k_pe, out, lse, cos_sin, doc_bounds, scale, nope):
    return q.new_empty(q.shape), kv.new_empty(kv.shape), k_pe.new_empty(k_pe.shape)


def _setup_context(ctx, inputs, output):
    q, kv, k_pe, cos_sin, doc_bounds, scale, nope = inputs
    out, lse, q_pe = output
    ctx.save_for_backward(q, q_pe, kv, k_pe, out, lse, cos_sin, doc_bounds)
    ctx.scale, ctx.nope = scale, nope


def _op_backward(ctx, d_out, _d_lse, _d_q_pe):
    dq, dkv, dk_pe = _bwd_op(d_out, *ctx.saved_tensors, ctx.scale, ctx.nope)
    return dq, dkv, dk_pe, None, None, None, None


_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerMLARope(torch.autograd.Function):
    """The same launchers outside torch.compile without the custom op's dispatch (as mla_attention._EagerMLA)."""

    @staticmethod
    def forward(ctx, q, kv, k_pe, cos_sin, doc_bounds, scale, nope):
        out, lse, q_pe = _forward(q, kv, k_pe, cos_sin, doc_bounds, scale, nope)
        _setup_context(ctx, (q, kv, k_pe, cos_sin, doc_bounds, scale, nope), (out, lse, q_pe))
        return out

    @staticmethod
    def backward(ctx, d_out):
        dq, dkv, dk_pe = _backward(d_out, *ctx.saved_tensors, ctx.scale, ctx.nope)
        return dq, dkv, dk_pe, None, None, None, None


def mla_attention_rope(
    q: torch.Tensor,
    kv: torch.Tensor,
    k_pe: torch.Tensor,
    cos_sin: torch.Tensor,
    *,
    scale: float,
    nope: int,
    doc_ids: torch.Tensor | None = None,
    doc_bounds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (document-masked given doc_ids or doc_bounds) MLA attention; returns (bsz, seqlen, heads, v_dim).

    q (bsz, seqlen, heads, nope + rope) before RoPE, kv (bsz, seqlen, heads, nope + v_dim), k_pe (bsz, seqlen, 1,
    rope) after RoPE, cos_sin (>= seqlen, rope / 2, 2): the model's table (used in fp32). Gradients flow to q, kv
    and k_pe.
    """
    bsz, seqlen, heads, qk = q.shape
    rope = qk - nope
    if kv.shape[:3] != (bsz, seqlen, heads) or not 0 < nope < min(qk, kv.shape[-1]):
        raise ValueError(f"q {tuple(q.shape)}, kv {tuple(kv.shape)}: nope = {nope} must split both")
    if cos_sin.shape[0] < seqlen or tuple(cos_sin.shape[1:]) != (rope // 2, 2):
        raise ValueError(
            f"cos_sin {tuple(cos_sin.shape)}: expected (>= {seqlen}, {rope // 2}, 2), as models.rope.rope_cos_sin "
            "makes it"
        )
    if q.stride(-1) != 1 or kv.stride(-1) != 1:
        raise ValueError("q and kv need a contiguous last dim")
    require_same_device("q", q, kv=kv, k_pe=k_pe, cos_sin=cos_sin, doc_bounds=doc_bounds)
    cos_sin = cos_sin[:seqlen].float().contiguous()
    if doc_bounds is None and doc_ids is not None:
        doc_bounds = document_bounds(doc_ids)
    if not (q.is_cuda or _INTERPRET):
        raise ValueError("mla_attention_rope runs on CUDA (or under TRITON_INTERPRET=1)")
    args = (q, kv, k_pe, cos_sin, doc_bounds, float(scale), int(nope))
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():  # as mla_attention
        return _fwd_op(*args)[0]
    return _EagerMLARope.apply(*args)
