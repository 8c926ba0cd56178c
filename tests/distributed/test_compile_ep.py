"""Per-block torch.compile with expert parallelism: the compiled experts must compute with their local shard
(bf16, where the grouped GEMM path runs on CPU). Losses follow the single-process compiled run."""

from __future__ import annotations

import os

import pytest

from tests.distributed.common import layout_args
from tests.distributed.launcher import run_ranks
from tests.distributed.test_reshard import train_to_end

pytestmark = pytest.mark.slow


def test_compiled_ep2_fsdp2_bf16(tmp_path):
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    common = {"compile.enable": "true", "training.mixed_precision": "bf16", "training.steps": "3"}
    (single,) = run_ranks(train_to_end, 1, layout_args(str(tmp_path / "one"), **common), timeout=600)
    ep = {**common, "parallelism.expert_parallel_degree": "2", "training.local_batch_size": "4"}
    ranks = run_ranks(train_to_end, 2, layout_args(str(tmp_path / "ep"), **ep), timeout=600)
    # bf16 compute: the layouts round differently, so agreement is to bf16 precision, not bit for bit
    assert ranks[0] == pytest.approx(single, rel=2e-3)
