"""The Gluon MLA forward and dq kernels for Hopper (kernels/mla_attention_sm90.py) compile for sm_90 with the
installed Triton, without a GPU, into the design their docstrings state: warp-specialised (a TMA loader warp,
the two warpgroups given more registers), each step's arithmetic running while one product (forward) or two (dq)
of the step before are still in flight, and no wgmma serialised by ptxas (its C751x notes). Their numerics are
checked on GPU (tests/gpu/test_mla_attention_gpu.py). A subprocess: this directory's conftest sets
TRITON_INTERPRET=1, under which the JIT builds interpreter functions instead.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, re, subprocess, tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental.gluon._runtime import GluonASTSource

from titan_dsv3.kernels import mla_attention_sm90 as A

out = {}
for name, config in (("_mla_fwd_kernel_sm90", A.FWD_CONFIG), ("_mla_bwd_dq_kernel_sm90", A.DQ_CONFIG)):
    fn = getattr(A, name)
    types = {**A.descriptor_types(config[0]), "o_ptr": "*bf16", "dqn_ptr": "*bf16", "dqp_ptr": "*bf16",
             "lse_ptr": "*fp32", "delta_ptr": "*fp32", "qk_scale": "fp32", "sm_scale": "fp32"}
    consts = {"STAGES": config[1], "num_warps": 4}
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": 4})
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        info = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", "-o", os.devnull, f.name],
                              capture_output=True, text=True)
    out[name] = {
        "ptxas_serialised": re.findall(r"C751\d[^\n]*", info.stdout + info.stderr),
        "pendings": sorted(set(int(p) for p in re.findall(r"pendings = (\d+)", ttgir))),
        "tma": "async_tma_copy_global_to_local" in ttgir,
        "wgmma": "wgmma.mma_async" in ptx,
        "warp_specialized": "ttg.warp_specialize" in ttgir,
        "setmaxnreg_inc": "setmaxnreg.inc" in ptx,
    }
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_gluon_mla_kernels_compile_for_sm90_as_designed():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT") :])
    for name, in_flight in (("_mla_fwd_kernel_sm90", 1), ("_mla_bwd_dq_kernel_sm90", 2)):
        feats = got[name]
        assert feats["wgmma"] and feats["tma"], (name, feats)
        assert feats["warp_specialized"] and feats["setmaxnreg_inc"], (name, feats)
        assert in_flight in feats["pendings"], (name, feats["pendings"])
        assert not feats["ptxas_serialised"], (name, feats["ptxas_serialised"])
