"""Readers: task cuts of large line files, ids, plain text units, and whole-file problems."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from titan_dsv3.data.prepare.config import InputConfig
from titan_dsv3.data.prepare.document import DataError
from titan_dsv3.data.prepare.readers import Task, _line_chunks, plan_tasks, read_task


def _read_all(cfg: InputConfig, tasks: list[Task]) -> tuple[list, list]:
    issues: list[dict] = []
    docs = [d for t in tasks for d in read_task(cfg, t, issues)]
    return docs, issues


def test_line_files_cut_into_tasks_read_every_record_once(tmp_path):
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": f"document number {i} " + "x" * (i % 50)}) for i in range(400)]
    lines[17] = ""  # a blank line still counts for the line numbers
    path.write_text("\n".join(lines) + "\n")
    pieces = _line_chunks(str(path), chunk=3000)
    assert len(pieces) > 5 and pieces[0][0] == 0 and pieces[-1][1] == path.stat().st_size
    tasks = [
        Task(i, str(path), "jsonl", s, e, first, whole_file=False) for i, (s, e, first) in enumerate(pieces)
    ]
    docs, issues = _read_all(InputConfig(), tasks)
    assert not issues and len(docs) == 399
    assert [d.id for d in docs] == [f"{path}:{i + 1}" for i in range(400) if i != 17]
    assert all(d.text.startswith(f"document number {int(d.id.rsplit(':', 1)[1]) - 1} ") for d in docs)


def test_plan_and_formats(tmp_path):
    (tmp_path / "t.txt").write_text("first line\n\n  \nsecond line\r\n")
    with gzip.open(tmp_path / "u.txt.gz", "wt") as f:
        f.write("zipped text\n")
    pq.write_table(
        pa.table({"body": ["p0", "p1", "p2"], "id": [7, None, 9]}), tmp_path / "p.parquet", row_group_size=1
    )
    (tmp_path / ".hidden.jsonl").write_text("{}\n")
    cfg = InputConfig(paths=[str(tmp_path)], text_unit="line", text_field="body")
    issues: list[dict] = []
    tasks = plan_tasks(cfg, issues)
    assert [t.fmt for t in tasks] == ["parquet", "text", "text"] and not issues
    docs, issues = _read_all(cfg, tasks)
    assert [(d.id.split("/")[-1], d.text) for d in docs] == [
        ("7", "p0"),
        ("p.parquet:2", "p1"),
        ("9", "p2"),
        ("t.txt:1", "first line"),
        ("t.txt:4", "second line"),
        ("u.txt.gz:1", "zipped text"),
    ]
    whole, _ = _read_all(
        InputConfig(paths=[str(tmp_path / "t.txt")]),
        plan_tasks(InputConfig(paths=[str(tmp_path / "t.txt")]), []),
    )
    assert [d.text for d in whole] == ["first line\n\n  \nsecond line\r\n"]


def test_whole_file_problems(tmp_path):
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "nocol.parquet")
    with open(tmp_path / "cut.jsonl.gz", "wb") as f:
        f.write(gzip.compress(b'{"text": "one"}\n{"text": "two"}\n')[:-12])
    cfg = InputConfig(paths=[str(tmp_path)])
    issues: list[dict] = []
    tasks = plan_tasks(cfg, issues)
    docs, more = _read_all(cfg, tasks)
    reasons = {i["file"].split("/")[-1]: i["reason"] for i in issues + more}
    assert reasons["bad.parquet"].startswith("cannot read")
    assert "no column 'text'" in reasons["nocol.parquet"]
    assert reasons["blank.jsonl"].startswith("no records")
    assert reasons["cut.jsonl.gz"].startswith("stopped reading")
    with pytest.raises(DataError, match="bad.parquet"):
        plan_tasks(InputConfig(paths=[str(tmp_path / "bad.parquet")], on_error="stop"), [])


def test_byte_order_mark_and_ids(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"id": 5, "text": "first"}\n{"id": true, "text": "second"}\n{"id": "", "text": "third"}\n'
    )
    cfg = InputConfig(paths=[str(path)])
    docs, issues = _read_all(cfg, plan_tasks(cfg, []))
    assert [(d.id, d.text) for d in docs] == [("5", "first"), (f"{path}:2", "second"), (f"{path}:3", "third")]
    assert not issues and all(d.removed is None for d in docs)
