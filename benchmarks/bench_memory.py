"""Measured peak memory of a few real training steps beside tools/memory.py's estimate.

    python benchmarks/bench_memory.py --job.config_file train_configs/bench6.toml [--steps 4] [overrides]
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python -m torch.distributed.run --nproc_per_node 4 \
        benchmarks/bench_memory.py --job.config_file train_configs/deepseek_16b.toml

Runs the Trainer's train_step (forward, backward, optimizer) `--steps` times on the current device(s) and prints
torch.cuda.max_memory_allocated over the steps after the first (the first has no optimizer states yet), the
largest over ranks, next to the estimate's allocated peak and their ratio; also reserved memory and the device
total (used memory from cudaMemGetInfo) beside the estimate's device total. Gradient accumulation is capped at 2
micro-batches a step (global batch lowered, so a step stays short; 2 keeps the accumulation regime, where every
gradient stays allocated) unless --keep-batch. The estimate uses the same, final configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from titan_dsv3.config import parse_args  # noqa: E402
from titan_dsv3.parallel.dims import ParallelDims  # noqa: E402
from titan_dsv3.tools.memory import GiB, estimate_from_config, format_estimate  # noqa: E402
from titan_dsv3.train import Trainer  # noqa: E402

_QUIET = [
    "--metrics.enable_tensorboard=false",
    "--metrics.enable_jsonl=false",
    "--metrics.log_freq=1000000",
    "--checkpoint.enable=false",
    "--data.embedded_max_bytes=3000000",
]


def _config(argv: list[str], world_size: int, keep_batch: bool):
    cfg = parse_args(argv + _QUIET, world_size=world_size)
    if not cfg.job.dump_folder or cfg.job.dump_folder.startswith("./outputs"):
        cfg.job.dump_folder = "/tmp/titan_dsv3_bench_memory"
    t = cfg.training
    dp = ParallelDims.from_config(cfg.parallelism, world_size).dp
    if not keep_batch and t.global_batch_size > 2 * t.local_batch_size * dp:
        argv = argv + [f"--training.global_batch_size={2 * t.local_batch_size * dp}"]
        cfg = parse_args(argv + _QUIET, world_size=world_size)
        cfg.job.dump_folder = "/tmp/titan_dsv3_bench_memory"
    return cfg


def _max_over_ranks(x: float) -> float:
    if dist.is_initialized():
        t = torch.tensor([x], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())
    return x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="training steps (the peak is taken over steps 2..N)")
    ap.add_argument("--keep-batch", action="store_true", help="keep the config's gradient accumulation")
    ours, rest = ap.parse_known_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cfg = _config(rest, world, ours.keep_batch)
    est = estimate_from_config(cfg, world)
    if not torch.cuda.is_available():
        print("no CUDA device: estimate only")
        print(format_estimate(est))
        return 0
    trainer = Trainer(cfg)
    losses = [trainer.train_step()["loss"]]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(max(ours.steps - 1, 1)):
        losses.append(trainer.train_step()["loss"])
    torch.cuda.synchronize()
    allocated = _max_over_ranks(torch.cuda.max_memory_allocated())
    reserved = _max_over_ranks(torch.cuda.max_memory_reserved())
    free, total = torch.cuda.mem_get_info()
    used = _max_over_ranks(total - free)
    if rank == 0:
        t = cfg.training
        print(
            f"config {cfg.job.config_file}  world {world}  {torch.cuda.get_device_name()}  "
            f"micro-batch {t.local_batch_size} x {t.seq_len}  global batch {trainer.loader.global_batch}  "
            f"AC {cfg.activation_checkpoint.mode}/{cfg.activation_checkpoint.selective_option}  "
            f"compile {cfg.compile.enable}  moments {cfg.optimizer.state_dtype}"
        )
        print(f"losses {', '.join(f'{x:.3f}' for x in losses)}")
        print(format_estimate(est))
        print(f"{'':<24}{'estimate':>10}{'measured':>10}{'est/meas':>10}")
        print(
            f"{'allocated peak (GiB)':<24}{est.allocated / GiB:>10.2f}{allocated / GiB:>10.2f}"
            f"{est.allocated / allocated:>10.3f}"
        )
        print(f"{'reserved peak (GiB)':<24}{'':>10}{reserved / GiB:>10.2f}")
        print(
            f"{'device used (GiB)':<24}{est.total / GiB:>10.2f}{used / GiB:>10.2f}{est.total / used:>10.3f}"
        )
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
