"""HF config mapping, refused configs, and FP8 block-scaled weights (no transformers needed)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import tiny_model_args

from titan_dsv3.models import DeepSeekV3Model, ModelArgs
from titan_dsv3.models.hf import (
    args_from_hf_config,
    dequantize_fp8_block,
    hf_config_from_args,
    load_hf_pretrained,
    quantize_fp8_block,
    save_hf_pretrained,
    to_hf_state_dict,
)

CFG = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "max_position_embeddings": 64,
}


tiny_args = tiny_model_args


# ---- config ------------------------------------------------------------------------------------------------


def test_router_mapping():
    v2 = args_from_hf_config(
        dict(
            CFG,
            model_type="deepseek_v2",
            n_routed_experts=16,
            num_experts_per_tok=4,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=16.0,
        )
    )
    assert (v2.score_func, v2.group_score, v2.n_expert_groups, v2.n_limited_groups) == (
        "softmax",
        "max",
        4,
        2,
    )
    assert (v2.route_norm, v2.route_scale, v2.n_dense_layers, v2.mtp_depth) == (False, 16.0, 0, 0)
    greedy = args_from_hf_config(
        dict(
            CFG,
            model_type="deepseek_v2",
            n_routed_experts=16,
            num_experts_per_tok=4,
            topk_method="greedy",
            n_group=8,
            topk_group=3,
        )
    )
    assert greedy.n_expert_groups == 1  # greedy top-k ignores the groups
    v3_routing = dict(
        CFG,
        model_type="deepseek_v3",
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        q_lora_rank=None,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
    )
    yarn = dict(factor=40, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=1.0)
    v3 = args_from_hf_config(dict(v3_routing, rope_theta=5e4, rope_scaling=dict(type="yarn", **yarn)))
    assert (v3.score_func, v3.group_score, v3.route_norm, v3.q_lora_rank) == ("sigmoid", "top2_sum", True, 0)
    assert (v3.rope_factor, v3.original_seq_len, v3.rope_theta, v3.max_seq_len) == (40.0, 16, 5e4, 64)
    assert (v3.n_dense_layers, v3.mtp_depth) == (1, 1)
    # transformers 5 keeps the same numbers under rope_parameters
    v3b = args_from_hf_config(
        dict(v3_routing, rope_parameters=dict(rope_type="yarn", rope_theta=5e4, **yarn))
    )
    assert v3b == v3


YARN_40 = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1)
V3_671B = dict(
    model_type="deepseek_v3",
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    first_k_dense_replace=3,
    num_attention_heads=128,
    num_key_value_heads=128,
    n_routed_experts=256,
    n_shared_experts=1,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    max_position_embeddings=163840,
    rope_theta=10000,
    rope_scaling=dict(YARN_40, mscale=1.0, mscale_all_dim=1.0),
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    num_nextn_predict_layers=1,
    scoring_func="sigmoid",
    topk_method="noaux_tc",
    norm_topk_prob=True,
    moe_layer_freq=1,
    ep_size=1,
    aux_loss_alpha=0.001,
    seq_aux=True,
    initializer_range=0.02,
    hidden_act="silu",
    quantization_config=dict(
        activation_scheme="dynamic", fmt="e4m3", quant_method="fp8", weight_block_size=[128, 128]
    ),
)
V2_LITE = dict(
    model_type="deepseek_v2",
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=27,
    first_k_dense_replace=1,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_routed_experts=64,
    n_shared_experts=2,
    num_experts_per_tok=6,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    max_position_embeddings=163840,
    rope_theta=10000,
    rope_scaling=dict(YARN_40, mscale=0.707, mscale_all_dim=0.707),
    topk_method="greedy",
    norm_topk_prob=False,
    scoring_func="softmax",
    tie_word_embeddings=False,
    moe_layer_freq=1,
)
V2_236B = dict(
    V2_LITE,
    hidden_size=5120,
    intermediate_size=12288,
    moe_intermediate_size=1536,
    num_hidden_layers=60,
    num_attention_heads=128,
    num_key_value_heads=128,
    n_routed_experts=160,
    n_group=8,
    topk_group=3,
    routed_scaling_factor=16.0,
    q_lora_rank=1536,
    topk_method="group_limited_greedy",
)


def test_released_configs_map_to_the_published_sizes():
    v3 = args_from_hf_config(V3_671B)
    differs = {k for k, v in ModelArgs().to_dict().items() if getattr(v3, k) != v}
    assert differs == {
        "max_seq_len",
        "rope_factor",
        "mtp_depth",
        "init_std",
    }  # ModelArgs defaults are V3 671B
    assert round(v3.num_params(include_mtp=False) / 1e9) == 671
    assert round(v3.num_params(active=True, include_mtp=False) / 1e9, 1) == 37.6
    lite, v2 = args_from_hf_config(V2_LITE), args_from_hf_config(V2_236B)
    assert round(lite.num_params() / 1e9, 1) == 15.7 and lite.q_lora_rank == 0 and lite.n_expert_groups == 1
    assert round(v2.num_params() / 1e9) == 236 and round(v2.num_params(active=True) / 1e9) == 21
    assert (v2.n_expert_groups, v2.n_limited_groups, v2.group_score, v2.route_scale) == (8, 3, "max", 16.0)
    assert (lite.mscale, lite.mscale_all_dim, lite.rope_factor) == (0.707, 0.707, 40.0)


@pytest.mark.parametrize(
    "change,key",
    [
        (dict(model_type="llama"), "model_type"),
        (dict(scoring_func="softmax"), "scoring_func"),
        (dict(topk_method="greedy"), "topk_method"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(num_key_value_heads=1), "num_key_value_heads"),
        (dict(rope_scaling=dict(type="linear", factor=2.0)), "rope_scaling.type"),
        (dict(rope_scaling=dict(type="yarn", factor=2.0, attention_factor=1.2)), "attention_factor"),
        (dict(rope_interleave=False), "rope_interleave"),
        (dict(moe_layer_freq=2), "moe_layer_freq"),
        (
            dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", norm_topk_prob=True),
            "norm_topk_prob",
        ),
        (dict(quantization_config=dict(quant_method="gptq")), "quantization_config"),
    ],
)
def test_unsupported_configs_are_refused(change, key):
    cfg = dict(
        CFG, model_type="deepseek_v3", n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1
    )
    cfg.update(change)
    with pytest.raises(ValueError, match=key):
        args_from_hf_config(cfg)


def test_config_round_trip():
    plain = tiny_args(q_lora_rank=0, rope_factor=1.0, original_seq_len=64, tie_embeddings=True, mtp_depth=0)
    for args in (tiny_args(), plain):
        assert hf_config_from_args(args)["model_type"] == "deepseek_v3"
        assert args_from_hf_config(hf_config_from_args(args)) == args
    v2 = tiny_args(score_func="softmax", group_score="max", route_norm=False, mtp_depth=0)
    assert hf_config_from_args(v2)["model_type"] == "deepseek_v2"
    assert args_from_hf_config(hf_config_from_args(v2)) == v2
    with pytest.raises(ValueError, match="route_norm"):
        hf_config_from_args(tiny_args(score_func="softmax", group_score="max", mtp_depth=0))
    with pytest.raises(ValueError, match="score_func"):
        hf_config_from_args(v2, model_type="deepseek_v3")


# ---- FP8 ---------------------------------------------------------------------------------------------------

# float8_e4m3fn keeps 3 mantissa bits, so rounding to nearest moves a normal value by at most half a step:
# |error| <= 2^-4 |x| (a step is 2^-3 of the value's power of two, which is <= |x|). Below 2^-6 (subnormal) the
# step is a fixed 2^-9, so |error| <= 2^-10 there. In the weight's units (times scale_inv = block amax / 448):
# |dequant(w) - w| <= 2^-4 |w| + 2^-10 scale_inv, and per block <= 2^-4 of the block's largest |w| (+0.0005%).
# The fp32 division and product add ~2^-24 relative, covered by the 1e-6 slack.
REL, SUB = 2.0**-4, 2.0**-10


def fp8_error_bound(w: torch.Tensor, scale_inv: torch.Tensor, block: int) -> torch.Tensor:
    s = scale_inv.repeat_interleave(block, 0)[: w.shape[0]].repeat_interleave(block, 1)[:, : w.shape[1]]
    return (REL + 1e-6) * w.abs() + SUB * s


def test_dequantize_is_blockwise_product():
    torch.manual_seed(0)
    m, n, b = 300, 200, 128  # 3 x 2 blocks, the last row and column of blocks ragged
    w = (torch.randn(m, n) * 50).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(3, 2) + 0.1
    ref = torch.empty(m, n)
    for bi in range(3):
        for bj in range(2):
            rows, cols = slice(bi * b, (bi + 1) * b), slice(bj * b, (bj + 1) * b)
            ref[rows, cols] = w[rows, cols].float() * scale_inv[bi, bj]
    assert torch.equal(dequantize_fp8_block(w, scale_inv), ref)
    assert dequantize_fp8_block(w, scale_inv, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="tile"):
        dequantize_fp8_block(w, torch.ones(2, 2))


def test_quantize_round_trip_within_fp8_rounding():
    torch.manual_seed(0)
    m, n, b = 300, 200, 128
    w = torch.randn(m, n)
    w[:128, :128] *= 1e-3  # blocks of very different magnitude each get their own scale
    w[128:256, 128:] *= 1e2
    w[256:, :128] = 0.0  # an all-zero block stays zero
    q, scale_inv = quantize_fp8_block(w, b)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (3, 2) and scale_inv.dtype == torch.float32
    deq = dequantize_fp8_block(q, scale_inv, b)
    err = (deq - w).abs()
    assert (err <= fp8_error_bound(w, scale_inv, b)).all()
    assert torch.equal(deq[256:, :128], torch.zeros(44, 128))
    for bi in range(3):
        for bj in range(2):
            blk = (slice(bi * b, (bi + 1) * b), slice(bj * b, (bj + 1) * b))
            assert err[blk].max() <= (REL + 1e-6) * w[blk].abs().max()
    nonzero = w.abs() > 0
    assert (err[nonzero] / w.abs()[nonzero]).max() > 2.0**-6  # it really rounded to 3 mantissa bits


def test_fp8_checkpoint_loads_dequantized(tmp_path):
    """A DeepSeek-style FP8 checkpoint: linear weights float8 + <name>_scale_inv, everything else as stored."""
    args = tiny_args()
    torch.manual_seed(0)
    model = DeepSeekV3Model(args)
    model.init_weights()
    save_hf_pretrained(model.state_dict(), args, tmp_path)
    hf_sd = load_file(tmp_path / "model.safetensors")
    block = 32  # several blocks per matrix, ragged ones where a side is not a multiple of 32 (e.g. 24 rows)
    quantized, fp8_sd = {}, {}
    for name, t in hf_sd.items():
        skip = ("embed_tokens", "lm_head", "shared_head.head", "norm", "mlp.gate.")
        if t.dim() == 2 and not any(s in name for s in skip):
            q, s = quantize_fp8_block(t, block)
            fp8_sd[name], fp8_sd[name + "_scale_inv"] = q, s
            quantized[name] = (t, q, s)
        else:
            fp8_sd[name] = t
    assert any(t.shape[0] % block for t, _, _ in quantized.values())
    save_file(fp8_sd, str(tmp_path / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    _, sd_bf16 = load_hf_pretrained(tmp_path)
    assert sd_bf16["layers.0.attention.wq_a.weight"].dtype == torch.bfloat16  # FP8 -> bf16 unless asked
    args2, sd = load_hf_pretrained(tmp_path, dtype=torch.float32)
    back = to_hf_state_dict(sd, args2)
    for name, (orig, q, s) in quantized.items():
        got = back[name]
        assert torch.equal(got, dequantize_fp8_block(q, s, block)), name
        assert ((got - orig).abs() <= fp8_error_bound(orig, s, block)).all(), name
    for name, t in hf_sd.items():
        if name not in quantized:
            assert torch.equal(back[name], t), name
    DeepSeekV3Model(args2).load_state_dict(sd)
