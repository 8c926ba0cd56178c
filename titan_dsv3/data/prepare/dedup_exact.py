"""Exact deduplication: a 128-bit BLAKE2b hash of the (normalised) text; the first document in input order stays.

Workers hash (``keys``); the parent, which sees every hash in input order, decides (``find_duplicates``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np

from titan_dsv3.data.prepare.config import ExactDedupConfig
from titan_dsv3.data.prepare.document import Doc, Removal

KEY_BYTES = 16


class ExactDedup:
    """The exact-dedup stage (a global stage: keys in workers, decisions in the parent)."""

    name = "exact_dedup"

    def __init__(self, cfg: ExactDedupConfig):
        self.cfg = cfg

    def key(self, text: str) -> bytes:
        if self.cfg.normalize:
            text = " ".join(text.casefold().split())
        return hashlib.blake2b(text.encode("utf-8"), digest_size=KEY_BYTES).digest()

    def keys(
        self, docs: Iterable[Doc], rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[Doc, np.ndarray]]:
        for doc in docs:
            yield doc, np.frombuffer(self.key(doc.text), dtype=np.uint8)

    def empty_keys(self) -> np.ndarray:
        return np.zeros((0, KEY_BYTES), dtype=np.uint8)

    def find_duplicates(self, ids: list[str], keys: np.ndarray) -> tuple[dict[int, Removal], dict]:
        """Removals by global position (every copy after the first), and statistics for the report."""
        first: dict[bytes, int] = {}
        removals: dict[int, Removal] = {}
        groups: set[int] = set()
        for i, row in enumerate(keys):
            j = first.setdefault(row.tobytes(), i)
            if j != i:
                removals[i] = Removal(self.name, f"exact duplicate of {ids[j]}", ids[j])
                groups.add(j)
        return removals, {"duplicate_groups": len(groups)}
