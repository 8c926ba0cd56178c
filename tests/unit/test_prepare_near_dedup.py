"""Near-dedup with planted clusters: exactly len(cluster) - 1 removed per cluster, and the same with 1 and 4 workers."""

from __future__ import annotations

import json
import random
import string

import datasketch
import numpy as np
import pytest

from titan_dsv3.data.prepare.config import NearDedupConfig, build_config
from titan_dsv3.data.prepare.dedup_minhash import NearDedup, permutations, shingles, signatures
from titan_dsv3.data.prepare.pipeline import run

EDIT_FRACTION = 0.03  # words substituted, deleted or inserted per copy


def planted_corpus(seed: int, n_clusters: int = 30, n_single: int = 120, words: int = 200):
    """[(id, text)] in random order, and {cluster: [ids]}; each cluster is one base text and 1-4 edited copies."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) for _ in range(5000)
    ]

    def edited(ws: list[str]) -> list[str]:
        ws = list(ws)
        for _ in range(round(EDIT_FRACTION * len(ws))):
            i, op = rng.randrange(len(ws)), rng.random()
            if op < 0.6:
                ws[i] = rng.choice(vocab)
            elif op < 0.8:
                del ws[i]
            else:
                ws.insert(i, rng.choice(vocab))
        return ws

    docs, clusters = [], {}
    for c in range(n_clusters):
        base = [rng.choice(vocab) for _ in range(words)]
        ids = [f"c{c}-{k}" for k in range(rng.randint(2, 5))]
        clusters[f"c{c}"] = ids
        docs += [(i, " ".join(base if k == 0 else edited(base))) for k, i in enumerate(ids)]
    docs += [(f"s{i}", " ".join(rng.choice(vocab) for _ in range(words))) for i in range(n_single)]
    rng.shuffle(docs)
    return docs, clusters


def _write(tmp_path, docs, n_files: int) -> list[str]:
    paths = []
    for f in range(n_files):
        p = tmp_path / f"part{f}.jsonl"
        p.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs[f::n_files]))
        paths.append(str(p))
    return paths


def _score(removed: list[dict], clusters: dict[str, list[str]]) -> tuple[float, float]:
    """(recall, precision) of the removals against the planted clusters; asserts len(cluster) - 1 per cluster."""
    by_id = {r["id"]: r for r in removed}
    for name, ids in clusters.items():
        gone = [i for i in ids if i in by_id]
        assert len(gone) == len(ids) - 1, f"cluster {name}: removed {gone} of {ids}"
        (kept,) = set(ids) - set(gone)
        assert all(by_id[i]["kept"] == kept for i in gone)
    correct = sum(
        r["id"].split("-")[0] == r["kept"].split("-")[0] for r in removed if r["id"].startswith("c")
    )
    planted = sum(len(ids) - 1 for ids in clusters.values())
    return correct / planted, correct / max(len(removed), 1)


def test_planted_clusters_one_and_four_workers(tmp_path):
    docs, clusters = planted_corpus(seed=0)
    paths = _write(tmp_path, docs, n_files=8)
    results = {}
    for workers in (1, 4):
        out = tmp_path / f"out{workers}"
        # 3-word shingles: a copy with 3 % of its words edited keeps Jaccard ~0.85 with its base; at threshold 0.5
        # LSH takes 25 bands x 5 rows, which makes such a pair a candidate with probability > 0.999.
        overrides = {
            "input.paths": paths,
            "output.dir": str(out),
            "pipeline.stages": ["near_dedup", "tokenize"],
            "pipeline.workers": workers,
            "pipeline.progress": False,
            "near_dedup.shingle_size": 3,
            "near_dedup.threshold": 0.5,
        }
        summary = run(build_config(None, list(overrides.items())), log=lambda _: None)
        report = json.loads((out / "report.json").read_text())
        removed = [r for r in report["removed"] if r["stage"] == "near_dedup"]
        recall, precision = _score(removed, clusters)
        assert recall >= 0.95 and precision >= 0.95, (recall, precision)
        assert summary["documents_out"] == len(docs) - len(removed)
        shards = b"".join(
            (out / s["file"]).read_bytes() for s in json.loads((out / "manifest.json").read_text())["shards"]
        )
        results[workers] = (removed, report["stages"], shards)
    assert results[1] == results[4]


@pytest.mark.parametrize("num_perm,seed", [(128, 1), (64, 7)])
def test_signatures_equal_datasketch(num_perm, seed):
    if int(datasketch.__version__.split(".")[0]) < 2:
        pytest.skip("datasketch < 2.0 has another default permutation scheme")
    docs, _ = planted_corpus(seed=1, n_clusters=3, n_single=5, words=60)
    texts = [t for _, t in docs] + ["", "one", "a b"]
    sets = [shingles(t, 5) for t in texts]
    a, b = permutations(num_perm, seed)
    ours = signatures(sets, a, b)
    for row, items in zip(ours, sets):
        m = datasketch.MinHash(num_perm=num_perm, seed=seed)
        for s in items:
            m.update(s)
        np.testing.assert_array_equal(row, m.hashvalues)


def test_union_find_keeps_first_and_verifies():
    texts = ["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"] * 3
    texts.insert(1, "completely different words that share nothing at all with the others here")
    stage = NearDedup(NearDedupConfig(shingle_size=2, threshold=0.7))
    ids = ["a", "b", "c", "d"]
    removals, stats = stage.find_duplicates(ids, stage.signatures(texts))
    assert sorted(removals) == [2, 3] and {r.kept for r in removals.values()} == {"a"}
    assert stats["clusters"] == 1 and stats["bands"] * stats["rows"] <= 128
