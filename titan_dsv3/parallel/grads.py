"""Gradients across meshes: settle their layouts, and clip by the global norm over every mesh and pipeline stage.

A parameter is a plain tensor, or a DTensor on some mesh (FSDP, HSDP, TP, EP, or combinations). Every rank of a
pipeline stage holds one shard of each of its parameters, and each distinct shard is held by the same number of
ranks. So the squared global norm is one all-reduce over the world of sum_p w_p |local grad_p|^2 with
w_p = (distinct shards of p) / (ranks of a stage), and w = 0 for a copy counted elsewhere (the tied embedding of a
pipeline's last stage).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def settle_grad_layouts(params) -> None:
    """Give DTensor gradients their parameter's placements (a Partial gradient of a replicated parameter, as
    sequence-parallel norms produce without FSDP, is all-reduced here; FSDP does this itself)."""
    for p in params:
        g = p.grad
        if g is not None and hasattr(g, "placements") and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(placements=p.placements)


def norm_weights(params, ranks_per_stage: int, copies=()) -> dict[int, float]:
    """id(param) -> weight of its local squared norm in the global sum (see the module docstring)."""
    skip = {id(c) for c in copies}
    weights = {}
    for p in params:
        distinct = 1
        if hasattr(p, "device_mesh"):
            # any placement that is not Replicate splits the tensor (Shard, and FSDP's _StridedShard over TP)
            distinct = math.prod(
                p.device_mesh.size(i) for i, pl in enumerate(p.placements) if not pl.is_replicate()
            )
        weights[id(p)] = 0.0 if id(p) in skip else distinct / ranks_per_stage
    return weights


@torch.no_grad()
def grad_norm(params: list[torch.Tensor], weights: dict[int, float]) -> torch.Tensor:
    """Global L2 norm of the gradients of `params` (weights by id(param), from norm_weights). Collective."""
    by_weight: dict[float, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        w = weights[id(p)]
        g = _local(p.grad)
        if w > 0 and g.numel() > 0:
            by_weight[w].append(g)
    device = _local(params[0].grad).device if params else torch.device("cpu")
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for w, gs in by_weight.items():
        norms = torch._foreach_norm(gs)
        total_sq += w * torch.stack([n.float() for n in norms]).pow(2).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_sq)
    return total_sq.sqrt()


@torch.no_grad()
def clip_grads_with_norm(params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale the gradients (local shards) by min(1, max_norm / total_norm), as torch's clip_grad_norm_ does."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if grads:
        coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device, grads[0].dtype))
