"""Tokenization into binary token shards, and the manifest that describes them (format titan_dsv3.tokens.v1).

Task ``rank`` writes ``train_{rank:05d}.bin`` (and ``val_{rank:05d}.bin`` when val_fraction > 0): raw little-endian
uint32 token ids, every document followed by one eos_id, no header. A shard appears under its final name only
when complete (written as .tmp, then renamed); the manifest, written last and atomically by the parent, lists them.
A document goes to val when the first 8 bytes of BLAKE2b of its id, as a fraction of 2^64, fall below val_fraction:
the split depends on the id only, not on the order, the worker count or the other documents.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from titan_dsv3.data.prepare.config import TokenizeConfig
from titan_dsv3.data.prepare.document import Doc
from titan_dsv3.data.tokenizer import TextTokenizer

FORMAT = "titan_dsv3.tokens.v1"
SPLITS = ("train", "val")


def split_of(doc_id: str, val_fraction: float) -> str:
    if val_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")
    return "val" if h < val_fraction * 2**64 else "train"


def shard_name(split: str, rank: int) -> str:
    return f"{split}_{rank:05d}.bin"


class _ShardWriter:
    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.num_tokens = self.num_docs = 0

    def write(self, ids: list[int], eos_id: int) -> None:
        arr = np.empty(len(ids) + 1, dtype="<u4")  # (tokens + eos,)
        arr[:-1] = ids
        arr[-1] = eos_id
        arr.tofile(self.file)
        self.num_tokens += len(arr)
        self.num_docs += 1

    def commit(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "num_tokens": self.num_tokens, "num_docs": self.num_docs}


class Tokenize:
    """The tokenize stage; it must be last. ``written[rank]`` lists the shards task ``rank`` wrote."""

    name = "tokenize"

    def __init__(self, cfg: TokenizeConfig, out_dir: str | Path):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.tokenizer = TextTokenizer(cfg.tokenizer or None)
        self.written: dict[int, list[dict]] = {}

    def __call__(self, docs: Iterable[Doc], rank: int = 0, world_size: int = 1) -> Iterator[Doc]:
        writers: dict[str, _ShardWriter] = {}
        eos = self.tokenizer.eos_id
        batch: list[Doc] = []

        def flush() -> Iterator[Doc]:
            for doc, ids in zip(batch, self.tokenizer.encode_batch([d.text for d in batch])):
                if not ids:
                    doc.remove(self.name, "no tokens (empty text)")
                else:
                    split = split_of(doc.id, self.cfg.val_fraction)
                    if split not in writers:
                        writers[split] = _ShardWriter(self.out_dir / shard_name(split, rank))
                    writers[split].write(ids, eos)
                yield doc

        for doc in docs:
            batch.append(doc)
            if len(batch) == self.cfg.batch_size:
                yield from flush()
                batch = []
        yield from flush()
        self.written[rank] = [{**w.commit(), "split": s} for s, w in sorted(writers.items())]


def write_manifest(out_dir: str | Path, tokenizer: TextTokenizer, shards: list[dict]) -> dict:
    """manifest.json listing ``shards`` (train first, then val, each in task order), written atomically."""
    ordered = [s for split in SPLITS for s in shards if s["split"] == split]
    manifest = {
        "format": FORMAT,
        "dtype": "uint32",
        "tokenizer": str(tokenizer.path),
        "eos_id": tokenizer.eos_id,
        "vocab_size": tokenizer.vocab_size,
        "shards": [
            {"file": s["file"], "split": s["split"], "num_tokens": s["num_tokens"], "num_docs": s["num_docs"]}
            for s in ordered
        ],
        "total_tokens": {
            split: sum(s["num_tokens"] for s in ordered if s["split"] == split) for split in SPLITS
        },
    }
    write_json_atomic(Path(out_dir) / "manifest.json", manifest)
    return manifest


def write_json_atomic(path: Path, obj: object, indent: int | None = 1) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
