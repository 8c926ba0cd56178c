"""Which preset to train on a given machine: layouts that fit, their memory per GPU, and the command.

    python -m titan_dsv3.tools.select_config --gpus 8 --gpu-memory 80          # presets that fit, largest first
    python -m titan_dsv3.tools.select_config --gpus 8 --gpu-memory 80 --list   # every preset, fitting or not
    python -m titan_dsv3.tools.select_config --info deepseek_16b [--gpus 4 --gpu-memory 141]

Memory comes from tools/memory.py (its docstring states the assumptions). A layout is searched over tensor
parallel {1, 2, 4, 8} (within a node), expert parallel (divisors of the expert count, at most one node unless the
preset asks for more), micro-batch {1, 2, 4, 8, 16} sequences and activation checkpointing none / selective
(every 2nd block) / full; pipeline and context parallelism are left to the presets that set them. The choice
maximises a throughput proxy: tokens a GPU per micro-batch (capped at 16K) x 1.0 / 0.8 / 0.7 for none / selective /
full checkpointing (recompute costs measured on bench6, benchmarks/RESULTS.md), then the least memory.
A layout fits when its device total is within 97% of --gpu-memory (GiB, as nvidia-smi reports: H100 80, H200 141).
Days are at an assumed 30% MFU of 989 TFLOP/s (H100/H200 dense bf16), 6 x active parameters + causal attention.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from titan_dsv3.config import ConfigError, JobConfig, parse_args, resolve_model_args
from titan_dsv3.config.budget import steps_for_ratio
from titan_dsv3.models.args import ModelArgs
from titan_dsv3.parallel.dims import ParallelDims
from titan_dsv3.tools.memory import Estimate, GiB, Layout, estimate, format_estimate
from titan_dsv3.tools.plan import intended_world_size, preset_files

HEADROOM = 0.97
AC_CHOICES = (("none", "op", 1.0), ("selective", "2", 0.8), ("full", "op", 0.7))
ASSUMED_MFU = 0.30
PEAK_FLOPS = 989e12


@dataclass
class Choice:
    preset: str
    args: ModelArgs
    cfg: JobConfig
    layout: Layout
    local_batch: int
    global_batch: int
    ac: tuple[str, str]
    estimates: dict[str, Estimate]  # by AC mode, for this layout and micro-batch
    gpu_memory: float

    @property
    def chosen(self) -> Estimate:
        return self.estimates[self.ac[0]]

    @property
    def fits(self) -> bool:
        return self.chosen.total <= HEADROOM * self.gpu_memory * GiB

    def days(self) -> float:
        t = self.cfg.training
        tokens_per_step = self.global_batch * t.seq_len
        tokens = steps_for_ratio(self.args, t.tokens_per_param, tokens_per_step) * tokens_per_step
        flops = tokens * self.args.flops_per_token(t.seq_len, causal=True)
        return flops / (self.layout.world_size * PEAK_FLOPS * ASSUMED_MFU) / 86400

    def overrides(self) -> list[str]:
        """Config overrides that turn the preset into this layout (only what differs)."""
        c, lay = self.cfg, self.layout
        want = {
            "parallelism.data_parallel_shard_degree": (
                c.parallelism.data_parallel_shard_degree,
                lay.dp_shard,
            ),
            "parallelism.tensor_parallel_degree": (c.parallelism.tensor_parallel_degree, lay.tp),
            "parallelism.expert_parallel_degree": (c.parallelism.expert_parallel_degree, lay.ep),
            "training.local_batch_size": (c.training.local_batch_size, self.local_batch),
            "training.global_batch_size": (c.training.global_batch_size, self.global_batch),
            "activation_checkpoint.mode": (c.activation_checkpoint.mode, self.ac[0]),
        }
        if self.ac[0] == "selective":
            want["activation_checkpoint.selective_option"] = (
                c.activation_checkpoint.selective_option,
                self.ac[1],
            )
        return [f"--{k} {new}" for k, (old, new) in want.items() if old != new]

    def command(self) -> str:
        n = self.layout.world_size
        cfg_file = f"train_configs/{self.preset}.toml"
        extra = " ".join(self.overrides())
        if n <= 8:
            return f"NGPU={n} CONFIG_FILE={cfg_file} ./run_train.sh {extra}".rstrip()
        nodes, per = (n // 8, 8) if n % 8 == 0 else (1, n)
        return (
            f"torchrun --nnodes {nodes} --nproc_per_node {per} --rdzv_backend c10d --rdzv_endpoint $HEAD_NODE:29500 "
            f"-m titan_dsv3.train --job.config_file {cfg_file} {extra}"
        ).rstrip()


def load_preset(name: str) -> tuple[JobConfig, ModelArgs, Path]:
    path = Path(name)
    if not path.is_file():
        path = next((p for p in preset_files() if p.stem == name), None)
        if path is None:
            raise ConfigError(f"no preset named {name!r}; see --list")
    cfg = parse_args(["--job.config_file", str(path)], world_size=intended_world_size(path))
    return cfg, resolve_model_args(cfg), path


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _estimates(
    args: ModelArgs, cfg: JobConfig, lay: Layout, lb: int, gb: int, selective_option: str = "2"
) -> dict[str, Estimate]:
    """Estimates by AC mode (selective: every `selective_option`-th block, or 'op')."""
    dp = lay.dp_replicate * lay.dp_shard
    comp = cfg.compile
    return {
        mode: estimate(
            args,
            lay,
            lb,
            cfg.training.seq_len,
            grad_accum=gb // (lb * dp),
            ac_mode=mode,
            ac_option=selective_option if mode == "selective" else "op",
            compiled=comp.enable and "model" in comp.components,
            compiled_loss=comp.enable and "loss" in comp.components,
            state_dtype=cfg.optimizer.state_dtype,
        )
        for mode, _, _ in AC_CHOICES
    }


def _global_batch(preset_gb: int, lb: int, dp: int) -> int:
    """The preset's global batch, rounded to the nearest positive multiple of lb x dp."""
    unit = lb * dp
    return max(unit, round(preset_gb / unit) * unit)


