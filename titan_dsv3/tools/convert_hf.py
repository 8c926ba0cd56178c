"""Convert between HF checkpoints (DeepSeek V2/V3 layout, bf16/fp32 or FP8 with block scales) and DCP.

    python -m titan_dsv3.tools.convert_hf --to-dcp HF_DIR OUT_DCP [--dtype keep|bfloat16|float32]
    python -m titan_dsv3.tools.convert_hf --to-hf DCP_DIR OUT_HF_DIR [--job.config_file X ...]
        [--model-type deepseek_v3|deepseek_v2] [--dtype keep|bfloat16|float32] [--fp8] [--max-shard-gb G]

--to-dcp writes a model-only DCP checkpoint (``model.<fqn>``) with model_args.json beside it, usable as
checkpoint.initial_load_path or by tools.generate; FP8 weights are dequantized to bf16 (or --dtype).
--to-hf reads the model weights of any DCP folder of ours (a seed checkpoint, a step-N training checkpoint, the
model-only export, or a run's checkpoint folder, whose newest complete step is taken). The model args come from
model_args.json there or from the trainer-style config arguments. --fp8 writes the projection weights as
float8_e4m3fn with 128 x 128 block scales, as DeepSeek's release does. Both directions hold the whole model in
the memory of one process; for DeepSeek's FP8 release use tools.fp8_cast_bf16 first, which streams.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from titan_dsv3.checkpoint.manager import complete_steps
from titan_dsv3.checkpoint.model_io import (
    CheckpointError,
    load_model_tensors,
    read_model_args,
    save_model_dcp,
)
from titan_dsv3.config import ConfigError
from titan_dsv3.models.hf import SCALE_SUFFIX, load_hf_pretrained, quantize_fp8_block, save_hf_pretrained
from titan_dsv3.tools._cli import config_model_args, copy_tokenizer_files
from titan_dsv3.tools.fp8_cast_bf16 import INDEX, Transform, rewrite_shards, write_index

DTYPES = {"keep": None, "bfloat16": torch.bfloat16, "float32": torch.float32}
FP8_BLOCK = 128
# The matrices DeepSeek's release stores in FP8: attention and expert/dense/shared MLP projections. Embedding,
# output head, router, norms, MTP eh_proj stay in bf16.
_FP8_WEIGHT = re.compile(
    r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
)


def resolve_dcp_dir(path: str | Path) -> Path:
    """A DCP checkpoint folder; a run's checkpoint folder resolves to its newest complete step."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    steps = complete_steps(path)
    if steps:
        return path / f"step-{steps[-1]}"
    exports = sorted(path.glob("step-*-model"), key=lambda p: int(p.name.split("-")[1]))
    if exports and (exports[-1] / ".metadata").is_file():
        return exports[-1]
    raise CheckpointError(
        f"{path} is neither a DCP checkpoint (no .metadata) nor a folder of complete step-N ones"
    )


def hf_to_dcp(hf_dir: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    hf_dir, out = Path(hf_dir), Path(out)
    args, sd = load_hf_pretrained(hf_dir, dtype)
    save_model_dcp(sd, out, args)
    copy_tokenizer_files(hf_dir, out)
    return out


def quantize_transform(block: int = FP8_BLOCK) -> Transform:
    def transform(name, t, read):
        if _FP8_WEIGHT.search(name) and t.dim() == 2:
            q, scale_inv = quantize_fp8_block(t, block)
            return {name: q, name + SCALE_SUFFIX: scale_inv}
        return {name: t}

    return transform


def to_fp8_in_place(hf_dir: Path, block: int = FP8_BLOCK) -> None:
    """Quantize the projection weights of a bf16/fp32 HF folder shard by shard and mark config.json."""
    new_map, total = rewrite_shards(hf_dir, hf_dir, quantize_transform(block))
    if (hf_dir / INDEX).is_file():
        write_index(hf_dir, new_map, total)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [block, block],
    }
    (hf_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def dcp_to_hf(
    dcp_dir: str | Path,
    out: str | Path,
    args=None,
    model_type: str | None = None,
    dtype: torch.dtype | None = None,
    fp8: bool = False,
    max_shard_bytes: int | None = None,
) -> Path:
    dcp_dir, out = resolve_dcp_dir(dcp_dir), Path(out)
    args = args or read_model_args(dcp_dir)
    if args is None:
        raise CheckpointError(
            f"{dcp_dir} has no model_args.json; pass the run's --job.config_file (and model overrides)"
        )
    sd = load_model_tensors(dcp_dir, dtype)
    save_hf_pretrained(sd, args, out, model_type=model_type, max_shard_bytes=max_shard_bytes)
    if fp8:
        to_fp8_in_place(out)
    copy_tokenizer_files(dcp_dir, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--to-dcp", nargs=2, metavar=("HF_DIR", "OUT_DCP"))
    mode.add_argument("--to-hf", nargs=2, metavar=("DCP_DIR", "OUT_HF_DIR"))
    ap.add_argument(
        "--dtype", choices=list(DTYPES), default="keep", help="cast floating weights (keep: as stored)"
    )
    ap.add_argument("--model-type", choices=["deepseek_v3", "deepseek_v2"], default=None)
    ap.add_argument(
        "--fp8", action="store_true", help="--to-hf: projections in FP8 with 128x128 block scales"
    )
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="--to-hf: safetensors shard size")
    opts, config_argv = ap.parse_known_args(argv)
    try:
        if opts.to_dcp:
            out = hf_to_dcp(*opts.to_dcp, dtype=DTYPES[opts.dtype])
        else:
            resolved = config_model_args(config_argv)
            out = dcp_to_hf(
                *opts.to_hf,
                args=resolved[1] if resolved else None,
                model_type=opts.model_type,
                dtype=DTYPES[opts.dtype],
                fp8=opts.fp8,
                max_shard_bytes=int(opts.max_shard_gb * 2**30),
            )
    except (CheckpointError, ConfigError, ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
