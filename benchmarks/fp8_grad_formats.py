"""Which fp8 format holds the output head's gradient better, with one scale for the tensor: e5m2 or e4m3 (CPU).

    python benchmarks/fp8_grad_formats.py [--tokens 1024] [--dim 256] [--vocab 16384]

The gradient of a summed cross-entropy over the logits, (softmax - onehot) / tokens, for logits drawn with a
growing spread (a flatter, then a more peaked softmax, as training goes on), quantised as kernels/fp8_linear.py
does (torch's cast, scale amax / the format's largest value) and pushed through the head's two backward GEMMs in
float64. Printed a row each: the relative Frobenius error of dx and dW against the unquantised gradient, the share
of nonzero entries flushed to zero and their share of the gradient's absolute mass. bf16 for scale.
"""

from __future__ import annotations

import argparse

import torch

from titan_dsv3.kernels.fp8_linear import quantise_reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--vocab", type=int, default=16384)
    a = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(a.tokens, a.dim, dtype=torch.float64)
    w = torch.randn(a.vocab, a.dim, dtype=torch.float64) * 0.05

    def rel(got, want):
        return ((got - want).norm() / want.norm()).item()

    for spread in (1.0, 4.0, 12.0):
        logits = torch.randn(a.tokens, a.vocab, dtype=torch.float64) * spread
        probs = torch.softmax(logits, -1)
        g = probs.clone()
        g[torch.arange(a.tokens), torch.randint(0, a.vocab, (a.tokens,))] -= 1
        g /= a.tokens
        g16 = g.to(torch.bfloat16)  # as the compiled loss hands it to the head
        print(f"logit spread {spread:4}: median largest probability {probs.max(-1).values.median():.3f}")
        for name, fmt in (("bf16", None), ("e5m2", torch.float8_e5m2), ("e4m3", torch.float8_e4m3fn)):
            if fmt is None:
                gq = g16.double()
            else:
                q, scale = quantise_reference(g16, fmt)
                gq = q.double() * scale.double()
            flushed = (gq == 0) & (g != 0)
            mass = (g.abs() * flushed).sum() / g.abs().sum()
            share = flushed.double().mean().item()
            print(f"  {name}: dx {rel(gq @ w, g @ w):.2e}  dW {rel(gq.T @ x, g.T @ x):.2e}  "
                  f"flushed {share:6.1%} of entries, {mass.item():.1e} of the mass")  # fmt: skip


if __name__ == "__main__":
    main()
