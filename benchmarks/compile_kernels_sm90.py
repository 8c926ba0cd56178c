"""Compile every autotune config of the MLA and FP8 kernels for sm_90 (H100) without a GPU, and print what the
compiler made of each: registers a thread, spill (stack) bytes, shared memory, async copies (software
pipelining), whether the dots became wgmma, and whether ptxas serialised them (its C751x notes: each wgmma waited
for before the next is issued).

    python benchmarks/compile_kernels_sm90.py            # with the installed triton (its bundled ptxas)
    PYTHONPATH=/path/to/triton-3.6 python benchmarks/compile_kernels_sm90.py   # the GPU machines' version

Pointer and stride arguments are declared 16-byte divisible, as the JIT specialises them at launch (without that
hint no load is pipelined); seqlen, heads and the expert count are left unspecialised, as the kernels declare.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from titan_dsv3.kernels import fp8_grouped_gemm as F  # noqa: E402
from titan_dsv3.kernels import fp8_head_loss as H  # noqa: E402
from titan_dsv3.kernels import fp8_linear as L  # noqa: E402
from titan_dsv3.kernels import fp8_quant as Q  # noqa: E402
from titan_dsv3.kernels import mla_attention as M  # noqa: E402
from titan_dsv3.kernels import mla_attention_bwd as MB  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
PTXAS = get_ptxas(90).path  # the one triton compiles sm_90 with (3.9 uses its newer ptxas-blackwell)
NOT_DIVISIBLE = {"seqlen", "n_heads", "n_experts"}


def compile_report(
    kernel, types: dict[str, str], consts: dict, num_warps: int, num_stages: int, maxnreg: int | None = None
) -> str:
    fn = kernel.fn if hasattr(kernel, "configs") else kernel
    sig = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, (name, ty) in enumerate(sig.items())
        if ty not in ("constexpr", "fp32") and not ty.startswith("tensordesc") and name not in NOT_DIVISIBLE
    }
    source = ASTSource
    if fn.is_gluon():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    src = source(
        fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs
    )
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg:  # a register cap (more blocks a SM), as a triton.Config may set
        options["maxnreg"] = maxnreg
    k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options=options)
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(k.asm["ptx"])
        f.flush()
        info = subprocess.run(
            [PTXAS, "-arch=sm_90a", "-v", "-o", os.devnull, f.name], capture_output=True, text=True
        )
    if info.returncode:
        raise RuntimeError(f"{PTXAS} failed: {info.stderr.strip()[:200]}")
    # C7510-C7519, "Potential Performance Loss": ptxas waits for every wgmma before the next one (the tensor
    # cores idle between them); C7511 cost the two-loop MLA dk/dv kernel about 15%, C7514 the Gluon FP8 GEMMs
    serial = re.findall(r"\(C751\d\) Potential Performance Loss", info.stdout + info.stderr)
    regs = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    ttgir = k.asm["ttgir"]
    return (
        f"regs {regs:>3}  spill {stack:>5} B  smem {k.metadata.shared // 1024:>3} KiB  "
        f"async copies {ttgir.count('async_copy_global_to_local'):>2}  wgmma {'warp_group_dot' in ttgir}"
        f"{'  TMA' if 'async_tma_copy' in ttgir else ''}"
        f"{'  SERIALISED' if serial else ''}"
    )


def sweep(kernel, types: dict[str, str], consts: dict, configs: list | None = None) -> None:
    """Every autotune config of kernel, or `configs` (a plain @triton.jit kernel: 8 warps unless given)."""
    name = kernel.fn.__name__ if hasattr(kernel, "configs") else kernel.__name__
    if configs is None:
        configs = (
            kernel.configs if hasattr(kernel, "configs") else [triton.Config({}, num_warps=8, num_stages=1)]
        )
    for cfg in configs:
        cap = getattr(cfg, "maxnreg", None)
        line = compile_report(kernel, types, {**consts, **cfg.kwargs}, cfg.num_warps, cfg.num_stages, cap)
        label = " ".join(
            f"{k}={v}" for k, v in {**consts, **cfg.kwargs}.items() if k not in ("DN", "DR", "DV")
        )
        capped = f" r{cap}" if cap else ""
        print(f"{name:26s} {label:42s} w{cfg.num_warps} s{cfg.num_stages}{capped}  {line}", flush=True)


def main() -> None:
    print(f"triton {triton.__version__}, target sm_90")
    bf16 = "*bf16"
    mla_types = {n: bf16 for n in ("qn_ptr", "qp_ptr", "kn_ptr", "kp_ptr", "v_ptr", "o_ptr", "do_ptr")}
    mla_types.update({n: bf16 for n in ("dqn_ptr", "dqp_ptr", "dkn_ptr", "dv_ptr")})
    mla_types.update(lse_ptr="*fp32", delta_ptr="*fp32", dkp_ptr="*fp32", dstart_ptr="*i32", dend_ptr="*i32")
    mla_types.update(qk_scale="fp32", sm_scale="fp32")
    for kernel in (M._mla_fwd_kernel, MB._mla_bwd_dkdv_kernel, MB._mla_bwd_dq_kernel):
        for doc in (False, True):
            sweep(kernel, mla_types, dict(DN=128, DR=64, DV=128, HAS_DOC=doc))
    f8, f32, i32 = "*fp8e4nv", "*fp32", "*i32"
    fp8_types = dict(x_ptr=bf16, w_ptr=bf16, h13_ptr=bf16, out_ptr=bf16, out2_ptr=bf16)
    fp8_types.update(
        {n: f8 for n in ("a_ptr", "b_ptr", "q_ptr", "qt_ptr", "hq_ptr", "gq_ptr", "gqt_ptr", "hqt_ptr")}
    )
    fp8_types.update({n: f32 for n in ("sa_ptr", "sb_ptr", "sw_ptr", "s_ptr", "st_ptr", "hs_ptr", "gs_ptr")})
    fp8_types.update({n: f32 for n in ("gst_ptr", "hst_ptr")})
    fp8_types.update({n: i32 for n in ("row_src_ptr", "tile_expert_ptr", "pstart_ptr", "pend_ptr")})
    fp8_types["w_ptr"] = bf16
    sweep(Q._quant_act_kernel, {**fp8_types, "row_w_ptr": f32}, dict(EXACT=False, WEIGHTED=False))
    sweep(Q._quant_weight_kernel, fp8_types, dict(EXACT=False))
    sweep(Q._quant_weight_t_kernel, fp8_types, dict(EXACT=False))
    sweep(F._gemm_swiglu_fwd_kernel, {**fp8_types, "w_ptr": f8}, dict(EXACT=False))
    sweep(F._gemm_scatter_kernel, fp8_types, {})
    warps = [triton.Config({}, num_warps=w, num_stages=1) for w in (8, 16)]
    # dh arrives in dy's dtype (bf16)
    sweep(Q._swiglu_bwd_quant_kernel, {**fp8_types, "dh_ptr": bf16}, dict(EXACT=False), warps)
    sweep(F._wgrad_kernel, fp8_types, {})
    layout_types = {"counts_ptr": "*i64", "out_ptr": i32, "n_exp": "i32", "n_pad": "i32"}
    for eb, block in ((64, 64), (256, 16)):  # _Layout's block for 64 and 256 experts
        sweep(F._layout_kernel, layout_types, dict(EB=eb, BLOCK=block), [triton.Config({}, num_warps=4)])
    sweep_linear()
    sweep_gluon(fp8_types)


def sweep_linear() -> None:
    """fp8_linear's quantiser at its launch config: each source dtype and format, one layout and both."""
    import torch

    cfg = [triton.Config(dict(L._BLOCK), **L._LAUNCH, num_stages=1)]
    for src in ("*bf16", "*fp32"):
        for q, fmt in (("*fp8e4nv", torch.float8_e4m3fn), ("*fp8e5", torch.float8_e5m2)):
            max_, min_normal, drop = L._FORMATS[fmt]
            types = dict(x_ptr=src, inv_ptr="*fp32", q_ptr=q, qt_ptr=q)
            for both in (False, True):
                consts = dict(MAX=max_, MIN_NORMAL=min_normal, DROP=drop, BOTH=both, EXACT=False)
                print(f"  {src} -> {q}")
                sweep(L._quant_kernel, types, consts, cfg)
    max_, min_normal, drop = L._FORMATS[H.GRAD_DTYPE]
    types = dict(z_ptr="*bf16", lse_ptr="*fp32", labels_ptr="*i64", q_ptr="*fp8e5", qt_ptr="*fp8e5")
    consts = dict(IGNORE=H.IGNORE_INDEX, MAX=max_, MIN_NORMAL=min_normal, DROP=drop, BOTH=True, EXACT=False)
    print("  fp8_head_loss's gradient pass: bf16 logits -> e5m2, both layouts")
    sweep(H._grad_kernel, types, consts, [triton.Config(dict(L._BLOCK), **H._GRAD_LAUNCH, num_stages=1)])


