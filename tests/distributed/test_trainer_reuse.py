"""Several Trainers in one process group, one after the other (what benchmarks/bench_train.py does for its variants
under torchrun): close(keep_process_group=True) leaves the group for the next Trainer, close() ends it, and the
second Trainer trains exactly as the first did."""

from __future__ import annotations

from tests.distributed.common import layout_args
from tests.distributed.launcher import run_ranks


def two_trainers_in_turn(args: list[str]) -> dict:
    import torch.distributed as dist

    from titan_dsv3.config import parse_args
    from titan_dsv3.train import Trainer

    first = Trainer(parse_args(args))
    losses_first = [first.train_step()["loss"] for _ in range(2)]
    first.close(keep_process_group=True)
    kept = dist.is_initialized()
    second = Trainer(parse_args(args))
    losses_second = [second.train_step()["loss"] for _ in range(2)]
    second.close()
    return {"first": losses_first, "second": losses_second, "kept": kept, "ended": not dist.is_initialized()}


def test_second_trainer_reuses_the_process_group(tmp_path):
    args = layout_args(
        str(tmp_path / "run"), **{"parallelism.expert_parallel_degree": "2", "training.local_batch_size": "4"}
    )
    for rank in run_ranks(two_trainers_in_turn, 2, args):
        assert rank["kept"] and rank["ended"]
        assert rank["second"] == rank["first"]  # fp32, same seed and data: bit for bit
