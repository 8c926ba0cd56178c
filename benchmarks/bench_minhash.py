"""MinHash signature + LSH throughput of the near-dedup stage against a plain datasketch loop, in one run.

    python benchmarks/bench_minhash.py [--docs 2000] [--doc-bytes 1024] [--num-perm 128] [--shingle 5] [--repeat 3]

One process, one core: documents/s of (shingling + signature) and of (shingling + signature + LSH clustering) for
  ours      titan_dsv3.data.prepare.dedup_minhash (SHA-1 per shingle, then numpy over a batch of documents),
  bulk      datasketch.MinHash.bulk (update_batch: numpy over one document),
  loop      datasketch.MinHash(num_perm, seed) with one .update per shingle,
on the same random 1 KB documents of English-like letter frequencies (a tenth of them near-duplicates), checking that
all three give identical signatures and that the LSH step (MinHashLSH + union-find, timed once and added to each
row) removes the same documents. Times are CPU seconds of the process (one core: nothing here uses a second
thread), the fewest of --repeat rounds that run the methods in turn, so that other load on the machine matters
little; wall-clock documents/s are printed beside them.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

import datasketch
import numpy as np

from titan_dsv3.data.prepare.config import NearDedupConfig
from titan_dsv3.data.prepare.dedup_minhash import NearDedup, shingles


def make_docs(n: int, doc_bytes: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("etaoinshrdlucmfwypvbgk") for _ in range(rng.randint(1, 9))) for _ in range(20_000)
    ]
    docs = []
    for i in range(n):
        if i % 10 == 9:  # a near duplicate of an earlier document: 3 % of its words replaced
            words = rng.choice(docs).split()
            for _ in range(max(1, len(words) * 3 // 100)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            docs.append(" ".join(words))
            continue
        words, size = [], 0
        while size < doc_bytes:
            w = rng.choice(vocab)
            words.append(w)
            size += len(w) + 1
        docs.append(" ".join(words)[:doc_bytes])
    return docs


def timed(rounds: int, fns: dict) -> dict[str, tuple[float, float, object]]:
    """{name: (fewest CPU seconds, fewest wall seconds, result)} over ``rounds`` rounds that run every function
    once in turn, so a busy machine slows them alike. CPU time of this one process = time on one core."""
    best = {name: [float("inf"), float("inf"), None] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            out = fn()
            b = best[name]
            b[0], b[1], b[2] = min(b[0], time.process_time() - c0), min(b[1], time.perf_counter() - w0), out
    return {name: tuple(v) for name, v in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--doc-bytes", type=int, default=1024)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--shingle", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    docs = make_docs(args.docs, args.doc_bytes)
    ids = [str(i) for i in range(len(docs))]
    stage = NearDedup(
        NearDedupConfig(num_perm=args.num_perm, shingle_size=args.shingle, threshold=args.threshold)
    )
    perm = dict(num_perm=args.num_perm, seed=stage.cfg.seed)

    def ours() -> np.ndarray:  # what the stage's workers do: signatures of batches of stage.batch documents
        return np.concatenate(
            [stage.signatures(docs[i : i + stage.batch]) for i in range(0, len(docs), stage.batch)]
        )

    def bulk() -> np.ndarray:
        sets = [shingles(t, args.shingle) for t in docs]
        return np.stack([m.hashvalues for m in datasketch.MinHash.bulk(sets, **perm)])

    def loop() -> np.ndarray:
        rows = []
        for t in docs:
            m = datasketch.MinHash(**perm)
            for s in shingles(t, args.shingle):
                m.update(s)
            rows.append(m.hashvalues)
        return np.stack(rows)

    rows = timed(
        args.repeat,
        {"ours (numpy batch)": ours, "datasketch MinHash.bulk": bulk, "datasketch update loop": loop},
    )
    sig = rows["ours (numpy batch)"][2]
    lsh_cpu, lsh_wall, (removals, stats) = timed(
        args.repeat, {"lsh": lambda: stage.find_duplicates(ids, sig)}
    )["lsh"]
    for name, (_, _, other) in rows.items():
        assert np.array_equal(other, sig), f"{name}: signatures differ"
        assert stage.find_duplicates(ids, other)[0].keys() == removals.keys()

    n = len(docs)
    base_cpu = rows["datasketch update loop"][0]
    print(
        f"{n} documents of {args.doc_bytes} bytes, num_perm {args.num_perm}, {args.shingle}-word shingles, "
        f"LSH {stats['bands']} bands x {stats['rows']} rows at {args.threshold}; one process, "
        f"best of {args.repeat} interleaved rounds"
    )
    print(f"{'method':<26}{'signature docs/s':>18}{'+ LSH docs/s':>15}{'speed-up':>10}{'(wall docs/s)':>16}")
    for name, (cpu, wall, _) in rows.items():
        print(
            f"{name:<26}{n / cpu:>18,.0f}{n / (cpu + lsh_cpu):>15,.0f}"
            f"{(base_cpu + lsh_cpu) / (cpu + lsh_cpu):>9.1f}x{n / (wall + lsh_wall):>16,.0f}"
        )
    print(
        "docs/s per CPU-second of one core; speed-up = signature + LSH against the update loop + the same LSH"
    )
    print(
        f"signatures identical: yes; LSH ({lsh_cpu * 1e3:.0f} ms) removed {len(removals)} documents in every case"
    )
    print(
        f"cpu: {_cpu_name()}, {os.cpu_count()} cores; numpy {np.__version__}, datasketch {datasketch.__version__}, "
        f"python {platform.python_version()}"
    )


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
