"""The FP8 linear's quantiser (kernels/fp8_linear.py) and the fused head loss's gradient pass (kernels/fp8_head_loss.py,
from bf16 logits) compiled for sm_90 without a GPU, with the installed Triton and the GPU machines'
(sm90_compile.SIDE_TRITON where CI provides it): the cast is one rounding, saturating
instruction of the right format (what the interpreter's hand rounding stands in for), both layouts are written in
16-byte stores (the transposed copy goes through shared memory, not byte by byte), and nothing spills. The bits are
checked on GPU (tests/gpu/test_fp8_linear_gpu.py).
"""

import pytest
import sm90_compile

SCRIPT = r"""
import torch
from triton.compiler import ASTSource
from titan_dsv3.kernels import fp8_head_loss as H
from titan_dsv3.kernels import fp8_linear as L

builds = []
for src_ty in ("*bf16", "*fp32"):
    for q_ty, fmt in (("*fp8e4nv", torch.float8_e4m3fn), ("*fp8e5", torch.float8_e5m2)):
        max_, min_normal, drop = L._FORMATS[fmt]
        consts = dict(MAX=max_, MIN_NORMAL=min_normal, DROP=drop, BOTH=True, EXACT=False, **L._BLOCK)
        types = dict(x_ptr=src_ty, inv_ptr="*fp32", q_ptr=q_ty, qt_ptr=q_ty, M="i32", N="i32")
        builds.append((f"{src_ty} {q_ty}", L._quant_kernel, types, consts, L._LAUNCH))
max_, min_normal, drop = L._FORMATS[H.GRAD_DTYPE]
consts = dict(IGNORE=H.IGNORE_INDEX, MAX=max_, MIN_NORMAL=min_normal, DROP=drop, BOTH=True, EXACT=False, **L._BLOCK)
types = dict(z_ptr="*bf16", lse_ptr="*fp32", labels_ptr="*i64", q_ptr="*fp8e5", qt_ptr="*fp8e5", M="i32", N="i32")
builds.append(("head loss gradient *bf16 *fp8e5", H._grad_kernel, types, consts, H._GRAD_LAUNCH))

out = {}
for label, fn, types, consts, launch in builds:
    sig = {a: "constexpr" if a in consts else types[a] for a in fn.arg_names}
    # pointers and sizes 16-byte divisible, as the JIT specialises them at launch on bench6's shapes
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in types}
    k = triton.compile(
        ASTSource(fn=fn, signature=sig, attrs=attrs,
                  constexprs={(fn.arg_names.index(c),): v for c, v in consts.items()}),
        target=GPUTarget("cuda", 90, 128), options=launch,
    )
    ptx = k.asm["ptx"]
    out[label] = {
        "cvt": sorted(set(re.findall(r"cvt\.rn[a-z0-9.]*\.e[45]m[23]x2\.f32", ptx))),
        "stores": sorted(set(re.findall(r"st\.global\.[a-z0-9.]+", ptx))),
        "local": "st.local" in ptx,
    }
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("triton_build", sm90_compile.TRITONS)
def test_quantiser_compiles_for_sm90(triton_build):
    got = sm90_compile.run(SCRIPT, side=triton_build == "side")
    for key, feats in got.items():
        fmt = "e4m3" if key.endswith("e4nv") else "e5m2"
        assert feats["cvt"] == [f"cvt.rn.satfinite.{fmt}x2.f32"], (key, feats)
        assert feats["stores"] == ["st.global.v4.b32"], (key, feats)
        assert not feats["local"], (key, feats)
