"""One bench6 MoE layer's routed experts, forward + backward, as the trainer runs them (route_locally after the
router): the copies gathered in expert order, the experts, the outputs back in token order, weighted and summed.

    python benchmarks/bench_routed_experts.py [--tokens 16384] [--experts 64] [--topk 6] [--dim 2048]
        [--hidden 1408] [--windows 40] [--profile]

Rows (interleaved windows, the median of each; kernel_timing.interleaved says why):
  bf16           GroupedExperts.routed: torch._grouped_mm, the gather, index_copy and bmm compiled
  fp8 unfused    the same route (compiled) around the FP8 FFN (kernels/fp8_grouped_gemm.py), the route before
                 kernels/fp8_routed_experts.py
  fp8 fused      FP8RoutedExperts.routed (float8.fuse_moe_route): the route folded into the FP8 op
                 (kernels/fp8_routed_experts.py)
--profile prints each row's kernels (ms a call).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from titan_dsv3.float8 import FP8RoutedExperts
from titan_dsv3.models.moe import GroupedExperts

sys.path.insert(0, str(Path(__file__).parent))
from kernel_timing import interleaved, profile_split, rel  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1408)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    experts = GroupedExperts(a.experts, a.dim, a.hidden).to(dev, torch.bfloat16)
    experts.init_weights(0.02)
    x = torch.randn(a.tokens, a.dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    weights, ids = torch.softmax(torch.randn(a.tokens, a.experts, device=dev), -1).topk(a.topk, dim=1)
    weights.requires_grad_()
    order = ids.flatten().argsort(stable=True)
    counts = torch.bincount(ids.flatten(), minlength=a.experts)
    dout = torch.randn(a.tokens, a.dim, device=dev, dtype=torch.bfloat16)
    inputs = [x, weights, *experts.parameters()]

    def step(route):
        def run():
            out = route(x, weights, order, counts)
            return [out.detach(), *torch.autograd.grad(out, inputs, dout)]

        return run

    bf16_route = torch.compile(experts.routed)
    fp8 = FP8RoutedExperts.__new__(FP8RoutedExperts)
    fp8.__dict__ = experts.__dict__  # the same parameters, FP8RoutedExperts' methods (its parent's FFN)
    unfused = torch.compile(lambda *args: GroupedExperts.routed(fp8, *args))
    rows = {"bf16": step(bf16_route), "fp8 unfused": step(unfused), "fp8 fused": step(fp8.routed)}
    outs = {k: fn() for k, fn in rows.items()}
    names = ("out", "dx", "d weights", "dw1", "dw2", "dw3")
    for k in ("fp8 unfused", "fp8 fused"):
        errs = ", ".join(f"{n} {rel(g, w):.1e}" for n, g, w in zip(names, outs[k], outs["bf16"]))
        print(f"{k} against bf16: {errs}")
    errs = ", ".join(f"{n} {rel(g, w):.1e}" for n, g, w in zip(names, outs["fp8 fused"], outs["fp8 unfused"]))
    print(f"fp8 fused against fp8 unfused: {errs}")
    times = interleaved(rows, a.windows)
    base = statistics.median(times["bf16"])
    print(f"{a.tokens} tokens x top-{a.topk} of {a.experts} experts, {a.dim} -> {a.hidden}, fwd + bwd:")
    for k, ts in times.items():
        ms = statistics.median(ts)
        print(f"  {k:12s} {ms:8.3f} ms  bf16 / this {base / ms:5.3f}x")
    if a.profile:
        for k, fn in rows.items():
            print(f"{k}: kernels, ms a call")
            profile_split(fn)


if __name__ == "__main__":
    main()
