"""Sample text from a checkpoint with an MLA KV cache (the compressed latent and the RoPE key per token).

    python -m titan_dsv3.tools.generate --checkpoint DIR [--job.config_file X ...] --prompt "def main(" \
        [--max-new-tokens 64] [--temperature 0.8] [--top-p 0.95] [--seed 0] [--tokenizer tokenizer.json]

DIR is a DCP folder of ours (seed, step-N, step-N-model, or a run's checkpoint folder: its newest complete step)
or an HF folder (config.json + safetensors). Model args come from the trainer-style config arguments when given,
else from model_args.json / config.json in DIR. The tokenizer is --tokenizer, else data.tokenizer of the config,
else DIR/tokenizer.json, else the shipped default. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from titan_dsv3.checkpoint.model_io import CheckpointError, is_hf_folder, load_model_tensors, read_model_args
from titan_dsv3.config import ConfigError
from titan_dsv3.data.tokenizer import TextTokenizer
from titan_dsv3.models import DeepSeekV3Model, ModelArgs
from titan_dsv3.models.kv_cache import generate
from titan_dsv3.tools._cli import config_model_args
from titan_dsv3.tools.convert_hf import resolve_dcp_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_for_inference(
    path: str | Path, args: ModelArgs | None, device: torch.device, dtype: torch.dtype
) -> DeepSeekV3Model:
    """The main model (MTP modules dropped) in eval mode with the checkpoint's weights."""
    path = Path(path)
    if is_hf_folder(path):
        from titan_dsv3.models.hf import load_hf_pretrained

        hf_args, sd = load_hf_pretrained(path)
        args = args or hf_args
    else:
        path = resolve_dcp_dir(path)
        args = args or read_model_args(path)
        if args is None:
            raise CheckpointError(f"{path} has no model_args.json; pass the run's --job.config_file")
        sd = load_model_tensors(path)
    args = ModelArgs.from_dict({**args.to_dict(), "mtp_depth": 0})
    with torch.device("meta"):
        model = DeepSeekV3Model(args)
    model.to(dtype)
    for moe in model.moe_layers():  # routing stays in fp32, as in training
        moe.gate.expert_bias = moe.gate.expert_bias.float()
    model.to_empty(device=device)
    model.init_rope(device)  # the fp32 RoPE table
    sd = {k: v for k, v in sd.items() if not k.startswith("mtp.")}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model args ({str(e).splitlines()[-1]})"
        ) from None
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default="", help="tokenizer.json (see above for the default)")
    ap.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on CUDA, else float32"
    )
    opts, config_argv = ap.parse_known_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[opts.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    try:
        resolved = config_model_args(config_argv)
        tok_path = opts.tokenizer or (resolved[0].data.tokenizer if resolved else "")
        if not tok_path and (Path(opts.checkpoint) / "tokenizer.json").is_file():
            tok_path = str(Path(opts.checkpoint) / "tokenizer.json")
        tokenizer = TextTokenizer(tok_path or None)
        model = load_for_inference(opts.checkpoint, resolved[1] if resolved else None, device, dtype)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    prompt = tokenizer.encode(opts.prompt)
    new, _ = generate(
        model, prompt, opts.max_new_tokens, opts.temperature, opts.top_p, opts.seed, eos_id=tokenizer.eos_id
    )
    print(opts.prompt + tokenizer.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
