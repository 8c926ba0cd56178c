"""Dry run: build a run's model and parallel layout for N ranks in one CPU process, with fake process groups, and
print the parameter shard each rank holds and the estimated memory per GPU. No GPU and no communication.

    python -m titan_dsv3.tools.dry_run --job.config_file train_configs/deepseek_671b.toml --world-size 256
    python -m titan_dsv3.tools.dry_run --job.config_file train_configs/deepseek_16b.toml --world-size 4 --ranks 0,3

For each rank asked for (default: 0) it initialises torch's fake process group (every collective is a no-op) as
that rank, builds the meshes of parallel/dims.py, the model on the meta device, this rank's pipeline stage(s), and
applies parallel/parallelize.py (TP, EP, CP, AC, compile wrappers, FSDP2) as the trainer does. It then sums the
local shards (DTensor.to_local) of every parameter: the exact number of elements this rank stores, split into
routed experts and the rest, beside the even split that tools/memory.py assumes. Exit status 2: invalid config.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from titan_dsv3.config import ConfigError, JobConfig, parse_args, resolve_model_args
from titan_dsv3.models import DeepSeekV3Model
from titan_dsv3.models.args import ModelArgs
from titan_dsv3.parallel.dims import ParallelDims
from titan_dsv3.parallel.parallelize import parallelize_model
from titan_dsv3.parallel.pipeline import split_model
from titan_dsv3.tools._cli import pop_option
from titan_dsv3.tools.memory import GiB, estimate_from_config, format_estimate


def _fake_process_group(rank: int, world_size: int) -> None:
    # importing fake_pg registers the "fake" backend (present in torch 2.11 and 2.13, where this was run)
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())


def local_parameter_counts(cfg: JobConfig, args: ModelArgs, dims: ParallelDims, rank: int) -> dict[str, int]:
    """Elements of this rank's parameter shards after parallelize_model: routed experts, other, total."""
    _fake_process_group(rank, dims.world_size)
    try:
        meshes = dims.build_meshes("cpu") if dims.world_size > 1 else None
        with torch.device("meta"):
            model = DeepSeekV3Model(args)
        parts = [model]
        if dims.pp > 1:
            _, parts = split_model(model, dims, dims.coords(rank)["pp"])
        fsdp_bf16 = dims.uses_fsdp and cfg.training.mixed_precision in ("auto", "bf16")
        param_dtype = torch.bfloat16 if fsdp_bf16 else torch.float32
        parts = [parallelize_model(p, dims, meshes, cfg, param_dtype) for p in parts]
        counts = {"experts": 0, "other": 0}
        seen: set[int] = set()
        for part in parts:
            for name, p in part.named_parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                n = p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                counts["experts" if ".experts." in name else "other"] += n
        counts["total"] = counts["experts"] + counts["other"]
        return counts
    finally:
        dist.destroy_process_group()


def expected_counts(args: ModelArgs, dims: ParallelDims) -> dict[str, float]:
    """The even split of the layout arithmetic (memory.py): routed experts over dp_shard x cp x tp ranks, the rest
    over FSDP x TP ranks, whole model divided by pp (averaged over stages)."""
    moe_blocks = args.n_moe_layers + (
        args.mtp_depth if args.n_moe_layers > 0 else 0
    )  # MTP blocks are MoE then
    experts = 3 * args.dim * args.moe_inter_dim * args.n_routed_experts * moe_blocks
    other = args.num_params() - experts
    fsdp = dims.fsdp if dims.uses_fsdp else 1
    e = experts / (dims.dp_shard * dims.cp * dims.tp if dims.uses_fsdp else dims.ep) / dims.pp
    o = other / (fsdp * dims.tp) / dims.pp
    return {"experts": e, "other": o, "total": e + o}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    world, argv = pop_option(argv, "--world-size")
    ranks_arg, argv = pop_option(argv, "--ranks")
    world_size = int(world or 1)
    try:
        cfg = parse_args(argv, world_size=world_size)
        args = resolve_model_args(cfg)
        dims = ParallelDims.from_config(cfg.parallelism, world_size)
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    ranks = [int(r) for r in (ranks_arg or "0").split(",")]
    if any(not 0 <= r < world_size for r in ranks):
        print(f"--ranks {ranks_arg}: ranks lie in [0, {world_size})", file=sys.stderr)
        return 2
    layout = ", ".join(
        f"{k} {getattr(dims, k)}" for k in ("dp_replicate", "dp_shard", "cp", "tp", "pp", "ep")
    )
    print(
        f"{cfg.job.config_file or '(no file)'}: {args.num_params() / 1e9:.2f}B parameters, world {world_size} "
        f"({layout}; efsdp {dims.efsdp}, FSDP {'on' if dims.uses_fsdp else 'off'})"
    )
    exp = expected_counts(args, dims)
    print(
        f"{'rank':>6}{'stage':>6}{'experts':>16}{'other':>16}{'total':>16}{'even split':>16}{'fp32 GiB':>10}"
        f"{'build s':>9}"
    )
    for rank in ranks:
        t0 = time.perf_counter()
        got = local_parameter_counts(cfg, args, dims, rank)
        stage = dims.coords(rank)["pp"]
        print(
            f"{rank:>6}{stage:>6}{got['experts']:>16,}{got['other']:>16,}{got['total']:>16,}"
            f"{exp['total']:>16,.0f}{4 * got['total'] / GiB:>10.2f}{time.perf_counter() - t0:>9.2f}"
        )
    est = estimate_from_config(cfg, world_size)
    print(f"\nestimated memory per GPU (tools/memory.py; most loaded rank, parameters {est.params_local:,}):")
    print(format_estimate(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
