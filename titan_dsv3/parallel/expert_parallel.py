"""Expert parallelism: each of the `ep` ranks holds E / ep routed experts and computes every token routed to them.

ExpertParallel takes the place of MoE.route_tokens (models/moe.py: route_locally). Per MoE layer:
  plan:     each token is sent once to every rank that holds one of its K experts, not once per expert: with
            top-6 of 64 experts the cross-rank bytes fall 3.0x at EP 2, 1.8x at EP 4, 1.3x at EP 8 (expected
            ranks a token reaches). One exchange of small integers gives every split size, read in one
            device->host copy (all_to_all_single takes host ints); the host waits for that copy only.
  dispatch: one all_to_all_single of the token rows with, appended to each row, its gate weights and local
            expert ids for that rank (-1 and 0 where the copy belongs to another rank). The shared experts are
            computed while this exchange is in flight (its wait comes after them), so a rank that arrives first
            computes instead of idling. One exchange, not one for the rows and one for the rest: inductor
            orders independent collectives as it likes, and two ranks running differently specialised graphs
            then paired the wrong ones (seen on CPU with PP 2 x EP 2: gloo's 'collective mismatch');
  compute:  the received copies grouped by local expert through the grouped GEMM (the weights are DTensors
            Shard(0) on the EP mesh; the model takes their local shards);
  combine:  each received row's copies weighted and summed where they were computed (gathered from expert
            order, no slot buffer), the sums sent back (again one row per token and rank) and added up per token.
With compile.moe_one_graph the sizes are read inside the compiled graph instead (unbacked ints, one blocking
copy), so the route adds no graph break. parallelism.expert_route = padded (_exchange_padded) reads nothing on the
host: every rank sends every peer T rows and the grouped GEMM takes room for every copy they could hold.
The exchanges are the autograd-aware functional collectives, so backward runs the reverse exchanges; the gate
weights get their gradient through the dispatch of the weights. No atomics: gathers and sums (sum_copies) keep it
deterministic.

Legend: T tokens here, K experts per token, E experts, El = E / ep local experts, ep EP ranks, P rows sent
(token, rank pairs), R rows received, M expert copies received.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

# Local expert ids travel in the rows' dtype (_exchange), bf16 included, where integers are exact up to 256.
MAX_LOCAL_EXPERTS = 256


def _wait(t: torch.Tensor) -> torch.Tensor:
    return funcol.wait_tensor(t) if isinstance(t, funcol.AsyncCollectiveTensor) else t


def _a2a_wait(t: torch.Tensor) -> torch.Tensor:
    """The wait of _a2a_start's exchange: the stream that uses t waits for the exchange here, not before."""
    return torch.ops._c10d_functional.wait_tensor(t)


