"""Losses: token cross-entropy summed (the trainer divides by the step's global valid-token count) and MTP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class HeadInput:
    """What a fused output head (float8.fuse_head_loss) hands the loss in place of logits: its input h (bsz,
    seqlen, dim) and weight (vocab, dim). cross_entropy_sum then runs the head and the loss as one op."""

    h: torch.Tensor
    weight: torch.Tensor


def cross_entropy_sum(logits: torch.Tensor | HeadInput, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies in fp32. logits: (bsz, seqlen, vocab), or a HeadInput; labels: (bsz, seqlen)."""
    if isinstance(logits, HeadInput):
        from titan_dsv3.kernels.fp8_head_loss import fp8_head_cross_entropy

        return fp8_head_cross_entropy(logits.h.flatten(0, 1), logits.weight, labels.flatten(0, 1))
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(0, 1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def mtp_labels(labels: torch.Tensor, depth: int) -> torch.Tensor:
    """Targets of MTP depth k: position i predicts labels[i + k]; the last k positions have none."""
    shifted = labels.roll(-depth, dims=1)
    shifted[:, -depth:] = IGNORE_INDEX
    return shifted


def count_valid(labels: torch.Tensor, mtp_depth: int) -> torch.Tensor:
    """(1 + mtp_depth,) valid-target counts of the main loss and each MTP depth, as float64 on labels' device."""
    valid = labels != IGNORE_INDEX
    counts = [valid.sum()]
    for k in range(1, mtp_depth + 1):
        counts.append(valid[:, k:].sum())
    return torch.stack(counts).double()


def loss_sums(output, labels: torch.Tensor) -> torch.Tensor:
    """(1 + mtp_depth,) summed cross-entropies: main head, then each MTP depth."""
    if not isinstance(output, tuple):  # logits or a HeadInput, no MTP
        return cross_entropy_sum(output, labels).unsqueeze(0)
    logits, mtp_logits = output
    sums = [cross_entropy_sum(logits, labels)]
    for k, lg in enumerate(mtp_logits, start=1):
        sums.append(cross_entropy_sum(lg, mtp_labels(labels, k)))
    return torch.stack(sums)


def combine(sums: torch.Tensor, n_valid: torch.Tensor, mtp_weight: float) -> torch.Tensor:
    """Main mean loss + mtp_weight x mean over depths of the MTP mean losses (DeepSeek-V3 eq. 25)."""
    means = sums / n_valid.to(sums.dtype)
    loss = means[0]
    if means.numel() > 1:
        loss = loss + mtp_weight * means[1:].mean()
    return loss
