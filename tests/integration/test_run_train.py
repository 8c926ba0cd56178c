"""The front door: ./run_train.sh on the debug model writes one metrics.jsonl line per step and TensorBoard events."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_run_train_sh_20_steps(tmp_path):
    env = {**os.environ, "NGPU": "1", "OMP_NUM_THREADS": "2"}
    r = subprocess.run(
        [
            "./run_train.sh",
            "--training.steps",
            "20",
            "--metrics.log_freq",
            "1",
            "--job.dump_folder",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 21))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert "step 20/20" in r.stdout and "Tokens:" in r.stdout
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_run_train_sh_bad_override_exits_2_in_one_line(tmp_path):
    r = subprocess.run(
        ["./run_train.sh", "--training.local_batch_size", "many", "--job.dump_folder", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "NGPU": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "config error: training.local_batch_size: expected an integer, got 'many'"


def test_fp8_head_fused_with_its_loss_under_fsdp(tmp_path):
    """float8.fuse_head_loss on 2 ranks (FSDP, dp_shard 2, gloo): the head returns its input and weight, not a
    tensor, so the loss runs after the root module's forward has returned; the root's gradients (head, embedding,
    final norm) must still be reduce-scattered. The run's losses and gradient norms are the unfused FP8 head's."""
    # as a CPU user runs it: torch's cast and fp32 GEMMs; the interpreter (conftest) would multiply with CPU
    # torch._scaled_mm, minutes a step
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(NGPU="2", OMP_NUM_THREADS="1")
    rows = {}
    for fuse in ("false", "true"):
        out = tmp_path / fuse
        r = subprocess.run(
            ["./run_train.sh", "--training.steps", "3", "--metrics.log_freq", "1", "--job.dump_folder", str(out),
             "--checkpoint.enable", "false", "--float8.output_head", "true", "--float8.fuse_head_loss", fuse],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "dp_shard 2" in r.stdout
        rows[fuse] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows["true"], rows["false"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 3e-4 * b["loss"], (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-2 * b["grad_norm"], (a, b)
