"""Compiling Gluon kernels for sm_90 without a GPU, for this directory's compile tests. It runs in a subprocess:
this directory's conftest sets TRITON_INTERPRET=1, under which the JIT builds interpreter functions instead."""

import json
import os
import subprocess
import sys

PRELUDE = r'''
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental.gluon._runtime import GluonASTSource


def compile_sm90(fn, types, consts, warps, attrs=None):
    """(ttgir, ptx, ptxas's C751x notes: wgmmas it serialised) of Gluon kernel fn compiled for sm_90; arguments
    not in types are i32, those in consts constexpr."""
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                         attrs=attrs or {})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(k.asm["ptx"])
        f.flush()
        info = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", "-o", os.devnull, f.name],
                              capture_output=True, text=True)
    return k.asm["ttgir"], k.asm["ptx"], re.findall(r"C751\d[^\n]*", info.stdout + info.stderr)


def design(ttgir, ptx, serialised):
    """What the warp-specialised wgmma kernels are checked for: the wgmmas ptxas serialised, the wgmma groups a
    wait leaves in flight, TMA loads, wgmma, a warp-specialised region and consumers given more registers."""
    return {
        "ptxas_serialised": serialised,
        "pendings": sorted(set(int(p) for p in re.findall(r"pendings = (\d+)", ttgir))),
        "tma": "async_tma_copy_global_to_local" in ttgir,
        "wgmma": "wgmma.mma_async" in ptx,
        "warp_specialized": "ttg.warp_specialize" in ttgir,
        "setmaxnreg_inc": "setmaxnreg.inc" in ptx,
    }
'''


# A directory holding another Triton (`pip install --target DIR triton==3.6.0`) to compile with as well: the GPU
# machines run Triton 3.6 while CI installs the newest, and a kernel that only the older one rejects would pass
# here unseen (.ci/run sets it; without it the tests compile with the installed Triton alone).
SIDE_TRITON = os.environ.get("TITAN_SM90_SIDE_TRITON")
TRITONS = ["installed"] + (["side"] if SIDE_TRITON else [])  # what the compile tests parametrise over


def run(body: str, side: bool = False) -> dict:
    """PRELUDE + body (which prints RESULT and a JSON object) in a Python without TRITON_INTERPRET: the object.
    side: with the Triton in SIDE_TRITON ahead of the installed one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if side:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (SIDE_TRITON, env.get("PYTHONPATH")) if p)
        body = f"assert triton.__file__.startswith({SIDE_TRITON!r}), triton.__file__\n" + body
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + body], capture_output=True, text=True, env=env, timeout=600
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT") :])
