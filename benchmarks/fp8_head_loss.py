"""Training loss with the output head in FP8 against high precision, on the debug model (CPU is enough).

    python benchmarks/fp8_head_loss.py [--config train_configs/debug_model.toml] [--steps 200] [--seeds 1 2]

Each variant trains from the same seed on the same data, in-process; printed: the mean loss of the last 10 steps
and its difference to the first variant's. Variants: high precision (the config's mixed precision); the head on
kernels/fp8_linear.py with its gradient in e5m2 (float8.output_head as shipped) and in e4m3; the head and every
eligible dense linear on it (float8.linear_backend titan, min_dim lowered to the debug model's 64). On CPU the
quantisation and GEMMs are torch's, the kernel's bits (tests/kernels/test_fp8_linear.py).
"""

from __future__ import annotations

import argparse

import torch

from titan_dsv3.config import parse_args
from titan_dsv3.float8 import FP8OutputHead
from titan_dsv3.train import Trainer

VARIANTS = {
    "high precision": ([], None),
    "head fp8, grad e5m2": (["--float8.output_head", "true"], torch.float8_e5m2),
    "head fp8, grad e4m3": (["--float8.output_head", "true"], torch.float8_e4m3fn),
    "head + dense linears fp8": (
        ["--float8.output_head", "true", "--float8.enable", "true", "--float8.linear_backend", "titan",
         "--float8.min_dim", "64"],
        torch.float8_e5m2,
    ),
}  # fmt: skip


def final_loss(argv: list[str], steps: int, head_grad) -> float:
    if head_grad is not None:
        FP8OutputHead.grad_dtype = head_grad
    t = Trainer(parse_args(argv))
    losses = [t.train_step()["loss"] for _ in range(steps)]
    t.close()
    return sum(losses[-10:]) / 10


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="train_configs/debug_model.toml")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dump", default="/tmp/fp8_head_loss")
    a = p.parse_args()
    shipped = FP8OutputHead.grad_dtype
    for seed in a.seeds:
        base = None
        for name, (extra, head_grad) in VARIANTS.items():
            argv = ["--job.config_file", a.config, "--training.steps", str(a.steps), "--job.seed", str(seed),
                    "--job.dump_folder", f"{a.dump}/{seed}", "--checkpoint.enable", "false",
                    "--metrics.log_freq", str(a.steps), *extra]  # fmt: skip
            loss = final_loss(argv, a.steps, head_grad)
            base = loss if base is None else base
            print(f"seed {seed}  {name:26s} loss {loss:.4f}  ({(loss - base) / base:+.2%})", flush=True)
    FP8OutputHead.grad_dtype = shipped


if __name__ == "__main__":
    main()
