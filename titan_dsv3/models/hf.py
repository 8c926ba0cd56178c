"""HF checkpoints in and out: config.json <-> ModelArgs, safetensors names <-> ours, FP8 block-scaled weights.

Reads the layout of DeepSeek's released checkpoints and of transformers' save_pretrained (model_type deepseek_v3
or deepseek_v2): routed experts one tensor per expert and projection, MTP modules as extra decoder layers
``model.layers.{n_layers + k}`` with enorm/hnorm/eh_proj/shared_head, and FP8 weights (float8_e4m3fn with a
``<name>_scale_inv`` fp32 tensor of 128 x 128 block scales). Writes the same layout in the model's dtype, so that
transformers' AutoModelForCausalLM.from_pretrained loads it (it skips the MTP layers, which it does not model).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

from titan_dsv3.models.args import ModelArgs

logger = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"

# ---- config.json <-> ModelArgs ----------------------------------------------------------------------------

# Keys whose value must be the one given (anything else changes the computation in a way we do not model).
_FIXED = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rope_interleave": True,
    "moe_layer_freq": 1,
    "pretraining_tp": 1,
}


def _rope_dict(cfg: dict) -> tuple[dict, float]:
    """The YaRN parameters (empty when RoPE is plain) and rope_theta, from rope_parameters or rope_scaling."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta") or cfg.get("rope_theta") or 10000.0
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return {}, float(theta)
    if rope_type != "yarn":
        raise ValueError(f"rope_scaling.type = {rope_type!r} is not supported; only 'yarn' or none")
    for key in ("attention_factor", "partial_rotary_factor"):
        if params.get(key) is not None:
            raise ValueError(f"rope_scaling.{key} is not supported")
    if params.get("truncate", True) is not True:
        raise ValueError("rope_scaling.truncate = false is not supported")
    return params, float(theta)


