"""The whole preparation run: every reader and kind of bad input, the report's accounting, shards and manifest,
the val split, resume after an interruption, and the CLI's exit statuses."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from titan_dsv3.data.prepare import pipeline
from titan_dsv3.data.prepare.config import build_config
from titan_dsv3.data.prepare.tokenize import split_of
from titan_dsv3.data.tokenizer import TextTokenizer
from titan_dsv3.tools.prepare_data import main

_WORDS = {
    "noun": "harbor lantern village teacher garden captain river market letter window doctor forest bridge engine "
    "island painter kitchen mountain student farmer sailor baker station library orchard valley tower",
    "adj": "quiet old bright narrow distant heavy gentle busy small ancient curious patient early silver",
    "verb": "carried found opened painted repaired visited watched followed described remembered built",
    "adv": "slowly quietly often rarely carefully gladly",
    "name": "Anna Peter Maria Tom Lucy Omar Ingrid Pablo",
    "place": "Lisbon Oslo Dublin Kyoto Quebec Nairobi Lima Tallinn",
    "when": "yesterday tonight afterwards meanwhile",
}
_TEMPLATES = [
    "The {adj} {noun} {verb} a {noun} near the {noun}.",
    "{name} {verb} the {noun} {when}, and she {verb} it {adv}.",
    "In {place}, every {noun} was {adj} and {adj}.",
    "A {adj} {noun} can be {verb} with {noun}s or {noun}s.",
    "They {verb} {noun}s to {place} {when}.",
    "Nobody knew why {name} {verb} that {noun} so {adv}.",
]


def english(rng: random.Random, sentences: int = 14) -> str:
    """Random but ordinary English prose: passes every default filter and reads as English."""

    def fill(template: str) -> str:
        parts = template.split("{")
        out = parts[0]
        for p in parts[1:]:
            key, rest = p.split("}", 1)
            out += rng.choice(_WORDS[key].split()) + rest
        return out

    return " ".join(fill(rng.choice(_TEMPLATES)) for _ in range(sentences))


def write_inputs(d) -> dict:
    """Files of every format with good and bad records; returns what the test expects of them."""
    rng = random.Random(0)
    good = [english(rng) for _ in range(12)]
    near = good[0].split()
    near[len(near) // 2] = "lighthouse"
    jsonl = [json.dumps({"id": f"j{i}", "text": t}) for i, t in enumerate(good[:6])]
    jsonl += [
        json.dumps({"id": "dup-exact", "text": good[1].upper()}),  # exact duplicate after normalisation
        json.dumps({"id": "dup-near", "text": " ".join(near)}),  # near duplicate of j0
        json.dumps(
            {"id": "html", "text": f"<html><body><p>{good[6]}</p><p>Caf&eacute; one.</p></body></html>"}
        ),
        json.dumps({"id": "short", "text": "Too short to keep."}),
        json.dumps({"id": "german", "text": "Die alte Stadt am Hafen erwacht im Winter nur langsam. " * 12}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"id": "no-text"}),
        json.dumps({"id": "num-text", "text": 42}),
        '{"id": "surrogate", "text": "bad \\ud800 half"}',
        "",
    ]
    lines = [ln.encode() for ln in jsonl]
    lines.insert(3, b'{"id": "latin1", "text": "caf\xe9"}')
    (d / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "gz0", "text": good[7]}) + "\n" + json.dumps({"text": good[8]}) + "\n")
    pq.write_table(pa.table({"id": ["pq0", "pq1"], "text": [good[9], None]}), d / "c.parquet")
    table = pa.table({"text": [good[10]]})
    with pa.ipc.new_stream(d / "d.arrow", table.schema) as w:
        w.write_table(table)
    (d / "e.txt").write_text(good[11])
    (d / "empty.jsonl").write_bytes(b"")
    (d / "notes.xyz").write_text("unknown format")
    return {
        "records": len(lines) - 1 + 2 + 2 + 1 + 1,  # a.jsonl without its blank line, gz, parquet, arrow, text
        "read_errors": {"a.jsonl:4", "a.jsonl:13", "a.jsonl:14", "no-text", "num-text", "surrogate", "pq1"},
        "issues": {"empty.jsonl", "notes.xyz"},
        "kept_text": ["Café one.", good[0][:60]],
    }


def _cfg(d, out: str = "out", **overrides):
    values = {
        "input.paths": [str(d / "in")],
        "output.dir": str(d / out),
        "pipeline.progress": False,
        "filter.min_words": 20,
        **overrides,
    }
    return build_config(None, list(values.items()))


def _run(cfg):
    return pipeline.run(cfg, log=lambda _: None)


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "in").mkdir()
    return tmp_path, write_inputs(tmp_path / "in")


def _tokens(out) -> tuple[dict, np.ndarray]:
    manifest = json.loads((out / "manifest.json").read_text())
    arrays = [np.fromfile(out / s["file"], dtype="<u4") for s in manifest["shards"]]
    return manifest, np.concatenate(arrays) if arrays else np.zeros(0, dtype="<u4")


def test_report_accounts_for_every_document(inputs):
    d, expect = inputs
    summary = _run(_cfg(d))
    out = d / "out"
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert [s["stage"] for s in stages] == [
        "read",
        "clean",
        "exact_dedup",
        "near_dedup",
        "filter",
        "language",
        "tokenize",
    ]
    assert stages[0]["in"] == expect["records"] == summary["documents_in"]
    for prev, nxt in zip(stages, stages[1:]):
        assert prev["out"] == nxt["in"]
    for s in stages:
        assert s["in"] - s["out"] == s["removed"] == sum(r["stage"] == s["stage"] for r in report["removed"])
    removed = {r["id"]: r for r in report["removed"]}
    assert len(removed) == len(report["removed"])
    read_errors = {i.split("/")[-1] if "/" in i else i for i, r in removed.items() if r["stage"] == "read"}
    assert read_errors == expect["read_errors"]
    assert removed["dup-exact"]["kept"] == "j1" and removed["dup-exact"]["stage"] == "exact_dedup"
    assert removed["dup-near"]["kept"] == "j0" and removed["dup-near"]["stage"] == "near_dedup"
    assert removed["short"]["stage"] == "filter" and removed["short"]["reason"].startswith("min_words")
    assert removed["german"]["stage"] in ("filter", "language")
    assert all(r["reason"] for r in report["removed"])
    assert {i["file"].split("/")[-1] for i in report["inputs"]["issues"]} == expect["issues"]

    manifest, tokens = _tokens(out)
    assert manifest["format"] == "titan_dsv3.tokens.v1" and manifest["dtype"] == "uint32"
    assert sum(s["num_docs"] for s in manifest["shards"]) == stages[-1]["out"] == summary["documents_out"]
    assert manifest["total_tokens"]["train"] == len(tokens) and manifest["total_tokens"]["val"] == 0
    tok = TextTokenizer(manifest["tokenizer"])
    assert int((tokens == tok.eos_id).sum()) == stages[-1]["out"] and tokens[-1] == tok.eos_id
    text = tok.decode(t for t in tokens.tolist() if t != tok.eos_id)
    assert all(k in text for k in expect["kept_text"]) and "<p>" not in text
    assert not (out / ".work").exists()


def test_val_split_and_workers(inputs):
    d, _ = inputs
    _run(_cfg(d, "one", **{"tokenize.val_fraction": 0.4}))
    _run(_cfg(d, "two", **{"tokenize.val_fraction": 0.4, "pipeline.workers": 2}))
    m1, t1 = _tokens(d / "one")
    m2, t2 = _tokens(d / "two")
    assert m1 == m2 and np.array_equal(t1, t2)
    splits = {s["split"] for s in m1["shards"]}
    assert splits == {"train", "val"} and m1["total_tokens"]["val"] > 0
    from titan_dsv3.data.loader import load_prepared  # the training loader reads the folder as it is

    for split in ("train", "val"):
        assert len(load_prepared(d / "one", split)) == m1["total_tokens"][split]
    assert sum(split_of(f"doc{i}", 0.25) == "val" for i in range(4000)) in range(900, 1100)


def test_resume_skips_finished_tasks(inputs, monkeypatch):
    d, _ = inputs
    _run(_cfg(d, "full"))
    calls = []
    original = pipeline.TaskRunner.run

    def interrupted(self, s, t):
        if len(calls) == 9:
            raise KeyboardInterrupt
        calls.append((s, t))
        return original(self, s, t)

    monkeypatch.setattr(pipeline.TaskRunner, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(d, "resumed"))
    assert not (d / "resumed" / "manifest.json").exists()
    first = list(calls)
    calls.clear()
    monkeypatch.setattr(
        pipeline.TaskRunner, "run", lambda self, s, t: calls.append((s, t)) or original(self, s, t)
    )
    _run(_cfg(d, "resumed"))
    assert not set(first) & set(calls) and len(first) + len(calls) == 3 * 6  # 3 segments x 6 tasks
    full = json.loads((d / "full" / "report.json").read_text())
    resumed = json.loads((d / "resumed" / "report.json").read_text())
    assert full["stages"] == resumed["stages"] and full["removed"] == resumed["removed"]
    assert np.array_equal(_tokens(d / "full")[1], _tokens(d / "resumed")[1])


def test_finished_run_and_changed_config(inputs, capsys):
    d, _ = inputs
    args = ["--input", str(d / "in"), "--output", str(d / "out"), "--pipeline.progress", "false"]
    assert main(args + ["--filter.min_words", "20"]) == 0
    assert main(args + ["--filter.min_words", "20"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert main(args + ["--filter.min_words", "30"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "output.overwrite" in err
    assert main(args + ["--filter.min_words=30", "--output.overwrite"]) == 0


def test_on_error_stop(inputs, capsys):
    d, _ = inputs
    args = ["--input", str(d / "in" / "a.jsonl"), "--output", str(d / "out"), "--input.on_error", "stop"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a.jsonl:4" in err and "not UTF-8" in err
    assert (
        main(["--input", str(d / "in" / "empty.jsonl"), "--output", str(d / "o2"), "--input.on_error=stop"])
        == 1
    )
    assert "empty file" in capsys.readouterr().err
