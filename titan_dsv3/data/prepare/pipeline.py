"""The preparation pipeline: stage order, worker processes, resume, and report.json.

The configured stages are cut into segments at each global stage (exact_dedup, near_dedup), which must see every
document before deciding. The input is cut into tasks (readers.plan_tasks); for segment s a worker takes one task,
reads its documents (the input for s = 0, else what segment s-1 kept), applies the previous global stage's
decisions, runs the per-document stages as chained generators ``stage(docs, rank=task, world_size=tasks)`` and
ends either with the global stage's keys (hashes, MinHash signatures) or, in the last segment, with the token
shards. Between segments the parent reads all keys in input order and decides which documents go.

Everything a task leaves goes to ``<output>/.work/seg<s>/<task>.*``, and its ``.done.json`` is written last, so an
interrupted run picks up at the first unfinished task (``.work/plan.json`` holds the tasks and a fingerprint of
the config and inputs; a different fingerprint stops the run unless output.overwrite is set). The task cut and
every decision depend only on the input order, so 1 and N workers give identical shards and reports.

No document is dropped: a stage marks it removed and yields it; the ledger checks, per stage and task, that
documents in = documents out + documents removed, and writes every removal (id, stage, reason, kept copy).

report.json: ``stages`` [{stage, in, out, removed, ...statistics of the dedup stages}] starting with "read" (in =
records of readable files, out = documents), ``removed`` [{id, stage, reason, kept (duplicates only)}] with exactly
``in - out`` entries per stage, ``inputs.issues`` [{file, reason}] for whole files that gave no documents
or stopped early (empty, unreadable, no text column), ``tokens`` per split, the resolved ``config`` and the
``fingerprint`` that resuming checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from titan_dsv3.data.prepare.clean import Clean
from titan_dsv3.data.prepare.config import GLOBAL_STAGES, ConfigError, PrepareConfig
from titan_dsv3.data.prepare.dedup_exact import ExactDedup
from titan_dsv3.data.prepare.dedup_minhash import NearDedup
from titan_dsv3.data.prepare.document import Doc
from titan_dsv3.data.prepare.filters import QualityFilter
from titan_dsv3.data.prepare.language import LanguageFilter
from titan_dsv3.data.prepare.readers import Task, list_files, plan_tasks, read_task
from titan_dsv3.data.prepare.tokenize import Tokenize, write_json_atomic, write_manifest
from titan_dsv3.data.tokenizer import TextTokenizer

REPORT_FORMAT = "titan_dsv3.prepare_report.v1"
# Settings that change how a run goes, not what it produces: a run may resume with other values.
_NOT_FINGERPRINTED = {
    ("pipeline", "workers"),
    ("pipeline", "progress"),
    ("pipeline", "keep_work"),
    ("output", "dir"),
    ("output", "overwrite"),
}


def build_stage(name: str, cfg: PrepareConfig, out_dir: Path):
    """The stage object for ``name``, handed only its own config section."""
    if name == "clean":
        return Clean(cfg.clean)
    if name == "exact_dedup":
        return ExactDedup(cfg.exact_dedup)
    if name == "near_dedup":
        return NearDedup(cfg.near_dedup)
    if name == "filter":
        return QualityFilter(cfg.filter)
    if name == "language":
        return LanguageFilter(cfg.language)
    if name == "tokenize":
        return Tokenize(cfg.tokenize, out_dir)
    raise ValueError(f"unknown stage {name}")


def segments(stages: list[str]) -> list[tuple[list[str], str | None]]:
    """[(per-document stages, the global stage that ends the segment or None)], e.g.
    [clean, exact_dedup, filter, tokenize] -> [([clean], exact_dedup), ([filter, tokenize], None)]."""
    out, current = [], []
    for s in stages:
        if s in GLOBAL_STAGES:
            out.append((current, s))
            current = []
        else:
            current.append(s)
    out.append((current, None))
    return out


class Ledger:
    """Counts documents in and out of every stage of one task and keeps the removal records."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        self.removed: list[dict] = []
        self._removed_by: dict[str, int] = {}

    def track(
        self, name: str, docs: Iterable[Doc], stage: Callable[[Iterable[Doc]], Iterator[Doc]] | None = None
    ) -> Iterator[Doc]:
        """Kept documents of ``stage(docs)``; removed ones are recorded under ``name``."""
        count = self.counts.setdefault(name, [0, 0])
        self._removed_by.setdefault(name, 0)

        def counted() -> Iterator[Doc]:
            for d in docs:
                count[0] += 1
                yield d

        def kept() -> Iterator[Doc]:
            for doc in stage(counted()) if stage else counted():
                if doc.removed is None:
                    count[1] += 1
                    yield doc
                else:
                    r = doc.removed
                    self.removed.append(
                        {
                            "id": doc.id,
                            "stage": name,
                            "reason": r.reason,
                            **({"kept": r.kept} if r.kept else {}),
                        }
                    )
                    self._removed_by[name] += 1

        return kept()

    def check(self) -> None:
        for name, (n_in, n_out) in self.counts.items():
            if n_in != n_out + self._removed_by[name]:
                raise RuntimeError(
                    f"stage {name} took {n_in} documents but returned {n_out} and removed {self._removed_by[name]}: "
                    "a stage must yield every document it receives, marking the ones it removes"
                )


