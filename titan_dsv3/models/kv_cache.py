"""Cached autoregressive inference for DeepSeekV3Model, reusing its modules and weights (model.py is unchanged).

MLA caches, per token and layer, only what its keys and values are made of: the normalised latent kv_norm(c_kv)
(kv_lora_rank numbers) and the RoPE key k_pe shared by all heads (qk_rope_head_dim numbers): 576 per token and
layer for DeepSeek-V3, against 2 x 128 heads x 192/128 = 40,960 for per-head K and V. wkv_b is absorbed
(DeepSeek-V2 section 2.1.3): its key half maps the no-RoPE queries into the latent space, its value half maps
the attention-weighted latent back to per-head values, so attention runs over the cached latent directly.

Shapes: b batch, s new positions, t cached positions, h heads, r kv_lora_rank, e qk_rope_head_dim,
d qk_nope_head_dim, v v_head_dim.
"""

from __future__ import annotations

import torch

from titan_dsv3.models.attention import MLA
from titan_dsv3.models.model import DeepSeekV3Model, TransformerBlock
from titan_dsv3.models.rope import apply_rope


class MLACache:
    """Per layer: the latent (b, max_len, r) and the RoPE key (b, max_len, e) of every position so far."""

    def __init__(self, model: DeepSeekV3Model, bsz: int, max_len: int, dtype: torch.dtype, device=None):
        a = model.args
        if max_len > a.max_seq_len:
            raise ValueError(
                f"max_len {max_len} exceeds model.max_seq_len = {a.max_seq_len} (the RoPE table)"
            )
        n = len(model.layers)
        self.latent = torch.zeros(n, bsz, max_len, a.kv_lora_rank, dtype=dtype, device=device)
        self.rope_key = torch.zeros(n, bsz, max_len, a.qk_rope_head_dim, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.latent.shape[2]

    def numbers_per_token_per_layer(self) -> int:
        return self.latent.shape[-1] + self.rope_key.shape[-1]


def mla_cached(
    attn: MLA,
    x: torch.Tensor,
    cos_sin: torch.Tensor,
    latent: torch.Tensor,
    rope_key: torch.Tensor,
    start: int,
) -> torch.Tensor:
    """MLA over x (b, s, dim) at positions [start, start + s), appending to this layer's cache in place."""
    bsz, seqlen, _ = x.shape
    end = start + seqlen
    q = attn.wq(x) if attn.q_lora_rank == 0 else attn.wq_b(attn.q_norm(attn.wq_a(x)))
    q = q.view(bsz, seqlen, -1, attn.qk_head_dim)  # (b, s, h, d + e)
    q_nope, q_pe = q.split([attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    q_pe = apply_rope(q_pe, cos_sin)

    kv = attn.wkv_a(x)  # (b, s, r + e)
    c_kv, k_pe = kv.split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    latent[:, start:end] = attn.kv_norm(c_kv)
    rope_key[:, start:end] = apply_rope(k_pe.unsqueeze(2), cos_sin).squeeze(2)

    w = attn.wkv_b.weight.view(
        -1, attn.qk_nope_head_dim + attn.v_head_dim, attn.kv_lora_rank
    )  # (h, d + v, r)
    w_uk, w_uv = w.split([attn.qk_nope_head_dim, attn.v_head_dim], dim=1)
    q_lat = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)
    scores = torch.einsum("bshr,btr->bsht", q_lat, latent[:, :end])
    scores = scores + torch.einsum("bshe,bte->bsht", q_pe, rope_key[:, :end])
    scores = scores.float() * attn.softmax_scale
    pos_q = torch.arange(start, end, device=x.device).view(1, seqlen, 1, 1)
    pos_k = torch.arange(end, device=x.device).view(1, 1, 1, end)
    scores = scores.masked_fill(pos_k > pos_q, float("-inf"))  # causal
    probs = scores.softmax(dim=-1).type_as(x)  # (b, s, h, t)
    out_lat = torch.einsum("bsht,btr->bshr", probs, latent[:, :end])
    out = torch.einsum("bshr,hvr->bshv", out_lat, w_uv)  # (b, s, h, v)
    return attn.wo(out.flatten(2))


def block_cached(
    block: TransformerBlock, x, cos_sin, cache: MLACache, layer: int, start: int
) -> torch.Tensor:
    h = x + mla_cached(
        block.attention, block.attention_norm(x), cos_sin, cache.latent[layer], cache.rope_key[layer], start
    )
    ffn = block.moe if block.moe is not None else block.feed_forward
    return h + ffn(block.ffn_norm(h))


@torch.no_grad()
def forward_cached(model: DeepSeekV3Model, tokens: torch.Tensor, cache: MLACache, start: int) -> torch.Tensor:
    """Logits (b, s, vocab) of tokens (b, s) at positions [start, start + s), given the cache of [0, start)."""
    if start + tokens.shape[1] > cache.max_len:
        raise ValueError(f"positions up to {start + tokens.shape[1]} exceed the cache length {cache.max_len}")
    h = model.tok_embeddings(tokens)  # (b, s, dim)
    cos_sin = model.rope_cache[start : start + tokens.shape[1]]
    for i, layer in enumerate(model.layers.values()):
        h = block_cached(layer, h, cos_sin, cache, i, start)
    return model._head(model.norm(h))


# ---- sampling ------------------------------------------------------------------------------------------------


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their mass reaches top_p (at least one), renormalised. probs: (b, V)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token ids (b,) from logits (b, V): greedy when temperature is 0, else temperature + nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _main_logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]  # drop the MTP logits


@torch.no_grad()
def generate(
    model: DeepSeekV3Model,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> tuple[list[int], list[torch.Tensor]]:
    """(new token ids, the logits (V,) each was drawn from). use_cache=False recomputes the full forward each step."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    device = model.tok_embeddings.weight.device
    total = min(len(prompt) + max_new_tokens, model.args.max_seq_len)
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt], device=device)
    cache = MLACache(model, 1, total, model.tok_embeddings.weight.dtype, device) if use_cache else None
    new, step_logits = [], []
    pos = 0
    while tokens.shape[1] < total:
        if cache is not None:
            logits = forward_cached(model, tokens[:, pos:], cache, pos)[:, -1]
            pos = tokens.shape[1]
        else:
            logits = _main_logits(model(tokens))[:, -1]
        nxt = sample(logits, temperature, top_p, gen)
        new.append(int(nxt[0]))
        step_logits.append(logits[0].float())
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
        if eos_id is not None and new[-1] == eos_id:
            break
    return new, step_logits
