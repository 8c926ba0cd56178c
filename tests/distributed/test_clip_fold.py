"""Gradient clipping folded into the bf16-state AdamW's grad_scale under FSDP 2 (sharded DTensor parameters):
the same weights as clipping the gradients in a pass of their own before the same optimizer."""

from __future__ import annotations

from tests.distributed.common import layout_args
from tests.distributed.launcher import run_ranks


def train_folded_plain_unclipped(args: list[str]) -> dict:
    from titan_dsv3.config import parse_args
    from titan_dsv3.parallel.weights import full_state_dict
    from titan_dsv3.train import Trainer

    out = {}
    for run in ("folded", "plain", "unclipped"):
        trainer = Trainer(parse_args(args))
        out[f"{run}_by_default"] = trainer._fold_clip_into_adamw
        trainer._fold_clip_into_adamw = run == "folded"
        if run == "unclipped":
            trainer.cfg.training.max_norm = 0.0
        out[f"{run}_norms"] = [trainer.train_step()["grad_norm"] for _ in range(3)]
        out[run] = full_state_dict(trainer.model_parts)
        trainer.close(keep_process_group=run != "unclipped")  # later runs reuse the group; the last ends it
    return out


def test_clip_folds_into_bf16_state_adamw_under_fsdp(tmp_path):
    # FSDP 2 over both ranks; max_norm 0.5 clips (norms ~0.63). Adam is nearly blind to a constant grad scale; an
    # eps near the grads' size (~2e-3 an element) makes the update depend on it, so skipped clipping would show.
    opts = {"optimizer.state_dtype": "bfloat16", "training.local_batch_size": "4", "optimizer.eps": "1e-3"}
    args = layout_args(str(tmp_path / "run"), **opts)
    for rank in run_ranks(train_folded_plain_unclipped, 2, args):
        assert rank["folded_by_default"]  # the fold is what an FSDP run with these settings uses
        assert rank["folded_norms"][0] > 0.5
        worst_fold = worst_skip = 0.0
        for name, want in rank["plain"].items():
            worst_fold = max(worst_fold, (rank["folded"][name] - want).abs().max().item())
            worst_skip = max(worst_skip, (rank["unclipped"][name] - want).abs().max().item())
        # the paths round the scale differently (a division by norm / max_norm against a product with
        # max_norm / (norm + 1e-6)), which can flip a bf16 rounding of the moments: lr 3e-3 x 2^-8 a step
        assert worst_fold < 3 * 3e-3 * 2**-8
        assert worst_skip > 10 * worst_fold