def candidates(cfg: JobConfig, args: ModelArgs, gpus: int) -> list[Layout]:
    """Layouts for `gpus` ranks, one per TP degree, that pass the config's model checks. PP and CP stay as the
    preset sets them; EP is the preset's own when it divides the ranks, else the widest inside a node."""
    p = cfg.parallelism
    micro = (
        p.pipeline_parallel_microbatches
        if p.pipeline_parallel_microbatches > 0
        else p.pipeline_parallel_degree
    )
    out: list[Layout] = []
    for tp in (1, 2, 4, 8):
        if gpus % (tp * p.pipeline_parallel_degree * p.context_parallel_degree):
            continue
        shard = gpus // (tp * p.pipeline_parallel_degree * p.context_parallel_degree)
        ranks = shard * p.context_parallel_degree * tp
        ep = p.expert_parallel_degree
        if ranks % ep or args.n_routed_experts % ep:
            ep = max(e for e in _divisors(ranks) if e <= 8 and args.n_routed_experts % e == 0)
        lay = Layout(
            1,
            shard,
            p.context_parallel_degree,
            tp,
            p.pipeline_parallel_degree,
            ep,
            micro,
            p.pipeline_parallel_schedule,
        )
        dims = ParallelDims(1, shard, lay.cp, tp, lay.pp, ep, gpus, lay.pp_schedule, micro)
        try:
            dims.check_model(
                args, cfg.training.local_batch_size, cfg.training.seq_len, cfg.moe.balance_loss_alpha
            )
        except ValueError:
            continue
        out.append(lay)
    return out


def choose(name: str, gpus: int, gpu_memory: float) -> Choice | None:
    """The best fitting layout of a preset on `gpus` GPUs, or the least memory-hungry one when none fits."""
    cfg, args, _ = load_preset(name)
    best, best_key, smallest = None, None, None
    for lay in candidates(cfg, args, gpus):
        dp = lay.dp_replicate * lay.dp_shard
        for lb in (1, 2, 4, 8, 16):
            if lay.pp > 1 and lb % lay.pp_microbatches:
                continue
            gb = _global_batch(
                cfg.training.global_batch_size if cfg.training.global_batch_size > 0 else lb * dp, lb, dp
            )
            ests = _estimates(args, cfg, lay, lb, gb)
            for mode, option, speed in AC_CHOICES:
                ch = Choice(Path(name).stem, args, cfg, lay, lb, gb, (mode, option), ests, gpu_memory)
                if smallest is None or ch.chosen.total < smallest.chosen.total:
                    smallest = ch
                if not ch.fits:
                    continue
                tokens = lb * cfg.training.seq_len / lay.cp / lay.tp
                key = (min(tokens, 16384) * speed, -lay.tp, -ch.chosen.total)
                if best_key is None or key > best_key:
                    best, best_key = ch, key
    return best or smallest


