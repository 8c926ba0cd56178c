"""Checkpoint timings on the current device: sync save, load, and the training stall of an async save.

    python benchmarks/bench_checkpoint.py --workload bench6 --folder /tmp/bench_ckpt [--repeats 3]
    python benchmarks/bench_checkpoint.py --workload tiny -- --model.n_layers=4

Builds the workload's model with random weights, takes one AdamW step on random gradients (so exp_avg and
exp_avg_sq exist), and drives titan_dsv3.checkpoint.CheckpointManager as the trainer does. "async stall" is what
the training loop waits for in maybe_save (the copy to host memory); "async write" is the background rest,
measured by waiting for it. The first async save also allocates the pinned host buffer; later ones reuse it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from workloads import trainer_args  # noqa: E402

from titan_dsv3.checkpoint.manager import CheckpointManager  # noqa: E402
from titan_dsv3.config import resolve_model_args  # noqa: E402
from titan_dsv3.models import DeepSeekV3Model  # noqa: E402
from titan_dsv3.optim.lr_scheduler import build_lr_scheduler  # noqa: E402
from titan_dsv3.optim.optimizer import build_optimizer  # noqa: E402
from titan_dsv3.tools._cli import parse_layout_free  # noqa: E402
from titan_dsv3.train import TrainState  # noqa: E402


class FakeLoader:
    def __init__(self):
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = state["consumed"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def clear(run: Path) -> None:
    for old in (run / "checkpoint").glob("step-*"):
        shutil.rmtree(old)


def folder_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def build(cfg, device: torch.device):
    args = resolve_model_args(cfg)
    with torch.device("meta"):
        model = DeepSeekV3Model(args)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    opt = build_optimizer([model], cfg.optimizer, device.type)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched = build_lr_scheduler(opt, cfg.lr_scheduler, 1000)
    n = sum(p.numel() for p in model.parameters())
    return model, opt, sched, n


def manager(cfg, folder: Path, model, opt, sched, async_mode: str) -> CheckpointManager:
    ck = SimpleNamespace(**{**vars(cfg.checkpoint), "enable": True, "interval": 1, "keep_latest_k": 0})
    ck.async_mode = async_mode
    return CheckpointManager(
        ck, folder, model_parts=[model], optimizer=opt, lr_scheduler=sched, dataloader=FakeLoader(),
        train_state=TrainState(), rank=0,
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="tiny")
    ap.add_argument("--folder", default="/tmp/bench_ckpt")
    ap.add_argument("--repeats", type=int, default=3)
    opts, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    cfg = parse_layout_free(trainer_args(opts.workload, 1, extra))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(opts.folder)
    shutil.rmtree(root, ignore_errors=True)
    model, opt, sched, n = build(cfg, device)
    rows = []

    m = manager(cfg, root / "sync", model, opt, sched, "disabled")
    saves = []
    for s in range(1, opts.repeats + 1):
        clear(root / "sync")  # one checkpoint on disk at a time (bench6: 41 GB)
        saves.append(timed(lambda s=s: m.maybe_save(s)))
    gb = folder_gb(root / "sync" / "checkpoint" / f"step-{opts.repeats}")
    rows.append(("sync save (median)", statistics.median(saves), gb))
    loads = [timed(m.load) for _ in range(opts.repeats)]
    rows.append(("load (median)", statistics.median(loads), gb))
    m.close()
    shutil.rmtree(root / "sync", ignore_errors=True)

    a = manager(cfg, root / "async", model, opt, sched, "async")
    stalls, writes = [], []
    for s in range(1, opts.repeats + 1):
        clear(root / "async")
        stalls.append(timed(lambda s=s: a.maybe_save(s)))
        writes.append(timed(a.wait))
    rows.append(("async stall, first save", stalls[0], gb))
    if len(stalls) > 1:
        rows.append(("async stall, later (median)", statistics.median(stalls[1:]), gb))
    rows.append(("async write after stall (median)", statistics.median(writes), gb))
    a.close()
    shutil.rmtree(root, ignore_errors=True)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"workload {opts.workload}: {n / 1e9:.3f}B parameters, fp32 weights + AdamW state, device {name}")
    print(f"torch {torch.__version__}, folder {root}, repeats {opts.repeats}")
    print(f"| {'operation':34} | {'seconds':>8} | {'GB':>7} | {'GB/s':>6} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 9}|{'-' * 8}|")
    for label, sec, size in rows:
        print(f"| {label:34} | {sec:8.3f} | {size:7.2f} | {size / sec:6.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
