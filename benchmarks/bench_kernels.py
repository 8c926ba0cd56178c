"""Kernel benchmarks on one GPU: fused MLA attention and the FP8 expert FFN, forward + backward.

    python benchmarks/bench_kernels.py [--only mla|fp8] [--json out.json] [--profile] [--host-profile] [--no-graphs]
        [--sweep] [--gemms] [--passes] [--no-peers]

MLA (B2 H16, qk 128 + 64 with one rope key per token, v 128, causal), S4096, S8192, and S4096 with documents
(exponential lengths, mean 512 tokens). Timed from the projections to the gradients, as the model runs it: q (bsz, seqlen,
heads, 192), kv (bsz, seqlen, heads, 256) and the raw k_pe (bsz, seqlen, 1, 64) in, RoPE on q_pe and k_pe, then
  sdpa   concatenation + per-head copy of k_pe + cuDNN SDPA (eager; "compiled": the chain under torch.compile)
  flex   (documents) the same with compiled FlexAttention and a document mask
  ours   the fused kernel as the model calls it: q before RoPE, kv whole, the shared k_pe (eager; compiled
         chain); 'on views': the kernels on q_nope, rotated q_pe, k_nope, v (autograd joins the gradients)
and the attention alone on ready tensors (cuDNN, ours). Errors: relative Frobenius error against float64 math
on one sequence (all heads at S4096, 4 heads at S8192), for the output and every input gradient.
Each row: ms by CUDA events (an isolated call, its host work included), by CUDA-graph replay (the device's time
alone) and the host's ms a call (kernel_timing.py); --host-profile splits the MLA call's host time by function.

FP8 experts (bench6: 64 experts x 1536 tokens, 2048 -> 2 x 1408 -> 2048), forward + backward of the SwiGLU FFN:
bf16 torch._grouped_mm (models.moe.grouped_swiglu), torchao's rowwise FP8 grouped GEMM (eager, compiled), ours (on Hopper also with the Triton
scatter and weight-gradient GEMMs in place of the Gluon ones; --sweep times their tile configs).
Errors against float32 math (TF32 off). --profile prints our kernels' time split.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from functools import partial
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F

from titan_dsv3.kernels import fp8_grouped_gemm as fp8
from titan_dsv3.kernels import mla_attention as mla
from titan_dsv3.kernels import mla_attention_bwd as mla_bwd
from titan_dsv3.models.attention import sdpa_attention
from titan_dsv3.models.moe import grouped_swiglu, looped_swiglu

sys.path.insert(0, str(Path(__file__).parent))
import kernel_timing as timing  # noqa: E402
from kernel_timing import (  # noqa: E402
    ROWS,
    autotune_picks,
    bench,
    host_split,
    interleaved,
    profile_split,
    rel,
    report,
)

NOPE, ROPE, DV = 128, 64, 128


# ---- MLA --------------------------------------------------------------------------------------------------------


def rope_table(seqlen: int, device) -> torch.Tensor:
    inv = 1.0 / 10000 ** (torch.arange(0, ROPE, 2, device=device, dtype=torch.float32) / ROPE)
    f = torch.outer(torch.arange(seqlen, device=device, dtype=torch.float32), inv)
    return torch.stack([f.cos(), f.sin()], dim=-1)  # (seqlen, rope / 2, 2)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    from titan_dsv3.models.rope import apply_rope as rope

    return rope(x, cos_sin)


def chain_sdpa(q, kv, k_pe_raw, cos_sin, scale):
    heads = q.shape[2]
    q_nope, q_pe = q.split([NOPE, ROPE], dim=-1)
    k_nope, v = kv.split([NOPE, DV], dim=-1)
    q = torch.cat([q_nope, apply_rope(q_pe, cos_sin)], dim=-1)
    k = torch.cat([k_nope, apply_rope(k_pe_raw, cos_sin).expand(-1, -1, heads, -1)], dim=-1)
    return sdpa_attention(q, k, v, scale)


def chain_flex(q, kv, k_pe_raw, cos_sin, scale, block_mask):
    from titan_dsv3.models.attention import flex_attention_fn

    heads = q.shape[2]
    q_nope, q_pe = q.split([NOPE, ROPE], dim=-1)
    k_nope, v = kv.split([NOPE, DV], dim=-1)
    q = torch.cat([q_nope, apply_rope(q_pe, cos_sin)], dim=-1)
    k = torch.cat([k_nope, apply_rope(k_pe_raw, cos_sin).expand(-1, -1, heads, -1)], dim=-1)
    return flex_attention_fn(q, k, v, scale, block_mask)


def chain_ours(q, kv, k_pe_raw, cos_sin, scale, doc_bounds=None):
    """As the model calls it: q before RoPE and kv whole (their gradients come back whole), k_pe rotated here."""
    from titan_dsv3.kernels.mla_attention_rope import mla_attention_rope

    k_pe = apply_rope(k_pe_raw, cos_sin)
    return mla_attention_rope(q, kv, k_pe, cos_sin, scale=scale, nope=NOPE, doc_bounds=doc_bounds)


def chain_ours_views(q, kv, k_pe_raw, cos_sin, scale, doc_bounds=None):
    """The kernels on views (q_nope, rotated q_pe, k_nope, v): autograd concatenates their gradients."""
    q_nope, q_pe = q.split([NOPE, ROPE], dim=-1)
    k_nope, v = kv.split([NOPE, DV], dim=-1)
    k_pe = apply_rope(k_pe_raw, cos_sin)
    return mla.mla_attention(
        q_nope, k_nope, v, scale=scale, doc_bounds=doc_bounds, k_pe=k_pe, q_pe=apply_rope(q_pe, cos_sin)
    )


def doc_ids_for(bsz: int, seqlen: int, mean_len: int, device) -> torch.Tensor:
    """Packed rows of documents with exponentially distributed lengths (mean mean_len)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(bsz):
        lens = (torch.empty(8 * seqlen // mean_len).exponential_(1.0 / mean_len, generator=g) + 1).long()
        rows.append(torch.repeat_interleave(torch.arange(len(lens)), lens)[:seqlen])
    return torch.stack(rows).to(device=device, dtype=torch.int32)


def doc_pairs(doc_ids: torch.Tensor) -> float:
    """Query-key pairs inside documents (causal): the attention work document masking leaves."""
    total = 0.0
    for row in doc_ids.cpu():
        lens = torch.unique_consecutive(row, return_counts=True)[1].double()
        total += (lens * (lens + 1) / 2).sum().item()
    return total


def fwd_bwd(fn, inputs, grad):
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad)


def mla_errors(seqlen: int, heads: int, doc_ids, scale, device) -> str:
    """Relative errors of ours and of the SDPA path against float64, on one sequence."""
    g = torch.Generator(device=device).manual_seed(1)
    shapes = [(1, seqlen, heads, d) for d in (NOPE, ROPE, NOPE, DV)] + [(1, seqlen, 1, ROPE)]
    leaves = [torch.randn(s, device=device, generator=g).bfloat16().requires_grad_() for s in shapes]
    q_nope, q_pe, k_nope, v, k_pe = leaves
    dout = torch.randn(1, seqlen, heads, DV, device=device, generator=g)
    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    d1 = None if doc_ids is None else doc_ids[:1]
    ref = mla.mla_attention_reference(
        ref_in[0], ref_in[2], ref_in[3], scale=scale, doc_ids=d1, k_pe=ref_in[4], q_pe=ref_in[1]
    )
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    out = mla.mla_attention(q_nope, k_nope, v, scale=scale, doc_ids=d1, k_pe=k_pe, q_pe=q_pe)
    grads = torch.autograd.grad(out, leaves, dout.bfloat16())
    names = ("out", "dq_nope", "dq_pe", "dk_nope", "dv", "dk_pe")
    errs = {n: rel(a, b) for n, a, b in zip(names, (out, *grads), (ref, *ref_grads))}
    text = "ours " + " ".join(f"{n} {e:.1e}" for n, e in errs.items())
    if doc_ids is None:
        q = torch.cat([q_nope, q_pe], -1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, heads, -1)], -1)
        out_s = sdpa_attention(q, k, v, scale)
        grads_s = torch.autograd.grad(out_s, leaves, dout.bfloat16())
        errs_s = [rel(a, b) for a, b in zip((out_s, *grads_s), (ref, *ref_grads))]
        text += " | cuDNN " + " ".join(f"{n} {e:.1e}" for n, e in zip(names, errs_s))
    del ref, ref_grads, ref_in
    torch.cuda.empty_cache()
    return text


