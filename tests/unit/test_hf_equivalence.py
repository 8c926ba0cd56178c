"""Our model equals transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM on the same weights.

Each case builds the HF model from a config on CPU in fp32 with a seeded random init, perturbs the norms (all
ones would hide a swapped norm mapping) and the expert biases, saves it with save_pretrained, loads it with our
load_hf_pretrained and compares logits and loss in eval mode with eager attention.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny import tiny_model_args

transformers = pytest.importorskip("transformers")

from titan_dsv3.models import DeepSeekV3Model, ModelArgs  # noqa: E402
from titan_dsv3.models.hf import (  # noqa: E402
    args_from_hf_config,
    from_hf_state_dict,
    load_hf_pretrained,
    save_hf_pretrained,
    to_hf_state_dict,
)

TOL = 1e-4  # max |ours - HF| / max |HF logit|; fp32 differences measured here are ~1e-6

BASE = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,  # logits of order 1, so routing and attention are far from uniform
}
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
}

# (id, model_type, config overrides, sequence length). Together: softmax and sigmoid routers, plain and
# group-limited top-k, route_scale 1 / 1.5 / 2.5 / 16, normalised and unnormalised gates, q_lora_rank 0 and 32,
# 0 / 1 / 3 dense layers, YaRN with sequences past original_seq_len (mscale ratio and mscale_all_dim), tied head.
CASES = [
    (
        "v3_groups_yarn",
        "deepseek_v3",
        dict(
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            q_lora_rank=32,
            routed_scaling_factor=2.5,
            rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=0.8),
        ),
        48,
    ),
    (
        "v3_plain_topk_unnormalised_tied",
        "deepseek_v3",
        dict(
            num_hidden_layers=2,
            first_k_dense_replace=0,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            q_lora_rank=None,
            norm_topk_prob=False,
            routed_scaling_factor=1.5,
            tie_word_embeddings=True,
        ),
        24,
    ),
    (
        "v3_three_dense_topk_all",
        "deepseek_v3",
        dict(
            num_hidden_layers=4,
            first_k_dense_replace=3,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=8,
            n_group=2,
            topk_group=2,
            q_lora_rank=32,
            routed_scaling_factor=1.0,
            rope_parameters=dict(YARN, factor=2.0, mscale=0.5, mscale_all_dim=1.0),
        ),
        40,
    ),
    (
        "v2_lite_greedy_yarn",
        "deepseek_v2",
        dict(
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=16,
            n_shared_experts=2,
            num_experts_per_tok=6,
            q_lora_rank=None,
            topk_method="greedy",
            routed_scaling_factor=1.0,
            rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707),
        ),
        48,
    ),
    (
        "v2_group_limited",
        "deepseek_v2",
        dict(
            num_hidden_layers=2,
            first_k_dense_replace=1,
            n_routed_experts=16,
            n_shared_experts=2,
            num_experts_per_tok=4,
            q_lora_rank=32,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=16.0,
        ),
        32,
    ),
]
CASE_IDS = [c[0] for c in CASES]


def build_hf(model_type: str, overrides: dict, seed: int = 0):
    if model_type == "deepseek_v3":
        overrides = {"num_nextn_predict_layers": 0, **overrides}
        config = transformers.DeepseekV3Config(**BASE, **overrides, attn_implementation="eager")
        cls = transformers.DeepseekV3ForCausalLM
    else:
        config = transformers.DeepseekV2Config(**BASE, **overrides, attn_implementation="eager")
        cls = transformers.DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # transformers 4.x masked unselected groups with 0.0 where we (and the installed 5.x) use -inf;
                # the two agree only while every score + bias > 0 (sigmoid scores here are ~0.2-0.8).
                b.copy_(0.05 * torch.randn_like(b))
    return model


def ours_logits(model: DeepSeekV3Model, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return out[0] if isinstance(out, tuple) else out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case's HF model saved once: id -> (hf model, folder)."""
    out = {}
    for case_id, model_type, overrides, _ in CASES:
        hf = build_hf(model_type, overrides)
        folder = tmp_path_factory.mktemp(case_id)
        hf.save_pretrained(folder)
        out[case_id] = (hf, folder)
    return out


@pytest.mark.parametrize("case_id,model_type,overrides,seqlen", CASES, ids=CASE_IDS)
def test_logits_and_loss_equal_hf(saved, case_id, model_type, overrides, seqlen):
    hf, folder = saved[case_id]
    args, sd = load_hf_pretrained(folder)
    if args.rope_factor > 1:
        assert seqlen > args.original_seq_len  # YaRN changes positions past the pretraining length
    assert (args.score_func == "softmax") == (model_type == "deepseek_v2")
    model = DeepSeekV3Model(args).eval()
    model.load_state_dict(sd)
    if model_type == "deepseek_v3":
        assert any(b.abs().sum() > 0 for n, b in model.named_buffers() if n.endswith("expert_bias"))
    torch.manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (2, seqlen))
    with torch.no_grad():
        ref = hf(tokens, labels=tokens)
        logits = ours_logits(model, tokens)
    assert rel_diff(logits, ref.logits) <= TOL
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(loss.item() - ref.loss.item()) <= TOL * ref.loss.item()


