"""DeepSeekMoE: a router, routed experts run as one grouped GEMM, and shared experts (DeepSeek-V3 section 2.1.2).

Suffix legend for locals: T tokens (bsz * seqlen), D dim, E routed experts, K experts per token (top-k),
G expert groups, I expert hidden size, N = T * K routed token copies, B sequences, S sequence length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from titan_dsv3.models.args import ModelArgs
from titan_dsv3.models.attention import init_normal_


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, std: float) -> None:
        for lin in (self.w1, self.w2, self.w3):
            init_normal_(lin.weight, std)


class Router(nn.Module):
    """Scores tokens against experts and picks top-k, group-limited when n_expert_groups > 1.

    Selection uses score + expert_bias (the aux-loss-free balancing bias); gate weights use the unbiased score.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_experts = args.n_routed_experts
        self.topk = args.n_activated_experts
        self.n_groups = args.n_expert_groups
        self.n_limited_groups = args.n_limited_groups
        self.score_func = args.score_func
        self.group_score = args.group_score
        self.route_norm = args.route_norm
        self.route_scale = args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        # Not a parameter: moved by the load-balance rule after each optimizer step, saved with the model.
        self.register_buffer("expert_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns gate weights (T, K) fp32, expert ids (T, K) int64 and the scores (T, E) fp32."""
        with torch.autocast(
            x_TD.device.type, enabled=False
        ):  # routing decisions in fp32, also under autocast
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.softmax(dim=-1) if self.score_func == "softmax" else logits_TE.sigmoid()
        choice_TE = scores_TE + self.expert_bias
        if self.n_groups > 1:
            choice_TGe = choice_TE.unflatten(-1, (self.n_groups, -1))  # (T, G, E // G)
            if self.group_score == "max":
                group_scores_TG = choice_TGe.amax(dim=-1)
            else:
                group_scores_TG = choice_TGe.topk(2, dim=-1).values.sum(dim=-1)
            top_groups = group_scores_TG.topk(self.n_limited_groups, dim=-1).indices
            keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, top_groups, True)
            choice_TE = choice_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).flatten(1)
        ids_TK = choice_TE.topk(self.topk, dim=-1).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.route_norm:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return weights_TK * self.route_scale, ids_TK, scores_TE

    def init_weights(self, std: float) -> None:
        init_normal_(self.weight, std)
        self.expert_bias.zero_()


