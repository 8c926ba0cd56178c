"""AdamW with parameter groups: decay matrices, not norms, biases or embeddings (unless configured)."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, decay_norms_and_biases: bool, decay_embeddings: bool):
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_embedding = isinstance(module, nn.Embedding)
            is_norm_or_bias = p.ndim < 2 or name == "bias"
            if (is_embedding and not decay_embeddings) or (is_norm_or_bias and not decay_norms_and_biases):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model_parts: list[nn.Module], cfg, device_type: str) -> torch.optim.Optimizer:
    """One AdamW over all model parts (pipeline stages of this rank); bf16 moments when state_dtype says so."""
    groups: list[dict] = []
    for part in model_parts:
        for g in param_groups(part, cfg.weight_decay, cfg.decay_norms_and_biases, cfg.decay_embeddings):
            groups.append(g)
    if cfg.state_dtype == "bfloat16":
        from titan_dsv3.optim.adamw_bf16 import AdamWBF16States

        return AdamWBF16States(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device_type == "cuda" else "foreach"
    kwargs = {"fused": impl == "fused", "foreach": impl == "foreach"}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)
