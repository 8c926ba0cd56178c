"""Shared test helpers: a tiny model and the command-line arguments of a tiny, fast, deterministic run."""

# A model small enough that a training step takes milliseconds on one CPU core.
TINY_MODEL = {
    "vocab_size": 2048,
    "dim": 32,
    "inter_dim": 64,
    "moe_inter_dim": 16,
    "n_layers": 2,
    "n_dense_layers": 1,
    "n_heads": 2,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "n_activated_experts": 2,
    "n_expert_groups": 2,
    "n_limited_groups": 1,
    "score_func": "sigmoid",
    "group_score": "top2_sum",
    "route_norm": True,
    "route_scale": 1.0,
    "capacity_factor": 0.0,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "max_seq_len": 64,
    "original_seq_len": 64,
    "rope_theta": 10000.0,
    "rope_factor": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "norm_eps": 1e-6,
    "mtp_depth": 1,
    "init_std": 0.02,
    "attn_impl": "sdpa",
    "tie_embeddings": False,
}


def tiny_args(tmp_path, **overrides) -> list[str]:
    """Command-line arguments for a tiny, fast, deterministic run in tmp_path."""
    args = [f"--model.{k}={v}" for k, v in TINY_MODEL.items()]
    base = {
        "job.dump_folder": str(tmp_path / "run"),
        "job.deterministic": "true",
        "training.seq_len": "32",
        "training.local_batch_size": "2",
        "training.steps": "4",
        "data.embedded_max_bytes": "300000",
        "metrics.log_freq": "1",
        "metrics.enable_tensorboard": "false",
        "lr_scheduler.warmup_steps": "2",
        "optimizer.lr": "3e-3",
    }
    base.update(overrides)
    return args + [f"--{k}={v}" for k, v in base.items()]


def tiny_model_args(**kw):
    """A 3-layer MoE ModelArgs (q low-rank, YaRN x4, MTP 1, wide init) for model-level comparisons."""
    from titan_dsv3.models import ModelArgs

    base = dict(
        vocab_size=128,
        dim=64,
        inter_dim=96,
        moe_inter_dim=32,
        n_layers=3,
        n_dense_layers=1,
        n_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=2,
        n_limited_groups=1,
        route_scale=2.5,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_seq_len=64,
        original_seq_len=16,
        rope_factor=4.0,
        mscale=1.0,
        mscale_all_dim=1.0,
        mtp_depth=1,
        init_std=0.1,
    )
    base.update(kw)
    return ModelArgs(**base)
