"""Multi-head latent attention (MLA, DeepSeek-V2 section 2.1).

Queries: x -> wq (or wq_a -> q_norm -> wq_b) -> per head [q_nope (qk_nope_head_dim) | q_pe (qk_rope_head_dim)].
Keys/values: x -> wkv_a -> [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)]; c_kv -> kv_norm -> wkv_b -> per head
[k_nope | v]. The RoPE key k_pe is one vector per token shared by every head. The tensors are viewed with -1 heads
so that a tensor-parallel shard of the head dimension needs no change here.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from titan_dsv3.models.args import ModelArgs
from titan_dsv3.models.rope import apply_rope, softmax_scale

# Epsilon of the latent norms (q_norm, kv_norm): fixed at 1e-6 in DeepSeek's code and HF's, whatever norm_eps is.
LATENT_NORM_EPS = 1e-6


def init_normal_(w: torch.Tensor, std: float) -> None:
    """Normal(0, std) truncated at 3 std: the initialisation of every weight matrix (DeepSeek-V3: std 0.006)."""
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled by a learned weight in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


# On CUDA prefer cuDNN: flash has no kernel for qk 192 / v 128, and on H100 cuDNN runs these shapes at ~400
# TFLOP/s forward + backward against ~41 for the memory-efficient kernel (B2 H16 S4096).
_CUDA_SDPA_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def _sdpa_backends(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    try:
        return sdpa_kernel(_CUDA_SDPA_ORDER, set_priority=True)
    except TypeError:  # a torch without set_priority: the listed backends, default order
        return sdpa_kernel(_CUDA_SDPA_ORDER)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask=None
) -> torch.Tensor:
    """Causal attention. q, k: (bsz, seqlen, heads, qk_head_dim); v: (bsz, seqlen, heads, v_head_dim)."""
    with _sdpa_backends(q.device):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale
        )  # (bsz, heads, seqlen, v_head_dim)
    return out.transpose(1, 2)


def flex_attention_fn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask=None
) -> torch.Tensor:
    """Attention under a BlockMask (causal within each packed document). Shapes as sdpa_attention."""
    from titan_dsv3.models.masks import flex_attention

    out = flex_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


def triton_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask=None, k_pe=None, q_pe=None
) -> torch.Tensor:
    """The fused Triton MLA kernel (kernels/mla_attention.py); mask is the document bounds (2, bsz, seqlen) that
    the model computes once a step (mla_attention.document_bounds), or None.

    Takes full per-head q, k as the other backends do, or q_nope, k_nope and the shared rope key k_pe apart. MLA
    itself calls kernels/mla_attention_rope.py instead (q before RoPE, kv whole, gradients returned whole).
    """
    from titan_dsv3.kernels.mla_attention import mla_attention

    return mla_attention(q, k, v, scale=scale, doc_bounds=mask, k_pe=k_pe, q_pe=q_pe)


ATTENTION_BACKENDS = {"sdpa": sdpa_attention, "flex": flex_attention_fn, "triton": triton_attention}


class MLA(nn.Module):
    """Multi-head latent attention with decoupled RoPE."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.qk_head_dim = args.qk_head_dim
        self.v_head_dim = args.v_head_dim
        self.softmax_scale = softmax_scale(args)
        self.attn_fn = ATTENTION_BACKENDS[args.attn_impl]

        if self.q_lora_rank == 0:
            self.wq = nn.Linear(args.dim, args.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(args.dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(self.q_lora_rank, args.n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(args.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(
            self.kv_lora_rank, args.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.wo = nn.Linear(args.n_heads * self.v_head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, mask=None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        cos_sin = cos_sin[:seqlen]  # callers may pass a longer table (sequence parallelism gathers x first)
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(bsz, seqlen, -1, self.qk_head_dim)  # (bsz, seqlen, n_heads, qk_head_dim)

        kv = self.wkv_a(x)  # (bsz, seqlen, kv_lora_rank + qk_rope_head_dim)
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos_sin)  # (bsz, seqlen, 1, qk_rope_head_dim)
        kv = self.wkv_b(self.kv_norm(c_kv))
        kv = kv.view(
            bsz, seqlen, -1, self.qk_nope_head_dim + self.v_head_dim
        )  # (bsz, seqlen, n_heads, nope + v)

        if self.attn_fn is triton_attention:
            # The fused kernel takes q before RoPE and kv whole, reads the shared k_pe once (never per head), and
            # returns q's and kv's gradients whole (kernels/mla_attention_rope.py).
            from titan_dsv3.kernels.mla_attention_rope import mla_attention_rope

            out = mla_attention_rope(
                q, kv, k_pe, cos_sin, scale=self.softmax_scale, nope=self.qk_nope_head_dim, doc_bounds=mask
            )
            return self.wo(out.flatten(2))
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos_sin)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        n_local_heads = k_nope.shape[2]
        q = torch.cat([q_nope, q_pe], dim=-1)  # (bsz, seqlen, n_heads, qk_head_dim)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, n_local_heads, -1)], dim=-1)
        out = self.attn_fn(q, k, v, self.softmax_scale, mask)  # (bsz, seqlen, n_heads, v_head_dim)
        return self.wo(out.flatten(2))

    def init_weights(self, std: float) -> None:
        for name in ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo"):
            lin = getattr(self, name, None)
            if lin is not None:
                init_normal_(lin.weight, std)
        for norm in (getattr(self, "q_norm", None), self.kv_norm):
            if norm is not None:
                norm.reset_parameters()
