"""Near-deduplication: MinHash signatures of word shingles, datasketch's MinHashLSH, union-find clusters.

Signatures are computed in the workers with numpy for a whole batch of documents at once. The hash family is
datasketch's default ("affine32", datasketch >= 2.0): the 32-bit SHA-1 hash of each shingle's UTF-8 bytes, mixed by
the MurmurHash3 finalizer, then permuted by h -> a*h + b mod 2^32 with datasketch's (a, b) for the same seed, so a
signature equals ``datasketch.MinHash(num_perm, seed)`` updated with every shingle. On 1 KB documents that is 9.0x
the documents/s of one ``update`` per shingle, and 7.7x with the LSH step included (one core of a 2-core AMD EPYC,
benchmarks/RESULTS_minhash.md); SHA-1 and building the shingles take about two thirds of the time left.

The parent feeds the signatures in input order to ``MinHashLSH(threshold, num_perm, weights)``, which picks
bands x rows that minimise the weighted false positive and negative probabilities around the threshold. With
equal weights and 128 permutations, 0.8 gives 9 bands of 13 rows, which make a pair at Jaccard 0.8 a candidate
with probability 0.40, at 0.85 0.69, at 0.9 0.93; 0.5 gives 25 x 5 (0.87 at 0.6, 0.99 at 0.7). A higher
false_negative_weight moves the curve left. A document is joined to each earlier candidate whose estimated
Jaccard reaches the threshold (``verify``); in every cluster the document that comes first in the input stays, so
the result does not depend on the number of workers. The parent holds every signature (num_perm x 4 bytes per
document, 512 MB for a million documents at 128) and the LSH tables in memory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

import numpy as np

from titan_dsv3.data.prepare.config import NearDedupConfig
from titan_dsv3.data.prepare.document import Doc, Removal

EMPTY = np.uint32(0xFFFFFFFF)  # the value of every slot of an empty set's signature
_WORD = re.compile(r"\w+")
# Rows of the (shingles, num_perm) matrix computed at once: 2,048 x 128 x 4 bytes = 1 MiB stays in L2 cache
# (signatures of 2,000 1 KB documents on the 2-core EPYC: 2,048 rows 149 ms, 16,384 rows 166 ms).
_BLOCK_ROWS = 2048


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 parameters: odd a and any b, drawn in this order from RandomState(seed)."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (uint32 arithmetic wraps, which is the intended mod 2^32)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def shingles(text: str, size: int) -> list[bytes]:
    """Word n-grams (case-folded runs of letters and digits, joined by a space) as UTF-8 bytes.

    A text of ``size`` words or fewer is one shingle. Repeats are kept: they cannot change a minimum.
    """
    words = [w.encode() for w in _WORD.findall(text.casefold())]
    if len(words) <= size:
        return [b" ".join(words)] if words else []
    return list(
        map(b" ".join, zip(*[words[i:] for i in range(size)]))
    )  # 20 % faster than slicing per shingle


def sha1_32(items: list[bytes]) -> np.ndarray:
    """datasketch.hashfunc.sha1_hash32 of every item: the first 4 bytes of SHA-1, little-endian."""
    sha1 = hashlib.sha1
    digests = b"".join([sha1(s).digest() for s in items])  # 20 bytes each
    return np.frombuffer(digests, dtype="<u4").reshape(-1, 5)[:, 0].astype(np.uint32)


def signatures(shingle_sets: list[list[bytes]], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(documents, num_perm) uint32 MinHash signatures; an empty set's row is all 0xFFFFFFFF."""
    counts = np.array([len(s) for s in shingle_sets], dtype=np.int64)
    out = np.full((len(shingle_sets), len(a)), EMPTY, dtype=np.uint32)
    hv = fmix32(sha1_32([s for doc in shingle_sets for s in doc]))  # (shingles,)
    ends = np.cumsum(counts)
    starts = ends - counts
    buf = np.empty((min(_BLOCK_ROWS, len(hv)), len(a)), dtype=np.uint32)
    for lo in range(0, len(hv), _BLOCK_ROWS):
        hi = min(lo + _BLOCK_ROWS, len(hv))
        block = buf[: hi - lo]  # (rows, num_perm)
        np.multiply(hv[lo:hi, None], a[None, :], out=block)  # uint32: wraps mod 2^32, as intended
        np.add(block, b[None, :], out=block)
        first, last = np.searchsorted(ends, lo, side="right"), np.searchsorted(starts, hi, side="left")
        docs = np.arange(first, last)
        docs = docs[counts[docs] > 0]
        mins = np.minimum.reduceat(block, np.maximum(starts[docs], lo) - lo, axis=0)  # (len(docs), num_perm)
        out[docs] = np.minimum(out[docs], mins)
    return out


