"""The Gluon MLA forward and dq kernels for Hopper (kernels/mla_attention_sm90.py) and the dk/dv kernels
(kernels/mla_attention_bwd_sm90.py with documents, kernels/mla_attention_dkdv_split_sm90.py without) compile for
sm_90 with the installed Triton, without a GPU (every build the launchers make:
mla_attention_sm90_builds.compile_builds), into the design their docstrings state: warp-specialised (a TMA
loader, the warpgroups given more registers), arithmetic running while products are still in flight (forward:
the step before's PV; dq: two, the block before's dq products; dk/dv with documents: three, dP^T and the step
before's dk products; split dk/dv: dP^T while P^T is formed), and no wgmma serialised by ptxas (its C751x
notes). CI compiles them with the GPU machines' Triton too (TITAN_SM90_SIDE_TRITON, sm90_compile.py).
Their numerics are checked on GPU (tests/gpu/test_mla_attention_gpu.py). The compile runs in a subprocess
(sm90_compile.py).
"""

import pytest
import sm90_compile

SCRIPT = r"""
from titan_dsv3.kernels import mla_attention_sm90_builds as A

out = {}
for label, kernel, types, consts in A.compile_builds():
    out[label] = design(*compile_sm90(kernel, types, consts, 4))
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("triton_build", sm90_compile.TRITONS)
def test_gluon_mla_kernels_compile_for_sm90_as_designed(triton_build):
    got = sm90_compile.run(SCRIPT, side=triton_build == "side")
    # forward and dq with and without documents, dq with and without UNROTATE; dk/dv with, split dk/dv without
    assert len(got) == 8
    for name, feats in got.items():
        in_flight = {"_mla_fwd": 1, "_mla_bwd_dq": 2, "_mla_bwd_dkdv": 3, "_mla_bwd_dkdv_split": 1}[
            name.split("_kernel")[0]
        ]
        assert feats["wgmma"] and feats["tma"], (name, feats)
        assert feats["warp_specialized"] and feats["setmaxnreg_inc"], (name, feats)
        assert in_flight in feats["pendings"], (name, feats["pendings"])
        assert not feats["ptxas_serialised"], (name, feats["ptxas_serialised"])