def _row(ch: Choice) -> str:
    e = ch.estimates
    static = (ch.chosen.params + ch.chosen.optimizer + ch.chosen.grads) / GiB
    ac = ch.ac[0] if ch.ac[0] != "selective" else f"sel/{ch.ac[1]}"
    return (
        f"{ch.preset:<15}{ch.args.num_params(include_mtp=False) / 1e9:>8.2f}B  {ch.layout.describe():<22}"
        f"{ch.local_batch:>3} x {ch.cfg.training.seq_len:<6}{static:>8.1f}"
        f"{e['none'].total / GiB:>8.1f}{e['selective'].total / GiB:>8.1f}{e['full'].total / GiB:>8.1f}"
        f"  {ac:<6}{ch.days():>8.1f}"
    )


HEADER = (
    f"{'preset':<15}{'params':>9}  {'layout':<22}{'micro-batch':<13}{'p+g+opt':>7}{'none':>8}{'sel/2':>8}"
    f"{'full':>8}  {'AC':<6}{'days':>8}\n{'':<48}{'(GiB per GPU: static, then device total by AC mode)'}"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m titan_dsv3.tools.select_config", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--gpus", type=int, help="GPUs (processes) of the run")
    ap.add_argument("--gpu-memory", type=float, help="memory of one GPU in GiB (H100 80GB: 80, H200: 141)")
    ap.add_argument("--list", action="store_true", help="show every preset, fitting or not")
    ap.add_argument(
        "--info", metavar="NAME", help="one preset in detail (default: on the GPUs it is written for)"
    )
    a = ap.parse_args(argv)
    try:
        if a.info:
            return _info(a.info, a.gpus, a.gpu_memory)
        if not a.gpus or not a.gpu_memory:
            ap.error("--gpus and --gpu-memory are required (or --info NAME)")
        choices = [c for c in (choose(p.stem, a.gpus, a.gpu_memory) for p in preset_files()) if c is not None]
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    fitting = sorted((c for c in choices if c.fits), key=lambda c: -c.args.num_params())
    shown = fitting + ([c for c in choices if not c.fits] if a.list else [])
    print(
        f"{a.gpus} GPUs x {a.gpu_memory:g} GiB: {len(fitting)} of {len(choices)} presets fit (largest first)"
    )
    print(HEADER)
    for ch in shown:
        print(_row(ch) + ("" if ch.fits else "  does not fit"))
    if fitting:
        print(f"\nlargest that fits: {fitting[0].preset}\n  {fitting[0].command()}")
    return 0


def _info(name: str, gpus: int | None, gpu_memory: float | None) -> int:
    cfg, args, path = load_preset(name)
    written_for = intended_world_size(path)
    gpus = gpus or written_for
    memories = [gpu_memory] if gpu_memory else [80.0, 141.0]
    print(
        f"{path.stem}: {args.num_params(include_mtp=False) / 1e9:.2f}B parameters "
        f"({args.num_params() / 1e9:.2f}B with MTP), {args.num_params(active=True, include_mtp=False) / 1e9:.2f}B "
        f"active; {gpus} GPUs"
    )
    if gpus == written_for:
        own = Layout.from_dims(ParallelDims.from_config(cfg.parallelism, gpus))
        t, ac = cfg.training, cfg.activation_checkpoint
        gb = t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * own.dp_shard
        est = _estimates(args, cfg, own, t.local_batch_size, gb, ac.selective_option)[ac.mode]
        option = f"/{ac.selective_option}" if ac.mode == "selective" else ""
        print(
            f"\nas written ({own.describe()}, {t.local_batch_size} x {t.seq_len} a GPU, AC {ac.mode}{option}):"
        )
        print(format_estimate(est))
        for mem in memories:
            print(f"  fits {mem:g} GiB: {'yes' if est.total <= HEADROOM * mem * GiB else 'no'}")
    for mem in memories:
        ch = choose(name, gpus, mem)
        if ch is None:
            print(f"\n{mem:g} GiB: no layout passes the config checks on {gpus} GPUs")
            continue
        option = f"/{ch.ac[1]}" if ch.ac[0] == "selective" else ""
        print(
            f"\nbest found for {gpus} x {mem:g} GiB ({ch.layout.describe()}, {ch.local_batch} x "
            f"{cfg.training.seq_len} a GPU, AC {ch.ac[0]}{option}){'' if ch.fits else ': does not fit'}:"
        )
        print(HEADER)
        print(_row(ch))
        print(format_estimate(ch.chosen))
        print(f"\n  {ch.command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
