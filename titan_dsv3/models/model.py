"""The DeepSeek-V3 model: embedding, MLA + (dense | MoE) blocks, final norm, output head, and MTP modules.

No parallelism lives here. Layers sit in an nn.ModuleDict keyed by str(i) and every top-level module may be None,
so a pipeline stage can drop what it does not own and checkpoint names stay the same on every stage.
"""

from __future__ import annotations

import torch
from torch import nn

from titan_dsv3.models.args import ModelArgs
from titan_dsv3.models.attention import MLA, RMSNorm, init_normal_
from titan_dsv3.models.masks import document_causal_mask
from titan_dsv3.models.moe import FeedForward, MoE
from titan_dsv3.models.rope import rope_cos_sin


class TransformerBlock(nn.Module):
    """Pre-norm block: x + MLA(norm(x)), then x + FFN(norm(x)) with FFN dense or MoE."""

    def __init__(self, layer_id: int, args: ModelArgs, moe: bool):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = MLA(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.moe = MoE(args) if moe else None
        self.feed_forward = None if moe else FeedForward(args.dim, args.inter_dim)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, mask=None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos_sin, mask)
        ffn = self.moe if self.moe is not None else self.feed_forward
        return x + ffn(self.ffn_norm(x))

    def init_weights(self, std: float) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(std)
        (self.moe if self.moe is not None else self.feed_forward).init_weights(std)


class MTPModule(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 section 2.2).

    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i)]) -> block -> (norm -> shared output head) predicts t_{i+k+1}.
    The embedding comes first in the concatenation, as in DeepSeek's released MTP weights.
    """

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.block = TransformerBlock(layer_id, args, moe=args.n_moe_layers > 0)
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self, h: torch.Tensor, emb_next: torch.Tensor, cos_sin: torch.Tensor, mask=None
    ) -> torch.Tensor:
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h)], dim=-1))
        return self.block(h, cos_sin, mask)

    def init_weights(self, std: float) -> None:
        for norm in (self.enorm, self.hnorm, self.norm):
            norm.reset_parameters()
        init_normal_(self.eh_proj.weight, std)
        self.block.init_weights(std)


class DeepSeekV3Model(nn.Module):
    """DeepSeek-V3 (and V2) decoder. forward(tokens) -> logits, or (logits, [mtp logits per depth]) with MTP."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, args, moe=i >= args.n_dense_layers) for i in range(args.n_layers)}
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.mtp = (
            nn.ModuleDict({str(k): MTPModule(args.n_layers + k, args) for k in range(args.mtp_depth)})
            if args.mtp_depth > 0
            else None
        )
        # (max_seq_len, qk_rope_head_dim // 2, 2) fp32; recomputed by init_rope() after to_empty().
        self.register_buffer("rope_cache", rope_cos_sin(args, args.max_seq_len), persistent=False)

    # ---- forward -------------------------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        mtp_tokens: torch.Tensor | None = None,
        mtp_next_ids: torch.Tensor | None = None,
    ):
        """tokens: (bsz, seqlen) ids, or (bsz, seqlen, dim) hidden states on a later pipeline stage.

        doc_ids: (bsz, seqlen) document index of each position, for document masking (attn_impl 'flex'/'triton').
        mtp_tokens: (bsz, seqlen) ids for the MTP modules on a stage whose input is hidden states.
        mtp_next_ids: (bsz, seqlen, mtp_depth) the id k positions ahead for depth k, shifted on whole sequences
            before a split along the sequence (context parallelism); default: mtp_tokens or tokens rolled here.
        """
        if tokens.is_floating_point():  # hidden states from the previous pipeline stage
            token_ids, h = mtp_tokens, tokens
        else:
            token_ids, h = tokens, self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        if torch.is_autocast_enabled(h.device.type):
            # under autocast keep the residual stream in the compute dtype, as bf16 parameters would
            h = h.to(torch.get_autocast_dtype(h.device.type))
        bsz, seqlen = doc_ids.shape if doc_ids is not None else h.shape[:2]
        cos_sin = self.rope_cache  # each attention takes the rows of its sequence length
        mask = self._attention_mask(doc_ids, bsz, seqlen, h.device)
        for layer in self.layers.values():
            h = layer(h, cos_sin, mask)
        if self.norm is None:
            return h  # an inner pipeline stage hands hidden states on
        logits = self._head(self.norm(h))  # (bsz, seqlen, vocab)
        if self.mtp is None:
            return logits
        mtp_logits = []
        for k, module in enumerate(self.mtp.values(), start=1):
            # Position i is given token i + k; the last k positions wrap around and the MTP loss ignores them.
            next_ids = mtp_next_ids[..., k - 1] if mtp_next_ids is not None else token_ids.roll(-k, dims=1)
            h = module(h, self.mtp_embedding(next_ids), cos_sin, mask)
            mtp_logits.append(self._head(module.norm(h)))
        return logits, mtp_logits

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        if self.output is not None:
            return self.output(h)
        return h @ self.tok_embeddings.weight.T

    def mtp_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """The MTP modules share the main embedding (a pipeline's last stage keeps a tied copy of the same name)."""
        return self.tok_embeddings(ids)

    def _attention_mask(self, doc_ids, bsz: int, seqlen: int, device):
        impl = self.args.attn_impl
        if impl == "flex":
            return document_causal_mask(doc_ids, bsz, seqlen, device)
        if impl == "triton" and doc_ids is not None:  # each position's document bounds, once for every layer
            from titan_dsv3.kernels.mla_attention import document_bounds

            return document_bounds(doc_ids)
        return None

    # ---- initialisation ------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_rope(self, device: torch.device | None = None) -> None:
        device = device or self.rope_cache.device
        self.rope_cache = rope_cos_sin(self.args, self.args.max_seq_len, device)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """Initialise every parameter and buffer; valid after building on meta and to_empty()."""
        std = self.args.init_std
        self.init_rope(buffer_device)
        if self.tok_embeddings is not None:
            init_normal_(self.tok_embeddings.weight, std)
        for layer in self.layers.values():
            layer.init_weights(std)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            init_normal_(self.output.weight, std)
        if self.mtp is not None:
            for module in self.mtp.values():
                module.init_weights(std)

    def moe_layers(self) -> list[MoE]:
        """Every MoE in the model (main blocks and MTP blocks), in a fixed order."""
        return [m for m in self.modules() if isinstance(m, MoE)]
