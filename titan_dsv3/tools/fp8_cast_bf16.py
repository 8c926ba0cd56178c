"""Dequantize DeepSeek's FP8 release (float8_e4m3fn weights with 128 x 128 block scales) to BF16 safetensors.

    python -m titan_dsv3.tools.fp8_cast_bf16 --input FP8_DIR --output BF16_DIR

Streams shard by shard: one output shard is in memory at a time, and inputs are memory-mapped (a scale stored in
another shard than its weight is read alone from that file). The output keeps the shard names, drops every
``*_scale_inv`` tensor, and gets an updated model.safetensors.index.json and a config.json without
quantization_config. Other files (tokenizer, generation config) are copied.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from titan_dsv3.models.hf import SCALE_SUFFIX, dequantize_fp8_block

INDEX = "model.safetensors.index.json"
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class ShardReader:
    """Any tensor of a checkpoint by name, through memory-mapped handles kept open while one shard is rewritten."""

    def __init__(self, folder: Path, wmap: dict[str, str], stack: contextlib.ExitStack):
        self.folder, self.wmap, self.stack = folder, wmap, stack
        self.handles: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.wmap

    def handle(self, file: str):
        from safetensors import safe_open

        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(safe_open(str(self.folder / file), framework="pt"))
        return self.handles[file]

    def __call__(self, name: str) -> torch.Tensor:
        return self.handle(self.wmap[name]).get_tensor(name)


# (name, tensor, reader of the whole checkpoint) -> {name: tensor} to write in its place (may be empty)
Transform = Callable[[str, torch.Tensor, ShardReader], dict[str, torch.Tensor]]


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index or the *.safetensors files."""
    from safetensors import safe_open

    if (folder / INDEX).is_file():
        return json.loads((folder / INDEX).read_text())["weight_map"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            out.update(dict.fromkeys(sf.keys(), f.name))
    return out


def rewrite_shards(src: Path, dst: Path, transform: Transform) -> tuple[dict[str, str], int]:
    """Write every shard of src to dst through transform, one shard at a time.

    Returns the new weight map and total bytes. dst may equal src: each shard goes to a temporary file that then
    replaces the old one.
    """
    from safetensors.torch import save_file

    wmap = weight_map(src)
    new_map: dict[str, str] = {}
    total = 0
    dst.mkdir(parents=True, exist_ok=True)
    for file in sorted(set(wmap.values())):
        with contextlib.ExitStack() as stack:
            reader = ShardReader(src, wmap, stack)
            sf = reader.handle(file)
            out: dict[str, torch.Tensor] = {}
            for name in sf.keys():
                out.update(transform(name, sf.get_tensor(name), reader))
        tmp = dst / (file + ".tmp")
        save_file({n: t.contiguous() for n, t in out.items()}, str(tmp), {"format": "pt"})
        tmp.replace(dst / file)
        new_map.update(dict.fromkeys(out, file))
        total += sum(t.numel() * t.element_size() for t in out.values())
        del out
    return new_map, total


def write_index(dst: Path, new_map: dict[str, str], total: int) -> None:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}
    (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_other_files(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name not in (INDEX, "config.json"):
            shutil.copy2(p, dst / p.name)


def dequantize_transform(block: int, dtype: torch.dtype) -> Transform:
    def transform(name, t, read):
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in read:
                raise ValueError(f"{name} has no weight {name[: -len(SCALE_SUFFIX)]}")
            return {}
        if t.dtype in _FP8:
            if name + SCALE_SUFFIX not in read:
                raise ValueError(f"{name} is float8 but has no {name + SCALE_SUFFIX}")
            scale = read(name + SCALE_SUFFIX)
            return {name: dequantize_fp8_block(t, scale, block, dtype)}
        return {name: t}

    return transform


def cast_folder(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("--output must differ from --input")
    cfg = json.loads((src / "config.json").read_text())
    quant = cfg.pop("quantization_config", None) or {}
    block = quant.get("weight_block_size") or [128, 128]
    if block[0] != block[1]:
        raise ValueError(f"quantization_config.weight_block_size = {block} must be square")
    new_map, total = rewrite_shards(src, dst, dequantize_transform(block[0], dtype))
    if (src / INDEX).is_file():
        write_index(dst, new_map, total)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    copy_other_files(src, dst)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="HF folder with FP8 weights and *_scale_inv block scales")
    ap.add_argument("--output", required=True, help="folder for the BF16 checkpoint")
    args = ap.parse_args(argv)
    try:
        cast_folder(args.input, args.output)
    except (ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
