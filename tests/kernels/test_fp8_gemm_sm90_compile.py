"""The Gluon FP8 GEMMs for Hopper (kernels/fp8_grouped_gemm_sm90.py) compile for sm_90 with the installed Triton,
without a GPU, into the design their docstrings state. Gluon has no interpreter, so on the CPU machine this is
what can be checked of them: that they build (the Gluon API moves between Triton releases: 3.6 names the TMA
load async_copy_global_to_shared, 3.9 async_load), and that the compiled code keeps one wgmma in flight while the
slice before it is rescaled, loads by TMA, and runs a warp-specialised loader beside consumers that were given
more registers; and that ptxas did not serialise the wgmmas (its C751x notes), which a loop-carried copy of an
in-flight product made it do in every Gluon GEMM until stop 21. Their numerics are checked on GPU
(tests/gpu/test_fp8_grouped_gemm_gpu.py).

The compile runs in a subprocess: this directory's conftest sets TRITON_INTERPRET=1, under which the JIT builds
interpreter functions instead.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.backends.nvidia.compiler import get_ptxas

from titan_dsv3.kernels import fp8_grouped_gemm_sm90 as G


out = {}
for name, bm, warps in (("_gemm_scatter_kernel_sm90_ws", 128, 8), ("_wgrad_kernel_sm90_ws", 128, 8)):
    fn = getattr(G, name)
    types = {**G.descriptor_types(bm), "out_ptr": "*bf16", "out2_ptr": "*bf16"}
    for ptr in ("sa_ptr", "sb_ptr"):
        types[ptr] = "*fp32"
    for ptr in ("tile_expert_ptr", "pend_ptr", "pstart_ptr", "row_src_ptr"):
        types[ptr] = "*i32"
    consts = {"STAGES": 4, "num_warps": warps}
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": warps})
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        info = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", "-o", os.devnull, f.name],
                              capture_output=True, text=True)
    out[name] = {
        "ptxas_serialised": re.findall(r"C751\d[^\n]*", info.stdout + info.stderr),
        "in_flight_1": "pendings = 1" in ttgir,
        "tma": "async_tma_copy_global_to_local" in ttgir,
        "wgmma": "wgmma.mma_async" in ptx,
        "warp_specialized": "ttg.warp_specialize" in ttgir,
        "setmaxnreg_inc": "setmaxnreg.inc" in ptx,
    }
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_gluon_gemms_compile_for_sm90_as_designed():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT") :])
    for name in ("_gemm_scatter_kernel_sm90_ws", "_wgrad_kernel_sm90_ws"):
        feats = got[name]
        assert feats["wgmma"] and feats["tma"] and feats["in_flight_1"], (name, feats)
        assert feats["warp_specialized"] and feats["setmaxnreg_inc"], (name, feats)
        # ptxas's C751x notes: it waits for every wgmma before issuing the next (tensor cores idle in between)
        assert not feats["ptxas_serialised"], (name, feats["ptxas_serialised"])


PASS_SCRIPT = r"""
import json

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

from titan_dsv3.kernels import fp8_quant_sm90 as S

types = {"dh_ptr": "*bf16", "h13_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "tile_expert_ptr": "*i32",
         "row_src_ptr": "*i32"}
types.update({p: "*fp8e4nv" for p in ("gq_ptr", "gqt_ptr", "hqt_ptr", "q_ptr", "qt_ptr")})
types.update({p: "*fp32" for p in ("gs_ptr", "gst_ptr", "hst_ptr", "s_ptr", "st_ptr")})
out = {}
kernels = (("_swiglu_bwd_quant_kernel_sm90", 8), ("_quant_act_kernel_sm90", 4), ("_quant_weight_kernel_sm90", 8))
for name, warps in kernels:
    fn = getattr(S, name)
    sig = {a: "constexpr" if a == "num_warps" else types.get(a, "i32") for a in fn.arg_names}
    # the JIT specialises the pointers and sizes (HIDDEN, n_pad, n_cols) as 16-divisible at launch; without that
    # no access is vectorised
    attrs = {(i,): [["tt.divisibility", 16]] for i, (a, t) in enumerate(sig.items())
             if t != "constexpr" and a != "n_experts"}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index("num_warps"),): warps}, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": warps}).asm["ptx"]
    out[name] = {p: ptx.count(p) for p in ("st.shared.b8", "ldmatrix", "st.global.v4", "st.local")}
    out[name]["cp.async under 16 B"] = ptx.count("cp.async.cg.shared.global") - ptx.count("0x10, 0x10;")
    out[name]["cp.async"] = ptx.count("cp.async.cg.shared.global")
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_gluon_quantisation_passes_transpose_bf16_inputs():
    """The Gluon SwiGLU-backward pass, activation and weight quantisers (kernels/fp8_quant_sm90.py) compile for
    sm_90 into what they were written for: no byte-wide shared-memory stores (the Triton passes make 192 and 128 a
    thread to transpose their fp8 outputs), 16-byte global stores, nothing spilled to local memory; the
    activation quantiser's bf16 tile transposed by ldmatrix, the other two's inputs staged by 16-byte cp.async
    copies (with 8 warps 24 a thread for the SwiGLU backward's 96 KiB, 8 for a weight block's 32)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", PASS_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    got_all = json.loads(lines[-1][len("RESULT") :])
    for name, got in got_all.items():
        assert got["st.shared.b8"] == 0 and got["st.local"] == 0, (name, got)
        assert got["st.global.v4"] > 0, (name, got)
    assert got_all["_quant_act_kernel_sm90"]["ldmatrix"] > 0, got_all
    assert got_all["_swiglu_bwd_quant_kernel_sm90"]["cp.async"] == 24, got_all
    assert got_all["_quant_weight_kernel_sm90"]["cp.async"] == 8, got_all
    for name in ("_swiglu_bwd_quant_kernel_sm90", "_quant_weight_kernel_sm90"):
        assert got_all[name]["cp.async under 16 B"] == 0, got_all