def _yarn_args(yarn: dict, factor: float) -> dict:
    if not yarn:
        return {}  # plain RoPE: the YaRN fields keep their defaults and are not used
    return {
        "rope_factor": float(factor),
        "beta_fast": yarn.get("beta_fast") or 32,
        "beta_slow": yarn.get("beta_slow") or 1,
        # A missing mscale means "absent" to transformers; 0 takes the same branches in rope.py.
        "mscale": float(yarn.get("mscale") or 0.0),
        "mscale_all_dim": float(yarn.get("mscale_all_dim") or 0.0),
    }


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs for an HF config.json dict of model_type deepseek_v3 or deepseek_v2; ValueError names a bad key."""
    model_type = cfg.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise ValueError(f"model_type = {model_type!r} is not supported; use deepseek_v3 or deepseek_v2")
    v2 = model_type == "deepseek_v2"
    for key, want in _FIXED.items():
        if cfg.get(key, want) not in (want, None):
            raise ValueError(f"{key} = {cfg[key]!r} is not supported (only {want!r})")
    heads = cfg["num_attention_heads"]
    if cfg.get("num_key_value_heads", heads) not in (heads, None):
        raise ValueError(
            f"num_key_value_heads = {cfg['num_key_value_heads']} must equal num_attention_heads = {heads}"
        )
    if cfg.get("v_head_dim") is None:
        raise ValueError("v_head_dim must be set")
    quant = cfg.get("quantization_config")
    if quant is not None and quant.get("quant_method") != "fp8":
        raise ValueError(
            f"quantization_config.quant_method = {quant.get('quant_method')!r}; only fp8 is supported"
        )

    n_experts = cfg.get("n_routed_experts") or 0
    n_layers = cfg["num_hidden_layers"]
    n_dense = n_layers if n_experts == 0 else min(cfg.get("first_k_dense_replace") or 0, n_layers)
    top_k = cfg.get("num_experts_per_tok") or 1
    n_group = cfg.get("n_group") or 1
    topk_group = cfg.get("topk_group") or 1
    scoring = cfg.get("scoring_func", "softmax" if v2 else "sigmoid")
    method = cfg.get("topk_method", "greedy" if v2 else "noaux_tc")
    route_norm = bool(cfg.get("norm_topk_prob", False if v2 else True))
    if v2:
        # transformers' V2 router: softmax, top-k of the scores (group-limited: a group scored by its best expert,
        # the others masked to 0), weights never normalised, times routed_scaling_factor; no bias.
        if scoring != "softmax":
            raise ValueError(f"scoring_func = {scoring!r} is not supported for deepseek_v2 (only 'softmax')")
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"topk_method = {method!r} is not supported for deepseek_v2")
        if route_norm:
            # DeepSeek's V2 code would normalise, transformers' does not: the checkpoint's meaning is ambiguous
            raise ValueError(
                "norm_topk_prob = true is not supported for deepseek_v2 (transformers ignores it)"
            )
        if method == "greedy":
            n_group, topk_group = 1, 1
        group_score = "max"
    else:
        # transformers' V3 router: sigmoid, choice by score + e_score_correction_bias, groups scored by the sum
        # of their two best experts, gate from the unbiased score, optional normalisation, routed_scaling_factor.
        if scoring != "sigmoid":
            raise ValueError(f"scoring_func = {scoring!r} is not supported for deepseek_v3 (only 'sigmoid')")
        if method != "noaux_tc":
            raise ValueError(f"topk_method = {method!r} is not supported for deepseek_v3 (only 'noaux_tc')")
        group_score = "top2_sum"

    yarn, theta = _rope_dict(cfg)
    max_pos = cfg.get("max_position_embeddings", 4096)
    factor, original = 1.0, max_pos
    if yarn:
        original = yarn.get("original_max_position_embeddings") or max_pos
        factor = yarn.get("factor")
        if factor is None:
            factor = max_pos / original
    q_lora = cfg.get("q_lora_rank") or 0
    args = ModelArgs(
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        inter_dim=cfg["intermediate_size"],
        moe_inter_dim=cfg.get("moe_intermediate_size") or 0,
        n_layers=n_layers,
        n_dense_layers=n_dense,
        n_heads=heads,
        n_routed_experts=n_experts,
        n_shared_experts=cfg.get("n_shared_experts") or 0,
        n_activated_experts=top_k,
        n_expert_groups=n_group,
        n_limited_groups=topk_group,
        score_func=scoring,
        group_score=group_score,
        route_norm=route_norm,
        route_scale=float(cfg.get("routed_scaling_factor", 1.0)),
        q_lora_rank=q_lora,
        kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"],
        qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"],
        max_seq_len=max_pos,
        original_seq_len=original,
        rope_theta=theta,
        **_yarn_args(yarn, factor),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        mtp_depth=0 if v2 else cfg.get("num_nextn_predict_layers") or 0,
        init_std=cfg.get("initializer_range", 0.02),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    args.validate()
    return args


def default_model_type(args: ModelArgs) -> str:
    """deepseek_v2 for a softmax router, deepseek_v3 for a sigmoid one."""
    return "deepseek_v2" if args.score_func == "softmax" else "deepseek_v3"


def _check_expressible(args: ModelArgs, model_type: str) -> None:
    grouped = args.n_expert_groups > 1
    if model_type == "deepseek_v3":
        if args.score_func != "sigmoid":
            raise ValueError("model.score_func = 'softmax' cannot be written as deepseek_v3; use deepseek_v2")
        if grouped and args.group_score != "top2_sum":
            raise ValueError("model.group_score must be 'top2_sum' for deepseek_v3")
    elif model_type == "deepseek_v2":
        if args.score_func != "softmax":
            raise ValueError("model.score_func = 'sigmoid' cannot be written as deepseek_v2; use deepseek_v3")
        if grouped and args.group_score != "max":
            raise ValueError("model.group_score must be 'max' for deepseek_v2")
        if args.route_norm:
            raise ValueError(
                "model.route_norm = true cannot be written as deepseek_v2 (its router never normalises)"
            )
        if args.mtp_depth:
            raise ValueError("model.mtp_depth > 0 cannot be written as deepseek_v2")
    else:
        raise ValueError(f"model_type = {model_type!r}; use deepseek_v3 or deepseek_v2")


def hf_config_from_args(args: ModelArgs, model_type: str | None = None) -> dict:
    """An HF config.json dict; model_type defaults to deepseek_v3 (sigmoid router) or deepseek_v2 (softmax)."""
    model_type = model_type or default_model_type(args)
    _check_expressible(args, model_type)
    v2 = model_type == "deepseek_v2"
    rope_scaling = None
    if args.rope_factor > 1:
        rope_scaling = {
            "type": "yarn",
            "factor": args.rope_factor,
            "original_max_position_embeddings": args.original_seq_len,
            "beta_fast": args.beta_fast,
            "beta_slow": args.beta_slow,
        }
        if args.mscale:
            rope_scaling["mscale"] = args.mscale
        if args.mscale_all_dim:
            rope_scaling["mscale_all_dim"] = args.mscale_all_dim
    grouped = args.n_expert_groups > 1
    cfg = {
        "architectures": ["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"],
        "model_type": model_type,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim,
        "num_hidden_layers": args.n_layers,
        "first_k_dense_replace": args.n_dense_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,
        "n_routed_experts": args.n_routed_experts,
        "n_shared_experts": args.n_shared_experts,
        "num_experts_per_tok": args.n_activated_experts,
        "n_group": args.n_expert_groups,
        "topk_group": args.n_limited_groups,
        "routed_scaling_factor": args.route_scale,
        "scoring_func": args.score_func,
        "topk_method": ("group_limited_greedy" if grouped else "greedy") if v2 else "noaux_tc",
        "norm_topk_prob": args.route_norm,
        "moe_layer_freq": 1,
        "q_lora_rank": args.q_lora_rank or None,
        "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": args.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": args.tie_embeddings,
        "initializer_range": args.init_std,
    }
    if not v2:
        cfg["num_nextn_predict_layers"] = args.mtp_depth
        cfg["rope_interleave"] = True
    return cfg


# ---- FP8 block scaling -------------------------------------------------------------------------------------


def _expand_blocks(scale: torch.Tensor, shape: torch.Size, block: int) -> torch.Tensor:
    # (ceil(M / b), ceil(N / b)) -> (M, N): each scale covers a b x b tile, edge tiles cut to the matrix
    return scale.repeat_interleave(block, 0)[: shape[0]].repeat_interleave(block, 1)[:, : shape[1]]


def dequantize_fp8_block(
    w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """w (M, N) float8 times its (ceil(M/block), ceil(N/block)) fp32 block scales, as dtype."""
    if w.dim() != 2 or scale_inv.shape != (math.ceil(w.shape[0] / block), math.ceil(w.shape[1] / block)):
        raise ValueError(
            f"scale_inv {tuple(scale_inv.shape)} does not tile weight {tuple(w.shape)} by {block}"
        )
    out = w.float() * _expand_blocks(scale_inv.float(), w.shape, block)
    return out.to(dtype)


def quantize_fp8_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_fp8 float8_e4m3fn, scale_inv fp32) with each block's absolute max mapped to 448."""
    m, n = w.shape
    mb, nb = math.ceil(m / block), math.ceil(n / block)
    padded = torch.zeros(mb * block, nb * block, dtype=torch.float32, device=w.device)
    padded[:m, :n] = w.float()
    amax = padded.view(mb, block, nb, block).abs().amax(dim=(1, 3))  # (mb, nb)
    scale_inv = amax.clamp_min(1e-12) / FP8_MAX
    scaled = w.float() / _expand_blocks(scale_inv, w.shape, block)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale_inv


