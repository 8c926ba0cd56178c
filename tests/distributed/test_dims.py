"""Layout arithmetic and every refused layout, in-process: one line naming the key, before anything is built."""

from __future__ import annotations

import dataclasses

import pytest

from tests.distributed.common import layout_args
from titan_dsv3.config import ConfigError, parse_args, resolve_model_args
from titan_dsv3.parallel.dims import ParallelDims

P = "--parallelism."


def args(tmp_path, *extra: str) -> list[str]:
    return layout_args(str(tmp_path)) + list(extra)


REFUSED = [
    (4, [P + "tensor_parallel_degree", "3"], "world size 4 is not divisible"),
    (4, [P + "data_parallel_shard_degree", "3"], "world size 4 != replicate"),
    (4, [P + "expert_parallel_degree", "3"], "expert_parallel_degree = 3 must divide"),
    (8, [P + "expert_parallel_degree", "8", "--model.n_routed_experts", "4"], "n_routed_experts = 4"),
    (6, [P + "tensor_parallel_degree", "3"], "model.n_heads = 2"),
    (8, [P + "pipeline_parallel_degree", "8"], "model.n_layers = 4 cannot fill 8"),
    (4, [P + "pipeline_parallel_degree", "4", P + "pipeline_parallel_schedule", "ZBV"], "cannot fill 8"),
    (2, [P + "pipeline_parallel_degree", "2", P + "pipeline_parallel_microbatches", "3"], "not divisible by"),
    (
        4,
        [
            P + "pipeline_parallel_degree",
            "4",
            P + "pipeline_parallel_schedule",
            "Interleaved1F1B",
            "--model.n_layers",
            "8",
            P + "pipeline_parallel_microbatches",
            "2",
        ],
        "must be a multiple of",
    ),
    (2, [P + "pipeline_parallel_schedule", "Zigzag"], "pipeline_parallel_schedule"),
    (2, [P + "fsdp_reshard_after_forward", "sometimes"], "fsdp_reshard_after_forward"),
    (2, [P + "expert_route", "dropping"], "expert_route = 'dropping'"),
    (4, [P + "context_parallel_degree", "4", "--training.seq_len", "28"], "training.seq_len = 28"),
    (2, [P + "tensor_parallel_degree", "2", "--moe.balance_loss_alpha", "1e-4"], "balance_loss_alpha"),
    (2, [P + "tensor_parallel_degree", "2", "--model.tie_embeddings", "true"], "tie_embeddings"),
    (2, [P + "expert_parallel_degree", "2", "--model.n_dense_layers", "4"], "needs MoE layers"),
    (
        2,
        [P + "expert_parallel_degree", "2", "--model.n_routed_experts", "514"],
        "more than 256 experts a rank",
    ),
]


@pytest.mark.parametrize("world,extra,needle", REFUSED, ids=[r[2][:30] for r in REFUSED])
def test_impossible_layouts_are_refused(tmp_path, world, extra, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")) as e:
        parse_args(args(tmp_path, *extra), world_size=world)
    assert "\n" not in str(e.value)


def test_context_parallel_refuses_other_attention_backends(tmp_path):
    cfg = parse_args(args(tmp_path), world_size=1)
    margs = dataclasses.replace(resolve_model_args(cfg), attn_impl="flex")
    dims = ParallelDims.from_config(dataclasses.replace(cfg.parallelism, context_parallel_degree=2), 2)
    with pytest.raises(ValueError, match="attn_impl = 'sdpa'"):
        dims.check_model(margs, 8, 32)


def test_degrees_and_coordinates(tmp_path):
    extra = [
        P + "expert_parallel_degree",
        "2",
        P + "pipeline_parallel_degree",
        "2",
        "--training.local_batch_size",
        "2",
    ]
    cfg = parse_args(args(tmp_path, *extra), world_size=8)
    dims = ParallelDims.from_config(cfg.parallelism, 8)
    assert (dims.pp, dims.dp_shard, dims.ep, dims.efsdp, dims.dp) == (2, 4, 2, 2, 4)
    # row-major over (pp, dp_replicate, dp_shard, cp, tp): rank 5 is pp 1, dp_shard 1
    assert dims.coords(5) == {"pp": 1, "dp_replicate": 0, "dp_shard": 1, "cp": 0, "tp": 0}
    assert [dims.dp_rank(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    hsdp = ParallelDims.from_config(
        dataclasses.replace(
            cfg.parallelism,
            data_parallel_replicate_degree=2,
            pipeline_parallel_degree=1,
            tensor_parallel_degree=2,
            expert_parallel_degree=1,
        ),
        8,
    )
    # TP ranks share their batch; replicas come first in the data order
    assert [hsdp.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert hsdp.efsdp == 4 and hsdp.uses_fsdp


def test_pipeline_split():
    # imported here: torch.distributed.pipelining imports triton, which must not happen before
    # tests/kernels/conftest.py sets TRITON_INTERPRET at collection
    from titan_dsv3.parallel.pipeline import split_layers, stage_ids

    # the MTP module counts as a block of the last stage
    assert split_layers(4, 1, 2) == [[0, 1, 2], [3]]
    assert split_layers(4, 0, 4) == [[0], [1], [2], [3]]
    assert [len(s) for s in split_layers(61, 1, 8)] == [8, 8, 8, 7, 8, 8, 8, 6]  # + MTP: 7 blocks last
    assert sum(len(s) for s in split_layers(61, 1, 16)) == 61 and all(split_layers(61, 1, 16))
    dims = ParallelDims(1, 1, 1, 1, 4, 1, 4, "Interleaved1F1B", 4)
    assert [stage_ids(r, dims) for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    dims.pp_schedule = "ZBV"
    assert [stage_ids(r, dims) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
