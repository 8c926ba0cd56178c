"""The TOMLs in train_configs/: they validate for their world size, build on meta with the counted parameters,
match their names, the preset table and (16B/236B/671B) the released HF configs."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from titan_dsv3.config import parse_args, resolve_model_args
from titan_dsv3.config.__main__ import main as config_main
from titan_dsv3.config.manager import TRAIN_CONFIGS
from titan_dsv3.models import DeepSeekV3Model
from titan_dsv3.models.args import ModelArgs
from titan_dsv3.models.hf import args_from_hf_config
from titan_dsv3.tools.plan import intended_world_size, preset_files, training_configs

CONFIGS = training_configs()
PRESETS = preset_files()


def _args(path: Path) -> ModelArgs:
    return resolve_model_args(
        parse_args(["--job.config_file", str(path)], world_size=intended_world_size(path))
    )


def test_presets_are_there():
    names = {p.stem for p in PRESETS}
    assert names == {f"deepseek_{n}b" for n in (1, 5, 10, 15, 16, 20, 236, 671)}
    assert {"bench6", "debug_model"} <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_validates_for_its_world_size(path, capsys):
    world = intended_world_size(path)
    assert config_main(["--world-size", str(world), "--job.config_file", str(path)]) == 0, (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_builds_on_meta_with_the_counted_parameters(path):
    args = _args(path)
    with torch.device("meta"):
        model = DeepSeekV3Model(args)
    assert sum(p.numel() for p in model.parameters()) == args.num_params()


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_name_matches_parameter_count(path):
    # the name counts the main model, MTP excluded (DeepSeek-V3's 671B convention; budgets count the same way)
    billions = float(path.stem.split("_")[1].rstrip("b"))
    total = _args(path).num_params(include_mtp=False)
    assert abs(total / (billions * 1e9) - 1) <= 0.10


# layers, hidden, KV latent, heads, routed experts, active experts, vocab, context (the project's preset table)
TABLE = {
    "deepseek_1b": (16, 1024, 256, 16, 8, 2, 32768, 8192),
    "deepseek_5b": (24, 2048, 512, 32, 16, 2, 65536, 16384),
    "deepseek_10b": (32, 3072, 768, 48, 32, 4, 102400, 32768),
    "deepseek_15b": (40, 3584, 896, 56, 64, 4, 102400, 65536),
    "deepseek_20b": (48, 4096, 1024, 64, 96, 6, 129280, 65536),
}


@pytest.mark.parametrize("name", TABLE)
def test_small_presets_follow_the_table_and_stretch_rope_with_yarn(name):
    path = next(p for p in PRESETS if p.stem == name)
    cfg = parse_args(["--job.config_file", str(path)], world_size=intended_world_size(path))
    a = resolve_model_args(cfg)
    got = (
        a.n_layers,
        a.dim,
        a.kv_lora_rank,
        a.n_heads,
        a.n_routed_experts,
        a.n_activated_experts,
        a.vocab_size,
        a.max_seq_len,
    )
    assert got == TABLE[name]
    seq = cfg.training.seq_len
    assert a.original_seq_len == seq and a.rope_factor == a.max_seq_len / seq
    assert a.inter_dim == (a.n_activated_experts + a.n_shared_experts) * a.moe_inter_dim
    assert a.n_heads * a.v_head_dim == a.dim and a.mtp_depth == 1


V2_LITE = {
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "first_k_dense_replace": 1,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "greedy",
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
V2 = {
    **V2_LITE,
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 60,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 160,
    "n_group": 8,
    "topk_group": 3,
    "topk_method": "group_limited_greedy",
    "routed_scaling_factor": 16.0,
    "q_lora_rank": 1536,
}
V3 = {
    **V2,
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "num_nextn_predict_layers": 1,
    "rope_scaling": {**V2_LITE["rope_scaling"], "mscale": 1.0, "mscale_all_dim": 1.0},
}


@pytest.mark.parametrize(
    "name, hf, overrides",
    [
        ("deepseek_16b", V2_LITE, {}),
        ("deepseek_236b", V2, {}),
        # the 671B preset trains at 4K without YaRN; its comment names the overrides of the released 128K model
        ("deepseek_671b", V3, {"rope_factor": 40.0, "max_seq_len": 163840}),
    ],
)
def test_hf_shaped_presets_are_the_released_configs(name, hf, overrides):
    ours = dataclasses.replace(_args(next(p for p in PRESETS if p.stem == name)), **overrides)
    theirs = args_from_hf_config(hf)
    skip = {"init_std", "attn_impl"}  # training-only choices, not in config.json's architecture
    diff = {
        f.name: (getattr(ours, f.name), getattr(theirs, f.name))
        for f in dataclasses.fields(ModelArgs)
        if f.name not in skip and getattr(ours, f.name) != getattr(theirs, f.name)
    }
    assert diff == {}


def test_671b_trains_at_4k_without_yarn():
    cfg = parse_args(["--job.config_file", str(TRAIN_CONFIGS / "deepseek_671b.toml")], world_size=256)
    a = resolve_model_args(cfg)
    assert (a.rope_factor, a.max_seq_len, a.original_seq_len, cfg.training.seq_len) == (1.0, 4096, 4096, 4096)


def test_bench6_is_the_reference_workload():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from workloads import WORKLOADS

    cfg = parse_args(["--job.config_file", str(TRAIN_CONFIGS / "bench6.toml")], world_size=1)
    w = WORKLOADS["bench6"]
    assert resolve_model_args(cfg) == ModelArgs(**w["model"])
    assert (cfg.training.local_batch_size, cfg.training.seq_len) == (w["batch"], w["seq_len"])
    assert intended_world_size(TRAIN_CONFIGS / "bench6.toml") == 1
