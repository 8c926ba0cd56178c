"""The fused MLA kernel on CUDA in bf16 against the float64 reference, at sizes that cover several blocks.

bf16 inputs, fp32 accumulation, probabilities rounded to bf16 before the PV and dS products (as flash kernels
do): relative Frobenius error ~0.3% on the output and ~0.5% on the gradients; bound 1.5%.
"""

import pytest
import torch

from titan_dsv3.kernels.mla_attention import mla_attention, mla_attention_reference

NOPE, ROPE, DV = 128, 64, 128


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "bsz,seqlen,heads,docs", [(1, 1, 2, 0), (2, 127, 3, 0), (1, 1000, 4, 0), (2, 777, 2, 5)]
)
def test_bf16_matches_float64_reference(bsz, seqlen, heads, docs):
    torch.manual_seed(seqlen)
    dev = "cuda"
    q = torch.randn(bsz, seqlen, heads, NOPE + ROPE, device=dev)
    k_nope = torch.randn(bsz, seqlen, heads, NOPE, device=dev)
    k_pe = torch.randn(bsz, seqlen, 1, ROPE, device=dev)
    v = torch.randn(bsz, seqlen, heads, DV, device=dev)
    doc_ids = None
    if docs:  # sorted random cut points: documents of uneven length, the same for each row here
        cuts = torch.randint(1, seqlen, (docs,), device=dev)
        doc_ids = (torch.arange(seqlen, device=dev)[None, :] >= cuts.sort().values[:, None]).sum(0)
        doc_ids = doc_ids.to(torch.int32).expand(bsz, seqlen).contiguous()
    scale = (NOPE + ROPE) ** -0.5
    ins = [t.bfloat16().requires_grad_() for t in (q, k_nope, k_pe, v)]
    ref_in = [t.detach().double().requires_grad_() for t in ins]
    out = mla_attention(ins[0], ins[1], ins[3], scale=scale, doc_ids=doc_ids, k_pe=ins[2])
    ref = mla_attention_reference(
        ref_in[0], ref_in[1], ref_in[3], scale=scale, doc_ids=doc_ids, k_pe=ref_in[2]
    )
    dout = torch.randn_like(ref)
    out.backward(dout.bfloat16())
    ref.backward(dout)
    assert _rel(out, ref) < 1.5e-2
    for a, b in zip(ins, ref_in):
        assert a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad).all()
        if b.grad.norm() > 0:
            assert _rel(a.grad, b.grad) < 1.5e-2
        else:  # seqlen 1: one key per row, so dq and dk are exactly 0
            assert a.grad.abs().max() < 1e-3


