"""FP8 grouped SwiGLU experts (Triton, interpreted on CPU) against the dequantised torch reference, forward and
backward, and against unquantised fp32 math within FP8 error.

Against the reference (same scales, same fp8 roundings) only fp32 summation order differs, plus the rare element
whose fp8 rounding flips on that difference (one e4m3 step, up to 12.5% of that element) and the interpreter's
flush of e4m3 subnormals: every element within 1% of the tensor's largest value, and the relative Frobenius error
under 1e-3 (measured: <= 2.2e-4).

Against unquantised fp32 math: one e4m3 rounding has an RMS relative error of ~2.5% (3 mantissa bits); y passes
through three GEMMs and two quantised operands each, which compounds to ~6.2-6.6% relative Frobenius error on
random data for y and every gradient (the dequantised reference shows the same); bound 8%.
"""

import os
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from titan_dsv3.kernels import fp8_grouped_gemm as K  # noqa: E402
from titan_dsv3.kernels import fp8_quant as Q  # noqa: E402
from titan_dsv3.models.moe import looped_swiglu  # noqa: E402

DIM, HIDDEN = 256, 128


def _inputs(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, n_exp = sum(counts), len(counts)
    x = torch.randn(n, DIM, generator=g)
    w1 = torch.randn(n_exp, HIDDEN, DIM, generator=g) * DIM**-0.5
    w2 = torch.randn(n_exp, DIM, HIDDEN, generator=g) * HIDDEN**-0.5
    w3 = torch.randn(n_exp, HIDDEN, DIM, generator=g) * DIM**-0.5
    dy = torch.randn(n, DIM, generator=g)
    return x, torch.tensor(counts), w1, w2, w3, dy


def _close(got, want, rel):
    if want.numel() == 0:
        return
    err = (got - want).abs().max().item()
    bound = rel * max(want.abs().max().item(), 1e-6)
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"


def _rel_fro(got, want):
    return ((got - want).norm() / want.norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize(
    "counts",
    [[0, 1, 130], [3, 0, 0], [129], [0, 0]],
    ids=["empty-one-many", "one-group", "single", "no-tokens"],
)
def test_forward_backward_match_dequantised_reference(counts):
    x, counts_E, w1, w2, w3, dy = _inputs(counts, seed=len(counts))
    params = [t.clone().requires_grad_() for t in (x, w1, w2, w3)]
    y = K.fp8_grouped_swiglu(params[0], counts_E, *params[1:])
    y.backward(dy)
    ref = K.fp8_grouped_swiglu_reference(x, counts_E, w1, w2, w3, dy)
    assert y.shape == (sum(counts), DIM)
    for got, want in zip((y, params[0].grad, params[1].grad, params[2].grad, params[3].grad), ref):
        assert got.shape == want.shape
        _close(got, want, 1e-2)
        assert _rel_fro(got, want) < 1e-3 or want.abs().max() == 0


def test_64_row_tiles_match_128_row_tiles(monkeypatch):
    """The scatter and weight-gradient GEMMs' 64-row configs (4 warps, two blocks a SM on H100) cover each
    128-row padded tile with two programs; half a tile must read its own expert and scales."""
    import triton

    x, counts_E, w1, w2, w3, dy = _inputs([0, 1, 130], seed=5)

    def run():
        params = [t.clone().requires_grad_() for t in (x, w1, w2, w3)]
        y = K.fp8_grouped_swiglu(params[0], counts_E, *params[1:])
        y.backward(dy)
        return [y.detach()] + [t.grad for t in params]

    want = run()
    for kernel, kw in (
        (K._gemm_scatter_kernel, {"BLOCK_M": 64, "BLOCK_N": 128}),
        (K._wgrad_kernel, {"BLOCK_R": 64}),
    ):
        monkeypatch.setattr(kernel, "configs", [triton.Config(kw, num_warps=4, num_stages=1)])
        monkeypatch.setattr(kernel, "cache", {})
    got = run()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_close_to_unquantised_math():
    """The FP8 result tracks the plain fp32 experts (models.moe.looped_swiglu) within FP8 error."""
    counts = [40, 0, 200]
    x, counts_E, w1, w2, w3, dy = _inputs(counts, seed=7)
    fp8_in = [t.clone().requires_grad_() for t in (x, w1, w2, w3)]
    ref_in = [t.clone().requires_grad_() for t in (x, w1, w2, w3)]
    y = K.fp8_grouped_swiglu(fp8_in[0], counts_E, *fp8_in[1:])
    y_ref = looped_swiglu(ref_in[0], counts_E, *ref_in[1:])
    y.backward(dy)
    y_ref.backward(dy)
    assert _rel_fro(y, y_ref) < 0.08
    for a, b in zip(fp8_in, ref_in):
        assert _rel_fro(a.grad, b.grad) < 0.08


def test_layout_pads_each_group():
    lay = K._Layout(torch.tensor([0, 1, 130, 0, 128]), 259)
    assert lay.n_pad == 3 * 128 + 5 * 128
    assert lay.pstart.tolist() == [0, 0, 128, 384, 384] and lay.pend.tolist() == [0, 128, 384, 384, 512]
    src = lay.row_src.tolist()
    assert src[0] == 0 and src[1:128] == [-1] * 127  # expert 1: its one token, then padding
    assert src[128:258] == list(range(1, 131)) and src[258:384] == [-1] * 126
    assert src[384:512] == list(range(131, 259)) and set(src[512:]) == {-1}
    assert lay.tile_expert.tolist() == [1, 2, 2, 4, 5, 5, 5, 5]


@pytest.mark.parametrize("n_exp", [3, 40, 256])
def test_layout_kernel_matches_its_definition(n_exp):
    """The one-kernel layout against its definition, row by row, with empty and multi-tile experts."""
    g = torch.Generator().manual_seed(n_exp)
    # with many experts mostly small groups: the interpreter's time grows with the padded rows (E x 128 at least)
    counts = torch.randint(0, 300 if n_exp < 100 else 40, (n_exp,), generator=g)
    counts[1::7] = 300  # multi-tile groups
    counts[::3] = 0
    lay = K._Layout(counts, int(counts.sum()))
    src, pstart, pend = [-1] * lay.n_pad, [], []
    row = pos = 0
    for c in counts.tolist():
        pstart.append(pos)
        src[pos : pos + c] = range(row, row + c)
        row, pos = row + c, pos + -(-c // 128) * 128
        pend.append(pos)
    assert lay.row_src.tolist() == src and lay.pstart.tolist() == pstart and lay.pend.tolist() == pend
    assert lay.identity.tolist() == list(range(lay.n_pad))
    ends = torch.tensor(pend)
    assert lay.tile_expert.tolist() == [int((ends <= t * 128).sum()) for t in range(lay.n_pad // 128)]


def test_backward_reuses_the_forward_layout(monkeypatch):
    built = []
    init = K._Layout.__init__
    monkeypatch.setattr(K._Layout, "__init__", lambda self, *a: built.append(1) or init(self, *a))
    x, counts_E, *ws, dy = _inputs([5, 0, 130], seed=3)
    x.requires_grad_()
    K.fp8_grouped_swiglu(x, counts_E, *ws).backward(dy)
    assert len(built) == 1 and x.grad is not None


def test_quantised_operands_match_torch_cast():
    """The activation quantiser gathers rows into the padded layout and scales 1x128 and 128x1 tiles as torch's
    cast does; the interpreter flushes e4m3 subnormals (|x| / scale < 2^-6), hence that much slack per element."""
    x = torch.randn(131, 256) * torch.logspace(-3, 2, 256)  # channels of very different size
    lay = K._Layout(torch.tensor([1, 130]), 131)
    q, s, qt, st = Q._quant_act(x, lay)
    used = int(lay.pend[-1])  # tiles past the last group are never read and not written
    real = lay.row_src[:used] >= 0
    scale = s[:used].repeat_interleave(128, dim=1)  # (used, 256) scale of each element
    deq = q[:used].float() * scale
    want = torch.zeros(used, 256)
    want[real] = Q._qdq_rows(x[lay.row_src[:used][real].long()])
    assert ((deq - want).abs() <= 2**-6 * scale + 1e-6 * want.abs()).all()
    assert (deq[~real] == 0).all()
    scale_t = st[: used // 128].repeat_interleave(128, dim=0)  # (used, 256)
    deq_t = qt[:, :used].float().T * scale_t
    want_t = torch.zeros(used, 256)
    for a, b, n in ((0, 1, 1), (128, 131, 130)):  # padded start, end of the source rows, count
        want_t[a : a + n] = Q._qdq_tokens(x[b - n : b])
    assert ((deq_t - want_t).abs() <= 2**-6 * scale_t + 1e-6 * want_t.abs()).all()


def test_swiglu_quant_pass_matches_torch():
    """The forward's SwiGLU as a pass over the stored h1 | h3 (GEMM1 without its epilogue, as on Hopper): h =
    silu(h1) * h3 quantised per 1x128 as torch's cast does (tiles past the last expert are not read)."""
    g = torch.Generator().manual_seed(5)
    h13 = (torch.randn(384, 2 * HIDDEN, generator=g) * 3).bfloat16()
    # 2 experts: the third tile has none (the launcher takes fp8_grouped_gemm's _Layout; these are what it reads)
    lay = SimpleNamespace(n_pad=384, n_exp=2, tile_expert=torch.tensor([0, 1, 2], dtype=torch.int32))
    hq, hs = Q._swiglu_quant(h13, lay, HIDDEN)
    h1, h3 = h13[:256, :HIDDEN].float(), h13[:256, HIDDEN:].float()
    want = Q._qdq_rows(torch.nn.functional.silu(h1) * h3)
    scale = hs[:256].repeat_interleave(128, dim=1)
    deq = hq[:256].float() * scale
    assert ((deq - want).abs() <= 2**-6 * scale + 1e-6 * want.abs()).all()
    assert hq.shape == (384, HIDDEN) and hs.shape == (384, HIDDEN // 128)


def test_traced_by_compile():
    x, counts_E, w1, w2, w3, dy = _inputs([5, 3], seed=3)
    ws = [w.requires_grad_() for w in (w1, w2, w3)]

    def f(x, counts, w1, w2, w3):
        return (K.fp8_grouped_swiglu(x, counts, w1, w2, w3) * dy).sum()

    loss = torch.compile(f, backend="aot_eager", fullgraph=True)(x, counts_E, *ws)
    grads = torch.autograd.grad(loss, ws)
    ref = torch.autograd.grad(f(x, counts_E, *ws), ws)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_backward_gets_no_zero_filled_gradients_for_the_saved_outputs():
    """The forward's fp8 copies are outputs that never get a gradient; materialised, they cost ~700 MB of fills a
    backward on bench6 shapes."""
    x, counts_E, w1, w2, w3, dy = _inputs([0, 1, 130])
    params = [t.clone().requires_grad_() for t in (x, w1, w2, w3)]
    y = K.fp8_grouped_swiglu(params[0], counts_E, *params[1:])
    with torch.profiler.profile() as prof:
        y.backward(dy)
    assert not {e.name for e in prof.events() if e.name in ("aten::fill_", "aten::zero_", "aten::zeros")}
    assert all(p.grad is not None for p in params)


def test_counts_past_the_rows_are_dropped_not_read():
    """Counts that claim more rows than x has (80 + 50 for 100 rows) act as if the last group ended at row 100:
    the same bits as counts 80 + 20, forward and backward; before the layout kernel bounded the groups, the kernels
    read x and wrote y and dx past their ends (found through a GPU harness whose weight gradients then differed
    from call to call)."""
    x, _, w1, w2, w3, dy = _inputs([80, 20], seed=5)
    outs = []
    for counts in ([80, 50], [80, 20]):
        ins = [t.clone().requires_grad_() for t in (x, w1, w2, w3)]
        y = K.fp8_grouped_swiglu(ins[0], torch.tensor(counts), *ins[1:])
        y.backward(dy)
        outs.append([y.detach(), *(t.grad for t in ins)])
        lay = K._Layout(torch.tensor(counts), 100)
        assert int(lay.pend[-1]) == 256 and int(lay.row_src.max()) == 99
    for got, want in zip(*outs):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "bad, match",
    [
        ("counts_meta", "counts is on meta, x on cpu"),
        ("w2_meta", "w2 is on meta, x on cpu"),
        ("counts_float", "counts dtype torch.float32"),
        ("counts_short", "counts has 1 experts, the weights 2"),
        ("too_many_rows", "x has 8388480 rows and 2 experts: 65537 padded 128-row tiles"),
    ],
)
def test_bad_inputs_get_one_line_errors(bad, match):
    """Inputs the kernels cannot read safely (a tensor on another device is a raw pointer into the wrong memory)
    are refused before anything launches, with the argument and the fix named. The launcher is called directly:
    through the op, a meta tensor would send the call to the op's fake instead (on a GPU, counts left on the CPU
    reach the launcher)."""
    x, counts, w1, w2, w3, _ = _inputs([5, 3])
    if bad == "counts_meta":
        counts = counts.to("meta")
    elif bad == "w2_meta":
        w2 = w2.to("meta")
    elif bad == "counts_float":
        counts = counts.float()
    elif bad == "too_many_rows":  # a view of one row: no memory, and the check comes before any copy
        x = x[:1].expand(8_388_480, -1)
    else:
        counts = counts[:1]
    with pytest.raises(ValueError, match=match):
        K._swiglu_fwd(x, counts, w1, w2, w3)
