"""Shared pieces of the distributed tests: the tiny model of every layout test, and the work of one rank."""

from __future__ import annotations

import torch

from tests.tiny import TINY_MODEL

# Four layers (one dense) so that an interleaved pipeline of 2 ranks has a layer per stage; MTP depth 1.
LAYOUT_MODEL = {**TINY_MODEL, "n_layers": 4, "n_dense_layers": 1, "n_routed_experts": 4, "mtp_depth": 1}
GLOBAL_BATCH = 8
STEPS = 3


def layout_args(dump_folder: str, **overrides) -> list[str]:
    """Command-line arguments of a 3-step fp32 run of the layout model with a global batch of 8 x 32 tokens."""
    base = {
        "job.dump_folder": dump_folder,
        "training.seq_len": "32",
        "training.local_batch_size": "8",
        "training.global_batch_size": str(GLOBAL_BATCH),
        "training.steps": str(STEPS),
        "training.mixed_precision": "fp32",
        "training.max_norm": "0.5",  # below the ~0.63 of step 1: clipping is exercised
        "data.embedded_max_bytes": "40000",
        "metrics.log_freq": "1",
        "metrics.enable_tensorboard": "false",
        "metrics.enable_jsonl": "false",
        "lr_scheduler.warmup_steps": "1",
        "optimizer.lr": "3e-3",
        "moe.bias_update_speed": "0.01",
    }
    base.update(overrides)
    return [f"--model.{k}={v}" for k, v in LAYOUT_MODEL.items()] + [f"--{k}={v}" for k, v in base.items()]


def train_and_report(args: list[str]) -> dict:
    """Build a Trainer from args, run STEPS steps; report losses, grad norms, step-1 gradients, final state."""
    from titan_dsv3.config import parse_args
    from titan_dsv3.parallel.weights import full_grads, full_state_dict
    from titan_dsv3.train import Trainer

    trainer = Trainer(parse_args(args))
    grads: dict[str, torch.Tensor] = {}
    clip = trainer.clip_grads

    def clip_and_keep_first_grads():
        if not grads:
            grads.update(full_grads(trainer.model_parts))  # before clipping: the raw gradient of step 1
        return clip()

    trainer.clip_grads = clip_and_keep_first_grads
    rows = [trainer.train_step() for _ in range(STEPS)]
    val = {}
    if trainer.dims.pp == 1:  # validation is not supported with pipeline parallelism
        # the embedded corpus needs ~0.5 MB before its held-out split has a document: evaluate on training text
        trainer.val_stream = trainer.train_stream
        val = trainer.validate()
    state = full_state_dict(trainer.model_parts)
    coords = trainer.dims.coords(trainer.rank)
    # ranks of one pipeline stage hold the same full tensors: one of them reports them
    reporter = all(v == 0 for k, v in coords.items() if k != "pp")
    trainer.checkpointer.close()
    trainer.metrics.close()
    return {
        "loss": [r["loss"] for r in rows],
        "mtp_loss": [r.get("mtp_loss") for r in rows],
        "grad_norm": [r["grad_norm"] for r in rows],
        "val_loss": val.get("val_loss"),
        "grads": grads if reporter else {},
        "state": state if reporter else {},
    }