def dequantize_state_dict(
    sd: dict[str, torch.Tensor], block: int = 128, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Replace every float8 weight that has a ``<name>_scale_inv`` partner by its dequantised value."""
    out = {}
    for name, t in sd.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in sd:
                raise ValueError(f"{name} has no weight {name[: -len(SCALE_SUFFIX)]}")
            continue
        scale = sd.get(name + SCALE_SUFFIX)
        if scale is not None:
            t = dequantize_fp8_block(t, scale, block, dtype)
        elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ValueError(f"{name} is float8 but has no {name + SCALE_SUFFIX}")
        out[name] = t
    return out


# ---- names ---------------------------------------------------------------------------------------------------

_ATTN = {
    "wq": "q_proj",
    "wq_a": "q_a_proj",
    "q_norm": "q_a_layernorm",
    "wq_b": "q_b_proj",
    "wkv_a": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm",
    "wkv_b": "kv_b_proj",
    "wo": "o_proj",
}
_FFN = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_BLOCK = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_BLOCK.update({f"attention.{o}.weight": f"self_attn.{h}.weight" for o, h in _ATTN.items()})
_BLOCK.update({f"feed_forward.{o}.weight": f"mlp.{h}.weight" for o, h in _FFN.items()})
_BLOCK.update({f"moe.shared_experts.{o}.weight": f"mlp.shared_experts.{h}.weight" for o, h in _FFN.items()})
_BLOCK.update(
    {"moe.gate.weight": "mlp.gate.weight", "moe.gate.expert_bias": "mlp.gate.e_score_correction_bias"}
)
_BLOCK_FROM_HF = {h: o for o, h in _BLOCK.items()}
_MTP = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "norm.weight": "shared_head.norm.weight",
}
_MTP_FROM_HF = {h: o for o, h in _MTP.items()}
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _unwrap(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor from a sharded model


def to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our state dict -> HF checkpoint names (one tensor per routed expert, MTP as extra layers)."""
    out: dict[str, torch.Tensor] = {}

    def block(prefix: str, hf_prefix: str, items: dict[str, torch.Tensor]) -> None:
        for name, t in items.items():
            if name.startswith("moe.experts."):
                proj = _FFN[name.removeprefix("moe.experts.")]
                for j in range(t.shape[0]):
                    out[f"{hf_prefix}mlp.experts.{j}.{proj}.weight"] = t[j]
            elif name in _BLOCK:
                out[hf_prefix + _BLOCK[name]] = t
            else:
                raise ValueError(f"no HF name for {prefix}{name}")

    layers: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, t in sd.items():
        t = _unwrap(t)
        parts = name.split(".", 2)
        if parts[0] in ("layers", "mtp"):
            layers.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = t
        elif name == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "norm.weight":
            out["model.norm.weight"] = t
        elif name == "output.weight":
            out["lm_head.weight"] = t
        elif name != "rope_cache":
            raise ValueError(f"no HF name for {name}")
    for i, items in layers.get("layers", {}).items():
        block(f"layers.{i}.", f"model.layers.{i}.", items)
    head = out.get("lm_head.weight", out.get("model.embed_tokens.weight"))
    for k, items in layers.get("mtp", {}).items():
        hf_prefix = f"model.layers.{args.n_layers + int(k)}."
        block(
            f"mtp.{k}.block.",
            hf_prefix,
            {n.removeprefix("block."): t for n, t in items.items() if n.startswith("block.")},
        )
        for name, t in items.items():
            if not name.startswith("block."):
                if name not in _MTP:
                    raise ValueError(f"no HF name for mtp.{k}.{name}")
                out[hf_prefix + _MTP[name]] = t
        # DeepSeek's layout repeats the shared embedding and head inside every MTP layer
        out[hf_prefix + "embed_tokens.weight"] = out["model.embed_tokens.weight"]
        out[hf_prefix + "shared_head.head.weight"] = head
    return out


def _check_copy(name: str, t: torch.Tensor, ref: torch.Tensor | None) -> None:
    if ref is not None and not torch.equal(t.to(ref.dtype), ref):
        raise ValueError(f"{name} differs from the main model's copy; MTP must share the embedding and head")


def from_hf_state_dict(
    hf_sd: dict[str, torch.Tensor],
    args: ModelArgs,
    fp8_block: int = 128,
    fp8_dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """HF checkpoint names -> ours; FP8 weights with block scales are dequantised to fp8_dtype.

    Also takes the in-memory layout of transformers' modules (packed ``experts.gate_up_proj`` / ``down_proj``).
    MTP copies of the embedding and head are checked against the main ones and dropped; a missing
    e_score_correction_bias (V2 checkpoints) becomes a zero expert_bias.
    """
    if any(n.endswith(SCALE_SUFFIX) for n in hf_sd):
        hf_sd = dequantize_state_dict(hf_sd, fp8_block, fp8_dtype)
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}  # our prefix -> proj -> expert -> weight
    copies: list[tuple[str, torch.Tensor, str]] = []
    for name, t in hf_sd.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = t
            continue
        if name == "model.norm.weight":
            out["norm.weight"] = t
            continue
        if name == "lm_head.weight":
            if args.tie_embeddings:
                copies.append((name, t, "tok_embeddings.weight"))
            else:
                out["output.weight"] = t
            continue
        m = _LAYER.fullmatch(name)
        if m is None:
            raise ValueError(f"unexpected tensor {name} in the HF checkpoint")
        i, rest = int(m.group(1)), m.group(2)
        if i < args.n_layers:
            prefix = f"layers.{i}."
        elif i - args.n_layers < args.mtp_depth:
            k = i - args.n_layers
            if rest in _MTP_FROM_HF:
                out[f"mtp.{k}.{_MTP_FROM_HF[rest]}"] = t
                continue
            if rest == "embed_tokens.weight":
                copies.append((name, t, "tok_embeddings.weight"))
                continue
            if rest == "shared_head.head.weight":
                copies.append((name, t, "tok_embeddings.weight" if args.tie_embeddings else "output.weight"))
                continue
            prefix = f"mtp.{k}.block."
        else:
            raise ValueError(
                f"unexpected tensor {name}: layer {i} is past num_hidden_layers + num_nextn_predict_layers"
            )
        e = _EXPERT.fullmatch(rest)
        if e is not None:
            experts.setdefault(prefix, {}).setdefault(e.group(2), {})[int(e.group(1))] = t
        elif rest == "mlp.experts.gate_up_proj":
            w1, w3 = t.chunk(2, dim=1)  # (E, 2I, D): gate rows first
            out[prefix + "moe.experts.w1"], out[prefix + "moe.experts.w3"] = w1.contiguous(), w3.contiguous()
        elif rest == "mlp.experts.down_proj":
            out[prefix + "moe.experts.w2"] = t
        elif rest in _BLOCK_FROM_HF:
            out[prefix + _BLOCK_FROM_HF[rest]] = t
        else:
            raise ValueError(f"unexpected tensor {name} in the HF checkpoint")
    for prefix, projs in experts.items():
        for proj, per_expert in projs.items():
            if sorted(per_expert) != list(range(args.n_routed_experts)):
                raise ValueError(
                    f"{prefix}: experts of {proj} are {sorted(per_expert)[:8]}..., need all {args.n_routed_experts}"
                )
            ours = {h: o for o, h in _FFN.items()}[proj]
            out[f"{prefix}moe.experts.{ours}"] = torch.stack(
                [per_expert[j] for j in range(args.n_routed_experts)]
            )
    for name, t, ref in copies:
        _check_copy(name, t, out.get(ref))
    for name in [n for n in out if n.endswith("moe.gate.weight")]:
        bias = name.removesuffix("weight") + "expert_bias"
        out.setdefault(bias, torch.zeros(args.n_routed_experts, dtype=torch.float32))
    return out


# ---- files ---------------------------------------------------------------------------------------------------


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    return files


def load_hf_pretrained(
    path: str | Path, dtype: torch.dtype | None = None
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(ModelArgs, our state dict) from an HF folder: config.json and single-file or indexed *.safetensors.

    Tensors keep their stored dtype unless dtype is given (the expert bias is never cast: the router works in
    fp32); FP8 weights are dequantised to dtype, or bf16 when dtype is None. Everything is read into memory.
    """
    from safetensors import safe_open

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    args = args_from_hf_config(cfg)
    hf_sd: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if dtype is not None and t.is_floating_point() and t.element_size() > 1:
                    if not name.endswith((SCALE_SUFFIX, "e_score_correction_bias")):
                        t = t.to(dtype)
                hf_sd[name] = t
    has_mtp = any((m := _LAYER.fullmatch(n)) and int(m.group(1)) >= args.n_layers for n in hf_sd)
    if args.mtp_depth and not has_mtp:
        # transformers' save_pretrained writes num_nextn_predict_layers but not the MTP weights it never builds
        logger.warning(
            "config has num_nextn_predict_layers = %d but %s has no MTP weights; mtp_depth = 0",
            args.mtp_depth,
            path,
        )
        args.mtp_depth = 0
    block = (cfg.get("quantization_config") or {}).get("weight_block_size") or [128, 128]
    if block[0] != block[1]:
        raise ValueError(f"quantization_config.weight_block_size = {block} must be square")
    sd = from_hf_state_dict(hf_sd, args, fp8_block=block[0], fp8_dtype=dtype or torch.bfloat16)
    return args, sd


def save_hf_pretrained(
    sd: dict[str, torch.Tensor],
    args: ModelArgs,
    path: str | Path,
    model_type: str | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write config.json and safetensors (sharded with model.safetensors.index.json above max_shard_bytes)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = hf_config_from_args(args, model_type)
    hf_sd = to_hf_state_dict(sd, args)
    if cfg["model_type"] == "deepseek_v2":
        biases = [n for n, t in hf_sd.items() if n.endswith("e_score_correction_bias") and t.any()]
        if biases:
            raise ValueError(f"{biases[0]} is non-zero but deepseek_v2 has no expert bias")
        hf_sd = {n: t for n, t in hf_sd.items() if not n.endswith("e_score_correction_bias")}
    weights = [t for n, t in hf_sd.items() if not n.endswith("e_score_correction_bias")]
    cfg["torch_dtype"] = str(weights[0].dtype).removeprefix("torch.") if weights else "float32"
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(hf_sd):
        nbytes = hf_sd[name].numel() * hf_sd[name].element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = hf_sd[name]
        size += nbytes

    def write(shard: dict[str, torch.Tensor], file: str) -> None:
        # each tensor its own storage (one shard at a time): safetensors refuses shared memory such as the
        # per-expert slices of a stacked weight or the MTP copies of the embedding
        save_file(
            {n: t.detach().contiguous().clone() for n, t in shard.items()}, str(path / file), {"format": "pt"}
        )

    if len(shards) == 1:
        write(shards[0], "model.safetensors")
        return
    weight_map = {}
    for s, shard in enumerate(shards, start=1):
        file = f"model-{s:05d}-of-{len(shards):05d}.safetensors"
        write(shard, file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in hf_sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
