"""Token budgets: steps from a tokens-per-active-parameter ratio (Chinchilla: about 20)."""

from __future__ import annotations

import math

from titan_dsv3.models.args import ModelArgs


def budget_params(args: ModelArgs) -> int:
    """Parameters a token budget is counted against: active parameters of the main model (MTP excluded)."""
    return args.num_params(active=True, include_mtp=False)


def steps_for_ratio(args: ModelArgs, tokens_per_param: float, tokens_per_step: int) -> int:
    """Fewest whole steps whose tokens reach tokens_per_param x active parameters."""
    return max(1, math.ceil(tokens_per_param * budget_params(args) / tokens_per_step))
