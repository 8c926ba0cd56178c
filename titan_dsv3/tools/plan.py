"""Token budgets of the presets: exact parameter counts, tokens, steps, and the ratio each schedule really gives.

    python -m titan_dsv3.tools.plan --all [--strict] [--markdown]
    python -m titan_dsv3.tools.plan --config train_configs/deepseek_5b.toml [--world-size 8] [--tokens-per-param 26]

Budgets count the active parameters of the main model (MTP excluded), as config/budget.py does for training.
A schedule passes when steps x tokens per step / active parameters lies in [20, 26] (Chinchilla's ~20 tokens a
parameter, with room for rounding up to whole steps and for a larger batch). --strict exits 1 when one does not.
Exit status 2: a config that does not validate.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from titan_dsv3.config import ConfigError, parse_args, resolve_model_args
from titan_dsv3.config.budget import budget_params, steps_for_ratio
from titan_dsv3.config.manager import TRAIN_CONFIGS, load_toml
from titan_dsv3.parallel.dims import ParallelDims
from titan_dsv3.tools.memory import GiB, estimate_from_config

RATIO_RANGE = (20.0, 26.0)


@dataclass
class Plan:
    name: str
    world_size: int
    total: int  # parameters of the main model
    total_with_mtp: int
    active: int  # active parameters of the main model: the budget's denominator
    layers: str
    hidden: int
    experts: str  # routed / active + shared
    context: int
    layout: str
    tokens_per_step: int
    steps: int
    steps_from_budget: bool
    memory_gib: float  # estimated device memory per GPU (tools/memory.py)

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def ratio(self) -> float:
        return self.tokens / self.active

    @property
    def ok(self) -> bool:
        return RATIO_RANGE[0] <= self.ratio <= RATIO_RANGE[1]

    def tokens_for(self, r: float) -> float:
        return r * self.active


def preset_files() -> list[Path]:
    """The size presets (train_configs/deepseek_*.toml); debug and benchmark configs run fixed step counts."""
    return sorted(
        TRAIN_CONFIGS.glob("deepseek_*.toml"), key=lambda p: float(p.stem.split("_")[1].rstrip("b"))
    )


def training_configs() -> list[Path]:
    """Every TOML in train_configs/ that configures training (has a [model] section)."""
    return sorted(p for p in TRAIN_CONFIGS.glob("*.toml") if "model" in load_toml(p))


def intended_world_size(path: str | Path) -> int:
    """The world size a TOML's [parallelism] is written for: the product of its degrees (1 when shard is -1)."""
    p = load_toml(path).get("parallelism", {})
    shard = p.get("data_parallel_shard_degree", -1)
    world = max(shard, 1)
    for key in (
        "data_parallel_replicate_degree",
        "tensor_parallel_degree",
        "pipeline_parallel_degree",
        "context_parallel_degree",
    ):
        world *= p.get(key, 1)
    return world


def _layout(dims: ParallelDims) -> str:
    parts = [f"FSDP {dims.dp_shard}" if dims.dp_shard > 1 else "1 GPU" if dims.world_size == 1 else ""]
    for name, deg in (
        ("HSDP x", dims.dp_replicate),
        ("TP", dims.tp),
        ("PP", dims.pp),
        ("CP", dims.cp),
        ("EP", dims.ep),
    ):
        if deg > 1:
            parts.append(f"{name} {deg}")
    return " + ".join(p for p in parts if p)


