"""Expert parallelism: each of the `ep` ranks holds E / ep routed experts and computes every token routed to them.

MoE.forward hands its experts the token copies sorted by global expert id, with the per-expert counts. Hooks on
the GroupedExperts module turn that call into
  dispatch: exchange counts (E ints per rank), all_to_all_single the token copies to the expert owners,
            regroup the received copies from (source rank, local expert) order to (local expert, source rank);
  compute:  the grouped GEMM over the local experts (the weights are DTensors Shard(0) on the EP mesh; the model
            takes their local shards);
  combine:  undo the regrouping and all_to_all_single the results back, in the order MoE.forward expects.
Both all_to_all_single calls are the autograd-aware functional collective, so backward runs the reverse exchanges.

Legend: E experts, El = E / ep local experts, ep EP ranks, N token copies sent by this rank, M copies received.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor


class _Dispatch:
    """State of one dispatch, consumed by the matching combine of the same forward call."""

    def __init__(self, input_splits: list[int], output_splits: list[int], order_M: torch.Tensor):
        self.input_splits, self.output_splits, self.order_M = input_splits, output_splits, order_M


class ExpertParallel:
    """Shards a GroupedExperts module over `mesh` and routes its tokens with all-to-all exchanges."""

    def __init__(self, mesh: DeviceMesh):
        self.mesh = mesh
        self.group = mesh.get_group()
        self.ep = mesh.size()
        self._pending: list[_Dispatch] = []

    def apply(self, experts: nn.Module) -> None:
        for name, param in list(experts.named_parameters(recurse=False)):
            dt = distribute_tensor(param.data, self.mesh, [Shard(0)], src_data_rank=None)
            experts.register_parameter(name, nn.Parameter(dt, requires_grad=param.requires_grad))
        experts.register_forward_pre_hook(self.dispatch)
        experts.register_forward_hook(self.combine)

    def dispatch(self, module: nn.Module, args):
        x_ND, counts_E = args
        n_local = counts_E.numel() // self.ep
        # counts_recv[s, e]: copies that rank s sends to local expert e of this rank
        counts_recv = funcol.all_to_all_single(counts_E, None, None, self.group).view(self.ep, n_local)
        # The split sizes of all_to_all_single are host ints, so one device->host copy per MoE layer is the known
        # minimum: both the send and the receive sizes come from this single .tolist().
        sizes = torch.cat([counts_E.view(self.ep, n_local).sum(1), counts_recv.flatten()]).tolist()
        input_splits = sizes[: self.ep]
        recv = sizes[self.ep :]
        output_splits = [sum(recv[s * n_local : (s + 1) * n_local]) for s in range(self.ep)]
        x_MD = funcol.all_to_all_single_autograd(x_ND, output_splits, input_splits, self.group)
        x_MD = funcol.wait_tensor(x_MD) if isinstance(x_MD, funcol.AsyncCollectiveTensor) else x_MD

        # regroup: received blocks come as (source s, local expert e); the grouped GEMM wants (e, s)
        m = sum(output_splits)
        block_M = torch.repeat_interleave(
            torch.arange(self.ep * n_local, device=x_ND.device), counts_recv.flatten(), output_size=m
        )
        key_M = (block_M % n_local) * self.ep + block_M // n_local
        order_M = torch.argsort(key_M, stable=True)
        self._pending.append(_Dispatch(input_splits, output_splits, order_M))
        return x_MD[order_M], counts_recv.sum(0)

    def combine(self, module: nn.Module, args, y_MD: torch.Tensor) -> torch.Tensor:
        d = self._pending.pop()
        y_back = torch.empty_like(y_MD).index_copy(0, d.order_M, y_MD)  # back to (source, local expert) order
        y_ND = funcol.all_to_all_single_autograd(y_back, d.input_splits, d.output_splits, self.group)
        return funcol.wait_tensor(y_ND) if isinstance(y_ND, funcol.AsyncCollectiveTensor) else y_ND


def apply_ep(model: nn.Module, mesh: DeviceMesh) -> None:
    """Expert parallelism over `mesh` for every MoE of this model (part), MTP blocks included."""
    for moe in model.moe_layers():
        ExpertParallel(mesh).apply(moe.experts)
