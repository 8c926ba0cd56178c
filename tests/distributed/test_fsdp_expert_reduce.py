"""FSDP of the routed experts over a 1-rank mesh (EP takes every data rank): the gradient sum is the identity, and
the reduction must not divide by 1 through a temporary as torch's 1-rank path does when a divide factor is set
(on the 16B shape, FSDP 2 + EP 2: 14.4 ms a step, benchmarks/RESULTS.md); and parallelism.expert_1rank_fsdp_unit =
false leaves the unit out. The layout tests check the numbers."""

from __future__ import annotations

import pytest

from tests.distributed.common import layout_args
from tests.distributed.launcher import run_ranks

pytestmark = pytest.mark.slow


def divisions_in_post_backward(args: list[str]) -> int:
    """aten::div calls inside FSDP's post-backward reduction in the second step."""
    import torch

    from titan_dsv3.config import parse_args
    from titan_dsv3.train import Trainer

    trainer = Trainer(parse_args(args))
    trainer.train_step()
    with torch.profiler.profile() as prof:
        trainer.train_step()
    n = 0
    for ev in prof.events():
        if ev.name != "aten::div":
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("FSDP::post_backward_reduce"):
            parent = parent.cpu_parent
        n += parent is not None
    return n


def test_experts_on_a_one_rank_mesh_reduce_without_dividing(tmp_path):
    ep2 = {"parallelism.expert_parallel_degree": "2", "training.local_batch_size": "4"}  # efsdp = 2 / 2 = 1
    assert run_ranks(divisions_in_post_backward, 2, layout_args(str(tmp_path), **ep2)) == [0, 0]


def expert_units(args: list[str]) -> int:
    """How many routed-expert modules are FSDP units."""
    from torch.distributed.fsdp import FSDPModule

    from titan_dsv3.config import parse_args
    from titan_dsv3.train import Trainer

    trainer = Trainer(parse_args(args))
    model = trainer.model_parts[0]
    return sum(isinstance(m, FSDPModule) for name, m in model.named_modules() if name.endswith(".experts"))


def test_experts_on_a_one_rank_mesh_can_go_without_a_unit(tmp_path):
    ep2 = {"parallelism.expert_parallel_degree": "2", "training.local_batch_size": "4"}
    # 3 MoE blocks and the MTP block's
    assert run_ranks(expert_units, 2, layout_args(str(tmp_path / "unit"), **ep2)) == [4, 4]
    none = {**ep2, "parallelism.expert_1rank_fsdp_unit": "false"}
    assert run_ranks(expert_units, 2, layout_args(str(tmp_path / "none"), **none)) == [0, 0]
