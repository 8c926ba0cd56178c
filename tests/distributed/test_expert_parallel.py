"""The EP token route alone: plan, dispatch, grouped GEMM on local experts, weighted combine, with empty experts,
a rank that routes no tokens and a rank that receives none. Outputs and the gradients of the tokens, the gate
weights and the expert weights equal route_locally on the unsharded experts (shared experts included, computed
while the dispatch exchange is in flight); each token is sent once per rank."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launcher import run_ranks

pytestmark = pytest.mark.slow

E, D, I = 4, 8, 12  # noqa: E741  (grouped_mm wants rows of a multiple of 16 bytes)


def ep_matches_reference(ids_by_rank: list[list[int]], K: int, padded: bool = False) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from titan_dsv3.models.moe import FeedForward, GroupedExperts, route_locally
    from titan_dsv3.parallel import expert_parallel
    from titan_dsv3.parallel.expert_parallel import ExpertParallel, ranks_hit

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = GroupedExperts(E, D, I)
    ref.init_weights(0.5)
    holder = torch.nn.Module()  # what ExpertParallel.apply needs of a MoE: .experts and .route_tokens
    holder.experts = GroupedExperts(E, D, I)
    holder.experts.load_state_dict(ref.state_dict())
    ExpertParallel(init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)), padded).apply(holder)
    sent = []  # rows of each exchange this rank starts: tokens, their weights and ids, then the sums back
    order = []  # the shared experts must run between the dispatch's start and its wait
    route = holder.route_tokens
    # on CUDA the grouped GEMM leaves rows past the real copies unwritten, in y and in dx: NaN here
    if padded:
        computed = holder.experts.forward

        def unwritten_rows_nan(x, counts):
            n = int(counts.sum())
            x = x.clone()
            if x.requires_grad:
                x.register_hook(lambda g: torch.cat([g[:n], torch.full_like(g[n:], float("nan"))]))
            y = computed(x, counts)
            return torch.cat([y[:n], torch.full_like(y[n:], float("nan"))])

        holder.experts.forward = unwritten_rows_nan
    exchange, dispatch, wait = route._a2a, route._a2a_start, expert_parallel._a2a_wait
    route._a2a = lambda t, *splits: sent.append(t.shape[0]) or exchange(t, *splits)
    route._a2a_start = lambda t, *splits: (
        sent.append(t.shape[0]) or order.append("dispatch") or dispatch(t, *splits)
    )
    expert_parallel._a2a_wait = lambda t: order.append("wait") or wait(t)
    start, finish = route._start_host_read, route._finish_host_read
    route._start_host_read = lambda t: order.append("start") or start(t)
    route._finish_host_read = lambda: order.append("finish") or finish()
    shared = FeedForward(D, I)
    shared.init_weights(0.5)
    shared.register_forward_pre_hook(lambda *_: order.append("shared"))

    ids = torch.tensor(ids_by_rank[rank], dtype=torch.int64).view(-1, K)
    counts = torch.bincount(ids.flatten(), minlength=E)
    torch.manual_seed(1 + rank)
    x = torch.randn(ids.shape[0], D)
    w = torch.rand(ids.shape[0], K)
    r = torch.randn(ids.shape[0], D)
    x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
    w_ref, w_ep = w.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = route_locally(ref, x_ref, w_ref, ids, counts, shared)
    order.clear()
    y_ep = holder.route_tokens(holder.experts, x_ep, w_ep, ids, counts, shared)
    (y_ref * r).sum().backward()
    (y_ep * r).sum().backward()
    out = {}
    if len(x):
        out["y"] = (y_ep - y_ref).abs().max().item()
        out["x_grad"] = (x_ep.grad - x_ref.grad).abs().max().item()
        out["w_grad"] = (w_ep.grad - w_ref.grad).abs().max().item()
    local = E // world
    for name in ("w1", "w2", "w3"):
        full = getattr(ref, name).grad.clone()
        dist.all_reduce(full)  # the reference's weight gradient over every rank's tokens
        shard = getattr(holder.experts, name).grad.to_local()
        out[name] = (shard - full[rank * local : (rank + 1) * local]).abs().max().item()
    pairs = int(ranks_hit(ids, local, world).sum())  # (token, rank) pairs
    return {"errors": out, "rows_sent": sent[0], "pairs": pairs, "copies": ids.numel(), "order": order}


@pytest.mark.parametrize(
    "ids,k",
    [
        # rank 0: tokens routed within rank 0, across ranks, and twice to rank 1; expert 2 of rank 1 gets none
        ([[0, 1, 0, 3, 3, 1, 1, 3], [2, 3, 0, 2, 1, 2]], 2),
        ([[0, 3, 3, 0, 1, 0], []], 2),  # rank 1 routes nothing and still computes rank 0's copies
        ([[0, 1, 1, 0], [0, 1]], 2),  # rank 1's experts receive nothing
        # top-3 of 2 experts a rank: full and partial rows
        ([[0, 1, 3, 2, 3, 0, 1, 2, 0], [3, 2, 1, 0, 2, 3]], 3),
    ],
)
def test_ep_route_matches_local_route(ids, k):
    for rank in run_ranks(ep_matches_reference, 2, ids, k):
        assert all(e < 1e-5 for e in rank["errors"].values()), rank["errors"]  # NaN fails too
        # one row per token and rank, not per copy
        assert rank["rows_sent"] == rank["pairs"] <= rank["copies"]
        assert rank["order"] == ["start", "finish", "dispatch", "shared", "wait"]


@pytest.mark.parametrize(
    "ids,k",
    [
        ([[0, 1, 0, 3, 3, 1, 1, 3], [2, 3, 0, 2, 1, 2, 3, 3]], 2),  # within, across, twice to the other rank
        ([[0, 1, 1, 0], [0, 1, 0, 0]], 2),  # rank 1's experts receive nothing, expert 2 none anywhere
        ([[2, 3, 3, 2], [3, 2, 2, 3]], 2),  # rank 0's experts receive nothing: all its expert rows unwritten
        ([[0, 1, 3, 2, 3, 0, 1, 2, 0], [3, 2, 1, 0, 2, 3, 0, 1, 2]], 3),  # top-3 of 2 experts a rank
    ],
)
def test_padded_route_matches_local_route(ids, k):
    """parallelism.expert_route = padded: the same outputs and gradients with fixed-size exchanges (T rows to each
    rank) and no host read; the grouped GEMM's unwritten rows (NaN here) reach nothing."""
    for rank in run_ranks(ep_matches_reference, 2, ids, k, True):
        assert all(e < 1e-5 for e in rank["errors"].values()), rank["errors"]  # NaN fails too
        n_tok = len(ids[0]) // k
        assert rank["rows_sent"] == 2 * n_tok  # a block of T rows to each of the 2 ranks
        assert rank["order"] == ["dispatch", "shared", "wait", "dispatch", "wait"]  # no host read


def test_a_token_goes_once_to_each_rank():
    from titan_dsv3.parallel.expert_parallel import ranks_hit

    ids = torch.tensor([[0, 1], [0, 2], [3, 2], [1, 0]])  # 2 experts a rank
    hit = ranks_hit(ids, n_local=2, ep=2)
    assert hit.tolist() == [[True, False], [True, True], [False, True], [True, False]]
    assert int(hit.sum()) == 5 < ids.numel()  # 5 rows instead of 8 copies