@pytest.mark.gpu
def test_compiled_model_path():
    """torch.compile traces around the custom op on CUDA, fwd and bwd equal to eager."""
    torch.manual_seed(0)
    ins = [
        torch.randn(2, 300, 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for d in (NOPE, ROPE, NOPE, DV)
    ]
    k_pe = torch.randn(2, 300, 1, ROPE, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def f(q_nope, q_pe, k_nope, v, k_pe):
        return mla_attention(q_nope, k_nope, v, scale=0.1, k_pe=k_pe, q_pe=q_pe).float().square().sum()

    loss = torch.compile(f, fullgraph=True)(*ins, k_pe)
    grads = torch.autograd.grad(loss, [*ins, k_pe])
    loss_e = f(*ins, k_pe)
    grads_e = torch.autograd.grad(loss_e, [*ins, k_pe])
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


def _packed_doc_ids(bsz: int, seqlen: int, mean_len: int) -> torch.Tensor:
    """(bsz, seqlen) int32 ids of documents with exponential lengths (some 1 token long), different per row."""
    g = torch.Generator().manual_seed(seqlen)
    rows = []
    for _ in range(bsz):
        lens = (torch.empty(seqlen).exponential_(1.0 / mean_len, generator=g) + 1).long()
        rows.append(torch.repeat_interleave(torch.arange(seqlen), lens)[:seqlen])
    return torch.stack(rows).to(device="cuda", dtype=torch.int32)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "bsz,seqlen,heads,doc_len",
    [(1, 1, 2, 0), (2, 127, 3, 0), (2, 1000, 2, 0), (1, 4096, 2, 0), (2, 1000, 2, 40), (2, 4096, 2, 700)],
)
def test_sm90_kernels_match_triton(bsz, seqlen, heads, doc_len, monkeypatch):
    """On Hopper the Gluon kernels (forward and dq: mla_attention_sm90.py, dk/dv: mla_attention_bwd_sm90.py) give
    the Triton kernels' results: output, log-sum-exp and gradients to bf16 / fp32 rounding, on views of
    fused projections as the model passes them, causal and within packed documents (doc_len: their mean length;
    rows whose first key blocks hold none of their document's keys, and documents one token long)."""
    import titan_dsv3.kernels.mla_attention as mla

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon MLA kernels are for sm_90")
    torch.manual_seed(seqlen)
    q = torch.randn(bsz, seqlen, heads, NOPE + ROPE, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(bsz, seqlen, heads, NOPE + DV, device="cuda", dtype=torch.bfloat16)
    k_pe = torch.randn(bsz, seqlen, 1, ROPE, device="cuda", dtype=torch.bfloat16)
    ins = (q[..., :NOPE], q[..., NOPE:], kv[..., :NOPE], k_pe, kv[..., NOPE:])
    assert mla.sm90_kernels(*ins) is not None
    do = torch.randn(bsz, seqlen, heads, DV, device="cuda", dtype=torch.bfloat16)
    bounds = mla.document_bounds(_packed_doc_ids(bsz, seqlen, doc_len)) if doc_len else None

    def run(sm90: bool):
        monkeypatch.setattr(mla, "SM90", sm90)
        out, lse = mla._mla_fwd(*ins, bounds, 0.1)
        grads = mla._mla_bwd_op(do, *ins, out, lse, bounds, 0.1)
        return out, lse, grads

    out, lse, grads = run(True)
    out_t, lse_t, grads_t = run(False)
    assert _rel(out, out_t.double()) < 4e-3  # one bf16 rounding apart where block orders differ
    torch.testing.assert_close(lse, lse_t, rtol=0, atol=1e-4)
    for a, b in zip(grads, grads_t):
        assert torch.isfinite(a).all()
        if b.float().norm() > 0:
            assert _rel(a, b.double()) < 4e-3


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen,doc_len", [(1000, 0), (4096, 0), (1000, 300)])
def test_sm90_rope_entry_matches_triton(seqlen, doc_len, monkeypatch):
    """mla_attention_rope (the model's entry: q before RoPE, kv whole) on Hopper, where the Gluon backward stores
    into slices of one dq and one dkv and the dq kernel turns dq_pe back through RoPE's transpose, against the
    Triton kernels followed by copies (SM90 off); a YaRN-scaled table (mscale != 1)."""
    import titan_dsv3.kernels.mla_attention as mla
    from titan_dsv3.kernels.mla_attention_rope import mla_attention_rope
    from titan_dsv3.models import ModelArgs
    from titan_dsv3.models.rope import rope_cos_sin

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon MLA kernels are for sm_90")
    bsz, heads = 2, 3
    torch.manual_seed(seqlen + doc_len)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(bsz, seqlen, heads, NOPE + ROPE, **bf16, requires_grad=True)
    kv = torch.randn(bsz, seqlen, heads, NOPE + DV, **bf16, requires_grad=True)
    k_pe = torch.randn(bsz, seqlen, 1, ROPE, **bf16, requires_grad=True)
    do = torch.randn(bsz, seqlen, heads, DV, **bf16)
    args = ModelArgs(max_seq_len=2 * seqlen, original_seq_len=seqlen // 2, rope_factor=4.0, mscale=0.7,
                     mscale_all_dim=0.5)  # fmt: skip
    cos_sin = rope_cos_sin(args, seqlen + 7, torch.device("cuda"))
    bounds = mla.document_bounds(_packed_doc_ids(bsz, seqlen, doc_len)) if doc_len else None

    def run(sm90: bool):
        monkeypatch.setattr(mla, "SM90", sm90)
        out = mla_attention_rope(q, kv, k_pe, cos_sin, scale=0.1, nope=NOPE, doc_bounds=bounds)
        return (out, *torch.autograd.grad(out, (q, kv, k_pe), do))

    for a, b in zip(run(True), run(False)):  # out, dq, dkv, dk_pe
        assert torch.isfinite(a).all()
        assert _rel(a, b.double()) < 4e-3
