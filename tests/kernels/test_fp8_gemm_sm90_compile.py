"""The Gluon FP8 GEMMs for Hopper (kernels/fp8_grouped_gemm_sm90.py) compile for sm_90 with the installed Triton,
without a GPU (and with the GPU machines' Triton where CI provides it: sm90_compile.SIDE_TRITON), into the
design their docstrings state. Gluon has no interpreter, so on the CPU machine this is
what can be checked of them: that they build (the Gluon API moves between Triton releases: 3.6 names the TMA
load async_copy_global_to_shared, 3.9 async_load), and that the compiled code keeps one wgmma in flight while the
slice before it is rescaled, loads by TMA, and runs a warp-specialised loader beside consumers that were given
more registers; and that ptxas did not serialise the wgmmas (its C751x notes), which a loop-carried copy of an
in-flight product made it do in every Gluon GEMM until stop 21. Their numerics are checked on GPU
(tests/gpu/test_fp8_grouped_gemm_gpu.py).

The compile runs in a subprocess (sm90_compile.py).
"""

import pytest
import sm90_compile

SCRIPT = r"""
from titan_dsv3.kernels import fp8_grouped_gemm_sm90 as G

out = {}
for name, bm, warps in (("_gemm_scatter_kernel_sm90_ws", 128, 8), ("_wgrad_kernel_sm90_ws", 128, 8)):
    types = {**G.descriptor_types(bm), "out_ptr": "*bf16", "out2_ptr": "*bf16"}
    for ptr in ("sa_ptr", "sb_ptr"):
        types[ptr] = "*fp32"
    for ptr in ("tile_expert_ptr", "pend_ptr", "pstart_ptr", "row_src_ptr"):
        types[ptr] = "*i32"
    out[name] = design(*compile_sm90(getattr(G, name), types, {"STAGES": 4, "num_warps": warps}, warps))
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("triton_build", sm90_compile.TRITONS)
def test_gluon_gemms_compile_for_sm90_as_designed(triton_build):
    got = sm90_compile.run(SCRIPT, side=triton_build == "side")
    for name in ("_gemm_scatter_kernel_sm90_ws", "_wgrad_kernel_sm90_ws"):
        feats = got[name]
        assert feats["wgmma"] and feats["tma"] and 1 in feats["pendings"], (name, feats)
        assert feats["warp_specialized"] and feats["setmaxnreg_inc"], (name, feats)
        # ptxas's C751x notes: it waits for every wgmma before issuing the next (tensor cores idle in between)
        assert not feats["ptxas_serialised"], (name, feats["ptxas_serialised"])


PASS_SCRIPT = r"""
from titan_dsv3.kernels import fp8_quant_sm90 as S

types = {"dh_ptr": "*bf16", "h13_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "tile_expert_ptr": "*i32",
         "row_src_ptr": "*i32", "row_w_ptr": "*fp32"}
types.update({p: "*fp8e4nv" for p in ("gq_ptr", "gqt_ptr", "hqt_ptr", "q_ptr", "qt_ptr")})
types.update({p: "*fp32" for p in ("gs_ptr", "gst_ptr", "hst_ptr", "s_ptr", "st_ptr")})
out = {}
kernels = (("_swiglu_bwd_quant_kernel_sm90", 8, {}), ("_quant_act_kernel_sm90", 4, {"WEIGHTED": False}),
           ("_quant_act_kernel_sm90", 4, {"WEIGHTED": True}), ("_quant_weight_kernel_sm90", 8, {}))
for name, warps, consts in kernels:
    fn = getattr(S, name)
    key = name + (" weighted" if consts.get("WEIGHTED") else "")
    # the JIT specialises the pointers and sizes (HIDDEN, n_pad, n_cols) as 16-divisible at launch; without that
    # no access is vectorised
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a not in ("num_warps", "n_experts", "WEIGHTED")}
    _, ptx, _ = compile_sm90(fn, types, {"num_warps": warps, **consts}, warps, attrs)
    out[key] = {p: ptx.count(p) for p in ("st.shared.b8", "ldmatrix", "st.global.v4", "st.local")}
    out[key]["cp.async under 16 B"] = ptx.count("cp.async.cg.shared.global") - ptx.count("0x10, 0x10;")
    out[key]["cp.async"] = ptx.count("cp.async.cg.shared.global")
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("triton_build", sm90_compile.TRITONS)
def test_gluon_quantisation_passes_transpose_bf16_inputs(triton_build):
    """The Gluon SwiGLU-backward pass, activation and weight quantisers (kernels/fp8_quant_sm90.py) compile for
    sm_90 into what they were written for: no byte-wide shared-memory stores (the Triton passes make 192 and 128 a
    thread to transpose their fp8 outputs), 16-byte global stores, nothing spilled to local memory; the
    activation quantiser's bf16 tile transposed by ldmatrix, the other two's inputs staged by 16-byte cp.async
    copies (with 8 warps 24 a thread for the SwiGLU backward's 96 KiB, 8 for a weight block's 32)."""
    got_all = sm90_compile.run(PASS_SCRIPT, side=triton_build == "side")
    for name, got in got_all.items():
        assert got["st.shared.b8"] == 0 and got["st.local"] == 0, (name, got)
        assert got["st.global.v4"] > 0, (name, got)
    assert got_all["_quant_act_kernel_sm90"]["ldmatrix"] > 0, got_all
    assert got_all["_quant_act_kernel_sm90 weighted"]["ldmatrix"] > 0, got_all
    assert got_all["_swiglu_bwd_quant_kernel_sm90"]["cp.async"] == 24, got_all
    assert got_all["_quant_weight_kernel_sm90"]["cp.async"] == 8, got_all
    for name in ("_swiglu_bwd_quant_kernel_sm90", "_quant_weight_kernel_sm90"):
        assert got_all[name]["cp.async under 16 B"] == 0, got_all
