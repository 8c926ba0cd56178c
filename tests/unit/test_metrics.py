"""MoE load statistics of the metrics logger."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from titan_dsv3.metrics.logger import moe_stats


def _moe(n_experts: int):
    gate = SimpleNamespace(expert_bias=torch.zeros(n_experts))
    return SimpleNamespace(gate=gate, last_router_entropy=None)


def test_ep_rank_load_is_the_busiest_ranks_copies_over_the_mean():
    # 4 experts on 2 EP ranks (experts 0-1 on rank 0): rank 0 gets 3 + 5 = 8 copies, rank 1 gets 1 + 2 = 3
    counts = torch.tensor([[3.0, 5.0, 1.0, 2.0]])
    stats = moe_stats([_moe(4)], counts, ep=2)
    assert stats["moe/0/ep_rank_max_over_mean_load"] == pytest.approx(8 / 5.5)
    assert stats["moe/0/max_over_mean_load"] == pytest.approx(5 / 2.75)
    assert "moe/0/ep_rank_max_over_mean_load" not in moe_stats([_moe(4)], counts)  # no EP: no rank figure
