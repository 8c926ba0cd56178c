"""Every parallel layout reproduces the single-process run: 3 training steps of the same model from the same seed
give the same losses and gradient norms (fp32, relative 1e-5), the same step-1 gradients and the same final
parameters and expert biases. Ranks are forked children talking over gloo (tests/distributed/launcher.py)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.common import layout_args, train_and_report
from tests.distributed.launcher import run_ranks

pytestmark = pytest.mark.slow

P = "parallelism."
LAYOUTS = {
    # name: (world size, overrides); global batch 8 x 32 tokens everywhere
    "fsdp2": (2, {"training.local_batch_size": "2"}),  # and 2 accumulation steps
    "hsdp2x2": (4, {P + "data_parallel_replicate_degree": "2", "training.local_batch_size": "2"}),
    "tp2": (2, {P + "tensor_parallel_degree": "2"}),
    "fsdp2_tp2": (4, {P + "tensor_parallel_degree": "2", "training.local_batch_size": "4"}),
    # compiled blocks: the embedding's output (an AsyncCollectiveTensor) once lost its gradient at the first one
    "tp2_compiled": (
        2,
        {P + "tensor_parallel_degree": "2", "compile.enable": "true", "compile.components": "model"},
    ),
    "ep2_fsdp2": (2, {P + "expert_parallel_degree": "2", "training.local_batch_size": "4"}),
    # the routed experts without an FSDP unit on their 1-rank mesh
    "ep2_fsdp2_experts_no_unit": (
        2,
        {
            P + "expert_parallel_degree": "2",
            "training.local_batch_size": "4",
            P + "expert_1rank_fsdp_unit": "false",
        },
    ),
    "ep2_tp2": (2, {P + "expert_parallel_degree": "2", P + "tensor_parallel_degree": "2"}),
    # the fixed-size EP route (T rows to every rank, no host read)
    "ep2_fsdp2_padded": (
        2,
        {P + "expert_parallel_degree": "2", "training.local_batch_size": "4", P + "expert_route": "padded"},
    ),
    # activation checkpointing re-runs the EP exchanges (full) or reuses them (selective by op)
    "ep2_fsdp2_ac_full": (
        2,
        {
            P + "expert_parallel_degree": "2",
            "training.local_batch_size": "4",
            "activation_checkpoint.mode": "full",
        },
    ),
    "ep2_tp2_ac_op": (
        2,
        {
            P + "expert_parallel_degree": "2",
            P + "tensor_parallel_degree": "2",
            "activation_checkpoint.mode": "selective",
        },
    ),
    "pp2_1f1b": (
        2,
        {P + "pipeline_parallel_degree": "2", P + "pipeline_parallel_microbatches": "4"},
    ),
    "pp2_interleaved": (
        2,
        {P + "pipeline_parallel_degree": "2", P + "pipeline_parallel_schedule": "Interleaved1F1B"},
    ),
    "pp2_zbv": (2, {P + "pipeline_parallel_degree": "2", P + "pipeline_parallel_schedule": "ZBV"}),
    "pp2_fsdp2": (
        4,
        {
            P + "pipeline_parallel_degree": "2",
            "training.local_batch_size": "4",
            P + "pipeline_parallel_microbatches": "2",
        },
    ),
    # 2 pipeline stages x 2 data ranks, EP over both: the experts' FSDP mesh has one rank, and they have no unit
    "pp2_ep2_experts_no_unit": (
        4,
        {
            P + "pipeline_parallel_degree": "2",
            P + "expert_parallel_degree": "2",
            P + "expert_1rank_fsdp_unit": "false",
            "training.local_batch_size": "4",
            P + "pipeline_parallel_microbatches": "2",
        },
    ),
    "cp2": (2, {P + "context_parallel_degree": "2"}),
    # 8 ranks: 2 pipeline stages x 4 data ranks; experts split over EP 2 x FSDP 2 (MTP on the last stage)
    "fsdp4_ep2_pp2": (
        8,
        {
            P + "pipeline_parallel_degree": "2",
            P + "expert_parallel_degree": "2",
            "training.local_batch_size": "2",
            P + "pipeline_parallel_microbatches": "2",
        },
    ),
}


def merged(results: list[dict], key: str) -> dict:
    out: dict = {}
    for r in results:
        out.update(r[key])
    return out


def assert_matches(results: list[dict], ref: dict) -> None:
    for r in results:
        if r["val_loss"] is not None:
            assert abs(r["val_loss"] - ref["val_loss"]) <= 1e-5 * ref["val_loss"], (
                r["val_loss"],
                ref["val_loss"],
            )
        for key in ("loss", "mtp_loss", "grad_norm"):
            torch.testing.assert_close(
                torch.tensor(r[key]), torch.tensor(ref[key]), rtol=1e-5, atol=0, msg=key
            )
    # Adam turns rounding-level differences of near-zero gradients into ~lr-sized ones: parameters get atol 3e-5,
    # 1% of the 3e-3 learning rate. Seen with tp2 (2026-12-07): the embedding element that moved 1.8e-5 from the
    # single-process run had a step-1 gradient of 6.53e-8 there and 6.69e-8 under tp2 (within the 1e-7 below,
    # a different order of fp32 sums); with eps 1e-8, Adam's first update lr g / (|g| + eps) differs by 8.3e-6
    # for those two at the full lr (the growth to 1.8e-5 over three steps was not traced step by step; 60,768
    # of the 65,536 elements have |g| < 1e-8, where the same holds).
    for key, rtol, atol in (("grads", 1e-4, 1e-7), ("state", 1e-4, 3e-5)):
        got = merged(results, key)
        assert sorted(got) == sorted(ref[key]), key
        for name, t in ref[key].items():
            torch.testing.assert_close(
                got[name], t, rtol=rtol, atol=atol, msg=lambda m, k=key, n=name: f"{k} {n}: {m}"
            )


OLD_TORCH = tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    if layout == "pp2_zbv" and OLD_TORCH:
        pytest.skip("torch < 2.13: the ZBV schedule's start-up exchange fails over gloo inside torch")
    world, overrides = LAYOUTS[layout]
    results = run_ranks(train_and_report, world, layout_args(str(tmp_path), **overrides))
    assert_matches(results, reference)