class Work:
    """File layout of the .work folder."""

    def __init__(self, out_dir: Path):
        self.root = out_dir / ".work"

    def seg(self, s: int) -> Path:
        return self.root / f"seg{s}"

    def prefix(self, s: int, t: int) -> Path:
        return self.seg(s) / f"{t:05d}"

    def done(self, s: int, t: int) -> Path:
        return self.prefix(s, t).with_suffix(".done.json")

    def decisions(self, s: int) -> Path:
        return self.seg(s) / "decisions.json"


# ---- one task (runs in a worker) -------------------------------------------------------------------------------


class TaskRunner:
    def __init__(self, cfg: PrepareConfig, tasks: list[Task]):
        self.cfg, self.tasks = cfg, tasks
        self.out_dir = Path(cfg.output.dir)
        self.work = Work(self.out_dir)
        self.segments = segments(cfg.pipeline.stages)
        self.stages = {name: build_stage(name, cfg, self.out_dir) for name in cfg.pipeline.stages}
        self._decisions: dict[int, dict] = {}

    def decisions(self, s: int) -> dict:
        if s not in self._decisions:
            self._decisions[s] = json.loads(self.work.decisions(s).read_text())["tasks"]
        return self._decisions[s]

    def run(self, s: int, t: int) -> dict:
        """Segment ``s`` of task ``t``; returns (and writes last) the task's .done.json record."""
        doc_stages, barrier = self.segments[s]
        task, world = self.tasks[t], len(self.tasks)
        self.work.seg(s).mkdir(parents=True, exist_ok=True)
        prefix = self.work.prefix(s, t)
        ledger, issues = Ledger(), []
        if s == 0:
            docs = ledger.track("read", read_task(self.cfg.input, task, issues))
        else:
            prev = self.segments[s - 1][1]
            removals = {pos: (reason, kept) for pos, reason, kept in self.decisions(s - 1).get(str(t), [])}
            loaded = _load_docs(self.work.prefix(s - 1, t).with_suffix(".docs.jsonl"))
            docs = ledger.track(prev, _apply(loaded, removals, prev))
        for name in doc_stages:
            docs = ledger.track(name, docs, lambda d, st=self.stages[name]: st(d, t, world))
        n_docs = 0
        if barrier is not None:
            n_docs = self._write_keys(self.stages[barrier], docs, prefix, t, world)
        else:
            for _ in docs:
                n_docs += 1
        ledger.check()
        with open(prefix.with_suffix(".removed.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in ledger.removed)
        tok = self.stages.get("tokenize")
        shards = tok.written.pop(t, []) if barrier is None and tok is not None else []
        done = {"counts": ledger.counts, "issues": issues, "shards": shards, "docs": n_docs}
        write_json_atomic(self.work.done(s, t), done, indent=None)
        return done

    def _write_keys(self, stage, docs: Iterable[Doc], prefix: Path, t: int, world: int) -> int:
        keys, ids = [], []
        tmp = prefix.with_suffix(".docs.jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for doc, key in stage.keys(docs, t, world):
                f.write(json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n")
                keys.append(key)
                ids.append(doc.id)
        np.save(prefix.with_suffix(".keys.npy"), np.stack(keys) if keys else stage.empty_keys())
        prefix.with_suffix(".ids.json").write_text(json.dumps(ids, ensure_ascii=False))
        os.replace(tmp, prefix.with_suffix(".docs.jsonl"))
        return len(ids)


def _load_docs(path: Path) -> Iterator[Doc]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            yield Doc(d["id"], d["text"])


def _apply(docs: Iterable[Doc], removals: dict[int, tuple[str, str | None]], stage: str) -> Iterator[Doc]:
    for pos, doc in enumerate(docs):
        if pos in removals:
            doc.remove(stage, *removals[pos])
        yield doc


_RUNNER: TaskRunner | None = None


def _init_worker(cfg: PrepareConfig, tasks: list[Task]) -> None:
    global _RUNNER
    _RUNNER = TaskRunner(cfg, tasks)


def _run_in_worker(args: tuple[int, int]) -> dict:
    return _RUNNER.run(*args)


# ---- the parent ------------------------------------------------------------------------------------------------


class Progress:
    """One status line on stderr: rewritten in place on a terminal, else printed every few seconds."""

    def __init__(self, enabled: bool, label: str, total: int, stream=None):
        self.enabled, self.label, self.total = enabled, label, total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done = self.docs = 0
        self.start = self.last = time.monotonic()

    def update(self, docs: int) -> None:
        self.done += 1
        self.docs += docs
        now = time.monotonic()
        if self.enabled and (self.tty or now - self.last > 5 or self.done == self.total):
            self.last = now
            rate = self.docs / max(now - self.start, 1e-9)
            line = f"prepare [{self.label}] {self.done}/{self.total} tasks, {self.docs:,} docs, {rate:,.0f} docs/s"
            end = "" if self.tty and self.done < self.total else "\n"
            print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)


def fingerprint(cfg: PrepareConfig, files: list[str]) -> str:
    conf = {
        sec: {k: v for k, v in vals.items() if (sec, k) not in _NOT_FINGERPRINTED}
        for sec, vals in dataclasses.asdict(cfg).items()
    }
    stats = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps([conf, stats], sort_keys=True).encode()).hexdigest()[:16]


def _remove_outputs(out_dir: Path) -> None:
    """Delete what a run writes (and nothing else) from out_dir."""
    shutil.rmtree(out_dir / ".work", ignore_errors=True)
    for pattern in ("manifest.json*", "report.json*", "train_*.bin*", "val_*.bin*"):
        for p in out_dir.glob(pattern):
            p.unlink()


def _start(cfg: PrepareConfig, fp: str, log: Callable[[str], None]) -> tuple[list[Task], list[dict]] | None:
    """Resume, restart or refuse, by what out_dir holds; None when the same run has already finished."""
    out_dir, work = Path(cfg.output.dir), Work(Path(cfg.output.dir))
    plan_path = work.root / "plan.json"
    finished = out_dir / "manifest.json"
    key = "output.overwrite"
    if finished.is_file() and (out_dir / "report.json").is_file():
        old = json.loads((out_dir / "report.json").read_text()).get("fingerprint")
        if old == fp and not cfg.output.overwrite:
            log(f"prepare: {out_dir} already holds this finished run; nothing to do")
            return None
        if not cfg.output.overwrite:
            raise ConfigError(
                f"output.dir: {out_dir} holds a finished run of another config or input; "
                f"choose another folder or pass --{key} true"
            )
        _remove_outputs(out_dir)
    elif plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        if plan["fingerprint"] == fp:
            log(f"prepare: resuming the unfinished run in {out_dir}")
            return [Task(**t) for t in plan["tasks"]], plan["issues"]
        if not cfg.output.overwrite:
            raise ConfigError(
                f"output.dir: {out_dir} holds an unfinished run of another config or input; "
                f"choose another folder, restore them, or pass --{key} true"
            )
        _remove_outputs(out_dir)
    elif cfg.output.overwrite:
        _remove_outputs(out_dir)
    work.root.mkdir(parents=True, exist_ok=True)
    issues: list[dict] = []
    tasks = plan_tasks(cfg.input, issues)
    write_json_atomic(plan_path, {"fingerprint": fp, "tasks": [t.to_dict() for t in tasks], "issues": issues})
    return tasks, issues


def _decide(cfg: PrepareConfig, work: Work, s: int, name: str, n_tasks: int) -> None:
    """Gather the keys of segment s in input order, let the global stage decide, write decisions.json."""
    stage = build_stage(name, cfg, Path(cfg.output.dir))
    ids: list[str] = []
    keys, offsets = [], [0]
    for t in range(n_tasks):
        prefix = work.prefix(s, t)
        ids.extend(json.loads(prefix.with_suffix(".ids.json").read_text()))
        keys.append(np.load(prefix.with_suffix(".keys.npy")))
        offsets.append(len(ids))
    all_keys = np.concatenate(keys) if keys else stage.empty_keys()
    removals, stats = stage.find_duplicates(ids, all_keys)
    per_task: dict[str, list] = {}
    t = 0
    for i in sorted(removals):
        while i >= offsets[t + 1]:
            t += 1
        per_task.setdefault(str(t), []).append([i - offsets[t], removals[i].reason, removals[i].kept])
    write_json_atomic(work.decisions(s), {"stage": name, "stats": stats, "tasks": per_task}, indent=None)


def run(cfg: PrepareConfig, log: Callable[[str], None] | None = None) -> dict:
    """Prepare cfg.input into token shards in cfg.output.dir; returns the report (without the removed list)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out_dir = Path(cfg.output.dir)
    files = list_files(cfg.input.paths)
    fp = fingerprint(cfg, files)
    tokenizer = TextTokenizer(cfg.tokenize.tokenizer or None)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = _start(cfg, fp, log)
    if started is None:
        return _summary(json.loads((out_dir / "report.json").read_text()))
    tasks, plan_issues = started
    work = Work(out_dir)
    segs = segments(cfg.pipeline.stages)
    workers = cfg.pipeline.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(tasks)))
    pool = None
    if workers > 1:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(cfg, tasks))
    try:
        runner = None if pool else TaskRunner(cfg, tasks)
        for s, (doc_stages, barrier) in enumerate(segs):
            pending = [t for t in range(len(tasks)) if not work.done(s, t).is_file()]
            label = ", ".join(doc_stages + ([f"{barrier} keys"] if barrier else [])) or "load"
            progress = Progress(
                cfg.pipeline.progress and bool(pending), f"{s + 1}/{len(segs)} {label}", len(pending)
            )
            results = (
                pool.imap_unordered(_run_in_worker, [(s, t) for t in pending])
                if pool
                else (runner.run(s, t) for t in pending)
            )
            for done in results:
                progress.update(done["docs"])
            if barrier is not None and not work.decisions(s).is_file():
                _decide(cfg, work, s, barrier, len(tasks))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    shards = [
        sh for t in range(len(tasks)) for sh in json.loads(work.done(len(segs) - 1, t).read_text())["shards"]
    ]
    tokens = {
        split: sum(sh["num_tokens"] for sh in shards if sh["split"] == split) for split in ("train", "val")
    }
    report = _build_report(cfg, fp, work, segs, tasks, plan_issues, len(files), tokens)
    write_json_atomic(out_dir / "report.json", report)
    write_manifest(out_dir, tokenizer, shards)  # last: a folder without manifest.json is unfinished
    if not cfg.pipeline.keep_work:
        shutil.rmtree(work.root, ignore_errors=True)
    summary = _summary(report)
    log(
        f"prepare: {summary['documents_in']:,} documents in, {summary['documents_out']:,} out, "
        f"{tokens['train']:,} train / {tokens['val']:,} val tokens -> {out_dir}"
    )
    return summary


def _build_report(
    cfg: PrepareConfig,
    fp: str,
    work: Work,
    segs: list,
    tasks: list[Task],
    plan_issues: list[dict],
    n_files: int,
    tokens: dict[str, int],
) -> dict:
    counts: dict[str, list[int]] = {name: [0, 0] for name in ["read", *cfg.pipeline.stages]}
    issues, removed = list(plan_issues), []
    for s in range(len(segs)):
        for t in range(len(tasks)):
            done = json.loads(work.done(s, t).read_text())
            for name, (n_in, n_out) in done["counts"].items():
                counts[name][0] += n_in
                counts[name][1] += n_out
            issues.extend(done["issues"])
            with open(work.prefix(s, t).with_suffix(".removed.jsonl"), encoding="utf-8") as f:
                removed.extend(json.loads(line) for line in f)
    details = {}
    for s, (_, barrier) in enumerate(segs):
        if barrier is not None:
            details[barrier] = json.loads(work.decisions(s).read_text())["stats"]
    stages = [
        {"stage": name, "in": n_in, "out": n_out, "removed": n_in - n_out, **details.get(name, {})}
        for name, (n_in, n_out) in counts.items()
    ]
    return {
        "format": REPORT_FORMAT,
        "fingerprint": fp,
        "config": dataclasses.asdict(cfg),
        "inputs": {"files": n_files, "tasks": len(tasks), "issues": issues},
        "stages": stages,
        "documents_in": stages[0]["in"],
        "documents_out": stages[-1]["out"],
        "tokens": tokens,
        "removed": removed,
    }


def _summary(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "removed"}