def sweep_gluon(fp8_types: dict[str, str]) -> None:
    """The Gluon GEMMs (fp8_grouped_gemm_sm90.py) in the tile configs the GPU tests use, the Gluon MLA forward and
    dq kernels (mla_attention_sm90.py) and the Gluon quantisation passes (fp8_quant_sm90.py)."""
    from titan_dsv3.kernels import fp8_grouped_gemm_sm90 as G
    from titan_dsv3.kernels import fp8_quant_sm90 as S

    for kernel in (G._gemm_scatter_kernel_sm90_ws, G._wgrad_kernel_sm90_ws):
        for bm, warps, stages in ((128, 8, 4), (128, 8, 6), (64, 4, 4)):
            types = {**fp8_types, **G.descriptor_types(bm)}
            line = compile_report(kernel, types, dict(STAGES=stages, num_warps=warps), warps, 1)
            print(f"{kernel.fn.__name__:30s} {f'BM={bm}':38s} w{warps} s{stages}  {line}", flush=True)
    from titan_dsv3.kernels import mla_attention_sm90_builds as A

    for label, kernel, types, consts in A.compile_builds():
        line = compile_report(kernel, types, consts, 4, 1)
        print(f"{label:69s} w4 s{consts['STAGES']}  {line}", flush=True)
    types = {**fp8_types, "dh_ptr": "*bf16", "row_w_ptr": "*fp32"}
    for kernel, warp_counts, consts in (
        (S._swiglu_bwd_quant_kernel_sm90, (8, 16), {}),
        (S._quant_act_kernel_sm90, (4, 8, 16), dict(WEIGHTED=False)),
        (S._quant_act_kernel_sm90, (8,), dict(WEIGHTED=True)),
        (S._quant_weight_kernel_sm90, (4, 8), {}),
    ):
        for warps in warp_counts:
            line = compile_report(kernel, types, dict(num_warps=warps, **consts), warps, 1)
            label = " ".join(f"{k}={v}" for k, v in consts.items())
            print(f"{kernel.fn.__name__:30s} {label:38s} w{warps}     {line}", flush=True)


if __name__ == "__main__":
    main()
