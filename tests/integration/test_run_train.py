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
