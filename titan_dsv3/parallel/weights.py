"""Full (unsharded) weights in and out of a parallelized model: the seeded initial weights of a run, whatever its
layout, and gathered copies for comparisons.

Every layout starts from the weights one process would draw with the same job.seed: each rank builds the full
model on CPU under that seed and keeps its shards. That costs 4 bytes per parameter of host memory on every rank
and a CPU init, so above FULL_INIT_MAX_PARAMS each rank initialises its own shards instead (same distributions,
other values); a seed checkpoint (checkpoint.initial_load_path) makes such runs reproducible across layouts.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from titan_dsv3.models import DeepSeekV3Model

# 1B parameters: 4 GB of host memory per rank, ~10 s of CPU init.
FULL_INIT_MAX_PARAMS = 1_000_000_000


@torch.no_grad()
def seeded_state_dict(args, seed: int) -> dict[str, torch.Tensor]:
    """The full model's initial weights on CPU, drawn from a private RNG seeded with `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta"):
            model = DeepSeekV3Model(args)
        model.to_empty(device="cpu")
        model.init_weights(buffer_device=torch.device("cpu"))
    return model.state_dict()


@torch.no_grad()
def load_full_state_dict(parts: list[nn.Module], full: dict[str, torch.Tensor]) -> None:
    """Copy each part's shard of `full` into it (no communication: every rank holds `full`)."""
    for part in parts:
        for name, t in part.state_dict().items():
            if name not in full:
                raise KeyError(f"{name} is missing from the state dict being loaded")
            src = full[name]
            if isinstance(t, DTensor):
                src = distribute_tensor(
                    src.to(t.device, t.dtype), t.device_mesh, t.placements, src_data_rank=None
                )
                t.to_local().copy_(src.to_local())
            else:
                t.copy_(src)


@torch.no_grad()
def full_state_dict(parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies of the parts' state (collective over each part's meshes)."""
    out = {}
    for part in parts:
        for name, t in part.state_dict().items():
            out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()
    return out


@torch.no_grad()
def full_grads(parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies of the parts' gradients, by state-dict name (collective)."""
    out = {}
    for part in parts:
        for name, p in part.named_parameters():
            if p.grad is None:
                continue
            g = p.grad
            out[_clean(name)] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().cpu().clone()
    return out


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