def make_plan(
    path: str | Path,
    world_size: int | None = None,
    tokens_per_param: float | None = None,
    overrides: list[str] | None = None,
) -> Plan:
    """The schedule of one TOML (raises ConfigError when it does not validate)."""
    world = world_size or intended_world_size(path)
    argv = ["--job.config_file", str(path)] + list(overrides or [])
    if tokens_per_param is not None:
        argv += ["--training.tokens_per_param", str(tokens_per_param)]
    cfg = parse_args(argv, world_size=world)
    args = resolve_model_args(cfg)
    dims = ParallelDims.from_config(cfg.parallelism, world)
    t = cfg.training
    global_batch = t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * dims.dp
    tokens_per_step = global_batch * t.seq_len
    from_budget = t.steps <= 0
    steps = steps_for_ratio(args, t.tokens_per_param, tokens_per_step) if from_budget else t.steps
    return Plan(
        name=Path(path).stem,
        world_size=world,
        total=args.num_params(include_mtp=False),
        total_with_mtp=args.num_params(include_mtp=True),
        active=budget_params(args),
        layers=f"{args.n_layers} ({args.n_dense_layers} dense)",
        hidden=args.dim,
        experts=f"{args.n_routed_experts} / {args.n_activated_experts}+{args.n_shared_experts}",
        context=args.max_seq_len,
        layout=_layout(dims),
        tokens_per_step=tokens_per_step,
        steps=steps,
        steps_from_budget=from_budget,
        memory_gib=estimate_from_config(cfg, world).total / GiB,
    )


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_text(plans: list[Plan]) -> str:
    head = (
        f"{'config':<16}{'GPUs':>5}{'total':>10}{'+MTP':>10}{'active':>9}{'tok@20':>10}{'tok@26':>10}"
        f"{'tok/step':>10}{'steps':>8}{'ratio':>7}  in [20, 26]"
    )
    lines = [head]
    for p in plans:
        lines.append(
            f"{p.name:<16}{p.world_size:>5}{_b(p.total):>10}{_b(p.total_with_mtp):>10}{_b(p.active):>9}"
            f"{_b(p.tokens_for(20)):>10}{_b(p.tokens_for(26)):>10}{p.tokens_per_step / 1e6:>9.2f}M{p.steps:>8}"
            f"{p.ratio:>7.2f}  {'yes' if p.ok else 'NO'}"
            + ("" if p.steps_from_budget else "  (training.steps fixed)")
        )
    return "\n".join(lines)


def format_markdown(plans: list[Plan]) -> str:
    rows = [
        "| preset | parameters | with MTP | active | layers | hidden | experts (routed / active+shared) | context "
        "| GPUs (layout) | memory/GPU (est.) | tokens/step | steps | tokens | tokens/active param |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in plans:
        ctx = f"{p.context // 1024}K" if p.context >= 1024 else str(p.context)
        rows.append(
            f"| `{p.name}` | {_b(p.total)} | {_b(p.total_with_mtp)} | {_b(p.active)} | {p.layers} | {p.hidden} "
            f"| {p.experts} | {ctx} "
            f"| {p.world_size} ({p.layout}) | {p.memory_gib:.0f} GiB | {p.tokens_per_step / 1e6:.2f}M | {p.steps:,} | {_b(p.tokens)} "
            f"| {p.ratio:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m titan_dsv3.tools.plan", description=__doc__.split("\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", action="append", help="a training TOML (repeatable)")
    which.add_argument("--all", action="store_true", help="every size preset: train_configs/deepseek_*.toml")
    ap.add_argument(
        "--world-size", type=int, help="processes (default: what the TOML's [parallelism] is written for)"
    )
    ap.add_argument(
        "--tokens-per-param", type=float, help="override training.tokens_per_param (budgeted configs)"
    )
    ap.add_argument("--strict", action="store_true", help="exit 1 unless every ratio lies in [20, 26]")
    ap.add_argument("--markdown", action="store_true", help="print the README preset table")
    a = ap.parse_args(argv)
    paths = preset_files() if a.all else [Path(c) for c in a.config]
    plans = []
    for path in paths:
        try:
            plans.append(make_plan(path, a.world_size, a.tokens_per_param))
        except ConfigError as e:
            print(f"config error in {path}: {e}", file=sys.stderr)
            return 2
    print(format_markdown(plans) if a.markdown else format_text(plans))
    bad = [p.name for p in plans if not p.ok]
    if a.strict and bad:
        print(f"tokens per active parameter outside [20, 26]: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