def ranks_hit(ids_TK: torch.Tensor, n_local: int, ep: int) -> torch.Tensor:
    """(T, ep) bool: whether token t has an expert on rank r (experts are split over ranks in order)."""
    hit_TR = torch.zeros(ids_TK.shape[0], ep, dtype=torch.bool, device=ids_TK.device)
    return hit_TR.scatter_(1, ids_TK // n_local, True)


class _SumCopies(torch.autograd.Function):
    """out_RD[r] = sum over slots s with pos_RS[r, s] >= 0 of w_RS[r, s] * y_MD[pos_RS[r, s]] (w = 1 when None).

    The copies y_MD come in another order (expert order) than their rows; cell_M[m] = r * S + s is copy m's slot
    (pos_RS inverted). Forward gathers each row's copies and sums them, which inductor fuses into one reduction:
    no (R, S, D) buffer to zero, fill and sum. Backward is gathers too: each copy's gradient is its row's times its
    weight, and each weight's gradient is that row's gradient dotted with the copy. No atomics: deterministic."""

    @staticmethod
    def forward(ctx, y_MD, w_RS, pos_RS, cell_M):
        ok_RS = pos_RS >= 0
        coef_RS = ok_RS.to(y_MD.dtype) if w_RS is None else torch.where(ok_RS, w_RS.to(y_MD.dtype), 0)
        ctx.save_for_backward(y_MD, w_RS, pos_RS, cell_M)
        ctx.w_dtype = None if w_RS is None else w_RS.dtype
        return (y_MD[pos_RS.clamp(min=0)] * coef_RS[..., None]).sum(1)

    @staticmethod
    def backward(ctx, g_RD):
        y_MD, w_RS, pos_RS, cell_M = ctx.saved_tensors
        n_slots = pos_RS.shape[1]
        g_MD = g_RD[cell_M // n_slots]
        grad_w = None
        if w_RS is not None:
            g_MD = g_MD * w_RS.flatten()[cell_M].to(g_MD.dtype)[:, None]
            ok_RS = pos_RS >= 0
            acc = torch.promote_types(y_MD.dtype, torch.float32)  # bf16 products summed in fp32
            dots_RS = (g_RD[:, None, :].to(acc) * y_MD[pos_RS.clamp(min=0)].to(acc)).sum(-1)
            grad_w = torch.where(ok_RS, dots_RS, 0).to(ctx.w_dtype)
        return g_MD, grad_w, None, None


def sum_copies(y_MD, w_RS, cell_M, n_rows: int, n_slots: int, valid_M=None) -> torch.Tensor:
    """(n_rows, D): each row's copies, weighted by w_RS (or not, when None) and summed; copy m sits in slot cell_M[m]
    (= row * n_slots + slot) of its row, and a row's other slots are empty. valid_M (bool, optional): copies to
    leave out (rows of y_MD that must be finite, as a product with 0 still reads them); cell_M stays one slot per
    copy."""
    copy_M = torch.arange(cell_M.numel(), device=y_MD.device)
    if valid_M is not None:
        copy_M = torch.where(valid_M, copy_M, -1)
    pos = torch.full((n_rows * n_slots,), -1, dtype=torch.long, device=y_MD.device)
    pos = pos.scatter(0, cell_M, copy_M)
    return _SumCopies.apply(y_MD, w_RS, pos.view(n_rows, n_slots), cell_M)


class ExpertParallel:
    """Shards a MoE's routed experts over `mesh` and routes its tokens with all-to-all exchanges."""

    def __init__(self, mesh: DeviceMesh, padded: bool = False):
        self.mesh = mesh
        self.group = mesh.get_group()
        self.ep = mesh.size()
        # the host read in flight, (host tensor, CUDA event or None): kept here rather than returned, so the code
        # compiled between _start_host_read and _finish_host_read never holds the event
        self._pending = None
        # compile.moe_one_graph: under torch.compile, read the sizes inside the graph (no graph break)
        self.sizes_in_graph = False
        # parallelism.expert_route = "padded": fixed-size exchanges, no host read (_exchange_padded)
        self.padded = padded

    def apply(self, moe: nn.Module) -> None:
        experts = moe.experts
        n_local = experts.w1.shape[0] // self.ep
        if n_local > MAX_LOCAL_EXPERTS:
            raise ValueError(
                f"{n_local} experts a rank: local expert ids are not exact in bf16 (the EP exchange sends them"
                " beside the rows); raise parallelism.expert_parallel_degree"
            )
        for name, param in list(experts.named_parameters(recurse=False)):
            dt = distribute_tensor(param.data, self.mesh, [Shard(0)], src_data_rank=None)
            experts.register_parameter(name, nn.Parameter(dt, requires_grad=param.requires_grad))
        moe.route_tokens = self

    def _a2a(self, t: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        return _wait(funcol.all_to_all_single_autograd(t, out_splits, in_splits, self.group))

    def _a2a_start(self, t: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        """The autograd-aware exchange without its wait (funcol's traced form waits at once): work queued before
        _a2a_wait overlaps the exchange, in eager and in compiled code."""
        return torch.ops._c10d_functional_autograd.all_to_all_single(
            t, out_splits, in_splits, self.group.group_name
        )

    @torch.compiler.disable
    def _start_host_read(self, t: torch.Tensor) -> None:
        """Copy t to (pinned) host memory without waiting; an event marks the copy's end."""
        if t.is_cuda:
            done = torch.cuda.Event()
            self._pending = (t.to("cpu", non_blocking=True), done)
            done.record()
        else:
            self._pending = (t, None)

    @torch.compiler.disable
    def _finish_host_read(self) -> list[int]:
        """The exchange's 2 x ep + 1 sizes (__call__'s sizes_S), read on the host. Only these reach compiled code:
        the per-expert counts would become symbols that dynamo specialises and recompiles on whenever one is 0 or
        1 (common)."""
        host, done = self._pending
        self._pending = None
        if done is not None:
            done.synchronize()  # this copy only, not the work queued after it
        return host.tolist()

    def __call__(self, experts, x_TD, weights_TK, ids_TK, counts_E, shared=None) -> torch.Tensor:
        """The same result as route_locally on the full set of experts: sum_k w_tk * expert_k(x_t) (+ shared)."""
        ep, n_local = self.ep, counts_E.numel() // self.ep
        hit_TR = ranks_hit(ids_TK, n_local, ep)
        if self.padded:
            return _exchange_padded(self, experts, shared, x_TD, weights_TK, ids_TK, hit_TR, n_local)
        send_R = hit_TR.sum(0)
        # to each peer: the rows I send it, then the copies I route to each of its experts
        plan_out = torch.cat([send_R.view(ep, 1), counts_E.view(ep, n_local).to(send_R.dtype)], dim=1)
        plan_in = _wait(funcol.all_to_all_single(plan_out.flatten(), None, None, self.group))
        plan_in = plan_in.view(ep, 1 + n_local)
        # the exchange's sizes: rows I send each rank, rows each rank sends me, copies I compute, (2 ep + 1,)
        sizes_S = torch.cat([send_R, plan_in[:, 0], plan_in[:, 1:].sum().view(1)])
        if self.sizes_in_graph and torch.compiler.is_compiling():
            # one copy inside the graph; the sizes become unbacked symbols (never specialised on 0 or 1)
            sizes = sizes_S.cpu().tolist()
            for s in sizes:
                torch._check_is_size(s)
            exchange = _exchange
        else:
            # the one device->host read of the layer
            self._start_host_read(sizes_S)
            sizes = self._finish_host_read()
            # Dynamo specialises a size of 0 or 1, and 0-row graphs fail: a compiled 0-row grouped GEMM's
            # backward on CPU (torch 2.13, tests/distributed/test_compile_ep.py), an exchange lowered as 0 rows on
            # GPU (torch 2.11). Such a layer exchanges eagerly. It takes a layer that sends a rank (almost)
            # nothing; a split is ~16K rows at 16B, yet a 50-step 16B run on 2 GPUs took this path at least once.
            exchange = _exchange_eager if min(sizes) < 2 else _exchange
        in_splits, out_splits, n_copies = sizes[:ep], sizes[ep : 2 * ep], sizes[2 * ep]
        return exchange(
            self, experts, shared, x_TD, weights_TK, ids_TK, hit_TR, plan_in, in_splits, out_splits, n_copies
        )


def _send_rows(x_TD, weights_TK, ids_TK, tok, rank, n_local: int) -> torch.Tensor:
    """The rows to send for (token, rank) pairs (tok and rank broadcast): the token's row, then its K gate weights
    and local expert ids on that rank (0 and -1 where the copy belongs to another rank); (..., C = D + 2 K). All in
    the rows' dtype: the weights multiply the experts' output in that dtype anyway, and the ids are exact (at most
    MAX_LOCAL_EXPERTS a rank); only the rows and the weights carry gradient."""
    ids = ids_TK[tok]
    here = ids // n_local == rank[..., None]
    w = torch.where(here, weights_TK[tok], 0.0)
    local = torch.where(here, ids - rank[..., None] * n_local, -1)
    dt = x_TD.dtype
    return torch.cat([x_TD[tok], w.to(dt), local.to(dt)], dim=-1)


def _split_rows(recv_RC, dim: int, topk: int):
    """Received rows (R, C) -> the token rows (R, D), gate weights (R, K) and local expert ids (R, K) as longs."""
    return recv_RC[:, :dim], recv_RC[:, dim : dim + topk], recv_RC[:, dim + topk :].detach().long()


def _exchange(
    ep_route, experts, shared, x_TD, weights_TK, ids_TK, hit_TR, plan_in, in_splits, out_splits, n_copies
):
    """Dispatch, compute and combine (module docstring) with the split sizes known on the host; plus the shared
    experts, computed during the dispatch."""
    (n_tok, topk), n_local = ids_TK.shape, plan_in.shape[1] - 1
    a2a = ep_route._a2a
    # the (rank, token) pairs in rank order, then token order
    pair_P = torch.argsort((~hit_TR).T.flatten().to(torch.int8), stable=True)[: sum(in_splits)]
    rank_P, tok_P = pair_P // n_tok, pair_P % n_tok
    send_PC = _send_rows(x_TD, weights_TK, ids_TK, tok_P, rank_P, n_local)
    recv_RC = ep_route._a2a_start(send_PC, out_splits, in_splits)
    shared_TD = shared(x_TD) if shared is not None else None  # on the GPU while the rows travel
    x_RD, w_RK, local_RK = _split_rows(_a2a_wait(recv_RC), x_TD.shape[1], topk)

    # the received copies grouped by local expert (then source rank, then row), through the grouped GEMM
    n_rows = x_RD.shape[0]
    key_M = torch.where(local_RK >= 0, local_RK, n_local).flatten()  # copies of other ranks sort last
    order_M = torch.argsort(key_M, stable=True)[:n_copies]
    y_MD = experts(x_RD[order_M // topk], plan_in[:, 1:].sum(0))
    # each received row's copies weighted and summed here, so one row per (token, rank) goes back; copy m sits in
    # slot order_M[m] of the (R, K) grid of received rows. Backward keeps only y_MD and the weights, as
    # route_locally's bmm does
    y_PD = a2a(sum_copies(y_MD, w_RK, order_M, n_rows, topk), in_splits, out_splits)
    # a token gets back one row from each of at most min(K, ep) ranks: summed in rank order
    tok_slots = min(topk, ep_route.ep)
    slot_P = (hit_TR.cumsum(1) - 1)[tok_P, rank_P]
    out_TD = sum_copies(y_PD, None, tok_P * tok_slots + slot_P, n_tok, tok_slots)
    return out_TD if shared_TD is None else out_TD + shared_TD


_exchange_eager = torch.compiler.disable(_exchange)


def _exchange_padded(ep_route, experts, shared, x_TD, weights_TK, ids_TK, hit_TR, n_local):
    """Dispatch, compute and combine with every size fixed by T, so that nothing is read on the host and a MoE
    block compiles to one graph. Each rank sends every peer a block of T rows: first the tokens that have an
    expert there (token order), then the others, whose local ids are all -1 (they make no copies). With top-6 of
    64 experts a token reaches 1.98 of 2 ranks on average (3.34 of 4, 4.54 of 8): the exchanges carry 1.01x the
    bytes of _exchange at EP 2, 1.20x at EP 4, 1.76x at EP 8. The cost is memory: the grouped GEMM's input is
    sized for every received row's K copies (ep * T * K rows, ep times the expected copies), and so are the
    activations it keeps for backward. Rows past the real copies are never computed (the grouped GEMM's
    offsets end at the real ones): they are zeroed in its output and fed from a zero row, so neither they nor
    their gradient reach a real row. Every EP rank must route the same T tokens a step (the same local batch and
    sequence, as training gives).
    """
    (n_tok, topk), dim, ep = ids_TK.shape, x_TD.shape[1], ep_route.ep
    # block r: the tokens that hit rank r first, (ep, T) token ids; each block is a permutation of the tokens
    tok_RT = torch.argsort((~hit_TR).T.to(torch.int8), dim=1, stable=True)
    rank_R1 = torch.arange(ep, device=ids_TK.device)[:, None]
    send_QC = _send_rows(x_TD, weights_TK, ids_TK, tok_RT, rank_R1, n_local).flatten(0, 1)  # Q = ep * T
    splits = [n_tok] * ep
    recv_QC = ep_route._a2a_start(send_QC, splits, splits)
    shared_TD = shared(x_TD) if shared is not None else None  # on the GPU while the rows travel
    x_QD, w_QK, local_QK = _split_rows(_a2a_wait(recv_QC), dim, topk)

    # all ep * T * K copy slots sorted by local expert; the other ranks' (-1) sort last and are left out
    n_rows = x_QD.shape[0]
    key_M = torch.where(local_QK >= 0, local_QK, n_local).flatten()
    order_M = torch.argsort(key_M, stable=True)
    key_sorted_M = key_M[order_M]
    valid_M = key_sorted_M < n_local
    ends_E = torch.searchsorted(key_sorted_M, torch.arange(n_local, device=key_M.device), right=True)
    counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
    # left-out copies read a zero row (n_rows), so the grouped GEMM's unwritten rows send no gradient to real ones
    x_in = torch.cat([x_QD, x_QD.new_zeros(1, dim)])[torch.where(valid_M, order_M // topk, n_rows)]
    # the rows past the real copies were never written (nor will their dx be): zeroed before anything reads them
    y_MD = torch.where(valid_M[:, None], experts(x_in, counts_E), 0)
    sums_QD = sum_copies(y_MD, w_QK, order_M, n_rows, topk, valid_M)
    y_QD = _a2a_wait(ep_route._a2a_start(sums_QD, splits, splits))
    # block r of what comes back: rank r's sums for my tokens, in the order I sent them
    rank_Q = torch.arange(ep, device=ids_TK.device).repeat_interleave(n_tok)
    tok_Q = tok_RT.flatten()
    out_TD = sum_copies(y_QD, None, tok_Q * ep + rank_Q, n_tok, ep, hit_TR[tok_Q, rank_Q])
    return out_TD if shared_TD is None else out_TD + shared_TD


def apply_ep(model: nn.Module, mesh: DeviceMesh, padded: bool = False) -> None:
    """Expert parallelism over `mesh` for every MoE of this model (part), MTP blocks included; padded: the
    fixed-size route (parallelism.expert_route, _exchange_padded)."""
    for moe in model.moe_layers():
        ExpertParallel(mesh, padded).apply(moe)
