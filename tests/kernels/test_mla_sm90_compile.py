"""The Gluon MLA forward and dq kernels for Hopper (kernels/mla_attention_sm90.py) and the dk/dv kernel
(kernels/mla_attention_bwd_sm90.py) compile for sm_90 with the installed Triton, without a GPU (each with and
without document masks; dq also storing the gradient before RoPE), into the design their docstrings state: warp-specialised (a TMA loader, the
two warpgroups given more registers), arithmetic running while one product (forward: the step before's PV;
dk/dv: dP^T, then dv's) or two (dq) are still in flight, and no wgmma serialised by ptxas (its C751x notes).
Their numerics are checked on GPU (tests/gpu/test_mla_attention_gpu.py). The compile runs in a subprocess
(sm90_compile.py).
"""

import pytest
import sm90_compile

SCRIPT = r"""
from titan_dsv3.kernels import mla_attention_bwd_sm90 as B
from titan_dsv3.kernels import mla_attention_sm90 as A

out = {}
for name, config, extra in (("_mla_fwd_kernel_sm90", A.FWD_CONFIG, ({},)),
                            ("_mla_bwd_dq_kernel_sm90", A.DQ_CONFIG, ({"UNROTATE": False}, {"UNROTATE": True}))):
    types = A.argument_types(config[0])
    for doc in (False, True):
        for more in extra:
            consts = {"STAGES": config[1], "HAS_DOC": doc, "num_warps": 4, **more}
            out[f"{name} HAS_DOC={doc} {more}"] = design(*compile_sm90(getattr(A, name), types, consts, 4))
block_m, stages = B.DKDV_CONFIG
types = A.argument_types(B.HALF_K, block_m)
for doc in (False, True):
    consts = {"STAGES": stages, "HAS_DOC": doc, "num_warps": 4}
    out[f"_mla_bwd_dkdv_kernel_sm90 HAS_DOC={doc}"] = design(*compile_sm90(B._mla_bwd_dkdv_kernel_sm90, types, consts, 4))
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_gluon_mla_kernels_compile_for_sm90_as_designed():
    got = sm90_compile.run(SCRIPT)
    assert (
        len(got) == 8
    )  # forward, dq and dk/dv, each with and without documents; dq with and without UNROTATE
    for name, feats in got.items():
        in_flight = 2 if name.startswith("_mla_bwd_dq") else 1
        assert feats["wgmma"] and feats["tma"], (name, feats)
        assert feats["warp_specialized"] and feats["setmaxnreg_inc"], (name, feats)
        assert in_flight in feats["pendings"], (name, feats["pendings"])
        assert not feats["ptxas_serialised"], (name, feats["ptxas_serialised"])
