"""Packed, DP-sharded, resumable token loading.

The token stream (documents, each followed by EOS) is cut into windows of seq_len + 1 tokens at stride seq_len,
so every token is a target exactly once per epoch. Global sequence g of the run is window perm_e[g mod W] of epoch
e = g // W. A step takes the next global_batch_size sequences; micro-batch m of data-parallel rank r holds
sequences [m x local x dp + r x local, ... + local) of them. The stream is therefore defined by the global batch,
not by the layout, and the loader's whole state is the count of sequences consumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from titan_dsv3.data.corpus import embedded_documents
from titan_dsv3.data.tokenizer import TextTokenizer


class TokenStream:
    """Concatenated uint32 token arrays (memory-mapped shards or in-memory), sliced by global position."""

    def __init__(self, arrays: list[np.ndarray], eos_id: int, vocab_size: int, name: str):
        self.arrays = [a for a in arrays if len(a)]
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.name = name
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def slice(self, start: int, end: int) -> np.ndarray:
        out = np.empty(end - start, dtype=np.int64)
        i = int(np.searchsorted(self.starts, start, side="right") - 1)
        pos = start
        while pos < end:
            a, a_start = self.arrays[i], int(self.starts[i])
            take = min(end, a_start + len(a)) - pos
            out[pos - start : pos - start + take] = a[pos - a_start : pos - a_start + take]
            pos += take
            i += 1
        return out


def load_prepared(path: str | Path, split: str) -> TokenStream:
    """Memory-map the shards of one split of a tools.prepare_data folder."""
    path = Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("format") != "titan_dsv3.tokens.v1" or manifest.get("dtype") != "uint32":
        raise ValueError(
            f"{path}/manifest.json: unknown format {manifest.get('format')!r}; re-run tools.prepare_data"
        )
    arrays = []
    for shard in manifest["shards"]:
        if shard.get("split", "train") != split:
            continue
        f = path / shard["file"]
        if not f.is_file():
            raise FileNotFoundError(
                f"{f} is listed in {path}/manifest.json but missing; re-run tools.prepare_data"
            )
        arr = np.memmap(f, dtype="<u4", mode="r")
        if len(arr) != shard["num_tokens"]:
            raise ValueError(
                f"{f}: {len(arr)} tokens, manifest says {shard['num_tokens']}; the folder is damaged"
            )
        arrays.append(arr)
    return TokenStream(arrays, int(manifest["eos_id"]), int(manifest["vocab_size"]), f"{path}[{split}]")


# Every 20th embedded document (5%) is held out for validation.
_VAL_EVERY = 20


def load_embedded(tokenizer: TextTokenizer, max_bytes: int, split: str) -> TokenStream:
    """Tokenize the embedded standard-library corpus (a few seconds for the default 6 MB)."""
    docs = [
        text
        for i, (_, text) in enumerate(embedded_documents(max_bytes))
        if (i % _VAL_EVERY == _VAL_EVERY - 1) == (split == "val")
    ]
    ids = tokenizer.encode_batch(docs)
    flat = np.fromiter(
        (t for doc in ids for t in (*doc, tokenizer.eos_id)),
        dtype=np.uint32,
        count=sum(len(d) + 1 for d in ids),
    )
    return TokenStream([flat], tokenizer.eos_id, tokenizer.vocab_size, f"embedded[{split}]")


@dataclass
class Batch:
    inputs: torch.Tensor  # (bsz, seqlen) int64
    labels: torch.Tensor  # (bsz, seqlen) int64
    doc_ids: torch.Tensor  # (bsz, seqlen) int32: document index inside each row, for document masking


class PackedLoader:
    """Yields, per step, this rank's micro-batches; state_dict() / load_state_dict() resume exactly."""

    def __init__(
        self,
        stream: TokenStream,
        seq_len: int,
        local_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_degree: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if global_batch_size % (local_batch_size * dp_degree):
            raise ValueError(
                f"global batch {global_batch_size} is not a multiple of {local_batch_size} x {dp_degree}"
            )
        self.stream = stream
        self.seq_len = seq_len
        self.local = local_batch_size
        self.global_batch = global_batch_size
        self.dp_rank, self.dp = dp_rank, dp_degree
        self.accum = global_batch_size // (local_batch_size * dp_degree)
        self.seed, self.shuffle = seed, shuffle
        self.n_windows = (len(stream) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(
                f"data {stream.name} has {len(stream)} tokens, fewer than one sequence of {seq_len + 1}; "
                "add data or lower training.seq_len"
            )
        self.consumed = 0  # global sequences handed out so far
        self._perm_epoch, self._perm = -1, None

    def _window(self, g: int) -> int:
        epoch, idx = divmod(g, self.n_windows)
        if not self.shuffle:
            return idx
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.n_windows), epoch
        return int(self._perm[idx])

    def _rows(self, first: int) -> Batch:
        rows = []
        for g in range(first, first + self.local):
            w = self._window(g)
            rows.append(self.stream.slice(w * self.seq_len, w * self.seq_len + self.seq_len + 1))
        tokens = torch.from_numpy(np.stack(rows))  # (local, seq_len + 1)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        # a position after an EOS starts a new document
        is_eos = (inputs == self.stream.eos_id).to(torch.int32)
        doc_ids = torch.cumsum(is_eos, dim=1) - is_eos
        return Batch(inputs.contiguous(), labels.contiguous(), doc_ids.to(torch.int32))

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches of the next step, in order."""
        base = self.consumed
        batches = [
            self._rows(base + m * self.local * self.dp + self.dp_rank * self.local) for m in range(self.accum)
        ]
        self.consumed += self.global_batch
        return batches

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seq_len": self.seq_len, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state["seq_len"] != self.seq_len:
            raise ValueError(
                f"checkpoint data position was saved with seq_len {state['seq_len']}, run has {self.seq_len}; "
                "resume with the same training.seq_len"
            )
        # sequences consumed stays exact across a change of global batch or layout
        self.consumed = int(state["consumed"])
