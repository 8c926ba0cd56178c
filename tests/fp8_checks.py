"""A check shared by the FP8 kernel tests on CPU (tests/kernels, interpreter) and on GPU (tests/gpu)."""

import torch

# The outputs of the passes in kernels/fp8_quant.py, a letter each: p (P, C), padded rows first; t (C, P), transposed;
# s (P/128, C), a per-128-token scale table.
SWIGLU_BWD_OUTPUTS = "pptsts"  # gq, gs, gqt, gst, hqt, hst
QUANT_ACT_OUTPUTS = "ppts"  # q, s, qt, st


def assert_same_where_written(want, got, lay, layouts: str) -> None:
    """want and got equal bit for bit in the experts' padded rows (up to lay.pend[-1]); the tiles past the last
    expert are written by no pass."""
    rows = int(lay.pend[-1])
    parts = {"p": (slice(rows),), "t": (slice(None), slice(rows)), "s": (slice(rows // 128),)}
    assert len(want) == len(got) == len(layouts)
    for w, o, kind in zip(want, got, layouts):
        if w.dtype == torch.float8_e4m3fn:
            w, o = w.view(torch.uint8), o.view(torch.uint8)
        assert torch.equal(w[parts[kind]], o[parts[kind]]), f"output {kind!r} differs"
