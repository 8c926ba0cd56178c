"""tools.convert_hf (HF <-> DCP, V2/V3, bf16/fp32/FP8) and tools.fp8_cast_bf16 (streaming dequantization)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import TINY_MODEL

from titan_dsv3.checkpoint.model_io import read_model_args, save_model_dcp
from titan_dsv3.models import DeepSeekV3Model, ModelArgs
from titan_dsv3.models.hf import (
    SCALE_SUFFIX,
    dequantize_fp8_block,
    load_hf_pretrained,
    save_hf_pretrained,
    to_hf_state_dict,
)
from titan_dsv3.tools import convert_hf, fp8_cast_bf16

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

V2_LITE_LIKE = {
    "score_func": "softmax",
    "group_score": "max",
    "route_norm": False,
    "q_lora_rank": 0,
    "mtp_depth": 0,
}


def random_model(overrides: dict, seed: int = 0, dtype=torch.float32) -> tuple[ModelArgs, dict]:
    args = ModelArgs(**{**TINY_MODEL, **overrides})
    torch.manual_seed(seed)
    model = DeepSeekV3Model(args)
    model.init_weights()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("expert_bias") and args.score_func == "sigmoid":
                b.normal_()  # a trained bias, not zeros
    return args, {
        k: v.to(dtype) if not k.endswith("expert_bias") else v for k, v in model.state_dict().items()
    }


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({n: sf.get_tensor(n) for n in sf.keys()})
    return out


def round_trip(src: Path, tmp_path: Path, *extra: str) -> Path:
    assert convert_hf.main(["--to-dcp", str(src), str(tmp_path / "dcp")]) == 0
    assert (tmp_path / "dcp" / ".metadata").is_file() and (tmp_path / "dcp" / "model_args.json").is_file()
    assert convert_hf.main(["--to-hf", str(tmp_path / "dcp"), str(tmp_path / "back"), *extra]) == 0
    return tmp_path / "back"


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n, t in a.items():
        assert t.dtype == b[n].dtype and torch.equal(t, b[n]), n


@pytest.mark.parametrize(
    "overrides,dtype,model_type",
    [({}, torch.bfloat16, "deepseek_v3"), (V2_LITE_LIKE, torch.float32, "deepseek_v2")],
    ids=["v3_mtp_bf16", "v2_fp32"],
)
def test_hf_dcp_hf_round_trip_is_exact(tmp_path, overrides, dtype, model_type):
    args, sd = random_model(overrides, dtype=dtype)
    src = tmp_path / "src"
    save_hf_pretrained(sd, args, src, model_type=model_type, max_shard_bytes=200_000)
    assert len(list(src.glob("*.safetensors"))) > 1
    (src / "tokenizer.json").write_text("{}")
    back = round_trip(src, tmp_path, "--model-type", model_type, "--max-shard-gb", "0.0002")
    assert_same_tensors(hf_tensors(src), hf_tensors(back))
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert (back / "tokenizer.json").is_file() and read_model_args(tmp_path / "dcp") == args


def test_round_trip_of_a_transformers_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
        num_nextn_predict_layers=0,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "src")
    back = round_trip(tmp_path / "src", tmp_path)
    assert_same_tensors(hf_tensors(tmp_path / "src"), hf_tensors(back))
    a, _ = load_hf_pretrained(tmp_path / "src")
    b, _ = load_hf_pretrained(back)
    assert a == b


def test_fp8_export_and_streaming_cast_to_bf16(tmp_path):
    # dims that give several 128 x 128 blocks per matrix, ragged at the edges (160 = 128 + 32, 300 = 2 x 128 + 44)
    args, sd = random_model({"dim": 160, "inter_dim": 300, "n_heads": 4, "v_head_dim": 40})
    save_model_dcp(sd, tmp_path / "dcp", args)
    fp8 = tmp_path / "fp8"
    assert (
        convert_hf.main(["--to-hf", str(tmp_path / "dcp"), str(fp8), "--fp8", "--max-shard-gb", "0.001"]) == 0
    )
    cfg = json.loads((fp8 / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    index = json.loads((fp8 / fp8_cast_bf16.INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    # DeepSeek's release does not promise a scale sits in its weight's shard: move one to another file
    moved = "model.layers.1.self_attn.kv_b_proj.weight" + SCALE_SUFFIX
    home = index["weight_map"][moved]
    other = next(f for f in files if f != home)
    a, b = hf_tensors_of(fp8 / home), hf_tensors_of(fp8 / other)
    b[moved] = a.pop(moved)
    save_file(a, str(fp8 / home))
    save_file(b, str(fp8 / other))
    index["weight_map"][moved] = other
    (fp8 / fp8_cast_bf16.INDEX).write_text(json.dumps(index))
    (fp8 / "tokenizer.json").write_text("{}")

    quantized = hf_tensors(fp8)
    assert fp8_cast_bf16.main(["--input", str(fp8), "--output", str(tmp_path / "bf16")]) == 0
    out = tmp_path / "bf16"
    cast = hf_tensors(out)
    new_index = json.loads((out / fp8_cast_bf16.INDEX).read_text())
    assert new_index["weight_map"] == {
        n: f for n, f in index["weight_map"].items() if not n.endswith(SCALE_SUFFIX)
    }
    assert new_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in cast.values())
    out_cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in out_cfg and out_cfg["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file()

    ref = to_hf_state_dict(sd, args)
    n_fp8 = 0
    for name, t in cast.items():
        q = quantized[name]
        if q.dtype != torch.float8_e4m3fn:
            assert torch.equal(t, q), name  # untouched: embedding, head, norms, router, eh_proj
            continue
        n_fp8 += 1
        s = quantized[name + SCALE_SUFFIX]
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, dequantize_fp8_block(q, s, 128, torch.bfloat16)), name
        w = ref[name].float()
        # FP8 e4m3 rounding (2^-4 relative, 2^-10 x scale in the subnormal range), then bf16 rounding (2^-9)
        bound = 2.0**-4 * w.abs() + 2.0**-10 * expand(s, w.shape)
        assert ((t.float() - w).abs() <= bound * (1 + 2.0**-8) + 2.0**-9 * w.abs()).all(), name
        assert (t.float() - w).abs().max() > 0
    assert n_fp8 >= 10
    args_back, _ = load_hf_pretrained(out)
    assert args_back == args


def hf_tensors_of(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), framework="pt") as sf:
        return {n: sf.get_tensor(n) for n in sf.keys()}


def expand(s: torch.Tensor, shape) -> torch.Tensor:
    return s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]


def test_errors_are_reported(tmp_path, capsys):
    args, sd = random_model({})
    save_model_dcp(sd, tmp_path / "noargs")
    (tmp_path / "noargs" / "model_args.json").unlink(missing_ok=True)
    assert convert_hf.main(["--to-hf", str(tmp_path / "noargs"), str(tmp_path / "x")]) == 1
    assert "no model_args.json; pass the run's --job.config_file" in capsys.readouterr().err
    bad = tmp_path / "bad_fp8"
    bad.mkdir()
    save_file({"w": torch.ones(4, 4).to(torch.float8_e4m3fn)}, str(bad / "model.safetensors"))
    (bad / "config.json").write_text("{}")
    assert fp8_cast_bf16.main(["--input", str(bad), "--output", str(tmp_path / "y")]) == 1
    assert "w is float8 but has no w_scale_inv" in capsys.readouterr().err
