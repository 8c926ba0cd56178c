"""Activation checkpointing of transformer blocks: full, every n-th block, or selective by op."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# Selective AC by op: keep the outputs of the expensive ops and recompute the cheap elementwise ones.
# Matmul outputs: every other one is saved, which halves their memory for one extra matmul in three.
# Attention and the routing ops (top-k, sort, counts) are always saved: recomputing routing would cost a sync.
_MM_OPS = {torch.ops.aten.mm.default}
if hasattr(torch.ops.aten, "_grouped_mm"):
    _MM_OPS.add(torch.ops.aten._grouped_mm.default)
_SAVE_OPS = {
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten.topk.default,
    torch.ops.aten.sort.stable,
    torch.ops.aten.scatter_add.default,
    # EP exchanges: recomputing them would repeat the all-to-alls (and their host sync) in backward
    torch.ops._c10d_functional.all_to_all_single.default,
}
# This project's kernels, by name: their files register the ops when first imported (they import Triton).
# The fused MLA attention's forward (out, its log-sum-exp and the rotated q_pe) is saved like SDPA's.
_SAVE_OP_NAMES = {"titan_dsv3::mla_attention_fwd", "titan_dsv3::mla_attention_rope_fwd"}


def _saved(op) -> bool:
    return op in _SAVE_OPS or (isinstance(op, torch._ops.OpOverload) and op.name() in _SAVE_OP_NAMES)


# Selective AC matches the forward's ops to the recompute's one by one. The FSDP2 hooks of a unit nested inside a
# checkpointed block (the routed experts on their own mesh) emit more profiler markers in the recompute than in
# the forward (a second root_pre_forward), so the markers, which carry no data, are left out of the matching.
torch.utils.checkpoint.SAC_IGNORED_OPS.update(
    {
        torch.ops.profiler._record_function_enter_new.default,
        torch.ops.profiler._record_function_exit._RecordFunction,
    }
)


def _selective_op_context():
    counts: dict[str, int] = defaultdict(int)

    def policy(ctx, op, *args, **kwargs):
        if op in _MM_OPS:
            key = f"{'recompute' if ctx.is_recompute else 'forward'}_{op}"
            counts[key] += 1
            return CheckpointPolicy.MUST_SAVE if counts[key] % 2 == 1 else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if _saved(op) else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_ac(model: nn.Module, mode: str, selective_option: str = "op") -> None:
    """Wrap each block of model.layers (and the MTP blocks) in place."""
    blocks = [(model.layers, name) for name in list(model.layers.keys())] if model.layers is not None else []
    if getattr(model, "mtp", None) is not None:
        blocks += [(module, "block") for module in model.mtp.values()]
    for i, (parent, name) in enumerate(blocks):
        block = parent[name] if isinstance(parent, nn.ModuleDict) else getattr(parent, name)
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        elif selective_option == "op":
            wrapped = checkpoint_wrapper(block, context_fn=_selective_op_context, preserve_rng_state=False)
        else:
            every = int(selective_option)
            if i % every:
                continue
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        if isinstance(parent, nn.ModuleDict):
            parent[name] = wrapped
        else:
            setattr(parent, name, wrapped)
