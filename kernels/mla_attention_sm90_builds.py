"""The builds of the Gluon MLA kernels (mla_attention_sm90.py, mla_attention_bwd_sm90.py) as the launchers make
them, with the argument types the JIT derives at launch: what compiling them for sm_90 without a GPU needs
(tests/kernels/test_mla_sm90_compile.py, benchmarks/compile_kernels_sm90.py)."""

import torch

from titan_dsv3.kernels.mla_attention_sm90 import (
    DQ_CONFIG,
    FWD_CONFIG,
    HALF_M,
    _mla_bwd_dq_kernel_sm90,
    _mla_fwd_kernel_sm90,
    _rows_desc,
)


def argument_types(block_n: int, block_m: int = HALF_M) -> dict[str, str]:
    """The Gluon MLA kernels' non-integer argument types as the JIT derives them at launch for DeepSeek's head
    dims (nope 128, rope 64, v 128, bf16), block_n key rows and block_m query rows a tile: what a compile without
    a GPU needs (benchmarks/compile_kernels_sm90.py, the compile test)."""
    from triton.runtime.jit import mangle_type

    q = torch.empty(1, 256, 2, 192, dtype=torch.bfloat16)
    kv = torch.empty(1, 256, 2, 256, dtype=torch.bfloat16)
    k_pe = torch.empty(1, 256, 1, 64, dtype=torch.bfloat16)

    def of(t, rows):
        return mangle_type(_rows_desc(t, rows)[0])

    return {"qn_desc": of(q[..., :128], block_m), "qp_desc": of(q[..., 128:], block_m),
            "do_desc": of(kv[..., 128:], block_m), "kn_desc": of(kv[..., :128], block_n),
            "kp_desc": of(k_pe, block_n), "v_desc": of(kv[..., 128:], block_n),
            "o_ptr": "*bf16", "dqn_ptr": "*bf16", "dqp_ptr": "*bf16", "lse_ptr": "*fp32", "delta_ptr": "*fp32",
            "dstart_ptr": "*i32", "dend_ptr": "*i32", "cs_ptr": "*fp32", "dkn_ptr": "*bf16", "dkp_ptr": "*fp32",
            "dv_ptr": "*bf16", "qk_scale": "fp32", "sm_scale": "fp32"}  # fmt: skip


def compile_builds() -> list[tuple[str, object, dict[str, str], dict]]:
    """Every build of the Gluon MLA kernels the launchers make, as (label, kernel, argument types, constexprs):
    forward, dq (also with UNROTATE) and dk/dv (mla_attention_bwd_sm90.py), each with and without documents. The
    compile test checks them; benchmarks/compile_kernels_sm90.py reports them."""
    from titan_dsv3.kernels import mla_attention_bwd_sm90 as B

    builds = []
    unrotate = ({"UNROTATE": False}, {"UNROTATE": True})
    both = (False, True)
    for (
        kernel,
        block_n,
        block_m,
        stages,
        docs,
        extra,
    ) in (  # configs: (key rows, slots); dk/dv (query rows, slots)
        (_mla_fwd_kernel_sm90, FWD_CONFIG[0], HALF_M, FWD_CONFIG[1], both, ({},)),
        (_mla_bwd_dq_kernel_sm90, DQ_CONFIG[0], HALF_M, DQ_CONFIG[1], both, unrotate),
        (B._mla_bwd_dkdv_kernel_sm90, B.HALF_K, B.DKDV_CONFIG[0], B.DKDV_CONFIG[1], both, ({},)),
    ):
        types = argument_types(block_n, block_m)
        for doc in docs:
            for more in extra:
                consts = {"STAGES": stages, "HAS_DOC": doc, "num_warps": 4, **more}
                label = f"{kernel.fn.__name__} HAS_DOC={doc}" + "".join(f" {k}={v}" for k, v in more.items())
                builds.append((label, kernel, types, consts))
    return builds