class _Sketch:
    """The part of datasketch.MinHash that MinHashLSH reads: hash values, length and scheme."""

    scheme = "affine32"
    __slots__ = ("hashvalues",)

    def __init__(self, hashvalues: np.ndarray):
        self.hashvalues = hashvalues

    def __len__(self) -> int:
        return len(self.hashvalues)


class _UnionFind:
    """Union-find whose root is always the smallest member, i.e. the first document in input order."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)


class NearDedup:
    """The near-dedup stage (a global stage: signatures in workers, LSH and clusters in the parent)."""

    name = "near_dedup"

    def __init__(self, cfg: NearDedupConfig, batch: int = 256):
        self.cfg = cfg
        self.batch = batch
        self.a, self.b = permutations(cfg.num_perm, cfg.seed)

    def signatures(self, texts: list[str]) -> np.ndarray:
        return signatures([shingles(t, self.cfg.shingle_size) for t in texts], self.a, self.b)

    def keys(
        self, docs: Iterable[Doc], rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[Doc, np.ndarray]]:
        pending: list[Doc] = []
        for doc in docs:
            pending.append(doc)
            if len(pending) == self.batch:
                yield from zip(pending, self.signatures([d.text for d in pending]))
                pending = []
        if pending:
            yield from zip(pending, self.signatures([d.text for d in pending]))

    def empty_keys(self) -> np.ndarray:
        return np.zeros((0, self.cfg.num_perm), dtype=np.uint32)

    def find_duplicates(self, ids: list[str], sigs: np.ndarray) -> tuple[dict[int, Removal], dict]:
        """Removals by global position (all but the first of each cluster), and statistics for the report."""
        from datasketch import MinHashLSH

        threshold = self.cfg.threshold
        w = self.cfg.false_negative_weight
        lsh = MinHashLSH(threshold=threshold, num_perm=self.cfg.num_perm, weights=(1.0 - w, w))
        uf = _UnionFind()
        candidates = joined = 0
        for i, sig in enumerate(sigs):
            if (sig == EMPTY).all():
                continue  # no words: nothing to compare (exact dedup handles identical empty texts)
            sketch = _Sketch(sig)
            for j in lsh.query(sketch):
                candidates += 1
                if self.cfg.verify and _jaccard(sig, sigs[j]) < threshold:
                    continue
                joined += 1
                uf.union(i, j)
            lsh.insert(i, sketch, check_duplication=False)
        removals: dict[int, Removal] = {}
        roots: set[int] = set()
        for i in sorted(uf.parent):
            root = uf.find(i)
            if root != i:
                roots.add(root)
                sim = _jaccard(sigs[i], sigs[root])
                reason = f"near duplicate of {ids[root]} (estimated Jaccard {sim:.2f})"
                removals[i] = Removal(self.name, reason, ids[root])
        stats = {
            "bands": lsh.b,
            "rows": lsh.r,
            "candidate_pairs": candidates,
            "joined_pairs": joined,
            "clusters": len(roots),
        }
        return removals, stats


def _jaccard(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.count_nonzero(x == y)) / len(x)
