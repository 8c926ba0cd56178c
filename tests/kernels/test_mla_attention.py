"""Fused MLA attention (Triton, interpreted on CPU) against the float64 torch reference, forward and backward.

Inputs are fp32: the interpreter's bf16 dot is not faithful (../shared/CPU_TESTING.md), and with fp32 the kernel's
only difference from the reference is summation order, so the tolerance is tight (2e-5 of each tensor's largest
value, or absolute when that is below 1). The bf16 run at training shapes is tests/gpu/test_mla_attention_gpu.py.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from titan_dsv3.kernels.mla_attention import document_bounds, mla_attention, mla_attention_reference  # noqa: E402

NOPE, ROPE, DV = 128, 64, 128


def _inputs(bsz, seqlen, heads, shared=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q = r(bsz, seqlen, heads, NOPE + ROPE)
    k_nope = r(bsz, seqlen, heads, NOPE)
    k_pe = r(bsz, seqlen, 1 if shared else heads, ROPE)
    v = r(bsz, seqlen, heads, DV)
    return [t.to(dtype).requires_grad_() for t in (q, k_nope, k_pe, v)]


def _close(got, want, rel):
    # relative to the tensor's largest value, and absolute for tensors near zero (dq at seqlen 1 is exactly 0)
    err = (got.double() - want).abs().max().item()
    bound = rel * max(want.abs().max().item(), 1.0)
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"


def _run(bsz, seqlen, heads, doc_ids=None, shared=True, dtype=torch.float32, rel=2e-5, seed=0):
    scale = (NOPE + ROPE) ** -0.5 * 1.3  # an mscale-like factor: the kernel must use the caller's scale
    q, k_nope, k_pe, v = _inputs(bsz, seqlen, heads, shared, dtype, seed)
    out = mla_attention(q, k_nope, v, scale=scale, doc_ids=doc_ids, k_pe=k_pe)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k_nope, k_pe, v)]
    ref = mla_attention_reference(
        ref_in[0], ref_in[1], ref_in[3], scale=scale, doc_ids=doc_ids, k_pe=ref_in[2]
    )
    assert out.shape == (bsz, seqlen, heads, DV) and out.dtype == dtype
    _close(out, ref, rel)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    out.backward(dout.to(dtype))
    ref.backward(dout)
    for name, got, want in zip(("dq", "dk_nope", "dk_pe", "dv"), (q, k_nope, k_pe, v), ref_in):
        assert got.grad.shape == want.shape, name
        _close(got.grad, want.grad, rel)


@pytest.mark.parametrize("bsz,seqlen,heads", [(1, 1, 1), (1, 7, 2), (1, 33, 2), (2, 17, 1), (1, 64, 1)])
def test_causal_matches_reference(bsz, seqlen, heads):
    _run(bsz, seqlen, heads)


@pytest.mark.parametrize(
    "lengths", [[5, 12, 16], [1, 1, 31], [33], [20, 1, 3, 9]], ids=["three", "short-first", "one", "four"]
)
def test_document_mask_matches_reference(lengths):
    doc_ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None]
    _run(1, doc_ids.shape[1], 2, doc_ids=doc_ids, seed=len(lengths))


def test_per_head_rope_key():
    """Without a shared k_pe the kernel takes full per-head keys (as the SDPA path builds them)."""
    _run(1, 19, 2, shared=False)


def test_fp16_inputs():
    _run(1, 24, 1, dtype=torch.float16, rel=4e-3)


def test_doc_bounds():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 2, 3, 3, 3]], dtype=torch.int32)
    start, end = document_bounds(doc_ids)
    assert start.tolist() == [[0, 0, 2, 2, 2, 5], [0, 1, 2, 3, 3, 3]]
    assert end.tolist() == [[2, 2, 5, 5, 5, 6], [1, 2, 3, 6, 6, 6]]
    q, k_nope, k_pe, v = _inputs(2, 6, 1)
    with pytest.raises(ValueError, match="doc_bounds"):  # the ids where the bounds belong
        mla_attention(q, k_nope, v, scale=0.1, k_pe=k_pe, doc_bounds=doc_ids)


def test_model_computes_document_bounds_once(monkeypatch):
    """A model with attn_impl 'triton' computes the document bounds once a forward, for every layer and the MTP
    block, and the backward reuses the forward's (before, each attention call computed them in both)."""
    import titan_dsv3.kernels.mla_attention as mla
    from tests.tiny import tiny_model_args
    from titan_dsv3.models import DeepSeekV3Model

    calls = []
    counted = mla.document_bounds

    def counting(doc_ids):
        calls.append(doc_ids.shape)
        return counted(doc_ids)

    monkeypatch.setattr(mla, "document_bounds", counting)
    torch.manual_seed(0)
    model = DeepSeekV3Model(tiny_model_args(attn_impl="triton", max_seq_len=32))
    model.init_weights()
    tokens = torch.randint(0, 128, (2, 24))
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 3 + [1] * 20 + [2]], dtype=torch.int32)
    logits, _ = model(tokens, doc_ids=doc_ids)
    logits.float().square().mean().backward()
    # once, not once per attention call (3 layers + 1 MTP block, forward and backward)
    assert calls == [(2, 24)]


