"""End-to-end training speed of a named workload, optionally beside HF transformers in the same run (one GPU).

    python benchmarks/bench_train.py --workload bench6 --steps 10 --warmup 3 [--compile] [--hf] [--profile DIR]
    python benchmarks/bench_train.py --workload bench6 -- --activation_checkpoint.mode selective
    torchrun --nproc_per_node 4 benchmarks/bench_train.py --workload deepseek16b -- \
        --parallelism.expert_parallel_degree 4      # several GPUs: per-GPU figures, the batch is per GPU

--warmup-bias-speed G moves the aux-loss-free expert biases by G a step during warm-up only (the timed steps use
the configured speed): a run from random weights takes a few hundred steps at DeepSeek-V3's 0.001 before its EP
ranks carry even loads, and the timed steps should show that steady state, not the start (the uneven start costs
~107 ms a step of all-to-all waiting on 16B with 2 GPUs at steps 41-50; benchmarks/RESULTS.md).

Prints tokens/s, MFU (torchtitan's convention: full S x S attention, and the causal-aware one), peak memory,
and with --hf the same for transformers' DeepseekV3ForCausalLM (bf16 params and AdamW states) and the ratio.
--profile also prints, for the first variant, where rank 0's GPU time goes in two profiled steps: busy vs the
window, communication and the all-to-all time, each with the part no compute kernel hides (metrics/gpu_time.py).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from workloads import WORKLOADS, trainer_args  # noqa: E402

from titan_dsv3.config import parse_args  # noqa: E402
from titan_dsv3.metrics.gpu_time import gpu_time  # noqa: E402
from titan_dsv3.metrics.logger import moe_stats, peak_flops  # noqa: E402
from titan_dsv3.train import Trainer  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step_fn, warmup: int, steps: int, after_warmup=None) -> tuple[float, float]:
    """(seconds per step after warm-up, seconds of the first step: compile time shows here).

    The trainer's step already synchronises (it returns the loss as a float), so the timed loop stays honest."""
    sync()
    t0 = time.perf_counter()
    step_fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step_fn()
    if after_warmup is not None:
        after_warmup()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync()
    return (time.perf_counter() - t0) / steps, first


def run_ours(
    name: str,
    steps: int,
    warmup: int,
    extra: list[str],
    profile: str | None,
    warmup_bias_speed: float | None = None,
) -> dict:
    cfg = parse_args(trainer_args(name, steps + warmup + 5, extra))
    trainer = Trainer(cfg)
    speed = cfg.moe.bias_update_speed
    if warmup_bias_speed is not None:  # read by the trainer at every step
        cfg.moe.bias_update_speed = warmup_bias_speed

    def restore_speed():
        cfg.moe.bias_update_speed = speed

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    losses: list[float] = []
    # every step's expert counts (a fresh device tensor each step), kept to see whether balancing converges;
    # read back after the timed loop, not inside it
    counts: list[torch.Tensor] = []

    def step(t=trainer):  # bound here: trainer is deleted before the function returns
        losses.append(t.train_step()["loss"])
        if t.dims.ep > 1:
            counts.append(t._last_counts)

    per_step, first = time_steps(step, warmup, steps, restore_speed)
    # mean of the last 10 timed steps: one step's loss is too noisy to compare precisions by
    tail = losses[-min(10, steps) :]
    out = {"sec_per_step": per_step, "first_step_s": first, "loss": sum(tail) / len(tail)}
    out["tokens_per_step"] = trainer.loader.tokens_per_step
    out["world_size"] = trainer.world_size
    if counts:
        out["ep_rank_load"] = [ep_rank_load(trainer, c) for c in counts]
    if profile:
        out["profile"] = profile_steps(trainer.train_step, Path(profile) / name / f"rank{trainer.rank}")
    peak = torch.tensor(
        torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    )
    if trainer.world_size > 1 and torch.distributed.is_initialized():
        peak = peak.to(trainer.device)
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)  # the largest rank's peak
    out["peak_gib"] = float(peak)
    out["flops"] = trainer.flops_per_token
    out["flops_causal"] = trainer.flops_per_token_causal
    trainer.close(keep_process_group=True)  # the next variant reuses it; main() ends it
    del trainer
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def ep_rank_load(trainer, counts_LE: torch.Tensor) -> float:
    """The busiest EP rank's routed copies over the mean rank's in one step's counts, mean over MoE layers."""
    loads = [v for k, v in moe_stats(trainer.moes, counts_LE, trainer.dims.ep).items()
             if k.endswith("ep_rank_max_over_mean_load")]  # fmt: skip
    return sum(loads) / len(loads) if loads else float("nan")


