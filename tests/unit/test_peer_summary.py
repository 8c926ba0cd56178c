"""The torchtitan peer's log summary (benchmarks/peer_torchtitan/summarize_log.py) on a log in torchtitan's format:
its every-50-steps GC step is reported apart and spread over 50 steps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gc_step_is_spread_over_gc_freq(tmp_path):
    log = tmp_path / "torchtitan.log"
    lines = []
    for step in range(1, 51):
        tps = 16384 / 0.8 if step == 50 else 16384 / 0.5  # 500 ms a step, 800 ms for the GC step
        lines.append(
            f"[rank0]:[titan] step: {step:2d}  loss:  5.0000  grad_norm:  1.0000  memory: 90.00GiB(64.00%)  "
            f"tps: {tps:,.0f}  tflops: 300.00  mfu: 30.00%"
        )
    log.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/peer_torchtitan/summarize_log.py"),
            str(log),
            "--warmup",
            "40",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "steps 41-50 (10 timed)" in out and "530.0 ms/step" in out  # (9 x 500 + 800) / 10
    # without step 50: 500 ms; spread over 50 steps: 500 + 300 / 50 = 506 ms
    assert "steps 41-49 without its GC step (50: 800.0 ms): 500.0 ms/step" in out
    assert "506.0 ms/step, 32,379 tok/s/GPU" in out