@pytest.mark.parametrize("compiled", [False, True])
def test_selective_checkpointing_keeps_the_attention(monkeypatch, compiled):
    """Selective activation checkpointing by op saves the fused attention's output like SDPA's: its forward
    kernels run once a layer, not again in the backward's recompute, and the gradients equal the run without
    checkpointing. Before, both eager calls (an autograd.Function the policy never saw) and blocks compiled
    per block (the op not in the policy's list) reran them: 8 launches, 4 compiled (no MTP there)."""
    import titan_dsv3.kernels.mla_attention_rope as mla_rope
    from tests.tiny import tiny_model_args
    from titan_dsv3.models import DeepSeekV3Model
    from titan_dsv3.parallel.activation_checkpoint import apply_ac

    launches = []
    launch = mla_rope._mla_fwd  # the model calls mla_attention_rope, which launches mla_attention's forward
    monkeypatch.setattr(mla_rope, "_mla_fwd", lambda *a: launches.append(a[0].shape) or launch(*a))
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    args = dict(attn_impl="triton", max_seq_len=32) | (dict(n_layers=2, mtp_depth=0) if compiled else {})
    calls = 2 if compiled else 4  # one a layer and the MTP block's
    grads = {}
    for mode in ("none", "selective"):
        torch.manual_seed(0)
        model = DeepSeekV3Model(tiny_model_args(**args))
        model.init_weights()
        if mode == "selective":
            apply_ac(model, mode, "op")
        if compiled:
            for name, block in list(model.layers.items()):
                model.layers[name] = torch.compile(block, backend="aot_eager")
        launches.clear()
        logits, mtp_logits = model(tokens)
        (logits.float().square().mean() + sum(t.float().square().mean() for t in mtp_logits)).backward()
        assert len(launches) == calls, (mode, len(launches))
        grads[mode] = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads["none"]) == len(grads["selective"])
    for a, b in zip(grads["none"], grads["selective"]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("with_docs", [False, True])
def test_rope_entry_matches_reference(with_docs):
    """mla_attention_rope (q before RoPE, kv whole) against the float64 reference on models/rope.apply_rope's
    rotation, forward and the gradients of q, kv and k_pe, with a YaRN-scaled table (mscale != 1: the backward
    must apply the rotation's transpose, not its inverse)."""
    from titan_dsv3.kernels.mla_attention_rope import mla_attention_rope, rope_rotate
    from titan_dsv3.models import ModelArgs
    from titan_dsv3.models.rope import apply_rope, rope_cos_sin

    bsz, seqlen, heads = 2, 21, 2
    args = ModelArgs(qk_rope_head_dim=ROPE, max_seq_len=64, original_seq_len=16, rope_factor=4.0, mscale=0.7,
                     mscale_all_dim=0.5)  # fmt: skip
    cos_sin = rope_cos_sin(args, 32)  # longer than seqlen, as the model's table
    g = torch.Generator().manual_seed(5)
    q, kv = (
        torch.randn(bsz, seqlen, heads, d, generator=g, dtype=torch.float64) for d in (NOPE + ROPE, NOPE + DV)
    )
    k_pe = torch.randn(bsz, seqlen, 1, ROPE, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        rope_rotate(q[..., NOPE:].float(), cos_sin), apply_rope(q[..., NOPE:].float(), cos_sin[:seqlen])
    )
    doc_ids = (
        torch.tensor([[0] * 5 + [1] * 9 + [2] * 7, [0] * 20 + [1]], dtype=torch.int32) if with_docs else None
    )
    ins = [t.float().requires_grad_() for t in (q, kv, k_pe)]
    out = mla_attention_rope(*ins, cos_sin, scale=0.11, nope=NOPE, doc_ids=doc_ids)
    ref_in = [t.clone().requires_grad_() for t in (q, kv, k_pe)]
    rq, rkv, rk_pe = ref_in
    ref = mla_attention_reference(
        rq[..., :NOPE], rkv[..., :NOPE], rkv[..., NOPE:], scale=0.11, doc_ids=doc_ids, k_pe=rk_pe,
        q_pe=apply_rope(rq[..., NOPE:], cos_sin[:seqlen].double()),
    )  # fmt: skip
    _close(out, ref, 2e-5)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(dout.float())
    ref.backward(dout)
    for got, want in zip(ins, ref_in):
        assert got.grad.shape == want.shape
        _close(got.grad, want.grad, 2e-5)


def test_rope_entry_refuses_a_short_table_or_one_elsewhere():
    from titan_dsv3.kernels.mla_attention_rope import mla_attention_rope

    q, kv, k_pe = (
        torch.zeros(1, 8, 1, NOPE + ROPE),
        torch.zeros(1, 8, 1, NOPE + DV),
        torch.zeros(1, 8, 1, ROPE),
    )
    with pytest.raises(ValueError, match="cos_sin"):
        mla_attention_rope(q, kv, k_pe, torch.zeros(4, ROPE // 2, 2), scale=0.1, nope=NOPE)
    with pytest.raises(ValueError, match="cos_sin is on meta"):
        mla_attention_rope(q, kv, k_pe, torch.zeros(8, ROPE // 2, 2, device="meta"), scale=0.1, nope=NOPE)


def test_traced_by_compile():
    """torch.compile traces around the custom op (fakes give the shapes) with no graph break, fwd and bwd, and
    agrees with the eager call (which runs the same launchers through an autograd.Function instead)."""
    q, k_nope, k_pe, v = _inputs(1, 9, 1)

    def f(q, k_nope, k_pe, v):
        return mla_attention(q, k_nope, v, scale=0.1, k_pe=k_pe).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(q, k_nope, k_pe, v)
    grads = torch.autograd.grad(loss, (q, k_pe))
    ref_loss = f(q, k_nope, k_pe, v)
    ref_grads = torch.autograd.grad(ref_loss, (q, k_pe))
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("with_docs", [False, True])
def test_mla_module_triton_equals_sdpa(with_docs):
    """MLA with attn_impl 'triton' (shared k_pe passed apart) equals the SDPA path in output and gradients."""
    from titan_dsv3.models import ModelArgs
    from titan_dsv3.models.attention import MLA
    from titan_dsv3.models.rope import rope_cos_sin

    dims = dict(
        dim=32,
        n_heads=2,
        q_lora_rank=0,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_seq_len=32,
        original_seq_len=16,
        rope_factor=2.0,
        mscale=0.7,
        mscale_all_dim=0.7,
    )
    mods = {}
    for impl in ("sdpa", "triton"):
        torch.manual_seed(3)
        m = MLA(ModelArgs(attn_impl=impl, **dims))
        m.init_weights(0.2)
        mods[impl] = m
    cos_sin = rope_cos_sin(ModelArgs(**dims), 32)
    x = torch.randn(1, 21, 32)
    doc_ids = torch.tensor([[0] * 6 + [1] * 10 + [2] * 5], dtype=torch.int32) if with_docs else None
    out_t = mods["triton"](x, cos_sin, document_bounds(doc_ids) if with_docs else None)
    if with_docs:  # the SDPA path has no document mask: compare document by document
        out_s = torch.cat([mods["sdpa"](x[:, a:b], cos_sin) for a, b in ((0, 6), (6, 16), (16, 21))], dim=1)
    else:
        out_s = mods["sdpa"](x, cos_sin)
    _close(out_t, out_s.double(), 1e-5)
    out_t.square().sum().backward()
    out_s.square().sum().backward()
    for a, b in zip(
        mods["triton"].parameters(), mods["sdpa"].parameters()
    ):  # fp32 both: summation order only
        _close(a.grad, b.grad.double(), 1e-5)


def test_tensors_on_another_device_are_refused():
    """The kernels take raw pointers, so a tensor on another device than q is refused with the argument named:
    doc_bounds by mla_attention; k_pe by the launcher (through the op, a meta tensor would reach the op's fake)."""
    from titan_dsv3.kernels.mla_attention import _mla_fwd

    q, k_nope, k_pe, v = _inputs(1, 6, 1)
    bounds = document_bounds(torch.zeros(1, 6, dtype=torch.int32)).to("meta")
    with pytest.raises(ValueError, match="doc_bounds is on meta, q on cpu"):
        mla_attention(q, k_nope, v, scale=0.1, k_pe=k_pe, doc_bounds=bounds)
    q_nope, q_pe = q.split([k_nope.shape[-1], k_pe.shape[-1]], dim=-1)
    with pytest.raises(ValueError, match="k_pe is on meta, q on cpu"):
        _mla_fwd(q_nope, q_pe, k_nope, k_pe.to("meta"), v, None, 0.1)


@pytest.mark.parametrize("heads", [16, 3])
def test_shared_rope_key_gradient_head_sum(heads):
    """The shared rope key's gradient is the per-head gradients (fp32) summed over heads, in k_pe's dtype: the
    Triton pass (heads a power of two; rows not a multiple of its block) or torch's sum (3 heads)."""
    from titan_dsv3.kernels.mla_attention_bwd import _head_sum

    x = torch.randn(2, 37, heads, ROPE, generator=torch.Generator().manual_seed(0))
    want = x.double().sum(2, keepdim=True)
    got = _head_sum(x, torch.float32)
    assert got.shape == (2, 37, 1, ROPE) and got.dtype == torch.float32
    _close(got, want, 1e-6)
    assert _head_sum(x, torch.bfloat16).dtype == torch.bfloat16