def run_mla(args) -> None:
    scale = (NOPE + ROPE) ** -0.5 * 1.2  # a YaRN mscale^2-like factor; the kernel takes any scale
    for bsz, heads, seqlen, docs in [(2, 16, 4096, False), (2, 16, 8192, False), (2, 16, 4096, True)]:
        mla_case(bsz, heads, seqlen, docs, scale, args)
        torch.cuda.empty_cache()


def mla_case(bsz: int, heads: int, seqlen: int, docs: bool, scale: float, args) -> None:
    dev = torch.device("cuda")
    tag = f"B{bsz} H{heads} S{seqlen}" + (" docs" if docs else "")
    torch.manual_seed(0)
    q = torch.randn(bsz, seqlen, heads, NOPE + ROPE, device=dev, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(bsz, seqlen, heads, NOPE + DV, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k_pe_raw = torch.randn(bsz, seqlen, 1, ROPE, device=dev, dtype=torch.bfloat16, requires_grad=True)
    cos_sin = rope_table(seqlen, dev)
    grad = torch.randn(bsz, seqlen, heads, DV, device=dev, dtype=torch.bfloat16)
    inputs = (q, kv, k_pe_raw)
    flops = mla.attention_flops(bsz, seqlen, heads, NOPE + ROPE, DV)
    doc_ids = doc_ids_for(bsz, seqlen, 512, dev) if docs else None
    if docs:  # FLOPs of the pairs inside documents (the causal square would overstate the work)
        from titan_dsv3.models.masks import document_causal_mask

        flops *= doc_pairs(doc_ids) / (bsz * seqlen * seqlen / 2)
        mask = document_causal_mask(doc_ids, bsz, seqlen, dev)
        flex = torch.compile(lambda a, b, c: chain_flex(a, b, c, cos_sin, scale, mask))
        report(f"MLA {tag} flex compiled (rope+cat+flex)", fwd_bwd(flex, inputs, grad), flops)
    else:
        eager = lambda a, b, c: chain_sdpa(a, b, c, cos_sin, scale)  # noqa: E731
        report(f"MLA {tag} sdpa cuDNN eager (rope+cat+sdpa)", fwd_bwd(eager, inputs, grad), flops)
        comp = torch.compile(eager)
        report(f"MLA {tag} sdpa cuDNN compiled (rope+cat+sdpa)", fwd_bwd(comp, inputs, grad), flops)
    # the document bounds once, outside the timed calls, as the model computes them once a step for all layers
    bounds = mla.document_bounds(doc_ids) if docs else None
    ours = lambda a, b, c: chain_ours(a, b, c, cos_sin, scale, bounds)  # noqa: E731
    report(f"MLA {tag} ours eager (rope+kernel)", fwd_bwd(ours, inputs, grad), flops)
    ours_c = fwd_bwd(torch.compile(ours), inputs, grad)  # as the model runs it: per-block compile
    report(f"MLA {tag} ours compiled (rope+kernel)", ours_c, flops)
    views = lambda a, b, c: chain_ours_views(a, b, c, cos_sin, scale, bounds)  # noqa: E731
    report(
        f"MLA {tag} ours compiled on views (+grad copies)", fwd_bwd(torch.compile(views), inputs, grad), flops
    )
    if args.profile and seqlen == 4096 and not docs:  # the chains' kernels: RoPE, concatenations, grad copies
        print("  kernels of the compiled chains, ours then cuDNN's:")
        profile_split(ours_c)
        profile_split(fwd_bwd(comp, inputs, grad))
    # the attention alone on ready tensors
    leaves = [
        torch.randn(
            bsz, seqlen, heads if i < 4 else 1, d, device=dev, dtype=torch.bfloat16, requires_grad=True
        )
        for i, d in enumerate((NOPE, ROPE, NOPE, DV, ROPE))
    ]

    def kern(a, b, c, d, e):
        return mla.mla_attention(a, c, d, scale=scale, doc_bounds=bounds, k_pe=e, q_pe=b)

    err_heads = heads if seqlen <= 4096 else 4
    try:
        err = f"(B1 H{err_heads}) " + mla_errors(seqlen, err_heads, doc_ids, scale, dev)
    except Exception as e:  # noqa: BLE001
        err = f"errors FAILED {type(e).__name__}: {str(e)[:200]}"
    report(f"MLA {tag} ours kernel only fwd+bwd", fwd_bwd(kern, leaves, grad), flops, err)
    fwd_flops = flops * 2 * (NOPE + ROPE + DV) / (2 * (NOPE + ROPE + DV) + 2 * (3 * (NOPE + ROPE) + 2 * DV))
    with torch.no_grad():
        report(f"MLA {tag} ours kernel only fwd", lambda: kern(*leaves), fwd_flops)
    if not docs:
        qf = torch.randn(
            bsz, seqlen, heads, NOPE + ROPE, device=dev, dtype=torch.bfloat16, requires_grad=True
        )
        kf = torch.randn(
            bsz, seqlen, heads, NOPE + ROPE, device=dev, dtype=torch.bfloat16, requires_grad=True
        )
        cud = lambda a, b, c: sdpa_attention(a, b, c, scale)  # noqa: E731
        report(f"MLA {tag} cuDNN sdpa only fwd+bwd", fwd_bwd(cud, (qf, kf, leaves[3]), grad), flops)
        with torch.no_grad():
            report(f"MLA {tag} cuDNN sdpa only fwd", lambda: cud(qf, kf, leaves[3]), fwd_flops)
    if args.profile and seqlen == 4096:
        profile_split(fwd_bwd(kern, leaves, grad))
    if args.host_profile and seqlen == 4096:
        host_split(fwd_bwd(kern, leaves, grad))
    autotune_picks(mla._mla_fwd_kernel, mla_bwd._mla_bwd_dkdv_kernel, mla_bwd._mla_bwd_dq_kernel)


# ---- FP8 experts ------------------------------------------------------------------------------------------------


def torchao_rowwise_swiglu(x, counts, w1, w2, w3):
    from torchao.prototype.moe_training.fp8_grouped_mm import _to_fp8_rowwise_then_scaled_grouped_mm as mm

    offs = torch.cumsum(counts, 0, dtype=torch.int32)

    def gmm(a, w):  # a @ w^T per group; torchao wants the (E, K, N) operand column-major
        return mm(
            a, w.transpose(-2, -1), offs, out_dtype=torch.bfloat16, pad_token_groups_for_grouped_mm=False
        )

    return gmm(F.silu(gmm(x, w1)) * gmm(x, w3), w2)


def run_fp8(args) -> None:
    dev = torch.device("cuda")
    n_exp, per, dim, hidden = 64, 1536, 2048, 1408
    n = n_exp * per
    torch.manual_seed(0)
    x = torch.randn(n, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ws = [
        (torch.randn(n_exp, *s, device=dev) * s[1] ** -0.5).bfloat16().requires_grad_()
        for s in ((hidden, dim), (dim, hidden), (hidden, dim))
    ]
    counts = torch.full((n_exp,), per, device=dev, dtype=torch.int64)
    dy = torch.randn(n, dim, device=dev, dtype=torch.bfloat16)
    inputs = (x, *ws)
    flops = fp8.grouped_swiglu_flops(n, dim, hidden)
    tag = f"experts E{n_exp} x {per} tok, {dim}->2x{hidden}->{dim}"

    # float32 reference (TF32 off) for the errors
    torch.backends.cuda.matmul.allow_tf32 = False
    ref_in = [t.detach().float().requires_grad_() for t in inputs]
    y_ref = looped_swiglu(ref_in[0], counts, *ref_in[1:])
    ref = [y_ref.detach(), *torch.autograd.grad(y_ref, ref_in, dy.float())]
    del y_ref, ref_in

    def errors(fn) -> str:
        try:
            y = fn(*inputs)
            got = [y.detach(), *torch.autograd.grad(y, inputs, dy)]
            return " ".join(
                f"{k} {rel(a, b):.1e}" for k, a, b in zip(("y", "dx", "dw1", "dw2", "dw3"), got, ref)
            )
        except Exception as e:  # noqa: BLE001
            return f"errors FAILED {type(e).__name__}: {str(e)[:200]}"

    bf16 = lambda x, w1, w2, w3: grouped_swiglu(x, counts, w1, w2, w3)  # noqa: E731
    base = report(f"FP8 {tag} bf16 grouped_mm", fwd_bwd(bf16, inputs, dy), flops, errors(bf16))
    if not args.no_peers:
        ao = lambda x, w1, w2, w3: torchao_rowwise_swiglu(x, counts, w1, w2, w3)  # noqa: E731
        report(f"FP8 {tag} torchao rowwise eager", fwd_bwd(ao, inputs, dy), flops, errors(ao))
        ao_c = torch.compile(ao)
        report(f"FP8 {tag} torchao rowwise compiled", fwd_bwd(ao_c, inputs, dy), flops, errors(ao_c))
    ours = lambda x, w1, w2, w3: fp8.fp8_grouped_swiglu(x, counts, w1, w2, w3)  # noqa: E731
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    # the Triton scatter and weight-gradient GEMMs, which the Gluon ones replace on Hopper
    if sm90 and not args.no_peers:
        fp8.SM90_GEMMS = False
        ms = report(f"FP8 {tag} ours, Triton GEMMs", fwd_bwd(ours, inputs, dy), flops, errors(ours))
        print(f"  ours (Triton GEMMs) vs bf16 grouped_mm: {base / ms:.2f}x", flush=True)
        if args.profile:
            profile_split(fwd_bwd(ours, inputs, dy))
        fp8.SM90_GEMMS = True
    ms = report(f"FP8 {tag} ours", fwd_bwd(ours, inputs, dy), flops, errors(ours))
    print(f"  ours vs bf16 grouped_mm: {base / ms:.2f}x", flush=True)
    if args.repeat > 1:  # the two timed again in turn: one ratio per pair, and their mean
        ratios = [base / ms]
        for _ in range(args.repeat - 1):
            base_r, ours_r = bench(fwd_bwd(bf16, inputs, dy)), bench(fwd_bwd(ours, inputs, dy))
            ratios.append(base_r / ours_r)
            print(f"  again: bf16 {base_r:.3f} ms, ours {ours_r:.3f} ms, {ratios[-1]:.3f}x", flush=True)
        print(f"  ours vs bf16 over {len(ratios)} pairs: mean {sum(ratios) / len(ratios):.3f}x, "
              f"{min(ratios):.3f}-{max(ratios):.3f}x", flush=True)  # fmt: skip
    if args.interleave:
        run_fp8_interleaved(fwd_bwd(bf16, inputs, dy), fwd_bwd(ours, inputs, dy), args.interleave)
    if sm90 and args.sweep:
        sweep_sm90(fwd_bwd(ours, inputs, dy), flops)
    with torch.no_grad():
        report(f"FP8 {tag} ours fwd only", lambda: ours(*inputs), flops / 3)
        report(f"FP8 {tag} bf16 fwd only", lambda: bf16(*inputs), flops / 3)
    if args.profile:
        profile_split(fwd_bwd(ours, inputs, dy))
    autotune_picks(fp8._gemm_swiglu_fwd_kernel, fp8._gemm_scatter_kernel, fp8._wgrad_kernel)


def run_fp8_interleaved(bf16, ours, windows: int) -> None:
    """bf16, ours and ours with the Triton quantisation passes, timed in turn (interleaved): the medians, and
    the median of each window's bf16 / ours ratio."""

    def with_passes(on: bool):
        def call():
            prev, fp8.SM90_PASSES = fp8.SM90_PASSES, on
            try:
                return ours()
            finally:
                fp8.SM90_PASSES = prev

        return call

    fns = {"bf16": bf16, "ours": with_passes(True), "ours, Triton passes": with_passes(False)}
    times = interleaved(fns, windows)
    base = times["bf16"]
    print(f"  interleaved, {windows} windows of 10 calls each (ms a call, median and range):", flush=True)
    for k, ts in times.items():
        ratio = median([b / t for b, t in zip(base, ts)])
        print(f"    {k:22s} {median(ts):7.3f} ({min(ts):.3f}-{max(ts):.3f}); bf16 / it: median of windows "
              f"{ratio:.3f}x, of medians {median(base) / median(ts):.3f}x", flush=True)  # fmt: skip


def sweep_sm90(fn, flops: float) -> None:
    """The FFN timed with each tile config (BM, consumer warps, stages) of the Gluon scatter GEMM, then of the
    weight-gradient GEMM."""
    from titan_dsv3.kernels import fp8_grouped_gemm_sm90 as g

    for attr in ("SCATTER_CONFIG", "WGRAD_CONFIG"):
        default = getattr(g, attr)
        for cfg in [(128, 8, 3), (128, 8, 4), (128, 8, 5), (128, 8, 6), (64, 4, 4), (64, 4, 6)]:
            setattr(g, attr, cfg)
            report(f"FP8 sweep {attr}={cfg}", fn, flops)
        setattr(g, attr, default)


def run_fp8_gemms() -> None:
    """bench6's five FP8 GEMMs alone (random fp8 operands and scales in the padded layout): the Triton kernels
    against the Gluon ones (persistent, warp-specialised), and for the dx shape
    cuBLAS tensorwise FP8 on the same FLOPs as one dense GEMM and bf16 torch._grouped_mm."""
    from titan_dsv3.kernels import fp8_grouped_gemm_sm90 as g

    dev = torch.device("cuda")
    n_exp, per, dim, hidden = 64, 1536, 2048, 1408
    n = n_exp * per
    counts = torch.full((n_exp,), per, device=dev)
    lay = fp8._Layout(counts, n)
    pad = lay.n_pad

    def f8(*shape):
        return torch.randn(*shape, device=dev).to(torch.float8_e4m3fn)

    def scales(*shape):
        return torch.rand(*shape, device=dev) + 0.5

    fp8.SM90_GEMMS = False  # the launchers' Triton path
    for name, k, n_out in (("y = h w2^T", hidden, dim), ("dh = dy w2", dim, hidden), ("dx", 2 * hidden, dim)):
        a, sa, b, sb = (
            f8(pad, k),
            scales(pad, k // 128),
            f8(n_exp, n_out, k),
            scales(n_exp, n_out // 128, k // 128),
        )
        out = torch.empty(n, n_out, device=dev, dtype=torch.bfloat16)
        sizes = (k, n_out, (n_out // 128) * (k // 128), k // 128, 1)
        flops, tag = 2 * n * k * n_out, f"FP8 GEMM {name} (K {k}, N {n_out})"
        report(
            f"{tag} Triton", partial(fp8._gemm_scatter, a, sa, b, sb, lay, lay.row_src, out, *sizes), flops
        )
        gluon = partial(
            g.gemm_scatter_sm90, a, sa, b, sb, lay.tile_expert, lay.pend, lay.row_src, out, n_exp, *sizes
        )
        report(f"{tag} Gluon persistent warp-specialised", gluon, flops)
        if name == "dx":
            one = torch.ones((), device=dev)
            dense = partial(torch._scaled_mm, a[:n], b[0].t(), one, one, out_dtype=torch.bfloat16)
            report(f"{tag} cuBLAS tensorwise FP8, one dense GEMM", dense, flops)
            offs = torch.cumsum(counts, 0).to(torch.int32)
            bf = partial(torch._grouped_mm, a[:n].bfloat16(), b.bfloat16().transpose(-2, -1), offs=offs)
            report(f"{tag} bf16 torch._grouped_mm", bf, flops)
    for name, r, c, split in (("dW1|dW3", 2 * hidden, dim, hidden), ("dW2", dim, hidden, dim)):
        a, sa, b, sb = f8(r, pad), scales(pad // 128, r), f8(c, pad), scales(pad // 128, c)
        o1 = torch.empty(n_exp, split, c, device=dev, dtype=torch.bfloat16)
        o2 = torch.empty(n_exp, max(r - split, 128), c, device=dev, dtype=torch.bfloat16)
        flops, tag = 2 * n * r * c, f"FP8 GEMM {name} (R {r}, C {c})"
        args = (a, sa, b, sb, lay, o1, o2, r, c, split)
        report(f"{tag} Triton", partial(fp8._wgrad, *args), flops)
        report(f"{tag} Gluon persistent warp-specialised", partial(g.wgrad_sm90, *args), flops)
    fp8.SM90_GEMMS = True


def run_fp8_passes(n_exp=64, per=1536, dim=2048, hidden=1408, device="cuda") -> None:
    """The FP8 FFN's memory-bound passes (kernels/fp8_quant.py; on Hopper also fp8_quant_sm90.py) alone on bench6's
    shapes, for each warp count: ms and the DRAM bytes they must move per ms (reads and writes, scales left out),
    beside a torch copy of as many bytes as the SwiGLU backward moves."""
    from titan_dsv3.kernels import fp8_quant as Q

    dev = torch.device(device)
    n = n_exp * per
    lay = fp8._Layout(torch.full((n_exp,), per, device=dev), n)
    pad, tiles = lay.n_pad, lay.n_pad // 128
    x = torch.randn(n, dim, device=dev, dtype=torch.bfloat16)
    dh = torch.randn(pad, hidden, device=dev, dtype=torch.bfloat16)
    h13 = torch.randn(pad, 2 * hidden, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n_exp, hidden, dim, device=dev, dtype=torch.bfloat16)
    f8, f32 = Q._fp8_empty, Q._f32_empty
    act, bwd = Q._both_ways_empty(pad, dim, dev), Q._swiglu_bwd_empty(pad, hidden, dev)
    hq = (f8(pad, hidden, device=dev), f32(pad, hidden // 128, device=dev))
    wq = Q._stacked_weights_empty([w])[0]  # (E, I, D), (E, D, I), (E, I/128, D/128)
    w_grid = (n_exp, hidden // 128, dim // 128)
    passes = {  # name: (launch(launch options), bytes moved)
        "activation quantiser (x)": (
            lambda kw: Q._quant_act_kernel[(tiles, dim // 128)](
                x, lay.row_src, lay.row_src, lay.tile_expert, *act, pad, dim, n_exp, EXACT=False, **kw
            ),
            n * dim * 4,
        ),
        "SwiGLU backward (dh bf16)": (
            lambda kw: Q._swiglu_bwd_quant_kernel[(hidden // 128, tiles)](
                dh, h13, lay.tile_expert, *bwd, pad, n_exp, hidden, EXACT=False, **kw
            ),
            n * hidden * 11,
        ),
        "SwiGLU forward quantisation": (
            lambda kw: Q._swiglu_quant_kernel[(hidden // 128, tiles)](
                h13, lay.tile_expert, *hq, n_exp, hidden, EXACT=False, **kw
            ),
            n * hidden * 5,
        ),
        "weight quantiser (one E x I x D weight)": (  # two kernels: row-major and scale, transposed
            lambda kw: (
                Q._quant_weight_kernel[w_grid](w, wq[0], wq[2], hidden, dim, hidden, 0, EXACT=False, **kw),
                Q._quant_weight_t_kernel[w_grid](w, wq[1], hidden, dim, hidden, 0, EXACT=False, **kw),
            ),
            n_exp * hidden * dim * 4,
        ),
    }
    runs = [
        (name, f"w{nw}", partial(launch, dict(num_warps=nw)), nbytes)
        for name, (launch, nbytes) in passes.items()
        for nw in (4, 8, 16)
    ]
    # register caps that fit more CTAs an SM (sm_90, Triton 3.6: compile_kernels_sm90.py's report)
    capped = {
        "weight quantiser (one E x I x D weight)": ((16, 64), (8, 128)),  # 2 CTAs an SM
        "activation quantiser (x)": ((16, 64), (8, 80), (4, 128)),  # 2 / 3 / 4 CTAs, 0 / 0 / 128 B
        "SwiGLU backward (dh bf16)": ((8, 128),),  # 2 CTAs, 616 B spill
    }
    for name, caps in capped.items():
        launch, nbytes = passes[name]
        for nw, cap in caps:
            runs.append((name, f"w{nw} r{cap}", partial(launch, dict(num_warps=nw, maxnreg=cap)), nbytes))
    # the Gluon passes (sm_90), the FFN's default there: the bf16 inputs transposed instead of the fp8 outputs
    if torch.cuda.get_device_capability(dev) == (9, 0):
        from titan_dsv3.kernels import fp8_quant_sm90 as G

        bwd_grid, act_grid = (hidden // 128, tiles), (dim // 128, tiles)
        for nw in (8, 16):
            launch = partial(
                G._swiglu_bwd_quant_kernel_sm90[bwd_grid], dh, h13, lay.tile_expert, *bwd, pad, n_exp, hidden,
                num_warps=nw,
            )  # fmt: skip
            runs.append(("SwiGLU backward, Gluon", f"w{nw}", launch, n * hidden * 11))
        for nw in (4, 8, 16):
            launch = partial(
                G._quant_act_kernel_sm90[act_grid], x, lay.row_src, lay.row_src, lay.tile_expert, *act, pad, dim, n_exp,
                num_warps=nw,
            )  # fmt: skip
            runs.append(("activation quantiser (x), Gluon", f"w{nw}", launch, n * dim * 4))
        for nw in (4, 8):
            launch = partial(
                G._quant_weight_kernel_sm90[(dim // 128, hidden // 128, n_exp)], w, *wq, hidden, dim, hidden, 0,
                num_warps=nw,
            )  # fmt: skip
            runs.append(("weight quantiser, Gluon", f"w{nw}", launch, n_exp * hidden * dim * 4))
    # the ceiling: a copy of as many bytes as the SwiGLU backward moves, half read, half written
    src = torch.empty(n * hidden * 11 // 4, device=dev, dtype=torch.int16)
    copy = partial(torch.empty_like(src).copy_, src)
    runs.append(("torch copy (the SwiGLU backward's bytes)", "-", copy, n * hidden * 11))
    for name, cfg, launch, nbytes in runs:
        ms = bench(launch)
        ROWS.append({"name": f"FP8 pass {name} {cfg}", "ms": round(ms, 4), "tflops": 0.0, "err": ""})
        print(f"FP8 pass {name:40s} {cfg:8s} {ms:8.3f} ms {nbytes / ms / 1e9:6.2f} TB/s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["mla", "fp8"], default=None)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--profile", action="store_true", help="per-kernel time split of our kernels")
    p.add_argument(
        "--gemms", action="store_true", help="FP8: also each GEMM alone, Triton against Gluon (sm_90)"
    )
    p.add_argument("--sweep", action="store_true", help="FP8: time each tile config of the sm_90 GEMMs")
    p.add_argument(
        "--no-peers", action="store_true", help="FP8: only ours and bf16 (no torchao, no Triton-GEMM rows)"
    )
    p.add_argument(
        "--passes", action="store_true", help="only the FP8 quantisation passes, alone, per warp count"
    )
    p.add_argument("--repeat", type=int, default=1, help="FP8: time bf16 and ours this many times in turn")
    p.add_argument(
        "--interleave",
        type=int,
        default=0,
        help="FP8: bf16, ours and ours with Triton passes, N windows in turn",
    )
    p.add_argument(
        "--triton-passes", action="store_true", help="FP8: ours with the Triton passes (SM90_PASSES off)"
    )
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph replay timing of each row")
    p.add_argument(
        "--host-profile", action="store_true", help="MLA: where a call's host time goes (cProfile)"
    )
    args = p.parse_args()
    timing.GRAPHS = not args.no_graphs
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    if args.passes:  # only the passes
        run_fp8_passes()
    if args.only in (None, "mla") and not args.passes:
        run_mla(args)
    if args.only in (None, "fp8") and not args.passes:
        fp8.SM90_PASSES = not args.triton_passes
        run_fp8(args)
        if args.gemms and torch.cuda.get_device_capability() == (9, 0):
            run_fp8_gemms()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=1)
    assert math.isfinite(sum(r["ms"] for r in ROWS))


if __name__ == "__main__":
    main()
