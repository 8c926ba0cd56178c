"""A rerun (or a resume) of a job with two TP groups reuses torch.compile's cache without loading the other
group's graphs: compiled graphs name the process groups they call (TP ranks 0-1 '15', ranks 2-3 '16' here), and
torch's caches key them without that name, so the trainer gives each rank its own cache directory."""

from __future__ import annotations

import os

import pytest

from tests.distributed.common import layout_args
from tests.distributed.launcher import run_ranks
from tests.distributed.test_reshard import train_to_end

pytestmark = pytest.mark.slow


def test_second_tp_run_with_a_warm_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # shared by both runs' ranks
    tp = {
        "parallelism.tensor_parallel_degree": "2",
        "training.local_batch_size": "4",
        "compile.enable": "true",
        "compile.components": "loss",
    }
    first = run_ranks(train_to_end, 4, layout_args(str(tmp_path / "first"), **tp), timeout=600)
    second = run_ranks(train_to_end, 4, layout_args(str(tmp_path / "second"), **tp), timeout=600)
    assert second == first
    assert sorted(os.listdir(tmp_path / "inductor")) == ["rank0", "rank1", "rank2", "rank3"]
