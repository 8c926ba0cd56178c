"""Pre-flight for run.sh, no GPU needed: parse the exact torchtitan command line with torchtitan's own ConfigManager,
check the parallel degrees against the world size, build the flavor on the meta device, and print torchtitan's
parameter count and FLOPs per token beside ours for the workload of the same depth (`deepseek16b`, or
`deepseek16b_14l` at 14 layers).

    python3 benchmarks/peer_torchtitan/check_config.py --world-size 4 -- <torchtitan flags>
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("tt_args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    tt_args = a.tt_args[1:] if a.tt_args[:1] == ["--"] else a.tt_args

    import torch
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import ParallelDims
    from torchtitan.protocols.train_spec import get_train_spec

    cfg = ConfigManager().parse_args(tt_args)  # tyro exits with a message on an unknown flag or a bad value
    if cfg.experimental.custom_import:
        importlib.import_module(cfg.experimental.custom_import)
    p = cfg.parallelism
    dims = ParallelDims(
        dp_replicate=p.data_parallel_replicate_degree,
        dp_shard=p.data_parallel_shard_degree,
        cp=p.context_parallel_degree,
        tp=p.tensor_parallel_degree,
        pp=p.pipeline_parallel_degree,
        ep=p.expert_parallel_degree,
        etp=p.expert_tensor_parallel_degree,
        world_size=a.world_size,
    )
    spec = get_train_spec(cfg.model.name)
    if cfg.model.flavor not in spec.model_args:
        raise SystemExit(f"flavor {cfg.model.flavor!r} not in {sorted(spec.model_args)}")
    margs = copy.deepcopy(spec.model_args[cfg.model.flavor])
    margs.update_from_config(cfg)
    with torch.device("meta"):
        model = spec.model_cls(margs)
    nparams, tt_flops = margs.get_nparams_and_flops(model, cfg.training.seq_len)

    t = cfg.training
    print(
        f"torchtitan config OK: model {cfg.model.name}/{cfg.model.flavor} (attn {margs.attn_type}, mask "
        f"{margs.attn_mask_type}, {margs.n_layers} layers, {margs.moe_args.num_experts} experts top-"
        f"{margs.moe_args.top_k}, vocab {margs.vocab_size}); batch {t.local_batch_size} x {t.seq_len} per GPU, "
        f"{t.steps} steps, dtype {t.dtype} / params {t.mixed_precision_param} / reduce {t.mixed_precision_reduce}; "
        f"world {a.world_size}: dp_shard {dims.dp_shard}, ep {dims.ep}, tp {dims.tp}, pp {dims.pp}, cp {dims.cp}; "
        f"AC {cfg.activation_checkpoint.mode}/{cfg.activation_checkpoint.selective_ac_option}; compile "
        f"{cfg.compile.enable} {cfg.compile.components}; checkpoint {cfg.checkpoint.enable}; "
        f"log_freq {cfg.metrics.log_freq}; dataset {t.dataset} at {t.dataset_path}; tokenizer {cfg.model.hf_assets_path}"
    )
    print(f"torchtitan: {nparams:,} parameters, {tt_flops / 1e9:.3f} GFLOP/token (its MFU numerator)")

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from workloads import WORKLOADS

    from titan_dsv3.models import ModelArgs

    name = {27: "deepseek16b", 14: "deepseek16b_14l"}.get(margs.n_layers)
    if name is None:
        raise SystemExit(
            f"no workload of ours has {margs.n_layers} layers (deepseek16b: 27, deepseek16b_14l: 14)"
        )
    w = WORKLOADS[name]
    ours = ModelArgs(**w["model"])
    ours_flops = ours.flops_per_token(w["seq_len"], False)
    print(
        f"ours ({name}): {ours_flops / 1e9:.3f} GFLOP/token, same convention; ratio torchtitan/ours "
        f"{tt_flops / ours_flops:.4f}; batch {w['batch']} x {w['seq_len']}"
    )
    same = (t.local_batch_size, t.seq_len) == (w["batch"], w["seq_len"])
    print(f"batch and sequence length equal to ours: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
