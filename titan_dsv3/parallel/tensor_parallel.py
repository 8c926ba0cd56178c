"""Tensor parallelism with sequence parallelism (Megatron-style) and loss parallelism for the DeepSeek-V3 model.

Between blocks the residual stream is a plain tensor holding this rank's 1/tp of the sequence (Shard(1)). Norms run
sequence-parallel; attention and dense FFNs all-gather the sequence, shard heads / hidden units, and reduce-scatter
back. Inside an MoE the tokens stay sequence-sharded: the routed experts treat the tp ranks like data ranks (EP or
FSDP over them, see dims.py), the router sees the whole sequence, the shared experts are tensor-parallel.

MLA pieces shared by all heads (wq_a, q_norm, wkv_a, kv_norm) stay plain replicated parameters computed on the
whole sequence: the column-parallel linears after them all-reduce their input gradients, so these parameters get
identical, complete gradients on every tp rank. The one exception is the decoupled RoPE key k_pe, used by the
local heads directly: its gradient slice is summed over tp by `_SumRopeKeyGrad`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)


class _SumRopeKeyGrad(torch.autograd.Function):
    """Identity on wkv_a's output; the gradient of its last `rope_dim` columns (k_pe) is all-reduced over tp."""

    @staticmethod
    def forward(ctx, kv: torch.Tensor, rope_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.rope_dim, ctx.group = rope_dim, group
        return kv.view_as(kv)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        c_kv_grad, k_pe_grad = grad.split([grad.shape[-1] - ctx.rope_dim, ctx.rope_dim], dim=-1)
        k_pe_grad = funcol.all_reduce(k_pe_grad.contiguous(), "sum", ctx.group)  # traceable under compile
        return torch.cat([c_kv_grad, k_pe_grad], dim=-1), None, None


def _sum_rope_key_grad(mesh: DeviceMesh, rope_dim: int):
    group = mesh.get_group()

    def hook(module, args, output):
        return _SumRopeKeyGrad.apply(output, rope_dim, group)

    return hook


class RouterParallel(ParallelStyle):
    """The router scores the whole sequence on every tp rank and keeps the rows of this rank's tokens.

    Forward: all-gather the (tokens, dim) input over tp, route, keep the local rows of (weights, ids, scores).
    Backward: the kept rows' gradients are all-gathered, so the router weight gets the complete gradient on every
    tp rank (no tp reduction needed) and the input gradient is the local slice of an identical full gradient.
    """

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def gather_tokens(mod, args):
            (x_TD,) = args
            full = DTensor.from_local(x_TD, mesh, [Shard(0)], run_check=False).redistribute(
                mesh, [Replicate()]
            )
            return (full.to_local(),)

        def keep_local_rows(mod, args, outputs):
            return tuple(
                DTensor.from_local(o, mesh, [Replicate()], run_check=False)
                .redistribute(mesh, [Shard(0)])
                .to_local()
                for o in outputs
            )

        module.register_forward_pre_hook(gather_tokens)
        module.register_forward_hook(keep_local_rows)
        return module


def _attention_plan(prefix: str, attention: nn.Module, mesh: DeviceMesh) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {
        # (x, cos_sin, mask): the sequence is gathered; x reaches MLA as a plain full-sequence tensor
        prefix: PrepareModuleInput(
            input_layouts=(Shard(1), None, None),
            desired_input_layouts=(Replicate(), None, None),
            use_local_output=True,
        ),
        f"{prefix}.wkv_b": ColwiseParallel(),
        f"{prefix}.wo": RowwiseParallel(output_layouts=Shard(1)),
    }
    plan[f"{prefix}.wq" if attention.q_lora_rank == 0 else f"{prefix}.wq_b"] = ColwiseParallel()
    attention.wkv_a.register_forward_hook(_sum_rope_key_grad(mesh, attention.qk_rope_head_dim))
    return plan


def _block_plan(prefix: str, block: nn.Module, mesh: DeviceMesh) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {
        f"{prefix}.attention_norm": SequenceParallel(),
        f"{prefix}.ffn_norm": SequenceParallel(),
        **_attention_plan(f"{prefix}.attention", block.attention, mesh),
    }
    if block.moe is None:
        ffn = f"{prefix}.feed_forward"
        plan[ffn] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        plan[f"{ffn}.w1"] = ColwiseParallel()
        plan[f"{ffn}.w3"] = ColwiseParallel()
        plan[f"{ffn}.w2"] = RowwiseParallel(output_layouts=Shard(1))
        return plan
    moe = f"{prefix}.moe"
    # tokens stay sequence-sharded through the MoE; MoE.forward flattens them to (tokens, dim), so Shard(0) below
    plan[moe] = PrepareModuleInput(
        input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_output=True
    )
    plan[f"{moe}.gate"] = RouterParallel()
    if block.moe.shared_experts is not None:
        shared = f"{moe}.shared_experts"
        plan[shared] = PrepareModuleInput(input_layouts=(Shard(0),), desired_input_layouts=(Replicate(),))
        plan[f"{shared}.w1"] = ColwiseParallel()
        plan[f"{shared}.w3"] = ColwiseParallel()
        plan[f"{shared}.w2"] = RowwiseParallel(output_layouts=Shard(0))
    return plan


def apply_tp(model: nn.Module, mesh: DeviceMesh, loss_parallel: bool) -> None:
    """Tensor + sequence parallelism over `mesh`, as one FQN -> ParallelStyle plan of this model (part)."""
    plan: dict[str, ParallelStyle] = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    for name, block in model.layers.items():
        plan.update(_block_plan(f"layers.{name}", block, mesh))
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        # loss parallel: logits stay vocab-sharded DTensors; the cross-entropy runs under loss_parallel()
        plan["output"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    if model.mtp is not None:
        for name, module in model.mtp.items():
            p = f"mtp.{name}"
            plan[f"{p}.enorm"] = SequenceParallel(use_local_output=True)
            plan[f"{p}.hnorm"] = SequenceParallel(use_local_output=True)
            # gather the sequence, split the output features, then back to sequence shards (an all-to-all)
            plan[f"{p}.eh_proj"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(1))
            plan[f"{p}.norm"] = SequenceParallel()
            plan.update(_block_plan(f"{p}.block", module.block, mesh))
    parallelize_module(model, mesh, plan)
    if model.tok_embeddings is not None:
        model.tok_embeddings.register_forward_hook(_waited_output)


def _waited_output(module, args, output):
    """The embedding's local output is an AsyncCollectiveTensor (its reduce-scatter waited on first use). Handed
    as is to the first block compiled (compile.components 'model'), the block's gradient never reached the
    embedding: its weight got none from the main path (CPU, gloo, torch 2.13; every other gradient right). A copy
    made here, in eager code, waits and keeps the autograd link (a T / tp x D copy, one pass over one activation)."""
    return output.clone() if isinstance(output, funcol.AsyncCollectiveTensor) else output


def loss_parallel_context():
    """Cross-entropy on vocab-sharded logits; forward and backward must both run inside it."""
    return loss_parallel()


def plain_loss(fn):
    """`fn` returning a plain tensor: a loss over vocab-sharded logits comes out as a replicated DTensor."""

    def wrapped(*args):
        out = fn(*args)
        return out.to_local() if isinstance(out, DTensor) else out

    return wrapped
