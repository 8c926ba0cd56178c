"""Pipeline parallelism: split the model into stages by layer FQNs, and run them with torch.distributed.pipelining.

Stage s keeps layers.{i} for its contiguous range of i; the first stage also keeps tok_embeddings, the last keeps
norm, output and the MTP modules (so the loss and the MTP loss are computed there). When the last stage needs the
embedding (MTP, or tied input/output embeddings) it keeps its own copy under the same name, tok_embeddings, loaded
from the same weights; `TiedEmbeddingSync` sums the two copies' gradients after every backward, so both copies
take identical optimizer steps. Checkpoints see one tensor: both copies have the same FQN and values.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from titan_dsv3.parallel.dims import ParallelDims

SCHEDULES = {
    "1F1B": Schedule1F1B,
    "GPipe": ScheduleGPipe,
    "Interleaved1F1B": ScheduleInterleaved1F1B,
    "InterleavedZeroBubble": ScheduleInterleavedZeroBubble,
    "ZBV": ScheduleZBVZeroBubble,
}


def split_layers(n_layers: int, mtp_depth: int, n_stages: int) -> list[list[int]]:
    """Contiguous layer ranges per stage, balancing blocks: each MTP module costs one block on the last stage."""
    total = n_layers + mtp_depth
    bounds = [0]
    for s in range(1, n_stages):
        # rounding up leaves the last stage (which also runs the output head and the loss) the lighter one;
        # at least one layer per stage, and enough layers left for the stages after this one
        b = math.ceil(s * total / n_stages)
        bounds.append(min(max(b, bounds[-1] + 1), n_layers - (n_stages - s)))
    bounds.append(n_layers)
    return [list(range(bounds[s], bounds[s + 1])) for s in range(n_stages)]


def stage_ids(pp_rank: int, dims: ParallelDims) -> list[int]:
    """Stages of this pipeline rank: one; a loop (r, r + pp) for interleaved schedules; a V (r, 2pp - 1 - r) for ZBV."""
    if dims.stages_per_rank == 1:
        return [pp_rank]
    if dims.pp_schedule == "ZBV":
        return [pp_rank, 2 * dims.pp - 1 - pp_rank]
    return [pp_rank + k * dims.pp for k in range(dims.stages_per_rank)]


def _flatten_last_stage_output(module, args, output):
    # (logits, [mtp logits]) -> (logits, mtp logits...): the pipeline handles flat tuples of tensors
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], list):
        return (output[0], *output[1])
    return output


def build_stage_model(model: nn.Module, stage: int, n_stages: int, layers: list[int]) -> nn.Module:
    """A copy of the (meta) model holding only what stage `stage` runs."""
    part = copy.deepcopy(model)
    first, last = stage == 0, stage == n_stages - 1
    for name in list(part.layers.keys()):
        if int(name) not in layers:
            del part.layers[name]
    needs_embedding = first or (last and (part.mtp is not None or part.output is None))
    if not needs_embedding:
        part.tok_embeddings = None
    if not last:
        part.norm, part.output, part.mtp = None, None, None
    else:
        part.register_forward_hook(_flatten_last_stage_output)
    return part


def split_model(model: nn.Module, dims: ParallelDims, pp_rank: int) -> tuple[list[int], list[nn.Module]]:
    """This rank's stage ids and their model parts (built from the meta model)."""
    n_stages = dims.pp * dims.stages_per_rank
    ranges = split_layers(model.args.n_layers, model.args.mtp_depth, n_stages)
    ids = stage_ids(pp_rank, dims)
    return ids, [build_stage_model(model, s, n_stages, ranges[s]) for s in ids]


def stage_io(args, dims: ParallelDims, stage: int, microbatch: int, seq_len: int, dtype: torch.dtype):
    """Meta tensors of a stage's inputs and outputs, given to PipelineStage so that it never runs a forward on
    placeholder data to infer them (such a forward would count tokens in the MoE balance statistics, and its
    .tolist() in the EP dispatch cannot run on meta tensors)."""
    n_stages = dims.pp * dims.stages_per_rank
    seq = seq_len // dims.cp  # context parallelism splits each sequence before the forward; hidden states are
    # also split by sequence parallelism between stages
    meta = torch.device("meta")
    hidden = torch.empty(microbatch, seq // dims.tp, args.dim, dtype=dtype, device=meta, requires_grad=True)
    inputs = torch.empty(microbatch, seq, dtype=torch.long, device=meta) if stage == 0 else hidden
    if stage < n_stages - 1:
        return inputs, hidden
    logits = torch.empty(microbatch, seq, args.vocab_size, dtype=dtype, device=meta, requires_grad=True)
    return inputs, (logits,) * (1 + args.mtp_depth)


def build_schedule(
    parts: list[nn.Module],
    ids: list[int],
    dims: ParallelDims,
    pp_mesh: DeviceMesh,
    device: torch.device,
    loss_fn,
    local_batch: int,
    seq_len: int,
    dtype: torch.dtype,
):
    """PipelineStages for this rank's parts and the configured schedule; loss_fn(output, target) runs last."""
    n_stages = dims.pp * dims.stages_per_rank
    group = pp_mesh.get_group()
    microbatch = local_batch // dims.pp_microbatches
    stages = []
    for part, s in zip(parts, ids):
        inputs, outputs = stage_io(part.args, dims, s, microbatch, seq_len, dtype)
        stages.append(
            PipelineStage(part, s, n_stages, device, input_args=inputs, output_args=outputs, group=group)
        )
    cls = SCHEDULES[dims.pp_schedule]
    # scale_grads=False: the loss is already normalised by the step's global valid-token count
    if issubclass(cls, PipelineScheduleMulti):
        return cls(stages, n_microbatches=dims.pp_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages[0], n_microbatches=dims.pp_microbatches, loss_fn=loss_fn, scale_grads=False)


class TiedEmbeddingSync:
    """Sums the gradients of the first stage's embedding and the last stage's copy (the same weight)."""

    def __init__(self, parts: list[nn.Module], ids: list[int], dims: ParallelDims, world: DeviceMesh):
        n_stages = dims.pp * dims.stages_per_rank
        self.first = next((p for p, s in zip(parts, ids) if s == 0), None)
        self.last = next((p for p, s in zip(parts, ids) if s == n_stages - 1), None)
        # every rank must agree on the groups: decide from the model arguments and the schedule only
        args = parts[0].args
        self.enabled = dims.pp > 1 and (args.mtp_depth > 0 or args.tie_embeddings)
        self.group = None
        if not self.enabled or dims.pp_schedule == "ZBV":
            return  # nothing to share, or the V puts the first and last stages on one rank: a local sum
        pp_ranks = world.mesh.movedim(0, -1).reshape(-1, dims.pp)  # (other coordinates, pp)
        pairs = [[int(r[0]), int(r[-1])] for r in pp_ranks]
        self.group, _ = dist.new_subgroups_by_enumeration(pairs)

    def copies(self) -> list[torch.Tensor]:
        """Parameters of the last stage's copy (to count once in the gradient norm)."""
        if not self.enabled or self.last is None:
            return []
        return list(self.last.tok_embeddings.parameters())

    @torch.no_grad()
    def sync(self) -> None:
        if not self.enabled:
            return
        holders = [p for p in (self.first, self.last) if p is not None]
        if not holders:
            return
        grads = [[_local(p.grad) for p in h.tok_embeddings.parameters()] for h in holders]
        if len(holders) == 2:  # both on this rank
            for a, b in zip(*grads):
                a.add_(b)
                b.copy_(a)
            return
        for g in grads[0]:
            dist.all_reduce(g, group=self.group)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
