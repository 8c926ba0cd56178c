"""Aux-loss-free load balancing (DeepSeek-V3 section 2.1.2): after each step move every expert's bias by gamma
towards balance: down when it took more tokens than the layer's mean, up when it took fewer."""

from __future__ import annotations

import torch
import torch.distributed as dist

from titan_dsv3.models.moe import MoE


@torch.no_grad()
def update_expert_bias(
    moes: list[MoE], gamma: float, group: dist.ProcessGroup | None = None
) -> torch.Tensor | None:
    """Apply the sign update and reset the counts. Returns the step's (layers, experts) token counts.

    The counts of all layers go through one all-reduce over the data-parallel ranks (group), so every rank
    applies the same update.
    """
    if not moes:
        return None
    counts_LE = torch.stack([m.tokens_per_expert for m in moes])
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts_LE, group=group)
    if gamma > 0:
        error_LE = counts_LE.mean(dim=1, keepdim=True) - counts_LE
        for m, err_E in zip(moes, error_LE):
            m.gate.expert_bias.add_(gamma * torch.sign(err_E).to(m.gate.expert_bias.dtype))
    for m in moes:
        m.tokens_per_expert.zero_()
    return counts_LE
