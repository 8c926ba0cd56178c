"""Metrics: a console line, TensorBoard scalars and metrics.jsonl, written by one rank."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from titan_dsv3.models.moe import MoE

# Dense bf16 peak TFLOP/s by device name (vendor figures without sparsity), for MFU.
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak dense FLOP/s of this device for MFU, or None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAK_BF16.items():
        if key in name:
            return peak if dtype == torch.bfloat16 else peak / 2  # TF32 tensor cores: half the bf16 rate
    return None


def format_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@torch.no_grad()
def moe_stats(moes: list[MoE], counts_LE: torch.Tensor | None, ep: int = 1) -> dict[str, float]:
    """Per MoE layer: load entropy, expert utilisation, max/mean load and the bias range; with expert
    parallelism (ep > 1) also the busiest EP rank's copies over the mean rank's: the others wait for it in the
    all-to-all."""
    out: dict[str, float] = {}
    if counts_LE is None:
        return out
    counts = counts_LE.double().cpu()
    for i, (m, c) in enumerate(zip(moes, counts)):
        total = c.sum().item()
        if total <= 0:
            continue
        p = c / total
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        out[f"moe/{i}/load_entropy"] = entropy / math.log(len(c))  # 1 = perfectly uniform
        out[f"moe/{i}/utilisation"] = (c > 0).double().mean().item()
        out[f"moe/{i}/max_over_mean_load"] = (c.max() / c.mean()).item()
        if ep > 1:  # experts are split over EP ranks in order
            per_rank = c.view(ep, -1).sum(1)
            out[f"moe/{i}/ep_rank_max_over_mean_load"] = (per_rank.max() / per_rank.mean()).item()
        if m.last_router_entropy is not None:
            out[f"moe/{i}/router_entropy"] = float(m.last_router_entropy)
        bias = m.gate.expert_bias
        out[f"moe/{i}/bias_min"] = bias.min().item()
        out[f"moe/{i}/bias_max"] = bias.max().item()
    return out


class MetricsLogger:
    """Writes a dict of scalars per logged step to the console, TensorBoard and metrics.jsonl (rank `log_rank`)."""

    def __init__(self, cfg, dump_folder: Path, rank: int, total_steps: int, total_tokens: int):
        self.active = rank == cfg.log_rank
        self.total_steps = total_steps
        self.total_tokens = total_tokens
        self.tb = None
        self.jsonl = None
        if not self.active:
            return
        dump_folder.mkdir(parents=True, exist_ok=True)
        if cfg.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(dump_folder / "tb"))
        if cfg.enable_jsonl:
            self.jsonl = open(dump_folder / "metrics.jsonl", "a", buffering=1)
        self._t_start = time.perf_counter()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        if self.tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        print(self._console_line(step, scalars), flush=True)

    def _console_line(self, step: int, s: dict[str, float]) -> str:
        parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}", f"loss {s['loss']:.4f}"]
        if "mtp_loss" in s:
            parts.append(f"mtp {s['mtp_loss']:.4f}")
        parts.append(f"lr {s['lr']:.2e}")
        parts.append(f"Tokens: {format_count(s['tokens_seen'])} / {format_count(self.total_tokens)}")
        parts.append(f"tok/s {s['tokens_per_second']:,.0f}")
        if s.get("mfu_pct") is not None:
            parts.append(f"MFU {s['mfu_pct']:.1f}%")
        if s.get("memory_gib") is not None:
            parts.append(f"mem {s['memory_gib']:.1f}GiB")
        elapsed = time.perf_counter() - self._t_start
        done = max(step, 1)
        parts.append(f"ETA {format_eta(elapsed / done * (self.total_steps - step))}")
        if s.get("skipped"):
            parts.append("SKIPPED (non-finite)")
        return " | ".join(parts)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