@pytest.mark.parametrize(
    "case_id", ["v3_groups_yarn", "v3_plain_topk_unnormalised_tied", "v2_lite_greedy_yarn"]
)
def test_round_trip_is_exact(saved, case_id):
    _, folder = saved[case_id]
    hf_sd = load_file(folder / "model.safetensors")
    args = args_from_hf_config(json.loads((folder / "config.json").read_text()))
    back = to_hf_state_dict(from_hf_state_dict(hf_sd, args), args)
    if args.score_func == "softmax":  # V2 has no expert bias; ours is zero and save_hf_pretrained drops it
        back = {n: t for n, t in back.items() if not n.endswith("e_score_correction_bias")}
    assert back.keys() == hf_sd.keys()
    for name, t in hf_sd.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_in_memory_hf_layout_loads(saved):
    """transformers' modules pack experts as gate_up_proj (E, 2I, D); from_hf_state_dict takes that too."""
    hf, folder = saved["v3_groups_yarn"]
    args = args_from_hf_config(json.loads((folder / "config.json").read_text()))
    from_modules = from_hf_state_dict(hf.state_dict(), args)
    from_file = from_hf_state_dict(load_file(folder / "model.safetensors"), args)
    assert from_modules.keys() == from_file.keys()
    for name in from_file:
        assert torch.equal(from_modules[name], from_file[name]), name


def _random_ours(args: ModelArgs, seed: int = 0) -> DeepSeekV3Model:
    torch.manual_seed(seed)
    model = DeepSeekV3Model(args)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        if args.score_func == "sigmoid":
            for name, b in model.named_buffers():
                if name.endswith("expert_bias"):
                    b.copy_(0.05 * torch.randn_like(b))
    return model.eval()


_tiny_args = tiny_model_args


@pytest.mark.parametrize(
    "kw,hf_class",
    [
        ({}, "DeepseekV3ForCausalLM"),
        (dict(mtp_depth=2, tie_embeddings=True, q_lora_rank=0), "DeepseekV3ForCausalLM"),
        (
            dict(score_func="softmax", group_score="max", route_norm=False, route_scale=16.0, mtp_depth=0),
            "DeepseekV2ForCausalLM",
        ),
    ],
    ids=["v3_mtp1", "v3_mtp2_tied_q0", "v2"],
)
def test_save_loads_in_transformers(tmp_path, kw, hf_class):
    args = _tiny_args(**kw)
    model = _random_ours(args)
    save_hf_pretrained(model.state_dict(), args, tmp_path)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert type(hf).__name__ == hf_class
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # only the MTP layers, which transformers does not model, are left over
    mtp_prefixes = tuple(f"model.layers.{args.n_layers + k}." for k in range(args.mtp_depth))
    assert all(k.startswith(mtp_prefixes) for k in info["unexpected_keys"])
    assert bool(info["unexpected_keys"]) == bool(args.mtp_depth)
    torch.manual_seed(2)
    tokens = torch.randint(0, args.vocab_size, (2, 40))
    with torch.no_grad():
        assert rel_diff(ours_logits(model, tokens), hf.eval()(tokens).logits) <= TOL
    # and back: our loader gives every tensor of the model, MTP included
    args2, sd2 = load_hf_pretrained(tmp_path)
    assert args2 == args
    sd = model.state_dict()
    sd.pop("rope_cache", None)
    assert sd2.keys() == sd.keys()
    for name, t in sd.items():
        assert torch.equal(sd2[name], t), name


def test_sharded_checkpoints_load(tmp_path, saved):
    hf, folder = saved["v3_groups_yarn"]
    _, sd_single = load_hf_pretrained(folder)
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "hf_sharded").glob("*.safetensors"))) > 1
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").exists()
    args, sd = load_hf_pretrained(tmp_path / "hf_sharded")
    assert sd.keys() == sd_single.keys() and all(torch.equal(sd[n], sd_single[n]) for n in sd)
    # our writer shards too, with an index that covers every tensor
    save_hf_pretrained(sd, args, tmp_path / "ours_sharded", max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "ours_sharded" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / "ours_sharded" / f).exists() for f in files)
    _, sd_back = load_hf_pretrained(tmp_path / "ours_sharded")
    assert sd_back.keys() == sd.keys() and all(torch.equal(sd_back[n], sd[n]) for n in sd)


def test_mtp_config_without_weights_loads_without_mtp(tmp_path):
    hf = build_hf("deepseek_v3", dict(CASES[1][2], num_nextn_predict_layers=1))
    hf.save_pretrained(tmp_path)  # transformers writes num_nextn_predict_layers = 1 but no MTP weights
    args, sd = load_hf_pretrained(tmp_path)
    assert args.mtp_depth == 0
    DeepSeekV3Model(args).load_state_dict(sd)


def test_dtype(saved, tmp_path):
    _, folder = saved["v3_groups_yarn"]
    args, sd = load_hf_pretrained(folder)
    assert all(t.dtype == torch.float32 for t in sd.values())
    _, sd16 = load_hf_pretrained(folder, dtype=torch.bfloat16)
    for name, t in sd16.items():
        want = torch.float32 if name.endswith("expert_bias") else torch.bfloat16
        assert t.dtype == want, name
        assert torch.equal(t, sd[name].to(want)), name
    # a bf16 model is written and read back in bf16
    save_hf_pretrained(sd16, args, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, back = load_hf_pretrained(tmp_path)
    assert all(torch.equal(back[n], t) and back[n].dtype == t.dtype for n, t in sd16.items())
