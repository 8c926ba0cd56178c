"""A checkpoint saved by one layout resumes on another: FSDP 2 saves at step 3, FSDP 4 and FSDP 2 x TP 2 resume it,
and steps 4-6 give the losses of an uninterrupted single-process run (fp32, relative 1e-5); and EP 2 without the
experts' FSDP unit saves what EP 2 with it resumes, and the other way round."""

from __future__ import annotations

import shutil

import pytest

from tests.distributed.common import layout_args
from tests.distributed.launcher import run_ranks

pytestmark = pytest.mark.slow

P = "parallelism."
STEPS = 6


def train_to_end(args: list[str], stop_after: int | None = None) -> list[float]:
    """Run a Trainer the way train() does (resume, steps, checkpoints); return the losses of the steps it ran.

    stop_after: leave after this step, as a killed run would (the LR schedule still spans all the steps)."""
    from titan_dsv3.config import parse_args
    from titan_dsv3.train import Trainer

    trainer = Trainer(parse_args(args))
    trainer.checkpointer.load()
    losses = []
    while trainer.state.step < min(trainer.total_steps, stop_after or trainer.total_steps):
        losses.append(trainer.train_step()["loss"])
        step = trainer.state.step
        trainer.checkpointer.maybe_save(step, last=step == trainer.total_steps)
    trainer.checkpointer.close()
    trainer.metrics.close()
    return losses


def args(folder, **overrides) -> list[str]:
    ck = {"checkpoint.enable": "true", "checkpoint.interval": "3", "training.steps": str(STEPS)}
    return layout_args(str(folder), **{**ck, **overrides})


def test_save_fsdp2_resume_fsdp4_and_fsdp2_tp2(tmp_path):
    (reference,) = run_ranks(train_to_end, 1, args(tmp_path / "ref"))
    assert len(reference) == STEPS

    first = tmp_path / "fsdp2"
    saved = run_ranks(train_to_end, 2, args(first, **{"training.local_batch_size": "4"}), 3)
    assert saved[0] == pytest.approx(reference[:3], rel=1e-5)
    assert (first / "checkpoint" / "step-3" / ".metadata").is_file()

    layouts = {
        "fsdp4": {"training.local_batch_size": "2"},
        "fsdp2_tp2": {P + "tensor_parallel_degree": "2", "training.local_batch_size": "4"},
    }
    for name, overrides in layouts.items():
        folder = tmp_path / name
        shutil.copytree(first / "checkpoint", folder / "checkpoint")
        resumed = run_ranks(train_to_end, 4, args(folder, **overrides))
        assert resumed[0] == pytest.approx(reference[3:], rel=1e-5), name


def test_experts_with_and_without_their_unit_share_checkpoints(tmp_path):
    """parallelism.expert_1rank_fsdp_unit changes only how the experts are wrapped (EP over both data ranks), not
    the checkpoint: each layout resumes the other's step 3 and gives the uninterrupted run's steps 4-6."""
    ep2 = {P + "expert_parallel_degree": "2", "training.local_batch_size": "4"}
    none = {**ep2, P + "expert_1rank_fsdp_unit": "false"}
    reference = run_ranks(train_to_end, 2, args(tmp_path / "ref", **ep2))[0]
    for saver, loader, name in ((none, ep2, "none_to_unit"), (ep2, none, "unit_to_none")):
        folder = tmp_path / name
        saved = run_ranks(train_to_end, 2, args(folder, **saver), 3)
        assert saved[0] == pytest.approx(reference[:3], rel=1e-5), name
        resumed = run_ranks(train_to_end, 2, args(folder, **loader))
        assert resumed[0] == pytest.approx(reference[3:], rel=1e-5), name
