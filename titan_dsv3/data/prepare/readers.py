"""Reading documents from JSONL (optionally gzipped), Parquet, Arrow IPC and plain text files.

The parent lists the input files and cuts them into tasks (byte ranges of uncompressed line files, groups of
Parquet row groups); a worker reads one task. A bad record (malformed JSON, bytes that are not UTF-8, a missing or
non-string text field) comes out as a document already marked removed by the "read" stage, so it is counted and
reported like any other removal; with ``on_error = "stop"`` it raises DataError instead. Problems with a whole file
(empty, unreadable, no text column) are appended to ``issues``.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from titan_dsv3.data.prepare.config import ConfigError, InputConfig
from titan_dsv3.data.prepare.document import DataError, Doc

SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}
_STAGE = "read"


@dataclass(frozen=True)
class Task:
    """A slice of one input file that one worker reads; ``index`` is the task's rank among all tasks."""

    index: int
    path: str
    fmt: str
    start: int = 0
    """First byte (line formats) or first row group (Parquet)."""
    end: int = -1
    """End byte or row group, exclusive; -1 = the end of the file."""
    first_record: int = 1
    """Number of the task's first line or row in its file (1-based), for ids of the form file:record."""
    whole_file: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def file_format(path: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    name = path[:-3] if path.endswith(".gz") else path
    return SUFFIXES.get(os.path.splitext(name)[1].lower())


def list_files(patterns: list[str]) -> list[str]:
    """Files named by paths, folders (recursively, hidden entries skipped) and glob patterns, sorted per entry."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise ConfigError(f"input.paths: {pattern!r} matches no file; check the path or the pattern")
        for m in matches:
            if os.path.isdir(m):
                found = [
                    str(p)
                    for p in sorted(Path(m).rglob("*"))
                    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(m).parts)
                ]
                files.extend(found)
            else:
                files.append(m)
    return list(dict.fromkeys(files))  # a file named twice is read once


def _line_chunks(path: str, chunk: int) -> list[tuple[int, int, int]]:
    """(start byte, end byte, first line number) of pieces of about ``chunk`` bytes cut at line ends."""
    size = os.path.getsize(path)
    if size <= chunk:
        return [(0, -1, 1)]
    pieces, start, line = [], 0, 1
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + chunk, size))
            f.readline()  # finish the line the cut fell into
            end = min(f.tell(), size)
            f.seek(start)
            newlines, left = 0, end - start
            while left:
                block = f.read(min(left, 1 << 24))
                newlines += block.count(b"\n")
                left -= len(block)
            pieces.append((start, end, line))
            start, line = end, line + newlines
    return pieces


def _parquet_chunks(path: str, chunk: int) -> list[tuple[int, int, int]]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    pieces, first, rows, size, row = [], 0, 0, 0, 1
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        rows, size = rows + rg.num_rows, size + rg.total_byte_size
        if size >= chunk or i == meta.num_row_groups - 1:
            pieces.append((first, i + 1, row))
            first, row, rows, size = i + 1, row + rows, 0, 0
    return pieces or [(0, 0, 1)]


def plan_tasks(cfg: InputConfig, issues: list[dict]) -> list[Task]:
    """Tasks over all input files in order; files that cannot be planned go to ``issues`` (or raise, on stop)."""
    chunk = cfg.chunk_mb << 20
    tasks: list[Task] = []
    for path in list_files(cfg.paths):
        fmt = file_format(path, cfg.format)
        if fmt is None:
            known = " ".join(sorted(SUFFIXES))
            report_file_issue(
                cfg, issues, path, f"unknown format; name files {known} (or .gz) or set input.format"
            )
            continue
        try:
            if fmt == "parquet":
                pieces = _parquet_chunks(path, chunk)
            elif path.endswith(".gz") or fmt == "arrow" or (fmt == "text" and cfg.text_unit == "file"):
                pieces = [(0, -1, 1)]
            else:
                pieces = _line_chunks(path, chunk)
        except Exception as e:  # any unreadable file is reported, not fatal
            report_file_issue(cfg, issues, path, f"cannot read: {_one_line(e)}")
            continue
        for start, end, first in pieces:
            tasks.append(Task(len(tasks), path, fmt, start, end, first, whole_file=len(pieces) == 1))
    return tasks


def report_file_issue(cfg: InputConfig, issues: list[dict], path: str, reason: str) -> None:
    if cfg.on_error == "stop":
        raise DataError(f'{path}: {reason}; set input.on_error = "skip" to report such files and go on')
    issues.append({"file": path, "reason": reason})


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class _Reader:
    """Turns raw records of one task into documents, applying input.on_error."""

    def __init__(self, cfg: InputConfig):
        self.cfg = cfg

    def bad(self, rid: str, reason: str) -> Doc:
        if self.cfg.on_error == "stop":
            raise DataError(f'{rid}: {reason}; set input.on_error = "skip" to report such records and go on')
        return Doc(rid, "").remove(_STAGE, reason)

    def doc(self, rid: str, record_id: object, text: object) -> Doc:
        """A document from an id value (None = use rid) and a text value, or a removed one saying what is wrong."""
        has_id = (
            isinstance(record_id, (str, int)) and not isinstance(record_id, bool) and str(record_id) != ""
        )
        doc_id = str(record_id) if has_id else rid
        where = f" ({rid})" if has_id else ""
        field = self.cfg.text_field
        if text is None:
            return self.bad(doc_id, f"field '{field}' is missing or null{where}")
        if not isinstance(text, str):
            return self.bad(doc_id, f"field '{field}' holds {type(text).__name__}, not a string{where}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = ord(e.object[e.start])
            return self.bad(
                doc_id, f"field '{field}' has an unpaired surrogate (\\u{bad:04x}) at {e.start}{where}"
            )
        return Doc(doc_id, text)

    def decode(self, rid: str, raw: bytes) -> str | Doc:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return self.bad(rid, f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")


def _lines(task: Task) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line without its end) of the task's byte range."""
    opener = gzip.open if task.path.endswith(".gz") else open
    with opener(task.path, "rb") as f:
        if task.start:
            f.seek(task.start)
        pos = task.start
        for number, raw in enumerate(f, start=task.first_record):
            if task.end >= 0 and pos >= task.end:
                break
            pos += len(raw)
            yield number, raw.rstrip(b"\r\n")


def _read_jsonl(r: _Reader, task: Task) -> Iterator[Doc]:
    for number, raw in _lines(task):
        if not raw.strip():
            continue
        rid = f"{task.path}:{number}"
        line = r.decode(rid, raw)
        if isinstance(line, Doc):
            yield line
            continue
        if number == 1 and line.startswith("\ufeff"):  # a byte-order mark, as some Windows tools write
            line = line[1:]
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield r.bad(rid, f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            yield r.bad(rid, f"a JSON {type(obj).__name__}, not an object")
            continue
        yield r.doc(rid, obj.get(r.cfg.id_field), obj.get(r.cfg.text_field))


def _read_text(r: _Reader, task: Task) -> Iterator[Doc]:
    if r.cfg.text_unit == "line":
        for number, raw in _lines(task):
            if raw.strip():
                text = r.decode(f"{task.path}:{number}", raw)
                yield text if isinstance(text, Doc) else Doc(f"{task.path}:{number}", text)
        return
    opener = gzip.open if task.path.endswith(".gz") else open
    with opener(task.path, "rb") as f:
        raw = f.read()
    if raw.strip():
        text = r.decode(task.path, raw)
        yield text if isinstance(text, Doc) else Doc(task.path, text)


def _read_table(r: _Reader, task: Task, batches: Iterator, names: list[str]) -> Iterator[Doc]:
    cfg = r.cfg
    if cfg.text_field not in names:
        raise _FileIssue(f"no column '{cfg.text_field}' (columns: {', '.join(names)}); set input.text_field")
    number = task.first_record
    for batch in batches:
        texts = batch.column(cfg.text_field).to_pylist()
        ids = batch.column(cfg.id_field).to_pylist() if cfg.id_field in names else [None] * len(texts)
        for record_id, text in zip(ids, texts):
            yield r.doc(f"{task.path}:{number}", record_id, text)
            number += 1


def _read_parquet(r: _Reader, task: Task) -> Iterator[Doc]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(task.path)
    names = pf.schema_arrow.names
    columns = [c for c in (r.cfg.text_field, r.cfg.id_field) if c in names]
    groups = list(range(task.start, task.end if task.end >= 0 else pf.num_row_groups))
    batches = pf.iter_batches(row_groups=groups, columns=columns) if groups else iter(())
    yield from _read_table(r, task, batches, names)


def _read_arrow(r: _Reader, task: Task) -> Iterator[Doc]:
    import pyarrow as pa

    with pa.memory_map(task.path, "r") as source:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:  # the streaming format (what `datasets` writes)
            source.seek(0)
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        yield from _read_table(r, task, batches, reader.schema.names)


class _FileIssue(Exception):
    """A problem with a whole file rather than one record."""


READERS = {"jsonl": _read_jsonl, "text": _read_text, "parquet": _read_parquet, "arrow": _read_arrow}


def read_task(cfg: InputConfig, task: Task, issues: list[dict]) -> Iterator[Doc]:
    """Documents of one task in file order; removed ones carry the reason. Whole-file problems go to ``issues``."""
    r = _Reader(cfg)
    records = 0
    try:
        for doc in READERS[task.fmt](r, task):
            records += 1
            yield doc
    except DataError:
        raise
    except _FileIssue as e:
        report_file_issue(cfg, issues, task.path, str(e))
        return
    except Exception as e:  # a truncated or corrupt file is reported, not fatal
        done = f" after {records} records" if records else ""
        report_file_issue(cfg, issues, task.path, f"stopped reading{done}: {_one_line(e)}")
        return
    if records == 0 and task.whole_file:
        empty = os.path.getsize(task.path) == 0
        report_file_issue(
            cfg, issues, task.path, "empty file" if empty else "no records (only blank lines or rows)"
        )
