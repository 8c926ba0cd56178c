"""The one place that decides the order of parallelisms applied to a model (part) built on the meta device:
TP (+ sequence and loss parallel) -> EP -> CP -> activation checkpointing -> torch.compile (per block) -> FSDP2.
Pipeline splitting (parallel/pipeline.py) happens before, on the whole model; each stage is then parallelized."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import Shard

from titan_dsv3.parallel.activation_checkpoint import apply_ac
from titan_dsv3.parallel.dims import Meshes, ParallelDims
from titan_dsv3.parallel.expert_parallel import ExpertParallel, apply_ep
from titan_dsv3.parallel.tensor_parallel import apply_tp

logger = logging.getLogger(__name__)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Transformer blocks, then MTP modules (each an FSDP unit), in execution order."""
    blocks = list(model.layers.values()) if model.layers is not None else []
    if getattr(model, "mtp", None) is not None:
        blocks += list(model.mtp.values())
    return blocks


def _routed_experts(unit: nn.Module) -> nn.Module | None:
    block = unit.block if hasattr(unit, "eh_proj") else unit  # an MTP module holds its block
    moe = getattr(block, "moe", None)
    return moe.experts if moe is not None else None


def apply_compile(model: nn.Module, checkpoint_by_op: bool, moe_one_graph: bool = False) -> None:
    """Compile each block in place (names and state-dict keys unchanged); same-shaped blocks share one graph.

    A block whose MoE routes over EP ranks has a graph break (the route reads its split sizes on the host).
    Dynamo cannot trace an activation checkpoint around a break and would run such a checkpointed block wholly
    eagerly (on the 16B shape, FSDP 2 + EP 2, every 2nd block checkpointed: 13 of 26 MoE blocks, forward and
    recompute). There the checkpoint stays eager and the block inside it is compiled, the route included (which
    keeps only its split sizes as host ints: ExpertParallel._finish_host_read); its recompute calls the compiled
    code. Selective-by-op checkpointing (checkpoint_by_op) needs the traced checkpoint to match ops, so it keeps
    the outer compile, and runs such blocks eagerly (a warning says so).

    moe_one_graph (compile.moe_one_graph): the route reads its sizes inside the graph instead, as unbacked ints
    (dynamo's capture_scalar_outputs, set here for the process).
    """
    if moe_one_graph:
        torch._dynamo.config.capture_scalar_outputs = True
        for moe in _ep_routed_moes(model):
            moe.route_tokens.sizes_in_graph = True
    blocks = list(model.layers.values()) if model.layers is not None else []
    if getattr(model, "mtp", None) is not None:
        blocks += [m.block for m in model.mtp.values()]
    eager_by_op = 0
    for block in blocks:
        inner = getattr(block, "_checkpoint_wrapped_module", None)
        routes = _ep_routed_moes(inner) if inner is not None else []
        if routes and not checkpoint_by_op:
            inner.compile(fullgraph=False)
        else:
            eager_by_op += bool(routes)
            block.compile(fullgraph=False)
    if eager_by_op:
        logger.warning(
            "activation_checkpoint.selective_option = 'op' with expert parallelism: %d checkpointed blocks run "
            "uncompiled (the EP route breaks the graph inside them); selective_option = an integer or mode = "
            "'full' keeps them compiled",
            eager_by_op,
        )


def _ep_routed_moes(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(getattr(m, "route_tokens", None), ExpertParallel)]


def apply_cp(model: nn.Module) -> None:
    """Context parallelism needs no module change: each step splits the sequences and routes SDPA across ranks
    (parallel/context_parallel.py). Checked here: every attention uses SDPA."""
    for m in model.modules():
        if hasattr(m, "attn_fn") and m.attn_fn.__name__ != "sdpa_attention":
            raise ValueError("context parallelism needs model.attn_impl = 'sdpa'")


