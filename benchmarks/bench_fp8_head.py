"""The output head with its loss on one GPU, forward + backward: bf16 against FP8 (ours, torchao's tensorwise).

    python benchmarks/bench_fp8_head.py [--tokens 16384] [--dim 2048] [--vocab 102400] [--profile] [--json out.json]

bench6's head by default: 16,384 tokens x 2,048 -> 102,400, the weight in bf16 (training.mixed_precision =
bf16_weights). Each row times x -> logits -> summed cross-entropy (compiled, in fp32 as the trainer computes it)
-> backward to x and W, so the FP8 rows pay for quantising the logits' gradient as a training step does:
  bf16      F.linear
  torchao   torchao's Float8Linear, tensorwise (what float8.enable with 'output' taken out of filter_fqns runs)
  ours      kernels/fp8_linear.py with the gradient in e5m2, as float8.output_head runs it
  ours fused  kernels/fp8_head_loss.py: the head and its loss as one op (no bf16 gradient, no amax pass)
Also the head's three GEMMs alone (bf16 and ours, no loss), and errors against float32 math (TF32 off): logits,
dx, dW; and the memory each head with its loss allocates at its peak. FLOPs count the three GEMMs
(6 x tokens x dim x vocab).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from titan_dsv3.float8 import FP8OutputHead
from titan_dsv3.kernels.fp8_head_loss import fp8_head_cross_entropy
from titan_dsv3.kernels.fp8_linear import fp8_linear
from titan_dsv3.optim.losses import cross_entropy_sum

sys.path.insert(0, str(Path(__file__).parent))
from kernel_timing import ROWS, profile_split, rel, report  # noqa: E402

HEAD_GRAD = FP8OutputHead.grad_dtype  # the gradient's format float8.output_head runs with


def torchao_head(weight: torch.Tensor):
    """(fn, its weight parameter): torchao's tensorwise float8 linear on a copy of `weight`."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    lin = torch.nn.Sequential(
        torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    )
    lin[0].weight = torch.nn.Parameter(weight.detach().clone())
    convert_to_float8_training(lin, config=Float8LinearConfig.from_recipe_name("tensorwise"))
    return lambda x: lin(x), lin[0].weight  # noqa: E731


def peak_gib(step) -> float:
    """What one call allocates at its peak beyond what was allocated before it (GiB)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=102400)
    p.add_argument("--profile", action="store_true", help="per-kernel time split of ours (with the loss)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    t, d, v = args.tokens, args.dim, args.vocab
    torch.manual_seed(0)
    x = torch.randn(t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, d, device=dev) * 0.006).bfloat16().requires_grad_()  # init_std of bench6
    labels = torch.randint(0, v, (1, t), device=dev)
    dlogits = torch.randn(t, v, device=dev, dtype=torch.bfloat16) / t
    flops = 6.0 * t * d * v
    loss_fn = torch.compile(cross_entropy_sum)

    # name -> (x -> logits, the weight it uses)
    heads = {"bf16": (lambda x: F.linear(x, w), w), "ours": (lambda x: fp8_linear(x, w, HEAD_GRAD), w)}
    try:
        heads["torchao tensorwise"] = torchao_head(w)
    except Exception as e:  # noqa: BLE001
        print(f"torchao head not built: {type(e).__name__}: {e}")

    def with_loss(head):
        fn, weight = head

        def step():
            loss = loss_fn(fn(x).unsqueeze(0), labels) / t
            torch.autograd.grad(loss, (x, weight))

        return step

    def gemms(head):
        fn, weight = head

        def step():
            torch.autograd.grad(fn(x), (x, weight), dlogits)

        return step

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference (then restored)
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref_y = xf @ wf.T
    ref = [ref_y.detach(), *torch.autograd.grad(ref_y, (xf, wf), dlogits.float())]
    del ref_y, xf, wf

    torch.backends.cuda.matmul.allow_tf32 = tf32

    def errors(head) -> str:
        fn, weight = head
        try:
            y = fn(x)
            got = [y.detach(), *torch.autograd.grad(y, (x, weight), dlogits)]
        except Exception as e:  # noqa: BLE001  (report() then prints the failure of the timed call)
            return f"errors FAILED {type(e).__name__}: {str(e)[:200]}"
        return " ".join(f"{k} {rel(a, b):.1e}" for k, a, b in zip(("logits", "dx", "dW"), got, ref))

    def fused():
        loss = fp8_head_cross_entropy(x, w, labels[0]) / t
        return loss, *torch.autograd.grad(loss, (x, w))

    def against_ours() -> str:
        """The fused op against ours with the compiled loss: loss, dx, dW (the gradients' scales differ)."""
        loss = loss_fn(fp8_linear(x, w, HEAD_GRAD).unsqueeze(0), labels) / t
        want = [loss, *torch.autograd.grad(loss, (x, w))]
        return "vs ours + loss: " + " ".join(
            f"{k} {rel(a, b):.1e}" for k, a, b in zip(("loss", "dx", "dW"), fused(), want)
        )

    tag = f"head {t} x {d} -> {v}"
    base = {}
    for name, head in heads.items():
        err = errors(head)
        base[name] = report(f"{tag} {name} + loss", with_loss(head), flops, err)
    base["ours fused"] = report(f"{tag} ours fused with its loss", fused, flops, against_ours())
    heads_and_fused = {**{name: with_loss(head) for name, head in heads.items()}, "ours fused": fused}
    for name in ("bf16", "ours"):
        report(f"{tag} {name}, GEMMs alone", gemms(heads[name]), flops)
    for name in base:
        if name != "bf16":
            print(f"  {name} vs bf16 (with the loss): {base['bf16'] / base[name]:.3f}x", flush=True)
    for name, step in heads_and_fused.items():
        print(f"  {name} + loss: peak {peak_gib(step):.2f} GiB above its inputs", flush=True)
    if args.profile:
        profile_split(with_loss(heads["ours"]))
        profile_split(fused)
    if args.json:
        Path(args.json).write_text(json.dumps(ROWS, indent=1))


if __name__ == "__main__":
    main()
