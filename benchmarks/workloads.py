"""Named benchmark workloads, defined once: model fields, batch and sequence length.

bench6 is the reference workload of the project's GPU notes: the DeepSeek-V2-Lite/16B shape cut to 6 layers
(1 dense + 5 MoE), 3.42B parameters, batch 4 x seq 4096 = 16,384 tokens per step on one GPU.
"""

from __future__ import annotations

_V2_LITE = {
    "vocab_size": 102400,
    "dim": 2048,
    "inter_dim": 10944,
    "moe_inter_dim": 1408,
    "n_heads": 16,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "n_activated_experts": 6,
    "n_expert_groups": 1,
    "n_limited_groups": 1,
    "score_func": "softmax",
    "group_score": "max",
    "route_norm": False,
    "route_scale": 1.0,
    "capacity_factor": 0.0,
    "q_lora_rank": 0,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_seq_len": 4096,
    "original_seq_len": 4096,
    "rope_theta": 10000.0,
    "rope_factor": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "norm_eps": 1e-6,
    "mtp_depth": 0,
    "init_std": 0.006,
    "attn_impl": "sdpa",
    "tie_embeddings": False,
}

WORKLOADS: dict[str, dict] = {
    "bench6": {
        "model": {**_V2_LITE, "n_layers": 6, "n_dense_layers": 1},
        "batch": 4,
        "seq_len": 4096,
    },
    # DeepSeek-V3 routing on a bench6-sized body: sigmoid scores, 8 groups (4 allowed), top-8 of 96 experts,
    # q low-rank; expert width chosen so active parameters stay close to bench6's.
    "v3router6": {
        "model": {
            **_V2_LITE,
            "n_layers": 6,
            "n_dense_layers": 1,
            "n_routed_experts": 96,
            "n_activated_experts": 8,
            "n_shared_experts": 1,
            "moe_inter_dim": 1024,
            "n_expert_groups": 8,
            "n_limited_groups": 4,
            "score_func": "sigmoid",
            "group_score": "top2_sum",
            "route_norm": True,
            "route_scale": 2.5,
            "q_lora_rank": 1536,
        },
        "batch": 4,
        "seq_len": 4096,
    },
    # The full DeepSeek-V2-Lite shape (27 layers, 15.7B parameters): the 16B preset, 4 x 4096 tokens per GPU.
    "deepseek16b": {
        "model": {**_V2_LITE, "n_layers": 27, "n_dense_layers": 1},
        "batch": 4,
        "seq_len": 4096,
    },
    # The 16B shape cut to 14 layers (1 dense + 13 MoE, 8.1B parameters): the same per-layer work in about half the
    # memory. On 2 GPUs it runs without activation checkpointing (as the full depth can on 4), and torchtitan, which
    # keeps fp32 Adam moments (16 B a parameter: 126 GB a GPU at full depth on 2 GPUs), fits beside it.
    "deepseek16b_14l": {
        "model": {**_V2_LITE, "n_layers": 14, "n_dense_layers": 1},
        "batch": 4,
        "seq_len": 4096,
    },
    # The same model at 64K context (YaRN x16 over 4K) for context parallelism: one sequence per data rank.
    "deepseek16b_64k": {
        "model": {
            **_V2_LITE,
            "n_layers": 27,
            "n_dense_layers": 1,
            "max_seq_len": 65536,
            "rope_factor": 16.0,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "batch": 1,
        "seq_len": 65536,
    },
    # A few seconds on CPU: for checking the benchmark itself.
    "tiny": {
        "model": {
            **_V2_LITE,
            "vocab_size": 2048,
            "dim": 64,
            "inter_dim": 128,
            "moe_inter_dim": 32,
            "n_heads": 2,
            "n_routed_experts": 8,
            "n_activated_experts": 2,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "kv_lora_rank": 32,
            "n_layers": 2,
            "n_dense_layers": 1,
            "max_seq_len": 128,
        },
        "batch": 2,
        "seq_len": 128,
    },
}


def trainer_args(name: str, steps: int, extra: list[str] | None = None) -> list[str]:
    """Command-line overrides that make the Trainer run workload `name` for `steps` steps."""
    w = WORKLOADS[name]
    args = [f"--model.{k}={v}" for k, v in w["model"].items()]
    args += [
        f"--training.seq_len={w['seq_len']}",
        f"--training.local_batch_size={w['batch']}",
        f"--training.steps={steps}",
        "--lr_scheduler.warmup_steps=2",
        "--metrics.log_freq=1000000",
        "--metrics.enable_tensorboard=false",
        "--metrics.enable_jsonl=false",
        "--data.embedded_max_bytes=2000000",
        "--job.dump_folder=/tmp/titan_dsv3_bench",
    ]
    return args + (extra or [])
