"""Context parallelism: each of the cp ranks of a data-parallel rank holds 1/cp of every sequence.

The sequence is cut into 2 x cp chunks and rank r keeps chunks r and 2cp - 1 - r (head-tail load balancing: every
rank gets the same amount of causal-attention work). Everything indexed by position is split the same way before
the forward: token ids, loss targets, MTP input ids, and the RoPE table. Attention must see all keys:
  CUDA: torch.distributed.tensor.experimental.context_parallel, which turns SDPA into ring attention
        (flash / memory-efficient / cuDNN kernels) and does the head-tail split itself;
  CPU:  torch's ring kernels are CUDA-only, so SDPA all-gathers K and V over cp (backward: reduce-scatter) and
        masks by the true positions. Same results, O(seq) memory for K and V; meant for tests and debugging.
Only SDPA is supported (configs with FlexAttention or the Triton kernel are refused by ParallelDims.check_model).

MTP inputs and targets are shifted by k positions, which would cross chunk boundaries after the split; so the
trainer shifts them on whole sequences first (`mtp_next_ids`, `stacked_targets`) and splits the results.
"""

from __future__ import annotations

import contextlib
import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.attention import SDPBackend

from titan_dsv3.models import attention
from titan_dsv3.optim import losses

# newer torch (2.13 here) names the autograd all-gather all_gather_single_autograd and warns on the old name;
# the old name stays the fallback for torch versions without the new one
_all_gather_autograd = (
    getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
)


def mtp_next_ids(inputs: torch.Tensor, depth: int) -> torch.Tensor:
    """(bsz, seqlen, depth): for MTP depth k, the id k positions ahead (wrapping; those targets are ignored)."""
    return torch.stack([inputs.roll(-k, dims=1) for k in range(1, depth + 1)], dim=-1)


def stacked_targets(labels: torch.Tensor, depth: int) -> torch.Tensor:
    """(bsz, seqlen, 1 + depth): the main labels, then the labels of each MTP depth."""
    return torch.stack([labels] + [losses.mtp_labels(labels, k) for k in range(1, depth + 1)], dim=-1)


def stacked_loss_sums(output, targets: torch.Tensor) -> torch.Tensor:
    """losses.loss_sums for targets from `stacked_targets` (valid after any split along the sequence)."""
    logits = [output] if isinstance(output, torch.Tensor) else [output[0], *output[1]]
    return torch.stack([losses.cross_entropy_sum(lg, targets[..., k]) for k, lg in enumerate(logits)])


def head_tail_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Positions of the tokens rank `rank` keeps, in order."""
    chunk = seq_len // (2 * cp)
    pos = torch.arange(seq_len, device=device).view(2 * cp, chunk)
    return torch.cat([pos[rank], pos[2 * cp - 1 - rank]])


def _shard_inplace(t: torch.Tensor, seq_dim: int, positions: torch.Tensor) -> None:
    shard = t.index_select(seq_dim, positions)
    t.resize_(shard.shape)
    t.copy_(shard)


@contextlib.contextmanager
def _allgather_sdpa(mesh: DeviceMesh, q_pos: torch.Tensor, kv_pos: torch.Tensor):
    """Within the context, F.scaled_dot_product_attention attends over the keys of all cp ranks."""
    group = mesh.get_group()
    sdpa = F.scaled_dot_product_attention
    mask = q_pos[:, None] >= kv_pos[None, :]  # (local queries, all keys): causal by true position

    def cp_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or not is_causal:
            raise NotImplementedError("context parallelism supports causal SDPA without a mask")
        # (bsz, heads, local seq, d) -> (bsz, heads, seq, d), in the rank order of kv_pos
        k_all = _all_gather_autograd(k.contiguous(), gather_dim=2, group=group)
        v_all = _all_gather_autograd(v.contiguous(), gather_dim=2, group=group)
        return sdpa(q, k_all, v_all, attn_mask=mask, dropout_p=dropout_p, scale=scale, **kwargs)

    F.scaled_dot_product_attention = cp_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


@contextlib.contextmanager
def _ring_sdpa_backends():
    """Keep SDPA on the kernels torch's ring attention implements: flash and memory-efficient, and cuDNN where
    this torch has its ring version (2.13 does, 2.11 does not)."""
    from torch.distributed.tensor.experimental import context_parallel

    # the module where torch implements it (it moved between versions)
    ring = sys.modules[inspect.unwrap(context_parallel).__module__]
    saved = attention._CUDA_SDPA_ORDER
    unsupported = (
        set() if hasattr(ring, "_scaled_dot_product_ring_cudnn_attention") else {SDPBackend.CUDNN_ATTENTION}
    )
    unsupported.add(SDPBackend.MATH)
    attention._CUDA_SDPA_ORDER = [b for b in saved if b not in unsupported]
    try:
        yield
    finally:
        attention._CUDA_SDPA_ORDER = saved


@contextlib.contextmanager
def cp_context(mesh: DeviceMesh, parts: list[nn.Module], buffers: list[torch.Tensor], seq_dims: list[int]):
    """Split `buffers` (in place; they are not restored) and the parts' RoPE tables over cp, and make SDPA
    attend across ranks, for one forward + backward."""
    seq_len = buffers[0].shape[seq_dims[0]]
    saved = [part.rope_cache for part in parts]
    tables = [part.rope_cache[:seq_len].clone() for part in parts]  # split in place below
    for part, table in zip(parts, tables):
        part.rope_cache = table
    try:
        if mesh.device_type == "cuda":
            from torch.distributed.tensor.experimental import context_parallel

            everything = buffers + tables
            with (
                _ring_sdpa_backends(),
                context_parallel(
                    mesh,
                    buffers=everything,
                    buffer_seq_dims=seq_dims + [0] * len(tables),
                    no_restore_buffers=set(everything),
                ),
            ):
                yield
        else:
            rank, cp = mesh.get_local_rank(), mesh.size()
            device = buffers[0].device
            q_pos = head_tail_positions(seq_len, cp, rank, device)
            kv_pos = torch.cat([head_tail_positions(seq_len, cp, r, device) for r in range(cp)])
            for t, d in zip(buffers + tables, seq_dims + [0] * len(tables)):
                _shard_inplace(t, d, q_pos.to(t.device))
            with _allgather_sdpa(mesh, q_pos, kv_pos):
                yield
    finally:
        for part, table in zip(parts, saved):
            part.rope_cache = table
