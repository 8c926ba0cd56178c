"""Document-causal BlockMasks for FlexAttention over packed sequences."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as _flex_attention_eager

# FlexAttention is only fast when compiled (eager falls back to a dense reference); on CPU the eager path is kept
# because the compiled CPU kernel has no backward (../shared/CPU_TESTING.md).
_compiled = None


def flex_attention(q, k, v, block_mask: BlockMask, scale: float):
    global _compiled
    if q.device.type == "cuda":
        if _compiled is None:
            _compiled = torch.compile(_flex_attention_eager, dynamic=False)
        return _compiled(q, k, v, block_mask=block_mask, scale=scale)
    return _flex_attention_eager(q, k, v, block_mask=block_mask, scale=scale)


def document_causal_mask(
    doc_ids: torch.Tensor | None, bsz: int, seqlen: int, device: torch.device
) -> BlockMask:
    """Causal mask that also stops attention across documents. doc_ids: (bsz, seqlen) int, or None (plain causal)."""
    if doc_ids is None:

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        return create_block_mask(causal, None, None, seqlen, seqlen, device=device)

    def doc_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return create_block_mask(doc_causal, bsz, None, seqlen, seqlen, device=device)
