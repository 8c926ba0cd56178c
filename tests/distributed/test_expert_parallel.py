"""The EP token path alone: dispatch, grouped GEMM on local experts, combine, with empty experts and a rank that
routes no tokens at all; outputs, input gradients and expert-weight gradients equal the unsharded experts'."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launcher import run_ranks

pytestmark = pytest.mark.slow

E, D, I = 4, 8, 12  # noqa: E741  (grouped_mm wants rows of a multiple of 16 bytes)


def ep_matches_reference(counts_by_rank: list[list[int]]) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from titan_dsv3.models.moe import GroupedExperts
    from titan_dsv3.parallel.expert_parallel import ExpertParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = GroupedExperts(E, D, I)
    ref.init_weights(0.5)
    ep = GroupedExperts(E, D, I)
    ep.load_state_dict(ref.state_dict())
    ExpertParallel(init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))).apply(ep)

    counts = torch.tensor(counts_by_rank[rank])
    torch.manual_seed(1 + rank)
    x = torch.randn(int(counts.sum()), D)  # token copies already sorted by expert
    r = torch.randn(int(counts.sum()), D)
    x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref(x_ref, counts)
    y_ep = ep(x_ep, counts)
    (y_ref * r).sum().backward()
    (y_ep * r).sum().backward()
    out = {"y": (y_ep - y_ref).abs().max().item() if len(x) else 0.0}
    out["x_grad"] = (x_ep.grad - x_ref.grad).abs().max().item() if len(x) else 0.0
    local = E // world
    for name in ("w1", "w2", "w3"):
        full = getattr(ref, name).grad.clone()
        dist.all_reduce(full)  # the reference's weight gradient over every rank's tokens
        shard = getattr(ep, name).grad.to_local()
        out[name] = (shard - full[rank * local : (rank + 1) * local]).abs().max().item()
    return out


@pytest.mark.parametrize(
    "counts",
    [
        [[3, 0, 0, 2], [0, 1, 5, 0]],  # empty experts on both sides
        [[2, 1, 0, 4], [0, 0, 0, 0]],  # rank 1 routes nothing (and still receives)
    ],
)
def test_ep_dispatch_combine_matches_local_experts(counts):
    for errors in run_ranks(ep_matches_reference, 2, counts):
        assert max(errors.values()) < 1e-5, errors
