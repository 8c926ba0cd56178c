"""Kill -9 and restart: `python -m titan_dsv3.train` resumes from its newest complete checkpoint and reproduces
the losses of an uninterrupted run exactly (CPU, job.deterministic)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import tiny_args

REPO = Path(__file__).resolve().parents[2]
STEPS = 40
# local_batch_size 8 makes a step ~25 ms on 2 cores: the kill lands on the step it was aimed at.
COMMON = {"training.steps": str(STEPS), "training.local_batch_size": "8", "lr_scheduler.warmup_steps": "5"}

# Runs the trainer with DCP's file writer held up (marker file, then a long sleep) for one checkpoint, so that a
# SIGKILL lands during that save. Test-only: the product code has no hook for this.
SLOW_SAVE = """
import os, runpy, sys, time
import torch.distributed.checkpoint as dcp
write = dcp.FileSystemWriter.write_data
def write_slowly(self, plan, planner):
    if os.environ["SLOW_SAVE_STEP"] in str(self.path):
        open(os.environ["SLOW_SAVE_MARKER"], "w").close()
        time.sleep(300)
    return write(self, plan, planner)
dcp.FileSystemWriter.write_data = write_slowly
sys.argv = ["titan_dsv3.train", *sys.argv[1:]]
runpy.run_module("titan_dsv3.train", run_name="__main__")
"""


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def start(
    args: list[str], prefix: list[str] | None = None, extra_env: dict | None = None
) -> subprocess.Popen:
    cmd = (prefix or [sys.executable, "-m", "titan_dsv3.train"]) + args
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**env(), **(extra_env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    return out


def losses(run: Path) -> dict[int, float]:
    """The last logged loss of every step (metrics.jsonl is appended to across restarts)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def logged_steps(run: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """Run A: 40 steps, no checkpoints, never stopped."""
    tmp = tmp_path_factory.mktemp("a")
    finish(start(tiny_args(tmp, **COMMON)))
    return losses(tmp / "run")


def test_sigkill_and_restart_reproduces_the_uninterrupted_losses(tmp_path, reference):
    kill_at = random.Random().randint(21, 29)
    args = tiny_args(tmp_path, **COMMON, **{"checkpoint.enable": "true", "checkpoint.interval": "10"})
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint"
    p = start(args)
    for line in p.stdout:  # the console line of a step is printed right after its metrics.jsonl record
        if line.startswith(f"step {kill_at}/"):
            p.send_signal(signal.SIGKILL)
            break
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"run B ended before step {kill_at}"
    assert kill_at in logged_steps(run) and max(logged_steps(run)) <= 29, f"aimed at {kill_at}"
    assert sorted(x.name for x in ckpt.iterdir()) == ["step-10", "step-20"]

    out = finish(start(args))  # the same command
    assert f"resumed from {ckpt / 'step-20'}" in out
    assert logged_steps(run)[len(logged_steps(run)) - 20 :] == list(range(21, 41))
    b = losses(run)
    assert [b[s] for s in range(21, 41)] == [reference[s] for s in range(21, 41)], f"killed at {kill_at}"


def test_sigkill_during_async_save_keeps_the_previous_checkpoint(tmp_path, reference):
    args = tiny_args(
        tmp_path,
        **COMMON,
        **{"checkpoint.enable": "true", "checkpoint.interval": "10", "checkpoint.async_mode": "async"},
    )
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint"
    marker = tmp_path / "saving"
    hold = {"SLOW_SAVE_STEP": "step-20", "SLOW_SAVE_MARKER": str(marker)}
    p = start(args, prefix=[sys.executable, "-c", SLOW_SAVE], extra_env=hold)
    deadline = time.monotonic() + 60
    while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), "the save of step 20 never started"
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert (ckpt / "step-10" / ".metadata").is_file() and (ckpt / "step-20.partial").is_dir()
    assert not (ckpt / "step-20").exists() and not (ckpt / "step-20.partial" / ".metadata").exists()

    out = finish(start(args))
    assert f"removing incomplete checkpoint {ckpt / 'step-20.partial'}" in out
    assert f"resumed from {ckpt / 'step-10'}" in out
    c = losses(run)
    assert [c[s] for s in range(11, 41)] == [reference[s] for s in range(11, 41)]
    assert sorted(x.name for x in ckpt.iterdir()) == ["step-10", "step-20", "step-30", "step-40"]