def apply_fsdp(
    model: nn.Module,
    meshes: Meshes,
    dims: ParallelDims,
    param_dtype: torch.dtype,
    reshard_after_forward: bool,
    experts_outside_1rank: bool = False,
) -> None:
    """FSDP2 per block (routed experts as their own unit on the expert mesh when they have one), then the rest.

    Gradients are summed over data-parallel ranks, not averaged: the loss is already normalised by the global
    token count. Each block prefetches the next one's all-gather in forward and the previous one's in backward.
    experts_outside_1rank (parallelism.expert_1rank_fsdp_unit = false, or compile.moe_one_graph): when the expert
    mesh has one rank (EP over every data rank), the routed experts get no unit at all. It would shard nothing,
    yet copy every weight in and out of its all-gather and every gradient in and out of its reduce-scatter (19 ms
    of a 430 ms step on the 16B shape cut to 14 layers, 2 x H200), and its hooks, which dynamo does not trace,
    break a compiled block's graph. The experts stay fp32 DTensors on the EP mesh, cast to the compute dtype in
    the grouped GEMM (autograd keeps the cast until backward), and their gradients need no reduction (each expert
    lives on one rank).
    """
    # Inputs are not cast: hidden states already come in the parameter dtype, and the fp32 RoPE table a block
    # receives must stay fp32 (as under autocast).
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    blocks = _blocks(model)
    experts = []
    outside: set[nn.Parameter] = set()
    for i, block in enumerate(blocks):
        # the last block is needed again first in backward: keep it gathered
        reshard = reshard_after_forward and i < len(blocks) - 1
        ex = _routed_experts(block) if dims.separate_experts else None
        mine = set()
        if ex is not None and experts_outside_1rank and meshes.efsdp.size() == 1:
            mine = set(ex.parameters())  # no unit of their own, and none of the block's
            outside |= mine
            ex = None
        elif ex is not None:
            fully_shard(
                ex,
                mesh=meshes.efsdp,
                mp_policy=mp,
                reshard_after_forward=reshard,
                shard_placement_fn=_expert_placement(dims),
            )
            # route_locally (TP without EP) calls experts.routed, not forward: it needs the gathered weights too
            register_fsdp_forward_method(ex, "routed")
        experts.append(ex)
        fully_shard(
            block, mesh=meshes.fsdp, mp_policy=mp, reshard_after_forward=reshard, ignored_params=mine or None
        )
    fully_shard(
        model, mesh=meshes.fsdp, mp_policy=mp, reshard_after_forward=False, ignored_params=outside or None
    )
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # On a 1-rank mesh (the experts' when EP takes every data rank) a sum is the identity, and torch's
            # 1-rank path would copy grad / factor through a temporary: 14.4 ms a step of fp32 division on the
            # 16B shape (FSDP 2 + EP 2, 2 x H200), and a layer's expert gradients (1.1 GB) allocated each time
            if not (m in experts and meshes.efsdp.size() == 1):
                m.set_gradient_divide_factor(1.0)
            if hasattr(m, "set_force_sum_reduction_for_comms"):
                m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    units = [[b] + ([e] if e is not None else []) for b, e in zip(blocks, experts)]
    for i, unit in enumerate(units):
        if i + 1 < len(units):
            unit[0].set_modules_to_forward_prefetch(units[i + 1])
        if i > 0:
            unit[0].set_modules_to_backward_prefetch(units[i - 1])


def _expert_placement(dims: ParallelDims):
    # (E_local, I, D) weights: shard the expert dim when it splits evenly over efsdp, else the hidden dim
    def placement(param: nn.Parameter):
        local_experts = param.shape[0] // dims.ep if dims.ep > 1 else param.shape[0]
        return Shard(0) if local_experts % dims.efsdp == 0 else Shard(1)

    return placement


def reshard_policy(option: str, pp: int) -> bool:
    """fsdp_reshard_after_forward: default frees gathered weights after forward except with PP (each micro-batch
    would gather them again)."""
    if option == "always":
        return True
    if option == "never":
        return False
    return pp == 1


def parallelize_model(
    model: nn.Module, dims: ParallelDims, meshes: Meshes | None, cfg, param_dtype: torch.dtype
) -> nn.Module:
    """Apply, in this order and only when asked: TP, EP, CP, AC, compile, FSDP2. Returns the model (part)."""
    if dims.tp > 1:
        apply_tp(model, meshes.tp, loss_parallel=cfg.parallelism.enable_loss_parallel)
    if dims.ep > 1:
        apply_ep(model, meshes.ep, padded=cfg.parallelism.expert_route == "padded")
    if dims.cp > 1:
        apply_cp(model)
    ac = cfg.activation_checkpoint
    if ac.mode != "none":
        apply_ac(model, ac.mode, ac.selective_option)
    compile_model = cfg.compile.enable and "model" in cfg.compile.components
    one_graph = compile_model and cfg.compile.moe_one_graph
    if compile_model:
        apply_compile(model, ac.mode == "selective" and ac.selective_option == "op", one_graph)
    if dims.uses_fsdp:
        reshard = reshard_policy(cfg.parallelism.fsdp_reshard_after_forward, dims.pp)
        no_unit = one_graph or not cfg.parallelism.expert_1rank_fsdp_unit
        apply_fsdp(model, meshes, dims, param_dtype, reshard, experts_outside_1rank=no_unit)
    return model
