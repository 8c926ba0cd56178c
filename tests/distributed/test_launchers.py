"""The command-line front doors with real torchrun launches (gloo on CPU): run_train.sh with 2 processes, and
multinode_slurm.sh as 2 simulated nodes x 2 processes meeting at one c10d endpoint on localhost (HSDP: replicas
across the nodes). Both must log the single-process losses."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.distributed.common import layout_args
from tests.distributed.launcher import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def cli_args(tmp_path: Path, **overrides) -> list[str]:
    empty = tmp_path / "empty.toml"
    empty.write_text("")  # defaults + command line only, exactly as the reference run
    overrides = {"metrics.enable_jsonl": "true", "job.config_file": str(empty), **overrides}
    return layout_args(str(tmp_path / "run"), **overrides)


def logged_losses(tmp_path: Path) -> list[float]:
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def env(**extra) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    e.update(extra)
    return e


def assert_losses(got: list[float], ref: dict) -> None:
    assert len(got) == len(ref["loss"])
    for a, b in zip(got, ref["loss"]):
        assert abs(a - b) <= 1e-5 * abs(b), (got, ref["loss"])


def test_run_train_sh_two_processes(reference, tmp_path):
    args = cli_args(
        tmp_path,
        **{"parallelism.expert_parallel_degree": "2", "training.local_batch_size": "4"},
    )
    out = subprocess.run(
        ["./run_train.sh", *args], cwd=REPO, env=env(NGPU="2"), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert_losses(logged_losses(tmp_path), reference)


def test_multinode_script_two_simulated_nodes(reference, tmp_path):
    args = cli_args(tmp_path, **{"training.local_batch_size": "2"})
    common = {"TITAN_PER_NODE": "1", "NNODES": "2", "NGPU": "2", "MASTER_ADDR": "127.0.0.1"}
    common["MASTER_PORT"] = str(free_port())
    nodes = [
        subprocess.Popen(
            ["./multinode_slurm.sh", *args],
            cwd=REPO,
            env=env(**common, NODE_RANK=str(n)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in range(2)
    ]
    logs = []
    try:
        for p in nodes:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in nodes:
            p.kill()
    assert all(p.returncode == 0 for p in nodes), "\n".join(log[-3000:] for log in logs)
    assert_losses(logged_losses(tmp_path), reference)
    assert "world 4 = pp 1 x dp_replicate 2 x dp_shard 2 x cp 1 x tp 1" in "".join(logs)
