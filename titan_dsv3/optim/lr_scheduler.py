"""Learning-rate schedules: linear warm-up, then cosine, linear or warmup-stable-decay down to a floor."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, cfg) -> float:
    """Multiplier of the peak LR for the update at 0-based `step`."""
    warmup = min(cfg.warmup_steps, total_steps)
    floor = cfg.min_lr_ratio
    if step < warmup:
        start = cfg.warmup_start_ratio
        return start + (1.0 - start) * (step + 1) / warmup
    decay_steps = max(total_steps - warmup, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    if cfg.decay_type == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.decay_type == "linear":
        return floor + (1 - floor) * (1 - progress)
    # wsd: hold the peak, then decay linearly over the last decay_ratio of all steps
    decay_len = max(int(round(cfg.decay_ratio * total_steps)), 1)
    decay_start = max(total_steps - decay_len, warmup)
    if step < decay_start:
        return 1.0
    return floor + (1 - floor) * (1 - min((step - decay_start) / max(total_steps - decay_start, 1), 1.0))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