def profile_steps(step_fn, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        for _ in range(2):
            step_fn()
        sync()
    prof.export_chrome_trace(str(folder / "trace.json"))
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    split = gpu_time(prof.events())
    summary = split.summary(steps=2) if split else "no device kernels"
    (folder / "ops.txt").write_text(f"{summary}\n\n{table}")
    return summary


def hf_config(name: str):
    from transformers import DeepseekV3Config

    m = WORKLOADS[name]["model"]
    return DeepseekV3Config(
        vocab_size=m["vocab_size"],
        hidden_size=m["dim"],
        intermediate_size=m["inter_dim"],
        moe_intermediate_size=m["moe_inter_dim"],
        num_hidden_layers=m["n_layers"],
        first_k_dense_replace=m["n_dense_layers"],
        num_attention_heads=m["n_heads"],
        num_key_value_heads=m["n_heads"],
        n_routed_experts=m["n_routed_experts"],
        n_shared_experts=m["n_shared_experts"],
        num_experts_per_tok=m["n_activated_experts"],
        n_group=m["n_expert_groups"],
        topk_group=m["n_limited_groups"],
        routed_scaling_factor=m["route_scale"],
        norm_topk_prob=m["route_norm"],
        q_lora_rank=m["q_lora_rank"] or None,
        kv_lora_rank=m["kv_lora_rank"],
        qk_nope_head_dim=m["qk_nope_head_dim"],
        qk_rope_head_dim=m["qk_rope_head_dim"],
        v_head_dim=m["v_head_dim"],
        max_position_embeddings=m["max_seq_len"],
        rope_scaling=None,
        tie_word_embeddings=False,
        use_cache=False,
    )


def run_hf(name: str, steps: int, warmup: int) -> dict:
    """transformers' DeepseekV3ForCausalLM in pure bf16 (params and AdamW states), SDPA attention."""
    from transformers import DeepseekV3ForCausalLM

    w = WORKLOADS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_config(name)).to(device=device, dtype=torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, w["model"]["vocab_size"], (w["batch"], w["seq_len"] + 1), device=device)

    def step():
        loss = model(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    per_step, first = time_steps(step, warmup, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    gc.collect()
    return {"sec_per_step": per_step, "first_step_s": first, "peak_gib": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="bench6", choices=sorted(WORKLOADS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also run with [compile] enable (model + loss)")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=OVERRIDES",
        help="an extra run with space-separated trainer overrides, e.g. 'sac=--activation_checkpoint.mode=selective'",
    )
    ap.add_argument("--no-eager", action="store_true", help="skip the plain eager run")
    ap.add_argument("--hf", action="store_true", help="also time transformers' DeepseekV3ForCausalLM")
    ap.add_argument("--profile", default=None, help="write a profiler trace and per-op table here")
    ap.add_argument(
        "--warmup-bias-speed", type=float, default=None, help="expert bias update speed during warm-up only"
    )
    ap.add_argument("extra", nargs="*", help="trainer overrides after --")
    a = ap.parse_args()
    w = WORKLOADS[a.workload]
    import os

    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_flops(device, torch.bfloat16)
    rows = []
    variants = [] if a.no_eager else [("ours eager", a.extra)]
    if a.compile:
        variants.append(("ours compiled", a.extra + ["--compile.enable=true"]))
    for v in a.variant:
        label, _, overrides = v.partition("=")
        variants.append((label, a.extra + overrides.split()))
    for i, (label, extra) in enumerate(variants):
        try:
            r = run_ours(
                a.workload, a.steps, a.warmup, extra, a.profile if i == 0 else None, a.warmup_bias_speed
            )
        except torch.OutOfMemoryError:
            print(f"[rank {rank}] {label}: out of memory", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        rows.append((label, r))
        if rank == 0:
            tps = r["tokens_per_step"] / r["sec_per_step"] / r["world_size"]
            print(
                f"{label}: {tps:,.0f} tok/s/GPU, peak {r['peak_gib']:.1f} GiB, loss {r['loss']:.3f}",
                flush=True,
            )
            if "ep_rank_load" in r:  # first, a few in between, last
                loads = r["ep_rank_load"]
                at = sorted({1, 2, 5, *range(10, len(loads), 10), len(loads)} & set(range(1, len(loads) + 1)))
                trail = ", ".join(f"{i}: {loads[i - 1]:.3f}" for i in at)
                print(f"{label}: busiest EP rank's load over the mean, by step: {trail}", flush=True)
            if "profile" in r:  # rank 0's two profiled steps
                print(f"{label}, profiled: {r['profile']}", flush=True)
        elif "profile" in r:  # every rank's: a rank that waits in the all-to-all shows which one was late
            print(f"{label}, profiled on rank {rank}: {r['profile']}", flush=True)
    if a.hf and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        try:
            rows.append(("HF transformers", run_hf(a.workload, a.steps, a.warmup)))
        except torch.OutOfMemoryError:
            print("HF transformers: out of memory", flush=True)
    from titan_dsv3.models import ModelArgs

    margs = ModelArgs(**w["model"])
    flops, flops_causal = (
        margs.flops_per_token(w["seq_len"], False),
        margs.flops_per_token(w["seq_len"], True),
    )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if rank != 0 or not rows:
        return 0
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    tokens = rows[0][1].get("tokens_per_step", w["batch"] * w["seq_len"]) // rows[0][1].get("world_size", 1)
    print(
        f"\nworkload {a.workload}: {tokens} tokens/step/GPU x {rows[0][1].get('world_size', 1)} GPUs, {flops / 1e9:.2f} GFLOP/token (torchtitan convention), "
        f"device {dev}, torch {torch.__version__}, extra {a.extra}"
    )
    print(
        f"{'system':<22}{'tok/s/GPU':>10}{'ms/step':>10}{'MFU%':>8}{'MFUc%':>8}{'peak GiB':>10}{'1st step s':>12}"
    )
    for label, r in rows:
        tps = r.get("tokens_per_step", tokens) / r.get("world_size", 1) / r["sec_per_step"]
        mfu = 100 * tps * flops / peak if peak else float("nan")
        mfuc = 100 * tps * flops_causal / peak if peak else float("nan")
        print(
            f"{label:<22}{tps:>10,.0f}{1000 * r['sec_per_step']:>10.1f}{mfu:>8.1f}{mfuc:>8.1f}"
            f"{r['peak_gib']:>10.1f}{r['first_step_s']:>12.1f}{r.get('loss', float('nan')):>8.3f}"
        )
    if a.hf and rows and rows[-1][0] == "HF transformers":
        hf_tps = tokens / rows[-1][1]["sec_per_step"]
        for label, r in rows[:-1]:
            print(f"ratio {label} / HF: {tokens / r['sec_per_step'] / hf_tps:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