def _use_grouped_mm(x: torch.Tensor) -> bool:
    # torch._grouped_mm: CUDA kernels take bf16 only; CPU runs fp32 and bf16 eagerly but compiles only bf16.
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.dtype == torch.bfloat16:
        return True
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _local_shard(w: torch.Tensor) -> torch.Tensor:
    """Expert parallelism hands this module a slice of the experts as a distributed tensor: compute with its
    local shard (a plain tensor passes through)."""
    # asked of the class: under torch.compile, hasattr on the tensor itself does not see DTensor's methods
    return w.to_local() if hasattr(type(w), "to_local") else w


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights: w1, w3 (E, I, D) and w2 (E, D, I)."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND: tokens sorted by expert; counts_E: tokens per expert (on device). Returns (N, D)."""
        return self.ffn(x_ND, counts_E)

    def routed(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, order_N: torch.Tensor, counts_E: torch.Tensor
    ) -> torch.Tensor:
        """sum_k w_tk * expert_tk(x_t) for every token: the N = T K copies in expert order (order_N: copy indices
        t K + k sorted by expert, counts_E copies an expert) through the experts, back in (token, k) order,
        weighted and summed. Returns (T, D). A second forward method (FSDP registers it as one)."""
        topk, dim = weights_TK.shape[1], x_TD.shape[1]
        y_ND = self.ffn(x_TD[order_N // topk], counts_E)
        y_TKD = torch.empty_like(y_ND).index_copy_(0, order_N, y_ND).view(-1, topk, dim)
        return torch.bmm(weights_TK.to(y_TKD.dtype).unsqueeze(1), y_TKD).squeeze(1)

    def ffn(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The experts' math on copies sorted by expert (forward's; routed calls it without FSDP's hooks)."""
        device_type = x_ND.device.type
        if torch.is_autocast_enabled(device_type):  # grouped_mm has no autocast rule: cast as a linear would
            x_ND = x_ND.to(torch.get_autocast_dtype(device_type))
        w1, w2, w3 = (_local_shard(w) for w in (self.w1, self.w2, self.w3))
        if _use_grouped_mm(x_ND):
            return grouped_swiglu(x_ND, counts_E, w1, w2, w3)
        return looped_swiglu(x_ND, counts_E, w1, w2, w3)

    def init_weights(self, std: float) -> None:
        for w in (self.w1, self.w2, self.w3):
            init_normal_(w, std)


def grouped_swiglu(x_ND, counts_E, w1_EID, w2_EDI, w3_EID) -> torch.Tensor:
    """One grouped GEMM per projection; offsets stay on the device (no host sync)."""
    offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
    w1, w2, w3 = w1_EID.to(x_ND.dtype), w2_EDI.to(x_ND.dtype), w3_EID.to(x_ND.dtype)
    h_NI = F.silu(torch._grouped_mm(x_ND, w1.transpose(-2, -1), offs=offs_E))
    h_NI = h_NI * torch._grouped_mm(x_ND, w3.transpose(-2, -1), offs=offs_E)
    return torch._grouped_mm(h_NI, w2.transpose(-2, -1), offs=offs_E)


@torch.compiler.disable  # its loop over host counts: never traced (compile.moe_one_graph captures .tolist())
def looped_swiglu(x_ND, counts_E, w1_EID, w2_EDI, w3_EID) -> torch.Tensor:
    """Reference path: a Python loop over experts (one host sync for the counts)."""
    out_ND = torch.zeros_like(x_ND)
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        n = int(n)
        if n == 0:
            continue
        x = x_ND[start : start + n]
        h = F.silu(x @ w1_EID[e].T.to(x.dtype)) * (x @ w3_EID[e].T.to(x.dtype))
        out_ND[start : start + n] = h @ w2_EDI[e].T.to(x.dtype)
        start += n
    return out_ND


def route_locally(experts, x_TD, weights_TK, ids_TK, counts_E, shared=None) -> torch.Tensor:
    """sum_k w_tk * expert_k(x_t) for every token, all experts on this device: the copies sorted by expert (token
    order kept inside a group) through one grouped GEMM, back in (token, k) order, weighted and summed; plus
    shared(x_t) when shared experts are given (a route may run them where it would otherwise wait)."""
    order_N = ids_TK.flatten().argsort(stable=True)
    out_TD = experts.routed(x_TD, weights_TK, order_N, counts_E)
    return out_TD if shared is None else out_TD + shared(x_TD)


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on x whose backward also sends a gradient of ``scale`` into aux_loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux_loss: torch.Tensor, scale: float):
        ctx.scale = scale
        ctx.save_for_backward(aux_loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.scale), None


class MoE(nn.Module):
    """Routed experts (grouped GEMM) plus shared experts, with token counts kept for load balancing."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_experts = args.n_routed_experts
        self.topk = args.n_activated_experts
        self.capacity_factor = args.capacity_factor
        self.gate = Router(args)
        self.experts = GroupedExperts(args.n_routed_experts, args.dim, args.moe_inter_dim)
        self.shared_experts = (
            FeedForward(args.dim, args.n_shared_experts * args.moe_inter_dim)
            if args.n_shared_experts > 0
            else None
        )
        # Tokens routed to each expert since the last load-balance update (summed over micro-batches).
        self.register_buffer(
            "tokens_per_expert", torch.zeros(args.n_routed_experts, dtype=torch.float32), persistent=False
        )
        # Sequence-wise balance loss: its gradient weight is alpha / (sequences in the global batch), set by the
        # trainer; 0 turns it off. The last value (mean over this micro-batch's sequences) is kept for metrics.
        self.balance_loss_scale = 0.0
        self.last_balance_loss: torch.Tensor | None = None
        # Router entropy (mean over tokens, normalised to [0, 1]) is measured only when the trainer asks for it.
        self.record_stats = False
        self.last_router_entropy: torch.Tensor | None = None
        # How token copies reach the experts and come back; expert parallelism puts its own in place.
        self.route_tokens = route_locally

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, dim = x.shape
        x_TD = x.reshape(-1, dim)
        weights_TK, ids_TK, scores_TE = self.gate(x_TD)
        if self.record_stats:
            with torch.no_grad():
                p_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
                ent = -(p_TE * p_TE.clamp_min(1e-20).log()).sum(-1).mean() / math.log(self.n_experts)
                self.last_router_entropy = ent

        ids_N = ids_TK.flatten()
        counts_E = torch.zeros(self.n_experts, dtype=torch.int64, device=x.device)
        counts_E.scatter_add_(0, ids_N, torch.ones_like(ids_N))
        if self.training:
            # Recomputation under activation checkpointing counts a layer twice; every use of the counts is
            # invariant to a per-layer scale (sign of count - mean, max/mean, entropy), and detecting the
            # recompute would break the compiled graph in three.
            with torch.no_grad():
                self.tokens_per_expert += counts_E.to(self.tokens_per_expert.dtype)
        if self.capacity_factor > 0:
            weights_TK = self._drop_over_capacity(weights_TK, ids_N, counts_E)

        out_TD = self.route_tokens(self.experts, x_TD, weights_TK, ids_TK, counts_E, self.shared_experts)
        out = out_TD.view(bsz, seqlen, dim)
        if self.training and self.balance_loss_scale > 0:
            loss = self.sequence_balance_loss(scores_TE.view(bsz, seqlen, -1), ids_TK.view(bsz, seqlen, -1))
            self.last_balance_loss = loss.detach() / bsz
            out = _AttachAuxLoss.apply(out, loss, self.balance_loss_scale)
        return out

    def sequence_balance_loss(self, scores_BSE: torch.Tensor, ids_BSK: torch.Tensor) -> torch.Tensor:
        """Sum over sequences of sum_i f_i P_i (DeepSeek-V3 eq. 17-20); the caller scales by alpha / sequences."""
        bsz, seqlen, n_exp = scores_BSE.shape
        probs_BSE = scores_BSE / scores_BSE.sum(dim=-1, keepdim=True)
        p_BE = probs_BSE.mean(dim=1)
        hits_BE = torch.zeros(bsz, n_exp, device=scores_BSE.device, dtype=scores_BSE.dtype)
        hits_BE.scatter_add_(
            1, ids_BSK.flatten(1), torch.ones_like(ids_BSK.flatten(1), dtype=scores_BSE.dtype)
        )
        f_BE = hits_BE * n_exp / (self.topk * seqlen)
        return (f_BE * p_BE).sum()

    def _drop_over_capacity(self, weights_TK, ids_N, counts_E) -> torch.Tensor:
        """Zero the gate of copies past an expert's capacity (earlier tokens win), all on device.

        The dropped copies still pass through the grouped GEMM with a zero gate: this keeps shapes static and
        needs no host sync; it changes the numerics (as in GShard/Switch) but not the compute.
        """
        n = ids_N.numel()
        capacity = max(1, int(self.capacity_factor * n / self.n_experts + 0.999999))
        order_N = ids_N.argsort(stable=True)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_sorted = torch.arange(n, device=ids_N.device) - starts_E[ids_N[order_N]]
        rank_N = torch.empty_like(rank_sorted).scatter_(0, order_N, rank_sorted)
        keep_TK = (rank_N < capacity).view_as(weights_TK)
        return weights_TK * keep_TK

    def init_weights(self, std: float) -> None:
        self.gate.init_weights(std)
        self.experts.init_weights(std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std)
        self.tokens_per_expert.zero_()
