"""Rotary position embedding with YaRN context extension (DeepSeek-V2 paper, appendix; YaRN, Peng et al. 2023).

RoPE rotates consecutive pairs (x[2i], x[2i+1]) of the qk_rope_head_dim channels, as DeepSeek's released weights
expect. YaRN keeps high frequencies (more than beta_fast rotations over original_seq_len), divides low ones
(fewer than beta_slow rotations) by rope_factor, and ramps linearly in between.
"""

from __future__ import annotations

import math

import torch

from titan_dsv3.models.args import ModelArgs


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(scale) + 1 (1 when not stretched)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(n_rotations: float, dim: int, base: float, seq_len: int) -> float:
    # the channel index whose wavelength completes n_rotations turns over seq_len positions
    return dim * math.log(seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (qk_rope_head_dim // 2,) in fp32, YaRN-blended when args.rope_factor > 1."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.rope_factor <= 1:
        return inv_freq
    low = max(math.floor(_correction_dim(args.beta_fast, dim, base, args.original_seq_len)), 0)
    high = min(math.ceil(_correction_dim(args.beta_slow, dim, base, args.original_seq_len)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = keep the original (extrapolated) frequency, 0 = interpolate by rope_factor
    return inv_freq / args.rope_factor * (1 - keep) + inv_freq * keep


def rope_cos_sin(args: ModelArgs, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """(seq_len, qk_rope_head_dim // 2, 2) fp32 table of cos and sin, scaled by the YaRN RoPE mscale."""
    inv_freq = rope_inv_freq(args).to(device)
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # (seq_len, rope_dim // 2)
    scale = 1.0
    if args.rope_factor > 1:
        if args.mscale and args.mscale_all_dim:
            scale = yarn_get_mscale(args.rope_factor, args.mscale) / yarn_get_mscale(
                args.rope_factor, args.mscale_all_dim
            )
        else:
            scale = yarn_get_mscale(args.rope_factor)
    return torch.stack([freqs.cos() * scale, freqs.sin() * scale], dim=-1)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of the last dim. x: (bsz, seqlen, n_heads, rope_dim); cos_sin: (seqlen, rope_dim // 2, 2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (bsz, seqlen, n_heads, rope_dim // 2, 2)
    cos = cos_sin[..., 0].unsqueeze(1)  # (seqlen, 1, rope_dim // 2), broadcast over heads
    sin = cos_sin[..., 1].unsqueeze(1)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def softmax_scale(args: ModelArgs) -> float:
    """1 / sqrt(qk_head_dim), times mscale^2 of YaRN when RoPE is stretched (DeepSeek-V2 appendix)."""
    scale = args.qk_head_dim**-0.5
    if args.rope_factor > 1 and args.mscale_all_dim:
        m = yarn_get_mscale(args.rope_factor, args.mscale_all_dim)
        scale = scale * m * m
    return scale
